//! The three kinds of process (all the same binary, chosen by a role flag) and the channels
//! between them. docs/ARCHITECTURE.md draws them.

pub mod control;
pub mod event_loop;
pub mod handoff;
pub mod health;
pub mod listener;
pub mod supervisor;
pub mod worker;

/// A socket address from the kernel's form (`getsockname`, `getpeername`), IPv4 or IPv6;
/// `None` for any other family.
pub(crate) fn socket_addr(
    addr: &nix::sys::socket::SockaddrStorage,
) -> Option<std::net::SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(std::net::SocketAddr::from((v4.ip(), v4.port())));
    }
    addr.as_sockaddr_in6().map(|v6| std::net::SocketAddr::from((v6.ip(), v6.port())))
}
