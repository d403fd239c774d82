//! Live publishing: the fleet's readings over MQTT, as the seed demo's cars send them
//! (QoS 1 to `vehicles/sensor/data/<device-id>`, Vigil's JSON form with the label).
//!
//! By default every car is its own MQTT client, as in a real fleet; `cars_per_connection`
//! multiplexes several cars over one connection for fleets larger than the broker's
//! connection limit. Each connection steps its cars every `interval` and publishes; the
//! client's bounded request queue is the backpressure (a slow broker slows the cars rather
//! than growing memory). The event loop is polled continuously (acks and pings depend on
//! it); when the connection drops, it reconnects with exponential backoff, resumes its
//! persistent session and rumqttc resends the unacknowledged QoS 1 messages. At the end (reading count reached or
//! shutdown) each connection waits for its outstanding acks before disconnecting, so the
//! report's counts are final.
//!
//! Connections speak MQTT 5 by default, or 3.1.1 ([`MqttVersion`]), optionally logged in
//! and over TLS with a client certificate. Over MQTT 5 a share of readings
//! ([`PublishOptions::trace_share`]) carries a W3C `traceparent` user property naming a
//! span of the device's own, so those readings' traces start at the device. Several
//! simulator replicas split one fleet by car index ([`PublishOptions::replica`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::trace::{SpanKind, TraceContextExt as _, Tracer as _};
use prost_types::Timestamp;
use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};
use rumqttc::QoS;
use tokio::sync::watch;

use crate::car::Car;
use crate::fleet::FleetOptions;
use crate::metrics::PublishMetrics;

/// The seed demo's topic layout; the device id is appended as the last level.
pub const DEFAULT_TOPIC_PREFIX: &str = "vehicles/sensor/data";

/// The instrumentation scope of the device's spans.
pub const TRACE_SCOPE: &str = "vigil-device-simulator";

/// The MQTT version a connection speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MqttVersion {
    /// MQTT 5: user properties (trace context), reason codes on acks.
    #[default]
    #[value(name = "5")]
    V5,
    /// MQTT 3.1.1.
    #[value(name = "3.1.1")]
    V311,
}

/// TLS to the broker: the CA its certificate is checked against (`None`: the system's
/// roots) and, for brokers that require one, the client's certificate and PKCS#8 key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    pub ca: Option<std::path::PathBuf>,
    pub client_cert: Option<std::path::PathBuf>,
    pub client_key: Option<std::path::PathBuf>,
}

/// This replica's part of the fleet: cars whose index modulo `count` is `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replica {
    pub index: usize,
    pub count: usize,
}

impl Replica {
    fn owns(self, car: usize) -> bool {
        car % self.count == self.index
    }
}

#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub host: String,
    pub port: u16,
    pub topic_prefix: String,
    /// Time between two readings of one car (also the simulated time step).
    pub interval: Duration,
    /// Stop after this many readings per car (`None`: until shutdown).
    pub readings_per_car: Option<u64>,
    pub cars_per_connection: usize,
    pub client_id_prefix: String,
    /// The fleet's clock origin: event times are `start` + simulated time.
    pub start: Timestamp,
    /// How long to wait for outstanding acks at the end.
    pub drain_timeout: Duration,
    /// Simulated time each car drives before its first published reading (in steps of
    /// `interval`), so a short run starts with warm engines rather than every car's cold
    /// start at once. Event times still begin at `start`; fault onsets count from the
    /// car's own start, that is, they include this time.
    pub warm_up: Duration,
    pub version: MqttVersion,
    /// Username and password to log in with.
    pub credentials: Option<(String, String)>,
    /// TLS to the broker (`None`: plain TCP).
    pub tls: Option<TlsOptions>,
    /// Share of readings (0-1) that carry a `traceparent` user property (MQTT 5 only).
    pub trace_share: f64,
    /// Publish only this replica's cars (`None`: the whole fleet).
    pub replica: Option<Replica>,
}

impl PublishOptions {
    /// Options for a broker at `host:port` with the seed's topics, one reading per second.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            topic_prefix: DEFAULT_TOPIC_PREFIX.into(),
            interval: Duration::from_secs(1),
            readings_per_car: None,
            cars_per_connection: 1,
            client_id_prefix: "vigil-sim".into(),
            start: std::time::SystemTime::now().into(),
            drain_timeout: Duration::from_secs(10),
            warm_up: Duration::ZERO,
            version: MqttVersion::V5,
            credentials: None,
            tls: None,
            trace_share: 0.0,
            replica: None,
        }
    }
}

