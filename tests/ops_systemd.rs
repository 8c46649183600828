//! The systemd integration, tested where systemd is not PID 1 (README, "Operations"):
//!
//! - the installed units pass `systemd-analyze verify` and stay within an exposure budget
//!   of `systemd-analyze security`, and carry the settings the README's "Operations" names;
//! - the sysusers.d and tmpfiles.d entries apply to a scratch root and produce the user,
//!   the directories and the ownership the unit relies on;
//! - the daemon speaks the sd_notify protocol: the tests bind a NOTIFY_SOCKET of their own
//!   and read what the real binary sends, with the sender's credentials, as systemd would;
//! - socket activation: the daemon serves the socket it is handed, as syncgate.socket does.
//!
//! These tests need systemd's tools (`systemd-analyze`, `systemd-sysusers`,
//! `systemd-tmpfiles`: the Debian package `systemd`) and `/bin/kill`, which the unit's
//! ExecReload= names and `systemd-analyze verify` looks for (Debian package `procps`). A
//! missing tool fails the test; so does running the sysusers/tmpfiles test without root.

mod common;

use common::{describe, repo_root, TempDir, BIN};
use std::io::{BufRead, BufReader, IoSliceMut, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};
use nix::unistd::Pid;
use syncgate::config::Config;

/// The binary path the units carry for the default prefix.
const UNIT_BIN: &str = "/usr/local/bin/syncgate";
/// Generous deadlines: tests run in parallel on two cores; a passing test never waits this
/// long.
const START_TIMEOUT: Duration = Duration::from_secs(15);
const WAIT: Duration = Duration::from_secs(5);
/// The exposure `systemd-analyze security` may report, on its 0-100 scale. The unit scores
/// 12 ("1.2 OK") on systemd 252 (Debian 12), and dropping any one of its sandbox settings
/// scores 14 or more. Another systemd version may weigh things differently: the failure
/// prints the whole table, re-measure from it.
const EXPOSURE_BUDGET: u32 = 13;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Stages an install with the default prefix into a new temp dir.
fn installed() -> TempDir {
    let dest = TempDir::new("systemd");
    let out = Command::new(repo_root().join("scripts/install.sh"))
        .arg("--no-build")
        .env("DESTDIR", &dest.0)
        .env("SYNCGATE_BIN", BIN)
        .env_remove("PREFIX")
        .output()
        .expect("run scripts/install.sh");
    assert!(out.status.success(), "install.sh failed: {}", describe(&out));
    dest
}

