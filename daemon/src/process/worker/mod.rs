//! A worker process: receives sockets from the listener, finishes their handshake, and runs
//! their connections on one io_uring ring (the loop itself is [`event_loop`]).
//!
//! The worker carries out what others decide: [`admission`] whether a socket is served and
//! at whose expense, each [`Connection`] what its bytes mean, [`GroupSync`] what a message
//! changes and who is told. It gathers what they need (the verified token, the group, the
//! holder of a clientID), moves bytes between sockets and them, and counts and logs. Per
//! connection there is one multishot receive (into the shared provided-buffer ring, so an
//! idle connection parks no read buffer) and at most one send in flight. A slot is freed
//! only when neither is in flight, so a late completion can never land on a reused slot.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{MsgFlags, Shutdown};

mod relay;

use crate::config::Config;
use crate::gate::admission::{
    self, Decision, Holder, Newcomer, ProbeState, ProbeVerdict, Refusal, Rule, Token,
};
use crate::gate::auth::Verifier;
use crate::gate::proxies::TrustedProxies;
use crate::index::NameIndex;
use crate::metrics::{Histogram, Metric, Metrics};
use crate::process::control::{self, Message, Order};
use crate::process::event_loop::{self, Process};
use crate::process::handoff::{self, Handoff};
use crate::protocol::route;
use crate::protocol::{ErrorKind, ProtocolHeader};
use crate::ring::{Completion, Op, Ring};
use crate::slab::Slab;
use crate::sync::{Delivery, GroupRef, GroupSync, Loading, Pusher, StoreEvent, Who};
use crate::upstream::Upstreams;
use crate::ws::close;
use crate::ws::connection::{self, Connection, End, Mode, Notice, Settings, Shared, State};
use crate::ws::frame::DecoderLimits;
use crate::ws::handshake;

/// Receive buffers in the provided-buffer ring: enough for a burst from many connections in
/// one loop iteration; a connection that finds none is re-armed on the next tick.
const RECV_BUFFERS: u16 = 256;
/// Size of each receive buffer; a large frame spans several and is reassembled.
const RECV_BUFFER_SIZE: usize = 16 * 1024;

/// One socket in this worker. Every worker holds one per connection, most of them idle,
/// so what only some connections need lives elsewhere (the probe list, the resume map) and
/// what is only needed at the handshake is not kept.
struct Slot {
    fd: OwnedFd,
    conn: Connection,
    /// Who the connection is and where it belongs.
    id: Identity,
    /// Unique per connection in this worker (it wraps): deliveries name it so a reused slot
    /// never receives what was meant for its previous connection.
    serial: u32,
    /// The sync protocol version from the path (30 to 52 once admitted).
    version: u8,
    recv_armed: bool,
    send_armed: bool,
    /// The socket was shut down; the slot is freed once no operation is in flight.
    shut: bool,
    /// Counted in its group and under its clientID (admitted); it must leave them when it
    /// ends.
    joined: bool,
    /// A receive ended for lack of buffers and must be re-armed.
    starved: bool,
    /// Its token verified: its user is then its group's owner (the first verified user
    /// pins a group, and only that user is admitted to it after), so it needs no copy.
    verified: bool,
    /// Listed in `Worker::writers`: it may have bytes to send at the end of the iteration.
    send_wanted: bool,
}

/// Who a connection is: its names from the connect URL, in one allocation, and its group.
struct Identity {
    /// The clientID (its key in the worker), the wsid (echoed in `connected`, logged) and
    /// the claimed userID (the mutation limit's key while no token verified it; empty when
    /// absent), back to back.
    names: Box<str>,
    /// Where the clientID and the wsid end in `names`. Sixteen bits suffice: the names are
    /// decoded from one request head, so together they are shorter than it.
    client_end: u16,
    wsid_end: u16,
    /// The connection's client group, from its admission until it ends (`None` before, and
    /// for the conformance echo route).
    group: Option<GroupRef>,
}

const _: () = assert!(crate::config::MAX_HEAD_BYTES <= 1 << 16, "Identity's offsets are u16");

impl Slot {
    /// Whose mutations this connection's are, for the per-user mutation limit.
    fn pusher(&self) -> Pusher<'_> {
        match (self.verified, self.id.claimed_user()) {
            (true, _) => Pusher::Verified,
            (false, Some(user)) => Pusher::Claimed(user),
            (false, None) => Pusher::Anonymous,
        }
    }

    /// The connection in slot `index`, admitted to `group`, as group sync names it.
    fn who(&self, index: u32, group: GroupRef) -> Who<'_> {
        Who {
            slot: index,
            serial: self.serial,
            client_id: self.id.client_id(),
            group,
            version: self.version.into(),
        }
    }
}

impl Identity {
    fn new(client_id: &str, wsid: &str, claimed_user: Option<&str>) -> Identity {
        let names = [client_id, wsid, claimed_user.unwrap_or_default()].concat().into();
        let end = |len: usize| u16::try_from(len).expect("names shorter than a request head");
        let (client_end, wsid_end) = (end(client_id.len()), end(client_id.len() + wsid.len()));
        Identity { names, client_end, wsid_end, group: None }
    }

    fn client_id(&self) -> &str {
        &self.names[..self.client_end as usize]
    }

    fn wsid(&self) -> &str {
        &self.names[self.client_end as usize..self.wsid_end as usize]
    }

    fn claimed_user(&self) -> Option<&str> {
        Some(&self.names[self.wsid_end as usize..]).filter(|u| !u.is_empty())
    }

    /// Drops the claimed userID once a token verified it (it equals the verified user, which
    /// the group's owner holds): with tokens, user IDs are often the longest of the names.
    fn forget_claimed_user(&mut self) {
        if self.names.len() > self.wsid_end as usize {
            self.names = self.names[..self.wsid_end as usize].into();
        }
    }
}

/// The connect parameters the group sync checks at `initConnection`.
struct Resume {
    base_cookie: Option<String>,
    lmid: u64,
}

/// What a newcomer brings beyond its request, in upstream mode and with session cookies.
struct Edge {
    route: Option<relay::Route>,
    session: Option<u64>,
}

/// A newcomer waiting for the liveness probe of the connection holding its clientID.
struct Probe {
    newcomer: u32,
    existing: u32,
    deadline: Instant,
    /// What the newcomer is admitted with, once it is.
    admit: Admit,
}

/// How long a newcomer waits for its group to be read from the store before it is refused
/// (`ServerOverloaded`, with a backoff): the store's own busy timeout, so only a store that
/// is stuck makes it.
const LOAD_TIMEOUT: Duration = Duration::from_secs(5);

/// A newcomer waiting for its group to be loaded by the store thread, while the worker
/// serves everyone else.
struct Waiter {
    /// Its slot and the slot's serial: a newcomer that left meanwhile is skipped.
    index: u32,
    serial: u32,
    /// Where its admission stood.
    admit: Admit,
    /// What it waits to do: the admission decision, or (after a probe) to join.
    then: Then,
    /// When it is refused if the load has not come back.
    deadline: Instant,
    /// The relay its admission retired (`Worker::retired_hop`), for its own to wait for.
    retired_hop: Option<u32>,
    /// A newcomer straight from its handoff: the bytes behind its head. Its socket is read
    /// only once its admission is decided. `None` after a probe (it is being read).
    early: Option<Vec<u8>>,
}

