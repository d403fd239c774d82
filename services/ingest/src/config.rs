//! The ingest service's configuration: defaults < TOML file < `INGEST_*` environment
//! variables < command-line flags. The same structure is what the Helm chart renders.
//!
//! Environment variables nest with `__` (`INGEST_MQTT__URL` is `mqtt.url`); under
//! `kafka`, underscores become dots, so `INGEST_KAFKA__SASL_MECHANISM` sets librdkafka's
//! `sasl.mechanism`. The environment is passed in as a list, so tests never touch the
//! process's own.

use std::collections::BTreeMap;
use std::path::PathBuf;

use admin::layered_config::EnvLayout;
pub use admin::layered_config::{ConfigError, ServiceConfig};
use serde::{Deserialize, Serialize};

/// The readings topic of the default rule and of the gRPC API.
pub const DEFAULT_READINGS_TOPIC: &str = "vigil-readings";
pub const DEFAULT_DEAD_LETTER_TOPIC: &str = "vigil-dead-letter";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub mqtt: MqttConfig,
    /// librdkafka properties for the producer (`bootstrap.servers`, `security.protocol`,
    /// `sasl.*`, `ssl.*`, tuning). Vigil's defaults (see [`crate::kafka`]) apply first;
    /// `acks` and `enable.idempotence` should stay as they are: they are what makes an
    /// acknowledged reading safe.
    pub kafka: BTreeMap<String, String>,
    /// Mapping rules, tried in order; the first match wins. Unmatched messages are
    /// dead-lettered.
    pub rules: Vec<RuleConfig>,
    /// Where invalid readings and unroutable messages go, with headers naming the reason.
    pub dead_letter_topic: String,
    /// How far a reading's event time may lie from its arrival (MQTT and gRPC); a reading
    /// outside is dead-lettered (MQTT) or refused (gRPC) as `implausible_event_time`.
    pub event_time: sensor::EventTimeBounds,
    /// Readings read from MQTT and not yet confirmed by Kafka, at most. With MQTT 5 this
    /// is also the receive maximum announced to the broker, so the broker stops sending
    /// before the bound is reached; with 3.1.1 the broker's own in-flight window applies.
    pub max_in_flight: usize,
    pub grpc: GrpcConfig,
    pub http: HttpConfig,
    /// MQTT proxy mode: devices connect to ingest itself, no MQTT broker in between.
    pub mqtt_proxy: MqttProxyConfig,
    /// Address of the `/live`, `/ready`, `/metrics` endpoint; empty to not serve it.
    pub admin_listen: String,
    /// How long shutdown waits for Kafka to confirm what was read before disconnecting
    /// (what is left unacknowledged is redelivered by the broker to the next session).
    pub shutdown_grace_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `mqtt://host:port` (port 1883 when left out), or `mqtts://host:port` for TLS (port
    /// 8883 when left out; see `tls`). Empty: no MQTT bridge, readings come only through
    /// the gRPC and HTTP APIs.
    pub url: String,
    pub protocol: MqttProtocol,
    /// Client id; replicas need distinct ids (the Helm chart uses the pod name). The
    /// broker keeps the session under this id while ingest restarts.
    pub client_id: String,
    /// Topic filters to subscribe to (QoS 1).
    pub subscriptions: Vec<String>,
    /// Subscribe through `$share/<group>/<filter>` so replicas split the messages; empty
    /// for a plain subscription.
    pub share_group: String,
    /// MQTT sessions per replica, sharing the subscription through `share_group` (client
    /// ids `<client_id>-<n>` when above 1), each with `max_in_flight` readings awaiting
    /// Kafka: more in flight when Kafka's latency bounds the rate (docs/benchmarks.md).
    pub connections: usize,
    /// MQTT 5 session expiry: how long the broker keeps queueing for a disconnected
    /// ingest. (3.1.1 sessions without clean session last until the broker drops them.)
    pub session_expiry_seconds: u32,
    pub keep_alive_seconds: u64,
    pub username: Option<String>,
    /// Better given as `INGEST_MQTT__PASSWORD` (e.g. from a Kubernetes Secret) than in a file.
    pub password: Option<String>,
    /// Certificates for an `mqtts://` URL.
    pub tls: MqttTlsConfig,
    /// The largest payload ingest converts (a reading is under 1 KiB); a larger one is
    /// dead-lettered as `payload_too_large`, keeping its first 4 KiB.
    pub max_payload_bytes: usize,
    /// The largest MQTT packet ingest reads. MQTT 5 tells the broker, which drops larger
    /// messages unseen, as the protocol requires; MQTT 3.1.1 cannot, so a larger message
    /// breaks the connection, and ingest then reads it once on a connection with a raised
    /// limit to dead-letter it (one allocation of its size). Either way, set the broker to
    /// refuse them at publish (Mosquitto: `message_size_limit`; docs/failure-model.md).
    pub max_packet_bytes: u32,
}

