//! `rocketmesh control-plane`: a delta ADS server (the `rocketmesh-xds` crate) fed with topic
//! routes and clusters from a YAML file in the sidecar's vocabulary and, for topics the file does
//! not route, from RocketMQ nameservers. It doubles as a test harness through the crate's HTTP API.
//!
//! Topic routes are made on demand: the first subscription to a topic resolves it (file routes
//! first, then discovery), and the topic is remembered so reloads and refreshes recompute it and
//! push what changed. Reloads and refreshes replace only what this process wrote last (tracked
//! by version): a resource the harness API changed stays as the harness left it.

pub mod config;
pub mod discovery;
pub mod sources;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use futures::StreamExt;
use rocketmesh_xds::VersionedResource;
use rocketmesh_xds::harness::Harness;
use rocketmesh_xds::server::{ServerConfig, XdsServer};
use rocketmesh_xds::spec::{ClusterSpec, EndpointSpec, TopicRouteSpec};
use rocketmesh_xds::store::{ResolveError, ResolveFuture, Resolver, Store};
use rocketmesh_xds::types::{CLUSTER, CLUSTER_LOAD_ASSIGNMENT, TOPIC_ROUTE};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::remoting::body::ClusterInfo;
pub use config::{ControlPlaneConfig, ControlPlaneConfigError, DiscoveryConfig};
use discovery::{Discovery, DiscoveryError};
use sources::{StaticSources, cluster_brokers, discovered_brokers, discovered_queues};

/// Events kept per stream in the harness log.
const HARNESS_LOG_CAPACITY: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ControlPlaneConfigError),
    #[error("invalid route regex: {0}")]
    Regex(#[from] regex::Error),
    #[error("cluster {name}: {reason}")]
    Cluster { name: String, reason: String },
}

/// A running control plane.
pub struct RunningControlPlane {
    pub ads_address: SocketAddr,
    pub admin_address: Option<SocketAddr>,
    pub store: Arc<Store>,
    pub harness: Arc<Harness>,
    state: Arc<State>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// The routing state this process derives from its sources.
struct State {
    store: Arc<Store>,
    sources: ArcSwap<StaticSources>,
    discovery: ArcSwapOption<Discovery>,
    refresh_concurrency: Mutex<usize>,
    max_topics: usize,
    /// Topics asked for, recomputed on reload and refresh.
    topics: Mutex<BTreeSet<String>>,
    /// (type, name) → the version this process last wrote.
    written: Mutex<HashMap<(String, String), String>>,
    /// Clusters from the file, as of the last apply.
    file_clusters: Mutex<BTreeSet<String>>,
    /// Discovered clusters and their brokers.
    discovered: Mutex<BTreeMap<String, Brokers>>,
}

/// A discovered cluster's brokers: (broker name, broker id) → endpoint.
type Brokers = BTreeMap<(String, i64), EndpointSpec>;

fn add_brokers(brokers: &mut Brokers, endpoints: Vec<EndpointSpec>) {
    for endpoint in endpoints {
        let key = (
            endpoint.broker_name.clone().unwrap_or_default(),
            endpoint.broker_id.unwrap_or_default(),
        );
        brokers.insert(key, endpoint);
    }
}

/// How a topic is routed now, and the discovered cluster (name, brokers) it names, if any.
struct Routed {
    route: TopicRouteSpec,
    discovered: Option<(String, Vec<EndpointSpec>)>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts serving. `listen` and `admin` override the config's addresses.
pub async fn start(config: ControlPlaneConfig) -> Result<RunningControlPlane, ControlPlaneError> {
    config.validate()?;
    let store = Arc::new(Store::new());
    let harness = Arc::new(Harness::new(HARNESS_LOG_CAPACITY));
    let state = Arc::new(State {
        store: Arc::clone(&store),
        sources: ArcSwap::from_pointee(StaticSources::new(&config)?),
        discovery: ArcSwapOption::empty(),
        refresh_concurrency: Mutex::new(1),
        max_topics: config.max_topics,
        topics: Mutex::new(BTreeSet::new()),
        written: Mutex::new(HashMap::new()),
        file_clusters: Mutex::new(BTreeSet::new()),
        discovered: Mutex::new(BTreeMap::new()),
    });
    state.set_discovery(config.discovery.as_ref());
    state.apply_file_clusters()?;

    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| ControlPlaneError::Listen {
                address: config.listen,
                source,
            })?;
    let ads_address = listener
        .local_addr()
        .map_err(|source| ControlPlaneError::Listen {
            address: config.listen,
            source,
        })?;
    let server = XdsServer::new(Arc::clone(&store), Arc::clone(&harness))
        .with_resolver(Arc::new(TopicResolver(Arc::clone(&state))))
        .with_config(ServerConfig {
            queue_depth: config.stream_queue_depth,
            resolve_timeout: Duration::from_millis(config.resolve_timeout_ms),
            ..ServerConfig::default()
        });
    let shutdown = wait_for_stop(stopped.clone());
    tasks.push(tokio::spawn(async move {
        if let Err(error) = rocketmesh_xds::server::serve(listener, server, shutdown).await {
            warn!(%error, "the xDS server stopped");
        }
    }));

