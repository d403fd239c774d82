//! From a message as it arrived (MQTT or gRPC) to the Kafka record that carries it: the
//! canonical protobuf reading on its routed topic, or the untouched payload on the
//! dead-letter topic with headers saying why.
//!
//! Headers carry the source along: `mqtt.topic`, `mqtt.qos`, the publisher's content
//! type as `mqtt.content_type`, and every MQTT 5 user property under its own name, which
//! is how W3C trace context (`traceparent`, `tracestate`) travels from device to Kafka.

use std::sync::Arc;
use std::time::SystemTime;

use prost::Message as _;
use sensor::EventTimeBounds;
use sensor::json::{Envelope, parse};

use crate::config::PayloadKind;
use crate::routing::{NoRoute, Routes};

/// Content type of a record holding a `SensorReading`.
pub const SENSOR_READING_CONTENT_TYPE: &str = "application/x-protobuf; messageType=vigil.sensor.v1.SensorReading";

pub const HEADER_MQTT_TOPIC: &str = "mqtt.topic";
pub const HEADER_MQTT_QOS: &str = "mqtt.qos";
pub const HEADER_MQTT_CONTENT_TYPE: &str = "mqtt.content_type";
pub const HEADER_CONTENT_TYPE: &str = "content-type";
use kafka::headers::{DEAD_LETTER_ERROR, DEAD_LETTER_FIELD, DEAD_LETTER_PAYLOAD_BYTES, DEAD_LETTER_REASON};

/// How much of a payload over `mqtt.max_payload_bytes` its dead letter keeps: enough to see
/// what it was, small enough for any Kafka's record limit.
pub const TOO_LARGE_PREFIX_BYTES: usize = 4096;

/// A record for Kafka, owned so it can be sent again.
#[derive(Debug, Clone, PartialEq)]
pub struct OutRecord {
    pub topic: String,
    /// The topic as configured, which metrics count under (never a device-chosen name).
    pub topic_label: Arc<str>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// `Some(reason)` when this is a dead letter.
    pub dead_letter: Option<&'static str>,
}

impl OutRecord {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }

    /// This record turned into a dead letter on `topic` for `reason`.
    pub fn into_dead_letter(mut self, topic: &str, reason: &'static str, error: &str, field: Option<&str>) -> Self {
        self.topic = topic.to_owned();
        self.headers.retain(|(k, _)| !k.starts_with("vigil.dead_letter."));
        self.headers.push((DEAD_LETTER_REASON.into(), reason.into()));
        self.headers.push((DEAD_LETTER_ERROR.into(), error.into()));
        if let Some(field) = field {
            self.headers.push((DEAD_LETTER_FIELD.into(), field.into()));
        }
        self.dead_letter = Some(reason);
        self
    }
}

/// An MQTT message as it arrived.
#[derive(Debug, Clone, Copy)]
pub struct MqttMessage<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: u8,
    pub user_properties: &'a [(String, String)],
    pub content_type: Option<&'a str>,
    pub received_at: SystemTime,
}

/// What every MQTT message is checked against on arrival.
#[derive(Debug, Clone, Copy)]
pub struct MqttChecks<'a> {
    pub dead_letter_topic: &'a str,
    pub event_time: &'a EventTimeBounds,
    /// A larger payload is dead-lettered (`payload_too_large`) with its first
    /// [`TOO_LARGE_PREFIX_BYTES`] only.
    pub max_payload_bytes: usize,
}

impl<'a> MqttChecks<'a> {
    pub fn of(config: &'a crate::config::IngestConfig) -> Self {
        Self {
            dead_letter_topic: &config.dead_letter_topic,
            event_time: &config.event_time,
            max_payload_bytes: config.mqtt.max_payload_bytes,
        }
    }
}

