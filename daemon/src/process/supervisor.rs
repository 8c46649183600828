//! The supervisor: the process an operator (or systemd) starts. It owns the listening socket,
//! the handoff socket pairs and the metrics memory, starts the listener and the workers by
//! fork+exec of its own binary, respawns the ones that die, and turns signals into an orderly
//! shutdown. It holds no ring; its one thread besides the main one is the upstreams' health
//! checker ([`crate::process::health`]), which forks nothing: children are started with
//! fork+exec from the main thread, which that thread does not make unsafe.
//!
//! Children inherit descriptors at fixed numbers (see [`fds`]) and the resolved configuration
//! in an environment variable; they die with the supervisor (`PR_SET_PDEATHSIG`), also when it
//! is killed with SIGKILL.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::config::{Config, RESOLVED_ENV};
use crate::metrics::{Metric, Metrics};
use crate::process::control::{self, Message};
use crate::process::handoff;
use crate::process::health::Checker;
use crate::sync::wal;

/// Descriptor numbers in a child.
pub mod fds {
    /// The child's end of its control channel ([`crate::process::control`]).
    pub const CONTROL: i32 = 3;
    /// The metrics memfd.
    pub const METRICS: i32 = 4;
    /// Listener: the listening socket; worker: its handoff channel.
    pub const SOCKET: i32 = 5;
    /// Listener: the first of the workers' handoff channels, one per worker in order.
    pub const CHANNELS: i32 = 6;
}

/// How long children get to report ready before startup is declared failed.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Respawn delay after a crash, doubled while children keep dying young, up to the maximum,
/// so a crash loop does not spin the host.
const RESPAWN_MIN: Duration = Duration::from_millis(100);
const RESPAWN_MAX: Duration = Duration::from_secs(5);
/// A child that lived this long counts as healthy: its successor starts at the minimum delay.
const HEALTHY_UPTIME: Duration = Duration::from_secs(10);
/// Listen backlog: bursts of reconnects wait in the kernel instead of being refused.
const BACKLOG: i32 = 4096;
/// What a poll of the control channels got from one child.
type Received = Result<Message, control::RecvError>;

/// How long a reload waits for every child to confirm it applied the new configuration.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Listener,
    Worker(usize),
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Listener => write!(f, "listener"),
            Role::Worker(i) => write!(f, "worker {i}"),
        }
    }
}

struct Process {
    role: Role,
    child: Option<Child>,
    /// Our end of the child's control channel (replaced on respawn).
    control: Option<OwnedFd>,
    /// The child said `Ready` (a respawned child is not sent reloads before that).
    ready: bool,
    started: Instant,
    /// Delay before the next respawn.
    backoff: Duration,
    /// When a dead child is to be started again.
    respawn_at: Option<Instant>,
}

struct Supervisor {
    config: Config,
    /// The file reloads re-read (None: defaults and environment only).
    path: Option<std::path::PathBuf>,
    /// Reload generation, so acknowledgements are matched to the right reload.
    generation: u64,
    resolved: String,
    listen: OwnedFd,
    metrics_fd: OwnedFd,
    metrics: Metrics,
    /// `(listener_end, worker_end)` per worker; both ends stay open here so handoffs queue
    /// while a worker restarts.
    channels: Vec<(OwnedFd, OwnedFd)>,
    procs: Vec<Process>,
    /// Processes of an earlier generation after a graceful replacement: never respawned,
    /// gone once they drained.
    draining: Vec<Process>,
    /// Counts graceful replacements; picks the workers' metrics bank.
    worker_generation: usize,
    /// The listening socket came from systemd: `listen` cannot change.
    activated: bool,
    /// The upstreams' health checks (upstream mode with `upstream.health_interval_ms` > 0).
    checker: Option<Checker>,
    /// The checker woke the poll: a state changed, to be told to the workers.
    health_changed: bool,
    /// The storage directory's lock, held shared for the daemon's life ([`wal::lock`]).
    _storage_lock: std::fs::File,
    /// A replacement is asking the workers to share their groups: none is told to use its
    /// write-ahead log meanwhile ([`Supervisor::grant_logs`]).
    sharing: bool,
}

