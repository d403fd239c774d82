//! `vigil`: `vigil up` runs the whole fleet on embedded brokers (or external ones) and
//! shows anomalies live; `vigil rollout ...` steers a running model server's canary
//! rollouts; `vigil replay` re-scores history through a candidate model version on a
//! running stream processor; `vigil model-server|ingest|stream-processor|alerts|device-simulator
//! ...` runs one service with that service's own flags.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vigil::up::UpOptions;

// Each service's binary uses mimalloc for its own reasons (docs/benchmarks.md); here all
// of them share one process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "vigil",
    version,
    about = "Real-time anomaly detection for IoT sensor fleets: MQTT -> Kafka -> TensorFlow model over gRPC -> Kafka"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole fleet in this process: MQTT broker, Kafka (both embedded unless
    /// given), model server on the bundled model, stream processor, alerts, ingest and a
    /// simulated fleet with injected faults; show anomalies and alerts live and a summary
    /// at the end.
    Up(UpArgs),
    /// Canary rollouts on a running model server: start, status, list, set-weight, promote,
    /// abort, watch.
    Rollout(vigil::rollout::RolloutArgs),
    /// Re-score a time range of the readings topic through a candidate model version on a
    /// running stream processor and report how it differs from the live scores (exit 0:
    /// passed, 1: failed, 2: no report).
    Replay(vigil::replay::ReplayArgs),
    /// Write a time range of the readings topic to a JSON-lines file, the format the
    /// simulator's `generate` writes (training data for deploy/models/train_car_anomaly.py).
    ExportReadings(vigil::export::ExportArgs),
    /// The model server (TF Serving's flags; `vigil model-server --help`).
    #[command(disable_help_flag = true)]
    ModelServer(Passed),
    /// Ingest: MQTT -> Kafka (`vigil ingest --help`).
    #[command(disable_help_flag = true)]
    Ingest(Passed),
    /// The stream processor: Kafka -> model server -> Kafka (`vigil stream-processor --help`).
    #[command(disable_help_flag = true)]
    StreamProcessor(Passed),
    /// Windowed alert rules over the scores (`vigil alerts --help`).
    #[command(disable_help_flag = true)]
    Alerts(Passed),
    /// The simulated car fleet (`vigil device-simulator --help`).
    #[command(disable_help_flag = true)]
    DeviceSimulator(Passed),
}

/// A service's own arguments, handed to it unchanged.
#[derive(clap::Args)]
struct Passed {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<OsString>,
}

