//! The listener process: accepts every socket, reads its request head under a deadline and a
//! size cap, answers plain HTTP itself (health, metrics, errors) and hands each WebSocket
//! upgrade to the worker that owns its client group.
//!
//! It owns one io_uring ring: a multishot accept on the listening socket, one receive or send
//! in flight per pending socket, and a tick that enforces deadlines. A socket leaves the
//! listener as soon as it is handed off; the listener keeps nothing per WebSocket connection.

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::gate::limits::{self, WindowLimiter};
use crate::gate::proxies::TrustedProxies;
use crate::metrics::{Metric, Metrics};
use crate::process::control::Order;
use crate::process::event_loop::{self, Process};
use crate::process::handoff;
use crate::protocol::route;
use crate::protocol::{self, ErrorKind};
use crate::ring::{Completion, Op, Ring};
use crate::slab::Slab;
use crate::ws::handshake::{self, Head, HeadError, UpgradeError};
use crate::ws::{close, frame};

/// First read buffer per socket: a browser's upgrade without a Zero header fits; the Zero
/// client's 8 KiB header grows it once.
const INITIAL_HEAD_BUFFER: usize = 2048;

/// How long accepting pauses (until the first tick this much later) after the kernel ran out
/// of something a new socket needs: descriptors (EMFILE, ENFILE) or memory (ENOBUFS, ENOMEM).
/// Re-armed at once, the accept failed again at once for the same waiting connection: the
/// io_uring listener spun on its core and logged about 300,000 lines a second. Meanwhile the
/// pending sockets' deadlines free descriptors, and connections wait in the backlog.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// The least time between two log lines about failing accepts: a line per pause could still
/// be ten a second for as long as the shortage lasts.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// The 503's reason when the listener holds as many sockets as it may, by its configured cap
/// or by its descriptors.
const FULL: &str = "too many requests in progress";

/// Where a pending socket is in its short life.
enum Stage {
    /// Waiting for the rest of the request head.
    Head,
    /// Writing an answer; the listener closes the socket when it is out.
    Answer { out: Vec<u8>, sent: usize },
    /// Answer written and our side shut: read until the client closes, so closing does not
    /// reset the connection and destroy the answer before the client read it.
    Linger,
}

struct Pending {
    fd: OwnedFd,
    peer: SocketAddr,
    /// The peer's limiter key, for the per-address handshake count.
    peer_key: [u8; 16],
    /// Bytes read so far; capacity grows up to the head cap.
    buf: Vec<u8>,
    /// When the current stage's deadline passes (head timeout, or linger timeout).
    deadline: Instant,
    stage: Stage,
    /// Set when the tick shut the socket down; the in-flight operation then finishes it.
    expired: bool,
}

pub struct Listener {
    ring: Ring,
    config: Config,
    /// `config.connection_cap()`, kept: deriving it reads RLIMIT_NOFILE, a system call per
    /// upgrade otherwise.
    connection_cap: usize,
    /// Sockets the listener may hold at once (waiting for a head, or lingering after an
    /// answer), from its descriptor limit, as a worker's connections are: one more is
    /// refused at once ([`refuse_at_once`]) instead of the listener running out of
    /// descriptors.
    socket_cap: usize,
    listen: OwnedFd,
    /// One handoff channel per worker, indexed by worker number.
    channels: Vec<OwnedFd>,
    metrics: Metrics,
    /// The workers' slots in the metrics table, for the connection cap's sum: read again
    /// every tick (a worker of a graceful replacement counts within one), and per upgrade
    /// while it holds fewer slots than there are workers (the listener starts while the
    /// workers are still mapping theirs), instead of scanning the whole table per upgrade.
    worker_slots: Vec<usize>,
    task_id: String,
    /// Sockets between accept and handoff (or answer).
    pending: Slab<Pending>,
    /// Set on SIGTERM: stop accepting, finish what is pending, exit.
    stopping: bool,
    /// The cancelled accept's last completion came (and `Stopped` went to the supervisor):
    /// exiting before it would leave a graceful replacement waiting for that confirmation.
    accept_ended: bool,
    /// An accept is armed (its last completion, without `more`, has not come).
    accept_armed: bool,
    /// Accepting is paused until this tick ([`ACCEPT_PAUSE`]).
    accept_paused: Option<Instant>,
    /// Accepts that failed for want of descriptors or memory since the last line about them,
    /// and when that line was written: at most one every [`ACCEPT_LOG_EVERY`].
    accept_failures: u64,
    accept_logged: Option<Instant>,
    /// Sockets in `pending` per peer address (the slow-loris bound).
    pending_per_ip: std::collections::HashMap<[u8; 16], usize>,
    /// Upgrade attempts per client address (docs/SECURITY.md, "No connection rate limiting"),
    /// checked before any handoff or JWT.
    ip_limiter: WindowLimiter,
    /// Upgrade attempts per clientID and address, so one client cannot storm a worker and
    /// nobody elsewhere can lock a known clientID out.
    client_limiter: WindowLimiter,
    proxies: TrustedProxies,
    signalfd: nix::sys::signalfd::SignalFd,
    /// The control channel from the supervisor (ready, reloads).
    control: OwnedFd,
}

