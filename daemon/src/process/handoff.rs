//! The socket handoff from the listener to a worker: one datagram on a `SOCK_SEQPACKET` Unix
//! socket pair carrying the accepted socket (SCM_RIGHTS), the client's address and every byte
//! the listener read from it (the request head, plus anything the client sent after it).
//!
//! SEQPACKET keeps each handoff one message, so a descriptor can never be paired with the
//! wrong bytes. The supervisor keeps both ends of every pair open: if a worker dies, handoffs
//! queue in the pair instead of failing, and its replacement picks them up.

use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

use crate::config::MAX_HEAD_BYTES;

/// Peer address (16 bytes, IPv4 mapped into IPv6) and port (2 bytes) before the head.
const ADDR_LEN: usize = 18;
/// The largest handoff datagram.
pub const MAX_MESSAGE: usize = ADDR_LEN + MAX_HEAD_BYTES;

/// One socket in transit.
pub struct Handoff {
    /// The client's socket; the receiver owns it from now on.
    pub socket: OwnedFd,
    /// The client's address, for logs and per-address limits.
    pub peer: SocketAddr,
    /// Everything read from the socket so far, starting with the request head.
    pub bytes: Vec<u8>,
}

/// A socket pair for one worker: `(listener_end, worker_end)`, both non-blocking.
pub fn pair() -> nix::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    )
}

/// Sends `socket` with `peer` and `bytes` over `channel`. On error (`EAGAIN` when the worker is
/// behind) the caller still owns `socket` and answers the client itself.
pub fn send(
    channel: BorrowedFd<'_>,
    socket: RawFd,
    peer: SocketAddr,
    bytes: &[u8],
) -> nix::Result<()> {
    let mut addr = [0u8; ADDR_LEN];
    let ip = match peer.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    addr[..16].copy_from_slice(&ip.octets());
    addr[16..].copy_from_slice(&peer.port().to_be_bytes());
    let iov = [IoSlice::new(&addr), IoSlice::new(bytes)];
    let fds = [socket];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(channel.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// Why a receive produced no handoff.
#[derive(Debug)]
pub enum RecvError {
    /// Nothing queued now.
    WouldBlock,
    /// The other end is gone (the listener exited).
    Closed,
    /// A datagram that was not a well-formed handoff; it was dropped (and any descriptor in it
    /// closed), the channel is still usable.
    Malformed(&'static str),
    Io(nix::Error),
}

/// Receives one handoff from `channel` into `buf` (at least [`MAX_MESSAGE`] bytes).
pub fn recv(channel: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Handoff, RecvError> {
    let mut cmsg_space = nix::cmsg_space!([RawFd; 4]);
    let (len, flags, fds) = {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match recvmsg::<()>(
            channel.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(msg) => msg,
            Err(nix::Error::EAGAIN) => return Err(RecvError::WouldBlock),
            Err(e) => return Err(RecvError::Io(e)),
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(RecvError::Io)? {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: the kernel just installed these descriptors for us; we own them.
                fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        (msg.bytes, msg.flags, fds)
    };
    if len == 0 && fds.is_empty() {
        return Err(RecvError::Closed);
    }
    if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
        return Err(RecvError::Malformed("truncated handoff"));
    }
    let mut fds = fds.into_iter();
    let (Some(socket), None) = (fds.next(), fds.next()) else {
        return Err(RecvError::Malformed("handoff without exactly one socket"));
    };
    if len < ADDR_LEN {
        return Err(RecvError::Malformed("handoff shorter than its address"));
    }
    let octets: [u8; 16] = buf[..16].try_into().expect("16 bytes");
    let ip = Ipv6Addr::from(octets);
    let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
    let port = u16::from_be_bytes([buf[16], buf[17]]);
    Ok(Handoff { socket, peer: SocketAddr::new(ip, port), bytes: buf[ADDR_LEN..len].to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn a_socket_and_its_bytes_travel_together() {
        let (tx, rx) = pair().unwrap();
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer: SocketAddr = "192.0.2.7:4242".parse().unwrap();
        send(tx.as_fd(), b.as_raw_fd(), peer, b"GET / HTTP/1.1\r\n\r\n").unwrap();
        drop(b);
        let mut buf = vec![0u8; MAX_MESSAGE];
        let h = recv(rx.as_fd(), &mut buf).unwrap();
        assert_eq!(h.peer, peer);
        assert_eq!(h.bytes, b"GET / HTTP/1.1\r\n\r\n");
        let mut received = std::os::unix::net::UnixStream::from(h.socket);
        received.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        a.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        assert!(matches!(recv(rx.as_fd(), &mut buf), Err(RecvError::WouldBlock)));
    }

    #[test]
    fn ipv6_peers_keep_their_address() {
        let (tx, rx) = pair().unwrap();
        let (_a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        send(tx.as_fd(), b.as_raw_fd(), peer, b"x").unwrap();
        let mut buf = vec![0u8; MAX_MESSAGE];
        assert_eq!(recv(rx.as_fd(), &mut buf).unwrap().peer, peer);
    }

    #[test]
    fn a_datagram_without_a_socket_is_dropped() {
        let (tx, rx) = pair().unwrap();
        nix::unistd::write(&tx, b"garbage").unwrap();
        let mut buf = vec![0u8; MAX_MESSAGE];
        assert!(matches!(recv(rx.as_fd(), &mut buf), Err(RecvError::Malformed(_))));
        drop(tx);
        assert!(matches!(recv(rx.as_fd(), &mut buf), Err(RecvError::Closed)));
    }
}
