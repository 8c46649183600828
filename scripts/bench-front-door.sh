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
PG_BIN=${SYNCGATE_TEST_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)}
[[ -x $PG_BIN/initdb ]] || { log "no PostgreSQL (apt-get install postgresql, or set SYNCGATE_TEST_PG_BIN)"; exit 1; }
ZC_DIR=$ROOT/tests/clients/zero-cache
if [[ ! -x $ZC_DIR/node_modules/.bin/zero-cache ]]; then
  log "installing zero-cache (npm ci in tests/clients/zero-cache)"
  (cd "$ZC_DIR" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
fi

bench_pinning "zero-cache, PostgreSQL and syncgate"

# --- processes -----------------------------------------------------------------------
WORK=$(mktemp -d /tmp/syncgate-front-door.XXXXXX)
chmod 755 "$WORK"
PG_PID= ZC_PID= SG_PID=
# Every zero-cache process carries this in its environment: its runner forks detached
# workers that a kill of the runner would leave behind (tests/common/upstream.rs).
MARKER="SYNCGATE_BENCH_FRONT_DOOR=$WORK"
zero_cache_pids() {
  grep -lsz -- "$MARKER" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 || true
}
cleanup() {
  [[ -n $SG_PID ]] && kill -TERM "$SG_PID" 2>/dev/null
  local pids
  pids=$(zero_cache_pids)
  # shellcheck disable=SC2086 # one PID per word
  [[ -n $pids ]] && kill -KILL $pids 2>/dev/null
  # The postmaster's own PID (PG_PID may be runuser's): a fast shutdown.
  [[ -f $WORK/pg/postmaster.pid ]] && kill -INT "$(head -n1 "$WORK/pg/postmaster.pid")" 2>/dev/null
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Ports below the ephemeral range, which the load client's sockets use.
BASE=$((20000 + RANDOM % 10000))
PG_PORT=$BASE ZC_PORT=$((BASE + 10)) SG_PORT=$((BASE + 20))

# initdb and postgres refuse root: as root they run as `postgres` (`nobody` if none).
PG_USER=
if [[ $(id -u) == 0 ]]; then
  PG_USER=postgres
  id postgres >/dev/null 2>&1 || PG_USER=nobody
fi
as_pg() { if [[ -n $PG_USER ]]; then runuser -u "$PG_USER" -- "$@"; else "$@"; fi; }
mkdir -p "$WORK/pg" "$WORK/run"
[[ -n $PG_USER ]] && chown "$PG_USER" "$WORK/pg" "$WORK/run"
chmod 700 "$WORK/pg"
as_pg "$PG_BIN/initdb" -D "$WORK/pg" --auth=trust --username=postgres --encoding=UTF8 \
  --locale=C --no-sync >"$LOGS/initdb.log"
cat >>"$WORK/pg/postgresql.conf" <<EOF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK/run'
wal_level = logical
max_wal_senders = 10
max_replication_slots = 10
max_connections = 200
fsync = off
full_page_writes = off
EOF
# synchronous_commit stays on: off, a commit's WAL waits for the WAL writer (up to
# wal_writer_delay, 200 ms) before logical replication sends it, which put 360 ms of
# PostgreSQL's own delay into every push-to-poke here. With fsync off, on costs nothing.
# PG_PID is runuser's (or postgres's own): its process tree is PostgreSQL's.
as_pg "${PIN_SERVER[@]}" "$PG_BIN/postgres" -D "$WORK/pg" >"$LOGS/postgres.log" 2>&1 &
PG_PID=$!
for _ in $(seq 200); do
  "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres && break
  kill -0 "$PG_PID" 2>/dev/null || { log "PostgreSQL died:"; tail -5 "$LOGS/postgres.log" >&2; exit 1; }
  sleep 0.1
done
DB=postgresql://postgres@127.0.0.1:$PG_PORT/postgres
"$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 "$DB" \
  -c "CREATE TABLE item (id text PRIMARY KEY, owner text NOT NULL, title text NOT NULL);"

zero_env=(env -u ZERO_AUTH_SECRET ZERO_ENABLE_TELEMETRY=false DO_NOT_TRACK=1 ZERO_UPSTREAM_DB="$DB")
(cd "$WORK" && "${zero_env[@]}" node "$ZC_DIR/node_modules/.bin/zero-deploy-permissions" \
  --schema-path "$ZC_DIR/schema.js") >"$LOGS/permissions.log" 2>&1 ||
  { log "zero-deploy-permissions failed:"; tail -5 "$LOGS/permissions.log" >&2; exit 1; }

log "starting zero-cache on $ZC_PORT"
(cd "$WORK" && exec "${PIN_SERVER[@]}" "${zero_env[@]}" "$MARKER" \
  ZERO_REPLICA_FILE="$WORK/replica.db" ZERO_PORT="$ZC_PORT" ZERO_NUM_SYNC_WORKERS=1 \
  ZERO_ADMIN_PASSWORD=bench node "$ZC_DIR/node_modules/.bin/zero-cache") >"$LOGS/zero-cache.log" 2>&1 &
ZC_PID=$!
# Waits until $1 (process $2, log $4) answers GET / on port $3, for at most $5 seconds.
wait_ready() {
  local _
  for _ in $(seq $(($5 * 10))); do
    http_ok "$3" && return 0
    kill -0 "$2" 2>/dev/null || { log "$1 died:"; tail -20 "$4" >&2; exit 1; }
    sleep 0.1
  done
  log "$1 not ready after $5 s"
  exit 1
}
wait_ready zero-cache "$ZC_PID" "$ZC_PORT" "$LOGS/zero-cache.log" 120

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
