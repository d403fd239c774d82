//! `model-server` flags: tensorflow_model_server's, spelled as it spells them
//! (`--model_base_path`), with kebab-case aliases (`--model-base-path`), the same defaults,
//! and an environment variable for each (`MODEL_SERVER_<FLAG>`). Boolean flags accept
//! `--flag`, `--flag=true` and `--flag=false`, as TF Serving's do. Flags win over env.
//!
//! TF Serving has no general config file beyond `--model_config_file`; neither does this
//! server, so existing manifests need no new file. The additions, canary rollouts
//! (`--rollout_config_file`) and management credentials (`--management_token_file`,
//! `--management_allowed_subject`), are optional; TLS is TF Serving's `--ssl_config_file`, or
//! PEM files as a Kubernetes TLS Secret mounts them (`--ssl_cert_file`, `--ssl_key_file`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args};

use crate::batching::{SchedulingMode, UnbatchedOptions};
use crate::inference::Limits;
use crate::model_config;
use crate::repository::{ModelConfig, RepositoryOptions, VersionPolicy};
use crate::rollout;
use crate::rollout::RolloutSpec;
use crate::rollout::log::KafkaOptions;
use crate::security::{Security, SecurityOptions, TlsSource};

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// gRPC port (0 picks a free port; the bound port is printed).
    #[arg(long = "port", visible_alias = "grpc-port", env = "MODEL_SERVER_PORT", default_value_t = 8500)]
    pub port: u16,

    /// REST API port; 0 (the default, as in TF Serving) disables REST.
    #[arg(
        long = "rest_api_port",
        visible_alias = "rest-api-port",
        env = "MODEL_SERVER_REST_API_PORT",
        default_value_t = 0
    )]
    pub rest_api_port: u16,

    /// REST listen address (`HOST:PORT`, port 0 picks a free one and prints it); overrides
    /// --rest_api_port and --bind_address for REST, e.g. to keep REST on loopback.
    #[arg(long = "rest_api_address", visible_alias = "rest-api-address", env = "MODEL_SERVER_REST_API_ADDRESS")]
    pub rest_api_address: Option<String>,

    /// Address both ports bind to.
    #[arg(
        long = "bind_address",
        visible_alias = "bind-address",
        env = "MODEL_SERVER_BIND_ADDRESS",
        default_value = "0.0.0.0"
    )]
    pub bind_address: String,

    /// Name of the single model served (ignored with --model_config_file).
    #[arg(
        long = "model_name",
        visible_alias = "model-name",
        env = "MODEL_SERVER_MODEL_NAME",
        default_value = "default"
    )]
    pub model_name: String,

    /// Directory holding the model's numbered version directories.
    #[arg(long = "model_base_path", visible_alias = "model-base-path", env = "MODEL_SERVER_MODEL_BASE_PATH")]
    pub model_base_path: Option<PathBuf>,

    /// TF Serving text-proto ModelServerConfig (model_config_list) listing models to serve.
    #[arg(long = "model_config_file", visible_alias = "model-config-file", env = "MODEL_SERVER_MODEL_CONFIG_FILE")]
    pub model_config_file: Option<PathBuf>,

    /// Seconds between re-reads of --model_config_file; 0 reads it once.
    #[arg(
        long = "model_config_file_poll_wait_seconds",
        visible_alias = "model-config-file-poll-wait-seconds",
        env = "MODEL_SERVER_MODEL_CONFIG_FILE_POLL_WAIT_SECONDS",
        default_value_t = 0
    )]
    pub model_config_file_poll_wait_seconds: u64,

    /// Vigil's canary rollouts (TOML: `[[rollouts]]` with model, stable, canary,
    /// canary_weight_percent and optional shadow_percent and analysis); see `rollout/mod.rs`.
    #[arg(
        long = "rollout_config_file",
        visible_alias = "rollout-config-file",
        env = "MODEL_SERVER_ROLLOUT_CONFIG_FILE"
    )]
    pub rollout_config_file: Option<PathBuf>,

    /// Seconds between re-reads of --rollout_config_file; 0 reads it once.
    #[arg(
        long = "rollout_config_file_poll_wait_seconds",
        visible_alias = "rollout-config-file-poll-wait-seconds",
        env = "MODEL_SERVER_ROLLOUT_CONFIG_FILE_POLL_WAIT_SECONDS",
        default_value_t = 5
    )]
    pub rollout_config_file_poll_wait_seconds: u64,

    /// Kafka bootstrap servers keeping the rollout state (a compacted topic every replica
    /// reads, so all converge) and the rollout events. Unset: state in this process only.
    #[arg(
        long = "rollout_kafka_brokers",
        visible_alias = "rollout-kafka-brokers",
        env = "MODEL_SERVER_ROLLOUT_KAFKA_BROKERS"
    )]
    pub rollout_kafka_brokers: Option<String>,

    /// The compacted topic holding each model's rollout state.
    #[arg(
        long = "rollout_state_topic",
        visible_alias = "rollout-state-topic",
        env = "MODEL_SERVER_ROLLOUT_STATE_TOPIC",
        default_value = "vigil.rollout-state"
    )]
    pub rollout_state_topic: String,

    /// The topic every rollout change and analysis decision is published to.
    #[arg(
        long = "rollout_events_topic",
        visible_alias = "rollout-events-topic",
        env = "MODEL_SERVER_ROLLOUT_EVENTS_TOPIC",
        default_value = "vigil.rollout-events"
    )]
    pub rollout_events_topic: String,

    /// Consumer group electing the replica that runs the rollout analysis.
    #[arg(
        long = "rollout_leader_group",
        visible_alias = "rollout-leader-group",
        env = "MODEL_SERVER_ROLLOUT_LEADER_GROUP",
        default_value = "vigil-model-server-rollouts"
    )]
    pub rollout_leader_group: String,

    /// A librdkafka property for the rollout state's Kafka clients, `KEY=VALUE`
    /// (repeatable), e.g. `security.protocol=SASL_SSL`. Also read from the environment as
    /// `MODEL_SERVER_ROLLOUT_KAFKA__<KEY>` with `_` for `.` (`..._SASL_PASSWORD`), the way
    /// to pass secrets; a flag wins over the variable.
    #[arg(long = "rollout_kafka_property", visible_alias = "rollout-kafka-property", value_name = "KEY=VALUE")]
    pub rollout_kafka_property: Vec<String>,

    /// This replica's name in rollout state and events (default: $HOSTNAME, the pod name).
    #[arg(long = "replica_id", visible_alias = "replica-id", env = "MODEL_SERVER_REPLICA_ID")]
    pub replica_id: Option<String>,

    /// Seconds between scans of model base paths for new versions; 0 scans once at startup.
    #[arg(
        long = "file_system_poll_wait_seconds",
        visible_alias = "file-system-poll-wait-seconds",
        env = "MODEL_SERVER_FILE_SYSTEM_POLL_WAIT_SECONDS",
        default_value_t = 1
    )]
    pub file_system_poll_wait_seconds: u64,

    /// Merge concurrent requests into one engine run (see --batching_parameters_file).
    #[arg(long = "enable_batching", visible_alias = "enable-batching", env = "MODEL_SERVER_ENABLE_BATCHING",
          num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, default_value_t = false)]
    pub enable_batching: bool,

    /// TF Serving text-proto BatchingParameters (max_batch_size, batch_timeout_micros, ...).
    #[arg(
        long = "batching_parameters_file",
        visible_alias = "batching-parameters-file",
        env = "MODEL_SERVER_BATCHING_PARAMETERS_FILE"
    )]
    pub batching_parameters_file: Option<PathBuf>,

    /// TF Serving text-proto MonitoringConfig; enables Prometheus at its path on the REST port.
    #[arg(
        long = "monitoring_config_file",
        visible_alias = "monitoring-config-file",
        env = "MODEL_SERVER_MONITORING_CONFIG_FILE"
    )]
    pub monitoring_config_file: Option<PathBuf>,

    /// Replay assets.extra/tf_serving_warmup_requests before a version becomes AVAILABLE.
    #[arg(long = "enable_model_warmup", visible_alias = "enable-model-warmup", env = "MODEL_SERVER_ENABLE_MODEL_WARMUP",
          num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, default_value_t = true)]
    pub enable_model_warmup: bool,

    /// Serve grpc.health.v1.Health on the gRPC port.
    #[arg(long = "enable_grpc_healthcheck_service", visible_alias = "enable-grpc-healthcheck-service",
          env = "MODEL_SERVER_ENABLE_GRPC_HEALTHCHECK_SERVICE",
          num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, default_value_t = false)]
    pub enable_grpc_healthcheck_service: bool,

    /// Return Predict outputs in tensor_content (bytes) instead of typed *_val fields.
    #[arg(long = "enable_serialization_as_tensor_content", visible_alias = "enable-serialization-as-tensor-content",
          env = "MODEL_SERVER_ENABLE_SERIALIZATION_AS_TENSOR_CONTENT",
          num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, default_value_t = false)]
    pub enable_serialization_as_tensor_content: bool,

    /// Comma-separated MetaGraph tags to load.
    #[arg(
        long = "saved_model_tags",
        visible_alias = "saved-model-tags",
        env = "MODEL_SERVER_SAVED_MODEL_TAGS",
        default_value = "serve"
    )]
    pub saved_model_tags: String,

    /// Largest gRPC request accepted, in bytes.
    #[arg(long = "grpc_max_message_bytes", visible_alias = "grpc-max-message-bytes", env = "MODEL_SERVER_GRPC_MAX_MESSAGE_BYTES", default_value_t = 64 << 20)]
    pub grpc_max_message_bytes: usize,

    /// Most rows (batch axis) in one request.
    #[arg(
        long = "max_request_rows",
        visible_alias = "max-request-rows",
        env = "MODEL_SERVER_MAX_REQUEST_ROWS",
        default_value_t = 65_536
    )]
    pub max_request_rows: usize,

    /// Most decoded tensor bytes one request may carry, checked before anything is
    /// allocated; 0 (the default) sizes it per signature: a row's bytes times the row
    /// limit (--max_request_rows, or max_batch_size when batching), at least 1 MiB, or 64 MiB
    /// for signatures whose rows have no fixed size.
    #[arg(
        long = "max_request_bytes",
        visible_alias = "max-request-bytes",
        env = "MODEL_SERVER_MAX_REQUEST_BYTES",
        default_value_t = 0
    )]
    pub max_request_bytes: usize,

    /// Requests in flight across all connections (gRPC and REST); past it a request is
    /// refused at once with RESOURCE_EXHAUSTED (HTTP 429) and counted, not queued.
    #[arg(
        long = "max_in_flight_requests",
        visible_alias = "max-in-flight-requests",
        env = "MODEL_SERVER_MAX_IN_FLIGHT_REQUESTS",
        default_value_t = 512
    )]
    pub max_in_flight_requests: usize,

    /// Concurrent HTTP/2 streams one gRPC connection may open.
    #[arg(
        long = "grpc_max_concurrent_streams",
        visible_alias = "grpc-max-concurrent-streams",
        env = "MODEL_SERVER_GRPC_MAX_CONCURRENT_STREAMS",
        default_value_t = 128
    )]
    pub grpc_max_concurrent_streams: u32,

    /// Seconds a request may take (a client's shorter `grpc-timeout` wins); 0 for no limit.
    #[arg(
        long = "request_timeout_seconds",
        visible_alias = "request-timeout-seconds",
        env = "MODEL_SERVER_REQUEST_TIMEOUT_SECONDS",
        default_value_t = 30
    )]
    pub request_timeout_seconds: u64,

    /// Largest REST request body, in bytes (JSON expands in memory: see docs/model-server-security.md).
    #[arg(
        long = "rest_max_body_bytes",
        visible_alias = "rest-max-body-bytes",
        env = "MODEL_SERVER_REST_MAX_BODY_BYTES",
        default_value_t = 4 << 20
    )]
    pub rest_max_body_bytes: usize,

    /// A directory model base paths must lie under (repeatable). When given, a model config
    /// (from a file or `HandleReloadConfigRequest`) naming a base path elsewhere is refused.
    #[arg(
        long = "model_base_path_allow",
        visible_alias = "model-base-path-allow",
        env = "MODEL_SERVER_MODEL_BASE_PATH_ALLOW",
        value_delimiter = ','
    )]
    pub model_base_path_allow: Vec<PathBuf>,

    /// Inference threads per signature when batching is off, and the most runs at once
    /// (default: CPU count).
    #[arg(long = "inference_threads", visible_alias = "inference-threads", env = "MODEL_SERVER_INFERENCE_THREADS")]
    pub inference_threads: Option<usize>,

    /// TF Serving's text-format SSLConfig (server_key, server_cert, custom_ca, client_verify;
    /// PEM contents inline): TLS on the gRPC and REST ports, mutual with client_verify: true.
    /// Re-read while serving; see docs/model-server-tls-and-auth.md.
    #[arg(
        long = "ssl_config_file",
        visible_alias = "ssl-config-file",
        env = "MODEL_SERVER_SSL_CONFIG_FILE",
        conflicts_with_all = ["ssl_cert_file", "ssl_key_file", "ssl_client_ca_file", "ssl_client_verify"]
    )]
    pub ssl_config_file: Option<PathBuf>,

    /// TLS from PEM files instead of an SSLConfig, as a Kubernetes TLS Secret or
    /// cert-manager mounts them: the server certificate chain, leaf first (`tls.crt`).
    /// Needs --ssl_key_file. Re-read while serving, as the SSLConfig is.
    #[arg(
        long = "ssl_cert_file",
        visible_alias = "ssl-cert-file",
        env = "MODEL_SERVER_SSL_CERT_FILE",
        requires = "ssl_key_file"
    )]
    pub ssl_cert_file: Option<PathBuf>,

    /// The private key of --ssl_cert_file, PEM (`tls.key`).
    #[arg(
        long = "ssl_key_file",
        visible_alias = "ssl-key-file",
        env = "MODEL_SERVER_SSL_KEY_FILE",
        requires = "ssl_cert_file"
    )]
    pub ssl_key_file: Option<PathBuf>,

    /// CA certificates, PEM (`ca.crt`), that client certificates are verified against: a
    /// client may present one (SSLConfig's custom_ca); required of every client with
    /// --ssl_client_verify.
    #[arg(
        long = "ssl_client_ca_file",
        visible_alias = "ssl-client-ca-file",
        env = "MODEL_SERVER_SSL_CLIENT_CA_FILE",
        requires = "ssl_cert_file"
    )]
    pub ssl_client_ca_file: Option<PathBuf>,

    /// Mutual TLS with --ssl_cert_file: every client must present a certificate that
    /// chains to --ssl_client_ca_file (SSLConfig's client_verify).
    #[arg(
        long = "ssl_client_verify",
        visible_alias = "ssl-client-verify",
        env = "MODEL_SERVER_SSL_CLIENT_VERIFY",
        requires = "ssl_client_ca_file",
        num_args = 0..=1,
        default_missing_value = "true",
        action = ArgAction::Set,
        default_value_t = false
    )]
    pub ssl_client_verify: bool,

    /// A file holding the bearer token management calls (model config reloads, rollout
    /// changes) must carry as `authorization: Bearer <token>`. Re-read while serving.
    #[arg(
        long = "management_token_file",
        visible_alias = "management-token-file",
        env = "MODEL_SERVER_MANAGEMENT_TOKEN_FILE"
    )]
    pub management_token_file: Option<PathBuf>,

    /// A client certificate subject allowed to make management calls (repeatable), matched
    /// against the certificate's common name (`deployer`) or its whole RFC 4514 subject
    /// (`CN=deployer,O=Vigil`). Needs --ssl_config_file with custom_ca, or --ssl_client_ca_file. The variable takes a
    /// `;`-separated list.
    #[arg(
        long = "management_allowed_subject",
        visible_alias = "management-allowed-subject",
        env = "MODEL_SERVER_MANAGEMENT_ALLOWED_SUBJECT",
        value_delimiter = ';',
        value_name = "SUBJECT"
    )]
    pub management_allowed_subject: Vec<String>,

    /// Seconds between re-reads of --ssl_config_file and --management_token_file; 0 reads
    /// them once.
    #[arg(
        long = "security_files_poll_wait_seconds",
        visible_alias = "security-files-poll-wait-seconds",
        env = "MODEL_SERVER_SECURITY_FILES_POLL_WAIT_SECONDS",
        default_value_t = 5
    )]
    pub security_files_poll_wait_seconds: u64,

    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(
        long = "shutdown_grace_seconds",
        visible_alias = "shutdown-grace-seconds",
        env = "MODEL_SERVER_SHUTDOWN_GRACE_SECONDS",
        default_value_t = 10
    )]
    pub shutdown_grace_seconds: u64,
}

