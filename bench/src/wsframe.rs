//! The client side of WebSocket framing (RFC 6455) for the load client, plus the
//! permessage-deflate pieces (RFC 7692) that the compressed scenarios need.
//!
//! The load client must not be the bottleneck, so frames it sends are encoded once and
//! then patched in place (see `zero::PushFrame`), and frames it receives are decoded
//! straight out of the read buffer without copying. Everything here works on byte slices;
//! the event loop that owns the sockets lives in the `loadgen` binary.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// Continuation frame.
pub const OP_CONTINUATION: u8 = 0x0;
/// Text frame: every Zero message at protocol v51.
pub const OP_TEXT: u8 = 0x1;
/// Binary frame: only protocol v52 poke parts use it, never v51.
pub const OP_BINARY: u8 = 0x2;
/// Close frame.
pub const OP_CLOSE: u8 = 0x8;
/// WebSocket ping (the server's keepalive probe).
pub const OP_PING: u8 = 0x9;
/// WebSocket pong.
pub const OP_PONG: u8 = 0xA;

/// The masking key of every frame the load client sends.
///
/// RFC 6455 wants unpredictable keys so that a hostile page cannot make a proxy cache
/// poisoned bytes; on loopback there is no proxy, and one fixed key lets a frame be
/// encoded once and sent many times. It is not zero, so a server unmasks for real.
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Largest frame payload accepted from a server. Far above anything the scenarios make;
/// it only keeps a broken length field from asking for gigabytes.
pub const MAX_FRAME_PAYLOAD: u64 = 64 * 1024 * 1024;

/// The four bytes a sync flush ends with; RFC 7692 strips them from every message.
pub const DEFLATE_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Why a server's bytes are not a valid frame (each one ends the run: a broken frame from
/// the server under test is a failure, not a number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// A server frame had the mask bit set (RFC 6455 5.1 forbids it).
    Masked,
    /// RSV2 or RSV3 set: no extension that uses them was negotiated.
    ReservedBits,
    /// An opcode RFC 6455 does not define.
    UnknownOpcode(u8),
    /// A control frame with FIN clear or a payload over 125 bytes.
    BadControl,
    /// A payload length over [`MAX_FRAME_PAYLOAD`].
    TooBig(u64),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Masked => write!(f, "server sent a masked frame"),
            FrameError::ReservedBits => write!(f, "server set RSV2/RSV3"),
            FrameError::UnknownOpcode(op) => write!(f, "server sent unknown opcode {op:#x}"),
            FrameError::BadControl => {
                write!(f, "server sent a fragmented or oversized control frame")
            }
            FrameError::TooBig(n) => write!(f, "server frame of {n} bytes"),
        }
    }
}

/// One decoded frame, borrowing its payload from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Last frame of its message.
    pub fin: bool,
    /// The permessage-deflate bit: set on the first frame of a compressed message.
    pub rsv1: bool,
    /// One of the `OP_*` constants.
    pub opcode: u8,
    /// The payload (servers do not mask).
    pub payload: &'a [u8],
}

/// Decodes one server frame from the front of `buf`: `Ok(None)` while it is incomplete,
/// else the frame and the number of bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b1 & 0x80 != 0 {
        return Err(FrameError::Masked);
    }
    if b0 & 0x30 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let opcode = b0 & 0x0f;
    let fin = b0 & 0x80 != 0;
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if !fin || b1 & 0x7f > 125 {
                return Err(FrameError::BadControl);
            }
        }
        other => return Err(FrameError::UnknownOpcode(other)),
    }
    let (len, head) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    if len > MAX_FRAME_PAYLOAD {
        return Err(FrameError::TooBig(len));
    }
    let end = head + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    let frame = Frame { fin, rsv1: b0 & 0x40 != 0, opcode, payload: &buf[head..end] };
    Ok(Some((frame, end)))
}

