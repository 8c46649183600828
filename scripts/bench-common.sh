# shellcheck shell=bash
# Shared by the benchmark scripts (sourced, not run): the syncgate config every benchmark
# run uses and its readiness check, so all measure the same thing; the release build, the
# pinning, the storm's tokens, and a real zero-cache with its PostgreSQL (bench-front-door.sh,
# bench-relay.sh). The functions log with the sourcing script's log().

# Builds the release binaries unless $1 is 0, then checks that each binary named after it
# is in $TARGET.
bench_build() {
  local build=$1 bin
  shift
  if [[ $build == 1 ]]; then
    log "building (release)"
    (cd "$ROOT" && cargo build --release -p syncgate -p syncgate-bench --bins)
  fi
  for bin in "$@"; do
    [[ -x $TARGET/$bin ]] || { log "missing $TARGET/$bin (build first)"; exit 1; }
  done
}

# With two CPUs and taskset: what runs on the server core ($1) goes to SERVER_CPU (default
# 0), the load client (and $2, if given) to CLIENT_CPU (default 1). Sets PIN_SERVER and
# PIN_CLIENT (command prefixes) and PINNING (the sentence for the report).
bench_pinning() {
  if [[ $(nproc) -ge 2 ]] && command -v taskset >/dev/null; then
    SERVER_CPU=${SERVER_CPU:-0}
    CLIENT_CPU=${CLIENT_CPU:-1}
    PIN_SERVER=(taskset -c "$SERVER_CPU")
    PIN_CLIENT=(taskset -c "$CLIENT_CPU")
    PINNING="$1 on CPU $SERVER_CPU, ${2:+$2 and }load client on CPU $CLIENT_CPU (taskset)"
  else
    PIN_SERVER=()
    PIN_CLIENT=()
    PINNING="not pinned (fewer than 2 CPUs or no taskset)"
  fi
}

# Distinct tokens for the connect storm, used in turn: enough that syncgate's 4096-slot
# token cache practically never still holds one when it comes round again.
POOL=65536

# Makes sure $CACHE (set here) holds keys and a pool of $POOL tokens for each algorithm
# named (hs256, rs256), minted with $1 (the loadgen binary). Keys and pools are kept between
# runs (tokens live a day, the keys are renewed after ten hours); RS256 signing is slow.
bench_tokens() {
  local loadgen=$1 alg
  shift
  CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/syncgate-bench
  mkdir -p "$CACHE"
  if [[ ! -f $CACHE/jwk.json ]] || [[ -n $(find "$CACHE/jwk.json" -mmin +600) ]]; then
    log "generating keys and $POOL tokens of each kind (RS256 signing takes a while)"
    "$loadgen" keygen --dir "$CACHE"
    rm -f "$CACHE"/tokens-*
  fi
  for alg in "$@"; do
    if [[ ! -f $CACHE/tokens-$alg-$POOL ]]; then
      "$loadgen" mint --alg "$alg" --keys "$CACHE" --count "$POOL" --out "$CACHE/tokens-$alg-$POOL"
    fi
  done
}

# Prints syncgate's benchmark config. $1 port on 127.0.0.1, $2 storage directory, $3 workers,
# $4 limits.max_connections (empty: the daemon's default), $5 extra TOML (auth, compression).
# The limits are raised so that the load client's connections are never refused as abuse.
syncgate_bench_toml() {
  cat <<TOML
listen = "127.0.0.1:$1"
workers = $3
log_level = "warn"
[storage]
path = "$2"
[limits]
max_group_connections = 2000
connect_per_ip = 1000000000
max_handshakes = 100000
max_handshakes_per_ip = 100000
${4:+max_connections = $4}
$5
TOML
}

# syncgate's health check on port $1: GET / answers 200 once every worker is up.
syncgate_healthy() { http_ok "$1"; }

