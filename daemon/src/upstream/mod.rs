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

pub mod health;
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
    /// A short name of the URL (its xxh32) that a relay keeps, to find the relays to an
    /// upstream that goes down whatever reloads did to the list meanwhile.
    pub key: u32,
}

impl Target {
    /// Parses `ws://host[:port][/base]`. Only `ws`: the upstream hop runs on a private
    /// network next to zero-cache, and TLS to it is not supported.
    pub fn parse(url: &str) -> Result<Target, String> {
        if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{url:?}: white space or a control character"));
        }
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
            key: xxhash_rust::xxh32::xxh32(url.as_bytes(), 0),
        })
    }
}

/// The configured zero-caches and which of them are up; empty means embedded mode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upstreams {
    targets: Vec<Target>,
    /// Per target: the health checks declared it down ([`health`]); new sockets skip it.
    down: Vec<bool>,
}

impl Upstreams {
    pub fn parse(urls: &[String]) -> Result<Upstreams, String> {
        let targets: Vec<Target> =
            urls.iter().map(|u| Target::parse(u)).collect::<Result<_, _>>()?;
        let mut seen = std::collections::HashSet::new();
        if let Some(t) = targets.iter().find(|t| !seen.insert(&t.url)) {
            return Err(format!("{:?} is listed twice", t.url));
        }
        Ok(Upstreams { down: vec![false; targets.len()], targets })
    }

    /// Embedded mode: no upstream is configured.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Where the upstream with `key` is in the list, if it still is.
    pub fn position(&self, key: u32) -> Option<usize> {
        self.targets.iter().position(|t| t.key == key)
    }

    /// The health checks' latest word: the upstreams named in `down` are down, every other
    /// one is up (a URL not in the list is ignored). Returns the keys of those that were up
    /// and are down now: their relays end.
    pub fn set_down(&mut self, down: &[String]) -> Vec<u32> {
        let mut newly = Vec::new();
        for (t, d) in self.targets.iter().zip(self.down.iter_mut()) {
            let now_down = down.contains(&t.url);
            if now_down && !*d {
                newly.push(t.key);
            }
            *d = now_down;
        }
        newly
    }

    /// The zero-cache a client group's sockets go to: rendezvous (highest random weight)
    /// hashing of the clientGroupID over the upstreams that are up, so every socket of a
    /// group reaches the same one from any worker and any syncgate node with the same list
    /// and the same health, and a change (an upstream added, removed, down or back) moves
    /// only the groups of the upstream that changed. With every upstream down, the choice
    /// over all of them: the connect then fails and the client is told to back off.
    pub fn choose(&self, group_id: &str) -> Option<&Target> {
        let all_down = self.down.iter().all(|d| *d);
        self.targets
            .iter()
            .zip(&self.down)
            .filter(|(_, down)| all_down || !**down)
            .map(|(t, _)| t)
            .max_by_key(|t| weight(&t.url, group_id))
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

    #[test]
    fn a_down_upstreams_groups_go_to_their_next_choice_and_come_back() {
        let urls: Vec<String> = (0..3).map(|i| format!("ws://127.0.0.1:{}", 6000 + i)).collect();
        let mut ups = Upstreams::parse(&urls).unwrap();
        let first: Vec<String> =
            (0..3000).map(|g| ups.choose(&format!("g{g}")).unwrap().url.clone()).collect();
        let went = ups.set_down(&[urls[1].clone(), "ws://not-listed:1".into()]);
        assert_eq!(went, vec![ups.targets()[1].key], "only a listed upstream goes down");
        assert_eq!(ups.set_down(&[urls[1].clone()]), Vec::<u32>::new(), "already down");
        let mut moved = 0;
        for (g, before) in first.iter().enumerate() {
            let now = &ups.choose(&format!("g{g}")).unwrap().url;
            assert_ne!(*now, urls[1], "no new socket goes to a down upstream");
            if now != before {
                moved += 1;
                assert_eq!(*before, urls[1], "only the down upstream's groups move");
            }
        }
        assert!((800..1200).contains(&moved), "about a third moved: {moved}");
        ups.set_down(&[]);
        for (g, before) in first.iter().enumerate() {
            assert_eq!(&ups.choose(&format!("g{g}")).unwrap().url, before, "back home");
        }
        ups.set_down(&urls);
        assert_eq!(
            ups.choose("g0").map(|t| &t.url),
            Some(&first[0]),
            "all down: the plain choice, whose connect then fails"
        );
    }

    #[test]
    fn a_url_listed_twice_or_with_a_control_character_is_refused() {
        let twice = ["ws://127.0.0.1:1".to_string(), "ws://127.0.0.1:1".to_string()];
        assert!(Upstreams::parse(&twice).unwrap_err().contains("twice"));
        assert!(Target::parse("ws://127.0.0.1:1/x\u{7}y").unwrap_err().contains("control"));
        assert!(Target::parse("ws://127.0.0.1:1/x y").unwrap_err().contains("white space"));
    }
}
