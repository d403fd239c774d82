//! MQTT packets as the proxy reads and writes them: 3.1.1 and 5 behind one face, on the
//! packet codecs rumqttc exposes (`mqttbytes::v4`, `v5::mqttbytes::v5`; the ingest bridge
//! already depends on rumqttc, and these are the codecs its client runs on).
//!
//! Only this module touches the codec, so it can be swapped. It also works around what
//! the codecs do not do for a server (docs/mqtt-proxy.md, "Wire"):
//! - the size limit is checked on the fixed header, before a byte of the body is buffered
//!   ([`frame`]), so a client announcing 256 MiB costs nothing;
//! - the protocol level is read before decoding the CONNECT (the 3.1.1 decoder would take a
//!   level-5 CONNECT with the wrong layout);
//! - MQTT 5's short DISCONNECT (`E0 00`) is taken here (the 5 decoder refuses it);
//! - any error inside a complete frame is a malformed packet, never "wait for more bytes";
//! - a CONNACK refusal is only ever built with a code of the client's own version (the 5
//!   encoder panics on 3.1.1-only codes).

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

/// The protocol a connection speaks, from its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

impl Version {
    pub fn label(self) -> &'static str {
        match self {
            Version::V311 => "3.1.1",
            Version::V5 => "5",
        }
    }
}

/// Why the bytes on a connection cannot be read as MQTT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("a packet of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("the first packet is not a CONNECT")]
    NotConnect,
    /// The CONNECT names a protocol this server does not speak (MQTT 3.1 is level 3).
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol { name: String, level: u8 },
}

/// A CONNECT, both versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    pub version: Version,
    pub client_id: String,
    pub keep_alive_seconds: u16,
    pub clean_start: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    /// A will message was set (the proxy ignores wills: docs/mqtt-proxy.md).
    pub has_will: bool,
}

/// A PUBLISH, both versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishPacket {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub pkid: u16,
    pub dup: bool,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
    /// MQTT 5 topic alias: never announced, so any use is a protocol error.
    pub topic_alias: Option<u16>,
}

/// What a client may send after its CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Publish(PublishPacket),
    /// QoS 2, second step.
    PubRel {
        pkid: u16,
    },
    Subscribe {
        pkid: u16,
        filters: usize,
    },
    Unsubscribe {
        pkid: u16,
        filters: usize,
    },
    PingReq,
    Disconnect,
    /// A packet a client has no business sending here (a second CONNECT, a CONNACK, a
    /// PUBACK for a message the server never sent...): a protocol error.
    Unexpected(&'static str),
}

/// The length of the frame at the start of `buffer` once it is complete (`Ok(None)` while
/// incomplete); a remaining length over `max_remaining` is refused from the header alone.
pub fn frame_length(buffer: &BytesMut, max_remaining: usize) -> Result<Option<usize>, WireError> {
    match rumqttc::mqttbytes::check(buffer.iter(), max_remaining) {
        Ok(header) => Ok(Some(header.frame_length())),
        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size)) => Err(WireError::TooLarge(size)),
        Err(error) => Err(WireError::Malformed(error.to_string())),
    }
}

/// How many bytes the remaining-length field of the frame at the start of `frame` takes.
fn length_field_bytes(frame: &[u8]) -> usize {
    frame[1..].iter().take(4).position(|b| b & 0x80 == 0).map_or(4, |p| p + 1)
}

