//! The real Zero client (`@rocicorp/zero` 1.9.0, the release that speaks protocol 51) against
//! the daemon: client groups, CRUD mutators, catch-up, auth states and a worker crash, as an
//! app would see them. Our own test client shares assumptions with the daemon; this one does
//! not, so what it accepts is what matters.
//!
//! tests/clients/zero/zero_client.mjs runs one scenario per invocation and prints what its
//! clients observed as JSON lines (it also records every message their sockets carried);
//! these tests check it against the daemon's own log. `scripts/test.sh` installs the package
//! (`npm ci` in tests/clients/zero) and says where node is (`SYNCGATE_TEST_NODE`). A missing
//! install fails the test with the command that fixes it: these tests never skip.
//!
//! Group sync at the protocol level, byte by byte, is tests/group_sync.rs.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::*;

/// How long one scenario event may take to arrive: the slowest step is a reconnect after a
/// lost socket (the client may sleep 5 s first), plus starting node on a busy machine.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The package directory, after checking that the pinned client is installed there.
fn zero_dir() -> PathBuf {
    let dir = repo_root().join("tests/clients/zero");
    let manifest = dir.join("node_modules/@rocicorp/zero/package.json");
    let installed = std::fs::read_to_string(&manifest).unwrap_or_default();
    let version = serde_json::from_str::<Value>(&installed).ok().map(|p| p["version"].clone());
    assert_eq!(
        version,
        Some(json!("1.9.0")),
        "@rocicorp/zero 1.9.0 is not installed in {}. Run scripts/test.sh, or: \
         (cd tests/clients/zero && npm ci --ignore-scripts)",
        dir.display()
    );
    dir
}

/// One run of the scenario script, read as it goes.
struct Scenario {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    /// Stdout lines, forwarded by a reader thread as they arrive.
    lines: Receiver<String>,
    /// Every event received so far.
    events: Vec<Value>,
    /// Zero's log (stderr), for failure messages.
    stderr: Arc<Mutex<String>>,
}

impl Scenario {
    /// Starts `scenario` against `d` with `env` added to the script's environment.
    fn start(d: &Daemon, scenario: &str, env: &[(&str, String)]) -> Scenario {
        let dir = zero_dir();
        let mut cmd = Command::new(node());
        cmd.current_dir(&dir)
            .arg("zero_client.mjs")
            .arg(scenario)
            .env("ZERO_SERVER", format!("http://{}", d.addr))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        let (mut child, lines, stderr) = spawn_node_client(cmd);
        let stdin = child.stdin.take();
        Scenario { name: scenario.into(), child, stdin, lines, events: Vec::new(), stderr }
    }

    /// Everything known about the run, for a failure message.
    fn report(&self) -> String {
        let events: Vec<String> = self.events.iter().map(Value::to_string).collect();
        format!(
            "scenario {}\n--- events ---\n{}\n--- Zero's log (last 8 KiB) ---\n{}",
            self.name,
            events.join("\n"),
            tail(&self.stderr.lock().unwrap(), 8192)
        )
    }

    /// Waits for the event named `name`; fails on a `failed` event, an exit or the timeout.
    fn event(&mut self, name: &str) -> Value {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            if let Some(e) = self.events.iter().find(|e| e["event"] == name) {
                return e.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let event: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                        panic!("not a JSON line ({e}): {line}\n{}", self.report())
                    });
                    let failed = event["event"] == "failed";
                    self.events.push(event);
                    assert!(!failed, "the Zero client script failed\n{}", self.report());
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no `{name}` event within {EVENT_TIMEOUT:?}\n{}", self.report())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().expect("wait for node");
                    panic!("the script ended ({status}) before `{name}`\n{}", self.report())
                }
            }
        }
    }

    /// Sends the script its go-ahead line.
    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}").expect("write to the script");
        stdin.flush().unwrap();
    }

    /// Waits for `done` and a successful exit.
    fn finish(mut self) {
        self.event("done");
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for node") {
                assert!(status.success(), "the script exited with {status}\n{}", self.report());
                return;
            }
            assert!(Instant::now() < deadline, "the script did not exit\n{}", self.report());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.report());
        }
    }
}

