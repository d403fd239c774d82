//! Poison records mixed into the running pipeline: one for each way in that issue 25 found
//! open (a reading from the year 9999, a device id of 300 KB, garbage, a payload over
//! ingest's limit), through each door it can come in by (MQTT, ingest's gRPC API, straight
//! onto the readings or scores topic). Each must end as a dead letter on the dead-letter
//! topic of the service that catches it, with its reason header, counted in that service's
//! `*_dead_lettered_total{reason}`; over gRPC, as an INVALID_ARGUMENT naming the field with
//! nothing written. Nothing of any of them may reach the next topic.
//!
//! The oversized payload is over ingest's `mqtt.max_payload_bytes` and under its
//! `mqtt.max_packet_bytes`. A message over the packet limit is not sent: over MQTT 5
//! (ingest's default) the broker drops it unseen, as the protocol requires, and refusing
//! it at publish is the broker's setting (docs/failure-model.md).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use kafka::headers::{
    DEAD_LETTER_REASON, DEAD_LETTER_SOURCE_OFFSET, DEAD_LETTER_SOURCE_PARTITION, DEAD_LETTER_SOURCE_TOPIC,
};
use prost::Message as _;
use proto::vigil::ingest::v1::PublishRequest;
use proto::vigil::ingest::v1::ingest_service_client::IngestServiceClient;
use proto::vigil::scoring::v1::Score;
use rdkafka::producer::FutureRecord;
use sensor::SensorReading;
use test_support::{Tail, TailedRecord};

use super::processes::Service;
use super::topics::{ALERT_DEAD_LETTERS, INGEST_DEAD_LETTERS, READINGS, SCORES, SCORING_DEAD_LETTERS};

/// 9999-12-31T23:59:59Z.
const YEAR_9999: i64 = 253_402_300_799;
/// A device id of 300 KB: issue 25's, which made the anomaly record exceed Kafka's limit.
const HUGE_ID_BYTES: usize = 300 * 1024;
/// A device id over the limit (`sensor::MAX_DEVICE_ID_BYTES`) in a payload under ingest's.
const LONG_ID_BYTES: usize = 1024;
/// What ingest writes an MQTT message's topic into.
const MQTT_TOPIC_HEADER: &str = ingest::record::HEADER_MQTT_TOPIC;

/// The service that must catch a poison record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Catcher {
    Ingest,
    Processor,
    Alerts,
}

impl Catcher {
    fn dead_letter_topic(self) -> &'static str {
        match self {
            Self::Ingest => INGEST_DEAD_LETTERS,
            Self::Processor => SCORING_DEAD_LETTERS,
            Self::Alerts => ALERT_DEAD_LETTERS,
        }
    }

    fn metric(self) -> &'static str {
        match self {
            Self::Ingest => "ingest_dead_lettered_total",
            Self::Processor => "processor_dead_lettered_total",
            Self::Alerts => "alerts_dead_lettered_total",
        }
    }
}

/// How a poison record comes in.
enum Door {
    Mqtt {
        topic: String,
        payload: Vec<u8>,
    },
    /// Ingest's gRPC `Publish`.
    Grpc(Box<SensorReading>),
    Kafka {
        topic: &'static str,
        payload: Vec<u8>,
    },
}

