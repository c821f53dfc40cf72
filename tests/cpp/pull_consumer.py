"""Reads messages with the C++ client's pull consumer (PyPI rocketmq==0.4.4) for rocketmesh's tests.

    pull_consumer.py --namesrv HOST:PORT --topic T --group G --expect N --timeout-secs S
                     [--batch B] [--out FILE]

Fetches T's queues from the nameserver (FetchSubscriptionMessageQueues) and pulls every queue
from offset 0, keeping each queue's next offset itself, until N distinct bodies were read or S
seconds passed; queues are re-fetched each round, so queues that appear later are read too.
The loop is the wrapper's PullConsumer.pull() written out: pull() keeps its offsets in a class-wide
dict (so repeated calls do resume), but it retries a BROKER_TIMEOUT / OFFSET_ILLEGAL / NO_MATCHED_MSG
queue in a tight loop with no deadline, so a broker misbehaving there would hang it. Pull is a
non-blocking pull (no long polling) with the client's 10s network timeout. No offsets are
committed: the pull consumer of this client only reads.

Prints one JSON line:
    {"received": messages read, "distinct", "duplicates", "elapsed_ms", "rounds",
     "queues": {"broker/queue_id": {"next": next offset, "min", "max", "read"}},
     "statuses": {"FOUND": n, "NO_NEW_MSG": n, ...}, "errors": [first few],
     "messages": [{"body", "queue_id", "queue_offset", "keys", "msg_id"}...] (or to --out FILE)}
Exit code 0 when N distinct bodies were read, else 1 (3 if a pull hung past S + 5s).
"""

import argparse
import collections
import ctypes
import json
import os
import sys
import threading
import time

from rocketmq.client import PullConsumer, RecvMessage
from rocketmq.ffi import _CMessageQueue, _CPullStatus, dll
from rocketmq.exceptions import ffi_check


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
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    started = time.monotonic()
    messages, bodies, errors = [], set(), []
    queues = {}  # "broker/queue" -> {"next", "min", "max", "read"}
    statuses = collections.Counter()
    rounds = [0]
    lock = threading.Lock()

    def report(**extra):
        with lock:
            msgs = list(messages)
            out = {"received": len(msgs), "distinct": len(bodies),
                   "duplicates": len(msgs) - len(bodies),
                   "elapsed_ms": int((time.monotonic() - started) * 1000), "rounds": rounds[0],
                   "queues": {k: dict(v) for k, v in sorted(queues.items())},
                   "statuses": dict(statuses), "errors": list(errors)}
        if args.out:
            with open(args.out, "w") as f:
                json.dump(msgs, f)
            out["out"] = args.out
        else:
            out["messages"] = msgs
        out.update(extra)
        return out

    watchdog = threading.Timer(args.timeout_secs + 5, lambda: finish(report(timed_out=True), 3))
    watchdog.daemon = True
    watchdog.start()

    consumer = PullConsumer(args.group)
    consumer.set_namesrv_addr(args.namesrv)
    consumer.start()
    topic, expr = args.topic.encode(), b"*"
    deadline = started + args.timeout_secs
    while len(bodies) < args.expect and time.monotonic() < deadline:
        rounds[0] += 1
        mqs, size = ctypes.POINTER(_CMessageQueue)(), ctypes.c_int()
        try:
            ffi_check(dll.FetchSubscriptionMessageQueues(
                consumer._handle, topic, ctypes.pointer(mqs), ctypes.pointer(size)))
        except Exception as error:
            with lock:
                statuses["FETCH_QUEUES_FAILED"] += 1
                if len(errors) < 5:
                    errors.append(str(error))
            time.sleep(0.5)
            continue
        for i in range(size.value):
            mq = mqs[i]
            name = "%s/%d" % (mq.brokerName.decode(), mq.queueId)
            q = queues.setdefault(name, {"next": 0, "min": None, "max": None, "read": 0})
            while time.monotonic() < deadline:
                res_from = q["next"]
                res = dll.Pull(consumer._handle, ctypes.pointer(mq), expr, res_from, args.batch)
                status = _CPullStatus(res.pullStatus)
                with lock:
                    statuses[status.name] += 1
                    if status == _CPullStatus.BROKER_TIMEOUT:
                        err = dll.GetLatestErrorMessage()
                        if len(errors) < 5:
                            errors.append("%s: %s" % (name, text(err)))
                    else:
                        q.update(min=res.minOffset, max=res.maxOffset)
                        q["next"] = res.nextBeginOffset
                    for j in range(res.size if status == _CPullStatus.FOUND else 0):
                        m = RecvMessage(res.msgFoundList[j])
                        body = text(m.body)
                        messages.append({"body": body, "queue": name, "queue_id": m.queue_id,
                                         "queue_offset": m.queue_offset, "keys": text(m.keys),
                                         "msg_id": m.id})
                        bodies.add(body)
                        q["read"] += 1
                advanced = status != _CPullStatus.BROKER_TIMEOUT and res.nextBeginOffset > res_from
                dll.ReleasePullResult(res)
                if status != _CPullStatus.FOUND and not (
                        status == _CPullStatus.NO_MATCHED_MSG and advanced):
                    break  # this queue is drained (or failing) for this round
        dll.ReleaseSubscriptionMessageQueue(mqs)
        if len(bodies) < args.expect:
            time.sleep(0.2)

    closer = threading.Thread(target=consumer.shutdown, daemon=True)
    closer.start()
    closer.join(5)
    finish(report(), 0 if len(bodies) >= args.expect else 1)


if __name__ == "__main__":
    main()
