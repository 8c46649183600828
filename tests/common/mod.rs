//! The harness of the end-to-end tests: it runs the real `syncgate` binary on an ephemeral
//! port and talks to it the way clients do, over real sockets.
//!
//! - [`Daemon`] starts the binary with a config file of the test's own, waits for its `ready`
//!   line, exposes its stderr as parsed log events (so a test can wait for an event instead of
//!   sleeping), reads its metrics, and kills it when dropped.
//! - [`Ws`] is a small synchronous WebSocket client on `tungstenite`, with deadlines on every
//!   read, that answers pings the way a browser does.
//! - [`RawConn`] is a WebSocket client that does nothing on its own: it never answers a ping,
//!   which is how a dead or hung peer looks to the server.
//! - [`http`] sends raw bytes and reads a raw HTTP answer, for the plain HTTP routes and for
//!   malformed requests no HTTP library would send.
//! - [`token`] and [`protocol_header`] build what a Zero client puts in `Sec-WebSocket-Protocol`.
//!
//! Nothing here sleeps in place of waiting for something: every wait is for a message, a log
//! line, a socket event, a process exit or a metric value, under a deadline (the last two are
//! polled, as there is nothing to block on).

// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest as _;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// The task id every test daemon runs with, so a test can compute a group's worker itself.
pub const TASK_ID: &str = "test";
/// Workers per test daemon: two is the smallest count where routing can go wrong, and tests
/// run in parallel on a small machine.
pub const WORKERS: usize = 2;
/// The HS256 secret of the daemons that check tokens.
pub const SECRET: &str = "syncgate-test-secret";
/// Default deadline for one expected event: generous, because tests run in parallel on two
/// cores; a passing test never waits this long.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long the daemon gets to start and to stop before the harness gives up on it.
const START_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings every test daemon gets before the test's own; a short drain keeps teardown fast.
const BASE_CONFIG: &str = "\
listen = \"127.0.0.1:0\"
workers = 2
task_id = \"test\"
log_level = \"info\"
drain_timeout_ms = 1000
";

/// Config lines that turn token checking on with [`SECRET`].
pub fn auth_config() -> String {
    format!("[auth]\nsecret = \"{SECRET}\"\n")
}

// ---------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------

/// One running `syncgate`, killed when dropped.
pub struct Daemon {
    /// The supervisor process; its children die with it (PR_SET_PDEATHSIG).
    child: Child,
    /// Where it listens (the ephemeral port it reported in its ready line).
    pub addr: SocketAddr,
    /// Stderr lines, forwarded by the reader thread as they arrive.
    lines: Receiver<String>,
    /// Every line received so far, so a wait can also match an event that already happened.
    seen: Mutex<Vec<String>>,
    /// The config file, removed on drop.
    config_path: PathBuf,
}

/// A unique path per daemon in this process (tests of one binary may run in one process).
fn temp_config_path() -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    std::env::temp_dir().join(format!("syncgate-test-{}-{n}-{nanos}.toml", std::process::id()))
}

impl Daemon {
    /// Starts the daemon with [`BASE_CONFIG`] plus `extra` (TOML: tables such as
    /// `[keepalive]`; top-level keys, which override the base's, only before any table) and
    /// waits until it is ready.
    ///
    /// The per-address and per-clientID attempt limits are raised unless the test sets them
    /// (inside the test's own `[limits]` table if it has one): every test connects from
    /// 127.0.0.1 and some open dozens of sockets, and those limits have tests of their own.
    pub fn start(extra: &str) -> Daemon {
        Daemon::start_env(extra, &[])
    }

    /// Like [`Daemon::start`], with `SYNCGATE_*` (or other) variables in the daemon's
    /// environment. Nothing else of the caller's `SYNCGATE_*` environment reaches it.
    pub fn start_env(extra: &str, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_with(extra, env, |_| {})
    }

