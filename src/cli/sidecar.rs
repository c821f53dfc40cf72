//! `rocketmesh sidecar`: runs the data plane from a YAML config until SIGTERM or Ctrl-C, then
//! drains gracefully.

use std::path::PathBuf;

use anyhow::Context;
use rocketmesh::proxy::{self, SidecarConfig};
use tracing::info;

#[derive(Debug, clap::Args)]
pub struct SidecarArgs {
    /// YAML config file (see config/sidecar.yaml).
    #[arg(long)]
    pub config: PathBuf,
}

pub fn run(args: &SidecarArgs) -> anyhow::Result<()> {
    let config = SidecarConfig::load(&args.config)?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let sidecar = proxy::start(config).await?;
        for address in &sidecar.listeners {
            info!(%address, "apps may use this address as their nameserver");
        }
        super::signal::shutdown_signal().await;
        info!("shutting down: draining requests in flight");
        sidecar.shutdown().await;
        Ok(())
    })
}
