//! In-process Kafka (librdkafka's mock cluster), real model servers on the bundled model,
//! readings produced the way ingest writes them, and the processor itself.
#![allow(dead_code, unreachable_pub, unused_macros)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use device_simulator::fleet::{Fleet, FleetOptions};
use embedded_brokers::{KafkaCluster, ReadRecord};
use prost::Message as _;
use proto::vigil::scoring::v1::Score;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sensor::SensorReading;
use stream_processor::config::ProcessorConfig;
use test_support::Endpoint;
use test_support::kafka::{Bootstrap, produce, producer, read_topic};
use tokio::sync::oneshot;

pub const READINGS: &str = "vigil-readings";
pub const SCORES: &str = "vigil-scores";
pub const ANOMALIES: &str = "vigil-anomalies";
pub const DEAD_LETTERS: &str = "vigil-scoring-dead-letter";
pub const PARTITIONS: i32 = 4;

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A mock cluster with the processor's topics.
pub fn kafka() -> KafkaCluster {
    init_logs();
    let kafka = KafkaCluster::start(1).unwrap();
    for topic in [READINGS, SCORES, ANOMALIES] {
        kafka.create_topic(topic, PARTITIONS).unwrap();
    }
    kafka.create_topic(DEAD_LETTERS, 1).unwrap();
    kafka
}

/// The processor's config for `kafka` (the mock cluster, or an external broker for what
/// the mock cannot do) and these model server addresses.
pub fn config(kafka: &impl Bootstrap, model_servers: &[SocketAddr]) -> ProcessorConfig {
    let mut config = ProcessorConfig::default();
    config.kafka.insert("bootstrap.servers".into(), kafka.bootstrap_servers().into());
    // Quick group joins and departures on the mock cluster.
    config.consumer.insert("session.timeout.ms".into(), "6000".into());
    config.consumer.insert("heartbeat.interval.ms".into(), "500".into());
    config.model.endpoints = model_servers.iter().map(|a| format!("http://{a}")).collect();
    config.model.backoff_max_ms = 500;
    config.model.eject_ms = 200;
    config.max_in_flight_per_partition = 32;
    config.admin_listen.clear();
    config
}

/// How the processor calls the model server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Calls {
    /// Readings that queue while calls are out go together (the default).
    Batched,
    /// One Predict per reading (`model.max_rows_per_call = 1`).
    PerReading,
}

impl Calls {
    pub fn apply(self, config: &mut ProcessorConfig) {
        config.model.max_rows_per_call = match self {
            Calls::Batched => ProcessorConfig::default().model.max_rows_per_call,
            Calls::PerReading => 1,
        };
    }
}

/// The bundled model's directory (versions 1 and 2).
pub fn bundled_model_dir() -> PathBuf {
    root().join("deploy/models/car-anomaly")
}

/// Makes the processor score in-process, from `model_dir`, instead of calling a model server.
pub fn embedded(config: &mut ProcessorConfig, model_dir: &Path) {
    config.model.mode = stream_processor::config::ModelMode::Embedded;
    config.model.model_dir = Some(model_dir.to_owned());
    config.model.endpoints.clear();
}

/// How a test's processor scores: through a model server started for the test, or
/// embedded, running the bundled model itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    ModelServer,
    Embedded,
}

impl Scoring {
    /// A mock Kafka cluster with the processor's topics, the processor's config for it,
    /// scoring this way, and the model server it calls (none when embedded).
    pub async fn setup(self) -> (KafkaCluster, ProcessorConfig, Option<ModelServer>) {
        let kafka = kafka();
        match self {
            Scoring::ModelServer => {
                let server = ModelServer::start(&[]).await;
                let config = config(&kafka, &[server.grpc]);
                (kafka, config, Some(server))
            }
            Scoring::Embedded => {
                let mut config = config(&kafka, &[]);
                embedded(&mut config, &bundled_model_dir());
                (kafka, config, None)
            }
        }
    }
}

