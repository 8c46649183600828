//! A browser: the real Zero client (`@rocicorp/zero` 1.9.0) in a page in Debian's headless
//! Chromium, driven over WebDriver (chromedriver) on loopback.
//!
//! - [`build_page`] bundles tests/clients/browser/page.js with the Zero client (esbuild, run by
//!   node) into a directory; [`StaticServer`] serves it on 127.0.0.1.
//! - [`Browser`] starts chromedriver and, through it, Chromium (`--headless=new --no-sandbox`,
//!   a fresh profile), and speaks WebDriver to it: open a URL, run a script.
//! - [`Page`] is the test page in that browser: it reads what the page shows (connection
//!   state, the rows in its table, its clientID and clientGroupID) and, when a test fails,
//!   prints the page's console and Zero's log.
//! - [`browser_sees_a_mutation_by_another_client`] is the scenario: the page connects to a
//!   sync server, another client changes the data, the page must show it. It takes the
//!   server, the auth and the data model, so one body runs against any Zero sync server;
//!   [`raw_insert`] is a second client for syncgate's embedded workload.
//!
//! `scripts/test.sh` installs Chromium and chromedriver (apt), esbuild (npm, in
//! tests/clients/browser) and the Zero client (npm, in tests/clients/zero). What is missing
//! fails the test with the command that installs it: these tests never skip.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::daemon::WAIT;
use super::host::{describe, node, repo_root, TempDir};
use super::ws::{Got, Ws};
use super::zero::{now_ms, protocol_header, Params};

/// How long chromedriver and Chromium get to start (a cold start on a busy two-core machine
/// takes seconds).
const BROWSER_START: Duration = Duration::from_secs(60);
/// How long one WebDriver command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the page gets to load, connect and answer its query; and, after the other
/// client's mutation, to show it.
pub const PAGE_WAIT: Duration = Duration::from_secs(30);
/// How often the DOM is read while waiting for it to show something: there is no event to
/// block on from outside the page.
const POLL: Duration = Duration::from_millis(50);

/// Chromium: `SYNCGATE_TEST_CHROMIUM`, else Debian's `/usr/bin/chromium`.
fn chromium() -> PathBuf {
    std::env::var_os("SYNCGATE_TEST_CHROMIUM")
        .map_or_else(|| "/usr/bin/chromium".into(), PathBuf::from)
}

/// chromedriver: `SYNCGATE_TEST_CHROMEDRIVER`, else Debian's `/usr/bin/chromedriver`.
fn chromedriver() -> PathBuf {
    std::env::var_os("SYNCGATE_TEST_CHROMEDRIVER")
        .map_or_else(|| "/usr/bin/chromedriver".into(), PathBuf::from)
}

const INSTALL_HINT: &str = "Run scripts/test.sh, which installs it (Debian: apt-get install \
     chromium chromium-driver; (cd tests/clients/zero && npm ci --ignore-scripts); \
     (cd tests/clients/browser && npm ci))";

/// The version in `dir/node_modules/<package>/package.json`, if it is installed.
fn installed_version(dir: &Path, package: &str) -> Option<String> {
    let manifest = dir.join("node_modules").join(package).join("package.json");
    let text = std::fs::read_to_string(manifest).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v["version"].as_str().map(str::to_string)
}

// ---------------------------------------------------------------------------------------------
// The page and its server
// ---------------------------------------------------------------------------------------------

/// Bundles the test page (index.html and page.js with the Zero client) into `out`.
pub fn build_page(out: &Path) {
    let clients = repo_root().join("tests/clients");
    let browser = clients.join("browser");
    assert_eq!(
        installed_version(&clients.join("zero"), "@rocicorp/zero").as_deref(),
        Some("1.9.0"),
        "@rocicorp/zero 1.9.0 is not installed in tests/clients/zero. {INSTALL_HINT}"
    );
    let want = std::fs::read_to_string(browser.join("package.json")).expect("package.json");
    let want: Value = serde_json::from_str(&want).expect("package.json is JSON");
    assert_eq!(
        installed_version(&browser, "esbuild").as_deref(),
        want["dependencies"]["esbuild"].as_str(),
        "esbuild is not installed in tests/clients/browser. {INSTALL_HINT}"
    );
    let out_put = Command::new(node())
        .arg(browser.join("build.mjs"))
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}. {INSTALL_HINT}", node()));
    assert!(out_put.status.success(), "bundling the page failed: {}", describe(&out_put));
}

