//! Type URLs of the resources rocketmesh serves, and the short aliases the harness API uses.

/// `envoy.config.cluster.v3.Cluster`.
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// `envoy.config.endpoint.v3.ClusterLoadAssignment`.
pub const CLUSTER_LOAD_ASSIGNMENT: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// rocketmesh's own `rocketmesh.v1.TopicRoute`, one resource per topic.
pub const TOPIC_ROUTE: &str = "type.googleapis.com/rocketmesh.v1.TopicRoute";

/// Resolves a harness alias (`clusters`, `endpoints`, `topics`) or a full type URL.
/// Unknown aliases are returned as given: the transport does not care about types.
pub fn type_url_from_alias(alias: &str) -> &str {
    match alias {
        "clusters" | "cluster" | "cds" => CLUSTER,
        "endpoints" | "endpoint" | "eds" => CLUSTER_LOAD_ASSIGNMENT,
        "topics" | "topic" | "topic_routes" => TOPIC_ROUTE,
        other => other,
    }
}

/// The message name at the end of a type URL, for logs (`Cluster`, `TopicRoute`).
pub fn short_name(type_url: &str) -> &str {
    type_url.rsplit('.').next().unwrap_or(type_url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Name;

    #[test]
    fn constants_match_the_generated_names() {
        use envoy_types::pb::envoy::config::{
            cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment,
        };
        assert_eq!(CLUSTER, Cluster::type_url());
        assert_eq!(CLUSTER_LOAD_ASSIGNMENT, ClusterLoadAssignment::type_url());
        assert_eq!(TOPIC_ROUTE, crate::pb::TopicRoute::type_url());
        assert_eq!(type_url_from_alias("topics"), TOPIC_ROUTE);
        assert_eq!(short_name(CLUSTER), "Cluster");
    }
}