/// What was sent: readings handed to the MQTT client, acknowledged by the broker, and
/// published readings by ground-truth label.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Report {
    pub published: u64,
    pub acknowledged: u64,
    pub by_label: BTreeMap<String, u64>,
}

/// Publishes until every car sent `readings_per_car` readings or `shutdown` resolves,
/// counting what happens in `metrics`.
pub async fn publish(
    fleet: &FleetOptions,
    options: &PublishOptions,
    metrics: &PublishMetrics,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Report> {
    anyhow::ensure!(options.cars_per_connection > 0, "cars per connection must be positive");
    anyhow::ensure!(!options.interval.is_zero(), "the publishing interval must be positive");
    anyhow::ensure!((0.0..=1.0).contains(&options.trace_share), "the traced share must be between 0 and 1");
    anyhow::ensure!(
        options.trace_share == 0.0 || options.version == MqttVersion::V5,
        "trace context travels as MQTT 5 user properties: tracing needs MQTT 5"
    );
    if let Some(replica) = options.replica {
        anyhow::ensure!(replica.index < replica.count, "replica {} of {} does not exist", replica.index, replica.count);
    }
    let transport = match &options.tls {
        Some(tls) => Some(mqtt_client::tls_transport(mqtt_client::TlsFiles {
            ca: tls.ca.as_deref(),
            client_cert: tls.client_cert.as_deref(),
            client_key: tls.client_key.as_deref(),
        })?),
        None => None,
    };
    let (stop, stopped) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let indices: Vec<usize> = (0..fleet.cars).filter(|&i| options.replica.is_none_or(|r| r.owns(i))).collect();
    if let (Some(replica), true) = (options.replica, indices.is_empty()) {
        anyhow::bail!("replica {} of {} has no cars: the fleet has {}", replica.index, replica.count, fleet.cars);
    }
    metrics.connections.set(indices.len().div_ceil(options.cars_per_connection) as i64);
    for (n, chunk) in indices.chunks(options.cars_per_connection).enumerate() {
        let cars: Vec<Car> = chunk.iter().map(|&i| crate::fleet::car(fleet, i)).collect();
        // Client ids are unique across the fleet, so replicas never take over each
        // other's sessions.
        let prefix = &options.client_id_prefix;
        let client_id = match (options.cars_per_connection, options.replica) {
            (1, _) => format!("{prefix}-{}", cars[0].device_id),
            (_, None) => format!("{prefix}-conn-{n}"),
            (_, Some(replica)) => format!("{prefix}-replica-{}-conn-{n}", replica.index),
        };
        let client = Connection { client_id, transport: transport.clone() };
        connections.spawn(connection(client, cars, options.clone(), metrics.clone(), stopped.clone()));
    }
    let all_done = async {
        let mut report = Report::default();
        while let Some(result) = connections.join_next().await {
            let part = result??;
            report.published += part.published;
            report.acknowledged += part.acknowledged;
            for (label, count) in part.by_label {
                *report.by_label.entry(label).or_default() += count;
            }
        }
        anyhow::Ok(report)
    };
    tokio::pin!(all_done);
    tokio::select! {
        report = &mut all_done => report,
        () = shutdown => {
            let _ = stop.send(true);
            all_done.await
        }
    }
}

/// A connection's MQTT client id and TLS transport (`None`: plain TCP).
struct Connection {
    client_id: String,
    transport: Option<rumqttc::Transport>,
}

/// A connection's client, in the MQTT version it speaks.
enum Client {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Client {
    /// Opens the connection (a persistent session, so a dropped connection resumes and
    /// rumqttc resends the unacknowledged readings) and starts its event loop.
    fn open(
        connection: Connection,
        options: &PublishOptions,
        mut counts: ConnectionCounts,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let Connection { client_id, transport } = connection;
        let keep_alive = Duration::from_secs(30);
        match options.version {
            MqttVersion::V311 => {
                let mut mqtt = rumqttc::MqttOptions::new(&client_id, &options.host, options.port);
                mqtt.set_keep_alive(keep_alive).set_max_packet_size(1 << 20, 1 << 20).set_clean_session(false);
                if let Some((user, password)) = &options.credentials {
                    mqtt.set_credentials(user, password);
                }
                if let Some(transport) = transport {
                    mqtt.set_transport(transport);
                }
                let (client, mut event_loop) = rumqttc::AsyncClient::new(mqtt, 64);
                let driver = tokio::spawn(async move {
                    use rumqttc::{Event, Packet};
                    loop {
                        match event_loop.poll().await {
                            Ok(Event::Incoming(Packet::PubAck(_))) => counts.acknowledged(true),
                            Ok(Event::Incoming(Packet::ConnAck(_))) => counts.connected(),
                            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return counts.disconnected(),
                            Ok(_) => {}
                            Err(error) => counts.failed(&error.to_string()).await,
                        }
                    }
                });
                (Client::V311(client), driver)
            }
            MqttVersion::V5 => {
                let mut mqtt = rumqttc::v5::MqttOptions::new(&client_id, &options.host, options.port);
                // MQTT 5 keeps a session only while its expiry interval runs: an hour.
                mqtt.set_keep_alive(keep_alive)
                    .set_max_packet_size(Some(1 << 20))
                    .set_clean_start(false)
                    .set_session_expiry_interval(Some(3600));
                if let Some((user, password)) = &options.credentials {
                    mqtt.set_credentials(user, password);
                }
                if let Some(transport) = transport {
                    mqtt.set_transport(transport);
                }
                let (client, mut event_loop) = rumqttc::v5::AsyncClient::new(mqtt, 64);
                let driver = tokio::spawn(async move {
                    use rumqttc::v5::Event;
                    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
                    loop {
                        match event_loop.poll().await {
                            Ok(Event::Incoming(Packet::PubAck(ack))) => counts.acknowledged(matches!(
                                ack.reason,
                                PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                            )),
                            Ok(Event::Incoming(Packet::ConnAck(_))) => counts.connected(),
                            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return counts.disconnected(),
                            Ok(_) => {}
                            Err(error) => counts.failed(&error.to_string()).await,
                        }
                    }
                });
                (Client::V5(client), driver)
            }
        }
    }

    /// Queues one reading (QoS 1), with trace context as user properties over MQTT 5.
    async fn publish(&self, topic: String, payload: String, context: Vec<(String, String)>) -> anyhow::Result<()> {
        match self {
            Client::V311(client) => client.publish(topic, QoS::AtLeastOnce, false, payload).await?,
            Client::V5(client) => {
                let properties =
                    rumqttc::v5::mqttbytes::v5::PublishProperties { user_properties: context, ..Default::default() };
                client
                    .publish_with_properties(
                        topic,
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        false,
                        payload,
                        properties,
                    )
                    .await?;
            }
        }
        Ok(())
    }

    async fn disconnect(&self) {
        let _ = match self {
            Client::V311(client) => client.disconnect().await.map_err(drop),
            Client::V5(client) => client.disconnect().await.map_err(drop),
        };
    }
}

/// What a connection's event loop (its only owner) reports: acks, whether it is up,
/// failures, and the backoff between attempts.
struct ConnectionCounts {
    client_id: String,
    /// Shared with the publishing side, which waits for the acks at the end.
    acknowledged: Arc<AtomicU64>,
    metrics: PublishMetrics,
    up: bool,
    backoff: admin::retry::Backoff,
}

impl ConnectionCounts {
    fn new(client_id: String, metrics: PublishMetrics) -> Self {
        let backoff = admin::retry::Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        Self { client_id, acknowledged: Arc::new(AtomicU64::new(0)), metrics, up: false, backoff }
    }

    /// A PUBACK: the reading is the broker's (`accepted`), or it refused it (an MQTT 5
    /// reason code such as not authorized), which is logged and not counted.
    fn acknowledged(&self, accepted: bool) {
        if accepted {
            self.acknowledged.fetch_add(1, Ordering::Relaxed);
            self.metrics.acknowledged.inc();
        } else {
            self.metrics.refused.inc();
            tracing::warn!(client_id = self.client_id, "the broker refused a reading");
        }
    }

    fn set_up(&mut self, now: bool) {
        if self.up != now {
            self.metrics.connected.add(if now { 1 } else { -1 });
            self.up = now;
        }
    }

    fn connected(&mut self) {
        self.backoff.reset();
        self.set_up(true);
    }

    fn disconnected(&mut self) {
        self.set_up(false);
    }

    /// A failed connection or attempt: counted, then waited out before the next attempt.
    async fn failed(&mut self, error: &str) {
        self.set_up(false);
        self.metrics.connection_errors.inc();
        let wait = self.backoff.next_delay();
        tracing::warn!(
            client_id = self.client_id,
            error,
            retry_in_ms = wait.as_millis() as u64,
            "mqtt connection failed"
        );
        tokio::time::sleep(wait).await;
    }
}

/// The trace context a traced reading carries: a span of the device's own (exported when
/// telemetry is configured) or, with no tracer installed, a new sampled root context, so
/// the reading's trace starts at the device either way.
fn device_trace_context(device_id: &str, ids: &mut StdRng) -> Vec<(String, String)> {
    let tracer = telemetry::tracer(TRACE_SCOPE);
    let span = tracer
        .span_builder("publish reading")
        .with_kind(SpanKind::Producer)
        .with_attributes([opentelemetry::KeyValue::new("vigil.device.id", device_id.to_owned())])
        .start_with_context(&tracer, &opentelemetry::Context::new());
    let cx = opentelemetry::Context::new().with_span(span);
    let mut headers: Vec<(String, String)> =
        telemetry::context_headers(&cx).into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    if headers.is_empty() {
        let (trace_id, span_id) = (ids.random::<u128>().max(1), ids.random::<u64>().max(1));
        headers.push((telemetry::TRACEPARENT.to_owned(), format!("00-{trace_id:032x}-{span_id:016x}-01")));
    }
    headers
}

async fn connection(
    connection: Connection,
    mut cars: Vec<Car>,
    options: PublishOptions,
    metrics: PublishMetrics,
    mut stopped: watch::Receiver<bool>,
) -> anyhow::Result<Report> {
    let client_id = connection.client_id.clone();
    let counts = ConnectionCounts::new(client_id.clone(), metrics.clone());
    let acknowledged = Arc::clone(&counts.acknowledged);
    let (client, driver) = Client::open(connection, &options, counts);
    // Which readings are traced, and their ids when no tracer makes them.
    let mut trace_rng = StdRng::seed_from_u64(
        client_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
            ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
    );

    let mut report = Report::default();
    let dt = options.interval.as_secs_f64();
    let mut ticks = tokio::time::interval(options.interval);
    let mut sent_per_car = 0u64;
    let warm_up_steps = (options.warm_up.as_secs_f64() / dt).round() as u64;
    // Driven but not published; their event times are shifted back so published ones
    // begin at `start`.
    let warm_up_start = shift_back(&options.start, warm_up_steps as f64 * dt);
    for car in &mut cars {
        for _ in 0..warm_up_steps {
            car.step(dt, &warm_up_start);
        }
    }
    let start = if warm_up_steps > 0 { warm_up_start } else { options.start };
    loop {
        if options.readings_per_car.is_some_and(|n| sent_per_car >= n) || *stopped.borrow() {
            break;
        }
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped.changed() => break,
        }
        for car in &mut cars {
            let reading = car.step(dt, &start);
            let topic = format!("{}/{}", options.topic_prefix, reading.device_id);
            let label = sensor::fault_name(reading.fault());
            let context = if options.trace_share > 0.0 && trace_rng.random_bool(options.trace_share) {
                metrics.traced.inc();
                device_trace_context(&reading.device_id, &mut trace_rng)
            } else {
                Vec::new()
            };
            client.publish(topic, sensor::json::to_json(&reading), context).await?;
            report.published += 1;
            metrics.published.with_label_values(&[label.as_str()]).inc();
            *report.by_label.entry(label).or_default() += 1;
        }
        sent_per_car += 1;
    }

    // Wait for the broker to acknowledge what was sent, then leave cleanly.
    let deadline = tokio::time::Instant::now() + options.drain_timeout;
    while acknowledged.load(Ordering::Relaxed) < report.published && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    report.acknowledged = acknowledged.load(Ordering::Relaxed);
    if report.acknowledged < report.published {
        tracing::warn!(
            client_id,
            published = report.published,
            acknowledged = report.acknowledged,
            "unacknowledged readings at shutdown"
        );
    }
    client.disconnect().await;
    let mut driver = driver;
    if tokio::time::timeout(Duration::from_secs(2), &mut driver).await.is_err() {
        driver.abort();
    }
    Ok(report)
}

/// `start` moved `seconds` earlier.
fn shift_back(start: &prost_types::Timestamp, seconds: f64) -> prost_types::Timestamp {
    let nanos = i128::from(start.seconds) * 1_000_000_000 + i128::from(start.nanos) - (seconds * 1e9) as i128;
    prost_types::Timestamp {
        seconds: nanos.div_euclid(1_000_000_000) as i64,
        nanos: nanos.rem_euclid(1_000_000_000) as i32,
    }
}
