#!/usr/bin/env bash
# Builds the Debian 12 (bookworm) base image the packaging tests and
# contrib/docker/Dockerfile start from, locally: no container registry is
# reachable here, so `FROM debian:bookworm-slim` finds this image instead
# of the official one. It is made the way the official slim image is
# (debuerreotype): debootstrap's minbase, the deb822 sources of the
# official image (apt inside reaches deb.debian.org), its apt and dpkg
# settings for containers (policy-rc.d, no caches, no translations) and
# its "slim" path-excludes (no docs but copyright files, no man pages, no
# locales), so what works on this image works on the official one.
#
# Usage: scripts/build-debian-base.sh [IMAGE]   (default debian:bookworm-slim)
# Reuses the image when present: one this recipe built (its digest is the
# keepd.recipe label), or one without the label (the official image,
# pulled where a registry is reachable). Needs root and debootstrap
# (scripts/install-deps.sh installs it).
set -euo pipefail

image=${1:-${KEEPD_DEBIAN_BASE_IMAGE:-debian:bookworm-slim}}
suite=bookworm
mirror=${KEEPD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
recipe=$(sha256sum "$0" | cut -c1-16)

# One build at a time (tests and scripts/test.sh may race for it).
exec 9>"${TMPDIR:-/tmp}/keepd-build-debian-base.lock"
flock 9

label() {
  docker image inspect -f '{{index .Config.Labels "keepd.recipe"}}' "$image" 2>/dev/null
}
if found=$(label); then
  if [[ -z "$found" || "$found" == "<no value>" ]]; then
    echo "build-debian-base: $image is present (not built here: used as it is)"
    exit 0
  elif [[ "$found" == "$recipe" ]]; then
    echo "build-debian-base: $image is present"
    exit 0
  fi
  echo "build-debian-base: $image was built by another recipe ($found); rebuilding"
fi

command -v debootstrap >/dev/null || {
  echo "build-debian-base: debootstrap is missing; run scripts/install-deps.sh" >&2
  exit 1
}
[[ $(id -u) -eq 0 ]] || {
  echo "build-debian-base: debootstrap needs root" >&2
  exit 1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
started=$SECONDS
echo "build-debian-base: debootstrap --variant=minbase $suite from $mirror"
if ! debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1; then
  tail -n 30 "$work/debootstrap.log" >&2
  tail -n 30 "$root/debootstrap/debootstrap.log" >&2 2>/dev/null || true
  exit 1
fi

# The official image's sources (deb822), security updates included.
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

# debuerreotype-minimizing-config: no service starts during an install
# (there is no init in a container), no sync() per package, no apt caches,
# compressed indexes, no translations, suggests not kept by autoremove.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
echo force-unsafe-io >"$root/etc/dpkg/dpkg.cfg.d/docker-apt-speedup"
clean='"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true";'
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<EOF
DPkg::Post-Invoke { $clean };
APT::Update::Post-Invoke { $clean };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
echo 'Acquire::GzipIndexes "true";' >"$root/etc/apt/apt.conf.d/docker-gzip-indexes"
echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests"

# debuerreotype-slimify: what the slim variant leaves out, now and for
# every package installed later (dpkg path-exclude).
excludes=(/usr/share/doc /usr/share/groff /usr/share/info /usr/share/linda
  /usr/share/lintian/overrides /usr/share/locale /usr/share/man)
{
  echo '# This is the "slim" variant of the Debian base image.'
  for dir in "${excludes[@]}"; do echo "path-exclude $dir/*"; done
  echo 'path-include /usr/share/doc/*/copyright'
  echo 'path-include /usr/share/locale/locale.alias'
} >"$root/etc/dpkg/dpkg.cfg.d/docker"
for dir in "${excludes[@]}"; do
  [[ -d "$root$dir" ]] || continue
  find "$root$dir" -mindepth 1 -depth \
    -not -path "$root/usr/share/doc/*/copyright" \
    -not -path "$root/usr/share/locale/locale.alias" \
    \( -type f -o -type l \) -delete
  find "$root$dir" -mindepth 1 -depth -type d -empty -delete
done

# debuerreotype-fixup and its tar excludes: no logs, caches, apt lists or
# machine id; the engine provides /dev, /proc, /sys, hosts and resolv.conf.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/apt/* \
  "$root"/var/cache/ldconfig/aux-cache "$root"/debootstrap
rm -f "$root"/var/log/{dpkg.log,alternatives.log,bootstrap.log}
: >"$root/etc/machine-id"
echo "build-debian-base: root filesystem ready after $((SECONDS - started)) s"

tar --numeric-owner --xattrs -C "$root" \
  --exclude=./dev/* --exclude=./proc/* --exclude=./sys/* \
  -c . | docker import \
  --change 'CMD ["bash"]' \
  --change "LABEL keepd.recipe=$recipe" \
  --message "Debian $suite minbase, slim as the official image, built by keepd's scripts/build-debian-base.sh" \
  - "$image" >/dev/null
echo "build-debian-base: $image built in $((SECONDS - started)) s ($(docker image inspect -f '{{.Size}}' "$image") bytes)"
