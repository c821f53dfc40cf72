//! `rocketmesh sidecar`: runs the data plane from a YAML config until SIGTERM or Ctrl-C, then
//! drains gracefully. SIGHUP reloads the routes and clusters from the same file.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rocketmesh::proxy::{self, SidecarConfig};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

#[derive(Debug, clap::Args)]
pub struct SidecarArgs {
    /// YAML config file (see config/sidecar.yaml).
    #[arg(long)]
    pub config: PathBuf,
}

pub fn run(args: &SidecarArgs) -> anyhow::Result<()> {
    let config = SidecarConfig::load(&args.config)?;
    let runtime = super::runtime()?;
    runtime.block_on(async move {
        let mut reloads = signal(SignalKind::hangup()).context("cannot watch for SIGHUP")?;
        let sidecar = proxy::start(config).await?;
        for address in &sidecar.listeners {
            info!(%address, "apps may use this address as their nameserver");
        }
        let stop = super::signal::shutdown_signal();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                _ = reloads.recv() => reload(&sidecar, &args.config),
            }
        }
        info!("shutting down: draining requests in flight");
        sidecar.shutdown().await;
        Ok(())
    })
}

/// SIGHUP: reads the config file again and applies its routes and clusters; an invalid file is
/// logged and the configuration in force stays.
fn reload(sidecar: &proxy::RunningSidecar, path: &Path) {
    info!(config = %path.display(), "SIGHUP: reloading the configuration");
    let applied = SidecarConfig::load(path).and_then(|config| sidecar.proxy.reload(config));
    if let Err(error) = applied {
        error!(%error, "configuration not reloaded; the one in force stays");
    }
}
