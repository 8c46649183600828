#!/usr/bin/env bash
# Instructions per operation of syncgate's worker and listener under callgrind: a CPU
# figure that, unlike the server CPU us/op of scripts/bench.sh, does not move with the
# machine's load, so two builds can be compared on a busy machine (bench/RESULTS.md,
# "CPU per message did not change", has the method and earlier figures).
#
#   scripts/callgrind.sh [--syncgate PATH] [--loadgen PATH] [--out DIR] [--scenarios LIST]
#
# --syncgate, --loadgen: the binaries to measure and to load it with (default: build the
#   release binaries of the checkout this script lives in, under CARGO_TARGET_DIR).
# --out DIR: where the callgrind files, configs and logs go, one folder per scenario
#   (default: a fresh folder under /tmp). Earlier callgrind files there are removed.
# --scenarios LIST: which of echo, storm, frames to run (comma-separated; default all).
# Environment: SERVER_CPU / CLIENT_CPU (default 0 and 1, as bench.sh pins them).
#
# Prints one line per scenario:
#   echo-512x100 worker_instr_per_msg=N listener_instr_per_msg=N messages=N loop_instr_per_msg=N
#   storm-hs256 worker_instr_per_conn=N listener_instr_per_conn=N connections=N
#   frames-20x100 worker_instr_per_msg=N listener_instr_per_msg=N messages=N
#   frames-1024x100 ... frames-16384x100 ...
# (echo is push -> poke on the sync route, store included; frames is the WebSocket layer
# alone, the conformance /echo route, as in bench.sh's frames scenario.)
#
# Since the store runs on threads of its own (docs/ARCHITECTURE.md, "The store off the
# loop"), echo and storm run the worker on the epoll backend (`[io] backend = "epoll"`):
# valgrind 3.19 (Debian 12's) runs one thread at a time and does not let go of its lock
# while a thread waits in io_uring_enter, so on io_uring the store threads never ran while
# the loop waited for them (seen 2026-12-07: the load client gave up after 60 s); a wait
# in epoll_wait it does let go of. Backends differ in the kernel, which callgrind does not
# count, and in a few hundred instructions of submission per message, so compare echo
# figures only with echo figures taken the same way (from 2026-12-08). frames stays on
# io_uring. Each thread gets its own file (--separate-threads=yes): a role's figure is the
# sum over its threads, and echo also prints the worker's loop thread alone
# (loop_instr_per_msg), the part of a push the connections wait on.
#
# Each scenario starts the daemon afresh under `valgrind --tool=callgrind
# --trace-children=yes` (bench.sh's config: one worker, 127.0.0.1, connection limits
# raised, the client-group store in a temp folder, huge_pages left at its default), runs
# the load client on it, reads the operation counter from /metrics, stops the daemon with
# SIGTERM and divides each role's whole-run instruction count by the counter: startup,
# handshakes and shutdown included, as in the RESULTS.md tables.
#
# The load is a fixed number of operations, not a fixed time: the worker's figure creeps
# up with the count, because the client-group store grows through the run (each push adds
# a history row, up to 1000 per group; each storm connection adds a group). loadgen has
# only timed windows, so it runs with more windows than it needs and is stopped (SIGTERM)
# once its window lines add up to the target; the divisor is still the daemon's own
# counter. With a fixed time instead (60 windows), the count followed the machine's load
# (49k to 78k echoes, 20k to 50k storm connections on a busy 2-core box) and the worker's
# figures with it: 82,059 to 82,802 per echo (0.9%), 106,847 to 107,380 per connection.
# At fixed counts three runs gave 82,259 to 82,276 (0.02%) and 107,107 to 107,212
# (0.1%). The targets take 30 to 60 s each under callgrind (about 50 times slower than
# native); they weigh the fixed costs (startup, the echo's 100 handshakes) at well under
# 1% of the worker's total.
#
# The listener does no per-message work in the echo (the worker owns the sockets after
# the handoff): its echo figure is its startup, the 100 handshakes and its timer ticks
# (about 11-12M instructions in all) spread over the messages, and moves with the run's
# duration (211 to 228 in those three runs). Its storm figure carries the same part
# (about 10M over the target; 20,596 to 20,703, 0.5%).
#
# Keep TIMING and the targets unchanged between the builds compared: figures from other
# counts (RESULTS.md's tables: 5 one-second windows) are not comparable.
# Exits non-zero, saying why, when anything fails. Everything is on 127.0.0.1; every
# wait is bounded.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/bench-common.sh
source "$ROOT/scripts/bench-common.sh"

