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
# Then sync requests beside a login flood: pulls of 100 entries (4
# connections, wrk) alone, and again while 8 more connections log in on
# the password route as fast as keepd answers; p50 and p99 of each.
#
#   scripts/bench-logins.sh                 # 2000 logins per method
#   BENCH_LOGINS=500 BENCH_SECONDS=10 scripts/bench-logins.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
count=${BENCH_LOGINS:-2000}
secs=${BENCH_SECONDS:-10}
clients=8

command -v wrk >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null

cargo build --release --locked --bin keepd --example loadgen
loadgen=$root/target/release/examples/loadgen
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_setup logins 18788 </dev/null
cleanup() {
  bench_stop_keepd
  rm -rf "$work"
}
trap cleanup EXIT
bench_start_keepd

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

# Sync beside a login flood (P7): one account's vault of 2 000 entries
# (pushed through the API), pulled by 4 connections; p50/p99 alone, then
# with 8 connections logging in on the password route meanwhile.
api() { # METHOD PATH BODY [TOKEN]: the JSON answer; fails on an error status
  local args=(-sS --fail-with-body -X "$1" "http://127.0.0.1:$port$2" -H 'content-type: application/json' --data "$3")
  [[ $# -ge 4 ]] && args+=(-H "authorization: Bearer $4")
  curl "${args[@]}"
}
email="flood-$RANDOM@example.org"
password="benchmark password"
api POST /auth/register "{\"email\":\"$email\",\"password\":\"$password\"}" >/dev/null
token=$(api POST /auth/login "{\"email\":\"$email\",\"password\":\"$password\"}" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
api POST /sync/vault-key '{"vaultId":"p7","encryptedVaultKey":"a2V5","salt":"c2FsdA==","nonce":"bm9uY2U="}' "$token" >/dev/null
data=$(head -c 512 /dev/urandom | base64 -w0)
for n in $(seq 40); do
  python3 -c 'import json,sys; print(json.dumps({"vaultId": "p7", "logs": [{"encryptedData": sys.argv[1], "nonce": "bm9uY2Vub25jZQ==", "haexTimestamp": "%s-%02d" % (sys.argv[2], i)} for i in range(50)]}))' "$data" "$n" >"$work/push.json"
  api POST /sync/push "@$work/push.json" "$token" >/dev/null
done
cat >"$work/pull.lua" <<'LUA'
local headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. os.getenv("TOKEN") }
request = function()
  local body = string.format('{"vaultId":"p7","afterSequence":%d,"limit":100}', math.random(0, 1900))
  return wrk.format("POST", "/sync/pull", headers, body)
end
LUA
cat >"$work/login.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"email":"$email","password":"$password"}'
LUA
pulls() { # the pulls' "requests/s p50 p99" (ms); fails on any non-2xx answer
  local out
  out=$(TOKEN="$token" taskset -c 1 wrk -t1 -c4 -d"${secs}s" --latency -s "$work/pull.lua" "http://127.0.0.1:$port")
  if grep -q "Non-2xx" <<<"$out"; then
    echo "$out" >&2
    exit 1
  fi
  awk 'function ms(v) { if (v ~ /us$/) { sub(/us/, "", v); return v / 1000 } if (v ~ /ms$/) { sub(/ms/, "", v); return v } sub(/s/, "", v); return v * 1000 }
    /Requests\/sec/ {r = $2} $1 == "50%" {p50 = ms($2)} $1 == "99%" {p99 = ms($2)} END {print r, p50, p99}' <<<"$out"
}
read -r quiet_rps quiet_p50 quiet_p99 < <(pulls)
taskset -c 1 wrk -t1 -c8 -d"$((secs + 4))s" -s "$work/login.lua" "http://127.0.0.1:$port/auth/login" >"$work/flood.txt" &
flood=$!
sleep 2
read -r flood_rps flood_p50 flood_p99 < <(pulls)
wait "$flood"
if grep -q "Non-2xx" "$work/flood.txt"; then
  cat "$work/flood.txt" >&2
  exit 1
fi
logins_rps=$(awk '/Requests\/sec/ {print $2}' "$work/flood.txt")
echo "sync beside logins: pulls of 100 alone: $quiet_rps/s, p50 $quiet_p50 ms, p99 $quiet_p99 ms"
echo "sync beside logins: with a password-login flood ($logins_rps logins/s): $flood_rps/s, p50 $flood_p50 ms, p99 $flood_p99 ms"
awk -v q="$quiet_p99" -v f="$flood_p99" 'BEGIN {printf "sync beside logins: p99 under the flood / alone = %.2f (goal: at most 2)\n", f / q}'