/// Reads the CONNECT at the start of `buffer` (consuming it) once it is complete.
pub fn read_connect(buffer: &mut BytesMut, max_remaining: usize) -> Result<Option<ConnectRequest>, WireError> {
    let Some(length) = frame_length(buffer, max_remaining)? else {
        if !buffer.is_empty() && buffer[0] != 0x10 {
            return Err(WireError::NotConnect);
        }
        return Ok(None);
    };
    if buffer[0] != 0x10 {
        return Err(WireError::NotConnect);
    }
    // Variable header: protocol name (length-prefixed), then the level.
    let body = &buffer[1 + length_field_bytes(buffer)..length];
    let malformed = || WireError::Malformed("CONNECT too short for its protocol name and level".into());
    let name_length =
        usize::from(u16::from_be_bytes([*body.first().ok_or_else(malformed)?, *body.get(1).ok_or_else(malformed)?]));
    let name = body.get(2..2 + name_length).ok_or_else(malformed)?;
    let level = *body.get(2 + name_length).ok_or_else(malformed)?;
    let version = match (name, level) {
        (b"MQTT", 4) => Version::V311,
        (b"MQTT", 5) => Version::V5,
        _ => {
            let name = String::from_utf8_lossy(name).into_owned();
            buffer.clear();
            return Err(WireError::UnsupportedProtocol { name, level });
        }
    };
    let malformed = |e: &dyn std::fmt::Display| WireError::Malformed(format!("CONNECT: {e}"));
    match version {
        Version::V311 => match v4::Packet::read(buffer, max_remaining).map_err(|e| malformed(&e))? {
            v4::Packet::Connect(connect) => Ok(Some(ConnectRequest {
                version,
                client_id: connect.client_id,
                keep_alive_seconds: connect.keep_alive,
                clean_start: connect.clean_session,
                has_will: connect.last_will.is_some(),
                username: connect.login.as_ref().map(|l| l.username.clone()).filter(|u| !u.is_empty()),
                password: connect.login.map(|l| l.password).filter(|p| !p.is_empty()),
            })),
            _ => Err(WireError::NotConnect),
        },
        Version::V5 => match v5::Packet::read(buffer, Some(max_remaining as u32)).map_err(|e| malformed(&e))? {
            v5::Packet::Connect(connect, will, login) => Ok(Some(ConnectRequest {
                version,
                client_id: connect.client_id,
                keep_alive_seconds: connect.keep_alive,
                clean_start: connect.clean_start,
                has_will: will.is_some(),
                username: login.as_ref().map(|l| l.username.clone()).filter(|u| !u.is_empty()),
                password: login.map(|l| l.password).filter(|p| !p.is_empty()),
            })),
            _ => Err(WireError::NotConnect),
        },
    }
}

/// Reads the next packet at the start of `buffer` (consuming it) once it is complete.
pub fn read(buffer: &mut BytesMut, version: Version, max_remaining: usize) -> Result<Option<Inbound>, WireError> {
    let Some(_) = frame_length(buffer, max_remaining)? else {
        return Ok(None);
    };
    let malformed = |e: &dyn std::fmt::Display| WireError::Malformed(e.to_string());
    match version {
        Version::V311 => Ok(Some(match v4::Packet::read(buffer, max_remaining).map_err(|e| malformed(&e))? {
            v4::Packet::Publish(publish) => Inbound::Publish(PublishPacket {
                topic: publish.topic,
                payload: publish.payload,
                qos: publish.qos as u8,
                pkid: publish.pkid,
                dup: publish.dup,
                user_properties: Vec::new(),
                content_type: None,
                topic_alias: None,
            }),
            v4::Packet::PubRel(release) => Inbound::PubRel { pkid: release.pkid },
            v4::Packet::Subscribe(subscribe) => {
                Inbound::Subscribe { pkid: subscribe.pkid, filters: subscribe.filters.len() }
            }
            v4::Packet::Unsubscribe(unsubscribe) => {
                Inbound::Unsubscribe { pkid: unsubscribe.pkid, filters: unsubscribe.topics.len() }
            }
            v4::Packet::PingReq => Inbound::PingReq,
            v4::Packet::Disconnect => Inbound::Disconnect,
            other => Inbound::Unexpected(v4_name(&other)),
        })),
        Version::V5 => {
            // The short DISCONNECT (reason 0, no properties), which the decoder refuses.
            if buffer.starts_with(&[0xE0, 0x00]) {
                bytes::Buf::advance(buffer, 2);
                return Ok(Some(Inbound::Disconnect));
            }
            Ok(Some(match v5::Packet::read(buffer, Some(max_remaining as u32)).map_err(|e| malformed(&e))? {
                v5::Packet::Publish(publish) => {
                    let topic = String::from_utf8(publish.topic.to_vec())
                        .map_err(|_| WireError::Malformed("PUBLISH topic is not UTF-8".into()))?;
                    let properties = publish.properties.unwrap_or_default();
                    Inbound::Publish(PublishPacket {
                        topic,
                        payload: publish.payload,
                        qos: publish.qos as u8,
                        pkid: publish.pkid,
                        dup: publish.dup,
                        user_properties: properties.user_properties,
                        content_type: properties.content_type,
                        topic_alias: properties.topic_alias,
                    })
                }
                v5::Packet::PubRel(release) => Inbound::PubRel { pkid: release.pkid },
                v5::Packet::Subscribe(subscribe) => {
                    Inbound::Subscribe { pkid: subscribe.pkid, filters: subscribe.filters.len() }
                }
                v5::Packet::Unsubscribe(unsubscribe) => {
                    Inbound::Unsubscribe { pkid: unsubscribe.pkid, filters: unsubscribe.filters.len() }
                }
                v5::Packet::PingReq(_) => Inbound::PingReq,
                v5::Packet::Disconnect(_) => Inbound::Disconnect,
                other => Inbound::Unexpected(v5_name(&other)),
            }))
        }
    }
}

