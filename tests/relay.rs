//! Upstream mode's relay, end to end against a real WebSocket upstream that speaks Zero's
//! protocol: a second syncgate in embedded mode stands in for zero-cache here (it starts in
//! milliseconds); tests/front_door.rs runs the same front door against a real zero-cache.
//! Through the edge: sessions work unchanged, admission happens before anything reaches the
//! upstream, the upstream's failures make clients back off, closes cross with their codes,
//! and a reload of the list closes nothing.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// The upstream: embedded mode with tokens checked, as zero-cache would check them.
fn upstream() -> Daemon {
    Daemon::start(&format!("{QUIET}{}", auth_config()))
}

/// The edge in front of `upstream` (any extra TOML after its tables).
fn edge(upstream: &Daemon, extra: &str) -> Daemon {
    Daemon::start(&format!(
        "{QUIET}{}[upstream]\nurls = [\"ws://{}\"]\nconnect_timeout_ms = 2000\n{extra}",
        auth_config(),
        upstream.addr
    ))
}

/// Sockets the upstream admitted so far (its own count, not the edge's).
fn upstream_connected(up: &Daemon) -> u64 {
    up.metric("syncgate_connected_total", &[])
}

#[test]
fn a_session_through_the_edge_is_the_upstreams() {
    let up = upstream();
    let edge = edge(&up, "");
    let alice = Params::new("c1", "g1").user("alice").wsid("a1");
    // `connected` (with the wsid) comes from the upstream, through the relay; the header's
    // initConnection reaches it too (it answers with a catch-up poke).
    let with_init = |client: &str| {
        protocol_header(Some(&token("alice")), Some(captured_init_connection(client)))
    };
    let mut a = edge.connected(&alice, Some(&with_init("c1")));
    let mut b = edge.connected(&Params::new("c2", "g1").user("alice"), Some(&with_init("c2")));
    up.wait_event("connected", &[("clientID", "c1"), ("wsid", "a1")], WAIT);
    assert_eq!(upstream_connected(&up), 2);
    // Zero's own ping is the upstream's to answer.
    a.send_json(&json!(["ping", {}]));
    recv_until(&mut a, |m| m[0] == "pong");
    // A mutation goes up, and its poke comes back to both clients of the group.
    push(&mut a, "g1", "c1", 1, &[insert("i1", "hello")]);
    for ws in [&mut a, &mut b] {
        recv_until(ws, |m| m.to_string().contains("\"hello\""));
    }
    // WebSocket pings are answered per hop.
    a.ping_pong();
    assert!(edge.metric("syncgate_relayed_to_upstream_messages_total", &[]) >= 2);
    assert!(edge.metric("syncgate_relayed_to_client_messages_total", &[]) >= 4);
    assert_eq!(edge.metric("syncgate_upstream_connects_total", &[]), 2);
}

#[test]
fn the_review_attacks_are_refused_at_the_edge_and_never_reach_the_upstream() {
    let up = upstream();
    let edge = edge(&up, "");
    let victim = Params::new("c1", "g1").user("alice").wsid("victim");
    let live = edge.connected(&victim, Some(&user_header("alice"))).respond_in_background();
    let before = upstream_connected(&up);
    let bob = token("bob");
    let attempts: [(Params, Option<String>, &str); 4] = [
        // No token, the victim's userID and clientID.
        (victim.clone().wsid("x1"), Some(anon_header()), "Unauthorized"),
        // Another user's valid token naming the victim.
        (victim.clone().wsid("x2"), Some(protocol_header(Some(&bob), None)), "Unauthorized"),
        // A garbage token.
        (
            victim.clone().wsid("x3"),
            Some(protocol_header(Some("not.a.jwt"), None)),
            "AuthInvalidated",
        ),
        // No token, a new clientID in the victim's group.
        (Params::new("c9", "g1").user("alice").wsid("x4"), Some(anon_header()), "Unauthorized"),
    ];
    for (params, header, kind) in attempts {
        let mut ws = edge.ws(&params, header.as_deref());
        ws.expect_error(kind);
        ws.expect_close(3000);
    }
    let (mut live, got) = live.stop();
    assert!(got.is_empty(), "the victim must be left alone: {got:?}");
    live.ping_pong();
    assert_eq!(upstream_connected(&up), before, "no attempt reached the upstream");
    assert_eq!(edge.metric("syncgate_edge_refusals_total", &[]), 4);
    assert_eq!(edge.metric("syncgate_upstream_connects_total", &[]), 1);
    // Her own token again replaces her connection, through to the upstream.
    let _again = edge.connected(&victim.clone().wsid("again"), Some(&user_header("alice")));
    live.expect_close(1000);
    up.wait_event("connected", &[("wsid", "again")], WAIT);
}