/// The record for `message`: routed and converted, or a dead letter (a payload over the
/// size limit, or a reading whose event time is outside `event_time` of its arrival, among
/// them).
pub fn from_mqtt(routes: &Routes, checks: &MqttChecks<'_>, message: &MqttMessage<'_>) -> OutRecord {
    let dead_letter_topic = checks.dead_letter_topic;
    let mut headers = vec![
        (HEADER_MQTT_TOPIC.to_owned(), message.topic.as_bytes().to_vec()),
        (HEADER_MQTT_QOS.to_owned(), message.qos.to_string().into_bytes()),
    ];
    if let Some(content_type) = message.content_type {
        headers.push((HEADER_MQTT_CONTENT_TYPE.to_owned(), content_type.as_bytes().to_vec()));
    }
    for (name, value) in message.user_properties {
        headers.push((name.clone(), value.as_bytes().to_vec()));
    }
    let unrouted = |key: Option<Vec<u8>>, headers| OutRecord {
        topic: String::new(),
        topic_label: Arc::from(""),
        key,
        payload: message.payload.to_vec(),
        headers,
        dead_letter: None,
    };
    if message.payload.len() > checks.max_payload_bytes {
        let size = message.payload.len();
        let prefix = OutRecord {
            topic: String::new(),
            topic_label: Arc::from(""),
            key: None,
            payload: message.payload[..TOO_LARGE_PREFIX_BYTES.min(size)].to_vec(),
            headers,
            dead_letter: None,
        };
        let error = format!(
            "a payload of {size} bytes, over mqtt.max_payload_bytes ({}); this dead letter keeps its first {} bytes",
            checks.max_payload_bytes, TOO_LARGE_PREFIX_BYTES
        );
        let mut dead_letter = prefix.into_dead_letter(dead_letter_topic, "payload_too_large", &error, None);
        dead_letter.headers.push((DEAD_LETTER_PAYLOAD_BYTES.to_owned(), size.to_string().into_bytes()));
        return dead_letter;
    }
    let route = match routes.route(message.topic) {
        Ok(route) => route,
        Err(no_route) => {
            let reason = match no_route {
                NoRoute::NoRule => "no_route",
                NoRoute::Template { .. } => "route_template",
            };
            return unrouted(None, headers).into_dead_letter(dead_letter_topic, reason, &no_route.to_string(), None);
        }
    };
    let key = route.key.map(String::into_bytes);
    match route.payload {
        PayloadKind::Raw => OutRecord {
            topic: route.kafka_topic,
            topic_label: route.topic_label,
            key,
            payload: message.payload.to_vec(),
            headers,
            dead_letter: None,
        },
        PayloadKind::SensorReading => {
            let envelope = Envelope { topic_device_id: route.device_id.as_deref(), received_at: message.received_at };
            let checked = parse(message.payload, &envelope).and_then(|reading| {
                checks.event_time.check(reading.event_time.as_ref(), message.received_at)?;
                Ok(reading)
            });
            match checked {
                Ok(reading) => {
                    headers.push((HEADER_CONTENT_TYPE.to_owned(), SENSOR_READING_CONTENT_TYPE.into()));
                    OutRecord {
                        topic: route.kafka_topic,
                        topic_label: route.topic_label,
                        key: Some(key.unwrap_or_else(|| reading.device_id.clone().into_bytes())),
                        payload: reading.encode_to_vec(),
                        headers,
                        dead_letter: None,
                    }
                }
                Err(invalid) => {
                    let key = key.or_else(|| route.device_id.map(String::into_bytes));
                    unrouted(key, headers).into_dead_letter(
                        dead_letter_topic,
                        invalid.reason(),
                        &invalid.to_string(),
                        invalid.field(),
                    )
                }
            }
        }
    }
}

