//! The worker's relays (upstream mode, [`crate::upstream`]): for each admitted client
//! socket, one WebSocket to its zero-cache on this worker's ring, and the messages between
//! them.
//!
//! A relay's upstream side is a [`Hop`]: a TCP connect (io_uring, with a deadline), the
//! upgrade request and its 101, then a [`Connection`] in [`Mode::Upstream`] (this end is the
//! client: frames masked, its own control frames and keepalive). Messages are copied once
//! each way: out of the receive buffer into a [`Relayed`] buffer with room for the other
//! hop's header, which is then queued as it is (a small one may join a small frame already
//! waiting, to leave in the same send). The hop's end and the client's are carried over by
//! [`relay::then`]. Back-pressure: while one side's queue is over `limits.max_outbound_bytes`
//! the other side is not read (its multishot receive is cancelled), until the queue is down
//! to half; the slow-consumer rule closes what stays stuck.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{SockaddrLike, SockaddrStorage};

use super::{Slot, Worker};
use crate::metrics::Metric;
use crate::protocol::ErrorKind;
use crate::ring::{Completion, Op, Ring};
use crate::upstream::relay::{self, Side, Then};
use crate::upstream::request::{self, Request};
use crate::ws::close;
use crate::ws::connection::{self, Connection, Mode, Notice, Outgoing};
use crate::ws::handshake;

/// What an admitted client needs for its relay: the request for its upstream and where.
pub(super) struct Route {
    pub(super) request: Request,
    pub(super) addr: SocketAddr,
    /// The upstream's [`crate::upstream::Target::key`].
    pub(super) key: u32,
}

/// The upstream side of one relay.
pub(super) struct Hop {
    fd: OwnedFd,
    conn: Connection,
    /// The client's slot, and its serial: `Worker::relays` names this hop for the slot while
    /// the client is there, and a reused slot has another serial.
    client: u32,
    client_serial: u32,
    stage: Stage,
    /// Where it connects, for the log lines.
    addr: SocketAddr,
    /// Which upstream ([`crate::upstream::Target::key`]): its relays end when the health
    /// checks declare it down, and its relay count in `/metrics` is this hop's.
    upstream: u32,
    connect_armed: bool,
    recv_armed: bool,
    send_armed: bool,
    /// A receive ended for lack of buffers and must be re-armed.
    starved: bool,
    /// Not read while the client's queue is over the outbound bound.
    paused: bool,
    /// The client is not read while this hop's queue is over the outbound bound (kept here,
    /// not in its slot, where it would cost every connection of embedded mode).
    client_paused: bool,
    /// Listed in `Worker::hop_writers`.
    send_wanted: bool,
    /// The socket was shut down; the hop is freed once no operation is in flight.
    shut: bool,
    /// Which side ended the relay first ("client", "upstream" or "syncgate"), once one did:
    /// the other side was told then, and only then.
    ended: Option<&'static str>,
}

enum Stage {
    /// Its client replaced a connection whose relay is still closing (hop `after`): this one
    /// connects once that one is gone, so the upstream never sees the newcomer while the old
    /// socket of the same clientID is alive (it would refuse it, as the edge would).
    Waiting {
        request: Request,
        after: u32,
    },
    /// The TCP connect is in flight; the kernel reads `addr` until it completes, so it is
    /// boxed (the slab may move the hop).
    Connecting {
        /// Never read here: it is the kernel's until the connect completes.
        #[allow(dead_code)]
        sockaddr: Box<SockaddrStorage>,
        request: Request,
        deadline: Instant,
    },
    /// The upgrade request is being written (`written` bytes so far; the buffer stays put
    /// while a send is in flight) and the answer's head read into `answer`.
    Upgrading {
        request: Request,
        written: usize,
        answer: Vec<u8>,
        deadline: Instant,
    },
    Open,
    /// It could not be reached, refused the upgrade, or the client left before it opened.
    Failed,
}

impl Hop {
    /// Arms the multishot receive of hop `h`, unless one is armed, the socket is shut down, or
    /// the client's queue holds its reads back (the hop's side of `Worker::arm_recv`).
    fn arm_recv(&mut self, h: u32, ring: &mut Ring) {
        if self.recv_armed || self.shut || self.paused {
            return;
        }
        self.recv_armed = true;
        self.starved = false;
        ring.recv_multi(self.fd.as_raw_fd(), Op::UpRecv.token(h));
    }

