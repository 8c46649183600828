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
use serde::de::{Deserializer as _, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::messages::check_depth;

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
pub(crate) const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
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
    let json = BASE64_LENIENT.decode(base64).map_err(|_| HeaderError::NotBase64)?;
    let json = simdutf8::basic::from_utf8(&json)
        .map_err(|_| HeaderError::BadJson("invalid JSON: not UTF-8".to_string()))?;
    check_depth(json.as_bytes()).map_err(HeaderError::BadJson)?;
    let mut de = serde_json::Deserializer::from_str(json);
    let fields = (&mut de)
        .deserialize_map(FieldsVisitor)
        .and_then(|fields| de.end().map(|()| fields))
        .map_err(|e| HeaderError::BadJson(format!("invalid JSON: {e}")))?;
    let init_connection =
        fields.init.filter(|raw| raw.get() != "null").map(|raw| raw.get().as_bytes().to_vec());
    let auth_token = match fields.token {
        None | Some(Value::Null) => None,
        Some(Value::String(token)) if token.is_empty() => None,
        Some(Value::String(token)) => Some(token),
        Some(_) => return Err(HeaderError::BadJson("authToken must be a string".to_string())),
    };
    Ok(ProtocolHeader { init_connection, auth_token })
}

/// The two members syncgate reads, each the last of its name (as `JSON.parse` keeps it).
/// `initConnectionMessage` stays text: it is parsed once, as the first upstream message;
/// building a tree of it here only to print it again was most of a connect's JSON work.
struct Fields<'a> {
    init: Option<&'a RawValue>,
    token: Option<Value>,
}

/// Reads the header's object member by member; members of other names are skipped
/// unparsed, as zero-cache ignores them.
struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
        let mut fields = Fields { init: None, token: None };
        while let Some(name) = map.next_key::<Name>()? {
            match name {
                Name::InitConnectionMessage => fields.init = Some(map.next_value()?),
                Name::AuthToken => fields.token = Some(map.next_value()?),
                Name::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(fields)
    }
}

/// A member name of the header's object.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "camelCase")]
enum Name {
    InitConnectionMessage,
    AuthToken,
    #[serde(other)]
    Other,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::messages::{parse_upstream, Upstream};
    use serde_json::json;

    /// The raw header value the 1.9.0 client sent on its first connect.
    const CAPTURED_VALUE: &str = "eyJpbml0Q29ubmVjdGlvbk1lc3NhZ2UiOlsiaW5pdENvbm5lY3Rpb24iLHsiZGVzaXJlZFF1ZXJpZXNQYXRjaCI6W10sImNsaWVudFNjaGVtYSI6eyJ0YWJsZXMiOnsiaXNzdWUiOnsiY29sdW1ucyI6eyJpZCI6eyJ0eXBlIjoic3RyaW5nIn0sInRpdGxlIjp7InR5cGUiOiJzdHJpbmcifX0sInByaW1hcnlLZXkiOlsiaWQiXX19fSwiYWN0aXZlQ2xpZW50cyI6WyJqdnA4a2tsNG5nODZxOHVoaTAiXX1dfQ%3D%3D";

    /// The `initConnectionMessage` inside [`CAPTURED_VALUE`].
    const CAPTURED_INIT: &str = r#"["initConnection",{"desiredQueriesPatch":[],"clientSchema":{"tables":{"issue":{"columns":{"id":{"type":"string"},"title":{"type":"string"}},"primaryKey":["id"]}}},"activeClients":["jvp8kkl4ng86q8uhi0"]}]"#;

    /// The other decoded headers of the capture.
    const CAPTURED_JSON: &[&str] = &[
        r#"{"initConnectionMessage":["initConnection",{"desiredQueriesPatch":[{"op":"put","hash":"19040arbgigdy","ast":{"table":"issue","where":{"type":"simple","left":{"type":"column","name":"title"},"right":{"type":"literal","value":"x"},"op":"="},"limit":10,"orderBy":[["id","desc"]]},"ttl":300000}],"clientSchema":{"tables":{"issue":{"columns":{"id":{"type":"string"},"title":{"type":"string"}},"primaryKey":["id"]}}},"activeClients":["2vpg7mim73a9d946ve"]}]}"#,
        r#"{"authToken":"tok123"}"#,
        r#"{"initConnectionMessage":["initConnection",{"desiredQueriesPatch":[],"clientSchema":{"tables":{"issue":{"columns":{"id":{"type":"string"},"title":{"type":"string"}},"primaryKey":["id"]}}},"activeClients":["e1skvd2fqie5aftv7f"]}],"authToken":"tok1"}"#,
        r#"{"initConnectionMessage":["initConnection",{"desiredQueriesPatch":[],"activeClients":["e1skvd2fqie5aftv7f"]}],"authToken":"newtoken"}"#,
    ];

    /// Encodes arbitrary JSON text the way the client encodes its header.
    fn encode_json(json: &str) -> String {
        utf8_percent_encode(&BASE64_PADDED.encode(json), URI_COMPONENT).to_string()
    }

    fn init_value(header: &ProtocolHeader) -> serde_json::Value {
        serde_json::from_slice(header.init_connection.as_ref().unwrap()).unwrap()
    }

    #[test]
    fn the_captured_value_decodes_to_a_parsable_init_connection() {
        let header = decode_protocol_header(CAPTURED_VALUE).unwrap();
        assert_eq!(header.auth_token, None);
        let expected: serde_json::Value = serde_json::from_str(CAPTURED_INIT).unwrap();
        assert_eq!(init_value(&header), expected);
        let mut init = header.init_connection.unwrap();
        assert!(matches!(parse_upstream(&mut init), Ok(Upstream::InitConnection(_))));
    }

