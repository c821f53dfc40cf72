//! The small serde vocabulary ("specs") the YAML source and the harness API speak, the builders
//! from specs to xDS resources, and the decoders back for the sidecar.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3::{
    Cluster,
    cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy as PbLbPolicy},
};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, Locality, Metadata, SocketAddress,
    address, config_source::ConfigSourceSpecifier, socket_address::PortSpecifier,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier,
};
use envoy_types::pb::google::protobuf::{
    Any, Duration, ListValue, Struct, UInt32Value, Value, value::Kind,
};
use prost::{Message, Name};
use serde::{Deserialize, Serialize};

use crate::pb;
use crate::resource::VersionedResource;

/// Host metadata namespace for endpoint subset matching (`RouteAction.metadata_match`).
pub const LB_METADATA_KEY: &str = "envoy.lb";
/// Host metadata namespace Envoy's rocketmq_proxy reads when it synthesises a topic route.
pub const ROCKETMQ_PROXY_METADATA_KEY: &str = "envoy.filters.network.rocketmq_proxy";
/// Cluster metadata namespace for balancer settings only the sidecar understands.
pub const ROCKETMESH_METADATA_KEY: &str = "rocketmesh";

/// Host metadata keys with a typed field in [`EndpointSpec`]; not allowed in its free `metadata`.
const BROKER_KEYS: [&str; 6] = [
    "broker_name",
    "broker_id",
    "perm",
    "read_queue_num",
    "write_queue_num",
    "cluster_name",
];

/// Why a spec or a decoded resource is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("{what} must not be empty")]
    EmptyName { what: &'static str },
    #[error("bad address {address:?}: expected ip:port ({reason})")]
    BadAddress { address: String, reason: String },
    #[error("unknown lb policy {0}")]
    UnknownLbPolicy(String),
    #[error("endpoint weight must be at least 1")]
    ZeroWeight,
    #[error("endpoint priorities must run 0..=N without gaps; priority {0} has none")]
    PriorityGap(u32),
    #[error("metadata key {0:?} has its own field; set that instead")]
    ReservedMetadataKey(String),
    #[error("{field} must be in {range}, got {value}")]
    OutOfRange {
        field: &'static str,
        range: &'static str,
        value: i64,
    },
    #[error("name mismatch: resource is {actual:?}, expected {expected:?}")]
    NameMismatch { expected: String, actual: String },
    #[error("expected a {expected} resource, got {actual:?}")]
    WrongType { expected: String, actual: String },
    #[error("cannot decode {what}: {source}")]
    Decode {
        what: &'static str,
        source: prost::DecodeError,
    },
    #[error("cluster {0:?} is not an EDS cluster over ADS")]
    NotEds(String),
    #[error("unknown consume mode {0:?} (pop, pull or auto)")]
    UnknownConsumeMode(String),
    #[error("metadata value for {key:?} is not {expected}")]
    MetadataType { key: String, expected: &'static str },
}

/// Envoy load-balancing policies a rocketmesh cluster may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
    RingHash,
    Maglev,
}

impl LbPolicy {
    fn to_pb(self) -> PbLbPolicy {
        match self {
            Self::RoundRobin => PbLbPolicy::RoundRobin,
            Self::LeastRequest => PbLbPolicy::LeastRequest,
            Self::Random => PbLbPolicy::Random,
            Self::RingHash => PbLbPolicy::RingHash,
            Self::Maglev => PbLbPolicy::Maglev,
        }
    }

    fn from_pb(v: i32) -> Result<Self, SpecError> {
        match PbLbPolicy::try_from(v) {
            Ok(PbLbPolicy::RoundRobin) => Ok(Self::RoundRobin),
            Ok(PbLbPolicy::LeastRequest) => Ok(Self::LeastRequest),
            Ok(PbLbPolicy::Random) => Ok(Self::Random),
            Ok(PbLbPolicy::RingHash) => Ok(Self::RingHash),
            Ok(PbLbPolicy::Maglev) => Ok(Self::Maglev),
            Ok(other) => Err(SpecError::UnknownLbPolicy(other.as_str_name().to_owned())),
            Err(_) => Err(SpecError::UnknownLbPolicy(v.to_string())),
        }
    }
}

