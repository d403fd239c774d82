//! One device's connection to the MQTT proxy, from CONNECT to close.
//!
//! Each PUBLISH is mapped (routing rules, validation, dead letters: the bridge's
//! [`from_mqtt`]) and handed to the producer as it is read; its delivery joins a
//! `FuturesOrdered`, so PUBACKs (PUBRECs for QoS 2) go out in the order the PUBLISHes came
//! and each only after Kafka confirmed its record. Nothing is acknowledged otherwise: a
//! crash or a lost connection leaves the client to publish again, a duplicate at worst.
//!
//! What one connection can hold is bounded before it is read: a frame over
//! `max_packet_bytes` is refused from its header; the socket is not read while the
//! connection has `receive_maximum` records unconfirmed (MQTT 5 clients are told that
//! number and are disconnected for exceeding it) or while the proxy as a whole has
//! `max_in_flight_bytes` unconfirmed (a semaphore of bytes shared by every connection,
//! each PUBLISH charged its frame length, at least [`RECORD_CHARGE_BYTES`]).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use futures::FutureExt as _;
use futures::StreamExt as _;
use futures::stream::FuturesOrdered;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::access::{Acl, DeviceIdFrom, Users};
use super::wire::{self, CloseReason, ConnectOutcome, ConnectRequest, Inbound, PublishAnswer, Version, WireError};
use crate::config::MqttProxyConfig;
use crate::kafka::{Sink, SinkError};
use crate::metrics::Metrics;
use crate::record::{MqttChecks, MqttMessage, from_mqtt};
use crate::routing::Routes;
use crate::trace;

/// How long a write to a client may take before the connection is dropped (a client
/// that stops reading its socket).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The least a PUBLISH is charged against `max_in_flight_bytes`: what a record awaiting
/// Kafka costs besides its payload (the record, its headers, its span and future).
pub const RECORD_CHARGE_BYTES: usize = 2048;

/// What every connection shares.
pub struct Shared {
    pub sink: Sink,
    pub routes: Arc<Routes>,
    pub metrics: Metrics,
    pub config: MqttProxyConfig,
    pub dead_letter_topic: String,
    pub event_time: sensor::EventTimeBounds,
    pub max_payload_bytes: usize,
    pub users: Option<Users>,
    pub acl: Acl,
    /// Bytes of PUBLISHes read from any connection and not yet confirmed by Kafka.
    pub in_flight: Arc<Semaphore>,
    /// Set once the producer failed fatally: every connection closes unacknowledged.
    pub fatal: watch::Sender<Option<String>>,
    /// Numbers client ids the proxy assigns to MQTT 5 clients that sent none.
    pub assigned_ids: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn checks(&self) -> MqttChecks<'_> {
        MqttChecks {
            dead_letter_topic: &self.dead_letter_topic,
            event_time: &self.event_time,
            max_payload_bytes: self.max_payload_bytes,
        }
    }

    fn max_remaining(&self) -> usize {
        self.config.max_packet_bytes as usize
    }
}

/// What comes back for a PUBLISH once its record is settled, in PUBLISH order.
enum Settled {
    /// QoS 0: nothing to send.
    Quiet,
    Answer {
        qos: u8,
        pkid: u16,
        answer: PublishAnswer,
        read_at: Instant,
    },
    /// The producer failed fatally: nothing more may be acknowledged.
    Failed(SinkError),
}

type Pending = Pin<Box<dyn Future<Output = Settled> + Send>>;

/// Where a QoS 1 or 2 packet id stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdState {
    /// Handed to Kafka, answer not yet sent.
    Pending,
    /// QoS 2: PUBREC sent, waiting for the client's PUBREL.
    Received,
}

/// Why taking in buffered packets stopped.
enum Stop {
    /// The buffer holds no complete packet: read the socket.
    Incomplete,
    /// The connection's bound is reached: wait for Kafka.
    Full,
    /// The proxy's bound is reached: wait for this many bytes of it.
    NeedPermit(u32),
    Close(Closing),
}

