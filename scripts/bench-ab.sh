#!/usr/bin/env bash
# Compares syncgate builds on one benchmark scenario: runs them in turn, several rounds, on
# the same machine, and prints each run (with its server CPU split by thread and its context
# switches per operation), the median per build, and each build's CPU per operation over the
# first build's (the median of the rounds' ratios, and their range: put the build to compare
# against first, e.g. a peer for a "syncgate at most 0.85x" target).
# For checking that a change is faster before it lands (bench/RESULTS.md records what it
# printed).
#
#   scripts/bench-ab.sh [--rounds N] [--auth] [--echo] BIN... -- LOADGEN_RUN_ARGS...
#
# BIN: syncgate binaries (e.g. copies of target/release/syncgate built at two commits);
# BIN@epoll runs that binary with io.backend = "epoll"; peer:tokio-tungstenite and
# peer:fastwebsockets run the bench's peers (target/release/peer-*), for ratios against
# them from interleaved rounds (their scenarios: ping, frames).
# LOADGEN_RUN_ARGS: the scenario, as for `loadgen run` (e.g. --scenario ping --connections
# 500). --auth gives syncgate an HS256 secret (for --scenario storm with --tokens from
# scripts/bench.sh's cache). --echo turns on the conformance /echo route (for --scenario
# frames). Environment: LOADGEN (default target/release/loadgen under
# CARGO_TARGET_DIR), SERVER_CPU / CLIENT_CPU (default 0 and 1).
#
# Each run starts the binary afresh with the config scripts/bench.sh uses (one worker,
# store on /dev/shm unless SYNCGATE_BENCH_STORAGE names another directory, connection
# limits raised), pins it and the load client to their
# cores, and reads the load client's record. Runs alternate between builds so that a
# change in the machine's load hits every build alike.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/bench-common.sh
source "$ROOT/scripts/bench-common.sh"
ROUNDS=3
AUTH=0
ECHO=0
BINS=()
while [[ $# -gt 0 && $1 != -- ]]; do
  case $1 in
    --rounds) ROUNDS=$2; shift ;;
    --auth) AUTH=1 ;;
    --echo) ECHO=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    peer:tokio-tungstenite|peer:fastwebsockets) BINS+=("$1") ;;
    *@epoll) [[ -x ${1%@epoll} ]] || { echo "bench-ab.sh: ${1%@epoll} is not an executable" >&2; exit 2; }
       BINS+=("$(realpath "${1%@epoll}")@epoll") ;;
    *) [[ -x $1 ]] || { echo "bench-ab.sh: $1 is not an executable" >&2; exit 2; }
       BINS+=("$(realpath "$1")") ;;
  esac
  shift
