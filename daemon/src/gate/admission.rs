//! Admission: whether a socket that reached its worker is served, and at whose expense. The
//! rules (docs/SECURITY.md, "Displacement before authentication"), in the order they apply:
//!
//! 1. The `Sec-WebSocket-Protocol` header decodes ([`header`]).
//! 2. The token is verified before any other connection is looked at ([`identify`]); a
//!    verified token must name the `userID` of the URL, and `auth.required` refuses sockets
//!    without one.
//! 3. A client group is pinned to the first verified user that joins it: nobody else is
//!    admitted to it. Without this, anyone who learns a clientGroupID reads its pokes.
//! 4. A newcomer whose clientID is connected replaces that connection only if both carry
//!    verified tokens of the same user, or (with `auth.session_cookie`) the same session
//!    cookie and no differing user. Anyone else waits for a liveness probe of the holder:
//!    refused (`Unauthorized`) if it answers, admitted in its place if it does not, so a
//!    reconnect after a network drop is not locked out ([`resolve_probe`]).
//! 5. A group holds at most `limits.max_group_connections`.
//! 6. The sync protocol version is in [`MIN_VERSION`]`..=`[`MAX_VERSION`], checked before
//!    any existing connection is touched.
//!
//! Sans-IO: the worker verifies the token (the [`Verifier`](crate::gate::auth::Verifier)
//! has a cache), loads the group and knows the connections; this module only decides, and
//! every refusal it returns carries its error kind, message and close code. Every socket of a
//! group lands on the same worker (the routing hash), so what it looks at is local,
//! single-threaded and authoritative.

use std::borrow::Cow;

use crate::gate::auth::{AuthError, Verified};
use crate::protocol::route::{MAX_VERSION, MIN_VERSION};
use crate::protocol::{decode_protocol_header, ErrorKind, ProtocolHeader};

/// The backoff a client is told to wait when its group is full: long enough to let the group
/// shrink, short enough that a legitimate client recovers within seconds.
pub const OVERLOAD_BACKOFF_MS: (u64, u64) = (1_000, 10_000);

/// The backoff a client is told to wait when its group moved (another process changed it,
/// during a graceful replacement): long enough not to come back before the new owner has it,
/// short enough that nobody notices.
pub const REHOME_BACKOFF_MS: (u64, u64) = (100, 1_000);

/// The backoff an error of `kind` asks for (`minBackoffMs`, `maxBackoffMs`), if any: every
/// `ServerOverloaded` (a full group, a busy or failing store) is worth retrying after a while,
/// whether it refuses a newcomer or ends an open connection; a `Rehome` soon.
pub fn backoff_of(kind: ErrorKind) -> Option<(u64, u64)> {
    match kind {
        ErrorKind::ServerOverloaded => Some(OVERLOAD_BACKOFF_MS),
        ErrorKind::Rehome => Some(REHOME_BACKOFF_MS),
        _ => None,
    }
}

/// A refused socket: what the client is told, and which counter it moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: ErrorKind,
    pub message: Cow<'static, str>,
    /// Which rule refused it, for `/metrics`.
    pub rule: Rule,
}

/// The rule behind a refusal. Each has its counter in `/metrics`, except a malformed request
/// and a storage failure, which are logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The `Sec-WebSocket-Protocol` header is missing or malformed.
    Request,
    /// No token where one is required, a token that fails verification or names another user.
    Auth,
    /// The group's pin, a live holder of the clientID, or the group's size.
    Displacement,
    /// A sync protocol version this daemon does not speak.
    Version,
    /// The group's state could not be read.
    Storage,
}

