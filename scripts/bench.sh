#!/usr/bin/env bash
# The speed benchmark of docs/benchmarks.md, in one run on this machine:
# the ceiling first, the job's minimal SQL on a stock Postgres (its own
# cluster and tables: a push bumps a per-vault counter and inserts 50 rows,
# a pull is an index range scan of 100) pinned to CPU 0 and driven by
# pgbench on CPU 1; then keepd (release, fresh state directory, its native
# Postgres) pinned to CPU 0 and driven by wrk on CPU 1, first on a vault
# just pushed through the API (fresh), then on vaults seeded straight into
# the tables and vacuumed (settled); then keepd's own statements under
# pgbench on its cluster (what keepd's SQL costs the database); then the
# ceiling again (the mean of both ceiling runs is the denominator). Prints
# every figure and the ratios. Needs root (keepd's Postgres runs as its
# own user) and installs wrk if missing.
#
#   scripts/bench.sh                      # 10 s per run
#   BENCH_SECONDS=30 scripts/bench.sh
#   BENCH_LARGE=0 scripts/bench.sh        # skip the 1-million-entry vault
#   BENCH_PERF=/tmp/keepd scripts/bench.sh  # perf profiles of CPU 0: /tmp/keepd-pull.data, -push.data
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
secs=${BENCH_SECONDS:-10}
large=${BENCH_LARGE:-1}
conns=8

command -v wrk >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
scripts/install-deps.sh
cargo build --release --locked --bin keepd --example loadgen
pgbin=$(dirname "$(compgen -G '/usr/lib/postgresql/*/bin/pgbench' | sort -V | tail -1)")
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_setup bench 18787 <<'YAML'
  # Quotas stay on (checked on every write), far from being reached.
  quotas:
    storage_bytes: 1099511627776
    vaults: 1000
YAML
pg_pid=""
cleanup() {
  bench_stop_keepd
  [[ -n $pg_pid ]] && kill -INT "$pg_pid" 2>/dev/null || true
  [[ -n $stock_pid ]] && runuser -u nobody -- "$pgbin/pg_ctl" -D "$stock/data" -m immediate stop >/dev/null 2>&1 || true
  sleep 1
  rm -rf "$work"
}
trap cleanup EXIT
[[ -n ${BENCH_DEBUG:-} ]] && trap - EXIT

