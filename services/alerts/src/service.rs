//! The Kafka side: a consumer group over the scores topic, one [`Partition`] engine per
//! assigned partition, restored from that partition of the changelog topic before its
//! first record is applied. Every `commit_interval_ms` (and before partitions are revoked,
//! and at shutdown) each engine's alerts, dead letters and changed state are written and
//! confirmed, and only then its offset committed:
//!
//! ```text
//!  scores (partition p) ──▶ engine p ──▶ alerts topic (key: alert id)
//!                              │  └────▶ changelog partition p (compacted: "d/<device>", "p")
//!                              └─ commit offset p once both are confirmed
//! ```
//!
//! A redelivered record (after a crash or a rebalance, from the last committed offset) is
//! skipped by the restored engine, so it fires nothing twice. The one gap: a crash after
//! an alert was confirmed but before the state that closed its window was, makes the next
//! owner close that window again and write the alert again, with the same id.
//!
//! Everything runs on one thread: the work per score is a few map updates, and polling,
//! rebalance callbacks and commits then never race.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use proto::vigil::alerts::v1::Alert;
use proto::vigil::scoring::v1::Score;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::config::AlertsConfig;
use crate::engine::{Applied, Observation, Partition, Rule};
use crate::error::{AlertsError, Unreadable};
use crate::metrics::Metrics;

/// An unreadable score record waiting to be written: its partition, bytes and headers.
type DeadLetter = (i32, Vec<u8>, OwnedHeaders);

/// A changelog record as read: key, and value (`None`: a tombstone).
type ChangelogRecord = (Vec<u8>, Option<Vec<u8>>);

/// The engines of the partitions this instance owns and their pending outputs: what the
/// consumer loop and the rebalance callbacks share.
struct AssignedPartitions {
    config: AlertsConfig,
    rules: Arc<[Rule]>,
    producer: FutureProducer,
    /// Engines of the assigned partitions that have been restored.
    engines: HashMap<i32, Partition>,
    /// Per partition: the offset after the last record handled (applied, skipped or
    /// dead-lettered), i.e. what to commit once its outputs are confirmed.
    next_offsets: HashMap<i32, i64>,
    /// Dead letters waiting for the next write.
    dead_letters: Vec<DeadLetter>,
    metrics: Metrics,
    /// Waits for deliveries (this thread is a blocking one of that runtime).
    runtime: tokio::runtime::Handle,
    /// At shutdown: when waiting for Kafka must end (`shutdown_grace_seconds`).
    deadline: Option<Instant>,
}

/// Writes and commits a partition's outputs before it is revoked; counts rebalances.
struct RebalanceHandler {
    partitions: Arc<Mutex<AssignedPartitions>>,
    /// Set ready at the first assignment: the group has taken this instance in.
    ready: admin::Readiness,
}

impl ClientContext for RebalanceHandler {}

impl ConsumerContext for RebalanceHandler {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            let mut state = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
            let revoked: Vec<i32> = partitions.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(?revoked, "partitions revoked: writing their alerts and state");
            state.metrics.rebalances.with_label_values(&["revoke"]).inc();
            // On failure the next owner redoes what was not committed; nothing is lost.
            if let Err(error) = state.write_and_commit(consumer, &revoked) {
                tracing::warn!(%error, "writing before the revoke failed");
            }
            for partition in revoked {
                state.engines.remove(&partition);
                state.next_offsets.remove(&partition);
            }
            state.metrics.open_windows.set(state.engines.values().map(|e| e.open_windows() as i64).sum());
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let state = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        if let Rebalance::Assign(_) = rebalance {
            state.metrics.rebalances.with_label_values(&["assign"]).inc();
            self.ready.set(true);
        }
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        state.metrics.assigned_partitions.set(assigned as i64);
    }
}

impl AssignedPartitions {
    fn client(&self) -> ClientConfig {
        let mut client = ClientConfig::new();
        for (key, value) in &self.config.kafka {
            client.set(key, value);
        }
        client
    }

