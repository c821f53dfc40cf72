//! Where topic routes and clusters come from: the config file's routes and clusters (the
//! sidecar's vocabulary) and, for topics no route names, the nameservers' route data.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use rocketmesh_xds::spec::{
    ClusterSpec, CodeRouteSpec, ConsumeMode as XdsConsumeMode, EndpointSpec, LbPolicy,
    QueueDataSpec, TopicRouteSpec,
};

use super::config::ControlPlaneConfig;
use crate::proxy::config::{BalancePolicy, ClusterConfig, RouteActionConfig};
use crate::proxy::pullpop::ConsumeMode;
use crate::proxy::routes::Matcher;
use crate::remoting::body::{BrokerData, ClusterInfo, TopicRouteData};

struct StaticRoute {
    topic: Matcher,
    codes: Option<Vec<i32>>,
    action: RouteActionConfig,
}

/// The file's routes (compiled) and clusters, swapped whole on reload.
pub struct StaticSources {
    routes: Vec<StaticRoute>,
    clusters: BTreeMap<String, ClusterConfig>,
    /// Settings for clusters made of discovered brokers.
    discovered_defaults: Option<ClusterConfig>,
}

impl StaticSources {
    /// `config` has been validated, so its regexes compile.
    pub fn new(config: &ControlPlaneConfig) -> Result<Self, regex::Error> {
        let routes = config
            .routes
            .iter()
            .map(|route| {
                Ok(StaticRoute {
                    topic: Matcher::new(&route.matcher.topic)?,
                    codes: route.matcher.codes.clone(),
                    action: route.route.clone(),
                })
            })
            .collect::<Result<_, regex::Error>>()?;
        Ok(Self {
            routes,
            clusters: config
                .clusters
                .iter()
                .map(|cluster| (cluster.name.clone(), cluster.clone()))
                .collect(),
            discovered_defaults: config
                .discovery
                .as_ref()
                .and_then(|discovery| discovery.cluster_defaults.clone()),
        })
    }

    pub fn cluster_specs(&self) -> impl Iterator<Item = ClusterSpec> + '_ {
        self.clusters.values().map(cluster_spec)
    }

    /// The file's route for `topic`: the code-specific routes that match it, then the first
    /// route for every code. `None` when no route matches.
    pub fn route_for(&self, topic: &str) -> Option<TopicRouteSpec> {
        let mut code_routes = Vec::new();
        for route in self
            .routes
            .iter()
            .filter(|route| route.topic.matches(topic))
        {
            match &route.codes {
                Some(codes) => code_routes.push(CodeRouteSpec {
                    codes: codes.clone(),
                    cluster: route.action.cluster.clone(),
                    ordered: route.action.ordered,
                    metadata_match: metadata_match(&route.action),
                    consume_mode: route.action.consume_mode.map(consume_mode),
                }),
                None => {
                    return Some(TopicRouteSpec {
                        topic: topic.to_owned(),
                        cluster: route.action.cluster.clone(),
                        ordered: route.action.ordered,
                        metadata_match: metadata_match(&route.action),
                        queues: self.queues_of(&route.action.cluster),
                        consume_mode: route.action.consume_mode.map(consume_mode),
                        code_routes,
                    });
                }
            }
        }
        // Only code-specific routes matched: the first serves as the route of last resort, so
        // the resource still names a cluster; its codes keep their own entries.
        let first = code_routes.first()?.clone();
        Some(TopicRouteSpec {
            topic: topic.to_owned(),
            cluster: first.cluster.clone(),
            ordered: first.ordered,
            metadata_match: first.metadata_match.clone(),
            queues: self.queues_of(&first.cluster),
            consume_mode: first.consume_mode,
            code_routes,
        })
    }

    /// Queue data as the sidecar synthesizes it from a static cluster: each broker's master
    /// (lowest id) endpoint gives its queue counts and permissions.
    fn queues_of(&self, cluster: &str) -> Vec<QueueDataSpec> {
        let Some(cluster) = self.clusters.get(cluster) else {
            return Vec::new();
        };
        let mut masters: BTreeMap<&str, &crate::proxy::config::EndpointMetadata> = BTreeMap::new();
        for endpoint in &cluster.endpoints {
            let metadata = &endpoint.metadata;
            masters
                .entry(metadata.broker_name.as_str())
                .and_modify(|kept| {
                    if metadata.broker_id < kept.broker_id {
                        *kept = metadata;
                    }
                })
                .or_insert(metadata);
        }
        masters
            .into_values()
            .map(|metadata| QueueDataSpec {
                broker_name: metadata.broker_name.clone(),
                read_queue_nums: metadata.read_queue_num,
                write_queue_nums: metadata.write_queue_num,
                perm: metadata.perm,
                topic_sys_flag: 0,
            })
            .collect()
    }

    /// A cluster of discovered brokers, with the configured defaults.
    pub fn discovered_cluster(&self, name: &str, endpoints: Vec<EndpointSpec>) -> ClusterSpec {
        let mut spec = match &self.discovered_defaults {
            Some(defaults) => cluster_spec(defaults),
            None => cluster_spec(&ClusterConfig::default()),
        };
        spec.name = name.to_owned();
        spec.endpoints = endpoints;
        spec
    }
}

