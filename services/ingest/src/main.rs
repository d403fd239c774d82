//! `ingest`: the MQTT -> Kafka bridge. Config: defaults < `--config` TOML < `INGEST_*`
//! environment < flags (see `ingest::config`).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use ingest::config::{IngestConfig, Overrides};

#[derive(Parser)]
#[command(version, about = "Bridges MQTT to Kafka, acknowledging each reading to MQTT once Kafka has it")]
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
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
        ingest::Listeners { grpc: bind(&config.grpc.listen).await?, admin: bind(&config.admin_listen).await? };
    ingest::run(config, listeners, admin::drain_signal()).await?;
    Ok(())
}
