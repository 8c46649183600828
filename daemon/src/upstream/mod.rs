//! The front door (upstream mode): syncgate in front of a real zero-cache. With
//! `upstream.urls` set, a worker does not serve the sync protocol itself: every socket it
//! admits (the same listener, limits, token checks and displacement rules as in embedded
//! mode, docs/SECURITY.md) gets one WebSocket to a zero-cache, and messages flow both ways
//! through the worker's ring. Nothing reaches zero-cache before admission, so the holes
//! zero-cache still has (a socket without a token displacing a verified user, no connection
//! rate limit) are closed in front of it.
//!
//! Sans-IO, like the protocol layers: [`Upstreams`] (the configured zero-caches and which one
//! a client group goes to), [`request`] (the upgrade request sent upstream and the check of
//! its 101) and [`relay`] (what one hop's end means for the other). The worker's
//! `process::worker::relay` moves the bytes.

use std::net::{SocketAddr, ToSocketAddrs};

pub mod relay;
pub mod request;

/// One configured zero-cache: where to connect and what to ask for there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL as configured, for logs.
    pub url: String,
    /// Where it was resolved to (at start and at each reload: names are not looked up on the
    /// ring's thread while it serves connections).
    pub addr: SocketAddr,
    /// The `Host` header: the URL's authority.
    pub host: String,
    /// A path prefix in front of the client's own path (zero-cache accepts a one-segment
    /// base); empty when the URL has none. Never ends with `/`.
    pub base: String,
}

impl Target {
    /// Parses `ws://host[:port][/base]`. Only `ws`: the upstream hop runs on a private
    /// network next to zero-cache, and TLS to it is not supported.
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| format!("{url:?}: only ws:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        if path.contains(['?', '#']) {
            return Err(format!("{url:?}: a query or fragment has no meaning here"));
        }
        if authority.contains('@') {
            return Err(format!("{url:?}: credentials in the URL are not supported"));
        }
        let with_port = if authority.ends_with(']') || !authority.contains(':') {
            format!("{authority}:80")
        } else {
            authority.to_string()
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("{url:?}: cannot resolve {authority}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url:?}: {authority} resolves to no address"))?;
        Ok(Target {
            url: url.to_string(),
            addr,
            host: authority.to_string(),
            base: path.trim_end_matches('/').to_string(),
        })
    }
}

/// The configured zero-caches; empty means embedded mode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upstreams {
    targets: Vec<Target>,
}

impl Upstreams {
    pub fn parse(urls: &[String]) -> Result<Upstreams, String> {
        let targets = urls.iter().map(|u| Target::parse(u)).collect::<Result<_, _>>()?;
        Ok(Upstreams { targets })
    }

    /// Embedded mode: no upstream is configured.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// The zero-cache a client group's sockets go to: rendezvous (highest random weight)
    /// hashing of the clientGroupID over the list, so every socket of a group reaches the
    /// same one from any worker and any syncgate node with the same list, and a change of
    /// the list moves only the groups of the upstream that came or went.
    pub fn choose(&self, group_id: &str) -> Option<&Target> {
        self.targets.iter().max_by_key(|t| weight(&t.url, group_id))
    }
}

/// A group's weight on an upstream: xxh32 of `url + "/" + group`, the URL as the seed's
/// stand-in so that weights on different upstreams are independent.
fn weight(url: &str, group_id: &str) -> u32 {
    let mut h = xxhash_rust::xxh32::Xxh32::new(0);
    h.update(url.as_bytes());
    h.update(b"/");
    h.update(group_id.as_bytes());
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_their_port_and_base() {
        let t = Target::parse("ws://127.0.0.1:4848").unwrap();
        assert_eq!(
            (t.addr.to_string(), t.host.as_str(), t.base.as_str()),
            ("127.0.0.1:4848".to_string(), "127.0.0.1:4848", "")
        );
        let t = Target::parse("ws://127.0.0.1/zero/").unwrap();
        assert_eq!((t.addr.port(), t.host.as_str(), t.base.as_str()), (80, "127.0.0.1", "/zero"));
        let t = Target::parse("ws://[::1]:9000/base").unwrap();
        assert_eq!((t.addr.to_string(), t.base.as_str()), ("[::1]:9000".to_string(), "/base"));
        let t = Target::parse("ws://localhost:4849").unwrap();
        assert!(t.addr.ip().is_loopback());
        for bad in
            ["http://a:1", "wss://a:1", "ws://", "ws://a:1/?x=1", "ws://u@a:1", "ws://a:notaport"]
        {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_group_always_goes_to_the_same_upstream_and_a_removal_moves_only_its_groups() {
        let urls: Vec<String> = (0..4).map(|i| format!("ws://127.0.0.1:{}", 5000 + i)).collect();
        let all = Upstreams::parse(&urls).unwrap();
        let three = Upstreams::parse(&urls[..3]).unwrap();
        let mut per = [0usize; 4];
        let mut moved = 0;
        for g in 0..4000 {
            let group = format!("group-{g}");
            let before = all.choose(&group).unwrap();
            assert_eq!(all.choose(&group), Some(before), "stable");
            per[urls.iter().position(|u| *u == before.url).unwrap()] += 1;
            let after = three.choose(&group).unwrap();
            if after != before {
                moved += 1;
                assert_eq!(before.url, urls[3], "only the removed upstream's groups move");
            }
        }
        // About a quarter each, and a quarter moved.
        assert!(per.iter().all(|&n| (800..1200).contains(&n)), "{per:?}");
        assert_eq!(moved, per[3]);
        assert!(Upstreams::parse(&[]).unwrap().choose("g").is_none());
    }
}
