//! Durable client groups: one SQLite file shared by every worker process.
//!
//! A client's acknowledged mutation must survive a worker crash, a daemon
//! restart, and its group moving to another worker. So the worker stages
//! every [`Change`] of a loop iteration here, commits them in one
//! transaction (WAL, `synchronous=FULL`: the commit returns after the fsync),
//! and only then sends the pokes that acknowledge them. One transaction per
//! iteration, not per mutation, keeps the fsyncs few under load.
//!
//! A commit appends each change to the group's `history` (one row: the patch
//! as JSON) and writes nothing else: the history is the log. Every
//! `MATERIALIZE_EVERY` versions of a group (or sooner after large patches)
//! the commit also folds the changes since the last time into the `rows`,
//! `clients` and `queries` tables, moves `groups.version` up to them, and
//! trims the history to the replica's bounds. A load reads the materialized
//! state and replays the history after it. So a push writes its history row
//! and nothing else, and a row written on every push is written to `rows` once
//! per materialization (a large row is not written twice per push).
//!
//! Several processes open the file at once; SQLite's locking serializes their
//! commits and `busy_timeout` makes a writer wait its turn. A group is written
//! by the one worker that owns it, but during a handover (a restarted worker,
//! a graceful replacement) two processes may briefly hold the same group. A
//! change therefore carries the version it was based on, and the commit skips
//! the changes of a group whose stored version (the newer of `groups.version`
//! and the last history entry) differs: that process lost the group and must
//! drop it (its clients reconnect and load the current state). The history is
//! never trimmed above `groups.version`, so a stale base always shows.
//!
//! Layout: `groups` (materialized version and pinned owner), `rows`, `clients`
//! (last mutation IDs), `queries` (desired queries) and `history` (every patch
//! after the materialized version, and older ones kept for catch-up; with the
//! clients a change forgot). `schema_version` holds the number of `MIGRATIONS`
//! applied; a later release appends migrations.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::protocol::poke::{DesiredQuery, Patch, Row};
use crate::sync::replica::{Change, ClientSnapshot, HistoryEntry, ReplicaSnapshot};

/// The database file inside the storage directory.
pub const DB_FILE_NAME: &str = "syncgate.db";

/// How long a commit or load waits for another process's write to finish.
/// Commits hold the lock for one fsync, so a wait this long means something
/// is stuck, and failing is better than blocking the worker's loop forever.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Prepared statements kept per connection: room for all of the store's (about 20).
const STATEMENT_CACHE: usize = 32;

/// A group's changes are folded into its tables every this many versions: often enough
/// that a load replays at most this many patches and the history is trimmed in step with
/// the replica's, seldom enough that a busy row is written to `rows` once per this many
/// pushes rather than on each.
const MATERIALIZE_EVERY: usize = 64;
/// Patch JSON since the last materialization that brings the next one forward: bounds what
/// the store holds in memory per group and the history kept beyond the replica's bounds.
const MATERIALIZE_BYTES: usize = 256 * 1024;

/// The schema, one step per release that changed it; `schema_version` holds
/// how many have run. Never edit a step that has shipped: append one.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE groups (
        group_id TEXT NOT NULL PRIMARY KEY,
        version INTEGER NOT NULL,
        owner TEXT
    ) WITHOUT ROWID;
    CREATE TABLE rows (
        group_id TEXT NOT NULL,
        table_name TEXT NOT NULL,
        row_key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (group_id, table_name, row_key)
    );
    CREATE TABLE clients (
        group_id TEXT NOT NULL,
        client_id TEXT NOT NULL,
        last_mutation_id INTEGER NOT NULL,
        PRIMARY KEY (group_id, client_id)
    ) WITHOUT ROWID;
    CREATE TABLE queries (
        group_id TEXT NOT NULL,
        client_id TEXT NOT NULL,
        hash TEXT NOT NULL,
        ttl REAL,
        PRIMARY KEY (group_id, client_id, hash)
    ) WITHOUT ROWID;
    CREATE TABLE history (
        group_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        patch TEXT NOT NULL,
        PRIMARY KEY (group_id, version)
    );
",
    // The history became the log (see the module doc). A file of schema 1 has every change
    // materialized already, so it reads the same; replaying a change must also forget the
    // clients it forgot (a JSON array, NULL for none).
    "ALTER TABLE history ADD COLUMN forgotten TEXT;",
];

/// The storage of every client group, over one SQLite connection.
pub struct Store {
    /// The connection; one per process.
    conn: Connection,
    /// What [`Store::commit`] will write, in the order it was staged.
    staged: Batch,
    /// For each group in memory, what its changes since the last materialization come to:
    /// what the next one writes into the tables.
    pending: HashMap<String, Pending>,
}

/// A group as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredGroup {
    /// The verified user the group is pinned to, if one was set.
    pub owner: Option<String>,
    /// The group's data, for `Replica::from_snapshot`.
    pub snapshot: ReplicaSnapshot,
}

/// The outcome of a successful [`Store::commit`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Committed {
    /// Groups whose changes were not written because another process had
    /// changed the group since it was loaded. The caller must drop these
    /// groups from memory without sending their pending pokes, and close
    /// their connections (`Rehome`), so the clients reconnect to fresh state.
    pub stale_groups: Vec<String>,
}

/// Why the store failed, naming what it was doing. The worker logs it and tells the client
/// [`StoreError::error_kind`]; the process edges (startup) print it and exit.
#[derive(Debug)]
pub enum StoreError {
    /// The storage directory could not be created.
    Directory { path: std::path::PathBuf, source: std::io::Error },
    /// The database file could not be opened, set up or migrated.
    Open { path: std::path::PathBuf, source: rusqlite::Error },
    /// The file system or another program keeps the file out of WAL mode.
    NoWal { path: std::path::PathBuf, mode: String },
    /// A client group could not be read.
    Load { group_id: String, source: rusqlite::Error },
    /// A client group's stored state does not make a valid replica.
    Corrupt { group_id: String, message: String },
    /// A batch could not be written (nothing of it was).
    Commit { source: rusqlite::Error },
    /// The thread that runs the store could not be started.
    Thread { source: std::io::Error },
    /// The write-ahead log could not be written, read or replayed (`path` names the file,
    /// or the slot's files as `wal-<slot>-*`).
    Log { path: Box<Path>, message: Box<str> },
}

impl StoreError {
    /// A [`StoreError::Log`] (boxed fields keep the error, which every commit's result
    /// carries, small).
    pub fn log(path: &Path, message: impl Into<String>) -> StoreError {
        StoreError::Log { path: path.into(), message: message.into().into() }
    }

    /// Another process held the file past `BUSY_TIMEOUT` (5 s): worth retrying soon, unlike a
    /// broken file.
    pub fn is_busy(&self) -> bool {
        let source = match self {
            StoreError::Open { source, .. }
            | StoreError::Load { source, .. }
            | StoreError::Commit { source } => source,
            StoreError::Directory { .. }
            | StoreError::NoWal { .. }
            | StoreError::Corrupt { .. }
            | StoreError::Thread { .. }
            | StoreError::Log { .. } => return false,
        };
        matches!(
            source.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        )
    }