/// The step of an admission that needs the group in memory.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Decide (`admission::decide`) against the group's owner and count.
    Decide,
    /// Join it (after a probe, a flush may have dropped the group).
    Open,
}

/// A newcomer's admission, from its handshake to the moment it joins its group.
struct Admit {
    /// Its clientGroupID: a slot holds its group only once admitted.
    group_id: Box<str>,
    /// Its verified user, if its token verified.
    user: Option<Box<str>>,
    /// Its address, for the log line of its admission or refusal.
    peer: SocketAddr,
    /// Its header `initConnection`, handled once it is admitted.
    init: Option<Vec<u8>>,
    /// Upstream mode: its relay's request and upstream, opened once it is admitted.
    route: Option<relay::Route>,
    /// Its session cookie's hash (`auth.session_cookie`), kept once it is admitted.
    session: Option<u64>,
    /// Its protocol version, for the displacement rules.
    version: u32,
}

pub struct Worker {
    index: usize,
    ring: Ring,
    config: Config,
    metrics: std::sync::Arc<Metrics>,
    verifier: Verifier,
    /// Connections this process can hold (`config::worker_connection_cap`, read once: the
    /// descriptor limit does not change while it runs); sockets beyond it get a 503.
    connection_cap: usize,
    /// The handoff channel from the listener.
    channel: OwnedFd,
    channel_buf: Vec<u8>,
    /// Connections by the index their operations carry in `user_data`.
    slots: Slab<Slot>,
    /// Slots that queued bytes this iteration, written once its events and its commit are
    /// done (see [`Worker::write_queued`]).
    writers: Vec<u32>,
    /// Admitted connections by clientID (the unique key of a connection inside a worker).
    clients: NameIndex,
    probes: Vec<Probe>,
    /// Where reconnecting clients say they left off, by slot, until their `initConnection`
    /// is checked against it. Most connections are new clients (no cookie, no mutations)
    /// and have no entry.
    resumes: HashMap<u32, Resume>,
    /// The settings, shared compression contexts and inflate scratch, lent to connections.
    shared: Shared,
    /// The replicas of this worker's client groups and their durable store.
    sync: GroupSync,
    /// Newcomers waiting for their group's load, by clientGroupID.
    loading: HashMap<Box<str>, Vec<Waiter>>,
    next_serial: u32,
    /// Bytes of dedicated compression contexts in use, against `compression.memory_budget_bytes`.
    dedicated_deflate_bytes: usize,
    open: u64,
    /// Set on SIGTERM: every connection was asked to close with 1001; exit when all are gone
    /// or at this deadline.
    stopping: Option<Instant>,
    /// Set when a graceful replacement took over: at this time the connections still here
    /// are closed with 1012 (service restart) and the worker stops.
    drain_at: Option<Instant>,
    signalfd: nix::sys::signalfd::SignalFd,
    /// The control channel from the supervisor (ready, reloads).
    control: OwnedFd,
    /// A connection arrived or was freed since the last tick (see [`Worker::run_timers`]).
    churned: bool,
    /// The zero-caches of upstream mode (`upstream.urls`); empty in embedded mode.
    upstreams: Upstreams,
    /// The upstreams the supervisor's health checks last said are down, by URL: kept to
    /// mark them again in the list a reload brings.
    down_upstreams: Vec<String>,
    /// `limits.trusted_proxies`, for the `X-Forwarded-For` a relay sends upstream.
    proxies: TrustedProxies,
    /// The upstream sides of relays, by the index their operations carry.
    hops: Slab<relay::Hop>,
    /// The session cookie's hash of each admitted connection that carried one
    /// (`auth.session_cookie`), by slot; empty unless that is configured.
    sessions: HashMap<u32, u64>,
    /// The key of those hashes, random per worker: the cookie's value itself is never kept.
    session_key: std::collections::hash_map::RandomState,
    /// The hop of each relayed client, by the client's slot (upstream mode; kept beside the
    /// slots rather than in them, where it would cost every connection of embedded mode).
    relays: HashMap<u32, u32>,
    /// Hops that wait for the relay of the connection their client replaced to be gone.
    waiting: Vec<u32>,
    /// The hop of the relay a newcomer's admission just retired (displacement, or a holder
    /// dead on its probe), for the newcomer's own relay to wait for; set and taken within
    /// one admission.
    retired_hop: Option<u32>,
    /// Hops that may have bytes to send at the end of the iteration.
    hop_writers: Vec<u32>,
    /// Upstream connects and upgrades in progress, against `upstream.max_connecting`.
    connecting: usize,
    /// Connections came and went, then a whole tick passed without any: the burst is over
    /// and the allocator holds its freed memory (see [`Worker::run_timers`]).
    burst_over: bool,
}

fn settings_from(config: &Config) -> Settings {
    let k = &config.keepalive;
    let l = &config.limits;
    Settings {
        idle_send: Duration::from_millis(k.idle_send_ms),
        silence: Duration::from_millis(k.silence_ms),
        ping_timeout: Duration::from_millis(k.ping_timeout_ms),
        close_timeout: Duration::from_millis(k.close_timeout_ms),
        max_outbound: l.max_outbound_bytes,
        slow_consumer: Duration::from_millis(l.slow_consumer_ms),
        decoder: DecoderLimits {
            max_message_bytes: l.max_message_bytes,
            max_fragments: l.max_fragments,
            allow_rsv1: false,
            server_frames: false,
        },
        compress_threshold: config.compression.threshold,
    }
}

impl Worker {
    pub fn new(
        index: usize,
        config: Config,
        channel: OwnedFd,
        metrics: Metrics,
        signalfd: nix::sys::signalfd::SignalFd,
        control: OwnedFd,
    ) -> Result<Worker, String> {
        let mut ring = Ring::new(config.io_backend()).map_err(|e| e.to_string())?;
        ring.provide_buffers(RECV_BUFFERS, RECV_BUFFER_SIZE).map_err(|e| e.to_string())?;
        let verifier = Verifier::new(&config.auth).map_err(|e| format!("auth: {e}"))?;
        let metrics = std::sync::Arc::new(metrics);
        metrics.set(Metric::OpenConnections, 0);
        metrics.set(Metric::InUse, 1);
        metrics.set(Metric::LogBytes, 0);
        // A respawned worker's slot may hold its predecessor's counts; it has no relay yet.
        metrics.set_upstream_relays(&[]);
        let level = config.compression.level;
        let window = Duration::from_millis(config.limits.per_user_mutations_window_ms);
        let l = &config.limits;
        let sync = GroupSync::open(
            &config.storage.path,
            metrics.slot(),
            format!("store-{index}"),
            Duration::from_millis(config.storage.test_sync_delay_ms),
            Some(std::sync::Arc::clone(&metrics)),
            l.group(),
            l.per_user_mutations,
            window,
            config.storage.max_pending_bytes,
        )
        .map_err(|e| format!("storage.path: {e}"))?;
        ring.poll_multi(sync.eventfd(), Op::Store.token(0));
        let shared = Shared::new(settings_from(&config), level);
        let upstreams =
            Upstreams::parse(&config.upstream.urls).map_err(|e| format!("upstream.urls: {e}"))?;
        let proxies = TrustedProxies::parse(&config.limits.trusted_proxies)
            .map_err(|e| format!("limits.trusted_proxies: {e}"))?;
        Ok(Worker {
            index,
            ring,
            config,
            metrics,
            verifier,
            connection_cap: crate::config::worker_connection_cap(),
            channel,
            channel_buf: vec![0; handoff::MAX_MESSAGE],
            slots: Slab::default(),
            writers: Vec::new(),
            clients: NameIndex::default(),
            probes: Vec::new(),
            resumes: HashMap::new(),
            shared,
            sync,
            loading: HashMap::new(),
            next_serial: 0,
            dedicated_deflate_bytes: 0,
            open: 0,
            stopping: None,
            drain_at: None,
            signalfd,
            control,
            churned: false,
            burst_over: false,
            upstreams,
            down_upstreams: Vec::new(),
            proxies,
            hops: Slab::default(),
            relays: HashMap::new(),
            waiting: Vec::new(),
            retired_hop: None,
            sessions: HashMap::new(),
            session_key: Default::default(),
            hop_writers: Vec::new(),
            connecting: 0,
        })
    }