/// What a poison record must end as.
#[derive(Debug, Clone, Copy)]
enum Fate {
    /// A dead letter on `catcher`'s topic with this reason header.
    DeadLetter(Catcher, &'static str),
    /// An INVALID_ARGUMENT naming this field, nothing written.
    Refused(&'static str),
}

struct Case {
    name: &'static str,
    door: Door,
    fate: Fate,
}

/// What became of an injection.
enum Injected {
    Published,
    Written { partition: i32, offset: i64 },
    Answered(Result<u64, tonic::Status>),
}

/// The poison cases, built on a valid reading `template` of the fleet; `max_payload_bytes`
/// is ingest's limit on an MQTT payload (`mqtt.max_payload_bytes`).
fn cases(template: &SensorReading, max_payload_bytes: usize) -> Vec<Case> {
    let reading = |device: &str| SensorReading { device_id: device.to_owned(), ..template.clone() };
    let far_future = |device: &str| SensorReading {
        event_time: Some(prost_types::Timestamp { seconds: YEAR_9999, nanos: 0 }),
        ..reading(device)
    };
    let long_id = |bytes: usize| reading(&"x".repeat(bytes));
    let mqtt = |device: &str, payload: Vec<u8>| Door::Mqtt { topic: format!("vehicles/sensor/data/{device}"), payload };
    let json = |reading: &SensorReading| sensor::json::to_json(reading).into_bytes();
    let score = |reading: &SensorReading| Score {
        device_id: reading.device_id.clone(),
        event_time: reading.event_time,
        sequence: 1,
        score: 1.0,
        threshold: 1.0,
        is_anomaly: true,
        model_name: "car-anomaly".into(),
        model_version: 2,
        ..Score::default()
    };
    let case = |name, door, fate| Case { name, door, fate };
    use Catcher::{Alerts, Ingest, Processor};
    use Fate::{DeadLetter, Refused};
    vec![
        case(
            "MQTT JSON dated 9999",
            mqtt("poison-mqtt-9999", json(&far_future("poison-mqtt-9999"))),
            DeadLetter(Ingest, "implausible_event_time"),
        ),
        case(
            "MQTT JSON, 1 KiB device id",
            mqtt("poison-mqtt-long-id", json(&long_id(LONG_ID_BYTES))),
            DeadLetter(Ingest, "too_long"),
        ),
        case(
            "MQTT JSON, 300 KB device id",
            mqtt("poison-mqtt-huge-id", json(&long_id(HUGE_ID_BYTES))),
            DeadLetter(Ingest, "payload_too_large"),
        ),
        case(
            "MQTT garbage",
            mqtt("poison-mqtt-garbage", b"\x00\xff{not json".to_vec()),
            DeadLetter(Ingest, "not_json"),
        ),
        case(
            "MQTT payload twice ingest's limit",
            mqtt("poison-mqtt-oversized", vec![b'x'; 2 * max_payload_bytes]),
            DeadLetter(Ingest, "payload_too_large"),
        ),
        case(
            "gRPC reading dated 9999",
            Door::Grpc(Box::new(far_future("poison-grpc-9999"))),
            Refused("readings[0].event_time"),
        ),
        case(
            "gRPC reading, 300 KB device id",
            Door::Grpc(Box::new(long_id(HUGE_ID_BYTES))),
            Refused("readings[0].device_id"),
        ),
        case(
            "garbage on the readings topic",
            Door::Kafka { topic: READINGS, payload: b"\x00garbage: not a SensorReading".to_vec() },
            DeadLetter(Processor, "not_a_sensor_reading"),
        ),
        case(
            "reading dated 9999 on the readings topic",
            Door::Kafka { topic: READINGS, payload: far_future("poison-kafka-9999").encode_to_vec() },
            DeadLetter(Processor, "implausible_event_time"),
        ),
        case(
            "reading with a 300 KB device id on the readings topic",
            Door::Kafka { topic: READINGS, payload: long_id(HUGE_ID_BYTES).encode_to_vec() },
            DeadLetter(Processor, "too_long"),
        ),
        case(
            "score dated 9999 on the scores topic",
            Door::Kafka { topic: SCORES, payload: score(&far_future("poison-score-9999")).encode_to_vec() },
            DeadLetter(Alerts, "implausible_event_time"),
        ),
        case(
            "score with a 300 KB device id on the scores topic",
            Door::Kafka { topic: SCORES, payload: score(&long_id(HUGE_ID_BYTES)).encode_to_vec() },
            DeadLetter(Alerts, "device_id_too_long"),
        ),
    ]
}

/// The cases, injected; keep it until [`Injection::check`].
pub(crate) struct Injection {
    injected: Vec<(Case, Injected)>,
    pub(crate) at: SystemTime,
}

/// Injects every case: MQTT messages to Mosquitto at `mqtt_url` (QoS 1, waiting for the
/// broker's acknowledgements), gRPC calls to ingest at `ingest_grpc`, records straight
/// onto Kafka at `kafka`.
pub(crate) async fn inject(
    mqtt_url: &str,
    kafka: &str,
    ingest_grpc: std::net::SocketAddr,
    template: &SensorReading,
    max_payload_bytes: usize,
) -> Injection {
    let at = SystemTime::now();
    let cases = cases(template, max_payload_bytes);
    let mqtt_messages: Vec<(String, Vec<u8>)> = cases
        .iter()
        .filter_map(|case| match &case.door {
            Door::Mqtt { topic, payload } => Some((topic.clone(), payload.clone())),
            _ => None,
        })
        .collect();
    publish_mqtt(mqtt_url, mqtt_messages).await;
    let mut grpc = IngestServiceClient::connect(format!("http://{ingest_grpc}")).await.expect("ingest's gRPC port");
    let producer = test_support::kafka::producer(kafka);
    let mut injected = Vec::new();
    for case in cases {
        let outcome = match &case.door {
            Door::Mqtt { .. } => Injected::Published,
            Door::Grpc(reading) => {
                let request = PublishRequest { readings: vec![(**reading).clone()] };
                Injected::Answered(grpc.publish(request).await.map(|response| response.into_inner().accepted))
            }
            Door::Kafka { topic, payload } => {
                let record = FutureRecord::<str, [u8]>::to(topic).key(case.name).payload(payload.as_slice());
                let delivery = producer.send(record, Duration::from_secs(30)).await;
                let delivery = delivery.unwrap_or_else(|(e, _)| panic!("writing {:?} to {topic}: {e}", case.name));
                Injected::Written { partition: delivery.partition, offset: delivery.offset }
            }
        };
        injected.push((case, outcome));
    }
    Injection { injected, at }
}

/// Publishes `messages` QoS 1 over MQTT 3.1.1 and waits until the broker acknowledged each.
async fn publish_mqtt(url: &str, messages: Vec<(String, Vec<u8>)>) {
    let endpoint = ingest::mqtt::parse_url(url).expect("an MQTT URL");
    let mut options = rumqttc::MqttOptions::new("pipeline-faults-poison", endpoint.host, endpoint.port);
    // Room for the largest payload on the way out (rumqttc's default is 10 KiB).
    let largest = messages.iter().map(|(_, payload)| payload.len()).max().unwrap_or_default() + 1024;
    options.set_max_packet_size(largest, largest);
    let (client, mut events) = rumqttc::AsyncClient::new(options, 16);
    let expected = messages.len();
    let acknowledged = tokio::spawn(async move {
        let mut acknowledged = 0;
        while acknowledged < expected {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => acknowledged += 1,
                Ok(_) => {}
                Err(error) => panic!("publishing the poison over MQTT: {error}"),
            }
        }
    });
    for (topic, payload) in messages {
        client.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload).await.expect("queued for the broker");
    }
    tokio::time::timeout(Duration::from_secs(30), acknowledged)
        .await
        .expect("Mosquitto acknowledged every poison message within 30 s")
        .expect("the MQTT event loop did not fail");
    let _ = client.disconnect().await;
}

