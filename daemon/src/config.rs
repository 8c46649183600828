//! Configuration: embedded defaults, an optional TOML file, then `SYNCGATE_*` environment
//! variables, in that order of precedence (the environment wins).
//!
//! Every key of the file can be set from the environment: `SYNCGATE_` plus the key in upper
//! case with dots and dashes turned into underscores (`auth.secret` -> `SYNCGATE_AUTH_SECRET`).
//! Key names are a contract with operators' scripts (README, "Configuration"): never renamed.
//!
//! The supervisor resolves the configuration once and hands the resolved result to its children
//! (as TOML in an environment variable), so every process runs with exactly the same settings
//! even if the file changes underneath them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::gate::auth::AuthConfig;
use crate::ws::deflate::CompressionConfig;

/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_PATH_ENV: &str = "SYNCGATE_CONFIG";
/// Environment variable through which the supervisor passes the resolved config to children.
/// Not meant for operators: it carries the whole, already validated, configuration.
pub const RESOLVED_ENV: &str = "SYNCGATE_INTERNAL_RESOLVED_CONFIG";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address and port to listen on; `[::]` also accepts IPv4 (dual-stack socket).
    pub listen: String,
    /// Number of worker processes; 0 means one per core minus the listener's, at least 1.
    pub workers: usize,
    /// Prefix of the routing hash. Empty means a random id per daemon start, which is what a
    /// single daemon wants; a fleet behind one balancer sets the same value everywhere.
    pub task_id: String,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub log_level: String,
    /// How long a graceful shutdown waits for clients to answer their close frames.
    pub drain_timeout_ms: u64,
    /// Transparent huge pages for the daemon's heap (where the kernel's THP mode is `madvise`
    /// or `always`). Off by default, for what a sync gateway mostly holds, idle connections:
    /// about 10 MB less resident memory per worker (100k idle connections over 10 workers:
    /// 127 MiB in all instead of 231), and RSS that grows with the connections' data
    /// (`syncgate_heap_bytes`) instead of in 2 MiB pages. On: 6-18% less CPU per message for
    /// 16 KiB messages; for 512 B messages and pings the difference was within the noise.
    /// Measured in bench/RESULTS.md (2026-11-28 16:49 and 2026-12-04). Set at start; a
    /// reload keeps it.
    pub huge_pages: bool,
    /// `[io]`: which backend moves the bytes.
    pub io: IoConfig,
    pub auth: AuthConfig,
    pub limits: Limits,
    pub keepalive: Keepalive,
    /// permessage-deflate (`[compression]`, see [`crate::ws::deflate`]).
    pub compression: CompressionConfig,
    pub storage: Storage,
    /// The front door: the zero-caches to relay to (`[upstream]`, see [`crate::upstream`]).
    pub upstream: UpstreamConfig,
    pub conformance: Conformance,
}

/// `[io]`: the backend under every process's event loop (see [`crate::ring`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IoConfig {
    /// `auto`, `io_uring` or `epoll`. `auto`: io_uring where the kernel and its policy allow
    /// it (the supervisor tries once, at start), else epoll with one warning line naming
    /// why; `io_uring` refuses to start without it. The supervisor passes its children the
    /// backend it resolved, so every process runs the same one. Set at start; a reload keeps
    /// it.
    pub backend: String,
}

impl Default for IoConfig {
    fn default() -> Self {
        IoConfig { backend: "auto".into() }
    }
}

/// `[upstream]`: with `urls` set, syncgate stands in front of zero-cache instead of serving
/// its embedded workload (README, "In front of zero-cache").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// zero-cache base URLs (`ws://host:port[/base]`); empty: embedded mode. Names are
    /// resolved at start and at each reload.
    pub urls: Vec<String>,
    /// How long the TCP connect and the upgrade to an upstream may take before the client is
    /// told to back off.
    pub connect_timeout_ms: u64,
    /// Upstream connects in progress per worker; clients beyond it are told to back off, so
    /// a burst of admissions cannot open unbounded sockets against a slow upstream.
    pub max_connecting: usize,
    /// How often the supervisor checks each upstream (`upstream::health`); 0: no checks,
    /// every upstream counts as up.
    pub health_interval_ms: u64,
    /// How long one check may take, connect to status line; past it the check failed.
    pub health_timeout_ms: u64,
    /// What a check asks for: zero-cache's load-balancer check.
    pub health_path: String,
    /// Passes in a row that bring a down upstream back.
    pub health_rise: u32,
    /// Failures in a row that take an up upstream down.
    pub health_fall: u32,
    /// The `userID` zero-cache is told for a socket without a token, in place of whatever the
    /// client named; unset: the client's, as it sent it. zero-cache 1.9 admits a tokenless
    /// socket that names the user its client group is pinned to, and syncgate's own pin only
    /// covers the groups it has seen: with this set, a tokenless socket can name no user at
    /// zero-cache, so none can join or displace a signed-in user's group even through another
    /// node (README, "Several syncgate nodes").
    pub anonymous_user_id: Option<String>,
}

