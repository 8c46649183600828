//! Client-group sync on one worker: the replicas of the groups this worker owns, their
//! durable store, and the pokes that fan their changes out.
//!
//! The worker hands it what its connections asked for ([`Notice`](crate::ws::connection::Notice)s)
//! and, once per loop iteration, calls [`GroupSync::flush`]. The store runs on a thread of
//! its own ([`store_thread`]), so the loop never waits for the disk: the flush sends what the
//! iterations since the last commit staged as one batch, and the deliveries that wait on it
//! are handed out when the store says it is on disk ([`GroupSync::next_store_event`]). While one
//! batch is being synced, the next one fills (group commit): a poke is never sent before the
//! change it carries is on disk, and every push that arrived during an fsync shares the next.
//! Loads run there too: a group that is not in memory is asked for, and the connection that
//! needs it waits (the worker's `Waiter`) while the others are served.
//!
//! Each poke is encoded once per wire format (text for protocol <= 51, binary chunks for 52)
//! and the same frames go to every recipient.

pub mod replica;
pub mod store;
pub mod store_thread;
pub mod wal;

use std::collections::{HashSet, VecDeque};
use std::num::NonZeroU32;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::gate::limits::MutationLimiter;
use crate::index::NameIndex;
use crate::protocol::poke::{self, PokeFormat};
use crate::protocol::{ErrorKind, InitConnectionBody, PushBody, QueriesPatchOp};
use crate::slab::Slab;
use crate::ws::frame::{self, OpCode};
use replica::{CatchUp, Change, PushResult, Replica};
use store::{Batch, Store, StoreError};
use store_thread::{Reply, Request, StoreThread};

/// How long a starting worker waits for the storage directory's lock: only a daemon being
/// replaced by a new one (its supervisor exiting first) can hold it against us.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// The WebSocket frames of one poke back to back in one buffer, shared by all its
/// recipients: one buffer to queue and, usually, one send per recipient.
pub type Frames = Rc<[u8]>;

/// Something to send once the iteration's commit is done, in order.
pub enum Delivery {
    Frames {
        to: To,
        frames: Frames,
        /// How many WebSocket messages `frames` holds, for metrics.
        messages: u64,
    },
    /// An error message; `close` ends the connection (code 1002) after it.
    Error { to: To, kind: ErrorKind, message: String, close: bool },
}

/// A delivery's recipient: slot and serial, so nothing reaches a later connection that
/// took over a freed slot.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct To {
    pub slot: u32,
    /// The slot's connection serial (it wraps; a delivery never waits long enough for the
    /// same slot to see 2^32 more connections).
    pub serial: u32,
}

impl Delivery {
    pub fn to(&self) -> To {
        match self {
            Delivery::Frames { to, .. } | Delivery::Error { to, .. } => *to,
        }
    }
}

/// A client group loaded on this worker: its place in [`GroupSync`]'s slab. It stays valid
/// while a connection holds it (from [`GroupSync::join`] to [`GroupSync::left`]) and, for
/// the caller of [`GroupSync::load`], until the next flush.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct GroupRef(NonZeroU32);

impl GroupRef {
    fn new(index: u32) -> GroupRef {
        GroupRef(NonZeroU32::new(index + 1).expect("a slab index below u32::MAX"))
    }

    fn index(self) -> u32 {
        self.0.get() - 1
    }
}

/// A connection that receives a group's pokes.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Member {
    to: To,
    format: PokeFormat,
}

/// A group's poke recipients. Most groups have one, held inline; a group of several keeps
/// them in a vector behind one pointer, so the common case costs 16 bytes where a vector
/// (or a small-vector) costs 24.
#[derive(Default)]
enum Members {
    #[default]
    None,
    One(Member),
    // Boxed to keep the enum at 16 bytes; a group of several members pays the indirection.
    #[allow(clippy::box_collection)]
    Many(Box<Vec<Member>>),
}

impl Members {
    fn push(&mut self, member: Member) {
        *self = match std::mem::take(self) {
            Members::None => Members::One(member),
            Members::One(first) => Members::Many(Box::new(vec![first, member])),
            Members::Many(mut all) => {
                all.push(member);
                Members::Many(all)
            }
        };
    }

    /// Drops the member in `slot`, if any.
    fn remove(&mut self, slot: u32) {
        match self {
            Members::One(m) if m.to.slot == slot => *self = Members::None,
            Members::Many(all) => {
                all.retain(|m| m.to.slot != slot);
                match all[..] {
                    [] => *self = Members::None,
                    [only] => *self = Members::One(only),
                    _ => {}
                }
            }
            _ => {}
        }
    }

    fn as_slice(&self) -> &[Member] {
        match self {
            Members::None => &[],
            Members::One(m) => std::slice::from_ref(m),
            Members::Many(all) => all,
        }
    }
}

/// A commit of this group failed or found it changed by another process: its replica is
/// gone and its connections are being sent away; the next [`GroupSync::load`] reads it from
/// the store again. The owner stays, so the pin is never lost.
const STALE: u8 = 1;
/// A load of the (stale) group is on its way to the store thread.
const LOADING: u8 = 2;
/// The open batch (the next commit) holds changes of the group.
const IN_OPEN: u8 = 4;
/// The batch being committed holds changes of the group. A group with changes in either
/// batch stays in memory, even without connections: its pokes and its staleness are found
/// by name, and a load must never read it from the file before they are there.
const IN_FLIGHT: u8 = 8;

