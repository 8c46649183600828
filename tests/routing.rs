//! Deterministic worker choice by client group (docs/ARCHITECTURE.md: xxh32(taskID/cgID) %
//! workers): groups spread over the workers, every socket of one group lands on the same worker,
//! and that worker is the one the published hash names.

mod common;

use std::collections::BTreeMap;

use common::*;

#[test]
fn the_published_hash_has_its_test_vectors() {
    // The routing vectors, through the same function the listener routes with.
    assert_eq!(xxhash_rust::xxh32::xxh32(b"abc", 0), 0x32d1_53ff);
    assert_eq!(xxhash_rust::xxh32::xxh32(b"a", 0), 0x550d_7456);
    for group in ["g1", "0h3jon9uhlfna8iufn", "ünïcødé"] {
        let hash = xxhash_rust::xxh32::xxh32(format!("{TASK_ID}/{group}").as_bytes(), 0);
        assert_eq!(
            syncgate::protocol::route::worker_for(TASK_ID, group, 7),
            hash as usize % 7,
            "{group}"
        );
    }
}

#[test]
fn many_groups_spread_over_the_workers_by_the_hash() {
    let d = Daemon::start(QUIET);
    let groups: Vec<String> = (0..40).map(|i| format!("group-{i}")).collect();
    let mut expected = [0u64; WORKERS];
    let mut sockets = Vec::new();
    for (i, group) in groups.iter().enumerate() {
        sockets
            .push(d.connected(&Params::new(&format!("client-{i}"), group), Some(&anon_header())));
        expected[expected_worker(group)] += 1;
    }
    assert!(
        expected.iter().all(|&n| n > 0),
        "the test's groups must cover every worker: {expected:?}"
    );
    for (i, group) in groups.iter().enumerate() {
        let e = d.wait_event("connected", &[("clientID", &format!("client-{i}"))], WAIT);
        assert_eq!(e.field("clientGroupID"), Some(group.as_str()));
        assert_eq!(
            e.worker,
            expected_worker(group),
            "{group} served by the wrong worker: {}",
            e.line
        );
    }
    for (worker, &n) in expected.iter().enumerate() {
        let label = worker.to_string();
        assert_eq!(
            d.metric("syncgate_connected_total", &[("worker", &label)]),
            n,
            "worker {worker}"
        );
        d.wait_metric("syncgate_connections_open", &[("worker", &label)], n, WAIT);
    }
    assert_eq!(d.metric("syncgate_handoffs_total", &[("process", "listener")]), 40);
    // Every one of them is served, not just counted.
    for ws in &mut sockets {
        ws.ping_pong();
    }
}

#[test]
fn every_socket_of_a_group_lands_on_the_same_worker() {
    let d = Daemon::start(QUIET);
    let mut per_group: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    let mut sockets = Vec::new();
    for group in ["shared-a", "shared-b", "shared-c", "shared-d"] {
        for tab in 0..5 {
            let client = format!("{group}-tab{tab}");
            let mut ws = d.connected(&Params::new(&client, group), Some(&anon_header()));
            ws.ping_pong();
            sockets.push(ws);
            let e = d.wait_event("connected", &[("clientID", &client)], WAIT);
            per_group.entry(group).or_default().push(e.worker);
        }
    }
    for (group, workers) in &per_group {
        assert!(
            workers.iter().all(|&w| w == expected_worker(group)),
            "{group} on workers {workers:?}"
        );
    }
}

#[test]
fn sockets_of_one_group_reconnecting_return_to_the_same_worker() {
    let d = Daemon::start(QUIET);
    let group = "reconnecting";
    for round in 0..3 {
        let client = format!("c-{round}");
        let mut ws = d.connected(&Params::new(&client, group), Some(&anon_header()));
        ws.close(1000);
        ws.expect_close(1000);
        let e = d.wait_event("closed", &[("clientID", &client)], WAIT);
        assert_eq!(e.worker, expected_worker(group), "round {round}: {}", e.line);
    }
}
