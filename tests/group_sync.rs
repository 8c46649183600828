//! Client-group sync at the protocol level, through the real binary: what a Zero client sees
//! of pushes, pokes, cookies and the store, byte for byte, with the harness's own WebSocket
//! client. tests/zero_client.rs drives the real Zero client through the same paths.
//!
//! Every connection here carries `initConnection` in its `Sec-WebSocket-Protocol` header, as
//! the 1.9.0 client does: that is when the daemon checks `baseCookie`/`lmid`, sends the
//! catch-up poke and makes the connection a recipient of the group's pokes.

mod common;

use std::time::Duration;

use serde_json::{json, Value};

use common::*;

// ---------------------------------------------------------------------------------------------
// Connecting
// ---------------------------------------------------------------------------------------------

/// One sync socket's connect parameters, with the ones group sync looks at.
#[derive(Clone)]
struct Join {
    client: String,
    group: String,
    /// `baseCookie`: empty means null (no data yet).
    base_cookie: String,
    lmid: u64,
    version: u32,
    user: Option<String>,
    /// The token in the header (None: no token).
    token: Option<String>,
}

impl Join {
    fn new(client: &str, group: &str) -> Join {
        Join {
            client: client.into(),
            group: group.into(),
            base_cookie: String::new(),
            lmid: 0,
            version: 51,
            user: None,
            token: None,
        }
    }

    fn cookie(mut self, cookie: &str) -> Join {
        self.base_cookie = cookie.into();
        self
    }

    fn lmid(mut self, lmid: u64) -> Join {
        self.lmid = lmid;
        self
    }

    fn version(mut self, version: u32) -> Join {
        self.version = version;
        self
    }

    /// Connects as `user` with a valid token for them.
    fn user(mut self, user: &str) -> Join {
        self.user = Some(user.into());
        self.token = Some(token(user));
        self
    }

    /// The request target, shaped like the 1.9.0 client's (zero-client-capture.md).
    fn path(&self) -> String {
        let user = self.user.as_deref().map(|u| format!("&userID={u}")).unwrap_or_default();
        format!(
            "/sync/v{}/connect?clientID={}&clientGroupID={}{user}&baseCookie={}&ts=12.5&lmid={}&wsid=ws-{}",
            self.version, self.client, self.group, self.base_cookie, self.lmid, self.client
        )
    }

    /// The header: the token if any, and an initConnection that desires no query.
    fn header(&self) -> String {
        let init =
            json!(["initConnection", {"desiredQueriesPatch": [], "activeClients": [self.client]}]);
        protocol_header(self.token.as_deref(), Some(init))
    }

    /// Opens the socket; it must get `connected`.
    fn open(&self, d: &Daemon) -> Ws {
        let mut ws = Ws::connect(d.addr, &self.path(), Some(&self.header()))
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.path()));
        let msg = ws.recv_json();
        assert_eq!(msg[0], "connected", "first message of {}: {msg}", self.path());
        ws
    }

    /// Opens the socket and reads the catch-up poke that a client without data gets.
    fn open_fresh(&self, d: &Daemon) -> (Ws, Poke) {
        assert!(self.base_cookie.is_empty(), "open_fresh is for baseCookie null");
        let mut ws = self.open(d);
        let poke = read_poke(&mut ws);
        assert_eq!(poke.base_cookie, Value::Null, "the first poke of a client without data");
        (ws, poke)
    }
}

// ---------------------------------------------------------------------------------------------
// Reading pokes
// ---------------------------------------------------------------------------------------------

/// One poke as the client assembles it from pokeStart, its parts and pokeEnd.
struct Poke {
    base_cookie: Value,
    cookie: String,
    parts: Vec<Value>,
    /// Binary frames its parts came in (protocol 52).
    binary_frames: usize,
    /// Text `pokePart` messages (protocol 51 and below).
    text_parts: usize,
}

