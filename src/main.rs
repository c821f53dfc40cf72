//! The `rocketmesh` command.

mod cli;

// glibc malloc spent a fifth of the broker's CPU under load (arena contention and consolidation).
// Built without transparent huge pages (`no_thp`): with them every arena region a sidecar touched
// became 2 MiB of RSS, doubling its footprint at rest and keeping it after its topics went idle.
// The `system-allocator` feature keeps the system's, for heap profilers (heaptrack) that hook malloc.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Hands this thread's free heap pages back to the OS; runs on a worker as it parks, after the
/// sidecar freed state in bulk (`rocketmesh::memory`).
fn release_free_memory() {
    // SAFETY: `mi_collect` takes no pointers; it walks the calling thread's own heap.
    #[cfg(not(feature = "system-allocator"))]
    unsafe {
        libmimalloc_sys::mi_collect(true)
    }
}

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "rocketmesh",
    version,
    about = "A service-mesh sidecar and toolkit for Apache RocketMQ"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Produce or consume load against a broker or sidecar and report throughput and latency.
    Bench(cli::bench::BenchArgs),
    /// Run the bundled RocketMQ-compatible broker.
    Broker(cli::broker::BrokerArgs),
    /// Serve topic routes, clusters and endpoints over delta xDS (ADS), with a harness API.
    ControlPlane(cli::control_plane::ControlPlaneArgs),
    /// Decode a raw remoting byte stream (a TCP capture) into one JSON object per frame.
    Decode(cli::decode::DecodeArgs),
    /// Run the sidecar data plane from a YAML config.
    Sidecar(cli::sidecar::SidecarArgs),
    /// Start two bundled brokers and a sidecar on loopback; print the address apps should use.
    Up(cli::up::UpArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Bench(args) => match cli::bench::run(&args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("rocketmesh bench: {}", describe(&error));
                std::process::ExitCode::from(2)
            }
        },
        Command::Broker(args) => match cli::broker::run(&args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("rocketmesh broker: {}", describe(&error));
                std::process::ExitCode::from(2)
            }
        },
        Command::ControlPlane(args) => match cli::control_plane::run(&args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("rocketmesh control-plane: {}", describe(&error));
                std::process::ExitCode::from(2)
            }
        },
        Command::Sidecar(args) => match cli::sidecar::run(&args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("rocketmesh sidecar: {}", describe(&error));
                std::process::ExitCode::from(2)
            }
        },
        Command::Up(args) => match cli::up::run(&args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("rocketmesh up: {}", describe(&error));
                std::process::ExitCode::from(2)
            }
        },
        Command::Decode(args) => match cli::decode::run(&args) {
            Ok(summary) => {
                eprintln!(
                    "decoded {} frames, {} errors",
                    summary.frames, summary.errors
                );
                if summary.errors == 0 {
                    std::process::ExitCode::SUCCESS
                } else {
                    std::process::ExitCode::from(1)
                }
            }
            Err(error) => {
                eprintln!("rocketmesh decode: {}", describe(&error));
                std::process::ExitCode::from(2)
            }
        },
    }
}

/// An error and its causes on one line. Library errors often already include their cause's text in
/// their own message (`cannot read x: No such file`); a cause is printed only when it adds
/// something, so no text appears twice.
fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[derive(Debug, thiserror::Error)]
    #[error("invalid config: {0}")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let error = anyhow::Error::new(Outer(std::io::Error::other("bad type at line 3")))
            .context("loading sidecar.yaml");
        assert_eq!(
            describe(&error),
            "loading sidecar.yaml: invalid config: bad type at line 3"
        );
    }
}
