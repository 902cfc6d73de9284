#!/usr/bin/env bash
# Fleet benchmark: one controller (with the mosquitto it supervises) under simulated
# agents on 127.0.0.1, and the idle footprint of a real `vaultik agent`.
#
#   bash bench/fleet.sh                  # 1000 agents, 32 events each, 30 s heartbeats, 180 s soak
#   AGENTS=200 SOAK=60 bash bench/fleet.sh
#
# Every agent is enrolled for real (`vaultik enroll`: token, CSR, certificate), then
# `fleet_load` connects them all over mTLS, sends EVENTS job events per agent in
# acknowledged batches of 16, and heartbeats every HEARTBEAT seconds for SOAK seconds.
# Prints the controller's and the broker's RSS every 10 s (flat means no growth) and
# their peaks. The reference is the broker itself: the controller's memory as a ratio
# to mosquitto's, both measured in this run.
set -euo pipefail
cd "$(dirname "$0")/.."
AGENTS=${AGENTS:-1000}
EVENTS=${EVENTS:-32}
HEARTBEAT=${HEARTBEAT:-30}
SOAK=${SOAK:-180}

command -v mosquitto >/dev/null 2>&1 || PATH="$PATH:/usr/sbin"
command -v mosquitto >/dev/null 2>&1 || { apt-get update -qq; apt-get install -y -qq mosquitto >/dev/null; }
cargo build --release --quiet -p edge-agent -p controller --bins --example fleet_load
BIN="$PWD/target/release"
W=$(mktemp -d /tmp/vaultik-fleet-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] && echo "kept $W" >&2 && return
  rm -rf "$W"
}
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
HTTPS=$(port); MQTT=$(port)
ctl() { "$BIN/vaultik-controller" --data "$W/ctl" "$@"; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
mib() { echo "scale=1; $1 / 1024" | bc; }

VAULTIK_LOG=info "$BIN/vaultik-controller" --data "$W/ctl" serve \
  --listen-https "127.0.0.1:$HTTPS" --listen-mqtt "127.0.0.1:$MQTT" 2>"$W/controller.log" &
CTL=$!; PIDS+=("$CTL")
for _ in $(seq 100); do
  [ -s "$W/ctl/broker/mosquitto.pid" ] && grep -q "link up\|connected to the broker" "$W/controller.log" 2>/dev/null && break
  sleep 0.2
done
BROKER=$(cat "$W/ctl/broker/mosquitto.pid")
echo "controller pid $CTL, broker pid $BROKER; idle: controller $(mib "$(rss_kb "$CTL")") MiB, broker $(mib "$(rss_kb "$BROKER")") MiB" >&2

echo "enrolling $AGENTS agents" >&2
mkdir -p "$W/agents"
t0=$(date +%s.%N)
for i in $(seq "$AGENTS"); do
  tok=$(ctl token create --valid-for 1h)
  "$BIN/vaultik" enroll --controller "https://127.0.0.1:$HTTPS" --token "$tok" \
    --state-dir "$W/agents/$i" --name "load-$i" >/dev/null
done
printf "enrolled in %.1f s\n" "$(echo "$(date +%s.%N) - $t0" | bc)" >&2

( while kill -0 "$CTL" 2>/dev/null; do
    echo "rss t=$(date +%s) controller=$(rss_kb "$CTL") broker=$(rss_kb "$BROKER")"
    sleep 10
  done ) > "$W/rss.log" &
PIDS+=($!)
"$BIN/examples/fleet_load" "$W/agents" "$MQTT" "$EVENTS" "$HEARTBEAT" "$SOAK" | tee "$W/load.out"
stored=$(sqlite3 "$W/ctl/controller.sqlite" "SELECT count(*) FROM events" 2>/dev/null || echo "?")
echo "events stored at the controller: $stored"
echo "controller RSS during the run (KiB, every 10 s):"
awk '{print $3}' "$W/rss.log" | sed 's/controller=//' | tr '\n' ' '; echo
echo "broker RSS during the run (KiB, every 10 s):"
awk '{print $4}' "$W/rss.log" | sed 's/broker=//' | tr '\n' ' '; echo
C_PEAK=$(hwm_kb "$CTL"); B_PEAK=$(hwm_kb "$BROKER")
echo "peak RSS: controller $(mib "$C_PEAK") MiB, broker $(mib "$B_PEAK") MiB, ratio $(echo "scale=2; $C_PEAK / $B_PEAK" | bc)"

# A real agent: one backup, then idle.
echo "idle agent" >&2
mkdir -p "$W/one/src"
for i in $(seq 200); do head -c 4096 /dev/urandom > "$W/one/src/f$i"; done
cat > "$W/one/agent.yaml" <<YAML
source_dirs: [$W/one/src]
age_recipient: age1dt9fd0f6ces2mkxh02yfuz7w7xauncwptqdtdkxseczm5f2ff5lscn5a5x
destination: file://$W/one/repo
index_path: $W/one/state/index.sqlite
YAML
"$BIN/vaultik" enroll --controller "https://127.0.0.1:$HTTPS" --token "$(ctl token create)" \
  --config "$W/one/agent.yaml" --name idle >/dev/null
"$BIN/vaultik" agent "$W/one/agent.yaml" >/dev/null 2>"$W/one/agent.log" &
AGENT=$!; PIDS+=("$AGENT")
ID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["agent_id"])' "$W/one/state/link/link.json")
sleep 15
before=$(rss_kb "$AGENT")
ctl run-backup "$ID" >/dev/null
for _ in $(seq 60); do
  [ "$(sqlite3 "$W/ctl/controller.sqlite" "SELECT count(*) FROM snapshots WHERE agent = '$ID'")" = 1 ] && break
  sleep 1
done
sleep 15
after=$(rss_kb "$AGENT")
echo "vaultik agent idle RSS: $(mib "$before") MiB before its first backup, $(mib "$after") MiB after it (peak $(mib "$(hwm_kb "$AGENT")") MiB); target < 16 MiB"