fn tail(text: &str, bytes: usize) -> &str {
    let mut start = text.len().saturating_sub(bytes);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("no string {key:?} in {v}"))
}

/// The complete pokes among a socket's received messages: `{start, parts, end}` each.
fn pokes_in(received: &Value) -> Vec<Value> {
    let mut pokes = Vec::new();
    let mut current: Option<Value> = None;
    for m in received.as_array().expect("received messages") {
        match m[0].as_str() {
            Some("pokeStart") => current = Some(json!({"start": m[1], "parts": []})),
            Some("pokePart") => {
                if let Some(p) = current.as_mut() {
                    p["parts"].as_array_mut().unwrap().push(m[1].clone());
                }
            }
            Some("pokeEnd") => {
                if let Some(mut p) = current.take() {
                    if m[1]["cancel"] != true {
                        p["end"] = m[1].clone();
                        pokes.push(p);
                    }
                }
            }
            _ => {}
        }
    }
    pokes
}

/// The row patches of a poke, in order.
fn row_patches(poke: &Value) -> Vec<Value> {
    let parts = poke["parts"].as_array().into_iter().flatten();
    parts.flat_map(|p| p["rowsPatch"].as_array().into_iter().flatten()).cloned().collect()
}

/// The `issue` rows as the scenario prints a client's view.
fn rows(pairs: &[(&str, &str)]) -> Value {
    Value::Array(pairs.iter().map(|(id, title)| json!({"id": id, "title": title})).collect())
}

/// Checks the daemon's log: `client` connected to `group` on the worker the group hashes to,
/// `times` times in all.
fn assert_connected(d: &Daemon, client: &str, group: &str, times: usize) {
    let e = d.wait_event("connected", &[("clientID", client), ("clientGroupID", group)], WAIT);
    assert_eq!(e.worker, expected_worker(group), "{}", e.line);
    let n = d
        .events()
        .iter()
        .filter(|e| e.matches("connected", &[("clientID", client), ("clientGroupID", group)]))
        .count();
    assert_eq!(n, times, "connections of {client} in the daemon's log:\n{}", d.log_text());
}

#[test]
fn two_zero_clients_of_one_group_sync_crud_and_stay_connected() {
    let d = Daemon::start("");
    let mut run = Scenario::start(&d, "group", &[]);
    let connected = run.event("connected");
    let (a, b) = (str_of(&connected, "a"), str_of(&connected, "b"));
    let group = str_of(&connected, "groupA");
    assert_ne!(a, b);
    assert_eq!(connected["groupB"], group, "one process, one storage key: one client group");
    assert_connected(&d, a, group, 1);
    assert_connected(&d, b, group, 1);

    // Each step waited in the script for B's view; the values are checked here as well.
    assert_eq!(run.event("inserted")["b"], rows(&[("i1", "one")]));
    assert_eq!(run.event("updated")["b"], rows(&[("i1", "two")]));
    assert_eq!(run.event("upserted")["b"], rows(&[("i1", "three")]));
    assert_eq!(run.event("deleted")["b"], rows(&[]));
    assert_eq!(run.event("reverse")["a"], rows(&[("i2", "from b")]));

    let idle = run.event("idle");
    for who in ["a", "b"] {
        let c = &idle[who];
        assert_eq!(c["statesDuringIdle"], json!([]), "{who} changed state while idle: {c}");
        assert_eq!(c["states"].as_array().unwrap().last(), Some(&json!("connected")), "{c}");
        assert_eq!(c["sockets"], 1, "{who} reconnected: {c}");
        assert_eq!(c["errors"], json!([]), "{who} got errors: {c}");
        assert_eq!(c["updateNeeded"], json!([]), "{who} was told to reload: {c}");
        let pings = c["after"]["pings"].as_u64().unwrap() - c["before"]["pings"].as_u64().unwrap();
        let pongs = c["after"]["pongs"].as_u64().unwrap() - c["before"]["pongs"].as_u64().unwrap();
        assert!(pings >= 2, "{who} should have pinged at least twice in 12.5 s idle: {c}");
        assert!(pongs >= pings, "{who}: every ping must be answered: {c}");
        assert_eq!(c["rows"], rows(&[("i2", "from b")]));
    }
    run.finish();
    for client in [a, b] {
        d.wait_event("closed", &[("clientID", client)], WAIT);
    }
    assert_eq!(d.metric("syncgate_keepalive_timeouts_total", &[]), 0);
    assert_eq!(d.metric("syncgate_protocol_errors_total", &[]), 0);
}

