//! Fuzzes `syncgate::ws::connection::Connection`, the per-connection state machine, the way the
//! worker drives it: the 101 queued first, then client bytes (raw or as well-formed frames),
//! partial socket writes, timer ticks, and the worker's own calls (open, close, fail, probe,
//! broadcast) in any order.
//!
//! Properties, beyond "never panics":
//! - The bytes written to the socket are the 101 response, whole and first, then well-formed
//!   server frames: unmasked, FIN set, no RSV bit (no compression here), control frames within
//!   125 bytes, text frames valid UTF-8; nothing after our close frame, and only one of those.
//!   Writes are cut at arbitrary points, so a frame interleaved into another shows here.
//! - The outbound queue stays bounded: what is written after a full drain is at most twice
//!   what the peer sent since the last drain, plus the broadcasts queued and a constant per
//!   timer tick (keepalive), per call of the worker's and per drain (a close frame, an error
//!   message).
//! - Once `finished()` is true the worker drops the socket; the harness stops there.

#![no_main]

use std::io::Cursor;
use std::rc::Rc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use syncgate::protocol::ErrorKind;
use syncgate::ws::connection::{self, Connection, Mode, Settings, Shared};
use syncgate::ws::frame::{encode_client_frame, encode_frame, DecoderLimits, OpCode};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode as WireOpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Stands for the 101 response the worker queues with `send_raw` before anything else.
const RESPONSE: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";
/// Largest control frame payload (RFC 6455 5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;
/// Outbound bytes one tick may add: a keepalive ping and an idle `["pong",{}]`, with headers.
const PER_TICK: usize = 64;
/// Outbound bytes one call of the worker may add (`connected`, an error message, a close
/// frame, a probe ping).
const PER_CALL: usize = 256;
/// Outbound bytes one protocol failure of the peer's may add between two drains (an error
/// message quoting at most what the peer sent, and a close frame).
const PER_DRAIN: usize = 1024;

#[derive(Debug, Arbitrary)]
struct Input {
    /// The connection's mode, among those that face a client: sync, echo or a relay's
    /// client hop (`mode % 3`).
    mode: u8,
    /// Whether the socket takes the whole 101 before any client byte arrives (the usual
    /// case); otherwise client bytes may arrive, as they may in the handoff, while the 101
    /// still waits in the queue.
    write_101_first: bool,
    /// `max_message_bytes`, reduced to 0..=4096.
    max_message_bytes: u16,
    /// `max_fragments`, reduced to 1..=64.
    max_fragments: u8,
    ops: Vec<Op>,
}

#[derive(Debug, Arbitrary)]
enum Op {
    /// Raw bytes from the socket.
    Bytes(Vec<u8>),
    /// A well-formed masked client frame (so the fuzzer gets past the codec quickly).
    Frame {
        opcode: u8,
        fin: bool,
        payload: Vec<u8>,
        mask: [u8; 4],
    },
    /// The socket accepts up to this many bytes of what `next_send` offers (0: would block).
    /// Small on purpose: short writes that end inside a frame are the interesting ones, and
    /// `Drain` covers whole writes.
    Write(u8),
    /// The socket accepts everything until the queue is empty.
    Drain,
    /// Time passes (milliseconds) and the timer fires.
    Tick(u16),
    Open,
    Close(u16),
    Fail,
    /// An error message without a close (the worker's non-fatal errors).
    SendError,
    Probe,
    ClearProbe,
    /// A broadcast frame shared with other connections.
    Shared(Vec<u8>),
    Terminate,
    Shrink,
}

fn settings(input: &Input) -> Settings {
    Settings {
        idle_send: Duration::from_secs(6),
        silence: Duration::from_secs(15),
        ping_timeout: Duration::from_secs(5),
        close_timeout: Duration::from_secs(2),
        max_outbound: 1024,
        slow_consumer: Duration::from_secs(10),
        decoder: DecoderLimits {
            max_message_bytes: usize::from(input.max_message_bytes % 4097),
            max_fragments: usize::from(input.max_fragments % 64) + 1,
            allow_rsv1: false,
            server_frames: false,
        },
        compress_threshold: 1024,
    }
}