/// The record for a reading that arrived over gRPC (already validated).
pub fn from_reading(topic: &str, reading: &sensor::SensorReading) -> OutRecord {
    OutRecord {
        topic: topic.to_owned(),
        topic_label: Arc::from(topic),
        key: Some(reading.device_id.clone().into_bytes()),
        payload: reading.encode_to_vec(),
        headers: vec![(HEADER_CONTENT_TYPE.to_owned(), SENSOR_READING_CONTENT_TYPE.into())],
        dead_letter: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IngestConfig;

    fn message<'a>(topic: &'a str, payload: &'a [u8], properties: &'a [(String, String)]) -> MqttMessage<'a> {
        MqttMessage {
            topic,
            payload,
            qos: 1,
            user_properties: properties,
            content_type: Some("application/json"),
            received_at: SystemTime::UNIX_EPOCH,
        }
    }

    fn checks() -> MqttChecks<'static> {
        static BOUNDS: std::sync::LazyLock<EventTimeBounds> = std::sync::LazyLock::new(EventTimeBounds::default);
        MqttChecks { dead_letter_topic: "dlq", event_time: &BOUNDS, max_payload_bytes: 64 * 1024 }
    }

    fn seed_payload(speed: f64) -> Vec<u8> {
        let mut fields: Vec<String> =
            sensor::signals().iter().map(|s| format!("\"{}\": {}", s.name, s.min.max(0.0))).collect();
        fields.push(format!("\"speed\": {speed}"));
        format!("{{{}}}", fields.join(",")).into_bytes()
    }

    #[test]
    fn a_valid_seed_payload_becomes_a_protobuf_reading_keyed_by_the_topic_device_with_source_headers() {
        let routes = Routes::new(&IngestConfig::default().rules).unwrap();
        let trace =
            vec![("traceparent".to_owned(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned())];
        let payload = seed_payload(12.5);
        let record = from_mqtt(&routes, &checks(), &message("vehicles/sensor/data/car-9", &payload, &trace));
        assert_eq!(record.dead_letter, None);
        assert_eq!(record.topic, "vigil-readings");
        assert_eq!(record.key.as_deref(), Some(&b"car-9"[..]));
        let reading = sensor::SensorReading::decode(record.payload.as_slice()).unwrap();
        assert_eq!((reading.device_id.as_str(), reading.speed), ("car-9", 12.5));
        assert_eq!(record.header("traceparent"), Some(trace[0].1.as_bytes()));
        assert_eq!(record.header(HEADER_MQTT_TOPIC), Some(&b"vehicles/sensor/data/car-9"[..]));
        assert_eq!(record.header(HEADER_MQTT_QOS), Some(&b"1"[..]));
        assert_eq!(record.header(HEADER_MQTT_CONTENT_TYPE), Some(&b"application/json"[..]));
        assert_eq!(record.header(HEADER_CONTENT_TYPE), Some(SENSOR_READING_CONTENT_TYPE.as_bytes()));
    }

    #[test]
    fn invalid_payloads_become_dead_letters_naming_the_reason_and_field_with_the_original_bytes() {
        let routes = Routes::new(&IngestConfig::default().rules).unwrap();
        let with_field = |field: &str| {
            let mut payload = seed_payload(12.5);
            payload.pop();
            payload.extend_from_slice(format!(", {field}}}").as_bytes());
            payload
        };
        let cases: [(Vec<u8>, &str, Option<&str>); 5] = [
            (b"not json".to_vec(), "not_json", None),
            (seed_payload(1e6), "out_of_range", Some("speed")),
            (b"{\"speed\": 3}".to_vec(), "missing_field", Some("coolant_temp")),
            // The messages arrive at the epoch here: the year 9999 is far in their future.
            (with_field("\"event_time\": \"9999-12-31T23:59:59Z\""), "implausible_event_time", Some("event_time")),
            (with_field(&format!("\"device_id\": \"{}\"", "x".repeat(300))), "too_long", Some("device_id")),
        ];
        for (payload, reason, field) in cases {
            let record = from_mqtt(&routes, &checks(), &message("vehicles/sensor/data/car-1", &payload, &[]));
            assert_eq!((record.topic.as_str(), record.dead_letter), ("dlq", Some(reason)));
            assert_eq!(record.payload, payload, "the original payload is kept");
            assert_eq!(record.header(DEAD_LETTER_REASON), Some(reason.as_bytes()));
            assert_eq!(record.header(DEAD_LETTER_FIELD), field.map(str::as_bytes));
            assert!(!record.header(DEAD_LETTER_ERROR).unwrap().is_empty());
            assert_eq!(record.header(HEADER_MQTT_TOPIC), Some(&b"vehicles/sensor/data/car-1"[..]));
            assert_eq!(record.key.as_deref(), Some(&b"car-1"[..]), "dead letters stay keyed by device");
        }
        let record = from_mqtt(&routes, &checks(), &message("elsewhere/x", b"{}", &[]));
        assert_eq!(record.dead_letter, Some("no_route"));
    }

    #[test]
    fn a_payload_over_the_limit_is_dead_lettered_with_its_size_and_first_bytes_only() {
        let routes = Routes::new(&IngestConfig::default().rules).unwrap();
        let limit = checks().max_payload_bytes;
        let fits = seed_payload(12.5);
        let mut padded = fits.clone();
        padded.resize(limit, b' ');
        let record = from_mqtt(&routes, &checks(), &message("vehicles/sensor/data/car-1", &padded, &[]));
        assert_eq!(record.dead_letter, None, "a reading padded to exactly the limit is read");
        padded.push(b' ');
        let record = from_mqtt(&routes, &checks(), &message("vehicles/sensor/data/car-1", &padded, &[]));
        assert_eq!((record.topic.as_str(), record.dead_letter), ("dlq", Some("payload_too_large")));
        assert_eq!(record.payload, padded[..TOO_LARGE_PREFIX_BYTES]);
        assert_eq!(record.header(DEAD_LETTER_PAYLOAD_BYTES), Some((limit + 1).to_string().as_bytes()));
        assert_eq!(record.header(HEADER_MQTT_TOPIC), Some(&b"vehicles/sensor/data/car-1"[..]));
        // Whatever the route: an unrouted topic's oversized payload is cut too.
        let record = from_mqtt(&routes, &checks(), &message("elsewhere/x", &padded, &[]));
        assert_eq!((record.dead_letter, record.payload.len()), (Some("payload_too_large"), TOO_LARGE_PREFIX_BYTES));
    }
}
