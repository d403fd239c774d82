//! Replay: re-scores a time range of the readings topic through a candidate model version,
//! into a topic of its own, and reports how the candidate differs from what the live model
//! wrote to the scores topic for the same readings. The offline step before a canary
//! (`vigil replay`, and the gRPC `vigil.replay.v1.ReplayService` in [`grpc`]).
//!
//! ```text
//!  readings topic ──range::scan [from, to)──▶ candidate: a ModelClient pinned to the
//!   (assigned, no group, no commits)           version (retries, balancing), at most
//!                                              replay_concurrency readings at once
//!                                                │ one Score per reading (keyed by device,
//!                                                ▼ source topic/partition/offset set)
//!                                              output topic
//!  scores topic ──range::scan from `from` - CLOCK_SKEW, until every live score is found
//!                 ──▶ join by (topic, partition, offset) ──▶ report::report (the verdict)
//! ```
//!
//! Isolation: the live processor's consumer group is never joined (partitions are
//! assigned, not subscribed, so no rebalance), and nothing is committed (the replay's
//! consumer has a group id of its own, which librdkafka needs, and never commits under
//! it). The candidate's Predict calls pin its version, so they never count in a rollout's
//! split. What a replay shares with live scoring is capacity: the model servers (hence
//! `replay_concurrency`, and one replay at a time per processor) and Kafka's fetch
//! bandwidth.

mod candidate;
pub mod grpc;
pub mod range;
pub mod report;
pub mod request;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use prost::Message as _;
use proto::vigil::replay::v1::{ReplayReport, ReplayRequest};
use proto::vigil::scoring::v1::Score;
use rdkafka::consumer::Consumer as _;
use rdkafka::error::KafkaError;
use rdkafka::message::{Message as _, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer};
use tokio::sync::{Semaphore, mpsc};

use self::candidate::{Outcome, candidate, score, take};
use self::range::{RangeError, Take};
use self::report::{Pair, Tally};
use self::request::{Invalid, Plan};
use crate::config::{OutputFormat, ProcessorConfig};
use crate::metrics::Metrics;
use crate::output::OutRecord;
use crate::windows::Windows;

/// How much earlier than a reading's Kafka timestamp its live score's may be (clocks of
/// the hosts writing readings and scores disagreeing): the live scores are read from
/// `from` minus this.
pub const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Tries per reading when the model server fails transiently (each a call through the
/// client's own retries); after them the reading counts as failed.
const ATTEMPTS: u32 = 4;

/// Output records handed to the producer and not yet confirmed, at most.
const MAX_UNCONFIRMED: usize = 10_000;

/// How long the candidate's output records may wait for Kafka (the live path waits
/// forever, because its offsets wait for them; a replay reports the failure instead).
const OUTPUT_TIMEOUT_MS: &str = "60000";

/// Why a replay did not produce a report.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The model server does not serve the candidate (or serves one the processor cannot
    /// score with).
    #[error("{0}")]
    NotServed(String),
    #[error("a replay is already running on this processor (one at a time); try again once it is done")]
    Busy,
    #[error(
        "the range holds more than {0} readings to re-score (replay_max_readings); replay a narrower range \
         (what was written to the output topic so far stays there)"
    )]
    TooManyReadings(usize),
    #[error("model server: {0}")]
    ModelServer(String),
    #[error("{0}")]
    Kafka(String),
    #[error("{0}")]
    Internal(String),
}

/// The one mapping of replay errors to gRPC codes.
impl From<ReplayError> for tonic::Status {
    fn from(error: ReplayError) -> Self {
        let message = error.to_string();
        match error {
            ReplayError::Invalid(_) => tonic::Status::invalid_argument(message),
            ReplayError::NotServed(_) => tonic::Status::failed_precondition(message),
            ReplayError::Busy | ReplayError::TooManyReadings(_) => tonic::Status::resource_exhausted(message),
            ReplayError::ModelServer(_) | ReplayError::Kafka(_) => tonic::Status::unavailable(message),
            ReplayError::Internal(_) => tonic::Status::internal(message),
        }
    }
}

