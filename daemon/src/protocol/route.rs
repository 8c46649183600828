//! Routing of sync sockets: the request path, the connect parameters in the query
//! string, and the choice of worker process.
//!
//! The listener calls [`parse_sync_path`] on every request head to tell a sync socket
//! from the plain HTTP routes, then [`parse_connect_params`] on its query, then
//! [`worker_for`] to pick the worker that owns the client group. All three are plain
//! functions over strings (no I/O) so that the exact behaviour zero-cache shows to the
//! Zero client (its error texts included) can be pinned down by unit tests.
//!
//! Error texts copy zero-cache (`rocicorp/mono`, `zero-cache/src/types/url-params.ts`,
//! `workers/connect-params.ts` and `server/worker-dispatcher.ts`), because the client
//! shows them to developers and people search for them.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;
use xxhash_rust::xxh32::Xxh32;

/// The sync protocol versions this daemon speaks (docs/PROTOCOL.md, "Supported versions"):
/// 30 is the oldest whose messages it parses, 52 the newest (binary pokes).
pub const MIN_VERSION: u32 = 30;
pub const MAX_VERSION: u32 = 52;

/// The conformance echo route (`conformance.echo`, off by default): plain WebSocket echo for
/// Autobahn and the frame benchmarks, with no Zero protocol.
pub const ECHO_PATH: &str = "/echo";

/// Longest decoded value accepted for the string parameters (`clientID`,
/// `clientGroupID`, `wsid`, `baseCookie`, `userID`, `profileID`).
///
/// The client generates ids of about 20 characters; `userID` is the application's and
/// may be an email or a UUID. These strings become map keys, log fields and the routing
/// hash input and are kept for the life of the connection, so an absurd value is refused
/// up front instead of being carried around. 256 bytes is generous for every real id.
pub const MAX_PARAM_BYTES: usize = 256;

/// Why a request path is not a usable sync path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// Neither the first nor the second path segment is `sync`: the path is not meant
    /// for the sync socket at all (`/`, `/metrics`, `/favicon.ico`, ...). A plain HTTP
    /// request gets a 404.
    NotSync,
    /// The path looks like a sync path but is malformed. The message is what the
    /// client should see in the close reason (zero-cache's wording).
    Invalid(String),
}

impl std::fmt::Display for RouteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteError::NotSync => f.write_str("not a sync path"),
            RouteError::Invalid(message) => f.write_str(message),
        }
    }
}

/// A parsed `(/<base>)?/sync/v<N>/<action>` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPath {
    /// The optional first segment; lets an application serve the sync socket under its
    /// own prefix on the same domain. Kept as sent (still percent-encoded).
    pub base: Option<String>,
    /// The sync protocol version `N` of `v<N>`; range checks happen later (after
    /// authentication) because the answer to a bad version is a protocol error message.
    pub version: u32,
    /// The last segment (the client sends `connect`), kept as sent.
    pub action: String,
}

/// Parses a request target of the form `(/<base>)?/sync/v<N>/<action>`.
///
/// `target` is the origin-form request target. A `?query` (and a `#fragment`, which
/// clients do not send) is ignored for matching but kept in error messages, as
/// zero-cache puts the whole URL in them. Segments must match `[A-Za-z0-9-_~ %]+`
/// (the `url-pattern` default zero-cache uses); nothing is decoded or normalised, so
/// `..`, empty segments and trailing slashes are refused.
pub fn parse_sync_path(target: &str) -> Result<SyncPath, RouteError> {
    let path_end = target.find(['?', '#']).unwrap_or(target.len());
    let path = &target[..path_end];
    let Some(rest) = path.strip_prefix('/') else {
        return Err(RouteError::NotSync);
    };

    // At most five segments are inspected; more than four is an error anyway, and this
    // keeps the work bounded whatever the path length.
    let mut segments: [&str; 5] = [""; 5];
    let mut count = 0;
    for segment in rest.splitn(5, '/') {
        segments[count] = segment;
        count += 1;
    }
    if segments[0] != "sync" && segments[1] != "sync" {
        return Err(RouteError::NotSync);
    }

    let invalid_url = || RouteError::Invalid(format!("Invalid URL: {target}"));
    let (base, sync, version, action) = match count {
        3 => (None, segments[0], segments[1], segments[2]),
        4 => (Some(segments[0]), segments[1], segments[2], segments[3]),
        _ => return Err(invalid_url()),
    };
    let all_valid = base.into_iter().chain([sync, version, action]).all(is_segment);
    if !all_valid || sync != "sync" {
        return Err(invalid_url());
    }
    let Some(digits) = version.strip_prefix('v') else {
        return Err(invalid_url());
    };
    let version = parse_version(digits)
        .ok_or_else(|| RouteError::Invalid(format!("Invalid version: {target}")))?;

    Ok(SyncPath { base: base.map(str::to_owned), version, action: action.to_owned() })
}

