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
//! - [`listeners`]: one listener per upstream broker name, following the route table.
//! - [`pullpop`]: pull and push consumers served by POP/ACK.
//! - [`ondemand`]: routes on demand from an xDS control plane, given up when idle.
//! - [`stats`]: counters and histograms for the admin endpoint.

pub mod config;
pub mod direct;
pub mod dispatch;
pub mod failover;
pub mod listeners;
pub mod ondemand;
pub mod outbox;
pub mod output;
pub mod pullpop;
pub mod relay;
pub mod routes;
pub mod server;
pub mod stats;
pub mod striped;
pub mod topic_cache;
pub mod upstream;
pub mod workers;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tracing::{info, warn};

pub use config::SidecarConfig;
pub use server::{RunningSidecar, start};

use crate::client_registry::ClientRegistry;
use routes::{Endpoint, Routes};
use stats::ProxyStats;
use upstream::{Pool, PoolSettings, Upstreams};

/// Everything the sidecar's connections share.
pub struct Proxy {
    /// The configuration the sidecar started with: listeners, admin and limits come from here.
    pub config: SidecarConfig,
    /// The configuration now in force (routes and clusters change on reload).
    pub current: ArcSwap<SidecarConfig>,
    pub routes: Routes,
    pub upstreams: Upstreams,
    pub clients: ClientRegistry,
    pub stats: ProxyStats,
    /// Balancing state per cluster, kept across route-table swaps.
    pub clusters:
        dashmap::DashMap<String, Arc<failover::ClusterRuntime>, foldhash::fast::RandomState>,
    /// Transaction checks relayed to producers, so their answers find the asking broker.
    pub checks: relay::PendingChecks,
    /// Round-robin cursor for the queue a routed send goes to.
    next_queue: AtomicUsize,
    next_connection: AtomicU64,
    /// Admission of client connections: a total and a per-peer cap.
    gate: std::sync::Arc<crate::inbound::ConnectionGate>,
    /// Bytes of partly received client frames, across every listener.
    read_budget: std::sync::Arc<crate::inbound::BufferBudget>,
    /// Set once shutdown starts: `/ready` turns false and listeners stop accepting.
    pub draining: AtomicBool,
    /// Raised once at shutdown: accept loops and connections stop reading.
    shutdown: watch::Sender<bool>,
    pub broker_listeners: listeners::BrokerListeners,
    /// Pull→POP conversion of consumer groups.
    pub pullpop: pullpop::PullPop,
    /// Routes on demand, when the config has an `xds` section.
    pub ondemand: OnceLock<Arc<ondemand::OnDemand>>,
    /// The threads client connections run on.
    pub workers: workers::Workers,
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
                    per_connection: endpoint.broker_max_in_flight_per_connection,
                    max_parked: endpoint.max_parked,
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

    /// Installs a route table. Broker names it adds get their listeners before any client can see
    /// them in route data; clusters that stay keep their balancing state; brokers that left stop
    /// getting new work, and their connections (client and upstream) drain.
    pub fn install_routes(self: &Arc<Self>, table: routes::RouteTable) {
        self.broker_listeners.open(self, table.broker_names());
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
        let brokers: HashSet<String> = table.broker_names().map(str::to_owned).collect();
        let addresses: HashSet<SocketAddr> = table.all_endpoints().map(|e| e.address).collect();
        self.routes.replace(table);
        self.broker_listeners
            .retain(&brokers.iter().map(String::as_str).collect());
        self.upstreams.retain(&addresses);
    }

    pub fn ondemand(&self) -> Option<&Arc<ondemand::OnDemand>> {
        self.ondemand.get()
    }

    /// Rebuilds the route table from the configuration in force and what xDS holds now (called
    /// by the xDS handler with its state locked, so rebuilds are serialised).
    pub fn install_xds(
        self: &Arc<Self>,
        xds: &routes::XdsRoutes,
    ) -> Result<(), config::ConfigError> {
        let previous = self.routes.snapshot();
        let table = routes::RouteTable::rebuild(&self.current.load(), xds, Some(&previous))?;
        self.install_routes(table);
        Ok(())
    }

    /// Applies a new configuration's routes and clusters (a SIGHUP reload). An invalid
    /// configuration is refused whole and the one in force stays. Listeners, admin, limits,
    /// broker listener placement and the xDS client are read only at start: changes to them are
    /// logged, not applied.
    pub fn reload(self: &Arc<Self>, config: SidecarConfig) -> Result<(), config::ConfigError> {
        let started = &self.config;
        if config.listeners != started.listeners
            || config.admin != started.admin
            || config.limits != started.limits
            || config.broker_listeners != started.broker_listeners
            || config.xds != started.xds
        {
            warn!(
                "listeners, admin, limits, broker_listeners and xds changed: they take effect only at a restart"
            );
        }
        match self.ondemand() {
            Some(ondemand) => ondemand.with_routes(|xds| {
                let table = routes::RouteTable::build(&config, xds)?;
                self.current.store(Arc::new(config.clone()));
                self.install_routes(table);
                Ok::<_, config::ConfigError>(())
            })?,
            None => {
                let table = routes::RouteTable::from_config(&config)?;
                self.install_routes(table);
            }
        }
        info!(
            routes = config.routes.len(),
            clusters = config.clusters.len(),
            "routes reloaded"
        );
        self.current.store(Arc::new(config));
        Ok(())
    }
}
