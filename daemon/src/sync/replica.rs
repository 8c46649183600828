//! The data of one client group, changed by CRUD mutations and sent to the
//! group's clients as pokes, without any I/O.
//!
//! zero-cache keeps a group's data in Postgres and a "client view record"
//! (CVR) of what each group has seen; a Zero client only ever sees the result:
//! pokes that move it from one cookie (version) to the next. syncgate has no
//! upstream database, so a [`Replica`] is the whole truth for its group: the
//! rows (by table and primary key), the last mutation ID of every client, the
//! queries each client desires, a version, and a bounded history of recent
//! changes so that a reconnecting client gets only what it missed. Every row
//! of a group goes to every client of the group, so each desired query is
//! complete as soon as the server has acknowledged it ("got" it).
//!
//! Every state change returns a [`Change`]: the caller stages it in the store
//! (`crate::sync::store`), commits, and only then sends the change's poke to every connection of
//! the group. [`encode_poke`](crate::protocol::poke::encode_poke) turns a poke into the payloads of
//! the WebSocket messages to send; one encoding serves every recipient with the same
//! [`PokeFormat`](crate::protocol::poke::PokeFormat).
//!
//! The semantics follow zero-cache (rocicorp/mono) and the Zero client:
//!
//! - Cookies are zero-cache's "LexiVersion" of the version: one base-36 digit
//!   giving the length minus one, then the version in base 36 ("00", "01", …
//!   "0z", "110"). The client compares cookies as strings (Replicache's
//!   `compareCookies`, and a poke whose `baseCookie` sorts after the previous
//!   poke's cookie is a "cookie gap"), so string order must be version order.
//!   The format keeps cookies short (the capture shows "01", "02", "03") and
//!   is the one real clients already hold; `null` means "nothing yet".
//! - CRUD ops behave like the SQL zero-cache runs: `insert` of an existing row
//!   fails the whole mutation (a duplicate key), `upsert` inserts or overwrites
//!   the given columns, `update` overwrites the given columns of an existing
//!   row and is a no-op without one, `delete` is a no-op without a row. A
//!   failed mutation still advances the client's last mutation ID (zero-cache
//!   reruns it in "error mode") and the client gets a `MutationFailed` error.
//! - A mutation ID at or below the client's last one was already processed
//!   and is ignored; one beyond the next is a fatal `InvalidPush`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use crate::protocol::cookie::{cookie_to_version, key_columns, row_key, version_to_cookie};
use crate::protocol::json;
use crate::protocol::poke::{DesiredQuery, Patch, Poke, Row, RowsPatch};
use crate::protocol::{
    CrudOp, CrudOpKind, ErrorKind, Mutation, MutationKind, QueriesPatchOp, CRUD_MUTATION_NAME,
};

/// The refusal of a custom mutation: zero-cache answers a fatal
/// `InvalidPush` when no mutate endpoint is configured, and syncgate has none.
const CUSTOM_MUTATION_REFUSED: &str = "custom mutations need a mutate endpoint \
    (zero-cache's ZERO_MUTATE_URL) and this server has none: use CRUD mutations";

/// Longest client ID or query hash a group remembers. Zero's are 13 to 21
/// characters; without a bound, long made-up IDs would let a client grow the
/// group's bookkeeping far beyond what `max_clients` and
/// `max_queries_per_client` suggest.
pub const MAX_ID_BYTES: usize = 256;

/// How large one client group may grow. Every bound has a clear error when a
/// change would cross it; state already over a bound (after the operator
/// lowered it) may still shrink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLimits {
    /// Rows in the group, over all tables. A mutation that would exceed it
    /// fails (`MutationFailed`); the group stays usable.
    pub max_rows: usize,
    /// Bytes of row data in the group (table name, key and JSON of each
    /// row): bounds the worker's memory per group and the first poke of a
    /// new client.
    pub max_row_bytes: usize,
    /// Changes kept for catch-up. A client whose cookie is older than the
    /// oldest kept change cannot catch up and must resync.
    pub max_history: usize,
    /// Bytes of history kept (the changes' JSON); the oldest changes go first.
    pub max_history_bytes: usize,
    /// Clients the group remembers (last mutation IDs and desired queries),
    /// so that many made-up client IDs cannot grow the group without limit.
    pub max_clients: usize,
    /// Desired queries of one client.
    pub max_queries_per_client: usize,
}

impl Default for GroupLimits {
    fn default() -> Self {
        GroupLimits {
            // A group is one user's data on their devices; 100k rows is far
            // beyond the apps Zero's CRUD mutators are meant for.
            max_rows: 100_000,
            // 64 MiB also bounds the full poke a new client receives.
            max_row_bytes: 64 << 20,
            // About a day of a busy client's edits at a few a minute, so a
            // laptop reopened the next morning still catches up.
            max_history: 1_000,
            max_history_bytes: 16 << 20,
            // Each tab or device is a client; the client deletes old ones.
            max_clients: 1_000,
            // zero-cache does not limit this; real apps use dozens.
            max_queries_per_client: 1_000,
        }
    }
}

/// One accepted change of a group's state, returned by the methods that
/// change a [`Replica`]. The caller stages it in the store, and after the
/// commit sends [`Change::poke`] to every connection of the group.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The version before the change: the cookie clients hold now. The store
    /// refuses the change if the file holds another version of the group
    /// (another process changed it).
    pub base_version: u64,
    /// The version after the change.
    pub version: u64,
    /// What changed, for the poke and the store.
    pub patch: Arc<Patch>,
    /// The patch as JSON ([`Patch::to_json`]), written once: the history entry keeps it and
    /// the store writes it.
    pub json: Arc<str>,
    /// Clients the group forgot (`deleteClients`): the store deletes their
    /// records. Not part of the poke: the client that asked already dropped
    /// them locally.
    pub forgotten_clients: Vec<String>,
    /// The oldest version a client may hold and still catch up, after this
    /// change; the store deletes the history at or below it.
    pub history_floor: u64,
}

impl Change {
    /// The poke that moves every connected client from the base version to
    /// the new one.
    pub fn poke(&self) -> Poke {
        let cookie = version_to_cookie(self.version);
        Poke {
            poke_id: cookie.clone(),
            base_cookie: Some(version_to_cookie(self.base_version)),
            cookie,
            patch: Arc::clone(&self.patch),
        }
    }
}

/// What a connecting client needs before it is up to date.
#[derive(Debug, Clone, PartialEq)]
pub enum CatchUp {
    /// Its cookie is the current one.
    Nothing,
    /// Send this poke first: everything (the client had no cookie) or what
    /// changed since its cookie.
    Poke(Poke),
}

/// The outcome of one mutation of a `push`.
#[derive(Debug, Clone, PartialEq)]
pub enum PushResult {
    /// Applied: stage, commit, send the poke.
    Applied(Change),
    /// The mutation ID is at or below the client's last one: a resend after
    /// a reconnect. Nothing to do.
    AlreadyProcessed,
    /// The mutation ID skips ahead: send `InvalidPush` with this text and
    /// close, as zero-cache does. Nothing changed.
    Gap(String),
    /// An op failed (e.g. insert of an existing row): no row changed, but the
    /// client's last mutation ID advanced (the change carries it). Stage,
    /// commit and poke as for `Applied`, and send the pushing connection a
    /// `MutationFailed` error with this message, without closing.
    Failed {
        /// The change that advances the last mutation ID.
        change: Change,
        /// Why the op failed.
        message: String,
    },
    /// The mutation would take the group over a row limit: handled exactly
    /// like `Failed` (last mutation ID advanced, `MutationFailed`, stay
    /// open); a separate variant so that it can be counted.
    LimitExceeded {
        /// The change that advances the last mutation ID.
        change: Change,
        /// Which limit, and by how much.
        message: String,
    },
    /// Refused without any change: send `InvalidPush` with this text and
    /// close (a custom mutation, or a new client in a group that already
    /// remembers `max_clients` clients).
    Refused(String),
}

/// A group's state as plain data: what the store loads and saves.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReplicaSnapshot {
    /// The current version.
    pub version: u64,
    /// Rows: table, then row key, then the row.
    pub rows: BTreeMap<String, BTreeMap<String, Row>>,
    /// Every client the group remembers.
    pub clients: BTreeMap<String, ClientSnapshot>,
    /// Recent changes, oldest first, ending at `version`.
    pub history: Vec<HistoryEntry>,
}

/// What the group remembers of one client.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClientSnapshot {
    /// The last mutation ID processed for it (0: none yet).
    pub last_mutation_id: u64,
    /// Its desired queries, by hash.
    pub desired_queries: BTreeMap<String, DesiredQuery>,
}

