//! On-demand routes, measured: what the first request for a new topic costs, and how the
//! sidecar's memory follows the topics its applications use.
//!
//! `cargo bench --bench ondemand` runs three phases on loopback, each against a bundled broker
//! and an in-process control plane:
//!
//! 1. **First request.** A real client (rocketmq-client-rust) sends one message to each of 200
//!    topics it never used, then one more to each: the first send of a topic includes the route
//!    request the sidecar holds while it subscribes the topic over xDS. Printed: p50 and p99 of
//!    the first send, of the second, and of their difference per topic (target: ≤ 5 ms), plus
//!    the same for a bare GET_ROUTEINFO_BY_TOPIC (the sidecar's own part).
//! 2. **Memory follows use.** The control plane holds 100,000 topics. Two sidecar processes
//!    (release build) serve apps that use 100 topics and 1 topic: their subscription counts and
//!    RSS are printed side by side.
//! 3. **Idle topics go.** A sidecar process with `idle_unsubscribe_after_s: 2` gets 1,000 topics,
//!    then none: its subscriptions and RSS before, at the peak, and after the sweep are printed.
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) every phase runs small (10 topics,
//! 2,000 in the control plane), as a check that it works.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rocketmesh::control_plane::{self, ControlPlaneConfig, RunningControlPlane};
use rocketmesh::proxy::{self, SidecarConfig};
use rocketmesh::remoting::header::GetRouteInfoRequestHeader;
use rocketmesh::remoting::{RemotingCommand, RequestCode, ResponseCode};
use rocketmesh_xds::spec::{QueueDataSpec, TopicRouteSpec};
use rocketmq_client_rust::DefaultMQProducer;
use rocketmq_model::common::message::message_single::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "../tests/common/mod.rs"]
mod common;
use common::raw::RawClient;
use common::{RunningBroker, STEP_TIMEOUT, client_config, harness};

const WAIT: Duration = Duration::from_secs(60);

struct Sizes {
    new_topics: usize,
    control_plane_topics: usize,
    many: usize,
    idle_topics: usize,
}

fn control_plane_config(broker: SocketAddr, catch_all: bool) -> ControlPlaneConfig {
    let routes = if catch_all {
        r#"routes:
  - match: { topic: { prefix: "" } }
    route: { cluster: local }
"#
    } else {
        ""
    };
    let yaml = format!(
        r#"listen: "127.0.0.1:0"
admin: "127.0.0.1:0"
clusters:
  - name: local
    endpoints:
      - {{ address: "{broker}", metadata: {{ broker_name: broker-a, cluster_name: DefaultCluster, read_queue_num: 4, write_queue_num: 4 }} }}
{routes}"#
    );
    serde_yaml_ng::from_str(&yaml).expect("control-plane config")
}

fn sidecar_yaml(listen: SocketAddr, admin: SocketAddr, ads: SocketAddr, idle_s: u64) -> String {
    format!(
        r#"listeners: [{{ address: "{listen}" }}]
admin: {{ address: "{admin}" }}
xds: {{ address: "{ads}", node_id: ondemand-bench, idle_unsubscribe_after_s: {idle_s} }}
"#
    )
}

fn free_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

async fn producer(namesrv: SocketAddr, instance: &str) -> DefaultMQProducer {
    let mut producer = DefaultMQProducer::builder(harness().runtime.clone())
        .client_config(client_config(namesrv, instance))
        .producer_group(format!("{instance}_group"))
        .send_msg_timeout(10_000)
        .build();
    tokio::time::timeout(STEP_TIMEOUT, producer.start())
        .await
        .expect("in time")
        .expect("producer start");
    producer
}

async fn send(producer: &mut DefaultMQProducer, topic: &str) {
    let message = Message::builder()
        .topic(topic)
        .body_slice(b"on-demand")
        .build()
        .expect("message");
    let result = tokio::time::timeout(STEP_TIMEOUT, producer.send(message))
        .await
        .expect("in time")
        .unwrap_or_else(|error| panic!("send to {topic}: {error}"))
        .expect("a result");
    assert_eq!(format!("{:?}", result.send_status), "SendOk", "{topic}");
}

