//! The process's allocator: mimalloc, counting the bytes it has handed out and not had back,
//! for the `syncgate_heap_bytes` gauge.
//!
//! Resident memory (RSS) says what the kernel gives a process, which also depends on which
//! pages the allocator keeps after a burst; the live heap says what the process's data
//! takes. An operator sizing a deployment wants both, and memory work on idle connections
//! cannot be measured without the second: at 100,000 idle connections, RSS per connection
//! moved between 561 and 605 bytes across runs of one build while the live heap stayed at
//! 568-571 (bench/RESULTS.md, 2026-11-28 16:11).
//!
//! A worker has threads (its loop, and the store's two, `sync/store_thread.rs`), and memory
//! allocated on one is often freed on another (a batch's changes, made by the loop, are
//! dropped by the SQLite thread once folded in). So each thread counts into a counter of its
//! own and adds it to the process's total, one atomic add, once it has moved by
//! `FLUSH_BYTES` (16 KiB); the allocation path itself takes no locked instruction. A plain load
//! and store of one shared counter lost updates when two threads raced: under push load
//! the gauge grew by about 15 MB a run of some 300,000 pushes, past twice the worker's RSS
//! after four (bench/RESULTS.md, 2026-12-07 (evening), "The heap gauge drifted").
//!
//! What a thread has counted and not yet added is at most `FLUSH_BYTES` either way;
//! [`live_bytes`] adds the caller's own first, and the store threads add theirs after each
//! request ([`flush`]), so a reading while they wait is exact.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, Ordering};

use mimalloc::MiMalloc;

/// Installed as the global allocator by the `syncgate` binary (main.rs).
pub struct Counting;

/// How far a thread's own count may move before it is added to [`LIVE`]: small beside the
/// megabytes a worker holds, large beside one message's allocations, so the shared counter is
/// touched once per many allocations instead of on each.
const FLUSH_BYTES: isize = 16 * 1024;

/// Bytes allocated and not yet freed (as requested by callers, not rounded to size classes),
/// as far as the threads have added their counts. Signed: one thread's frees of another's
/// allocations can reach it before their allocations do.
static LIVE: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    /// This thread's allocations minus its frees since it last added them to [`LIVE`].
    /// Constant-initialised and without a destructor, so the allocator can use it at any
    /// point of a thread's life, its first allocation and its last included.
    static UNADDED: Cell<isize> = const { Cell::new(0) };
}

fn count(n: isize) {
    UNADDED.with(|unadded| {
        let now = unadded.get() + n;
        if now.abs() >= FLUSH_BYTES {
            LIVE.fetch_add(now, Ordering::Relaxed);
            unadded.set(0);
        } else {
            unadded.set(now);
        }
    });
}

fn add(n: usize) {
    count(n as isize);
}

fn sub(n: usize) {
    count(-(n as isize));
}

/// Adds what this thread has counted to the process's total. A thread that allocates or
/// frees in bursts and then waits calls it before waiting, so the gauge is exact meanwhile.
pub fn flush() {
    let unadded = UNADDED.with(|unadded| unadded.replace(0));
    if unadded != 0 {
        LIVE.fetch_add(unadded, Ordering::Relaxed);
    }
}

/// The live heap of this process, in bytes (this thread's count added first); 0 where
/// [`Counting`] is not the global allocator (tests).
pub fn live_bytes() -> usize {
    flush();
    LIVE.load(Ordering::Relaxed).max(0) as usize
}

// SAFETY: every call is forwarded unchanged to mimalloc, which upholds GlobalAlloc's contract;
// the counter only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { MiMalloc.alloc(layout) };
        if !p.is_null() {
            add(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { MiMalloc.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { MiMalloc.dealloc(ptr, layout) };
        sub(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { MiMalloc.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            sub(layout.size());
            add(new_size);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Memory allocated on one thread and freed on another, by several pairs of threads at
    /// once (a worker's loop and its SQLite thread): once every thread has added its count,
    /// the total is back where it was. A shared counter read and written without an atomic
    /// add loses updates here.
    #[test]
    fn allocations_freed_on_other_threads_leave_the_total_where_it_was() {
        const PAIRS: usize = 4;
        const ALLOCATIONS: usize = 200_000;
        // `Counting` is not the allocator of the test binary, so only this test counts.
        let before = LIVE.load(Ordering::Relaxed);
        // A small count stays the thread's own until it is flushed.
        std::thread::spawn(move || {
            add(100);
            assert_eq!((UNADDED.with(Cell::get), LIVE.load(Ordering::Relaxed)), (100, before));
            flush();
            assert_eq!((UNADDED.with(Cell::get), LIVE.load(Ordering::Relaxed)), (0, before + 100));
            sub(100);
            flush();
        })
        .join()
        .unwrap();
        let pairs: Vec<_> = (0..PAIRS)
            .map(|p| {
                let (to_free, freed) = mpsc::sync_channel::<usize>(1024);
                let allocating = std::thread::spawn(move || {
                    for i in 0..ALLOCATIONS {
                        let size = 16 + (i * 7 + p) % 1000;
                        add(size);
                        to_free.send(size).unwrap();
                    }
                    flush();
                });
                let freeing = std::thread::spawn(move || {
                    for size in freed {
                        sub(size);
                    }
                    flush();
                });
                (allocating, freeing)
            })
            .collect();
        for (allocating, freeing) in pairs {
            allocating.join().unwrap();
            freeing.join().unwrap();
        }
        assert_eq!(LIVE.load(Ordering::Relaxed), before);
    }
}
