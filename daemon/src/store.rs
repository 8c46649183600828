//! Durable client groups: one SQLite file shared by every worker process.
//!
//! A client's acknowledged mutation must survive a worker crash, a daemon
//! restart, and its group moving to another worker. So the worker stages
//! every [`Change`] of a loop iteration here, commits them in one
//! transaction (WAL, `synchronous=FULL`: the commit returns after the fsync),
//! and only then sends the pokes that acknowledge them. One transaction per
//! iteration, not per mutation, keeps the fsyncs few under load.
//!
//! Several processes open the file at once; SQLite's locking serializes their
//! commits and `busy_timeout` makes a writer wait its turn. A group is written
//! by the one worker that owns it, but during a handover (a restarted worker,
//! a graceful replacement) two processes may briefly hold the same group. A
//! change therefore carries the version it was based on, and the commit skips
//! the changes of a group whose stored version differs: that process lost the
//! group and must drop it (its clients reconnect and load the current state).
//!
//! Layout (schema version 1): `groups` (version and pinned owner), `rows`,
//! `clients` (last mutation IDs), `queries` (desired queries) and `history`
//! (recent patches as JSON, for catch-up). `schema_version` holds the number
//! of `MIGRATIONS` applied; a later release appends migrations.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::replica::{Change, ClientSnapshot, DesiredQuery, HistoryEntry, Patch, ReplicaSnapshot};

/// The database file inside the storage directory.
pub const DB_FILE_NAME: &str = "syncgate.db";

/// How long a commit or load waits for another process's write to finish.
/// Commits hold the lock for one fsync, so a wait this long means something
/// is stuck, and failing is better than blocking the worker's loop forever.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Prepared statements kept per connection: room for all of the store's (about 20).
const STATEMENT_CACHE: usize = 32;

/// The stored history is trimmed to the replica's bounds every this many versions of a
/// group (and after any patch of [`HISTORY_TRIM_BYTES`] or more), not on every change.
const HISTORY_TRIM_EVERY: i64 = 64;
/// A patch this large trims the stored history at once.
const HISTORY_TRIM_BYTES: usize = 64 * 1024;