/// One change kept for catch-up: the patch from `version - 1` to `version`.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    /// The version this change produced.
    pub version: u64,
    /// What changed, as JSON ([`Patch::to_json`], what the store holds). A group keeps up to
    /// [`GroupLimits::max_history`] of these in memory, and only a reconnecting client reads them:
    /// as text, an entry of a small change costs its length instead of the several map nodes
    /// of a parsed `Patch`, a fraction of the memory (bench/RESULTS.md).
    pub json: Arc<str>,
}

/// One client group's data, owned by the worker that owns the group.
#[derive(Debug)]
pub struct Replica {
    /// The group's ID, for messages.
    group_id: String,
    /// The bounds this group must stay within.
    limits: GroupLimits,
    /// The current version; its cookie is what an up-to-date client holds.
    version: u64,
    /// Rows by table.
    tables: BTreeMap<String, Table>,
    /// Rows over all tables, for `max_rows`.
    row_count: usize,
    /// Sum of [`row_size`] over all rows, for `max_row_bytes`.
    row_bytes: usize,
    /// Last mutation ID and desired queries per client.
    clients: BTreeMap<String, ClientState>,
    /// For each query hash some client desires, how many clients desire it:
    /// the group "got" a query while the count is above zero.
    got_queries: BTreeMap<String, usize>,
    /// Recent changes, oldest first; versions are consecutive and the last
    /// one is `version`.
    history: VecDeque<Recorded>,
    /// Sum of the entries' sizes, for `max_history_bytes`.
    history_bytes: usize,
}

/// The rows of one table.
#[derive(Debug)]
struct Table {
    /// The primary key columns every row of the table is keyed by. Ops that
    /// name other columns fail, so that one row has one key.
    primary_key: Vec<String>,
    /// Rows by [`row_key`].
    rows: BTreeMap<String, Row>,
}

/// What the group remembers of one client.
#[derive(Debug, Default, Clone)]
struct ClientState {
    /// The last mutation ID processed for it (0: none yet).
    last_mutation_id: u64,
    /// Its desired queries, by hash.
    desired_queries: BTreeMap<String, DesiredQuery>,
}

/// A history entry and its size, so eviction need not measure it again.
#[derive(Debug)]
struct Recorded {
    /// The entry.
    entry: HistoryEntry,
    /// Its JSON length, for `max_history_bytes`.
    bytes: usize,
}

/// The row writes of one mutation, checked but not yet applied.
struct StagedRows {
    /// The new value of every row the mutation touches.
    rows: RowsPatch,
    /// Primary keys of tables the mutation creates.
    new_tables: BTreeMap<String, Vec<String>>,
}

impl Replica {
    /// An empty group at version 0.
    pub fn new(group_id: &str, limits: GroupLimits) -> Replica {
        Replica {
            group_id: group_id.to_owned(),
            limits,
            version: 0,
            tables: BTreeMap::new(),
            row_count: 0,
            row_bytes: 0,
            clients: BTreeMap::new(),
            got_queries: BTreeMap::new(),
            history: VecDeque::new(),
            history_bytes: 0,
        }
    }

    /// Rebuilds a group from stored state. Rows whose key does not match
    /// their primary key columns are refused (a corrupt store); a history
    /// that does not end at `version` without gaps is cut to the part that
    /// does. Limits are not enforced on what is loaded, only on growth.
    pub fn from_snapshot(
        group_id: &str,
        limits: GroupLimits,
        snapshot: ReplicaSnapshot,
    ) -> Result<Replica, String> {
        let mut replica = Replica::new(group_id, limits);
        replica.version = snapshot.version;
        for (table_name, rows) in snapshot.rows {
            for (key, row) in rows {
                // The key names the primary key columns; the row must hold
                // exactly the values the key was built from.
                let primary_key: Vec<String> = key_columns(&key)
                    .map(|columns| columns.into_iter().map(|(column, _)| column).collect())
                    .unwrap_or_default();
                if primary_key.is_empty()
                    || row_key(&primary_key, &row).ok().as_deref() != Some(key.as_str())
                {
                    return Err(format!("stored row {table_name} {key} does not match its key"));
                }
                let table = replica.tables.entry(table_name.clone()).or_insert_with(|| Table {
                    primary_key: primary_key.clone(),
                    rows: BTreeMap::new(),
                });
                if table.primary_key != primary_key {
                    return Err(format!("stored rows of {table_name} have different primary keys"));
                }
                replica.row_count += 1;
                replica.row_bytes += row_size(&table_name, &key, &row);
                table.rows.insert(key, row);
            }
        }
        for (client_id, client) in snapshot.clients {
            if client.last_mutation_id == 0 && client.desired_queries.is_empty() {
                continue;
            }
            for hash in client.desired_queries.keys() {
                *replica.got_queries.entry(hash.clone()).or_default() += 1;
            }
            replica.clients.insert(
                client_id,
                ClientState {
                    last_mutation_id: client.last_mutation_id,
                    desired_queries: client.desired_queries,
                },
            );
        }
        // Keep the longest run of consecutive versions that ends at the
        // current one; anything before a gap cannot be replayed.
        let mut kept: Vec<HistoryEntry> = Vec::new();
        for entry in snapshot.history.into_iter().rev() {
            let expected = kept.last().map_or(replica.version, |e| e.version - 1);
            if entry.version != expected || expected == 0 {
                break;
            }
            kept.push(entry);
        }
        for entry in kept.into_iter().rev() {
            let bytes = entry.json.len();
            replica.history_bytes += bytes;
            replica.history.push_back(Recorded { entry, bytes });
        }
        replica.trim_history();
        Ok(replica)
    }

    /// The group's state as plain data, as the store loads it.
    pub fn snapshot(&self) -> ReplicaSnapshot {
        ReplicaSnapshot {
            version: self.version,
            rows: self
                .tables
                .iter()
                .map(|(name, table)| (name.clone(), table.rows.clone()))
                .collect(),
            clients: self
                .clients
                .iter()
                .map(|(id, client)| {
                    let snapshot = ClientSnapshot {
                        last_mutation_id: client.last_mutation_id,
                        desired_queries: client.desired_queries.clone(),
                    };
                    (id.clone(), snapshot)
                })
                .collect(),
            history: self.history.iter().map(|r| r.entry.clone()).collect(),
        }
    }

    /// Applies new bounds (a reload): the history is trimmed to them at once; rows and
    /// clients over them stay, but the group cannot grow until it is back under them.
    pub fn set_limits(&mut self, limits: GroupLimits) {
        self.limits = limits;
        self.trim_history();
    }

    /// The group's ID.
    pub fn group_id(&self) -> &str {
        &self.group_id
    }

    /// Whether nothing happened to the group yet: what [`Replica::new`] makes. The caller
    /// may drop such a replica and make a new one when needed.
    pub fn is_pristine(&self) -> bool {
        self.version == 0
            && self.tables.is_empty()
            && self.clients.is_empty()
            && self.got_queries.is_empty()
            && self.history.is_empty()
    }

    /// The current version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The current cookie: what an up-to-date client holds.
    pub fn cookie(&self) -> String {
        version_to_cookie(self.version)
    }

    /// Rows in the group.
    pub fn row_count(&self) -> usize {
        self.row_count
    }

    /// Bytes of row data in the group (see [`GroupLimits::max_row_bytes`]).
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Changes kept for catch-up.
    pub fn history_len(&self) -> usize {
        self.history.len()
    }

    /// The last mutation ID processed for a client (0: none).
    pub fn last_mutation_id(&self, client_id: &str) -> u64 {
        self.clients.get(client_id).map_or(0, |c| c.last_mutation_id)
    }

