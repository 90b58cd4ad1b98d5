#!/usr/bin/env bash
# Live events at scale (issue 33, P6), in one run on this machine: keepd
# (release, fresh state directory, its native Postgres) pinned to CPU 0,
# the client (scripts/bench_events.py) on CPU 1. 2 000 accounts each hold
# 5 streams (the default api.events.max_streams_per_account) on their
# vault: 10 000 open streams. keepd's resident memory before and after
# they open, then push -> event latency for one vault's 5 streams over
# 200 pushes, while the 9 995 others must stay quiet. The streams come
# from 200 loopback addresses (127.0.0.2 to 127.0.0.201, 50 each), within
# the default per-client caps; only the node's stream cap is raised.
#
#   scripts/bench-events.sh
#   BENCH_ACCOUNTS=200 scripts/bench-events.sh     # 1 000 streams
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
accounts=${BENCH_ACCOUNTS:-2000}
per_account=5
pushes=200

cargo build --release --locked --bin keepd
streams=$((accounts * per_account))
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_setup events 18789 <<YAML
  events:
    max_streams: $streams
YAML
cleanup() {
  bench_stop_keepd
  rm -rf "$work"
}
trap cleanup EXIT

# A socket per stream in keepd and in the client, each its own process.
hard=$(ulimit -Hn)
if [[ $hard != unlimited && $hard -lt $((streams + 1024)) ]]; then
  echo "bench-events: $streams streams need $((streams + 1024)) open files; the hard limit is $hard" >&2
  exit 1
fi
ulimit -n "$hard"
bench_start_keepd

rss_mib() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$keepd_pid/status"; }
coproc client { taskset -c 1 python3 "$root/scripts/bench_events.py" "$port" "$accounts" "$per_account" "$pushes"; }
client_pid=$client_PID
while read -r line <&"${client[0]}"; do
  echo "$line"
  case $line in
    *"accounts made") before=$(rss_mib); echo >&"${client[1]}" ;;
    *" open") sleep 2; after=$(rss_mib); echo >&"${client[1]}" ;;
  esac
done
wait "$client_pid"
awk -v b="$before" -v a="$after" -v n="$streams" 'BEGIN {
  printf "streams: keepd RSS %.1f MiB before, %.1f MiB with %d streams open: +%.1f MiB (%.1f KiB a stream; goal: at most +100 MiB)\n",
    b, a, n, a - b, 1024 * (a - b) / n }'
