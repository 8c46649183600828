//! `scripts/install.sh` and `scripts/uninstall.sh`, run for real into a temporary DESTDIR:
//! the exact tree they produce (paths and modes), idempotence, the rule that an operator's
//! configuration is never replaced, the shipped configuration itself, and the refusal of
//! bad input.
//!
//! The scripts get the binary cargo built for these tests (`SYNCGATE_BIN`), so no release
//! build is needed.

mod common;

use common::{describe, repo_root, TempDir, BIN};
use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use syncgate::config::Config;

/// Runs `scripts/<script>` with `args`, DESTDIR=`dest` and `env`; the caller's DESTDIR,
/// PREFIX, SYNCGATE_BIN and SOURCE_DATE_EPOCH are not passed on, so only the test decides
/// them.
fn script(script: &str, dest: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(repo_root().join("scripts").join(script));
    cmd.args(args)
        .env("DESTDIR", dest)
        .env_remove("PREFIX")
        .env_remove("SYNCGATE_BIN")
        .env_remove("SOURCE_DATE_EPOCH");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap_or_else(|e| panic!("run scripts/{script}: {e}"))
}

/// `install.sh` with the test binary, expected to succeed; returns its stdout.
fn install(dest: &Path, env: &[(&str, &str)]) -> String {
    let mut env = env.to_vec();
    env.push(("SYNCGATE_BIN", BIN));
    let out = script("install.sh", dest, &["--no-build"], &env);
    assert!(out.status.success(), "install.sh failed: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn uninstall(dest: &Path, args: &[&str]) -> String {
    let out = script("uninstall.sh", dest, args, &[]);
    assert!(out.status.success(), "uninstall.sh failed: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One entry of a tree listing: `d 0755` or `f 0644`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// A directory; else a regular file (nothing else is allowed).
    dir: bool,
    /// The permission bits, `mode & 0o7777`.
    mode: u32,
}

/// Every path under `root` (relative, `/`-separated) with its kind and permission bits.
/// Anything but a directory or a regular file fails the test: the scripts make no links.
fn tree(root: &Path) -> BTreeMap<String, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Entry>) {
        for entry in std::fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("dir entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            assert!(meta.is_dir() || meta.is_file(), "{rel}: neither a file nor a directory");
            out.insert(rel, Entry { dir: meta.is_dir(), mode: meta.permissions().mode() & 0o7777 });
            if meta.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The tree of a fresh install under `prefix` (relative, e.g. `usr/local`).
fn expected_tree(prefix: &str) -> BTreeMap<String, Entry> {
    let d = |mode| Entry { dir: true, mode };
    let f = |mode| Entry { dir: false, mode };
    let mut want = BTreeMap::new();
    // The prefix's own directories, each created 0755.
    let mut at = String::new();
    for part in prefix.split('/') {
        at = if at.is_empty() { part.to_string() } else { format!("{at}/{part}") };
        want.insert(at.clone(), d(0o755));
    }
    for (path, entry) in [
        ("bin", d(0o755)),
        ("bin/syncgate", f(0o755)),
        ("lib", d(0o755)),
        ("lib/systemd", d(0o755)),
        ("lib/systemd/system", d(0o755)),
        ("lib/systemd/system/syncgate.service", f(0o644)),
        ("lib/systemd/system/syncgate.socket", f(0o644)),
        ("lib/sysusers.d", d(0o755)),
        ("lib/sysusers.d/syncgate.conf", f(0o644)),
        ("lib/tmpfiles.d", d(0o755)),
        ("lib/tmpfiles.d/syncgate.conf", f(0o644)),
        ("share", d(0o755)),
        ("share/man", d(0o755)),
        ("share/man/man8", d(0o755)),
        ("share/man/man8/syncgate.8.gz", f(0o644)),
    ] {
        want.insert(format!("{prefix}/{path}"), entry);
    }
    // The configuration directory may hold a secret: group-readable only (tmpfiles.d makes
    // the group syncgate on the target).
    want.insert("etc".into(), d(0o755));
    want.insert("etc/syncgate".into(), d(0o750));
    want.insert("etc/syncgate/syncgate.toml".into(), f(0o640));
    want
}

fn read(path: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(path.as_ref()).unwrap_or_else(|e| panic!("read {}: {e}", path.as_ref().display()))
}

fn repo_file(rel: &str) -> Vec<u8> {
    read(repo_root().join(rel))
}

/// What a file looks like on disk: equal before and after means nothing wrote to it.
#[derive(Debug, PartialEq, Eq)]
struct FileState {
    /// Hash of the content (the binary is tens of MB: not kept, not printed).
    content: u64,
    /// Permission bits: a rerun must not loosen or tighten them.
    mode: u32,
    /// A rewrite through a new file (what `install` does) changes these.
    inode: u64,
    mtime_ns: i128,
}

fn snapshot(root: &Path) -> BTreeMap<String, FileState> {
    tree(root)
        .into_iter()
        .filter(|(_, e)| !e.dir)
        .map(|(rel, e)| {
            let path = root.join(&rel);
            let meta = std::fs::metadata(&path).unwrap();
            let mut hasher = DefaultHasher::new();
            read(&path).hash(&mut hasher);
            let state = FileState {
                content: hasher.finish(),
                mode: e.mode,
                inode: meta.ino(),
                mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            };
            (rel, state)
        })
        .collect()
}

#[test]
fn install_stages_exactly_the_expected_tree() {
    let dest = TempDir::new("install");
    let out = install(&dest.0, &[]);
    assert_eq!(tree(&dest.0), expected_tree("usr/local"), "install.sh output:\n{out}");

    let at = |rel: &str| dest.0.join(rel);
    // assert!, not assert_eq!: a failure must not print tens of MB.
    assert!(
        read(at("usr/local/bin/syncgate")) == read(BIN),
        "the binary given is not what was installed"
    );
    // The repository's units are the ones for the default prefix: installed unchanged.
    for unit in ["syncgate.service", "syncgate.socket"] {
        let installed = read(at(&format!("usr/local/lib/systemd/system/{unit}")));
        assert_eq!(installed, repo_file(&format!("systemd/{unit}")), "{unit}");
    }
    assert_eq!(
        read(at("usr/local/lib/sysusers.d/syncgate.conf")),
        repo_file("systemd/syncgate.sysusers")
    );
    assert_eq!(
        read(at("usr/local/lib/tmpfiles.d/syncgate.conf")),
        repo_file("systemd/syncgate.tmpfiles")
    );
    assert_eq!(read(at("etc/syncgate/syncgate.toml")), repo_file("systemd/syncgate.toml"));
    // syncgate(8) as the installed binary prints it, dated by the binary's time when no
    // SOURCE_DATE_EPOCH is given (so a rerun writes the same bytes).
    let mut page = Vec::new();
    let gz = std::fs::File::open(at("usr/local/share/man/man8/syncgate.8.gz")).expect("man page");
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz), &mut page).expect("gunzip");
    let mtime = std::fs::metadata(BIN).expect("the binary").mtime();
    let printed = Command::new(BIN)
        .arg("__man")
        .env("SOURCE_DATE_EPOCH", mtime.to_string())
        .output()
        .expect("syncgate __man");
    assert!(
        printed.status.success() && page == printed.stdout,
        "the man page is not `syncgate __man`'s"
    );

    // Staging changes nothing on this machine; it tells the operator what finishes the job.
    for step in [
        "systemd-sysusers /usr/local/lib/sysusers.d/syncgate.conf",
        "systemd-tmpfiles --create /usr/local/lib/tmpfiles.d/syncgate.conf",
        "systemctl daemon-reload",
        "systemctl enable --now syncgate.service",
    ] {
        assert!(out.contains(step), "install.sh does not print `{step}`:\n{out}");
    }
}

#[test]
fn the_units_name_the_binary_under_the_chosen_prefix() {
    let dest = TempDir::new("prefix");
    install(&dest.0, &[("PREFIX", "/usr")]);
    assert_eq!(tree(&dest.0), expected_tree("usr"));
    let unit = String::from_utf8(read(dest.0.join("usr/lib/systemd/system/syncgate.service")))
        .expect("utf-8 unit");
    let exec: Vec<&str> = unit.lines().filter(|l| l.starts_with("Exec")).collect();
    assert_eq!(
        exec,
        [
            "ExecStartPre=/usr/bin/syncgate check-config /etc/syncgate/syncgate.toml",
            "ExecStart=/usr/bin/syncgate run --config /etc/syncgate/syncgate.toml",
            "ExecReload=/bin/kill -HUP $MAINPID",
        ]
    );
    let settings = unit.lines().filter(|l| !l.starts_with('#'));
    assert!(
        settings.clone().all(|l| !l.contains("/usr/local")),
        "a /usr/local path is left:\n{unit}"
    );
}

#[test]
fn a_second_install_writes_nothing() {
    let dest = TempDir::new("twice");
    install(&dest.0, &[]);
    let before = snapshot(&dest.0);
    let out = install(&dest.0, &[]);
    assert_eq!(snapshot(&dest.0), before, "the second run rewrote files:\n{out}");
    assert_eq!(
        tree(&dest.0),
        expected_tree("usr/local"),
        "no syncgate.toml.new for an unchanged config"
    );
    assert!(out.contains("/etc/syncgate/syncgate.toml (unchanged)"), "{out}");
}

#[test]
fn a_changed_config_is_kept_and_the_default_goes_beside_it() {
    let dest = TempDir::new("keep");
    install(&dest.0, &[]);
    let config = dest.0.join("etc/syncgate/syncgate.toml");
    let mine = "# the operator's own\nworkers = 3\n";
    std::fs::write(&config, mine).unwrap();

    let out = install(&dest.0, &[]);
    assert_eq!(read(&config), mine.as_bytes(), "install.sh replaced the operator's config");
    let new = dest.0.join("etc/syncgate/syncgate.toml.new");
    assert_eq!(read(&new), repo_file("systemd/syncgate.toml"));
    let mut want = expected_tree("usr/local");
    want.insert("etc/syncgate/syncgate.toml.new".into(), Entry { dir: false, mode: 0o640 });
    assert_eq!(tree(&dest.0), want);
    assert!(
        out.contains("syncgate.toml.new"),
        "the operator is not told about the .new file:\n{out}"
    );

    // Idempotent here too: the pending default is not written again.
    let before = snapshot(&dest.0);
    install(&dest.0, &[]);
    assert_eq!(snapshot(&dest.0), before);
}

#[test]
fn the_installed_config_passes_check_config() {
    let dest = TempDir::new("check");
    install(&dest.0, &[]);
    let out = check_config(&dest.0.join("etc/syncgate/syncgate.toml"));
    assert!(out.status.success(), "check-config refused the shipped config: {}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));

    // The ExecStartPre gate works: a broken file is refused with its key named.
    let broken = dest.0.join("broken.toml");
    std::fs::write(&broken, "workers = \"many\"\n").unwrap();
    let out = check_config(&broken);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("workers"), "{}", describe(&out));
}

/// `syncgate check-config FILE`, without the caller's SYNCGATE_* settings.
fn check_config(file: &Path) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("check-config").arg(file);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SYNCGATE_") {
            cmd.env_remove(name);
        }
    }
    cmd.output().expect("run syncgate check-config")
}

