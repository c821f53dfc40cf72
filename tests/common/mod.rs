//! Shared by the integration tests that drive a real `rocketmq-client-rust` 1.0.0 client: brokers on
//! ephemeral loopback ports, the client runtime, and a collecting listener.
#![allow(dead_code)]

pub mod cpp;
pub mod raw;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rocketmesh::broker::{BrokerConfig, BrokerState, server};
use rocketmq_client_rust::{
    ClientConfig, ClientResult, ClientRuntime, ClientRuntimeConfig, ConsumeConcurrentlyContext,
    ConsumeConcurrentlyStatus, DefaultMQProducer, MessageListenerConcurrently,
};
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_single::Message;
use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};
use tokio::sync::{Notify, oneshot};

pub const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// A broker on an ephemeral loopback port, stopped when dropped.
pub struct RunningBroker {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub state: Arc<BrokerState>,
}

impl RunningBroker {
    pub async fn start(data_dir: &std::path::Path) -> Self {
        Self::start_with(data_dir, |_| {}).await
    }

    pub async fn start_with(
        data_dir: &std::path::Path,
        adjust: impl FnOnce(&mut BrokerConfig),
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut config = BrokerConfig {
            listen: addr,
            data_dir: data_dir.to_owned(),
            segment_size: 8 << 20,
            ..BrokerConfig::default()
        };
        adjust(&mut config);
        let state = Arc::new(BrokerState::open(config).expect("open broker"));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(listener, state.clone(), async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
            state,
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(STEP_TIMEOUT, task)
                .await
                .expect("broker stops")
                .expect("broker task");
        }
    }
}

pub struct ClientHarness {
    // Kept alive for the life of the process, with the runtime it owns.
    _owner: RuntimeOwner,
    pub runtime: Arc<ClientRuntime>,
    _telemetry: rocketmq_observability::TelemetryRuntimeGuard,
}

impl ClientHarness {
    fn start() -> Self {
        let mut config = RuntimeConfig {
            thread_name: "broker-test-client".to_string(),
            worker_threads: 2,
            ..Default::default()
        };
        config.blocking_lane_policies.metadata_io.max_queue_depth = 4096;
        let owner = RuntimeOwner::plan(config)
            .expect("plan")
            .build()
            .expect("runtime");
        let mut telemetry_config = rocketmq_observability::TelemetryBootstrapConfig::default();
        telemetry_config.logging.filter =
            std::env::var("ROCKETMESH_CLIENT_LOG").unwrap_or_else(|_| "error".to_string());
        telemetry_config.logging.console.ansi = false;
        let telemetry =
            rocketmq_observability::install_global(&telemetry_config).expect("telemetry");
        let runtime = ClientRuntime::try_new(
            owner.root_context().component("broker-test-client"),
            ClientRuntimeConfig {
                managed_memory_numerator: 1,
                managed_memory_denominator: 2,
                ..Default::default()
            },
            telemetry.handle(),
        )
        .expect("client runtime");
        Self {
            _owner: owner,
            runtime,
            _telemetry: telemetry,
        }
    }
}

pub fn client_config(namesrv: SocketAddr, instance: &str) -> ClientConfig {
    ClientConfig::builder()
        .namesrv_addr(namesrv.to_string())
        .client_ip("127.0.0.1")
        .instance_name(instance)
        .build()
        .expect("client config")
}

/// Counts deliveries per body and wakes the test on each.
#[derive(Clone, Default)]
pub struct Collector {
    pub seen: Arc<Mutex<BTreeMap<String, usize>>>,
    pub arrived: Arc<Notify>,
}

impl MessageListenerConcurrently for Collector {
    fn consume_message(
        &self,
        msgs: &[&MessageExt],
        _context: &ConsumeConcurrentlyContext,
    ) -> ClientResult<ConsumeConcurrentlyStatus> {
        {
            let mut seen = self.seen.lock().expect("collector");
            for message in msgs {
                let body = String::from_utf8_lossy(message.body().as_deref().unwrap_or_default())
                    .into_owned();
                *seen.entry(body).or_default() += 1;
            }
        }
        self.arrived.notify_one();
        Ok(ConsumeConcurrentlyStatus::ConsumeSuccess)
    }
}

