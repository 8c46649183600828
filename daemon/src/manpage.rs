//! syncgate(8), the man page of the Debian package, generated from the command line itself
//! (`syncgate __man`, run by scripts/deb.sh on the binary it packages), so the commands and
//! options it lists are the ones the binary takes.
//!
//! The CLI knows its commands and their options; what a daemon's man page needs beyond that
//! (configuration, signals, routes, files) is written here, in the README's words: the
//! README's "Running", "Operations" and "Configuration" sections are the reference, and
//! tests/packaging.rs checks the two name the same commands, routes and files.

use std::io::Write;

use clap::{Arg, ArgAction, Command};
use clap_mangen::roff::{bold, italic, roman, Inline, Roff};
use clap_mangen::Man;

/// The `.TH` section: 8, system administration commands (a daemon run by root's tooling).
pub const SECTION: &str = "8";

/// The page for `cmd` (the `syncgate` command as clap defines it), in roff, dated `date`
/// (YYYY-MM-DD; see [`date`]).
pub fn render(cmd: Command, date: &str) -> std::io::Result<Vec<u8>> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let source = format!("syncgate {}", env!("CARGO_PKG_VERSION"));
    let man = Man::new(cmd.clone())
        .section(SECTION)
        .date(date)
        .source(source)
        .manual("System Administration");
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;

    let mut roff = Roff::new();
    roff.control("SH", ["SYNOPSIS"]);
    for sub in commands(&cmd) {
        roff.text(usage(sub)).control("br", []);
    }
    section(&mut roff, "DESCRIPTION", DESCRIPTION);

    roff.control("SH", ["COMMANDS"]);
    for sub in commands(&cmd) {
        roff.control("TP", []).text(usage(sub));
        if let Some(about) = sub.get_long_about().or_else(|| sub.get_about()) {
            roff.text([roman(sentence(&about.to_string()))]);
        }
        let args: Vec<&Arg> = visible_args(sub).collect();
        if !args.is_empty() {
            roff.control("RS", []);
            for arg in args {
                roff.control("TP", []).text(arg_usage(arg));
                let mut help = sentence(&arg.get_help().map(|h| h.to_string()).unwrap_or_default());
                if let Some(env) = arg.get_env() {
                    help.push_str(&format!(" Also from {}.", env.to_string_lossy()));
                }
                if let Some(default) = arg.get_default_values().first() {
                    help.push_str(&format!(" Default: {}.", default.to_string_lossy()));
                }
                roff.text([roman(sentence(&help))]);
            }
            roff.control("RE", []);
        }
    }

    for (title, body) in SECTIONS {
        section(&mut roff, title, body);
    }
    roff.to_writer(&mut out)?;
    out.flush()?;
    Ok(out)
}

/// The page's date: the day of `SOURCE_DATE_EPOCH` (seconds since 1970, the reproducible
/// builds convention; scripts/deb.sh sets it to the commit's time), else today.
pub fn date(source_date_epoch: Option<&str>) -> Result<String, String> {
    let when = match source_date_epoch {
        Some(s) => {
            let secs: u64 =
                s.trim().parse().map_err(|_| format!("SOURCE_DATE_EPOCH {s:?}: not a number"))?;
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)
        }
        None => std::time::SystemTime::now(),
    };
    Ok(humantime::format_rfc3339_seconds(when).to_string()[..10].to_string())
}

/// Clap drops the closing period of a doc comment's first line; prose needs it back.
fn sentence(text: &str) -> String {
    let text = text.trim().replace('`', "");
    match text.chars().last() {
        None | Some('.') => text,
        Some(_) => format!("{text}."),
    }
}

/// The visible subcommands, in the order they are declared.
fn commands(cmd: &Command) -> impl Iterator<Item = &Command> {
    cmd.get_subcommands().filter(|s| !s.is_hide_set())
}

/// The arguments a user can give a subcommand (not `--help`, not hidden ones).
fn visible_args(sub: &Command) -> impl Iterator<Item = &Arg> {
    sub.get_arguments().filter(|a| !a.is_hide_set() && !matches!(a.get_action(), ArgAction::Help))
}

/// `syncgate NAME [--flag VALUE] [FILE]`, as the README's "Running" writes it.
fn usage(sub: &Command) -> Vec<Inline> {
    let mut line = vec![bold("syncgate"), roman(" "), bold(sub.get_name())];
    for arg in visible_args(sub) {
        line.push(roman(" ["));
        line.extend(arg_usage(arg));
        line.push(roman("]"));
    }
    line
}

/// `--flag VALUE` or `FILE`.
fn arg_usage(arg: &Arg) -> Vec<Inline> {
    let value = arg
        .get_value_names()
        .and_then(|names| names.first())
        .map_or_else(|| arg.get_id().as_str().to_uppercase(), |n| n.to_string());
    match arg.get_long() {
        Some(long) if arg.get_action().takes_values() => {
            vec![bold(format!("--{long}")), roman(" "), italic(value)]
        }
        Some(long) => vec![bold(format!("--{long}"))],
        None => vec![italic(value)],
    }
}