impl Poke {
    /// Every `rowsPatch` op of every part, in order.
    fn rows(&self) -> Vec<Value> {
        self.parts
            .iter()
            .flat_map(|p| p["rowsPatch"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// The `lastMutationIDChanges` of all parts, merged.
    fn lmids(&self) -> Value {
        let mut out = serde_json::Map::new();
        for p in &self.parts {
            if let Some(m) = p["lastMutationIDChanges"].as_object() {
                out.extend(m.clone());
            }
        }
        Value::Object(out)
    }
}

/// Shown in failure messages: the parts cut short, as a poke may hold megabytes.
impl std::fmt::Debug for Poke {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: String =
            Value::Array(self.parts.clone()).to_string().chars().take(600).collect();
        write!(
            f,
            "Poke {{ base_cookie: {}, cookie: {}, binary_frames: {}, text_parts: {}, parts: {parts} }}",
            self.base_cookie, self.cookie, self.binary_frames, self.text_parts
        )
    }
}

/// A `put` of an `issue` row, as it appears in `rowsPatch`.
fn put(id: &str, title: &str) -> Value {
    json!({"op": "put", "tableName": "issue", "value": {"id": id, "title": title}})
}

/// A `del` of an `issue` row.
fn del(id: &str) -> Value {
    json!({"op": "del", "tableName": "issue", "id": {"id": id}})
}

/// Reads one whole poke; anything else before its end fails the test. Binary parts must
/// start with the chunk type byte 0x00; their concatenation is the JSON array of parts.
fn read_poke(ws: &mut Ws) -> Poke {
    let start = ws.recv_json();
    assert_eq!(start[0], "pokeStart", "expected a poke, got {start}");
    let id = start[1]["pokeID"].clone();
    let mut poke = Poke {
        base_cookie: start[1]["baseCookie"].clone(),
        cookie: String::new(),
        parts: Vec::new(),
        binary_frames: 0,
        text_parts: 0,
    };
    let mut chunks = Vec::new();
    loop {
        match ws.recv_within(WAIT) {
            Got::Text(text) => {
                let msg: Value = serde_json::from_str(&text).expect("JSON message");
                match msg[0].as_str() {
                    Some("pokePart") => {
                        assert_eq!(msg[1]["pokeID"], id, "part of another poke: {msg}");
                        poke.text_parts += 1;
                        poke.parts.push(msg[1].clone());
                    }
                    Some("pokeEnd") => {
                        assert_eq!(msg[1]["pokeID"], id, "end of another poke: {msg}");
                        assert!(msg[1].get("cancel").is_none(), "a canceled poke: {msg}");
                        poke.cookie = msg[1]["cookie"].as_str().expect("cookie").to_string();
                        break;
                    }
                    _ => panic!("inside poke {id}: unexpected {msg}"),
                }
            }
            Got::Binary(bytes) => {
                assert_eq!(bytes.first(), Some(&0x00), "a binary poke chunk starts with 0x00");
                chunks.extend_from_slice(&bytes[1..]);
                poke.binary_frames += 1;
            }
            other => panic!("inside poke {id}: expected a poke message, got {other:?}"),
        }
    }
    if !chunks.is_empty() {
        let parts: Vec<Value> = serde_json::from_slice(&chunks).expect("binary parts are JSON");
        for part in parts {
            assert_eq!(part["pokeID"], id, "binary part of another poke: {part}");
            poke.parts.push(part);
        }
    }
    assert!(!poke.parts.is_empty(), "a poke without parts: {poke:?}");
    poke
}

/// Reads `n` pokes and checks that they chain: each starts from the cookie the last ended at.
fn read_chain(ws: &mut Ws, from: &str, n: usize) -> Vec<Poke> {
    let mut cookie = from.to_string();
    (0..n)
        .map(|i| {
            let poke = read_poke(ws);
            assert_eq!(poke.base_cookie, json!(cookie), "poke {i} must start where the last ended");
            assert!(poke.cookie > cookie, "cookies must grow: {} after {cookie}", poke.cookie);
            cookie = poke.cookie.clone();
            poke
        })
        .collect()
}

/// Pings and expects the pong as the very next message: nothing (no poke, no error) may be
/// queued before it. (The harness's `ping_pong` looks past pokes; these tests count them.)
fn pong_next(ws: &mut Ws) {
    ws.send_json(&json!(["ping", {}]));
    assert_eq!(ws.recv_json(), json!(["pong", {}]), "the next message must be the pong");
}

/// Expects an error of `kind` as the very next message (the harness's `expect_error` looks
/// past pokes); returns its body.
fn error_next(ws: &mut Ws, kind: &str) -> Value {
    let msg = ws.recv_json();
    assert_eq!(msg[0], "error", "expected an {kind} error next, got {msg}");
    assert_eq!(msg[1]["kind"], kind, "error kind: {msg}");
    assert_eq!(msg[1]["origin"], "zeroCache", "every error must carry origin zeroCache: {msg}");
    msg[1].clone()
}

/// A storage directory of the test's own (for restarts), removed when dropped.
struct StorageDir(TempDir);

impl StorageDir {
    fn new(name: &str) -> StorageDir {
        StorageDir(TempDir::new(&format!("group-sync-{name}")))
    }

    fn config(&self) -> String {
        format!("[storage]\npath = \"{}\"\n", self.0 .0.display())
    }
}

/// Stops a daemon the way systemd does and waits for it to exit.
fn stop(mut d: Daemon) {
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(10)).expect("the daemon stops on SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status:?}\n{}", d.log_text());
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn a_push_is_poked_to_every_connection_of_the_group_in_order() {
    let d = Daemon::start(QUIET);
    let (mut writer, first) = Join::new("w", "fan").open_fresh(&d);
    assert_eq!(first.cookie, "00", "an empty group is at version 0");
    let (mut r1, _) = Join::new("r1", "fan").open_fresh(&d);
    let (mut r2, _) = Join::new("r2", "fan").open_fresh(&d);
    let (mut outsider, _) = Join::new("o", "elsewhere").open_fresh(&d);

    push(&mut writer, "fan", "w", 1, &[insert("i1", "one")]);
    push(&mut writer, "fan", "w", 2, &[update("i1", "two"), insert("i2", "x")]);
    push(&mut writer, "fan", "w", 3, &[delete("i1")]);
    let expected_rows =
        [vec![put("i1", "one")], vec![put("i1", "two"), put("i2", "x")], vec![del("i1")]];
    let mut cookies = Vec::new();
    for (name, ws) in [("writer", &mut writer), ("r1", &mut r1), ("r2", &mut r2)] {
        let chain = read_chain(ws, "00", 3);
        for (i, poke) in chain.iter().enumerate() {
            assert_eq!(poke.lmids(), json!({"w": i + 1}), "{name}, poke {i}: {poke:?}");
            assert_eq!(poke.rows(), expected_rows[i], "{name}, poke {i}: {poke:?}");
        }
        cookies.push(chain.iter().map(|p| p.cookie.clone()).collect::<Vec<_>>());
    }
    assert_eq!(cookies[0], ["01", "02", "03"]);
    assert!(cookies.iter().all(|c| *c == cookies[0]), "every member sees the same versions");
    // Another group's connection got nothing: the pong is the next thing it reads (pokes of
    // one iteration are all delivered before the next message is read).
    pong_next(&mut outsider);
    pong_next(&mut r1);
    // Every poke waited for a commit, and the worker counted the commit before sending it.
    let commits = d.metric("syncgate_commit_seconds_count", &[]);
    assert!((1..=3).contains(&commits), "three pushes, one to three commits: {commits}");
    let inf = d.metric("syncgate_commit_seconds_bucket", &[("le", "+Inf")]);
    assert_eq!(inf, commits, "the +Inf bucket holds every commit");
}

/// A backed-up queue leaves in vectored writes (up to 8 frames per `sendmsg`), resumed
/// wherever a short write stopped: a member that reads late still gets every poke whole and
/// in order.
#[test]
fn a_member_that_reads_late_gets_every_poke_whole_and_in_order_from_gathered_writes() {
    // The queue bound well above the backlog: the late reader is slow, not stuck.
    let d = Daemon::start(&format!(
        "{QUIET}[limits]\nmax_outbound_bytes = 268435456\nslow_consumer_ms = 60000\n"
    ));
    let (mut writer, _) = Join::new("w", "late").open_fresh(&d);
    let (mut late, _) = Join::new("l", "late").open_fresh(&d);
    // The server's socket takes up to 4 MiB (tcp_wmem) and this one 512 KiB before the
    // server's own queue grows: 6 MiB of pokes, each a buffer of its own in that queue. (A
    // receive buffer under two segments would make the reads crawl: one delayed ACK each.)
    late.set_recv_buffer(256 * 1024);
    let big = "x".repeat(16 * 1024);
    const PUSHES: usize = 400;
    for id in 1..=PUSHES {
        push(&mut writer, "late", "w", id as u64, &[insert(&format!("i{id}"), &big)]);
        read_poke(&mut writer);
    }
    for (i, poke) in read_chain(&mut late, "00", PUSHES).iter().enumerate() {
        assert_eq!(poke.rows(), [put(&format!("i{}", i + 1), &big)], "poke {i}");
    }
    pong_next(&mut late);
    let gathered = d.metric("syncgate_vectored_sends_total", &[]);
    assert!(gathered > 0, "the late reader's backlog left several frames per write");
}

#[test]
fn base_cookie_null_current_older_and_unknown() {
    let d = Daemon::start(QUIET);
    let (mut writer, _) = Join::new("w", "cg").open_fresh(&d);
    for (id, row) in [(1, "a"), (2, "b"), (3, "c")] {
        push(&mut writer, "cg", "w", id, &[insert(row, row)]);
    }
    let chain = read_chain(&mut writer, "00", 3);
    assert_eq!(chain[2].cookie, "03");

    // null: everything.
    let (_fresh, full) = Join::new("fresh", "cg").open_fresh(&d);
    assert_eq!(full.cookie, "03");
    assert_eq!(full.rows(), [put("a", "a"), put("b", "b"), put("c", "c")]);
    assert_eq!(full.lmids(), json!({"w": 3}));

    // The current cookie: nothing to catch up, so the first poke it gets is the next change.
    let mut current = Join::new("current", "cg").cookie("03").open(&d);
    // An older cookie: only what changed after it.
    let mut older = Join::new("older", "cg").cookie("01").open(&d);
    let diff = read_poke(&mut older);
    assert_eq!(diff.base_cookie, json!("01"));
    assert_eq!(diff.cookie, "03");
    assert_eq!(diff.rows(), [put("b", "b"), put("c", "c")], "only the rows after 01: {diff:?}");
    assert_eq!(diff.lmids(), json!({"w": 3}));

    push(&mut writer, "cg", "w", 4, &[insert("d", "d")]);
    for ws in [&mut current, &mut older, &mut writer] {
        let next = read_poke(ws);
        assert_eq!(next.base_cookie, json!("03"), "{next:?}");
        assert_eq!(next.rows(), [put("d", "d")]);
    }

    // Cookies this group never issued: not a cookie at all, ahead of the group, malformed.
    for (i, cookie) in ["zz", "09", "003", "0A"].into_iter().enumerate() {
        let mut ws = Join::new(&format!("bad-cookie-{i}"), "cg").cookie(cookie).open(&d);
        let error = error_next(&mut ws, "InvalidConnectionRequestBaseCookie");
        assert!(error["message"].as_str().unwrap().contains(cookie), "{error}");
        ws.expect_close(1002);
    }
    // The group is untouched by the refusals.
    pong_next(&mut writer);
    let (_again, full) = Join::new("fresh2", "cg").open_fresh(&d);
    assert_eq!(full.cookie, "04");
}

#[test]
fn an_lmid_above_what_the_server_recorded_is_refused() {
    let d = Daemon::start(QUIET);
    let (mut writer, _) = Join::new("w", "lm").open_fresh(&d);
    // A client also pushes the pending mutations of other clients of its group (DD31), so
    // the writer can give x and y a recorded last mutation ID of 1 without connecting them.
    push(&mut writer, "lm", "x", 1, &[insert("a", "a")]);
    push(&mut writer, "lm", "y", 1, &[insert("b", "b")]);
    let chain = read_chain(&mut writer, "00", 2);
    assert_eq!(chain[1].lmids(), json!({"y": 1}));
    // Claiming what the server recorded is fine; claiming more is not.
    let mut same = Join::new("x", "lm").lmid(1).cookie("02").open(&d);
    pong_next(&mut same);
    let mut ahead = Join::new("y", "lm").lmid(2).cookie("02").open(&d);
    let error = error_next(&mut ahead, "InvalidConnectionRequestLastMutationID");
    assert!(error["message"].as_str().unwrap().contains("last mutation ID 2"), "{error}");
    ahead.expect_close(1002);
    // A client the server never heard of cannot claim any mutation either.
    let mut stranger = Join::new("nobody", "lm").lmid(1).cookie("02").open(&d);
    error_next(&mut stranger, "InvalidConnectionRequestLastMutationID");
    stranger.expect_close(1002);
    // The refusals changed nothing.
    pong_next(&mut same);
    pong_next(&mut writer);
}

#[test]
fn a_duplicate_mutation_id_is_ignored() {
    let d = Daemon::start(QUIET);
    let (mut ws, _) = Join::new("c", "dup").open_fresh(&d);
    push(&mut ws, "dup", "c", 1, &[insert("a", "first")]);
    let first = read_poke(&mut ws);
    assert_eq!((first.base_cookie.clone(), first.cookie.as_str()), (json!("00"), "01"));
    // A resend after a reconnect: already processed, nothing happens (the row would clash).
    push(&mut ws, "dup", "c", 1, &[insert("a", "first")]);
    push(&mut ws, "dup", "c", 1, &[update("a", "changed by a resend")]);
    push(&mut ws, "dup", "c", 2, &[update("a", "second")]);
    let next = read_poke(&mut ws);
    assert_eq!(next.base_cookie, json!("01"), "the duplicates made no version: {next:?}");
    assert_eq!(next.cookie, "02");
    assert_eq!(next.lmids(), json!({"c": 2}));
    assert_eq!(next.rows(), [put("a", "second")]);
    pong_next(&mut ws);
}

#[test]
fn a_mutation_id_gap_is_an_invalid_push_that_closes() {
    let d = Daemon::start(QUIET);
    let (mut ws, _) = Join::new("c", "gap").open_fresh(&d);
    push(&mut ws, "gap", "c", 1, &[insert("a", "a")]);
    read_poke(&mut ws);
    push(&mut ws, "gap", "c", 3, &[insert("b", "b")]);
    let error = error_next(&mut ws, "InvalidPush");
    assert!(error["message"].as_str().unwrap().contains("unexpected mutation id 3"), "{error}");
    ws.expect_close(1002);
    // Nothing of the refused mutation was kept.
    let (_probe, full) = Join::new("probe", "gap").open_fresh(&d);
    assert_eq!(full.rows(), [put("a", "a")]);
    assert_eq!(full.lmids(), json!({"c": 1}));
    assert_eq!(full.cookie, "01");
}

#[test]
fn inserting_an_existing_row_fails_the_mutation_without_closing() {
    let d = Daemon::start(QUIET);
    let (mut ws, _) = Join::new("c", "clash").open_fresh(&d);
    let (mut other, _) = Join::new("other", "clash").open_fresh(&d);
    push(&mut ws, "clash", "c", 1, &[insert("a", "original")]);
    read_poke(&mut ws);
    read_poke(&mut other);
    push(&mut ws, "clash", "c", 2, &[insert("b", "new"), insert("a", "duplicate")]);
    // The last mutation ID advances (zero-cache's error mode), no row changes (not even the
    // op before the failing one), and the pusher alone hears why.
    let advanced = read_poke(&mut ws);
    assert_eq!(advanced.lmids(), json!({"c": 2}));
    assert_eq!(advanced.rows(), Vec::<Value>::new(), "a failed mutation writes nothing");
    let error = error_next(&mut ws, "MutationFailed");
    assert!(error["message"].as_str().unwrap().contains("already exists"), "{error}");
    let seen_by_other = read_poke(&mut other);
    assert_eq!(seen_by_other.lmids(), json!({"c": 2}));
    assert_eq!(seen_by_other.rows(), Vec::<Value>::new());
    // Still open, and the next mutation is id 3.
    pong_next(&mut ws);
    push(&mut ws, "clash", "c", 3, &[update("a", "after")]);
    let next = read_poke(&mut ws);
    assert_eq!(next.base_cookie, json!(advanced.cookie));
    assert_eq!(next.rows(), [put("a", "after")]);
    // The other member saw the same, and no error: its next message after the poke is a pong.
    assert_eq!(read_poke(&mut other).rows(), [put("a", "after")]);
    pong_next(&mut other);
}

#[test]
fn the_group_row_limit_comes_from_the_config_and_a_reload_raises_it() {
    let d = Daemon::start(&format!("{QUIET}[limits]\ngroup_max_rows = 2\n"));
    let (mut ws, _) = Join::new("c", "lim").open_fresh(&d);
    push(&mut ws, "lim", "c", 1, &[insert("a", "x"), insert("b", "y")]);
    assert_eq!(read_poke(&mut ws).rows().len(), 2);
    push(&mut ws, "lim", "c", 2, &[insert("c", "z")]);
    assert_eq!(read_poke(&mut ws).rows(), Vec::<Value>::new(), "over the limit: no row");
    let error = error_next(&mut ws, "MutationFailed");
    assert!(error["message"].as_str().unwrap().contains("over its limit of 2"), "{error}");
    // A reload raises the limit, for the group already in memory too.
    let config = std::fs::read_to_string(d.config_path()).unwrap();
    std::fs::write(d.config_path(), config.replace("group_max_rows = 2", "group_max_rows = 3"))
        .unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log(|l| l.contains("reloaded configuration") && l.contains("generation=1"), WAIT);
    push(&mut ws, "lim", "c", 3, &[insert("c", "z")]);
    assert_eq!(read_poke(&mut ws).rows(), [put("c", "z")]);
}

#[test]
fn protocol_52_gets_binary_poke_parts_and_51_never_a_binary_frame() {
    let d = Daemon::start(QUIET);
    let mut v52 = Join::new("new", "bin").version(52).open(&d);
    let first = read_poke(&mut v52);
    assert_eq!(first.base_cookie, Value::Null);
    assert!(first.binary_frames >= 1 && first.text_parts == 0, "v52 catch-up: {first:?}");
    let (mut v51, first) = Join::new("old", "bin").version(51).open_fresh(&d);
    assert!(first.binary_frames == 0 && first.text_parts >= 1, "v51 catch-up: {first:?}");

    // A poke of 1.2 MB: several 256 KiB text parts for v51, and for v52 more than one 1 MiB
    // chunk, cut inside a run of two-byte characters.
    let big = "é".repeat(100_000);
    let big_rows: Vec<Value> = (0..6).map(|i| insert(&format!("big{i}"), &big)).collect();
    push(&mut v51, "bin", "old", 1, &[insert("small", "s")]);
    push(&mut v51, "bin", "old", 2, &big_rows);
    for (n, min_pieces) in [(0, 1), (1, 2)] {
        let (at52, at51) = (read_poke(&mut v52), read_poke(&mut v51));
        assert!(at52.binary_frames >= min_pieces && at52.text_parts == 0, "v52 poke {n}: {at52:?}");
        assert!(at51.binary_frames == 0 && at51.text_parts >= min_pieces, "v51 poke {n}: {at51:?}");
        assert_eq!(at52.rows(), at51.rows(), "both formats carry the same rows");
        assert_eq!(at52.lmids(), at51.lmids());
        assert_eq!(at52.cookie, at51.cookie);
    }
    // The v52 pusher gets binary parts for its own mutation too.
    push(&mut v52, "bin", "new", 1, &[insert("from52", "x")]);
    let own = read_poke(&mut v52);
    assert!(own.binary_frames >= 1 && own.text_parts == 0);
    assert_eq!(own.rows(), [put("from52", "x")]);
    let other = read_poke(&mut v51);
    assert_eq!(other.binary_frames, 0, "v51 got a binary frame");
    assert_eq!(other.rows(), [put("from52", "x")]);
    // Nothing else (binary or not) was queued for v51: its next message is the pong.
    pong_next(&mut v51);
}

#[test]
fn data_survives_a_daemon_restart() {
    let storage = StorageDir::new("restart");
    let d = Daemon::start(&format!("{QUIET}{}", storage.config()));
    let (mut ws, _) = Join::new("c", "durable").open_fresh(&d);
    push(&mut ws, "durable", "c", 1, &[insert("a", "before restart")]);
    push(&mut ws, "durable", "c", 2, &[insert("b", "second")]);
    let chain = read_chain(&mut ws, "00", 2);
    drop(ws);
    stop(d);
    // A worker that stops folds its write-ahead log into SQLite and removes it.
    assert_eq!(wal_files(&storage), 0, "a clean stop leaves no log to replay");

    let d = Daemon::start(&format!("{QUIET}{}", storage.config()));
    let (_fresh, full) = Join::new("fresh", "durable").open_fresh(&d);
    assert_eq!(full.cookie, "02");
    assert_eq!(full.rows(), [put("a", "before restart"), put("b", "second")]);
    assert_eq!(full.lmids(), json!({"c": 2}));
    // The history survived too: a client holding the first cookie gets only the second row.
    let mut behind = Join::new("c", "durable").cookie(&chain[0].cookie).lmid(1).open(&d);
    let diff = read_poke(&mut behind);
    assert_eq!(diff.base_cookie, json!("01"));
    assert_eq!(diff.rows(), [put("b", "second")]);
    // And the last mutation ID: the next mutation of `c` is 3.
    push(&mut behind, "durable", "c", 3, &[update("a", "after restart")]);
    let next = read_poke(&mut behind);
    assert_eq!(next.lmids(), json!({"c": 3}));
    assert_eq!(next.rows(), [put("a", "after restart")]);
}

#[test]
fn two_hundred_connections_of_one_group_each_get_every_poke_in_order() {
    const MEMBERS: usize = 200;
    const PUSHES: u64 = 5;
    let d = Daemon::start(&format!("{QUIET}[limits]\nmax_group_connections = 300\n"));
    let mut members: Vec<Ws> = (0..MEMBERS)
        .map(|i| {
            let (ws, first) = Join::new(&format!("m{i}"), "crowd").open_fresh(&d);
            assert_eq!(first.cookie, "00");
            ws
        })
        .collect();
    for id in 1..=PUSHES {
        push(&mut members[0], "crowd", "m0", id, &[insert(&format!("r{id}"), "x")]);
    }
    for (i, ws) in members.iter_mut().enumerate() {
        let chain = read_chain(ws, "00", PUSHES as usize);
        for (n, poke) in chain.iter().enumerate() {
            let id = n as u64 + 1;
            assert_eq!(poke.rows(), [put(&format!("r{id}"), "x")], "member {i}, poke {n}");
            assert_eq!(poke.lmids(), json!({"m0": id}), "member {i}, poke {n}");
        }
    }
    // Nothing more was queued for anyone: the next message of each is its pong.
    for ws in members.iter_mut().step_by(20) {
        pong_next(ws);
    }
    assert_eq!(d.metric("syncgate_protocol_errors_total", &[]), 0);
}

#[test]
fn the_per_user_mutation_limit_refuses_the_fourth_push_and_stays_open() {
    let d = Daemon::start(&format!(
        "{QUIET}[limits]\nper_user_mutations = 3\nper_user_mutations_window_ms = 60000\n"
    ));
    let (mut ws, _) = Join::new("c", "rl").open_fresh(&d);
    for id in 1..=3 {
        push(&mut ws, "rl", "c", id, &[insert(&format!("r{id}"), "x")]);
    }
    read_chain(&mut ws, "00", 3);
    push(&mut ws, "rl", "c", 4, &[insert("r4", "x")]);
    let error = error_next(&mut ws, "MutationRateLimited");
    assert!(error["message"].as_str().unwrap().contains("retry"), "{error}");
    // Still open, and the refused mutation was not applied.
    pong_next(&mut ws);
    let (_probe, full) = Join::new("probe", "rl").open_fresh(&d);
    assert_eq!(full.lmids(), json!({"c": 3}));
    assert_eq!(full.rows().len(), 3);
}

#[test]
fn a_group_pinned_to_alice_refuses_bob_even_after_a_restart() {
    let storage = StorageDir::new("pin");
    let config = format!("{QUIET}{}{}", auth_config(), storage.config());
    let d = Daemon::start(&config);
    let (mut alice, _) = Join::new("a1", "pinned").user("alice").open_fresh(&d);
    push(&mut alice, "pinned", "a1", 1, &[insert("a", "alice's")]);
    read_poke(&mut alice);
    let mut bob = Join::new("b1", "pinned").user("bob").open_unchecked(&d);
    error_next(&mut bob, "Unauthorized");
    bob.expect_close(3000);
    drop(alice);
    stop(d);

    let d = Daemon::start(&config);
    let mut bob = Join::new("b1", "pinned").user("bob").open_unchecked(&d);
    let error = error_next(&mut bob, "Unauthorized");
    assert!(error["message"].as_str().unwrap().contains("another user"), "{error}");
    bob.expect_close(3000);
    d.wait_event("refused", &[("clientID", "b1"), ("kind", "Unauthorized")], WAIT);
    // Alice still gets in, and her data is there.
    let (_alice, full) = Join::new("a2", "pinned").user("alice").open_fresh(&d);
    assert_eq!(full.rows(), [put("a", "alice's")]);
}

impl Join {
    /// Opens the socket without expecting `connected` (for refusals).
    fn open_unchecked(&self, d: &Daemon) -> Ws {
        Ws::connect(d.addr, &self.path(), Some(&self.header()))
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.path()))
    }
}