    /// What a client whose request needed the store is told: a busy store is an overload
    /// (back off and retry), anything else an internal error.
    pub fn error_kind(&self) -> crate::protocol::ErrorKind {
        if self.is_busy() {
            crate::protocol::ErrorKind::ServerOverloaded
        } else {
            crate::protocol::ErrorKind::Internal
        }
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Directory { path, source } => {
                write!(f, "cannot create storage directory {}: {source}", path.display())
            }
            StoreError::Open { path, source } => {
                write!(f, "cannot open {}: {source}", path.display())
            }
            StoreError::NoWal { path, mode } => {
                write!(f, "{} cannot use WAL (journal_mode is {mode})", path.display())
            }
            StoreError::Load { group_id, source } => {
                write!(f, "cannot load client group {group_id}: {source}")
            }
            StoreError::Corrupt { group_id, message } => {
                write!(f, "client group {group_id} is corrupt in the store: {message}")
            }
            StoreError::Commit { source } => write!(f, "commit failed: {source}"),
            StoreError::Thread { source } => write!(f, "cannot start the store thread: {source}"),
            StoreError::Log { path, message } => {
                write!(f, "write-ahead log {}: {message}", path.display())
            }
        }
    }
}

impl std::error::Error for StoreError {}

/// A failed [`Store::commit`]: nothing of the batch was written.
pub struct CommitError {
    /// What SQLite reported.
    pub error: StoreError,
    /// The batch, given back: compaction retries it (its batches are on the log already).
    pub unwritten: Box<Batch>,
}

impl CommitError {
    /// Every group the batch writes. Their in-memory state is now ahead of the file: drop
    /// them without sending their pending pokes.
    pub fn groups(&self) -> Vec<String> {
        self.unwritten.groups()
    }
}

/// Writes staged for one commit, in order. The worker's loop fills one while the store
/// thread ([`super::store_thread`]) commits the one before: everything that arrives while a
/// sync is in flight goes into the next.
#[derive(Default)]
pub struct Batch {
    /// The writes, in the order they were staged.
    staged: Vec<Staged>,
    /// How many of them are changes (the rest pin owners), for the batch-size metric.
    changes: usize,
}

impl Batch {
    /// Stages a change of a group. Changes of one group must be staged in the order the
    /// replica produced them.
    pub fn stage(&mut self, group_id: &str, change: &Change) {
        let patch_json = Arc::clone(&change.json);
        let forgotten = change.forgotten_clients.clone();
        let forgotten_json =
            (!forgotten.is_empty()).then(|| serde_json::to_string(&forgotten).unwrap_or_default());
        self.staged.push(Staged::Change(StagedChange {
            group_id: group_id.to_owned(),
            base_version: to_sql_int(change.base_version),
            version: to_sql_int(change.version),
            history_floor: to_sql_int(change.history_floor),
            patch: Arc::clone(&change.patch),
            forgotten,
            patch_json,
            forgotten_json,
        }));
        self.changes += 1;
    }

    /// Stages pinning a group to the first verified user that joins it, so the pin survives
    /// restarts. A group already pinned keeps its owner.
    pub fn set_owner(&mut self, group_id: &str, user: &str) {
        self.staged.push(Staged::Owner { group_id: group_id.to_owned(), user: user.to_owned() });
    }

    pub fn is_empty(&self) -> bool {
        self.staged.is_empty()
    }

    /// The changes staged (owner pins not counted).
    pub fn changes(&self) -> usize {
        self.changes
    }

    /// Drops the changes staged for `group_id` (it went stale: they were based on a state
    /// the store no longer has, and the commit would refuse them).
    pub fn remove_changes_of(&mut self, group_id: &str) {
        self.staged.retain(|s| !matches!(s, Staged::Change(c) if c.group_id == group_id));
        self.changes = changes_in(&self.staged);
    }

    /// Appends `later`'s writes after this batch's: compaction folds several batches of the
    /// log into one transaction.
    pub fn extend(&mut self, later: Batch) {
        self.staged.extend(later.staged);
        self.changes += later.changes;
    }

    /// The group of each write, in order (a group once per write).
    pub fn touched_groups(&self) -> impl Iterator<Item = &str> {
        self.staged.iter().map(|s| match s {
            Staged::Change(c) => c.group_id.as_str(),
            Staged::Owner { group_id, .. } => group_id.as_str(),
        })
    }

    /// Bytes of the changes' patches (their JSON).
    pub fn patch_bytes(&self) -> usize {
        self.staged
            .iter()
            .map(|s| match s {
                Staged::Change(c) => c.patch_json.len(),
                Staged::Owner { .. } => 0,
            })
            .sum()
    }

    /// Each group's first change in the batch: the group and the version it is based on.
    pub fn bases(&self) -> Vec<(&str, i64)> {
        let mut bases: Vec<(&str, i64)> = Vec::new();
        for item in &self.staged {
            if let Staged::Change(c) = item {
                if !bases.iter().any(|(g, _)| *g == c.group_id) {
                    bases.push((&c.group_id, c.base_version));
                }
            }
        }
        bases
    }

    /// Every group the batch writes, once each, in order of first appearance.
    pub fn groups(&self) -> Vec<String> {
        let mut groups: Vec<String> = Vec::new();
        for group in self.touched_groups() {
            if !groups.iter().any(|g| g == group) {
                groups.push(group.to_owned());
            }
        }
        groups
    }

    /// Appends the batch as a log record's payload ([`super::wal`]): per write a tag, then
    /// its fields; strings as a u32 length and the bytes, numbers as u64, all little endian.
    /// The patch goes as the JSON the history keeps, so replaying a record writes the same
    /// rows a commit would have.
    pub fn encode(&self, out: &mut Vec<u8>) {
        fn string(out: &mut Vec<u8>, s: &str) {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        for item in &self.staged {
            match item {
                Staged::Owner { group_id, user } => {
                    out.push(b'O');
                    string(out, group_id);
                    string(out, user);
                }
                Staged::Change(c) => {
                    out.push(b'C');
                    string(out, &c.group_id);
                    for n in [c.base_version, c.version, c.history_floor] {
                        out.extend_from_slice(&(n as u64).to_le_bytes());
                    }
                    string(out, &c.patch_json);
                    out.extend_from_slice(&(c.forgotten.len() as u32).to_le_bytes());
                    for client in &c.forgotten {
                        string(out, client);
                    }
                }
            }
        }
    }

    /// Reads a payload [`Batch::encode`] wrote. An error means a record whose checksum
    /// verified holds something else: a bug or an edited file, never a torn write.
    pub fn decode(mut bytes: &[u8]) -> Result<Batch, String> {
        fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
            if bytes.len() < n {
                return Err("record ends inside a field".into());
            }
            let (head, rest) = bytes.split_at(n);
            *bytes = rest;
            Ok(head)
        }
        fn u32_of(bytes: &mut &[u8]) -> Result<u32, String> {
            Ok(u32::from_le_bytes(take(bytes, 4)?.try_into().expect("4 bytes")))
        }
        fn int(bytes: &mut &[u8]) -> Result<i64, String> {
            let n = u64::from_le_bytes(take(bytes, 8)?.try_into().expect("8 bytes"));
            i64::try_from(n).map_err(|_| format!("version {n} out of range"))
        }
        fn string(bytes: &mut &[u8]) -> Result<String, String> {
            let len = u32_of(bytes)? as usize;
            let raw = take(bytes, len)?;
            String::from_utf8(raw.to_vec()).map_err(|_| "a string is not UTF-8".into())
        }
        let mut batch = Batch::default();
        while let Some((&tag, rest)) = bytes.split_first() {
            bytes = rest;
            match tag {
                b'O' => {
                    let group_id = string(&mut bytes)?;
                    let user = string(&mut bytes)?;
                    batch.staged.push(Staged::Owner { group_id, user });
                }
                b'C' => {
                    let group_id = string(&mut bytes)?;
                    let (base_version, version, history_floor) =
                        (int(&mut bytes)?, int(&mut bytes)?, int(&mut bytes)?);
                    let json = string(&mut bytes)?;
                    let patch: Patch =
                        serde_json::from_str(&json).map_err(|e| format!("patch: {e}"))?;
                    let count = u32_of(&mut bytes)?;
                    let forgotten =
                        (0..count).map(|_| string(&mut bytes)).collect::<Result<Vec<_>, _>>()?;
                    let forgotten_json = (!forgotten.is_empty())
                        .then(|| serde_json::to_string(&forgotten).unwrap_or_default());
                    batch.staged.push(Staged::Change(StagedChange {
                        group_id,
                        base_version,
                        version,
                        history_floor,
                        patch: Arc::new(patch),
                        forgotten,
                        patch_json: Arc::from(json),
                        forgotten_json,
                    }));
                    batch.changes += 1;
                }
                other => return Err(format!("unknown write tag {other:#04x}")),
            }
        }
        Ok(batch)
    }
}

