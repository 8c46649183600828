//! The upstream hop's handshake, sans-IO: the upgrade request syncgate sends to zero-cache
//! for an admitted client, and the check of zero-cache's answer.
//!
//! zero-cache needs the client's path, query string and `Sec-WebSocket-Protocol` as the
//! client sent them (the token stays in the header, so zero-cache still does its own
//! checks); `Cookie` and `Origin` go verbatim (zero-cache forwards them to an app's API
//! server); `X-Forwarded-For` carries the client's address. Nothing else of the client's
//! head is passed on, and compression is never offered: the upstream hop is uncompressed.
//! One exception to "as the client sent them": with `upstream.anonymous_user_id` set, a
//! socket without a token has its `userID` replaced ([`with_user_id`]).

use std::net::IpAddr;

use base64::Engine as _;
use percent_encoding::utf8_percent_encode;

use crate::protocol::header::URI_COMPONENT;
use crate::protocol::route::form_decode;
use crate::upstream::Target;
use crate::ws::mask;

/// An upgrade request for the upstream, and what its 101 must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub bytes: Vec<u8>,
    /// The `Sec-WebSocket-Accept` value the 101 must carry (RFC 6455 4.1): proof that the
    /// answer comes from a WebSocket server that read this request.
    pub accept: String,
}

/// Why zero-cache's answer is not a WebSocket upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

/// The longest answer head the relay reads before it gives up on an upstream.
pub const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// The `X-Forwarded-For` value for the upstream: the client's own header extended with the
/// address syncgate got the connection from, when that peer is a trusted proxy (its header
/// is then the chain so far); only the peer's address otherwise (an untrusted client's
/// header proves nothing and is dropped).
pub fn forwarded_for(peer: IpAddr, trusted_peer: bool, header: Option<&str>) -> String {
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match header.map(str::trim).filter(|h| trusted_peer && !h.is_empty()) {
        Some(chain) => format!("{chain}, {peer}"),
        None => peer.to_string(),
    }
}

/// The request target `path` with its `userID` parameters (every spelling zero-cache decodes
/// to that name) dropped and one naming `user` added at the end; the other parameters stay
/// as they were, in their order.
pub fn with_user_id(path: &str, user: &str) -> String {
    let (base, query) = path.split_once('?').unwrap_or((path, ""));
    let mut out = String::with_capacity(path.len() + user.len() + 8);
    out.push_str(base);
    out.push('?');
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let name = pair.split_once('=').map_or(pair, |(name, _)| name);
        if form_decode(name) != "userID" {
            out.push_str(pair);
            out.push('&');
        }
    }
    out.push_str("userID=");
    out.extend(utf8_percent_encode(user, URI_COMPONENT));
    out
}

/// The upgrade request for `target` carrying the client's request `head` (the raw bytes the
/// listener read, already validated), with `forwarded_for` as its `X-Forwarded-For`, and
/// with `user` as its `userID` if given (`upstream.anonymous_user_id`, for a socket without
/// a token).
pub fn upgrade(
    head: &[u8],
    target: &Target,
    forwarded_for: &str,
    user: Option<&str>,
) -> Result<Request, String> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err("the client's request head does not parse".into()),
    }
    let path = req.path.ok_or("no request target")?;
    let rewritten;
    let path = match user {
        Some(user) => {
            rewritten = with_user_id(path, user);
            rewritten.as_str()
        }
        None => path,
    };
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&mask::random_u64().to_ne_bytes());
    key[8..].copy_from_slice(&mask::random_u64().to_ne_bytes());
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let mut out = Vec::with_capacity(head.len() + 256);
    out.extend_from_slice(format!("GET {}{} HTTP/1.1\r\n", target.base, path).as_bytes());
    let mut line = |name: &str, value: &[u8]| {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    line("Host", target.host.as_bytes());
    line("Upgrade", b"websocket");
    line("Connection", b"Upgrade");
    line("Sec-WebSocket-Version", b"13");
    line("Sec-WebSocket-Key", key.as_bytes());
    for name in ["sec-websocket-protocol", "cookie", "origin"] {
        // Repeated headers keep their order (a list joined as HTTP joins it).
        for h in req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)) {
            line(h.name, h.value);
        }
    }
    line("X-Forwarded-For", forwarded_for.as_bytes());
    out.extend_from_slice(b"\r\n");
    Ok(Request { bytes: out, accept: tungstenite::handshake::derive_accept_key(key.as_bytes()) })
}