/// The socket as the harness sees it: everything written, and the budget of the current
/// drain period.
struct Wire {
    bytes: Vec<u8>,
    /// Bytes the peer sent, broadcasts queued, ticks and worker calls since the last full
    /// drain.
    fed: usize,
    shared: usize,
    ticks: usize,
    calls: usize,
    /// Where the last full drain ended in `bytes`.
    drained_at: usize,
}

impl Wire {
    /// Writes at most `limit` bytes of what the connection offers; false when it offers none.
    fn write(&mut self, conn: &mut Connection, limit: usize, now: Instant) -> bool {
        let Some(offered) = conn.next_send().map(|out| out.to_vec()) else {
            return false;
        };
        assert!(!offered.is_empty(), "next_send offered an empty write");
        let n = offered.len().min(limit);
        self.bytes.extend_from_slice(&offered[..n]);
        conn.on_sent(n, now);
        true
    }

    fn drain(&mut self, conn: &mut Connection, now: Instant) {
        while self.write(conn, usize::MAX, now) {}
        assert!(conn.flushed(), "nothing offered, yet not flushed");
        let written = self.bytes.len() - self.drained_at;
        let bound =
            2 * self.fed + self.shared + PER_TICK * self.ticks + PER_CALL * self.calls + PER_DRAIN;
        assert!(
            written <= bound,
            "{written} bytes queued from {} received, {} broadcast, {} ticks, {} calls",
            self.fed,
            self.shared,
            self.ticks,
            self.calls
        );
        self.drained_at = self.bytes.len();
        self.fed = 0;
        self.shared = 0;
        self.ticks = 0;
        self.calls = 0;
    }
}

/// Checks the whole output: the 101 first, then well-formed server frames. `cut` says the
/// socket was dropped with bytes still queued (a terminated connection), so the output may
/// stop anywhere.
fn check_wire(wire: &[u8], cut: bool) {
    if cut && wire.len() < RESPONSE.len() && RESPONSE.starts_with(wire) {
        return;
    }
    let Some(frames) = wire.strip_prefix(RESPONSE) else {
        let shown = &wire[..wire.len().min(RESPONSE.len() + 8)];
        panic!("the output does not start with the whole 101: {shown:02x?}");
    };
    let mut cursor = Cursor::new(frames);
    let mut closed = false;
    while (cursor.position() as usize) < frames.len() {
        let at = cursor.position() as usize;
        let (header, len) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(parsed)) => parsed,
            Ok(None) if cut => return,
            Ok(None) => panic!("output ends inside a frame header at {at}"),
            Err(e) => panic!("bad frame header at {at}: {e}"),
        };
        let start = cursor.position() as usize;
        let end = start.checked_add(len as usize).filter(|&end| end <= frames.len());
        let Some(end) = end else {
            if cut {
                return;
            }
            panic!("frame at {at} declares {len} bytes, {} left", frames.len() - start);
        };
        let payload = &frames[start..end];
        cursor.set_position(end as u64);
        // RFC 6455 5.5.1: no data frame after a close frame (and one close frame at most).
        // A ping or pong after it is allowed by the RFC, so it is not checked here.
        let data_or_close =
            !matches!(header.opcode, WireOpCode::Control(Control::Ping | Control::Pong));
        assert!(!(closed && data_or_close), "{:?} after our close frame (at {at})", header.opcode);
        assert!(header.is_final && header.mask.is_none(), "server frame at {at}: {header:?}");
        assert!(!header.rsv1 && !header.rsv2 && !header.rsv3, "RSV bit at {at}: {header:?}");
        match header.opcode {
            WireOpCode::Control(Control::Close) => {
                assert!(payload.len() <= MAX_CONTROL_PAYLOAD && payload.len() != 1);
                if payload.len() >= 2 {
                    assert!(std::str::from_utf8(&payload[2..]).is_ok(), "close reason not UTF-8");
                }
                closed = true;
            }
            WireOpCode::Control(Control::Ping | Control::Pong) => {
                assert!(payload.len() <= MAX_CONTROL_PAYLOAD, "control frame over 125 bytes");
            }
            WireOpCode::Data(Data::Text) => {
                assert!(std::str::from_utf8(payload).is_ok(), "text frame not UTF-8 at {at}");
            }
            WireOpCode::Data(Data::Binary) => {}
            other => panic!("unexpected opcode at {at}: {other:?}"),
        }
    }
}