/// One broker (or any upstream) endpoint of a cluster.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// `ip:port` (`[v6]:port` for IPv6). EDS endpoints must be IP addresses.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_id: Option<i64>,
    /// RocketMQ permission bits: 4 readable, 2 writable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perm: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_queue_num: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_queue_num: Option<i32>,
    /// The RocketMQ broker cluster (not the Envoy cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<String>,
    /// Extra string host metadata (under `envoy.lb`), e.g. for `metadata_match`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Locality zone; endpoints are grouped by (zone, priority).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub zone: String,
    /// Locality priority, 0 is the highest.
    #[serde(default)]
    pub priority: u32,
    /// Load-balancing weight of the host, at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// A cluster: an Envoy `Cluster` of type EDS over ADS plus its `ClusterLoadAssignment`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    pub name: String,
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default)]
    pub lb_policy: LbPolicy,
    /// Balancer settings for the sidecar that Envoy has no field for; opaque to the control plane.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub balancer: BTreeMap<String, serde_json::Value>,
}

fn default_connect_timeout_ms() -> u64 {
    1000
}

/// The pair of resources one [`ClusterSpec`] becomes.
#[derive(Clone, Debug)]
pub struct ClusterResources {
    pub cluster: VersionedResource,
    pub load_assignment: VersionedResource,
}

impl ClusterSpec {
    /// Checks names, addresses, weights, priorities and metadata keys.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.name.is_empty() {
            return Err(SpecError::EmptyName {
                what: "cluster name",
            });
        }
        let mut priorities = Vec::new();
        for e in &self.endpoints {
            parse_address(&e.address)?;
            if e.weight == Some(0) {
                return Err(SpecError::ZeroWeight);
            }
            if let Some(key) = e
                .metadata
                .keys()
                .find(|k| BROKER_KEYS.contains(&k.as_str()))
            {
                return Err(SpecError::ReservedMetadataKey(key.clone()));
            }
            if let Some(perm) = e.perm.filter(|p| !(0..=7).contains(p)) {
                return Err(SpecError::OutOfRange {
                    field: "perm",
                    range: "0..=7",
                    value: perm.into(),
                });
            }
            for (field, v) in [
                ("read_queue_num", e.read_queue_num),
                ("write_queue_num", e.write_queue_num),
            ] {
                if let Some(v) = v.filter(|v| *v < 0) {
                    return Err(SpecError::OutOfRange {
                        field,
                        range: "0..",
                        value: v.into(),
                    });
                }
            }
            priorities.push(e.priority);
        }
        priorities.sort_unstable();
        priorities.dedup();
        // Envoy rejects priority sets with holes.
        for (expected, p) in (0u32..).zip(&priorities) {
            if expected != *p {
                return Err(SpecError::PriorityGap(expected));
            }
        }
        Ok(())
    }

    /// The Envoy Cluster: EDS over ADS, its EDS service name being its own name (two clusters
    /// sharing one EDS name leave the second warming forever, Envoy #47302).
    pub fn to_cluster(&self) -> Result<Cluster, SpecError> {
        self.validate()?;
        let metadata = (!self.balancer.is_empty()).then(|| Metadata {
            filter_metadata: HashMap::from([(
                ROCKETMESH_METADATA_KEY.to_owned(),
                Struct {
                    fields: self
                        .balancer
                        .iter()
                        .map(|(k, v)| (k.clone(), json_to_value(v)))
                        .collect(),
                },
            )]),
            ..Default::default()
        });
        let ms = self.connect_timeout_ms;
        Ok(Cluster {
            name: self.name.clone(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            eds_cluster_config: Some(EdsClusterConfig {
                eds_config: Some(ads_config_source()),
                service_name: self.name.clone(),
            }),
            connect_timeout: Some(Duration {
                seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
                nanos: ((ms % 1000) * 1_000_000) as i32,
            }),
            lb_policy: self.lb_policy.to_pb() as i32,
            metadata,
            ..Default::default()
        })
    }

    /// The endpoints, grouped into localities by (zone, priority) in order of first appearance.
    pub fn to_load_assignment(&self) -> Result<ClusterLoadAssignment, SpecError> {
        self.validate()?;
        let mut groups: Vec<LocalityLbEndpoints> = Vec::new();
        for e in &self.endpoints {
            let lb = endpoint_to_pb(e)?;
            let pos = groups.iter().position(|g| {
                g.priority == e.priority
                    && g.locality.as_ref().map(|l| l.zone.as_str()) == Some(e.zone.as_str())
            });
            match pos.and_then(|i| groups.get_mut(i)) {
                Some(g) => g.lb_endpoints.push(lb),
                None => groups.push(LocalityLbEndpoints {
                    locality: Some(Locality {
                        zone: e.zone.clone(),
                        ..Default::default()
                    }),
                    lb_endpoints: vec![lb],
                    priority: e.priority,
                    ..Default::default()
                }),
            }
        }
        Ok(ClusterLoadAssignment {
            cluster_name: self.name.clone(),
            endpoints: groups,
            ..Default::default()
        })
    }

    /// Both resources, encoded and versioned.
    pub fn build(&self) -> Result<ClusterResources, SpecError> {
        Ok(ClusterResources {
            cluster: VersionedResource::from_cluster(&self.to_cluster()?),
            load_assignment: VersionedResource::from_load_assignment(&self.to_load_assignment()?),
        })
    }

    /// Reads a spec back from a Cluster and (optionally) its endpoints.
    pub fn from_resources(
        cluster: &Cluster,
        cla: Option<&ClusterLoadAssignment>,
    ) -> Result<Self, SpecError> {
        let is_eds = matches!(cluster.cluster_discovery_type, Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32);
        let eds_ok = cluster
            .eds_cluster_config
            .as_ref()
            .is_some_and(|c| c.eds_config.is_some());
        if !is_eds || !eds_ok {
            return Err(SpecError::NotEds(cluster.name.clone()));
        }
        let connect_timeout_ms = cluster
            .connect_timeout
            .as_ref()
            .map(|d| {
                u64::try_from(d.seconds).unwrap_or(0) * 1000
                    + u64::try_from(d.nanos).unwrap_or(0) / 1_000_000
            })
            .unwrap_or_else(default_connect_timeout_ms);
        let balancer = cluster
            .metadata
            .as_ref()
            .and_then(|m| m.filter_metadata.get(ROCKETMESH_METADATA_KEY))
            .map(|s| {
                s.fields
                    .iter()
                    .map(|(k, v)| (k.clone(), value_to_json(v)))
                    .collect()
            })
            .unwrap_or_default();
        let endpoints = match cla {
            Some(cla) => {
                if cla.cluster_name != cluster.name {
                    return Err(SpecError::NameMismatch {
                        expected: cluster.name.clone(),
                        actual: cla.cluster_name.clone(),
                    });
                }
                endpoints_from_pb(cla)?
            }
            None => Vec::new(),
        };
        Ok(Self {
            name: cluster.name.clone(),
            endpoints,
            connect_timeout_ms,
            lb_policy: LbPolicy::from_pb(cluster.lb_policy)?,
            balancer,
        })
    }
}

