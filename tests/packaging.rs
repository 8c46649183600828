//! The Debian package (scripts/deb.sh, `[package.metadata.deb]` in Cargo.toml), built with
//! cargo-deb and checked the way a Debian 12 system meets it:
//!
//! - lintian, Debian's package checker, reports nothing but the overrides the package ships,
//!   each with its reason (packaging/debian/lintian-overrides);
//! - dpkg installs it into a scratch root and runs its maintainer scripts there: exactly the
//!   files expected, with their modes; the user and the directories postinst makes; the
//!   conffile registered; the units name files the package installed, and pass
//!   `systemd-analyze verify` with their man page; syncgate(8) renders without a warning;
//!   nothing is enabled or started;
//! - removing it keeps the configuration and the state, purging removes the state.
//!
//! The package holds the binary cargo built for these tests (scripts/deb.sh --no-build, from
//! a target directory of the test's own): the packaging is what is checked, and it is the same
//! for a release build, which would cost CI minutes more.
//!
//! The scratch root is installed with `dpkg --root --force-script-chrootless`: dpkg otherwise
//! chroots into the root to run the maintainer scripts, and an empty root has no shell, no
//! systemd-sysusers and no systemd-tmpfiles to run. Without the chroot the scripts run this
//! machine's tools, and they point them at the root through DPKG_ROOT, as debhelper's scripts
//! do. The root's dpkg database holds the packages the package depends on, as this machine
//! has them, so dpkg itself checks the Depends field against a Debian 12 system.
//!
//! Needs root (dpkg and systemd-tmpfiles give files to the new user), cargo-deb, lintian,
//! dpkg, systemd's tools and man-db: scripts/test.sh installs them. A missing tool fails the
//! test; nothing here skips.

mod common;

