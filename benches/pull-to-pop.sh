#!/usr/bin/env bash
# Pull→POP cost, measured in one run (issue 12): `rocketmesh bench consume --mode pull` straight to
# a bundled broker, through a sidecar that forwards pulls (consume.mode: pull), and through one
# that converts them into POP (consume.mode: auto). Each target reads the same stored messages
# with its own consumer group, registered by heartbeat like a push consumer, committing with the
# pull's commit flag, for SECONDS from a backlog of MESSAGES large enough that no run drains it
# (start-up and the drained tail would otherwise dominate). Prints throughput, p99 and CPU per
# message per target, and the conversion's ratio to native pull through the sidecar.
# Usage: benches/pull-to-pop.sh [BINARY] [MESSAGES] [SECONDS]
set -euo pipefail
BIN=${1:-target/release/rocketmesh}
MESSAGES=${2:-1000000}
SECONDS_PER_RUN=${3:-6}
BASE=${PORT:-19900}
BROKER=127.0.0.1:$BASE
FORWARDING=127.0.0.1:$((BASE + 1))
CONVERTING=127.0.0.1:$((BASE + 2))
TOPIC=PullPopBench
DIR=$(mktemp -d /tmp/pull-to-pop.XXXXXX)
PIDS=()
trap 'for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT

wait_for_port() {
  for _ in $(seq 1 600); do
    if (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; then return; fi
    sleep 0.05
  done
  echo "nothing listens on $1" >&2
  exit 1
}

sidecar() { # address mode
  cat >"$DIR/sidecar-$2.yaml" <<EOF
listeners: [{ address: "$1" }]
admin: { address: null }
consume: { mode: $2 }
routes:
  - { match: { topic: { prefix: "" } }, route: { cluster: local } }
clusters:
  - name: local
    endpoints:
      - { address: "$BROKER", metadata: { broker_name: broker-a, cluster_name: DefaultCluster } }
EOF
  "$BIN" sidecar --config "$DIR/sidecar-$2.yaml" >"$DIR/sidecar-$2.log" 2>&1 &
  PIDS+=($!)
  eval "SIDECAR_$2=$!"
  wait_for_port "$1"
}

"$BIN" broker --data-dir "$DIR/broker" --listen "$BROKER" --broker-name broker-a >"$DIR/broker.log" 2>&1 &
PIDS+=($!)
BROKER_PID=$!
wait_for_port "$BROKER"
sidecar "$FORWARDING" pull
sidecar "$CONVERTING" auto

"$BIN" bench --target "$BROKER" --topic "$TOPIC" --connections 4 --inflight 64 \
  --count "$MESSAGES" --duration-secs 300 produce --size 1024 >/dev/null

# CPU seconds (user + system) a process has used so far.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$1/stat"; }

LINES=()
run() { # label target group proxy-pid
  local broker_before proxy_before json
  broker_before=$(cpu "$BROKER_PID")
  proxy_before=$([ -n "$4" ] && cpu "$4" || echo 0)
  json=$("$BIN" bench --target "$2" --topic "$TOPIC" --connections 4 --count "$MESSAGES" \
    --duration-secs "$SECONDS_PER_RUN" --json consume --mode pull --group "$3")
  local messages rate p99 broker_us proxy_us
  messages=$(sed -E 's/.*"messages":([0-9]+).*/\1/' <<<"$json")
  rate=$(sed -E 's/.*"msgs_per_sec":([0-9.]+).*/\1/' <<<"$json")
  p99=$(sed -E 's/.*"p99":([0-9]+).*/\1/' <<<"$json")
  broker_us=$(awk -v a="$broker_before" -v b="$(cpu "$BROKER_PID")" -v n="$messages" 'BEGIN { printf "%.2f", (b - a) * 1e6 / n }')
  proxy_us=$(awk -v a="$proxy_before" -v b="$([ -n "$4" ] && cpu "$4" || echo 0)" -v n="$messages" 'BEGIN { printf "%.2f", (b - a) * 1e6 / n }')
  LINES+=("$(printf '%-30s %8.0f msgs/s  p99 %6d µs  CPU/msg: broker %5s µs, sidecar %5s µs' "$1" "$rate" "$p99" "$broker_us" "$proxy_us")")
  RATE=$rate
}

run "pull straight to the broker" "$BROKER" bench_direct ""
direct=$RATE
run "pull through the sidecar" "$FORWARDING" bench_native "$SIDECAR_pull"
native=$RATE
run "pull→POP through the sidecar" "$CONVERTING" bench_converted "$SIDECAR_auto"
converted=$RATE
echo "consume for ${SECONDS_PER_RUN} s from $MESSAGES stored 1 KiB messages, 4 connections, one pull per queue in flight:"
printf '%s\n' "${LINES[@]}"
awk -v c="$converted" -v n="$native" -v d="$direct" 'BEGIN {
  printf "conversion / native pull through the sidecar: %.2fx (target >= 0.8x); native through the sidecar / direct: %.2fx\n", c / n, n / d
}'
