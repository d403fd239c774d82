//! Whether Kafka refused a record for good or for now. A record refused for what it is
//! (too large, corrupt, a timestamp outside the topic's bounds, a topic the client may not
//! write, a broker policy) is refused
//! again however often it is sent, so retrying it stops its partition forever; such a
//! record is dead-lettered with the reason and the stream goes on. Anything else (brokers
//! down, timeouts, leader changes) passes, and is retried with backoff.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// `true` when sending the same record again cannot succeed.
pub fn is_permanent(error: &KafkaError) -> bool {
    error.rdkafka_error_code().is_some_and(is_permanent_code)
}

/// See [`is_permanent`].
pub fn is_permanent_code(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidTimestamp
            | RDKafkaErrorCode::BadMessage
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::UnknownPartition
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::PolicyViolation
    )
}

/// A short name of a refusal for dead-letter headers and metric labels (a fixed set).
pub fn refusal_reason(error: &KafkaError) -> &'static str {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize) => "record_too_large",
        Some(RDKafkaErrorCode::TopicAuthorizationFailed | RDKafkaErrorCode::ClusterAuthorizationFailed) => {
            "not_authorized"
        }
        Some(RDKafkaErrorCode::InvalidTopic | RDKafkaErrorCode::UnknownPartition) => "invalid_destination",
        Some(RDKafkaErrorCode::PolicyViolation) => "policy_violation",
        Some(_) if is_permanent(error) => "invalid_record",
        _ => "transient",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_resend_cannot_fix_is_permanent_and_the_rest_is_not() {
        let produce = |code| KafkaError::MessageProduction(code);
        assert!(is_permanent(&produce(RDKafkaErrorCode::MessageSizeTooLarge)));
        assert_eq!(refusal_reason(&produce(RDKafkaErrorCode::MessageSizeTooLarge)), "record_too_large");
        assert_eq!(refusal_reason(&produce(RDKafkaErrorCode::TopicAuthorizationFailed)), "not_authorized");
        assert_eq!(refusal_reason(&produce(RDKafkaErrorCode::InvalidRecord)), "invalid_record");
        for transient in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::UnknownTopic,
        ] {
            assert!(!is_permanent(&produce(transient)), "{transient:?}");
            assert_eq!(refusal_reason(&produce(transient)), "transient");
        }
        assert!(!is_permanent(&KafkaError::Canceled));
    }
}
