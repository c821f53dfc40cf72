//! `rocketmesh control-plane`: serves topic routes, clusters and endpoints over delta ADS from a
//! YAML file and route discovery, with the harness HTTP API; `validate FILE` checks a file only.
//! The file is re-read when its content changes (polled) and on SIGHUP; an invalid file is logged
//! and the state in force stays.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use rocketmesh::control_plane::{self, ControlPlaneConfig, RunningControlPlane};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ControlPlaneArgs {
    #[command(subcommand)]
    pub action: Option<Action>,
    /// YAML config file (see config/control-plane.yaml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Delta ADS address, instead of the file's `listen` (port 0: the OS picks one).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Harness API address instead of the file's `admin`; `off` turns it off.
    #[arg(long)]
    pub admin: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Check a config file and print a summary; serve nothing.
    Validate {
        /// The YAML file to check.
        file: PathBuf,
    },
}

pub fn run(args: &ControlPlaneArgs) -> anyhow::Result<()> {
    if let Some(Action::Validate { file }) = &args.action {
        let config = ControlPlaneConfig::load(file)?;
        println!(
            "{}: valid ({} routes, {} clusters, discovery {})",
            file.display(),
            config.routes.len(),
            config.clusters.len(),
            match &config.discovery {
                Some(discovery) => format!("from {}", discovery.nameservers.join(", ")),
                None => "off".to_owned(),
            }
        );
        return Ok(());
    }
    let Some(path) = args.config.clone() else {
        bail!("give --config FILE (or `validate FILE`)");
    };
    let mut config = ControlPlaneConfig::load(&path)?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(admin) = &args.admin {
        config.admin = match admin.as_str() {
            "off" => None,
            address => Some(
                address
                    .parse()
                    .with_context(|| format!("--admin {address:?} is not ip:port or off"))?,
            ),
        };
    }
    let runtime = super::runtime()?;
    runtime.block_on(async move {
        let mut hangups = signal(SignalKind::hangup()).context("cannot watch for SIGHUP")?;
        let reload_every = Duration::from_millis(config.reload_interval_ms);
        let running = control_plane::start(config).await?;
        let mut seen = std::fs::read(&path).ok();
        let mut polls = tokio::time::interval(reload_every.max(Duration::from_millis(50)));
        polls.tick().await;
        let stop = super::signal::shutdown_signal();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                _ = hangups.recv() => {
                    info!(config = %path.display(), "SIGHUP: reloading");
                    reload(&running, &path).await;
                }
                _ = polls.tick(), if !reload_every.is_zero() => {
                    let now = std::fs::read(&path).ok();
                    if now.is_some() && now != seen {
                        seen = now;
                        info!(config = %path.display(), "the config file changed: reloading");
                        reload(&running, &path).await;
                    }
                }
            }
        }
        info!("control plane shutting down");
        running.shutdown().await;
        Ok(())
    })
}

async fn reload(running: &RunningControlPlane, path: &Path) {
    let applied = match ControlPlaneConfig::load(path) {
        Ok(config) => running.reload(&config).await.map_err(anyhow::Error::from),
        Err(error) => Err(error.into()),
    };
    if let Err(error) = applied {
        error!(%error, "configuration not reloaded; the state in force stays");
    }
}
