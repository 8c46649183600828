//! [`Ws`], a small synchronous WebSocket client on `tungstenite` with a deadline on every read,
//! that answers pings the way a browser does: the well-behaved peer.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest as _;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

use super::daemon::WAIT;

/// A synchronous WebSocket client with a deadline on every read.
pub struct Ws {
    inner: WebSocket<TcpStream>,
    /// The `Sec-WebSocket-Protocol` value of the 101, as received.
    pub protocol_echo: Option<String>,
    /// WebSocket pings received (and answered) so far.
    pub pings: usize,
}

/// What a read ended with, besides a data message.
#[derive(Debug)]
pub enum Got {
    Text(String),
    Binary(Vec<u8>),
    /// A close frame: its code and reason (the client answers it).
    Close(Option<(u16, String)>),
    /// Nothing within the deadline.
    Timeout,
    /// The TCP connection ended (EOF, reset) or the WebSocket is over.
    Gone(String),
}

impl Ws {
    /// The opening handshake with an optional `Sec-WebSocket-Protocol` value. Tungstenite
    /// refuses a 101 that does not echo the offered protocol, so success proves the echo.
    pub fn connect(addr: SocketAddr, path: &str, protocol: Option<&str>) -> Result<Ws, String> {
        Ws::connect_with(addr, path, protocol, &[])
    }

    /// Like [`Ws::connect`], with more request headers (a `Cookie`, an `Origin`).
    pub fn connect_with(
        addr: SocketAddr,
        path: &str,
        protocol: Option<&str>,
        headers: &[(&'static str, &str)],
    ) -> Result<Ws, String> {
        let mut req =
            format!("ws://{addr}{path}").into_client_request().map_err(|e| e.to_string())?;
        for (name, value) in headers {
            req.headers_mut().append(*name, value.parse().map_err(|e| format!("{e}"))?);
        }
        if let Some(p) = protocol {
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", p.parse().map_err(|e| format!("{e}"))?);
        }
        let stream = TcpStream::connect(addr).map_err(|e| format!("tcp connect: {e}"))?;
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let (inner, response) = tungstenite::client::client(req, stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => format!("handshake failed: {e}"),
            tungstenite::HandshakeError::Interrupted(_) => "handshake timed out".to_string(),
        })?;
        let protocol_echo = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().unwrap_or_default().to_string());
        Ok(Ws { inner, protocol_echo, pings: 0 })
    }

    /// Shrinks the socket's receive buffer, so that the kernel stops taking the server's bytes
    /// early and what this client does not read backs up in the server's queue.
    pub fn set_recv_buffer(&self, bytes: usize) {
        nix::sys::socket::setsockopt(
            self.inner.get_ref(),
            nix::sys::socket::sockopt::RcvBuf,
            &bytes,
        )
        .unwrap();
    }

