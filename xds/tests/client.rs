//! The on-demand client against the in-process server over loopback.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rocketmesh_xds::VersionedResource;
use rocketmesh_xds::client::{ClientConfig, DemandError, Demanded, ResourceHandler, XdsClient};
use rocketmesh_xds::envoy_types::pb::envoy::config::cluster::v3::Cluster;
use rocketmesh_xds::envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use rocketmesh_xds::harness::{Event, Fault, Harness};
use rocketmesh_xds::protocol::Ack;
use rocketmesh_xds::server::{XdsServer, serve};
use rocketmesh_xds::spec::{
    ClusterSpec, EndpointSpec, LbPolicy, TopicRouteSpec, decode_any, decode_topic_route,
};
use rocketmesh_xds::store::Store;
use rocketmesh_xds::types::{CLUSTER, CLUSTER_LOAD_ASSIGNMENT, TOPIC_ROUTE};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Bound on every wait; a failing test fails, it does not hang.
const WAIT: Duration = Duration::from_secs(5);

struct Cp {
    addr: SocketAddr,
    store: Arc<Store>,
    harness: Arc<Harness>,
    stop: Option<oneshot::Sender<()>>,
    served: JoinHandle<Result<(), rocketmesh_xds::tonic::transport::Error>>,
}

impl Cp {
    async fn start(store: Arc<Store>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::on(listener, store)
    }

    fn on(listener: tokio::net::TcpListener, store: Arc<Store>) -> Self {
        let addr = listener.local_addr().unwrap();
        let harness = Arc::new(Harness::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(serve(
            listener,
            XdsServer::new(store.clone(), harness.clone()),
            async {
                let _ = stopped.await;
            },
        ));
        Self {
            addr,
            store,
            harness,
            stop: Some(stop),
            served,
        }
    }

    /// Stops serving and waits until the serve future has ended.
    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        timeout(WAIT, &mut self.served)
            .await
            .expect("serve did not end")
            .unwrap()
            .unwrap();
    }

    /// Every event of every stream, in stream order.
    fn log(&self) -> Vec<Event> {
        self.harness
            .stream_infos()
            .iter()
            .flat_map(|s| self.harness.stream_log(s.id).unwrap_or_default())
            .collect()
    }

    /// Requests subscribing `name` of `type_url`.
    fn subscribes(&self, type_url: &str, name: &str) -> usize {
        self.log()
            .iter()
            .filter(|e| matches!(e, Event::Request { type_url: t, subscribe, .. } if t == type_url && subscribe.iter().any(|n| n == name)))
            .count()
    }
}

fn config(addr: SocketAddr) -> ClientConfig {
    ClientConfig {
        address: format!("http://{addr}"),
        node_id: "sidecar-test".into(),
        request_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        ..Default::default()
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

fn cluster(name: &str) -> [VersionedResource; 2] {
    let spec = ClusterSpec {
        name: name.into(),
        endpoints: vec![EndpointSpec {
            address: "127.0.0.1:10911".into(),
            broker_name: Some("broker-a".into()),
            broker_id: Some(0),
            cluster_name: Some("DefaultCluster".into()),
            ..Default::default()
        }],
        connect_timeout_ms: 1000,
        lb_policy: LbPolicy::RoundRobin,
        balancer: BTreeMap::new(),
    }
    .build()
    .unwrap();
    [spec.cluster, spec.load_assignment]
}

fn fault(type_url: &str, name: &str) -> Fault {
    Fault {
        type_url: type_url.into(),
        name: Some(name.into()),
        delay_ms: None,
        drop: false,
        silence: false,
        invalid: false,
    }
}

/// What the handler was given.
#[derive(Default)]
struct Held {
    /// (type, name) → resource.
    resources: BTreeMap<(String, String), VersionedResource>,
    /// (type, name) told removed, in order.
    removed: Vec<(String, String)>,
}

impl Held {
    fn version(&self, type_url: &str, name: &str) -> Option<&str> {
        self.resources
            .get(&(type_url.to_owned(), name.to_owned()))
            .map(|r| r.version.as_str())
    }
}

/// A handler that records, rejects topic routes pointing at cluster "forbidden" and panics on
/// those pointing at "panic".
struct Recorder {
    held: Mutex<Held>,
    changed: watch::Sender<u64>,
}

impl Recorder {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            held: Mutex::default(),
            changed: watch::channel(0).0,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Held) -> T) -> T {
        f(&self.held.lock().unwrap())
    }

    /// Waits (bounded) until the handler's state satisfies `cond`.
    async fn until(&self, cond: impl Fn(&Held) -> bool) {
        let mut rx = self.changed.subscribe();
        timeout(WAIT, rx.wait_for(|_| self.with(&cond)))
            .await
            .expect("handler condition not reached")
            .unwrap();
    }
}

