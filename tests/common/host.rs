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

/// Makes `cmd` start with io_uring refused: a seccomp filter, installed between fork and exec
/// as a container runtime's default profile does, fails `io_uring_setup`, `io_uring_enter`
/// and `io_uring_register` with `errno` (EPERM, as Docker's profile does; ENOSYS, as a
/// kernel without io_uring does). It is inherited by every process the daemon starts.
#[cfg(target_arch = "x86_64")]
pub fn deny_io_uring(cmd: &mut Command, errno: i32) {
    use std::os::unix::process::CommandExt;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    // io_uring_setup, io_uring_enter, io_uring_register: 425, 426, 427 on x86_64.
    const NR_IO_URING_SETUP: u32 = 425;
    const NR_IO_URING_REGISTER: u32 = 427;
    // SAFETY: only async-signal-safe calls (prctl) between fork and exec; the filter lives
    // on the stack of the child until prctl copies it.
    unsafe {
        cmd.pre_exec(move || {
            let ret_errno = 0x0005_0000 | (errno as u32 & 0xffff); // SECCOMP_RET_ERRNO
            let allow = 0x7fff_0000; // SECCOMP_RET_ALLOW
            let filter = [
                // Another architecture's syscall numbers mean other calls: let them be.
                libc::sock_filter { code: 0x20, jt: 0, jf: 0, k: 4 }, // ld arch
                libc::sock_filter { code: 0x15, jt: 0, jf: 4, k: AUDIT_ARCH_X86_64 },
                libc::sock_filter { code: 0x20, jt: 0, jf: 0, k: 0 }, // ld nr
                // nr < 425: allow; nr > 427: allow; else refuse.
                libc::sock_filter { code: 0x35, jt: 0, jf: 2, k: NR_IO_URING_SETUP }, // jge
                libc::sock_filter { code: 0x25, jt: 1, jf: 0, k: NR_IO_URING_REGISTER }, // jgt
                libc::sock_filter { code: 0x06, jt: 0, jf: 0, k: ret_errno },
                libc::sock_filter { code: 0x06, jt: 0, jf: 0, k: allow },
            ];
            let prog =
                libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut _ };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
