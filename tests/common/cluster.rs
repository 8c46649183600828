//! zero-cache scaled out as its documentation deploys it: one replication-manager and several
//! view-syncers on one PostgreSQL, the upstreams of the many-upstreams tests. The app, the
//! database and the processes' care are the single fixture's ([`super::upstream`]); this one
//! is started by the test that uses it (not shared: a test stops and starts view-syncers).
//!
//! How it runs here (zero-cache 1.9.0; found by experiment, 2026-12-07):
//!
//! - The replication-manager is a zero-cache with `ZERO_NUM_SYNC_WORKERS=0`: it replicates
//!   PostgreSQL into its replica file and serves the change stream on `ZERO_PORT + 1`.
//! - A view-syncer needs a replica that has been synced once. zero-cache's way is a
//!   litestream backup, which needs a litestream binary and an object store; instead each
//!   view-syncer starts from a copy of the manager's replica (`VACUUM INTO` with zero-cache's
//!   own SQLite module) and catches up from the change stream
//!   (`ZERO_CHANGE_STREAMER_URI`). Copies of one replica version stay valid: without a backup
//!   the manager purges no change log.
//! - Each process has its own `ZERO_TASK_ID`, which zero-cache writes as the owner of a
//!   client group's CVR (`"zero_0/cvr".instances.owner`): that is how a test sees, from the
//!   upstream side, which view-syncer serves a group. A group served by two view-syncers
//!   changes owner (zero-cache then sends `Rehome` to the other's clients).
//!
//! Start-up: PostgreSQL about 2 s, the manager about 7 s, the view-syncers (together) about
//! 13 s on an idle two-core machine.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::host::{describe, node, unique_temp_path};
use super::upstream::{
    deploy_permissions, free_port_pair, pg_bin_dir, processes_with, read_lossy, schema_sql,
    spawn_kept, stop_runner, tail_of, wait_serving, zero_cache_bin_dir, zero_cache_command,
    zero_cache_package, Postgres, Watchdog, LOG_TAIL, MARKER,
};

/// Marks one process of the cluster (its value: the process's task ID), beside [`MARKER`],
/// which marks them all for the watchdog.
const NODE_MARKER: &str = "SYNCGATE_TEST_UPSTREAM_NODE";

/// One PostgreSQL, one replication-manager, several view-syncers.
pub struct ZeroCluster {
    dir: PathBuf,
    pg: Postgres,
    bin: PathBuf,
    watchdog: Watchdog,
    manager: Node,
    syncers: Vec<Node>,
}

/// One zero-cache process of the cluster.
struct Node {
    /// Its `ZERO_TASK_ID`, the name of its log file and of its replica.
    name: String,
    /// Its `ZERO_PORT`.
    port: u16,
    /// What it gets beside the environment every process gets.
    env: Vec<(&'static str, String)>,
    /// Its runner while it runs.
    child: Mutex<Option<Child>>,
}

impl ZeroCluster {
    /// Starts PostgreSQL with the app, the manager and `view_syncers` view-syncers; returns
    /// once every one serves. Panics with the logs on a failure.
    pub fn launch(view_syncers: usize) -> ZeroCluster {
        let began = Instant::now();
        let dir = unique_temp_path("cluster");
        std::fs::create_dir(&dir).expect("create the cluster's temp dir");
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let watchdog = Watchdog::start(&dir);
        let pg = Postgres::start(&pg_bin_dir(), &dir, &watchdog);
        pg.psql(&schema_sql()).unwrap_or_else(|e| panic!("{e}\n{}", pg.log_tail()));
        let bin = zero_cache_bin_dir();
        deploy_permissions(&bin, &dir, &pg.url());
        let manager_port = free_port_pair();
        let manager = Node {
            name: "manager".into(),
            port: manager_port,
            env: vec![("ZERO_NUM_SYNC_WORKERS", "0".into())],
            child: Mutex::new(None),
        };
        let streamer = format!("ws://127.0.0.1:{}/", manager_port + 1);
        let syncers = (0..view_syncers)
            .map(|i| Node {
                name: format!("view-syncer-{i}"),
                port: free_port_pair(),
                env: vec![
                    ("ZERO_NUM_SYNC_WORKERS", "1".into()),
                    ("ZERO_CHANGE_STREAMER_URI", streamer.clone()),
                ],
                child: Mutex::new(None),
            })
            .collect();
        let cluster = ZeroCluster { dir, pg, bin, watchdog, manager, syncers };
        cluster.spawn(&cluster.manager);
        cluster.wait_serving(&cluster.manager);
        for s in &cluster.syncers {
            cluster.copy_replica(s);
            cluster.spawn(s);
        }
        for s in &cluster.syncers {
            cluster.wait_serving(s);
        }
        eprintln!(
            "zero-cache cluster ready in {:.1?}: manager on {}, view-syncers on {:?}, files in {}",
            began.elapsed(),
            cluster.manager.port,
            cluster.syncers.iter().map(|s| s.port).collect::<Vec<_>>(),
            cluster.dir.display()
        );
        cluster
    }

