//! xDS resources in the sidecar's vocabulary: a `TopicRoute` becomes the topic's routes, a
//! `Cluster` plus its `ClusterLoadAssignment` becomes a [`ClusterConfig`], checked exactly as a
//! static cluster is. What is refused here is NACKed with the message.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;

use rocketmesh_xds::envoy_types::pb::envoy::config::cluster::v3::Cluster;
use rocketmesh_xds::envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use rocketmesh_xds::spec::{
    ClusterSpec, ConsumeMode as XdsConsumeMode, EndpointSpec, LbPolicy, TopicRouteSpec,
};

use crate::proxy::config::{
    BalancePolicy, ClusterConfig, EndpointConfig, EndpointMetadata, MetadataValue,
    RouteActionConfig, validate_clusters,
};
use crate::proxy::pullpop::ConsumeMode;
use crate::proxy::routes::{TopicQueues, XdsTopicRoute};

/// Permission of a broker master (read and write) and of a slave (read only) when the endpoint
/// does not say.
const MASTER_PERM: i32 = 6;
const SLAVE_PERM: i32 = 4;
const DEFAULT_QUEUES: i32 = 4;

/// A topic's routes (code routes first, then the one for every code) and the clusters they name.
pub fn topic_routes(spec: &TopicRouteSpec) -> (Vec<XdsTopicRoute>, BTreeSet<String>) {
    let queues: HashMap<String, TopicQueues> = spec
        .queues
        .iter()
        .map(|queue| {
            (
                queue.broker_name.clone(),
                TopicQueues {
                    perm: queue.perm,
                    read_queue_num: queue.read_queue_nums,
                    write_queue_num: queue.write_queue_nums,
                },
            )
        })
        .collect();
    let action = |cluster: &str,
                  ordered: bool,
                  metadata_match: &BTreeMap<String, String>,
                  consume_mode: Option<XdsConsumeMode>| RouteActionConfig {
        cluster: cluster.to_owned(),
        metadata_match: metadata_match
            .iter()
            .map(|(key, value)| (key.clone(), MetadataValue::Text(value.clone())))
            .collect(),
        ordered,
        consume_mode: consume_mode.map(|mode| match mode {
            XdsConsumeMode::Auto => ConsumeMode::Auto,
            XdsConsumeMode::Pop => ConsumeMode::Pop,
            XdsConsumeMode::Pull => ConsumeMode::Pull,
        }),
    };
    let mut clusters = BTreeSet::new();
    let mut routes = Vec::with_capacity(spec.code_routes.len() + 1);
    for code_route in &spec.code_routes {
        clusters.insert(code_route.cluster.clone());
        routes.push(XdsTopicRoute {
            codes: Some(code_route.codes.clone()),
            action: action(
                &code_route.cluster,
                code_route.ordered,
                &code_route.metadata_match,
                code_route.consume_mode,
            ),
            queues: queues.clone(),
        });
    }
    clusters.insert(spec.cluster.clone());
    routes.push(XdsTopicRoute {
        codes: None,
        action: action(
            &spec.cluster,
            spec.ordered,
            &spec.metadata_match,
            spec.consume_mode,
        ),
        queues,
    });
    (routes, clusters)
}

/// A cluster from its two resources, validated as the sidecar validates its config file.
pub fn cluster_config(
    cluster: &Cluster,
    assignment: &ClusterLoadAssignment,
) -> Result<ClusterConfig, String> {
    let spec = ClusterSpec::from_resources(cluster, Some(assignment)).map_err(|e| e.to_string())?;
    let config = from_spec(&spec)?;
    validate_clusters(std::slice::from_ref(&config)).map_err(|error| {
        // The message names `clusters[0]`; name the cluster instead.
        error
            .to_string()
            .replace("clusters[0]", &format!("cluster {:?}", spec.name))
    })?;
    Ok(config)
}

/// The inverse of the control plane's `cluster_spec`: settings from the cluster's `rocketmesh`
/// metadata (defaults for a cluster from another control plane), endpoints from the assignment.
fn from_spec(spec: &ClusterSpec) -> Result<ClusterConfig, String> {
    let mut fields: serde_json::Map<String, serde_json::Value> = spec
        .balancer
        .iter()
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    fields.insert("name".into(), spec.name.clone().into());
    fields.insert("connect_timeout_ms".into(), spec.connect_timeout_ms.into());
    fields.insert("endpoints".into(), serde_json::Value::Array(Vec::new()));
    let balancer = fields
        .entry("balancer")
        .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
    if let serde_json::Value::Object(balancer) = balancer {
        let policy = match spec.lb_policy {
            LbPolicy::LeastRequest => BalancePolicy::LeastRequest,
            _ => BalancePolicy::Weighted,
        };
        if !balancer.contains_key("policy") {
            let policy = serde_json::to_value(policy).map_err(|e| e.to_string())?;
            balancer.insert("policy".into(), policy);
        }
    }
    let mut config: ClusterConfig = serde_json::from_value(serde_json::Value::Object(fields))
        .map_err(|error| format!("cluster {:?}: rocketmesh metadata: {error}", spec.name))?;
    config.endpoints = spec
        .endpoints
        .iter()
        .map(|endpoint| endpoint_config(&spec.name, endpoint))
        .collect::<Result<_, _>>()?;
    Ok(config)
}