/// Runs a systemd tool; a missing tool fails the test with the package that provides it.
fn systemd_tool(tool: &str, args: &[&str]) -> Output {
    match Command::new(tool).args(args).env("SYSTEMD_LOG_COLOR", "0").output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{tool}` is not installed: it comes with the Debian package `systemd` \
             (scripts/test.sh installs it)"
        ),
        Err(e) => panic!("run {tool}: {e}"),
    }
}

/// Copies of the installed units whose Exec lines name the staged binary, so that
/// `systemd-analyze` (which checks that every Exec binary exists) looks at the real file.
/// Nothing else changes. `--root=DESTDIR` is no substitute: it also moves the unit search
/// path and /bin/kill into the staged tree, which has neither sysinit.target nor kill.
fn units_for_analysis(dest: &Path) -> (TempDir, PathBuf, PathBuf) {
    let dir = TempDir::new("units");
    let staged_bin = dest.join(UNIT_BIN.trim_start_matches('/'));
    let staged_bin = staged_bin.to_str().expect("utf-8 temp path");
    let mut paths = Vec::new();
    for unit in ["syncgate.service", "syncgate.socket"] {
        let text = std::fs::read_to_string(dest.join("usr/local/lib/systemd/system").join(unit))
            .expect("read the installed unit");
        let path = dir.0.join(unit);
        std::fs::write(&path, text.replace(UNIT_BIN, staged_bin)).unwrap();
        paths.push(path);
    }
    let socket = paths.pop().unwrap();
    let service = paths.pop().unwrap();
    (dir, service, socket)
}

/// The `Key=Value` settings of a unit file, by section, in file order (keys may repeat).
fn unit_settings(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not a setting: {line}"));
        out.push((section.clone(), key.to_string(), value.to_string()));
    }
    out
}

/// Every value of `section`/`key`.
fn values<'a>(settings: &'a [(String, String, String)], section: &str, key: &str) -> Vec<&'a str> {
    settings
        .iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v.as_str())
        .collect()
}

fn repo_text(rel: &str) -> String {
    std::fs::read_to_string(repo_root().join(rel)).expect("read a repository file")
}

// ---------------------------------------------------------------------------------------------
// The units
// ---------------------------------------------------------------------------------------------

#[test]
fn the_installed_units_pass_systemd_analyze_verify() {
    assert!(
        Path::new("/bin/kill").exists(),
        "/bin/kill (ExecReload=) is missing: it comes with the Debian package `procps`"
    );
    let dest = installed();
    let (_dir, service, socket) = units_for_analysis(&dest.0);
    let out = systemd_tool(
        "systemd-analyze",
        &["verify", "--man=no", service.to_str().unwrap(), socket.to_str().unwrap()],
    );
    assert!(out.status.success(), "systemd-analyze verify failed: {}", describe(&out));
    // verify exits 0 on an unknown key or a value it cannot parse ("..., ignoring"): any
    // diagnostic at all is a failure here.
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify complained: {}",
        describe(&out)
    );
}

#[test]
fn the_service_stays_within_its_exposure_budget() {
    let dest = installed();
    let (_dir, service, _socket) = units_for_analysis(&dest.0);
    let threshold = format!("--threshold={EXPOSURE_BUDGET}");
    let out = systemd_tool(
        "systemd-analyze",
        &["security", "--offline=true", &threshold, "--no-pager", service.to_str().unwrap()],
    );
    assert!(out.status.success(), "exposure over {EXPOSURE_BUDGET}/100: {}", describe(&out));
}

/// The settings the README's "Operations" names, and the ones that must agree with the daemon and
/// with the other files.
#[test]
fn the_service_carries_the_required_settings() {
    let settings = unit_settings(&repo_text("systemd/syncgate.service"));
    let one = |key: &str| -> &str {
        match values(&settings, "Service", key).as_slice() {
            [value] => value,
            other => panic!("[Service] {key}: expected one value, found {other:?}"),
        }
    };
    for (key, want) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("ExecStartPre", "/usr/local/bin/syncgate check-config /etc/syncgate/syncgate.toml"),
        ("ExecStart", "/usr/local/bin/syncgate run --config /etc/syncgate/syncgate.toml"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("KillMode", "mixed"),
        ("Restart", "on-failure"),
        ("User", "syncgate"),
        ("Group", "syncgate"),
        ("StateDirectory", "syncgate"),
        ("NoNewPrivileges", "true"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "true"),
        ("PrivateTmp", "true"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("SystemCallArchitectures", "native"),
        ("LockPersonality", "true"),
        ("MemoryDenyWriteExecute", "true"),
        ("RestrictNamespaces", "true"),
        ("RestrictRealtime", "true"),
        ("ProtectKernelTunables", "true"),
        ("ProtectKernelModules", "true"),
        ("ProtectControlGroups", "true"),
        ("CapabilityBoundingSet", ""),
        ("LimitNOFILE", "1048576"),
        ("LimitMEMLOCK", "64M"),
    ] {
        assert_eq!(one(key), want, "[Service] {key}");
    }
    assert!(values(&settings, "Service", "AmbientCapabilities").is_empty(), "no capabilities");
    // io_uring must stay allowed: the service group, and the calls by name.
    let filters = values(&settings, "Service", "SystemCallFilter");
    assert_eq!(filters.first(), Some(&"@system-service"), "the allow list comes first");
    assert!(filters.contains(&"io_uring_setup io_uring_enter io_uring_register"), "{filters:?}");
    assert!(
        filters.iter().filter(|f| f.starts_with('~')).all(|f| !f.contains("io_uring")),
        "io_uring is denied: {filters:?}"
    );

    // Stopping: systemd must not SIGKILL before the supervisor's own bound, which is the
    // drain timeout + 1 s, + 2 s to reap what it killed.
    let stop = humantime::parse_duration(one("TimeoutStopSec")).expect("TimeoutStopSec");
    let drain = Duration::from_millis(Config::default().drain_timeout_ms);
    assert!(stop > drain + Duration::from_secs(3), "TimeoutStopSec {stop:?} vs drain {drain:?}");

    // The state directory is the daemon's default storage.path.
    assert_eq!(
        Path::new("/var/lib").join(one("StateDirectory")),
        Config::default().storage.path,
        "StateDirectory= vs storage.path"
    );
    // The user is the one sysusers.d creates.
    let sysusers = repo_text("systemd/syncgate.sysusers");
    let user_line = sysusers.lines().find(|l| l.starts_with("u ")).expect("a `u` line");
    assert_eq!(user_line.split_whitespace().nth(1), Some(one("User")));
}

#[test]
fn the_socket_unit_listens_where_the_daemon_would() {
    let settings = unit_settings(&repo_text("systemd/syncgate.socket"));
    let default = Config::default().listen_addr().expect("default listen address");
    let listen = values(&settings, "Socket", "ListenStream");
    assert_eq!(listen, [default.port().to_string()], "one ListenStream=, the default port");
    // A bare port binds [::] dual-stack only with BindIPv6Only=both, as the daemon does.
    assert!(default.ip().is_unspecified() && default.is_ipv6(), "default listen is [::]");
    assert_eq!(values(&settings, "Socket", "BindIPv6Only"), ["both"]);
    assert_eq!(values(&settings, "Install", "WantedBy"), ["sockets.target"]);
}

// ---------------------------------------------------------------------------------------------
// sysusers.d and tmpfiles.d
// ---------------------------------------------------------------------------------------------

/// Applies the installed entries to the staged root, as the operator does on the target.
/// Needs root (CI runs as root): systemd-tmpfiles must chown to the new user.
#[test]
fn sysusers_and_tmpfiles_create_the_user_and_the_directories() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs as root: systemd-tmpfiles chowns files to the syncgate user"
    );
    let dest = installed();
    let root = format!("--root={}", dest.0.display());
    let out = systemd_tool("systemd-sysusers", &[&root]);
    assert!(out.status.success(), "systemd-sysusers: {}", describe(&out));
    let passwd = std::fs::read_to_string(dest.0.join("etc/passwd")).expect("etc/passwd");
    let user: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("syncgate:"))
        .unwrap_or_else(|| panic!("no syncgate user in:\n{passwd}"))
        .split(':')
        .collect();
    let (uid, gid): (u32, u32) = (user[2].parse().unwrap(), user[3].parse().unwrap());
    assert!(uid > 0 && uid < 1000, "a system uid: {uid}");
    assert_eq!(user[5], "/var/lib/syncgate", "home");
    assert!(user[6].ends_with("nologin"), "shell {}", user[6]);

    let out = systemd_tool("systemd-tmpfiles", &[&root, "--create"]);
    assert!(out.status.success(), "systemd-tmpfiles: {}", describe(&out));
    assert!(out.stderr.is_empty(), "systemd-tmpfiles complained: {}", describe(&out));
    for (path, dir, mode, owner, group) in [
        ("var/lib/syncgate", true, 0o750, uid, gid),
        ("etc/syncgate", true, 0o750, 0, gid),
        ("etc/syncgate/syncgate.toml", false, 0o640, 0, gid),
    ] {
        let meta = std::fs::symlink_metadata(dest.0.join(path)).expect(path);
        assert_eq!(meta.is_dir(), dir, "{path}");
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{path}: mode");
        assert_eq!((meta.uid(), meta.gid()), (owner, group), "{path}: owner");
    }
}

// ---------------------------------------------------------------------------------------------
// sd_notify
// ---------------------------------------------------------------------------------------------

/// A NOTIFY_SOCKET of our own, reporting the sender of each datagram as systemd sees it
/// (SO_PASSCRED): with NotifyAccess=main systemd ignores anything not from the main PID.
struct NotifySocket {
    /// Bound, with SO_PASSCRED on, so each datagram carries its sender's pid.
    socket: UnixDatagram,
    /// What the daemon gets as NOTIFY_SOCKET.
    path: PathBuf,
    /// Holds the socket file.
    _dir: TempDir,
}

/// One sd_notify datagram.
#[derive(Debug)]
struct Notification {
    /// The sending process.
    pid: i32,
    /// `KEY=VALUE` lines, in order.
    fields: Vec<(String, String)>,
}

impl Notification {
    fn get(&self, key: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = TempDir::new("notify");
        let path = dir.0.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        setsockopt(&socket, sockopt::PassCred, &true).expect("SO_PASSCRED");
        NotifySocket { socket, path, _dir: dir }
    }

    /// The next datagram, or None after `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Notification> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
        let msg = match recvmsg::<()>(
            self.socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        ) {
            Ok(msg) => msg,
            Err(nix::errno::Errno::EAGAIN) => return None,
            Err(e) => panic!("recvmsg on the notify socket: {e}"),
        };
        let pid = msg
            .cmsgs()
            .expect("control messages")
            .find_map(|c| match c {
                ControlMessageOwned::ScmCredentials(cred) => Some(cred.pid()),
                _ => None,
            })
            .expect("the kernel attaches the sender's credentials");
        let len = msg.bytes;
        let text = String::from_utf8(buf[..len].to_vec()).expect("a notification is text");
        let fields = text
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("not KEY=VALUE: {l:?}"));
                (k.to_string(), v.to_string())
            })
            .collect();
        Some(Notification { pid, fields })
    }

    /// Notifications up to and including the first that `done` accepts, within `timeout`;
    /// `Err` with what did arrive if none did.
    fn recv_until(
        &self,
        done: impl Fn(&Notification) -> bool,
        timeout: Duration,
    ) -> Result<Vec<Notification>, Vec<Notification>> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left.max(Duration::from_millis(1))) {
                Some(n) => {
                    let stop = done(&n);
                    got.push(n);
                    if stop {
                        return Ok(got);
                    }
                }
                None => return Err(got),
            }
        }
    }
}

