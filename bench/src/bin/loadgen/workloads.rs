//! The scenarios' traffic: what each connection sends and what it must get back.
//!
//! Every workload keeps exactly one message in flight per connection (per group for
//! fan-out) and sends the next only when the reply came and checked out: the closed loop
//! of uWebSockets' load_test. A reply that is wrong ends the run; one that does not come
//! within the reply timeout ends it too.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use syncgate_bench::stats::Histogram;
use syncgate_bench::wsframe::{self, OP_TEXT};
use syncgate_bench::zero::{self, App, Identity, PokeCheck, PokeEvent, PushFrame};

use crate::net::{AfterOpen, ConnectSpec, Workload, Writer};

/// What a workload has counted.
#[derive(Default)]
pub struct Counters {
    /// Completed operations (round trips, deliveries or connections).
    pub done: u64,
    /// Latency of each completed operation while `recording`.
    pub latency: Histogram,
    /// Set once warm-up is over: only measured windows feed the histogram.
    pub recording: bool,
    /// Pokes that carried no mutation of this run (ignored, but reported).
    pub other_pokes: u64,
    /// Messages sent and received while `recording` (push scenarios): the denominator of
    /// a front-door run's CPU per message.
    pub messages: u64,
}

impl Counters {
    fn message(&mut self) {
        if self.recording {
            self.messages += 1;
        }
    }

    fn complete(&mut self, took: Duration) {
        self.done += 1;
        if self.recording {
            self.latency.record(took.as_nanos().min(u128::from(u64::MAX)) as u64);
        }
    }
}

/// A workload the driver can start and read counters from.
pub trait Measured: Workload {
    /// Sends the first message(s) once every connection is open.
    fn start(&mut self, w: &mut Writer, now: Instant) -> Result<(), String>;
    /// The counters.
    fn counters(&mut self) -> &mut Counters;
}

/// The names of one run's connections.
///
/// The run tag makes every clientID and clientGroupID unique to the run, so a server that
/// keeps client-group state (syncgate stores it durably) never takes a new run's
/// mutation 1 for one it already applied in an earlier run.
#[derive(Clone, Debug)]
pub struct Names {
    /// Short, unique per run.
    tag: String,
}

impl Names {
    pub fn new(tag: &str) -> Self {
        Names { tag: tag.to_string() }
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    fn client(&self, n: u64) -> String {
        format!("c{}-{n}", self.tag)
    }

    fn group(&self, n: u64) -> String {
        format!("g{}-{n}", self.tag)
    }

    /// Connection `client` in group `group`; the group's user is `u<group>`.
    fn identity(&self, client: u64, group: u64) -> Identity {
        Identity {
            client_id: self.client(client),
            group_id: self.group(group),
            user_id: format!("u{}-{group}", self.tag),
            wsid: format!("w{}-{client}", self.tag),
        }
    }
}

/// A text frame holding `msg`, compressed when the connection negotiated deflate.
fn text_frame(msg: &[u8], deflate_bits: Option<u8>) -> Vec<u8> {
    let mut out = Vec::new();
    match deflate_bits {
        None => wsframe::encode_masked(OP_TEXT, false, msg, &mut out),
        Some(bits) => {
            let mut z = wsframe::deflate_segment(msg, bits);
            z.truncate(z.len() - wsframe::DEFLATE_TAIL.len());
            wsframe::encode_masked(OP_TEXT, true, &z, &mut out)
        }
    };
    out
}

/// The check of a workload with one message in flight per connection (`sent_at`: when it
/// went out): an error naming the first connection whose `reply` is later than `timeout`.
fn overdue(
    sent_at: &[Option<Instant>],
    now: Instant,
    timeout: Duration,
    reply: &str,
) -> Result<(), String> {
    match sent_at.iter().position(|sent| sent.is_some_and(|t| now - t > timeout)) {
        Some(id) => Err(format!("connection {id}: no {reply} within {timeout:?}")),
        None => Ok(()),
    }
}

/// Plain WebSocket echo round trips on the `/echo` route (syncgate's conformance route, the
/// peers' twin of it): a text message of exactly `size` bytes, back byte for byte. The
/// WebSocket layer alone, without the sync protocol or the store.
pub struct Frames {
    /// The pre-encoded frame (built at start, when deflate is known).
    frame: Vec<u8>,
    /// The message, to check each echo against.
    message: Vec<u8>,
    /// When each connection's message went out; `None` before the first.
    sent_at: Vec<Option<Instant>>,
    /// An echo later than this is a missing reply.
    timeout: Duration,
    /// What was counted.
    pub counters: Counters,
}

impl Frames {
    pub fn new(connections: usize, size: usize, timeout: Duration) -> Self {
        // Printable text with some variety (a run of one byte would flatter deflate).
        let message = (0..size).map(|i| b'a' + ((i * 7 + i / 13) % 26) as u8).collect();
        Frames {
            frame: Vec::new(),
            message,
            sent_at: vec![None; connections],
            timeout,
            counters: Counters::default(),
        }
    }
}

impl Workload for Frames {
    fn request(&mut self, _id: usize, _now: Instant) -> ConnectSpec {
        // The echo route names no one.
        ConnectSpec { who: Identity::default(), protocol: String::new(), echo: true }
    }

