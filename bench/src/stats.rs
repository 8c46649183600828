//! Measurement helpers: a latency histogram with constant memory, the median of the
//! windows, and the /proc readings (CPU time and resident memory of a process tree,
//! kernel TCP memory) that the load client takes of the server under test.

use std::collections::{BTreeMap, HashMap};
use std::fs;

/// Sub-buckets per power of two: values are kept to within 1/64 (about 1.6%).
const SUB_BITS: u32 = 6;
/// Values below this are counted exactly.
const EXACT: u64 = 1 << (SUB_BITS + 1);

/// A log-linear histogram of nanosecond values.
///
/// Recording is O(1) and memory is fixed (a few thousand counters), so it can take every
/// round trip of a run at a million messages per second, which a sorted sample list could
/// not without growing by tens of megabytes.
#[derive(Debug, Clone)]
pub struct Histogram {
    /// Count per bucket; see [`bucket_of`].
    counts: Vec<u64>,
    /// Number of values recorded.
    total: u64,
}

/// The bucket a value falls into: exact below [`EXACT`], then 64 buckets per octave.
fn bucket_of(v: u64) -> usize {
    if v < EXACT {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS + 1
    let sub = (v >> (exp - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    (EXACT + u64::from(exp - SUB_BITS - 1) * (1 << SUB_BITS) + sub) as usize
}

/// The middle of a bucket, in nanoseconds.
fn value_of(bucket: usize) -> u64 {
    let b = bucket as u64;
    if b < EXACT {
        return b;
    }
    let exp = (b - EXACT) / (1 << SUB_BITS) + u64::from(SUB_BITS) + 1;
    let sub = (b - EXACT) % (1 << SUB_BITS);
    let low = (1u64 << exp) + (sub << (exp - u64::from(SUB_BITS)));
    low + (1u64 << (exp - u64::from(SUB_BITS))) / 2
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: vec![0; bucket_of(u64::MAX) + 1], total: 0 }
    }
}

impl Histogram {
    /// Counts one value.
    pub fn record(&mut self, nanos: u64) {
        self.counts[bucket_of(nanos)] += 1;
        self.total += 1;
    }

    /// Number of values recorded.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// No value recorded yet.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The value at quantile `q` (0..=1), in nanoseconds; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(value_of(i));
            }
        }
        None
    }
}

/// The median of some numbers (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// Fields of `/proc/<pid>/stat` after the command name, which may itself hold spaces.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// `root` and every process below it (the supervisor and its listener and workers; a
/// Node server and nothing else). Threads are counted with their process.
pub fn process_tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            // Field 2 after the name is the parent pid.
            if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1)?.parse::<u32>().ok()) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c);
        }
        i += 1;
    }
    out
}

/// Clock ticks per second of the utime/stime fields.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// User plus system CPU seconds used so far by the processes (utime + stime of
/// `/proc/<pid>/stat`; a process that is gone counts as zero).
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let (user, system) = cpu_split(pids);
    user + system
}

/// [`cpu_seconds`] as (user, system): the system part is the kernel's work on the
/// processes' behalf (sockets, TCP, the loopback delivery of what they send).
pub fn cpu_split(pids: &[u32]) -> (f64, f64) {
    let (user, system) = pids
        .iter()
        .filter_map(|&p| {
            let f = stat_fields(p)?;
            // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
            Some((f.get(11)?.parse::<u64>().ok()?, f.get(12)?.parse::<u64>().ok()?))
        })
        .fold((0, 0), |(u, s), (pu, ps)| (u + pu, s + ps));
    (user as f64 / clock_ticks(), system as f64 / clock_ticks())
}

/// Each thread's user and system CPU ticks so far, by (process, thread) id, with the name
/// its time is reported under ([`thread_key`]); a thread that is gone is left out.
pub fn thread_ticks(pids: &[u32]) -> HashMap<(u32, u32), (String, u64, u64)> {
    let mut out = HashMap::new();
    for &pid in pids {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        let role = process_role(pid);
        for task in tasks.flatten() {
            let Some(tid) = task.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(text) = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (text.find('('), text.rfind(')')) else { continue };
            let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
            let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
            let (Some(user), Some(system)) = (ticks(11), ticks(12)) else { continue };
            let key = thread_key(&role, tid == pid, &text[open + 1..close]);
            out.insert((pid, tid), (key, user, system));
        }
    }
    out
}

