//! One WebSocket connection of the sync protocol, sans-IO: bytes in, frames out, timers.
//!
//! The worker's event loop feeds received bytes to [`Connection::on_bytes`], asks
//! [`Connection::next_send`] for what to write, reports writes with [`Connection::on_sent`],
//! and calls [`Connection::on_tick`] on its timer. Everything else (frame decoding, message
//! validation, keepalive, the close handshake) happens here, with no sockets, so it can be
//! tested and fuzzed without a network.
//!
//! Close runs once: after [`Connection::close`] (or the peer's close frame) nothing else is
//! processed and only the close handshake proceeds.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::protocol::{self, ErrorKind, Upstream};
use crate::ws::close;
use crate::ws::deflate::{Agreement, Deflater, InflateError, Inflater, SharedContexts};
use crate::ws::frame::{self, Decoder, DecoderLimits, Event, OpCode, Payload};
use crate::ws::mask;

/// The keepalive and outbound settings a connection runs with (from `[keepalive]`/`[limits]`).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Send an unsolicited `pong` message when nothing was sent for this long.
    pub idle_send: Duration,
    /// Silence after which the peer gets a WebSocket ping.
    pub silence: Duration,
    /// Time the peer has to answer that ping.
    pub ping_timeout: Duration,
    /// Time the peer has to answer our close frame.
    pub close_timeout: Duration,
    /// Outbound bytes over which the consumer counts as stuck.
    pub max_outbound: usize,
    /// Time a consumer may stay stuck before it is closed 1008.
    pub slow_consumer: Duration,
    pub decoder: DecoderLimits,
    /// Messages at least this long are compressed when permessage-deflate was agreed.
    pub compress_threshold: usize,
}

/// What a worker's connections share, lent to each while it handles its bytes or its
/// timers: one copy per worker of what would otherwise cost every connection (most of them
/// idle) its own.
pub struct Shared {
    /// The settings every connection runs with; a reload replaces them for all at once.
    pub settings: Settings,
    /// The compression contexts of connections in the shared mode (no context takeover),
    /// which then hold no compression memory of their own.
    pub contexts: SharedContexts,
    /// Where compressed messages are inflated; reused by every connection of the worker.
    pub scratch: Vec<u8>,
}

impl Shared {
    pub fn new(settings: Settings, level: u32) -> Shared {
        Shared { settings, contexts: SharedContexts::new(level), scratch: Vec::new() }
    }

    /// Gives back a large scratch buffer after a big message, so one burst does not pin
    /// megabytes for the worker's lifetime.
    pub fn trim(&mut self) {
        if self.scratch.capacity() > SCRATCH_KEEP {
            self.scratch = Vec::new();
        }
    }
}

/// Scratch capacity kept between messages.
const SCRATCH_KEEP: usize = 256 * 1024;

/// Pongs a connection queues, one per ping in order (RFC 6455 5.5.3 asks each ping to be
/// answered): a client that sends several pings before reading gets each answer. Past it a
/// flood is answered with the latest in the last place, so it costs at most this many
/// control frames (127 bytes each) per connection.
pub const MAX_QUEUED_PONGS: usize = 16;
const _: () = assert!(
    MAX_QUEUED_PONGS > MAX_IOVECS,
    "the last of a full queue of pongs is never being written"
);

/// permessage-deflate state of one connection that agreed to it.
struct Deflate {
    agreement: Agreement,
    /// Dedicated contexts (context takeover); `None` uses the worker's shared one.
    deflater: Option<Deflater>,
    inflater: Option<Inflater>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Handshake answered; waiting for the worker's admission decision (a displacement probe).
    Pending,
    Open,
    /// A close frame is queued or sent; `received` once the peer's close arrived.
    Closing {
        /// When the close began: the peer has `close_timeout` from then to answer.
        since: Tick,
        received: bool,
    },
    /// Nothing left to do but drop the socket.
    Done,
}

/// Why a connection ended, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    Normal,
    Protocol(u16),
    KeepaliveTimeout,
    CloseTimeout,
    SlowConsumer,
}

/// What a connection is for; it decides what its messages mean and which end of the
/// WebSocket it plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The embedded sync protocol: messages are handled here and by the worker's group sync.
    Sync,
    /// The conformance route (`/echo`): messages come back as they came.
    Echo,
    /// The client's hop of a relay to an upstream zero-cache: messages are checked as the
    /// sync protocol's (size, UTF-8, a known message, the push's group) and handed to the
    /// worker to forward untouched; nothing of the sync protocol is generated here.
    Relay,
    /// The upstream hop of a relay: this end is the WebSocket client (its frames are
    /// masked, the server's are not), and every message is handed over untouched.
    Upstream,
}

/// A message on its way from one hop of a relay to the other: its payload behind room for
/// the header it will be sent with, so the other hop writes the header in front of it and
/// queues the buffer as it is. The payload was copied once from where it was received, or
/// not at all when the decoder assembled it ([`Payload::into_held`]).
#[derive(Debug)]
pub struct Relayed {
    opcode: OpCode,
    /// The header's room, then the payload.
    buf: Vec<u8>,
    /// Where the payload starts: at least [`frame::header_len`] of it, masked for the
    /// upstream hop.
    gap: u8,
}

impl Relayed {
    /// A copy of `payload` to be sent on a hop that masks its frames (`masked`) or not.
    pub fn copy(opcode: OpCode, payload: &[u8], masked: bool) -> Relayed {
        let gap = frame::header_len(payload.len(), masked);
        let mut buf = Vec::with_capacity(gap + payload.len());
        buf.resize(gap, 0);
        buf.extend_from_slice(payload);
        Relayed { opcode, buf, gap: gap as u8 }
    }

    /// An upstream's message for the client's hop (unmasked): in the decoder's own buffer,
    /// when it assembled it (no copy); else a copy.
    fn from_upstream(opcode: OpCode, payload: Payload<'_>) -> Relayed {
        match payload.into_held() {
            Ok(buf) => Relayed { opcode, buf, gap: frame::HEADER_ROOM as u8 },
            Err(bytes) => Relayed::copy(opcode, bytes, false),
        }
    }

    pub fn payload(&self) -> &[u8] {
        &self.buf[self.gap as usize..]
    }
}

/// Something the worker must act on beyond this connection.
#[derive(Debug)]
pub enum Notice {
    /// `initConnection` (from the header or as the first message): the client joins its
    /// group's pokes from here on.
    Init(Box<protocol::InitConnectionBody>),
    ChangeDesiredQueries(Vec<protocol::QueriesPatchOp>),
    DeleteClients(protocol::DeleteClientsBody),
    /// A push for this connection's own group (checked here).
    Push(Box<protocol::PushBody>),
    /// A refreshed token: it must verify and name the same user as the connection's.
    UpdateAuth(String),
    /// A relay's message for the other hop.
    Relay(Relayed),
    /// A relay's `push` for the upstream, with its number of mutations: the per-user
    /// mutation limit is applied at the edge before it goes.
    RelayPush {
        message: Relayed,
        mutations: usize,
    },
    /// A relay's `updateAuth` for the upstream: the new token is verified at the edge (same
    /// user) before it goes.
    RelayAuth {
        message: Relayed,
        token: String,
    },
    /// The peer's close frame on a relay's hop (its code, if any, and reason), to be passed
    /// to the other hop.
    PeerClosed {
        code: Option<u16>,
        reason: String,
    },
}

/// A frame waiting to be written: owned by this connection, or one encoded buffer shared by
/// every recipient of a broadcast.
enum Chunk {
    /// Frames encoded here; small ones are coalesced into one.
    Owned(Vec<u8>),
    /// A frame written into the room in front of a payload that was received or compressed
    /// into this buffer ([`frame::write_header`]), from `start` on: large messages are sent
    /// without being copied behind their header.
    Framed {
        buf: Vec<u8>,
        start: usize,
    },
    Shared(Rc<[u8]>),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Owned(v) => v,
            Chunk::Framed { buf, start } => &buf[*start..],
            Chunk::Shared(s) => s,
        }
    }
}

/// What the write in progress takes, from the front: `pongs` answers, then `chunks` chunks
/// of the queue (both zero: no write in progress).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct InFlight {
    pongs: u8,
    chunks: u8,
}

impl InFlight {
    const NONE: InFlight = InFlight { pongs: 0, chunks: 0 };
}

/// Buffers one vectored write takes at most. The kernel copies up to 8 iovecs onto its stack
/// (`UIO_FASTIOV`) and allocates for more; a queue that long has more to send anyway.
const MAX_IOVECS: usize = 8;

/// The header and buffer list of a vectored write, boxed so that the pointers the kernel
/// reads stay put while the write is in flight. Allocated the first time a connection has
/// more than one buffer to write, and kept as long as its [`Outbound`].
struct IoVecs {
    msg: libc::msghdr,
    iov: [libc::iovec; MAX_IOVECS],
}