    pub fn run(mut self) -> Result<(), String> {
        self.arm_channel();
        event_loop::run(&mut self)
    }

    /// A reloaded configuration: new connections get all of it; open ones get the new limits
    /// and timers (nothing is closed).
    fn apply(&mut self, config: Config) {
        match Verifier::new(&config.auth) {
            Ok(verifier) => self.verifier = verifier,
            Err(e) => log::error!("worker {}: reload kept the old auth keys: {e}", self.index),
        }
        log::set_max_level(config.level());
        // New connections go to the new list; live relays keep their upstream.
        match Upstreams::parse(&config.upstream.urls) {
            Ok(mut upstreams) => {
                upstreams.set_down(&self.down_upstreams);
                self.upstreams = upstreams;
                self.recount_relays();
            }
            Err(e) => log::error!("worker {}: reload kept the old upstream.urls: {e}", self.index),
        }
        if let Ok(proxies) = TrustedProxies::parse(&config.limits.trusted_proxies) {
            self.proxies = proxies;
        }
        self.shared.settings = settings_from(&config);
        self.sync.set_mutation_limit(
            config.limits.per_user_mutations,
            Duration::from_millis(config.limits.per_user_mutations_window_ms),
        );
        self.sync.set_group_limits(config.limits.group());
        for (_, slot) in self.slots.iter_mut() {
            slot.conn.apply_settings(&self.shared.settings);
        }
        self.config = config;
    }

    fn arm_channel(&mut self) {
        self.ring.poll_multi(&self.channel, Op::Channel.token(0));
    }

    /// SIGTERM or SIGINT: every connection gets 1001, and the worker exits when all are gone
    /// or after `drain_timeout_ms`.
    fn shut_down(&mut self, now: Instant) {
        if self.stopping.is_none() {
            log::info!(
                "worker {}: shutting down, closing {} connections with 1001",
                self.index,
                self.open
            );
            let deadline = now + Duration::from_millis(self.config.drain_timeout_ms);
            self.close_all(close::GOING_AWAY, "server shutting down", deadline, now);
        }
    }

    /// A graceful replacement took over: keep the connections for the drain timeout, so
    /// clients move over at their own pace.
    fn drain(&mut self, now: Instant) {
        // The channel stays open: a socket the old listener handed off just before it stopped
        // is still served here rather than lost.
        if self.drain_at.is_none() && self.stopping.is_none() {
            self.drain_at = Some(now + Duration::from_millis(self.config.drain_timeout_ms));
            log::info!(
                "worker {}: replaced; draining {} connections for {} ms",
                self.index,
                self.open,
                self.config.drain_timeout_ms
            );
        }
    }

    /// Starts the close handshake of every connection; the worker exits when all are gone
    /// or at `deadline`.
    fn close_all(&mut self, code: u16, reason: &str, deadline: Instant, now: Instant) {
        self.stopping = Some(deadline);
        for index in self.slots.indices() {
            if let Some(slot) = self.slots.get_mut(index) {
                slot.conn.close(code, reason, now);
                self.process(index);
            }
        }
        self.close_hops(code, reason, now);
    }
    fn on_channel(&mut self, cqe: &Completion, now: Instant) {
        if !cqe.more() {
            self.arm_channel();
        }
        loop {
            match handoff::recv(self.channel.as_fd(), &mut self.channel_buf) {
                Ok(h) => self.on_handoff(h, now),
                Err(handoff::RecvError::WouldBlock) => return,
                Err(handoff::RecvError::Malformed(why)) => {
                    log::warn!("worker {}: dropped a handoff: {why}", self.index)
                }
                Err(handoff::RecvError::Closed) => {
                    // The listener is gone (shutdown); stop polling a dead channel.
                    self.ring.cancel(&self.channel, Op::Channel.token(0));
                    return;
                }
                Err(handoff::RecvError::Io(e)) => {
                    log::warn!("worker {}: handoff receive failed: {e}", self.index);
                    return;
                }
            }
        }
    }

