//! `rocketmesh up`: the whole path on loopback, from generated configs: two bundled brokers, a
//! control plane that discovers topic routes from them (with a catch-all route, so a topic the
//! brokers do not have yet is created by its first send), and a sidecar that gets every route from
//! the control plane on demand over delta xDS. Prints the address apps should use; Ctrl-C (or
//! SIGTERM) stops everything.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rocketmesh::broker::{BrokerConfig, BrokerState, FlushMode, server};
use rocketmesh::control_plane::{self, ControlPlaneConfig, DiscoveryConfig};
use rocketmesh::proxy;
use rocketmesh::proxy::config::{
    AdminConfig, ClusterConfig, EndpointConfig, EndpointMetadata, Limits, ListenerConfig,
    RouteActionConfig, RouteConfig, RouteMatchConfig, SidecarConfig, TopicMatcher, XdsConfig,
};
use tokio::sync::watch;
use tracing::info;

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Where the brokers keep their data (one directory each).
    #[arg(long, default_value = "/tmp/rocketmesh-up")]
    pub data_dir: PathBuf,
    /// The sidecar's address: what apps use as their nameserver.
    #[arg(long, default_value = "127.0.0.1:9876")]
    pub listen: SocketAddr,
    /// The admin HTTP endpoint.
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin: SocketAddr,
    /// The control plane's delta ADS address (the OS picks a port by default).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub xds_listen: SocketAddr,
    /// The control plane's harness HTTP API (routes, clusters, faults).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub xds_admin: SocketAddr,
    /// Topics no request names for this long are unsubscribed by the sidecar.
    #[arg(long, default_value_t = 600)]
    pub idle_unsubscribe_after_s: u64,
    #[arg(long, value_enum, default_value = "async")]
    pub flush: FlushMode,
}

const BROKERS: [&str; 2] = ["broker-a", "broker-b"];
const CLUSTER: &str = "DefaultCluster";

/// The sidecar config `up` generates: no static route, every route from the control plane.
pub fn sidecar_config(
    listen: SocketAddr,
    admin: SocketAddr,
    xds: SocketAddr,
    idle_unsubscribe_after_s: u64,
) -> SidecarConfig {
    SidecarConfig {
        listeners: vec![ListenerConfig {
            address: listen,
            advertised_address: None,
        }],
        admin: AdminConfig {
            address: Some(admin),
            ..AdminConfig::default()
        },
        limits: Limits::default(),
        route_wait_ms: 0,
        // Each broker gets its own sidecar address (ports the OS picks), so clients that send
        // no `bname` reach the broker they mean.
        broker_listeners: Default::default(),
        routes: Vec::new(),
        clusters: Vec::new(),
        // Pull→POP stays off in `up`: pull consumers see the brokers' queues as they are.
        consume: Default::default(),
        xds: Some(XdsConfig {
            address: xds.to_string(),
            node_id: "rocketmesh-up".into(),
            idle_unsubscribe_after_s,
            ..XdsConfig::default()
        }),
        workers: 0,
        direct_sends: true,
    }
}

/// The control plane `up` generates for brokers at `brokers`: their cluster, an ordered catch-all
/// route to it, and the brokers themselves as nameservers for topics' real queues.
pub fn control_plane_config(
    listen: SocketAddr,
    admin: SocketAddr,
    brokers: &[(String, SocketAddr, i32)],
) -> ControlPlaneConfig {
    ControlPlaneConfig {
        listen,
        admin: Some(admin),
        reload_interval_ms: 0,
        resolve_timeout_ms: 3_000,
        stream_queue_depth: 64,
        max_topics: 1_000_000,
        routes: vec![RouteConfig {
            matcher: RouteMatchConfig {
                topic: TopicMatcher::prefix(""),
                codes: None,
            },
            route: RouteActionConfig {
                cluster: CLUSTER.into(),
                metadata_match: Default::default(),
                // Sends keep the broker and queue the client chose: apps that pick queues
                // (orderly producers, selectors) see their choice kept, as with a plain broker.
                ordered: true,
                consume_mode: None,
            },
        }],
        clusters: vec![ClusterConfig {
            name: CLUSTER.into(),
            connect_timeout_ms: 1_000,
            request_timeout_ms: 5_000,
            pool_size: 2,
            max_in_flight_per_endpoint: 4_096,
            broker_max_in_flight_per_connection:
                rocketmesh::proxy::config::DEFAULT_BROKER_IN_FLIGHT_PER_CONNECTION,
            max_parked_per_endpoint: rocketmesh::proxy::config::DEFAULT_MAX_PARKED_PER_ENDPOINT,
            balancer: Default::default(),
            endpoints: brokers
                .iter()
                .map(|(name, address, queues)| EndpointConfig {
                    address: *address,
                    metadata: EndpointMetadata {
                        broker_name: name.clone(),
                        broker_id: 0,
                        perm: 6,
                        read_queue_num: *queues,
                        write_queue_num: *queues,
                        cluster_name: CLUSTER.into(),
                        zone: None,
                        priority: 0,
                        weight: 100,
                    },
                })
                .collect(),
        }],
        discovery: Some(DiscoveryConfig {
            nameservers: brokers
                .iter()
                .map(|(_, address, _)| address.to_string())
                .collect(),
            refresh_interval_ms: 10_000,
            request_timeout_ms: 3_000,
            max_concurrent_fetches: 16,
            cluster_defaults: None,
        }),
    }
}

