//! Where rollout state lives, and how a change reaches every replica.
//!
//! - In memory (no `--rollout_kafka_brokers`): one replica; a change applies at once.
//! - A compacted Kafka topic (`--rollout_state_topic`, key = model, value = the JSON
//!   [`RolloutState`]): every replica reads it from the beginning and applies each record
//!   newer than what it holds; a change is produced to the topic and takes effect when
//!   read back, on every replica in the same order. Two replicas changing the same
//!   revision both write revision n+1; the first in the log wins everywhere, the second is
//!   ignored everywhere (and its proposer told so). Compaction keeps the latest record per
//!   model, which is all a new replica needs.
//!
//! One replica runs the analysis: the one that holds partition 0 of the state topic in
//! the consumer group `--rollout_leader_group` (Kafka's group protocol is the election;
//! when that replica stops, another takes over after a rebalance). It judges the traffic it
//! serves itself, a fair sample when clients balance requests across replicas.
//!
//! Rollout events (every start, change and analysis decision, with figures) go to
//! `--rollout_events_topic` when Kafka is configured, and to the log always.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
use serde::Serialize;
use tokio::sync::watch;

use super::Rollouts;
use super::state::RolloutState;

/// How long a proposer waits for its change to come back from the state topic.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long catching up on the state topic may go without a record before it fails.
const CATCH_UP_STALL: Duration = Duration::from_secs(30);

/// Where the Kafka-kept state and events live.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaOptions {
    pub brokers: String,
    pub state_topic: String,
    pub events_topic: String,
    pub leader_group: String,
    /// More librdkafka properties for every client (security, timeouts).
    pub properties: Vec<(String, String)>,
}

/// Why a change did not take effect.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error("another change to the rollout won (it is now at revision {})", .0.revision)]
    Conflict(Arc<RolloutState>),
    #[error("the rollout state topic is unavailable: {0}")]
    Unavailable(String),
}

#[derive(Clone)]
pub struct RolloutLog {
    rollouts: Rollouts,
    replica: String,
    kafka: Option<Arc<KafkaBackend>>,
}

struct KafkaBackend {
    options: KafkaOptions,
    producer: FutureProducer,
    leader: StreamConsumer,
}

impl std::fmt::Debug for RolloutLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RolloutLog")
            .field("replica", &self.replica)
            .field("kafka", &self.kafka.as_ref().map(|k| &k.options))
            .finish()
    }
}

/// One rollout event, as published and logged.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutEvent<'a> {
    pub model: &'a str,
    /// started, weight_set, promoted, aborted, advanced, held, failed_check, rolled_back,
    /// removed_from_file.
    pub event: &'a str,
    pub revision: u64,
    pub phase: &'a str,
    pub stable: i64,
    pub canary: i64,
    pub canary_weight_percent: f64,
    pub message: &'a str,
    /// The analysis figures behind a decision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub figures: Option<serde_json::Value>,
    pub replica: &'a str,
    pub unix_ms: i64,
}

impl<'a> RolloutEvent<'a> {
    pub fn of(event: &'a str, state: &'a RolloutState, figures: Option<serde_json::Value>) -> Self {
        Self {
            model: &state.spec.model,
            event,
            revision: state.revision,
            phase: state.phase.name(),
            stable: state.spec.stable,
            canary: state.spec.canary,
            canary_weight_percent: state.canary_weight_percent,
            message: &state.last_decision,
            figures,
            replica: &state.updated_by,
            unix_ms: state.updated_unix_ms,
        }
    }
}

impl RolloutLog {
    /// State in this process only (a single replica).
    pub fn in_memory(rollouts: Rollouts, replica: String) -> Self {
        Self { rollouts, replica, kafka: None }
    }