impl Listener {
    pub fn new(
        config: Config,
        listen: OwnedFd,
        channels: Vec<OwnedFd>,
        metrics: Metrics,
        task_id: String,
        signalfd: nix::sys::signalfd::SignalFd,
        control: OwnedFd,
    ) -> Result<Listener, String> {
        let l = &config.limits;
        let window = Duration::from_millis(l.connect_window_ms);
        let ip_limiter = WindowLimiter::new(l.connect_per_ip, window, l.limiter_capacity);
        let client_window = Duration::from_millis(l.connect_per_client_window_ms);
        let client_limiter =
            WindowLimiter::new(l.connect_per_client, client_window, l.limiter_capacity);
        let proxies = TrustedProxies::parse(&l.trusted_proxies)?;
        // Once, here: every accepted socket inherits it on Linux, and the worker that gets a
        // socket gets this same open file (SCM_RIGHTS), so frames go out unbatched without a
        // setsockopt per connection. Only a TCP socket takes it (socket activation could
        // pass another kind, which has no Nagle delay anyway).
        if let Err(e) =
            nix::sys::socket::setsockopt(&listen, nix::sys::socket::sockopt::TcpNoDelay, &true)
        {
            log::warn!("TCP_NODELAY on the listening socket: {e}");
        }
        Ok(Listener {
            pending_per_ip: std::collections::HashMap::new(),
            ip_limiter,
            client_limiter,
            proxies,
            ring: Ring::new(config.io_backend()).map_err(|e| e.to_string())?,
            connection_cap: config.connection_cap(),
            socket_cap: crate::config::worker_connection_cap(),
            config,
            listen,
            channels,
            worker_slots: Vec::new(),
            metrics,
            task_id,
            pending: Slab::default(),
            stopping: false,
            accept_ended: false,
            accept_armed: false,
            accept_paused: None,
            accept_failures: 0,
            accept_logged: None,
            signalfd,
            control,
        })
    }

    pub fn run(mut self) -> Result<(), String> {
        self.arm_accept();
        event_loop::run(&mut self)
    }

    fn arm_accept(&mut self) {
        self.ring.accept_multi(&self.listen, Op::Accept.token(0));
        self.accept_armed = true;
    }

    /// Stops accepting (SIGTERM, or a new listener took over); pending sockets are still
    /// served, then the loop ends.
    fn stop(&mut self) {
        if !self.stopping {
            log::info!("listener: stop requested, no longer accepting");
            self.stopping = true;
            self.accept_paused = None;
            // Closing the listening socket would race the supervisor's copy; stop our accept.
            match self.accept_armed {
                true => self.ring.cancel(&self.listen, Op::Accept.token(0)),
                // Paused: there is no accept to wait for.
                false => self.accepting_ended(),
            }
        }
    }

    /// Says the listener accepts no more: from here on the new listener gets every socket.
    fn accepting_ended(&mut self) {
        if !self.accept_ended {
            self.accept_ended = true;
            let _ = crate::process::control::send_message(
                self.control.as_fd(),
                &crate::process::control::Message::Stopped,
            );
        }
    }

