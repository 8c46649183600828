//! The WebSocket frame codec (RFC 6455), sans-IO, for the server end of a connection.
//!
//! Decoding: `Decoder::feed` takes the bytes of each read as they come off the socket, unmasks
//! payloads in place and reports events. Whenever a frame lies whole in the read buffer its
//! event borrows that buffer (zero-copy); only a frame cut by the end of a read, and the
//! fragments of a fragmented message, are copied into the decoder's own buffer, behind room
//! for a header, so that a large message can be sent on (echoed, relayed) in that buffer
//! without another copy ([`Payload::into_held`]). Every rule
//! RFC 6455 puts on a client is enforced here, so the caller only has to close the connection
//! with `DecodeError::close_code()` when `feed` fails. Lengths are checked against the limits
//! as soon as a header is complete, before anything is buffered, so a declared length can
//! never make the server allocate.
//!
//! Encoding: server frames (never masked, always FIN) either appended to a `Vec` or written in
//! front of a payload that was serialised after a reserved gap (`finish_reserved`), so a
//! broadcast is encoded once; and masked client frames for tests and the load client.
//!
//! Headers (RFC 6455 section 5.2) are parsed and written here, a few bytes by hand: a
//! general-purpose header codec (tungstenite's `FrameHeader`, used until 2026-12) went
//! through `io::Cursor` and `io::Write` and cost a 20-byte echo about 200 of its 2,700
//! instructions (bench/RESULTS.md, "frames: small echoes").

use std::ops::ControlFlow;

pub use crate::ws::close::DecodeError;
use crate::ws::close::{parse_close_payload, truncate_reason};
use crate::ws::mask::{apply_mask, extend_masked};

/// The default inbound message limit (docs/SECURITY.md's limits table).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 10 * 1024 * 1024;
/// The default fragment limit: enough for any real client, small enough that empty
/// fragments cannot keep a connection busy forever.
pub const DEFAULT_MAX_FRAGMENTS: usize = 131_072;
/// The longest server header: 2 bytes plus a 64-bit length, no mask.
pub const MAX_SERVER_HEADER: usize = 10;
/// The longest client header: 2 bytes, a 64-bit length and the 4-byte mask.
pub const MAX_CLIENT_HEADER: usize = 14;
/// Control frames carry at most 125 payload bytes (RFC 6455 section 5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;
/// Room kept in front of a message assembled in the decoder's buffer: the longest header
/// it may be sent on with (a masked client header, on a relay's upstream hop). Messages
/// cut by reads are the large ones, and copying one behind a new header cost a third of the
/// worker's time at 64 KiB (bench/RESULTS.md, issue 21); with the room, the header is written
/// in front and the buffer queued as it is.
pub const HEADER_ROOM: usize = MAX_CLIENT_HEADER;
/// How far the buffer of a frame cut by a read may be reserved ahead of what has arrived:
/// up to the frame's declared end, but at most this many times the bytes held. Reserving
/// the declared length at once would let a bare 14-byte header claim the message limit;
/// growing only as bytes arrive (doubling) copied each large message once more. At 8, a
/// 64 KiB frame whose first read brought one 16 KiB receive buffer is reserved whole at
/// once, and a peer holds at most 8 bytes of reservation per byte it has sent (the
/// doubling it replaces allowed 2).
const HELD_GROWTH: usize = 8;

/// The frame types of RFC 6455; reserved opcodes never get past the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    /// Close, ping and pong: frames that may interrupt a fragmented message.
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }

    /// The 4-bit code on the wire.
    fn to_wire(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// The opcode of a 4-bit code; `None` for the reserved ones (3-7, 11-15).
    fn from_wire(code: u8) -> Option<Self> {
        Some(match code {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }
}

/// What a decoder accepts. Changed on a config reload or once the handshake has negotiated
/// permessage-deflate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderLimits {
    /// The largest message payload, as received (compressed if RSV1 is set); larger ones are
    /// refused with 1009. The caller applies the same limit again after inflating.
    pub max_message_bytes: usize,
    /// The most frames one message may be split into; more are refused with 1008.
    pub max_fragments: usize,
    /// Whether RSV1 (the permessage-deflate "compressed" bit) may be set on a message's first
    /// frame; true only when the extension was negotiated.
    pub allow_rsv1: bool,
    /// The peer is a server (the upstream hop of a relay, where syncgate is the client): its
    /// frames must not be masked, and a masked one is an error (RFC 6455 5.1).
    pub server_frames: bool,
}

impl Default for DecoderLimits {
    fn default() -> Self {
        DecoderLimits {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_fragments: DEFAULT_MAX_FRAGMENTS,
            allow_rsv1: false,
            server_frames: false,
        }
    }
}

/// One complete thing the peer sent. Payloads are already unmasked.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A whole text message. `compressed` is the RSV1 bit of its first frame: when false the
    /// payload is valid UTF-8 already; when true the caller inflates and then validates it.
    /// Mutable so the payload can be inflated or parsed in place.
    Text { payload: Payload<'a>, compressed: bool },
    /// A whole binary message; `compressed` as for `Text`.
    Binary { payload: Payload<'a>, compressed: bool },
    /// A ping; the caller answers with a pong carrying the same payload.
    Ping(&'a [u8]),
    /// A pong, the answer to the server's keepalive ping.
    Pong(&'a [u8]),
    /// The peer's close frame, validated: `None` when it gave no code. Nothing follows it.
    Close(Option<(u16, &'a str)>),
}

/// A data message's payload, unmasked, where the decoder has it. Derefs to its bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Payload<'a> {
    /// It lay whole in the caller's read buffer.
    Read(&'a mut [u8]),
    /// It was assembled in the decoder's buffer, behind [`HEADER_ROOM`] bytes of room.
    Held(&'a mut Vec<u8>),
}

impl<'a> Payload<'a> {
    /// The decoder's buffer, taken rather than copied, when the message was assembled there:
    /// [`HEADER_ROOM`] bytes of room, then the payload, ready for [`write_header`] (the
    /// decoder starts its next message in a new buffer). The read buffer's bytes otherwise,
    /// to be copied by whoever must keep them past the event.
    pub fn into_held(self) -> Result<Vec<u8>, &'a mut [u8]> {
        match self {
            Payload::Held(buf) => Ok(std::mem::take(buf)),
            Payload::Read(bytes) => Err(bytes),
        }
    }
}

impl std::ops::Deref for Payload<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Payload::Read(bytes) => bytes,
            Payload::Held(buf) => &buf[HEADER_ROOM..],
        }
    }
}

impl std::ops::DerefMut for Payload<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Payload::Read(bytes) => bytes,
            Payload::Held(buf) => &mut buf[HEADER_ROOM..],
        }
    }
}

/// Incremental decoder for the frames one client sends.
///
/// Small when idle (a few words, no heap after `shrink`): one per connection.
#[derive(Debug)]
pub struct Decoder {
    /// Size and extension rules for everything decoded from now on.
    limits: DecoderLimits,
    /// Where the byte stream stands: between frames or inside one.
    state: State,
    /// The data message being assembled, from its first frame until its last frame is
    /// complete; `None` between messages.
    message: Option<Message>,
    /// Unmasked bytes that could not be handed out from the caller's buffer: the fragments of
    /// the open message so far, then the received part of a frame cut by the end of a read.
    /// Empty, or [`HEADER_ROOM`] bytes of room followed by those bytes.
    buf: Vec<u8>,
}

/// Position in the byte stream.
#[derive(Debug)]
enum State {
    /// Expecting a frame header. `head[..len]` is the start of one that the previous read cut
    /// short (usually `len` is 0).
    Header { head: [u8; MAX_CLIENT_HEADER], len: u8 },
    /// Inside a frame payload that began in an earlier read.
    Payload(Partial),
    /// A close frame was delivered, an error returned or the caller stopped: nothing more is
    /// decoded.
    Closed,
}

impl State {
    const IDLE: State = State::Header { head: [0; MAX_CLIENT_HEADER], len: 0 };
}

