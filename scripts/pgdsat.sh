#!/usr/bin/env bash
# Audits a running native keepd's Postgres with HexaCluster's pgdsat (the
# CIS PostgreSQL benchmark, and more). pgdsat is published on GitHub only,
# not in Debian or PyPI, so it is not part of the test suite: fetch it,
# then run
#
#   scripts/pgdsat.sh PGDSAT_CHECKOUT CONFIG [REPORT.txt]
#
# as root on the node's host (pgdsat reads the data directory). It
# connects through `keepd psql` (the superuser, over the node's socket:
# no password in argv or the environment) and writes a text report;
# docs/operations.md ("CIS audit with pgdsat") says why each item it still
# flags does not apply.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 PGDSAT_CHECKOUT CONFIG [REPORT.txt]" >&2
  exit 2
fi
pgdsat=$(cd "$1" && pwd)
config=$(realpath "$2")
report=${3:-pgdsat-report.txt}
keepd=${KEEPD:-$(command -v keepd || echo "$(dirname "$0")/../target/debug/keepd")}
[[ -f $pgdsat/pgdsat && -d $pgdsat/lib ]] || {
  echo "$0: $pgdsat holds no pgdsat (expected pgdsat and lib/)" >&2
  exit 2
}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# pgdsat runs `$psql -AtXc ...`: keepd's psql, as the superuser.
cat >"$scratch/psql" <<WRAP
#!/bin/sh
exec "$keepd" --config "$config" psql -- "\$@"
WRAP
chmod 0700 "$scratch/psql"
pgdata=$("$scratch/psql" -AtXc 'SHOW data_directory')
version=$("$scratch/psql" -AtXc 'SHOW server_version' | cut -d' ' -f1)
# The PostgreSQL binaries on PATH, as pgdsat expects.
bindir=$(dirname "$(realpath "$(command -v pg_config 2>/dev/null || ls /usr/lib/postgresql/*/bin/pg_config | tail -1)")")
PATH="$bindir:$PATH" perl -I "$pgdsat/lib" "$pgdsat/pgdsat" \
  --psql "$scratch/psql" --pgdata "$pgdata" --cluster "$version" \
  --no-pg-version-check --format text --output "$report"
echo "pgdsat: report written to $report" >&2
