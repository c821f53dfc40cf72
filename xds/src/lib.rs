//! Delta xDS for rocketmesh: resources and their specs, the per-stream delta protocol state
//! (shared with the sidecar's on-demand client), the resource store, the ADS server and the
//! test-harness state and HTTP API.
pub use envoy_types;

/// Generated code of `proto/rocketmesh/v1/topic_route.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!("pb/rocketmesh.v1.rs");
}

pub mod harness;
pub mod protocol;
pub mod resource;
pub mod server;
pub mod spec;
pub mod store;
pub mod types;

pub use resource::VersionedResource;
