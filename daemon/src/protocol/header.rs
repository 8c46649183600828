//! The `Sec-WebSocket-Protocol` header of a Zero connect request.
//!
//! Browsers cannot set other headers on a WebSocket, so the client smuggles
//! its auth token, and usually its first message, in the subprotocol:
//! `encodeURIComponent(base64(utf8(JSON.stringify({initConnectionMessage,
//! authToken}))))`, standard base64 alphabet with padding (zero-protocol's
//! `encodeSecProtocols`). zero-cache reverses it with `decodeURIComponent`,
//! `atob` and `JSON.parse`, ignores other keys, and hands the
//! `initConnectionMessage` on, re-serialized, as the first upstream message.
//!
//! The server must echo the header value verbatim in its 101 response; that
//! is the caller's job. The client leaves out `initConnectionMessage` when
//! the encoded value would pass 8 KiB and sends it as a message instead.

use std::fmt;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::{alphabet, Engine};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;

use super::messages::parse_json;

/// Longest header value we decode, in bytes.
///
/// The client keeps the value under about 8 KiB (it moves the init message
/// out of the header beyond that); 64 KiB leaves room for a large token
/// while bounding the work one request can ask for.
pub const MAX_PROTOCOL_HEADER_LEN: usize = 64 * 1024;

/// Base64 as `atob` reads it: standard alphabet, padding optional, stray
/// low bits in the last character ignored.
const BASE64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Base64 as `btoa` writes it: standard alphabet, padded.
const BASE64_PADDED: GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The bytes `encodeURIComponent` escapes: all but ASCII letters, digits and
/// `-_.!~*'()`.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// What the header carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolHeader {
    /// The JSON text of `initConnectionMessage`, to be parsed as the first
    /// upstream message; `None` when the client left it out (or sent null).
    pub init_connection: Option<Vec<u8>>,
    /// The auth token; `None` when absent, null or empty, all of which mean
    /// "no token".
    pub auth_token: Option<String>,
}

/// Why the header could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// The value is longer than [`MAX_PROTOCOL_HEADER_LEN`] bytes.
    TooLong {
        /// The length of the value.
        len: usize,
    },
    /// After percent-decoding, the value is not base64.
    NotBase64,
    /// The decoded bytes are not the expected JSON object.
    BadJson(String),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::TooLong { len } => write!(
                f,
                "Sec-WebSocket-Protocol is {len} bytes, more than {MAX_PROTOCOL_HEADER_LEN}"
            ),
            HeaderError::NotBase64 => f.write_str("Sec-WebSocket-Protocol is not base64"),
            HeaderError::BadJson(why) => write!(f, "Sec-WebSocket-Protocol: {why}"),
        }
    }
}

impl std::error::Error for HeaderError {}

/// Decodes a `Sec-WebSocket-Protocol` value sent by a Zero client.
pub fn decode_protocol_header(value: &str) -> Result<ProtocolHeader, HeaderError> {
    if value.len() > MAX_PROTOCOL_HEADER_LEN {
        return Err(HeaderError::TooLong { len: value.len() });
    }
    let base64: Vec<u8> = percent_decode_str(value.trim()).collect();
    let mut json = BASE64_LENIENT
        .decode(base64)
        .map_err(|_| HeaderError::NotBase64)?;
    let Value::Object(mut fields) = parse_json(&mut json).map_err(HeaderError::BadJson)? else {
        return Err(HeaderError::BadJson("expected a JSON object".to_string()));
    };
    let init_connection = match fields.remove("initConnectionMessage") {
        None | Some(Value::Null) => None,
        Some(message) => Some(
            serde_json::to_vec(&message)
                .map_err(|e| HeaderError::BadJson(format!("initConnectionMessage: {e}")))?,
        ),
    };
    let auth_token = match fields.remove("authToken") {
        None | Some(Value::Null) => None,
        Some(Value::String(token)) if token.is_empty() => None,
        Some(Value::String(token)) => Some(token),
        Some(_) => {
            return Err(HeaderError::BadJson(
                "authToken must be a string".to_string(),
            ))
        }
    };
    Ok(ProtocolHeader {
        init_connection,
        auth_token,
    })
}

/// Encodes a header value the way the client does, for tests and the load
/// client. `init` is the JSON text of an `initConnection` message and is
/// inserted as is, so it must be valid JSON.
pub fn encode_protocol_header(init: Option<&str>, token: Option<&str>) -> String {
    // JSON.stringify leaves out undefined fields; we do the same.
    let mut json = String::from("{");
    if let Some(init) = init {
        json.push_str("\"initConnectionMessage\":");
        json.push_str(init);
    }
    if let Some(token) = token {
        if init.is_some() {
            json.push(',');
        }
        json.push_str("\"authToken\":");
        json.push_str(&Value::from(token).to_string());
    }
    json.push('}');
    utf8_percent_encode(&BASE64_PADDED.encode(json), URI_COMPONENT).to_string()
}
