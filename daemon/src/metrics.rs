//! Metrics counters shared by every process of one daemon, and their Prometheus text.
//!
//! The supervisor creates one memfd before it starts anyone and every child maps it. Each process
//! owns one slot (the listener slot 0, worker `i` slot `i + 1`) and is the only writer of its slot,
//! so counters are plain relaxed atomics with no contention; the listener reads all slots to answer
//! `GET /metrics`. This is the only memory processes share that they write to
//! (docs/ARCHITECTURE.md, "Where state lives"), and it survives a worker's crash, so totals never
//! go backwards on a respawn except for the gauges, which the respawned worker resets.

use std::fmt::Write as _;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

/// One counter or gauge. The discriminant is its index inside a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Metric {
    /// Sockets accepted by the listener.
    Accepted,
    /// Plain HTTP requests answered by the listener (health, metrics, errors).
    HttpRequests,
    /// Upgrade requests handed to a worker.
    Handoffs,
    /// Handoffs that could not be delivered (worker queue full or gone).
    HandoffFailures,
    /// Upgrades refused in the listener for a route or parameter error (closed 1002).
    RouteErrors,
    /// Request heads that timed out, were too large or malformed.
    BadHeads,
    /// Sockets that a worker received and found already closed by the peer.
    DeadOnArrival,
    /// Handshakes completed with `connected`.
    Connected,
    /// Tokens refused (AuthInvalidated / Unauthorized).
    AuthRefusals,
    /// Newcomers refused by the displacement rules.
    DisplacementRefusals,
    /// Existing connections replaced by a newcomer (same user, or dead on probe).
    Displaced,
    /// Connections refused for an unsupported protocol version.
    VersionRefusals,
    /// Connections terminated because the peer went silent.
    KeepaliveTimeouts,
    /// WebSocket messages received / sent.
    MessagesIn,
    MessagesOut,
    /// Payload bytes received / sent.
    BytesIn,
    BytesOut,
    /// Connections closed for a protocol violation by the client.
    ProtocolErrors,
    /// Gauge: connections open on this process.
    OpenConnections,
    /// Worker processes respawned by the supervisor (supervisor writes it in slot 0).
    WorkerRestarts,
    /// Upgrades refused by the per-address or per-clientID rate limit (listener).
    RateLimited,
    /// Sockets turned away with 503: too many handshakes or connections (listener).
    Overloaded,
    /// Set to 1 by a worker when it maps its slot, so unused slots stay out of the exposition.
    InUse,
    /// Configuration reloads applied / refused (supervisor, slot 0).
    Reloads,
    ReloadFailures,
    /// Gauge: bytes of heap in use by the process (see [`crate::heap`]).
    HeapBytes,
    /// Upstream mode: upgrades to an upstream that completed (101 received).
    UpstreamConnects,
    /// Upstream mode: upstreams that could not be reached in time, refused the upgrade, or
    /// were lost mid-stream.
    UpstreamFailures,
    /// Upstream mode: messages and payload bytes relayed, per direction.
    RelayedToUpstream,
    RelayedToClient,
    RelayedBytesToUpstream,
    RelayedBytesToClient,
    /// Upstream mode: sockets refused at the edge by admission (token, displacement rules,
    /// version, request): each would have reached zero-cache without syncgate in front.
    EdgeRefusals,
    /// Batches the store committed (group commit: one fsync each).
    StoreBatches,
    /// Changes in those batches: divided by the batches, the mean batch size.
    StoreChanges,
    /// Gauge: bytes of the worker's log on disk (records not yet reclaimed by compaction).
    LogBytes,
    /// Changes compaction folded from the log into SQLite.
    CompactedChanges,
    /// Writes that gathered several queued buffers (`sendmsg`): a backed-up queue leaving
    /// several frames per system call.
    VectoredSends,
    /// Batches whose commit failed (a full disk, SQLite busy past its timeout): nothing in
    /// them was acknowledged, and their groups' clients were sent to reconnect.
    StoreFailures,
    /// Folds of the log into SQLite that failed; the log keeps their batches for a retry.
    CompactionFailures,
}

use crate::config::MAX_WORKERS;

