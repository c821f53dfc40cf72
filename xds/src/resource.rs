//! A resource as every stream shares it: encoded once, versioned by a hash of its content.

use std::fmt;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::Resource;
use envoy_types::pb::google::protobuf::{Any, Struct, Value, value::Kind};
use prost::{Message, Name};
use sha2::{Digest, Sha256};

use crate::types;

/// Hex characters of the sha256 kept as the version (64 bits: plenty to tell versions apart).
const VERSION_HEX_LEN: usize = 16;

/// One named resource at one version. Built once per content change and shared by every stream
/// through `Arc`, so a push to many subscribers never re-encodes it.
#[derive(Clone, PartialEq)]
pub struct VersionedResource {
    /// Resource name (cluster name, topic).
    pub name: String,
    /// Type URL of the resource.
    pub type_url: String,
    /// Content hash: equal content, equal version, across restarts too.
    pub version: String,
    /// The encoded resource.
    pub any: Any,
}

impl fmt::Debug for VersionedResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VersionedResource")
            .field("name", &self.name)
            .field("type_url", &self.type_url)
            .field("version", &self.version)
            .field("bytes", &self.any.value.len())
            .finish()
    }
}

impl VersionedResource {
    /// Wraps already encoded bytes; the version is the sha256 of `type_url` and `value`.
    /// Only for encodings that are deterministic (no protobuf maps, or prost `btree_map`s).
    pub fn from_bytes(
        name: impl Into<String>,
        type_url: impl Into<String>,
        value: Vec<u8>,
    ) -> Self {
        let type_url = type_url.into();
        let version = hash_hex(&[type_url.as_bytes(), &value]);
        Self {
            name: name.into(),
            any: Any {
                type_url: type_url.clone(),
                value,
            },
            type_url,
            version,
        }
    }

    /// Encodes a message whose encoding is deterministic (e.g. `pb::TopicRoute`).
    pub fn from_message<M: Message + Name>(name: impl Into<String>, msg: &M) -> Self {
        Self::from_bytes(name, M::type_url(), msg.encode_to_vec())
    }

    /// Encodes a Cluster. Its metadata Structs are hash maps that prost encodes in random order,
    /// so the version hashes a canonical form rather than the bytes.
    pub fn from_cluster(cluster: &Cluster) -> Self {
        let mut stripped = cluster.clone();
        let metadata = stripped.metadata.take();
        let mut canon = stripped.encode_to_vec();
        canonical_metadata(metadata.as_ref(), &mut canon);
        Self::with_canonical(
            &cluster.name,
            types::CLUSTER,
            cluster.encode_to_vec(),
            &canon,
        )
    }

    /// Encodes a ClusterLoadAssignment, hashing its metadata canonically (see `from_cluster`).
    pub fn from_load_assignment(cla: &ClusterLoadAssignment) -> Self {
        let mut stripped = cla.clone();
        let mut metas = Vec::new();
        for locality in &mut stripped.endpoints {
            canonical_metadata(locality.metadata.take().as_ref(), &mut metas);
            for endpoint in &mut locality.lb_endpoints {
                canonical_metadata(endpoint.metadata.take().as_ref(), &mut metas);
            }
        }
        let mut canon = stripped.encode_to_vec();
        canon.extend_from_slice(&metas);
        let value = cla.encode_to_vec();
        Self::with_canonical(
            &cla.cluster_name,
            types::CLUSTER_LOAD_ASSIGNMENT,
            value,
            &canon,
        )
    }

    fn with_canonical(name: &str, type_url: &str, value: Vec<u8>, canon: &[u8]) -> Self {
        Self {
            name: name.to_owned(),
            type_url: type_url.to_owned(),
            version: hash_hex(&[type_url.as_bytes(), canon]),
            any: Any {
                type_url: type_url.to_owned(),
                value,
            },
        }
    }

    /// The delta xDS `Resource` carrying this version.
    pub fn to_resource(&self) -> Resource {
        Resource {
            name: self.name.clone(),
            version: self.version.clone(),
            resource: Some(self.any.clone()),
            ..Default::default()
        }
    }
}

fn hash_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        // Length prefixes keep ("ab","c") and ("a","bc") apart.
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let mut hex = hex::encode(h.finalize());
    hex.truncate(VERSION_HEX_LEN);
    hex
}