impl Collector {
    pub fn distinct(&self) -> usize {
        self.seen.lock().expect("collector").len()
    }

    pub async fn wait_for(&self, distinct: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.distinct() < distinct {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "only {} of {distinct} messages arrived",
                self.distinct()
            );
            let _ = tokio::time::timeout(left, self.arrived.notified()).await;
        }
    }
}

/// Leaves every transaction undecided and commits when checked.
#[derive(Clone, Default)]
pub struct CommitOnCheck {
    pub checks: Arc<AtomicUsize>,
}

impl rocketmq_client_rust::TransactionListener for CommitOnCheck {
    fn execute_local_transaction(
        &self,
        _msg: &dyn rocketmq_model::common::message::MessageTrait,
        _arg: Option<&(dyn std::any::Any + Send + Sync)>,
    ) -> rocketmq_client_rust::LocalTransactionState {
        rocketmq_client_rust::LocalTransactionState::Unknown
    }

    fn check_local_transaction(
        &self,
        _msg: &MessageExt,
    ) -> rocketmq_client_rust::LocalTransactionState {
        self.checks.fetch_add(1, Ordering::SeqCst);
        rocketmq_client_rust::LocalTransactionState::CommitMessage
    }
}

/// One client runtime for the whole test binary: the client's telemetry can be installed once.
pub fn harness() -> &'static ClientHarness {
    static HARNESS: std::sync::OnceLock<ClientHarness> = std::sync::OnceLock::new();
    HARNESS.get_or_init(ClientHarness::start)
}

/// Starts a producer of `group` against `namesrv`, sends every body to `topic` with sync sends
/// (each must be SEND_OK), and shuts the producer down.
pub async fn send_all(
    namesrv: SocketAddr,
    instance: &str,
    group: &str,
    topic: &str,
    bodies: &[String],
) {
    let mut producer = DefaultMQProducer::builder(harness().runtime.clone())
        .client_config(client_config(namesrv, instance))
        .producer_group(group)
        .send_msg_timeout(10_000)
        .build();
    tokio::time::timeout(STEP_TIMEOUT, producer.start())
        .await
        .expect("in time")
        .expect("producer start");
    for (index, text) in bodies.iter().enumerate() {
        let message = Message::builder()
            .topic(topic)
            .body_slice(text.as_bytes())
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
    }
    producer.shutdown().await;
}

/// Starts a `rocketmesh broker` process with `args` plus `--data-dir data_dir`, and returns it with
/// the address it reports once it listens.
pub fn start_broker_process(
    data_dir: &std::path::Path,
    args: &[&str],
) -> (std::process::Child, SocketAddr) {
    let mut all: Vec<std::ffi::OsString> = std::iter::once("broker".into())
        .chain(args.iter().map(Into::into))
        .collect();
    all.push("--data-dir".into());
    all.push(data_dir.into());
    let (child, addr, _) = spawn_reporting(&all, "listen=");
    (child, addr)
}

/// Starts `rocketmesh ARGS` with info logs on stderr, and returns it with the address its log
/// reports after `marker` (e.g. `listen=`) and every stderr line from then on.
pub fn spawn_reporting(
    args: &[std::ffi::OsString],
    marker: &str,
) -> (
    std::process::Child,
    SocketAddr,
    std::sync::mpsc::Receiver<String>,
) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_rocketmesh"))
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rocketmesh");
    let stderr = child.stderr.take().expect("stderr");
    let (found, reported) = std::sync::mpsc::channel();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let marker = marker.to_owned();
    std::thread::spawn(move || {
        let mut found = Some(found);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split(marker.as_str()).nth(1)
                && let Some(found) = found.take()
            {
                let _ = found.send(
                    rest.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                );
            }
            let _ = lines_tx.send(line);
        }
    });
    let addr = reported
        .recv_timeout(STEP_TIMEOUT)
        .expect("the process reports its address")
        .parse()
        .expect("a socket address");
    (child, addr, lines)
}