/// What [`Connection::next_send`] gives to write.
pub enum Outgoing<'a> {
    /// One buffer: a plain send.
    Bytes(&'a [u8]),
    /// Several: a `sendmsg` of this header, whose iovecs point into the connection's queue.
    Vectored(&'a libc::msghdr),
}

impl Outgoing<'_> {
    /// The bytes it writes, in order (for tests: it copies).
    pub fn to_vec(&self) -> Vec<u8> {
        match self {
            Outgoing::Bytes(b) => b.to_vec(),
            Outgoing::Vectored(msg) => {
                // SAFETY: `next_send` built `msg` over `msg_iovlen` iovecs, each pointing into
                // a buffer the connection holds unchanged while `self` borrows it.
                let iov = unsafe { std::slice::from_raw_parts(msg.msg_iov, msg.msg_iovlen) };
                let mut v = Vec::new();
                for i in iov {
                    // SAFETY: as above.
                    v.extend_from_slice(unsafe {
                        std::slice::from_raw_parts(i.iov_base as *const u8, i.iov_len)
                    });
                }
                v
            }
        }
    }
}

pub struct Connection {
    /// The frame decoder, only while a frame or message is partly received: between frames
    /// a decoder holds nothing a fresh one would not, and most connections are idle, so
    /// they carry no decoder at all. Outside [`Core`] so its callback can borrow the core.
    decoder: Option<Box<Decoder>>,
    core: Core,
}

/// Everything but the decoder, so the decoder's callback can borrow it mutably.
struct Core {
    /// What the connection is for. Who it is (clientID, group, wsid) the worker keeps:
    /// nothing here needs it but `connected` and the push check, which are handed it.
    mode: Mode,
    /// Where it is in its life; with `close_received` and `timer`, the [`State`]. Kept as
    /// separate small fields rather than one enum: they pack into what the padding of
    /// `State` and `Option<Tick>` took, 8 bytes in every connection.
    phase: Phase,
    /// Closing: the peer's close frame arrived.
    close_received: bool,
    /// Pending or open: our keepalive WebSocket ping is out (sent at `timer`), until any
    /// frame comes back.
    pinging: bool,
    /// Closing: when the close began (the peer has `close_timeout` from then to answer).
    /// Pending or open while `pinging`: when the keepalive ping went out. One tick for both:
    /// a closing connection has no keepalive.
    timer: Tick,
    end: Option<End>,
    /// What waits to be written, only while something does (see [`Outbound`]).
    out: Option<Box<Outbound>>,
    last_recv: Tick,
    last_send: Tick,
    /// The admission probe (displacement rule 3) running on this connection, if any.
    probe: Probe,
    /// Whether `initConnection` was already received (header or message).
    initialized: bool,
    /// Set when permessage-deflate was negotiated.
    deflate: Option<Box<Deflate>>,
}

/// What a connection has for others while it has any: bytes queued or being written, and
/// notices the worker has not taken yet. Allocated by the first frame or notice and freed
/// once everything is written and taken, so an idle connection (most of them, most of the
/// time) holds only the pointer.
struct Outbound {
    queue: VecDeque<Chunk>,
    /// Bytes of the front chunk already written.
    front_sent: usize,
    /// Bytes queued in `queue`, for the slow-consumer bound.
    queued_bytes: usize,
    /// The answers to WebSocket pings not written yet, in order, one per ping up to
    /// [`MAX_QUEUED_PONGS`]; past that the last one is replaced by the latest answer (a
    /// flood costs a bounded buffer). They jump the queue, between two frames, so keepalive
    /// works behind a backed-up queue.
    pongs: VecDeque<Vec<u8>>,
    /// Bytes of the front pong already written (a started pong finishes first).
    pong_sent: usize,
    /// The raw 101 response is out: before that, no pong may jump ahead of it. Only the 101
    /// clears it, and the 101 is the first thing ever queued, so a new `Outbound` starts
    /// with it set.
    greeted: bool,
    /// What the write in progress is taken from; those buffers must stay put until it is
    /// reported, so `Outbound` is never freed, and they are never changed, while this is not
    /// [`InFlight::NONE`].
    in_flight: InFlight,
    /// The iovecs of a vectored write, once one was needed.
    iovecs: Option<Box<IoVecs>>,
    /// The first tick that found the queue over `max_outbound` (None while under it).
    stuck_since: Option<Tick>,
    /// What the worker must act on, in order ([`Connection::take_notices`]).
    notices: Vec<Notice>,
}

/// The stage of a connection's life (the [`State`] without its data).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Pending,
    Open,
    Closing,
    Done,
}

/// Where an admission probe stands: a ping was sent, and any frame received after it
/// proves the peer alive.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Probe {
    None,
    Sent,
    Answered,
}

/// A time on the connections' millisecond clock: milliseconds since the clock was first
/// read, modulo 2^32 (it wraps every 49.7 days). Four bytes where an `Instant` takes
/// sixteen, for each of a connection's timers.
///
/// The wrap never shows: a time is only ever used as the start of an elapsed time, and
/// every timer is acted on (reset or ended) once its timeout has passed, within a tick of
/// the worker's loop; timeouts are capped at [`MAX_TIMEOUT_MS`], so an elapsed time that
/// matters is always far below 2^32 ms and `wrapping_sub` gives it exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tick(u32);

impl Tick {
    /// The tick of `now`. Instants before the clock's start (tests make some) count back
    /// from it, rounded down like the rest, so whole milliseconds between instants are kept
    /// exactly.
    fn at(now: Instant) -> Tick {
        thread_local! {
            /// The last instant converted and its tick: the worker hands one `now` to every
            /// event of a loop iteration, and the conversion (a 128-bit division among
            /// others) cost a 20-byte echo, which asks for two ticks, about 55 instructions
            /// more than this check does.
            static LAST: Cell<Option<(Instant, Tick)>> = const { Cell::new(None) };
        }
        static START: OnceLock<Instant> = OnceLock::new();
        if let Some((last, tick)) = LAST.get() {
            if last == now {
                return tick;
            }
        }
        let start = *START.get_or_init(|| now);
        // Truncating to u32 is the modulo 2^32.
        let tick = match now.checked_duration_since(start) {
            Some(after) => Tick(after.as_millis() as u32),
            None => Tick(0u32.wrapping_sub((start - now).as_nanos().div_ceil(1_000_000) as u32)),
        };
        LAST.set(Some((now, tick)));
        tick
    }

    /// Milliseconds from `earlier` to `self`.
    fn since(self, earlier: Tick) -> u32 {
        self.0.wrapping_sub(earlier.0)
    }
}

/// The longest timeout the millisecond clock keeps exact, about 24.8 days (half its range,
/// which leaves the other half for ticks and loop delays). The configuration refuses longer
/// ones; a longer one given here directly acts as this one.
pub const MAX_TIMEOUT_MS: u32 = i32::MAX as u32;

/// A timeout in milliseconds on the [`Tick`] clock.
fn timeout_ms(timeout: Duration) -> u32 {
    timeout.as_millis().min(MAX_TIMEOUT_MS.into()) as u32
}

impl Default for Outbound {
    fn default() -> Self {
        Outbound {
            queue: VecDeque::new(),
            front_sent: 0,
            queued_bytes: 0,
            pongs: VecDeque::new(),
            pong_sent: 0,
            greeted: true,
            in_flight: InFlight::NONE,
            iovecs: None,
            stuck_since: None,
            notices: Vec::new(),
        }
    }
}

/// How many freed [`Outbound`]s a thread keeps for reuse ([`Outbound::recycle`]): enough
/// for the connections one loop iteration gets a message from and answers. Each holds at
/// most about 770 bytes (the state, its lists at [`SPARE_LIST_CAPACITY`], the iovecs), so a
/// thread keeps under 50 KiB.
const SPARE_OUTBOUNDS: usize = 64;

/// A spare [`Outbound`] keeps its lists' memory (queue, pongs, notices) only up to this
/// capacity, what their first push allocates: what a message and its answer use, not what
/// a backlog grew.
const SPARE_LIST_CAPACITY: usize = 4;

thread_local! {
    /// [`Outbound`]s freed by connections that went idle, for the next connection of this
    /// thread that has something to write. A connection holds one only while it has
    /// something (idle ones hold nothing, see [`Core::release_out`]), so without these a
    /// small echo allocated and freed the state and its queue's buffer for every message:
    /// about 250 of its 2,700 instructions (bench/RESULTS.md, "frames: small echoes").
    // Boxed on purpose: a connection holds its state as a box, and a spare is that box.
    #[allow(clippy::vec_box)]
    static SPARE: RefCell<Vec<Box<Outbound>>> = const { RefCell::new(Vec::new()) };
}

impl Outbound {
    /// An empty outbound state: a spare one if the thread has one.
    fn take() -> Box<Outbound> {
        SPARE.with_borrow_mut(Vec::pop).unwrap_or_default()
    }

