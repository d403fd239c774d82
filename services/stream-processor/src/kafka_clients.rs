//! The processor's Kafka clients: its defaults under the user's `kafka`, `consumer` and
//! `producer` tables (layered by [`kafka::client_config`]), and how an output record is
//! handed to the producer. The live path, replays and the benchmark all build their clients
//! from here.

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use crate::config::ProcessorConfig;
use crate::output::OutRecord;

/// Producer settings the processor applies before the user's.
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("acks", "all"),
    ("enable.idempotence", "true"),
    // Never give up on a record locally: the offset waits for it.
    ("message.timeout.ms", "0"),
    ("compression.type", "lz4"),
    ("linger.ms", "2"),
    ("client.id", "vigil-stream-processor"),
];

/// Consumer settings the processor applies before the user's (the offset-store ones are
/// not the user's to change: see `ProcessorConfig::check`).
pub const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("auto.offset.reset", "earliest"),
    // Commits are cheap and bound the repeats after a crash.
    ("auto.commit.interval.ms", "100"),
    // How long a broker may hold a fetch that found nothing new. Apache Kafka answers as
    // soon as a record arrives, but librdkafka's mock cluster (the embedded default) and
    // tansu 0.6 hold every such fetch for the full wait: at librdkafka's 500 ms that
    // added 260 ms to the median reading (docs/benchmarks.md). On Kafka, 10 ms only means
    // more empty fetches while a partition is idle.
    ("fetch.wait.max.ms", "10"),
    ("statistics.interval.ms", "5000"),
    ("client.id", "vigil-stream-processor"),
];

/// The live consumer's config before the group and offset settings the pipeline adds:
/// [`CONSUMER_DEFAULTS`] and the group's fast-failover settings
/// ([`kafka::group::FAST_FAILOVER`]) under the user's tables.
pub fn consumer_config(config: &ProcessorConfig) -> rdkafka::ClientConfig {
    let defaults: Vec<(&str, &str)> = CONSUMER_DEFAULTS.iter().chain(kafka::group::FAST_FAILOVER).copied().collect();
    kafka::client_config(&defaults, &[&config.kafka, &config.consumer])
}

/// The producer's config (before exactly-once's transaction settings).
pub fn producer_config(config: &ProcessorConfig) -> rdkafka::ClientConfig {
    kafka::client_config(PRODUCER_DEFAULTS, &[&config.kafka, &config.producer])
}

/// Hands `record` to `producer`, waiting while its queue is full; any other refusal is the
/// caller's to handle.
pub async fn send(producer: &FutureProducer, record: &OutRecord) -> Result<DeliveryFuture, KafkaError> {
    let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
    for (key, value) in &record.headers {
        headers = headers.insert(Header { key, value: Some(value.as_slice()) });
    }
    let mut future =
        FutureRecord::to(&record.topic).key(record.key.as_slice()).payload(record.payload.as_slice()).headers(headers);
    if let Some(ms) = record.timestamp.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()) {
        future = future.timestamp(i64::try_from(ms.as_millis()).unwrap_or(i64::MAX));
    }
    kafka::send_waiting(producer, future).await
}