struct Group {
    /// The clientGroupID, then the owner's name once the group is pinned: one allocation
    /// for both (most groups have one connection, so a group costs about what a connection
    /// does).
    names: Box<str>,
    /// Where the clientGroupID ends in `names`; a longer `names` holds an owner. Sixteen
    /// bits suffice: the ID comes from one request head (`config::MAX_HEAD_BYTES`).
    name_len: u16,
    /// Admitted connections of the group, members or not yet (the per-group cap); the group
    /// leaves memory when this reaches zero (after the commit of its last change).
    connections: u32,
    /// [`STALE`], [`LOADING`], [`IN_OPEN`], [`IN_FLIGHT`]: one byte, so the group stays
    /// within what a connection costs.
    flags: u8,
    /// `None` while the group is pristine (version 0: nothing stored, no client known).
    /// Most connections are idle, often each in a group of its own: an empty replica for
    /// each would cost them a few hundred bytes apiece for nothing.
    replica: Option<Box<Replica>>,
    /// The connections its pokes go to.
    members: Members,
}

impl Group {
    fn new(name: &str, owner: Option<&str>, replica: Option<Box<Replica>>) -> Group {
        let mut group = Group {
            names: name.into(),
            name_len: u16::try_from(name.len())
                .expect("a clientGroupID shorter than a request head"),
            connections: 0,
            flags: 0,
            replica,
            members: Members::None,
        };
        if let Some(owner) = owner {
            group.pin(owner);
        }
        group
    }

    fn name(&self) -> &str {
        &self.names[..self.name_len as usize]
    }

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    fn owner(&self) -> Option<&str> {
        let len = self.name_len as usize;
        (self.names.len() > len).then(|| &self.names[len + 1..])
    }

    fn pin(&mut self, owner: &str) {
        // A separator character, so that an empty owner name still reads as a pin.
        self.names = [self.name(), "\n", owner].concat().into();
    }

    /// Runs `f` on the group's replica, a fresh one if it has none; a replica still pristine
    /// afterwards is dropped again, so the group costs only its members.
    fn with_replica<T>(
        &mut self,
        limits: &replica::GroupLimits,
        f: impl FnOnce(&mut Replica) -> T,
    ) -> T {
        let name = &self.names[..self.name_len as usize];
        let replica =
            self.replica.get_or_insert_with(|| Box::new(Replica::new(name, limits.clone())));
        let result = f(replica);
        if replica.is_pristine() {
            self.replica = None;
        }
        result
    }
}

pub struct GroupSync {
    /// The store, on its own thread.
    store: StoreThread,
    /// What the next commit writes: staged since the last batch was sent.
    open: Batch,
    /// Patch bytes staged in `open`, for `max_pending_bytes`.
    open_bytes: usize,
    /// `storage.max_pending_bytes`: while a batch is in flight, a push that finds this much
    /// staged behind it is refused, so a stalled store cannot make `open` (and the pokes
    /// waiting with it) grow with every push that arrives.
    max_pending_bytes: usize,
    /// Groups with changes in `open` (flag [`IN_OPEN`]).
    open_groups: Vec<GroupRef>,
    /// The batch being committed: what waits on it. At most one at a time, so the pokes of
    /// consecutive batches go out in order.
    in_flight: Option<InFlight>,
    /// Groups not in memory whose load was asked for.
    loading: HashSet<Box<str>>,
    /// Answers taken from the store thread and not yet acted on, in order.
    replies: VecDeque<Reply>,
    /// The groups in memory, at the indices their [`GroupRef`]s name.
    groups: Slab<Group>,
    /// The groups by clientGroupID.
    by_name: NameIndex,
    /// Groups that had no connection at some point since the last flush (loaded for a
    /// newcomer, or left by their last connection): the flush drops those still without one,
    /// after their changes are on disk. Without it, a group nobody writes to would stay in
    /// memory after its last client left (nothing else makes a flush), and a client could
    /// grow the worker by connecting under ever new clientGroupIDs. A list, so a flush
    /// looks at these groups only, not at every group in memory.
    emptied: Vec<GroupRef>,
    /// Deliveries of the open batch, in the order they were made: they go out after its
    /// commit (or at once at a flush when nothing is staged or in flight).
    outbox: Vec<Delivery>,
    limits: replica::GroupLimits,
    mutations: MutationLimiter,
    /// The storage directory's lock ([`wal::lock`]); last, so it is released only after the
    /// store thread folded the log in and ended.
    _lock: std::fs::File,
}

/// A batch on the store thread: what goes out when it is on disk.
struct InFlight {
    /// Its deliveries, in order.
    deliveries: Vec<Delivery>,
    /// The groups it changed (flag [`IN_FLIGHT`]).
    groups: Vec<GroupRef>,
    /// Its changes, for the batch-size metric.
    changes: usize,
}

/// The answer to [`GroupSync::load`].
#[derive(Debug, PartialEq, Eq)]
pub enum Loading {
    /// In memory.
    Ready(GroupRef),
    /// Asked of the store: [`GroupSync::next_store_event`] says when it is there.
    Waiting,
}

/// What the store's answers meant, for the worker.
pub enum StoreEvent {
    /// A load asked for by [`GroupSync::load`] finished: the group is in memory (until the
    /// next flush unless someone joins it), or could not be read.
    Loaded { name: Box<str>, result: Result<GroupRef, StoreError> },
    /// A batch is on disk (or failed): its deliveries may go out. `failed` are the groups
    /// gone stale (their commit failed or another process changed them): their connections
    /// must reconnect, and nothing queued for them is delivered.
    Committed {
        deliveries: Vec<Delivery>,
        failed: Vec<GroupRef>,
        /// Why `failed` failed: `true`, the batch's commit failed (the store's error is
        /// logged: a full disk, SQLite busy past its timeout); `false`, another process
        /// changed those groups.
        commit_failed: bool,
        took: Duration,
        changes: usize,
    },
    /// [`GroupSync::use_log`] took effect (or failed: the previous mode stays).
    LogUsed { on: bool, result: Result<(), StoreError> },
}

/// The connection a notice came from, as far as group sync cares.
pub struct Who<'a> {
    pub slot: u32,
    /// Tells this connection from a later one that reuses its slot.
    pub serial: u32,
    pub client_id: &'a str,
    pub group: GroupRef,
    pub version: u32,
}

