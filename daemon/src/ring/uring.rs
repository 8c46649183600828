//! The io_uring backend: every operation is a submission, every result a completion the
//! kernel posts. The default where the kernel allows it (README, "Why io_uring").

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};

use super::{unavailable_message, BufRing, Completion, Op, RingError, ENTRIES};

/// One process's io_uring.
pub(super) struct Uring {
    /// Private: an entry pushed straight into the crate's queue would skip the backlog's
    /// ordering and the safety contract of [`Uring::push`].
    uring: IoUring,
    /// Entries that found the submission queue full while the kernel refused to take more
    /// (EBUSY: its completion queue is overflowing, so only reaping completions helps).
    /// They go in, in order, before the next wait; later entries queue behind them.
    backlog: VecDeque<squeue::Entry>,
    /// The tick timer's timespec, which must stay put while the kernel holds it.
    tick: Box<types::Timespec>,
    /// Where the signalfd's read lands; one read is in flight at a time.
    signals: Box<[u8; 128]>,
}

impl Uring {
    pub(super) fn new() -> Result<Uring, RingError> {
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
        Ok(Uring {
            uring,
            backlog: VecDeque::new(),
            tick: Box::new(types::Timespec::new()),
            signals: Box::new([0; 128]),
        })
    }

    pub(super) fn provide_buffers(&self, count: u16, size: usize) -> io::Result<BufRing> {
        BufRing::kernel(&self.uring, 0, count, size)
    }

    /// Queues `entry`. When the kernel cannot take more submissions now, the entry waits in
    /// the backlog until the next [`Uring::submit_and_wait`], after the loop has reaped
    /// completions: never a busy loop here.
    ///
    /// # Safety
    ///
    /// Every buffer, timespec or other memory `entry` points to must stay valid, and must not
    /// move or be written by anyone else, until the operation's last completion arrives (for
    /// a multishot operation, the one without `IORING_CQE_F_MORE`). The socket's file
    /// descriptor must stay open as long, or the operation must be cancelled first.
    #[inline]
    unsafe fn push(&mut self, entry: squeue::Entry) {
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

    /// # Safety
    ///
    /// See [`super::Ring::recv`].
    #[inline]
    pub(super) unsafe fn recv(&mut self, fd: RawFd, buf: *mut u8, len: usize, user_data: u64) {
        let entry = opcode::Recv::new(types::Fd(fd), buf, len as u32).build().user_data(user_data);
        // SAFETY: the caller's contract.
        unsafe { self.push(entry) }
    }

    #[inline]
    pub(super) fn recv_multi(&mut self, fd: RawFd, group: u16, user_data: u64) {
        let entry = opcode::RecvMulti::new(types::Fd(fd), group).build().user_data(user_data);
        // SAFETY: the buffers are the ring's own and outlive it; the caller keeps `fd` open
        // until the receive's last completion (its slot is freed only then).
        unsafe { self.push(entry) }
    }

    /// # Safety
    ///
    /// See [`super::Ring::send`].
    #[inline]
    pub(super) unsafe fn send(
        &mut self,
        fd: RawFd,
        buf: *const u8,
        len: usize,
        flags: i32,
        user_data: u64,
    ) {
        let entry = opcode::Send::new(types::Fd(fd), buf, len as u32)
            .flags(flags)
            .build()
            .user_data(user_data);
        // SAFETY: the caller's contract.
        unsafe { self.push(entry) }
    }

    /// # Safety
    ///
    /// See [`super::Ring::send_msg`].
    #[inline]
    pub(super) unsafe fn send_msg(
        &mut self,
        fd: RawFd,
        msg: *const libc::msghdr,
        flags: i32,
        user_data: u64,
    ) {
        let entry = opcode::SendMsg::new(types::Fd(fd), msg)
            .flags(flags as u32)
            .build()
            .user_data(user_data);
        // SAFETY: the caller's contract.
        unsafe { self.push(entry) }
    }

    /// # Safety
    ///
    /// See [`super::Ring::connect`].
    pub(super) unsafe fn connect(
        &mut self,
        fd: RawFd,
        addr: *const libc::sockaddr,
        len: libc::socklen_t,
        user_data: u64,
    ) {
        let entry = opcode::Connect::new(types::Fd(fd), addr, len).build().user_data(user_data);
        // SAFETY: the caller's contract.
        unsafe { self.push(entry) }
    }

    pub(super) fn poll_multi(&mut self, fd: RawFd, user_data: u64) {
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(user_data);
        // SAFETY: no memory; the descriptors polled live as long as the process's loop.
        unsafe { self.push(entry) }
    }

    pub(super) fn accept_multi(&mut self, fd: RawFd, user_data: u64) {
        let entry = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data);
        // SAFETY: no memory (no peer address is asked for); the listening socket lives as
        // long as the listener's loop.
        unsafe { self.push(entry) }
    }

    pub(super) fn cancel(&mut self, user_data: u64) {
        let entry = opcode::AsyncCancel::new(user_data).build().user_data(Op::Nothing.token(0));
        // SAFETY: no memory.
        unsafe { self.push(entry) }
    }

    #[inline]
    pub(super) fn close(&mut self, fd: RawFd) {
        let entry = opcode::Close::new(types::Fd(fd)).build().user_data(Op::Nothing.token(0));
        // SAFETY: no memory; the descriptor was given up to the operation.
        unsafe { self.push(entry) }
    }

    pub(super) fn nop(&mut self, user_data: u64) {
        let entry = opcode::Nop::new().build().user_data(user_data);
        // SAFETY: a no-op points at no memory.
        unsafe { self.push(entry) }
    }

    pub(super) fn arm_tick(&mut self, every: Duration) {
        *self.tick = types::Timespec::new().sec(every.as_secs()).nsec(every.subsec_nanos());
        let entry = opcode::Timeout::new(&*self.tick).build().user_data(Op::Tick.token(0));
        // SAFETY: the timespec is boxed in the ring, and re-armed only after the previous
        // timeout completed (on its completion).
        unsafe { self.push(entry) }
    }

    pub(super) fn read_signals(&mut self, signalfd: RawFd) {
        let buf = &mut self.signals;
        let entry = opcode::Read::new(types::Fd(signalfd), buf.as_mut_ptr(), 128)
            .build()
            .user_data(Op::Signal.token(0));
        // SAFETY: the buffer is boxed in the ring, and the read is re-armed only after the
        // previous one completed.
        unsafe { self.push(entry) }
    }

    pub(super) fn submit_and_wait(&mut self) -> io::Result<()> {
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

    #[inline]
    pub(super) fn drain(&mut self, into: &mut Vec<Completion>) {
        into.clear();
        into.extend(self.uring.completion().map(|c| Completion {
            user_data: c.user_data(),
            result: c.result(),
            flags: c.flags(),
        }));
    }
}