    /// The next text, binary or close frame, or the end, within `timeout`. Pings are answered
    /// on the way, as a browser does.
    pub fn recv_within(&mut self, timeout: Duration) -> Got {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Got::Timeout;
            }
            self.inner.get_mut().set_read_timeout(Some(left)).unwrap();
            match self.inner.read() {
                Ok(Message::Text(t)) => return Got::Text(t.to_string()),
                Ok(Message::Binary(b)) => return Got::Binary(b.to_vec()),
                Ok(Message::Close(frame)) => {
                    // Send our close answer now (tungstenite queued it).
                    let _ = self.inner.flush();
                    return Got::Close(frame.map(|f| (u16::from(f.code), f.reason.to_string())));
                }
                Ok(Message::Ping(_)) => {
                    self.pings += 1;
                    // Tungstenite queued the pong; it goes out on the next write or flush.
                    if let Err(e) = self.inner.flush() {
                        return Got::Gone(format!("answering a ping: {e}"));
                    }
                }
                Ok(Message::Pong(_)) | Ok(Message::Frame(_)) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    return Got::Timeout;
                }
                Err(e) => return Got::Gone(e.to_string()),
            }
        }
    }

    /// The next message, which must be a JSON text frame (within [`WAIT`]).
    pub fn recv_json(&mut self) -> Value {
        match self.recv_within(WAIT) {
            Got::Text(t) => {
                serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}"))
            }
            other => panic!("expected a JSON text message, got {other:?}"),
        }
    }

    pub fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string());
    }

    pub fn send_text(&mut self, text: &str) {
        self.inner.send(Message::text(text)).expect("send a text message");
    }

    /// Sends, or says the connection is gone (a client that reconnects when sent away).
    pub fn try_send_json(&mut self, v: &Value) -> bool {
        self.inner.send(Message::text(v.to_string())).is_ok()
    }

    pub fn send_binary(&mut self, bytes: &[u8]) {
        self.inner.send(Message::binary(bytes.to_vec())).expect("send a binary message");
    }

    /// `["ping",{}]` must be answered by `["pong",{}]`.
    pub fn ping_pong(&mut self) {
        self.send_json(&json!(["ping", {}]));
        let msg = self.recv_json_skipping_pokes();
        assert_eq!(msg, json!(["pong", {}]), "answer to a ping");
    }

    /// The next JSON text message that is not part of a poke: after `initConnection` the
    /// group sync pokes the client, and tests of other behaviour look past those messages.
    pub fn recv_json_skipping_pokes(&mut self) -> Value {
        loop {
            let msg = self.recv_json();
            let tag = msg[0].as_str().unwrap_or_default();
            if !matches!(tag, "pokeStart" | "pokePart" | "pokeEnd") {
                return msg;
            }
        }
    }

    /// Expects an error message of `kind` (with `origin: zeroCache`), returns its body.
    pub fn expect_error(&mut self, kind: &str) -> Value {
        let msg = self.recv_json_skipping_pokes();
        assert_eq!(msg[0], "error", "expected an {kind} error, got {msg}");
        assert_eq!(msg[1]["kind"], kind, "error kind: {msg}");
        assert_eq!(msg[1]["origin"], "zeroCache", "every error must carry origin zeroCache: {msg}");
        assert!(msg[1]["message"].is_string(), "error without a message: {msg}");
        msg[1].clone()
    }

    /// Expects a close frame with `code` next; returns its reason.
    pub fn expect_close(&mut self, code: u16) -> String {
        match self.recv_within(WAIT) {
            Got::Close(Some((got, reason))) => {
                assert_eq!(got, code, "close code (reason {reason:?})");
                reason
            }
            other => panic!("expected a close frame {code}, got {other:?}"),
        }
    }

    /// Expects the server to end the TCP connection after the close handshake.
    pub fn expect_gone(&mut self) {
        match self.recv_within(WAIT) {
            Got::Gone(_) => {}
            other => panic!("expected the connection to end, got {other:?}"),
        }
    }

    /// Reads for `time`, answering pings; returns what arrived. Stops early at a close or the
    /// end of the connection (which is then the last item).
    pub fn pump(&mut self, time: Duration) -> Vec<Got> {
        let deadline = Instant::now() + time;
        let mut out = Vec::new();
        loop {
            match self.recv_within(deadline.saturating_duration_since(Instant::now())) {
                Got::Timeout => return out,
                got @ (Got::Close(_) | Got::Gone(_)) => {
                    out.push(got);
                    return out;
                }
                got => out.push(got),
            }
        }
    }

    /// Reads until a WebSocket ping arrives (and is answered); fails after `timeout`.
    pub fn wait_ping(&mut self, timeout: Duration) {
        let before = self.pings;
        let deadline = Instant::now() + timeout;
        while self.pings == before {
            match self.recv_within(deadline.saturating_duration_since(Instant::now())) {
                Got::Timeout => panic!("no WebSocket ping within {timeout:?}"),
                got @ (Got::Close(_) | Got::Gone(_)) => {
                    panic!("connection ended while waiting for a ping: {got:?}")
                }
                _ => {}
            }
        }
    }

    /// Starts our close handshake with `code`.
    pub fn close(&mut self, code: u16) {
        self.inner
            .close(Some(tungstenite::protocol::CloseFrame {
                code: CloseCode::from(code),
                reason: "".into(),
            }))
            .expect("send close");
    }

    /// Keeps reading (and so answering pings) on a thread until [`Responder::stop`]; what a
    /// live client does while the test talks on another socket.
    pub fn respond_in_background(self) -> Responder {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut ws = self;
            let mut got = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                match ws.recv_within(Duration::from_millis(20)) {
                    Got::Timeout => {}
                    g @ Got::Gone(_) => {
                        got.push(g);
                        break;
                    }
                    g => got.push(g),
                }
            }
            (ws, got)
        });
        Responder { stop, handle }
    }
}

/// A [`Ws`] being read on a thread.
pub struct Responder {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(Ws, Vec<Got>)>,
}

impl Responder {
    /// Stops reading; gives back the client and everything it received meanwhile.
    pub fn stop(self) -> (Ws, Vec<Got>) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("responder thread")
    }
}
