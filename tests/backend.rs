//! The io backends (`io.backend`; README, "Which backend runs where"), through the real
//! binary: epoll runs where it is asked for, in every process, and serves WebSockets and the
//! sync protocol; `auto` falls back to epoll, with one warning line saying why, where a
//! seccomp filter refuses io_uring as a container runtime's default profile does. (With
//! `io_uring` forced, the same filter fails startup: tests/operations.rs.)
//!
//! The rest of the suite runs on either backend: `SYNCGATE_TEST_IO_BACKEND=epoll` (CI runs
//! the data path's tests a second time so).

mod common;

use common::*;

/// The kinds of anonymous inodes a process holds (`anon_inode:[io_uring]`,
/// `anon_inode:[eventpoll]`, ...): which backend a process really runs, whatever it says.
fn anon_inodes(pid: libc::pid_t) -> Vec<String> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the process's descriptors");
    fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .filter(|target| target.starts_with("anon_inode:"))
        .collect()
}

/// The ready line, `/metrics` and every child process's descriptors say `backend`.
fn assert_runs(d: &Daemon, backend: &str) {
    let ready = d.wait_log(|l| l.contains(" ready listen="), WAIT);
    assert!(ready.contains(&format!(" backend={backend} ")), "{ready}");
    assert_eq!(d.metric("syncgate_io_backend", &[("backend", backend)]), 1);
    let children = d.children();
    assert_eq!(children.len(), 1 + WORKERS, "{children:?}");
    for (pid, args) in children {
        let inodes = anon_inodes(pid);
        let uring = inodes.iter().any(|i| i == "anon_inode:[io_uring]");
        let epoll = inodes.iter().any(|i| i == "anon_inode:[eventpoll]");
        match backend {
            "epoll" => assert!(epoll && !uring, "{args}: {inodes:?}"),
            _ => assert!(uring && !epoll, "{args}: {inodes:?}"),
        }
    }
}

/// Echoes of every frame length class (a 1 MiB message spans many receive buffers) and a
/// Zero connection's `connected` and ping.
fn serves_echo_and_sync(d: &Daemon) {
    let mut ws = Ws::connect(d.addr, "/echo", None).expect("echo upgrade");
    for size in [0usize, 1, 125, 126, 65_535, 65_536, 1 << 20] {
        let data: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        ws.send_binary(&data);
        match ws.recv_within(WAIT) {
            Got::Binary(echo) => assert!(echo == data, "{size} bytes came back changed"),
            other => panic!("{size} bytes: {other:?}"),
        }
    }
    ws.close(1000);
    let mut zero = d.connected(&Params::new("c1", "g1"), Some(&anon_header()));
    zero.ping_pong();
    let mut other = d.connected(&Params::new("c2", "g2"), Some(&anon_header()));
    other.ping_pong();
}

#[test]
fn epoll_runs_in_every_process_where_asked_and_serves_websockets_and_the_sync_protocol() {
    let d =
        Daemon::start(&format!("[io]\nbackend = \"epoll\"\n[conformance]\necho = true\n{QUIET}"));
    assert_runs(&d, "epoll");
    serves_echo_and_sync(&d);
    assert!(
        !d.log_text().contains("running on epoll"),
        "epoll by choice is no fallback to warn about"
    );
}

#[cfg(target_arch = "x86_64")]
#[test]
fn auto_falls_back_to_epoll_with_one_warning_where_seccomp_refuses_io_uring() {
    let d = Daemon::start_with(
        &format!("[io]\nbackend = \"auto\"\n[conformance]\necho = true\n{QUIET}"),
        &[],
        |cmd| deny_io_uring(cmd, libc::EPERM),
    );
    assert_runs(&d, "epoll");
    serves_echo_and_sync(&d);
    let log = d.log_text();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("running on epoll")).collect();
    assert_eq!(warnings.len(), 1, "one warning line, from the supervisor: {log}");
    assert!(warnings[0].contains(" WARN "), "{}", warnings[0]);
    assert!(
        warnings[0].contains("io_uring_setup was refused (a seccomp profile"),
        "the warning names why: {}",
        warnings[0]
    );
}

#[test]
fn auto_runs_io_uring_where_the_host_allows_it() {
    let d =
        Daemon::start(&format!("[io]\nbackend = \"auto\"\n[conformance]\necho = true\n{QUIET}"));
    assert_runs(&d, "io_uring");
    serves_echo_and_sync(&d);
}

#[test]
fn a_reload_keeps_the_running_backend_even_through_a_graceful_replacement() {
    let d = Daemon::start(&format!("[io]\nbackend = \"epoll\"\n{QUIET}"));
    let first: Vec<libc::pid_t> = d.children().into_iter().map(|(pid, _)| pid).collect();
    // Another backend and another worker count: new processes start, on the running backend.
    let config = std::fs::read_to_string(d.config_path()).unwrap();
    let next = config.replace("workers = 2", "workers = 3").replace("\"epoll\"", "\"io_uring\"");
    std::fs::write(d.config_path(), next).unwrap();
    d.signal(libc::SIGHUP);
    let warning = d.wait_log(|l| l.contains("reload: io.backend applies at start"), WAIT);
    assert!(warning.contains(" WARN "), "{warning}");
    d.wait_log(|l| l.contains("by graceful replacement") && l.contains("workers=3"), WAIT);
    let started: Vec<(libc::pid_t, String)> =
        d.children().into_iter().filter(|(pid, _)| !first.contains(pid)).collect();
    assert_eq!(started.len(), 1 + 3, "a new listener and three new workers: {started:?}");
    for (pid, args) in started {
        let inodes = anon_inodes(pid);
        assert!(
            inodes.iter().any(|i| i == "anon_inode:[eventpoll]")
                && !inodes.iter().any(|i| i == "anon_inode:[io_uring]"),
            "{args}: {inodes:?}"
        );
    }
    assert_eq!(d.metric("syncgate_io_backend", &[("backend", "epoll")]), 1);
    let mut ws = d.connected(&Params::new("after", "g-after"), Some(&anon_header()));
    ws.ping_pong();
}