    /// Like [`Daemon::start_env`], with `adjust` applied to the command before it starts
    /// (e.g. resource limits set in `pre_exec`).
    pub fn start_with(
        extra: &str,
        env: &[(&str, &str)],
        adjust: impl FnOnce(&mut Command),
    ) -> Daemon {
        let raised: String = ["connect_per_ip", "connect_per_client"]
            .iter()
            .filter(|key| !extra.contains(&format!("{key} =")))
            .map(|key| format!("{key} = 100000\n"))
            .collect();
        let extra = if extra.contains("[limits]\n") {
            extra.replacen("[limits]\n", &format!("[limits]\n{raised}"), 1)
        } else {
            format!("{extra}\n[limits]\n{raised}")
        };
        // A top-level key of the test's own replaces the base's (TOML forbids repeating it).
        let base: String = BASE_CONFIG
            .lines()
            .filter(|line| {
                let key = line.split('=').next().unwrap_or_default().trim();
                !extra.lines().any(|l| l.split('=').next().unwrap_or_default().trim() == key)
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let config = format!("{base}{extra}");
        let config_path = temp_config_path();
        std::fs::write(&config_path, &config).expect("write the test config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_syncgate"));
        cmd.arg("run").arg("--config").arg(&config_path);
        // Settings from the environment win over the file: keep the caller's out.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("SYNCGATE_") {
                cmd.env_remove(name);
            }
        }
        // Each daemon gets its own store, so tests that reuse group names never meet.
        if !extra.contains("[storage]") && !env.iter().any(|(k, _)| *k == "SYNCGATE_STORAGE_PATH") {
            cmd.env("SYNCGATE_STORAGE_PATH", config_path.with_extension("store"));
        }
        cmd.envs(env.iter().copied());
        adjust(&mut cmd);
        Daemon::spawn(cmd, config_path).unwrap_or_else(|log| {
            panic!("syncgate did not become ready; config:\n{config}\nlog:\n{log}")
        })
    }

    /// Starts `cmd` (a `syncgate run`) and waits for its ready line; on failure returns
    /// what it logged.
    pub fn spawn(mut cmd: Command, config_path: PathBuf) -> Result<Daemon, String> {
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start the syncgate binary");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut daemon = Daemon {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            lines: rx,
            seen: Mutex::new(Vec::new()),
            config_path,
        };
        let Some(ready) = daemon.try_wait_line(|l| l.contains(" ready listen="), START_TIMEOUT)
        else {
            return Err(daemon.log_text());
        };
        daemon.addr = ready_addr(&ready).ok_or_else(|| format!("no address in: {ready}"))?;
        Ok(daemon)
    }

    /// The supervisor's process id.
    pub fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// Sends `signal` to the supervisor.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0, "kill({signal})");
    }

    /// Waits for the supervisor to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waitpid") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The config file the daemon reads (a reload test rewrites it).
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The supervisor's child processes: `(pid, role arguments)`, e.g. `__worker --index 1`.
    pub fn children(&self) -> Vec<(libc::pid_t, String)> {
        children_of(self.pid())
    }

    /// Moves lines that arrived into `seen`, waiting at most `timeout` for one.
    fn pull(&self, timeout: Duration) -> bool {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                let mut seen = self.seen.lock().unwrap();
                seen.push(line);
                seen.extend(self.lines.try_iter());
                true
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => {
                // The daemon closed stderr (it exited): nothing more will come.
                std::thread::sleep(timeout.min(Duration::from_millis(50)));
                false
            }
        }
    }

    /// The first log line (received so far or within `timeout`) that `pred` accepts.
    pub fn try_wait_line(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut checked = 0;
        loop {
            {
                let seen = self.seen.lock().unwrap();
                if let Some(l) = seen[checked..].iter().find(|l| pred(l)) {
                    return Some(l.clone());
                }
                checked = seen.len();
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            self.pull(deadline - now);
        }
    }

    /// Like [`try_wait_line`](Self::try_wait_line), failing the test on timeout.
    pub fn wait_log(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        self.try_wait_line(pred, timeout).unwrap_or_else(|| {
            panic!("no matching log line within {timeout:?}; log so far:\n{}", self.log_text())
        })
    }

    /// Waits for a worker event (`connected`, `refused`, `closed`, `displaced`) whose fields
    /// include every `(key, value)` of `fields`.
    pub fn wait_event(&self, event: &str, fields: &[(&str, &str)], timeout: Duration) -> LogEvent {
        let line = self
            .try_wait_line(
                |l| LogEvent::parse(l).is_some_and(|e| e.matches(event, fields)),
                timeout,
            )
            .unwrap_or_else(|| {
                panic!(
                    "no `{event}` log event with {fields:?} within {timeout:?}; log so far:\n{}",
                    self.log_text()
                )
            });
        LogEvent::parse(&line).expect("matched")
    }

    /// Every worker event received so far (after collecting what is waiting).
    pub fn events(&self) -> Vec<LogEvent> {
        self.pull(Duration::ZERO);
        self.seen.lock().unwrap().iter().filter_map(|l| LogEvent::parse(l)).collect()
    }

    /// The log so far, one string, for failure messages.
    pub fn log_text(&self) -> String {
        self.pull(Duration::ZERO);
        self.seen.lock().unwrap().join("\n")
    }

    /// `GET /metrics`, the body.
    pub fn metrics(&self) -> String {
        let r = http(self.addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(r.status, 200, "GET /metrics: {}", r.head);
        String::from_utf8(r.body).expect("metrics are UTF-8")
    }

    /// The sum of every sample of `name` whose labels include all of `labels` (so no labels
    /// gives the total over every process).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        metric_value(&self.metrics(), name, labels)
    }

    /// Waits until `metric(name, labels)` equals `want` (counters are written by the worker
    /// after it acted, so a test that saw the effect may read them a moment early).
    pub fn wait_metric(&self, name: &str, labels: &[(&str, &str)], want: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.metric(name, labels);
            if got == want {
                return;
            }
            if Instant::now() >= deadline {
                panic!("{name}{labels:?} is {got}, expected {want}; metrics:\n{}", self.metrics());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Opens a sync socket to this daemon.
    pub fn ws(&self, params: &Params, header: Option<&str>) -> Ws {
        Ws::connect(self.addr, &params.path(), header)
            .unwrap_or_else(|e| panic!("connect {}: {e}", params.path()))
    }

    /// Opens a sync socket and checks that it gets `connected` with its wsid.
    pub fn connected(&self, params: &Params, header: Option<&str>) -> Ws {
        let mut ws = self.ws(params, header);
        let msg = ws.recv_json();
        assert_eq!(msg[0], "connected", "first message of {}: {msg}", params.path());
        assert_eq!(msg[1]["wsid"], params.wsid, "connected must echo the wsid: {msg}");
        ws
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let running = matches!(self.child.try_wait(), Ok(None));
        if running {
            // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
            unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        }
        if running && self.wait_exit(STOP_TIMEOUT).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.config_path);
        let _ = std::fs::remove_dir_all(self.config_path.with_extension("store"));
        if std::thread::panicking() {
            eprintln!("---- syncgate log ----\n{}\n----------------------", self.log_text());
        }
    }
}

/// Live processes whose parent is `parent`, with their arguments after the program name.
pub fn children_of(parent: libc::pid_t) -> Vec<(libc::pid_t, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<libc::pid_t>() else { continue };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else { continue };
        let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:")).map(str::trim);
        let zombie = status.lines().any(|l| l.starts_with("State:") && l.contains('Z'));
        if ppid != Some(&parent.to_string()) || zombie {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> =
            cmdline.split(|&b| b == 0).skip(1).map(|a| String::from_utf8_lossy(a).into()).collect();
        out.push((pid, args.join(" ").trim().to_string()));
    }
    out
}

/// Whether process `pid` still exists (and is not a zombie).
pub fn alive(pid: libc::pid_t) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .is_ok_and(|s| !s.lines().any(|l| l.starts_with("State:") && l.contains('Z')))
}

