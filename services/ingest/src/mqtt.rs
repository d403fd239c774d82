//! The MQTT side: one persistent session, readings acknowledged only after Kafka has
//! them, acknowledgements in arrival order, a bounded number in flight.
//!
//! Each PUBLISH is converted and handed to the producer as it arrives, and its delivery
//! future joins a `FuturesOrdered`: completions come out in arrival order, so the PUBACKs
//! go out in the order the PUBLISHes came, as the MQTT spec requires, whatever order
//! Kafka's partitions confirm in. When `max_in_flight` messages await Kafka, the event
//! loop is not polled for more (with MQTT 5 the broker already stops at the receive
//! maximum, which is set to the same bound). The session is persistent (clean start off,
//! a session expiry with MQTT 5), so what was not acknowledged when ingest stopped or
//! crashed is redelivered when it reconnects; subscriptions are renewed whenever the
//! broker reports a new session.
//!
//! After a lost connection, acks still waiting here for messages of the old connection
//! are dropped (see [`AckToken`]); acks already handed to rumqttc's request queue when
//! the connection dropped can still go out on the new one, a window of microseconds.
//!
//! Shutdown stops taking messages, waits (under the grace period) for Kafka to confirm
//! what was taken, acknowledges it, and disconnects; messages that arrived after the
//! stop are left unacknowledged for the broker to redeliver.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use futures::stream::FuturesOrdered;
use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
use rumqttc::{Packet as Packet4, QoS};

