//! `peer-tungstenite`: the protocol subset of the benchmarks (docs/PROTOCOL.md: protocol
//! header echo, `connected`, ping -> pong, push -> poke to the client group) on
//! tokio-tungstenite, written the way its users write a fast server.
//!
//! - One current-thread runtime: the benchmark pins each server to one core, where a
//!   multi-threaded scheduler would only add cross-thread wake-ups.
//! - One task per connection that selects between the socket and its outbox; replies to
//!   the socket's own messages are written directly, pokes for other members go through
//!   their outboxes as shared (reference-counted) message bytes.
//! - A 4 KiB read buffer instead of the 128 KiB default, which costs about 133 KB per
//!   idle connection and halves throughput at 1 KiB messages (docs/SECURITY.md: the fair setting).
//! - TCP_NODELAY, as every WebSocket server sets it.
//!
//! Usage: `peer-tungstenite 127.0.0.1:PORT`. Prints `ready listen=ADDR` on stderr.

use std::cell::RefCell;
use std::rc::Rc;

use futures_util::{SinkExt, StreamExt};
use syncgate_bench::peer::{self, Hub, Upstream};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// The read buffer each connection gets (see the module comment).
const READ_BUFFER: usize = 4096;

/// What one member sends another: the three messages of a poke.
type Outbox = UnboundedSender<[Utf8Bytes; 3]>;

fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:4849".into());
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_io().build().expect("tokio runtime");
    let local = tokio::task::LocalSet::new();
    if let Err(e) = local.block_on(&rt, serve(&addr)) {
        eprintln!("peer-tungstenite: {e}");
        std::process::exit(1);
    }
}

async fn serve(addr: &str) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    eprintln!("ready listen={}", listener.local_addr()?);
    let hub: Rc<RefCell<Hub<Outbox>>> = Rc::default();
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

// The handshake callback's error type is tungstenite's (an HTTP response), not ours.
#[allow(clippy::result_large_err)]
async fn connection(
    stream: TcpStream,
    conn: u64,
    hub: Rc<RefCell<Hub<Outbox>>>,
) -> Result<(), String> {
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut request = None;
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let target = req.uri().path_and_query().map_or("", |p| p.as_str());
        if peer::is_echo(target) {
            request = Some(peer::ConnectRequest { echo: true, ..Default::default() });
            return Ok(resp);
        }
        let protocol = req.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok());
        let parsed = peer::parse_connect(target, protocol).and_then(|c| {
            HeaderValue::from_str(&c.protocol).map(|v| (c, v)).map_err(|e| e.to_string())
        });
        match parsed {
            Ok((c, value)) => {
                resp.headers_mut().insert("sec-websocket-protocol", value);
                request = Some(c);
                Ok(resp)
            }
            Err(e) => {
                let mut r = ErrorResponse::new(Some(e));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                Err(r)
            }
        }
    };
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER);
    let mut ws = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config))
        .await
        .map_err(|e| e.to_string())?;
    let info = request.ok_or("handshake without request")?;
    if info.echo {
        // The plain echo route: every message back as it came (the `frames` scenario).
        while let Some(msg) = ws.next().await {
            match msg.map_err(|e| e.to_string())? {
                m @ (Message::Text(_) | Message::Binary(_)) => {
                    ws.send(m).await.map_err(|e| e.to_string())?
                }
                Message::Close(_) => return Ok(()),
                _ => {}
            }
        }
        return Ok(());
    }
    let (tx, mut outbox) = unbounded_channel();
    hub.borrow_mut().join(&info.group_id, conn, tx);
    let result = async {
        ws.send(Message::text(peer::connected_message(&info.wsid)))
            .await
            .map_err(|e| e.to_string())?;
        loop {
            tokio::select! {
                msg = ws.next() => {
                    let text = match msg {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Close(_))) | None => return Ok(()),
                        Some(Ok(_)) => continue, // pings are answered by tungstenite itself
                        Some(Err(e)) => return Err(e.to_string()),
                    };
                    match peer::parse_upstream(text.as_str())? {
                        Upstream::Ping => ws
                            .send(Message::Text(Utf8Bytes::from_static(peer::PONG)))
                            .await
                            .map_err(|e| e.to_string())?,
                        Upstream::Push(push) => {
                            let own = {
                                let mut hub = hub.borrow_mut();
                                match hub.push(&info.group_id, &push)? {
                                    None => None,
                                    Some((poke, members)) => {
                                        let poke = poke.map(Utf8Bytes::from);
                                        for (id, other) in members {
                                            if *id != conn {
                                                let _ = other.send(poke.clone());
                                            }
                                        }
                                        Some(poke)
                                    }
                                }
                            };
                            if let Some(poke) = own {
                                for m in poke {
                                    ws.feed(Message::Text(m)).await.map_err(|e| e.to_string())?;
                                }
                                ws.flush().await.map_err(|e| e.to_string())?;
                            }
                        }
                        Upstream::Other => {}
                    }
                }
                Some(poke) = outbox.recv() => {
                    for m in poke {
                        ws.feed(Message::Text(m)).await.map_err(|e| e.to_string())?;
                    }
                    // Take whatever else is queued before the one write.
                    while let Ok(more) = outbox.try_recv() {
                        for m in more {
                            ws.feed(Message::Text(m)).await.map_err(|e| e.to_string())?;
                        }
                    }
                    ws.flush().await.map_err(|e| e.to_string())?;
                }
            }
        }
    }
    .await;
    hub.borrow_mut().leave(&info.group_id, conn);
    result
}