impl From<RangeError> for ReplayError {
    fn from(error: RangeError) -> Self {
        match error {
            RangeError::Kafka(_) | RangeError::NoTopic(_) | RangeError::Stalled { .. } => {
                ReplayError::Kafka(error.to_string())
            }
            RangeError::Cancelled => ReplayError::Internal("the replay was cancelled".into()),
        }
    }
}

impl From<KafkaError> for ReplayError {
    fn from(error: KafkaError) -> Self {
        ReplayError::Kafka(format!("kafka: {error}"))
    }
}

/// Runs replays for the processor, one at a time.
pub struct Replayer {
    config: Arc<ProcessorConfig>,
    metrics: Metrics,
    running: Semaphore,
}

impl Replayer {
    pub fn new(config: Arc<ProcessorConfig>, metrics: Metrics) -> Self {
        Self { config, metrics, running: Semaphore::new(1) }
    }

    /// Runs one replay to its end; refused while another runs. Dropping the future stops it.
    pub async fn replay(&self, request: &ReplayRequest) -> Result<ReplayReport, ReplayError> {
        let result = match self.running.try_acquire() {
            Ok(_running) => self.checked(request).await,
            Err(_) => Err(ReplayError::Busy),
        };
        let outcome = match &result {
            Ok(report) if report.passed => "passed",
            Ok(_) => "failed",
            Err(_) => "error",
        };
        self.metrics.replays.with_label_values(&[outcome]).inc();
        result
    }

    async fn checked(&self, request: &ReplayRequest) -> Result<ReplayReport, ReplayError> {
        let plan = request::check(&self.config, request)?;
        let started = Instant::now();
        tracing::info!(
            model = %plan.model,
            version = plan.version,
            output_topic = %plan.output_topic,
            from_ms = plan.from_ms,
            to_ms = plan.to_ms,
            "replay started"
        );
        match run(self.config.clone(), &plan, &self.metrics).await {
            Ok(report) => {
                tracing::info!(
                    model = %plan.model,
                    version = plan.version,
                    replayed = report.replayed,
                    compared = report.compared,
                    failed = report.failed,
                    passed = report.passed,
                    reasons = ?report.reasons,
                    seconds = started.elapsed().as_secs_f64(),
                    "replay finished"
                );
                Ok(report)
            }
            Err(error @ ReplayError::NotServed(_)) => {
                tracing::info!(model = %plan.model, version = plan.version, %error, "replay refused");
                Err(error)
            }
            Err(error) => {
                tracing::warn!(model = %plan.model, version = plan.version, %error, "replay failed");
                Err(error)
            }
        }
    }
}

/// Set when the replay's future is dropped, so its blocking reads stop too.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs `work` on a blocking thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ReplayError> + Send + 'static,
) -> Result<T, ReplayError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| ReplayError::Internal(format!("a replay task failed: {e}")))?
}