/// The slot of worker `index` of worker generation `generation` (a generation is one set of
/// workers; a reload that changes their number starts the next one).
pub fn worker_slot(generation: usize, index: usize) -> usize {
    1 + (generation % 2) * MAX_WORKERS + index
}

/// Counters per slot; a power of two keeps slots aligned and leaves room to grow. The
/// [`Metric`]s come first, then the histograms' cells ([`Histogram::cells`]), then one cell
/// per upstream ([`UPSTREAM_CELLS`]).
const SLOT_LEN: usize = 128;

/// Where the per-upstream cells start, one per position in `upstream.urls`: in a worker's
/// slot the relays it has open to that upstream, in slot 0 the upstream's health (written by
/// the supervisor: 1 up, 0 down).
const UPSTREAM_CELLS: usize = 80;
const _: () = assert!(UPSTREAM_CELLS + crate::config::MAX_UPSTREAMS <= SLOT_LEN);

/// Upper bounds, in microseconds, of the histograms' buckets: from a fast fsync (under a
/// millisecond on an SSD) to the store's 5 s busy timeout, the longest a commit can wait for
/// another worker's lock.
const BUCKETS_US: [u64; 10] =
    [250, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 500_000, 1_000_000, 5_000_000];
/// Cells of one histogram: one count per bucket, then one for beyond the last bucket, then
/// the sum of the observations in microseconds.
const HISTOGRAM_LEN: usize = BUCKETS_US.len() + 2;

/// A latency histogram of a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Histogram {
    /// Commits of the store, fsync included, on the worker's store thread.
    Commit,
    /// One turn of the worker's loop: handling one batch of completions, up to its next
    /// wait. A long one is a stall every connection of the worker felt.
    Iteration,
    /// One compaction run: logged batches folded into SQLite, on the store thread.
    Compaction,
}

impl Histogram {
    const ALL: [Histogram; 3] = [Histogram::Commit, Histogram::Iteration, Histogram::Compaction];

    /// Where the histogram's cells start in a slot.
    fn cells(self) -> usize {
        HISTOGRAM_CELLS + self as usize * HISTOGRAM_LEN
    }

    fn name_and_help(self) -> (&'static str, &'static str) {
        match self {
            Histogram::Commit => (
                "syncgate_commit_seconds",
                "Commits of the store (fsync included), on the worker's store thread.",
            ),
            Histogram::Iteration => (
                "syncgate_loop_iteration_seconds",
                "Turns of the worker's event loop; a long one stalled every connection of the worker.",
            ),
            Histogram::Compaction => (
                "syncgate_compaction_seconds",
                "Compaction runs: the log's batches folded into SQLite, on the worker's store thread.",
            ),
        }
    }
}

/// Where the histograms' cells start in a slot.
const HISTOGRAM_CELLS: usize = 40;
const _: () = assert!((Metric::CompactionFailures as usize) < HISTOGRAM_CELLS);
const _: () = assert!(HISTOGRAM_CELLS + Histogram::ALL.len() * HISTOGRAM_LEN <= UPSTREAM_CELLS);