/// The CPU seconds (user, system) each thread name used between two [`thread_ticks`]
/// samples; a thread that started in between counts from zero.
pub fn thread_cpu_between(
    before: &HashMap<(u32, u32), (String, u64, u64)>,
    after: &HashMap<(u32, u32), (String, u64, u64)>,
) -> BTreeMap<String, (f64, f64)> {
    let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (id, (key, user, system)) in after {
        let (user0, system0) = before.get(id).map_or((0, 0), |(_, u, s)| (*u, *s));
        let entry = out.entry(key.clone()).or_default();
        entry.0 += user.saturating_sub(user0) as f64 / clock_ticks();
        entry.1 += system.saturating_sub(system0) as f64 / clock_ticks();
    }
    out
}

/// Each thread's context switches so far, (voluntary, involuntary), by (process, thread) id:
/// a voluntary one is the thread going to sleep (waiting for I/O, a lock, another thread),
/// an involuntary one the scheduler taking the CPU from it (a thread it woke ran first).
/// A thread that is gone is left out.
pub fn thread_switches(pids: &[u32]) -> HashMap<(u32, u32), (u64, u64)> {
    let mut out = HashMap::new();
    for &pid in pids {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for task in tasks.flatten() {
            let Some(tid) = task.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(text) = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) else {
                continue;
            };
            if let Some(switches) = parse_switches(&text) {
                out.insert((pid, tid), switches);
            }
        }
    }
    out
}

/// (voluntary, involuntary) from a `/proc/<pid>/task/<tid>/status` text.
fn parse_switches(status: &str) -> Option<(u64, u64)> {
    let field =
        |name: &str| status.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok());
    Some((field("voluntary_ctxt_switches:")?, field("nonvoluntary_ctxt_switches:")?))
}

/// The context switches (voluntary, involuntary) of every thread between two
/// [`thread_switches`] samples; a thread that started in between counts from zero, one that
/// ended is not counted.
pub fn switches_between(
    before: &HashMap<(u32, u32), (u64, u64)>,
    after: &HashMap<(u32, u32), (u64, u64)>,
) -> (u64, u64) {
    after.iter().fold((0, 0), |(v, i), (id, (v1, i1))| {
        let (v0, i0) = before.get(id).copied().unwrap_or((0, 0));
        (v + v1.saturating_sub(v0), i + i1.saturating_sub(i0))
    })
}

/// What a process is, for [`thread_key`]: syncgate runs its children as `syncgate __worker
/// ...` and `syncgate __listener ...`, so their first argument names them (`worker`,
/// `listener`); any other process is `main`.
fn process_role(pid: u32) -> String {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let first_arg = cmdline.split(|&b| b == 0).nth(1).unwrap_or_default();
    match String::from_utf8_lossy(first_arg).strip_prefix("__") {
        Some(role) if !role.is_empty() => role.to_owned(),
        _ => "main".to_owned(),
    }
}

/// The name a thread's time is reported under: a process's main thread by its role, any
/// other by its name with each run of digits as `N`, so the same thread of every worker adds
/// up (`store-0-sql` and `store-1-sql` are both `store-N-sql`).
pub fn thread_key(role: &str, main_thread: bool, comm: &str) -> String {
    if main_thread {
        return role.to_owned();
    }
    let mut key = String::with_capacity(comm.len());
    let mut in_digits = false;
    for c in comm.chars() {
        match c.is_ascii_digit() {
            true if in_digits => {}
            true => key.push('N'),
            false => key.push(c),
        }
        in_digits = c.is_ascii_digit();
    }
    key
}

