"""Drives the Apache RocketMQ C++ client 2.x (PyPI rocketmq==0.4.4) for rocketmesh's tests.

    client.py produce --namesrv ADDR --topic T --count N --mode sync|async|oneway|orderly [--keys K]
    client.py push    --namesrv ADDR --topic T --group G --expect N [--orderly] [--instance NAME]
    client.py pull    --namesrv ADDR --topic T --group G --expect N
    client.py stream  --namesrv ADDR --topic T --group G [--fail-prefix P] [--broadcasting]

`stream` runs a push consumer until its standard input closes, printing "got <body> <reconsume
times> <queue id>:<queue offset>" for each delivery as it happens and answering "reconsume later" for bodies that start with
--fail-prefix; the other commands print one JSON object on its last line of standard output and exits 0 when it did
what it was asked. Every wait is bounded by --timeout-secs. Message bodies are "<prefix>-<i>";
orderly sends use key i % K and the body "<prefix>-<key>-<seq>".

An orderly send is tried once by the C++ client (retry_times=0) and retried here, up to
ORDERLY_ATTEMPTS times in all, to the same queue: the C++ client's own retry of a failed orderly send
picks another queue (its sendAutoRetrySelectImpl), which breaks the key's order. An early send can
fail without reaching a broker: the client's first heartbeat holds its connection table while it
connects, a send waits only 3 ms for it ("GetTransport of:... get timed_mutex timeout" in its log),
and the send fails with the misleading "No route info of this topic". The same happens whenever
one of its timers (heartbeat, route update) holds that table and is descheduled on a busy machine,
so a retry waits a little longer each time (ORDERLY_BACKOFF_SECS) instead of failing again at once.
"""

import argparse
import ctypes
import json
import os
import sys
import threading
import time

from rocketmq.client import Message, MessageModel, Producer, PullConsumer, PushConsumer, RecvMessage
from rocketmq.exceptions import ffi_check
from rocketmq.ffi import _CConsumeStatus, _CMessageQueue, _CPullStatus, dll

ORDERLY_ATTEMPTS = 5
ORDERLY_BACKOFF_SECS = 0.05


def shut_down(consumer, limit_secs=5.0):
    """Shuts a consumer down, waiting at most `limit_secs`: the C++ client can wait on a pull the
    broker holds for its whole suspend time. The result is printed before this runs."""
    worker = threading.Thread(target=consumer.shutdown, daemon=True)
    worker.start()
    worker.join(limit_secs)


def produce(args):
    producer = Producer(args.group)
    producer.set_namesrv_addr(args.namesrv)
    producer.set_timeout(10000)
    producer.start()
    sent, failed, errors, retried = 0, 0, [], 0
    done = threading.Semaphore(0)
    lock = threading.Lock()
    counts = {"ok": 0, "failed": 0}
    for i in range(args.count):
        msg = Message(args.topic)
        if args.mode == "orderly":
            key = i % args.keys
            seq = i // args.keys
            msg.set_keys("key-%d" % key)
            msg.set_body("%s-%d-%d" % (args.prefix, key, seq))
        else:
            msg.set_keys("%s-%d" % (args.prefix, i))
            msg.set_body("%s-%d" % (args.prefix, i))
        try:
            if args.mode == "sync":
                result = producer.send_sync(msg)
                if int(result.status) == 0:
                    sent += 1
                else:
                    failed += 1
            elif args.mode == "orderly":
                for attempt in range(ORDERLY_ATTEMPTS):
                    try:
                        result = producer.send_orderly(msg, key, retry_times=0)
                        break
                    except Exception as error:  # noqa: BLE001 - retried, then reported
                        if attempt + 1 == ORDERLY_ATTEMPTS:
                            raise
                        retried += 1
                        errors.append("retried: %s" % error)
                        time.sleep(ORDERLY_BACKOFF_SECS * (attempt + 1))
                if int(result.status) == 0:
                    sent += 1
                else:
                    failed += 1
            elif args.mode == "oneway":
                producer.send_oneway(msg)
                sent += 1
            else:

                def on_success(_result):
                    with lock:
                        counts["ok"] += 1
                    done.release()

                def on_exception(error):
                    with lock:
                        counts["failed"] += 1
                        errors.append(str(error))
                    done.release()

                producer.send_async(msg, on_success, on_exception)
        except Exception as error:  # noqa: BLE001 - every failure is reported, not raised
            failed += 1
            errors.append(str(error))
    if args.mode == "async":
        deadline = time.time() + args.timeout_secs
        for _ in range(args.count - failed):
            if not done.acquire(timeout=max(0.0, deadline - time.time())):
                break
        with lock:
            sent, failed = counts["ok"], failed + counts["failed"]
    # The C++ client 2.x can abort (boost::thread_interrupted) when shut down while its scheduled
    # route update runs (first about 3 s after start), losing the result. Every sync, orderly and
    # async send was answered, so the process just exits (os._exit) with its connections; oneway
    # sends are answered by nothing, and the shutdown's unregister requests, which follow them on
    # the same connections, show they left.
    if args.mode == "oneway":
        producer.shutdown()
    print(
        json.dumps(
            {"mode": args.mode, "sent": sent, "failed": failed, "retried": retried, "errors": errors[:5]}
        )
    )
    return 0 if sent == args.count else 1