#[test]
fn a_reconnecting_zero_client_catches_up_from_its_base_cookie() {
    catch_up(false);
}

#[test]
fn a_zero_client_that_lost_a_poke_unapplied_catches_up_from_the_cookie_it_applied() {
    catch_up(true);
}

/// The `catchup` scenario: A goes offline, B mutates, A reconnects with its cookie and must
/// receive exactly what it missed since that cookie. `drop_unapplied`: A's socket drops
/// while a poke it received is still unapplied, so A presents the cookie before it.
fn catch_up(drop_unapplied: bool) {
    let d = Daemon::start("");
    let env: &[(&str, String)] =
        if drop_unapplied { &[("ZERO_DROP_UNAPPLIED", "1".to_string())] } else { &[] };
    let mut run = Scenario::start(&d, "catchup", env);
    let offline = run.event("offline");
    let held = str_of(&offline, "heldCookie").to_string();
    let (a, b) = (str_of(&offline, "a").to_string(), str_of(&offline, "b").to_string());
    let back = run.event("reconnected");
    run.finish();

    // The client came back presenting a cookie it completed before going offline: the last
    // one it received, or an earlier one if it had not applied the last pokes yet (it
    // buffers pokes for a setTimeout and drops the buffer on disconnect; rare by chance,
    // forced by `drop_unapplied`).
    let presented = str_of(&back["params"], "baseCookie").to_string();
    if drop_unapplied {
        assert_ne!(presented, held, "the poke cut off was not applied: {back}");
    }
    let before = pokes_in(&back["before"]);
    let applied = before
        .iter()
        .position(|p| p["end"]["cookie"] == presented.as_str())
        .unwrap_or_else(|| panic!("A presented {presented}, not a cookie it completed: {back}"));
    assert_eq!(before.last().unwrap()["end"]["cookie"], held, "{back}");
    assert_eq!(back["params"]["lmid"], "1", "{back}");
    let pokes = back["pokes"].as_array().expect("pokes");
    let first = &pokes[0];
    assert_eq!(back["received"][0][0], "connected", "{back}");
    assert_eq!(back["received"][1][0], "pokeStart", "the catch-up comes first: {back}");
    assert_eq!(first["start"]["baseCookie"], presented, "catch-up from its cookie: {back}");
    for poke in pokes {
        assert!(!poke["start"]["baseCookie"].is_null(), "a full resync after a reconnect: {back}");
    }
    // Only what it missed since that cookie: B's row and mutation ID, and whatever the pokes
    // it received but did not apply carried; not the rows or mutation IDs it had.
    let unapplied = &before[applied + 1..];
    let mut want_rows: Vec<Value> = unapplied.iter().flat_map(row_patches).collect();
    want_rows.push(
        json!({"op": "put", "tableName": "issue", "value": {"id": "i2", "title": "missed by A"}}),
    );
    let mut got_rows = row_patches(first);
    for list in [&mut want_rows, &mut got_rows] {
        list.sort_by_key(|r| r["value"]["id"].as_str().unwrap_or_default().to_string());
        list.dedup();
    }
    assert_eq!(got_rows, want_rows, "{back}");
    // The last mutation ID a poke gives `who`, if any.
    let lmid = |p: &Value, who: &str| {
        let parts = p["parts"].as_array().into_iter().flatten();
        parts.filter_map(|part| part["lastMutationIDChanges"][who].as_u64()).max()
    };
    assert_eq!(lmid(first, &b), Some(1), "B's mutation is part of the catch-up: {back}");
    assert_eq!(
        lmid(first, &a),
        unapplied.iter().filter_map(|p| lmid(p, &a)).max(),
        "A's own ack is in the catch-up exactly when A had not applied it: {back}"
    );

    let a_view = &back["a"];
    assert_eq!(a_view["rows"], rows(&[("i1", "seen by both"), ("i2", "missed by A")]));
    assert_eq!(a_view["errors"], json!([]), "{back}");
    assert_eq!(a_view["updateNeeded"], json!([]), "{back}");
    assert_eq!(a_view["sockets"], 2);
    assert_eq!(back["b"]["sockets"], 1, "B stayed connected: {back}");
    let group = str_of(&back["params"], "clientGroupID");
    assert_connected(&d, &a, group, 2);
    assert_connected(&d, &b, group, 1);
}

