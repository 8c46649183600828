//! Fuzzes `syncgate::ws::frame`: the decoder over arbitrary client bytes, and a round trip of
//! well-formed client frames through the encoder and the decoder.
//!
//! Properties, beyond "never panics":
//! - Chunking does not matter: the bytes fed in arbitrary pieces give the same events and the
//!   same error as the same bytes fed at once (the decoder is a pure function of the stream).
//! - Every event obeys the limits and RFC 6455: data payloads within `max_message_bytes`,
//!   control payloads within 125 bytes, uncompressed text is UTF-8, RSV1 only when allowed,
//!   nothing after a close event or an error.
//! - What the decoder holds stays bounded by the limits, whatever lengths frames declare.
//! - Round trip: messages encoded with `encode_client_frame` (fragmented, interleaved with
//!   control frames, random masks) decode to exactly those messages, in any chunking.
//! - Server frames (`encode_frame`, `encode_close`) parse back with tungstenite's header
//!   parser to the same opcode, FIN and payload.
//!
//! Limits are small (at most 4 KiB, 64 fragments) so that the fuzzer reaches them.

#![no_main]

use std::io::Cursor;
use std::ops::ControlFlow;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use syncgate::ws::close::{is_valid_close_code, truncate_reason, DecodeError};
use syncgate::ws::frame::{
    encode_client_frame, encode_close, encode_frame, Decoder, DecoderLimits,
};
use syncgate::ws::frame::{Event, OpCode};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode as WireOpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Largest control frame payload (RFC 6455 5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;
/// Longest client frame header: 2 bytes, 8 of length, 4 of mask.
const MAX_CLIENT_HEADER: usize = 14;

#[derive(Debug, Arbitrary)]
struct Input {
    /// Decoder limits, reduced to small values in `limits()`.
    max_message_bytes: u16,
    max_fragments: u8,
    allow_rsv1: bool,
    /// Where the stream is cut into reads: each entry is the length of the next read.
    cuts: Vec<u16>,
    /// Which half of the target runs.
    case: Case,
}

#[derive(Debug, Arbitrary)]
enum Case {
    /// Arbitrary bytes as a client would send them.
    Raw(Vec<u8>),
    /// Well-formed messages to encode and decode again.
    RoundTrip(Vec<Message>),
    /// A server frame to encode and parse.
    Server { opcode: u8, payload: Vec<u8>, close: Option<(u16, String)> },
}

#[derive(Debug, Arbitrary)]
enum Message {
    Data {
        text: bool,
        /// Used as is for binary; made into UTF-8 (lossily) for text.
        payload: Vec<u8>,
        /// Fragment sizes; the rest of the payload goes in the last fragment.
        fragments: Vec<u8>,
        /// Control frames sent between the fragments (one after each fragment but the last).
        interleaved: Vec<Control2>,
        compressed: bool,
        mask: [u8; 4],
    },
    Control(Control2),
}

#[derive(Debug, Arbitrary, Clone)]
struct Control2 {
    ping: bool,
    payload: Vec<u8>,
    mask: [u8; 4],
}

/// An owned copy of an event, so event sequences can be compared.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Text(Vec<u8>, bool),
    Binary(Vec<u8>, bool),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

fn own(event: &Event<'_>) -> Ev {
    match event {
        Event::Text { payload, compressed } => Ev::Text(payload.to_vec(), *compressed),
        Event::Binary { payload, compressed } => Ev::Binary(payload.to_vec(), *compressed),
        Event::Ping(p) => Ev::Ping(p.to_vec()),
        Event::Pong(p) => Ev::Pong(p.to_vec()),
        Event::Close(c) => Ev::Close(c.map(|(code, reason)| (code, reason.to_string()))),
    }
}

fn limits(input: &Input) -> DecoderLimits {
    DecoderLimits {
        max_message_bytes: usize::from(input.max_message_bytes % 4097),
        max_fragments: usize::from(input.max_fragments % 64) + 1,
        allow_rsv1: input.allow_rsv1,
        server_frames: false,
    }
}

/// Feeds `stream` in reads of the lengths in `cuts` (the rest in one last read), checking the
/// per-event and per-read invariants. Returns the events and the error, if any.
fn decode(stream: &[u8], cuts: &[u16], limits: DecoderLimits) -> (Vec<Ev>, Option<DecodeError>) {
    let mut decoder = Decoder::new(limits);
    let mut events = Vec::new();
    let mut rest = stream.to_vec();
    let mut cuts = cuts.iter();
    let mut ended = false;
    while !rest.is_empty() {
        let take = cuts.next().map_or(rest.len(), |&n| usize::from(n).min(rest.len()));
        let mut read: Vec<u8> = rest.drain(..take).collect();
        let result = decoder.feed(&mut read, &mut |event| {
            assert!(!ended, "an event after the close event: {event:?}");
            check_event(&event, limits);
            if matches!(event, Event::Close(_)) {
                ended = true;
            }
            events.push(own(&event));
            ControlFlow::Continue(())
        });
        if let Err(e) = result {
            assert!(decoder.is_closed(), "the decoder goes on after an error");
            assert!(matches!(e.close_code(), 1002 | 1007 | 1008 | 1009), "{e:?}");
            return (events, Some(e));
        }
        assert_eq!(ended, decoder.is_closed(), "closed iff a close event was delivered");
        // Fragments so far, a cut control frame and a cut header at most.
        let bound = limits.max_message_bytes + MAX_CONTROL_PAYLOAD + MAX_CLIENT_HEADER;
        assert!(decoder.buffered_bytes() <= bound, "{} held", decoder.buffered_bytes());
        decoder.shrink();
    }
    (events, None)
}

fn check_event(event: &Event<'_>, limits: DecoderLimits) {
    match event {
        Event::Text { payload, compressed } | Event::Binary { payload, compressed } => {
            assert!(payload.len() <= limits.max_message_bytes, "{} bytes", payload.len());
            assert!(!*compressed || limits.allow_rsv1, "RSV1 without the extension");
            if let Event::Text { compressed: false, .. } = event {
                assert!(std::str::from_utf8(payload).is_ok(), "text that is not UTF-8");
            }
        }
        Event::Ping(p) | Event::Pong(p) => assert!(p.len() <= MAX_CONTROL_PAYLOAD),
        Event::Close(Some((code, reason))) => {
            assert!(is_valid_close_code(*code), "close code {code}");
            assert!(reason.len() <= MAX_CONTROL_PAYLOAD - 2);
        }
        Event::Close(None) => {}
    }
}

fn raw(input: &Input, bytes: &[u8]) {
    let limits = limits(input);
    let whole = decode(bytes, &[], limits);
    let chunked = decode(bytes, &input.cuts, limits);
    assert_eq!(whole, chunked, "the same bytes decode differently when cut into reads");
}

fn control_frame(out: &mut Vec<u8>, expected: &mut Vec<Ev>, c: &Control2) {
    let payload = &c.payload[..c.payload.len().min(MAX_CONTROL_PAYLOAD)];
    let opcode = if c.ping { OpCode::Ping } else { OpCode::Pong };
    encode_client_frame(out, opcode, payload, c.mask, true, false);
    expected.push(if c.ping { Ev::Ping(payload.to_vec()) } else { Ev::Pong(payload.to_vec()) });
}

fn round_trip(input: &Input, messages: &[Message]) {
    let limits = limits(input);
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    for message in messages {
        match message {
            Message::Control(c) => control_frame(&mut stream, &mut expected, c),
            Message::Data { text, payload, fragments, interleaved, compressed, mask } => {
                let compressed = *compressed && limits.allow_rsv1;
                let mut payload = if *text && !compressed {
                    String::from_utf8_lossy(payload).into_owned().into_bytes()
                } else {
                    payload.clone()
                };
                // Keep within the limit, on a character boundary for text.
                let mut len = payload.len().min(limits.max_message_bytes);
                if *text && !compressed {
                    let s = std::str::from_utf8(&payload).expect("made UTF-8 above");
                    while !s.is_char_boundary(len) {
                        len -= 1;
                    }
                }
                payload.truncate(len);
                // Split into fragments (a fragment may be empty), at most max_fragments.
                let mut pieces = Vec::new();
                let mut at = 0;
                for &size in fragments.iter().take(limits.max_fragments - 1) {
                    let end = (at + usize::from(size)).min(payload.len());
                    pieces.push(&payload[at..end]);
                    at = end;
                }
                pieces.push(&payload[at..]);
                let last = pieces.len() - 1;
                let mut interleaved = interleaved.iter();
                for (i, piece) in pieces.iter().enumerate() {
                    let opcode = match (i, *text) {
                        (0, true) => OpCode::Text,
                        (0, false) => OpCode::Binary,
                        _ => OpCode::Continuation,
                    };
                    let rsv1 = i == 0 && compressed;
                    encode_client_frame(&mut stream, opcode, piece, *mask, i == last, rsv1);
                    if i < last {
                        if let Some(c) = interleaved.next() {
                            control_frame(&mut stream, &mut expected, c);
                        }
                    }
                }
                expected.push(if *text {
                    Ev::Text(payload, compressed)
                } else {
                    Ev::Binary(payload, compressed)
                });
            }
        }
    }
    // End with a close frame, so the end of the stream is an event too.
    let reason = truncate_reason("round trip ✓");
    let mut close = 1000u16.to_be_bytes().to_vec();
    close.extend_from_slice(reason.as_bytes());
    encode_client_frame(&mut stream, OpCode::Close, &close, [9, 8, 7, 6], true, false);
    expected.push(Ev::Close(Some((1000, reason.to_string()))));

    let (events, error) = decode(&stream, &input.cuts, limits);
    assert_eq!(error, None, "well-formed frames refused");
    assert_eq!(events, expected, "decoded events differ from what was encoded");
}

fn server(opcode: u8, payload: &[u8], close: &Option<(u16, String)>) {
    let mut out = Vec::new();
    let (wire, expected_payload) = match close {
        Some((code, reason)) => {
            encode_close(&mut out, *code, reason);
            let reason = truncate_reason(reason);
            let mut p = code.to_be_bytes().to_vec();
            p.extend_from_slice(reason.as_bytes());
            (WireOpCode::Control(Control::Close), p)
        }
        None => {
            let (op, wire, limit) = match opcode % 5 {
                0 => (OpCode::Text, WireOpCode::Data(Data::Text), usize::MAX),
                1 => (OpCode::Binary, WireOpCode::Data(Data::Binary), usize::MAX),
                2 => (OpCode::Continuation, WireOpCode::Data(Data::Continue), usize::MAX),
                3 => (OpCode::Ping, WireOpCode::Control(Control::Ping), MAX_CONTROL_PAYLOAD),
                _ => (OpCode::Pong, WireOpCode::Control(Control::Pong), MAX_CONTROL_PAYLOAD),
            };
            // encode_frame's contract: control payloads fit a control frame.
            let payload = &payload[..payload.len().min(limit)];
            encode_frame(&mut out, op, payload, false);
            (wire, payload.to_vec())
        }
    };
    let mut cursor = Cursor::new(&out[..]);
    let (header, len) = FrameHeader::parse(&mut cursor).expect("valid").expect("complete");
    assert!(header.is_final && header.mask.is_none() && !header.rsv1);
    assert_eq!(header.opcode, wire);
    let start = cursor.position() as usize;
    assert_eq!(len as usize, out.len() - start, "declared length differs from the payload");
    assert_eq!(&out[start..], &expected_payload[..]);
    if matches!(wire, WireOpCode::Control(_)) {
        assert!(out.len() - start <= MAX_CONTROL_PAYLOAD, "control frame over 125 bytes");
    }
}

fuzz_target!(|input: Input| {
    match &input.case {
        Case::Raw(bytes) => raw(&input, bytes),
        Case::RoundTrip(messages) => round_trip(&input, messages),
        Case::Server { opcode, payload, close } => server(*opcode, payload, close),
    }
});