    /// A socket arrives: the whole handshake, in docs/PROTOCOL.md's lifecycle order.
    fn on_handoff(&mut self, h: Handoff, now: Instant) {
        if self.stopping.is_some() {
            return;
        }
        if peer_gone(&h.socket) {
            // Closed while in transit: drop it before spending any work on it.
            self.metrics.inc(Metric::DeadOnArrival);
            log::debug!("worker {}: peer={} closed during handoff", self.index, h.peer);
            return;
        }
        if self.slots.len() >= self.connection_cap {
            // Refused as the listener refuses at the global cap, before any work.
            self.metrics.inc(Metric::Overloaded);
            log::debug!("worker {}: peer={} refused: worker connection limit", self.index, h.peer);
            let out =
                handshake::http_error(503, &[("Retry-After", "1")], "connection limit reached");
            let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
            // A fresh socket's send buffer takes a short answer whole; if not, the close is
            // the answer.
            let _ = nix::sys::socket::send(h.socket.as_raw_fd(), &out, flags);
            let _ = nix::sys::socket::shutdown(h.socket.as_raw_fd(), Shutdown::Write);
            return;
        }
        let Some(end) = handshake::head_end(&h.bytes, 0) else {
            log::warn!("worker {}: handoff without a complete head", self.index);
            return;
        };
        let Ok(head) = handshake::parse_head(&h.bytes[..end], self.config.limits.max_headers)
        else {
            // The listener validated these bytes; a mismatch is a bug, not a client error.
            log::error!("worker {}: handoff failed to parse again", self.index);
            return;
        };
        let echo = self.config.conformance.echo && head.path == route::ECHO_PATH;
        let routed = route::parse_sync_path(&head.path)
            .ok()
            .and_then(|path| Some((path, route::parse_connect_params(&head.query).ok()?)));
        if routed.is_none() && !echo {
            log::error!("worker {}: handoff failed to parse again", self.index);
            return;
        }
        let mode = match (echo, self.upstreams.is_empty()) {
            (true, _) => Mode::Echo,
            (false, true) => Mode::Sync,
            (false, false) => Mode::Relay,
        };
        let mut conn = Connection::new(mode, now);
        let compression = &self.config.compression;
        let agreement = match head.ws_extensions.as_deref() {
            Some(offers) if compression.enabled => {
                let dedicated_available = self.dedicated_deflate_bytes
                    + compression.max_dedicated_bytes()
                    <= compression.memory_budget_bytes;
                crate::ws::deflate::negotiate(offers, compression, dedicated_available)
            }
            _ => None,
        };
        let key = head.ws_key.as_deref().unwrap_or_default();
        let extensions = agreement.as_ref().map(|a| a.response.as_str());
        conn.send_raw(handshake::switching_protocols(key, head.ws_protocol.as_deref(), extensions));
        if let Some(agreement) = agreement {
            conn.enable_deflate(agreement, compression.level);
            self.dedicated_deflate_bytes += conn.dedicated_deflate_bytes();
        }
        let (id, version) = match &routed {
            Some((path, p)) if !echo => (
                Identity::new(&p.client_id, &p.wsid, p.user_id.as_deref()),
                // Out of range is refused at admission, from the path itself.
                path.version.min(u8::MAX.into()) as u8,
            ),
            _ => (Identity::new("", "", None), 0),
        };
        let index = self.slots.insert(Slot {
            fd: h.socket,
            conn,
            id,
            serial: self.next_serial,
            version,
            recv_armed: false,
            send_armed: false,
            shut: false,
            joined: false,
            starved: false,
            verified: false,
            send_wanted: false,
        });
        self.next_serial = self.next_serial.wrapping_add(1);
        self.churned = true;
        match &routed {
            Some((path, params)) if !echo => {
                // A relay's client resumes with zero-cache, which reads these itself.
                if mode == Mode::Sync && (params.base_cookie.is_some() || params.lmid != 0) {
                    let resume =
                        Resume { base_cookie: params.base_cookie.clone(), lmid: params.lmid };
                    self.resumes.insert(index, resume);
                }
                // Read once: the route needs to know whether it carries a token.
                let header = admission::header(head.ws_protocol.as_deref());
                let tokenless = header.as_ref().is_ok_and(|h| h.auth_token.is_none());
                let route = match self.route(
                    &h.bytes[..end],
                    &head,
                    h.peer,
                    &params.client_group_id,
                    tokenless,
                ) {
                    Some(Ok(route)) => Some(route),
                    Some(Err(e)) => {
                        log::error!("worker {}: upstream request: {e}", self.index);
                        None
                    }
                    None => None,
                };
                let session = self.config.auth.session_cookie.as_deref().and_then(|name| {
                    let value = handshake::cookie(&h.bytes[..end], name)?;
                    Some(std::hash::BuildHasher::hash_one(&self.session_key, value))
                });
                let edge = Edge { route, session };
                self.admit(index, h.peer, header, path.version, params, edge, now)
            }
            _ => {
                if let Some(slot) = self.slots.get_mut(index) {
                    slot.conn.open("", "", None, now);
                }
            }
        }
        // Bytes the client sent right behind its head (it may not wait for the 101).
        let early = h.bytes[end..].to_vec();
        let group_id = routed.as_ref().map_or("", |(_, p)| p.client_group_id.as_str());
        if let Some(w) = self.loading.get_mut(group_id).and_then(|ws| ws.last_mut()) {
            if w.index == index {
                // It waits for its group: nothing of it is read, answered or sent before its
                // admission is decided (the 101, `connected` and a first poke still leave
                // together, and nothing is answered before `connected`).
                w.early = Some(early);
                return;
            }
        }
        self.resume_reading(index, early, now);
    }

    /// Starts reading a connection whose admission is decided: the bytes that came behind
    /// its head first, then its socket.
    fn resume_reading(&mut self, index: u32, mut early: Vec<u8>, now: Instant) {
        if self.slots.get(index).is_none() {
            return;
        }
        self.arm_recv(index);
        if !early.is_empty() {
            if let Some(slot) = self.slots.get_mut(index) {
                let group_id = slot.id.group.map_or("", |g| self.sync.name(g));
                slot.conn.on_bytes(&mut early, &mut self.shared, group_id, now);
            }
        }
        self.process(index);
    }

    /// Admission (`gate::admission`, in its order) for a connection whose 101 is queued:
    /// the worker gathers what the rules look at and carries out the decision.
    /// `peer` is only logged (a slot does not keep it: 32 bytes per connection).
    #[allow(clippy::too_many_arguments)]
    fn admit(
        &mut self,
        index: u32,
        peer: SocketAddr,
        header: Result<ProtocolHeader, Refusal>,
        version: u32,
        params: &route::ConnectParams,
        edge: Edge,
        now: Instant,
    ) {
        let group_id = params.client_group_id.as_str();
        let header = match header {
            Ok(header) => header,
            Err(refusal) => return self.refuse(index, peer, group_id, refusal, now),
        };
        // Nothing below looks at other connections before the token is verified.
        let verified;
        let token = match header.auth_token.as_deref() {
            Some(token) if self.verifier.has_keys() => {
                verified = self.verifier.verify(token, epoch_secs());
                Token::checked(&verified)
            }
            Some(_) => Token::Unchecked,
            None => Token::Absent,
        };
        let required = self.config.auth.required;
        let user: Option<Box<str>> =
            match admission::identify(token, params.user_id.as_deref(), required) {
                Ok(user) => user.map(Into::into),
                Err(refusal) => return self.refuse(index, peer, group_id, refusal, now),
            };
        let init = header.init_connection;
        let Edge { route, session } = edge;
        let admit = Admit { group_id: group_id.into(), user, peer, init, route, session, version };
        // The group, with its durable owner, before any decision (the pin).
        self.with_group(index, admit, Then::Decide, now);
    }

    /// Runs `then` for the newcomer in `index` once its group is in memory: now, or when the
    /// store thread has read it (the newcomer waits, the other connections are served).
    fn with_group(&mut self, index: u32, admit: Admit, then: Then, now: Instant) {
        match self.sync.load(&admit.group_id) {
            Loading::Ready(group) => self.proceed(then, index, group, admit, now),
            Loading::Waiting => {
                let Some(slot) = self.slots.get(index) else { return };
                let waiter = Waiter {
                    index,
                    serial: slot.serial,
                    admit,
                    then,
                    deadline: now + LOAD_TIMEOUT,
                    retired_hop: self.retired_hop.take(),
                    early: None,
                };
                self.loading.entry(waiter.admit.group_id.clone()).or_default().push(waiter);
            }
        }
    }

    /// The step of an admission that needed the group, now that it is in memory.
    fn proceed(&mut self, then: Then, index: u32, group: GroupRef, admit: Admit, now: Instant) {
        match then {
            Then::Decide => self.decide(index, group, admit, now),
            Then::Open => self.open_connection(index, group, admit, now),
        }
    }

    /// After a newcomer's wait for its group: start reading it if it came straight from its
    /// handoff (`early`), else (it is being read) act on what its admission queued.
    fn waited(&mut self, index: u32, early: Option<Vec<u8>>, now: Instant) {
        match early {
            Some(early) => self.resume_reading(index, early, now),
            None => self.process(index),
        }
    }

    /// Whether a waiting newcomer is still the connection in its slot.
    fn still_there(&self, w: &Waiter) -> bool {
        self.slots.get(w.index).is_some_and(|s| s.serial == w.serial)
    }

