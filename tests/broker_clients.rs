//! The bundled broker serving a real third-party client (`rocketmq-client-rust` 1.0.0) that uses the
//! broker's own address as its nameserver: sends acknowledged, messages delivered exactly once,
//! offsets kept across a restart.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rocketmesh::broker::BrokerState;
use rocketmq_client_rust::{
    ClientResult, ConsumeConcurrentlyContext, ConsumeConcurrentlyStatus, DefaultLitePullConsumer,
    DefaultMQProducer, DefaultMQPushConsumer, MQPushConsumer, MessageListenerConcurrently,
};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_single::Message;
use rocketmq_protocol::protocol::heartbeat::message_model::MessageModel;
use tokio::sync::Notify;

mod common;
use common::{Collector, RunningBroker, STEP_TIMEOUT, client_config, harness, send_all};

const TOPIC: &str = "BrokerClientTopic";
const GROUP: &str = "broker_client_group";
const MESSAGES: usize = 10_000;

async fn wait_for_committed_offsets(state: &BrokerState, queue_ends: &BTreeMap<i32, u64>) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let committed: BTreeMap<i32, u64> = queue_ends
            .keys()
            .map(|queue| {
                (
                    *queue,
                    state
                        .metadata
                        .consumer_offset(GROUP, TOPIC, *queue)
                        .unwrap_or(-1)
                        .max(0) as u64,
                )
            })
            .collect();
        if &committed == queue_ends {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "committed offsets {committed:?}, expected {queue_ends:?}"
        );
        // Polling a condition the client changes on its own timer; there is no event to await.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn body(index: usize) -> String {
    format!("message-{index:05}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_and_push_consumer_against_the_bundled_broker() {
    let data = tempfile::tempdir().expect("tempdir");
    let broker = RunningBroker::start(data.path()).await;
    let harness = harness();

    let mut producer = DefaultMQProducer::builder(harness.runtime.clone())
        .client_config(client_config(broker.addr, "broker-test-producer"))
        .producer_group("broker_client_producer")
        .send_msg_timeout(10_000)
        .build();
    tokio::time::timeout(STEP_TIMEOUT, producer.start())
        .await
        .expect("in time")
        .expect("producer start");
    let started = Instant::now();
    let mut queue_offsets = BTreeMap::new();
    for index in 0..MESSAGES {
        let message = Message::builder()
            .topic(TOPIC)
            .tags(if index % 2 == 0 { "even" } else { "odd" })
            .key(format!("key-{index}"))
            .body_slice(body(index).as_bytes())
            .build()
            .expect("message");
        let result = tokio::time::timeout(STEP_TIMEOUT, producer.send(message))
            .await
            .expect("in time")
            .unwrap_or_else(|error| panic!("send {index} failed: {error}"))
            .expect("a sync send has a result");
        assert_eq!(
            format!("{:?}", result.send_status),
            "SendOk",
            "send {index}: {result:?}"
        );
        let queue = result
            .message_queue
            .as_ref()
            .map(|q| q.queue_id())
            .unwrap_or(-1);
        let expected = queue_offsets.entry(queue).or_insert(0u64);
        assert_eq!(
            result.queue_offset, *expected,
            "queue {queue} offsets are dense"
        );
        *expected += 1;
    }
    let send_time = started.elapsed();
    println!("{MESSAGES} sync sends, all SEND_OK, in {send_time:?} over queues {queue_offsets:?}");
    producer.shutdown().await;

    let collector = Collector::default();
    let mut consumer = DefaultMQPushConsumer::builder(harness.runtime.clone())
        .client_config(client_config(broker.addr, "broker-test-consumer"))
        .consumer_group(GROUP)
        .message_model(MessageModel::Clustering)
        .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
        .build();
    consumer.subscribe(TOPIC, "*").await.expect("subscribe");
    consumer.register_message_listener_concurrently(collector.clone());
    tokio::time::timeout(STEP_TIMEOUT, consumer.start())
        .await
        .expect("in time")
        .expect("consumer start");
    collector.wait_for(MESSAGES, STEP_TIMEOUT).await;
    // The client commits offsets after its listener returns (every 5 s and at shutdown, oneway):
    // wait until the broker holds the final offset of every queue before shutting down, so the
    // restart below tests the broker's offsets and not this race.
    wait_for_committed_offsets(&broker.state, &queue_offsets).await;
    consumer.shutdown().await;
    let seen = collector.seen.lock().expect("collector").clone();
    let duplicates: Vec<_> = seen.iter().filter(|(_, count)| **count > 1).collect();
    assert!(
        duplicates.is_empty(),
        "delivered more than once: {duplicates:?}"
    );
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        (0..MESSAGES).map(body).collect::<Vec<_>>()
    );
    assert_eq!(
        broker.state.clients.consumer_ids(GROUP),
        None,
        "the consumer unregistered on shutdown"
    );
    println!("push consumer received all {MESSAGES} messages exactly once");

    // A lite pull consumer of another group reads them all too.
    let lite = DefaultLitePullConsumer::builder(harness.runtime.clone())
        .name_server_addr(broker.addr.to_string())
        .client_ip("127.0.0.1")
        .instance_name("broker-test-lite")
        .consumer_group("broker_client_lite_group")
        // The client's shutdown waits for its parked long-poll pulls to come back.
        .broker_suspend_max_time_millis(2_000)
        .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
        .build()
        .expect("lite pull consumer");
    lite.subscribe(TOPIC).await.expect("subscribe");
    tokio::time::timeout(STEP_TIMEOUT, lite.start())
        .await
        .expect("in time")
        .expect("lite start");
    let mut pulled = BTreeMap::new();
    let deadline = Instant::now() + STEP_TIMEOUT;
    while pulled.len() < MESSAGES && Instant::now() < deadline {
        for message in lite.poll_with_timeout(1_000).await {
            let text =
                String::from_utf8_lossy(message.body().as_deref().unwrap_or_default()).into_owned();
            *pulled.entry(text).or_insert(0usize) += 1;
        }
    }
    let started_reading = deadline - STEP_TIMEOUT;
    println!(
        "lite pull read {} messages in {:?}",
        pulled.len(),
        started_reading.elapsed()
    );
    lite.shutdown().await;
    println!(
        "lite pull consumer shut down {:?} after it started reading",
        started_reading.elapsed()
    );
    assert_eq!(
        pulled.len(),
        MESSAGES,
        "the lite pull consumer read every message"
    );
    assert!(pulled.values().all(|count| *count == 1), "and each once");
    println!("lite pull consumer read all {MESSAGES} messages");

    // Restart the broker on the same data: the group's offsets survive, so a new consumer of the
    // group gets only what is sent after the restart.
    broker.stop().await;
    let broker = RunningBroker::start(data.path()).await;
    let fresh: Vec<String> = (0..10)
        .map(|index| format!("after-restart-{index}"))
        .collect();
    send_all(
        broker.addr,
        "broker-test-producer-2",
        "broker_client_producer",
        TOPIC,
        &fresh,
    )
    .await;
    let collector = Collector::default();
    let mut consumer = DefaultMQPushConsumer::builder(harness.runtime.clone())
        .client_config(client_config(broker.addr, "broker-test-consumer-2"))
        .consumer_group(GROUP)
        .message_model(MessageModel::Clustering)
        .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
        .build();
    consumer.subscribe(TOPIC, "*").await.expect("subscribe");
    consumer.register_message_listener_concurrently(collector.clone());
    tokio::time::timeout(STEP_TIMEOUT, consumer.start())
        .await
        .expect("in time")
        .expect("consumer start");
    collector.wait_for(fresh.len(), STEP_TIMEOUT).await;
    consumer.shutdown().await;
    let seen: Vec<String> = collector
        .seen
        .lock()
        .expect("collector")
        .keys()
        .cloned()
        .collect();
    assert_eq!(
        seen, fresh,
        "after the restart the group resumes at its committed offsets"
    );
    println!("after a broker restart the group received only the 10 new messages");

    broker.stop().await;
}