def push(args):
    consumer = PushConsumer(args.group, orderly=args.orderly)
    consumer.set_namesrv_addr(args.namesrv)
    consumer.set_instance_name(args.instance)
    consumer.set_thread_count(1)
    consumer.set_message_batch_max_size(1)
    received = []
    lock = threading.Lock()
    arrived = threading.Condition(lock)
    stopping = threading.Event()

    def on_message(msg):
        if stopping.is_set():
            # Not reported, so never acknowledged either: hold it until the process exits.
            stopping.wait()
            time.sleep(3600)
        with lock:
            received.append(
                {
                    "body": msg.body.decode("utf-8"),
                    "queue_id": msg.queue_id,
                    "queue_offset": msg.queue_offset,
                    "reconsume_times": msg.reconsume_times,
                }
            )
            arrived.notify_all()

    consumer.subscribe(args.topic, on_message)
    consumer.start()
    deadline = time.time() + args.timeout_secs
    quiet_since = time.time()
    # Runs until the group as a whole could be done: --expect distinct bodies here, or (for a
    # member sharing the work) no new message for --quiet-secs after the first one.
    with lock:
        while time.time() < deadline:
            seen = len(received)
            if len({m["body"] for m in received}) >= args.expect:
                break
            arrived.wait(timeout=0.2)
            if len(received) != seen:
                quiet_since = time.time()
            elif received and time.time() - quiet_since > args.quiet_secs:
                break
        stopping.set()
        bodies = [m["body"] for m in received]
        print(
            json.dumps(
                {
                    "instance": args.instance,
                    "received": len(bodies),
                    "distinct": len(set(bodies)),
                    "messages": received,
                }
            ),
            flush=True,
        )
    shut_down(consumer)
    return 0


def stream(args):
    model = MessageModel.BROADCASTING if args.broadcasting else MessageModel.CLUSTERING
    consumer = PushConsumer(args.group, orderly=args.orderly, message_model=model)
    consumer.set_namesrv_addr(args.namesrv)
    consumer.set_instance_name(args.instance)
    consumer.set_thread_count(2)
    consumer.set_message_batch_max_size(1)
    lock = threading.Lock()

    # The binding's own subscribe() turns a raised exception into "success"; this callback
    # returns the status itself.
    def on_message(_consumer, handle):
        msg = RecvMessage(handle)
        body = msg.body.decode("utf-8")
        with lock:
            sys.stdout.write(
                "got %s %d %d:%d\n" % (body, msg.reconsume_times, msg.queue_id, msg.queue_offset)
            )
            sys.stdout.flush()
        if args.fail_prefix and body.startswith(args.fail_prefix):
            return _CConsumeStatus.RECONSUME_LATER.value
        return _CConsumeStatus.CONSUME_SUCCESS.value

    dll.Subscribe(consumer._handle, args.topic.encode("utf-8"), b"*")
    consumer._register_callback(on_message)
    consumer.start()
    sys.stdout.write("started\n")
    sys.stdout.flush()
    sys.stdin.read()
    shut_down(consumer)
    return 0