    /// The admission decision for a newcomer whose group is in memory.
    fn decide(&mut self, index: u32, group: GroupRef, admit: Admit, now: Instant) {
        let Some(slot) = self.slots.get(index) else { return };
        let holder = self.client_slot(slot.id.client_id()).map(|slot| Holder {
            slot,
            user: self.slots.get(slot).and_then(|s| self.verified_user(s)),
            session: self.sessions.get(&slot).copied(),
        });
        let state = admission::Group {
            owner: self.sync.owner(group),
            connections: self.sync.connections(group),
            max_connections: self.config.limits.max_group_connections,
        };
        let newcomer = Newcomer {
            user: admit.user.as_deref(),
            session: admit.session,
            version: admit.version,
        };
        let decision = admission::decide(newcomer, state, holder);
        let (peer, group_id) = (admit.peer, admit.group_id.clone());
        match decision {
            Decision::Refuse(refusal) => self.refuse(index, peer, &group_id, refusal, now),
            Decision::Replace(old) => {
                let wsid = self.slots.get(index).map(|s| s.id.wsid().to_owned());
                self.displace(old, &format!("replaced by wsid {}", wsid.unwrap_or_default()), now);
                self.open_connection(index, group, admit, now);
            }
            Decision::Probe(old) => {
                if let Some(existing) = self.slots.get_mut(old) {
                    existing.conn.probe();
                    let deadline =
                        now + Duration::from_millis(self.config.keepalive.probe_timeout_ms);
                    self.probes.push(Probe { newcomer: index, existing: old, deadline, admit });
                    self.process(old);
                } else {
                    self.open_connection(index, group, admit, now);
                }
            }
            Decision::Admit => self.open_connection(index, group, admit, now),
        }
    }

    /// The store answered: loads resume the newcomers that waited for them, a commit's
    /// deliveries go out (its failed groups' clients are sent away).
    fn on_store(&mut self, now: Instant) {
        self.sync.receive_store_answers();
        while let Some(event) = self.sync.next_store_event() {
            match event {
                StoreEvent::Loaded { name, result } => {
                    let waiters = self.loading.remove(&name).unwrap_or_default();
                    for w in waiters {
                        if !self.still_there(&w) {
                            continue;
                        }
                        match &result {
                            Ok(group) => {
                                self.retired_hop = w.retired_hop;
                                self.proceed(w.then, w.index, *group, w.admit, now);
                                self.retired_hop = None;
                            }
                            Err(e) => {
                                log::error!("worker={} storage: {e}", self.index);
                                let refusal = Refusal::storage(e.error_kind());
                                self.refuse(w.index, w.admit.peer, &name, refusal, now);
                            }
                        }
                        self.waited(w.index, w.early, now);
                    }
                }
                StoreEvent::Committed { deliveries, failed, commit_failed, took, changes } => {
                    self.metrics.observe(Histogram::Commit, took);
                    if commit_failed {
                        self.metrics.inc(Metric::StoreFailures);
                    } else {
                        self.metrics.inc(Metric::StoreBatches);
                        self.metrics.add(Metric::StoreChanges, changes as u64);
                    }
                    self.deliver(deliveries, &failed, commit_failed, now);
                }
                StoreEvent::LogUsed { on, result: Err(e) } => {
                    // Not confirmed: a graceful replacement waiting for it gives up and
                    // keeps this generation (see `process::supervisor`).
                    let mode = if on { "its write-ahead log" } else { "writing through" };
                    log::error!("worker={} storage: cannot switch to {mode}: {e}", self.index);
                }
                StoreEvent::LogUsed { on: true, result: Ok(()) } => {
                    log::info!("worker={} storage: commits go to its write-ahead log", self.index);
                }
                StoreEvent::LogUsed { on: false, result: Ok(()) } => {
                    let _ = control::send_message(self.control.as_fd(), &Message::Shared);
                }
            }
        }
    }

    /// The admitted connection holding `client_id`, if any.
    fn client_slot(&self, client_id: &str) -> Option<u32> {
        let slots = &self.slots;
        self.clients.find(client_id, |i| slots.get(i).map_or("", |s| s.id.client_id()))
    }

