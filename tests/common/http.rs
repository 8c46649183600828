//! Raw HTTP: [`http`] sends bytes as they are and reads the raw answer, for the plain HTTP
//! routes and for malformed requests no HTTP library would send.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::daemon::WAIT;

/// A plain HTTP answer.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Status line and headers, as text.
    pub head: String,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `request` as is and reads the answer until the server closes (it answers plain
/// HTTP with `Connection: close`).
pub fn http(addr: SocketAddr, request: &[u8]) -> HttpResponse {
    let mut s = TcpStream::connect(addr).expect("tcp connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(request).expect("send the request");
    let raw = read_to_end_within(&mut s, WAIT);
    parse_http(&raw)
        .unwrap_or_else(|| panic!("no HTTP answer: {:?}", String::from_utf8_lossy(&raw)))
}

/// Everything the peer sends until it closes, or until `timeout` (which fails the test:
/// plain HTTP answers must not hang).
pub fn read_to_end_within(s: &mut TcpStream, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the server did not close within {timeout:?}; got {:?}",
            String::from_utf8_lossy(&out)
        );
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut chunk) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return out,
        }
    }
}

pub fn parse_http(raw: &[u8]) -> Option<HttpResponse> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some(HttpResponse { status, head, body: raw[end..].to_vec() })
}