/// How a connection ends.
#[derive(Debug, Clone, Copy)]
enum Closing {
    /// The server ends it, saying why to an MQTT 5 client.
    Server(CloseReason),
    /// The client sent DISCONNECT.
    ClientDisconnect,
    /// The socket closed or failed.
    Lost(&'static str),
}

impl Closing {
    fn label(self) -> &'static str {
        match self {
            Closing::Server(reason) => reason.label(),
            Closing::ClientDisconnect => "client_disconnect",
            Closing::Lost(what) => what,
        }
    }
}

/// Serves one connection until it closes. `certificate_cn` is the client certificate's
/// common name when TLS verified one.
pub async fn serve<S>(
    stream: S,
    certificate_cn: Option<String>,
    shared: Arc<Shared>,
    mut draining: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut buffer = BytesMut::with_capacity(4096);
    let timeout = Duration::from_secs(shared.config.connect_timeout_seconds);
    let connect = match tokio::time::timeout(timeout, read_connect(&mut reader, &mut buffer, &shared)).await {
        Ok(Ok(connect)) => connect,
        Ok(Err(refusal)) => {
            shared.metrics.proxy_connects_refused.with_label_values(&[refusal.label]).inc();
            if let Some(version) = refusal.answer_as {
                let mut out = BytesMut::new();
                wire::write_connack(&mut out, version, ConnectOutcome::UnsupportedProtocol, &no_limits());
                send_and_close(&mut writer, &out).await;
            }
            return;
        }
        Err(_) => {
            shared.metrics.proxy_connects_refused.with_label_values(&["connect_timeout"]).inc();
            return;
        }
    };
    let version = connect.version;
    let mut limits = wire::ServerLimits {
        receive_maximum: shared.config.receive_maximum,
        max_packet_bytes: shared.config.max_packet_bytes,
        keep_alive_seconds: None,
        assigned_client_id: None,
    };
    let keep_alive = effective_keep_alive(version, connect.keep_alive_seconds, shared.config.max_keep_alive_seconds);
    if keep_alive != connect.keep_alive_seconds {
        limits.keep_alive_seconds = Some(keep_alive);
    }
    let outcome = admit(&connect, certificate_cn.as_deref(), &shared, &mut limits);
    let mut out = BytesMut::new();
    wire::write_connack(
        &mut out,
        version,
        outcome.as_ref().err().copied().unwrap_or(ConnectOutcome::Accepted),
        &limits,
    );
    let identity = match outcome {
        Ok(identity) => identity,
        Err(refusal) => {
            send_and_close(&mut writer, &out).await;
            let label = match refusal {
                ConnectOutcome::BadCredentials => "bad_credentials",
                ConnectOutcome::BadClientId => "bad_client_id",
                ConnectOutcome::ServerBusy => "server_busy",
                ConnectOutcome::UnsupportedProtocol => "unsupported_protocol",
                ConnectOutcome::NotAuthorized | ConnectOutcome::Accepted => "not_authorized",
            };
            shared.metrics.proxy_connects_refused.with_label_values(&[label]).inc();
            return;
        }
    };
    if !matches!(tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(&out)).await, Ok(Ok(()))) {
        return;
    }
    out.clear();
    shared.metrics.proxy_connections.inc();
    let mut connection = Connection {
        version,
        identity,
        shared: &shared,
        keep_alive: Duration::from_secs(u64::from(keep_alive)) * 3 / 2,
        out,
        pending: FuturesOrdered::new(),
        ids: HashMap::new(),
        permit: None,
    };
    let closing = connection.run(&mut reader, &mut writer, &mut buffer, &mut draining).await;
    shared.metrics.proxy_connections.dec();
    shared.metrics.proxy_disconnects.with_label_values(&[closing.label()]).inc();
    if let Closing::Server(reason) = closing {
        let mut out = BytesMut::new();
        wire::write_disconnect(&mut out, version, reason);
        send_and_close(&mut writer, &out).await;
    }
}

