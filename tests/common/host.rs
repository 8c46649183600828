//! What the tests take from the machine around the daemon: the binary under test, the
//! repository (for scripts and the client packages), temporary files and directories, and the
//! `node` that runs the JavaScript clients.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// The `syncgate` binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_syncgate");

/// The repository root (for scripts, units and the clients under tests/clients).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = unique_temp_path(tag);
        std::fs::create_dir(&path).expect("create a temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `syncgate-{tag}-{pid}-{n}-{nanos}` under the system temp dir: unique within this process
/// (tests of one binary may run in one process, in parallel) and across processes.
pub fn unique_temp_path(tag: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    std::env::temp_dir().join(format!("syncgate-{tag}-{}-{n}-{nanos}", std::process::id()))
}

/// The `node` that runs the JavaScript clients: `SYNCGATE_TEST_NODE` (scripts/test.sh sets
/// it), else the one on the `PATH`.
pub fn node() -> PathBuf {
    std::env::var_os("SYNCGATE_TEST_NODE").map_or_else(|| "node".into(), PathBuf::from)
}

/// A finished command's status and output, for failure messages.
pub fn describe(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A node client started with piped stdio: its stdout comes as lines on a channel (each
/// one a JSON event of the scripts under tests/clients), its stderr is gathered for failure
/// messages. `cmd` names the script and its environment; the pipes are set here.
pub fn spawn_node_client(mut cmd: Command) -> (Child, Receiver<String>, Arc<Mutex<String>>) {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!("cannot run {:?}: {e}. Run scripts/test.sh, which installs node.", node())
    });
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr = Arc::new(Mutex::new(String::new()));
    let mut pipe = child.stderr.take().expect("piped stderr");
    let sink = stderr.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    (child, lines, stderr)
}