    /// Keeps a flushed state with no notices for [`take`](Self::take), unless its lists grew
    /// past what a spare keeps or enough are kept already; then it is freed.
    fn recycle(mut self: Box<Outbound>) {
        debug_assert!(self.is_flushed() && self.notices.is_empty());
        if self.queue.capacity() > SPARE_LIST_CAPACITY
            || self.pongs.capacity() > SPARE_LIST_CAPACITY
            || self.notices.capacity() > SPARE_LIST_CAPACITY
        {
            return;
        }
        // Back to what a fresh one has (`Default`). Every field is named, so a field added
        // later must be decided on here: the lists are empty already (flushed, notices
        // taken), nothing is in flight, and the iovecs are rewritten by the next vectored
        // write before the kernel reads them.
        let Outbound {
            queue: _,
            front_sent,
            queued_bytes,
            pongs: _,
            pong_sent,
            greeted,
            in_flight: _,
            iovecs: _,
            stuck_since,
            notices: _,
        } = &mut *self;
        (*front_sent, *queued_bytes, *pong_sent, *greeted, *stuck_since) = (0, 0, 0, true, None);
        SPARE.with_borrow_mut(|spare| {
            if spare.len() < SPARE_OUTBOUNDS {
                spare.push(self);
            }
        });
    }

    /// Nothing left to write and nothing being written.
    fn is_flushed(&self) -> bool {
        self.queue.is_empty() && self.pongs.is_empty() && self.in_flight == InFlight::NONE
    }
}

impl Connection {
    /// A connection whose 101 is about to be queued (or, for [`Mode::Upstream`], whose upgrade
    /// request is about to be sent).
    pub fn new(mode: Mode, now: Instant) -> Connection {
        Connection {
            decoder: None,
            core: Core {
                mode,
                phase: Phase::Pending,
                close_received: false,
                pinging: false,
                timer: Tick::at(now),
                end: None,
                out: None,
                last_recv: Tick::at(now),
                last_send: Tick::at(now),
                probe: Probe::None,
                initialized: false,
                deflate: None,
            },
        }
    }

    pub fn state(&self) -> State {
        let c = &self.core;
        match c.phase {
            Phase::Pending => State::Pending,
            Phase::Open => State::Open,
            Phase::Closing => State::Closing { since: c.timer, received: c.close_received },
            Phase::Done => State::Done,
        }
    }

    pub fn end(&self) -> Option<&End> {
        self.core.end.as_ref()
    }

    /// Queues raw bytes (the 101 response) ahead of any frame.
    pub fn send_raw(&mut self, bytes: Vec<u8>) {
        self.core.push(Chunk::Owned(bytes));
        if let Some(out) = self.core.out.as_deref_mut() {
            out.greeted = false;
        }
    }

    /// Admits the connection: `connected` naming the socket's `wsid`, then the header's
    /// `initConnection` if any. `group_id` is the connection's client group, as in
    /// [`on_bytes`](Self::on_bytes).
    pub fn open(
        &mut self,
        wsid: &str,
        group_id: &str,
        init_connection: Option<Vec<u8>>,
        now: Instant,
    ) {
        let c = &mut self.core;
        if c.phase != Phase::Pending {
            return;
        }
        c.phase = Phase::Open;
        if c.mode != Mode::Sync {
            // The echo route speaks no sync protocol; a relay's upstream sends `connected`.
            return;
        }
        let mut msg = Vec::with_capacity(96);
        protocol::write_connected(&mut msg, wsid, epoch_ms());
        c.send_text(&msg);
        if let Some(mut init) = init_connection {
            c.on_text(&mut init, group_id, now);
        }
    }

    /// Refuses or ends the connection with a protocol error message and a close frame (the
    /// kind's [`close_code`](ErrorKind::close_code)).
    pub fn fail(&mut self, kind: ErrorKind, message: &str, now: Instant) {
        self.core.fail(kind, message, None, now);
    }

    /// Like [`fail`](Self::fail), with the backoff kinds' `(min, max)`: the client waits
    /// between `min` and `max` milliseconds before it reconnects (`None`: as `fail`).
    pub fn fail_with_backoff(
        &mut self,
        kind: ErrorKind,
        message: &str,
        backoff: Option<(u64, u64)>,
        now: Instant,
    ) {
        self.core.fail(kind, message, backoff, now);
    }

    /// New limits and timers from a reload, now in [`Shared`]: a frame or message partly
    /// received goes on under the new limits too. Everything else reads them from there.
    pub fn apply_settings(&mut self, settings: &Settings) {
        if let Some(decoder) = self.decoder.as_deref_mut() {
            decoder.set_limits(self.core.decoder_limits(settings));
        }
    }

    /// Starts the close handshake (once; later calls do nothing).
    pub fn close(&mut self, code: u16, reason: &str, now: Instant) {
        self.core.close(code, reason, now);
    }

    /// Ends the connection without a handshake (dead peer).
    pub fn terminate(&mut self, why: End) {
        self.core.end.get_or_insert(why);
        self.core.phase = Phase::Done;
    }

    /// Sends an error message without closing (e.g. `MutationFailed`).
    pub fn send_error(&mut self, kind: ErrorKind, message: &str) {
        if self.core.phase == Phase::Open {
            self.core.send_text(&protocol::encode_error(kind, message, None));
        }
    }

    /// Queues a frame shared with other connections (a broadcast encoded once).
    /// `frames` holds `messages` complete frames back to back.
    pub fn send_shared(&mut self, frames: Rc<[u8]>, messages: u64) {
        if self.core.phase == Phase::Open {
            count(|c| c.messages_out += messages);
            self.core.push(Chunk::Shared(frames));
        }
    }

    /// Queues a message from the other hop of a relay, compressed on the client's hop when
    /// deflate was agreed and it reaches the threshold. Dropped once this hop is closing.
    pub fn forward(&mut self, message: Relayed, shared: &mut Shared) {
        let c = &mut self.core;
        if !matches!(c.phase, Phase::Pending | Phase::Open) {
            return;
        }
        let Relayed { opcode, mut buf, gap } = message;
        let gap = gap as usize;
        if c.deflate.is_some() && buf.len() - gap >= shared.settings.compress_threshold {
            let threshold = shared.settings.compress_threshold;
            let payload = Payload::Read(&mut buf[gap..]);
            return c.send_compressible(opcode, payload, threshold, &mut shared.contexts);
        }
        c.send_held(opcode, buf, gap);
    }

    /// Bytes queued and not yet written: a relay stops reading the other hop while they are
    /// over the outbound bound.
    pub fn queued_bytes(&self) -> usize {
        self.core.out.as_deref().map_or(0, |o| o.queued_bytes)
    }

    /// Turns on permessage-deflate as agreed in the handshake, before any byte of the
    /// client's is fed (the decoder, made at the first one, then allows RSV1).
    pub fn enable_deflate(&mut self, agreement: Agreement, level: u32) {
        let deflater = agreement.dedicated_deflater(level);
        let inflater = agreement.dedicated_inflater();
        self.core.deflate = Some(Box::new(Deflate { agreement, deflater, inflater }));
    }

    /// Bytes of dedicated compression contexts this connection holds (for the budget).
    pub fn dedicated_deflate_bytes(&self) -> usize {
        self.core.deflate.as_ref().map_or(0, |d| d.agreement.dedicated_bytes())
    }

    /// Feeds bytes received from the socket. `group_id` is the connection's client group,
    /// which a push must name; it is only looked at once the connection is open.
    pub fn on_bytes(
        &mut self,
        input: &mut [u8],
        shared: &mut Shared,
        group_id: &str,
        now: Instant,
    ) {
        let core = &mut self.core;
        if core.phase == Phase::Done {
            return;
        }
        core.last_recv = Tick::at(now);
        core.pinging = false;
        if core.probe == Probe::Sent {
            core.probe = Probe::Answered;
        }
        count(|c| c.bytes_in += input.len() as u64);
        if core.phase == Phase::Closing && core.close_received {
            return;
        }
        let limits = core.decoder_limits(&shared.settings);
        let mut on_event = |event: Event<'_>| core.on_event(event, shared, group_id, now);
        let result = match self.decoder.as_deref_mut() {
            Some(decoder) => {
                let result = decoder.feed(input, &mut on_event);
                // A closed decoder stays: a fresh one would decode again what must be ignored.
                if decoder.is_idle() {
                    self.decoder = None;
                }
                result
            }
            None => {
                // Between frames, as most reads begin: a fresh decoder on the stack, boxed only
                // if the read ends inside a frame. Boxing one for every read and dropping it
                // after cost a small echo about 190 of its instructions.
                let mut decoder = Decoder::new(limits);
                let result = decoder.feed(input, &mut on_event);
                if !decoder.is_idle() {
                    self.decoder = Some(Box::new(decoder));
                }
                result
            }
        };
        if let Err(e) = result {
            core.fail_connection(e.close_code(), e.reason(), now);
        }
    }

    /// Marks the start of an admission probe: a WebSocket ping whose answer (or any frame)
    /// proves the peer alive.
    pub fn probe(&mut self) {
        let c = &mut self.core;
        if c.probe == Probe::None {
            c.probe = Probe::Sent;
            let f = c.frame(OpCode::Ping, b"probe");
            c.push(Chunk::Owned(f));
        }
    }

    /// Whether anything arrived since the probe went out; `None` if no probe is running.
    pub fn probe_answered(&self) -> Option<bool> {
        match self.core.probe {
            Probe::None => None,
            Probe::Sent => Some(false),
            Probe::Answered => Some(true),
        }
    }

    pub fn clear_probe(&mut self) {
        self.core.probe = Probe::None;
    }