fn v4_name(packet: &v4::Packet) -> &'static str {
    match packet {
        v4::Packet::Connect(_) => "CONNECT",
        v4::Packet::ConnAck(_) => "CONNACK",
        v4::Packet::PubAck(_) => "PUBACK",
        v4::Packet::PubRec(_) => "PUBREC",
        v4::Packet::PubComp(_) => "PUBCOMP",
        v4::Packet::SubAck(_) => "SUBACK",
        v4::Packet::UnsubAck(_) => "UNSUBACK",
        v4::Packet::PingResp => "PINGRESP",
        _ => "an unexpected packet",
    }
}

fn v5_name(packet: &v5::Packet) -> &'static str {
    match packet {
        v5::Packet::Connect(..) => "CONNECT",
        v5::Packet::ConnAck(_) => "CONNACK",
        v5::Packet::PubAck(_) => "PUBACK",
        v5::Packet::PubRec(_) => "PUBREC",
        v5::Packet::PubComp(_) => "PUBCOMP",
        v5::Packet::SubAck(_) => "SUBACK",
        v5::Packet::UnsubAck(_) => "UNSUBACK",
        v5::Packet::PingResp(_) => "PINGRESP",
        v5::Packet::Auth(_) => "AUTH",
        _ => "an unexpected packet",
    }
}

/// A CONNECT's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectOutcome {
    Accepted,
    BadCredentials,
    NotAuthorized,
    BadClientId,
    ServerBusy,
    UnsupportedProtocol,
}

/// What the server tells an MQTT 5 client it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    pub receive_maximum: u16,
    /// The largest packet, counted whole (MQTT 5's Maximum Packet Size).
    pub max_packet_bytes: u32,
    /// Set when the server overrides the client's keep-alive.
    pub keep_alive_seconds: Option<u16>,
    /// Set when the client sent an empty client id and the server named it.
    pub assigned_client_id: Option<String>,
}