/// The store runs off the event loop. With every commit made to take 1.5 s (a slow disk,
/// `storage.test_sync_delay_ms`), pushes wait for their commit while another connection of
/// the same worker is answered at once, and the pokes of the waiting batch then arrive in
/// order. Without the store thread the pings would wait for the commit too.
#[test]
fn a_slow_disk_stalls_no_connection_and_each_poke_waits_for_its_commit() {
    const DELAY: Duration = Duration::from_millis(1500);
    let dir = StorageDir::new("slow-disk");
    let d = on_a_slow_disk(&dir, DELAY, "");
    let (mut writer, _) = Join::new("w", "slow").open_fresh(&d);
    let (mut other, _) = Join::new("o", "bystander").open_fresh(&d);
    let pushed = std::time::Instant::now();
    push(&mut writer, "slow", "w", 1, &[insert("i1", "one")]);
    push(&mut writer, "slow", "w", 2, &[insert("i2", "two")]);
    push(&mut writer, "slow", "w", 3, &[update("i1", "three")]);
    // Each ping is answered well within the commit's time: the loop is not waiting for it.
    for _ in 0..5 {
        let asked = std::time::Instant::now();
        pong_next(&mut other);
        let took = asked.elapsed();
        assert!(took < Duration::from_millis(300), "a pong took {took:?} during a commit");
    }
    assert!(pushed.elapsed() < DELAY, "the pings ran while the first commit was in flight");
    let chain = read_chain(&mut writer, "00", 3);
    assert!(pushed.elapsed() >= DELAY, "a poke came before its commit: {:?}", pushed.elapsed());
    let rows: Vec<Vec<Value>> = chain.iter().map(Poke::rows).collect();
    assert_eq!(
        rows,
        [vec![put("i1", "one")], vec![put("i2", "two")], vec![put("i1", "three")]],
        "the pokes arrive in push order"
    );
    // Pushes that arrived during a commit shared the next one: at most two batches for
    // three pushes sent together (the first may have left alone).
    let batches = d.metric("syncgate_store_batches_total", &[]);
    let changes = d.metric("syncgate_store_changes_total", &[]);
    assert!(batches <= 2 && changes == 3, "{batches} batches for {changes} changes");
    // No turn of the loop waited for the disk: every one took less than the commit.
    let turns = d.metric("syncgate_loop_iteration_seconds_count", &[]);
    let short = d.metric("syncgate_loop_iteration_seconds_bucket", &[("le", "0.5")]);
    assert_eq!(short, turns, "a loop iteration took over 500 ms");
    // And they are durable: a restart reads them back.
    stop(d);
    let d = Daemon::start(&format!("{QUIET}\n{}", dir.config()));
    let mut again = Join::new("w2", "slow").open(&d);
    let poke = read_poke(&mut again);
    assert_eq!(poke.cookie, "03", "{poke:?}");
}