fuzz_target!(|input: Input| {
    let start = Instant::now();
    let mut now = start;
    let mode = [Mode::Sync, Mode::Echo, Mode::Relay][usize::from(input.mode % 3)];
    let mut conn = Connection::new(mode, now);
    let mut shared = Shared::new(settings(&input), 1);
    conn.send_raw(RESPONSE.to_vec());
    let mut wire = Wire { bytes: Vec::new(), fed: 0, shared: 0, ticks: 0, calls: 0, drained_at: 0 };
    if input.write_101_first {
        wire.drain(&mut conn, now);
    }

    for op in &input.ops {
        if conn.finished() {
            // The worker shuts the socket down here: no more reads, writes or calls.
            break;
        }
        if matches!(op, Op::Open | Op::Close(_) | Op::Fail | Op::SendError | Op::Probe) {
            wire.calls += 1;
        }
        match op {
            Op::Bytes(bytes) => {
                wire.fed += bytes.len();
                conn.on_bytes(&mut bytes.clone(), &mut shared, "g1", now);
            }
            Op::Frame { opcode, fin, payload, mask } => {
                let opcode = match opcode % 6 {
                    0 => OpCode::Text,
                    1 => OpCode::Binary,
                    2 => OpCode::Continuation,
                    3 => OpCode::Ping,
                    4 => OpCode::Pong,
                    _ => OpCode::Close,
                };
                let mut frame = Vec::new();
                encode_client_frame(&mut frame, opcode, payload, *mask, *fin, false);
                wire.fed += frame.len();
                conn.on_bytes(&mut frame, &mut shared, "g1", now);
            }
            Op::Write(limit) if limit % 32 == 0 => {}
            Op::Write(limit) => {
                wire.write(&mut conn, usize::from(*limit % 32), now);
            }
            Op::Drain => wire.drain(&mut conn, now),
            Op::Tick(ms) => {
                now += Duration::from_millis(u64::from(*ms));
                wire.ticks += 1;
                conn.on_tick(&shared.settings, now);
            }
            Op::Open => conn.open("w1", "g1", None, now),
            Op::Close(code) => conn.close(*code % 5000, "closing", now),
            Op::Fail => conn.fail(ErrorKind::InvalidMessage, "fuzz", now),
            Op::SendError => conn.send_error(ErrorKind::Unauthorized, "fuzz"),
            Op::Probe => conn.probe(),
            Op::ClearProbe => conn.clear_probe(),
            Op::Shared(payload) => {
                let mut frame = Vec::new();
                encode_frame(&mut frame, OpCode::Binary, payload, false);
                wire.shared += frame.len();
                conn.send_shared(Rc::from(frame), 1);
            }
            Op::Terminate => conn.terminate(syncgate::ws::connection::End::Normal),
            Op::Shrink => conn.shrink(),
        }
        let _ = conn.take_notices();
        let _ = connection::take_counts();
        let _ = conn.probe_answered();
    }
    let cut = conn.finished() && !conn.flushed();
    if !conn.finished() {
        wire.drain(&mut conn, now);
    }
    check_wire(&wire.bytes, cut);
});
