//! Trusted reverse proxies: whose `X-Forwarded-For` is believed, and which hop of it is the
//! client. The rate limits key on that address (docs/SECURITY.md, "No connection rate
//! limiting"), so a client that could name its own address could reset its own limit; the
//! default, no trusted proxy, believes nobody.

use std::net::{IpAddr, Ipv6Addr, SocketAddrV4};

use crate::gate::limits::canonical;

/// One trusted network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Net {
    /// An IPv4 network: the address with its host bits zero, and the prefix length (0..=32).
    V4(u32, u8),
    /// An IPv6 network: the address with its host bits zero, and the prefix length (0..=128).
    V6(u128, u8),
}

impl Net {
    fn contains(self, ip: IpAddr) -> bool {
        match (self, canonical(ip)) {
            (Net::V4(net, len), IpAddr::V4(ip)) => u32::from(ip) & mask_v4(len) == net,
            (Net::V6(net, len), IpAddr::V6(ip)) => u128::from(ip) & mask_v6(len) == net,
            _ => false,
        }
    }
}

fn mask_v4(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask_v6(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

/// The reverse proxies whose `X-Forwarded-For` is believed. Empty (the default) believes
/// nobody, so a client cannot pick its own rate-limit key by sending the header itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    /// The trusted networks; IPv4 ones also match IPv4-mapped IPv6 peers.
    nets: Vec<Net>,
}

impl TrustedProxies {
    /// Parses networks written `addr/prefix` or as a bare address (one host), IPv4 or IPv6.
    /// Host bits set (`10.0.0.1/8`) are refused rather than guessed at: that entry may have
    /// been meant as one host or as the network. An IPv4-mapped IPv6 network with a prefix of
    /// at least 96 is taken as the IPv4 network it denotes.
    pub fn parse(list: &[String]) -> Result<Self, String> {
        let nets = list.iter().map(|entry| parse_net(entry)).collect::<Result<_, _>>()?;
        Ok(TrustedProxies { nets })
    }

    /// Whether `ip` is inside a trusted network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|net| net.contains(ip))
    }

    /// The client's address for a connection from `peer` carrying `x_forwarded_for` (every
    /// `X-Forwarded-For` header of the request joined with `,` in order). Only when `peer` is
    /// trusted is the header read, from the right (each proxy appends the address it got the
    /// request from, so entries to the left of a trusted one's were written by whoever the
    /// client was and prove nothing): trusted hops are skipped and the first untrusted one is
    /// the client. A malformed entry stops the walk at the last trusted hop, as does the end
    /// of the list; that hop stands for its clients, which then share one limit (strict
    /// rather than spoofable). IPv4-mapped addresses come back as IPv4.
    pub fn client_ip(&self, peer: IpAddr, x_forwarded_for: Option<&str>) -> IpAddr {
        let mut last_trusted = canonical(peer);
        if !self.contains(last_trusted) {
            return last_trusted;
        }
        let Some(header) = x_forwarded_for else { return last_trusted };
        for hop in header.rsplit(',') {
            let Some(ip) = parse_hop(hop) else { return last_trusted };
            if !self.contains(ip) {
                return ip;
            }
            last_trusted = ip;
        }
        last_trusted
    }
}

fn parse_net(entry: &str) -> Result<Net, String> {
    let text = entry.trim();
    let (addr, len) = match text.split_once('/') {
        Some((addr, len)) => (addr, Some(len)),
        None => (text, None),
    };
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("trusted proxy {entry:?}: {addr:?} is not an IPv4 or IPv6 address"))?;
    let max_len = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max_len,
        Some(len) => match len.parse::<u8>() {
            Ok(n) if n <= max_len && !len.starts_with('+') => n,
            _ => {
                return Err(format!(
                    "trusted proxy {entry:?}: prefix length {len:?} is not a number from 0 to \
                     {max_len}"
                ))
            }
        },
    };
    let net = match ip {
        IpAddr::V4(v4) => Net::V4(u32::from(v4), len),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) if len >= 96 => Net::V4(u32::from(v4), len - 96),
            _ => Net::V6(u128::from(v6), len),
        },
    };
    let host_bits_clear = match net {
        Net::V4(bits, len) => bits & !mask_v4(len) == 0,
        Net::V6(bits, len) => bits & !mask_v6(len) == 0,
    };
    if !host_bits_clear {
        return Err(format!(
            "trusted proxy {entry:?}: the address has bits set after the /{len} prefix; write \
             the network address, or the host without a prefix"
        ));
    }
    Ok(net)
}