use crate::config::{IngestConfig, MqttProtocol, MqttTlsConfig};
use crate::kafka::{Sink, SinkError, Written};
use crate::metrics::Metrics;
use crate::record::{MqttChecks, MqttMessage, from_mqtt};
use crate::routing::Routes;
use crate::trace;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The broker's URL or TLS files.
    #[error(transparent)]
    Client(#[from] mqtt_client::MqttClientError),
    #[error(transparent)]
    Kafka(#[from] SinkError),
}

/// Where the broker is, from `mqtt.url`.
pub use mqtt_client::Endpoint;

/// `mqtt://host[:port]` (or `tcp://`; port 1883 when left out) or `mqtts://host[:port]`
/// (or `ssl://`; TLS, port 8883 when left out).
pub fn parse_url(text: &str) -> Result<Endpoint, SourceError> {
    mqtt_client::parse_url(text).map_err(SourceError::from)
}

/// The TLS transport for `config`: the broker verified against the configured CA (or the
/// system's roots), a client certificate when one is configured.
fn tls_transport(config: &MqttTlsConfig) -> Result<rumqttc::Transport, SourceError> {
    let files = mqtt_client::TlsFiles {
        ca: config.ca_file.as_deref(),
        client_cert: config.client_cert_file.as_deref(),
        client_key: config.client_key_file.as_deref(),
    };
    mqtt_client::tls_transport(files).map_err(SourceError::from)
}

/// What a PUBACK needs: the packet id, and which connection the PUBLISH came on. Packet
/// ids are per connection: after a reconnect the broker resends what was unacknowledged
/// and may reuse an id for another message, so an ack left over from the old connection
/// could acknowledge a message Kafka does not have yet. Such acks are dropped instead;
/// the resent copy is written and acknowledged on its own (a duplicate in Kafka, never a
/// loss).
#[derive(Debug, Clone, Copy)]
struct AckToken {
    pkid: u16,
    connection: u64,
}

/// A received message, owned.
struct Received {
    topic: String,
    payload: bytes::Bytes,
    qos: u8,
    user_properties: Vec<(String, String)>,
    content_type: Option<String>,
    ack: Option<AckToken>,
}

enum SessionEvent {
    Message(Received),
    Connected {
        session_present: bool,
    },
    /// A SUBACK: `Err` names the refusal of the first filter refused.
    Subscribed(Result<(), String>),
    /// Our DISCONNECT went out.
    Disconnected,
    Other,
}

/// rumqttc's MQTT 5 and 3.1.1 clients behind one face.
enum Session {
    V5(rumqttc::v5::AsyncClient, Box<rumqttc::v5::EventLoop>),
    V311(rumqttc::AsyncClient, Box<rumqttc::EventLoop>),
}

impl Session {
    /// A session reading packets of up to `max_packet_bytes` (MQTT 5 tells the broker).
    fn connect(
        config: &IngestConfig,
        client_id: &str,
        endpoint: Endpoint,
        max_packet_bytes: u32,
    ) -> Result<Self, SourceError> {
        let mqtt = &config.mqtt;
        let transport = if endpoint.tls { Some(tls_transport(&mqtt.tls)?) } else { None };
        let (host, port) = (endpoint.host, endpoint.port);
        let password = mqtt.password.clone().unwrap_or_default();
        // Room for an acknowledgement per message in flight plus the subscriptions, so
        // queueing an ack never waits for the event loop (which only this task polls).
        let capacity = config.max_in_flight * 2 + mqtt.subscriptions.len() + 16;
        let keep_alive = Duration::from_secs(mqtt.keep_alive_seconds);
        match mqtt.protocol {
            MqttProtocol::V5 => {
                let mut options = rumqttc::v5::MqttOptions::new(client_id, host, port);
                options
                    .set_keep_alive(keep_alive)
                    .set_clean_start(false)
                    .set_session_expiry_interval(Some(mqtt.session_expiry_seconds))
                    .set_receive_maximum(Some(config.max_in_flight as u16))
                    .set_max_packet_size(Some(max_packet_bytes))
                    .set_manual_acks(true);
                if let Some(user) = &mqtt.username {
                    options.set_credentials(user, &password);
                }
                if let Some(transport) = transport {
                    options.set_transport(transport);
                }
                let (client, events) = rumqttc::v5::AsyncClient::new(options, capacity);
                Ok(Self::V5(client, Box::new(events)))
            }
            MqttProtocol::V311 => {
                let mut options = rumqttc::MqttOptions::new(client_id, host, port);
                options
                    .set_keep_alive(keep_alive)
                    .set_clean_session(false)
                    // Outgoing: acks and subscriptions only.
                    .set_max_packet_size(max_packet_bytes as usize, 64 * 1024)
                    .set_manual_acks(true);
                if let Some(user) = &mqtt.username {
                    options.set_credentials(user, &password);
                }
                if let Some(transport) = transport {
                    options.set_transport(transport);
                }
                let (client, events) = rumqttc::AsyncClient::new(options, capacity);
                Ok(Self::V311(client, Box::new(events)))
            }
        }
    }

    async fn poll(&mut self) -> Result<SessionEvent, PollError> {
        match self {
            Self::V5(_, events) => match events.poll().await.map_err(PollError::v5)? {
                rumqttc::v5::Event::Incoming(Packet5::Publish(publish)) => {
                    let properties = publish.properties.unwrap_or_default();
                    let qos = publish.qos as u8;
                    Ok(SessionEvent::Message(Received {
                        topic: String::from_utf8_lossy(&publish.topic).into_owned(),
                        payload: publish.payload,
                        qos,
                        user_properties: properties.user_properties,
                        content_type: properties.content_type,
                        ack: (qos > 0).then_some(AckToken { pkid: publish.pkid, connection: 0 }),
                    }))
                }
                rumqttc::v5::Event::Incoming(Packet5::ConnAck(ack)) => {
                    Ok(SessionEvent::Connected { session_present: ack.session_present })
                }
                rumqttc::v5::Event::Incoming(Packet5::SubAck(ack)) => Ok(SessionEvent::Subscribed(
                    match ack
                        .return_codes
                        .iter()
                        .find(|c| !matches!(c, rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)))
                    {
                        Some(refused) => Err(format!("{refused:?}")),
                        None => Ok(()),
                    },
                )),
                rumqttc::v5::Event::Outgoing(rumqttc::Outgoing::Disconnect) => Ok(SessionEvent::Disconnected),
                _ => Ok(SessionEvent::Other),
            },
            Self::V311(_, events) => match events.poll().await.map_err(PollError::v311)? {
                rumqttc::Event::Incoming(Packet4::Publish(publish)) => {
                    let qos = publish.qos as u8;
                    Ok(SessionEvent::Message(Received {
                        topic: publish.topic,
                        payload: publish.payload,
                        qos,
                        user_properties: Vec::new(),
                        content_type: None,
                        ack: (qos > 0).then_some(AckToken { pkid: publish.pkid, connection: 0 }),
                    }))
                }
                rumqttc::Event::Incoming(Packet4::ConnAck(ack)) => {
                    Ok(SessionEvent::Connected { session_present: ack.session_present })
                }
                rumqttc::Event::Incoming(Packet4::SubAck(ack)) => Ok(SessionEvent::Subscribed(
                    match ack.return_codes.iter().find(|c| !matches!(c, rumqttc::SubscribeReasonCode::Success(_))) {
                        Some(refused) => Err(format!("{refused:?}")),
                        None => Ok(()),
                    },
                )),
                rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect) => Ok(SessionEvent::Disconnected),
                _ => Ok(SessionEvent::Other),
            },
        }
    }

    fn subscribe(&self, filter: &str) -> Result<(), String> {
        match self {
            Self::V5(client, _) => {
                client.try_subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce).map_err(|e| e.to_string())
            }
            Self::V311(client, _) => client.try_subscribe(filter, QoS::AtLeastOnce).map_err(|e| e.to_string()),
        }
    }

    /// Queues the PUBACK; `false` when the request queue is full (try again later).
    fn try_ack(&self, token: AckToken) -> bool {
        match self {
            Self::V5(client, _) => {
                let mut publish = rumqttc::v5::mqttbytes::v5::Publish::new(
                    "",
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    Vec::new(),
                    None,
                );
                publish.pkid = token.pkid;
                client.try_ack(&publish).is_ok()
            }
            Self::V311(client, _) => {
                let mut publish = rumqttc::Publish::new("", QoS::AtLeastOnce, Vec::new());
                publish.pkid = token.pkid;
                client.try_ack(&publish).is_ok()
            }
        }
    }

    fn disconnect(&self) {
        match self {
            Self::V5(client, _) => drop(client.try_disconnect()),
            Self::V311(client, _) => drop(client.try_disconnect()),
        }
    }
}