/// Name, type and help text of every metric, in exposition order.
#[rustfmt::skip]
const ALL: &[(Metric, &str, &str, &str)] = &[
    (Metric::Accepted, "syncgate_accepted_total", "counter", "Sockets accepted by the listener."),
    (Metric::HttpRequests, "syncgate_http_requests_total", "counter", "Plain HTTP requests answered."),
    (Metric::Handoffs, "syncgate_handoffs_total", "counter", "Upgrades handed to a worker."),
    (Metric::HandoffFailures, "syncgate_handoff_failures_total", "counter", "Upgrades that could not be handed to a worker."),
    (Metric::RouteErrors, "syncgate_route_errors_total", "counter", "Upgrades closed 1002 for a route or parameter error."),
    (Metric::BadHeads, "syncgate_bad_heads_total", "counter", "Request heads refused: timeout, too large or malformed."),
    (Metric::DeadOnArrival, "syncgate_dead_on_arrival_total", "counter", "Sockets closed by the peer during the handoff."),
    (Metric::Connected, "syncgate_connected_total", "counter", "Handshakes completed with connected."),
    (Metric::AuthRefusals, "syncgate_auth_refusals_total", "counter", "Sockets refused for their token."),
    (Metric::DisplacementRefusals, "syncgate_displacement_refusals_total", "counter", "Newcomers refused by the displacement rules."),
    (Metric::Displaced, "syncgate_displaced_total", "counter", "Connections replaced by a newcomer with the same clientID."),
    (Metric::VersionRefusals, "syncgate_version_refusals_total", "counter", "Sockets refused for their protocol version."),
    (Metric::KeepaliveTimeouts, "syncgate_keepalive_timeouts_total", "counter", "Connections terminated for silence."),
    (Metric::MessagesIn, "syncgate_messages_in_total", "counter", "WebSocket messages received."),
    (Metric::MessagesOut, "syncgate_messages_out_total", "counter", "WebSocket messages sent."),
    (Metric::BytesIn, "syncgate_bytes_in_total", "counter", "Bytes received on WebSocket connections."),
    (Metric::BytesOut, "syncgate_bytes_out_total", "counter", "Bytes sent on WebSocket connections."),
    (Metric::ProtocolErrors, "syncgate_protocol_errors_total", "counter", "Connections closed for a client protocol error."),
    (Metric::OpenConnections, "syncgate_connections_open", "gauge", "WebSocket connections open."),
    (Metric::WorkerRestarts, "syncgate_worker_restarts_total", "counter", "Times this process was respawned after it died."),
    (Metric::RateLimited, "syncgate_rate_limited_total", "counter", "Upgrades refused by a connection rate limit."),
    (Metric::Overloaded, "syncgate_overloaded_total", "counter", "Sockets refused with 503 (handshake or connection caps)."),
    (Metric::InUse, "syncgate_slot_in_use", "gauge", "Internal: the slot belongs to a worker."),
    (Metric::Reloads, "syncgate_reloads_total", "counter", "Configuration reloads applied."),
    (Metric::ReloadFailures, "syncgate_reload_failures_total", "counter", "Configuration reloads refused."),
    (Metric::HeapBytes, "syncgate_heap_bytes", "gauge", "Bytes of heap allocated and not freed."),
    (Metric::UpstreamConnects, "syncgate_upstream_connects_total", "counter", "Upstream mode: WebSockets opened to an upstream."),
    (Metric::UpstreamFailures, "syncgate_upstream_failures_total", "counter", "Upstream mode: upstreams unreachable, refusing, or lost mid-stream."),
    (Metric::RelayedToUpstream, "syncgate_relayed_to_upstream_messages_total", "counter", "Upstream mode: client messages relayed to the upstream."),
    (Metric::RelayedToClient, "syncgate_relayed_to_client_messages_total", "counter", "Upstream mode: upstream messages relayed to the client."),
    (Metric::RelayedBytesToUpstream, "syncgate_relayed_to_upstream_bytes_total", "counter", "Upstream mode: payload bytes relayed to the upstream."),
    (Metric::RelayedBytesToClient, "syncgate_relayed_to_client_bytes_total", "counter", "Upstream mode: payload bytes relayed to the client."),
    (Metric::EdgeRefusals, "syncgate_edge_refusals_total", "counter", "Upstream mode: sockets refused at the edge before reaching the upstream."),
    (Metric::StoreBatches, "syncgate_store_batches_total", "counter", "Batches committed by the store, one fsync each."),
    (Metric::StoreChanges, "syncgate_store_changes_total", "counter", "Changes committed by the store (per batch: divide by the batches)."),
    (Metric::LogBytes, "syncgate_log_bytes", "gauge", "Bytes of the store's log on disk, not yet reclaimed by compaction."),
    (Metric::CompactedChanges, "syncgate_compacted_changes_total", "counter", "Changes folded from the log into SQLite by compaction."),
    (Metric::VectoredSends, "syncgate_vectored_sends_total", "counter", "Writes that gathered several queued frames into one system call."),
    (Metric::StoreFailures, "syncgate_store_failures_total", "counter", "Batches whose commit failed (a full disk, SQLite busy): nothing in them was acknowledged."),
    (Metric::CompactionFailures, "syncgate_compaction_failures_total", "counter", "Folds of the log into SQLite that failed; the log keeps their batches for a retry."),
];