/// The shipped file documents every setting, truthfully: each key of the defaults appears
/// as a `# key = value` line, and with those lines uncommented the file loads to exactly the
/// configuration of no file at all (so every value shown is the real default, and every key
/// shown exists: unknown keys are errors).
#[test]
fn the_shipped_config_shows_every_setting_with_its_real_default() {
    let text = String::from_utf8(repo_file("systemd/syncgate.toml")).expect("utf-8 config");
    let mut section = String::new();
    let mut shown = Vec::new();
    let mut uncommented = String::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = format!("{name}.");
        }
        match line.strip_prefix("# ").filter(|rest| setting_key(rest).is_some()) {
            Some(rest) => {
                shown.push(format!("{section}{}", setting_key(rest).unwrap()));
                uncommented.push_str(rest);
            }
            None => uncommented.push_str(line),
        }
        uncommented.push('\n');
    }
    shown.sort();
    let mut keys = default_keys();
    // Test-only routes are deliberately not advertised to operators.
    keys.retain(|k| !k.starts_with("conformance."));
    assert_eq!(shown, keys, "settings shown vs. settings that exist");

    let dir = TempDir::new("defaults");
    let file = dir.0.join("uncommented.toml");
    std::fs::write(&file, &uncommented).unwrap();
    let loaded = Config::load(Some(&file)).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
    assert_eq!(loaded, Config::load(None).expect("the defaults load"), "\n{uncommented}");
}