    fn on_message(
        &mut self,
        id: usize,
        msg: &[u8],
        now: Instant,
        w: &mut Writer,
    ) -> Result<(), String> {
        if msg != self.message.as_slice() {
            return Err(format!(
                "connection {id}: echo of {} bytes differs from the {} sent",
                msg.len(),
                self.message.len()
            ));
        }
        let sent = self.sent_at[id].ok_or_else(|| format!("connection {id}: echo before send"))?;
        self.counters.complete(now - sent);
        self.sent_at[id] = Some(now);
        w.send(id, &self.frame)
    }

    fn check(&mut self, now: Instant) -> Result<(), String> {
        overdue(&self.sent_at, now, self.timeout, "echo")
    }
}

impl Measured for Frames {
    fn start(&mut self, w: &mut Writer, now: Instant) -> Result<(), String> {
        self.frame = text_frame(&self.message, w.deflate_bits(0));
        for id in 0..self.sent_at.len() {
            self.sent_at[id] = Some(now);
            w.send(id, &self.frame)?;
        }
        Ok(())
    }

    fn counters(&mut self) -> &mut Counters {
        &mut self.counters
    }
}

/// `["ping",{}]` -> `["pong",{}]` round trips.
pub struct Ping {
    /// Connection names.
    names: Names,
    /// The pre-encoded ping frame (built at start, when deflate is known).
    frame: Vec<u8>,
    /// When each connection's ping went out; `None` while none is in flight.
    sent_at: Vec<Option<Instant>>,
    /// Follows the pokes a server may send besides the pongs.
    pokes: Vec<PokeCheck>,
    /// A pong later than this is a missing reply.
    timeout: Duration,
    /// What was counted.
    pub counters: Counters,
}

impl Ping {
    pub fn new(names: Names, connections: usize, timeout: Duration) -> Self {
        Ping {
            names,
            frame: Vec::new(),
            sent_at: vec![None; connections],
            pokes: (0..connections).map(|_| PokeCheck::default()).collect(),
            timeout,
            counters: Counters::default(),
        }
    }
}

impl Workload for Ping {
    fn request(&mut self, id: usize, _now: Instant) -> ConnectSpec {
        ConnectSpec {
            who: self.names.identity(id as u64, id as u64),
            protocol: zero::protocol_header(None),
            echo: false,
        }
    }

    fn on_message(
        &mut self,
        id: usize,
        msg: &[u8],
        now: Instant,
        w: &mut Writer,
    ) -> Result<(), String> {
        if msg != zero::PONG {
            // A server may poke a new client (syncgate sends a catch-up poke after
            // initConnection); a well-formed poke is ignored, anything else is an error.
            let none = zero::no_needle();
            return match self.pokes[id].on_message(msg, none, 0, none) {
                Ok(PokeEvent::Other) => {
                    self.counters.other_pokes += 1;
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(_) => Err(format!("connection {id}: expected pong, got {}", zero::lossy(msg))),
            };
        }
        // A pong with no ping in flight is the server's keepalive: ignored.
        if let Some(sent) = self.sent_at[id] {
            self.counters.complete(now - sent);
            self.sent_at[id] = Some(now);
            w.send(id, &self.frame)?;
        }
        Ok(())
    }

    fn check(&mut self, now: Instant) -> Result<(), String> {
        overdue(&self.sent_at, now, self.timeout, "pong")
    }
}

impl Measured for Ping {
    fn start(&mut self, w: &mut Writer, now: Instant) -> Result<(), String> {
        self.frame = text_frame(zero::PING, w.deflate_bits(0));
        for id in 0..self.sent_at.len() {
            if w.deflate_bits(id) != w.deflate_bits(0) {
                return Err("connections negotiated different deflate windows".into());
            }
            self.sent_at[id] = Some(now);
            w.send(id, &self.frame)?;
        }
        Ok(())
    }

