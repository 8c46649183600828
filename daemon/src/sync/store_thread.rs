//! The store off the event loop: one thread per worker owns the worker's [`Store`] and runs
//! its loads and commits in the order the loop asked for them; the loop learns of each
//! result through an eventfd it polls on its ring.
//!
//! Why a thread and not io_uring writes: the store is SQLite, whose commit is a sequence of
//! `pwrite`s and an `fsync` the library makes itself; a thread is the only way to keep the
//! loop from waiting on it (docs/ARCHITECTURE.md, "The store off the loop", has the
//! measurements). While a commit runs, a checkpoint runs, or another worker holds the
//! file's lock, the loop keeps serving every connection, pings included.
//!
//! Order is the contract: requests are served one at a time, first in first out. A load
//! asked for after a commit sees that commit; a group forgotten before a load is read
//! again from the file. The loop sends one commit at a time and fills the next batch while
//! it is in flight (group commit, see [`super::GroupSync::flush`]).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::sync::store::{Batch, CommitError, Committed, Store, StoreError, StoredGroup};

/// What the loop asks of the store.
pub enum Request {
    /// Read a group that is not in memory; answered with [`Reply::Loaded`].
    Load(Box<str>),
    /// Write a batch and wait for it to be on disk; answered with [`Reply::Committed`].
    Commit(Batch),
    /// The loop dropped a group from memory; no answer.
    Forget(Box<str>),
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

impl StoreThread {
    /// Starts the thread for `store`. `sync_delay` is added before each commit: a slow disk
    /// made on purpose for the tests (`storage.test_sync_delay_ms`), zero otherwise.
    pub fn start(store: Store, name: String, sync_delay: Duration) -> io::Result<StoreThread> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let (requests, inbox) = mpsc::channel();
        let (outbox, replies) = mpsc::channel();
        let thread_wake = Arc::clone(&wake);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || serve(store, inbox, outbox, &thread_wake, sync_delay))?;
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
    pub fn take_replies(&self, into: &mut std::collections::VecDeque<Reply>) {
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

/// The thread's body: serve requests in order until the loop's handle goes.
fn serve(
    mut store: Store,
    inbox: mpsc::Receiver<Request>,
    outbox: mpsc::Sender<Reply>,
    wake: &OwnedFd,
    sync_delay: Duration,
) {
    for request in inbox {
        let reply = match request {
            Request::Load(name) => {
                let result = store.load(&name);
                Reply::Loaded { name, result }
            }
            Request::Commit(batch) => {
                let started = Instant::now();
                if !sync_delay.is_zero() {
                    std::thread::sleep(sync_delay);
                }
                let result = store.commit_batch(batch);
                Reply::Committed { result, took: started.elapsed() }
            }
            Request::Forget(name) => {
                store.forget(&name);
                continue;
            }
        };
        if outbox.send(reply).is_err() {
            // The loop is gone; what was asked of the file is done.
            return;
        }
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write from a local buffer. It cannot block (EFD_NONBLOCK) and can
        // only fail if the counter is about to overflow, when the poll is readable anyway.
        let _ = unsafe { libc::write(wake.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}
