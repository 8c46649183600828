//! permessage-deflate (RFC 7692) for syncgate: configuration, handshake negotiation and the
//! per-message codec, sans-IO.
//!
//! This module is the answer to the review's compression DoS finding (docs/SECURITY.md). The three
//! ways compression hurts a server are memory per connection, CPU per byte, and decompression
//! bombs, and each has one answer here:
//!
//! - **Memory.** By default every connection of a worker shares one compressor and one
//!   decompressor ([`SharedContexts`]), reset after every message, and the handshake always
//!   answers `server_no_context_takeover; client_no_context_takeover` so that no connection
//!   needs a context of its own. Dedicated per-connection contexts (context takeover, better
//!   ratio) exist only when the operator asks for them, and the worker keeps them under a
//!   byte budget with [`context_bytes`]; past it, new connections get the shared mode.
//! - **CPU.** Messages below [`CompressionConfig::threshold`] go out uncompressed and window
//!   bits are capped (13 by default).
//! - **Bombs.** [`Inflater::inflate`] takes a hard output limit and grows its output in
//!   bounded steps, so a message that would inflate past the limit stops with
//!   [`InflateError::TooBig`] having allocated no more than the limit.
//!
//! The shared decompressor must be reset after each message for a second reason: its window
//! holds the last message of *another* connection, and a crafted back-reference would copy
//! that data into the attacker's message.
//!
//! Backend: `flate2` on `zlib-rs` (raw deflate, window bits 9..=15 through
//! `new_with_window_bits`, which flate2 offers for any zlib backend, zlib-rs included).

use std::fmt;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

mod negotiate;

pub use negotiate::{context_bytes, negotiate, Agreement, CompressionConfig};

/// What a sync flush leaves at the end of the data (an empty stored block). RFC 7692 7.2.1
/// has the sender strip it and 7.2.2 has the receiver put it back before inflating.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The largest LZ77 window deflate knows (32 KiB); also what a client may use when it did
/// not offer `client_max_window_bits` at all (RFC 7692 7.1.2.2).
const MAX_WINDOW_BITS: u8 = 15;

/// The smallest window zlib (and zlib-rs) can compress with: they turn a request for 8 into
/// 9, so an 8-bit server window is something we could only promise falsely.
const MIN_ZLIB_WINDOW_BITS: u8 = 9;

/// The smallest window RFC 7692 lets an offer name.
const MIN_RFC_WINDOW_BITS: u8 = 8;

/// First output step of [`Inflater::inflate`] when the compressed input is tiny: one page,
/// so that small messages need one allocation.
const MIN_INFLATE_STEP: usize = 4096;

/// How much the first inflate step may exceed the compressed size. Typical JSON inflates
/// 3 to 10 times; doubling takes care of the rest. The step is proportional to bytes the
/// peer has really sent, never to a size it declares, and always capped by the limit.
const INFLATE_STEP_RATIO: usize = 4;

/// Output room kept free on every deflate call. zlib asks for more than six bytes with a
/// sync flush, or it may emit the flush marker twice.
const MIN_DEFLATE_ROOM: usize = 64;

/// zlib-rs deflate memory on top of the window-dependent part (measured with zlib-rs 0.6.8:
/// 248,960 bytes). It is more than zlib's `1 << (memLevel + 9)` (128 KiB) because zlib-rs,
/// like zlib-ng, has a fixed 65,536-entry hash head table (128 KiB) in addition to the
/// literal buffers of memLevel 8 (112 KiB); the rest is state, with margin.
const DEFLATE_FIXED_BYTES: usize = 256 << 10;

/// zlib-rs inflate memory (measured with zlib-rs 0.6.8: 47,552 bytes). zlib-rs always
/// allocates a 32 KiB window whatever the window bits, plus about 15 KiB of state; 20 KiB
/// leaves margin for state growth in later versions.
const INFLATE_BYTES: usize = (1 << MAX_WINDOW_BITS) + (20 << 10);

/// Why a compressed message was refused; the connection closes on either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// The message inflates past the size limit (close 1009, Message Too Big).
    TooBig,
    /// The data is not valid deflate (close 1007, invalid payload data).
    Invalid,
}

impl fmt::Display for InflateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InflateError::TooBig => "compressed message inflates past the size limit",
            InflateError::Invalid => "invalid deflate data",
        })
    }
}

impl std::error::Error for InflateError {}

