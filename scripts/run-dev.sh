#!/usr/bin/env bash
# Runs keepd in the foreground with config/dev.yaml: state under ./.keepd,
# Postgres on a Unix socket only, the API on http://127.0.0.1:8787.
set -euo pipefail
cd "$(dirname "$0")/.."
# Only what keepd runs with: PostgreSQL, pgAudit, pgBackRest.
scripts/install-deps.sh --run
exec cargo run --release --locked -- run --config config/dev.yaml "$@"