/// How many of `staged` are changes (the rest pin owners).
fn changes_in(staged: &[Staged]) -> usize {
    staged.iter().filter(|s| matches!(s, Staged::Change(_))).count()
}

/// One staged write.
enum Staged {
    /// Pin a group to its first verified user.
    Owner {
        /// The group.
        group_id: String,
        /// The user.
        user: String,
    },
    /// One change of a group.
    Change(StagedChange),
}

/// A [`Change`] as the commit writes it.
struct StagedChange {
    /// The group.
    group_id: String,
    /// The version the change was based on; must match the stored version.
    base_version: i64,
    /// The version after the change.
    version: i64,
    /// History at or below this version may be deleted.
    history_floor: i64,
    /// What changed, folded into the group's [`Pending`] once committed.
    patch: Arc<Patch>,
    /// Clients the change forgot, applied after the patch.
    forgotten: Vec<String>,
    /// The patch as JSON, for the history (the replica's, shared).
    patch_json: Arc<str>,
    /// `forgotten` as JSON, `None` when empty (most changes).
    forgotten_json: Option<String>,
}

/// What a group's changes since its last materialization come to: each row, client and
/// query in its latest state, folded in as the changes commit, so that the store holds one
/// copy of a busy row, not one per change.
#[derive(Default)]
struct Pending {
    /// Changes folded in, for [`MATERIALIZE_EVERY`].
    count: usize,
    /// Their patches' JSON bytes, for [`MATERIALIZE_BYTES`].
    bytes: usize,
    /// (table, row key) to the row, or `None` once deleted.
    rows: BTreeMap<(String, String), Option<Row>>,
    /// Client to last mutation ID.
    last_mutation_ids: BTreeMap<String, u64>,
    /// (client, query hash) to `Some(ttl)` (desired) or `None` (dropped).
    queries: BTreeMap<(String, String), Option<Option<f64>>>,
    /// Clients forgotten meanwhile: their records are deleted first, and whatever later
    /// changes say of them is written after.
    forgotten: BTreeSet<String>,
}

impl Pending {
    /// Folds in the next change: the patch, then the clients it forgot. The patch's rows are
    /// moved when nothing else holds it (the usual case once its poke is sent), else copied.
    fn fold(&mut self, patch: Arc<Patch>, forgotten: &[String], bytes: usize) {
        let patch = Arc::try_unwrap(patch).unwrap_or_else(|shared| (*shared).clone());
        for (table, rows) in patch.rows {
            for (key, row) in rows {
                self.rows.insert((table.clone(), key), row);
            }
        }
        self.last_mutation_ids.extend(patch.last_mutation_ids);
        for (client, queries) in patch.desired_queries {
            for (hash, query) in queries {
                self.queries.insert((client.clone(), hash), query.map(|q| q.ttl));
            }
        }
        for client in forgotten {
            self.last_mutation_ids.remove(client);
            self.queries.retain(|(c, _), _| c != client);
            self.forgotten.insert(client.clone());
        }
        self.count += 1;
        self.bytes += bytes;
    }
}

