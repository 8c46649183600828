//! Client-group sync on one worker: the replicas of the groups this worker owns, their
//! durable store, and the pokes that fan their changes out.
//!
//! The worker hands it what its connections asked for ([`Notice`](crate::connection::Notice)s)
//! and, once per loop iteration, calls [`GroupSync::flush`]: one SQLite commit for every
//! group changed in the iteration (the fsync), then the deliveries. A poke is therefore never
//! sent before the change it carries is on disk, and many groups share one fsync.
//!
//! Each poke is encoded once per wire format (text for protocol <= 51, binary chunks for 52)
//! and the same frames go to every recipient.

use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::frame::{self, OpCode};
use crate::limits::MutationLimiter;
use crate::protocol::{ErrorKind, InitConnectionBody, PushBody, QueriesPatchOp};
use crate::replica::{self, CatchUp, Change, PokeFormat, PushResult, Replica};
use crate::store::Store;

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
    pub serial: u64,
}

impl Delivery {
    pub fn to(&self) -> To {
        match self {
            Delivery::Frames { to, .. } | Delivery::Error { to, .. } => *to,
        }
    }
}

/// A connection that receives a group's pokes.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Member {
    to: To,
    format: PokeFormat,
}

struct Group {
    /// `None` while the group is pristine (version 0: nothing stored, no client known).
    /// Most connections are idle, often each in a group of its own: an empty replica for
    /// each would cost them a few hundred bytes apiece for nothing.
    replica: Option<Box<Replica>>,
    /// The connections its pokes go to.
    members: Vec<Member>,
    /// Admitted connections of the group, members or not yet; the group leaves memory when
    /// this reaches zero (after the commit of its last change).
    connections: usize,
}

impl Group {
    /// Runs `f` on the group's replica, a fresh one if it has none; a replica still pristine
    /// afterwards is dropped again, so the group costs only its members.
    fn with_replica<T>(
        &mut self,
        group_id: &str,
        limits: &replica::Limits,
        f: impl FnOnce(&mut Replica) -> T,
    ) -> T {
        let replica =
            self.replica.get_or_insert_with(|| Box::new(Replica::new(group_id, limits.clone())));
        let result = f(replica);
        if replica.is_pristine() {
            self.replica = None;
        }
        result
    }
}

pub struct GroupSync {
    store: Store,
    groups: HashMap<Rc<str>, Group>,
    /// Groups that had no connection at some point since the last flush (loaded for a
    /// newcomer, or left by their last connection): the flush drops those still without one,
    /// after their changes are on disk. Without it, a group nobody writes to would stay in
    /// memory after its last client left (nothing else makes a flush), and a client could
    /// grow the worker by connecting under ever new clientGroupIDs. A list, so a flush
    /// looks at these groups only, not at every group in memory.
    emptied: Vec<Rc<str>>,
    outbox: Vec<Delivery>,
    limits: replica::Limits,
    mutations: MutationLimiter,
}

/// The connection a notice came from, as far as group sync cares.
pub struct Who<'a> {
    pub slot: u32,
    /// Tells this connection from a later one that reuses its slot.
    pub serial: u64,
    pub client_id: &'a str,
    pub group_id: &'a Rc<str>,
    pub version: u32,
}

impl Who<'_> {
    fn to(&self) -> To {
        To { slot: self.slot, serial: self.serial }
    }
}

