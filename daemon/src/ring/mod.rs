//! The thin io layer every process's event loop stands on: typed operations (receive, send,
//! vectored send, connect, accept, poll, cancel, close, tick, signal read), the `user_data`
//! encoding, the provided buffers that multishot receives fill, and the completions that
//! come back, on one of two backends chosen at start (`io.backend`): io_uring (`uring.rs`),
//! or epoll (`epoll.rs`) where io_uring is forbidden. The backend only moves bytes: the
//! processes, the handoff, the protocol core and the limits are the same on both.
//!
//! Why the `io-uring` crate and not tokio-uring: see the README ("Why io-uring").

use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::time::Duration;

mod bufring;
mod epoll;
mod uring;

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

/// The io backend a process runs (`io.backend`, resolved once by the supervisor: see
/// [`resolve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    IoUring,
    Epoll,
}

impl Backend {
    /// The name `io.backend`, the ready log line and `/metrics` use.
    pub fn name(self) -> &'static str {
        match self {
            Backend::IoUring => "io_uring",
            Backend::Epoll => "epoll",
        }
    }
}

/// Resolves `io.backend` ("auto", "io_uring" or "epoll") to the backend every process runs,
/// by setting up what a worker needs (a ring and a provided-buffer ring) once. Returns the
/// backend and, where "auto" fell back to epoll, why. "io_uring" where it is unavailable is
/// an error naming the cause and the fix.
pub fn resolve(configured: &str) -> Result<(Backend, Option<String>), String> {
    match configured {
        "epoll" => Ok((Backend::Epoll, None)),
        "io_uring" => probe().map(|()| (Backend::IoUring, None)).map_err(|e| e.to_string()),
        _ => match probe() {
            Ok(()) => Ok((Backend::IoUring, None)),
            Err(e) => Ok((Backend::Epoll, Some(e.to_string()))),
        },
    }
}

/// Whether io_uring has what the workers need: a ring, and a provided-buffer ring in it.
fn probe() -> Result<(), RingError> {
    let mut ring = Ring::new(Backend::IoUring)?;
    ring.provide_buffers(1, 4096)
}

/// A completion: what became of one operation (for a multishot operation, of one of its
/// results). The same for both backends, with io_uring's meaning and flag bits, so the
/// processes never know which backend runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The `user_data` the operation was queued with ([`Op::token`]).
    pub(crate) user_data: u64,
    /// The system call's result: bytes moved, a new descriptor, or `-errno`.
    pub(crate) result: i32,
    /// io_uring's `IORING_CQE_F_*` bits: [`Completion::more`] and [`Completion::buffer`].
    pub(crate) flags: u32,
}

/// `IORING_CQE_F_BUFFER`: the upper 16 bits of the flags are a buffer id.
const F_BUFFER: u32 = 1;
/// `IORING_CQE_F_MORE`: the multishot operation goes on.
const F_MORE: u32 = 2;
/// `IORING_CQE_BUFFER_SHIFT`.
const BUFFER_SHIFT: u32 = 16;

impl Completion {
    #[inline]
    pub fn user_data(&self) -> u64 {
        self.user_data
    }

    #[inline]
    pub fn result(&self) -> i32 {
        self.result
    }

    /// Whether more completions of the same multishot operation follow; the last one of any
    /// operation says no, and only then may its socket's slot be freed.
    #[inline]
    pub fn more(&self) -> bool {
        self.flags & F_MORE != 0
    }

    /// The provided buffer that holds the bytes received, if any.
    #[inline]
    pub fn buffer(&self) -> Option<u16> {
        (self.flags & F_BUFFER != 0).then_some((self.flags >> BUFFER_SHIFT) as u16)
    }
}

/// One process's io: every operation of its event loop goes through here, on the backend
/// the supervisor resolved. Operations complete the same way on both (see [`Completion`]):
/// a multishot operation's last completion lacks [`Completion::more`], a cancelled
/// operation posts a final `-ECANCELED`, and nothing completes before the loop's next
/// [`Ring::drain`].
pub struct Ring {
    /// Enum dispatch rather than a trait object: one predictable branch per call on the hot
    /// path, and calls the compiler can inline.
    imp: Imp,
    /// The provided buffers of multishot receives, where the process has them. Declared
    /// after `imp` so that it is dropped after it: the buffers outlive every receive.
    buffers: Option<BufRing>,
}

