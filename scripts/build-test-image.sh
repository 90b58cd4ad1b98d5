#!/usr/bin/env bash
# Builds the Postgres image the Docker tests use, offline: no registry is
# reachable here, so the host's installed PostgreSQL packages and the
# libraries they load are packed into a root filesystem and imported.
# The layout follows the official `postgres` image (binaries on PATH, a
# `postgres` user with uid 999, PGDATA under /var/lib/postgresql/data), so
# what works with this image works with the official one.
#
# Usage: scripts/build-test-image.sh [IMAGE]   (default keepd-test-postgres:test)
# Reuses the image when it is already present.
set -euo pipefail

bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [[ -z "$bindir" ]]; then
  echo "build-test-image: no PostgreSQL under /usr/lib/postgresql; run scripts/install-deps.sh" >&2
  exit 1
fi
major=$(basename "$(dirname "$bindir")")
image=${1:-${KEEPD_TEST_DOCKER_IMAGE:-keepd-test-postgres:test}}

# The recipe's digest labels the image, so an image built by an older
# recipe (without pgAudit, say) is rebuilt rather than reused.
recipe=$(sha256sum "$0" | cut -c1-16)
if [[ $(docker image inspect -f '{{index .Config.Labels "keepd.recipe"}}' "$image" 2>/dev/null) == "$recipe" ]]; then
  echo "build-test-image: $image is present"
  exit 0
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "build-test-image: packing PostgreSQL $major from the host into $image"

# Debian's merged /usr: /bin, /lib and /lib64 are links into /usr.
mkdir -p "$root"/usr/{bin,lib,lib64} "$root"/{etc,tmp,var/run/postgresql,var/lib/postgresql/data}
ln -s usr/bin "$root/bin"
ln -s usr/lib "$root/lib"
ln -s usr/lib64 "$root/lib64"
ln -s bin "$root/usr/sbin"
ln -s usr/sbin "$root/sbin"

# Copies a host path into the root under its /usr-canonical name, keeping
# symbolic links (so sonames resolve) and following them to their files.
canonical() {
  case "$1" in
    /bin/* | /lib/* | /lib64/* | /sbin/*) echo "/usr$1" ;;
    *) echo "$1" ;;
  esac
}
copy() {
  local src=$1 dst
  dst=$(canonical "$src")
  if [[ -e "$root$dst" || -L "$root$dst" ]]; then
    return 0
  fi
  mkdir -p "$root$(dirname "$dst")"
  if [[ -L "$src" ]]; then
    local target
    target=$(readlink -f "$src")
    copy "$target"
    ln -s "$(canonical "$target")" "$root$dst"
  elif [[ -f "$src" ]]; then
    cp -p "$src" "$root$dst"
  fi
}

packages=("postgresql-$major" libpq5 dash coreutils tzdata)
# pgAudit and pgBackRest, as a production image should carry them (keepd
# loads pgAudit when found; backups run pgBackRest inside the container).
for extra in "postgresql-$major-pgaudit" pgbackrest; do
  if dpkg-query -W -f '${Status}' "$extra" 2>/dev/null | grep -q "ok installed"; then
    packages+=("$extra")
  fi
done
for pkg in "${packages[@]}"; do
  while IFS= read -r path; do
    if [[ -f "$path" || -L "$path" ]]; then
      copy "$path"
    fi
  done < <(dpkg -L "$pkg")
done

# Every shared library the binaries and modules load, transitively (ldd
# resolves the whole closure; scripts and data files have none).
libraries() {
  ldd "$1" 2>/dev/null | grep -o '/[^ ]*' || true
}
while IFS= read -r elf; do
  while IFS= read -r lib; do copy "$lib"; done < <(libraries "$elf")
done < <(find "$root/usr/lib/postgresql" "$root/usr/bin" -type f \( -perm -u+x -o -name '*.so' \) | sed "s|^$root||")
for tool in dash rm mv; do
  while IFS= read -r lib; do copy "$lib"; done < <(libraries "$(command -v "$tool")")
done

ln -sf dash "$root/usr/bin/sh"
cat > "$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/usr/sbin/nologin
postgres:x:999:999:PostgreSQL administrator:/var/lib/postgresql:/bin/sh
EOF
cat > "$root/etc/group" <<'EOF'
root:x:0:
postgres:x:999:
EOF
chmod 1777 "$root/tmp"
chown -R 999:999 "$root/var/run/postgresql" "$root/var/lib/postgresql"
chmod 2777 "$root/var/run/postgresql"
# As in the official image: any --user can create PGDATA below it.
chmod 1777 "$root/var/lib/postgresql/data"

tar -C "$root" -c . | docker import \
  --change "ENV PATH=/usr/lib/postgresql/$major/bin:/usr/local/bin:/usr/bin:/bin" \
  --change "ENV PGDATA=/var/lib/postgresql/data" \
  --change "USER postgres" \
  --change 'CMD ["postgres"]' \
  --change "LABEL keepd.recipe=$recipe" \
  --message "keepd test image: PostgreSQL $major from the host's Debian packages" \
  - "$image" >/dev/null
echo "build-test-image: $image built ($(docker image inspect -f '{{.Size}}' "$image") bytes)"
