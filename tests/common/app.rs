//! The app: one real Zero client (`@rocicorp/zero` 1.9.0) with the schema of the upstream
//! fixture ([`super::upstream`]), run by tests/clients/zero-cache/front_door.mjs and driven over
//! JSON lines ([`AppClient`]). It connects wherever it is told: straight to zero-cache, or to
//! syncgate in front of it, as the user a [`Login`] says.
//!
//! What the script reports is kept as events (`{"event": ...}` objects, documented in the
//! script); a test waits for an event, for the client's rows, its connection state or an
//! acknowledgement, each under a deadline. The script's stderr (Zero's own log) and the events
//! are printed when a test fails.

use std::io::Write;
use std::process::{Child, ChildStdin, Command};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::host::{node, spawn_node_client};
use super::upstream::{tail_of, zero_cache_package};
use super::zero::token;

/// How long one expected client event may take: a reconnect after a lost socket may wait out
/// the client's backoff (up to 5 s), on a busy two-core machine.
pub const APP_WAIT: Duration = Duration::from_secs(30);

/// Who the client is: its userID and token (each optional), and its storage key.
#[derive(Debug, Clone, Default)]
pub struct Login {
    pub user: Option<String>,
    pub token: Option<String>,
    pub storage_key: Option<String>,
}

impl Login {
    /// A logged-out client: no userID, no token.
    pub fn anonymous() -> Login {
        Login::default()
    }

    /// `user` with a valid token for `user` ([`token`]: HS256 with the tests' `SECRET`, which
    /// both syncgate's and zero-cache's checks accept).
    pub fn user(user: &str) -> Login {
        Login { user: Some(user.into()), token: Some(token(user)), storage_key: None }
    }

    /// A userID without a token (a client that only claims to be `user`).
    pub fn claiming(user: &str) -> Login {
        Login { user: Some(user.into()), token: None, storage_key: None }
    }

    /// The same, with `token` instead (another user's, a forged one...).
    pub fn with_token(mut self, token: &str) -> Login {
        self.token = Some(token.into());
        self
    }

    /// The same, with this storage key.
    pub fn storage_key(mut self, key: &str) -> Login {
        self.storage_key = Some(key.into());
        self
    }
}

/// One running client script; killed when dropped.
pub struct AppClient {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Every event received so far, in order.
    events: Vec<Value>,
    /// The script's stderr (Zero's log).
    stderr: Arc<Mutex<String>>,
    /// Where it connects and as whom, for failure messages.
    label: String,
    next_seq: u64,
    /// The client's ID and its group's, from its `started` event.
    pub client_id: String,
    pub group: String,
}

impl AppClient {
    /// Starts a client against `url` (`ws://` or `http://HOST:PORT`, at most one path
    /// segment) as `login` and waits for its `started` event (it connects right after).
    pub fn start(url: &str, login: &Login) -> AppClient {
        let dir = zero_cache_package();
        let mut cmd = Command::new(node());
        cmd.current_dir(&dir)
            .arg("front_door.mjs")
            .env("ZERO_SERVER", url)
            .env_remove("ZERO_USER")
            .env_remove("ZERO_TOKEN")
            .env_remove("ZERO_STORAGE_KEY");
        for (name, value) in [
            ("ZERO_USER", &login.user),
            ("ZERO_TOKEN", &login.token),
            ("ZERO_STORAGE_KEY", &login.storage_key),
        ] {
            if let Some(value) = value {
                cmd.env(name, value);
            }
        }
        let (mut child, lines, stderr) = spawn_node_client(cmd);
        let label = format!(
            "client of {url} as user={:?} token={} storageKey={:?}",
            login.user,
            if login.token.is_some() { "yes" } else { "no" },
            login.storage_key
        );
        let mut client = AppClient {
            stdin: child.stdin.take(),
            child,
            lines,
            events: Vec::new(),
            stderr,
            label,
            next_seq: 0,
            client_id: String::new(),
            group: String::new(),
        };
        let started = client.wait_event("started", |e| e["event"] == "started");
        client.client_id = started["clientID"].as_str().unwrap_or_default().into();
        client.group = started["clientGroupID"].as_str().unwrap_or_default().into();
        client
    }