impl ResourceHandler for Recorder {
    fn apply(
        &self,
        type_url: &str,
        added: &[VersionedResource],
        removed: &[String],
    ) -> Result<(), String> {
        if type_url == TOPIC_ROUTE {
            for r in added {
                let route = decode_topic_route(&r.any).map_err(|e| e.to_string())?;
                assert_ne!(route.cluster, "panic", "a buggy handler");
                if route.cluster == "forbidden" {
                    return Err(format!("topic {} routes to a forbidden cluster", r.name));
                }
            }
        }
        {
            let mut held = self.held.lock().unwrap();
            for r in added {
                held.resources
                    .insert((type_url.to_owned(), r.name.clone()), r.clone());
            }
            for n in removed {
                held.resources.remove(&(type_url.to_owned(), n.clone()));
                held.removed.push((type_url.to_owned(), n.clone()));
            }
        }
        self.changed.send_modify(|g| *g += 1);
        Ok(())
    }
}

/// Polls a condition on the server side (the harness has no change notification), bounded.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    timeout(WAIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not reached: {what}"));
}

async fn connected(client: &XdsClient, up: bool) {
    timeout(WAIT, client.connection().wait_for(|c| *c == up))
        .await
        .expect("connection state not reached")
        .unwrap();
}

#[tokio::test]
async fn demands_a_route_then_its_cluster_and_endpoints() {
    let cp = Cp::start(Arc::new(Store::new())).await;
    let route = topic("orders", "c1");
    let route_version = route.version.clone();
    cp.store.upsert(route);
    let [c, cla] = cluster("c1");
    let (cv, clav) = (c.version.clone(), cla.version.clone());
    cp.store.upsert_many([c, cla]);
    let h = Recorder::new();
    let client = XdsClient::start(config(cp.addr), h.clone());

    assert_eq!(
        client.demand(TOPIC_ROUTE, "orders").await,
        Ok(Demanded::Present(route_version.clone()))
    );
    // The handler has it before the demand resolved.
    let cluster_name = h.with(|held| {
        let r = &held.resources[&(TOPIC_ROUTE.to_owned(), "orders".to_owned())];
        decode_topic_route(&r.any).unwrap().cluster
    });
    assert_eq!(cluster_name, "c1");
    let (c, e) = tokio::join!(
        client.demand(CLUSTER, &cluster_name),
        client.demand(CLUSTER_LOAD_ASSIGNMENT, &cluster_name)
    );
    assert_eq!(c, Ok(Demanded::Present(cv)));
    assert_eq!(e, Ok(Demanded::Present(clav)));
    h.with(|held| {
        let c = &held.resources[&(CLUSTER.to_owned(), "c1".to_owned())];
        assert_eq!(decode_any::<Cluster>(&c.any).unwrap().name, "c1");
        let e = &held.resources[&(CLUSTER_LOAD_ASSIGNMENT.to_owned(), "c1".to_owned())];
        let cla = decode_any::<ClusterLoadAssignment>(&e.any).unwrap();
        assert_eq!(cla.endpoints[0].lb_endpoints.len(), 1);
    });

    // Known: answered at once, no new subscribe.
    assert_eq!(
        client.demand(TOPIC_ROUTE, "orders").await,
        Ok(Demanded::Present(route_version))
    );
    assert_eq!(cp.subscribes(TOPIC_ROUTE, "orders"), 1);
    let info = &cp.harness.stream_infos()[0];
    assert_eq!(info.node, "sidecar-test");
    let snap = client.snapshot();
    assert!(snap.connected);
    assert_eq!(snap.types[TOPIC_ROUTE].subscribed.len(), 1);
    assert!(snap.types[CLUSTER].subscribed["c1"].version.is_some());
    assert!(snap.types[TOPIC_ROUTE].last_ack_nonce.is_some());
    assert_eq!(
        (
            snap.counters.demands,
            snap.counters.subscriptions,
            snap.counters.presents
        ),
        (4, 3, 4)
    );
    // The snapshot is what /config_dump serves.
    let json = serde_json::to_value(&snap).unwrap();
    assert_eq!(json["types"][CLUSTER]["subscribed"]["c1"]["absent"], false);
}

