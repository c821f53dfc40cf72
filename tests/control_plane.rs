//! `rocketmesh control-plane`: topic routes from the file's routes and from discovery against a
//! running bundled broker, served over delta ADS to a real gRPC client; file reloads; `validate`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use futures::channel::mpsc;
use rocketmesh::control_plane::{self, ControlPlaneConfig};
use rocketmesh_xds::envoy_types::pb::envoy::config::core::v3::Node;
use rocketmesh_xds::envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use rocketmesh_xds::spec::{ClusterSpec, TopicRouteSpec, decode_topic_route};
use rocketmesh_xds::types::{CLUSTER, CLUSTER_LOAD_ASSIGNMENT, TOPIC_ROUTE};

const WAIT: Duration = Duration::from_secs(10);

/// One delta ADS stream, as a sidecar would hold it.
struct Stream {
    requests: mpsc::UnboundedSender<DeltaDiscoveryRequest>,
    responses: rocketmesh_xds::tonic::Streaming<DeltaDiscoveryResponse>,
}

impl Stream {
    async fn open(address: SocketAddr) -> Self {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{address}"))
            .await
            .expect("connect to the control plane");
        let (requests, outgoing) = mpsc::unbounded();
        let responses = client
            .delta_aggregated_resources(outgoing)
            .await
            .expect("open the delta stream")
            .into_inner();
        Self {
            requests,
            responses,
        }
    }

    fn subscribe(&self, type_url: &str, names: &[&str]) {
        self.requests
            .unbounded_send(DeltaDiscoveryRequest {
                node: Some(Node {
                    id: "control-plane-test".into(),
                    ..Node::default()
                }),
                type_url: type_url.into(),
                resource_names_subscribe: names.iter().map(|name| name.to_string()).collect(),
                ..DeltaDiscoveryRequest::default()
            })
            .expect("stream open");
    }

    /// The next response, ACKed.
    async fn next(&mut self) -> DeltaDiscoveryResponse {
        let response = tokio::time::timeout(WAIT, self.responses.message())
            .await
            .expect("a response in time")
            .expect("a healthy stream")
            .expect("the stream stays open");
        self.requests
            .unbounded_send(DeltaDiscoveryRequest {
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                ..DeltaDiscoveryRequest::default()
            })
            .expect("stream open");
        response
    }

    /// The next response that names `topic`, as a route (`None` when it was removed).
    async fn topic(&mut self, topic: &str) -> Option<TopicRouteSpec> {
        loop {
            let response = self.next().await;
            if response.type_url != TOPIC_ROUTE {
                continue;
            }
            if response.removed_resources.iter().any(|name| name == topic) {
                return None;
            }
            if let Some(resource) = response.resources.iter().find(|r| r.name == topic) {
                let any = resource.resource.as_ref().expect("a resource body");
                return Some(decode_topic_route(any).expect("a TopicRoute"));
            }
        }
    }

    async fn cluster(&mut self, name: &str) -> ClusterSpec {
        self.subscribe(CLUSTER, &[name]);
        self.subscribe(CLUSTER_LOAD_ASSIGNMENT, &[name]);
        let (mut cluster, mut endpoints) = (None, None);
        while cluster.is_none() || endpoints.is_none() {
            let response = self.next().await;
            for resource in response.resources.into_iter().filter(|r| r.name == name) {
                match response.type_url.as_str() {
                    CLUSTER => cluster = resource.resource,
                    CLUSTER_LOAD_ASSIGNMENT => endpoints = resource.resource,
                    _ => {}
                }
            }
        }
        let (Some(cluster), Some(endpoints)) = (cluster, endpoints) else {
            unreachable!("both arrived");
        };
        ClusterSpec::from_resources(
            &rocketmesh_xds::spec::decode_any(&cluster).expect("Cluster"),
            Some(&rocketmesh_xds::spec::decode_any(&endpoints).expect("ClusterLoadAssignment")),
        )
        .expect("a rocketmesh cluster")
    }
}

