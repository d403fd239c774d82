//! The stream processor's configuration: defaults < TOML file < `PROCESSOR_*` environment
//! variables < command-line flags (see `admin::layered_config`). `PROCESSOR_MODEL__NAME`
//! is `model.name`; under `kafka`, `consumer` and `producer` underscores become dots, so
//! `PROCESSOR_KAFKA__SASL_MECHANISM` sets librdkafka's `sasl.mechanism`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use admin::layered_config::EnvLayout;
pub use admin::layered_config::{ConfigError, ServiceConfig};
use serde::{Deserialize, Serialize};

pub const DEFAULT_READINGS_TOPIC: &str = "vigil-readings";
pub const DEFAULT_SCORES_TOPIC: &str = "vigil-scores";
pub const DEFAULT_ANOMALIES_TOPIC: &str = "vigil-anomalies";
pub const DEFAULT_DEAD_LETTER_TOPIC: &str = "vigil-scoring-dead-letter";
pub const DEFAULT_REPLAY_TOPIC_PREFIX: &str = "vigil-replay-";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessorConfig {
    /// The consumer group: processors with the same group split the partitions.
    pub group_id: String,
    /// Static group membership (`group.instance.id`): a processor restarted under the same
    /// id takes its partitions back at once, instead of after its predecessor's session
    /// timeout (docs/failure-model.md). Off: an ordinary dynamic member.
    pub static_membership: bool,
    /// This processor's `group.instance.id`; empty: the host name (in Kubernetes the pod
    /// name, kept across container restarts). Every processor in the group needs its own:
    /// a second one with the same id fences the first, which then stops.
    pub group_instance_id: String,
    pub readings_topic: String,
    pub scores_topic: String,
    pub anomalies_topic: String,
    /// Readings that cannot be scored for what they are (not a `SensorReading`, or the
    /// model refused them with INVALID_ARGUMENT), with headers naming the reason.
    pub dead_letter_topic: String,
    /// How far a reading's event time may lie from its Kafka timestamp; a reading outside
    /// is dead-lettered as `implausible_event_time` (ingest checks the same on arrival;
    /// this covers readings other producers write).
    pub event_time: sensor::EventTimeBounds,
    /// `protobuf` (`vigil.scoring.v1.Score` / `Anomaly`) or `json`.
    pub output_format: OutputFormat,
    /// Readings of one partition being scored or written at once; their outputs are
    /// still written, and offsets committed, in the partition's order.
    pub max_in_flight_per_partition: usize,
    /// How long a revoked partition's in-flight work may take to finish during a
    /// rebalance; what is left after it is redone by the partition's next owner.
    pub rebalance_drain_seconds: u64,
    /// On shutdown: how long in-flight work may take to finish and commit.
    pub shutdown_grace_seconds: u64,
    /// `at-least-once` (the default) or `exactly-once` (Kafka transactions); see
    /// docs/stream-processor.md for what each costs.
    pub delivery: Delivery,
    /// Exactly-once: how often the open transaction (outputs and offsets) is committed.
    /// Readers with `isolation.level=read_committed` see outputs this much later.
    pub transaction_interval_ms: u64,
    /// Exactly-once: the producer's `transactional.id`; empty: `<group_id>-<host name>`.
    /// Every processor needs its own, stable across its restarts (a restarted one then
    /// aborts what its predecessor left open at once instead of after the transaction
    /// timeout).
    pub transactional_id: String,
    /// /live, /ready, /metrics; empty: not served.
    pub admin_listen: String,
    /// gRPC `vigil.replay.v1.ReplayService` and `grpc.health.v1`; empty: not served.
    pub grpc_listen: String,
    /// Readings a replay has at the model server at once. Replays share the model servers
    /// with live scoring, so this is well below `model.concurrency_limit`.
    pub replay_concurrency: usize,
    /// Every replay's output topic must start with this (and say more), so that a replay
    /// can never write into a topic another service reads (the alerts changelog, say).
    pub replay_topic_prefix: String,
    /// Readings one replay may re-score, at most: it holds each one's score until it joins
    /// them with the live scores, so this bounds its memory (about 100 bytes a reading). A
    /// larger range is refused part way with RESOURCE_EXHAUSTED; replay a narrower one.
    pub replay_max_readings: usize,
    pub model: ModelConfig,
    /// Per-device windows, for models that score a device's last readings
    /// (docs/windowed-models.md); unused while the model scores one reading at a time.
    pub windows: WindowConfig,
    /// librdkafka properties for both the consumer and the producer
    /// (`bootstrap.servers`, `security.protocol`, `sasl.*`, `ssl.*`).
    pub kafka: BTreeMap<String, String>,
    /// librdkafka properties for the consumer only (after `kafka`).
    pub consumer: BTreeMap<String, String>,
    /// librdkafka properties for the producer only (after `kafka`).
    pub producer: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    /// Offsets are committed once a reading's outputs are confirmed; after a crash the
    /// readings in flight since the last commit are scored and written again.
    AtLeastOnce,
    /// Outputs and offsets are committed in one Kafka transaction.
    ExactlyOnce,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Protobuf,
    Json,
}