impl Refusal {
    fn new(rule: Rule, kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Refusal {
        Refusal { kind, message: message.into(), rule }
    }

    /// The close code that follows the error message.
    pub fn close_code(&self) -> u16 {
        self.kind.close_code()
    }

    /// The backoff the error message asks for (`minBackoffMs`, `maxBackoffMs`), if any: a
    /// full group is worth retrying, a refused user is not.
    pub fn backoff(&self) -> Option<(u64, u64)> {
        backoff_of(self.kind)
    }

    /// The group's state could not be read: nothing was decided. `kind` is the store's
    /// (`ServerOverloaded` while another process holds the file: retry after the backoff).
    pub fn storage(kind: ErrorKind) -> Refusal {
        let message = match kind {
            ErrorKind::ServerOverloaded => "storage busy",
            _ => "storage unavailable",
        };
        Refusal::new(Rule::Storage, kind, message)
    }
}

/// What the worker learned of a newcomer's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token<'a> {
    /// The socket carried none.
    Absent,
    /// It carried one, but no key is configured to check it: it proves nothing.
    Unchecked,
    /// It verified; the `sub` claim.
    Verified(&'a str),
    /// It failed verification.
    Invalid(AuthError),
}

impl<'a> Token<'a> {
    /// What a verification of a token that was sent says.
    pub fn checked(result: &'a Result<Verified, AuthError>) -> Token<'a> {
        match result {
            Ok(verified) => Token::Verified(&verified.sub),
            Err(e) => Token::Invalid(*e),
        }
    }
}

/// Rule 1: the header, which carries the token and often the client's `initConnection`.
pub fn header(value: Option<&str>) -> Result<ProtocolHeader, Refusal> {
    let kind = ErrorKind::InvalidConnectionRequest;
    match value.map(decode_protocol_header) {
        None => Err(Refusal::new(Rule::Request, kind, "missing Sec-WebSocket-Protocol header")),
        Some(Err(e)) => Err(Refusal::new(
            Rule::Request,
            kind,
            format!("invalid Sec-WebSocket-Protocol header: {e}"),
        )),
        Some(Ok(header)) => Ok(header),
    }
}

/// Rule 2: the newcomer's verified user (`None`: it proves no identity), or its refusal.
/// `claimed` is the `userID` of its URL; `required` is `auth.required`.
pub fn identify<'a>(
    token: Token<'a>,
    claimed: Option<&str>,
    required: bool,
) -> Result<Option<&'a str>, Refusal> {
    match token {
        Token::Verified(sub) if claimed != Some(sub) => Err(Refusal::new(
            Rule::Auth,
            ErrorKind::Unauthorized,
            "token subject does not match userID",
        )),
        Token::Verified(sub) => Ok(Some(sub)),
        Token::Invalid(e) => Err(Refusal::new(Rule::Auth, ErrorKind::AuthInvalidated, e.message())),
        Token::Absent if required => {
            Err(Refusal::new(Rule::Auth, ErrorKind::Unauthorized, "a token is required"))
        }
        Token::Absent | Token::Unchecked => Ok(None),
    }
}

/// The newcomer, once identified.
#[derive(Debug, Clone, Copy)]
pub struct Newcomer<'a> {
    /// Its verified user (`None`: no verified token).
    pub user: Option<&'a str>,
    /// A keyed hash of its session cookie (`auth.session_cookie`), if it carried one.
    pub session: Option<u64>,
    /// The sync protocol version of its path.
    pub version: u32,
}

/// The connection already admitted under the newcomer's clientID.
#[derive(Debug, Clone, Copy)]
pub struct Holder<'a> {
    /// The worker's handle of it, returned in the decision.
    pub slot: u32,
    /// Its verified user; `None` if it carried no verified token.
    pub user: Option<&'a str>,
    /// Its session cookie's hash, as for [`Newcomer::session`].
    pub session: Option<u64>,
}

/// The newcomer's group as it stands.
#[derive(Debug, Clone, Copy)]
pub struct Group<'a> {
    /// The verified user the group is pinned to (rule 3), if any.
    pub owner: Option<&'a str>,
    /// Connections admitted to it.
    pub connections: usize,
    /// `limits.max_group_connections`.
    pub max_connections: usize,
}

/// The decision on an identified newcomer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Admit,
    /// Same clientID, same verified user: close the holder (1000) and admit.
    Replace(u32),
    /// Same clientID, not provably the same user: probe the holder, then [`resolve_probe`].
    Probe(u32),
    Refuse(Refusal),
}

