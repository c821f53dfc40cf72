//! The broker process is killed with SIGKILL in the middle of a sync-flush send load from a real
//! client; every acknowledged message must be there afterwards, with its body and properties, at
//! the queue offset it was acknowledged with, with no gaps or duplicates, and findable by key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use rocketmesh::broker::store::{MessageStore, MessageStoreConfig};
use rocketmesh::remoting::message::MessageRecord;
use rocketmq_client_rust::{ClientConfig, ClientRuntime, ClientRuntimeConfig, DefaultMQProducer};
use rocketmq_model::common::message::message_single::Message;
use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};

mod common;

const TOPIC: &str = "CrashTopic";
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts `rocketmesh broker` (sync flush) on an ephemeral port.
fn start_broker(data_dir: &Path) -> (Child, SocketAddr) {
    common::start_broker_process(data_dir, &["--listen", "127.0.0.1:0", "--flush", "sync"])
}

fn client_runtime() -> (
    RuntimeOwner,
    Arc<ClientRuntime>,
    rocketmq_observability::TelemetryRuntimeGuard,
) {
    let config = RuntimeConfig {
        thread_name: "crash-test-client".to_string(),
        worker_threads: 2,
        ..Default::default()
    };
    let owner = RuntimeOwner::plan(config)
        .expect("plan")
        .build()
        .expect("runtime");
    let mut telemetry_config = rocketmq_observability::TelemetryBootstrapConfig::default();
    telemetry_config.logging.filter = "off".to_string();
    let telemetry = rocketmq_observability::install_global(&telemetry_config).expect("telemetry");
    let runtime = ClientRuntime::try_new(
        owner.root_context().component("crash-test-client"),
        ClientRuntimeConfig::default(),
        telemetry.handle(),
    )
    .expect("client runtime");
    (owner, runtime, telemetry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_sends_survive_sigkill_of_the_broker() {
    let (owner, runtime, telemetry) = client_runtime();
    for run in 0..3usize {
        let data = tempfile::tempdir().expect("tempdir");
        let (mut broker, addr) = start_broker(data.path());
        let mut producer = DefaultMQProducer::builder(runtime.clone())
            .client_config(
                ClientConfig::builder()
                    .namesrv_addr(addr.to_string())
                    .client_ip("127.0.0.1")
                    .instance_name(format!("crash-producer-{run}"))
                    .build()
                    .expect("client config"),
            )
            .producer_group("crash_producer")
            .send_msg_timeout(5_000)
            .retry_times_when_send_failed(0)
            .build();
        tokio::time::timeout(STEP_TIMEOUT, producer.start())
            .await
            .expect("in time")
            .expect("start");

        // (queue id, queue offset) -> index of the acknowledged message
        let mut acknowledged = BTreeMap::new();
        let kill_after = 200 + run * 137;
        for index in 0..kill_after {
            let message = Message::builder()
                .topic(TOPIC)
                .tags("crash")
                .key(format!("key-{index}"))
                .body_slice(format!("body-{index}-{}", "x".repeat(index % 300)).as_bytes())
                .build()
                .expect("message");
            let result = tokio::time::timeout(STEP_TIMEOUT, producer.send(message))
                .await
                .expect("in time")
                .unwrap_or_else(|error| panic!("send {index}: {error}"))
                .expect("result");
            let queue_id = result
                .message_queue
                .as_ref()
                .map(|q| q.queue_id())
                .expect("queue");
            acknowledged.insert((queue_id, result.queue_offset), index);
        }
        // Keep a send in flight while the broker dies.
        let in_flight = producer.send(
            Message::builder()
                .topic(TOPIC)
                .body_slice(b"in flight")
                .build()
                .expect("message"),
        );
        broker.kill().expect("SIGKILL the broker");
        broker.wait().expect("reap the broker");
        let _ = tokio::time::timeout(STEP_TIMEOUT, in_flight).await;
        producer.shutdown().await;

        let store = MessageStore::open(MessageStoreConfig::new(data.path(), addr))
            .expect("recover the store");
        let mut recovered = 0;
        for queue_id in 0..4 {
            let (min, max) = store.queue_offsets(TOPIC, queue_id);
            assert_eq!(min, 0);
            let raw = store
                .read_queue(TOPIC, queue_id, 0, max as usize, |_| true)
                .expect("read");
            assert_eq!(raw.len() as u64, max, "queue {queue_id} has no gaps");
            for (queue_offset, bytes) in raw.iter().enumerate() {
                let (record, _) = MessageRecord::decode(bytes, true).expect("record");
                assert_eq!(record.queue_offset, queue_offset as i64);
                if let Some(index) = acknowledged.get(&(queue_id, queue_offset as u64)) {
                    assert_eq!(
                        record.body,
                        format!("body-{index}-{}", "x".repeat(index % 300)).as_bytes(),
                        "acknowledged message {index}"
                    );
                    assert_eq!(record.keys(), Some(format!("key-{index}").as_str()));
                    assert_eq!(record.tags(), Some("crash"));
                    let by_key = store
                        .query_by_key(TOPIC, &format!("key-{index}"), false, 0, i64::MAX, 4)
                        .expect("query");
                    assert_eq!(by_key.len(), 1, "key-{index} is indexed once");
                    recovered += 1;
                }
            }
        }
        assert_eq!(
            recovered,
            acknowledged.len(),
            "every acknowledged message is back"
        );
        println!(
            "run {run}: broker killed after {} acknowledged sends; all recovered",
            acknowledged.len()
        );
    }
    let _ = runtime.shutdown().await;
    let _ = owner.shutdown_tasks().await;
    let _ = owner.shutdown_background();
    let _ = telemetry.shutdown();
}
