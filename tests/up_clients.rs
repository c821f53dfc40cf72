//! The rocketmq-client-rust and Apache C++ client suites through `rocketmesh up`, as a user runs
//! it: each test starts its own `up` (two bundled brokers and a sidecar on loopback) and reads only
//! its banner (the address apps use, and each broker's own address) and what the clients see; never
//! how `up` configures its sidecar, which may get its routes from a static config or from xDS.
//!
//! The C++ scenarios are shared with `tests/cpp_client.rs` (`tests/common/cpp.rs`); the C++ client
//! is installed on first use as that file describes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cpp::{PER_MODE, orderly_round, produce_and_consume};
use common::{Collector, CommitOnCheck, STEP_TIMEOUT, client_config, harness, send_all};
use rocketmq_client_rust::{
    ConsumeOrderlyContext, ConsumeOrderlyStatus, DefaultMQProducer, DefaultMQPushConsumer,
    MQPushConsumer, TransactionMQProducer,
};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_queue::MessageQueue;
use rocketmq_model::common::message::message_single::Message;
use rocketmq_protocol::protocol::heartbeat::message_model::MessageModel;
use tokio::sync::Notify;

const ADDRESS_LINE: &str = "nameserver address for apps:";
const BROKERS: [&str; 2] = ["broker-a", "broker-b"];
/// How long `up` may take to stop after SIGTERM before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// The orderly C++ test runs alone, as in `tests/cpp_client.rs` (beside other C++ tests it was
/// seen to find an early message of a key on another broker's first queue, where the C++ client
/// puts an orderly send it retries after a failure). Every other test here takes the read side, so
/// nothing else loads the machine meanwhile.
static ALONE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A running `rocketmesh up`, stopped (SIGTERM, then SIGKILL after [`STOP_LIMIT`]) when dropped,
/// so a failed assertion never leaves it behind.
struct Up {
    child: Child,
    /// What apps use as their nameserver address.
    address: SocketAddr,
    /// Each broker's own address, as the banner prints it.
    brokers: Vec<(&'static str, SocketAddr)>,
    // Dropped after `child` is stopped (Drop of `Up` runs first).
    data: tempfile::TempDir,
}

/// The address that follows `prefix` at the start of a banner line, if the line is that one.
fn banner_address(line: &str, prefix: &str) -> Option<SocketAddr> {
    let rest = line.trim().strip_prefix(prefix)?;
    let address = rest.split_whitespace().next().unwrap_or_default();
    Some(
        address
            .parse()
            .unwrap_or_else(|_| panic!("no socket address after {prefix:?} in {line:?}")),
    )
}

impl Up {
    /// Starts `up` on ephemeral ports with its data in a new temporary directory and waits for
    /// the banner lines this file needs, in whatever order and among whatever else `up` prints.
    fn start() -> Self {
        let data = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_rocketmesh"))
            .args([
                "up",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(data.path())
            .stdout(Stdio::piped())
            .stderr(if std::env::var_os("UP_STDERR").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("spawn rocketmesh up");
        let stdout = child.stdout.take().expect("up's stdout");
        let mut up = Self {
            child,
            address: SocketAddr::from(([0, 0, 0, 0], 0)),
            brokers: Vec::new(),
            data,
        };
        // Reads to the end, so `up` never blocks on a full pipe.
        let (line_tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = line_tx.send(line);
            }
        });
        let deadline = Instant::now() + STEP_TIMEOUT;
        let mut banner = Vec::new();
        let mut address = None;
        let mut brokers: BTreeMap<&'static str, SocketAddr> = BTreeMap::new();
        while address.is_none() || brokers.len() < BROKERS.len() {
            let line = match lines.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("`up` printed no complete banner within {STEP_TIMEOUT:?}: {banner:#?}")
                }
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "`up` closed its output before a complete banner ({:?}): {banner:#?}",
                    up.child.try_wait()
                ),
            };
            if let Some(found) = banner_address(&line, ADDRESS_LINE) {
                address = Some(found);
            }
            for name in BROKERS {
                if let Some(found) = banner_address(&line, &format!("{name}:")) {
                    brokers.insert(name, found);
                }
            }
            banner.push(line);
        }
        up.address = address.expect("the address line");
        up.brokers = brokers.into_iter().collect();
        up
    }

    /// Where C++ clients write their logs ($HOME/logs): beside the brokers' data.
    fn home(&self) -> &std::path::Path {
        self.data.path()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + STOP_LIMIT;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                // A child's exit is not an event a test can await without a process-aware runtime.
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => break,
            }
        }
        eprintln!("`up` did not stop within {STOP_LIMIT:?} of SIGTERM; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deliveries whose body came more than once.
fn duplicates(collector: &Collector) -> usize {
    collector
        .seen
        .lock()
        .expect("collector")
        .values()
        .filter(|count| **count > 1)
        .count()
}

/// A clustering push consumer of `group` on `topic` through `namesrv`, from the first offset.
async fn push_consumer(
    namesrv: SocketAddr,
    instance: &str,
    group: &str,
    topic: &str,
    collector: &Collector,
) -> DefaultMQPushConsumer {
    let mut consumer = DefaultMQPushConsumer::builder(harness().runtime.clone())
        .client_config(client_config(namesrv, instance))
        .consumer_group(group)
        .message_model(MessageModel::Clustering)
        .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
        .build();
    consumer.subscribe(topic, "*").await.expect("subscribe");
    consumer.register_message_listener_concurrently(collector.clone());
    tokio::time::timeout(STEP_TIMEOUT, consumer.start())
        .await
        .expect("in time")
        .expect("push consumer start");
    consumer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_sync_sends_to_a_new_topic_reach_a_push_consumer_once() {
    const TOPIC: &str = "UpFreshTopic";
    const MESSAGES: usize = 300;
    let _shared = ALONE.read().await;
    let up = Up::start();
    // The consumer comes first: the topic exists nowhere until the first send creates it.
    let collector = Collector::default();
    let mut consumer = push_consumer(
        up.address,
        "up-fresh-consumer",
        "up_fresh_consumer",
        TOPIC,
        &collector,
    )
    .await;
    let bodies: Vec<String> = (0..MESSAGES)
        .map(|index| format!("fresh-{index:03}"))
        .collect();
    let started = Instant::now();
    send_all(
        up.address,
        "up-fresh-producer",
        "up_fresh_producer",
        TOPIC,
        &bodies,
    )
    .await;
    let sent = started.elapsed();
    collector.wait_for(MESSAGES, STEP_TIMEOUT).await;
    let received = started.elapsed();
    consumer.shutdown().await;
    let deliveries: usize = collector.seen.lock().expect("collector").values().sum();
    let duplicates = duplicates(&collector);
    println!(
        "up {}: rust producer sent {MESSAGES} sync to a new topic (SEND_OK, in {sent:?}); push consumer (clustering) got {deliveries} deliveries, {} distinct, {duplicates} duplicates (all by {received:?})",
        up.address,
        collector.distinct()
    );
    assert!(
        bodies
            .iter()
            .all(|body| collector.seen.lock().expect("collector").contains_key(body)),
        "every body sent arrived"
    );
    assert_eq!(collector.distinct(), MESSAGES, "nothing else arrived");
    assert_eq!(duplicates, 0, "each message exactly once");
}

/// What an orderly listener saw, in the order it saw it: (body, broker, queue).
#[derive(Clone, Default)]
struct InOrder {
    got: Arc<Mutex<Vec<(String, String, i32)>>>,
    arrived: Arc<Notify>,
}

impl InOrder {
    fn len(&self) -> usize {
        self.got.lock().expect("in order").len()
    }

    async fn wait_for(&self, count: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "only {} of {count} messages arrived",
                self.len()
            );
            let _ = tokio::time::timeout(left, self.arrived.notified()).await;
        }
    }
}

