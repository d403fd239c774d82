//! Reading a partition from its beginning to its end: how a new owner restores state from a
//! changelog or a replica catches up on a state topic before acting on it.

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};

/// How long the watermark request may take.
const WATERMARKS_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a partition was not read to its end.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading {topic} partition {partition}: {source}")]
    Kafka { topic: String, partition: i32, source: KafkaError },
    #[error("reading {topic} partition {partition}: no progress for {stall:?} before offset {end}")]
    Stalled { topic: String, partition: i32, end: i64, stall: Duration },
}

/// Reads `topic`/`partition` from its beginning to its end with a consumer of its own
/// (`config`, plus end-of-partition events), calling `on_record` for every record, and
/// returns the end (the offset to follow on from). Gaps (compacted records, transaction
/// markers) are passed over by the consumer's position. Blocking; fails when no record
/// arrives for `stall`.
///
/// The end is where a fetch found nothing more (librdkafka's end-of-partition event) at or
/// past the high watermark the broker reported when the read began. The watermark alone is
/// not trusted: tansu 0.6 reports one short of the records it serves when producers write
/// batches of several records, and a changelog restored only to it lost the last batch's
/// state (found by tests/pipeline_faults.rs).
pub fn read_partition_to_end(
    config: &ClientConfig,
    topic: &str,
    partition: i32,
    stall: Duration,
    mut on_record: impl FnMut(&BorrowedMessage<'_>),
) -> Result<i64, ReadError> {
    let kafka = |source| ReadError::Kafka { topic: topic.to_owned(), partition, source };
    let consumer: BaseConsumer = config
        .clone()
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()
        .map_err(kafka)?;
    let (low, reported_end) = consumer.fetch_watermarks(topic, partition, WATERMARKS_TIMEOUT).map_err(kafka)?;
    if reported_end <= low {
        return Ok(reported_end);
    }
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Beginning).map_err(kafka)?;
    consumer.assign(&assignment).map_err(kafka)?;
    let mut progress = Instant::now();
    let mut next = low;
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                on_record(&message);
                next = message.offset() + 1;
                progress = Instant::now();
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {
                let at = position(&consumer, topic, partition).unwrap_or(next).max(next);
                if at >= reported_end {
                    return Ok(at);
                }
            }
            Some(Err(error)) => return Err(kafka(error)),
            None => {
                if progress.elapsed() >= stall {
                    let end = reported_end.max(next);
                    return Err(ReadError::Stalled { topic: topic.to_owned(), partition, end, stall });
                }
            }
        }
    }
}

/// Where the consumer will read next in the partition, once it knows.
fn position<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str, partition: i32) -> Option<i64> {
    let positions = consumer.position().ok()?;
    match positions.find_partition(topic, partition)?.offset() {
        Offset::Offset(at) => Some(at),
        _ => None,
    }
}

/// A record's Kafka timestamp (create or log-append time, whichever the topic keeps) as a
/// `SystemTime`; `None` when it has none or one before the epoch.
pub fn record_time<M: rdkafka::Message>(message: &M) -> Option<std::time::SystemTime> {
    let ms = u64::try_from(message.timestamp().to_millis()?).ok()?;
    Some(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}
