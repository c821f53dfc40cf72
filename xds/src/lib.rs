//! Delta xDS for rocketmesh.
pub use envoy_types;