/// The address of `... ready listen=127.0.0.1:PORT workers=N ...`.
fn ready_addr(line: &str) -> Option<SocketAddr> {
    let value = line.split_whitespace().find_map(|t| t.strip_prefix("listen="))?;
    value.parse().ok()
}

/// One worker event line: `... worker=N <event> key=value ...`.
#[derive(Debug, Clone)]
pub struct LogEvent {
    pub worker: usize,
    pub event: String,
    pub fields: Vec<(String, String)>,
    pub line: String,
}

impl LogEvent {
    pub fn parse(line: &str) -> Option<LogEvent> {
        let mut tokens = line.split_whitespace();
        let worker = tokens.by_ref().find_map(|t| t.strip_prefix("worker="))?.parse().ok()?;
        let event = tokens.next()?.trim_end_matches(':').to_string();
        let fields = tokens
            .filter_map(|t| t.split_once('='))
            // The last field before a free-text message ends with a colon.
            .map(|(k, v)| (k.to_string(), v.trim_end_matches(':').to_string()))
            .collect();
        Some(LogEvent { worker, event, fields, line: line.to_string() })
    }

    pub fn field(&self, key: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn matches(&self, event: &str, fields: &[(&str, &str)]) -> bool {
        self.event == event && fields.iter().all(|(k, v)| self.field(k) == Some(*v))
    }
}

/// See [`Daemon::metric`]; on the text of a Prometheus exposition.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    let mut total = 0;
    let mut found = false;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let has = |k: &str, v: &str| label_text.split(',').any(|p| p == format!("{k}=\"{v}\""));
        if labels.iter().all(|(k, v)| has(k, v)) {
            found = true;
            total +=
                value.parse::<u64>().unwrap_or_else(|_| panic!("not an integer sample: {line}"));
        }
    }
    assert!(found, "no sample of {name} with {labels:?} in:\n{text}");
    total
}

