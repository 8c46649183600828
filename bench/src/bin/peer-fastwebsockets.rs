//! `peer-fastwebsockets`: the protocol subset of the benchmarks (docs/PROTOCOL.md: protocol
//! header echo, `connected`, ping -> pong, push -> poke to the client group) on Deno's
//! fastwebsockets, written the way its users write a fast server.
//!
//! - One current-thread runtime: the benchmark pins each server to one core.
//! - The upgrade is read with httparse and answered by hand, then the socket is handed to
//!   `WebSocket::after_handshake` (the crate's own raw-socket entry point). Its `upgrade`
//!   feature would bring hyper in for the same 101, and nothing else here needs hyper.
//! - The socket is split; a reader task per connection collects fragments, and every
//!   writer (the connection itself, or another member poking it) locks the write half
//!   and writes straight to the socket: no outbox task, no extra wake-up.
//! - TCP_NODELAY, and the crate's defaults otherwise (auto pong, auto close, writev for
//!   payloads over 1 KiB).
//!
//! Usage: `peer-fastwebsockets 127.0.0.1:PORT`. Prints `ready listen=ADDR` on stderr.

use std::cell::RefCell;
use std::rc::Rc;

use fastwebsockets::{
    FragmentCollectorRead, Frame, OpCode, Payload, Role, WebSocket, WebSocketWrite,
};
use memchr::memmem;
use syncgate_bench::peer::{self, Hub, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

/// The write half of a connection, shared by everyone who writes to it.
type Writer = Rc<Mutex<WebSocketWrite<OwnedWriteHalf>>>;

fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:4850".into());
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_io().build().expect("tokio runtime");
    let local = tokio::task::LocalSet::new();
    if let Err(e) = local.block_on(&rt, serve(&addr)) {
        eprintln!("peer-fastwebsockets: {e}");
        std::process::exit(1);
    }
}

async fn serve(addr: &str) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    eprintln!("ready listen={}", listener.local_addr()?);
    let hub: Rc<RefCell<Hub<Writer>>> = Rc::default();
    let mut next = 0u64;
    loop {
        let (stream, _) = listener.accept().await?;
        next += 1;
        let hub = hub.clone();
        tokio::task::spawn_local(async move {
            // A failed connection only ends itself; the load client reports it.
            let _ = connection(stream, next, hub).await;
        });
    }
}

/// Reads the request head and answers the upgrade.
async fn handshake(stream: &mut TcpStream) -> Result<peer::ConnectRequest, String> {
    let mut head = Vec::with_capacity(1024);
    loop {
        let n = stream.read_buf(&mut head).await.map_err(|e| e.to_string())?;
        if memmem::find(&head, b"\r\n\r\n").is_some() {
            break;
        }
        if n == 0 || head.len() > peer::MAX_HEAD_BYTES {
            return Err("no complete request head".into());
        }
    }
    match peer::upgrade(&head) {
        Ok((request, response)) => {
            stream.write_all(response.as_bytes()).await.map_err(|e| e.to_string())?;
            Ok(request)
        }
        Err(e) => {
            let _ =
                stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n").await;
            Err(e)
        }
    }
}

type Reader = FragmentCollectorRead<tokio::net::tcp::OwnedReadHalf>;

/// The next whole message; the pongs and close replies the reader owes meanwhile go out
/// through the shared writer.
async fn next_frame<'f>(read: &'f mut Reader, writer: &Writer) -> Result<Frame<'f>, String> {
    let mut obligated = |frame: Frame<'_>| {
        let writer = writer.clone();
        let owned = Frame::new(true, frame.opcode, None, Payload::Owned(frame.payload.to_vec()));
        async move { writer.lock().await.write_frame(owned).await }
    };
    read.read_frame(&mut obligated).await.map_err(|e| e.to_string())
}

/// The plain echo route: every message back as it came (the `frames` scenario).
async fn echo(read: &mut Reader, writer: &Writer) -> Result<(), String> {
    loop {
        let frame = next_frame(read, writer).await?;
        match frame.opcode {
            OpCode::Close => return Ok(()),
            OpCode::Text | OpCode::Binary => {
                let back = Frame::new(true, frame.opcode, None, frame.payload);
                writer.lock().await.write_frame(back).await.map_err(|e| e.to_string())?;
            }
            _ => {}
        }
    }
}

async fn write_text(writer: &Writer, text: &[u8]) -> Result<(), String> {
    writer
        .lock()
        .await
        .write_frame(Frame::text(Payload::Borrowed(text)))
        .await
        .map_err(|e| e.to_string())
}

async fn connection(
    mut stream: TcpStream,
    conn: u64,
    hub: Rc<RefCell<Hub<Writer>>>,
) -> Result<(), String> {
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let info = handshake(&mut stream).await?;
    let mut ws = WebSocket::after_handshake(stream, Role::Server);
    ws.set_max_message_size(peer::MAX_MESSAGE_BYTES);
    let (read, write) = ws.split(TcpStream::into_split);
    let mut read = FragmentCollectorRead::new(read);
    let writer: Writer = Rc::new(Mutex::new(write));
    if info.echo {
        return echo(&mut read, &writer).await;
    }
    write_text(&writer, peer::connected_message(&info.wsid).as_bytes()).await?;
    hub.borrow_mut().join(&info.group_id, conn, writer.clone());
    let result = async {
        loop {
            let frame = next_frame(&mut read, &writer).await?;
            match frame.opcode {
                OpCode::Close => return Ok(()),
                OpCode::Text => {}
                _ => continue,
            }
            let text = std::str::from_utf8(&frame.payload).map_err(|e| e.to_string())?;
            match peer::parse_upstream(text)? {
                Upstream::Ping => write_text(&writer, peer::PONG.as_bytes()).await?,
                Upstream::Push(push) => {
                    // Collect the recipients first: the hub cannot stay borrowed
                    // across the writes' awaits.
                    let sends =
                        hub.borrow_mut().push(&info.group_id, &push)?.map(|(poke, members)| {
                            (poke, members.iter().map(|(_, w)| w.clone()).collect::<Vec<_>>())
                        });
                    if let Some((poke, members)) = sends {
                        for member in members {
                            let mut w = member.lock().await;
                            for m in &poke {
                                // A member that went away is not this socket's error.
                                if w.write_frame(Frame::text(Payload::Borrowed(m.as_bytes())))
                                    .await
                                    .is_err()
                                {
                                    break;
                                }
                            }
                        }
                    }
                }
                Upstream::Other => {}
            }
        }
    }
    .await;
    hub.borrow_mut().leave(&info.group_id, conn);
    result
}