fn ads_config_source() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

fn parse_address(address: &str) -> Result<SocketAddr, SpecError> {
    address
        .parse::<SocketAddr>()
        .map_err(|e| SpecError::BadAddress {
            address: address.to_owned(),
            reason: e.to_string(),
        })
}

fn endpoint_to_pb(e: &EndpointSpec) -> Result<LbEndpoint, SpecError> {
    let addr = parse_address(&e.address)?;
    let num = |v: f64| Value {
        kind: Some(Kind::NumberValue(v)),
    };
    let text = |v: &str| Value {
        kind: Some(Kind::StringValue(v.to_owned())),
    };
    // Numbers as numbers: that is how rocketmq_proxy reads them (number_value()).
    let mut broker = HashMap::new();
    if let Some(v) = &e.broker_name {
        broker.insert("broker_name".to_owned(), text(v));
    }
    if let Some(v) = e.broker_id {
        broker.insert("broker_id".to_owned(), num(v as f64));
    }
    for (k, v) in [
        ("perm", e.perm),
        ("read_queue_num", e.read_queue_num),
        ("write_queue_num", e.write_queue_num),
    ] {
        if let Some(v) = v {
            broker.insert(k.to_owned(), num(f64::from(v)));
        }
    }
    if let Some(v) = &e.cluster_name {
        broker.insert("cluster_name".to_owned(), text(v));
    }
    let mut lb = broker.clone();
    lb.extend(e.metadata.iter().map(|(k, v)| (k.clone(), text(v))));
    let mut filter_metadata = HashMap::new();
    if !lb.is_empty() {
        filter_metadata.insert(LB_METADATA_KEY.to_owned(), Struct { fields: lb });
    }
    if !broker.is_empty() {
        filter_metadata.insert(
            ROCKETMQ_PROXY_METADATA_KEY.to_owned(),
            Struct { fields: broker },
        );
    }
    Ok(LbEndpoint {
        host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: addr.ip().to_string(),
                    port_specifier: Some(PortSpecifier::PortValue(u32::from(addr.port()))),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        metadata: (!filter_metadata.is_empty()).then(|| Metadata {
            filter_metadata,
            ..Default::default()
        }),
        load_balancing_weight: e.weight.map(|value| UInt32Value { value }),
        ..Default::default()
    })
}