/// The worker a client group must land on (PROTOCOL.md: xxh32(taskID/cgID) % workers).
pub fn expected_worker(group: &str) -> usize {
    syncgate::protocol::route::worker_for(TASK_ID, group, WORKERS)
}

// ---------------------------------------------------------------------------------------------
// What a Zero client sends
// ---------------------------------------------------------------------------------------------

/// The connect parameters of one sync socket.
#[derive(Debug, Clone)]
pub struct Params {
    pub client_id: String,
    pub group: String,
    pub user: Option<String>,
    pub wsid: String,
    pub version: u32,
}

impl Params {
    pub fn new(client_id: &str, group: &str) -> Params {
        Params {
            client_id: client_id.into(),
            group: group.into(),
            user: None,
            wsid: format!("ws-{client_id}"),
            version: 51,
        }
    }

    pub fn user(mut self, user: &str) -> Params {
        self.user = Some(user.into());
        self
    }

    pub fn wsid(mut self, wsid: &str) -> Params {
        self.wsid = wsid.into();
        self
    }

    pub fn version(mut self, version: u32) -> Params {
        self.version = version;
        self
    }

    /// The request target, shaped like the 1.9.0 client's (zero-client-capture.md).
    pub fn path(&self) -> String {
        let user = self.user.as_deref().map(|u| format!("&userID={u}")).unwrap_or_default();
        format!(
            "/sync/v{}/connect?clientID={}&clientGroupID={}{user}&baseCookie=&ts=297.30944&lmid=0&wsid={}",
            self.version, self.client_id, self.group, self.wsid
        )
    }
}

/// The `Sec-WebSocket-Protocol` value for `{initConnectionMessage?, authToken?}`, encoded as
/// the client does: `encodeURIComponent(base64(JSON))`. Written here rather than borrowed from
/// the daemon so that a bug in the daemon's encoder cannot hide one in its decoder.
pub fn protocol_header(token: Option<&str>, init: Option<Value>) -> String {
    let mut body = serde_json::Map::new();
    if let Some(init) = init {
        body.insert("initConnectionMessage".into(), init);
    }
    if let Some(token) = token {
        body.insert("authToken".into(), Value::String(token.into()));
    }
    encode_protocol_json(&Value::Object(body).to_string())
}

