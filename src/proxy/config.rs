//! The sidecar's YAML configuration: listeners, routes, clusters and limits.
//!
//! Shaped after Envoy's `rocketmq_proxy` filter so configs translate: routes match a topic (exact,
//! prefix or regex) and optionally request codes, first match wins; a route names a cluster and may
//! narrow it with an endpoint `metadata_match`. Endpoint metadata keeps the filter's key names
//! (`broker_name`, `broker_id`, `perm`, `read_queue_num`, `write_queue_num`, `cluster_name`) and adds
//! `zone`, `priority` and `weight`. Loading validates everything and names the offending field.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::remoting::frame::DEFAULT_MAX_FRAME;

/// Why a configuration was refused; the message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The cause is part of the message and deliberately not a `source`: error chains (`{:#}`)
    // would print it twice.
    #[error("cannot read {path}: {reason}")]
    Read {
        path: String,
        reason: std::io::Error,
    },
    #[error("invalid sidecar config: {0}")]
    Syntax(serde_yaml_ng::Error),
    #[error("invalid sidecar config: {field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub limits: Limits,
    /// How long a request for a topic without a route waits for one to appear (0: answer at once).
    #[serde(default)]
    pub route_wait_ms: u64,
    /// One address per upstream broker name, so clients that name brokers by address reach them.
    #[serde(default)]
    pub broker_listeners: BrokerListenersConfig,
    /// Static routes: the only ones without `xds`, the fallback with it.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub clusters: Vec<ClusterConfig>,
    /// Pull→POP conversion of consumer groups.
    #[serde(default)]
    pub consume: super::pullpop::ConsumeConfig,
    /// Routes on demand from an xDS control plane.
    #[serde(default)]
    pub xds: Option<XdsConfig>,
    /// Threads that serve client connections, each with the upstream connections it uses
    /// (0: one per core).
    #[serde(default)]
    pub workers: usize,
    /// Plain sends (routed now, not ordered, not oneway, not a half message) travel on upstream
    /// connections each client connection opens for itself, served by its own task; off, every
    /// send goes through the shared pools.
    #[serde(default = "default_direct_sends")]
    pub direct_sends: bool,
}

fn default_direct_sends() -> bool {
    true
}

/// The on-demand xDS client: a topic's route is asked for when a request first names the topic,
/// and given up when the topic goes idle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct XdsConfig {
    /// The control plane's delta ADS address (`host:port` or `http://host:port`).
    pub address: String,
    /// Sent as the node id; the control plane's harness logs streams by it.
    pub node_id: String,
    /// How long a request for an unseen topic waits for its route (topic route, then cluster
    /// and endpoints) before it gets TOPIC_NOT_EXIST.
    pub request_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Reconnect delay: doubled on each failure (with jitter) from the first to the last.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// A topic no request named for this long is unsubscribed and its state freed (0: never).
    pub idle_unsubscribe_after_s: u64,
    /// Most topics (and most clusters) subscribed at once; requests for more get TOPIC_NOT_EXIST.
    pub max_topics: usize,
    /// Requests waiting for routes at once, all topics; beyond that they are refused at once.
    pub max_pending: usize,
    /// Largest xDS response accepted.
    pub max_message_bytes: usize,
}

impl Default for XdsConfig {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:18000".to_owned(),
            node_id: "rocketmesh-sidecar".to_owned(),
            request_timeout_ms: 5_000,
            connect_timeout_ms: 5_000,
            backoff_initial_ms: 200,
            backoff_max_ms: 15_000,
            idle_unsubscribe_after_s: 600,
            max_topics: 10_000,
            max_pending: 10_000,
            max_message_bytes: 4 << 20,
        }
    }
}

