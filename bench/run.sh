#!/usr/bin/env bash
# Backup benchmark: vaultik against restic (Debian package) on the same corpora, in one
# run, on a journaled ext4 scratch image. Two corpora: "mixed" (small files and large
# ones) and "tiny" (many files of 0.1-1.5 KB, as in a mail folder or a source tree).
# For each, prints wall time, CPU time, throughput, peak RSS, repository size and the
# agent's local state for: initial backup, unchanged re-run, incremental after edits,
# full restore; each with the ratio vaultik / restic.
#
#   sudo bash bench/run.sh            # both corpora
#   CORPORA=tiny TINY_FILES=50000 sudo bash bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL_FILES=${SMALL_FILES:-100000}
LARGE_MB=${LARGE_MB:-640}
TINY_FILES=${TINY_FILES:-300000}
CORPORA=${CORPORA:-"mixed tiny"}
SCRATCH=${SCRATCH:-/var/tmp/vaultik-bench}

. bench/lib.sh
install_tools
build_vaultik
# Enough inodes for the tiny corpus, its restore and restic's.
mount_scratch "$SCRATCH" 16G -N 3000000

# corpus_mixed DIR: small files (a third incompressible) plus large ones.
corpus_mixed() {
echo "building corpus: $SMALL_FILES small files + $LARGE_MB MB of large files" >&2
python3 - "$1" "$SMALL_FILES" "$LARGE_MB" <<'PY'
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
}

# edit_mixed DIR: edits 1% of the small files and appends to two large ones.
edit_mixed() {
python3 - "$1" <<'PY'
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
}

# corpus_tiny DIR: TINY_FILES files of 100-1500 bytes in TINY_FILES/100 directories,
# one in ten incompressible, deterministic.
corpus_tiny() {
echo "building corpus: $TINY_FILES tiny files" >&2
python3 - "$1" "$TINY_FILES" <<'PY'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rnd = random.Random(7)
words = [("".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9)))).encode() for _ in range(20000)]
def text(size):
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rnd.choice(words) for _ in range(12)) + b"\n"
    return bytes(out[:size])
dirs = max(1, n // 100)
for i in range(n):
    d = os.path.join(root, f"d{i % dirs // 100:02d}", f"s{i % dirs:04d}")
    if i < dirs:
        os.makedirs(d, exist_ok=True)
    size = rnd.randint(100, 1500)
    data = rnd.randbytes(size) if i % 10 == 9 else text(size)
    with open(os.path.join(d, f"m{i:06d}.txt"), "wb") as f:
        f.write(data)
PY
}

# edit_tiny DIR: edits 1% of the files and adds as many.
edit_tiny() {
python3 - "$1" <<'PY'
import os, sys
root = sys.argv[1]
n = 0
for d, _, files in sorted(os.walk(root)):
    for f in sorted(files):
        n += 1
        if n % 100 == 0:
            with open(os.path.join(d, f), "ab") as h: h.write(b"edited\n")
            with open(os.path.join(d, "new-" + f), "wb") as h: h.write(b"new %d\n" % n)
PY
}


# measure LABEL TOOL cmd...: appends "label tool wall cpu rss_kb" to $R/results
measure() {
  local label=$1 tool=$2; shift 2
  sync
  /usr/bin/time -f "%e %U %S %M" -o "$R/t" "$@" > "$R/out.log" 2>&1 || { cat "$R/out.log" >&2; exit 1; }
  read -r wall user sys rss < "$R/t"
  echo "$label $tool $wall $(echo "$user + $sys" | bc) $rss" >> "$R/results"
}

# bench NAME: builds corpus NAME, runs both tools through the four runs, prints a table.
bench() {
  local name=$1
  R="$W/$name"; C="$R/corpus"
  mkdir -p "$R"
  "corpus_$name" "$C"
  local corpus_bytes files
  corpus_bytes=$(du -sb "$C" | cut -f1)
  files=$(find "$C" -type f | wc -l)
  warm() { find "$C" -type f -print0 | xargs -0 cat > /dev/null; }
  : > "$R/results"
  "$VAULTIK" keygen -o "$R/key.txt" 2>/dev/null
  local pub
  pub=$(sed -n 's/^# public key: //p' "$R/key.txt")
  printf 'source_dirs: [%s]\nage_recipient: %s\ndestination: file://%s/vrepo\nindex_path: %s/vstate/index.sqlite\n' \
    "$C" "$pub" "$R" "$R" > "$R/v.yaml"
  export RESTIC_PASSWORD=bench RESTIC_REPOSITORY="$R/rrepo"
  restic init -q >/dev/null
  run_both() {
    for tool in vaultik restic; do
      warm
      if [ $tool = vaultik ]; then measure "$1" vaultik "$VAULTIK" backup "$R/v.yaml" --cron
      else measure "$1" restic restic backup -q "$C"; fi
    done
  }
  run_both initial
  run_both unchanged
  "edit_$name" "$C"
  run_both incremental
  local vrepo rrepo vstate
  vrepo=$(du -sb "$R/vrepo" | cut -f1); rrepo=$(du -sb "$R/rrepo" | cut -f1)
  vstate=$(du -sb "$R/vstate" | cut -f1)
  VAULTIK_PRIVATE_KEY_FILE="$R/key.txt" measure restore vaultik "$VAULTIK" restore "file://$R/vrepo" "" latest "$R/vout" -q
  rm -rf "$R/vout"; sync; fstrim "$W" 2>/dev/null || true
  measure restore restic restic restore -q latest --target "$R/rout"
  python3 - "$R/results" "$name" "$corpus_bytes" "$files" "$vrepo" "$rrepo" "$vstate" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
name = sys.argv[2]
corpus, files, vrepo, rrepo, vstate = map(int, sys.argv[3:8])
r = {(a, b): (float(w), float(c), int(m)) for a, b, w, c, m in rows}
print(f"### corpus {name}: {files} files, {corpus/1e6:.0f} MB")
print()
print(f"repository after three runs: vaultik {vrepo/1e6:.1f} MB, restic {rrepo/1e6:.1f} MB (ratio {vrepo/rrepo:.2f}); "
      f"vaultik's local state {vstate/1e6:.1f} MB ({vstate/files:.0f} bytes per file)")
print()
print("| run | vaultik wall | restic wall | wall ratio | vaultik MB/s | restic MB/s | vaultik CPU s | restic CPU s | vaultik peak RSS | restic peak RSS | RSS ratio |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for label in ("initial", "unchanged", "incremental", "restore"):
    vw, vc, vm = r[(label, "vaultik")]
    rw, rc, rm = r[(label, "restic")]
    print(f"| {label} | {vw:.2f} s | {rw:.2f} s | {vw/rw:.2f} | {corpus/1e6/vw:.0f} | {corpus/1e6/rw:.0f} | {vc:.1f} | {rc:.1f} | {vm/1024:.0f} MiB | {rm/1024:.0f} MiB | {vm/rm:.2f} |")
print()
PY
  rm -rf "$R"; fstrim "$W" 2>/dev/null || true
}

for name in $CORPORA; do bench "$name"; done