/// A static file server for one directory on 127.0.0.1 (an ephemeral port), on a thread;
/// stopped when dropped. GET only; the query string is the page's, not the server's.
pub struct StaticServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StaticServer {
    pub fn start(root: &Path) -> StaticServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the page server");
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let root = root.to_path_buf();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                // A thread per connection: Chromium opens sockets it may never use.
                if let Ok(stream) = stream {
                    let root = root.clone();
                    std::thread::spawn(move || serve_file(stream, &root));
                }
            }
        });
        StaticServer { addr, stop, thread: Some(thread) }
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept so the thread sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers one request with a file of `root` (or 404) and closes.
fn serve_file(mut s: TcpStream, root: &Path) {
    let _ = s.set_read_timeout(Some(WAIT));
    let _ = s.set_write_timeout(Some(WAIT));
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let target = head.lines().next().and_then(|l| l.split_whitespace().nth(1)).unwrap_or("");
    let path = target.split('?').next().unwrap_or("");
    let (name, kind) = match path {
        "/" | "/index.html" => ("index.html", "text/html; charset=utf-8"),
        "/page.js" => ("page.js", "text/javascript; charset=utf-8"),
        _ => ("", ""),
    };
    let body = if name.is_empty() { None } else { std::fs::read(root.join(name)).ok() };
    let (status, kind, body) = match body {
        Some(b) => ("200 OK", kind, b),
        None => ("404 Not Found", "text/plain", b"not found".to_vec()),
    };
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(answer.as_bytes()).and_then(|()| s.write_all(&body));
}

// ---------------------------------------------------------------------------------------------
// WebDriver
// ---------------------------------------------------------------------------------------------

/// Headless Chromium behind chromedriver, one WebDriver session; both end when dropped.
pub struct Browser {
    driver: Child,
    /// chromedriver's address (loopback, an ephemeral port it chose).
    addr: SocketAddr,
    session: String,
    /// chromedriver's own log, for failure messages.
    driver_log: PathBuf,
    /// Chromium's profile and the log file; removed on drop.
    _dir: TempDir,
}