/// Whether `segment` matches `[A-Za-z0-9-_~ %]+`.
fn is_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~' | b' ' | b'%'))
}

/// The version digits of `v<N>`: ASCII digits only (zero-cache's `Number()` would also
/// take `1e2` or `0x10`; no client sends those), and it must fit a `u32`.
fn parse_version(digits: &str) -> Option<u32> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The connect parameters of a sync socket, from its query string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectParams {
    /// One tab or client instance; unique key of a connection inside a worker.
    pub client_id: String,
    /// The group of clients that share storage; routes the socket to its worker.
    pub client_group_id: String,
    /// The client's `performance.now()` at connect time, integer part, in ms.
    pub ts: i64,
    /// The last mutation id the client has seen acknowledged.
    pub lmid: u64,
    /// Id of this socket, echoed in `connected`; `""` when absent.
    pub wsid: String,
    /// The cookie (version) the client already holds; `None` when absent or empty.
    pub base_cookie: Option<String>,
    /// The user the client claims to be; checked against the token's `sub`.
    pub user_id: Option<String>,
    /// The client's profile id, for logs only.
    pub profile_id: Option<String>,
    /// The client asked for performance debugging output (`debugPerf=true`).
    pub debug_perf: bool,
}

/// The connect parameters as they appear in the query, first occurrence of each.
#[derive(Default)]
struct RawParams<'q> {
    client_id: Option<Cow<'q, str>>,
    client_group_id: Option<Cow<'q, str>>,
    profile_id: Option<Cow<'q, str>>,
    base_cookie: Option<Cow<'q, str>>,
    ts: Option<Cow<'q, str>>,
    lmid: Option<Cow<'q, str>>,
    wsid: Option<Cow<'q, str>>,
    user_id: Option<Cow<'q, str>>,
    debug_perf: Option<Cow<'q, str>>,
}

/// Parses the connect parameters from a query string (with or without its leading `?`).
///
/// Names and values are decoded as `URLSearchParams` does (`+` is a space, `%XX` is a
/// byte, bytes are read as UTF-8 with replacement, a malformed `%` stays as it is).
/// The first occurrence of a name wins; unknown names are ignored. As in zero-cache an
/// empty value counts as absent. Errors are the human message for the close reason,
/// with zero-cache's wording, reported in the order zero-cache reads the parameters:
///
/// - `invalid querystring - missing clientID` for a missing or empty required one;
/// - `invalid querystring parameter lmid, got: abc` for a number that does not parse
///   (zero-cache appends `, url: <url>`; this function does not see the URL);
/// - `invalid querystring parameter clientID: longer than 256 bytes` past
///   [`MAX_PARAM_BYTES`] (syncgate's own bound).
///
/// `ts` and `lmid` are read like JavaScript's `parseInt`: leading whitespace, an
/// optional sign, then the leading decimal digits (`297.30944` gives 297). Unlike
/// `parseInt`, a `0x` prefix is not read as hex, a value out of range is an error, and a
/// negative `lmid` is an error.
pub fn parse_connect_params(query: &str) -> Result<ConnectParams, String> {
    let raw = collect_params(query.strip_prefix('?').unwrap_or(query));

    let client_id = required("clientID", raw.client_id)?;
    let client_group_id = required("clientGroupID", raw.client_group_id)?;
    let profile_id = optional("profileID", raw.profile_id)?;
    let base_cookie = optional("baseCookie", raw.base_cookie)?;
    let ts_text = required("ts", raw.ts)?;
    let ts = leading_integer(&ts_text).ok_or_else(|| bad_number("ts", &ts_text))?;
    let lmid_text = required("lmid", raw.lmid)?;
    let lmid = leading_integer(&lmid_text)
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| bad_number("lmid", &lmid_text))?;
    let wsid = optional("wsid", raw.wsid)?.unwrap_or_default();
    let user_id = optional("userID", raw.user_id)?;
    let debug_perf = raw.debug_perf.as_deref() == Some("true");

    Ok(ConnectParams {
        client_id,
        client_group_id,
        ts,
        lmid,
        wsid,
        base_cookie,
        user_id,
        profile_id,
        debug_perf,
    })
}