/// README's "Configuration" table names every setting the daemon knows, with its real
/// default: each key with a default appears with that value (`10 MiB`, `0 (off)` and the like
/// read as numbers); every key it calls `unset` has no default and is one the daemon knows
/// (setting it may fail validation, never as an unknown key); only the settings computed at
/// start say so in words.
#[test]
fn the_readme_configuration_table_names_every_setting_with_its_real_default() {
    // Keys whose default is worked out at start (their `Config::default()` value, 0 or
    // empty, means "derive it"), and what the README says instead.
    const COMPUTED: [(&str, &str); 3] = [
        ("workers", "cores - 1, at least 1"),
        ("task_id", "random per start"),
        ("limits.max_connections", "workers x (RLIMIT_NOFILE - 64)"),
    ];
    let readme = String::from_utf8(repo_file("README.md")).expect("utf-8 README");
    let start = readme.find("| key | default | meaning |").expect("README's configuration table");
    let mut table = BTreeMap::new();
    for line in readme[start..].lines().skip(2).take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.split(" | ").collect();
        let keys: Vec<&str> = cells[0].trim_start_matches("| ").split(", ").collect();
        // Two settings in a row give two defaults, or one for both (`unset`); one setting
        // gives its cell whole (it may be prose with commas).
        let defaults: Vec<&str> = match keys.len() {
            1 => vec![cells[1]],
            n if !cells[1].contains(", ") => vec![cells[1]; n],
            _ => cells[1].split(", ").collect(),
        };
        assert_eq!(keys.len(), defaults.len(), "README row {line:?}");
        for (key, default) in keys.iter().zip(defaults) {
            let key = key.trim_matches('`');
            assert!(table.insert(key.to_owned(), default.to_owned()).is_none(), "{key} twice");
        }
    }

    let defaults = toml::Table::try_from(Config::default()).expect("the defaults serialise");
    let mut with_default = default_keys();
    with_default.retain(|k| !k.starts_with("conformance."));
    for key in &with_default {
        let shown = table.get(key).unwrap_or_else(|| panic!("README's table lacks {key}"));
        if let Some((_, words)) = COMPUTED.iter().find(|(k, _)| k == key) {
            assert_eq!(shown, words, "{key}");
            continue;
        }
        let value = key.split('.').fold(None::<&toml::Value>, |at, part| match at {
            None => defaults.get(part),
            Some(v) => v.get(part),
        });
        let real = match value.expect("a default key has a value") {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        assert_eq!(readme_value(shown), real, "README's default of {key} ({shown:?})");
    }
    // Settings without a default are not in `Config::default()`'s serialisation; the loader
    // names every key of a section when it refuses an unknown one.
    let sections = defaults.iter().filter(|(_, v)| v.is_table()).map(|(k, _)| k.as_str());
    for section in sections.chain([""]) {
        for key in known_keys(section) {
            let key = if section.is_empty() { key } else { format!("{section}.{key}") };
            let shown = table.contains_key(&key) || key.starts_with("conformance.");
            assert!(shown || defaults.contains_key(&key), "README's table lacks {key}");
        }
    }
    for (key, shown) in &table {
        if with_default.contains(key) || key.starts_with("conformance.") {
            continue;
        }
        assert_eq!(shown, "unset", "{key}: not a setting with a default, so it must be unset");
        // A setting the daemon knows: whatever it says of this value, not that the key is
        // unknown.
        let (section, name) = key.split_once('.').unwrap_or(("", key));
        let dir = TempDir::new("readme-key");
        let file = dir.0.join("one.toml");
        std::fs::write(&file, format!("[{section}]\n{name} = \"x\"\n")).unwrap();
        if let Err(e) = Config::load(Some(&file)) {
            assert!(!e.to_string().contains("unknown field"), "{key}: {e}");
        }
    }
}

