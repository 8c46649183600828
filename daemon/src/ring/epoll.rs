//! The epoll backend, for hosts that forbid io_uring (container runtimes' default seccomp
//! profiles, `kernel.io_uring_disabled`): the same operations and the same completions as
//! the io_uring backend, emulated with edge-triggered epoll and non-blocking system calls.
//!
//! An operation is recorded against its descriptor when it is queued and tried at the next
//! [`Epoll::submit_and_wait`], before the wait (a send usually completes there, with no
//! wait at all); one that would block waits for the descriptor's next readiness edge. What
//! each try yields is posted as a [`Completion`] and handed over by [`Epoll::drain`]:
//! never from inside a call of the process, so a handler never runs within another.
//!
//! How io_uring's semantics are kept:
//! - multishot receive: on readiness, read into the process's pool of buffers ([`BufRing`],
//!   the same ids and `recycle` as io_uring's provided buffers), one completion per read
//!   with the buffer's id and the more flag; a connection holds no buffer while idle. When
//!   bytes wait and every buffer is in use the receive ends with `-ENOBUFS`, as io_uring's
//!   does; end of file or an error end it too (a completion without the more flag).
//! - multishot accept: `accept4` until it would block; each socket is non-blocking (the
//!   worker gets the same open file through the handoff).
//! - multishot poll: a level-triggered registration, one completion per wait that finds the
//!   descriptor readable (the handlers read their channels until they would block).
//! - send: `send(MSG_DONTWAIT)`, or `sendmsg` for a vectored one; a short write is reported
//!   as such, as io_uring reports it.
//! - connect: `EINPROGRESS`, then writability, then `SO_ERROR`.
//! - cancel: the operation posts a final `-ECANCELED`.
//! - tick: the wait's timeout; the signal read: a non-blocking read of the signalfd.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use super::{BufRing, Completion, Op, BUFFER_SHIFT, F_BUFFER, F_MORE};

/// Readiness events taken per wait; more wait for the next one.
const MAX_EVENTS: usize = 512;
/// Reads one socket gets per pass before the others get theirs: a fast sender cannot keep
/// the loop (or the buffer pool) to itself. The rest is read on the next pass, without
/// waiting for another edge.
const READS_PER_PASS: usize = 8;
/// Accepts per pass, for the same reason.
const ACCEPTS_PER_PASS: usize = 64;

/// One process's epoll instance and the operations waiting on it.
pub(super) struct Epoll {
    epfd: OwnedFd,
    /// What is known and queued per descriptor, by descriptor number.
    fds: Vec<FdState>,
    /// Descriptors with an operation that may make progress now: tried at the next pass.
    runnable: Vec<RawFd>,
    /// Completions posted since the last [`Epoll::drain`].
    completions: Vec<Completion>,
    /// How many of those hold a pool buffer: buffers that come back once the process has
    /// handled them, so a receive that finds the pool empty meanwhile waits for the next
    /// pass instead of ending with ENOBUFS.
    buffers_posted: usize,
    /// The address of each connect in flight, by descriptor (rare: kept out of `fds`, which
    /// has an entry per connection).
    connects: HashMap<RawFd, Box<Connect>>,
    /// When the armed tick is due.
    tick_at: Option<Instant>,
    /// Where the signalfd's read lands; one read is in flight at a time.
    signals: Box<[u8; 128]>,
    /// epoll_wait's output, kept to avoid an allocation per wait.
    events: Vec<libc::epoll_event>,
}

/// One descriptor as the backend sees it: one per connection in a worker, so kept small
/// (48 bytes; no per-connection buffer, no boxed state).
struct FdState {
    /// The `user_data` of the input operation in flight.
    in_user_data: u64,
    /// Where a receive or read into the caller's memory goes.
    in_buf: *mut u8,
    /// How many bytes it may take.
    in_len: u32,
    /// How many bytes the send in flight has to write.
    out_len: u32,
    /// The `user_data` of the output operation in flight.
    out_user_data: u64,
    /// What the send in flight writes (a vectored send's `msghdr`).
    out_buf: *const u8,
    /// Its `MSG_*` flags.
    out_flags: i32,
    /// The receive, accept, poll or read in flight, if any.
    input: InputKind,
    /// The send or connect in flight, if any.
    output: OutputKind,
    /// [`REGISTERED`], [`READABLE`], [`WRITABLE`], [`QUEUED`].
    bits: u8,
}

