//! Routes on demand over delta xDS (`xds:` in the sidecar's config).
//!
//! The first request that names an unseen topic subscribes the topic's `TopicRoute`, then the
//! `Cluster` and `ClusterLoadAssignment` of every cluster the route names; requests for the same
//! topic share those subscriptions (the client coalesces demands) and are held until the route is
//! installed. Topics no request names for `idle_unsubscribe_after_s` are unsubscribed, and with
//! them the clusters no held topic names: the route table, balancers, broker listeners, upstream
//! pools and per-topic stats then let go of them, so the sidecar's memory follows the topics its
//! applications use.
//!
//! The [`Handler`] turns resources into the sidecar's vocabulary ([`convert`]) and rebuilds the
//! route table before the client wakes the waiting requests, so a woken request finds its route.

pub mod convert;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use rocketmesh_xds::client::{ClientConfig, ClientSnapshot, DemandError, Demanded, XdsClient};
use rocketmesh_xds::envoy_types::pb::envoy::config::cluster::v3::Cluster;
use rocketmesh_xds::envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use rocketmesh_xds::spec::{decode_any, decode_topic_route};
use rocketmesh_xds::types::{CLUSTER, CLUSTER_LOAD_ASSIGNMENT, TOPIC_ROUTE};
use rocketmesh_xds::{VersionedResource, client::ResourceHandler};
use serde::Serialize;
use tracing::{debug, info, warn};

use super::Proxy;
use super::config::XdsConfig;
use super::routes::{TopicUsage, XdsRoutes, XdsTopic};
use super::stats::{Histogram, HistogramSnapshot};

/// Why a topic has no route from the control plane; the text goes into TOPIC_NOT_EXIST's remark.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotRouted {
    #[error("the control plane says topic {topic} does not exist")]
    Absent { topic: String },
    #[error("the control plane routes topic {topic} to cluster {cluster}, which it does not have")]
    ClusterAbsent { topic: String, cluster: String },
    #[error(
        "no route for topic {topic} from the control plane within {after_ms} ms{}",
        if *.connected { "" } else { " (not connected to it)" }
    )]
    Timeout {
        topic: String,
        after_ms: u64,
        connected: bool,
    },
    #[error("the control plane's route for topic {topic} was refused: {reason}")]
    Rejected { topic: String, reason: String },
    #[error("the sidecar holds its limit of topics or waiting requests: {reason}")]
    Overloaded { reason: String },
    #[error("the xDS client of the sidecar stopped")]
    Stopped,
}

/// What xDS gave, raw and converted; one lock, taken by the handler and by table rebuilds.
#[derive(Default)]
struct Held {
    routes: XdsRoutes,
    /// Topic → the clusters its routes name and the route's version.
    topics: HashMap<String, HeldTopic>,
    clusters: HashMap<String, Cluster>,
    assignments: HashMap<String, ClusterLoadAssignment>,
}

struct HeldTopic {
    clusters: BTreeSet<String>,
    version: String,
}

/// Counters of the sidecar's side: requests held for a route and how they ended.
#[derive(Default)]
struct Counters {
    held: AtomicU64,
    hold_time: Histogram,
    routed: AtomicU64,
    timeouts: AtomicU64,
    absent: AtomicU64,
    refused: AtomicU64,
    topics_unsubscribed: AtomicU64,
    clusters_unsubscribed: AtomicU64,
}