/// MQTT's own largest packet: the most its remaining-length field can say.
pub const MQTT_MAX_PACKET_BYTES: u32 = 268_435_455;

/// Why polling the session failed.
struct PollError {
    text: String,
    /// The connection broke on a packet of this many bytes, over the session's limit.
    oversized: Option<usize>,
}

impl PollError {
    fn v5(error: rumqttc::v5::ConnectionError) -> Self {
        use rumqttc::v5::mqttbytes::Error as Bytes;
        use rumqttc::v5::{ConnectionError, StateError};
        let oversized = match &error {
            ConnectionError::MqttState(StateError::Deserialization(Bytes::PayloadSizeLimitExceeded {
                pkt_size,
                ..
            })) => Some(*pkt_size),
            _ => None,
        };
        Self { text: error.to_string(), oversized }
    }

    fn v311(error: rumqttc::ConnectionError) -> Self {
        use rumqttc::mqttbytes::Error as Bytes;
        use rumqttc::{ConnectionError, StateError};
        let oversized = match &error {
            ConnectionError::MqttState(StateError::Deserialization(Bytes::PayloadSizeLimitExceeded(size))) => {
                Some(*size)
            }
            _ => None,
        };
        Self { text: error.to_string(), oversized }
    }
}

type Pending = Pin<Box<dyn Future<Output = (Result<Written, SinkError>, Option<AckToken>)> + Send>>;

/// The bridge's sessions that are connected and subscribed: ingest is ready when all are.
struct Connected {
    up: std::sync::atomic::AtomicUsize,
    sessions: usize,
    metrics: Metrics,
    readiness: admin::Readiness,
}