async fn run(config: Arc<ProcessorConfig>, plan: &Plan, metrics: &Metrics) -> Result<ReplayReport, ReplayError> {
    let model = candidate(&config, plan).await?;
    let model_window = model.window().unwrap_or(1);
    let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
    let group = replay_group_id(&config);

    // Where the range is in each partition, and the output topic's partition count.
    let (consumer, spans, output_partitions) = {
        let (config, group, output, from) = (config.clone(), group.clone(), plan.output_topic.clone(), plan.from_ms);
        blocking(move || {
            let consumer = range::consumer(&config, &group)?;
            let readings = &config.readings_topic;
            let mut spans = range::spans(&consumer, readings, from)?;
            // A windowed candidate sees each device's readings before the range too, as
            // the live path did (the records before the range only fill windows).
            if model_window > 1 {
                let back = i64::try_from(config.windows.rebuild_records).unwrap_or(i64::MAX);
                for span in &mut spans {
                    span.start = span.start.saturating_sub(back).max(0);
                }
            }
            let output = kafka::partitions_of(consumer.client(), &output)?;
            Ok((consumer, spans, output))
        })
        .await?
    };
    if output_partitions == 0 {
        // In the background: the first records wait in the producer until the topic is
        // there, and a cluster that cannot create topics this way (the mock cluster answers
        // no CreateTopics) should not hold the replay up.
        let (config, topic, partitions) = (config.clone(), plan.output_topic.clone(), spans.len());
        tokio::spawn(async move { create_topic(&config, &topic, partitions).await });
    }
    let producer = producer(&config)?;

    // The reader: the range's readings, in each partition's order, to the scorers.
    let (sender, mut receiver) = mpsc::channel::<(OwnedMessage, bool)>(config.replay_concurrency);
    let reader = {
        let (readings, cancel, from, to) = (config.readings_topic.clone(), cancel.0.clone(), plan.from_ms, plan.to_ms);
        tokio::task::spawn_blocking(move || {
            range::scan(&consumer, &readings, &spans, &cancel, |message| {
                let Some(timestamp) = message.timestamp().to_millis() else { return Take::Next };
                if timestamp >= to {
                    return Take::PartitionDone;
                }
                let history = timestamp < from;
                if history && model_window <= 1 {
                    return Take::Next;
                }
                match sender.blocking_send((message.detach(), history)) {
                    Ok(()) => Take::Next,
                    Err(_) => Take::Stop, // the replay is gone
                }
            })
        })
    };

    // The scorers, then the writer (in the order the reader read).
    let mut tally = Tally::default();
    let mut scored: HashMap<(i32, i64), (f32, bool)> = HashMap::new();
    let mut deliveries = FuturesUnordered::new();
    let mut first_failure = None;
    let messages = futures::stream::poll_fn(|cx| receiver.poll_recv(cx));
    // Windows are filled here, in each partition's order, before the readings are scored
    // concurrently.
    let mut windows: HashMap<i32, Windows> = HashMap::new();
    let mut outcomes = messages
        .map(|(message, history)| {
            let taken = take(&config, &mut windows, model_window, &message);
            score(&model, &config, plan, message, history, taken)
        })
        .buffered(config.replay_concurrency);
    while let Some(outcome) = outcomes.next().await {
        match outcome {
            Outcome::Scored { partition, offset, record, score, anomaly } => {
                if scored.len() >= config.replay_max_readings {
                    return Err(ReplayError::TooManyReadings(config.replay_max_readings));
                }
                deliveries.push(send(&producer, &record).await?);
                while deliveries.len() >= MAX_UNCONFIRMED {
                    confirmed(deliveries.next().await, &plan.output_topic)?;
                }
                scored.insert((partition, offset), (score, anomaly));
                tally.replayed += 1;
                metrics.replay_readings.with_label_values(&["replayed"]).inc();
            }
            Outcome::Failed(error) => {
                tally.failed += 1;
                metrics.replay_readings.with_label_values(&["failed"]).inc();
                if first_failure.is_none() {
                    tracing::warn!(model = %plan.model, version = plan.version, %error, "the candidate could not score a reading (counted as failed)");
                    first_failure = Some(error);
                }
            }
            Outcome::Skipped => {
                tally.skipped += 1;
                metrics.replay_readings.with_label_values(&["skipped"]).inc();
            }
            Outcome::History => {}
        }
    }
    drop(outcomes);
    reader.await.map_err(|e| ReplayError::Internal(format!("the replay's reader failed: {e}")))??;
    while let Some(delivery) = deliveries.next().await {
        confirmed(Some(delivery), &plan.output_topic)?;
    }

    // The live scores of the same readings.
    if !scored.is_empty() {
        let wanted: HashSet<(i32, i64)> = scored.keys().copied().collect();
        let (config, cancel, from) = (config.clone(), cancel.0.clone(), plan.from_ms);
        let live = blocking(move || live_scores(&config, &group, from, wanted, &cancel)).await?;
        let mut candidates: Vec<_> = scored.into_iter().collect();
        candidates.sort_unstable_by_key(|(key, _)| *key);
        for (key, (candidate, candidate_anomaly)) in candidates {
            if let Some(live) = live.get(&key) {
                tally.pairs.push(Pair {
                    candidate,
                    candidate_anomaly,
                    live: live.score,
                    live_anomaly: live.is_anomaly,
                    live_version: live.model_version,
                });
            }
        }
    }
    Ok(report::report(plan, &tally))
}