/// A store that stalls does not make the worker hold every push that arrives meanwhile:
/// past `storage.max_pending_bytes` of changes waiting behind the commit in progress, a push
/// is refused with `ServerOverloaded` and close 1008, after the pokes of what was taken, and
/// changes nothing; once the store caught up, the group takes pushes again.
#[test]
fn a_push_that_finds_the_store_behind_is_refused_and_the_group_goes_on() {
    const DELAY: Duration = Duration::from_millis(1000);
    let dir = StorageDir::new("behind");
    // Two of this test's pushes (about 140 bytes of patch each) fit behind a commit.
    let d = on_a_slow_disk(&dir, DELAY, "max_pending_bytes = 200\n");
    let (mut writer, _) = Join::new("w", "behind").open_fresh(&d);
    // The first push is read, and its batch goes to the store thread at the end of that
    // turn of the loop (its commit waits DELAY), before the others arrive.
    let read = d.metric("syncgate_messages_in_total", &[]);
    push(&mut writer, "behind", "w", 1, &[insert("i1", "one")]);
    d.wait_metric("syncgate_messages_in_total", &[], read + 1, WAIT);
    push(&mut writer, "behind", "w", 2, &[insert("i2", "two")]);
    push(&mut writer, "behind", "w", 3, &[insert("i3", "three")]);
    push(&mut writer, "behind", "w", 4, &[insert("i4", "four")]);
    let chain = read_chain(&mut writer, "00", 3);
    let rows: Vec<Vec<Value>> = chain.iter().map(Poke::rows).collect();
    assert_eq!(rows, [vec![put("i1", "one")], vec![put("i2", "two")], vec![put("i3", "three")]]);
    let error = writer.expect_error("ServerOverloaded");
    assert!(error["message"].as_str().unwrap().contains("the store is behind"), "{error}");
    assert_eq!(
        (error["minBackoffMs"].as_u64(), error["maxBackoffMs"].as_u64()),
        (Some(1000), Some(10000))
    );
    writer.expect_close(1008);
    // The refused push changed nothing, and the group takes pushes again.
    let (mut again, poke) = Join::new("w2", "behind").open_fresh(&d);
    assert_eq!(poke.cookie, "03", "{poke:?}");
    push(&mut again, "behind", "w2", 1, &[insert("i4", "four")]);
    let poke = read_poke(&mut again);
    assert_eq!(poke.rows(), vec![put("i4", "four")]);
}

