//! A real upstream for the front-door tests: a throw-away PostgreSQL cluster with logical
//! replication and a real zero-cache (`@rocicorp/zero` 1.9.0) on it, with the app of
//! tests/clients/zero-cache/schema.js (one table, `item`, and its permissions) deployed and
//! seeded ([`SEEDED`]).
//!
//! # Using it
//!
//! A test takes the fixture through a guard: [`ZeroCache::shared`] for a test that only needs
//! zero-cache up, [`ZeroCache::exclusive`] for one that stops and starts it (an upstream
//! outage: [`ExclusiveZeroCache::stop`] / [`ExclusiveZeroCache::start`]) or that counts
//! zero-cache's sockets ([`ZeroCache::upstream_connections`]), which other tests' clients
//! would change. The guards are a read/write lock: while an exclusive guard lives no other test
//! of the process holds one. Both deref to the [`ZeroCache`], and both print the zero-cache and
//! PostgreSQL log tails when the test panics.
//!
//! Tests share the seeded rows and must not change them: a test that writes uses a user of its
//! own ([`unique_user`]) and rows owned by that user, so what the seeded users see never
//! depends on which tests ran before.
//!
//! # One fixture per test process, and why that is the design
//!
//! The fixture is started once per test process, on first use, and shared by the tests of that
//! process (a `OnceLock`). Under `cargo test` that is one fixture per test binary. Under
//! cargo-nextest, which runs every test in a process of its own, it is one fixture per test:
//! every test pays the start-up (initdb about 2 s, PostgreSQL well under 1 s, the permissions
//! about 1 s, zero-cache's cold start with its initial sync about 9 s here: about 12 s in all
//! on an idle two-core machine; a restart after [`ExclusiveZeroCache::stop`] takes 5-7 s). Sharing one fixture across processes was considered and
//! rejected: something would have to outlive the test processes and decide when the last one
//! is done (an idle timer or a reference count in lock files), a crashed test would leave it
//! in an unknown state for the next, an outage test would take zero-cache away from tests
//! running in parallel in other processes, and a stale fixture of an earlier build could
//! answer for a new schema. One fixture per process is isolated, needs no cleanup protocol,
//! and fails where the failure happened. To keep a machine from starting many zero-caches at
//! once, .config/nextest.toml puts the binaries that use this fixture in a test group that runs
//! at most two of their tests at a time (a new binary that uses it belongs in that filter).
//!
//! # Processes and cleanup
//!
//! PostgreSQL runs `postgres -D` directly (not `pg_ctl`), as the unprivileged `postgres` user
//! (`nobody` if there is none) when the tests run as root: initdb and postgres refuse root.
//! zero-cache runs as the test's user through `node` ([`node`]). Both are spawned from one
//! long-lived thread with `PR_SET_PDEATHSIG` = SIGKILL (the signal follows the thread that
//! forked, and a test's thread ends with its test), each in a process group of its own.
//! That is enough for PostgreSQL, whose backends stay in the postmaster's group, but not for
//! zero-cache: its `zero-cache` bin is a runner that forks the server, which forks its workers,
//! each `detached` (a session of its own), and a SIGKILL of the runner leaves them all running
//! until they notice PostgreSQL is gone (seen here). So every zero-cache process carries a
//! marker in its environment ([`MARKER`]`=<the fixture's folder>`; node passes its environment
//! on to its workers), and what must find them scans /proc/*/environ for it: a stop waits until
//! none is left, and a watchdog (`sh`) holding the other end of a pipe from this process
//! SIGKILLs them, and PostgreSQL's process group, when the pipe closes, which it does when the
//! process ends, however it ends (SIGKILL included); then it removes the temporary folder.
//!
//! # Finding what it runs
//!
//! - PostgreSQL: `SYNCGATE_TEST_PG_BIN` (a folder with `initdb`, `postgres`, `psql`,
//!   `pg_isready`), else the newest `/usr/lib/postgresql/*/bin` (Debian's `postgresql`).
//! - zero-cache: `SYNCGATE_TEST_ZERO_CACHE` (the `node_modules/.bin` folder of
//!   tests/clients/zero-cache), else that folder in this repository.
//!
//! scripts/test.sh installs both and sets both variables. A missing one fails the test with
//! the command that installs it: these tests never skip.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::ops::Deref;
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::daemon::SECRET;
use super::host::{describe, node, repo_root, unique_temp_path};

