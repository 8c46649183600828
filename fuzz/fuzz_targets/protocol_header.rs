//! Fuzzes the protocol layer's two parsers of client input: `decode_protocol_header` (the
//! `Sec-WebSocket-Protocol` value, percent-encoded base64 of JSON) and `parse_upstream` (one
//! upstream text message, parsed in place by simd-json).
//!
//! Properties, beyond "never panics":
//! - A decoded header round-trips: encoding its init message and token the way the client
//!   does and decoding again gives the same header back.
//! - The init message a header carries is what the worker then feeds to `parse_upstream`;
//!   that is done here too.
//! - Values over `MAX_PROTOCOL_HEADER_LEN` are refused before any work.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use syncgate::protocol::{
    decode_protocol_header, encode_protocol_header, parse_upstream, HeaderError,
    MAX_PROTOCOL_HEADER_LEN,
};

#[derive(Debug, Arbitrary)]
enum Input {
    /// A header value as it arrives (the head parser only passes UTF-8 values on).
    Header(String),
    /// A header built the way the client builds it, from JSON bytes and a token, so the
    /// fuzzer gets past base64 quickly and exercises the JSON side.
    Encoded { init: Vec<u8>, token: Option<String> },
    /// One upstream text frame.
    Upstream(Vec<u8>),
}

fn header(value: &str) {
    let decoded = decode_protocol_header(value);
    if value.len() > MAX_PROTOCOL_HEADER_LEN {
        assert_eq!(decoded, Err(HeaderError::TooLong { len: value.len() }));
        return;
    }
    let Ok(decoded) = decoded else {
        return;
    };
    if let Some(token) = &decoded.auth_token {
        assert!(!token.is_empty(), "an empty token means no token");
    }
    let init = decoded.init_connection.as_deref().map(|json| {
        std::str::from_utf8(json).expect("init_connection is serialised JSON, so UTF-8")
    });
    let again =
        decode_protocol_header(&encode_protocol_header(init, decoded.auth_token.as_deref()))
            .expect("a re-encoded header decodes");
    assert_eq!(again, decoded, "header does not round-trip");

    if let Some(init) = &decoded.init_connection {
        let mut json = init.clone();
        let _ = parse_upstream(&mut json);
    }
}

fuzz_target!(|input: Input| match input {
    Input::Header(value) => header(&value),
    Input::Encoded { init, token } => {
        // encode_protocol_header inserts `init` as is: its contract is valid JSON.
        let init = std::str::from_utf8(&init).ok().filter(|s| is_json(s));
        header(&encode_protocol_header(init, token.as_deref()));
    }
    Input::Upstream(mut bytes) => {
        let _ = parse_upstream(&mut bytes);
    }
});

/// Whether `text` is one JSON value, as the client's `JSON.stringify` output always is.
fn is_json(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text).is_ok()
}