    /// State in a Kafka topic: creates it if missing (compacted, one partition), reads it
    /// to its end before returning, then follows it until `stop`.
    pub async fn kafka(
        rollouts: Rollouts,
        replica: String,
        options: KafkaOptions,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<(Self, tokio::task::JoinHandle<()>)> {
        let client = |extra: &[(&str, &str)]| {
            let mut config = ClientConfig::new();
            config.set("bootstrap.servers", &options.brokers);
            for (key, value) in &options.properties {
                config.set(key, value);
            }
            for (key, value) in extra {
                config.set(*key, *value);
            }
            config
        };

        let producer: FutureProducer = client(&[("enable.idempotence", "true"), ("linger.ms", "0")])
            .create()
            .context("creating the rollout state producer")?;
        // Readers of the state topic: assigned partitions, nothing committed (the group id is
        // librdkafka's requirement only).
        let reader_config = |role: &str| {
            client(&[
                ("group.id", &format!("vigil-rollout-{role}-{replica}")),
                ("enable.auto.commit", "false"),
                ("enable.partition.eof", "false"),
            ])
        };
        let tail: StreamConsumer = reader_config("tail").create().context("creating the rollout state reader")?;
        let spec = kafka::TopicSpec { partitions: 1, compacted: true };
        let partitions = kafka::ensure_topic(&client(&[]), &options.state_topic, spec)
            .await
            .with_context(|| format!("reading the metadata of rollout state topic {}", options.state_topic))?
            .partitions as i32;
        anyhow::ensure!(
            partitions > 0,
            "rollout state topic {} does not exist and could not be created on {}; create it (compacted, one partition)",
            options.state_topic,
            options.brokers
        );

        // Catch up before serving, so a restarted replica does not act on stale state: each
        // partition read to its end by a consumer of its own (blocking reads, off the async
        // workers), then followed from there by the tail.
        let reader = reader_config("catch-up");
        let (topic, caught_up) = (options.state_topic.clone(), rollouts.clone());
        let ends = tokio::task::spawn_blocking(move || {
            (0..partitions)
                .map(|partition| {
                    kafka::read_partition_to_end(&reader, &topic, partition, CATCH_UP_STALL, |message| {
                        apply_record(&caught_up, message.payload())
                    })
                })
                .collect::<Result<Vec<i64>, _>>()
        })
        .await
        .context("reading the rollout state topic")??;
        let mut assignment = TopicPartitionList::new();
        for (partition, end) in (0..partitions).zip(ends) {
            assignment.add_partition_offset(&options.state_topic, partition, Offset::Offset(end))?;
        }
        tail.assign(&assignment)?;
        tracing::info!(topic = %options.state_topic, rollouts = rollouts.list().len(), "rollout state read");

        let follow = {
            let rollouts = rollouts.clone();
            let mut stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        message = tail.recv() => match message {
                            Ok(message) => apply_record(&rollouts, message.payload()),
                            Err(e) => {
                                tracing::warn!("reading the rollout state topic: {e}");
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                        },
                        _ = stop.changed() => return,
                    }
                }
            })
        };

        let leader: StreamConsumer = client(&[
            ("group.id", &options.leader_group),
            ("enable.auto.commit", "false"),
            ("session.timeout.ms", "6000"),
            ("heartbeat.interval.ms", "1000"),
        ])
        .create()
        .context("creating the rollout leader consumer")?;
        leader.subscribe(&[&options.state_topic])?;
        let backend = Arc::new(KafkaBackend { options, producer, leader });
        // The group protocol runs inside poll: keep polling, ignore the records.
        let membership = {
            let backend = backend.clone();
            let mut stop = stop;
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = backend.leader.recv() => {}
                        _ = stop.changed() => return,
                    }
                }
            })
        };
        let tasks = tokio::spawn(async move {
            let _ = tokio::join!(follow, membership);
        });
        Ok((Self { rollouts, replica, kafka: Some(backend) }, tasks))
    }

    pub fn rollouts(&self) -> &Rollouts {
        &self.rollouts
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Whether this replica runs the analysis.
    pub fn is_leader(&self) -> bool {
        match &self.kafka {
            None => true,
            Some(kafka) => kafka.leader.assignment().is_ok_and(|assigned| {
                assigned.elements().iter().any(|e| e.topic() == kafka.options.state_topic && e.partition() == 0)
            }),
        }
    }

    /// Makes `state` the model's rollout if no other change got there first; returns it
    /// as applied.
    pub async fn propose(&self, state: RolloutState) -> Result<Arc<RolloutState>, ProposeError> {
        let (model, revision) = (state.spec.model.clone(), state.revision);
        let Some(kafka) = &self.kafka else {
            return if self.rollouts.apply(state) {
                Ok(self.rollouts.get(&model).expect("just applied"))
            } else {
                Err(ProposeError::Conflict(self.rollouts.get(&model).expect("a newer revision is held")))
            };
        };
        let payload = serde_json::to_vec(&state).expect("rollout state serializes");
        kafka
            .producer
            .send(FutureRecord::to(&kafka.options.state_topic).key(&model).payload(&payload), APPLY_TIMEOUT)
            .await
            .map_err(|(e, _)| ProposeError::Unavailable(e.to_string()))?;
        match self.rollouts.wait_for(&model, revision, APPLY_TIMEOUT).await {
            Some(applied) if *applied == state => Ok(applied),
            Some(applied) => Err(ProposeError::Conflict(applied)),
            None => Err(ProposeError::Unavailable(format!(
                "revision {revision} of model {model:?} was written but not read back within {APPLY_TIMEOUT:?}"
            ))),
        }
    }

    /// Logs a rollout event and publishes it to the events topic (if any); a failure to
    /// publish is logged, never the caller's problem.
    pub async fn publish(&self, event: RolloutEvent<'_>) {
        let json = serde_json::to_string(&event).expect("rollout events serialize");
        tracing::info!(target: "rollout", model = event.model, event = event.event, "{json}");
        if let Some(kafka) = &self.kafka {
            let record = FutureRecord::to(&kafka.options.events_topic).key(event.model).payload(&json);
            if let Err((e, _)) = kafka.producer.send(record, Duration::from_secs(5)).await {
                tracing::warn!(topic = %kafka.options.events_topic, "rollout event not published: {e}");
            }
        }
    }
}

fn apply_record(rollouts: &Rollouts, payload: Option<&[u8]>) {
    let Some(payload) = payload else { return };
    match serde_json::from_slice::<RolloutState>(payload) {
        Ok(state) => {
            let (model, revision) = (state.spec.model.clone(), state.revision);
            if rollouts.apply(state) {
                tracing::debug!(model, revision, "rollout state applied");
            }
        }
        Err(e) => tracing::warn!("skipping an unreadable rollout state record: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_misspelt_kafka_property_stops_the_start_naming_it() {
        let options = KafkaOptions {
            brokers: "127.0.0.1:1".into(),
            state_topic: "state".into(),
            events_topic: "events".into(),
            leader_group: "leaders".into(),
            properties: vec![
                ("security.protocol".into(), "plaintext".into()),
                ("sasl.mechanizm".into(), "PLAIN".into()),
            ],
        };
        let (_stop, stopped) = watch::channel(false);
        let error = RolloutLog::kafka(Rollouts::default(), "r".into(), options, stopped).await.err().unwrap();
        let text = format!("{error:#}");
        assert!(text.contains("sasl.mechanizm") && text.contains("rollout state"), "{text}");
    }
}