/// zero-cache's admin password (its `/statz` and `/heapz` routes).
pub const ZERO_ADMIN_PASSWORD: &str = "syncgate-test-admin";
/// The `@rocicorp/zero` release of the server, the client and the schema.
pub const ZERO_VERSION: &str = "1.9.0";
/// The rows every fixture starts with: `(id, owner, title)`. Rows owned by `public` are
/// visible to everyone, the others to their owner's token only (schema.js).
pub const SEEDED: &[(&str, &str, &str)] = &[
    ("a1", "alice", "alice one"),
    ("b1", "bob", "bob one"),
    ("p1", "public", "public one"),
    ("p2", "public", "public two"),
];

/// How long PostgreSQL and zero-cache get to come up (a cold zero-cache takes 9-11 s on an
/// idle two-core machine; several test processes may start at once).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long zero-cache gets to exit after SIGTERM (about 1.5 s when idle).
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Listen ports are drawn from here: below the ephemeral range (32768-60999), where a
/// client socket's source port could take them.
const PORTS: std::ops::Range<u16> = 20000..32000;
/// The variable that marks every zero-cache process of a fixture (its value: the fixture's
/// folder). PostgreSQL does not get it: it overwrites its environment's memory with its
/// process titles, and its process group finds it anyway.
pub const MARKER: &str = "SYNCGATE_TEST_UPSTREAM";
/// Bytes of each log that a failure message shows.
pub(super) const LOG_TAIL: usize = 12 * 1024;

/// The SQL that creates and seeds the app's table.
pub(super) fn schema_sql() -> String {
    let rows: Vec<String> =
        SEEDED.iter().map(|(id, owner, title)| format!("('{id}', '{owner}', '{title}')")).collect();
    format!(
        "CREATE TABLE item (id text PRIMARY KEY, owner text NOT NULL, title text NOT NULL);\n\
         INSERT INTO item (id, owner, title) VALUES {};",
        rows.join(", ")
    )
}

/// The seeded rows that `user` may see (`None`: a client without a token), sorted by id.
pub fn seeded_visible_to(user: Option<&str>) -> Vec<(&'static str, &'static str, &'static str)> {
    SEEDED
        .iter()
        .copied()
        .filter(|(_, owner, _)| *owner == "public" || Some(*owner) == user)
        .collect()
}

/// A user name no other test of this process (or of another process) uses: for rows a test
/// writes, so that no other test sees them.
pub fn unique_user(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

// ------------------------------------------------------------------------------------------
// The fixture and its guards
// ------------------------------------------------------------------------------------------

/// One PostgreSQL and one zero-cache on it, for the life of the test process.
pub struct ZeroCache {
    dir: PathBuf,
    pg: Postgres,
    port: u16,
    bin: PathBuf,
    /// The zero-cache runner while it runs (`None` while stopped).
    child: Mutex<Option<Child>>,
    /// How many times zero-cache was started, for the log's markers.
    starts: AtomicUsize,
    watchdog: Watchdog,
}

/// The fixture of this process, or why it could not start (every later test fails with it).
static FIXTURE: OnceLock<Result<ZeroCache, String>> = OnceLock::new();
/// Shared: zero-cache stays up. Exclusive: the holder may stop it, and counts its sockets.
static USE: RwLock<()> = RwLock::new(());

fn fixture() -> &'static ZeroCache {
    let fixture = FIXTURE.get_or_init(|| {
        std::panic::catch_unwind(ZeroCache::launch).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(no message)".into())
        })
    });
    match fixture {
        Ok(zc) => zc,
        Err(why) => panic!("the upstream fixture failed to start in this process:\n{why}"),
    }
}

/// A test's hold on the fixture while zero-cache must stay up: see [`ZeroCache::shared`].
pub struct SharedZeroCache {
    zc: &'static ZeroCache,
    _lock: RwLockReadGuard<'static, ()>,
}

