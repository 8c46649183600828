#!/usr/bin/env bash
# Benchmarks syncgate against its peers (bench/README.md explains the method).
#
#   scripts/bench.sh --quick    a few minutes: one or two variants per scenario
#   scripts/bench.sh            the full matrix (about an hour on a 2-core box)
#
# Options: --servers a,b,...  (syncgate, syncgate-epoll, tokio-tungstenite, fastwebsockets,
#          node-ws, node-ws-nobufferutil; syncgate-epoll is syncgate with io.backend = "epoll",
#          syncgate with the default "auto", i.e. io_uring where the host allows it), --scenarios a,b,... (ping, echo, fanout, storm, idle,
#          compressed, frames), --idle-sizes n,n,... (idle connection counts; default 10000 in
#          quick mode, 10000,50000,100000 in full mode), --no-build.
# Environment: SERVER_CPU / CLIENT_CPU (default 0 and 1), SYNCGATE_BENCH_STORAGE (where
# syncgate's client-group store goes; default /dev/shm, see README), CARGO_TARGET_DIR.
#
# It builds in release mode, pins the server to one core and the load client to the
# other, raises the open-file limit, starts each server afresh for every run, runs the
# load client, and writes bench/results/<date>/{results.jsonl,table.md,chart.svg}.
# Idle runs past one process's open-file limit spread the load client over several
# processes and syncgate over several workers (the peers, single processes, are skipped).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/bench-common.sh
source "$ROOT/scripts/bench-common.sh"
INVOCATION="scripts/bench.sh $*"
MODE=full
SERVERS=syncgate,tokio-tungstenite,fastwebsockets,node-ws,node-ws-nobufferutil
SCENARIOS=ping,echo,fanout,storm,idle,compressed,frames
IDLE_SIZES=
BUILD=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) MODE=quick ;;
    --full) MODE=full ;;
    --servers) SERVERS=$2; shift ;;
    --scenarios) SCENARIOS=$2; shift ;;
    --idle-sizes) IDLE_SIZES=$2; shift ;;
    --no-build) BUILD=0 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
OUT=$ROOT/bench/results/$(date -u +%Y-%m-%d-%H%M%S)
LOGS=$OUT/logs
mkdir -p "$LOGS"
RESULTS=$OUT/results.jsonl
STORE=${SYNCGATE_BENCH_STORAGE:-/dev/shm}/syncgate-bench-$$
mkdir -p "$STORE"

log() { echo "bench.sh: $*" >&2; }
wanted() { [[ ",$2," == *",$1,"* ]]; }

# --- build -------------------------------------------------------------------------
bench_build "$BUILD" syncgate loadgen peer-tungstenite peer-fastwebsockets bench-report
LOADGEN=$TARGET/loadgen
NODE_OK=0
if command -v node >/dev/null && command -v npm >/dev/null; then
  if [[ ! -d $ROOT/bench/node-peer/node_modules/ws ]]; then
    (cd "$ROOT/bench/node-peer" && npm ci --no-audit --no-fund >&2)
  fi
  NODE_OK=1
else
  log "node/npm not found: the node-ws peers are skipped"
fi

# --- machine ---------------------------------------------------------------------
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FD_LIMIT=$(ulimit -n)
bench_pinning server

if [[ $MODE == quick ]]; then
  TIMING=(--warmup 1 --window 1 --windows 5)
else
  TIMING=(--warmup 3 --window 2 --windows 7)
fi
# --- tokens for the connect storm ------------------------------------------------
bench_tokens "$LOADGEN" hs256 rs256

# --- servers ---------------------------------------------------------------------
# Server ports sit below the ephemeral range, which the load client's many sockets use up.
EPHEMERAL_LOW=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range)
PORT=$((EPHEMERAL_LOW > 22000 ? 10000 + RANDOM % 10000 : 1024 + RANDOM % 4000))
SERVER_PID=
RUN=0
# syncgate's worker processes (the idle runs past the open-file limit use more).
SG_WORKERS=1

# Writes a syncgate config for one run; $1: extra TOML (auth, compression).
syncgate_config() {
  local cfg=$LOGS/syncgate-$RUN.toml
  syncgate_bench_toml "$PORT" "$STORE/run-$RUN" "$SG_WORKERS" '' "$1" >"$cfg"
  # Keys a daemon of another version does not know are dropped (with a note), not fatal.
  if ! "$TARGET/syncgate" check-config "$cfg" >/dev/null 2>"$cfg.err"; then
    for key in max_handshakes_per_ip max_handshakes connect_per_ip; do
      if grep -q "$key" "$cfg.err"; then
        log "syncgate refuses limits.$key; dropped"
        sed -i "/^$key = /d" "$cfg"
      fi
    done
    "$TARGET/syncgate" check-config "$cfg" >&2
  fi
  echo "$cfg"
}

