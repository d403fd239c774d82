//! Handing a reading's outputs to the producer and waiting for Kafka to confirm them: at
//! least once (a record Kafka did not take is sent again) or inside a transaction (a
//! failure aborts it).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, Producer as _};

use crate::output::{OutKind, OutRecord};

use super::*;

/// Hands every record to the producer, in order (see [`enqueue`]).
pub(super) async fn enqueue_all(shared: &WorkerResources, records: &mut [OutRecord]) -> Vec<Option<DeliveryFuture>> {
    let mut deliveries = Vec::with_capacity(records.len());
    for record in records {
        deliveries.push(enqueue(shared, record).await);
    }
    deliveries
}

/// Hands `record` to the producer, waiting while its queue is full and retrying what the
/// producer refuses for now with backoff. A record it refuses for good (too large, say)
/// is replaced by its dead letter ([`crate::output::refused`]); `None` when even that is
/// refused, and the record is marked dropped.
pub(super) async fn enqueue(shared: &WorkerResources, record: &mut OutRecord) -> Option<DeliveryFuture> {
    let mut backoff = admin::retry::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match crate::kafka_clients::send(&shared.producer, record).await {
            Ok(delivery) => return Some(delivery),
            Err(error) if kafka::is_permanent(&error) => {
                if !replace_refused(shared, record, &error) {
                    return None;
                }
            }
            Err(error) => {
                tracing::warn!(topic = %record.topic, %error, "handing a record to the producer failed; retrying");
                shared.metrics.produce_retries.inc();
                backoff.wait().await;
            }
        }
    }
}

/// Replaces `record`, which Kafka refused for good, with its dead letter; `false` (and the
/// record marked dropped) when there is nothing left to try.
fn replace_refused(shared: &WorkerResources, record: &mut OutRecord, error: &KafkaError) -> bool {
    match crate::output::refused(&shared.config, record, error) {
        Some(dead_letter) => {
            tracing::warn!(topic = %record.topic, %error, "Kafka refused a record for good; dead-lettering it");
            *record = dead_letter;
            true
        }
        None => {
            let reason = kafka::refusal_reason(error);
            tracing::error!(topic = %record.topic, %error, "Kafka refused even the dead letter; its reading stays only on the readings topic");
            record.kind = OutKind::Dropped(reason);
            false
        }
    }
}

/// Exactly-once: hands every record to the producer, in order, waiting while its queue is
/// full; a record the producer refuses for good is dead-lettered instead (in the same
/// transaction), and any other refusal means the transaction is unusable.
pub(super) async fn enqueue_all_in_transaction(
    shared: &WorkerResources,
    records: &mut [OutRecord],
) -> Result<Vec<DeliveryFuture>, String> {
    let mut deliveries = Vec::with_capacity(records.len());
    for record in records {
        loop {
            match crate::kafka_clients::send(&shared.producer, record).await {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err(error) if kafka::is_permanent(&error) => {
                    if !replace_refused(shared, record, &error) {
                        break;
                    }
                }
                Err(error) => return Err(format!("producing to {}: {error}", record.topic)),
            }
        }
    }
    Ok(deliveries)
}

/// Exactly-once: waits for the records' delivery reports. A failed one is not sent again
/// (the transaction's commit fails and aborts instead); it only bounds the window.
pub(super) async fn delivered(prepared: Prepared, deliveries: Vec<DeliveryFuture>) -> Result<Prepared, String> {
    for delivery in deliveries {
        if let Ok(Err((error, _))) = delivery.await {
            tracing::warn!(%error, "exactly-once: Kafka did not take a record; the transaction will abort");
        }
    }
    Ok(prepared)
}

/// Waits for Kafka to confirm each record: what it refused for now is sent again with
/// backoff, what it refused for good is dead-lettered instead; `Err` only when the producer
/// failed fatally.
pub(super) async fn confirm(
    shared: Arc<WorkerResources>,
    mut prepared: Prepared,
    deliveries: Vec<Option<DeliveryFuture>>,
) -> Result<Prepared, String> {
    for (record, delivery) in prepared.records.iter_mut().zip(deliveries) {
        let Some(mut delivery) = delivery else { continue };
        let mut backoff = admin::retry::Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            let error = match delivery.await {
                Ok(Ok(_)) => break,
                Ok(Err((error, _))) => error,
                Err(_) => KafkaError::Canceled,
            };
            if let Some((code, reason)) = shared.producer.client().fatal_error() {
                return Err(format!("the Kafka producer failed fatally: {code:?}: {reason}"));
            }
            if kafka::is_permanent(&error) {
                if !replace_refused(&shared, record, &error) {
                    break;
                }
            } else {
                tracing::warn!(topic = %record.topic, %error, "Kafka did not take a record; sending it again");
                shared.metrics.produce_retries.inc();
                backoff.wait().await;
            }
            match enqueue(&shared, record).await {
                Some(next) => delivery = next,
                None => break,
            }
        }
    }
    Ok(prepared)
}
