//! The front door: syncgate in front of a real zero-cache, with the real Zero client as the
//! app. The upstream (PostgreSQL and zero-cache with the app's table and permissions) is the
//! fixture of tests/common/upstream.rs; the app is tests/clients/zero-cache/front_door.mjs,
//! driven through tests/common/app.rs.
//!
//! The tests here so far go straight to zero-cache, without syncgate: they prove the harness
//! (the client sees what its token allows, a CRUD insert reaches PostgreSQL, a row written in
//! PostgreSQL reaches the client live, zero-cache's sockets can be counted, an outage can be
//! staged) and are the reference the tests through syncgate compare with: each check takes
//! the URL its client connects to, so the same check runs against either.
//!
//! Under cargo-nextest every test starts its own PostgreSQL and zero-cache (about 12 s; see
//! tests/common/upstream.rs for why), and .config/nextest.toml runs at most two of this
//! binary's tests at a time.
//! `scripts/test.sh` installs PostgreSQL, zero-cache and node; a missing one fails the test
//! with the command that fixes it: these tests never skip.

mod common;

use common::*;

/// `(id, owner, title)` rows as the client and [`ZeroCache::rows_of`] give them.
type Rows = Vec<(String, String, String)>;

fn rows(list: &[(&str, &str, &str)]) -> Rows {
    let mut out: Rows =
        list.iter().map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())).collect();
    out.sort();
    out
}

/// What `user` (`None`: no token) sees of the seeded rows, plus `extra`, sorted by id as the
/// client's query orders them.
fn visible(user: Option<&str>, extra: &[(&str, &str, &str)]) -> Rows {
    let mut all = seeded_visible_to(user);
    all.extend_from_slice(extra);
    rows(&all)
}

/// Starts a client against `url` as `login` and waits until it is connected and the server
/// answered its query; returns the client and its rows then.
fn connected_client(url: &str, login: &Login) -> (AppClient, Rows) {
    let mut client = AppClient::start(url, login);
    let rows = client.wait_complete_rows();
    assert_eq!(client.state(), "connected", "{}", client.report());
    (client, rows)
}

// ------------------------------------------------------------------------------------------
// Checks that take the URL the client connects to
// ------------------------------------------------------------------------------------------

/// A client with alice's token sees the public rows and alice's; one without a token only
/// the public rows: the token reached zero-cache and zero-cache applied the permissions.
fn check_rows_follow_the_token(url: &str) {
    let (alice, seen) = connected_client(url, &Login::user("alice"));
    assert_eq!(seen, visible(Some("alice"), &[]), "alice's view\n{}", alice.report());
    let (anon, seen) = connected_client(url, &Login::anonymous());
    assert_eq!(seen, visible(None, &[]), "the anonymous view\n{}", anon.report());
    alice.close();
    anon.close();
}

/// A CRUD insert of the client's own row reaches PostgreSQL; an insert of someone else's row
/// is acknowledged but refused (never reaches PostgreSQL, and leaves the client's view); a
/// row inserted in PostgreSQL reaches the client while it is connected.
fn check_writes_both_ways(zc: &ZeroCache, url: &str) {
    let user = unique_user("writer");
    let (mut client, seen) = connected_client(url, &Login::user(&user));
    assert_eq!(seen, visible(Some(&user), &[]), "{}", client.report());

    let mine = format!("{user}-from-client");
    let m1 = client.insert(&mine, &user, "from the client");
    client.wait_acked(m1);
    assert_eq!(zc.rows_of(&user), rows(&[(&mine, &user, "from the client")]), "in PostgreSQL");

    let forged = format!("{user}-as-alice");
    let m2 = client.insert(&forged, "alice", "not mine to write");
    client.wait_acked(m2);
    let count = zc.psql(&format!("SELECT count(*) FROM item WHERE id = {}", sql_literal(&forged)));
    assert_eq!(count, "0", "zero-cache let {user} write a row of alice's");
    // The optimistic row goes away once the client learns of the refusal.
    let want = visible(Some(&user), &[(&mine, &user, "from the client")]);
    client.wait_rows_where("the refused row to go", |now| now == want.as_slice());

    let theirs = format!("{user}-from-postgres");
    zc.psql(&format!(
        "INSERT INTO item (id, owner, title) VALUES ({}, {}, 'from PostgreSQL')",
        sql_literal(&theirs),
        sql_literal(&user)
    ));
    let want = visible(
        Some(&user),
        &[(&mine, &user, "from the client"), (&theirs, &user, "from PostgreSQL")],
    );
    client.wait_rows_where("the row inserted in PostgreSQL", |now| now == want.as_slice());
    client.close();
}

