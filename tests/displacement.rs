//! The displacement rules (docs/SECURITY.md, "Displacement before authentication"): a second socket
//! with a connected clientID may take the connection over only with a verified token of the same
//! user; anyone else is refused while the live connection keeps being served; a dead connection
//! does not lock its owner out; and a client group belongs to the first verified user who joined
//! it.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Token checking on; keepalive far away so only the probe pings.
fn daemon() -> Daemon {
    Daemon::start(&format!(
        "[keepalive]\nidle_send_ms = 60000\nsilence_ms = 60000\n{}",
        auth_config()
    ))
}

/// What a live connection received while the test talked on another socket: it must not
/// have been closed, and must have seen no message at all.
fn assert_untouched(got: &[Got]) {
    assert!(got.is_empty(), "the live connection must be left alone: {got:?}");
}

#[test]
fn a_socket_without_a_token_does_not_displace_a_live_connection() {
    let d = daemon();
    let params = Params::new("c1", "g1").wsid("first");
    let first = d.connected(&params, Some(&anon_header())).respond_in_background();
    // Same clientID, no token: nothing proves it is the same client.
    let mut second = d.ws(&params.clone().wsid("second"), Some(&anon_header()));
    second.expect_error("Unauthorized");
    second.expect_close(3000);
    let (mut first, got) = first.stop();
    assert_untouched(&got);
    assert!(
        first.pings >= 1,
        "the live connection must have been probed before the newcomer was refused"
    );
    first.ping_pong();
    first.ping_pong();
    d.wait_event(
        "refused",
        &[("kind", "Unauthorized"), ("clientID", "c1"), ("wsid", "second")],
        WAIT,
    );
    assert_eq!(d.metric("syncgate_displacement_refusals_total", &[]), 1);
    assert_eq!(d.metric("syncgate_displaced_total", &[]), 0);
    assert!(
        !d.events()
            .iter()
            .any(|e| e.event == "displaced" || e.matches("closed", &[("wsid", "first")])),
        "the first connection was displaced or closed:\n{}",
        d.log_text()
    );
}

#[test]
fn a_socket_without_a_token_does_not_displace_a_users_connection() {
    let d = daemon();
    let params = Params::new("c1", "g1").user("alice").wsid("first");
    let first = d.connected(&params, Some(&user_header("alice"))).respond_in_background();
    let mut second = d.ws(&params.clone().wsid("second"), Some(&anon_header()));
    second.expect_error("Unauthorized");
    second.expect_close(3000);
    let (mut first, got) = first.stop();
    assert_untouched(&got);
    first.ping_pong();
    assert_eq!(d.metric("syncgate_displaced_total", &[]), 0);
}

#[test]
fn another_users_valid_token_does_not_displace_a_connection() {
    let d = daemon();
    let first = d
        .connected(
            &Params::new("c1", "g1").user("alice").wsid("alice-ws"),
            Some(&user_header("alice")),
        )
        .respond_in_background();
    // Bob's token is genuine and matches his userID; the clientID is alice's.
    let mut bob =
        d.ws(&Params::new("c1", "g1").user("bob").wsid("bob-ws"), Some(&user_header("bob")));
    bob.expect_error("Unauthorized");
    bob.expect_close(3000);
    bob.expect_gone();
    let (mut first, got) = first.stop();
    assert_untouched(&got);
    first.ping_pong();
    d.wait_event(
        "refused",
        &[("kind", "Unauthorized"), ("clientID", "c1"), ("wsid", "bob-ws")],
        WAIT,
    );
    assert_eq!(d.metric("syncgate_displaced_total", &[]), 0);
    // Alice's connection is still the one registered under c1: she can still be displaced by
    // herself, which a refused-but-recorded bob would have broken.
    let mut again = d.connected(
        &Params::new("c1", "g1").user("alice").wsid("alice-2"),
        Some(&user_header("alice")),
    );
    again.ping_pong();
}