/// The store's disk is full: a push is not acknowledged (its commit fails, the client is sent
/// away to come back later), the worker stays up, and once space is back the same mutation,
/// sent again as the Zero client would, is committed and poked. A file-size limit on the
/// worker (`RLIMIT_FSIZE`, as `ulimit -f` or systemd's `LimitFSIZE=` set it) stands in for
/// the full disk: past it a write fails with `EFBIG` as it fails with `ENOSPC` on a full one.
/// Set once the worker runs, it lets SQLite's small files be and stops the worker's first
/// 1 MiB log segment.
#[test]
fn a_full_disk_acknowledges_nothing_and_the_worker_commits_again_once_space_is_back() {
    let dir = StorageDir::new("full");
    let (d, worker) = logging_worker(&dir);
    file_size_limit(worker, 256 * 1024);
    let (mut ws, _) = Join::new("c1", "full").open_fresh(&d);
    push(&mut ws, "full", "c1", 1, &[insert("r1", "one")]);
    // Not acknowledged: no poke; the client is sent away for a while (its client keeps the
    // mutation and sends it again).
    let msg = ws.recv_json();
    let kind = (&msg[0], &msg[1]["kind"]);
    assert_eq!(kind, (&json!("error"), &json!("ServerOverloaded")), "{msg}");
    let error = &msg[1];
    assert!(error["message"].as_str().unwrap().contains("could not store"), "{msg}");
    assert_eq!(
        (error["minBackoffMs"].as_u64(), error["maxBackoffMs"].as_u64()),
        (Some(1000), Some(10000))
    );
    ws.expect_close(1008);
    let logged = d.wait_log(|l| l.contains("storage:") && l.contains("too large"), WAIT);
    assert!(logged.contains("wal-"), "the log line names the file: {logged}");
    d.wait_log(|l| l.contains("clientGroupID=full: its commit failed; sending its clients"), WAIT);
    // Space is back.
    file_size_limit(worker, libc::RLIM_INFINITY);
    let (mut again, poke) = Join::new("c1", "full").open_fresh(&d);
    assert_eq!(poke.lmids()["c1"].as_u64(), None, "the failed push left nothing: {poke:?}");
    push(&mut again, "full", "c1", 1, &[insert("r1", "one")]);
    let poke = read_poke(&mut again);
    assert_eq!(poke.rows(), vec![put("r1", "one")]);
    assert_eq!(poke.lmids()["c1"].as_u64(), Some(1));
    assert_eq!(d.metric("syncgate_store_failures_total", &[]), 1, "the one failed commit");
    // The same worker all along: a full disk is an error, not a crash.
    assert_eq!(d.metric("syncgate_worker_restarts_total", &[]), 0);
    assert!(d.children().iter().any(|(pid, _)| *pid == worker));
    // And it is durable: a restart without the limit finds it.
    stop(d);
    let d = Daemon::start(&format!("workers = 1\n{QUIET}{}", dir.config()));
    let (_, poke) = Join::new("c2", "full").open_fresh(&d);
    assert_eq!(poke.rows(), vec![put("r1", "one")]);
}