/// TLS to the MQTT broker (used when `mqtt.url` is `mqtts://`). The broker's certificate
/// is verified against `ca_file`, or the system's roots when it is not given, and must
/// name the URL's host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttTlsConfig {
    /// PEM file with the CA certificate(s) that signed the broker's certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for brokers that require mutual TLS (with `client_key_file`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<PathBuf>,
    /// PEM (PKCS#8) private key of `client_cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MqttProtocol {
    #[serde(rename = "5")]
    V5,
    #[serde(rename = "3.1.1")]
    V311,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// Address of the gRPC `IngestService`; empty to not serve it.
    pub listen: String,
    /// The topic readings published over gRPC go to (keyed by device id).
    pub topic: String,
}

/// HTTP ingest: `POST /v1/readings` (README, "HTTP ingest").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the HTTP endpoint; empty (the default) to not serve it.
    pub listen: String,
    /// The topic readings posted over HTTP go to (keyed by device id).
    pub topic: String,
    /// The largest request body read; a request that declares or sends more is refused
    /// with 413 before more than this is read.
    pub max_body_bytes: usize,
    /// The most readings one request may carry; more are refused with 413 before any is
    /// decoded.
    pub max_readings_per_request: usize,
    /// Requests handled at once; more wait (their bodies unread) for a turn. With the two
    /// limits above this bounds what HTTP ingest can hold: about max_concurrent_requests x
    /// (max_body_bytes + max_readings_per_request x 1 KiB).
    pub max_concurrent_requests: usize,
    /// A file holding the bearer token every request must present
    /// (`Authorization: Bearer <token>`), e.g. a mounted Secret; none: no token asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// TLS on the HTTP port (HTTPS); none: plain HTTP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::tls::ServerTlsConfig>,
}

/// MQTT proxy mode (docs/mqtt-proxy.md): ingest accepts MQTT 3.1.1 and 5 connections
/// from devices and acknowledges each PUBLISH once Kafka has its record. What the proxy
/// can hold is bounded by about 2 x `max_connections` x `max_packet_bytes` (read
/// buffers) plus `max_in_flight_bytes` (records awaiting Kafka): 192 MiB by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttProxyConfig {
    /// Address devices connect to, e.g. `0.0.0.0:1883`; empty (the default): no proxy.
    pub listen: String,
    /// Connections open at once, at most; more are closed on accept.
    pub max_connections: usize,
    /// The largest packet a device may send (MQTT 5 clients are told); a larger one
    /// closes its connection, refused from its header before its body is read.
    pub max_packet_bytes: u32,
    /// Messages one connection may have unconfirmed by Kafka; the socket is not read
    /// beyond it. MQTT 5 clients are told (Receive Maximum) and disconnected for exceeding it.
    pub receive_maximum: u16,
    /// Bytes of PUBLISH packets all connections together may have unconfirmed by Kafka,
    /// each counted as at least 2 KiB (what a record costs besides its payload).
    pub max_in_flight_bytes: usize,
    /// How long a new connection has to send its CONNECT.
    pub connect_timeout_seconds: u64,
    /// The longest keep-alive granted to MQTT 5 clients (they are told), and the one of
    /// clients asking for none; a 3.1.1 client's own stands (it cannot be told another).
    /// Silence for 1.5 times the keep-alive closes the connection.
    pub max_keep_alive_seconds: u16,
    /// `username:password` lines (e.g. a mounted Secret); every CONNECT must log in as
    /// one of them. None: no login asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub users_file: Option<PathBuf>,
    /// What the ACL's `{device}` stands for: `client-id`, `username` or `certificate-cn`.
    pub device_id_from: crate::proxy::access::DeviceIdFrom,
    /// Topic filters a device may publish to, `{device}` standing for its identity, e.g.
    /// `vehicles/sensor/data/{device}`. Empty: any topic (the rules still route it).
    pub acl: Vec<String>,
    /// TLS on the proxy's port (MQTT over TLS, usually port 8883); none: plain TCP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::tls::ServerTlsConfig>,
}