/// `encodeURIComponent(base64_standard(json))`; base64's alphabet leaves only `+ / =` to escape.
pub fn encode_protocol_json(json: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(json)
        .replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D")
}

/// The header of a socket without a token (and without an initConnection).
pub fn anon_header() -> String {
    protocol_header(None, None)
}

/// The header carrying a valid token for `user`.
pub fn user_header(user: &str) -> String {
    protocol_header(Some(&token(user)), None)
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// An HS256 token over `claims`, signed with `secret`.
pub fn sign(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign a token")
}

/// A valid token for `user`, an hour from expiry.
pub fn token(user: &str) -> String {
    sign(&json!({"sub": user, "iat": now_secs(), "exp": now_secs() + 3600}), SECRET)
}

/// The initConnection the 1.9.0 client put in its header (zero-client-capture.md, "init").
pub fn captured_init_connection(client_id: &str) -> Value {
    json!(["initConnection", {
        "desiredQueriesPatch": [{"op": "put", "hash": "19040arbgigdy", "ast": {"table": "issue",
            "where": {"type": "simple", "left": {"type": "column", "name": "title"},
                      "right": {"type": "literal", "value": "x"}, "op": "="},
            "limit": 10, "orderBy": [["id", "desc"]]}, "ttl": 300000}],
        "clientSchema": {"tables": {"issue": {"columns": {"id": {"type": "string"},
            "title": {"type": "string"}}, "primaryKey": ["id"]}}},
        "activeClients": [client_id]
    }])
}

// ---------------------------------------------------------------------------------------------
// A WebSocket client
// ---------------------------------------------------------------------------------------------

/// A synchronous WebSocket client with a deadline on every read.
pub struct Ws {
    inner: WebSocket<TcpStream>,
    /// The `Sec-WebSocket-Protocol` value of the 101, as received.
    pub protocol_echo: Option<String>,
    /// WebSocket pings received (and answered) so far.
    pub pings: usize,
}

/// What a read ended with, besides a data message.
#[derive(Debug)]
pub enum Got {
    Text(String),
    Binary(Vec<u8>),
    /// A close frame: its code and reason (the client answers it).
    Close(Option<(u16, String)>),
    /// Nothing within the deadline.
    Timeout,
    /// The TCP connection ended (EOF, reset) or the WebSocket is over.
    Gone(String),
}

impl Ws {
    /// The opening handshake with an optional `Sec-WebSocket-Protocol` value. Tungstenite
    /// refuses a 101 that does not echo the offered protocol, so success proves the echo.
    pub fn connect(addr: SocketAddr, path: &str, protocol: Option<&str>) -> Result<Ws, String> {
        let mut req =
            format!("ws://{addr}{path}").into_client_request().map_err(|e| e.to_string())?;
        if let Some(p) = protocol {
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", p.parse().map_err(|e| format!("{e}"))?);
        }
        let stream = TcpStream::connect(addr).map_err(|e| format!("tcp connect: {e}"))?;
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let (inner, response) = tungstenite::client::client(req, stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => format!("handshake failed: {e}"),
            tungstenite::HandshakeError::Interrupted(_) => "handshake timed out".to_string(),
        })?;
        let protocol_echo = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().unwrap_or_default().to_string());
        Ok(Ws { inner, protocol_echo, pings: 0 })
    }

    /// The next text, binary or close frame, or the end, within `timeout`. Pings are answered
    /// on the way, as a browser does.
    pub fn recv_within(&mut self, timeout: Duration) -> Got {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Got::Timeout;
            }
            self.inner.get_mut().set_read_timeout(Some(left)).unwrap();
            match self.inner.read() {
                Ok(Message::Text(t)) => return Got::Text(t.to_string()),
                Ok(Message::Binary(b)) => return Got::Binary(b.to_vec()),
                Ok(Message::Close(frame)) => {
                    // Send our close answer now (tungstenite queued it).
                    let _ = self.inner.flush();
                    return Got::Close(frame.map(|f| (u16::from(f.code), f.reason.to_string())));
                }
                Ok(Message::Ping(_)) => {
                    self.pings += 1;
                    // Tungstenite queued the pong; it goes out on the next write or flush.
                    if let Err(e) = self.inner.flush() {
                        return Got::Gone(format!("answering a ping: {e}"));
                    }
                }
                Ok(Message::Pong(_)) | Ok(Message::Frame(_)) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    return Got::Timeout;
                }
                Err(e) => return Got::Gone(e.to_string()),
            }
        }
    }

    /// The next message, which must be a JSON text frame (within [`WAIT`]).
    pub fn recv_json(&mut self) -> Value {
        match self.recv_within(WAIT) {
            Got::Text(t) => {
                serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}"))
            }
            other => panic!("expected a JSON text message, got {other:?}"),
        }
    }

    pub fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string());
    }

    pub fn send_text(&mut self, text: &str) {
        self.inner.send(Message::text(text)).expect("send a text message");
    }

    pub fn send_binary(&mut self, bytes: &[u8]) {
        self.inner.send(Message::binary(bytes.to_vec())).expect("send a binary message");
    }

    /// `["ping",{}]` must be answered by `["pong",{}]`.
    pub fn ping_pong(&mut self) {
        self.send_json(&json!(["ping", {}]));
        let msg = self.recv_json_skipping_pokes();
        assert_eq!(msg, json!(["pong", {}]), "answer to a ping");
    }

    /// The next JSON text message that is not part of a poke: after `initConnection` the
    /// group sync pokes the client, and tests of other behaviour look past those messages.
    pub fn recv_json_skipping_pokes(&mut self) -> Value {
        loop {
            let msg = self.recv_json();
            let tag = msg[0].as_str().unwrap_or_default();
            if !matches!(tag, "pokeStart" | "pokePart" | "pokeEnd") {
                return msg;
            }
        }
    }

    /// Expects an error message of `kind` (with `origin: zeroCache`), returns its body.
    pub fn expect_error(&mut self, kind: &str) -> Value {
        let msg = self.recv_json_skipping_pokes();
        assert_eq!(msg[0], "error", "expected an {kind} error, got {msg}");
        assert_eq!(msg[1]["kind"], kind, "error kind: {msg}");
        assert_eq!(msg[1]["origin"], "zeroCache", "every error must carry origin zeroCache: {msg}");
        assert!(msg[1]["message"].is_string(), "error without a message: {msg}");
        msg[1].clone()
    }

    /// Expects a close frame with `code` next; returns its reason.
    pub fn expect_close(&mut self, code: u16) -> String {
        match self.recv_within(WAIT) {
            Got::Close(Some((got, reason))) => {
                assert_eq!(got, code, "close code (reason {reason:?})");
                reason
            }
            other => panic!("expected a close frame {code}, got {other:?}"),
        }
    }

    /// Expects the server to end the TCP connection after the close handshake.
    pub fn expect_gone(&mut self) {
        match self.recv_within(WAIT) {
            Got::Gone(_) => {}
            other => panic!("expected the connection to end, got {other:?}"),
        }
    }

    /// Reads for `time`, answering pings; returns what arrived. Stops early at a close or the
    /// end of the connection (which is then the last item).
    pub fn pump(&mut self, time: Duration) -> Vec<Got> {
        let deadline = Instant::now() + time;
        let mut out = Vec::new();
        loop {
            match self.recv_within(deadline.saturating_duration_since(Instant::now())) {
                Got::Timeout => return out,
                got @ (Got::Close(_) | Got::Gone(_)) => {
                    out.push(got);
                    return out;
                }
                got => out.push(got),
            }
        }
    }

    /// Reads until a WebSocket ping arrives (and is answered); fails after `timeout`.
    pub fn wait_ping(&mut self, timeout: Duration) {
        let before = self.pings;
        let deadline = Instant::now() + timeout;
        while self.pings == before {
            match self.recv_within(deadline.saturating_duration_since(Instant::now())) {
                Got::Timeout => panic!("no WebSocket ping within {timeout:?}"),
                got @ (Got::Close(_) | Got::Gone(_)) => {
                    panic!("connection ended while waiting for a ping: {got:?}")
                }
                _ => {}
            }
        }
    }

    /// Starts our close handshake with `code`.
    pub fn close(&mut self, code: u16) {
        self.inner
            .close(Some(tungstenite::protocol::CloseFrame {
                code: CloseCode::from(code),
                reason: "".into(),
            }))
            .expect("send close");
    }

    /// Keeps reading (and so answering pings) on a thread until [`Responder::stop`]; what a
    /// live client does while the test talks on another socket.
    pub fn respond_in_background(self) -> Responder {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut ws = self;
            let mut got = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                match ws.recv_within(Duration::from_millis(20)) {
                    Got::Timeout => {}
                    g @ Got::Gone(_) => {
                        got.push(g);
                        break;
                    }
                    g => got.push(g),
                }
            }
            (ws, got)
        });
        Responder { stop, handle }
    }
}