fn endpoints_from_pb(cla: &ClusterLoadAssignment) -> Result<Vec<EndpointSpec>, SpecError> {
    let mut out = Vec::new();
    for group in &cla.endpoints {
        let zone = group
            .locality
            .as_ref()
            .map(|l| l.zone.clone())
            .unwrap_or_default();
        for lb in &group.lb_endpoints {
            let address = match &lb.host_identifier {
                Some(HostIdentifier::Endpoint(Endpoint {
                    address:
                        Some(Address {
                            address: Some(address::Address::SocketAddress(sa)),
                        }),
                    ..
                })) => {
                    let port = match sa.port_specifier {
                        Some(PortSpecifier::PortValue(p)) => p,
                        _ => 0,
                    };
                    match sa.address.parse::<std::net::IpAddr>() {
                        Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
                        _ => format!("{}:{port}", sa.address),
                    }
                }
                _ => {
                    return Err(SpecError::BadAddress {
                        address: String::new(),
                        reason: "endpoint has no socket address".into(),
                    });
                }
            };
            let mut spec = EndpointSpec {
                address,
                zone: zone.clone(),
                priority: group.priority,
                weight: lb.load_balancing_weight.as_ref().map(|w| w.value),
                ..Default::default()
            };
            let fields = lb
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get(LB_METADATA_KEY));
            for (k, v) in fields.map(|s| &s.fields).into_iter().flatten() {
                match k.as_str() {
                    "broker_name" => spec.broker_name = Some(string_of(k, v)?),
                    "cluster_name" => spec.cluster_name = Some(string_of(k, v)?),
                    "broker_id" => spec.broker_id = Some(number_of(k, v)? as i64),
                    "perm" => spec.perm = Some(number_of(k, v)? as i32),
                    "read_queue_num" => spec.read_queue_num = Some(number_of(k, v)? as i32),
                    "write_queue_num" => spec.write_queue_num = Some(number_of(k, v)? as i32),
                    _ => {
                        spec.metadata.insert(k.clone(), string_of(k, v)?);
                    }
                }
            }
            out.push(spec);
        }
    }
    Ok(out)
}

fn string_of(key: &str, v: &Value) -> Result<String, SpecError> {
    match &v.kind {
        Some(Kind::StringValue(s)) => Ok(s.clone()),
        _ => Err(SpecError::MetadataType {
            key: key.to_owned(),
            expected: "a string",
        }),
    }
}

fn number_of(key: &str, v: &Value) -> Result<f64, SpecError> {
    match &v.kind {
        Some(Kind::NumberValue(n)) => Ok(*n),
        // Tolerate numbers written as strings by other control planes.
        Some(Kind::StringValue(s)) => s.parse().map_err(|_| SpecError::MetadataType {
            key: key.to_owned(),
            expected: "a number",
        }),
        _ => Err(SpecError::MetadataType {
            key: key.to_owned(),
            expected: "a number",
        }),
    }
}

fn json_to_value(v: &serde_json::Value) -> Value {
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(Struct {
            fields: o
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        }),
    };
    Value { kind: Some(kind) }
}

fn value_to_json(v: &Value) -> serde_json::Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => (*b).into(),
        // Integral numbers come back as integers, so a spec survives the round trip.
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9.0e15 => (*n as i64).into(),
        Some(Kind::NumberValue(n)) => (*n).into(),
        Some(Kind::StringValue(s)) => s.clone().into(),
        Some(Kind::ListValue(l)) => l.values.iter().map(value_to_json).collect(),
        Some(Kind::StructValue(s)) => s
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
    }
}

/// How a consumer of the topic reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsumeMode {
    Pop,
    Pull,
    Auto,
}