/// The shared counter table, mapped in this process.
pub struct Metrics {
    /// Base of the mapping: `slots * SLOT_LEN` counters.
    base: *const AtomicU64,
    /// Number of slots: the listener plus every worker.
    slots: usize,
    /// This process's slot; the only one it writes.
    own: usize,
    /// Bytes mapped, for the unmap on drop.
    len: usize,
}

impl Drop for Metrics {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once; `cell` borrows from `self`, so no
        // reference into it outlives this.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

// The mapping is process-wide and only touched through atomics.
unsafe impl Send for Metrics {}
unsafe impl Sync for Metrics {}

impl Metrics {
    /// Creates the shared memory (supervisor only): slot 0 for the listener and the
    /// supervisor, then two banks of worker slots, so a graceful replacement's new workers
    /// count beside the old ones while those drain (see [`worker_slot`]). Untouched slots
    /// cost no memory: the memfd's pages are allocated on first write.
    pub fn create() -> std::io::Result<OwnedFd> {
        let fd =
            nix::sys::memfd::memfd_create(c"syncgate-metrics", nix::sys::memfd::MFdFlags::empty())?;
        let len = ((1 + 2 * MAX_WORKERS) * SLOT_LEN * 8) as i64;
        nix::unistd::ftruncate(fd.as_fd(), len)?;
        Ok(fd)
    }

    /// Maps the table from `fd` and writes into slot `own`.
    pub fn map(fd: &impl AsFd, own: usize) -> std::io::Result<Metrics> {
        let stat = nix::sys::stat::fstat(fd.as_fd())?;
        let len = stat.st_size as usize;
        let slots = len / (SLOT_LEN * 8);
        if slots == 0 || own >= slots {
            return Err(std::io::Error::other("metrics table too small"));
        }
        // SAFETY: a fresh shared mapping of a memfd we own a descriptor of; its size was checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Metrics { base: ptr as *const AtomicU64, slots, own, len })
    }

    fn cell(&self, slot: usize, m: Metric) -> &AtomicU64 {
        self.cell_at(slot, m as usize)
    }

    fn cell_at(&self, slot: usize, index: usize) -> &AtomicU64 {
        debug_assert!(slot < self.slots && index < SLOT_LEN);
        // SAFETY: in bounds of the mapping (`own` is checked in `map`, the other slots are
        // read by index below `slots`, the cells by constants), which lives as long as `self`.
        unsafe { &*self.base.add(slot * SLOT_LEN + index) }
    }

    /// Counts one observation of `h` that took `took`.
    pub fn observe(&self, h: Histogram, took: std::time::Duration) {
        let us = took.as_micros().min(u64::MAX as u128) as u64;
        let bucket = BUCKETS_US.iter().position(|&le| us <= le);
        let index = h.cells() + bucket.unwrap_or(BUCKETS_US.len());
        self.cell_at(self.own, index).fetch_add(1, Ordering::Relaxed);
        self.cell_at(self.own, h.cells() + BUCKETS_US.len() + 1).fetch_add(us, Ordering::Relaxed);
    }

    /// Histogram `h` of a worker, both generations added: cumulative bucket counts (the last
    /// is the total count) and the sum in microseconds.
    fn histogram(&self, h: Histogram, worker: usize) -> ([u64; BUCKETS_US.len() + 1], u64) {
        let read = |i: usize| -> u64 {
            (0..2)
                .map(|g| {
                    self.cell_at(worker_slot(g, worker), h.cells() + i).load(Ordering::Relaxed)
                })
                .sum()
        };
        let mut cumulative = [0; BUCKETS_US.len() + 1];
        let mut total = 0;
        for (i, c) in cumulative.iter_mut().enumerate() {
            total += read(i);
            *c = total;
        }
        (cumulative, read(BUCKETS_US.len() + 1))
    }

    /// The slot this process writes (a worker's also names its write-ahead log).
    pub fn slot(&self) -> usize {
        self.own
    }