/// The schema, one step per release that changed it; `schema_version` holds
/// how many have run. Never edit a step that has shipped: append one.
const MIGRATIONS: &[&str] = &["
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
"];

/// The storage of every client group, over one SQLite connection.
pub struct Store {
    /// The connection; one per process.
    conn: Connection,
    /// What [`Store::commit`] will write, in the order it was staged.
    staged: Vec<Staged>,
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

/// A failed [`Store::commit`]: nothing of the batch was written.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitError {
    /// What SQLite reported.
    pub message: String,
    /// Every group with staged changes in the batch. Their in-memory state is
    /// now ahead of the file: drop them without sending their pending pokes.
    pub groups: Vec<String>,
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
    /// One change of a group, already turned into column values.
    Change(StagedChange),
}

/// A [`Change`] as the values to write, prepared at staging time so that the
/// commit only runs statements.
struct StagedChange {
    /// The group.
    group_id: String,
    /// The version the change was based on; must match the stored version.
    base_version: i64,
    /// The version after the change.
    version: i64,
    /// History at or below this version is deleted.
    history_floor: i64,
    /// (table, key, row JSON or `None` for a delete).
    rows: Vec<(String, String, Option<String>)>,
    /// (client, last mutation ID).
    last_mutation_ids: Vec<(String, i64)>,
    /// (client, hash, `Some(ttl)` to store the query or `None` to drop it).
    queries: Vec<(String, String, Option<Option<f64>>)>,
    /// Clients to forget entirely.
    forgotten_clients: Vec<String>,
    /// The patch as JSON, for the history.
    patch: String,
}

impl Store {
    /// Opens (creating if needed) `<dir>/syncgate.db`, switches it to WAL
    /// with `synchronous=FULL`, and brings its schema up to date.
    pub fn open(dir: &Path) -> Result<Store, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create storage directory {}: {e}", dir.display()))?;
        let path = dir.join(DB_FILE_NAME);
        let fail = |e: rusqlite::Error| format!("cannot open {}: {e}", path.display());
        let mut conn = Connection::open(&path).map_err(fail)?;
        // First, so that the statements below wait for other processes.
        conn.busy_timeout(BUSY_TIMEOUT).map_err(fail)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(fail)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(format!("{} cannot use WAL (journal_mode is {mode})", path.display()));
        }
        // FULL: a commit is on disk (WAL fsynced) before it returns, so a
        // poke never acknowledges a mutation a power cut could lose.
        conn.pragma_update(None, "synchronous", "FULL").map_err(fail)?;
        // Every statement of the store stays prepared (rusqlite's default keeps 16, fewer than
        // the store's statements, and preparing costs more than running most of them).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        migrate(&mut conn).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Store { conn, staged: Vec::new() })
    }

    /// Loads a group, or `None` if nothing of it was ever committed.
    ///
    /// Reads one consistent snapshot of the file. Do not load a group this
    /// process still holds changes for: staged changes are not visible.
    pub fn load(&mut self, group_id: &str) -> Result<Option<StoredGroup>, String> {
        let fail = |e: rusqlite::Error| format!("cannot load client group {group_id}: {e}");
        // Most loads are of a group never stored (every new client group): one statement
        // says so, without a transaction. A group's rows are written in the transaction that
        // creates its `groups` row, so there is nothing else to read.
        let exists = self
            .conn
            .prepare_cached("SELECT 1 FROM groups WHERE group_id = ?1")
            .and_then(|mut s| s.exists([group_id]))
            .map_err(fail)?;
        if !exists {
            return Ok(None);
        }
        let tx = self.conn.transaction().map_err(fail)?;
        let group = load_group(&tx, group_id)
            .map_err(|e| format!("cannot load client group {group_id}: {e}"))?;
        tx.finish().map_err(fail)?;
        Ok(group)
    }

    /// Stages a change of a group for the next [`Store::commit`]. Changes of
    /// one group must be staged in the order the replica produced them.
    pub fn stage(&mut self, group_id: &str, change: &Change) {
        let patch = &change.patch;
        let rows = patch
            .rows
            .iter()
            .flat_map(|(table, rows)| rows.iter().map(move |(key, row)| (table, key, row)))
            .map(|(table, key, row)| {
                // A map of JSON values always serializes.
                let json = row.as_ref().map(|r| serde_json::to_string(r).unwrap_or_default());
                (table.clone(), key.clone(), json)
            })
            .collect();
        let queries = patch
            .desired_queries
            .iter()
            .flat_map(|(client, queries)| queries.iter().map(move |(hash, q)| (client, hash, q)))
            .map(|(client, hash, query)| {
                (client.clone(), hash.clone(), query.as_ref().map(|q| q.ttl))
            })
            .collect();
        self.staged.push(Staged::Change(StagedChange {
            group_id: group_id.to_owned(),
            base_version: to_sql_int(change.base_version),
            version: to_sql_int(change.version),
            history_floor: to_sql_int(change.history_floor),
            rows,
            last_mutation_ids: patch
                .last_mutation_ids
                .iter()
                .map(|(client, id)| (client.clone(), to_sql_int(*id)))
                .collect(),
            queries,
            forgotten_clients: change.forgotten_clients.clone(),
            // Serializing plain maps of strings and JSON values cannot fail.
            patch: serde_json::to_string(&**patch).unwrap_or_default(),
        }));
    }

    /// Stages pinning a group to the first verified user that joins it, so
    /// the pin survives restarts. A group already pinned keeps its owner.
    pub fn set_owner(&mut self, group_id: &str, user: &str) {
        self.staged.push(Staged::Owner { group_id: group_id.to_owned(), user: user.to_owned() });
    }

    /// Whether anything is staged.
    pub fn has_staged(&self) -> bool {
        !self.staged.is_empty()
    }

    /// Writes everything staged since the last commit in one transaction and
    /// waits for it to be on disk. See [`Committed`] and [`CommitError`].
    pub fn commit(&mut self) -> Result<Committed, CommitError> {
        if self.staged.is_empty() {
            return Ok(Committed::default());
        }
        let staged = std::mem::take(&mut self.staged);
        write_batch(&mut self.conn, &staged).map_err(|e| {
            let mut groups: Vec<String> = Vec::new();
            for item in &staged {
                let group_id = match item {
                    Staged::Owner { group_id, .. } => group_id,
                    Staged::Change(change) => &change.group_id,
                };
                if !groups.contains(group_id) {
                    groups.push(group_id.clone());
                }
            }
            CommitError { message: e.to_string(), groups }
        })
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

/// Reads a group inside a read transaction.
fn load_group(tx: &Transaction, group_id: &str) -> rusqlite::Result<Option<StoredGroup>> {
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

    let mut history = tx.prepare_cached(
        "SELECT version, patch FROM history WHERE group_id = ?1 ORDER BY version",
    )?;
    let mut cursor = history.query([group_id])?;
    while let Some(row) = cursor.next()? {
        let patch: String = row.get(1)?;
        let patch: Patch = serde_json::from_str(&patch).map_err(|e| json_error(1, e))?;
        snapshot
            .history
            .push(HistoryEntry { version: from_sql_int(row.get(0)?)?, patch: patch.into() });
    }
    Ok(Some(StoredGroup { owner, snapshot }))
}

/// A stored JSON column that does not parse.
fn json_error(column: usize, e: serde_json::Error) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
}