/// One `X-Forwarded-For` entry: an address, an IPv6 address in brackets, either of those with
/// a port (some proxies add one). Anything else (`unknown`, RFC 7239's obfuscated names,
/// empty) is malformed.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim_matches([' ', '\t']);
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = hop.strip_prefix('[') {
        let (addr, after) = rest.split_once(']')?;
        let port_ok =
            after.is_empty() || after.strip_prefix(':').is_some_and(|p| p.parse::<u16>().is_ok());
        return if port_ok {
            addr.parse::<Ipv6Addr>().ok().map(|v6| canonical(v6.into()))
        } else {
            None
        };
    }
    hop.parse::<SocketAddrV4>().ok().map(|sa| IpAddr::V4(*sa.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn proxies(list: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn parse_err(entry: &str) -> String {
        TrustedProxies::parse(&[entry.to_string()]).unwrap_err()
    }

    #[test]
    fn parses_networks_and_hosts() {
        let p = proxies(&["10.0.0.0/8", " 192.168.1.7 ", "2001:db8::/32", "::1", "0.0.0.0/0"]);
        assert_eq!(p.nets.len(), 5);
        let p = proxies(&["10.0.0.0/8", "192.168.1.7", "2001:db8::/32", "::1"]);
        assert!(p.contains(ip("10.255.0.1")));
        assert!(!p.contains(ip("11.0.0.1")));
        assert!(p.contains(ip("192.168.1.7")));
        assert!(!p.contains(ip("192.168.1.8")));
        assert!(p.contains(ip("2001:db8:ffff::1")));
        assert!(!p.contains(ip("2001:db9::1")));
        assert!(p.contains(ip("::1")));
        assert!(!p.contains(ip("::2")));
        assert!(p.contains(ip("::ffff:10.1.2.3")), "IPv4 networks match mapped peers");
        assert!(proxies(&["::ffff:10.0.0.0/104"]).contains(ip("10.9.9.9")));
        assert!(proxies(&["0.0.0.0/0"]).contains(ip("8.8.8.8")));
        assert!(!proxies(&["0.0.0.0/0"]).contains(ip("2001:db8::1")));
        assert!(!TrustedProxies::default().contains(ip("127.0.0.1")));
    }

    #[test]
    fn refuses_malformed_networks_with_clear_errors() {
        for (entry, says) in [
            ("", "is not an IPv4 or IPv6 address"),
            ("10.0.0", "is not an IPv4 or IPv6 address"),
            ("example.com", "is not an IPv4 or IPv6 address"),
            ("fe80::1%eth0", "is not an IPv4 or IPv6 address"),
            ("10.0.0.0/33", "prefix length \"33\" is not a number from 0 to 32"),
            ("2001:db8::/129", "from 0 to 128"),
            ("10.0.0.0/", "prefix length \"\""),
            ("10.0.0.0/+8", "prefix length"),
            ("10.0.0.0/x", "prefix length"),
            ("10.0.0.1/8", "bits set after the /8 prefix"),
            ("2001:db8::1/64", "bits set after the /64 prefix"),
        ] {
            let e = parse_err(entry);
            assert!(e.contains(says), "{entry:?}: {e}");
            assert!(e.contains(&format!("{entry:?}")), "names the entry: {e}");
        }
        let list = vec!["10.0.0.0/8".to_string(), "bad".to_string()];
        assert!(TrustedProxies::parse(&list).unwrap_err().contains("\"bad\""));
    }

    #[test]
    fn a_client_cannot_spoof_its_address_without_a_trusted_proxy() {
        let p = proxies(&["10.0.0.0/8"]);
        let attacker = ip("198.51.100.7");
        assert_eq!(p.client_ip(attacker, Some("1.2.3.4")), attacker);
        assert_eq!(p.client_ip(attacker, Some("10.0.0.1")), attacker);
        assert_eq!(p.client_ip(attacker, None), attacker);
        // Nobody trusted: the header is never read.
        assert_eq!(TrustedProxies::default().client_ip(attacker, Some("1.2.3.4")), attacker);
    }

    #[test]
    fn through_a_trusted_proxy_the_rightmost_untrusted_hop_is_the_client() {
        let p = proxies(&["10.0.0.0/8", "2001:db8::/32"]);
        let proxy = ip("10.0.0.1");
        assert_eq!(p.client_ip(proxy, Some("203.0.113.5")), ip("203.0.113.5"));
        // The client wrote a fake entry itself; the proxy appended the real address.
        assert_eq!(p.client_ip(proxy, Some("1.2.3.4, 203.0.113.5")), ip("203.0.113.5"));
        // A client pretending to be one of our proxies does not make its own entry trusted.
        assert_eq!(p.client_ip(proxy, Some("10.9.9.9,203.0.113.5")), ip("203.0.113.5"));
        // Chains of trusted proxies are skipped.
        assert_eq!(
            p.client_ip(proxy, Some("203.0.113.5, 10.0.0.2, 2001:db8::7")),
            ip("203.0.113.5")
        );
        // No header from a trusted proxy: the proxy is the client.
        assert_eq!(p.client_ip(proxy, None), proxy);
        // Every hop trusted: the leftmost is the client.
        assert_eq!(p.client_ip(proxy, Some("10.0.0.3, 10.0.0.2")), ip("10.0.0.3"));
        // Mapped peers and entries come back as IPv4.
        assert_eq!(
            p.client_ip(ip("::ffff:10.0.0.1"), Some("::ffff:203.0.113.5")),
            ip("203.0.113.5")
        );
        assert_eq!(p.client_ip(ip("::ffff:198.51.100.1"), Some("1.2.3.4")), ip("198.51.100.1"));
    }

    #[test]
    fn forwarded_entries_with_ports_and_brackets_are_read() {
        let p = proxies(&["10.0.0.0/8"]);
        let proxy = ip("10.0.0.1");
        assert_eq!(p.client_ip(proxy, Some("203.0.113.5:4711")), ip("203.0.113.5"));
        assert_eq!(p.client_ip(proxy, Some("[2001:db8::5]")), ip("2001:db8::5"));
        assert_eq!(p.client_ip(proxy, Some("[2001:db8::5]:443")), ip("2001:db8::5"));
        assert_eq!(p.client_ip(proxy, Some("\t2001:db8::5 ")), ip("2001:db8::5"));
    }

    #[test]
    fn a_malformed_entry_stops_at_the_last_trusted_hop() {
        let p = proxies(&["10.0.0.0/8"]);
        let proxy = ip("10.0.0.1");
        for bad in [
            "unknown",
            "",
            " , ",
            "_hidden",
            "300.1.1.1",
            "[2001:db8::5",
            "[2001:db8::5]:99999",
            "[2001:db8::5]x",
            "[10.0.0.1]",
            "2001:db8::5:443:x",
        ] {
            assert_eq!(p.client_ip(proxy, Some(bad)), proxy, "{bad:?}");
        }
        // The walk stops at the garbage even when an address lies beyond it.
        assert_eq!(p.client_ip(proxy, Some("203.0.113.5, garbage, 10.0.0.2")), ip("10.0.0.2"));
        assert_eq!(p.client_ip(proxy, Some("203.0.113.5,")), proxy);
    }
}
