//! Reading a time range of a topic without a consumer group: partitions are `assign`ed
//! (never subscribed, so no group is joined and nobody's partitions move), start at the
//! offset Kafka gives for the range's start, stop where the caller's time bound says or at
//! the partition's end when the read gets there, and no offset is committed anywhere.
//! Blocking: run on a blocking thread.
//!
//! A range's spans are open-ended rather than ending at the high watermark the broker
//! reports when the read begins: tansu 0.6 reports one past a batch's first record rather
//! than past its last, and a range bounded by it lost all but one record of each partition
//! (found by `vigil export-readings` on tansu, services/vigil/tests/export_cli.rs; the
//! same distrust as `kafka::read_partition_to_end`).
//!
//! Where Kafka answers `offsets_for_times` with "none" (every record is older, or the
//! broker cannot tell, as librdkafka's mock cluster, `vigil up`'s default, always answers)
//! the partition's last record settles it: older than the start, nothing to read; else
//! the partition is read from its beginning and the caller skips what is too early.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::config::ProcessorConfig;

/// Kafka metadata and offset requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A read stops with an error when no record came for this long while partitions were
/// still unfinished (Kafka away).
pub const IDLE_LIMIT: Duration = Duration::from_secs(30);

/// The replay consumer's settings before the user's `kafka` and `consumer` tables (whose
/// security settings it needs); the group and offset ones are set after them.
const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    // An offset retention already deleted: read from what is left.
    ("auto.offset.reset", "earliest"),
    // See kafka_clients::CONSUMER_DEFAULTS: the mock cluster holds empty fetches this long.
    ("fetch.wait.max.ms", "10"),
    ("client.id", "vigil-stream-processor-replay"),
];

/// Offsets `[start, end)` of one partition; a range's spans end at [`OPEN`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub partition: i32,
    pub start: i64,
    pub end: i64,
}

/// What the caller wants after a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    Next,
    /// Nothing more from this partition.
    PartitionDone,
    /// Nothing more at all.
    Stop,
}

#[derive(Debug, thiserror::Error)]
pub enum RangeError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("topic {0} does not exist (or has no partitions)")]
    NoTopic(String),
    #[error(
        "kafka: no record from {topic} for {} s with partitions {partitions:?} unfinished{}",
        IDLE_LIMIT.as_secs(),
        last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
    )]
    Stalled { topic: String, partitions: Vec<i32>, last_error: Option<String> },
    #[error("cancelled")]
    Cancelled,
}

/// The range reader's librdkafka callbacks: reaching a partition's end is how a read
/// finishes, not an error worth a log line.
pub struct RangeContext;

impl ClientContext for RangeContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::trace!(reason, "end of a partition");
        } else {
            tracing::warn!(%error, reason, "kafka (replay consumer)");
        }
    }
}

impl ConsumerContext for RangeContext {}

/// A consumer reading ranges.
pub type RangeConsumer = BaseConsumer<RangeContext>;

/// A consumer with [`consumer_config`]'s settings.
pub fn consumer(config: &ProcessorConfig, group_id: &str) -> Result<RangeConsumer, KafkaError> {
    consumer_config(config, group_id).create_with_context(RangeContext)
}

/// The consumer's settings: the processor's Kafka properties, `group_id` (librdkafka needs
/// one; nothing is ever committed under it) and no offset commits or stores.
pub fn consumer_config(config: &ProcessorConfig, group_id: &str) -> rdkafka::ClientConfig {
    let mut client = kafka::client_config(CONSUMER_DEFAULTS, &[&config.kafka, &config.consumer]);
    client
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A partition whose records end before its recorded end (transaction markers
        // occupy offsets too) is finished when the read reaches the log's end.
        .set("enable.partition.eof", "true");
    client
}

/// No end: the partition is read until the caller's bound stops it or its log's end.
pub const OPEN: i64 = i64::MAX;

/// The partitions of `topic` and, for each, the offsets from the first record at or after
/// `from_ms` (or earlier: the caller skips what is too early) on, open-ended; an empty
/// partition's span is empty.
pub fn spans(consumer: &RangeConsumer, topic: &str, from_ms: i64) -> Result<Vec<Span>, RangeError> {
    let metadata = consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(RangeError::NoTopic(topic.to_owned()));
    }
    let mut watermarks = BTreeMap::new();
    let mut by_time = TopicPartitionList::new();
    for &partition in &partitions {
        watermarks.insert(partition, consumer.fetch_watermarks(topic, partition, REQUEST_TIMEOUT)?);
        // Negative offsets are librdkafka's logical ones (-2: the beginning): no time before
        // the epoch.
        by_time.add_partition_offset(topic, partition, Offset::Offset(from_ms.max(0)))?;
    }
    let answers = consumer.offsets_for_times(by_time, REQUEST_TIMEOUT)?;
    let mut spans = Vec::new();
    let mut unsettled = Vec::new();
    for (&partition, &(low, high)) in &watermarks {
        let answer = answers.find_partition(topic, partition).map(|e| e.offset());
        match answer {
            Some(Offset::Offset(offset)) => spans.push(Span { partition, start: offset.max(low), end: OPEN }),
            _ if high <= low => spans.push(Span { partition, start: high, end: high }),
            _ => unsettled.push((partition, low, high)),
        }
    }
    if !unsettled.is_empty() {
        let last = last_timestamps(consumer, topic, &unsettled)?;
        for (partition, low, high) in unsettled {
            let start = match last.get(&partition) {
                Some(&timestamp) if timestamp < from_ms => high,
                _ => low,
            };
            spans.push(Span { partition, start, end: OPEN });
        }
        tracing::debug!(topic, partitions = ?spans, "offsets for the range's start settled by the partitions' last records");
    }
    spans.sort_by_key(|s| s.partition);
    Ok(spans)
}