    /// The engine of `partition`, restored from the changelog on first use.
    fn engine(&mut self, partition: i32) -> Result<&mut Partition, AlertsError> {
        if !self.engines.contains_key(&partition) {
            let started = Instant::now();
            let records = read_changelog(&self.client(), &self.config.changelog_topic, partition)?;
            let (engine, skipped) =
                Partition::restore(self.rules.clone(), records.iter().map(|(k, v)| (k.as_slice(), v.as_deref())));
            let mut engine = engine.with_device_limit(self.config.max_devices_per_partition);
            self.metrics.devices_evicted.inc_by(engine.take_evictions());
            for why in skipped.iter().take(10) {
                tracing::warn!(partition, topic = %self.config.changelog_topic, %why, "skipped a changelog record it cannot read");
            }
            self.metrics.changelog_unreadable.inc_by(skipped.len() as u64);
            tracing::info!(
                partition,
                records = records.len(),
                open_windows = engine.open_windows(),
                applied_offset = engine.applied_offset(),
                ms = started.elapsed().as_millis() as u64,
                "restored from the changelog"
            );
            self.metrics.restored_records.inc_by(records.len() as u64);
            self.engines.insert(partition, engine);
        }
        Ok(self.engines.get_mut(&partition).expect("inserted above"))
    }

    /// Applies one scores record.
    fn handle(
        &mut self,
        partition: i32,
        offset: i64,
        payload: &[u8],
        kafka_time_ms: Option<i64>,
    ) -> Result<(), AlertsError> {
        self.metrics.consumed.inc();
        let arrival = kafka_time_ms
            .and_then(|ms| u64::try_from(ms).ok())
            .map_or_else(std::time::SystemTime::now, |ms| std::time::UNIX_EPOCH + Duration::from_millis(ms));
        // An implausible event time is dead-lettered before the engine sees it, so it never
        // moves the partition's stream time.
        let checked = decode(payload).and_then(|score| {
            self.config
                .event_time
                .check(score.event_time.as_ref(), arrival)
                .map_err(Unreadable::ImplausibleEventTime)?;
            Ok(score)
        });
        match checked {
            Ok(score) => {
                let event_time_ms = score
                    .event_time
                    .map(|t| t.seconds.saturating_mul(1000).saturating_add(i64::from(t.nanos / 1_000_000)))
                    .or(kafka_time_ms)
                    .unwrap_or(0);
                let observation = Observation {
                    device_id: &score.device_id,
                    event_time_ms,
                    score: f64::from(score.score),
                    is_anomaly: score.is_anomaly,
                    model_version: score.model_version,
                };
                let rules = self.rules.clone();
                let engine = self.engine(partition)?;
                let applied = engine.apply(offset, &observation);
                let evicted = engine.take_evictions();
                self.metrics.devices_evicted.inc_by(evicted);
                match applied {
                    Applied::Skipped => self.metrics.skipped.inc(),
                    Applied::Applied { late_for } => {
                        for index in late_for {
                            self.metrics.late.with_label_values(&[rules[index].name.as_str()]).inc();
                        }
                    }
                }
            }
            Err(unreadable) => {
                let reason = unreadable.reason();
                // Restored first, so the partition's state is there when offsets commit.
                self.engine(partition)?;
                use kafka::headers::*;
                let headers = OwnedHeaders::new()
                    .insert(Header { key: DEAD_LETTER_REASON, value: Some(reason) })
                    .insert(Header { key: DEAD_LETTER_ERROR, value: Some(unreadable.to_string().as_str()) })
                    .insert(Header { key: DEAD_LETTER_SOURCE_TOPIC, value: Some(&self.config.scores_topic) })
                    .insert(Header { key: DEAD_LETTER_SOURCE_PARTITION, value: Some(partition.to_string().as_str()) })
                    .insert(Header { key: DEAD_LETTER_SOURCE_OFFSET, value: Some(offset.to_string().as_str()) });
                self.dead_letters.push((partition, payload.to_vec(), headers));
                self.metrics.dead_lettered.with_label_values(&[reason]).inc();
            }
        }
        self.next_offsets.insert(partition, offset + 1);
        Ok(())
    }