/// A group id no other consumer has, prefixed by the live one (Kafka ACLs often grant
/// groups by prefix). Nothing is ever committed under it.
fn replay_group_id(config: &ProcessorConfig) -> String {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{}-replay-{}-{nanos}", config.group_id, std::process::id())
}

/// Creates the output topic with the readings topic's partition count and the broker's
/// default replication. A failure is only logged: the producer may still create it
/// (auto-creation), and if not, its deliveries fail naming the topic.
async fn create_topic(config: &ProcessorConfig, topic: &str, partitions: usize) {
    let client = kafka::client_config(&[], &[&config.kafka, &config.producer]);
    let spec = kafka::TopicSpec { partitions: partitions as i32, compacted: false };
    match kafka::ensure_topic(&client, topic, spec).await {
        Ok(ensured) if ensured.created => tracing::info!(topic, partitions, "created the replay's output topic"),
        Ok(ensured) if ensured.partitions == 0 => {
            tracing::warn!(topic, "the replay's output topic is not there; leaving it to the producer")
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(topic, %error, "creating the replay's output topic"),
    }
}

fn producer(config: &ProcessorConfig) -> Result<FutureProducer, ReplayError> {
    let mut client = crate::kafka_clients::producer_config(config);
    client.set("message.timeout.ms", OUTPUT_TIMEOUT_MS).set("client.id", "vigil-stream-processor-replay");
    Ok(client.create()?)
}

/// Hands a record to the producer, waiting while its queue is full.
async fn send(producer: &FutureProducer, record: &OutRecord) -> Result<DeliveryFuture, ReplayError> {
    let delivery = crate::kafka_clients::send(producer, record).await;
    delivery.map_err(|error| ReplayError::Kafka(format!("writing to {}: {error}", record.topic)))
}

/// Whether Kafka took a record (`None`: nothing was waited for).
fn confirmed(delivery: Option<<DeliveryFuture as Future>::Output>, topic: &str) -> Result<(), ReplayError> {
    match delivery {
        None | Some(Ok(Ok(_))) => Ok(()),
        Some(Ok(Err((error, _)))) => Err(ReplayError::Kafka(format!("writing to {topic}: {error}"))),
        Some(Err(_)) => Err(ReplayError::Kafka(format!("writing to {topic}: the producer went away"))),
    }
}

/// The live score records of the `wanted` readings (partition, offset of the readings
/// topic), read from the scores topic until each is found or the topic's end (as it was
/// when the read began) is reached. Repeats (at-least-once) keep the first.
fn live_scores(
    config: &ProcessorConfig,
    group: &str,
    from_ms: i64,
    wanted: HashSet<(i32, i64)>,
    cancel: &AtomicBool,
) -> Result<HashMap<(i32, i64), Score>, ReplayError> {
    let consumer = range::consumer(config, group)?;
    let skew = CLOCK_SKEW.as_millis() as i64;
    let spans = range::spans(&consumer, &config.scores_topic, from_ms.saturating_sub(skew))?;
    let mut found = HashMap::new();
    range::scan(&consumer, &config.scores_topic, &spans, cancel, |message| {
        let Some(score) = decode_score(message.payload().unwrap_or_default(), config.output_format) else {
            return Take::Next;
        };
        let key = (score.source_partition, score.source_offset);
        if score.source_topic == config.readings_topic && wanted.contains(&key) {
            found.entry(key).or_insert(score);
            if found.len() == wanted.len() {
                return Take::Stop;
            }
        }
        Take::Next
    })?;
    Ok(found)
}

/// A score record in either output format (the configured one first: the topic may hold
/// both if the format was changed).
pub fn decode_score(payload: &[u8], format: OutputFormat) -> Option<Score> {
    let protobuf = || Score::decode(payload).ok().filter(|s| !s.source_topic.is_empty());
    match format {
        OutputFormat::Protobuf => protobuf().or_else(|| sensor::score_json::from_json(payload).ok()),
        OutputFormat::Json => sensor::score_json::from_json(payload).ok().or_else(protobuf),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_scores_are_read_in_either_output_format() {
        let score = Score {
            device_id: "car-1".into(),
            score: 1.5,
            threshold: 1.2,
            is_anomaly: true,
            model_version: 2,
            source_topic: "vigil-readings".into(),
            source_partition: 3,
            source_offset: 41,
            ..Score::default()
        };
        for format in [OutputFormat::Protobuf, OutputFormat::Json] {
            let payload = crate::output::encode_score(format, &score);
            for reading_as in [OutputFormat::Protobuf, OutputFormat::Json] {
                let read = decode_score(&payload, reading_as).unwrap();
                assert_eq!(
                    (read.score, read.is_anomaly, read.model_version, read.source_topic.as_str()),
                    (1.5, true, 2, "vigil-readings"),
                    "{format:?} read as {reading_as:?}"
                );
                assert_eq!((read.source_partition, read.source_offset), (3, 41));
            }
        }
        assert_eq!(decode_score(b"not a score", OutputFormat::Protobuf), None);
    }

    #[test]
    fn errors_map_to_the_codes_the_api_promises() {
        let code = |error: ReplayError| tonic::Status::from(error).code();
        let invalid = Invalid { field: "output_topic", message: "missing".into() };
        assert_eq!(code(ReplayError::Invalid(invalid.clone())), tonic::Code::InvalidArgument);
        assert_eq!(tonic::Status::from(ReplayError::Invalid(invalid)).message(), "output_topic: missing");
        assert_eq!(code(ReplayError::NotServed("x".into())), tonic::Code::FailedPrecondition);
        assert_eq!(code(ReplayError::Busy), tonic::Code::ResourceExhausted);
        assert_eq!(code(ReplayError::TooManyReadings(10)), tonic::Code::ResourceExhausted);
        assert_eq!(code(ReplayError::Kafka("x".into())), tonic::Code::Unavailable);
        assert_eq!(code(ReplayError::ModelServer("x".into())), tonic::Code::Unavailable);
    }

    #[tokio::test]
    async fn a_second_replay_is_refused_while_one_runs() {
        let replayer =
            Replayer::new(Arc::new(ProcessorConfig::default()), Metrics::new(&prometheus::Registry::new()).unwrap());
        let running = replayer.running.try_acquire().unwrap();
        let request = ReplayRequest::default();
        let error = replayer.replay(&request).await.unwrap_err();
        assert!(matches!(error, ReplayError::Busy), "{error}");
        drop(running);
        // Free again: this one gets as far as checking the request.
        let error = replayer.replay(&request).await.unwrap_err();
        assert!(matches!(error, ReplayError::Invalid(Invalid { field: "candidate_version", .. })), "{error}");
        assert_eq!(replayer.metrics.replays.with_label_values(&["error"]).get(), 2);
    }

    #[test]
    fn each_replay_has_a_group_of_its_own() {
        let config = ProcessorConfig::default();
        let (a, b) = (replay_group_id(&config), replay_group_id(&config));
        assert_ne!(a, b);
        assert!(a.starts_with("vigil-stream-processor-replay-"), "{a}");
    }
}
