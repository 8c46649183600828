//! `loadgen`: the load client of the syncgate benchmarks.
//!
//! It reproduces uWebSockets' load_test method against a server that speaks Zero's sync
//! protocol: connections are opened in turn, then every connection (every group, for
//! fan-out) keeps exactly one message in flight with fixed, pre-encoded, masked frames;
//! after a warm-up it counts completed operations over fixed windows and reports the
//! median window, latency percentiles, and the server's CPU time per operation. Every
//! reply is checked; a wrong or missing one fails the run instead of producing a number.
//!
//! `loadgen run ...` measures one scenario and appends one JSON record (see
//! `syncgate_bench::record`); `loadgen keygen` and `loadgen mint` prepare the tokens of
//! the connect-storm scenario. bench/README.md has the method and scripts/bench.sh the
//! full matrix. The idle scenario can spread its connections over several processes
//! (`--processes`, see `processes.rs`) when one may not hold them all.

mod net;
mod processes;
mod workloads;

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand, ValueEnum};
use syncgate_bench::record::{Record, Switches, ThreadCpu};
use syncgate_bench::report::thousands;
use syncgate_bench::stats::{self, median};
use syncgate_bench::token::{self, Signer};
use syncgate_bench::zero::{self, App};

use net::{Client, Target};
use workloads::{Counters, Frames, Idle, Measured, Names, Ping, Push, Storm};

