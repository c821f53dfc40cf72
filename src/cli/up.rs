//! `rocketmesh up`: two bundled brokers and a sidecar in front of them, all on loopback, from a
//! generated config. Prints the address apps should use; Ctrl-C (or SIGTERM) stops everything.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use rocketmesh::broker::{BrokerConfig, BrokerState, FlushMode, server};
use rocketmesh::proxy;
use rocketmesh::proxy::config::{
    AdminConfig, ClusterConfig, EndpointConfig, EndpointMetadata, Limits, ListenerConfig,
    RouteActionConfig, RouteConfig, RouteMatchConfig, SidecarConfig, TopicMatcher,
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
    #[arg(long, value_enum, default_value = "async")]
    pub flush: FlushMode,
}

const BROKERS: [&str; 2] = ["broker-a", "broker-b"];
const CLUSTER: &str = "DefaultCluster";

/// The sidecar config `up` generates for brokers at `brokers`.
pub fn sidecar_config(
    listen: SocketAddr,
    admin: SocketAddr,
    brokers: &[(String, SocketAddr, i32)],
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
        routes: vec![RouteConfig {
            matcher: RouteMatchConfig {
                topic: TopicMatcher::prefix(""),
                codes: None,
            },
            route: RouteActionConfig {
                cluster: "local".into(),
                metadata_match: Default::default(),
                ordered: false,
                consume_mode: None,
            },
        }],
        clusters: vec![ClusterConfig {
            name: "local".into(),
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
        // Pull→POP stays off in `up` until it passes its acceptance runs (issue 12).
        consume: Default::default(),
    }
}

pub fn run(args: &UpArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
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
        let sidecar = proxy::start(sidecar_config(args.listen, args.admin, &brokers)).await?;
        let address = sidecar.listeners.first().copied().context("no listener")?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "rocketmesh is up")?;
        writeln!(out, "  nameserver address for apps: {address}")?;
        if let Some(admin) = sidecar.admin {
            writeln!(out, "  admin:                       http://{admin}/stats")?;
        }
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
        let _ = stop_brokers.send(true);
        for broker in running {
            let _ = broker.await;
        }
        Ok(())
    })
}
