//! The `syncgate` command: `run` (the default), `check-config`, `healthcheck`, `version`, and
//! the hidden ones: the roles the supervisor starts (`__listener`, `__worker`) and `__man`,
//! which prints syncgate(8) for the Debian package (scripts/deb.sh).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use syncgate::config::{Config, CONFIG_PATH_ENV, RESOLVED_ENV};
use syncgate::process::supervisor::{self, fds};
use syncgate::process::{listener, worker};
use syncgate::{healthcheck, logging, manpage, metrics};

#[global_allocator]
static GLOBAL: syncgate::heap::Counting = syncgate::heap::Counting;

#[derive(Parser)]
#[command(
    name = "syncgate",
    about = "WebSocket termination for Zero's sync protocol, on io_uring (or epoll)"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon (the default when no command is given).
    Run {
        /// TOML configuration file; without one the embedded defaults apply.
        #[arg(long, env = CONFIG_PATH_ENV, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration (file plus environment) and exit non-zero if it is invalid.
    CheckConfig {
        /// The file to check (else --config or SYNCGATE_CONFIG).
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
        /// The file to check, when FILE is not given.
        #[arg(long, env = CONFIG_PATH_ENV, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Ask the daemon on this host for GET /keepalive at its listen address (a wildcard
    /// address on loopback), with the configuration run would read; exit 0 on a 2xx.
    Healthcheck {
        /// TOML configuration file, as for run.
        #[arg(long, env = CONFIG_PATH_ENV, value_name = "FILE")]
        config: Option<PathBuf>,
        /// How long the check may take, connect included.
        #[arg(long, value_name = "MS", default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Print the version.
    Version,
    #[command(name = "__man", hide = true)]
    Man,
    #[command(name = "__listener", hide = true)]
    Listener {
        #[arg(long)]
        workers: usize,
    },
    #[command(name = "__worker", hide = true)]
    Worker {
        #[arg(long)]
        index: usize,
        /// Its metrics slot (see `metrics::worker_slot`).
        #[arg(long)]
        slot: usize,
    },
}

fn main() -> ExitCode {
    // A file-size limit (`ulimit -f`, systemd's `LimitFSIZE=`) reached by the store makes the
    // write fail with `EFBIG`, handled as a full disk is (the commit fails, nothing is
    // acknowledged), instead of the kernel's SIGXFSZ killing the process. Ignored signals stay
    // ignored across exec, so the supervisor's children inherit it too.
    // SAFETY: setting a standard signal's disposition to SIG_IGN, before any thread starts.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let cli = Cli::parse();
    match cli
        .command
        .unwrap_or(Cmd::Run { config: std::env::var_os(CONFIG_PATH_ENV).map(PathBuf::from) })
    {
        Cmd::Run { config } => {
            let resolved = Config::load(config.as_deref());
            logging::init(
                "supervisor",
                resolved.as_ref().map_or(log::LevelFilter::Info, Config::level),
            );
            match resolved.and_then(|c| supervisor::run(c, config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::CheckConfig { file, config } => match Config::load(file.or(config).as_deref()) {
            Ok(c) => {
                println!(
                    "configuration is valid: listen={} workers={}",
                    c.listen,
                    c.worker_count()
                );
                for w in c.warnings() {
                    eprintln!("warning: {w}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("invalid configuration: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Healthcheck { config, timeout_ms } => {
            let checked = Config::load(config.as_deref())
                .and_then(|c| healthcheck::check(&c, std::time::Duration::from_millis(timeout_ms)));
            match checked {
                Ok(addr) => {
                    println!("healthy: GET {} at {addr} answered 2xx", healthcheck::PATH);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("unhealthy: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Man => {
            let page = manpage::date(std::env::var("SOURCE_DATE_EPOCH").ok().as_deref())
                .and_then(|date| manpage::render(Cli::command(), &date).map_err(|e| e.to_string()))
                .and_then(|page| {
                    std::io::Write::write_all(&mut std::io::stdout().lock(), &page)
                        .map_err(|e| e.to_string())
                });
            match page {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cannot write the man page: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Version => {
            println!("syncgate {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Cmd::Listener { workers } => child("listener", |config, metrics_fd, signals, control| {
            // SAFETY: the supervisor placed these descriptors at these numbers.
            let (listen, channels) = unsafe {
                (
                    supervisor::inherited(fds::SOCKET),
                    (0..workers as i32).map(|i| supervisor::inherited(fds::CHANNELS + i)).collect(),
                )
            };
            let metrics =
                metrics::Metrics::map(&metrics_fd, 0).map_err(|e| format!("metrics: {e}"))?;
            let task_id = config.task_id.clone();
            let l = listener::Listener::new(
                config, listen, channels, metrics, task_id, signals, control,
            )?;
            Ok(Box::new(move || l.run()))
        }),
        Cmd::Worker { index, slot } => {
            child(&format!("worker-{index}"), |config, metrics_fd, signals, control| {
                // SAFETY: the supervisor placed this descriptor at this number.
                let channel = unsafe { supervisor::inherited(fds::SOCKET) };
                let metrics = metrics::Metrics::map(&metrics_fd, slot)
                    .map_err(|e| format!("metrics: {e}"))?;
                let w = worker::Worker::new(index, config, channel, metrics, signals, control)?;
                Ok(Box::new(move || w.run()))
            })
        }
    }
}

type Runner = Box<dyn FnOnce() -> Result<(), String>>;

/// Common start of a child: config from the supervisor, logger, signals, then `build`; the
/// ready byte goes out only once `build` succeeded, so a failure fails the daemon's startup.
fn child(
    role: &str,
    build: impl FnOnce(
        Config,
        std::os::fd::OwnedFd,
        nix::sys::signalfd::SignalFd,
        std::os::fd::OwnedFd,
    ) -> Result<Runner, String>,
) -> ExitCode {
    let config = match std::env::var(RESOLVED_ENV)
        .map_err(|_| format!("{RESOLVED_ENV} not set: internal role started by hand?"))
        .and_then(|t| Config::from_resolved(&t))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{role}: {e}");
            return ExitCode::FAILURE;
        }
    };
    logging::init(role, config.level());
    let mut mask = nix::sys::signal::SigSet::empty();
    mask.add(nix::sys::signal::Signal::SIGTERM);
    mask.add(nix::sys::signal::Signal::SIGINT);
    let signals = match nix::sys::signalfd::SignalFd::with_flags(
        &mask,
        nix::sys::signalfd::SfdFlags::SFD_CLOEXEC,
    ) {
        Ok(s) => s,
        Err(e) => {
            log::error!("signalfd: {e}");
            return ExitCode::FAILURE;
        }
    };
    // SAFETY: the supervisor placed these descriptors at these numbers.
    let (control, metrics_fd) =
        unsafe { (supervisor::inherited(fds::CONTROL), supervisor::inherited(fds::METRICS)) };
    // The loop says Ready on its control channel once it runs, so a failure in `build` (no
    // io_uring, say) fails the daemon's startup with this process's log line. The supervisor
    // learns of the failure from the channel closing and stops every process at once, and
    // the role's handle closes with `build`'s state, before the line below is written: a
    // duplicate held until then keeps the line from being lost.
    let keep_open = control.try_clone().ok();
    let result = build(config, metrics_fd, signals, control).and_then(|run| run());
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    };
    drop(keep_open);
    code
}
