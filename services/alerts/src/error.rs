//! Why the alerts service stopped, and why a scores record could not be read. A stop is
//! never a loss: nothing past the last confirmed write is committed, so a restart (or the
//! next owner of a partition) redoes the rest.

use rdkafka::error::KafkaError;

use crate::config::ConfigError;

/// Why the service stopped.
#[derive(Debug, thiserror::Error)]
pub enum AlertsError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Topic(#[from] kafka::TopicError),
    #[error("{source} (the changelog needs the scores topic's partitions)")]
    ChangelogRead { source: kafka::ReadError },
    #[error("the scores topic {0} does not exist (or has no partitions)")]
    NoScoresTopic(String),
    #[error(
        "the changelog topic {changelog_topic} has {changelog} partitions and the scores topic {scores_topic} has \
         {scores}: they must match (create it compacted with {scores} partitions)"
    )]
    PartitionMismatch { changelog_topic: String, changelog: usize, scores_topic: String, scores: usize },
    #[error("producing: {0}")]
    Produce(KafkaError),
    #[error("Kafka refused a write: {0}")]
    WriteRefused(KafkaError),
    #[error("the producer was dropped")]
    ProducerDropped,
    #[error("shutdown grace ({0} s) over before Kafka confirmed the last writes; the next owner redoes them")]
    GraceOver(u64),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("the admin endpoint: {0}")]
    Admin(#[from] std::io::Error),
    #[error("{0}")]
    ConsumerFailed(String),
    #[error("the consumer loop ended abnormally: {0}")]
    Loop(#[from] tokio::task::JoinError),
}

/// Why a scores record is dead-lettered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Unreadable {
    #[error("{0}")]
    NotAScore(String),
    #[error("the score has no device_id")]
    MissingDeviceId,
    #[error("score {0} is not a finite number")]
    InvalidScore(f32),
    #[error("the score is for a device id of {0} bytes, more than the {max} allowed", max = sensor::MAX_DEVICE_ID_BYTES)]
    DeviceIdTooLong(usize),
    #[error("{0}")]
    ImplausibleEventTime(sensor::InvalidReading),
}

impl Unreadable {
    /// The dead letter's reason header and the metric's label: a fixed set.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotAScore(_) => "not_a_score",
            Self::MissingDeviceId => "missing_device_id",
            Self::InvalidScore(_) => "invalid_score",
            Self::DeviceIdTooLong(_) => "device_id_too_long",
            Self::ImplausibleEventTime(_) => "implausible_event_time",
        }
    }
}