impl Injection {
    /// Whether every case that must be a dead letter has one (to wait on).
    pub(crate) fn all_dead_lettered(&self, tail: &Tail) -> bool {
        self.injected.iter().all(|(case, injected)| match case.fate {
            Fate::DeadLetter(catcher, _) => dead_letter(tail, catcher, &case.door, injected).is_some(),
            Fate::Refused(_) => true,
        })
    }

    /// One line per case saying what became of it, and what is wrong with that, if
    /// anything. `ingest`, `processor`, `alerts`: the services running now, which must
    /// count the dead letters (their counters restart with the process).
    pub(crate) async fn check(
        &self,
        tail: &Tail,
        ingest: &Service,
        processor: &Service,
        alerts: &Service,
    ) -> (Vec<String>, Vec<String>) {
        let (mut lines, mut failures) = (Vec::new(), Vec::new());
        // (catcher, reason) -> dead letters expected under that label.
        let mut counted: BTreeMap<(Catcher, &str), u64> = BTreeMap::new();
        for (case, injected) in &self.injected {
            let mut fail = |problem: String| failures.push(format!("poison {:?}: {problem}", case.name));
            match (case.fate, &case.door, injected) {
                (Fate::Refused(field), Door::Grpc(reading), Injected::Answered(answer)) => {
                    match answer {
                        Err(status)
                            if status.code() == tonic::Code::InvalidArgument && status.message().contains(field) =>
                        {
                            lines.push(format!("{}: refused, INVALID_ARGUMENT naming {field}", case.name));
                        }
                        Err(status) => fail(format!(
                            "refused as {:?} ({:?}), not as INVALID_ARGUMENT naming {field}",
                            status.code(),
                            status.message()
                        )),
                        Ok(accepted) => fail(format!("accepted ({accepted} readings)")),
                    }
                    let key = Some(reading.device_id.as_bytes());
                    if tail.with(READINGS, |records| records.iter().any(|r| r.record.key.as_deref() == key)) {
                        fail("it is on the readings topic".into());
                    }
                }
                (Fate::DeadLetter(catcher, expected), door, injected) => {
                    let topic = catcher.dead_letter_topic();
                    let Some(letter) = dead_letter(tail, catcher, door, injected) else {
                        fail(format!("no dead letter on {topic}"));
                        continue;
                    };
                    let reason = letter.record.header(DEAD_LETTER_REASON).map(String::from_utf8_lossy);
                    if reason.as_deref() != Some(expected) {
                        fail(format!("its dead letter on {topic} has reason {reason:?}, not {expected:?}"));
                    }
                    lines.push(format!("{}: dead letter on {topic} ({})", case.name, reason.unwrap_or_default()));
                    *counted.entry((catcher, expected)).or_default() += 1;
                    if let Some(leak) = leaked(tail, door, injected) {
                        fail(leak);
                    }
                }
                _ => unreachable!("a gRPC case is answered, and only a gRPC case is refused"),
            }
        }
        for ((catcher, reason), expected) in counted {
            let service = match catcher {
                Catcher::Ingest => ingest,
                Catcher::Processor => processor,
                Catcher::Alerts => alerts,
            };
            let metric = catcher.metric();
            let seen = service.metric(metric, &[("reason", reason)]).await;
            if seen < expected as f64 {
                failures.push(format!("{metric}{{reason=\"{reason}\"}} is {seen}, want at least {expected}"));
            }
        }
        (lines, failures)
    }
}