impl Default for FdState {
    fn default() -> Self {
        FdState {
            in_user_data: 0,
            in_buf: std::ptr::null_mut(),
            in_len: 0,
            out_len: 0,
            out_user_data: 0,
            out_buf: std::ptr::null(),
            out_flags: 0,
            input: InputKind::None,
            output: OutputKind::None,
            bits: 0,
        }
    }
}

/// Added to the epoll set. May be stale for a descriptor that was closed without
/// [`Epoll::close`] while it had no operation, so it is trusted only while an operation is
/// in flight; otherwise registration modifies and falls back to adding.
const REGISTERED: u8 = 1;
/// A read may not block: set by a readiness event, cleared by `EAGAIN` or a short read
/// (edge-triggered: the next arrival brings a new event).
const READABLE: u8 = 2;
/// A write may not block; the same for writes.
const WRITABLE: u8 = 4;
/// In `runnable` already.
const QUEUED: u8 = 8;

impl FdState {
    fn has(&self, bit: u8) -> bool {
        self.bits & bit != 0
    }

    fn set(&mut self, bit: u8, on: bool) {
        if on {
            self.bits |= bit;
        } else {
            self.bits &= !bit;
        }
    }

    fn idle(&self) -> bool {
        self.input == InputKind::None && self.output == OutputKind::None
    }
}

/// An operation that waits for readability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputKind {
    None,
    /// A multishot receive into the pool of buffers.
    Multi,
    /// A receive into the caller's memory.
    Recv,
    /// A `read(2)` into the caller's memory (the signalfd).
    Read,
    /// A multishot accept.
    Accept,
    /// A multishot poll for readability (level-triggered).
    Poll,
}

/// An operation that waits for writability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutputKind {
    None,
    Send,
    /// A vectored send: `out_buf` is the caller's `msghdr`.
    SendMsg,
    /// A connect (its address in `Epoll::connects`).
    Connect,
}