/// A test's sole hold on the fixture: see [`ZeroCache::exclusive`].
pub struct ExclusiveZeroCache {
    zc: &'static ZeroCache,
    _lock: RwLockWriteGuard<'static, ()>,
}

impl ZeroCache {
    /// The fixture of this process (started on first use), held shared: zero-cache is up and
    /// stays up while the guard lives; other tests of the process may use it at the same time.
    pub fn shared() -> SharedZeroCache {
        let zc = fixture();
        let lock = USE.read().unwrap_or_else(PoisonError::into_inner);
        zc.assert_running();
        SharedZeroCache { zc, _lock: lock }
    }

    /// The fixture held alone: no other test of the process holds it while the guard lives,
    /// so the holder may stop and start zero-cache and count its sockets. zero-cache is
    /// running when this returns, and is started again when the guard drops if the test left
    /// it stopped.
    pub fn exclusive() -> ExclusiveZeroCache {
        let zc = fixture();
        let lock = USE.write().unwrap_or_else(PoisonError::into_inner);
        if !zc.running() {
            zc.start_zero_cache();
        }
        ExclusiveZeroCache { zc, _lock: lock }
    }

    /// zero-cache's sync endpoint for a WebSocket client: `ws://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// The same origin as `http://127.0.0.1:PORT` (what the Zero client's `cacheURL` takes;
    /// the app client script accepts either).
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// zero-cache's `ZERO_PORT` (its change-streamer listens on the next port).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// zero-cache's address, for a raw socket or an upstream setting.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The upstream database's URL (`ZERO_UPSTREAM_DB`).
    pub fn upstream_db(&self) -> String {
        self.pg.url()
    }

    /// Runs `sql` (one or more statements, stopping at the first error) against the upstream
    /// database and returns its output: one line a row, columns separated by `|`, no header
    /// (`psql -At`), trimmed. Fails the test with psql's stderr and the logs on an error.
    pub fn psql(&self, sql: &str) -> String {
        self.pg.psql(sql).unwrap_or_else(|e| panic!("{e}\n{}", self.logs_tail()))
    }