/// The dead letter on `catcher`'s topic of what came in by `door`: for an MQTT message,
/// the one carrying its MQTT topic; for a Kafka record, the one naming it as its source.
fn dead_letter(tail: &Tail, catcher: Catcher, door: &Door, injected: &Injected) -> Option<TailedRecord> {
    tail.with(catcher.dead_letter_topic(), |letters| {
        letters.iter().find(|letter| is_from(&letter.record, door, injected)).cloned()
    })
}

fn is_from(record: &embedded_brokers::ReadRecord, door: &Door, injected: &Injected) -> bool {
    let header = |name: &str| record.header(name).map(|v| String::from_utf8_lossy(v).into_owned());
    match (door, injected) {
        (Door::Mqtt { topic, .. }, _) => header(MQTT_TOPIC_HEADER).as_deref() == Some(topic.as_str()),
        (Door::Kafka { topic, .. }, Injected::Written { partition, offset }) => {
            header(DEAD_LETTER_SOURCE_TOPIC).as_deref() == Some(*topic)
                && header(DEAD_LETTER_SOURCE_PARTITION) == Some(partition.to_string())
                && header(DEAD_LETTER_SOURCE_OFFSET) == Some(offset.to_string())
        }
        _ => false,
    }
}

/// What of a poison record reached the next stage, if anything: a readings record from
/// the MQTT message, a score of the poisoned reading.
fn leaked(tail: &Tail, door: &Door, injected: &Injected) -> Option<String> {
    match (door, injected) {
        (Door::Mqtt { topic, .. }, _) => tail
            .with(READINGS, |records| records.iter().any(|r| is_from(&r.record, door, injected)))
            .then(|| format!("a record from MQTT topic {topic} is on the readings topic")),
        (Door::Kafka { topic, .. }, Injected::Written { partition, offset }) if *topic == READINGS => {
            let scored = tail.with(SCORES, |records| {
                records.iter().any(|r| {
                    Score::decode(r.record.payload.as_slice())
                        .is_ok_and(|s| s.source_partition == *partition && s.source_offset == *offset)
                })
            });
            scored.then(|| format!("it was scored (readings [{partition}] offset {offset})"))
        }
        _ => None,
    }
}