# The load: what every measurement of every build must share (see the header). The
# windows are a cap: the run is stopped at the target count long before (LOAD_LIMIT).
TIMING=(--warmup 1 --window 1 --windows 1000)
# /echo answers tens of thousands of small frames a second even under callgrind: windows of
# a tenth of a second and a larger target keep the overshoot past the target (up to a
# window and a poll) to a few per cent of the count, so the fixed costs spread alike.
FRAMES_TIMING=(--warmup 1 --window 0.1 --windows 100000)
ECHO_TARGET=50000     # echoes (round trips) of 512 B on 100 connections
FRAMES_TARGET=200000  # echoes on /echo per size, 100 connections
STORM_TARGET=25000    # storm connections (connect, HS256 JWT, connected, close)
# Replies under callgrind take far longer than natively (the first ones JIT-translate the
# daemon's code): a generous timeout, which changes no count.
REPLY_TIMEOUT=60
# Bounds on the waits, in seconds.
START_LIMIT=180   # the daemon healthy under valgrind
LOAD_LIMIT=480    # one loadgen run to its target count
STOP_LIMIT=120    # the daemon gone after SIGTERM (callgrind writes its files at exit)
# Distinct storm tokens, used in turn, as bench.sh mints them: far more than a run uses,
# so syncgate's 4096-slot token cache never answers and every connection verifies.
POOL=65536

die() { echo "callgrind.sh: $*" >&2; exit 1; }

SYNCGATE=
LOADGEN=
OUT=
SCENARIOS=echo,storm,frames
while [[ $# -gt 0 ]]; do
  case $1 in
    --syncgate) SYNCGATE=${2:?--syncgate needs a path}; shift ;;
    --loadgen) LOADGEN=${2:?--loadgen needs a path}; shift ;;
    --out) OUT=${2:?--out needs a directory}; shift ;;
    --scenarios) SCENARIOS=${2:?--scenarios needs a list}; shift ;;
    -h|--help) awk 'NR > 1 && /^set -euo/ { exit } NR > 1' "$0"; exit 0 ;;
    *) echo "callgrind.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

command -v valgrind >/dev/null || die "valgrind not found (apt-get install valgrind)"