    /// A connection's verified user: its group's owner, if its token verified.
    fn verified_user<'a>(&'a self, slot: &Slot) -> Option<&'a str> {
        slot.id.group.filter(|_| slot.verified).and_then(|g| self.sync.owner(g))
    }

    /// Carries out a refusal: its counter, its log line, the error message and the close.
    fn refuse(
        &mut self,
        index: u32,
        peer: SocketAddr,
        group_id: &str,
        refusal: Refusal,
        now: Instant,
    ) {
        match refusal.rule {
            Rule::Auth => self.metrics.inc(Metric::AuthRefusals),
            Rule::Displacement => self.metrics.inc(Metric::DisplacementRefusals),
            Rule::Version => self.metrics.inc(Metric::VersionRefusals),
            Rule::Request | Rule::Storage => {}
        }
        if !self.upstreams.is_empty() && refusal.rule != Rule::Storage {
            self.metrics.inc(Metric::EdgeRefusals);
        }
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        let Refusal { kind, ref message, .. } = refusal;
        log::info!(
            "worker={} refused kind={} clientID={} clientGroupID={group_id} wsid={} peer={}: {message}",
            self.index,
            kind.as_str(),
            slot.id.client_id(),
            slot.id.wsid(),
            peer
        );
        slot.conn.fail_with_backoff(kind, message, refusal.backoff(), now);
    }

    /// Steps 5 and 6: the newcomer joins its group, then `connected`, then the header's
    /// `initConnection`.
    fn open_connection(&mut self, index: u32, group: GroupRef, admit: Admit, now: Instant) {
        let Admit { group_id, user, peer, init, route, session, .. } = admit;
        // A newcomer that waited on a probe may find its group pinned to someone else since.
        if let Some(refusal) = admission::check_pin(self.sync.owner(group), user.as_deref()) {
            return self.refuse(index, peer, &group_id, refusal, now);
        }
        let Some(slot) = self.slots.get(index) else {
            return;
        };
        let slots = &self.slots;
        let client_id = slot.id.client_id();
        // A connection that held the clientID was displaced or failed its probe, and left
        // the index; its successor takes the name.
        self.clients.insert(client_id, index, |i| slots.get(i).map_or("", |s| s.id.client_id()));
        self.sync.join(group, user.as_deref());
        let slot = self.slots.get_mut(index).expect("the slot just indexed");
        slot.id.group = Some(group);
        slot.verified = user.is_some();
        if slot.verified {
            slot.id.forget_claimed_user();
        }
        slot.joined = true;
        if let Some(session) = session {
            self.sessions.insert(index, session);
        }
        slot.conn.open(slot.id.wsid(), self.sync.name(group), init, now);
        self.open += 1;
        self.metrics.inc(Metric::Connected);
        log::info!(
            "worker={} connected clientID={} clientGroupID={group_id} wsid={} user={} version={} peer={}",
            self.index,
            slot.id.client_id(),
            slot.id.wsid(),
            user.as_deref().unwrap_or("-"),
            slot.version,
            peer
        );
        if slot.conn.state() == State::Open {
            if let Some(route) = route {
                let after = self.retired_hop.take();
                self.open_relay(index, route, after, now);
            }
        }
    }

    /// `updateAuth`: a refreshed token must verify and name the connection's own user
    /// (`admission::reauthenticate`). Without keys a token proves nothing and changes nothing.
    /// Whether the connection goes on.
    fn update_auth(&mut self, index: u32, token: &str) -> bool {
        if !self.verifier.has_keys() {
            return true;
        }
        let now = Instant::now();
        let result = self.verifier.verify(token, epoch_secs());
        let Some(slot) = self.slots.get(index) else {
            return false;
        };
        let token = Token::checked(&result);
        if let Some(refusal) = admission::reauthenticate(token, self.verified_user(slot)) {
            self.metrics.inc(Metric::AuthRefusals);
            if let Some(slot) = self.slots.get_mut(index) {
                slot.conn.fail(refusal.kind, &refusal.message, now);
            }
            return false;
        }
        true
    }

    /// Closes an existing connection that a newcomer replaces.
    fn displace(&mut self, index: u32, reason: &str, now: Instant) {
        self.metrics.inc(Metric::Displaced);
        if let Some(slot) = self.slots.get_mut(index) {
            log::info!(
                "worker={} displaced clientID={} wsid={}: {reason}",
                self.index,
                slot.id.client_id(),
                slot.id.wsid()
            );
            // It stays `joined` so its end is counted and logged like any other; leaving the
            // index now frees its clientID for the newcomer.
            self.clients.remove(slot.id.client_id(), index);
            slot.conn.close(close::NORMAL, reason, now);
            self.retired_hop = self.retire_relay(index, now);
            self.process(index);
        }
    }

    fn arm_recv(&mut self, index: u32) {
        let paused = self.client_paused(index);
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        if slot.recv_armed || slot.shut || paused {
            return;
        }
        slot.recv_armed = true;
        slot.starved = false;
        self.ring.recv_multi(slot.fd.as_raw_fd(), Op::Recv.token(index));
    }

    fn on_recv(&mut self, index: u32, cqe: &Completion, now: Instant) {
        let paused = self.client_paused(index);
        let res = cqe.result();
        let buffer = cqe.buffer();
        let Some(slot) = self.slots.get_mut(index) else {
            if let Some(bid) = buffer {
                self.ring.buffers().recycle(bid);
            }
            return;
        };
        if !cqe.more() {
            slot.recv_armed = false;
        }
        match (res, buffer) {
            (n, Some(bid)) if n > 0 => {
                let data = self.ring.buffers().get(bid, n as usize);
                let group_id = slot.id.group.map_or("", |g| self.sync.name(g));
                slot.conn.on_bytes(data, &mut self.shared, group_id, now);
                self.ring.buffers().recycle(bid);
                if !slot.recv_armed && !slot.shut {
                    // The multishot ended without an error (e.g. the kernel's own limits).
                    self.arm_recv(index);
                }
            }
            (n, _) if n == -libc::ENOBUFS => {
                slot.starved = true;
            }
            // Its upstream is behind (`paused`): the receive was cancelled on purpose.
            (n, _) if n == -libc::ECANCELED && paused => {}
            _ => {
                // EOF or error: the peer is gone (or we shut the socket down).
                if !slot.shut && !slot.conn.finished() {
                    slot.conn.terminate(End::Normal);
                }
            }
        }
        self.process(index);
    }

    fn on_send(&mut self, index: u32, res: i32, now: Instant) {
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        slot.send_armed = false;
        if res > 0 {
            slot.conn.on_sent(res as usize, now);
            self.metrics.add(Metric::BytesOut, res as u64);
        } else {
            slot.conn.on_sent(0, now);
            slot.conn.terminate(End::Normal);
        }
        if !self.relays.is_empty() {
            self.resume_upstream(index);
        }
        self.process(index);
    }

    /// After anything happened to a connection: act on its notices, write what it queued,
    /// or take it down.
    fn process(&mut self, index: u32) {
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        let counts = connection::take_counts();
        self.metrics.add(Metric::MessagesIn, counts.messages_in);
        self.metrics.add(Metric::BytesIn, counts.bytes_in);
        self.metrics.add(Metric::MessagesOut, counts.messages_out);
        let notices = slot.conn.take_notices();
        let mut refreshed = Vec::new();
        if self.relays.contains_key(&index) {
            if !notices.is_empty() {
                self.relay_notices(index, notices, Instant::now());
            }
        // Only an open connection has notices, and it is admitted: it has its group.
        } else if let (false, Some(group)) = (notices.is_empty(), slot.id.group) {
            let (pusher, who) = (slot.pusher(), slot.who(index, group));
            let now = Instant::now();
            for notice in notices {
                match notice {
                    Notice::Init(body) => {
                        // Needed once: an idle connection should not keep holding it.
                        let resume = self.resumes.remove(&index);
                        let base_cookie = resume.as_ref().and_then(|r| r.base_cookie.as_deref());
                        let lmid = resume.as_ref().map_or(0, |r| r.lmid);
                        self.sync.on_init(&who, base_cookie, lmid, &body)
                    }
                    Notice::ChangeDesiredQueries(ops) => self.sync.on_queries(&who, &ops),
                    Notice::DeleteClients(body) => self
                        .sync
                        .on_delete_clients(group, body.client_ids.as_deref().unwrap_or_default()),
                    Notice::Push(push) => self.sync.on_push(&who, pusher, *push, now),
                    Notice::UpdateAuth(token) => refreshed.push(token),
                    // Only a relay's connections have these, and they are handled above.
                    Notice::Relay(_)
                    | Notice::RelayPush { .. }
                    | Notice::RelayAuth { .. }
                    | Notice::PeerClosed { .. } => {}
                }
            }
        }
        for token in refreshed {
            self.update_auth(index, &token);
        }
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        if slot.conn.finished() {
            if self.relays.contains_key(&index) {
                self.client_ended(index, Instant::now());
            }
            let Some(slot) = self.slots.get_mut(index) else {
                return;
            };
            if slot.joined {
                self.clients.remove(slot.id.client_id(), index);
                // Taken, not copied: the group may leave memory at the next flush, while the
                // slot waits for its last operations to complete.
                let group = slot.id.group.take().expect("an admitted connection has its group");
                slot.joined = false;
                self.open -= 1;
                let end = slot.conn.end().cloned().unwrap_or(End::Normal);
                if end == End::KeepaliveTimeout {
                    self.metrics.inc(Metric::KeepaliveTimeouts);
                }
                if let End::Protocol(code) = end {
                    if code != close::NORMAL && code != close::UNAUTHORIZED {
                        self.metrics.inc(Metric::ProtocolErrors);
                    }
                }
                log::info!(
                    "worker={} closed clientID={} clientGroupID={} wsid={} end={end:?}",
                    self.index,
                    slot.id.client_id(),
                    self.sync.name(group),
                    slot.id.wsid()
                );
                self.sync.left(group, index);
            }
            if !slot.shut {
                slot.shut = true;
                let _ = nix::sys::socket::shutdown(
                    slot.fd.as_raw_fd(),
                    nix::sys::socket::Shutdown::Both,
                );
            }
            if !slot.recv_armed && !slot.send_armed {
                self.dedicated_deflate_bytes -= slot.conn.dedicated_deflate_bytes();
                self.resumes.remove(&index);
                self.sessions.remove(&index);
                if let Some(slot) = self.slots.remove(index) {
                    self.ring.close_later(slot.fd);
                }
                self.churned = true;
            }
            return;
        }
        if !slot.send_armed && !slot.send_wanted {
            slot.send_wanted = true;
            self.writers.push(index);
        }
        if slot.starved && !slot.recv_armed {
            self.arm_recv(index);
        }
    }

    /// Queues one send per connection that has bytes waiting, after the iteration's events
    /// and commit: what a connection queued meanwhile leaves in one segment. A new
    /// connection's 101 and `connected` (queued at the handoff) and its first poke (queued
    /// after the commit) were two sends when each event queued its own; every send costs
    /// a TCP transmit and its delivery. The ring submits at the loop's next wait either
    /// way, so nothing leaves later than before.
    fn write_queued(&mut self) {
        let mut writers = std::mem::take(&mut self.writers);
        for index in writers.drain(..) {
            let Some(slot) = self.slots.get_mut(index).filter(|s| s.send_wanted) else {
                continue;
            };
            slot.send_wanted = false;
            if slot.send_armed {
                continue;
            }
            // The close reply after the client's close: nothing follows it but the FIN of
            // the shutdown once it is written. MSG_MORE holds it in the socket for that FIN
            // (the shutdown pushes both in one segment instead of two); a close without a
            // shutdown sends them the same way.
            let last = if slot.conn.last_words() { libc::MSG_MORE } else { 0 };
            if let Some(out) = slot.conn.next_send() {
                let (fd, flags) = (slot.fd.as_raw_fd(), libc::MSG_NOSIGNAL | last);
                slot.send_armed = true;
                // SAFETY: `out` is the front of the connection's outbound queue, which
                // neither moves nor changes it while a send is in flight (`send_armed`; see
                // `Connection::next_send`), and the slot, socket included, is freed only
                // once no operation is in flight.
                unsafe {
                    send(&mut self.ring, &self.metrics, fd, out, flags, Op::Send.token(index))
                };
            }
        }
        self.writers = writers;
        self.write_hops();
    }

    /// The end of an iteration: what it staged goes to the store thread as the next batch
    /// (or waits behind the one in flight); deliveries that wait on no commit go out now.
    fn flush_sync(&mut self, now: Instant) {
        let deliveries = self.sync.flush();
        self.deliver(deliveries, &[], false, now);
    }

    /// Hands deliveries to their connections (a reused slot with another serial gets
    /// nothing), then sends away the clients of groups whose commit failed.
    fn deliver(
        &mut self,
        deliveries: Vec<Delivery>,
        failed: &[GroupRef],
        commit_failed: bool,
        now: Instant,
    ) {
        let mut touched = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            let to = delivery.to();
            let Some(slot) = self.slots.get_mut(to.slot).filter(|s| s.serial == to.serial) else {
                continue;
            };
            match delivery {
                Delivery::Frames { frames, messages, .. } => {
                    slot.conn.send_shared(frames, messages)
                }
                Delivery::Error { kind, message, close: false, .. } => {
                    slot.conn.send_error(kind, &message)
                }
                // With the backoff its kind asks for, as at admission (a push refused while
                // the store is behind: `ServerOverloaded`).
                Delivery::Error { kind, message, close: true, .. } => {
                    slot.conn.fail_with_backoff(kind, &message, admission::backoff_of(kind), now)
                }
            }
            touched.push(to.slot);
        }
        // These clients must reconnect and load what is on disk; the Zero client sends its
        // unacknowledged mutations again. Another process changed the group: right away
        // (`Rehome`, the group is elsewhere now). The commit failed (a full disk, SQLite busy
        // past its timeout): later (`ServerOverloaded`, 1-10 s), as every client of a sick
        // store would otherwise be back ten times a second to fail again.
        let (kind, why, message) = match commit_failed {
            true => (
                ErrorKind::ServerOverloaded,
                "its commit failed; sending its clients away",
                "the server could not store the last changes; reconnect later",
            ),
            false => (
                ErrorKind::Rehome,
                "state changed elsewhere; rehoming its clients",
                "client group state moved; reconnect",
            ),
        };
        let backoff = admission::backoff_of(kind);
        for &group in failed {
            log::warn!("worker={} clientGroupID={}: {why}", self.index, self.sync.name(group));
            for (i, slot) in self.slots.iter_mut() {
                if slot.id.group == Some(group) {
                    slot.conn.fail_with_backoff(kind, message, backoff, now);
                    touched.push(i);
                }
            }
        }
        touched.dedup();
        for index in touched {
            self.process(index);
        }
    }

    /// Every tick: each connection's timers, probes, the end of a drain, and memory given back
    /// after a burst.
    fn run_timers(&mut self, now: Instant) {
        // The allocator gives freed pages back to the kernel lazily, from its own
        // allocation and free calls; a worker that goes quiet after a burst of handshakes
        // (all that idle connections leave behind) makes none, and kept the burst's scratch
        // memory resident: about as much again as the idle connections themselves use.
        // So once a burst is over (a tick with connections coming or going, then a tick
        // with none), everything freed goes back at once. It walks the allocator's pages,
        // not its objects, and runs once per burst, so it is cheap even at many connections.
        if std::mem::take(&mut self.churned) {
            self.burst_over = true;
        } else if std::mem::take(&mut self.burst_over) {
            // SAFETY: mi_collect takes a plain bool and only releases memory that no live
            // allocation uses.
            unsafe { mi_collect(true) };
        }
        if self.drain_at.is_some_and(|at| now >= at) && self.stopping.is_none() {
            log::info!(
                "worker {}: drain over, closing {} connections with 1012",
                self.index,
                self.open
            );
            let deadline = now + Duration::from_millis(self.config.keepalive.close_timeout_ms);
            self.close_all(close::SERVICE_RESTART, "service restart", deadline, now);
        }
        self.resolve_probes(now);
        self.expire_loads(now);
        self.hop_timers(now);
        for index in self.slots.indices() {
            if let Some(slot) = self.slots.get_mut(index) {
                slot.conn.on_tick(&self.shared.settings, now);
                if slot.conn.state() == State::Open && slot.conn.flushed() {
                    slot.conn.shrink();
                }
                self.process(index);
            }
        }
    }

    /// Newcomers whose group's load did not come back in [`LOAD_TIMEOUT`] are refused as for
    /// a busy store (back off, retry); the load itself still completes, for later ones.
    fn expire_loads(&mut self, now: Instant) {
        if self.loading.is_empty() {
            return;
        }
        let mut expired = Vec::new();
        for waiters in self.loading.values_mut() {
            let (gone, kept) = std::mem::take(waiters).into_iter().partition(|w| w.deadline <= now);
            *waiters = kept;
            expired.extend::<Vec<Waiter>>(gone);
        }
        self.loading.retain(|_, waiters| !waiters.is_empty());
        for w in expired {
            if !self.still_there(&w) {
                continue;
            }
            log::warn!(
                "worker={} clientGroupID={}: the store did not load the group in {} s",
                self.index,
                w.admit.group_id,
                LOAD_TIMEOUT.as_secs()
            );
            let refusal = Refusal::storage(ErrorKind::ServerOverloaded);
            self.refuse(w.index, w.admit.peer, &w.admit.group_id, refusal, now);
            self.waited(w.index, w.early, now);
        }
    }

    /// Probes whose outcome is known (`admission::resolve_probe`): the newcomer is refused
    /// if the holder of its clientID proved alive, and admitted in its place if not.
    fn resolve_probes(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.probes.len() {
            let p = &self.probes[i];
            let holder = self.slots.get(p.existing).filter(|s| s.joined);
            let state = ProbeState {
                newcomer_waiting: self
                    .slots
                    .get(p.newcomer)
                    .is_some_and(|s| s.conn.state() == State::Pending),
                holder_connected: holder.is_some(),
                answered: holder.and_then(|s| s.conn.probe_answered()) == Some(true),
                expired: now >= p.deadline,
            };
            let verdict = admission::resolve_probe(state);
            if verdict == ProbeVerdict::Wait {
                i += 1;
                continue;
            }
            let Probe { newcomer, existing, admit, .. } = self.probes.swap_remove(i);
            if let Some(slot) = self.slots.get_mut(existing) {
                slot.conn.clear_probe();
            }
            match verdict {
                ProbeVerdict::Wait | ProbeVerdict::Forget => {}
                ProbeVerdict::Admit => self.with_group(newcomer, admit, Then::Open, now),
                ProbeVerdict::ReplaceDead => {
                    if let Some(slot) = self.slots.get_mut(existing) {
                        log::info!(
                            "worker={} existing connection failed its probe; replacing it",
                            self.index
                        );
                        slot.conn.terminate(End::KeepaliveTimeout);
                    }
                    self.metrics.inc(Metric::Displaced);
                    self.retired_hop = self.retire_relay(existing, now);
                    self.process(existing);
                    self.with_group(newcomer, admit, Then::Open, now);
                }
                ProbeVerdict::Refuse(refusal) => {
                    self.refuse(newcomer, admit.peer, &admit.group_id, refusal, now)
                }
            }
            self.process(newcomer);
        }
    }
}