/// Everything the server needs, resolved from flags and the files they name.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub models: Vec<ModelConfig>,
    pub model_config_file: Option<PathBuf>,
    pub model_config_poll: Option<Duration>,
    pub file_system_poll: Option<Duration>,
    /// The rollout file's rollouts at startup, and the file (re-read each poll).
    pub rollouts: Vec<RolloutSpec>,
    pub rollout_config_file: Option<PathBuf>,
    pub rollout_config_poll: Option<Duration>,
    /// Where rollout state and events live beyond this process.
    pub rollout_kafka: Option<KafkaOptions>,
    pub replica_id: String,
    pub repository: RepositoryOptions,
    pub limits: Limits,
    pub monitoring_path: Option<String>,
    pub grpc_health: bool,
    pub tensor_content_outputs: bool,
    pub grpc_max_message_bytes: usize,
    pub overload: crate::overload::OverloadLimits,
    pub shutdown_grace: Duration,
    /// TLS and management credentials, with the files they came from.
    pub security: Security,
}

/// The variables naming rollout Kafka properties (`..._SASL_MECHANISM` is
/// `sasl.mechanism`).
const ROLLOUT_KAFKA_ENV_PREFIX: &str = "MODEL_SERVER_ROLLOUT_KAFKA__";

/// Properties the rollout log sets itself, per client: not to be overridden.
const MANAGED_KAFKA_PROPERTIES: [&str; 6] =
    ["bootstrap.servers", "group.id", "enable.auto.commit", "enable.partition.eof", "enable.idempotence", "linger.ms"];

