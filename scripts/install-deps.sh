#!/usr/bin/env bash
# Installs what keepd and its tests need on Debian/Ubuntu, idempotently:
# the PostgreSQL server binaries (keepd runs its own cluster from them),
# and for the edge tests a real reverse proxy (nginx) and a real browser
# (headless Chromium).
set -euo pipefail

have_postgres() {
  compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null &&
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

missing=()
have_postgres || missing+=(postgresql)
[[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
command -v python3 >/dev/null || missing+=(python3)
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

sudo=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "install-deps: run as root or install sudo" >&2; exit 1; }
  sudo="sudo"
fi
command -v apt-get >/dev/null || {
  echo "install-deps: no apt-get here; install ${missing[*]} yourself" >&2
  exit 1
}
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# keepd runs its own cluster; the distribution's default cluster is not needed.
$sudo mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" | $sudo tee /etc/postgresql-common/createcluster.d/keepd.conf >/dev/null
# The tests start nginx themselves: no package's service starts on install
# (policy-rc.d answers "not allowed" to invoke-rc.d while this runs).
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
  $sudo chmod 755 /usr/sbin/policy-rc.d
  trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
fi
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
have_postgres || { echo "install-deps: postgresql installed but initdb/postgres not found" >&2; exit 1; }
