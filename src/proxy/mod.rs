//! The sidecar data plane (`rocketmesh sidecar`): clients connect to it as their nameserver and
//! broker; it answers route and membership requests itself and carries everything else to the
//! right broker.
//!
//! - [`config`]: the YAML configuration, validated at load.
//! - [`routes`]: the route table, an immutable snapshot swapped at run time.
//! - [`failover`]: each cluster's balancer, retry budget and health checks.
//! - [`upstream`]: multiplexed, pooled broker connections.
//! - [`dispatch`]: what each request code does.
//! - [`relay`]: requests brokers send to clients (transaction checks, membership changes).
//! - [`server`]: listeners, downstream connections, graceful shutdown.
//! - [`stats`]: counters and histograms for the admin endpoint.

pub mod config;
pub mod dispatch;
pub mod failover;
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
    /// Balancing state per cluster, kept across route-table swaps.
    pub clusters: dashmap::DashMap<String, Arc<failover::ClusterRuntime>>,
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

    /// Records the outcome of a request the balancer did not pick with its endpoint's cluster.
    pub fn observe(&self, endpoint: &Endpoint, outcome: crate::balance::Outcome) {
        if let Some(runtime) = self.clusters.get(&endpoint.cluster) {
            runtime.balancer.observe(&endpoint.address, outcome);
        }
    }

    pub fn cluster(&self, name: &str) -> Option<Arc<failover::ClusterRuntime>> {
        self.clusters.get(name).map(|runtime| runtime.clone())
    }

    /// Installs a route table: clusters that stay keep their balancing state.
    pub fn install_routes(&self, table: routes::RouteTable) {
        for cluster in table.clusters() {
            match self.clusters.get(&cluster.name) {
                Some(runtime) => runtime.update(cluster),
                None => {
                    self.clusters.insert(
                        cluster.name.clone(),
                        Arc::new(failover::ClusterRuntime::new(cluster)),
                    );
                }
            }
        }
        let names: Vec<String> = table.clusters().map(|c| c.name.clone()).collect();
        self.clusters.retain(|name, _| names.contains(name));
        self.routes.replace(table);
    }
}