impl Browser {
    pub fn start() -> Browser {
        for (what, path) in [("Chromium", chromium()), ("chromedriver", chromedriver())] {
            assert!(path.exists(), "{what} is not installed at {}. {INSTALL_HINT}", path.display());
        }
        let dir = TempDir::new("browser");
        let driver_log = dir.0.join("chromedriver.log");
        let profile = dir.0.join("profile");
        // Port 0: chromedriver picks a free one and says which on stdout. It listens on
        // loopback only (no --allowed-ips).
        let mut driver = Command::new(chromedriver())
            .arg("--port=0")
            .arg(format!("--log-path={}", driver_log.display()))
            // Warnings and errors only: at INFO every poll of the page would fill it.
            .arg("--log-level=WARNING")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {:?}: {e}. {INSTALL_HINT}", chromedriver()));
        let stdout = driver.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut out = std::io::BufReader::new(stdout);
            let mut line = String::new();
            // Read to the end, so chromedriver never blocks on a full pipe.
            while matches!(std::io::BufRead::read_line(&mut out, &mut line), Ok(n) if n > 0) {
                let _ = tx.send(std::mem::take(&mut line));
            }
        });
        let deadline = Instant::now() + BROWSER_START;
        let port = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let port = line
                        .split("started successfully on port ")
                        .nth(1)
                        .and_then(|rest| rest.trim().trim_end_matches('.').parse::<u16>().ok());
                    if let Some(port) = port {
                        break port;
                    }
                }
                Err(e) => {
                    let _ = driver.kill();
                    let _ = driver.wait();
                    let log = std::fs::read_to_string(&driver_log).unwrap_or_default();
                    panic!("chromedriver did not start ({e:?}); its log:\n{log}");
                }
            }
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium(),
                "args": [
                    "--headless=new",
                    // CI runs as root, where Chromium's sandbox cannot start.
                    "--no-sandbox",
                    format!("--user-data-dir={}", profile.display()),
                    // A container's /dev/shm may be tiny.
                    "--disable-dev-shm-usage",
                    "--disable-gpu",
                    "--no-first-run",
                    "--no-default-browser-check",
                    // No traffic of its own: the tests reach loopback only.
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-extensions",
                    "--window-size=1024,768",
                ],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
            // Below COMMAND_TIMEOUT, so chromedriver's answer comes before the harness
            // gives up on it.
            "timeouts": {"script": 10_000, "pageLoad": 20_000},
        }}});
        let mut browser = Browser { driver, addr, session: String::new(), driver_log, _dir: dir };
        match webdriver(addr, "POST", "/session", Some(&capabilities), BROWSER_START) {
            Ok(v) => {
                browser.session =
                    v["sessionId"].as_str().expect("a new session has an id").to_string();
            }
            Err(e) => panic!(
                "Chromium did not start through chromedriver: {e}\nchromedriver's log (tail):\n{}",
                browser.driver_log_tail()
            ),
        }
        browser
    }

    /// Runs one command of this session; `Err` says what went wrong.
    pub fn command(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let path = format!("/session/{}{path}", self.session);
        webdriver(self.addr, method, &path, body, COMMAND_TIMEOUT)
    }

    /// Opens `url` and waits for it to load.
    pub fn open(&self, url: &str) {
        self.command("POST", "/url", Some(&json!({ "url": url })))
            .unwrap_or_else(|e| panic!("opening {url}: {e}"));
    }

    /// Runs `script` (a function body: `return ...`) in the page, its value as JSON.
    pub fn eval(&self, script: &str) -> Result<Value, String> {
        self.command("POST", "/execute/sync", Some(&json!({"script": script, "args": []})))
    }

    /// Chromium's console log as chromedriver collected it (also what the page printed
    /// before its own script ran: load errors, a bundle that did not parse).
    pub fn console_log(&self) -> Result<Value, String> {
        self.command("POST", "/se/log", Some(&json!({"type": "browser"})))
    }

    pub fn driver_log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.driver_log).unwrap_or_default();
        let mut start = log.len().saturating_sub(8192);
        while !log.is_char_boundary(start) {
            start += 1;
        }
        log[start..].to_string()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Deleting the session quits Chromium; then chromedriver goes.
        if !self.session.is_empty() {
            let path = format!("/session/{}", self.session);
            let _ = webdriver(self.addr, "DELETE", &path, None, COMMAND_TIMEOUT);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// One WebDriver request to chromedriver at `addr`; the answer's `value`, or the error it
/// carried.
fn webdriver(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<Value, String> {
    let deadline = Instant::now() + timeout;
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).map_err(|e| format!("send {method} {path}: {e}"))?;
    // Read the head, then Content-Length bytes (or to the end, if it has none).
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut want: Option<usize> = None;
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) {
            if want.is_none() {
                let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                want = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .map(|n| end + n);
            }
            if want.is_some_and(|n| raw.len() >= n) {
                break;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("{method} {path}: no complete answer within {timeout:?}"));
        }
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(format!("{method} {path}: {e}")),
        }
    }
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4).ok_or_else(|| {
        format!("{method} {path}: no HTTP answer: {:?}", String::from_utf8_lossy(&raw))
    })?;
    let status = String::from_utf8_lossy(&raw[..end]);
    let status = status.split_whitespace().nth(1).unwrap_or_default().to_string();
    let answer: Value = serde_json::from_slice(&raw[end..]).map_err(|e| {
        format!(
            "{method} {path}: answer {status} is not JSON ({e}): {}",
            String::from_utf8_lossy(&raw[end..])
        )
    })?;
    if status != "200" {
        return Err(format!("{method} {path}: {status} {}", answer["value"]));
    }
    Ok(answer["value"].clone())
}

// ---------------------------------------------------------------------------------------------
// The test page in a browser
// ---------------------------------------------------------------------------------------------

/// What the page connects to and shows: its query-string settings.
#[derive(Debug, Clone)]
pub struct PageSettings {
    /// The sync server's origin, as an app passes it to the Zero client:
    /// `http://127.0.0.1:PORT`.
    pub server: String,
    pub user: String,
    /// The token the client offers (`auth`); None: no token.
    pub token: Option<String>,
    /// The table the page queries (all of it, ordered by the primary key).
    pub table: String,
    /// Its columns, all strings; the first is the primary key.
    pub columns: Vec<String>,
    /// `idb` (the browser's IndexedDB, as an app runs) or `mem`.
    pub kv_store: String,
}

impl PageSettings {
    /// The `issue(id, title)` table that syncgate's other Zero tests use.
    pub fn issue(server: &str, user: &str, token: Option<String>) -> PageSettings {
        PageSettings {
            server: server.into(),
            user: user.into(),
            token,
            table: "issue".into(),
            columns: vec!["id".into(), "title".into()],
            kv_store: "idb".into(),
        }
    }

    fn query(&self) -> String {
        let enc = |s: &str| percent_encoding::utf8_percent_encode(s, QUERY_VALUE).to_string();
        let mut q = format!(
            "server={}&userID={}&table={}&columns={}&kvStore={}",
            enc(&self.server),
            enc(&self.user),
            enc(&self.table),
            enc(&self.columns.join(",")),
            enc(&self.kv_store)
        );
        if let Some(token) = &self.token {
            q.push_str(&format!("&auth={}", enc(token)));
        }
        q
    }
}

