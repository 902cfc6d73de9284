#!/usr/bin/env bash
# Release builds for the edge from this x86_64 machine, without Docker: cargo-zigbuild
# with zig from PyPI links static musl binaries and, for 32-bit ARM, against glibc 2.17
# (the musleabihf standard library is not installable here).
#
#   bash cross/build.sh                               # the agent for every target
#   bash cross/build.sh aarch64-unknown-linux-musl    # one target
#   CONTROLLER=1 bash cross/build.sh aarch64-unknown-linux-musl   # and the controller
#
# Binaries land in target/<triple>/edge/ (profile `edge` in Cargo.toml: size-optimised,
# hot loops at full speed, stripped). Builds are reproducible: Cargo.lock, pinned
# zig, no absolute paths in the binary (--remap-path-prefix), no timestamps.
set -euo pipefail
cd "$(dirname "$0")/.."
ZIGLANG=0.17.1
ZIGBUILD=0.24.0
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf x86_64-unknown-linux-musl)

export PATH="$PATH:$(python3 -m site --user-base)/bin"
if ! python3 -c 'import ziglang' 2>/dev/null ||
   ! command -v cargo-zigbuild >/dev/null 2>&1; then
  echo "installing ziglang $ZIGLANG and cargo-zigbuild $ZIGBUILD (PyPI)" >&2
  python3 -m pip install -q "ziglang==$ZIGLANG" "cargo-zigbuild==$ZIGBUILD"
  command -v pyenv >/dev/null 2>&1 && pyenv rehash
fi
installed=$(rustup target list --installed)
for t in "${TARGETS[@]}"; do
  grep -qx "$t" <<<"$installed" || rustup target add "$t"
done

export RUSTFLAGS="--remap-path-prefix=$PWD=/vaultik --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo"
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
# One package per build: built together, the agent would inherit the controller's
# dependency features (and its size).
packages=(edge-agent)
[ -n "${CONTROLLER:-}" ] && packages+=(controller)
for t in "${TARGETS[@]}"; do
  zt=$t
  # The glibc floor is part of zig's target name.
  [ "$t" = armv7-unknown-linux-gnueabihf ] && zt=$t.2.17
  for p in "${packages[@]}"; do
    echo "building $p for $zt" >&2
    cargo zigbuild --locked --profile edge -p "$p" --bins --target "$zt"
  done
  for b in target/"$t"/edge/vaultik target/"$t"/edge/vaultik-controller; do
    if [ -f "$b" ]; then printf '%s\t%s bytes\n' "$b" "$(stat -c %s "$b")"; fi
  done
done
