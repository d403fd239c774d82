//! The `stream-processor` command line (the `stream-processor` binary and `vigil
//! stream-processor`). Config: defaults < `--config` TOML < `PROCESSOR_*` environment <
//! flags (see [`crate::config`]).

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;

use crate::config::{Overrides, ProcessorConfig};

#[derive(Parser)]
#[command(
    version,
    about = "Scores every reading on the readings topic with the model server, in order, at least once or exactly once"
)]
struct Cli {
    /// TOML config file.
    #[arg(long, env = "PROCESSOR_CONFIG")]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers (`kafka."bootstrap.servers"`).
    #[arg(long)]
    kafka_brokers: Option<String>,
    /// Model server replicas, comma-separated `http://host:port` (`model.endpoints`).
    #[arg(long)]
    model_endpoints: Option<String>,
    /// Consumer group (`group_id`).
    #[arg(long)]
    group_id: Option<String>,
    /// /live, /ready, /metrics address (`admin_listen`); empty: not served.
    #[arg(long)]
    admin_listen: Option<String>,
    /// gRPC ReplayService and health address (`grpc_listen`, default 0.0.0.0:50062); empty:
    /// not served.
    #[arg(long)]
    grpc_listen: Option<String>,
    /// `at-least-once` (default) or `exactly-once` (Kafka transactions) (`delivery`).
    #[arg(long)]
    delivery: Option<String>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

/// Parses `args` (the program name first) and runs the processor until a termination
/// signal.
pub fn main(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<()> {
    admin::init_logs();
    let cli = Cli::parse_from(args);
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let overrides = Overrides {
        kafka_brokers: cli.kafka_brokers,
        model_endpoints: cli.model_endpoints,
        group_id: cli.group_id,
        admin_listen: cli.admin_listen,
        grpc_listen: cli.grpc_listen,
        delivery: cli.delivery,
    };
    let config = ProcessorConfig::load(cli.config.as_deref(), std::env::vars(), &overrides)?;
    if cli.print_config {
        print!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    let admin = bind(&config.admin_listen).await?;
    let grpc = bind(&config.grpc_listen).await?;
    let tracing = telemetry::Tracing::from_env("vigil-stream-processor")?;
    let result = crate::run(config, crate::Listeners { admin, grpc }, admin::drain_signal()).await;
    tracing.shutdown().await;
    result?;
    Ok(())
}

/// Binds `address`; an empty one serves nothing.
async fn bind(address: &str) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    if address.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(address).await.with_context(|| format!("binding {address}"))?;
    Ok(Some(listener))
}