/// Splits and decodes the query, keeping the first value of each known name.
fn collect_params(query: &str) -> RawParams<'_> {
    let mut raw = RawParams::default();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match &*form_decode(name) {
            "clientID" => &mut raw.client_id,
            "clientGroupID" => &mut raw.client_group_id,
            "profileID" => &mut raw.profile_id,
            "baseCookie" => &mut raw.base_cookie,
            "ts" => &mut raw.ts,
            "lmid" => &mut raw.lmid,
            "wsid" => &mut raw.wsid,
            "userID" => &mut raw.user_id,
            "debugPerf" => &mut raw.debug_perf,
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(form_decode(value));
        }
    }
    raw
}

/// `application/x-www-form-urlencoded` decoding, borrowing when nothing is encoded.
pub(crate) fn form_decode(text: &str) -> Cow<'_, str> {
    if !text.contains(['+', '%']) {
        return Cow::Borrowed(text);
    }
    let spaced = text.replace('+', " ");
    Cow::Owned(percent_decode_str(&spaced).decode_utf8_lossy().into_owned())
}

/// A required string parameter: present, non-empty, within [`MAX_PARAM_BYTES`].
fn required(name: &str, value: Option<Cow<'_, str>>) -> Result<String, String> {
    optional(name, value)?.ok_or_else(|| format!("invalid querystring - missing {name}"))
}

/// An optional string parameter: empty counts as absent; within [`MAX_PARAM_BYTES`].
fn optional(name: &str, value: Option<Cow<'_, str>>) -> Result<Option<String>, String> {
    match value {
        None => Ok(None),
        Some(value) if value.is_empty() => Ok(None),
        Some(value) if value.len() > MAX_PARAM_BYTES => Err(format!(
            "invalid querystring parameter {name}: longer than {MAX_PARAM_BYTES} bytes"
        )),
        Some(value) => Ok(Some(value.into_owned())),
    }
}

/// zero-cache's message for a number parameter that does not parse.
fn bad_number(name: &str, value: &str) -> String {
    format!("invalid querystring parameter {name}, got: {value}")
}

/// The integer that `parseInt(text)` reads (decimal only), or `None` when there is no
/// digit after the optional whitespace and sign, or the value does not fit an `i64`.
fn leading_integer(text: &str) -> Option<i64> {
    let text = text.trim_start();
    let (negative, unsigned) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let digits_end = unsigned.bytes().position(|b| !b.is_ascii_digit()).unwrap_or(unsigned.len());
    if digits_end == 0 {
        return None;
    }
    let magnitude: i64 = unsigned[..digits_end].parse().ok()?;
    Some(if negative { -magnitude } else { magnitude })
}