# Starts server $1 for scenario $2 (plain, deflate, hs256, rs256); sets SERVER_PID, ADDR.
start_server() {
  local name=$1 kind=$2 log=$LOGS/$1-$RUN.log extra=
  PORT=$((PORT + 1))
  ADDR=127.0.0.1:$PORT
  case $name in
    syncgate|syncgate-epoll)
      case $kind in
        deflate) extra=$'[compression]\nenabled = true' ;;
        echo) extra=$'[conformance]\necho = true' ;;
        hs256) extra="[auth]"$'\n'"secret = \"$(cat "$CACHE/hs256.secret")\"" ;;
        rs256) extra="[auth]"$'\n'"jwk = '$(cat "$CACHE/jwk.json")'" ;;
      esac
      [[ $name == syncgate-epoll ]] && extra+=$'\n[io]\nbackend = "epoll"'
      local cfg
      cfg=$(syncgate_config "$extra")
      CMD=("${PIN_SERVER[@]}" "$TARGET/syncgate" run --config "$cfg") ;;
    tokio-tungstenite) CMD=("${PIN_SERVER[@]}" "$TARGET/peer-tungstenite" "$ADDR") ;;
    fastwebsockets) CMD=("${PIN_SERVER[@]}" "$TARGET/peer-fastwebsockets" "$ADDR") ;;
    node-ws|node-ws-nobufferutil)
      CMD=("${PIN_SERVER[@]}" node "$ROOT/bench/node-peer/server.js" "$ADDR")
      [[ $kind == deflate ]] && CMD+=(--deflate) ;;
  esac
  echo "run $RUN: ${CMD[*]}" >>"$OUT/servers.txt"
  if [[ $name == node-ws-nobufferutil ]]; then
    WS_NO_BUFFER_UTIL=1 "${CMD[@]}" 2>"$log" &
  else
    "${CMD[@]}" 2>"$log" &
  fi
  SERVER_PID=$!
  # Ready: the server's ready line, or syncgate's health check (it logs at warn here).
  for _ in $(seq 200); do
    kill -0 "$SERVER_PID" 2>/dev/null || { log "$name died at start:"; tail -5 "$log" >&2; return 1; }
    grep -qs "ready listen=" "$log" && return 0
    if [[ $name == syncgate* ]] && syncgate_healthy "$PORT"; then return 0; fi
    sleep 0.1
  done
  log "$name not ready after 20 s"
  return 1
}

stop_server() {
  [[ -n $SERVER_PID ]] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
  rm -rf "$STORE/run-$RUN"
}
trap 'stop_server; rm -rf "$STORE"' EXIT

supports() { # server $1 can run kind $2
  case $2 in
    deflate) [[ $1 == syncgate* || $1 == node-ws* ]] ;;
    # The plain /echo route: syncgate's conformance route and the Rust peers' twin of it.
    echo) [[ $1 != node-ws* ]] ;;
    *) true ;;
  esac
}

# One measurement: server $1, kind $2, then loadgen arguments.
measure() {
  local name=$1 kind=$2
  shift 2
  if [[ $name == node-ws* && $NODE_OK == 0 ]]; then return 0; fi
  supports "$name" "$kind" || return 0
  RUN=$((RUN + 1))
  if ! start_server "$name" "$kind"; then
    stop_server
    "$LOADGEN" run --server "$name" --addr "$ADDR" "$@" --out "$RESULTS" \
      --fail-with "server did not start (logs/$name-$RUN.log)" >/dev/null 2>&1 || true
    return 0
  fi
  "${PIN_CLIENT[@]}" "$LOADGEN" run --server "$name" --addr "$ADDR" --server-pid "$SERVER_PID" \
    --out "$RESULTS" "$@" >/dev/null 2> >(tee -a "$LOGS/loadgen.log" >&2) ||
    log "run $RUN ($name $*) failed; see results"
  stop_server
}

# --- the matrix ------------------------------------------------------------------
IFS=, read -r -a SERVER_LIST <<<"$SERVERS"
each() { # kind, loadgen args: run on every server
  local kind=$1
  shift
  for s in "${SERVER_LIST[@]}"; do measure "$s" "$kind" "$@"; done
}

if [[ $MODE == quick ]]; then
  PING=(500) ECHO=("512 100" "16384 200") FANOUT=(100) IDLE=(10000)
  ZPING=(100) ZECHO=("16384 100") STORMS=(hs256)
  FRAMES=("20 100" "1024 500" "16384 200" "65536 100")
else
  PING=(100 500) ECHO=("512 100" "512 200" "512 500" "1024 100" "1024 200" "1024 500" "16384 100" "16384 200" "16384 500")
  FANOUT=(10 100 1000) IDLE=(10000 50000 100000)
  ZPING=(100 500) ZECHO=("512 100" "1024 100" "16384 100") STORMS=(hs256 rs256)
  FRAMES=("20 100" "512 500" "1024 500" "16384 200" "65536 100")
fi
[[ -n $IDLE_SIZES ]] && IFS=, read -r -a IDLE <<<"$IDLE_SIZES"

if wanted ping "$SCENARIOS"; then
  for n in "${PING[@]}"; do each plain --scenario ping --connections "$n" "${TIMING[@]}"; done