/// The processes of one generation: the listener first, then the workers.
fn generation(workers: usize) -> Vec<Process> {
    let process = |role| Process {
        role,
        child: None,
        control: None,
        ready: false,
        started: Instant::now(),
        backoff: RESPAWN_MIN,
        respawn_at: None,
    };
    let mut procs = vec![process(Role::Listener)];
    procs.extend((0..workers).map(|i| process(Role::Worker(i))));
    procs
}

/// Runs the daemon until SIGTERM/SIGINT. Returns an error message if startup fails.
pub fn run(mut config: Config, path: Option<std::path::PathBuf>) -> Result<(), String> {
    if config.task_id.is_empty() {
        config.task_id = random_id();
    }
    let workers = config.worker_count();
    config.workers = workers;
    if !config.huge_pages {
        disable_huge_pages();
    }
    // Once, here: every child gets the resolved name, so all of them run the same backend
    // (a listener on one and workers on the other would disagree about the sockets).
    let (backend, fell_back) = crate::ring::resolve(&config.io.backend)?;
    if let Some(why) = fell_back {
        log::warn!("io.backend = \"auto\": running on epoll, {why}");
    }
    config.io.backend = backend.name().to_string();
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGCHLD] {
        mask.add(s);
    }
    // Blocked here and, through inheritance, in every child: each reads them from a signalfd.
    mask.thread_block().map_err(|e| format!("sigprocmask: {e}"))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| format!("signalfd: {e}"))?;
    let addr = config.listen_addr()?;
    let activated = activated_socket()?;
    let was_activated = activated.is_some();
    let listen = match activated {
        Some(fd) => {
            log::info!(
                "using the listening socket passed by the service manager (socket activation)"
            );
            fd
        }
        None => bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?,
    };
    let local = local_addr(&listen).unwrap_or(addr);
    // Create and migrate the store here, once: workers opening a new file at the same time
    // would race for the lock that switching it to WAL takes. Then, alone with the directory,
    // replay what workers of an earlier run left in their write-ahead logs (a crash).
    let dir = &config.storage.path;
    let mut store =
        crate::sync::store::Store::open(dir).map_err(|e| format!("storage.path: {e}"))?;
    let storage_lock = wal::lock(dir, wal::Hold::Alone, START_TIMEOUT)
        .map_err(|e| format!("storage.path {}: {e}", dir.display()))?;
    crate::sync::store_thread::replay_logs(&mut store, dir, None)
        .map_err(|e| format!("storage.path: {e}"))?;
    drop(store);
    wal::relock(&storage_lock, wal::Hold::Shared, Duration::ZERO)
        .map_err(|e| format!("storage.path {}: {e}", dir.display()))?;
    let metrics_fd = Metrics::create().map_err(|e| format!("metrics memory: {e}"))?;
    let metrics = Metrics::map(&metrics_fd, 0).map_err(|e| format!("metrics memory: {e}"))?;
    let channels = (0..workers)
        .map(|_| handoff::pair().map_err(|e| format!("socketpair: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut sup = Supervisor {
        _storage_lock: storage_lock,
        sharing: false,
        draining: Vec::new(),
        worker_generation: 0,
        activated: was_activated,
        resolved: config.to_resolved(),
        config,
        path,
        generation: 0,
        listen,
        metrics_fd,
        metrics,
        channels,
        procs: generation(workers),
        checker: None,
        health_changed: false,
    };
    // Workers first, so the listener never hands a socket to a worker that is not there.
    for i in (1..sup.procs.len()).chain(std::iter::once(0)) {
        if let Err(e) = sup.spawn(i) {
            sup.kill_all(Signal::SIGKILL);
            return Err(e);
        }
    }
    if let Err(e) = sup.wait_ready() {
        sup.kill_all(Signal::SIGKILL);
        sup.reap_all(Instant::now() + Duration::from_secs(2));
        return Err(e);
    }
    sup.grant_logs(None);
    for w in sup.config.warnings() {
        log::warn!("{w}");
    }
    if let Err(e) = sup.reconfigure_health() {
        sup.kill_all(Signal::SIGKILL);
        sup.reap_all(Instant::now() + Duration::from_secs(2));
        return Err(e);
    }
    log::info!(
        "ready listen={local} workers={workers} backend={} task_id={} pid={}",
        sup.config.io.backend,
        sup.config.task_id,
        std::process::id()
    );
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("serving on {local} with {workers} workers")),
    ]);
    sup.serve(signals)
}

