//! The thin io_uring layer every process's event loop stands on: creating the ring (with an
//! error that names the cause when io_uring is unavailable), queueing submissions, the
//! `user_data` encoding, and the provided-buffer ring that multishot receives fill.
//!
//! Why the `io-uring` crate and not tokio-uring: see the README ("Why io-uring").

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

mod bufring;

pub use bufring::BufRing;

/// Submission queue size: a batch of this many operations goes in one `io_uring_enter`.
/// The completion queue is four times that, and multishot operations post many
/// completions per submission, so the loop drains completions every iteration.
const ENTRIES: u32 = 1024;

/// What an operation was for: the top byte of its `user_data`, the rest being the index of
/// the socket it belongs to (a slab index) where it has one. One list for every process, so
/// that a completion can never be read as another process's kind of operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// A completion that needs nothing (a cancel, a close): also what an unknown tag reads as.
    Nothing = 0,
    /// The listener's multishot accept.
    Accept,
    /// A worker's multishot poll of its handoff channel.
    Channel,
    /// A receive on a socket (the listener's head read, a worker's multishot receive).
    Recv,
    /// A send on a socket; at most one in flight per socket.
    Send,
    /// The periodic tick timer.
    Tick,
    /// The read of the signalfd.
    Signal,
    /// The multishot poll of the control channel from the supervisor.
    Control,
    /// A worker's TCP connect to an upstream (upstream mode); the index is the relay's.
    UpConnect,
    /// A worker's multishot receive on an upstream socket.
    UpRecv,
    /// A send on an upstream socket; at most one in flight per socket.
    UpSend,
    /// A worker's multishot poll of its store thread's eventfd: answers wait.
    Store,
}

impl Op {
    const ALL: [Op; 12] = [
        Op::Nothing,
        Op::Accept,
        Op::Channel,
        Op::Recv,
        Op::Send,
        Op::Tick,
        Op::Signal,
        Op::Control,
        Op::UpConnect,
        Op::UpRecv,
        Op::UpSend,
        Op::Store,
    ];

    /// The `user_data` of operation `self` on socket `index`.
    pub fn token(self, index: u32) -> u64 {
        ((self as u64) << 56) | index as u64
    }

    /// What a completion's `user_data` was for.
    pub fn of(user_data: u64) -> (Op, u32) {
        let op = Op::ALL.get((user_data >> 56) as usize).copied().unwrap_or(Op::Nothing);
        (op, user_data as u32)
    }
}

/// One process's io_uring: every operation of its event loop goes through here.
pub struct Ring {
    /// Private: an entry pushed straight into the crate's queue would skip the backlog's
    /// ordering and the safety contract of [`Ring::push`].
    uring: IoUring,
    /// Entries that found the submission queue full while the kernel refused to take more
    /// (EBUSY: its completion queue is overflowing, so only reaping completions helps).
    /// They go in, in order, before the next wait; later entries queue behind them.
    backlog: VecDeque<squeue::Entry>,
    /// The tick timer's timespec, which must stay put while the kernel holds it.
    tick: Box<types::Timespec>,
    /// Where the signalfd's read lands; one read is in flight at a time.
    signals: Box<[u8; 128]>,
    /// The provided buffers of multishot receives, where the process has them. Declared
    /// after `uring` so that it is dropped after it: the buffers outlive every receive.
    buffers: Option<BufRing>,
}

impl Ring {
    pub fn new() -> Result<Ring, RingError> {
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
            .map_err(|e| RingError::Unavailable(unavailable_message(&e)))?;
        Ok(Ring {
            uring,
            backlog: VecDeque::new(),
            tick: Box::new(types::Timespec::new()),
            signals: Box::new([0; 128]),
            buffers: None,
        })
    }

    /// Registers a ring of `count` provided buffers of `size` bytes for [`Ring::recv_multi`].
    pub fn provide_buffers(&mut self, count: u16, size: usize) -> Result<(), RingError> {
        let bufs = BufRing::new(&self.uring, 0, count, size).map_err(RingError::Buffers)?;
        self.buffers = Some(bufs);
        Ok(())
    }

    /// The provided buffers; only a ring that has them receives into them.
    pub fn buffers(&mut self) -> &mut BufRing {
        self.buffers.as_mut().expect("provide_buffers was called")
    }

    /// Queues `entry`. When the kernel cannot take more submissions now, the entry waits in
    /// the backlog until the next [`Ring::submit_and_wait`], after the loop has reaped
    /// completions: never a busy loop here.
    ///
    /// # Safety
    ///
    /// Every buffer, timespec or other memory `entry` points to must stay valid, and must not
    /// move or be written by anyone else, until the operation's last completion arrives (for
    /// a multishot operation, the one without `IORING_CQE_F_MORE`). The socket's file
    /// descriptor must stay open as long, or the operation must be cancelled first.
    pub unsafe fn push(&mut self, entry: squeue::Entry) {
        if self.backlog.is_empty() {
            // SAFETY: the caller's contract, above.
            if unsafe { self.uring.submission().push(&entry) }.is_ok() {
                return;
            }
            if self.submit().is_ok() {
                // SAFETY: as above.
                if unsafe { self.uring.submission().push(&entry) }.is_ok() {
                    return;
                }
            }
        }
        self.backlog.push_back(entry);
    }

    /// Submits what is queued. EBUSY (the kernel's completion queue is overflowing) leaves
    /// it queued for later.
    fn submit(&mut self) -> io::Result<()> {
        match self.uring.submit() {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(e),
            Err(e) => panic!("io_uring submit failed: {e}"),
        }
    }