    /// Writes the alerts, dead letters and changed state of `partitions`, waits until
    /// Kafka confirmed them, then commits their offsets.
    fn write_and_commit<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        partitions: &[i32],
    ) -> Result<(), AlertsError> {
        // With each alert's delivery: the alert, to dead-letter it if Kafka refuses it for good.
        let mut deliveries: Vec<(DeliveryFuture, Option<Alert>)> = Vec::new();
        let mut fired: Vec<Alert> = Vec::new();
        for partition in partitions {
            let Some(engine) = self.engines.get_mut(partition) else { continue };
            let alerts = engine.take_alerts();
            let changes = engine.take_changes();
            for alert in &alerts {
                let payload = alert.encode_to_vec();
                let headers = OwnedHeaders::new()
                    .insert(Header { key: "vigil.alert.rule", value: Some(alert.rule.as_str()) })
                    .insert(Header { key: "vigil.alert.device_id", value: Some(alert.device_id.as_str()) })
                    .insert(Header {
                        key: "content-type",
                        value: Some("application/x-protobuf; messageType=vigil.alerts.v1.Alert"),
                    });
                let record = FutureRecord::<str, [u8]>::to(&self.config.alerts_topic)
                    .key(alert.id.as_str())
                    .payload(payload.as_slice())
                    .headers(headers);
                match send(&self.producer, record) {
                    Ok(delivery) => deliveries.push((delivery, Some(alert.clone()))),
                    Err(AlertsError::Produce(error)) if kafka::is_permanent(&error) => {
                        self.dead_letter_alert(alert, &error)?
                    }
                    Err(other) => return Err(other),
                }
            }
            fired.extend(alerts);
            for (key, value) in &changes {
                let mut record =
                    FutureRecord::<str, [u8]>::to(&self.config.changelog_topic).key(key).partition(*partition);
                if let Some(value) = value {
                    record = record.payload(value.as_slice());
                }
                deliveries.push((send(&self.producer, record)?, None));
            }
        }
        // Only these partitions' dead letters: the others wait for their own write.
        let (mine, others): (Vec<DeadLetter>, Vec<DeadLetter>) =
            self.dead_letters.drain(..).partition(|(p, ..)| partitions.contains(p));
        self.dead_letters = others;
        for (partition, payload, headers) in mine {
            let key = format!("{}/{partition}", self.config.scores_topic);
            let record = FutureRecord::<str, [u8]>::to(&self.config.dead_letter_topic)
                .key(key.as_str())
                .payload(payload.as_slice())
                .headers(headers);
            deliveries.push((send(&self.producer, record)?, None));
        }
        for (delivery, alert) in deliveries {
            match (self.confirmed(delivery)?, alert) {
                (Ok(()), Some(alert)) => self.metrics.fired.with_label_values(&[alert.rule.as_str()]).inc(),
                (Ok(()), None) => {}
                // An alert Kafka will never take (a topic policy, an authorization) must not
                // stop every other alert: it goes to the dead letters, saying why.
                (Err(error), Some(alert)) if kafka::is_permanent(&error) => self.dead_letter_alert(&alert, &error)?,
                (Err(error), _) => return Err(AlertsError::WriteRefused(error)),
            }
        }
        for alert in &fired {
            tracing::info!(id = %alert.id, anomalies = alert.anomalies, readings = alert.readings, "alert");
        }
        let mut offsets = TopicPartitionList::new();
        for partition in partitions {
            if let Some(next) = self.next_offsets.get(partition) {
                offsets.add_partition_offset(&self.config.scores_topic, *partition, Offset::Offset(*next))?;
            }
        }
        // A failed commit (a rebalance under way, say) loses nothing: the next owner
        // starts from the last commit and skips what the changelog says was applied.
        if offsets.count() > 0
            && let Err(error) = consumer.commit(&offsets, CommitMode::Sync)
        {
            tracing::warn!(%error, "committing offsets failed; the next owner skips what was applied");
            self.metrics.commit_failures.inc();
        }
        self.metrics.open_windows.set(self.engines.values().map(|e| e.open_windows() as i64).sum());
        Ok(())
    }
}

