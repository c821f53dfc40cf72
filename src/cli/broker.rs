//! `rocketmesh broker`: runs the bundled broker until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use rocketmesh::broker::{BrokerConfig, BrokerState, FlushMode, server};
use tracing::info;

#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    /// YAML config file (see config/broker.yaml); flags given here override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Directory for the commit log, indexes and metadata.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Address to advertise in route data (default: the listen address).
    #[arg(long)]
    pub advertised_address: Option<String>,
    #[arg(long)]
    pub broker_name: Option<String>,
    #[arg(long)]
    pub cluster: Option<String>,
    /// When a send is acknowledged: from the page cache (async) or after fsync (sync).
    #[arg(long, value_enum)]
    pub flush: Option<FlushMode>,
}

impl BrokerArgs {
    pub fn to_config(&self) -> anyhow::Result<BrokerConfig> {
        let mut config = match &self.config {
            Some(path) => BrokerConfig::from_yaml_file(path)?,
            None => BrokerConfig::default(),
        };
        if let Some(data_dir) = &self.data_dir {
            config.data_dir = data_dir.clone();
        }
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(address) = &self.advertised_address {
            config.advertised_address = Some(address.clone());
        }
        if let Some(name) = &self.broker_name {
            config.broker_name = name.clone();
        }
        if let Some(cluster) = &self.cluster {
            config.cluster = cluster.clone();
        }
        if let Some(flush) = self.flush {
            config.flush = flush;
        }
        config.validate()?;
        Ok(config)
    }
}

pub fn run(args: &BrokerArgs) -> anyhow::Result<()> {
    let mut config = args.to_config()?;
    let runtime = super::runtime()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let local = listener.local_addr()?;
        // With port 0 the real port is only known now; route data must name it.
        config.listen = local;
        let state = Arc::new(BrokerState::open(config.clone()).context("cannot open the store")?);
        info!(
            listen = %local,
            broker = %config.broker_name,
            cluster = %config.cluster,
            data_dir = %config.data_dir.display(),
            flush = ?config.flush,
            "broker ready; clients may use this address as their nameserver"
        );
        server::serve(listener, state, super::signal::shutdown_signal()).await;
        info!("broker stopped");
        Ok(())
    })
}
