#!/usr/bin/env bash
# The relay benchmark (bench/README.md, "Relay"): syncgate in upstream mode against the
# reverse proxies an operator would otherwise put in front of zero-cache, nginx and HAProxy
# (Debian's packages), each in front of the same plain upstream, same load client, same
# pinning, one run.
#
#   scripts/bench-relay.sh                 every scenario (about 15 minutes)
#   scripts/bench-relay.sh --scenarios ping,latency --no-build
#
# Scenarios: ping (20 B class: an 11-byte ping and its pong, 100 and 1,000 connections),
# echo (a push of 512 B or 16 KiB and its 3-message poke, 100 and 1,000 / 100 connections),
# latency (pushes paced at a fixed rate below saturation, also straight to the upstream:
# what each proxy adds), idle (10,000 and 50,000 relayed connections: the proxy's memory per
# connection, both hops; below, the processes that takes), storm (connect, upgrade,
# connected, close; HS256 tokens verified by syncgate, ignored by the others), zero-cache
# (storm and 1,000 idle connections with the proxies in front of a real zero-cache 1.9 and
# its PostgreSQL, started as bench-front-door.sh starts them).
#
# The upstream is the fastwebsockets peer of bench.sh (it speaks the protocol subset the load
# client uses), started afresh with each proxy. The proxy runs on SERVER_CPU (default 0), the
# upstream and the load client share CLIENT_CPU (default 1): the proxy's CPU per operation is
# the comparison (its whole process tree: nginx's master and worker, HAProxy's one process,
# syncgate's supervisor, listener and worker); rates are bounded by the other core.
#
# Tuning, alike for all three: one worker (nginx worker_processes 1, HAProxy nbthread 1,
# syncgate workers = 1), no access logging, 16 KiB buffers (nginx proxy_buffer_size, HAProxy
# tune.bufsize; syncgate's receive buffers are its own), WebSocket upgrade passed through
# (nginx: proxy_http_version 1.1 and the Upgrade/Connection headers, as its documentation
# says; HAProxy: mode http, timeout tunnel). syncgate's health checks are off: the echo
# upstream has no /keepalive.
#
# The idle runs hold more descriptors than one process may (the hard open-file limit, 20,000
# here; raising it needs CAP_SYS_RESOURCE), and a relayed connection is two descriptors in
# the proxy. So each proxy gets the same number of workers, enough that each holds under
# half the limit: nginx worker_processes with `reuseport`; syncgate `workers`; HAProxy 2.6
# has no multi-process mode any more and its threads share one descriptor table, so it runs
# as that many one-thread instances bound to the same port (SO_REUSEPORT spreads the
# connections over them), measured together. The upstream is then several peer processes on
# ports of their own (nginx and HAProxy round-robin over them, syncgate hashes the group), at
# most 10,000 connections each: past about 14,000 connections to one address and port,
# connect() scans the ephemeral ports for a free one and opening slows to a crawl. The load
# client spreads over processes and source addresses the same way (as bench.sh's idle).
#
# Options: --scenarios a,b,.. --no-build. Environment: SERVER_CPU, CLIENT_CPU,
# CARGO_TARGET_DIR. Needs nginx (Debian: nginx or nginx-light) and haproxy; the zero-cache
# scenario also PostgreSQL and Node. Writes bench/results/<date>-relay/{results.jsonl,
# table.md,chart.svg} and logs/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/bench-common.sh
source "$ROOT/scripts/bench-common.sh"
INVOCATION="scripts/bench-relay.sh $*"
SCENARIOS=ping,echo,latency,idle,storm,zero-cache
BUILD=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --scenarios) SCENARIOS=$2; shift ;;
    --no-build) BUILD=0 ;;
    -h|--help) sed -n '2,47p' "$0"; exit 0 ;;
    *) echo "bench-relay.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
log() { echo "bench-relay.sh: $*" >&2; }
wanted() { [[ ",$SCENARIOS," == *",$1,"* ]]; }

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
OUT=$ROOT/bench/results/$(date -u +%Y-%m-%d-%H%M%S)-relay
LOGS=$OUT/logs
mkdir -p "$LOGS"
RESULTS=$OUT/results.jsonl
WORK=$(mktemp -d /tmp/syncgate-bench-relay.XXXXXX)