    /// Shuts the socket of hop `h` down (once) and cancels a connect in flight: the
    /// operations still armed complete, and then the hop is freed.
    fn shut_down(&mut self, h: u32, ring: &mut Ring) {
        if self.shut {
            return;
        }
        self.shut = true;
        let _ = nix::sys::socket::shutdown(self.fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if self.connect_armed {
            ring.cancel(&self.fd, Op::UpConnect.token(h));
        }
    }
}

impl Stage {
    /// Counted against `upstream.max_connecting`.
    fn connecting(&self) -> bool {
        matches!(self, Stage::Connecting { .. } | Stage::Upgrading { .. })
    }

    /// Not open yet: ending it is an abort, not a close handshake.
    fn unopened(&self) -> bool {
        self.connecting() || matches!(self, Stage::Waiting { .. })
    }
}

impl Worker {
    /// The upgrade request for an admitted client of group `group_id`, from its request
    /// head; `None` in embedded mode. A `tokenless` client's `userID` is replaced by
    /// `upstream.anonymous_user_id` when that is set.
    pub(super) fn route(
        &self,
        head_bytes: &[u8],
        head: &handshake::Head,
        peer: SocketAddr,
        group_id: &str,
        tokenless: bool,
    ) -> Option<Result<Route, String>> {
        let target = self.upstreams.choose(group_id)?;
        let trusted = self.proxies.contains(peer.ip());
        let xff = request::forwarded_for(peer.ip(), trusted, head.forwarded_for.as_deref());
        let user = self.config.upstream.anonymous_user_id.as_deref().filter(|_| tokenless);
        Some(request::upgrade(head_bytes, target, &xff, user).map(|request| Route {
            request,
            addr: target.addr,
            key: target.key,
        }))
    }

    /// The admitted client in `index` gets its upstream: a socket and its connect (after hop
    /// `after` is gone, if it is still there), unless this worker already has
    /// `upstream.max_connecting` connects in progress.
    pub(super) fn open_relay(
        &mut self,
        index: u32,
        route: Route,
        after: Option<u32>,
        now: Instant,
    ) {
        if self.connecting >= self.config.upstream.max_connecting {
            self.metrics.inc(Metric::UpstreamFailures);
            return self.fail_client(index, "upstream connects in progress at the limit", now);
        }
        let Route { request, addr, key } = route;
        let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let raw = unsafe {
            libc::socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
        };
        if raw < 0 {
            let e = std::io::Error::last_os_error();
            log::error!("worker={} upstream socket: {e}", self.index);
            self.metrics.inc(Metric::UpstreamFailures);
            return self.fail_client(index, "upstream socket unavailable", now);
        }
        // SAFETY: `raw` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Messages are small and latency-bound: no Nagle delay behind an unacknowledged one.
        let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::TcpNoDelay, &true);
        let Some(slot) = self.slots.get_mut(index) else { return };
        let after = after.filter(|&h| self.hops.get(h).is_some());
        let hop = Hop {
            fd,
            conn: Connection::new(Mode::Upstream, now),
            client: index,
            client_serial: slot.serial,
            stage: Stage::Waiting { request, after: after.unwrap_or(u32::MAX) },
            addr,
            upstream: key,
            connect_armed: false,
            recv_armed: false,
            send_armed: false,
            starved: false,
            paused: false,
            client_paused: false,
            send_wanted: false,
            shut: false,
            ended: None,
        };
        let h = self.hops.insert(hop);
        self.relays.insert(index, h);
        self.count_relay(key, 1);
        match after {
            Some(_) => self.waiting.push(h),
            None => self.connect_hop(h, now),
        }
    }

    /// Starts the TCP connect of a waiting hop.
    fn connect_hop(&mut self, h: u32, now: Instant) {
        let Some(hop) = self.hops.get_mut(h) else { return };
        let Stage::Waiting { request, .. } = std::mem::replace(&mut hop.stage, Stage::Failed)
        else {
            return;
        };
        let deadline = now + Duration::from_millis(self.config.upstream.connect_timeout_ms);
        let sockaddr = Box::new(SockaddrStorage::from(hop.addr));
        let (fd, addr, len) = (hop.fd.as_raw_fd(), sockaddr.as_ptr(), sockaddr.len());
        hop.stage = Stage::Connecting { sockaddr, request, deadline };
        hop.connect_armed = true;
        self.connecting += 1;
        // SAFETY: the sockaddr is boxed in the hop's stage, which keeps it until the connect
        // completes (`connect_armed`; the stage leaves `Connecting` only from its
        // completion), and a hop is freed only once no operation is in flight.
        unsafe { self.ring.connect(fd, addr, len, Op::UpConnect.token(h)) };
    }

