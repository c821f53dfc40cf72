"""Receives messages with the C++ client's push consumer (PyPI rocketmq==0.4.4) for rocketmesh's tests.

    push_consumer.py --namesrv HOST:PORT --topic T --group G --expect N --timeout-secs S
                     [--instance NAME] [--orderly] [--quiet-secs Q] [--threads T] [--out FILE]

Subscribes to T ("*") in clustering mode and records every delivery in the order the callback saw
it. Stops at the first of:
  - N distinct bodies seen (the whole expected set, e.g. a single member);
  - Q seconds (default 3) without a new delivery, once at least one arrived. Several members of
    one group (different --instance names) can run at once this way: each stops soon after the
    group as a whole ran dry, and the caller checks the union and the duplicates;
  - S seconds after start.
Then it shuts the consumer down (which commits its offsets) and prints one JSON line:
    {"instance", "received": deliveries, "distinct": distinct bodies, "duplicates": deliveries of
     an already-seen body, "stopped": "expect"|"quiet"|"timeout", "first_ms": ms from start() to
     the first delivery, "last_ms", "elapsed_ms", "queues": {queue_id: deliveries},
     "messages": [{"body", "queue_id", "queue_offset", "keys", "msg_id", "reconsume_times",
                   "thread"}...] in receipt order}
With --out FILE the "messages" list goes to FILE (as one JSON array) instead of stdout.
--orderly makes it an orderly consumer (PushConsumer(group, orderly=True)): the client locks each
queue at the broker and hands its messages over one at a time, so per-queue (per-key) order in
"messages" is the order of consumption.
The C++ client's id is IP@instance; without --instance it would be IP@pid (the client default).
Exit code 0 when it stopped by "expect", or by "quiet" with at least one message; 1 otherwise;
3 if shutdown hung past S + 5s (the JSON so far is printed first, with "timed_out": true).
"""

import argparse
import collections
import json
import os
import sys
import threading
import time

from rocketmq.client import PushConsumer


def finish(result, code):
    """Prints the one JSON line and leaves at once (no C++ destructors at interpreter exit)."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(code)


def text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--namesrv", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--expect", type=int, required=True)
    p.add_argument("--timeout-secs", type=float, default=60)
    p.add_argument("--quiet-secs", type=float, default=3)
    p.add_argument("--instance", default=None)
    p.add_argument("--orderly", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    messages, bodies = [], set()
    cond = threading.Condition()
    started = time.monotonic()
    first, last = [None], [None]

    def ms(t):
        return None if t is None else int((t - started) * 1000)

    def report(stopped, **extra):
        with cond:
            msgs = list(messages)
        distinct = len({m["body"] for m in msgs})
        out = {"instance": args.instance, "group": args.group, "orderly": args.orderly,
               "received": len(msgs), "distinct": distinct, "duplicates": len(msgs) - distinct,
               "stopped": stopped, "first_ms": ms(first[0]), "last_ms": ms(last[0]),
               "elapsed_ms": ms(time.monotonic()),
               "queues": dict(collections.Counter(str(m["queue_id"]) for m in msgs))}
        if args.out:
            with open(args.out, "w") as f:
                json.dump(msgs, f)
            out["out"] = args.out
        else:
            out["messages"] = msgs
        out.update(extra)
        return out

    def on_message(msg):
        record = {"body": text(msg.body), "queue_id": msg.queue_id,
                  "queue_offset": msg.queue_offset, "keys": text(msg.keys), "msg_id": msg.id,
                  "reconsume_times": msg.reconsume_times,
                  "thread": threading.get_ident() % 100000}
        with cond:
            now = time.monotonic()
            first[0] = first[0] or now
            last[0] = now
            messages.append(record)
            bodies.add(record["body"])
            cond.notify_all()

    consumer = PushConsumer(args.group, orderly=args.orderly)
    consumer.set_namesrv_addr(args.namesrv)
    if args.instance:
        consumer.set_instance_name(args.instance)
    consumer.set_thread_count(args.threads)
    consumer.set_message_batch_max_size(1)
    consumer.subscribe(args.topic, on_message)
    consumer.start()

    deadline = started + args.timeout_secs
    stopped = "timeout"
    with cond:
        while True:
            now = time.monotonic()
            if len(bodies) >= args.expect:
                stopped = "expect"
                break
            if last[0] is not None and now - last[0] >= args.quiet_secs:
                stopped = "quiet"
                break
            if now >= deadline:
                break
            cond.wait(timeout=0.1)

    watchdog = threading.Timer(5, lambda: finish(report(stopped, timed_out=True), 3))
    watchdog.daemon = True
    watchdog.start()
    consumer.shutdown()
    ok = stopped == "expect" or (stopped == "quiet" and messages)
    finish(report(stopped), 0 if ok else 1)


if __name__ == "__main__":
    main()
