//! Reading a partition from its beginning to its end: how a new owner restores state from a
//! changelog or a replica catches up on a state topic before acting on it.

use std::time::{Duration, Instant};

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

/// Assigns `consumer` to `topic`/`partition` from its beginning and calls `on_record` for
/// every record up to the high watermark as it was when the read began; returns that
/// watermark (the offset to follow on from). Gaps (compacted records, transaction markers)
/// are passed over by the consumer's position. Blocking; fails when no record arrives for
/// `stall`. The consumer's assignment is replaced.
pub fn read_partition_to_end<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
    stall: Duration,
    mut on_record: impl FnMut(&BorrowedMessage<'_>),
) -> Result<i64, ReadError> {
    let kafka = |source| ReadError::Kafka { topic: topic.to_owned(), partition, source };
    let (low, end) = consumer.fetch_watermarks(topic, partition, WATERMARKS_TIMEOUT).map_err(kafka)?;
    if end <= low {
        return Ok(end);
    }
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Beginning).map_err(kafka)?;
    consumer.assign(&assignment).map_err(kafka)?;
    let mut progress = Instant::now();
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                on_record(&message);
                progress = Instant::now();
                if message.offset() + 1 >= end {
                    return Ok(end);
                }
            }
            // End-of-partition events are not records; errors are.
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(error)) => return Err(kafka(error)),
            None => {
                if position(consumer, topic, partition).is_some_and(|at| at >= end) {
                    return Ok(end);
                }
                if progress.elapsed() >= stall {
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