/// Everything but unreserved characters is escaped in a query value.
const QUERY_VALUE: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// What the page shows at one moment.
#[derive(Debug, Clone)]
pub struct PageView {
    /// The connection state's name, as rendered in `#state`.
    pub state: String,
    /// Every state the client went through.
    pub states: Vec<String>,
    pub client_id: Option<String>,
    pub client_group_id: Option<String>,
    /// The query's result type (`unknown` until the server answered the query, `complete`
    /// after).
    pub result_type: String,
    /// The rows of the page's table element, as `{column: text}` objects.
    pub rows: Vec<Value>,
    /// The page script's failure, if it failed.
    pub failure: Option<String>,
}

/// The Zero client of a connected page: what a second client needs to reach the same data.
#[derive(Debug, Clone)]
pub struct PageClient {
    pub client_id: String,
    pub client_group_id: String,
}

/// The test page, open in its own headless Chromium. When a test fails while it is open, its
/// console, Zero's log and chromedriver's log are printed.
pub struct Page {
    pub settings: PageSettings,
    // Field order is drop order: the browser goes before the server and the bundle.
    pub browser: Browser,
    _server: StaticServer,
    _bundle: TempDir,
}

/// Reads the DOM (and the page's own record of its client) in one go.
const READ_PAGE: &str = r#"
const p = window.syncgate;
const rows = [...document.querySelectorAll('#rows tbody tr')].map(tr =>
  Object.fromEntries([...tr.querySelectorAll('td')].map(td => [td.dataset.column, td.textContent])));
return {
  state: document.getElementById('state')?.textContent ?? null,
  states: p?.states ?? [],
  clientID: p?.clientID ?? null,
  clientGroupID: p?.clientGroupID ?? null,
  resultType: p?.resultType ?? null,
  rows,
  failure: p?.failure ?? null,
};
"#;

impl Page {
    /// Bundles the page, serves it, starts Chromium and opens the page with `settings`.
    pub fn open(settings: PageSettings) -> Page {
        let bundle = TempDir::new("page");
        build_page(&bundle.0);
        let server = StaticServer::start(&bundle.0);
        let browser = Browser::start();
        let page = Page { settings, browser, _server: server, _bundle: bundle };
        let url = format!("http://{}/index.html?{}", page._server.addr, page.settings.query());
        page.browser.open(&url);
        page
    }

    /// What the page shows now.
    pub fn view(&self) -> PageView {
        let v = self.browser.eval(READ_PAGE).unwrap_or_else(|e| panic!("reading the page: {e}"));
        let s = |key: &str| v[key].as_str().map(str::to_string);
        let list = |key: &str| v[key].as_array().cloned().unwrap_or_default();
        PageView {
            state: s("state").unwrap_or_default(),
            states: list("states").iter().filter_map(|s| s.as_str().map(str::to_string)).collect(),
            client_id: s("clientID"),
            client_group_id: s("clientGroupID"),
            result_type: s("resultType").unwrap_or_default(),
            rows: list("rows"),
            failure: s("failure"),
        }
    }

