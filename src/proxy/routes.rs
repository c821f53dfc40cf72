//! The route table: topic → cluster → endpoints, as an immutable snapshot swapped whole at run time.
//!
//! Request paths load the current snapshot once (`ArcSwap`, no lock) and work on it; a new
//! configuration or an xDS update builds a new table and swaps it in, waking requests that wait for
//! a route that was missing.
//!
//! Two sources meet here: the static routes of the config file (matchers, first match wins) and the
//! per-topic routes received over xDS (exact names, a hash lookup). An xDS route wins; the static
//! routes are the fallback.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::config::{
    BalancerSettings, ClusterConfig, ConfigError, EndpointMetadata, PERM_READ, PERM_WRITE,
    RouteActionConfig, SidecarConfig, TopicMatcher,
};
use crate::remoting::body::{BrokerData, QueueData, TopicRouteData};

/// One broker address and what the sidecar knows of it.
#[derive(Debug)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub cluster: String,
    pub metadata: EndpointMetadata,
    /// The cluster's connection settings, copied here so a request needs only its endpoint.
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub pool_size: usize,
    pub max_in_flight: usize,
    pub broker_max_in_flight_per_connection: usize,
    pub max_parked: usize,
}

#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub pool_size: usize,
    pub max_in_flight_per_endpoint: usize,
    pub balancer: BalancerSettings,
    pub endpoints: Vec<Arc<Endpoint>>,
    /// The config it was built from: a rebuild reuses it while that is unchanged.
    source: Arc<ClusterConfig>,
}

impl Cluster {
    fn new(source: Arc<ClusterConfig>) -> Self {
        let config = &*source;
        let endpoints = config
            .endpoints
            .iter()
            .map(|endpoint| {
                Arc::new(Endpoint {
                    address: endpoint.address,
                    cluster: config.name.clone(),
                    metadata: endpoint.metadata.clone(),
                    connect_timeout: Duration::from_millis(config.connect_timeout_ms),
                    request_timeout: Duration::from_millis(config.request_timeout_ms),
                    pool_size: config.pool_size,
                    max_in_flight: config.max_in_flight_per_endpoint,
                    broker_max_in_flight_per_connection: config.broker_max_in_flight_per_connection,
                    max_parked: config.max_parked_per_endpoint,
                })
            })
            .collect();
        Self {
            name: config.name.clone(),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            pool_size: config.pool_size,
            max_in_flight_per_endpoint: config.max_in_flight_per_endpoint,
            balancer: config.balancer.clone(),
            endpoints,
            source: source.clone(),
        }
    }
}

/// A compiled topic matcher (`exact`, `prefix` or a whole-name `regex`).
#[derive(Debug)]
pub enum Matcher {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
}

impl Matcher {
    pub fn new(matcher: &TopicMatcher) -> Result<Self, regex::Error> {
        Ok(match matcher {
            TopicMatcher {
                regex: Some(pattern),
                ..
            } => Self::Regex(regex::Regex::new(pattern)?),
            TopicMatcher {
                prefix: Some(prefix),
                ..
            } => Self::Prefix(prefix.clone()),
            TopicMatcher { exact, .. } => Self::Exact(exact.clone().unwrap_or_default()),
        })
    }

    pub fn matches(&self, topic: &str) -> bool {
        match self {
            Self::Exact(name) => topic == name,
            Self::Prefix(prefix) => topic.starts_with(prefix.as_str()),
            Self::Regex(regex) => regex
                .find(topic)
                .is_some_and(|found| found.start() == 0 && found.end() == topic.len()),
        }
    }
}

/// A topic's queue counts and permission on one broker, as the topic's route data gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicQueues {
    pub perm: i32,
    pub read_queue_num: i32,
    pub write_queue_num: i32,
}

/// Whether an xDS topic was used since the idle sweeper last looked: one relaxed load per request,
/// a store only on the first use in a sweep period.
#[derive(Debug, Default)]
pub struct TopicUsage(AtomicBool);

impl TopicUsage {
    pub fn touch(&self) {
        if !self.0.load(Ordering::Relaxed) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    /// Whether the topic was used since the last call.
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::Relaxed)
    }
}

