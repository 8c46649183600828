//! The load client's event loop: non-blocking sockets on one epoll instance, one thread.
//!
//! A connection goes Connecting -> AwaitHead (request sent, reading the 101) ->
//! AwaitConnected (reading Zero's `connected`) -> Open, and in the connect storm on to
//! Closing (close frame sent, waiting for the server to close). The loop checks every
//! step (accept key, protocol echo, negotiated deflate, `connected` naming this socket);
//! any deviation ends the run with an error. Open connections hand every complete
//! message to a [`Workload`], which writes its next frame through the [`Writer`].
//!
//! Reads go into one shared buffer, and only the tail of a partial frame is copied into
//! the connection, so an idle connection holds no buffer at all.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use memchr::memmem;
use syncgate_bench::wsframe::{
    self, Inflater, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT,
};
use syncgate_bench::zero;

/// Size of the shared read buffer: several 16 KiB pokes per read.
const READ_BUFFER: usize = 256 * 1024;
/// Largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Largest message (after inflation) accepted from a server.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// Time a connection may take from connect() to `connected`, and a close to finish.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Events taken per epoll_wait.
const EVENTS: usize = 1024;
/// The longest the loop sleeps, so deadlines and timeouts are looked at often enough.
const TICK: Duration = Duration::from_millis(100);

/// What a connection asks the server for.
pub struct ConnectSpec {
    /// Query parameters (and the wsid `connected` must echo).
    pub who: zero::Identity,
    /// The `Sec-WebSocket-Protocol` value (base64 JSON, percent-encoded).
    pub protocol: String,
    /// The plain echo route instead (`/echo`, the `frames` scenario): no protocol header, no
    /// `connected`; the connection is open once the 101 checks out.
    pub echo: bool,
}

/// What the workload wants once a connection is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterOpen {
    /// Keep it open and deliver its messages.
    Keep,
    /// Close it at once (connect storm): close frame, then wait for the server's close.
    Close,
}

/// The scenario logic that drives open connections.
pub trait Workload {
    /// Called when slot `id` is about to connect: who it is.
    fn request(&mut self, id: usize, now: Instant) -> ConnectSpec;
    /// The connection in slot `id` received `connected`; most workloads keep it open.
    fn on_open(&mut self, _id: usize, _now: Instant, _w: &mut Writer) -> Result<AfterOpen, String> {
        Ok(AfterOpen::Keep)
    }
    /// A complete (inflated) text message on an open connection.
    fn on_message(
        &mut self,
        id: usize,
        msg: &[u8],
        now: Instant,
        w: &mut Writer,
    ) -> Result<(), String>;
    /// A connection the workload closed finished its close handshake.
    fn on_closed(&mut self, _id: usize, _now: Instant) -> Result<(), String> {
        Ok(())
    }
    /// Called every tick: a workload reports replies that are overdue here.
    fn check(&mut self, _now: Instant) -> Result<(), String> {
        Ok(())
    }
    /// Called on every turn of the loop: a paced workload sends what is due, and says when
    /// it next has something due (the loop then waits no longer than that).
    fn wake(&mut self, _now: Instant, _w: &mut Writer) -> Result<Option<Instant>, String> {
        Ok(None)
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// connect() is in progress; the request waits in the write side.
    Connecting,
    /// The request went out; reading the 101.
    AwaitHead,
    /// The upgrade is done; reading the `connected` message.
    AwaitConnected,
    /// Messages go to the workload.
    Open,
    /// Our close frame went out; waiting for the server to close.
    Closing,
}

/// The read side of one connection.
struct ReadSide {
    /// Where the connection is.
    phase: Phase,
    /// When the current phase must be over by (handshake, close), else `None`.
    deadline: Option<Instant>,
    /// The Sec-WebSocket-Accept the server must send.
    accept: String,
    /// The protocol header the server must echo, and the wsid `connected` must name.
    spec: ConnectSpec,
    /// Bytes of an incomplete frame carried over between reads (usually empty).
    carry: Vec<u8>,
    /// Payload of a fragmented message being reassembled.
    fragments: Vec<u8>,
    /// A fragmented message is in progress; its first frame had RSV1 when `.1`.
    fragmented: Option<bool>,
    /// The server's messages are compressed (permessage-deflate was negotiated).
    inflater: Option<Box<Inflater>>,
    /// The server sent its close frame (storm: the teardown may finish on EOF).
    got_close: bool,
}

/// The write side of one connection.
struct WriteSide {
    /// The socket; `None` while the slot is free.
    fd: Option<OwnedFd>,
    /// Bytes the kernel did not take yet (usually empty: writes complete at once).
    pending: Vec<u8>,
    /// EPOLLOUT is armed because `pending` is not empty.
    want_out: bool,
    /// Window bits the client may compress with, once deflate was negotiated.
    deflate_bits: Option<u8>,
}

/// Sends frames on any connection; what a workload gets to write with.
pub struct Writer {
    /// The epoll instance, to arm EPOLLOUT when a write is short.
    epfd: RawFd,
    /// One entry per slot.
    sides: Vec<WriteSide>,
}

impl Writer {
    /// Sends `bytes` on connection `id`, queueing what the socket does not take now.
    pub fn send(&mut self, id: usize, bytes: &[u8]) -> Result<(), String> {
        let epfd = self.epfd;
        let side = &mut self.sides[id];
        let Some(fd) = side.fd.as_ref().map(AsRawFd::as_raw_fd) else {
            return Err(format!("send on closed connection {id}"));
        };
        if !side.pending.is_empty() {
            side.pending.extend_from_slice(bytes);
            return Ok(());
        }
        let written = match raw_send(fd, bytes) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(format!("send on connection {id}: {e}")),
        };
        if written < bytes.len() {
            side.pending.extend_from_slice(&bytes[written..]);
            side.want_out = true;
            epoll_mod(epfd, fd, id, true).map_err(|e| format!("epoll: {e}"))?;
        }
        Ok(())
    }

