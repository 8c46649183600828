//! The control channel between the supervisor and each child: one `SOCK_SEQPACKET` pair per
//! child, so every message is one datagram.
//!
//! - child -> supervisor: `Ready` once its ring runs; `Applied(generation)` after a reload.
//! - supervisor -> child: `Config { generation, resolved }` (a validated configuration);
//!   workers in upstream mode also get `Health { down }`, the upstreams the health checks
//!   declared down (`upstream::health`), on every change and once they are ready.
//! - supervisor -> worker: `Own` (commit to your write-ahead log: no other generation
//!   runs) and `Share` (one is about to: fold the log in, write through, answer `Shared`);
//!   see the supervisor's `replace`.
//!
//! A child applies a configuration in its event loop between two completions, so no
//! connection sees a half-applied one.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{recv, send, MsgFlags};

/// Largest control datagram: a resolved configuration with inline keys fits many times over.
pub const MAX_MESSAGE: usize = 256 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Ready,
    Applied(u64),
    Config {
        generation: u64,
        resolved: String,
    },
    /// A graceful replacement took over: keep the connections for the drain timeout, then
    /// close them with 1012 and exit.
    Drain,
    /// Listener: stop accepting (a new listener takes over); answered with `Stopped` once no
    /// accept can complete here any more.
    Stop,
    Stopped,
    /// Workers: the URLs of the upstreams that are down now; every other one is up.
    Health {
        down: Vec<String>,
    },
    /// Workers: another generation is about to share your client groups (a graceful
    /// replacement): fold your write-ahead log into SQLite and write through from now on;
    /// answered with `Shared` once done.
    Share,
    Shared,
    /// Workers: no other generation runs: commit to your write-ahead log.
    Own,
}

impl Message {
    fn encode(&self) -> Vec<u8> {
        match self {
            Message::Ready => b"R".to_vec(),
            Message::Drain => b"D".to_vec(),
            Message::Stop => b"S".to_vec(),
            Message::Stopped => b"s".to_vec(),
            Message::Share => b"W".to_vec(),
            Message::Shared => b"w".to_vec(),
            Message::Own => b"O".to_vec(),
            Message::Applied(generation) => {
                let mut out = b"A".to_vec();
                out.extend_from_slice(&generation.to_le_bytes());
                out
            }
            Message::Health { down } => {
                // URLs hold no newline (`upstream::Target::parse` refuses control characters).
                let mut out = b"H".to_vec();
                out.extend_from_slice(down.join("\n").as_bytes());
                out
            }
            Message::Config { generation, resolved } => {
                let mut out = b"C".to_vec();
                out.extend_from_slice(&generation.to_le_bytes());
                out.extend_from_slice(resolved.as_bytes());
                out
            }
        }
    }

    fn decode(bytes: &[u8]) -> Option<Message> {
        let generation = || Some(u64::from_le_bytes(bytes.get(1..9)?.try_into().ok()?));
        match bytes.first()? {
            b'R' if bytes.len() == 1 => Some(Message::Ready),
            b'D' if bytes.len() == 1 => Some(Message::Drain),
            b'S' if bytes.len() == 1 => Some(Message::Stop),
            b's' if bytes.len() == 1 => Some(Message::Stopped),
            b'W' if bytes.len() == 1 => Some(Message::Share),
            b'w' if bytes.len() == 1 => Some(Message::Shared),
            b'O' if bytes.len() == 1 => Some(Message::Own),
            b'A' if bytes.len() == 9 => Some(Message::Applied(generation()?)),
            b'H' => {
                let text = std::str::from_utf8(&bytes[1..]).ok()?;
                let down = text.split('\n').filter(|u| !u.is_empty()).map(String::from).collect();
                Some(Message::Health { down })
            }
            b'C' => Some(Message::Config {
                generation: generation()?,
                resolved: String::from_utf8(bytes[9..].to_vec()).ok()?,
            }),
            _ => None,
        }
    }
}

/// A pair `(supervisor_end, child_end)`; the child's end is non-blocking (its ring polls it).
pub fn pair() -> nix::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (a, b) =
        socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
    nix::fcntl::fcntl(&b, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))?;
    Ok((a, b))
}

pub fn send_message(fd: BorrowedFd<'_>, m: &Message) -> nix::Result<()> {
    send(fd.as_raw_fd(), &m.encode(), MsgFlags::MSG_NOSIGNAL).map(drop)
}

/// Why [`recv_message`] returned nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum RecvError {
    WouldBlock,
    /// The other end is gone.
    Closed,
    /// A datagram that is not a control message (dropped).
    Malformed,
    Io(nix::Error),
}

pub fn recv_message(fd: &impl AsFd, buf: &mut [u8]) -> Result<Message, RecvError> {
    match recv(fd.as_fd().as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
        Ok(0) => Err(RecvError::Closed),
        Ok(n) => Message::decode(&buf[..n]).ok_or(RecvError::Malformed),
        Err(nix::Error::EAGAIN) => Err(RecvError::WouldBlock),
        Err(e) => Err(RecvError::Io(e)),
    }
}

/// What a child is told to do.
pub enum Order {
    Apply(Box<crate::config::Config>),
    Drain,
    Stop,
    /// The upstreams that are down now (by URL).
    Health(Vec<String>),
    /// Fold the write-ahead log in and write through (answer `Shared` when done).
    Share,
    /// Commit to the write-ahead log.
    Own,
}

/// Child side: drains the channel, acknowledging each configuration it returns. The
/// supervisor validated them, so a parse failure here is a bug worth a loud log line.
pub fn receive_orders(control: &OwnedFd) -> Vec<Order> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut out = Vec::new();
    loop {
        match recv_message(control, &mut buf) {
            Ok(Message::Config { generation, resolved }) => {
                match crate::config::Config::from_resolved(&resolved) {
                    Ok(config) => {
                        out.push(Order::Apply(Box::new(config)));
                        log::info!("applied configuration generation={generation}");
                    }
                    Err(e) => log::error!("reload generation={generation} not applied: {e}"),
                }
                let _ = send_message(control.as_fd(), &Message::Applied(generation));
            }
            Ok(Message::Drain) => out.push(Order::Drain),
            Ok(Message::Stop) => out.push(Order::Stop),
            Ok(Message::Health { down }) => out.push(Order::Health(down)),
            Ok(Message::Share) => out.push(Order::Share),
            Ok(Message::Own) => out.push(Order::Own),
            Ok(_) | Err(RecvError::Malformed) => {}
            Err(_) => return out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let (sup, child) = pair().unwrap();
        let mut buf = vec![0u8; MAX_MESSAGE];
        for m in [
            Message::Ready,
            Message::Applied(7),
            Message::Config { generation: 3, resolved: "workers = 2\n".into() },
            Message::Drain,
            Message::Stop,
            Message::Stopped,
            Message::Share,
            Message::Shared,
            Message::Own,
            Message::Health { down: vec![] },
            Message::Health { down: vec!["ws://a:1".into(), "ws://b:2/zero".into()] },
        ] {
            send_message(sup.as_fd(), &m).unwrap();
            assert_eq!(recv_message(&child, &mut buf).unwrap(), m);
        }
        assert_eq!(recv_message(&child, &mut buf), Err(RecvError::WouldBlock));
        nix::unistd::write(&sup, b"?").unwrap();
        assert_eq!(recv_message(&child, &mut buf), Err(RecvError::Malformed));
        drop(sup);
        assert_eq!(recv_message(&child, &mut buf), Err(RecvError::Closed));
    }
}