/// Sends `bytes` (a refusal, a DISCONNECT), then closes the sending side, within
/// [`WRITE_TIMEOUT`].
async fn send_and_close<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) {
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        writer.write_all(bytes).await?;
        writer.shutdown().await
    })
    .await;
}

/// The keep-alive the connection runs with: the server's maximum when the client asks for
/// none; otherwise the client's, capped by the maximum for MQTT 5, which tells the client
/// (Server Keep Alive). 3.1.1 has no way to tell it, so its own value stands.
fn effective_keep_alive(version: Version, asked: u16, maximum: u16) -> u16 {
    match (version, asked) {
        (_, 0) => maximum,
        (Version::V5, asked) => asked.min(maximum),
        (Version::V311, asked) => asked,
    }
}

fn no_limits() -> wire::ServerLimits {
    wire::ServerLimits { receive_maximum: 1, max_packet_bytes: 1, keep_alive_seconds: None, assigned_client_id: None }
}

/// A connection refused before its CONNECT was understood.
struct ConnectRefusal {
    label: &'static str,
    /// Answer with a CONNACK in this version's form (an unsupported protocol level).
    answer_as: Option<Version>,
}

async fn read_connect<R: AsyncRead + Unpin>(
    reader: &mut R,
    buffer: &mut BytesMut,
    shared: &Shared,
) -> Result<ConnectRequest, ConnectRefusal> {
    loop {
        match wire::read_connect(buffer, shared.max_remaining()) {
            Ok(Some(connect)) => return Ok(connect),
            Ok(None) => {}
            Err(WireError::UnsupportedProtocol { level, .. }) => {
                // Refused in 3.1.1's form for older levels (0x01), in 5's for newer (0x84).
                let answer_as = if level > 5 { Version::V5 } else { Version::V311 };
                return Err(ConnectRefusal { label: "unsupported_protocol", answer_as: Some(answer_as) });
            }
            Err(WireError::TooLarge(_)) => return Err(ConnectRefusal { label: "packet_too_large", answer_as: None }),
            Err(_) => return Err(ConnectRefusal { label: "malformed", answer_as: None }),
        }
        match reader.read_buf(buffer).await {
            Ok(0) | Err(_) => return Err(ConnectRefusal { label: "closed", answer_as: None }),
            Ok(_) => {}
        }
    }
}

/// Decides a CONNECT: `Ok` with the device identity the ACL checks, or the refusal.
fn admit(
    connect: &ConnectRequest,
    certificate_cn: Option<&str>,
    shared: &Shared,
    limits: &mut wire::ServerLimits,
) -> Result<Option<String>, ConnectOutcome> {
    if let Some(users) = &shared.users
        && !users.check(connect.username.as_deref(), connect.password.as_deref())
    {
        return Err(ConnectOutcome::BadCredentials);
    }
    let identity = match shared.config.device_id_from {
        DeviceIdFrom::ClientId => Some(connect.client_id.clone()),
        DeviceIdFrom::Username => connect.username.clone(),
        DeviceIdFrom::CertificateCn => certificate_cn.map(str::to_owned),
    }
    .filter(|id| !id.is_empty());
    if !shared.acl.is_open() && identity.is_none() {
        return Err(match shared.config.device_id_from {
            DeviceIdFrom::ClientId => ConnectOutcome::BadClientId,
            DeviceIdFrom::Username | DeviceIdFrom::CertificateCn => ConnectOutcome::NotAuthorized,
        });
    }
    if connect.client_id.is_empty() {
        // 3.1.1 allows an empty id only for a clean session; MQTT 5 is given one.
        match connect.version {
            Version::V311 if !connect.clean_start => return Err(ConnectOutcome::BadClientId),
            Version::V311 => {}
            Version::V5 => {
                let number = shared.assigned_ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                limits.assigned_client_id = Some(format!("vigil-proxy-{number}"));
            }
        }
    }
    Ok(identity)
}