/// Writes one batch; returns the groups skipped as stale.
fn write_batch(conn: &mut Connection, staged: &[Staged]) -> rusqlite::Result<Committed> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // The version each group is at within this batch, once checked.
    let mut versions: HashMap<&str, i64> = HashMap::new();
    let mut stale: HashSet<&str> = HashSet::new();
    let mut committed = Committed::default();
    for item in staged {
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
                if stale.contains(group_id) {
                    continue;
                }
                let advanced = match versions.get(group_id) {
                    // A later change of a group this batch has advanced already.
                    Some(&version) if version == change.base_version => {
                        tx.prepare_cached("UPDATE groups SET version = ?2 WHERE group_id = ?1")?
                            .execute(params![group_id, change.version])?;
                        true
                    }
                    Some(_) => false,
                    None => advance_version(&tx, change)?,
                };
                if !advanced {
                    stale.insert(group_id);
                    committed.stale_groups.push(group_id.to_owned());
                    continue;
                }
                write_change(&tx, change)?;
                versions.insert(group_id, change.version);
            }
        }
    }
    tx.commit()?;
    Ok(committed)
}

/// Moves a group from the change's base version to its version, the first time the batch
/// touches the group: false if the stored version is another (another process changed the
/// group since this one loaded it). One statement in the usual case: the check is the
/// update's condition.
fn advance_version(tx: &Transaction, change: &StagedChange) -> rusqlite::Result<bool> {
    let group = &change.group_id;
    let updated = tx
        .prepare_cached("UPDATE groups SET version = ?3 WHERE group_id = ?1 AND version = ?2")?
        .execute(params![group, change.base_version, change.version])?;
    if updated == 1 {
        return Ok(true);
    }
    // Not updated: a group never stored (its base is 0), or a stale one.
    let inserted = tx
        .prepare_cached(
            "INSERT INTO groups (group_id, version) VALUES (?1, ?2)
             ON CONFLICT (group_id) DO NOTHING",
        )?
        .execute(params![group, change.version])?;
    Ok(inserted == 1 && change.base_version == 0)
}