    let admin_address = match config.admin {
        Some(address) => {
            let listener = TcpListener::bind(address)
                .await
                .map_err(|source| ControlPlaneError::Listen { address, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| ControlPlaneError::Listen { address, source })?;
            let admin = rocketmesh_xds::admin::Admin {
                store: Arc::clone(&store),
                harness: Arc::clone(&harness),
            };
            let shutdown = wait_for_stop(stopped.clone());
            tasks.push(tokio::spawn(rocketmesh_xds::admin::serve_admin(
                listener, admin, shutdown,
            )));
            Some(bound)
        }
        None => None,
    };

    let refresh_state = Arc::clone(&state);
    let refresh_every = config
        .discovery
        .as_ref()
        .map(|discovery| Duration::from_millis(discovery.refresh_interval_ms));
    let mut refresh_stopped = stopped.clone();
    tasks.push(tokio::spawn(async move {
        let Some(every) = refresh_every else { return };
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => refresh_state.recompute_topics().await,
                _ = refresh_stopped.changed() => return,
            }
        }
    }));
    info!(xds = %ads_address, admin = ?admin_address, "control plane serving delta ADS");
    Ok(RunningControlPlane {
        ads_address,
        admin_address,
        store,
        harness,
        state,
        stop,
        tasks,
    })
}

