#!/usr/bin/env bash
# Backs up a sample tree to a local directory with a fresh key, browses the snapshot,
# restores it and compares. Everything lives in one scratch directory it prints.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

if [ -x target/release/vaultik ]; then
    say "building vaultik (release; quick when nothing changed)"
else
    say "building vaultik (release; the first build compiles every dependency and takes a few minutes)"
fi
cargo build --release --quiet --bin vaultik
bin="$PWD/target/release/vaultik"
work=$(mktemp -d "${TMPDIR:-/tmp}/vaultik-demo.XXXXXX")
echo "scratch directory: $work"

say "making a sample tree: 200 notes, a 20 MB file and its copy, a symlink"
mkdir -p "$work/data/docs" "$work/data/photos" "$work/data/empty"
for i in $(seq 1 200); do echo "note $i: $(date +%s%N)" > "$work/data/docs/note-$i.txt"; done
head -c 20000000 /dev/urandom > "$work/data/photos/big.raw"
cp "$work/data/photos/big.raw" "$work/data/photos/copy-of-big.raw"
ln -s ../docs/note-1.txt "$work/data/photos/link-to-note"

say "making a key pair: the public key goes into the config, the private key stays here"
"$bin" keygen -o "$work/key.txt"
public=$(sed -n 's/^# public key: //p' "$work/key.txt")
cat > "$work/vaultik.yaml" <<YAML
# The directories to back up, and what to leave out.
source_dirs:
  - $work/data
exclude:
  - '*.tmp'
# Backups are encrypted to this public key; the host never holds the private one.
age_recipient: $public
# Where snapshots go. For S3 use an s3: block instead (see the README).
destination: file://$work/bucket
# The agent's local dedup index.
index_path: $work/state/index.sqlite
YAML

say "backup (no private key needed)"
"$bin" backup "$work/vaultik.yaml"
say "incremental backup after changing one file"
echo changed >> "$work/data/docs/note-7.txt"
"$bin" backup "$work/vaultik.yaml"

export VAULTIK_PRIVATE_KEY_FILE="$work/key.txt"
say "snapshots (reading needs the private key)"
"$bin" snapshots "file://$work/bucket" ""
say "ls: what the latest snapshot holds under $work/data/photos"
"$bin" ls "file://$work/bucket" "" latest "$work/data/photos" --long
say "restore latest"
"$bin" restore "file://$work/bucket" "" latest "$work/restored"
diff -r "$work/data" "$work/restored$work/data" && echo "restored tree is identical"
say "fetch one file"
"$bin" fetch "file://$work/bucket" "" latest "$work/data/docs/note-7.txt" "$work/note-7.txt"
cat "$work/note-7.txt"
say "what the bucket holds: opaque names only"
find "$work/bucket" -type f | sed "s|$work/||" | head

say "done"
cat <<EOF
The config this demo wrote is a model for your own:
    $work/vaultik.yaml
Change source_dirs and the destination, put your own public key in age_recipient,
and run:  $bin backup /path/to/your.yaml
Remove the scratch directory when you are done:
    rm -rf $work
EOF
