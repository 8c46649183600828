//! Hostile traffic against the real binary: connection storms, slow-loris, decompression bombs,
//! absurd frame headers, connection caps and stuck consumers (docs/SECURITY.md: its findings and
//! its limits table).

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::time::{Duration, Instant};

use common::*;

/// A TCP connection to `to` from the local address `from` (any 127.0.0.0/8 address works on
/// loopback), so one test can play several clients.
fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    use nix::sys::socket::{
        bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrStorage,
    };
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::empty(), None).unwrap();
    bind(fd.as_raw_fd(), &SockaddrStorage::from(SocketAddr::new(from, 0))).unwrap();
    connect(fd.as_raw_fd(), &SockaddrStorage::from(to)).unwrap();
    // SAFETY: a connected socket we own, handed over whole.
    unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) }
}

fn upgrade_request(params: &Params, extra_headers: &str) -> String {
    format!(
        "GET {} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: {}\r\n{extra_headers}\r\n",
        params.path(),
        anon_header()
    )
}

/// Sends an upgrade from `from` and returns the status code and the raw answer head.
fn attempt(from: IpAddr, to: SocketAddr, params: &Params) -> (u16, String) {
    let mut s = connect_from(from, to);
    s.write_all(upgrade_request(params, "").as_bytes()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!("no answer head: {other:?} after {:?}", String::from_utf8_lossy(&head)),
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status code");
    (status, head)
}

fn header_value(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

fn local(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

#[test]
fn a_connection_storm_is_refused_before_any_worker_or_token_check() {
    let d = Daemon::start(&format!(
        "{QUIET}{}[limits]\nconnect_per_ip = 100\nconnect_window_ms = 1000\n",
        auth_config()
    ));
    let mut refused = Vec::new();
    let mut accepted = 0;
    for i in 0..150 {
        let (status, head) = attempt(local(1), d.addr, &Params::new(&format!("s{i}"), "storm"));
        match status {
            101 => accepted += 1,
            429 => refused.push(head),
            other => panic!("unexpected status {other}: {head}"),
        }
    }
    assert_eq!(accepted, 100, "the first 100 attempts in the window are let through");
    assert_eq!(refused.len(), 50);
    // None of the refused reached a worker, so none cost a token check: the listener handed
    // off exactly the accepted ones, and the workers saw exactly those.
    assert_eq!(d.metric("syncgate_handoffs_total", &[("process", "listener")]), 100);
    assert_eq!(d.metric("syncgate_rate_limited_total", &[("process", "listener")]), 50);
    // Another address is served meanwhile.
    let (status, head) = attempt(local(2), d.addr, &Params::new("other", "g2"));
    assert_eq!(status, 101, "another address is not limited: {head}");
    // After the window (Retry-After says when) the address is served again.
    let retry: u64 = header_value(&refused[49], "Retry-After").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry} for a 1 s window");
    std::thread::sleep(Duration::from_secs(retry));
    let (status, head) = attempt(local(1), d.addr, &Params::new("later", "g3"));
    assert_eq!(status, 101, "served again after Retry-After: {head}");
}

#[test]
fn slow_loris_does_not_keep_a_normal_client_out() {
    let d = Daemon::start(&format!("{QUIET}[limits]\nhead_timeout_ms = 10000\n"));
    // 200 requests that never finish their head, from one address.
    let mut loris = Vec::new();
    for _ in 0..200 {
        let mut s = connect_from(local(7), d.addr);
        s.write_all(b"GET /sync/v51/connect?clientID=x HTTP/1.1\r\nHost: t\r\n").unwrap();
        loris.push(s);
    }
    // The per-address cap turned most away with 503 at once, without reading them.
    d.wait_metric("syncgate_overloaded_total", &[("process", "listener")], 200 - 32, WAIT);
    // A normal client from elsewhere connects in its usual time.
    let started = Instant::now();
    let mut s = connect_from(local(8), d.addr);
    s.write_all(upgrade_request(&Params::new("normal", "g1"), "").as_bytes()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 101");
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    drop(loris);
}

#[test]
fn too_many_handshakes_in_progress_get_503() {
    let d = Daemon::start(&format!("{QUIET}[limits]\nmax_handshakes = 4\n"));
    let mut held = Vec::new();
    for n in 0..4 {
        let mut s = connect_from(local(10 + n), d.addr);
        s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        held.push(s);
    }
    // The kernel hands connections to the listener in the order they were made, so the four
    // are held by the time the fifth is accepted.
    let mut s = connect_from(local(20), d.addr);
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let answer = read_to_end_within(&mut s, WAIT);
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
    assert!(text.contains("Retry-After: 1\r\n"), "{text}");
    drop(held);
}

#[test]
fn the_global_connection_cap_answers_503() {
    let d = Daemon::start(&format!("{QUIET}[limits]\nmax_connections = 2\n"));
    let mut a = d.connected(&Params::new("a", "g1"), Some(&anon_header()));
    let mut b = d.connected(&Params::new("b", "g2"), Some(&anon_header()));
    d.wait_metric("syncgate_connections_open", &[], 2, WAIT);
    let (status, head) = attempt(local(1), d.addr, &Params::new("c", "g3"));
    assert_eq!(status, 503, "{head}");
    assert!(header_value(&head, "Retry-After").is_some(), "{head}");
    a.ping_pong();
    b.ping_pong();
}

/// A worker refuses sockets beyond the connections its descriptor limit lets it hold, with the
/// listener's 503, though the global cap has room: groups need not spread evenly over the
/// workers, and a worker out of descriptors would lose a handed-off socket unanswered.
#[test]
fn a_worker_refuses_sockets_beyond_its_descriptor_limit() {
    // Every process keeps 64 descriptors for itself: at 67 a worker holds 3 connections and
    // the default global cap is 2 workers x 3.
    const NOFILE: libc::rlim_t = 67;
    let d = Daemon::start_with(QUIET, &[], with_nofile(NOFILE));
    let on = |worker: usize| {
        (0..).map(|i| format!("cap{i}")).filter(move |g| expected_worker(g) == worker)
    };
    let mut held: Vec<Ws> = on(0)
        .take(3)
        .enumerate()
        .map(|(i, g)| d.connected(&Params::new(&format!("c{i}"), &g), Some(&anon_header())))
        .collect();
    d.wait_metric("syncgate_connections_open", &[], 3, WAIT);
    let full = on(0).nth(3).unwrap();
    let (status, head) = attempt(local(1), d.addr, &Params::new("c3", &full));
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("Retry-After: 1\r\n"), "{head}");
    assert_eq!(d.metric("syncgate_overloaded_total", &[]), 1);
    // The other worker has room, and the full one is still fine.
    let mut other = d.connected(&Params::new("c4", &on(1).next().unwrap()), Some(&anon_header()));
    other.ping_pong();
    for ws in &mut held {
        ws.ping_pong();
    }
    // A connection that leaves makes room again.
    drop(held.pop());
    d.wait_metric("syncgate_connections_open", &[], 3, WAIT);
    d.connected(&Params::new("c5", &full), Some(&anon_header())).ping_pong();
}

/// The listener holds no more sockets than its descriptor limit allows (less the 64 every
/// process keeps): past that, a socket gets the 503 of a full listener at once and is closed,
/// instead of waiting for a head while the listener runs out of descriptors. Once the held
/// ones go, clients get in again.
#[test]
fn the_listener_refuses_sockets_beyond_its_descriptor_limit_at_once() {
    // 100 descriptors: the listener may hold 36 sockets.
    const NOFILE: libc::rlim_t = 100;
    const HELD: usize = 36;
    let d = Daemon::start_with(QUIET, &[], with_nofile(NOFILE));
    // Sockets that send nothing, spread over addresses (each address may hold 32).
    let held: Vec<TcpStream> =
        (0..HELD).map(|i| connect_from(local(40 + i as u8 % 4), d.addr)).collect();
    // The kernel hands connections to the listener in the order they were made, so these are
    // held by the time the next is accepted. (Not a metric: /metrics is the listener's too.)
    for i in 0..20 {
        let mut s = connect_from(local(50), d.addr);
        let answer = read_to_end_within(&mut s, WAIT);
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 503 "), "socket {i}: {text:?}");
        assert!(text.contains("Retry-After: 1\r\n"), "{text}");
    }
    // Once the held sockets are gone (the listener sees each close), a request is served.
    drop(held);
    let deadline = Instant::now() + WAIT;
    let mut refused_meanwhile = 0;
    loop {
        let mut s = connect_from(local(51), d.addr);
        s.write_all(b"GET /keepalive HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let answer = read_to_end_within(&mut s, WAIT);
        if answer.starts_with(b"HTTP/1.1 200 ") {
            break;
        }
        assert!(answer.starts_with(b"HTTP/1.1 503 "), "{:?}", String::from_utf8_lossy(&answer));
        assert!(Instant::now() < deadline, "still full after the held sockets closed");
        refused_meanwhile += 1;
    }
    let refused = d.metric("syncgate_overloaded_total", &[("process", "listener")]);
    assert_eq!(refused, 20 + refused_meanwhile);
    assert!(!d.log_text().contains("accept failed"), "{}", d.log_text());
    d.connected(&Params::new("after", "g1"), Some(&anon_header())).ping_pong();
}

/// Out of descriptors, the listener pauses accepting instead of failing the same accept in a
/// loop (the io_uring listener logged about 300,000 lines a second, at full CPU, until
/// descriptors came back): one log line, and every client that waited is answered. The
/// burst: the listener is stopped (SIGSTOP) while 100 clients connect and send a request, so
/// they all wait in the backlog, and the kernel accepts them at once when it goes on, past
/// the few descriptors its limit leaves.
#[test]
fn out_of_descriptors_the_listener_pauses_accepting_instead_of_spinning() {
    let d = Daemon::start_with(QUIET, &[], with_nofile(67));
    let listener = d.children().into_iter().find(|(_, a)| a.contains("__listener")).unwrap().0;
    let signal = |sig| {
        // SAFETY: kill(2) on a process of ours.
        assert_eq!(unsafe { libc::kill(listener, sig) }, 0);
    };
    signal(libc::SIGSTOP);
    let state = || {
        let stat = std::fs::read_to_string(format!("/proc/{listener}/stat")).unwrap();
        stat.rsplit(')').next().unwrap().split_whitespace().next().unwrap().to_owned()
    };
    let deadline = Instant::now() + WAIT;
    while state() != "T" {
        assert!(Instant::now() < deadline, "the listener did not stop");
        std::thread::yield_now();
    }
    // Four addresses: each may have 32 requests in progress.
    let clients: Vec<TcpStream> = (0..100)
        .map(|i| {
            let mut s = connect_from(local(60 + i % 4), d.addr);
            s.write_all(b"GET /keepalive HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
            s
        })
        .collect();
    signal(libc::SIGCONT);
    let mut answered = [0; 2];
    for mut s in clients {
        let answer = read_to_end_within(&mut s, WAIT);
        let text = String::from_utf8_lossy(&answer);
        match () {
            _ if text.starts_with("HTTP/1.1 200 ") => answered[0] += 1,
            _ if text.starts_with("HTTP/1.1 503 ") => answered[1] += 1,
            _ => panic!("no answer: {text:?}\n{}", d.log_text()),
        }
    }
    assert!(answered[0] > 0 && answered[1] > 0, "200s and 503s: {answered:?}");
    let log = d.log_text();
    let lines = log.lines().filter(|l| l.contains("accept failed")).count();
    assert_eq!(lines, 1, "{log}");
    assert!(log.contains("accept failed: Too many open files"), "{log}");
}

/// Lowers the daemon's soft limit on descriptors to `n` (the hard one stays), for
/// [`Daemon::start_with`].
fn with_nofile(n: libc::rlim_t) -> impl FnOnce(&mut std::process::Command) {
    move |cmd| {
        use std::os::unix::process::CommandExt;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                limit.rlim_cur = n.min(limit.rlim_max);
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// Raw deflate of `n` zero bytes: a few hundred bytes that inflate to `n`.
fn zero_bomb(n: usize) -> Vec<u8> {
    use flate2::{write::DeflateEncoder, Compression};
    let mut e = DeflateEncoder::new(Vec::new(), Compression::best());
    let chunk = vec![0u8; 1 << 20];
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len());
        e.write_all(&chunk[..k]).unwrap();
        left -= k;
    }
    e.finish().unwrap()
}

/// Peak resident memory of the worker serving `group`, in KiB.
fn worker_peak_kib(d: &Daemon, group: &str) -> u64 {
    let index = expected_worker(group);
    let (pid, _) = d
        .children()
        .into_iter()
        .find(|(_, cmd)| cmd.contains("__worker") && cmd.contains(&format!("--index {index}")))
        .expect("the worker process");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[test]
fn a_decompression_bomb_closes_1009_and_the_worker_stays_small() {
    let d = Daemon::start(&format!(
        "{QUIET}[compression]\nenabled = true\n[limits]\nmax_message_bytes = 1048576\n"
    ));
    let params = Params::new("bomber", "bombs");
    let mut s = TcpStream::connect(d.addr).unwrap();
    let req = upgrade_request(
        &params,
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = RawConn::from_stream(s);
    let head = raw.read_head();
    assert!(head.contains("permessage-deflate"), "deflate negotiated: {head}");
    raw.expect_connected();
    let before = worker_peak_kib(&d, "bombs");
    // 32 MiB of zeros in about 32 KiB, as one compressed text message (RSV1): 32 times the
    // limit, so a worker that inflated it whole would show it in its peak memory.
    let bomb = zero_bomb(32 << 20);
    raw.send_raw_frame(0x80 | 0x40 | OP_TEXT, &bomb);
    assert_eq!(raw.expect_close(), 1009);
    let after = worker_peak_kib(&d, "bombs");
    assert!(
        after < before + 8 * 1024,
        "the worker's peak memory grew from {before} KiB to {after} KiB"
    );
}

#[test]
fn an_absurd_frame_length_closes_1009_without_allocating() {
    let d = Daemon::start(QUIET);
    let params = Params::new("liar", "liars");
    let mut raw = RawConn::handshake(d.addr, &params.path(), Some(&anon_header()));
    raw.expect_connected();
    let before = worker_peak_kib(&d, "liars");
    // A masked binary frame header that declares 2^40 bytes, then a few bytes of it.
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&(1u64 << 40).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4, 0, 0, 0, 0]);
    raw.stream.write_all(&frame).unwrap();
    assert_eq!(raw.expect_close(), 1009);
    let after = worker_peak_kib(&d, "liars");
    assert!(after < before + 4 * 1024, "peak memory grew from {before} KiB to {after} KiB");
}

#[test]
fn a_consumer_that_stops_reading_is_closed_1008() {
    let d = Daemon::start(&format!(
        "{QUIET}[limits]\nmax_outbound_bytes = 65536\nslow_consumer_ms = 500\n"
    ));
    // The stuck member: joins the group's pokes, then never reads again.
    let stuck = Params::new("stuck", "busy");
    let header = protocol_header(None, Some(captured_init_connection("stuck")));
    let mut raw = RawConn::handshake(d.addr, &stuck.path(), Some(&header));
    raw.expect_connected();
    let fd = raw.stream.as_raw_fd();
    // A small receive buffer so the kernel stops taking the server's bytes early.
    nix::sys::socket::setsockopt(
        &unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
        nix::sys::socket::sockopt::RcvBuf,
        &4096,
    )
    .unwrap();
    let pusher = Params::new("pusher", "busy");
    let init = captured_init_connection("pusher");
    let mut ws = d.connected(&pusher, Some(&protocol_header(None, Some(init))));
    // Loopback socket buffers swallow megabytes before the server's own queue grows, so the
    // stuck member is sent far more than that; the pusher reads each poke, so only the stuck
    // member falls behind.
    // Rows well under the queue bound, so a member that keeps reading never exceeds it.
    let big = "x".repeat(16 * 1024);
    for id in 1..=800u64 {
        push(&mut ws, "busy", "pusher", id, &[insert(&format!("r{id}"), &big)]);
        while ws.recv_json()[0] != "pokeEnd" {}
        let gone = |l: &str| l.contains(" closed ") && l.contains("clientID=stuck");
        if d.try_wait_line(gone, Duration::ZERO).is_some() {
            break;
        }
    }
    let closed = d.wait_event("closed", &[("clientID", "stuck")], Duration::from_secs(10));
    assert_eq!(closed.field("end"), Some("SlowConsumer"), "{closed:?}");
    // The pusher was never held up by the stuck member.
    ws.ping_pong();
}

#[test]
fn pings_sent_in_one_burst_each_get_their_pong_in_order_and_a_flood_stays_bounded() {
    let d = Daemon::start(QUIET);
    let params = Params::new("pinger", "pings");
    let mut raw = RawConn::handshake(d.addr, &params.path(), Some(&anon_header()));
    raw.expect_connected();
    // Ten pings in one write, as Autobahn 2.10 sends them: ten pongs, in order.
    let burst: Vec<u8> = (0..10u8).flat_map(|i| client_frame(true, OP_PING, &[b'a' + i])).collect();
    raw.stream.write_all(&burst).unwrap();
    for i in 0..10u8 {
        match raw.read_frame(WAIT) {
            RawEvent::Frame { opcode: OP_PONG, payload } => assert_eq!(payload, vec![b'a' + i]),
            other => panic!("expected pong {i}, got {other:?}"),
        }
    }
    let gathered = d.metric("syncgate_vectored_sends_total", &[]);
    assert!(gathered >= 2, "ten pongs leave in writes of up to eight: {gathered}");
    // A flood of 10,000 in one write: at most 16 pongs wait at once, so the answers are far
    // fewer than the pings, the last one answers the last ping, and the connection lives.
    let flood: Vec<u8> =
        (0..10_000u32).flat_map(|i| client_frame(true, OP_PING, &i.to_be_bytes())).collect();
    raw.stream.write_all(&flood).unwrap();
    raw.send_frame(OP_TEXT, br#"["ping",{}]"#);
    let mut pongs = Vec::new();
    loop {
        match raw.read_frame(WAIT) {
            RawEvent::Frame { opcode: OP_PONG, payload } => pongs.push(payload),
            RawEvent::Frame { opcode: OP_TEXT, payload } => {
                assert_eq!(payload, br#"["pong",{}]"#.to_vec());
                break;
            }
            other => panic!("expected pongs then Zero's pong, got {other:?}"),
        }
    }
    assert!(!pongs.is_empty() && pongs.len() < 10_000, "{} pongs", pongs.len());
    assert_eq!(pongs.last().unwrap(), &9_999u32.to_be_bytes().to_vec(), "the latest answered");
}
