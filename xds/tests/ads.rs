//! The ADS server in-process, driven by a real tonic client over loopback.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rocketmesh_xds::VersionedResource;
use rocketmesh_xds::envoy_types::pb::envoy::config::core::v3::Node;
use rocketmesh_xds::envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use rocketmesh_xds::envoy_types::pb::google::rpc::Status as RpcStatus;
use rocketmesh_xds::harness::{Event, Fault, Harness};
use rocketmesh_xds::protocol::{Ack, ClientState};
use rocketmesh_xds::server::{XdsServer, serve};
use rocketmesh_xds::spec::{ClusterSpec, EndpointSpec, LbPolicy, TopicRouteSpec};
use rocketmesh_xds::store::{ResolveFuture, Resolver, Store};
use rocketmesh_xds::types::{CLUSTER, CLUSTER_LOAD_ASSIGNMENT, TOPIC_ROUTE};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const WAIT: Duration = Duration::from_secs(5);
/// How long "no response" is watched for; a negative check, not synchronisation.
const QUIET: Duration = Duration::from_millis(300);

struct Cp {
    addr: SocketAddr,
    store: Arc<Store>,
    harness: Arc<Harness>,
    _stop: oneshot::Sender<()>,
}

async fn start(store: Arc<Store>, resolver: Option<Arc<dyn Resolver>>) -> Cp {
    let harness = Arc::new(Harness::default());
    let mut server = XdsServer::new(store.clone(), harness.clone());
    if let Some(r) = resolver {
        server = server.with_resolver(r);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve(listener, server, async {
        let _ = stopped.await;
    }));
    Cp {
        addr,
        store,
        harness,
        _stop: stop,
    }
}

fn topic(name: &str, cluster: &str) -> VersionedResource {
    TopicRouteSpec {
        topic: name.into(),
        cluster: cluster.into(),
        ..Default::default()
    }
    .build()
    .unwrap()
}

fn cluster_spec(name: &str, policy: LbPolicy) -> ClusterSpec {
    ClusterSpec {
        name: name.into(),
        endpoints: vec![EndpointSpec {
            address: "127.0.0.1:10911".into(),
            broker_name: Some("broker-a".into()),
            broker_id: Some(0),
            cluster_name: Some("DefaultCluster".into()),
            ..Default::default()
        }],
        connect_timeout_ms: 1000,
        lb_policy: policy,
        balancer: BTreeMap::new(),
    }
}

struct Client {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
    state: ClientState,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        let mut grpc = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (tx, requests) = mpsc::channel(64);
        let rx = grpc
            .delta_aggregated_resources(ReceiverStream::new(requests))
            .await
            .unwrap()
            .into_inner();
        Self {
            tx,
            rx,
            state: ClientState::new(),
        }
    }

    async fn send(&self, mut req: DeltaDiscoveryRequest) {
        // Like Envoy: the node on every request.
        req.node = Some(Node {
            id: "sidecar-1".into(),
            ..Default::default()
        });
        self.tx.send(req).await.unwrap();
    }

    async fn sub(&mut self, type_url: &str, names: &[&str]) {
        let req = DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: names.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        };
        let _ = self.state.subscribe(type_url, names);
        self.send(req).await;
    }

    async fn unsub(&mut self, type_url: &str, names: &[&str]) {
        if let Some(req) = self.state.unsubscribe(type_url, names) {
            self.send(req).await;
        }
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        timeout(WAIT, self.rx.message())
            .await
            .expect("no response in time")
            .unwrap()
            .expect("stream ended")
    }

    /// Receives, applies and ACKs one response.
    async fn recv_ack(&mut self) -> DeltaDiscoveryResponse {
        let resp = self.recv().await;
        let ack = self.state.on_response(&resp, None);
        self.send(ack).await;
        resp
    }

    async fn quiet(&mut self) {
        if let Ok(msg) = timeout(QUIET, self.rx.message()).await {
            panic!("unexpected response: {msg:?}");
        }
    }
}

