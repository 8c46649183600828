//! The connection lifecycle of docs/PROTOCOL.md, in its order: route and parameter errors, the
//! protocol header, the token, the version, `connected` exactly once, then strict inbound
//! validation.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn daemon_with_auth(extra: &str) -> Daemon {
    Daemon::start(&format!("{QUIET}{}{extra}", auth_config()))
}

// ----- route and parameter errors: upgrade, then close 1002 `Error: ...` -----

/// Opens a socket for `path` and expects the upgrade to complete and then a close 1002.
fn expect_route_error(d: &Daemon, path: &str) -> String {
    let mut ws = Ws::connect(d.addr, path, Some(&anon_header()))
        .unwrap_or_else(|e| panic!("{path}: the upgrade must complete before the error: {e}"));
    let reason = ws.expect_close(1002);
    assert!(reason.starts_with("Error: "), "{path}: reason {reason:?}");
    assert!(reason.len() <= 123, "a close reason has at most 123 bytes: {reason:?}");
    reason
}

#[test]
fn missing_or_malformed_parameters_close_1002() {
    let d = Daemon::start(QUIET);
    let reason = expect_route_error(
        &d,
        "/sync/v51/connect?clientGroupID=g1&baseCookie=&ts=1.5&lmid=0&wsid=w",
    );
    // zero-cache's wording, which developers search for.
    assert!(reason.contains("missing clientID"), "{reason}");
    let reason = expect_route_error(&d, "/sync/v51/connect?clientID=c1&ts=1.5&lmid=0&wsid=w");
    assert!(reason.contains("missing clientGroupID"), "{reason}");
    let reason =
        expect_route_error(&d, "/sync/v51/connect?clientID=c1&clientGroupID=g1&ts=1.5&lmid=abc");
    assert!(reason.contains("parameter lmid"), "{reason}");
    let reason = expect_route_error(&d, "/sync/v51/connect?clientID=c1&clientGroupID=g1&lmid=0");
    assert!(reason.contains("missing ts"), "{reason}");
    expect_route_error(&d, "/foo/bar/x");
    expect_route_error(&d, "/sync/vX/connect?clientID=c1&clientGroupID=g1&ts=1&lmid=0");
    expect_route_error(&d, "/a/b/sync/v51/connect?clientID=c1&clientGroupID=g1&ts=1&lmid=0");
    // A message longer than a close frame can carry is cut (to at most 123 bytes, checked by
    // expect_route_error), not dropped and not sent whole.
    let long =
        format!("/sync/v51/{}/connect?clientID=c1&clientGroupID=g1&ts=1&lmid=0", "x".repeat(300));
    let reason = expect_route_error(&d, &long);
    assert!(reason.len() >= 100, "the cut reason keeps what fits: {reason:?}");
    d.wait_metric("syncgate_route_errors_total", &[("process", "listener")], 8, WAIT);
    assert_eq!(d.metric("syncgate_connected_total", &[]), 0);
}

#[test]
fn a_base_segment_before_sync_is_accepted() {
    let d = Daemon::start(QUIET);
    let params = Params::new("c1", "g1");
    let path = format!("/zero{}", params.path());
    let mut ws = Ws::connect(d.addr, &path, Some(&anon_header())).unwrap();
    let msg = ws.recv_json();
    assert_eq!(msg[0], "connected", "{msg}");
}

#[test]
fn a_missing_protocol_header_is_an_invalid_connection_request() {
    let d = Daemon::start(QUIET);
    let mut ws = d.ws(&Params::new("c1", "g1"), None);
    ws.expect_error("InvalidConnectionRequest");
    ws.expect_close(1002);
    ws.expect_gone();
    let mut ws = d.ws(&Params::new("c2", "g1"), Some("not%base64%at%all"));
    ws.expect_error("InvalidConnectionRequest");
    ws.expect_close(1002);
    assert_eq!(d.metric("syncgate_connected_total", &[]), 0);
}