/// A section of paragraphs; a paragraph whose lines start with two spaces is set as an
/// indented block (`.RS`/`.nf`: commands, file lists), one line per line.
fn section(roff: &mut Roff, title: &str, body: &str) {
    roff.control("SH", [title]);
    for (i, paragraph) in body.trim_matches('\n').split("\n\n").enumerate() {
        if i > 0 {
            roff.control("PP", []);
        }
        if paragraph.starts_with("  ") {
            roff.control("RS", []).control("nf", []);
            for line in paragraph.lines() {
                roff.text([roman(line.trim_start())]);
            }
            roff.control("fi", []).control("RE", []);
        } else {
            roff.text([roman(paragraph.split_whitespace().collect::<Vec<_>>().join(" "))]);
        }
    }
}

const DESCRIPTION: &str = "
syncgate terminates the WebSocket connections of a real-time sync service: it speaks the
connection layer of the sync protocol of Zero (the protocol of zero-cache), so the Zero
client connects to it unchanged. It serves the protocol itself, or sits in front of
zero-cache (upstream.urls) and relays admitted sockets to it.

One supervisor process starts one listener process and N worker processes from the same
binary, each with one io_uring ring; they die with the supervisor. Where the kernel or a
seccomp profile refuses io_uring (kernel.io_uring_disabled, a container runtime's seccomp
profile, too little locked memory), the same processes run on epoll instead, with one
warning line that says why (io.backend = \"auto\", the default); io.backend = \"io_uring\"
refuses to start there, with the same reason.

It logs one line per event on standard error, and \"ready listen=ADDR workers=N
backend=io_uring|epoll\" once
every process is up. Under systemd (syncgate.service, Type=notify) it reports READY=1, RELOADING=1
and STOPPING=1; socket activation (syncgate.socket) hands it its listening socket.
";

/// The sections after COMMANDS, in order.
const SECTIONS: [(&str, &str); 7] = [
    ("CONFIGURATION", CONFIGURATION),
    ("SIGNALS", SIGNALS),
    ("HTTP ROUTES", ROUTES),
    ("ENVIRONMENT", ENVIRONMENT),
    ("FILES", FILES),
    ("EXIT STATUS", EXIT_STATUS),
    ("SEE ALSO", SEE_ALSO),
];

const CONFIGURATION: &str = "
A TOML file (--config, or SYNCGATE_CONFIG); without one the built-in defaults apply. Every
key can also be set by an environment variable: SYNCGATE_ and the key in upper case, dots
and dashes as underscores (auth.secret becomes SYNCGATE_AUTH_SECRET; lists
comma-separated). The environment wins over the file. Unknown keys are errors, and
check-config names the offending entry.

The packaged /etc/syncgate/syncgate.toml shows every key, commented out, with its default
and what it does; the README's Configuration section has the same reference as a table.
";

const SIGNALS: &str = "
SIGTERM or SIGINT: stop accepting, close every WebSocket with 1001, exit within
drain_timeout_ms; a second signal exits at once.

SIGHUP: reload. The file is validated first; an invalid one is refused with one log line
(reload refused: ...) and the running configuration stays. A valid one is applied without
closing any connection; a change of listen or workers starts new processes and drains the
old ones. task_id never changes on a reload.
";

const ROUTES: &str = "
All on the one listening port:

  GET /           200, body OK
  GET /keepalive  200 (the health check)
  GET /metrics    Prometheus text, every process's counters
  (/BASE)/sync/vN/ACTION?QUERY   the sync WebSocket (a plain GET gets 426)
";

const ENVIRONMENT: &str = "
SYNCGATE_CONFIG: the configuration file, when --config is not given.

SYNCGATE_*: any configuration key, as under CONFIGURATION.

NOTIFY_SOCKET, LISTEN_FDS, LISTEN_PID: set by systemd for Type=notify and for socket
activation.
";

const FILES: &str = "
  /usr/bin/syncgate
  /etc/syncgate/syncgate.toml         the configuration (a conffile)
  /etc/syncgate/env                   optional SYNCGATE_* settings of syncgate.service
  /var/lib/syncgate                   durable client-group data (storage.path)
  /usr/lib/systemd/system/syncgate.service
  /usr/lib/systemd/system/syncgate.socket
  /usr/lib/sysusers.d/syncgate.conf   the syncgate system user
  /usr/lib/tmpfiles.d/syncgate.conf   owners and modes of the two directories

The package creates the user and the directories and enables nothing: start the daemon
with systemctl enable --now syncgate.service (or syncgate.socket). Purging the package
removes /var/lib/syncgate; removing it keeps the data and the configuration.
";

const EXIT_STATUS: &str = "
0: run stopped cleanly, check-config found the configuration valid, healthcheck got a 2xx.
1: the daemon could not start or failed, the configuration is invalid, the health check
failed. 2: wrong command line.
";

const SEE_ALSO: &str = "
systemctl(1), systemd.service(5), sysusers.d(5), tmpfiles.d(5);
/usr/share/doc/syncgate/README.md.
";
