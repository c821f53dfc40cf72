//! The `rocketmesh` command.

mod cli;

// glibc malloc spent a fifth of the broker's CPU under load (arena contention and consolidation).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
                eprintln!("rocketmesh bench: {error:#}");
                std::process::ExitCode::from(2)
            }
        },
        Command::Broker(args) => match cli::broker::run(&args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("rocketmesh broker: {error:#}");
                std::process::ExitCode::from(2)
            }
        },
        Command::Sidecar(args) => match cli::sidecar::run(&args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("rocketmesh sidecar: {error:#}");
                std::process::ExitCode::from(2)
            }
        },
        Command::Up(args) => match cli::up::run(&args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("rocketmesh up: {error:#}");
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
                eprintln!("rocketmesh decode: {error:#}");
                std::process::ExitCode::from(2)
            }
        },
    }
}