fi
if wanted echo "$SCENARIOS"; then
  for e in "${ECHO[@]}"; do
    read -r size n <<<"$e"
    each plain --scenario echo --size "$size" --connections "$n" "${TIMING[@]}"
  done
fi
if wanted fanout "$SCENARIOS"; then
  for g in "${FANOUT[@]}"; do
    # 1000 connections in all. Groups of 1000 are one group, the "1000 clients" of the
    # fan-out target: one push in flight, so the server waits while the client reads the
    # deliveries (the load client bounds the rate anyway; two groups doubled the latency).
    groups=$(( 1000 / g ))
    each plain --scenario fanout --group-size "$g" --groups "$groups" --size 512 "${TIMING[@]}"
  done
fi
if wanted storm "$SCENARIOS"; then
  for alg in "${STORMS[@]}"; do
    ALG=${alg^^}
    for s in "${SERVER_LIST[@]}"; do
      note=
      [[ $s != syncgate* ]] && note="peer does no JWT work (token ignored)"
      measure "$s" "$alg" --scenario storm --connections 16 --sources 4 \
        --tokens "$CACHE/tokens-$alg-$POOL" --variant "$ALG, 16 in flight" ${note:+--note "$note"} "${TIMING[@]}"
    done
  done
fi
if wanted idle "$SCENARIOS"; then
  for n in "${IDLE[@]}"; do
    # The load client spread over processes and source addresses (bench-common.sh).
    idle_spread "$n"
    procs=$IDLE_PROCS
    args=("${IDLE_ARGS[@]}")
    skipped=()
    for s in "${SERVER_LIST[@]}"; do
      if [[ $s != syncgate* ]]; then
        # A peer is one process: it must hold every connection itself.
        if (( n + 1000 > FD_LIMIT )); then skipped+=("$s"); continue; fi
        measure "$s" plain "${args[@]}"
        continue
      fi
      # syncgate: enough workers that each holds under half the limit, which leaves
      # room for the routing hash's imbalance (the default global cap counts every worker).
      SG_WORKERS=$(( (n + FD_LIMIT / 2 - 1) / (FD_LIMIT / 2) ))
      note=
      (( SG_WORKERS > 1 || procs > 1 )) && note="syncgate with $SG_WORKERS workers, load client in $procs processes"
      measure "$s" plain "${args[@]}" ${note:+--note "$note"}
      SG_WORKERS=1
    done
    if (( ${#skipped[@]} > 0 )); then
      log "idle $n skipped for ${skipped[*]}: a single process, open-file limit $FD_LIMIT"
      echo "idle $n connections for ${skipped[*]}: a peer is a single process and may hold only $FD_LIMIT descriptors (hard open-file limit; raising it needs CAP_SYS_RESOURCE), while syncgate spreads them over workers" >>"$OUT/skipped.txt"
    fi
  done
fi
if wanted compressed "$SCENARIOS"; then
  for n in "${ZPING[@]}"; do each deflate --scenario ping --connections "$n" --deflate "${TIMING[@]}"; done
  for e in "${ZECHO[@]}"; do
    read -r size n <<<"$e"
    each deflate --scenario echo --size "$size" --connections "$n" --deflate "${TIMING[@]}"
  done
fi

if wanted frames "$SCENARIOS"; then
  # The WebSocket layer alone, like for like: a text message of N bytes echoed on /echo.
  for f in "${FRAMES[@]}"; do
    read -r size n <<<"$f"
    each echo --scenario frames --size "$size" --connections "$n" "${TIMING[@]}"
  done
fi

# --- report ----------------------------------------------------------------------
{
  echo "# syncgate benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), $MODE mode"
  echo
  echo "- Machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(free -g | awk '/Mem:/{print $2}') GiB, Linux $(uname -r)"
  echo "- Pinning: $PINNING; open-file limit $FD_LIMIT"
  echo "- syncgate $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?'), workers = 1 (idle runs past the open-file limit: more, see their note), log_level = warn, client-group store on $(dirname "$STORE")"
  echo "- Peers: tokio-tungstenite and fastwebsockets (bench/, current-thread tokio), Node $(node --version 2>/dev/null || echo 'n/a') with ws $(node -p "require('$ROOT/bench/node-peer/node_modules/ws/package.json').version" 2>/dev/null || echo 'n/a') (node-ws: with bufferutil; node-ws-nobufferutil: WS_NO_BUFFER_UTIL=1)"
  echo "- Timing: ${TIMING[*]} (median of the windows); each run starts its server afresh"
  echo "- Command: $INVOCATION (every record's exact load-client command is in results.jsonl; server commands and syncgate's configs in servers.txt and logs/)"
  if [[ -f $OUT/skipped.txt ]]; then
    echo "- Skipped: $(paste -sd ';' "$OUT/skipped.txt")"
  fi
} >"$OUT/preamble.md"
"$TARGET/bench-report" "$RESULTS" "$OUT/preamble.md"
log "done: $OUT/table.md and $OUT/chart.svg"