async fn wait_for_stop(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

impl RunningControlPlane {
    /// Applies a new configuration (already validated by its parser): routes, clusters and
    /// discovery settings. Listen addresses and limits keep their values until a restart.
    pub async fn reload(&self, config: &ControlPlaneConfig) -> Result<(), ControlPlaneError> {
        config.validate()?;
        let sources = StaticSources::new(config)?;
        self.state.sources.store(Arc::new(sources));
        self.state.set_discovery(config.discovery.as_ref());
        self.state.apply_file_clusters()?;
        self.state.recompute_topics().await;
        Ok(())
    }

    /// Topics this control plane has been asked for.
    pub fn topics(&self) -> usize {
        lock(&self.state.topics).len()
    }

    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Answers first subscriptions to topic routes the store does not hold yet.
struct TopicResolver(Arc<State>);

impl Resolver for TopicResolver {
    fn resolve(&self, type_url: &str, name: &str) -> ResolveFuture {
        let state = Arc::clone(&self.0);
        let is_topic = type_url == TOPIC_ROUTE;
        let topic = name.to_owned();
        let type_url = type_url.to_owned();
        Box::pin(async move {
            if !is_topic {
                // Clusters of the file are in the store already; a discovered one (asked for
                // before any of its topics, as after a restart) comes from the cluster info.
                return Ok(state.resolve_cluster(&type_url, &topic).await);
            }
            // A name that cannot be a topic does not exist, and is not remembered.
            if crate::names::validate_topic(&topic).is_err() {
                return Ok(None);
            }
            state.remember(&topic);
            state
                .resolve_topic(&topic)
                .await
                .map_err(|error| ResolveError(error.to_string()))
        })
    }
}

impl State {
    fn set_discovery(&self, config: Option<&DiscoveryConfig>) {
        *lock(&self.refresh_concurrency) =
            config.map_or(1, |discovery| discovery.max_concurrent_fetches);
        self.discovery.store(config.map(|discovery| {
            Arc::new(Discovery::new(
                discovery.nameservers.clone(),
                Duration::from_millis(discovery.request_timeout_ms),
            ))
        }));
    }

    fn remember(&self, topic: &str) {
        let mut topics = lock(&self.topics);
        if topics.len() < self.max_topics {
            topics.insert(topic.to_owned());
        } else if !topics.contains(topic) {
            warn!(
                topic,
                max_topics = self.max_topics,
                "too many topics to keep refreshing; this one is served but not refreshed"
            );
        }
    }

    /// How `topic` is routed now, and the discovered cluster it names, if any. Names that are
    /// not valid topics do not exist (and never reach a nameserver).
    async fn topic_route(&self, topic: &str) -> Result<Option<Routed>, DiscoveryError> {
        if crate::names::validate_topic(topic).is_err() {
            return Ok(None);
        }
        let from_file = self.sources.load().route_for(topic);
        let discovered = match self.discovery.load_full() {
            Some(discovery) => discovery.topic_route(topic).await?,
            None => None,
        };
        Ok(match (from_file, discovered) {
            (Some(mut route), Some(data)) => {
                // The file routes it; the brokers know its real queues.
                route.queues = discovered_queues(&data);
                Some(Routed {
                    route,
                    discovered: None,
                })
            }
            (Some(route), None) => Some(Routed {
                route,
                discovered: None,
            }),
            (None, Some(data)) => {
                let (cluster, endpoints) = discovered_brokers(&data);
                let route = TopicRouteSpec {
                    topic: topic.to_owned(),
                    cluster: cluster.clone(),
                    queues: discovered_queues(&data),
                    ..TopicRouteSpec::default()
                };
                Some(Routed {
                    route,
                    discovered: Some((cluster, endpoints)),
                })
            }
            (None, None) => None,
        })
    }

    async fn resolve_topic(
        &self,
        topic: &str,
    ) -> Result<Option<VersionedResource>, DiscoveryError> {
        let Some(Routed { route, discovered }) = self.topic_route(topic).await? else {
            return Ok(None);
        };
        if let Some((name, endpoints)) = discovered {
            let known = lock(&self.discovered).get(&name).cloned();
            let brokers = match known {
                // A broker the route names may be new since the last refresh.
                Some(mut brokers) => {
                    add_brokers(&mut brokers, endpoints);
                    brokers
                }
                // First sight of the cluster: all its brokers, not only this topic's.
                None => {
                    let mut brokers = Brokers::new();
                    let members = match self.cluster_info().await {
                        Some(info) => cluster_brokers(&info, &name),
                        None => None,
                    };
                    add_brokers(&mut brokers, members.unwrap_or(endpoints));
                    brokers
                }
            };
            self.set_discovered_cluster(&name, brokers);
        }
        match route.build() {
            Ok(resource) => {
                // The resolver's caller upserts it; remember it as ours.
                lock(&self.written).insert(
                    (TOPIC_ROUTE.to_owned(), topic.to_owned()),
                    resource.version.clone(),
                );
                Ok(Some(resource))
            }
            Err(error) => {
                warn!(topic, %error, "topic route not served");
                Ok(None)
            }
        }
    }

    /// A discovered cluster asked for by name, from the nameservers' cluster info.
    async fn resolve_cluster(&self, type_url: &str, name: &str) -> Option<VersionedResource> {
        let info = self.cluster_info().await?;
        let members = cluster_brokers(&info, name)?;
        let mut brokers = Brokers::new();
        add_brokers(&mut brokers, members);
        self.set_discovered_cluster(name, brokers);
        self.store
            .get(type_url, name)
            .map(|resource| (*resource).clone())
    }

    /// The nameservers' cluster info; `None` without discovery or when none answers.
    async fn cluster_info(&self) -> Option<ClusterInfo> {
        let discovery = self.discovery.load_full()?;
        match discovery.cluster_info().await {
            Ok(info) => Some(info),
            Err(error) => {
                warn!(%error, "cluster info not available; clusters follow the routes' brokers");
                None
            }
        }
    }

    fn set_discovered_cluster(&self, name: &str, brokers: Brokers) {
        let spec = self
            .sources
            .load()
            .discovered_cluster(name, brokers.values().cloned().collect());
        lock(&self.discovered).insert(name.to_owned(), brokers);
        self.write_cluster(&spec);
    }

    /// Writes the file's clusters and removes those it no longer has.
    fn apply_file_clusters(&self) -> Result<(), ControlPlaneError> {
        let sources = self.sources.load();
        let mut names = BTreeSet::new();
        for spec in sources.cluster_specs() {
            spec.validate()
                .map_err(|error| ControlPlaneError::Cluster {
                    name: spec.name.clone(),
                    reason: error.to_string(),
                })?;
            names.insert(spec.name.clone());
            self.write_cluster(&spec);
        }
        let gone: Vec<String> = lock(&self.file_clusters)
            .difference(&names)
            .cloned()
            .collect();
        let discovered = lock(&self.discovered);
        for name in gone {
            if !discovered.contains_key(&name) {
                self.delete(CLUSTER, &name);
                self.delete(CLUSTER_LOAD_ASSIGNMENT, &name);
            }
        }
        *lock(&self.file_clusters) = names;
        Ok(())
    }

    /// Recomputes every topic asked for, and the discovered clusters from their routes; pushes
    /// what changed. A topic whose source fails keeps its last route.
    async fn recompute_topics(&self) {
        let topics: Vec<String> = lock(&self.topics).iter().cloned().collect();
        let concurrency = *lock(&self.refresh_concurrency);
        let results: Vec<(String, Result<_, DiscoveryError>)> = futures::stream::iter(topics)
            .map(|topic| async move {
                let route = self.topic_route(&topic).await;
                (topic, route)
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        let mut discovered: BTreeMap<String, Brokers> = BTreeMap::new();
        let mut failed = 0usize;
        for (topic, result) in results {
            match result {
                Ok(Some(Routed {
                    route,
                    discovered: cluster,
                })) => {
                    if let Some((name, endpoints)) = cluster {
                        add_brokers(discovered.entry(name).or_default(), endpoints);
                    }
                    match route.build() {
                        Ok(resource) => self.write(resource),
                        Err(error) => warn!(topic, %error, "topic route not served"),
                    }
                }
                Ok(None) => self.delete(TOPIC_ROUTE, &topic),
                Err(error) => {
                    failed += 1;
                    if failed == 1 {
                        warn!(topic, %error, "route refresh failed; the last route stays");
                    }
                }
            }
        }
        if failed > 1 {
            warn!(
                failed,
                "route refresh failed for several topics; their last routes stay"
            );
        }
        // Discovered clusters: every broker the cluster info lists; without it, the brokers
        // this refresh's routes named, or (if some refreshes failed) those known before.
        let kept = lock(&self.discovered).clone();
        let names: BTreeSet<String> = discovered.keys().chain(kept.keys()).cloned().collect();
        let info = if names.is_empty() {
            None
        } else {
            self.cluster_info().await
        };
        let file_clusters = lock(&self.file_clusters).clone();
        for name in names {
            let members = info.as_ref().and_then(|info| cluster_brokers(info, &name));
            let brokers = match members {
                Some(members) => {
                    let mut brokers = Brokers::new();
                    add_brokers(&mut brokers, members);
                    Some(brokers)
                }
                None if info.is_some() && failed == 0 => discovered.remove(&name),
                None => discovered
                    .remove(&name)
                    .or_else(|| kept.get(&name).cloned()),
            };
            match brokers {
                Some(brokers) => self.set_discovered_cluster(&name, brokers),
                None => {
                    lock(&self.discovered).remove(&name);
                    if !file_clusters.contains(&name) {
                        self.delete(CLUSTER, &name);
                        self.delete(CLUSTER_LOAD_ASSIGNMENT, &name);
                    }
                }
            }
        }
    }

    fn write_cluster(&self, spec: &ClusterSpec) {
        match spec.build() {
            Ok(resources) => {
                self.write(resources.cluster);
                self.write(resources.load_assignment);
            }
            Err(error) => warn!(cluster = %spec.name, %error, "cluster not served"),
        }
    }

    /// Upserts unless someone else (the harness API) wrote the resource since this process did.
    fn write(&self, resource: VersionedResource) {
        let key = (resource.type_url.clone(), resource.name.clone());
        let mut written = lock(&self.written);
        let current = self.store.get(&resource.type_url, &resource.name);
        let ours = match (&current, written.get(&key)) {
            (None, _) => true,
            (Some(current), Some(version)) => &current.version == version,
            (Some(_), None) => false,
        };
        if !ours {
            return;
        }
        written.insert(key, resource.version.clone());
        self.store.upsert(resource);
    }

    fn delete(&self, type_url: &str, name: &str) {
        let key = (type_url.to_owned(), name.to_owned());
        let mut written = lock(&self.written);
        let ours = match (self.store.get(type_url, name), written.get(&key)) {
            (Some(current), Some(version)) => &current.version == version,
            _ => false,
        };
        if ours {
            written.remove(&key);
            self.store.delete(type_url, name);
        }
    }
}
