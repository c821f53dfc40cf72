//! The sidecar data plane (`rocketmesh sidecar`): clients connect to it as their nameserver and
//! broker; it answers route and membership requests itself and carries everything else to the
//! right broker.
//!
//! - [`config`]: the YAML configuration, validated at load.
//! - [`routes`]: the route table, an immutable snapshot swapped at run time.
//! - [`pick`]: which endpoint serves a send or a pop.
//! - [`upstream`]: multiplexed, pooled broker connections.
//! - [`dispatch`]: what each request code does.
//! - [`relay`]: requests brokers send to clients (transaction checks, membership changes).
//! - [`server`]: listeners, downstream connections, graceful shutdown.
//! - [`stats`]: counters and histograms for the admin endpoint.

pub mod config;
pub mod dispatch;
pub mod pick;
pub mod relay;
pub mod routes;
pub mod server;
pub mod stats;
pub mod upstream;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};

pub use config::SidecarConfig;
pub use server::{RunningSidecar, start};

use crate::client_registry::ClientRegistry;
use routes::{Endpoint, Routes};
use stats::ProxyStats;
use upstream::{Pool, PoolSettings, Upstreams};

/// Everything the sidecar's connections share.
pub struct Proxy {
    pub config: SidecarConfig,
    pub routes: Routes,
    pub upstreams: Upstreams,
    pub clients: ClientRegistry,
    pub stats: ProxyStats,
    pub picker: pick::WeightedPicker,
    /// Transaction checks relayed to producers, so their answers find the asking broker.
    pub checks: relay::PendingChecks,
    /// Round-robin cursor for the queue a routed send goes to.
    next_queue: AtomicUsize,
    /// Set once shutdown starts: `/ready` turns false and listeners stop accepting.
    pub draining: AtomicBool,
}

impl Proxy {
    /// The connection pool of an endpoint.
    pub fn pool(&self, endpoint: &Endpoint) -> Arc<Pool> {
        self.upstreams.pool(endpoint.address, || {
            (
                PoolSettings {
                    connect_timeout: endpoint.connect_timeout,
                    pool_size: endpoint.pool_size,
                    max_in_flight: endpoint.max_in_flight,
                    max_frame: self.config.limits.max_frame_size,
                },
                self.stats.host(
                    &endpoint.cluster,
                    &endpoint.metadata.broker_name,
                    endpoint.address,
                ),
            )
        })
    }

    /// Whether an endpoint is usable now (not in reconnect backoff).
    pub fn healthy(&self, endpoint: &Endpoint) -> bool {
        self.upstreams
            .existing(endpoint.address)
            .is_none_or(|pool| pool.healthy())
    }
}
