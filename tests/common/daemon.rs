//! The daemon under test: [`Daemon`] starts the `syncgate` binary with a config file of the
//! test's own, waits for its `ready` line, exposes its stderr as parsed log events ([`LogEvent`],
//! so a test can wait for an event instead of sleeping), reads its metrics and its child
//! processes, and kills it when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::host::{unique_temp_path, BIN};
use super::http::http;
use super::ws::Ws;
use super::zero::Params;

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

/// The `io.backend` the tests' daemons run: `SYNCGATE_TEST_IO_BACKEND` (`io_uring`, `epoll`
/// or `auto`), else the daemon's default (`auto`).
pub fn test_io_backend() -> Option<String> {
    std::env::var("SYNCGATE_TEST_IO_BACKEND").ok().filter(|b| !b.is_empty())
}

/// Keepalive timers far away, so no unsolicited pong or WebSocket ping gets between a test and
/// the answer it reads.
pub const QUIET: &str = "[keepalive]\nidle_send_ms = 60000\nsilence_ms = 60000\n";

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
        // A path of its own: tests of one binary may run in one process.
        let config_path = unique_temp_path("test").with_extension("toml");
        std::fs::write(&config_path, &config).expect("write the test config");
        let mut cmd = Command::new(BIN);
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
        // The whole suite can run on either backend (CI runs the data path twice): the
        // variable of the test run becomes the daemon's `io.backend`, unless the test picks
        // one itself.
        if let Some(backend) = test_io_backend() {
            if !extra.contains("[io]") && !env.iter().any(|(k, _)| *k == "SYNCGATE_IO_BACKEND") {
                cmd.env("SYNCGATE_IO_BACKEND", backend);
            }
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

/// The worker a client group must land on (docs/ARCHITECTURE.md: xxh32(taskID/cgID) % workers).
pub fn expected_worker(group: &str) -> usize {
    syncgate::protocol::route::worker_for(TASK_ID, group, WORKERS)
}
