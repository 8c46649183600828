#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 20: the CI smoke run),
# after replaying the committed reproducers in fuzz/artifacts/ (a reproducer that still
# crashes fails the run: it is a known, unfixed bug).
#
#   scripts/fuzz.sh               every target, 20 s each
#   scripts/fuzz.sh 300           every target, 5 minutes each
#   scripts/fuzz.sh 60 frame      one target
#
# cargo-fuzz needs nightly-only rustc flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain take
# them. cargo-fuzz itself is installed with `cargo install` when missing. Builds go to
# fuzz/target (release, debug assertions, AddressSanitizer; ~6 minutes cold on two cores),
# the growing corpus to fuzz/corpus/TARGET and new crashes to fuzz/artifacts/TARGET/ (see
# fuzz/README.md for how to minimise and keep one).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ="$ROOT/fuzz"
seconds="${1:-20}"
shift || true
if ! [[ $seconds =~ ^[0-9]+$ ]] || [[ $seconds == 0 ]]; then
    echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]" >&2
    exit 2
fi
# The version the targets were written against; newer ones work too.
CARGO_FUZZ_VERSION="0.13.2"

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install --locked --version "$CARGO_FUZZ_VERSION" cargo-fuzz
fi

cd "$FUZZ"
LOGS="${CARGO_TARGET_DIR:-$FUZZ/target}/fuzz-logs"
mkdir -p "$LOGS"
targets=("$@")
if [[ ${#targets[@]} == 0 ]]; then
    mapfile -t targets < <(cargo fuzz list)
fi

echo "fuzz: building ${targets[*]}"
cargo fuzz build

failed=()
for target in "${targets[@]}"; do
    # Known reproducers first: they must not crash any more once their bug is fixed.
    if compgen -G "artifacts/$target/*" >/dev/null; then
        for reproducer in artifacts/"$target"/*; do
            if ! cargo fuzz run "$target" "$reproducer" >"$LOGS/replay-$target.log" 2>&1; then
                echo "fuzz: $target: reproducer $reproducer still crashes" \
                    "(log: $LOGS/replay-$target.log)"
                failed+=("$target:$reproducer")
            fi
        done
    fi
    flags=(-max_total_time="$seconds" -timeout=10 -print_final_stats=1)
    [[ -f dict/$target.dict ]] && flags+=(-dict="dict/$target.dict")
    mkdir -p "corpus/$target"
    echo "fuzz: $target for ${seconds}s"
    # New crashes land in artifacts/TARGET/ under crash-HASH (oom-, timeout- and slow-unit-
    # files are kept the same way); libFuzzer exits non-zero on the first one.
    if ! cargo fuzz run "$target" "corpus/$target" -- "${flags[@]}" >"$LOGS/$target.log" 2>&1; then
        echo "fuzz: $target FAILED; see $LOGS/$target.log"
        grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written' "$LOGS/$target.log" |
            head -n 5 || true
        grep -A1 'panicked at' "$LOGS/$target.log" | head -n 4 || true
        failed+=("$target")
        continue
    fi
    grep -E '^Done [0-9]+ runs' "$LOGS/$target.log" | sed "s/^/fuzz: $target: /" || true
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz: FAILED: ${failed[*]}"
    exit 1
fi
echo "fuzz: every target ran ${seconds}s without a crash"