/// The disk fills while compaction folds the log into SQLite: the folds fail and are retried,
/// the log keeps every batch (pushes are still acknowledged from it, in new segments), and
/// once space is back the folds catch up, the log empties, and a restart finds every row.
/// The file-size limit lets the log's 1 MiB segments be and stops SQLite's files growing
/// past 1.25 MiB.
#[test]
fn compaction_on_a_full_disk_keeps_the_log_and_catches_up_once_space_is_back() {
    const ROW: usize = 2000;
    let dir = StorageDir::new("full-fold");
    let (d, worker) = logging_worker(&dir);
    file_size_limit(worker, 1280 * 1024);
    let (mut ws, _) = Join::new("c1", "fold").open_fresh(&d);
    let title = "x".repeat(ROW);
    let mut n = 0;
    let mut push_one = |ws: &mut Ws| {
        n += 1;
        push(ws, "fold", "c1", n, &[insert(&format!("r{n}"), &title)]);
        let poke = read_poke(ws);
        assert_eq!(poke.lmids()["c1"].as_u64(), Some(n), "push {n} acknowledged");
        n
    };
    // About 1.5 MiB of changes starts compaction, and SQLite reaches the limit.
    let failed = |l: &str| l.contains("compaction failed");
    while d.try_wait_line(failed, Duration::from_millis(1)).is_none() {
        let n = push_one(&mut ws);
        assert!(n < 5000, "no compaction failed after {n} pushes of {ROW} bytes");
    }
    // The log still takes pushes, into segments of its own.
    for _ in 0..600 {
        push_one(&mut ws);
    }
    let pushed = push_one(&mut ws);
    assert!(d.metric("syncgate_log_bytes", &[]) > 1 << 20, "the log holds what SQLite lacks");
    // Compaction waits between its tries (1 s, doubling), instead of trying at every batch.
    let tries = d.log_text().lines().filter(|l| failed(l)).count();
    assert!(tries <= 5, "{tries} failed folds while {pushed} pushes were taken");
    assert!(d.metric("syncgate_compaction_failures_total", &[]) >= 1);
    assert_eq!(d.metric("syncgate_store_failures_total", &[]), 0, "every push was acknowledged");
    // Space is back: the idle worker folds everything in and removes its segments.
    file_size_limit(worker, libc::RLIM_INFINITY);
    d.wait_metric("syncgate_log_bytes", &[], 0, Duration::from_secs(30));
    assert_eq!(d.metric("syncgate_worker_restarts_total", &[]), 0);
    stop(d);
    let d = Daemon::start(&format!("workers = 1\n{QUIET}{}", dir.config()));
    let (_, poke) = Join::new("c2", "fold").open_fresh(&d);
    assert_eq!(poke.lmids()["c1"].as_u64(), Some(pushed));
    assert_eq!(poke.rows().len() as u64, pushed, "every acknowledged row, once");
}

/// A one-worker daemon on `dir` whose worker commits to its write-ahead log, and that
/// worker's process id.
fn logging_worker(dir: &StorageDir) -> (Daemon, libc::pid_t) {
    let d = Daemon::start(&format!("workers = 1\n{QUIET}{}", dir.config()));
    d.wait_log(|l| l.contains("commits go to its write-ahead log"), WAIT);
    let worker = d.children().into_iter().find(|(_, a)| a.contains("__worker")).unwrap().0;
    (d, worker)
}

/// Sets the soft file-size limit (`RLIMIT_FSIZE`) of a running process of ours: past it a
/// write fails with `EFBIG`, as one fails with `ENOSPC` on a full disk.
fn file_size_limit(pid: libc::pid_t, bytes: libc::rlim_t) {
    let limit = libc::rlimit { rlim_cur: bytes, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: prlimit(2) on a process of ours, reading only `limit`.
    let done = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &limit, std::ptr::null_mut()) };
    assert_eq!(done, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// One worker on `dir`, whose store thread waits `delay` before each commit (a disk made
/// slow on purpose), with `storage` lines added to its `[storage]` section.
fn on_a_slow_disk(dir: &StorageDir, delay: Duration, storage: &str) -> Daemon {
    let delay = delay.as_millis();
    Daemon::start(&format!(
        "workers = 1\n{QUIET}\n{}test_sync_delay_ms = {delay}\n{storage}",
        dir.config()
    ))
}

/// What a pushing client reads next: a whole poke (with the lastMutationID it carries for the
/// client, if any), or the end of its connection.
enum Next {
    Poke(Option<u64>),
    Gone,
}

fn next_poke(ws: &mut Ws, client: &str) -> Next {
    let mut lmid = None;
    loop {
        match ws.recv_within(WAIT) {
            Got::Text(text) => {
                let msg: Value = serde_json::from_str(&text).expect("JSON message");
                match msg[0].as_str() {
                    Some("pokeStart") => {}
                    Some("pokePart") => {
                        if let Some(n) = msg[1]["lastMutationIDChanges"][client].as_u64() {
                            lmid = Some(n);
                        }
                    }
                    Some("pokeEnd") => return Next::Poke(lmid),
                    // Sent away (a drain's close follows): reconnect.
                    Some("error") => {}
                    _ => panic!("{client}: unexpected {msg}"),
                }
            }
            Got::Close(_) | Got::Gone(_) => return Next::Gone,
            other => panic!("{client}: expected a poke, got {other:?}"),
        }
    }
}

/// One client of its own group: pushes mutation after mutation (each inserts row `m<id>`),
/// each once the previous one's poke came, and reconnects (baseCookie null: the whole state)
/// whenever it is sent away, resending what was not acknowledged. Stops at `stop` once it
/// saw `more` acknowledgements after its last reconnect. Returns (the last mutation ID
/// acknowledged, how many times it reconnected).
fn pushing_client(
    addr: std::net::SocketAddr,
    client: &str,
    group: &str,
    acked_total: &std::sync::atomic::AtomicU64,
    stop: &std::sync::atomic::AtomicBool,
    more: u64,
) -> (u64, u32) {
    use std::sync::atomic::Ordering::Relaxed;
    let (mut acked, mut reconnects, mut since_reconnect) = (0u64, 0u32, 0u64);
    loop {
        let join = Join::new(client, group);
        let mut ws = {
            let mut tries = 0;
            loop {
                match Ws::connect(addr, &join.path(), Some(&join.header())) {
                    Ok(ws) => break ws,
                    Err(e) => {
                        tries += 1;
                        assert!(tries < 50, "{client}: cannot reconnect: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        };
        match ws.recv_within(WAIT) {
            Got::Text(text) if text.starts_with("[\"connected\"") => {}
            Got::Close(_) | Got::Gone(_) => continue,
            other => panic!("{client}: expected connected, got {other:?}"),
        }
        // The whole state: the server's lastMutationID for this client. Nothing acknowledged
        // may be missing from it.
        match next_poke(&mut ws, client) {
            Next::Poke(lmid) => {
                let lmid = lmid.unwrap_or(0);
                assert!(lmid >= acked, "{client}: acknowledged {acked}, the server has {lmid}");
                acked = lmid;
            }
            Next::Gone => continue,
        }
        loop {
            if stop.load(Relaxed) && since_reconnect >= more {
                return (acked, reconnects);
            }
            if !push_next(&mut ws, group, client, acked + 1) {
                break;
            }
            acked += 1;
            since_reconnect += 1;
            acked_total.fetch_add(1, Relaxed);
        }
        reconnects += 1;
        since_reconnect = 0;
    }
}

/// A change of the worker count under push load (a graceful replacement: the old workers
/// drain, close with 1012, and their clients reconnect to the new ones, which load the
/// groups from the store): no acknowledged mutation is lost, none is applied twice or out of
/// order, and every client catches up.
#[test]
fn a_worker_count_change_under_push_load_loses_and_reorders_nothing() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    const CLIENTS: usize = 6;
    let d = Daemon::start(&format!("drain_timeout_ms = 1000\n{QUIET}"));
    let acked = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let results: Vec<(u64, u32)> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let (addr, acked, stop) = (d.addr, &acked, &stop);
                s.spawn(move || {
                    pushing_client(addr, &format!("c{i}"), &format!("load{i}"), acked, stop, 10)
                })
            })
            .collect();
        // Under way, then the new worker count.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while acked.load(Relaxed) < 20 * CLIENTS as u64 {
            assert!(std::time::Instant::now() < deadline, "the clients do not push");
            std::thread::sleep(Duration::from_millis(10));
        }
        let config = std::fs::read_to_string(d.config_path()).unwrap();
        std::fs::write(d.config_path(), config.replace("workers = 2", "workers = 3")).unwrap();
        d.signal(libc::SIGHUP);
        d.wait_log(|l| l.contains("by graceful replacement") && l.contains("workers=3"), WAIT);
        for w in 0..WORKERS {
            let line = format!("worker {w} of the previous generation exited");
            d.wait_log(|l| l.contains(&line), Duration::from_secs(10));
        }
        stop.store(true, Relaxed);
        clients.into_iter().map(|c| c.join().expect("a client failed")).collect()
    });
    for (i, &(last, reconnects)) in results.iter().enumerate() {
        assert!(reconnects >= 1, "c{i} was never sent away by the drain");
        assert_holds_exactly(&d, &format!("c{i}"), &format!("load{i}"), last);
    }
}

