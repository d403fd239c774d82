//! What every ingest test needs: an embedded MQTT broker and Kafka cluster, and ingest
//! itself running in-process against them with its admin endpoint on a loopback port.

#![allow(dead_code, unreachable_pub)] // each test file uses part of it

use std::time::Duration;

use embedded_brokers::{KafkaCluster, MqttBroker, ReadRecord};
use ingest::config::{IngestConfig, MqttProtocol};
use test_support::Endpoint;
use test_support::kafka::read_topic;
use tokio::sync::oneshot;

pub const READINGS: &str = "vigil-readings";
pub const DEAD_LETTERS: &str = "vigil-dead-letter";

pub struct Brokers {
    pub mqtt: MqttBroker,
    pub kafka: KafkaCluster,
}

impl Brokers {
    pub fn start() -> Self {
        init_logs();
        Self { mqtt: MqttBroker::start().unwrap(), kafka: kafka() }
    }

    /// Ingest's config for these brokers (MQTT 5), no gRPC.
    pub fn config(&self, client_id: &str) -> IngestConfig {
        config(&self.kafka, &format!("mqtt://127.0.0.1:{}", self.mqtt.v5.port()), client_id)
    }

    /// Everything in `topic` once `enough` holds (or after `timeout`).
    pub async fn read(
        &self,
        topic: &str,
        timeout: Duration,
        enough: impl Fn(&[ReadRecord]) -> bool + Send + 'static,
    ) -> Vec<ReadRecord> {
        read_topic(&self.kafka, topic, timeout, enough).await
    }
}

/// Logs to the test's output when `RUST_LOG` asks for them (e.g. `RUST_LOG=ingest=debug`).
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A mock Kafka cluster of 3 brokers with the readings (4 partitions) and dead-letter topics.
pub fn kafka() -> KafkaCluster {
    let kafka = KafkaCluster::start(3).unwrap();
    kafka.create_topic(READINGS, 4).unwrap();
    kafka.create_topic(DEAD_LETTERS, 1).unwrap();
    kafka
}

/// Ingest's config for `kafka` and the MQTT broker at `mqtt_url` (MQTT 5), no gRPC.
pub fn config(kafka: &KafkaCluster, mqtt_url: &str, client_id: &str) -> IngestConfig {
    let mut config = IngestConfig::default();
    config.mqtt.url = mqtt_url.to_owned();
    config.mqtt.protocol = MqttProtocol::V5;
    config.mqtt.client_id = client_id.into();
    config.kafka.insert("bootstrap.servers".into(), kafka.bootstrap_servers().into());
    config.grpc.listen.clear();
    config.shutdown_grace_seconds = 10;
    config
}

/// Ingest running in a task.
pub struct RunningIngest {
    pub admin: Endpoint,
    stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<Result<(), ingest::IngestError>>,
}

impl RunningIngest {
    /// Starts ingest and waits until it is subscribed (`/ready`).
    pub async fn start(config: IngestConfig, grpc: Option<tokio::net::TcpListener>) -> Self {
        Self::start_with(config, ingest::Listeners { grpc, ..Default::default() }).await
    }

    /// The same with `listeners` (its admin listener is the test's own).
    pub async fn start_with(config: IngestConfig, mut listeners: ingest::Listeners) -> Self {
        let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = Endpoint::new(admin_listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        listeners.admin = Some(admin_listener);
        let task = tokio::spawn(ingest::run(config, listeners, async {
            let _ = stopped.await;
        }));
        let running = Self { admin, stop: Some(stop), task };
        running.admin.wait_ready("ingest", Duration::from_secs(20)).await;
        running
    }

    /// The value of an unlabelled metric, or the sum of a labelled one.
    pub async fn metric(&self, name: &str) -> f64 {
        self.admin.metric_sum(name).await
    }

    /// Graceful shutdown; returns ingest's result.
    pub async fn stop(mut self) -> Result<(), ingest::IngestError> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.task).await.expect("ingest stops within 30 s").unwrap()
    }

    /// A crash: the task is dropped mid-flight, nothing drained or acknowledged.
    pub async fn crash(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Decoded readings of `records`.
pub fn readings(records: &[ReadRecord]) -> Vec<sensor::SensorReading> {
    use prost::Message as _;
    records.iter().map(|r| sensor::SensorReading::decode(r.payload.as_slice()).expect("a SensorReading")).collect()
}

/// The seed's CSV rows as its publisher sends them: the 18 signals, numbers, `_1_1` names.
fn seed_csv_payloads(path: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    lines
        .map(|line| {
            let values: Vec<&str> = line.split(',').collect();
            let car = values[header.iter().position(|h| *h == "car").unwrap()];
            let fields: Vec<String> = header
                .iter()
                .zip(&values)
                .filter(|(name, _)| !matches!(**name, "time" | "car"))
                .map(|(name, value)| format!("\"{name}\":{value}"))
                .collect();
            (car.to_owned(), format!("{{{}}}", fields.join(",")).into_bytes())
        })
        .collect()
}

/// How far above its resident size before an attack a binary may ever go.
pub const RSS_BOUND_MIB: u64 = 128;

/// (current, peak) resident set size of process `pid` in KiB, from /proc.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in /proc status"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Every payload the seed demo publishes, as (car, payload): its CSV rows as its publisher
/// sends them, then the lines of its JSON file (under the car `car-json`).
pub fn seed_payloads(seed: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut payloads = seed_csv_payloads(&seed.join("car-sensor-data.csv"));
    let json = std::fs::read_to_string(seed.join("cardata-v1.json")).unwrap();
    payloads
        .extend(json.lines().filter(|l| !l.trim().is_empty()).map(|l| ("car-json".to_owned(), l.as_bytes().to_vec())));
    payloads
}
