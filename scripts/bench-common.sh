# shellcheck shell=bash
# Shared by scripts/bench.sh and scripts/bench-ab.sh (sourced, not run): the syncgate
# config every benchmark run uses, and its readiness check, so both measure the same thing.

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
syncgate_healthy() {
  local reply
  # shellcheck disable=SC2016 # $1 expands in the inner shell
  reply=$(timeout 1 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && printf "GET / HTTP/1.0\r\n\r\n" >&3 && head -c 12 <&3' _ "$1" 2>/dev/null) || return 1
  [[ $reply == "HTTP/1.1 200" ]]
}