    /// Timers: keepalive, close deadline, slow consumer. The slow-consumer clock starts at
    /// the first tick that finds the queue over `max_outbound`, and stops at the first that
    /// finds it under (a tick is at most 500 ms, against a timeout of seconds).
    pub fn on_tick(&mut self, settings: &Settings, now: Instant) {
        let c = &mut self.core;
        let tick = Tick::at(now);
        match c.phase {
            Phase::Done => {}
            Phase::Closing => {
                if tick.since(c.timer) >= timeout_ms(settings.close_timeout) {
                    c.end.get_or_insert(End::CloseTimeout);
                    c.phase = Phase::Done;
                }
            }
            Phase::Pending | Phase::Open => {
                if let Some(o) = c.out.as_deref_mut() {
                    if o.queued_bytes <= settings.max_outbound {
                        o.stuck_since = None;
                    } else if o.stuck_since.is_none() {
                        o.stuck_since = Some(tick);
                    }
                }
                if let Some(since) = c.out.as_ref().and_then(|o| o.stuck_since) {
                    if tick.since(since) >= timeout_ms(settings.slow_consumer) {
                        c.end.get_or_insert(End::SlowConsumer);
                        c.close(close::POLICY_VIOLATION, "send queue full", now);
                        return;
                    }
                }
                if c.pinging {
                    if tick.since(c.timer) >= timeout_ms(settings.ping_timeout) {
                        c.end.get_or_insert(End::KeepaliveTimeout);
                        c.phase = Phase::Done;
                        return;
                    }
                } else if tick.since(c.last_recv) >= timeout_ms(settings.silence) {
                    c.pinging = true;
                    c.timer = tick;
                    let f = c.frame(OpCode::Ping, b"");
                    c.push(Chunk::Owned(f));
                }
                let idle_send = timeout_ms(settings.idle_send);
                // A relay's messages are the upstream's: it sends its own `pong`s.
                let speaks_sync = matches!(c.mode, Mode::Sync | Mode::Echo);
                if speaks_sync && c.phase == Phase::Open && tick.since(c.last_send) >= idle_send {
                    let mut msg = Vec::with_capacity(16);
                    protocol::write_pong(&mut msg);
                    c.send_text(&msg);
                }
            }
        }
    }

    /// The next bytes to write, if nothing is being written now: as much of the queue as one
    /// write takes (up to 8 buffers: the queued pongs first when they may go, then frames),
    /// so a backed-up queue of shared frames leaves in one system call, not one per frame.
    pub fn next_send(&mut self) -> Option<Outgoing<'_>> {
        let o = self.core.out.as_deref_mut()?;
        if o.in_flight != InFlight::NONE {
            return None;
        }
        // The common case, one frame and no pong, before the gathering below: small echoes
        // pay for every instruction here (bench/RESULTS.md, "frames: the vectored sends cost
        // small echoes 183 instructions").
        if o.pongs.is_empty() && o.queue.len() == 1 {
            o.in_flight = InFlight { pongs: 0, chunks: 1 };
            let front = o.queue.front()?;
            return Some(Outgoing::Bytes(&front.bytes()[o.front_sent..]));
        }
        // A started pong finishes first; a new one goes only between frames, never inside a
        // half-written one, and never before the 101.
        let pongs_first = o.pong_sent > 0 || (o.front_sent == 0 && o.greeted);
        let pongs = if pongs_first { o.pongs.len().min(MAX_IOVECS) } else { 0 };
        // Waiting pongs that may not go yet go right after the front frame: nothing else
        // joins it.
        let room = if !pongs_first && !o.pongs.is_empty() { 1 } else { MAX_IOVECS - pongs };
        let chunks = o.queue.len().min(room);
        o.in_flight = InFlight { pongs: pongs as u8, chunks: chunks as u8 };
        // The first pong and the first chunk may be partly written already.
        let pong_pieces = o.pongs.iter().take(pongs).enumerate().map(|(i, p)| match i {
            0 => &p[o.pong_sent..],
            _ => &p[..],
        });
        let chunk_pieces = o.queue.iter().take(chunks).enumerate().map(|(i, c)| match i {
            0 => &c.bytes()[o.front_sent..],
            _ => c.bytes(),
        });
        let mut pieces = pong_pieces.chain(chunk_pieces);
        match pongs + chunks {
            0 => None,
            1 => pieces.next().map(Outgoing::Bytes),
            n => {
                let v = o.iovecs.get_or_insert_with(|| {
                    Box::new(IoVecs {
                        // SAFETY: all-zero is a valid msghdr (no name, no control data).
                        msg: unsafe { std::mem::zeroed() },
                        iov: [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
                            MAX_IOVECS],
                    })
                });
                for (iov, piece) in v.iov.iter_mut().zip(pieces) {
                    *iov = libc::iovec { iov_base: piece.as_ptr() as *mut _, iov_len: piece.len() };
                }
                v.msg.msg_iov = v.iov.as_mut_ptr();
                v.msg.msg_iovlen = n;
                Some(Outgoing::Vectored(&v.msg))
            }
        }
    }

    /// Reports that `n` bytes of what [`next_send`](Self::next_send) gave were written.
    pub fn on_sent(&mut self, n: usize, now: Instant) {
        let c = &mut self.core;
        if n > 0 {
            c.last_send = Tick::at(now);
        }
        let Some(o) = c.out.as_deref_mut() else { return };
        let in_flight = std::mem::take(&mut o.in_flight);
        let mut left = n;
        for _ in 0..in_flight.pongs {
            let rest = o.pongs.front().map_or(0, |p| p.len() - o.pong_sent);
            if left < rest {
                o.pong_sent += left;
                left = 0;
                break;
            }
            left -= rest;
            o.pongs.pop_front();
            o.pong_sent = 0;
        }
        for _ in 0..in_flight.chunks {
            if left == 0 {
                break;
            }
            let rest = o.queue.front().map_or(0, |f| f.bytes().len() - o.front_sent);
            let took = left.min(rest);
            left -= took;
            o.queued_bytes -= took.min(o.queued_bytes);
            if took < rest {
                o.front_sent += took;
                break;
            }
            o.greeted = true;
            o.queue.pop_front();
            o.front_sent = 0;
        }
        c.release_out();
    }

    /// Whether every queued byte is written.
    pub fn flushed(&self) -> bool {
        self.core.out.as_deref().is_none_or(Outbound::is_flushed)
    }

    /// What is queued is the last the connection will send: the close handshake is
    /// complete (the client's close came, ours is queued or out), so the socket is shut down
    /// once it is written.
    pub fn last_words(&self) -> bool {
        self.core.phase == Phase::Closing && self.core.close_received
    }

    /// Whether the socket can be dropped now: the close handshake is over and flushed, or the
    /// connection was terminated.
    pub fn finished(&self) -> bool {
        match self.core.phase {
            Phase::Done => true,
            Phase::Closing => self.core.close_received && self.flushed(),
            _ => false,
        }
    }

    /// What the worker must act on since the last call, in order.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        let c = &mut self.core;
        let Some(o) = c.out.as_deref_mut() else { return Vec::new() };
        let notices = std::mem::take(&mut o.notices);
        c.release_out();
        notices
    }

    /// Returns idle buffers' memory (between bursts an idle connection holds none).
    pub fn shrink(&mut self) {
        if let Some(decoder) = self.decoder.as_deref_mut() {
            decoder.shrink();
        }
    }
}

impl Core {
    /// Enters the close handshake at `now`; `received` if it began with the peer's close.
    fn begin_closing(&mut self, now: Instant, received: bool) {
        self.phase = Phase::Closing;
        self.close_received = received;
        self.timer = Tick::at(now);
    }

    /// The decoder's limits under `settings` and the extension.
    fn decoder_limits(&self, settings: &Settings) -> DecoderLimits {
        DecoderLimits {
            allow_rsv1: self.deflate.is_some(),
            server_frames: self.mode == Mode::Upstream,
            ..settings.decoder
        }
    }

    /// Frees the outbound state once it holds nothing: an idle connection holds none (most
    /// connections are idle most of the time), and the next message or notice allocates it
    /// again, which costs little next to its send.
    fn release_out(&mut self) {
        if self.out.as_deref().is_some_and(|o| o.is_flushed() && o.notices.is_empty()) {
            if let Some(out) = self.out.take() {
                out.recycle();
            }
        }
    }

    fn notify(&mut self, notice: Notice) {
        self.out.get_or_insert_with(Outbound::take).notices.push(notice);
    }

    fn push(&mut self, chunk: Chunk) {
        let o = self.out.get_or_insert_with(Outbound::take);
        o.queued_bytes += chunk.bytes().len();
        // Coalesce small frames into the last owned chunk, unless that chunk is being written
        // (its buffer must not move under the kernel): one send instead of several. A shared
        // frame is copied then (a new connection's first poke behind its `connected`); one
        // that finds no owned chunk waiting stays shared, as on a fan-out's quiet recipients.
        // A framed chunk is owned too: relayed messages queued together leave together.
        let writing_back = usize::from(o.in_flight.chunks) >= o.queue.len();
        let back = match o.queue.back_mut() {
            Some(Chunk::Owned(buf)) => Some((buf, 0)),
            Some(Chunk::Framed { buf, start }) => Some((buf, *start)),
            Some(Chunk::Shared(_)) | None => None,
        };
        if let (Some((back, start)), false) = (back, writing_back) {
            let bytes = chunk.bytes();
            if back.len() - start + bytes.len() <= COALESCE_LIMIT {
                back.extend_from_slice(bytes);
                return;
            }
        }
        o.queue.push_back(chunk);
    }

