//! The pipeline's services as an operator runs them: the binaries `cargo test --workspace`
//! built, each its own process, configured only by flags and environment variables and
//! otherwise with their defaults (topics, groups, consumer settings: the defaults are what
//! is under test), their admin ports picked by the OS and read from their logs. A service
//! is restarted from the same [`Launch`], so it comes back exactly as it was started.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use test_support::{ChildService, Endpoint, Output};

/// How long a service may take to start and log its addresses (a debug build, two cores).
const START: Duration = Duration::from_secs(60);

/// The repository's root.
pub(crate) fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A service binary of this workspace. Cargo names only this package's own (`vigil`) for
/// the test; the others are built beside it by `cargo test --workspace`.
fn binary(name: &str) -> PathBuf {
    let directory = Path::new(env!("CARGO_BIN_EXE_vigil")).parent().expect("target/debug");
    let path = directory.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build every binary first (`cargo test --workspace --no-run`, as \
         tests/system/pipeline_faults.sh does)",
        path.display()
    );
    path
}

fn command(binary_name: &str) -> Command {
    let mut command = Command::new(binary(binary_name));
    command.env("RUST_LOG", "info").env("NO_COLOR", "1");
    command
}

/// The effective configuration a service would run with (`--print-config`, TOML): the
/// defaults the test's bounds are computed from.
pub(crate) fn printed_config(binary_name: &str) -> toml::Table {
    let output = command(binary_name).arg("--print-config").output().expect("the service runs");
    assert!(output.status.success(), "{binary_name} --print-config: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).parse().expect("--print-config prints TOML")
}

/// How one of the Kafka services (ingest, stream processor, alerts) is started.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub(crate) name: &'static str,
    binary: &'static str,
    args: Vec<String>,
    /// Environment variables on top of the test's (config the service has no flag for).
    env: Vec<(String, String)>,
    /// The log line (besides the admin endpoint's) naming a gRPC address, if it serves one.
    grpc_marker: Option<&'static str>,
}

impl Launch {
    /// Ingest from `mqtt_url` into `kafka`, with its gRPC `IngestService` on a free port.
    pub(crate) fn ingest(kafka: &str, mqtt_url: &str) -> Self {
        Self {
            name: "ingest",
            binary: "ingest",
            args: args(&["--kafka-brokers", kafka, "--mqtt-url", mqtt_url, "--grpc-listen", "127.0.0.1:0"]),
            env: Vec::new(),
            grpc_marker: Some("serving gRPC IngestService"),
        }
    }

    /// The stream processor scoring through the model server at `model`.
    pub(crate) fn processor(kafka: &str, model: SocketAddr) -> Self {
        let endpoint = format!("http://{model}");
        Self {
            name: "processor",
            binary: "stream-processor",
            args: args(&["--kafka-brokers", kafka, "--model-endpoints", &endpoint, "--grpc-listen", ""]),
            env: Vec::new(),
            grpc_marker: None,
        }
    }

    /// The alerts service with the rules in `config` (its TOML file).
    pub(crate) fn alerts(kafka: &str, config: &Path) -> Self {
        let config = config.to_str().expect("a UTF-8 path");
        Self {
            name: "alerts",
            binary: "alerts",
            args: args(&["--kafka-brokers", kafka, "--config", config]),
            env: Vec::new(),
            grpc_marker: None,
        }
    }

    /// The same launch with environment variable `name` set to `value` as well.
    pub(crate) fn with_env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    pub(crate) fn start(&self) -> Service {
        let mut command = command(self.binary);
        command.args(&self.args).args(["--admin-listen", "127.0.0.1:0"]).envs(self.env.iter().cloned());
        let started_at = SystemTime::now();
        let mut process = ChildService::spawn(self.name, command, Output::Stderr);
        let (admin, grpc) = match self.grpc_marker {
            Some(marker) => {
                let [admin, grpc] = process.logged_addresses(["serving /live", marker], START);
                (admin, Some(grpc))
            }
            None => (process.logged_address("serving /live", START), None),
        };
        Service { process, admin: Endpoint::new(admin), grpc, started_at }
    }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|arg| (*arg).to_owned()).collect()
}