    #[test]
    fn encoding_matches_the_client_byte_for_byte() {
        assert_eq!(encode_protocol_header(Some(CAPTURED_INIT), None), CAPTURED_VALUE);
    }

    #[test]
    fn every_captured_header_decodes() {
        let tokens: Vec<Option<String>> = CAPTURED_JSON
            .iter()
            .map(|json| {
                let header = decode_protocol_header(&encode_json(json)).unwrap();
                if let Some(mut init) = header.init_connection.clone() {
                    parse_upstream(&mut init).unwrap();
                }
                header.auth_token
            })
            .collect();
        assert_eq!(
            tokens,
            [None, Some("tok123".into()), Some("tok1".into()), Some("newtoken".into())]
        );
        let token_only = decode_protocol_header(&encode_json(CAPTURED_JSON[1])).unwrap();
        assert_eq!(token_only.init_connection, None);
    }

    #[test]
    fn round_trips_through_encode() {
        let init = r#"["initConnection",{"desiredQueriesPatch":[],"activeClients":["ü→\"x"]}]"#;
        let header =
            decode_protocol_header(&encode_protocol_header(Some(init), Some("a.b+c/="))).unwrap();
        assert_eq!(header.auth_token.as_deref(), Some("a.b+c/="));
        assert_eq!(init_value(&header), serde_json::from_str::<serde_json::Value>(init).unwrap());
        let none = decode_protocol_header(&encode_protocol_header(None, None)).unwrap();
        assert_eq!(none, ProtocolHeader { init_connection: None, auth_token: None });
    }

    #[test]
    fn empty_or_null_token_means_no_token() {
        for json in [r#"{"authToken":""}"#, r#"{"authToken":null}"#, "{}"] {
            assert_eq!(decode_protocol_header(&encode_json(json)).unwrap().auth_token, None);
        }
        let null_init = decode_protocol_header(&encode_json(r#"{"initConnectionMessage":null}"#));
        assert_eq!(null_init.unwrap().init_connection, None);
    }

    #[test]
    fn missing_padding_and_unescaped_base64_are_accepted() {
        let unpadded = CAPTURED_VALUE.trim_end_matches("%3D");
        assert_eq!(
            decode_protocol_header(unpadded).unwrap(),
            decode_protocol_header(CAPTURED_VALUE).unwrap()
        );
        let raw = BASE64_PADDED.encode(r#"{"authToken":"t"}"#);
        assert_eq!(decode_protocol_header(&raw).unwrap().auth_token.as_deref(), Some("t"));
    }

    #[test]
    fn the_last_member_of_a_name_wins_as_in_json_parse() {
        let json = r#"{"authToken":5,"initConnectionMessage":[1],"authToken":"t",
            "initConnectionMessage" : ["initConnection", {"desiredQueriesPatch": []}] }"#;
        let header = decode_protocol_header(&encode_json(json)).unwrap();
        assert_eq!(header.auth_token.as_deref(), Some("t"));
        let mut init = header.init_connection.unwrap();
        assert!(matches!(parse_upstream(&mut init), Ok(Upstream::InitConnection(_))));
        let init_dropped = r#"{"initConnectionMessage":[1],"initConnectionMessage":null}"#;
        let header = decode_protocol_header(&encode_json(init_dropped)).unwrap();
        assert_eq!(header.init_connection, None);
    }

    #[test]
    fn unknown_keys_are_ignored_like_zero_cache_does() {
        let header = decode_protocol_header(&encode_json(r#"{"authToken":"t","other":[1]}"#));
        assert_eq!(header.unwrap().auth_token.as_deref(), Some("t"));
    }

    #[test]
    fn malformed_values_are_refused() {
        assert_eq!(
            decode_protocol_header(&"A".repeat(MAX_PROTOCOL_HEADER_LEN + 1)),
            Err(HeaderError::TooLong { len: MAX_PROTOCOL_HEADER_LEN + 1 })
        );
        assert_eq!(decode_protocol_header("not base64!"), Err(HeaderError::NotBase64));
        assert_eq!(decode_protocol_header("%ZZ"), Err(HeaderError::NotBase64));
        for json in [
            "not json",
            "[1,2]",
            r#""text""#,
            r#"{"authToken":5}"#,
            r#"{"authToken":"t""#,
            r#"{"authToken":"t"} {}"#,
            r#"{"initConnectionMessage":[1,}"#,
            r#"{"other":[1,}"#,
        ] {
            let error = decode_protocol_header(&encode_json(json)).unwrap_err();
            assert!(matches!(error, HeaderError::BadJson(_)), "{json}: {error:?}");
        }
        let deep = format!(r#"{{"initConnectionMessage":{}}}"#, "[".repeat(10_000));
        assert!(matches!(
            decode_protocol_header(&encode_json(&deep)),
            Err(HeaderError::BadJson(_))
        ));
        let not_utf8 =
            utf8_percent_encode(&BASE64_PADDED.encode(b"{\"authToken\":\"\xff\"}"), URI_COMPONENT)
                .to_string();
        assert!(matches!(decode_protocol_header(&not_utf8), Err(HeaderError::BadJson(_))));
    }

    #[test]
    fn an_eight_kib_header_decodes() {
        let queries: Vec<serde_json::Value> = (0..100)
            .map(|i| json!({"op": "put", "hash": format!("hash{i:08}"), "ast": {"table": "issue"}, "ttl": 300000}))
            .collect();
        let init = json!(["initConnection", {"desiredQueriesPatch": queries}]).to_string();
        let value = encode_protocol_header(Some(&init), Some(&"t".repeat(1000)));
        assert!(value.len() > 8 * 1024, "{}", value.len());
        let header = decode_protocol_header(&value).unwrap();
        assert_eq!(header.auth_token.unwrap().len(), 1000);
    }
}
