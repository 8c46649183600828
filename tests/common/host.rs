//! What the tests take from the machine around the daemon: the binary under test, the
//! repository (for scripts and the client packages), temporary files and directories, and the
//! `node` that runs the JavaScript clients.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
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