    /// The `item` rows in PostgreSQL owned by `owner`, as `(id, owner, title)`, by id.
    pub fn rows_of(&self, owner: &str) -> Vec<(String, String, String)> {
        let out = self.psql(&format!(
            "SELECT id, owner, title FROM item WHERE owner = {} ORDER BY id",
            sql_literal(owner)
        ));
        out.lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let mut cols = l.splitn(3, '|').map(String::from);
                let mut next = || cols.next().unwrap_or_default();
                (next(), next(), next())
            })
            .collect()
    }

    /// How many ESTABLISHED TCP connections have zero-cache's port as their local port
    /// (/proc/net/tcp and tcp6, state 01): the sync sockets zero-cache holds, seen from its
    /// side. Its own health-check connections (ours) are closed before the fixture returns.
    pub fn upstream_connections(&self) -> usize {
        established_on_local_port(self.port)
    }

    /// Waits until [`upstream_connections`](Self::upstream_connections) is `n` (polled: there
    /// is nothing to block on), failing the test with the logs after `timeout`.
    pub fn wait_upstream_connections(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.upstream_connections();
            if now == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "zero-cache holds {now} sockets, not {n}, after {timeout:?}\n{}",
                self.logs_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything zero-cache wrote (stdout and stderr, all its starts, each after a
    /// `---- syncgate test: zero-cache start N ----` line).
    pub fn log_text(&self) -> String {
        read_lossy(&self.dir.join("zero-cache.log"))
    }

    /// Everything PostgreSQL wrote.
    pub fn postgres_log_text(&self) -> String {
        read_lossy(&self.dir.join("postgres.log"))
    }

    /// The end of both logs, for failure messages.
    pub fn logs_tail(&self) -> String {
        format!(
            "---- zero-cache log (last {LOG_TAIL} bytes of {}) ----\n{}\n\
             ---- PostgreSQL log (last {LOG_TAIL} bytes) ----\n{}\n----",
            self.dir.join("zero-cache.log").display(),
            tail_of(&self.log_text(), LOG_TAIL),
            tail_of(&self.postgres_log_text(), LOG_TAIL)
        )
    }

    /// Whether zero-cache's runner process is running.
    pub fn running(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The runner's process id (also its process group), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(Child::id)
    }

    fn assert_running(&self) {
        assert!(self.running(), "zero-cache is not running\n{}", self.logs_tail());
    }

    /// Starts everything; panics with what went wrong.
    fn launch() -> ZeroCache {
        let began = Instant::now();
        let bin = zero_cache_bin_dir();
        let pg_bin = pg_bin_dir();
        let dir = unique_temp_path("upstream");
        std::fs::create_dir(&dir).expect("create the fixture's temp dir");
        // The PostgreSQL user must be able to enter it.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let watchdog = Watchdog::start(&dir);
        let pg = Postgres::start(&pg_bin, &dir, &watchdog);
        let pg_ready = began.elapsed();
        pg.psql(&schema_sql()).unwrap_or_else(|e| panic!("{e}\n{}", pg.log_tail()));
        deploy_permissions(&bin, &dir, &pg.url());
        let zc = ZeroCache {
            port: free_port_pair(),
            dir,
            pg,
            bin,
            child: Mutex::new(None),
            starts: AtomicUsize::new(0),
            watchdog,
        };
        let zc_began = Instant::now();
        zc.start_zero_cache();
        eprintln!(
            "upstream fixture ready in {:.1?} (PostgreSQL {:.1?}, zero-cache {:.1?}): \
             PostgreSQL on {}, zero-cache on {}, files in {}",
            began.elapsed(),
            pg_ready,
            zc_began.elapsed(),
            zc.pg.port,
            zc.port,
            zc.dir.display()
        );
        zc
    }

    /// Starts zero-cache on the fixture's port and replica file and waits until it serves.
    fn start_zero_cache(&self) {
        let n = self.starts.fetch_add(1, Ordering::Relaxed) + 1;
        let mut cmd = zero_cache_command(
            &self.bin,
            &self.dir,
            &self.pg.url(),
            self.port,
            &self.dir.join("replica.db"),
            &self.dir.join("zero-cache.log"),
            &format!("zero-cache start {n}"),
        );
        cmd.env("ZERO_NUM_SYNC_WORKERS", "1");
        let began = Instant::now();
        let child = spawn_kept(cmd, &self.watchdog)
            .unwrap_or_else(|e| panic!("cannot run zero-cache with {:?}: {e}", node()));
        *self.child.lock().unwrap_or_else(PoisonError::into_inner) = Some(child);
        wait_serving("zero-cache", self.port, || self.exit_status(), || self.logs_tail());
        eprintln!("zero-cache start {n} ready in {:.1?}", began.elapsed());
    }

    /// The runner's exit status if it has exited.
    fn exit_status(&self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        child.as_mut().and_then(|c| c.try_wait().expect("waitpid"))
    }

    /// SIGTERM to the runner, which shuts its server and workers down; waits until every
    /// process of its group is gone (SIGKILL after [`STOP_TIMEOUT`]).
    fn stop_zero_cache(&self) {
        let child = self.child.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(child) = child {
            stop_runner(child, "zero-cache", || marked_processes(&self.dir));
        }
    }
}

impl SharedZeroCache {
    /// The fixture itself, for code that needs a `&'static` one.
    pub fn get(&self) -> &'static ZeroCache {
        self.zc
    }
}

impl ExclusiveZeroCache {
    /// The fixture itself.
    pub fn get(&self) -> &'static ZeroCache {
        self.zc
    }

    /// Stops zero-cache (SIGTERM, then waits until its runner, server and workers have all
    /// exited): an upstream outage. PostgreSQL keeps running.
    pub fn stop(&self) {
        self.zc.stop_zero_cache();
    }

    /// Starts zero-cache again on the same ports, database and replica file (a warm start,
    /// about 4 s) and waits until it serves.
    pub fn start(&self) {
        assert!(!self.zc.running(), "zero-cache is already running");
        self.zc.start_zero_cache();
    }
}

impl Deref for SharedZeroCache {
    type Target = ZeroCache;
    fn deref(&self) -> &ZeroCache {
        self.zc
    }
}

impl Deref for ExclusiveZeroCache {
    type Target = ZeroCache;
    fn deref(&self) -> &ZeroCache {
        self.zc
    }
}