/// Records every delivery and asks for redelivery of one poison message.
#[derive(Clone, Default)]
struct RetryingListener {
    deliveries: Arc<Mutex<Vec<(String, i32, Instant)>>>,
    arrived: Arc<Notify>,
}

impl MessageListenerConcurrently for RetryingListener {
    fn consume_message(
        &self,
        msgs: &[&MessageExt],
        _context: &ConsumeConcurrentlyContext,
    ) -> ClientResult<ConsumeConcurrentlyStatus> {
        let mut status = ConsumeConcurrentlyStatus::ConsumeSuccess;
        {
            let mut deliveries = self.deliveries.lock().expect("deliveries");
            for message in msgs {
                let text = String::from_utf8_lossy(message.body().as_deref().unwrap_or_default())
                    .into_owned();
                if text == "poison" {
                    status = ConsumeConcurrentlyStatus::ReconsumeLater;
                }
                deliveries.push((text, message.reconsume_times(), Instant::now()));
            }
        }
        self.arrived.notify_one();
        Ok(status)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_retried_and_dead_lettered_messages() {
    const DELAYED_TOPIC: &str = "DelayTopic";
    const RETRY_GROUP: &str = "retry_group";
    let data = tempfile::tempdir().expect("tempdir");
    let broker = RunningBroker::start_with(data.path(), |config| {
        // Level 2 is the delayed message's; levels 3 and up are the retry ladder's.
        config.delay_levels = format!("200ms 1500ms {}", vec!["100ms"; 16].join(" "));
    })
    .await;
    let harness = harness();
    let mut producer = DefaultMQProducer::builder(harness.runtime.clone())
        .client_config(client_config(broker.addr, "delay-producer"))
        .producer_group("delay_producer")
        .build();
    tokio::time::timeout(STEP_TIMEOUT, producer.start())
        .await
        .expect("in time")
        .expect("start");
    let listener = RetryingListener::default();
    let mut consumer = DefaultMQPushConsumer::builder(harness.runtime.clone())
        .client_config(client_config(broker.addr, "delay-consumer"))
        .consumer_group(RETRY_GROUP)
        .message_model(MessageModel::Clustering)
        .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
        .max_reconsume_times(2)
        .build();
    let mut delayed_sent = Instant::now();
    for (body, delay_level) in [("fine", 0), ("poison", 0), ("delayed", 2)] {
        // Taken before the send, so the broker stores the message after this instant.
        delayed_sent = Instant::now();
        let mut builder = Message::builder()
            .topic(DELAYED_TOPIC)
            .body_slice(body.as_bytes());
        if delay_level > 0 {
            builder = builder.delay_level(delay_level);
        }
        tokio::time::timeout(
            STEP_TIMEOUT,
            producer.send(builder.build().expect("message")),
        )
        .await
        .expect("in time")
        .expect("send");
    }
    consumer
        .subscribe(DELAYED_TOPIC, "*")
        .await
        .expect("subscribe");
    consumer.register_message_listener_concurrently(listener.clone());
    tokio::time::timeout(STEP_TIMEOUT, consumer.start())
        .await
        .expect("in time")
        .expect("consumer start");

    let dead_letters = format!("%DLQ%{RETRY_GROUP}");
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let done = {
            let deliveries = listener.deliveries.lock().expect("deliveries");
            deliveries.iter().any(|(body, _, _)| body == "delayed")
                && deliveries
                    .iter()
                    .filter(|(body, _, _)| body == "poison")
                    .count()
                    >= 3
        } && broker.state.store.queue_offsets(&dead_letters, 0).1 >= 1;
        if done {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "deliveries so far: {:?}",
            listener.deliveries.lock().expect("deliveries")
        );
        // The dead-letter check reads broker state that has no event; bound each wait.
        let _ = tokio::time::timeout(
            left.min(Duration::from_millis(200)),
            listener.arrived.notified(),
        )
        .await;
    }
    consumer.shutdown().await;
    producer.shutdown().await;

    let deliveries = listener.deliveries.lock().expect("deliveries").clone();
    let delayed_at = deliveries
        .iter()
        .find(|(body, _, _)| body == "delayed")
        .map(|(_, _, at)| *at)
        .expect("delayed");
    let delay = delayed_at - delayed_sent;
    println!("the level-2 (1.5 s) message arrived {delay:?} after its send started");
    assert!(
        delay >= Duration::from_millis(1500),
        "delivered before its time: {delay:?}"
    );
    let poison: Vec<i32> = deliveries
        .iter()
        .filter(|(body, _, _)| body == "poison")
        .map(|(_, times, _)| *times)
        .collect();
    assert_eq!(poison, vec![0, 1, 2], "delivered once, then retried twice");
    assert_eq!(
        deliveries
            .iter()
            .filter(|(body, _, _)| body == "fine")
            .count(),
        1
    );
    let raw = broker
        .state
        .store
        .read_queue(&dead_letters, 0, 0, 10, |_| true)
        .expect("dead letters");
    let (record, _) =
        rocketmesh::remoting::message::MessageRecord::decode(&raw[0], true).expect("record");
    assert_eq!(record.body, "poison".as_bytes());
    assert_eq!(
        record
            .properties
            .get("DLQ_ORIGIN_TOPIC")
            .map(String::as_str),
        Some(DELAYED_TOPIC)
    );
    println!("poison was delivered 3 times and then dead-lettered to {dead_letters}");
    broker.stop().await;
}

/// Leaves every transaction undecided, then answers checks by the message body.
struct CheckedBackListener;

impl rocketmq_client_rust::TransactionListener for CheckedBackListener {
    fn execute_local_transaction(
        &self,
        _msg: &dyn rocketmq_model::common::message::MessageTrait,
        _arg: Option<&(dyn std::any::Any + Send + Sync)>,
    ) -> rocketmq_client_rust::LocalTransactionState {
        rocketmq_client_rust::LocalTransactionState::Unknown
    }