/// What a matched route says.
#[derive(Debug)]
pub struct RouteAction {
    pub cluster: Arc<Cluster>,
    /// (key, value) pairs every serving endpoint's metadata must have.
    pub metadata_match: Vec<(String, String)>,
    pub ordered: bool,
    pub consume_mode: Option<super::pullpop::ConsumeMode>,
    /// Broker name → the topic's queues there (an xDS route's queue data). When present, only
    /// these brokers serve the topic; when empty, every endpoint does, with its own metadata.
    pub queues: HashMap<String, TopicQueues>,
}

impl RouteAction {
    /// The cluster's endpoints that serve the topic and pass the route's metadata match.
    pub fn endpoints(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.cluster.endpoints.iter().filter(|endpoint| {
            (self.queues.is_empty() || self.queues.contains_key(&endpoint.metadata.broker_name))
                && self.metadata_match.iter().all(|(key, value)| {
                    endpoint.metadata.get(key).as_deref() == Some(value.as_str())
                })
        })
    }

    /// The topic's queues on `endpoint`'s broker: the route's queue data, else the endpoint's own.
    pub fn queues_on(&self, endpoint: &Endpoint) -> TopicQueues {
        let metadata = &endpoint.metadata;
        self.queues
            .get(&metadata.broker_name)
            .copied()
            .unwrap_or(TopicQueues {
                perm: metadata.perm,
                read_queue_num: metadata.read_queue_num,
                write_queue_num: metadata.write_queue_num,
            })
    }

    /// Whether `endpoint` takes writes of the topic: the endpoint (a master) and the topic's
    /// queues there both allow it.
    pub fn writable(&self, endpoint: &Endpoint) -> bool {
        endpoint.metadata.writable() && self.queues_on(endpoint).perm & PERM_WRITE != 0
    }

    pub fn readable(&self, endpoint: &Endpoint) -> bool {
        endpoint.metadata.readable() && self.queues_on(endpoint).perm & PERM_READ != 0
    }

    pub fn write_queues(&self, endpoint: &Endpoint) -> i32 {
        self.queues_on(endpoint).write_queue_num
    }
}

/// One route of an xDS topic: for some request codes, or (`codes: None`) for every code.
#[derive(Debug, Clone)]
pub struct XdsTopicRoute {
    pub codes: Option<Vec<i32>>,
    pub action: RouteActionConfig,
    pub queues: HashMap<String, TopicQueues>,
}

/// A topic received over xDS: its routes, code-specific ones first.
#[derive(Debug, Clone)]
pub struct XdsTopic {
    pub routes: Vec<XdsTopicRoute>,
    pub usage: Arc<TopicUsage>,
}

/// What xDS holds now, in the sidecar's vocabulary: the input of a table rebuild. Entries are
/// shared, so a rebuild can tell by pointer which ones changed and reuse the rest.
#[derive(Debug, Clone, Default)]
pub struct XdsRoutes {
    /// Complete clusters (a Cluster and its endpoints both received). One named like a static
    /// cluster replaces it.
    pub clusters: BTreeMap<String, Arc<ClusterConfig>>,
    pub topics: HashMap<Arc<str>, Arc<XdsTopic>>,
}

/// An xDS topic's compiled routes.
#[derive(Debug)]
struct TopicRoutes {
    by_code: Vec<(Vec<i32>, Arc<RouteAction>)>,
    default: Option<Arc<RouteAction>>,
    usage: Arc<TopicUsage>,
    source: Arc<XdsTopic>,
}

impl TopicRoutes {
    fn compile(source: &Arc<XdsTopic>, clusters: &BTreeMap<String, Arc<Cluster>>) -> Self {
        let mut compiled = Self {
            by_code: Vec::new(),
            default: None,
            usage: source.usage.clone(),
            source: source.clone(),
        };
        for route in &source.routes {
            let Some(cluster) = clusters.get(&route.action.cluster).cloned() else {
                continue;
            };
            let action = Arc::new(RouteAction {
                cluster,
                metadata_match: route
                    .action
                    .metadata_match
                    .iter()
                    .map(|(key, value)| (key.clone(), value.as_text()))
                    .collect(),
                ordered: route.action.ordered,
                consume_mode: route.action.consume_mode,
                queues: route.queues.clone(),
            });
            match &route.codes {
                Some(codes) => compiled.by_code.push((codes.clone(), action)),
                None => compiled.default = Some(action),
            }
        }
        compiled
    }

