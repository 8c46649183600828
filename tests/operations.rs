//! The README's "Operations" and "Configuration", through the real binary:
//! graceful shutdown, reload, respawn, children that never outlive the supervisor, settings
//! from the environment, and a config or a host (no io_uring) that does not start.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn sigterm_closes_every_connection_with_1001_and_exits() {
    let mut d = Daemon::start(QUIET);
    // One connection on each worker.
    let groups = ["g1", "g2", "g3", "g4", "g5", "g6"];
    let mut sockets = Vec::new();
    let mut covered = [false; WORKERS];
    for (i, g) in groups.iter().enumerate() {
        if !covered[expected_worker(g)] {
            covered[expected_worker(g)] = true;
            sockets.push(d.connected(&Params::new(&format!("c{i}"), g), Some(&anon_header())));
        }
    }
    assert!(covered.iter().all(|&c| c), "the test's groups must cover every worker");
    let children = d.children();
    assert_eq!(children.len(), 1 + WORKERS, "listener and workers: {children:?}");
    d.signal(libc::SIGTERM);
    for ws in &mut sockets {
        ws.expect_close(1001);
    }
    let status = d.wait_exit(Duration::from_secs(5)).expect("exit within the drain timeout");
    assert!(status.success(), "exit status {status}");
    for (pid, args) in children {
        assert!(!alive(pid), "{args} ({pid}) outlived the supervisor");
    }
    // (Whether the port is closed cannot be told here: a parallel test's daemon may already
    // have been given the same ephemeral port.)
}