// ------------------------------------------------------------------------------------------
// Straight to zero-cache: the harness itself
// ------------------------------------------------------------------------------------------

#[test]
fn straight_to_zero_cache_a_client_sees_the_rows_its_token_allows() {
    let zc = ZeroCache::shared();
    check_rows_follow_the_token(&zc.url());
}

#[test]
fn straight_to_zero_cache_writes_reach_postgres_and_postgres_writes_reach_the_client() {
    let zc = ZeroCache::shared();
    check_writes_both_ways(&zc, &zc.url());
}

#[test]
fn straight_to_zero_cache_each_connected_client_holds_one_upstream_socket() {
    let zc = ZeroCache::exclusive();
    // Sockets of clients that earlier tests of this process closed may still be closing.
    zc.wait_upstream_connections(0, WAIT);
    let (client, _) = connected_client(&zc.url(), &Login::user("alice"));
    zc.wait_upstream_connections(1, WAIT);
    let (other, _) = connected_client(&zc.url(), &Login::anonymous());
    zc.wait_upstream_connections(2, WAIT);
    other.close();
    zc.wait_upstream_connections(1, WAIT);
    client.close();
    zc.wait_upstream_connections(0, WAIT);
}

#[test]
fn straight_to_zero_cache_a_client_rides_out_an_upstream_outage() {
    let zc = ZeroCache::exclusive();
    let user = unique_user("outage");
    let (mut client, seen) = connected_client(&zc.url(), &Login::user(&user));
    assert_eq!(seen, visible(Some(&user), &[]), "{}", client.report());
    zc.wait_upstream_connections(1, WAIT);

    let mark = client.mark();
    zc.stop();
    assert!(!zc.running());
    assert_eq!(zc.upstream_connections(), 0, "zero-cache is stopped");
    client.wait_event_after(mark, "the socket's close", |e| e["event"] == "socket-close");
    // Written while zero-cache is down: it must arrive after the restart.
    let row = format!("{user}-during-outage");
    zc.psql(&format!(
        "INSERT INTO item (id, owner, title) VALUES ({}, {}, 'written during the outage')",
        sql_literal(&row),
        sql_literal(&user)
    ));

    zc.start();
    client.wait_event_after(mark, "a new socket", |e| e["event"] == "socket-open");
    client.wait_state("connected");
    let want = visible(Some(&user), &[(&row, &user, "written during the outage")]);
    client.wait_rows_where("the row written during the outage", |now| now == want.as_slice());
    zc.wait_upstream_connections(1, WAIT);
    client.close();
}

// ------------------------------------------------------------------------------------------
// Through syncgate in upstream mode
// ------------------------------------------------------------------------------------------

/// syncgate in front of `zc`, with the same token secret as zero-cache; `extra` is TOML
/// after the upstream table (more tables).
fn edge(zc: &ZeroCache, extra: &str) -> Daemon {
    Daemon::start(&format!("{}[upstream]\nurls = [\"{}\"]\n{extra}", auth_config(), zc.url()))
}

/// The URL a Zero client is given for `edge`.
fn edge_url(edge: &Daemon) -> String {
    format!("http://{}", edge.addr)
}

#[test]
fn through_syncgate_a_client_sees_the_rows_its_token_allows() {
    let zc = ZeroCache::shared();
    let edge = edge(&zc, "");
    check_rows_follow_the_token(&edge_url(&edge));
    assert!(edge.metric("syncgate_upstream_connects_total", &[]) >= 2);
}