    fn actions(&self) -> impl Iterator<Item = &Arc<RouteAction>> {
        self.by_code
            .iter()
            .map(|(_, action)| action)
            .chain(self.default.as_ref())
    }

    /// Still valid in a table with `clusters`: same source, and each action's cluster is the
    /// one the table has (a missing cluster that arrived since needs a compile too).
    fn reusable(&self, source: &Arc<XdsTopic>, clusters: &BTreeMap<String, Arc<Cluster>>) -> bool {
        Arc::ptr_eq(&self.source, source)
            && self.actions().count() == source.routes.len()
            && self.actions().all(|action| {
                clusters
                    .get(&action.cluster.name)
                    .is_some_and(|cluster| Arc::ptr_eq(cluster, &action.cluster))
            })
    }
}

impl TopicRoutes {
    fn for_code(&self, code: i32) -> Option<&Arc<RouteAction>> {
        self.by_code
            .iter()
            .find(|(codes, _)| codes.contains(&code))
            .map(|(_, action)| action)
            .or(self.default.as_ref())
    }
}

#[derive(Debug)]
struct Route {
    topic: Matcher,
    codes: Option<Vec<i32>>,
    action: Arc<RouteAction>,
}

/// One immutable version of the routing state.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// Topic → its xDS routes.
    topics: HashMap<Arc<str>, Arc<TopicRoutes>>,
    clusters: BTreeMap<String, Arc<Cluster>>,
    /// broker name → its endpoints, lowest broker id (the master) first.
    brokers: HashMap<String, Vec<Arc<Endpoint>>>,
    by_address: HashMap<SocketAddr, Arc<Endpoint>>,
}

impl RouteTable {
    pub fn from_config(config: &SidecarConfig) -> Result<Self, ConfigError> {
        Self::build(config, &XdsRoutes::default())
    }

    /// The table of a configuration's static routes plus what xDS holds. xDS topics whose cluster
    /// has not arrived yet are left out (not routable yet).
    pub fn build(config: &SidecarConfig, xds: &XdsRoutes) -> Result<Self, ConfigError> {
        Self::rebuild(config, xds, None)
    }

    /// [`Self::build`], reusing what `previous` compiled from xDS entries that did not change,
    /// so adding one topic to thousands costs little more than that topic.
    pub fn rebuild(
        config: &SidecarConfig,
        xds: &XdsRoutes,
        previous: Option<&RouteTable>,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut table = Self {
            // Sized once: a rebuild per new topic must not regrow a table of thousands.
            topics: HashMap::with_capacity(xds.topics.len()),
            ..Self::default()
        };
        let static_clusters = config
            .clusters
            .iter()
            .filter(|cluster| !xds.clusters.contains_key(&cluster.name))
            .map(|cluster| Arc::new(cluster.clone()));
        for source in static_clusters.chain(xds.clusters.values().cloned()) {
            let kept = previous
                .and_then(|previous| previous.clusters.get(&source.name))
                .filter(|kept| Arc::ptr_eq(&kept.source, &source) || kept.source == source)
                .cloned();
            table.add_cluster(kept.unwrap_or_else(|| Arc::new(Cluster::new(source))));
        }
        for endpoints in table.brokers.values_mut() {
            endpoints.sort_by_key(|endpoint| endpoint.metadata.broker_id);
        }
        for (index, route) in config.routes.iter().enumerate() {
            let topic =
                Matcher::new(&route.matcher.topic).map_err(|error| ConfigError::Invalid {
                    field: format!("routes[{index}].match.topic.regex"),
                    reason: error.to_string(),
                })?;
            let cluster = table
                .clusters
                .get(&route.route.cluster)
                .cloned()
                .ok_or_else(|| ConfigError::Invalid {
                    field: format!("routes[{index}].route.cluster"),
                    reason: format!("unknown cluster {:?}", route.route.cluster),
                })?;
            table.routes.push(Route {
                topic,
                codes: route.matcher.codes.clone(),
                action: Arc::new(RouteAction {
                    cluster,
                    metadata_match: route
                        .route
                        .metadata_match
                        .iter()
                        .map(|(key, value)| (key.clone(), value.as_text()))
                        .collect(),
                    ordered: route.route.ordered,
                    consume_mode: route.route.consume_mode,
                    queues: HashMap::new(),
                }),
            });
        }
        for (topic, source) in &xds.topics {
            let kept = previous
                .and_then(|previous| previous.topics.get(topic))
                .filter(|kept| kept.reusable(source, &table.clusters))
                .cloned();
            let routes = match kept {
                Some(kept) => kept,
                None => Arc::new(TopicRoutes::compile(source, &table.clusters)),
            };
            if routes.default.is_some() || !routes.by_code.is_empty() {
                table.topics.insert(topic.clone(), routes);
            }
        }
        Ok(table)
    }