impl ConsumeMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pop => "pop",
            Self::Pull => "pull",
            Self::Auto => "auto",
        }
    }

    fn parse(s: &str) -> Result<Option<Self>, SpecError> {
        match s {
            "" => Ok(None),
            "pop" => Ok(Some(Self::Pop)),
            "pull" => Ok(Some(Self::Pull)),
            "auto" => Ok(Some(Self::Auto)),
            other => Err(SpecError::UnknownConsumeMode(other.to_owned())),
        }
    }
}

/// A topic's queues on one broker, as a nameserver reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueDataSpec {
    pub broker_name: String,
    #[serde(default)]
    pub read_queue_nums: i32,
    #[serde(default)]
    pub write_queue_nums: i32,
    #[serde(default = "default_perm")]
    pub perm: i32,
    #[serde(default)]
    pub topic_sys_flag: i32,
}

fn default_perm() -> i32 {
    6
}

/// A route for some request codes only; first match wins.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeRouteSpec {
    pub codes: Vec<i32>,
    pub cluster: String,
    #[serde(default)]
    pub ordered: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata_match: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consume_mode: Option<ConsumeMode>,
}

/// How one topic is routed: the serde face of `rocketmesh.v1.TopicRoute`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicRouteSpec {
    pub topic: String,
    pub cluster: String,
    #[serde(default)]
    pub ordered: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata_match: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<QueueDataSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consume_mode: Option<ConsumeMode>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub code_routes: Vec<CodeRouteSpec>,
}

