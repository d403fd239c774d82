#!/bin/sh
# Creates the topics the Vigil services use (the broker does not auto-create topics, so a
# misspelt topic fails loudly instead of appearing empty). Idempotent: an existing topic
# is left as it is. Runs in the apache/kafka image as the stack's `kafka-init` container.
#
# Names and defaults come from the services:
#   services/ingest/src/config.rs            vigil-readings, vigil-dead-letter
#   services/stream-processor/src/config.rs  vigil-scores, vigil-anomalies, vigil-scoring-dead-letter
#   services/model-server/src/config.rs      vigil.rollout-state (compacted), vigil.rollout-events
#   services/alerts/src/config.rs            vigil-alerts, vigil-alerts-changelog (compacted,
#                                            the scores' partitions), vigil-alerts-dead-letter
#   deploy/connect/elasticsearch-sink.json   vigil-scores-elasticsearch-dead-letter
set -eu

bootstrap="${KAFKA_BOOTSTRAP:-kafka:19092}"
replicas="${REPLICATION_FACTOR:-1}"
kafka_topics=/opt/kafka/bin/kafka-topics.sh
two_weeks_ms=1209600000

create() {
    name="$1"
    partitions="$2"
    shift 2
    "$kafka_topics" --bootstrap-server "$bootstrap" --create --if-not-exists \
        --topic "$name" --partitions "$partitions" --replication-factor "$replicas" "$@"
}

# Keyed by device id: the partition count bounds how many stream processors share the
# work (one partition is read by one processor of the group) and keeps a device in order.
create vigil-readings 6
create vigil-scores 6
create vigil-anomalies 3
# Dead letters are rare and read by people: one partition, kept longer.
create vigil-dead-letter 1 --config retention.ms="$two_weeks_ms"
create vigil-scoring-dead-letter 1 --config retention.ms="$two_weeks_ms"
create vigil-scores-elasticsearch-dead-letter 1 --config retention.ms="$two_weeks_ms"
# Rollout state: one partition (its holder of partition 0 is the analysis leader) and
# compacted, so the latest state of every model survives; every replica reads it whole.
create vigil.rollout-state 1 --config cleanup.policy=compact
create vigil.rollout-events 1
# Alerts: keyed by alert id; the changelog keeps each scores partition's window state, so
# it has the scores' partitions and is compacted.
create vigil-alerts 3
create vigil-alerts-changelog 6 --config cleanup.policy=compact
create vigil-alerts-dead-letter 1 --config retention.ms="$two_weeks_ms"

"$kafka_topics" --bootstrap-server "$bootstrap" --describe \
    --topic 'vigil-readings|vigil-scores|vigil-anomalies|vigil-dead-letter|vigil-scoring-dead-letter|vigil-scores-elasticsearch-dead-letter|vigil\.rollout-state|vigil\.rollout-events|vigil-alerts|vigil-alerts-changelog|vigil-alerts-dead-letter'