/// The most upstreams one list may hold: each has its cells in the metrics table.
pub const MAX_UPSTREAMS: usize = 32;

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            urls: Vec::new(),
            connect_timeout_ms: 5_000,
            max_connecting: 256,
            // A dead zero-cache is out after two failed checks, within about 4 s (the
            // clients' backoff is 0.5-5 s); one slow answer does not take it out.
            health_interval_ms: 2_000,
            health_timeout_ms: 1_000,
            health_path: "/keepalive".into(),
            health_rise: 2,
            health_fall: 2,
            anonymous_user_id: None,
        }
    }
}

impl UpstreamConfig {
    fn validate(&self) -> Result<(), String> {
        crate::upstream::Upstreams::parse(&self.urls).map_err(|e| format!("upstream.urls: {e}"))?;
        if self.urls.len() > MAX_UPSTREAMS {
            return Err(format!("upstream.urls: at most {MAX_UPSTREAMS} upstreams"));
        }
        if self.health_interval_ms > 0 {
            if self.health_timeout_ms == 0 || self.health_timeout_ms >= self.health_interval_ms {
                return Err("upstream.health_timeout_ms must be between 1 and \
                            upstream.health_interval_ms - 1"
                    .into());
            }
            if !(1..=100).contains(&self.health_rise) || !(1..=100).contains(&self.health_fall) {
                return Err("upstream.health_rise and upstream.health_fall must be 1 to 100".into());
            }
        }
        if let Some(user) = &self.anonymous_user_id {
            if user.len() > crate::protocol::route::MAX_PARAM_BYTES {
                return Err(format!(
                    "upstream.anonymous_user_id: longer than {} bytes",
                    crate::protocol::route::MAX_PARAM_BYTES
                ));
            }
        }
        let path = &self.health_path;
        if !path.starts_with('/')
            || path.len() > 256
            || path.bytes().any(|b| b <= b' ' || b >= 0x7f)
        {
            return Err(format!(
                "upstream.health_path: {path:?} is not an absolute path of visible ASCII"
            ));
        }
        Ok(())
    }
}

/// Test-only routes. Never enable them in production.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Conformance {
    /// Serves `/echo`: a plain WebSocket echo through the real listener, handoff, worker and
    /// codec, without the sync protocol, for Autobahn|Testsuite.
    pub echo: bool,
}