bench_build "$BUILD" syncgate loadgen peer-fastwebsockets bench-report
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
[[ -x $NGINX ]] || { log "nginx not found (apt-get install nginx-light)"; exit 1; }
[[ -x $HAPROXY ]] || { log "haproxy not found (apt-get install haproxy)"; exit 1; }

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FD_LIMIT=$(ulimit -n)
bench_pinning proxy "upstream (fastwebsockets peer)"
TIMING=(--warmup 2 --window 1 --windows 7)

# Tokens for the storm: bench.sh's pool (kept in the same cache).
{ wanted storm || wanted zero-cache; } && bench_tokens "$TARGET/loadgen" hs256

EPHEMERAL_LOW=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range)
PORT=$((EPHEMERAL_LOW > 22000 ? 10000 + RANDOM % 10000 : 1024 + RANDOM % 4000))
RUN=0
UP_PIDS=() PROXY_PID=
# Upstream processes and proxy workers of a run: one each but in the idle runs.
UPSTREAMS=1
WORKERS=1
# zero-cache's port while the zero-cache scenarios run (the proxies' upstream instead of
# the peers).
ZC_UPSTREAM=
cleanup() {
  for p in $PROXY_PID "${UP_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  [[ -n ${ZC_MARKER:-} ]] && bench_zero_stop
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

wait_port() { # $1 port, $2 pid, $3 name
  for _ in $(seq 200); do
    kill -0 "$2" 2>/dev/null || { log "$3 died at start"; return 1; }
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  log "$3 not listening on $1"
  return 1
}

# Starts the upstreams and proxy $1 (syncgate, nginx, haproxy; direct: none) for one run;
# sets ADDR and PROXY_PID. $2: extra syncgate TOML (auth for the storm).
start() {
  local name=$1 extra=${2:-} i
  RUN=$((RUN + 1))
  local up=$((PORT + 1)) proxy=$((PORT + 1 + UPSTREAMS)) dir=$WORK/run-$RUN
  PORT=$proxy
  mkdir -p "$dir"
  local ports=() urls=() nginx_servers='' haproxy_servers=''
  if [[ -n $ZC_UPSTREAM ]]; then
    # The zero-cache of the zero-cache scenarios, up for all their runs.
    up=$ZC_UPSTREAM
    ports=("$up")
  else
    for ((i = 0; i < UPSTREAMS; i++)); do
      "${PIN_CLIENT[@]}" "$TARGET/peer-fastwebsockets" "127.0.0.1:$((up + i))" 2>"$LOGS/upstream-$RUN-$i.log" &
      UP_PIDS+=($!)
      wait_port "$((up + i))" "$!" "upstream $i"
      ports+=("$((up + i))")
    done
  fi
  for i in "${!ports[@]}"; do
    urls+=("\"ws://127.0.0.1:${ports[i]}\"")
    nginx_servers+="        server 127.0.0.1:${ports[i]};"$'\n'
    haproxy_servers+="    server up$i 127.0.0.1:${ports[i]}"$'\n'
  done
  ADDR=127.0.0.1:$proxy
  case $name in
    direct)
      ADDR=127.0.0.1:$up
      PROXY_PID=
      return 0 ;;
    syncgate)
      syncgate_bench_toml "$proxy" "$dir/store" "$WORKERS" '' \
        "$extra"$'\n[upstream]\n'"urls = [$(IFS=,; echo "${urls[*]}")]"$'\nhealth_interval_ms = 0' >"$LOGS/syncgate-$RUN.toml"
      "${PIN_SERVER[@]}" "$TARGET/syncgate" run --config "$LOGS/syncgate-$RUN.toml" 2>"$LOGS/syncgate-$RUN.log" &
      PROXY_PID=$! ;;
    nginx)
      mkdir -p "$dir/nginx"
      local reuseport=''
      ((WORKERS > 1)) && reuseport=' reuseport'
      cat >"$LOGS/nginx-$RUN.conf" <<EOF