// ----- connected -----

#[test]
fn connected_comes_exactly_once_with_the_wsid_and_the_header_is_echoed() {
    // Unsolicited pongs every ~100 ms: there is traffic to look at, and no second `connected`
    // may be in it.
    let d = Daemon::start("[keepalive]\nidle_send_ms = 100\ncheck_ms = 50\n");
    let header = anon_header();
    let params = Params::new("c1", "g1").wsid("OiWdDwkhIjjRAVOfTiBv0");
    let before = now_ms();
    let mut ws = d.ws(&params, Some(&header));
    assert_eq!(
        ws.protocol_echo.as_deref(),
        Some(header.as_str()),
        "the 101 must echo the header verbatim"
    );
    let msg = ws.recv_json();
    assert_eq!(msg[0], "connected", "{msg}");
    assert_eq!(msg[1]["wsid"], "OiWdDwkhIjjRAVOfTiBv0", "{msg}");
    let ts = msg[1]["timestamp"]
        .as_u64()
        .unwrap_or_else(|| panic!("timestamp must be an integer: {msg}"));
    assert!(ts + 1000 >= before && ts <= now_ms() + 1000, "timestamp {ts} is not now ({before})");
    assert_eq!(
        msg[1].as_object().unwrap().len(),
        2,
        "connected has wsid and timestamp only: {msg}"
    );
    let mut texts = 0;
    for got in ws.pump(Duration::from_millis(600)) {
        match got {
            Got::Text(t) => {
                texts += 1;
                assert_eq!(t, r#"["pong",{}]"#, "only keepalive pongs may follow connected");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(texts >= 1, "no unsolicited pong in 600 ms with idle_send_ms = 100");
    ws.ping_pong();
    let e = d.wait_event("connected", &[("clientID", "c1")], WAIT);
    assert_eq!(e.field("clientGroupID"), Some("g1"));
    assert_eq!(e.field("wsid"), Some("OiWdDwkhIjjRAVOfTiBv0"));
    assert_eq!(e.field("version"), Some("51"));
    let connected_lines =
        d.events().iter().filter(|e| e.matches("connected", &[("clientID", "c1")])).count();
    assert_eq!(connected_lines, 1);
}

#[test]
fn an_empty_wsid_is_echoed_empty() {
    let d = Daemon::start(QUIET);
    let path = "/sync/v51/connect?clientID=c1&clientGroupID=g1&baseCookie=&ts=1&lmid=0";
    let mut ws = Ws::connect(d.addr, path, Some(&anon_header())).unwrap();
    let msg = ws.recv_json();
    assert_eq!(msg, json!(["connected", {"wsid": "", "timestamp": msg[1]["timestamp"]}]));
}

#[test]
fn ping_is_answered_with_pong_every_time() {
    let d = Daemon::start(QUIET);
    let mut ws = d.connected(&Params::new("c1", "g1"), Some(&anon_header()));
    for _ in 0..5 {
        ws.ping_pong();
    }
}

#[test]
fn the_header_init_connection_is_accepted_and_the_connection_stays_up() {
    let d = Daemon::start(QUIET);
    // The exact bytes of the 1.9.0 client (zero-client-capture.md, "basic").
    let captured = "eyJpbml0Q29ubmVjdGlvbk1lc3NhZ2UiOlsiaW5pdENvbm5lY3Rpb24iLHsiZGVzaXJlZFF1ZXJpZXNQYXRjaCI6W10sImNsaWVudFNjaGVtYSI6eyJ0YWJsZXMiOnsiaXNzdWUiOnsiY29sdW1ucyI6eyJpZCI6eyJ0eXBlIjoic3RyaW5nIn0sInRpdGxlIjp7InR5cGUiOiJzdHJpbmcifX0sInByaW1hcnlLZXkiOlsiaWQiXX19fSwiYWN0aXZlQ2xpZW50cyI6WyJqdnA4a2tsNG5nODZxOHVoaTAiXX1dfQ%3D%3D";
    let params = Params::new("jvp8kkl4ng86q8uhi0", "0h3jon9uhlfna8iufn")
        .user("anon")
        .wsid("OiWdDwkhIjjRAVOfTiBv0");
    let mut ws = d.connected(&params, Some(captured));
    assert_eq!(ws.protocol_echo.as_deref(), Some(captured));
    ws.ping_pong();
    // The "init" variant, with a query in it, built by our own encoder.
    let header = protocol_header(None, Some(captured_init_connection("c2")));
    let mut ws2 = d.connected(&Params::new("c2", "g2"), Some(&header));
    ws2.ping_pong();
    let rest = ws.pump(Duration::from_millis(300));
    assert!(rest.is_empty(), "nothing else may arrive: {rest:?}");
}

#[test]
fn an_8_kib_protocol_header_fits() {
    // The client puts up to 8 KiB in the header before it moves initConnection into a message.
    let d = Daemon::start(QUIET);
    let mut init = captured_init_connection("big");
    let mut header = String::new();
    for i in 0.. {
        init[1]["clientSchema"]["tables"]["issue"]["columns"][format!("column{i}")] =
            json!({"type": "string"});
        let bigger = protocol_header(None, Some(init.clone()));
        if bigger.len() > 8 * 1024 {
            break;
        }
        header = bigger;
    }
    assert!(header.len() > 8 * 1024 - 100, "header is {} bytes", header.len());
    let mut ws = d.connected(&Params::new("big", "g1"), Some(&header));
    assert_eq!(ws.protocol_echo.as_deref(), Some(header.as_str()));
    ws.ping_pong();
}

#[test]
fn init_connection_as_the_first_message_is_accepted() {
    let d = Daemon::start(QUIET);
    let without_init = protocol_header(None, None);
    let mut ws = d.connected(&Params::new("c1", "g1"), Some(&without_init));
    let mut init = captured_init_connection("c1");
    init[1].as_object_mut().unwrap().remove("activeClients");
    ws.send_json(&init);
    ws.ping_pong();
}

#[test]
fn captured_client_messages_are_accepted() {
    let d = Daemon::start(QUIET);
    let group = "0h3jon9uhlfna8iufn";
    let client = "jvp8kkl4ng86q8uhi0";
    let mut ws = d.connected(&Params::new(client, group), Some(&anon_header()));
    // Verbatim from a capture, but for the second push's mutation id: it was 4 there (the
    // client's mutations 2 and 3 are not in the capture), and a gap is refused.
    let messages = [
        r#"["changeDesiredQueries",{"desiredQueriesPatch":[{"op":"put","hash":"2uh1iy5olazzo","ast":{"table":"issue"},"ttl":300000}]}]"#,
        r#"["changeDesiredQueries",{"desiredQueriesPatch":[{"op":"del","hash":"19040arbgigdy"}]}]"#,
        r#"["push",{"timestamp":1795804857593,"clientGroupID":"0h3jon9uhlfna8iufn","mutations":[{"type":"crud","timestamp":1795804857589,"id":1,"clientID":"jvp8kkl4ng86q8uhi0","name":"_zero_crud","args":[{"ops":[{"op":"insert","tableName":"issue","primaryKey":["id"],"value":{"id":"i1","title":"x"}}]}]}],"pushVersion":1,"requestID":"jvp8kkl4ng86q8uhi0-f5bad97d-3"}]"#,
        r#"["push",{"timestamp":1795804896416,"clientGroupID":"0h3jon9uhlfna8iufn","mutations":[{"type":"crud","timestamp":1795804896415,"id":2,"clientID":"jvp8kkl4ng86q8uhi0","name":"_zero_crud","args":[{"ops":[{"op":"insert","tableName":"issue","primaryKey":["id"],"value":{"id":"i1a","title":"x"}},{"op":"insert","tableName":"issue","primaryKey":["id"],"value":{"id":"i1b","title":"x"}}]}]}],"pushVersion":1,"requestID":"2vpg7mim73a9d946ve-5418f167-4"}]"#,
        r#"["deleteClients",{"clientIDs":["n2luf0tfljng3tt2ae"]}]"#,
    ];
    for m in messages {
        ws.send_text(m);
    }
    // Messages are handled in order: the pong comes after all of them were accepted. An
    // error about one of them may follow that pong (errors leave after the iteration's
    // commit), never the second one.
    ws.ping_pong();
    ws.ping_pong();
}

// ----- the token -----

#[test]
fn a_valid_token_connects_and_names_the_user() {
    let d = daemon_with_auth("");
    let mut ws = d.connected(&Params::new("c1", "g1").user("alice"), Some(&user_header("alice")));
    ws.ping_pong();
    let e = d.wait_event("connected", &[("clientID", "c1")], WAIT);
    assert_eq!(e.field("user"), Some("alice"), "{}", e.line);
}

#[test]
fn update_auth_must_verify_and_name_the_same_user() {
    let d = daemon_with_auth("");
    // A fresh token for the same user is taken; the connection goes on.
    let mut ws = d.connected(&Params::new("c1", "g1").user("alice"), Some(&user_header("alice")));
    ws.send_json(&serde_json::json!(["updateAuth", {"auth": token("alice")}]));
    ws.ping_pong();
    // A token for another user is refused and the connection closed.
    ws.send_json(&serde_json::json!(["updateAuth", {"auth": token("bob")}]));
    ws.expect_error("Unauthorized");
    ws.expect_close(3000);
    // A token that does not verify is refused as invalid.
    let mut ws = d.connected(&Params::new("c2", "g2").user("carol"), Some(&user_header("carol")));
    ws.send_json(&serde_json::json!(["updateAuth", {"auth": "not.a.token"}]));
    ws.expect_error("AuthInvalidated");
    ws.expect_close(3000);
}

/// Expects `kind` and a close 3000 for a socket with `header`.
fn expect_auth_refusal(d: &Daemon, params: &Params, header: &str, kind: &str) {
    let mut ws = d.ws(params, Some(header));
    ws.expect_error(kind);
    ws.expect_close(3000);
    ws.expect_gone();
    d.wait_event("refused", &[("kind", kind), ("clientID", &params.client_id)], WAIT);
}

#[test]
fn a_token_with_a_bad_signature_is_auth_invalidated() {
    let d = daemon_with_auth("");
    let forged =
        sign(&serde_json::json!({"sub": "alice", "exp": now_secs() + 3600}), "not-the-secret");
    expect_auth_refusal(
        &d,
        &Params::new("c1", "g1").user("alice"),
        &protocol_header(Some(&forged), None),
        "AuthInvalidated",
    );
    // A token that is not a JWT at all.
    expect_auth_refusal(
        &d,
        &Params::new("c2", "g1").user("alice"),
        &protocol_header(Some("tok123"), None),
        "AuthInvalidated",
    );
    d.wait_metric("syncgate_auth_refusals_total", &[], 2, WAIT);
    assert_eq!(d.metric("syncgate_connected_total", &[]), 0);
}

#[test]
fn an_expired_token_is_auth_invalidated() {
    let d = daemon_with_auth("");
    let expired = sign(&serde_json::json!({"sub": "alice", "exp": now_secs() - 3600}), SECRET);
    expect_auth_refusal(
        &d,
        &Params::new("c1", "g1").user("alice"),
        &protocol_header(Some(&expired), None),
        "AuthInvalidated",
    );
}

#[test]
fn a_token_for_another_user_than_user_id_is_unauthorized() {
    let d = daemon_with_auth("");
    expect_auth_refusal(
        &d,
        &Params::new("c1", "g1").user("alice"),
        &user_header("bob"),
        "Unauthorized",
    );
    // A token and no userID at all.
    expect_auth_refusal(&d, &Params::new("c2", "g1"), &user_header("bob"), "Unauthorized");
    assert_eq!(d.metric("syncgate_connected_total", &[]), 0);
}

#[test]
fn no_token_when_one_is_required_is_unauthorized() {
    let d = daemon_with_auth("required = true\n");
    expect_auth_refusal(&d, &Params::new("c1", "g1").user("alice"), &anon_header(), "Unauthorized");
    // An empty token string means no token.
    expect_auth_refusal(
        &d,
        &Params::new("c2", "g1").user("alice"),
        &protocol_header(Some(""), None),
        "Unauthorized",
    );
    // The same daemon admits a valid one.
    d.connected(&Params::new("c3", "g1").user("alice"), Some(&user_header("alice")));
}

#[test]
fn the_token_is_checked_before_the_version() {
    let d = daemon_with_auth("");
    let expired = sign(&serde_json::json!({"sub": "alice", "exp": now_secs() - 3600}), SECRET);
    let mut ws = d.ws(
        &Params::new("c1", "g1").user("alice").version(29),
        Some(&protocol_header(Some(&expired), None)),
    );
    ws.expect_error("AuthInvalidated");
    ws.expect_close(3000);
}

// ----- the version -----

#[test]
fn versions_outside_30_to_52_are_not_supported() {
    let d = Daemon::start(QUIET);
    for version in [29u32, 53, 1] {
        let mut ws =
            d.ws(&Params::new(&format!("c{version}"), "g1").version(version), Some(&anon_header()));
        let body = ws.expect_error("VersionNotSupported");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains(&version.to_string()),
            "the message names the client's version: {message}"
        );
        ws.expect_close(1002);
    }
    d.wait_metric("syncgate_version_refusals_total", &[], 3, WAIT);
    for version in [30u32, 52] {
        let mut ws = d.connected(
            &Params::new(&format!("c{version}"), "g1").version(version),
            Some(&anon_header()),
        );
        ws.ping_pong();
    }
}

// ----- strict inbound validation -----

/// A fresh connection that sends `send` and must get `kind` and a close frame with `code`.
fn expect_message_refused(
    d: &Daemon,
    client: &str,
    send: impl FnOnce(&mut Ws),
    kind: &str,
    code: Option<u16>,
) {
    let mut ws = d.connected(&Params::new(client, "g1"), Some(&anon_header()));
    send(&mut ws);
    ws.expect_error(kind);
    match (ws.recv_within(WAIT), code) {
        (Got::Close(Some((got, _))), Some(code)) => assert_eq!(got, code, "{client}: close code"),
        (Got::Close(_), None) => {}
        (other, _) => panic!("{client}: expected a close frame after {kind}, got {other:?}"),
    }
    // Nothing is processed after the close: a ping now gets no pong.
    let rest = ws.pump(Duration::from_millis(200));
    assert!(
        !rest.iter().any(|g| matches!(g, Got::Text(_))),
        "{client}: messages after close: {rest:?}"
    );
}

#[test]
fn invalid_upstream_messages_close_the_connection() {
    let d = Daemon::start(QUIET);
    let text = |s: &'static str| move |ws: &mut Ws| ws.send_text(s);
    expect_message_refused(&d, "unknown-tag", text(r#"["fly",{}]"#), "InvalidMessage", Some(1002));
    expect_message_refused(
        &d,
        "extra-key",
        text(r#"["ping",{"x":1}]"#),
        "InvalidMessage",
        Some(1002),
    );
    expect_message_refused(&d, "not-json", text("ping"), "InvalidMessage", Some(1002));
    expect_message_refused(&d, "not-array", text(r#"{"ping":{}}"#), "InvalidMessage", Some(1002));
    expect_message_refused(
        &d,
        "binary",
        |ws| ws.send_binary(br#"["ping",{}]"#),
        "InvalidMessage",
        Some(1002),
    );
    assert_eq!(d.metric("syncgate_connected_total", &[]), 5);
}

#[test]
fn a_push_for_another_client_group_is_invalid() {
    let d = Daemon::start(QUIET);
    let foreign = |ws: &mut Ws| push(ws, "someone-elses", "pusher", 1, &[insert("i1", "x")]);
    expect_message_refused(&d, "pusher", foreign, "InvalidPush", None);
}

#[test]
fn a_client_close_is_answered_and_logged() {
    let d = Daemon::start(QUIET);
    let mut ws = d.connected(&Params::new("c1", "g1"), Some(&anon_header()));
    ws.close(1000);
    match ws.recv_within(WAIT) {
        Got::Close(Some((1000, _))) => {}
        other => panic!("expected the close echoed with 1000, got {other:?}"),
    }
    ws.expect_gone();
    d.wait_event("closed", &[("clientID", "c1")], WAIT);
    let owner = expected_worker("g1").to_string();
    d.wait_metric("syncgate_connections_open", &[("worker", &owner)], 0, WAIT);
}

/// The end of a group's only connection: the group leaves memory at the next flush, while
/// the socket may still deliver what the client sent after its close frame. Those bytes
/// must find the connection's group gone, not dangling: a worker once crashed on them.
#[test]
fn bytes_after_the_close_of_a_groups_last_connection_are_harmless() {
    let d = Daemon::start(&format!("workers = 1\n{QUIET}"));
    let ping = client_frame(true, OP_TEXT, br#"["ping",{}]"#);
    for round in 0..10 {
        let path = Params::new("c1", &format!("solo-{round}")).path();
        let mut c = RawConn::handshake(d.addr, &path, Some(&anon_header()));
        c.expect_connected();
        // Not JSON: InvalidMessage, then the server's close 1002, which waits for ours.
        c.send_frame(OP_TEXT, b"nope");
        assert_eq!(c.expect_close(), 1002);
        c.send_frame(OP_CLOSE, &1002u16.to_be_bytes());
        // Then pings in writes of their own until the socket refuses them (or a second has
        // passed): some arrive after the server took the close and dropped the group.
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until && std::io::Write::write_all(&mut c.stream, &ping).is_ok() {}
    }
    // The worker never restarted, and it still serves the same groups.
    let mut ws = d.connected(&Params::new("after", "solo-0"), Some(&anon_header()));
    ws.ping_pong();
    assert_eq!(d.metric("syncgate_worker_restarts_total", &[]), 0);
    assert!(!d.log_text().contains("panicked"), "{}", d.log_text());
}

#[test]
fn invalid_utf8_in_a_text_frame_closes_1007() {
    let d = Daemon::start(QUIET);
    let params = Params::new("c1", "g1");
    let mut raw = RawConn::handshake(d.addr, &params.path(), Some(&anon_header()));
    raw.expect_connected();
    raw.send_frame(OP_TEXT, b"[\"ping\",{\xff}]");
    assert_eq!(raw.expect_close(), 1007);
}

// ----- how bytes arrive -----

/// Reads `n` `["pong",{}]` text frames.
fn expect_pongs(raw: &mut RawConn, n: usize) {
    for i in 0..n {
        match raw.read_frame(WAIT) {
            RawEvent::Frame { opcode: OP_TEXT, payload } => {
                assert_eq!(payload, br#"["pong",{}]"#, "message {i}")
            }
            other => panic!("expected pong {i} of {n}, got {other:?}"),
        }
    }
}

#[test]
fn a_message_pipelined_behind_the_request_head_is_answered_after_connected() {
    let d = Daemon::start(QUIET);
    let ping = client_frame(true, OP_TEXT, br#"["ping",{}]"#);
    let params = Params::new("c1", "g1");
    let mut raw = RawConn::handshake_then(d.addr, &params.path(), Some(&anon_header()), &ping);
    raw.expect_connected();
    expect_pongs(&mut raw, 1);
}

#[test]
fn a_message_written_one_byte_at_a_time_is_reassembled() {
    let d = Daemon::start(QUIET);
    let mut raw = RawConn::handshake(d.addr, &Params::new("c1", "g1").path(), Some(&anon_header()));
    raw.expect_connected();
    for byte in client_frame(true, OP_TEXT, br#"["ping",{}]"#) {
        // Each byte its own segment (TCP_NODELAY), each its own receive on the server.
        std::io::Write::write_all(&mut raw.stream, &[byte]).unwrap();
    }
    expect_pongs(&mut raw, 1);
}

#[test]
fn many_messages_in_one_write_are_all_answered_in_order() {
    let d = Daemon::start(QUIET);
    let mut raw = RawConn::handshake(d.addr, &Params::new("c1", "g1").path(), Some(&anon_header()));
    raw.expect_connected();
    // 2000 pings (over 40 KiB): more than one receive buffer's worth in a single write.
    let burst: Vec<u8> =
        (0..2000).flat_map(|_| client_frame(true, OP_TEXT, br#"["ping",{}]"#)).collect();
    std::io::Write::write_all(&mut raw.stream, &burst).unwrap();
    expect_pongs(&mut raw, 2000);
    assert_eq!(raw.read_frame(std::time::Duration::from_millis(200)), RawEvent::Timeout);
}

/// Segments this client socket received: (all, those carrying data), from `TCP_INFO`.
fn segments_in(stream: &std::net::TcpStream) -> (u32, u32) {
    use std::os::fd::AsRawFd;
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: a buffer of `len` bytes for the kernel to fill.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt(TCP_INFO): {}", std::io::Error::last_os_error());
    // struct tcp_info: tcpi_segs_in at byte 140, tcpi_data_segs_in at 152 (Linux 4.6+).
    assert!(len >= 156, "this kernel's tcp_info has no data_segs_in ({len} bytes)");
    let at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().unwrap());
    (at(140), at(152))
}

/// What a connection sends in one iteration of its worker leaves in one segment: a new
/// client's 101, `connected` and first poke together (each send is a TCP transmit and a
/// wakeup of the client), and the reply to its close together with the FIN.
#[test]
fn the_greeting_is_one_segment_and_the_close_reply_carries_the_fin() {
    let d = Daemon::start(QUIET);
    let init = json!(["initConnection", {"desiredQueriesPatch": []}]);
    let header = protocol_header(None, Some(init));
    // A delayed ACK of our close frame, should the worker be slower than the ACK timer on a
    // loaded machine, would come as a segment of its own: a few connections, one must be exact.
    let mut close_segments = Vec::new();
    for i in 0..3 {
        let params = Params::new(&format!("c{i}"), &format!("g{i}"));
        let mut raw = RawConn::handshake(d.addr, &params.path(), Some(&header));
        raw.expect_connected();
        loop {
            match raw.read_frame(WAIT) {
                RawEvent::Frame { opcode: OP_TEXT, payload } if payload.starts_with(b"[\"poke") => {
                    if payload.starts_with(b"[\"pokeEnd\"") {
                        break;
                    }
                }
                other => panic!("expected the first poke, got {other:?}"),
            }
        }
        let (segments, data) = segments_in(&raw.stream);
        assert_eq!(data, 1, "the 101, connected and the poke came in {data} segments");
        raw.send_frame(OP_CLOSE, &1000u16.to_be_bytes());
        assert_eq!(raw.expect_close(), 1000);
        assert_eq!(raw.read_frame(WAIT), RawEvent::Eof);
        close_segments.push(segments_in(&raw.stream).0 - segments);
    }
    assert!(
        close_segments.contains(&1),
        "segments from our close to the end, per connection: {close_segments:?} (the reply \
         and the FIN in one would be 1)"
    );
}
