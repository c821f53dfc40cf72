//! Hot route swaps with a running consumer: a third broker added to the sidecar's routes gets its
//! own address and the consumer starts pulling its queues without a restart; when the broker is
//! removed again its listener closes, its upstream connections drain, and new sends stay on the
//! brokers that remain.

mod common;

use std::time::{Duration, Instant};

use common::raw::RawClient;
use common::{Collector, RunningBroker, STEP_TIMEOUT, harness, send_all};
use rocketmesh::proxy;
use rocketmesh::remoting::header::SendMessageRequestHeader;
use rocketmesh::remoting::{RemotingCommand, RequestCode};
use rocketmq_client_rust::{ClientConfig, DefaultMQPushConsumer, MQPushConsumer};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_protocol::protocol::heartbeat::message_model::MessageModel;

const TOPIC: &str = "SwapTopic";
const PER_STEP: usize = 30;

fn bodies(prefix: &str) -> Vec<String> {
    (0..PER_STEP)
        .map(|index| format!("{prefix}-{index}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_added_and_removed_at_run_time() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut brokers = Vec::new();
    for name in ["broker-a", "broker-b", "broker-c"] {
        brokers.push(
            RunningBroker::start_with(&data.path().join(name), |config| {
                config.broker_name = name.into();
            })
            .await,
        );
    }
    let (a, b, c) = (brokers[0].addr, brokers[1].addr, brokers[2].addr);
    let two = common::sidecar_config(&[("broker-a", a), ("broker-b", b)], "");
    let three = common::sidecar_config(&[("broker-a", a), ("broker-b", b), ("broker-c", c)], "");
    let sidecar = proxy::start(two.clone()).await.expect("sidecar");
    let namesrv = sidecar.listeners[0];

    // broker-c already holds messages of the topic; the mesh does not know it yet.
    let mut direct_c = RawClient::connect(c).await;
    for body in bodies("on-c") {
        let send = RemotingCommand::request(RequestCode::SEND_MESSAGE, 0)
            .with_header(&SendMessageRequestHeader {
                producer_group: "swap_seed".into(),
                topic: TOPIC.into(),
                default_topic: "TBW102".into(),
                default_topic_queue_nums: 4,
                queue_id: 0,
                born_timestamp: rocketmesh::broker::schedule::now_ms(),
                ..Default::default()
            })
            .with_body(body);
        assert_eq!(direct_c.call(send).await.code, 0);
    }
    send_all(
        namesrv,
        "swap-producer-1",
        "swap_producer",
        TOPIC,
        &bodies("first"),
    )
    .await;

    let received = Collector::default();
    let client_config = ClientConfig::builder()
        .namesrv_addr(namesrv.to_string())
        .client_ip("127.0.0.1")
        .instance_name("swap-consumer")
        // The shortest route refresh the client allows.
        .poll_name_server_interval(10_000)
        .build()
        .expect("client config");
    let mut consumer = DefaultMQPushConsumer::builder(harness().runtime.clone())
        .client_config(client_config)
        .consumer_group("swap_group")
        .message_model(MessageModel::Clustering)
        .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
        .build();
    consumer.subscribe(TOPIC, "*").await.expect("subscribe");
    consumer.register_message_listener_concurrently(received.clone());
    tokio::time::timeout(STEP_TIMEOUT, consumer.start())
        .await
        .expect("in time")
        .expect("consumer start");
    received.wait_for(PER_STEP, STEP_TIMEOUT).await;
    assert_eq!(
        received.distinct(),
        PER_STEP,
        "broker-c is not in the routes yet"
    );

    // Add broker-c: it gets its own address, and the running consumer finds its queues.
    let added_at = Instant::now();
    sidecar.proxy.reload(three).expect("reload");
    let listening = sidecar.proxy.broker_listeners.listening();
    let c_address = listening
        .iter()
        .find(|listener| listener.broker_name == "broker-c")
        .map(|listener| listener.local)
        .expect("broker-c has a sidecar address");
    received.wait_for(2 * PER_STEP, STEP_TIMEOUT).await;
    println!(
        "after broker-c joined the routes, the running consumer read its {PER_STEP} messages in {:?}",
        added_at.elapsed()
    );

    // Remove it: its listener closes, its upstream pool drains, sends stay on a and b.
    let on_c = common::messages_on(c, TOPIC).await;
    sidecar.proxy.reload(two).expect("reload");
    assert_eq!(sidecar.proxy.broker_listeners.listening().len(), 2);
    assert!(
        sidecar.proxy.upstreams.existing(c).is_none(),
        "broker-c's pool is retired"
    );
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if tokio::net::TcpStream::connect(c_address).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        refused.is_ok(),
        "broker-c's sidecar address stops accepting"
    );
    send_all(
        namesrv,
        "swap-producer-2",
        "swap_producer",
        TOPIC,
        &bodies("second"),
    )
    .await;
    received.wait_for(3 * PER_STEP, STEP_TIMEOUT).await;
    assert_eq!(
        common::messages_on(c, TOPIC).await,
        on_c,
        "no send reached the removed broker"
    );
    let duplicates = received
        .seen
        .lock()
        .expect("seen")
        .values()
        .filter(|count| **count > 1)
        .count();
    println!(
        "after broker-c left: its address refuses connections, {PER_STEP} new sends all went to broker-a/b ({} and {}), {} distinct messages received, {duplicates} duplicates",
        common::messages_on(a, TOPIC).await,
        common::messages_on(b, TOPIC).await,
        received.distinct()
    );
    assert_eq!(duplicates, 0);
    consumer.shutdown().await;
    sidecar.shutdown().await;
    for broker in brokers {
        broker.stop().await;
    }
}
