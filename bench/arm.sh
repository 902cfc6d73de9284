#!/usr/bin/env bash
# ARM figures: the aarch64 agent under qemu user emulation against the x86_64 agent run
# natively, both from cross/build.sh's `edge` profile, on the same corpus and to a
# local repository: backup wall time, throughput and peak RSS, as ratios. Then the
# aarch64 `vaultik agent` enrolled with a native controller: its idle RSS before and
# after a backup. Under qemu, RSS includes the emulator's own memory (an upper bound
# for a real board) and time includes emulation (a lower bound for one).
#
#   bash bench/arm.sh                 # 2000 small files + 128 MB
#   SMALL=500 LARGE_MB=32 bash bench/arm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL=${SMALL:-2000}
LARGE_MB=${LARGE_MB:-128}
command -v qemu-aarch64-static >/dev/null || { apt-get update -qq; apt-get install -y -qq qemu-user-static >/dev/null; }
[ -x /usr/bin/time ] || { apt-get update -qq; apt-get install -y -qq time >/dev/null; }
bash cross/build.sh aarch64-unknown-linux-musl x86_64-unknown-linux-musl >&2
cargo build --release --quiet -p controller
ARM="$PWD/target/aarch64-unknown-linux-musl/edge/vaultik"
X86="$PWD/target/x86_64-unknown-linux-musl/edge/vaultik"
W=$(mktemp -d /tmp/vaultik-arm-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

python3 - "$W/src" "$SMALL" "$LARGE_MB" <<'PY'
import os, random, sys
root, n, mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(7)
for i in range(n):
    d = os.path.join(root, "small", f"{i // 100:03d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(os.urandom(rnd.choice([300, 2000, 9000])))
os.makedirs(os.path.join(root, "large"), exist_ok=True)
for i in range(mb // 16):
    with open(os.path.join(root, "large", f"b{i}"), "wb") as f:
        f.write(os.urandom(16 << 20) if i % 2 else (b"text line of a log file\n" * 700000)[: 16 << 20])
PY
BYTES=$(du -sb "$W/src" | cut -f1)
"$X86" keygen -o "$W/key.txt" 2>/dev/null
PUB=$(sed -n 's/^# public key: //p' "$W/key.txt")

# run NAME CMD...: a first backup into a fresh repository; prints "wall_s rss_kb".
run() {
  local name=$1; shift
  mkdir -p "$W/$name"
  cat > "$W/$name/c.yaml" <<YAML
source_dirs: [$W/src]
age_recipient: $PUB
destination: file://$W/$name/repo
index_path: $W/$name/state/index.sqlite
YAML
  /usr/bin/time -f "%e %M" -o "$W/$name/time" "$@" backup "$W/$name/c.yaml" --cron
  cat "$W/$name/time"
}
cat "$W/src"/*/* "$W/src"/*/*/* > /dev/null 2>&1 || true
read -r x_wall x_rss < <(run native "$X86")
read -r a_wall a_rss < <(run qemu qemu-aarch64-static "$ARM")
mbps() { echo "scale=1; $BYTES / 1048576 / $1" | bc; }
echo "corpus: $((BYTES / 1048576)) MiB, $SMALL small files"
echo "| run | wall | MB/s | peak RSS |"
echo "|---|---|---|---|"
echo "| x86_64 native | ${x_wall} s | $(mbps "$x_wall") | $((x_rss / 1024)) MiB |"
echo "| aarch64 under qemu | ${a_wall} s | $(mbps "$a_wall") | $((a_rss / 1024)) MiB |"
echo "| ratio aarch64/x86_64 | $(echo "scale=2; $a_wall / $x_wall" | bc) | $(echo "scale=2; $x_wall / $a_wall" | bc) | $(echo "scale=2; $a_rss / $x_rss" | bc) |"

# The aarch64 daemon, enrolled with a native controller.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
HTTPS=$(port); MQTT=$(port)
PATH="$PATH:/usr/sbin" target/release/vaultik-controller --data "$W/ctl" serve \
  --listen-https "127.0.0.1:$HTTPS" --listen-mqtt "127.0.0.1:$MQTT" 2>"$W/ctl.log" &
PIDS+=($!)
sleep 3
ctl() { target/release/vaultik-controller --data "$W/ctl" "$@"; }
mkdir -p "$W/agent"
cat > "$W/agent/c.yaml" <<YAML
source_dirs: [$W/src/small]
age_recipient: $PUB
destination: file://$W/agent/repo
index_path: $W/agent/state/index.sqlite
YAML
qemu-aarch64-static "$ARM" enroll --controller "https://127.0.0.1:$HTTPS" --token "$(ctl token create 2>/dev/null)" \
  --config "$W/agent/c.yaml" --name pi 2>/dev/null
qemu-aarch64-static "$ARM" agent "$W/agent/c.yaml" >/dev/null 2>"$W/agent/log" &
AGENT=$!; PIDS+=("$AGENT")
ID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["agent_id"])' "$W/agent/state/link/link.json")
rss() { awk '/^VmRSS/ {print $2}' "/proc/$AGENT/status"; }
sleep 15; before=$(rss)
ctl run-backup "$ID" >/dev/null
for _ in $(seq 120); do
  [ "$(sqlite3 "$W/ctl/controller.sqlite" "SELECT count(*) FROM snapshots WHERE agent = '$ID'")" = 1 ] && break
  sleep 1
done
sleep 15; after=$(rss)
echo "aarch64 vaultik agent idle RSS under qemu: $((before / 1024)) MiB before its first backup, $((after / 1024)) MiB after it"