/// The limits of docs/SECURITY.md's limits table ("What else a hostile client gets").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Connection attempts allowed per client address (IPv6 by /64) per window.
    pub connect_per_ip: u32,
    /// Addresses the per-address limiter tracks; its memory is fixed by this (40 bytes each).
    pub limiter_capacity: usize,
    /// Proxies (CIDR or address) whose `X-Forwarded-For` is believed; nobody else's is.
    pub trusted_proxies: Vec<String>,
    /// Requests being read or answered at once, in all; past it new sockets get 503.
    pub max_handshakes: usize,
    /// The same per client address, so one slow-loris source cannot take the whole pool.
    pub max_handshakes_per_ip: usize,
    /// WebSocket connections open in all workers; 0 derives it from RLIMIT_NOFILE (see
    /// [`Config::connection_cap`]).
    pub max_connections: usize,
    /// The sliding window of `connect_per_ip`.
    pub connect_window_ms: u64,
    /// Largest inbound message, after inflation (close 1009 beyond).
    pub max_message_bytes: usize,
    /// Most fragments one message may arrive in (close 1008 beyond).
    pub max_fragments: usize,
    /// Time a client has to send its whole request head.
    pub head_timeout_ms: u64,
    /// Largest request head; the Zero header alone can be 8 KiB.
    pub max_head_bytes: usize,
    /// Most header lines in a request head.
    pub max_headers: usize,
    /// Connections one client group may have open at once.
    pub max_group_connections: usize,
    /// Connection attempts per clientID per window.
    pub connect_per_client: u32,
    /// The sliding window of `connect_per_client`.
    pub connect_per_client_window_ms: u64,
    /// Outbound bytes a connection may have queued before it counts as a stuck consumer.
    pub max_outbound_bytes: usize,
    /// How long a consumer may stay stuck over `max_outbound_bytes` before it is closed (1008).
    pub slow_consumer_ms: u64,
    /// Mutations per user per client group per window; 0 turns the limit off.
    pub per_user_mutations: u32,
    /// The sliding window of `per_user_mutations`.
    pub per_user_mutations_window_ms: u64,
    /// Rows one client group may hold; a mutation that would pass it fails (`MutationFailed`).
    pub group_max_rows: usize,
    /// Bytes of row data one client group may hold (table, key and JSON of each row): bounds
    /// a worker's memory per group and the first poke of a new client.
    pub group_max_row_bytes: usize,
    /// Changes a group keeps for catch-up (in memory and on disk); a client whose cookie is
    /// older must resync from nothing.
    pub group_history: usize,
    /// Bytes of changes a group keeps for catch-up; the oldest go first.
    pub group_history_bytes: usize,
    /// Clients a group remembers (last mutation IDs, desired queries), so that made-up client
    /// IDs cannot grow it without bound.
    pub group_max_clients: usize,
    /// Desired queries one client may have.
    pub group_max_queries_per_client: usize,
}

impl Limits {
    /// The bounds of a client group's data, for its replica.
    pub fn group(&self) -> crate::sync::replica::GroupLimits {
        crate::sync::replica::GroupLimits {
            max_rows: self.group_max_rows,
            max_row_bytes: self.group_max_row_bytes,
            max_history: self.group_history,
            max_history_bytes: self.group_history_bytes,
            max_clients: self.group_max_clients,
            max_queries_per_client: self.group_max_queries_per_client,
        }
    }
}

/// Keepalive timers (docs/PROTOCOL.md, "Keepalive").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Keepalive {
    /// Send an unsolicited `["pong",{}]` when nothing was sent for this long.
    pub idle_send_ms: u64,
    /// How often that idleness is checked.
    pub check_ms: u64,
    /// Silence from a client after which the server sends a WebSocket ping.
    pub silence_ms: u64,
    /// Time the client then has to answer before it is terminated.
    pub ping_timeout_ms: u64,
    /// Deadline of the liveness probe sent to an existing connection before a newcomer with
    /// the same clientID is refused (displacement rule 3).
    pub probe_timeout_ms: u64,
    /// How long a close frame waits for the peer's close frame before the socket is dropped.
    pub close_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Storage {
    /// Where durable client-group data lives.
    pub path: PathBuf,
    /// For tests only: the store thread sleeps this long before each commit, a disk made
    /// slow on purpose, so a test can show that the event loop does not wait for it. Zero
    /// (the default) everywhere else; read when a worker starts.
    pub test_sync_delay_ms: u64,
    /// Bytes of changes (their patches' JSON) a worker may hold waiting for a commit while
    /// the one before is still being written. Past it, pushes are refused with
    /// `ServerOverloaded` and close 1008 until the store catches up, so a disk or a SQLite
    /// lock that stalls cannot make the worker keep every push that arrives meanwhile in
    /// memory; the refused mutations were not applied and the client sends them again when
    /// it reconnects. Read when a worker starts.
    pub max_pending_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "[::]:4848".into(),
            workers: 0,
            task_id: String::new(),
            log_level: "info".into(),
            drain_timeout_ms: 10_000,
            huge_pages: false,
            io: IoConfig::default(),
            auth: AuthConfig::default(),
            limits: Limits::default(),
            keepalive: Keepalive::default(),
            compression: CompressionConfig::default(),
            storage: Storage::default(),
            upstream: UpstreamConfig::default(),
            conformance: Conformance::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        let group = crate::sync::replica::GroupLimits::default();
        Limits {
            connect_per_ip: 100,
            limiter_capacity: 65_536,
            trusted_proxies: Vec::new(),
            max_handshakes: 4_096,
            max_handshakes_per_ip: 32,
            max_connections: 0,
            connect_window_ms: 60_000,
            max_message_bytes: 10 * 1024 * 1024,
            max_fragments: 131_072,
            head_timeout_ms: 10_000,
            max_head_bytes: 16 * 1024,
            max_headers: 100,
            max_group_connections: 64,
            connect_per_client: 20,
            connect_per_client_window_ms: 60_000,
            max_outbound_bytes: 4 * 1024 * 1024,
            slow_consumer_ms: 10_000,
            per_user_mutations: 0,
            per_user_mutations_window_ms: 60_000,
            // The replica's own defaults, which say why.
            group_max_rows: group.max_rows,
            group_max_row_bytes: group.max_row_bytes,
            group_history: group.max_history,
            group_history_bytes: group.max_history_bytes,
            group_max_clients: group.max_clients,
            group_max_queries_per_client: group.max_queries_per_client,
        }
    }
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            idle_send_ms: 6_000,
            check_ms: 3_000,
            silence_ms: 15_000,
            ping_timeout_ms: 5_000,
            probe_timeout_ms: 1_000,
            close_timeout_ms: 2_000,
        }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            path: PathBuf::from("/var/lib/syncgate"),
            test_sync_delay_ms: 0,
            max_pending_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Keys whose default is "unset", so they are absent from the serialised defaults but must