use common::{describe, repo_root, TempDir, BIN};
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Runs `cmd`; a tool that is not installed fails the test, naming its Debian package.
fn run(cmd: &mut Command, package: &str) -> Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    match cmd.env("SYSTEMD_LOG_COLOR", "0").output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{program}` is not installed: it comes with {package} (scripts/test.sh installs it)"
        ),
        Err(e) => panic!("run {program}: {e}"),
    }
}

/// Like [`run`], and the command must succeed.
fn run_ok(cmd: &mut Command, package: &str) -> Output {
    let out = run(cmd, package);
    assert!(out.status.success(), "{cmd:?} failed: {}", describe(&out));
    out
}

fn assert_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs as root: dpkg and systemd-tmpfiles give files to the syncgate user"
    );
}

/// A package built by scripts/deb.sh from the test binary; the temp dir holds it.
struct Package {
    deb: PathBuf,
    _target: TempDir,
}

fn build_package() -> Package {
    let target = TempDir::new("deb-target");
    // cargo-deb's `target/release/` assets resolve to CARGO_TARGET_DIR/release.
    let release = target.0.join("release");
    std::fs::create_dir(&release).unwrap();
    std::fs::copy(BIN, release.join("syncgate")).expect("copy the test binary");
    let mut cmd = Command::new(repo_root().join("scripts/deb.sh"));
    cmd.arg("--no-build").env("CARGO_TARGET_DIR", &target.0);
    let out = run_ok(&mut cmd, "cargo-deb (cargo install cargo-deb)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    // The name the issue asks for: syncgate_<version>_amd64.deb, where deb.sh says it is.
    assert_eq!(
        deb,
        target.0.join("debian").join(format!("syncgate_{VERSION}_amd64.deb")),
        "deb.sh output:\n{}",
        describe(&out)
    );
    assert!(deb.is_file(), "no package at {}", deb.display());
    Package { deb, _target: target }
}

/// `dpkg-deb --field DEB FIELD`.
fn control_field(deb: &Path, field: &str) -> String {
    let out = run_ok(Command::new("dpkg-deb").arg("--field").arg(deb).arg(field), "dpkg");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

// ---------------------------------------------------------------------------------------------
// lintian
// ---------------------------------------------------------------------------------------------

/// Every tag lintian knows, pedantic and experimental ones included, fails the test unless
/// the package overrides it (an override prints `O:`, with its reason as `N:` lines). An
/// override that matches nothing is reported as `unused-override` and fails it too. (Read
/// from the output, not with `--fail-on`: lintian 2.116 counts shown overrides against it.)
#[test]
fn lintian_reports_nothing_but_the_explained_overrides() {
    let package = build_package();
    let out = run(
        Command::new("lintian")
            .args(["--info", "--display-info", "--display-experimental", "--pedantic"])
            .arg("--show-overrides")
            .arg(&package.deb),
        "the Debian package lintian",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let tags: Vec<&str> = stdout
        .lines()
        .filter(|l| l.len() > 2 && &l[1..3] == ": " && !l.starts_with("N:"))
        .collect();
    let unexplained: Vec<&&str> = tags.iter().filter(|l| !l.starts_with("O:")).collect();
    assert!(unexplained.is_empty(), "lintian tags: {unexplained:#?}\n{}", describe(&out));
    assert!(out.status.success(), "lintian failed: {}", describe(&out));

    // Each override in the file was used (printed as O:, `*` standing for any text), so none
    // is stale. (lintian's own unused-override tag says the same; this also names it.)
    let overrides = std::fs::read_to_string(repo_root().join("packaging/debian/lintian-overrides"))
        .expect("packaging/debian/lintian-overrides");
    for line in overrides.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')) {
        assert!(
            tags.iter().any(|t| t.strip_prefix("O: ").is_some_and(|t| glob(line, t))),
            "override not used: {line}\n{stdout}"
        );
    }
}

/// Whether `text` matches `pattern`, in which `*` stands for any text.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if parts.len() == 1 {
        return pattern == text;
    }
    let Some(mut rest) = text.strip_prefix(first) else { return false };
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

#[test]
fn glob_matches_as_lintian_overrides_do() {
    let tag = "syncgate: spelling-error-in-binary wtH with [usr/bin/syncgate]";
    assert!(glob("syncgate: spelling-error-in-binary * [usr/bin/syncgate]", tag));
    assert!(glob(tag, tag));
    assert!(!glob("syncgate: spelling-error-in-binary * [usr/bin/other]", tag));
    assert!(!glob("syncgate: no-md5sums-control-file", tag));
    assert!(!glob("a*a", "a"));
}

// ---------------------------------------------------------------------------------------------
// Install, remove, purge in a scratch root
// ---------------------------------------------------------------------------------------------

/// A root with an empty dpkg database except for the packages `deb` depends on, copied from
/// this machine's (see the module's comment).
fn scratch_root(deb: &Path) -> TempDir {
    let root = TempDir::new("deb-root");
    let admin = root.0.join("var/lib/dpkg");
    for dir in ["info", "updates", "triggers"] {
        std::fs::create_dir_all(admin.join(dir)).unwrap();
    }
    std::fs::create_dir_all(root.0.join("var/log")).unwrap();
    std::fs::write(admin.join("available"), "").unwrap();

    // Every package named in Depends (each alternative) that this machine has installed.
    let depends = control_field(deb, "Depends");
    let names: Vec<&str> = depends
        .split([',', '|'])
        .filter_map(|alt| alt.split_whitespace().next())
        .filter(|name| !name.is_empty())
        .collect();
    let out = run(
        Command::new("dpkg-query")
            .arg("--showformat=${db:Status-Abbrev}\t${Package}\t${Architecture}\t${Multi-Arch}\t${Version}\n")
            .arg("--show")
            .args(&names),
        "dpkg",
    );
    let mut status = String::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        let [state, name, arch, multi_arch, version] = fields[..] else { continue };
        if state.trim() != "ii" {
            continue;
        }
        status.push_str(&format!(
            "Package: {name}\nStatus: install ok installed\nArchitecture: {arch}\n"
        ));
        if !multi_arch.is_empty() {
            status.push_str(&format!("Multi-Arch: {multi_arch}\n"));
        }
        status.push_str(&format!("Version: {version}\n\n"));
        // The file list dpkg expects of an installed package (these have no files here).
        let list = if multi_arch == "same" {
            format!("{name}:{arch}.list")
        } else {
            format!("{name}.list")
        };
        std::fs::write(admin.join("info").join(list), "").unwrap();
    }
    std::fs::write(admin.join("status"), status).unwrap();
    root
}

/// `dpkg --root=ROOT ARGS`, maintainer scripts run without chroot (see the module's comment).
fn dpkg(root: &Path, args: &[&std::ffi::OsStr]) -> Output {
    let mut cmd = Command::new("dpkg");
    cmd.arg(format!("--root={}", root.display()))
        .arg("--force-script-chrootless")
        // The log goes into the root (its var/log), not this machine's dpkg.log.
        .arg(format!("--log={}", root.join("var/log/dpkg.log").display()))
        .args(args);
    run(&mut cmd, "dpkg")
}

/// One entry of the installed tree: a directory, a file or a link, and its mode.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir(Mode),
    File(Mode),
    Link(String),
}

/// Permission bits, printed in octal in a failure.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Mode(u32);

impl std::fmt::Debug for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#o}", self.0)
    }
}

/// Every path under `root` (relative), but the dpkg database, the log and the account files
/// that systemd-sysusers writes (checked on their own).
fn tree(root: &Path) -> BTreeMap<String, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Entry>) {
        for entry in std::fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("dir entry").path();
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == "var/lib/dpkg" || rel == "var/log" {
                continue;
            }
            if ["passwd", "group", "shadow", "gshadow", ".pwd.lock"]
                .iter()
                .any(|f| rel == format!("etc/{f}") || rel == format!("etc/{f}-"))
            {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            let mode = Mode(meta.permissions().mode() & 0o7777);
            if meta.is_symlink() {
                let to = std::fs::read_link(&path).unwrap().to_string_lossy().into_owned();
                out.insert(rel, Entry::Link(to));
            } else if meta.is_dir() {
                out.insert(rel, Entry::Dir(mode));
                walk(root, &path, out);
            } else {
                out.insert(rel, Entry::File(mode));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The tree the package leaves once installed and configured.
fn expected_tree() -> BTreeMap<String, Entry> {
    let dir = |mode| Entry::Dir(Mode(mode));
    let file = |mode| Entry::File(Mode(mode));
    [
        ("etc", dir(0o755)),
        // tmpfiles.d's modes (the package ships 0755/0644, postinst tightens them).
        ("etc/syncgate", dir(0o750)),
        ("etc/syncgate/syncgate.toml", file(0o640)),
        ("usr", dir(0o755)),
        ("usr/bin", dir(0o755)),
        ("usr/bin/syncgate", file(0o755)),
        ("usr/lib", dir(0o755)),
        ("usr/lib/systemd", dir(0o755)),
        ("usr/lib/systemd/system", dir(0o755)),
        ("usr/lib/systemd/system/syncgate.service", file(0o644)),
        ("usr/lib/systemd/system/syncgate.socket", file(0o644)),
        ("usr/lib/sysusers.d", dir(0o755)),
        ("usr/lib/sysusers.d/syncgate.conf", file(0o644)),
        ("usr/lib/tmpfiles.d", dir(0o755)),
        ("usr/lib/tmpfiles.d/syncgate.conf", file(0o644)),
        ("usr/share", dir(0o755)),
        ("usr/share/doc", dir(0o755)),
        ("usr/share/doc/syncgate", dir(0o755)),
        ("usr/share/doc/syncgate/README.md", file(0o644)),
        ("usr/share/doc/syncgate/changelog.gz", file(0o644)),
        ("usr/share/doc/syncgate/copyright", file(0o644)),
        ("usr/share/lintian", dir(0o755)),
        ("usr/share/lintian/overrides", dir(0o755)),
        ("usr/share/lintian/overrides/syncgate", file(0o644)),
        ("usr/share/man", dir(0o755)),
        ("usr/share/man/man8", dir(0o755)),
        ("usr/share/man/man8/syncgate.8.gz", file(0o644)),
        ("var", dir(0o755)),
        ("var/lib", dir(0o755)),
        ("var/lib/syncgate", dir(0o750)),
    ]
    .into_iter()
    .map(|(p, e)| (p.to_string(), e))
    .collect()
}

/// The uid and gid of `name` in the root's /etc/passwd, with its home and shell.
fn account(root: &Path, name: &str) -> (u32, u32, String, String) {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("etc/passwd in the root");
    let fields: Vec<&str> = passwd
        .lines()
        .find(|l| l.split(':').next() == Some(name))
        .unwrap_or_else(|| panic!("no {name} user in the root's passwd:\n{passwd}"))
        .split(':')
        .collect();
    (fields[2].parse().unwrap(), fields[3].parse().unwrap(), fields[5].into(), fields[6].into())
}

fn owner(path: &Path) -> (u32, u32) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.uid(), meta.gid())
}

/// The `Key=Value` settings of a unit, comments and sections left out.
fn unit_values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines().filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('=')).collect()
}

fn gunzip(path: &Path) -> String {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut text = String::new();
    flate2::read::GzDecoder::new(file).read_to_string(&mut text).expect("gunzip");
    text
}

#[test]
fn it_installs_removes_and_purges_in_a_scratch_root() {
    assert_root();
    let package = build_package();
    let root = scratch_root(&package.deb);
    let r = &root.0;

    let out = dpkg(r, &["--install".as_ref(), package.deb.as_os_str()]);
    assert!(out.status.success(), "dpkg --install: {}", describe(&out));

    // Exactly these files, with these modes: nothing enabled (no .wants link), nothing else.
    assert_eq!(tree(r), expected_tree(), "dpkg output:\n{}", describe(&out));

    // The user the unit runs as, made by postinst; the directories it owns or reads.
    let service_text =
        std::fs::read_to_string(r.join("usr/lib/systemd/system/syncgate.service")).unwrap();
    let user = unit_values(&service_text, "User");
    assert_eq!(user, ["syncgate"], "User=");
    let (uid, gid, home, shell) = account(r, "syncgate");
    assert!(uid > 0 && uid < 1000, "a system uid: {uid}");
    assert_eq!(home, "/var/lib/syncgate");
    assert!(shell.ends_with("nologin"), "shell {shell}");
    let state = unit_values(&service_text, "StateDirectory");
    assert_eq!(state, ["syncgate"], "StateDirectory=");
    assert_eq!(owner(&r.join("var/lib").join(state[0])), (uid, gid), "the state directory's owner");
    assert_eq!(
        owner(&r.join("etc/syncgate")),
        (0, gid),
        "/etc/syncgate: root, the service's group"
    );
    assert_eq!(owner(&r.join("etc/syncgate/syncgate.toml")), (0, gid), "the config's owner");

    // Every path the unit's Exec lines and EnvironmentFile name is there (or, for the optional
    // env file, its directory), and the binary is the one packaged.
    let execs: Vec<&str> =
        ["ExecStartPre", "ExecStart"].iter().flat_map(|k| unit_values(&service_text, k)).collect();
    assert_eq!(execs.len(), 2, "{service_text}");
    for exec in &execs {
        let words: Vec<&str> = exec.split_whitespace().collect();
        assert_eq!(words[0], "/usr/bin/syncgate", "{exec}");
        let config = words.last().unwrap();
        assert_eq!(*config, "/etc/syncgate/syncgate.toml", "{exec}");
        assert!(r.join(&config[1..]).is_file(), "{config} is not installed");
    }
    let version = run_ok(Command::new(r.join("usr/bin/syncgate")).arg("version"), "syncgate");
    assert_eq!(String::from_utf8_lossy(&version.stdout).trim(), format!("syncgate {VERSION}"));
    let env_file = unit_values(&service_text, "EnvironmentFile");
    assert_eq!(env_file, ["-/etc/syncgate/env"]);
    assert!(r.join("etc/syncgate").is_dir());

    // The packaged config is the repository's, and valid.
    assert_eq!(
        std::fs::read(r.join("etc/syncgate/syncgate.toml")).unwrap(),
        std::fs::read(repo_root().join("systemd/syncgate.toml")).unwrap()
    );
    let check = run(
        Command::new(BIN).arg("check-config").arg(r.join("etc/syncgate/syncgate.toml")).env_clear(),
        "syncgate",
    );
    assert!(check.status.success(), "{}", describe(&check));

    // dpkg knows the config as a conffile, with the checksum of what it installed.
    let conffiles = run_ok(
        Command::new("dpkg-query")
            .arg(format!("--admindir={}", r.join("var/lib/dpkg").display()))
            .args(["--showformat=${Conffiles}", "--show", "syncgate"]),
        "dpkg",
    );
    let conffiles = String::from_utf8_lossy(&conffiles.stdout).trim().to_string();
    let md5 = run_ok(Command::new("md5sum").arg(r.join("etc/syncgate/syncgate.toml")), "coreutils");
    let md5 = String::from_utf8_lossy(&md5.stdout).split_whitespace().next().unwrap().to_string();
    assert_eq!(conffiles, format!("/etc/syncgate/syncgate.toml {md5}"), "the conffiles");

    // The units pass systemd-analyze verify as installed; the binary they name is looked for
    // in the root (systemd-analyze checks it exists), and so is the man page of their
    // Documentation= line (MANPATH: the root's, and only it).
    let units = TempDir::new("deb-units");
    let mut paths = Vec::new();
    for unit in ["syncgate.service", "syncgate.socket"] {
        let text = std::fs::read_to_string(r.join("usr/lib/systemd/system").join(unit)).unwrap();
        let path = units.0.join(unit);
        let in_root = r.join("usr/bin/syncgate");
        std::fs::write(&path, text.replace("/usr/bin/syncgate", in_root.to_str().unwrap()))
            .unwrap();
        paths.push(path);
    }
    assert_eq!(unit_values(&service_text, "Documentation"), ["man:syncgate(8)"]);
    let verify = run(
        Command::new("systemd-analyze")
            .arg("verify")
            .args(&paths)
            .env("MANPATH", r.join("usr/share/man")),
        "the Debian package systemd",
    );
    assert!(
        verify.status.success() && verify.stdout.is_empty() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        describe(&verify)
    );

    // The man page renders with groff's warnings on, and says what the README says.
    let page = r.join("usr/share/man/man8/syncgate.8.gz");
    let man = run(
        Command::new("man").args(["--warnings", "--local-file"]).arg(&page).env("MANWIDTH", "100"),
        "the Debian package man-db",
    );
    assert!(man.status.success() && man.stderr.is_empty(), "man: {}", describe(&man));
    let rendered = String::from_utf8_lossy(&man.stdout);
    assert!(rendered.contains(&format!("syncgate {VERSION}")), "{rendered}");
    // Every path the FILES section lists is in the installed root.
    let files = rendered
        .split("\nFILES\n")
        .nth(1)
        .and_then(|rest| rest.split("\nEXIT STATUS\n").next())
        .unwrap_or_else(|| panic!("no FILES section:\n{rendered}"));
    let listed: Vec<&str> = files
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.starts_with('/'))
        .collect();
    assert!(listed.len() >= 8, "FILES lists {listed:?}");
    for path in listed {
        // The optional env file is the operator's to write.
        if path != "/etc/syncgate/env" {
            assert!(r.join(&path[1..]).exists(), "FILES names {path}, which is not installed");
        }
    }
    assert!(gunzip(&page).starts_with(".ie"), "a roff page");

    // Removal: the program goes, the configuration and the state stay (and the user).
    std::fs::write(r.join("var/lib/syncgate/syncgate.db"), b"state").unwrap();
    let wants = r.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).unwrap();
    // What `systemctl enable syncgate` leaves behind.
    std::os::unix::fs::symlink(
        "/usr/lib/systemd/system/syncgate.service",
        wants.join("syncgate.service"),
    )
    .unwrap();
    let out = dpkg(r, &["--remove".as_ref(), "syncgate".as_ref()]);
    assert!(out.status.success(), "dpkg --remove: {}", describe(&out));
    assert!(!r.join("usr/bin/syncgate").exists(), "the binary is left after removal");
    assert!(!r.join("usr/lib/systemd/system/syncgate.service").exists());
    assert!(r.join("etc/syncgate/syncgate.toml").is_file(), "removal took the conffile");
    assert_eq!(std::fs::read(r.join("var/lib/syncgate/syncgate.db")).unwrap(), b"state");
    assert!(wants.join("syncgate.service").is_symlink(), "removal took the operator's enablement");

    // Purge: the state, the conffile and the enablement go; the user stays (Debian keeps
    // system users).
    let out = dpkg(r, &["--purge".as_ref(), "syncgate".as_ref()]);
    assert!(out.status.success(), "dpkg --purge: {}", describe(&out));
    assert!(!r.join("var/lib/syncgate").exists(), "purge left /var/lib/syncgate");
    assert!(!r.join("etc/syncgate").exists(), "purge left /etc/syncgate");
    assert!(!wants.join("syncgate.service").is_symlink(), "purge left the enablement link");
    account(r, "syncgate");
}

// ---------------------------------------------------------------------------------------------
// The man page and the README
// ---------------------------------------------------------------------------------------------

/// The commands in the README's "Running" block, as `syncgate NAME [ARGS]` lines.
fn readme_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let running = readme.split("\n## Running\n").nth(1).expect("a Running section");
    let block = running.split("```").nth(1).expect("a code block in Running");
    block
        .lines()
        .filter_map(|l| l.trim().strip_prefix("syncgate "))
        .map(|l| l.split('#').next().unwrap().trim().to_string())
        .collect()
}