#[test]
fn zero_client_auth_connects_with_a_valid_token_and_needs_auth_otherwise() {
    let d = Daemon::start(&auth_config());
    let bad_signature = sign(&json!({"sub": "mallory", "exp": now_secs() + 600}), "not-the-secret");
    let mut run = Scenario::start(
        &d,
        "auth",
        &[
            ("ZERO_USER", "alice".into()),
            ("ZERO_TOKEN", token("alice")),
            ("ZERO_USER_2", "mallory".into()),
            ("ZERO_BAD_TOKEN", bad_signature),
            ("ZERO_TOKEN_2", token("mallory")),
        ],
    );
    let good = run.event("good");
    assert_eq!(good["errors"], json!([]), "{good}");
    let e = d.wait_event("connected", &[("clientID", str_of(&good, "clientID"))], WAIT);
    assert_eq!(e.field("user"), Some("alice"));

    // Alice's valid token on a client that says it is mallory: Unauthorized.
    let other = run.event("wrong-user");
    assert_eq!(other["state"]["name"], "needs-auth", "{other}");
    assert_eq!(other["errors"][0][1]["kind"], "Unauthorized", "{other}");
    assert_eq!(other["errors"][0][1]["origin"], "zeroCache", "{other}");
    // A bad signature: AuthInvalidated.
    let refused = run.event("refused");
    assert_eq!(refused["state"]["name"], "needs-auth", "{refused}");
    assert_eq!(refused["errors"][0][1]["kind"], "AuthInvalidated", "{refused}");
    assert_eq!(refused["errors"][0][1]["origin"], "zeroCache", "{refused}");
    // By the refused sockets' wsids, not the clientIDs: the scenario goes on to bring the
    // bad-signature client back with a good token (below) without waiting for us, and that
    // new socket is rightly admitted under the same clientID.
    let refused_wsids: Vec<String> = [&other, &refused]
        .iter()
        .map(|c| {
            let e = d.wait_event("refused", &[("clientID", str_of(c, "clientID"))], WAIT);
            e.field("wsid").expect("a refused event names its wsid").to_string()
        })
        .collect();
    assert!(
        !d.events().iter().any(|e| e.event == "connected"
            && e.field("wsid").is_some_and(|w| refused_wsids.iter().any(|r| r == w))),
        "a refused socket was admitted:\n{}",
        d.log_text()
    );

    // `connection.connect({auth})` with mallory's own token brings it back.
    let recovered = run.event("recovered");
    assert_eq!(recovered["states"].as_array().unwrap().last(), Some(&json!("connected")));
    assert_eq!(recovered["sockets"], 2, "{recovered}");
    let e = d.wait_event("connected", &[("clientID", str_of(&recovered, "clientID"))], WAIT);
    assert_eq!(e.field("user"), Some("mallory"));
    run.finish();
}