impl XdsConfig {
    fn problems(&self) -> Option<(&'static str, String)> {
        if self.address.trim().is_empty() {
            return Some(("address", "must not be empty".into()));
        }
        for (field, value) in [
            ("request_timeout_ms", self.request_timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("backoff_initial_ms", self.backoff_initial_ms),
            ("max_topics", self.max_topics as u64),
            ("max_pending", self.max_pending as u64),
            ("max_message_bytes", self.max_message_bytes as u64),
        ] {
            if value == 0 {
                return Some((field, "must be greater than 0".into()));
            }
        }
        if self.backoff_max_ms < self.backoff_initial_ms {
            return Some((
                "backoff_max_ms",
                "must be at least backoff_initial_ms".into(),
            ));
        }
        None
    }

    /// The address as a URI for the gRPC client.
    pub fn uri(&self) -> String {
        if self.address.contains("://") {
            self.address.clone()
        } else {
            format!("http://{}", self.address)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    /// The `host:port` written into route data for clients; the bound address when absent.
    #[serde(default)]
    pub advertised_address: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Where the admin HTTP server listens; `null` turns it off.
    pub address: Option<SocketAddr>,
    /// Admin connections beyond this are closed at once: the admin must never use up the file
    /// descriptors the data plane accepts with.
    pub max_connections: usize,
    /// A request's headers must arrive within this long.
    pub header_timeout_ms: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            address: Some(SocketAddr::from(([127, 0, 0, 1], 9901))),
            max_connections: 64,
            header_timeout_ms: 5_000,
        }
    }
}

/// Each upstream broker name gets a listener of its own on the sidecar, and route data gives
/// clients that address for that broker. Clients that do not send `bname` (Java 4, the C++ client
/// and everything built on it, ali-ons) name a broker only by the address they dial; with one
/// shared address that identity would be lost.
///
/// Ports rather than one loopback address each: ports work on any interface and for remote
/// clients of a gateway, while extra loopback addresses exist only on Linux's 127/8.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerListenersConfig {
    /// `false`: every broker is advertised at the main listener's address (clients must send
    /// `bname` for broker-addressed requests).
    pub enabled: bool,
    /// Interface to bind; the first listener's IP when absent.
    pub address: Option<std::net::IpAddr>,
    /// Host written into route data; the host of the first listener's advertised address when
    /// absent.
    pub advertised_host: Option<String>,
    /// `"FIRST-LAST"`, or `"FIRST"` for a base port (brokers take FIRST, FIRST+1, ...); ports
    /// the OS picks when absent.
    pub port_range: Option<String>,
}

impl Default for BrokerListenersConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            address: None,
            advertised_host: None,
            port_range: None,
        }
    }
}

impl BrokerListenersConfig {
    /// The configured ports; `None` lets the OS pick.
    pub fn ports(&self) -> Result<Option<std::ops::RangeInclusive<u16>>, ConfigError> {
        let Some(text) = self.port_range.as_deref() else {
            return Ok(None);
        };
        let field = "broker_listeners.port_range";
        let port = |part: &str| {
            part.trim()
                .parse::<u16>()
                .ok()
                .filter(|port| *port > 0)
                .ok_or_else(|| invalid(field, format!("{part:?} is not a port number (1-65535)")))
        };
        let range = match text.split_once('-') {
            Some((first, last)) => port(first)?..=port(last)?,
            None => port(text)?..=u16::MAX,
        };
        if range.is_empty() {
            return Err(invalid(field, "the first port is above the last"));
        }
        Ok(Some(range))
    }
}

/// Explicit bounds on everything that could grow with input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest frame accepted from clients or brokers, length prefix included.
    pub max_frame_size: usize,
    /// Largest message body a send may carry; larger ones are refused here, as the broker would
    /// refuse them, instead of being carried to it. 0 turns the check off.
    pub max_message_size: usize,
    /// Downstream connections beyond this are closed at once.
    pub max_connections: usize,
    /// Downstream connections one peer address may hold.
    pub max_connections_per_peer: usize,
    /// A client connection with nothing in flight and no byte received for this long is closed.
    pub idle_timeout_ms: u64,
    /// A frame must arrive whole within this long of its first byte, or the connection closes.
    pub frame_timeout_ms: u64,
    /// Bytes of partly received client frames held across all connections.
    pub max_buffered_bytes: usize,
    /// Requests in flight per downstream connection before the sidecar stops reading from it.
    pub max_in_flight_per_connection: usize,
    /// How long a graceful shutdown waits for requests in flight.
    pub drain_timeout_ms: u64,
    /// Distinct topics (topic and group pairs for consumption) counted per metric family; the
    /// rest count under the topic `_other`, so invented topic names cannot grow memory or
    /// `/metrics` without end.
    pub max_topic_series: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_size: DEFAULT_MAX_FRAME,
            // Apache RocketMQ's default maxMessageSize.
            max_message_size: 4 * 1024 * 1024,
            max_connections: 10_000,
            max_connections_per_peer: crate::inbound::DEFAULT_MAX_CONNECTIONS_PER_PEER,
            idle_timeout_ms: crate::inbound::DEFAULT_IDLE_TIMEOUT.as_millis() as u64,
            frame_timeout_ms: crate::inbound::DEFAULT_FRAME_TIMEOUT.as_millis() as u64,
            max_buffered_bytes: crate::inbound::DEFAULT_MAX_BUFFERED_BYTES,
            max_in_flight_per_connection: 1024,
            drain_timeout_ms: 5_000,
            max_topic_series: 10_000,
        }
    }
}