/// zlib refused to compress. Only a corrupted stream state causes that, which safe code
/// cannot produce; the caller sends the message uncompressed (RSV1 clear) instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateError;

impl fmt::Display for DeflateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("deflate failed")
    }
}

impl std::error::Error for DeflateError {}

/// One compressor: shared by a worker (reset after every message) or owned by a connection
/// (context takeover).
pub struct Deflater {
    /// The zlib-rs raw-deflate stream.
    ctx: Compress,
    /// Window (log2) the stream was built with, so a worker can pick the right shared one.
    window_bits: u8,
    /// Reset after every message: shared mode, or the client asked for
    /// server_no_context_takeover.
    reset_each_message: bool,
}

impl Deflater {
    /// A raw-deflate compressor. `window_bits` must be 9..=15 ([`negotiate`] never agrees
    /// to less); `level` 1..=9.
    pub fn new(window_bits: u8, level: u32, no_context_takeover: bool) -> Self {
        debug_assert!((MIN_ZLIB_WINDOW_BITS..=MAX_WINDOW_BITS).contains(&window_bits));
        // flate2 panics outside 9..=15; the clamp keeps a programming error from taking the
        // worker down in release builds.
        let window_bits = window_bits.clamp(MIN_ZLIB_WINDOW_BITS, MAX_WINDOW_BITS);
        Deflater {
            ctx: Compress::new_with_window_bits(Compression::new(level.min(9)), false, window_bits),
            window_bits,
            reset_each_message: no_context_takeover,
        }
    }

    /// The window (log2) this compressor uses.
    pub fn window_bits(&self) -> u8 {
        self.window_bits
    }

    /// Forgets all context, as if new (keeps the allocation).
    pub fn reset(&mut self) {
        self.ctx.reset();
    }

    /// Compresses one whole message and appends the payload to `out` (RFC 7692 7.2.1: sync
    /// flush, trailing 0x00 0x00 0xff 0xff removed).
    ///
    /// What `out` already holds is left alone, so a caller that encodes the frame header
    /// afterwards pushes its header room first (say 10 bytes) and compresses after it. On
    /// error `out` is as it was and the message should be sent uncompressed.
    pub fn deflate(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), DeflateError> {
        let start = out.len();
        out.reserve(input.len() / 2 + MIN_DEFLATE_ROOM);
        let mut consumed = 0;
        let result = loop {
            if out.capacity() - out.len() < MIN_DEFLATE_ROOM {
                // Vec::reserve grows geometrically, so a large message reallocates
                // O(log n) times.
                out.reserve(out.len() - start + MIN_DEFLATE_ROOM);
            }
            let before = self.ctx.total_in();
            if self.ctx.compress_vec(&input[consumed..], out, FlushCompress::Sync).is_err() {
                break Err(DeflateError);
            }
            consumed += (self.ctx.total_in() - before) as usize;
            // zlib returns when it lacks input or output room: with all input taken and
            // room left over, the flush is complete.
            if consumed == input.len() && out.len() < out.capacity() {
                break Ok(());
            }
        };
        match result {
            Ok(()) => {
                // A sync flush ends with TAIL, except when the stream was already flushed and
                // the message is empty: then zlib writes nothing at all.
                if out[start..].ends_with(&TAIL) {
                    out.truncate(out.len() - TAIL.len());
                }
                // RFC 7692 7.2.3.6: an empty message is the single byte 0x00. After a flush
                // with nothing new to say zlib emits only the tail; sent empty, the peer's
                // inflater reads the tail it appends as the start of a stored block, and a
                // context-takeover stream breaks from there (found by fuzzing).
                if out.len() == start {
                    out.push(0x00);
                }
                if self.reset_each_message {
                    self.ctx.reset();
                }
            }
            Err(_) => {
                out.truncate(start);
                self.ctx.reset();
            }
        }
        result
    }
}

/// One decompressor: shared by a worker (reset after every message) or owned by a
/// connection (context takeover).
pub struct Inflater {
    /// The zlib-rs raw-inflate stream.
    ctx: Decompress,
    /// Reset after every message: shared mode, or the client promised
    /// client_no_context_takeover.
    reset_each_message: bool,
}

/// How far one piece of input got through zlib.
enum Fed {
    /// All of it was taken and all resulting output written.
    Consumed,
    /// The deflate stream ended (a block with BFINAL set) after `consumed` bytes.
    StreamEnd { consumed: usize },
}