    /// Applies one mutation of a `push`.
    ///
    /// The mutation counts for `mutation.client_id`, which may be any client
    /// of the group: a client also pushes the pending mutations of other
    /// clients of its group (Replicache's DD31). zero-cache looks only at the
    /// first mutation of a push to tell custom pushes from CRUD ones; the
    /// client sends one mutation per push, so the caller simply calls this
    /// for each.
    ///
    /// Taken by value: each op's row is moved into the patch, not copied (the group's
    /// table takes its own copy).
    pub fn apply_push(&mut self, mutation: Mutation) -> PushResult {
        if mutation.kind == MutationKind::Custom {
            return PushResult::Refused(CUSTOM_MUTATION_REFUSED.to_owned());
        }
        if mutation.name != CRUD_MUTATION_NAME {
            return PushResult::Refused(format!(
                "a crud mutation must be named {CRUD_MUTATION_NAME}, got {:?}",
                mutation.name
            ));
        }
        // Decoded and checked by the message parser.
        let Mutation { crud_ops: ops, client_id, .. } = mutation;
        let client_id = &client_id;
        let expected = self.last_mutation_id(client_id).saturating_add(1);
        if mutation.id < expected {
            return PushResult::AlreadyProcessed;
        }
        if mutation.id > expected {
            // zero-cache's wording, so logs read the same.
            return PushResult::Gap(format!(
                "Push contains unexpected mutation id {} for client {client_id}. \
                 Expected mutation id {expected}.",
                mutation.id
            ));
        }
        if !self.clients.contains_key(client_id) {
            if client_id.len() > MAX_ID_BYTES {
                return PushResult::Refused(format!(
                    "client IDs are limited to {MAX_ID_BYTES} bytes"
                ));
            }
            if self.clients.len() >= self.limits.max_clients {
                return PushResult::Refused(self.too_many_clients());
            }
        }

        let mut patch = Patch::default();
        patch.last_mutation_ids.insert(client_id.clone(), mutation.id);
        let staged = match self.stage_ops(ops) {
            Ok(staged) => staged,
            Err(message) => {
                let change = self.advance_only(client_id, mutation.id, patch);
                return PushResult::Failed { change, message };
            }
        };
        let (row_count, row_bytes) = self.totals_after(&staged.rows);
        if let Some(message) = self.row_limit_error(row_count, row_bytes) {
            let change = self.advance_only(client_id, mutation.id, patch);
            return PushResult::LimitExceeded { change, message };
        }
        self.apply_rows(staged, row_count, row_bytes, &mut patch);
        self.clients.entry(client_id.clone()).or_default().last_mutation_id = mutation.id;
        PushResult::Applied(self.record(patch, Vec::new()))
    }

    /// Applies the ops of a client's `desiredQueriesPatch` (from
    /// `initConnection` or `changeDesiredQueries`).
    ///
    /// Returns `Ok(None)` when nothing changed (an empty patch, as a
    /// reconnecting client sends, or queries it already had). A query a
    /// client adds becomes "got" at once: every row of the group is already
    /// synced to every client. `Err` (nothing changed) carries the error to
    /// send, and the connection should be closed: too many queries for one
    /// client, or a new client in a group at `max_clients`.
    pub fn change_desired_queries(
        &mut self,
        client_id: &str,
        ops: &[QueriesPatchOp],
    ) -> Result<Option<Change>, (ErrorKind, String)> {
        let too_long = |id: &str| id.len() > MAX_ID_BYTES;
        let long_hash =
            ops.iter().any(|op| matches!(op, QueriesPatchOp::Put(p) if too_long(&p.hash)));
        if too_long(client_id) || long_hash {
            return Err((
                ErrorKind::InvalidMessage,
                format!("client IDs and query hashes are limited to {MAX_ID_BYTES} bytes"),
            ));
        }
        let old = self.clients.get(client_id).map(|c| &c.desired_queries);
        let mut desired = old.cloned().unwrap_or_default();
        for op in ops {
            match op {
                QueriesPatchOp::Put(put) => {
                    desired.insert(put.hash.clone(), DesiredQuery { ttl: put.ttl });
                }
                QueriesPatchOp::Del { hash } => {
                    desired.remove(hash);
                }
                QueriesPatchOp::Clear => desired.clear(),
            }
        }
        let old_len = old.map_or(0, BTreeMap::len);
        if desired.len() > self.limits.max_queries_per_client && desired.len() > old_len {
            return Err((
                ErrorKind::InvalidMessage,
                format!(
                    "client {client_id} desires {} queries, over the limit of {}",
                    desired.len(),
                    self.limits.max_queries_per_client
                ),
            ));
        }
        if old.is_none() && !desired.is_empty() && self.clients.len() >= self.limits.max_clients {
            return Err((ErrorKind::InvalidMessage, self.too_many_clients()));
        }

        let empty = BTreeMap::new();
        let old = old.unwrap_or(&empty);
        let mut changes: BTreeMap<String, Option<DesiredQuery>> = BTreeMap::new();
        let mut added = Vec::new();
        for (hash, query) in &desired {
            if old.get(hash) != Some(query) {
                changes.insert(hash.clone(), Some(query.clone()));
                if !old.contains_key(hash) {
                    added.push(hash.clone());
                }
            }
        }
        let removed: Vec<String> =
            old.keys().filter(|hash| !desired.contains_key(*hash)).cloned().collect();
        if changes.is_empty() && removed.is_empty() {
            return Ok(None);
        }

        let mut patch = Patch::default();
        for hash in &added {
            self.add_got(hash, &mut patch);
        }
        for hash in removed {
            self.drop_got(&hash, &mut patch);
            changes.insert(hash, None);
        }
        patch.desired_queries.insert(client_id.to_owned(), changes);
        let client = self.clients.entry(client_id.to_owned()).or_default();
        client.desired_queries = desired;
        if client.last_mutation_id == 0 && client.desired_queries.is_empty() {
            self.clients.remove(client_id);
        }
        Ok(Some(self.record(patch, Vec::new())))
    }

    /// Forgets clients the client reported deleted (`deleteClients`, or
    /// `deleted` in `initConnection`): their last mutation IDs and desired
    /// queries. `None` when none of them was known.
    pub fn delete_clients(&mut self, client_ids: &[String]) -> Option<Change> {
        let mut patch = Patch::default();
        let mut forgotten = Vec::new();
        for client_id in client_ids {
            let Some(client) = self.clients.remove(client_id) else { continue };
            let mut dropped = BTreeMap::new();
            for hash in client.desired_queries.keys() {
                self.drop_got(hash, &mut patch);
                dropped.insert(hash.clone(), None);
            }
            if !dropped.is_empty() {
                patch.desired_queries.insert(client_id.clone(), dropped);
            }
            forgotten.push(client_id.clone());
        }
        if forgotten.is_empty() {
            return None;
        }
        Some(self.record(patch, forgotten))
    }

    /// Checks a connecting client's `baseCookie` and `lmid` and says what it
    /// must receive before any later poke of the group.
    ///
    /// - No cookie: a poke from `null` carrying every row, every client's
    ///   last mutation ID and every desired and got query.
    /// - The current cookie: nothing.
    /// - An older cookie the history still covers: what changed since.
    /// - Any other cookie (never issued by this group, ahead of it, or older
    ///   than its history): `InvalidConnectionRequestBaseCookie`; the client
    ///   drops its local data and starts over.
    /// - An `lmid` above what the group recorded for the client:
    ///   `InvalidConnectionRequestLastMutationID`, likewise.
    pub fn check_connect(
        &self,
        client_id: &str,
        base_cookie: Option<&str>,
        lmid: u64,
    ) -> Result<CatchUp, (ErrorKind, String)> {
        let since = match base_cookie {
            None => None,
            Some(cookie) => {
                let Some(version) = cookie_to_version(cookie) else {
                    return Err((
                        ErrorKind::InvalidConnectionRequestBaseCookie,
                        format!("{cookie:?} is not a cookie this server issues"),
                    ));
                };
                if version > self.version {
                    return Err((
                        ErrorKind::InvalidConnectionRequestBaseCookie,
                        format!(
                            "client group is at version {}, behind the client's {cookie}",
                            self.cookie()
                        ),
                    ));
                }
                if version < self.history_floor() {
                    return Err((
                        ErrorKind::InvalidConnectionRequestBaseCookie,
                        format!(
                            "cookie {cookie} is older than the changes this server keeps \
                             (oldest: {})",
                            version_to_cookie(self.history_floor())
                        ),
                    ));
                }
                Some((cookie, version))
            }
        };
        let recorded = self.last_mutation_id(client_id);
        if lmid > recorded {
            return Err((
                ErrorKind::InvalidConnectionRequestLastMutationID,
                format!(
                    "client {client_id} reports last mutation ID {lmid}, \
                     but the server processed only up to {recorded}"
                ),
            ));
        }
        let patch = match since {
            None => self.full_patch(),
            Some((_, version)) if version == self.version => return Ok(CatchUp::Nothing),
            Some((cookie, version)) => self.patch_since(version).map_err(|e| {
                let message = format!("the changes since cookie {cookie} cannot be read: {e}");
                (ErrorKind::InvalidConnectionRequestBaseCookie, message)
            })?,
        };
        let cookie = self.cookie();
        Ok(CatchUp::Poke(Poke {
            poke_id: cookie.clone(),
            base_cookie: since.map(|(c, _)| c.to_owned()),
            cookie,
            patch: Arc::new(patch),
        }))
    }