/// A running Kafka service.
pub(crate) struct Service {
    process: ChildService,
    pub(crate) admin: Endpoint,
    pub(crate) grpc: Option<SocketAddr>,
    /// When its process was started.
    pub(crate) started_at: SystemTime,
}

impl Service {
    /// A crash: SIGKILL (no drain, no commit, no MQTT DISCONNECT, no group leave).
    pub(crate) fn kill(self) -> SystemTime {
        self.process.kill();
        SystemTime::now()
    }

    /// A graceful stop, as Kubernetes asks for one: SIGTERM, then its exit (within `within`).
    pub(crate) fn terminate(self, within: Duration) -> std::process::ExitStatus {
        self.process.terminate(within)
    }

    pub(crate) async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        test_support::metric_total(&self.admin.metrics().await, name, labels)
    }
}

/// The model server serving the bundled model (`deploy/models/car-anomaly`, every request
/// answered by its newest version), as `vigil up` serves it.
pub(crate) struct ModelServer {
    process: ChildService,
    pub(crate) grpc: SocketAddr,
    pub(crate) rest: Endpoint,
    pub(crate) started_at: SystemTime,
}

impl ModelServer {
    /// On gRPC `port` (0: a free one). A restart takes the port its predecessor had: the
    /// processor was told that address. (Not a bind-then-release race: the port was held
    /// by the killed server until the kernel closed it.)
    pub(crate) fn start(port: u16) -> Self {
        let base = repository().join("deploy/models/car-anomaly");
        let mut command = command("model-server");
        command
            .arg(format!("--port={port}"))
            .args(["--bind_address=127.0.0.1", "--rest_api_address=127.0.0.1:0", "--model_name=car-anomaly"])
            .arg(format!("--model_base_path={}", base.display()));
        let started_at = SystemTime::now();
        let mut process = ChildService::spawn("model-server", command, Output::Stdout);
        // Its first two lines, as TF Serving prints them.
        let mut address = |prefix: &str| -> SocketAddr {
            let line = process.next_line(START);
            line.strip_prefix(prefix).and_then(|a| a.trim().parse().ok()).unwrap_or_else(|| panic!("{line:?}"))
        };
        let grpc = address("Running gRPC ModelServer at ");
        let rest = Endpoint::new(address("Exporting HTTP/REST API at "));
        Self { process, grpc, rest, started_at }
    }

    pub(crate) fn kill(self) -> SystemTime {
        self.process.kill();
        SystemTime::now()
    }
}

/// The simulated fleet: `cars` cars, each its own MQTT client, publishing `readings` QoS 1
/// readings every `interval`, a share of them developing faults early in the run.
pub(crate) struct Simulator {
    process: ChildService,
}

/// What the simulator reports at its end (its JSON line).
#[derive(Debug, serde::Deserialize)]
pub(crate) struct SimulatorReport {
    pub(crate) published: u64,
    pub(crate) acknowledged: u64,
}

impl Simulator {
    pub(crate) fn start(
        mqtt_url: &str,
        fleet: &device_simulator::fleet::FleetOptions,
        readings: u64,
        interval: Duration,
    ) -> Self {
        let mut command = command("device-simulator");
        command.arg("run").args(["--mqtt-url", mqtt_url, "--admin-listen", "127.0.0.1:0"]).args([
            format!("--cars={}", fleet.cars),
            format!("--seed={}", fleet.seed),
            format!("--fault-share={}", fleet.fault_share),
            format!("--fault-onset-min={}", fleet.onset_window_s.0),
            format!("--fault-onset-max={}", fleet.onset_window_s.1),
            format!("--readings={readings}"),
            format!("--interval-ms={}", interval.as_millis()),
        ]);
        // Its report is the JSON line on stdout; its log goes to the test's stderr.
        Self { process: ChildService::spawn("simulator", command, Output::Stdout) }
    }

    /// Waits for the fleet to finish (every reading sent and its acknowledgement awaited)
    /// and returns its report.
    pub(crate) fn finish(mut self, within: Duration) -> SimulatorReport {
        let status = self.process.wait_exit(within);
        let line = self.process.seen().iter().rev().find(|line| line.starts_with('{')).cloned();
        let line = line.unwrap_or_else(|| panic!("the simulator printed no report (exit {status})"));
        let report: SimulatorReport = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(status.success(), "the simulator failed ({status}): {report:?}");
        report
    }
}