#[test]
fn children_die_with_a_killed_supervisor() {
    let mut d = Daemon::start(QUIET);
    let children = d.children();
    assert_eq!(children.len(), 1 + WORKERS, "{children:?}");
    d.signal(libc::SIGKILL);
    d.wait_exit(WAIT).expect("SIGKILL");
    let deadline = Instant::now() + WAIT;
    while children.iter().any(|(pid, _)| alive(*pid)) {
        assert!(Instant::now() < deadline, "children outlived a killed supervisor: {children:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_killed_worker_is_respawned_and_the_other_keeps_serving() {
    let d = Daemon::start(QUIET);
    let victim_group = (0..).map(|i| format!("v{i}")).find(|g| expected_worker(g) == 1).unwrap();
    let other_group = (0..).map(|i| format!("o{i}")).find(|g| expected_worker(g) == 0).unwrap();
    let mut survivor = d.connected(&Params::new("survivor", &other_group), Some(&anon_header()));
    let mut victim = d.connected(&Params::new("victim", &victim_group), Some(&anon_header()));
    let (pid, _) = d
        .children()
        .into_iter()
        .find(|(_, args)| args.contains("__worker") && args.contains("--index 1 "))
        .unwrap_or_else(|| panic!("no worker 1 among {:?}", d.children()));
    // SAFETY: kill(2) on a process of the daemon under test.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    // Its connection dies with it; the other worker's does not notice.
    victim.expect_gone();
    survivor.ping_pong();
    d.wait_log(|l| l.contains("worker 1 respawned"), Duration::from_secs(10));
    // The respawned worker serves its groups again.
    let mut back = d.connected(&Params::new("back", &victim_group), Some(&anon_header()));
    back.ping_pong();
    survivor.ping_pong();
    // Counted under the worker that died, not under another process.
    assert_eq!(d.metric("syncgate_worker_restarts_total", &[("worker", "1")]), 1);
    assert_eq!(d.metric("syncgate_worker_restarts_total", &[("process", "listener")]), 0);
}

/// The listener holds no connection once it has handed it off: killed, it is respawned on
/// the same listening socket (the supervisor's), the workers' connections never notice, and
/// new clients get in again.
#[test]
fn a_killed_listener_is_respawned_and_the_workers_keep_serving() {
    let d = Daemon::start(QUIET);
    let mut before = d.connected(&Params::new("before", "g-before"), Some(&anon_header()));
    let (pid, _) = d
        .children()
        .into_iter()
        .find(|(_, args)| args.contains("__listener"))
        .unwrap_or_else(|| panic!("no listener among {:?}", d.children()));
    // SAFETY: kill(2) on a process of the daemon under test.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    d.wait_log(|l| l.contains("listener respawned"), Duration::from_secs(10));
    before.ping_pong();
    let mut after = d.connected(&Params::new("after", "g-after"), Some(&anon_header()));
    after.ping_pong();
    assert_eq!(d.metric("syncgate_worker_restarts_total", &[("process", "listener")]), 1);
    assert_eq!(d.metric("syncgate_worker_restarts_total", &[("process", "worker")]), 0);
}

#[test]
fn a_reload_applies_a_new_secret_without_dropping_connections() {
    let d = Daemon::start(&format!("{QUIET}{}", auth_config()));
    let mut alice =
        d.connected(&Params::new("alice-1", "g1").user("alice"), Some(&user_header("alice")));
    let config = std::fs::read_to_string(d.config_path()).unwrap();
    let rotated = config.replace(SECRET, "rotated-secret");
    assert_ne!(config, rotated);
    std::fs::write(d.config_path(), rotated).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log(|l| l.contains("reloaded configuration"), Duration::from_secs(10));
    // The open connection was not dropped.
    alice.ping_pong();
    // New sockets are checked with the new secret.
    let new_token =
        sign(&serde_json::json!({"sub": "alice", "exp": now_secs() + 600}), "rotated-secret");
    let mut again = d.connected(
        &Params::new("alice-2", "g1").user("alice"),
        Some(&protocol_header(Some(&new_token), None)),
    );
    again.ping_pong();
    let mut old = d.ws(&Params::new("alice-3", "g1").user("alice"), Some(&user_header("alice")));
    old.expect_error("AuthInvalidated");
    old.expect_close(3000);
}

#[test]
fn an_invalid_reload_is_refused_and_the_daemon_keeps_running() {
    let d = Daemon::start(QUIET);
    let mut ws = d.connected(&Params::new("c1", "g1"), Some(&anon_header()));
    std::fs::write(d.config_path(), "workers = \"many\"\n").unwrap();
    d.signal(libc::SIGHUP);
    let line = d.wait_log(|l| l.contains("reload refused"), Duration::from_secs(10));
    assert!(line.contains("workers"), "the refusal names the bad key: {line}");
    ws.ping_pong();
    d.connected(&Params::new("c2", "g2"), Some(&anon_header())).ping_pong();
}

#[test]
fn settings_come_from_the_environment_and_win_over_the_file() {
    // The file has one secret and no token requirement; the environment brings another secret
    // and requires tokens. The environment wins on both.
    let d = Daemon::start_env(
        &format!("{QUIET}[auth]\nsecret = \"file-secret\"\n"),
        &[("SYNCGATE_AUTH_SECRET", SECRET), ("SYNCGATE_AUTH_REQUIRED", "true")],
    );
    let mut ws = d.connected(&Params::new("c1", "g1").user("alice"), Some(&user_header("alice")));
    ws.ping_pong();
    let e = d.wait_event("connected", &[("clientID", "c1")], WAIT);
    assert_eq!(e.field("user"), Some("alice"), "the token was verified with the env secret");
    let file_token =
        sign(&serde_json::json!({"sub": "alice", "exp": now_secs() + 600}), "file-secret");
    let mut stale = d.ws(
        &Params::new("c2", "g1").user("alice"),
        Some(&protocol_header(Some(&file_token), None)),
    );
    stale.expect_error("AuthInvalidated");
    stale.expect_close(3000);
    let mut anon = d.ws(&Params::new("c3", "g1"), Some(&anon_header()));
    anon.expect_error("Unauthorized");
    anon.expect_close(3000);
}

#[test]
fn the_config_file_can_be_named_by_syncgate_config() {
    let path = std::env::temp_dir().join(format!("syncgate-test-env-{}.toml", std::process::id()));
    // The store beside the file, never the system's /var/lib/syncgate.
    let store = path.with_extension("store");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\nworkers = 2\ntask_id = \"test\"\ndrain_timeout_ms = 1000\n\
             [storage]\npath = {store:?}\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("run").env("SYNCGATE_CONFIG", &path);
    let d = Daemon::spawn(cmd, path).unwrap_or_else(|log| panic!("did not start: {log}"));
    assert!(
        d.addr.ip().is_loopback(),
        "listen came from the file named by SYNCGATE_CONFIG: {}",
        d.addr
    );
    assert_eq!(http(d.addr, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").status, 200);
}

#[test]
fn an_invalid_config_fails_startup_with_a_clear_message() {
    let path = std::env::temp_dir().join(format!("syncgate-test-bad-{}.toml", std::process::id()));
    std::fs::write(&path, "listen = \"127.0.0.1:0\"\n[limits]\nmax_message_bytes = 0\n").unwrap();
    let out = Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("run syncgate");
    let _ = std::fs::remove_file(&path);
    assert!(!out.status.success(), "started with max_message_bytes = 0");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_message_bytes"), "the error names the key: {stderr}");
}

#[test]
fn an_ipv6_wildcard_listen_also_takes_ipv4() {
    // The default `[::]:4848` is dual-stack (README, "Configuration"): IPv4 clients must get in
    // too.
    let d = Daemon::start(&format!("listen = \"[::]:0\"\n{QUIET}"));
    let port = d.addr.port();
    for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        assert_eq!(http(addr, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").status, 200, "{addr}");
        let params = Params::new(&format!("c-{}", addr.is_ipv6()), "g1");
        let mut ws = Ws::connect(addr, &params.path(), Some(&anon_header())).unwrap();
        assert_eq!(ws.recv_json()[0], "connected", "{addr}");
        ws.ping_pong();
    }
    // The log names the IPv4 peer as IPv4, not as a mapped IPv6 address.
    let e = d.wait_event("connected", &[("clientID", "c-false")], WAIT);
    assert!(e.field("peer").is_some_and(|p| p.starts_with("127.0.0.1:")), "{}", e.line);
}

/// Runs the daemon with `io.backend = "io_uring"` and io_uring failing with `errno` (see
/// [`deny_io_uring`]) and returns its exit status and standard error.
#[cfg(target_arch = "x86_64")]
fn run_without_io_uring(errno: i32) -> (std::process::ExitStatus, String) {
    let path =
        std::env::temp_dir().join(format!("syncgate-test-nouring-{}.toml", std::process::id()));
    let store = std::env::temp_dir().join(format!("syncgate-test-nouring-{}", std::process::id()));
    let config = format!(
        "listen = \"127.0.0.1:0\"\n[io]\nbackend = \"io_uring\"\n[storage]\npath = \"{}\"\n",
        store.display()
    );
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("run").arg("--config").arg(&path).stdin(Stdio::null());
    deny_io_uring(&mut cmd, errno);
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("run syncgate");
    let pid = child.id();
    let (done, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    // A daemon that starts anyway would run until killed: bounded, then stopped.
    let out = match exited.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out.expect("wait for syncgate"),
        Err(_) => {
            // SAFETY: signalling the child we spawned, which has not been reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("syncgate without io_uring was still running after 30 s");
        }
    };
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(&store);
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[cfg(target_arch = "x86_64")]
#[test]
fn io_uring_forced_without_io_uring_fails_startup_with_the_reason_and_the_fix() {
    // (`auto` falls back to epoll instead: tests/backend.rs.)
    // Only meaningful where io_uring is otherwise allowed (the sysctl would change the text).
    // A kernel without the sysctl (before 6.6) has io_uring enabled.
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .unwrap_or_else(|_| "0".into());
    assert_eq!(sysctl.trim(), "0", "these tests need kernel.io_uring_disabled = 0");
    let (status, stderr) = run_without_io_uring(libc::EPERM);
    assert!(!status.success(), "started without io_uring: {stderr}");
    assert!(
        stderr.contains("io_uring unavailable: io_uring_setup was refused (a seccomp profile"),
        "{stderr}"
    );
    assert!(
        stderr.contains("allow io_uring_setup, io_uring_enter and io_uring_register"),
        "{stderr}"
    );
    let (status, stderr) = run_without_io_uring(libc::ENOSYS);
    assert!(!status.success(), "started without io_uring: {stderr}");
    assert!(stderr.contains("io_uring unavailable: this kernel has no io_uring"), "{stderr}");
}

/// Transparent huge pages are off by default (`huge_pages = false`) in the supervisor and
/// every process it starts (the kernel's `THP_enabled` in /proc/<pid>/status), a reload
/// cannot turn them on under running processes, and `huge_pages = true` leaves them to the
/// kernel's THP mode.
#[test]
fn huge_pages_are_off_by_default_in_every_process_and_true_leaves_them_on() {
    let thp = |pid: libc::pid_t| -> String {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let line = status.lines().find(|l| l.starts_with("THP_enabled:"));
        line.expect("this kernel reports THP_enabled (Linux 5.0+)")
            .split(':')
            .nth(1)
            .unwrap()
            .trim()
            .into()
    };
    let processes = |d: &Daemon| -> Vec<libc::pid_t> {
        let mut pids: Vec<libc::pid_t> = d.children().into_iter().map(|(pid, _)| pid).collect();
        pids.push(d.pid());
        assert_eq!(pids.len(), 2 + WORKERS, "supervisor, listener and workers: {pids:?}");
        pids
    };

    let off = Daemon::start("");
    for pid in processes(&off) {
        assert_eq!(thp(pid), "0", "process {pid} of a daemon with the default");
    }
    // A reload that asks for them keeps the running value and says so.
    let config = std::fs::read_to_string(off.config_path()).unwrap();
    std::fs::write(off.config_path(), format!("huge_pages = true\n{config}")).unwrap();
    off.signal(libc::SIGHUP);
    off.wait_log(|l| l.contains("reload: huge_pages applies at start"), WAIT);
    for pid in processes(&off) {
        assert_eq!(thp(pid), "0", "process {pid} after the reload");
    }

    let on = Daemon::start("huge_pages = true\n");
    for pid in processes(&on) {
        assert_eq!(thp(pid), "1", "process {pid} of a daemon with huge_pages = true");
    }
}