/// Appends an order-independent encoding of `metadata` (hash input only, not protobuf).
fn canonical_metadata(metadata: Option<&Metadata>, out: &mut Vec<u8>) {
    let Some(m) = metadata else {
        out.push(0);
        return;
    };
    out.push(1);
    let mut keys: Vec<_> = m.filter_metadata.keys().collect();
    keys.sort();
    put_len(out, keys.len());
    for k in keys {
        put_str(out, k);
        if let Some(s) = m.filter_metadata.get(k) {
            canonical_struct(s, out);
        }
    }
    let mut typed: Vec<_> = m.typed_filter_metadata.iter().collect();
    typed.sort_by(|a, b| a.0.cmp(b.0));
    put_len(out, typed.len());
    for (k, any) in typed {
        put_str(out, k);
        put_str(out, &any.type_url);
        put_len(out, any.value.len());
        out.extend_from_slice(&any.value);
    }
}

fn canonical_struct(s: &Struct, out: &mut Vec<u8>) {
    let mut fields: Vec<_> = s.fields.iter().collect();
    fields.sort_by(|a, b| a.0.cmp(b.0));
    put_len(out, fields.len());
    for (k, v) in fields {
        put_str(out, k);
        canonical_value(v, out);
    }
}

fn canonical_value(v: &Value, out: &mut Vec<u8>) {
    match &v.kind {
        Some(Kind::StructValue(s)) => {
            out.push(b's');
            canonical_struct(s, out);
        }
        Some(Kind::ListValue(l)) => {
            out.push(b'l');
            put_len(out, l.values.len());
            for item in &l.values {
                canonical_value(item, out);
            }
        }
        // Scalars have no maps inside, so prost's encoding is already canonical.
        _ => {
            out.push(b'v');
            let bytes = v.encode_to_vec();
            put_len(out, bytes.len());
            out.extend_from_slice(&bytes);
        }
    }
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u64).to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn meta(pairs: &[(&str, f64)]) -> Metadata {
        let fields = pairs
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    Value {
                        kind: Some(Kind::NumberValue(*v)),
                    },
                )
            })
            .collect::<HashMap<_, _>>();
        Metadata {
            filter_metadata: HashMap::from([("envoy.lb".to_owned(), Struct { fields })]),
            ..Default::default()
        }
    }

    #[test]
    fn cluster_version_ignores_hash_map_order_but_not_content() {
        let pairs: Vec<(String, f64)> = (0..32).map(|i| (format!("k{i}"), f64::from(i))).collect();
        let refs: Vec<(&str, f64)> = pairs.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let mut rev = refs.clone();
        rev.reverse();
        let a = Cluster {
            name: "c".into(),
            metadata: Some(meta(&refs)),
            ..Default::default()
        };
        let b = Cluster {
            name: "c".into(),
            metadata: Some(meta(&rev)),
            ..Default::default()
        };
        assert_eq!(
            VersionedResource::from_cluster(&a).version,
            VersionedResource::from_cluster(&b).version
        );
        let c = Cluster {
            name: "c".into(),
            metadata: Some(meta(&[("k0", 1.0)])),
            ..Default::default()
        };
        assert_ne!(
            VersionedResource::from_cluster(&a).version,
            VersionedResource::from_cluster(&c).version
        );
        let d = Cluster {
            name: "d".into(),
            metadata: Some(meta(&refs)),
            ..Default::default()
        };
        assert_ne!(
            VersionedResource::from_cluster(&a).version,
            VersionedResource::from_cluster(&d).version
        );
    }

    #[test]
    fn message_version_is_a_stable_short_hash() {
        let route = crate::pb::TopicRoute {
            topic: "t".into(),
            cluster: "c".into(),
            ..Default::default()
        };
        let a = VersionedResource::from_message("t", &route);
        let b = VersionedResource::from_message("t", &route.clone());
        assert_eq!(a.version, b.version);
        assert_eq!(a.version.len(), VERSION_HEX_LEN);
        assert_eq!(a.type_url, types::TOPIC_ROUTE);
        let r = a.to_resource();
        assert_eq!(
            (r.name.as_str(), r.version.as_str()),
            ("t", a.version.as_str())
        );
    }
}