impl AssignedPartitions {
    /// Waits for `delivery` (until the shutdown deadline, when shutting down): Kafka's
    /// answer, or why there will be none.
    fn confirmed(&self, delivery: DeliveryFuture) -> Result<Result<(), KafkaError>, AlertsError> {
        let confirmed = match self.deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                self.runtime
                    .block_on(tokio::time::timeout(left, delivery))
                    .map_err(|_| AlertsError::GraceOver(self.config.shutdown_grace_seconds))?
            }
            None => self.runtime.block_on(delivery),
        };
        match confirmed {
            Ok(Ok(_)) => Ok(Ok(())),
            Ok(Err((error, _))) => Ok(Err(error)),
            Err(_) => Err(AlertsError::ProducerDropped),
        }
    }

    /// Writes `alert`, which Kafka refused for good, to the dead letters with the refusal
    /// and the topic it was for, and waits for it.
    fn dead_letter_alert(&self, alert: &Alert, error: &KafkaError) -> Result<(), AlertsError> {
        use kafka::headers::*;
        let reason = kafka::refusal_reason(error);
        tracing::warn!(id = %alert.id, %error, "Kafka refused an alert for good; dead-lettering it");
        let mut payload = alert.encode_to_vec();
        let error_text = error.to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header { key: DEAD_LETTER_REASON, value: Some(reason) })
            .insert(Header { key: DEAD_LETTER_ERROR, value: Some(error_text.as_str()) })
            .insert(Header { key: DEAD_LETTER_TARGET_TOPIC, value: Some(self.config.alerts_topic.as_str()) });
        if reason == "record_too_large" {
            // As large on the dead-letter topic: the headers say what it was.
            let bytes = payload.len().to_string();
            headers = headers.insert(Header { key: DEAD_LETTER_PAYLOAD_BYTES, value: Some(bytes.as_str()) });
            payload.clear();
        }
        let record = FutureRecord::<str, [u8]>::to(&self.config.dead_letter_topic)
            .key(alert.id.as_str())
            .payload(payload.as_slice())
            .headers(headers);
        match self.confirmed(send(&self.producer, record)?)? {
            Ok(()) => {
                self.metrics.dead_lettered.with_label_values(&[reason]).inc();
                Ok(())
            }
            Err(error) => Err(AlertsError::WriteRefused(error)),
        }
    }
}

fn send<'a>(producer: &FutureProducer, record: FutureRecord<'a, str, [u8]>) -> Result<DeliveryFuture, AlertsError> {
    producer.send_result(record).map_err(|(error, _)| AlertsError::Produce(error))
}

/// A Score from protobuf or the processor's JSON form; or why not.
fn decode(payload: &[u8]) -> Result<Score, Unreadable> {
    if payload.first() == Some(&b'{') {
        return check(sensor::score_json::from_json(payload).map_err(|e| Unreadable::NotAScore(e.to_string()))?);
    }
    let score =
        Score::decode(payload).map_err(|e| Unreadable::NotAScore(format!("not a vigil.scoring.v1.Score: {e}")))?;
    check(score)
}

fn check(score: Score) -> Result<Score, Unreadable> {
    if score.device_id.is_empty() {
        return Err(Unreadable::MissingDeviceId);
    }
    if score.device_id.len() > sensor::MAX_DEVICE_ID_BYTES {
        return Err(Unreadable::DeviceIdTooLong(score.device_id.len()));
    }
    if !score.score.is_finite() {
        return Err(Unreadable::InvalidScore(score.score));
    }
    Ok(score)
}

/// Every record of one changelog partition, from the start to its end now.
fn read_changelog(client: &ClientConfig, topic: &str, partition: i32) -> Result<Vec<ChangelogRecord>, AlertsError> {
    // A group id is required by librdkafka; nothing is committed.
    let reader = client.clone().set("group.id", "vigil-alerts-restore").clone();
    let mut records = Vec::new();
    kafka::read_partition_to_end(&reader, topic, partition, Duration::from_secs(60), |message| {
        records.push((message.key().unwrap_or_default().to_vec(), message.payload().map(<[u8]>::to_vec)));
    })
    .map_err(|source| AlertsError::ChangelogRead { source })?;
    Ok(records)
}

/// The changelog must have the scores topic's partitions (partition p keeps the state of
/// scores partition p); it is created, compacted, when missing.
fn ensure_changelog(
    client: &ClientConfig,
    config: &AlertsConfig,
    runtime: &tokio::runtime::Handle,
) -> Result<(), AlertsError> {
    let metadata: BaseConsumer = client.clone().set("group.id", "vigil-alerts-metadata").create()?;
    let scores = kafka::partitions_of(metadata.client(), &config.scores_topic)?;
    if scores == 0 {
        return Err(AlertsError::NoScoresTopic(config.scores_topic.clone()));
    }
    let spec = kafka::TopicSpec { partitions: scores as i32, compacted: true };
    let changelog = runtime.block_on(kafka::ensure_topic(client, &config.changelog_topic, spec))?.partitions;
    if changelog != scores {
        return Err(AlertsError::PartitionMismatch {
            changelog_topic: config.changelog_topic.clone(),
            changelog,
            scores_topic: config.scores_topic.clone(),
            scores,
        });
    }
    Ok(())
}