    fn on_accept(&mut self, cqe: &Completion, now: Instant) {
        let fd = cqe.result();
        if !cqe.more() {
            self.accept_armed = false;
            if self.stopping {
                self.accepting_ended();
            }
        }
        if fd < 0 && fd != -libc::ECANCELED {
            let error = std::io::Error::from_raw_os_error(-fd);
            if matches!(-fd, libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) {
                self.pause_accepting(error, now);
            } else {
                log::warn!("accept failed: {error}");
            }
        }
        // The kernel ends a multishot accept on some errors; re-arm it, unless paused.
        if !self.accept_armed && !self.stopping && self.accept_paused.is_none() {
            self.arm_accept();
        }
        if fd < 0 {
            return;
        }
        // SAFETY: the kernel gave us this new descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        self.metrics.inc(Metric::Accepted);
        if self.pending.len() >= self.socket_cap {
            self.metrics.inc(Metric::Overloaded);
            return refuse_at_once(fd);
        }
        // Served even while stopping: it was accepted before the accept was cancelled, and
        // dropping it would reset a client that did nothing wrong.
        let peer = peer_addr(fd.as_raw_fd());
        let peer_key = limits::ip_key(peer.ip());
        let head_timeout = Duration::from_millis(self.config.limits.head_timeout_ms);
        let overload = self.overloaded(&peer_key);
        let index = self.insert(Pending {
            fd,
            peer,
            peer_key,
            buf: Vec::with_capacity(INITIAL_HEAD_BUFFER),
            deadline: now + head_timeout,
            stage: Stage::Head,
            expired: false,
        });
        if let Some(why) = overload {
            // Answered without reading: the request is never parsed, nothing reaches a worker.
            self.metrics.inc(Metric::Overloaded);
            log::debug!("peer={peer} refused: {why}");
            let out = handshake::http_error(503, &[("Retry-After", "1")], why);
            return self.answer(index, out, now);
        }
        self.arm_recv(index);
    }

    /// Out of descriptors or memory for new sockets: accepting pauses until a tick
    /// [`ACCEPT_PAUSE`] later (the armed accept is cancelled), with a log line at most every
    /// [`ACCEPT_LOG_EVERY`].
    fn pause_accepting(&mut self, error: std::io::Error, now: Instant) {
        self.accept_failures += 1;
        if self.accept_logged.is_none_or(|at| now.duration_since(at) >= ACCEPT_LOG_EVERY) {
            log::warn!(
                "accept failed: {error} ({} times since the last such line); accepting pauses \
                 {} ms at a time while it fails; {} sockets are held",
                self.accept_failures,
                ACCEPT_PAUSE.as_millis(),
                self.pending.len()
            );
            self.accept_failures = 0;
            self.accept_logged = Some(now);
        }
        self.accept_paused = Some(now + ACCEPT_PAUSE);
        if self.accept_armed {
            self.ring.cancel(&self.listen, Op::Accept.token(0));
        }
    }