#[derive(clap::Args)]
struct UpArgs {
    /// How long the fleet publishes, in seconds; 0: until Ctrl-C.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Cars in the simulated fleet.
    #[arg(long, default_value_t = 50)]
    cars: usize,
    /// Share of cars (0-1) that develop a fault during the run.
    #[arg(long, default_value_t = 0.3)]
    fault_share: f64,
    /// The fleet's random seed (same seed, same fleet).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Milliseconds between two readings of a car (also the simulated time step; the
    /// bundled model was trained on 1000).
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Use this Kafka (bootstrap servers) instead of the embedded mock cluster; the run
    /// creates its own topics there (`vigil-up-<time>-*`).
    #[arg(long)]
    kafka_brokers: Option<String>,
    /// Use this MQTT broker (`mqtt://host:port`) instead of the embedded one; the run
    /// publishes under its own topic prefix there.
    #[arg(long)]
    mqtt_url: Option<String>,
    /// Where the cars publish: to an MQTT broker ingest subscribes to, or straight to
    /// ingest's MQTT proxy with no broker at all (docs/mqtt-proxy.md).
    #[arg(long, value_enum, default_value_t = vigil::up::MqttMode::Broker)]
    mqtt: vigil::up::MqttMode,
    /// The model (a directory of numbered SavedModel versions, all served); default: the
    /// bundled one (a path inside the source tree; images set VIGIL_MODEL_DIR).
    #[arg(long, env = "VIGIL_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    /// How the stream processor scores: batched Predict calls to the model server, one
    /// call per reading, or the model embedded in the processor (docs/stream-processor.md).
    #[arg(long, value_enum, default_value_t = vigil::up::Scoring::Batched)]
    scoring: vigil::up::Scoring,
    /// The model server's gRPC port on 127.0.0.1 (TF Serving's, where `vigil rollout`
    /// looks by default); 0 picks a free port.
    #[arg(long, default_value_t = 8500)]
    model_server_port: u16,
    /// The stream processor's gRPC port on 127.0.0.1 (ReplayService, where `vigil replay`
    /// looks by default); 0 picks a free port.
    #[arg(long, default_value_t = 50062)]
    processor_grpc_port: u16,
    /// The alert rules: a TOML file of `[[rules]]` tables, as the alerts service reads
    /// them (docs/alerts.md); default: >= 10 anomalies of a car in 20 s tumbling windows.
    #[arg(long)]
    alert_rules: Option<PathBuf>,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    summary_json: Option<PathBuf>,
    /// No live view: only the summary.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let pass = |name: &str, passed: Passed| std::iter::once(OsString::from(name)).chain(passed.args);
    let result = match cli.command {
        Command::Up(args) => return up(args),
        Command::Rollout(args) => return vigil::rollout::main(args),
        Command::Replay(args) => return vigil::replay::main(args),
        Command::ExportReadings(args) => return vigil::export::main(args),
        Command::ModelServer(passed) => return model_server::cli::main(pass("model-server", passed)),
        Command::Ingest(passed) => ingest::cli::main(pass("ingest", passed)),
        Command::StreamProcessor(passed) => stream_processor::cli::main(pass("stream-processor", passed)),
        Command::Alerts(passed) => alerts::cli::main(pass("alerts", passed)),
        Command::DeviceSimulator(passed) => device_simulator::cli::main(pass("device-simulator", passed)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn up(args: UpArgs) -> ExitCode {
    // The services log warnings only, so the live view stays readable; the embedded
    // rumqttd reports every client disconnect as an error, so it is off (RUST_LOG overrides).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,rumqttd=off".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let alert_rules = match args.alert_rules.as_deref().map(vigil::up::read_alert_rules).transpose() {
        Ok(rules) => rules.unwrap_or_else(vigil::up::demo_alert_rules),
        Err(error) => {
            eprintln!("error: --alert-rules: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let options = UpOptions {
        duration: (args.duration > 0).then(|| Duration::from_secs(args.duration)),
        cars: args.cars,
        seed: args.seed,
        fault_share: args.fault_share,
        interval: Duration::from_millis(args.interval_ms.max(1)),
        kafka_brokers: args.kafka_brokers,
        mqtt_url: args.mqtt_url,
        mqtt: args.mqtt,
        model_dir: args.model_dir.unwrap_or_else(vigil::up::bundled_model),
        scoring: args.scoring,
        model_server_port: args.model_server_port,
        processor_grpc_port: args.processor_grpc_port,
        live: !args.quiet,
        alert_rules,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    // One process, one exporter: the spans' instrumentation scopes say which service.
    let tracing = match runtime.block_on(async { telemetry::Tracing::from_env("vigil") }) {
        Ok(tracing) => tracing,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(vigil::up::up(options, async {
        admin::termination_signal().await;
        println!("\nstopping: the simulator stops first, then the pipeline drains (Ctrl-C again exits at once)");
        tokio::spawn(async {
            admin::termination_signal().await;
            std::process::exit(130);
        });
    }));
    runtime.block_on(tracing.shutdown());
    match result {
        Ok(vigil::up::Finished { summary, .. }) => {
            println!("\n{}", summary.render());
            if let Some(path) = args.summary_json {
                let json = serde_json::to_string_pretty(&summary).unwrap_or_default();
                if let Err(error) = std::fs::write(&path, json + "\n") {
                    eprintln!("error: writing {}: {error}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            if summary.reconciled { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