    fn check_local_transaction(
        &self,
        msg: &MessageExt,
    ) -> rocketmq_client_rust::LocalTransactionState {
        match msg.body().as_deref() {
            Some(b"commit-me") => rocketmq_client_rust::LocalTransactionState::CommitMessage,
            _ => rocketmq_client_rust::LocalTransactionState::RollbackMessage,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_transactions_are_checked_back_then_committed_or_rolled_back() {
    const TX_TOPIC: &str = "TransactionTopic";
    let data = tempfile::tempdir().expect("tempdir");
    let broker = RunningBroker::start_with(data.path(), |config| {
        config.transaction_timeout_ms = 300;
        config.transaction_check_interval_ms = 300;
    })
    .await;
    let harness = harness();
    let mut producer =
        rocketmq_client_rust::TransactionMQProducer::builder(harness.runtime.clone())
            .client_config(client_config(broker.addr, "tx-producer"))
            .producer_group("tx_producer_group")
            .topics(vec![TX_TOPIC])
            .transaction_listener(CheckedBackListener)
            .build();
    tokio::time::timeout(STEP_TIMEOUT, producer.start())
        .await
        .expect("in time")
        .expect("start");
    for body in ["commit-me", "rollback-me"] {
        let message = Message::builder()
            .topic(TX_TOPIC)
            .body_slice(body.as_bytes())
            .build()
            .expect("message");
        tokio::time::timeout(
            STEP_TIMEOUT,
            producer.send_message_in_transaction::<(), _>(message, None),
        )
        .await
        .expect("in time")
        .expect("half message sent");
    }
    let total = |state: &BrokerState| {
        (0..4)
            .map(|queue| state.store.queue_offsets(TX_TOPIC, queue).1)
            .sum::<u64>()
    };
    assert_eq!(total(&broker.state), 0, "half messages are not visible");

    let collector = Collector::default();
    let mut consumer = DefaultMQPushConsumer::builder(harness.runtime.clone())
        .client_config(client_config(broker.addr, "tx-consumer"))
        .consumer_group("tx_consumer_group")
        .message_model(MessageModel::Clustering)
        .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
        .build();
    consumer.subscribe(TX_TOPIC, "*").await.expect("subscribe");
    consumer.register_message_listener_concurrently(collector.clone());
    tokio::time::timeout(STEP_TIMEOUT, consumer.start())
        .await
        .expect("in time")
        .expect("consumer start");
    collector.wait_for(1, STEP_TIMEOUT).await;

    // Both checks have been answered once nothing is undecided; only the commit became visible.
    let deadline = Instant::now() + STEP_TIMEOUT;
    while broker.state.transactions.undecided() > 0 {
        assert!(Instant::now() < deadline, "transactions still undecided");
        // Decided by the producer's END_TRANSACTION, which the broker does not signal to tests.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    consumer.shutdown().await;
    producer.shutdown().await;
    assert_eq!(
        total(&broker.state),
        1,
        "only the committed message reached its topic"
    );
    let seen: Vec<String> = collector
        .seen
        .lock()
        .expect("collector")
        .keys()
        .cloned()
        .collect();
    assert_eq!(seen, vec!["commit-me".to_owned()]);
    println!(
        "the UNKNOWN transactions were checked back: one committed and delivered, one rolled back"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop_mode_consumer_reads_everything_and_a_rejected_message_comes_back() {
    const POP_TOPIC: &str = "PopTopic";
    const POP_MESSAGES: usize = 200;
    let data = tempfile::tempdir().expect("tempdir");
    let broker = RunningBroker::start_with(data.path(), |config| {
        config.default_message_request_mode = "POP".into();
    })
    .await;
    let harness = harness();
    let mut bodies: Vec<String> = (0..POP_MESSAGES - 1)
        .map(|index| format!("pop-{index:03}"))
        .collect();
    bodies.push("poison".into());
    send_all(
        broker.addr,
        "pop-producer",
        "pop_producer",
        POP_TOPIC,
        &bodies,
    )
    .await;

    // "poison" is rejected once (RECONSUME_LATER), then accepted.
    let listener = RetryingListener::default();
    let mut consumer = DefaultMQPushConsumer::builder(harness.runtime.clone())
        .client_config(client_config(broker.addr, "pop-consumer"))
        .consumer_group("pop_group")
        .client_rebalance(false)
        .build();
    consumer.subscribe(POP_TOPIC, "*").await.expect("subscribe");
    consumer.register_message_listener_concurrently(listener.clone());
    tokio::time::timeout(STEP_TIMEOUT, consumer.start())
        .await
        .expect("in time")
        .expect("consumer start");
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let (distinct, poison) = {
            let deliveries = listener.deliveries.lock().expect("deliveries");
            let distinct: std::collections::BTreeSet<&String> =
                deliveries.iter().map(|(body, _, _)| body).collect();
            (
                distinct.len(),
                deliveries
                    .iter()
                    .filter(|(body, _, _)| body == "poison")
                    .count(),
            )
        };
        if distinct == POP_MESSAGES && poison >= 2 {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{distinct} distinct messages, poison delivered {poison} times"
        );
        let _ = tokio::time::timeout(left, listener.arrived.notified()).await;
    }
    consumer.shutdown().await;
    let deliveries = listener.deliveries.lock().expect("deliveries").clone();
    let poison: Vec<(i32, Instant)> = deliveries
        .iter()
        .filter(|(body, _, _)| body == "poison")
        .map(|(_, times, at)| (*times, *at))
        .collect();
    assert_eq!(
        poison
            .iter()
            .map(|(times, _)| *times)
            .take(2)
            .collect::<Vec<_>>(),
        vec![0, 1]
    );
    let invisible_for = poison[1].1 - poison[0].1;
    // The client asks for 10 s of invisibility after RECONSUME_LATER (its first pop delay level).
    assert!(
        invisible_for >= Duration::from_secs(9),
        "came back after only {invisible_for:?}"
    );
    let others = deliveries
        .iter()
        .filter(|(body, _, _)| body != "poison")
        .count();
    assert_eq!(others, POP_MESSAGES - 1, "every accepted message once");
    println!(
        "POP consumer read all {POP_MESSAGES} messages ({others} non-poison deliveries); the rejected one came back \
         after {invisible_for:?} with reconsumeTimes 1"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_push_consumers_of_one_group_share_the_messages_exactly_once() {
    const SHARED_TOPIC: &str = "SharedTopic";
    const SHARED_GROUP: &str = "shared_group";
    const SHARED_MESSAGES: usize = 2_000;
    let data = tempfile::tempdir().expect("tempdir");
    let broker = RunningBroker::start(data.path()).await;
    let harness = harness();
    // Create the topic so the consumers can rebalance before any message exists.
    let mut producer = DefaultMQProducer::builder(harness.runtime.clone())
        .client_config(client_config(broker.addr, "shared-producer"))
        .producer_group("shared_producer")
        .build();
    tokio::time::timeout(STEP_TIMEOUT, producer.start())
        .await
        .expect("in time")
        .expect("start");
    let warm_up = Message::builder()
        .topic(SHARED_TOPIC)
        .body_slice(b"warm-up")
        .build()
        .expect("message");
    tokio::time::timeout(STEP_TIMEOUT, producer.send(warm_up))
        .await
        .expect("in time")
        .expect("send");

    let collectors = [Collector::default(), Collector::default()];
    let mut consumers = Vec::new();
    for (index, collector) in collectors.iter().enumerate() {
        let mut consumer = DefaultMQPushConsumer::builder(harness.runtime.clone())
            .client_config(client_config(
                broker.addr,
                &format!("shared-consumer-{index}"),
            ))
            .consumer_group(SHARED_GROUP)
            .message_model(MessageModel::Clustering)
            .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
            .build();
        consumer
            .subscribe(SHARED_TOPIC, "*")
            .await
            .expect("subscribe");
        consumer.register_message_listener_concurrently(collector.clone());
        tokio::time::timeout(STEP_TIMEOUT, consumer.start())
            .await
            .expect("in time")
            .expect("start");
        consumers.push(consumer);
    }
    // Wait until the group has rebalanced: both members registered and the four queues pulled by
    // two different connections, two each, for a full second. Messages sent before that could be
    // handed over mid-way.
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut settled_since: Option<Instant> = None;
    loop {
        let members = broker
            .state
            .clients
            .consumer_ids(SHARED_GROUP)
            .map_or(0, |ids| ids.len());
        let pullers = broker.state.clients.pullers(SHARED_GROUP, SHARED_TOPIC);
        let mut per_connection = BTreeMap::new();
        for connection in pullers.values() {
            *per_connection.entry(*connection).or_insert(0) += 1;
        }
        let settled = members == 2
            && pullers.len() == 4
            && per_connection.values().all(|queues| *queues == 2);
        match (settled, settled_since) {
            (true, Some(since)) if since.elapsed() >= Duration::from_secs(1) => break,
            (true, None) => settled_since = Some(Instant::now()),
            (false, _) => settled_since = None,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "no stable assignment: {members} members, pullers {pullers:?}"
        );
        // The rebalance runs inside the clients; the broker only sees its effect on pulls.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for index in 0..SHARED_MESSAGES {
        let message = Message::builder()
            .topic(SHARED_TOPIC)
            .body_slice(format!("shared-{index:04}").as_bytes())
            .build()
            .expect("message");
        tokio::time::timeout(STEP_TIMEOUT, producer.send(message))
            .await
            .expect("in time")
            .expect("send");
    }
    producer.shutdown().await;
    let deadline = Instant::now() + STEP_TIMEOUT;
    let received = |collectors: &[Collector; 2]| -> BTreeMap<String, usize> {
        let mut all = BTreeMap::new();
        for collector in collectors {
            for (body, count) in collector.seen.lock().expect("collector").iter() {
                *all.entry(body.clone()).or_insert(0) += count;
            }
        }
        all
    };
    while received(&collectors).len() < SHARED_MESSAGES + 1 {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "only {} messages arrived",
            received(&collectors).len()
        );
        let _ = tokio::time::timeout(
            left.min(Duration::from_millis(200)),
            collectors[0].arrived.notified(),
        )
        .await;
    }
    for consumer in &mut consumers {
        consumer.shutdown().await;
    }
    let all = received(&collectors);
    let duplicates: Vec<_> = all.iter().filter(|(_, count)| **count > 1).collect();
    assert!(
        duplicates.is_empty(),
        "delivered more than once: {duplicates:?}"
    );
    let shares: Vec<usize> = collectors.iter().map(Collector::distinct).collect();
    assert!(
        shares.iter().all(|share| *share > 0),
        "both consumers got a share: {shares:?}"
    );
    println!(
        "two consumers of one group received {} messages exactly once, split {shares:?}",
        all.len()
    );
    broker.stop().await;
}

/// Holds the first delivery of "slow" past its invisible time, so the client does not ack it, and
/// lets it go once the broker has handed the message out again.
#[derive(Clone, Default)]
struct SlowListener {
    deliveries: Arc<Mutex<Vec<(String, i32, Instant)>>>,
    arrived: Arc<Notify>,
    redelivered: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

impl MessageListenerConcurrently for SlowListener {
    fn consume_message(
        &self,
        msgs: &[&MessageExt],
        _context: &ConsumeConcurrentlyContext,
    ) -> ClientResult<ConsumeConcurrentlyStatus> {
        let mut hold = false;
        {
            let mut deliveries = self.deliveries.lock().expect("deliveries");
            for message in msgs {
                let text = String::from_utf8_lossy(message.body().as_deref().unwrap_or_default())
                    .into_owned();
                if text == "slow" {
                    let earlier = deliveries
                        .iter()
                        .filter(|(body, _, _)| body == "slow")
                        .count();
                    hold = earlier == 0;
                    if earlier > 0 {
                        let (flag, wakeup) = &*self.redelivered;
                        *flag.lock().expect("flag") = true;
                        wakeup.notify_all();
                    }
                }
                deliveries.push((text, message.reconsume_times(), Instant::now()));
            }
        }
        self.arrived.notify_one();
        if hold {
            let (flag, wakeup) = &*self.redelivered;
            let guard = flag.lock().expect("flag");
            let _ = wakeup
                .wait_timeout_while(guard, STEP_TIMEOUT, |redelivered| !*redelivered)
                .expect("wait");
        }
        Ok(ConsumeConcurrentlyStatus::ConsumeSuccess)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_popped_message_left_unacked_comes_back_after_its_invisible_time() {
    const SLOW_TOPIC: &str = "PopSlowTopic";
    // The client allows no less than 5 s.
    const INVISIBLE_MS: u64 = 5_000;
    let data = tempfile::tempdir().expect("tempdir");
    let broker = RunningBroker::start_with(data.path(), |config| {
        config.default_message_request_mode = "POP".into();
    })
    .await;
    let harness = harness();
    let mut bodies: Vec<String> = (0..9).map(|index| format!("quick-{index}")).collect();
    bodies.push("slow".into());
    send_all(
        broker.addr,
        "slow-producer",
        "slow_producer",
        SLOW_TOPIC,
        &bodies,
    )
    .await;

    let listener = SlowListener::default();
    let mut consumer = DefaultMQPushConsumer::builder(harness.runtime.clone())
        .client_config(client_config(broker.addr, "slow-consumer"))
        .consumer_group("slow_group")
        .client_rebalance(false)
        .pop_invisible_time(INVISIBLE_MS)
        .build();
    consumer
        .subscribe(SLOW_TOPIC, "*")
        .await
        .expect("subscribe");
    consumer.register_message_listener_concurrently(listener.clone());
    tokio::time::timeout(STEP_TIMEOUT, consumer.start())
        .await
        .expect("in time")
        .expect("consumer start");
    let deadline = Instant::now() + STEP_TIMEOUT;
    let slow = loop {
        let (distinct, slow) = {
            let deliveries = listener.deliveries.lock().expect("deliveries");
            let distinct: std::collections::BTreeSet<&String> =
                deliveries.iter().map(|(body, _, _)| body).collect();
            let slow: Vec<(i32, Instant)> = deliveries
                .iter()
                .filter(|(body, _, _)| body == "slow")
                .map(|(_, times, at)| (*times, *at))
                .collect();
            (distinct.len(), slow)
        };
        if distinct == bodies.len() && slow.len() >= 2 {
            break slow;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{distinct} distinct messages, slow delivered {} times",
            slow.len()
        );
        let _ = tokio::time::timeout(left, listener.arrived.notified()).await;
    };
    consumer.shutdown().await;
    let quick_deliveries = listener
        .deliveries
        .lock()
        .expect("deliveries")
        .iter()
        .filter(|(body, _, _)| body != "slow")
        .count();
    assert_eq!(quick_deliveries, 9, "acked messages are not redelivered");
    assert_eq!(
        slow.iter()
            .map(|(times, _)| *times)
            .take(2)
            .collect::<Vec<_>>(),
        vec![0, 1],
        "the redelivery carries reconsumeTimes + 1"
    );
    let back_after = slow[1].1 - slow[0].1;
    // The pop happened just before the first delivery, so allow a little slack below the time.
    assert!(
        back_after >= Duration::from_millis(INVISIBLE_MS - 200),
        "came back after only {back_after:?}"
    );
    println!(
        "the unacked POP message came back after {back_after:?} (invisible time {INVISIBLE_MS} ms) \
         with reconsumeTimes 1; the 9 acked ones were delivered once"
    );
    broker.stop().await;
}
