//! Fuzzes `syncgate::ws::deflate` (permessage-deflate, RFC 7692): the handshake negotiation over
//! arbitrary `Sec-WebSocket-Extensions` values, the inflater over arbitrary (hostile) data,
//! and a compress/decompress round trip of message sequences.
//!
//! Properties, beyond "never panics":
//! - An agreement stays within the configuration: window bits in range and never above
//!   what the server allows, no context takeover unless dedicated contexts are on and the
//!   budget has room, dedicated bytes within `max_dedicated_bytes`, and a response that is a
//!   plain header value (visible ASCII and spaces).
//! - Inflating never grows the output past `max_output` (not even its capacity: the bomb
//!   limit is about memory), and a failed inflate leaves the output as it was.
//! - Round trip: every message deflated then inflated comes back unchanged, with and without
//!   context takeover, for every window size and level; one byte less of room is TooBig.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use syncgate::ws::deflate::{negotiate, CompressionConfig, Deflater, InflateError, Inflater};

#[derive(Debug, Arbitrary)]
enum Input {
    Negotiate {
        offers: String,
        server_max_window_bits: u8,
        client_max_window_bits: u8,
        context_takeover: bool,
        dedicated_available: bool,
    },
    Inflate {
        data: Vec<u8>,
        max_output: u16,
        window_bits: u8,
        no_context_takeover: bool,
        /// Bytes already in the output buffer (the inflater appends).
        prefix: u8,
        /// Inflate the same data twice on the same context.
        twice: bool,
    },
    RoundTrip {
        messages: Vec<Vec<u8>>,
        window_bits: u8,
        level: u8,
        no_context_takeover: bool,
    },
}

/// 9..=15, the windows zlib can compress with.
fn zlib_bits(b: u8) -> u8 {
    9 + b % 7
}

fn negotiation(offers: &str, server: u8, client: u8, takeover: bool, available: bool) {
    let cfg = CompressionConfig {
        enabled: true,
        server_max_window_bits: zlib_bits(server),
        client_max_window_bits: zlib_bits(client),
        context_takeover: takeover,
        ..CompressionConfig::default()
    };
    cfg.validate().expect("the fuzzed configuration is valid");
    let Some(a) = negotiate(offers, &cfg, available) else {
        return;
    };
    assert!(a.response.starts_with("permessage-deflate"), "{:?}", a.response);
    assert!(a.response.bytes().all(|b| b == b' ' || b.is_ascii_graphic()), "{:?}", a.response);
    assert!((9..=cfg.server_max_window_bits).contains(&a.server_window_bits), "{a:?}");
    assert!((8..=15).contains(&a.client_window_bits), "{a:?}");
    if !(takeover && available) {
        assert!(a.server_no_context_takeover && a.client_no_context_takeover, "{a:?}");
    }
    assert!(a.dedicated_bytes() <= cfg.max_dedicated_bytes(), "{a:?}");
    // What the agreement builds must be usable both ways, one message each: the server's
    // compressor against a client inflating with the agreed window, and a client compressing
    // with its agreed window (zlib's smallest is 9) against the server's decompressor.
    let message = offers.as_bytes();
    let mut server_out = a
        .dedicated_deflater(cfg.level)
        .unwrap_or_else(|| Deflater::new(a.server_window_bits, cfg.level, true));
    let mut client_in = Inflater::new(a.server_window_bits, true);
    check_pair(&mut server_out, &mut client_in, message);
    let mut client_out = Deflater::new(a.client_window_bits.max(9), cfg.level, true);
    let mut server_in = a.dedicated_inflater().unwrap_or_else(|| Inflater::new(15, true));
    check_pair(&mut client_out, &mut server_in, message);
}

fn check_pair(deflater: &mut Deflater, inflater: &mut Inflater, message: &[u8]) {
    let mut packed = Vec::new();
    deflater.deflate(message, &mut packed).expect("deflate refused a message");
    let mut unpacked = Vec::new();
    inflater.inflate(&packed, message.len(), &mut unpacked).expect("inflate refused it");
    assert_eq!(unpacked, message, "round trip changed the message");
}

fn inflate_hostile(
    data: &[u8],
    max_output: usize,
    bits: u8,
    nct: bool,
    prefix: usize,
    twice: bool,
) {
    let mut inflater = Inflater::new(8 + bits % 8, nct);
    for _ in 0..if twice { 2 } else { 1 } {
        let mut out = Vec::with_capacity(prefix);
        out.resize(prefix, 0xAA);
        let result = inflater.inflate(data, max_output, &mut out);
        assert!(out[..prefix].iter().all(|&b| b == 0xAA), "the prefix was overwritten");
        match result {
            Ok(()) => assert!(out.len() - prefix <= max_output, "{} > {max_output}", out.len()),
            Err(_) => assert_eq!(out.len(), prefix, "a failed inflate left output behind"),
        }
        assert!(
            out.capacity() <= prefix + max_output,
            "capacity {} for a limit of {max_output} after {prefix} bytes",
            out.capacity()
        );
    }
}

fn round_trip(messages: &[Vec<u8>], bits: u8, level: u8, nct: bool) {
    let bits = zlib_bits(bits);
    let level = u32::from(level % 9) + 1;
    let mut deflater = Deflater::new(bits, level, nct);
    let mut inflater = Inflater::new(bits, nct);
    for message in messages {
        let mut packed = vec![0u8; 10]; // header room, as the connection leaves it
        deflater.deflate(message, &mut packed).expect("deflate refused a message");
        assert_eq!(&packed[..10], &[0u8; 10], "deflate touched the bytes before its output");
        let packed = &packed[10..];
        // RFC 7692 7.2.3.6: an empty message compresses to at least one byte (0x00). An empty
        // payload makes a client's zlib read the appended 00 00 ff ff as the start of a
        // stored block, and every later message on a context-takeover stream then fails.
        assert!(!packed.is_empty(), "empty compressed payload for {} bytes", message.len());
        if nct && !message.is_empty() {
            // Without context takeover each message stands alone, so a refused attempt
            // costs nothing and the same bytes inflate again afterwards.
            let mut short = Vec::new();
            let refused = inflater.inflate(packed, message.len() - 1, &mut short);
            assert_eq!(refused, Err(InflateError::TooBig), "one byte less room was enough");
        }
        let mut unpacked = Vec::new();
        inflater.inflate(packed, message.len(), &mut unpacked).expect("own output refused");
        assert_eq!(&unpacked, message, "round trip changed the message");
    }
}

fuzz_target!(|input: Input| match input {
    Input::Negotiate {
        offers,
        server_max_window_bits,
        client_max_window_bits,
        context_takeover,
        dedicated_available,
    } => negotiation(
        &offers,
        server_max_window_bits,
        client_max_window_bits,
        context_takeover,
        dedicated_available,
    ),
    Input::Inflate { data, max_output, window_bits, no_context_takeover, prefix, twice } => {
        inflate_hostile(
            &data,
            usize::from(max_output),
            window_bits,
            no_context_takeover,
            usize::from(prefix),
            twice,
        )
    }
    Input::RoundTrip { messages, window_bits, level, no_context_takeover } => {
        round_trip(&messages, window_bits, level, no_context_takeover)
    }
});