/// Appends one masked, unfragmented client frame to `out` and returns the offset in `out`
/// where its payload starts (callers that patch the payload later need it).
pub fn encode_masked(opcode: u8, rsv1: bool, payload: &[u8], out: &mut Vec<u8>) -> usize {
    out.reserve(payload.len() + 14);
    out.push(0x80 | if rsv1 { 0x40 } else { 0 } | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&MASK);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], 0);
    start
}

/// XORs `buf` with [`MASK`], as if `buf` started at byte `phase` of a frame's payload.
/// Masking is its own inverse, so this both masks and unmasks.
pub fn apply_mask(buf: &mut [u8], phase: usize) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= MASK[(i + phase) & 3];
    }
}

/// A masked close frame with status 1000 and no reason.
pub fn close_frame() -> Vec<u8> {
    let mut out = Vec::with_capacity(8);
    encode_masked(OP_CLOSE, false, &1000u16.to_be_bytes(), &mut out);
    out
}

/// Compresses `data` on its own (no history before it) and ends with a sync flush, so
/// the output is byte-aligned and ends with [`DEFLATE_TAIL`].
///
/// Such segments can be concatenated into one valid deflate stream: each starts at a byte
/// boundary and refers to nothing before it. That is what lets a push be compressed once
/// and have only its mutation id change per send (see `zero::PushFrame`).
pub fn deflate_segment(data: &[u8], window_bits: u8) -> Vec<u8> {
    let mut c = Compress::new_with_window_bits(Compression::default(), false, window_bits);
    let mut out = Vec::with_capacity(data.len() / 2 + 64);
    loop {
        let consumed = c.total_in() as usize;
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(256));
        }
        let status = c
            .compress_vec(&data[consumed..], &mut out, FlushCompress::Sync)
            .expect("deflate of an in-memory buffer cannot fail");
        let done = c.total_in() as usize == data.len() && out.ends_with(&DEFLATE_TAIL);
        if done || status == Status::StreamEnd {
            return out;
        }
    }
}

/// A deflate "stored" block (no compression) holding `data`, starting at a byte boundary.
/// Its bytes sit verbatim in the stream, so they can be patched in place.
pub fn stored_block(data: &[u8]) -> Vec<u8> {
    assert!(data.len() <= usize::from(u16::MAX), "stored block over 64 KiB");
    let len = data.len() as u16;
    let mut out = Vec::with_capacity(data.len() + 5);
    out.push(0x00); // BFINAL = 0, BTYPE = 00, then padding to the byte boundary
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
    out
}

/// Inflates the messages of one connection's server-to-client direction.
///
/// The context is kept between messages, which is correct whether or not the server
/// takes its context over (a server that does not simply never refers back).
pub struct Inflater {
    /// Raw inflate state with the largest window, which decodes any smaller one too.
    inner: Decompress,
}

impl Default for Inflater {
    fn default() -> Self {
        Inflater { inner: Decompress::new(false) }
    }
}

impl Inflater {
    /// Inflates one message's payload (the tail already stripped by the server) into
    /// `out`, replacing its contents. `limit` bounds the inflated size.
    pub fn inflate(&mut self, input: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<(), String> {
        out.clear();
        for part in [input, &DEFLATE_TAIL[..]] {
            let start_in = self.inner.total_in();
            loop {
                let used = (self.inner.total_in() - start_in) as usize;
                if used == part.len() {
                    break;
                }
                if out.capacity() - out.len() < 1024 {
                    out.reserve((out.capacity() * 2).max(4096));
                }
                let before = (self.inner.total_in(), self.inner.total_out());
                self.inner
                    .decompress_vec(&part[used..], out, FlushDecompress::Sync)
                    .map_err(|e| format!("inflate: {e}"))?;
                if out.len() > limit {
                    return Err(format!("inflated message over {limit} bytes"));
                }
                if (self.inner.total_in(), self.inner.total_out()) == before {
                    return Err("inflate made no progress".into());
                }
            }
        }
        // Output may still be held back when the window is full; drain it.
        loop {
            if out.capacity() - out.len() < 1024 {
                out.reserve((out.capacity() * 2).max(4096));
            }
            let before = self.inner.total_out();
            self.inner
                .decompress_vec(&[], out, FlushDecompress::Sync)
                .map_err(|e| format!("inflate: {e}"))?;
            if self.inner.total_out() == before {
                return Ok(());
            }
            if out.len() > limit {
                return Err(format!("inflated message over {limit} bytes"));
            }
        }
    }
}

/// The permessage-deflate parameters a server accepted (RFC 7692 7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateParams {
    /// Window bits the client may use when compressing (15 when the server set no cap).
    pub client_max_window_bits: u8,
    /// The server resets its compressor per message.
    pub server_no_context_takeover: bool,
    /// The server asked the client to reset its compressor per message (the load client
    /// always does, so this is only reported).
    pub client_no_context_takeover: bool,
}