    /// The relay of the connection in `index`, which a newcomer with its clientID replaces,
    /// closes at once (not after its client's close handshake): returns its hop, which the
    /// newcomer's relay waits for.
    pub(super) fn retire_relay(&mut self, index: u32, now: Instant) -> Option<u32> {
        let &h = self.relays.get(&index)?;
        let hop = self.hops.get_mut(h)?;
        if hop.ended.is_none() {
            hop.ended = Some("syncgate");
            if let Some(slot) = self.slots.get(index) {
                log_end(self.index, slot, hop, Some(close::NORMAL), "replaced");
            }
            let then = Then::Close { code: close::NORMAL, reason: "replaced".into() };
            self.end_hop(h, then, now);
        }
        self.hops.get(h).map(|_| h)
    }

    pub(super) fn on_up_connect(&mut self, h: u32, res: i32, now: Instant) {
        let Some(hop) = self.hops.get_mut(h) else { return };
        hop.connect_armed = false;
        match std::mem::replace(&mut hop.stage, Stage::Failed) {
            Stage::Connecting { request, deadline, .. } if res >= 0 => {
                hop.stage = Stage::Upgrading { request, written: 0, answer: Vec::new(), deadline };
                hop.arm_recv(h, &mut self.ring);
                self.want_hop_send(h);
            }
            Stage::Connecting { .. } => {
                let e = std::io::Error::from_raw_os_error(-res);
                self.hop_failed(h, &format!("connect: {e}"), now);
            }
            // Failed meanwhile (deadline, client gone): already accounted for.
            other => hop.stage = other,
        }
        self.process_hop(h, now);
    }

    pub(super) fn on_up_recv(&mut self, h: u32, cqe: &Completion, now: Instant) {
        let res = cqe.result();
        let buffer = cqe.buffer();
        let Some(hop) = self.hops.get_mut(h) else {
            if let Some(bid) = buffer {
                self.ring.buffers().recycle(bid);
            }
            return;
        };
        if !cqe.more() {
            hop.recv_armed = false;
        }
        let mut refused = None;
        match (res, buffer) {
            (n, Some(bid)) if n > 0 => {
                let data = self.ring.buffers().get(bid, n as usize);
                match &mut hop.stage {
                    Stage::Open => hop.conn.on_bytes(data, &mut self.shared, "", now),
                    Stage::Upgrading { request, answer, .. } => {
                        answer.extend_from_slice(data);
                        match handshake::head_end(answer, answer.len() - data.len()) {
                            Some(end) => {
                                match request::check_answer(&answer[..end], &request.accept) {
                                    Ok(()) => {
                                        let mut rest = answer.split_off(end);
                                        hop.stage = Stage::Open;
                                        self.connecting -= 1;
                                        self.metrics.inc(Metric::UpstreamConnects);
                                        hop.conn.open("", "", None, now);
                                        if !rest.is_empty() {
                                            hop.conn.on_bytes(&mut rest, &mut self.shared, "", now);
                                        }
                                    }
                                    Err(request::Refused(why)) => refused = Some(why),
                                }
                            }
                            None if answer.len() > request::MAX_RESPONSE_HEAD => {
                                refused = Some("upstream's answer head is too large".into())
                            }
                            None => {}
                        }
                    }
                    Stage::Waiting { .. } | Stage::Connecting { .. } | Stage::Failed => {}
                }
                self.ring.buffers().recycle(bid);
                // The multishot ended without an error (e.g. the kernel's own limits).
                hop.arm_recv(h, &mut self.ring);
            }
            (n, _) if n == -libc::ENOBUFS => hop.starved = true,
            (n, _) if n == -libc::ECANCELED && hop.paused => {}
            _ => {
                // EOF or error: the upstream is gone (or we shut the socket down).
                if hop.stage.connecting() {
                    refused = Some("upstream closed the connection during the upgrade".into());
                } else if !hop.shut && !hop.conn.finished() {
                    hop.conn.terminate(connection::End::Normal);
                }
            }
        }
        if let Some(why) = refused {
            self.hop_failed(h, &why, now);
        }
        self.process_hop(h, now);
    }