/// A frame whose payload is still arriving.
#[derive(Debug, Clone, Copy)]
struct Partial {
    /// Offset in `buf` where this frame's payload begins (past the room); a control frame's
    /// bytes are dropped from there once delivered, leaving the open message in front of
    /// them intact.
    start: usize,
    /// Payload bytes not received yet.
    remaining: usize,
    /// The masking key, rotated so that `mask[0]` applies to the next byte to arrive.
    mask: [u8; 4],
    /// The frame's opcode.
    opcode: OpCode,
    /// Whether this frame ends its message.
    fin: bool,
}

/// The message whose fragments are being collected in `buf`.
#[derive(Debug)]
struct Message {
    /// Text rather than binary.
    text: bool,
    /// RSV1 was set on the first frame, so the payload is deflated and UTF-8 is checked only
    /// after inflating.
    compressed: bool,
    /// Frames received so far, for the fragment limit.
    fragments: usize,
    /// How much of `buf` (room included) is known to be complete, valid UTF-8: checking
    /// resumes there, so each byte is checked once and an invalid sequence is caught as soon
    /// as it arrives.
    utf8_valid: usize,
}

/// A parsed and validated frame header.
#[derive(Debug)]
struct Head {
    /// What the frame is.
    opcode: OpCode,
    /// Whether the frame ends its message.
    fin: bool,
    /// Compressed message (permessage-deflate); allowed here only on a message's first frame.
    rsv1: bool,
    /// The key that unmasks the payload.
    mask: [u8; 4],
    /// Payload length, already known to be within the limits.
    len: usize,
}

impl Decoder {
    /// A decoder for a connection whose handshake just completed.
    pub fn new(limits: DecoderLimits) -> Self {
        Decoder { limits, state: State::IDLE, message: None, buf: Vec::new() }
    }

    /// Applies to every header parsed from now on (a message already started keeps its RSV1).
    pub fn set_limits(&mut self, limits: DecoderLimits) {
        self.limits = limits;
    }

