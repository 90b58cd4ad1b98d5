#!/usr/bin/env bash
# Installs what keepd and its tests need on Debian/Ubuntu, idempotently:
# the PostgreSQL server binaries (keepd runs its own cluster from them),
# for the edge tests a real reverse proxy (nginx) and a real browser
# (headless Chromium), pgBackRest (keepd's backups), pgAudit (loaded by
# keepd beside its server), Prometheus and promtool (the contrib/ dashboard
# and alert rules are checked against a real one), and for the HA test
# etcd (Debian) and Patroni (PyPI, in its own virtualenv at
# /opt/keepd-test/patroni), for the S3 repository test moto's S3 server
# (PyPI, /opt/keepd-test/moto), and for the packaging test debootstrap
# (the Debian 12 base image, scripts/build-debian-base.sh), dpkg-dev and
# cargo-deb (crates.io; the .deb, scripts/build-deb.sh), cryptsetup,
# nghttp2-client (HTTP/2 chosen by ALPN), docker.io and docker-compose
# (the docker provider and the image), and systemd (systemd-analyze).
# Every tool a test needs is here: in CI (`CI` set) a test missing one
# fails (tests/suite/common: `require`).
#
# `--run` installs only what running keepd natively needs: the PostgreSQL
# server, pgAudit and pgBackRest (scripts/run-dev.sh).
set -euo pipefail
mode=all
case ${1:-} in
  --run) mode=run ;;
  "") ;;
  *) echo "install-deps: unknown argument $1 (--run installs only what keepd runs with)" >&2; exit 2 ;;
esac

have_postgres() {
  compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null &&
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

missing=()
have_postgres || missing+=(postgresql)
[[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
[[ -x /usr/bin/python3 ]] || missing+=(python3)
[[ -x /usr/bin/etcd ]] || missing+=(etcd-server)
[[ -x /usr/bin/pgbackrest ]] || missing+=(pgbackrest)
[[ -x /usr/sbin/debootstrap ]] || missing+=(debootstrap)
# The LUKS measurement test makes a real volume where the kernel has
# device-mapper (it is #[ignore]d: this project's containers have none;
# docs/reliability.md says how to run it where one has).
[[ -x /usr/sbin/cryptsetup ]] || missing+=(cryptsetup-bin)
# cargo-deb's $auto dependencies come from dpkg-shlibdeps.
[[ -x /usr/bin/dpkg-shlibdeps ]] || missing+=(dpkg-dev)
[[ -x /usr/bin/prometheus && -x /usr/bin/promtool ]] || missing+=(prometheus)
# A real HTTP/2 client (ALPN selection, tests/suite/bounds.rs).
[[ -x /usr/bin/nghttp ]] || missing+=(nghttp2-client)
# The docker provider's and packaging tests: the Docker engine (this
# project's machines start it; scripts/test.sh does in CI when none
# answers) and Compose, which reads contrib/docker/compose.yaml.
command -v docker >/dev/null || missing+=(docker.io)
[[ -x /usr/bin/docker-compose ]] || missing+=(docker-compose)
# systemd-analyze rates the unit's exposure and verifies the packaged unit.
[[ -x /usr/bin/systemd-analyze ]] || missing+=(systemd)
# pgAudit for the installed major (Debian 12's is 15 when none is yet).
pg_major=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1)
pg_major=${pg_major:-15}
compgen -G "/usr/lib/postgresql/$pg_major/lib/pgaudit.so" >/dev/null || missing+=("postgresql-$pg_major-pgaudit")
dpkg-query -W -f '${Status}' python3-venv 2>/dev/null | grep -q "ok installed" || missing+=(python3-venv)
if [[ $mode == run ]]; then
  missing=()
  have_postgres || missing+=(postgresql)
  [[ -x /usr/bin/pgbackrest ]] || missing+=(pgbackrest)
  compgen -G "/usr/lib/postgresql/$pg_major/lib/pgaudit.so" >/dev/null || missing+=("postgresql-$pg_major-pgaudit")
fi
# PyPI tools, each in a virtualenv of its own under /opt/keepd-test:
# Patroni for the HA test, moto's S3 server for the S3 repository test,
# schemathesis for the OpenAPI contract test, kubernetes-validate and
# checkov for the Kubernetes manifests.
install_venv() {
  local venv=/opt/keepd-test/$1 program=$2
  shift 2
  [[ -x $venv/bin/$program ]] && return
  echo "install-deps: installing $* into $venv" >&2
  $sudo /usr/bin/python3 -m venv "$venv"
  $sudo "$venv/bin/pip" install -q --disable-pip-version-check "$@"
}
install_python_tools() {
  install_venv patroni patroni "patroni[etcd3,psycopg3]==4.1.5" "psycopg[binary]"
  install_venv moto moto_server "moto[server]==5.2.5"
  install_venv schemathesis schemathesis "schemathesis==4.32.5"
  # The Kubernetes manifests' checks: the API schemas and a security scanner.
  install_venv kubernetes-validate kubernetes-validate "kubernetes-validate==1.37.0"
  install_venv checkov checkov "checkov==3.3.30"
}
# cargo-deb, pinned, built once into ~/.cargo/bin (a few minutes).
CARGO_DEB_VERSION=3.8.0
install_cargo_tools() {
  if [[ $(cargo deb --version 2>/dev/null) != "cargo-deb $CARGO_DEB_VERSION" ]]; then
    echo "install-deps: installing cargo-deb $CARGO_DEB_VERSION" >&2
    cargo install --locked --quiet cargo-deb --version "$CARGO_DEB_VERSION"
  fi
}
sudo=""
if [[ ${#missing[@]} -eq 0 ]]; then
  if [[ $mode == all ]]; then
    install_python_tools
    install_cargo_tools
  fi
  exit 0
fi

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
# The tests run their own Prometheus on a free port; the package's service
# (enabled by its postinst, on port 9090) is not wanted.
if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null; then
  if [[ -d /run/systemd/system ]]; then
    $sudo systemctl disable --now --quiet prometheus.service || true
  else
    $sudo systemctl disable --quiet prometheus.service || true
  fi
fi
if [[ $mode == all ]]; then
  install_python_tools
  install_cargo_tools
fi
