//! Health of the upstreams, sans-IO: the check's HTTP request, the reading of its answer, and
//! the damped up/down state of each upstream.
//!
//! The supervisor checks every upstream every `upstream.health_interval_ms`
//! (`process::health` does the I/O) and tells every worker which ones are down; a worker
//! sends new sockets only to upstreams that are up ([`super::Upstreams::choose`]) and closes
//! its relays to one that goes down. One place checks, so the workers agree, and the result
//! does not depend on which worker a group's sockets land on.
//!
//! The check is zero-cache's own load-balancer check, `GET /keepalive` by default
//! (`upstream.health_path`): any 2xx is a pass; another status, no answer within
//! `upstream.health_timeout_ms`, a refused or reset connection is a failure. zero-cache
//! refuses connections until it is fully started and closes its listener at once on SIGTERM
//! (measured with 1.9.0), so a starting or stopping zero-cache fails its checks.

use super::Target;

/// The most bytes of an answer a check reads: a status line fits many times over.
pub const MAX_ANSWER: usize = 1024;

/// The check's request: `GET <path>` with the upstream's `Host`, closed after the answer.
pub fn request(target: &Target, path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: syncgate-health\r\nConnection: close\r\n\r\n",
        target.host
    )
    .into_bytes()
}

/// What the answer read so far says: `None` while the status line is incomplete, then
/// `Ok(())` for a 2xx status and `Err(why)` for anything else.
pub fn answer(bytes: &[u8]) -> Option<Result<(), String>> {
    let Some(end) = bytes.windows(2).position(|w| w == b"\r\n") else {
        return (bytes.len() >= MAX_ANSWER).then(|| Err("no status line".into()));
    };
    let line = String::from_utf8_lossy(&bytes[..end]);
    let mut parts = line.splitn(3, ' ');
    let (version, status) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    Some(match (version.starts_with("HTTP/1."), status.parse::<u16>()) {
        (true, Ok(code)) if (200..300).contains(&code) => Ok(()),
        (true, Ok(_)) => Err(format!("answered {}", line.trim())),
        _ => Err(format!("not an HTTP answer: {:?}", line.chars().take(80).collect::<String>())),
    })
}

/// One upstream's state, damped against flapping: `fall` failures in a row take an upstream
/// that is up down, `rise` passes in a row bring it back. An upstream starts up: a daemon
/// that just started (or reloaded with a new upstream) serves at once rather than refusing
/// every socket for `rise` intervals, and the first failures take a dead one out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    /// What new connections see.
    up: bool,
    /// Consecutive results that disagree with `up`.
    streak: u32,
    /// Passes in a row that bring a down upstream back.
    rise: u32,
    /// Failures in a row that take an up upstream down.
    fall: u32,
}

impl Health {
    pub fn new(rise: u32, fall: u32) -> Health {
        Health { up: true, streak: 0, rise: rise.max(1), fall: fall.max(1) }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Counts one check; returns the new state when it changed.
    pub fn record(&mut self, passed: bool) -> Option<bool> {
        if passed == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { self.fall } else { self.rise };
        if self.streak < needed {
            return None;
        }
        self.up = passed;
        self.streak = 0;
        Some(passed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_names_the_path_and_the_upstreams_host() {
        let t = Target::parse("ws://127.0.0.1:4848/zero").unwrap();
        let r = String::from_utf8(request(&t, "/keepalive")).unwrap();
        assert!(r.starts_with("GET /keepalive HTTP/1.1\r\nHost: 127.0.0.1:4848\r\n"), "{r}");
        assert!(r.ends_with("Connection: close\r\n\r\n"));
    }

    #[test]
    fn a_2xx_status_passes_and_anything_else_fails() {
        assert_eq!(answer(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain"), Some(Ok(())));
        assert_eq!(answer(b"HTTP/1.0 204 No Content\r\n"), Some(Ok(())));
        assert_eq!(answer(b"HTTP/1.1 200 O"), None, "incomplete status line");
        assert_eq!(answer(b""), None);
        let e = answer(b"HTTP/1.1 503 Service Unavailable\r\n").unwrap().unwrap_err();
        assert!(e.contains("503"), "{e}");
        assert!(answer(b"SSH-2.0-OpenSSH\r\n").unwrap().is_err());
        assert!(answer(b"HTTP/1.1 abc\r\n").unwrap().is_err());
        assert!(answer(&[b'x'; MAX_ANSWER]).unwrap().is_err(), "no line within the bound");
    }

    #[test]
    fn a_state_changes_only_after_enough_results_in_a_row() {
        let mut h = Health::new(2, 3);
        assert!(h.is_up(), "starts up");
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None, "a pass resets the streak of failures");
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), Some(false), "third failure in a row: down");
        assert!(!h.is_up());
        assert_eq!(h.record(false), None, "already down");
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(false), None, "a failure resets the streak of passes");
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), Some(true), "second pass in a row: up");
        assert!(h.is_up());
    }

    #[test]
    fn flapping_every_other_check_never_changes_the_state() {
        let mut h = Health::new(2, 2);
        for i in 0..100 {
            assert_eq!(h.record(i % 2 == 0), None);
        }
        assert!(h.is_up());
    }

    #[test]
    fn rise_and_fall_of_one_follow_every_result() {
        let mut h = Health::new(0, 1);
        assert_eq!(h.record(false), Some(false));
        assert_eq!(h.record(true), Some(true), "rise 0 counts as 1");
    }
}