/// The backend behind a [`Ring`].
enum Imp {
    Uring(uring::Uring),
    Epoll(epoll::Epoll),
}

impl Ring {
    pub fn new(backend: Backend) -> Result<Ring, RingError> {
        let imp = match backend {
            Backend::IoUring => Imp::Uring(uring::Uring::new()?),
            Backend::Epoll => Imp::Epoll(epoll::Epoll::new().map_err(RingError::Epoll)?),
        };
        Ok(Ring { imp, buffers: None })
    }

    pub fn backend(&self) -> Backend {
        match self.imp {
            Imp::Uring(_) => Backend::IoUring,
            Imp::Epoll(_) => Backend::Epoll,
        }
    }

    /// Sets up `count` provided buffers of `size` bytes for [`Ring::recv_multi`].
    pub fn provide_buffers(&mut self, count: u16, size: usize) -> Result<(), RingError> {
        let bufs = match &self.imp {
            Imp::Uring(u) => u.provide_buffers(count, size).map_err(RingError::Buffers)?,
            Imp::Epoll(_) => BufRing::pool(count, size),
        };
        self.buffers = Some(bufs);
        Ok(())
    }

    /// The provided buffers; only a ring that has them receives into them.
    #[inline]
    pub fn buffers(&mut self) -> &mut BufRing {
        self.buffers.as_mut().expect("provide_buffers was called")
    }

    /// A receive of at most `len` bytes on `fd` into `buf`; completes with the byte count (0:
    /// the peer closed) or `-errno`.
    ///
    /// # Safety
    ///
    /// `buf..buf + len` must stay valid, and must not move or be read or written by anyone
    /// else, until the receive completes; `fd` must stay open as long.
    #[inline]
    pub unsafe fn recv(&mut self, fd: RawFd, buf: *mut u8, len: usize, user_data: u64) {
        match &mut self.imp {
            // SAFETY: the caller's contract.
            Imp::Uring(u) => unsafe { u.recv(fd, buf, len, user_data) },
            // SAFETY: the caller's contract.
            Imp::Epoll(e) => unsafe { e.recv(fd, buf, len, user_data) },
        }
    }

    /// A multishot receive on `fd` into the provided buffers. No memory of the caller's is
    /// involved: each completion names the buffer that holds its bytes. It ends (a completion
    /// without [`Completion::more`]) at end of file, on an error, when cancelled, or with
    /// `-ENOBUFS` when bytes arrived and every buffer was in use.
    #[inline]
    pub fn recv_multi(&mut self, fd: RawFd, user_data: u64) {
        match &mut self.imp {
            Imp::Uring(u) => {
                let group = self.buffers.as_ref().expect("provide_buffers was called").group;
                u.recv_multi(fd, group, user_data)
            }
            Imp::Epoll(e) => e.recv_multi(fd, user_data),
        }
    }

    /// A send of `len` bytes from `buf` on `fd` with `flags` (`MSG_*`); completes with the
    /// byte count, which may be short, or `-errno`.
    ///
    /// # Safety
    ///
    /// `buf..buf + len` must stay valid, and must not move or be written, until the send
    /// completes; `fd` must stay open as long.
    #[inline]
    pub unsafe fn send(&mut self, fd: RawFd, buf: *const u8, len: usize, flags: i32, ud: u64) {
        match &mut self.imp {
            // SAFETY: the caller's contract.
            Imp::Uring(u) => unsafe { u.send(fd, buf, len, flags, ud) },
            // SAFETY: the caller's contract.
            Imp::Epoll(e) => unsafe { e.send(fd, buf, len, flags, ud) },
        }
    }

    /// A vectored send: the buffers of `msg`'s iovecs, in order, as one write on `fd` with
    /// `flags` (`MSG_*`; `msg` names no address and carries no control data); completes like
    /// [`send`](Self::send), with a byte count that may end inside any of them.
    ///
    /// # Safety
    ///
    /// `msg`, its iovec array and every buffer they point to must stay valid, and must not
    /// move or be written, until the send completes (io_uring reads the header when the entry
    /// is submitted, epoll at each try); `fd` must stay open as long.
    #[inline]
    pub unsafe fn send_msg(&mut self, fd: RawFd, msg: *const libc::msghdr, flags: i32, ud: u64) {
        match &mut self.imp {
            // SAFETY: the caller's contract.
            Imp::Uring(u) => unsafe { u.send_msg(fd, msg, flags, ud) },
            // SAFETY: the caller's contract.
            Imp::Epoll(e) => unsafe { e.send_msg(fd, msg, flags, ud) },
        }
    }