/// A [`Ws`] being read on a thread.
pub struct Responder {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(Ws, Vec<Got>)>,
}

impl Responder {
    /// Stops reading; gives back the client and everything it received meanwhile.
    pub fn stop(self) -> (Ws, Vec<Got>) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("responder thread")
    }
}

// ---------------------------------------------------------------------------------------------
// A raw WebSocket peer that never answers anything
// ---------------------------------------------------------------------------------------------

/// A WebSocket client that does only what the test tells it: a hung or vanished peer.
pub struct RawConn {
    pub stream: TcpStream,
    /// Bytes read but not yet parsed into frames.
    buf: Vec<u8>,
}

/// One server frame, or how reading ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RawEvent {
    Frame { opcode: u8, payload: Vec<u8> },
    Eof,
    Timeout,
}

impl RawConn {
    /// Sends the opening handshake and reads the 101; fails the test unless it is a 101.
    pub fn handshake(addr: SocketAddr, path: &str, protocol: Option<&str>) -> RawConn {
        RawConn::handshake_then(addr, path, protocol, &[])
    }

    /// Like [`RawConn::handshake`], with `early` bytes (frames) written in the same write as
    /// the request head, before the 101 arrives: clients may pipeline.
    pub fn handshake_then(
        addr: SocketAddr,
        path: &str,
        protocol: Option<&str>,
        early: &[u8],
    ) -> RawConn {
        let mut stream = TcpStream::connect(addr).expect("tcp connect");
        stream.set_nodelay(true).unwrap();
        let protocol_line =
            protocol.map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n")).unwrap_or_default();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{protocol_line}\r\n"
        );
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(early);
        stream.write_all(&bytes).unwrap();
        let mut conn = RawConn { stream, buf: Vec::new() };
        let deadline = Instant::now() + WAIT;
        let end = loop {
            if let Some(p) = conn.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            assert!(
                conn.fill(deadline),
                "no complete 101 from the server: {:?}",
                String::from_utf8_lossy(&conn.buf)
            );
        };
        let head = String::from_utf8_lossy(&conn.buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101 "), "expected a 101, got {head}");
        assert!(
            head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "accept key: {head}"
        );
        conn.buf.drain(..end);
        conn
    }