/// Rules 3 to 6 for an identified newcomer.
pub fn decide(newcomer: Newcomer<'_>, group: Group<'_>, holder: Option<Holder<'_>>) -> Decision {
    if let Some(refusal) = check_pin(group.owner, newcomer.user) {
        return Decision::Refuse(refusal);
    }
    let decision = match holder {
        Some(holder) => {
            let same_user = matches!((holder.user, newcomer.user), (Some(a), Some(b)) if a == b);
            // A session cookie proves the same browser session, as a token proves the same
            // user, unless the tokens say the users differ.
            let same_session = holder.user == newcomer.user
                && matches!((holder.session, newcomer.session), (Some(a), Some(b)) if a == b);
            if same_user || same_session {
                Decision::Replace(holder.slot)
            } else {
                Decision::Probe(holder.slot)
            }
        }
        None if group.connections >= group.max_connections => {
            return Decision::Refuse(Refusal::new(
                Rule::Displacement,
                ErrorKind::ServerOverloaded,
                format!("client group has the maximum of {} connections", group.max_connections),
            ))
        }
        None => Decision::Admit,
    };
    let version = newcomer.version;
    if !(MIN_VERSION..=MAX_VERSION).contains(&version) {
        return Decision::Refuse(Refusal::new(
            Rule::Version,
            ErrorKind::VersionNotSupported,
            format!(
                "server supports sync protocol v{MIN_VERSION} to v{MAX_VERSION}, client requested v{version}"
            ),
        ));
    }
    decision
}

/// Rule 3 alone: a group pinned to a user admits nobody else. The worker asks again when a
/// newcomer that waited on a probe is finally admitted, since the group may have been pinned
/// meanwhile.
pub fn check_pin(owner: Option<&str>, user: Option<&str>) -> Option<Refusal> {
    match owner {
        Some(owner) if user != Some(owner) => Some(Refusal::new(
            Rule::Displacement,
            ErrorKind::Unauthorized,
            "this client group belongs to another user",
        )),
        _ => None,
    }
}

/// Where a probe of a clientID's holder stands.
#[derive(Debug, Clone, Copy)]
pub struct ProbeState {
    /// The newcomer still waits (it may have gone meanwhile).
    pub newcomer_waiting: bool,
    /// The holder is still admitted (it may have ended meanwhile).
    pub holder_connected: bool,
    /// The holder answered the probe.
    pub answered: bool,
    /// The probe's deadline passed.
    pub expired: bool,
}

/// What a probe's outcome means for the newcomer.
#[derive(Debug, PartialEq, Eq)]
pub enum ProbeVerdict {
    /// No outcome yet.
    Wait,
    /// The newcomer left: nothing to do.
    Forget,
    /// The holder is gone by itself: admit the newcomer.
    Admit,
    /// The holder did not answer in time: end it as dead, then admit the newcomer.
    ReplaceDead,
    /// The holder is alive: it keeps its clientID.
    Refuse(Refusal),
}

/// Rule 4's second half.
pub fn resolve_probe(state: ProbeState) -> ProbeVerdict {
    match state {
        ProbeState { newcomer_waiting: false, .. } => ProbeVerdict::Forget,
        ProbeState { holder_connected: false, .. } => ProbeVerdict::Admit,
        ProbeState { answered: true, .. } => ProbeVerdict::Refuse(Refusal::new(
            Rule::Displacement,
            ErrorKind::Unauthorized,
            "this clientID is connected in another session",
        )),
        ProbeState { expired: true, .. } => ProbeVerdict::ReplaceDead,
        _ => ProbeVerdict::Wait,
    }
}