impl Inflater {
    /// A raw-inflate decompressor for a peer window of `window_bits` (8..=15).
    ///
    /// A window of 8 is inflated with 9: zlib cannot build an 8-bit window (its manual says
    /// to inflate such streams with 9, and its deflate itself turns 8 into 9), and a larger
    /// decoder window accepts every stream a smaller encoder window can produce, since the
    /// window only bounds how far back references reach. The worker's shared inflater should
    /// use 15: clients that did not offer `client_max_window_bits` may use the full window,
    /// and zlib-rs allocates a 32 KiB window whatever the bits, so a smaller one saves nothing.
    pub fn new(window_bits: u8, no_context_takeover: bool) -> Self {
        debug_assert!((MIN_RFC_WINDOW_BITS..=MAX_WINDOW_BITS).contains(&window_bits));
        Inflater {
            ctx: Decompress::new_with_window_bits(
                false,
                window_bits.clamp(MIN_ZLIB_WINDOW_BITS, MAX_WINDOW_BITS),
            ),
            reset_each_message: no_context_takeover,
        }
    }

    /// Forgets all context, as if new.
    pub fn reset(&mut self) {
        self.ctx.reset(false);
    }

    /// Inflates one whole compressed message (fragments already joined) and appends the
    /// result to `out`, never growing `out` by more than `max_output` bytes.
    ///
    /// Output grows in steps proportional to what has been produced (never to a declared
    /// or estimated size), each capped at the limit, so a bomb stops with
    /// [`InflateError::TooBig`] having allocated at most `max_output`. On error `out` is
    /// cut back to its old length and the context is reset.
    ///
    /// Limits: a message that ends with a block with BFINAL set (RFC 7692 7.2.3) ends the
    /// deflate stream, so the context restarts empty for the next message even with
    /// context takeover. A message cut short inside a block cannot be told from a whole
    /// one (zlib just waits for more input): its output is what the data holds.
    pub fn inflate(
        &mut self,
        input: &[u8],
        max_output: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), InflateError> {
        // An empty payload with RSV1 set holds no deflate block at all; taking it as an
        // empty message, with the context untouched, is the lenient reading.
        if input.is_empty() {
            return Ok(());
        }
        let start = out.len();
        let limit = start.saturating_add(max_output);
        let first_step = input.len().saturating_mul(INFLATE_STEP_RATIO).max(MIN_INFLATE_STEP);
        let result = self.inflate_message(input, start, limit, first_step, out);
        if result.is_err() {
            out.truncate(start);
        }
        // Reset after an error (the stream is broken), after a stream end (zlib accepts
        // nothing more on it) and after every message in shared mode.
        if !matches!(result, Ok(false)) || self.reset_each_message {
            self.reset();
        }
        result.map(drop)
    }

    /// Runs the message and then the stripped tail through zlib. Ok(true) when the deflate
    /// stream ended inside the message.
    fn inflate_message(
        &mut self,
        input: &[u8],
        start: usize,
        limit: usize,
        first_step: usize,
        out: &mut Vec<u8>,
    ) -> Result<bool, InflateError> {
        match self.feed(input, start, limit, first_step, out)? {
            Fed::StreamEnd { consumed } => {
                // RFC 7692 7.2.3: after a final block the sender adds one 0x00 byte (an empty
                // stored block's header once the tail is put back); accept it or nothing.
                match &input[consumed..] {
                    [] | [0x00] => Ok(true),
                    _ => Err(InflateError::Invalid),
                }
            }
            Fed::Consumed => match self.feed(&TAIL, start, limit, first_step, out)? {
                Fed::StreamEnd { .. } => Ok(true),
                Fed::Consumed => Ok(false),
            },
        }
    }