done
[[ ${1:-} == -- ]] || { echo "bench-ab.sh: expected -- and the loadgen arguments" >&2; exit 2; }
shift
(( ${#BINS[@]} > 0 )) || { echo "bench-ab.sh: no syncgate binary given" >&2; exit 2; }
LOADGEN=${LOADGEN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/loadgen}
[[ -x $LOADGEN ]] || { echo "bench-ab.sh: no load client at $LOADGEN (cargo build --release -p syncgate-bench)" >&2; exit 2; }
SECRET_FILE=${XDG_CACHE_HOME:-$HOME/.cache}/syncgate-bench/hs256.secret
if [[ $AUTH == 1 && ! -f $SECRET_FILE ]]; then
  echo "bench-ab.sh: --auth needs $SECRET_FILE (run scripts/bench.sh --scenarios storm once)" >&2
  exit 2
fi

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
PIN_SERVER=(taskset -c "${SERVER_CPU:-0}")
PIN_CLIENT=(taskset -c "${CLIENT_CPU:-1}")
# The store goes where SYNCGATE_BENCH_STORAGE says (default /dev/shm: fsync costs nothing
# there, so runs compare CPU; a directory on a disk compares what the syncs cost too).
WORK=$(mktemp -d "${SYNCGATE_BENCH_STORAGE:-/dev/shm}/syncgate-ab.XXXXXX")
SERVER_PID=
cleanup() {
  [[ -n $SERVER_PID ]] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

# One run of binary $1 (run number $2, then the loadgen arguments); sets RATE, CPU, P99,
# FSYNCS (the store's batches per second, '-' where the scenario has none) and THREADS (the
# server's CPU per operation by thread, as the load client printed it).
run_one() {
  local bin=$1 n=$2 port=$((10000 + RANDOM % 10000))
  shift 2
  local dir=$WORK/run-$n
  mkdir -p "$dir"
  local auth=''
  [[ $AUTH == 1 ]] && auth=$(printf '[auth]\nsecret = "%s"' "$(cat "$SECRET_FILE")")
  [[ $ECHO == 1 ]] && auth+=$'\n[conformance]\necho = true'
  local peer='' backend=''
  case $bin in
    peer:*) peer=${bin#peer:} ;;
    *@epoll) backend=$'\n[io]\nbackend = "epoll"'; bin=${bin%@epoll} ;;
  esac
  if [[ -n $peer ]]; then
    local exe=${LOADGEN%/loadgen}/peer-${peer#tokio-}
    "${PIN_SERVER[@]}" "$exe" "127.0.0.1:$port" 2>"$dir/server.log" &
    SERVER_PID=$!
    for _ in $(seq 100); do grep -qs "ready listen=" "$dir/server.log" && break; sleep 0.1; done
    grep -qs "ready listen=" "$dir/server.log" || { echo "bench-ab.sh: $exe did not start:" >&2; tail -5 "$dir/server.log" >&2; exit 1; }
  else
    syncgate_bench_toml "$port" "$dir/store" 1 '' "$auth$backend" >"$dir/syncgate.toml"
    "${PIN_SERVER[@]}" "$bin" run --config "$dir/syncgate.toml" 2>"$dir/server.log" &
    SERVER_PID=$!
    for _ in $(seq 100); do syncgate_healthy "$port" && break; sleep 0.1; done
    syncgate_healthy "$port" || { echo "bench-ab.sh: $bin did not start:" >&2; tail -5 "$dir/server.log" >&2; exit 1; }
  fi
  "${PIN_CLIENT[@]}" "$LOADGEN" run --server "${peer:-syncgate}" --addr "127.0.0.1:$port" \
    --server-pid "$SERVER_PID" --out "$dir/record.jsonl" "$@" >"$dir/loadgen.out" 2>"$dir/loadgen.log" \
    || { echo "bench-ab.sh: the load client failed:" >&2; tail -3 "$dir/loadgen.log" >&2; exit 1; }
  kill "$SERVER_PID"
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
  read -r RATE CPU P99 FSYNCS SWITCHES < <(python3 -c '
import json, sys
r = json.loads(open(sys.argv[1]).readline())
if r["error"]:
    sys.exit("bench-ab.sh: the run failed: " + r["error"])
p99, fsyncs, sw = r.get("p99_us"), r.get("fsyncs_per_s"), r.get("server_switches")
opt = lambda v: "-" if v is None else "%.0f" % v
switches = "-" if sw is None else "%.2f+%.2f" % (sw["voluntary_per_op"], sw["involuntary_per_op"])
print("%.0f %.2f %s %s %s" % (r["rate"], r["server_cpu_us_per_op"], opt(p99), opt(fsyncs), switches))' "$dir/record.jsonl")
  # The load client's own line of the split (Record::server_threads_line).
  THREADS=$(sed -n 's/.* server cpu by thread, us\/op user+system: //p' "$dir/loadgen.log" | tail -1)
  [[ -n ${CPU:-} ]] || exit 1
}

echo "loadgen run ... $*"
echo "rounds: $ROUNDS; builds in turn: ${BINS[*]}"
declare -A RATES CPUS P99S FSYNCSS
n=0
for round in $(seq "$ROUNDS"); do
  for b in "${!BINS[@]}"; do
    n=$((n + 1))
    RATE='' CPU='' P99='' FSYNCS='' SWITCHES='' THREADS=''
    run_one "${BINS[$b]}" "$n" "$@"
    echo "round $round build $((b + 1)): rate $RATE, server CPU $CPU us/op, p99 $P99 us, fsyncs/s $FSYNCS, context switches/op (voluntary+involuntary) $SWITCHES, by thread (user+system us/op) ${THREADS:--}"
    RATES[$b]+="$RATE "
    CPUS[$b]+="$CPU "
    P99S[$b]+="$P99 "
    FSYNCSS[$b]+="$FSYNCS "
  done
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{v[NR]=$1} END {print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }
echo
# Each round's CPU per operation over the first build's in the same round: on a noisy
# machine the median of these ratios moves less than the ratio of the medians.
ratios() { # $1: build index; prints "median (lowest-highest)"
  paste -d' ' <(tr ' ' '\n' <<<"${CPUS[0]}" | grep .) <(tr ' ' '\n' <<<"${CPUS[$1]}" | grep .) |
    awk '{print $2 / $1}' | sort -g |
    awk '{v[NR]=$1} END {m = NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2; printf "%.2fx (%.2f-%.2f)", m, v[1], v[NR]}'
}
echo "| build | median rate | median server CPU us/op | CPU/op / first build's, median of the rounds (range) | median p99 us | median fsyncs/s |"
echo "|---|---:|---:|---:|---:|---:|"
for b in "${!BINS[@]}"; do
  p99=$(tr ' ' '\n' <<<"${P99S[$b]}" | grep -v '^-$' | tr '\n' ' ')
  fsyncs=$(tr ' ' '\n' <<<"${FSYNCSS[$b]}" | grep -v '^-$' | tr '\n' ' ')
  ratio=-
  ((b > 0)) && ratio=$(ratios "$b")
  echo "| ${BINS[$b]} | $(median <<<"${RATES[$b]}") | $(median <<<"${CPUS[$b]}") | $ratio | $(median <<<"$p99") | $(median <<<"$fsyncs") |"
done