/// One mapping rule: a match on the MQTT topic and where matching messages go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// An MQTT topic filter (`+`, `#`); or give `regex`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// A regular expression on the topic, whose named groups the templates can use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// Kafka topic template.
    pub topic: String,
    /// Record key template; by default a sensor reading is keyed by its device id and a
    /// raw payload has no key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Device id template, for readings whose payload carries none (the seed's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default)]
    pub payload: PayloadKind,
}

/// What a rule's payloads are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PayloadKind {
    /// Car-sensor JSON, validated and written as a protobuf `vigil.sensor.v1.SensorReading`.
    #[default]
    SensorReading,
    /// Any bytes, written unchanged.
    Raw,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            mqtt: MqttConfig::default(),
            kafka: BTreeMap::from([("bootstrap.servers".to_owned(), "127.0.0.1:9092".to_owned())]),
            rules: vec![RuleConfig {
                filter: Some("vehicles/sensor/data/+".into()),
                regex: None,
                topic: DEFAULT_READINGS_TOPIC.into(),
                key: None,
                device_id: Some("{level:3}".into()),
                payload: PayloadKind::SensorReading,
            }],
            dead_letter_topic: DEFAULT_DEAD_LETTER_TOPIC.into(),
            event_time: sensor::EventTimeBounds::default(),
            max_in_flight: 1000,
            grpc: GrpcConfig::default(),
            http: HttpConfig::default(),
            mqtt_proxy: MqttProxyConfig::default(),
            admin_listen: "0.0.0.0:9464".into(),
            shutdown_grace_seconds: 20,
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            url: "mqtt://127.0.0.1:1883".into(),
            protocol: MqttProtocol::V5,
            client_id: "vigil-ingest".into(),
            subscriptions: vec!["vehicles/sensor/data/+".into()],
            share_group: "vigil-ingest".into(),
            connections: 1,
            session_expiry_seconds: 3600,
            keep_alive_seconds: 30,
            max_payload_bytes: 64 * 1024,
            max_packet_bytes: 1024 * 1024,
            username: None,
            password: None,
            tls: MqttTlsConfig::default(),
        }
    }
}

impl Default for MqttProxyConfig {
    fn default() -> Self {
        Self {
            listen: String::new(),
            max_connections: 4096,
            max_packet_bytes: 16 * 1024,
            receive_maximum: 64,
            max_in_flight_bytes: 64 * 1024 * 1024,
            connect_timeout_seconds: 10,
            max_keep_alive_seconds: 300,
            users_file: None,
            device_id_from: crate::proxy::access::DeviceIdFrom::ClientId,
            acl: Vec::new(),
            tls: None,
        }
    }
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self { listen: "0.0.0.0:50061".into(), topic: DEFAULT_READINGS_TOPIC.into() }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: String::new(),
            topic: DEFAULT_READINGS_TOPIC.into(),
            max_body_bytes: 1024 * 1024,
            max_readings_per_request: 2_000,
            max_concurrent_requests: 16,
            token_file: None,
            tls: None,
        }
    }
}

impl ServiceConfig for IngestConfig {
    const ENV: EnvLayout<'static> =
        EnvLayout { prefix: "INGEST_", pass_through: &["kafka"], flag_variables: &["CONFIG"] };