#[test]
fn through_syncgate_writes_reach_postgres_and_postgres_writes_reach_the_client() {
    let zc = ZeroCache::shared();
    let edge = edge(&zc, "");
    check_writes_both_ways(&zc, &edge_url(&edge));
    assert!(edge.metric("syncgate_relayed_to_upstream_messages_total", &[]) >= 2);
    assert!(edge.metric("syncgate_relayed_to_client_messages_total", &[]) >= 2);
}

#[test]
fn through_syncgate_with_compression_at_the_edge_the_same() {
    let zc = ZeroCache::shared();
    // A threshold of 0 compresses every message on the client hop.
    let edge = edge(&zc, "[compression]\nenabled = true\nthreshold = 0\n");
    check_writes_both_ways(&zc, &edge_url(&edge));
}

#[test]
fn through_syncgate_a_client_stays_connected_across_ping_intervals() {
    let zc = ZeroCache::exclusive();
    let edge = edge(&zc, "");
    let (mut client, _) = connected_client(&edge_url(&edge), &Login::user("alice"));
    let before = edge.metric("syncgate_relayed_to_upstream_messages_total", &[]);
    // The Zero client pings every 5 s when idle: three of its pings, relayed and answered.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while edge.metric("syncgate_relayed_to_upstream_messages_total", &[]) < before + 3 {
        assert!(std::time::Instant::now() < deadline, "no pings relayed\n{}", client.report());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(client.state(), "connected", "{}", client.report());
    assert_eq!(client.sockets_opened(), 1, "it reconnected\n{}", client.report());
    assert_eq!(edge.metric("syncgate_upstream_connects_total", &[]), 1);
    client.close();
}

#[test]
fn through_syncgate_the_review_attacks_are_refused_at_the_edge() {
    let zc = ZeroCache::exclusive();
    zc.wait_upstream_connections(0, WAIT);
    let edge = edge(&zc, "");
    let (mut victim, seen) = connected_client(&edge_url(&edge), &Login::user("alice"));
    zc.wait_upstream_connections(1, WAIT);
    let (client_id, group) = (victim.client_id.clone(), victim.group.clone());
    let bob = token("bob");
    let attempts: [(Params, Option<String>, &str); 4] = [
        (
            Params::new(&client_id, &group).user("alice").wsid("x1"),
            Some(anon_header()),
            "Unauthorized",
        ),
        (
            Params::new(&client_id, &group).user("alice").wsid("x2"),
            Some(protocol_header(Some(&bob), None)),
            "Unauthorized",
        ),
        (
            Params::new(&client_id, &group).user("alice").wsid("x3"),
            Some(protocol_header(Some("not.a.jwt"), None)),
            "AuthInvalidated",
        ),
        (
            Params::new("intruder", &group).user("alice").wsid("x4"),
            Some(anon_header()),
            "Unauthorized",
        ),
    ];
    for (params, header, kind) in attempts {
        let mut ws = edge.ws(&params, header.as_deref());
        ws.expect_error(kind);
        ws.expect_close(3000);
        // zero-cache never saw a socket for it.
        assert_eq!(zc.upstream_connections(), 1, "an attempt reached zero-cache");
    }
    assert_eq!(edge.metric("syncgate_edge_refusals_total", &[]), 4);
    assert_eq!(victim.state(), "connected", "{}", victim.report());
    assert_eq!(victim.sockets_opened(), 1, "the victim was disconnected\n{}", victim.report());
    assert_eq!(victim.rows(), seen, "the victim's rows changed\n{}", victim.report());
    // Her own token on a new socket with her clientID does replace her connection (and her
    // client, closed with 1000, comes back on its own).
    let mark = victim.mark();
    let _again = edge.ws(
        &Params::new(&client_id, &group).user("alice").wsid("again"),
        Some(&user_header("alice")),
    );
    edge.wait_event("displaced", &[("clientID", &client_id)], WAIT);
    victim.wait_event_after(mark, "the victim's socket replaced", |e| {
        e["event"] == "socket-close" && e["code"] == 1000
    });
    victim.close();
}