worker_processes $WORKERS;
worker_rlimit_nofile $FD_LIMIT;
daemon off;
pid $dir/nginx/nginx.pid;
error_log $LOGS/nginx-$RUN.log warn;
events { worker_connections $FD_LIMIT; }
http {
    access_log off;
    client_body_temp_path $dir/nginx/body;
    proxy_temp_path $dir/nginx/proxy;
    fastcgi_temp_path $dir/nginx/fastcgi;
    uwsgi_temp_path $dir/nginx/uwsgi;
    scgi_temp_path $dir/nginx/scgi;
    map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }
    upstream up {
$nginx_servers    }
    server {
        listen 127.0.0.1:$proxy backlog=4096$reuseport;
        location / {
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_set_header Host \$host;
            proxy_buffer_size 16k;
            proxy_buffers 8 16k;
            proxy_busy_buffers_size 32k;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }
    }
}
EOF
      "${PIN_SERVER[@]}" "$NGINX" -p "$dir/nginx" -c "$LOGS/nginx-$RUN.conf" -e "$LOGS/nginx-$RUN.log" &
      PROXY_PID=$! ;;
    haproxy)
      cat >"$LOGS/haproxy-$RUN.cfg" <<EOF
global
    nbthread 1
    # Two descriptors per relayed connection: HAProxy refuses a maxconn the limit cannot hold.
    maxconn $(( (FD_LIMIT - 100) / 2 ))
    tune.bufsize 16384
defaults
    mode http
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
frontend relay
    bind 127.0.0.1:$proxy backlog 4096
    default_backend up
backend up
    balance roundrobin
$haproxy_servers
EOF
      if ((WORKERS == 1)); then
        "${PIN_SERVER[@]}" "$HAPROXY" -db -f "$LOGS/haproxy-$RUN.cfg" 2>"$LOGS/haproxy-$RUN.log" &
      else
        # WORKERS instances under one shell, so that the load client's process tree (and
        # stop's TERM) takes them all; HAProxy binds with SO_REUSEPORT unless told not to.
        (
          trap 'kill -TERM $(jobs -p) 2>/dev/null; wait' TERM
          for ((i = 0; i < WORKERS; i++)); do
            "${PIN_SERVER[@]}" "$HAPROXY" -db -f "$LOGS/haproxy-$RUN.cfg" 2>"$LOGS/haproxy-$RUN-$i.log" &
          done
          wait
        ) &
      fi
      PROXY_PID=$! ;;
  esac
  if [[ $name == syncgate ]]; then
    for _ in $(seq 200); do syncgate_healthy "$proxy" && return 0; sleep 0.05; done
    log "syncgate not ready"
    return 1
  fi
  wait_port "$proxy" "$PROXY_PID" "$name" || return 1
  # Every worker's socket bound before the load starts: SO_REUSEPORT spreads connections
  # over the sockets there at connect time.
  for _ in $(seq 200); do
    (($(ss -Hltn "sport = :$proxy" | wc -l) >= WORKERS)) && return 0
    sleep 0.05
  done
  log "$name: fewer than $WORKERS listening sockets on $proxy"
  return 1
}

stop() {
  for p in $PROXY_PID "${UP_PIDS[@]}"; do
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  PROXY_PID= UP_PIDS=()
}

# One measurement: $1 proxy, $2 extra syncgate TOML, then loadgen arguments.
measure() {
  local name=$1 extra=$2
  shift 2
  if ! start "$name" "$extra"; then
    stop
    "$TARGET/loadgen" run --server "$name" --addr 127.0.0.1:1 "$@" --out "$RESULTS" \
      --fail-with "did not start (logs/*-$RUN.*)" >/dev/null 2>&1 || true
    return 0
  fi
  local pid=()
  [[ -n $PROXY_PID ]] && pid=(--server-pid "$PROXY_PID")
  "${PIN_CLIENT[@]}" "$TARGET/loadgen" run --server "$name" --addr "$ADDR" "${pid[@]}" \
    --out "$RESULTS" "$@" >/dev/null 2>>"$LOGS/loadgen.log" || log "run $RUN ($name $*) failed"
  stop
}
PROXIES=(syncgate nginx haproxy)
each() { for p in "${PROXIES[@]}"; do measure "$p" '' "$@"; done; }

if wanted ping; then
  for n in 100 1000; do each --scenario ping --connections "$n" --connect-concurrency 8 "${TIMING[@]}"; done
fi
if wanted echo; then
  for e in "512 100" "512 1000" "16384 100"; do
    read -r size n <<<"$e"
    each --scenario echo --size "$size" --connections "$n" --connect-concurrency 8 "${TIMING[@]}"
  done