    fn send_text(&mut self, json: &[u8]) {
        self.send_frame(OpCode::Text, json);
    }

    fn send_frame(&mut self, opcode: OpCode, payload: &[u8]) {
        count(|c| c.messages_out += 1);
        let f = self.frame(opcode, payload);
        self.push(Chunk::Owned(f));
    }

    /// A frame from this end: masked on a relay's upstream hop, where this end is the client.
    fn frame(&self, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(payload.len() + frame::MAX_CLIENT_HEADER);
        match self.mode {
            Mode::Upstream => {
                frame::encode_client_frame(&mut f, opcode, payload, mask::new_key(), true, false)
            }
            _ => frame::encode_frame(&mut f, opcode, payload, false),
        }
        f
    }

    /// A close frame from this end (masked as [`frame`](Self::frame) says); `None` carries
    /// no code.
    fn close_frame(&self, code: Option<u16>, reason: &str) -> Vec<u8> {
        let mut f = Vec::with_capacity(reason.len().min(123) + 8);
        match (code, self.mode) {
            (None, _) => return self.frame(OpCode::Close, b""),
            (Some(code), Mode::Upstream) => {
                frame::encode_client_close(&mut f, code, reason, mask::new_key())
            }
            (Some(code), _) => frame::encode_close(&mut f, code, reason),
        }
        f
    }

    /// Like [`send_frame`](Self::send_frame), compressed when deflate was agreed and the
    /// message reaches the threshold (RFC 7692 lets a sender leave any message uncompressed).
    fn send_compressible(
        &mut self,
        opcode: OpCode,
        payload: Payload<'_>,
        threshold: usize,
        contexts: &mut SharedContexts,
    ) {
        if payload.len() >= threshold {
            if let Some(d) = self.deflate.as_mut() {
                let bits = d.agreement.server_window_bits;
                let deflater = match d.deflater.as_mut() {
                    Some(own) => own,
                    None => contexts.deflater(bits),
                };
                let mut f = vec![0u8; frame::MAX_SERVER_HEADER];
                if deflater.deflate(&payload, &mut f).is_ok() {
                    let start = frame::finish_reserved(&mut f, opcode, true);
                    count(|c| c.messages_out += 1);
                    return self.push(Chunk::Framed { buf: f, start });
                }
            }
        }
        match payload.into_held() {
            // Assembled by the decoder (a large message): sent from where it lies.
            Ok(buf) => self.send_held(opcode, buf, frame::HEADER_ROOM),
            Err(bytes) => self.send_frame(opcode, bytes),
        }
    }

    /// Sends the payload that follows `room` bytes of room in `buf` as one frame, its header
    /// written into the room (masked on a relay's upstream hop), the buffer queued as it is.
    fn send_held(&mut self, opcode: OpCode, mut buf: Vec<u8>, room: usize) {
        count(|c| c.messages_out += 1);
        let mask = (self.mode == Mode::Upstream).then(mask::new_key);
        let start = frame::write_header(&mut buf, room, opcode, mask);
        self.push(Chunk::Framed { buf, start });
    }

    /// A complete data message: inflated if compressed, then echoed (conformance route) or
    /// handled as a sync protocol message.
    fn on_message(
        &mut self,
        opcode: OpCode,
        payload: Payload<'_>,
        compressed: bool,
        shared: &mut Shared,
        group_id: &str,
        now: Instant,
    ) {
        count(|c| c.messages_in += 1);
        let Shared { settings, contexts, scratch } = shared;
        let mut payload = if compressed {
            scratch.clear();
            let limit = settings.decoder.max_message_bytes;
            let result = match self.deflate.as_deref_mut() {
                Some(Deflate { inflater: Some(own), .. }) => own.inflate(&payload, limit, scratch),
                Some(_) => contexts.inflater().inflate(&payload, limit, scratch),
                // The decoder refuses RSV1 unless deflate was agreed; this is unreachable.
                None => Err(InflateError::Invalid),
            };
            match result {
                Ok(()) => {}
                Err(InflateError::TooBig) => {
                    return self.fail_connection(close::MESSAGE_TOO_BIG, "message too big", now)
                }
                Err(InflateError::Invalid) => {
                    return self.fail_connection(
                        close::INVALID_PAYLOAD,
                        "invalid compressed data",
                        now,
                    )
                }
            }
            if opcode == OpCode::Text && simdutf8::basic::from_utf8(scratch).is_err() {
                return self.fail_connection(close::INVALID_PAYLOAD, "invalid UTF-8", now);
            }
            Payload::Read(&mut scratch[..])
        } else {
            payload
        };
        match self.mode {
            Mode::Echo => {
                return self.send_compressible(
                    opcode,
                    payload,
                    settings.compress_threshold,
                    contexts,
                )
            }
            // The upstream's messages go to the client as they are: it is zero-cache's to say
            // what they mean.
            Mode::Upstream => {
                return self.notify(Notice::Relay(Relayed::from_upstream(opcode, payload)))
            }
            Mode::Sync | Mode::Relay => {}
        }
        if opcode != OpCode::Text {
            return self.fail(ErrorKind::InvalidMessage, "expected a JSON text message", None, now);
        }
        if self.phase == Phase::Open {
            if self.mode == Mode::Relay {
                self.on_relayed_text(&mut payload, group_id, now);
            } else {
                self.on_text(&mut payload, group_id, now);
            }
        }
    }

    fn fail(&mut self, kind: ErrorKind, message: &str, backoff: Option<(u64, u64)>, now: Instant) {
        if matches!(self.phase, Phase::Pending | Phase::Open) {
            let code = kind.close_code();
            self.send_text(&protocol::encode_error(kind, message, backoff));
            self.end.get_or_insert(End::Protocol(code));
            self.close(code, message, now);
        }
    }

    /// RFC 6455 7.1.7, _Fail the WebSocket Connection_: the stream can no longer be trusted,
    /// so the close frame goes out and the socket is dropped as soon as it is written,
    /// without waiting for the peer's close frame.
    fn fail_connection(&mut self, code: u16, reason: &str, now: Instant) {
        self.end.get_or_insert(End::Protocol(code));
        self.close(code, reason, now);
        if self.phase == Phase::Closing {
            self.close_received = true;
        }
    }

    fn close(&mut self, code: u16, reason: &str, now: Instant) {
        if matches!(self.phase, Phase::Pending | Phase::Open) {
            let f = self.close_frame(Some(code), reason);
            self.push(Chunk::Owned(f));
            self.end.get_or_insert(End::Normal);
            self.begin_closing(now, false);
        }
    }

    fn on_event(
        &mut self,
        event: Event<'_>,
        shared: &mut Shared,
        group_id: &str,
        now: Instant,
    ) -> ControlFlow<()> {
        // While our close frame waits for the peer's, only that close frame matters; the
        // decoder keeps running so it can be seen.
        if self.phase == Phase::Closing && !matches!(event, Event::Close(_)) {
            return ControlFlow::Continue(());
        }
        match event {
            Event::Ping(payload) => {
                let f = self.frame(OpCode::Pong, payload);
                let o = self.out.get_or_insert_with(Outbound::take);
                // Past the bound the last answer is replaced: never one being written (a
                // write takes fewer), nor the front one, which may be partly written.
                let full = o.pongs.len() >= MAX_QUEUED_PONGS;
                match o.pongs.back_mut() {
                    Some(last) if full => *last = f,
                    _ => o.pongs.push_back(f),
                }
            }
            Event::Pong(_) => {}
            Event::Close(code) => {
                if matches!(self.mode, Mode::Relay | Mode::Upstream) {
                    let (code, reason) = code.map_or((None, ""), |(c, r)| (Some(c), r));
                    self.notify(Notice::PeerClosed { code, reason: reason.to_owned() });
                }
                match self.phase {
                    Phase::Closing => self.close_received = true,
                    _ => {
                        // Echo the peer's code, as RFC 6455 5.5.1 asks.
                        let f = self.close_frame(code.map(|(code, _)| code), "");
                        self.push(Chunk::Owned(f));
                        self.end.get_or_insert(End::Normal);
                        self.begin_closing(now, true);
                    }
                }
                return ControlFlow::Break(());
            }
            Event::Text { payload, compressed } => {
                self.on_message(OpCode::Text, payload, compressed, shared, group_id, now)
            }
            Event::Binary { payload, compressed } => {
                self.on_message(OpCode::Binary, payload, compressed, shared, group_id, now)
            }
        }
        ControlFlow::Continue(())
    }