# --- binaries --------------------------------------------------------------------
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
build=()
[[ -z $SYNCGATE ]] && build+=(-p syncgate --bin syncgate) && SYNCGATE=$TARGET/syncgate
[[ -z $LOADGEN ]] && build+=(-p syncgate-bench --bin loadgen) && LOADGEN=$TARGET/loadgen
if (( ${#build[@]} > 0 )); then
  echo "callgrind.sh: building ${build[*]} (release)" >&2
  (cd "$ROOT" && cargo build --release --locked "${build[@]}") || die "the build failed"
fi
[[ -x $SYNCGATE ]] || die "$SYNCGATE is not an executable"
[[ -x $LOADGEN ]] || die "$LOADGEN is not an executable"
SYNCGATE=$(realpath "$SYNCGATE")
LOADGEN=$(realpath "$LOADGEN")

# --- folders ---------------------------------------------------------------------
OUT=${OUT:-$(mktemp -d /tmp/syncgate-callgrind.XXXXXX)}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
# The client-group store: on /dev/shm as bench.sh puts it, so no fsync waits stretch the
# run (waits cost no instructions, but a slower run completes fewer operations).
STORE_BASE=/dev/shm
[[ -d $STORE_BASE && -w $STORE_BASE ]] || STORE_BASE=${TMPDIR:-/tmp}
WORK=$(mktemp -d "$STORE_BASE/syncgate-callgrind.XXXXXX")
SERVER_PID=
LOADGEN_PID=
cleanup() {
  if [[ -n $LOADGEN_PID ]]; then
    kill -KILL "$LOADGEN_PID" 2>/dev/null || true
    wait "$LOADGEN_PID" 2>/dev/null || true
  fi
  if [[ -n $SERVER_PID ]]; then
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [[ $(nproc) -ge 2 ]] && command -v taskset >/dev/null; then
  PIN_SERVER=(taskset -c "${SERVER_CPU:-0}")
  PIN_CLIENT=(taskset -c "${CLIENT_CPU:-1}")
else
  PIN_SERVER=()
  PIN_CLIENT=()
fi

# Settings from the caller's environment (SYNCGATE_HUGE_PAGES, ...) would override the
# config file: the daemon runs without any, so every build gets the same defaults.
DAEMON_ENV=(env)
while read -r v; do DAEMON_ENV+=(-u "$v"); done < <(compgen -e | grep '^SYNCGATE_' || true)

# --- storm tokens ----------------------------------------------------------------
# A private key set and token pool (not bench.sh's cache in ~/.cache, which bench.sh may
# regenerate under another run): HS256 minting of the pool takes a second or two.
"$LOADGEN" keygen --dir "$WORK/keys" >"$OUT/keygen.log" 2>&1 || die "loadgen keygen failed: $(tail -3 "$OUT/keygen.log")"
"$LOADGEN" mint --alg hs256 --keys "$WORK/keys" --count "$POOL" --out "$WORK/tokens-hs256-$POOL" \
  >"$OUT/mint.log" 2>&1 || die "loadgen mint failed: $(tail -3 "$OUT/mint.log")"

# --- the daemon ------------------------------------------------------------------
# A port below the ephemeral range (which the storm's sockets use up, as in bench.sh),
# nobody listening on it.
free_port() {
  local low port
  low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range)
  for _ in $(seq 100); do
    port=$((low > 22000 ? 10000 + RANDOM % 10000 : 1024 + RANDOM % 4000))
    if ! timeout 1 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$port" 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  return 1
}

# Starts the daemon under callgrind for scenario folder $1 with extra TOML $2; sets
# SERVER_PID and PORT.
start_daemon() {
  local dir=$1 extra=$2
  PORT=$(free_port) || die "no free port found on 127.0.0.1"
  syncgate_bench_toml "$PORT" "$WORK/store-$(basename "$dir")" 1 '' "$extra" >"$dir/syncgate.toml"
  "${DAEMON_ENV[@]}" "$SYNCGATE" check-config "$dir/syncgate.toml" >"$dir/check-config.log" 2>&1 ||
    die "$SYNCGATE refuses the config $dir/syncgate.toml: $(tail -3 "$dir/check-config.log")"
  # --trace-children=yes follows the supervisor's re-executions of itself as listener and
  # worker; %p gives each process its own file, named by its pid. --vgdb=no: nothing
  # attaches, so no gdbserver polling runs in the daemon's processes.
  "${PIN_SERVER[@]}" "${DAEMON_ENV[@]}" valgrind --tool=callgrind --trace-children=yes --vgdb=no \
    --separate-threads=yes --callgrind-out-file="$dir/callgrind.%p" --log-file="$dir/valgrind.%p.log" \
    "$SYNCGATE" run --config "$dir/syncgate.toml" >"$dir/syncgate.out" 2>"$dir/syncgate.log" &
  SERVER_PID=$!
  local deadline=$((SECONDS + START_LIMIT))
  until syncgate_healthy "$PORT"; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      wait "$SERVER_PID" 2>/dev/null || true
      SERVER_PID=
      die "the daemon died at start ($dir/syncgate.log): $(tail -5 "$dir/syncgate.log")"
    fi
    (( SECONDS < deadline )) || die "the daemon was not healthy on port $PORT after ${START_LIMIT} s ($dir/syncgate.log)"
    sleep 0.5
  done
}

# SIGTERM, then wait: callgrind writes each process's file as the process exits, and the
# supervisor exits after it reaped its children (it SIGKILLs them only past the drain
# timeout; a killed child leaves a file without totals, which role_instructions refuses).
stop_daemon() {
  local dir=$1
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_LIMIT))
  while kill -0 "$SERVER_PID" 2>/dev/null; do
    if (( SECONDS >= deadline )); then
      kill -KILL "$SERVER_PID" 2>/dev/null || true
      wait "$SERVER_PID" 2>/dev/null || true
      SERVER_PID=
      die "the daemon did not stop within ${STOP_LIMIT} s of SIGTERM ($dir/syncgate.log)"
    fi
    sleep 0.5
  done
  local rc=0
  wait "$SERVER_PID" 2>/dev/null || rc=$?
  SERVER_PID=
  (( rc == 0 )) || die "the daemon exited with status $rc ($dir/syncgate.log): $(tail -5 "$dir/syncgate.log")"
}

# The sum of metric $1 over the worker series of /metrics (one worker here).
metric() {
  local text
  # shellcheck disable=SC2016 # $1 expands in the inner shell
  text=$(timeout 20 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && printf "GET /metrics HTTP/1.0\r\n\r\n" >&3 && cat <&3' _ "$PORT" 2>/dev/null) ||
    die "GET /metrics on port $PORT failed"
  awk -v name="$1" '
    index($0, name "{process=\"worker\"") == 1 { sum += $NF; found = 1 }
    END { if (!found) exit 1; printf "%d\n", sum }' <<<"${text//$'\r'/}" ||
    die "metric $1 of a worker missing from /metrics"
}

# Reads metric $1 until two reads a second apart agree (at most 30 s): after the load
# client exits, the slow worker may still be taking in its last messages, and what it
# counts afterwards it also executes.
settled_metric() {
  local before after
  before=$(metric "$1")
  for _ in $(seq 30); do
    sleep 1
    after=$(metric "$1")
    [[ $after == "$before" ]] && { echo "$after"; return 0; }
    before=$after
  done
  die "metric $1 still moving after 30 s"
}

# The instruction count (Ir) of the one callgrind file in $1 whose command line runs role
# $2 (__worker, __listener). Only the header's 'summary:' or the trailing 'totals:' line
# counts: the body's cost lines are per function and would count every instruction again
# (once per caller in inclusive lines).
role_instructions() {
  local dir=$1 role=$2 thread=${3:-} files=() f pids
  for f in "$dir"/callgrind.*; do
    [[ -f $f ]] || continue
    if grep -m1 '^cmd:' "$f" | grep -q -- " $role\( \|$\)"; then files+=("$f"); fi
  done
  (( ${#files[@]} > 0 )) || die "no callgrind file of $role in $dir"
  # One process per role: the files are callgrind.PID-THREAD, all of one PID.
  pids=$(printf '%s\n' "${files[@]##*/}" | sed 's/^callgrind\.\([0-9]*\).*/\1/' | sort -u | wc -l)
  (( pids == 1 )) || die "expected one process of $role in $dir, found $pids (a respawned or missing process?)"
  if [[ -n $thread ]]; then
    files=("$(printf '%s\n' "${files[@]}" | grep -- "-0*$thread\$")") ||
      die "no callgrind file of thread $thread of $role in $dir"
  fi
  local sum=0 v
  for f in "${files[@]}"; do
    # 'totals:' closes a complete file; 'summary:' is the same figure where totals is absent.
    v=$(awk '
      /^totals:/ { t = $2 }
      /^summary:/ { s = $2 }
      END { v = (t != "" ? t : s); if (v == "" || v !~ /^[0-9]+$/) exit 1; print v }' "$f") ||
      die "no totals/summary line in $f (the process did not exit cleanly?)"
    sum=$((sum + v))
  done
  echo "$sum"
}

per() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f\n", a / b }'; }

# Operations loadgen's log $1 reports so far: the sum of its windows' rates times the
# window's length $2 in seconds. Approximate (the warm-up is not in it, windows run a little
# long): it only says when to stop; what is divided by is the daemon's counter.
reported_ops() {
  awk -v w="$2" '/ window [0-9]+\/[0-9]+: [0-9,.]+ / {
         v = $0; sub(/.* window [0-9]+\/[0-9]+: /, "", v); sub(/ .*/, "", v); gsub(",", "", v); s += v * w
       }
       END { printf "%d\n", s }' "$1"
}

# Runs loadgen (the arguments, the timing last) against the daemon until it reports $1
# operations, then stops it. A load client that exits before that failed (a wrong or
# missing reply, the windows' cap reached) and fails the measurement.
run_load() {
  local target=$1 dir=$2 window
  shift 2
  window=$(awk '{ for (i = 1; i < NF; i++) if ($i == "--window") print $(i + 1) }' <<<"$*")
  "${PIN_CLIENT[@]}" "$LOADGEN" run --server syncgate --addr "127.0.0.1:$PORT" \
    --reply-timeout "$REPLY_TIMEOUT" --out "$dir/record.jsonl" "$@" \
    >"$dir/loadgen.out" 2>"$dir/loadgen.log" &
  LOADGEN_PID=$!
  local deadline=$((SECONDS + LOAD_LIMIT)) ops=0 rc=0
  while (( ops < target )); do
    if ! kill -0 "$LOADGEN_PID" 2>/dev/null; then
      wait "$LOADGEN_PID" 2>/dev/null || rc=$?
      LOADGEN_PID=
      die "the load client exited (status $rc) after $ops of $target operations ($dir/loadgen.log): $(tail -3 "$dir/loadgen.log")"
    fi
    if (( SECONDS >= deadline )); then
      die "the load client reached only $ops of $target operations in ${LOAD_LIMIT} s ($dir/loadgen.log)"
    fi
    sleep 0.2
    ops=$(reported_ops "$dir/loadgen.log" "$window")
  done
  kill -TERM "$LOADGEN_PID" 2>/dev/null || true
  wait "$LOADGEN_PID" 2>/dev/null || true
  LOADGEN_PID=
  if grep -q 'FAILED' "$dir/loadgen.log"; then
    die "the load client failed ($dir/loadgen.log): $(grep -m1 FAILED "$dir/loadgen.log")"
  fi
  echo "loadgen stopped after $ops reported operations" >"$dir/load.txt"
}

# One scenario: folder name $1, metric $2, target count $3, extra TOML $4, then the
# loadgen arguments. Sets INSTR_WORKER, INSTR_LISTENER, COUNT.
measure() {
  local name=$1 counter=$2 target=$3 extra=$4
  shift 4
  local dir=$OUT/$name
  mkdir -p "$dir"
  rm -f "$dir"/callgrind.* "$dir"/valgrind.*.log "$dir"/record.jsonl "$dir"/load.txt
  start_daemon "$dir" "$extra"
  run_load "$target" "$dir" "$@"
  COUNT=$(settled_metric "$counter")
  (( COUNT > 0 )) || die "$counter is 0 after the $name run"
  stop_daemon "$dir"
  INSTR_WORKER=$(role_instructions "$dir" __worker)
  INSTR_LISTENER=$(role_instructions "$dir" __listener)
  # The raw totals, for comparing the listener's (see the header) or checking a division.
  echo "$name: worker Ir $INSTR_WORKER, listener Ir $INSTR_LISTENER, $counter $COUNT" | tee "$dir/summary.txt" >&2
}

echo "callgrind.sh: $SYNCGATE, loadgen ${TIMING[*]} (frames: ${FRAMES_TIMING[*]}) stopped at $ECHO_TARGET echoes, $STORM_TARGET connections, $FRAMES_TARGET frames; files in $OUT" >&2
wanted() { [[ ",$SCENARIOS," == *",$1,"* ]]; }
# The backend of the scenarios that use the store (see the header).
EPOLL=$'[io]\nbackend = "epoll"'

if wanted echo; then
  measure echo-512x100 syncgate_messages_in_total "$ECHO_TARGET" "$EPOLL" --scenario echo --size 512 --connections 100 "${TIMING[@]}"
  # The loop is the worker's first thread (the store threads start after it).
  loop=$(role_instructions "$OUT/echo-512x100" __worker 1)
  echo "echo-512x100 worker_instr_per_msg=$(per "$INSTR_WORKER" "$COUNT") listener_instr_per_msg=$(per "$INSTR_LISTENER" "$COUNT") messages=$COUNT loop_instr_per_msg=$(per "$loop" "$COUNT")"
fi

if wanted storm; then
  auth=$(printf '%s\n[auth]\nsecret = "%s"' "$EPOLL" "$(cat "$WORK/keys/hs256.secret")")
  measure storm-hs256 syncgate_connected_total "$STORM_TARGET" "$auth" --scenario storm --connections 16 --sources 4 \
    --tokens "$WORK/tokens-hs256-$POOL" "${TIMING[@]}"
  echo "storm-hs256 worker_instr_per_conn=$(per "$INSTR_WORKER" "$COUNT") listener_instr_per_conn=$(per "$INSTR_LISTENER" "$COUNT") connections=$COUNT"
fi

if wanted frames; then
  for size in 20 1024 16384; do
    measure "frames-${size}x100" syncgate_messages_in_total "$FRAMES_TARGET" $'[conformance]\necho = true' \
      --scenario frames --size "$size" --connections 100 "${FRAMES_TIMING[@]}"
    echo "frames-${size}x100 worker_instr_per_msg=$(per "$INSTR_WORKER" "$COUNT") listener_instr_per_msg=$(per "$INSTR_LISTENER" "$COUNT") messages=$COUNT"
  done
fi
