#!/usr/bin/env bash
# What a login costs the server (issue 33, P7), in one run on this machine:
# keepd (release, fresh state directory, its native Postgres) pinned to
# CPU 0, the load generator on CPU 1; N logins on the password route
# (Argon2id on the server) and N with OPAQUE (Argon2id on the client), 8
# at a time. The server's CPU time (keepd, Postgres's postmaster and every
# backend, reaped ones included) is read from /proc around each method's
# logins only (the accounts are made before), and printed per login and as
# logins per second per core. Needs root (keepd's Postgres runs as its own
# user).
#
#   scripts/bench-logins.sh                 # 2000 logins per method
#   BENCH_LOGINS=500 scripts/bench-logins.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
count=${BENCH_LOGINS:-2000}
clients=8

cargo build --release --locked --bin keepd --example loadgen
keepd=$root/target/release/keepd
loadgen=$root/target/release/examples/loadgen
work=$(mktemp -d /tmp/keepd-bench-logins.XXXXXX)
chmod 755 "$work"
port=18788
cat >"$work/keepd.yaml" <<YAML
node:
  state_dir: $work/state
  runtime_dir: $work/run
api:
  listen: 127.0.0.1:$port
  metrics_listen: ""
  # One address logs in thousands of times: limits out of the way.
  rate_limits:
    auth_per_minute: 10000000
    account_per_second: 10000000
    account_burst: 10000000
    address_per_second: 10000000
    address_burst: 10000000
log:
  level: warn
YAML
keepd_pid=""
cleanup() {
  [[ -n $keepd_pid ]] && kill "$keepd_pid" 2>/dev/null && wait "$keepd_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

taskset -c 0 "$keepd" --config "$work/keepd.yaml" run >"$work/keepd.log" 2>&1 &
keepd_pid=$!
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  sleep 0.5
done
curl -sf "http://127.0.0.1:$port/health" >/dev/null || { cat "$work/keepd.log"; exit 1; }

ticks=$(getconf CLK_TCK)
# CPU seconds of keepd and of its Postgres: the postmaster's own and its
# reaped children's (fields 14-17 of /proc/PID/stat), and every live
# backend's own.
server_cpu() {
  local postmaster total=0 pid
  postmaster=$(head -1 "$work/state/pgdata/postmaster.pid")
  read -r -a stat <<<"$(sed 's/^.*) //' "/proc/$keepd_pid/stat")"
  total=$((stat[11] + stat[12]))
  read -r -a stat <<<"$(sed 's/^.*) //' "/proc/$postmaster/stat")"
  total=$((total + stat[11] + stat[12] + stat[13] + stat[14]))
  for pid in $(pgrep -P "$postmaster"); do
    local line
    line=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null) || continue
    read -r -a stat <<<"$line"
    total=$((total + stat[11] + stat[12]))
  done
  echo "$total"
}

declare -A cpu
while read -r line; do
  case $line in
    "logins: "*" start") method=${line#logins: }; method=${method% start}; before=$(server_cpu) ;;
    "logins: "*" done") cpu[$method]=$(($(server_cpu) - before)) ;;
    "logins: "*) echo "$line" ;;
  esac
done < <(taskset -c 1 "$loadgen" --addr "127.0.0.1:$port" --clients "$clients" --logins "$count")

for method in password opaque; do
  awk -v m="$method" -v t="${cpu[$method]}" -v hz="$ticks" -v n="$count" 'BEGIN {
    s = t / hz
    printf "%s: server CPU %.2f s for %d logins: %.1f ms a login, %.0f logins/s per core\n",
      m, s, n, 1000 * s / n, (s > 0 ? n / s : 0)
  }'
done