/// Checks zero-cache's answer head (up to and including its blank line): a 101 with the
/// expected `Sec-WebSocket-Accept` and no extension (none was offered).
pub fn check_answer(head: &[u8], accept: &str) -> Result<(), Refused> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut res = httparse::Response::new(&mut headers);
    match res.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(Refused("upstream answered something that is not HTTP".into())),
    }
    let code = res.code.unwrap_or(0);
    if code != 101 {
        let reason = res.reason.unwrap_or("");
        return Err(Refused(format!("upstream answered {code} {reason}").trim_end().to_string()));
    }
    let value = |name: &str| {
        res.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    if value("sec-websocket-accept") != Some(accept) {
        return Err(Refused("upstream's 101 has a wrong Sec-WebSocket-Accept".into()));
    }
    if value("sec-websocket-extensions").is_some() {
        return Err(Refused("upstream agreed to an extension that was not offered".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(base: &str) -> Target {
        Target {
            url: format!("ws://127.0.0.1:4849{base}"),
            addr: "127.0.0.1:4849".parse().unwrap(),
            host: "127.0.0.1:4849".into(),
            base: base.into(),
            key: 1,
        }
    }

    const HEAD: &[u8] =
        b"GET /sync/v51/connect?clientID=c1&clientGroupID=g1&userID=alice HTTP/1.1\r\n\
Host: edge.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: eyJhdXRoVG9rZW4iOiJ0In0\r\n\
Sec-WebSocket-Extensions: permessage-deflate\r\nCookie: session=abc\r\nCookie: theme=dark\r\n\
Origin: https://app.example\r\nX-Forwarded-For: 10.0.0.1\r\nUser-Agent: test\r\n\r\n";

    fn headers(bytes: &[u8]) -> (String, Vec<(String, String)>) {
        let text = std::str::from_utf8(bytes).unwrap();
        assert!(text.ends_with("\r\n\r\n"));
        let mut lines = text.trim_end().split("\r\n");
        let first = lines.next().unwrap().to_string();
        let pairs = lines
            .map(|l| {
                let (n, v) = l.split_once(": ").unwrap();
                (n.to_ascii_lowercase(), v.to_string())
            })
            .collect();
        (first, pairs)
    }

    #[test]
    fn the_request_carries_what_zero_cache_needs_and_nothing_else() {
        let r = upgrade(HEAD, &target("/zero"), "203.0.113.9", None).unwrap();
        let (first, h) = headers(&r.bytes);
        assert_eq!(
            first,
            "GET /zero/sync/v51/connect?clientID=c1&clientGroupID=g1&userID=alice HTTP/1.1"
        );
        let get =
            |n: &str| h.iter().filter(|(k, _)| k == n).map(|(_, v)| v.as_str()).collect::<Vec<_>>();
        assert_eq!(get("host"), ["127.0.0.1:4849"]);
        assert_eq!(get("upgrade"), ["websocket"]);
        assert_eq!(get("connection"), ["Upgrade"]);
        assert_eq!(get("sec-websocket-version"), ["13"]);
        assert_eq!(get("sec-websocket-protocol"), ["eyJhdXRoVG9rZW4iOiJ0In0"]);
        assert_eq!(get("cookie"), ["session=abc", "theme=dark"]);
        assert_eq!(get("origin"), ["https://app.example"]);
        assert_eq!(get("x-forwarded-for"), ["203.0.113.9"]);
        // Its own nonce, not the client's; no extension offered; the rest stays behind.
        let key = get("sec-websocket-key");
        assert_eq!(key.len(), 1);
        assert_ne!(key[0], "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(key[0]).unwrap().len(), 16);
        assert_eq!(r.accept, tungstenite::handshake::derive_accept_key(key[0].as_bytes()));
        assert!(get("sec-websocket-extensions").is_empty());
        assert!(get("user-agent").is_empty());
        // A fresh nonce every time.
        assert_ne!(upgrade(HEAD, &target(""), "x", None).unwrap().accept, r.accept);
        let (first, _) = headers(&upgrade(HEAD, &target(""), "x", None).unwrap().bytes);
        assert!(first.starts_with("GET /sync/v51/connect?"), "{first}");
    }

    #[test]
    fn an_anonymous_user_id_replaces_every_spelling_of_the_clients() {
        let r = upgrade(HEAD, &target(""), "x", Some("anon")).unwrap();
        let (first, _) = headers(&r.bytes);
        assert_eq!(
            first,
            "GET /sync/v51/connect?clientID=c1&clientGroupID=g1&userID=anon HTTP/1.1"
        );
        let cases = [
            // Spelled as zero-cache's URLSearchParams would still read it, twice over.
            ("/p?a=1&user%49D=alice&userID=bob&b=2", "/p?a=1&b=2&userID=anon"),
            ("/p?userID&b=2", "/p?b=2&userID=anon"),
            // None named: one is added. `userid` is another name.
            ("/p?a=1&userid=x", "/p?a=1&userid=x&userID=anon"),
            ("/p", "/p?userID=anon"),
            ("/p?", "/p?userID=anon"),
            ("/p?&&a=1&", "/p?a=1&userID=anon"),
        ];
        for (path, want) in cases {
            assert_eq!(with_user_id(path, "anon"), want, "{path}");
        }
        // Encoded as encodeURIComponent encodes it.
        assert_eq!(with_user_id("/p?a=1", "an on&x=y/é"), "/p?a=1&userID=an%20on%26x%3Dy%2F%C3%A9");
        assert_eq!(with_user_id("/p?userID=alice", ""), "/p?userID=");
    }

    #[test]
    fn forwarded_for_extends_a_trusted_chain_and_drops_an_untrusted_one() {
        let peer: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(forwarded_for(peer, true, Some("203.0.113.9")), "203.0.113.9, 10.1.2.3");
        assert_eq!(forwarded_for(peer, false, Some("203.0.113.9")), "10.1.2.3");
        assert_eq!(forwarded_for(peer, true, None), "10.1.2.3");
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(forwarded_for(mapped, false, None), "192.0.2.1");
    }

    #[test]
    fn only_a_proper_101_is_accepted() {
        let accept = tungstenite::handshake::derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ==");
        let ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        assert_eq!(check_answer(ok.as_bytes(), &accept), Ok(()));
        let refused = check_answer(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", &accept);
        assert_eq!(refused, Err(Refused("upstream answered 404 Not Found".into())));
        let wrong = ok.replace(&accept, "AAAA");
        assert!(check_answer(wrong.as_bytes(), &accept).unwrap_err().0.contains("Accept"));
        let ext =
            ok.replace("\r\n\r\n", "\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n");
        assert!(check_answer(ext.as_bytes(), &accept).unwrap_err().0.contains("extension"));
        assert!(check_answer(b"SSH-2.0-OpenSSH\r\n\r\n", &accept).is_err());
    }
}
