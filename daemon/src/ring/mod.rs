//! The thin io_uring layer every process's event loop stands on: creating the ring (with an
//! error that names the cause when io_uring is unavailable), queueing submissions, the
//! `user_data` encoding, and the provided-buffer ring that multishot receives fill.
//!
//! Why the `io-uring` crate and not tokio-uring: see the README ("Why io-uring").

use std::io;
use std::os::fd::{IntoRawFd, OwnedFd};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// Submission queue size: a batch of this many operations goes in one `io_uring_enter`.
/// The completion queue is twice that (the kernel default), and multishot operations post
/// many completions per submission, so the loop drains completions every iteration.
const ENTRIES: u32 = 1024;

pub struct Ring {
    pub uring: IoUring,
    /// The tick timer's timespec, which must stay put while the kernel holds it.
    tick: Box<types::Timespec>,
}

/// What an operation was for, in the top byte of its `user_data`.
pub fn token(kind: u8, index: u32) -> u64 {
    ((kind as u64) << 56) | index as u64
}

pub fn untoken(user_data: u64) -> (u8, u32) {
    ((user_data >> 56) as u8, user_data as u32)
}

impl Ring {
    pub fn new() -> Result<Ring, String> {
        // One thread submits and reaps (SINGLE_ISSUER), so completions can wait for the
        // loop's next wait instead of interrupting it: without DEFER_TASKRUN every packet
        // that completes a receive sends this process an inter-processor interrupt to run
        // the completion, which cost about a fifth of a busy worker's time. Linux 6.1 has
        // both; older kernels refuse the flags and get a plain ring.
        let uring = IoUring::builder()
            .setup_cqsize(ENTRIES * 4)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(ENTRIES)
            .or_else(|_| IoUring::builder().setup_cqsize(ENTRIES * 4).build(ENTRIES))
            .map_err(|e| unavailable_message(&e))?;
        Ok(Ring { uring, tick: Box::new(types::Timespec::new()) })
    }

    /// Queues `entry`, submitting first if the queue is full.
    pub fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every entry's buffers are owned by the caller's long-lived state and stay
            // valid until its completion arrives (the loops keep that rule for each operation).
            if unsafe { self.uring.submission().push(&entry) }.is_ok() {
                return;
            }
            if let Err(e) = self.uring.submit() {
                if e.raw_os_error() != Some(libc::EBUSY) {
                    panic!("io_uring submit failed: {e}");
                }
            }
        }
    }

    /// Closes `fd` with the next submission instead of a `close(2)` of its own: one system
    /// call fewer per connection, and the descriptor's number stays taken until then. The
    /// completion (tagged `user_data`) carries nothing to act on.
    pub fn close_later(&mut self, fd: OwnedFd, user_data: u64) {
        let entry = opcode::Close::new(types::Fd(fd.into_raw_fd())).build().user_data(user_data);
        self.push(entry);
    }

    /// Arms the periodic tick with `user_data`.
    pub fn arm_tick(&mut self, every: Duration, user_data: u64) {
        *self.tick = types::Timespec::new().sec(every.as_secs()).nsec(every.subsec_nanos());
        let entry = opcode::Timeout::new(&*self.tick).build().user_data(user_data);
        self.push(entry);
    }

    /// Submits what is queued and waits for at least one completion; signals (EINTR) return.
    pub fn submit_and_wait(&mut self) -> io::Result<()> {
        match self.uring.submit_and_wait(1) {
            Ok(_) => Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::EINTR)
                    || e.raw_os_error() == Some(libc::EBUSY) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Takes every completion now available.
    pub fn drain(&mut self, into: &mut Vec<cqueue::Entry>) {
        into.clear();
        into.extend(self.uring.completion());
    }
}

/// A startup error that says why io_uring is missing and how to get it back.
fn unavailable_message(e: &io::Error) -> String {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cause = match e.raw_os_error() {
        Some(libc::ENOSYS) => "this kernel has no io_uring (it needs Linux 6.0 or newer)".to_string(),
        Some(libc::EPERM) if disabled == "2" => {
            "io_uring is disabled on this host (kernel.io_uring_disabled = 2); set it to 0 with `sysctl kernel.io_uring_disabled=0`".to_string()
        }
        Some(libc::EPERM) if disabled == "1" => {
            "io_uring is limited to the group in kernel.io_uring_io_uring_group (kernel.io_uring_disabled = 1); run syncgate in that group or set the sysctl to 0".to_string()
        }
        Some(libc::EPERM) => {
            "io_uring_setup was refused (a seccomp profile, such as a container runtime's default, blocks it); allow io_uring_setup, io_uring_enter and io_uring_register".to_string()
        }
        Some(libc::ENOMEM) => {
            "not enough locked memory for the ring (RLIMIT_MEMLOCK); raise it, e.g. LimitMEMLOCK=64M in the systemd unit or `ulimit -l 65536`".to_string()
        }
        _ => format!("io_uring_setup failed: {e}"),
    };
    format!("io_uring unavailable: {cause}")
}

/// A ring of equally sized buffers that the kernel picks from for multishot receives, so a
/// connection holds no read buffer while it is idle.
pub struct BufRing {
    /// The shared ring of buffer descriptors (page-aligned, as the kernel requires).
    entries: *mut types::BufRingEntry,
    /// Number of descriptors, a power of two.
    count: u16,
    /// Size of each buffer.
    size: usize,
    /// The buffers themselves, `count * size` bytes.
    memory: Box<[u8]>,
    /// Our copy of the ring's tail (the kernel reads the shared one).
    tail: u16,
    /// The group id the receives name.
    pub group: u16,
}

impl BufRing {
    pub fn new(ring: &Ring, group: u16, count: u16, size: usize) -> io::Result<BufRing> {
        assert!(count.is_power_of_two());
        let ring_bytes = count as usize * std::mem::size_of::<types::BufRingEntry>();
        // SAFETY: an anonymous private mapping, page-aligned by construction.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut br = BufRing {
            entries: ptr as *mut types::BufRingEntry,
            count,
            size,
            memory: vec![0u8; count as usize * size].into_boxed_slice(),
            tail: 0,
            group,
        };
        // SAFETY: the mapping lives as long as `br`, which lives as long as the ring.
        unsafe {
            ring.uring.submitter().register_buf_ring_with_flags(ptr as u64, count, group, 0)?;
        }
        for bid in 0..count {
            br.push(bid);
        }
        br.publish();
        Ok(br)
    }

    fn push(&mut self, bid: u16) {
        let idx = (self.tail & (self.count - 1)) as usize;
        // SAFETY: idx < count, inside the mapping.
        let entry = unsafe { &mut *self.entries.add(idx) };
        entry.set_addr(self.memory.as_ptr() as u64 + (bid as usize * self.size) as u64);
        entry.set_len(self.size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&mut self) {
        // SAFETY: the tail field of the first entry, per the kernel ABI; a release store so
        // the kernel sees the descriptors before the new tail.
        unsafe {
            let tail =
                types::BufRingEntry::tail(self.entries) as *const std::sync::atomic::AtomicU16;
            (*tail).store(self.tail, std::sync::atomic::Ordering::Release);
        }
    }

    /// The bytes the kernel put in buffer `bid`.
    pub fn get(&mut self, bid: u16, len: usize) -> &mut [u8] {
        let start = bid as usize * self.size;
        &mut self.memory[start..start + len.min(self.size)]
    }

    /// Gives buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        self.push(bid);
        self.publish();
    }
}