    /// Inflates `piece` into `out`, growing it by bounded steps up to `limit` (an absolute
    /// length), and fails with TooBig as soon as one byte more would be needed.
    fn feed(
        &mut self,
        piece: &[u8],
        start: usize,
        limit: usize,
        first_step: usize,
        out: &mut Vec<u8>,
    ) -> Result<Fed, InflateError> {
        let mut consumed = 0;
        loop {
            let room = limit - out.len();
            let before_in = self.ctx.total_in();
            let before_out = self.ctx.total_out();
            // `offered`: the output room given to zlib in this call.
            let (status, offered) = if room == 0 {
                // At the limit: a one-byte probe tells whether more output would follow,
                // without allocating past the limit.
                let mut probe = [0u8; 1];
                let status =
                    self.ctx.decompress(&piece[consumed..], &mut probe, FlushDecompress::Sync);
                (status, probe.len())
            } else {
                let len = out.len();
                let step = (len - start).max(first_step).min(room);
                // reserve_exact keeps the capacity at what we ask (resize alone may double
                // it, past the limit).
                out.reserve_exact(step);
                out.resize(len + step, 0);
                let status =
                    self.ctx.decompress(&piece[consumed..], &mut out[len..], FlushDecompress::Sync);
                let produced = (self.ctx.total_out() - before_out) as usize;
                out.truncate(len + produced);
                (status, step)
            };
            let status = status.map_err(|_| InflateError::Invalid)?;
            let taken = (self.ctx.total_in() - before_in) as usize;
            let produced = (self.ctx.total_out() - before_out) as usize;
            consumed += taken;
            if room == 0 && produced > 0 {
                return Err(InflateError::TooBig);
            }
            if status == Status::StreamEnd {
                return Ok(Fed::StreamEnd { consumed });
            }
            // zlib returns when it lacks input or output room: with all input taken and
            // room left over, nothing is pending.
            if consumed == piece.len() && produced < offered {
                return Ok(Fed::Consumed);
            }
            // zlib had input and room and did nothing: never seen, but it must not spin.
            if taken == 0 && produced == 0 {
                return Err(InflateError::Invalid);
            }
        }
    }
}

/// A worker's shared contexts, for every connection without context takeover.
///
/// One decompressor serves all windows (see [`Inflater::new`]). Compressors are kept per
/// window size and made on first use, because the output for a connection must not use a
/// window larger than its agreement's `server_window_bits`; with the usual offers (no
/// `server_max_window_bits`) only the configured size is ever made.
pub struct SharedContexts {
    /// Index `bits - 9`: one compressor per window size a connection has needed so far.
    deflaters: [Option<Deflater>; 7],
    /// The one decompressor, 15-bit, reset after every message.
    inflater: Inflater,
    /// Compression level for compressors made later.
    level: u32,
}

impl SharedContexts {
    /// Shared contexts compressing at `level` (the configuration's `level`).
    pub fn new(level: u32) -> Self {
        SharedContexts {
            deflaters: Default::default(),
            inflater: Inflater::new(MAX_WINDOW_BITS, true),
            level,
        }
    }

    /// The shared compressor for an agreement's `server_window_bits` (9..=15).
    pub fn deflater(&mut self, window_bits: u8) -> &mut Deflater {
        let bits = window_bits.clamp(MIN_ZLIB_WINDOW_BITS, MAX_WINDOW_BITS);
        let level = self.level;
        self.deflaters[usize::from(bits - MIN_ZLIB_WINDOW_BITS)]
            .get_or_insert_with(|| Deflater::new(bits, level, true))
    }

    /// The shared decompressor.
    pub fn inflater(&mut self) -> &mut Inflater {
        &mut self.inflater
    }

