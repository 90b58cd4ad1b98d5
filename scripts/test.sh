#!/usr/bin/env bash
# Runs the whole test suite against a real PostgreSQL, installing it first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo fmt --all -- --check
# The docker provider's tests need their Postgres image, built offline
# from the host's packages (they skip, saying why, without an engine).
if docker info >/dev/null 2>&1; then
  scripts/build-test-image.sh
else
  echo "test.sh: no Docker engine answers; the docker provider tests will skip"
fi
if cargo nextest --version >/dev/null 2>&1; then
  exec cargo nextest run --locked --no-fail-fast "$@"
else
  exec cargo test --locked --no-fail-fast "$@"
fi