/// Two tests of `$run(Scoring)`: `$through_server` scoring through a model server,
/// `$embedded` embedded.
macro_rules! test_both_scorings {
    ($run:ident: $through_server:ident, $embedded:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $through_server() {
            $run(Scoring::ModelServer).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $embedded() {
            $run(Scoring::Embedded).await;
        }
    };
}
#[allow(unused_imports)] // Not every suite has paired tests.
pub(crate) use test_both_scorings;

#[derive(Parser)]
struct ServeCli {
    #[command(flatten)]
    serve: model_server::config::ServeArgs,
}

/// A model server in this process, serving the bundled `car-anomaly` model.
pub struct ModelServer {
    pub grpc: SocketAddr,
    pub rest: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl ModelServer {
    /// `extra` flags after the model; e.g. a version policy.
    pub async fn start(extra: &[&str]) -> Self {
        let base = root().join("deploy/models/car-anomaly");
        let base = base.to_str().unwrap().to_owned();
        let mut flags = vec!["model-server", "--model_name", "car-anomaly", "--model_base_path", &base];
        flags.extend_from_slice(extra);
        let config = ServeCli::try_parse_from(flags).unwrap().serve.resolve().unwrap();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let rest = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc_addr, rest_addr) = (grpc.local_addr().unwrap(), rest.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let listeners = model_server::server::Listeners { grpc, rest: Some(rest) };
        let task = tokio::spawn(model_server::server::run(config, listeners, async {
            let _ = stopped.await;
        }));
        Self { grpc: grpc_addr, rest: rest_addr, stop: Some(stop), task }
    }

    /// gRPC Predict calls this server answered.
    pub async fn predictions(&self) -> f64 {
        let text = Endpoint::new(self.rest).metrics().await;
        test_support::metric_total(&text, "model_server_requests_total", &[("api", "grpc_predict")])
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

/// A model config serving car-anomaly 1 and 2 (bundled) and 3, a copy of v1 whose scores
/// are all raised over the threshold (tests/fixtures/savedmodels/car_anomaly_flags_everything):
/// a candidate that flags every reading. Returns the model server's flag.
pub fn three_versions(dir: &Path) -> String {
    let base = dir.join("car-anomaly");
    let copy = |from: &Path, version: &str| {
        let status = std::process::Command::new("cp").arg("-r").arg(from).arg(base.join(version)).status().unwrap();
        assert!(status.success());
    };
    std::fs::create_dir_all(&base).unwrap();
    copy(&root().join("deploy/models/car-anomaly/1"), "1");
    copy(&root().join("deploy/models/car-anomaly/2"), "2");
    copy(&root().join("tests/fixtures/savedmodels/car_anomaly_flags_everything/1"), "3");
    let config = dir.join("models.config");
    std::fs::write(&config, model_server::model_config::all_versions_config("car-anomaly", &base).unwrap()).unwrap();
    format!("--model_config_file={}", config.display())
}

/// A start time for simulated readings: two hours ago is within every service's default
/// event-time bounds of now (a day back, five minutes ahead), and of the Kafka timestamps
/// the replay tests backdate their readings to (an hour at most).
pub fn two_hours_ago() -> prost_types::Timestamp {
    (std::time::SystemTime::now() - Duration::from_secs(2 * 3600)).into()
}

/// A simulated fleet's readings, `per_car` from each of `cars` cars, in time order.
pub fn fleet_readings(cars: usize, per_car: usize, seed: u64) -> Vec<SensorReading> {
    let options = FleetOptions { cars, seed, fault_share: 0.3, onset_window_s: (5.0, 60.0), ..Default::default() };
    let mut fleet = Fleet::new(&options, two_hours_ago());
    (0..per_car).flat_map(|_| fleet.step(1.0)).collect()
}

/// Writes readings to the readings topic as ingest does: protobuf, keyed by device id.
pub async fn produce_readings(kafka: &impl Bootstrap, readings: &[SensorReading]) {
    write_readings(&producer(kafka), READINGS, readings.iter().map(|reading| (reading, None))).await;
}

/// Writes readings as [`produce_readings`] does, each with the given Kafka timestamp
/// (milliseconds since the epoch), in order.
pub async fn produce_readings_at(kafka: &impl Bootstrap, readings: &[(SensorReading, i64)]) {
    write_readings(&producer(kafka), READINGS, readings.iter().map(|(reading, at)| (reading, Some(*at)))).await;
}

/// Writes readings to `topic` through `producer` as ingest does (protobuf, keyed by device
/// id), each with its Kafka timestamp when given, and waits until Kafka has them all.
pub async fn write_readings<'r>(
    producer: &FutureProducer,
    topic: &str,
    readings: impl IntoIterator<Item = (&'r SensorReading, Option<i64>)>,
) {
    let encoded: Vec<(&str, Vec<u8>, Option<i64>)> =
        readings.into_iter().map(|(reading, at)| (reading.device_id.as_str(), reading.encode_to_vec(), at)).collect();
    let records = encoded
        .iter()
        .map(|(device, payload, at)| {
            let record = FutureRecord::to(topic).key(*device).payload(payload);
            match at {
                Some(at) => record.timestamp(*at),
                None => record,
            }
        })
        .collect();
    produce(producer, records).await;
}

/// Writes raw bytes to the readings topic.
pub async fn produce_raw(kafka: &impl Bootstrap, key: &str, payload: &[u8], headers: &[(&str, &str)]) {
    let mut owned = rdkafka::message::OwnedHeaders::new();
    for (k, v) in headers {
        owned = owned.insert(rdkafka::message::Header { key: k, value: Some(v.as_bytes()) });
    }
    let record = FutureRecord::to(READINGS).key(key).payload(payload).headers(owned);
    produce(&producer(kafka), vec![record]).await;
}

/// Every record of `topic`, read until `enough` holds (or 60 s).
pub async fn read(
    kafka: &impl Bootstrap,
    topic: &str,
    enough: impl Fn(&[ReadRecord]) -> bool + Send + 'static,
) -> Vec<ReadRecord> {
    read_topic(kafka, topic, Duration::from_secs(60), enough).await
}

pub fn scores(records: &[ReadRecord]) -> Vec<Score> {
    records.iter().map(|r| Score::decode(r.payload.as_slice()).unwrap()).collect()
}

/// Distinct (device, sequence) pairs among score records.
pub fn distinct(records: &[ReadRecord]) -> usize {
    let set: std::collections::BTreeSet<(String, u64)> =
        scores(records).into_iter().map(|s| (s.device_id, s.sequence)).collect();
    set.len()
}

/// Each device's sequence numbers in the order its scores were written (partition
/// order; a device's scores are all in one partition).
pub fn sequences_by_device(records: &[ReadRecord]) -> BTreeMap<String, Vec<u64>> {
    let mut by_device: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for score in scores(records) {
        by_device.entry(score.device_id).or_default().push(score.sequence);
    }
    by_device
}

/// The processor, in this process.
pub struct Processor {
    pub admin: Endpoint,
    /// Its gRPC ReplayService, `http://127.0.0.1:port`.
    pub grpc: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), stream_processor::ProcessorError>>,
}

impl Processor {
    /// Starts the processor and waits until it is ready (the model's signature read, the
    /// group joined). A static member gets an instance id of its own unless the config
    /// names one: the default, the host name, would make processors of one test fence
    /// each other.
    pub async fn start(mut config: ProcessorConfig) -> Self {
        if config.static_membership && config.group_instance_id.is_empty() {
            config.group_instance_id = test_support::unique_name("processor");
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = Endpoint::new(listener.local_addr().unwrap());
        let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = format!("http://{}", grpc_listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let listeners = stream_processor::Listeners { admin: Some(listener), grpc: Some(grpc_listener) };
        let task = tokio::spawn(stream_processor::run(config, listeners, async {
            let _ = stopped.await;
        }));
        let processor = Self { admin, grpc, stop: Some(stop), task };
        processor.admin.wait_ready("the processor", Duration::from_secs(30)).await;
        processor
    }

    /// An unlabelled metric's value, or the sum over a labelled one's series.
    pub async fn metric(&self, name: &str) -> f64 {
        self.admin.metric_sum(name).await
    }

    /// Waits for the processor to stop by itself (a fatal error) and returns how it ended.
    pub async fn ends_within(self, timeout: Duration) -> Result<(), stream_processor::ProcessorError> {
        tokio::time::timeout(timeout, self.task).await.expect("the processor stopped by itself").unwrap()
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the processor stops within 60 s")
            .unwrap()
            .unwrap();
    }
}