/// still be settable from the environment. Every one of them is a string.
const OPTIONAL_STRING_KEYS: &[&str] = &[
    "auth.secret",
    "auth.jwk",
    "auth.jwks_file",
    "auth.issuer",
    "auth.audience",
    "auth.session_cookie",
];

/// A cookie name as RFC 6265 allows it: an HTTP token.
fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl Config {
    /// Defaults, then `path` (if any), then the environment; validated.
    pub fn load(path: Option<&Path>) -> Result<Config, String> {
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
                text.parse::<toml::Table>().map_err(|e| {
                    // One line: the log is line-oriented.
                    let line = e.span().map_or(0, |sp| text[..sp.start].matches('\n').count() + 1);
                    format!("config file {} line {line}: {}", path.display(), e.message())
                })?
            }
            None => toml::Table::new(),
        };
        apply_env(&mut table, |name| std::env::var(name).ok())?;
        let origin =
            path.map_or("configuration".to_string(), |p| format!("config file {}", p.display()));
        let config = from_table(table).map_err(|e| format!("{origin}: {e}"))?;
        config.validate()?;
        Ok(config)
    }

    /// The configuration a child process was started with (see [`RESOLVED_ENV`]).
    pub fn from_resolved(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| format!("resolved config: {e}"))
    }

    pub fn to_resolved(&self) -> String {
        toml::to_string(self).expect("config serialises")
    }

    /// Checks that hold across keys; a config that passes runs.
    pub fn validate(&self) -> Result<(), String> {
        self.listen_addr()?;
        if log_level(&self.log_level).is_none() {
            return Err(format!(
                "log_level: {:?} is not one of error, warn, info, debug, trace",
                self.log_level
            ));
        }
        if !matches!(self.io.backend.as_str(), "auto" | "io_uring" | "epoll") {
            return Err(format!(
                "io.backend: {:?} is not one of auto, io_uring, epoll",
                self.io.backend
            ));
        }
        if self.workers > MAX_WORKERS {
            return Err(format!("workers: {} is over the maximum of {MAX_WORKERS}", self.workers));
        }
        let l = &self.limits;
        let positive = [
            ("limits.connect_per_ip", l.connect_per_ip as u64),
            ("limits.connect_window_ms", l.connect_window_ms),
            ("limits.limiter_capacity", l.limiter_capacity as u64),
            ("limits.max_handshakes", l.max_handshakes as u64),
            ("limits.max_handshakes_per_ip", l.max_handshakes_per_ip as u64),
            ("limits.max_message_bytes", l.max_message_bytes as u64),
            ("limits.max_fragments", l.max_fragments as u64),
            ("limits.head_timeout_ms", l.head_timeout_ms),
            ("limits.max_headers", l.max_headers as u64),
            ("limits.max_group_connections", l.max_group_connections as u64),
            ("limits.connect_per_client", l.connect_per_client as u64),
            ("limits.connect_per_client_window_ms", l.connect_per_client_window_ms),
            ("limits.max_outbound_bytes", l.max_outbound_bytes as u64),
            ("limits.slow_consumer_ms", l.slow_consumer_ms),
            ("limits.per_user_mutations_window_ms", l.per_user_mutations_window_ms),
            ("limits.group_max_rows", l.group_max_rows as u64),
            ("limits.group_max_row_bytes", l.group_max_row_bytes as u64),
            ("limits.group_history", l.group_history as u64),
            ("limits.group_history_bytes", l.group_history_bytes as u64),
            ("limits.group_max_clients", l.group_max_clients as u64),
            ("limits.group_max_queries_per_client", l.group_max_queries_per_client as u64),
            ("keepalive.idle_send_ms", self.keepalive.idle_send_ms),
            ("keepalive.check_ms", self.keepalive.check_ms),
            ("keepalive.silence_ms", self.keepalive.silence_ms),
            ("keepalive.ping_timeout_ms", self.keepalive.ping_timeout_ms),
            ("keepalive.probe_timeout_ms", self.keepalive.probe_timeout_ms),
            ("keepalive.close_timeout_ms", self.keepalive.close_timeout_ms),
            ("drain_timeout_ms", self.drain_timeout_ms),
            ("upstream.connect_timeout_ms", self.upstream.connect_timeout_ms),
            ("upstream.max_connecting", self.upstream.max_connecting as u64),
            ("storage.max_pending_bytes", self.storage.max_pending_bytes as u64),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be greater than 0"));
        }
        // A connection's timers count milliseconds in 32 bits (`connection::Tick`).
        let max = u64::from(crate::ws::connection::MAX_TIMEOUT_MS);
        let connection_timers = [
            ("keepalive.idle_send_ms", self.keepalive.idle_send_ms),
            ("keepalive.silence_ms", self.keepalive.silence_ms),
            ("keepalive.ping_timeout_ms", self.keepalive.ping_timeout_ms),
            ("keepalive.probe_timeout_ms", self.keepalive.probe_timeout_ms),
            ("keepalive.close_timeout_ms", self.keepalive.close_timeout_ms),
            ("limits.slow_consumer_ms", l.slow_consumer_ms),
        ];
        if let Some((name, _)) = connection_timers.iter().find(|(_, v)| *v > max) {
            return Err(format!("{name} must be at most {max} (about 24.8 days)"));
        }
        // The head must fit the Zero client's own request: its protocol header alone can be
        // 8 KiB, so a smaller cap would refuse real clients.
        if l.max_head_bytes < MIN_HEAD_BYTES || l.max_head_bytes > MAX_HEAD_BYTES {
            return Err(format!(
                "limits.max_head_bytes must be between {MIN_HEAD_BYTES} and {MAX_HEAD_BYTES}"
            ));
        }
        crate::gate::proxies::TrustedProxies::parse(&l.trusted_proxies)
            .map_err(|e| format!("limits.trusted_proxies: {e}"))?;
        crate::gate::auth::Verifier::new(&self.auth).map_err(|e| format!("auth: {e}"))?;
        self.compression.validate().map_err(|e| format!("compression: {e}"))?;
        self.upstream.validate()?;
        if self.auth.session_cookie.as_deref().is_some_and(|c| !is_cookie_name(c)) {
            return Err("auth.session_cookie: not a cookie name (RFC 6265 token)".into());
        }
        Ok(())
    }

    /// What a valid configuration does that its operator most likely did not mean. The
    /// supervisor logs each at start and at every reload; `check-config` prints them.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let a = &self.auth;
        let keys = a.secret.is_some() || a.jwk.is_some() || a.jwks_file.is_some();
        if !self.upstream.urls.is_empty() && !keys {
            out.push(
                "upstream mode without auth keys (auth.secret, auth.jwk or auth.jwks_file): \
                 the edge verifies no token, so every socket is anonymous to its rules and no \
                 client group is pinned to a verified user; give it zero-cache's keys"
                    .to_string(),
            );
        }
        out
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        self.listen.parse().map_err(|_| format!("listen: {:?} is not an address:port", self.listen))
    }

    /// The worker count with 0 resolved against the machine's cores.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.saturating_sub(1).max(1)
    }

    /// The global connection cap: configured, or what the workers can hold together (see
    /// [`worker_connection_cap`]; every process has the same RLIMIT_NOFILE).
    pub fn connection_cap(&self) -> usize {
        if self.limits.max_connections > 0 {
            return self.limits.max_connections;
        }
        self.worker_count().saturating_mul(worker_connection_cap())
    }

    /// The backend a child process runs: the supervisor resolved `auto` before passing the
    /// configuration on (an unresolved `auto` here means io_uring).
    pub fn io_backend(&self) -> crate::ring::Backend {
        match self.io.backend.as_str() {
            "epoll" => crate::ring::Backend::Epoll,
            _ => crate::ring::Backend::IoUring,
        }
    }

    pub fn level(&self) -> log::LevelFilter {
        log_level(&self.log_level).unwrap_or(log::LevelFilter::Info)
    }
}