/// A sidecar config on an ephemeral port (admin off) with `routes_yaml` (YAML list items, or
/// empty for one catch-all route) over one cluster `local` of `brokers`.
pub fn sidecar_config(
    brokers: &[(&str, SocketAddr)],
    routes_yaml: &str,
) -> rocketmesh::proxy::SidecarConfig {
    rocketmesh::proxy::SidecarConfig::parse(&sidecar_yaml(brokers, routes_yaml, ""))
        .expect("sidecar config")
}

/// The YAML of [`sidecar_config`], with `extra` top-level lines.
pub fn sidecar_yaml(brokers: &[(&str, SocketAddr)], routes_yaml: &str, extra: &str) -> String {
    sidecar_yaml_with_cluster(brokers, routes_yaml, extra, "")
}

/// As [`sidecar_yaml`], with `cluster_settings` (indented lines such as
/// `"    request_timeout_ms: 300\n"`) added to the cluster.
pub fn sidecar_yaml_with_cluster(
    brokers: &[(&str, SocketAddr)],
    routes_yaml: &str,
    extra: &str,
    cluster_settings: &str,
) -> String {
    let endpoints: String = brokers
        .iter()
        .map(|(name, address)| {
            format!(
                "      - {{ address: \"{address}\", metadata: {{ broker_name: {name}, cluster_name: DefaultCluster }} }}\n"
            )
        })
        .collect();
    let routes = if routes_yaml.is_empty() {
        "  - { match: { topic: { prefix: \"\" } }, route: { cluster: local } }\n"
    } else {
        routes_yaml
    };
    format!(
        "listeners: [{{ address: \"127.0.0.1:0\" }}]\nadmin: {{ address: null }}\n{extra}\nroutes:\n{routes}clusters:\n  - name: local\n{cluster_settings}    endpoints:\n{endpoints}"
    )
}

/// Routes of the two-broker tests: `Ordered*`/`Order*` topics keep broker and queue.
pub const ORDERED_THEN_ALL: &str = "  - { match: { topic: { prefix: \"Order\" } }, route: { cluster: local, ordered: true } }\n  - { match: { topic: { prefix: \"\" } }, route: { cluster: local } }\n";

/// Messages stored in queues 0..4 of `topic` on `broker` (the sum of max offsets).
pub async fn messages_on(broker: SocketAddr, topic: &str) -> i64 {
    use rocketmesh::remoting::header::GetMaxOffsetRequestHeader;
    use rocketmesh::remoting::{RemotingCommand, RequestCode};
    let mut connection = raw::RawClient::connect(broker).await;
    let mut total = 0;
    for queue_id in 0..4 {
        let answer = connection
            .call(
                RemotingCommand::request(RequestCode::GET_MAX_OFFSET, 0).with_header(
                    &GetMaxOffsetRequestHeader {
                        topic: topic.into(),
                        queue_id,
                        ..Default::default()
                    },
                ),
            )
            .await;
        total += answer
            .ext("offset")
            .and_then(|offset| offset.parse::<i64>().ok())
            .unwrap_or(0);
    }
    total
}

/// Creates `topic` on `broker` with `queues` read and write queues (UPDATE_AND_CREATE_TOPIC).
pub async fn create_topic(broker: SocketAddr, topic: &str, queues: i32) {
    use rocketmesh::remoting::header::CreateTopicRequestHeader;
    use rocketmesh::remoting::{RemotingCommand, RequestCode, ResponseCode};
    let header = CreateTopicRequestHeader {
        topic: topic.into(),
        default_topic: "TBW102".into(),
        read_queue_nums: queues,
        write_queue_nums: queues,
        perm: 6,
        topic_filter_type: "SINGLE_TAG".into(),
        ..CreateTopicRequestHeader::default()
    };
    let mut client = raw::RawClient::connect(broker).await;
    let response = client
        .call(
            RemotingCommand::request(RequestCode::UPDATE_AND_CREATE_TOPIC, 0).with_header(&header),
        )
        .await;
    assert_eq!(
        response.response_code(),
        ResponseCode::SUCCESS,
        "{response:?}"
    );
}