    /// Bytes these contexts hold now (for metrics).
    pub fn bytes(&self) -> usize {
        self.deflaters.iter().flatten().map(|d| context_bytes(d.window_bits, true)).sum::<usize>()
            + context_bytes(MAX_WINDOW_BITS, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// JSON-like text with repeats at many distances, so every window size matters.
    pub(super) fn sample(len: usize) -> Vec<u8> {
        let mut x: u32 = 0x9e37_79b9;
        let mut v = Vec::with_capacity(len);
        while v.len() < len {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let line = format!(
                "{{\"op\":\"put\",\"tableName\":\"issue\",\"value\":{{\"id\":\"{:08x}\",\"n\":{}}}}}\n",
                x,
                x % 1000
            );
            v.extend_from_slice(line.as_bytes());
        }
        v.truncate(len);
        v
    }

    /// Reference inflate with flate2's own reader: payload + tail as RFC 7692 7.2.2 says.
    fn reference_inflate(payload: &[u8]) -> Vec<u8> {
        let mut data = payload.to_vec();
        data.extend_from_slice(&TAIL);
        let mut out = Vec::new();
        // The stream has no final block, so the reader ends with UnexpectedEof after
        // delivering all the data; that is expected here.
        let _ = flate2::read::DeflateDecoder::new(&data[..]).read_to_end(&mut out);
        out
    }

    /// The largest back-reference distance in a raw deflate payload: a minimal decoder after
    /// zlib's puff.c, so that a compressor's window is checked from outside zlib-rs (whose
    /// inflate always keeps 32 KiB and so cannot tell).
    fn max_distance(payload: &[u8]) -> usize {
        // Extra bits of each length code (lengths themselves do not matter here).
        const LEXT: [u32; 29] =
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0];
        // Base distance and extra bits of each distance code (RFC 1951 3.2.5).
        const DBASE: [usize; 30] = [
            1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025,
            1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
        ];
        const DEXT: [u32; 30] = [
            0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12,
            12, 13, 13,
        ];
        /// Code-length code order of a dynamic block header.
        const ORDER: [usize; 19] =
            [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15];

        struct Bits<'a> {
            data: &'a [u8],
            bit: usize,
        }
        impl Bits<'_> {
            fn get(&mut self, n: u32) -> usize {
                let mut v = 0;
                for i in 0..n {
                    let byte = self.data[self.bit / 8];
                    v |= usize::from(byte >> (self.bit % 8) & 1) << i;
                    self.bit += 1;
                }
                v
            }
        }
        /// Canonical Huffman code: codes per length and symbols in code order.
        struct Huffman {
            count: [usize; 16],
            symbol: Vec<usize>,
        }
        fn build(lengths: &[usize]) -> Huffman {
            let mut count = [0; 16];
            lengths.iter().for_each(|&l| count[l] += 1);
            count[0] = 0;
            let mut symbol: Vec<usize> = (0..lengths.len()).filter(|&s| lengths[s] > 0).collect();
            symbol.sort_by_key(|&s| lengths[s]);
            Huffman { count, symbol }
        }
        fn decode(bits: &mut Bits, h: &Huffman) -> usize {
            let (mut code, mut first, mut index) = (0, 0, 0);
            for len in 1..16 {
                code |= bits.get(1);
                if code < first + h.count[len] {
                    return h.symbol[index + code - first];
                }
                index += h.count[len];
                first = (first + h.count[len]) << 1;
                code <<= 1;
            }
            panic!("bad Huffman code");
        }