/// Waits (bounded) until the harness shows `cond` for the first stream.
async fn until(h: &Harness, cond: impl Fn(&rocketmesh_xds::harness::StreamInfo) -> bool) {
    timeout(WAIT, async {
        while !h.stream_infos().first().is_some_and(&cond) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("condition not reached");
}

fn names(resp: &DeltaDiscoveryResponse) -> Vec<&str> {
    resp.resources.iter().map(|r| r.name.as_str()).collect()
}

#[tokio::test]
async fn resubscribe_resends_and_unknown_names_are_removed_then_pushed() {
    let cp = start(Arc::new(Store::new()), None).await;
    cp.store.upsert(topic("orders", "c1"));
    let mut c = Client::connect(cp.addr).await;
    c.sub(TOPIC_ROUTE, &["orders", "ghost"]).await;
    let r = c.recv_ack().await;
    assert_eq!(names(&r), ["orders"]);
    assert_eq!(r.removed_resources, ["ghost"]);
    // Re-subscribe: sent again though the client holds it (go-control-plane #1450).
    c.send(DeltaDiscoveryRequest {
        type_url: TOPIC_ROUTE.into(),
        resource_names_subscribe: vec!["orders".into()],
        ..Default::default()
    })
    .await;
    assert_eq!(names(&c.recv_ack().await), ["orders"]);
    // The unknown name appears: pushed unsolicited.
    cp.store.upsert(topic("ghost", "c1"));
    assert_eq!(names(&c.recv_ack().await), ["ghost"]);
    // Deleted: removed.
    cp.store.delete(TOPIC_ROUTE, "ghost");
    assert_eq!(c.recv_ack().await.removed_resources, ["ghost"]);
    // Same content again is a no-op.
    cp.store.upsert(topic("orders", "c1"));
    c.quiet().await;
}

#[tokio::test]
async fn unsubscribe_then_resubscribe_resends() {
    let cp = start(Arc::new(Store::new()), None).await;
    cp.store.upsert(topic("a", "c1"));
    let mut c = Client::connect(cp.addr).await;
    c.sub(TOPIC_ROUTE, &["a"]).await;
    c.recv_ack().await;
    c.unsub(TOPIC_ROUTE, &["a"]).await;
    until(&cp.harness, |s| s.types[TOPIC_ROUTE].subscribed.is_empty()).await;
    cp.store.upsert(topic("a", "c2"));
    c.quiet().await;
    c.sub(TOPIC_ROUTE, &["a"]).await;
    assert_eq!(names(&c.recv_ack().await), ["a"]);
}

#[tokio::test]
async fn legacy_wildcard_gets_everything_until_star_is_unsubscribed() {
    let cp = start(Arc::new(Store::new()), None).await;
    cp.store.upsert_many([topic("a", "c"), topic("b", "c")]);
    let mut c = Client::connect(cp.addr).await;
    c.send(DeltaDiscoveryRequest {
        type_url: TOPIC_ROUTE.into(),
        ..Default::default()
    })
    .await;
    assert_eq!(names(&c.recv_ack().await), ["a", "b"]);
    cp.store.upsert(topic("c", "c"));
    assert_eq!(names(&c.recv_ack().await), ["c"]);
    c.send(DeltaDiscoveryRequest {
        type_url: TOPIC_ROUTE.into(),
        resource_names_unsubscribe: vec!["*".into()],
        ..Default::default()
    })
    .await;
    until(&cp.harness, |s| !s.types[TOPIC_ROUTE].wildcard).await;
    cp.store.upsert(topic("d", "c"));
    c.quiet().await;
}

#[tokio::test]
async fn stale_nonce_subscription_changes_and_duplicates() {
    let cp = start(Arc::new(Store::new()), None).await;
    cp.store.upsert_many([topic("a", "c"), topic("b", "c")]);
    let mut c = Client::connect(cp.addr).await;
    c.sub(TOPIC_ROUTE, &["a"]).await;
    c.recv_ack().await;
    c.send(DeltaDiscoveryRequest {
        type_url: TOPIC_ROUTE.into(),
        response_nonce: "4242".into(),
        resource_names_subscribe: vec!["b".into(), "b".into()],
        ..Default::default()
    })
    .await;
    let r = c.recv_ack().await;
    assert_eq!(
        names(&r),
        ["b"],
        "honoured despite the stale nonce, sent once"
    );
    let log = cp.harness.stream_log(1).unwrap();
    assert!(log.iter().any(|e| matches!(
        e,
        Event::Request {
            ack: Some(Ack::Stale { .. }),
            ..
        }
    )));
}

#[tokio::test]
async fn invalid_cluster_is_nacked_logged_and_not_resent_until_fixed() {
    let cp = start(Arc::new(Store::new()), None).await;
    let spec = cluster_spec("topic-a", LbPolicy::RoundRobin)
        .build()
        .unwrap();
    let good_version = spec.cluster.version.clone();
    cp.store.upsert_many([spec.cluster, spec.load_assignment]);
    cp.harness.set_faults(vec![Fault {
        type_url: "clusters".into(),
        name: Some("topic-a".into()),
        delay_ms: None,
        drop: false,
        silence: false,
        invalid: true,
    }]);
    let mut c = Client::connect(cp.addr).await;
    c.sub(CLUSTER, &["topic-a"]).await;
    let r = c.recv().await;
    let msg = "Error adding/updating cluster topic-a - topic-a: cannot create an EDS cluster without an EDS config";
    let nack = c.state.on_response(&r, Some(msg.into()));
    assert!(nack.error_detail.is_some());
    c.send(DeltaDiscoveryRequest {
        error_detail: Some(RpcStatus {
            code: 13,
            message: msg.into(),
            details: vec![],
        }),
        ..nack
    })
    .await;
    c.quiet().await; // no NACK loop
    let info = &cp.harness.stream_infos()[0];
    assert_eq!(info.node, "sidecar-1");
    assert_eq!(info.types[CLUSTER].last_nack.as_ref().unwrap().error, msg);
    assert!(cp.harness.stream_log(info.id).unwrap().iter().any(
        |e| matches!(e, Event::Request { ack: Some(Ack::Nack { error, .. }), .. } if error == msg)
    ));
    assert_eq!(cp.harness.metrics().nacks, 1);
    // Lifting the fault (and announcing it, as the admin API does) sends the valid cluster.
    cp.harness.set_faults(vec![]);
    cp.store.notify_type(CLUSTER);
    let r = c.recv_ack().await;
    assert_eq!(r.resources[0].version, good_version);
}

#[tokio::test]
async fn endpoints_follow_clusters_and_are_resent_after_a_cluster_update() {
    let cp = start(Arc::new(Store::new()), None).await;
    let spec = cluster_spec("topic-a", LbPolicy::RoundRobin)
        .build()
        .unwrap();
    cp.store.upsert_many([spec.cluster, spec.load_assignment]);
    let mut c = Client::connect(cp.addr).await;
    c.sub(CLUSTER, &["topic-a"]).await;
    let cds = c.recv().await;
    // Envoy asks for the endpoints before ACKing the cluster.
    c.sub(CLUSTER_LOAD_ASSIGNMENT, &["topic-a"]).await;
    let eds = c.recv_ack().await;
    assert_eq!(eds.type_url, CLUSTER_LOAD_ASSIGNMENT);
    let ack = c.state.on_response(&cds, None);
    c.send(ack).await;
    let updated = cluster_spec("topic-a", LbPolicy::LeastRequest)
        .build()
        .unwrap();
    cp.store
        .upsert_many([updated.cluster, updated.load_assignment]);
    let first = c.recv_ack().await;
    assert_eq!(first.type_url, CLUSTER);
    let second = c.recv_ack().await;
    assert_eq!(
        second.type_url, CLUSTER_LOAD_ASSIGNMENT,
        "endpoints re-sent so the cluster finishes warming"
    );
    assert_eq!(second.resources[0].version, eds.resources[0].version);
}

#[tokio::test]
async fn reconnect_with_initial_versions_gets_no_unchanged_resources() {
    let store = Arc::new(Store::new());
    store.upsert_many([topic("a", "c"), topic("b", "c"), topic("gone", "c")]);
    let cp = start(store.clone(), None).await;
    let mut c = Client::connect(cp.addr).await;
    c.sub(TOPIC_ROUTE, &["a", "b", "gone"]).await;
    c.recv_ack().await;
    let known = c.state.clone();
    drop(c);
    drop(cp);
    // A restarted control plane with b changed and gone deleted.
    let store = Arc::new(Store::new());
    store.upsert_many([topic("a", "c"), topic("b", "c2")]);
    let cp = start(store, None).await;
    let mut c = Client::connect(cp.addr).await;
    c.state = known;
    for req in c.state.reconnect_requests() {
        assert_eq!(req.initial_resource_versions.len(), 3);
        c.send(req).await;
    }
    let r = c.recv_ack().await;
    assert_eq!(names(&r), ["b"]);
    assert_eq!(r.removed_resources, ["gone"]);
    c.quiet().await;
}

#[tokio::test]
async fn a_slow_stream_does_not_block_others() {
    let cp = start(Arc::new(Store::new()), None).await;
    // Subscribes to everything and never reads a response.
    let slow = Client::connect(cp.addr).await;
    slow.send(DeltaDiscoveryRequest {
        type_url: TOPIC_ROUTE.into(),
        ..Default::default()
    })
    .await;
    let mut fast = Client::connect(cp.addr).await;
    fast.send(DeltaDiscoveryRequest {
        type_url: TOPIC_ROUTE.into(),
        ..Default::default()
    })
    .await;
    // Both streams must be registered before the burst.
    timeout(WAIT, async {
        while cp
            .harness
            .stream_infos()
            .iter()
            .filter(|s| s.types.contains_key(TOPIC_ROUTE))
            .count()
            < 2
        {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    // Far more than the slow stream's queue and HTTP/2 windows hold.
    let big = "x".repeat(64 * 1024);
    let count = 200;
    for i in 0..count {
        cp.store
            .upsert(topic(&format!("t{i}"), &format!("{big}{i}")));
    }
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < count {
        let r = fast.recv_ack().await;
        seen.extend(r.resources.into_iter().map(|r| r.name));
    }
    drop(slow);
}

struct Nameserver;
impl Resolver for Nameserver {
    fn resolve(&self, type_url: &str, name: &str) -> ResolveFuture {
        let found =
            (type_url == TOPIC_ROUTE && name.starts_with("dyn-")).then(|| topic(name, "resolved"));
        Box::pin(async move {
            tokio::task::yield_now().await;
            Ok(found)
        })
    }
}

#[tokio::test]
async fn resolver_answers_first_subscriptions() {
    let cp = start(Arc::new(Store::new()), Some(Arc::new(Nameserver))).await;
    let mut c = Client::connect(cp.addr).await;
    c.sub(TOPIC_ROUTE, &["dyn-orders"]).await;
    let r = c.recv_ack().await;
    assert_eq!(
        names(&r),
        ["dyn-orders"],
        "answered with the resolved route, not removed first"
    );
    assert!(r.removed_resources.is_empty());
    c.sub(TOPIC_ROUTE, &["nope"]).await;
    assert_eq!(c.recv_ack().await.removed_resources, ["nope"]);
    assert!(cp.store.get(TOPIC_ROUTE, "dyn-orders").is_some());
}

#[tokio::test]
async fn harness_closes_streams_and_protocol_errors_end_the_stream() {
    let cp = start(Arc::new(Store::new()), None).await;
    let mut c = Client::connect(cp.addr).await;
    c.sub(TOPIC_ROUTE, &["a"]).await;
    c.recv_ack().await;
    assert_eq!(cp.harness.close_node("sidecar-1"), 1);
    let status = timeout(WAIT, c.rx.message()).await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let mut c = Client::connect(cp.addr).await;
    c.send(DeltaDiscoveryRequest::default()).await;
    let status = timeout(WAIT, c.rx.message()).await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("type_url"));
}

#[tokio::test]
async fn drop_and_delay_faults() {
    let cp = start(Arc::new(Store::new()), None).await;
    cp.store.upsert_many([topic("a", "c"), topic("b", "c")]);
    cp.harness.set_faults(vec![
        Fault {
            type_url: "topics".into(),
            name: Some("a".into()),
            delay_ms: None,
            drop: true,
            silence: false,
            invalid: false,
        },
        Fault {
            type_url: "topics".into(),
            name: Some("b".into()),
            delay_ms: Some(50),
            drop: false,
            silence: false,
            invalid: false,
        },
        Fault {
            type_url: "topics".into(),
            name: Some("s".into()),
            delay_ms: None,
            drop: false,
            silence: true,
            invalid: false,
        },
    ]);
    let mut c = Client::connect(cp.addr).await;
    c.sub(TOPIC_ROUTE, &["a"]).await;
    c.quiet().await;
    c.sub(TOPIC_ROUTE, &["s"]).await;
    c.quiet().await;
    c.sub(TOPIC_ROUTE, &["b"]).await;
    assert_eq!(names(&c.recv_ack().await), ["b"]);
    let log = cp.harness.stream_log(1).unwrap();
    assert!(log.iter().any(|e| matches!(e, Event::Response { dropped: true, resources, .. } if resources.contains_key("a"))));
    assert!(log.iter().any(|e| matches!(
        e,
        Event::Response {
            delayed_ms: Some(50),
            ..
        }
    )));
    assert!(
        !log.iter().any(
            |e| matches!(e, Event::Response { removed, .. } if removed.iter().any(|n| n == "s"))
        ),
        "silenced"
    );
    assert_eq!(cp.harness.metrics().dropped, 1);
}

#[tokio::test]
async fn delta_cds_serves_clusters_and_sotw_is_unimplemented() {
    use rocketmesh_xds::envoy_types::pb::envoy::service::cluster::v3::cluster_discovery_service_client::ClusterDiscoveryServiceClient;
    use rocketmesh_xds::envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    let cp = start(Arc::new(Store::new()), None).await;
    let spec = cluster_spec("topic-a", LbPolicy::RoundRobin)
        .build()
        .unwrap();
    cp.store.upsert(spec.cluster);
    let mut cds = ClusterDiscoveryServiceClient::connect(format!("http://{}", cp.addr))
        .await
        .unwrap();
    let (tx, requests) = mpsc::channel(4);
    // The type URL may be left out on the single-type service.
    tx.send(DeltaDiscoveryRequest {
        resource_names_subscribe: vec!["topic-a".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut rx = cds
        .delta_clusters(ReceiverStream::new(requests))
        .await
        .unwrap()
        .into_inner();
    let r = timeout(WAIT, rx.message()).await.unwrap().unwrap().unwrap();
    assert_eq!((r.type_url.as_str(), names(&r)), (CLUSTER, vec!["topic-a"]));
    let mut ads = AggregatedDiscoveryServiceClient::connect(format!("http://{}", cp.addr))
        .await
        .unwrap();
    let sotw = tokio_stream::iter(vec![DiscoveryRequest::default()]);
    let status = ads.stream_aggregated_resources(sotw).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
}

#[tokio::test]
async fn shutdown_ends_open_streams_so_serve_returns() {
    let store = Arc::new(Store::new());
    let harness = Arc::new(Harness::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(serve(
        listener,
        XdsServer::new(store.clone(), harness.clone()),
        async {
            let _ = stopped.await;
        },
    ));
    store.upsert(topic("a", "c"));
    let mut c = Client::connect(addr).await;
    c.sub(TOPIC_ROUTE, &["a"]).await;
    c.recv_ack().await;
    stop.send(()).unwrap();
    // The open stream ends with UNAVAILABLE, so the graceful drain finishes.
    let status = timeout(WAIT, c.rx.message()).await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("shutting down"));
    timeout(WAIT, served).await.unwrap().unwrap().unwrap();
    // The port is free again for a successor.
    tokio::net::TcpListener::bind(addr).await.unwrap();
    let info = &harness.stream_infos()[0];
    assert!(info.closed_ms.is_some());
}
