//! The `ingest` command line (the `ingest` binary and `vigil ingest`). Config: defaults <
//! `--config` TOML < `INGEST_*` environment < flags (see [`crate::config`]).

use std::ffi::OsString;
use std::path::PathBuf;

use crate::config::{IngestConfig, Overrides};
use anyhow::Context as _;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "ingest",
    version,
    about = "Bridges MQTT to Kafka, acknowledging each reading to MQTT once Kafka has it"
)]
struct Cli {
    /// TOML config file.
    #[arg(long, env = "INGEST_CONFIG")]
    config: Option<PathBuf>,
    /// MQTT broker, e.g. mqtt://127.0.0.1:1883 (`mqtt.url`).
    #[arg(long)]
    mqtt_url: Option<String>,
    /// Kafka bootstrap servers (`kafka."bootstrap.servers"`).
    #[arg(long)]
    kafka_brokers: Option<String>,
    /// MQTT client id (`mqtt.client_id`); distinct per replica.
    #[arg(long)]
    client_id: Option<String>,
    /// gRPC IngestService address (`grpc.listen`); empty: not served.
    #[arg(long)]
    grpc_listen: Option<String>,
    /// /live, /ready, /metrics address (`admin_listen`); empty: not served.
    #[arg(long)]
    admin_listen: Option<String>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

/// Parses `args` (the program name first) and runs ingest until a termination signal.
pub fn main(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<()> {
    admin::init_logs();
    let cli = Cli::parse_from(args);
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let overrides = Overrides {
        mqtt_url: cli.mqtt_url,
        kafka_brokers: cli.kafka_brokers,
        grpc_listen: cli.grpc_listen,
        admin_listen: cli.admin_listen,
        client_id: cli.client_id,
    };
    let config = IngestConfig::load(cli.config.as_deref(), std::env::vars(), &overrides)?;
    if cli.print_config {
        print!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    let bind = |address: &str| {
        let address = address.to_owned();
        async move {
            if address.is_empty() {
                return anyhow::Ok(None);
            }
            let listener =
                tokio::net::TcpListener::bind(&address).await.with_context(|| format!("binding {address}"))?;
            anyhow::Ok(Some(listener))
        }
    };
    let listeners =
        crate::Listeners { grpc: bind(&config.grpc.listen).await?, admin: bind(&config.admin_listen).await? };
    let tracing = telemetry::Tracing::from_env("vigil-ingest")?;
    let result = crate::run(config, listeners, admin::drain_signal()).await;
    tracing.shutdown().await;
    result?;
    Ok(())
}