        let mut data = payload.to_vec();
        data.extend_from_slice(&TAIL);
        let mut bits = Bits { data: &data, bit: 0 };
        let mut max = 0;
        while bits.bit / 8 < data.len() {
            let last = bits.get(1) == 1;
            let (lit, dist) = match bits.get(2) {
                0 => {
                    bits.bit = bits.bit.div_ceil(8) * 8;
                    let len = bits.get(16);
                    bits.get(16);
                    bits.bit += 8 * len;
                    if last {
                        break;
                    }
                    continue;
                }
                1 => {
                    let mut l = [8; 288];
                    l[144..256].fill(9);
                    l[256..280].fill(7);
                    (build(&l), build(&[5; 30]))
                }
                2 => {
                    let (nlen, ndist, ncode) =
                        (bits.get(5) + 257, bits.get(5) + 1, bits.get(4) + 4);
                    let mut cl = [0; 19];
                    for &i in &ORDER[..ncode] {
                        cl[i] = bits.get(3);
                    }
                    let cl = build(&cl);
                    let mut lengths = Vec::new();
                    while lengths.len() < nlen + ndist {
                        match decode(&mut bits, &cl) {
                            s @ 0..=15 => lengths.push(s),
                            16 => {
                                let prev = *lengths.last().unwrap();
                                let n = 3 + bits.get(2);
                                lengths.extend(std::iter::repeat_n(prev, n));
                            }
                            17 => {
                                let n = 3 + bits.get(3);
                                lengths.extend(std::iter::repeat_n(0, n));
                            }
                            _ => {
                                let n = 11 + bits.get(7);
                                lengths.extend(std::iter::repeat_n(0, n));
                            }
                        }
                    }
                    (build(&lengths[..nlen]), build(&lengths[nlen..]))
                }
                _ => panic!("reserved block type"),
            };
            loop {
                let sym = decode(&mut bits, &lit);
                if sym == 256 {
                    break;
                }
                if sym > 256 {
                    bits.get(LEXT[sym - 257]);
                    let d = decode(&mut bits, &dist);
                    max = max.max(DBASE[d] + bits.get(DEXT[d]));
                }
            }
            if last {
                break;
            }
        }
        max
    }

    pub(super) fn inflate_all(
        inflater: &mut Inflater,
        payload: &[u8],
    ) -> Result<Vec<u8>, InflateError> {
        let mut out = Vec::new();
        inflater.inflate(payload, 64 << 20, &mut out)?;
        Ok(out)
    }

    // ---- configuration ----

    // ---- negotiation ----

    // ---- codec ----

    #[test]
    fn round_trip_every_window_shared_and_dedicated() {
        let messages = [sample(3000), sample(70_000), b"short".to_vec(), sample(20_000)];
        for bits in 9..=15u8 {
            for no_takeover in [true, false] {
                let mut d = Deflater::new(bits, 1, no_takeover);
                let mut i = Inflater::new(bits, no_takeover);
                for msg in &messages {
                    let mut payload = Vec::new();
                    d.deflate(msg, &mut payload).unwrap();
                    assert!(!payload.ends_with(&TAIL));
                    assert_eq!(&inflate_all(&mut i, &payload).unwrap(), msg, "bits {bits}");
                }
            }
        }
    }

    #[test]
    fn deflater_respects_its_window() {
        // Blocks repeated at distances from 600 bytes to 20 KB: every window finds some.
        let mut msg = Vec::new();
        for len in [600, 3000, 20_000] {
            let block = sample(len);
            msg.extend_from_slice(&block);
            msg.extend_from_slice(&block);
        }
        for level in [1, 9] {
            for bits in 9..=15u8 {
                let mut payload = Vec::new();
                Deflater::new(bits, level, true).deflate(&msg, &mut payload).unwrap();
                let max = max_distance(&payload);
                assert!(max <= 1 << bits, "level {level} bits {bits}: distance {max}");
                // Control: the scanner does see the long repeats when the window allows.
                if bits == 15 {
                    assert!(max > 1 << 14, "level {level}: distance {max}");
                }
                assert_eq!(reference_inflate(&payload), msg);
            }
        }
    }

    #[test]
    fn shared_deflater_resets_between_messages() {
        let msg = sample(4000);
        let mut shared = Deflater::new(13, 1, true);
        let mut first = Vec::new();
        shared.deflate(&msg, &mut first).unwrap();
        let mut second = Vec::new();
        shared.deflate(&msg, &mut second).unwrap();
        // The second message stands alone: a fresh decoder inflates it.
        assert_eq!(first, second);
        assert_eq!(inflate_all(&mut Inflater::new(13, true), &second).unwrap(), msg);

        // Control: with context takeover the second message refers to the first.
        let mut takeover = Deflater::new(13, 1, false);
        let mut first = Vec::new();
        takeover.deflate(&msg, &mut first).unwrap();
        let mut second = Vec::new();
        takeover.deflate(&msg, &mut second).unwrap();
        assert!(second.len() < first.len() / 4);
        assert_eq!(inflate_all(&mut Inflater::new(13, true), &second), Err(InflateError::Invalid));
    }

    #[test]
    fn rfc7692_examples() {
        let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        let hello_again = [0xf2, 0x00, 0x11, 0x00, 0x00];
        // Context takeover: the second "Hello" is a back-reference into the first.
        let mut takeover = Inflater::new(15, false);
        assert_eq!(inflate_all(&mut takeover, &hello).unwrap(), b"Hello");
        assert_eq!(inflate_all(&mut takeover, &hello_again).unwrap(), b"Hello");
        // A shared inflater resets, so the same reference finds nothing: this is what
        // keeps one connection from reading another's last message.
        let mut shared = Inflater::new(15, true);
        assert_eq!(inflate_all(&mut shared, &hello).unwrap(), b"Hello");
        assert_eq!(inflate_all(&mut shared, &hello_again), Err(InflateError::Invalid));
        // BFINAL set, then the 0x00 the RFC adds; also without it.
        let bfinal = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00];
        assert_eq!(inflate_all(&mut takeover, &bfinal).unwrap(), b"Hello");
        assert_eq!(inflate_all(&mut takeover, &bfinal[..7]).unwrap(), b"Hello");
        // ...and the context restarts cleanly afterwards.
        assert_eq!(inflate_all(&mut takeover, &hello).unwrap(), b"Hello");
        // Garbage after the final block is refused.
        let mut junk = bfinal.to_vec();
        junk.push(0x42);
        assert_eq!(inflate_all(&mut takeover, &junk), Err(InflateError::Invalid));
        // A stored (uncompressed) block.
        let stored = [0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00];
        assert_eq!(inflate_all(&mut shared, &stored).unwrap(), b"Hello");
        // Our compressor produces the RFC's bytes for "Hello" at the default strategy.
        let mut ours = Vec::new();
        Deflater::new(15, 6, true).deflate(b"Hello", &mut ours).unwrap();
        assert_eq!(ours, hello);
    }

    #[test]
    fn empty_message() {
        let mut payload = Vec::new();
        Deflater::new(13, 1, true).deflate(b"", &mut payload).unwrap();
        assert_eq!(payload, [0x00]);
        assert_eq!(inflate_all(&mut Inflater::new(13, true), &payload).unwrap(), b"");
        // An empty RSV1 payload is an empty message and leaves the context alone.
        let mut i = Inflater::new(15, false);
        assert_eq!(inflate_all(&mut i, &[]).unwrap(), b"");
        assert_eq!(
            inflate_all(&mut i, &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]).unwrap(),
            b"Hello"
        );
    }

    #[test]
    fn deflate_keeps_header_room_and_existing_bytes() {
        let msg = sample(10_000);
        let mut out = vec![0xaa; 10];
        Deflater::new(13, 1, true).deflate(&msg, &mut out).unwrap();
        assert_eq!(out[..10], [0xaa; 10]);
        assert_eq!(reference_inflate(&out[10..]), msg);

        // Inflate appends too, and the limit counts only what it appends.
        let mut dst = b"prefix".to_vec();
        Inflater::new(15, true).inflate(&out[10..], msg.len(), &mut dst).unwrap();
        assert_eq!(&dst[..6], b"prefix");
        assert_eq!(&dst[6..], &msg[..]);
    }

    #[test]
    fn compatible_with_independent_raw_deflate() {
        // Ours -> flate2's reader.
        for bits in [9, 13, 15] {
            let msg = sample(50_000);
            let mut payload = Vec::new();
            Deflater::new(bits, 1, true).deflate(&msg, &mut payload).unwrap();
            assert_eq!(reference_inflate(&payload), msg);
        }
        // flate2's writer with a sync flush (tail stripped) -> ours.
        let msg = sample(50_000);
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(6));
        enc.write_all(&msg).unwrap();
        enc.flush().unwrap();
        let mut payload = enc.get_ref().clone();
        assert!(payload.ends_with(&TAIL));
        payload.truncate(payload.len() - TAIL.len());
        assert_eq!(inflate_all(&mut Inflater::new(15, true), &payload).unwrap(), msg);
        // flate2's writer finished (BFINAL set, as RFC 7692 7.2.3 allows) -> ours.
        // After the flush, finish() adds a final empty block (BFINAL set): on its own a
        // valid message with no data, as RFC 7692 7.2.3 allows.
        let finished = enc.finish().unwrap();
        let last_block = &finished[payload.len() + TAIL.len()..];
        let mut i = Inflater::new(15, false);
        assert_eq!(inflate_all(&mut i, last_block).unwrap(), b"");
        // A whole message compressed and finished in one go.
        let mut all = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(1));
        all.write_all(&msg).unwrap();
        let whole = all.finish().unwrap();
        assert_eq!(inflate_all(&mut i, &whole).unwrap(), msg);
    }

    /// A bomb: `repeats` MiB of zeros in about 1 KiB per MiB. A sync flush leaves the stream
    /// byte-aligned at a block boundary, and a steady-state chunk of zeros only refers back
    /// to zeros, so it can be repeated after itself.
    fn bomb(repeats: usize) -> Vec<u8> {
        let zeros = vec![0u8; 1 << 20];
        let mut c = Compress::new_with_window_bits(Compression::new(9), false, 15);
        let mut first = Vec::with_capacity(1 << 16);
        c.compress_vec(&zeros, &mut first, FlushCompress::Sync).unwrap();
        let mut steady = Vec::with_capacity(1 << 16);
        c.compress_vec(&zeros, &mut steady, FlushCompress::Sync).unwrap();
        let mut out = first;
        for _ in 1..repeats {
            out.extend_from_slice(&steady);
        }
        out.truncate(out.len() - TAIL.len());
        out
    }

    #[test]
    fn bomb_stops_at_the_limit_without_allocating_past_it() {
        // The construction inflates to exactly what it claims...
        let small = bomb(4);
        let mut out = Vec::new();
        Inflater::new(15, true).inflate(&small, 4 << 20, &mut out).unwrap();
        assert_eq!(out.len(), 4 << 20);
        assert!(out.iter().all(|&b| b == 0));
        // ...and one byte less is too big.
        let mut out = Vec::new();
        assert_eq!(
            Inflater::new(15, true).inflate(&small, (4 << 20) - 1, &mut out),
            Err(InflateError::TooBig)
        );
        assert!(out.is_empty());

        // 100 MiB of zeros in about 100 KiB, against a 1 MiB limit.
        let big = bomb(100);
        assert!(big.len() < 200 << 10, "bomb is {} bytes", big.len());
        let limit = 1 << 20;
        let mut out = Vec::new();
        let mut inflater = Inflater::new(15, false);
        assert_eq!(inflater.inflate(&big, limit, &mut out), Err(InflateError::TooBig));
        assert!(out.capacity() <= limit, "capacity {}", out.capacity());
        assert!(out.is_empty());
        // The context was reset: a normal message works afterwards.
        let msg = sample(2000);
        let mut payload = Vec::new();
        Deflater::new(15, 1, true).deflate(&msg, &mut payload).unwrap();
        assert_eq!(inflate_all(&mut inflater, &payload).unwrap(), msg);
    }

    #[test]
    fn limit_is_exact() {
        let msg = sample(30_000);
        let mut payload = Vec::new();
        Deflater::new(13, 1, true).deflate(&msg, &mut payload).unwrap();
        let mut out = Vec::new();
        let mut i = Inflater::new(13, true);
        assert_eq!(i.inflate(&payload, msg.len(), &mut out), Ok(()));
        assert_eq!(out, msg);
        assert!(out.capacity() <= msg.len());
        out.clear();
        assert_eq!(i.inflate(&payload, msg.len() - 1, &mut out), Err(InflateError::TooBig));
        assert_eq!(i.inflate(&payload, 0, &mut out), Err(InflateError::TooBig));
        assert_eq!(i.inflate(&[0x00], 0, &mut out), Ok(()));
    }

    #[test]
    fn corrupt_input_is_invalid_never_a_panic() {
        let mut i = Inflater::new(15, true);
        // BTYPE 11 is reserved.
        assert_eq!(inflate_all(&mut i, &[0xff, 0xff]), Err(InflateError::Invalid));
        // A stored block whose LEN and NLEN disagree.
        assert_eq!(
            inflate_all(&mut i, &[0x00, 0x05, 0x00, 0x00, 0x00]),
            Err(InflateError::Invalid)
        );
        // Mutations of a valid message: any outcome but a panic or an overrun is fine.
        let msg = sample(5000);
        let mut payload = Vec::new();
        Deflater::new(15, 1, true).deflate(&msg, &mut payload).unwrap();
        let mut x: u32 = 12345;
        let mut invalid = 0;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let mut bad = payload.clone();
            let at = x as usize % bad.len();
            bad[at] ^= 1 << (x >> 28 & 7);
            bad.truncate(bad.len() - (x >> 8) as usize % 3);
            let mut out = Vec::new();
            match i.inflate(&bad, 8000, &mut out) {
                Ok(()) => assert!(out.len() <= 8000),
                Err(_) => {
                    invalid += 1;
                    assert!(out.is_empty());
                }
            }
        }
        assert!(invalid > 100, "only {invalid} mutations were refused");
        // The shared inflater still works after all that.
        assert_eq!(inflate_all(&mut i, &payload).unwrap(), msg);
    }

    #[test]
    fn shared_contexts_pick_window_per_agreement() {
        let mut shared = SharedContexts::new(1);
        let base = shared.bytes();
        assert_eq!(base, context_bytes(15, false));
        assert_eq!(shared.deflater(10).window_bits(), 10);
        assert_eq!(shared.deflater(13).window_bits(), 13);
        assert_eq!(shared.deflater(10).window_bits(), 10);
        assert_eq!(shared.bytes(), base + context_bytes(10, true) + context_bytes(13, true));
        let msg = sample(3000);
        let mut payload = Vec::new();
        shared.deflater(10).deflate(&msg, &mut payload).unwrap();
        assert!(max_distance(&payload) <= 1 << 10);
        assert_eq!(inflate_all(shared.inflater(), &payload).unwrap(), msg);
    }

    #[test]
    fn an_empty_message_after_another_is_one_zero_byte() {
        // Found by fuzzing (fuzz/artifacts/deflate/empty-message-after-flush).
        let mut d = Deflater::new(15, 1, false);
        let mut i = Inflater::new(15, false);
        for message in [&b"abcabc"[..], b"", b"abc"] {
            let mut packed = Vec::new();
            d.deflate(message, &mut packed).unwrap();
            assert!(!packed.is_empty(), "empty payload for {message:?}");
            let mut out = Vec::new();
            i.inflate(&packed, 1 << 20, &mut out).unwrap();
            assert_eq!(out, message);
        }
    }
}