impl Keepalive {
    /// The period of a process's timer tick: fine enough for the shortest keepalive deadline,
    /// coarse enough that an idle worker barely wakes.
    pub fn tick(&self) -> Duration {
        let shortest =
            [self.check_ms, self.ping_timeout_ms, self.probe_timeout_ms, self.close_timeout_ms]
                .into_iter()
                .min()
                .unwrap_or(1000);
        Duration::from_millis((shortest / 4).clamp(5, 500))
    }
}

/// Connections one worker process can hold: most of the descriptors it may open (each
/// connection costs one; some are kept for the process itself). A worker refuses sockets
/// beyond it: the listener's global cap cannot see how groups spread over the workers, and a
/// worker out of descriptors would lose a socket in the handoff without answering it.
pub fn worker_connection_cap() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    usize::try_from(soft).unwrap_or(usize::MAX).saturating_sub(RESERVED_FDS).max(1)
}

/// Descriptors each process keeps for itself (rings, channels, the store's files, logs, a
/// socket being refused) under RLIMIT_NOFILE.
const RESERVED_FDS: usize = 64;

/// A bound on `workers` that catches typos (`workers = 1000000`) before they fork-bomb a host.
pub const MAX_WORKERS: usize = 1024;
/// The Zero client's protocol header can be 8 KiB: the head must hold it and the rest.
const MIN_HEAD_BYTES: usize = 9 * 1024;
/// A head travels to its worker in one Unix datagram, which must fit the socket's default
/// send buffer; it is also what the listener holds per half-read request.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

