//! `rocketmesh control-plane` configuration: the sidecar's route and cluster vocabulary, where to
//! serve, and where to discover routes the file does not name.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::proxy::config::{ClusterConfig, RouteConfig, validate_clusters, validate_routes};

/// Why a control-plane configuration was refused; the message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneConfigError {
    #[error("cannot read {path}: {reason}")]
    Read {
        path: String,
        reason: std::io::Error,
    },
    #[error("invalid control-plane config: {0}")]
    Syntax(serde_yaml_ng::Error),
    #[error("invalid control-plane config: {field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ControlPlaneConfigError {
    ControlPlaneConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// Delta ADS (and delta CDS) over gRPC.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The harness HTTP API; `null` turns it off. It can change every route: keep it on loopback.
    #[serde(default = "default_admin")]
    pub admin: Option<SocketAddr>,
    /// How often the file is checked for changes (0: never; SIGHUP still reloads).
    #[serde(default = "default_reload_interval_ms")]
    pub reload_interval_ms: u64,
    /// How long a first subscription waits for its topic to be resolved before it is answered.
    #[serde(default = "default_resolve_timeout_ms")]
    pub resolve_timeout_ms: u64,
    /// Responses queued per stream; a client that reads slower than this only waits for itself.
    #[serde(default = "default_stream_queue_depth")]
    pub stream_queue_depth: usize,
    /// Most topics remembered as asked for (each is re-resolved on reload and refresh).
    #[serde(default = "default_max_topics")]
    pub max_topics: usize,
    /// Topic routes, first match wins, as in the sidecar's config.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Clusters and their broker endpoints, as in the sidecar's config.
    #[serde(default)]
    pub clusters: Vec<ClusterConfig>,
    /// Routes of topics that no route above names come from these nameservers (or brokers).
    #[serde(default)]
    pub discovery: Option<DiscoveryConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// RocketMQ nameservers, or brokers that answer GET_ROUTEINFO_BY_TOPIC (as ours do), tried in order.
    pub nameservers: Vec<String>,
    /// How often every known topic's route is fetched again, and changes pushed.
    #[serde(default = "default_refresh_interval_ms")]
    pub refresh_interval_ms: u64,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Route fetches in flight at once during a refresh.
    #[serde(default = "default_max_concurrent_fetches")]
    pub max_concurrent_fetches: usize,
    /// Clusters made from discovered brokers use these settings (the endpoints come from discovery).
    #[serde(default)]
    pub cluster_defaults: Option<ClusterConfig>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 18000))
}
fn default_admin() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 18001)))
}
fn default_reload_interval_ms() -> u64 {
    1_000
}
fn default_resolve_timeout_ms() -> u64 {
    3_000
}
fn default_stream_queue_depth() -> usize {
    64
}
fn default_max_topics() -> usize {
    1_000_000
}
fn default_refresh_interval_ms() -> u64 {
    30_000
}
fn default_request_timeout_ms() -> u64 {
    3_000
}
fn default_max_concurrent_fetches() -> usize {
    16
}

impl ControlPlaneConfig {
    pub fn load(path: &Path) -> Result<Self, ControlPlaneConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|reason| ControlPlaneConfigError::Read {
                path: path.display().to_string(),
                reason,
            })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, ControlPlaneConfigError> {
        let config: Self =
            serde_yaml_ng::from_str(text).map_err(ControlPlaneConfigError::Syntax)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what the types cannot, with the sidecar's own rules for routes and clusters.
    pub fn validate(&self) -> Result<(), ControlPlaneConfigError> {
        let from_sidecar = |error: crate::proxy::config::ConfigError| match error {
            crate::proxy::config::ConfigError::Invalid { field, reason } => invalid(field, reason),
            other => invalid("routes", other.to_string()),
        };
        let names = validate_clusters(&self.clusters).map_err(from_sidecar)?;
        validate_routes(&self.routes, &names).map_err(from_sidecar)?;
        for (field, value) in [
            ("resolve_timeout_ms", self.resolve_timeout_ms),
            ("stream_queue_depth", self.stream_queue_depth as u64),
            ("max_topics", self.max_topics as u64),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be greater than 0"));
            }
        }
        if let Some(discovery) = &self.discovery {
            if discovery.nameservers.is_empty() {
                return Err(invalid(
                    "discovery.nameservers",
                    "at least one address is needed",
                ));
            }
            for (index, address) in discovery.nameservers.iter().enumerate() {
                let port = address.rsplit_once(':').and_then(|(host, port)| {
                    (!host.is_empty())
                        .then(|| port.parse::<u16>().ok())
                        .flatten()
                });
                if port.is_none() {
                    return Err(invalid(
                        format!("discovery.nameservers[{index}]"),
                        format!("{address:?} is not host:port"),
                    ));
                }
            }
            for (field, value) in [
                (
                    "discovery.refresh_interval_ms",
                    discovery.refresh_interval_ms,
                ),
                ("discovery.request_timeout_ms", discovery.request_timeout_ms),
                (
                    "discovery.max_concurrent_fetches",
                    discovery.max_concurrent_fetches as u64,
                ),
            ] {
                if value == 0 {
                    return Err(invalid(field, "must be greater than 0"));
                }
            }
            if let Some(defaults) = &discovery.cluster_defaults
                && !defaults.endpoints.is_empty()
            {
                return Err(invalid(
                    "discovery.cluster_defaults.endpoints",
                    "discovered clusters take their endpoints from discovery; leave this empty",
                ));
            }
        }
        if self.routes.is_empty() && self.discovery.is_none() && self.admin.is_none() {
            return Err(invalid(
                "routes",
                "nothing to serve: give routes, discovery, or an admin address to script resources",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../config/control-plane.yaml");

    #[test]
    fn the_example_config_loads() {
        let config = ControlPlaneConfig::parse(EXAMPLE).expect("example");
        assert!(!config.routes.is_empty());
        assert!(config.discovery.is_some());
    }

    fn error_of(text: &str) -> String {
        ControlPlaneConfig::parse(text)
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn mistakes_name_their_field() {
        assert!(
            error_of("routes: [{match: {topic: {prefix: ''}}, route: {cluster: nope}}]")
                .contains("routes[0].route.cluster: unknown cluster \"nope\"")
        );
        assert!(
            error_of("discovery: {nameservers: []}").contains("discovery.nameservers: at least")
        );
        assert!(error_of("discovery: {nameservers: [nohost]}").contains("nameservers[0]"));
        assert!(error_of("admin: null").contains("nothing to serve"));
        assert!(error_of("listen: 127.0.0.1:1\nbogus: 1").contains("unknown field `bogus`"));
    }

    #[test]
    fn an_empty_file_serves_the_harness_api() {
        let config = ControlPlaneConfig::parse("{}").expect("empty");
        assert_eq!(config.admin, default_admin());
        assert_eq!(config.listen, default_listen());
    }
}
