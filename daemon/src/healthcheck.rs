//! `syncgate healthcheck`: the daemon's health asked from its own host, for a container's
//! `HEALTHCHECK` (packaging/container/Dockerfile), where the slim image has no HTTP client:
//! `GET /keepalive` at the configured `listen` address, the check the supervisor runs
//! against upstreams ([`crate::process::health::check`]), so a 2xx passes.
//!
//! It reads the configuration as `syncgate run` does (file, then `SYNCGATE_*`), so a port
//! changed in the environment moves the check with it. It checks `listen`, not a socket
//! passed by socket activation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::process::health;
use crate::upstream::Target;

/// The route checked: the listener answers it with 200 once it serves.
pub const PATH: &str = "/keepalive";

/// Where to reach a daemon listening on `listen` from the same host: the address itself, or
/// loopback for a wildcard. `[::]` takes IPv4 too (the daemon binds it dual-stack), so IPv4
/// loopback is tried after `[::1]`, which a container without IPv6 lacks.
pub fn addresses(listen: SocketAddr) -> Vec<SocketAddr> {
    let port = listen.port();
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => vec![(Ipv4Addr::LOCALHOST, port).into()],
        IpAddr::V6(ip) if ip.is_unspecified() => {
            vec![(Ipv6Addr::LOCALHOST, port).into(), (Ipv4Addr::LOCALHOST, port).into()]
        }
        _ => vec![listen],
    }
}

/// Checks the daemon `config` describes, within `timeout` in all; `Ok` names the address that
/// answered, `Err` says why each address failed.
pub fn check(config: &Config, timeout: Duration) -> Result<SocketAddr, String> {
    let listen = config.listen_addr()?;
    let deadline = Instant::now() + timeout;
    let mut failures = Vec::new();
    for addr in addresses(listen) {
        let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
        else {
            failures.push(format!("{addr}: no time left"));
            break;
        };
        let target = Target::parse(&format!("ws://{addr}"))?;
        match health::check(&target, PATH, left) {
            Ok(()) => return Ok(addr),
            Err(e) => failures.push(format!("{addr}: {e}")),
        }
    }
    Err(format!("GET {PATH}: {}", failures.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    #[test]
    fn wildcards_are_asked_on_loopback() {
        let at = |s: &str| addresses(s.parse().unwrap());
        assert_eq!(at("0.0.0.0:4848"), ["127.0.0.1:4848".parse().unwrap()]);
        assert_eq!(
            at("[::]:4848"),
            ["[::1]:4848".parse().unwrap(), "127.0.0.1:4848".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(at("10.1.2.3:80"), ["10.1.2.3:80".parse().unwrap()]);
        assert_eq!(at("[2001:db8::1]:4848"), ["[2001:db8::1]:4848".parse().unwrap()]);
    }

    /// A server that answers one request with `answer` and hands back the request it read.
    fn serve_once(answer: &'static [u8]) -> (SocketAddr, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 512];
            while !request.ends_with(b"\r\n\r\n") {
                let n = stream.read(&mut buf).unwrap();
                assert!(n > 0, "closed before the end of the request");
                request.extend_from_slice(&buf[..n]);
            }
            stream.write_all(answer).unwrap();
            String::from_utf8(request).unwrap()
        });
        (addr, server)
    }

    fn config(listen: SocketAddr) -> Config {
        Config { listen: listen.to_string(), ..Config::default() }
    }

    #[test]
    fn a_200_passes_and_the_request_is_get_keepalive() {
        let (addr, server) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK");
        assert_eq!(check(&config(addr), Duration::from_secs(5)), Ok(addr));
        let request = server.join().unwrap();
        assert!(request.starts_with("GET /keepalive HTTP/1.1\r\n"), "{request}");
    }

    #[test]
    fn another_status_fails() {
        let (addr, server) = serve_once(b"HTTP/1.1 503 Service Unavailable\r\n\r\n");
        let err = check(&config(addr), Duration::from_secs(5)).unwrap_err();
        assert!(err.contains("503"), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn nobody_listening_fails() {
        // A port that was free a moment ago: nothing listens there now.
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let err = check(&config(addr), Duration::from_secs(5)).unwrap_err();
        assert!(err.contains(&addr.to_string()), "{err}");
    }

    #[test]
    fn silence_fails_within_the_timeout() {
        // Accepted by the kernel (backlog), never answered.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Instant::now();
        let err = check(&config(addr), Duration::from_millis(300)).unwrap_err();
        assert!(err.contains("no answer within"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    }
}
