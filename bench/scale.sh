#!/usr/bin/env bash
# Memory against tree size: peak RSS of backup and of restore for trees of 10k, 100k
# and 1M small files, vaultik and restic side by side in one run, on a journaled ext4
# scratch image with inodes enough for a million files. Prints a table of peak RSS (and
# wall time, for context) with the ratio vaultik / restic.
#
#   sudo bash bench/scale.sh                 # 10k, 100k and 1M files
#   SIZES="10000 100000" bash bench/scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-"10000 100000 1000000"}
SCRATCH=${SCRATCH:-/var/tmp/vaultik-scale}

. bench/lib.sh
install_tools
build_vaultik
mount_scratch "$SCRATCH" 16G -N 3000000
: > "$W/results"

# measure N LABEL TOOL cmd...: appends "n label tool wall rss_kb"
measure() {
  local n=$1 label=$2 tool=$3; shift 3
  sync
  /usr/bin/time -f "%e %M" -o "$W/t" "$@" > "$W/out.log" 2>&1 || { cat "$W/out.log" >&2; exit 1; }
  read -r wall rss < "$W/t"
  echo "$n $label $tool $wall $rss" >> "$W/results"
  echo "$n $label $tool: ${wall}s, $((rss / 1024)) MiB" >&2
}

"$VAULTIK" keygen -o "$W/key.txt" 2>/dev/null
PUB=$(sed -n 's/^# public key: //p' "$W/key.txt")
export RESTIC_PASSWORD=bench VAULTIK_PRIVATE_KEY_FILE="$W/key.txt"

for n in $SIZES; do
  C="$W/tree-$n"
  echo "building $n files" >&2
  python3 - "$C" "$n" <<'PY'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rnd = random.Random(n)
for i in range(n):
    d = os.path.join(root, f"{i // 100000:02d}", f"{(i // 1000) % 100:02d}")
    if i % 1000 == 0:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(rnd.randbytes(rnd.randint(1, 400)))
PY
  printf 'source_dirs: [%s]\nage_recipient: %s\ndestination: file://%s/vrepo-%s\nindex_path: %s/vstate-%s/index.sqlite\n' \
    "$C" "$PUB" "$W" "$n" "$W" "$n" > "$W/v-$n.yaml"
  export RESTIC_REPOSITORY="$W/rrepo-$n"
  restic init -q >/dev/null
  measure "$n" backup vaultik "$VAULTIK" backup "$W/v-$n.yaml" --cron
  measure "$n" backup restic restic backup -q "$C"
  measure "$n" restore vaultik "$VAULTIK" restore "file://$W/vrepo-$n" "" latest "$W/out" -q
  rm -rf "$W/out"; sync
  measure "$n" restore restic restic restore -q latest --target "$W/out"
  rm -rf "$W/out" "$C" "$W/vrepo-$n" "$W/rrepo-$n" "$W/vstate-$n"; sync
  fstrim "$W" 2>/dev/null || true
done

python3 - "$W/results" <<'PY'
import sys
r = {}
for line in open(sys.argv[1]):
    n, label, tool, wall, rss = line.split()
    r[(int(n), label, tool)] = (float(wall), int(rss))
print("| files | run | vaultik peak RSS | restic peak RSS | RSS ratio | vaultik wall | restic wall |")
print("|---|---|---|---|---|---|---|")
for n in sorted({k[0] for k in r}):
    for label in ("backup", "restore"):
        vw, vm = r[(n, label, "vaultik")]
        rw, rm = r[(n, label, "restic")]
        print(f"| {n:,} | {label} | {vm/1024:.0f} MiB | {rm/1024:.0f} MiB | {vm/rm:.2f} | {vw:.1f} s | {rw:.1f} s |")
PY