# GET / on 127.0.0.1:$1 answers 200 within a second (syncgate's and zero-cache's check).
http_ok() {
  local reply
  # shellcheck disable=SC2016 # $1 expands in the inner shell
  reply=$(timeout 1 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && printf "GET / HTTP/1.0\r\n\r\n" >&3 && head -c 12 <&3' _ "$1" 2>/dev/null) || return 1
  [[ $reply == "HTTP/1.1 200" ]]
}

# --- a real zero-cache behind a benchmark (bench-front-door.sh, bench-relay.sh) ---------

# Sets PG_BIN (SYNCGATE_TEST_PG_BIN, else the newest /usr/lib/postgresql/*/bin) and ZC_DIR,
# and installs zero-cache (npm ci in tests/clients/zero-cache, as scripts/test.sh does) if
# it is missing.
bench_zero_tools() {
  PG_BIN=${SYNCGATE_TEST_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)}
  [[ -x $PG_BIN/initdb ]] || { log "no PostgreSQL (apt-get install postgresql, or set SYNCGATE_TEST_PG_BIN)"; exit 1; }
  ZC_DIR=$ROOT/tests/clients/zero-cache
  if [[ ! -x $ZC_DIR/node_modules/.bin/zero-cache ]]; then
    log "installing zero-cache (npm ci in tests/clients/zero-cache)"
    (cd "$ZC_DIR" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
  fi
}

# Waits until $1 (process $2, log $4) answers GET / on port $3, for at most $5 seconds;
# exits the script if it dies or does not.
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

# Starts a throw-away PostgreSQL on port $1 (fsync off: the disk is not what is measured)
# with the `item` table of tests/clients/zero-cache/schema.js and its permissions deployed,
# then zero-cache 1.9 on port $2 (one sync worker), both under PIN_SERVER. Arguments after
# the ports are more zero-cache environment (ZERO_AUTH_SECRET=...). Needs WORK (a temporary
# folder the script removes) and LOGS, and bench_zero_tools first. Sets PG_PID (its process
# tree is PostgreSQL's), ZC_PID and DB; bench_zero_stop ends both.
bench_zero_start() {
  local pg_port=$1 zc_port=$2
  shift 2
  # Every zero-cache process carries this in its environment: its runner forks detached
  # workers that a kill of the runner would leave behind (tests/common/upstream.rs).
  ZC_MARKER="SYNCGATE_BENCH_ZERO=$WORK"
  chmod 755 "$WORK"
  # initdb and postgres refuse root: as root they run as `postgres` (`nobody` if none).
  local pg_user=
  if [[ $(id -u) == 0 ]]; then
    pg_user=postgres
    id postgres >/dev/null 2>&1 || pg_user=nobody
  fi
  as_pg() { if [[ -n $pg_user ]]; then runuser -u "$pg_user" -- "$@"; else "$@"; fi; }
  mkdir -p "$WORK/pg" "$WORK/run"
  [[ -n $pg_user ]] && chown "$pg_user" "$WORK/pg" "$WORK/run"
  chmod 700 "$WORK/pg"
  as_pg "$PG_BIN/initdb" -D "$WORK/pg" --auth=trust --username=postgres --encoding=UTF8 \
    --locale=C --no-sync >"$LOGS/initdb.log"
  cat >>"$WORK/pg/postgresql.conf" <<EOF
port = $pg_port
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
  as_pg "${PIN_SERVER[@]}" "$PG_BIN/postgres" -D "$WORK/pg" >"$LOGS/postgres.log" 2>&1 &
  PG_PID=$!
  local _
  for _ in $(seq 200); do
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$pg_port" -U postgres && break
    kill -0 "$PG_PID" 2>/dev/null || { log "PostgreSQL died:"; tail -5 "$LOGS/postgres.log" >&2; exit 1; }
    sleep 0.1
  done
  DB=postgresql://postgres@127.0.0.1:$pg_port/postgres
  "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 "$DB" \
    -c "CREATE TABLE item (id text PRIMARY KEY, owner text NOT NULL, title text NOT NULL);"

  local zero_env=(env -u ZERO_AUTH_SECRET ZERO_ENABLE_TELEMETRY=false DO_NOT_TRACK=1 ZERO_UPSTREAM_DB="$DB")
  (cd "$WORK" && "${zero_env[@]}" node "$ZC_DIR/node_modules/.bin/zero-deploy-permissions" \
    --schema-path "$ZC_DIR/schema.js") >"$LOGS/permissions.log" 2>&1 ||
    { log "zero-deploy-permissions failed:"; tail -5 "$LOGS/permissions.log" >&2; exit 1; }

  log "starting zero-cache on $zc_port"
  (cd "$WORK" && exec "${PIN_SERVER[@]}" "${zero_env[@]}" "$ZC_MARKER" "$@" \
    ZERO_REPLICA_FILE="$WORK/replica.db" ZERO_PORT="$zc_port" ZERO_NUM_SYNC_WORKERS=1 \
    ZERO_ADMIN_PASSWORD=bench node "$ZC_DIR/node_modules/.bin/zero-cache") >"$LOGS/zero-cache.log" 2>&1 &
  ZC_PID=$!
  wait_ready zero-cache "$ZC_PID" "$zc_port" "$LOGS/zero-cache.log" 120
}

# Ends what bench_zero_start started: every zero-cache process (found by its marker) and
# PostgreSQL (a fast shutdown of the postmaster, whose PID PG_PID may not be).
bench_zero_stop() {
  local pids
  pids=$(grep -lsz -- "$ZC_MARKER" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 || true)
  # shellcheck disable=SC2086 # one PID per word
  [[ -n $pids ]] && kill -KILL $pids 2>/dev/null
  [[ -f $WORK/pg/postmaster.pid ]] && kill -INT "$(head -n1 "$WORK/pg/postmaster.pid")" 2>/dev/null
  return 0
}

# --- the idle scenario's load client past one process's open-file limit ---------------

# Sets IDLE_PROCS and IDLE_ARGS (loadgen arguments) for $1 idle connections with an
# open-file limit of $FD_LIMIT: as many load-client processes as that takes (200
# descriptors a process kept for everything but connections; raising the hard limit needs
# CAP_SYS_RESOURCE), each from its own source addresses, at most 10k connections per
# address: connect() tries one parity of the ephemeral ports first (about 14k of 28k), and
# past them every connect() scans them all before it finds a free port of the other
# parity, which slows opening to a crawl.
idle_spread() {
  local n=$1 per_process=$((FD_LIMIT - 200)) per_proc sources
  IDLE_PROCS=$(( (n + per_process - 1) / per_process ))
  per_proc=$(( (n + IDLE_PROCS - 1) / IDLE_PROCS ))
  sources=$(( IDLE_PROCS * ((per_proc + 9999) / 10000) ))
  IDLE_ARGS=(--scenario idle --connections "$n" --sources "$sources" --settle 3 --connect-concurrency 8)
  (( IDLE_PROCS > 1 )) && IDLE_ARGS+=(--processes "$IDLE_PROCS")
  return 0
}