fn endpoint_config(cluster: &str, endpoint: &EndpointSpec) -> Result<EndpointConfig, String> {
    let address: SocketAddr = endpoint.address.parse().map_err(|error| {
        format!(
            "cluster {cluster:?}: endpoint address {:?}: {error}",
            endpoint.address
        )
    })?;
    let broker_id = endpoint.broker_id.unwrap_or(0);
    Ok(EndpointConfig {
        address,
        metadata: EndpointMetadata {
            // An endpoint without a broker name is named by its address, so it is still a
            // distinct broker to clients.
            broker_name: endpoint
                .broker_name
                .clone()
                .unwrap_or_else(|| address.to_string()),
            broker_id,
            perm: endpoint.perm.unwrap_or(if broker_id == 0 {
                MASTER_PERM
            } else {
                SLAVE_PERM
            }),
            read_queue_num: endpoint.read_queue_num.unwrap_or(DEFAULT_QUEUES),
            write_queue_num: endpoint.write_queue_num.unwrap_or(DEFAULT_QUEUES),
            cluster_name: endpoint.cluster_name.clone().unwrap_or_default(),
            zone: (!endpoint.zone.is_empty()).then(|| endpoint.zone.clone()),
            priority: endpoint.priority,
            weight: endpoint.weight.unwrap_or(100),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_plane::sources::cluster_spec;
    use rocketmesh_xds::spec::{CodeRouteSpec, QueueDataSpec, decode_any};

    fn yaml_cluster() -> ClusterConfig {
        serde_yaml_ng::from_str(
            r#"
name: c
request_timeout_ms: 1234
pool_size: 3
balancer: { policy: least_request, max_retries: 1, slow_start_initial_share: 0.5 }
endpoints:
  - { address: "127.0.0.1:10911", metadata: { broker_name: a, broker_id: 0, cluster_name: C, zone: z1, write_queue_num: 8, priority: 0 } }
  - { address: "127.0.0.1:10912", metadata: { broker_name: a, broker_id: 1, cluster_name: C, perm: 4, priority: 5, weight: 30 } }
"#,
        )
        .expect("cluster yaml")
    }

    #[test]
    fn a_cluster_survives_the_round_trip_through_xds() {
        let original = yaml_cluster();
        let resources = cluster_spec(&original).build().expect("build");
        let cluster: Cluster = decode_any(&resources.cluster.any).expect("cluster");
        let assignment: ClusterLoadAssignment =
            decode_any(&resources.load_assignment.any).expect("assignment");
        let back = cluster_config(&cluster, &assignment).expect("converted");
        let mut expected = original.clone();
        // Priorities are ranked on the way out (gapless for Envoy); order is what matters.
        expected.endpoints[1].metadata.priority = 1;
        assert_eq!(back, expected);
    }

    #[test]
    fn a_foreign_cluster_gets_defaults_and_bad_settings_are_refused() {
        let spec = ClusterSpec {
            name: "plain".into(),
            endpoints: vec![
                EndpointSpec {
                    address: "10.0.0.1:10911".into(),
                    ..EndpointSpec::default()
                },
                EndpointSpec {
                    address: "10.0.0.2:10911".into(),
                    broker_name: Some("b".into()),
                    broker_id: Some(1),
                    ..EndpointSpec::default()
                },
            ],
            connect_timeout_ms: 700,
            lb_policy: LbPolicy::default(),
            balancer: BTreeMap::new(),
        };
        let config = from_spec(&spec).expect("defaults");
        assert_eq!(config.connect_timeout_ms, 700);
        assert_eq!(config.endpoints[0].metadata.broker_name, "10.0.0.1:10911");
        assert_eq!(config.endpoints[0].metadata.perm, MASTER_PERM);
        assert_eq!(
            config.endpoints[1].metadata.perm, SLAVE_PERM,
            "a slave reads only"
        );

        let mut bad = spec.clone();
        bad.balancer
            .insert("pool_size".into(), serde_json::Value::from(0));
        let resources = bad.build().expect("build");
        let cluster: Cluster = decode_any(&resources.cluster.any).expect("cluster");
        let assignment: ClusterLoadAssignment =
            decode_any(&resources.load_assignment.any).expect("assignment");
        let refused = cluster_config(&cluster, &assignment).expect_err("pool_size 0");
        assert!(
            refused.contains("cluster \"plain\"") && refused.contains("pool_size"),
            "{refused}"
        );
    }

    #[test]
    fn code_routes_come_first_and_every_cluster_is_named() {
        let spec = TopicRouteSpec {
            topic: "T".into(),
            cluster: "main".into(),
            queues: vec![QueueDataSpec {
                broker_name: "a".into(),
                read_queue_nums: 2,
                write_queue_nums: 3,
                perm: 6,
                topic_sys_flag: 0,
            }],
            code_routes: vec![CodeRouteSpec {
                codes: vec![200],
                cluster: "pop".into(),
                ordered: false,
                metadata_match: BTreeMap::new(),
                consume_mode: Some(XdsConsumeMode::Pop),
            }],
            ..TopicRouteSpec::default()
        };
        let (routes, clusters) = topic_routes(&spec);
        assert_eq!(
            clusters.into_iter().collect::<Vec<_>>(),
            vec!["main".to_owned(), "pop".to_owned()]
        );
        assert_eq!(routes[0].codes, Some(vec![200]));
        assert_eq!(routes[0].action.consume_mode, Some(ConsumeMode::Pop));
        assert_eq!(routes[1].codes, None);
        assert_eq!(routes[1].queues["a"].write_queue_num, 3);
    }
}
