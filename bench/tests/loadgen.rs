//! End-to-end checks of the load client: every scenario against the Rust peers (which
//! also proves the peers answer the protocol subset correctly), and the failures a
//! misbehaving server must cause (a wrong reply, a missing reply, a header not echoed).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use syncgate_bench::record::Record;

/// A peer server on an ephemeral port; killed on drop.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(bin: &str) -> Server {
    let mut child =
        Command::new(bin).arg("127.0.0.1:0").stderr(Stdio::piped()).spawn().expect("start peer");
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("ready listen=")
        .unwrap_or_else(|| panic!("no ready line: {line:?}"))
        .to_string();
    Server { child, addr }
}

/// Runs `loadgen run` with short windows; returns its record.
fn loadgen(addr: &str, args: &[&str]) -> Record {
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--server", "test", "--addr", addr])
        .args(["--warmup", "0.1", "--window", "0.2", "--windows", "5"])
        .args(args)
        .output()
        .expect("run loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rec: Record = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {stdout} {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.success(), rec.error.is_none(), "exit status follows the error");
    rec
}

fn assert_measured(rec: &Record) {
    assert_eq!(rec.error, None, "{rec:?}");
    assert_eq!(rec.windows.len(), 5);
    // Not the median: on a loaded CI machine a few short windows may come out empty.
    assert!(rec.rate.is_some() && rec.windows.iter().sum::<f64>() > 0.0);
    assert!(rec.p50_us.unwrap() > 0.0 && rec.p50_us <= rec.p999_us);
}

fn every_scenario(bin: &str) {
    let s = start(bin);
    let pid = s.child.id().to_string();
    let ping =
        loadgen(&s.addr, &["--scenario", "ping", "--connections", "20", "--server-pid", &pid]);
    assert_measured(&ping);
    assert!(ping.server_cpu_us_per_op.unwrap() > 0.0);
    // The split by thread accounts for the server's CPU: the threads' times add up to the
    // process's, but for the ticks read between the two samples.
    let threads: f64 =
        ping.server_threads.values().map(|c| c.user_us_per_op + c.system_us_per_op).sum();
    let whole = ping.server_cpu_us_per_op.unwrap();
    assert!((threads - whole).abs() <= 0.2 * whole, "{threads} of {whole}: {ping:?}");
    assert!(!ping.server_threads_line().is_empty());
    // Each round trip waits for the client on the other side of a socket: the server's
    // threads went to sleep at least once over the windows.
    let switches = ping.server_switches.expect("context switches counted");
    assert!(switches.voluntary_per_op > 0.0, "{switches:?}");
    assert_eq!(ping.unit, "round trips/s");
    let echo = loadgen(&s.addr, &["--scenario", "echo", "--connections", "10", "--size", "16384"]);
    assert_measured(&echo);
    let fanout = loadgen(&s.addr, &["--scenario", "fanout", "--groups", "2", "--group-size", "10"]);
    assert_measured(&fanout);
    assert_eq!((fanout.unit.as_str(), fanout.connections), ("deliveries/s", 20));
    for size in ["20", "65536"] {
        let frames =
            loadgen(&s.addr, &["--scenario", "frames", "--connections", "10", "--size", size]);
        assert_measured(&frames);
        assert_eq!(frames.scenario, "frames");
    }
    let storm = loadgen(&s.addr, &["--scenario", "storm", "--connections", "4"]);
    assert_measured(&storm);
    let idle = loadgen(
        &s.addr,
        &["--scenario", "idle", "--connections", "200", "--settle", "0.2", "--server-pid", &pid],
    );
    assert_eq!(idle.error, None);
    assert!(idle.rss_per_conn.is_some());
}

#[test]
fn every_scenario_against_tokio_tungstenite() {
    every_scenario(env!("CARGO_BIN_EXE_peer-tungstenite"));
}

#[test]
fn every_scenario_against_fastwebsockets() {
    every_scenario(env!("CARGO_BIN_EXE_peer-fastwebsockets"));
}

/// The front-door scenario is paced: at 400 pushes a second over 5 connections, not the
/// thousands a closed loop would make, and each push costs the load client 4 messages (the
/// push and the poke's three) however fast the server is. (The rate is high enough that the
/// peer's CPU shows in a second of clock ticks: at 100 a second it came out 0 once, on a
/// busy machine.)
#[test]
fn the_front_door_scenario_holds_its_rate() {
    let s = start(env!("CARGO_BIN_EXE_peer-tungstenite"));
    let pid = s.child.id().to_string();
    let rec = loadgen(
        &s.addr,
        &["--scenario", "front-door", "--connections", "5", "--rate", "400"]
            .into_iter()
            .chain(["--cpu-of", &format!("peer={pid}")])
            .collect::<Vec<_>>(),
    );
    assert_measured(&rec);
    assert_eq!(rec.scenario, "front-door");
    let rate = rec.rate.unwrap();
    assert!(rate < 600.0, "paced at 400/s, measured {rate}/s: {rec:?}");
    let messages = rec.messages_per_op.unwrap();
    assert!((3.9..4.2).contains(&messages), "{messages} messages per push: {rec:?}");
    assert!(rec.cpu_us_per_op_of.get("peer").is_some_and(|us| *us > 0.0), "{rec:?}");
    assert_eq!(rec.relayed_per_op, None, "only syncgate relays");
}

/// Descriptors the process holds: a peer holds one per connection.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn idle_over_two_processes() {
    let s = start(env!("CARGO_BIN_EXE_peer-tungstenite"));
    let pid = s.child.id();
    let idle_fds = open_fds(pid);
    let mut run = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--server", "test", "--addr", &s.addr, "--scenario", "idle"])
        .args(["--connections", "301", "--processes", "2", "--sources", "3", "--settle", "1"])
        .args(["--server-pid", &pid.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run loadgen");
    // Both children's shares must be open at once, while the parent settles and measures.
    let mut most = 0;
    while run.try_wait().unwrap().is_none() {
        most = most.max(open_fds(pid));
        thread::sleep(Duration::from_millis(20));
    }
    let out = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let rec: Record =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert!(out.status.success(), "{rec:?} {stderr}");
    assert_eq!((rec.error, rec.connections), (None, 301));
    assert!(rec.rss_per_conn.is_some() && rec.slab_per_conn.is_some());
    assert!(most >= idle_fds + 301, "the peer held at most {most} descriptors");
    // The split: 151 and 150 connections, from disjoint source addresses.
    assert!(
        stderr.contains("process 0: connections 0..151 from 127.0.0.1..=127.0.0.2"),
        "{stderr}"
    );
    assert!(
        stderr.contains("process 1: connections 151..301 from 127.0.0.3..=127.0.0.3"),
        "{stderr}"
    );
    // The children closed their connections when told and are gone.
    let gone = Instant::now() + Duration::from_secs(5);
    while open_fds(pid) > idle_fds && Instant::now() < gone {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(open_fds(pid), idle_fds, "the peer still holds connections");
}

/// A child process's failure is the run's, with its message.
#[test]
fn a_failing_process_fails_the_run() {
    let me = std::process::id().to_string();
    let rec = loadgen(
        &fake_server(Fault::NoProtocolEcho),
        &["--scenario", "idle", "--connections", "4", "--processes", "2", "--sources", "2"]
            .iter()
            .chain(&["--server-pid", &me])
            .copied()
            .collect::<Vec<_>>(),
    );
    assert!(rec.error.as_deref().unwrap().contains("not echoed"), "{rec:?}");
    // Not an idle run, and processes without addresses of their own: refused.
    let addr = "127.0.0.1:9";
    let ping = loadgen(addr, &["--scenario", "ping", "--processes", "2", "--server-pid", &me]);
    assert!(ping.error.unwrap().contains("idle scenario only"));
    let idle = loadgen(addr, &["--scenario", "idle", "--processes", "2", "--server-pid", &me]);
    assert!(idle.error.unwrap().contains("its own addresses"));
}

#[test]
fn storm_with_tokens_and_deflate_refusal() {
    let dir = std::env::temp_dir().join(format!("loadgen-test-{}", std::process::id()));
    let keygen = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["keygen", "--dir", dir.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(keygen.success());
    let tokens = dir.join("tokens");
    let mint = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["mint", "--alg", "hs256", "--count", "10", "--keys", dir.to_str().unwrap()])
        .args(["--out", tokens.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(mint.success());
    assert_eq!(std::fs::read_to_string(&tokens).unwrap().lines().count(), 10);
    let s = start(env!("CARGO_BIN_EXE_peer-tungstenite"));
    let storm = loadgen(
        &s.addr,
        &["--scenario", "storm", "--connections", "2", "--tokens", tokens.to_str().unwrap()],
    );
    assert_measured(&storm);
    // tokio-tungstenite has no permessage-deflate: the run must fail, not measure.
    let z = loadgen(&s.addr, &["--scenario", "ping", "--connections", "2", "--deflate"]);
    assert!(z.error.unwrap().contains("declined permessage-deflate"));
    let _ = std::fs::remove_dir_all(dir);
}

/// How the fake server misbehaves.
#[derive(Clone, Copy)]
enum Fault {
    /// Answers every frame with `["pang",{}]`.
    WrongReply,
    /// Never answers.
    Silent,
    /// Leaves the protocol header out of the 101.
    NoProtocolEcho,
    /// Sends a catch-up poke after `connected` (as syncgate does), then answers pongs.
    PokeFirst,
}

/// A server that completes the handshake and then misbehaves as told.
fn fake_server(fault: Fault) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let Ok(n @ 1..) = stream.read(&mut buf) else { return };
                    head.extend_from_slice(&buf[..n]);
                }
                let (req, mut resp) = syncgate_bench::peer::upgrade(&head).unwrap();
                if let Fault::NoProtocolEcho = fault {
                    resp =
                        resp.replace(&format!("Sec-WebSocket-Protocol: {}\r\n", req.protocol), "");
                }
                let text = |s: &str| [&[0x81, s.len() as u8][..], s.as_bytes()].concat();
                let _ = stream.write_all(resp.as_bytes());
                let connected = syncgate_bench::peer::connected_message(&req.wsid);
                let _ = stream.write_all(&text(&connected));
                if let Fault::PokeFirst = fault {
                    for m in [
                        r#"["pokeStart",{"pokeID":"00","baseCookie":null}]"#,
                        r#"["pokePart",{"pokeID":"00"}]"#,
                        r#"["pokeEnd",{"pokeID":"00","cookie":"00"}]"#,
                    ] {
                        let _ = stream.write_all(&text(m));
                    }
                }
                // One frame per read: the load client has one message in flight.
                while let Ok(1..) = stream.read(&mut buf) {
                    let reply = match fault {
                        Fault::WrongReply => r#"["pang",{}]"#,
                        Fault::PokeFirst => r#"["pong",{}]"#,
                        _ => continue,
                    };
                    let _ = stream.write_all(&text(reply));
                }
            });
        }
    });
    addr
}