    /// Decodes `input`, the bytes just received from the socket, in order. Payloads are
    /// unmasked in place, so `input` is modified.
    ///
    /// Calls `on_event` for every complete event, in order. An incomplete trailing frame is
    /// kept internally and completed by later calls. If `on_event` returns `Break`, decoding
    /// stops and the rest of `input` is dropped: the connection is closing. After a `Close`
    /// event nothing more is delivered.
    ///
    /// An error is a protocol violation: the caller closes the connection with
    /// `err.close_code()`. The decoder then delivers nothing more.
    pub fn feed(
        &mut self,
        input: &mut [u8],
        on_event: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<(), DecodeError> {
        match self.decode(input, on_event) {
            Ok(ControlFlow::Continue(())) => Ok(()),
            Ok(ControlFlow::Break(())) => {
                self.close();
                Ok(())
            }
            Err(err) => {
                self.close();
                Err(err)
            }
        }
    }

    /// Bytes held internally: a cut header, a cut frame and the fragments of an open message.
    pub fn buffered_bytes(&self) -> usize {
        let head = match self.state {
            State::Header { len, .. } => usize::from(len),
            State::Payload(_) | State::Closed => 0,
        };
        head + self.buf.len().saturating_sub(HEADER_ROOM)
    }

    /// Heap memory held by the decoder, for memory accounting.
    pub fn heap_bytes(&self) -> usize {
        self.buf.capacity()
    }

    /// Releases the buffer's memory if nothing is held in it, so an idle connection keeps no
    /// heap. Cheap; call it whenever a read leaves `buffered_bytes()` at 0.
    pub fn shrink(&mut self) {
        if self.buf.is_empty() {
            self.buf = Vec::new();
        }
    }

    /// Whether the decoder stands between frames with nothing held, so that a fresh one with
    /// the same limits would behave exactly like it (not true of a closed one).
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Header { len: 0, .. })
            && self.message.is_none()
            && self.buf.is_empty()
    }

    /// Whether the decoder has stopped for good (close received, error or caller's `Break`).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    fn close(&mut self) {
        self.state = State::Closed;
        self.message = None;
        self.buf = Vec::new();
    }

    /// The body of `feed`; `Break` means decoding has ended for good.
    fn decode(
        &mut self,
        mut input: &mut [u8],
        on_event: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, DecodeError> {
        loop {
            if let State::Payload(partial) = &mut self.state {
                // A frame begun in an earlier read: unmask what has arrived and collect it.
                let take = partial.remaining.min(input.len());
                let (chunk, rest) = std::mem::take(&mut input).split_at_mut(take);
                input = rest;
                let mask = partial.mask;
                partial.mask.rotate_left(take % 4);
                partial.remaining -= take;
                let partial = *partial;
                self.hold(chunk, mask, partial.remaining);
                if !partial.opcode.is_control() {
                    self.check_utf8(partial.remaining == 0 && partial.fin)?;
                }
                if partial.remaining > 0 {
                    return Ok(ControlFlow::Continue(()));
                }
                self.state = State::IDLE;
                if self.finish_buffered_frame(partial, on_event)?.is_break() {
                    return Ok(ControlFlow::Break(()));
                }
                continue;
            }
            if matches!(self.state, State::Closed) {
                return Ok(ControlFlow::Break(()));
            }
            if input.is_empty() {
                return Ok(ControlFlow::Continue(()));
            }

            let Some((head, used)) = self.take_header(input)? else {
                return Ok(ControlFlow::Continue(()));
            };
            input = &mut std::mem::take(&mut input)[used..];
            self.begin_frame(&head)?;

            if head.len > input.len() {
                // Cut by the end of this read: collect the payload in `buf` as it arrives.
                self.state = State::Payload(Partial {
                    start: self.buf.len().max(HEADER_ROOM),
                    remaining: head.len,
                    mask: head.mask,
                    opcode: head.opcode,
                    fin: head.fin,
                });
                continue;
            }
            let (payload, rest) = std::mem::take(&mut input).split_at_mut(head.len);
            input = rest;
            apply_mask(payload, head.mask);
            if self.whole_frame(&head, payload, on_event)?.is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
    }

    /// Parses the next header from a cut header held over from the last read followed by
    /// `input`. Returns the header and how many bytes of `input` it used, or `None` when
    /// `input` ended first (its bytes are then held for the next read).
    fn take_header(&mut self, input: &[u8]) -> Result<Option<(Head, usize)>, DecodeError> {
        let State::Header { head, len } = &mut self.state else {
            unreachable!("take_header is only called between frames");
        };
        let held = usize::from(*len);
        if held == 0 {
            // The usual case: the whole header is in this read and is parsed where it lies.
            if let Some(parsed) = parse_head(input, &self.limits)? {
                return Ok(Some(parsed));
            }
            // A header is never longer than the buffer, so all of `input` fits.
            head[..input.len()].copy_from_slice(input);
            *len = input.len() as u8;
            return Ok(None);
        }
        let add = (MAX_CLIENT_HEADER - held).min(input.len());
        head[held..held + add].copy_from_slice(&input[..add]);
        match parse_head(&head[..held + add], &self.limits)? {
            Some((parsed, size)) => {
                *len = 0;
                Ok(Some((parsed, size - held)))
            }
            None => {
                *len = (held + add) as u8;
                Ok(None)
            }
        }
    }

    /// Applies the rules that depend on earlier frames, and opens the message state for a
    /// message's first frame.
    fn begin_frame(&mut self, head: &Head) -> Result<(), DecodeError> {
        match head.opcode {
            OpCode::Text | OpCode::Binary => {
                if self.message.is_some() {
                    return Err(DecodeError::Protocol(
                        "new message before the fragmented one ended",
                    ));
                }
                self.message = Some(Message {
                    text: head.opcode == OpCode::Text,
                    compressed: head.rsv1,
                    fragments: 1,
                    utf8_valid: HEADER_ROOM,
                });
            }
            OpCode::Continuation => {
                let Some(message) = self.message.as_mut() else {
                    return Err(DecodeError::Protocol("continuation frame without a message"));
                };
                message.fragments += 1;
                if message.fragments > self.limits.max_fragments {
                    return Err(DecodeError::Policy("too many fragments"));
                }
                let held = self.buf.len().saturating_sub(HEADER_ROOM);
                if held.saturating_add(head.len) > self.limits.max_message_bytes {
                    return Err(DecodeError::MessageTooBig);
                }
            }
            OpCode::Close | OpCode::Ping | OpCode::Pong => {}
        }
        Ok(())
    }

    /// Handles a frame whose payload lies whole in the caller's buffer.
    fn whole_frame(
        &mut self,
        head: &Head,
        payload: &mut [u8],
        on_event: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, DecodeError> {
        if head.opcode.is_control() {
            return control_event(head.opcode, payload, on_event);
        }
        if head.fin && head.opcode != OpCode::Continuation {
            // An unfragmented message: no assembly needed, hand out the caller's bytes.
            self.message = None;
            let text = head.opcode == OpCode::Text;
            if text && !head.rsv1 && simdutf8::basic::from_utf8(payload).is_err() {
                return Err(DecodeError::InvalidUtf8);
            }
            return Ok(on_event(data_event(text, head.rsv1, Payload::Read(payload))));
        }
        self.hold(payload, [0; 4], 0);
        self.check_utf8(head.fin)?;
        if !head.fin {
            return Ok(ControlFlow::Continue(()));
        }
        Ok(self.deliver_message(on_event))
    }

    /// Handles a frame whose payload was collected in `buf` over several reads.
    fn finish_buffered_frame(
        &mut self,
        partial: Partial,
        on_event: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, DecodeError> {
        if partial.opcode.is_control() {
            let flow = control_event(partial.opcode, &self.buf[partial.start..], on_event);
            // Nothing of a message in front: the room goes too, leaving the decoder idle.
            let keep = if partial.start > HEADER_ROOM { partial.start } else { 0 };
            self.buf.truncate(keep);
            return flow;
        }
        if !partial.fin {
            return Ok(ControlFlow::Continue(()));
        }
        Ok(self.deliver_message(on_event))
    }

    /// Hands out the message assembled in `buf` and forgets it.
    fn deliver_message(
        &mut self,
        on_event: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let message = self.message.take().expect("a final frame belongs to a message");
        let flow =
            on_event(data_event(message.text, message.compressed, Payload::Held(&mut self.buf)));
        // Empty already if the caller took the buffer ([`Payload::into_held`]).
        self.buf.clear();
        flow
    }

    /// Appends `bytes` of a frame, unmasked with `mask` on the way, to `buf` (room first,
    /// into an empty one), `after` more of the frame still to come. Room is made as
    /// [`HELD_GROWTH`] says: ahead up to the frame's end, or doubling (whole fragments of an
    /// open message, after = 0), never past eight times the bytes held.
    fn hold(&mut self, bytes: &[u8], mask: [u8; 4], after: usize) {
        let room = if self.buf.is_empty() { HEADER_ROOM } else { 0 };
        let needed = self.buf.len() + room + bytes.len();
        if needed > self.buf.capacity() {
            let ahead = (needed + after).min(needed.saturating_mul(HELD_GROWTH));
            let target = ahead.max(self.buf.capacity() * 2).max(needed);
            self.buf.reserve_exact(target - self.buf.len());
        }
        self.buf.resize(self.buf.len() + room, 0);
        extend_masked(&mut self.buf, bytes, mask);
    }

    /// Checks the UTF-8 of an uncompressed text message as far as it has arrived. An
    /// incomplete sequence at the end is allowed until the message is `complete`.
    fn check_utf8(&mut self, complete: bool) -> Result<(), DecodeError> {
        let Some(message) = self.message.as_mut() else {
            return Ok(());
        };
        if !message.text || message.compressed {
            return Ok(());
        }
        match simdutf8::compat::from_utf8(&self.buf[message.utf8_valid..]) {
            Ok(_) => message.utf8_valid = self.buf.len(),
            Err(err) if err.error_len().is_none() && !complete => {
                message.utf8_valid += err.valid_up_to();
            }
            Err(_) => return Err(DecodeError::InvalidUtf8),
        }
        Ok(())
    }
}

/// Parses a client frame header at the start of `bytes` and applies the rules that need no
/// earlier frame. Returns the header and its size, or `None` if `bytes` ends inside it.
fn parse_head(bytes: &[u8], limits: &DecoderLimits) -> Result<Option<(Head, usize)>, DecodeError> {
    let (b0, b1) = match bytes {
        [b0, b1, ..] => (*b0, *b1),
        _ => return Ok(None),
    };
    let opcode = OpCode::from_wire(b0 & 0x0F).ok_or(DecodeError::Protocol("reserved opcode"))?;
    if b0 & (RSV2 | RSV3) != 0 {
        return Err(DecodeError::Protocol("reserved bit set"));
    }
    let (fin, rsv1) = (b0 & FIN != 0, b0 & RSV1 != 0);
    // The 7-bit length, or 126 and 127 for a 16- and 64-bit one after it. A longer form than
    // needed is accepted: RFC 6455 asks senders for the shortest, and nothing is gained by
    // refusing a peer that wastes its own bytes.
    let (len, mut used) = match b1 & 0x7F {
        126 => match bytes.get(2..4) {
            Some(&[a, b]) => (u64::from(u16::from_be_bytes([a, b])), 4),
            _ => return Ok(None),
        },
        127 => match bytes.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(b) => (u64::from_be_bytes(b), 10),
            None => return Ok(None),
        },
        short => (u64::from(short), 2),
    };
    let key = if b1 & MASKED != 0 {
        let Some(key) = bytes.get(used..used + 4).and_then(|k| <[u8; 4]>::try_from(k).ok()) else {
            return Ok(None);
        };
        used += 4;
        Some(key)
    } else {
        None
    };
    let mask = match (key, limits.server_frames) {
        (Some(mask), false) => mask,
        // The all-zero key leaves the payload as it is (`apply_mask` skips it).
        (None, true) => [0; 4],
        (None, false) => return Err(DecodeError::Protocol("client frame not masked")),
        (Some(_), true) => return Err(DecodeError::Protocol("server frame masked")),
    };
    if len > i64::MAX as u64 {
        return Err(DecodeError::Protocol("64-bit length with the top bit set"));
    }
    if opcode.is_control() {
        if !fin {
            return Err(DecodeError::Protocol("fragmented control frame"));
        }
        if len > MAX_CONTROL_PAYLOAD as u64 {
            return Err(DecodeError::Protocol("control frame over 125 bytes"));
        }
    } else if len > limits.max_message_bytes as u64 {
        return Err(DecodeError::MessageTooBig);
    }
    if rsv1 {
        // RSV1 marks a whole message as compressed, so only its first frame may carry it.
        if !matches!(opcode, OpCode::Text | OpCode::Binary) {
            return Err(DecodeError::Protocol("RSV1 on a control or continuation frame"));
        }
        if !limits.allow_rsv1 {
            return Err(DecodeError::Protocol("RSV1 without a negotiated extension"));
        }
    }
    // Within a limit that is itself a usize.
    Ok(Some((Head { opcode, fin, rsv1, mask, len: len as usize }, used)))
}

fn data_event(text: bool, compressed: bool, payload: Payload<'_>) -> Event<'_> {
    if text {
        Event::Text { payload, compressed }
    } else {
        Event::Binary { payload, compressed }
    }
}

/// Delivers a control frame. A close frame ends decoding whatever the caller answers.
fn control_event(
    opcode: OpCode,
    payload: &[u8],
    on_event: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
) -> Result<ControlFlow<()>, DecodeError> {
    Ok(match opcode {
        OpCode::Ping => on_event(Event::Ping(payload)),
        OpCode::Pong => on_event(Event::Pong(payload)),
        OpCode::Close => {
            let _ = on_event(Event::Close(parse_close_payload(payload)?));
            ControlFlow::Break(())
        }
        OpCode::Continuation | OpCode::Text | OpCode::Binary => {
            unreachable!("data opcode {opcode:?} passed as control")
        }
    })
}

/// The bits of a header's first byte besides the opcode, and the mask bit of its second.
const FIN: u8 = 0x80;
const RSV1: u8 = 0x40;
const RSV2: u8 = 0x20;
const RSV3: u8 = 0x10;
const MASKED: u8 = 0x80;

/// The size of the header of a frame with a payload of `len` bytes, masked or not.
fn head_size(len: u64, masked: bool) -> usize {
    let extended = match len {
        0..=125 => 0,
        126..=0xFFFF => 2,
        _ => 8,
    };
    2 + extended + if masked { 4 } else { 0 }
}

/// Writes the header of a frame with a payload of `len` bytes at the start of `out`, in the
/// shortest form; returns its size ([`head_size`]). Panics if `out` is shorter.
fn put_head(
    out: &mut [u8],
    opcode: OpCode,
    fin: bool,
    rsv1: bool,
    mask: Option<[u8; 4]>,
    len: u64,
) -> usize {
    let size = head_size(len, mask.is_some());
    let out = &mut out[..size];
    out[0] = opcode.to_wire() | if fin { FIN } else { 0 } | if rsv1 { RSV1 } else { 0 };
    let masked = if mask.is_some() { MASKED } else { 0 };
    let key_at = match len {
        0..=125 => {
            out[1] = masked | len as u8;
            2
        }
        126..=0xFFFF => {
            out[1] = masked | 126;
            out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        }
        _ => {
            out[1] = masked | 127;
            out[2..10].copy_from_slice(&len.to_be_bytes());
            10
        }
    };
    if let Some(key) = mask {
        out[key_at..].copy_from_slice(&key);
    }
    size
}

/// Appends the header of a frame to `out` (as [`put_head`]).
fn append_head(
    out: &mut Vec<u8>,
    opcode: OpCode,
    fin: bool,
    rsv1: bool,
    mask: Option<[u8; 4]>,
    len: u64,
) {
    let mut head = [0; MAX_CLIENT_HEADER];
    let size = put_head(&mut head, opcode, fin, rsv1, mask, len);
    out.extend_from_slice(&head[..size]);
}

/// Appends a server frame (FIN set, not masked) carrying `payload` to `out`.
pub fn encode_frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8], rsv1: bool) {
    debug_assert!(!opcode.is_control() || payload.len() <= MAX_CONTROL_PAYLOAD);
    out.reserve(MAX_SERVER_HEADER + payload.len());
    append_head(out, opcode, true, rsv1, None, payload.len() as u64);
    out.extend_from_slice(payload);
}

/// Appends a server close frame; `reason` is cut to fit on a character boundary.
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let reason = truncate_reason(reason);
    append_head(out, OpCode::Close, true, false, None, 2 + reason.len() as u64);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason.as_bytes());
}