    /// The route for `topic` and request `code`: the topic's xDS route, else the first static
    /// route that matches. Marks an xDS topic used.
    pub fn lookup(&self, topic: &str, code: i32) -> Option<Arc<RouteAction>> {
        self.lookup_with_usage(topic, code)
            .map(|(action, _)| action)
    }

    /// As [`RouteTable::lookup`], with the xDS topic's usage mark when xDS gave the route: one
    /// that keeps the route marks it used on each request.
    pub fn lookup_with_usage(
        &self,
        topic: &str,
        code: i32,
    ) -> Option<(Arc<RouteAction>, Option<Arc<TopicUsage>>)> {
        if let Some(routes) = self.topics.get(topic) {
            routes.usage.touch();
            if let Some(action) = routes.for_code(code) {
                return Some((action.clone(), Some(routes.usage.clone())));
            }
        }
        self.routes
            .iter()
            .find(|route| {
                route
                    .codes
                    .as_ref()
                    .is_none_or(|codes| codes.contains(&code))
                    && route.topic.matches(topic)
            })
            .map(|route| (route.action.clone(), None))
    }

    /// Marks an xDS topic used (requests that reach a broker by name, such as pulls, keep their
    /// topic subscribed too).
    pub fn touch(&self, topic: &str) {
        if let Some(routes) = self.topics.get(topic) {
            routes.usage.touch();
        }
    }

    /// Whether xDS gave a route for `topic` that this table holds.
    pub fn has_xds_topic(&self, topic: &str) -> bool {
        self.topics.contains_key(topic)
    }

    /// The endpoint that takes writes and offset updates for a broker name: its lowest id.
    pub fn broker(&self, broker_name: &str) -> Option<Arc<Endpoint>> {
        self.brokers.get(broker_name)?.first().cloned()
    }

    pub fn endpoint_at(&self, address: SocketAddr) -> Option<Arc<Endpoint>> {
        self.by_address.get(&address).cloned()
    }

    fn add_cluster(&mut self, cluster: Arc<Cluster>) {
        for endpoint in &cluster.endpoints {
            self.brokers
                .entry(endpoint.metadata.broker_name.clone())
                .or_default()
                .push(endpoint.clone());
            self.by_address.insert(endpoint.address, endpoint.clone());
        }
        self.clusters.insert(cluster.name.clone(), cluster);
    }

    pub fn clusters(&self) -> impl Iterator<Item = &Arc<Cluster>> {
        self.clusters.values()
    }

    /// Every endpoint of every cluster, once per address.
    pub fn all_endpoints(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.by_address.values()
    }

    /// Every broker name of every cluster.
    pub fn broker_names(&self) -> impl Iterator<Item = &str> {
        self.brokers.keys().map(String::as_str)
    }

    /// The route data a client gets for a topic served by `action`: the real broker names, each
    /// broker's addresses replaced by the sidecar address `advertised` gives for its name.
    pub fn topic_route<'a>(
        &self,
        action: &RouteAction,
        advertised: impl Fn(&str) -> &'a str,
    ) -> TopicRouteData {
        let mut brokers: BTreeMap<&str, BrokerData> = BTreeMap::new();
        let mut queues: BTreeMap<&str, QueueData> = BTreeMap::new();
        for endpoint in action.endpoints() {
            let metadata = &endpoint.metadata;
            let broker = brokers
                .entry(metadata.broker_name.as_str())
                .or_insert_with(|| BrokerData {
                    broker_name: metadata.broker_name.clone(),
                    cluster: metadata.cluster_name.clone(),
                    zone_name: metadata.zone.clone(),
                    ..BrokerData::default()
                });
            broker
                .broker_addrs
                .entry(metadata.broker_id)
                .or_insert_with(|| advertised(&metadata.broker_name).to_owned());
            // The master's queue counts and permission describe the broker.
            let is_master = self
                .broker(&metadata.broker_name)
                .is_some_and(|master| Arc::ptr_eq(&master, endpoint));
            if is_master || !queues.contains_key(metadata.broker_name.as_str()) {
                let topic_queues = action.queues_on(endpoint);
                queues.insert(
                    metadata.broker_name.as_str(),
                    QueueData {
                        broker_name: metadata.broker_name.clone(),
                        perm: topic_queues.perm,
                        read_queue_nums: topic_queues.read_queue_num,
                        write_queue_nums: topic_queues.write_queue_num,
                        ..QueueData::default()
                    },
                );
            }
        }
        TopicRouteData {
            broker_datas: brokers.into_values().collect(),
            queue_datas: queues.into_values().collect(),
            ..TopicRouteData::default()
        }
    }
}

