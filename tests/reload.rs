//! SIGHUP reloads through the real binary: many reloads under traffic drop nothing and each
//! new limit is in force once the reload is confirmed; a change of the worker count is a
//! graceful replacement.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// The daemon's config with `max_message_bytes` set; the rest as the harness wrote it.
fn with_limit(base: &str, limit: usize) -> String {
    base.lines()
        .map(|l| {
            if l.trim_start().starts_with("max_message_bytes") {
                format!("max_message_bytes = {limit}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect()
}

/// Sends SIGHUP and waits for the supervisor's confirmation of reload number `generation`.
fn reload(d: &Daemon, generation: u64) {
    d.signal(libc::SIGHUP);
    let done = format!("generation={generation}");
    d.wait_log(|l| l.contains("reloaded configuration") && l.contains(&done), WAIT);
}

#[test]
fn twenty_reloads_under_traffic_drop_nothing_and_apply_each_limit() {
    let d = Daemon::start(&format!("{QUIET}[limits]\nmax_message_bytes = 2000\n"));
    let base = std::fs::read_to_string(d.config_path()).unwrap();
    let mut clients: Vec<Ws> = (0..16)
        .map(|i| {
            d.connected(&Params::new(&format!("t{i}"), &format!("g{i}")), Some(&anon_header()))
        })
        .collect();
    let mut pongs = 0;
    for round in 1..=20u64 {
        let limit = 2000 + round as usize * 100;
        std::fs::write(d.config_path(), with_limit(&base, limit)).unwrap();
        // Traffic in flight while the reload happens.
        for ws in &mut clients {
            ws.send_json(&json!(["ping", {}]));
        }
        reload(&d, round);
        for ws in &mut clients {
            assert_eq!(ws.recv_json_skipping_pokes(), json!(["pong", {}]), "round {round}");
            pongs += 1;
        }
        // The new limit is in force: a message of exactly the limit passes, one byte more
        // closes with 1009 (on a connection of its own).
        let fits = format!("[\"ping\",{{}}{}]", " ".repeat(limit - 11));
        assert_eq!(fits.len(), limit);
        let probe = Params::new(&format!("probe{round}"), "probes");
        let mut ws = d.connected(&probe, Some(&anon_header()));
        ws.send_text(&fits);
        assert_eq!(ws.recv_json_skipping_pokes(), json!(["pong", {}]), "round {round}");
        ws.send_text(&format!("{fits} "));
        loop {
            match ws.recv_within(WAIT) {
                Got::Close(Some((code, _))) => {
                    assert_eq!(code, 1009, "round {round}: over the new limit");
                    break;
                }
                Got::Text(_) => {}
                other => panic!("round {round}: expected close 1009, got {other:?}"),
            }
        }
    }
    assert_eq!(pongs, 20 * 16, "every ping answered");
    // None of the traffic connections was closed by any reload.
    for ws in &mut clients {
        ws.ping_pong();
    }
    let closed_traffic = d
        .events()
        .into_iter()
        .filter(|e| e.event == "closed" && e.field("clientID").is_some_and(|c| c.starts_with('t')))
        .count();
    assert_eq!(closed_traffic, 0, "{}", d.log_text());
    assert_eq!(d.metric("syncgate_reloads_total", &[]), 20);
}

#[test]
fn changing_the_worker_count_replaces_the_workers_gracefully() {
    let d = Daemon::start(&format!("drain_timeout_ms = 1500\n{QUIET}"));
    let mut old = d.connected(&Params::new("old", "g-old"), Some(&anon_header()));
    let old_workers: Vec<libc::pid_t> = d
        .children()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("__worker"))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(old_workers.len(), WORKERS);
    let config = std::fs::read_to_string(d.config_path()).unwrap();
    std::fs::write(d.config_path(), config.replace("workers = 2", "workers = 3")).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log(|l| l.contains("by graceful replacement") && l.contains("workers=3"), WAIT);
    // The old connection is still served during the drain...
    old.ping_pong();
    // ...while new connections go to the new generation, routed by the new count.
    let mut new = d.connected(&Params::new("new", "g-new"), Some(&anon_header()));
    new.ping_pong();
    let event = d.wait_event("connected", &[("clientID", "new")], WAIT);
    assert_eq!(event.worker, syncgate::protocol::route::worker_for(TASK_ID, "g-new", 3));
    let new_workers: Vec<libc::pid_t> = d
        .children()
        .into_iter()
        .filter(|(pid, cmd)| cmd.contains("__worker") && !old_workers.contains(pid))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(new_workers.len(), 3, "three new workers");
    // After the drain timeout the old connection is closed with 1012 (service restart).
    let reason = loop {
        match old.recv_within(Duration::from_secs(5)) {
            Got::Close(Some((code, reason))) => {
                assert_eq!(code, 1012);
                break reason;
            }
            Got::Text(_) => {}
            other => panic!("expected close 1012, got {other:?}"),
        }
    };
    assert!(!reason.is_empty());
    // The old workers exit; the new connection is untouched.
    for w in 0..WORKERS {
        let line = format!("worker {w} of the previous generation exited");
        d.wait_log(|l| l.contains(&line), WAIT);
    }
    assert!(old_workers.iter().all(|&pid| !alive(pid)), "old workers are gone");
    new.ping_pong();
}
