//! Close codes, close-frame payloads (RFC 6455 sections 5.5.1 and 7.4) and the error a frame
//! decoder reports.
//!
//! A peer's close payload is either empty or a 2-byte big-endian code followed by a UTF-8
//! reason. Only some codes may travel on the wire; the others are reserved or mean something
//! that only an endpoint may conclude locally (1005, 1006, 1015), so receiving one is a
//! protocol error. `DecodeError` lives here because every way of failing to decode a peer's
//! bytes maps to the close code the server answers with.

use std::fmt;

/// Normal closure.
pub const NORMAL: u16 = 1000;
/// The server is shutting down.
pub const GOING_AWAY: u16 = 1001;
/// The peer broke the protocol.
pub const PROTOCOL_ERROR: u16 = 1002;
/// A text message (or close reason) was not UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;
/// A limit other than the message size was exceeded.
pub const POLICY_VIOLATION: u16 = 1008;
/// A message was larger than the configured limit.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// The server failed for a reason of its own.
pub const INTERNAL_ERROR: u16 = 1011;
/// The server is restarting (a graceful replacement's drain ended) or the client's state
/// moved: reconnect.
pub const SERVICE_RESTART: u16 = 1012;
/// Authentication failed or names the wrong user: the registered code zero-cache uses too,
/// which the Zero client reads as "wait for new credentials", not "retry now".
pub const UNAUTHORIZED: u16 = 3000;

/// A close reason may use what is left of the 125-byte control payload after the 2-byte code.
pub const MAX_REASON_BYTES: usize = 123;

/// Why the bytes a peer sent cannot be accepted. Small and `Copy` because it is returned on
/// the receive path; the caller closes the connection with `close_code()` and `reason()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// A framing rule of RFC 6455 was broken (close 1002); the text says which.
    Protocol(&'static str),
    /// A text message or close reason was not valid UTF-8 (close 1007).
    InvalidUtf8,
    /// A message declared or accumulated more bytes than the limit allows (close 1009).
    MessageTooBig,
    /// A limit other than size was exceeded, such as too many fragments (close 1008).
    Policy(&'static str),
}

impl DecodeError {
    /// The close code to send before dropping the connection.
    pub fn close_code(&self) -> u16 {
        match self {
            DecodeError::Protocol(_) => PROTOCOL_ERROR,
            DecodeError::InvalidUtf8 => INVALID_PAYLOAD,
            DecodeError::MessageTooBig => MESSAGE_TOO_BIG,
            DecodeError::Policy(_) => POLICY_VIOLATION,
        }
    }

    /// A short reason for the close frame and the logs.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Protocol(why) | DecodeError::Policy(why) => why,
            DecodeError::InvalidUtf8 => "invalid UTF-8",
            DecodeError::MessageTooBig => "message too big",
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason(), self.close_code())
    }
}

impl std::error::Error for DecodeError {}

/// Whether a peer may send `code` in a close frame (RFC 6455 section 7.4): the defined codes
/// other than 1004 (reserved) and 1005/1006 (never sent), and the ranges for libraries
/// (3000-3999) and applications (4000-4999). Later IANA registrations (1012-1015) are refused.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// Validates the payload of a close frame received from a peer.
///
/// Returns `None` for an empty payload (no code given), or the code and reason.
pub fn parse_close_payload(p: &[u8]) -> Result<Option<(u16, &str)>, DecodeError> {
    match p {
        [] => Ok(None),
        [_] => Err(DecodeError::Protocol("close payload of one byte")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(DecodeError::Protocol("invalid close code"));
            }
            let reason =
                simdutf8::basic::from_utf8(reason).map_err(|_| DecodeError::InvalidUtf8)?;
            Ok(Some((code, reason)))
        }
    }
}

/// Cuts `s` to at most `MAX_REASON_BYTES` bytes without splitting a character, so any reason
/// fits a close frame.
pub fn truncate_reason(s: &str) -> &str {
    if s.len() <= MAX_REASON_BYTES {
        return s;
    }
    let mut end = MAX_REASON_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_payload_has_no_code() {
        assert_eq!(parse_close_payload(&[]), Ok(None));
    }

    #[test]
    fn one_byte_payload_is_a_protocol_error() {
        let err = parse_close_payload(&[0x03]).unwrap_err();
        assert_eq!(err.close_code(), 1002);
    }

    #[test]
    fn code_and_reason_are_returned() {
        assert_eq!(parse_close_payload(&[0x03, 0xe8]), Ok(Some((1000, ""))));
        assert_eq!(parse_close_payload(b"\x0f\xa0caf\xc3\xa9"), Ok(Some((4000, "caf\u{e9}"))));
    }

    #[test]
    fn receivable_codes() {
        let valid = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999];
        for code in valid {
            assert!(is_valid_close_code(code), "{code}");
            let p = code.to_be_bytes();
            assert_eq!(parse_close_payload(&p), Ok(Some((code, ""))));
        }
        // The invalid codes Autobahn sends (case 7.9.x) plus the edges of each range.
        let invalid = [0, 999, 1004, 1005, 1006, 1012, 1015, 1016, 1100, 2000, 2999, 5000, 65535];
        for code in invalid {
            assert!(!is_valid_close_code(code), "{code}");
            let err = parse_close_payload(&code.to_be_bytes()).unwrap_err();
            assert_eq!(err.close_code(), 1002, "{code}");
        }
    }

    #[test]
    fn reason_must_be_utf8() {
        // Autobahn 7.5.1: a UTF-16 surrogate encoded in UTF-8 inside the reason.
        let mut p = vec![0x03, 0xe8];
        p.extend_from_slice(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited");
        let err = parse_close_payload(&p).unwrap_err();
        assert_eq!(err, DecodeError::InvalidUtf8);
        assert_eq!(err.close_code(), 1007);
    }

    #[test]
    fn error_codes_and_reasons() {
        assert_eq!(DecodeError::Protocol("x").close_code(), 1002);
        assert_eq!(DecodeError::InvalidUtf8.close_code(), 1007);
        assert_eq!(DecodeError::Policy("y").close_code(), 1008);
        assert_eq!(DecodeError::MessageTooBig.close_code(), 1009);
        assert_eq!(DecodeError::Protocol("x").reason(), "x");
        assert_eq!(DecodeError::Policy("y").reason(), "y");
        assert_eq!(DecodeError::MessageTooBig.to_string(), "message too big (1009)");
    }

    #[test]
    fn truncate_reason_keeps_short_reasons() {
        assert_eq!(truncate_reason(""), "");
        let exact = "a".repeat(MAX_REASON_BYTES);
        assert_eq!(truncate_reason(&exact), exact);
    }

    #[test]
    fn truncate_reason_cuts_on_a_char_boundary() {
        let long = "b".repeat(200);
        assert_eq!(truncate_reason(&long).len(), MAX_REASON_BYTES);
        // 122 ASCII bytes then a 3-byte character that would end at byte 125: it must go.
        let s = format!("{}\u{20ac}tail", "c".repeat(122));
        let cut = truncate_reason(&s);
        assert_eq!(cut, "c".repeat(122));
        // 3-byte characters: 123 is a multiple of 3, so the cut falls exactly at the limit.
        let euros = "\u{20ac}".repeat(60);
        let cut = truncate_reason(&euros);
        assert_eq!(cut.len(), 123);
        assert!(cut.chars().all(|c| c == '\u{20ac}'));
        let pounds = "\u{a3}".repeat(70); // 2-byte characters: 123 is odd, so 122 is kept
        assert_eq!(truncate_reason(&pounds).len(), 122);
    }
}