    /// A TCP connect of the non-blocking socket `fd` to `addr`; completes with 0 or `-errno`.
    ///
    /// # Safety
    ///
    /// `addr..addr + len` must stay valid and unchanged until the connect completes (the
    /// epoll backend copies it at once, io_uring may read it later); `fd` must stay open as
    /// long.
    pub unsafe fn connect(
        &mut self,
        fd: RawFd,
        addr: *const libc::sockaddr,
        len: libc::socklen_t,
        user_data: u64,
    ) {
        match &mut self.imp {
            // SAFETY: the caller's contract.
            Imp::Uring(u) => unsafe { u.connect(fd, addr, len, user_data) },
            // SAFETY: the caller's contract.
            Imp::Epoll(e) => unsafe { e.connect(fd, addr, len, user_data) },
        }
    }

    /// A multishot poll for readability of `fd` (a channel or listening socket).
    pub fn poll_multi(&mut self, fd: &impl AsRawFd, user_data: u64) {
        match &mut self.imp {
            Imp::Uring(u) => u.poll_multi(fd.as_raw_fd(), user_data),
            Imp::Epoll(e) => e.poll_multi(fd.as_raw_fd(), user_data),
        }
    }

    /// A multishot accept on the listening socket `fd`; each completion is a new socket.
    pub fn accept_multi(&mut self, fd: &impl AsRawFd, user_data: u64) {
        match &mut self.imp {
            Imp::Uring(u) => u.accept_multi(fd.as_raw_fd(), user_data),
            Imp::Epoll(e) => e.accept_multi(fd.as_raw_fd(), user_data),
        }
    }

    /// Cancels the operation with `user_data` on `fd` (the epoll backend finds it by its
    /// descriptor, so it keeps no table by `user_data`): it posts a final `-ECANCELED`
    /// completion, unless it completed already. The cancel's own completion, if any, needs
    /// nothing.
    pub fn cancel(&mut self, fd: &impl AsRawFd, user_data: u64) {
        match &mut self.imp {
            Imp::Uring(u) => u.cancel(user_data),
            Imp::Epoll(e) => e.cancel(fd.as_raw_fd(), user_data),
        }
    }

    /// Closes `fd` with the next submission instead of a `close(2)` of its own under
    /// io_uring: one system call fewer per connection. The completion, if any, carries
    /// nothing to act on. No operation on `fd` may be in flight.
    #[inline]
    pub fn close_later(&mut self, fd: OwnedFd) {
        match &mut self.imp {
            Imp::Uring(u) => u.close(fd.into_raw_fd()),
            Imp::Epoll(e) => e.close(fd),
        }
    }

    /// An operation that does nothing and completes with 0: what the tests of the queue's
    /// ordering push.
    pub fn nop(&mut self, user_data: u64) {
        match &mut self.imp {
            Imp::Uring(u) => u.nop(user_data),
            Imp::Epoll(e) => e.nop(user_data),
        }
    }

    /// Arms the periodic tick: one completion `every` from now; re-armed on it.
    pub fn arm_tick(&mut self, every: Duration) {
        match &mut self.imp {
            Imp::Uring(u) => u.arm_tick(every),
            Imp::Epoll(e) => e.arm_tick(every),
        }
    }

    /// Reads `signalfd` into the ring's own buffer; what was read does not matter (every
    /// signal the processes block means "stop"), only that one arrived. Re-armed on its
    /// completion.
    pub fn read_signals(&mut self, signalfd: &impl AsRawFd) {
        match &mut self.imp {
            Imp::Uring(u) => u.read_signals(signalfd.as_raw_fd()),
            Imp::Epoll(e) => e.read_signals(signalfd.as_raw_fd()),
        }
    }

    /// Submits what is queued and waits for at least one completion; signals (EINTR)
    /// return.
    #[inline]
    pub fn submit_and_wait(&mut self) -> io::Result<()> {
        match &mut self.imp {
            Imp::Uring(u) => u.submit_and_wait(),
            Imp::Epoll(e) => e.submit_and_wait(&mut self.buffers),
        }
    }

