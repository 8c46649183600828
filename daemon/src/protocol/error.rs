//! The downstream `error` message: `["error", {kind, message, origin, ...}]`.
//!
//! The client validates downstream messages strictly (valita's default
//! mode), against a union of four body shapes chosen by `kind`
//! (zero-protocol's `error.ts`):
//!
//! - most kinds: `{kind, message, origin?}`;
//! - `Rebalance`, `Rehome`, `ServerOverloaded`: additionally
//!   `minBackoffMs?`, `maxBackoffMs?`, `reconnectParams?`;
//! - `PushFailed`: `{kind, message, origin, reason, mutationIDs, details?}`;
//! - `TransformFailed`: `{kind, message, origin, reason, queryIDs, details?}`.
//!
//! A field outside its kind's shape makes the client reject the whole
//! message, so [`ErrorBody`] writes each field only for the kinds that have
//! it. `origin` is optional in the schema but we always send `"zeroCache"`:
//! without it the client treats every error, auth errors included, as an
//! internal failure instead of reacting to its kind.

use std::collections::BTreeMap;

use serde::Serialize;

use super::messages::{write_json, MutationId};

/// The `origin` of every error we send: the sync server itself, as opposed
/// to the app's API server (`"server"`).
const ORIGIN_ZERO_CACHE: &str = "zeroCache";

/// The `reason` of a `PushFailed` or `TransformFailed` error raised by the
/// sync server. The schema requires one; `"internal"` is the one that claims
/// nothing about HTTP, timeouts or parsing.
const REASON_INTERNAL: &str = "internal";

/// What went wrong, as the client understands it; it decides how the client
/// reacts (wait for new auth, back off and reconnect, drop its local
/// database, or stop).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The token failed verification: the client waits for new credentials.
    AuthInvalidated,
    /// The server has no state for this client.
    ClientNotFound,
    /// The connect request was malformed.
    InvalidConnectionRequest,
    /// The client's `baseCookie` is ahead of the server: it drops its data.
    InvalidConnectionRequestBaseCookie,
    /// The client's `lmid` is ahead of the server: it drops its data.
    InvalidConnectionRequestLastMutationID,
    /// The client was deleted by the server.
    InvalidConnectionRequestClientDeleted,
    /// An upstream message failed validation.
    InvalidMessage,
    /// A push was invalid (e.g. for another client group).
    InvalidPush,
    /// A push could not be processed.
    PushFailed,
    /// A mutation failed.
    MutationFailed,
    /// Too many mutations: the client stays connected and pushes again later.
    MutationRateLimited,
    /// The server wants the client elsewhere: back off, reconnect.
    Rebalance,
    /// The client group moved: back off, reconnect.
    Rehome,
    /// A custom query could not be transformed.
    TransformFailed,
    /// No token, or one for another user: the client waits for credentials.
    Unauthorized,
    /// The sync protocol version is outside what the server supports.
    VersionNotSupported,
    /// The app schema version is not supported.
    SchemaVersionNotSupported,
    /// The server is too busy: back off, reconnect.
    ServerOverloaded,
    /// Anything else.
    Internal,
}

impl ErrorKind {
    /// Every kind, for tests and metrics.
    pub const ALL: [ErrorKind; 19] = [
        ErrorKind::AuthInvalidated,
        ErrorKind::ClientNotFound,
        ErrorKind::InvalidConnectionRequest,
        ErrorKind::InvalidConnectionRequestBaseCookie,
        ErrorKind::InvalidConnectionRequestLastMutationID,
        ErrorKind::InvalidConnectionRequestClientDeleted,
        ErrorKind::InvalidMessage,
        ErrorKind::InvalidPush,
        ErrorKind::PushFailed,
        ErrorKind::MutationFailed,
        ErrorKind::MutationRateLimited,
        ErrorKind::Rebalance,
        ErrorKind::Rehome,
        ErrorKind::TransformFailed,
        ErrorKind::Unauthorized,
        ErrorKind::VersionNotSupported,
        ErrorKind::SchemaVersionNotSupported,
        ErrorKind::ServerOverloaded,
        ErrorKind::Internal,
    ];