/// Resident memory of the processes, in bytes (`/proc/<pid>/statm`, second field).
pub fn rss_bytes(pids: &[u32]) -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    pids.iter()
        .filter_map(|&p| {
            let text = fs::read_to_string(format!("/proc/{p}/statm")).ok()?;
            text.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum::<u64>()
        * page
}

/// The body of `GET path` from an HTTP server on `addr` (a server's own metrics), read to
/// the end of the connection; a status other than 200 is an error.
pub fn http_get(addr: std::net::SocketAddrV4, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(5);
    let fail = |e: std::io::Error| format!("GET {path} from {addr}: {e}");
    let mut s = std::net::TcpStream::connect_timeout(&addr.into(), timeout).map_err(fail)?;
    s.set_read_timeout(Some(timeout)).map_err(fail)?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").map_err(fail)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(fail)?;
    let (head, body) = reply.split_once("\r\n\r\n").ok_or(format!("GET {path}: no HTTP head"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("GET {path}: {}", head.lines().next().unwrap_or("")));
    }
    Ok(body.to_string())
}

/// The machine's TCP socket buffer memory in bytes: the `mem` pages of the `TCP:` line
/// of `/proc/net/sockstat` (both ends of every loopback connection count).
pub fn tcp_memory_bytes() -> Option<u64> {
    parse_sockstat(&fs::read_to_string("/proc/net/sockstat").ok()?)
}

fn parse_sockstat(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "mem" {
            return words.next()?.parse::<u64>().ok().map(|pages| pages * 4096);
        }
    }
    None
}

