//! `stream-processor`: scores every reading with the model server and writes the scores
//! back to Kafka. Config: defaults < `--config` TOML < `PROCESSOR_*` environment < flags
//! (see `stream_processor::config`).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use stream_processor::config::{Overrides, ProcessorConfig};

// Per reading the processor allocates many small, short-lived buffers (protobuf tensors,
// gRPC frames, Kafka records) across threads; glibc's malloc spent a third of the
// benchmark's CPU in arena locks and chunk consolidation. See docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// `at-least-once` (default) or `exactly-once` (Kafka transactions) (`delivery`).
    #[arg(long)]
    delivery: Option<String>,
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
        kafka_brokers: cli.kafka_brokers,
        model_endpoints: cli.model_endpoints,
        group_id: cli.group_id,
        admin_listen: cli.admin_listen,
        delivery: cli.delivery,
    };
    let config = ProcessorConfig::load(cli.config.as_deref(), std::env::vars(), &overrides)?;
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
    stream_processor::run(config, stream_processor::Listeners { admin }, admin::drain_signal()).await?;
    Ok(())
}