    /// The close code that follows an error of this kind when it ends the connection: the
    /// one mapping from kinds to codes, so that every refusal of the same kind closes alike
    /// wherever it is decided (listener, admission, connection, group sync).
    pub fn close_code(self) -> u16 {
        use crate::ws::close;
        match self {
            // zero-cache's code for both; the client then waits for credentials.
            ErrorKind::Unauthorized | ErrorKind::AuthInvalidated => close::UNAUTHORIZED,
            // A limit, not a broken protocol: the error message carries the backoff.
            ErrorKind::ServerOverloaded => close::POLICY_VIOLATION,
            ErrorKind::Internal => close::INTERNAL_ERROR,
            // The client's state moved or the server wants it elsewhere: reconnect.
            ErrorKind::Rehome | ErrorKind::Rebalance => close::SERVICE_RESTART,
            _ => close::PROTOCOL_ERROR,
        }
    }

    /// The kind as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::AuthInvalidated => "AuthInvalidated",
            ErrorKind::ClientNotFound => "ClientNotFound",
            ErrorKind::InvalidConnectionRequest => "InvalidConnectionRequest",
            ErrorKind::InvalidConnectionRequestBaseCookie => "InvalidConnectionRequestBaseCookie",
            ErrorKind::InvalidConnectionRequestLastMutationID => {
                "InvalidConnectionRequestLastMutationID"
            }
            ErrorKind::InvalidConnectionRequestClientDeleted => {
                "InvalidConnectionRequestClientDeleted"
            }
            ErrorKind::InvalidMessage => "InvalidMessage",
            ErrorKind::InvalidPush => "InvalidPush",
            ErrorKind::PushFailed => "PushFailed",
            ErrorKind::MutationFailed => "MutationFailed",
            ErrorKind::MutationRateLimited => "MutationRateLimited",
            ErrorKind::Rebalance => "Rebalance",
            ErrorKind::Rehome => "Rehome",
            ErrorKind::TransformFailed => "TransformFailed",
            ErrorKind::Unauthorized => "Unauthorized",
            ErrorKind::VersionNotSupported => "VersionNotSupported",
            ErrorKind::SchemaVersionNotSupported => "SchemaVersionNotSupported",
            ErrorKind::ServerOverloaded => "ServerOverloaded",
            ErrorKind::Internal => "Internal",
        }
    }

    /// Whether the body may carry a backoff window and reconnect parameters.
    pub fn is_backoff(self) -> bool {
        matches!(self, ErrorKind::Rebalance | ErrorKind::Rehome | ErrorKind::ServerOverloaded)
    }
}

/// The body of an `error` message.
///
/// Fields that do not belong to `kind`'s shape are left out when writing
/// (see the module documentation), so setting them is harmless.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorBody {
    /// Decides how the client reacts.
    pub kind: ErrorKind,
    /// Human-readable detail, logged by the client.
    pub message: String,
    /// Backoff kinds: the least time the client waits before reconnecting.
    pub min_backoff_ms: Option<u64>,
    /// Backoff kinds: the most time the client waits before reconnecting.
    pub max_backoff_ms: Option<u64>,
    /// Backoff kinds: query parameters the client adds to its next connect
    /// URL only.
    pub reconnect_params: Option<BTreeMap<String, String>>,
    /// `PushFailed` only: the mutations that failed (the schema requires the
    /// list, possibly empty).
    pub mutation_ids: Vec<MutationId>,
    /// `TransformFailed` only: the queries that failed (required, possibly
    /// empty).
    pub query_ids: Vec<String>,
}