    /// Whether a new socket must be turned away before its request is read (health checks
    /// and metrics included: these caps bound the listener's own memory).
    fn overloaded(&self, peer_key: &[u8; 16]) -> Option<&'static str> {
        let l = &self.config.limits;
        if self.pending.len() >= l.max_handshakes {
            return Some(FULL);
        }
        if self.pending_per_ip.get(peer_key).copied().unwrap_or(0) >= l.max_handshakes_per_ip {
            return Some("too many requests in progress from this address");
        }
        None
    }

    /// A reloaded configuration: limits, timeouts and the log level, from the next event on.
    fn apply(&mut self, config: Config) {
        let l = &config.limits;
        self.ip_limiter.set_limits(l.connect_per_ip, Duration::from_millis(l.connect_window_ms));
        self.client_limiter.set_limits(
            l.connect_per_client,
            Duration::from_millis(l.connect_per_client_window_ms),
        );
        match TrustedProxies::parse(&l.trusted_proxies) {
            Ok(p) => self.proxies = p,
            Err(e) => log::error!("reload kept the old trusted proxies: {e}"),
        }
        log::set_max_level(config.level());
        self.connection_cap = config.connection_cap();
        self.config = config;
    }

    fn insert(&mut self, p: Pending) -> u32 {
        *self.pending_per_ip.entry(p.peer_key).or_insert(0) += 1;
        self.pending.insert(p)
    }

    /// Forgets a pending socket; the caller closes it, by dropping it or otherwise.
    fn remove(&mut self, index: u32) -> Option<Pending> {
        let p = self.pending.remove(index)?;
        if let Some(n) = self.pending_per_ip.get_mut(&p.peer_key) {
            *n -= 1;
            if *n == 0 {
                self.pending_per_ip.remove(&p.peer_key);
            }
        }
        Some(p)
    }

    fn arm_recv(&mut self, index: u32) {
        let p = self.pending.get_mut(index).expect("pending");
        if p.buf.len() == p.buf.capacity() {
            let cap = (p.buf.capacity() * 4).min(self.config.limits.max_head_bytes);
            p.buf.reserve_exact(cap - p.buf.len());
        }
        let spare = p.buf.spare_capacity_mut();
        let (buf, len) = (spare.as_mut_ptr() as *mut u8, spare.len());
        // SAFETY: the spare capacity of the socket's head buffer, which is neither grown nor
        // dropped while the receive is in flight (its stage says so), and the pending socket,
        // descriptor included, is freed only after its completion.
        unsafe { self.ring.recv(p.fd.as_raw_fd(), buf, len, Op::Recv.token(index)) };
    }

    fn on_recv(&mut self, index: u32, res: i32, now: Instant) {
        let Some(p) = self.pending.get_mut(index) else {
            return;
        };
        if matches!(p.stage, Stage::Linger) {
            if res > 0 && !p.expired {
                p.buf.clear();
                self.arm_recv(index);
            } else {
                self.remove(index);
            }
            return;
        }
        if res <= 0 || p.expired {
            if p.expired && res >= 0 {
                self.metrics.inc(Metric::BadHeads);
                log::debug!("peer={} request head timed out", p.peer);
            }
            self.remove(index);
            return;
        }
        let before = p.buf.len();
        // SAFETY: the kernel wrote `res` bytes into the spare capacity.
        unsafe { p.buf.set_len(before + res as usize) };
        match handshake::head_end(&p.buf, before) {
            Some(end) => self.on_head(index, end, now),
            None if p.buf.len() >= self.config.limits.max_head_bytes => {
                self.metrics.inc(Metric::BadHeads);
                let msg =
                    format!("request head larger than {} bytes", self.config.limits.max_head_bytes);
                self.answer(index, handshake::http_error(431, &[], &msg), now);
            }
            None => self.arm_recv(index),
        }
    }

    fn on_head(&mut self, index: u32, end: usize, now: Instant) {
        let p = self.pending.get(index).expect("pending");
        let head = match handshake::parse_head(&p.buf[..end], self.config.limits.max_headers) {
            Ok(head) => head,
            Err(HeadError::TooManyHeaders) => {
                self.metrics.inc(Metric::BadHeads);
                let msg = format!("more than {} header lines", self.config.limits.max_headers);
                return self.answer(index, handshake::http_error(431, &[], &msg), now);
            }
            Err(HeadError::Malformed) => {
                self.metrics.inc(Metric::BadHeads);
                return self.answer(
                    index,
                    handshake::http_error(400, &[], "malformed HTTP request"),
                    now,
                );
            }
        };
        if !head.upgrade {
            self.metrics.inc(Metric::HttpRequests);
            let out = self.plain_http(&head);
            return self.answer(index, out, now);
        }
        // The per-address limit comes before anything else an upgrade costs.
        let client_ip = self.proxies.client_ip(p.peer.ip(), head.forwarded_for.as_deref());
        if let Err(wait) = self.ip_limiter.check(&limits::ip_key(client_ip), now) {
            self.metrics.inc(Metric::RateLimited);
            log::info!("peer={} client={client_ip} refused: connection rate limit", p.peer);
            let retry = limits::retry_after_secs(wait).to_string();
            let out = handshake::http_error(
                429,
                &[("Retry-After", &retry)],
                "too many connection attempts from this address",
            );
            return self.answer(index, out, now);
        }
        // The connection cap refuses upgrades only: health checks and metrics stay answered
        // exactly when an operator needs them.
        // A list read before every worker was up would leave one's connections out of the
        // sum until the next tick (seen: a third connection admitted over a cap of two).
        if self.worker_slots.len() < self.channels.len() {
            self.worker_slots = self.metrics.worker_slots_in_use();
        }
        let open = self.metrics.total_of(&self.worker_slots, Metric::OpenConnections);
        if open as usize >= self.connection_cap {
            self.metrics.inc(Metric::Overloaded);
            let out =
                handshake::http_error(503, &[("Retry-After", "1")], "connection limit reached");
            return self.answer(index, out, now);
        }
        match handshake::check_upgrade(&head) {
            Ok(()) => {}
            Err(UpgradeError::Method) => {
                return self.answer(
                    index,
                    handshake::http_error(405, &[("Allow", "GET")], "WebSocket upgrades use GET"),
                    now,
                );
            }
            Err(UpgradeError::Version) => {
                return self.answer(
                    index,
                    handshake::http_error(
                        426,
                        &[("Sec-WebSocket-Version", "13")],
                        "unsupported Sec-WebSocket-Version",
                    ),
                    now,
                );
            }
            Err(UpgradeError::Key) => {
                return self.answer(
                    index,
                    handshake::http_error(400, &[], "missing or invalid Sec-WebSocket-Key"),
                    now,
                );
            }
        }
        if self.config.conformance.echo && head.path == route::ECHO_PATH {
            // Conformance echo: any worker will do; spread by the client's port.
            let worker = p.peer.port() as usize % self.channels.len();
            return self.hand_off(index, worker, now);
        }
        // Route and parameter errors: upgrade, then close 1002 with the message, as zero-cache
        // does (an HTTP error looks like a hang to a browser's WebSocket).
        let routed = route::parse_sync_path(&head.path)
            .map_err(|e| e.to_string())
            .and_then(|_| route::parse_connect_params(&head.query));
        let params = match routed {
            Ok(params) => params,
            Err(message) => {
                self.metrics.inc(Metric::RouteErrors);
                log::info!("peer={} path={} refused: {message}", p.peer, head.path);
                let out = upgrade_then_close(&head, &message);
                return self.answer(index, out, now);
            }
        };
        let mut client_key = limits::ip_key(client_ip).to_vec();
        client_key.extend_from_slice(params.client_id.as_bytes());
        if let Err(wait) = self.client_limiter.check(&client_key, now) {
            self.metrics.inc(Metric::RateLimited);
            log::info!(
                "peer={} clientID={} refused: clientID rate limit",
                p.peer,
                params.client_id
            );
            let wait_ms = wait.as_millis() as u64;
            let out = upgrade_then_error(
                &head,
                ErrorKind::ServerOverloaded,
                "too many connection attempts for this clientID",
                Some((wait_ms, wait_ms.saturating_mul(2))),
            );
            return self.answer(index, out, now);
        }
        let worker = route::worker_for(&self.task_id, &params.client_group_id, self.channels.len());
        log::debug!(
            "handoff worker={worker} clientID={} clientGroupID={} peer={}",
            params.client_id,
            params.client_group_id,
            p.peer
        );
        self.hand_off(index, worker, now);
    }

    /// Passes the socket and its bytes to `worker`, or answers 503 if that fails.
    fn hand_off(&mut self, index: u32, worker: usize, now: Instant) {
        let p = self.pending.get(index).expect("pending");
        match handoff::send(self.channels[worker].as_fd(), p.fd.as_raw_fd(), p.peer, &p.buf) {
            Ok(()) => {
                self.metrics.inc(Metric::Handoffs);
                if let Some(p) = self.remove(index) {
                    // The worker holds the socket now; our copy goes with the next submission
                    // rather than a close(2) of its own.
                    self.ring.close_later(p.fd);
                }
            }
            Err(e) => {
                self.metrics.inc(Metric::HandoffFailures);
                log::warn!("handoff to worker {worker} failed: {e}; answering 503");
                let out = handshake::http_error(
                    503,
                    &[("Retry-After", "1")],
                    "worker busy, retry shortly",
                );
                self.answer(index, out, now);
            }
        }
    }

    fn plain_http(&self, head: &Head) -> Vec<u8> {
        let known = matches!(head.path.as_str(), "/" | "/keepalive" | "/metrics");
        if known && head.method != "GET" && head.method != "HEAD" {
            return handshake::http_error(405, &[("Allow", "GET")], "method not allowed");
        }
        match head.path.as_str() {
            "/" | "/keepalive" => handshake::http_response(200, &[], "text/plain", b"OK"),
            "/metrics" => {
                self.metrics.set(Metric::HeapBytes, crate::heap::live_bytes() as u64);
                let mut text = self.metrics.render();
                // Which backend runs, as an info metric (the ready log line says it too).
                text.push_str(&format!(
                    "# HELP syncgate_io_backend The io backend every process runs (io.backend).\n\
                     # TYPE syncgate_io_backend gauge\nsyncgate_io_backend{{backend=\"{}\"}} 1\n",
                    self.ring.backend().name()
                ));
                if !self.config.upstream.urls.is_empty() {
                    text.push_str(&self.metrics.render_upstreams(&self.config.upstream.urls));
                }
                handshake::http_response(200, &[], "text/plain; version=0.0.4", text.as_bytes())
            }
            path if route::parse_sync_path(path).is_ok() => handshake::http_error(
                426,
                &[("Sec-WebSocket-Version", "13")],
                "this route only takes WebSocket upgrades",
            ),
            _ => handshake::http_error(404, &[], "not found"),
        }
    }

    /// Writes `out` to the socket, then lingers and closes.
    fn answer(&mut self, index: u32, out: Vec<u8>, now: Instant) {
        let p = self.pending.get_mut(index).expect("pending");
        p.stage = Stage::Answer { out, sent: 0 };
        p.deadline = now + Duration::from_millis(self.config.keepalive.close_timeout_ms);
        self.arm_send(index);
    }

    fn arm_send(&mut self, index: u32) {
        let p = self.pending.get(index).expect("pending");
        let Stage::Answer { out, sent } = &p.stage else {
            return;
        };
        let rest = &out[*sent..];
        // SAFETY: the answer's bytes stay in the pending socket's stage until the send
        // completes, and the socket is freed only after its completion.
        unsafe {
            self.ring.send(
                p.fd.as_raw_fd(),
                rest.as_ptr(),
                rest.len(),
                libc::MSG_NOSIGNAL,
                Op::Send.token(index),
            )
        };
    }

    fn on_send(&mut self, index: u32, res: i32, _now: Instant) {
        let Some(p) = self.pending.get_mut(index) else {
            return;
        };
        let Stage::Answer { out, sent } = &mut p.stage else {
            return;
        };
        if res <= 0 || p.expired {
            self.remove(index);
            return;
        }
        *sent += res as usize;
        if *sent < out.len() {
            return self.arm_send(index);
        }
        let _ = nix::sys::socket::shutdown(p.fd.as_raw_fd(), nix::sys::socket::Shutdown::Write);
        p.stage = Stage::Linger;
        p.buf.clear();
        p.buf.shrink_to(512);
        self.arm_recv(index);
    }

    /// Expires deadlines: shutting a socket down completes its in-flight operation, which
    /// then frees it, so nothing is freed while the kernel still holds its buffer.
    fn run_timers(&mut self, now: Instant) {
        self.worker_slots = self.metrics.worker_slots_in_use();
        if self.accept_paused.is_some_and(|until| now >= until) {
            self.accept_paused = None;
            if !self.accept_armed && !self.stopping {
                self.arm_accept();
            }
        }
        for (_, p) in self.pending.iter_mut() {
            if !p.expired && now >= p.deadline {
                p.expired = true;
                let _ =
                    nix::sys::socket::shutdown(p.fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
            }
        }
    }
}