/// Whose mutations a push's are, for the per-user mutation limit.
#[derive(Clone, Copy)]
pub enum Pusher<'a> {
    /// A verified token's user: the group's owner (the only user a pinned group admits).
    Verified,
    /// The userID the connection claimed, no token verifying it.
    Claimed(&'a str),
    /// Neither: the connection's own clientID stands for its user.
    Anonymous,
}

/// The key the per-user mutation limit counts a pusher's mutations under: the verified user
/// (the group's `owner`), the claimed userID, or else the connection's own clientID (made in
/// `anonymous` once, which the caller keeps across a push's mutations).
fn limit_key<'a>(
    pusher: Pusher<'a>,
    owner: Option<&'a str>,
    client_id: &str,
    anonymous: &'a mut String,
) -> &'a str {
    match pusher {
        Pusher::Verified => owner.unwrap_or_default(),
        Pusher::Claimed(user) => user,
        Pusher::Anonymous => {
            if anonymous.is_empty() {
                *anonymous = format!("client:{client_id}");
            }
            anonymous
        }
    }
}

/// The `MutationRateLimited` message for a wait of `wait`.
fn rate_limited(wait: Duration) -> String {
    format!("mutation rate limit exceeded; retry in {} ms", wait.as_millis().max(1))
}

impl Who<'_> {
    fn to(&self) -> To {
        To { slot: self.slot, serial: self.serial }
    }
}