impl Store {
    /// Opens (creating if needed) `<dir>/syncgate.db`, switches it to WAL
    /// with `synchronous=FULL`, and brings its schema up to date.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| StoreError::Directory { path: dir.to_owned(), source })?;
        let path = dir.join(DB_FILE_NAME);
        let fail = |source| StoreError::Open { path: path.clone(), source };
        let mut conn = Connection::open(&path).map_err(fail)?;
        // First, so that the statements below wait for other processes.
        conn.busy_timeout(BUSY_TIMEOUT).map_err(fail)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(fail)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NoWal { path, mode });
        }
        // FULL: a commit is on disk (WAL fsynced) before it returns, so a
        // poke never acknowledges a mutation a power cut could lose.
        conn.pragma_update(None, "synchronous", "FULL").map_err(fail)?;
        // Every statement of the store stays prepared (rusqlite's default keeps 16, fewer than
        // the store's statements, and preparing costs more than running most of them).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        migrate(&mut conn).map_err(fail)?;
        Ok(Store { conn, staged: Batch::default(), pending: HashMap::new() })
    }

    /// Loads a group, or `None` if nothing of it was ever committed: the materialized state
    /// with the history after it replayed.
    ///
    /// Reads one consistent snapshot of the file. Do not load a group this
    /// process still holds (call [`Store::forget`] when dropping one): staged
    /// changes are not visible.
    pub fn load(&mut self, group_id: &str) -> Result<Option<StoredGroup>, StoreError> {
        let fail = |source| StoreError::Load { group_id: group_id.to_owned(), source };
        // Most loads are of a group never stored (every new client group): one statement
        // says so, without a transaction. A group's history is written in the transaction
        // that creates its `groups` row, so there is nothing else to read.
        let exists = self
            .conn
            .prepare_cached("SELECT 1 FROM groups WHERE group_id = ?1")
            .and_then(|mut s| s.exists([group_id]))
            .map_err(fail)?;
        if !exists {
            return Ok(None);
        }
        let tx = self.conn.transaction().map_err(fail)?;
        let loaded = load_group(&tx, group_id).map_err(fail)?;
        tx.finish().map_err(fail)?;
        let Some((group, pending)) = loaded else { return Ok(None) };
        if pending.count == 0 {
            self.pending.remove(group_id);
        } else {
            self.pending.insert(group_id.to_owned(), pending);
        }
        Ok(Some(group))
    }

    /// The version a group is stored at (0 for a group never stored), or `None` if its
    /// rows are inconsistent (see `stored_version`).
    pub fn version_of(&mut self, group_id: &str) -> Result<Option<i64>, StoreError> {
        let read = read_version(&self.conn, group_id)
            .map_err(|source| StoreError::Load { group_id: group_id.to_owned(), source })?;
        Ok(match read {
            Version::At(version) => Some(version),
            Version::Never => Some(0),
            Version::Inconsistent => None,
        })
    }

    /// Drops what the store remembers of a group this process no longer holds.
    pub fn forget(&mut self, group_id: &str) {
        self.pending.remove(group_id);
    }

    /// Stages a change of a group for the next [`Store::commit`] (see [`Batch::stage`]).
    pub fn stage(&mut self, group_id: &str, change: &Change) {
        self.staged.stage(group_id, change);
    }

    /// Stages pinning a group (see [`Batch::set_owner`]).
    pub fn set_owner(&mut self, group_id: &str, user: &str) {
        self.staged.set_owner(group_id, user);
    }

    /// Whether anything is staged.
    pub fn has_staged(&self) -> bool {
        !self.staged.is_empty()
    }

    /// Writes everything staged since the last commit in one transaction and
    /// waits for it to be on disk. See [`Committed`] and [`CommitError`].
    pub fn commit(&mut self) -> Result<Committed, CommitError> {
        let batch = std::mem::take(&mut self.staged);
        self.commit_batch(batch)
    }

    /// Writes `batch` in one transaction and waits for it to be on disk.
    pub fn commit_batch(&mut self, batch: Batch) -> Result<Committed, CommitError> {
        self.write(batch, Replay::No)
    }

    /// Writes a batch read back from a log after a crash: changes the file already has (the
    /// log was partly folded in before) are skipped, the rest written as a commit would.
    /// The replayed groups must not be in memory (their logs are another process's, or
    /// folded in already); nothing of them stays in the store's memory either.
    pub fn replay_batch(&mut self, batch: Batch) -> Result<Committed, CommitError> {
        let groups = batch.groups();
        let result = self.write(batch, Replay::SkipApplied);
        for group in &groups {
            self.pending.remove(group);
        }
        result
    }

    fn write(&mut self, batch: Batch, replay: Replay) -> Result<Committed, CommitError> {
        if batch.is_empty() {
            return Ok(Committed::default());
        }
        let staged = batch.staged;
        match write_batch(&mut self.conn, &staged, &mut self.pending, replay) {
            Ok(written) => {
                let Written { committed, logged, materialized } = written;
                for group in committed.stale_groups.iter().chain(&materialized) {
                    self.pending.remove(group);
                }
                let mut logged = logged.into_iter().peekable();
                for (i, item) in staged.into_iter().enumerate() {
                    if logged.next_if_eq(&i).is_none() {
                        continue;
                    }
                    let Staged::Change(change) = item else { continue };
                    if materialized.contains(&change.group_id) {
                        continue;
                    }
                    let bytes = change.patch_json.len();
                    let pending = self.pending.entry(change.group_id).or_default();
                    pending.fold(change.patch, &change.forgotten, bytes);
                }
                Ok(committed)
            }
            Err(e) => {
                let batch = Batch { changes: changes_in(&staged), staged };
                let groups = batch.groups();
                for group in &groups {
                    self.pending.remove(group);
                }
                Err(CommitError {
                    error: StoreError::Commit { source: e },
                    unwritten: Box::new(batch),
                })
            }
        }
    }
}

impl std::fmt::Debug for CommitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The batch given back is the caller's to retry, not worth printing.
        f.debug_struct("CommitError")
            .field("error", &self.error)
            .field("groups", &self.groups())
            .finish()
    }
}

/// Versions and mutation IDs are counters far below 2^63; saturating keeps
/// a corrupt huge value from wrapping into a negative one.
fn to_sql_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A stored counter; a negative one can only come from a corrupt file.
fn from_sql_int(value: i64) -> rusqlite::Result<u64> {
    u64::try_from(value).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(0, value))
}

/// Brings the schema up to [`MIGRATIONS`]; refuses a file from a newer
/// release. Runs under the write lock, so two processes starting at once
/// cannot both migrate.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let current: Option<i64> =
        tx.query_row("SELECT version FROM schema_version", [], |row| row.get(0)).optional()?;
    let current = current.unwrap_or(0);
    let known = MIGRATIONS.len() as i64;
    if current > known {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "the database has schema version {current}, newer than this release's {known}"
        )));
    }
    for migration in &MIGRATIONS[current as usize..] {
        tx.execute_batch(migration)?;
    }
    tx.execute("DELETE FROM schema_version", [])?;
    tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [known])?;
    tx.commit()
}

/// Reads a group inside a read transaction: its materialized state, then the history
/// replayed onto it. Also returns the replayed changes, which the next materialization
/// folds into the tables.
fn load_group(
    tx: &Transaction,
    group_id: &str,
) -> rusqlite::Result<Option<(StoredGroup, Pending)>> {
    let group: Option<(i64, Option<String>)> = tx
        .prepare_cached("SELECT version, owner FROM groups WHERE group_id = ?1")?
        .query_row([group_id], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let Some((version, owner)) = group else { return Ok(None) };
    let mut snapshot = ReplicaSnapshot { version: from_sql_int(version)?, ..Default::default() };

    let mut rows =
        tx.prepare_cached("SELECT table_name, row_key, value FROM rows WHERE group_id = ?1")?;
    let mut cursor = rows.query([group_id])?;
    while let Some(row) = cursor.next()? {
        let table: String = row.get(0)?;
        let key: String = row.get(1)?;
        let value: String = row.get(2)?;
        let value = serde_json::from_str(&value).map_err(|e| json_error(2, e))?;
        snapshot.rows.entry(table).or_default().insert(key, value);
    }

    let mut clients =
        tx.prepare_cached("SELECT client_id, last_mutation_id FROM clients WHERE group_id = ?1")?;
    let mut cursor = clients.query([group_id])?;
    while let Some(row) = cursor.next()? {
        let client: String = row.get(0)?;
        snapshot.clients.entry(client).or_default().last_mutation_id = from_sql_int(row.get(1)?)?;
    }

    let mut queries =
        tx.prepare_cached("SELECT client_id, hash, ttl FROM queries WHERE group_id = ?1")?;
    let mut cursor = queries.query([group_id])?;
    while let Some(row) = cursor.next()? {
        let client: String = row.get(0)?;
        let entry: &mut ClientSnapshot = snapshot.clients.entry(client).or_default();
        entry.desired_queries.insert(row.get(1)?, DesiredQuery { ttl: row.get(2)? });
    }

    let mut pending = Pending::default();
    let mut history = tx.prepare_cached(
        "SELECT version, patch, forgotten FROM history WHERE group_id = ?1 ORDER BY version",
    )?;
    let mut cursor = history.query([group_id])?;
    while let Some(row) = cursor.next()? {
        let version = from_sql_int(row.get(0)?)?;
        let json: String = row.get(1)?;
        if version > snapshot.version {
            let patch: Arc<Patch> =
                Arc::new(serde_json::from_str(&json).map_err(|e| json_error(1, e))?);
            // A change after the materialized state: replay it. The log has no gaps (each
            // commit checks its base against the last entry).
            if version != snapshot.version + 1 {
                return Err(rusqlite::Error::InvalidParameterName(format!(
                    "the history of client group {group_id} skips from version {} to {version}",
                    snapshot.version
                )));
            }
            let forgotten: Option<String> = row.get(2)?;
            let forgotten: Vec<String> = match forgotten {
                Some(json) => serde_json::from_str(&json).map_err(|e| json_error(2, e))?,
                None => Vec::new(),
            };
            replay(&mut snapshot, &patch, &forgotten);
            snapshot.version = version;
            pending.fold(patch, &forgotten, json.len());
        }
        // Older entries stay text: only a reconnecting client's catch-up parses them.
        snapshot.history.push(HistoryEntry { version, json: json.into() });
    }
    Ok(Some((StoredGroup { owner, snapshot }, pending)))
}

/// Applies one logged change to a loaded group: the patch, then the clients it forgot.
fn replay(snapshot: &mut ReplicaSnapshot, patch: &Patch, forgotten: &[String]) {
    for (table, rows) in &patch.rows {
        let stored = snapshot.rows.entry(table.clone()).or_default();
        for (key, row) in rows {
            match row {
                Some(row) => stored.insert(key.clone(), row.clone()),
                None => stored.remove(key),
            };
        }
        if stored.is_empty() {
            snapshot.rows.remove(table);
        }
    }
    for (client, id) in &patch.last_mutation_ids {
        snapshot.clients.entry(client.clone()).or_default().last_mutation_id = *id;
    }
    for (client, queries) in &patch.desired_queries {
        let desired = &mut snapshot.clients.entry(client.clone()).or_default().desired_queries;
        for (hash, query) in queries {
            match query {
                Some(query) => desired.insert(hash.clone(), query.clone()),
                None => desired.remove(hash),
            };
        }
    }
    for client in forgotten {
        snapshot.clients.remove(client);
    }
}

/// A stored JSON column that does not parse.
fn json_error(column: usize, e: serde_json::Error) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
}