/// Every key `Config::load` accepts in `section` ("" for the top level), read from its refusal
/// of one it does not know.
fn known_keys(section: &str) -> Vec<String> {
    let dir = TempDir::new("known-keys");
    let file = dir.0.join("probe.toml");
    let header = if section.is_empty() { String::new() } else { format!("[{section}]\n") };
    std::fs::write(&file, format!("{header}no_such_setting = 1\n")).unwrap();
    let error = Config::load(Some(&file)).expect_err("an unknown key is refused").to_string();
    let (_, list) = error
        .split_once("expected one of ")
        .or_else(|| error.split_once("expected "))
        .unwrap_or_else(|| panic!("{error}"));
    // serde lists one key as "`a`", two as "`a` or `b`", more as "`a`, `b`, `c`".
    list.replace(" or ", ", ").split(", ").map(|k| k.trim().trim_matches('`').to_owned()).collect()
}

/// A default as README's table writes it, as the TOML value prints: backticks and quotes
/// dropped, `N MiB` in bytes, a number's remark in parentheses left out.
fn readme_value(shown: &str) -> String {
    let plain = shown.trim_matches('`').trim_matches('"');
    if let Some(mib) = plain.strip_suffix(" MiB") {
        return (mib.parse::<u64>().expect("a number of MiB") << 20).to_string();
    }
    match plain.split_once(" (") {
        Some((number, _)) if number.parse::<u64>().is_ok() => number.to_owned(),
        _ => plain.to_owned(),
    }
}