/// The real daemon, started with NOTIFY_SOCKET pointing at a [`NotifySocket`]; killed when
/// dropped.
struct Notified {
    /// The supervisor: the main process, the only one whose notifications count.
    child: Child,
    /// Stderr lines, forwarded by a reader thread.
    lines: Receiver<String>,
    /// Lines read so far, for failure messages.
    log: Vec<String>,
    /// Holds the config file.
    _dir: TempDir,
}

impl Notified {
    fn start(listen: &str, notify: &NotifySocket) -> Notified {
        Notified::start_with(listen, notify, None)
    }

    /// Starts the daemon; with `activated`, the way systemd does for syncgate.socket: the
    /// socket as descriptor 3, LISTEN_FDS=1 and LISTEN_PID naming the daemon's own pid (set
    /// by a shell that then execs the daemon, so the pid is known before it runs).
    fn start_with(
        listen: &str,
        notify: &NotifySocket,
        activated: Option<&TcpListener>,
    ) -> Notified {
        let dir = TempDir::new("notify-config");
        let config = dir.0.join("syncgate.toml");
        // The store in the test's own directory, never the system's /var/lib/syncgate.
        let store = dir.0.join("store");
        std::fs::write(
            &config,
            format!(
                "listen = \"{listen}\"\nworkers = 1\ntask_id = \"test\"\ndrain_timeout_ms = 1000\n\
                 [storage]\npath = {store:?}\n"
            ),
        )
        .unwrap();
        let mut cmd = match activated {
            None => Command::new(BIN),
            Some(listener) => {
                let mut cmd = Command::new("sh");
                cmd.args(["-c", "export LISTEN_PID=$$; exec \"$0\" \"$@\"", BIN]);
                cmd.env("LISTEN_FDS", "1").env("LISTEN_FDNAMES", "syncgate.socket");
                let fd = listener.as_raw_fd();
                // SAFETY: only dup2 and fcntl between fork and exec, both async-signal-safe.
                unsafe {
                    cmd.pre_exec(move || {
                        // dup2 onto itself would keep FD_CLOEXEC: clear it in that case.
                        let ok = if fd == 3 {
                            libc::fcntl(3, libc::F_SETFD, 0) == 0
                        } else {
                            libc::dup2(fd, 3) == 3
                        };
                        if ok {
                            Ok(())
                        } else {
                            Err(std::io::Error::last_os_error())
                        }
                    });
                }
                cmd
            }
        };
        cmd.arg("run").arg("--config").arg(&config);
        // Only our settings: no SYNCGATE_* from the caller, no inherited activation state.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy().into_owned();
            if name.starts_with("SYNCGATE_") || (activated.is_none() && name.starts_with("LISTEN_"))
            {
                cmd.env_remove(name);
            }
        }
        cmd.env("NOTIFY_SOCKET", &notify.path);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start syncgate");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Notified { child, lines: rx, log: Vec::new(), _dir: dir }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Notifications from `notify` up to the first with `key=1`; fails the test, with the
    /// daemon's log, if none comes within `timeout`.
    fn expect(&mut self, notify: &NotifySocket, key: &str, timeout: Duration) -> Vec<Notification> {
        match notify.recv_until(|n| n.get(key) == Some("1"), timeout) {
            Ok(got) => got,
            Err(got) => {
                self.log.extend(self.lines.try_iter());
                panic!("no {key}=1 within {timeout:?}; got {got:?}; log:\n{}", self.log.join("\n"))
            }
        }
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid()), signal).expect("signal the daemon");
    }

    /// The address from the `ready listen=ADDR` log line.
    fn ready_addr(&mut self) -> SocketAddr {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(addr) = self.log.iter().find_map(|l| {
                l.contains(" ready listen=").then(|| {
                    let value = l.split_whitespace().find_map(|t| t.strip_prefix("listen="));
                    value.and_then(|v| v.parse().ok())
                })?
            }) {
                return addr;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.log.push(line),
                Err(_) => panic!("no ready line; log:\n{}", self.log.join("\n")),
            }
        }
    }

    /// Waits for the daemon to exit.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.log.extend(self.lines.try_iter());
                return status;
            }
            assert!(Instant::now() < deadline, "still running after {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Notified {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /` over a fresh connection: the daemon answers `200 OK`.
fn assert_serving(addr: SocketAddr) {
    let mut stream = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "GET / answered: {answer:?}");
}