pub fn write_connack(out: &mut BytesMut, version: Version, outcome: ConnectOutcome, limits: &ServerLimits) {
    match version {
        Version::V311 => {
            let code = match outcome {
                ConnectOutcome::Accepted => v4::ConnectReturnCode::Success,
                ConnectOutcome::BadCredentials => v4::ConnectReturnCode::BadUserNamePassword,
                ConnectOutcome::NotAuthorized => v4::ConnectReturnCode::NotAuthorized,
                ConnectOutcome::BadClientId => v4::ConnectReturnCode::BadClientId,
                ConnectOutcome::ServerBusy => v4::ConnectReturnCode::ServiceUnavailable,
                ConnectOutcome::UnsupportedProtocol => v4::ConnectReturnCode::RefusedProtocolVersion,
            };
            write_ok(v4::ConnAck::new(code, false).write(out));
        }
        Version::V5 => {
            let code = match outcome {
                ConnectOutcome::Accepted => v5::ConnectReturnCode::Success,
                ConnectOutcome::BadCredentials => v5::ConnectReturnCode::BadUserNamePassword,
                ConnectOutcome::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
                ConnectOutcome::BadClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
                ConnectOutcome::ServerBusy => v5::ConnectReturnCode::ServerBusy,
                ConnectOutcome::UnsupportedProtocol => v5::ConnectReturnCode::UnsupportedProtocolVersion,
            };
            let properties = (outcome == ConnectOutcome::Accepted).then(|| v5::ConnAckProperties {
                session_expiry_interval: None,
                receive_max: Some(limits.receive_maximum),
                max_qos: None,
                retain_available: None,
                max_packet_size: Some(limits.max_packet_bytes),
                assigned_client_identifier: limits.assigned_client_id.clone(),
                topic_alias_max: None,
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: Some(0),
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(0),
                server_keep_alive: limits.keep_alive_seconds,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            });
            write_ok(v5::ConnAck { session_present: false, code, properties }.write(out));
        }
    }
}

/// The answer to one PUBLISH (QoS 1: PUBACK, QoS 2: PUBREC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishAnswer {
    Accepted,
    /// MQTT 5 only: the ACL refused the topic.
    NotAuthorized,
    /// MQTT 5 only: the topic is not one a client may publish to.
    TopicNameInvalid,
}

pub fn write_publish_answer(out: &mut BytesMut, version: Version, qos: u8, pkid: u16, answer: PublishAnswer) {
    match (version, qos) {
        (Version::V311, 1) => write_ok(v4::PubAck::new(pkid).write(out)),
        (Version::V311, _) => write_ok(v4::PubRec::new(pkid).write(out)),
        (Version::V5, 1) => {
            let reason = match answer {
                PublishAnswer::Accepted => v5::PubAckReason::Success,
                PublishAnswer::NotAuthorized => v5::PubAckReason::NotAuthorized,
                PublishAnswer::TopicNameInvalid => v5::PubAckReason::TopicNameInvalid,
            };
            write_ok(v5::PubAck { pkid, reason, properties: None }.write(out));
        }
        (Version::V5, _) => {
            let reason = match answer {
                PublishAnswer::Accepted => v5::PubRecReason::Success,
                PublishAnswer::NotAuthorized => v5::PubRecReason::NotAuthorized,
                PublishAnswer::TopicNameInvalid => v5::PubRecReason::TopicNameInvalid,
            };
            write_ok(v5::PubRec { pkid, reason, properties: None }.write(out));
        }
    }
}

pub fn write_pubcomp(out: &mut BytesMut, version: Version, pkid: u16) {
    match version {
        Version::V311 => write_ok(v4::PubComp::new(pkid).write(out)),
        Version::V5 => write_ok(v5::PubComp::new(pkid, None).write(out)),
    }
}

/// Every filter refused: the proxy only takes readings in; it has nothing to deliver.
pub fn write_suback_refused(out: &mut BytesMut, version: Version, pkid: u16, filters: usize) {
    match version {
        Version::V311 => write_ok(v4::SubAck::new(pkid, vec![v4::SubscribeReasonCode::Failure; filters]).write(out)),
        Version::V5 => write_ok(
            v5::SubAck { pkid, return_codes: vec![v5::SubscribeReasonCode::NotAuthorized; filters], properties: None }
                .write(out),
        ),
    }
}

pub fn write_unsuback(out: &mut BytesMut, version: Version, pkid: u16, filters: usize) {
    match version {
        Version::V311 => write_ok(v4::UnsubAck::new(pkid).write(out)),
        Version::V5 => write_ok(
            v5::UnsubAck { pkid, reasons: vec![v5::UnsubAckReason::NoSubscriptionExisted; filters], properties: None }
                .write(out),
        ),
    }
}