/// syncgate(8) and the README's "Running" list the same commands, every option the README
/// gives a command is the man page's too (the README summarises: check-config's `--config`
/// is left out there), and the man page's routes are the README's.
#[test]
fn the_man_page_and_the_readme_agree() {
    let out = run_ok(Command::new(BIN).arg("__man").env("SOURCE_DATE_EPOCH", "0"), "syncgate");
    let page = String::from_utf8(out.stdout).expect("utf-8 roff");
    assert!(page.contains(".TH syncgate 8 1970-01-01"), "date from SOURCE_DATE_EPOCH:\n{page}");
    // The SYNOPSIS lines, without roff's font escapes.
    let synopsis: Vec<String> = page
        .split(".SH SYNOPSIS\n")
        .nth(1)
        .and_then(|s| s.split(".SH ").next())
        .expect("a SYNOPSIS")
        .lines()
        .filter(|l| !l.starts_with('.'))
        .map(|l| {
            let plain = l.replace("\\fB", "").replace("\\fI", "").replace("\\fR", "");
            plain.replace("\\-", "-").trim_start_matches("syncgate ").trim().to_string()
        })
        .collect();
    let mut readme = readme_commands();
    assert!(!readme.is_empty());
    let words = |line: &str| -> (String, Vec<String>) {
        let mut it = line.split_whitespace();
        let name = it.next().unwrap_or_default().to_string();
        let mut opts: Vec<String> = it
            .map(|w| w.trim_matches(['[', ']']).to_string())
            .filter(|w| w.starts_with("--"))
            .collect();
        opts.sort();
        (name, opts)
    };
    let man: BTreeMap<String, Vec<String>> = synopsis.iter().map(|l| words(l)).collect();
    let readme_words: BTreeMap<String, Vec<String>> = readme.iter().map(|l| words(l)).collect();
    readme.sort();
    assert_eq!(
        man.keys().collect::<Vec<_>>(),
        readme_words.keys().collect::<Vec<_>>(),
        "commands: man SYNOPSIS {synopsis:#?} vs README Running {readme:#?}"
    );
    for (command, options) in &readme_words {
        for option in options {
            assert!(man[command].contains(option), "README: {command} {option}; man: {man:?}");
        }
    }

    // The routes of the man page's HTTP ROUTES section are the README's table's.
    let readme_text = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    for route in ["GET /", "GET /keepalive", "GET /metrics"] {
        assert!(readme_text.contains(&format!("| `{route}` |")), "README lacks {route}");
        assert!(page.contains(route), "man page lacks {route}");
    }
}