    fn counters(&mut self) -> &mut Counters {
        &mut self.counters
    }
}

/// One client group of the push workload.
struct Group {
    /// Connection that pushes (the group's first).
    pusher: usize,
    /// The pusher's push frame, once started.
    frame: Option<PushFrame>,
    /// The mutation id in flight (0 before the first push).
    id: u64,
    /// Members still waiting for the poke of mutation `id`.
    pending: usize,
    /// When mutation `id` was sent.
    sent_at: Instant,
    /// `"<pusher clientID>":`, as it appears in `lastMutationIDChanges`.
    needle: zero::Needle,
}

/// One connection of the push workload.
struct Member {
    /// Index into the groups.
    group: usize,
    /// Follows this connection's pokes.
    check: PokeCheck,
    /// Last mutation id delivered here: a second delivery of it is an error.
    delivered: u64,
}

/// A CRUD push per round trip; the poke goes to every member of the pusher's group.
/// With groups of one this is the echo-size scenario, with more it is fan-out.
///
/// Paced (`interval`), a group pushes again one interval after its last push was sent, or
/// at once when the poke came later than that: a fixed rate below saturation, for latency
/// that is not queueing. Unpaced, it pushes again as soon as the poke is in (closed loop).
pub struct Push {
    /// Which table the pushes write and what the connect header declares.
    app: App,
    /// Time between a group's pushes when paced; `None`: closed loop.
    interval: Option<Duration>,
    /// Paced groups waiting for their next push, in due order (every group waits the same
    /// interval, so appending keeps the order).
    due: VecDeque<(Instant, usize)>,
    /// Connection names.
    names: Names,
    /// One per client group, indexed by group number.
    groups: Vec<Group>,
    /// One per connection, indexed by slot.
    members: Vec<Member>,
    /// Connections per group.
    group_size: usize,
    /// Size of each push, bytes of JSON.
    size: usize,
    /// A group whose deliveries take longer than this has a missing reply.
    timeout: Duration,
    /// Pushes completed (every member got the poke).
    pub pushes: u64,
    /// Deliveries (one per member per push) and their latency.
    pub counters: Counters,
}

impl Push {
    pub fn new(
        app: App,
        names: Names,
        groups: usize,
        group_size: usize,
        size: usize,
        interval: Option<Duration>,
        timeout: Duration,
    ) -> Self {
        let now = Instant::now();
        Push {
            app,
            interval,
            due: VecDeque::new(),
            groups: (0..groups)
                .map(|g| Group {
                    pusher: g * group_size,
                    frame: None,
                    id: 0,
                    pending: 0,
                    sent_at: now,
                    needle: zero::needle(
                        format!(r#""{}":"#, names.client((g * group_size) as u64)).as_bytes(),
                    ),
                })
                .collect(),
            members: (0..groups * group_size)
                .map(|id| Member {
                    group: id / group_size,
                    check: PokeCheck::default(),
                    delivered: 0,
                })
                .collect(),
            names,
            group_size,
            size,
            timeout,
            pushes: 0,
            counters: Counters::default(),
        }
    }
}

impl Workload for Push {
    fn request(&mut self, id: usize, _now: Instant) -> ConnectSpec {
        let g = id / self.group_size;
        let who = self.names.identity(id as u64, g as u64);
        let protocol = zero::app_protocol_header(self.app, &who.client_id, None);
        ConnectSpec { who, protocol, echo: false }
    }

    fn on_message(
        &mut self,
        id: usize,
        msg: &[u8],
        now: Instant,
        w: &mut Writer,
    ) -> Result<(), String> {
        self.counters.message();
        let m = &mut self.members[id];
        let group = m.group;
        let g = &mut self.groups[group];
        let value = g.frame.as_ref().map_or(zero::no_needle(), PushFrame::value);
        match m.check.on_message(msg, &g.needle, g.id, value) {
            Err(e) => Err(format!("connection {id}: {e}")),
            Ok(PokeEvent::Pending) => Ok(()),
            Ok(PokeEvent::Other) => {
                self.counters.other_pokes += 1;
                Ok(())
            }
            Ok(PokeEvent::Delivered) => {
                if m.delivered == g.id {
                    return Err(format!("connection {id}: mutation {} delivered twice", g.id));
                }
                m.delivered = g.id;
                g.pending -= 1;
                self.counters.complete(now - g.sent_at);
                if g.pending == 0 {
                    self.pushes += 1;
                    match self.interval.map(|i| g.sent_at + i) {
                        Some(at) if at > now => self.due.push_back((at, group)),
                        _ => self.push_next(group, now, w)?,
                    }
                }
                Ok(())
            }
        }
    }