fn log_level(s: &str) -> Option<log::LevelFilter> {
    match s.to_ascii_lowercase().as_str() {
        "error" => Some(log::LevelFilter::Error),
        "warn" => Some(log::LevelFilter::Warn),
        "info" => Some(log::LevelFilter::Info),
        "debug" => Some(log::LevelFilter::Debug),
        "trace" => Some(log::LevelFilter::Trace),
        _ => None,
    }
}

/// Deserialises the merged table, naming the offending entry in the error (the merged text is
/// not the file the operator wrote, so the entry is quoted rather than given a line number).
fn from_table(table: toml::Table) -> Result<Config, String> {
    let text = toml::to_string(&table).map_err(|e| e.to_string())?;
    toml::from_str(&text).map_err(|e: toml::de::Error| {
        let entry = e.span().and_then(|span| {
            let start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
            let end = text[span.start..].find('\n').map_or(text.len(), |i| span.start + i);
            let line = text[start..end].trim();
            let table = text[..start].lines().rev().find(|l| l.starts_with('['));
            (!line.is_empty())
                .then(|| format!("{}{line}", table.map_or(String::new(), |t| format!("{t} "))))
        });
        match entry {
            Some(entry) => format!("`{entry}`: {}", e.message()),
            None => e.message().to_string(),
        }
    })
}

/// The environment variable that sets `key`.
pub fn env_name(key: &str) -> String {
    let mut name = String::from("SYNCGATE_");
    name.extend(key.chars().map(|c| match c {
        '.' | '-' => '_',
        c => c.to_ascii_uppercase(),
    }));
    name
}

