# shellcheck shell=bash
# What the benchmark scripts share (sourced, from the repository's root):
# a fresh keepd (release) on a state directory of its own, with the rate
# limits out of the way (one client and one address send thousands of
# requests), pinned to CPU 0 while the load runs on CPU 1.

# bench_setup NAME PORT: sets $keepd, $work (a fresh directory) and $port
# and writes $work/keepd.yaml; the script's own `api:` settings, indented
# by two spaces, come on stdin.
bench_setup() {
  keepd=$PWD/target/release/keepd
  work=$(mktemp -d "/tmp/keepd-bench-$1.XXXXXX")
  chmod 755 "$work"
  port=$2
  keepd_pid=""
  {
    cat <<YAML
node:
  state_dir: $work/state
  runtime_dir: $work/run
api:
  listen: 127.0.0.1:$port
  metrics_listen: ""
  rate_limits:
    auth_per_minute: 10000000
    account_per_second: 10000000
    account_burst: 10000000
    address_per_second: 10000000
    address_burst: 10000000
YAML
    cat
    printf 'log:\n  level: warn\n'
  } >"$work/keepd.yaml"
}

# bench_stop_keepd: stops keepd if it runs (for the scripts' EXIT traps).
bench_stop_keepd() {
  if [[ -n $keepd_pid ]]; then
    kill "$keepd_pid" 2>/dev/null && wait "$keepd_pid" 2>/dev/null || true
    keepd_pid=""
  fi
}

# bench_start_keepd: keepd on CPU 0, waited for until /health answers
# (its log printed if it does not within a minute).
bench_start_keepd() {
  taskset -c 0 "$keepd" --config "$work/keepd.yaml" run >"$work/keepd.log" 2>&1 &
  keepd_pid=$!
  for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && return
    sleep 0.5
  done
  cat "$work/keepd.log" >&2
  exit 1
}
