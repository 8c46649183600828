//! The store off the event loop: two threads per worker take the loop's loads and commits
//! in the order it asked for them; the loop learns of each result through an eventfd it
//! polls on its ring.
//!
//! - **The log thread** (`store-<index>`) receives every request. It commits to the
//!   worker's [`Log`] and answers, and hands everything that needs SQLite to the SQLite
//!   thread, in order.
//! - **The SQLite thread** (`store-<index>-sql`) owns the worker's [`Store`]: it answers
//!   loads, commits the batches that go straight to SQLite, and folds the logged batches in
//!   (compaction). A commit never waits for a fold: on a machine with a core to spare the
//!   fold runs beside the commits; on one core it runs when the log thread sleeps.
//!
//! Why threads and not io_uring writes: SQLite's commit is a sequence of `pwrite`s and an
//! `fsync` the library makes itself, and compaction is SQLite; a thread is the only way to
//! keep the loop from waiting on them, and the epoll backend has no asynchronous file I/O
//! (docs/ARCHITECTURE.md, "The store off the loop", has the measurements). While a commit, a
//! compaction or a checkpoint runs, or another worker holds the file's lock, the loop keeps
//! serving every connection, pings included.
//!
//! Order is the contract: a load asked for after a commit sees that commit (the SQLite
//! thread folds the group's logged batches first); a group forgotten before a load is read
//! again from the file. Answers come in the order of the requests, except that a logged
//! commit may be answered before a load asked for just before it. The loop sends one
//! commit at a time and fills the next batch while it is in flight (group commit, see
//! [`super::GroupSync::flush`]).
//!
//! Two ways to commit:
//! - **the log** (the worker owns its groups alone): a batch is one record appended to the
//!   worker's log and one `fdatasync`, whatever the number of groups in it. Compaction folds
//!   the logged batches into SQLite later, many in one transaction, in slices, and the log
//!   thread removes the segments whose batches are all in. A group with batches still in
//!   the log is folded in before it is loaded, and forgotten only once folded in.
//! - **write-through** (another generation of workers may hold the same groups, during a
//!   graceful replacement; and batches of large changes): every batch is a SQLite
//!   transaction, whose version check finds a group another process changed. A worker
//!   starts this way and uses the log once the supervisor says it is the only generation
//!   (`Request::UseLog`).
//!
//! After a crash, the log is replayed into SQLite before anything is loaded
//! ([`replay_logs`]): by the respawned worker for its slot, by the supervisor for every slot
//! at start.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::metrics::{Histogram, Metric, Metrics};
use crate::sync::store::{Batch, CommitError, Committed, Store, StoreError, StoredGroup};
use crate::sync::wal::{self, Log};

/// Compaction starts once this many bytes of logged batches wait to be folded in: enough
/// batches that each group's pages are written to SQLite once for many pushes, not once per
/// push (the cost the log is there to avoid), and little enough to replay in a moment.
const FOLD_START_BYTES: usize = 1 << 20;
/// One slice of compaction folds at least this many changes (more if the last batch logged
/// had more, so compaction keeps pace): a few milliseconds of SQLite between two looks at
/// the SQLite thread's queue, where loads wait.
const FOLD_SLICE_CHANGES: usize = 128;
/// A slice also folds at least this many changes per group with changes waiting, up to
/// [`FOLD_SLICE_MAX`]: a slice writes each group it touches a page or more, so with many
/// groups pushing, 128 changes wrote about a page per push (with 100 groups, 21 µs of SQLite
/// per push; 8 per group cut that to 12-14 µs: bench/RESULTS.md, "compaction in larger
/// slices").
const FOLD_CHANGES_PER_GROUP: usize = 8;
/// The most a slice is made to fold for its groups' sake: a load waits for at most one
/// slice, and one of 1,024 changes takes 10-25 ms on the benchmark's shared core.
const FOLD_SLICE_MAX: usize = 1024;
/// A batch whose changes average this many bytes of patch or more is written straight to
/// SQLite (after the log is folded in, to keep the order) instead of to the log: rows that
/// large fill pages of their own, so folding many of them together saves no page writes,
/// and the log would only write their bytes a second time (16 KiB pushes cost 1.23x more
/// through the log; bench/RESULTS.md, "the write-ahead log").
const DIRECT_BYTES: usize = 4096;
/// With no work for this long, the SQLite thread folds a slice in even below
/// [`FOLD_START_BYTES`], so an idle worker's log empties (and the log thread, idle as long,
/// removes the segments folded in).
const FOLD_IDLE: Duration = Duration::from_millis(50);
/// After a fold failed (a full disk, SQLite busy past its timeout), compaction waits this
/// long before it tries again on its own, doubling up to [`FOLD_RETRY_MAX`] while it keeps
/// failing: the log keeps the batches meanwhile, and a retry at every batch logged wrote
/// SQLite pages to roll them back and an error line each time, every 10 ms or so on a full
/// disk. A load or a commit that needs the log folded in first still tries at once.
const FOLD_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between two tries of a failing compaction: how long it may take to
/// resume once the disk has room again.
const FOLD_RETRY_MAX: Duration = Duration::from_secs(8);

