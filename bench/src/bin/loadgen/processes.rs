//! The idle scenario over several load-client processes.
//!
//! A process may hold only as many sockets as its open-file limit allows (RLIMIT_NOFILE,
//! which only CAP_SYS_RESOURCE can raise), and 100k idle connections need more than a
//! typical hard limit. With `--processes K` the process that was started (the parent)
//! re-executes its own binary K times. Each child opens a disjoint share of the
//! connections, named from its own first number (clientIDs and client groups stay unique
//! in the run), from its own source addresses (each address has its own ephemeral ports),
//! and answers keepalives as the one-process run does. The parent alone measures: the
//! server's memory before any child connects, and again once every child holds its share
//! and --settle has passed; then it closes the children's stdin, which tells them to exit.
//!
//! A child reports on stdout, one line each: `open <n>` once its connections are open,
//! `error <message>` when it fails, `done <other pokes>` when it exits as told. Every wait
//! is bounded; a child that fails, exits early or goes quiet fails the run, and the others
//! are killed. A child whose stdin ends without being told (the parent died) exits too, so
//! no child outlives its run.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use syncgate_bench::record::Record;

use crate::net::Client;
use crate::workloads::{Idle, Names};
use crate::{
    log_line, open_all, open_limit, record_memory, run_tag, target, warm_up, Memory, RunArgs,
};

/// How long a child may take to exit once told to (it only drops its sockets), and how
/// long the parent waits for the exit status of a child whose output ended.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a child holding its connections looks whether its stdin ended.
const STDIN_POLL: Duration = Duration::from_millis(100);

/// Runs the idle scenario with `a.processes` children; fills the record as the
/// one-process run does, with figures per connection over all of them.
pub fn idle(a: &RunArgs, rec: &mut Record, label: &str) -> Result<(), String> {
    let pid = a.server_pid.ok_or("the idle scenario needs --server-pid")?;
    let k = a.processes;
    if a.connections < k {
        return Err(format!("{} connections cannot be shared by {k} processes", a.connections));
    }
    if usize::from(a.sources) < k {
        return Err(format!(
            "--sources {} is fewer than --processes {k}: each process connects from its own addresses",
            a.sources
        ));
    }
    rec.unit = "bytes/conn".into();
    rec.connections = a.connections;
    let tag = a.tag.clone().unwrap_or_else(run_tag);
    warm_up(a, &tag, label)?;
    let before = Memory::baseline(a, pid)?;
    let started = Instant::now();
    let mut children = Children::spawn(a, &tag, label)?;
    // A child gives up by itself after open_limit; this is for one that hangs instead.
    let deadline = started + open_limit(a.connections) + EXIT_TIMEOUT;
    if !children.wait(deadline, Children::all_open)? {
        return Err(format!(
            "not every process opened its connections within {:?}",
            deadline - started
        ));
    }
    log_line(&format!(
        "{label} {} connections open in {k} processes in {:.1} s",
        a.connections,
        started.elapsed().as_secs_f64()
    ));
    // The children keep answering keepalives meanwhile; one that fails ends the wait.
    children.wait(Instant::now() + Duration::from_secs_f64(a.settle), |_| false)?;
    let after = Memory::now(a, pid)?;
    // A failure reported while memory was read makes the reading worthless.
    children.wait(Instant::now(), |_| false)?;
    rec.other_pokes = children.close()?;
    record_memory(rec, &before, &after, label);
    Ok(())
}

/// The `i`th of `k` nearly equal shares of `n` (the first `n % k` are one larger).
fn share(n: usize, k: usize, i: usize) -> usize {
    n / k + usize::from(i < n % k)
}

/// A line a child wrote on stdout, or the end of its stdout.
enum Report {
    /// One line, without its newline.
    Line(String),
    /// Its stdout closed: it exited, or is about to.
    Ended,
}

/// One child process and what it reported.
struct Member {
    /// The process.
    process: Child,
    /// Its stdin; dropping it is the parent's word to close the connections and exit.
    stdin: Option<ChildStdin>,
    /// Its share of the connections, which its `open` report must name.
    connections: usize,
    /// It reported `open`.
    open: bool,
    /// Its stdout ended.
    ended: bool,
    /// Its `done` report: the pokes it ignored. `None` until it exits as told.
    other_pokes: Option<u64>,
}

/// The children of one run. Dropping it kills those still running: every way out of
/// [`idle`] that is not [`Children::close`] is a failure, and no child may outlive it.
struct Children {
    /// Indexed by child number.
    members: Vec<Member>,
    /// Every child's reports, tagged with its number, from one reader thread per child.
    reports: Receiver<(usize, Report)>,
}