/// `upstream.anonymous_user_id`: a tokenless socket names no user at zero-cache. alice's group
/// lives where this syncgate never saw it (her socket goes straight to zero-cache, as it would
/// through another node behind a load balancer that does not hash by group, so no node's pin
/// covers it). A tokenless socket that names her, with a new clientID in her group, is
/// admitted by zero-cache through a syncgate without the setting, and refused by zero-cache
/// itself through one with it.
#[test]
fn through_syncgate_with_an_anonymous_user_id_a_tokenless_socket_cannot_name_a_user() {
    let zc = ZeroCache::shared();
    let group = format!("g-anon-{}", std::process::id());
    let header = protocol_header(Some(&token("alice")), Some(member_init()));
    let path = Params::new("alice-anon", &group).user("alice").wsid("alice").path();
    let mut alice = Ws::connect(zc.addr(), &path, Some(&header)).unwrap();
    assert_eq!(alice.recv_json()[0], "connected");
    let tokenless = protocol_header(None, Some(member_init()));
    let intruder = |edge: &Daemon, client: &str| {
        edge.ws(&Params::new(client, &group).user("alice").wsid(client), Some(&tokenless))
    };
    // Without the setting, zero-cache takes the socket's word for its user: the hole.
    let plain = edge(&zc, "");
    let mut ws = intruder(&plain, "intruder-1");
    assert_eq!(ws.recv_json()[0], "connected", "zero-cache 1.9 admits it");
    ws.close(1000);
    // With it, zero-cache sees userID "anon" and refuses another user in her group.
    let guarded = edge(&zc, "anonymous_user_id = \"anon\"\n");
    let mut ws = intruder(&guarded, "intruder-2");
    ws.expect_error("Unauthorized");
    ws.expect_close(3000);
    // A tokenless socket of a new group of its own is still served, as user "anon".
    let own = format!("{group}-own");
    let mut anon =
        guarded.ws(&Params::new("anon-1", &own).user("whoever").wsid("anon-1"), Some(&tokenless));
    assert_eq!(anon.recv_json()[0], "connected");
    // And alice was never disturbed: her socket still answers.
    alice.send_json(&serde_json::json!(["ping", {}]));
    assert_eq!(alice.recv_json_skipping_pokes()[0], "pong");
}

#[test]
fn through_syncgate_150_upgrade_attempts_from_one_address_meet_the_rate_limit() {
    let zc = ZeroCache::exclusive();
    zc.wait_upstream_connections(0, WAIT);
    let edge = edge(&zc, "[limits]\nconnect_per_ip = 100\nconnect_window_ms = 60000\n");
    let mut limited = 0;
    for i in 0..150 {
        let params = Params::new(&format!("c{i}"), &format!("g{i}"));
        let bad = protocol_header(Some("bad.token.here"), None);
        match Ws::connect(edge.addr, &params.path(), Some(&bad)) {
            Ok(mut ws) => {
                ws.expect_error("AuthInvalidated");
            }
            Err(e) if e.contains("429") => limited += 1,
            Err(e) => panic!("attempt {i}: {e}"),
        }
    }
    assert_eq!(limited, 50, "the attempts over connect_per_ip get 429");
    assert_eq!(edge.metric("syncgate_upstream_connects_total", &[]), 0);
    assert_eq!(zc.upstream_connections(), 0, "no attempt reached zero-cache");
}