    /// A multishot receive on `fd` into the provided buffers. No memory of the caller's is
    /// involved: each completion names the buffer the kernel picked.
    pub fn recv_multi(&mut self, fd: RawFd, user_data: u64) {
        let group = self.buffers().group;
        let entry = opcode::RecvMulti::new(types::Fd(fd), group).build().user_data(user_data);
        // SAFETY: the buffers are the ring's own and outlive it; the caller keeps `fd` open
        // until the receive's last completion (its slot is freed only then).
        unsafe { self.push(entry) }
    }

    /// A multishot poll for readability of `fd` (a channel or listening socket).
    pub fn poll_multi(&mut self, fd: &impl AsRawFd, user_data: u64) {
        let entry = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(user_data);
        // SAFETY: no memory; the descriptors polled live as long as the process's loop.
        unsafe { self.push(entry) }
    }

    /// A multishot accept on the listening socket `fd`; each completion is a new socket.
    pub fn accept_multi(&mut self, fd: &impl AsRawFd, user_data: u64) {
        let entry = opcode::AcceptMulti::new(types::Fd(fd.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data);
        // SAFETY: no memory (no peer address is asked for); the listening socket lives as
        // long as the listener's loop.
        unsafe { self.push(entry) }
    }

    /// Cancels the operation(s) with `user_data`; the cancel's own completion needs nothing.
    pub fn cancel(&mut self, user_data: u64) {
        let entry = opcode::AsyncCancel::new(user_data).build().user_data(Op::Nothing.token(0));
        // SAFETY: no memory.
        unsafe { self.push(entry) }
    }

    /// Closes `fd` with the next submission instead of a `close(2)` of its own: one system
    /// call fewer per connection, and the descriptor's number stays taken until then. The
    /// completion carries nothing to act on.
    pub fn close_later(&mut self, fd: OwnedFd) {
        let entry =
            opcode::Close::new(types::Fd(fd.into_raw_fd())).build().user_data(Op::Nothing.token(0));
        // SAFETY: no memory; the descriptor was given up to the operation.
        unsafe { self.push(entry) }
    }

    /// Arms the periodic tick.
    pub fn arm_tick(&mut self, every: Duration) {
        *self.tick = types::Timespec::new().sec(every.as_secs()).nsec(every.subsec_nanos());
        let entry = opcode::Timeout::new(&*self.tick).build().user_data(Op::Tick.token(0));
        // SAFETY: the timespec is boxed in the ring, and re-armed only after the previous
        // timeout completed (on its completion).
        unsafe { self.push(entry) }
    }

    /// Reads `signalfd` into the ring's own buffer; what was read does not matter (every
    /// signal the processes block means "stop"), only that one arrived. Re-armed on its
    /// completion.
    pub fn read_signals(&mut self, signalfd: &impl AsRawFd) {
        let buf = &mut self.signals;
        let entry = opcode::Read::new(types::Fd(signalfd.as_raw_fd()), buf.as_mut_ptr(), 128)
            .build()
            .user_data(Op::Signal.token(0));
        // SAFETY: the buffer is boxed in the ring, and the read is re-armed only after the
        // previous one completed.
        unsafe { self.push(entry) }
    }

    /// Submits what is queued (the backlog first) and waits for at least one completion;
    /// signals (EINTR) return.
    pub fn submit_and_wait(&mut self) -> io::Result<()> {
        while let Some(entry) = self.backlog.front() {
            // SAFETY: queued by `push`, whose caller took on the contract.
            if unsafe { self.uring.submission().push(entry) }.is_err() {
                if self.submit().is_err() {
                    // Still overflowing: wait below for completions to make room.
                    break;
                }
                continue;
            }
            self.backlog.pop_front();
        }
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

/// Why a ring could not be set up; the message names the cause and the fix.
#[derive(Debug)]
pub enum RingError {
    /// `io_uring_setup` failed: the kernel lacks io_uring, or a policy or limit forbids it.
    Unavailable(String),
    /// The provided-buffer ring could not be mapped or registered.
    Buffers(io::Error),
}

impl std::fmt::Display for RingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingError::Unavailable(message) => f.write_str(message),
            RingError::Buffers(e) => write!(f, "cannot register the receive buffer ring: {e}"),
        }
    }
}

impl std::error::Error for RingError {}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_its_operation_and_socket() {
        for op in Op::ALL {
            assert_eq!(Op::of(op.token(7)), (op, 7));
            assert_eq!(Op::of(op.token(u32::MAX)), (op, u32::MAX));
        }
        // A tag no process writes reads as nothing to act on, never as another operation.
        assert_eq!(Op::of(0xff << 56).0, Op::Nothing);
    }

    #[test]
    fn more_entries_than_the_queue_holds_all_complete_in_order() {
        let mut ring = Ring::new().expect("io_uring");
        let total = 3 * ENTRIES as u64;
        for i in 0..total {
            let entry = opcode::Nop::new().build().user_data(i);
            // SAFETY: a no-op points at no memory.
            unsafe { ring.push(entry) };
        }
        let (mut seen, mut cqes) = (Vec::new(), Vec::new());
        while (seen.len() as u64) < total {
            ring.submit_and_wait().unwrap();
            ring.drain(&mut cqes);
            seen.extend(cqes.iter().map(|c| c.user_data()));
        }
        assert_eq!(seen, (0..total).collect::<Vec<_>>());
    }
}