/// A connect in flight.
struct Connect {
    /// A copy of the address: the caller's may go once it is queued.
    addr: libc::sockaddr_storage,
    len: libc::socklen_t,
    /// `connect(2)` said EINPROGRESS: the result comes with writability.
    started: bool,
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// What an operation's try came to.
enum Step {
    /// It posted its final completion.
    Done,
    /// It would block: wait for the next readiness edge.
    Blocked,
    /// It had its share of this pass and may go on: try again at the next.
    Again,
}

impl Epoll {
    pub(super) fn new() -> io::Result<Epoll> {
        // SAFETY: plain system call; the descriptor is owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Epoll {
            // SAFETY: a new descriptor nobody else owns.
            epfd: unsafe { OwnedFd::from_raw_fd(fd) },
            fds: Vec::new(),
            runnable: Vec::new(),
            completions: Vec::with_capacity(512),
            buffers_posted: 0,
            connects: HashMap::new(),
            tick_at: None,
            signals: Box::new([0; 128]),
            events: vec![libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS],
        })
    }

    fn state(&mut self, fd: RawFd) -> &mut FdState {
        let i = fd as usize;
        if i >= self.fds.len() {
            // One entry per descriptor, so per connection: grown by an eighth at a time
            // rather than doubled, which would leave up to one unused entry per connection.
            let want = (i + 1).max(self.fds.len() + (self.fds.len() / 8).max(1024));
            self.fds.reserve_exact(want - self.fds.len());
            self.fds.resize_with(want, FdState::default);
        }
        &mut self.fds[i]
    }

    #[inline]
    fn post(&mut self, user_data: u64, result: i32, flags: u32) {
        self.completions.push(Completion { user_data, result, flags });
    }

    fn queue(&mut self, fd: RawFd) {
        let st = self.state(fd);
        if !st.has(QUEUED) {
            st.set(QUEUED, true);
            self.runnable.push(fd);
        }
    }

    /// Adds `fd` to the epoll set, or updates it; `level`: level-triggered readability only
    /// (a poll), else edge-triggered both ways. Returns `errno` on failure.
    fn register(&mut self, fd: RawFd, level: bool) -> Result<(), i32> {
        let events = if level {
            libc::EPOLLIN as u32
        } else {
            (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32
        };
        let epfd = self.epfd.as_raw_fd();
        let st = self.state(fd);
        let ctl = |op| {
            let mut ev = libc::epoll_event { events, u64: fd as u64 };
            // SAFETY: a valid event struct; the kernel copies it.
            if unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) } < 0 {
                Err(errno())
            } else {
                Ok(())
            }
        };
        let first = if st.has(REGISTERED) { libc::EPOLL_CTL_MOD } else { libc::EPOLL_CTL_ADD };
        match ctl(first) {
            Ok(()) => {}
            // Closed and reused since (registered), or added by an earlier life (not).
            Err(libc::ENOENT) if first == libc::EPOLL_CTL_MOD => ctl(libc::EPOLL_CTL_ADD)?,
            Err(libc::EEXIST) if first == libc::EPOLL_CTL_ADD => ctl(libc::EPOLL_CTL_MOD)?,
            Err(e) => return Err(e),
        }
        st.set(REGISTERED, true);
        // Unknown until tried: a try that would block clears them. A poll learns from the
        // wait, which reports a readable descriptor at once.
        st.set(READABLE, !level);
        st.set(WRITABLE, !level);
        Ok(())
    }

    /// Records an input operation on `fd` and queues it for the next pass.
    fn arm_input(&mut self, fd: RawFd, user_data: u64, kind: InputKind, buf: *mut u8, len: usize) {
        let level = kind == InputKind::Poll;
        if matches!(kind, InputKind::Read | InputKind::Accept) {
            // Sockets are read with MSG_DONTWAIT; these descriptors take O_NONBLOCK (the
            // listening socket's open file is shared with the supervisor, which never
            // accepts, and with a replaced listener, which runs this backend too).
            set_nonblocking(fd);
        }
        let st = self.state(fd);
        debug_assert!(st.input == InputKind::None, "one input operation per descriptor");
        let idle = st.idle();
        st.input = kind;
        st.in_user_data = user_data;
        st.in_buf = buf;
        st.in_len = len.min(u32::MAX as usize) as u32;
        if idle || level {
            if let Err(e) = self.register(fd, level) {
                self.state(fd).input = InputKind::None;
                return self.post(user_data, -e, 0);
            }
        }
        self.queue(fd);
    }

    /// Records an output operation on `fd` and queues it for the next pass.
    fn arm_output(&mut self, fd: RawFd, user_data: u64, kind: OutputKind) -> bool {
        let st = self.state(fd);
        debug_assert!(st.output == OutputKind::None, "one output operation per descriptor");
        let idle = st.idle();
        st.output = kind;
        st.out_user_data = user_data;
        if idle {
            if let Err(e) = self.register(fd, false) {
                self.state(fd).output = OutputKind::None;
                self.post(user_data, -e, 0);
                return false;
            }
        }
        self.queue(fd);
        true
    }

    /// # Safety
    ///
    /// See [`super::Ring::recv`].
    pub(super) unsafe fn recv(&mut self, fd: RawFd, buf: *mut u8, len: usize, user_data: u64) {
        self.arm_input(fd, user_data, InputKind::Recv, buf, len);
    }

    pub(super) fn recv_multi(&mut self, fd: RawFd, user_data: u64) {
        self.arm_input(fd, user_data, InputKind::Multi, std::ptr::null_mut(), 0);
    }

    /// # Safety
    ///
    /// See [`super::Ring::send`].
    pub(super) unsafe fn send(
        &mut self,
        fd: RawFd,
        buf: *const u8,
        len: usize,
        flags: i32,
        user_data: u64,
    ) {
        let st = self.state(fd);
        st.out_buf = buf;
        // A stream send may write less than asked; the caller sends the rest after.
        st.out_len = len.min(u32::MAX as usize) as u32;
        st.out_flags = flags;
        self.arm_output(fd, user_data, OutputKind::Send);
    }

    /// # Safety
    ///
    /// See [`super::Ring::send_msg`].
    pub(super) unsafe fn send_msg(
        &mut self,
        fd: RawFd,
        msg: *const libc::msghdr,
        flags: i32,
        user_data: u64,
    ) {
        let st = self.state(fd);
        st.out_buf = msg.cast();
        st.out_len = 0;
        st.out_flags = flags;
        self.arm_output(fd, user_data, OutputKind::SendMsg);
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
        // SAFETY: all zeroes is a valid sockaddr_storage.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = len.min(std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t);
        // SAFETY: the caller's contract: `len` bytes readable at `addr`; the copy fits.
        unsafe {
            std::ptr::copy_nonoverlapping(
                addr as *const u8,
                &mut storage as *mut _ as *mut u8,
                len as usize,
            )
        };
        if self.arm_output(fd, user_data, OutputKind::Connect) {
            self.connects.insert(fd, Box::new(Connect { addr: storage, len, started: false }));
        }
    }

    pub(super) fn poll_multi(&mut self, fd: RawFd, user_data: u64) {
        self.arm_input(fd, user_data, InputKind::Poll, std::ptr::null_mut(), 0);
    }

    pub(super) fn accept_multi(&mut self, fd: RawFd, user_data: u64) {
        self.arm_input(fd, user_data, InputKind::Accept, std::ptr::null_mut(), 0);
    }

    pub(super) fn read_signals(&mut self, signalfd: RawFd) {
        let buf = self.signals.as_mut_ptr();
        self.arm_input(signalfd, Op::Signal.token(0), InputKind::Read, buf, 128);
    }

    pub(super) fn cancel(&mut self, fd: RawFd, user_data: u64) {
        let epfd = self.epfd.as_raw_fd();
        let Some(st) = self.fds.get_mut(fd as usize) else { return };
        if st.input != InputKind::None && st.in_user_data == user_data {
            if st.input == InputKind::Poll {
                // Level-triggered: it would keep reporting a readable channel.
                // SAFETY: plain system call.
                unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
                st.set(REGISTERED, false);
            }
            st.input = InputKind::None;
        } else if st.output == OutputKind::Connect && st.out_user_data == user_data {
            st.output = OutputKind::None;
            self.connects.remove(&fd);
        } else {
            // Completed already: its final completion is posted or handed over.
            return;
        }
        self.post(user_data, -libc::ECANCELED, 0);
    }

    pub(super) fn close(&mut self, fd: OwnedFd) {
        let raw = fd.as_raw_fd();
        let epfd = self.epfd.as_raw_fd();
        if let Some(st) = self.fds.get_mut(raw as usize) {
            debug_assert!(st.idle(), "closed while in flight");
            if st.has(REGISTERED) {
                // Before the close: another process may hold the same open file (the
                // listener's socket after its handoff), which would keep the registration
                // and its events alive under a number that gets reused.
                // SAFETY: plain system call.
                unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_DEL, raw, std::ptr::null_mut()) };
            }
            let queued = st.has(QUEUED);
            *st = FdState::default();
            st.set(QUEUED, queued);
        }
        drop(fd);
    }

    pub(super) fn nop(&mut self, user_data: u64) {
        self.post(user_data, 0, 0);
    }

    pub(super) fn arm_tick(&mut self, every: Duration) {
        self.tick_at = Some(Instant::now() + every);
    }

    /// Tries what is queued, waits for readiness (not at all when completions are ready),
    /// and tries what became ready.
    pub(super) fn submit_and_wait(&mut self, buffers: &mut Option<BufRing>) -> io::Result<()> {
        self.run_queued(buffers);
        let timeout = if !self.completions.is_empty() || !self.runnable.is_empty() {
            0
        } else {
            match self.tick_at {
                Some(at) => {
                    let wait = at.saturating_duration_since(Instant::now());
                    // Rounded up: a wait that ends early would spin until the tick is due.
                    wait.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32
                }
                None => -1,
            }
        };
        // SAFETY: `events` holds MAX_EVENTS entries for the kernel to fill.
        let n = unsafe {
            libc::epoll_wait(
                self.epfd.as_raw_fd(),
                self.events.as_mut_ptr(),
                MAX_EVENTS as i32,
                timeout,
            )
        };
        if n < 0 {
            let e = errno();
            if e != libc::EINTR {
                return Err(io::Error::from_raw_os_error(e));
            }
        }
        for i in 0..n.max(0) as usize {
            let libc::epoll_event { events, u64: data } = self.events[i];
            let fd = data as RawFd;
            let Some(st) = self.fds.get_mut(fd as usize) else { continue };
            let (hup, err) = (libc::EPOLLHUP as u32, libc::EPOLLERR as u32);
            if events & (libc::EPOLLIN as u32 | libc::EPOLLRDHUP as u32 | hup | err) != 0 {
                st.set(READABLE, true);
            }
            if events & (libc::EPOLLOUT as u32 | hup | err) != 0 {
                st.set(WRITABLE, true);
            }
            if !st.idle() && !st.has(QUEUED) {
                st.set(QUEUED, true);
                self.runnable.push(fd);
            }
        }
        self.run_queued(buffers);
        if self.tick_at.is_some_and(|at| Instant::now() >= at) {
            self.tick_at = None;
            self.post(Op::Tick.token(0), -libc::ETIME, 0);
        }
        Ok(())
    }

    /// Hands over every completion posted since the last call.
    pub(super) fn drain(&mut self, into: &mut Vec<Completion>) {
        into.clear();
        self.buffers_posted = 0;
        std::mem::swap(into, &mut self.completions);
    }

    /// Tries the operations of every queued descriptor once.
    fn run_queued(&mut self, buffers: &mut Option<BufRing>) {
        let mut queued = std::mem::take(&mut self.runnable);
        for &fd in &queued {
            self.run(fd, buffers);
        }
        queued.clear();
        // What was queued meanwhile (a share cut short) goes first next time; the list's
        // memory is kept.
        queued.append(&mut self.runnable);
        self.runnable = queued;
    }

    fn run(&mut self, fd: RawFd, buffers: &mut Option<BufRing>) {
        let Some(st) = self.fds.get_mut(fd as usize) else { return };
        st.set(QUEUED, false);
        let mut again = false;
        if st.has(READABLE) && st.input != InputKind::None {
            match self.run_input(fd, buffers) {
                Step::Again => again = true,
                Step::Blocked => self.fds[fd as usize].set(READABLE, false),
                Step::Done => {}
            }
        }
        let st = &self.fds[fd as usize];
        if st.has(WRITABLE) && st.output != OutputKind::None {
            match self.run_output(fd) {
                Step::Blocked => self.fds[fd as usize].set(WRITABLE, false),
                Step::Again => again = true,
                Step::Done => {}
            }
        }
        if again {
            self.queue(fd);
        }
    }

    /// Ends the input operation of `fd` with its final completion.
    fn end_input(&mut self, fd: RawFd, user_data: u64, result: i32) {
        self.fds[fd as usize].input = InputKind::None;
        self.post(user_data, result, 0);
    }

    fn run_input(&mut self, fd: RawFd, buffers: &mut Option<BufRing>) -> Step {
        let st = &self.fds[fd as usize];
        let (user_data, kind, buf, len) = (st.in_user_data, st.input, st.in_buf, st.in_len);
        match kind {
            InputKind::None => Step::Done,
            InputKind::Multi => {
                let bufs = buffers.as_mut().expect("provide_buffers was called");
                let size = bufs.size();
                for _ in 0..READS_PER_PASS {
                    let Some((bid, ptr)) = bufs.take() else {
                        if self.buffers_posted > 0 {
                            // This pass's completions hold them, and the process gives them
                            // back as it handles them: read on at the next pass. (Ending the
                            // receive here cost a peek and a re-registration per message
                            // once a burst outran the pool.)
                            return Step::Again;
                        }
                        // The process holds every buffer: ENOBUFS ends the receive, as
                        // under io_uring, but only if bytes (or the end) are really there.
                        let mut byte = 0u8;
                        let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT;
                        // SAFETY: one byte of our stack.
                        let r = unsafe { libc::recv(fd, (&mut byte as *mut u8).cast(), 1, flags) };
                        let result = match r {
                            r if r > 0 => -libc::ENOBUFS,
                            0 => 0,
                            _ => match errno() {
                                libc::EAGAIN => return Step::Blocked,
                                e => -e,
                            },
                        };
                        self.end_input(fd, user_data, result);
                        return Step::Done;
                    };
                    // SAFETY: a free buffer of `size` bytes from the pool, ours until given
                    // back or handed over with a completion.
                    let r = unsafe { libc::recv(fd, ptr.cast(), size, libc::MSG_DONTWAIT) };
                    if r > 0 {
                        let flags = F_BUFFER | F_MORE | (u32::from(bid) << BUFFER_SHIFT);
                        self.post(user_data, r as i32, flags);
                        self.buffers_posted += 1;
                        if (r as usize) < size {
                            // The queue was empty: whatever arrives next brings an edge.
                            return Step::Blocked;
                        }
                        continue;
                    }
                    let e = if r == 0 { 0 } else { errno() };
                    bufs.untake(bid);
                    match e {
                        libc::EAGAIN => return Step::Blocked,
                        libc::EINTR => continue,
                        e => {
                            self.end_input(fd, user_data, -e);
                            return Step::Done;
                        }
                    }
                }
                Step::Again
            }
            InputKind::Recv | InputKind::Read => loop {
                let len = len as usize;
                let r = if kind == InputKind::Read {
                    // SAFETY: the caller's contract (Ring::read_signals's own buffer).
                    unsafe { libc::read(fd, buf.cast(), len) }
                } else {
                    // SAFETY: the caller's contract (Ring::recv).
                    unsafe { libc::recv(fd, buf.cast(), len, libc::MSG_DONTWAIT) }
                };
                let result = if r >= 0 {
                    r as i32
                } else {
                    match errno() {
                        libc::EAGAIN => return Step::Blocked,
                        libc::EINTR => continue,
                        e => -e,
                    }
                };
                self.end_input(fd, user_data, result);
                return Step::Done;
            },
            InputKind::Accept => {
                for _ in 0..ACCEPTS_PER_PASS {
                    let flags = libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
                    let (null_addr, null_len) = (std::ptr::null_mut(), std::ptr::null_mut());
                    // SAFETY: no address asked for.
                    let new = unsafe { libc::accept4(fd, null_addr, null_len, flags) };
                    if new >= 0 {
                        self.post(user_data, new, F_MORE);
                        continue;
                    }
                    match errno() {
                        libc::EAGAIN => return Step::Blocked,
                        libc::EINTR | libc::ECONNABORTED => continue,
                        e => {
                            // Out of descriptors (EMFILE) and the like: reported, and the
                            // accept goes on from the next arrival. (io_uring's ends here and
                            // the listener re-arms it, which would accept, fail and re-arm in
                            // a loop while the cause lasts; the listener takes either.)
                            self.post(user_data, -e, F_MORE);
                            return Step::Blocked;
                        }
                    }
                }
                Step::Again
            }
            InputKind::Poll => {
                self.post(user_data, libc::POLLIN as i32, F_MORE);
                // The next wait says whether it still is readable.
                Step::Blocked
            }
        }
    }

    fn run_output(&mut self, fd: RawFd) -> Step {
        let st = &self.fds[fd as usize];
        let user_data = st.out_user_data;
        let result = match st.output {
            OutputKind::None => return Step::Done,
            OutputKind::Send | OutputKind::SendMsg => {
                let (buf, len, flags) = (st.out_buf, st.out_len as usize, st.out_flags);
                let flags = flags | libc::MSG_DONTWAIT;
                loop {
                    let r = if st.output == OutputKind::Send {
                        // SAFETY: the caller's contract (Ring::send).
                        unsafe { libc::send(fd, buf.cast(), len, flags) }
                    } else {
                        // SAFETY: the caller's contract (Ring::send_msg).
                        unsafe { libc::sendmsg(fd, buf.cast(), flags) }
                    };
                    if r >= 0 {
                        break r.min(i32::MAX as isize) as i32;
                    }
                    match errno() {
                        libc::EAGAIN => return Step::Blocked,
                        libc::EINTR => continue,
                        e => break -e,
                    }
                }
            }
            OutputKind::Connect => {
                let Some(c) = self.connects.get_mut(&fd) else { return Step::Done };
                let result = if !c.started {
                    let addr = (&c.addr as *const libc::sockaddr_storage).cast();
                    // SAFETY: a copy of the caller's address, `len` bytes of it.
                    let r = unsafe { libc::connect(fd, addr, c.len) };
                    match if r == 0 { 0 } else { errno() } {
                        libc::EINPROGRESS | libc::EINTR => {
                            c.started = true;
                            return Step::Blocked;
                        }
                        e => -e,
                    }
                } else {
                    let mut err: libc::c_int = 0;
                    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                    // SAFETY: an int-sized option into an int.
                    unsafe {
                        libc::getsockopt(
                            fd,
                            libc::SOL_SOCKET,
                            libc::SO_ERROR,
                            (&mut err as *mut libc::c_int).cast(),
                            &mut len,
                        )
                    };
                    if err != 0 {
                        -err
                    } else if connected(fd) {
                        0
                    } else {
                        // Readiness from before the connect (or a spurious one): wait on.
                        return Step::Blocked;
                    }
                };
                self.connects.remove(&fd);
                result
            }
        };
        self.fds[fd as usize].output = OutputKind::None;
        self.post(user_data, result, 0);
        Step::Done
    }
}

/// Whether `fd` has a peer (its connect finished).
fn connected(fd: RawFd) -> bool {
    // SAFETY: all zeroes is a valid sockaddr_storage.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: a buffer of `len` bytes for the address.
    unsafe {
        libc::getpeername(fd, (&mut addr as *mut libc::sockaddr_storage).cast(), &mut len) == 0
    }
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: plain fcntl calls on a descriptor the caller keeps open.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 && flags & libc::O_NONBLOCK == 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_descriptors_state_stays_small() {
        // One per connection in every worker, idle ones included. Raise this only knowing
        // it is paid per connection.
        let size = std::mem::size_of::<super::FdState>();
        assert!(size <= 48, "{size}");
    }
}