#[tokio::test]
async fn an_unknown_name_is_absent_at_once_and_pushed_when_it_appears() {
    let cp = Cp::start(Arc::new(Store::new())).await;
    let h = Recorder::new();
    let cfg = config(cp.addr);
    let client = XdsClient::start(cfg.clone(), h.clone());
    let t0 = Instant::now();
    assert_eq!(
        client.demand(TOPIC_ROUTE, "ghost").await,
        Ok(Demanded::Absent)
    );
    assert!(
        t0.elapsed() < cfg.request_timeout / 2,
        "answered by removed_resources, not by the timeout: {:?}",
        t0.elapsed()
    );
    // Known absent: at once, no new subscribe.
    assert_eq!(
        client.demand(TOPIC_ROUTE, "ghost").await,
        Ok(Demanded::Absent)
    );
    assert_eq!(cp.subscribes(TOPIC_ROUTE, "ghost"), 1);
    assert!(h.with(|held| held.removed.is_empty()), "never held");
    // Still subscribed: created later, it is pushed.
    let r = topic("ghost", "c1");
    let v = r.version.clone();
    cp.store.upsert(r);
    h.until(|held| held.version(TOPIC_ROUTE, "ghost") == Some(v.as_str()))
        .await;
    assert_eq!(
        client.demand(TOPIC_ROUTE, "ghost").await,
        Ok(Demanded::Present(v))
    );
    assert_eq!(client.snapshot().counters.absents, 2);
}

#[tokio::test]
async fn concurrent_demands_of_one_name_share_one_subscribe() {
    let cp = Cp::start(Arc::new(Store::new())).await;
    let r = topic("hot", "c1");
    let v = r.version.clone();
    cp.store.upsert(r);
    // Hold the answer a little so every demand joins the one under way.
    cp.harness.set_faults(vec![Fault {
        delay_ms: Some(100),
        ..fault("topics", "hot")
    }]);
    let client = Arc::new(XdsClient::start(config(cp.addr), Recorder::new()));
    let demands: Vec<_> = (0..10)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.demand(TOPIC_ROUTE, "hot").await })
        })
        .collect();
    for d in demands {
        assert_eq!(d.await.unwrap(), Ok(Demanded::Present(v.clone())));
    }
    assert_eq!(cp.subscribes(TOPIC_ROUTE, "hot"), 1, "{:#?}", cp.log());
    let c = client.snapshot().counters;
    assert_eq!((c.demands, c.subscriptions, c.presents), (10, 1, 10));
    assert!(c.demand_hold_us_total > 0);
}