    fn check(&self) -> Result<(), ConfigError> {
        if self.max_in_flight == 0 || self.max_in_flight > usize::from(u16::MAX) {
            return Err(ConfigError("max_in_flight must be between 1 and 65535".into()));
        }
        if self.mqtt.subscriptions.is_empty() {
            return Err(ConfigError("mqtt.subscriptions is empty: ingest would receive nothing".into()));
        }
        for filter in &self.mqtt.subscriptions {
            if !rumqttc::valid_filter(filter) {
                return Err(ConfigError(format!("mqtt.subscriptions: {filter:?} is not a valid MQTT topic filter")));
            }
        }
        if self.mqtt.connections == 0 || self.mqtt.connections > 64 {
            return Err(ConfigError("mqtt.connections must be between 1 and 64".into()));
        }
        if self.mqtt.connections > 1 && self.mqtt.share_group.is_empty() {
            return Err(ConfigError(
                "mqtt.connections above 1 needs mqtt.share_group: without a shared subscription every session would \
                 get every message"
                    .into(),
            ));
        }
        if self.mqtt.share_group.contains(['/', '+', '#']) {
            return Err(ConfigError(format!(
                "mqtt.share_group {:?} may not contain '/', '+' or '#'",
                self.mqtt.share_group
            )));
        }
        if self.mqtt.tls.client_cert_file.is_some() != self.mqtt.tls.client_key_file.is_some() {
            return Err(ConfigError("mqtt.tls: give both client_cert_file and client_key_file, or neither".into()));
        }
        if self.mqtt.username.is_none() && self.mqtt.password.is_some() {
            return Err(ConfigError("mqtt.password is set without mqtt.username".into()));
        }
        if self.mqtt.max_payload_bytes == 0 || self.mqtt.max_payload_bytes >= self.mqtt.max_packet_bytes as usize {
            return Err(ConfigError(
                "mqtt.max_payload_bytes must be at least 1 and below mqtt.max_packet_bytes".into(),
            ));
        }
        if self.mqtt.max_packet_bytes > crate::mqtt::MQTT_MAX_PACKET_BYTES {
            return Err(ConfigError(format!(
                "mqtt.max_packet_bytes may be at most {} (MQTT's own limit)",
                crate::mqtt::MQTT_MAX_PACKET_BYTES
            )));
        }
        if self.mqtt.url.is_empty() {
            if self.grpc.listen.is_empty() && self.http.listen.is_empty() && self.mqtt_proxy.listen.is_empty() {
                return Err(ConfigError(
                    "mqtt.url, grpc.listen, http.listen and mqtt_proxy.listen are all empty: ingest would take \
                     nothing in"
                        .into(),
                ));
            }
        } else {
            crate::mqtt::parse_url(&self.mqtt.url).map_err(|e| ConfigError(e.to_string()))?;
        }
        if self.http.max_body_bytes == 0
            || self.http.max_readings_per_request == 0
            || self.http.max_concurrent_requests == 0
        {
            return Err(ConfigError(
                "http.max_body_bytes, http.max_readings_per_request and http.max_concurrent_requests must be at least 1"
                    .into(),
            ));
        }
        let proxy = &self.mqtt_proxy;
        if proxy.max_connections == 0
            || proxy.receive_maximum == 0
            || proxy.connect_timeout_seconds == 0
            || proxy.max_keep_alive_seconds == 0
        {
            return Err(ConfigError(
                "mqtt_proxy: max_connections, receive_maximum, connect_timeout_seconds and \
                 max_keep_alive_seconds must be at least 1"
                    .into(),
            ));
        }
        if proxy.max_packet_bytes < 128 || proxy.max_packet_bytes > crate::mqtt::MQTT_MAX_PACKET_BYTES {
            return Err(ConfigError(format!(
                "mqtt_proxy.max_packet_bytes must be between 128 and {}",
                crate::mqtt::MQTT_MAX_PACKET_BYTES
            )));
        }
        if proxy.max_in_flight_bytes < proxy.max_packet_bytes as usize
            || proxy.max_in_flight_bytes > tokio::sync::Semaphore::MAX_PERMITS
        {
            return Err(ConfigError(
                "mqtt_proxy.max_in_flight_bytes must be at least mqtt_proxy.max_packet_bytes (and below 2^61)".into(),
            ));
        }
        let required = |tls: &Option<crate::tls::ServerTlsConfig>| {
            tls.as_ref().is_some_and(|t| t.client_certificates == crate::tls::ClientCertificates::Required)
        };
        if proxy.device_id_from == crate::proxy::access::DeviceIdFrom::CertificateCn && !required(&proxy.tls) {
            return Err(ConfigError(
                "mqtt_proxy.device_id_from = \"certificate-cn\" needs mqtt_proxy.tls with client_certificates = \
                 \"required\" (every device presents a verified certificate)"
                    .into(),
            ));
        }
        for (key, tls) in [("mqtt_proxy.tls", &proxy.tls), ("http.tls", &self.http.tls)] {
            if let Some(tls) = tls {
                tls.check(key).map_err(ConfigError)?;
            }
        }
        crate::proxy::access::Acl::new(&proxy.acl).map_err(|e| ConfigError(format!("mqtt_proxy.acl: {e}")))?;
        if self.dead_letter_topic.is_empty() {
            return Err(ConfigError("dead_letter_topic is empty".into()));
        }
        crate::routing::Routes::new(&self.rules).map_err(|e| ConfigError(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use admin::layered_config::NO_ENV;
    use std::path::Path;

    #[test]
    fn layers_apply_in_order_defaults_file_env_flags() {
        let file = test_support::temp_file(
            "ingest.toml",
            r#"
max_in_flight = 64
dead_letter_topic = "from-file"
[mqtt]
url = "mqtt://file:1883"
protocol = "3.1.1"
[kafka]
"bootstrap.servers" = "file:9092"
"linger.ms" = "20"
[[rules]]
regex = '^plant/(?P<machine>[^/]+)$'
topic = "plant"
key = "{machine}"
payload = "raw"
"#,
        );
        let config = IngestConfig::load(
            Some(&file.path),
            [
                ("INGEST_MQTT__URL", "mqtt://env:1883"),
                ("INGEST_MAX_IN_FLIGHT", "128"),
                ("INGEST_KAFKA__SASL_MECHANISM", "PLAIN"),
                ("OTHER_VARIABLE", "ignored"),
                // Names the file for the `--config` flag (which clap read): not a key.
                ("INGEST_CONFIG", "/etc/vigil/ingest.toml"),
            ],
            &crate::cli::flag_values(&["--kafka-brokers", "flag:9092"]),
        )
        .unwrap();
        assert_eq!(config.mqtt.url, "mqtt://env:1883", "env over file");
        assert_eq!(config.mqtt.protocol, MqttProtocol::V311, "file over defaults");
        assert_eq!(config.max_in_flight, 128);
        assert_eq!(config.dead_letter_topic, "from-file");
        assert_eq!(config.kafka["bootstrap.servers"], "flag:9092", "flag over file");
        assert_eq!(config.kafka["linger.ms"], "20");
        assert_eq!(config.kafka["sasl.mechanism"], "PLAIN");
        assert_eq!(config.rules.len(), 1, "the file's rules replace the default rule");
        assert_eq!(config.rules[0].payload, PayloadKind::Raw);
        assert_eq!(config.mqtt.share_group, "vigil-ingest", "untouched defaults stay");
    }

    #[test]
    fn numeric_looking_environment_values_stay_strings_where_strings_are_expected() {
        let config = IngestConfig::load(
            None,
            [
                ("INGEST_MQTT__USERNAME", "4711"),
                ("INGEST_MQTT__PASSWORD", "12345"),
                ("INGEST_MQTT__CLIENT_ID", "007"),
                ("INGEST_KAFKA__LINGER_MS", "10"),
                ("INGEST_MQTT__SUBSCRIPTIONS", r#"["plant/+/temp", "plant/#"]"#),
                ("INGEST_MQTT__KEEP_ALIVE_SECONDS", "15"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(config.mqtt.username.as_deref(), Some("4711"));
        assert_eq!(config.mqtt.password.as_deref(), Some("12345"));
        assert_eq!(config.mqtt.client_id, "007", "not the number 7");
        assert_eq!(config.kafka["linger.ms"], "10");
        assert_eq!(config.mqtt.subscriptions, ["plant/+/temp", "plant/#"], "a list parses");
        assert_eq!(config.mqtt.keep_alive_seconds, 15, "a number where one is expected");
    }

    #[test]
    fn mistakes_are_reported_with_their_key() {
        let load = |text: &str| {
            let file = test_support::temp_file("bad.toml", text);
            IngestConfig::load(Some(&file.path), NO_ENV, &[]).unwrap_err().to_string()
        };
        assert!(load("max_inflight = 3").contains("max_inflight"), "unknown keys are refused");
        assert!(load("[mqtt]\nprotocol = \"4\"").contains("protocol"));
        assert!(load("max_in_flight = 0").contains("max_in_flight"));
        assert!(load("[mqtt]\nsubscriptions = [\"a/#/b\"]").contains("a/#/b"));
        assert!(load("[[rules]]\nfilter = \"a\"\ntopic = \"t-{x}\"").contains("mapping rule 0"));
        assert!(load("[mqtt]\nurl = \"\"\n[grpc]\nlisten = \"\"").contains("would take nothing in"));
        assert!(load("[mqtt_proxy]\nacl = [\"a/#/{device}\"]").contains("mqtt_proxy.acl"));
        assert!(load("[mqtt_proxy]\nreceive_maximum = 0").contains("receive_maximum"));
        assert!(load("[http]\nmax_concurrent_requests = 0").contains("max_concurrent_requests"));
        let missing = IngestConfig::load(Some(Path::new("/nonexistent/ingest.toml")), NO_ENV, &[]);
        assert!(missing.unwrap_err().to_string().contains("/nonexistent/ingest.toml"));
    }
}
