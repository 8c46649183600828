# shellcheck shell=bash
# Shared by the benchmark scripts (sourced, not run): the syncgate config every benchmark
# run uses and its readiness check, so all measure the same thing; the release build, the
# pinning and the storm's tokens. The functions log with the sourcing script's log().

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
