#!/usr/bin/env bash
# Removes what scripts/install.sh installed, with the same DESTDIR and PREFIX.
#
#   scripts/uninstall.sh             keeps /etc/syncgate/syncgate.toml and /var/lib/syncgate
#   scripts/uninstall.sh --purge     removes them too
#
# The pending default syncgate.toml.new goes in either case: install.sh wrote it, it never
# holds the operator's settings. The syncgate user stays (systemd-sysusers never deletes
# users: files it owned elsewhere would go to the next user given its uid).
#
# With DESTDIR set nothing outside DESTDIR changes and the script prints what to run on the
# target. Without DESTDIR, as root, it stops and disables the units first and reloads
# systemd afterwards.
set -euo pipefail

PREFIX="${PREFIX:-/usr/local}"
DESTDIR="${DESTDIR:-}"

purge=0
for arg in "$@"; do
    case "$arg" in
        --purge) purge=1 ;;
        -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "uninstall.sh: unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done
if ! [[ "$PREFIX" =~ ^/[A-Za-z0-9._/+-]*$ ]]; then
    echo "uninstall.sh: PREFIX must be an absolute path of [A-Za-z0-9._/+-], not '$PREFIX'" >&2
    exit 2
fi
PREFIX="${PREFIX%/}"

live=0
if [ -z "$DESTDIR" ] && [ "$(id -u)" -eq 0 ] && [ -d /run/systemd/system ]; then
    live=1
fi
if [ "$live" = 1 ]; then
    echo "==> systemctl disable --now syncgate.socket syncgate.service"
    systemctl disable --now syncgate.socket syncgate.service || true
elif [ -z "$DESTDIR" ]; then
    echo "==> not stopping the service (needs root and a running systemd)"
fi

# remove PATH: deletes DESTDIR/PATH if it is there.
remove() {
    if [ -e "$DESTDIR$1" ] || [ -L "$DESTDIR$1" ]; then
        rm -f -- "$DESTDIR$1"
        echo "    removed $1"
    fi
}

echo "==> removing syncgate from ${DESTDIR:-/} (PREFIX=$PREFIX)"
remove "$PREFIX/bin/syncgate"
remove "$PREFIX/lib/systemd/system/syncgate.service"
remove "$PREFIX/lib/systemd/system/syncgate.socket"
remove "$PREFIX/lib/sysusers.d/syncgate.conf"
remove "$PREFIX/lib/tmpfiles.d/syncgate.conf"
remove "$PREFIX/share/man/man8/syncgate.8.gz"
remove /etc/syncgate/syncgate.toml.new
if [ "$purge" = 1 ]; then
    for dir in /etc/syncgate /var/lib/syncgate; do
        if [ -e "$DESTDIR$dir" ]; then
            rm -rf -- "$DESTDIR$dir"
            echo "    removed $dir"
        fi
    done
else
    if [ -e "$DESTDIR/etc/syncgate/syncgate.toml" ]; then
        echo "==> kept /etc/syncgate/syncgate.toml and /var/lib/syncgate (--purge removes them)"
    fi
fi

if [ "$live" = 1 ]; then
    echo "==> systemctl daemon-reload"
    systemctl daemon-reload
elif [ -n "$DESTDIR" ]; then
    echo "==> on the target system, as root, run first: systemctl disable --now syncgate.socket syncgate.service"
    echo "    and afterwards: systemctl daemon-reload"
fi