/// Turns `buf`, whose payload starts after `MAX_SERVER_HEADER` reserved bytes, into a server
/// frame (FIN set, not masked) by writing the header right before the payload. Returns the
/// offset where the frame starts: send `buf[offset..]`.
///
/// This lets a message be serialised once, straight into its final buffer, and shared by
/// every recipient. Panics if `buf` is shorter than the reserved gap.
pub fn finish_reserved(buf: &mut [u8], opcode: OpCode, rsv1: bool) -> usize {
    assert!(buf.len() >= MAX_SERVER_HEADER, "no room reserved for the header");
    let payload_len = (buf.len() - MAX_SERVER_HEADER) as u64;
    let start = MAX_SERVER_HEADER - head_size(payload_len, false);
    put_head(&mut buf[start..], opcode, true, rsv1, None, payload_len);
    start
}

/// The length of the header of a frame (FIN set) with a payload of `payload_len` bytes,
/// masked or not: the room a relayed message is copied behind, so its header can be
/// written in front of it without moving it ([`write_header`]).
pub fn header_len(payload_len: usize, masked: bool) -> usize {
    head_size(payload_len as u64, masked)
}

/// Turns `buf`, `room` bytes of room followed by a payload, into a frame (FIN set): the
/// header goes at the end of the room, and a masked frame's payload is masked in place.
/// Returns where the frame starts. Panics if the room is shorter than the header.
pub fn write_header(buf: &mut [u8], room: usize, opcode: OpCode, mask: Option<[u8; 4]>) -> usize {
    let (head, payload) = buf.split_at_mut(room);
    let len = payload.len() as u64;
    let start = room.checked_sub(head_size(len, mask.is_some())).expect("room for the header");
    put_head(&mut head[start..], opcode, true, false, mask, len);
    if let Some(mask) = mask {
        apply_mask(payload, mask);
    }
    start
}

/// Appends a masked client close frame; `reason` is cut to fit on a character boundary.
pub fn encode_client_close(out: &mut Vec<u8>, code: u16, reason: &str, mask: [u8; 4]) {
    let reason = truncate_reason(reason);
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    encode_client_frame(out, OpCode::Close, &payload, mask, true, false);
}