#[test]
fn an_unreachable_upstream_makes_the_client_back_off() {
    // A port nobody listens on: bound, then closed.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let edge = Daemon::start(&format!(
        "{QUIET}{}[upstream]\nurls = [\"ws://127.0.0.1:{port}\"]\n",
        auth_config()
    ));
    let mut ws = edge.ws(&Params::new("c1", "g1").user("alice"), Some(&user_header("alice")));
    let error = ws.expect_error("ServerOverloaded");
    assert_eq!(error["minBackoffMs"], 500, "{error}");
    assert_eq!(error["maxBackoffMs"], 5000, "{error}");
    ws.expect_close(1008);
    edge.wait_event("relay", &[], WAIT);
    assert_eq!(edge.metric("syncgate_upstream_failures_total", &[]), 1);
}

#[test]
fn an_upstream_that_goes_away_closes_its_clients_with_its_code() {
    let up = upstream();
    let edge = edge(&up, "");
    let mut ws =
        edge.connected(&Params::new("c1", "g1").user("alice"), Some(&user_header("alice")));
    // The upstream shuts down: its close (1001) crosses to the client with its reason.
    up.signal(libc::SIGTERM);
    let reason = ws.expect_close(1001);
    assert_eq!(reason, "server shutting down");
    edge.wait_event("relay", &[("closed_by", "upstream"), ("code", "1001")], WAIT);
}

#[test]
fn a_killed_upstream_makes_its_clients_back_off() {
    let up = upstream();
    let edge = edge(&up, "");
    let mut ws =
        edge.connected(&Params::new("c1", "g1").user("alice"), Some(&user_header("alice")));
    // SIGKILL: the upstream's sockets are reset, no close frame.
    up.signal(libc::SIGKILL);
    let error = ws.expect_error("ServerOverloaded");
    assert_eq!(error["message"], "upstream connection lost", "{error}");
    ws.expect_close(1008);
}

#[test]
fn the_clients_close_reaches_the_upstream_with_its_code() {
    let up = upstream();
    let edge = edge(&up, "");
    let mut ws = edge
        .connected(&Params::new("c1", "g1").user("alice").wsid("w1"), Some(&user_header("alice")));
    ws.close(4001);
    edge.wait_event("relay", &[("closed_by", "client"), ("code", "4001")], WAIT);
    up.wait_event("closed", &[("wsid", "w1")], WAIT);
}

#[test]
fn a_reload_of_the_upstream_list_closes_nothing() {
    let up = upstream();
    let other = upstream();
    let edge = edge(&up, "");
    let live = edge.connected(&Params::new("c1", "g1").user("alice"), Some(&user_header("alice")));
    let live = live.respond_in_background();
    let config = std::fs::read_to_string(edge.config_path()).unwrap();
    let moved = config.replace(&up.addr.to_string(), &other.addr.to_string());
    std::fs::write(edge.config_path(), moved).unwrap();
    edge.signal(libc::SIGHUP);
    edge.wait_metric("syncgate_reloads_total", &[], 1, WAIT);
    // New sockets go to the new upstream; the live relay stays with the old one.
    let _new = edge.connected(&Params::new("c2", "g2").user("bob"), Some(&user_header("bob")));
    other.wait_event("connected", &[("clientID", "c2")], WAIT);
    let (mut live, got) = live.stop();
    assert!(got.is_empty(), "the live relay must be left alone: {got:?}");
    live.ping_pong();
    live.send_json(&json!(["ping", {}]));
    assert_eq!(live.recv_json()[0], "pong");
    assert_eq!(up.metric("syncgate_connections_open", &[]), 1);
}