#[test]
fn through_syncgate_clients_back_off_while_zero_cache_is_down_and_come_back() {
    let zc = ZeroCache::exclusive();
    let edge = edge(&zc, "");
    let user = unique_user("outage");
    let (mut client, _) = connected_client(&edge_url(&edge), &Login::user(&user));
    let mark = client.mark();
    zc.stop();
    // The relay ends with zero-cache's close or the back-off error: never a hang.
    client.wait_event_after(mark, "the socket's close", |e| e["event"] == "socket-close");
    let row = format!("{user}-during-outage");
    zc.psql(&format!(
        "INSERT INTO item (id, owner, title) VALUES ({}, {}, 'written during the outage')",
        sql_literal(&row),
        sql_literal(&user)
    ));
    // While it is down, the client's reconnects are told to back off (ServerOverloaded with
    // a backoff), not left hanging.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while edge.metric("syncgate_upstream_failures_total", &[]) == 0 {
        assert!(std::time::Instant::now() < deadline, "no reconnect met the down upstream");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    client.wait_event_after(mark, "the back-off error", |e| {
        e["event"] == "server-error" && e.to_string().contains("ServerOverloaded")
    });
    zc.start();
    client.wait_state_after(mark, "connected");
    let want = visible(Some(&user), &[(&row, &user, "written during the outage")]);
    client.wait_rows_where("the row written during the outage", |now| now == want.as_slice());
    // A reload that changes the list (to the same zero-cache under another name) closes
    // nothing.
    let opened = client.sockets_opened();
    let config = std::fs::read_to_string(edge.config_path()).unwrap();
    let renamed = config.replace(&zc.url(), &format!("ws://localhost:{}", zc.port()));
    std::fs::write(edge.config_path(), renamed).unwrap();
    edge.signal(libc::SIGHUP);
    edge.wait_metric("syncgate_reloads_total", &[], 1, WAIT);
    let m2 = client.insert(&format!("{user}-after-reload"), &user, "after the reload");
    client.wait_acked(m2);
    assert_eq!(client.sockets_opened(), opened, "the reload closed the relay\n{}", client.report());
    client.close();
}

// ------------------------------------------------------------------------------------------
// Several upstreams: zero-cache's view-syncers behind two syncgate nodes
// ------------------------------------------------------------------------------------------

/// The `initConnection` of a raw member socket: the app's schema (zero-cache requires it of a
/// new client group) and a query for the public row p1, so zero-cache hydrates it and takes
/// the group's CVR, writing its owner.
fn member_init() -> serde_json::Value {
    let string = serde_json::json!({"type": "string"});
    serde_json::json!(["initConnection", {
        "desiredQueriesPatch": [{
            "op": "put",
            "hash": "row-p1",
            "ast": {
                "table": "item",
                "where": {
                    "type": "simple",
                    "left": {"type": "column", "name": "id"},
                    "right": {"type": "literal", "value": "p1"},
                    "op": "=",
                },
                "orderBy": [["id", "asc"]],
            },
            "ttl": 300_000,
        }],
        "clientSchema": {"tables": {"item": {
            "columns": {"id": string, "owner": string, "title": string},
            "primaryKey": ["id"],
        }}},
    }])
}

/// A raw Zero socket of `user` in `group` through `node`, returned once zero-cache has sent
/// the row its query asks for (it owns the group's CVR by then).
fn member(node: &Daemon, group: &str, client: &str, user: &str) -> Ws {
    let header = protocol_header(Some(&token(user)), Some(member_init()));
    let mut ws = node.connected(&Params::new(client, group).user(user), Some(&header));
    let mut hydrated = false;
    loop {
        let m = ws.recv_json();
        hydrated |= m[0] == "pokePart" && m.to_string().contains("public one");
        if hydrated && m[0] == "pokeEnd" {
            return ws;
        }
    }
}

