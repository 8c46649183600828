//! The real Zero client (`@rocicorp/zero` 1.9.0) in a page in headless Chromium against the
//! daemon: the page connects, another client inserts a row, the page shows it. What a user of
//! an app sees, through a real browser's WebSocket, IndexedDB and event loop.
//!
//! The machinery (the page, its server, Chromium over WebDriver, the scenario) is
//! tests/common/browser.rs: [`browser_sees_a_mutation_by_another_client`] takes the server,
//! the auth and the data model, so a test of another server (syncgate in front of zero-cache)
//! runs the same body with its own second client. `scripts/test.sh` installs Chromium,
//! chromedriver, esbuild and the Zero client; a missing one fails the test, never skips it.

mod common;

use serde_json::json;

use common::*;

/// The embedded workload, with token checking on: the page's client (user `alice`, her token
/// in the query string) connects; a raw client of alice in the page's client group inserts a
/// row; the page shows it.
#[test]
fn a_zero_client_in_chromium_shows_a_row_another_client_inserted() {
    let d = Daemon::start(&auth_config());
    let user = "alice";
    let settings = PageSettings::issue(&format!("http://{}", d.addr), user, Some(token(user)));
    let row = json!({"id": "b1", "title": "from another client"});
    let mut peer = None;
    let (page, client) = browser_sees_a_mutation_by_another_client(settings, &row, |page| {
        peer = Some(raw_insert(d.addr, page, user, Some(&token(user)), "issue", "id", &row));
    });

    // The daemon saw the browser's socket as alice's, on the worker its group hashes to, and
    // the second client's in the same group.
    let group = client.client_group_id.as_str();
    let e = d.wait_event(
        "connected",
        &[("clientID", &client.client_id), ("clientGroupID", group)],
        WAIT,
    );
    assert_eq!(e.field("user"), Some(user), "{}", e.line);
    assert_eq!(e.worker, expected_worker(group), "{}", e.line);
    let peer = peer.expect("the second client ran");
    d.wait_event("connected", &[("clientID", &peer), ("clientGroupID", group)], WAIT);
    let connects = d
        .events()
        .iter()
        .filter(|e| e.matches("connected", &[("clientID", &client.client_id)]))
        .count();
    assert_eq!(connects, 1, "the browser's client reconnected:\n{}", d.log_text());
    drop(page);
    d.wait_event("closed", &[("clientID", &client.client_id)], WAIT);
    assert_eq!(d.metric("syncgate_protocol_errors_total", &[]), 0);
}

/// Upstream mode: the page's client (alice, with her token) connects through syncgate to a
/// real zero-cache; another real Zero client of alice's (on Node, also through syncgate)
/// inserts a row; the page shows it, and the row is in PostgreSQL.
#[test]
fn through_syncgate_in_front_of_zero_cache_a_page_shows_a_row_another_client_inserted() {
    let zc = ZeroCache::shared();
    let edge = Daemon::start(&format!("{}[upstream]\nurls = [\"{}\"]\n", auth_config(), zc.url()));
    let server = format!("http://{}", edge.addr);
    let user = "alice";
    let settings = PageSettings {
        table: "item".into(),
        columns: vec!["id".into(), "owner".into(), "title".into()],
        ..PageSettings::issue(&server, user, Some(token(user)))
    };
    let id = format!("{}-from-node", unique_user("browser"));
    let row = json!({"id": id, "owner": user, "title": "from another client"});
    let (page, client) = browser_sees_a_mutation_by_another_client(settings, &row, |_| {
        let mut other = AppClient::start(&server, &Login::user(user));
        other.wait_complete_rows();
        let m = other.insert(&id, user, "from another client");
        other.wait_acked(m);
        other.close();
    });
    assert_eq!(zc.rows_of(user).iter().filter(|r| r.0 == id).count(), 1, "in PostgreSQL");
    edge.wait_event("connected", &[("clientID", &client.client_id), ("user", user)], WAIT);
    drop(page);
    assert_eq!(edge.metric("syncgate_protocol_errors_total", &[]), 0);
}