#[test]
fn a_reload_that_adds_an_upstream_moves_only_new_sockets_and_counts_each_upstreams_relays() {
    let (first, second) = (upstream(), upstream());
    let urls = [format!("ws://{}", first.addr), format!("ws://{}", second.addr)];
    let edge = edge(&first, "");
    let live = edge.connected(&Params::new("c1", "g1").user("alice"), Some(&user_header("alice")));
    let live = live.respond_in_background();
    let config = std::fs::read_to_string(edge.config_path()).unwrap();
    let both = config.replace(
        &format!("urls = [\"{}\"]", urls[0]),
        // The new one first: the old one's position (its metrics cell) moves.
        &format!("urls = [\"{}\", \"{}\"]", urls[1], urls[0]),
    );
    assert_ne!(both, config);
    std::fs::write(edge.config_path(), both).unwrap();
    edge.signal(libc::SIGHUP);
    edge.wait_metric("syncgate_reloads_total", &[], 1, WAIT);
    // A group whose first choice is the new upstream goes there; the live relay stays.
    let group = group_on(&urls, 1);
    let _new = edge.connected(&Params::new("c2", &group).user("bob"), Some(&user_header("bob")));
    second.wait_event("connected", &[("clientID", "c2")], WAIT);
    edge.wait_metric("syncgate_upstream_relays", &[("upstream", &urls[1])], 1, WAIT);
    assert_eq!(edge.metric("syncgate_upstream_relays", &[("upstream", &urls[0])]), 1);
    let (mut live, got) = live.stop();
    assert!(got.is_empty(), "the live relay must be left alone: {got:?}");
    live.send_json(&json!(["ping", {}]));
    assert_eq!(live.recv_json()[0], "pong");
}

#[test]
fn connects_beyond_max_connecting_are_told_to_back_off_without_a_socket() {
    // An upstream whose kernel completes the TCP handshake but which never answers the
    // upgrade: a relay to it stays "connecting" until connect_timeout_ms.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let edge = Daemon::start(&format!(
        "workers = 1\n{QUIET}{}[upstream]\nurls = [\"ws://{addr}\"]\nmax_connecting = 1\n\
         connect_timeout_ms = 20000\nhealth_interval_ms = 0\n",
        auth_config()
    ));
    let _first = edge.ws(&Params::new("c1", "g1").user("alice"), Some(&user_header("alice")));
    // The first relay's connect reached the upstream: it is in progress now.
    let (_held, _) = silent.accept().unwrap();
    let mut second = edge.ws(&Params::new("c2", "g2").user("bob"), Some(&user_header("bob")));
    let error = second.expect_error("ServerOverloaded");
    assert_eq!(error["message"], "upstream unavailable", "{error}");
    second.expect_close(1008);
    edge.wait_log(|l| l.contains("upstream connects in progress at the limit"), WAIT);
    // No second socket reached the upstream.
    silent.set_nonblocking(true).unwrap();
    assert_eq!(
        silent.accept().map(|_| ()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock),
        "the refused client must not cause an upstream connection"
    );
    assert_eq!(edge.metric("syncgate_upstream_failures_total", &[]), 1);
}

#[test]
fn a_front_door_without_auth_keys_says_so_at_start() {
    let up = upstream();
    let edge = Daemon::start(&format!("{QUIET}[upstream]\nurls = [\"ws://{}\"]\n", up.addr));
    edge.wait_log(|l| l.contains("WARN") && l.contains("upstream mode without auth keys"), WAIT);
    // It still relays: the warning is advice, the sockets are anonymous to the edge.
    let _ws = edge.connected(&Params::new("c1", "g1"), Some(&anon_header()));
    up.wait_event("connected", &[("clientID", "c1")], WAIT);
}

/// Sends `signal` to every process of `daemon` (supervisor, listener, workers).
fn signal_all(daemon: &Daemon, signal: libc::c_int) {
    for (pid, _) in daemon.children() {
        // SAFETY: plain kill(2) on a child of the daemon under test.
        unsafe { libc::kill(pid, signal) };
    }
    daemon.signal(signal);
}

/// A clientGroupID whose first choice among `urls` is `urls[want]` (the edge's own hash),
/// named apart from the tests' own `g1`, `g2`.
fn group_on(urls: &[String], want: usize) -> String {
    let list = syncgate::upstream::Upstreams::parse(urls).unwrap();
    let hashed = |i| format!("hashed-{i}");
    (0..).map(hashed).find(|g| list.choose(g).unwrap().url == urls[want]).unwrap()
}