#[test]
fn a_wrong_reply_is_an_error() {
    let rec =
        loadgen(&fake_server(Fault::WrongReply), &["--scenario", "ping", "--connections", "2"]);
    assert!(rec.error.as_deref().unwrap().contains("expected pong"), "{rec:?}");
    assert_eq!(rec.rate, None);
}

#[test]
fn a_missing_reply_is_an_error() {
    let addr = fake_server(Fault::Silent);
    let rec =
        loadgen(&addr, &["--scenario", "ping", "--connections", "2", "--reply-timeout", "0.2"]);
    assert!(rec.error.as_deref().unwrap().contains("no pong within"), "{rec:?}");
    let rec =
        loadgen(&addr, &["--scenario", "echo", "--connections", "2", "--reply-timeout", "0.2"]);
    assert!(rec.error.as_deref().unwrap().contains("deliveries of mutation 1 missing"), "{rec:?}");
}

#[test]
fn a_protocol_header_that_is_not_echoed_is_an_error() {
    let rec =
        loadgen(&fake_server(Fault::NoProtocolEcho), &["--scenario", "ping", "--connections", "1"]);
    assert!(rec.error.as_deref().unwrap().contains("not echoed"), "{rec:?}");
}

#[test]
fn a_catch_up_poke_is_counted_not_an_error() {
    let rec =
        loadgen(&fake_server(Fault::PokeFirst), &["--scenario", "ping", "--connections", "3"]);
    assert_measured(&rec);
    assert_eq!(rec.other_pokes, 3, "one catch-up poke per connection");
}