impl GroupSync {
    /// Opens the store in `dir`, replays what the worker of `slot` left in its log (a crash),
    /// and starts the store's thread, named `thread`, writing through until
    /// [`GroupSync::use_log`] (`sync_delay`, `metrics`: see [`store_thread::Setup`]).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        dir: &Path,
        slot: usize,
        thread: String,
        sync_delay: Duration,
        metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
        limits: replica::GroupLimits,
        per_user_mutations: u32,
        window: Duration,
        max_pending_bytes: usize,
    ) -> Result<GroupSync, StoreError> {
        let mut store = Store::open(dir)?;
        // Held for the worker's life: a second daemon waits for this worker too.
        let lock = wal::lock(dir, wal::Hold::Shared, LOCK_WAIT)
            .map_err(|e| StoreError::log(dir, format!("cannot lock: {e}")))?;
        store_thread::replay_logs(&mut store, dir, Some(slot))?;
        let setup = store_thread::Setup { dir: dir.to_owned(), slot, sync_delay, metrics };
        let store = StoreThread::start(store, thread, setup)
            .map_err(|source| StoreError::Thread { source })?;
        Ok(GroupSync {
            store,
            open: Batch::default(),
            open_bytes: 0,
            max_pending_bytes,
            open_groups: Vec::new(),
            in_flight: None,
            loading: HashSet::new(),
            replies: VecDeque::new(),
            groups: Slab::default(),
            by_name: NameIndex::default(),
            emptied: Vec::new(),
            outbox: Vec::new(),
            limits,
            mutations: MutationLimiter::new(per_user_mutations, window),
            _lock: lock,
        })
    }

    /// Commit to the worker's log (`true`: no other process holds this worker's groups) or
    /// write every batch through to SQLite (`false`: during a graceful replacement, after
    /// folding the log in). Answered by [`StoreEvent::LogUsed`], after every commit sent
    /// before it.
    pub fn use_log(&mut self, on: bool) {
        self.store.send(Request::UseLog(on));
    }

    pub fn set_mutation_limit(&mut self, max: u32, window: Duration) {
        self.mutations.set_limits(max, window);
    }

    /// New bounds for the groups' data (a reload), applied to the loaded groups too.
    pub fn set_group_limits(&mut self, limits: replica::GroupLimits) {
        for (_, g) in self.groups.iter_mut() {
            if let Some(replica) = g.replica.as_mut() {
                replica.set_limits(limits.clone());
            }
        }
        self.limits = limits;
    }

    fn group(&self, g: GroupRef) -> &Group {
        self.groups.get(g.index()).expect("a GroupRef outlived its group")
    }

    fn group_mut(&mut self, g: GroupRef) -> &mut Group {
        self.groups.get_mut(g.index()).expect("a GroupRef outlived its group")
    }

    /// The group named `name` if it is in memory; otherwise its load is asked of the store
    /// thread (once, however many ask) and [`GroupSync::next_store_event`] reports it. A stale group
    /// (a commit of it failed) is read again the same way. A group just loaded stays until
    /// the next flush at least.
    pub fn load(&mut self, name: &str) -> Loading {
        let groups = &self.groups;
        let found = self.by_name.find(name, |i| groups.get(i).map_or("", Group::name));
        match found {
            Some(i) => {
                let g = GroupRef::new(i);
                let group = self.group_mut(g);
                if !group.has(STALE) {
                    return Loading::Ready(g);
                }
                if !group.has(LOADING) {
                    group.flags |= LOADING;
                    self.store.send(Request::Load(name.into()));
                }
            }
            None => {
                if !self.loading.contains(name) {
                    self.loading.insert(name.into());
                    self.store.send(Request::Load(name.into()));
                }
            }
        }
        Loading::Waiting
    }

    /// The descriptor the worker's ring polls: readable when the store has answers for
    /// [`GroupSync::receive_store_answers`].
    pub fn eventfd(&self) -> &OwnedFd {
        self.store.eventfd()
    }

    /// Takes the answers the store thread has sent (its eventfd was readable), for
    /// [`GroupSync::next_store_event`].
    pub fn receive_store_answers(&mut self) {
        self.store.take_replies(&mut self.replies);
    }

    /// The next answer taken, and what it means; `None` when none is left. One at a time:
    /// the caller acts on each before the next is looked at (a group just loaded must be
    /// joined by its newcomer before a commit's answer drops the groups nobody holds).
    pub fn next_store_event(&mut self) -> Option<StoreEvent> {
        let reply = self.replies.pop_front()?;
        Some(self.answered(reply))
    }

    /// Waits for the store's next answer (tests: they have no ring to poll the eventfd).
    #[cfg(test)]
    fn wait_store(&mut self) -> StoreEvent {
        let reply = match self.replies.pop_front() {
            Some(reply) => reply,
            None => self.store.wait(),
        };
        self.answered(reply)
    }

    fn answered(&mut self, reply: Reply) -> StoreEvent {
        match reply {
            Reply::Loaded { name, result } => {
                let result = self.loaded(&name, result);
                StoreEvent::Loaded { name, result }
            }
            Reply::Committed { result, took } => self.committed(result, took),
            Reply::LogUsed { on, result } => StoreEvent::LogUsed { on, result },
        }
    }

    /// A load came back: the group goes into memory (or, stale, gets its replica back).
    fn loaded(
        &mut self,
        name: &str,
        result: Result<Option<store::StoredGroup>, StoreError>,
    ) -> Result<GroupRef, StoreError> {
        let groups = &self.groups;
        let found = self.by_name.find(name, |i| groups.get(i).map_or("", Group::name));
        if found.is_none() {
            self.loading.remove(name);
        }
        let built = result.and_then(|stored| match stored {
            Some(stored) => {
                let replica = Replica::from_snapshot(name, self.limits.clone(), stored.snapshot)
                    .map_err(|message| corrupt(name, message))?;
                Ok((Some(Box::new(replica)), stored.owner))
            }
            None => Ok((None, None)),
        });
        if let Some(i) = found {
            // A stale group read again.
            let g = GroupRef::new(i);
            let group = self.group_mut(g);
            group.flags &= !LOADING;
            let (replica, owner) = built?;
            group.replica = replica;
            group.flags &= !STALE;
            if let (None, Some(owner)) = (group.owner(), owner) {
                group.pin(&owner);
            }
            return Ok(g);
        }
        let (replica, owner) = built?;
        let i = self.groups.insert(Group::new(name, owner.as_deref(), replica));
        let groups = &self.groups;
        self.by_name.insert(name, i, |i| groups.get(i).map_or("", Group::name));
        let g = GroupRef::new(i);
        // Dropped again at a flush if the waiting newcomer is not admitted (or not yet).
        self.emptied.push(g);
        Ok(g)
    }

    /// The group's clientGroupID.
    pub fn name(&self, g: GroupRef) -> &str {
        self.group(g).name()
    }

    /// The verified user the group is pinned to (rule 4), if any.
    pub fn owner(&self, g: GroupRef) -> Option<&str> {
        self.group(g).owner()
    }

    /// Connections admitted to the group.
    pub fn connections(&self, g: GroupRef) -> usize {
        self.group(g).connections as usize
    }

    /// An admitted connection of the group, with its verified user: the first one pins the
    /// group, durably (rule 4).
    pub fn join(&mut self, g: GroupRef, user: Option<&str>) {
        let group = self.groups.get_mut(g.index()).expect("a GroupRef outlived its group");
        group.connections += 1;
        if let Some(user) = user {
            if group.owner().is_none() {
                group.pin(user);
                self.open.set_owner(group.name(), user);
            }
        }
    }

    /// A connection of the group ended.
    pub fn left(&mut self, g: GroupRef, slot: u32) {
        let group = self.group_mut(g);
        group.members.remove(slot);
        group.connections = group.connections.saturating_sub(1);
        if group.connections == 0 {
            self.emptied.push(g);
        }
    }

    /// `initConnection`: catch the client up, make it a recipient, then apply its queries.
    pub fn on_init(
        &mut self,
        who: &Who<'_>,
        base_cookie: Option<&str>,
        lmid: u64,
        body: &InitConnectionBody,
    ) {
        let limits = &self.limits;
        let g = self.groups.get_mut(who.group.index()).expect("a GroupRef outlived its group");
        let format = PokeFormat::for_protocol(who.version);
        let checked = g.with_replica(limits, |r| r.check_connect(who.client_id, base_cookie, lmid));
        match checked {
            Err((kind, message)) => {
                return self.outbox.push(Delivery::Error {
                    to: who.to(),
                    kind,
                    message,
                    close: true,
                });
            }
            Ok(CatchUp::Poke(poke)) => {
                let payloads = poke::encode_poke_as(&poke, format);
                let (frames, messages) = (frames_of(&payloads), payloads.len() as u64);
                self.outbox.push(Delivery::Frames { to: who.to(), frames, messages });
            }
            Ok(CatchUp::Nothing) => {}
        }
        g.members.push(Member { to: who.to(), format });
        if let Some(deleted) = &body.deleted {
            self.on_delete_clients(who.group, deleted.client_ids.as_deref().unwrap_or_default());
        }
        self.on_queries(who, &body.desired_queries_patch);
    }

    pub fn on_queries(&mut self, who: &Who<'_>, ops: &[QueriesPatchOp]) {
        let limits = &self.limits;
        let g = self.groups.get_mut(who.group.index()).expect("a GroupRef outlived its group");
        match g.with_replica(limits, |r| r.change_desired_queries(who.client_id, ops)) {
            Ok(Some(change)) => self.broadcast(who.group, change),
            Ok(None) => {}
            Err((kind, message)) => {
                self.outbox.push(Delivery::Error { to: who.to(), kind, message, close: true });
            }
        }
    }

    pub fn on_delete_clients(&mut self, group: GroupRef, client_ids: &[String]) {
        let limits = &self.limits;
        let g = self.groups.get_mut(group.index()).expect("a GroupRef outlived its group");
        if let Some(change) = g.with_replica(limits, |r| r.delete_clients(client_ids)) {
            self.broadcast(group, change);
        }
    }

    /// The per-user mutation limit for a push that is relayed to an upstream (upstream
    /// mode: the group's data is zero-cache's, only the limit is applied here). Every
    /// mutation of the push is counted; `Err` holds the error message for the client when
    /// one is over the limit, and the push is then not relayed.
    pub fn allow_relayed_push(
        &mut self,
        who: &Who<'_>,
        pusher: Pusher<'_>,
        mutations: usize,
        now: Instant,
    ) -> Result<(), String> {
        let g = self.groups.get(who.group.index()).expect("a GroupRef outlived its group");
        let mut anonymous = String::new();
        let user_key = limit_key(pusher, g.owner(), who.client_id, &mut anonymous);
        for _ in 0..mutations {
            self.mutations.check(user_key, g.name(), now).map_err(rate_limited)?;
        }
        Ok(())
    }

    /// A push: each mutation in order, under the per-user mutation limit; refused whole
    /// while the store is behind (`max_pending_bytes` staged behind a batch in flight).
    pub fn on_push(&mut self, who: &Who<'_>, pusher: Pusher<'_>, push: PushBody, now: Instant) {
        if self.in_flight.is_some() && self.open_bytes >= self.max_pending_bytes {
            let message = format!(
                "the store is behind: {} bytes of changes wait for a commit in progress",
                self.open_bytes
            );
            let kind = ErrorKind::ServerOverloaded;
            return self.outbox.push(Delivery::Error { to: who.to(), kind, message, close: true });
        }
        let mut anonymous = String::new();
        for mutation in push.mutations {
            let limits = &self.limits;
            let g = self.groups.get_mut(who.group.index()).expect("a GroupRef outlived its group");
            let user_key = limit_key(pusher, g.owner(), who.client_id, &mut anonymous);
            if let Err(wait) = self.mutations.check(user_key, g.name(), now) {
                let message = rate_limited(wait);
                let kind = ErrorKind::MutationRateLimited;
                return self.outbox.push(Delivery::Error {
                    to: who.to(),
                    kind,
                    message,
                    close: false,
                });
            }
            match g.with_replica(limits, |r| r.apply_push(mutation)) {
                PushResult::Applied(change) => self.broadcast(who.group, change),
                PushResult::AlreadyProcessed => {}
                PushResult::Failed { change, message }
                | PushResult::LimitExceeded { change, message } => {
                    self.broadcast(who.group, change);
                    let kind = ErrorKind::MutationFailed;
                    self.outbox.push(Delivery::Error { to: who.to(), kind, message, close: false });
                }
                PushResult::Gap(message) | PushResult::Refused(message) => {
                    let kind = ErrorKind::InvalidPush;
                    return self.outbox.push(Delivery::Error {
                        to: who.to(),
                        kind,
                        message,
                        close: true,
                    });
                }
            }
        }
    }

    /// Stages a change and queues its poke to every member, encoded once per format.
    fn broadcast(&mut self, group: GroupRef, change: Change) {
        let g = self.groups.get_mut(group.index()).expect("a GroupRef outlived its group");
        self.open.stage(g.name(), &change);
        self.open_bytes += change.json.len();
        if !g.has(IN_OPEN) {
            g.flags |= IN_OPEN;
            self.open_groups.push(group);
        }
        let poke = change.poke();
        let mut encoded: [Option<(Frames, u64)>; 2] = [None, None];
        for m in g.members.as_slice() {
            let i = (m.format == PokeFormat::Binary) as usize;
            let (frames, messages) = encoded[i]
                .get_or_insert_with(|| {
                    let payloads = poke::encode_poke_as(&poke, m.format);
                    (frames_of(&payloads), payloads.len() as u64)
                })
                .clone();
            self.outbox.push(Delivery::Frames { to: m.to, frames, messages });
        }
    }

    /// The end of a loop iteration. With nothing in flight: sends what was staged as the
    /// next batch, or, if nothing was, returns the deliveries (they wait on no commit) and
    /// drops the groups nobody holds. With a batch in flight, everything waits for it: the
    /// next batch fills meanwhile, and deliveries keep their order.
    pub fn flush(&mut self) -> Vec<Delivery> {
        if self.in_flight.is_some() {
            return Vec::new();
        }
        if !self.open.is_empty() {
            let groups = std::mem::take(&mut self.open_groups);
            for &g in &groups {
                let group = self.group_mut(g);
                group.flags = (group.flags & !IN_OPEN) | IN_FLIGHT;
            }
            let batch = std::mem::take(&mut self.open);
            self.open_bytes = 0;
            let changes = batch.changes();
            let deliveries = std::mem::take(&mut self.outbox);
            self.in_flight = Some(InFlight { deliveries, groups, changes });
            self.store.send(Request::Commit(batch));
            return Vec::new();
        }
        self.drop_emptied(&[]);
        std::mem::take(&mut self.outbox)
    }

    /// A batch came back from the store.
    fn committed(
        &mut self,
        result: Result<store::Committed, store::CommitError>,
        took: Duration,
    ) -> StoreEvent {
        let InFlight { mut deliveries, groups, changes } =
            self.in_flight.take().expect("a commit answers the batch in flight");
        for g in groups {
            self.group_mut(g).flags &= !IN_FLIGHT;
        }
        let commit_failed = result.is_err();
        let failed_names = match result {
            Ok(committed) => committed.stale_groups,
            Err(e) => {
                log::error!("storage: {}", e.error);
                e.groups()
            }
        };
        let mut failed = Vec::new();
        for name in &failed_names {
            let groups = &self.groups;
            let Some(i) = self.by_name.find(name, |i| groups.get(i).map_or("", Group::name)) else {
                continue;
            };
            let g = GroupRef::new(i);
            let group = self.group_mut(g);
            group.flags |= STALE;
            group.replica = None;
            let members = std::mem::take(&mut group.members);
            let to_member = |d: &Delivery| members.as_slice().iter().any(|m| m.to == d.to());
            deliveries.retain(|d| !to_member(d));
            self.outbox.retain(|d| !to_member(d));
            // What the open batch holds of it was based on the state that went stale: the
            // commit would refuse it too.
            if self.group(g).has(IN_OPEN) {
                self.open.remove_changes_of(name);
                self.group_mut(g).flags &= !IN_OPEN;
                self.open_groups.retain(|&o| o != g);
            }
            // The pin may have been in the batch that failed: stage it again, so it reaches
            // the store with the next commit (the store keeps an older owner if it has one).
            if let Some(owner) = self.group(g).owner() {
                let owner = owner.to_owned();
                self.open.set_owner(name, &owner);
            }
            self.store.send(Request::Forget(name.as_str().into()));
            failed.push(g);
        }
        self.drop_emptied(&failed);
        StoreEvent::Committed { deliveries, failed, commit_failed, took, changes }
    }

    /// Groups nobody is connected to leave memory once their changes are on disk; one that
    /// just failed at a later flush, so that the caller can still name it.
    fn drop_emptied(&mut self, failed: &[GroupRef]) {
        for g in std::mem::take(&mut self.emptied) {
            let i = g.index();
            let Some(group) = self.groups.get(i) else { continue };
            if group.connections != 0 {
                continue;
            }
            if failed.contains(&g) || group.has(IN_OPEN | IN_FLIGHT | LOADING) {
                self.emptied.push(g);
                continue;
            }
            let group = self.groups.remove(i).expect("a group just looked at");
            self.by_name.remove(group.name(), i);
            self.mutations.forget_group(group.name());
            self.store.send(Request::Forget(group.name().into()));
        }
    }

    /// Whether [`GroupSync::flush`] has something to do now.
    pub fn has_pending(&self) -> bool {
        self.in_flight.is_none()
            && (!self.outbox.is_empty() || !self.open.is_empty() || !self.emptied.is_empty())
    }

    /// Whether a batch is on the store thread (the worker waits for it before it exits).
    pub fn syncing(&self) -> bool {
        self.in_flight.is_some()
    }
}

