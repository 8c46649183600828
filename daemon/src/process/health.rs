//! The supervisor's health checks of the upstreams (upstream mode; what they mean:
//! [`crate::upstream::health`]).
//!
//! One thread of the supervisor checks every upstream each `upstream.health_interval_ms`, all
//! of them at once (one short-lived thread per check, so a slow upstream delays no other),
//! with blocking sockets bounded by `upstream.health_timeout_ms`. When a state changes it
//! wakes the supervisor's poll through a pipe, and the supervisor tells every worker
//! ([`crate::process::control::Message::Health`]) and writes the state into `/metrics`.
//!
//! A thread, not a process of its own: the checks are a few sockets every interval, the
//! state they feed lives in the supervisor (which tells respawned workers), and the
//! supervisor starts children with fork+exec from its main thread, which a second thread does
//! not make unsafe. It never touches the supervisor's children or descriptors but its pipe.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::UpstreamConfig;
use crate::upstream::health::{self, Health};
use crate::upstream::{Target, Upstreams};

/// What the thread and the supervisor share.
struct State {
    /// The upstreams in list order, each with its damped state.
    upstreams: Vec<(Target, Health)>,
    /// The settings of the current configuration.
    settings: UpstreamConfig,
    /// Set on drop: the thread ends after its current round.
    stop: bool,
}

/// The health checks, owned by the supervisor.
pub struct Checker {
    state: Arc<(Mutex<State>, Condvar)>,
    /// Readable when a state changed since the last [`Checker::take_change`].
    wake: OwnedFd,
}

impl Checker {
    /// Starts checking the upstreams of `config` (every one starts up). `None` when there
    /// is nothing to check: embedded mode, or `health_interval_ms = 0`.
    pub fn start(config: &UpstreamConfig) -> Result<Option<Checker>, String> {
        if config.urls.is_empty() || config.health_interval_ms == 0 {
            return Ok(None);
        }
        let (wake, poke) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(|e| format!("health check pipe: {e}"))?;
        let state = Arc::new((
            Mutex::new(State {
                upstreams: targets(config, &[])?,
                settings: config.clone(),
                stop: false,
            }),
            Condvar::new(),
        ));
        let shared = Arc::clone(&state);
        std::thread::Builder::new()
            .name("health".into())
            .spawn(move || run(&shared, poke))
            .map_err(|e| format!("health check thread: {e}"))?;
        Ok(Some(Checker { state, wake }))
    }

    /// The descriptor the supervisor polls: readable after a change.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// Empties the wake pipe (after the poll found it readable).
    pub fn take_change(&self) {
        let mut buf = [0u8; 64];
        while matches!(nix::unistd::read(&self.wake, &mut buf), Ok(n) if n > 0) {}
    }

    /// Every upstream in list order, and whether it is up now.
    pub fn states(&self) -> Vec<(String, bool)> {
        let state = lock(&self.state.0);
        state.upstreams.iter().map(|(t, h)| (t.url.clone(), h.is_up())).collect()
    }

    /// The URLs of the upstreams that are down now.
    pub fn down(&self) -> Vec<String> {
        self.states().into_iter().filter(|(_, up)| !up).map(|(url, _)| url).collect()
    }

    /// A reload: the new list and settings. An upstream that stays keeps its state; a new
    /// one starts up. The next round starts at once.
    pub fn retarget(&self, config: &UpstreamConfig) -> Result<(), String> {
        let mut state = lock(&self.state.0);
        state.upstreams = targets(config, &state.upstreams)?;
        state.settings = config.clone();
        self.state.1.notify_all();
        Ok(())
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        lock(&self.state.0).stop = true;
        self.state.1.notify_all();
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The list of `config`, each upstream with its state in `before` if it was there.
fn targets(
    config: &UpstreamConfig,
    before: &[(Target, Health)],
) -> Result<Vec<(Target, Health)>, String> {
    let list = Upstreams::parse(&config.urls)?;
    Ok(list
        .targets()
        .iter()
        .map(|t| {
            let kept = before.iter().find(|(b, _)| b.url == t.url).map(|(_, h)| *h);
            (t.clone(), kept.unwrap_or_else(|| Health::new(config.health_rise, config.health_fall)))
        })
        .collect())
}

/// The thread: a round of checks, then wait for the next (or for a reload or the end).
fn run(shared: &(Mutex<State>, Condvar), poke: OwnedFd) {
    loop {
        let (targets, settings) = {
            let state = lock(&shared.0);
            if state.stop {
                return;
            }
            let targets: Vec<Target> = state.upstreams.iter().map(|(t, _)| t.clone()).collect();
            (targets, state.settings.clone())
        };
        let started = Instant::now();
        let timeout = Duration::from_millis(settings.health_timeout_ms);
        let results: Vec<Result<(), String>> = std::thread::scope(|scope| {
            let checks: Vec<_> = targets
                .iter()
                .map(|t| scope.spawn(|| check(t, &settings.health_path, timeout)))
                .collect();
            checks
                .into_iter()
                .map(|c| c.join().unwrap_or_else(|_| Err("the check panicked".into())))
                .collect()
        });
        let mut state = lock(&shared.0);
        let mut changed = false;
        for (target, result) in targets.iter().zip(&results) {
            // A reload during the round may have dropped or replaced this upstream.
            let Some((_, h)) = state.upstreams.iter_mut().find(|(t, _)| t.url == target.url) else {
                continue;
            };
            match (h.record(result.is_ok()), result) {
                (Some(false), Err(why)) => {
                    log::warn!(
                        "upstream down url={} after {} failed checks: {why}",
                        target.url,
                        settings.health_fall
                    );
                    changed = true;
                }
                (Some(true), _) => {
                    log::info!(
                        "upstream up url={} after {} passed checks",
                        target.url,
                        settings.health_rise
                    );
                    changed = true;
                }
                (None, Err(why)) => log::debug!("upstream check failed url={}: {why}", target.url),
                _ => {}
            }
        }
        if changed {
            // Non-blocking: a full pipe already says "changed".
            let _ = nix::unistd::write(&poke, b"!");
        }
        let next = started + Duration::from_millis(state.settings.health_interval_ms);
        let wait = next.saturating_duration_since(Instant::now());
        let (state, _) = shared.1.wait_timeout(state, wait).unwrap_or_else(PoisonError::into_inner);
        if state.stop {
            return;
        }
    }
}

/// One check: connect, ask for `path`, read the status line, all within `timeout`. Also
/// `syncgate healthcheck`'s check of the daemon itself ([`crate::healthcheck`]).
pub fn check(target: &Target, path: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("no answer within {} ms", timeout.as_millis()))
    };
    let mut stream = TcpStream::connect_timeout(&target.addr, timeout)
        .map_err(|e| format!("connect to {}: {e}", target.addr))?;
    stream.set_write_timeout(Some(left()?)).map_err(|e| e.to_string())?;
    stream.write_all(&health::request(target, path)).map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    loop {
        stream.set_read_timeout(Some(left()?)).map_err(|e| e.to_string())?;
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!("no answer within {} ms", timeout.as_millis()))
            }
            Err(e) => return Err(format!("read: {e}")),
        };
        if n == 0 {
            return Err("closed without answering".into());
        }
        answer.extend_from_slice(&buf[..n]);
        if let Some(result) = health::answer(&answer) {
            return result;
        }
    }
}