impl Limits {
    /// The limits applied to each client connection's reads.
    pub fn read_limits(&self) -> crate::inbound::ReadLimits {
        crate::inbound::ReadLimits {
            frame: crate::remoting::frame::FrameLimits {
                max_frame: self.max_frame_size,
                ..Default::default()
            },
            idle_timeout: std::time::Duration::from_millis(self.idle_timeout_ms),
            frame_timeout: std::time::Duration::from_millis(self.frame_timeout_ms),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(rename = "match")]
    pub matcher: RouteMatchConfig,
    pub route: RouteActionConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatchConfig {
    pub topic: TopicMatcher,
    /// Only these request codes match; every code when absent.
    #[serde(default)]
    pub codes: Option<Vec<i32>>,
}

/// How a route matches topic names, as Envoy's `StringMatcher`: exactly one of the three.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicMatcher {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Must match the whole topic name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

impl TopicMatcher {
    pub fn prefix(prefix: &str) -> Self {
        Self {
            prefix: Some(prefix.to_owned()),
            ..Self::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteActionConfig {
    pub cluster: String,
    /// Only endpoints whose metadata has all these values (as strings) serve the route.
    #[serde(default)]
    pub metadata_match: BTreeMap<String, MetadataValue>,
    /// Keep the broker and queue the client chose for sends (ordered messages).
    #[serde(default)]
    pub ordered: bool,
    /// Whether consumer groups of this topic's pulls become POP (`consume.mode` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consume_mode: Option<super::pullpop::ConsumeMode>,
}

/// A metadata value in a match: YAML strings, numbers and booleans all compare as text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MetadataValue {
    Text(String),
    Number(i64),
    Flag(bool),
}

impl MetadataValue {
    pub fn as_text(&self) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Number(number) => number.to_string(),
            Self::Flag(flag) => flag.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub name: String,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Connections kept to each endpoint; requests are multiplexed over them.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Requests in flight to one endpoint; more wait up to the request timeout, then get SYSTEM_BUSY.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight_per_endpoint: usize,
    /// What one connection to a broker may carry in flight before the broker stops reading it
    /// (the bundled broker's `max_in_flight_per_connection`). Each endpoint's limits are derived
    /// from it, so parked requests can never fill a connection that sends need.
    #[serde(default = "default_broker_in_flight_per_connection")]
    pub broker_max_in_flight_per_connection: usize,
    /// Long-polling pulls and pops parked at one endpoint. They travel on connections of their
    /// own, opened as needed, so a crowd of parked polls never delays a send.
    #[serde(default = "default_max_parked")]
    pub max_parked_per_endpoint: usize,
    #[serde(default)]
    pub balancer: BalancerSettings,
    pub endpoints: Vec<EndpointConfig>,
}

impl Default for ClusterConfig {
    /// A cluster with no name or endpoints and every setting at its default.
    fn default() -> Self {
        Self {
            name: String::new(),
            connect_timeout_ms: default_connect_timeout_ms(),
            request_timeout_ms: default_request_timeout_ms(),
            pool_size: default_pool_size(),
            max_in_flight_per_endpoint: default_max_in_flight(),
            broker_max_in_flight_per_connection: default_broker_in_flight_per_connection(),
            max_parked_per_endpoint: default_max_parked(),
            balancer: BalancerSettings::default(),
            endpoints: Vec::new(),
        }
    }
}

/// How a cluster's endpoints are chosen, failed over, retried and health-checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BalancerSettings {
    /// `weighted` (exact shares of current weights) or `least_request` (two choices, fewer in
    /// flight wins).
    pub policy: BalancePolicy,
    /// `least_request` only: effective weight = weight / (1 + in_flight)^bias.
    pub active_request_bias: f64,
    /// Envoy's overprovisioning factor: a priority takes all traffic down to 1/factor health.
    pub overprovisioning_factor: f64,
    /// A priority below this health (0..1) ignores health while total health is short.
    pub panic_threshold: f64,
    /// With every endpoint down: refuse (true) or try them all (false).
    pub fail_when_all_down: bool,
    /// Retries of a failed send on another broker, at most this many per send...
    pub max_retries: u32,
    /// ...and at most this share of all sends (plus a floor of 10), so retries cannot snowball.
    pub retry_budget: f64,
    /// How often endpoints at the minimum weight are probed with a real request.
    pub health_check_interval_ms: u64,
    /// Passing probes in a row before a down endpoint gets 10% of its weight back.
    pub healthy_threshold: u32,
    /// Consecutive failures that eject an endpoint (0: never eject).
    pub outlier_consecutive_failures: u32,
    pub outlier_base_ejection_ms: u64,
    pub outlier_max_ejection_ms: u64,
    /// Most of a priority (percent) ejected at once; one endpoint always may be.
    pub outlier_max_ejection_percent: f64,
    /// Share of its weight a new endpoint starts with (1: no slow start).
    pub slow_start_initial_share: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancePolicy {
    Weighted,
    LeastRequest,
}

impl Default for BalancerSettings {
    fn default() -> Self {
        Self {
            policy: BalancePolicy::Weighted,
            active_request_bias: 1.0,
            overprovisioning_factor: 1.4,
            panic_threshold: 0.5,
            fail_when_all_down: false,
            max_retries: 2,
            retry_budget: 0.2,
            health_check_interval_ms: 1_000,
            healthy_threshold: 1,
            outlier_consecutive_failures: 5,
            outlier_base_ejection_ms: 30_000,
            outlier_max_ejection_ms: 300_000,
            outlier_max_ejection_percent: 10.0,
            slow_start_initial_share: 1.0,
        }
    }
}

impl BalancerSettings {
    pub fn to_balancer_config(&self) -> crate::balance::BalancerConfig {
        use crate::balance::{BalancerConfig, OutlierConfig, Policy, weight::WeightRules};
        use std::time::Duration;
        BalancerConfig {
            policy: match self.policy {
                BalancePolicy::Weighted => Policy::Weighted,
                BalancePolicy::LeastRequest => Policy::LeastRequest {
                    bias: self.active_request_bias,
                },
            },
            overprovisioning_factor: self.overprovisioning_factor,
            panic_threshold: self.panic_threshold,
            fail_when_all_down: self.fail_when_all_down,
            rules: WeightRules {
                recover_after_passes: self.healthy_threshold,
                ..WeightRules::default()
            },
            outlier: OutlierConfig {
                consecutive_failures: self.outlier_consecutive_failures,
                base_ejection: Duration::from_millis(self.outlier_base_ejection_ms),
                max_ejection: Duration::from_millis(self.outlier_max_ejection_ms),
                max_ejection_share: self.outlier_max_ejection_percent / 100.0,
            },
            initial_weight_share: self.slow_start_initial_share,
            track_in_flight: false,
        }
    }
}

fn default_connect_timeout_ms() -> u64 {
    1_000
}
fn default_request_timeout_ms() -> u64 {
    5_000
}
fn default_pool_size() -> usize {
    2
}
fn default_max_in_flight() -> usize {
    4_096
}
/// The bundled broker's default `max_in_flight_per_connection`.
pub const DEFAULT_BROKER_IN_FLIGHT_PER_CONNECTION: usize = 1_024;
pub const DEFAULT_MAX_PARKED_PER_ENDPOINT: usize = 16_384;
fn default_broker_in_flight_per_connection() -> usize {
    DEFAULT_BROKER_IN_FLIGHT_PER_CONNECTION
}
fn default_max_parked() -> usize {
    DEFAULT_MAX_PARKED_PER_ENDPOINT
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub address: SocketAddr,
    pub metadata: EndpointMetadata,
}

/// What the sidecar knows of a broker; the first six keys are Envoy's filter's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointMetadata {
    pub broker_name: String,
    #[serde(default)]
    pub broker_id: i64,
    /// RocketMQ permission bits: 4 readable, 2 writable (6 both).
    #[serde(default = "default_perm")]
    pub perm: i32,
    #[serde(default = "default_queue_num")]
    pub read_queue_num: i32,
    #[serde(default = "default_queue_num")]
    pub write_queue_num: i32,
    pub cluster_name: String,
    #[serde(default)]
    pub zone: Option<String>,
    /// Lower is preferred.
    #[serde(default)]
    pub priority: u32,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_perm() -> i32 {
    6
}
fn default_queue_num() -> i32 {
    4
}
fn default_weight() -> u32 {
    100
}

pub const PERM_WRITE: i32 = 2;
pub const PERM_READ: i32 = 4;

impl EndpointMetadata {
    pub fn writable(&self) -> bool {
        self.perm & PERM_WRITE != 0
    }
    pub fn readable(&self) -> bool {
        self.perm & PERM_READ != 0
    }

    /// The value of a metadata key as text, for `metadata_match`.
    pub fn get(&self, key: &str) -> Option<String> {
        Some(match key {
            "broker_name" => self.broker_name.clone(),
            "broker_id" => self.broker_id.to_string(),
            "perm" => self.perm.to_string(),
            "read_queue_num" => self.read_queue_num.to_string(),
            "write_queue_num" => self.write_queue_num.to_string(),
            "cluster_name" => self.cluster_name.clone(),
            "zone" => self.zone.clone()?,
            "priority" => self.priority.to_string(),
            "weight" => self.weight.to_string(),
            _ => return None,
        })
    }
}

const METADATA_KEYS: [&str; 9] = [
    "broker_name",
    "broker_id",
    "perm",
    "read_queue_num",
    "write_queue_num",
    "cluster_name",
    "zone",
    "priority",
    "weight",
];

impl SidecarConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|reason| ConfigError::Read {
            path: path.display().to_string(),
            reason,
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_yaml_ng::from_str(text).map_err(ConfigError::Syntax)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what the types cannot: references, ranges, regexes, duplicates.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some((field, reason)) = self.consume.problems().into_iter().next() {
            return Err(invalid(format!("consume.{field}"), reason));
        }
        if self.listeners.is_empty() {
            return Err(invalid("listeners", "at least one listener is needed"));
        }
        let limits = &self.limits;
        for (field, value) in [
            ("limits.max_frame_size", limits.max_frame_size),
            ("limits.max_connections", limits.max_connections),
            (
                "limits.max_connections_per_peer",
                limits.max_connections_per_peer,
            ),
            ("limits.idle_timeout_ms", limits.idle_timeout_ms as usize),
            ("limits.frame_timeout_ms", limits.frame_timeout_ms as usize),
            ("admin.max_connections", self.admin.max_connections),
            (
                "admin.header_timeout_ms",
                self.admin.header_timeout_ms as usize,
            ),
            (
                "limits.max_in_flight_per_connection",
                limits.max_in_flight_per_connection,
            ),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be greater than 0"));
            }
        }
        if limits.max_buffered_bytes < limits.max_frame_size {
            return Err(invalid(
                "limits.max_buffered_bytes",
                "must be at least limits.max_frame_size (one whole frame must fit)",
            ));
        }
        let names = validate_clusters(&self.clusters)?;
        if let Some((field, reason)) = self.xds.as_ref().and_then(XdsConfig::problems) {
            return Err(invalid(format!("xds.{field}"), reason));
        }
        if self.routes.is_empty() && self.xds.is_none() {
            return Err(invalid(
                "routes",
                "at least one route is needed (or an xds section to get routes from)",
            ));
        }
        if let Some(ports) = self.broker_listeners.ports()? {
            let brokers: HashSet<&str> = self
                .clusters
                .iter()
                .flat_map(|cluster| &cluster.endpoints)
                .map(|endpoint| endpoint.metadata.broker_name.as_str())
                .collect();
            if ports.len() < brokers.len() {
                return Err(invalid(
                    "broker_listeners.port_range",
                    format!(
                        "{} ports for {} broker names: each broker name needs its own port",
                        ports.len(),
                        brokers.len()
                    ),
                ));
            }
        }
        validate_routes(&self.routes, &names)
    }
}

/// Checks clusters as the sidecar needs them (names, limits, balancer ranges, endpoint metadata);
/// returns their names. The control plane serves the same vocabulary and checks it the same way.
pub fn validate_clusters(clusters: &[ClusterConfig]) -> Result<HashSet<&str>, ConfigError> {
    let mut names = HashSet::new();
    for (index, cluster) in clusters.iter().enumerate() {
        let field = |name: &str| format!("clusters[{index}].{name}");
        if cluster.name.is_empty() {
            return Err(invalid(field("name"), "must not be empty"));
        }
        if !names.insert(cluster.name.as_str()) {
            return Err(invalid(
                field("name"),
                format!("duplicate cluster {:?}", cluster.name),
            ));
        }
        for (name, value) in [
            ("connect_timeout_ms", cluster.connect_timeout_ms),
            ("request_timeout_ms", cluster.request_timeout_ms),
            ("pool_size", cluster.pool_size as u64),
            (
                "max_in_flight_per_endpoint",
                cluster.max_in_flight_per_endpoint as u64,
            ),
            (
                "broker_max_in_flight_per_connection",
                cluster.broker_max_in_flight_per_connection as u64,
            ),
            (
                "max_parked_per_endpoint",
                cluster.max_parked_per_endpoint as u64,
            ),
        ] {
            if value == 0 {
                return Err(invalid(field(name), "must be greater than 0"));
            }
        }
        let balancer = &cluster.balancer;
        for (name, value, range) in [
            (
                "balancer.overprovisioning_factor",
                balancer.overprovisioning_factor,
                1.0..=100.0,
            ),
            (
                "balancer.panic_threshold",
                balancer.panic_threshold,
                0.0..=1.0,
            ),
            ("balancer.retry_budget", balancer.retry_budget, 0.0..=1.0),
            (
                "balancer.active_request_bias",
                balancer.active_request_bias,
                0.0..=10.0,
            ),
            (
                "balancer.outlier_max_ejection_percent",
                balancer.outlier_max_ejection_percent,
                0.0..=100.0,
            ),
            (
                "balancer.slow_start_initial_share",
                balancer.slow_start_initial_share,
                0.0..=1.0,
            ),
        ] {
            if !range.contains(&value) {
                return Err(invalid(
                    field(name),
                    format!("must be between {} and {}", range.start(), range.end()),
                ));
            }
        }
        if balancer.health_check_interval_ms == 0 {
            return Err(invalid(
                field("balancer.health_check_interval_ms"),
                "must be greater than 0",
            ));
        }
        if cluster.endpoints.is_empty() {
            return Err(invalid(
                field("endpoints"),
                "at least one endpoint is needed",
            ));
        }
        let mut brokers = HashSet::new();
        for (at, endpoint) in cluster.endpoints.iter().enumerate() {
            let field = |name: &str| format!("clusters[{index}].endpoints[{at}].metadata.{name}");
            let metadata = &endpoint.metadata;
            if metadata.broker_name.is_empty() {
                return Err(invalid(field("broker_name"), "must not be empty"));
            }
            if metadata.cluster_name.is_empty() {
                return Err(invalid(field("cluster_name"), "must not be empty"));
            }
            if !brokers.insert((metadata.broker_name.as_str(), metadata.broker_id)) {
                return Err(invalid(
                    field("broker_id"),
                    format!(
                        "broker {:?} already has an endpoint with id {}",
                        metadata.broker_name, metadata.broker_id
                    ),
                ));
            }
            if !(0..=7).contains(&metadata.perm) {
                return Err(invalid(field("perm"), "must be a permission mask 0..=7"));
            }
            for (name, value) in [
                ("read_queue_num", metadata.read_queue_num),
                ("write_queue_num", metadata.write_queue_num),
            ] {
                if !(1..=1024).contains(&value) {
                    return Err(invalid(field(name), "must be between 1 and 1024"));
                }
            }
            if metadata.weight == 0 {
                return Err(invalid(field("weight"), "must be greater than 0"));
            }
        }
    }
    Ok(names)
}

/// Checks routes against the cluster names they may use.
pub fn validate_routes(
    routes: &[RouteConfig],
    clusters: &HashSet<&str>,
) -> Result<(), ConfigError> {
    for (index, route) in routes.iter().enumerate() {
        if !clusters.contains(route.route.cluster.as_str()) {
            return Err(invalid(
                format!("routes[{index}].route.cluster"),
                format!("unknown cluster {:?}", route.route.cluster),
            ));
        }
        let topic = &route.matcher.topic;
        let given = [&topic.exact, &topic.prefix, &topic.regex]
            .iter()
            .filter(|value| value.is_some())
            .count();
        if given != 1 {
            return Err(invalid(
                format!("routes[{index}].match.topic"),
                "give exactly one of exact, prefix, regex",
            ));
        }
        if let Some(pattern) = &topic.regex {
            regex::Regex::new(pattern).map_err(|error| {
                invalid(
                    format!("routes[{index}].match.topic.regex"),
                    error.to_string(),
                )
            })?;
        }
        for key in route.route.metadata_match.keys() {
            if !METADATA_KEYS.contains(&key.as_str()) {
                return Err(invalid(
                    format!("routes[{index}].route.metadata_match.{key}"),
                    format!(
                        "unknown metadata key; known keys: {}",
                        METADATA_KEYS.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../config/sidecar.yaml");

    #[test]
    fn the_example_config_loads() {
        let config = SidecarConfig::parse(EXAMPLE).expect("example");
        assert_eq!(config.clusters.len(), 1);
        assert!(config.routes.len() >= 2);
    }

    #[test]
    fn the_xds_example_config_loads_and_xds_settings_are_checked() {
        let config = SidecarConfig::parse(include_str!("../../config/sidecar-xds.yaml"))
            .expect("xds example");
        let xds = config.xds.expect("an xds section");
        assert_eq!(xds.uri(), "http://127.0.0.1:18000");
        assert!(config.routes.is_empty());
        let without_routes = "listeners: [{ address: \"127.0.0.1:0\" }]\n";
        assert!(error_of(without_routes).contains("or an xds section"));
        let zero = format!("{without_routes}xds: {{ address: \"x:1\", request_timeout_ms: 0 }}\n");
        assert!(
            error_of(&zero).contains("xds.request_timeout_ms"),
            "{}",
            error_of(&zero)
        );
        let backwards =
            format!("{without_routes}xds: {{ backoff_initial_ms: 500, backoff_max_ms: 100 }}\n");
        assert!(error_of(&backwards).contains("xds.backoff_max_ms"));
    }

    fn error_of(text: &str) -> String {
        SidecarConfig::parse(text)
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn broker_listener_ports_are_a_range_or_a_base() {
        let ports = |text: &str| {
            BrokerListenersConfig {
                port_range: Some(text.into()),
                ..BrokerListenersConfig::default()
            }
            .ports()
        };
        assert_eq!(ports("30911-30913").expect("range"), Some(30911..=30913));
        assert_eq!(ports("30911").expect("base"), Some(30911..=u16::MAX));
        for bad in ["x", "5-3", "0-10", "1-70000"] {
            assert!(ports(bad).is_err(), "{bad}");
        }
        let too_few = EXAMPLE.replace("\"10931-10939\"", "\"30911-30911\"");
        assert!(
            error_of(&too_few).contains("broker_listeners.port_range: 1 ports for 2 broker names"),
            "{}",
            error_of(&too_few)
        );
    }

    #[test]
    fn errors_name_the_field() {
        let unknown_cluster = EXAMPLE.replace("cluster: local-brokers", "cluster: nowhere");
        assert!(
            error_of(&unknown_cluster)
                .contains("routes[0].route.cluster: unknown cluster \"nowhere\""),
            "{}",
            error_of(&unknown_cluster)
        );
        let bad_regex = EXAMPLE.replace("regex: \"^Order.*\"", "regex: \"(\"");
        assert!(
            error_of(&bad_regex).contains("match.topic.regex"),
            "{}",
            error_of(&bad_regex)
        );
        let typo = EXAMPLE.replace("weight:", "wieght:");
        assert!(error_of(&typo).contains("wieght"), "{}", error_of(&typo));
        let zero = EXAMPLE.replace("pool_size: 2", "pool_size: 0");
        assert!(
            error_of(&zero).contains("clusters[0].pool_size"),
            "{}",
            error_of(&zero)
        );
        let match_key = EXAMPLE.replace(
            "metadata_match: { perm: 6 }",
            "metadata_match: { color: red }",
        );
        assert!(
            error_of(&match_key).contains("metadata_match.color"),
            "{}",
            error_of(&match_key)
        );
    }
}