/// Every settable key with the kind of value it takes, taken from the defaults so a new field
/// is settable from the environment without anyone remembering to list it.
fn known_keys() -> Vec<(String, toml::Value)> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
        for (k, v) in table {
            let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            match v {
                toml::Value::Table(t) => walk(&key, t, out),
                v => out.push((key, v.clone())),
            }
        }
    }
    let defaults = toml::Table::try_from(Config::default()).expect("defaults serialise");
    let mut out = Vec::new();
    walk("", &defaults, &mut out);
    for key in OPTIONAL_STRING_KEYS {
        out.push((key.to_string(), toml::Value::String(String::new())));
    }
    out
}

/// Overlays `SYNCGATE_*` variables onto the file's table, typed like the default of each key.
fn apply_env(table: &mut toml::Table, get: impl Fn(&str) -> Option<String>) -> Result<(), String> {
    for (key, example) in known_keys() {
        let name = env_name(&key);
        let Some(raw) = get(&name) else { continue };
        let value = match example {
            toml::Value::String(_) => toml::Value::String(raw),
            toml::Value::Boolean(_) => match raw.trim() {
                "true" | "1" | "yes" | "on" => toml::Value::Boolean(true),
                "false" | "0" | "no" | "off" => toml::Value::Boolean(false),
                other => return Err(format!("{name}: {other:?} is not a boolean")),
            },
            // Lists come comma-separated: SYNCGATE_LIMITS_TRUSTED_PROXIES=10.0.0.0/8,::1
            toml::Value::Array(_) => toml::Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_string()))
                    .collect(),
            ),
            toml::Value::Integer(_) => toml::Value::Integer(
                raw.trim().parse().map_err(|_| format!("{name}: {raw:?} is not an integer"))?,
            ),
            other => return Err(format!("{name}: unsupported value kind {}", other.type_str())),
        };
        let mut parts: Vec<&str> = key.split('.').collect();
        let leaf = parts.pop().expect("key has a part");
        let mut at = &mut *table;
        for part in parts {
            let entry = at
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            at = entry
                .as_table_mut()
                .ok_or_else(|| format!("{key}: {part} is not a table in the config file"))?;
        }
        at.insert(leaf.to_string(), value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_with(file: &str, env: &[(&str, &str)]) -> Result<Config, String> {
        let mut table: toml::Table = file.parse().map_err(|e| format!("{e}"))?;
        apply_env(&mut table, |name| {
            env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        })?;
        let config = from_table(table)?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn defaults_validate_and_match_design() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.listen, "[::]:4848");
        assert_eq!(c.limits.connect_per_ip, 100);
        assert_eq!(c.limits.connect_window_ms, 60_000);
        assert_eq!(c.limits.max_message_bytes, 10 << 20);
        assert_eq!(c.limits.max_fragments, 131_072);
        assert_eq!(c.limits.max_head_bytes, 16 << 10);
        assert_eq!(c.limits.max_group_connections, 64);
        assert_eq!(c.limits.group(), crate::sync::replica::GroupLimits::default());
        assert!(!c.compression.enabled);
    }

    #[test]
    fn upstream_settings_are_checked_and_a_keyless_front_door_is_warned_about() {
        let up = "[upstream]\nurls = [\"ws://127.0.0.1:4849\"]\n";
        let keyless = load_with(up, &[]).unwrap();
        assert!(keyless.warnings()[0].contains("without auth keys"), "{:?}", keyless.warnings());
        let keyed = load_with(&format!("[auth]\nsecret = \"s\"\n{up}"), &[]).unwrap();
        assert!(keyed.warnings().is_empty());
        assert!(Config::default().warnings().is_empty(), "embedded mode needs no keys");
        for (bad, says) in [
            ("health_timeout_ms = 2000", "health_timeout_ms"),
            ("health_rise = 0", "health_rise"),
            ("health_fall = 101", "health_fall"),
            ("health_path = \"keepalive\"", "health_path"),
            ("health_path = \"/a b\"", "health_path"),
        ] {
            let e = load_with(&format!("{up}{bad}\n"), &[]).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let long = format!("{up}anonymous_user_id = \"{}\"\n", "u".repeat(257));
        assert!(load_with(&long, &[]).unwrap_err().contains("anonymous_user_id"));
        let anon = load_with(&format!("{up}anonymous_user_id = \"anon\"\n"), &[]).unwrap();
        assert_eq!(anon.upstream.anonymous_user_id.as_deref(), Some("anon"));
        // Without checks the check settings do not matter.
        load_with(&format!("{up}health_interval_ms = 0\nhealth_rise = 0\n"), &[]).unwrap();
        let many: Vec<String> =
            (0..=MAX_UPSTREAMS).map(|i| format!("\"ws://127.0.0.1:{}\"", 5000 + i)).collect();
        let e = load_with(&format!("[upstream]\nurls = [{}]\n", many.join(", ")), &[]).unwrap_err();
        assert!(e.contains("at most"), "{e}");
    }

    #[test]
    fn connection_timeouts_past_the_millisecond_clock_are_refused() {
        let max = crate::ws::connection::MAX_TIMEOUT_MS;
        assert!(load_with(&format!("[keepalive]\nsilence_ms = {max}\n"), &[]).is_ok());
        let error =
            load_with(&format!("[keepalive]\nsilence_ms = {}\n", max as u64 + 1), &[]).unwrap_err();
        assert!(error.contains("keepalive.silence_ms must be at most"), "{error}");
        let error = load_with(&format!("[limits]\nslow_consumer_ms = {}\n", u64::MAX / 2), &[])
            .unwrap_err();
        assert!(error.contains("limits.slow_consumer_ms"), "{error}");
    }

    #[test]
    fn env_names_follow_the_rule() {
        assert_eq!(env_name("auth.secret"), "SYNCGATE_AUTH_SECRET");
        assert_eq!(env_name("limits.connect_per_ip"), "SYNCGATE_LIMITS_CONNECT_PER_IP");
        assert_eq!(env_name("a-b.c"), "SYNCGATE_A_B_C");
    }

    #[test]
    fn env_wins_over_file() {
        let c = load_with(
            "workers = 3\n[limits]\nconnect_per_ip = 7\n",
            &[("SYNCGATE_LIMITS_CONNECT_PER_IP", "9"), ("SYNCGATE_AUTH_SECRET", "s3cret")],
        )
        .unwrap();
        assert_eq!(c.workers, 3);
        assert_eq!(c.limits.connect_per_ip, 9);
        assert_eq!(c.auth.secret.as_deref(), Some("s3cret"));
        let c = load_with("", &[("SYNCGATE_IO_BACKEND", "epoll")]).unwrap();
        assert_eq!(c.io_backend(), crate::ring::Backend::Epoll);
        assert_eq!(Config::default().io.backend, "auto");
        let c = load_with("", &[("SYNCGATE_COMPRESSION_ENABLED", "true")]).unwrap();
        assert!(c.compression.enabled);
        let c = load_with("", &[("SYNCGATE_LIMITS_TRUSTED_PROXIES", "10.0.0.0/8, ::1")]).unwrap();
        assert_eq!(c.limits.trusted_proxies, vec!["10.0.0.0/8".to_string(), "::1".to_string()]);
    }

    #[test]
    fn bad_input_is_named() {
        let e = load_with("nope = 1", &[]).unwrap_err();
        assert!(e.contains("nope"), "{e}");
        let e = load_with("[limits]\nconnect_per_ip = \"x\"", &[]).unwrap_err();
        assert!(e.contains("connect_per_ip") || e.contains("integer"), "{e}");
        let e = load_with("", &[("SYNCGATE_WORKERS", "many")]).unwrap_err();
        assert!(e.contains("SYNCGATE_WORKERS"), "{e}");
        let e = load_with("listen = \"localhost\"", &[]).unwrap_err();
        assert!(e.contains("listen"), "{e}");
        let e = load_with("[limits]\nconnect_window_ms = 0", &[]).unwrap_err();
        assert!(e.contains("connect_window_ms"), "{e}");
        let e = load_with("log_level = \"loud\"", &[]).unwrap_err();
        assert!(e.contains("log_level"), "{e}");
        let e = load_with("[io]\nbackend = \"kqueue\"", &[]).unwrap_err();
        assert!(e.contains("io.backend"), "{e}");
        let e = load_with("[storage]\nmax_pending_bytes = 0", &[]).unwrap_err();
        assert_eq!(e, "storage.max_pending_bytes must be greater than 0");
    }

    #[test]
    fn resolved_round_trips() {
        let mut c = Config::default();
        c.auth.secret = Some("x".into());
        c.workers = 5;
        assert_eq!(Config::from_resolved(&c.to_resolved()).unwrap(), c);
    }
}
