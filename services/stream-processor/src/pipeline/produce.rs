//! Handing a reading's outputs to the producer and waiting for Kafka to confirm them: at
//! least once (a record Kafka did not take is sent again) or inside a transaction (a
//! failure aborts it).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, Producer as _};

use crate::output::OutRecord;

use super::*;

/// Hands every record to the producer, in order; waits while its queue is full.
pub(super) async fn enqueue_all(shared: &WorkerResources, records: &[OutRecord]) -> Vec<DeliveryFuture> {
    let mut deliveries = Vec::with_capacity(records.len());
    for record in records {
        deliveries.push(enqueue(shared, record).await);
    }
    deliveries
}

pub(super) async fn enqueue(shared: &WorkerResources, record: &OutRecord) -> DeliveryFuture {
    loop {
        match crate::kafka_clients::send(&shared.producer, record).await {
            Ok(delivery) => return delivery,
            Err(error) => {
                tracing::warn!(topic = %record.topic, %error, "handing a record to the producer failed; retrying");
                shared.metrics.produce_retries.inc();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Exactly-once: hands every record to the producer, in order, waiting while its queue is
/// full; any other refusal means the transaction is unusable.
pub(super) async fn enqueue_all_in_transaction(
    shared: &WorkerResources,
    records: &[OutRecord],
) -> Result<Vec<DeliveryFuture>, String> {
    let mut deliveries = Vec::with_capacity(records.len());
    for record in records {
        let delivery = crate::kafka_clients::send(&shared.producer, record).await;
        deliveries.push(delivery.map_err(|error| format!("producing to {}: {error}", record.topic))?);
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

/// Waits for Kafka to confirm each record (sending again what failed); `Err` only when
/// the producer failed fatally.
pub(super) async fn confirm(
    shared: Arc<WorkerResources>,
    prepared: Prepared,
    deliveries: Vec<DeliveryFuture>,
) -> Result<Prepared, String> {
    for (record, delivery) in prepared.records.iter().zip(deliveries) {
        let mut delivery = delivery;
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
            tracing::warn!(topic = %record.topic, %error, "Kafka did not take a record; sending it again");
            shared.metrics.produce_retries.inc();
            backoff.wait().await;
            delivery = enqueue(&shared, record).await;
        }
    }
    Ok(prepared)
}
