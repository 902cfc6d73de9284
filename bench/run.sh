#!/usr/bin/env bash
# Backup benchmark: vaultik against restic (Debian package) on the same corpus, in one
# run, on a journaled ext4 scratch image. Prints wall time, CPU time, throughput, peak
# RSS and repository size for: initial backup, unchanged re-run, incremental after
# edits, full restore; each with the ratio vaultik / restic.
#
#   sudo bash bench/run.sh            # default corpus ≈ 1.1 GB, 100k small files
#   SMALL_FILES=20000 bash bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL_FILES=${SMALL_FILES:-100000}
LARGE_MB=${LARGE_MB:-640}
SCRATCH=${SCRATCH:-/var/tmp/vaultik-bench}

. bench/lib.sh
install_tools
build_vaultik
mount_scratch "$SCRATCH" 12G
C="$W/corpus"

echo "building corpus: $SMALL_FILES small files + $LARGE_MB MB of large files" >&2
python3 - "$C" "$SMALL_FILES" "$LARGE_MB" <<'PY'
import os, random, sys
root, n_small, large_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(42)
words = [("".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9)))).encode() for _ in range(5000)]
def text(n):
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rnd.choice(words) for _ in range(64)) + b"\n"
    return bytes(out[:n])
for i in range(n_small):
    d = os.path.join(root, "small", f"{i // 1000:03d}", f"{(i // 50) % 20:02d}")
    os.makedirs(d, exist_ok=True)
    size = rnd.choice([200, 900, 2500, 4096, 7000, 16000])
    data = text(size) if i % 3 else os.urandom(size)
    with open(os.path.join(d, f"f{i}.txt"), "wb") as f:
        f.write(data)
big = os.path.join(root, "large")
os.makedirs(big, exist_ok=True)
per = 64
for i in range(large_mb // per):
    with open(os.path.join(big, f"blob{i:02d}.bin"), "wb") as f:
        for _ in range(per):
            f.write(os.urandom(1 << 20) if i % 2 else text(1 << 20))
PY
CORPUS_BYTES=$(du -sb "$C" | cut -f1)

warm() { find "$C" -type f -print0 | xargs -0 cat > /dev/null; }
# measure LABEL TOOL cmd...: appends "label tool wall cpu rss_kb" to $W/results
measure() {
  local label=$1 tool=$2; shift 2
  sync
  /usr/bin/time -f "%e %U %S %M" -o "$W/t" "$@" > "$W/out.log" 2>&1 || { cat "$W/out.log" >&2; exit 1; }
  read -r wall user sys rss < "$W/t"
  echo "$label $tool $wall $(echo "$user + $sys" | bc) $rss" >> "$W/results"
}
: > "$W/results"

# vaultik
"$VAULTIK" keygen -o "$W/key.txt" 2>/dev/null
PUB=$(sed -n 's/^# public key: //p' "$W/key.txt")
printf 'source_dirs: [%s]\nage_recipient: %s\ndestination: file://%s/vrepo\nindex_path: %s/vstate/index.sqlite\n' \
  "$C" "$PUB" "$W" "$W" > "$W/v.yaml"
export RESTIC_PASSWORD=bench RESTIC_REPOSITORY="$W/rrepo"
restic init -q >/dev/null

for tool in vaultik restic; do
  warm
  if [ $tool = vaultik ]; then measure initial vaultik "$VAULTIK" backup "$W/v.yaml" --cron
  else measure initial restic restic backup -q "$C"; fi
done
for tool in vaultik restic; do
  warm
  if [ $tool = vaultik ]; then measure unchanged vaultik "$VAULTIK" backup "$W/v.yaml" --cron
  else measure unchanged restic restic backup -q "$C"; fi
done
# Edit 1% of small files and append to two large ones.
python3 - "$C" <<'PY'
import os, sys
root = sys.argv[1]
n = 0
for d, _, files in sorted(os.walk(os.path.join(root, "small"))):
    for f in sorted(files):
        n += 1
        if n % 100 == 0:
            with open(os.path.join(d, f), "ab") as h: h.write(b"edited\n")
for f in ("blob00.bin", "blob01.bin"):
    with open(os.path.join(root, "large", f), "ab") as h: h.write(os.urandom(4 << 20))
PY
for tool in vaultik restic; do
  warm
  if [ $tool = vaultik ]; then measure incremental vaultik "$VAULTIK" backup "$W/v.yaml" --cron
  else measure incremental restic restic backup -q "$C"; fi
done
VREPO=$(du -sb "$W/vrepo" | cut -f1); RREPO=$(du -sb "$W/rrepo" | cut -f1)
export VAULTIK_PRIVATE_KEY_FILE="$W/key.txt"
measure restore vaultik "$VAULTIK" restore "file://$W/vrepo" "" latest "$W/vout" -q
rm -rf "$W/vout"; sync; fstrim "$W" 2>/dev/null || true
measure restore restic restic restore -q latest --target "$W/rout"
rm -rf "$W/rout"

python3 - "$W/results" "$CORPUS_BYTES" "$VREPO" "$RREPO" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
corpus, vrepo, rrepo = map(int, sys.argv[2:5])
r = {(a, b): (float(w), float(c), int(m)) for a, b, w, c, m in rows}
print(f"corpus: {corpus/1e6:.0f} MB; repository: vaultik {vrepo/1e6:.0f} MB, restic {rrepo/1e6:.0f} MB (ratio {vrepo/rrepo:.2f})")
print()
print("| run | vaultik wall | restic wall | wall ratio | vaultik MB/s | restic MB/s | vaultik CPU s | restic CPU s | vaultik peak RSS | restic peak RSS | RSS ratio |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for label in ("initial", "unchanged", "incremental", "restore"):
    vw, vc, vm = r[(label, "vaultik")]
    rw, rc, rm = r[(label, "restic")]
    print(f"| {label} | {vw:.2f} s | {rw:.2f} s | {vw/rw:.2f} | {corpus/1e6/vw:.0f} | {corpus/1e6/rw:.0f} | {vc:.1f} | {rc:.1f} | {vm/1024:.0f} MiB | {rm/1024:.0f} MiB | {vm/rm:.2f} |")
PY