impl Drop for SharedZeroCache {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.zc.logs_tail());
        }
    }
}

impl Drop for ExclusiveZeroCache {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.zc.logs_tail());
        }
        // The next test of the process expects it up; a failure to start shows in that test.
        if !self.zc.running() {
            let zc = self.zc;
            let _ = std::panic::catch_unwind(|| zc.start_zero_cache());
        }
    }
}

// ------------------------------------------------------------------------------------------
// PostgreSQL
// ------------------------------------------------------------------------------------------

pub(super) struct Postgres {
    bin: PathBuf,
    port: u16,
    data: PathBuf,
    log: PathBuf,
    /// The postmaster; killed with the process (PDEATHSIG, watchdog).
    _child: Child,
}

impl Postgres {
    /// initdb into `dir`/pg and starts `postgres` on a free port (another on a bind failure:
    /// a parallel test process may take the port between the check and the bind).
    pub(super) fn start(bin: &Path, dir: &Path, watchdog: &Watchdog) -> Postgres {
        let data = dir.join("pg");
        let sockets = dir.join("run");
        let owner = pg_owner();
        for d in [&data, &sockets] {
            std::fs::create_dir(d).unwrap();
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
            if let Some((uid, gid)) = owner {
                chown(d, Some(uid), Some(gid)).expect("chown a PostgreSQL folder");
            }
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["--auth=trust", "--username=postgres", "--encoding=UTF8", "--locale=C"])
            .arg("--no-sync")
            .current_dir(dir);
        as_pg_owner(&mut initdb, owner);
        let out = initdb.output().unwrap_or_else(|e| panic!("cannot run initdb: {e}"));
        assert!(out.status.success(), "initdb failed: {}", describe(&out));
        let log = dir.join("postgres.log");
        for attempt in 1..=5 {
            let port = free_port_pair();
            let mut conf =
                OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
            // Later settings win: a retry appends its own port. synchronous_commit stays on:
            // off, a commit's WAL waits for the WAL writer (up to 200 ms) before logical
            // replication sends it to zero-cache, and every mutation's poke waits with it;
            // with fsync off, on costs nothing.
            write!(
                conf,
                "\n# syncgate test fixture\nport = {port}\nlisten_addresses = '127.0.0.1'\n\
                 unix_socket_directories = '{}'\nwal_level = logical\nmax_wal_senders = 10\n\
                 max_replication_slots = 10\nmax_connections = 200\nfsync = off\n\
                 full_page_writes = off\n",
                sockets.display()
            )
            .unwrap();
            let file = OpenOptions::new().create(true).append(true).open(&log).unwrap();
            let mut cmd = Command::new(bin.join("postgres"));
            cmd.arg("-D")
                .arg(&data)
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(file.try_clone().unwrap())
                .stderr(file);
            as_pg_owner(&mut cmd, owner);
            let mut child = spawn_kept(cmd, watchdog)
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.join("postgres").display()));
            let deadline = Instant::now() + START_TIMEOUT;
            let ready = loop {
                if child.try_wait().expect("waitpid").is_some() {
                    break false;
                }
                let probe = Command::new(bin.join("pg_isready"))
                    .args(["-q", "-h", "127.0.0.1", "-U", "postgres", "-p", &port.to_string()])
                    .status()
                    .expect("run pg_isready");
                if probe.success() {
                    break true;
                }
                assert!(
                    Instant::now() < deadline,
                    "PostgreSQL was not ready within {START_TIMEOUT:?}:\n{}",
                    tail_of(&read_lossy(&log), LOG_TAIL)
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            if ready {
                return Postgres { bin: bin.into(), port, data, log, _child: child };
            }
            eprintln!("PostgreSQL exited on port {port} (attempt {attempt}); trying another");
        }
        panic!("PostgreSQL did not start:\n{}", tail_of(&read_lossy(&log), LOG_TAIL));
    }