impl Connected {
    /// Records that one session (whose state `was` holds) is now up or down.
    fn set(&self, was: &mut bool, now: bool) {
        use std::sync::atomic::Ordering::SeqCst;
        if *was == now {
            return;
        }
        let up = if now { self.up.fetch_add(1, SeqCst) + 1 } else { self.up.fetch_sub(1, SeqCst) - 1 };
        self.metrics.mqtt_connected.set(up as i64);
        self.readiness.set(up == self.sessions);
        *was = now;
    }
}

/// Bridges MQTT to Kafka until `shutdown` resolves; returns after the drain. Fails only
/// when the producer failed fatally (nothing more is acknowledged then).
///
/// With `mqtt.connections` above 1, that many sessions (client ids `<client_id>-<n>`) share
/// the subscription through `mqtt.share_group`, each with its own `max_in_flight`: the
/// window of readings awaiting Kafka grows with them, which is what bounds the rate when
/// Kafka's latency is high.
pub async fn run(
    config: &IngestConfig,
    routes: Arc<Routes>,
    sink: Sink,
    metrics: Metrics,
    readiness: admin::Readiness,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SourceError> {
    use futures::FutureExt as _;
    let endpoint = parse_url(&config.mqtt.url)?;
    let sessions = config.mqtt.connections;
    let connected =
        Connected { up: std::sync::atomic::AtomicUsize::new(0), sessions, metrics: metrics.clone(), readiness };
    let shutdown = shutdown.shared();
    let runs = (0..sessions).map(|n| {
        let client_id =
            if sessions == 1 { config.mqtt.client_id.clone() } else { format!("{}-{n}", config.mqtt.client_id) };
        run_session(
            config,
            client_id,
            endpoint.clone(),
            Arc::clone(&routes),
            sink.clone(),
            metrics.clone(),
            &connected,
            shutdown.clone(),
        )
    });
    futures::future::try_join_all(runs).await.map(|_| ())
}

/// One MQTT session of the bridge, as [`run`] describes.
#[allow(clippy::too_many_arguments)]
async fn run_session(
    config: &IngestConfig,
    client_id: String,
    endpoint: Endpoint,
    routes: Arc<Routes>,
    sink: Sink,
    metrics: Metrics,
    connected_sessions: &Connected,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SourceError> {
    let mut session = Session::connect(config, &client_id, endpoint.clone(), config.mqtt.max_packet_bytes)?;
    // Raised above mqtt.max_packet_bytes for one connection to read a message that broke
    // the last one (see `oversized`).
    let mut raised_limit = false;
    let filters: Vec<String> = config
        .mqtt
        .subscriptions
        .iter()
        .map(|f| {
            if config.mqtt.share_group.is_empty() {
                f.clone()
            } else {
                format!("$share/{}/{f}", config.mqtt.share_group)
            }
        })
        .collect();
    let mut in_flight: FuturesOrdered<Pending> = FuturesOrdered::new();
    let mut unsent_acks: VecDeque<AckToken> = VecDeque::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut stopping = false;
    let grace = tokio::time::sleep(Duration::from_secs(365 * 24 * 3600)); // set at shutdown
    let mut grace = std::pin::pin!(grace);
    let mut backoff = admin::retry::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    // Counts connection losses: an ack token from an earlier connection is stale.
    let mut connection: u64 = 0;
    // Ready (and counted as connected) once connected and subscribed.
    let mut connected = false;
    let mut set_connected = |now: bool| connected_sessions.set(&mut connected, now);

    loop {
        // Acks the queue had no room for go first, in order.
        while let Some(&token) = unsent_acks.front() {
            if !session.try_ack(token) {
                break;
            }
            unsent_acks.pop_front();
            metrics.mqtt_acked.inc();
        }
        if stopping && in_flight.is_empty() && unsent_acks.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            () = &mut shutdown, if !stopping => {
                tracing::info!(in_flight = in_flight.len(), "stopping: draining what Kafka has not confirmed");
                stopping = true;
                grace.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(config.shutdown_grace_seconds));
            }
            () = &mut grace, if stopping => {
                tracing::warn!(in_flight = in_flight.len(), "grace period over: leaving the rest unacknowledged for redelivery");
                break;
            }
            Some((written, ack)) = in_flight.next() => {
                metrics.in_flight.dec();
                written?;
                match ack {
                    Some(token) if token.connection == connection => unsent_acks.push_back(token),
                    Some(token) => {
                        tracing::debug!(pkid = token.pkid, "not acknowledging on a newer connection: the broker resends it");
                        metrics.mqtt_stale_acks.inc();
                    }
                    None => {}
                }
            }
            event = session.poll(), if in_flight.len() < config.max_in_flight || stopping => match event {
                Ok(SessionEvent::Message(received)) => {
                    if stopping {
                        continue; // not acknowledged: redelivered to the next session
                    }
                    metrics.received.with_label_values(&["mqtt"]).inc();
                    let message = MqttMessage {
                        topic: &received.topic,
                        payload: &received.payload,
                        qos: received.qos,
                        user_properties: &received.user_properties,
                        content_type: received.content_type.as_deref(),
                        received_at: SystemTime::now(),
                    };
                    let span = trace::mqtt_message(&received.topic, &received.user_properties);
                    let mut record = from_mqtt(&routes, &MqttChecks::of(config), &message);
                    trace::attach(&span, &mut record);
                    let delivery = sink.send(record);
                    let ack = received.ack.map(|token| AckToken { connection, ..token });
                    metrics.in_flight.inc();
                    in_flight.push_back(Box::pin(async move {
                        let written = delivery.await;
                        trace::written(&span, &written);
                        (written, ack)
                    }));
                }
                Ok(SessionEvent::Connected { session_present }) => {
                    tracing::info!(session_present, "mqtt connected");
                    backoff.reset();
                    if session_present {
                        set_connected(true); // the broker kept the subscriptions
                    } else {
                        // A new session: subscribe; ready once the broker confirmed.
                        for filter in &filters {
                            if let Err(error) = session.subscribe(filter) {
                                tracing::error!(filter, %error, "subscribing failed");
                            }
                        }
                    }
                }
                Ok(SessionEvent::Subscribed(Ok(()))) => {
                    tracing::info!(filters = ?filters, "subscribed");
                    set_connected(true);
                }
                Ok(SessionEvent::Subscribed(Err(refusal))) => {
                    tracing::error!(filters = ?filters, refusal, "the broker refused a subscription");
                }
                Ok(SessionEvent::Other | SessionEvent::Disconnected) => {}
                Err(error) => {
                    set_connected(false);
                    connection += 1;
                    // Their packet ids meant the lost connection.
                    metrics.mqtt_stale_acks.inc_by(unsent_acks.len() as u64);
                    unsent_acks.clear();
                    metrics.mqtt_connection_errors.inc();
                    if stopping {
                        break; // nothing more can be acknowledged on this connection
                    }
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %error.text, retry_in_ms = wait.as_millis() as u64, "mqtt connection failed");
                    tokio::time::sleep(wait).await;
                    if let Some(size) = error.oversized {
                        metrics.mqtt_oversized.inc();
                        tracing::error!(
                            bytes = size,
                            limit = config.mqtt.max_packet_bytes,
                            "the broker sent a message larger than mqtt.max_packet_bytes; reading it once on a \
                             connection with a raised limit to dead-letter it (set the broker's own limit, e.g. \
                             Mosquitto's message_size_limit, to refuse such messages at publish)"
                        );
                        let limit = u32::try_from(size).unwrap_or(MQTT_MAX_PACKET_BYTES).min(MQTT_MAX_PACKET_BYTES);
                        session = Session::connect(config, &client_id, endpoint.clone(), limit)?;
                        raised_limit = true;
                    } else if raised_limit {
                        session = Session::connect(config, &client_id, endpoint.clone(), config.mqtt.max_packet_bytes)?;
                        raised_limit = false;
                    }
                }
            },
        }
    }

    // Leave cleanly: the DISCONNECT follows the acks already queued.
    session.disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        // Messages arriving meanwhile stay unacknowledged, for redelivery.
        while let Ok(event) = session.poll().await {
            if let SessionEvent::Disconnected = event {
                break;
            }
        }
    })
    .await;
    set_connected(false);
    Ok(())
}
