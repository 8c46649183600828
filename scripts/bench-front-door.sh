#!/usr/bin/env bash
# The front-door benchmark (bench/README.md, "Front door"): the same Zero workload straight
# to a real zero-cache and through syncgate in front of it, both at once in each round.
#
#   scripts/bench-front-door.sh                       5 rounds: 10 connections and 10 pushes/s a path, 512 B
#   scripts/bench-front-door.sh --rounds 7 --rate 20 --connections 20 --size 1024
#   scripts/bench-front-door.sh --no-build            use the release binaries already built
#   (--window S --windows N: the measured windows of each run; default 7 of 5 s)
#
# One PostgreSQL (a throw-away cluster, fsync off: the disk is not what is measured) and
# one zero-cache (@rocicorp/zero 1.9.0 from tests/clients/zero-cache, the app of its
# schema.js) run for the whole run, and one syncgate in upstream mode in front of it. Each
# round runs both paths AT THE SAME TIME, fresh client groups for each: two load clients
# (`loadgen run --scenario front-door`), one straight to zero-cache and one through syncgate,
# started together with the same windows. zero-cache's latency drifts by tens of percent
# between runs made one after the other (measured here: p50 30-80 ms, p99 135-217 ms over
# four runs), far more than a front door adds; runs that share zero-cache's moments compare.
# A load client pushes an `item` row per operation at a fixed rate below saturation and
# times each push to the poke that acknowledges it (the poke must name the mutation and
# carry the row); they read the CPU of zero-cache's processes, of PostgreSQL's and of
# syncgate's, and syncgate's count of relayed messages. One warm-up round (both paths, not
# recorded) comes first: zero-cache's first minute is its slowest.
#
# Pinning: zero-cache, PostgreSQL and syncgate share SERVER_CPU (default 0), the load client
# has CLIENT_CPU (default 1). syncgate competes with zero-cache for its core, so whatever it
# costs shows in the latency too.
#
# Needs PostgreSQL's binaries (SYNCGATE_TEST_PG_BIN, else the newest
# /usr/lib/postgresql/*/bin) and zero-cache (installed here with `npm ci` if missing; as
# scripts/test.sh does). Writes bench/results/<date>-front-door/{results.jsonl,front-door.md}
# and the servers' logs.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/bench-common.sh
source "$ROOT/scripts/bench-common.sh"
INVOCATION="scripts/bench-front-door.sh $*"
ROUNDS=5
# zero-cache 1.9 spends about 20 ms of CPU on a push here (its processes, PostgreSQL apart),
# so one core carries some 40-50 pushes a second: 10 a second on each path (20 in all) keeps
# it at about half a core, below saturation, where latency is its work and not its queue.
CONNECTIONS=10
RATE=10
SIZE=512
# Seconds: warm-up, then WINDOWS windows of WINDOW (at 20/s, 700 timed pushes a run).
WARMUP=5
WINDOW=5
WINDOWS=7
BUILD=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --rounds) ROUNDS=$2; shift ;;
    --connections) CONNECTIONS=$2; shift ;;
    --rate) RATE=$2; shift ;;
    --size) SIZE=$2; shift ;;
    --window) WINDOW=$2; shift ;;
    --windows) WINDOWS=$2; shift ;;
    --no-build) BUILD=0 ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) echo "bench-front-door.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

log() { echo "bench-front-door.sh: $*" >&2; }

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
OUT=$ROOT/bench/results/$(date -u +%Y-%m-%d-%H%M%S)-front-door
LOGS=$OUT/logs
mkdir -p "$LOGS"
RESULTS=$OUT/results.jsonl

# --- build and tools ---------------------------------------------------------------
bench_build "$BUILD" syncgate loadgen bench-report
bench_zero_tools

bench_pinning "zero-cache, PostgreSQL and syncgate"

