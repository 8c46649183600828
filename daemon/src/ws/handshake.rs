//! The HTTP side of a connection, sans-IO: finding and parsing the request head, checking an
//! upgrade request, and writing the responses (plain HTTP answers and the 101).
//!
//! The listener parses the head to route it; the worker parses the same bytes again (cheap,
//! and it keeps the handoff a plain byte copy) to finish the handshake.

use base64::Engine as _;

/// Where the head ends: the byte after the blank line, if it has arrived.
/// `from` lets a caller that reads in pieces skip what it already scanned.
pub fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    buf[start..].windows(4).position(|w| w == b"\r\n\r\n").map(|p| start + p + 4)
}

/// What the daemon needs from a request head, owned so it outlives the read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// The query string without its `?` (empty when there is none).
    pub query: String,
    /// `Upgrade: websocket` with `Connection: upgrade`.
    pub upgrade: bool,
    pub ws_key: Option<String>,
    pub ws_version: Option<String>,
    /// The raw `Sec-WebSocket-Protocol` value, echoed verbatim in the 101.
    pub ws_protocol: Option<String>,
    pub ws_extensions: Option<String>,
    pub forwarded_for: Option<String>,
}

/// Why a head cannot be served; each maps to one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// More header lines than allowed (431).
    TooManyHeaders,
    /// Not HTTP/1.1 syntax (400).
    Malformed,
}

pub fn parse_head(bytes: &[u8], max_headers: usize) -> Result<Head, HeadError> {
    let mut headers = vec![httparse::EMPTY_HEADER; max_headers];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::Malformed),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(_) => return Err(HeadError::Malformed),
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(HeadError::Malformed);
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut head = Head {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        upgrade: false,
        ws_key: None,
        ws_version: None,
        ws_protocol: None,
        ws_extensions: None,
        forwarded_for: None,
    };
    let (mut upgrade_ws, mut connection_upgrade) = (false, false);
    for h in req.headers.iter() {
        let Ok(value) = std::str::from_utf8(h.value) else {
            continue;
        };
        let value = value.trim();
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade_ws |= value.split(',').any(|v| v.trim().eq_ignore_ascii_case("websocket"));
        } else if name.eq_ignore_ascii_case("connection") {
            connection_upgrade |=
                value.split(',').any(|v| v.trim().eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            head.ws_key = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            head.ws_version = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            // Browsers send one value; join repeats as a list would be joined.
            head.ws_protocol = Some(match head.ws_protocol.take() {
                Some(prev) => format!("{prev}, {value}"),
                None => value.to_string(),
            });
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            head.ws_extensions = Some(match head.ws_extensions.take() {
                Some(prev) => format!("{prev}, {value}"),
                None => value.to_string(),
            });
        } else if name.eq_ignore_ascii_case("x-forwarded-for") && head.forwarded_for.is_none() {
            head.forwarded_for = Some(value.to_string());
        }
    }
    head.upgrade = upgrade_ws && connection_upgrade;
    Ok(head)
}

/// The value of cookie `name` in the request head `bytes` (every `Cookie` header, RFC 6265
/// 5.4), if it carries one. For `auth.session_cookie`, read only when that is configured.
pub fn cookie<'a>(bytes: &'a [u8], name: &str) -> Option<&'a str> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(bytes).ok()?;
    let found = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim());
    found
}

/// Why an upgrade request is not a valid WebSocket opening handshake (RFC 6455 4.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeError {
    /// Not GET (405).
    Method,
    /// Missing or not 13 (426, naming the version we speak).
    Version,
    /// Missing, or not the base64 of 16 bytes (400).
    Key,
}

pub fn check_upgrade(head: &Head) -> Result<(), UpgradeError> {
    if head.method != "GET" {
        return Err(UpgradeError::Method);
    }
    if head.ws_version.as_deref() != Some("13") {
        return Err(UpgradeError::Version);
    }
    let key = head.ws_key.as_deref().ok_or(UpgradeError::Key)?;
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(raw) if raw.len() == 16 => Ok(()),
        _ => Err(UpgradeError::Key),
    }
}