    /// Reads the page until `pred` accepts what it shows; fails after `timeout`, or at once
    /// if the page script failed.
    pub fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&PageView) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let view = self.view();
            assert!(view.failure.is_none(), "the page failed while waiting for {what}: {view:?}");
            if let Some(t) = pred(&view) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "the page did not show {what} within {timeout:?}; it shows {view:?}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the client is connected and its query answered; its IDs.
    pub fn wait_connected(&self) -> PageClient {
        self.wait_until("a connected client with its query answered", PAGE_WAIT, |v| {
            let connected = v.state == "connected" && v.result_type == "complete";
            Some(PageClient {
                client_id: v.client_id.clone()?,
                client_group_id: v.client_group_id.clone()?,
            })
            .filter(|_| connected)
        })
    }

    /// The page's own log (console, Zero's log, uncaught errors) and Chromium's console as
    /// chromedriver collected it, as text.
    pub fn logs(&self) -> String {
        let page = match self.browser.eval("return window.syncgate?.log ?? []") {
            Ok(Value::Array(lines)) => lines
                .iter()
                .map(|l| l.as_str().unwrap_or_default().to_string())
                .collect::<Vec<_>>()
                .join("\n"),
            Ok(other) => format!("(no page log: {other})"),
            Err(e) => format!("(cannot read the page log: {e})"),
        };
        let console = match self.browser.console_log() {
            Ok(Value::Array(entries)) => entries
                .iter()
                .map(|e| {
                    format!(
                        "{} {} {}",
                        e["timestamp"],
                        e["level"],
                        e["message"].as_str().unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
            Ok(other) => format!("(no console log: {other})"),
            Err(e) => format!("(cannot read the console log: {e})"),
        };
        format!(
            "--- the page's log (console, Zero, errors) ---\n{page}\n\
             --- Chromium's console (chromedriver) ---\n{console}\n\
             --- chromedriver's log (tail) ---\n{}",
            self.browser.driver_log_tail()
        )
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("==== browser page {:?} ====\n{}\n====", self.settings, self.logs());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The scenario
// ---------------------------------------------------------------------------------------------

/// The page connects to the sync server of `settings` and answers its query; then `mutate`,
/// another client, writes `row` (a row of `settings.table`, `{column: string}`, that the page
/// does not have yet) into the data the page's query reads; the page must show the row, and
/// stay connected throughout. `mutate` gets the page's clientID and clientGroupID (syncgate's
/// embedded workload keeps data per client group: [`raw_insert`] writes into the page's).
///
/// Returns the page, for more checks while it is open.
pub fn browser_sees_a_mutation_by_another_client(
    settings: PageSettings,
    row: &Value,
    mutate: impl FnOnce(&PageClient),
) -> (Page, PageClient) {
    let key_column = settings.columns[0].clone();
    let key = row[&key_column].as_str().expect("the row has its primary key").to_string();
    let want: Value = settings
        .columns
        .iter()
        .map(|c| (c.clone(), row[c].clone()))
        .collect::<serde_json::Map<_, _>>()
        .into();
    let page = Page::open(settings);
    let client = page.wait_connected();
    let before = page.view();
    assert!(
        !before.rows.iter().any(|r| r[&key_column] == key.as_str()),
        "the page shows row {key} before anyone wrote it: {before:?}"
    );

    mutate(&client);

    page.wait_until(&format!("the row {want}"), PAGE_WAIT, |v| {
        v.rows.contains(&want).then_some(())
    });
    let after = page.view();
    assert_eq!(after.state, "connected", "{after:?}");
    let first = after.states.iter().position(|s| s == "connected").expect("it was connected");
    let since = &after.states[first..];
    assert!(since.iter().all(|s| s == "connected"), "the page left `connected`: {after:?}");
    assert_eq!(after.client_id.as_ref(), Some(&client.client_id), "{after:?}");
    (page, client)
}

/// A second client for syncgate's embedded workload: a raw sync socket of `user` (with
/// `token`) in the page's client group, under a clientID of its own, that pushes one CRUD
/// insert of `row` into `table` and waits for the server's acknowledgement (the poke that
/// advances its last mutation ID). Returns its clientID.
pub fn raw_insert(
    addr: SocketAddr,
    page: &PageClient,
    user: &str,
    token: Option<&str>,
    table: &str,
    primary_key: &str,
    row: &Value,
) -> String {
    let me = format!("peer-of-{}", page.client_id);
    let params = Params::new(&me, &page.client_group_id).user(user);
    let init = json!(["initConnection", {"desiredQueriesPatch": []}]);
    let mut ws = Ws::connect(addr, &params.path(), Some(&protocol_header(token, Some(init))))
        .unwrap_or_else(|e| panic!("the second client cannot connect: {e}"));
    let first = ws.recv_json();
    assert_eq!(first[0], "connected", "the second client's first message: {first}");
    ws.send_json(&json!(["push", {
        "timestamp": now_ms(),
        "clientGroupID": page.client_group_id,
        "mutations": [{"type": "crud", "timestamp": now_ms(), "id": 1, "clientID": me,
                       "name": "_zero_crud", "args": [{"ops": [{"op": "insert",
                       "tableName": table, "primaryKey": [primary_key], "value": row}]}]}],
        "pushVersion": 1,
        "requestID": format!("{me}-1"),
    }]));
    let deadline = Instant::now() + PAGE_WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg: Value = match ws.recv_within(left) {
            Got::Text(t) => {
                serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}"))
            }
            Got::Timeout => panic!(
                "the server did not acknowledge the second client's insert within {PAGE_WAIT:?}"
            ),
            other => panic!("the second client's socket ended: {other:?}"),
        };
        assert_ne!(msg[0], "error", "the server refused the second client's insert: {msg}");
        if msg[0] == "pokePart" && msg[1]["lastMutationIDChanges"][&me] == 1 {
            break;
        }
    }
    ws.close(1000);
    me
}