    /// The oldest version a client may hold and still catch up.
    fn history_floor(&self) -> u64 {
        self.history.front().map_or(self.version, |r| r.entry.version - 1)
    }

    /// Everything, as seen from a client with no data.
    fn full_patch(&self) -> Patch {
        let mut patch = Patch::default();
        for (name, table) in &self.tables {
            let rows = table.rows.iter().map(|(k, r)| (k.clone(), Some(r.clone()))).collect();
            patch.rows.insert(name.clone(), rows);
        }
        for (client_id, client) in &self.clients {
            if client.last_mutation_id > 0 {
                patch.last_mutation_ids.insert(client_id.clone(), client.last_mutation_id);
            }
            if !client.desired_queries.is_empty() {
                let queries = client
                    .desired_queries
                    .iter()
                    .map(|(hash, query)| (hash.clone(), Some(query.clone())))
                    .collect();
                patch.desired_queries.insert(client_id.clone(), queries);
            }
        }
        patch.got_queries = self.got_queries.keys().map(|hash| (hash.clone(), true)).collect();
        patch
    }

    /// The changes after `version`, merged so that each row and query
    /// appears once with its latest state. Fails only on a history entry loaded from a
    /// corrupt store (one this process recorded always parses).
    fn patch_since(&self, version: u64) -> Result<Patch, String> {
        let mut patch = Patch::default();
        for recorded in self.history.iter().filter(|r| r.entry.version > version) {
            let entry: Patch = serde_json::from_str(&recorded.entry.json)
                .map_err(|e| format!("version {}: {e}", recorded.entry.version))?;
            if !patch_keys_valid(&entry) {
                return Err(format!("version {}: a row key is malformed", recorded.entry.version));
            }
            patch.merge(&entry);
        }
        Ok(patch)
    }

    /// Checks the ops of one mutation against the current rows without
    /// changing anything; the first failing op fails the whole mutation.
    fn stage_ops(&self, ops: Vec<CrudOp>) -> Result<StagedRows, String> {
        let mut staged = StagedRows { rows: RowsPatch::new(), new_tables: BTreeMap::new() };
        for op in ops {
            let table = op.table_name.as_str();
            let verb = match op.op {
                CrudOpKind::Insert => "insert into",
                CrudOpKind::Upsert => "upsert into",
                CrudOpKind::Update => "update of",
                CrudOpKind::Delete => "delete from",
            };
            let known_key = match self.tables.get(table) {
                Some(t) => Some(&t.primary_key),
                None => staged.new_tables.get(table),
            };
            match known_key {
                Some(key) if *key != op.primary_key => {
                    return Err(format!(
                        "{verb} {table}: its primary key is {key:?}, not {:?}",
                        op.primary_key
                    ));
                }
                Some(_) => {}
                None => {
                    staged.new_tables.insert(table.to_owned(), op.primary_key.clone());
                }
            }
            if let Some(columns) = &op.conflict_columns {
                let mut columns = columns.clone();
                let mut primary_key = op.primary_key.clone();
                columns.sort();
                primary_key.sort();
                if columns != primary_key {
                    return Err(format!(
                        "{verb} {table}: only the primary key can be the conflict target"
                    ));
                }
            }
            let key =
                row_key(&op.primary_key, &op.value).map_err(|e| format!("{verb} {table}: {e}"))?;
            let current = match staged.rows.get(table).and_then(|rows| rows.get(&key)) {
                Some(staged_row) => staged_row.as_ref(),
                None => self.tables.get(table).and_then(|t| t.rows.get(&key)),
            };
            let new = match (op.op, current) {
                (CrudOpKind::Insert, Some(_)) => {
                    return Err(format!("{verb} {table}: a row with key {key} already exists"));
                }
                (CrudOpKind::Insert | CrudOpKind::Upsert, None) => Some(op.value),
                (CrudOpKind::Upsert | CrudOpKind::Update, Some(row)) => {
                    // The op's columns, then the row's others: a column the op overwrites
                    // (often the large one) is not copied first.
                    let mut merged = op.value;
                    for (column, value) in row {
                        if !merged.contains_key(column) {
                            merged.insert(column.clone(), value.clone());
                        }
                    }
                    Some(merged)
                }
                // As in SQL: updating or deleting no row is not an error.
                (CrudOpKind::Update | CrudOpKind::Delete, None) => continue,
                (CrudOpKind::Delete, Some(_)) => None,
            };
            staged.rows.entry(table.to_owned()).or_default().insert(key, new);
        }
        Ok(staged)
    }

    /// Row count and bytes once `rows` are applied.
    fn totals_after(&self, rows: &RowsPatch) -> (usize, usize) {
        let (mut count, mut bytes) = (self.row_count, self.row_bytes);
        for (table, rows) in rows {
            for (key, new) in rows {
                if let Some(old) = self.tables.get(table).and_then(|t| t.rows.get(key)) {
                    count -= 1;
                    bytes -= row_size(table, key, old);
                }
                if let Some(new) = new {
                    count += 1;
                    bytes += row_size(table, key, new);
                }
            }
        }
        (count, bytes)
    }

    /// The error for growing past a row limit; shrinking is always allowed.
    fn row_limit_error(&self, count: usize, bytes: usize) -> Option<String> {
        let group = &self.group_id;
        if count > self.limits.max_rows && count > self.row_count {
            return Some(format!(
                "client group {group} would hold {count} rows, over its limit of {}",
                self.limits.max_rows
            ));
        }
        if bytes > self.limits.max_row_bytes && bytes > self.row_bytes {
            return Some(format!(
                "client group {group} would hold {bytes} bytes of rows, over its limit of {}",
                self.limits.max_row_bytes
            ));
        }
        None
    }

    /// Applies checked row writes and moves them into the patch.
    fn apply_rows(&mut self, staged: StagedRows, count: usize, bytes: usize, patch: &mut Patch) {
        let StagedRows { rows, mut new_tables } = staged;
        for (table_name, table_rows) in &rows {
            let table = self.tables.entry(table_name.clone()).or_insert_with(|| Table {
                primary_key: new_tables.remove(table_name).unwrap_or_default(),
                rows: BTreeMap::new(),
            });
            for (key, row) in table_rows {
                match row {
                    Some(row) => table.rows.insert(key.clone(), row.clone()),
                    None => table.rows.remove(key),
                };
            }
            if table.rows.is_empty() {
                self.tables.remove(table_name);
            }
        }
        self.row_count = count;
        self.row_bytes = bytes;
        patch.rows = rows;
    }

    /// Records a mutation that changed no row: only the last mutation ID.
    fn advance_only(&mut self, client_id: &str, id: u64, patch: Patch) -> Change {
        self.clients.entry(client_id.to_owned()).or_default().last_mutation_id = id;
        self.record(patch, Vec::new())
    }

    /// Counts one more client desiring `hash`; the first makes it "got".
    fn add_got(&mut self, hash: &str, patch: &mut Patch) {
        let count = self.got_queries.entry(hash.to_owned()).or_default();
        *count += 1;
        if *count == 1 {
            patch.got_queries.insert(hash.to_owned(), true);
        }
    }

    /// Counts one client fewer desiring `hash`; the last drops it.
    fn drop_got(&mut self, hash: &str, patch: &mut Patch) {
        let Some(count) = self.got_queries.get_mut(hash) else { return };
        *count -= 1;
        if *count == 0 {
            self.got_queries.remove(hash);
            patch.got_queries.insert(hash.to_owned(), false);
        }
    }

    /// Bumps the version and keeps the patch in the history.
    fn record(&mut self, patch: Patch, forgotten_clients: Vec<String>) -> Change {
        let base_version = self.version;
        self.version += 1;
        let json: Arc<str> = patch.to_json().into();
        let bytes = json.len();
        self.history.push_back(Recorded {
            entry: HistoryEntry { version: self.version, json: Arc::clone(&json) },
            bytes,
        });
        self.history_bytes += bytes;
        self.trim_history();
        Change {
            base_version,
            version: self.version,
            patch: Arc::new(patch),
            json,
            forgotten_clients,
            history_floor: self.history_floor(),
        }
    }

    /// Drops the oldest history entries until both history bounds hold.
    fn trim_history(&mut self) {
        while self.history.len() > self.limits.max_history
            || (self.history_bytes > self.limits.max_history_bytes && !self.history.is_empty())
        {
            if let Some(oldest) = self.history.pop_front() {
                self.history_bytes -= oldest.bytes;
            }
        }
    }