/// Reads a `Sec-WebSocket-Extensions` response value: `Ok(None)` when it does not name
/// permessage-deflate, an error when the server answered with parameters the client did
/// not offer or values out of range.
pub fn parse_deflate_response(value: &str) -> Result<Option<DeflateParams>, String> {
    for ext in value.split(',') {
        let mut parts = ext.split(';').map(str::trim);
        if parts.next() != Some("permessage-deflate") {
            continue;
        }
        let mut params = DeflateParams {
            client_max_window_bits: 15,
            server_no_context_takeover: false,
            client_no_context_takeover: false,
        };
        for p in parts {
            let (name, val) = match p.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                None => (p, None),
            };
            let bits = || -> Result<u8, String> {
                let v = val.ok_or_else(|| format!("{name} without a value"))?;
                match v.parse::<u8>() {
                    Ok(b @ 8..=15) => Ok(b),
                    _ => Err(format!("{name}={v} out of range")),
                }
            };
            match name {
                "server_no_context_takeover" => params.server_no_context_takeover = true,
                "client_no_context_takeover" => params.client_no_context_takeover = true,
                "server_max_window_bits" => {
                    bits()?;
                }
                // zlib cannot compress with 8 bits; 9 produces streams an 8-bit
                // decoder may reject, so refuse rather than send something wrong.
                "client_max_window_bits" => match bits()? {
                    8 => return Err("client_max_window_bits=8 is not supported".into()),
                    b => params.client_max_window_bits = b,
                },
                other => return Err(format!("unknown permessage-deflate parameter {other}")),
            }
        }
        return Ok(Some(params));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inflate_all(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Inflater::default().inflate(payload, &mut out, 1 << 20).unwrap();
        out
    }

    #[test]
    fn masked_frame_round_trips_at_every_length_class() {
        for len in [0usize, 5, 125, 126, 65535, 65536] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut out = Vec::new();
            let start = encode_masked(OP_TEXT, false, &payload, &mut out);
            assert_eq!(out[0], 0x81);
            assert_eq!(out[1] & 0x80, 0x80, "client frames must be masked");
            assert_eq!(&out[start - 4..start], &MASK);
            let mut body = out[start..].to_vec();
            apply_mask(&mut body, 0);
            assert_eq!(body, payload);
        }
    }

    #[test]
    fn decodes_server_frames_and_waits_for_the_rest() {
        let frame = [0x81, 0x03, b'a', b'b', b'c', 0x89, 0x00];
        let (f, n) = decode(&frame).unwrap().unwrap();
        assert_eq!((f.fin, f.opcode, f.payload, n), (true, OP_TEXT, &b"abc"[..], 5));
        let (f, n) = decode(&frame[5..]).unwrap().unwrap();
        assert_eq!((f.opcode, f.payload.len(), n), (OP_PING, 0, 2));
        for cut in 0..5 {
            assert_eq!(decode(&frame[..cut]).unwrap(), None);
        }
        let mut long = vec![0x01, 126, 0x01, 0x00];
        long.extend(std::iter::repeat_n(b'x', 256));
        let (f, n) = decode(&long).unwrap().unwrap();
        assert_eq!((f.fin, f.payload.len(), n), (false, 256, 260));
        assert_eq!(decode(&long[..259]).unwrap(), None);
    }

    #[test]
    fn rejects_malformed_server_frames() {
        assert_eq!(decode(&[0x81, 0x81, 0, 0, 0, 0, 0]), Err(FrameError::Masked));
        assert_eq!(decode(&[0xa1, 0x00]), Err(FrameError::ReservedBits));
        assert_eq!(decode(&[0x83, 0x00]), Err(FrameError::UnknownOpcode(3)));
        assert_eq!(decode(&[0x09, 0x00]), Err(FrameError::BadControl));
        assert_eq!(decode(&[0x89, 126, 0, 200]), Err(FrameError::BadControl));
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&(MAX_FRAME_PAYLOAD + 1).to_be_bytes());
        assert!(matches!(decode(&huge), Err(FrameError::TooBig(_))));
    }

    #[test]
    fn close_frame_carries_1000() {
        let f = close_frame();
        assert_eq!(f[0], 0x88);
        let mut body = f[6..].to_vec();
        apply_mask(&mut body, 0);
        assert_eq!(body, 1000u16.to_be_bytes());
    }

    #[test]
    fn concatenated_segments_and_stored_blocks_inflate_to_the_whole() {
        let a = br#"["push",{"id":"#.repeat(20);
        let b = b"12345";
        let c = br#","v":"abcdefghijklmnop"}]"#.repeat(40);
        for bits in [9u8, 13, 15] {
            let mut msg = deflate_segment(&a, bits);
            msg.extend(stored_block(b));
            msg.extend(deflate_segment(&c, bits));
            assert!(msg.ends_with(&DEFLATE_TAIL));
            msg.truncate(msg.len() - 4);
            let mut whole = a.clone();
            whole.extend_from_slice(b);
            whole.extend_from_slice(&c);
            assert_eq!(inflate_all(&msg), whole, "window bits {bits}");
            assert!(msg.len() < whole.len() / 2, "the segments do compress");
        }
    }

    #[test]
    fn inflater_keeps_context_and_enforces_its_limit() {
        // A compressor that takes its context over: the second message refers back.
        let mut c = Compress::new(Compression::default(), false);
        let mut messages = Vec::new();
        for text in [b"hello hello hello world".to_vec(), b"hello hello hello world!".to_vec()] {
            let mut out = Vec::with_capacity(256);
            c.compress_vec(&text, &mut out, FlushCompress::Sync).unwrap();
            out.truncate(out.len() - 4);
            messages.push((text, out));
        }
        let mut inf = Inflater::default();
        let mut out = Vec::new();
        for (text, z) in &messages {
            inf.inflate(z, &mut out, 1024).unwrap();
            assert_eq!(&out, text);
        }
        let big = deflate_segment(&vec![b'a'; 100_000], 15);
        let err = Inflater::default().inflate(&big[..big.len() - 4], &mut out, 1000);
        assert!(err.unwrap_err().contains("over 1000"));
        assert!(Inflater::default().inflate(&[0xff, 0xff, 0xff], &mut out, 1000).is_err());
    }

    #[test]
    fn reads_deflate_responses() {
        assert_eq!(parse_deflate_response("x-other").unwrap(), None);
        let p = parse_deflate_response(
            "permessage-deflate; server_no_context_takeover; client_max_window_bits=13",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            p,
            DeflateParams {
                client_max_window_bits: 13,
                server_no_context_takeover: true,
                client_no_context_takeover: false
            }
        );
        assert_eq!(
            parse_deflate_response("permessage-deflate").unwrap().unwrap().client_max_window_bits,
            15
        );
        assert!(parse_deflate_response("permessage-deflate; client_max_window_bits=16").is_err());
        assert!(parse_deflate_response("permessage-deflate; client_max_window_bits").is_err());
        assert!(parse_deflate_response("permessage-deflate; client_max_window_bits=8").is_err());
        assert!(parse_deflate_response("permessage-deflate; mystery").is_err());
    }
}
