//! The Kafka side: one idempotent producer, and a send whose future resolves only when
//! Kafka has the record, which is what lets ingest acknowledge to MQTT afterwards.
//!
//! [`Sink::send`] hands the record to librdkafka immediately, so records enter the
//! producer in the order of the calls; with idempotence (`enable.idempotence`), that
//! order is kept per partition through retries. `message.timeout.ms` is 0 (never give
//! up) by default: while Kafka is down records wait in the producer, the in-flight bound
//! fills, and ingest stops reading MQTT until Kafka returns. A record Kafka refuses for
//! what it is (too large, unknown topic) is sent to the dead-letter topic instead; any
//! other failure is retried with backoff. A fatal producer error (the idempotent
//! producer lost its guarantees) ends ingest without acknowledging anything more.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};

use crate::metrics::Metrics;
use crate::record::OutRecord;

/// Producer settings Vigil applies before the user's `kafka` properties.
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    // A write counts once every in-sync replica has it, and retries cannot duplicate or
    // reorder it: the guarantees behind "acknowledged to MQTT only when safe".
    ("acks", "all"),
    ("enable.idempotence", "true"),
    // Never expire a record locally: ingest bounds what it holds and waits for Kafka.
    ("message.timeout.ms", "0"),
    // Throughput: small JSON readings compress well with lz4 at little CPU, and 5 ms of
    // lingering lets batches of a few hundred readings form at fleet rates.
    ("compression.type", "lz4"),
    ("linger.ms", "5"),
    ("batch.size", "1000000"),
    ("client.id", "vigil-ingest"),
];

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("the kafka producer failed fatally: {0}")]
    Fatal(String),
}

/// Where a record landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// `Some(reason)` when the record went to the dead-letter topic.
    pub dead_letter: Option<&'static str>,
}

#[derive(Clone)]
pub struct Sink {
    producer: FutureProducer,
    dead_letter_topic: String,
    metrics: Metrics,
}

impl Sink {
    pub fn new(
        properties: &BTreeMap<String, String>,
        dead_letter_topic: &str,
        metrics: Metrics,
    ) -> Result<Self, KafkaError> {
        let mut config = ClientConfig::new();
        for (key, value) in PRODUCER_DEFAULTS {
            config.set(*key, *value);
        }
        for (key, value) in properties {
            config.set(key, value);
        }
        if config.get("acks").is_some_and(|a| a != "all" && a != "-1")
            || config.get("enable.idempotence") == Some("false")
        {
            tracing::warn!("kafka acks or idempotence overridden: an acknowledged reading may be lost or reordered");
        }
        Ok(Self { producer: config.create()?, dead_letter_topic: dead_letter_topic.to_owned(), metrics })
    }