struct Connection<'a> {
    version: Version,
    /// The device identity the ACL checks topics against.
    identity: Option<String>,
    shared: &'a Shared,
    /// 1.5 times the keep-alive: silence longer than this ends the connection.
    keep_alive: Duration,
    /// Answers not yet written.
    out: BytesMut,
    pending: FuturesOrdered<Pending>,
    /// QoS 1 and 2 packet ids not yet completed.
    ids: HashMap<u16, IdState>,
    /// A permit of the proxy's in-flight bound, taken for the next PUBLISH.
    permit: Option<OwnedSemaphorePermit>,
}

impl Connection<'_> {
    async fn run<R, W>(
        &mut self,
        reader: &mut R,
        writer: &mut W,
        buffer: &mut BytesMut,
        draining: &mut watch::Receiver<bool>,
    ) -> Closing
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut fatal = self.shared.fatal.subscribe();
        let mut deadline = tokio::time::Instant::now() + self.keep_alive;
        let closing = loop {
            let stop = match self.take_in(buffer) {
                Ok(stop) => stop,
                Err(closing) => Stop::Close(closing),
            };
            if let Err(closing) = self.flush(writer).await {
                break closing;
            }
            if let Stop::Close(closing) = stop {
                break closing;
            }
            if *draining.borrow() {
                break Closing::Server(CloseReason::ServerShuttingDown);
            }
            // When full, an MQTT 5 connection still reads the start of the next packet
            // (into an empty buffer, so a few KiB at most) to see a breach of the
            // receive maximum; 3.1.1 has none, and waits unread.
            let read_more = match stop {
                Stop::Incomplete => true,
                Stop::Full => self.version == Version::V5 && buffer.is_empty(),
                _ => false,
            };
            let need_permit = match stop {
                Stop::NeedPermit(bytes) => bytes,
                _ => 0,
            };
            tokio::select! {
                biased;
                Some(settled) = self.pending.next() => {
                    let mut settling = self.settle(settled);
                    // Everything else already settled goes out in the same write.
                    while settling.is_ok()
                        && let Some(Some(settled)) = self.pending.next().now_or_never()
                    {
                        settling = self.settle(settled);
                    }
                    if let Err(closing) = settling {
                        break closing;
                    }
                }
                permit = Arc::clone(&self.shared.in_flight).acquire_many_owned(need_permit), if need_permit > 0 => {
                    self.permit = permit.ok();
                }
                read = reader.read_buf(buffer), if read_more => match read {
                    Ok(0) => break Closing::Lost("closed"),
                    Ok(_) => deadline = tokio::time::Instant::now() + self.keep_alive,
                    Err(_) => break Closing::Lost("io_error"),
                },
                () = tokio::time::sleep_until(deadline) => break Closing::Server(CloseReason::KeepAliveTimeout),
                _ = draining.wait_for(|d| *d) => {}
                _ = fatal.wait_for(Option::is_some) => break Closing::Server(CloseReason::Unavailable),
            }
        };
        // What was taken is seen through to Kafka (holding its permits, so the proxy's
        // bound covers it) and answered while the socket still takes answers. The
        // proxy's shutdown grace bounds this wait.
        while let Some(settled) = self.pending.next().await {
            if self.settle(settled).is_err() {
                break;
            }
        }
        if !matches!(closing, Closing::Lost(_)) {
            let _ = self.flush(writer).await;
        }
        closing
    }

    /// Takes in the complete packets in `buffer` as far as the bounds allow.
    fn take_in(&mut self, buffer: &mut BytesMut) -> Result<Stop, Closing> {
        loop {
            if buffer.is_empty() {
                return Ok(Stop::Incomplete);
            }
            let is_publish = buffer[0] >> 4 == 3;
            if is_publish {
                let receive_maximum = usize::from(self.shared.config.receive_maximum);
                if self.pending.len() >= receive_maximum {
                    // An MQTT 5 client sending QoS 1 or 2 beyond the maximum it was told.
                    if self.version == Version::V5 && buffer[0] & 0b0110 != 0 && self.ids.len() >= receive_maximum {
                        return Err(Closing::Server(CloseReason::ReceiveMaximumExceeded));
                    }
                    return Ok(Stop::Full);
                }
                let frame = match wire::frame_length(buffer, self.shared.max_remaining()) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => return Ok(Stop::Incomplete),
                    Err(WireError::TooLarge(_)) => return Err(Closing::Server(CloseReason::PacketTooLarge)),
                    Err(_) => return Err(Closing::Server(CloseReason::Malformed)),
                };
                // Bounded by max_packet_bytes (+5), itself at most max_in_flight_bytes.
                let charge = frame.max(RECORD_CHARGE_BYTES).min(self.shared.config.max_in_flight_bytes) as u32;
                match &self.permit {
                    Some(permit) if permit.num_permits() >= charge as usize => {}
                    _ => {
                        self.permit = None;
                        match Arc::clone(&self.shared.in_flight).try_acquire_many_owned(charge) {
                            Ok(permit) => self.permit = Some(permit),
                            Err(_) => return Ok(Stop::NeedPermit(charge)),
                        }
                    }
                }
            }
            let packet = match wire::read(buffer, self.version, self.shared.max_remaining()) {
                Ok(Some(packet)) => packet,
                Ok(None) => return Ok(Stop::Incomplete),
                Err(WireError::TooLarge(_)) => return Err(Closing::Server(CloseReason::PacketTooLarge)),
                Err(_) => return Err(Closing::Server(CloseReason::Malformed)),
            };
            match packet {
                Inbound::Publish(publish) => self.publish(publish)?,
                Inbound::PubRel { pkid } => {
                    if self.ids.get(&pkid) == Some(&IdState::Received) {
                        self.ids.remove(&pkid);
                    }
                    wire::write_pubcomp(&mut self.out, self.version, pkid);
                }
                Inbound::Subscribe { pkid, filters } => {
                    self.shared.metrics.proxy_publishes_refused.with_label_values(&["subscribe"]).inc();
                    wire::write_suback_refused(&mut self.out, self.version, pkid, filters);
                }
                Inbound::Unsubscribe { pkid, filters } => {
                    wire::write_unsuback(&mut self.out, self.version, pkid, filters)
                }
                Inbound::PingReq => wire::write_pingresp(&mut self.out, self.version),
                Inbound::Disconnect => return Err(Closing::ClientDisconnect),
                Inbound::Unexpected(_) => return Err(Closing::Server(CloseReason::ProtocolError)),
            }
        }
    }

    fn publish(&mut self, publish: wire::PublishPacket) -> Result<(), Closing> {
        let shared = self.shared;
        let read_at = Instant::now();
        let permit = self.permit.take();
        if publish.topic.is_empty() {
            let reason = if publish.topic_alias.is_some() {
                CloseReason::TopicAliasInvalid
            } else {
                CloseReason::TopicNameInvalid
            };
            return Err(Closing::Server(reason));
        }
        if publish.topic_alias.is_some() {
            return Err(Closing::Server(CloseReason::TopicAliasInvalid));
        }
        if !rumqttc::valid_topic(&publish.topic) {
            return Err(Closing::Server(CloseReason::TopicNameInvalid));
        }
        let (qos, pkid) = (publish.qos, publish.pkid);
        if qos > 0 {
            match self.ids.get(&pkid) {
                // QoS 2 sent again after its PUBREC: answer again, write nothing more.
                Some(IdState::Received) if qos == 2 => {
                    self.answer_in_turn(qos, pkid, PublishAnswer::Accepted, read_at);
                    return Ok(());
                }
                Some(_) => return Err(Closing::Server(CloseReason::ProtocolError)),
                None => {}
            }
            if self.version == Version::V5 && self.ids.len() >= usize::from(shared.config.receive_maximum) {
                return Err(Closing::Server(CloseReason::ReceiveMaximumExceeded));
            }
        }
        if !shared.acl.allows(self.identity.as_deref(), &publish.topic) {
            shared.metrics.proxy_publishes_refused.with_label_values(&["not_authorized"]).inc();
            // 3.1.1 cannot refuse a PUBLISH; the spec's choice is to close.
            if self.version == Version::V311 {
                return Err(Closing::Server(CloseReason::NotAuthorized));
            }
            if qos > 0 {
                self.answer_in_turn(qos, pkid, PublishAnswer::NotAuthorized, read_at);
            }
            return Ok(());
        }
        shared.metrics.received.with_label_values(&["proxy"]).inc();
        let message = MqttMessage {
            topic: &publish.topic,
            payload: &publish.payload,
            qos,
            user_properties: &publish.user_properties,
            content_type: publish.content_type.as_deref(),
            received_at: SystemTime::now(),
        };
        let span = trace::mqtt_message(&publish.topic, &publish.user_properties);
        let mut record = from_mqtt(&shared.routes, &shared.checks(), &message);
        trace::attach(&span, &mut record);
        let delivery = shared.sink.send(record);
        if qos > 0 {
            self.ids.insert(pkid, IdState::Pending);
        }
        self.pending.push_back(Box::pin(async move {
            let written = delivery.await;
            trace::written(&span, &written);
            drop(permit);
            match written {
                Ok(_) if qos == 0 => Settled::Quiet,
                Ok(_) => Settled::Answer { qos, pkid, answer: PublishAnswer::Accepted, read_at },
                Err(error) => Settled::Failed(error),
            }
        }));
        Ok(())
    }

    /// Queues `answer` to a PUBLISH that writes nothing (a QoS 2 repeat, a refusal): it
    /// goes out after the answers to the PUBLISHes before it.
    fn answer_in_turn(&mut self, qos: u8, pkid: u16, answer: PublishAnswer, read_at: Instant) {
        self.ids.insert(pkid, IdState::Pending);
        self.pending.push_back(Box::pin(std::future::ready(Settled::Answer { qos, pkid, answer, read_at })));
    }

    /// Writes the answer of one settled PUBLISH into the output.
    fn settle(&mut self, settled: Settled) -> Result<(), Closing> {
        match settled {
            Settled::Quiet => Ok(()),
            Settled::Answer { qos, pkid, answer, read_at } => {
                wire::write_publish_answer(&mut self.out, self.version, qos, pkid, answer);
                if qos == 2 {
                    self.ids.insert(pkid, IdState::Received);
                } else {
                    self.ids.remove(&pkid);
                }
                if answer == PublishAnswer::Accepted {
                    self.shared.metrics.mqtt_acked.inc();
                    self.shared.metrics.proxy_ack_latency.observe(read_at.elapsed().as_secs_f64());
                }
                Ok(())
            }
            Settled::Failed(error) => {
                tracing::error!(%error, "the kafka producer failed: closing MQTT proxy connections unacknowledged");
                self.shared.fatal.send_replace(Some(error.to_string()));
                Err(Closing::Server(CloseReason::Unavailable))
            }
        }
    }

    async fn flush<W: AsyncWrite + Unpin>(&mut self, writer: &mut W) -> Result<(), Closing> {
        if self.out.is_empty() {
            return Ok(());
        }
        let written = tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(&self.out)).await;
        self.out.clear();
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Closing::Lost("io_error")),
            Err(_) => Err(Closing::Lost("write_timeout")),
        }
    }
}