#[tokio::test]
async fn a_silenced_name_times_out_and_a_later_demand_asks_again() {
    let cp = Cp::start(Arc::new(Store::new())).await;
    let r = topic("quiet", "c1");
    let v = r.version.clone();
    cp.store.upsert(r);
    cp.harness.set_faults(vec![Fault {
        silence: true,
        ..fault("topics", "quiet")
    }]);
    let cfg = ClientConfig {
        request_timeout: Duration::from_millis(300),
        ..config(cp.addr)
    };
    let client = XdsClient::start(cfg.clone(), Recorder::new());
    let t0 = Instant::now();
    let err = client.demand(TOPIC_ROUTE, "quiet").await.unwrap_err();
    assert!(matches!(err, DemandError::Timeout { ref name, .. } if name == "quiet"));
    assert!(t0.elapsed() >= cfg.request_timeout && t0.elapsed() < WAIT);
    let snap = client.snapshot();
    assert_eq!(snap.counters.timeouts, 1);
    assert!(snap.types[TOPIC_ROUTE].pending.is_empty(), "gave up");
    assert_eq!(snap.types[TOPIC_ROUTE].subscribed["quiet"].version, None);
    // The control plane recovers; the next demand subscribes again, which obliges an answer
    // (no name stuck behind a past timeout).
    cp.harness.set_faults(vec![]);
    assert_eq!(
        client.demand(TOPIC_ROUTE, "quiet").await,
        Ok(Demanded::Present(v))
    );
    assert_eq!(cp.subscribes(TOPIC_ROUTE, "quiet"), 2);
}

#[tokio::test]
async fn a_rejected_resource_is_nacked_and_a_fixed_version_acked() {
    let cp = Cp::start(Arc::new(Store::new())).await;
    cp.store.upsert(topic("t", "forbidden"));
    let h = Recorder::new();
    let client = XdsClient::start(config(cp.addr), h.clone());
    let reason = "topic t routes to a forbidden cluster";
    assert_eq!(
        client.demand(TOPIC_ROUTE, "t").await,
        Err(DemandError::Rejected {
            name: "t".into(),
            reason: reason.into()
        })
    );
    eventually("NACK recorded by the harness", || {
        cp.harness.stream_infos().first().is_some_and(|s| {
            s.types
                .get(TOPIC_ROUTE)
                .and_then(|t| t.last_nack.as_ref())
                .is_some_and(|n| n.error == reason)
        })
    })
    .await;
    assert!(cp.log().iter().any(
        |e| matches!(e, Event::Request { ack: Some(Ack::Nack { error, .. }), .. } if error == reason)
    ));
    let snap = client.snapshot();
    assert_eq!(
        snap.types[TOPIC_ROUTE].last_nack.as_ref().unwrap().reason,
        reason
    );
    assert_eq!(
        snap.types[TOPIC_ROUTE].subscribed["t"].version, None,
        "not recorded"
    );
    assert_eq!((snap.counters.nacks, snap.counters.rejections), (1, 1));
    assert!(h.with(|held| held.version(TOPIC_ROUTE, "t").is_none()));
    // A fixed version is pushed, applied and ACKed.
    let fixed = topic("t", "c1");
    let v = fixed.version.clone();
    cp.store.upsert(fixed);
    h.until(|held| held.version(TOPIC_ROUTE, "t") == Some(v.as_str()))
        .await;
    eventually("ACK of the fixed version", || {
        cp.harness.stream_infos().first().is_some_and(|s| {
            s.types[TOPIC_ROUTE].acked.get("t") == Some(&v)
                && s.types[TOPIC_ROUTE].unacked_nonces.is_empty()
        })
    })
    .await;
    assert_eq!(
        client.demand(TOPIC_ROUTE, "t").await,
        Ok(Demanded::Present(v))
    );
}

#[tokio::test]
async fn server_pushes_reach_the_handler() {
    let cp = Cp::start(Arc::new(Store::new())).await;
    cp.store.upsert(topic("orders", "c1"));
    let h = Recorder::new();
    let client = XdsClient::start(config(cp.addr), h.clone());
    client.demand(TOPIC_ROUTE, "orders").await.unwrap();
    let updated = topic("orders", "c2");
    let v2 = updated.version.clone();
    cp.store.upsert(updated);
    h.until(|held| held.version(TOPIC_ROUTE, "orders") == Some(v2.as_str()))
        .await;
    assert_eq!(
        client.snapshot().types[TOPIC_ROUTE].subscribed["orders"].version,
        Some(v2.clone())
    );
    // Deleted on the server: the handler is told, and demands see it absent.
    cp.store.delete(TOPIC_ROUTE, "orders");
    h.until(|held| held.version(TOPIC_ROUTE, "orders").is_none())
        .await;
    assert_eq!(
        h.with(|held| held.removed.clone()),
        [(TOPIC_ROUTE.to_owned(), "orders".to_owned())]
    );
    assert_eq!(
        client.demand(TOPIC_ROUTE, "orders").await,
        Ok(Demanded::Absent)
    );
}