/// Waits until `n` sockets are established on zero-cache's `port`, seen from its side.
fn wait_sockets_on(cluster: &ZeroCluster, port: u16, n: usize) {
    let deadline = std::time::Instant::now() + APP_WAIT;
    loop {
        let now = established_on_local_port(port);
        if now == n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{now} sockets on {port}, not {n}\n{}",
            cluster.logs_tail()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn through_syncgate_each_client_group_sticks_to_one_view_syncer_from_either_node() {
    let cluster = ZeroCluster::launch(2);
    let urls = cluster.syncer_urls();
    let config = format!(
        "{QUIET}{}[upstream]\nurls = [\"{}\", \"{}\"]\nhealth_interval_ms = 300\n\
         health_timeout_ms = 250\n",
        auth_config(),
        urls[0],
        urls[1]
    );
    let nodes = [Daemon::start(&config), Daemon::start(&config)];
    // The choice every node makes: the same hash of the group over the same list.
    let list = syncgate::upstream::Upstreams::parse(&urls).unwrap();
    let home = |group: &str| urls.iter().position(|u| *u == list.choose(group).unwrap().url);
    let home = |group: &str| home(group).unwrap();
    let name = |i: usize| cluster.syncer_name(i).to_string();

    // Groups through one node land on the view-syncer their hash names, seen from zero-cache's
    // side (the CVR's owner); four of each, so both view-syncers serve some.
    let mut groups: Vec<String> = Vec::new();
    let mut per = [0usize; 2];
    for g in (0..).map(|i| format!("sticky-{i}")) {
        if per.iter().all(|&n| n == 4) {
            break;
        }
        if per[home(&g)] < 4 {
            per[home(&g)] += 1;
            groups.push(g);
        }
    }
    let mut sockets: Vec<Ws> =
        groups.iter().map(|g| member(&nodes[0], g, &format!("{g}-a"), "alice")).collect();
    for g in &groups {
        cluster.wait_owner(g, &name(home(g)), APP_WAIT);
    }
    // A second socket of every group through the other node reaches the same view-syncer: no
    // group changes owner, and each view-syncer holds exactly its groups' sockets.
    sockets.extend(groups.iter().map(|g| member(&nodes[1], g, &format!("{g}-b"), "alice")));
    for g in &groups {
        assert_eq!(cluster.owner_of(g), Some(name(home(g))), "group {g} moved");
    }
    wait_sockets_on(&cluster, cluster.syncer_port(0), 8);
    wait_sockets_on(&cluster, cluster.syncer_port(1), 8);
    drop(sockets);

    // Real Zero clients, one whose group lives on each view-syncer (their clientGroupIDs are
    // the client's own: start clients until both are covered).
    let mut on: [Option<(AppClient, String, String)>; 2] = [None, None];
    for _ in 0..12 {
        if on.iter().all(Option::is_some) {
            break;
        }
        let user = unique_user("sticky");
        let (mut client, _) = connected_client(&edge_url(&nodes[0]), &Login::user(&user));
        let started = client.wait_event("started", |e| e["event"] == "started");
        let group = started["clientGroupID"].as_str().unwrap().to_string();
        let slot = &mut on[home(&group)];
        if slot.is_none() {
            *slot = Some((client, group, user));
        } else {
            client.close();
        }
    }
    let [Some((mut a, group_a, user_a)), Some((mut b, group_b, _))] = on else {
        panic!("twelve clients' groups all hashed to one view-syncer");
    };
    cluster.wait_owner(&group_a, &name(0), APP_WAIT);
    cluster.wait_owner(&group_b, &name(1), APP_WAIT);
    let b_sockets = b.sockets_opened();

    // View-syncer 0 stops: its client backs off, reconnects, and is served by view-syncer 1.
    let mark = a.mark();
    cluster.stop_syncer(0);
    nodes[0].wait_metric("syncgate_upstream_up", &[("upstream", &urls[0])], 0, APP_WAIT);
    nodes[1].wait_metric("syncgate_upstream_up", &[("upstream", &urls[0])], 0, APP_WAIT);
    a.wait_event_after(mark, "the socket's close", |e| e["event"] == "socket-close");
    a.wait_state_after(mark, "connected");
    cluster.wait_owner(&group_a, &name(1), APP_WAIT);
    let m = a.insert(&format!("{user_a}-moved"), &user_a, "while view-syncer 0 was down");
    a.wait_acked(m);

    // It comes back: new sockets of its groups go to it again, from either node.
    cluster.start_syncer(0);
    for node in &nodes {
        node.wait_metric("syncgate_upstream_up", &[("upstream", &urls[0])], 1, APP_WAIT);
    }
    let _back = member(&nodes[1], &group_a, "back-home", &user_a);
    cluster.wait_owner(&group_a, &name(0), APP_WAIT);

    // The other view-syncer's client was never touched.
    assert_eq!(b.sockets_opened(), b_sockets, "{}", b.report());
    assert_eq!(cluster.owner_of(&group_b), Some(name(1)));
    a.close();
    b.close();
}