/// Most readings one Predict call may carry (the model server's default request limit is
/// far above; its `max_batch_size` is what matters, see `max_rows_per_call`).
pub const MAX_ROWS_PER_CALL: usize = 4096;

/// The longest window `model.max_window_readings` may allow.
pub const MAX_WINDOW_READINGS: usize = 4096;

/// Per-device windows ([`crate::windows`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowConfig {
    /// Devices whose recent readings one partition keeps; past it, the device seen least
    /// recently is forgotten and its next reading starts a new window.
    pub max_devices_per_partition: usize,
    /// A reading more than this many seconds (event time) from its device's previous one
    /// starts a new window.
    pub max_gap_seconds: u64,
    /// When a partition is assigned (a start, a rebalance): how many records before its
    /// first one are read back to rebuild its devices' windows, so a reading gets the same
    /// window whichever replica scores it. 0: none (windows start empty).
    pub rebuild_records: u64,
    /// How long that read-back may take before scoring starts with what was read.
    pub rebuild_timeout_seconds: u64,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            max_devices_per_partition: 50_000,
            max_gap_seconds: 60,
            rebuild_records: 20_000,
            rebuild_timeout_seconds: 30,
        }
    }
}

impl WindowConfig {
    fn check(&self) -> Result<(), String> {
        if self.max_devices_per_partition == 0 {
            return Err("windows.max_devices_per_partition must be at least 1".into());
        }
        Ok(())
    }
}

/// Where readings are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelMode {
    /// Through the model server's `Predict` over gRPC (`endpoints`): canary rollouts,
    /// one model shared by every processor.
    #[default]
    Remote,
    /// In this process, from `model_dir` (docs/stream-processor.md says when to choose it).
    Embedded,
}