/// The kernel's slab memory in bytes (`Slab:` of `/proc/meminfo`): where socket, inode,
/// file and epoll structures live, which idle connections cost even with empty buffers.
pub fn slab_bytes() -> Option<u64> {
    parse_meminfo_slab(&fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_meminfo_slab(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("Slab:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

/// CPU seconds all CPUs of the machine have spent busy (not idle, not waiting for I/O),
/// from the first line of `/proc/stat`.
pub fn machine_busy_seconds() -> Option<f64> {
    let text = fs::read_to_string("/proc/stat").ok()?;
    parse_machine_busy(text.lines().next()?).map(|ticks| ticks as f64 / clock_ticks())
}

fn parse_machine_busy(line: &str) -> Option<u64> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let v: Vec<u64> = fields.take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    (v.len() == 8).then(|| v.iter().sum::<u64>() - v[3] - v[4])
}

/// CPU seconds this process has used (user + system).
pub fn self_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_is_reported_by_its_role_or_its_name_with_numbers_as_n() {
        assert_eq!(thread_key("worker", true, "syncgate"), "worker");
        assert_eq!(thread_key("worker", false, "store-0-sql"), "store-N-sql");
        assert_eq!(thread_key("worker", false, "store-12"), "store-N");
        assert_eq!(thread_key("main", false, "tokio-runtime-w"), "tokio-runtime-w");
        assert_eq!(thread_key("main", false, "IN0x"), "INNx");
    }

    /// This test's own process: threads that burn a known amount of CPU show up under their
    /// name with that time, added up.
    #[test]
    fn thread_cpu_follows_the_threads_of_a_process() {
        use std::sync::mpsc;
        /// This thread's CPU time so far, in seconds.
        fn own_cpu() -> f64 {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: clock_gettime writes the timespec it is given.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
        }
        let me = std::process::id();
        let before = thread_ticks(&[me]);
        let (spun, done_spinning) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let released = std::sync::Arc::new(std::sync::Mutex::new(released));
        let threads: Vec<_> = ["spin-1", "spin-2"]
            .into_iter()
            .map(|name| {
                let (spun, released) = (spun.clone(), released.clone());
                std::thread::Builder::new()
                    .name(name.to_owned())
                    .spawn(move || {
                        // 150 ms of this thread's own CPU, however busy the machine is.
                        let mut x = 0u64;
                        while own_cpu() < 0.15 {
                            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                        }
                        spun.send(()).unwrap();
                        // Alive until the second sample is taken.
                        let _ = released.lock().unwrap().recv();
                    })
                    .unwrap()
            })
            .collect();
        done_spinning.recv().unwrap();
        done_spinning.recv().unwrap();
        let after = thread_ticks(&[me]);
        drop(release);
        for t in threads {
            t.join().unwrap();
        }
        let cpu = thread_cpu_between(&before, &after);
        let (user, system) = cpu["spin-N"];
        // 300 ms in all, give or take the 10 ms ticks of each thread's two fields.
        assert!((0.26..0.36).contains(&(user + system)), "{cpu:?}");
    }

    /// A thread of this process that sleeps 20 times switches out voluntarily at least 20
    /// times; the status file's two counters are read by name.
    #[test]
    fn context_switches_count_a_threads_sleeps() {
        let me = std::process::id();
        let before = thread_switches(&[me]);
        let (slept, done) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let sleeper = std::thread::spawn(move || {
            for _ in 0..20 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            slept.send(()).unwrap();
            // Alive until the second sample is taken.
            let _ = released.recv();
        });
        done.recv().unwrap();
        let after = thread_switches(&[me]);
        drop(release);
        sleeper.join().unwrap();
        let (voluntary, _) = switches_between(&before, &after);
        assert!(voluntary >= 20, "{voluntary} voluntary switches");
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t7\nnonvoluntary_ctxt_switches:\t3\n";
        assert_eq!(parse_switches(status), Some((7, 3)));
        assert_eq!(parse_switches("Name:\tx\n"), None);
    }

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in (0..2000u64).chain([1 << 20, 123_456_789, u64::MAX / 3]) {
            let b = bucket_of(v);
            assert!(b >= last);
            last = b;
            let mid = value_of(b) as f64;
            let err = (mid - v as f64).abs() / (v.max(1) as f64);
            assert!(err <= 1.0 / 64.0 + 1e-9, "v={v} mid={mid}");
        }
        assert!(bucket_of(u64::MAX) < 4096);
    }

    #[test]
    fn quantiles_come_from_the_recorded_values() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        assert_eq!(h.len(), 1000);
        let near = |q: f64, want: f64| {
            let got = h.quantile(q).unwrap() as f64;
            assert!((got - want).abs() / want < 0.02, "q={q} got={got} want={want}");
        };
        near(0.5, 500_000.0);
        near(0.99, 990_000.0);
        near(0.999, 999_000.0);
        near(1.0, 1_000_000.0);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn reads_this_process_from_proc() {
        let me = std::process::id();
        assert!(process_tree(me).contains(&me));
        let spin = std::time::Instant::now();
        while spin.elapsed().as_millis() < 30 {
            std::hint::black_box(0);
        }
        assert!(cpu_seconds(&[me]) > 0.0);
        assert!(rss_bytes(&[me]) > 1024 * 1024);
        assert_eq!(rss_bytes(&[u32::MAX]), 0, "a missing process counts as zero");
        assert!(self_cpu_seconds() > 0.0);
    }

    #[test]
    fn parses_proc_stat() {
        assert_eq!(parse_machine_busy("cpu  10 1 5 1000 7 2 3 4 0 0"), Some(25));
        assert_eq!(parse_machine_busy("cpu0 10 1 5 1000 7 2 3 4 0 0"), None);
        assert_eq!(parse_machine_busy("cpu  10 1"), None);
        assert!(machine_busy_seconds().unwrap() > 0.0);
    }

    #[test]
    fn parses_meminfo() {
        assert_eq!(parse_meminfo_slab("MemTotal: 10 kB\nSlab:     300 kB\n"), Some(300 * 1024));
        assert_eq!(parse_meminfo_slab("MemTotal: 10 kB\n"), None);
        assert!(slab_bytes().unwrap() > 0);
    }

    #[test]
    fn parses_sockstat() {
        let text =
            "sockets: used 14\nTCP: inuse 1 orphan 0 tw 0 alloc 1 mem 239\nUDP: inuse 0 mem 0\n";
        assert_eq!(parse_sockstat(text), Some(239 * 4096));
        assert_eq!(parse_sockstat("TCP: inuse 1\n"), None);
    }
}