impl Children {
    /// Starts the children, each with its share of connections and source addresses.
    fn spawn(a: &RunArgs, tag: &str, label: &str) -> Result<Children, String> {
        let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
        let (tx, reports) = mpsc::channel();
        let mut children = Children { members: Vec::new(), reports };
        let (mut first_id, mut first_source) = (0, 1);
        for i in 0..a.processes {
            let connections = share(a.connections, a.processes, i);
            let sources = share(usize::from(a.sources), a.processes, i);
            let mut cmd = Command::new(&exe);
            cmd.args(["run", "--scenario", "idle", "--server", &a.server])
                .args(["--addr", &a.addr.to_string(), "--tag", tag])
                .args(["--connections", &connections.to_string()])
                .args(["--connect-concurrency", &a.connect_concurrency.to_string()])
                .args(["--id-offset", &first_id.to_string()])
                .args(["--first-source", &first_source.to_string()])
                .args(["--sources", &sources.to_string()])
                // The whole run's count: a child's open limit is the run's, as the server
                // opens every child's connections in the same time.
                .args(["--processes", &a.processes.to_string(), "--child", &i.to_string()]);
            if a.deflate {
                cmd.arg("--deflate");
            }
            if a.zero_cache_app {
                cmd.arg("--zero-cache-app");
            }
            let mut process = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| format!("start process {i}: {e}"))?;
            let stdout = process.stdout.take().ok_or("child stdout not piped")?;
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((i, Report::Line(line))).is_err() {
                        return; // the parent is done with the run
                    }
                }
                let _ = tx.send((i, Report::Ended));
            });
            log_line(&format!(
                "{label} process {i}: connections {first_id}..{} from 127.0.0.{first_source}..=127.0.0.{}",
                first_id + connections,
                first_source + sources - 1
            ));
            children.members.push(Member {
                stdin: process.stdin.take(),
                process,
                connections,
                open: false,
                ended: false,
                other_pokes: None,
            });
            first_id += connections;
            first_source += sources;
        }
        Ok(children)
    }

    /// Every child reported its connections open.
    fn all_open(&self) -> bool {
        self.members.iter().all(|m| m.open)
    }

    /// Takes reports until `done` holds (true) or `deadline` passes (false); a child's
    /// failure is the error. A deadline already past still takes the reports waiting.
    fn wait(&mut self, deadline: Instant, done: impl Fn(&Self) -> bool) -> Result<bool, String> {
        loop {
            if done(self) {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.reports.recv_timeout(left) {
                Ok((i, report)) => self.take(i, report)?,
                // Disconnected: every child's stdout ended, and each end was taken.
                Err(_) => return Ok(done(self)),
            }
        }
    }

    /// Applies one report of child `i`.
    fn take(&mut self, i: usize, report: Report) -> Result<(), String> {
        let m = &mut self.members[i];
        match report {
            Report::Line(line) => match line.split_once(' ') {
                Some(("open", n)) if n.parse() == Ok(m.connections) => m.open = true,
                Some(("error", e)) => return Err(format!("process {i}: {e}")),
                Some(("done", pokes)) if m.stdin.is_none() => {
                    m.other_pokes = Some(pokes.parse().map_err(|_| format!("process {i}: {line}"))?)
                }
                _ => return Err(format!("process {i} said {line:?}")),
            },
            Report::Ended => {
                m.ended = true;
                if m.other_pokes.is_none() {
                    let status = exit_status(&mut m.process, EXIT_TIMEOUT);
                    return Err(format!("process {i} ended early ({})", describe(status)));
                }
            }
        }
        Ok(())
    }

    /// Tells every child to close its connections (its stdin ends), waits for each to
    /// report `done` and exit; returns the pokes they ignored.
    fn close(&mut self) -> Result<u64, String> {
        for m in &mut self.members {
            m.stdin = None;
        }
        if !self.wait(Instant::now() + EXIT_TIMEOUT, |c| c.members.iter().all(|m| m.ended))? {
            return Err(format!("not every process exited within {EXIT_TIMEOUT:?} of being told"));
        }
        let mut pokes = 0;
        for (i, m) in self.members.iter_mut().enumerate() {
            let status = exit_status(&mut m.process, EXIT_TIMEOUT);
            if !status.is_some_and(|s| s.success()) {
                return Err(format!("process {i} {}", describe(status)));
            }
            pokes += m.other_pokes.unwrap_or(0);
        }
        Ok(pokes)
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Ok(None) = m.process.try_wait() {
                let _ = m.process.kill();
            }
            let _ = m.process.wait();
        }
    }
}

/// The child's exit status, waiting at most `within` for it.
fn exit_status(process: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        match process.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

/// How a child ended, for an error message.
fn describe(status: Option<ExitStatus>) -> String {
    match status {
        Some(s) => format!("exited with {s}"),
        None => format!("still running {EXIT_TIMEOUT:?} after its output ended"),
    }
}

/// A child's life: open its share, say so, hold the connections until stdin ends.
pub fn child(a: &RunArgs, index: usize) -> ExitCode {
    let label = format!("[{} idle, process {index}]", a.server);
    match hold(a, &label) {
        Ok(other_pokes) => {
            report(&format!("done {other_pokes}"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            log_line(&format!("{label} FAILED: {e}"));
            report(&format!("error {}", e.replace('\n', " ")));
            ExitCode::FAILURE
        }
    }
}

/// Writes one report line to the parent. A parent that is gone has no use for it.
fn report(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Opens the connections, reports them, and answers keepalives until stdin ends; returns
/// the pokes ignored.
fn hold(a: &RunArgs, label: &str) -> Result<u64, String> {
    let tag = a.tag.as_deref().ok_or("a child process needs --tag")?;
    let stdin_ended = watch_stdin();
    let mut client = Client::new(target(a)?)?;
    let mut wl = Idle::new(a.app(), Names::new(tag), a.connections, a.id_offset);
    let limit = open_limit(a.connections * a.processes);
    open_all(&mut client, &mut wl, a.connections, a.connect_concurrency, limit, label)?;
    report(&format!("open {}", a.connections));
    while !stdin_ended.load(Ordering::Relaxed) {
        client.run_until(Instant::now() + STDIN_POLL, &mut wl)?;
    }
    Ok(wl.other_pokes)
}

/// A flag raised when stdin ends: the parent closed it, or died. The parent never
/// writes to it, so a thread can block reading it.
fn watch_stdin() -> Arc<AtomicBool> {
    let ended = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&ended);
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok(1..) = std::io::stdin().read(&mut buf) {}
        flag.store(true, Ordering::Relaxed);
    });
    ended
}