say() { printf '%s\n' "$*" >&2; }
token=""
api() { # METHOD PATH [BODY]: the JSON answer; fails on an error status
  local args=(-sS --fail-with-body -X "$1" "http://127.0.0.1:$port$2" -H 'content-type: application/json')
  [[ -n $token ]] && args+=(-H "authorization: Bearer $token")
  [[ $# -ge 3 ]] && args+=(--data "$3")
  curl "${args[@]}"
}
sql() { "$keepd" --config "$work/keepd.yaml" psql -- -qAt -v ON_ERROR_STOP=1 -c "$1"; }

# The ceiling: the job's minimal SQL on stock Postgres (initdb's defaults,
# fsync and synchronous_commit on), its own cluster, the same data sizes.
stock=$work/stock
stock_pid=""
stock_sql() { runuser -u nobody -- "$pgbin/psql" -h "$stock" -U postgres -qAt -v ON_ERROR_STOP=1 -c "$1" postgres; }
stock_start() {
  taskset -c 0 runuser -u nobody -- "$pgbin/postgres" -D "$stock/data" -c listen_addresses='' \
    -c unix_socket_directories="$stock" -c log_min_messages=warning >>"$stock/pg.log" 2>&1 &
  stock_pid=$!
  for _ in $(seq 60); do
    "$pgbin/pg_isready" -q -h "$stock" -U postgres && return
    sleep 0.5
  done
  cat "$stock/pg.log" >&2
  exit 1
}
stock_stop() {
  runuser -u nobody -- "$pgbin/pg_ctl" -D "$stock/data" -m fast -w stop >/dev/null
  wait "$stock_pid" 2>/dev/null || true
  stock_pid=""
}
stock_set_up() {
  mkdir -p "$stock"
  chown nobody "$stock"
  runuser -u nobody -- "$pgbin/initdb" -D "$stock/data" -U postgres --auth=trust >/dev/null
  stock_start
  stock_sql "CREATE TABLE vaults (id int PRIMARY KEY, last_seq bigint NOT NULL DEFAULT 0);
    CREATE TABLE entries (vault int NOT NULL REFERENCES vaults, seq bigint NOT NULL,
      data text NOT NULL, PRIMARY KEY (vault, seq));
    INSERT INTO vaults SELECT g, 0 FROM generate_series(1, 101) g;
    INSERT INTO entries SELECT 101, g,
      replace(encode(decode(repeat(md5(random()::text), 32), 'hex'), 'base64'), E'\n', '')
      FROM generate_series(1, 2000) g;
    UPDATE vaults SET last_seq = 2000 WHERE id = 101;"
  stock_sql "VACUUM ANALYZE"
  printf '\\set after random(0, 1900)\nSELECT seq, data FROM entries WHERE vault = 101 AND seq > :after ORDER BY seq LIMIT 100;\n' \
    >"$stock/pull.sql"
  printf '\\set v random(1, 100)\nBEGIN;\nUPDATE vaults SET last_seq = last_seq + 50 WHERE id = :v RETURNING last_seq AS top \\gset\nINSERT INTO entries SELECT :v, :top - 50 + g, :data FROM generate_series(1, 50) g;\nCOMMIT;\n' \
    >"$stock/push.sql"
  chown nobody "$stock"/*.sql
  stock_stop
}
stock_bench() { # SCRIPT: tps
  local out
  out=$(taskset -c 1 runuser -u nobody -- "$pgbin/pgbench" -n -M prepared -h "$stock" -U postgres \
    -c "$conns" -j 1 -T "$secs" -D data="$data" -f "$stock/$1" postgres 2>&1)
  grep -q 'number of failed transactions: 0' <<<"$out" || { say "$out"; exit 1; }
  awk '/^tps/ {print $3}' <<<"$out"
}
stock_ceiling() { # "pull_tps push_tps"
  stock_start
  local pull push
  pull=$(stock_bench pull.sql)
  push=$(stock_bench push.sql)
  stock_stop
  echo "$pull $push"
}

if curl -s "http://127.0.0.1:$port/" >/dev/null; then
  say "bench: port $port is in use (another benchmark running?)"
  exit 1
fi
data=$(head -c 512 /dev/urandom | base64 -w0)
say "bench: the minimal ceiling on stock Postgres (before keepd)"
stock_set_up
read -r stock_pull_a stock_push_a < <(stock_ceiling)

say "bench: starting keepd (release) on CPU 0"
bench_start_keepd

email="bench-$RANDOM@example.org"
api POST /auth/register "{\"email\":\"$email\",\"password\":\"benchmark password\"}" >/dev/null
token=$(api POST /auth/login "{\"email\":\"$email\",\"password\":\"benchmark password\"}" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
uid=$(api GET /account | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
sid=$(sql "SELECT id FROM keepd.sessions WHERE user_id = '$uid' AND revoked_at IS NULL LIMIT 1")
vault_key='{"encryptedVaultKey":"a2V5","salt":"c2FsdA==","nonce":"bm9uY2U="'
for v in fresh-2k pull-2k pull-10k pull-1m hot $(seq -f 'spread-%g' 1 100); do
  api POST /sync/vault-key "{\"vaultId\":\"$v\",${vault_key#\{}}" >/dev/null
done


# Both scripts print the first failed answer (the run then fails).
cat >"$work/report.lua" <<'EOF'
local reported = false
response = function(status, headers, body)
  if status >= 300 and not reported then
    reported = true
    print("first error: " .. status .. " " .. body:sub(1, 300))
  end
end
EOF
cat >"$work/pull.lua" <<'EOF'
dofile(os.getenv("WORK") .. "/report.lua")
local vault, top = os.getenv("VAULT"), tonumber(os.getenv("TOP"))
-- wrk.format sends only the headers it is given (and Host).
local headers = { ["Content-Type"] = "application/json",
  ["Authorization"] = "Bearer " .. os.getenv("TOKEN") }
request = function()
  local body = string.format('{"vaultId":"%s","afterSequence":%d,"limit":100}',
    vault, math.random(0, top - 100))
  return wrk.format("POST", "/sync/pull", headers, body)
end
EOF
cat >"$work/push.lua" <<'EOF'
dofile(os.getenv("WORK") .. "/report.lua")
local vaults, data = tonumber(os.getenv("VAULTS")), os.getenv("DATA")
local prefix = os.getenv("PREFIX")
local n = 0
local token = "Bearer " .. os.getenv("TOKEN")
request = function()
  n = n + 1
  local entries = {}
  for i = 1, 50 do
    entries[i] = string.format('{"encryptedData":"%s","nonce":"bm9uY2Vub25jZQ==","haexTimestamp":"%012d-%02d"}', data, n, i)
  end
  local vault = prefix
  if vaults > 1 then vault = prefix .. "-" .. math.random(1, vaults) end
  local body = string.format('{"vaultId":"%s","logs":[%s]}', vault, table.concat(entries, ","))
  local headers = { ["Content-Type"] = "application/json", ["Authorization"] = token,
    ["Idempotency-Key"] = string.format("%d-%d-%d", os.time(), math.random(1, 1e9), n) }
  return wrk.format("POST", "/sync/push", headers, body)
end
EOF

# wrk's requests/s and p50 (ms) of one run; fails on any non-2xx answer.
wrk_run() { # SCRIPT CONNECTIONS ENV...
  local script=$1 c=$2 out
  shift 2
  out=$(env TOKEN="$token" WORK="$work" "$@" taskset -c 1 wrk -t1 -c"$c" -d"${secs}s" --latency \
    -s "$work/$script" "http://127.0.0.1:$port")
  if grep -q "Non-2xx" <<<"$out"; then
    say "$out"
    say "bench: keepd answered errors; see $work/keepd.log"
    exit 1
  fi
  local rps p50
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; print v}' <<<"$out")
  echo "$rps $p50"
}

rss_mib() { awk '/VmRSS/ {print int($2/1024)}' "/proc/$keepd_pid/status"; }
hwm_mib() { awk '/VmHWM/ {print int($2/1024)}' "/proc/$keepd_pid/status"; }

# A fresh vault, as a second device meets it right after the first
# pushed: 2 000 entries pushed through the API (40 pushes of 50), pulled
# at once, before any VACUUM or ANALYZE has seen the table.
say "bench: pushing the fresh vault through the API (2 000 entries)"
python3 - "$port" "$token" "$data" <<'PY'
import http.client, json, sys
port, token, data = sys.argv[1:]
conn = http.client.HTTPConnection("127.0.0.1", int(port))
for n in range(40):
    logs = [{"encryptedData": data, "nonce": "bm9uY2Vub25jZQ==",
             "haexTimestamp": "%012d-%02d" % (n, i)} for i in range(50)]
    conn.request("POST", "/sync/push", json.dumps({"vaultId": "fresh-2k", "logs": logs}),
                 {"content-type": "application/json", "authorization": "Bearer " + token})
    answer = conn.getresponse()
    body = answer.read()
    if answer.status != 200:
        sys.exit("bench: a fresh push failed: %d %s" % (answer.status, body[:300]))
PY
say "bench: pulling the fresh vault"
read -r fresh_rps fresh_p50 < <(wrk_run pull.lua $conns VAULT=fresh-2k TOP=2000)

# Entries of 512 random bytes (684 base64 characters), written straight
# into the tables (the pushes are measured below, not the seeding).
seed() { # VAULT N
  sql "INSERT INTO keepd.sync_logs (id, vault, user_id, sequence, encrypted_data, nonce,
         haex_timestamp, size_bytes)
       SELECT gen_random_uuid(), v.id, v.user_id, s,
         replace(encode(decode(repeat(md5(random()::text), 32), 'hex'), 'base64'), E'\n', ''),
         'bm9uY2Vub25jZQ==', lpad(s::text, 12, '0'), 684 + 16 + 12
       FROM keepd.vaults v, generate_series(1, $2) s WHERE v.vault_id = '$1';
       UPDATE keepd.vaults SET last_sequence = $2 WHERE vault_id = '$1';"
}
say "bench: seeding vaults (2 000, 10 000$([[ $large == 1 ]] && echo ', 1 000 000') entries)"
seed pull-2k 2000
seed pull-10k 10000
[[ $large == 1 ]] && seed pull-1m 1000000
sql "VACUUM ANALYZE keepd.sync_logs"
sql "VACUUM ANALYZE keepd.vaults"

say "bench: keepd runs ($secs s each, $conns connections)"
rss_before=$(rss_mib)
echo 5 >"/proc/$keepd_pid/clear_refs"
# With BENCH_PERF, CPU 0 is profiled during a run (perf record -g).
perf_pid=""
perf_start() { # NAME
  [[ -n ${BENCH_PERF:-} ]] || return 0
  perf record -q -g -C 0 -o "$BENCH_PERF-$1.data" -- sleep "$secs" 2>/dev/null &
  perf_pid=$!
}
perf_wait() { [[ -z $perf_pid ]] || wait "$perf_pid"; perf_pid=""; }
perf_start pull
read -r pull_rps pull_p50 < <(wrk_run pull.lua $conns VAULT=pull-2k TOP=2000)
perf_wait
rss_peak=$(hwm_mib)
read -r pull10k_rps pull10k_p50 < <(wrk_run pull.lua $conns VAULT=pull-10k TOP=10000)
if [[ $large == 1 ]]; then
  read -r pull1m_rps pull1m_p50 < <(wrk_run pull.lua $conns VAULT=pull-1m TOP=1000000)
fi
read -r pull1_rps pull1_p50 < <(wrk_run pull.lua 1 VAULT=pull-2k TOP=2000)
perf_start push
read -r push_rps push_p50 < <(wrk_run push.lua $conns VAULTS=100 PREFIX=spread DATA="$data")
perf_wait
read -r spread16_rps spread16_p50 < <(wrk_run push.lua 16 VAULTS=100 PREFIX=spread DATA="$data")
read -r hot16_rps hot16_p50 < <(wrk_run push.lua 16 VAULTS=1 PREFIX=hot DATA="$data")
sleep 2
rss_after=$(rss_mib)

# The load generator's correctness check: every vault's sequences are
# exactly 1..N, and the usage row counts exactly what is stored.
bad=$(sql "SELECT count(*) FROM (SELECT v.vault_id, v.last_sequence, count(l.id) AS n,
             coalesce(max(l.sequence), 0) AS top, count(DISTINCT l.sequence) AS d
           FROM keepd.vaults v LEFT JOIN keepd.sync_logs l ON l.vault = v.id
           GROUP BY v.id) c WHERE n <> last_sequence OR top <> last_sequence OR d <> n")
usage_ok=$(sql "SELECT bool_and(u.storage_bytes = (SELECT coalesce(sum(size_bytes), 0)
                  FROM keepd.sync_logs l WHERE l.user_id = u.user_id)) FROM keepd.account_usage u")
[[ $bad == 0 && $usage_ok == t ]] || { say "bench: correctness check failed ($bad vaults, usage $usage_ok)"; exit 1; }

# Live updates: a watcher holds GET /sync/events while pushes of one
# entry commit one after another; push sent -> event received.
say "bench: live-update latency (200 pushes)"
events=$(taskset -c 1 "$root/target/release/examples/loadgen" --addr "127.0.0.1:$port" --events 200)
read -r events_p50 events_p99 events_max < <(awk '/^events:/ {print $10, $13, $16}' <<<"$events")

say "bench: stopping keepd; the same cluster without it, for pgbench"
pgdata=$work/state/pgdata
owner=$(stat -c %U "$pgdata")
kill "$keepd_pid"
wait "$keepd_pid" 2>/dev/null || true
keepd_pid=""
mkdir -p "$work/ceiling"
chown "$owner" "$work/ceiling"
printf 'local all keepd_superuser trust\n' >"$work/ceiling/hba.conf"
chown "$owner" "$work/ceiling/hba.conf"
taskset -c 0 runuser -u "$owner" -- "$pgbin/postgres" -D "$pgdata" \
  -c hba_file="$work/ceiling/hba.conf" -c ssl=off -c listen_addresses='' \
  -c unix_socket_directories="$work/ceiling" -c log_min_messages=warning >"$work/ceiling/pg.log" 2>&1 &
pg_pid=$!
for _ in $(seq 60); do
  "$pgbin/pg_isready" -q -h "$work/ceiling" && break
  sleep 0.5
done

# keepd's own pull and push statements, read from its source, with
# pgbench's variables and array expressions for their parameters: the
# ceiling runs exactly the SQL keepd runs, transaction by transaction.
statement() { # FILE CONST PARAM=VALUE...: the constant's SQL on one line, parameters replaced
  python3 - "$@" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
sql = re.search(r'const %s: &str = "(.*?)";' % sys.argv[2], text, re.S).group(1)
sql = re.sub(r'\\\n\s*', '', sql)
for pair in sys.argv[3:]:
    param, value = pair.split("=", 1)
    # $1 must not match $10; a typed parameter ($4::uuid[]) is replaced whole.
    sql = re.sub(re.escape(param) + r'(?![0-9])', lambda _: value, sql)
print(sql)
PY
}
logs=src/api/store/logs.rs
pull_sql=$(statement $logs PULL_LOGS '$1=:uid' "\$2='pull-2k'" '$3=:after' '$4=100' '$5=8388608')
session_sql=$(statement src/api/store/accounts.rs SESSION_IS_LIVE '$1=:sid')
# Under an Idempotency-Key, as the benchmark's pushes are sent.
push_sql=$(statement $logs APPEND_ONCE '$1=:uid' "\$2='spread-' || :v" '$3=50' \
  '$4::uuid[]=ARRAY(SELECT gen_random_uuid() FROM generate_series(1, 50))' \
  '$5::text[]=array_fill(:data::text, ARRAY[50])' \
  "\$6::text[]=array_fill('bm9uY2Vub25jZQ=='::text, ARRAY[50])" \
  "\$7::text[]=ARRAY(SELECT lpad(g::text, 12, '0') FROM generate_series(1, 50) g)" \
  '$8::int8[]=array_fill(712::int8, ARRAY[50])' '$9=35600' \
  "\$10='k-' || :client_id || '-' || :key" "\$11=sha256('request'::bytea)" '$12=86400')
audit_sql=$(statement src/audit/mod.rs INSERT_ENTRY "\$1='bench'" "\$2='keepd_sync'" \
  "\$3='SYNC_PUSH'" "\$4='sync_logs'" '$5=50' '$6=1500' "\$7='api'" \
  "\$8='{\"user\": \"0123456789abcdef0123456789abcdef\", \"vault\": \"0123456789abcdef\", \"firstSequence\": 1, \"lastSequence\": 50}'::jsonb")
as() { # ROLE [TENANT [unflushed]]: the pool's scope statement
  printf "SELECT set_config('role', '%s', true), set_config('keepd.user_id', %s, true), set_config('keepd.email_hmac', '', true)%s;" \
    "$1" "${2:-''}" "${3:+, set_config('synchronous_commit', 'off', true)}"
}
scope=$(as keepd_query :uid)
# The same statements without switching role or tenant (as the superuser,
# so row-level security does not apply either).
noscope="SELECT set_config('keepd.unused', :uid, true), set_config('keepd.unused2', '', true), set_config('keepd.unused3', '', true);"
# A pull as keepd runs it: one transaction, the session's check first.
printf '\\set after random(0, 1900)\nBEGIN;\n%s\n%s;\n%s;\nCOMMIT;\n' "$scope" "$session_sql" "$pull_sql" >"$work/ceiling/pull.sql"
printf '\\set after random(0, 1900)\nBEGIN;\n%s\n%s;\nCOMMIT;\n' "$scope" "$pull_sql" >"$work/ceiling/pull-scoped.sql"
printf '\\set after random(0, 1900)\nBEGIN;\n%s\n%s;\nCOMMIT;\n' "$noscope" "$pull_sql" >"$work/ceiling/pull-unscoped.sql"
# A push as keepd runs it: its bytes reserved in a transaction of their own
# committed unflushed (usage::reserve); then its transaction: the
# session's check, the append with its Idempotency-Key record, the audit
# entry as keepd_audit, the claim. Its announcement is shared by the
# pushes in flight (api::announcer): push-announced.sql adds one unflushed
# notifying transaction per push, what a push costs when it is alone.
reserve_sql="BEGIN;
$(as keepd_sync :uid unflushed)
SELECT keepd.reserve_pushed_bytes(35600, 0) AS reservation \\gset
COMMIT;"
push_tx="BEGIN;
$(as keepd_sync :uid)
$session_sql;
$push_sql;
$(as keepd_audit :uid)
$audit_sql;
$(as keepd_sync :uid)
SELECT keepd.claim_pushed_bytes(:reservation);
COMMIT;"
notify_sql="BEGIN;
$(as keepd_sync "''" unflushed)
SELECT pg_notify('keepd_events', :uid);
COMMIT;"
# A fresh key per push (a volatile one would be no index condition).
keyed=$'\\set v random(1, 100)\n\\set key random(1, 1000000000000)'
printf '%s\n%s\n%s\n' "$keyed" "$reserve_sql" "$push_tx" >"$work/ceiling/push.sql"
printf '%s\n%s\n%s\n%s\n' "$keyed" "$reserve_sql" "$push_tx" "$notify_sql" >"$work/ceiling/push-announced.sql"

pgoptions="-c plan_cache_mode=force_generic_plan -c pgaudit.log=none"
bench() { # SCRIPT CLIENTS: "tps latency_ms"
  local out
  # As keepd's connections do: each statement planned once, and not
  # written to the log by pgAudit (the superuser's role setting logs
  # every statement; keepd's login roles log only role and DDL ones).
  out=$(PGOPTIONS="$pgoptions" taskset -c 1 "$pgbin/pgbench" -n -M prepared -h "$work/ceiling" -U keepd_superuser \
    -c "$2" -j 1 -T "$secs" -D uid="$uid" -D sid="$sid" -D data="$data" -f "$work/ceiling/$1" keepd 2>&1)
  grep -q 'number of failed transactions: 0' <<<"$out" || { say "$out"; exit 1; }
  echo "$(awk '/^tps/ {print $3}' <<<"$out") $(awk '/latency average/ {print $4}' <<<"$out")"
}
say "bench: ceiling runs"
read -r ceil_pull_tps _ < <(bench pull.sql $conns)
read -r ceil_push_tps _ < <(bench push.sql $conns)
read -r ceil_announced_tps _ < <(bench push-announced.sql $conns)
# One connection, so latency is the measure: the two scripts drawn at
# random, transaction by transaction, in one run (pgbench reports each
# script's latency), so the machine's drift between runs cannot favour
# either. Each script keeps its own prepared statement, planned once for
# the role it runs as, as keepd's per-role statement cache does.
out=$(PGOPTIONS="$pgoptions" taskset -c 1 "$pgbin/pgbench" -n -M prepared \
  -h "$work/ceiling" -U keepd_superuser -c 1 -j 1 -T $((3 * secs)) -D uid="$uid" \
  -f "$work/ceiling/pull-scoped.sql@1" -f "$work/ceiling/pull-unscoped.sql@1" keepd 2>&1)
grep -q 'number of failed transactions: 0' <<<"$out" || { say "$out"; exit 1; }
read -r scoped_ms unscoped_ms < <(awk '/^ - latency average/ {printf "%s ", $5} END {print ""}' <<<"$out")

runuser -u "$owner" -- "$pgbin/pg_ctl" -D "$pgdata" -m fast -w stop >/dev/null
wait "$pg_pid" 2>/dev/null || true
pg_pid=""
say "bench: the minimal ceiling on stock Postgres (after keepd)"
read -r stock_pull_b stock_push_b < <(stock_ceiling)
mean() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.0f", (a + b) / 2}'; }
stock_pull=$(mean "$stock_pull_a" "$stock_pull_b")
stock_push=$(mean "$stock_push_a" "$stock_push_b")

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.0f %%", 100 * a / b}'; }
cat <<EOF

keepd $("$keepd" --version 2>/dev/null | awk '{print $2}') · $(nproc) CPUs · $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) · PostgreSQL $("$pgbin/postgres" --version | awk '{print $3}') · $secs s per run, $conns connections
| workload | keepd | ceiling: the job's minimal SQL, stock Postgres (before / after) | keepd / ceiling | keepd's own SQL under pgbench | keepd / its SQL |
|---|---:|---:|---:|---:|---:|
| P2 pull of 100, settled (2 000-entry vault, seeded, VACUUM ANALYZE) | $pull_rps req/s, p50 $pull_p50 ms | $stock_pull tps ($stock_pull_a / $stock_pull_b) | $(ratio "$pull_rps" "$stock_pull") | $ceil_pull_tps tps | $(ratio "$pull_rps" "$ceil_pull_tps") |
| P2 pull of 100, fresh (2 000 entries just pushed through the API) | $fresh_rps req/s, p50 $fresh_p50 ms | $stock_pull tps | $(ratio "$fresh_rps" "$stock_pull") | | |
| P1 push of 50 (over 100 vaults) | $push_rps req/s, p50 $push_p50 ms | $stock_push tps ($stock_push_a / $stock_push_b) | $(ratio "$push_rps" "$stock_push") | $ceil_push_tps tps | $(ratio "$push_rps" "$ceil_push_tps") |

| comparison | figures | ratio |
|---|---|---:|
| P2b fresh vault vs settled vault, keepd pull | $fresh_rps vs $pull_rps req/s | $(ratio "$fresh_rps" "$pull_rps") |
| P2 pull p50, 10 000 vs $([[ $large == 1 ]] && echo '1 000 000' || echo '(skipped)') entries | $pull10k_p50 ms vs ${pull1m_p50:-—} ms | $([[ $large == 1 ]] && ratio "$pull1m_p50" "$pull10k_p50" || echo —) |
| P3 role and tenant switch + RLS, one connection (pgbench) | $scoped_ms ms vs $unscoped_ms ms without; keepd pull p50 at 1 connection $pull1_p50 ms | $(awk -v s="$scoped_ms" -v u="$unscoped_ms" -v k="$pull1_p50" 'BEGIN {printf "%.1f %% of a pull", 100 * (s - u) / k}') |
| P4 16 writers: one vault vs 100 vaults | $hot16_rps vs $spread16_rps req/s | $(ratio "$hot16_rps" "$spread16_rps") |
| P5 keepd memory under the pull run | $rss_before MiB before, $rss_peak MiB peak, $rss_after MiB after the runs | |
| E1 live update: push sent -> event received, 200 pushes | p50 $events_p50 ms, p99 $events_p99 ms, max $events_max ms | |
| E2 keepd's push SQL with one announcement per push (after the commit, unflushed) and without (shared by the pushes in flight) | $ceil_announced_tps vs $ceil_push_tps tps | $(ratio "$ceil_announced_tps" "$ceil_push_tps") |

Correctness: every vault holds exactly 1..N; the usage row equals the bytes stored; no request failed.
EOF
