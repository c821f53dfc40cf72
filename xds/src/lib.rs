//! Delta xDS for rocketmesh.
//!
//! - [`types`]: type URLs. [`resource`]: [`VersionedResource`], encoded once, content-hash versions.
//! - [`spec`]: the serde specs (clusters with broker endpoints, topic routes), builders, decoders.
//! - [`protocol`]: per-stream delta state, pure and synchronous; server side and client side.
//! - [`store`]: resources by type and name, change feed, on-demand [`store::Resolver`] hook.
//! - [`client`]: the on-demand delta ADS client (subscribe on demand, release when idle).
//! - [`server`]: the delta ADS / CDS tonic server. [`harness`] and [`admin`]: the test harness
//!   state and its HTTP API.
pub use envoy_types;
pub use tonic;

/// Generated code of `proto/rocketmesh/v1/topic_route.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!("pb/rocketmesh.v1.rs");
}

pub mod admin;
pub mod client;
pub mod harness;
pub mod protocol;
pub mod resource;
pub mod server;
pub mod spec;
pub mod store;
pub mod types;

pub use resource::VersionedResource;