impl ErrorBody {
    /// An error of `kind` with no backoff and no ids.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ErrorBody {
            kind,
            message: message.into(),
            min_backoff_ms: None,
            max_backoff_ms: None,
            reconnect_params: None,
            mutation_ids: Vec::new(),
            query_ids: Vec::new(),
        }
    }

    /// Sets the backoff window, in milliseconds (backoff kinds only).
    pub fn with_backoff(mut self, min_ms: u64, max_ms: u64) -> Self {
        self.min_backoff_ms = Some(min_ms);
        self.max_backoff_ms = Some(max_ms);
        self
    }

    /// Appends `["error", body]` to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        let backoff = self.kind.is_backoff();
        let wire = WireErrorBody {
            kind: self.kind.as_str(),
            message: &self.message,
            origin: ORIGIN_ZERO_CACHE,
            min_backoff_ms: self.min_backoff_ms.filter(|_| backoff),
            max_backoff_ms: self.max_backoff_ms.filter(|_| backoff),
            reconnect_params: self.reconnect_params.as_ref().filter(|_| backoff),
            reason: matches!(self.kind, ErrorKind::PushFailed | ErrorKind::TransformFailed)
                .then_some(REASON_INTERNAL),
            mutation_ids: (self.kind == ErrorKind::PushFailed).then_some(&self.mutation_ids),
            query_ids: (self.kind == ErrorKind::TransformFailed).then_some(&self.query_ids),
        };
        write_json(out, &("error", wire));
    }

    /// `["error", body]` as a new buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }
}

/// Appends `["error",{"kind":…,"message":…,"origin":"zeroCache",…}]` to
/// `out`; `backoff` is `(min_ms, max_ms)` and only written for backoff kinds.
pub fn write_error(out: &mut Vec<u8>, kind: ErrorKind, message: &str, backoff: Option<(u64, u64)>) {
    let mut body = ErrorBody::new(kind, message);
    if let Some((min_ms, max_ms)) = backoff {
        body = body.with_backoff(min_ms, max_ms);
    }
    body.write(out);
}

/// [`write_error`] into a new buffer.
pub fn encode_error(kind: ErrorKind, message: &str, backoff: Option<(u64, u64)>) -> Vec<u8> {
    let mut out = Vec::new();
    write_error(&mut out, kind, message, backoff);
    out
}

