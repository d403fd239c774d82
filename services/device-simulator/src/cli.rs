//! The `device-simulator` command line (the `device-simulator` binary and `vigil
//! device-simulator`): publish a simulated fleet over MQTT, or generate readings to a file.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::fleet::{Fleet, FleetOptions};
use crate::metrics::PublishMetrics;
use crate::output::{Format, ReadingWriter};
use crate::publish::{PublishOptions, publish};
use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "device-simulator", version, about = "A fleet of simulated cars publishing labelled sensor readings")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publishes the fleet's readings over MQTT in real time until the reading count is
    /// reached or Ctrl-C / SIGTERM; prints a JSON report of what was sent and acknowledged.
    Run {
        /// The broker.
        #[arg(long, env = "SIMULATOR_MQTT_URL", default_value = "mqtt://127.0.0.1:1883")]
        mqtt_url: String,
        /// Topic prefix; each car publishes to `<prefix>/<device-id>`.
        #[arg(long, env = "SIMULATOR_TOPIC_PREFIX", default_value = crate::publish::DEFAULT_TOPIC_PREFIX)]
        topic_prefix: String,
        #[command(flatten)]
        fleet: FleetArgs,
        /// Milliseconds between two readings of one car.
        #[arg(long, env = "SIMULATOR_INTERVAL_MS", default_value_t = 1000)]
        interval_ms: u64,
        /// Stop after this many readings per car (default: run until stopped).
        #[arg(long, env = "SIMULATOR_READINGS")]
        readings: Option<u64>,
        /// Cars sharing one MQTT connection (1: every car is its own client).
        #[arg(long, env = "SIMULATOR_CARS_PER_CONNECTION", default_value_t = 1)]
        cars_per_connection: usize,
        /// Where to serve /live, /ready (every connection up) and /metrics (Prometheus);
        /// empty: not served.
        #[arg(long, env = "SIMULATOR_ADMIN_LISTEN", default_value = "0.0.0.0:9464")]
        admin_listen: String,
    },
    /// Simulates the fleet offline and writes every reading to a file (for training).
    Generate {
        /// Output file (`-` for standard output).
        #[arg(long, default_value = "-")]
        out: String,
        /// File format: JSON Lines (Vigil's MQTT JSON, one reading per line) or CSV.
        #[arg(long, value_enum, default_value_t = Format::Jsonl)]
        format: Format,
        #[command(flatten)]
        fleet: FleetArgs,
        /// Simulated seconds per car.
        #[arg(long, default_value_t = 1800.0)]
        seconds: f64,
        /// Simulated seconds between two readings of a car.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Event time of the first reading's clock (seconds since the Unix epoch).
        #[arg(long, default_value_t = 1_767_225_600)]
        start_epoch_seconds: i64,
    },
}

#[derive(clap::Args)]
struct FleetArgs {
    /// Number of cars.
    #[arg(long, env = "SIMULATOR_CARS", default_value_t = 100)]
    cars: usize,
    /// Seed: the same seed gives the same fleet and readings.
    #[arg(long, env = "SIMULATOR_SEED", default_value_t = 42)]
    seed: u64,
    /// Share of cars (0-1) that develop a fault.
    #[arg(long, env = "SIMULATOR_FAULT_SHARE", default_value_t = 0.1)]
    fault_share: f64,
    /// Earliest fault onset, seconds after a car starts.
    #[arg(long, default_value_t = 60.0)]
    fault_onset_min: f64,
    /// Latest fault onset, seconds after a car starts.
    #[arg(long, default_value_t = 600.0)]
    fault_onset_max: f64,
}

impl FleetArgs {
    fn options(&self) -> anyhow::Result<FleetOptions> {
        anyhow::ensure!((0.0..=1.0).contains(&self.fault_share), "--fault-share must be between 0 and 1");
        anyhow::ensure!(self.fault_onset_min <= self.fault_onset_max, "--fault-onset-min is after --fault-onset-max");
        Ok(FleetOptions {
            cars: self.cars,
            seed: self.seed,
            fault_share: self.fault_share,
            onset_window_s: (self.fault_onset_min, self.fault_onset_max),
            ..FleetOptions::default()
        })
    }
}

/// Parses `args` (the program name first) and runs the command.
pub fn main(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<()> {
    admin::init_logs();
    match Cli::parse_from(args).command {
        Command::Run { mqtt_url, topic_prefix, fleet, interval_ms, readings, cars_per_connection, admin_listen } => {
            let (host, port) = crate::parse_mqtt_url(&mqtt_url).map_err(anyhow::Error::msg)?;
            let mut options = PublishOptions::new(host, port);
            options.topic_prefix = topic_prefix;
            options.interval = std::time::Duration::from_millis(interval_ms);
            options.readings_per_car = readings;
            options.cars_per_connection = cars_per_connection;
            let fleet = fleet.options()?;
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let report = runtime.block_on(async {
                let registry = prometheus::Registry::new();
                let metrics = PublishMetrics::new(&registry)?;
                let readiness = admin::Readiness::new();
                let listener = admin::service::bind_optional(&admin_listen).await?;
                let admin_endpoint = admin::AdminEndpoint::start(listener, registry, readiness.clone());
                // Ready while every connection is up (checked twice a second).
                let connections = metrics.clone();
                tokio::spawn(async move {
                    loop {
                        readiness.set(connections.all_connected());
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                });
                tracing::info!(cars = fleet.cars, %mqtt_url, "publishing");
                let report = publish(&fleet, &options, &metrics, shutdown_signal()).await;
                admin_endpoint.stop().await;
                report
            })?;
            println!(
                "{{\"published\":{},\"acknowledged\":{},\"by_label\":{{{}}}}}",
                report.published,
                report.acknowledged,
                report.by_label.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect::<Vec<_>>().join(",")
            );
            anyhow::ensure!(
                report.acknowledged == report.published,
                "some readings were not acknowledged by the broker"
            );
        }
        Command::Generate { out, format, fleet, seconds, interval, start_epoch_seconds } => {
            anyhow::ensure!(interval > 0.0, "--interval must be positive");
            let mut fleet =
                Fleet::new(&fleet.options()?, prost_types::Timestamp { seconds: start_epoch_seconds, nanos: 0 });
            let sink: Box<dyn std::io::Write> = if out == "-" {
                Box::new(std::io::BufWriter::new(std::io::stdout().lock()))
            } else {
                let path = PathBuf::from(&out);
                Box::new(std::io::BufWriter::new(
                    std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
                ))
            };
            let mut writer = ReadingWriter::new(sink, format)?;
            let steps = (seconds / interval).round() as u64;
            for _ in 0..steps {
                for reading in fleet.step(interval) {
                    writer.write(&reading)?;
                }
            }
            writer.finish()?;
        }
    }
    Ok(())
}

/// Resolves on the first Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    admin::termination_signal().await;
    tracing::info!("stopping: finishing the readings in flight");
}