    /// Reads more bytes; false on EOF, error or deadline.
    fn fill(&mut self, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        self.stream.set_read_timeout(Some(left)).unwrap();
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next frame from the server (unmasked, unfragmented: all this daemon sends).
    pub fn read_frame(&mut self, timeout: Duration) -> RawEvent {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((opcode, payload, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return RawEvent::Frame { opcode, payload };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return RawEvent::Timeout;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return RawEvent::Eof,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return RawEvent::Timeout
                }
                // A reset is how a terminated peer may learn of it, too.
                Err(_) => return RawEvent::Eof,
            }
        }
    }

    /// Reads frames until a close frame; returns its code. Text frames before it (an error
    /// message) are skipped; anything else fails the test.
    pub fn expect_close(&mut self) -> u16 {
        loop {
            match self.read_frame(WAIT) {
                RawEvent::Frame { opcode: OP_CLOSE, payload } => {
                    assert!(payload.len() >= 2, "a close frame without a code");
                    return u16::from_be_bytes([payload[0], payload[1]]);
                }
                RawEvent::Frame { opcode: OP_TEXT, .. } => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Reads the `connected` message that must come first.
    pub fn expect_connected(&mut self) {
        match self.read_frame(WAIT) {
            RawEvent::Frame { opcode: OP_TEXT, payload } => assert!(
                payload.starts_with(br#"["connected""#),
                "{}",
                String::from_utf8_lossy(&payload)
            ),
            other => panic!("expected connected, got {other:?}"),
        }
    }

    /// Sends one masked, final client frame.
    pub fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        self.send_fragment(true, opcode, payload);
    }

    /// Sends one masked client frame, final or not (`opcode` 0 continues a message).
    pub fn send_fragment(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.stream.write_all(&client_frame(fin, opcode, payload)).expect("send a raw frame");
    }

    /// Sends one masked frame whose first byte (FIN, RSV bits, opcode) is given whole.
    pub fn send_raw_frame(&mut self, first_byte: u8, payload: &[u8]) {
        let mut f = client_frame(true, 0, payload);
        f[0] = first_byte;
        self.stream.write_all(&f).expect("send a raw frame");
    }

    /// Wraps a stream on which the test wrote its own upgrade request.
    pub fn from_stream(stream: TcpStream) -> RawConn {
        RawConn { stream, buf: Vec::new() }
    }

    /// Reads the response head (for a request written by hand) and returns it.
    pub fn read_head(&mut self) -> String {
        let deadline = Instant::now() + WAIT;
        let end = loop {
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            assert!(
                self.fill(deadline),
                "no response head: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
        self.buf.drain(..end);
        head
    }
}

/// The bytes of one masked client frame.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xa;

/// `(opcode, payload, bytes used)` of a complete unmasked frame at the start of `buf`.
fn parse_server_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "the server must not mask its frames");
    let (len, mut at) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes(buf.get(2..4)?.try_into().unwrap()) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().unwrap()) as usize, 10),
        n => (n as usize, 2),
    };
    let payload = buf.get(at..at + len)?.to_vec();
    at += len;
    Some((buf[0] & 0x0f, payload, at))
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP
// ---------------------------------------------------------------------------------------------

/// A plain HTTP answer.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Status line and headers, as text.
    pub head: String,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `request` as is and reads the answer until the server closes (it answers plain
/// HTTP with `Connection: close`).
pub fn http(addr: SocketAddr, request: &[u8]) -> HttpResponse {
    let mut s = TcpStream::connect(addr).expect("tcp connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(request).expect("send the request");
    let raw = read_to_end_within(&mut s, WAIT);
    parse_http(&raw)
        .unwrap_or_else(|| panic!("no HTTP answer: {:?}", String::from_utf8_lossy(&raw)))
}

/// Everything the peer sends until it closes, or until `timeout` (which fails the test:
/// plain HTTP answers must not hang).
pub fn read_to_end_within(s: &mut TcpStream, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the server did not close within {timeout:?}; got {:?}",
            String::from_utf8_lossy(&out)
        );
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut chunk) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return out,
        }
    }
}

pub fn parse_http(raw: &[u8]) -> Option<HttpResponse> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some(HttpResponse { status, head, body: raw[end..].to_vec() })
}

/// The repository root (for scripts under tests/clients).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("syncgate-{tag}-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir(&path).expect("create a temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