pub fn run(args: &UpArgs) -> anyhow::Result<()> {
    let runtime = super::runtime()?;
    runtime.block_on(async move {
        let (stop_brokers, stopped) = watch::channel(false);
        let mut brokers = Vec::new();
        let mut running = Vec::new();
        for name in BROKERS {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .context("cannot listen for a broker")?;
            let address = listener.local_addr()?;
            let config = BrokerConfig {
                listen: address,
                broker_name: name.into(),
                cluster: CLUSTER.into(),
                data_dir: args.data_dir.join(name),
                flush: args.flush,
                ..BrokerConfig::default()
            };
            let queues = config.default_queue_nums;
            let state = Arc::new(
                BrokerState::open(config)
                    .with_context(|| format!("cannot open the store of {name}"))?,
            );
            let mut stop = stopped.clone();
            running.push(tokio::spawn(server::serve(listener, state, async move {
                let _ = stop.wait_for(|stop| *stop).await;
            })));
            brokers.push((name.to_owned(), address, queues));
        }
        let control_plane = control_plane::start(control_plane_config(
            args.xds_listen,
            args.xds_admin,
            &brokers,
        ))
        .await
        .context("cannot start the control plane")?;
        let sidecar = proxy::start(sidecar_config(
            args.listen,
            args.admin,
            control_plane.ads_address,
            args.idle_unsubscribe_after_s,
        ))
        .await?;
        if let Some(ondemand) = sidecar.proxy.ondemand()
            && !ondemand.wait_connected(Duration::from_secs(10)).await
        {
            anyhow::bail!("the sidecar did not connect to the control plane in 10 s");
        }
        let address = sidecar.listeners.first().copied().context("no listener")?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "rocketmesh is up")?;
        writeln!(out, "  nameserver address for apps: {address}")?;
        if let Some(admin) = sidecar.admin {
            writeln!(out, "  admin:                       http://{admin}/stats")?;
            writeln!(
                out,
                "  xDS state:                   http://{admin}/config_dump"
            )?;
        }
        let harness = control_plane
            .admin_address
            .map_or_else(String::new, |admin| {
                format!(", routes at http://{admin}/resources")
            });
        writeln!(
            out,
            "  control plane:               {}{harness}",
            control_plane.ads_address
        )?;
        let listeners = sidecar.proxy.broker_listeners.listening();
        for (name, broker, _) in &brokers {
            let through = listeners
                .iter()
                .find(|listener| listener.broker_name == *name)
                .map_or_else(String::new, |listener| {
                    format!(", through the sidecar at {}", listener.advertised)
                });
            writeln!(
                out,
                "  {name}:                    {broker} (data in {}{through})",
                args.data_dir.join(name).display()
            )?;
        }
        writeln!(out, "Ctrl-C stops everything.")?;
        out.flush()?;
        drop(out);
        super::signal::shutdown_signal().await;
        info!("shutting down");
        sidecar.shutdown().await;
        control_plane.shutdown().await;
        let _ = stop_brokers.send(true);
        for broker in running {
            let _ = broker.await;
        }
        Ok(())
    })
}
