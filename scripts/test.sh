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
  # The packaging test's Debian 12 base (debian:bookworm-slim, made with
  # debootstrap: no registry here); it packs the binary the test build
  # makes, so keepd is compiled once.
  scripts/build-debian-base.sh
else
  echo "test.sh: no Docker engine answers; the docker provider and packaging tests will skip"
fi
if cargo nextest --version >/dev/null 2>&1; then
  exec cargo nextest run --locked --no-fail-fast "$@"
else
  exec cargo test --locked --no-fail-fast "$@"
fi