    fn wake(&mut self, now: Instant, w: &mut Writer) -> Result<Option<Instant>, String> {
        while let Some(&(at, group)) = self.due.front() {
            if at > now {
                return Ok(Some(at));
            }
            self.due.pop_front();
            self.push_next(group, now, w)?;
        }
        Ok(None)
    }

    fn check(&mut self, now: Instant) -> Result<(), String> {
        for (i, g) in self.groups.iter().enumerate() {
            if g.pending > 0 && now - g.sent_at > self.timeout {
                return Err(format!(
                    "group g{i}: {} of {} deliveries of mutation {} missing after {:?}",
                    g.pending, self.group_size, g.id, self.timeout
                ));
            }
        }
        Ok(())
    }
}

impl Push {
    /// Sends group `group`'s next mutation.
    fn push_next(&mut self, group: usize, now: Instant, w: &mut Writer) -> Result<(), String> {
        let g = &mut self.groups[group];
        g.id += 1;
        g.pending = self.group_size;
        g.sent_at = now;
        let frame = g.frame.as_mut().ok_or("delivery before the first push")?;
        frame.set_id(g.id);
        w.send(g.pusher, frame.frame())?;
        self.counters.message();
        Ok(())
    }
}

impl Measured for Push {
    /// Builds every group's push; sends the first ones at once (closed loop) or spread
    /// evenly over one interval (paced).
    fn start(&mut self, w: &mut Writer, now: Instant) -> Result<(), String> {
        let n = self.groups.len() as u32;
        for (i, g) in self.groups.iter_mut().enumerate() {
            g.frame = Some(PushFrame::for_app(
                self.app,
                &self.names.group(i as u64),
                &self.names.client(g.pusher as u64),
                self.size,
                w.deflate_bits(g.pusher),
            )?);
            g.id = 0;
            if let Some(every) = self.interval {
                self.due.push_back((now + every * i as u32 / n, i));
            }
        }
        if self.interval.is_none() {
            for i in 0..self.groups.len() {
                self.push_next(i, now, w)?;
            }
        }
        Ok(())
    }

    fn counters(&mut self) -> &mut Counters {
        &mut self.counters
    }
}

/// New connections in a closed loop: connect, upgrade (token verified by the server),
/// `connected`, close handshake, and again.
pub struct Storm {
    /// What the connect header declares (a real zero-cache refuses a new group without its
    /// client schema, and then pokes the connection's query).
    app: App,
    /// Connection names.
    names: Names,
    /// Connections made so far; names each one uniquely (clientID, group, wsid).
    serial: u64,
    /// When each slot's current connection started.
    started: Vec<Instant>,
    /// Pre-minted (userID, protocol header) pairs, used in turn; empty for no token. For
    /// an app other than the bench app, (userID, token): its header names the connection.
    tokens: Vec<(String, String)>,
    /// Connections completed and their connect-to-`connected` latency.
    pub counters: Counters,
}

impl Storm {
    /// `tokens` as `loadgen mint` writes them: (userID, the bench app's protocol header).
    pub fn new(app: App, names: Names, tokens: Vec<(String, String)>) -> Result<Self, String> {
        let tokens = if app == App::Bench {
            tokens
        } else {
            let token = |(user, header): (String, String)| match zero::header_token(&header) {
                Some(t) => Ok((user, t)),
                None => Err(format!("a minted header for {user} carries no token")),
            };
            tokens.into_iter().map(token).collect::<Result<_, _>>()?
        };
        let counters = Counters::default();
        Ok(Storm { app, names, serial: 0, started: Vec::new(), tokens, counters })
    }
}

impl Workload for Storm {
    fn request(&mut self, id: usize, now: Instant) -> ConnectSpec {
        self.serial += 1;
        let s = self.serial;
        if self.started.len() <= id {
            self.started.resize(id + 1, now);
        }
        self.started[id] = now;
        let mut who = self.names.identity(s, s);
        let token =
            (!self.tokens.is_empty()).then(|| &self.tokens[(s as usize) % self.tokens.len()]);
        // The token's subject is the user; the group is new, so it pins to that user.
        if let Some((user, _)) = token {
            who.user_id = user.clone();
        }
        let protocol = match (self.app, token) {
            (App::Bench, Some((_, header))) => header.clone(),
            (app, token) => {
                zero::app_protocol_header(app, &who.client_id, token.map(|(_, t)| t.as_str()))
            }
        };
        ConnectSpec { who, protocol, echo: false }
    }

