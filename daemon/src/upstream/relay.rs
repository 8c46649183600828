//! What the end of one hop of a relay means for the other, sans-IO.
//!
//! A relay is two WebSockets: the client's hop (syncgate is the server) and the upstream hop
//! (syncgate is the client of zero-cache). Each runs its own close handshake, control frames
//! and keepalive; when one ends, the other is told here how to end:
//!
//! - a close frame from either side goes to the other with its code and reason (the reason
//!   cut at 123 bytes, as a close frame allows);
//! - a client that vanishes (no close frame) leaves the upstream with 1001;
//! - an upstream that cannot be reached, refuses the upgrade, or vanishes mid-stream (no close
//!   frame: reset, EOF, silence past the keepalive) leaves the client with
//!   `ServerOverloaded` and a backoff: the Zero client then waits and reconnects, instead of
//!   hanging or retrying at once against a zero-cache that is down.

use crate::protocol::ErrorKind;
use crate::ws::close;

/// The backoff a client is told to wait when its upstream is unavailable: zero-cache
/// restarts in about 4 s, so clients come back as it does without a reconnect storm before.
pub const UPSTREAM_BACKOFF_MS: (u64, u64) = (500, 5_000);

/// One hop of a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }
}

/// How a hop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End<'a> {
    /// Its peer sent a close frame: the code (if any) and the reason.
    Closed { code: Option<u16>, reason: &'a str },
    /// The socket ended without a close frame (EOF, reset, keepalive timeout, a protocol
    /// error of the peer's, a stuck consumer).
    Lost,
    /// Upstream only: it could not be reached in time, or did not answer with a WebSocket
    /// upgrade.
    Unreachable,
    /// Upstream only: the health checks declared it down (`super::health`), so its relays
    /// end even if their sockets still look alive (a hung zero-cache, a partition).
    Down,
}

/// What the other hop does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Then {
    /// Start its close handshake with this code and reason.
    Close { code: u16, reason: String },
    /// Client hop only: send this error (with its backoff) and close with its kind's code.
    Fail { kind: ErrorKind, message: &'static str, backoff: (u64, u64) },
}

/// What the other hop does when `side` ends as `end`.
pub fn then(side: Side, end: End<'_>) -> Then {
    match (side, end) {
        (_, End::Closed { code, reason }) => Then::Close {
            // A close frame without a code (1005 on the receiving side) is a normal close.
            code: code.unwrap_or(close::NORMAL),
            reason: reason.to_string(),
        },
        (Side::Client, End::Lost | End::Unreachable | End::Down) => {
            Then::Close { code: close::GOING_AWAY, reason: "client gone".into() }
        }
        (Side::Upstream, End::Lost) => Then::Fail {
            kind: ErrorKind::ServerOverloaded,
            message: "upstream connection lost",
            backoff: UPSTREAM_BACKOFF_MS,
        },
        (Side::Upstream, End::Unreachable) => Then::Fail {
            kind: ErrorKind::ServerOverloaded,
            message: "upstream unavailable",
            backoff: UPSTREAM_BACKOFF_MS,
        },
        (Side::Upstream, End::Down) => Then::Fail {
            kind: ErrorKind::ServerOverloaded,
            message: "upstream failed its health checks",
            backoff: UPSTREAM_BACKOFF_MS,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_frame_crosses_with_its_code_and_reason() {
        let end = End::Closed { code: Some(3000), reason: "Unauthorized" };
        assert_eq!(
            then(Side::Upstream, end),
            Then::Close { code: 3000, reason: "Unauthorized".into() }
        );
        assert_eq!(
            then(Side::Client, End::Closed { code: Some(1000), reason: "bye" }),
            Then::Close { code: 1000, reason: "bye".into() }
        );
        // No code: a normal close on the other hop.
        assert_eq!(
            then(Side::Client, End::Closed { code: None, reason: "" }),
            Then::Close { code: 1000, reason: String::new() }
        );
    }

    #[test]
    fn a_vanished_client_leaves_the_upstream_going_away() {
        assert_eq!(
            then(Side::Client, End::Lost),
            Then::Close { code: 1001, reason: "client gone".into() }
        );
    }

    #[test]
    fn a_failed_upstream_makes_the_client_back_off() {
        for (end, message) in [
            (End::Lost, "upstream connection lost"),
            (End::Unreachable, "upstream unavailable"),
            (End::Down, "upstream failed its health checks"),
        ] {
            match then(Side::Upstream, end) {
                Then::Fail { kind, message: m, backoff } => {
                    assert_eq!(
                        (kind, m, backoff),
                        (ErrorKind::ServerOverloaded, message, UPSTREAM_BACKOFF_MS)
                    );
                    assert_eq!(kind.close_code(), close::POLICY_VIOLATION);
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