    /// The refusal for one client too many.
    fn too_many_clients(&self) -> String {
        format!(
            "client group {} already has {} clients, its limit",
            self.group_id, self.limits.max_clients
        )
    }
}

/// Whether every row key of a (stored) patch is one [`row_key`] could write.
fn patch_keys_valid(patch: &Patch) -> bool {
    patch.rows.values().flat_map(BTreeMap::keys).all(|key| key_columns(key).is_ok())
}

/// The size a row counts for in the limits: table name, key and JSON.
fn row_size(table: &str, key: &str, row: &Row) -> usize {
    table.len() + key.len() + json::object_len(row)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::poke::*;
    use crate::protocol::QueryPut;
    use serde_json::json;
    use serde_json::Value;

    const GROUP: &str = "g1";
    const C1: &str = "c1";
    const C2: &str = "c2";

    fn replica() -> Replica {
        Replica::new(GROUP, GroupLimits::default())
    }

    #[test]
    fn lowered_limits_trim_the_history_at_once_and_stop_growth() {
        let mut r = replica();
        for id in 1..=5 {
            let ops = json!([op("upsert", "issue", json!({"id": "i", "n": id}))]);
            applied(r.apply_push(crud(C1, id, ops)));
        }
        assert_eq!((r.history_len(), r.row_count()), (5, 1));
        r.set_limits(GroupLimits { max_history: 2, max_rows: 1, ..GroupLimits::default() });
        assert_eq!(r.history_len(), 2, "trimmed by the new bound");
        // The row already there stays; another one is over the new limit.
        let ops = json!([op("insert", "issue", json!({"id": "j"}))]);
        assert!(matches!(r.apply_push(crud(C1, 6, ops)), PushResult::LimitExceeded { .. }));
        assert_eq!(r.row_count(), 1);
    }

    #[test]
    fn a_patch_as_json_is_what_serde_writes() {
        let row = |v: Value| v.as_object().unwrap().clone();
        let mut patch = Patch::default();
        let issues = patch.rows.entry("issue".into()).or_default();
        issues.insert(r#"[["id","i1"]]"#.into(), Some(row(json!({"id": "i1", "t": "a\"b\n"}))));
        issues.insert(r#"[["id","i2"]]"#.into(), None);
        let users = patch.rows.entry("user \"x\"".into()).or_default();
        users.insert(r#"[["id",1]]"#.into(), Some(row(json!({"id": 1, "n": [1.5, null]}))));
        patch.last_mutation_ids.insert("c1".into(), 7);
        patch.last_mutation_ids.insert("c\"2\\".into(), u64::MAX);
        let queries = patch.desired_queries.entry("c1".into()).or_default();
        queries.insert("q1".into(), Some(DesiredQuery { ttl: Some(300000.0) }));
        queries.insert("q2".into(), None);
        patch.got_queries.insert("q1".into(), true);
        for patch in [Patch::default(), patch] {
            let ours = patch.to_json();
            assert_eq!(ours, serde_json::to_string(&patch).unwrap());
            assert_eq!(serde_json::from_str::<Patch>(&ours).unwrap(), patch);
        }
    }

    fn crud(client: &str, id: u64, ops: Value) -> Mutation {
        crate::testing::crud(GROUP, client, id, ops)
    }

    fn op(kind: &str, table: &str, value: Value) -> Value {
        json!({"op": kind, "tableName": table, "primaryKey": ["id"], "value": value})
    }

    fn put_query(hash: &str, ttl: Option<f64>) -> QueriesPatchOp {
        QueriesPatchOp::Put(QueryPut {
            hash: hash.into(),
            ast: Some(json!({"table": "issue"})),
            name: None,
            args: None,
            ttl,
            retry_error_version: None,
        })
    }

    fn applied(result: PushResult) -> Change {
        match result {
            PushResult::Applied(change) => change,
            other => panic!("expected Applied, got {other:?}"),
        }
    }

    fn failed(result: PushResult) -> (Change, String) {
        match result {
            PushResult::Failed { change, message } => (change, message),
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    fn row(replica: &Replica, table: &str, id: &str) -> Option<Row> {
        let key = row_key(&["id".to_string()], json!({"id": id}).as_object().unwrap()).unwrap();
        replica.snapshot().rows.get(table).and_then(|rows| rows.get(&key)).cloned()
    }

    fn poke_of(catch_up: CatchUp) -> Poke {
        match catch_up {
            CatchUp::Poke(poke) => poke,
            CatchUp::Nothing => panic!("expected a poke"),
        }
    }

    fn issue_key(id: &str) -> String {
        format!("[[\"id\",\"{id}\"]]")
    }

    #[test]
    fn insert_adds_a_row_and_pokes_it_with_the_lmid() {
        let mut r = replica();
        let change = applied(r.apply_push(crud(
            C1,
            1,
            json!([op("insert", "issue", json!({"id": "i1", "title": "x"}))]),
        )));
        assert_eq!((change.base_version, change.version), (0, 1));
        assert_eq!(change.patch.last_mutation_ids[C1], 1);
        assert_eq!(
            change.patch.rows["issue"][&issue_key("i1")],
            Some(json!({"id": "i1", "title": "x"}).as_object().unwrap().clone())
        );
        assert_eq!(row(&r, "issue", "i1").unwrap()["title"], "x");
        assert_eq!((r.row_count(), r.last_mutation_id(C1), r.cookie()), (1, 1, "01".into()));
    }

    #[test]
    fn insert_of_an_existing_row_fails_the_whole_mutation_but_advances_the_lmid() {
        let mut r = replica();
        applied(r.apply_push(crud(
            C1,
            1,
            json!([op("insert", "issue", json!({"id": "i1", "title": "x"}))]),
        )));
        let (change, message) = failed(r.apply_push(crud(
            C1,
            2,
            json!([
                op("insert", "issue", json!({"id": "i2", "title": "new"})),
                op("insert", "issue", json!({"id": "i1", "title": "dup"})),
            ]),
        )));
        assert!(message.contains("already exists"), "{message}");
        // Nothing of the mutation stays, not even its first op.
        assert_eq!(row(&r, "issue", "i2"), None);
        assert_eq!(row(&r, "issue", "i1").unwrap()["title"], "x");
        assert!(change.patch.rows.is_empty());
        assert_eq!(change.patch.last_mutation_ids[C1], 2);
        assert_eq!((r.last_mutation_id(C1), r.version()), (2, 2));
        // The next mutation is accepted.
        applied(r.apply_push(crud(C1, 3, json!([op("delete", "issue", json!({"id": "i1"}))]))));
    }

    #[test]
    fn upsert_inserts_or_overwrites_the_given_columns() {
        let mut r = replica();
        applied(r.apply_push(crud(
            C1,
            1,
            json!([op("upsert", "issue", json!({"id": "i1", "title": "x", "n": 1}))]),
        )));
        let change = applied(r.apply_push(crud(
            C1,
            2,
            json!([op("upsert", "issue", json!({"id": "i1", "title": "y"}))]),
        )));
        let expected = json!({"id": "i1", "title": "y", "n": 1}).as_object().unwrap().clone();
        assert_eq!(row(&r, "issue", "i1"), Some(expected.clone()));
        // The poke carries the whole row: the client's put replaces it.
        assert_eq!(change.patch.rows["issue"][&issue_key("i1")], Some(expected));
    }

    #[test]
    fn update_merges_and_is_a_no_op_without_a_row() {
        let mut r = replica();
        let change = applied(r.apply_push(crud(
            C1,
            1,
            json!([op("update", "issue", json!({"id": "nope", "title": "y"}))]),
        )));
        assert!(change.patch.rows.is_empty());
        assert_eq!(change.patch.last_mutation_ids[C1], 1);
        assert_eq!(r.row_count(), 0);
        applied(r.apply_push(crud(
            C1,
            2,
            json!([op("insert", "issue", json!({"id": "i1", "title": "x", "n": 1}))]),
        )));
        applied(r.apply_push(crud(
            C1,
            3,
            json!([op("update", "issue", json!({"id": "i1", "n": 2}))]),
        )));
        assert_eq!(
            row(&r, "issue", "i1"),
            Some(json!({"id": "i1", "title": "x", "n": 2}).as_object().unwrap().clone())
        );
    }

    #[test]
    fn delete_removes_and_is_a_no_op_without_a_row() {
        let mut r = replica();
        let change = applied(r.apply_push(crud(
            C1,
            1,
            json!([op("delete", "issue", json!({"id": "nope"}))]),
        )));
        assert!(change.patch.rows.is_empty());
        applied(r.apply_push(crud(C1, 2, json!([op("insert", "issue", json!({"id": "i1"}))]))));
        let change =
            applied(r.apply_push(crud(C1, 3, json!([op("delete", "issue", json!({"id": "i1"}))]))));
        assert_eq!(change.patch.rows["issue"][&issue_key("i1")], None);
        assert_eq!((r.row_count(), r.row_bytes()), (0, 0));
        assert!(r.snapshot().rows.is_empty());
    }

    #[test]
    fn ops_of_one_mutation_see_each_other() {
        let mut r = replica();
        let change = applied(r.apply_push(crud(
            C1,
            1,
            json!([
                op("insert", "issue", json!({"id": "i1", "title": "a"})),
                op("update", "issue", json!({"id": "i1", "title": "b"})),
                op("insert", "issue", json!({"id": "i2"})),
                op("delete", "issue", json!({"id": "i2"})),
            ]),
        )));
        assert_eq!(row(&r, "issue", "i1").unwrap()["title"], "b");
        assert_eq!(r.row_count(), 1);
        // One entry per row, holding its final state.
        assert_eq!(change.patch.rows["issue"].len(), 2);
        assert_eq!(change.patch.rows["issue"][&issue_key("i2")], None);
    }

    #[test]
    fn bad_keys_fail_the_mutation() {
        let mut r = replica();
        let (_, message) = failed(r.apply_push(crud(
            C1,
            1,
            json!([op("insert", "issue", json!({"title": "no id"}))]),
        )));
        assert!(message.contains("\"id\" is missing"), "{message}");
        let (_, message) = failed(r.apply_push(crud(
            C1,
            2,
            json!([op("insert", "issue", json!({"id": {"a": 1}}))]),
        )));
        assert!(message.contains("must be a string, number or boolean"), "{message}");
        let (_, message) =
            failed(r.apply_push(crud(C1, 3, json!([op("insert", "issue", json!({"id": null}))]))));
        assert!(message.contains("must be a string"), "{message}");
        applied(r.apply_push(crud(
            C1,
            4,
            json!([op("insert", "issue", json!({"id": "i1", "b": 1}))]),
        )));
        let other_key = json!({"op": "insert", "tableName": "issue", "primaryKey": ["id", "b"],
                               "value": {"id": "i2", "b": 1}});
        let (_, message) = failed(r.apply_push(crud(C1, 5, json!([other_key]))));
        assert!(message.contains("its primary key is [\"id\"]"), "{message}");
        let conflict = json!({"op": "upsert", "tableName": "issue", "primaryKey": ["id"],
                              "value": {"id": "i3", "b": 2}, "conflictColumns": ["b"]});
        let (_, message) = failed(r.apply_push(crud(C1, 6, json!([conflict]))));
        assert!(message.contains("conflict target"), "{message}");
        let same = json!({"op": "upsert", "tableName": "issue", "primaryKey": ["id"],
                          "value": {"id": "i3", "b": 2}, "conflictColumns": ["id"]});
        applied(r.apply_push(crud(C1, 7, json!([same]))));
        assert_eq!((r.row_count(), r.last_mutation_id(C1)), (2, 7));
    }

    #[test]
    fn integral_float_keys_match_integer_keys() {
        let mut r = replica();
        applied(r.apply_push(crud(C1, 1, json!([op("insert", "t", json!({"id": 1, "v": "a"}))]))));
        let (_, message) =
            failed(r.apply_push(crud(C1, 2, json!([op("insert", "t", json!({"id": 1.0}))]))));
        assert!(message.contains("already exists"), "{message}");
    }

    #[test]
    fn lmid_rules_follow_zero_cache() {
        let mut r = replica();
        applied(r.apply_push(crud(C1, 1, json!([]))));
        // A resend is ignored and changes nothing.
        assert_eq!(r.apply_push(crud(C1, 1, json!([]))), PushResult::AlreadyProcessed);
        assert_eq!(r.version(), 1);
        // A gap is refused, with zero-cache's text.
        let PushResult::Gap(message) = r.apply_push(crud(C1, 3, json!([]))) else { panic!() };
        assert_eq!(
            message,
            "Push contains unexpected mutation id 3 for client c1. Expected mutation id 2."
        );
        assert_eq!((r.version(), r.last_mutation_id(C1)), (1, 1));
        // Clients count separately, and a client may push for another one.
        let PushResult::Gap(_) = r.apply_push(crud(C2, 2, json!([]))) else { panic!() };
        applied(r.apply_push(crud(C2, 1, json!([]))));
        assert_eq!(r.last_mutation_id(C2), 1);
    }

    #[test]
    fn custom_mutations_are_refused_without_change() {
        let mut r = replica();
        let mut mutation = crud(C1, 1, json!([]));
        mutation.kind = MutationKind::Custom;
        mutation.name = "issue.create".into();
        let PushResult::Refused(message) = r.apply_push(mutation) else { panic!() };
        assert!(message.contains("mutate endpoint"), "{message}");
        assert_eq!((r.version(), r.last_mutation_id(C1)), (0, 0));
        let mut renamed = crud(C1, 1, json!([]));
        renamed.name = "other".into();
        assert!(matches!(r.apply_push(renamed), PushResult::Refused(_)));
    }

    #[test]
    fn cookies_sort_as_their_versions() {
        for (version, cookie) in
            [(0, "00"), (1, "01"), (10, "0a"), (35, "0z"), (36, "110"), (46655, "2zzz")]
        {
            assert_eq!(version_to_cookie(version), cookie);
            assert_eq!(cookie_to_version(cookie), Some(version));
        }
        let mut previous = version_to_cookie(0);
        for version in 1..=100_000u64 {
            let cookie = version_to_cookie(version);
            assert!(previous < cookie, "{previous} !< {cookie}");
            assert_eq!(cookie_to_version(&cookie), Some(version));
            previous = cookie;
        }
        let max = version_to_cookie(u64::MAX);
        assert_eq!(max, "c3w5e11264sgsf");
        assert_eq!(cookie_to_version(&max), Some(u64::MAX));
        assert!(version_to_cookie(u64::MAX - 1) < max);
    }

    #[test]
    fn only_exact_cookies_parse() {
        for bad in
            ["", "0", "1", "0A", "001", "101", "01x", "01:01", "01.1", "c3w5e11264sgsg", "-1", "zz"]
        {
            assert_eq!(cookie_to_version(bad), None, "{bad:?}");
        }
    }

    /// A group at version 4: rows i1 (updated), i3; i2 inserted then deleted.
    fn busy_replica(limits: GroupLimits) -> Replica {
        let mut r = Replica::new(GROUP, limits);
        applied(r.apply_push(crud(
            C1,
            1,
            json!([
                op("insert", "issue", json!({"id": "i1", "t": "a"})),
                op("insert", "issue", json!({"id": "i2"}))
            ]),
        )));
        r.change_desired_queries(C1, &[put_query("q1", Some(1000.0))]).unwrap().unwrap();
        applied(r.apply_push(crud(
            C2,
            1,
            json!([
                op("update", "issue", json!({"id": "i1", "t": "b"})),
                op("delete", "issue", json!({"id": "i2"}))
            ]),
        )));
        applied(r.apply_push(crud(C1, 2, json!([op("insert", "issue", json!({"id": "i3"}))]))));
        r
    }

    #[test]
    fn a_client_without_cookie_gets_everything() {
        let r = busy_replica(GroupLimits::default());
        let poke = poke_of(r.check_connect("new", None, 0).unwrap());
        assert_eq!((poke.base_cookie.as_deref(), poke.cookie.as_str()), (None, "04"));
        let patch = &poke.patch;
        assert_eq!(patch.rows["issue"].len(), 2);
        assert!(patch.rows["issue"].values().all(Option::is_some));
        assert_eq!(patch.last_mutation_ids, BTreeMap::from([(C1.into(), 2), (C2.into(), 1)]));
        assert_eq!(patch.desired_queries[C1]["q1"], Some(DesiredQuery { ttl: Some(1000.0) }));
        assert_eq!(patch.got_queries, BTreeMap::from([("q1".into(), true)]));
        // Even an empty group answers, so the client gets its first cookie.
        let poke = poke_of(replica().check_connect(C1, None, 0).unwrap());
        assert_eq!(poke.cookie, "00");
        assert!(poke.patch.is_empty());
    }

    #[test]
    fn the_current_cookie_needs_nothing() {
        let r = busy_replica(GroupLimits::default());
        assert_eq!(r.check_connect(C1, Some("04"), 2).unwrap(), CatchUp::Nothing);
    }

    #[test]
    fn an_older_cookie_gets_what_changed_since() {
        let r = busy_replica(GroupLimits::default());
        let poke = poke_of(r.check_connect(C1, Some("01"), 1).unwrap());
        assert_eq!((poke.base_cookie.as_deref(), poke.cookie.as_str()), (Some("01"), "04"));
        let rows = &poke.patch.rows["issue"];
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[&issue_key("i1")].as_ref().unwrap()["t"], "b");
        assert_eq!(rows[&issue_key("i2")], None);
        assert!(rows[&issue_key("i3")].is_some());
        assert_eq!(poke.patch.last_mutation_ids, BTreeMap::from([(C1.into(), 2), (C2.into(), 1)]));
        assert!(poke.patch.got_queries.contains_key("q1"));
        // From version 3 only the last change.
        let poke = poke_of(r.check_connect(C1, Some("03"), 1).unwrap());
        assert_eq!(poke.patch.rows["issue"].keys().collect::<Vec<_>>(), [&issue_key("i3")]);
        assert!(poke.patch.desired_queries.is_empty());
    }

    #[test]
    fn unknown_cookies_are_refused() {
        let r = busy_replica(GroupLimits::default());
        for cookie in ["05", "zz", "garbage", "", "04:01"] {
            let (kind, _) = r.check_connect(C1, Some(cookie), 0).unwrap_err();
            assert_eq!(kind, ErrorKind::InvalidConnectionRequestBaseCookie, "{cookie}");
        }
        let (kind, message) = replica().check_connect(C1, Some("01"), 0).unwrap_err();
        assert_eq!(kind, ErrorKind::InvalidConnectionRequestBaseCookie);
        assert!(message.contains("behind"), "{message}");
    }

    #[test]
    fn cookies_evicted_from_the_history_are_refused() {
        let r = busy_replica(GroupLimits { max_history: 2, ..GroupLimits::default() });
        assert_eq!(r.history_len(), 2);
        let (kind, message) = r.check_connect(C1, Some("01"), 0).unwrap_err();
        assert_eq!(kind, ErrorKind::InvalidConnectionRequestBaseCookie);
        assert!(message.contains("oldest: 02"), "{message}");
        assert!(r.check_connect(C1, Some("02"), 0).is_ok());
        // A byte bound evicts too.
        let r = busy_replica(GroupLimits { max_history_bytes: 1, ..GroupLimits::default() });
        assert_eq!(r.history_len(), 0);
        assert!(r.check_connect(C1, Some("03"), 0).is_err());
        assert_eq!(r.check_connect(C1, Some("04"), 0).unwrap(), CatchUp::Nothing);
    }

    #[test]
    fn an_lmid_ahead_of_the_server_is_refused() {
        let r = busy_replica(GroupLimits::default());
        let (kind, message) = r.check_connect(C1, Some("04"), 3).unwrap_err();
        assert_eq!(kind, ErrorKind::InvalidConnectionRequestLastMutationID);
        assert!(message.contains("up to 2"), "{message}");
        let (kind, _) = r.check_connect("stranger", None, 1).unwrap_err();
        assert_eq!(kind, ErrorKind::InvalidConnectionRequestLastMutationID);
        // The cookie is judged first, as in zero-cache.
        let (kind, _) = r.check_connect(C1, Some("09"), 9).unwrap_err();
        assert_eq!(kind, ErrorKind::InvalidConnectionRequestBaseCookie);
    }

    #[test]
    fn desired_queries_are_remembered_across_reconnects() {
        let mut r = replica();
        let change =
            r.change_desired_queries(C1, &[put_query("q1", Some(300000.0))]).unwrap().unwrap();
        assert_eq!(
            change.patch.desired_queries[C1]["q1"],
            Some(DesiredQuery { ttl: Some(300000.0) })
        );
        assert!(change.patch.got_queries["q1"]);
        // On reconnect the client sends an empty patch with its old cookie.
        assert_eq!(r.change_desired_queries(C1, &[]).unwrap(), None);
        assert_eq!(r.check_connect(C1, Some("01"), 0).unwrap(), CatchUp::Nothing);
        // Putting what it has changes nothing either.
        assert_eq!(r.change_desired_queries(C1, &[put_query("q1", Some(300000.0))]).unwrap(), None);
        // A client that lost its data gets its queries back in full.
        let poke = poke_of(r.check_connect(C1, None, 0).unwrap());
        assert!(poke.patch.desired_queries[C1].contains_key("q1"));
        assert!(poke.patch.got_queries["q1"]);
        let poke = poke_of(r.check_connect(C1, Some("00"), 0).unwrap());
        assert!(poke.patch.desired_queries[C1].contains_key("q1"));
    }

    #[test]
    fn got_queries_last_while_some_client_desires_them() {
        let mut r = replica();
        r.change_desired_queries(C1, &[put_query("q", None), put_query("only1", None)])
            .unwrap()
            .unwrap();
        let change = r.change_desired_queries(C2, &[put_query("q", None)]).unwrap().unwrap();
        assert!(change.patch.got_queries.is_empty(), "already got");
        let change = r
            .change_desired_queries(C1, &[QueriesPatchOp::Del { hash: "q".into() }])
            .unwrap()
            .unwrap();
        assert_eq!(change.patch.desired_queries[C1]["q"], None);
        assert!(change.patch.got_queries.is_empty(), "c2 still wants it");
        let change = r.change_desired_queries(C1, &[QueriesPatchOp::Clear]).unwrap().unwrap();
        assert_eq!(change.patch.got_queries, BTreeMap::from([("only1".into(), false)]));
        let change = r.delete_clients(&[C2.into(), "unknown".into()]).unwrap();
        assert_eq!(change.forgotten_clients, vec![C2.to_string()]);
        assert_eq!(change.patch.got_queries, BTreeMap::from([("q".into(), false)]));
        assert!(r.snapshot().clients.is_empty());
        assert_eq!(r.delete_clients(&["unknown".into()]), None);
    }

    #[test]
    fn deleted_clients_lose_their_lmid() {
        let mut r = replica();
        applied(r.apply_push(crud(C1, 1, json!([]))));
        let change = r.delete_clients(&[C1.into()]).unwrap();
        assert!(change.patch.is_empty());
        assert_eq!(change.version, 2);
        assert_eq!(r.last_mutation_id(C1), 0);
    }

    #[test]
    fn limits_refuse_growth_with_clear_errors() {
        let limits = GroupLimits { max_rows: 2, ..GroupLimits::default() };
        let mut r = Replica::new(GROUP, limits);
        applied(r.apply_push(crud(
            C1,
            1,
            json!([op("insert", "t", json!({"id": "a"})), op("insert", "t", json!({"id": "b"}))]),
        )));
        let PushResult::LimitExceeded { change, message } =
            r.apply_push(crud(C1, 2, json!([op("insert", "t", json!({"id": "c"}))])))
        else {
            panic!()
        };
        assert!(message.contains("3 rows, over its limit of 2"), "{message}");
        assert!(change.patch.rows.is_empty());
        assert_eq!((r.row_count(), r.last_mutation_id(C1)), (2, 2));
        // Replacing and shrinking still work at the limit.
        applied(r.apply_push(crud(
            C1,
            3,
            json!([op("delete", "t", json!({"id": "a"})), op("insert", "t", json!({"id": "c"}))]),
        )));

        let mut r =
            Replica::new(GROUP, GroupLimits { max_row_bytes: 100, ..GroupLimits::default() });
        let big = "x".repeat(200);
        let PushResult::LimitExceeded { message, .. } =
            r.apply_push(crud(C1, 1, json!([op("insert", "t", json!({"id": "a", "v": big}))])))
        else {
            panic!()
        };
        assert!(message.contains("bytes of rows"), "{message}");
        assert_eq!(r.row_bytes(), 0);

        let mut r = Replica::new(
            GROUP,
            GroupLimits { max_queries_per_client: 1, max_clients: 1, ..GroupLimits::default() },
        );
        let (kind, message) = r
            .change_desired_queries(C1, &[put_query("a", None), put_query("b", None)])
            .unwrap_err();
        assert_eq!(kind, ErrorKind::InvalidMessage);
        assert!(message.contains("2 queries"), "{message}");
        assert_eq!(r.version(), 0);
        r.change_desired_queries(C1, &[put_query("a", None)]).unwrap().unwrap();
        assert!(r.change_desired_queries(C2, &[put_query("a", None)]).is_err());
        let PushResult::Refused(message) = r.apply_push(crud(C2, 1, json!([]))) else { panic!() };
        assert!(message.contains("1 clients"), "{message}");
        // A known client is never refused for the client count.
        applied(r.apply_push(crud(C1, 1, json!([]))));

        let mut r = replica();
        let long = "x".repeat(MAX_ID_BYTES + 1);
        assert!(matches!(r.apply_push(crud(&long, 1, json!([]))), PushResult::Refused(_)));
        assert!(r.change_desired_queries(&long, &[put_query("q", None)]).is_err());
        assert!(r.change_desired_queries(C1, &[put_query(&long, None)]).is_err());
        assert_eq!(r.version(), 0);

        let mut r = Replica::new(GROUP, GroupLimits { max_history: 3, ..GroupLimits::default() });
        for id in 1..=10 {
            applied(r.apply_push(crud(C1, id, json!([]))));
        }
        assert_eq!(r.history_len(), 3);
    }

    #[test]
    fn snapshots_round_trip_and_corrupt_ones_are_refused() {
        let r = busy_replica(GroupLimits::default());
        let snapshot = r.snapshot();
        let copy = Replica::from_snapshot(GROUP, GroupLimits::default(), snapshot.clone()).unwrap();
        assert_eq!(copy.snapshot(), snapshot);
        assert_eq!((copy.row_count(), copy.row_bytes()), (r.row_count(), r.row_bytes()));
        assert_eq!(copy.check_connect(C1, Some("01"), 0), r.check_connect(C1, Some("01"), 0));

        let mut corrupt = snapshot.clone();
        let rows = corrupt.rows.get_mut("issue").unwrap();
        let (key, mut value) = rows.pop_first().unwrap();
        value.insert("id".into(), json!("other"));
        rows.insert(key, value);
        assert!(Replica::from_snapshot(GROUP, GroupLimits::default(), corrupt).is_err());

        let mut bad_key = snapshot.clone();
        bad_key.rows.get_mut("issue").unwrap().insert("not json".into(), Row::new());
        assert!(Replica::from_snapshot(GROUP, GroupLimits::default(), bad_key).is_err());

        // A stored change that does not parse fails only the catch-up that needs it.
        let mut unreadable = snapshot.clone();
        unreadable.history.last_mut().unwrap().json = "not json".into();
        let copy = Replica::from_snapshot(GROUP, GroupLimits::default(), unreadable).unwrap();
        let (kind, message) = copy.check_connect(C1, Some("01"), 0).unwrap_err();
        assert_eq!(kind, ErrorKind::InvalidConnectionRequestBaseCookie);
        assert!(message.contains("cannot be read"), "{message}");
        assert_eq!(copy.check_connect(C1, Some(&copy.cookie()), 0), Ok(CatchUp::Nothing));

        // A history with a gap keeps only the part after it.
        let mut gap = snapshot;
        gap.history.remove(1);
        let copy = Replica::from_snapshot(GROUP, GroupLimits::default(), gap).unwrap();
        assert_eq!(copy.history_len(), 2);
        assert!(copy.check_connect(C1, Some("02"), 0).is_ok());
        assert!(copy.check_connect(C1, Some("01"), 0).is_err());
    }

    fn text(payload: &[u8]) -> &str {
        std::str::from_utf8(payload).unwrap()
    }

    #[test]
    fn pokes_have_the_wire_form_of_the_capture() {
        // The capture's session, after our first poke (cookie "00").
        let client = "jvp8kkl4ng86q8uhi0";
        let mut r = replica();
        let change = r
            .change_desired_queries(client, &[put_query("2uh1iy5olazzo", Some(300000.0))])
            .unwrap()
            .unwrap();
        let messages = encode_poke(&change.poke(), 51);
        assert_eq!(
            messages.iter().map(|m| text(m)).collect::<Vec<_>>(),
            [
                r#"["pokeStart",{"pokeID":"01","baseCookie":"00"}]"#,
                r#"["pokePart",{"pokeID":"01","desiredQueriesPatches":{"jvp8kkl4ng86q8uhi0":[{"op":"put","hash":"2uh1iy5olazzo","ttl":300000}]},"gotQueriesPatch":[{"op":"put","hash":"2uh1iy5olazzo"}]}]"#,
                r#"["pokeEnd",{"pokeID":"01","cookie":"01"}]"#,
            ]
        );
        let change = applied(r.apply_push(crud(
            client,
            1,
            json!([op("insert", "issue", json!({"id": "i1", "title": "x"}))]),
        )));
        let messages = encode_poke(&change.poke(), 51);
        assert_eq!(
            text(&messages[1]),
            r#"["pokePart",{"pokeID":"02","lastMutationIDChanges":{"jvp8kkl4ng86q8uhi0":1},"rowsPatch":[{"op":"put","tableName":"issue","value":{"id":"i1","title":"x"}}]}]"#
        );
        let change = applied(r.apply_push(crud(
            client,
            2,
            json!([op("delete", "issue", json!({"id": "i1"}))]),
        )));
        let messages = encode_poke(&change.poke(), 51);
        assert!(text(&messages[1])
            .contains(r#""rowsPatch":[{"op":"del","tableName":"issue","id":{"id":"i1"}}]"#));
        let first = encode_poke(&poke_of(replica().check_connect(client, None, 0).unwrap()), 51);
        assert_eq!(text(&first[0]), r#"["pokeStart",{"pokeID":"00","baseCookie":null}]"#);
        assert_eq!(text(&first[1]), r#"["pokePart",{"pokeID":"00"}]"#);
    }

    /// A poke of about 3 MiB of rows with multi-byte characters.
    fn big_poke() -> Poke {
        let mut r = replica();
        let mut id = 0;
        let value = "é€😀x".repeat(1000);
        while r.row_bytes() < 3 << 20 {
            let ops: Vec<Value> = (0..50)
                .map(|i| op("insert", "t", json!({"id": format!("r{id}-{i}"), "v": value})))
                .collect();
            id += 1;
            applied(r.apply_push(crud(C1, id, Value::Array(ops))));
        }
        poke_of(r.check_connect(C2, None, 0).unwrap())
    }

    #[test]
    fn binary_pokes_are_chunked_at_one_mib() {
        let poke = big_poke();
        let messages = encode_poke(&poke, 52);
        let (start, rest) = messages.split_first().unwrap();
        let (end, chunks) = rest.split_last().unwrap();
        assert!(text(start).starts_with("[\"pokeStart\","));
        assert!(text(end).starts_with("[\"pokeEnd\","));
        assert!(!is_binary_payload(start) && !is_binary_payload(end));
        assert!(chunks.len() >= 3, "{} chunks", chunks.len());
        let mut joined = Vec::new();
        for chunk in chunks {
            assert!(is_binary_payload(chunk));
            assert!(chunk.len() <= MAX_POKE_CHUNK_BYTES);
            // Chunks are cut between characters.
            assert!(std::str::from_utf8(&chunk[1..]).is_ok());
            joined.extend_from_slice(&chunk[1..]);
        }
        let parts: Vec<Value> = serde_json::from_slice(&joined).unwrap();
        assert!(parts.len() > 1);
        let mut rows = 0;
        for part in &parts {
            assert_eq!(part["pokeID"], poke.poke_id);
            rows += part["rowsPatch"].as_array().map_or(0, Vec::len);
        }
        assert_eq!(rows, poke.patch.rows["t"].len());
        // One encoding is the same bytes every time.
        assert_eq!(encode_poke_as(&poke, PokeFormat::Binary), messages);
    }

    #[test]
    fn protocol_51_never_gets_a_binary_message() {
        let poke = big_poke();
        for version in [30, 50, 51] {
            let messages = encode_poke(&poke, version);
            assert!(messages.len() > 3);
            let mut rows = 0;
            for message in &messages {
                assert!(!is_binary_payload(message));
                let value: Value = serde_json::from_slice(message).unwrap();
                if value[0] == "pokePart" {
                    rows += value[1]["rowsPatch"].as_array().map_or(0, Vec::len);
                    assert!(message.len() < POKE_PART_TARGET_BYTES + (64 << 10));
                }
            }
            assert_eq!(rows, poke.patch.rows["t"].len());
        }
        assert_eq!(PokeFormat::for_protocol(51), PokeFormat::Json);
        assert_eq!(PokeFormat::for_protocol(52), PokeFormat::Binary);
    }

    #[test]
    fn an_empty_binary_poke_still_has_its_part() {
        let poke = poke_of(replica().check_connect(C1, None, 0).unwrap());
        let messages = encode_poke(&poke, 52);
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[1], b"\x00[{\"pokeID\":\"00\"}]");
    }
}