pub fn write_pingresp(out: &mut BytesMut, version: Version) {
    match version {
        Version::V311 => write_ok(v4::PingResp.write(out)),
        Version::V5 => write_ok(v5::PingResp::write(out)),
    }
}

/// Why the server ends a connection (sent as a DISCONNECT to MQTT 5 clients; 3.1.1 has
/// no server DISCONNECT, the connection just closes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Malformed,
    ProtocolError,
    NotAuthorized,
    ServerShuttingDown,
    KeepAliveTimeout,
    PacketTooLarge,
    ReceiveMaximumExceeded,
    TopicAliasInvalid,
    TopicNameInvalid,
    Unavailable,
}

impl CloseReason {
    /// The fixed label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Malformed => "malformed",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::NotAuthorized => "not_authorized",
            CloseReason::ServerShuttingDown => "shutdown",
            CloseReason::KeepAliveTimeout => "keep_alive_timeout",
            CloseReason::PacketTooLarge => "packet_too_large",
            CloseReason::ReceiveMaximumExceeded => "receive_maximum_exceeded",
            CloseReason::TopicAliasInvalid => "topic_alias_invalid",
            CloseReason::TopicNameInvalid => "topic_name_invalid",
            CloseReason::Unavailable => "kafka_unavailable",
        }
    }
}

pub fn write_disconnect(out: &mut BytesMut, version: Version, reason: CloseReason) {
    if version == Version::V311 {
        return;
    }
    let code = match reason {
        CloseReason::Malformed => v5::DisconnectReasonCode::MalformedPacket,
        CloseReason::ProtocolError => v5::DisconnectReasonCode::ProtocolError,
        CloseReason::NotAuthorized => v5::DisconnectReasonCode::NotAuthorized,
        CloseReason::ServerShuttingDown => v5::DisconnectReasonCode::ServerShuttingDown,
        CloseReason::KeepAliveTimeout => v5::DisconnectReasonCode::KeepAliveTimeout,
        CloseReason::PacketTooLarge => v5::DisconnectReasonCode::PacketTooLarge,
        CloseReason::ReceiveMaximumExceeded => v5::DisconnectReasonCode::ReceiveMaximumExceeded,
        CloseReason::TopicAliasInvalid => v5::DisconnectReasonCode::TopicAliasInvalid,
        CloseReason::TopicNameInvalid => v5::DisconnectReasonCode::TopicNameInvalid,
        CloseReason::Unavailable => v5::DisconnectReasonCode::ServerBusy,
    };
    // Encoded here: rumqttc 0.25's encoder declares a remaining length of 1 and then
    // appends an empty property length, a stray byte that breaks the client's framing.
    out.extend_from_slice(&[0xE0, 0x01, code as u8]);
}