/// The rollout state's librdkafka properties: the environment's, then the flags' over them.
fn rollout_kafka_properties(
    env: impl IntoIterator<Item = (String, String)>,
    flags: &[String],
) -> Result<Vec<(String, String)>, String> {
    let mut properties = admin::layered_config::properties_from_env(ROLLOUT_KAFKA_ENV_PREFIX, env);
    for flag in flags {
        let (key, value) = flag
            .split_once('=')
            .filter(|(key, _)| !key.trim().is_empty())
            .ok_or_else(|| format!("--rollout_kafka_property {flag:?}: expected KEY=VALUE"))?;
        properties.insert(key.trim().to_owned(), value.to_owned());
    }
    if let Some(key) = kafka::service_owned(&properties, &MANAGED_KAFKA_PROPERTIES) {
        return Err(format!(
            "rollout Kafka property {key:?} is set by the model server itself{}",
            if key == "bootstrap.servers" { " (use --rollout_kafka_brokers)" } else { "" }
        ));
    }
    Ok(properties.into_iter().collect())
}

impl ServeArgs {
    /// Where TLS comes from, if anywhere (clap has refused mixing the two forms).
    fn tls_source(&self) -> Option<TlsSource> {
        if let Some(path) = &self.ssl_config_file {
            return Some(TlsSource::SslConfigFile(path.clone()));
        }
        let (cert, key) = (self.ssl_cert_file.clone()?, self.ssl_key_file.clone()?);
        Some(TlsSource::PemFiles {
            cert,
            key,
            client_ca: self.ssl_client_ca_file.clone(),
            client_verify: self.ssl_client_verify,
        })
    }