impl Process for Listener {
    fn ring(&mut self) -> &mut Ring {
        &mut self.ring
    }

    fn control(&self) -> &OwnedFd {
        &self.control
    }

    fn signalfd(&self) -> RawFd {
        self.signalfd.as_raw_fd()
    }

    fn tick(&self) -> Duration {
        // Head deadlines are checked on the tick: at most a quarter second late.
        self.config.keepalive.tick().min(Duration::from_millis(250))
    }

    fn on_completion(&mut self, op: Op, index: u32, cqe: &Completion, now: Instant) {
        match op {
            Op::Accept => self.on_accept(cqe, now),
            Op::Recv => self.on_recv(index, cqe.result(), now),
            Op::Send => self.on_send(index, cqe.result(), now),
            _ => {}
        }
    }

    fn on_tick(&mut self, now: Instant) {
        self.run_timers(now)
    }

    fn on_signal(&mut self, _now: Instant) {
        self.stop()
    }

    fn on_order(&mut self, order: Order, _now: Instant) {
        match order {
            Order::Apply(config) => self.apply(*config),
            Order::Stop => self.stop(),
            Order::Drain | Order::Health(_) | Order::Share | Order::Own => {}
        }
    }

    fn after_batch(&mut self, _now: Instant) -> ControlFlow<()> {
        if self.stopping && self.accept_ended && self.pending.is_empty() {
            log::info!("listener stopped");
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }
}

/// The bytes of a 101, an error message and a close frame: refusing a client in a way its
/// WebSocket reports (an HTTP error looks like a network failure to a browser).
fn upgrade_then_error(
    head: &Head,
    kind: ErrorKind,
    message: &str,
    backoff: Option<(u64, u64)>,
) -> Vec<u8> {
    let key = head.ws_key.as_deref().unwrap_or_default();
    let mut out = handshake::switching_protocols(key, head.ws_protocol.as_deref(), None);
    frame::encode_frame(
        &mut out,
        frame::OpCode::Text,
        &protocol::encode_error(kind, message, backoff),
        false,
    );
    frame::encode_close(&mut out, kind.close_code(), message);
    out
}

/// The bytes of a 101 followed by a close frame 1002 carrying `Error: <message>`.
fn upgrade_then_close(head: &Head, message: &str) -> Vec<u8> {
    let key = head.ws_key.as_deref().unwrap_or_default();
    let mut out = handshake::switching_protocols(key, head.ws_protocol.as_deref(), None);
    frame::encode_close(&mut out, close::PROTOCOL_ERROR, &format!("Error: {message}"));
    out
}

/// Refuses a socket the listener has no descriptor to spare for: one non-blocking write of
/// the 503 of a full listener (a client that has sent nothing yet reads it), then closed at
/// once. The answers of [`Listener::answer`] linger until the client closes, each holding a
/// descriptor meanwhile: past the descriptor limit, the accepts themselves failed.
fn refuse_at_once(fd: OwnedFd) {
    let out = handshake::http_error(503, &[("Retry-After", "1")], FULL);
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    // SAFETY: a send from a live buffer on a socket we own; it cannot block.
    let _ = unsafe { libc::send(fd.as_raw_fd(), out.as_ptr().cast(), out.len(), flags) };
}

fn peer_addr(fd: RawFd) -> SocketAddr {
    use nix::sys::socket::{getpeername, SockaddrStorage};
    let addr = getpeername::<SockaddrStorage>(fd).ok().and_then(|a| super::socket_addr(&a));
    match addr {
        // A dual-stack socket reports IPv4 peers as IPv4-mapped IPv6 addresses: limits, logs
        // and X-Forwarded-For want the IPv4 address.
        Some(SocketAddr::V6(v6)) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => SocketAddr::V6(v6),
        },
        Some(addr) => addr,
        None => SocketAddr::from(([0, 0, 0, 0], 0)),
    }
}
