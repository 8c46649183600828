//! [`RawConn`], a WebSocket client that does nothing on its own: it never answers a ping (which
//! is how a dead or hung peer looks to the server) and sends frames exactly as the test writes
//! them, fragmented, byte by byte, pipelined or malformed.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use syncgate::ws::frame::{encode_client_frame, OpCode};

use super::daemon::WAIT;

/// A WebSocket client that does only what the test tells it: a hung or vanished peer.
pub struct RawConn {
    pub stream: TcpStream,
    /// Bytes read but not yet parsed into frames.
    buf: Vec<u8>,
}

/// One server frame, or how reading ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RawEvent {
    Frame { opcode: u8, payload: Vec<u8> },
    Eof,
    Timeout,
}

impl RawConn {
    /// Sends the opening handshake and reads the 101; fails the test unless it is a 101.
    pub fn handshake(addr: SocketAddr, path: &str, protocol: Option<&str>) -> RawConn {
        RawConn::handshake_then(addr, path, protocol, &[])
    }

    /// Like [`RawConn::handshake`], with `early` bytes (frames) written in the same write as
    /// the request head, before the 101 arrives: clients may pipeline.
    pub fn handshake_then(
        addr: SocketAddr,
        path: &str,
        protocol: Option<&str>,
        early: &[u8],
    ) -> RawConn {
        let mut stream = TcpStream::connect(addr).expect("tcp connect");
        stream.set_nodelay(true).unwrap();
        let protocol_line =
            protocol.map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n")).unwrap_or_default();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{protocol_line}\r\n"
        );
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(early);
        stream.write_all(&bytes).unwrap();
        let mut conn = RawConn { stream, buf: Vec::new() };
        let deadline = Instant::now() + WAIT;
        let end = loop {
            if let Some(p) = conn.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            assert!(
                conn.fill(deadline),
                "no complete 101 from the server: {:?}",
                String::from_utf8_lossy(&conn.buf)
            );
        };
        let head = String::from_utf8_lossy(&conn.buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101 "), "expected a 101, got {head}");
        assert!(
            head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "accept key: {head}"
        );
        conn.buf.drain(..end);
        conn
    }

    /// Reads more bytes; false on EOF, error or deadline.
    fn fill(&mut self, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        self.stream.set_read_timeout(Some(left)).unwrap();
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next frame from the server (unmasked, unfragmented: all this daemon sends).
    pub fn read_frame(&mut self, timeout: Duration) -> RawEvent {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((opcode, payload, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return RawEvent::Frame { opcode, payload };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return RawEvent::Timeout;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return RawEvent::Eof,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return RawEvent::Timeout
                }
                // A reset is how a terminated peer may learn of it, too.
                Err(_) => return RawEvent::Eof,
            }
        }
    }

    /// Reads frames until a close frame; returns its code. Text frames before it (an error
    /// message) are skipped; anything else fails the test.
    pub fn expect_close(&mut self) -> u16 {
        loop {
            match self.read_frame(WAIT) {
                RawEvent::Frame { opcode: OP_CLOSE, payload } => {
                    assert!(payload.len() >= 2, "a close frame without a code");
                    return u16::from_be_bytes([payload[0], payload[1]]);
                }
                RawEvent::Frame { opcode: OP_TEXT, .. } => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Reads the `connected` message that must come first.
    pub fn expect_connected(&mut self) {
        match self.read_frame(WAIT) {
            RawEvent::Frame { opcode: OP_TEXT, payload } => assert!(
                payload.starts_with(br#"["connected""#),
                "{}",
                String::from_utf8_lossy(&payload)
            ),
            other => panic!("expected connected, got {other:?}"),
        }
    }

    /// Sends one masked, final client frame.
    pub fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        self.send_fragment(true, opcode, payload);
    }

    /// Sends one masked client frame, final or not (`opcode` 0 continues a message).
    pub fn send_fragment(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.stream.write_all(&client_frame(fin, opcode, payload)).expect("send a raw frame");
    }

    /// Sends one masked frame whose first byte (FIN, RSV bits, opcode) is given whole.
    pub fn send_raw_frame(&mut self, first_byte: u8, payload: &[u8]) {
        let mut f = client_frame(true, OP_CONTINUATION, payload);
        f[0] = first_byte;
        self.stream.write_all(&f).expect("send a raw frame");
    }

    /// Wraps a stream on which the test wrote its own upgrade request.
    pub fn from_stream(stream: TcpStream) -> RawConn {
        RawConn { stream, buf: Vec::new() }
    }

    /// Reads the response head (for a request written by hand) and returns it.
    pub fn read_head(&mut self) -> String {
        let deadline = Instant::now() + WAIT;
        let end = loop {
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            assert!(
                self.fill(deadline),
                "no response head: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
        self.buf.drain(..end);
        head
    }
}

/// The masking key of every frame the harness sends: not zero, so the server unmasks for real.
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// The bytes of one masked client frame (no RSV bits), written by the library's client encoder
/// (`syncgate::ws::frame::encode_client_frame`, which the fuzzers use too) so that the tests keep
/// no encoder of their own. It shares the server's unmasking code, so a masking bug could
/// cancel out on these frames; [`Ws`](super::Ws) (tungstenite's masking) and the real clients
/// are what check the server against other code. Frames that are wrong on purpose are written
/// by hand: [`RawConn::send_raw_frame`], or bytes straight to [`RawConn::stream`].
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let opcode = match opcode {
        OP_CONTINUATION => OpCode::Continuation,
        OP_TEXT => OpCode::Text,
        OP_BINARY => OpCode::Binary,
        OP_CLOSE => OpCode::Close,
        OP_PING => OpCode::Ping,
        OP_PONG => OpCode::Pong,
        reserved => panic!("opcode {reserved:#x} is reserved: use RawConn::send_raw_frame"),
    };
    let mut frame = Vec::new();
    encode_client_frame(&mut frame, opcode, payload, MASK, fin, false);
    frame
}

/// The opcodes of RFC 6455, as they are on the wire (the first byte's low four bits).
pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xa;

/// `(opcode, payload, bytes used)` of a complete unmasked frame at the start of `buf`.
fn parse_server_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "the server must not mask its frames");
    let (len, mut at) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes(buf.get(2..4)?.try_into().unwrap()) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().unwrap()) as usize, 10),
        n => (n as usize, 2),
    };
    let payload = buf.get(at..at + len)?.to_vec();
    at += len;
    Some((buf[0] & 0x0f, payload, at))
}