    pub fn add(&self, m: Metric, n: u64) {
        self.cell(self.own, m).fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(&self, m: Metric) {
        self.add(m, 1);
    }

    pub fn set(&self, m: Metric, v: u64) {
        self.cell(self.own, m).store(v, Ordering::Relaxed);
    }

    pub fn get(&self, slot: usize, m: Metric) -> u64 {
        self.cell(slot, m).load(Ordering::Relaxed)
    }

    /// Adds `n` to a counter of another slot: only the supervisor does it, for the restart
    /// count of the process it respawned.
    pub fn add_to(&self, slot: usize, m: Metric, n: u64) {
        self.cell(slot, m).fetch_add(n, Ordering::Relaxed);
    }

    /// The worker slots in use (their worker mapped them), over both banks: what a sum over
    /// the workers needs to read ([`Metrics::total_of`]), rather than every slot of the
    /// table (2048 of them, a cache line and more each).
    pub fn worker_slots_in_use(&self) -> Vec<usize> {
        (1..self.slots).filter(|&slot| self.get(slot, Metric::InUse) != 0).collect()
    }

    /// The sum of `m` over `slots` (e.g. connections open in the whole daemon).
    pub fn total_of(&self, slots: &[usize], m: Metric) -> u64 {
        slots.iter().map(|&slot| self.get(slot, m)).sum()
    }

    /// Worker: the relays open to the upstream at `position` in the list changed by `delta`.
    pub fn add_upstream_relays(&self, position: usize, delta: i64) {
        if position < crate::config::MAX_UPSTREAMS {
            // Two's complement: adding the wrapped negative subtracts.
            self.cell_at(self.own, UPSTREAM_CELLS + position)
                .fetch_add(delta as u64, Ordering::Relaxed);
        }
    }

    /// Worker: sets the relay counts of every position at once (after a reload reordered
    /// the list); positions past `counts` are zeroed.
    pub fn set_upstream_relays(&self, counts: &[u64]) {
        for i in 0..crate::config::MAX_UPSTREAMS {
            let v = counts.get(i).copied().unwrap_or(0);
            self.cell_at(self.own, UPSTREAM_CELLS + i).store(v, Ordering::Relaxed);
        }
    }

    /// Supervisor: the health of the upstream at `position` (slot 0).
    pub fn set_upstream_up(&self, position: usize, up: bool) {
        if position < crate::config::MAX_UPSTREAMS {
            self.cell_at(0, UPSTREAM_CELLS + position).store(u64::from(up), Ordering::Relaxed);
        }
    }

    /// The per-upstream series of upstream mode, by URL (`urls`: the list as configured, in
    /// the positions the cells use): its health and the relays open to it, all workers.
    pub fn render_upstreams(&self, urls: &[String]) -> String {
        let mut out = String::new();
        let slots = self.worker_slots_in_use();
        let label = |u: &str| u.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = writeln!(
            out,
            "# HELP syncgate_upstream_up Upstream mode: 1 while the health checks find the upstream up.\n# TYPE syncgate_upstream_up gauge"
        );
        for (i, url) in urls.iter().enumerate().take(crate::config::MAX_UPSTREAMS) {
            let up = self.cell_at(0, UPSTREAM_CELLS + i).load(Ordering::Relaxed);
            let _ = writeln!(out, "syncgate_upstream_up{{upstream=\"{}\"}} {up}", label(url));
        }
        let _ = writeln!(
            out,
            "# HELP syncgate_upstream_relays Upstream mode: relays open to the upstream, all workers.\n# TYPE syncgate_upstream_relays gauge"
        );
        for (i, url) in urls.iter().enumerate().take(crate::config::MAX_UPSTREAMS) {
            let n: u64 = slots
                .iter()
                .map(|&slot| self.cell_at(slot, UPSTREAM_CELLS + i).load(Ordering::Relaxed))
                .sum();
            let _ = writeln!(out, "syncgate_upstream_relays{{upstream=\"{}\"}} {n}", label(url));
        }
        out
    }

    /// Prometheus text exposition of every slot. Worker slots carry a `worker` label so a
    /// test or an operator can see which worker served what; the listener's is `listener`.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let used: Vec<usize> = (0..MAX_WORKERS)
            .filter(|&i| (0..2).any(|g| self.get(worker_slot(g, i), Metric::InUse) != 0))
            .collect();
        for &(m, name, kind, help) in ALL {
            if m == Metric::InUse {
                continue;
            }
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            let _ = writeln!(out, "{name}{{process=\"listener\"}} {}", self.get(0, m));
            // Both generations of a worker index add up: one series per worker, whatever
            // reloads happened.
            for &i in &used {
                let v: u64 = (0..2).map(|g| self.get(worker_slot(g, i), m)).sum();
                let _ = writeln!(out, "{name}{{process=\"worker\",worker=\"{i}\"}} {v}");
            }
        }
        for h in Histogram::ALL {
            let (name, help) = h.name_and_help();
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for &i in &used {
                let (cumulative, sum_us) = self.histogram(h, i);
                let labels = format!("process=\"worker\",worker=\"{i}\"");
                for (le, count) in BUCKETS_US.iter().zip(cumulative) {
                    let le = *le as f64 / 1e6;
                    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {count}");
                }
                let count = cumulative[BUCKETS_US.len()];
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
                let _ = writeln!(out, "{name}_sum{{{labels}}} {}", sum_us as f64 / 1e6);
                let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_separate_and_shared_across_mappings() {
        let fd = Metrics::create().unwrap();
        let w1 = Metrics::map(&fd, worker_slot(0, 1)).unwrap();
        let w1_next = Metrics::map(&fd, worker_slot(1, 1)).unwrap();
        let l = Metrics::map(&fd, 0).unwrap();
        w1.set(Metric::InUse, 1);
        w1.add(Metric::MessagesIn, 5);
        w1_next.add(Metric::MessagesIn, 2);
        l.inc(Metric::Accepted);
        let text = l.render();
        assert!(
            text.contains("syncgate_messages_in_total{process=\"worker\",worker=\"1\"} 7"),
            "{text}"
        );
        assert!(!text.contains("worker=\"0\""), "unused slots stay out: {text}");
        assert!(text.contains("syncgate_accepted_total{process=\"listener\"} 1"));
        assert!(!text.contains("syncgate_slot_in_use"));
        assert!(ALL.len() <= SLOT_LEN);
        w1_next.set(Metric::InUse, 1);
        let used = l.worker_slots_in_use();
        assert_eq!(used, [worker_slot(0, 1), worker_slot(1, 1)]);
        assert_eq!(l.total_of(&used, Metric::MessagesIn), 7);
    }

    #[test]
    fn commit_latency_is_a_cumulative_histogram_per_worker() {
        use std::time::Duration;
        let fd = Metrics::create().unwrap();
        let w0 = Metrics::map(&fd, worker_slot(0, 0)).unwrap();
        w0.set(Metric::InUse, 1);
        for us in [100, 900, 3_000, 7_000_000] {
            w0.observe(Histogram::Commit, Duration::from_micros(us));
        }
        // The next generation's worker 0 adds to the same series.
        let next = Metrics::map(&fd, worker_slot(1, 0)).unwrap();
        next.observe(Histogram::Commit, Duration::from_micros(250));
        // The other histogram keeps its own cells.
        w0.observe(Histogram::Iteration, Duration::from_secs(1));
        let text = Metrics::map(&fd, 0).unwrap().render();
        let series = |suffix: &str| {
            let prefix = format!("syncgate_commit_seconds{suffix} ");
            let line = text
                .lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("{prefix}: {text}"));
            line[prefix.len()..].to_string()
        };
        let w = "process=\"worker\",worker=\"0\"";
        assert_eq!(series(&format!("_bucket{{{w},le=\"0.00025\"}}")), "2");
        assert_eq!(series(&format!("_bucket{{{w},le=\"0.001\"}}")), "3");
        assert_eq!(series(&format!("_bucket{{{w},le=\"0.005\"}}")), "4");
        assert_eq!(series(&format!("_bucket{{{w},le=\"5\"}}")), "4");
        assert_eq!(series(&format!("_bucket{{{w},le=\"+Inf\"}}")), "5");
        assert_eq!(series(&format!("_count{{{w}}}")), "5");
        assert_eq!(series(&format!("_sum{{{w}}}")), "7.00425");
        assert!(text.contains("# TYPE syncgate_commit_seconds histogram"), "{text}");
        assert!(
            text.contains(&format!("syncgate_loop_iteration_seconds_count{{{w}}} 1")),
            "{text}"
        );
    }
}