/// The changes a slice of compaction folds at least, with `groups` groups' changes waiting
/// and `last_changes` in the last batch logged ([`FOLD_SLICE_CHANGES`],
/// [`FOLD_CHANGES_PER_GROUP`], [`FOLD_SLICE_MAX`]).
fn slice_changes(groups: usize, last_changes: usize) -> usize {
    let per_group = (FOLD_CHANGES_PER_GROUP * groups).min(FOLD_SLICE_MAX);
    FOLD_SLICE_CHANGES.max(per_group).max(last_changes)
}

/// What the loop asks of the store.
pub enum Request {
    /// Read a group that is not in memory; answered with [`Reply::Loaded`].
    Load(Box<str>),
    /// Write a batch and wait for it to be on disk; answered with [`Reply::Committed`].
    Commit(Batch),
    /// The loop dropped a group from memory; no answer.
    Forget(Box<str>),
    /// Commit to the log (`true`, the worker owns its groups alone) or write through to
    /// SQLite (`false`, after folding the log in); answered with [`Reply::LogUsed`].
    UseLog(bool),
}

/// What the store answers, in the order of the requests.
pub enum Reply {
    Loaded {
        /// The clientGroupID asked for.
        name: Box<str>,
        result: Result<Option<StoredGroup>, StoreError>,
    },
    Committed {
        result: Result<Committed, CommitError>,
        /// How long the commit took on the store thread (the fsync included); the loop was
        /// not waiting for it.
        took: Duration,
    },
    /// The mode asked for is in effect (for `false`: every logged batch is in SQLite), or
    /// could not be set (the previous mode stays).
    LogUsed { on: bool, result: Result<(), StoreError> },
}

/// The loop's handle on its store thread.
pub struct StoreThread {
    /// Requests to the thread; `None` once dropping (which ends the thread).
    requests: Option<mpsc::Sender<Request>>,
    /// Answers from the thread, read when the eventfd says there are some.
    replies: mpsc::Receiver<Reply>,
    /// Written by the thread after each answer; the loop polls it on its ring.
    wake: Arc<OwnedFd>,
    /// Joined on drop, so every commit asked for is on disk before the worker exits.
    thread: Option<JoinHandle<()>>,
}

/// Where the thread's log goes and what it reports to.
#[derive(Clone)]
pub struct Setup {
    /// The storage directory.
    pub dir: PathBuf,
    /// The worker's slot, which names its log (see [`wal`]).
    pub slot: usize,
    /// Added before each commit: a slow disk made on purpose for the tests
    /// (`storage.test_sync_delay_ms`), zero otherwise.
    pub sync_delay: Duration,
    /// The worker's metrics (the log's size, compaction); none in unit tests.
    pub metrics: Option<Arc<Metrics>>,
}

impl Setup {
    /// The slow disk of the tests: waits [`Setup::sync_delay`] before a commit (either
    /// thread's), nothing otherwise.
    fn stall(&self) {
        if !self.sync_delay.is_zero() {
            std::thread::sleep(self.sync_delay);
        }
    }
}

