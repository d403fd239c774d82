//! What the processor writes for a reading: its score record, an anomaly record when the
//! score is over the threshold, or a dead letter; protobuf or JSON; keyed by device id,
//! with the trace context of the reading's span in the headers (see `trace`).

use std::time::{Duration, SystemTime};

use prost::Message as _;
use proto::vigil::scoring::v1::{Anomaly, Score};
use sensor::SensorReading;

use crate::config::{OutputFormat, ProcessorConfig};
use crate::model::Scored;

/// Headers read from the reading's record and carried to its outputs: the W3C trace
/// context, which the reading's span replaces with its own.
pub const CARRIED_HEADERS: [&str; 2] = telemetry::CONTEXT_HEADERS;

/// A record to write.
#[derive(Debug, Clone, PartialEq)]
pub struct OutRecord {
    pub topic: String,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub kind: OutKind,
    /// The Kafka timestamp to write it with: the reading's own, so that a record and its
    /// outputs carry one time however late they were scored (a backlog after an outage
    /// keeps its times, and the alerts service's event-time check compares like with
    /// like). `None`: the producer's clock.
    pub timestamp: Option<SystemTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutKind {
    Score {
        anomaly: bool,
    },
    Anomaly,
    DeadLetter(&'static str),
    /// Kafka refused it for good even as a dead letter without its payload: not written
    /// (logged and counted; the reading itself is still on the readings topic).
    Dropped(&'static str),
}

/// Where a reading came from.
#[derive(Debug, Clone)]
pub struct Source {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// The record's Kafka timestamp.
    pub timestamp: Option<SystemTime>,
    /// The carried headers (see [`CARRIED_HEADERS`]); the reading's span's context once
    /// its span started.
    pub headers: Vec<(String, Vec<u8>)>,
}

fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    let since = time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: since.as_secs() as i64, nanos: since.subsec_nanos() as i32 }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// The score of a scored reading, naming the reading (device, sequence, and where it was
/// read) and the model version that answered.
pub fn score(source: &Source, reading: &SensorReading, scored: &Scored) -> Score {
    let now = SystemTime::now();
    Score {
        device_id: reading.device_id.clone(),
        event_time: reading.event_time,
        sequence: reading.sequence,
        score: scored.score,
        threshold: scored.threshold,
        is_anomaly: scored.score > scored.threshold,
        model_name: scored.model_name.clone(),
        model_version: scored.model_version,
        model_latency_us: micros(scored.latency),
        pipeline_latency_us: source.timestamp.and_then(|t| now.duration_since(t).ok()).map_or(0, micros),
        scored_at: Some(timestamp(now)),
        source_topic: source.topic.clone(),
        source_partition: source.partition,
        source_offset: source.offset,
        fault: reading.fault,
    }
}

/// A score record's payload in `format`.
pub fn encode_score(format: OutputFormat, score: &Score) -> Vec<u8> {
    match format {
        OutputFormat::Protobuf => score.encode_to_vec(),
        OutputFormat::Json => serde_json::to_vec(&sensor::score_json::to_json(score)).unwrap_or_default(),
    }
}

/// The headers a score's records carry besides the trace context: the model that answered.
pub fn model_headers(scored: &Scored) -> [(String, Vec<u8>); 2] {
    [
        ("vigil.model.name".into(), scored.model_name.clone().into_bytes()),
        ("vigil.model.version".into(), scored.model_version.to_string().into_bytes()),
    ]
}

/// The score record (and the anomaly record, when it is one) of a scored reading.
pub fn scored(config: &ProcessorConfig, source: &Source, reading: &SensorReading, scored: &Scored) -> Vec<OutRecord> {
    let score = score(source, reading, scored);
    let is_anomaly = score.is_anomaly;
    let mut headers = source.headers.clone();
    headers.extend(model_headers(scored));
    let key = reading.device_id.clone().into_bytes();
    let anomaly_payload = is_anomaly.then(|| match config.output_format {
        OutputFormat::Protobuf => {
            Anomaly { score: Some(score.clone()), reading: Some(reading.clone()) }.encode_to_vec()
        }
        OutputFormat::Json => {
            // The reading in its canonical JSON form (always valid JSON).
            let reading: serde_json::Value =
                serde_json::from_str(&sensor::json::to_json(reading)).unwrap_or(serde_json::Value::Null);
            serde_json::to_vec(&serde_json::json!({"score": sensor::score_json::to_json(&score), "reading": reading}))
                .unwrap_or_default()
        }
    });
    let mut records = vec![OutRecord {
        topic: config.scores_topic.clone(),
        key: key.clone(),
        payload: encode_score(config.output_format, &score),
        headers: headers.clone(),
        kind: OutKind::Score { anomaly: is_anomaly },
        timestamp: source.timestamp,
    }];
    if let Some(payload) = anomaly_payload {
        records.push(OutRecord {
            topic: config.anomalies_topic.clone(),
            key,
            payload,
            headers,
            kind: OutKind::Anomaly,
            timestamp: source.timestamp,
        });
    }
    records
}

/// The reading's original bytes on the dead-letter topic, with headers saying why.
pub fn dead_letter(
    config: &ProcessorConfig,
    source: &Source,
    payload: &[u8],
    reason: &'static str,
    error: &str,
) -> OutRecord {
    use kafka::headers::*;
    let mut headers = source.headers.clone();
    headers.push((DEAD_LETTER_REASON.into(), reason.as_bytes().to_vec()));
    headers.push((DEAD_LETTER_ERROR.into(), error.as_bytes().to_vec()));
    headers.push((DEAD_LETTER_SOURCE_TOPIC.into(), source.topic.clone().into_bytes()));
    headers.push((DEAD_LETTER_SOURCE_PARTITION.into(), source.partition.to_string().into_bytes()));
    headers.push((DEAD_LETTER_SOURCE_OFFSET.into(), source.offset.to_string().into_bytes()));
    OutRecord {
        topic: config.dead_letter_topic.clone(),
        key: source.key.clone().unwrap_or_default(),
        payload: payload.to_vec(),
        headers,
        kind: OutKind::DeadLetter(reason),
        timestamp: source.timestamp,
    }
}

/// What to write instead of `record` now that Kafka refused it for good (`error`): its
/// dead letter, naming the refusal and the topic it was for. Its payload is kept unless the
/// refusal was for size; a dead letter refused again goes without its payload. `None` when
/// even that was refused: nothing more can be written for it.
pub fn refused(config: &ProcessorConfig, record: &OutRecord, error: &rdkafka::error::KafkaError) -> Option<OutRecord> {
    use kafka::headers::*;
    let reason = kafka::refusal_reason(error);
    let was_dead_letter = matches!(record.kind, OutKind::DeadLetter(_));
    if was_dead_letter && record.payload.is_empty() {
        return None;
    }
    let mut headers = record.headers.clone();
    if !was_dead_letter {
        headers.push((DEAD_LETTER_REASON.into(), reason.as_bytes().to_vec()));
        headers.push((DEAD_LETTER_ERROR.into(), error.to_string().into_bytes()));
        headers.push((DEAD_LETTER_TARGET_TOPIC.into(), record.topic.clone().into_bytes()));
    }
    let keep_payload = !was_dead_letter && reason != "record_too_large";
    if !keep_payload {
        headers.push((DEAD_LETTER_PAYLOAD_BYTES.into(), record.payload.len().to_string().into_bytes()));
    }
    Some(OutRecord {
        topic: config.dead_letter_topic.clone(),
        key: record.key.clone(),
        payload: if keep_payload { record.payload.clone() } else { Vec::new() },
        headers,
        kind: if was_dead_letter { record.kind } else { OutKind::DeadLetter(reason) },
        // Written now: the reading's time may be what the broker refused.
        timestamp: None,
    })
}
