//! The `device-simulator` command line (the `device-simulator` binary and `vigil
//! device-simulator`): publish a simulated fleet over MQTT, or generate readings to a file.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::fleet::{Fleet, FleetOptions};
use crate::metrics::PublishMetrics;
use crate::output::{Format, ReadingWriter};
use crate::publish::{MqttVersion, PublishOptions, Replica, TlsOptions, publish};
use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "device-simulator", version, about = "A fleet of simulated cars publishing labelled sensor readings")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Publishes the fleet's readings over MQTT in real time until the reading count is
    /// reached or Ctrl-C / SIGTERM; prints a JSON report of what was sent and acknowledged.
    Run {
        /// The broker: `mqtt://host[:port]`, or `mqtts://host[:port]` for TLS (port 8883
        /// when left out); a bare `host:port` is `mqtt://`.
        #[arg(long, env = "SIMULATOR_MQTT_URL", default_value = "mqtt://127.0.0.1:1883")]
        mqtt_url: String,
        #[command(flatten)]
        connection: ConnectionArgs,
        #[command(flatten)]
        replicas: ReplicaArgs,
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

/// How each car's connection talks to the broker.
#[derive(clap::Args)]
struct ConnectionArgs {
    /// The MQTT version the cars speak.
    #[arg(long, env = "SIMULATOR_MQTT_VERSION", value_enum, default_value = "5")]
    mqtt_version: MqttVersion,
    /// Log in with this username.
    #[arg(long, env = "SIMULATOR_MQTT_USERNAME")]
    mqtt_username: Option<String>,
    /// The password, read from this file (a mounted Secret); or set SIMULATOR_MQTT_PASSWORD.
    #[arg(long, env = "SIMULATOR_MQTT_PASSWORD_FILE", conflicts_with = "mqtt_password")]
    mqtt_password_file: Option<PathBuf>,
    #[arg(long, env = "SIMULATOR_MQTT_PASSWORD", hide = true)]
    mqtt_password: Option<String>,
    /// With mqtts://: the CA (PEM) the broker's certificate is checked against (default:
    /// the system's roots).
    #[arg(long, env = "SIMULATOR_TLS_CA_FILE")]
    tls_ca_file: Option<PathBuf>,
    /// With mqtts://: the client certificate (PEM) for brokers that require one.
    #[arg(long, env = "SIMULATOR_TLS_CERT_FILE", requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// With mqtts://: the client certificate's PKCS#8 key (PEM).
    #[arg(long, env = "SIMULATOR_TLS_KEY_FILE", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// Share of readings (0-1) sent with a W3C `traceparent` user property, so their traces
    /// start at the device. MQTT 5 only: with 3.1.1 (no user properties) none is traced.
    #[arg(long, env = "SIMULATOR_TRACE_SHARE", default_value_t = 0.01)]
    trace_share: f64,
}

/// Several simulator replicas splitting one fleet.
#[derive(clap::Args)]
struct ReplicaArgs {
    /// How many replicas publish the fleet; each takes the cars whose index modulo this is
    /// its own index.
    #[arg(long, env = "SIMULATOR_REPLICAS", default_value_t = 1)]
    replicas: usize,
    /// This replica's index (0-based). Default: `JOB_COMPLETION_INDEX` (an indexed Job's
    /// pod), else the number ending `HOSTNAME` (a StatefulSet's pod, `name-2`).
    #[arg(long, env = "SIMULATOR_REPLICA_INDEX")]
    replica_index: Option<usize>,
}

impl ReplicaArgs {
    fn replica(&self) -> anyhow::Result<Option<Replica>> {
        anyhow::ensure!(self.replicas > 0, "--replicas must be at least 1");
        if self.replicas == 1 {
            return Ok(None);
        }
        let index = match self.replica_index {
            Some(index) => index,
            None => replica_index_from_env(|name| std::env::var(name).ok()).context(
                "--replicas is over 1 but no --replica-index, JOB_COMPLETION_INDEX or HOSTNAME ending in a number",
            )?,
        };
        anyhow::ensure!(index < self.replicas, "--replica-index {index} is not below --replicas {}", self.replicas);
        Ok(Some(Replica { index, count: self.replicas }))
    }
}

/// An indexed Job's `JOB_COMPLETION_INDEX`, else a StatefulSet pod's ordinal (`HOSTNAME`
/// `simulator-3` is 3).
fn replica_index_from_env(var: impl Fn(&str) -> Option<String>) -> Option<usize> {
    if let Some(index) = var("JOB_COMPLETION_INDEX") {
        return index.trim().parse().ok();
    }
    var("HOSTNAME")?.rsplit_once('-')?.1.parse().ok()
}

impl ConnectionArgs {
    fn apply(&self, tls: bool, options: &mut PublishOptions) -> anyhow::Result<()> {
        anyhow::ensure!((0.0..=1.0).contains(&self.trace_share), "--trace-share must be between 0 and 1");
        options.version = self.mqtt_version;
        options.trace_share = if self.mqtt_version == MqttVersion::V5 { self.trace_share } else { 0.0 };
        let password = match (&self.mqtt_password_file, &self.mqtt_password) {
            (Some(file), _) => Some(
                std::fs::read_to_string(file)
                    .with_context(|| format!("reading the MQTT password from {}", file.display()))?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
            ),
            (None, password) => password.clone(),
        };
        options.credentials = match (&self.mqtt_username, password) {
            (Some(user), password) => Some((user.clone(), password.unwrap_or_default())),
            (None, Some(_)) => anyhow::bail!("an MQTT password is set without --mqtt-username"),
            (None, None) => None,
        };
        let files = [&self.tls_ca_file, &self.tls_cert_file, &self.tls_key_file];
        anyhow::ensure!(tls || files.iter().all(|f| f.is_none()), "TLS files are set but the URL is not mqtts://");
        options.tls = tls.then(|| TlsOptions {
            ca: self.tls_ca_file.clone(),
            client_cert: self.tls_cert_file.clone(),
            client_key: self.tls_key_file.clone(),
        });
        Ok(())
    }
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
        Command::Run {
            mqtt_url,
            connection,
            replicas,
            topic_prefix,
            fleet,
            interval_ms,
            readings,
            cars_per_connection,
            admin_listen,
        } => {
            let url = if mqtt_url.contains("://") { mqtt_url.clone() } else { format!("mqtt://{mqtt_url}") };
            let endpoint = mqtt_client::parse_url(&url)?;
            let mut options = PublishOptions::new(endpoint.host, endpoint.port);
            connection.apply(endpoint.tls, &mut options)?;
            options.replica = replicas.replica()?;
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
                let telemetry = telemetry::Tracing::from_env("vigil-device-simulator")?;
                tracing::info!(cars = fleet.cars, %mqtt_url, replica = ?options.replica, "publishing");
                let report = publish(&fleet, &options, &metrics, shutdown_signal()).await;
                admin_endpoint.stop().await;
                telemetry.shutdown().await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_index_comes_from_an_indexed_job_or_a_stateful_set_pod_name() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
        };
        assert_eq!(replica_index_from_env(env(&[("JOB_COMPLETION_INDEX", "2"), ("HOSTNAME", "sim-7")])), Some(2));
        assert_eq!(replica_index_from_env(env(&[("HOSTNAME", "vigil-device-simulator-7")])), Some(7));
        assert_eq!(replica_index_from_env(env(&[("HOSTNAME", "laptop")])), None);
        assert_eq!(replica_index_from_env(env(&[])), None);
    }
}