// mimalloc's C API, linked already as the global allocator (main.rs); declared here rather
// than through libmimalloc-sys's `extended` feature, which would pull in another crate for
// one function.
extern "C" {
    /// Returns freed memory to the kernel where the allocator can (`force`: also what it
    /// would keep for reuse).
    fn mi_collect(force: bool);
}

impl Process for Worker {
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
        self.config.keepalive.tick()
    }

    fn on_completion(&mut self, op: Op, index: u32, cqe: &Completion, now: Instant) {
        match op {
            Op::Channel => self.on_channel(cqe, now),
            Op::Recv => self.on_recv(index, cqe, now),
            Op::Send => self.on_send(index, cqe.result(), now),
            Op::UpConnect => self.on_up_connect(index, cqe.result(), now),
            Op::UpRecv => self.on_up_recv(index, cqe, now),
            Op::UpSend => self.on_up_send(index, cqe.result(), now),
            Op::Store => {
                if !cqe.more() {
                    self.ring.poll_multi(self.sync.eventfd(), Op::Store.token(0));
                }
                self.on_store(now);
            }
            _ => {}
        }
    }

    fn on_tick(&mut self, now: Instant) {
        self.run_timers(now)
    }

    fn on_signal(&mut self, now: Instant) {
        self.shut_down(now)
    }

    fn on_order(&mut self, order: Order, now: Instant) {
        match order {
            Order::Apply(config) => self.apply(*config),
            Order::Drain => self.drain(now),
            Order::Share => self.sync.use_log(false),
            Order::Own => self.sync.use_log(true),
            Order::Stop => {}
            Order::Health(down) => {
                for key in self.upstreams.set_down(&down) {
                    self.upstream_down(key, now);
                }
                self.down_upstreams = down;
            }
        }
    }

    fn before_wait(&mut self) {
        // Before waiting, so the gauge is right from the start, not from the first event.
        self.metrics.set(Metric::HeapBytes, crate::heap::live_bytes() as u64);
    }

    fn after_batch(&mut self, now: Instant) -> ControlFlow<()> {
        // Deliveries can make connections ready to write, never new changes, so this
        // settles at once; the bound is a guard, not a schedule.
        for _ in 0..4 {
            if !self.sync.has_pending() {
                break;
            }
            self.flush_sync(now);
        }
        self.write_queued();
        self.metrics.set(Metric::OpenConnections, self.open);
        // From the end of the wait to here: how long every other connection waited.
        self.metrics.observe(Histogram::Iteration, now.elapsed());
        if let Some(deadline) = self.stopping {
            if (self.slots.is_empty() && !self.hops_open()) || now >= deadline {
                log::info!("worker {} stopped", self.index);
                // Its slot's gauges would otherwise add to the next generation's.
                self.metrics.set(Metric::OpenConnections, 0);
                self.metrics.set(Metric::HeapBytes, 0);
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }
}

/// Whether the peer closed the socket while it travelled from the listener.
fn peer_gone(fd: &OwnedFd) -> bool {
    let mut pfd =
        libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN | libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    match unsafe { libc::poll(&mut pfd, 1, 0) } {
        0 => false,
        n if n > 0 => pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0,
        _ => true,
    }
}

fn epoch_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Queues the write of `out` on `fd` (a client's socket or an upstream's): a plain send for
/// one buffer, a vectored one for more, counted in `syncgate_vectored_sends_total`.
///
/// # Safety
///
/// As [`Ring::send`] and [`Ring::send_msg`]: what `out` points to stays put and unchanged,
/// and `fd` open, until the send completes.
#[inline]
unsafe fn send(
    ring: &mut Ring,
    metrics: &Metrics,
    fd: RawFd,
    out: connection::Outgoing,
    flags: i32,
    ud: u64,
) {
    match out {
        // SAFETY: the caller's contract.
        connection::Outgoing::Bytes(b) => unsafe { ring.send(fd, b.as_ptr(), b.len(), flags, ud) },
        connection::Outgoing::Vectored(msg) => {
            metrics.inc(Metric::VectoredSends);
            // SAFETY: the caller's contract.
            unsafe { ring.send_msg(fd, msg, flags, ud) }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_identity_keeps_its_names_in_one_allocation() {
        let mut id = super::Identity::new("c1", "ws-1", Some("alice"));
        assert_eq!((id.client_id(), id.wsid(), id.claimed_user()), ("c1", "ws-1", Some("alice")));
        assert_eq!(&*id.names, "c1ws-1alice");
        id.forget_claimed_user();
        assert_eq!((id.client_id(), id.wsid(), id.claimed_user()), ("c1", "ws-1", None));
        assert_eq!(&*id.names, "c1ws-1");
        let id = super::Identity::new("c2", "", None);
        assert_eq!((id.client_id(), id.wsid(), id.claimed_user()), ("c2", "", None));
    }

    #[test]
    fn a_slot_stays_small() {
        // One per socket in every worker (see `Connection`'s own bound), most of them idle:
        // what only some connections need lives elsewhere, and the names share one
        // allocation. Raise this only knowing it is paid per connection.
        let size = std::mem::size_of::<Option<super::Slot>>();
        assert!(size <= 88, "{size}");
    }
}