/// The model server and how it is called.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// `remote` (the model server, the default) or `embedded` (the SavedModel in this
    /// process, from `model_dir`).
    pub mode: ModelMode,
    /// Embedded mode: the model's directory, holding numbered version directories
    /// (`1/`, `2/`, ... each a SavedModel). The latest is served (or the pinned `version`);
    /// a new one is loaded in the background and takes over once ready.
    pub model_dir: Option<PathBuf>,
    /// Embedded mode: how often `model_dir` is looked at for new versions.
    pub reload_poll_seconds: u64,
    /// Model server replicas: `http://host:port` each, or `https://host:port` for a model
    /// server with TLS (`--ssl_config_file`; then `tls_ca_file` is required). A host name is
    /// resolved again every `discovery_refresh_seconds` and every address it has becomes a
    /// replica, so a headless Kubernetes Service (`http://model-server-headless:8500`)
    /// gives the pods.
    pub endpoints: Vec<String>,
    /// PEM file of the CA the model server's certificate chains to (`https://` endpoints;
    /// there are no built-in roots). The certificate must name the endpoint's host.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for a model server with `client_verify: true`.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub name: String,
    pub signature: String,
    /// Pin a version (absent: the server's choice, e.g. its latest or its rollout).
    pub version: Option<i64>,
    /// Or pin a version label (`stable`, `canary`).
    pub version_label: Option<String>,
    /// One Predict attempt's deadline.
    pub timeout_ms: u64,
    /// Calls in flight to the model server at once, over all partitions.
    pub concurrency_limit: usize,
    /// Most readings scored in one Predict call. Above 1, calls are batched adaptively:
    /// readings that arrive while `calls_in_flight` calls are out go together in the next
    /// one (never waiting to fill it). 1 sends one call per reading, for a model server
    /// that cannot take batches. Keep it at or below the model server's `max_batch_size`.
    pub max_rows_per_call: usize,
    /// The longest window a model may ask for, in readings (an input of shape `[-1, k]`,
    /// docs/windowed-models.md); a signature asking for more is refused, since every
    /// device's kept history would grow to it.
    pub max_window_readings: usize,
    /// Batched calls out at once (with `max_rows_per_call` above 1). Fewer calls in flight
    /// make bigger batches; more overlap round trips.
    pub calls_in_flight: usize,
    /// In a batched call, send each row's device id (`vigil_routing_keys`) so a canary
    /// rollout routes every device to its own side, and read each row's version back.
    /// Vigil's model server understands it; turn it off for another TensorFlow Serving
    /// compatible server, which refuses the extra input (batched calls are then not
    /// sticky per device).
    pub per_row_routing: bool,
    /// Retries are allowed for transient failures (UNAVAILABLE, timeouts, ...) while they
    /// stay under this share of calls (plus `retry_min_per_second`), so a struggling
    /// server is not buried under retries.
    pub retry_budget_percent: f32,
    pub retry_min_per_second: u32,
    /// When calls keep failing (every replica down), the reading is tried again after a
    /// backoff doubling from `backoff_initial_ms` up to `backoff_max_ms`, each wait with a
    /// random part of up to itself added (so partitions do not retry in lockstep); it is never
    /// dropped. Its partition stops being read once its in-flight bound is full.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// A replica whose connection failed gets no calls for this long.
    pub eject_ms: u64,
    pub discovery_refresh_seconds: u64,
    /// How often the signature (the model's inputs) is read again.
    pub metadata_refresh_seconds: u64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            mode: ModelMode::Remote,
            model_dir: None,
            reload_poll_seconds: 5,
            endpoints: vec!["http://127.0.0.1:8500".into()],
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            name: "car-anomaly".into(),
            signature: "serving_default".into(),
            version: None,
            version_label: None,
            timeout_ms: 2000,
            concurrency_limit: 1024,
            max_rows_per_call: 256,
            max_window_readings: 64,
            calls_in_flight: 16,
            per_row_routing: true,
            retry_budget_percent: 20.0,
            retry_min_per_second: 10,
            backoff_initial_ms: 50,
            backoff_max_ms: 5000,
            eject_ms: 1000,
            discovery_refresh_seconds: 10,
            metadata_refresh_seconds: 30,
        }
    }
}

impl ModelConfig {
    /// The waits between attempts when the model server cannot score.
    pub fn backoff(&self) -> admin::retry::Backoff {
        admin::retry::Backoff::new(
            std::time::Duration::from_millis(self.backoff_initial_ms),
            std::time::Duration::from_millis(self.backoff_max_ms),
        )
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            group_id: "vigil-stream-processor".into(),
            static_membership: true,
            group_instance_id: String::new(),
            readings_topic: DEFAULT_READINGS_TOPIC.into(),
            scores_topic: DEFAULT_SCORES_TOPIC.into(),
            anomalies_topic: DEFAULT_ANOMALIES_TOPIC.into(),
            dead_letter_topic: DEFAULT_DEAD_LETTER_TOPIC.into(),
            event_time: sensor::EventTimeBounds::default(),
            output_format: OutputFormat::Protobuf,
            max_in_flight_per_partition: 256,
            rebalance_drain_seconds: 20,
            shutdown_grace_seconds: 30,
            delivery: Delivery::AtLeastOnce,
            transaction_interval_ms: 100,
            transactional_id: String::new(),
            admin_listen: "0.0.0.0:9103".into(),
            // Next to ingest's 50061.
            grpc_listen: "0.0.0.0:50062".into(),
            replay_concurrency: 32,
            replay_topic_prefix: DEFAULT_REPLAY_TOPIC_PREFIX.into(),
            replay_max_readings: 1_000_000,
            model: ModelConfig::default(),
            windows: WindowConfig::default(),
            kafka: BTreeMap::from([("bootstrap.servers".to_owned(), "127.0.0.1:9092".to_owned())]),
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
        }
    }
}

impl ProcessorConfig {
    /// The live consumer's `group.instance.id`; `None` without static membership.
    pub fn group_instance_id(&self) -> Option<String> {
        kafka::group::instance_id(self.static_membership, &self.group_instance_id)
    }

    /// The producer's `transactional.id` in exactly-once mode.
    pub fn transactional_id(&self) -> String {
        if !self.transactional_id.is_empty() {
            return self.transactional_id.clone();
        }
        let host = kafka::group::host_name();
        format!("{}-{host}", self.group_id)
    }
}