    pub(super) fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub(super) fn psql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres", "-c", sql])
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if !out.status.success() {
            return Err(format!("psql failed on:\n{sql}\n{}", describe(&out)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    pub(super) fn log_tail(&self) -> String {
        format!(
            "---- PostgreSQL log ({}) ----\n{}",
            self.data.display(),
            tail_of(&read_lossy(&self.log), LOG_TAIL)
        )
    }
}

/// The user that owns and runs the cluster when the tests run as root: `postgres` (Debian's
/// package creates it), else `nobody`. `None` when not root: it runs as the test's user.
fn pg_owner() -> Option<(u32, u32)> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let user = ["postgres", "nobody"]
        .iter()
        .find_map(|name| nix::unistd::User::from_name(name).ok().flatten())
        .expect("running as root, and neither a `postgres` nor a `nobody` user exists to run PostgreSQL");
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

fn as_pg_owner(cmd: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        // std drops the supplementary groups too when it changes the user as root.
        cmd.uid(uid).gid(gid);
    }
}

/// `SYNCGATE_TEST_PG_BIN`, else the newest `/usr/lib/postgresql/<major>/bin` with initdb.
pub fn pg_bin_dir() -> PathBuf {
    const FIX: &str = "Run scripts/test.sh (it installs Debian's `postgresql`), or install it \
                       (apt-get install postgresql) or set SYNCGATE_TEST_PG_BIN to a folder \
                       with initdb, postgres, psql and pg_isready";
    if let Some(dir) = std::env::var_os("SYNCGATE_TEST_PG_BIN") {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("initdb").is_file() && dir.join("postgres").is_file(),
            "SYNCGATE_TEST_PG_BIN={} has no initdb and postgres. {FIX}",
            dir.display()
        );
        return dir;
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((major, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).unwrap_or_else(|| panic!("PostgreSQL is not installed. {FIX}"))
}

// ------------------------------------------------------------------------------------------
// zero-cache
// ------------------------------------------------------------------------------------------

/// The tests/clients/zero-cache package, after checking that `@rocicorp/zero` is installed
/// there at [`ZERO_VERSION`].
pub fn zero_cache_package() -> PathBuf {
    let dir = repo_root().join("tests/clients/zero-cache");
    let manifest = dir.join("node_modules/@rocicorp/zero/package.json");
    let installed = std::fs::read_to_string(&manifest).unwrap_or_default();
    let version = serde_json::from_str::<serde_json::Value>(&installed)
        .ok()
        .and_then(|p| p["version"].as_str().map(String::from));
    assert_eq!(
        version.as_deref(),
        Some(ZERO_VERSION),
        "@rocicorp/zero {ZERO_VERSION} is not installed in {}. Run scripts/test.sh, or: \
         (cd tests/clients/zero-cache && npm ci --ignore-scripts)",
        dir.display()
    );
    dir
}

/// `SYNCGATE_TEST_ZERO_CACHE`, else tests/clients/zero-cache/node_modules/.bin; with the
/// `zero-cache` and `zero-deploy-permissions` bins checked.
pub fn zero_cache_bin_dir() -> PathBuf {
    let dir = match std::env::var_os("SYNCGATE_TEST_ZERO_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => zero_cache_package().join("node_modules/.bin"),
    };
    for bin in ["zero-cache", "zero-deploy-permissions"] {
        assert!(
            dir.join(bin).exists(),
            "no {bin} in {}. Run scripts/test.sh, or: \
             (cd tests/clients/zero-cache && npm ci --ignore-scripts)",
            dir.display()
        );
    }
    dir
}

/// The app's schema file (tables and permissions), shared by zero-cache and the client.
pub fn schema_file() -> PathBuf {
    zero_cache_package().join("schema.js")
}

/// No `ZERO_*` setting of the caller's environment reaches zero-cache or its tools, and
/// telemetry is off (nothing leaves the machine).
fn zero_env(cmd: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ZERO_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("ZERO_ENABLE_TELEMETRY", "false").env("DO_NOT_TRACK", "1");
}

/// `zero-deploy-permissions --schema-path schema.js` against the upstream database. Checks
/// its output too: given no schema file it only warns and exits 0, and zero-cache would then
/// sync nothing.
pub(super) fn deploy_permissions(bin: &Path, dir: &Path, upstream: &str) {
    let mut cmd = Command::new(node());
    cmd.arg(bin.join("zero-deploy-permissions"))
        .arg("--schema-path")
        .arg(schema_file())
        .current_dir(dir);
    zero_env(&mut cmd);
    let out = cmd
        .env("ZERO_UPSTREAM_DB", upstream)
        .output()
        .unwrap_or_else(|e| panic!("cannot run zero-deploy-permissions with {:?}: {e}", node()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("Deployed new permissions"),
        "zero-deploy-permissions did not deploy the permissions: {}",
        describe(&out)
    );
}

/// `GET /` answered `200` (zero-cache's health check; `/keepalive` would do the same, but
/// it also feeds an optional drain timer).
fn health_check(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    answer.starts_with(b"HTTP/1.1 200")
}

// ------------------------------------------------------------------------------------------
// Processes
// ------------------------------------------------------------------------------------------

type Job = Box<dyn FnOnce() + Send>;

/// Spawns `cmd` from a thread that lives as long as the process, with PR_SET_PDEATHSIG
/// (SIGKILL) and in a process group of its own, which the watchdog learns about.
pub(super) fn spawn_kept(mut cmd: Command, watchdog: &Watchdog) -> std::io::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("upstream-keeper".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("start the keeper thread");
        Mutex::new(tx)
    });
    cmd.process_group(0);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    keeper
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .send(Box::new(move || {
            let _ = tx.send(cmd.spawn());
        }))
        .expect("the keeper thread runs");
    let child = rx.recv().expect("the keeper thread answers")?;
    watchdog.watch(child.id());
    Ok(child)
}

/// A `sh` that outlives this process by a moment: it reads process group ids on its stdin
/// and, at end of input (this process is gone), SIGKILLs each group and removes the folder.
pub(super) struct Watchdog {
    stdin: Mutex<ChildStdin>,
    /// Never waited for: it exits after this process.
    _child: Child,
}

impl Watchdog {
    /// `$1`: the folder; `$2`: the marker entry (`NAME=folder`). Kills the marked processes
    /// a few times over (one being killed may have been forking), then the groups.
    const SCRIPT: &'static str = r#"
        groups=
        while read -r g; do groups="$groups $g"; done
        for round in 1 2 3; do
            for e in /proc/[0-9]*/environ; do
                if grep -qzxF -- "$2" "$e" 2>/dev/null; then
                    p=${e#/proc/}; kill -KILL "${p%/environ}" 2>/dev/null
                fi
            done
        done
        for g in $groups; do kill -KILL -- "-$g" 2>/dev/null; done
        # PostgreSQL's files are in use until its backends are gone (bounded: zombies of a
        # container without a reaping init would never go).
        for g in $groups; do
            n=0
            while kill -0 -- "-$g" 2>/dev/null && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
        done
        rm -rf -- "$1"
    "#;

    pub(super) fn start(dir: &Path) -> Watchdog {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(Self::SCRIPT)
            .arg("syncgate-upstream-watchdog")
            .arg(dir)
            .arg(format!("{MARKER}={}", dir.display()))
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the fixture's watchdog (sh)");
        Watchdog { stdin: Mutex::new(child.stdin.take().expect("piped stdin")), _child: child }
    }

    fn watch(&self, pgid: u32) {
        let mut stdin = self.stdin.lock().unwrap_or_else(PoisonError::into_inner);
        writeln!(stdin, "{pgid}").expect("tell the watchdog");
    }
}

// ------------------------------------------------------------------------------------------
// Ports, sockets, files
// ------------------------------------------------------------------------------------------

/// A port `p` in [`PORTS`] such that `p` and `p + 1` are free on 127.0.0.1 and `::` now.
/// Drawn at random so that test processes starting together rarely try the same one.
pub(super) fn free_port_pair() -> u16 {
    static DRAWS: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut x = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ (DRAWS.fetch_add(1, Ordering::Relaxed) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for _ in 0..1000 {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = PORTS.start + (x % u64::from(PORTS.end - PORTS.start - 1)) as u16;
        if port_free(port) && port_free(port + 1) {
            return port;
        }
    }
    panic!("no free pair of ports in {PORTS:?}");
}

fn port_free(port: u16) -> bool {
    let v4 = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok();
    // zero-cache listens on `::`; a machine without IPv6 cannot bind it at all.
    let v6 = match TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::AddrNotAvailable,
    };
    v4 && v6
}

/// ESTABLISHED (state 01) sockets in /proc/net/tcp and tcp6 whose local port is `port`.
pub fn established_on_local_port(port: u16) -> usize {
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else { continue };
            let local_port =
                local.rsplit_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if *state == "01" && local_port == Some(port) {
                n += 1;
            }
        }
    }
    n
}

/// The processes whose environment has [`MARKER`]`=<dir>`: the zero-cache processes of the
/// fixture in `dir`, however they were forked.
pub fn marked_processes(dir: &Path) -> Vec<libc::pid_t> {
    processes_with(&[format!("{MARKER}={}", dir.display())])
}

/// The live processes whose environment has every one of `entries` (`NAME=value`).
pub(super) fn processes_with(entries: &[String]) -> Vec<libc::pid_t> {
    let mut found = Vec::new();
    for proc_entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = proc_entry.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        let Ok(environ) = std::fs::read(proc_entry.path().join("environ")) else { continue };
        let has = |entry: &String| environ.split(|&b| b == 0).any(|e| e == entry.as_bytes());
        if entries.iter().all(has) && super::daemon::alive(pid) {
            found.push(pid);
        }
    }
    found
}

