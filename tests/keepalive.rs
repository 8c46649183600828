//! Bidirectional keepalive (docs/PROTOCOL.md, "Keepalive"):
//! the server sends an unsolicited `["pong",{}]` when it sent nothing for a while, pings a
//! silent peer, and terminates one that does not answer. Timers are shortened to fractions of
//! a second so the tests take about a second each.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn an_idle_connection_gets_unsolicited_pongs() {
    let d = Daemon::start("[keepalive]\nidle_send_ms = 300\ncheck_ms = 100\nsilence_ms = 60000\n");
    let mut ws = d.connected(&Params::new("c1", "g1"), Some(&anon_header()));
    let started = Instant::now();
    // Two in a row: it is a recurring timer, not a one-off after connected.
    for n in 1..=2 {
        match ws.recv_within(Duration::from_secs(3)) {
            Got::Text(t) => assert_eq!(t, r#"["pong",{}]"#, "unsolicited message {n}"),
            other => panic!("expected unsolicited pong {n}, got {other:?}"),
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "two pongs {took:?} after connected with idle_send_ms = 300"
    );
}

#[test]
fn no_unsolicited_pong_while_the_server_keeps_sending() {
    // idle_send is long compared with the traffic: every answer resets it.
    let d = Daemon::start("[keepalive]\nidle_send_ms = 800\ncheck_ms = 100\nsilence_ms = 60000\n");
    let mut ws = d.connected(&Params::new("c1", "g1"), Some(&anon_header()));
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        // Each ping gets exactly one pong; an extra (unsolicited) one would be left over.
        ws.ping_pong();
        let extra = ws.pump(Duration::from_millis(150));
        assert!(extra.is_empty(), "unsolicited traffic while busy: {extra:?}");
    }
}

#[test]
fn a_silent_peer_is_pinged_then_terminated() {
    let d = Daemon::start("[keepalive]\nsilence_ms = 300\nping_timeout_ms = 300\ncheck_ms = 100\nidle_send_ms = 60000\n");
    let params = Params::new("silent", "g1");
    let connected_at = Instant::now();
    // A peer that never sends a byte after its handshake, and so never answers a ping.
    let mut raw = RawConn::handshake(d.addr, &params.path(), Some(&anon_header()));
    let mut pinged_at = None;
    let ended_at = loop {
        match raw.read_frame(Duration::from_secs(5)) {
            RawEvent::Frame { opcode: OP_TEXT, payload } => {
                assert!(
                    payload.starts_with(br#"["connected""#),
                    "{}",
                    String::from_utf8_lossy(&payload)
                );
            }
            RawEvent::Frame { opcode: OP_PING, .. } => {
                pinged_at.get_or_insert_with(Instant::now);
            }
            RawEvent::Eof => break Instant::now(),
            other => panic!("expected a ping and then the end of the connection, got {other:?}"),
        }
    };
    let pinged_at = pinged_at.expect("the server must ping a silent peer before it gives up on it");
    let silence = pinged_at - connected_at;
    assert!(
        silence >= Duration::from_millis(250),
        "pinged after {silence:?} of silence (silence_ms = 300)"
    );
    let waited = ended_at - pinged_at;
    assert!(
        waited >= Duration::from_millis(250),
        "terminated {waited:?} after the ping (ping_timeout_ms = 300)"
    );
    assert!(
        ended_at - connected_at < Duration::from_secs(3),
        "terminated only after {:?}",
        ended_at - connected_at
    );
    d.wait_event("closed", &[("clientID", "silent"), ("end", "KeepaliveTimeout")], WAIT);
    d.wait_metric("syncgate_keepalive_timeouts_total", &[], 1, WAIT);
    let owner = expected_worker("g1").to_string();
    d.wait_metric("syncgate_connections_open", &[("worker", &owner)], 0, WAIT);
}

#[test]
fn a_peer_that_answers_pings_is_kept() {
    let d = Daemon::start("[keepalive]\nsilence_ms = 250\nping_timeout_ms = 400\ncheck_ms = 50\nidle_send_ms = 60000\n");
    let mut ws = d.connected(&Params::new("alive", "g1"), Some(&anon_header()));
    // Sends nothing itself for three times silence + ping timeout, but answers pings.
    let got = ws.pump(Duration::from_secs(2));
    assert!(got.is_empty(), "an answering peer must not be closed: {got:?}");
    assert!(ws.pings >= 2, "expected repeated keepalive pings, got {}", ws.pings);
    ws.ping_pong();
    assert_eq!(d.metric("syncgate_keepalive_timeouts_total", &[]), 0);
}

#[test]
fn a_peer_that_keeps_sending_is_not_pinged() {
    let d = Daemon::start("[keepalive]\nsilence_ms = 400\nping_timeout_ms = 400\ncheck_ms = 50\nidle_send_ms = 60000\n");
    let mut ws = d.connected(&Params::new("chatty", "g1"), Some(&anon_header()));
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        ws.ping_pong();
        ws.pump(Duration::from_millis(100));
    }
    assert_eq!(ws.pings, 0, "a peer that sends every 100 ms is not silent");
}