fn discovery_config(broker: SocketAddr, refresh_ms: u64) -> ControlPlaneConfig {
    ControlPlaneConfig::parse(&format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n\
         discovery: {{nameservers: [\"{broker}\"], refresh_interval_ms: {refresh_ms}}}\n"
    ))
    .expect("config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_on_a_running_broker_is_routable_on_its_first_subscription() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = common::RunningBroker::start(dir.path()).await;
    // A long refresh: only the first subscription can have found the new topic.
    let plane = control_plane::start(discovery_config(broker.addr, 600_000))
        .await
        .expect("control plane");
    common::create_topic(broker.addr, "BornLate", 6).await;

    let mut stream = Stream::open(plane.ads_address).await;
    stream.subscribe(TOPIC_ROUTE, &["BornLate"]);
    let route = stream.topic("BornLate").await.expect("routable at once");
    eprintln!("first subscription to BornLate: {route:?}");
    assert_eq!(route.cluster, "DefaultCluster");
    assert_eq!(route.queues.len(), 1);
    assert_eq!(route.queues[0].broker_name, "broker-a");
    assert_eq!(route.queues[0].write_queue_nums, 6);
    let cluster = stream.cluster("DefaultCluster").await;
    assert_eq!(cluster.endpoints.len(), 1);
    assert_eq!(cluster.endpoints[0].address, broker.addr.to_string());
    assert_eq!(
        cluster.endpoints[0].broker_name.as_deref(),
        Some("broker-a")
    );
    assert_eq!(cluster.endpoints[0].broker_id, Some(0));

    // A topic that does not exist is answered as removed at once, not left to time out.
    stream.subscribe(TOPIC_ROUTE, &["NoSuchTopic"]);
    assert_eq!(stream.topic("NoSuchTopic").await, None);
    plane.shutdown().await;
    broker.stop().await;
}

/// Two bundled brokers as the discovery sources: each knows only its own part of a topic, so the
/// answers are merged; a cluster asked for by name before any of its topics (as a sidecar does
/// after a control-plane restart) is served from the cluster info, with every broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_merge_across_brokers_and_clusters_resolve_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker_a = common::RunningBroker::start(&dir.path().join("a")).await;
    let broker_b = common::RunningBroker::start_with(&dir.path().join("b"), |config| {
        config.broker_name = "broker-b".into();
    })
    .await;
    let config = ControlPlaneConfig::parse(&format!(
        "listen: 127.0.0.1:0\nadmin: null\n\
         discovery: {{nameservers: [\"{}\", \"{}\"]}}\n",
        broker_a.addr, broker_b.addr
    ))
    .expect("config");
    let plane = control_plane::start(config).await.expect("control plane");
    let mut stream = Stream::open(plane.ads_address).await;
    let cluster = stream.cluster("DefaultCluster").await;
    let mut brokers: Vec<_> = cluster
        .endpoints
        .iter()
        .map(|endpoint| {
            (
                endpoint.broker_name.clone().unwrap_or_default(),
                endpoint.address.clone(),
            )
        })
        .collect();
    brokers.sort();
    assert_eq!(
        brokers,
        vec![
            ("broker-a".to_owned(), broker_a.addr.to_string()),
            ("broker-b".to_owned(), broker_b.addr.to_string())
        ]
    );
    common::create_topic(broker_a.addr, "Spread", 4).await;
    common::create_topic(broker_b.addr, "Spread", 2).await;
    stream.subscribe(TOPIC_ROUTE, &["Spread"]);
    let route = stream.topic("Spread").await.expect("routable");
    let mut queues: Vec<_> = route
        .queues
        .iter()
        .map(|queue| (queue.broker_name.as_str(), queue.write_queue_nums))
        .collect();
    queues.sort();
    assert_eq!(queues, vec![("broker-a", 4), ("broker-b", 2)]);
    assert_eq!(route.cluster, "DefaultCluster");
    plane.shutdown().await;
    broker_a.stop().await;
    broker_b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_is_pushed_when_a_refresh_finds_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = common::RunningBroker::start(dir.path()).await;
    let plane = control_plane::start(discovery_config(broker.addr, 200))
        .await
        .expect("control plane");
    let mut stream = Stream::open(plane.ads_address).await;
    stream.subscribe(TOPIC_ROUTE, &["Later"]);
    assert_eq!(stream.topic("Later").await, None, "absent at first");
    common::create_topic(broker.addr, "Later", 2).await;
    let route = stream.topic("Later").await.expect("pushed once it exists");
    assert_eq!(route.queues[0].read_queue_nums, 2);
    plane.shutdown().await;
    broker.stop().await;
}

fn file_config(broker: SocketAddr, ordered: bool) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nreload_interval_ms: 100\n\
         routes:\n  - {{match: {{topic: {{prefix: App}}}}, route: {{cluster: local, ordered: {ordered}}}}}\n\
         clusters:\n  - name: local\n    endpoints:\n      - {{address: \"{broker}\", metadata: {{broker_name: broker-a, cluster_name: C1, zone: z1, priority: 1, weight: 50, read_queue_num: 8}}}}\n"
    )
}

/// The control plane as a process: the file's routes, reloads on change, bad files refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_routes_topics_and_a_changed_file_is_pushed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("control-plane.yaml");
    let broker: SocketAddr = "127.0.0.1:10911".parse().expect("address");
    std::fs::write(&path, file_config(broker, false)).expect("write config");
    let (mut child, ads, lines) = common::spawn_reporting(
        &[
            "control-plane".into(),
            "--config".into(),
            path.clone().into(),
        ],
        "xds=",
    );
    let admin: SocketAddr = {
        let line = lines.recv_timeout(WAIT).expect("the start line");
        let rest = line.split("admin=Some(").nth(1).expect("an admin address");
        rest.split(')')
            .next()
            .unwrap_or_default()
            .parse()
            .expect("admin address")
    };

    let mut stream = Stream::open(ads).await;
    stream.subscribe(TOPIC_ROUTE, &["AppOrders", "Elsewhere"]);
    let mut route = None;
    let mut elsewhere_removed = false;
    while route.is_none() || !elsewhere_removed {
        let response = stream.next().await;
        elsewhere_removed |= response
            .removed_resources
            .iter()
            .any(|name| name == "Elsewhere");
        if let Some(resource) = response.resources.iter().find(|r| r.name == "AppOrders") {
            route =
                Some(decode_topic_route(resource.resource.as_ref().expect("body")).expect("route"));
        }
    }
    let route = route.expect("routed");
    assert_eq!(route.cluster, "local");
    assert!(!route.ordered);
    assert_eq!(
        route.queues[0].read_queue_nums, 8,
        "queues from the endpoint metadata"
    );
    let cluster = stream.cluster("local").await;
    let endpoint = &cluster.endpoints[0];
    assert_eq!(
        (endpoint.zone.as_str(), endpoint.priority, endpoint.weight),
        ("z1", 0, Some(50)),
        "priority 1 alone is ranked 0: Envoy's priorities have no gaps"
    );
    assert_eq!(endpoint.cluster_name.as_deref(), Some("C1"));

    // A changed file is pushed without a restart.
    std::fs::write(&path, file_config(broker, true)).expect("rewrite config");
    let route = stream.topic("AppOrders").await.expect("still routed");
    assert!(route.ordered, "the reload was pushed");

    // A scripted update through the harness API is pushed, and reloads leave it alone.
    stream.subscribe(TOPIC_ROUTE, &["AppScripted"]);
    assert_eq!(
        stream
            .topic("AppScripted")
            .await
            .expect("from the file")
            .cluster,
        "local"
    );
    let (status, body) = http(
        admin,
        "PUT",
        "/resources/topics/AppScripted",
        r#"{"topic":"AppScripted","cluster":"scripted"}"#,
    );
    assert!(status.contains("200"), "{status} {body}");
    assert_eq!(
        stream.topic("AppScripted").await.expect("scripted").cluster,
        "scripted"
    );
    let (_, streams) = http(admin, "GET", "/streams", "");
    assert!(streams.contains("control-plane-test"), "{streams}");
    std::fs::write(&path, file_config(broker, false)).expect("rewrite config");
    assert!(
        !stream.topic("AppOrders").await.expect("routed").ordered,
        "reloaded"
    );

    // A bad file is refused, and the state in force stays.
    std::fs::write(
        &path,
        "routes: [{match: {topic: {prefix: ''}}, route: {cluster: gone}}]\n",
    )
    .expect("break config");
    let deadline = std::time::Instant::now() + WAIT;
    let mut refused = None;
    while refused.is_none() && std::time::Instant::now() < deadline {
        if let Ok(line) = lines.recv_timeout(Duration::from_millis(200))
            && line.contains("configuration not reloaded")
        {
            refused = Some(line);
        }
    }
    let refused = refused.expect("the bad file is refused in the log");
    assert!(refused.contains("unknown cluster"), "{refused}");
    let mut again = Stream::open(ads).await;
    again.subscribe(TOPIC_ROUTE, &["AppOrders"]);
    assert!(
        !again
            .topic("AppOrders")
            .await
            .expect("still served")
            .ordered,
        "the last good file's route"
    );
    again.subscribe(TOPIC_ROUTE, &["AppScripted"]);
    assert_eq!(
        again.topic("AppScripted").await.expect("kept").cluster,
        "scripted"
    );

    let _ = child.kill();
    let _ = child.wait();
}

/// One HTTP/1.1 exchange with the harness API: (status line, body).
fn http(address: SocketAddr, method: &str, path: &str, body: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut socket = std::net::TcpStream::connect(address).expect("connect to the harness API");
    socket.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(
        socket,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut answer = String::new();
    socket.read_to_string(&mut answer).expect("read");
    let status = answer.lines().next().unwrap_or_default().to_owned();
    let body = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

#[test]
fn validate_checks_a_file_and_names_the_bad_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/control-plane.yaml");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_rocketmesh"))
        .args(["control-plane", "validate"])
        .arg(&good)
        .output()
        .expect("run validate");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("valid (2 routes, 1 clusters, discovery from"),
        "{stdout}"
    );

    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "discovery: {nameservers: [\"nowhere\"]}\n").expect("write");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_rocketmesh"))
        .args(["control-plane", "validate"])
        .arg(&bad)
        .output()
        .expect("run validate");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("discovery.nameservers[0]: \"nowhere\" is not host:port"),
        "{stderr}"
    );
}