async fn route_info(client: &mut RawClient, topic: &str) {
    let answer = client
        .call(
            RemotingCommand::request(RequestCode::GET_ROUTEINFO_BY_TOPIC, 0).with_header(
                &GetRouteInfoRequestHeader {
                    topic: topic.into(),
                    ..Default::default()
                },
            ),
        )
        .await;
    assert_eq!(
        answer.code,
        ResponseCode::SUCCESS.0,
        "{topic}: {:?}",
        answer.remark
    );
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

fn summary(label: &str, mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let (p50, p99) = (quantile(&samples, 0.5), quantile(&samples, 0.99));
    println!(
        "  {label:<44} p50 {:>8.3} ms  p99 {:>8.3} ms",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
    (p50, p99)
}

/// Per-topic difference, clamped at zero (a second send can be the slower one).
fn added(first: &[Duration], known: &[Duration]) -> Vec<Duration> {
    first
        .iter()
        .zip(known)
        .map(|(first, known)| first.saturating_sub(*known))
        .collect()
}

async fn first_request_cost(sizes: &Sizes) {
    let data = tempfile::tempdir().expect("tempdir");
    let broker = RunningBroker::start(data.path()).await;
    let control_plane = control_plane::start(control_plane_config(broker.addr, true))
        .await
        .expect("control plane");
    let yaml = sidecar_yaml(
        "127.0.0.1:0".parse().expect("address"),
        "127.0.0.1:0".parse().expect("address"),
        control_plane.ads_address,
        0,
    );
    let sidecar = proxy::start(SidecarConfig::parse(&yaml).expect("config"))
        .await
        .expect("sidecar");
    let address = sidecar.listeners[0];
    let ondemand = sidecar.proxy.ondemand().expect("xds").clone();
    assert!(ondemand.wait_connected(WAIT).await, "xDS connected");

    let mut producer = producer(address, "ondemand-bench").await;
    // Connections to the sidecar and its broker listener are made once, before measuring.
    send(&mut producer, "warm-up").await;
    let (mut first, mut known) = (Vec::new(), Vec::new());
    for index in 0..sizes.new_topics {
        let topic = format!("first-{index}");
        let started = Instant::now();
        send(&mut producer, &topic).await;
        first.push(started.elapsed());
        let started = Instant::now();
        send(&mut producer, &topic).await;
        known.push(started.elapsed());
    }
    producer.shutdown().await;

    let mut raw = RawClient::connect(address).await;
    route_info(&mut raw, "warm-up").await;
    let (mut raw_first, mut raw_known) = (Vec::new(), Vec::new());
    for index in 0..sizes.new_topics {
        let topic = format!("raw-{index}");
        let started = Instant::now();
        route_info(&mut raw, &topic).await;
        raw_first.push(started.elapsed());
        let started = Instant::now();
        route_info(&mut raw, &topic).await;
        raw_known.push(started.elapsed());
    }
    println!(
        "first request for a new topic, {} topics, rocketmq-client-rust through the sidecar fed by the control plane:",
        sizes.new_topics
    );
    summary("first send of a new topic", first.clone());
    summary("second send (known topic)", known.clone());
    let (p50, p99) = summary("added by the first (per topic)", added(&first, &known));
    println!("  bare GET_ROUTEINFO_BY_TOPIC:");
    summary("new topic", raw_first.clone());
    summary("known topic", raw_known.clone());
    summary("added (per topic)", added(&raw_first, &raw_known));
    let target = Duration::from_millis(5);
    println!(
        "  target: the first send adds <= 5 ms at p50 and p99: {}",
        if p50 <= target && p99 <= target {
            "met"
        } else {
            "MISSED"
        }
    );
    sidecar.shutdown().await;
    control_plane.shutdown().await;
    broker.stop().await;
}

/// A `rocketmesh sidecar` process (release build under `cargo bench`), killed on drop.
struct SidecarProcess {
    child: Child,
    address: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl SidecarProcess {
    async fn start(ads: SocketAddr, idle_s: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (address, admin) = (free_address(), free_address());
        let path = dir.path().join("sidecar.yaml");
        std::fs::write(&path, sidecar_yaml(address, admin, ads, idle_s)).expect("config");
        let child = Command::new(env!("CARGO_BIN_EXE_rocketmesh"))
            .args(["sidecar", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the sidecar");
        let sidecar = Self {
            child,
            address,
            admin,
            _dir: dir,
        };
        let deadline = Instant::now() + WAIT;
        while sidecar
            .get("/ready")
            .await
            .is_none_or(|(status, _)| status != 200)
        {
            assert!(Instant::now() < deadline, "the sidecar never got ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sidecar
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut socket = tokio::net::TcpStream::connect(self.admin).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        socket.write_all(request.as_bytes()).await.ok()?;
        let mut text = String::new();
        tokio::time::timeout(WAIT, socket.read_to_string(&mut text))
            .await
            .ok()?
            .ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    }

    /// Topic routes subscribed now.
    async fn topics(&self) -> usize {
        let (_, body) = self.get("/config_dump").await.expect("config_dump");
        let dump: serde_json::Value = serde_json::from_str(&body).expect("json");
        dump["xds_state"]["client"]["types"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(type_url, _)| type_url.ends_with("TopicRoute"))
            .map(|(_, state)| {
                state["subscribed"]
                    .as_object()
                    .map_or(0, |names| names.len())
            })
            .sum()
    }

    fn memory(&self) -> Memory {
        Memory {
            rss_kib: self.status_kib("VmRSS:"),
            anon_kib: self.status_kib("RssAnon:"),
        }
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .expect("status field")
    }
}

/// A process's resident memory. Anonymous memory is what it allocated; the rest of RSS is
/// mostly pages of its executable it has touched (page cache: shared, evictable, and kept once
/// a code path has run).
#[derive(Clone, Copy)]
struct Memory {
    rss_kib: u64,
    anon_kib: u64,
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RSS {:>6} KiB (anonymous {:>6} KiB)",
            self.rss_kib, self.anon_kib
        )
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Uses `count` topics through `sidecar` with a real client: one send each.
async fn use_topics(sidecar: &SidecarProcess, prefix: &str, count: usize) {
    let mut producer = producer(sidecar.address, &format!("{prefix}-app")).await;
    for index in 0..count {
        send(&mut producer, &format!("{prefix}-{index}")).await;
    }
    producer.shutdown().await;
}

fn fill(control_plane: &RunningControlPlane, count: usize) {
    for index in 0..count {
        let spec = TopicRouteSpec {
            topic: format!("held-{index}"),
            cluster: "local".into(),
            queues: vec![QueueDataSpec {
                broker_name: "broker-a".into(),
                read_queue_nums: 4,
                write_queue_nums: 4,
                perm: 6,
                topic_sys_flag: 0,
            }],
            ..TopicRouteSpec::default()
        };
        control_plane
            .store
            .upsert(spec.build().expect("topic route"));
    }
}

/// How long RSS is watched after the last idle topic went.
const RSS_WATCH: Duration = Duration::from_secs(5);

async fn memory_follows_use(sizes: &Sizes) {
    let data = tempfile::tempdir().expect("tempdir");
    let broker = RunningBroker::start(data.path()).await;
    // No catch-all here: the control plane serves exactly the topics it holds.
    let control_plane = control_plane::start(control_plane_config(broker.addr, false))
        .await
        .expect("control plane");
    fill(&control_plane, sizes.control_plane_topics);
    let held = control_plane
        .store
        .names(rocketmesh_xds::types::TOPIC_ROUTE)
        .len();

    let many = SidecarProcess::start(control_plane.ads_address, 0).await;
    let one = SidecarProcess::start(control_plane.ads_address, 0).await;
    let (many_before, one_before) = (many.memory(), one.memory());
    use_topics(&many, "held", sizes.many).await;
    use_topics(&one, "held", 1).await;
    println!(
        "memory follows use: the control plane holds {held} topics; two sidecar processes (at start: {many_before}; {one_before}):"
    );
    println!(
        "  sidecar whose app uses {:>5} topics: {:>5} subscribed, {}",
        sizes.many,
        many.topics().await,
        many.memory()
    );
    println!(
        "  sidecar whose app uses {:>5} topic:  {:>5} subscribed, {}",
        1,
        one.topics().await,
        one.memory()
    );
    drop(many);
    drop(one);

    let idle = SidecarProcess::start(control_plane.ads_address, 2).await;
    let before = idle.memory();
    use_topics(&idle, "held", sizes.idle_topics).await;
    let (peak_topics, peak) = (idle.topics().await, idle.memory());
    let stopped_using = Instant::now();
    while idle.topics().await > 0 {
        assert!(
            stopped_using.elapsed() < WAIT,
            "idle topics were never unsubscribed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone_after = stopped_using.elapsed();
    let at_unsubscribe = idle.memory();
    // The allocator gives freed pages back on its own schedule: watch for a while.
    let watching = Instant::now();
    let mut after = at_unsubscribe;
    while watching.elapsed() < RSS_WATCH {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = idle.memory();
        if now.anon_kib < after.anon_kib {
            after = now;
        }
    }
    println!("idle topics go (idle_unsubscribe_after_s: 2):");
    println!("  at start:                          {before}");
    println!("  {peak_topics:>4} topics subscribed:            {peak}");
    println!("  all unsubscribed {gone_after:>5.1?} after last use: {at_unsubscribe}");
    println!("  lowest in the next {RSS_WATCH:?}:            {after}");
    println!(
        "  anonymous memory given back: {} of the {} KiB grown",
        peak.anon_kib.saturating_sub(after.anon_kib),
        peak.anon_kib.saturating_sub(before.anon_kib)
    );
    drop(idle);
    control_plane.shutdown().await;
    broker.stop().await;
}

fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    let sizes = if full {
        Sizes {
            new_topics: 200,
            control_plane_topics: 100_000,
            many: 100,
            idle_topics: 1_000,
        }
    } else {
        Sizes {
            new_topics: 10,
            control_plane_topics: 2_000,
            many: 10,
            idle_topics: 20,
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // `cargo bench --bench ondemand -- memory` (or `first`) runs one part.
    let only = |part: &str| {
        let named: Vec<String> = std::env::args()
            .filter(|arg| arg == "memory" || arg == "first")
            .collect();
        named.is_empty() || named.iter().any(|arg| arg == part)
    };
    runtime.block_on(async {
        if only("first") {
            first_request_cost(&sizes).await;
        }
        if only("memory") {
            memory_follows_use(&sizes).await;
        }
    });
}