    /// Every event received so far.
    pub fn events(&mut self) -> &[Value] {
        self.drain();
        &self.events
    }

    /// The number of events received so far: a mark for
    /// [`wait_event_after`](Self::wait_event_after).
    pub fn mark(&mut self) -> usize {
        self.drain();
        self.events.len()
    }

    /// The first event (received so far or within [`APP_WAIT`]) that `pred` accepts.
    pub fn wait_event(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_event_after(0, what, pred)
    }

    /// The first event from index `mark` on that `pred` accepts, waiting up to [`APP_WAIT`];
    /// fails the test on a `fatal` event, the script's exit or the deadline.
    pub fn wait_event_after(
        &mut self,
        mark: usize,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_until(what, |events| events.iter().skip(mark).find(|e| pred(e)).cloned())
    }

    /// Waits until `check` (given every event so far) returns something, re-checked on each
    /// new event, up to [`APP_WAIT`].
    pub fn wait_until<T>(&mut self, what: &str, check: impl Fn(&[Value]) -> Option<T>) -> T {
        let deadline = Instant::now() + APP_WAIT;
        loop {
            if let Some(found) = check(&self.events) {
                return found;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.push_line(line),
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{what}: not within {APP_WAIT:?}\n{}", self.report())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().expect("wait for node");
                    panic!("the client script ended ({status}) before {what}\n{}", self.report())
                }
            }
        }
    }

    /// The client's current connection state (`connecting`, `connected`, `disconnected`,
    /// `needs-auth`, `error`, `closed`), from the events so far.
    pub fn state(&mut self) -> String {
        self.drain();
        last_state(&self.events).unwrap_or_default()
    }

    /// Waits until the client's current state is `state`; returns that state event.
    pub fn wait_state(&mut self, state: &str) -> Value {
        self.wait_until(&format!("state {state}"), |events| {
            let last = events.iter().rev().find(|e| e["event"] == "state")?;
            (last["state"] == state).then(|| last.clone())
        })
    }

    /// Waits for a state event from `mark` on whose state is `state` (it may have changed
    /// again since).
    pub fn wait_state_after(&mut self, mark: usize, state: &str) -> Value {
        self.wait_event_after(mark, &format!("a `{state}` state"), |e| {
            e["event"] == "state" && e["state"] == state
        })
    }

    /// The client's current rows `(id, owner, title)`, by id (its view of the query on
    /// `item`: every row it may see).
    pub fn rows(&mut self) -> Vec<(String, String, String)> {
        self.drain();
        last_rows(&self.events).unwrap_or_default()
    }

    /// Waits until the client's rows are exactly `want` (by id), and returns them.
    pub fn wait_rows(&mut self, want: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
        let want: Vec<(String, String, String)> =
            want.iter().map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())).collect();
        let what = format!("rows {want:?}");
        self.wait_until(&what, |events| last_rows(events).filter(|rows| *rows == want))
    }

    /// Waits until the server has answered the client's query (a `rows` event whose
    /// resultType is `complete`: the rows of the server's first answer) and returns the rows
    /// then. Unlike [`wait_rows`](Self::wait_rows), a wrong answer fails at once in the
    /// caller's assertion instead of at the deadline.
    pub fn wait_complete_rows(&mut self) -> Vec<(String, String, String)> {
        self.wait_until("the query's complete rows", |events| {
            let first =
                events.iter().find(|e| e["event"] == "rows" && e["resultType"] == "complete")?;
            last_rows(std::slice::from_ref(first))
        })
    }

    /// Waits until the client's rows satisfy `pred`, and returns them.
    pub fn wait_rows_where(
        &mut self,
        what: &str,
        pred: impl Fn(&[(String, String, String)]) -> bool,
    ) -> Vec<(String, String, String)> {
        self.wait_until(what, |events| last_rows(events).filter(|rows| pred(rows)))
    }

    /// Sends `command` (an object with `cmd`) and waits for its answer: the `ok` event, or a
    /// test failure on `failed`.
    pub fn command(&mut self, mut command: Value) -> Value {
        self.next_seq += 1;
        let seq = self.next_seq;
        command["seq"] = json!(seq);
        let line = command.to_string();
        {
            let stdin = self.stdin.as_mut().expect("stdin still open");
            writeln!(stdin, "{line}").expect("write to the client script");
            stdin.flush().unwrap();
        }
        let answer = self.wait_event(&format!("the answer to {line}"), |e| {
            (e["event"] == "ok" || e["event"] == "failed") && e["seq"] == seq
        });
        assert_eq!(answer["event"], "ok", "{line} failed: {answer}\n{}", self.report());
        answer
    }

    /// `z.mutate.item.insert(...)`; returns its mutation ID once the client applied it
    /// locally (see [`wait_acked`](Self::wait_acked) for the server's side).
    pub fn insert(&mut self, id: &str, owner: &str, title: &str) -> u64 {
        let ok = self
            .command(json!({"cmd": "insert", "row": {"id": id, "owner": owner, "title": title}}));
        ok["mutationID"].as_u64().unwrap_or_else(|| panic!("no mutationID in {ok}"))
    }

    /// Waits until the server acknowledged this client's mutations up to `mutation_id` (a
    /// poke's lastMutationIDChanges; also when zero-cache refused the mutation).
    pub fn wait_acked(&mut self, mutation_id: u64) {
        self.wait_event(&format!("the server's ack of mutation {mutation_id}"), |e| {
            e["event"] == "acked" && e["lmid"].as_u64().is_some_and(|n| n >= mutation_id)
        });
    }

    /// Waits until the server has the client's query (`z.run(query, {type: 'complete'})`).
    pub fn complete(&mut self) {
        self.command(json!({"cmd": "complete"}));
    }

    /// Gives the client new credentials (`z.connection.connect({auth})`).
    pub fn set_auth(&mut self, token: &str) {
        self.command(json!({"cmd": "auth", "token": token}));
    }

    /// How many sockets the client has opened so far (from its `socket-open` events).
    pub fn sockets_opened(&mut self) -> usize {
        self.drain();
        self.events.iter().filter(|e| e["event"] == "socket-open").count()
    }

    /// Closes the client (`z.close()`) and waits for the script to exit successfully.
    pub fn close(mut self) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{}", json!({"cmd": "close"})).expect("write to the client script");
        self.wait_event("closed", |e| e["event"] == "closed");
        let deadline = Instant::now() + APP_WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for node") {
                assert!(
                    status.success(),
                    "the client script exited with {status}\n{}",
                    self.report()
                );
                return;
            }
            assert!(Instant::now() < deadline, "the client script did not exit\n{}", self.report());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything known about the client, for failure messages.
    pub fn report(&self) -> String {
        let events: Vec<String> = self.events.iter().map(Value::to_string).collect();
        format!(
            "---- {} ----\n---- its events ----\n{}\n---- its Zero log (last 8 KiB) ----\n{}\n----",
            self.label,
            events.join("\n"),
            tail_of(&self.stderr.lock().unwrap(), 8192)
        )
    }

    fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.push_line(line);
        }
    }

    fn push_line(&mut self, line: String) {
        let event: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}\n{}", self.report()));
        let fatal = event["event"] == "fatal";
        self.events.push(event);
        assert!(!fatal, "the client script failed\n{}", self.report());
    }
}

impl Drop for AppClient {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            // What arrived since, without the checks that panic (a second panic aborts).
            while let Ok(line) = self.lines.try_recv() {
                self.events.push(serde_json::from_str(&line).unwrap_or(Value::String(line)));
            }
            eprintln!("{}", self.report());
        }
    }
}

fn last_state(events: &[Value]) -> Option<String> {
    let last = events.iter().rev().find(|e| e["event"] == "state")?;
    last["state"].as_str().map(String::from)
}

fn last_rows(events: &[Value]) -> Option<Vec<(String, String, String)>> {
    let last = events.iter().rev().find(|e| e["event"] == "rows")?;
    let rows = last["rows"].as_array()?;
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    Some(rows.iter().map(|r| (text(&r["id"]), text(&r["owner"]), text(&r["title"]))).collect())
}