/// CLOCK_MONOTONIC in microseconds: the clock of MONOTONIC_USEC.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into memory we own.
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) }, 0);
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

fn is_ready(n: &Notification) -> bool {
    n.get("READY") == Some("1")
}

/// READY=1 (with a STATUS) once the daemon serves, STOPPING=1 on SIGTERM, in that order,
/// all from the supervisor itself; nothing after the exit.
#[test]
fn ready_then_stopping_come_from_the_supervisor_in_order() {
    let notify = NotifySocket::bind();
    let mut daemon = Notified::start("127.0.0.1:0", &notify);
    let before_ready = daemon.expect(&notify, "READY", START_TIMEOUT);
    let ready = before_ready.last().unwrap();
    let status = ready.get("STATUS").expect("READY=1 comes with a STATUS");
    assert!(!status.is_empty());
    // READY=1 means serving: the first request after it must succeed, without a retry.
    assert_serving(daemon.ready_addr());

    daemon.signal(Signal::SIGTERM);
    let until_stop = daemon.expect(&notify, "STOPPING", WAIT);
    assert!(daemon.wait_exit(START_TIMEOUT).success(), "log:\n{}", daemon.log.join("\n"));

    let all: Vec<&Notification> = before_ready.iter().chain(&until_stop).collect();
    for n in &all {
        assert_eq!(n.pid, daemon.pid(), "sent by a child, ignored under NotifyAccess=main: {n:?}");
    }
    assert_eq!(all.iter().filter(|n| is_ready(n)).count(), 1, "READY=1 exactly once: {all:?}");
    assert!(notify.recv(Duration::from_millis(200)).is_none(), "a notification after the exit");
}