/// The 101 response: accept key, and the protocol header echoed verbatim (browsers and the
/// `ws` client abort a handshake whose answer does not name the protocol they offered).
pub fn switching_protocols(key: &str, protocol: Option<&str>, extensions: Option<&str>) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut out = Vec::with_capacity(160 + protocol.map_or(0, str::len));
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(accept.as_bytes());
    if let Some(p) = protocol {
        out.extend_from_slice(b"\r\nSec-WebSocket-Protocol: ");
        out.extend_from_slice(p.as_bytes());
    }
    if let Some(e) = extensions {
        out.extend_from_slice(b"\r\nSec-WebSocket-Extensions: ");
        out.extend_from_slice(e.as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
    out
}

/// A complete plain HTTP response that closes the connection.
pub fn http_response(
    status: u16,
    extra_headers: &[(&str, &str)],
    content_type: &str,
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + body.len());
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status)).as_bytes());
    for (name, value) in extra_headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(
        format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(body);
    out
}

/// A plain-text error answer whose body says what was wrong.
pub fn http_error(status: u16, extra_headers: &[(&str, &str)], message: &str) -> Vec<u8> {
    let body = format!("{message}\n");
    http_response(status, extra_headers, "text/plain; charset=utf-8", body.as_bytes())
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cookie_is_found_in_any_cookie_header() {
        let head = b"GET / HTTP/1.1\r\nCookie: a=1; sid=xyz\r\nCookie: b=2\r\n\r\n";
        assert_eq!(super::cookie(head, "sid"), Some("xyz"));
        assert_eq!(super::cookie(head, "b"), Some("2"));
        assert_eq!(super::cookie(head, "si"), None);
        assert_eq!(super::cookie(b"GET / HTTP/1.1\r\n\r\n", "sid"), None);
    }

    use super::*;

    const UPGRADE: &[u8] = b"GET /sync/v51/connect?clientID=a&clientGroupID=b HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: abc%3D%3D\r\n\r\n";

    #[test]
    fn head_end_finds_the_blank_line_across_reads() {
        let buf = b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest";
        assert_eq!(head_end(buf, 0), Some(buf.len() - 4));
        assert_eq!(head_end(&buf[..22], 0), None);
        // Resuming just after a partial terminator still finds it.
        assert_eq!(head_end(buf, 23), Some(buf.len() - 4));
    }

    #[test]
    fn parses_an_upgrade() {
        let h = parse_head(UPGRADE, 100).unwrap();
        assert!(h.upgrade);
        assert_eq!(h.path, "/sync/v51/connect");
        assert_eq!(h.query, "clientID=a&clientGroupID=b");
        assert_eq!(h.ws_protocol.as_deref(), Some("abc%3D%3D"));
        assert_eq!(check_upgrade(&h), Ok(()));
    }

    #[test]
    fn refuses_bad_heads() {
        assert_eq!(parse_head(b"\x00\x01garbage\r\n\r\n", 100), Err(HeadError::Malformed));
        assert_eq!(parse_head(UPGRADE, 3), Err(HeadError::TooManyHeaders));
        let mut h = parse_head(UPGRADE, 100).unwrap();
        h.ws_version = Some("8".into());
        assert_eq!(check_upgrade(&h), Err(UpgradeError::Version));
        h.ws_version = Some("13".into());
        h.ws_key = Some("short".into());
        assert_eq!(check_upgrade(&h), Err(UpgradeError::Key));
        h.method = "POST".into();
        assert_eq!(check_upgrade(&h), Err(UpgradeError::Method));
    }

    #[test]
    fn the_101_uses_the_rfc_accept_key_and_echoes_the_protocol() {
        let r = String::from_utf8(switching_protocols(
            "dGhlIHNhbXBsZSBub25jZQ==",
            Some("abc%3D%3D"),
            None,
        ))
        .unwrap();
        assert!(r.starts_with("HTTP/1.1 101 "));
        assert!(r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(r.contains("Sec-WebSocket-Protocol: abc%3D%3D\r\n"));
        assert!(r.ends_with("\r\n\r\n"));
    }

    #[test]
    fn http_errors_close_and_say_why() {
        let r = String::from_utf8(http_error(429, &[("Retry-After", "3")], "slow down")).unwrap();
        assert!(r.starts_with("HTTP/1.1 429 Too Many Requests\r\n"));
        assert!(r.contains("Retry-After: 3\r\n"));
        assert!(r.contains("Connection: close\r\n"));
        assert!(r.ends_with("\r\n\r\nslow down\n"));
    }
}