#[test]
fn an_upstream_that_fails_its_checks_loses_its_groups_until_it_passes_again() {
    let (first, second) = (upstream(), upstream());
    let urls = [format!("ws://{}", first.addr), format!("ws://{}", second.addr)];
    let edge = Daemon::start(&format!(
        "{QUIET}{}[upstream]\nurls = [\"{}\", \"{}\"]\nconnect_timeout_ms = 2000\n\
         health_interval_ms = 200\nhealth_timeout_ms = 150\n",
        auth_config(),
        urls[0],
        urls[1]
    ));
    let (g_first, g_second) = (group_on(&urls, 0), group_on(&urls, 1));
    fn on(url: &str) -> [(&str, &str); 1] {
        [("upstream", url)]
    }
    let mut a = edge.connected(
        &Params::new("c1", &g_first).user("alice").wsid("a1"),
        Some(&user_header("alice")),
    );
    let b = edge
        .connected(&Params::new("c2", &g_second).user("bob").wsid("b1"), Some(&user_header("bob")));
    first.wait_event("connected", &[("wsid", "a1")], WAIT);
    second.wait_event("connected", &[("wsid", "b1")], WAIT);
    let b = b.respond_in_background();
    assert_eq!(edge.metric("syncgate_upstream_up", &on(&urls[0])), 1);
    assert_eq!(edge.metric("syncgate_upstream_relays", &on(&urls[0])), 1);
    assert_eq!(edge.metric("syncgate_upstream_relays", &on(&urls[1])), 1);

    // The first upstream hangs: its sockets stay open (the kernel still accepts), it answers
    // nothing. Only the health checks can tell, and its relay ends with the back-off error.
    signal_all(&first, libc::SIGSTOP);
    let error = a.expect_error("ServerOverloaded");
    assert_eq!(error["message"], "upstream failed its health checks", "{error}");
    assert_eq!(error["minBackoffMs"], 500, "{error}");
    a.expect_close(1008);
    edge.wait_metric("syncgate_upstream_up", &on(&urls[0]), 0, WAIT);
    edge.wait_log(|l| l.contains("upstream down") && l.contains(&urls[0]), WAIT);
    // Its group's new sockets go to the next choice meanwhile.
    let _a2 = edge.connected(
        &Params::new("c3", &g_first).user("alice").wsid("a2"),
        Some(&user_header("alice")),
    );
    second.wait_event("connected", &[("wsid", "a2")], WAIT);

    // It answers again: after health_rise passes in a row its groups come home.
    signal_all(&first, libc::SIGCONT);
    edge.wait_metric("syncgate_upstream_up", &on(&urls[0]), 1, WAIT);
    let _a3 = edge.connected(
        &Params::new("c4", &g_first).user("alice").wsid("a3"),
        Some(&user_header("alice")),
    );
    first.wait_event("connected", &[("wsid", "a3")], WAIT);
    // The hung relay's close handshake may still be finishing: wait for its count to go.
    edge.wait_metric("syncgate_upstream_relays", &on(&urls[0]), 1, WAIT);
    assert_eq!(edge.metric("syncgate_upstream_relays", &on(&urls[1])), 2);

    // The other upstream's relay was never touched.
    let (mut b, got) = b.stop();
    assert!(got.is_empty(), "the healthy upstream's relay must be left alone: {got:?}");
    b.ping_pong();
    b.send_json(&json!(["ping", {}]));
    assert_eq!(b.recv_json()[0], "pong");
}

/// Reads messages until one satisfies `pred` (pokes come in several messages).
fn recv_until(ws: &mut Ws, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        if let Got::Text(text) = ws.recv_within(Duration::from_millis(200)) {
            let msg: serde_json::Value = serde_json::from_str(&text).expect("JSON");
            if pred(&msg) {
                return msg;
            }
        }
    }
    panic!("no such message within {WAIT:?}");
}

