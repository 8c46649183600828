#!/usr/bin/env bash
# Builds the Debian package with cargo-deb: $CARGO_TARGET_DIR/debian/syncgate_<version>_amd64.deb
# (target/debian/ by default); its path is the last line printed.
#
#   scripts/deb.sh               cargo build --release --locked, then package
#   scripts/deb.sh --no-build    package target/release/syncgate as it is
#
# cargo-deb packages files ([package.metadata.deb] in Cargo.toml); these are made here
# first, under target/release/deb-root (an asset path starting with target/release/ is
# cargo-deb's name for the real target directory, CARGO_TARGET_DIR included):
#   - the units with Exec lines naming /usr/bin/syncgate, the sysusers.d and tmpfiles.d
#     entries, syncgate(8) (printed by the binary being packaged) and the commented
#     configuration: scripts/install.sh staged with PREFIX=/usr, so the package has
#     install.sh's layout and no file is a second copy kept by hand;
#   - the Debian changelog, compressed (packaging/debian/changelog).
#
# Needs cargo-deb (scripts/test.sh installs the version it pins). SOURCE_DATE_EPOCH, if
# unset, is the commit's time: it dates the man page and the files in the package, so two
# builds of one commit agree.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

build=1
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "deb.sh: unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

if ! cargo deb --version >/dev/null 2>&1; then
    echo "deb.sh: cargo-deb is missing: cargo install cargo-deb --locked (scripts/test.sh pins a version)" >&2
    exit 1
fi

TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
bin="$TARGET/release/syncgate"
if [ "$build" = 1 ]; then
    echo "==> cargo build --release --locked"
    cargo build --release --locked --bin syncgate
fi
if [ ! -x "$bin" ]; then
    echo "deb.sh: no syncgate binary at $bin (build it, or run without --no-build)" >&2
    exit 1
fi
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || date +%s)}"

stage="$TARGET/release/deb-root"
rm -rf "$stage"
echo "==> staging the units, sysusers.d, tmpfiles.d, the man page and the config (scripts/install.sh, PREFIX=/usr)"
DESTDIR="$stage" PREFIX=/usr SYNCGATE_BIN="$bin" "$ROOT/scripts/install.sh" --no-build >/dev/null
# The binary cargo-deb packages is $bin itself (it strips it); the staged copy is not used.
rm "$stage/usr/bin/syncgate"
# A native package's changelog is changelog.gz (cargo-deb's own `changelog` key would name it
# changelog.Debian.gz, a non-native package's name).
mkdir -p "$stage/usr/share/doc/syncgate"
gzip -9n <"$ROOT/packaging/debian/changelog" >"$stage/usr/share/doc/syncgate/changelog.gz"

echo "==> cargo deb --no-build"
# cargo-deb prints the package's path last.
cargo deb --no-build --locked --strip