    /// Each view-syncer's URL for `upstream.urls`, in order.
    pub fn syncer_urls(&self) -> Vec<String> {
        self.syncers.iter().map(|s| format!("ws://127.0.0.1:{}", s.port)).collect()
    }

    /// View-syncer `i`'s task ID: the owner it writes into the CVRs it serves.
    pub fn syncer_name(&self, i: usize) -> &str {
        &self.syncers[i].name
    }

    /// View-syncer `i`'s port.
    pub fn syncer_port(&self, i: usize) -> u16 {
        self.syncers[i].port
    }

    /// Stops view-syncer `i` (SIGTERM; every process of it gone): an outage of one upstream.
    pub fn stop_syncer(&self, i: usize) {
        let node = &self.syncers[i];
        let child = node.child.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(child) = child {
            let marks = [
                format!("{MARKER}={}", self.dir.display()),
                format!("{NODE_MARKER}={}", node.name),
            ];
            stop_runner(child, &node.name, || processes_with(&marks));
        }
    }

    /// Starts view-syncer `i` again on its port and replica (a warm start) and waits until
    /// it serves.
    pub fn start_syncer(&self, i: usize) {
        let node = &self.syncers[i];
        assert!(node.child.lock().unwrap_or_else(PoisonError::into_inner).is_none());
        self.spawn(node);
        self.wait_serving(node);
    }

    /// The task ID that owns `group`'s CVR, if zero-cache has one for it.
    pub fn owner_of(&self, group: &str) -> Option<String> {
        let out = self.psql(&format!(
            "SELECT owner FROM \"zero_0/cvr\".instances WHERE \"clientGroupID\" = {}",
            super::upstream::sql_literal(group)
        ));
        Some(out).filter(|o| !o.is_empty())
    }

    /// Waits until `group`'s CVR is owned by `owner`, failing with the logs after `timeout`.
    pub fn wait_owner(&self, group: &str, owner: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.owner_of(group);
            if now.as_deref() == Some(owner) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "group {group} is owned by {now:?}, not {owner}, after {timeout:?}\n{}",
                self.logs_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `sql` against the upstream database (`psql -At` output, trimmed).
    pub fn psql(&self, sql: &str) -> String {
        self.pg.psql(sql).unwrap_or_else(|e| panic!("{e}\n{}", self.logs_tail()))
    }

    /// The end of every process's log, for failure messages.
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        for node in std::iter::once(&self.manager).chain(&self.syncers) {
            let log = read_lossy(&self.log_path(node));
            out.push_str(&format!(
                "---- {} log (last {LOG_TAIL} bytes) ----\n{}\n",
                node.name,
                tail_of(&log, LOG_TAIL / 2)
            ));
        }
        out + &self.pg.log_tail()
    }

    fn log_path(&self, node: &Node) -> PathBuf {
        self.dir.join(format!("{}.log", node.name))
    }

    fn replica(&self, node: &Node) -> PathBuf {
        self.dir.join(format!("{}.db", node.name))
    }

    /// Starts `node`'s runner (it is not waited for here).
    fn spawn(&self, n: &Node) {
        let mut cmd = zero_cache_command(
            &self.bin,
            &self.dir,
            &self.pg.url(),
            n.port,
            &self.replica(n),
            &self.log_path(n),
            &format!("{} starts", n.name),
        );
        cmd.env("ZERO_TASK_ID", &n.name)
            .env(NODE_MARKER, &n.name)
            .envs(n.env.iter().map(|(k, v)| (k, v)));
        let child = spawn_kept(cmd, &self.watchdog)
            .unwrap_or_else(|e| panic!("cannot run zero-cache with {:?}: {e}", node()));
        *n.child.lock().unwrap_or_else(PoisonError::into_inner) = Some(child);
    }

    /// Waits until `node` answers its health check.
    fn wait_serving(&self, node: &Node) {
        let exited = || {
            let mut child = node.child.lock().unwrap_or_else(PoisonError::into_inner);
            child.as_mut().and_then(|c| c.try_wait().expect("waitpid"))
        };
        wait_serving(&node.name, node.port, exited, || self.logs_tail());
    }

    /// A view-syncer's first replica: a copy of the manager's, made with zero-cache's own
    /// SQLite module (`VACUUM INTO` reads a consistent snapshot while the manager runs).
    fn copy_replica(&self, n: &Node) {
        let script = "const Database = require('@rocicorp/zero-sqlite3'); \
                      const db = new Database(process.argv[1], {readonly: true}); \
                      db.prepare('VACUUM INTO ?').run(process.argv[2]); db.close();";
        let out = Command::new(node())
            .arg("-e")
            .arg(script)
            .arg(self.replica(&self.manager))
            .arg(self.replica(n))
            .current_dir(zero_cache_package())
            .output()
            .expect("run node to copy the replica");
        assert!(out.status.success(), "copying the manager's replica failed: {}", describe(&out));
    }
}

impl Drop for ZeroCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs_tail());
        }
        // The watchdog kills whatever is left when the test process ends; stopping here
        // frees the machine for the next test of the process at once.
        for i in 0..self.syncers.len() {
            self.stop_syncer(i);
        }
    }
}