impl GroupSync {
    pub fn open(
        dir: &Path,
        limits: replica::Limits,
        per_user_mutations: u32,
        window: Duration,
    ) -> Result<GroupSync, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("storage.path {}: {e}", dir.display()))?;
        Ok(GroupSync {
            store: Store::open(dir)?,
            groups: HashMap::new(),
            emptied: Vec::new(),
            outbox: Vec::new(),
            limits,
            mutations: MutationLimiter::new(per_user_mutations, window),
        })
    }

    pub fn set_mutation_limit(&mut self, max: u32, window: Duration) {
        self.mutations.set_limits(max, window);
    }

    /// New bounds for the groups' data (a reload), applied to the loaded groups too.
    pub fn set_group_limits(&mut self, limits: replica::Limits) {
        for replica in self.groups.values_mut().filter_map(|g| g.replica.as_mut()) {
            replica.set_limits(limits.clone());
        }
        self.limits = limits;
    }

    /// Loads `group_id` if it is not in memory; returns its pinned owner.
    pub fn load(&mut self, group_id: &Rc<str>) -> Result<Option<String>, String> {
        if self.groups.contains_key(group_id) {
            return Ok(None);
        }
        let (replica, owner) = match self.store.load(group_id)? {
            Some(stored) => {
                let replica =
                    Replica::from_snapshot(group_id, self.limits.clone(), stored.snapshot)?;
                (Some(Box::new(replica)), stored.owner)
            }
            None => (None, None),
        };
        self.groups
            .insert(group_id.clone(), Group { replica, members: Vec::new(), connections: 0 });
        // Dropped again at the flush if the newcomer is not admitted (or not yet).
        self.emptied.push(group_id.clone());
        Ok(owner)
    }

    /// Pins a group to its first verified user, durably.
    pub fn set_owner(&mut self, group_id: &str, user: &str) {
        self.store.set_owner(group_id, user);
    }

    /// An admitted connection of a loaded group.
    pub fn admitted(&mut self, group_id: &str) {
        if let Some(g) = self.groups.get_mut(group_id) {
            g.connections += 1;
        }
    }

    /// A connection of the group ended.
    pub fn left(&mut self, slot: u32, group_id: &str) {
        let Some(g) = self.groups.get_mut(group_id) else { return };
        g.members.retain(|m| m.to.slot != slot);
        g.connections = g.connections.saturating_sub(1);
        if g.connections == 0 {
            if let Some((id, _)) = self.groups.get_key_value(group_id) {
                self.emptied.push(id.clone());
            }
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
        let Some(g) = self.groups.get_mut(&**who.group_id) else { return };
        let format = PokeFormat::for_protocol(who.version);
        let checked = g.with_replica(who.group_id, &self.limits, |r| {
            r.check_connect(who.client_id, base_cookie, lmid)
        });
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
                let payloads = replica::encode_poke_as(&poke, format);
                let (frames, messages) = (frames_of(&payloads), payloads.len() as u64);
                self.outbox.push(Delivery::Frames { to: who.to(), frames, messages });
            }
            Ok(CatchUp::Nothing) => {}
        }
        if g.members.is_empty() {
            // Most groups have one member: room for exactly one, not the default four.
            g.members.reserve_exact(1);
        }
        g.members.push(Member { to: who.to(), format });
        if let Some(deleted) = &body.deleted {
            self.on_delete_clients(who.group_id, deleted.client_ids.as_deref().unwrap_or_default());
        }
        self.on_queries(who, &body.desired_queries_patch);
    }

    pub fn on_queries(&mut self, who: &Who<'_>, ops: &[QueriesPatchOp]) {
        let Some(g) = self.groups.get_mut(&**who.group_id) else { return };
        let changed = g.with_replica(who.group_id, &self.limits, |r| {
            r.change_desired_queries(who.client_id, ops)
        });
        match changed {
            Ok(Some(change)) => self.broadcast(who.group_id, change),
            Ok(None) => {}
            Err((kind, message)) => {
                self.outbox.push(Delivery::Error { to: who.to(), kind, message, close: true });
            }
        }
    }

    pub fn on_delete_clients(&mut self, group_id: &Rc<str>, client_ids: &[String]) {
        let Some(g) = self.groups.get_mut(&**group_id) else { return };
        let changed = g.with_replica(group_id, &self.limits, |r| r.delete_clients(client_ids));
        if let Some(change) = changed {
            self.broadcast(group_id, change);
        }
    }

    /// A push: each mutation in order, under the per-user mutation limit.
    pub fn on_push(&mut self, who: &Who<'_>, user_key: &str, push: &PushBody, now: Instant) {
        for mutation in &push.mutations {
            if let Err(wait) = self.mutations.check(user_key, who.group_id, now) {
                let message = format!(
                    "mutation rate limit exceeded; retry in {} ms",
                    wait.as_millis().max(1)
                );
                let kind = ErrorKind::MutationRateLimited;
                return self.outbox.push(Delivery::Error {
                    to: who.to(),
                    kind,
                    message,
                    close: false,
                });
            }
            let Some(g) = self.groups.get_mut(&**who.group_id) else { return };
            let result = g.with_replica(who.group_id, &self.limits, |r| r.apply_push(mutation));
            match result {
                PushResult::Applied(change) => self.broadcast(who.group_id, change),
                PushResult::AlreadyProcessed => {}
                PushResult::Failed { change, message }
                | PushResult::LimitExceeded { change, message } => {
                    self.broadcast(who.group_id, change);
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
    fn broadcast(&mut self, group_id: &str, change: Change) {
        self.store.stage(group_id, &change);
        let Some(g) = self.groups.get(group_id) else { return };
        let poke = change.poke();
        let mut encoded: [Option<(Frames, u64)>; 2] = [None, None];
        for m in &g.members {
            let i = (m.format == PokeFormat::Binary) as usize;
            let (frames, messages) = encoded[i]
                .get_or_insert_with(|| {
                    let payloads = replica::encode_poke_as(&poke, m.format);
                    (frames_of(&payloads), payloads.len() as u64)
                })
                .clone();
            self.outbox.push(Delivery::Frames { to: m.to, frames, messages });
        }
    }

    /// Commits what the iteration changed, then hands out the deliveries. Groups whose commit
    /// failed or that another process changed meanwhile are returned: their connections must
    /// reconnect (and load the current state); nothing queued for them is delivered.
    pub fn flush(&mut self) -> (Vec<Delivery>, Vec<String>) {
        let mut failed = Vec::new();
        if self.store.has_staged() {
            match self.store.commit() {
                Ok(committed) => failed = committed.stale_groups,
                Err(e) => {
                    log::error!("storage commit failed: {}", e.message);
                    failed = e.groups;
                }
            }
        }
        let mut out = std::mem::take(&mut self.outbox);
        if !failed.is_empty() {
            for group in &failed {
                self.store.forget(group);
            }
            let dead: Vec<To> = failed
                .iter()
                .filter_map(|g| self.groups.remove(g.as_str()))
                .flat_map(|g| g.members.into_iter().map(|m| m.to))
                .collect();
            out.retain(|d| !dead.contains(&d.to()));
        }
        // Groups nobody is connected to leave memory once their changes are on disk.
        for id in std::mem::take(&mut self.emptied) {
            if self.groups.get(&id).is_some_and(|g| g.connections == 0) {
                self.groups.remove(&id);
                self.mutations.forget_group(&id);
                self.store.forget(&id);
            }
        }
        (out, failed)
    }

    pub fn has_pending(&self) -> bool {
        !self.outbox.is_empty() || self.store.has_staged() || !self.emptied.is_empty()
    }
}

/// Frames each payload into one buffer: binary chunks (protocol 52) are binary frames, the
/// rest text.
fn frames_of(payloads: &[Vec<u8>]) -> Frames {
    let len = payloads.iter().map(|p| p.len() + frame::MAX_SERVER_HEADER).sum();
    let mut out = Vec::with_capacity(len);
    for p in payloads {
        let opcode = if replica::is_binary_payload(p) { OpCode::Binary } else { OpCode::Text };
        frame::encode_frame(&mut out, opcode, p, false);
    }
    Rc::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{parse_upstream, Upstream};
    use crate::store::tests::TempDir;

    fn upstream(text: &str) -> Upstream {
        parse_upstream(&mut text.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn a_group_holds_a_replica_only_once_something_changed() {
        let dir = TempDir::new();
        let mut sync =
            GroupSync::open(&dir.0, replica::Limits::default(), 0, Duration::from_secs(60))
                .unwrap();
        let g: Rc<str> = Rc::from("g");
        sync.load(&g).unwrap();
        sync.admitted("g");
        let who = Who { slot: 0, serial: 1, client_id: "c1", group_id: &g, version: 51 };
        let Upstream::InitConnection(init) =
            upstream(r#"["initConnection",{"desiredQueriesPatch":[]}]"#)
        else {
            panic!("not initConnection")
        };
        sync.on_init(&who, None, 0, &init);
        sync.on_queries(&who, &[]);
        assert!(sync.groups["g"].replica.is_none(), "an idle client of a new group");
        let (out, failed) = sync.flush();
        assert!(failed.is_empty());
        assert_eq!(out.len(), 1, "the new client still gets its catch-up poke");

        let Upstream::Push(push) = upstream(
            r#"["push",{"clientGroupID":"g","pushVersion":1,"timestamp":1,"requestID":"r",
            "mutations":[{"type":"crud","id":1,"clientID":"c1","name":"_zero_crud","timestamp":1,
            "args":[{"ops":[{"op":"insert","tableName":"t","primaryKey":["id"],"value":{"id":"a"}}]}]}]}]"#,
        ) else {
            panic!("not a push")
        };
        sync.on_push(&who, "c1", &push, Instant::now());
        assert_eq!(sync.groups["g"].replica.as_ref().map(|r| r.version()), Some(1));
        let (out, _) = sync.flush();
        assert_eq!(out.len(), 1, "the poke of the insert");
        // A later connection of the group loads what was stored.
        sync.left(0, "g");
        sync.flush();
        assert!(!sync.groups.contains_key("g"));
        sync.load(&g).unwrap();
        assert_eq!(sync.groups["g"].replica.as_ref().map(|r| r.version()), Some(1));
    }
}