    /// Reads the files the flags name and checks the combination.
    pub fn resolve(&self) -> Result<ServerConfig, String> {
        let models = match (&self.model_config_file, &self.model_base_path) {
            (Some(file), _) => model_config::read_model_config_file(file)?,
            (None, Some(base)) => vec![ModelConfig {
                name: self.model_name.clone(),
                base_path: base.clone(),
                policy: VersionPolicy::Latest(1),
                labels: Default::default(),
            }],
            (None, None) => {
                return Err("nothing to serve: give --model_base_path (and --model_name) or --model_config_file".into());
            }
        };
        let scheduling = if self.enable_batching {
            let options = match &self.batching_parameters_file {
                Some(path) => model_config::read_batching_file(path)?,
                None => Default::default(),
            };
            SchedulingMode::Batched(options)
        } else {
            if self.batching_parameters_file.is_some() {
                tracing::warn!("--batching_parameters_file is ignored without --enable_batching");
            }
            let mut options = UnbatchedOptions::default();
            if let Some(threads) = self.inference_threads {
                options.threads = threads.max(1);
            }
            SchedulingMode::Unbatched(options)
        };
        let monitoring_path = match &self.monitoring_config_file {
            Some(path) => model_config::read_monitoring_file(path)?,
            None => None,
        };
        let rollouts = match &self.rollout_config_file {
            Some(path) => rollout::read_rollout_file(path)?,
            None => Vec::new(),
        };
        let properties = rollout_kafka_properties(std::env::vars(), &self.rollout_kafka_property)?;
        if self.rollout_kafka_brokers.is_none() && !properties.is_empty() {
            return Err(format!(
                "Kafka properties for the rollout state ({}) need --rollout_kafka_brokers",
                properties.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
        let rollout_kafka = self.rollout_kafka_brokers.as_ref().map(|brokers| KafkaOptions {
            brokers: brokers.clone(),
            state_topic: self.rollout_state_topic.clone(),
            events_topic: self.rollout_events_topic.clone(),
            leader_group: self.rollout_leader_group.clone(),
            properties,
        });
        let replica_id = self
            .replica_id
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| format!("model-server-{}", std::process::id()));
        let seconds = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        let security = Security::load(SecurityOptions {
            tls: self.tls_source(),
            management_token_file: self.management_token_file.clone(),
            management_allowed_subjects: self.management_allowed_subject.clone(),
            poll: seconds(self.security_files_poll_wait_seconds),
        })
        .map_err(|e| e.to_string())?;
        Ok(ServerConfig {
            security,
            rollouts,
            rollout_kafka,
            replica_id,
            rollout_config_file: self.rollout_config_file.clone(),
            rollout_config_poll: seconds(self.rollout_config_file_poll_wait_seconds)
                .filter(|_| self.rollout_config_file.is_some()),
            models,
            model_config_file: self.model_config_file.clone(),
            model_config_poll: seconds(self.model_config_file_poll_wait_seconds)
                .filter(|_| self.model_config_file.is_some()),
            file_system_poll: seconds(self.file_system_poll_wait_seconds),
            repository: RepositoryOptions {
                scheduling,
                enable_warmup: self.enable_model_warmup,
                allowed_base_paths: self.model_base_path_allow.clone(),
                saved_model_tags: self
                    .saved_model_tags
                    .split(',')
                    .map(|t| t.trim().to_owned())
                    .filter(|t| !t.is_empty())
                    .collect(),
            },
            limits: Limits {
                max_request_rows: self.max_request_rows,
                max_request_bytes: (self.max_request_bytes > 0).then_some(self.max_request_bytes),
            },
            overload: crate::overload::OverloadLimits {
                max_in_flight: self.max_in_flight_requests.max(1),
                grpc_max_concurrent_streams: self.grpc_max_concurrent_streams.max(1),
                request_timeout: seconds(self.request_timeout_seconds),
                rest_max_body_bytes: self.rest_max_body_bytes,
            },
            monitoring_path,
            grpc_health: self.enable_grpc_healthcheck_service,
            tensor_content_outputs: self.enable_serialization_as_tensor_content,
            grpc_max_message_bytes: self.grpc_max_message_bytes,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_seconds),
        })
    }
}

#[cfg(test)]
mod tests;
