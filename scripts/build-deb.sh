#!/usr/bin/env bash
# Builds keepd's Debian package from the binary that is already built: no
# second compile. The manual pages, the completions and the systemd unit
# with the package's paths are generated into target/deb-assets/ first
# (by the binary itself: `keepd man`, `keepd completions SHELL`), then
# cargo-deb (scripts/install-deps.sh installs it) packs them as
# Cargo.toml's [package.metadata.deb] says.
#
# Usage: scripts/build-deb.sh [--profile PROFILE] [cargo-deb options...]
#   PROFILE: the Cargo profile the binary was built with: release (the
#   default, `cargo build --release`) or dev (`cargo build`, `cargo test`).
#   Other options go to `cargo deb`, e.g. --output DIR or --fast.
# Prints the path of the .deb on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --profile) profile=$2; shift 2 ;;
    --profile=*) profile=${1#--profile=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
case $profile in
  dev | debug) profile=dev dir=debug ;;
  *) dir=$profile ;;
esac

cargo deb --version >/dev/null 2>&1 || {
  echo "build-deb: cargo-deb is missing; run scripts/install-deps.sh" >&2
  exit 1
}
target_dir=$(cargo metadata --format-version 1 --no-deps --offline |
  grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
binary=$target_dir/$dir/keepd
[[ -x "$binary" ]] || {
  echo "build-deb: $binary is missing: build it first (cargo build --profile $profile)" >&2
  exit 1
}

assets=target/deb-assets
rm -rf "$assets"
mkdir -p "$assets"
# keepd.1 and a page per subcommand (keepd-run.1, ...).
"$binary" man --out "$assets/man" >/dev/null
[[ -s "$assets/man/keepd.1" ]] || { echo "build-deb: keepd man wrote no keepd.1" >&2; exit 1; }
"$binary" completions bash >"$assets/keepd.bash"
"$binary" completions zsh >"$assets/_keepd"
"$binary" completions fish >"$assets/keepd.fish"
# The unit as shipped, with the binary where the package puts it (what
# `keepd service print` would write for /usr/bin/keepd).
exec_start='ExecStart=/usr/bin/keepd run --config /etc/keepd/keepd.yaml'
sed "s|^ExecStart=.* run --config .*$|$exec_start|" systemd/keepd.service >"$assets/keepd.service"
grep -qxF "$exec_start" "$assets/keepd.service" || {
  echo "build-deb: systemd/keepd.service has no ExecStart line to point at /usr/bin/keepd" >&2
  exit 1
}
for file in "$assets"/* "$assets"/man/*; do
  [[ -f "$file" ]] || continue
  [[ -s "$file" ]] || { echo "build-deb: $file came out empty" >&2; exit 1; }
done

# cargo-deb warns that the dev profile is meant for development; the
# package of a dev build is what the tests install.
cargo deb --no-build --profile "$profile" "${args[@]}"