/// What [`write_batch`] wrote.
struct Written {
    /// Groups skipped as stale.
    committed: Committed,
    /// The positions in the batch of the changes appended to the history, ascending.
    logged: Vec<usize>,
    /// Groups whose changes were folded into the tables (nothing of them is pending now).
    materialized: Vec<String>,
}

/// Whether a write may meet changes the file already has.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Replay {
    /// A commit: every change must follow the stored version, or its group is stale.
    No,
    /// A log read back after a crash: a change at or below the stored version is already
    /// in, and skipped.
    SkipApplied,
}

/// Writes one batch: each change appended to its group's history, then the groups due for it
/// materialized.
/// A group materialized here leaves `pending` (on failure the caller drops every group of the
/// batch from it anyway).
fn write_batch(
    conn: &mut Connection,
    staged: &[Staged],
    pending: &mut HashMap<String, Pending>,
    replay: Replay,
) -> rusqlite::Result<Written> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // The version each group is at within this batch, once checked; `None` once stale.
    let mut versions: HashMap<&str, Option<i64>> = HashMap::new();
    // The changes written, by group.
    let mut batch: BTreeMap<&str, Vec<&StagedChange>> = BTreeMap::new();
    let mut written =
        Written { committed: Committed::default(), logged: Vec::new(), materialized: Vec::new() };
    for (i, item) in staged.iter().enumerate() {
        match item {
            Staged::Owner { group_id, user } => {
                tx.prepare_cached(
                    "INSERT INTO groups (group_id, version, owner) VALUES (?1, 0, ?2)
                     ON CONFLICT (group_id) DO UPDATE SET owner = excluded.owner
                     WHERE groups.owner IS NULL",
                )?
                .execute(params![group_id, user])?;
            }
            Staged::Change(change) => {
                let group_id = change.group_id.as_str();
                let current = match versions.get(group_id) {
                    Some(&current) => current,
                    None => stored_version(&tx, group_id)?,
                };
                if replay == Replay::SkipApplied
                    && current.is_some_and(|stored| stored >= change.version)
                {
                    continue;
                }
                if current != Some(change.base_version) {
                    if versions.insert(group_id, None) != Some(None) {
                        written.committed.stale_groups.push(group_id.to_owned());
                    }
                    continue;
                }
                tx.prepare_cached(
                    "INSERT INTO history (group_id, version, patch, forgotten)
                     VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![
                    group_id,
                    change.version,
                    &*change.patch_json,
                    change.forgotten_json
                ])?;
                versions.insert(group_id, Some(change.version));
                batch.entry(group_id).or_default().push(change);
                written.logged.push(i);
            }
        }
    }
    // Materialize the groups whose log has grown enough, counting what this batch added.
    for (group_id, changes) in batch {
        let before = pending.get(group_id);
        let count = before.map_or(0, |p| p.count) + changes.len();
        let bytes = before.map_or(0, |p| p.bytes)
            + changes.iter().map(|c| c.patch_json.len()).sum::<usize>();
        if count < MATERIALIZE_EVERY && bytes < MATERIALIZE_BYTES {
            continue;
        }
        // The batch's changes are still staged, so folding them copies their rows: once per
        // materialization, not per push.
        let mut due = pending.remove(group_id).unwrap_or_default();
        for change in &changes {
            due.fold(Arc::clone(&change.patch), &change.forgotten, change.patch_json.len());
        }
        let last = changes.last().expect("a group in the batch has a change");
        materialize(&tx, group_id, &due, last.version, last.history_floor)?;
        written.materialized.push(group_id.to_owned());
    }
    tx.commit()?;
    Ok(written)
}

/// The version a group is stored at: the newer of its materialized version and its last
/// history entry; `Some(0)` for a group never stored (its `groups` row is created here, in
/// the transaction of its first change); `None` for a group whose history runs ahead of
/// nothing (impossible unless edited by hand: treated as stale).
fn stored_version(tx: &Transaction, group_id: &str) -> rusqlite::Result<Option<i64>> {
    match read_version(tx, group_id)? {
        Version::At(version) => Ok(Some(version)),
        Version::Never => {
            tx.prepare_cached("INSERT INTO groups (group_id, version) VALUES (?1, 0)")?
                .execute([group_id])?;
            Ok(Some(0))
        }
        Version::Inconsistent => Ok(None),
    }
}

/// What the file says of a group's version.
enum Version {
    /// The newer of its materialized version and its last history entry.
    At(i64),
    /// Nothing of it was ever stored.
    Never,
    /// History without a `groups` row: impossible unless edited by hand.
    Inconsistent,
}

fn read_version(conn: &Connection, group_id: &str) -> rusqlite::Result<Version> {
    let (materialized, logged): (Option<i64>, Option<i64>) = conn
        .prepare_cached(
            "SELECT (SELECT version FROM groups WHERE group_id = ?1),
                    (SELECT max(version) FROM history WHERE group_id = ?1)",
        )?
        .query_row([group_id], |row| Ok((row.get(0)?, row.get(1)?)))?;
    Ok(match (materialized, logged) {
        (Some(materialized), logged) => Version::At(materialized.max(logged.unwrap_or(0))),
        (None, None) => Version::Never,
        (None, Some(_)) => Version::Inconsistent,
    })
}