/// `updateAuth` on an open connection whose verified user is `current`: a refreshed token
/// must verify and name the same user (a socket cannot become someone else's halfway
/// through). `None`: the connection goes on.
pub fn reauthenticate(token: Token<'_>, current: Option<&str>) -> Option<Refusal> {
    match token {
        Token::Invalid(e) => {
            Some(Refusal::new(Rule::Auth, ErrorKind::AuthInvalidated, e.message()))
        }
        Token::Verified(sub) if current != Some(sub) => Some(Refusal::new(
            Rule::Auth,
            ErrorKind::Unauthorized,
            "the new token names another user",
        )),
        Token::Verified(_) | Token::Unchecked | Token::Absent => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::close;

    const MAX: usize = 64;

    fn group(owner: Option<&str>, connections: usize) -> Group<'_> {
        Group { owner, connections, max_connections: MAX }
    }

    fn newcomer(user: Option<&str>) -> Newcomer<'_> {
        Newcomer { user, session: None, version: MAX_VERSION }
    }

    fn holder(user: Option<&str>) -> Option<Holder<'_>> {
        Some(Holder { slot: 7, user, session: None })
    }

    /// The refusal's kind, close code and rule, for exact comparison.
    fn refused(d: Decision) -> (ErrorKind, u16, Rule) {
        match d {
            Decision::Refuse(r) => (r.kind, r.close_code(), r.rule),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    const UNAUTHORIZED: (ErrorKind, u16, Rule) =
        (ErrorKind::Unauthorized, close::UNAUTHORIZED, Rule::Displacement);

    #[test]
    fn a_header_is_required_and_must_decode() {
        let missing = header(None).unwrap_err();
        assert_eq!(
            (missing.kind, missing.close_code()),
            (ErrorKind::InvalidConnectionRequest, 1002)
        );
        assert_eq!(missing.message, "missing Sec-WebSocket-Protocol header");
        let bad = header(Some("not base64 !")).unwrap_err();
        assert_eq!((bad.kind, bad.rule), (ErrorKind::InvalidConnectionRequest, Rule::Request));
        assert!(bad.message.starts_with("invalid Sec-WebSocket-Protocol header: "), "{bad:?}");
        let value = crate::protocol::encode_protocol_header(None, Some("a.b.c"));
        assert_eq!(header(Some(&value)).unwrap().auth_token.as_deref(), Some("a.b.c"));
    }

    #[test]
    fn the_token_decides_the_user_before_anything_else() {
        assert_eq!(identify(Token::Verified("alice"), Some("alice"), false), Ok(Some("alice")));
        // A verified token for one user cannot connect as another.
        let r = identify(Token::Verified("alice"), Some("bob"), false).unwrap_err();
        assert_eq!((r.kind, r.close_code(), r.rule), (ErrorKind::Unauthorized, 3000, Rule::Auth));
        assert_eq!(r.message, "token subject does not match userID");
        let r = identify(Token::Verified("alice"), None, false).unwrap_err();
        assert_eq!(r.kind, ErrorKind::Unauthorized);
        // Every verification failure is AuthInvalidated with the verifier's own words.
        let r = identify(Token::Invalid(AuthError::Expired), Some("alice"), false).unwrap_err();
        assert_eq!(
            (r.kind, r.close_code(), r.rule),
            (ErrorKind::AuthInvalidated, 3000, Rule::Auth)
        );
        assert_eq!(r.message, AuthError::Expired.message());
        // No token: anonymous, unless one is required.
        assert_eq!(identify(Token::Absent, Some("alice"), false), Ok(None));
        let r = identify(Token::Absent, Some("alice"), true).unwrap_err();
        assert_eq!((r.kind, r.close_code()), (ErrorKind::Unauthorized, 3000));
        assert_eq!(r.message, "a token is required");
        // A token nobody can check proves nothing, but it is not refused.
        assert_eq!(identify(Token::Unchecked, Some("alice"), true), Ok(None));
    }

    #[test]
    fn the_same_verified_user_replaces_anyone_else_probes() {
        let pinned = group(Some("alice"), 1);
        assert_eq!(
            decide(newcomer(Some("alice")), pinned, holder(Some("alice"))),
            Decision::Replace(7)
        );
        let open = group(None, 1);
        assert_eq!(decide(newcomer(None), open, holder(None)), Decision::Probe(7));
        // A verified newcomer against an unverified holder must probe too: the holder may be
        // the same person who has not logged in, or someone else entirely.
        assert_eq!(decide(newcomer(Some("alice")), open, holder(None)), Decision::Probe(7));
        // An unverified newcomer never replaces a verified holder outright.
        assert_eq!(decide(newcomer(None), open, holder(Some("alice"))), Decision::Probe(7));
        // Two verified users on an unpinned group (the pin was not written yet): probe.
        assert_eq!(decide(newcomer(Some("bob")), open, holder(Some("alice"))), Decision::Probe(7));
    }

    #[test]
    fn the_same_session_cookie_replaces_another_one_probes() {
        let open = group(None, 1);
        let with = |user, session| Newcomer { user, session, version: MAX_VERSION };
        let held = |user, session| Some(Holder { slot: 7, user, session });
        assert_eq!(decide(with(None, Some(1)), open, held(None, Some(1))), Decision::Replace(7));
        assert_eq!(decide(with(None, Some(2)), open, held(None, Some(1))), Decision::Probe(7));
        assert_eq!(decide(with(None, None), open, held(None, Some(1))), Decision::Probe(7));
        assert_eq!(decide(with(None, Some(1)), open, held(None, None)), Decision::Probe(7));
        // The cookie does not override tokens that name different users.
        let user = with(Some("bob"), Some(1));
        assert_eq!(decide(user, open, held(Some("alice"), Some(1))), Decision::Probe(7));
    }

    /// Upstream mode's edge rules (README, "In front of zero-cache"): zero-cache 1.9 admits a
    /// socket without a token that names a user's `userID` as that user; at the edge it is
    /// anonymous, whatever it names.
    #[test]
    fn a_socket_without_a_token_is_anonymous_whatever_user_it_names() {
        let user = identify(Token::Absent, Some("alice"), false).unwrap();
        assert_eq!(user, None);
        // It never replaces her live connection (a dead one only after the probe)...
        let live = holder(Some("alice"));
        assert_eq!(decide(newcomer(user), group(None, 1), live), Decision::Probe(7));
        // ...never joins her group...
        let pinned = group(Some("alice"), 1);
        assert_eq!(refused(decide(newcomer(user), pinned, None)), UNAUTHORIZED);
        // ...and a token naming someone else is refused before anything.
        let r = identify(Token::Verified("bob"), Some("alice"), false).unwrap_err();
        assert_eq!((r.kind, r.close_code()), (ErrorKind::Unauthorized, 3000));
        // `auth.required` refuses it outright.
        assert!(identify(Token::Absent, Some("alice"), true).is_err());
        // A live holder that answers the probe keeps its clientID.
        let alive = ProbeState {
            newcomer_waiting: true,
            holder_connected: true,
            answered: true,
            expired: false,
        };
        let refusal = resolve_probe(alive);
        assert!(matches!(refusal, ProbeVerdict::Refuse(r) if r.kind == ErrorKind::Unauthorized));
    }

    #[test]
    fn a_pinned_group_admits_only_its_user() {
        let pinned = group(Some("alice"), 1);
        // Refused by the pin before the clientID is even looked at.
        assert_eq!(
            refused(decide(newcomer(Some("bob")), pinned, holder(Some("alice")))),
            UNAUTHORIZED
        );
        assert_eq!(refused(decide(newcomer(None), pinned, holder(Some("alice")))), UNAUTHORIZED);
        assert_eq!(refused(decide(newcomer(Some("bob")), pinned, None)), UNAUTHORIZED);
        assert_eq!(refused(decide(newcomer(None), pinned, None)), UNAUTHORIZED);
        assert_eq!(decide(newcomer(Some("alice")), pinned, None), Decision::Admit);
        assert_eq!(decide(newcomer(None), group(None, 0), None), Decision::Admit);
        assert_eq!(check_pin(None, Some("bob")), None);
        assert_eq!(check_pin(Some("alice"), Some("alice")), None);
        let r = check_pin(Some("alice"), None).unwrap();
        assert_eq!(r.message, "this client group belongs to another user");
    }

    #[test]
    fn a_full_group_asks_newcomers_to_back_off() {
        let full = Group { owner: None, connections: 3, max_connections: 3 };
        let Decision::Refuse(r) = decide(newcomer(None), full, None) else { panic!() };
        assert_eq!(
            (r.kind, r.close_code(), r.rule),
            (ErrorKind::ServerOverloaded, 1008, Rule::Displacement)
        );
        assert_eq!(r.message, "client group has the maximum of 3 connections");
        assert_eq!(r.backoff(), Some(OVERLOAD_BACKOFF_MS));
        // A newcomer that takes over a clientID does not grow the group.
        assert_eq!(decide(newcomer(None), full, holder(None)), Decision::Probe(7));
        // Only a full group asks for a backoff.
        assert_eq!(check_pin(Some("a"), None).unwrap().backoff(), None);
        // A busy store asks for the same backoff; a broken one is an internal error.
        let busy = Refusal::storage(ErrorKind::ServerOverloaded);
        assert_eq!((busy.close_code(), busy.backoff()), (1008, Some(OVERLOAD_BACKOFF_MS)));
        let broken = Refusal::storage(ErrorKind::Internal);
        assert_eq!((broken.close_code(), broken.backoff()), (1011, None));
        assert_eq!(broken.message, "storage unavailable");
        // A group that moved sends its clients back soon; other kinds ask for no backoff.
        assert_eq!(backoff_of(ErrorKind::Rehome), Some(REHOME_BACKOFF_MS));
        assert_eq!(backoff_of(ErrorKind::InvalidPush), None);
    }

    #[test]
    fn the_version_is_checked_before_any_holder_is_touched() {
        for version in [MIN_VERSION - 1, MAX_VERSION + 1, 0, 255] {
            let old = Newcomer { user: Some("alice"), session: None, version };
            let d = decide(old, group(Some("alice"), 1), holder(Some("alice")));
            let (kind, code, rule) = refused(d);
            assert_eq!((kind, code, rule), (ErrorKind::VersionNotSupported, 1002, Rule::Version));
        }
        let Decision::Refuse(r) =
            decide(Newcomer { user: None, session: None, version: 7 }, group(None, 0), None)
        else {
            panic!()
        };
        assert_eq!(r.message, format!("server supports sync protocol v{MIN_VERSION} to v{MAX_VERSION}, client requested v7"));
        for version in [MIN_VERSION, MAX_VERSION] {
            let d = decide(Newcomer { user: None, session: None, version }, group(None, 0), None);
            assert_eq!(d, Decision::Admit);
        }
        // The pin is a stronger answer than the version: an intruder learns nothing more.
        let d = decide(
            Newcomer { user: Some("bob"), session: None, version: 7 },
            group(Some("alice"), 1),
            None,
        );
        assert_eq!(refused(d), UNAUTHORIZED);
    }

    #[test]
    fn a_probe_refuses_a_live_holder_and_replaces_a_dead_one() {
        let state = |newcomer_waiting, holder_connected, answered, expired| ProbeState {
            newcomer_waiting,
            holder_connected,
            answered,
            expired,
        };
        assert_eq!(resolve_probe(state(true, true, false, false)), ProbeVerdict::Wait);
        assert_eq!(resolve_probe(state(false, true, true, true)), ProbeVerdict::Forget);
        assert_eq!(resolve_probe(state(true, false, false, false)), ProbeVerdict::Admit);
        assert_eq!(resolve_probe(state(true, true, false, true)), ProbeVerdict::ReplaceDead);
        // An answer wins over a deadline that passed in the same tick.
        let ProbeVerdict::Refuse(r) = resolve_probe(state(true, true, true, true)) else {
            panic!()
        };
        assert_eq!((r.kind, r.close_code(), r.rule), UNAUTHORIZED);
        assert_eq!(r.message, "this clientID is connected in another session");
    }

    #[test]
    fn a_refreshed_token_must_name_the_same_user() {
        assert_eq!(reauthenticate(Token::Verified("alice"), Some("alice")), None);
        let r = reauthenticate(Token::Verified("bob"), Some("alice")).unwrap();
        assert_eq!((r.kind, r.close_code()), (ErrorKind::Unauthorized, 3000));
        // An anonymous connection cannot become someone's by a token sent later.
        assert_eq!(
            reauthenticate(Token::Verified("bob"), None).unwrap().kind,
            ErrorKind::Unauthorized
        );
        let r = reauthenticate(Token::Invalid(AuthError::BadSignature), Some("alice")).unwrap();
        assert_eq!((r.kind, r.close_code()), (ErrorKind::AuthInvalidated, 3000));
        assert_eq!(reauthenticate(Token::Unchecked, Some("alice")), None);
    }

    #[test]
    fn every_kind_closes_with_its_code() {
        use ErrorKind as K;
        assert_eq!(K::Unauthorized.close_code(), close::UNAUTHORIZED);
        assert_eq!(K::AuthInvalidated.close_code(), close::UNAUTHORIZED);
        assert_eq!(K::ServerOverloaded.close_code(), close::POLICY_VIOLATION);
        assert_eq!(K::Internal.close_code(), close::INTERNAL_ERROR);
        assert_eq!(K::Rehome.close_code(), close::SERVICE_RESTART);
        assert_eq!(K::Rebalance.close_code(), close::SERVICE_RESTART);
        for kind in [
            K::InvalidMessage,
            K::InvalidPush,
            K::VersionNotSupported,
            K::InvalidConnectionRequest,
            K::InvalidConnectionRequestBaseCookie,
        ] {
            assert_eq!(kind.close_code(), close::PROTOCOL_ERROR, "{kind:?}");
        }
    }
}