/// The sidecar's on-demand xDS state.
pub struct OnDemand {
    config: XdsConfig,
    client: XdsClient,
    held: Arc<Mutex<Held>>,
    /// Topic → when a request last named it, as the sweeper saw it.
    last_used: Mutex<HashMap<String, Instant>>,
    /// Clusters demanded for topics, released when no held topic names them.
    demanded_clusters: Mutex<BTreeSet<String>>,
    counters: Counters,
    proxy: Arc<OnceLock<Weak<Proxy>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl OnDemand {
    /// Starts the xDS client; resources it receives are installed into `proxy`'s route table.
    pub fn start(config: XdsConfig, proxy: &Arc<Proxy>) -> Arc<Self> {
        let held = Arc::new(Mutex::new(Held::default()));
        let weak = Arc::new(OnceLock::new());
        let _ = weak.set(Arc::downgrade(proxy));
        let handler = Handler {
            held: held.clone(),
            proxy: weak.clone(),
        };
        let client_config = ClientConfig {
            address: config.uri(),
            node_id: config.node_id.clone(),
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            backoff_initial: Duration::from_millis(config.backoff_initial_ms),
            backoff_max: Duration::from_millis(config.backoff_max_ms),
            max_names_per_type: config.max_topics,
            max_pending_demands: config.max_pending,
            max_message_bytes: config.max_message_bytes,
            ..ClientConfig::default()
        };
        let client = XdsClient::start(client_config, Arc::new(handler));
        info!(address = %config.address, node = %config.node_id, "routes come on demand from the xDS control plane");
        Arc::new(Self {
            config,
            client,
            held,
            last_used: Mutex::new(HashMap::new()),
            demanded_clusters: Mutex::new(BTreeSet::new()),
            counters: Counters::default(),
            proxy: weak,
        })
    }

    pub fn connected(&self) -> bool {
        *self.client.connection().borrow()
    }

    /// The control plane is known to be unreachable (not merely still being connected to).
    pub fn unreachable(&self) -> bool {
        self.client.unreachable()
    }

    /// Waits until the client is connected, at most `limit`.
    pub async fn wait_connected(&self, limit: Duration) -> bool {
        let mut connection = self.client.connection();
        tokio::time::timeout(limit, connection.wait_for(|up| *up))
            .await
            .is_ok_and(|waited| waited.is_ok())
    }

    /// Runs `rebuild` on the xDS part of the route table, with xDS updates held off meanwhile
    /// (a SIGHUP reload keeps what xDS gave).
    pub fn with_routes<R>(&self, rebuild: impl FnOnce(&XdsRoutes) -> R) -> R {
        rebuild(&lock(&self.held).routes)
    }

    /// Subscribes `topic`'s route and the clusters it names, waiting until they are installed in
    /// the route table or the control plane answered that they do not exist.
    pub async fn resolve(&self, topic: &str) -> Result<(), NotRouted> {
        let started = Instant::now();
        self.counters.held.fetch_add(1, Ordering::Relaxed);
        lock(&self.last_used).insert(topic.to_owned(), started);
        let result = self.resolve_inner(topic).await;
        self.counters.hold_time.record(started.elapsed());
        let counter = match &result {
            Ok(()) => &self.counters.routed,
            Err(NotRouted::Timeout { .. }) => &self.counters.timeouts,
            Err(NotRouted::Absent { .. } | NotRouted::ClusterAbsent { .. }) => {
                &self.counters.absent
            }
            Err(_) => &self.counters.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    async fn resolve_inner(&self, topic: &str) -> Result<(), NotRouted> {
        let outcome = self.client.demand(TOPIC_ROUTE, topic).await;
        self.check(topic, None, outcome)?;
        let clusters = lock(&self.held)
            .topics
            .get(topic)
            .map(|held| held.clusters.clone())
            .unwrap_or_default();
        lock(&self.demanded_clusters).extend(clusters.iter().cloned());
        let demands = clusters.iter().flat_map(|cluster| {
            [CLUSTER, CLUSTER_LOAD_ASSIGNMENT].map(|type_url| async move {
                (cluster, self.client.demand(type_url, cluster).await)
            })
        });
        for (cluster, outcome) in futures::future::join_all(demands).await {
            self.check(topic, Some(cluster), outcome)?;
        }
        Ok(())
    }

    fn check(
        &self,
        topic: &str,
        cluster: Option<&str>,
        outcome: Result<Demanded, DemandError>,
    ) -> Result<(), NotRouted> {
        let topic = topic.to_owned();
        match outcome {
            Ok(Demanded::Present(_)) => Ok(()),
            Ok(Demanded::Absent) => Err(match cluster {
                None => NotRouted::Absent { topic },
                Some(cluster) => NotRouted::ClusterAbsent {
                    topic,
                    cluster: cluster.to_owned(),
                },
            }),
            Err(DemandError::Timeout { .. }) => Err(NotRouted::Timeout {
                topic,
                after_ms: self.config.request_timeout_ms,
                connected: self.connected(),
            }),
            Err(DemandError::Rejected { reason, .. }) => Err(NotRouted::Rejected { topic, reason }),
            Err(
                error @ (DemandError::TooManyNames { .. }
                | DemandError::Overloaded { .. }
                | DemandError::InvalidName(_)),
            ) => Err(NotRouted::Overloaded {
                reason: error.to_string(),
            }),
            // The topic went idle and was released while this request waited: rare, and the
            // client may simply ask again.
            Err(DemandError::Released { .. }) => Err(NotRouted::Timeout {
                topic,
                after_ms: self.config.request_timeout_ms,
                connected: self.connected(),
            }),
            Err(DemandError::Stopped) => Err(NotRouted::Stopped),
        }
    }

    /// Unsubscribes topics no request named for `idle_unsubscribe_after_s`, then clusters no held
    /// topic names. Returns how many topics went.
    pub fn sweep(&self, now: Instant) -> usize {
        let idle_after = Duration::from_secs(self.config.idle_unsubscribe_after_s);
        let usage: Vec<(String, Arc<TopicUsage>)> = lock(&self.held)
            .routes
            .topics
            .iter()
            .map(|(name, topic)| (name.to_string(), topic.usage.clone()))
            .collect();
        let idle: Vec<String> = {
            let mut last_used = lock(&self.last_used);
            for (name, usage) in usage {
                if usage.take() {
                    last_used.insert(name, now);
                }
            }
            let idle: Vec<String> = last_used
                .iter()
                .filter(|(_, used)| now.saturating_duration_since(**used) >= idle_after)
                .map(|(name, _)| name.clone())
                .collect();
            for name in &idle {
                last_used.remove(name);
            }
            shrink_if_sparse(&mut last_used);
            idle
        };
        if !idle.is_empty() {
            info!(
                topics = idle.len(),
                idle_s = self.config.idle_unsubscribe_after_s,
                "unsubscribing idle topics"
            );
            self.client.release(TOPIC_ROUTE, &idle);
            self.counters
                .topics_unsubscribed
                .fetch_add(idle.len() as u64, Ordering::Relaxed);
            if let Some(proxy) = self.proxy.get().and_then(Weak::upgrade) {
                for topic in &idle {
                    proxy.stats.forget_topic(topic);
                }
                proxy.stats.shrink();
            }
        }
        let named: BTreeSet<String> = lock(&self.held)
            .topics
            .values()
            .flat_map(|topic| topic.clusters.iter().cloned())
            .collect();
        let unused: Vec<String> = {
            let mut demanded = lock(&self.demanded_clusters);
            let unused: Vec<String> = demanded.difference(&named).cloned().collect();
            for name in &unused {
                demanded.remove(name);
            }
            unused
        };
        if !unused.is_empty() {
            debug!(clusters = ?unused, "unsubscribing clusters no held topic names");
            self.client.release(CLUSTER_LOAD_ASSIGNMENT, &unused);
            self.client.release(CLUSTER, &unused);
            self.counters
                .clusters_unsubscribed
                .fetch_add(unused.len() as u64, Ordering::Relaxed);
        }
        idle.len()
    }

    /// Runs [`Self::sweep`] until the task is aborted; does nothing when unsubscribing is off.
    pub async fn sweep_forever(self: Arc<Self>) {
        if self.config.idle_unsubscribe_after_s == 0 {
            return;
        }
        // Four looks per idle period: a topic goes between 1 and 1.25 periods after its last use.
        let period = Duration::from_millis(self.config.idle_unsubscribe_after_s * 250)
            .max(Duration::from_millis(100));
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Freed state reaches the allocator over the next moments (watchers drop balancers and
        // listeners), so its pages are handed back one tick after a sweep that dropped topics.
        let mut release_next_tick = false;
        loop {
            ticks.tick().await;
            if std::mem::take(&mut release_next_tick) {
                crate::memory::release_on_all_workers().await;
                if let Some(proxy) = self.proxy.get().and_then(Weak::upgrade) {
                    proxy.workers.wake_all();
                }
            }
            release_next_tick = self.sweep(Instant::now()) > 0;
        }
    }

    /// Stops the client (at shutdown).
    pub fn stop(&self) {
        self.client.stop();
    }

    /// For `/config_dump`: the client's subscriptions, versions, (N)ACKs and pending demands,
    /// and the topics installed in the route table with their clusters.
    pub fn view(&self) -> OnDemandView {
        let held = lock(&self.held);
        let topics = held
            .topics
            .iter()
            .map(|(name, topic)| {
                (
                    name.clone(),
                    TopicView {
                        version: topic.version.clone(),
                        clusters: topic.clusters.iter().cloned().collect(),
                        routable: held.routes.topics.contains_key(name.as_str())
                            && topic
                                .clusters
                                .iter()
                                .all(|cluster| held.routes.clusters.contains_key(cluster)),
                    },
                )
            })
            .collect();
        let clusters = held.routes.clusters.keys().cloned().collect();
        drop(held);
        OnDemandView {
            client: self.client.snapshot(),
            topics,
            clusters,
            counters: self.counters(),
            idle_unsubscribe_after_s: self.config.idle_unsubscribe_after_s,
            request_timeout_ms: self.config.request_timeout_ms,
        }
    }

    pub fn counters(&self) -> OnDemandCounters {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let counters = &self.counters;
        OnDemandCounters {
            held: get(&counters.held),
            routed: get(&counters.routed),
            timeouts: get(&counters.timeouts),
            absent: get(&counters.absent),
            refused: get(&counters.refused),
            topics_unsubscribed: get(&counters.topics_unsubscribed),
            clusters_unsubscribed: get(&counters.clusters_unsubscribed),
            hold_time: counters.hold_time.snapshot(),
            client: self.client.snapshot().counters,
        }
    }

    /// Topics subscribed, as the client counts them.
    pub fn client_snapshot(&self) -> ClientSnapshot {
        self.client.snapshot()
    }
}

#[derive(Debug, Serialize)]
pub struct OnDemandView {
    pub client: ClientSnapshot,
    pub topics: BTreeMap<String, TopicView>,
    pub clusters: Vec<String>,
    pub counters: OnDemandCounters,
    pub idle_unsubscribe_after_s: u64,
    pub request_timeout_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct TopicView {
    pub version: String,
    pub clusters: Vec<String>,
    /// Its route and every cluster it names are installed.
    pub routable: bool,
}

#[derive(Debug, Serialize)]
pub struct OnDemandCounters {
    /// Requests that waited for a topic's route (each first request of a topic, and each one
    /// that arrived while it was being fetched).
    pub held: u64,
    pub routed: u64,
    pub timeouts: u64,
    /// The control plane said the topic (or its cluster) does not exist.
    pub absent: u64,
    /// Refused: a rejected resource, or a limit.
    pub refused: u64,
    pub topics_unsubscribed: u64,
    pub clusters_unsubscribed: u64,
    #[serde(skip)]
    pub hold_time: HistogramSnapshot,
    pub client: rocketmesh_xds::client::Counters,
}

/// Applies xDS responses to the route table; runs with the client's state locked.
struct Handler {
    held: Arc<Mutex<Held>>,
    proxy: Arc<OnceLock<Weak<Proxy>>>,
}

impl ResourceHandler for Handler {
    fn apply(
        &self,
        type_url: &str,
        added: &[VersionedResource],
        removed: &[String],
    ) -> Result<(), String> {
        let mut held = lock(&self.held);
        match type_url {
            TOPIC_ROUTE => apply_topics(&mut held, added, removed)?,
            CLUSTER => {
                let mut staged = Vec::with_capacity(added.len());
                for resource in added {
                    let cluster: Cluster =
                        decode_any(&resource.any).map_err(|e| format!("{}: {e}", resource.name))?;
                    check_name(&resource.name, &cluster.name)?;
                    if let Some(assignment) = held.assignments.get(&resource.name) {
                        convert::cluster_config(&cluster, assignment)?;
                    }
                    staged.push(cluster);
                }
                for cluster in staged {
                    held.clusters.insert(cluster.name.clone(), cluster);
                }
                for name in removed {
                    held.clusters.remove(name);
                }
                rebuild_clusters(&mut held, added, removed)?;
            }
            CLUSTER_LOAD_ASSIGNMENT => {
                let mut staged = Vec::with_capacity(added.len());
                for resource in added {
                    let assignment: ClusterLoadAssignment =
                        decode_any(&resource.any).map_err(|e| format!("{}: {e}", resource.name))?;
                    check_name(&resource.name, &assignment.cluster_name)?;
                    if let Some(cluster) = held.clusters.get(&resource.name) {
                        convert::cluster_config(cluster, &assignment)?;
                    }
                    staged.push(assignment);
                }
                for assignment in staged {
                    held.assignments
                        .insert(assignment.cluster_name.clone(), assignment);
                }
                for name in removed {
                    held.assignments.remove(name);
                }
                rebuild_clusters(&mut held, added, removed)?;
            }
            other => {
                debug!(
                    type_url = other,
                    "ignoring a resource type the sidecar does not use"
                );
                return Ok(());
            }
        }
        let Some(proxy) = self.proxy.get().and_then(Weak::upgrade) else {
            return Ok(());
        };
        proxy
            .install_xds(&held.routes)
            .map_err(|error| format!("the route table cannot be built: {error}"))
    }
}

fn check_name(resource: &str, inner: &str) -> Result<(), String> {
    if resource == inner {
        Ok(())
    } else {
        Err(format!(
            "resource {resource:?} carries the name {inner:?}: they must match"
        ))
    }
}

/// Hands back table space after many entries went: hash maps keep their peak capacity, and the
/// sidecar's memory should follow the topics in use.
fn shrink_if_sparse<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(
    map: &mut HashMap<K, V, S>,
) {
    if crate::proxy::stats::is_sparse(map.len(), map.capacity()) {
        map.shrink_to_fit();
    }
}

fn apply_topics(
    held: &mut Held,
    added: &[VersionedResource],
    removed: &[String],
) -> Result<(), String> {
    let mut staged = Vec::with_capacity(added.len());
    for resource in added {
        let spec = decode_topic_route(&resource.any)
            .map_err(|error| format!("topic route {}: {error}", resource.name))?;
        check_name(&resource.name, &spec.topic)?;
        let (routes, clusters) = convert::topic_routes(&spec);
        staged.push((resource, routes, clusters));
    }
    for (resource, routes, clusters) in staged {
        let usage = held
            .routes
            .topics
            .get(resource.name.as_str())
            .map_or_else(Default::default, |topic| topic.usage.clone());
        held.routes.topics.insert(
            Arc::from(resource.name.as_str()),
            Arc::new(XdsTopic { routes, usage }),
        );
        held.topics.insert(
            resource.name.clone(),
            HeldTopic {
                clusters,
                version: resource.version.clone(),
            },
        );
    }
    for name in removed {
        held.routes.topics.remove(name.as_str());
        held.topics.remove(name);
    }
    if !removed.is_empty() {
        shrink_if_sparse(&mut held.routes.topics);
        shrink_if_sparse(&mut held.topics);
    }
    Ok(())
}

/// Re-converts the clusters a response touched; a cluster is complete once both its resources
/// are held.
fn rebuild_clusters(
    held: &mut Held,
    added: &[VersionedResource],
    removed: &[String],
) -> Result<(), String> {
    for name in added.iter().map(|r| &r.name).chain(removed) {
        match (held.clusters.get(name), held.assignments.get(name)) {
            (Some(cluster), Some(assignment)) => {
                let config = convert::cluster_config(cluster, assignment)?;
                held.routes.clusters.insert(name.clone(), Arc::new(config));
            }
            _ => {
                held.routes.clusters.remove(name);
            }
        }
    }
    if !removed.is_empty() {
        warn_if_named(held, removed);
    }
    Ok(())
}

/// A cluster that went away while topics still name it leaves those topics without a route.
fn warn_if_named(held: &Held, removed: &[String]) {
    for name in removed {
        let topics: Vec<&String> = held
            .topics
            .iter()
            .filter(|(_, topic)| topic.clusters.contains(name))
            .map(|(topic, _)| topic)
            .collect();
        if !topics.is_empty() {
            warn!(cluster = %name, ?topics, "a cluster held topics name was removed; they have no route until it returns");
        }
    }
}