/// One client of its own group that pushes until its connection dies (the daemon was
/// killed), counting acknowledgements; returns the last mutation ID acknowledged.
fn push_until_gone(
    addr: std::net::SocketAddr,
    client: &str,
    group: &str,
    acked_total: &std::sync::atomic::AtomicU64,
) -> u64 {
    let join = Join::new(client, group);
    let mut ws = Ws::connect(addr, &join.path(), Some(&join.header())).expect("connects");
    match ws.recv_within(WAIT) {
        Got::Text(text) if text.starts_with("[\"connected\"") => {}
        other => panic!("{client}: expected connected, got {other:?}"),
    }
    let Next::Poke(lmid) = next_poke(&mut ws, client) else { panic!("{client}: no first poke") };
    let mut acked = lmid.unwrap_or(0);
    while push_next(&mut ws, group, client, acked + 1) {
        acked += 1;
        acked_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    acked
}

/// Pushes mutation `n` of `client` (inserting row `m<n>`) and waits for the poke that
/// acknowledges it, which must be the next one; `false` if the connection went away first.
fn push_next(ws: &mut Ws, group: &str, client: &str, n: u64) -> bool {
    if !ws.try_send_json(&push_message(group, client, n, &[insert(&format!("m{n}"), "x")])) {
        return false;
    }
    match next_poke(ws, client) {
        Next::Poke(Some(lmid)) => {
            assert_eq!(lmid, n, "{client}: the pokes come in push order");
            true
        }
        Next::Poke(None) => panic!("{client}: a poke without its mutation"),
        Next::Gone => false,
    }
}

/// The group as a newcomer sees it: every acknowledged mutation's row, once each, and no
/// row of a mutation the server did not record (nothing half applied).
fn assert_holds_exactly(d: &Daemon, client: &str, group: &str, acknowledged: u64) {
    let (mut ws, poke) = Join::new(&format!("check-{client}"), group).open_fresh(d);
    let mut rows: Vec<u64> = poke
        .rows()
        .iter()
        .map(|r| r["value"]["id"].as_str().unwrap()[1..].parse().unwrap())
        .collect();
    rows.sort_unstable();
    let recorded = poke.lmids()[client].as_u64().unwrap_or(0);
    assert!(recorded >= acknowledged, "{client}: acknowledged {acknowledged}, recorded {recorded}");
    assert_eq!(rows, (1..=recorded).collect::<Vec<_>>(), "{client}: rows of its mutations");
    pong_next(&mut ws);
}

/// The batches a process (its log prefix, e.g. `supervisor[`) said it replayed from logs.
fn replayed_batches(d: &Daemon, process: &str) -> u64 {
    d.log_text()
        .lines()
        .filter(|l| l.contains(process))
        .filter_map(|l| l.split("replayed ").nth(1)?.strip_suffix(" into the store"))
        .filter_map(|rest| rest.split(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Files of the workers' write-ahead logs in the storage directory.
fn wal_files(storage: &StorageDir) -> usize {
    std::fs::read_dir(&storage.0 .0)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("wal-"))
        .count()
}

/// SIGKILL under push load, of one worker and then of the whole daemon. A push is
/// acknowledged once it is on the worker's write-ahead log, before SQLite has it: the
/// respawned worker replays its log before it serves, and the restarted daemon replays
/// every log before its workers start. Nothing acknowledged is lost; nothing is applied
/// twice or half.
#[test]
fn sigkill_under_push_load_loses_nothing_acknowledged() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    const CLIENTS: usize = 4;
    let storage = StorageDir::new("sigkill");
    let d = Daemon::start(&format!("{QUIET}{}", storage.config()));
    let groups: Vec<String> = (0..CLIENTS).map(|i| format!("kill{i}")).collect();
    // The worker that holds the most of these groups is the one killed.
    let victim = (0..WORKERS)
        .max_by_key(|&w| groups.iter().filter(|g| expected_worker(g) == w).count())
        .unwrap();
    let acked = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let wait_for_acks = |n: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while acked.load(Relaxed) < n {
            assert!(std::time::Instant::now() < deadline, "the clients do not push");
            std::thread::sleep(Duration::from_millis(10));
        }
    };

    // 1. One worker killed: its clients reconnect to its respawn and resend.
    let first: Vec<(u64, u32)> = std::thread::scope(|s| {
        let clients: Vec<_> = groups
            .iter()
            .enumerate()
            .map(|(i, group)| {
                let (addr, acked, stop) = (d.addr, &acked, &stop);
                s.spawn(move || pushing_client(addr, &format!("c{i}"), group, acked, stop, 5))
            })
            .collect();
        wait_for_acks(20 * CLIENTS as u64);
        assert!(wal_files(&storage) > 0, "the workers commit to their logs");
        let (pid, _) = d
            .children()
            .into_iter()
            .find(|(_, args)| {
                args.contains("__worker") && args.contains(&format!("--index {victim}"))
            })
            .expect("the worker runs");
        // SAFETY: kill(2) on a child of the daemon under test.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        d.wait_log(|l| l.contains(&format!("worker {victim} respawned")), WAIT);
        wait_for_acks(acked.load(Relaxed) + 10 * CLIENTS as u64);
        stop.store(true, Relaxed);
        clients.into_iter().map(|c| c.join().expect("a client failed")).collect()
    });
    let replayed = replayed_batches(&d, &format!("worker-{victim}["));
    assert!(replayed > 0, "the respawned worker replayed its log:\n{}", d.log_text());
    for (i, &(last, _)) in first.iter().enumerate() {
        assert_holds_exactly(&d, &format!("c{i}"), &groups[i], last);
    }

    // 2. The whole daemon killed (its workers die with it): the next start replays.
    let mut d = d;
    acked.store(0, Relaxed);
    let second: Vec<u64> = std::thread::scope(|s| {
        let clients: Vec<_> = groups
            .iter()
            .enumerate()
            .map(|(i, group)| {
                let (addr, acked) = (d.addr, &acked);
                s.spawn(move || push_until_gone(addr, &format!("c{i}"), group, acked))
            })
            .collect();
        wait_for_acks(20 * CLIENTS as u64);
        d.signal(libc::SIGKILL);
        clients.into_iter().map(|c| c.join().expect("a client failed")).collect()
    });
    d.wait_exit(WAIT).expect("the daemon dies");
    let d = Daemon::start(&format!("{QUIET}{}", storage.config()));
    assert!(replayed_batches(&d, "supervisor[") > 0, "the supervisor replayed the logs");
    assert_eq!(wal_files(&storage), 0, "the logs were replayed and removed at start");
    for (i, &last) in second.iter().enumerate() {
        assert!(last > first[i].0, "c{i} pushed after the restart of its worker");
        assert_holds_exactly(&d, &format!("c{i}"), &groups[i], last);
    }
}

/// A graceful replacement waits for every running worker to fold its write-ahead log into
/// SQLite; a worker that cannot (here stopped with SIGSTOP) makes the reload refused, the
/// running generation stays and goes back to its logs, and nothing acknowledged is lost.
#[test]
fn a_replacement_whose_worker_cannot_share_its_log_is_refused_and_loses_nothing() {
    let storage = StorageDir::new("share-refused");
    let config = format!("{QUIET}{}", storage.config());
    let mut d = Daemon::start(&config);
    let (mut ws, _) = Join::new("c", "shared").open_fresh(&d);
    push(&mut ws, "shared", "c", 1, &[insert("m1", "x")]);
    assert_eq!(read_poke(&mut ws).lmids(), json!({"c": 1}));
    let worker = expected_worker("shared");
    let pid = stop_worker_and_add_one(&d, &storage, worker);
    let refused = d.wait_log(|l| l.contains("reload refused"), Duration::from_secs(10));
    assert!(refused.contains("did not fold its write-ahead log in"), "{refused}");
    // SAFETY: kill(2) on a child of the daemon under test.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    // The same worker, the same connection, still serving.
    push(&mut ws, "shared", "c", 2, &[insert("m2", "x")]);
    assert_eq!(read_poke(&mut ws).lmids(), json!({"c": 2}));
    let workers = d.children().iter().filter(|(_, args)| args.contains("__worker")).count();
    assert_eq!(workers, WORKERS, "no new generation started");
    assert!(wal_files(&storage) > 0, "the running workers were given their logs back");
    drop(ws);
    d.signal(libc::SIGTERM);
    d.wait_exit(Duration::from_secs(10)).expect("the daemon stops");

    let d = Daemon::start(&config);
    let (_fresh, full) = Join::new("fresh", "shared").open_fresh(&d);
    assert_eq!(full.rows(), [put("m1", "x"), put("m2", "x")]);
    assert_eq!(full.lmids(), json!({"c": 2}));
}

/// Stops worker `index` (SIGSTOP) between two SQLite transactions, then asks the daemon for
/// one more worker (a graceful replacement, SIGHUP); returns the stopped worker's pid.
fn stop_worker_and_add_one(d: &Daemon, storage: &StorageDir, index: usize) -> libc::pid_t {
    let (pid, _) = d
        .children()
        .into_iter()
        .find(|(_, args)| args.contains("__worker") && args.contains(&format!("--index {index}")))
        .expect("the worker runs");
    // Stopped inside a transaction (an idle fold of its log), the worker would hold SQLite's
    // write lock and every other worker's fold would wait for it: stop it again until it
    // holds none.
    let db = rusqlite::Connection::open(storage.0 .0.join("syncgate.db")).unwrap();
    db.busy_timeout(Duration::ZERO).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        // SAFETY: kill(2) on a child of the daemon under test.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        while !stopped(pid) {
            assert!(std::time::Instant::now() < deadline, "worker {index} does not stop");
            std::thread::sleep(Duration::from_millis(1));
        }
        if db.execute_batch("BEGIN IMMEDIATE; ROLLBACK;").is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "worker {index} keeps the write lock");
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
        std::thread::sleep(Duration::from_millis(5));
    }
    let file = std::fs::read_to_string(d.config_path()).unwrap();
    assert!(file.contains("workers = 2"), "{file}");
    std::fs::write(d.config_path(), file.replace("workers = 2", "workers = 3")).unwrap();
    d.signal(libc::SIGHUP);
    pid
}

