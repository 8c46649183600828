#!/usr/bin/env bash
# Installs syncgate: the binary, the systemd units, the sysusers.d and tmpfiles.d entries,
# the man page syncgate(8) and a commented default configuration.
#
#   scripts/install.sh                        cargo build --release --locked, then install
#   scripts/install.sh --no-build             install target/release/syncgate as it is
#   SYNCGATE_BIN=path scripts/install.sh      install that binary (implies --no-build)
#   DESTDIR=/tmp/root PREFIX=/usr scripts/install.sh    stage into a tree (packaging, tests)
#
# Layout, PREFIX defaulting to /usr/local (systemd reads units, sysusers.d and tmpfiles.d
# from /usr/local/lib as well as /usr/lib; units under another PREFIX need `systemctl link`):
#   PREFIX/bin/syncgate                                 0755
#   PREFIX/lib/systemd/system/syncgate.{service,socket} 0644, Exec lines naming PREFIX/bin
#   PREFIX/lib/sysusers.d/syncgate.conf                 0644
#   PREFIX/lib/tmpfiles.d/syncgate.conf                 0644
#   PREFIX/share/man/man8/syncgate.8.gz                 0644, printed by the binary (`syncgate __man`)
#   /etc/syncgate/                                      0750
#   /etc/syncgate/syncgate.toml                         0640, only if there is none
# The configuration directory is /etc/syncgate whatever PREFIX is (the units name it).
#
# An existing /etc/syncgate/syncgate.toml is never touched: if it differs from the shipped
# default, the default goes to syncgate.toml.new beside it. Running the script twice writes
# nothing new. Ownership (root:syncgate on /etc/syncgate) comes from tmpfiles.d, once the
# user exists, so staging into DESTDIR needs no root.
#
# With DESTDIR set the script changes nothing outside DESTDIR and prints the commands that
# finish the installation on the target. Without DESTDIR, as root, it runs the idempotent
# ones (systemd-sysusers, systemd-tmpfiles --create, systemctl daemon-reload) and leaves
# starting the service to the operator.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${PREFIX:-/usr/local}"
DESTDIR="${DESTDIR:-}"
# Directories get 0755 and files the modes given below, whatever the caller's umask.
umask 022

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

build=1
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "install.sh: unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

# Absolute, and plain enough to go into a unit file and a sed replacement unquoted.
if ! [[ "$PREFIX" =~ ^/[A-Za-z0-9._/+-]*$ ]]; then
    echo "install.sh: PREFIX must be an absolute path of [A-Za-z0-9._/+-], not '$PREFIX'" >&2
    exit 2
fi
PREFIX="${PREFIX%/}"
BINDIR="$PREFIX/bin"
UNITDIR="$PREFIX/lib/systemd/system"
SYSUSERSDIR="$PREFIX/lib/sysusers.d"
TMPFILESDIR="$PREFIX/lib/tmpfiles.d"
MANDIR="$PREFIX/share/man/man8"
CONFDIR=/etc/syncgate
# The binary path written in the repository's unit file, replaced by BINDIR's on install.
UNIT_BIN=/usr/local/bin/syncgate

if [ -n "${SYNCGATE_BIN:-}" ]; then
    bin="$SYNCGATE_BIN"
else
    bin="${CARGO_TARGET_DIR:-$ROOT/target}/release/syncgate"
    if [ "$build" = 1 ]; then
        echo "==> cargo build --release --locked"
        (cd "$ROOT" && cargo build --release --locked --bin syncgate)
    fi
fi
if [ ! -x "$bin" ]; then
    echo "install.sh: no syncgate binary at $bin (build it, or set SYNCGATE_BIN)" >&2
    exit 1
fi
# Catches a wrong file (or one built for another machine) before anything is installed.
if ! version="$("$bin" version)"; then
    echo "install.sh: $bin does not run" >&2
    exit 1
fi

# install_file MODE SOURCE TARGET: copies SOURCE to DESTDIR/TARGET with MODE, unless TARGET
# already has that content and mode (a rerun writes nothing). Missing directories are created
# 0755; existing ones (/usr/local/bin...) are left as they are.
install_file() {
    local target="$DESTDIR$3"
    if [ -f "$target" ] && cmp -s "$2" "$target" && [ "$(stat -c %a "$target")" = "${1#0}" ]; then
        echo "    $3 (unchanged)"
        return
    fi
    mkdir -p "$(dirname "$target")"
    install -m "$1" "$2" "$target"
    echo "    $3"
}

echo "==> installing $version into ${DESTDIR:-/} (PREFIX=$PREFIX)"
install_file 0755 "$bin" "$BINDIR/syncgate"

# The units, with the Exec lines naming the binary where it was installed.
staged="$(mktemp -d)"
trap 'rm -rf "$staged"' EXIT
for unit in syncgate.service syncgate.socket; do
    sed "s|$UNIT_BIN|$BINDIR/syncgate|g" "$ROOT/systemd/$unit" >"$staged/$unit"
    install_file 0644 "$staged/$unit" "$UNITDIR/$unit"
done
install_file 0644 "$ROOT/systemd/syncgate.sysusers" "$SYSUSERSDIR/syncgate.conf"
install_file 0644 "$ROOT/systemd/syncgate.tmpfiles" "$TMPFILESDIR/syncgate.conf"

# The man page, from the binary installed, so it names the commands that binary takes. Its
# date is SOURCE_DATE_EPOCH's (scripts/deb.sh sets it), else the binary's time: a rerun with
# the same binary writes the same bytes (gzip -n: no name or time in the header).
SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(stat -c %Y "$bin")}" "$bin" __man | gzip -9n >"$staged/syncgate.8.gz"
install_file 0644 "$staged/syncgate.8.gz" "$MANDIR/syncgate.8.gz"

# The configuration: the operator's file is never replaced.
# Created 0750 here; an existing directory keeps its owner and mode (tmpfiles.d sets them).
[ -d "$DESTDIR$CONFDIR" ] || install -d -m 0750 "$DESTDIR$CONFDIR"
config="$CONFDIR/syncgate.toml"
shipped="$ROOT/systemd/syncgate.toml"
if [ ! -e "$DESTDIR$config" ]; then
    install_file 0640 "$shipped" "$config"
elif cmp -s "$shipped" "$DESTDIR$config"; then
    echo "    $config (unchanged)"
else
    install_file 0640 "$shipped" "$config.new"
    echo "==> kept $config, which differs from the shipped default; the default is in $config.new"
fi

finish=(
    "systemd-sysusers $SYSUSERSDIR/syncgate.conf"
    "systemd-tmpfiles --create $TMPFILESDIR/syncgate.conf"
    "systemctl daemon-reload"
)
if [ -n "$DESTDIR" ] || [ "$(id -u)" -ne 0 ]; then
    echo "==> staged; on the target system, as root, run:"
    for cmd in "${finish[@]}"; do echo "    $cmd"; done
else
    for cmd in "${finish[@]}"; do
        if [ "${cmd%% *}" = systemctl ] && [ ! -d /run/systemd/system ]; then
            echo "==> systemd is not running here: skipped '$cmd'"
            continue
        fi
        echo "==> $cmd"
        $cmd
    done
    echo "==> installed; start it with:"
fi
echo "    systemctl enable --now syncgate.service   (or syncgate.socket for socket activation)"
