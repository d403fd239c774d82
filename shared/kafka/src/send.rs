//! Handing records to a producer without giving up on a full queue.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::ToBytes;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

/// How long to wait before offering a record again to a full queue.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(5);

/// Hands `record` to `producer`, waiting while its local queue is full (backpressure, not
/// an error); any other refusal is returned for the caller to judge (retry, dead-letter,
/// abort the transaction).
pub async fn send_waiting<K, P>(
    producer: &FutureProducer,
    record: FutureRecord<'_, K, P>,
) -> Result<DeliveryFuture, KafkaError>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    let mut record = record;
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                tokio::time::sleep(QUEUE_FULL_WAIT).await;
            }
            Err((error, _)) => return Err(error),
        }
    }
}
