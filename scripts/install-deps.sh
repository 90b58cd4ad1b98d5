#!/usr/bin/env bash
# Installs what keepd and its tests need on Debian/Ubuntu, idempotently:
# the PostgreSQL server binaries (keepd runs its own cluster from them).
set -euo pipefail

have_postgres() {
  compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null &&
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

if have_postgres; then
  exit 0
fi

sudo=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "install-deps: run as root or install sudo" >&2; exit 1; }
  sudo="sudo"
fi
command -v apt-get >/dev/null || {
  echo "install-deps: no apt-get here; install the PostgreSQL server package yourself" >&2
  exit 1
}
echo "install-deps: installing the PostgreSQL server (postgresql)" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# keepd runs its own cluster; the distribution's default cluster is not needed.
$sudo mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" | $sudo tee /etc/postgresql-common/createcluster.d/keepd.conf >/dev/null
$sudo apt-get install -y -qq postgresql >/dev/null
have_postgres || { echo "install-deps: postgresql installed but initdb/postgres not found" >&2; exit 1; }