    fn on_open(&mut self, id: usize, now: Instant, _w: &mut Writer) -> Result<AfterOpen, String> {
        self.counters.complete(now - self.started[id]);
        Ok(AfterOpen::Close)
    }

    fn on_message(
        &mut self,
        id: usize,
        msg: &[u8],
        _now: Instant,
        _w: &mut Writer,
    ) -> Result<(), String> {
        // A real zero-cache pokes the connection's query right after `connected`, while
        // the close is on its way; an error is still one.
        if self.app == App::ZeroCache && !msg.starts_with(b"[\"error\"") {
            return Ok(());
        }
        Err(format!("connection {id}: unexpected message {}", zero::lossy(msg)))
    }
}

impl Measured for Storm {
    fn start(&mut self, _w: &mut Writer, _now: Instant) -> Result<(), String> {
        Ok(())
    }

    fn counters(&mut self) -> &mut Counters {
        &mut self.counters
    }
}

/// Connections that send nothing; keepalive pongs and WebSocket pings are answered or
/// ignored, anything else is an error.
pub struct Idle {
    /// What the connect header declares (a real zero-cache refuses a new group without its
    /// client schema).
    app: App,
    /// Connection names.
    names: Names,
    /// Number of the first connection: a process holding one share of a run's connections
    /// names its own (see `processes.rs`).
    first: u64,
    /// Follows pokes a server may send unprompted (none of ours exist).
    checks: Vec<PokeCheck>,
    /// Pokes seen, for the record.
    pub other_pokes: u64,
}

impl Idle {
    pub fn new(app: App, names: Names, connections: usize, first: usize) -> Self {
        Idle {
            app,
            names,
            first: first as u64,
            checks: (0..connections).map(|_| PokeCheck::default()).collect(),
            other_pokes: 0,
        }
    }
}

impl Workload for Idle {
    fn request(&mut self, id: usize, _now: Instant) -> ConnectSpec {
        let who = self.names.identity(self.first + id as u64, self.first + id as u64);
        let protocol = zero::app_protocol_header(self.app, &who.client_id, None);
        ConnectSpec { who, protocol, echo: false }
    }

    fn on_message(
        &mut self,
        id: usize,
        msg: &[u8],
        _now: Instant,
        _w: &mut Writer,
    ) -> Result<(), String> {
        // No client ID matches the NUL needle, so any poke is "other".
        let none = zero::no_needle();
        match self.checks[id].on_message(msg, none, 0, none) {
            Ok(PokeEvent::Other) => {
                self.other_pokes += 1;
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => Err(format!("connection {id}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One pool entry as `loadgen mint` writes it: the bench app's header, with the token.
    fn pool(token: Option<&str>) -> Vec<(String, String)> {
        vec![("u1".into(), zero::protocol_header(token))]
    }

    #[test]
    fn a_zero_cache_storm_sends_the_minted_token_in_its_apps_header() {
        let mut storm = Storm::new(App::ZeroCache, Names::new("x"), pool(Some("t.o.k"))).unwrap();
        let spec = storm.request(0, Instant::now());
        assert_eq!(spec.who.user_id, "u1");
        let header = zero::app_protocol_header(App::ZeroCache, &spec.who.client_id, Some("t.o.k"));
        assert_eq!(spec.protocol, header);
        // The bench app sends the minted header as it is.
        let mut bench = Storm::new(App::Bench, Names::new("x"), pool(Some("t.o.k"))).unwrap();
        assert_eq!(bench.request(0, Instant::now()).protocol, pool(Some("t.o.k"))[0].1);
    }

    #[test]
    fn a_minted_header_without_a_token_is_refused_for_another_app() {
        assert!(Storm::new(App::ZeroCache, Names::new("x"), pool(None)).is_err());
        assert!(Storm::new(App::Bench, Names::new("x"), pool(None)).is_ok());
    }

    #[test]
    fn an_idle_zero_cache_connection_declares_the_apps_client_schema() {
        let mut idle = Idle::new(App::ZeroCache, Names::new("x"), 1, 0);
        let spec = idle.request(0, Instant::now());
        assert_eq!(
            spec.protocol,
            zero::app_protocol_header(App::ZeroCache, &spec.who.client_id, None)
        );
        assert_ne!(spec.protocol, zero::protocol_header(None));
    }
}