/// Writes what a group's changes since the last materialization come to into its tables
/// (each row, client and query once, in its latest state), moves its materialized version to
/// `version` and trims its history at or below `history_floor` (never above the version: the
/// history after it is the log).
fn materialize(
    tx: &Transaction,
    group: &str,
    pending: &Pending,
    version: i64,
    history_floor: i64,
) -> rusqlite::Result<()> {
    let Pending { rows, last_mutation_ids, queries, forgotten, .. } = pending;
    for client in forgotten {
        tx.prepare_cached("DELETE FROM clients WHERE group_id = ?1 AND client_id = ?2")?
            .execute(params![group, client])?;
        tx.prepare_cached("DELETE FROM queries WHERE group_id = ?1 AND client_id = ?2")?
            .execute(params![group, client])?;
    }
    for ((table, key), row) in rows {
        match row {
            Some(row) => {
                let mut value = Vec::new();
                crate::protocol::json::write_object(&mut value, row);
                let value = String::from_utf8(value).expect("JSON written from strings is UTF-8");
                tx.prepare_cached(
                    "INSERT INTO rows (group_id, table_name, row_key, value) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (group_id, table_name, row_key) DO UPDATE SET value = excluded.value",
                )?
                .execute(params![group, table, key, value])?
            }
            None => tx
                .prepare_cached(
                    "DELETE FROM rows WHERE group_id = ?1 AND table_name = ?2 AND row_key = ?3",
                )?
                .execute(params![group, table, key])?,
        };
    }
    for (client, id) in last_mutation_ids {
        tx.prepare_cached(
            "INSERT INTO clients (group_id, client_id, last_mutation_id) VALUES (?1, ?2, ?3)
             ON CONFLICT (group_id, client_id) DO UPDATE SET last_mutation_id = excluded.last_mutation_id",
        )?
        .execute(params![group, client, to_sql_int(*id)])?;
    }
    for ((client, hash), query) in queries {
        match query {
            Some(ttl) => tx
                .prepare_cached(
                    "INSERT INTO queries (group_id, client_id, hash, ttl) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (group_id, client_id, hash) DO UPDATE SET ttl = excluded.ttl",
                )?
                .execute(params![group, client, hash, ttl])?,
            None => tx
                .prepare_cached(
                    "DELETE FROM queries WHERE group_id = ?1 AND client_id = ?2 AND hash = ?3",
                )?
                .execute(params![group, client, hash])?,
        };
    }
    tx.prepare_cached("UPDATE groups SET version = ?2 WHERE group_id = ?1")?
        .execute(params![group, version])?;
    tx.prepare_cached("DELETE FROM history WHERE group_id = ?1 AND version <= ?2")?
        .execute(params![group, history_floor.min(version)])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Mutation, QueriesPatchOp, QueryPut};
    use crate::sync::replica::{CatchUp, GroupLimits, PushResult, Replica};
    use crate::testing::TempDir;
    use serde_json::{json, Value};

    fn crud(client: &str, id: u64, ops: Value) -> Mutation {
        crate::testing::crud("g", client, id, ops)
    }

    fn insert(id: &str, title: &str) -> Value {
        json!([{"op": "insert", "tableName": "issue", "primaryKey": ["id"],
                "value": {"id": id, "title": title}}])
    }

    fn put_query(hash: &str) -> QueriesPatchOp {
        QueriesPatchOp::Put(QueryPut {
            hash: hash.into(),
            ast: None,
            name: None,
            args: None,
            ttl: Some(300000.0),
            retry_error_version: None,
        })
    }

    fn change_of(result: PushResult) -> Change {
        match result {
            PushResult::Applied(change) => change,
            PushResult::Failed { change, .. } | PushResult::LimitExceeded { change, .. } => change,
            other => panic!("no change: {other:?}"),
        }
    }

    fn reload(store: &mut Store, group: &str, limits: GroupLimits) -> Replica {
        let stored = store.load(group).unwrap().expect("group stored");
        Replica::from_snapshot(group, limits, stored.snapshot).unwrap()
    }

    #[test]
    fn persisted_state_reloads_identically() {
        let dir = TempDir::new();
        let mut store = Store::open(&dir.0).unwrap();
        let limits = GroupLimits { max_history: 4, ..GroupLimits::default() };
        let mut replica = Replica::new("g", limits.clone());
        store.set_owner("g", "alice");
        let mut changes = vec![
            change_of(replica.apply_push(crud("c1", 1, insert("i1", "a")))),
            replica
                .change_desired_queries("c1", &[put_query("q1"), put_query("q2")])
                .unwrap()
                .unwrap(),
            change_of(replica.apply_push(crud("c2", 1, insert("i2", "b")))),
            // A failed mutation: only the lmid.
            change_of(replica.apply_push(crud("c1", 2, insert("i2", "dup")))),
            replica.change_desired_queries("c2", &[put_query("q1")]).unwrap().unwrap(),
        ];
        changes.push(change_of(replica.apply_push(crud("c1", 3, json!([
            {"op": "delete", "tableName": "issue", "primaryKey": ["id"], "value": {"id": "i1"}},
            {"op": "upsert", "tableName": "issue", "primaryKey": ["id"], "value": {"id": "i3", "n": 1.5}},
        ])))));
        changes.push(
            replica
                .change_desired_queries("c1", &[QueriesPatchOp::Del { hash: "q2".into() }])
                .unwrap()
                .unwrap(),
        );
        changes.push(replica.delete_clients(&["c2".into()]).unwrap());
        for change in &changes {
            store.stage("g", change);
        }
        assert!(store.commit().unwrap().stale_groups.is_empty());

        let mut reopened = Store::open(&dir.0).unwrap();
        let stored = reopened.load("g").unwrap().unwrap();
        assert_eq!(stored.owner.as_deref(), Some("alice"));
        // The file may keep history beyond the bound (trimmed in batches); a load trims it.
        assert!(stored.snapshot.history.len() >= 4);
        let copy = Replica::from_snapshot("g", limits, stored.snapshot).unwrap();
        assert_eq!(copy.snapshot(), replica.snapshot());
        assert_eq!(copy.cookie(), replica.cookie());
        assert_eq!(copy.row_bytes(), replica.row_bytes());
        // Catch-up from the oldest kept cookie is the same poke as before.
        let oldest = crate::protocol::cookie::version_to_cookie(replica.version() - 4);
        let before = replica.check_connect("c1", Some(&oldest), 0).unwrap();
        assert!(matches!(before, CatchUp::Poke(_)));
        assert_eq!(copy.check_connect("c1", Some(&oldest), 0).unwrap(), before);
        assert!(reopened.load("other").unwrap().is_none());
    }

    /// Rows in one of the store's tables.
    fn rows_in(store: &Store, table: &str) -> i64 {
        let sql = format!("SELECT count(*) FROM {table}");
        store.conn.query_row(&sql, [], |row| row.get(0)).unwrap()
    }

    #[test]
    fn a_commit_appends_to_the_log_and_every_64th_version_materializes() {
        let dir = TempDir::new();
        let mut store = Store::open(&dir.0).unwrap();
        let mut replica = Replica::new("g", GroupLimits::default());
        for id in 1..MATERIALIZE_EVERY as u64 {
            let ops = json!([{"op": "upsert", "tableName": "issue", "primaryKey": ["id"],
                              "value": {"id": "i1", "n": id}}]);
            store.stage("g", &change_of(replica.apply_push(crud("c1", id, ops))));
            store.commit().unwrap();
        }
        // Only the log was written: the tables still hold version 0.
        assert_eq!((rows_in(&store, "rows"), rows_in(&store, "clients")), (0, 0));
        // In memory the store holds one copy of the busy row, not one per change.
        let pending = &store.pending["g"];
        assert_eq!((pending.count, pending.rows.len()), (MATERIALIZE_EVERY - 1, 1));
        assert_eq!(rows_in(&store, "history"), MATERIALIZE_EVERY as i64 - 1);
        let stored = store.load("g").unwrap().unwrap();
        assert_eq!(stored.snapshot, replica.snapshot(), "the log replays to the same state");

        let last = MATERIALIZE_EVERY as u64;
        store.stage("g", &change_of(replica.apply_push(crud("c1", last, insert("i2", "b")))));
        store.commit().unwrap();
        // The 64th version folded 64 changes into one row per row and client.
        assert_eq!((rows_in(&store, "rows"), rows_in(&store, "clients")), (2, 1));
        let materialized: i64 =
            store.conn.query_row("SELECT version FROM groups", [], |r| r.get(0)).unwrap();
        assert_eq!(materialized, last as i64);
        let stored = store.load("g").unwrap().unwrap();
        assert_eq!(stored.snapshot, replica.snapshot());
    }

    #[test]
    fn materialization_resumes_after_the_group_moves_to_another_process() {
        let dir = TempDir::new();
        let limits = GroupLimits { max_history: 8, ..GroupLimits::default() };
        let mut first = Store::open(&dir.0).unwrap();
        let mut replica = Replica::new("g", limits.clone());
        let push = |store: &mut Store,
                    replica: &mut Replica,
                    client: &str,
                    ids: std::ops::RangeInclusive<u64>| {
            for id in ids {
                let ops = json!([{"op": "upsert", "tableName": "t", "primaryKey": ["id"],
                                  "value": {"id": id % 3, "v": id}}]);
                store.stage("g", &change_of(replica.apply_push(crud(client, id, ops))));
            }
            store.commit().unwrap();
        };
        // Materialized at 64; 65..=70 are only in the log.
        push(&mut first, &mut replica, "c1", 1..=64);
        push(&mut first, &mut replica, "c1", 65..=70);
        first.forget("g");
        // Another process takes the group over from the file, forgets a client, goes on.
        let mut second = Store::open(&dir.0).unwrap();
        let mut moved = reload(&mut second, "g", limits.clone());
        assert_eq!(moved.snapshot(), replica.snapshot());
        let forget = moved.delete_clients(&["c1".into()]).unwrap();
        second.stage("g", &forget);
        second.commit().unwrap();
        push(&mut second, &mut moved, "c2", 1..=57);
        // Version 128 materialized what the first process had logged too.
        let materialized: i64 =
            second.conn.query_row("SELECT version FROM groups", [], |r| r.get(0)).unwrap();
        assert_eq!(materialized, 128);
        assert_eq!(rows_in(&second, "clients"), 1);
        assert!(rows_in(&second, "history") <= 8 + 3, "trimmed to the replica's bound");
        let mut third = Store::open(&dir.0).unwrap();
        assert_eq!(reload(&mut third, "g", limits).snapshot(), moved.snapshot());
    }

    #[test]
    fn the_history_on_disk_is_trimmed_like_the_one_in_memory() {
        let dir = TempDir::new();
        let mut store = Store::open(&dir.0).unwrap();
        let limits = GroupLimits { max_history: 2, ..GroupLimits::default() };
        let mut replica = Replica::new("g", limits.clone());
        let count = |store: &Store| -> i64 {
            store.conn.query_row("SELECT count(*) FROM history", [], |row| row.get(0)).unwrap()
        };
        let mut most = 0;
        for id in 1..=70 {
            let change = change_of(replica.apply_push(crud("c1", id, json!([]))));
            store.stage("g", &change);
            store.commit().unwrap();
            most = most.max(count(&store));
        }
        // Trimmed to the bound at version 64 (63 and 64 kept), then 65..=70 added.
        assert_eq!(count(&store), 8);
        // At most: versions 1..=63, before the first materialization.
        assert_eq!(most, MATERIALIZE_EVERY as i64 - 1);
        let copy = reload(&mut store, "g", limits.clone());
        assert_eq!(copy.snapshot().history, replica.snapshot().history);

        // A large patch materializes, and so trims, at once.
        let big = "x".repeat(MATERIALIZE_BYTES);
        let change = change_of(replica.apply_push(crud("c1", 71, insert("i", &big))));
        store.stage("g", &change);
        store.commit().unwrap();
        assert_eq!(count(&store), 2);
        let copy = reload(&mut store, "g", limits);
        assert_eq!(copy.snapshot().history, replica.snapshot().history);
    }

    #[test]
    fn a_new_group_and_a_stale_group_are_told_apart() {
        let dir = TempDir::new();
        let mut first = Store::open(&dir.0).unwrap();
        let mut second = Store::open(&dir.0).unwrap();
        // Both processes load the group while it does not exist.
        let mut a = Replica::new("g", GroupLimits::default());
        let mut b = Replica::new("g", GroupLimits::default());
        first.stage("g", &change_of(a.apply_push(crud("c1", 1, insert("i1", "x")))));
        assert!(first.commit().unwrap().stale_groups.is_empty());
        // The second one's change was based on version 0 too: stale, nothing written.
        second.stage("g", &change_of(b.apply_push(crud("c2", 1, insert("i2", "y")))));
        assert_eq!(second.commit().unwrap().stale_groups, vec!["g".to_string()]);
        assert_eq!(reload(&mut second, "g", GroupLimits::default()).snapshot(), a.snapshot());
        // Two changes of one group in one batch: the second follows the first.
        first.stage("g", &change_of(a.apply_push(crud("c1", 2, insert("i3", "z")))));
        first.stage("g", &change_of(a.apply_push(crud("c1", 3, insert("i4", "w")))));
        assert!(first.commit().unwrap().stale_groups.is_empty());
        assert_eq!(reload(&mut second, "g", GroupLimits::default()).snapshot(), a.snapshot());
    }

    #[test]
    fn two_stores_on_one_file_see_each_others_commits() {
        let dir = TempDir::new();
        let mut first = Store::open(&dir.0).unwrap();
        let mut second = Store::open(&dir.0).unwrap();
        let mut a = Replica::new("a", GroupLimits::default());
        first.stage("a", &change_of(a.apply_push(crud("c1", 1, insert("i1", "x")))));
        first.commit().unwrap();
        assert_eq!(reload(&mut second, "a", GroupLimits::default()).snapshot(), a.snapshot());

        let mut b = Replica::new("b", GroupLimits::default());
        second.stage("b", &change_of(b.apply_push(crud("c9", 1, insert("j", "y")))));
        second.set_owner("b", "bob");
        second.commit().unwrap();
        let stored = first.load("b").unwrap().unwrap();
        assert_eq!((stored.owner.as_deref(), stored.snapshot), (Some("bob"), b.snapshot()));
    }

    #[test]
    fn a_crash_before_commit_loses_only_the_uncommitted_changes() {
        let dir = TempDir::new();
        let mut replica = Replica::new("g", GroupLimits::default());
        let committed;
        {
            let mut store = Store::open(&dir.0).unwrap();
            store.stage("g", &change_of(replica.apply_push(crud("c1", 1, insert("i1", "x")))));
            store.commit().unwrap();
            committed = replica.snapshot();
            store.stage("g", &change_of(replica.apply_push(crud("c1", 2, insert("i2", "y")))));
            store.set_owner("g", "mallory");
            assert!(store.has_staged());
            // The process dies here: the store goes away without a commit.
        }
        let mut store = Store::open(&dir.0).unwrap();
        let stored = store.load("g").unwrap().unwrap();
        assert_eq!(stored.snapshot, committed);
        assert_eq!(stored.owner, None);
        // The lost mutation is simply expected again.
        let mut recovered =
            Replica::from_snapshot("g", GroupLimits::default(), stored.snapshot).unwrap();
        assert_eq!(recovered.last_mutation_id("c1"), 1);
        assert!(matches!(
            recovered.apply_push(crud("c1", 2, insert("i2", "y"))),
            PushResult::Applied(_)
        ));
    }

    #[test]
    fn a_group_changed_elsewhere_is_reported_stale() {
        let dir = TempDir::new();
        let mut first = Store::open(&dir.0).unwrap();
        let mut second = Store::open(&dir.0).unwrap();
        let mut original = Replica::new("g", GroupLimits::default());
        first.stage("g", &change_of(original.apply_push(crud("c1", 1, insert("i1", "x")))));
        first.commit().unwrap();
        // Both processes hold version 1 of the group.
        let mut other = reload(&mut second, "g", GroupLimits::default());
        second.stage("g", &change_of(other.apply_push(crud("c1", 2, insert("i2", "other")))));
        second.commit().unwrap();

        let mut unrelated = Replica::new("h", GroupLimits::default());
        first.stage("g", &change_of(original.apply_push(crud("c1", 2, insert("i2", "mine")))));
        first.stage("g", &change_of(original.apply_push(crud("c1", 3, insert("i3", "mine")))));
        first.stage("h", &change_of(unrelated.apply_push(crud("c1", 1, insert("k", "z")))));
        let committed = first.commit().unwrap();
        assert_eq!(committed.stale_groups, vec!["g".to_string()]);
        // The other process's write stands; the other group of the batch is in.
        assert_eq!(reload(&mut first, "g", GroupLimits::default()).snapshot(), other.snapshot());
        assert_eq!(
            reload(&mut first, "h", GroupLimits::default()).snapshot(),
            unrelated.snapshot()
        );
    }

    #[test]
    fn an_owner_pin_is_never_replaced() {
        let dir = TempDir::new();
        let mut store = Store::open(&dir.0).unwrap();
        store.set_owner("g", "alice");
        store.commit().unwrap();
        store.set_owner("g", "mallory");
        store.commit().unwrap();
        let stored = store.load("g").unwrap().unwrap();
        assert_eq!(stored.owner.as_deref(), Some("alice"));
        assert_eq!(stored.snapshot, ReplicaSnapshot::default());
        // A pinned but empty group takes its first change at version 0.
        let mut replica =
            Replica::from_snapshot("g", GroupLimits::default(), stored.snapshot).unwrap();
        store.stage("g", &change_of(replica.apply_push(crud("c1", 1, json!([])))));
        assert!(store.commit().unwrap().stale_groups.is_empty());
        assert_eq!(store.load("g").unwrap().unwrap().snapshot.version, 1);
    }

    #[test]
    fn the_file_is_durable_and_versioned() {
        let dir = TempDir::new();
        let store = Store::open(&dir.0).unwrap();
        let mode: String = store.conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        let sync: i64 = store.conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!((mode.as_str(), sync), ("wal", 2), "WAL with synchronous=FULL");
        let version: i64 =
            store.conn.query_row("SELECT version FROM schema_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        drop(store);
        // Opening again migrates nothing and keeps one version row.
        let store = Store::open(&dir.0).unwrap();
        let rows: i64 =
            store.conn.query_row("SELECT count(*) FROM schema_version", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 1);
        store.conn.execute("UPDATE schema_version SET version = 99", []).unwrap();
        drop(store);
        let error = Store::open(&dir.0).err().unwrap().to_string();
        assert!(error.contains("schema version 99"), "{error}");
    }

    #[test]
    fn corrupt_rows_fail_the_load_and_a_failed_commit_names_its_groups() {
        let dir = TempDir::new();
        let mut store = Store::open(&dir.0).unwrap();
        let mut replica = Replica::new("g", GroupLimits::default());
        store.stage("g", &change_of(replica.apply_push(crud("c1", 1, insert("i1", "x")))));
        store.commit().unwrap();
        store.conn.execute("UPDATE history SET patch = 'not json'", []).unwrap();
        let error = store.load("g").unwrap_err();
        assert!(matches!(&error, StoreError::Load { group_id, .. } if group_id == "g"));
        assert_eq!(error.error_kind(), crate::protocol::ErrorKind::Internal);
        let error = error.to_string();
        assert!(error.contains("cannot load client group g"), "{error}");
        // A log with a hole cannot be replayed.
        let empty = serde_json::to_string(&Patch::default()).unwrap();
        store.conn.execute("UPDATE history SET patch = ?1, version = 2", [empty]).unwrap();
        let error = store.load("g").unwrap_err().to_string();
        assert!(error.contains("skips from version 0 to 2"), "{error}");
        store.conn.execute("UPDATE history SET version = 1", []).unwrap();

        // A commit that cannot write reports every group of its batch.
        store.conn.execute_batch("DROP TABLE history").unwrap();
        store.stage("g", &change_of(replica.apply_push(crud("c1", 2, json!([])))));
        store.set_owner("h", "u");
        let error = store.commit().unwrap_err();
        assert_eq!(error.groups(), vec!["g".to_string(), "h".to_string()]);
        assert!(error.error.to_string().contains("history"), "{}", error.error);
        assert!(!store.has_staged());
    }

    #[test]
    fn a_missing_directory_is_created_and_an_unusable_path_refused() {
        let dir = TempDir::new();
        let nested = dir.0.join("a/b");
        assert!(Store::open(&nested).is_ok());
        assert!(nested.join(DB_FILE_NAME).exists());
        let file = dir.0.join("file");
        std::fs::write(&file, b"x").unwrap();
        let error = Store::open(&file).err().unwrap();
        assert!(matches!(error, StoreError::Directory { .. }));
        let error = error.to_string();
        assert!(error.contains("cannot create storage directory"), "{error}");
    }
}