    /// Takes every completion now available.
    #[inline]
    pub fn drain(&mut self, into: &mut Vec<Completion>) {
        match &mut self.imp {
            Imp::Uring(u) => u.drain(into),
            Imp::Epoll(e) => e.drain(into),
        }
    }
}

/// Why a ring could not be set up; the message names the cause and the fix.
#[derive(Debug)]
pub enum RingError {
    /// `io_uring_setup` failed: the kernel lacks io_uring, or a policy or limit forbids it.
    Unavailable(String),
    /// The provided-buffer ring could not be mapped or registered.
    Buffers(io::Error),
    /// The epoll instance could not be created.
    Epoll(io::Error),
}

impl std::fmt::Display for RingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingError::Unavailable(message) => f.write_str(message),
            RingError::Buffers(e) => {
                write!(f, "io_uring unavailable: cannot register the receive buffer ring: {e}")
            }
            RingError::Epoll(e) => write!(f, "epoll_create1: {e}"),
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
            "io_uring is limited to the group in kernel.io_uring_group (kernel.io_uring_disabled = 1); run syncgate in that group or set the sysctl to 0".to_string()
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
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::{AsRawFd, FromRawFd};

    use nix::sys::socket::SockaddrLike;

    use super::*;

    /// Every test runs on both backends.
    const BOTH: [Backend; 2] = [Backend::IoUring, Backend::Epoll];

    /// Waits for completions until `done` says the ones seen are enough.
    fn complete_until(ring: &mut Ring, done: impl Fn(&[Completion]) -> bool) -> Vec<Completion> {
        let (mut seen, mut batch) = (Vec::new(), Vec::new());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done(&seen) {
            assert!(std::time::Instant::now() < deadline, "stuck after {seen:?}");
            ring.submit_and_wait().unwrap();
            ring.drain(&mut batch);
            seen.extend_from_slice(&batch);
        }
        seen
    }

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

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
    fn completion_flags_read_as_io_uring_writes_them() {
        // The epoll backend writes these bits; the io_uring crate must read them the same.
        let flags = (7 << BUFFER_SHIFT) | F_BUFFER | F_MORE;
        let c = Completion { user_data: 1, result: 5, flags };
        assert!(c.more());
        assert!(io_uring::cqueue::more(flags));
        assert_eq!(c.buffer(), Some(7));
        assert_eq!(io_uring::cqueue::buffer_select(flags), c.buffer());
        let last = Completion { user_data: 1, result: 0, flags: 0 };
        assert!(!last.more());
        assert_eq!(last.buffer(), None);
    }

    #[test]
    fn more_entries_than_the_queue_holds_all_complete_in_order() {
        for backend in BOTH {
            let mut ring = Ring::new(backend).expect("ring");
            let total = 3 * ENTRIES as u64;
            for i in 0..total {
                ring.nop(i);
            }
            let seen = complete_until(&mut ring, |c| c.len() as u64 >= total);
            let order: Vec<u64> = seen.iter().map(|c| c.user_data()).collect();
            assert_eq!(order, (0..total).collect::<Vec<_>>(), "{backend:?}");
        }
    }

    #[test]
    fn a_multishot_receive_ends_with_enobufs_when_the_buffers_run_out_and_is_rearmed() {
        for backend in BOTH {
            let mut ring = Ring::new(backend).expect("ring");
            ring.provide_buffers(2, 64).unwrap();
            let (mut client, server) = pair();
            ring.recv_multi(server.as_raw_fd(), 9);
            // Three reads' worth while two buffers exist and none is given back.
            client.write_all(&[1u8; 64]).unwrap();
            let first = complete_until(&mut ring, |c| !c.is_empty());
            client.write_all(&[2u8; 64]).unwrap();
            let mut seen = complete_until(&mut ring, |c| {
                c.iter().map(|c| c.result().max(0)).sum::<i32>()
                    + first.iter().map(|c| c.result().max(0)).sum::<i32>()
                    >= 128
            });
            seen.splice(0..0, first);
            client.write_all(&[3u8; 64]).unwrap();
            let more = complete_until(&mut ring, |c| c.iter().any(|c| !c.more()));
            seen.extend(more);
            let end = seen.last().unwrap();
            assert_eq!(end.result(), -libc::ENOBUFS, "{backend:?}: {seen:?}");
            assert!(!end.more());
            let got: usize =
                seen.iter().filter(|c| c.result() > 0).map(|c| c.result() as usize).sum();
            assert_eq!(got, 128, "{backend:?}: {seen:?}");
            let bids: Vec<u16> = seen.iter().filter_map(|c| c.buffer()).collect();
            assert!(seen.iter().filter(|c| c.result() > 0).all(|c| c.more()), "{seen:?}");
            // Given back and re-armed, the receive gets what waited.
            for bid in bids {
                assert!(ring.buffers().get(bid, 64).iter().all(|&b| b == 1 || b == 2));
                ring.buffers().recycle(bid);
            }
            ring.recv_multi(server.as_raw_fd(), 9);
            let rest = complete_until(&mut ring, |c| c.iter().any(|c| c.result() > 0));
            let c = rest.iter().find(|c| c.result() > 0).unwrap();
            assert_eq!(c.result(), 64, "{backend:?}");
            let bid = c.buffer().expect("a buffer");
            assert!(ring.buffers().get(bid, 64).iter().all(|&b| b == 3));
            ring.buffers().recycle(bid);
            // The peer's close ends it without the more flag.
            drop(client);
            let end = complete_until(&mut ring, |c| c.iter().any(|c| !c.more()));
            assert_eq!(end.last().unwrap().result(), 0, "{backend:?}: {end:?}");
        }
    }

    #[test]
    fn a_cancelled_receive_posts_a_final_ecanceled() {
        for backend in BOTH {
            let mut ring = Ring::new(backend).expect("ring");
            ring.provide_buffers(4, 64).unwrap();
            let (_client, server) = pair();
            ring.recv_multi(server.as_raw_fd(), 5);
            // Armed (and found nothing to read) before it is cancelled.
            ring.nop(1);
            complete_until(&mut ring, |c| c.iter().any(|c| c.user_data() == 1));
            ring.cancel(&server, 5);
            let seen = complete_until(&mut ring, |c| c.iter().any(|c| c.user_data() == 5));
            let c = seen.iter().find(|c| c.user_data() == 5).unwrap();
            assert_eq!(c.result(), -libc::ECANCELED, "{backend:?}");
            assert!(!c.more());
        }
    }

    #[test]
    fn a_large_send_to_a_slow_reader_completes_in_parts() {
        for backend in BOTH {
            let mut ring = Ring::new(backend).expect("ring");
            let (mut client, server) = pair();
            let data: Vec<u8> = (0..8 << 20).map(|i| (i % 251) as u8).collect();
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                let mut buf = vec![0u8; 64 << 10];
                while got.len() < 8 << 20 {
                    let n = client.read(&mut buf).unwrap();
                    assert!(n > 0);
                    got.extend_from_slice(&buf[..n]);
                }
                got
            });
            let mut sent = 0;
            let mut sends = 0;
            while sent < data.len() {
                // SAFETY: `data` outlives the send, which completes before the next.
                unsafe {
                    ring.send(
                        server.as_raw_fd(),
                        data[sent..].as_ptr(),
                        data.len() - sent,
                        libc::MSG_NOSIGNAL,
                        3,
                    )
                };
                let c = complete_until(&mut ring, |c| !c.is_empty());
                assert_eq!(c.len(), 1);
                assert!(c[0].result() > 0, "{backend:?}: {c:?}");
                sent += c[0].result() as usize;
                sends += 1;
            }
            assert_eq!(reader.join().unwrap(), data, "{backend:?}");
            assert!(sends >= 1);
        }
    }

    #[test]
    fn a_vectored_send_writes_its_buffers_in_order_and_may_stop_inside_one() {
        for backend in BOTH {
            let mut ring = Ring::new(backend).expect("ring");
            let (mut client, server) = pair();
            let parts: [Vec<u8>; 3] = [b"head".to_vec(), vec![7u8; 16 << 20], b"tail".to_vec()];
            let total: usize = parts.iter().map(Vec::len).sum();
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                let mut buf = vec![0u8; 64 << 10];
                while got.len() < total {
                    let n = client.read(&mut buf).unwrap();
                    assert!(n > 0);
                    got.extend_from_slice(&buf[..n]);
                }
                got
            });
            // What is left to write, from the first part not yet whole.
            let (mut part, mut offset, mut sends) = (0, 0, 0);
            while part < parts.len() {
                let mut iov: Vec<libc::iovec> = parts[part..]
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let p = if i == 0 { &p[offset..] } else { &p[..] };
                        libc::iovec { iov_base: p.as_ptr() as *mut _, iov_len: p.len() }
                    })
                    .collect();
                // SAFETY: all-zero is a valid msghdr; it names no address, no control data.
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = iov.as_mut_ptr();
                msg.msg_iovlen = iov.len();
                // SAFETY: `msg`, `iov` and `parts` outlive the send, which completes below.
                unsafe { ring.send_msg(server.as_raw_fd(), &msg, libc::MSG_NOSIGNAL, 4) };
                let c = complete_until(&mut ring, |c| !c.is_empty());
                assert!(c[0].result() > 0, "{backend:?}: {c:?}");
                let mut n = c[0].result() as usize;
                while part < parts.len() && n >= parts[part].len() - offset {
                    n -= parts[part].len() - offset;
                    (part, offset) = (part + 1, 0);
                }
                offset += n;
                sends += 1;
            }
            assert_eq!(reader.join().unwrap(), parts.concat(), "{backend:?}");
            assert!(sends > 1, "{backend:?}: 16 MiB is more than a socket takes at once");
        }
    }

    #[test]
    fn a_connect_completes_and_a_refused_one_says_why() {
        for backend in BOTH {
            let mut ring = Ring::new(backend).expect("ring");
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = nix::sys::socket::SockaddrStorage::from(listener.local_addr().unwrap());
            let connect = |ring: &mut Ring, ud: u64| {
                // SAFETY: a new socket this test owns.
                let fd = unsafe {
                    OwnedFd::from_raw_fd(libc::socket(
                        libc::AF_INET,
                        libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                        0,
                    ))
                };
                // SAFETY: `addr` outlives the connect, which completes below.
                unsafe { ring.connect(fd.as_raw_fd(), addr.as_ptr(), addr.len(), ud) };
                let c = complete_until(ring, |c| c.iter().any(|c| c.user_data() == ud));
                (fd, c.iter().find(|c| c.user_data() == ud).unwrap().result())
            };
            let (fd, result) = connect(&mut ring, 1);
            assert_eq!(result, 0, "{backend:?}");
            ring.close_later(fd);
            drop(listener);
            let (_fd, result) = connect(&mut ring, 2);
            assert_eq!(result, -libc::ECONNREFUSED, "{backend:?}");
        }
    }

    #[test]
    fn accepts_ticks_and_receives_into_the_callers_memory() {
        for backend in BOTH {
            let mut ring = Ring::new(backend).expect("ring");
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            ring.accept_multi(&listener, 1);
            let mut clients: Vec<TcpStream> = (0..3)
                .map(|_| TcpStream::connect(listener.local_addr().unwrap()).unwrap())
                .collect();
            let seen = complete_until(&mut ring, |c| c.len() >= 3);
            assert!(seen.iter().all(|c| c.result() >= 0 && c.more()), "{backend:?}: {seen:?}");
            // SAFETY: a descriptor the accept made for us.
            let socket = unsafe { OwnedFd::from_raw_fd(seen[0].result()) };
            for c in &seen[1..] {
                // SAFETY: as above.
                ring.close_later(unsafe { OwnedFd::from_raw_fd(c.result()) });
            }
            let mut buf = vec![0u8; 16];
            // SAFETY: `buf` outlives the receive, which completes below.
            unsafe { ring.recv(socket.as_raw_fd(), buf.as_mut_ptr(), buf.len(), 2) };
            clients[0].write_all(b"hello").unwrap();
            let c = complete_until(&mut ring, |c| c.iter().any(|c| c.user_data() == 2));
            assert_eq!(c.iter().find(|c| c.user_data() == 2).unwrap().result(), 5);
            assert_eq!(&buf[..5], b"hello");
            ring.arm_tick(Duration::from_millis(20));
            let started = std::time::Instant::now();
            complete_until(&mut ring, |c| c.iter().any(|c| Op::of(c.user_data()).0 == Op::Tick));
            assert!(started.elapsed() >= Duration::from_millis(19), "{backend:?}");
            ring.cancel(&listener, 1);
            let c =
                complete_until(&mut ring, |c| c.iter().any(|c| c.user_data() == 1 && !c.more()));
            assert_eq!(c.last().unwrap().result(), -libc::ECANCELED, "{backend:?}");
            clients.clear();
        }
    }
}