#[test]
fn the_same_users_valid_token_replaces_the_old_connection() {
    let d = daemon();
    let params = Params::new("c1", "g1").user("alice");
    let old = d
        .connected(&params.clone().wsid("old"), Some(&user_header("alice")))
        .respond_in_background();
    let mut new = d.connected(&params.clone().wsid("new"), Some(&user_header("alice")));
    d.wait_event("displaced", &[("clientID", "c1"), ("wsid", "old")], WAIT);
    new.ping_pong();
    let (mut old, mut got) = old.stop();
    // The old one was closed cleanly with 1000 (the close may still be on its way).
    if got.is_empty() {
        got.push(old.recv_within(WAIT));
    }
    match got.first() {
        Some(Got::Close(Some((1000, _)))) => {}
        other => {
            panic!("the replaced connection must get a close 1000, got {other:?} (all: {got:?})")
        }
    }
    d.wait_metric("syncgate_displaced_total", &[], 1, WAIT);
    assert_eq!(d.metric("syncgate_displacement_refusals_total", &[]), 0);
    new.ping_pong();
}

#[test]
fn a_replaced_connection_no_longer_counts_as_open() {
    let d = daemon();
    let owner = expected_worker("g1").to_string();
    let params = Params::new("c1", "g1").user("alice");
    let mut old = d.connected(&params.clone().wsid("old"), Some(&user_header("alice")));
    d.wait_metric("syncgate_connections_open", &[("worker", &owner)], 1, WAIT);
    let mut new = d.connected(&params.clone().wsid("new"), Some(&user_header("alice")));
    old.expect_close(1000);
    old.expect_gone();
    // One socket is open: the replaced one finished its close handshake and is gone.
    d.wait_metric("syncgate_connections_open", &[("worker", &owner)], 1, WAIT);
    new.close(1000);
    new.expect_close(1000);
    d.wait_event("closed", &[("clientID", "c1"), ("wsid", "new")], WAIT);
    d.wait_metric("syncgate_connections_open", &[("worker", &owner)], 0, WAIT);
}

#[test]
fn a_dead_connection_is_replaced_by_a_reconnect_within_seconds() {
    // A token-less client (auth off) whose network dropped: the old socket is still open on
    // the server, but its peer answers nothing.
    let d = Daemon::start(
        "[keepalive]\nidle_send_ms = 60000\nsilence_ms = 60000\nprobe_timeout_ms = 1000\n",
    );
    let params = Params::new("c1", "g1");
    let mut dead =
        RawConn::handshake(d.addr, &params.clone().wsid("dead").path(), Some(&anon_header()));
    d.wait_event("connected", &[("clientID", "c1"), ("wsid", "dead")], WAIT);
    let started = Instant::now();
    let mut reconnect = d.ws(&params.clone().wsid("reconnect"), Some(&anon_header()));
    let msg = reconnect.recv_json();
    let took = started.elapsed();
    assert_eq!(msg[0], "connected", "the reconnect must be admitted: {msg}");
    assert_eq!(msg[1]["wsid"], "reconnect");
    assert!(took < Duration::from_secs(4), "admitted only after {took:?}");
    reconnect.ping_pong();
    d.wait_metric("syncgate_displaced_total", &[], 1, WAIT);
    // The dead socket got the probe and was then cut off.
    let mut probed = false;
    loop {
        match dead.read_frame(WAIT) {
            RawEvent::Frame { opcode: OP_PING, .. } => probed = true,
            RawEvent::Frame { .. } => {}
            RawEvent::Eof => break,
            RawEvent::Timeout => panic!("the dead connection was never closed"),
        }
    }
    assert!(probed, "the dead connection was never probed");
    // Once replaced, the reconnect is the connection of c1: another anonymous newcomer is now
    // refused because the reconnect answers its probe.
    let live = reconnect.respond_in_background();
    let mut third = d.ws(&params.clone().wsid("third"), Some(&anon_header()));
    third.expect_error("Unauthorized");
    third.expect_close(3000);
    let (mut reconnect, got) = live.stop();
    assert_untouched(&got);
    reconnect.ping_pong();
}

