//! The result of one load-client run, written as one JSON line and read back by the
//! report tool. One record is one (server, scenario, variant) cell of the table.

use serde::{Deserialize, Serialize};

/// One run's figures, or the reason it has none.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The server under test: `syncgate`, `tokio-tungstenite`, `fastwebsockets`, `node-ws`...
    pub server: String,
    /// `ping`, `echo`, `fanout`, `storm` or `idle`.
    pub scenario: String,
    /// What varies inside a scenario, e.g. `512 B x 100 conns` or `groups of 100`.
    pub variant: String,
    /// permessage-deflate was negotiated.
    pub compressed: bool,
    /// `None` when the run measured; the failure otherwise (a wrong or missing reply, a
    /// refused connection): such a run has no figures.
    pub error: Option<String>,
    /// What [`Record::rate`] counts: `round trips/s`, `deliveries/s`, `connections/s`.
    pub unit: String,
    /// Median of the per-window rates.
    pub rate: Option<f64>,
    /// Every window's rate, in order.
    pub windows: Vec<f64>,
    /// Latency percentiles in microseconds (round trip, delivery or handshake).
    pub p50_us: Option<f64>,
    /// 99th percentile latency.
    pub p99_us: Option<f64>,
    /// 99.9th percentile latency.
    pub p999_us: Option<f64>,
    /// Server CPU time (all its processes, user + system) per counted operation.
    pub server_cpu_us_per_op: Option<f64>,
    /// Server CPU seconds per wall second over the windows: near 1.0 means the server's
    /// core was saturated, well below means the load client was the limit.
    pub server_cpu_util: Option<f64>,
    /// The load client's CPU seconds per wall second over the windows.
    pub client_cpu_util: Option<f64>,
    /// CPU seconds per wall second that everything else on the machine used over the
    /// windows: well above zero means the figures were taken on a busy machine.
    pub other_cpu_util: Option<f64>,
    /// Connections held open during the measurement (in flight, for the storm).
    pub connections: usize,
    /// Share of the server's CPU over the windows that was system time (the kernel's
    /// sockets, TCP and loopback delivery): a floor no user-space change lowers.
    #[serde(default)]
    pub server_kernel_share: Option<f64>,
    /// The server's CPU per operation by thread, user and system time apart (µs): which
    /// thread a cost sits on, e.g. a syncgate worker's event loop (`worker`) against its
    /// store's log and SQLite threads (`store-N`, `store-N-sql`). Threads of every process
    /// with the same name add up (`stats::thread_key`).
    #[serde(default)]
    pub server_threads: std::collections::BTreeMap<String, ThreadCpu>,
    /// The server's context switches per operation, every thread of its processes: trips
    /// through the scheduler, e.g. a push handed from a worker's event loop to its store
    /// threads and back. Counted, so steadier from run to run than CPU time on a busy
    /// machine.
    #[serde(default)]
    pub server_switches: Option<Switches>,
    /// Idle scenario: server resident memory (all processes) per connection, bytes.
    pub rss_per_conn: Option<f64>,
    /// Idle scenario, syncgate only: growth of its live heap (`syncgate_heap_bytes`, all
    /// processes) per connection, bytes.
    #[serde(default)]
    pub heap_per_conn: Option<f64>,
    /// Idle scenario: kernel TCP buffer memory per connection, bytes (both ends).
    pub kernel_per_conn: Option<f64>,
    /// Idle scenario: kernel slab memory per connection, bytes (socket, inode, file and
    /// epoll structures of both ends, plus whatever else the machine allocated meanwhile).
    pub slab_per_conn: Option<f64>,
    /// Pokes that carried no mutation of the run (initial or query pokes), ignored.
    pub other_pokes: u64,
    /// CPU time per counted operation of other process trees the run was told to watch
    /// (`--cpu-of`): in a front-door run, the zero-cache and PostgreSQL behind the server.
    #[serde(default)]
    pub cpu_us_per_op_of: std::collections::BTreeMap<String, f64>,
    /// Operations completed in the measured windows (to add up runs made at the same time).
    #[serde(default)]
    pub ops: Option<u64>,
    /// Push scenarios: WebSocket messages the load client sent and received per operation
    /// (a push, the poke's messages, keepalives), to turn CPU per operation into CPU per
    /// message.
    #[serde(default)]
    pub messages_per_op: Option<f64>,
    /// Front-door runs through syncgate: messages it relayed per operation, both hops and
    /// both ways (its `syncgate_relayed_to_*_messages_total`).
    #[serde(default)]
    pub relayed_per_op: Option<f64>,
    /// Push runs against embedded syncgate: batches its store committed per second, one
    /// `fdatasync` each (its `syncgate_store_batches_total`).
    #[serde(default)]
    pub fsyncs_per_s: Option<f64>,
    /// Anything a reader must know about this cell (e.g. "peer does no JWT work").
    pub note: Option<String>,
    /// The exact load-client command line.
    pub command: String,
}

impl Record {
    /// The table row this record belongs to.
    pub fn row_key(&self) -> (String, String, bool) {
        (self.scenario.clone(), self.variant.clone(), self.compressed)
    }

    /// [`Record::server_threads`] on one line, the costliest first: `worker 6.0+4.9,
    /// store-N-sql 4.6+1.8` (µs per operation, user + system); threads that used less than
    /// 0.05 µs per operation are left out.
    pub fn server_threads_line(&self) -> String {
        let total = |c: &ThreadCpu| c.user_us_per_op + c.system_us_per_op;
        let mut threads: Vec<_> =
            self.server_threads.iter().filter(|(_, c)| total(c) >= 0.05).collect();
        threads.sort_by(|a, b| total(b.1).total_cmp(&total(a.1)));
        let shown: Vec<String> = threads
            .iter()
            .map(|(name, c)| format!("{name} {:.1}+{:.1}", c.user_us_per_op, c.system_us_per_op))
            .collect();
        shown.join(", ")
    }
}

/// [`Record::server_switches`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Switches {
    /// A thread went to sleep (to wait for I/O, a lock or another thread), per operation.
    pub voluntary_per_op: f64,
    /// The scheduler took the CPU from a thread (often for a thread it had just woken), per
    /// operation.
    pub involuntary_per_op: f64,
}

/// One thread's (or one name's threads') share of [`Record::server_threads`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ThreadCpu {
    /// User time per operation, µs.
    pub user_us_per_op: f64,
    /// System time per operation, µs: the kernel's work on the thread's behalf.
    pub system_us_per_op: f64,
}
