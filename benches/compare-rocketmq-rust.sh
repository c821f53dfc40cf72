#!/usr/bin/env bash
# Same-run produce comparison: the bundled broker against the rocketmq-rust 1.0.0 broker, loaded by
# `rocketmesh bench` with the same settings (4 connections, 64 and 1 in flight, 1 KiB, 10 s), with
# async flush and then sync flush. Needs, once (about 15 minutes on 2 cores):
#   cargo install --locked rocketmq-broker@1.0.0 rocketmq-namesrv@1.0.0
# Run from the repository root after `cargo build --release --locked`. Uses ports 19911, 20911,
# 29876 on loopback and scratch directories under $WORK (default: a new temporary directory).
set -euo pipefail
RM=${RM:-target/release/rocketmesh}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK/rmqhome/conf"
bench() { # target in-flight
  "$RM" bench --target "$1" --connections 4 --inflight "$2" --duration-secs 10 --json \
    produce --size 1024 --mode async 2>/dev/null | tail -1
}
run_ours() { # async|sync
  rm -rf "$WORK/ours"
  "$RM" broker --data-dir "$WORK/ours" --listen 127.0.0.1:19911 --flush "$1" >"$WORK/ours.log" 2>&1 &
  local pid=$!
  sleep 1
  echo "rocketmesh $1 4x64: $(bench 127.0.0.1:19911 64)"
  echo "rocketmesh $1 4x1:  $(bench 127.0.0.1:19911 1)"
  kill "$pid"; wait "$pid" || true
}
run_rust() { # ASYNC_FLUSH|SYNC_FLUSH
  rm -rf "$WORK/rmq-store"
  cat >"$WORK/rmqhome/conf/broker.properties" <<CONF
brokerClusterName=DefaultCluster
brokerName=rmq-rust-broker
brokerId=0
listenPort=20911
brokerIP1=127.0.0.1
namesrvAddr=127.0.0.1:29876
storePathRootDir=$WORK/rmq-store
autoCreateTopicEnable=true
flushDiskType=$1
CONF
  ROCKETMQ_HOME="$WORK/rmqhome" rocketmq-namesrv-rust --listenPort 29876 >"$WORK/namesrv.log" 2>&1 &
  local namesrv=$!
  sleep 2
  ROCKETMQ_HOME="$WORK/rmqhome" rocketmq-broker-rust -c "$WORK/rmqhome/conf/broker.properties" \
    >"$WORK/rust-broker.log" 2>&1 &
  local broker=$!
  sleep 8
  echo "rocketmq-rust $1 4x64: $(bench 127.0.0.1:20911 64)"
  echo "rocketmq-rust $1 4x1:  $(bench 127.0.0.1:20911 1)"
  kill "$broker" "$namesrv"; wait "$broker" "$namesrv" || true
}
date -u +%H:%M:%S
run_ours async; run_rust ASYNC_FLUSH; run_ours sync; run_rust SYNC_FLUSH
date -u +%H:%M:%S
