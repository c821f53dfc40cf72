//! The sidecar's on-demand routes: a `rocketmesh control-plane` process serves topic routes and
//! clusters over delta xDS, a sidecar with an `xds` section and no static route asks for each topic
//! when a request first names it, and real clients (rocketmq-client-rust, and bare remoting
//! requests where every field must be controlled) go through it to bundled brokers. Everything on
//! ephemeral loopback ports.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rocketmesh::proxy::{self, RunningSidecar, SidecarConfig};
use rocketmesh::remoting::body::{JsonBody, TopicRouteData};
use rocketmesh::remoting::header::GetRouteInfoRequestHeader;
use rocketmesh::remoting::{RemotingCommand, RequestCode, ResponseCode};
use rocketmq_client_rust::DefaultMQProducer;
use rocketmq_model::common::message::message_single::Message;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::raw::RawClient;
use common::{RunningBroker, STEP_TIMEOUT, client_config, harness, messages_on, spawn_reporting};

/// Bound of every wait for something the test expects to happen.
const WAIT: Duration = Duration::from_secs(20);

/// A `rocketmesh control-plane` process, killed when dropped.
struct ControlPlane {
    child: Child,
    ads: SocketAddr,
    admin: SocketAddr,
}

impl ControlPlane {
    fn start(config: &Path) -> Self {
        let (child, ads, lines) = spawn_reporting(
            &["control-plane".into(), "--config".into(), config.into()],
            "xds=",
        );
        let deadline = Instant::now() + WAIT;
        let admin = loop {
            let line = lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("the control plane logs its admin address");
            if let Some(rest) = line.split("admin=Some(").nth(1) {
                break rest
                    .split(')')
                    .next()
                    .and_then(|address| address.parse().ok())
                    .expect("an admin address");
            }
        };
        // Keep draining its log so the pipe never fills.
        std::thread::spawn(move || while lines.recv().is_ok() {});
        Self { child, ads, admin }
    }