impl TopicRouteSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.topic.is_empty() {
            return Err(SpecError::EmptyName { what: "topic" });
        }
        if self.cluster.is_empty() {
            return Err(SpecError::EmptyName {
                what: "topic route cluster",
            });
        }
        for q in &self.queues {
            if q.broker_name.is_empty() {
                return Err(SpecError::EmptyName {
                    what: "queue broker_name",
                });
            }
            if !(0..=7).contains(&q.perm) {
                return Err(SpecError::OutOfRange {
                    field: "perm",
                    range: "0..=7",
                    value: q.perm.into(),
                });
            }
            for (field, v) in [
                ("read_queue_nums", q.read_queue_nums),
                ("write_queue_nums", q.write_queue_nums),
            ] {
                if v < 0 {
                    return Err(SpecError::OutOfRange {
                        field,
                        range: "0..",
                        value: v.into(),
                    });
                }
            }
        }
        if self.code_routes.iter().any(|r| r.cluster.is_empty()) {
            return Err(SpecError::EmptyName {
                what: "code route cluster",
            });
        }
        Ok(())
    }

    pub fn to_pb(&self) -> Result<pb::TopicRoute, SpecError> {
        self.validate()?;
        Ok(pb::TopicRoute {
            topic: self.topic.clone(),
            cluster: self.cluster.clone(),
            ordered: self.ordered,
            metadata_match: self.metadata_match.clone(),
            queues: self
                .queues
                .iter()
                .map(|q| pb::QueueData {
                    broker_name: q.broker_name.clone(),
                    read_queue_nums: q.read_queue_nums,
                    write_queue_nums: q.write_queue_nums,
                    perm: q.perm,
                    topic_sys_flag: q.topic_sys_flag,
                })
                .collect(),
            consume_mode: self
                .consume_mode
                .map(ConsumeMode::as_str)
                .unwrap_or_default()
                .to_owned(),
            code_routes: self
                .code_routes
                .iter()
                .map(|r| pb::CodeRoute {
                    codes: r.codes.clone(),
                    cluster: r.cluster.clone(),
                    ordered: r.ordered,
                    metadata_match: r.metadata_match.clone(),
                    consume_mode: r
                        .consume_mode
                        .map(ConsumeMode::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                })
                .collect(),
        })
    }

    /// The TopicRoute resource, named after the topic (its encoding is deterministic: btree maps).
    pub fn build(&self) -> Result<VersionedResource, SpecError> {
        Ok(VersionedResource::from_message(&self.topic, &self.to_pb()?))
    }

    pub fn from_pb(route: &pb::TopicRoute) -> Result<Self, SpecError> {
        let spec = Self {
            topic: route.topic.clone(),
            cluster: route.cluster.clone(),
            ordered: route.ordered,
            metadata_match: route.metadata_match.clone(),
            queues: route
                .queues
                .iter()
                .map(|q| QueueDataSpec {
                    broker_name: q.broker_name.clone(),
                    read_queue_nums: q.read_queue_nums,
                    write_queue_nums: q.write_queue_nums,
                    perm: q.perm,
                    topic_sys_flag: q.topic_sys_flag,
                })
                .collect(),
            consume_mode: ConsumeMode::parse(&route.consume_mode)?,
            code_routes: route
                .code_routes
                .iter()
                .map(|r| {
                    Ok(CodeRouteSpec {
                        codes: r.codes.clone(),
                        cluster: r.cluster.clone(),
                        ordered: r.ordered,
                        metadata_match: r.metadata_match.clone(),
                        consume_mode: ConsumeMode::parse(&r.consume_mode)?,
                    })
                })
                .collect::<Result<_, SpecError>>()?,
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// Decodes an `Any` of type `M`, checking its type URL first.
pub fn decode_any<M: Message + Name + Default>(any: &Any) -> Result<M, SpecError> {
    if any.type_url != M::type_url() {
        return Err(SpecError::WrongType {
            expected: M::type_url(),
            actual: any.type_url.clone(),
        });
    }
    M::decode(any.value.as_slice()).map_err(|source| SpecError::Decode {
        what: M::NAME,
        source,
    })
}

/// Decodes and validates a TopicRoute resource.
pub fn decode_topic_route(any: &Any) -> Result<TopicRouteSpec, SpecError> {
    TopicRouteSpec::from_pb(&decode_any::<pb::TopicRoute>(any)?)
}

/// A Cluster that Envoy NACKs (EDS without an EDS config), for the harness's "invalid" fault.
pub fn invalid_cluster(name: &str) -> Cluster {
    Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        connect_timeout: Some(Duration {
            seconds: 1,
            nanos: 0,
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(addr: &str, name: &str, id: i64) -> EndpointSpec {
        EndpointSpec {
            address: addr.into(),
            broker_name: Some(name.into()),
            broker_id: Some(id),
            perm: Some(6),
            read_queue_num: Some(4),
            write_queue_num: Some(4),
            cluster_name: Some("DefaultCluster".into()),
            ..Default::default()
        }
    }

    fn spec() -> ClusterSpec {
        let mut b = broker("10.0.0.2:10911", "broker-b", 0);
        b.zone = "z2".into();
        b.priority = 1;
        b.weight = Some(3);
        b.metadata.insert("canary".into(), "true".into());
        ClusterSpec {
            name: "topic-a".into(),
            endpoints: vec![
                broker("10.0.0.1:10911", "broker-a", 0),
                broker("[::1]:10911", "broker-a", 1),
                b,
            ],
            connect_timeout_ms: 1500,
            lb_policy: LbPolicy::LeastRequest,
            balancer: BTreeMap::from([(
                "affinity".to_owned(),
                serde_json::json!({"pop_ack": true, "ttl_ms": 30000}),
            )]),
        }
    }

    #[test]
    fn cluster_is_eds_over_ads_with_its_own_service_name() {
        let c = spec().to_cluster().unwrap();
        let eds = c.eds_cluster_config.as_ref().unwrap();
        assert_eq!(eds.service_name, "topic-a");
        let source = eds.eds_config.as_ref().unwrap();
        assert_eq!(source.resource_api_version, ApiVersion::V3 as i32);
        assert!(matches!(
            source.config_source_specifier,
            Some(ConfigSourceSpecifier::Ads(_))
        ));
        assert_eq!(
            c.connect_timeout,
            Some(Duration {
                seconds: 1,
                nanos: 500_000_000
            })
        );
        assert_eq!(c.lb_policy, PbLbPolicy::LeastRequest as i32);
        assert!(
            c.metadata
                .unwrap()
                .filter_metadata
                .contains_key(ROCKETMESH_METADATA_KEY)
        );
    }

    #[test]
    fn endpoints_carry_broker_metadata_locality_and_weight() {
        let cla = spec().to_load_assignment().unwrap();
        assert_eq!(cla.cluster_name, "topic-a");
        assert_eq!(cla.endpoints.len(), 2, "grouped by (zone, priority)");
        let second = &cla.endpoints[1];
        assert_eq!(
            (
                second.priority,
                second.locality.as_ref().unwrap().zone.as_str()
            ),
            (1, "z2")
        );
        let lb = &second.lb_endpoints[0];
        assert_eq!(lb.load_balancing_weight, Some(UInt32Value { value: 3 }));
        let meta = &lb.metadata.as_ref().unwrap().filter_metadata;
        let envoy_lb = &meta[LB_METADATA_KEY].fields;
        assert_eq!(
            envoy_lb["broker_name"].kind,
            Some(Kind::StringValue("broker-b".into()))
        );
        assert_eq!(envoy_lb["perm"].kind, Some(Kind::NumberValue(6.0)));
        assert_eq!(
            envoy_lb["canary"].kind,
            Some(Kind::StringValue("true".into()))
        );
        let proxy = &meta[ROCKETMQ_PROXY_METADATA_KEY].fields;
        assert_eq!(proxy.len(), 6, "the six rocketmq_proxy keys, no extras");
    }

    #[test]
    fn cluster_spec_round_trips_through_the_protos_and_json() {
        let s = spec();
        let res = s.build().unwrap();
        let cluster: Cluster = decode_any(&res.cluster.any).unwrap();
        let cla: ClusterLoadAssignment = decode_any(&res.load_assignment.any).unwrap();
        assert_eq!(
            ClusterSpec::from_resources(&cluster, Some(&cla)).unwrap(),
            s
        );
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<ClusterSpec>(&json).unwrap(), s);
        // Same content, same version; a rebuilt spec is a no-op for the store.
        assert_eq!(s.build().unwrap().cluster.version, res.cluster.version);
        assert_eq!(
            s.build().unwrap().load_assignment.version,
            res.load_assignment.version
        );
    }

    #[test]
    fn validation_errors_are_specific() {
        let mut s = spec();
        s.name.clear();
        assert_eq!(
            s.validate(),
            Err(SpecError::EmptyName {
                what: "cluster name"
            })
        );
        let mut s = spec();
        s.endpoints[0].address = "broker-a:10911".into();
        assert!(matches!(s.validate(), Err(SpecError::BadAddress { .. })));
        let mut s = spec();
        s.endpoints[0].weight = Some(0);
        assert_eq!(s.validate(), Err(SpecError::ZeroWeight));
        let mut s = spec();
        s.endpoints[2].priority = 2;
        assert_eq!(s.validate(), Err(SpecError::PriorityGap(1)));
        let mut s = spec();
        s.endpoints[0].metadata.insert("perm".into(), "6".into());
        assert_eq!(
            s.validate(),
            Err(SpecError::ReservedMetadataKey("perm".into()))
        );
        let err = serde_json::from_str::<ClusterSpec>(r#"{"name":"x","lb_policy":"fastest"}"#)
            .unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `fastest`"),
            "{err}"
        );
        let c = Cluster {
            name: "x".into(),
            lb_policy: PbLbPolicy::ClusterProvided as i32,
            ..spec().to_cluster().unwrap()
        };
        assert_eq!(
            ClusterSpec::from_resources(&c, None),
            Err(SpecError::UnknownLbPolicy("CLUSTER_PROVIDED".into()))
        );
        assert_eq!(
            ClusterSpec::from_resources(&invalid_cluster("x"), None),
            Err(SpecError::NotEds("x".into()))
        );
    }

    #[test]
    fn topic_route_round_trips_and_validates() {
        let spec: TopicRouteSpec = serde_json::from_value(serde_json::json!({
            "topic": "orders", "cluster": "brokers", "ordered": true,
            "metadata_match": {"zone": "z1"},
            "queues": [{"broker_name": "broker-a", "read_queue_nums": 8, "write_queue_nums": 8}],
            "consume_mode": "pop",
            "code_routes": [{"codes": [10, 310], "cluster": "send-brokers"}]
        }))
        .unwrap();
        assert_eq!(spec.queues[0].perm, 6);
        let res = spec.build().unwrap();
        assert_eq!(res.name, "orders");
        assert_eq!(decode_topic_route(&res.any).unwrap(), spec);
        assert!(matches!(
            decode_any::<Cluster>(&res.any),
            Err(SpecError::WrongType { .. })
        ));
        let bad = TopicRouteSpec {
            cluster: String::new(),
            ..spec.clone()
        };
        assert_eq!(
            bad.validate(),
            Err(SpecError::EmptyName {
                what: "topic route cluster"
            })
        );
        let garbage = Any {
            type_url: crate::types::TOPIC_ROUTE.into(),
            value: vec![0xff, 0xff],
        };
        assert!(matches!(
            decode_topic_route(&garbage),
            Err(SpecError::Decode { .. })
        ));
    }
}