#[test]
fn a_zero_client_survives_its_worker_killed_right_after_an_acknowledged_mutation() {
    let d = Daemon::start("");
    let mut run = Scenario::start(&d, "kill", &[]);
    let acked = run.event("acked");
    let (client, group) = (str_of(&acked, "clientID"), str_of(&acked, "clientGroupID"));
    let cookie = str_of(&acked, "cookie").to_string();
    let worker = expected_worker(group);
    let (pid, _) = d
        .children()
        .into_iter()
        .find(|(_, args)| {
            let args: Vec<&str> = args.split_whitespace().collect();
            args.first() == Some(&"__worker")
                && args.windows(2).any(|w| w[0] == "--index" && w[1] == worker.to_string())
        })
        .unwrap_or_else(|| panic!("no worker {worker} among {:?}", d.children()));
    // SAFETY: kill(2) on a process of the daemon under test.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    d.wait_log(|l| l.contains(&format!("worker {worker} respawned")), Duration::from_secs(10));
    run.say("respawned");

    let after = run.event("after");
    // It reconnected with what it held, and was not told to drop it. (It may have received
    // a poke after the acknowledgement and before the kill, its query's cleanup; a poke that
    // reached its socket just before the kill may not have been applied yet, and then it
    // reconnects from the cookie before: either is caught up from where it said it was.)
    let held = str_of(&after, "heldCookie");
    assert!(held >= cookie.as_str(), "the client went back from {cookie} to {held}: {after}");
    let base = str_of(&after["params"], "baseCookie");
    assert!(cookie.as_str() <= base && base <= held, "reconnected from {base}: {after}");
    assert_eq!(after["params"]["lmid"], "1", "{after}");
    assert_eq!(after["a"]["errors"], json!([]), "{after}");
    assert_eq!(after["a"]["updateNeeded"], json!([]), "{after}");
    assert_eq!(after["keptAfterReconnect"], rows(&[("k1", "before the kill")]), "{after}");
    for poke in after["pokes"].as_array().unwrap() {
        assert!(!poke["start"]["baseCookie"].is_null(), "a full resync: {after}");
    }
    assert_eq!(after["pokes"][0]["start"]["baseCookie"], base, "{after}");
    assert_eq!(
        after["a"]["rows"],
        rows(&[("k1", "before the kill"), ("k2", "after the kill")]),
        "{after}"
    );
    run.finish();

    // The store has both mutations: a new client with no data gets them from the server.
    let params = Params::new("probe", group);
    let init = json!(["initConnection", {"desiredQueriesPatch": []}]);
    let mut probe = d.connected(&params, Some(&protocol_header(None, Some(init))));
    let start = probe.recv_json();
    assert_eq!(start[0], "pokeStart", "{start}");
    assert_eq!(start[1]["baseCookie"], Value::Null);
    let part = probe.recv_json();
    assert_eq!(part[0], "pokePart", "{part}");
    assert_eq!(part[1]["lastMutationIDChanges"][client], 2, "{part}");
    let ids: Vec<&Value> = part[1]["rowsPatch"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|op| &op["value"]["id"])
        .collect();
    assert_eq!(ids, [&json!("k1"), &json!("k2")], "{part}");
    // So does what the client desires: it will not repeat its queries on a reconnect.
    let desired = part[1]["desiredQueriesPatches"][client].as_array().expect("desired queries");
    let got = part[1]["gotQueriesPatch"].as_array().expect("got queries");
    assert!(!desired.is_empty(), "the client's queries were forgotten: {part}");
    for query in desired {
        assert_eq!(query["op"], "put", "{part}");
        let got_it = got.iter().any(|g| g["op"] == "put" && g["hash"] == query["hash"]);
        assert!(got_it, "a desired query the group has not got: {part}");
    }
    assert!(d.metric("syncgate_worker_restarts_total", &[]) >= 1);
}

#[test]
fn a_rate_limited_zero_client_stays_connected_and_its_mutations_land_later() {
    let d =
        Daemon::start("[limits]\nper_user_mutations = 3\nper_user_mutations_window_ms = 1000\n");
    let mut run = Scenario::start(&d, "ratelimit", &[]);
    let limited = run.event("limited");
    assert_eq!(limited["acked"], 3, "{limited}");
    assert_eq!(limited["error"]["origin"], "zeroCache", "{limited}");
    let landed = run.event("landed");
    run.finish();
    assert_eq!(landed["statesSinceMutating"], json!([]), "the client left `connected`: {landed}");
    assert_eq!(landed["sockets"], 1, "{landed}");
    for error in landed["errors"].as_array().unwrap() {
        assert_eq!(error[1]["kind"], "MutationRateLimited", "{landed}");
    }
    let ids: Vec<String> = (1..=6).map(|i| format!("r{i}")).collect();
    let want: Vec<(&str, &str)> = ids.iter().map(|id| (id.as_str(), "x")).collect();
    assert_eq!(landed["rows"], rows(&want));
    assert_eq!(d.metric("syncgate_protocol_errors_total", &[]), 0);
}