impl Supervisor {
    /// Starts process `i` with a fresh control channel.
    fn spawn(&mut self, i: usize) -> Result<(), String> {
        let role = self.procs[i].role;
        let (ours, theirs) = control::pair().map_err(|e| format!("socketpair: {e}"))?;
        let mut inherit: Vec<BorrowedFd<'_>> = vec![theirs.as_fd(), self.metrics_fd.as_fd()];
        let exe = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
        let mut cmd = Command::new(exe);
        match role {
            Role::Listener => {
                inherit.push(self.listen.as_fd());
                inherit.extend(self.channels.iter().map(|(l, _)| l.as_fd()));
                cmd.arg("__listener").arg("--workers").arg(self.channels.len().to_string());
            }
            Role::Worker(w) => {
                inherit.push(self.channels[w].1.as_fd());
                let slot = crate::metrics::worker_slot(self.worker_generation, w);
                cmd.arg("__worker").arg("--index").arg(w.to_string());
                cmd.arg("--slot").arg(slot.to_string());
            }
        }
        // Park the descriptors above the fixed numbers first, so the dup2 calls in the child
        // can never overwrite a source that is still to be moved.
        let first_free = fds::CONTROL + i32::try_from(inherit.len()).unwrap_or(i32::MAX);
        let parked: Vec<OwnedFd> = inherit
            .iter()
            .map(|fd| park(*fd, first_free))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("dup: {e}"))?;
        let raw: Vec<RawFd> = parked.iter().map(AsRawFd::as_raw_fd).collect();
        let parent = std::process::id() as i32;
        cmd.env(RESOLVED_ENV, &self.resolved)
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null());
        // SAFETY: between fork and exec only async-signal-safe calls (prctl, getppid, dup2).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The supervisor may have died between fork and prctl.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                for (target, &src) in (fds::CONTROL..).zip(raw.iter()) {
                    if libc::dup2(src, target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("cannot start {role}: {e}"))?;
        drop(parked);
        drop(theirs);
        let p = &mut self.procs[i];
        p.child = Some(child);
        p.control = Some(ours);
        p.ready = false;
        p.started = Instant::now();
        p.respawn_at = None;
        Ok(())
    }

    /// Waits until every child said `Ready`; a child that exits first fails startup.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.procs.iter().all(|p| p.ready) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let names: Vec<String> =
                    self.procs.iter().filter(|p| !p.ready).map(|p| p.role.to_string()).collect();
                return Err(format!("not ready after {START_TIMEOUT:?}: {}", names.join(", ")));
            }
            for (i, m) in self.poll_controls(None, left)? {
                match m {
                    Ok(Message::Ready) => self.procs[i].ready = true,
                    Err(control::RecvError::Closed) => {
                        return Err(format!(
                            "{} failed to start (see its log line above)",
                            self.procs[i].role
                        ));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` for control messages (and, with `signals`, for a signal); returns
    /// the messages that arrived, by process index.
    fn poll_controls(
        &mut self,
        signals: Option<&SignalFd>,
        timeout: Duration,
    ) -> Result<Vec<(usize, Received)>, String> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let owners: Vec<usize> =
            (0..self.procs.len()).filter(|&i| self.procs[i].control.is_some()).collect();
        let mut pfds: Vec<PollFd<'_>> = owners
            .iter()
            .map(|&i| {
                PollFd::new(
                    self.procs[i].control.as_ref().expect("control").as_fd(),
                    PollFlags::POLLIN,
                )
            })
            .collect();
        let checker_at = pfds.len();
        if let Some(c) = &self.checker {
            pfds.push(PollFd::new(c.fd(), PollFlags::POLLIN));
        }
        if let Some(s) = signals {
            pfds.push(PollFd::new(s.as_fd(), PollFlags::POLLIN));
        }
        let ms = timeout.as_millis().min(60_000) as u16;
        match poll(&mut pfds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        let readable: Vec<usize> = owners
            .iter()
            .zip(&pfds)
            .filter(|(_, p)| p.revents().is_some_and(|r| !r.is_empty()))
            .map(|(&i, _)| i)
            .collect();
        let woken =
            self.checker.is_some() && pfds[checker_at].revents().is_some_and(|r| !r.is_empty());
        drop(pfds);
        if woken {
            if let Some(c) = &self.checker {
                c.take_change();
            }
            self.health_changed = true;
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64];
        for i in readable {
            loop {
                let fd = self.procs[i].control.as_ref().expect("control");
                match control::recv_message(fd, &mut buf) {
                    Err(control::RecvError::WouldBlock) => break,
                    Err(control::RecvError::Closed) => {
                        // The child is gone; its exit is reaped separately.
                        self.procs[i].control = None;
                        out.push((i, Err(control::RecvError::Closed)));
                        break;
                    }
                    m => out.push((i, m)),
                }
            }
        }
        Ok(out)
    }

    /// A reload that needs new sockets or another worker count: a new listener and new
    /// workers take over new connections; the old workers keep theirs for the drain timeout
    /// and then close them with 1012. Client groups are never split for new connections: the
    /// new listener routes every socket by the new worker count alone.
    fn replace(&mut self, next: &Config) -> Result<(), String> {
        let new_listen = if next.listen != self.config.listen {
            if self.activated {
                return Err("listen cannot change under socket activation".into());
            }
            let addr = next.listen_addr()?;
            Some(bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?)
        } else {
            None
        };
        let channels = (0..next.workers)
            .map(|_| handoff::pair().map_err(|e| format!("socketpair: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        // The new workers will load groups the old ones hold: whatever the old ones
        // acknowledged must be in SQLite first.
        if let Err(e) = self.share_groups() {
            self.sharing = false;
            self.grant_logs(None);
            return Err(e);
        }
        let old_procs = std::mem::replace(&mut self.procs, generation(next.workers));
        let old_channels = std::mem::replace(&mut self.channels, channels);
        let old_listen = new_listen.map(|l| std::mem::replace(&mut self.listen, l));
        let old_resolved = std::mem::replace(&mut self.resolved, next.to_resolved());
        self.worker_generation += 1;
        let started = (1..self.procs.len())
            .chain(std::iter::once(0))
            .try_for_each(|i| self.spawn(i))
            .and_then(|()| self.wait_ready());
        if let Err(e) = started {
            // Back to the running generation, untouched.
            self.kill_all_current(Signal::SIGKILL);
            self.reap_all(Instant::now() + Duration::from_secs(2));
            self.procs = old_procs;
            self.channels = old_channels;
            if let Some(l) = old_listen {
                self.listen = l;
            }
            self.resolved = old_resolved;
            self.worker_generation -= 1;
            self.sharing = false;
            self.grant_logs(None);
            return Err(format!("the new processes did not start: {e}"));
        }
        self.sharing = false;
        for p in &old_procs {
            match (p.role, &p.child, &p.control) {
                // Once it confirms, every new socket reaches the new listener.
                (Role::Listener, Some(_), Some(control))
                    if control::send_message(control.as_fd(), &Message::Stop).is_ok()
                        && !wait_for(control, &Message::Stopped, RELOAD_TIMEOUT) =>
                {
                    log::warn!("reload: the previous listener did not confirm it stopped");
                }
                (Role::Worker(_), Some(_), Some(control)) => {
                    let _ = control::send_message(control.as_fd(), &Message::Drain);
                }
                _ => {}
            }
        }
        self.draining.extend(old_procs.into_iter().filter(|p| p.child.is_some()));
        Ok(())
    }

    /// Before a graceful replacement: every worker of the running generation folds its
    /// write-ahead log into SQLite and writes through from then on (`Share`, answered with
    /// `Shared`), so that a new worker loading one of their groups sees every acknowledged
    /// change, and the store's version check settles who holds a group while both
    /// generations run. A worker that died (waiting for its respawn, which will not come:
    /// the generation is being replaced) has its log replayed here. The workers are told to
    /// use their logs again once one generation is left ([`Supervisor::grant_logs`]).
    fn share_groups(&mut self) -> Result<(), String> {
        self.sharing = true;
        let dir = self.config.storage.path.clone();
        let mut waiting = Vec::new();
        for i in 0..self.procs.len() {
            let Role::Worker(w) = self.procs[i].role else { continue };
            match (&self.procs[i].child, &self.procs[i].control) {
                (Some(_), Some(control))
                    if control::send_message(control.as_fd(), &Message::Share).is_ok() =>
                {
                    waiting.push(i);
                }
                _ => {
                    let slot = crate::metrics::worker_slot(self.worker_generation, w);
                    let mut store = crate::sync::store::Store::open(&dir)
                        .map_err(|e| format!("storage.path: {e}"))?;
                    crate::sync::store_thread::replay_logs(&mut store, &dir, Some(slot))
                        .map_err(|e| format!("storage.path: {e}"))?;
                }
            }
        }
        let deadline = Instant::now() + RELOAD_TIMEOUT;
        while !waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let names: Vec<String> =
                    waiting.iter().map(|&i| self.procs[i].role.to_string()).collect();
                return Err(format!(
                    "{} did not fold its write-ahead log in within {RELOAD_TIMEOUT:?}",
                    names.join(", ")
                ));
            }
            for (i, m) in self.poll_controls(None, left)? {
                match m {
                    Ok(Message::Shared) => waiting.retain(|&w| w != i),
                    Ok(Message::Ready) => self.mark_ready(i),
                    Err(control::RecvError::Closed) if waiting.contains(&i) => {
                        return Err(format!("{} exited while sharing", self.procs[i].role));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Tells the ready workers of the running generation (or worker `only`) to commit to
    /// their write-ahead logs: only when no other generation runs or is about to, since the
    /// log is only folded into SQLite later, where another process would not see it.
    fn grant_logs(&self, only: Option<usize>) {
        if self.sharing || !self.draining.is_empty() {
            return;
        }
        for (i, p) in self.procs.iter().enumerate() {
            if only.is_some_and(|o| o != i) || !p.ready {
                continue;
            }
            if let (Role::Worker(_), Some(control)) = (p.role, &p.control) {
                let _ = control::send_message(control.as_fd(), &Message::Own);
            }
        }
    }

    /// SIGHUP: validate the file, then apply it in every process, then say READY again.
    fn reload(&mut self) {
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::Reloading,
            sd_notify::NotifyState::monotonic_usec_now()
                .unwrap_or(sd_notify::NotifyState::MonotonicUsec(0)),
        ]);
        let path =
            self.path.as_deref().map_or("(no file)".to_string(), |p| p.display().to_string());
        let mut next = match Config::load(self.path.as_deref()) {
            Ok(next) => next,
            Err(e) => {
                self.metrics.add_to(0, Metric::ReloadFailures, 1);
                log::error!("reload refused: {e}; the running configuration stays");
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                return;
            }
        };
        // The routing prefix must not change under live client groups.
        if next.task_id.is_empty() {
            next.task_id = self.config.task_id.clone();
        }
        next.workers = next.worker_count();
        if next.task_id != self.config.task_id {
            log::warn!(
                "reload: task_id cannot change under live client groups; kept the running value"
            );
            next.task_id = self.config.task_id.clone();
        }
        if next.huge_pages != self.config.huge_pages {
            log::warn!("reload: huge_pages applies at start; kept the running value (restart to change it)");
            next.huge_pages = self.config.huge_pages;
        }
        if next.io.backend != "auto" && next.io.backend != self.config.io.backend {
            log::warn!("reload: io.backend applies at start; kept the running value (restart to change it)");
        }
        next.io.backend = self.config.io.backend.clone();
        if next.storage.path != self.config.storage.path {
            log::warn!("reload: storage.path cannot change while groups are open; kept the running value (restart to move it)");
            next.storage.path = self.config.storage.path.clone();
        }
        if next.listen != self.config.listen || next.workers != self.config.workers {
            if let Err(e) = self.replace(&next) {
                self.metrics.add_to(0, Metric::ReloadFailures, 1);
                log::error!("reload refused: {e}; the running configuration stays");
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                return;
            }
            self.config = next;
            self.reload_health();
            self.metrics.add_to(0, Metric::Reloads, 1);
            log::set_max_level(self.config.level());
            log::info!(
                "reloaded configuration from {path} by graceful replacement: listen={} workers={}",
                self.config.listen,
                self.config.workers
            );
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            return;
        }
        self.generation += 1;
        let generation = self.generation;
        self.resolved = next.to_resolved();
        log::set_max_level(next.level());
        self.config = next;
        let message = Message::Config { generation, resolved: self.resolved.clone() };
        let mut waiting = Vec::new();
        for (i, p) in self.procs.iter().enumerate() {
            if let (Some(fd), true) = (&p.control, p.ready) {
                if control::send_message(fd.as_fd(), &message).is_ok() {
                    waiting.push(i);
                }
            }
        }
        let deadline = Instant::now() + RELOAD_TIMEOUT;
        while !waiting.is_empty() && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(messages) = self.poll_controls(None, left) else { break };
            for (i, m) in messages {
                match m {
                    Ok(Message::Applied(g)) if g == generation => waiting.retain(|&w| w != i),
                    Ok(Message::Ready) => self.mark_ready(i),
                    Err(control::RecvError::Closed) => waiting.retain(|&w| w != i),
                    _ => {}
                }
            }
        }
        if !waiting.is_empty() {
            let names: Vec<String> =
                waiting.iter().map(|&i| self.procs[i].role.to_string()).collect();
            log::warn!("reload: no confirmation from {} in time", names.join(", "));
        }
        self.reload_health();
        self.metrics.add_to(0, Metric::Reloads, 1);
        log::info!("reloaded configuration from {path} generation={generation}");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    }

    /// A child said `Ready`: a worker learns which upstreams are down now (it starts with
    /// every one up).
    fn mark_ready(&mut self, i: usize) {
        self.procs[i].ready = true;
        self.grant_logs(Some(i));
        if let Some(c) = &self.checker {
            let down = c.down();
            if !down.is_empty() {
                self.send_health(i, &down);
            }
        }
    }

    /// Starts, retargets or stops the health checks for the current configuration, then
    /// publishes the states (`/metrics`, the workers).
    fn reconfigure_health(&mut self) -> Result<(), String> {
        let upstream = &self.config.upstream;
        match &self.checker {
            Some(c) if !upstream.urls.is_empty() && upstream.health_interval_ms > 0 => {
                c.retarget(upstream)?
            }
            _ => self.checker = Checker::start(upstream)?,
        }
        self.publish_health();
        Ok(())
    }

    /// [`Supervisor::reconfigure_health`] after a reload, which validated the list already;
    /// the new configuration's warnings are logged here too.
    fn reload_health(&mut self) {
        for w in self.config.warnings() {
            log::warn!("{w}");
        }
        if let Err(e) = self.reconfigure_health() {
            log::error!("reload: upstream health checks: {e}");
        }
    }

    /// Writes every upstream's state into `/metrics` (1 up, 0 down; all up without checks)
    /// and tells every ready worker which are down.
    fn publish_health(&mut self) {
        let states: Vec<(String, bool)> = match &self.checker {
            Some(c) => c.states(),
            None => self.config.upstream.urls.iter().map(|u| (u.clone(), true)).collect(),
        };
        for (i, (_, up)) in states.iter().enumerate() {
            self.metrics.set_upstream_up(i, *up);
        }
        if self.config.upstream.urls.is_empty() {
            return;
        }
        let down: Vec<String> =
            states.into_iter().filter(|(_, up)| !up).map(|(url, _)| url).collect();
        for i in 0..self.procs.len() {
            if self.procs[i].ready {
                self.send_health(i, &down);
            }
        }
    }

    fn send_health(&self, i: usize, down: &[String]) {
        let p = &self.procs[i];
        if let (Role::Worker(_), Some(fd)) = (p.role, &p.control) {
            let _ = control::send_message(fd.as_fd(), &Message::Health { down: down.to_vec() });
        }
    }

    fn serve(mut self, signals: SignalFd) -> Result<(), String> {
        let mut stop_deadline: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let next_respawn = self.procs.iter().filter_map(|p| p.respawn_at).min();
            let wake = [next_respawn, stop_deadline].into_iter().flatten().min();
            let timeout =
                wake.map_or(Duration::from_secs(60), |at| at.saturating_duration_since(now));
            // Control messages here are the `Ready` of respawned children.
            for (i, m) in self.poll_controls(Some(&signals), timeout)? {
                if let Ok(Message::Ready) = m {
                    self.mark_ready(i);
                }
            }
            if std::mem::take(&mut self.health_changed) {
                self.publish_health();
            }
            while let Ok(Some(info)) = signals.read_signal() {
                match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGTERM | Signal::SIGINT) if stop_deadline.is_none() => {
                        log::info!(
                            "shutting down: closing connections (drain timeout {} ms)",
                            self.config.drain_timeout_ms
                        );
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                        stop_deadline = Some(
                            Instant::now()
                                + Duration::from_millis(self.config.drain_timeout_ms + 1000),
                        );
                        self.kill_all(Signal::SIGTERM);
                    }
                    Ok(Signal::SIGTERM | Signal::SIGINT) => {
                        log::warn!("second stop signal: exiting now");
                        self.kill_all(Signal::SIGKILL);
                        self.reap_everything(Instant::now() + Duration::from_secs(2));
                        return Ok(());
                    }
                    Ok(Signal::SIGHUP) if stop_deadline.is_none() => self.reload(),
                    _ => {}
                }
            }
            self.reap(stop_deadline.is_none());
            if let Some(deadline) = stop_deadline {
                if self.procs.iter().all(|p| p.child.is_none()) && self.draining.is_empty() {
                    log::info!("stopped");
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    log::warn!("drain timeout: killing what is left");
                    self.kill_all(Signal::SIGKILL);
                    self.reap_everything(Instant::now() + Duration::from_secs(2));
                    return Ok(());
                }
                continue;
            }
            let now = Instant::now();
            for i in 0..self.procs.len() {
                if self.procs[i].respawn_at.is_some_and(|at| now >= at) {
                    match self.spawn(i) {
                        Ok(()) => {
                            // Under the series of the process that died, so an operator sees
                            // which one keeps dying (slot 0 is the listener's).
                            let slot = match self.procs[i].role {
                                Role::Listener => 0,
                                Role::Worker(w) => {
                                    crate::metrics::worker_slot(self.worker_generation, w)
                                }
                            };
                            self.metrics.add_to(slot, Metric::WorkerRestarts, 1);
                            log::info!("{} respawned", self.procs[i].role);
                        }
                        Err(e) => {
                            log::error!("{e}");
                            let p = &mut self.procs[i];
                            p.backoff = (p.backoff * 2).min(RESPAWN_MAX);
                            p.respawn_at = Some(now + p.backoff);
                        }
                    }
                }
            }
        }
    }

    /// Collects exited children; schedules their respawn unless stopping. Drained processes
    /// of an earlier generation are only forgotten.
    fn reap(&mut self, respawn: bool) {
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => status,
            };
            let Some(pid) = status.pid() else { return };
            let is = |p: &Process| p.child.as_ref().is_some_and(|c| c.id() as i32 == pid.as_raw());
            if let Some(k) = self.draining.iter().position(is) {
                let p = self.draining.swap_remove(k);
                log::info!("{} of the previous generation exited ({status:?})", p.role);
                self.grant_logs(None);
                continue;
            }
            let Some(p) = self.procs.iter_mut().find(|p| is(p)) else { continue };
            p.child = None;
            p.control = None;
            p.ready = false;
            if !respawn {
                log::info!("{} exited ({status:?})", p.role);
                continue;
            }
            if p.started.elapsed() >= HEALTHY_UPTIME {
                p.backoff = RESPAWN_MIN;
            }
            let delay = p.backoff;
            p.backoff = (p.backoff * 2).min(RESPAWN_MAX);
            p.respawn_at = Some(Instant::now() + delay);
            log::error!("{} died ({status:?}); respawning in {} ms", p.role, delay.as_millis());
        }
    }

    /// Signals every child, draining ones included.
    fn kill_all(&self, signal: Signal) {
        self.kill_all_current(signal);
        signal_all(&self.draining, signal);
    }

    fn kill_all_current(&self, signal: Signal) {
        signal_all(&self.procs, signal);
    }

    /// Waits (bounded) for the current generation to exit after a kill.
    fn reap_all(&mut self, deadline: Instant) {
        reap_list(&mut self.procs, deadline);
    }

    fn reap_everything(&mut self, deadline: Instant) {
        reap_list(&mut self.procs, deadline);
        reap_list(&mut self.draining, deadline);
    }
}

fn signal_all(procs: &[Process], signal: Signal) {
    for child in procs.iter().filter_map(|p| p.child.as_ref()) {
        let _ = kill(Pid::from_raw(child.id() as i32), signal);
    }
}

/// Waits until every process of `procs` exited, or `deadline`.
fn reap_list(procs: &mut [Process], deadline: Instant) {
    for p in procs {
        if let Some(mut child) = p.child.take() {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                // Bounded wait for a process we just SIGKILLed: it has nothing to report on.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Waits up to `timeout` for `want` on one control channel (other messages are dropped).
fn wait_for(control: &OwnedFd, want: &Message, timeout: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 64];
    loop {
        match control::recv_message(control, &mut buf) {
            Ok(m) if m == *want => return true,
            Ok(_) | Err(control::RecvError::Malformed) => continue,
            Err(control::RecvError::WouldBlock) => {}
            Err(_) => return false,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut pfd = [PollFd::new(control.as_fd(), PollFlags::POLLIN)];
        let ms = left.as_millis().min(u16::MAX as u128) as u16;
        if let Err(e) = poll(&mut pfd, PollTimeout::from(ms)) {
            if e != nix::Error::EINTR {
                return false;
            }
        }
    }
}

/// Turns transparent huge pages off for this process and, by inheritance across fork and
/// exec, for every child it starts (`huge_pages = false`). The allocator still asks for
/// them; the kernel then ignores it.
fn disable_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and changes only this process's flag.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        log::warn!(
            "huge_pages = false: cannot turn transparent huge pages off: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The listening socket systemd passed (socket activation), if any. `listen` is then only
/// a default: the unit's `ListenStream=` decides the address.
fn activated_socket() -> Result<Option<OwnedFd>, String> {
    let fds: Vec<RawFd> =
        sd_notify::listen_fds().map_err(|e| format!("socket activation: {e}"))?.collect();
    match fds.as_slice() {
        [] => Ok(None),
        [fd] => {
            // SAFETY: systemd passed this descriptor to us (LISTEN_PID is our pid).
            let fd = unsafe { OwnedFd::from_raw_fd(*fd) };
            let listening =
                nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::AcceptConn)
                    .map_err(|e| format!("socket activation: descriptor 3: {e}"))?;
            if !listening {
                return Err("socket activation: descriptor 3 is not a listening socket".into());
            }
            Ok(Some(fd))
        }
        many => Err(format!(
            "socket activation passed {} sockets; syncgate takes exactly one (one ListenStream=)",
            many.len()
        )),
    }
}

/// A dual-stack TCP listening socket for `addr` (IPv4 too when `addr` is `[::]`).
fn bind(addr: std::net::SocketAddr) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
    let family = if addr.is_ipv6() { AddressFamily::Inet6 } else { AddressFamily::Inet };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
    }
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    socket::listen(&fd, socket::Backlog::new(BACKLOG).unwrap_or(socket::Backlog::MAXCONN))?;
    Ok(fd)
}

fn local_addr(fd: &OwnedFd) -> Option<std::net::SocketAddr> {
    let addr: nix::sys::socket::SockaddrStorage =
        nix::sys::socket::getsockname(fd.as_raw_fd()).ok()?;
    super::socket_addr(&addr)
}

/// A close-on-exec copy of `fd` numbered `above` or higher: past every fixed child descriptor
/// (a listener of many workers inherits one per worker), and as low as that allows, so a
/// small descriptor limit still has room.
fn park(fd: BorrowedFd<'_>, above: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor that we then own.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, above) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just created, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// A per-start routing prefix when none is configured.
fn random_id() -> String {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let t =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        b = (t.as_nanos() as u64 ^ std::process::id() as u64).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Child side: the descriptor at `n`, owned.
///
/// # Safety
/// Only for the fixed numbers of [`fds`], which the supervisor set up for this process.
pub unsafe fn inherited(n: i32) -> OwnedFd {
    OwnedFd::from_raw_fd(n)
}

/// Child side: tells the supervisor this process is up.
pub fn report_ready(control: &OwnedFd) {
    let _ = control::send_message(control.as_fd(), &Message::Ready);
}