    /// Window bits for compressing frames to connection `id`, if deflate is on.
    pub fn deflate_bits(&self, id: usize) -> Option<u8> {
        self.sides[id].deflate_bits
    }

    fn flush(&mut self, id: usize) -> Result<(), String> {
        let epfd = self.epfd;
        let side = &mut self.sides[id];
        let Some(fd) = side.fd.as_ref().map(AsRawFd::as_raw_fd) else {
            return Ok(());
        };
        while !side.pending.is_empty() {
            match raw_send(fd, &side.pending) {
                Ok(n) => {
                    side.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(format!("send on connection {id}: {e}")),
            }
        }
        if side.want_out {
            side.want_out = false;
            epoll_mod(epfd, fd, id, false).map_err(|e| format!("epoll: {e}"))?;
        }
        Ok(())
    }
}

/// Where to connect and how.
pub struct Target {
    /// The server.
    pub addr: SocketAddrV4,
    /// Source addresses to spread connections over (each has its own ephemeral ports);
    /// empty lets the kernel choose.
    pub sources: Vec<Ipv4Addr>,
    /// Offer permessage-deflate and require the server to accept it.
    pub deflate: bool,
}

/// The event loop and its connections.
pub struct Client {
    /// The epoll instance (closed on drop).
    epoll: OwnedFd,
    /// Where and how to connect.
    target: Target,
    /// Read side of every slot, indexed like `writer`'s.
    reads: Vec<ReadSide>,
    /// Write side of every slot; kept apart so a workload can write to any connection
    /// while the loop holds the read side of the one that received.
    writer: Writer,
    /// Free slots, reused by the storm.
    free: Vec<usize>,
    /// Connections that should be live (opening or open); the loop opens more up to it.
    target_live: usize,
    /// Most connections in their handshake at once (1: opened in turn, as load_test).
    concurrency: usize,
    /// Connections live now.
    live: usize,
    /// Connections in their handshake now.
    handshaking: usize,
    /// Next source address to use.
    next_source: usize,
    /// Seed for the Sec-WebSocket-Key nonces.
    nonce: u64,
    /// The shared read buffer.
    scratch: Vec<u8>,
    /// Where compressed messages are inflated.
    inflated: Vec<u8>,
}

impl Client {
    /// A client with no connections yet.
    pub fn new(target: Target) -> Result<Self, String> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(format!("epoll_create1: {}", io::Error::last_os_error()));
        }
        Ok(Client {
            // SAFETY: fd is a fresh descriptor we own.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            target,
            reads: Vec::new(),
            writer: Writer { epfd: fd, sides: Vec::new() },
            free: Vec::new(),
            target_live: 0,
            concurrency: 1,
            live: 0,
            handshaking: 0,
            next_source: 0,
            nonce: 0x2545_f491_4f6c_dd1d,
            scratch: vec![0; READ_BUFFER],
            inflated: Vec::new(),
        })
    }

    /// Keep `live` connections, opening at most `concurrency` at a time.
    pub fn set_target(&mut self, live: usize, concurrency: usize) {
        self.target_live = live;
        self.concurrency = concurrency.max(1);
    }

    /// Connections open (past `connected`) right now.
    pub fn open_now(&self) -> usize {
        self.live - self.handshaking
    }

    /// Connections live (opening, open or closing) right now.
    pub fn live(&self) -> usize {
        self.live
    }

    /// The writer, for a workload's first messages.
    pub fn writer(&mut self) -> &mut Writer {
        &mut self.writer
    }

    /// Runs the loop until `deadline`.
    pub fn run_until<W: Workload>(&mut self, deadline: Instant, wl: &mut W) -> Result<(), String> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        let mut next_tick = Instant::now();
        loop {
            self.fill(wl)?;
            let now = Instant::now();
            if now >= next_tick {
                wl.check(now)?;
                self.check_deadlines(now)?;
                next_tick = now + TICK;
            }
            if now >= deadline {
                return Ok(());
            }
            let due = wl.wake(now, &mut self.writer)?.unwrap_or(deadline);
            let wait = deadline.min(next_tick).min(due).saturating_duration_since(now);
            let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: events has EVENTS entries; epoll fd is valid.
            let n = unsafe {
                libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), EVENTS as i32, ms)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("epoll_wait: {e}"));
            }
            for ev in &events[..n as usize] {
                let (flags, id) = (ev.events, ev.u64 as usize);
                if self.writer.sides[id].fd.is_none() {
                    continue; // closed earlier in this batch
                }
                if flags & libc::EPOLLOUT as u32 != 0 {
                    self.on_writable(id)?;
                }
                if flags & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                    self.on_readable(id, wl)?;
                }
            }
        }
    }

    /// Opens connections until the target is met or the handshake window is full.
    fn fill<W: Workload>(&mut self, wl: &mut W) -> Result<(), String> {
        while self.live < self.target_live && self.handshaking < self.concurrency {
            self.open(wl)?;
        }
        Ok(())
    }

    fn open<W: Workload>(&mut self, wl: &mut W) -> Result<(), String> {
        let now = Instant::now();
        let id = self.free.pop().unwrap_or(self.reads.len());
        let spec = wl.request(id, now);
        let fd =
            self.connect_socket().map_err(|e| format!("connect to {}: {e}", self.target.addr))?;
        let mut key = [0u8; 16];
        for chunk in key.chunks_mut(8) {
            self.nonce ^= self.nonce << 13;
            self.nonce ^= self.nonce >> 7;
            self.nonce ^= self.nonce << 17;
            chunk.copy_from_slice(&self.nonce.to_le_bytes());
        }
        let key = STANDARD.encode(key);
        let mut request = if spec.echo {
            format!(
                "GET /echo HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n",
                self.target.addr
            )
        } else {
            format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {}\r\n",
                zero::connect_path(&spec.who),
                self.target.addr,
                spec.protocol
            )
        };
        if self.target.deflate {
            request.push_str(
                "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
            );
        }
        request.push_str("\r\n");
        let read = ReadSide {
            phase: Phase::Connecting,
            deadline: Some(now + STEP_TIMEOUT),
            accept: tungstenite::handshake::derive_accept_key(key.as_bytes()),
            spec,
            carry: Vec::new(),
            fragments: Vec::new(),
            fragmented: None,
            inflater: None,
            got_close: false,
        };
        let write = WriteSide {
            fd: None,
            pending: request.into_bytes(),
            want_out: true,
            deflate_bits: None,
        };
        if id == self.reads.len() {
            self.reads.push(read);
            self.writer.sides.push(write);
        } else {
            self.reads[id] = read;
            self.writer.sides[id] = write;
        }
        epoll_add(self.epoll.as_raw_fd(), fd.as_raw_fd(), id).map_err(|e| format!("epoll: {e}"))?;
        self.writer.sides[id].fd = Some(fd);
        self.live += 1;
        self.handshaking += 1;
        Ok(())
    }

    /// A non-blocking TCP socket with connect() started, from the next source address.
    fn connect_socket(&mut self) -> io::Result<OwnedFd> {
        // SAFETY: plain syscall; the result is checked and owned at once.
        let raw = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Every WebSocket client sets TCP_NODELAY; small frames must not wait.
        setsockopt(raw, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
        if !self.target.sources.is_empty() {
            let src = self.target.sources[self.next_source % self.target.sources.len()];
            self.next_source += 1;
            // Pick the port at connect() time, per destination, not at bind().
            setsockopt(raw, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
            let sa = sockaddr(SocketAddrV4::new(src, 0));
            // SAFETY: sa is a valid sockaddr_in of the size passed.
            let r = unsafe {
                libc::bind(
                    raw,
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of_val(&sa) as u32,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let sa = sockaddr(self.target.addr);
        // SAFETY: sa is a valid sockaddr_in of the size passed.
        let r = unsafe {
            libc::connect(
                raw,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of_val(&sa) as u32,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(e);
            }
        }
        Ok(fd)
    }

    fn on_writable(&mut self, id: usize) -> Result<(), String> {
        if self.reads[id].phase == Phase::Connecting {
            let fd = self.writer.sides[id].fd.as_ref().map_or(-1, AsRawFd::as_raw_fd);
            let err = getsockopt_error(fd).map_err(|e| format!("getsockopt: {e}"))?;
            if err != 0 {
                return Err(format!(
                    "connect to {} failed: {}",
                    self.target.addr,
                    io::Error::from_raw_os_error(err)
                ));
            }
            self.reads[id].phase = Phase::AwaitHead;
        }
        self.writer.flush(id)
    }

    fn on_readable<W: Workload>(&mut self, id: usize, wl: &mut W) -> Result<(), String> {
        let fd = self.writer.sides[id].fd.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        if self.reads[id].phase == Phase::Connecting {
            // Readable before writable only happens when the connect failed.
            return self.on_writable(id);
        }
        // SAFETY: scratch is a valid buffer of the given length.
        let n = unsafe { libc::recv(fd, self.scratch.as_mut_ptr().cast(), self.scratch.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            if self.reads[id].phase == Phase::Closing {
                return self.finish_close(id, wl);
            }
            return Err(format!("connection {id} ({}): read: {e}", self.reads[id].spec.who.wsid));
        }
        if n == 0 {
            if self.reads[id].phase == Phase::Closing {
                return self.finish_close(id, wl);
            }
            return Err(format!(
                "server closed connection {id} (wsid {}) in phase {:?}",
                self.reads[id].spec.who.wsid, self.reads[id].phase
            ));
        }
        let now = Instant::now();
        let mut carry = std::mem::take(&mut self.reads[id].carry);
        let used = if carry.is_empty() {
            let scratch = std::mem::take(&mut self.scratch);
            let r = self.consume(id, &scratch[..n as usize], now, wl);
            let used = r.as_ref().map_or(0, |u| *u);
            if r.is_ok() && used < n as usize {
                carry.extend_from_slice(&scratch[used..n as usize]);
            }
            self.scratch = scratch;
            r.map(|_| ())
        } else {
            carry.extend_from_slice(&self.scratch[..n as usize]);
            let r = self.consume(id, &carry, now, wl);
            if let Ok(used) = r {
                carry.drain(..used);
            }
            r.map(|_| ())
        };
        used?;
        if self.writer.sides[id].fd.is_some() {
            self.reads[id].carry = carry;
        }
        Ok(())
    }

    /// Handles the head and frames at the front of `data`; returns how much it used.
    fn consume<W: Workload>(
        &mut self,
        id: usize,
        data: &[u8],
        now: Instant,
        wl: &mut W,
    ) -> Result<usize, String> {
        let mut at = 0;
        if self.reads[id].phase == Phase::AwaitHead {
            let Some(end) = memmem::find(data, b"\r\n\r\n") else {
                if data.len() > MAX_HEAD {
                    return Err(format!("connection {id}: response head over {MAX_HEAD} bytes"));
                }
                return Ok(0);
            };
            self.check_head(id, &data[..end + 4])?;
            at = end + 4;
            self.reads[id].phase = Phase::AwaitConnected;
            if self.reads[id].spec.echo {
                // No `connected` on the echo route: open now.
                self.opened(id, now, wl)?;
            }
        }
        while at < data.len() {
            let Some((frame, used)) =
                wsframe::decode(&data[at..]).map_err(|e| format!("connection {id}: {e}"))?
            else {
                break;
            };
            at += used;
            self.on_frame(id, frame, now, wl)?;
            if self.writer.sides[id].fd.is_none() {
                break;
            }
        }
        Ok(at)
    }

    /// Checks the 101: status, accept key, protocol echo, and deflate when offered.
    fn check_head(&mut self, id: usize, head: &[u8]) -> Result<(), String> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        resp.parse(head).map_err(|e| format!("connection {id}: bad response head: {e}"))?;
        let text = || String::from_utf8_lossy(head).into_owned();
        if resp.code != Some(101) {
            return Err(format!("connection {id}: upgrade refused: {}", text().trim_end()));
        }
        let header = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        let r = &self.reads[id];
        if header("sec-websocket-accept").as_deref() != Some(r.accept.as_str()) {
            return Err(format!("connection {id}: wrong Sec-WebSocket-Accept in {}", text()));
        }
        if !r.spec.echo
            && header("sec-websocket-protocol").as_deref() != Some(r.spec.protocol.as_str())
        {
            return Err(format!(
                "connection {id}: protocol header not echoed verbatim: {}",
                text()
            ));
        }
        let deflate = match header("sec-websocket-extensions") {
            Some(v) => {
                wsframe::parse_deflate_response(&v).map_err(|e| format!("connection {id}: {e}"))?
            }
            None => None,
        };
        match (self.target.deflate, deflate) {
            (true, None) => return Err("server declined permessage-deflate".into()),
            (false, Some(_)) => {
                return Err("server enabled permessage-deflate that was not offered".into())
            }
            (true, Some(p)) => {
                self.reads[id].inflater = Some(Box::default());
                self.writer.sides[id].deflate_bits = Some(p.client_max_window_bits);
            }
            (false, None) => {}
        }
        Ok(())
    }

    fn on_frame<W: Workload>(
        &mut self,
        id: usize,
        frame: wsframe::Frame<'_>,
        now: Instant,
        wl: &mut W,
    ) -> Result<(), String> {
        match frame.opcode {
            OP_PING => {
                if self.reads[id].phase == Phase::Closing {
                    return Ok(()); // our close frame is out; the socket may be gone
                }
                let mut pong = Vec::with_capacity(frame.payload.len() + 6);
                wsframe::encode_masked(OP_PONG, false, frame.payload, &mut pong);
                return self.writer.send(id, &pong);
            }
            OP_PONG => return Ok(()),
            OP_CLOSE => {
                if self.reads[id].phase == Phase::Closing {
                    self.reads[id].got_close = true;
                    return Ok(());
                }
                let code = frame.payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
                let reason = String::from_utf8_lossy(frame.payload.get(2..).unwrap_or_default());
                return Err(format!(
                    "server closed connection {id} (wsid {}): code {code:?} {reason}",
                    self.reads[id].spec.who.wsid
                ));
            }
            OP_BINARY => return Err(format!("connection {id}: binary frame at protocol v51")),
            _ => {}
        }
        let r = &mut self.reads[id];
        let compressed;
        let mut assembled = Vec::new();
        let message: &[u8] = match (frame.opcode, r.fragmented) {
            (OP_TEXT, None) if frame.fin => {
                compressed = frame.rsv1;
                frame.payload
            }
            (OP_TEXT, None) => {
                r.fragmented = Some(frame.rsv1);
                r.fragments.extend_from_slice(frame.payload);
                return Ok(());
            }
            (OP_CONTINUATION, Some(rsv1)) => {
                r.fragments.extend_from_slice(frame.payload);
                if r.fragments.len() > MAX_MESSAGE {
                    return Err(format!("connection {id}: message over {MAX_MESSAGE} bytes"));
                }
                if !frame.fin {
                    return Ok(());
                }
                r.fragmented = None;
                compressed = rsv1;
                assembled = std::mem::take(&mut r.fragments);
                &assembled
            }
            _ => {
                return Err(format!(
                    "connection {id}: frame out of sequence (opcode {})",
                    frame.opcode
                ))
            }
        };
        let message: &[u8] = if compressed {
            let inflater = r
                .inflater
                .as_mut()
                .ok_or_else(|| format!("connection {id}: RSV1 without permessage-deflate"))?;
            inflater
                .inflate(message, &mut self.inflated, MAX_MESSAGE)
                .map_err(|e| format!("connection {id}: {e}"))?;
            &self.inflated
        } else {
            message
        };
        let result = match r.phase {
            Phase::AwaitConnected => {
                zero::check_connected(message, &r.spec.who.wsid)
                    .map_err(|e| format!("connection {id}: {e}"))?;
                self.opened(id, now, wl)
            }
            Phase::Open => wl.on_message(id, message, now, &mut self.writer),
            _ => Ok(()), // data after our close frame is dropped, as RFC 6455 allows
        };
        if assembled.capacity() > 0 && self.reads[id].fragments.is_empty() {
            assembled.clear();
            self.reads[id].fragments = assembled; // keep the allocation
        }
        result
    }

    /// The connection is open: `connected` came (or, on the echo route, the 101).
    fn opened<W: Workload>(&mut self, id: usize, now: Instant, wl: &mut W) -> Result<(), String> {
        let r = &mut self.reads[id];
        r.phase = Phase::Open;
        r.deadline = None;
        self.handshaking -= 1;
        match wl.on_open(id, now, &mut self.writer)? {
            AfterOpen::Keep => Ok(()),
            AfterOpen::Close => {
                let r = &mut self.reads[id];
                r.phase = Phase::Closing;
                r.deadline = Some(now + STEP_TIMEOUT);
                self.writer.send(id, &wsframe::close_frame())
            }
        }
    }

    fn finish_close<W: Workload>(&mut self, id: usize, wl: &mut W) -> Result<(), String> {
        // Dropping the fd closes it and takes it out of the epoll set.
        self.writer.sides[id].fd = None;
        self.writer.sides[id].pending.clear();
        self.reads[id].carry = Vec::new();
        self.live -= 1;
        self.free.push(id);
        wl.on_closed(id, Instant::now())
    }

    fn check_deadlines(&self, now: Instant) -> Result<(), String> {
        for (id, r) in self.reads.iter().enumerate() {
            if self.writer.sides[id].fd.is_some() && r.deadline.is_some_and(|d| now > d) {
                return Err(format!(
                    "connection {id} (wsid {}) stuck in phase {:?} for {STEP_TIMEOUT:?}",
                    r.spec.who.wsid, r.phase
                ));
            }
        }
        Ok(())
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

fn setsockopt(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: value lives across the call and its size is passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn getsockopt_error(fd: RawFd) -> io::Result<i32> {
    let mut value: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: value and len are valid for the call.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut value as *mut i32).cast(),
            &mut len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

fn raw_send(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: bytes is valid for its length; MSG_NOSIGNAL turns SIGPIPE into EPIPE.
    let n = unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn epoll_add(epfd: RawFd, fd: RawFd, id: usize) -> io::Result<()> {
    epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, id, true)
}

fn epoll_mod(epfd: RawFd, fd: RawFd, id: usize, out: bool) -> io::Result<()> {
    epoll_ctl(epfd, libc::EPOLL_CTL_MOD, fd, id, out)
}

fn epoll_ctl(epfd: RawFd, op: i32, fd: RawFd, id: usize, out: bool) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLRDHUP | if out { libc::EPOLLOUT } else { 0 }) as u32,
        u64: id as u64,
    };
    // SAFETY: ev is valid for the call.
    if unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
