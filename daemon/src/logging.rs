//! One line per event on stderr, written with a single `write(2)` so that lines from the
//! supervisor, the listener and every worker (who share stderr) never interleave.
//!
//! Format: `<RFC 3339 time> <LEVEL> <role>[<pid>] <message>`, where messages carry their
//! context as `key=value` fields (clientID, clientGroupID, wsid, worker...).

use std::io::Write as _;
use std::sync::OnceLock;

struct Logger {
    /// `supervisor`, `listener` or `worker-N`.
    role: String,
    pid: u32,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // tungstenite traces every frame header it parses; that is noise, not our events.
        if record.target().starts_with("tungstenite") {
            return;
        }
        let line = format!(
            "{} {:5} {}[{}] {}\n",
            humantime::format_rfc3339_millis(std::time::SystemTime::now()),
            record.level(),
            self.role,
            self.pid,
            record.args()
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the logger for this process (once) and sets the level.
pub fn init(role: &str, level: log::LevelFilter) {
    let logger = LOGGER.get_or_init(|| Logger { role: role.to_string(), pid: std::process::id() });
    let _ = log::set_logger(logger);
    log::set_max_level(level);
}