/// The worker process that owns a client group:
/// `xxh32(task_id + "/" + client_group_id, seed 0) % workers`, over UTF-8 bytes.
///
/// Every socket of a group must land on the same worker so that group state stays
/// local to one process; mixing in the task id lets two deployments spread the same
/// groups differently. Panics when `workers` is 0 (the config never allows it).
pub fn worker_for(task_id: &str, client_group_id: &str, workers: usize) -> usize {
    assert!(workers > 0, "worker_for needs at least one worker");
    // Streaming hash: same result as hashing the joined string, without allocating it.
    let mut hasher = Xxh32::new(0);
    hasher.update(task_id.as_bytes());
    hasher.update(b"/");
    hasher.update(client_group_id.as_bytes());
    hasher.digest() as usize % workers
}

#[cfg(test)]
mod tests {
    use super::*;
    use xxhash_rust::xxh32::xxh32;

    /// The first URL the Zero 1.9.0 client sent (zero-client-capture.md).
    const FIRST_CONNECT: &str = "/sync/v51/connect?clientID=jvp8kkl4ng86q8uhi0&clientGroupID=0h3jon9uhlfna8iufn&userID=anon&baseCookie=&ts=297.30944&lmid=0&wsid=OiWdDwkhIjjRAVOfTiBv0&profileID=p5jcsvcdkaumasohq5f";
    /// The URL of its reconnect after one mutation.
    const RECONNECT: &str = "/sync/v51/connect?clientID=mr7i622tve0v60n2be&clientGroupID=ikqgncuebf9t6pf1d1&userID=anon&baseCookie=03&ts=4193.089181&lmid=1&wsid=2pNwu2rxHQT00yWmJ4SkI&profileID=psv8b87hp0htov9rg33";

    /// A minimal valid query, for tests that change one thing in it.
    const MINIMAL: &str = "clientID=c1&clientGroupID=g1&ts=1&lmid=0";

    fn query_of(url: &str) -> &str {
        url.split_once('?').unwrap().1
    }