/// The live table plus a version counter that wakes requests waiting for a route.
pub struct Routes {
    current: ArcSwap<RouteTable>,
    version: watch::Sender<u64>,
    /// Moves after each new table: what was looked up in an older one may be stale. A plain
    /// counter, so that checking it is one load of a line nobody writes between tables.
    generation: AtomicU64,
}

impl Routes {
    pub fn new(table: RouteTable) -> Self {
        Self {
            current: ArcSwap::from_pointee(table),
            version: watch::Sender::new(0),
            generation: AtomicU64::new(0),
        }
    }

    /// Which table is live: read it before a lookup whose result is kept, and the result is
    /// current while this still reads the same.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> Arc<RouteTable> {
        self.current.load_full()
    }

    /// Installs a new table; requests waiting for a route look again.
    pub fn replace(&self, table: RouteTable) {
        self.current.store(Arc::new(table));
        self.generation.fetch_add(1, Ordering::Release);
        self.version.send_modify(|version| *version += 1);
    }

    /// The route for (`topic`, `code`), waiting up to `wait` for one to be installed.
    pub async fn route_for(
        &self,
        topic: &str,
        code: i32,
        wait: Duration,
    ) -> Option<(Arc<RouteTable>, Arc<RouteAction>)> {
        let mut changes = self.version.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let table = self.snapshot();
            if let Some(action) = table.lookup(topic, code) {
                return Some((table, action));
            }
            if wait.is_zero()
                || tokio::time::timeout_at(deadline, changes.changed())
                    .await
                    .is_err()
            {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(yaml: &str) -> RouteTable {
        RouteTable::from_config(&SidecarConfig::parse(yaml).expect("config")).expect("table")
    }

    const CONFIG: &str = r#"
listeners: [{ address: "127.0.0.1:0" }]
routes:
  - match: { topic: { regex: "Order[0-9]+" } }
    route: { cluster: c, ordered: true }
  - match: { topic: { prefix: "" }, codes: [310] }
    route: { cluster: c, metadata_match: { zone: z2 } }
  - match: { topic: { exact: "T" } }
    route: { cluster: c }
clusters:
  - name: c
    endpoints:
      - { address: "127.0.0.1:1", metadata: { broker_name: a, broker_id: 0, cluster_name: C, zone: z1, write_queue_num: 8 } }
      - { address: "127.0.0.1:2", metadata: { broker_name: a, broker_id: 1, cluster_name: C, zone: z2, perm: 4 } }
      - { address: "127.0.0.1:3", metadata: { broker_name: b, broker_id: 0, cluster_name: C, zone: z2 } }
"#;

    #[test]
    fn first_matching_route_wins_and_codes_narrow_routes() {
        let table = table(CONFIG);
        let ordered = table.lookup("Order12", 310).expect("route");
        assert!(ordered.ordered);
        assert!(
            table.lookup("Order12x", 10).is_none(),
            "a regex matches whole names"
        );
        let send = table.lookup("T", 310).expect("route");
        let names: Vec<_> = send.endpoints().map(|e| e.address.port()).collect();
        assert_eq!(names, vec![2, 3], "metadata_match keeps zone z2 only");
        let other = table.lookup("T", 10).expect("route");
        assert_eq!(other.endpoints().count(), 3);
        assert!(table.lookup("U", 10).is_none());
        assert_eq!(table.broker("a").map(|e| e.address.port()), Some(1));
    }

    #[test]
    fn route_data_names_real_brokers_at_the_sidecar_address() {
        let table = table(CONFIG);
        let action = table.lookup("T", 10).expect("route");
        let route = table.topic_route(&action, |name| match name {
            "a" => "10.0.0.1:30001",
            _ => "10.0.0.1:9876",
        });
        assert_eq!(route.broker_datas.len(), 2);
        let a = &route.broker_datas[0];
        assert_eq!(a.broker_name, "a");
        assert_eq!(
            a.broker_addrs.values().collect::<Vec<_>>(),
            vec!["10.0.0.1:30001", "10.0.0.1:30001"],
            "every id of a broker name shares that name's address"
        );
        assert_eq!(
            route.broker_datas[1]
                .broker_addrs
                .values()
                .collect::<Vec<_>>(),
            vec!["10.0.0.1:9876"]
        );
        assert_eq!(
            a.broker_addrs.keys().copied().collect::<Vec<_>>(),
            vec![0, 1]
        );
        let queues: Vec<_> = route
            .queue_datas
            .iter()
            .map(|q| (q.broker_name.as_str(), q.perm, q.write_queue_nums))
            .collect();
        assert_eq!(
            queues,
            vec![("a", 6, 8), ("b", 6, 4)],
            "the master describes broker a"
        );
    }

    fn xds_topic(cluster: &str) -> Arc<XdsTopic> {
        Arc::new(XdsTopic {
            routes: vec![XdsTopicRoute {
                codes: None,
                action: RouteActionConfig {
                    cluster: cluster.into(),
                    metadata_match: BTreeMap::new(),
                    ordered: false,
                    consume_mode: None,
                },
                queues: HashMap::from([(
                    "b".to_owned(),
                    TopicQueues {
                        perm: 6,
                        read_queue_num: 2,
                        write_queue_num: 2,
                    },
                )]),
            }],
            usage: Arc::default(),
        })
    }

    #[test]
    fn xds_topics_win_over_static_routes_and_unchanged_entries_are_reused() {
        let config = SidecarConfig::parse(CONFIG).expect("config");
        let mut xds = XdsRoutes::default();
        xds.topics.insert(Arc::from("T"), xds_topic("c"));
        xds.topics.insert(Arc::from("U"), xds_topic("missing"));
        let first = RouteTable::build(&config, &xds).expect("table");
        let action = first.lookup("T", 10).expect("the xDS route");
        let ports: Vec<_> = action.endpoints().map(|e| e.address.port()).collect();
        assert_eq!(ports, vec![3], "the topic's queues name broker b only");
        assert_eq!(
            action.write_queues(&action.endpoints().next().cloned().expect("b")),
            2
        );
        assert!(first.has_xds_topic("T"));
        assert!(
            !first.has_xds_topic("U"),
            "a topic whose cluster has not arrived is not routable yet"
        );

        xds.topics.insert(Arc::from("V"), xds_topic("c"));
        let second = RouteTable::rebuild(&config, &xds, Some(&first)).expect("table");
        assert!(Arc::ptr_eq(&first.topics["T"], &second.topics["T"]));
        assert!(second.has_xds_topic("V"));

        // A cluster from xDS replaces the static one of that name: topics naming it recompile.
        let mut cluster: ClusterConfig = config.clusters[0].clone();
        cluster.endpoints.truncate(1);
        xds.clusters.insert("c".into(), Arc::new(cluster));
        let third = RouteTable::rebuild(&config, &xds, Some(&second)).expect("table");
        assert!(!Arc::ptr_eq(&second.topics["T"], &third.topics["T"]));
        assert_eq!(third.all_endpoints().count(), 1);
        let fourth = RouteTable::rebuild(&config, &xds, Some(&third)).expect("table");
        assert!(Arc::ptr_eq(&third.clusters["c"], &fourth.clusters["c"]));
        assert!(Arc::ptr_eq(&third.topics["T"], &fourth.topics["T"]));
    }

    #[tokio::test]
    async fn a_waiting_request_sees_a_route_installed_later() {
        let routes = Arc::new(Routes::new(RouteTable::default()));
        assert!(routes.route_for("T", 10, Duration::ZERO).await.is_none());
        let waiter = {
            let routes = routes.clone();
            tokio::spawn(async move { routes.route_for("T", 10, Duration::from_secs(10)).await })
        };
        routes.replace(table(CONFIG));
        let found = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("in time")
            .expect("join");
        assert!(found.is_some());
    }
}