impl ServiceConfig for ProcessorConfig {
    const ENV: EnvLayout<'static> = EnvLayout {
        prefix: "PROCESSOR_",
        pass_through: &["kafka", "consumer", "producer"],
        flag_variables: &["CONFIG"],
    };

    fn check(&self) -> Result<(), ConfigError> {
        let error = |text: String| Err(ConfigError(text));
        if self.max_in_flight_per_partition == 0 {
            return error("max_in_flight_per_partition must be at least 1".into());
        }
        if self.replay_concurrency == 0 {
            return error("replay_concurrency must be at least 1".into());
        }
        if self.replay_max_readings == 0 {
            return error("replay_max_readings must be at least 1".into());
        }
        self.windows.check().map_err(ConfigError)?;
        if self.replay_topic_prefix.trim().is_empty() {
            return error("replay_topic_prefix is empty: replays could write to any topic".into());
        }
        if self.model.concurrency_limit == 0 {
            return error("model.concurrency_limit must be at least 1".into());
        }
        if !(1..=MAX_WINDOW_READINGS).contains(&self.model.max_window_readings) {
            return error(format!("model.max_window_readings must be between 1 and {MAX_WINDOW_READINGS}"));
        }
        if !(1..=MAX_ROWS_PER_CALL).contains(&self.model.max_rows_per_call) {
            return error(format!("model.max_rows_per_call must be between 1 and {MAX_ROWS_PER_CALL}"));
        }
        if self.model.mode == ModelMode::Embedded {
            if self.model.model_dir.is_none() {
                return error("model.model_dir must name the model's directory in embedded mode".into());
            }
            if self.model.version_label.is_some() {
                return error("model.version_label is a model server's; pin model.version in embedded mode".into());
            }
        }
        if self.model.calls_in_flight == 0 || self.model.calls_in_flight > self.model.concurrency_limit {
            return error("model.calls_in_flight must be at least 1 and at most model.concurrency_limit".into());
        }
        if self.delivery == Delivery::ExactlyOnce && self.transaction_interval_ms == 0 {
            return error("transaction_interval_ms must be at least 1".into());
        }
        if self.producer.contains_key("transactional.id") || self.kafka.contains_key("transactional.id") {
            return error("transactional.id is set by the processor: use transactional_id (exactly-once only)".into());
        }
        if self.model.mode == ModelMode::Remote && self.model.endpoints.is_empty() {
            return error("model.endpoints is empty: there is no model server to call".into());
        }
        for endpoint in &self.model.endpoints {
            let target =
                crate::discovery::Target::parse(endpoint).map_err(|e| ConfigError(format!("model.endpoints: {e}")))?;
            if target.tls && self.model.tls_ca_file.is_none() {
                return error(format!("model.endpoints: {endpoint:?} is https: give model.tls_ca_file"));
            }
        }
        if self.model.tls_cert_file.is_some() != self.model.tls_key_file.is_some() {
            return error("model.tls_cert_file and model.tls_key_file: give both or neither".into());
        }
        if self.model.name.is_empty() {
            return error("model.name is empty".into());
        }
        if self.model.version.is_some() && self.model.version_label.is_some() {
            return error("model.version and model.version_label: give one or neither".into());
        }
        if self.model.timeout_ms == 0 {
            return error("model.timeout_ms must be at least 1".into());
        }
        if !(0.0..=1000.0).contains(&self.model.retry_budget_percent) {
            return error("model.retry_budget_percent must be between 0 and 1000".into());
        }
        if self.model.backoff_initial_ms == 0 || self.model.backoff_max_ms < self.model.backoff_initial_ms {
            return error("model.backoff_initial_ms must be at least 1 and at most model.backoff_max_ms".into());
        }
        ConfigError::require_non_empty([
            ("readings_topic", self.readings_topic.as_str()),
            ("scores_topic", &self.scores_topic),
            ("anomalies_topic", &self.anomalies_topic),
            ("dead_letter_topic", &self.dead_letter_topic),
        ])?;
        if self.scores_topic == self.readings_topic || self.anomalies_topic == self.readings_topic {
            return error("the scores and anomalies topics must differ from the readings topic".into());
        }
        let owned = ["enable.auto.offset.store", "enable.auto.commit", "group.id"];
        if let Some(key) =
            [&self.consumer, &self.kafka].into_iter().find_map(|table| kafka::service_owned(table, &owned))
        {
            return error(format!(
                "{key:?} is set by the processor (offsets are stored only once outputs are safe); remove it"
            ));
        }
        if self.consumer.contains_key("group.instance.id") || self.kafka.contains_key("group.instance.id") {
            return error("\"group.instance.id\" is set by the processor: use group_instance_id".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use admin::layered_config::NO_ENV;

    #[test]
    fn layers_apply_in_order_defaults_file_env_flags() {
        let file = test_support::temp_file(
            "processor.toml",
            r#"
group_id = "from-file"
output_format = "json"
[model]
endpoints = ["http://file:8500"]
timeout_ms = 300
[consumer]
"session.timeout.ms" = "6000"
"#,
        );
        let config = ProcessorConfig::load(
            Some(&file.path),
            [
                ("PROCESSOR_MODEL__TIMEOUT_MS", "400"),
                ("PROCESSOR_PRODUCER__LINGER_MS", "2"),
                ("PROCESSOR_GROUP_ID", "from-env"),
                // Names the file for the `--config` flag (which clap read): not a key.
                ("PROCESSOR_CONFIG", "/etc/vigil/processor.toml"),
            ],
            &crate::cli::flag_values(&[
                "--group-id",
                "from-flag",
                "--grpc-listen",
                "127.0.0.1:7000",
                "--model-endpoints",
                "http://a:1, http://b:2",
            ]),
        )
        .unwrap();
        assert_eq!(config.group_id, "from-flag", "flag over env over file");
        assert_eq!(config.grpc_listen, "127.0.0.1:7000");
        assert_eq!(config.output_format, OutputFormat::Json);
        assert_eq!(config.model.timeout_ms, 400, "env over file");
        assert_eq!(config.model.endpoints, ["http://a:1", "http://b:2"]);
        assert_eq!(config.consumer["session.timeout.ms"], "6000");
        assert_eq!(config.producer["linger.ms"], "2");
        assert_eq!(config.scores_topic, DEFAULT_SCORES_TOPIC, "defaults stay");
    }

    #[test]
    fn mistakes_are_refused_by_name() {
        let load =
            |pairs: &[(&str, &str)]| ProcessorConfig::load(None, pairs.iter().copied(), &[]).unwrap_err().to_string();
        assert!(load(&[("PROCESSOR_MODEL__ENDPOINTS", "[\"ftp://x:1\"]")]).contains("ftp://x:1"));
        assert!(load(&[("PROCESSOR_CONSUMER__ENABLE_AUTO_OFFSET_STORE", "true")]).contains("enable.auto.offset.store"));
        assert!(load(&[("PROCESSOR_MAX_IN_FLIGHT_PER_PARTITION", "0")]).contains("max_in_flight_per_partition"));
        assert!(load(&[("PROCESSOR_MODEL__MODE", "embedded")]).contains("model.model_dir"));
        assert!(load(&[("PROCESSOR_MODEL__MAX_ROWS_PER_CALL", "0")]).contains("max_rows_per_call"));
        assert!(load(&[("PROCESSOR_MODEL__CALLS_IN_FLIGHT", "0")]).contains("calls_in_flight"));
        assert!(load(&[("PROCESSOR_REPLAY_CONCURRENCY", "0")]).contains("replay_concurrency"));
        assert!(load(&[("PROCESSOR_OUTPUT_FORMAT", "xml")]).contains("xml"));
        assert!(load(&[("PROCESSOR_SCORES_TOPIC", "vigil-readings")]).contains("differ"));
        assert!(load(&[("PROCESSOR_DELIVERY", "exactly-twice")]).contains("exactly-twice"));
        assert!(load(&[("PROCESSOR_PRODUCER__TRANSACTIONAL_ID", "x")]).contains("transactional_id"));
        let exactly_once = ProcessorConfig::load(
            None,
            [("PROCESSOR_TRANSACTIONAL_ID", "processor-0")],
            &crate::cli::flag_values(&["--delivery", "exactly-once"]),
        )
        .unwrap();
        assert_eq!(exactly_once.delivery, Delivery::ExactlyOnce);
        assert_eq!(exactly_once.transactional_id(), "processor-0");
        assert!(ProcessorConfig::default().transactional_id().starts_with("vigil-stream-processor-"), "group and host");
        let file = test_support::temp_file("processor.toml", "[model]\ntimeuot_ms = 5\n");
        let error = ProcessorConfig::load(Some(&file.path), NO_ENV, &[]).unwrap_err().to_string();
        assert!(error.contains("timeuot_ms"), "{error}");
    }
}