    /// A client's message on its way to the upstream: checked as [`on_text`](Self::on_text)
    /// checks it, then handed over untouched (copied before the parser, which works in place).
    fn on_relayed_text(&mut self, json: &mut [u8], group_id: &str, now: Instant) {
        let message = Relayed::copy(OpCode::Text, json, true);
        let Some(msg) = self.parse_checked(json, group_id, now) else { return };
        let notice = match msg {
            Upstream::Push(push) => Notice::RelayPush { message, mutations: push.mutations.len() },
            Upstream::UpdateAuth { auth } => Notice::RelayAuth { message, token: auth },
            _ => Notice::Relay(message),
        };
        self.notify(notice);
    }

    /// A client's message, parsed strictly and held to the rules that do not depend on who
    /// handles it: `initConnection` once, a push only for the connection's own group. `None`
    /// once the connection failed for it.
    fn parse_checked(&mut self, json: &mut [u8], group_id: &str, now: Instant) -> Option<Upstream> {
        let msg = match protocol::parse_upstream(json) {
            Ok(msg) => msg,
            Err(message) => {
                self.fail(ErrorKind::InvalidMessage, &message, None, now);
                return None;
            }
        };
        match &msg {
            Upstream::InitConnection(_) if self.initialized => {
                self.fail(ErrorKind::InvalidMessage, "initConnection sent twice", None, now);
                return None;
            }
            Upstream::InitConnection(_) => self.initialized = true,
            Upstream::Push(push) if push.client_group_id != group_id => {
                let message = format!(
                    "clientGroupID in mutation \"{}\" does not match clientGroupID of connection \"{group_id}\"",
                    push.client_group_id
                );
                self.fail(ErrorKind::InvalidPush, &message, None, now);
                return None;
            }
            _ => {}
        }
        Some(msg)
    }

    fn on_text(&mut self, json: &mut [u8], group_id: &str, now: Instant) {
        let Some(msg) = self.parse_checked(json, group_id, now) else { return };
        match msg {
            Upstream::Ping => {
                let mut out = Vec::with_capacity(16);
                protocol::write_pong(&mut out);
                self.send_text(&out);
            }
            Upstream::InitConnection(body) => self.notify(Notice::Init(Box::new(body))),
            Upstream::ChangeDesiredQueries(body) => {
                self.notify(Notice::ChangeDesiredQueries(body.desired_queries_patch));
            }
            Upstream::DeleteClients(body) => self.notify(Notice::DeleteClients(body)),
            Upstream::Push(push) => self.notify(Notice::Push(Box::new(push))),
            // Validated, and nothing to do: pull is answered by pokes, the rest carry nothing
            // this server acts on (closeConnection is deprecated; inspect needs zero-cache's
            // query engine; acknowledgements concern custom mutators' responses).
            Upstream::UpdateAuth { auth } => self.notify(Notice::UpdateAuth(auth)),
            Upstream::Pull(_)
            | Upstream::CloseConnection
            | Upstream::Inspect(_)
            | Upstream::AckMutationResponses(_) => {}
        }
    }
}

/// Small frames queued back to back are merged into one buffer up to this size, so a burst
/// of replies is one write instead of many.
const COALESCE_LIMIT: usize = 16 * 1024;

/// What this thread's connections received and queued since the last [`take_counts`], for
/// metrics. Kept per thread, not per connection: the worker takes them after every event,
/// so a connection would only ever hold zeros between events (12 bytes each, times every
/// idle connection). Every syncgate process runs its connections on one thread.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Counts {
    pub messages_in: u64,
    pub bytes_in: u64,
    pub messages_out: u64,
}

thread_local! {
    static COUNTS: Cell<Counts> = const {
        Cell::new(Counts { messages_in: 0, bytes_in: 0, messages_out: 0 })
    };
}

fn count(f: impl FnOnce(&mut Counts)) {
    COUNTS.with(|cell| {
        let mut c = cell.get();
        f(&mut c);
        cell.set(c);
    });
}

/// The counts since the last call, and a fresh start.
pub fn take_counts() -> Counts {
    COUNTS.with(|cell| cell.take())
}

