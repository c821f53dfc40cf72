"""Sends messages with the Apache RocketMQ C++ client (PyPI rocketmq==0.4.4) for rocketmesh's tests.

    producer.py --namesrv HOST:PORT --topic T --count N --mode sync|async|oneway|orderly
                [--group G] [--keys K] [--prefix P] [--send-timeout-ms MS] [--timeout-secs S]

Message i has the body "P-i" and the keys property "P-i". With --mode orderly, message i belongs
to sharding key k = i % K and is the seq = i // K -th message of that key: its body is "P-k-seq",
its keys property "key-k", and it goes out through send_orderly(msg, k), whose selector picks
queue k % (number of queues the client sees); the selector's choices are reported.

Prints one JSON line on stdout, then exits 0 only if every send succeeded (oneway: every call
returned without an exception):
    {"mode", "sent", "failed", "errors": [first few], "elapsed_ms",
     "results": [{"i", "msg_id", "offset"}...]            (sync, orderly: from the send result)
     "queues": {"k": [queue ids chosen]}, "queue_count": n (orderly)}
The client logs to $HOME/logs/rocketmq-cpp/<pid>_rocketmq-cpp.log.* (only HOME moves it).
Every wait is bounded: if the run outlives --timeout-secs (+5s for shutdown), the JSON so far is
printed with "timed_out": true and the process exits 3.
"""

import argparse
import json
import os
import sys
import threading
import time

from rocketmq.client import Message, Producer

state = {"sent": 0, "failed": 0, "errors": []}
lock = threading.Lock()


def finish(result, code):
    """Prints the one JSON line and leaves at once (no C++ destructors at interpreter exit)."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(code)


def failed(error):
    with lock:
        state["failed"] += 1
        if len(state["errors"]) < 5:
            state["errors"].append(str(error))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--namesrv", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--group", default="cpp_producer_group")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--mode", choices=["sync", "async", "oneway", "orderly"], default="sync")
    p.add_argument("--keys", type=int, default=8)
    p.add_argument("--prefix", default="m")
    p.add_argument("--send-timeout-ms", type=int, default=5000)
    p.add_argument("--timeout-secs", type=float, default=120)
    args = p.parse_args()

    started = time.monotonic()
    results, queues, queue_count = [], {}, [0]

    def report(**extra):
        with lock:
            out = {"mode": args.mode, "sent": state["sent"], "failed": state["failed"],
                   "errors": list(state["errors"]),
                   "elapsed_ms": int((time.monotonic() - started) * 1000)}
        if args.mode in ("sync", "orderly"):
            out["results"] = list(results)
        if args.mode == "orderly":
            out["queues"] = {str(k): sorted(v) for k, v in sorted(queues.items())}
            out["queue_count"] = queue_count[0]
        out.update(extra)
        return out

    watchdog = threading.Timer(args.timeout_secs + 5, lambda: finish(report(timed_out=True), 3))
    watchdog.daemon = True
    watchdog.start()

    def selector(key):
        """The wrapper's hashing selector (key % queues), recording what it chose."""
        def select(mq_size, _msg, _arg):
            queue_count[0] = mq_size
            queues.setdefault(key, set()).add(key % mq_size)
            return key % mq_size
        return select

    producer = Producer(args.group)
    producer.set_namesrv_addr(args.namesrv)
    producer.set_timeout(args.send_timeout_ms)
    producer.start()
    done = threading.Semaphore(0)

    def on_success(_result):
        with lock:
            state["sent"] += 1
        done.release()

    def on_exception(error):
        failed(error)
        done.release()

    issued = 0
    deadline = started + args.timeout_secs
    for i in range(args.count):
        if time.monotonic() > deadline:
            failed("stopped: --timeout-secs reached before message %d" % i)
            break
        msg = Message(args.topic)
        if args.mode == "orderly":
            key, seq = i % args.keys, i // args.keys
            msg.set_keys("key-%d" % key)
            msg.set_body("%s-%d-%d" % (args.prefix, key, seq))
        else:
            msg.set_keys("%s-%d" % (args.prefix, i))
            msg.set_body("%s-%d" % (args.prefix, i))
        try:
            if args.mode in ("sync", "orderly"):
                if args.mode == "sync":
                    res = producer.send_sync(msg)
                else:
                    res = producer.send_orderly(msg, key, queue_selector=selector(key))
                results.append({"i": i, "msg_id": res.msg_id, "offset": res.offset,
                                "status": int(res.status)})
                if int(res.status) == 0:
                    with lock:
                        state["sent"] += 1
                else:
                    failed("message %d: send status %s" % (i, res.status.name))
            elif args.mode == "oneway":
                producer.send_oneway(msg)
                with lock:
                    state["sent"] += 1
            else:
                producer.send_async(msg, on_success, on_exception)
                issued += 1
        except Exception as error:  # every failure is counted and reported, never raised
            failed("message %d: %s" % (i, error))

    if args.mode == "async":
        for _ in range(issued):
            if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
                failed("callbacks still missing at --timeout-secs")
                break
    closer = threading.Thread(target=producer.shutdown, daemon=True)
    closer.start()
    closer.join(5)
    out = report()
    finish(out, 0 if out["sent"] == args.count and out["failed"] == 0 else 1)


if __name__ == "__main__":
    main()
