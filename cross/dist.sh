#!/usr/bin/env bash
# Release artifacts: dist/vaultik-<version>-<target>.tar.gz per target, each with the
# binaries built by cross/build.sh (the agent; the controller too for aarch64 and
# x86_64), the systemd units and users, an example config, and dist/SHA256SUMS.
#
#   bash cross/dist.sh              # builds what is missing, then packs
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
targets=(aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf x86_64-unknown-linux-musl)
CONTROLLER=1 bash cross/build.sh aarch64-unknown-linux-musl x86_64-unknown-linux-musl
bash cross/build.sh armv7-unknown-linux-gnueabihf
rm -rf dist && mkdir -p dist
for t in "${targets[@]}"; do
  name="vaultik-$version-$t"
  stage="dist/$name"
  mkdir -p "$stage/systemd"
  for b in vaultik vaultik-controller; do
    [ -f "target/$t/edge/$b" ] && install -m 0755 "target/$t/edge/$b" "$stage/$b"
  done
  install -m 0644 systemd/*.service systemd/*.timer systemd/vaultik.sysusers "$stage/systemd/"
  install -m 0644 deploy/agent.yaml "$stage/agent.yaml.example"
  install -m 0644 README.md "$stage/README.md"
  # Reproducible: fixed order, owner and times.
  tar --sort=name --owner=0 --group=0 --numeric-owner \
    --mtime="@${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}" \
    -C dist -cf - "$name" | gzip -n -9 > "dist/$name.tar.gz"
  rm -rf "$stage"
done
(cd dist && sha256sum -- *.tar.gz > SHA256SUMS)
cat dist/SHA256SUMS