#[tokio::test]
async fn release_unsubscribes_and_the_handler_drops_it() {
    let cp = Cp::start(Arc::new(Store::new())).await;
    cp.store.upsert(topic("orders", "c1"));
    let h = Recorder::new();
    let client = XdsClient::start(config(cp.addr), h.clone());
    client.demand(TOPIC_ROUTE, "orders").await.unwrap();
    client.release(TOPIC_ROUTE, ["orders", "never-subscribed"]);
    // The handler is told at once (before the server is).
    assert_eq!(
        h.with(|held| held.removed.clone()),
        [(TOPIC_ROUTE.to_owned(), "orders".to_owned())]
    );
    eventually("unsubscribe in the harness log", || {
        cp.log().iter().any(|e| {
            matches!(e, Event::Request { unsubscribe, .. } if unsubscribe == &["orders".to_owned()])
        })
    })
    .await;
    let snap = client.snapshot();
    assert!(snap.types[TOPIC_ROUTE].subscribed.is_empty());
    assert_eq!(snap.counters.unsubscriptions, 1);
    eventually("server forgot the subscription", || {
        cp.harness.stream_infos()[0].types[TOPIC_ROUTE]
            .subscribed
            .is_empty()
    })
    .await;
    // Demanded again: subscribed again and re-sent (though unchanged).
    client.demand(TOPIC_ROUTE, "orders").await.unwrap();
    assert!(h.with(|held| held.version(TOPIC_ROUTE, "orders").is_some()));
    assert_eq!(cp.subscribes(TOPIC_ROUTE, "orders"), 2);
}