/// The command that runs one zero-cache process on the upstream database `db`: its
/// `zero-cache` bin through node in `dir`, the fixture's secrets, `port` and `replica`,
/// [`MARKER`]`=<dir>` for the watchdog, and its output appended to `log` under a
/// `---- syncgate test: <header> ----` line. The caller adds what is its own.
pub(super) fn zero_cache_command(
    bin: &Path,
    dir: &Path,
    db: &str,
    port: u16,
    replica: &Path,
    log: &Path,
    header: &str,
) -> Command {
    let mut log = OpenOptions::new().create(true).append(true).open(log).unwrap();
    writeln!(log, "---- syncgate test: {header} ----").unwrap();
    let mut cmd = Command::new(node());
    cmd.arg(bin.join("zero-cache")).current_dir(dir);
    zero_env(&mut cmd);
    cmd.env("ZERO_UPSTREAM_DB", db)
        .env("ZERO_REPLICA_FILE", replica)
        .env("ZERO_PORT", port.to_string())
        .env("ZERO_ADMIN_PASSWORD", ZERO_ADMIN_PASSWORD)
        .env("ZERO_AUTH_SECRET", SECRET)
        .env(MARKER, dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    cmd
}

/// Waits until the zero-cache on `port` answers its health check, failing the test with
/// `logs()` if its runner exits first (`exited` polls it) or after [`START_TIMEOUT`].
pub(super) fn wait_serving(
    what: &str,
    port: u16,
    mut exited: impl FnMut() -> Option<std::process::ExitStatus>,
    logs: impl Fn() -> String,
) {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = exited() {
            panic!("{what} exited ({status}) before it was ready\n{}", logs());
        }
        if health_check(addr) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} was not ready within {START_TIMEOUT:?}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM to a zero-cache runner, which shuts its server and workers down; waits until it
/// has exited and `left()` (its processes, found by their markers) is empty, and SIGKILLs
/// whatever is left after [`STOP_TIMEOUT`].
pub(super) fn stop_runner(mut child: Child, what: &str, left: impl Fn() -> Vec<libc::pid_t>) {
    // SAFETY: kill(2) on the runner we spawned and have not reaped yet.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        let runner_done = child.try_wait().expect("waitpid").is_some();
        let left = left();
        if runner_done && left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            eprintln!("{what} did not stop within {STOP_TIMEOUT:?}: SIGKILL to {left:?}");
            let _ = child.kill();
            let _ = child.wait();
            for pid in left {
                // SAFETY: kill(2) on a process that carries this fixture's marker.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `'text'` with quotes doubled, for SQL.
pub fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

pub(super) fn read_lossy(path: &Path) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The last `bytes` bytes of `text` (from a character boundary).
pub fn tail_of(text: &str, bytes: usize) -> &str {
    let mut start = text.len().saturating_sub(bytes);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}