/// The key and sequence number of a body `r-KEY-SEQ`.
fn key_and_sequence(body: &str) -> (usize, usize) {
    let mut parts = body.split('-').skip(1).map(str::parse::<usize>);
    match (parts.next(), parts.next()) {
        (Some(Ok(key)), Some(Ok(sequence))) => (key, sequence),
        _ => panic!("unexpected body {body:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_orderly_sends_keep_per_key_order_through_up() {
    const TOPIC: &str = "UpOrderedRust";
    const KEYS: usize = 8;
    const PER_KEY: usize = 50;
    let _shared = ALONE.read().await;
    let up = Up::start();
    // Ordered topics are created before use, as RocketMQ recommends, so no send creates one.
    for (_, broker) in &up.brokers {
        common::create_topic(*broker, TOPIC, 4).await;
    }
    let mut producer = DefaultMQProducer::builder(harness().runtime.clone())
        .client_config(client_config(up.address, "up-orderly-producer"))
        .producer_group("up_orderly_producer")
        .send_msg_timeout(10_000)
        .build();
    tokio::time::timeout(STEP_TIMEOUT, producer.start())
        .await
        .expect("in time")
        .expect("producer start");
    // The queue each send reported, by key.
    let mut reported: BTreeMap<usize, BTreeSet<(String, i32)>> = BTreeMap::new();
    for sequence in 0..PER_KEY {
        for key in 0..KEYS {
            let message = Message::builder()
                .topic(TOPIC)
                .body_slice(format!("r-{key}-{sequence}").as_bytes())
                .build()
                .expect("message");
            let by_key = |queues: &[MessageQueue], _message: &Message, key: &usize| {
                (!queues.is_empty()).then(|| queues[key % queues.len()].clone())
            };
            let result = tokio::time::timeout(
                STEP_TIMEOUT,
                producer.send_with_selector(message, by_key, key),
            )
            .await
            .expect("in time")
            .unwrap_or_else(|error| panic!("orderly send r-{key}-{sequence} failed: {error}"))
            .expect("a sync send has a result");
            assert_eq!(
                format!("{:?}", result.send_status),
                "SendOk",
                "r-{key}-{sequence}: {result:?}"
            );
            let queue = result.message_queue.expect("a send result names its queue");
            reported
                .entry(key)
                .or_default()
                .insert((queue.broker_name().to_string(), queue.queue_id()));
        }
    }
    producer.shutdown().await;

    let seen = InOrder::default();
    let mut consumer = DefaultMQPushConsumer::builder(harness().runtime.clone())
        .client_config(client_config(up.address, "up-orderly-consumer"))
        .consumer_group("up_orderly_consumer")
        .message_model(MessageModel::Clustering)
        .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
        .build();
    consumer.subscribe(TOPIC, "*").await.expect("subscribe");
    let listener = seen.clone();
    consumer.register_message_listener_orderly(
        move |messages: &[&MessageExt], _context: &mut ConsumeOrderlyContext| {
            {
                let mut got = listener.got.lock().expect("in order");
                for message in messages {
                    let body = message.body().unwrap_or_default();
                    got.push((
                        String::from_utf8_lossy(&body).into_owned(),
                        message.broker_name().to_owned(),
                        message.queue_id(),
                    ));
                }
            }
            listener.arrived.notify_one();
            Ok(ConsumeOrderlyStatus::Success)
        },
    );
    tokio::time::timeout(STEP_TIMEOUT, consumer.start())
        .await
        .expect("in time")
        .expect("orderly consumer start");
    seen.wait_for(KEYS * PER_KEY, STEP_TIMEOUT).await;
    consumer.shutdown().await;

    let got = seen.got.lock().expect("in order").clone();
    let mut next: BTreeMap<usize, usize> = BTreeMap::new();
    let mut consumed_from: BTreeMap<usize, BTreeSet<(String, i32)>> = BTreeMap::new();
    let mut out_of_order = 0;
    for (body, broker, queue) in &got {
        let (key, sequence) = key_and_sequence(body);
        let expected = next.entry(key).or_default();
        if sequence != *expected {
            out_of_order += 1;
        }
        *expected = sequence + 1;
        consumed_from
            .entry(key)
            .or_default()
            .insert((broker.clone(), *queue));
    }
    let distinct: BTreeSet<&String> = got.iter().map(|(body, _, _)| body).collect();
    let placements: BTreeSet<&BTreeSet<(String, i32)>> = consumed_from.values().collect();
    println!(
        "up {}: rust send_with_selector {} ({KEYS} keys x {PER_KEY}); sends reported key -> queue {reported:?}; orderly consumer: {} deliveries, {} distinct, {} duplicates, {out_of_order} out of send order, consumed key -> queue {consumed_from:?}",
        up.address,
        KEYS * PER_KEY,
        got.len(),
        distinct.len(),
        got.len() - distinct.len()
    );
    assert_eq!(distinct.len(), KEYS * PER_KEY, "every message arrived");
    assert_eq!(got.len(), KEYS * PER_KEY, "each message exactly once");
    assert_eq!(out_of_order, 0, "each key's messages arrive in send order");
    for key in 0..KEYS {
        assert_eq!(
            reported.get(&key).map(BTreeSet::len),
            Some(1),
            "the sends of key {key} all reported one queue: {reported:?}"
        );
        assert_eq!(
            consumed_from.get(&key),
            reported.get(&key),
            "key {key} was consumed from the queue its sends chose"
        );
    }
    assert_eq!(
        placements.len(),
        KEYS,
        "{KEYS} keys over the {KEYS} queues of two brokers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_transaction_committed_by_the_check_through_up() {
    const TOPIC: &str = "UpTransactions";
    const BODY: &str = "committed-by-check";
    let _shared = ALONE.read().await;
    let up = Up::start();
    // Created before the consumer subscribes, which then sees its route from the start.
    for (_, broker) in &up.brokers {
        common::create_topic(*broker, TOPIC, 4).await;
    }
    let collector = Collector::default();
    let mut consumer = push_consumer(
        up.address,
        "up-tx-consumer",
        "up_tx_consumer",
        TOPIC,
        &collector,
    )
    .await;
    let listener = CommitOnCheck::default();
    let mut producer = TransactionMQProducer::builder(harness().runtime.clone())
        .client_config(client_config(up.address, "up-tx-producer"))
        .producer_group("up_tx_producer")
        .topics(vec![TOPIC])
        .transaction_listener(listener.clone())
        .build();
    tokio::time::timeout(STEP_TIMEOUT, producer.start())
        .await
        .expect("in time")
        .expect("transaction producer start");
    let message = Message::builder()
        .topic(TOPIC)
        .body_slice(BODY.as_bytes())
        .build()
        .expect("message");
    let started = Instant::now();
    let sent = tokio::time::timeout(
        STEP_TIMEOUT,
        producer.send_message_in_transaction::<(), _>(message, None),
    )
    .await
    .expect("in time")
    .expect("half message sent");
    assert_eq!(
        format!("{:?}", sent.local_transaction_state),
        "Some(Unknown)",
        "the local transaction left it undecided: {sent:?}"
    );
    let checks_before = listener.checks.load(Ordering::SeqCst);
    let seen_before = collector.distinct();
    // The broker checks an undecided transaction after its transaction timeout (seconds).
    collector.wait_for(1, STEP_TIMEOUT).await;
    let delivered = started.elapsed();
    producer.shutdown().await;
    consumer.shutdown().await;
    let checks = listener.checks.load(Ordering::SeqCst);
    let deliveries: usize = collector.seen.lock().expect("collector").values().sum();
    println!(
        "up {}: rust transaction producer's half message (local state Unknown) was checked back {checks} times and committed; the push consumer got it after {delivered:?} ({deliveries} deliveries)",
        up.address
    );
    assert_eq!(
        (checks_before, seen_before),
        (0, 0),
        "nothing visible and nothing checked before the check"
    );
    assert!(checks >= 1, "the broker's check reached the producer");
    assert_eq!(
        collector.seen.lock().expect("collector").get(BODY),
        Some(&1),
        "the committed message arrived, once"
    );
    assert_eq!(deliveries, 1, "nothing else arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpp_sends_of_every_mode_reach_push_and_pull_consumers_through_up() {
    const TOPIC: &str = "UpCpp";
    let _shared = ALONE.read().await;
    let up = Up::start();
    produce_and_consume(up.home(), up.address, TOPIC, "up").await;
    let mut landed = Vec::new();
    for (name, broker) in &up.brokers {
        landed.push((*name, common::messages_on(*broker, TOPIC).await));
    }
    println!("up: the C++ sends landed {landed:?}");
    let total: i64 = landed.iter().map(|(_, count)| count).sum();
    assert_eq!(total, 3 * PER_MODE as i64, "every send stored once");
    assert!(
        landed.iter().all(|(_, count)| *count > 0),
        "both brokers took sends: {landed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpp_orderly_sends_keep_per_key_order_through_up() {
    let _alone = ALONE.write().await;
    let up = Up::start();
    let map = orderly_round(up.home(), up.address, &up.brokers, "OrderedUpCpp", 8, 100).await;
    let placements: BTreeSet<_> = map.values().collect();
    assert_eq!(
        placements.len(),
        8,
        "the client's 8 queues (2 brokers x 4) each got one key"
    );
}