# --- processes -----------------------------------------------------------------------
WORK=$(mktemp -d /tmp/syncgate-front-door.XXXXXX)
PG_PID= ZC_PID= SG_PID=
cleanup() {
  [[ -n $SG_PID ]] && kill -TERM "$SG_PID" 2>/dev/null
  bench_zero_stop
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Ports below the ephemeral range, which the load client's sockets use.
BASE=$((20000 + RANDOM % 10000))
PG_PORT=$BASE ZC_PORT=$((BASE + 10)) SG_PORT=$((BASE + 20))

bench_zero_start "$PG_PORT" "$ZC_PORT"

log "starting syncgate on $SG_PORT in front of it"
extra=$'[upstream]\n'"urls = [\"ws://127.0.0.1:$ZC_PORT\"]"
syncgate_bench_toml "$SG_PORT" "$WORK/store" 1 '' "$extra" >"$LOGS/syncgate.toml"
"$TARGET/syncgate" check-config "$LOGS/syncgate.toml" >&2
"${PIN_SERVER[@]}" "$TARGET/syncgate" run --config "$LOGS/syncgate.toml" 2>"$LOGS/syncgate.log" &
SG_PID=$!
wait_ready syncgate "$SG_PID" "$SG_PORT" "$LOGS/syncgate.log" 20

# --- rounds ----------------------------------------------------------------------------
# One load client; $1: direct | through, $2: its records file, then more loadgen arguments.
loadgen() {
  local path=$1 out=$2
  shift 2
  local args=(run --scenario front-door --connections "$CONNECTIONS" --rate "$RATE"
    --size "$SIZE" --connect-concurrency 4 --out "$out" "$@")
  if [[ $path == direct ]]; then
    args+=(--server zero-cache --addr "127.0.0.1:$ZC_PORT" --server-pid "$ZC_PID"
      --cpu-of "postgres=$PG_PID")
  else
    args+=(--server syncgate --addr "127.0.0.1:$SG_PORT" --server-pid "$SG_PID"
      --cpu-of "zero-cache=$ZC_PID" --cpu-of "postgres=$PG_PID")
  fi
  "${PIN_CLIENT[@]}" "$TARGET/loadgen" "${args[@]}" >/dev/null 2>>"$LOGS/loadgen.log"
}
# Both paths at once; the records go to results.jsonl in pairs, direct first.
round() { # $1: name, then loadgen's timing arguments
  local name=$1 rc=0
  shift
  loadgen direct "$LOGS/$name-direct.jsonl" "$@" &
  local direct=$!
  loadgen through "$LOGS/$name-through.jsonl" "$@" &
  local through=$!
  wait "$direct" || rc=1
  wait "$through" || rc=1
  ((rc == 0)) || log "$name: a run failed (its record says why; $LOGS/loadgen.log)"
}
log "warm-up round (not recorded)"
round warmup --warmup 5 --window 5 --windows 5
for r in $(seq "$ROUNDS"); do
  log "round $r/$ROUNDS: both paths at once"
  round "round-$r" --warmup "$WARMUP" --window "$WINDOW" --windows "$WINDOWS"
  cat "$LOGS/round-$r-direct.jsonl" "$LOGS/round-$r-through.jsonl" >>"$RESULTS"
done

cat >"$OUT/preamble.md" <<EOF
# syncgate front door: straight to zero-cache vs through syncgate

- Command: \`$INVOCATION\`
- Date: $(date -u +%Y-%m-%dT%H:%MZ); commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
- Machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $PINNING
- Each round: $CONNECTIONS connections and $RATE pushes/s of $SIZE B on each path, both at once; $WINDOWS windows of $WINDOW s after $WARMUP s
- zero-cache $(node -p "require('$ZC_DIR/node_modules/@rocicorp/zero/package.json').version") on Node $(node --version), PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') (fsync off); syncgate: 1 worker, upstream mode
EOF
"$TARGET/bench-report" --front-door "$RESULTS" "$OUT/preamble.md"
cat "$OUT/front-door.md"