def pull_once(consumer, topic, offsets, max_num=32):
    """One pass over every queue of `topic` from the offsets in `offsets`, to each queue's end:
    the (body, queue id) of each message. As the binding's PullConsumer.pull, except that offsets
    are kept by broker and queue: the binding keeps them by topic and queue id alone, so queue 0 of
    broker-a and queue 0 of broker-b would share one."""
    found = []
    queues = ctypes.POINTER(_CMessageQueue)()
    size = ctypes.c_int()
    ffi_check(
        dll.FetchSubscriptionMessageQueues(
            consumer._handle, topic.encode("utf-8"), ctypes.pointer(queues), ctypes.pointer(size)
        )
    )
    try:
        for i in range(int(size.value)):
            queue = queues[i]
            key = (queue.brokerName, queue.queueId)
            while True:
                before = offsets.get(key, 0)
                result = dll.Pull(
                    consumer._handle,
                    ctypes.pointer(queue),
                    b"*",
                    ctypes.c_longlong(before),
                    max_num,
                )
                try:
                    status = result.pullStatus
                    if status != _CPullStatus.BROKER_TIMEOUT:
                        offsets[key] = result.nextBeginOffset
                    if status == _CPullStatus.FOUND:
                        for j in range(int(result.size)):
                            msg = RecvMessage(result.msgFoundList[j])
                            found.append((msg.body.decode("utf-8"), msg.queue_id))
                finally:
                    dll.ReleasePullResult(result)
                # On to the next queue at this one's end, or when the broker did not answer or the
                # offset did not move: the caller makes another pass until its deadline.
                if (
                    status in (_CPullStatus.NO_NEW_MSG, _CPullStatus.BROKER_TIMEOUT)
                    or offsets.get(key, 0) == before
                ):
                    break
    finally:
        ffi_check(dll.ReleaseSubscriptionMessageQueue(queues))
    return found


def pull(args):
    consumer = PullConsumer(args.group)
    consumer.set_namesrv_addr(args.namesrv)
    consumer.start()
    bodies = []
    queues = set()
    offsets = {}
    deadline = time.time() + args.timeout_secs
    try:
        while time.time() < deadline and len(set(bodies)) < args.expect:
            for body, queue_id in pull_once(consumer, args.topic, offsets):
                bodies.append(body)
                queues.add(queue_id)
    finally:
        print(
            json.dumps(
                {
                    "received": len(bodies),
                    "distinct": len(set(bodies)),
                    "queues": sorted(queues),
                }
            ),
            flush=True,
        )
        shut_down(consumer)
    return 0 if len(set(bodies)) >= args.expect else 1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["produce", "push", "pull", "stream"])
    parser.add_argument("--namesrv", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", default="cpp_group")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--expect", type=int, default=100)
    parser.add_argument("--mode", default="sync", choices=["sync", "async", "oneway", "orderly"])
    parser.add_argument("--keys", type=int, default=8)
    parser.add_argument("--prefix", default="m")
    parser.add_argument("--orderly", action="store_true")
    parser.add_argument("--broadcasting", action="store_true")
    parser.add_argument("--fail-prefix", default="")
    parser.add_argument("--instance", default="cpp-1")
    parser.add_argument("--timeout-secs", type=float, default=90)
    parser.add_argument("--quiet-secs", type=float, default=5)
    args = parser.parse_args()
    return {"produce": produce, "push": push, "pull": pull, "stream": stream}[args.command](args)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # Skips the binding's destructors, which would shut the consumer down again and may wait.
    os._exit(code)