    /// Hands `record` to the producer now and resolves when Kafka confirmed it (or its
    /// dead letter).
    pub fn send(&self, record: OutRecord) -> impl Future<Output = Result<Written, SinkError>> + Send + 'static {
        let first = self.enqueue(&record);
        let sink = self.clone();
        async move { sink.deliver(record, first).await }
    }

    /// Waits up to `timeout` for everything handed to the producer.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }

    /// Whether the producer can reach a broker (metadata for any topic within `timeout`).
    pub fn reachable(&self, timeout: Duration) -> bool {
        self.producer.client().fetch_metadata(None, timeout).is_ok()
    }

    fn enqueue(&self, record: &OutRecord) -> Result<DeliveryFuture, KafkaError> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header { key, value: Some(value.as_slice()) });
        }
        let mut future_record = FutureRecord::<[u8], [u8]>::to(&record.topic).payload(&record.payload).headers(headers);
        if let Some(key) = &record.key {
            future_record = future_record.key(key.as_slice());
        }
        self.producer.send_result(future_record).map_err(|(error, _)| error)
    }

    async fn deliver(
        &self,
        mut record: OutRecord,
        mut attempt: Result<DeliveryFuture, KafkaError>,
    ) -> Result<Written, SinkError> {
        let started = Instant::now();
        let mut backoff = admin::retry::Backoff::new(Duration::from_millis(10), Duration::from_secs(5));
        loop {
            let outcome = match attempt {
                Ok(delivery) => match delivery.await {
                    Ok(Ok(delivery)) => Ok(delivery),
                    Ok(Err((error, _))) => Err(error),
                    Err(_) => Err(KafkaError::Canceled),
                },
                Err(error) => Err(error),
            };
            let error = match outcome {
                Ok(delivery) => {
                    self.metrics.produce_latency.observe(started.elapsed().as_secs_f64());
                    match record.dead_letter {
                        Some(reason) => self.metrics.dead_lettered.with_label_values(&[reason]).inc(),
                        None => self.metrics.produced.with_label_values(&[&*record.topic_label]).inc(),
                    }
                    return Ok(Written {
                        topic: record.topic,
                        partition: delivery.partition,
                        offset: delivery.offset,
                        dead_letter: record.dead_letter,
                    });
                }
                Err(error) => error,
            };
            if let Some((code, reason)) = self.producer.client().fatal_error() {
                return Err(SinkError::Fatal(format!("{code:?}: {reason}")));
            }
            if refused_for_what_it_is(&error) {
                if record.dead_letter.is_none() {
                    tracing::warn!(topic = %record.topic, %error, "kafka refused the record: dead-lettering it");
                    record =
                        record.into_dead_letter(&self.dead_letter_topic, "kafka_refused", &error.to_string(), None);
                } else if !record.payload.is_empty() {
                    // Even the dead letter is refused (too large): keep the reason, drop the body.
                    tracing::warn!(%error, bytes = record.payload.len(), "kafka refused the dead letter: sending it without its payload");
                    let bytes = record.payload.len().to_string();
                    record.payload.clear();
                    record.headers.push((kafka::headers::DEAD_LETTER_PAYLOAD_BYTES.into(), bytes.into_bytes()));
                } else {
                    tracing::error!(topic = %record.topic, %error, "kafka refuses the dead-letter topic; retrying");
                    self.pause(&mut backoff).await;
                }
            } else {
                tracing::debug!(topic = %record.topic, %error, "kafka send failed; retrying");
                self.pause(&mut backoff).await;
            }
            attempt = self.enqueue(&record);
        }
    }

    async fn pause(&self, backoff: &mut admin::retry::Backoff) {
        self.metrics.produce_retries.inc();
        backoff.wait().await;
    }
}

/// Errors that sending the same record again cannot fix: [`kafka::is_permanent`]'s, and a
/// topic that does not exist, since a routing rule's template can name topics from what a
/// device sent (and brokers in production create none on their own).
fn refused_for_what_it_is(error: &KafkaError) -> bool {
    kafka::is_permanent(error)
        || matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::UnknownTopic | RDKafkaErrorCode::UnknownTopicOrPartition)
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(properties: &[(&str, &str)]) -> Result<Sink, KafkaError> {
        let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
        let properties = properties.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Sink::new(&properties, "dead-letters", metrics)
    }

    #[test]
    fn sasl_ssl_properties_reach_librdkafka_and_a_misspelt_one_is_refused_by_name() {
        // librdkafka refuses SASL_SSL and SCRAM unless it was built with TLS: this proves
        // the pass-through and the build together. (Nothing listens on port 1.)
        let secured = [
            ("bootstrap.servers", "127.0.0.1:1"),
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "vigil"),
            ("sasl.password", "secret"),
        ];
        assert!(sink(&secured).is_ok());
        let error = sink(&[("bootstrap.servers", "127.0.0.1:1"), ("sasl.mechanismz", "PLAIN")]).err().unwrap();
        assert!(error.to_string().contains("sasl.mechanismz"), "{error}");
    }
}