/// Whether every thread of process `pid` is stopped (state `T` in /proc).
fn stopped(pid: libc::pid_t) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().all(|task| {
        let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap_or_default();
        // The state follows the command name, which is in parentheses.
        stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T'))
    })
}

/// The slots (`wal-<slot>-<seq>`) that have write-ahead log files in the storage directory.
fn wal_slots(storage: &StorageDir) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(&storage.0 .0)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            Some(name.strip_prefix("wal-")?.split('-').next()?.to_string())
        })
        .collect()
}

/// A worker that dies while a graceful replacement waits for the logs to be folded in (here
/// killed after `Share` reached it, while stopped): the reload is refused, the respawned
/// worker replays the dead one's log before it serves, nothing acknowledged is lost, and the
/// next reload goes through.
#[test]
fn a_worker_that_dies_while_sharing_its_log_fails_the_reload_and_loses_nothing() {
    let storage = StorageDir::new("share-died");
    let d = Daemon::start(&format!("{QUIET}{}", storage.config()));
    let worker = expected_worker("dies");
    let other = (0..).map(|i| format!("lives{i}")).find(|g| expected_worker(g) != worker).unwrap();
    let (mut ws, _) = Join::new("c", "dies").open_fresh(&d);
    push(&mut ws, "dies", "c", 1, &[insert("m1", "x")]);
    assert_eq!(read_poke(&mut ws).lmids(), json!({"c": 1}));
    let (mut ow, _) = Join::new("o", &other).open_fresh(&d);
    push(&mut ow, &other, "o", 1, &[insert("m1", "x")]);
    assert_eq!(read_poke(&mut ow).lmids(), json!({"o": 1}));
    assert_eq!(wal_slots(&storage).len(), 2, "each worker logged its push");
    let pid = stop_worker_and_add_one(&d, &storage, worker);
    // `Share` went to both workers: the running one folds its log in and removes it.
    let deadline = std::time::Instant::now() + WAIT;
    while wal_slots(&storage).len() > 1 {
        assert!(std::time::Instant::now() < deadline, "the running worker kept its log");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill(2) on a child of the daemon under test.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let refused = d.wait_log(|l| l.contains("reload refused"), WAIT);
    assert!(refused.contains("exited while sharing"), "{refused}");
    d.wait_log(|l| l.contains(&format!("worker {worker} respawned")), WAIT);
    assert_holds_exactly(&d, "c", "dies", 1);
    let replayed = replayed_batches(&d, &format!("worker-{worker}["));
    assert_eq!(replayed, 1, "the respawn replayed the push:\n{}", d.log_text());
    assert_holds_exactly(&d, "o", &other, 1);
    // Nothing is left half done: the same reload, asked again, replaces the workers.
    d.signal(libc::SIGHUP);
    d.wait_log(|l| l.contains("by graceful replacement"), Duration::from_secs(15));
    assert_holds_exactly(&d, "c", "dies", 1);
    assert_holds_exactly(&d, "o", &other, 1);
}
