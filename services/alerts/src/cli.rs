//! `alerts`: flags over `ALERTS_*` variables over the TOML file over defaults.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;

use crate::config::{AlertsConfig, Overrides};

#[derive(Parser)]
#[command(
    name = "alerts",
    version,
    about = "Windowed alert rules over the scores topic: one alert per device, rule and window"
)]
struct Cli {
    /// TOML configuration file (rules, topics, Kafka properties).
    #[arg(long, env = "ALERTS_CONFIG")]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers (`kafka."bootstrap.servers"`).
    #[arg(long)]
    kafka_brokers: Option<String>,
    /// The consumer group (`group_id`).
    #[arg(long)]
    group_id: Option<String>,
    /// /live, /ready, /metrics address (`admin_listen`); empty: not served.
    #[arg(long)]
    admin_listen: Option<String>,
    /// Print the resulting configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

/// Parses `args` (the program name first) and runs until a termination signal.
pub fn main(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<()> {
    admin::init_logs();
    let cli = Cli::parse_from(args);
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let overrides =
        Overrides { kafka_brokers: cli.kafka_brokers, group_id: cli.group_id, admin_listen: cli.admin_listen };
    let config = AlertsConfig::load(cli.config.as_deref(), std::env::vars(), &overrides)?;
    if cli.print_config {
        print!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    let admin = if config.admin_listen.is_empty() {
        None
    } else {
        let listener = tokio::net::TcpListener::bind(&config.admin_listen)
            .await
            .with_context(|| format!("binding {}", config.admin_listen))?;
        Some(listener)
    };
    crate::run(config, crate::Listeners { admin }, admin::termination_signal()).await
}