    pub(super) fn on_up_send(&mut self, h: u32, res: i32, now: Instant) {
        let Some(hop) = self.hops.get_mut(h) else { return };
        hop.send_armed = false;
        if res <= 0 {
            if hop.stage.connecting() {
                self.hop_failed(h, "upstream closed the connection during the upgrade", now);
            } else {
                hop.conn.on_sent(0, now);
                hop.conn.terminate(connection::End::Normal);
            }
            return self.process_hop(h, now);
        }
        match &mut hop.stage {
            Stage::Upgrading { written, .. } => *written += res as usize,
            _ => hop.conn.on_sent(res as usize, now),
        }
        self.metrics.add(Metric::BytesOut, res as u64);
        // The client was not read while this queue was full: read it again once it drained.
        let (client, queued) = (hop.client, hop.conn.queued_bytes());
        if hop.client_paused && queued <= self.shared.settings.max_outbound / 2 {
            hop.client_paused = false;
            self.arm_recv(client);
        }
        self.process_hop(h, now);
    }

    /// The hop could not be reached or refused the upgrade: `why` goes to the log, and the
    /// client is told to back off ([`relay::then`]).
    fn hop_failed(&mut self, h: u32, why: &str, now: Instant) {
        let Some(hop) = self.hops.get_mut(h) else { return };
        if hop.stage.connecting() {
            self.connecting -= 1;
        }
        hop.stage = Stage::Failed;
        if hop.ended.is_some() {
            return;
        }
        hop.ended = Some("upstream");
        self.metrics.inc(Metric::UpstreamFailures);
        let (client, serial, addr) = (hop.client, hop.client_serial, hop.addr);
        let Some(slot) = self.slots.get_mut(client).filter(|s| s.serial == serial) else {
            return;
        };
        tell_upstream_end(self.index, slot, Some(addr), relay::End::Unreachable, why, now);
        self.process(client);
    }

    /// After anything happened to a hop: pass its messages and its end to the client, write
    /// what it queued, or free it.
    pub(super) fn process_hop(&mut self, h: u32, now: Instant) {
        let Some(hop) = self.hops.get_mut(h) else { return };
        let counts = connection::take_counts();
        self.metrics.add(Metric::MessagesIn, counts.messages_in);
        self.metrics.add(Metric::BytesIn, counts.bytes_in);
        let notices = hop.conn.take_notices();
        let (client, serial) = (hop.client, hop.client_serial);
        let relayed = self.relays.get(&client) == Some(&h);
        let mut slot = self.slots.get_mut(client).filter(|s| relayed && s.serial == serial);
        let mut touched = false;
        for notice in notices {
            match notice {
                Notice::Relay(message) => {
                    self.metrics.inc(Metric::RelayedToClient);
                    self.metrics.add(Metric::RelayedBytesToClient, message.payload().len() as u64);
                    if let Some(slot) = slot.as_deref_mut() {
                        slot.conn.forward(message, &mut self.shared);
                        touched = true;
                    }
                }
                Notice::PeerClosed { code, reason } if hop.ended.is_none() => {
                    hop.ended = Some("upstream");
                    if let Some(slot) = slot.as_deref_mut() {
                        log_end(self.index, slot, hop, code, &reason);
                        tell(
                            slot,
                            relay::then(
                                Side::Upstream,
                                relay::End::Closed { code, reason: &reason },
                            ),
                            now,
                        );
                        touched = true;
                    }
                }
                _ => {}
            }
        }
        if let Some(slot) = slot.as_deref() {
            // The client does not keep up: stop reading its upstream until it does.
            if !hop.paused && slot.conn.queued_bytes() > self.shared.settings.max_outbound {
                hop.paused = true;
                if hop.recv_armed {
                    self.ring.cancel(&hop.fd, Op::UpRecv.token(h));
                }
            }
        }
        let finished = matches!(hop.stage, Stage::Failed) || hop.conn.finished();
        if finished && hop.ended.is_none() {
            // Gone without a close frame: the client backs off and comes back.
            hop.ended = Some("upstream");
            self.metrics.inc(Metric::UpstreamFailures);
            if let Some(slot) = slot {
                let why =
                    format!("{:?}", hop.conn.end().cloned().unwrap_or(connection::End::Normal));
                tell_upstream_end(self.index, slot, Some(hop.addr), relay::End::Lost, &why, now);
                touched = true;
            }
        }
        if finished {
            hop.shut_down(h, &mut self.ring);
            if !hop.connect_armed && !hop.recv_armed && !hop.send_armed {
                let hop = self.hops.remove(h).expect("the hop just looked at");
                self.count_relay(hop.upstream, -1);
                self.ring.close_later(hop.fd);
                if self.relays.get(&client) == Some(&h) {
                    self.relays.remove(&client);
                    if hop.client_paused {
                        // Held back for this hop; its close handshake needs reading.
                        self.arm_recv(client);
                    }
                }
                // A newcomer's relay that waited for this one goes now.
                for w in std::mem::take(&mut self.waiting) {
                    match self.hops.get(w).map(|hop| &hop.stage) {
                        Some(Stage::Waiting { after, .. }) if *after == h => {
                            self.connect_hop(w, now)
                        }
                        Some(Stage::Waiting { .. }) => self.waiting.push(w),
                        _ => {}
                    }
                }
            }
        } else {
            if !hop.send_armed && !hop.send_wanted {
                hop.send_wanted = true;
                self.hop_writers.push(h);
            }
            if hop.starved {
                hop.arm_recv(h, &mut self.ring);
            }
        }
        if touched {
            self.process(client);
        }
    }

