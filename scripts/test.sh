#!/usr/bin/env bash
# Runs the whole test suite against a real PostgreSQL, installing it first:
# formatting and clippy, then every test. In CI (`CI` set) a test whose
# tool or engine is missing fails, naming it; elsewhere it prints
# `SKIPPED: <why>` (tests/suite/common: `require`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
# The docker provider's and packaging tests need a Docker engine; this
# project's machines start one. In CI, start it if none answers.
if ! docker info >/dev/null 2>&1 && [[ -n ${CI:-} ]] && command -v dockerd >/dev/null &&
  [[ $(id -u) -eq 0 ]]; then
  echo "test.sh: no Docker engine answers; starting dockerd" >&2
  nohup dockerd >/tmp/keepd-test-dockerd.log 2>&1 &
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
fi
if docker info >/dev/null 2>&1; then
  # Their Postgres image, built offline from the host's packages.
  scripts/build-test-image.sh
  # The packaging test's Debian 12 base (debian:bookworm-slim, made with
  # debootstrap: no registry here); it packs the binary the test build
  # makes, so keepd is compiled once.
  scripts/build-debian-base.sh
else
  echo "test.sh: no Docker engine answers; the docker provider and packaging tests" \
    "will fail in CI and say SKIPPED elsewhere" >&2
fi
if cargo nextest --version >/dev/null 2>&1; then
  # Skipped (#[ignore]d) tests listed with the rest; .config/nextest.toml
  # shows what tests that may skip printed (`SKIPPED: <why>`) at the end.
  log=$(mktemp)
  status=0
  cargo nextest run --locked --no-fail-fast --status-level skip \
    --final-status-level skip "$@" 2>&1 | tee "$log" || status=$?
  # What the skippable tests printed follows nextest's summary: say the
  # summary again last, so the run closes on it.
  grep -E '^ +Summary \[' "$log" | tail -n 1 || true
  rm -f "$log"
  exit "$status"
else
  exec cargo test --locked --no-fail-fast "$@"
fi
