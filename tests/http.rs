//! The plain HTTP side of the port (docs/PROTOCOL.md, "Routes"): health, metrics, errors that are
//! answered and never hang, and the listener's defences on the request head (docs/SECURITY.md
//! "Limits and defaults": head timeout, head size, header count).

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn health_and_keepalive_answer_ok() {
    let d = Daemon::start("");
    let r = http(d.addr, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.body, b"OK", "health body");
    let r = http(d.addr, b"GET /keepalive HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.head);
    // The length the server announces is the length it sends (a client reusing the
    // answer must not wait for more).
    let len: usize = r.header("Content-Length").expect("Content-Length").parse().unwrap();
    assert_eq!(len, r.body.len());
}

#[test]
fn metrics_are_prometheus_text_per_process() {
    let d = Daemon::start("");
    let r = http(d.addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(r.header("Content-Type").is_some_and(|t| t.starts_with("text/plain")), "{}", r.head);
    let text = String::from_utf8(r.body).unwrap();
    assert!(text.contains("# TYPE syncgate_connected_total counter"), "{text}");
    assert!(text.contains("# TYPE syncgate_connections_open gauge"), "{text}");
    for worker in 0..WORKERS {
        let sample =
            format!("syncgate_connected_total{{process=\"worker\",worker=\"{worker}\"}} 0");
        assert!(text.contains(&sample), "missing {sample} in:\n{text}");
    }
    for name in ["syncgate_handoffs_total", "syncgate_route_errors_total"] {
        assert_eq!(metric_value(&text, name, &[("process", "listener")]), 0, "{name}");
    }
    for name in [
        "syncgate_auth_refusals_total",
        "syncgate_displacement_refusals_total",
        "syncgate_displaced_total",
        "syncgate_version_refusals_total",
        "syncgate_keepalive_timeouts_total",
    ] {
        assert_eq!(metric_value(&text, name, &[]), 0, "{name} on a fresh daemon");
    }

    // One connection moves the counters of the worker that owns its group, and of no other.
    let group = "metrics-group";
    let owner = expected_worker(group).to_string();
    let _ws = d.connected(&Params::new("metrics-client", group), Some(&anon_header()));
    d.wait_event("connected", &[("clientID", "metrics-client")], WAIT);
    d.wait_metric("syncgate_connections_open", &[("worker", &owner)], 1, WAIT);
    assert_eq!(d.metric("syncgate_connected_total", &[("worker", &owner)]), 1);
    assert_eq!(d.metric("syncgate_connected_total", &[]), 1, "exactly one connection in total");
    assert_eq!(d.metric("syncgate_handoffs_total", &[("process", "listener")]), 1);
}

/// `syncgate_heap_bytes` (the live heap per process, README "Metrics") follows what the
/// worker holds: it grows with idle connections, by a bounded amount each, and connections
/// that come and go leave nothing behind, whatever group names they used (a worker that
/// kept every group it ever saw could be grown by clients inventing names).
#[test]
fn the_heap_gauge_follows_idle_connections_and_nothing_stays_behind() {
    const N: usize = 200;
    let d = Daemon::start("");
    let owner = expected_worker("heap-0-0").to_string();
    let heap = || d.metric("syncgate_heap_bytes", &[("worker", &owner)]);
    // The gauge is written at the top of the worker's loop, after the open count: read it
    // again until two readings agree (or give the last one after WAIT; the asserts judge it).
    let settled = || {
        let deadline = Instant::now() + WAIT;
        let mut last = heap();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let now = heap();
            if now == last || Instant::now() >= deadline {
                return now;
            }
            last = now;
        }
    };
    let before = heap();
    assert!(before > 0, "the worker publishes its heap from the start");
    assert!(d.metric("syncgate_heap_bytes", &[("process", "listener")]) > 0);

    let mut with_open = Vec::new();
    for round in 0..6 {
        // Each connection in a group of its own, all on one worker (as idle clients are),
        // under names no earlier round used.
        let groups = (0..)
            .map(|i| format!("heap-{round}-{i}"))
            .filter(|g| expected_worker(g).to_string() == owner);
        let conns: Vec<Ws> = groups
            .take(N)
            .enumerate()
            .map(|(i, g)| {
                let client = format!("heap-{round}-c{i}");
                d.connected(&Params::new(&client, &g), Some(&anon_header()))
            })
            .collect();
        d.wait_metric("syncgate_connections_open", &[("worker", &owner)], N as u64, WAIT);
        with_open.push(settled());
        drop(conns);
        d.wait_metric("syncgate_connections_open", &[("worker", &owner)], 0, WAIT);
        // Slots are freed once their last operation completes, a moment after they close.
        settled();
    }
    let per_conn = (with_open[0] - before) / N as u64;
    // About 200 B at 10,000 connections (bench/RESULTS.md), more here where the first slab
    // chunks and tables are shared by fewer; kilobytes would mean a buffer kept per idle
    // connection.
    assert!((100..1024).contains(&per_conn), "{per_conn} B of heap per idle connection");
    // The first rounds sized the tables (a hash table grows to about twice the entries it
    // holds when entries come and go) and the slab; later rounds reuse them. The store
    // thread's channels hold a block of 31 messages each while messages flow, allocated
    // where the round's loads and forgets happen to cross a block's end: a few KiB either
    // way. 8 KiB is what 200 connections leaking 40 B each would add per round.
    assert!(
        with_open[5] <= with_open[4] + 8192,
        "heap with {N} connections open, round by round: {with_open:?} (before: {before})"
    );
}

#[test]
fn unknown_paths_and_methods_get_http_errors() {
    let d = Daemon::start("");
    let r = http(d.addr, b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 404, "{}", r.head);
    let r = http(d.addr, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(r.status, 405, "{}", r.head);
    let r = http(d.addr, b"DELETE /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 405, "{}", r.head);
    // Bytes that are not HTTP get an answer too, not a hang.
    let r = http(d.addr, b"\x00\x01 garbage\r\n\r\n");
    assert_eq!(r.status, 400, "{}", r.head);
}

#[test]
fn a_plain_get_on_a_sync_path_asks_for_an_upgrade() {
    let d = Daemon::start("");
    let path = Params::new("c1", "g1").path();
    let r = http(d.addr, format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
    assert_eq!(r.status, 426, "{}", r.head);
    // A base segment before `sync` is a sync path too.
    let r = http(d.addr, b"GET /app/sync/v51/connect?clientID=a HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 426, "{}", r.head);
}

#[test]
fn an_unfinished_request_head_is_closed_after_the_head_timeout() {
    let d = Daemon::start("[limits]\nhead_timeout_ms = 500\n");
    let mut s = TcpStream::connect(d.addr).unwrap();
    let started = Instant::now();
    // A slowloris: a head that never ends.
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ").unwrap();
    let answer = read_to_end_within(&mut s, Duration::from_secs(5));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450),
        "closed after {took:?}, before the 500 ms head timeout"
    );
    assert!(took < Duration::from_secs(3), "closed only after {took:?}");
    // Whatever it says on the way out, it does not serve the request.
    if let Some(r) = parse_http(&answer) {
        assert_ne!(r.status, 200, "a request whose head never ended was served: {}", r.head);
    }
    // The daemon still serves others.
    assert_eq!(http(d.addr, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").status, 200);
}

#[test]
fn a_complete_head_sent_slowly_within_the_timeout_is_served() {
    let d = Daemon::start("[limits]\nhead_timeout_ms = 2000\n");
    let mut s = TcpStream::connect(d.addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    // A second segment on its own: the listener must join reads, not parse the first alone.
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(b"Host: t\r\n\r\n").unwrap();
    let r = parse_http(&read_to_end_within(&mut s, WAIT)).expect("an answer");
    assert_eq!(r.status, 200, "{}", r.head);
}

#[test]
fn an_oversized_request_head_gets_431() {
    let d = Daemon::start("[limits]\nmax_head_bytes = 16384\n");
    let mut req = b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 20 * 1024));
    req.extend_from_slice(b"\r\n\r\n");
    let r = http(d.addr, &req);
    assert_eq!(r.status, 431, "{}", r.head);
}

#[test]
fn too_many_header_lines_get_431() {
    let d = Daemon::start("[limits]\nmax_headers = 20\n");
    let mut req = String::from("GET / HTTP/1.1\r\nHost: t\r\n");
    for i in 0..40 {
        req.push_str(&format!("X-H{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let r = http(d.addr, req.as_bytes());
    assert_eq!(r.status, 431, "{}", r.head);
    // Under the cap it is served.
    let r = http(d.addr, b"GET / HTTP/1.1\r\nHost: t\r\nX-A: 1\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.head);
}

#[test]
fn bad_upgrade_requests_get_http_errors() {
    let d = Daemon::start("");
    let path = Params::new("c1", "g1").path();
    let upgrade = |method: &str, version: &str, key: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: {version}\r\nSec-WebSocket-Key: {key}\r\n\r\n"
        )
    };
    let good_key = "dGhlIHNhbXBsZSBub25jZQ==";
    let r = http(d.addr, upgrade("POST", "13", good_key).as_bytes());
    assert_eq!(r.status, 405, "{}", r.head);
    let r = http(d.addr, upgrade("GET", "8", good_key).as_bytes());
    assert_eq!(r.status, 426, "{}", r.head);
    assert_eq!(r.header("Sec-WebSocket-Version"), Some("13"), "{}", r.head);
    let r = http(d.addr, upgrade("GET", "13", "short").as_bytes());
    assert_eq!(r.status, 400, "{}", r.head);
}