    fn want_hop_send(&mut self, h: u32) {
        if let Some(hop) = self.hops.get_mut(h).filter(|hop| !hop.send_wanted) {
            hop.send_wanted = true;
            self.hop_writers.push(h);
        }
    }

    /// A relayed client's notices: its messages go to the upstream (a push under the
    /// mutation limit, an `updateAuth` once verified), its close frame too.
    pub(super) fn relay_notices(&mut self, index: u32, notices: Vec<Notice>, now: Instant) {
        for notice in notices {
            let Some(slot) = self.slots.get(index) else { return };
            let message = match notice {
                Notice::Relay(message) => message,
                Notice::RelayPush { message, mutations } => {
                    let Some(group) = slot.id.group else { continue };
                    let (pusher, who) = (slot.pusher(), slot.who(index, group));
                    if let Err(message) = self.sync.allow_relayed_push(&who, pusher, mutations, now)
                    {
                        let slot = self.slots.get_mut(index).expect("the slot just read");
                        slot.conn.send_error(ErrorKind::MutationRateLimited, &message);
                        continue;
                    }
                    message
                }
                Notice::RelayAuth { message, token } => {
                    if !self.update_auth(index, &token) {
                        return;
                    }
                    message
                }
                Notice::PeerClosed { code, reason } => {
                    let Some(&h) = self.relays.get(&index) else { continue };
                    if let Some(hop) = self.hops.get_mut(h).filter(|hop| hop.ended.is_none()) {
                        hop.ended = Some("client");
                        log_end(self.index, slot, hop, code, &reason);
                        let then =
                            relay::then(Side::Client, relay::End::Closed { code, reason: &reason });
                        self.end_hop(h, then, now);
                    }
                    continue;
                }
                _ => continue,
            };
            self.metrics.inc(Metric::RelayedToUpstream);
            self.metrics.add(Metric::RelayedBytesToUpstream, message.payload().len() as u64);
            let Some(&h) = self.relays.get(&index) else { return };
            let Some(hop) = self.hops.get_mut(h) else { continue };
            hop.conn.forward(message, &mut self.shared);
            // The upstream does not keep up (or is not open yet): stop reading the client.
            if !hop.client_paused && hop.conn.queued_bytes() > self.shared.settings.max_outbound {
                hop.client_paused = true;
                if let Some(slot) = self.slots.get(index).filter(|s| s.recv_armed) {
                    self.ring.cancel(&slot.fd, Op::Recv.token(index));
                }
            }
            self.want_hop_send(h);
        }
    }

    /// The client in `index` finished: its hop is told, if nobody was yet.
    pub(super) fn client_ended(&mut self, index: u32, now: Instant) {
        let Some(h) = self.relays.remove(&index) else { return };
        let Some(slot) = self.slots.get_mut(index) else { return };
        let Some(hop) = self.hops.get_mut(h).filter(|hop| hop.ended.is_none()) else { return };
        hop.ended = Some("client");
        log_end(self.index, slot, hop, None, "gone");
        self.end_hop(h, relay::then(Side::Client, relay::End::Lost), now);
    }