#[test]
fn a_session_cookie_binds_a_clientid_to_its_session() {
    let up = upstream();
    // Cookie-authenticated deployments send no token: the session cookie stands for it.
    let edge = Daemon::start(&format!(
        "{QUIET}[auth]\nsession_cookie = \"sid\"\n[upstream]\nurls = [\"ws://{}\"]\n",
        up.addr
    ));
    let params = Params::new("c1", "g1").wsid("first");
    let open = |p: &Params, cookie: &str| {
        let header = anon_header();
        Ws::connect_with(edge.addr, &p.path(), Some(&header), &[("Cookie", cookie)]).unwrap()
    };
    let mut first = open(&params, "theme=dark; sid=session-one");
    let msg = first.recv_json();
    assert_eq!(msg[0], "connected", "{msg}");
    let first = first.respond_in_background();
    // Another session, while the first is alive: refused at the edge.
    let mut other = open(&params.clone().wsid("other"), "sid=session-two");
    other.expect_error("Unauthorized");
    other.expect_close(3000);
    let (mut first, got) = first.stop();
    assert!(got.is_empty(), "the live connection must be left alone: {got:?}");
    // The same session replaces it (a reload of the page).
    let mut again = open(&params.clone().wsid("again"), "sid=session-one");
    assert_eq!(again.recv_json()[0], "connected");
    first.expect_close(1000);
    up.wait_event("connected", &[("wsid", "again")], WAIT);
    assert!(!up.events().iter().any(|e| e.matches("connected", &[("wsid", "other")])));
}

/// A WebSocket upstream of the test's own (tungstenite), for what a real one will not do on
/// demand: go silent, or send faster than the client reads. `serve` gets the first socket
/// that asks for an upgrade; the edge's health checks (`GET /keepalive`) get 200, as
/// zero-cache answers them.
fn fake_upstream(
    serve: impl FnOnce(tungstenite::WebSocket<std::net::TcpStream>) + Send + 'static,
) -> std::net::SocketAddr {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let stream = loop {
            let (mut stream, _) = listener.accept().unwrap();
            let mut head = [0u8; 16];
            let n = stream.peek(&mut head).unwrap_or(0);
            if head[..n].starts_with(b"GET /keepalive") {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK");
                continue;
            }
            break stream;
        };
        // Echo the client's protocol header, as zero-cache does. (tungstenite's callback type
        // has a large error variant; it is its API, not ours.)
        #[allow(clippy::result_large_err)]
        let callback = |req: &tungstenite::handshake::server::Request,
                        mut res: tungstenite::handshake::server::Response| {
            if let Some(p) = req.headers().get("Sec-WebSocket-Protocol") {
                res.headers_mut().insert("Sec-WebSocket-Protocol", p.clone());
            }
            Ok(res)
        };
        serve(tungstenite::accept_hdr(stream, callback).unwrap());
    });
    addr
}

#[test]
fn a_silent_upstream_is_treated_as_dead() {
    let (done, until) = std::sync::mpsc::channel::<()>();
    let addr = fake_upstream(move |ws| {
        // Upgraded, then nothing: no frame, no answer to pings.
        let _ = until.recv_timeout(Duration::from_secs(20));
        drop(ws);
    });
    let edge = Daemon::start(&format!(
        "{}[keepalive]\nidle_send_ms = 60000\nsilence_ms = 300\nping_timeout_ms = 300\n\
         [upstream]\nurls = [\"ws://{addr}\"]\n",
        auth_config()
    ));
    let mut ws = edge.ws(&Params::new("c1", "g1").user("alice"), Some(&user_header("alice")));
    // The client answers the edge's pings (recv does); the upstream does not.
    let error = ws.expect_error("ServerOverloaded");
    assert_eq!(error["message"], "upstream connection lost", "{error}");
    ws.expect_close(1008);
    edge.wait_event("relay", &[("clientID", "c1")], WAIT);
    assert!(edge.log_text().contains("KeepaliveTimeout"), "{}", edge.log_text());
    done.send(()).unwrap();
}

#[test]
fn a_client_that_does_not_read_stops_the_reads_from_its_upstream() {
    const MESSAGE: usize = 256 * 1024;
    let (report, sent) = std::sync::mpsc::channel::<usize>();
    let addr = fake_upstream(move |mut ws| {
        ws.get_mut().set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let payload = "x".repeat(MESSAGE);
        let mut bytes = 0;
        // Up to 64 MiB, until a write blocks for 2 s: the edge stopped reading.
        while bytes < 64 << 20 {
            if ws.send(tungstenite::Message::text(payload.clone())).is_err() {
                break;
            }
            bytes += MESSAGE;
        }
        report.send(bytes).unwrap();
    });
    let edge = Daemon::start(&format!(
        "{QUIET}{}[limits]\nmax_outbound_bytes = 1048576\nslow_consumer_ms = 60000\n\
         [upstream]\nurls = [\"ws://{addr}\"]\n",
        auth_config()
    ));
    // Connected, then never read: the edge's queue to it fills up.
    let _ws = edge.ws(&Params::new("c1", "g1").user("alice"), Some(&user_header("alice")));
    let bytes = sent.recv_timeout(Duration::from_secs(60)).expect("the upstream's report");
    // What left the upstream is what the sockets' buffers hold plus the bound, not the 64 MiB
    // it tried: the edge read no more once the client's queue was over 1 MiB.
    assert!(bytes < 32 << 20, "the upstream sent {bytes} bytes unhindered");
    let heap =
        edge.metric("syncgate_heap_bytes", &[("worker", &expected_worker("g1").to_string())]);
    assert!(heap < 24 << 20, "the edge holds {heap} bytes");
}