/// Appends a client frame (masked with `mask`) to `out`: for the upstream hop of a relay, the
/// test clients and the load client.
pub fn encode_client_frame(
    out: &mut Vec<u8>,
    opcode: OpCode,
    payload: &[u8],
    mask: [u8; 4],
    fin: bool,
    rsv1: bool,
) {
    out.reserve(MAX_CLIENT_HEADER + payload.len());
    append_head(out, opcode, fin, rsv1, Some(mask), payload.len() as u64);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// An owned copy of an event, so tests can collect and compare them.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Ev {
        Text(Vec<u8>, bool),
        Binary(Vec<u8>, bool),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<(u16, String)>),
    }

    fn own(event: Event<'_>) -> Ev {
        match event {
            Event::Text { payload, compressed } => Ev::Text(payload.to_vec(), compressed),
            Event::Binary { payload, compressed } => Ev::Binary(payload.to_vec(), compressed),
            Event::Ping(p) => Ev::Ping(p.to_vec()),
            Event::Pong(p) => Ev::Pong(p.to_vec()),
            Event::Close(c) => Ev::Close(c.map(|(code, reason)| (code, reason.to_owned()))),
        }
    }

    fn text(s: &str) -> Ev {
        Ev::Text(s.as_bytes().to_vec(), false)
    }

    /// A masked client frame.
    fn frame(opcode: OpCode, payload: &[u8], fin: bool) -> Vec<u8> {
        let mut out = Vec::new();
        encode_client_frame(&mut out, opcode, payload, MASK, fin, false);
        out
    }

    /// A masked client frame with a raw first byte (any bits and opcode) and a short payload.
    fn raw(first: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mut out = vec![first, 0x80 | payload.len() as u8];
        out.extend_from_slice(&MASK);
        let start = out.len();
        out.extend_from_slice(payload);
        apply_mask(&mut out[start..], MASK);
        out
    }

    /// Feeds `stream` cut at the sorted offsets `cuts`; returns the events and the first error.
    fn feed_pieces(
        limits: DecoderLimits,
        stream: &[u8],
        cuts: &[usize],
    ) -> (Vec<Ev>, Result<(), DecodeError>) {
        let mut decoder = Decoder::new(limits);
        let mut data = stream.to_vec();
        let mut events = Vec::new();
        let mut from = 0;
        for &to in cuts.iter().chain([stream.len()].iter()) {
            let result = decoder.feed(&mut data[from..to], &mut |e| {
                events.push(own(e));
                ControlFlow::Continue(())
            });
            if result.is_err() {
                return (events, result);
            }
            from = to;
        }
        (events, Ok(()))
    }

    fn feed_all(limits: DecoderLimits, stream: &[u8]) -> (Vec<Ev>, Result<(), DecodeError>) {
        feed_pieces(limits, stream, &[])
    }

    fn feed_bytewise(limits: DecoderLimits, stream: &[u8]) -> (Vec<Ev>, Result<(), DecodeError>) {
        let cuts: Vec<usize> = (1..stream.len()).collect();
        feed_pieces(limits, stream, &cuts)
    }

    fn deflate_limits() -> DecoderLimits {
        DecoderLimits { allow_rsv1: true, ..DecoderLimits::default() }
    }

    /// Several frames covering every frame type, all three length encodings, a fragmented
    /// text message with a character split across fragments and control frames in between.
    fn mixed_stream() -> (Vec<u8>, Vec<Ev>) {
        let binary: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let mut s = Vec::new();
        s.extend(frame(OpCode::Text, b"hello", true));
        s.extend(frame(OpCode::Binary, &binary, true));
        s.extend(frame(OpCode::Text, b"caf\xc3", false));
        s.extend(frame(OpCode::Ping, b"p1", true));
        s.extend(frame(OpCode::Continuation, b"\xa9 ", false));
        s.extend(frame(OpCode::Pong, b"", true));
        s.extend(frame(OpCode::Ping, &[7; 125], true));
        s.extend(frame(OpCode::Continuation, b"ok", true));
        s.extend(frame(OpCode::Binary, b"", true));
        s.extend(frame(OpCode::Text, b"", true));
        let mut close = Vec::new();
        close.extend_from_slice(&1000u16.to_be_bytes());
        close.extend_from_slice(b"bye");
        s.extend(frame(OpCode::Close, &close, true));
        let events = vec![
            text("hello"),
            Ev::Binary(binary, false),
            Ev::Ping(b"p1".to_vec()),
            Ev::Pong(Vec::new()),
            Ev::Ping(vec![7; 125]),
            text("caf\u{e9} ok"),
            Ev::Binary(Vec::new(), false),
            text(""),
            Ev::Close(Some((1000, "bye".to_owned()))),
        ];
        (s, events)
    }

    #[test]
    fn decodes_a_mixed_stream_fed_at_once_and_byte_by_byte() {
        let (stream, expected) = mixed_stream();
        assert_eq!(feed_all(DecoderLimits::default(), &stream), (expected.clone(), Ok(())));
        assert_eq!(feed_bytewise(DecoderLimits::default(), &stream), (expected, Ok(())));
    }

    #[test]
    fn same_events_when_split_at_every_byte_boundary() {
        let (stream, expected) = mixed_stream();
        for cut in 0..=stream.len() {
            let got = feed_pieces(DecoderLimits::default(), &stream, &[cut]);
            assert_eq!(got, (expected.clone(), Ok(())), "cut at {cut}");
        }
    }

    #[test]
    fn same_events_for_random_chunkings() {
        let (stream, expected) = mixed_stream();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for run in 0..300 {
            let mut cuts = Vec::new();
            let mut at = 0;
            loop {
                // xorshift64: a fixed sequence, so a failure can be replayed.
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                at += (seed % 40) as usize;
                if at >= stream.len() {
                    break;
                }
                cuts.push(at);
            }
            let got = feed_pieces(DecoderLimits::default(), &stream, &cuts);
            assert_eq!(got, (expected.clone(), Ok(())), "run {run} cuts {cuts:?}");
        }
    }

    #[test]
    fn whole_frames_are_delivered_from_the_input_buffer() {
        let mut stream = frame(OpCode::Text, b"zero copy", true);
        stream.extend(frame(OpCode::Text, b"frag", false));
        stream.extend(frame(OpCode::Ping, b"ping", true));
        stream.extend(frame(OpCode::Continuation, b"ment", true));
        let range = stream.as_ptr_range();
        let (lo, hi) = (range.start as usize, range.end as usize);
        let inside = |p: &[u8]| (lo..hi).contains(&(p.as_ptr() as usize));
        let mut seen = Vec::new();
        let mut decoder = Decoder::new(DecoderLimits::default());
        decoder
            .feed(&mut stream, &mut |e| {
                match e {
                    Event::Text { payload, .. } => seen.push((payload.to_vec(), inside(&payload))),
                    Event::Ping(payload) => seen.push((payload.to_vec(), inside(payload))),
                    other => panic!("unexpected {other:?}"),
                }
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(
            seen,
            vec![
                (b"zero copy".to_vec(), true),
                (b"ping".to_vec(), true),
                // A fragmented message has to be assembled in the decoder's own buffer.
                (b"fragment".to_vec(), false),
            ]
        );
    }

    #[test]
    fn malformed_frames_are_refused_with_the_right_code() {
        let mut close_bad_utf8 = vec![0x03, 0xe8];
        close_bad_utf8.extend_from_slice(b"\xff");
        let cases: Vec<(&str, Vec<u8>, u16)> = vec![
            ("unmasked", vec![0x81, 0x02, b'h', b'i'], 1002),
            ("rsv1 not negotiated", raw(0xc1, b"x"), 1002),
            ("rsv2", raw(0xa1, b"x"), 1002),
            ("rsv3", raw(0x91, b"x"), 1002),
            ("opcode 3", raw(0x83, b""), 1002),
            ("opcode 7", raw(0x87, b""), 1002),
            ("opcode 0xb", raw(0x8b, b""), 1002),
            ("opcode 0xf", raw(0x8f, b""), 1002),
            ("ping without fin", raw(0x09, b""), 1002),
            ("close without fin", raw(0x08, b""), 1002),
            ("ping over 125", frame(OpCode::Ping, &[0; 126], true), 1002),
            ("continuation first", frame(OpCode::Continuation, b"x", true), 1002),
            (
                "new message inside a fragmented one",
                [frame(OpCode::Text, b"a", false), frame(OpCode::Binary, b"b", true)].concat(),
                1002,
            ),
            ("close of one byte", frame(OpCode::Close, &[3], true), 1002),
            ("close code 1005", frame(OpCode::Close, &[0x03, 0xed], true), 1002),
            ("close reason not utf-8", frame(OpCode::Close, &close_bad_utf8, true), 1007),
            ("text not utf-8", frame(OpCode::Text, b"ok\xff", true), 1007),
            ("text ends mid-character", frame(OpCode::Text, b"\xe2\x82", true), 1007),
            (
                "fragmented text ends mid-character",
                [frame(OpCode::Text, b"\xe2", false), frame(OpCode::Continuation, b"\x82", true)]
                    .concat(),
                1007,
            ),
            (
                "64-bit length with top bit",
                [&[0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 1][..], &MASK].concat(),
                1002,
            ),
        ];
        for (name, stream, code) in cases {
            for (how, (events, result)) in [
                ("whole", feed_all(DecoderLimits::default(), &stream)),
                ("bytewise", feed_bytewise(DecoderLimits::default(), &stream)),
            ] {
                assert_eq!(events, vec![], "{name} {how}");
                let err = result.expect_err(name);
                assert_eq!(err.close_code(), code, "{name} {how}: {err}");
            }
        }
    }

    #[test]
    fn rsv1_only_on_a_first_data_frame_when_negotiated() {
        let compressed = raw(0xc1, b"\xff\xfe");
        let (events, result) = feed_all(deflate_limits(), &compressed);
        assert_eq!(result, Ok(()));
        // Compressed bytes are not UTF-8; the caller validates after inflating.
        assert_eq!(events, vec![Ev::Text(b"\xff\xfe".to_vec(), true)]);

        let fragmented = [raw(0x42, b"ab"), raw(0x80, b"cd")].concat();
        let (events, _) = feed_all(deflate_limits(), &fragmented);
        assert_eq!(events, vec![Ev::Binary(b"abcd".to_vec(), true)]);

        for bad in [
            [raw(0x41, b"a"), raw(0xc0, b"b")].concat(), // RSV1 on a continuation
            raw(0xc9, b""),                              // RSV1 on a ping
        ] {
            let (_, result) = feed_all(deflate_limits(), &bad);
            assert_eq!(result.unwrap_err().close_code(), 1002);
        }
    }

    #[test]
    fn set_limits_applies_to_later_frames() {
        let mut decoder = Decoder::new(DecoderLimits::default());
        decoder.set_limits(deflate_limits());
        let mut events = Vec::new();
        decoder
            .feed(&mut raw(0xc2, b"z"), &mut |e| {
                events.push(own(e));
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(events, vec![Ev::Binary(b"z".to_vec(), true)]);
    }

    #[test]
    fn huge_declared_length_is_refused_before_buffering() {
        // 2^62 bytes declared, a few sent: refused as soon as the header is complete.
        let mut stream = vec![0x82, 0xff, 0x40, 0, 0, 0, 0, 0, 0, 0];
        stream.extend_from_slice(&MASK);
        stream.extend_from_slice(b"data");
        let mut decoder = Decoder::new(DecoderLimits::default());
        let result = decoder.feed(&mut stream, &mut |_| panic!("no event expected"));
        assert_eq!(result, Err(DecodeError::MessageTooBig));
        assert_eq!(decoder.buffered_bytes(), 0);
        assert_eq!(decoder.heap_bytes(), 0);
    }

    #[test]
    fn message_size_limit_is_inclusive() {
        let limits = DecoderLimits { max_message_bytes: 16, ..DecoderLimits::default() };
        let (events, result) = feed_all(limits, &frame(OpCode::Binary, &[1; 16], true));
        assert_eq!((events, result), (vec![Ev::Binary(vec![1; 16], false)], Ok(())));
        let (_, result) = feed_all(limits, &frame(OpCode::Binary, &[1; 17], true));
        assert_eq!(result, Err(DecodeError::MessageTooBig));
        // Control frames are bound by their own 125-byte rule, not by the message limit.
        let (events, _) = feed_all(limits, &frame(OpCode::Ping, &[2; 100], true));
        assert_eq!(events, vec![Ev::Ping(vec![2; 100])]);
    }

    #[test]
    fn fragments_adding_up_past_the_limit_are_refused_at_the_header() {
        let limits = DecoderLimits { max_message_bytes: 10, ..DecoderLimits::default() };
        let mut decoder = Decoder::new(limits);
        let mut first = frame(OpCode::Text, b"123456", false);
        decoder.feed(&mut first, &mut |_| panic!("message not complete")).unwrap();
        assert_eq!(decoder.buffered_bytes(), 6);
        // Only the header of the second fragment: 6 + 6 > 10 is known already.
        let mut second = frame(OpCode::Continuation, b"789012", true);
        let result = decoder.feed(&mut second[..6], &mut |_| panic!("no event expected"));
        assert_eq!(result, Err(DecodeError::MessageTooBig));
    }

    #[test]
    fn too_many_fragments_is_a_policy_violation() {
        let limits = DecoderLimits { max_fragments: 3, ..DecoderLimits::default() };
        let three = [
            frame(OpCode::Binary, b"a", false),
            frame(OpCode::Continuation, b"b", false),
            frame(OpCode::Continuation, b"c", true),
        ]
        .concat();
        assert_eq!(feed_all(limits, &three), (vec![Ev::Binary(b"abc".to_vec(), false)], Ok(())));
        let four = [
            frame(OpCode::Binary, b"a", false),
            frame(OpCode::Continuation, b"", false),
            frame(OpCode::Continuation, b"", false),
            frame(OpCode::Continuation, b"", true),
        ]
        .concat();
        let (events, result) = feed_all(limits, &four);
        assert_eq!(events, vec![]);
        let err = result.unwrap_err();
        assert_eq!((err, err.close_code()), (DecodeError::Policy("too many fragments"), 1008));
    }

    // Autobahn 6.4.x: "κόσμε", then a code point above U+10FFFF, then "edited".
    const PART1: &[u8] = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5";
    const PART2: &[u8] = b"\xf4\x90\x80\x80";
    const PART3: &[u8] = b"\x65\x64\x69\x74\x65\x64";

    #[test]
    fn invalid_utf8_fails_at_the_fragment_that_carries_it() {
        let mut decoder = Decoder::new(DecoderLimits::default());
        let mut no_event = |_: Event<'_>| -> ControlFlow<()> { panic!("no event expected") };
        let mut first = frame(OpCode::Text, PART1, false);
        assert_eq!(decoder.feed(&mut first, &mut no_event), Ok(()));
        let mut second = frame(OpCode::Continuation, PART2, false);
        assert_eq!(decoder.feed(&mut second, &mut no_event), Err(DecodeError::InvalidUtf8));
    }

    #[test]
    fn invalid_utf8_fails_at_the_read_that_carries_it_within_one_frame() {
        let message = [PART1, PART2, PART3].concat();
        let mut stream = frame(OpCode::Text, &message, true);
        let header = stream.len() - message.len();
        let (first, rest) = stream.split_at_mut(header + PART1.len());
        let mut decoder = Decoder::new(DecoderLimits::default());
        let mut no_event = |_: Event<'_>| -> ControlFlow<()> { panic!("no event expected") };
        assert_eq!(decoder.feed(first, &mut no_event), Ok(()));
        let second = &mut rest[..PART2.len()];
        assert_eq!(decoder.feed(second, &mut no_event), Err(DecodeError::InvalidUtf8));
    }

    #[test]
    fn an_incomplete_character_at_a_fragment_end_waits_for_the_next() {
        // Autobahn 6.4.2: 0xf4 alone may still start a valid character; 0x90 makes it invalid.
        let mut decoder = Decoder::new(DecoderLimits::default());
        let mut no_event = |_: Event<'_>| -> ControlFlow<()> { panic!("no event expected") };
        let mut first = frame(OpCode::Text, &[PART1, b"\xf4"].concat(), false);
        assert_eq!(decoder.feed(&mut first, &mut no_event), Ok(()));
        let mut second = frame(OpCode::Continuation, b"\x90\x80\x80", false);
        assert_eq!(decoder.feed(&mut second, &mut no_event), Err(DecodeError::InvalidUtf8));

        // A valid character split at each of its inner boundaries is accepted.
        let whole = "a\u{20ac}b\u{1f600}c".as_bytes();
        for cut in 0..=whole.len() {
            let stream = [
                frame(OpCode::Text, &whole[..cut], false),
                frame(OpCode::Continuation, &whole[cut..], true),
            ]
            .concat();
            let (events, result) = feed_all(DecoderLimits::default(), &stream);
            assert_eq!((events, result), (vec![Ev::Text(whole.to_vec(), false)], Ok(())));
        }
    }

    #[test]
    fn nothing_is_delivered_after_a_close() {
        let mut stream = frame(OpCode::Close, &[], true);
        stream.extend(frame(OpCode::Text, b"late", true));
        let mut decoder = Decoder::new(DecoderLimits::default());
        let mut events = Vec::new();
        let mut collect = |e: Event<'_>| {
            events.push(own(e));
            ControlFlow::Continue(())
        };
        decoder.feed(&mut stream, &mut collect).unwrap();
        decoder.feed(&mut frame(OpCode::Text, b"later", true), &mut collect).unwrap();
        assert_eq!(events, vec![Ev::Close(None)]);
        assert!(decoder.is_closed());
    }

    #[test]
    fn break_stops_decoding_for_good() {
        let mut stream = frame(OpCode::Text, b"one", true);
        stream.extend(frame(OpCode::Text, b"two", true));
        let mut decoder = Decoder::new(DecoderLimits::default());
        let mut events = Vec::new();
        let mut stop = |e: Event<'_>| {
            events.push(own(e));
            ControlFlow::Break(())
        };
        decoder.feed(&mut stream, &mut stop).unwrap();
        decoder.feed(&mut frame(OpCode::Text, b"three", true), &mut stop).unwrap();
        assert_eq!(events, vec![text("one")]);
        assert!(decoder.is_closed());
    }

    #[test]
    fn an_error_is_final() {
        let mut decoder = Decoder::new(DecoderLimits::default());
        let mut events = Vec::new();
        let mut collect = |e: Event<'_>| {
            events.push(own(e));
            ControlFlow::Continue(())
        };
        assert!(decoder.feed(&mut raw(0x83, b""), &mut collect).is_err());
        decoder.feed(&mut frame(OpCode::Text, b"after", true), &mut collect).unwrap();
        assert_eq!(events, vec![]);
    }

    #[test]
    fn non_minimal_length_encoding_is_accepted() {
        // RFC 6455 asks for the shortest length form; tungstenite and browsers accept longer ones.
        let mut stream = vec![0x81, 0xfe, 0x00, 0x02];
        stream.extend_from_slice(&MASK);
        stream.extend_from_slice(b"hi");
        apply_mask(&mut stream[8..], MASK);
        assert_eq!(feed_all(DecoderLimits::default(), &stream), (vec![text("hi")], Ok(())));
    }

    #[test]
    fn client_frames_round_trip_at_every_length_form() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let mut stream = Vec::new();
            encode_client_frame(&mut stream, OpCode::Text, &payload, [1, 2, 3, 4], true, false);
            encode_client_frame(&mut stream, OpCode::Binary, &payload, [9, 0, 0, 7], true, false);
            let expected = vec![Ev::Text(payload.clone(), false), Ev::Binary(payload, false)];
            assert_eq!(feed_all(DecoderLimits::default(), &stream), (expected.clone(), Ok(())));
            // Cut inside the extended length and inside the payload.
            let cuts = [3, stream.len() / 2, stream.len() - 1];
            let got = feed_pieces(DecoderLimits::default(), &stream, &cuts);
            assert_eq!(got, (expected, Ok(())), "len {len}");
        }
    }

    #[test]
    fn server_frames_have_the_expected_bytes() {
        let mut out = Vec::new();
        encode_frame(&mut out, OpCode::Text, b"hi", false);
        assert_eq!(out, b"\x81\x02hi");

        out.clear();
        encode_frame(&mut out, OpCode::Binary, &[0; 126], true);
        assert_eq!(out[..4], [0xc2, 0x7e, 0x00, 0x7e]);
        assert_eq!(out.len(), 4 + 126);

        out.clear();
        encode_frame(&mut out, OpCode::Binary, &vec![0; 65_536], false);
        assert_eq!(out[..10], [0x82, 0x7f, 0, 0, 0, 0, 0, 1, 0, 0]);

        out.clear();
        encode_frame(&mut out, OpCode::Pong, b"p", false);
        assert_eq!(out, b"\x8a\x01p");
    }

    #[test]
    fn close_frames_carry_code_and_cut_reason() {
        let mut out = Vec::new();
        encode_close(&mut out, 1000, "bye");
        assert_eq!(out, b"\x88\x05\x03\xe8bye");

        out.clear();
        encode_close(&mut out, 1008, &"\u{20ac}".repeat(100));
        assert_eq!(out[..4], [0x88, 125, 0x03, 0xf0]);
        assert_eq!(out.len(), 2 + 125);
        assert!(std::str::from_utf8(&out[4..]).is_ok());
    }

    #[test]
    fn finish_reserved_matches_encode_frame() {
        for len in [0, 5, 125, 126, 65_535, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut buf = vec![0xee; MAX_SERVER_HEADER];
            buf.extend_from_slice(&payload);
            let start = finish_reserved(&mut buf, OpCode::Binary, len % 2 == 1);
            let mut expected = Vec::new();
            encode_frame(&mut expected, OpCode::Binary, &payload, len % 2 == 1);
            assert_eq!(buf[start..], expected[..], "len {len}");
        }
    }

    #[test]
    fn buffered_bytes_counts_cut_headers_and_payloads() {
        let mut stream = frame(OpCode::Binary, &[5; 200], true);
        let mut decoder = Decoder::new(DecoderLimits::default());
        let mut no_event = |_: Event<'_>| -> ControlFlow<()> { panic!("no event expected") };
        decoder.feed(&mut stream[..1], &mut no_event).unwrap();
        assert_eq!(decoder.buffered_bytes(), 1);
        decoder.feed(&mut stream[1..20], &mut no_event).unwrap();
        // The 8-byte header is consumed; 12 payload bytes are held.
        assert_eq!(decoder.buffered_bytes(), 12);
    }

    /// A xorshift generator from a fixed seed, so that a failure replays.
    fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    /// The header codec agrees byte for byte with tungstenite's `FrameHeader`, the codec it
    /// replaced: every opcode, length form, flag and mask, written and read back, and every
    /// prefix of a header asks for more bytes.
    #[test]
    fn headers_match_tungstenite_byte_for_byte() {
        use tungstenite::protocol::frame::{coding::OpCode as Wire, FrameHeader};
        let opcodes = [
            OpCode::Continuation,
            OpCode::Text,
            OpCode::Binary,
            OpCode::Close,
            OpCode::Ping,
            OpCode::Pong,
        ];
        for opcode in opcodes {
            for len in [0, 1, 125, 126, 127, 65_535, 65_536, 1 << 40, i64::MAX as u64] {
                for (fin, rsv1) in [(true, false), (false, true), (true, true)] {
                    for mask in [None, Some(MASK)] {
                        let theirs = FrameHeader {
                            is_final: fin,
                            rsv1,
                            rsv2: false,
                            rsv3: false,
                            opcode: Wire::from(opcode.to_wire()),
                            mask,
                        };
                        let mut expected = Vec::new();
                        theirs.format(len, &mut expected).unwrap();
                        let mut ours = [0; MAX_CLIENT_HEADER];
                        let size = put_head(&mut ours, opcode, fin, rsv1, mask, len);
                        assert_eq!(&ours[..size], &expected[..], "{opcode:?} {len} {mask:?}");
                        assert_eq!(head_size(len, mask.is_some()), size);

                        let limits = DecoderLimits {
                            max_message_bytes: usize::MAX,
                            max_fragments: 1,
                            allow_rsv1: true,
                            server_frames: mask.is_none(),
                        };
                        for cut in 0..size {
                            assert!(matches!(parse_head(&expected[..cut], &limits), Ok(None)));
                        }
                        // Frames the rules refuse (a long or fragmented control frame, RSV1
                        // off a first frame) are refused; the rest read back as written.
                        let allowed = (!opcode.is_control() || (fin && len <= 125))
                            && (!rsv1 || matches!(opcode, OpCode::Text | OpCode::Binary));
                        match parse_head(&expected, &limits) {
                            Ok(Some((head, used))) => {
                                assert!(allowed, "{opcode:?} {len} fin={fin} rsv1={rsv1}");
                                assert_eq!(used, size);
                                assert_eq!((head.opcode, head.fin, head.rsv1), (opcode, fin, rsv1));
                                assert_eq!(head.mask, mask.unwrap_or([0; 4]));
                                assert_eq!(head.len as u64, len);
                            }
                            Ok(None) => panic!("a whole header asked for more"),
                            Err(_) => assert!(!allowed, "{opcode:?} {len} fin={fin} rsv1={rsv1}"),
                        }
                    }
                }
            }
        }
    }

    /// On random bytes the parser finds the same header as tungstenite's, or asks for more
    /// where it does, or refuses what it refuses (a reserved opcode).
    #[test]
    fn random_headers_parse_as_tungstenite_parses_them() {
        use std::io::Cursor;
        use tungstenite::protocol::frame::FrameHeader;
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15_u64);
        let limits = DecoderLimits {
            max_message_bytes: usize::MAX,
            max_fragments: 1,
            allow_rsv1: true,
            server_frames: false,
        };
        for _ in 0..20_000 {
            let len = (next() % 15) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Mostly plain data frames, so most get past the rules to the length and mask.
            if len > 0 && next() % 4 != 0 {
                bytes[0] &= 0x8f;
                bytes[0] = (bytes[0] & 0xf0) | (1 + bytes[0] % 2);
            }
            let mut cursor = Cursor::new(&bytes[..]);
            let theirs = FrameHeader::parse(&mut cursor);
            match (parse_head(&bytes, &limits), theirs) {
                (Ok(Some((head, used))), Ok(Some((h, payload_len)))) => {
                    assert_eq!(head.opcode.to_wire(), u8::from(h.opcode), "{bytes:?}");
                    assert_eq!((head.fin, head.rsv1), (h.is_final, h.rsv1), "{bytes:?}");
                    assert_eq!(Some(head.mask), h.mask, "{bytes:?}");
                    assert_eq!(head.len as u64, payload_len, "{bytes:?}");
                    assert_eq!(used as u64, cursor.position(), "{bytes:?}");
                }
                (Ok(None), Ok(None)) => {}
                // Refused by the rules tungstenite leaves to its caller.
                (Err(_), Ok(Some(_))) => {}
                // What the first byte refuses is refused before the rest has arrived; a
                // reserved opcode tungstenite refuses too.
                (Err(DecodeError::Protocol("reserved opcode" | "reserved bit set")), _) => {}
                (ours, theirs) => panic!(
                    "{bytes:?}: {:?} against {theirs:?}",
                    ours.map(|o| o.map(|(_, used)| used))
                ),
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1d_u64);
        for _ in 0..3000 {
            let len = (next() % 48) as usize;
            let mut stream: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Mostly masked, short frames, so decoding gets past the first header.
            if len > 1 && next() % 4 != 0 {
                stream[1] = 0x80 | (stream[1] % 20);
            }
            let cut = if len == 0 { 0 } else { (next() as usize) % len };
            let limits = DecoderLimits {
                max_message_bytes: 32,
                max_fragments: 4,
                allow_rsv1: next() % 2 == 0,
                server_frames: false,
            };
            let (_, result) = feed_pieces(limits, &stream, &[cut]);
            if let Err(err) = result {
                assert!([1002, 1007, 1008, 1009].contains(&err.close_code()));
            }
        }
    }

    #[test]
    fn idle_decoder_is_small_and_holds_no_heap() {
        assert!(std::mem::size_of::<Decoder>() <= 96, "{}", std::mem::size_of::<Decoder>());
        let mut stream = frame(OpCode::Binary, &[5; 1000], true);
        let mut decoder = Decoder::new(DecoderLimits::default());
        let mut count = 0;
        let mut on_event = |_: Event<'_>| {
            count += 1;
            ControlFlow::Continue(())
        };
        decoder.feed(&mut stream[..500], &mut on_event).unwrap();
        decoder.shrink(); // not idle: the partial frame must survive
        assert!(decoder.heap_bytes() >= decoder.buffered_bytes());
        decoder.feed(&mut stream[500..], &mut on_event).unwrap();
        assert_eq!(count, 1);
        assert_eq!(decoder.buffered_bytes(), 0);
        assert!(decoder.heap_bytes() > 0);
        decoder.shrink();
        assert_eq!(decoder.heap_bytes(), 0);
    }

    /// A message as [`Payload::into_held`] gave it: the decoder's buffer, or a copy of the
    /// read buffer's bytes.
    type Taken = Result<Vec<u8>, Vec<u8>>;

    /// Feeds `stream` in reads of `read` bytes; returns the decoder's heap after each read
    /// and each message, taken as [`Payload::into_held`] gives it.
    fn feed_taking(stream: &mut [u8], read: usize) -> (Vec<usize>, Vec<Taken>) {
        let mut decoder = Decoder::new(DecoderLimits::default());
        let (mut heaps, mut taken) = (Vec::new(), Vec::new());
        for piece in stream.chunks_mut(read) {
            decoder
                .feed(piece, &mut |event| {
                    if let Event::Binary { payload, .. } | Event::Text { payload, .. } = event {
                        taken.push(payload.into_held().map_err(|bytes| bytes.to_vec()));
                    }
                    ControlFlow::Continue(())
                })
                .unwrap();
            heaps.push(decoder.heap_bytes());
        }
        (heaps, taken)
    }

    #[test]
    fn a_large_frame_cut_by_reads_is_reserved_once_and_handed_over_behind_header_room() {
        let payload: Vec<u8> = (0..65_536u32).map(|i| (i % 251) as u8).collect();
        let mut stream = frame(OpCode::Binary, &payload, true);
        // 16 KiB reads, as the worker's receive buffers give them.
        let (heaps, taken) = feed_taking(&mut stream, 16 * 1024);
        // The first read reserves the whole frame, room included; no read after it grows
        // (a regrowth would copy the message once more).
        assert_eq!(heaps[0], HEADER_ROOM + payload.len());
        assert!(heaps[..heaps.len() - 1].iter().all(|&h| h == heaps[0]), "{heaps:?}");
        // The message's buffer was taken: the decoder holds nothing after it.
        assert_eq!(heaps.last(), Some(&0));
        let [Ok(mut buf)] = <[_; 1]>::try_from(taken).unwrap() else {
            panic!("an assembled message comes in the decoder's buffer");
        };
        assert_eq!(buf[HEADER_ROOM..], payload[..]);
        // The header goes into the room: the same bytes as a frame encoded afresh.
        let start = write_header(&mut buf, HEADER_ROOM, OpCode::Binary, None);
        let mut expected = Vec::new();
        encode_frame(&mut expected, OpCode::Binary, &payload, false);
        assert_eq!(buf[start..], expected[..]);
    }

    #[test]
    fn a_whole_frame_in_one_read_is_not_held() {
        let mut stream = frame(OpCode::Text, b"hello", true);
        let (heaps, taken) = feed_taking(&mut stream, 64);
        assert_eq!(heaps, [0]);
        assert_eq!(taken, [Err(b"hello".to_vec())]);
    }

    #[test]
    fn a_declared_length_reserves_at_most_eight_times_what_arrived() {
        let mut decoder = Decoder::new(DecoderLimits::default());
        let mut no_event = |_: Event<'_>| -> ControlFlow<()> { panic!("no event expected") };
        // A bare header declaring 8 MiB, then 100 bytes of it: no 8 MiB buffer.
        let mut head = frame(OpCode::Binary, &vec![0; 8 << 20], true);
        decoder.feed(&mut head[..14 + 100], &mut no_event).unwrap();
        assert_eq!(decoder.buffered_bytes(), 100);
        assert!(
            decoder.heap_bytes() <= HELD_GROWTH * (HEADER_ROOM + 100),
            "{}",
            decoder.heap_bytes()
        );
        // Each later read may grow it, always within the bound.
        let mut at = 114;
        for read in [1_000, 50_000, 1 << 20] {
            decoder.feed(&mut head[at..at + read], &mut no_event).unwrap();
            at += read;
            let held = HEADER_ROOM + decoder.buffered_bytes();
            assert!(
                decoder.heap_bytes() <= HELD_GROWTH * held,
                "{} for {held}",
                decoder.heap_bytes()
            );
        }
    }

    #[test]
    fn a_fragmented_message_grows_by_doubling_and_is_handed_over_whole() {
        // 64 fragments of 1000 bytes, each whole in its read: appends double the buffer
        // rather than reserving exactly (which would copy the message at every fragment).
        let mut stream = Vec::new();
        for i in 0..64u8 {
            let opcode = if i == 0 { OpCode::Text } else { OpCode::Continuation };
            stream.extend(frame(opcode, &[b'a' + i % 26; 1000], i == 63));
        }
        let read = stream.len() / 64;
        let (heaps, taken) = feed_taking(&mut stream, read);
        let growths = heaps.windows(2).filter(|w| w[1] > w[0]).count();
        assert!(growths <= 8, "{growths} growths: {heaps:?}");
        let [Ok(buf)] = <[_; 1]>::try_from(taken).unwrap() else { panic!("held") };
        assert_eq!(buf.len(), HEADER_ROOM + 64_000);
        assert!(buf[HEADER_ROOM..]
            .chunks(1000)
            .enumerate()
            .all(|(i, c)| c[0] == b'a' + i as u8 % 26));
    }

    #[test]
    fn write_header_fits_every_header_into_the_room() {
        for len in [0, 125, 126, 65_535, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            for mask in [None, Some(MASK)] {
                let mut buf = vec![0xee; HEADER_ROOM];
                buf.extend_from_slice(&payload);
                let start = write_header(&mut buf, HEADER_ROOM, OpCode::Text, mask);
                let mut expected = Vec::new();
                match mask {
                    None => encode_frame(&mut expected, OpCode::Text, &payload, false),
                    Some(m) => {
                        encode_client_frame(&mut expected, OpCode::Text, &payload, m, true, false)
                    }
                }
                assert_eq!(buf[start..], expected[..], "len {len} mask {mask:?}");
            }
        }
    }
}