impl StoreThread {
    /// Starts the threads for `store`, writing through until told to use the log: the log
    /// thread, named `name`, which the loop talks to, and the SQLite thread (`name` with
    /// `-sql`), which it hands loads, folds and write-through commits to.
    pub fn start(store: Store, name: String, setup: Setup) -> io::Result<StoreThread> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let (requests, inbox) = mpsc::channel();
        let (outbox, replies) = mpsc::channel();
        let (work, work_inbox) = mpsc::channel();
        let folded = Arc::new(AtomicU64::new(0));
        // Its own connection, for the version checks of the log thread (reads only).
        let reader = Store::open(&setup.dir)
            .map_err(|e| io::Error::other(format!("a second connection to the store: {e}")))?;
        let folder = Folder {
            store,
            setup: setup.clone(),
            answers: Answers { outbox: outbox.clone(), wake: Arc::clone(&wake) },
            folded: Arc::clone(&folded),
            unfolded: VecDeque::new(),
            unfolded_groups: HashMap::new(),
            unfolded_bytes: 0,
            last_changes: 0,
            forget_later: Vec::new(),
            reread: Vec::new(),
            retry: None,
        };
        let sql = std::thread::Builder::new()
            .name(format!("{name}-sql"))
            .spawn(move || folder.serve(work_inbox))?;
        let appender = Appender {
            reader,
            setup,
            answers: Answers { outbox, wake: Arc::clone(&wake) },
            work: Some(work),
            sql: Some(sql),
            folded,
            log: None,
            segments: VecDeque::new(),
            next_number: 1,
            checked: HashSet::new(),
            record: Vec::new(),
        };
        let thread = std::thread::Builder::new().name(name).spawn(move || appender.serve(inbox))?;
        Ok(StoreThread { requests: Some(requests), replies, wake, thread: Some(thread) })
    }

    /// The descriptor that becomes readable when answers wait.
    pub fn eventfd(&self) -> &OwnedFd {
        &self.wake
    }

    /// Queues a request. The thread only ends when this handle drops, so a failure means
    /// it panicked: the worker cannot keep its promise without a store, so it stops here
    /// and the supervisor starts a new one.
    pub fn send(&self, request: Request) {
        let requests = self.requests.as_ref().expect("the store thread runs until dropped");
        if requests.send(request).is_err() {
            panic!("the store thread died");
        }
    }

    /// Takes every answer that arrived. Reading the eventfd first: an answer sent after
    /// this read writes it again, so its poll fires again and nothing is left behind.
    pub fn take_replies(&self, into: &mut VecDeque<Reply>) {
        let mut counter = [0u8; 8];
        // SAFETY: an 8-byte read into a local buffer of 8 bytes; EAGAIN (nothing written
        // since the last read) is fine.
        let _ = unsafe { libc::read(self.wake.as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
        into.extend(self.replies.try_iter());
    }

    /// Waits for the next answer (tests, which have no ring to poll the eventfd with).
    #[cfg(test)]
    pub fn wait(&self) -> Reply {
        self.replies.recv_timeout(Duration::from_secs(10)).expect("the store thread answers")
    }
}

impl Drop for StoreThread {
    fn drop(&mut self) {
        // Closing the channel ends the thread once it has served what was asked.
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What a store thread's wait for its next request gave.
enum Next<T> {
    Item(T),
    /// [`FOLD_IDLE`] passed without one.
    Idle,
    /// The sender is gone: the thread ends.
    Closed,
}

/// Waits for the next request; with `tick`, at most [`FOLD_IDLE`].
fn next<T>(inbox: &mpsc::Receiver<T>, tick: bool) -> Next<T> {
    // What this thread allocated and freed so far goes into the heap gauge before it waits,
    // so the loop's reading of the gauge meanwhile is exact (`heap`).
    crate::heap::flush();
    if !tick {
        return inbox.recv().map_or(Next::Closed, Next::Item);
    }
    match inbox.recv_timeout(FOLD_IDLE) {
        Ok(item) => Next::Item(item),
        Err(mpsc::RecvTimeoutError::Timeout) => Next::Idle,
        Err(mpsc::RecvTimeoutError::Disconnected) => Next::Closed,
    }
}

/// Counts one more write of `group` (allocating its name only the first time).
fn count_up(counts: &mut HashMap<String, usize>, group: &str) {
    match counts.get_mut(group) {
        Some(n) => *n += 1,
        None => {
            counts.insert(group.to_owned(), 1);
        }
    }
}

/// Where answers go: the loop's channel, and its eventfd, written after each.
struct Answers {
    outbox: mpsc::Sender<Reply>,
    wake: Arc<OwnedFd>,
}

impl Answers {
    /// Sends an answer; `false` once the loop is gone.
    fn send(&self, reply: Reply) -> bool {
        if self.outbox.send(reply).is_err() {
            return false;
        }
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write from a local buffer. It cannot block (EFD_NONBLOCK) and can
        // only fail if the counter is about to overflow, when the poll is readable anyway.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
        true
    }
}

/// What the log thread hands the SQLite thread, in the order of the loop's requests.
enum Work {
    /// A batch on the log, to fold in.
    Logged(Logged),
    /// A load, answered once the group's logged batches are folded in.
    Load(Box<str>),
    Forget(Box<str>),
    /// A commit straight to SQLite (writing through, or a batch of large changes), after
    /// everything logged before it is folded in; answered.
    Commit(Batch),
    /// Fold everything in (the log is about to go), and say how it went.
    FoldAll(mpsc::Sender<Result<(), StoreError>>),
    /// Replay what is left of the slot's log on disk (before a log starts again).
    Replay(mpsc::Sender<Result<(), StoreError>>),
}

/// A batch on the log, not yet folded into SQLite.
struct Logged {
    /// Its number: batches are numbered from 1 in the order they were logged.
    number: u64,
    /// Its record's size.
    bytes: usize,
    batch: Batch,
}

/// The log thread: takes the loop's requests in order, commits to the log, and hands
/// everything that needs SQLite to the SQLite thread, so a commit never waits for a fold.
struct Appender {
    /// A second connection to the store, for [`Appender::append`]'s version checks only.
    reader: Store,
    setup: Setup,
    answers: Answers,
    /// To the SQLite thread; `None` once ending.
    work: Option<mpsc::Sender<Work>>,
    /// The SQLite thread, joined at the end (it says whether everything was folded in).
    sql: Option<JoinHandle<bool>>,
    /// The number of the last batch the SQLite thread folded in (0: none yet).
    folded: Arc<AtomicU64>,
    /// `Some` while committing to the log, `None` while writing through.
    log: Option<Log>,
    /// Each segment on disk with the number of the last batch in it, oldest first.
    segments: VecDeque<(u64, u64)>,
    /// The number the next logged batch gets.
    next_number: u64,
    /// Groups whose logged changes follow what SQLite has (see [`Appender::append`]); a
    /// group leaves when the loop forgets it.
    checked: HashSet<String>,
    /// The record being encoded, kept to reuse its allocation.
    record: Vec<u8>,
}

impl Appender {
    /// Serves requests in order until the loop's handle goes; then the SQLite thread folds
    /// everything in and the log is removed.
    fn serve(mut self, inbox: mpsc::Receiver<Request>) {
        // While segments are on disk, wake now and then to remove folded ones.
        loop {
            match next(&inbox, !self.segments.is_empty()) {
                Next::Item(request) => {
                    if !self.serve_one(request) {
                        break;
                    }
                }
                Next::Idle => self.release(),
                Next::Closed => break,
            }
        }
        self.work = None;
        let all_folded = self.sql.take().is_some_and(|sql| sql.join().unwrap_or(false));
        if all_folded {
            if let Some(log) = self.log.take() {
                let _ = log.remove();
            }
        }
    }

    /// Serves one request; `false` once the loop is gone.
    fn serve_one(&mut self, request: Request) -> bool {
        match request {
            Request::Load(name) => self.hand(Work::Load(name)),
            Request::Forget(name) => {
                self.checked.remove(&*name);
                self.hand(Work::Forget(name))
            }
            Request::Commit(batch) => {
                let direct = batch.patch_bytes() >= DIRECT_BYTES * batch.changes().max(1);
                if self.log.is_none() || direct {
                    return self.hand(Work::Commit(batch));
                }
                let started = Instant::now();
                self.setup.stall();
                let (result, logged) = self.append(batch);
                let answered =
                    self.answers.send(Reply::Committed { result, took: started.elapsed() });
                // After the answer: the batch's pokes do not wait for the hand-over.
                answered && logged.is_none_or(|logged| self.hand(Work::Logged(logged)))
            }
            Request::UseLog(on) => {
                let result = match (on, self.log.is_some()) {
                    (true, false) => self.ask(Work::Replay).map(|()| {
                        self.log = Some(Log::new(&self.setup.dir, self.setup.slot));
                    }),
                    (false, true) => self.ask(Work::FoldAll).and_then(|()| {
                        self.checked.clear();
                        self.segments.clear();
                        let log = self.log.take().expect("in log mode");
                        let removed = log.remove();
                        self.report_log_bytes();
                        removed.map_err(|source| self.log_error(source))
                    }),
                    _ => Ok(()),
                };
                self.answers.send(Reply::LogUsed { on, result })
            }
        }
    }

    /// Hands work to the SQLite thread; `false` if it is gone (it panicked: the worker
    /// cannot go on without a store, and ends).
    fn hand(&self, work: Work) -> bool {
        self.work.as_ref().is_some_and(|w| w.send(work).is_ok())
    }

    /// Hands work that answers, and waits for the answer (mode changes only).
    fn ask(
        &self,
        work: fn(mpsc::Sender<Result<(), StoreError>>) -> Work,
    ) -> Result<(), StoreError> {
        let (tx, rx) = mpsc::channel();
        let gone = || StoreError::log(&self.setup.dir, "the store's SQLite thread is gone");
        if !self.hand(work(tx)) {
            return Err(gone());
        }
        rx.recv().unwrap_or_else(|_| Err(gone()))
    }

    /// Commits a batch to the log: one record, one `fdatasync`. Returns the answer, and the
    /// batch for the SQLite thread once it is on the log.
    ///
    /// A group's first logged change since it was loaded is checked against SQLite first:
    /// a worker of the generation before may have committed to it after this worker loaded
    /// it (the handover's last moments, before this worker was told to use its log). Such a
    /// group is stale, as a write-through commit would have found: its changes are not
    /// logged, and the loop reloads it. Once checked, nobody else writes the group. SQLite
    /// has every earlier change of an unchecked group: the loop waits for each commit's
    /// answer before the next, a load folds the group's logged batches in first, and a
    /// group only has logged batches once checked.
    fn append(&mut self, mut batch: Batch) -> (Result<Committed, CommitError>, Option<Logged>) {
        let mut committed = Committed::default();
        for (group, base) in batch.bases() {
            if self.checked.contains(group) {
                continue;
            }
            match self.reader.version_of(group) {
                Ok(Some(stored)) if stored == base => {
                    self.checked.insert(group.to_owned());
                }
                Ok(_) => committed.stale_groups.push(group.to_owned()),
                Err(error) => {
                    return (Err(CommitError { error, unwritten: Box::new(batch) }), None)
                }
            }
        }
        for group in &committed.stale_groups {
            batch.remove_changes_of(group);
        }
        self.release();
        self.record.clear();
        self.record.resize(wal::HEADER, 0);
        batch.encode(&mut self.record);
        wal::seal(&mut self.record);
        let log = self.log.as_mut().expect("appending to the log in log mode");
        match log.append(&self.record) {
            Ok(seq) => {
                let number = self.next_number;
                self.next_number += 1;
                match self.segments.back_mut() {
                    Some((last_seq, last)) if *last_seq == seq => *last = number,
                    _ => self.segments.push_back((seq, number)),
                }
                self.report_log_bytes();
                (Ok(committed), Some(Logged { number, bytes: self.record.len(), batch }))
            }
            Err(source) => {
                let error = self.log_error(source);
                (Err(CommitError { error, unwritten: Box::new(batch) }), None)
            }
        }
    }

    /// Removes the segments whose batches are all folded into SQLite.
    fn release(&mut self) {
        let folded = self.folded.load(Ordering::Acquire);
        let keep_from = self.segments.iter().find(|&&(_, last)| last > folded).map(|&(seq, _)| seq);
        let Some(log) = self.log.as_mut() else { return };
        match log.release_before(keep_from) {
            Ok(()) => {
                self.segments.retain(|&(seq, _)| keep_from.is_some_and(|k| seq >= k));
                self.report_log_bytes();
            }
            Err(e) => log::warn!("compaction: cannot reclaim log segments: {e}"),
        }
    }

    fn report_log_bytes(&self) {
        if let Some(metrics) = &self.setup.metrics {
            metrics.set(Metric::LogBytes, self.log.as_ref().map_or(0, Log::bytes));
        }
    }

    fn log_error(&self, source: io::Error) -> StoreError {
        StoreError::log(
            &self.setup.dir.join(format!("wal-{}-*", self.setup.slot)),
            source.to_string(),
        )
    }
}

/// The SQLite thread: owns the worker's [`Store`], answers loads, commits through, and
/// folds the logged batches in (compaction), so that the log thread never waits for it.
struct Folder {
    store: Store,
    setup: Setup,
    answers: Answers,
    /// Where it says which batches are folded in (see [`Appender::release`]).
    folded: Arc<AtomicU64>,
    /// Batches on the log and not yet in SQLite, oldest first.
    unfolded: VecDeque<Logged>,
    /// How many writes each group has in `unfolded`: a load of such a group folds first.
    unfolded_groups: HashMap<String, usize>,
    /// Encoded bytes of `unfolded`, for [`FOLD_START_BYTES`].
    unfolded_bytes: usize,
    /// Changes in the last batch logged: a slice of compaction folds at least as many, so
    /// that compaction keeps pace with the commits ([`slice_changes`]).
    last_changes: usize,
    /// Groups the loop forgot while they had writes in `unfolded`: the store keeps what it
    /// knows of them (the materialization needs it) until those are folded in.
    forget_later: Vec<String>,
    /// Groups whose unmaterialized changes the store must read again before the next fold
    /// (a failed commit forgets them).
    reread: Vec<String>,
    /// After a failed fold: when compaction tries again on its own, and the wait after that
    /// one if it fails too ([`FOLD_RETRY`]); `None` while folds succeed.
    retry: Option<(Instant, Duration)>,
}

impl Folder {
    /// Serves work in order until the log thread ends; returns whether everything logged
    /// was folded in.
    fn serve(mut self, inbox: mpsc::Receiver<Work>) -> bool {
        loop {
            match next(&inbox, !self.unfolded.is_empty()) {
                Next::Item(work) => {
                    if !self.serve_one(work) {
                        break;
                    }
                }
                Next::Idle if self.may_fold() => {
                    let _ = self.fold(Some(FOLD_SLICE_CHANGES));
                }
                Next::Idle => {}
                Next::Closed => break,
            }
        }
        self.fold(None).is_ok()
    }

    /// Serves one piece of work; `false` once the loop is gone.
    fn serve_one(&mut self, work: Work) -> bool {
        match work {
            Work::Logged(logged) => {
                for group in logged.batch.touched_groups() {
                    count_up(&mut self.unfolded_groups, group);
                }
                self.last_changes = logged.batch.changes();
                self.unfolded_bytes += logged.bytes;
                self.unfolded.push_back(logged);
                if self.unfolded_bytes >= FOLD_START_BYTES && self.may_fold() {
                    let slice = slice_changes(self.unfolded_groups.len(), self.last_changes);
                    let _ = self.fold(Some(slice));
                }
                true
            }
            Work::Load(name) => {
                let result = match self.unfolded_groups.contains_key(&*name) {
                    true => self.fold(None).and_then(|()| self.store.load(&name)),
                    false => self.store.load(&name),
                };
                self.answers.send(Reply::Loaded { name, result })
            }
            Work::Forget(name) => {
                if self.unfolded_groups.contains_key(&*name) {
                    self.forget_later.push(name.into());
                } else {
                    self.store.forget(&name);
                }
                true
            }
            Work::Commit(batch) => {
                let started = Instant::now();
                self.setup.stall();
                // In order: what the log holds first, then this batch.
                let result = match self.fold(None) {
                    Ok(()) => self.store.commit_batch(batch),
                    Err(error) => Err(CommitError { error, unwritten: Box::new(batch) }),
                };
                self.answers.send(Reply::Committed { result, took: started.elapsed() })
            }
            Work::FoldAll(answer) => {
                let _ = answer.send(self.fold(None));
                true
            }
            Work::Replay(answer) => {
                let dir = self.setup.dir.clone();
                let replayed = replay_logs(&mut self.store, &dir, Some(self.setup.slot));
                let _ = answer.send(replayed.map(|_| ()));
                true
            }
        }
    }

    /// Whether compaction may start a fold on its own: not while it waits to retry a failed
    /// one ([`FOLD_RETRY`]).
    fn may_fold(&self) -> bool {
        self.retry.is_none_or(|(at, _)| Instant::now() >= at)
    }

    /// Compaction: folds the oldest logged batches (at least `changes` of their changes, or
    /// all) into SQLite in one transaction, then says they are in (the log thread removes
    /// the segments nothing unfolded is in). On failure nothing is folded and the batches
    /// stay for the next try (they are on disk in the log all along).
    fn fold(&mut self, changes: Option<usize>) -> Result<(), StoreError> {
        if self.unfolded.is_empty() {
            return Ok(());
        }
        // A failed fold dropped what the store knew of its groups' unmaterialized changes:
        // read it again before folding more of them in.
        while let Some(group) = self.reread.last() {
            self.store.load(group)?;
            self.reread.pop();
        }
        let started = Instant::now();
        let mut merged = Batch::default();
        let (mut count, mut bytes, first) = (0, 0, self.unfolded[0].number);
        let mut last = first;
        while let Some(logged) = self.unfolded.pop_front() {
            count += logged.batch.changes().max(1);
            bytes += logged.bytes;
            last = logged.number;
            merged.extend(logged.batch);
            if changes.is_some_and(|c| count >= c) {
                break;
            }
        }
        // Each group's writes in the slice, to count down once it is in.
        let mut touched: HashMap<String, usize> = HashMap::new();
        for group in merged.touched_groups() {
            count_up(&mut touched, group);
        }
        let folded = merged.changes();
        match self.store.commit_batch(merged) {
            Ok(committed) if committed.stale_groups.is_empty() => {}
            Ok(committed) => {
                // The log is only used while this worker owns its groups alone, so this is
                // a bug: say so loudly rather than lose it quietly.
                log::error!(
                    "compaction: groups {:?} changed in SQLite behind this worker's log; \
                     their logged changes were not folded in",
                    committed.stale_groups
                );
            }
            Err(e) => {
                if let Some(metrics) = &self.setup.metrics {
                    metrics.inc(Metric::CompactionFailures);
                }
                let wait = self.retry.map_or(FOLD_RETRY, |(_, wait)| wait);
                self.retry = Some((Instant::now() + wait, (wait * 2).min(FOLD_RETRY_MAX)));
                log::error!(
                    "compaction failed (the log keeps the batches; retrying in {} s): {}",
                    wait.as_secs(),
                    e.error
                );
                self.reread.extend(e.groups());
                // Back at the front as one batch, numbered as the last of them.
                self.unfolded.push_front(Logged { number: last, bytes, batch: *e.unwritten });
                return Err(e.error);
            }
        }
        self.folded.store(last, Ordering::Release);
        self.retry = None;
        for (group, n) in touched {
            if let Some(left) = self.unfolded_groups.get_mut(&group) {
                *left = left.saturating_sub(n);
                if *left == 0 {
                    self.unfolded_groups.remove(&group);
                }
            }
        }
        let unfolded_groups = &self.unfolded_groups;
        let store = &mut self.store;
        self.forget_later.retain(|group| {
            let keep = unfolded_groups.contains_key(group.as_str());
            if !keep {
                store.forget(group);
            }
            keep
        });
        self.unfolded_bytes -= bytes;
        if let Some(metrics) = &self.setup.metrics {
            metrics.observe(Histogram::Compaction, started.elapsed());
            metrics.add(Metric::CompactedChanges, folded as u64);
        }
        Ok(())
    }
}

/// Replays the logs left by processes that did not fold them in (a crash, a power cut) into
/// `store`, oldest record first, then removes them: the segments of `slot`, or of every slot
/// (`None`, the supervisor at start, when no worker runs). A torn record at a segment's end
/// (the crash cut its write short; it was never acknowledged) is dropped with a log line. A
/// file that is not a log, or a whole record that does not decode, is refused: the daemon
/// does not start rather than lose or invent data. Returns the records replayed.
pub fn replay_logs(
    store: &mut Store,
    dir: &Path,
    slot: Option<usize>,
) -> Result<usize, StoreError> {
    let found = wal::segments(dir, slot).map_err(|e| StoreError::log(dir, e.to_string()))?;
    let mut replayed = 0;
    for segment in &found {
        let fail = |message: String| StoreError::log(&segment.path, message);
        let bytes = wal::read(&segment.path).map_err(|e| fail(e.to_string()))?;
        let scan = wal::scan(&bytes).map_err(|wal::NotALog| {
            fail("not a syncgate log (no header); move it out of the storage directory".into())
        })?;
        // One transaction per segment: a crash leaves at most a few segments.
        let mut batch = Batch::default();
        for (i, payload) in scan.records.iter().enumerate() {
            let record = Batch::decode(payload)
                .map_err(|m| fail(format!("record {i} is whole but unreadable: {m}")))?;
            batch.extend(record);
        }
        let committed = store.replay_batch(batch).map_err(|e| e.error)?;
        if !committed.stale_groups.is_empty() {
            log::error!(
                "{}: groups {:?} are stored at versions this log does not follow from; \
                 their logged changes were not replayed",
                segment.path.display(),
                committed.stale_groups
            );
        }
        if let Some(torn) = scan.torn {
            log::warn!(
                "{}: cut {} bytes after the last whole record at offset {} ({torn:?}): a write \
                 the crash interrupted, never acknowledged",
                segment.path.display(),
                bytes.len() - scan.valid,
                scan.valid
            );
        }
        replayed += scan.records.len();
    }
    // Only once everything is in SQLite (its commits are synced): a crash before this
    // replays again, which skips what is already in.
    for segment in &found {
        std::fs::remove_file(&segment.path).map_err(|e| {
            StoreError::log(&segment.path, format!("replayed but cannot remove: {e}"))
        })?;
    }
    if !found.is_empty() {
        log::info!(
            "replayed {replayed} logged batches from {} segments into the store",
            found.len()
        );
    }
    Ok(replayed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::replica::{GroupLimits, PushResult, Replica};
    use crate::testing::TempDir;
    use serde_json::json;

    /// The next change of `replica` (group `row`'s first letter): client c1's mutation `id`,
    /// inserting row `row`.
    fn push(replica: &mut Replica, id: u64, row: &str) -> crate::sync::replica::Change {
        let ops = json!([{"op": "insert", "tableName": "issue", "primaryKey": ["id"],
                          "value": {"id": row, "title": "t"}}]);
        match replica.apply_push(crate::testing::crud(&row[..1], "c1", id, ops)) {
            PushResult::Applied(change) => change,
            other => panic!("not applied: {other:?}"),
        }
    }

    fn stored_version(dir: &Path, group: &str) -> Option<u64> {
        let stored = Store::open(dir).unwrap().load(group).unwrap()?;
        let replica = Replica::from_snapshot(group, GroupLimits::default(), stored.snapshot);
        Some(replica.unwrap().version())
    }

    fn thread(dir: &TempDir) -> StoreThread {
        let setup =
            Setup { dir: dir.0.clone(), slot: 1, sync_delay: Duration::ZERO, metrics: None };
        StoreThread::start(Store::open(&dir.0).unwrap(), "store-test".into(), setup).unwrap()
    }

    /// A store thread told to use its log, as a worker is once it owns its groups alone.
    fn logging_thread(dir: &TempDir) -> StoreThread {
        let store = thread(dir);
        store.send(Request::UseLog(true));
        assert!(matches!(store.wait(), Reply::LogUsed { on: true, result: Ok(()) }));
        store
    }

    fn committed(reply: Reply) {
        match reply {
            Reply::Committed { result, .. } => assert!(result.unwrap().stale_groups.is_empty()),
            _ => panic!("not a commit's answer"),
        }
    }

    #[test]
    fn a_slice_grows_with_the_groups_waiting_up_to_its_bound_and_keeps_pace_with_a_batch() {
        assert_eq!(slice_changes(0, 0), FOLD_SLICE_CHANGES);
        assert_eq!(slice_changes(10, 5), FOLD_SLICE_CHANGES, "few groups: the floor");
        assert_eq!(slice_changes(100, 40), 800, "8 changes per group");
        assert_eq!(slice_changes(1_000, 40), FOLD_SLICE_MAX, "many groups: the bound");
        assert_eq!(slice_changes(1_000, 5_000), 5_000, "never less than the last batch");
    }

    #[test]
    fn a_logged_commit_reaches_sqlite_by_compaction_a_load_or_the_end() {
        let dir = TempDir::new();
        let store = logging_thread(&dir);
        let mut a = Replica::new("a", GroupLimits::default());
        let mut batch = Batch::default();
        batch.set_owner("a", "alice");
        batch.stage("a", &push(&mut a, 1, "a1"));
        store.send(Request::Commit(batch));
        committed(store.wait());
        // Acknowledged from the log: the record is there, SQLite does not have it yet.
        let segments = wal::segments(&dir.0, Some(1)).unwrap();
        assert_eq!(segments.len(), 1);
        assert!(wal::read(&segments[0].path).unwrap().len() > wal::MAGIC.len());
        assert_eq!(stored_version(&dir.0, "a"), None, "not folded in yet");

        // A load of a group with logged batches folds them in first.
        store.send(Request::Forget("a".into()));
        store.send(Request::Load("a".into()));
        match store.wait() {
            Reply::Loaded { result, .. } => {
                let stored = result.unwrap().expect("the logged batch is in");
                assert_eq!(stored.owner.as_deref(), Some("alice"), "the pin was logged too");
            }
            _ => panic!("not a load's answer"),
        }
        assert_eq!(stored_version(&dir.0, "a"), Some(1));

        // Writing through again folds everything and removes the log.
        let mut batch = Batch::default();
        batch.stage("a", &push(&mut a, 2, "a2"));
        store.send(Request::Commit(batch));
        committed(store.wait());
        store.send(Request::UseLog(false));
        assert!(matches!(store.wait(), Reply::LogUsed { on: false, result: Ok(()) }));
        assert_eq!(stored_version(&dir.0, "a"), Some(2));
        assert!(wal::segments(&dir.0, None).unwrap().is_empty());

        // And a worker that exits folds its log in on the way out.
        store.send(Request::UseLog(true));
        let _ = store.wait();
        let mut batch = Batch::default();
        batch.stage("a", &push(&mut a, 3, "a3"));
        store.send(Request::Commit(batch));
        committed(store.wait());
        drop(store);
        assert_eq!(stored_version(&dir.0, "a"), Some(3));
        assert!(wal::segments(&dir.0, None).unwrap().is_empty());
    }

    #[test]
    fn a_batch_of_large_changes_goes_straight_to_sqlite_after_the_log() {
        let dir = TempDir::new();
        let store = logging_thread(&dir);
        let mut a = Replica::new("a", GroupLimits::default());
        let mut batch = Batch::default();
        batch.stage("a", &push(&mut a, 1, "a1"));
        store.send(Request::Commit(batch));
        committed(store.wait());
        assert_eq!(stored_version(&dir.0, "a"), None, "a small change is logged");

        let ops = json!([{"op": "insert", "tableName": "issue", "primaryKey": ["id"],
                          "value": {"id": "a2", "title": "x".repeat(DIRECT_BYTES)}}]);
        let large = match a.apply_push(crate::testing::crud("a", "c1", 2, ops)) {
            PushResult::Applied(change) => change,
            other => panic!("not applied: {other:?}"),
        };
        let mut batch = Batch::default();
        batch.stage("a", &large);
        store.send(Request::Commit(batch));
        committed(store.wait());
        // Answered once in SQLite, the logged change before it folded in first.
        assert_eq!(stored_version(&dir.0, "a"), Some(2));
    }

    /// A crash in the middle of the last append, at every byte: the records before it are
    /// all replayed; of the torn one, nothing (its two groups' changes are both out).
    #[test]
    fn a_log_cut_at_every_offset_of_its_last_record_replays_the_whole_records_only() {
        let dir = TempDir::new();
        std::fs::create_dir_all(&dir.0).unwrap();
        let mut log = Log::new(&dir.0, 5);
        let (mut a, mut b) =
            (Replica::new("a", GroupLimits::default()), Replica::new("b", GroupLimits::default()));
        let mut record = Vec::new();
        let mut append = |batch: Batch| {
            record.clear();
            record.resize(wal::HEADER, 0);
            batch.encode(&mut record);
            wal::seal(&mut record);
            log.append(&record).unwrap();
            record.len()
        };
        for id in 1..=3 {
            let mut batch = Batch::default();
            batch.stage("a", &push(&mut a, id, &format!("a{id}")));
            batch.stage("b", &push(&mut b, id, &format!("b{id}")));
            append(batch);
        }
        let mut last = Batch::default();
        last.stage("a", &push(&mut a, 4, "a4"));
        last.stage("b", &push(&mut b, 4, "b4"));
        let last_len = append(last);
        let path = wal::segments(&dir.0, Some(5)).unwrap().remove(0).path;
        let full = wal::read(&path).unwrap();

        let end = wal::scan(&full).unwrap().valid;
        let whole = end - last_len;
        for cut in whole..=end {
            // What a crash leaves: the record's bytes up to the cut, then the segment's
            // zeros (every other half of the loop: a file cut short there).
            let mut torn = full[..cut].to_vec();
            if cut % 2 == 0 {
                torn.resize(full.len(), 0);
            }
            let run = TempDir::new();
            std::fs::create_dir_all(&run.0).unwrap();
            std::fs::write(run.0.join(path.file_name().unwrap()), &torn).unwrap();
            let mut store = Store::open(&run.0).unwrap();
            let replayed = replay_logs(&mut store, &run.0, None).unwrap();
            // (A cut inside the record's trailing zero bytes, padded with zeros, is the whole
            // record: the same bytes.)
            let whole_again = torn.get(..end) == Some(&full[..end]);
            let expect = if whole_again { 4 } else { 3 };
            assert_eq!(replayed as u64, expect, "cut at {cut}");
            assert_eq!(stored_version(&run.0, "a"), Some(expect), "cut at {cut}");
            assert_eq!(stored_version(&run.0, "b"), Some(expect), "cut at {cut}");
            assert!(wal::segments(&run.0, None).unwrap().is_empty(), "replayed logs go");
        }
    }

    #[test]
    fn replaying_a_log_twice_skips_what_sqlite_already_has() {
        let dir = TempDir::new();
        std::fs::create_dir_all(&dir.0).unwrap();
        let mut a = Replica::new("a", GroupLimits::default());
        let mut record = vec![0; wal::HEADER];
        let mut batch = Batch::default();
        for id in 1..=3 {
            batch.stage("a", &push(&mut a, id, &format!("a{id}")));
        }
        batch.encode(&mut record);
        wal::seal(&mut record);
        let mut log = Log::new(&dir.0, 2);
        log.append(&record).unwrap();
        let path = wal::segments(&dir.0, None).unwrap().remove(0).path;
        let bytes = wal::read(&path).unwrap();
        let mut store = Store::open(&dir.0).unwrap();
        assert_eq!(replay_logs(&mut store, &dir.0, None).unwrap(), 1);
        // The crash came after the replay's commit and before the file's removal.
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(replay_logs(&mut store, &dir.0, None).unwrap(), 1);
        let stored = store.load("a").unwrap().unwrap();
        let copy = Replica::from_snapshot("a", GroupLimits::default(), stored.snapshot).unwrap();
        assert_eq!(copy.snapshot(), a.snapshot());
    }

    #[test]
    fn a_file_that_is_not_a_log_or_an_unreadable_record_stops_the_replay() {
        let dir = TempDir::new();
        std::fs::create_dir_all(&dir.0).unwrap();
        let mut store = Store::open(&dir.0).unwrap();
        std::fs::write(dir.0.join("wal-1-0000000000"), b"not a log at all").unwrap();
        let err = replay_logs(&mut store, &dir.0, None).unwrap_err().to_string();
        assert!(err.contains("wal-1-0000000000") && err.contains("not a syncgate log"), "{err}");

        let mut record = vec![0; wal::HEADER];
        record.extend_from_slice(b"Zgarbage");
        wal::seal(&mut record);
        let mut bytes = wal::MAGIC.to_vec();
        bytes.extend_from_slice(&record);
        std::fs::write(dir.0.join("wal-1-0000000000"), bytes).unwrap();
        let err = replay_logs(&mut store, &dir.0, None).unwrap_err().to_string();
        assert!(err.contains("record 0 is whole but unreadable"), "{err}");
        assert_eq!(wal::segments(&dir.0, None).unwrap().len(), 1, "kept for the operator");
    }
}