/// Runs the consumer loop on the calling (blocking) thread until `stop` is set; then
/// writes what is pending, commits and leaves the group.
pub fn run_loop(
    config: AlertsConfig,
    metrics: Metrics,
    ready: admin::Readiness,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), AlertsError> {
    let rules: Arc<[Rule]> = config.rules.iter().map(Rule::new).collect();
    let mut client = ClientConfig::new();
    for (key, value) in &config.kafka {
        client.set(key, value);
    }
    let producer: FutureProducer =
        client.clone().set("enable.idempotence", "true").set("acks", "all").set("linger.ms", "5").create()?;
    let runtime = tokio::runtime::Handle::current();
    ensure_changelog(&client, &config, &runtime)?;
    let state = Arc::new(Mutex::new(AssignedPartitions {
        config: config.clone(),
        rules,
        producer,
        engines: HashMap::new(),
        next_offsets: HashMap::new(),
        dead_letters: Vec::new(),
        metrics: metrics.clone(),
        runtime,
        deadline: None,
    }));
    let instance_id = config.group_instance_id();
    let mut consumer_config = kafka::client_config(kafka::group::FAST_FAILOVER, &[&config.kafka]);
    kafka::group::join(&mut consumer_config, &config.group_id, instance_id.as_deref());
    let consumer: BaseConsumer<RebalanceHandler> = consumer_config
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .create_with_context(RebalanceHandler { partitions: state.clone(), ready: ready.clone() })?;
    consumer.subscribe(&[&config.scores_topic])?;
    tracing::info!(
        topic = %config.scores_topic,
        group = %config.group_id,
        instance = instance_id.as_deref().unwrap_or("(dynamic member)"),
        "consuming"
    );
    // Ready once the group has answered (the rebalance handler sets it).
    ready.set_waiting(kafka::group::NO_PARTITIONS_YET);
    let interval = Duration::from_millis(config.commit_interval_ms);
    let mut last_write = Instant::now();
    let result = (|| -> Result<(), AlertsError> {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(message) = consumer.poll(Duration::from_millis(50)) {
                match message {
                    Ok(message) => {
                        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                        state.handle(
                            message.partition(),
                            message.offset(),
                            message.payload().unwrap_or_default(),
                            message.timestamp().to_millis(),
                        )?;
                    }
                    Err(error) => {
                        if let Some(why) = kafka::group::fatal_reason(consumer.client(), instance_id.as_deref()) {
                            return Err(AlertsError::ConsumerFailed(why));
                        }
                        tracing::warn!(%error, "consumer error");
                    }
                }
            }
            if last_write.elapsed() >= interval {
                let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                let partitions: Vec<i32> = state.engines.keys().copied().collect();
                state.write_and_commit(&consumer, &partitions)?;
                last_write = Instant::now();
            }
        }
        Ok(())
    })();
    ready.set(false);
    if result.is_ok() {
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        state.deadline = Some(Instant::now() + Duration::from_secs(config.shutdown_grace_seconds));
        let partitions: Vec<i32> = state.engines.keys().copied().collect();
        state.write_and_commit(&consumer, &partitions)?;
    }
    kafka::group::leave(&consumer, Duration::from_secs(2));
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_decode_from_protobuf_and_the_processors_json() {
        let score = Score {
            device_id: "car-1".into(),
            event_time: Some(prost_types::Timestamp { seconds: 1_780_000_000, nanos: 250_000_000 }),
            score: 1.5,
            is_anomaly: true,
            model_version: 2,
            ..Default::default()
        };
        assert_eq!(decode(&score.encode_to_vec()).unwrap(), score);
        // The processor's JSON form (output_format = "json"), written by the one encoder.
        let json = serde_json::to_vec(&sensor::score_json::to_json(&score)).unwrap();
        assert_eq!(decode(&json).unwrap(), score);
        // Fields missing from the form the processor writes: not a score.
        let partial = br#"{"device_id":"car-1","event_time":"2026-05-28T20:26:40.250Z","score":1.5,"threshold":1.0,"is_anomaly":true,"model_version":2}"#;
        let why = decode(partial).unwrap_err();
        assert_eq!((why.reason(), why.to_string().as_str()), ("not_a_score", "JSON score without \"sequence\""));
        assert_eq!(decode(b"{\"score\": 1}").unwrap_err().reason(), "not_a_score");
        assert_eq!(decode(b"\xff\xff garbage").unwrap_err().reason(), "not_a_score");
        let nameless = Score { device_id: String::new(), ..score.clone() };
        assert_eq!(decode(&nameless.encode_to_vec()).unwrap_err(), Unreadable::MissingDeviceId);
        let infinite = Score { score: f32::INFINITY, ..score };
        assert_eq!(decode(&infinite.encode_to_vec()).unwrap_err().reason(), "invalid_score");
    }
}