/// The encoders fail only on a packet over a size limit, which these small answers never
/// reach: a failure is a bug worth seeing in a debug build, never a panic in production.
fn write_ok<T, E: std::fmt::Debug>(result: Result<T, E>) {
    if let Err(error) = result {
        debug_assert!(false, "encoding an MQTT answer failed: {error:?}");
        tracing::error!(?error, "encoding an MQTT answer failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v5_connect(level: u8) -> BytesMut {
        // CONNECT, MQTT, level, flags (clean start), keep-alive 30, no properties, id "d1".
        let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', level, 0x02, 0x00, 30];
        if level == 5 {
            body.push(0x00);
        }
        body.extend_from_slice(&[0x00, 0x02, b'd', b'1']);
        let mut frame = BytesMut::from(&[0x10, body.len() as u8][..]);
        frame.extend_from_slice(&body);
        frame
    }

    #[test]
    fn the_version_comes_from_the_level_byte_before_decoding() {
        let connect = read_connect(&mut v5_connect(5), 1024).unwrap().unwrap();
        assert_eq!((connect.version, connect.client_id.as_str(), connect.keep_alive_seconds), (Version::V5, "d1", 30));
        let connect = read_connect(&mut v5_connect(4), 1024).unwrap().unwrap();
        assert_eq!(connect.version, Version::V311);
        assert!(matches!(read_connect(&mut v5_connect(3), 1024), Err(WireError::UnsupportedProtocol { level: 3, .. })));
    }

    #[test]
    fn a_size_claim_over_the_limit_is_refused_from_the_header_alone() {
        // PUBLISH claiming 268,435,455 bytes; only the header arrived.
        let mut buffer = BytesMut::from(&[0x32, 0xFF, 0xFF, 0xFF, 0x7F][..]);
        assert_eq!(read(&mut buffer, Version::V5, 65_536), Err(WireError::TooLarge(268_435_455)));
        let mut buffer = BytesMut::from(&[0x10, 0xFF, 0xFF, 0xFF, 0x7F][..]);
        assert_eq!(read_connect(&mut buffer, 65_536), Err(WireError::TooLarge(268_435_455)));
    }

    #[test]
    fn the_short_v5_disconnect_is_a_disconnect_and_a_partial_frame_waits() {
        let mut buffer = BytesMut::from(&[0xE0, 0x00][..]);
        assert_eq!(read(&mut buffer, Version::V5, 1024), Ok(Some(Inbound::Disconnect)));
        assert!(buffer.is_empty());
        let mut buffer = BytesMut::from(&[0x30, 0x0A, 0x00][..]);
        assert_eq!(read(&mut buffer, Version::V311, 1024), Ok(None));
        assert_eq!(buffer.len(), 3, "nothing consumed");
    }

    #[test]
    fn a_bad_property_inside_a_complete_frame_is_malformed_not_incomplete() {
        // PUBLISH QoS 0, topic "t", properties length 5 but only 1 byte follows.
        let mut buffer = BytesMut::from(&[0x30, 0x05, 0x00, 0x01, b't', 0x05, 0x01][..]);
        assert!(matches!(read(&mut buffer, Version::V5, 1024), Err(WireError::Malformed(_))));
    }

    #[test]
    fn answers_encode_for_both_versions() {
        let limits = ServerLimits {
            receive_maximum: 64,
            max_packet_bytes: 65_536,
            keep_alive_seconds: None,
            assigned_client_id: None,
        };
        for version in [Version::V311, Version::V5] {
            for outcome in [
                ConnectOutcome::Accepted,
                ConnectOutcome::BadCredentials,
                ConnectOutcome::NotAuthorized,
                ConnectOutcome::BadClientId,
                ConnectOutcome::ServerBusy,
                ConnectOutcome::UnsupportedProtocol,
            ] {
                let mut out = BytesMut::new();
                write_connack(&mut out, version, outcome, &limits);
                assert_eq!(out[0], 0x20, "{version:?} {outcome:?}");
            }
            let mut out = BytesMut::new();
            write_publish_answer(&mut out, version, 1, 7, PublishAnswer::Accepted);
            assert_eq!(&out[..4], &[0x40, 0x02, 0x00, 0x07]);
        }
        let mut out = BytesMut::new();
        write_publish_answer(&mut out, Version::V5, 1, 7, PublishAnswer::NotAuthorized);
        assert_eq!(&out[..], &[0x40, 0x04, 0x00, 0x07, 0x87, 0x00], "reason 0x87, no properties");
    }

    proptest! {
        /// Whatever bytes arrive, reading neither panics nor buffers past the limit: every
        /// outcome is a packet, "incomplete" (with the buffer untouched), or an error.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), v5 in any::<bool>()) {
            let version = if v5 { Version::V5 } else { Version::V311 };
            let mut buffer = BytesMut::from(&bytes[..]);
            let _ = read_connect(&mut buffer.clone(), 256);
            for _ in 0..64 {
                let before = buffer.len();
                match read(&mut buffer, version, 256) {
                    Ok(Some(_)) => prop_assert!(buffer.len() < before),
                    Ok(None) => { prop_assert_eq!(buffer.len(), before); break }
                    Err(_) => break,
                }
            }
        }
    }
}
