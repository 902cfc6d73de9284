#!/usr/bin/env bash
# Backs up a sample tree to a local directory with a fresh key, lists the snapshot,
# restores it and compares. Everything lives in one scratch directory it prints.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin="$PWD/target/release/vaultik"
work=$(mktemp -d "${TMPDIR:-/tmp}/vaultik-demo.XXXXXX")
echo "scratch directory: $work"

mkdir -p "$work/data/docs" "$work/data/photos" "$work/data/empty"
for i in $(seq 1 200); do echo "note $i: $(date +%s%N)" > "$work/data/docs/note-$i.txt"; done
head -c 20000000 /dev/urandom > "$work/data/photos/big.raw"
cp "$work/data/photos/big.raw" "$work/data/photos/copy-of-big.raw"
ln -s ../docs/note-1.txt "$work/data/photos/link-to-note"

"$bin" keygen -o "$work/key.txt"
public=$(sed -n 's/^# public key: //p' "$work/key.txt")
cat > "$work/vaultik.yaml" <<YAML
source_dirs:
  - $work/data
exclude:
  - '*.tmp'
age_recipient: $public
destination: file://$work/bucket
index_path: $work/state/index.sqlite
YAML

echo "== backup (no private key needed)"
"$bin" backup "$work/vaultik.yaml"
echo "== incremental backup after touching one file"
echo changed >> "$work/data/docs/note-7.txt"
"$bin" backup "$work/vaultik.yaml"

export VAULTIK_PRIVATE_KEY_FILE="$work/key.txt"
echo "== snapshots (needs the private key)"
"$bin" snapshots "file://$work/bucket" ""
echo "== restore latest"
"$bin" restore "file://$work/bucket" "" latest "$work/restored"
diff -r "$work/data" "$work/restored$work/data" && echo "restored tree is identical"
echo "== fetch one file"
"$bin" fetch "file://$work/bucket" "" latest "$work/data/docs/note-7.txt" "$work/note-7.txt"
cat "$work/note-7.txt"
echo "== what the bucket holds: opaque names only"
find "$work/bucket" -type f | sed "s|$work/||" | head