#[derive(Parser)]
#[command(name = "loadgen", about = "Closed-loop WebSocket load client for Zero's sync protocol")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure one scenario against one server.
    Run(Box<RunArgs>),
    /// Write a fresh RSA key (rs256.pk8), its public JWK (jwk.json) and an HS256 secret.
    Keygen {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Pre-mint distinct tokens for the connect storm, one `userID<TAB>protocol header`
    /// per line.
    Mint {
        #[arg(long, value_enum)]
        alg: Alg,
        /// The directory `keygen` wrote.
        #[arg(long)]
        keys: PathBuf,
        #[arg(long, default_value_t = 32768)]
        count: usize,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Alg {
    Hs256,
    Rs256,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// `["ping",{}]` -> `["pong",{}]` round trips.
    Ping,
    /// A push per round trip, each connection its own client group.
    Echo,
    /// Groups of --group-size connections, one pusher each; counts deliveries.
    Fanout,
    /// New connections per second, each closed right after `connected`.
    Storm,
    /// Hold --connections idle connections and measure the server's memory.
    Idle,
    /// The echo workload in a real zero-cache's app (`item` rows, a query per connection),
    /// paced at --rate: straight to zero-cache, or through syncgate in front of it.
    FrontDoor,
    /// Plain WebSocket echo of --size bytes on the `/echo` route: the WebSocket layer alone.
    Frames,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Name of the server under test, for the record.
    #[arg(long)]
    server: String,
    /// The server's address (IPv4).
    #[arg(long)]
    addr: SocketAddrV4,
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Connections (ping, echo, idle); in-flight handshakes for the storm.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Size of each push in bytes of JSON (echo, fanout).
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Connections per client group (fanout).
    #[arg(long, default_value_t = 10)]
    group_size: usize,
    /// Number of client groups (fanout).
    #[arg(long, default_value_t = 1)]
    groups: usize,
    /// Offer permessage-deflate, require it, and compress what the client sends.
    #[arg(long)]
    deflate: bool,
    /// Token file from `loadgen mint` (storm); without it no token is sent.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Speak the app of a real zero-cache (tests/clients/zero-cache/schema.js), as the
    /// front-door scenario always does: the connect header carries its client schema and
    /// a desired query for the connection's own row. For storm and idle runs in front of
    /// zero-cache, which refuses a new client group without a client schema.
    #[arg(long)]
    zero_cache_app: bool,
    /// Handshakes in flight while opening connections (1: in turn, as load_test does).
    #[arg(long, default_value_t = 1)]
    connect_concurrency: usize,
    /// Seconds of traffic before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Seconds per window.
    #[arg(long, default_value_t = 1.0)]
    window: f64,
    /// Number of windows (the median is reported; at least 5).
    #[arg(long, default_value_t = 5)]
    windows: usize,
    /// Seconds to wait after the idle connections are open before reading memory.
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
    /// Seconds a reply may take before the run fails.
    #[arg(long, default_value_t = 5.0)]
    reply_timeout: f64,
    /// PID of the server's top process: its CPU and memory (and its children's) are read.
    #[arg(long)]
    server_pid: Option<u32>,
    /// `NAME=PID`: also report the CPU per operation of this process tree (front-door: the
    /// zero-cache and PostgreSQL behind the server under test). Repeatable.
    #[arg(long, value_parser = parse_named_pid)]
    cpu_of: Vec<(String, u32)>,
    /// Operations per second in all, spread evenly over the connections (front-door); 0
    /// is a closed loop.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Spread connections over 127.0.0.1 ..= 127.0.0.N as source addresses.
    #[arg(long, default_value_t = 1)]
    sources: u8,
    /// Load-client processes holding the idle connections, each a share of them: one
    /// process may hold only as many sockets as its open-file limit allows. Each takes
    /// its own source addresses, so --sources must be at least this.
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// The first source address is `127.0.0.<this>` (a child process's own addresses).
    #[arg(long, default_value_t = 1, hide = true, value_parser = clap::value_parser!(u8).range(1..))]
    first_source: u8,
    /// Number of the first connection, in its clientID, group and wsid (a child process's
    /// share, so names stay unique across the run's processes).
    #[arg(long, default_value_t = 0, hide = true)]
    id_offset: usize,
    /// Run as child N of --processes: hold the connections until stdin ends, record nothing.
    #[arg(long, hide = true)]
    child: Option<usize>,
    /// Row label; made from the other arguments when absent.
    #[arg(long)]
    variant: Option<String>,
    /// A note for the report (e.g. "no JWT work").
    #[arg(long)]
    note: Option<String>,
    /// Tag in every clientID and clientGroupID of the run (default: made from the time
    /// and PID), so runs never reuse a group a server may remember.
    #[arg(long)]
    tag: Option<String>,
    /// Measure nothing: record this failure for the run these arguments describe (the
    /// bench script uses it when the server did not start).
    #[arg(long)]
    fail_with: Option<String>,
    /// Append the JSON record to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            return match args.child {
                Some(index) => processes::child(&args, index),
                None => run(*args),
            }
        }
        Command::Keygen { dir } => keygen(&dir),
        Command::Mint { alg, keys, count, out } => mint(alg, &keys, count, &out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_named_pid(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s.split_once('=').ok_or("expected NAME=PID")?;
    let pid = pid.parse().map_err(|e| format!("PID {pid:?}: {e}"))?;
    Ok((name.to_string(), pid))
}

fn keygen(dir: &std::path::Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (der, jwk) = token::generate_rsa()?;
    let secret = token::random_secret()?;
    for (name, bytes) in
        [("rs256.pk8", der), ("jwk.json", jwk.into_bytes()), ("hs256.secret", secret.into_bytes())]
    {
        std::fs::write(dir.join(name), bytes).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

fn mint(
    alg: Alg,
    keys: &std::path::Path,
    count: usize,
    out: &std::path::Path,
) -> Result<(), String> {
    let read = |name: &str| std::fs::read(keys.join(name)).map_err(|e| format!("{name}: {e}"));
    let signer = match alg {
        Alg::Hs256 => Signer::hs256(String::from_utf8_lossy(&read("hs256.secret")?).trim()),
        Alg::Rs256 => Signer::rs256(&read("rs256.pk8")?)?,
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?.as_secs();
    // RSA signing is slow: use every core (this runs before any measurement).
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(count.max(1));
    let chunks: Vec<Result<String, String>> = std::thread::scope(|scope| {
        let signer = &signer;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut text = String::new();
                    for i in (t..count).step_by(threads) {
                        let user = format!("bench-user-{i}");
                        // Valid for a day, so one pool serves every run of a session.
                        let token = signer.mint(&user, i as u64, now, 86_400)?;
                        text.push_str(&format!(
                            "{user}\t{}\n",
                            zero::protocol_header(Some(&token))
                        ));
                    }
                    Ok(text)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("minting thread panicked".into())))
            .collect()
    });
    let text = chunks.into_iter().collect::<Result<Vec<_>, _>>()?.concat();
    std::fs::write(out, text).map_err(|e| format!("{}: {e}", out.display()))
}

fn variant(a: &RunArgs) -> String {
    if let Some(v) = &a.variant {
        return v.clone();
    }
    match a.scenario {
        Scenario::Ping => format!("{} conns", a.connections),
        Scenario::Echo => format!("{} x {} conns", size_label(a.size), a.connections),
        Scenario::FrontDoor => {
            format!("{} x {} conns, {} pushes/s", size_label(a.size), a.connections, a.rate)
        }
        Scenario::Frames => format!("{} x {} conns", size_label(a.size), a.connections),
        Scenario::Fanout => format!("{} groups of {}", a.groups, a.group_size),
        Scenario::Storm => format!("{} in flight", a.connections),
        Scenario::Idle => format!("{} conns", a.connections),
    }
}

fn size_label(n: usize) -> String {
    if n >= 1024 && n % 1024 == 0 {
        format!("{} KiB", n / 1024)
    } else {
        format!("{n} B")
    }
}

fn run(a: RunArgs) -> ExitCode {
    let mut rec = Record {
        server: a.server.clone(),
        scenario: match a.scenario {
            Scenario::Ping => "ping",
            Scenario::Echo => "echo",
            Scenario::Fanout => "fanout",
            Scenario::Storm => "storm",
            Scenario::Idle => "idle",
            Scenario::FrontDoor => "front-door",
            Scenario::Frames => "frames",
        }
        .into(),
        variant: variant(&a),
        compressed: a.deflate,
        note: a.note.clone(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        ..Record::default()
    };
    let label = format!(
        "[{} {} {}{}]",
        rec.server,
        rec.scenario,
        rec.variant,
        if a.deflate { " deflate" } else { "" }
    );
    let result = match &a.fail_with {
        Some(reason) => Err(reason.clone()),
        None => measure(&a, &mut rec, &label),
    };
    if let Err(e) = result {
        eprintln!("{label} FAILED: {e}");
        rec.error = Some(e);
    }
    let line = serde_json::to_string(&rec).unwrap_or_default();
    if let Some(path) = &a.out {
        let written = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            eprintln!("loadgen: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    println!("{line}");
    if rec.error.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn measure(a: &RunArgs, rec: &mut Record, label: &str) -> Result<(), String> {
    if a.windows < 5 {
        return Err("at least 5 windows are needed for a median".into());
    }
    match (a.processes, a.scenario) {
        (0, _) => return Err("--processes must be at least 1".into()),
        (1, _) => {}
        (_, Scenario::Idle) => return processes::idle(a, rec, label),
        _ => return Err("--processes applies to the idle scenario only".into()),
    }
    let mut client = Client::new(target(a)?)?;
    let timeout = Duration::from_secs_f64(a.reply_timeout);
    let names = Names::new(&a.tag.clone().unwrap_or_else(run_tag));
    match a.scenario {
        Scenario::Ping => {
            rec.unit = "round trips/s".into();
            rec.connections = a.connections;
            let mut wl = Ping::new(names, a.connections, timeout);
            open_all(
                &mut client,
                &mut wl,
                a.connections,
                a.connect_concurrency,
                open_limit(a.connections),
                label,
            )?;
            let r = windows(&mut client, &mut wl, a, rec, label);
            rec.other_pokes = wl.counters.other_pokes;
            r
        }
        Scenario::Echo | Scenario::Fanout | Scenario::FrontDoor => {
            let (groups, size) = match a.scenario {
                Scenario::Fanout => (a.groups, a.group_size),
                _ => (a.connections, 1),
            };
            let app = a.app();
            if !(a.rate >= 0.0 && a.rate.is_finite()) {
                return Err(format!("--rate {} is not a rate", a.rate));
            }
            // Each group pushes once per interval: groups / rate seconds.
            let interval = (a.rate > 0.0).then(|| Duration::from_secs_f64(groups as f64 / a.rate));
            rec.unit = if size == 1 { "round trips/s" } else { "deliveries/s" }.into();
            rec.connections = groups * size;
            let mut wl = Push::new(app, names, groups, size, a.size, interval, timeout);
            let n = groups * size;
            open_all(&mut client, &mut wl, n, a.connect_concurrency, open_limit(n), label)?;
            let r = windows(&mut client, &mut wl, a, rec, label);
            rec.other_pokes = wl.counters.other_pokes;
            r
        }
        Scenario::Frames => {
            rec.unit = "round trips/s".into();
            rec.connections = a.connections;
            let mut wl = Frames::new(a.connections, a.size, timeout);
            let n = a.connections;
            open_all(&mut client, &mut wl, n, a.connect_concurrency, open_limit(n), label)?;
            windows(&mut client, &mut wl, a, rec, label)
        }
        Scenario::Storm => {
            rec.unit = "connections/s".into();
            rec.connections = a.connections;
            let tokens = match &a.tokens {
                None => Vec::new(),
                Some(path) => read_tokens(path)?,
            };
            let mut wl = Storm::new(a.app(), names, tokens)?;
            client.set_target(a.connections, a.connections);
            windows(&mut client, &mut wl, a, rec, label)
        }
        Scenario::Idle => idle(&mut client, names, a, rec, label),
    }
}

impl RunArgs {
    /// The app the connect headers declare.
    fn app(&self) -> App {
        if self.zero_cache_app || self.scenario == Scenario::FrontDoor {
            App::ZeroCache
        } else {
            App::Bench
        }
    }
}

/// The server, and the source addresses: --sources of them from `127.0.0.<first-source>`;
/// the kernel chooses when that is 127.0.0.1 alone.
fn target(a: &RunArgs) -> Result<Target, String> {
    let count = a.sources.max(1);
    let last = a.first_source.checked_add(count - 1).ok_or("source addresses past 127.0.0.255")?;
    let explicit = count > 1 || a.first_source > 1;
    Ok(Target {
        addr: a.addr,
        sources: if explicit {
            (a.first_source..=last).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect()
        } else {
            Vec::new()
        },
        deflate: a.deflate,
    })
}

/// Six hex digits from the clock and the PID.
fn run_tag() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
    format!("{:06x}", (nanos ^ u64::from(std::process::id()).rotate_left(32)) & 0xff_ffff)
}

fn read_tokens(path: &std::path::Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let tokens: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(u, p)| (u.to_string(), p.to_string()))
        .collect();
    if tokens.is_empty() {
        return Err(format!("{}: no tokens", path.display()));
    }
    Ok(tokens)
}

/// How long opening `n` connections to one server may take. Generous: even a slow server
/// opens a few hundred connections a second.
fn open_limit(n: usize) -> Duration {
    Duration::from_secs(30) + Duration::from_millis(5 * n as u64)
}

/// Opens `n` connections (`concurrency` handshakes at a time) and waits for them all, for
/// at most `limit`.
fn open_all<W: net::Workload>(
    client: &mut Client,
    wl: &mut W,
    n: usize,
    concurrency: usize,
    limit: Duration,
    label: &str,
) -> Result<(), String> {
    client.set_target(n, concurrency);
    let started = Instant::now();
    let mut next_report = started + Duration::from_secs(2);
    while client.open_now() < n {
        client.run_until(Instant::now() + Duration::from_millis(20), wl)?;
        let now = Instant::now();
        if now - started > limit {
            return Err(format!(
                "only {} of {n} connections open after {limit:?}",
                client.open_now()
            ));
        }
        if now >= next_report {
            log_line(&format!("{label} opening: {}/{n}", client.open_now()));
            next_report = now + Duration::from_secs(2);
        }
    }
    log_line(&format!("{label} {n} connections open in {:.1} s", started.elapsed().as_secs_f64()));
    Ok(())
}

/// Writes `line` to stderr in one write: the processes of one run share their log, and
/// `eprintln!` may write a line in pieces that another process's line splits.
fn log_line(line: &str) {
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

/// CPU seconds of the server's processes as (user, system), if a PID was given.
fn server_cpu(pids: &Option<Vec<u32>>) -> Option<(f64, f64)> {
    pids.as_ref().map(|p| stats::cpu_split(p))
}

/// Warm-up, then the measured windows; fills the rate, latency and CPU fields.
fn windows<W: Measured>(
    client: &mut Client,
    wl: &mut W,
    a: &RunArgs,
    rec: &mut Record,
    label: &str,
) -> Result<(), String> {
    let start = Instant::now();
    wl.start(client.writer(), start)?;
    client.run_until(start + Duration::from_secs_f64(a.warmup), wl)?;
    wl.counters().recording = true;
    let pids = a.server_pid.map(stats::process_tree);
    let behind: Vec<(&str, Vec<u32>)> =
        a.cpu_of.iter().map(|(name, pid)| (name.as_str(), stats::process_tree(*pid))).collect();
    let behind0: Vec<f64> = behind.iter().map(|(_, tree)| stats::cpu_seconds(tree)).collect();
    let relayed0 = relayed_messages(a)?;
    let batches0 = store_batches(a)?;
    let t0 = Instant::now();
    let threads0 = pids.as_deref().map(stats::thread_ticks);
    let switches0 = pids.as_deref().map(stats::thread_switches);
    let (cpu0, me0, done0) = (server_cpu(&pids), stats::self_cpu_seconds(), wl.counters().done);
    let messages0 = wl.counters().messages;
    let machine0 = stats::machine_busy_seconds();
    let mut window_start = (t0, done0);
    for i in 0..a.windows {
        let end = t0 + Duration::from_secs_f64(a.window * (i + 1) as f64);
        client.run_until(end, wl)?;
        let now = Instant::now();
        let done = wl.counters().done;
        let rate = (done - window_start.1) as f64 / (now - window_start.0).as_secs_f64();
        rec.windows.push(rate);
        eprintln!("{label} window {}/{}: {} {}", i + 1, a.windows, thousands(rate), rec.unit);
        window_start = (now, done);
    }
    let wall = t0.elapsed().as_secs_f64();
    let ops = (wl.counters().done - done0) as f64;
    if ops == 0.0 {
        return Err("no operation completed in the measured windows".into());
    }
    rec.rate = median(&rec.windows);
    rec.ops = Some(ops as u64);
    if let (Some((u0, s0)), Some((u1, s1))) = (cpu0, server_cpu(&pids)) {
        let (user, system) = (u1 - u0, s1 - s0);
        rec.server_cpu_us_per_op = Some((user + system) * 1e6 / ops);
        rec.server_cpu_util = Some((user + system) / wall);
        rec.server_kernel_share = (user + system > 0.0).then(|| system / (user + system));
    }
    if let (Some(before), Some(pids)) = (&threads0, &pids) {
        let per_op = |seconds: f64| seconds * 1e6 / ops;
        for (name, (user, system)) in stats::thread_cpu_between(before, &stats::thread_ticks(pids))
        {
            let cpu = ThreadCpu { user_us_per_op: per_op(user), system_us_per_op: per_op(system) };
            rec.server_threads.insert(name, cpu);
        }
    }
    if let (Some(before), Some(pids)) = (&switches0, &pids) {
        let (voluntary, involuntary) =
            stats::switches_between(before, &stats::thread_switches(pids));
        rec.server_switches = Some(Switches {
            voluntary_per_op: voluntary as f64 / ops,
            involuntary_per_op: involuntary as f64 / ops,
        });
    }
    rec.client_cpu_util = Some((stats::self_cpu_seconds() - me0) / wall);
    for ((name, tree), c0) in behind.iter().zip(behind0) {
        rec.cpu_us_per_op_of.insert(name.to_string(), (stats::cpu_seconds(tree) - c0) * 1e6 / ops);
    }
    let messages = wl.counters().messages - messages0;
    rec.messages_per_op = (messages > 0).then(|| messages as f64 / ops);
    if let (Some(r0), Some(r1)) = (relayed0, relayed_messages(a)?) {
        rec.relayed_per_op = Some((r1 - r0) as f64 / ops);
    }
    if let (Some(b0), Some(b1)) = (batches0, store_batches(a)?) {
        let per_s = (b1 - b0) as f64 / wall;
        rec.fsyncs_per_s = Some(per_s);
        eprintln!(
            "{label} store: {per_s:.0} fsyncs/s, {:.1} pushes per fsync",
            ops / (b1 - b0).max(1) as f64
        );
    }
    if let (Some(m0), Some(m1), Some(c)) =
        (machine0, stats::machine_busy_seconds(), rec.server_cpu_util)
    {
        let others = (m1 - m0) / wall - c - rec.client_cpu_util.unwrap_or(0.0);
        rec.other_cpu_util = Some(others.max(0.0));
    }
    let c: &Counters = wl.counters();
    let us = |q: f64| c.latency.quantile(q).map(|n| n as f64 / 1000.0);
    (rec.p50_us, rec.p99_us, rec.p999_us) = (us(0.5), us(0.99), us(0.999));
    for (name, us) in &rec.cpu_us_per_op_of {
        eprintln!("{label} {name} cpu {us:.1} us/op");
    }
    if !rec.server_threads.is_empty() {
        eprintln!("{label} server cpu by thread, us/op user+system: {}", rec.server_threads_line());
    }
    if let Some(s) = rec.server_switches {
        eprintln!(
            "{label} server context switches per op: {:.2} voluntary, {:.2} involuntary",
            s.voluntary_per_op, s.involuntary_per_op
        );
    }
    if let Some(r) = rec.relayed_per_op {
        eprintln!("{label} relayed messages per op {r:.2}");
    }
    eprintln!(
        "{label} median {} {}, p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us, server cpu {} us/op ({}, kernel {}), client cpu {:.0}%, others {}",
        thousands(rec.rate.unwrap_or(0.0)),
        rec.unit,
        rec.p50_us.unwrap_or(0.0),
        rec.p99_us.unwrap_or(0.0),
        rec.p999_us.unwrap_or(0.0),
        rec.server_cpu_us_per_op.map_or("?".into(), |v| format!("{v:.2}")),
        rec.server_cpu_util.map_or("?".into(), |v| format!("{:.0}%", v * 100.0)),
        rec.server_kernel_share.map_or("?".into(), |v| format!("{:.0}%", v * 100.0)),
        rec.client_cpu_util.unwrap_or(0.0) * 100.0,
        rec.other_cpu_util.map_or("?".into(), |v| format!("{:.0}%", v * 100.0))
    );
    Ok(())
}

/// Messages syncgate relayed so far, both ways, all workers (its `/metrics`), in a
/// front-door run through syncgate; `None` otherwise.
fn relayed_messages(a: &RunArgs) -> Result<Option<u64>, String> {
    if a.server != "syncgate" || a.scenario != Scenario::FrontDoor {
        return Ok(None);
    }
    syncgate_sum(
        a,
        &[
            "syncgate_relayed_to_upstream_messages_total",
            "syncgate_relayed_to_client_messages_total",
        ],
    )
    .map(Some)
}

/// Batches syncgate's store committed so far, all workers: one `fdatasync` each, of the
/// write-ahead log or of SQLite (`syncgate_store_batches_total`), in a push run against
/// embedded syncgate; `None` otherwise.
fn store_batches(a: &RunArgs) -> Result<Option<u64>, String> {
    if a.server != "syncgate" || a.scenario != Scenario::Echo {
        return Ok(None);
    }
    syncgate_sum(a, &["syncgate_store_batches_total"]).map(Some)
}

/// The sum over syncgate's processes of the `/metrics` series named `names` (any labels).
fn syncgate_sum(a: &RunArgs, names: &[&str]) -> Result<u64, String> {
    let text = stats::http_get(a.addr, "/metrics")?;
    Ok(text
        .lines()
        .filter(|l| {
            let name = l.split(['{', ' ']).next().unwrap_or("");
            names.contains(&name)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// Kernel TCP memory once it stops moving (up to 3 s): sockets of an earlier run may
/// still be releasing their buffers, which would make the baseline too high.
fn settled_tcp_memory() -> Option<u64> {
    let mut last = stats::tcp_memory_bytes()?;
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(200));
        let now = stats::tcp_memory_bytes()?;
        if now == last {
            break;
        }
        last = now;
    }
    Some(last)
}

/// The server's memory and the machine's kernel memory at one moment (idle scenario).
struct Memory {
    /// Resident memory of the server's whole process tree.
    rss: u64,
    /// Kernel TCP buffer memory; `None` where /proc/net/sockstat cannot be read.
    tcp: Option<u64>,
    /// Kernel slab memory; `None` where /proc/meminfo cannot be read.
    slab: Option<u64>,
    /// syncgate's live heap, all processes (`syncgate_heap_bytes` from `/metrics`): what its
    /// data takes, apart from the pages its allocator keeps. `None` for the peers.
    heap: Option<u64>,
}

impl Memory {
    /// The reading before the idle connections open, after [`warm_up`]; TCP memory is
    /// first let settle. The heap first: answering `/metrics` touches memory (syncgate's
    /// listener reads every process's counters) that is not the connections' to pay for.
    fn baseline(a: &RunArgs, server_pid: u32) -> Result<Memory, String> {
        let heap = syncgate_heap(a)?;
        let rss = stats::rss_bytes(&stats::process_tree(server_pid));
        Ok(Memory { rss, tcp: settled_tcp_memory(), slab: stats::slab_bytes(), heap })
    }

    /// The reading while the connections are open.
    fn now(a: &RunArgs, server_pid: u32) -> Result<Memory, String> {
        let rss = stats::rss_bytes(&stats::process_tree(server_pid));
        let heap = syncgate_heap(a)?;
        Ok(Memory { rss, tcp: stats::tcp_memory_bytes(), slab: stats::slab_bytes(), heap })
    }
}

/// The sum of `syncgate_heap_bytes` over syncgate's processes, from its `/metrics`; `None`
/// for another server.
fn syncgate_heap(a: &RunArgs) -> Result<Option<u64>, String> {
    if a.server != "syncgate" {
        return Ok(None);
    }
    syncgate_sum(a, &["syncgate_heap_bytes"]).map(Some)
}

/// Fills the idle record's per-connection figures: growth over `rec.connections`.
fn record_memory(rec: &mut Record, before: &Memory, after: &Memory, label: &str) {
    let n = rec.connections as f64;
    rec.rss_per_conn = Some((after.rss as f64 - before.rss as f64) / n);
    if let (Some(s0), Some(s1)) = (before.tcp, after.tcp) {
        rec.kernel_per_conn = Some((s1 as f64 - s0 as f64) / n);
    }
    if let (Some(s0), Some(s1)) = (before.slab, after.slab) {
        rec.slab_per_conn = Some((s1 as f64 - s0 as f64) / n);
    }
    if let (Some(h0), Some(h1)) = (before.heap, after.heap) {
        rec.heap_per_conn = Some((h1 as f64 - h0 as f64) / n);
    }
    let heap = rec.heap_per_conn.map_or(String::new(), |h| format!(" (live heap {h:.0})"));
    eprintln!(
        "{label} server RSS {:.0} -> {:.0} MiB: {:.0} B/conn{heap}; kernel TCP buffers {:.0} B/conn, slab {:.0} B/conn",
        before.rss as f64 / 1048576.0,
        after.rss as f64 / 1048576.0,
        rec.rss_per_conn.unwrap_or(0.0),
        rec.kernel_per_conn.unwrap_or(0.0),
        rec.slab_per_conn.unwrap_or(0.0)
    );
}

/// Before the idle scenario's baseline: opens and closes one connection for every 50 of
/// the run (at least 200; connect, upgrade, `connected`, close handshake, 8 at a time),
/// then waits --settle seconds. What a server sets up once for its first connections is
/// then in the baseline (its connection code paged in, tables touched on first use, the
/// first page of each of its allocator's size classes: about a megabyte in each syncgate
/// worker, of which ten share 100k connections), and the idle figures count what each
/// further connection costs. Every server gets the same warm-up.
fn warm_up(a: &RunArgs, tag: &str, label: &str) -> Result<(), String> {
    let n = (a.connections as u64 / 50).max(200);
    let mut client = Client::new(target(a)?)?;
    let mut wl = Storm::new(a.app(), Names::new(&format!("{tag}w")), Vec::new())?;
    client.set_target(8, 8);
    let deadline = Instant::now() + open_limit(n as usize);
    while wl.counters.done < n {
        if Instant::now() > deadline {
            return Err(format!("warm-up: {} of {n} connections made", wl.counters.done));
        }
        client.run_until(Instant::now() + Duration::from_millis(20), &mut wl)?;
    }
    // The last ones finish their close handshake; none is opened again.
    client.set_target(0, 1);
    while client.live() > 0 {
        if Instant::now() > deadline {
            return Err(format!("warm-up: {} connections did not close", client.live()));
        }
        client.run_until(Instant::now() + Duration::from_millis(20), &mut wl)?;
    }
    drop(client);
    log_line(&format!("{label} warm-up: {n} connections opened and closed"));
    std::thread::sleep(Duration::from_secs_f64(a.settle));
    Ok(())
}

/// Opens the idle connections and reads the server's memory before and after.
fn idle(
    client: &mut Client,
    names: Names,
    a: &RunArgs,
    rec: &mut Record,
    label: &str,
) -> Result<(), String> {
    let pid = a.server_pid.ok_or("the idle scenario needs --server-pid")?;
    rec.unit = "bytes/conn".into();
    rec.connections = a.connections;
    warm_up(a, names.tag(), label)?;
    let before = Memory::baseline(a, pid)?;
    let mut wl = Idle::new(a.app(), names, a.connections, a.id_offset);
    let limit = open_limit(a.connections);
    open_all(client, &mut wl, a.connections, a.connect_concurrency, limit, label)?;
    client.run_until(Instant::now() + Duration::from_secs_f64(a.settle), &mut wl)?;
    let after = Memory::now(a, pid)?;
    rec.other_pokes = wl.other_pokes;
    record_memory(rec, &before, &after, label);
    Ok(())
}