    /// Ends hop `h` as `then` says: a close handshake if it is open, else an abort.
    fn end_hop(&mut self, h: u32, then: Then, now: Instant) {
        let Some(hop) = self.hops.get_mut(h) else { return };
        if hop.stage.unopened() {
            if hop.stage.connecting() {
                self.connecting -= 1;
            }
            hop.stage = Stage::Failed;
            hop.shut_down(h, &mut self.ring);
        } else if let Then::Close { code, reason } = then {
            hop.conn.close(code, &reason, now);
        }
        self.want_hop_send(h);
        // Freed from its completions (or right away if none is in flight).
        if !hop_busy(self.hops.get(h)) {
            self.process_hop(h, now);
        }
    }

    /// Every hop's timers: the connect deadline, then keepalive and close timeouts.
    pub(super) fn hop_timers(&mut self, now: Instant) {
        for h in self.hops.indices() {
            let Some(hop) = self.hops.get_mut(h) else { continue };
            match &hop.stage {
                Stage::Connecting { deadline, .. } | Stage::Upgrading { deadline, .. }
                    if now >= *deadline =>
                {
                    let why = format!(
                        "no answer within upstream.connect_timeout_ms ({} ms)",
                        self.config.upstream.connect_timeout_ms
                    );
                    self.hop_failed(h, &why, now);
                }
                Stage::Open => hop.conn.on_tick(&self.shared.settings, now),
                _ => {}
            }
            self.process_hop(h, now);
        }
    }

    /// The health checks declared upstream `key` down: its relays end now, even those whose
    /// sockets still look alive (a hung zero-cache answers nothing), the clients with the
    /// back-off error (they come back to their group's next choice), the upstream hops with
    /// 1001. Relays to other upstreams are not touched.
    pub(super) fn upstream_down(&mut self, key: u32, now: Instant) {
        for h in self.hops.indices() {
            let Some(hop) =
                self.hops.get_mut(h).filter(|hop| hop.ended.is_none() && hop.upstream == key)
            else {
                continue;
            };
            hop.ended = Some("syncgate");
            let (client, serial) = (hop.client, hop.client_serial);
            if let Some(slot) = self.slots.get_mut(client).filter(|s| s.serial == serial) {
                let why = "the upstream failed its health checks";
                tell_upstream_end(self.index, slot, Some(hop.addr), relay::End::Down, why, now);
                self.process(client);
            }
            let bye = Then::Close { code: close::GOING_AWAY, reason: "upstream down".into() };
            self.end_hop(h, bye, now);
        }
    }

    /// One more (`delta` 1) or one fewer (-1) relay to upstream `key` in `/metrics`.
    fn count_relay(&mut self, key: u32, delta: i64) {
        if let Some(position) = self.upstreams.position(key) {
            self.metrics.add_upstream_relays(position, delta);
        }
    }

    /// Every upstream's relay count again from the hops (after a reload moved positions).
    pub(super) fn recount_relays(&mut self) {
        let mut counts = vec![0u64; self.upstreams.targets().len()];
        for h in self.hops.indices() {
            let key = self.hops.get(h).map(|hop| hop.upstream);
            if let Some(position) = key.and_then(|k| self.upstreams.position(k)) {
                counts[position] += 1;
            }
        }
        self.metrics.set_upstream_relays(&counts);
    }

    /// SIGTERM or a drain's end: every open hop gets `code` too.
    pub(super) fn close_hops(&mut self, code: u16, reason: &str, now: Instant) {
        for h in self.hops.indices() {
            if let Some(hop) = self.hops.get_mut(h).filter(|hop| hop.ended.is_none()) {
                hop.ended = Some("syncgate");
                self.end_hop(h, Then::Close { code, reason: reason.into() }, now);
            }
        }
    }

