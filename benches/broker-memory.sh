#!/usr/bin/env bash
# Broker memory and restart time with many stored messages (issue 11 item 6).
# Usage: benches/broker-memory.sh [BINARY] [MESSAGES]
# Prints the RSS of an empty broker, then fills a data directory with MESSAGES 16-byte messages
# through `rocketmesh bench produce`, restarts the broker (SIGTERM, then start again) and prints
# the time until it logs that it is ready and its RSS right after the restart.
set -euo pipefail
BIN=${1:-target/release/rocketmesh}
MESSAGES=${2:-5000000}
PORT=${PORT:-19876}
# KEEP=DIR fills DIR (or reuses it when it already holds a commit log) and leaves it in place.
DATA=${KEEP:-$(mktemp -d /tmp/broker-memory.XXXXXX)}
mkdir -p "$DATA"
PID=
STARTS=0
: >"$DATA.log"
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; [ -n "${KEEP:-}" ] || rm -rf "$DATA"; rm -f "$DATA.log"' EXIT

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
now_ms() { date +%s%3N; }
start() {
  "$BIN" broker --data-dir "$DATA" --listen "127.0.0.1:$PORT" >>"$DATA.log" 2>&1 &
  PID=$!
  local began; began=$(now_ms)
  STARTS=$((STARTS + 1))
  # The port is bound before the store opens, so wait for the ready line; at most 60 s.
  for _ in $(seq 1 6000); do
    if [ "$(grep -c 'broker ready' "$DATA.log")" -ge "$STARTS" ]; then
      STARTED_MS=$(( $(now_ms) - began ))
      return
    fi
    sleep 0.01
  done
  echo "broker did not listen within 60 s" >&2
  exit 1
}
stop() { kill -TERM "$PID"; wait "$PID" || true; PID=; }

if [ ! -d "$DATA/commitlog" ]; then
  start; sleep 1
  echo "empty: started in ${STARTED_MS} ms, VmRSS $(rss_kb "$PID") kB"
  "$BIN" bench --target "127.0.0.1:$PORT" --connections 4 --inflight 64 --count "$MESSAGES" \
    --duration-secs 3600 produce --size 16 | tail -n 4
  echo "filled: VmRSS $(rss_kb "$PID") kB, data $(du -sh "$DATA" | cut -f1)"
  stop
fi
start
echo "restart with $(du -sh "$DATA" | cut -f1) of data: ready after ${STARTED_MS} ms, VmRSS $(rss_kb "$PID") kB"
sleep 1
echo "1 s later: VmRSS $(rss_kb "$PID") kB"
stop