    fn invalid(target: &str) -> String {
        match parse_sync_path(target) {
            Err(RouteError::Invalid(message)) => message,
            other => panic!("{target}: expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn captured_first_connect() {
        let path = parse_sync_path(FIRST_CONNECT).unwrap();
        assert_eq!(path, SyncPath { base: None, version: 51, action: "connect".into() });
        let params = parse_connect_params(query_of(FIRST_CONNECT)).unwrap();
        assert_eq!(
            params,
            ConnectParams {
                client_id: "jvp8kkl4ng86q8uhi0".into(),
                client_group_id: "0h3jon9uhlfna8iufn".into(),
                ts: 297,
                lmid: 0,
                wsid: "OiWdDwkhIjjRAVOfTiBv0".into(),
                base_cookie: None,
                user_id: Some("anon".into()),
                profile_id: Some("p5jcsvcdkaumasohq5f".into()),
                debug_perf: false,
            }
        );
    }

    #[test]
    fn captured_reconnect() {
        assert_eq!(parse_sync_path(RECONNECT).unwrap().version, 51);
        let params = parse_connect_params(query_of(RECONNECT)).unwrap();
        assert_eq!(params.client_id, "mr7i622tve0v60n2be");
        assert_eq!(params.client_group_id, "ikqgncuebf9t6pf1d1");
        assert_eq!(params.base_cookie.as_deref(), Some("03"));
        assert_eq!(params.ts, 4193);
        assert_eq!(params.lmid, 1);
        assert_eq!(params.wsid, "2pNwu2rxHQT00yWmJ4SkI");
    }

    #[test]
    fn base_segment_and_versions() {
        let path = parse_sync_path("/api/sync/v52/connect").unwrap();
        assert_eq!(path.base.as_deref(), Some("api"));
        assert_eq!(path.version, 52);
        let path = parse_sync_path("/my%20app~1_x-y/sync/v30/pull").unwrap();
        assert_eq!(path.base.as_deref(), Some("my%20app~1_x-y"));
        assert_eq!(path.action, "pull");
        // A base named "sync" is still a base.
        let path = parse_sync_path("/sync/sync/v1/connect").unwrap();
        assert_eq!(path.base.as_deref(), Some("sync"));
        // Out-of-range versions parse; the range check belongs to the lifecycle.
        assert_eq!(parse_sync_path("/sync/v0/connect").unwrap().version, 0);
        assert_eq!(parse_sync_path("/sync/v099/connect").unwrap().version, 99);
        assert_eq!(parse_sync_path("/sync/v4294967295/connect").unwrap().version, u32::MAX);
    }

    #[test]
    fn query_and_fragment_are_not_part_of_the_path() {
        assert_eq!(parse_sync_path("/sync/v51/connect?").unwrap().version, 51);
        assert_eq!(parse_sync_path("/sync/v51/connect#x").unwrap().version, 51);
        // A query on a bad path shows up in the message, as in zero-cache.
        assert_eq!(invalid("/sync/x51/connect?a=b"), "Invalid URL: /sync/x51/connect?a=b");
    }

    #[test]
    fn non_sync_paths() {
        for target in [
            "",
            "/",
            "/keepalive",
            "/metrics",
            "/favicon.ico",
            "/a/b/sync/v51/connect",
            "/SYNC/v51/connect",
            "sync/v51/connect",
            "*",
            "http://host/sync/v51/connect",
        ] {
            assert_eq!(parse_sync_path(target), Err(RouteError::NotSync), "{target}");
        }
    }

    #[test]
    fn malformed_sync_paths() {
        assert_eq!(invalid("/sync"), "Invalid URL: /sync");
        assert_eq!(invalid("/sync/v51"), "Invalid URL: /sync/v51");
        assert_eq!(invalid("/api/sync"), "Invalid URL: /api/sync");
        assert_eq!(invalid("/sync/v51/connect/extra"), "Invalid URL: /sync/v51/connect/extra");
        assert_eq!(invalid("/a/sync/v51/connect/x/y/z"), "Invalid URL: /a/sync/v51/connect/x/y/z");
        assert_eq!(invalid("/sync/v51/connect/"), "Invalid URL: /sync/v51/connect/");
        assert_eq!(invalid("//sync/v51/connect"), "Invalid URL: //sync/v51/connect");
        assert_eq!(invalid("/sync//connect"), "Invalid URL: /sync//connect");
        assert_eq!(invalid("/sync/51/connect"), "Invalid URL: /sync/51/connect");
        assert_eq!(invalid("/sync/V51/connect"), "Invalid URL: /sync/V51/connect");
        // Characters outside [A-Za-z0-9-_~ %].
        assert_eq!(invalid("/sync/v51/con.nect"), "Invalid URL: /sync/v51/con.nect");
        assert_eq!(invalid("/../sync/v51/connect"), "Invalid URL: /../sync/v51/connect");
        assert_eq!(invalid("/a+b/sync/v51/connect"), "Invalid URL: /a+b/sync/v51/connect");
        assert_eq!(invalid("/sync/v51/conn\u{e9}ct"), "Invalid URL: /sync/v51/conn\u{e9}ct");
        assert_eq!(invalid("/sync/v51/a:b"), "Invalid URL: /sync/v51/a:b");
    }

    #[test]
    fn bad_versions() {
        for target in [
            "/sync/v/connect",
            "/sync/vx/connect",
            "/sync/v5x1/connect",
            "/sync/v1e2/connect",
            "/sync/v-1/connect",
            "/sync/v4294967296/connect",
            "/sync/v99999999999999999999999/connect",
        ] {
            assert_eq!(invalid(target), format!("Invalid version: {target}"));
        }
    }

    #[test]
    fn minimal_query_and_defaults() {
        let params = parse_connect_params(MINIMAL).unwrap();
        assert_eq!(params.client_id, "c1");
        assert_eq!(params.client_group_id, "g1");
        assert_eq!((params.ts, params.lmid), (1, 0));
        assert_eq!(params.wsid, "");
        assert_eq!(params.base_cookie, None);
        assert_eq!(params.user_id, None);
        assert_eq!(params.profile_id, None);
        assert!(!params.debug_perf);
        // The leading '?' is optional.
        assert_eq!(parse_connect_params(&format!("?{MINIMAL}")).unwrap(), params);
    }

    #[test]
    fn each_missing_required_parameter() {
        for (name, message) in [
            ("clientID", "invalid querystring - missing clientID"),
            ("clientGroupID", "invalid querystring - missing clientGroupID"),
            ("ts", "invalid querystring - missing ts"),
            ("lmid", "invalid querystring - missing lmid"),
        ] {
            let without: Vec<&str> =
                MINIMAL.split('&').filter(|pair| !pair.starts_with(&format!("{name}="))).collect();
            assert_eq!(parse_connect_params(&without.join("&")).unwrap_err(), message);
            // Present but empty is missing too.
            let emptied = MINIMAL.replace(&format!("{name}="), &format!("{name}=&x="));
            assert_eq!(parse_connect_params(&emptied).unwrap_err(), message);
        }
        assert_eq!(parse_connect_params("").unwrap_err(), "invalid querystring - missing clientID");
    }

    #[test]
    fn errors_come_in_zero_cache_order() {
        // clientID is read before ts, ts before lmid.
        assert_eq!(
            parse_connect_params("ts=x&lmid=y").unwrap_err(),
            "invalid querystring - missing clientID"
        );
        assert_eq!(
            parse_connect_params("clientID=a&clientGroupID=b&ts=x&lmid=y").unwrap_err(),
            "invalid querystring parameter ts, got: x"
        );
    }

    #[test]
    fn numbers() {
        let with = |ts: &str, lmid: &str| {
            parse_connect_params(&format!("clientID=c&clientGroupID=g&ts={ts}&lmid={lmid}"))
        };
        let ok = |ts: &str, lmid: &str| {
            let params = with(ts, lmid).unwrap();
            (params.ts, params.lmid)
        };
        assert_eq!(ok("297.30944", "0"), (297, 0));
        assert_eq!(ok("12abc", "7.9"), (12, 7));
        assert_eq!(ok("-5", "-0"), (-5, 0));
        assert_eq!(ok("%2B8", "1e5"), (8, 1));
        assert_eq!(ok("+++42", "9223372036854775807"), (42, i64::MAX as u64));
        assert_eq!(ok("0x10", "007"), (0, 7));

        let err = |ts: &str, lmid: &str| with(ts, lmid).unwrap_err();
        assert_eq!(err("abc", "0"), "invalid querystring parameter ts, got: abc");
        assert_eq!(err(".5", "0"), "invalid querystring parameter ts, got: .5");
        assert_eq!(err("-", "0"), "invalid querystring parameter ts, got: -");
        assert_eq!(err("1", "x"), "invalid querystring parameter lmid, got: x");
        assert_eq!(err("1", "-1"), "invalid querystring parameter lmid, got: -1");
        assert_eq!(
            err("1", "99999999999999999999"),
            "invalid querystring parameter lmid, got: 99999999999999999999"
        );
        assert_eq!(
            err("99999999999999999999", "1"),
            "invalid querystring parameter ts, got: 99999999999999999999"
        );
    }

    #[test]
    fn percent_and_plus_decoding() {
        let params = parse_connect_params(
            "client%49D=a%2Fb+c&clientGroupID=%E2%9C%93&ts=1&lmid=0&userID=me%40x.com&wsid=%zz&baseCookie=%FF",
        )
        .unwrap();
        assert_eq!(params.client_id, "a/b c");
        assert_eq!(params.client_group_id, "\u{2713}");
        assert_eq!(params.user_id.as_deref(), Some("me@x.com"));
        // A malformed escape stays as it is; invalid UTF-8 becomes U+FFFD.
        assert_eq!(params.wsid, "%zz");
        assert_eq!(params.base_cookie.as_deref(), Some("\u{fffd}"));
        // An encoded '&' or '=' is data, not a separator.
        let params =
            parse_connect_params("clientID=a%26b%3Dc&clientGroupID=g&ts=1&lmid=0").unwrap();
        assert_eq!(params.client_id, "a&b=c");
    }

    #[test]
    fn first_duplicate_wins_and_unknown_names_are_ignored() {
        let params = parse_connect_params(
            "clientID=first&clientID=second&clientGroupID=g&ts=1&lmid=0&ts=9&foo=bar&&=x&noequals",
        )
        .unwrap();
        assert_eq!(params.client_id, "first");
        assert_eq!(params.ts, 1);
        // An empty first value still takes the slot, so the parameter counts as missing.
        assert_eq!(
            parse_connect_params("clientID=&clientID=x&clientGroupID=g&ts=1&lmid=0").unwrap_err(),
            "invalid querystring - missing clientID"
        );
    }

    #[test]
    fn debug_perf_is_true_only_for_true() {
        let with = |value: &str| {
            parse_connect_params(&format!("{MINIMAL}&debugPerf={value}")).unwrap().debug_perf
        };
        assert!(with("true"));
        assert!(!with("1"));
        assert!(!with("TRUE"));
        assert!(!with(""));
    }

    #[test]
    fn lengths_are_bounded() {
        let at_limit = "a".repeat(MAX_PARAM_BYTES);
        let over = "a".repeat(MAX_PARAM_BYTES + 1);
        let ok = format!("clientID={at_limit}&clientGroupID=g&ts=1&lmid=0");
        assert_eq!(parse_connect_params(&ok).unwrap().client_id, at_limit);
        for name in ["clientID", "clientGroupID", "wsid", "baseCookie", "userID", "profileID"] {
            let query = format!("{name}={over}&{MINIMAL}");
            assert_eq!(
                parse_connect_params(&query).unwrap_err(),
                format!("invalid querystring parameter {name}: longer than 256 bytes")
            );
        }
        // The bound applies to the decoded value: 86 escapes of a 3-byte character.
        let wide = "%E2%9C%93".repeat(86);
        let query = format!("clientID={wide}&clientGroupID=g&ts=1&lmid=0");
        assert!(parse_connect_params(&query).unwrap_err().contains("longer than"));
    }

    #[test]
    fn xxh32_vectors() {
        assert_eq!(xxh32(b"abc", 0), 0x32d1_53ff);
        assert_eq!(xxh32(b"a", 0), 0x550d_7456);
    }

    #[test]
    fn worker_for_hashes_task_slash_group() {
        for (task, group) in
            [("t", "g"), ("", ""), ("task-1", "0h3jon9uhlfna8iufn"), ("\u{e9}", "\u{2713}")]
        {
            let joined = format!("{task}/{group}");
            let expected = xxh32(joined.as_bytes(), 0);
            for workers in [1, 2, 3, 7, 64] {
                assert_eq!(worker_for(task, group, workers), expected as usize % workers);
            }
        }
        assert_eq!(worker_for("a", "bc", 1), 0);
        // The task id changes the spread.
        let moved = (0..100)
            .filter(|i| {
                let group = format!("group-{i}");
                worker_for("task-a", &group, 8) != worker_for("task-b", &group, 8)
            })
            .count();
        assert!(moved > 50, "only {moved} of 100 groups moved");
    }

    #[test]
    fn worker_for_spreads_groups_evenly() {
        const WORKERS: usize = 8;
        const GROUPS: usize = 80_000;
        let mut counts = [0usize; WORKERS];
        for i in 0..GROUPS {
            counts[worker_for("task", &format!("cg{i:x}"), WORKERS)] += 1;
        }
        let expected = GROUPS / WORKERS;
        for (worker, count) in counts.iter().enumerate() {
            // 10,000 expected per worker, standard deviation about 94: 5% is > 5 sigma.
            assert!(
                count.abs_diff(expected) < expected / 20,
                "worker {worker} got {count} of {GROUPS}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "at least one worker")]
    fn worker_for_refuses_zero_workers() {
        worker_for("t", "g", 0);
    }
}