/// A daemon that cannot start (its port is taken) exits non-zero and never says READY=1:
/// systemd then fails the start instead of believing it.
#[test]
fn a_daemon_that_cannot_start_never_reports_ready() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("take a port");
    let notify = NotifySocket::bind();
    let mut daemon = Notified::start(&taken.local_addr().unwrap().to_string(), &notify);
    let status = daemon.wait_exit(START_TIMEOUT);
    assert!(!status.success(), "started on a taken port; log:\n{}", daemon.log.join("\n"));
    while let Some(n) = notify.recv(Duration::from_millis(200)) {
        assert!(!is_ready(&n), "READY=1 from a daemon that failed: {n:?}");
    }
}

/// Socket activation as syncgate.socket does it: the daemon serves the socket it is given
/// and binds nothing itself (its `listen` here is an address no host has).
#[test]
fn socket_activation_serves_the_socket_it_is_given() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("the activation socket");
    let addr = listener.local_addr().unwrap();
    let notify = NotifySocket::bind();
    let mut daemon = Notified::start_with("192.0.2.1:4848", &notify, Some(&listener));
    drop(listener);
    daemon.expect(&notify, "READY", START_TIMEOUT);
    assert_eq!(daemon.ready_addr(), addr, "log:\n{}", daemon.log.join("\n"));
    assert_serving(addr);
    daemon.signal(Signal::SIGTERM);
    daemon.expect(&notify, "STOPPING", WAIT);
    assert!(daemon.wait_exit(START_TIMEOUT).success(), "log:\n{}", daemon.log.join("\n"));
}