/// The Kafka timestamp of each partition's last record (`(partition, low, high)`), where
/// one could be read.
fn last_timestamps(
    consumer: &RangeConsumer,
    topic: &str,
    partitions: &[(i32, i64, i64)],
) -> Result<HashMap<i32, i64>, RangeError> {
    let mut assignment = TopicPartitionList::new();
    for &(partition, _, high) in partitions {
        assignment.add_partition_offset(topic, partition, Offset::Offset(high - 1))?;
    }
    consumer.assign(&assignment)?;
    let mut found = HashMap::new();
    let mut answered = 0;
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    while answered < partitions.len() && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                if let Some(timestamp) = message.timestamp().to_millis()
                    && found.insert(message.partition(), timestamp).is_none()
                {
                    answered += 1;
                }
            }
            // The last offset holds no record (a transaction marker): unknown.
            Some(Err(KafkaError::PartitionEOF(_))) => answered += 1,
            Some(Err(error)) => tracing::debug!(topic, %error, "reading the partitions' last records"),
            None => {}
        }
    }
    consumer.unassign()?;
    Ok(found)
}

/// Reads `spans` of `topic`, handing each record to `take`, until every span is done
/// (its end reached, or `take` said so), `take` says stop, or `cancel` is set.
pub fn scan(
    consumer: &RangeConsumer,
    topic: &str,
    spans: &[Span],
    cancel: &AtomicBool,
    mut take: impl FnMut(&BorrowedMessage<'_>) -> Take,
) -> Result<(), RangeError> {
    let mut open: HashMap<i32, i64> = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for span in spans.iter().filter(|s| s.start < s.end) {
        open.insert(span.partition, span.end);
        assignment.add_partition_offset(topic, span.partition, Offset::Offset(span.start))?;
    }
    if open.is_empty() {
        return Ok(());
    }
    consumer.assign(&assignment)?;
    let close = |open: &mut HashMap<i32, i64>, partition: i32| {
        open.remove(&partition);
        // Fetch no more of it.
        let mut paused = TopicPartitionList::new();
        paused.add_partition(topic, partition);
        let _ = consumer.pause(&paused);
    };
    let mut last_record = Instant::now();
    let mut last_error = None;
    while !open.is_empty() {
        if cancel.load(Ordering::Relaxed) {
            return Err(RangeError::Cancelled);
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                last_record = Instant::now();
                let partition = message.partition();
                let Some(&end) = open.get(&partition) else { continue };
                if message.offset() >= end {
                    close(&mut open, partition);
                    continue;
                }
                match take(&message) {
                    Take::Next if message.offset() + 1 < end => {}
                    Take::Next | Take::PartitionDone => close(&mut open, partition),
                    Take::Stop => break,
                }
            }
            // At the log's end, which is at or past the span's end (ends only grow).
            Some(Err(KafkaError::PartitionEOF(partition))) => close(&mut open, partition),
            Some(Err(error)) => {
                tracing::debug!(topic, %error, "reading a range");
                last_error = Some(error.to_string());
            }
            None if last_record.elapsed() > IDLE_LIMIT => {
                let mut partitions: Vec<i32> = open.keys().copied().collect();
                partitions.sort_unstable();
                return Err(RangeError::Stalled { topic: topic.to_owned(), partitions, last_error });
            }
            None => {}
        }
    }
    consumer.unassign()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_consumer_commits_nothing_and_is_not_in_the_live_group() {
        let mut config = ProcessorConfig::default();
        config.kafka.insert("security.protocol".into(), "SASL_SSL".into());
        let client = consumer_config(&config, "vigil-stream-processor-replay-1");
        assert_eq!(client.get("group.id"), Some("vigil-stream-processor-replay-1"));
        assert_ne!(client.get("group.id"), Some(config.group_id.as_str()));
        assert_eq!(client.get("enable.auto.commit"), Some("false"));
        assert_eq!(client.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(client.get("security.protocol"), Some("SASL_SSL"), "the cluster's security settings apply");
    }
}