/// The key of a `key = value` line with a plain key (a commented-out setting, not prose).
fn setting_key(line: &str) -> Option<&str> {
    let (key, _) = line.split_once(" = ")?;
    (!key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')).then_some(key)
}

/// Every `section.key` that has a default (keys whose default is "unset" have none).
fn default_keys() -> Vec<String> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
        for (key, value) in table {
            match value {
                toml::Value::Table(t) => walk(&format!("{prefix}{key}."), t, out),
                _ => out.push(format!("{prefix}{key}")),
            }
        }
    }
    let defaults = toml::Table::try_from(Config::default()).expect("the defaults serialise");
    let mut out = Vec::new();
    walk("", &defaults, &mut out);
    out.sort();
    out
}

#[test]
fn uninstall_removes_what_install_added_and_keeps_the_config() {
    let dest = TempDir::new("uninstall");
    install(&dest.0, &[]);
    let config = dest.0.join("etc/syncgate/syncgate.toml");
    std::fs::write(&config, "workers = 3\n").unwrap();
    install(&dest.0, &[]); // adds syncgate.toml.new
    let out = uninstall(&dest.0, &[]);

    let files: Vec<String> =
        tree(&dest.0).into_iter().filter(|(_, e)| !e.dir).map(|(p, _)| p).collect();
    assert_eq!(files, ["etc/syncgate/syncgate.toml"], "uninstall.sh output:\n{out}");
    assert_eq!(read(&config), b"workers = 3\n");

    // Again: nothing left to remove is not an error.
    uninstall(&dest.0, &[]);

    uninstall(&dest.0, &["--purge"]);
    let files: Vec<String> =
        tree(&dest.0).into_iter().filter(|(_, e)| !e.dir).map(|(p, _)| p).collect();
    assert!(files.is_empty(), "left after --purge: {files:?}");
    assert!(!dest.0.join("etc/syncgate").exists());
}

#[test]
fn bad_input_is_refused_before_anything_is_installed() {
    let dest = TempDir::new("refuse");
    let empty = TempDir::new("no-target");
    let empty_target = empty.0.to_str().expect("utf-8 temp path");
    // (install.sh arguments, environment, exit code, what stderr must say)
    let refusals = [
        (vec!["--no-build", "--frobnicate"], vec![("SYNCGATE_BIN", BIN)], 2, "unknown argument"),
        (vec!["--no-build"], vec![("SYNCGATE_BIN", BIN), ("PREFIX", "usr/local")], 2, "PREFIX"),
        (vec!["--no-build"], vec![("SYNCGATE_BIN", BIN), ("PREFIX", "/opt/a b")], 2, "PREFIX"),
        // Not a syncgate binary: it does not answer `version`.
        (vec![], vec![("SYNCGATE_BIN", "/bin/false")], 1, "does not run"),
        // --no-build with nothing built where cargo would have put it.
        (vec!["--no-build"], vec![("CARGO_TARGET_DIR", empty_target)], 1, "no syncgate binary"),
    ];
    for (args, env, code, message) in refusals {
        let out = script("install.sh", &dest.0, &args, &env);
        assert_eq!(out.status.code(), Some(code), "{args:?} {env:?}: {}", describe(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{args:?} {env:?}: {}", describe(&out));
    }
    assert!(tree(&dest.0).is_empty(), "a refused install left files: {:?}", tree(&dest.0));
    let out = script("uninstall.sh", &dest.0, &["--everything"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
}