/// Writes one change whose base version matched (the group's version is already advanced).
fn write_change(tx: &Transaction, change: &StagedChange) -> rusqlite::Result<()> {
    let group = &change.group_id;
    for (table, key, value) in &change.rows {
        match value {
            Some(value) => tx
                .prepare_cached(
                    "INSERT INTO rows (group_id, table_name, row_key, value) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (group_id, table_name, row_key) DO UPDATE SET value = excluded.value",
                )?
                .execute(params![group, table, key, value])?,
            None => tx
                .prepare_cached(
                    "DELETE FROM rows WHERE group_id = ?1 AND table_name = ?2 AND row_key = ?3",
                )?
                .execute(params![group, table, key])?,
        };
    }
    for (client, id) in &change.last_mutation_ids {
        tx.prepare_cached(
            "INSERT INTO clients (group_id, client_id, last_mutation_id) VALUES (?1, ?2, ?3)
             ON CONFLICT (group_id, client_id) DO UPDATE SET last_mutation_id = excluded.last_mutation_id",
        )?
        .execute(params![group, client, id])?;
    }
    for (client, hash, query) in &change.queries {
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
    for client in &change.forgotten_clients {
        tx.prepare_cached("DELETE FROM clients WHERE group_id = ?1 AND client_id = ?2")?
            .execute(params![group, client])?;
        tx.prepare_cached("DELETE FROM queries WHERE group_id = ?1 AND client_id = ?2")?
            .execute(params![group, client])?;
    }
    tx.prepare_cached(
        "INSERT OR REPLACE INTO history (group_id, version, patch) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![group, change.version, change.patch])?;
    // The replica keeps its history bounded and a load trims what it reads to the same
    // bounds, so the file may hold a few entries more: trimming every change would dirty
    // the history's oldest page on every push. Large patches trim at once, so the excess
    // stays under HISTORY_TRIM_EVERY x HISTORY_TRIM_BYTES.
    if change.version % HISTORY_TRIM_EVERY == 0 || change.patch.len() >= HISTORY_TRIM_BYTES {
        tx.prepare_cached("DELETE FROM history WHERE group_id = ?1 AND version <= ?2")?
            .execute(params![group, change.history_floor])?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::protocol::{parse_upstream, Mutation, QueriesPatchOp, QueryPut, Upstream};
    use crate::replica::{CatchUp, Limits, PushResult, Replica};
    use serde_json::{json, Value};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A directory removed when the test ends.
    pub(crate) struct TempDir(pub(crate) PathBuf);

    impl TempDir {
        pub(crate) fn new() -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let name = format!(
                "syncgate-store-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            let path = std::env::temp_dir().join(name);
            let _ = std::fs::remove_dir_all(&path);
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn crud(client: &str, id: u64, ops: Value) -> Mutation {
        let text = json!(["push", {
            "clientGroupID": "g", "pushVersion": 1, "timestamp": 1, "requestID": "r",
            "mutations": [{"type": "crud", "id": id, "clientID": client, "name": "_zero_crud",
                           "args": [{"ops": ops}], "timestamp": 1}]
        }])
        .to_string();
        let Upstream::Push(mut push) = parse_upstream(&mut text.into_bytes()).unwrap() else {
            panic!("not a push")
        };
        push.mutations.remove(0)
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

    fn reload(store: &mut Store, group: &str, limits: Limits) -> Replica {
        let stored = store.load(group).unwrap().expect("group stored");
        Replica::from_snapshot(group, limits, stored.snapshot).unwrap()
    }

    #[test]
    fn persisted_state_reloads_identically() {
        let dir = TempDir::new();
        let mut store = Store::open(&dir.0).unwrap();
        let limits = Limits { max_history: 4, ..Limits::default() };
        let mut replica = Replica::new("g", limits.clone());
        store.set_owner("g", "alice");
        let mut changes = vec![
            change_of(replica.apply_push(&crud("c1", 1, insert("i1", "a")))),
            replica
                .change_desired_queries("c1", &[put_query("q1"), put_query("q2")])
                .unwrap()
                .unwrap(),
            change_of(replica.apply_push(&crud("c2", 1, insert("i2", "b")))),
            // A failed mutation: only the lmid.
            change_of(replica.apply_push(&crud("c1", 2, insert("i2", "dup")))),
            replica.change_desired_queries("c2", &[put_query("q1")]).unwrap().unwrap(),
        ];
        changes.push(change_of(replica.apply_push(&crud("c1", 3, json!([
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
        let oldest = crate::replica::version_to_cookie(replica.version() - 4);
        let before = replica.check_connect("c1", Some(&oldest), 0).unwrap();
        assert!(matches!(before, CatchUp::Poke(_)));
        assert_eq!(copy.check_connect("c1", Some(&oldest), 0).unwrap(), before);
        assert!(reopened.load("other").unwrap().is_none());
    }

    #[test]
    fn the_history_on_disk_is_trimmed_like_the_one_in_memory() {
        let dir = TempDir::new();
        let mut store = Store::open(&dir.0).unwrap();
        let limits = Limits { max_history: 2, ..Limits::default() };
        let mut replica = Replica::new("g", limits.clone());
        let count = |store: &Store| -> i64 {
            store.conn.query_row("SELECT count(*) FROM history", [], |row| row.get(0)).unwrap()
        };
        let mut most = 0;
        for id in 1..=70 {
            let change = change_of(replica.apply_push(&crud("c1", id, json!([]))));
            store.stage("g", &change);
            store.commit().unwrap();
            most = most.max(count(&store));
        }
        // Trimmed to the bound at version 64 (63 and 64 kept), then 65..=70 added.
        assert_eq!(count(&store), 8);
        // At most: versions 1..=63, before the first trim.
        assert_eq!(most, HISTORY_TRIM_EVERY - 1);
        let copy = reload(&mut store, "g", limits.clone());
        assert_eq!(copy.snapshot().history, replica.snapshot().history);

        // A large patch trims at once.
        let big = "x".repeat(HISTORY_TRIM_BYTES);
        let change = change_of(replica.apply_push(&crud("c1", 71, insert("i", &big))));
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
        let mut a = Replica::new("g", Limits::default());
        let mut b = Replica::new("g", Limits::default());
        first.stage("g", &change_of(a.apply_push(&crud("c1", 1, insert("i1", "x")))));
        assert!(first.commit().unwrap().stale_groups.is_empty());
        // The second one's change was based on version 0 too: stale, nothing written.
        second.stage("g", &change_of(b.apply_push(&crud("c2", 1, insert("i2", "y")))));
        assert_eq!(second.commit().unwrap().stale_groups, vec!["g".to_string()]);
        assert_eq!(reload(&mut second, "g", Limits::default()).snapshot(), a.snapshot());
        // Two changes of one group in one batch: the second follows the first.
        first.stage("g", &change_of(a.apply_push(&crud("c1", 2, insert("i3", "z")))));
        first.stage("g", &change_of(a.apply_push(&crud("c1", 3, insert("i4", "w")))));
        assert!(first.commit().unwrap().stale_groups.is_empty());
        assert_eq!(reload(&mut second, "g", Limits::default()).snapshot(), a.snapshot());
    }

    #[test]
    fn two_stores_on_one_file_see_each_others_commits() {
        let dir = TempDir::new();
        let mut first = Store::open(&dir.0).unwrap();
        let mut second = Store::open(&dir.0).unwrap();
        let mut a = Replica::new("a", Limits::default());
        first.stage("a", &change_of(a.apply_push(&crud("c1", 1, insert("i1", "x")))));
        first.commit().unwrap();
        assert_eq!(reload(&mut second, "a", Limits::default()).snapshot(), a.snapshot());

        let mut b = Replica::new("b", Limits::default());
        second.stage("b", &change_of(b.apply_push(&crud("c9", 1, insert("j", "y")))));
        second.set_owner("b", "bob");
        second.commit().unwrap();
        let stored = first.load("b").unwrap().unwrap();
        assert_eq!((stored.owner.as_deref(), stored.snapshot), (Some("bob"), b.snapshot()));
    }

    #[test]
    fn a_crash_before_commit_loses_only_the_uncommitted_changes() {
        let dir = TempDir::new();
        let mut replica = Replica::new("g", Limits::default());
        let committed;
        {
            let mut store = Store::open(&dir.0).unwrap();
            store.stage("g", &change_of(replica.apply_push(&crud("c1", 1, insert("i1", "x")))));
            store.commit().unwrap();
            committed = replica.snapshot();
            store.stage("g", &change_of(replica.apply_push(&crud("c1", 2, insert("i2", "y")))));
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
            Replica::from_snapshot("g", Limits::default(), stored.snapshot).unwrap();
        assert_eq!(recovered.last_mutation_id("c1"), 1);
        assert!(matches!(
            recovered.apply_push(&crud("c1", 2, insert("i2", "y"))),
            PushResult::Applied(_)
        ));
    }

    #[test]
    fn a_group_changed_elsewhere_is_reported_stale() {
        let dir = TempDir::new();
        let mut first = Store::open(&dir.0).unwrap();
        let mut second = Store::open(&dir.0).unwrap();
        let mut original = Replica::new("g", Limits::default());
        first.stage("g", &change_of(original.apply_push(&crud("c1", 1, insert("i1", "x")))));
        first.commit().unwrap();
        // Both processes hold version 1 of the group.
        let mut other = reload(&mut second, "g", Limits::default());
        second.stage("g", &change_of(other.apply_push(&crud("c1", 2, insert("i2", "other")))));
        second.commit().unwrap();

        let mut unrelated = Replica::new("h", Limits::default());
        first.stage("g", &change_of(original.apply_push(&crud("c1", 2, insert("i2", "mine")))));
        first.stage("g", &change_of(original.apply_push(&crud("c1", 3, insert("i3", "mine")))));
        first.stage("h", &change_of(unrelated.apply_push(&crud("c1", 1, insert("k", "z")))));
        let committed = first.commit().unwrap();
        assert_eq!(committed.stale_groups, vec!["g".to_string()]);
        // The other process's write stands; the other group of the batch is in.
        assert_eq!(reload(&mut first, "g", Limits::default()).snapshot(), other.snapshot());
        assert_eq!(reload(&mut first, "h", Limits::default()).snapshot(), unrelated.snapshot());
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
        let mut replica = Replica::from_snapshot("g", Limits::default(), stored.snapshot).unwrap();
        store.stage("g", &change_of(replica.apply_push(&crud("c1", 1, json!([])))));
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
        let error = Store::open(&dir.0).err().unwrap();
        assert!(error.contains("schema version 99"), "{error}");
    }

    #[test]
    fn corrupt_rows_fail_the_load_and_a_failed_commit_names_its_groups() {
        let dir = TempDir::new();
        let mut store = Store::open(&dir.0).unwrap();
        let mut replica = Replica::new("g", Limits::default());
        store.stage("g", &change_of(replica.apply_push(&crud("c1", 1, insert("i1", "x")))));
        store.commit().unwrap();
        store.conn.execute("UPDATE rows SET value = 'not json'", []).unwrap();
        let error = store.load("g").unwrap_err();
        assert!(error.contains("cannot load client group g"), "{error}");

        // A commit that cannot write reports every group of its batch.
        store.conn.execute_batch("DROP TABLE history").unwrap();
        store.stage("g", &change_of(replica.apply_push(&crud("c1", 2, json!([])))));
        store.set_owner("h", "u");
        let error = store.commit().unwrap_err();
        assert_eq!(error.groups, vec!["g".to_string(), "h".to_string()]);
        assert!(error.message.contains("history"), "{}", error.message);
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
        assert!(error.contains("cannot create storage directory"), "{error}");
    }
}