#[tokio::test]
async fn survives_a_control_plane_restart_on_the_same_port() {
    let store = Arc::new(Store::new());
    let orders = topic("orders", "c1");
    let orders_v = orders.version.clone();
    store.upsert(orders.clone());
    store.upsert_many(cluster("c1"));
    let cp = Cp::start(store).await;
    let addr = cp.addr;
    let h = Recorder::new();
    let cfg = ClientConfig {
        request_timeout: Duration::from_millis(1500),
        ..config(addr)
    };
    let client = Arc::new(XdsClient::start(cfg.clone(), h.clone()));
    client.demand(TOPIC_ROUTE, "orders").await.unwrap();
    client.demand(CLUSTER, "c1").await.unwrap();

    // The control plane goes away: its streams end with UNAVAILABLE.
    cp.shutdown().await;
    connected(&client, false).await;
    let snap = client.snapshot();
    assert!(
        snap.last_error
            .as_deref()
            .is_some_and(|e| e.contains("shutting down")),
        "{:?}",
        snap.last_error
    );
    assert_eq!(
        h.with(|held| held.version(TOPIC_ROUTE, "orders").map(str::to_owned)),
        Some(orders_v.clone()),
        "known resources stay"
    );
    assert_eq!(
        client.demand(TOPIC_ROUTE, "orders").await,
        Ok(Demanded::Present(orders_v.clone())),
        "known: answered while disconnected"
    );
    let t0 = Instant::now();
    assert!(matches!(
        client.demand(TOPIC_ROUTE, "later").await,
        Err(DemandError::Timeout { .. })
    ));
    assert!(t0.elapsed() >= cfg.request_timeout);
    // A demand waiting across the reconnect.
    let survivor = {
        let client = client.clone();
        tokio::spawn(async move { client.demand(TOPIC_ROUTE, "survivor").await })
    };
    eventually("survivor pending", || {
        client.snapshot().types[TOPIC_ROUTE]
            .pending
            .iter()
            .any(|p| p.name == "survivor")
    })
    .await;

    // A successor on the same port, same content, plus new routes.
    let store = Arc::new(Store::new());
    store.upsert_many([orders, topic("later", "c1"), topic("survivor", "c1")]);
    store.upsert_many(cluster("c1"));
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let restarted = Instant::now();
    let cp = Cp::on(listener, store);
    connected(&client, true).await;
    assert!(
        restarted.elapsed() < cfg.backoff_max + Duration::from_secs(1),
        "reconnected after {:?}",
        restarted.elapsed()
    );
    assert!(matches!(survivor.await.unwrap(), Ok(Demanded::Present(_))));
    assert!(matches!(
        client.demand(TOPIC_ROUTE, "later").await,
        Ok(Demanded::Present(_))
    ));

    let log = cp.log();
    let first_topic_request = log
        .iter()
        .find_map(|e| match e {
            Event::Request {
                type_url,
                subscribe,
                initial_versions,
                ..
            } if type_url == TOPIC_ROUTE => Some((subscribe.clone(), initial_versions.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        first_topic_request.1,
        BTreeMap::from([("orders".to_owned(), orders_v.clone())]),
        "what is known is offered"
    );
    assert!(first_topic_request.0.contains(&"orders".to_owned()));
    assert!(first_topic_request.0.contains(&"later".to_owned()));
    assert!(
        !log.iter().any(|e| matches!(
            e,
            Event::Response { resources, .. } if resources.contains_key("orders") || resources.contains_key("c1")
        )),
        "unchanged resources are not re-sent: {log:#?}"
    );
    assert!(log.iter().any(|e| matches!(
        e,
        Event::Request { type_url, initial_versions, .. } if type_url == CLUSTER && initial_versions.contains_key("c1")
    )));
    let snap = client.snapshot();
    assert!(snap.connected);
    assert_eq!(snap.counters.reconnects, 1);
    assert!(snap.counters.connect_failures >= 1);
    assert_eq!(snap.counters.timeouts, 1);
    assert_eq!(cp.harness.stream_infos()[0].node, "sidecar-test");
}

#[tokio::test]
async fn names_and_waiters_are_bounded_and_a_panicking_handler_is_a_nack() {
    let cp = Cp::start(Arc::new(Store::new())).await;
    cp.store
        .upsert_many([topic("a", "c1"), topic("p", "panic")]);
    cp.harness.set_faults(vec![Fault {
        silence: true,
        ..fault("topics", "s")
    }]);
    let cfg = ClientConfig {
        max_names_per_type: 2,
        max_pending_demands: 1,
        request_timeout: Duration::from_millis(500),
        ..config(cp.addr)
    };
    let client = Arc::new(XdsClient::start(cfg, Recorder::new()));
    client.demand(TOPIC_ROUTE, "a").await.unwrap();
    client.demand(TOPIC_ROUTE, "b").await.unwrap();
    assert_eq!(
        client.demand(TOPIC_ROUTE, "c").await,
        Err(DemandError::TooManyNames {
            type_url: TOPIC_ROUTE.into(),
            max: 2
        })
    );
    for bad in ["", "*"] {
        assert_eq!(
            client.demand(TOPIC_ROUTE, bad).await,
            Err(DemandError::InvalidName(bad.into()))
        );
    }
    client.release(TOPIC_ROUTE, ["a", "b"]);
    let silenced = {
        let client = client.clone();
        tokio::spawn(async move { client.demand(TOPIC_ROUTE, "s").await })
    };
    eventually("s pending", || {
        !client.snapshot().types[TOPIC_ROUTE].pending.is_empty()
    })
    .await;
    assert_eq!(
        client.demand(TOPIC_ROUTE, "c").await,
        Err(DemandError::Overloaded { max: 1 })
    );
    assert!(matches!(
        silenced.await.unwrap(),
        Err(DemandError::Timeout { .. })
    ));
    // The handler panics: a NACK, and the client carries on.
    let err = client.demand(TOPIC_ROUTE, "p").await.unwrap_err();
    assert!(
        matches!(&err, DemandError::Rejected { reason, .. } if reason.starts_with("handler panicked")),
        "{err:?}"
    );
    let snap = client.snapshot();
    assert!(snap.running && snap.connected);
    assert_eq!(snap.counters.nacks, 1);
}