/// The body as serialized: field names and order of the wire, absent fields
/// skipped.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireErrorBody<'a> {
    kind: &'static str,
    message: &'a str,
    origin: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    min_backoff_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_backoff_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reconnect_params: Option<&'a BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    #[serde(rename = "mutationIDs", skip_serializing_if = "Option::is_none")]
    mutation_ids: Option<&'a Vec<MutationId>>,
    #[serde(rename = "queryIDs", skip_serializing_if = "Option::is_none")]
    query_ids: Option<&'a Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// The 19 kinds of docs/PROTOCOL.md, spelled as on the wire.
    const WIRE_KINDS: [&str; 19] = [
        "AuthInvalidated",
        "ClientNotFound",
        "InvalidConnectionRequest",
        "InvalidConnectionRequestBaseCookie",
        "InvalidConnectionRequestLastMutationID",
        "InvalidConnectionRequestClientDeleted",
        "InvalidMessage",
        "InvalidPush",
        "PushFailed",
        "MutationFailed",
        "MutationRateLimited",
        "Rebalance",
        "Rehome",
        "TransformFailed",
        "Unauthorized",
        "VersionNotSupported",
        "SchemaVersionNotSupported",
        "ServerOverloaded",
        "Internal",
    ];

    fn body_of(bytes: &[u8]) -> serde_json::Map<String, Value> {
        let value: Value = serde_json::from_slice(bytes).unwrap();
        let [tag, Value::Object(body)] = value.as_array().unwrap().as_slice() else {
            panic!("not [tag, {{...}}]: {value}");
        };
        assert_eq!(tag, "error");
        body.clone()
    }

    #[test]
    fn kinds_have_their_wire_names() {
        let names: Vec<&str> = ErrorKind::ALL.iter().map(|kind| kind.as_str()).collect();
        assert_eq!(names, WIRE_KINDS);
    }

    #[test]
    fn only_rebalance_rehome_and_overloaded_back_off() {
        let backoff: Vec<&str> = ErrorKind::ALL
            .iter()
            .filter(|kind| kind.is_backoff())
            .map(|kind| kind.as_str())
            .collect();
        assert_eq!(backoff, ["Rebalance", "Rehome", "ServerOverloaded"]);
    }

    #[test]
    fn basic_error_has_the_exact_wire_form() {
        assert_eq!(
            encode_error(ErrorKind::Unauthorized, "no token", None),
            br#"["error",{"kind":"Unauthorized","message":"no token","origin":"zeroCache"}]"#
        );
    }

    #[test]
    fn every_kind_is_sent_with_origin_and_only_its_own_fields() {
        for kind in ErrorKind::ALL {
            let body = body_of(&encode_error(kind, "m", Some((100, 200))));
            assert_eq!(body["origin"], "zeroCache", "{kind:?}");
            assert_eq!(body["kind"], kind.as_str());
            assert_eq!(body["message"], "m");
            // The client's strict schema: the fields each shape allows.
            let allowed: &[&str] = match kind {
                ErrorKind::Rebalance | ErrorKind::Rehome | ErrorKind::ServerOverloaded => &[
                    "kind",
                    "message",
                    "origin",
                    "minBackoffMs",
                    "maxBackoffMs",
                    "reconnectParams",
                ],
                ErrorKind::PushFailed => {
                    &["kind", "message", "origin", "reason", "mutationIDs", "details"]
                }
                ErrorKind::TransformFailed => {
                    &["kind", "message", "origin", "reason", "queryIDs", "details"]
                }
                _ => &["kind", "message", "origin"],
            };
            for key in body.keys() {
                assert!(allowed.contains(&key.as_str()), "{kind:?} has {key}");
            }
        }
    }

    #[test]
    fn backoff_kinds_carry_the_window_and_reconnect_params() {
        let mut body = ErrorBody::new(ErrorKind::Rebalance, "move").with_backoff(10, 20);
        body.reconnect_params = Some(BTreeMap::from([("shard".to_string(), "2".to_string())]));
        assert_eq!(
            Value::Object(body_of(&body.encode())),
            json!({"kind": "Rebalance", "message": "move", "origin": "zeroCache",
                   "minBackoffMs": 10, "maxBackoffMs": 20, "reconnectParams": {"shard": "2"}})
        );
        let plain = body_of(&encode_error(ErrorKind::ServerOverloaded, "busy", None));
        assert!(!plain.contains_key("minBackoffMs"));
    }

    #[test]
    fn push_and_transform_failures_have_their_required_fields() {
        let mut push = ErrorBody::new(ErrorKind::PushFailed, "db down");
        push.mutation_ids.push(MutationId { id: 3, client_id: "c".to_string() });
        assert_eq!(
            Value::Object(body_of(&push.encode())),
            json!({"kind": "PushFailed", "message": "db down", "origin": "zeroCache",
                   "reason": "internal", "mutationIDs": [{"id": 3, "clientID": "c"}]})
        );
        let transform = body_of(&encode_error(ErrorKind::TransformFailed, "x", None));
        assert_eq!(transform["reason"], "internal");
        assert_eq!(transform["queryIDs"], json!([]));
    }

    #[test]
    fn the_message_is_escaped() {
        let message = "bad \"x\"\\\n\u{7}\u{2028} ünï";
        let body = body_of(&encode_error(ErrorKind::InvalidMessage, message, None));
        assert_eq!(body["message"], message);
    }

    #[test]
    fn write_error_appends_after_existing_bytes() {
        let mut out = vec![0x81, 0x7e, 0, 0];
        write_error(&mut out, ErrorKind::Internal, "boom", None);
        assert_eq!(&out[..4], &[0x81, 0x7e, 0, 0]);
        assert_eq!(body_of(&out[4..])["kind"], "Internal");
    }
}
