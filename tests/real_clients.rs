//! Real third-party clients through the full path (listener, handoff, worker): Python
//! `websockets` and Node `ws`. Our own test client shares assumptions with the daemon; these do
//! not, so they catch what it cannot (the exact 101, the subprotocol echo, close handling).
//!
//! The scripts live in tests/clients/; `scripts/test.sh` installs what they need and tells the
//! tests where it is (`SYNCGATE_TEST_PYTHON`, `SYNCGATE_TEST_NODE`). A missing tool fails the
//! test with the command that installs it: these tests never skip.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// How long a client script may take; it needs well under a second.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(30);

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("SYNCGATE_TEST_PYTHON") {
        return p.into();
    }
    let venv = repo_root().join(".venv/bin/python");
    if venv.exists() {
        venv
    } else {
        "python3".into()
    }
}

/// Runs `cmd` to completion (killing it at [`SCRIPT_TIMEOUT`]).
fn run(mut cmd: Command) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {shown}: {e}. Run scripts/test.sh, which installs the test clients.")
        });
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    while child.try_wait().expect("wait for the client").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("client output")
}

/// Checks that the client script passed every step; returns the extensions it negotiated.
fn assert_success(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for step in [
        "handshake ok",
        "connected ok",
        "ping/pong ok",
        "big ping ok",
        "websocket ping ok",
        "close ok",
    ] {
        assert!(stdout.contains(step), "{what} did not report {step:?}:\n{stdout}");
    }
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("extensions:"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Fails with the install command if Python or its `websockets` package is missing.
fn require_python_websockets() -> PathBuf {
    let py = python();
    let mut cmd = Command::new(&py);
    cmd.args(["-c", "import websockets"]);
    let out = run(cmd);
    assert!(
        out.status.success(),
        "Python `websockets` is not available to {} ({}). Run scripts/test.sh, or: python3 -m venv .venv && \
         .venv/bin/pip install -r tests/clients/requirements.txt",
        py.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    py
}

/// Fails with the install command if Node or the `ws` package is missing.
fn require_node_ws() -> (PathBuf, PathBuf) {
    let dir = repo_root().join("tests/clients/node");
    assert!(
        dir.join("node_modules/ws/package.json").exists(),
        "the Node `ws` package is not installed in {}. Run scripts/test.sh, or: (cd tests/clients/node && npm ci)",
        dir.display()
    );
    let mut cmd = Command::new(node());
    cmd.arg("--version");
    let out = run(cmd);
    assert!(out.status.success(), "node does not run: {out:?}");
    (node(), dir)
}

/// Runs the Python client against `d` and checks the daemon saw the session; returns the
/// extensions the client negotiated.
fn python_session(d: &Daemon, params: &Params, header: &str) -> String {
    let py = require_python_websockets();
    let mut cmd = Command::new(py);
    cmd.arg(repo_root().join("tests/clients/python_client.py"))
        .arg("--url")
        .arg(format!("ws://{}{}", d.addr, params.path()))
        .arg("--protocol")
        .arg(header)
        .arg("--wsid")
        .arg(&params.wsid);
    let extensions = assert_success("the Python websockets client", &run(cmd));
    daemon_saw_session(d, params);
    extensions
}

/// Runs the Node client against `d` and checks the daemon saw the session; returns the
/// extensions the client negotiated.
fn node_session(d: &Daemon, params: &Params, header: &str) -> String {
    let (node, dir) = require_node_ws();
    let mut cmd = Command::new(node);
    cmd.current_dir(&dir)
        .arg("client.mjs")
        .arg(format!("ws://{}{}", d.addr, params.path()))
        .arg(header)
        .arg(&params.wsid);
    let extensions = assert_success("the Node ws client", &run(cmd));
    daemon_saw_session(d, params);
    extensions
}

fn daemon_saw_session(d: &Daemon, params: &Params) {
    let e =
        d.wait_event("connected", &[("clientID", &params.client_id), ("wsid", &params.wsid)], WAIT);
    assert_eq!(e.worker, expected_worker(&params.group), "{}", e.line);
    d.wait_event("closed", &[("clientID", &params.client_id)], WAIT);
    assert_eq!(d.metric("syncgate_protocol_errors_total", &[]), 0, "the session must end cleanly");
}

#[test]
fn python_websockets_client_completes_a_session() {
    let d = Daemon::start("");
    let params = Params::new("py-client", "py-group").wsid("py-wsid");
    let header = protocol_header(None, Some(captured_init_connection("py-client")));
    let extensions = python_session(&d, &params, &header);
    assert_eq!(extensions, "", "compression is off by default: nothing may be negotiated");
}

#[test]
fn python_websockets_client_with_a_token_completes_a_session() {
    let d = Daemon::start(&format!("{}required = true\n", auth_config()));
    let params = Params::new("py-alice", "py-group").user("alice").wsid("py-wsid");
    let header = protocol_header(Some(&token("alice")), Some(captured_init_connection("py-alice")));
    python_session(&d, &params, &header);
    let e = d.wait_event("connected", &[("clientID", "py-alice")], WAIT);
    assert_eq!(e.field("user"), Some("alice"));
}

#[test]
fn node_ws_client_completes_a_session() {
    let d = Daemon::start(&auth_config());
    let params = Params::new("node-client", "node-group").user("alice").wsid("node-wsid");
    let header =
        protocol_header(Some(&token("alice")), Some(captured_init_connection("node-client")));
    let extensions = node_session(&d, &params, &header);
    assert_eq!(extensions, "", "compression is off by default: nothing may be negotiated");
}

/// With `compression.enabled` both clients' permessage-deflate offers are accepted
/// (docs/SECURITY.md, "Compression DoS"), and their compressed 4 KiB message is inflated correctly.
#[test]
fn real_clients_negotiate_permessage_deflate_when_enabled() {
    let d = Daemon::start("[compression]\nenabled = true\n");
    let params = Params::new("py-deflate", "deflate-group").wsid("py-wsid");
    let extensions = python_session(&d, &params, &anon_header());
    assert!(
        extensions.starts_with("permessage-deflate"),
        "Python client negotiated {extensions:?}"
    );
    let params = Params::new("node-deflate", "deflate-group").wsid("node-wsid");
    let extensions = node_session(&d, &params, &anon_header());
    assert!(extensions.contains("permessage-deflate"), "Node client negotiated {extensions:?}");
}