/// The queues a nameserver reported for a topic.
pub fn discovered_queues(data: &TopicRouteData) -> Vec<QueueDataSpec> {
    data.queue_datas
        .iter()
        .map(|queue| QueueDataSpec {
            broker_name: queue.broker_name.clone(),
            read_queue_nums: queue.read_queue_nums,
            write_queue_nums: queue.write_queue_nums,
            perm: queue.perm,
            topic_sys_flag: queue.topic_sys_flag,
        })
        .collect()
}

/// The cluster a discovered topic routes to, named after its RocketMQ cluster (several joined by
/// `+`), and the brokers its route names.
pub fn discovered_brokers(data: &TopicRouteData) -> (String, Vec<EndpointSpec>) {
    let clusters: BTreeSet<&str> = data
        .broker_datas
        .iter()
        .map(|broker| broker.cluster.as_str())
        .filter(|cluster| !cluster.is_empty())
        .collect();
    let name = if clusters.is_empty() {
        "DefaultCluster".to_owned()
    } else {
        clusters.into_iter().collect::<Vec<_>>().join("+")
    };
    (
        name,
        data.broker_datas
            .iter()
            .flat_map(broker_endpoints)
            .collect(),
    )
}

/// Every broker of the RocketMQ cluster(s) `name` names (`a+b` for several), from cluster info;
/// `None` when the info lacks one of them.
pub fn cluster_brokers(info: &ClusterInfo, name: &str) -> Option<Vec<EndpointSpec>> {
    let mut endpoints = Vec::new();
    for cluster in name.split('+') {
        for broker in info.cluster_addr_table.get(cluster)? {
            if let Some(data) = info.broker_addr_table.get(broker) {
                let data = BrokerData {
                    cluster: cluster.to_owned(),
                    ..data.clone()
                };
                endpoints.extend(broker_endpoints(&data));
            }
        }
    }
    Some(endpoints)
}

/// One endpoint per address of a broker. Addresses that are not `ip:port` are skipped: EDS
/// endpoints must be IP addresses.
fn broker_endpoints(broker: &BrokerData) -> Vec<EndpointSpec> {
    let mut endpoints = Vec::new();
    for (id, address) in &broker.broker_addrs {
        if address.parse::<SocketAddr>().is_err() {
            tracing::warn!(broker = %broker.broker_name, %address, "discovered broker address is not ip:port; skipped");
            continue;
        }
        endpoints.push(EndpointSpec {
            address: address.clone(),
            broker_name: Some(broker.broker_name.clone()),
            broker_id: Some(*id),
            cluster_name: (!broker.cluster.is_empty()).then(|| broker.cluster.clone()),
            zone: broker.zone_name.clone().unwrap_or_default(),
            ..EndpointSpec::default()
        });
    }
    endpoints
}

/// The sidecar's cluster config as an xDS cluster: endpoint metadata in Envoy's rocketmq_proxy
/// keys, zone and priority as the locality, and the balancer settings Envoy has no field for.
pub fn cluster_spec(cluster: &ClusterConfig) -> ClusterSpec {
    // Envoy's locality priorities run 0..=N without gaps; the sidecar's only order endpoints
    // (lower is preferred), so they are ranked.
    let priorities: BTreeSet<u32> = cluster
        .endpoints
        .iter()
        .map(|endpoint| endpoint.metadata.priority)
        .collect();
    let rank = |priority: u32| priorities.range(..priority).count() as u32;
    let endpoints = cluster
        .endpoints
        .iter()
        .map(|endpoint| {
            let metadata = &endpoint.metadata;
            EndpointSpec {
                address: endpoint.address.to_string(),
                broker_name: Some(metadata.broker_name.clone()),
                broker_id: Some(metadata.broker_id),
                perm: Some(metadata.perm),
                read_queue_num: Some(metadata.read_queue_num),
                write_queue_num: Some(metadata.write_queue_num),
                cluster_name: Some(metadata.cluster_name.clone()),
                metadata: BTreeMap::new(),
                zone: metadata.zone.clone().unwrap_or_default(),
                priority: rank(metadata.priority),
                weight: Some(metadata.weight),
            }
        })
        .collect();
    let mut balancer = BTreeMap::new();
    let settings = ClusterConfig {
        endpoints: Vec::new(),
        ..cluster.clone()
    };
    if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(&settings) {
        for (key, value) in fields {
            if key != "name" && key != "endpoints" && key != "connect_timeout_ms" {
                balancer.insert(key, value);
            }
        }
    }
    ClusterSpec {
        name: cluster.name.clone(),
        endpoints,
        connect_timeout_ms: cluster.connect_timeout_ms,
        lb_policy: match cluster.balancer.policy {
            BalancePolicy::Weighted => LbPolicy::RoundRobin,
            BalancePolicy::LeastRequest => LbPolicy::LeastRequest,
        },
        balancer,
    }
}

fn metadata_match(action: &RouteActionConfig) -> BTreeMap<String, String> {
    action
        .metadata_match
        .iter()
        .map(|(key, value)| (key.clone(), value.as_text()))
        .collect()
}

fn consume_mode(mode: ConsumeMode) -> XdsConsumeMode {
    match mode {
        ConsumeMode::Auto => XdsConsumeMode::Auto,
        ConsumeMode::Pop => XdsConsumeMode::Pop,
        ConsumeMode::Pull => XdsConsumeMode::Pull,
    }
}