#[test]
fn a_client_group_is_pinned_to_its_first_user() {
    let d = daemon();
    let alice = d
        .connected(&Params::new("alice-1", "g1").user("alice"), Some(&user_header("alice")))
        .respond_in_background();
    // Bob, with a genuine token, another clientID, alice's group.
    let mut bob = d.ws(&Params::new("bob-1", "g1").user("bob"), Some(&user_header("bob")));
    bob.expect_error("Unauthorized");
    bob.expect_close(3000);
    // A socket with no token into her group.
    let mut anon = d.ws(&Params::new("anon-1", "g1"), Some(&anon_header()));
    anon.expect_error("Unauthorized");
    anon.expect_close(3000);
    // Alice's second tab joins the same group.
    let mut alice2 =
        d.connected(&Params::new("alice-2", "g1").user("alice"), Some(&user_header("alice")));
    alice2.ping_pong();
    let (mut alice, got) = alice.stop();
    assert_untouched(&got);
    alice.ping_pong();
    // The pin outlives her connections: bob cannot wait for her to leave.
    alice.close(1000);
    alice2.close(1000);
    d.wait_event("closed", &[("clientID", "alice-1")], WAIT);
    d.wait_event("closed", &[("clientID", "alice-2")], WAIT);
    let mut bob = d.ws(&Params::new("bob-2", "g1").user("bob"), Some(&user_header("bob")));
    bob.expect_error("Unauthorized");
    bob.expect_close(3000);
    // Bob's own group is his.
    let mut own =
        d.connected(&Params::new("bob-3", "bobs-group").user("bob"), Some(&user_header("bob")));
    own.ping_pong();
}

#[test]
fn a_refused_newcomer_leaves_the_existing_connection_in_its_group() {
    // After refusals the group still has exactly its one member, and the member still gets
    // replaced by its own user: the refusals left no trace in the registry.
    let d = daemon();
    let params = Params::new("c1", "g1").user("alice");
    let first = d
        .connected(&params.clone().wsid("w1"), Some(&user_header("alice")))
        .respond_in_background();
    for i in 0..3 {
        let mut intruder =
            d.ws(&params.clone().user("bob").wsid(&format!("bob{i}")), Some(&user_header("bob")));
        intruder.expect_error("Unauthorized");
        intruder.expect_close(3000);
    }
    let (mut first, got) = first.stop();
    assert_untouched(&got);
    first.ping_pong();
    let owner = expected_worker("g1").to_string();
    d.wait_metric("syncgate_connections_open", &[("worker", &owner)], 1, WAIT);
    assert_eq!(d.metric("syncgate_connected_total", &[]), 1);
}

#[test]
fn a_newcomer_with_an_unsupported_version_does_not_displace() {
    // The version is checked before any existing connection is touched (docs/PROTOCOL.md,
    // "Lifecycle"): a same-user socket that is then refused must not have closed the live one on
    // its way.
    let d = daemon();
    let params = Params::new("c1", "g1").user("alice");
    let live = d
        .connected(&params.clone().wsid("live"), Some(&user_header("alice")))
        .respond_in_background();
    let mut newer = d.ws(&params.clone().wsid("v53").version(53), Some(&user_header("alice")));
    newer.expect_error("VersionNotSupported");
    newer.expect_close(1002);
    let (mut live, got) = live.stop();
    assert_untouched(&got);
    live.ping_pong();
    assert_eq!(d.metric("syncgate_displaced_total", &[]), 0);
}

#[test]
fn a_dead_connection_is_replaced_by_its_users_reconnect_at_once() {
    // With tokens the same user replaces the old socket without waiting for a probe, even if
    // the old peer never answers the close.
    let d = daemon();
    let params = Params::new("c1", "g1").user("alice");
    let header = user_header("alice");
    let mut dead = RawConn::handshake(d.addr, &params.clone().wsid("dead").path(), Some(&header));
    dead.expect_connected();
    let started = Instant::now();
    let mut reconnect = d.connected(&params.clone().wsid("reconnect"), Some(&header));
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    reconnect.ping_pong();
    // The old socket got a close 1000 and, never answering it, is dropped after the close
    // timeout.
    assert_eq!(dead.expect_close(), 1000);
    match dead.read_frame(Duration::from_secs(10)) {
        RawEvent::Eof => {}
        other => panic!("the dead socket must be dropped after the close timeout, got {other:?}"),
    }
    reconnect.ping_pong();
}
