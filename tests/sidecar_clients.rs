//! The sidecar between a real `rocketmq-client-rust` 1.0.0 client (which uses the sidecar as its
//! nameserver) and two bundled brokers: sends split by weight, POP with acks landing on the right
//! broker, pull passed through, TOPIC_NOT_EXIST without a route, transaction checks relayed, a
//! garbage-sending client isolated, and the admin endpoint's counts.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rocketmesh::broker::BrokerState;
use rocketmesh::proxy::{self, RunningSidecar, SidecarConfig};
use rocketmq_client_rust::{DefaultMQProducer, DefaultMQPushConsumer, MQPushConsumer};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_single::Message;
use rocketmq_protocol::protocol::heartbeat::message_model::MessageModel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{
    Collector, CommitOnCheck, RunningBroker, STEP_TIMEOUT, client_config, harness, send_all,
};

/// Two brokers (weights 3:1) behind one sidecar; everything on ephemeral loopback ports.
struct Mesh {
    brokers: Vec<RunningBroker>,
    sidecar: RunningSidecar,
    addr: SocketAddr,
    admin: SocketAddr,
    _data: tempfile::TempDir,
}

impl Mesh {
    async fn start() -> Self {
        let data = tempfile::tempdir().expect("tempdir");
        let mut brokers = Vec::new();
        for name in ["broker-a", "broker-b"] {
            brokers.push(
                RunningBroker::start_with(&data.path().join(name), |config| {
                    config.broker_name = name.into();
                    config.default_message_request_mode = "POP".into();
                    config.transaction_timeout_ms = 300;
                    config.transaction_check_interval_ms = 300;
                })
                .await,
            );
        }
        let endpoint = |broker: &RunningBroker, name: &str, weight: u32| {
            format!(
                "      - address: \"{}\"\n        metadata: {{ broker_name: {name}, cluster_name: DefaultCluster, weight: {weight} }}\n",
                broker.addr
            )
        };
        let yaml = format!(
            "listeners: [{{ address: \"127.0.0.1:0\" }}]\n\
             admin: {{ address: \"127.0.0.1:0\" }}\n\
             routes:\n\
             \x20 - match: {{ topic: {{ prefix: Mesh }} }}\n\
             \x20   route: {{ cluster: brokers }}\n\
             \x20 - match: {{ topic: {{ prefix: \"%RETRY%\" }} }}\n\
             \x20   route: {{ cluster: brokers }}\n\
             clusters:\n\
             \x20 - name: brokers\n\
             \x20   request_timeout_ms: 10000\n\
             \x20   endpoints:\n{}{}",
            endpoint(&brokers[0], "broker-a", 300),
            endpoint(&brokers[1], "broker-b", 100),
        );
        let config = SidecarConfig::parse(&yaml).expect("sidecar config");
        let sidecar = proxy::start(config).await.expect("sidecar starts");
        let addr = sidecar.listeners[0];
        let admin = sidecar.admin.expect("admin endpoint");
        Self {
            brokers,
            sidecar,
            addr,
            admin,
            _data: data,
        }
    }

    async fn stop(self) {
        tokio::time::timeout(STEP_TIMEOUT, self.sidecar.shutdown())
            .await
            .expect("sidecar stops");
        for broker in self.brokers {
            broker.stop().await;
        }
    }

    /// GETs an admin path: (status line, body).
    async fn admin(&self, path: &str) -> (String, String) {
        let mut socket = tokio::net::TcpStream::connect(self.admin)
            .await
            .expect("admin connect");
        socket
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .expect("admin request");
        let mut text = String::new();
        tokio::time::timeout(STEP_TIMEOUT, socket.read_to_string(&mut text))
            .await
            .expect("admin answers in time")
            .expect("admin read");
        let (head, body) = text.split_once("\r\n\r\n").expect("http response");
        (
            head.lines().next().unwrap_or_default().to_owned(),
            body.to_owned(),
        )
    }