#[test]
fn an_upstream_that_does_not_read_stops_the_reads_from_its_client() {
    use std::io::Write;
    let (done, until) = std::sync::mpsc::channel::<()>();
    let addr = fake_upstream(move |ws| {
        // Upgraded, then never reads: the edge's queue to it fills up.
        let _ = until.recv_timeout(Duration::from_secs(60));
        drop(ws);
    });
    let edge = Daemon::start(&format!(
        "{QUIET}{}[limits]\nmax_outbound_bytes = 1048576\nslow_consumer_ms = 60000\n\
         [upstream]\nurls = [\"ws://{addr}\"]\nhealth_interval_ms = 0\n",
        auth_config()
    ));
    let params = Params::new("c1", "g1").user("alice");
    let mut raw = RawConn::handshake(edge.addr, &params.path(), Some(&user_header("alice")));
    // Zero pings, 64 KiB of them a write, up to 64 MiB or until a write blocks for 2 s: the
    // edge stopped reading the client.
    let batch: Vec<u8> = std::iter::repeat_with(|| client_frame(true, OP_TEXT, br#"["ping",{}]"#))
        .take(64 * 1024 / 17)
        .flatten()
        .collect();
    raw.stream.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut bytes = 0;
    while bytes < 64 << 20 {
        if raw.stream.write_all(&batch).is_err() {
            break;
        }
        bytes += batch.len();
    }
    // What the client got in is what the sockets' buffers hold plus the bound, not 64 MiB.
    assert!(bytes < 32 << 20, "the client sent {bytes} bytes unhindered");
    let heap =
        edge.metric("syncgate_heap_bytes", &[("worker", &expected_worker("g1").to_string())]);
    assert!(heap < 24 << 20, "the edge holds {heap} bytes");
    done.send(()).unwrap();
}

#[test]
fn update_auth_is_verified_at_the_edge_before_it_is_relayed() {
    let up = upstream();
    let edge = edge(&up, "");
    let mut ws =
        edge.connected(&Params::new("c1", "g1").user("alice"), Some(&user_header("alice")));
    // Her own refreshed token goes through; the connection stays.
    ws.send_json(&json!(["updateAuth", {"auth": token("alice")}]));
    ws.send_json(&json!(["ping", {}]));
    recv_until(&mut ws, |m| m[0] == "pong");
    assert_eq!(relayed(&edge), 2, "updateAuth and ping relayed");
    // Another user's token is refused at the edge and never relayed.
    update_auth_refused_at_the_edge(&edge, &mut ws, &token("bob"));
}

/// Messages the edge relayed to its upstream so far.
fn relayed(edge: &Daemon) -> u64 {
    edge.metric("syncgate_relayed_to_upstream_messages_total", &[])
}

/// Sends `updateAuth` with `token` and expects the edge to refuse it (`Unauthorized`, 3000)
/// without relaying it.
fn update_auth_refused_at_the_edge(edge: &Daemon, ws: &mut Ws, token: &str) {
    let before = relayed(edge);
    ws.send_json(&json!(["updateAuth", {"auth": token}]));
    ws.expect_error("Unauthorized");
    ws.expect_close(3000);
    assert_eq!(relayed(edge), before, "the refused updateAuth was relayed");
}

/// A socket admitted without a token (auth optional) stays anonymous: a token sent later
/// with `updateAuth` would make zero-cache see a user the socket never proved at its
/// handshake (with `upstream.anonymous_user_id`, beside a `userID` that is not hers), so the
/// edge refuses it instead of relaying it.
#[test]
fn a_tokenless_socket_cannot_become_a_user_with_update_auth() {
    let up = upstream();
    let edge = edge(&up, "anonymous_user_id = \"anon\"\n");
    let mut ws = edge.connected(&Params::new("c1", "g1").user("alice"), Some(&anon_header()));
    ws.send_json(&json!(["ping", {}]));
    recv_until(&mut ws, |m| m[0] == "pong");
    assert_eq!(relayed(&edge), 1, "the ping relayed");
    update_auth_refused_at_the_edge(&edge, &mut ws, &token("alice"));
}

/// HAProxy (Debian's package) in front of `nodes`, hashing the clientGroupID query parameter
/// with consistent hashing, as README's "Several syncgate nodes" configures it; killed on drop.
struct Haproxy {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    dir: std::path::PathBuf,
}

impl Haproxy {
    fn start(nodes: &[&Daemon]) -> Haproxy {
        let dir = unique_temp_path("haproxy");
        std::fs::create_dir(&dir).unwrap();
        // A port the kernel picked, free once the probe socket is gone.
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let servers: String = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("    server node{i} {}\n", n.addr))
            .collect();
        let config = format!(
            "global\n    maxconn 1000\ndefaults\n    mode http\n    timeout connect 5s\n\
             timeout client 60s\n    timeout server 60s\n    timeout tunnel 1h\n\
             frontend sync\n    bind {addr}\n    default_backend syncgate\n\
             backend syncgate\n    balance url_param clientGroupID\n    hash-type consistent\n\
             {servers}"
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let bin = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect(
                "HAProxy is not installed: scripts/test.sh installs it (apt-get install haproxy)",
            );
        let child = std::process::Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("haproxy.log")).unwrap())
            .spawn()
            .expect("start haproxy");
        let deadline = std::time::Instant::now() + WAIT;
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(std::time::Instant::now() < deadline, "haproxy did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Haproxy { child, addr, dir }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn behind_haproxy_hashing_the_group_every_socket_of_a_group_takes_one_node_and_one_upstream() {
    let (first, second) = (upstream(), upstream());
    let urls = [format!("ws://{}", first.addr), format!("ws://{}", second.addr)];
    let config =
        format!("{QUIET}{}[upstream]\nurls = [\"{}\", \"{}\"]\n", auth_config(), urls[0], urls[1]);
    let nodes = [Daemon::start(&config), Daemon::start(&config)];
    let haproxy = Haproxy::start(&[&nodes[0], &nodes[1]]);
    let list = syncgate::upstream::Upstreams::parse(&urls).unwrap();
    let upstreams = [&first, &second];
    let relays = |n: &Daemon| n.metric("syncgate_upstream_connects_total", &[]);
    let mut sockets = Vec::new();
    for g in 0..8 {
        let group = format!("lb-{g}");
        let home = urls.iter().position(|u| *u == list.choose(&group).unwrap().url).unwrap();
        let mut node_of_group = None;
        for member in 0..2 {
            let before = [relays(&nodes[0]), relays(&nodes[1])];
            let wsid = format!("{group}-{member}");
            let params = Params::new(&format!("c-{wsid}"), &group).user("alice").wsid(&wsid);
            let ws = Ws::connect(haproxy.addr, &params.path(), Some(&user_header("alice")))
                .unwrap_or_else(|e| panic!("through haproxy: {e}"));
            sockets.push(ws);
            // The upstream the edge's hash names serves it...
            upstreams[home].wait_event("connected", &[("wsid", &wsid)], WAIT);
            // ...through one node, the same for both sockets of the group.
            // The edge counts the relay once the upstream's 101 is in: wait for it.
            let deadline = std::time::Instant::now() + WAIT;
            let node = loop {
                if let Some(i) = (0..2).find(|&i| relays(&nodes[i]) > before[i]) {
                    break i;
                }
                assert!(std::time::Instant::now() < deadline, "no node counted the relay");
                std::thread::sleep(Duration::from_millis(10));
            };
            assert_eq!(*node_of_group.get_or_insert(node), node, "group {group} took two nodes");
        }
    }
    // And no upstream saw a socket of a group that is not its own.
    for (i, up) in upstreams.iter().enumerate() {
        for e in up.events().iter().filter(|e| e.matches("connected", &[])) {
            let group = e.field("clientGroupID").expect("connected names its group");
            assert_eq!(list.choose(group).unwrap().url, urls[i], "group {group} reached {i}");
        }
    }
    drop(sockets);
}