    /// One send per hop that has bytes waiting (see `Worker::write_queued`): the upgrade
    /// request until it is out, then the connection's queue once the upstream said 101.
    pub(super) fn write_hops(&mut self) {
        let mut writers = std::mem::take(&mut self.hop_writers);
        for h in writers.drain(..) {
            let Some(hop) = self.hops.get_mut(h).filter(|hop| hop.send_wanted) else { continue };
            hop.send_wanted = false;
            if hop.send_armed || hop.shut {
                continue;
            }
            let fd = hop.fd.as_raw_fd();
            let out = match &hop.stage {
                Stage::Upgrading { request, written, .. } if *written < request.bytes.len() => {
                    Outgoing::Bytes(&request.bytes[*written..])
                }
                Stage::Open => match hop.conn.next_send() {
                    Some(out) => out,
                    None => continue,
                },
                _ => continue,
            };
            hop.send_armed = true;
            let ud = Op::UpSend.token(h);
            // SAFETY: `out` is the unwritten rest of the upgrade request, which the stage
            // keeps unchanged until the send completes, or the front of the connection's
            // outbound queue, which stays put while a send is in flight (see
            // `Connection::next_send`); the hop is freed only once no operation is in
            // flight.
            unsafe { super::send(&mut self.ring, &self.metrics, fd, out, libc::MSG_NOSIGNAL, ud) };
        }
        self.hop_writers = writers;
    }

    /// The client's queue drained: read its upstream again if it was held back.
    pub(super) fn resume_upstream(&mut self, index: u32) {
        let Some(slot) = self.slots.get(index) else { return };
        if slot.conn.queued_bytes() > self.shared.settings.max_outbound / 2 {
            return;
        }
        let Some(&h) = self.relays.get(&index) else { return };
        if let Some(hop) = self.hops.get_mut(h).filter(|hop| hop.paused) {
            hop.paused = false;
            hop.arm_recv(h, &mut self.ring);
        }
    }

    /// The client in `index` cannot be relayed: it is told to back off.
    fn fail_client(&mut self, index: u32, why: &str, now: Instant) {
        if let Some(slot) = self.slots.get_mut(index) {
            tell_upstream_end(self.index, slot, None, relay::End::Unreachable, why, now);
        }
    }

    /// Whether the client in `index` is held back by its upstream's full queue.
    pub(super) fn client_paused(&self, index: u32) -> bool {
        !self.relays.is_empty()
            && self
                .relays
                .get(&index)
                .and_then(|&h| self.hops.get(h))
                .is_some_and(|h| h.client_paused)
    }

    pub(super) fn hops_open(&self) -> bool {
        !self.hops.is_empty()
    }
}

/// Whether an operation of the hop is in flight.
fn hop_busy(hop: Option<&Hop>) -> bool {
    hop.is_some_and(|hop| hop.connect_armed || hop.recv_armed || hop.send_armed)
}

/// Carries out on the client's hop what the upstream's end means for it.
fn tell(slot: &mut Slot, then: Then, now: Instant) {
    match then {
        Then::Close { code, reason } => slot.conn.close(code, &reason, now),
        Then::Fail { kind, message, backoff } => {
            slot.conn.fail_with_backoff(kind, message, Some(backoff), now)
        }
    }
}

/// Tells a relayed client that its upstream side ended as `end` (so it backs off), with the
/// warning line that names the relay, its upstream if it has one, and why: `relay failed`
/// (unreachable or refused), `relay lost` (gone mid-stream) or `relay ended` (declared
/// down by the health checks).
fn tell_upstream_end(
    worker: usize,
    slot: &mut Slot,
    upstream: Option<SocketAddr>,
    end: relay::End<'_>,
    why: &str,
    now: Instant,
) {
    let verb = match end {
        relay::End::Unreachable => "failed",
        relay::End::Lost => "lost",
        relay::End::Down | relay::End::Closed { .. } => "ended",
    };
    let at = upstream.map_or(String::new(), |a| format!(" upstream={a}"));
    log::warn!(
        "worker={worker} relay {verb} clientID={} wsid={}{at}: {why}",
        slot.id.client_id(),
        slot.id.wsid()
    );
    tell(slot, relay::then(Side::Upstream, end), now);
}

/// The log line of a relay's end: who ended it, with what.
fn log_end(worker: usize, slot: &Slot, hop: &Hop, code: Option<u16>, reason: &str) {
    log::info!(
        "worker={worker} relay ended clientID={} wsid={} upstream={} closed_by={} code={} reason={reason:?}",
        slot.id.client_id(),
        slot.id.wsid(),
        hop.addr,
        hop.ended.unwrap_or("-"),
        code.map_or("-".to_string(), |c| c.to_string()),
    );
}