    /// SIGKILL, and wait for the process to be gone.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

fn brokers_yaml(brokers: &[(&str, SocketAddr)]) -> String {
    brokers
        .iter()
        .map(|(name, address)| {
            format!(
                "      - {{ address: \"{address}\", metadata: {{ broker_name: {name}, cluster_name: DefaultCluster }} }}\n"
            )
        })
        .collect()
}

/// A control-plane file: one cluster `local` of `brokers`, topics starting with `known` routed
/// to it, nothing else (other topics do not exist).
fn control_plane_yaml(listen: SocketAddr, brokers: &[(&str, SocketAddr)]) -> String {
    format!(
        r#"listen: "{listen}"
admin: "127.0.0.1:0"
reload_interval_ms: 100
clusters:
  - name: local
    endpoints:
{}routes:
  - match: {{ topic: {{ prefix: "known" }} }}
    route: {{ cluster: local }}
"#,
        brokers_yaml(brokers)
    )
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("control-plane.yaml");
    // Written whole then renamed, so the polling reload never reads half a file.
    let partial = dir.join("control-plane.yaml.partial");
    std::fs::write(&partial, text).expect("write config");
    std::fs::rename(&partial, &path).expect("rename config");
    path
}

/// An address nothing listens on now (bound, read, released), for a control plane started later.
fn free_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

async fn sidecar(ads: SocketAddr, request_timeout_ms: u64, idle_s: u64) -> RunningSidecar {
    sidecar_with(ads, request_timeout_ms, idle_s, "").await
}

/// A sidecar with the xDS section and `extra` top-level YAML (static routes, say).
async fn sidecar_with(
    ads: SocketAddr,
    request_timeout_ms: u64,
    idle_s: u64,
    extra: &str,
) -> RunningSidecar {
    let yaml = format!(
        r#"listeners: [{{ address: "127.0.0.1:0" }}]
admin: {{ address: "127.0.0.1:0" }}
xds:
  address: "{ads}"
  node_id: ondemand-test
  request_timeout_ms: {request_timeout_ms}
  backoff_initial_ms: 100
  backoff_max_ms: 1000
  idle_unsubscribe_after_s: {idle_s}
{extra}"#
    );
    let config = SidecarConfig::parse(&yaml).expect("sidecar config");
    proxy::start(config).await.expect("sidecar starts")
}

async fn http(address: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut socket = tokio::net::TcpStream::connect(address)
        .await
        .expect("http connect");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    socket
        .write_all(request.as_bytes())
        .await
        .expect("http request");
    let mut text = String::new();
    tokio::time::timeout(WAIT, socket.read_to_string(&mut text))
        .await
        .expect("http answer in time")
        .expect("http read");
    let (head, body) = text.split_once("\r\n\r\n").expect("an http response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status code");
    (status, body.to_owned())
}

async fn xds_state(sidecar: &RunningSidecar) -> Value {
    let (status, body) = http(sidecar.admin.expect("admin"), "GET", "/config_dump", "").await;
    assert_eq!(status, 200, "{body}");
    let dump: Value = serde_json::from_str(&body).expect("config_dump json");
    dump["xds_state"].clone()
}

fn subscribed(state: &Value, short_type: &str) -> usize {
    state["client"]["types"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(type_url, _)| type_url.ends_with(short_type))
        .map(|(_, names)| {
            names["subscribed"]
                .as_object()
                .map_or(0, |names| names.len())
        })
        .sum()
}

async fn route_info(sidecar: SocketAddr, topic: &str) -> RemotingCommand {
    let mut client = RawClient::connect(sidecar).await;
    client
        .call(
            RemotingCommand::request(RequestCode::GET_ROUTEINFO_BY_TOPIC, 0).with_header(
                &GetRouteInfoRequestHeader {
                    topic: topic.into(),
                    ..Default::default()
                },
            ),
        )
        .await
}

fn broker_names(answer: &RemotingCommand) -> Vec<String> {
    let route = TopicRouteData::from_json(&answer.body).expect("route data");
    let mut names: Vec<String> = route
        .broker_datas
        .iter()
        .map(|broker| broker.broker_name.clone())
        .collect();
    names.sort();
    names
}

async fn producer(namesrv: SocketAddr, instance: &str) -> DefaultMQProducer {
    let mut producer = DefaultMQProducer::builder(harness().runtime.clone())
        .client_config(client_config(namesrv, instance))
        .producer_group(format!("{instance}_group"))
        .send_msg_timeout(10_000)
        .retry_times_when_send_failed(0)
        .build();
    tokio::time::timeout(STEP_TIMEOUT, producer.start())
        .await
        .expect("in time")
        .expect("producer start");
    producer
}

/// One sync send; `Err` with the client's error text.
async fn send(producer: &mut DefaultMQProducer, topic: &str, body: &str) -> Result<(), String> {
    let message = Message::builder()
        .topic(topic)
        .body_slice(body.as_bytes())
        .build()
        .expect("message");
    match tokio::time::timeout(STEP_TIMEOUT, producer.send(message)).await {
        Ok(Ok(Some(result))) if format!("{:?}", result.send_status) == "SendOk" => Ok(()),
        Ok(Ok(other)) => Err(format!("{other:?}")),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("no answer in time".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unseen_topics_are_held_until_their_route_arrives_and_misses_say_why() {
    let data = tempfile::tempdir().expect("tempdir");
    let broker = RunningBroker::start(&data.path().join("a")).await;
    let path = write_config(
        data.path(),
        &control_plane_yaml(free_address(), &[("broker-a", broker.addr)]),
    );
    let control_plane = ControlPlane::start(&path);
    let mesh = sidecar(control_plane.ads, 5_000, 0).await;
    let address = mesh.listeners[0];

    // Twenty clients ask for one unseen topic at once: one subscription each for its route,
    // cluster and endpoints, and every one of them gets the route.
    let asks = (0..20).map(|_| route_info(address, "known-a"));
    let answers = futures::future::join_all(asks).await;
    for answer in &answers {
        assert_eq!(answer.code, ResponseCode::SUCCESS.0, "{:?}", answer.remark);
        assert_eq!(broker_names(answer), vec!["broker-a".to_owned()]);
    }
    let state = xds_state(&mesh).await;
    let counters = &state["counters"];
    println!(
        "20 concurrent first asks for known-a: held {}, subscriptions {} (topic route, cluster, endpoints)",
        counters["held"], counters["client"]["subscriptions"]
    );
    assert_eq!(counters["client"]["subscriptions"], 3, "{state:#}");
    assert_eq!(subscribed(&state, "TopicRoute"), 1);
    assert_eq!(state["topics"]["known-a"]["routable"], true, "{state:#}");

    // A real client sends to another unseen topic: its route request is held, then its sends go.
    let mut producer = producer(address, "ondemand-held").await;
    for index in 0..10 {
        send(&mut producer, "known-b", &format!("m{index}"))
            .await
            .unwrap_or_else(|error| panic!("send {index} to known-b: {error}"));
    }
    assert_eq!(messages_on(broker.addr, "known-b").await, 10);

    // A topic the control plane does not have: TOPIC_NOT_EXIST saying so, and the real client
    // gets an error rather than a hang.
    let missing = route_info(address, "missing-x").await;
    assert_eq!(missing.code, ResponseCode::TOPIC_NOT_EXIST.0);
    let remark = missing.remark.clone().unwrap_or_default();
    assert!(remark.contains("does not exist"), "{remark}");
    let failed = send(&mut producer, "missing-y", "lost").await;
    assert!(
        failed.is_err(),
        "a send to a topic that does not exist fails"
    );
    println!("missing-x: {remark}; the client's send to missing-y: {failed:?}");
    producer.shutdown().await;

    // A sidecar whose control plane is not there: not ready, and a new topic fails after the
    // timeout with a remark that says so.
    let lonely = sidecar(free_address(), 300, 0).await;
    let (status, body) = http(lonely.admin.expect("admin"), "GET", "/ready", "").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not connected"), "{body}");
    let started = Instant::now();
    let timed_out = route_info(lonely.listeners[0], "known-c").await;
    let waited = started.elapsed();
    let remark = timed_out.remark.clone().unwrap_or_default();
    assert_eq!(timed_out.code, ResponseCode::TOPIC_NOT_EXIST.0);
    assert!(
        remark.contains("within 300 ms") && remark.contains("not connected"),
        "{remark}"
    );
    assert!(waited >= Duration::from_millis(300), "held {waited:?}");
    println!("without a control plane: {remark} (after {waited:?}); /ready: {body:?}");
    let (_, metrics) = http(lonely.admin.expect("admin"), "GET", "/metrics", "").await;
    assert!(metrics.contains("rocketmesh_xds_connected 0"), "{metrics}");
    assert!(
        metrics.contains("rocketmesh_xds_route_timeouts_total 1"),
        "{metrics}"
    );
    lonely.shutdown().await;
    mesh.shutdown().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_resource_is_nacked_and_the_last_good_version_stays() {
    let data = tempfile::tempdir().expect("tempdir");
    let broker = RunningBroker::start(&data.path().join("a")).await;
    let path = write_config(
        data.path(),
        &control_plane_yaml(free_address(), &[("broker-a", broker.addr)]),
    );
    let control_plane = ControlPlane::start(&path);
    let mesh = sidecar(control_plane.ads, 2_000, 0).await;
    let address = mesh.listeners[0];
    let admin = control_plane.admin;

    let good = route_info(address, "known-good").await;
    assert_eq!(good.code, ResponseCode::SUCCESS.0, "{:?}", good.remark);

    // The control plane now sends known-good in a form the sidecar must reject (the fault
    // makes it push the resource again): NACKed with the reason, and the good version stays.
    let (status, body) = http(
        admin,
        "PUT",
        "/faults",
        r#"{"type": "topics", "name": "known-good", "invalid": true}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + WAIT;
    let nack = loop {
        let state = xds_state(&mesh).await;
        let nack = state["client"]["types"]
            .as_object()
            .into_iter()
            .flatten()
            .find(|(type_url, _)| type_url.ends_with("TopicRoute"))
            .map(|(_, state)| state["last_nack"].clone())
            .unwrap_or(Value::Null);
        if nack["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("known-good"))
        {
            break nack;
        }
        assert!(
            Instant::now() < deadline,
            "known-good was not NACKed: {state:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let still = route_info(address, "known-good").await;
    assert_eq!(still.code, ResponseCode::SUCCESS.0, "{:?}", still.remark);
    assert_eq!(broker_names(&still), vec!["broker-a".to_owned()]);

    // A new topic whose route is invalid: the request is answered, saying why.
    let (status, body) = http(
        admin,
        "PUT",
        "/faults",
        r#"{"type": "topics", "invalid": true}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let refused = route_info(address, "known-refused").await;
    let remark = refused.remark.clone().unwrap_or_default();
    assert_eq!(refused.code, ResponseCode::TOPIC_NOT_EXIST.0, "{remark}");
    assert!(remark.contains("refused"), "{remark}");
    println!(
        "invalid topic route NACKed ({}); known-good still routes to broker-a; a new invalid topic: {remark:?}",
        nack["reason"]
    );
    mesh.shutdown().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_topics_are_unsubscribed_and_their_state_freed() {
    const TOPICS: usize = 40;
    let data = tempfile::tempdir().expect("tempdir");
    let broker = RunningBroker::start(&data.path().join("a")).await;
    let path = write_config(
        data.path(),
        &control_plane_yaml(free_address(), &[("broker-a", broker.addr)]),
    );
    let control_plane = ControlPlane::start(&path);
    let mesh = sidecar(control_plane.ads, 5_000, 1).await;
    let address = mesh.listeners[0];

    let mut producer = producer(address, "ondemand-idle").await;
    for index in 0..TOPICS {
        send(&mut producer, &format!("known-idle-{index}"), "x")
            .await
            .unwrap_or_else(|error| panic!("send to topic {index}: {error}"));
    }
    producer.shutdown().await;
    let state = xds_state(&mesh).await;
    assert_eq!(subscribed(&state, "TopicRoute"), TOPICS, "{state:#}");
    let proxy = mesh.proxy.clone();
    assert_eq!(proxy.stats.messages_in_by_topic().len(), TOPICS);
    assert_eq!(proxy.clusters.len(), 1);
    assert_eq!(proxy.broker_listeners.listening().len(), 1);

    // Nothing names them any more: within a few sweeps they are all given up.
    let deadline = Instant::now() + WAIT;
    let state = loop {
        let state = xds_state(&mesh).await;
        if subscribed(&state, "TopicRoute") == 0 && subscribed(&state, "Cluster") == 0 {
            break state;
        }
        assert!(Instant::now() < deadline, "still subscribed: {state:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "{TOPICS} topics idle for 1 s: unsubscribed {} topics and {} clusters; left: {} topic series, {} balancers, {} broker listeners",
        state["counters"]["topics_unsubscribed"],
        state["counters"]["clusters_unsubscribed"],
        proxy.stats.messages_in_by_topic().len(),
        proxy.clusters.len(),
        proxy.broker_listeners.listening().len()
    );
    assert_eq!(subscribed(&state, "ClusterLoadAssignment"), 0);
    assert_eq!(
        state["counters"]["topics_unsubscribed"].as_u64(),
        Some(TOPICS as u64)
    );
    assert!(proxy.stats.messages_in_by_topic().is_empty());
    assert_eq!(proxy.clusters.len(), 0, "balancer state freed");
    assert!(proxy.broker_listeners.listening().is_empty());
    assert!(proxy.routes.snapshot().all_endpoints().next().is_none());

    // And a topic used again comes back.
    let again = route_info(address, "known-idle-0").await;
    assert_eq!(again.code, ResponseCode::SUCCESS.0, "{:?}", again.remark);
    mesh.shutdown().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_outage_loses_no_known_topic_send_and_new_topics_route_after_it() {
    let data = tempfile::tempdir().expect("tempdir");
    let broker = RunningBroker::start(&data.path().join("a")).await;
    let listen = free_address();
    let path = write_config(
        data.path(),
        &control_plane_yaml(listen, &[("broker-a", broker.addr)]),
    );
    let mut control_plane = ControlPlane::start(&path);
    let mesh = sidecar(control_plane.ads, 1_000, 0).await;
    let address = mesh.listeners[0];
    let admin = mesh.admin.expect("admin");

    // Steady sends to three known topics from a real client, all through the outage.
    let mut producer = producer(address, "ondemand-outage").await;
    for topic in ["known-1", "known-2", "known-3"] {
        send(&mut producer, topic, "warm").await.expect("warm-up");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let load = {
        let stop = stop.clone();
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut index = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let topic = ["known-1", "known-2", "known-3"][index % 3];
                if let Err(error) = send(&mut producer, topic, &format!("s{index}")).await {
                    failures.push(error);
                }
                sent.fetch_add(1, Ordering::Relaxed);
                index += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            producer.shutdown().await;
            failures
        })
    };
    let wait_sent = |at_least: u64| {
        let sent = sent.clone();
        async move {
            let deadline = Instant::now() + WAIT;
            while sent.load(Ordering::Relaxed) < at_least {
                assert!(Instant::now() < deadline, "the load stalled");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_sent(100).await;

    control_plane.kill();
    let killed_at = sent.load(Ordering::Relaxed);
    // The sidecar notices (the stream ends); new topics now fail after the timeout.
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, ready) = http(admin, "GET", "/ready", "").await;
        if ready.contains("disconnected") {
            break;
        }
        assert!(Instant::now() < deadline, "/ready: {ready}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, ready) = http(admin, "GET", "/ready", "").await;
    assert_eq!(status, 200, "known topics are still served: {ready}");
    let during = route_info(address, "known-new-during").await;
    let remark = during.remark.clone().unwrap_or_default();
    assert_eq!(during.code, ResponseCode::TOPIC_NOT_EXIST.0, "{remark}");
    assert!(remark.contains("not connected"), "{remark}");
    wait_sent(killed_at + 300).await;

    // Back on the same address: a new topic routes as soon as the sidecar has reconnected,
    // which its backoff (at most 1 s) bounds.
    let restarted = Instant::now();
    let _control_plane = ControlPlane::start(&path);
    let mut after = None;
    while restarted.elapsed() < WAIT {
        let answer = route_info(address, "known-new-after").await;
        if answer.code == ResponseCode::SUCCESS.0 {
            after = Some(restarted.elapsed());
            break;
        }
    }
    let after = after.expect("a new topic routes after the restart");
    wait_sent(sent.load(Ordering::Relaxed) + 100).await;
    stop.store(true, Ordering::Relaxed);
    let failures = tokio::time::timeout(STEP_TIMEOUT, load)
        .await
        .expect("the load stops")
        .expect("load task");
    let total = sent.load(Ordering::Relaxed);
    let state = xds_state(&mesh).await;
    println!(
        "control plane killed after {killed_at} sends; {total} sends to known topics in all, {} failed; during the outage: {remark:?}; after the restart a new topic routed in {after:?} (reconnects {})",
        failures.len(),
        state["counters"]["client"]["reconnects"]
    );
    assert!(failures.is_empty(), "failed sends: {failures:?}");
    assert!(after < Duration::from_secs(5), "{after:?}");
    mesh.shutdown().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_added_to_the_cluster_takes_sends_and_shows_in_route_data_within_a_second() {
    let data = tempfile::tempdir().expect("tempdir");
    let a = RunningBroker::start(&data.path().join("a")).await;
    let b = RunningBroker::start(&data.path().join("b")).await;
    let listen = free_address();
    let path = write_config(
        data.path(),
        &control_plane_yaml(listen, &[("broker-a", a.addr)]),
    );
    let control_plane = ControlPlane::start(&path);
    let mesh = sidecar(control_plane.ads, 5_000, 0).await;
    let address = mesh.listeners[0];

    let mut producer = producer(address, "ondemand-grow").await;
    send(&mut producer, "known-grow", "first")
        .await
        .expect("first send");
    let before = route_info(address, "known-grow").await;
    assert_eq!(broker_names(&before), vec!["broker-a".to_owned()]);

    write_config(
        data.path(),
        &control_plane_yaml(listen, &[("broker-a", a.addr), ("broker-b", b.addr)]),
    );
    let changed = Instant::now();
    let in_route_data = loop {
        let answer = route_info(address, "known-grow").await;
        if broker_names(&answer).len() == 2 {
            break changed.elapsed();
        }
        assert!(changed.elapsed() < WAIT, "broker-b never showed");
    };
    // The client keeps the queues it knows; the sidecar balances its sends over the brokers
    // the route has now, so broker-b takes some of them.
    let mut sends = 0;
    let first_on_b = loop {
        send(&mut producer, "known-grow", &format!("m{sends}"))
            .await
            .expect("send");
        sends += 1;
        if messages_on(b.addr, "known-grow").await > 0 {
            break changed.elapsed();
        }
        assert!(changed.elapsed() < WAIT, "broker-b took no send");
    };
    println!(
        "broker-b added to the control plane's file: in route data through the sidecar after {in_route_data:?}, first send stored on it after {first_on_b:?} ({sends} sends)"
    );
    assert!(in_route_data < Duration::from_secs(1), "{in_route_data:?}");
    assert!(first_on_b < Duration::from_secs(1), "{first_on_b:?}");
    producer.shutdown().await;
    mesh.shutdown().await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_routes_are_the_fallback() {
    let data = tempfile::tempdir().expect("tempdir");
    let a = RunningBroker::start(&data.path().join("a")).await;
    let b = RunningBroker::start(&data.path().join("b")).await;
    let path = write_config(
        data.path(),
        &control_plane_yaml(free_address(), &[("broker-a", a.addr)]),
    );
    let control_plane = ControlPlane::start(&path);
    let fallback = format!(
        r#"routes:
  - match: {{ topic: {{ prefix: "" }} }}
    route: {{ cluster: legacy }}
clusters:
  - name: legacy
    endpoints:
{}"#,
        brokers_yaml(&[("broker-b", b.addr)])
    );
    let mesh = sidecar_with(control_plane.ads, 5_000, 0, &fallback).await;
    let address = mesh.listeners[0];

    // The control plane's topic goes where it says; one it does not have takes the static route.
    let known = route_info(address, "known-x").await;
    assert_eq!(broker_names(&known), vec!["broker-a".to_owned()]);
    let legacy = route_info(address, "legacy-x").await;
    assert_eq!(legacy.code, ResponseCode::SUCCESS.0, "{:?}", legacy.remark);
    assert_eq!(broker_names(&legacy), vec!["broker-b".to_owned()]);
    let mut producer = producer(address, "ondemand-fallback").await;
    send(&mut producer, "legacy-y", "via the static route")
        .await
        .expect("send on the static route");
    producer.shutdown().await;
    assert_eq!(messages_on(b.addr, "legacy-y").await, 1);

    // With the control plane unreachable, a topic the static routes cover does not wait for it.
    let lonely = sidecar_with(free_address(), 5_000, 0, &fallback).await;
    let deadline = Instant::now() + WAIT;
    let ready = loop {
        // Until its first attempt fails, the sidecar cannot tell an absent control plane from
        // a slow one.
        let (status, ready) = http(lonely.admin.expect("admin"), "GET", "/ready", "").await;
        assert_eq!(status, 200, "static routes serve meanwhile: {ready}");
        if !ready.contains("(connecting)") {
            break ready;
        }
        assert!(Instant::now() < deadline, "{ready}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(ready.contains("disconnected"), "{ready}");
    let started = Instant::now();
    let answer = route_info(lonely.listeners[0], "legacy-z").await;
    let waited = started.elapsed();
    assert_eq!(answer.code, ResponseCode::SUCCESS.0, "{:?}", answer.remark);
    assert!(
        waited < Duration::from_secs(5),
        "answered from the static route without waiting for the control plane: {waited:?}"
    );
    println!(
        "fallback: known-x from the control plane (broker-a), legacy-x from the static route (broker-b); without a control plane legacy-z answered in {waited:?}"
    );
    lonely.shutdown().await;
    mesh.shutdown().await;
    a.stop().await;
    b.stop().await;
}