/// Frames each payload into one buffer: binary chunks (protocol 52) are binary frames, the
/// rest text.
fn frames_of(payloads: &[Vec<u8>]) -> Frames {
    let len = payloads.iter().map(|p| p.len() + frame::MAX_SERVER_HEADER).sum();
    let mut out = Vec::with_capacity(len);
    for p in payloads {
        let opcode = if poke::is_binary_payload(p) { OpCode::Binary } else { OpCode::Text };
        frame::encode_frame(&mut out, opcode, p, false);
    }
    Rc::from(out)
}

fn corrupt(group_id: &str, message: String) -> StoreError {
    // Never reset silently: the client is told, the file is left for an operator to look at.
    StoreError::Corrupt { group_id: group_id.to_owned(), message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{parse_upstream, Upstream};
    use crate::testing::TempDir;

    fn upstream(text: &str) -> Upstream {
        parse_upstream(&mut text.as_bytes().to_vec()).unwrap()
    }

    /// Client c1's push of mutation `id` to group g: an upsert of row `a` with `n = id`.
    fn push(id: u64) -> PushBody {
        let Upstream::Push(push) = upstream(&format!(
            r#"["push",{{"clientGroupID":"g","pushVersion":1,"timestamp":1,"requestID":"r",
            "mutations":[{{"type":"crud","id":{id},"clientID":"c1","name":"_zero_crud","timestamp":1,
            "args":[{{"ops":[{{"op":"upsert","tableName":"t","primaryKey":["id"],"value":{{"id":"a","n":{id}}}}}]}}]}}]}}]"#
        )) else {
            panic!("not a push")
        };
        push
    }

    /// An `initConnection` that desires no query.
    fn init() -> InitConnectionBody {
        let Upstream::InitConnection(init) =
            upstream(r#"["initConnection",{"desiredQueriesPatch":[]}]"#)
        else {
            panic!("not initConnection")
        };
        init
    }

    fn open(dir: &TempDir) -> GroupSync {
        open_with(dir, crate::config::Storage::default().max_pending_bytes)
    }

    fn open_with(dir: &TempDir, max_pending_bytes: usize) -> GroupSync {
        let (limits, window) = (replica::GroupLimits::default(), Duration::from_secs(60));
        let delay = Duration::ZERO;
        GroupSync::open(
            &dir.0,
            1,
            "store".into(),
            delay,
            None,
            limits,
            0,
            window,
            max_pending_bytes,
        )
        .unwrap()
    }

    /// Group `g` in memory with one member, client `c1` (protocol 51), its catch-up done.
    fn one_member(sync: &mut GroupSync) -> Who<'static> {
        let g = load(sync, "g");
        sync.join(g, None);
        let who = Who { slot: 0, serial: 0, client_id: "c1", group: g, version: 51 };
        sync.on_init(&who, None, 0, &init());
        settle(sync);
        who
    }

    /// The group, waiting for the store thread if it is not in memory.
    fn load(sync: &mut GroupSync, name: &str) -> GroupRef {
        if let Loading::Ready(g) = sync.load(name) {
            return g;
        }
        match sync.wait_store() {
            StoreEvent::Loaded { name: loaded, result } if &*loaded == name => result.unwrap(),
            _ => panic!("the load of {name} answers first"),
        }
    }

    /// The end of an iteration, and the commit it started: what was delivered, what failed.
    fn settle(sync: &mut GroupSync) -> (Vec<Delivery>, Vec<GroupRef>) {
        let out = sync.flush();
        if !sync.syncing() {
            return (out, Vec::new());
        }
        assert!(out.is_empty(), "nothing goes out before the commit");
        match sync.wait_store() {
            StoreEvent::Committed { deliveries, failed, .. } => (deliveries, failed),
            StoreEvent::Loaded { .. } | StoreEvent::LogUsed { .. } => {
                panic!("no load or mode was asked for")
            }
        }
    }

    #[test]
    fn a_group_holds_a_replica_only_once_something_changed() {
        let dir = TempDir::new();
        let mut sync = open(&dir);
        let g = load(&mut sync, "g");
        sync.join(g, None);
        let who = Who { slot: 0, serial: 1, client_id: "c1", group: g, version: 51 };
        let Upstream::InitConnection(init) =
            upstream(r#"["initConnection",{"desiredQueriesPatch":[]}]"#)
        else {
            panic!("not initConnection")
        };
        sync.on_init(&who, None, 0, &init);
        sync.on_queries(&who, &[]);
        assert!(sync.group(g).replica.is_none(), "an idle client of a new group");
        let (out, failed) = settle(&mut sync);
        assert!(failed.is_empty());
        assert_eq!(out.len(), 1, "the new client still gets its catch-up poke");

        let Upstream::Push(push) = upstream(
            r#"["push",{"clientGroupID":"g","pushVersion":1,"timestamp":1,"requestID":"r",
            "mutations":[{"type":"crud","id":1,"clientID":"c1","name":"_zero_crud","timestamp":1,
            "args":[{"ops":[{"op":"insert","tableName":"t","primaryKey":["id"],"value":{"id":"a"}}]}]}]}]"#,
        ) else {
            panic!("not a push")
        };
        sync.on_push(&who, Pusher::Claimed("c1"), push, Instant::now());
        assert_eq!(sync.group(g).replica.as_ref().map(|r| r.version()), Some(1));
        let (out, _) = settle(&mut sync);
        assert_eq!(out.len(), 1, "the poke of the insert");
        // A later connection of the group loads what was stored.
        sync.left(g, 0);
        settle(&mut sync);
        assert!(sync.groups.is_empty() && sync.by_name.is_empty(), "the group left memory");
        let g = load(&mut sync, "g");
        assert_eq!(sync.group(g).replica.as_ref().map(|r| r.version()), Some(1));
    }

    #[test]
    fn the_pin_outlives_the_group_in_memory_and_the_process() {
        let dir = TempDir::new();
        let mut sync = open(&dir);
        let g = load(&mut sync, "g");
        assert_eq!(sync.owner(g), None);
        sync.join(g, Some("alice"));
        sync.join(g, Some("bob"));
        assert_eq!(sync.owner(g), Some("alice"), "the first verified user pins it");
        assert_eq!((sync.name(g), sync.connections(g)), ("g", 2));
        sync.left(g, 0);
        sync.left(g, 1);
        settle(&mut sync);
        assert!(sync.groups.is_empty(), "the group left memory");
        let g = load(&mut sync, "g");
        assert_eq!(sync.owner(g), Some("alice"), "read back from the store");
        drop(sync);
        let mut sync = open(&dir);
        let g = load(&mut sync, "g");
        assert_eq!(sync.owner(g), Some("alice"), "and after a restart");
        // An owner whose name is empty is still an owner.
        let h = load(&mut sync, "h");
        sync.join(h, Some(""));
        assert_eq!(sync.owner(h), Some(""));
    }

    #[test]
    fn a_group_changed_by_another_process_goes_stale_and_loads_again() {
        let dir = TempDir::new();
        let (mut a, mut b) = (open(&dir), open(&dir));
        let now = Instant::now();
        let ga = load(&mut a, "g");
        a.join(ga, Some("alice"));
        let who_a = Who { slot: 0, serial: 0, client_id: "c1", group: ga, version: 51 };
        a.on_init(&who_a, None, 0, &init());
        a.on_push(&who_a, Pusher::Verified, push(1), now);
        settle(&mut a);
        // Another process (a worker of a graceful replacement) writes the group meanwhile.
        let gb = load(&mut b, "g");
        b.join(gb, Some("alice"));
        let who_b = Who { slot: 0, serial: 0, client_id: "c1", group: gb, version: 51 };
        b.on_push(&who_b, Pusher::Verified, push(2), now);
        assert!(settle(&mut b).1.is_empty());
        // A's next push (its client's next mutation, for A) finds the group stale.
        a.on_push(&who_a, Pusher::Verified, push(2), now);
        let (out, failed) = settle(&mut a);
        assert_eq!(failed, [ga]);
        assert!(out.is_empty(), "nothing is delivered for a stale group: {}", out.len());
        // Its next load (a newcomer, or the rehomed client) reads what the other wrote.
        assert_eq!(load(&mut a, "g"), ga);
        assert_eq!(a.group(ga).replica.as_ref().map(|r| r.version()), Some(2));
        assert_eq!(a.owner(ga), Some("alice"), "the pin stayed");
        // Stale again, and its last connection leaves in the same iteration: the group is
        // still there for the caller to name, and gone at the next flush.
        b.on_push(&who_b, Pusher::Verified, push(3), now);
        assert!(settle(&mut b).1.is_empty());
        a.on_push(&who_a, Pusher::Verified, push(3), now);
        a.left(ga, 0);
        assert_eq!(settle(&mut a).1, [ga]);
        assert_eq!(a.name(ga), "g");
        settle(&mut a);
        assert!(a.groups.is_empty(), "gone at the next flush");
        let ga = load(&mut a, "g");
        assert_eq!(a.group(ga).replica.as_ref().map(|r| r.version()), Some(3));
        assert_eq!(a.owner(ga), Some("alice"));
    }

    #[test]
    fn what_arrives_during_a_commit_waits_for_the_next_one_in_order() {
        let dir = TempDir::new();
        let mut sync = open(&dir);
        let now = Instant::now();
        let who = one_member(&mut sync);
        sync.on_push(&who, Pusher::Anonymous, push(1), now);
        assert!(sync.flush().is_empty(), "the poke waits for its commit");
        assert!(sync.syncing());
        // Two more pushes while the first batch is on the store thread: both go into the
        // next batch, and nothing of theirs is handed out early.
        sync.on_push(&who, Pusher::Anonymous, push(2), now);
        assert!(sync.flush().is_empty());
        sync.on_push(&who, Pusher::Anonymous, push(3), now);
        assert!(!sync.has_pending(), "nothing to do until the commit answers");
        let pokes = |deliveries: &[Delivery]| -> Vec<String> {
            deliveries
                .iter()
                .map(|d| match d {
                    Delivery::Frames { frames, .. } => String::from_utf8_lossy(frames).into(),
                    Delivery::Error { message, .. } => message.clone(),
                })
                .collect()
        };
        let StoreEvent::Committed { deliveries, failed, changes, .. } = sync.wait_store() else {
            panic!("the commit answers")
        };
        assert!(failed.is_empty());
        assert_eq!(changes, 1);
        let first = pokes(&deliveries);
        assert_eq!(first.len(), 1, "{first:?}");
        assert!(first[0].contains(r#""n":1"#), "{first:?}");
        let (deliveries, failed) = settle(&mut sync);
        assert!(failed.is_empty());
        let next = pokes(&deliveries);
        assert_eq!(next.len(), 2, "one batch for both: {next:?}");
        assert!(next[0].contains(r#""n":2"#) && next[1].contains(r#""n":3"#), "{next:?}");
        // All three are on disk: a second process loads version 3.
        let mut other = open(&dir);
        let g = load(&mut other, "g");
        assert_eq!(other.group(g).replica.as_ref().map(|r| r.version()), Some(3));
    }

    /// While a batch is in flight, pushes fill the next one up to `max_pending_bytes`; the
    /// push that finds it full is refused whole (`ServerOverloaded`, close) and changes
    /// nothing; once the commit answers, pushes are taken again.
    #[test]
    fn a_push_that_finds_the_store_behind_is_refused_and_changes_nothing() {
        let dir = TempDir::new();
        // Room for two pushes of the test's size (about 120 bytes of patch each) behind the
        // batch in flight.
        let mut sync = open_with(&dir, 200);
        let now = Instant::now();
        let who = one_member(&mut sync);
        let g = who.group;
        sync.on_push(&who, Pusher::Anonymous, push(1), now);
        assert!(sync.flush().is_empty(), "batch 1 in flight");
        sync.on_push(&who, Pusher::Anonymous, push(2), now);
        sync.on_push(&who, Pusher::Anonymous, push(3), now);
        assert!(sync.open_bytes >= 200, "{} bytes staged", sync.open_bytes);
        sync.on_push(&who, Pusher::Anonymous, push(4), now);
        let version = |sync: &mut GroupSync| sync.group(g).replica.as_ref().map(|r| r.version());
        assert_eq!(version(&mut sync), Some(3), "the refused push changed nothing");
        // The refusal waits behind the commit, like everything else for this connection.
        let StoreEvent::Committed { .. } = sync.wait_store() else { panic!("the commit answers") };
        let (deliveries, failed) = settle(&mut sync);
        assert!(failed.is_empty());
        let refusal = deliveries.iter().find_map(|d| match d {
            Delivery::Error { kind, close, message, .. } => Some((*kind, *close, message.clone())),
            Delivery::Frames { .. } => None,
        });
        let (kind, close, message) = refusal.expect("the fourth push is refused");
        assert_eq!((kind, close), (ErrorKind::ServerOverloaded, true), "{message}");
        assert!(message.contains("the store is behind"), "{message}");
        // Nothing in flight now: the client's next push (after reconnecting) is taken.
        sync.on_push(&who, Pusher::Anonymous, push(4), now);
        assert_eq!(version(&mut sync), Some(4));
    }

    /// The crash a connection storm found: a load's answer and a commit's answer arrived
    /// together, and reading both before the newcomer joined its group let the commit's
    /// answer drop the group the load had just brought in.
    #[test]
    fn a_group_just_loaded_is_still_there_when_a_commit_answers_right_behind() {
        let dir = TempDir::new();
        let mut sync = open(&dir);
        let g = load(&mut sync, "g");
        sync.join(g, Some("alice"));
        assert_eq!(sync.load("x"), Loading::Waiting);
        // The pin of g is the batch; its commit is asked for after the load of x.
        assert!(sync.flush().is_empty());
        // Both answers are in before the worker looks at either.
        let (first, second) = (sync.store.wait(), sync.store.wait());
        sync.replies.extend([first, second]);
        let Some(StoreEvent::Loaded { result: Ok(x), .. }) = sync.next_store_event() else {
            panic!("the load answers first")
        };
        assert_eq!(sync.name(x), "x");
        sync.join(x, None);
        assert!(matches!(sync.next_store_event(), Some(StoreEvent::Committed { .. })));
        assert_eq!(sync.name(x), "x", "joined before the commit's answer: still in memory");
        assert!(sync.next_store_event().is_none());
    }

    #[test]
    fn members_go_inline_then_to_the_heap_and_back() {
        let member = |slot| Member { to: To { slot, serial: 0 }, format: PokeFormat::Json };
        let slots = |m: &Members| m.as_slice().iter().map(|m| m.to.slot).collect::<Vec<_>>();
        let mut m = Members::default();
        m.push(member(1));
        assert!(matches!(m, Members::One(_)));
        m.push(member(2));
        m.push(member(3));
        assert_eq!(slots(&m), [1, 2, 3]);
        m.remove(2);
        m.remove(9);
        assert_eq!(slots(&m), [1, 3]);
        m.remove(1);
        assert!(matches!(m, Members::One(_)), "one left: inline again");
        m.remove(3);
        assert!(matches!(m, Members::None));
        // What a group costs, once per client group (often one per connection).
        assert!(std::mem::size_of::<Members>() <= 16);
        assert!(std::mem::size_of::<Option<Group>>() <= 48, "{}", std::mem::size_of::<Group>());
    }

    #[test]
    fn a_group_nobody_joined_leaves_at_the_next_flush() {
        let dir = TempDir::new();
        let mut sync = open(&dir);
        let a = load(&mut sync, "a");
        let b = load(&mut sync, "b");
        assert_eq!(load(&mut sync, "a"), a, "loading again finds it");
        sync.join(b, None);
        settle(&mut sync);
        assert_eq!(sync.groups.len(), 1);
        assert_eq!(sync.name(b), "b");
        let a = load(&mut sync, "a");
        assert_ne!(sync.name(a), sync.name(b));
    }
}