/// A reload is bracketed: RELOADING=1 with MONOTONIC_USEC (CLOCK_MONOTONIC, taken when the
/// reload began), then READY=1 once the new configuration is applied; the daemon serves
/// throughout.
#[test]
fn sighup_is_bracketed_by_reloading_and_ready() {
    let notify = NotifySocket::bind();
    let mut daemon = Notified::start("127.0.0.1:0", &notify);
    daemon.expect(&notify, "READY", START_TIMEOUT);
    let addr = daemon.ready_addr();

    let before = monotonic_usec();
    daemon.signal(Signal::SIGHUP);
    let reload = daemon.expect(&notify, "READY", WAIT);
    let after = monotonic_usec();
    let reloading = reload
        .iter()
        .position(|n| n.get("RELOADING") == Some("1"))
        .unwrap_or_else(|| panic!("no RELOADING=1 before READY=1: {reload:?}"));
    let n = &reload[reloading];
    let usec: u64 = n
        .get("MONOTONIC_USEC")
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {n:?}"))
        .parse()
        .expect("MONOTONIC_USEC is a number");
    assert!((before..=after).contains(&usec), "MONOTONIC_USEC {usec} not in {before}..={after}");
    assert!(reloading < reload.len() - 1, "READY=1 must follow RELOADING=1: {reload:?}");
    for n in &reload {
        assert_eq!(n.pid, daemon.pid(), "not from the supervisor: {n:?}");
    }
    assert_serving(addr);

    daemon.signal(Signal::SIGTERM);
    daemon.expect(&notify, "STOPPING", WAIT);
    assert!(daemon.wait_exit(START_TIMEOUT).success(), "log:\n{}", daemon.log.join("\n"));
}