    async fn stats(&self) -> serde_json::Value {
        let (status, body) = self.admin("/stats").await;
        assert!(status.contains("200"), "{status}");
        serde_json::from_str(&body).expect("stats json")
    }
}

fn stored(state: &BrokerState, topic: &str) -> u64 {
    (0..4)
        .map(|queue| state.store.queue_offsets(topic, queue).1)
        .sum()
}

async fn produce(addr: SocketAddr, instance: &str, topic: &str, count: usize) {
    let bodies: Vec<String> = (0..count)
        .map(|index| format!("{topic}-{index:05}"))
        .collect();
    send_all(addr, instance, &format!("{instance}_group"), topic, &bodies).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_pops_and_pulls_go_through_the_sidecar_to_the_right_brokers() {
    const TOPIC: &str = "MeshTopic";
    const MESSAGES: usize = 10_000;
    let mesh = Mesh::start().await;
    let started = Instant::now();
    produce(mesh.addr, "mesh-producer", TOPIC, MESSAGES).await;
    let on_a = stored(&mesh.brokers[0].state, TOPIC);
    let on_b = stored(&mesh.brokers[1].state, TOPIC);
    assert_eq!(
        on_a + on_b,
        MESSAGES as u64,
        "every acknowledged message is stored"
    );
    // The balancer draws by weight (alias table and random): 3:1 within 3 points.
    assert!(
        (7_200..=7_800).contains(&on_a),
        "weights 300:100 put {on_a} on broker-a and {on_b} on broker-b"
    );
    println!(
        "{MESSAGES} sends through the sidecar in {:?}, all SEND_OK: broker-a stored {on_a}, broker-b {on_b}",
        started.elapsed()
    );

    // A POP consumer: the brokers answer QUERY_ASSIGNMENT with POP.
    let pop = Collector::default();
    let mut pop_consumer = DefaultMQPushConsumer::builder(harness().runtime.clone())
        .client_config(client_config(mesh.addr, "mesh-pop"))
        .consumer_group("mesh_pop_group")
        .client_rebalance(false)
        // Long enough that acks land in time on a loaded 2-core CI machine (debug build).
        .pop_invisible_time(15_000)
        .build();
    pop_consumer.subscribe(TOPIC, "*").await.expect("subscribe");
    pop_consumer.register_message_listener_concurrently(pop.clone());
    tokio::time::timeout(STEP_TIMEOUT, pop_consumer.start())
        .await
        .expect("in time")
        .expect("pop consumer start");
    pop.wait_for(MESSAGES, STEP_TIMEOUT).await;
    let received = started.elapsed();
    // Acks that missed their broker would bring messages back after the 15 s invisible time.
    let quiet_until = Instant::now() + Duration::from_secs(17);
    while Instant::now() < quiet_until {
        let left = quiet_until.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, pop.arrived.notified()).await;
    }
    pop_consumer.shutdown().await;
    let deliveries: usize = pop.seen.lock().expect("seen").values().sum();
    assert_eq!(
        deliveries, MESSAGES,
        "no redelivery after the invisible time"
    );
    println!(
        "POP consumer received all {MESSAGES} (at {received:?}) and none came back within 17 s of the 15 s invisible time"
    );

    // A push consumer with client-side rebalance: pulls pass through to the broker they name.
    let push = Collector::default();
    let mut push_consumer = DefaultMQPushConsumer::builder(harness().runtime.clone())
        .client_config(client_config(mesh.addr, "mesh-push"))
        .consumer_group("mesh_push_group")
        .message_model(MessageModel::Clustering)
        .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
        .build();
    push_consumer
        .subscribe(TOPIC, "*")
        .await
        .expect("subscribe");
    push_consumer.register_message_listener_concurrently(push.clone());
    tokio::time::timeout(STEP_TIMEOUT, push_consumer.start())
        .await
        .expect("in time")
        .expect("push consumer start");
    push.wait_for(MESSAGES, STEP_TIMEOUT).await;
    push_consumer.shutdown().await;
    let duplicates = push
        .seen
        .lock()
        .expect("seen")
        .values()
        .filter(|count| **count > 1)
        .count();
    assert_eq!(duplicates, 0, "pull delivered each message once");
    println!("push consumer (pull through the sidecar) received all {MESSAGES} exactly once");

    // The admin endpoint saw exactly this traffic.
    let stats = mesh.stats().await;
    assert_eq!(stats["requests_by_code"]["SEND_MESSAGE"], MESSAGES as u64);
    assert_eq!(stats["messages_in"][TOPIC], MESSAGES as u64);
    let popped: u64 = stats["messages_out"]
        .as_array()
        .expect("messages_out")
        .iter()
        .filter(|entry| entry["group"] == "mesh_pop_group")
        .map(|entry| entry["count"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(popped, MESSAGES as u64, "popped messages counted once each");
    let pulled: u64 = stats["messages_out"]
        .as_array()
        .expect("messages_out")
        .iter()
        .filter(|entry| entry["group"] == "mesh_push_group")
        .map(|entry| entry["count"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(pulled, MESSAGES as u64, "pulled messages counted once each");
    assert_eq!(stats["decode_errors"], 0);
    let a = &stats["clusters"]["brokers"][mesh.brokers[0].addr.to_string()];
    let b = &stats["clusters"]["brokers"][mesh.brokers[1].addr.to_string()];
    assert_eq!(a["errors"], 0);
    assert_eq!(b["errors"], 0);
    assert!(a["requests"].as_u64() >= Some(on_a), "{a}");
    assert!(b["requests"].as_u64() >= Some(on_b), "{b}");
    let (_, metrics) = mesh.admin("/metrics").await;
    assert!(
        metrics.contains("rocketmq_messages_in_total{topic=\"MeshTopic\"} 10000"),
        "{metrics}"
    );
    assert!(metrics.contains("rocketmesh_requests_total{code=\"10\",name=\"SEND_MESSAGE\"} 10000"));
    let send_cost_count =
        format!("rocketmq_send_cost_time_count{{topic=\"MeshTopic\"}} {MESSAGES}");
    assert!(metrics.contains(&send_cost_count), "{metrics}");
    let (_, clusters) = mesh.admin("/clusters").await;
    let clusters: serde_json::Value = serde_json::from_str(&clusters).expect("clusters json");
    let weights: Vec<u64> = clusters["clusters"][0]["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|host| host["weight"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(weights, vec![300, 100]);
    let (ready, _) = mesh.admin("/ready").await;
    assert!(ready.contains("200"), "{ready}");
    let (_, dump) = mesh.admin("/config_dump").await;
    assert!(dump.contains("\"broker_name\": \"broker-b\""), "{dump}");
    println!(
        "admin: {} SEND_MESSAGE, {} in, {popped} popped, {pulled} pulled, broker-a {} requests, broker-b {}",
        stats["requests_by_code"]["SEND_MESSAGE"],
        stats["messages_in"][TOPIC],
        a["requests"],
        b["requests"]
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_without_a_route_gets_topic_not_exist() {
    let mesh = Mesh::start().await;
    let mut producer = DefaultMQProducer::builder(harness().runtime.clone())
        .client_config(client_config(mesh.addr, "unrouted-producer"))
        .producer_group("unrouted_group")
        .build();
    tokio::time::timeout(STEP_TIMEOUT, producer.start())
        .await
        .expect("in time")
        .expect("producer start");
    let message = Message::builder()
        .topic("Unrouted")
        .body_slice(b"nowhere")
        .build()
        .expect("message");
    let sent = tokio::time::timeout(STEP_TIMEOUT, producer.send(message))
        .await
        .expect("in time");
    producer.shutdown().await;
    assert!(sent.is_err(), "a send without a route must fail: {sent:?}");
    let stats = mesh.stats().await;
    assert!(
        stats["responses_by_code"]["TOPIC_NOT_EXIST"].as_u64() >= Some(1),
        "{stats}"
    );
    assert_eq!(stored(&mesh.brokers[0].state, "Unrouted"), 0);
    assert_eq!(stored(&mesh.brokers[1].state, "Unrouted"), 0);
    println!(
        "send to a topic without a route failed: {:?}; the sidecar answered TOPIC_NOT_EXIST {} times",
        sent.err().map(|error| error.to_string()),
        stats["responses_by_code"]["TOPIC_NOT_EXIST"]
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_check_reaches_the_producer_through_the_sidecar() {
    const TX_TOPIC: &str = "MeshTransactions";
    let mesh = Mesh::start().await;
    let listener = CommitOnCheck::default();
    let mut producer =
        rocketmq_client_rust::TransactionMQProducer::builder(harness().runtime.clone())
            .client_config(client_config(mesh.addr, "mesh-tx"))
            .producer_group("mesh_tx_group")
            .topics(vec![TX_TOPIC])
            .transaction_listener(listener.clone())
            .build();
    tokio::time::timeout(STEP_TIMEOUT, producer.start())
        .await
        .expect("in time")
        .expect("start");
    let message = Message::builder()
        .topic(TX_TOPIC)
        .body_slice(b"checked-back")
        .build()
        .expect("message");
    tokio::time::timeout(
        STEP_TIMEOUT,
        producer.send_message_in_transaction::<(), _>(message, None),
    )
    .await
    .expect("in time")
    .expect("half message sent");
    let visible = || {
        mesh.brokers
            .iter()
            .map(|broker| stored(&broker.state, TX_TOPIC))
            .sum::<u64>()
    };
    assert_eq!(visible(), 0, "the half message is not visible");
    let deadline = Instant::now() + STEP_TIMEOUT;
    while visible() == 0 {
        assert!(
            Instant::now() < deadline,
            "the check never committed the message ({} checks)",
            listener.checks.load(Ordering::SeqCst)
        );
        // The commit lands in the broker's store, which signals nothing to tests.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    producer.shutdown().await;
    let checks = listener.checks.load(Ordering::SeqCst);
    assert!(checks >= 1);
    println!(
        "the broker's transaction check reached the producer through the sidecar ({checks} checks); its commit made the message visible"
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_garbage_loses_only_its_own_connection() {
    const TOPIC: &str = "MeshSteady";
    const MESSAGES: usize = 500;
    let mesh = Mesh::start().await;
    let addr = mesh.addr;
    let steady =
        tokio::spawn(async move { produce(addr, "steady-producer", TOPIC, MESSAGES).await });
    // Wait until the steady producer is mid-stream, then send garbage on another connection.
    let deadline = Instant::now() + STEP_TIMEOUT;
    while stored(&mesh.brokers[0].state, TOPIC) + stored(&mesh.brokers[1].state, TOPIC) < 50 {
        assert!(
            Instant::now() < deadline,
            "the steady producer never got going"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut garbage = tokio::net::TcpStream::connect(mesh.addr)
        .await
        .expect("connect");
    // A sane length prefix around a header that is not JSON: decodable length, undecodable header.
    let mut frame = Vec::new();
    frame.extend_from_slice(&12u32.to_be_bytes());
    frame.extend_from_slice(&8u32.to_be_bytes());
    frame.extend_from_slice(b"{garbage");
    garbage.write_all(&frame).await.expect("write garbage");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(STEP_TIMEOUT, garbage.read_to_end(&mut rest))
        .await
        .expect("the sidecar closes the garbage connection in time");
    assert!(closed.is_ok() && rest.is_empty(), "{closed:?} {rest:?}");
    tokio::time::timeout(STEP_TIMEOUT, steady)
        .await
        .expect("in time")
        .expect("the steady producer saw no error");
    let total = stored(&mesh.brokers[0].state, TOPIC) + stored(&mesh.brokers[1].state, TOPIC);
    assert_eq!(total, MESSAGES as u64);
    let stats = mesh.stats().await;
    assert_eq!(stats["decode_errors"], 1);
    println!(
        "garbage closed its own connection (decode_errors 1) while another client sent all {MESSAGES} messages without an error"
    );
    mesh.stop().await;
}