pub fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::encode_client_frame;

    const MASK: [u8; 4] = [1, 2, 3, 4];

    fn settings() -> Settings {
        Settings {
            idle_send: Duration::from_secs(6),
            silence: Duration::from_secs(15),
            ping_timeout: Duration::from_secs(5),
            close_timeout: Duration::from_secs(2),
            max_outbound: 1024,
            slow_consumer: Duration::from_secs(10),
            decoder: DecoderLimits::default(),
            compress_threshold: 1024,
        }
    }

    fn open(now: Instant) -> Connection {
        let mut c = Connection::new(Mode::Sync, now);
        c.open("w1", "g1", None, now);
        c
    }

    /// What the next write takes, as one buffer.
    fn sendable(c: &mut Connection) -> Option<Vec<u8>> {
        c.next_send().map(|out| out.to_vec())
    }

    /// Writes everything queued and returns the server frames as (opcode byte, payload).
    fn drain(c: &mut Connection, now: Instant) -> Vec<(u8, Vec<u8>)> {
        let mut wire = Vec::new();
        while let Some(bytes) = sendable(c) {
            wire.extend_from_slice(&bytes);
            c.on_sent(bytes.len(), now);
        }
        let mut frames = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let op = wire[at] & 0x0f;
            let (len, hdr) = match wire[at + 1] & 0x7f {
                126 => (u16::from_be_bytes([wire[at + 2], wire[at + 3]]) as usize, 4),
                127 => (u64::from_be_bytes(wire[at + 2..at + 10].try_into().unwrap()) as usize, 10),
                n => (n as usize, 2),
            };
            frames.push((op, wire[at + hdr..at + hdr + len].to_vec()));
            at += hdr + len;
        }
        frames
    }

    fn shared() -> Shared {
        Shared::new(settings(), 1)
    }

    fn client(op: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        encode_client_frame(&mut f, op, payload, MASK, true, false);
        f
    }

    #[test]
    fn large_messages_cut_by_reads_are_echoed_and_relayed_whole() {
        let now = Instant::now();
        let payload: Vec<u8> = (0..40_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        // The echo route: a message held by the decoder goes out in its buffer, after a
        // small one that came whole and is queued first.
        let mut c = Connection::new(Mode::Echo, now);
        c.open("w1", "g1", None, now);
        let mut wire = client(OpCode::Text, b"first");
        wire.extend(client(OpCode::Binary, &payload));
        let mut shared = shared();
        for piece in wire.chunks_mut(16 * 1024) {
            c.on_bytes(piece, &mut shared, "", now);
        }
        assert_eq!(drain(&mut c, now), vec![(1, b"first".to_vec()), (2, payload.clone())]);

        // A relay's upstream hop: the server's unmasked message, cut the same way, reaches
        // the client's hop whole and unmasked.
        let mut up = Connection::new(Mode::Upstream, now);
        up.open("w1", "g1", None, now);
        let mut server = Vec::new();
        frame::encode_frame(&mut server, OpCode::Text, &payload, false);
        for piece in server.chunks_mut(16 * 1024) {
            up.on_bytes(piece, &mut shared, "", now);
        }
        let relayed: Vec<Relayed> = up
            .take_notices()
            .into_iter()
            .filter_map(|n| match n {
                Notice::Relay(r) => Some(r),
                _ => None,
            })
            .collect();
        assert_eq!(relayed.len(), 1);
        let mut client_hop = Connection::new(Mode::Relay, now);
        client_hop.open("w1", "g1", None, now);
        client_hop.forward(relayed.into_iter().next().unwrap(), &mut shared);
        assert_eq!(drain(&mut client_hop, now), vec![(1, payload)]);
    }

    /// A connection that goes idle hands its outbound state to the thread's spares and the
    /// next write takes it back, clean: a pong after an echo, then an echo after the pong.
    /// A state whose queue grew under a backlog is freed instead of kept.
    #[test]
    fn an_idle_connections_outbound_state_is_reused_clean_and_a_grown_one_freed() {
        let now = Instant::now();
        let spares = || SPARE.with_borrow(Vec::len);
        let mut shared = shared();
        SPARE.with_borrow_mut(Vec::clear);
        let mut c = Connection::new(Mode::Echo, now);
        c.open("w1", "g1", None, now);
        assert!(c.core.out.is_none(), "an open echo connection has nothing to write");

        c.on_bytes(&mut client(OpCode::Text, b"hi"), &mut shared, "", now);
        assert_eq!(drain(&mut c, now), vec![(1, b"hi".to_vec())]);
        assert!(c.core.out.is_none(), "an idle connection holds no outbound state");
        assert_eq!(spares(), 1, "the state it held is kept");
        c.on_bytes(&mut client(OpCode::Text, b"hi"), &mut shared, "", now);
        assert_eq!(spares(), 0, "the next echo took it");
        assert_eq!(drain(&mut c, now), vec![(1, b"hi".to_vec())]);
        assert_eq!(spares(), 1, "and gave it back");
        c.on_bytes(&mut client(OpCode::Ping, b"p"), &mut shared, "", now);
        assert_eq!(drain(&mut c, now), vec![(0xA, b"p".to_vec())]);
        c.on_bytes(&mut client(OpCode::Binary, b"again"), &mut shared, "", now);
        assert_eq!(drain(&mut c, now), vec![(2, b"again".to_vec())]);
        assert_eq!(spares(), 1);

        // Frames over the coalescing limit each take a place in the queue.
        let mut big = Vec::new();
        frame::encode_frame(&mut big, OpCode::Binary, &vec![7; COALESCE_LIMIT + 1], false);
        let big: Rc<[u8]> = big.into();
        let mut o = open(now);
        drain(&mut o, now);
        assert_eq!(spares(), 1);
        for _ in 0..2 * SPARE_LIST_CAPACITY {
            o.send_shared(big.clone(), 1);
        }
        assert_eq!(spares(), 0);
        assert_eq!(drain(&mut o, now).len(), 2 * SPARE_LIST_CAPACITY);
        assert!(o.core.out.is_none());
        assert_eq!(spares(), 0, "a grown state is freed, not kept");
    }

    #[test]
    fn connected_once_then_ping_pong() {
        let now = Instant::now();
        let mut c = open(now);
        c.open("w1", "g1", None, now);
        let frames = drain(&mut c, now);
        assert_eq!(frames.len(), 1, "connected is sent exactly once");
        assert!(frames[0].1.starts_with(br#"["connected",{"wsid":"w1","timestamp":"#));
        c.on_bytes(&mut client(OpCode::Text, br#"["ping",{}]"#), &mut shared(), "g1", now);
        assert_eq!(drain(&mut c, now), vec![(1, br#"["pong",{}]"#.to_vec())]);
    }

    #[test]
    fn a_shared_frame_joins_a_waiting_owned_chunk_but_never_one_being_written() {
        let now = Instant::now();
        let mut c = open(now);
        // Behind the unsent `connected`: copied in, one write for both.
        c.send_shared(Rc::from(&b"\x81\x01x"[..]), 1);
        let first = sendable(&mut c).unwrap();
        assert!(first.starts_with(b"\x81") && first.ends_with(b"\x81\x01x"), "{first:?}");
        // Queued while that write is out: it waits for its own, and stays shared.
        c.send_shared(Rc::from(&b"\x81\x01y"[..]), 1);
        let queue = &c.core.out.as_ref().unwrap().queue;
        assert_eq!(queue.len(), 2);
        assert!(matches!(queue.back(), Some(Chunk::Shared(_))));
        c.on_sent(first.len(), now);
        assert_eq!(sendable(&mut c).unwrap(), b"\x81\x01y");
    }

    #[test]
    fn a_backed_up_queue_leaves_in_one_vectored_write_and_a_short_one_resumes_mid_frame() {
        let now = Instant::now();
        let mut c = open(now);
        drain(&mut c, now);
        c.send_shared(Rc::from(&b"\x81\x01a"[..]), 1);
        let first = sendable(&mut c).unwrap();
        // Queued behind a write in flight: each shared frame stays its own chunk.
        for b in [b'b', b'c', b'd'] {
            c.send_shared(Rc::from(&[0x81, 1, b][..]), 1);
        }
        c.on_sent(first.len(), now);
        match c.next_send() {
            Some(Outgoing::Vectored(msg)) => assert_eq!(msg.msg_iovlen, 3),
            _ => panic!("three frames waiting leave in one vectored write"),
        }
        // The socket took the first frame and a byte of the second.
        c.on_sent(4, now);
        assert_eq!(c.queued_bytes(), 5);
        assert_eq!(sendable(&mut c).unwrap(), b"\x01c\x81\x01d");
        c.on_sent(5, now);
        assert!(c.flushed() && c.core.out.is_none());
    }

    #[test]
    fn pongs_leave_with_the_frames_behind_them_but_never_inside_a_frame() {
        let now = Instant::now();
        let mut c = open(now);
        drain(&mut c, now);
        c.send_shared(Rc::from(&b"\x81\x01a"[..]), 1);
        let first = sendable(&mut c).unwrap();
        c.send_shared(Rc::from(&b"\x81\x01b"[..]), 1);
        c.send_shared(Rc::from(&b"\x81\x01c"[..]), 1);
        c.on_sent(first.len(), now);
        c.on_bytes(&mut client(OpCode::Ping, b"1"), &mut shared(), "g1", now);
        c.on_bytes(&mut client(OpCode::Ping, b"2"), &mut shared(), "g1", now);
        // Between frames: both pongs, then the frames, in one write.
        let pong = |p: &[u8]| {
            let mut f = Vec::new();
            encode_frame(&mut f, OpCode::Pong, p, false);
            f
        };
        let (p1, p2) = (pong(b"1"), pong(b"2"));
        assert_eq!(sendable(&mut c).unwrap(), [&p1[..], &p2, b"\x81\x01b\x81\x01c"].concat());
        // Cut inside frame b: a new pong waits for the rest of b alone, then goes first.
        c.on_sent(p1.len() + p2.len() + 1, now);
        c.on_bytes(&mut client(OpCode::Ping, b"3"), &mut shared(), "g1", now);
        assert_eq!(sendable(&mut c).unwrap(), b"\x01b");
        c.on_sent(2, now);
        assert_eq!(sendable(&mut c).unwrap(), [&pong(b"3")[..], b"\x81\x01c"].concat());
    }

    #[test]
    fn a_ping_flood_never_replaces_a_pong_being_written() {
        let now = Instant::now();
        let mut c = open(now);
        drain(&mut c, now);
        for i in 0..MAX_QUEUED_PONGS as u8 {
            c.on_bytes(&mut client(OpCode::Ping, &[i]), &mut shared(), "g1", now);
        }
        let first = sendable(&mut c).unwrap();
        // More pings while the first pongs are written: the last waiting one is replaced.
        for i in MAX_QUEUED_PONGS as u8..40 {
            c.on_bytes(&mut client(OpCode::Ping, &[i]), &mut shared(), "g1", now);
        }
        let mut wire = first.clone();
        c.on_sent(first.len(), now);
        while let Some(bytes) = sendable(&mut c) {
            wire.extend_from_slice(&bytes);
            c.on_sent(bytes.len(), now);
        }
        let mut want: Vec<u8> = (0..MAX_QUEUED_PONGS as u8 - 1).collect();
        want.push(39);
        let got: Vec<u8> = wire.chunks(3).map(|f| f[2]).collect();
        assert_eq!(got, want, "the written ones whole and in order, the latest last");
        assert_eq!(first.len(), 3 * MAX_IOVECS, "a write takes at most MAX_IOVECS pongs");
    }

    #[test]
    fn relayed_messages_queued_together_leave_in_one_write() {
        let now = Instant::now();
        let mut c = Connection::new(Mode::Relay, now);
        c.open("w1", "g1", None, now);
        let mut shared = shared();
        c.forward(Relayed::copy(OpCode::Text, b"one", false), &mut shared);
        c.forward(Relayed::copy(OpCode::Text, b"two", false), &mut shared);
        assert_eq!(sendable(&mut c).unwrap(), b"\x81\x03one\x81\x03two");
    }

    #[test]
    fn a_drained_connection_holds_no_queue_buffer() {
        let now = Instant::now();
        let mut c = open(now);
        // Drained first: frames queued behind the 101 would be coalesced into its chunk.
        drain(&mut c, now);
        c.send_shared(Rc::from(&b"\x81\x01x"[..]), 1);
        c.send_shared(Rc::from(&b"\x81\x01y"[..]), 1);
        assert!(c.core.out.as_ref().is_some_and(|o| o.queue.len() >= 2));
        // Half a frame keeps the decoder; the rest of it lets it go again.
        let mut ping = client(OpCode::Ping, b"hi");
        let (head, tail) = ping.split_at_mut(3);
        c.on_bytes(head, &mut shared(), "g1", now);
        assert!(c.decoder.is_some());
        c.on_bytes(tail, &mut shared(), "g1", now);
        drain(&mut c, now);
        // What an idle connection costs: nothing queued, nothing reserved.
        assert!(c.core.out.is_none());
        assert!(c.decoder.is_none());
    }

    #[test]
    fn invalid_messages_fail_with_origin_and_close_1002() {
        let now = Instant::now();
        let mut c = open(now);
        drain(&mut c, now);
        c.on_bytes(&mut client(OpCode::Text, br#"["nope",{}]"#), &mut shared(), "g1", now);
        let frames = drain(&mut c, now);
        let error = String::from_utf8(frames[0].1.clone()).unwrap();
        assert!(error.contains(r#""kind":"InvalidMessage""#), "{error}");
        assert!(error.contains(r#""origin":"zeroCache""#), "{error}");
        assert_eq!(frames[1].0, 8);
        assert_eq!(&frames[1].1[..2], &1002u16.to_be_bytes());
        // Nothing is processed after close.
        c.on_bytes(&mut client(OpCode::Text, br#"["ping",{}]"#), &mut shared(), "g1", now);
        assert!(drain(&mut c, now).is_empty());
        assert!(!c.finished(), "waits for the peer's close frame");
        c.on_bytes(&mut client(OpCode::Close, &1002u16.to_be_bytes()), &mut shared(), "g1", now);
        assert!(c.finished());
    }

    #[test]
    fn a_push_for_another_group_is_fatal() {
        let now = Instant::now();
        let mut c = open(now);
        drain(&mut c, now);
        let push = br#"["push",{"timestamp":1,"clientGroupID":"other","mutations":[],"pushVersion":1,"requestID":"r"}]"#;
        c.on_bytes(&mut client(OpCode::Text, push), &mut shared(), "g1", now);
        let frames = drain(&mut c, now);
        assert!(String::from_utf8_lossy(&frames[0].1).contains("InvalidPush"));
        assert!(matches!(c.state(), State::Closing { .. }));
    }

    #[test]
    fn the_peers_close_is_echoed_and_ends_the_connection() {
        let now = Instant::now();
        let mut c = open(now);
        drain(&mut c, now);
        c.on_bytes(&mut client(OpCode::Close, &1000u16.to_be_bytes()), &mut shared(), "g1", now);
        let frames = drain(&mut c, now);
        assert_eq!(frames, vec![(8, 1000u16.to_be_bytes().to_vec())]);
        assert!(c.finished());
    }

    #[test]
    fn keepalive_pongs_pings_and_terminates() {
        let t0 = Instant::now();
        let mut c = open(t0);
        drain(&mut c, t0);
        c.on_tick(&settings(), t0 + Duration::from_secs(5));
        assert!(drain(&mut c, t0).is_empty(), "not idle for 6 s yet");
        let t6 = t0 + Duration::from_secs(6);
        c.on_tick(&settings(), t6);
        assert_eq!(drain(&mut c, t6), vec![(1, br#"["pong",{}]"#.to_vec())]);
        let t15 = t0 + Duration::from_secs(15);
        c.on_tick(&settings(), t15);
        let frames = drain(&mut c, t15);
        assert!(frames.contains(&(9, vec![])), "silent peer gets a WebSocket ping: {frames:?}");
        c.on_tick(&settings(), t15 + Duration::from_secs(4));
        assert_ne!(c.state(), State::Done);
        c.on_tick(&settings(), t15 + Duration::from_secs(5));
        assert_eq!(c.state(), State::Done);
        assert_eq!(c.end(), Some(&End::KeepaliveTimeout));
    }

    #[test]
    fn any_frame_answers_the_keepalive_ping() {
        let t0 = Instant::now();
        let mut c = open(t0);
        let t15 = t0 + Duration::from_secs(15);
        c.on_tick(&settings(), t15);
        c.on_bytes(
            &mut client(OpCode::Pong, b""),
            &mut shared(),
            "g1",
            t15 + Duration::from_secs(1),
        );
        c.on_tick(&settings(), t15 + Duration::from_secs(6));
        assert_ne!(c.state(), State::Done);
    }

    #[test]
    fn every_ping_is_answered_in_order_and_a_flood_past_the_bound_ends_with_the_latest() {
        let now = Instant::now();
        let mut c = open(now);
        drain(&mut c, now);
        for i in 0..10u8 {
            c.send_shared(Rc::from(vec![0x81, 1, i]), 1);
        }
        // Start writing the first queued frame, then a flood of pings arrives.
        let first = sendable(&mut c).unwrap().len();
        for i in 0..50u8 {
            c.on_bytes(&mut client(OpCode::Ping, &[i]), &mut shared(), "g1", now);
        }
        c.on_sent(first, now);
        let frames = drain(&mut c, now);
        let pongs: Vec<u8> = frames.iter().filter(|(op, _)| *op == 10).map(|f| f.1[0]).collect();
        let mut want: Vec<u8> = (0..MAX_QUEUED_PONGS as u8 - 1).collect();
        want.push(49);
        assert_eq!(pongs, want, "one pong per ping up to the bound, the latest in the last place");
        assert!(
            frames[..MAX_QUEUED_PONGS].iter().all(|(op, _)| *op == 10),
            "the pongs go before the rest of the queue"
        );
        // A few pings, each answered, in order.
        for i in 0..3u8 {
            c.on_bytes(&mut client(OpCode::Ping, &[100 + i]), &mut shared(), "g1", now);
        }
        let again: Vec<_> = drain(&mut c, now);
        assert_eq!(again, vec![(10, vec![100]), (10, vec![101]), (10, vec![102])]);
    }

    #[test]
    fn no_pong_goes_before_the_101() {
        // Found by fuzzing (fuzz/artifacts/connection/pong-before-101).
        let now = Instant::now();
        let mut c = Connection::new(Mode::Sync, now);
        c.send_raw(b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec());
        c.on_bytes(&mut client(OpCode::Ping, b"early"), &mut shared(), "g1", now);
        let first = sendable(&mut c).unwrap();
        assert!(first.starts_with(b"HTTP/1.1 101"), "{first:02x?}");
    }

    #[test]
    fn a_partly_written_pong_finishes_before_the_next() {
        // Found by fuzzing (fuzz/artifacts/connection/pong-replaced-mid-write).
        let now = Instant::now();
        let mut c = open(now);
        drain(&mut c, now);
        c.on_bytes(&mut client(OpCode::Ping, b"one"), &mut shared(), "g1", now);
        let mut wire = sendable(&mut c).unwrap()[..2].to_vec();
        c.on_sent(2, now);
        c.on_bytes(&mut client(OpCode::Ping, b"two"), &mut shared(), "g1", now);
        c.on_bytes(&mut client(OpCode::Ping, b"three"), &mut shared(), "g1", now);
        while let Some(bytes) = sendable(&mut c) {
            wire.extend_from_slice(&bytes);
            c.on_sent(bytes.len(), now);
        }
        let mut expected = Vec::new();
        encode_frame(&mut expected, OpCode::Pong, b"one", false);
        encode_frame(&mut expected, OpCode::Pong, b"two", false);
        encode_frame(&mut expected, OpCode::Pong, b"three", false);
        assert_eq!(wire, expected, "the first pong whole, then the others in order");
    }

    #[test]
    fn a_stuck_consumer_is_closed_1008() {
        let t0 = Instant::now();
        let mut c = open(t0);
        drain(&mut c, t0);
        c.send_shared(Rc::from(vec![0u8; 4096]), 1);
        // The clock starts at the first tick that finds the queue over the bound.
        c.on_tick(&settings(), t0);
        c.on_tick(&settings(), t0 + Duration::from_secs(9));
        assert_eq!(c.state(), State::Open);
        c.on_tick(&settings(), t0 + Duration::from_secs(10));
        assert!(matches!(c.state(), State::Closing { .. }));
        assert_eq!(c.end(), Some(&End::SlowConsumer));
    }

    #[test]
    fn a_consumer_that_catches_up_starts_its_clock_again() {
        let t0 = Instant::now();
        let mut c = open(t0);
        drain(&mut c, t0);
        c.send_shared(Rc::from(vec![0u8; 4096]), 1);
        c.on_tick(&settings(), t0);
        let t9 = t0 + Duration::from_secs(9);
        drain(&mut c, t9);
        c.on_tick(&settings(), t9);
        c.send_shared(Rc::from(vec![0u8; 4096]), 1);
        c.on_tick(&settings(), t9 + Duration::from_secs(1));
        c.on_tick(&settings(), t0 + Duration::from_secs(19));
        assert_eq!(c.state(), State::Open, "stuck for 9 s, then again for 9 s");
        c.on_tick(&settings(), t0 + Duration::from_secs(20));
        assert_eq!(c.end(), Some(&End::SlowConsumer));
    }

    #[test]
    fn protocol_errors_close_with_their_code() {
        let now = Instant::now();
        let mut c = open(now);
        drain(&mut c, now);
        let mut unmasked = Vec::new();
        encode_frame(&mut unmasked, OpCode::Text, b"[]", false);
        c.on_bytes(&mut unmasked, &mut shared(), "g1", now);
        let frames = drain(&mut c, now);
        assert_eq!(frames.last().unwrap().0, 8);
        assert_eq!(&frames.last().unwrap().1[..2], &1002u16.to_be_bytes());
        assert_eq!(c.end(), Some(&End::Protocol(1002)));
        // A failed connection does not wait for the peer's close frame (RFC 6455 7.1.7).
        assert!(c.finished());
    }

    #[test]
    fn an_idle_connection_stays_small() {
        // Every worker holds one per socket, 10k and more of them mostly idle: what only a
        // busy connection needs is boxed (decoder, outbound queue and notices), timers are
        // 4-byte ticks, and what every connection shares (settings, compression contexts)
        // is lent by the worker. Raise this bound only knowing that each byte is paid per
        // connection.
        assert!(std::mem::size_of::<Connection>() <= 48, "{}", std::mem::size_of::<Connection>());
    }

    #[test]
    fn ticks_measure_whole_milliseconds_across_the_wrap_and_before_the_start() {
        assert_eq!(Tick(5).since(Tick(u32::MAX - 4)), 10, "the clock wrapped between them");
        // Instants on both sides of the clock's start (whenever the first read was).
        let t = Instant::now();
        let before = t - Duration::from_micros(1500);
        assert_eq!(Tick::at(t + Duration::from_secs(6)).since(Tick::at(t)), 6000);
        assert_eq!(Tick::at(before + Duration::from_secs(6)).since(Tick::at(before)), 6000);
        assert_eq!(timeout_ms(Duration::from_secs(u64::MAX)), MAX_TIMEOUT_MS);
    }

    use crate::ws::frame::encode_frame;
}