fi
if wanted latency; then
  # 100 connections, 2,000 pushes a second in all: a fraction of what any of them carries.
  for p in direct "${PROXIES[@]}"; do
    measure "$p" '' --scenario front-door --connections 100 --rate 2000 --variant "512 B x 100 conns, 2000 pushes/s" \
      --warmup 2 --window 2 --windows 7
  done
fi
if wanted idle; then
  for n in 10000 50000; do
    # Proxy workers: each under half the limit at two descriptors a connection, which
    # leaves room for the spread's imbalance. Upstreams: at most 10,000 connections to one
    # address and port (the top of this file says why); the load client alike
    # (bench-common.sh's idle_spread).
    WORKERS=$(( (2 * n + FD_LIMIT / 2 - 1) / (FD_LIMIT / 2) ))
    UPSTREAMS=$(( (n + 9999) / 10000 ))
    idle_spread "$n"
    each "${IDLE_ARGS[@]}" --note "proxy workers: $WORKERS (HAProxy: one-thread instances); upstream processes: $UPSTREAMS; load-client processes: $IDLE_PROCS"
  done
  WORKERS=1 UPSTREAMS=1
fi
if wanted storm; then
  secret=$(cat "$CACHE/hs256.secret")
  for p in "${PROXIES[@]}"; do
    note=
    extra=
    if [[ $p == syncgate ]]; then
      extra="[auth]"$'\n'"secret = \"$secret\""
    else
      note="no JWT work at the proxy"
    fi
    measure "$p" "$extra" --scenario storm --connections 16 --sources 4 \
      --tokens "$CACHE/tokens-hs256-$POOL" --variant "HS256, 16 in flight" ${note:+--note "$note"} "${TIMING[@]}"
  done
fi

if wanted zero-cache; then
  # The same proxies in front of a real zero-cache 1.9 (PostgreSQL behind it), the server
  # they would front in production. zero-cache verifies the storm's HS256 tokens (syncgate
  # too, the others pass them on); "direct" is the load client straight to zero-cache, and
  # every record carries zero-cache's and PostgreSQL's CPU per connection. They run on the
  # proxy's core, as in the front-door benchmark. Idle: 1,000 connections, each its own
  # client group, which zero-cache holds at about 0.65 MB a group.
  bench_zero_tools
  secret=$(cat "$CACHE/hs256.secret")
  bench_zero_start "$((PORT + 1))" "$((PORT + 3))" ZERO_AUTH_SECRET="$secret"
  ZC_UPSTREAM=$((PORT + 3))
  PORT=$((PORT + 4))
  behind=(--zero-cache-app --cpu-of "zero-cache=$ZC_PID" --cpu-of "postgres=$PG_PID")
  for p in direct "${PROXIES[@]}"; do
    extra=
    [[ $p == syncgate ]] && extra="[auth]"$'\n'"secret = \"$secret\""
    measure "$p" "$extra" --scenario storm --connections 16 --sources 4 "${behind[@]}" \
      --tokens "$CACHE/tokens-hs256-$POOL" --variant "HS256 at zero-cache, 16 in flight" "${TIMING[@]}"
  done
  each --scenario idle --connections 1000 --settle 3 --connect-concurrency 8 "${behind[@]}" \
    --note "in front of zero-cache"
  ZC_UPSTREAM=
  bench_zero_stop
fi

{
  echo "# syncgate relay vs nginx and HAProxy, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- Machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), Linux $(uname -r); open-file limit $FD_LIMIT"
  echo "- Pinning: $PINNING"
  echo "- syncgate $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?') (upstream mode, 1 worker), $("$NGINX" -v 2>&1 | sed 's/.*: //') (1 worker), $("$HAPROXY" -v | head -1 | awk '{print "HAProxy", $3}') (1 thread)"
  echo "- Idle runs: as many workers a proxy as each row's note says (HAProxy: that many one-thread instances on one port), over several upstream processes"
  echo "- server CPU us/op is the proxy's; \"direct\" rows go straight to the upstream (no proxy: the latency baseline)"
  echo "- Command: $INVOCATION (every record's load-client command is in results.jsonl; configs in logs/)"
} >"$OUT/preamble.md"
"$TARGET/bench-report" "$RESULTS" "$OUT/preamble.md"
log "done: $OUT/table.md"
