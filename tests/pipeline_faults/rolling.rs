//! A rolling update of two stream processor replicas under load, as a Kubernetes
//! Deployment does one: each old replica is stopped gracefully (SIGTERM: it finishes its
//! in-flight work, commits and leaves the group) and replaced by one with a new name (a new
//! pod, so a new `group.instance.id`), waiting for the new one's readiness before the next.
//! Readings are written straight to Kafka at a steady pace meanwhile; what is measured is
//! each readings partition's longest stretch without a new score.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use device_simulator::fleet::{Fleet, FleetOptions};
use prost::Message as _;
use rdkafka::ClientConfig;
use rdkafka::producer::FutureRecord;
use test_support::Tail;

use crate::processes::{Launch, ModelServer};
use crate::run::env;

const READINGS: &str = "rolling-readings";
const SCORES: &str = "rolling-scores";
const PARTITIONS: i32 = 4;
/// Cars, each a reading every [`TICK`]: 200 readings a second over the partitions.
const CARS: usize = 20;
const TICK: Duration = Duration::from_millis(100);
/// How long a replica may take to drain, leave and exit, or to be ready.
const STEP: Duration = Duration::from_secs(60);

/// What the update measured.
pub(crate) struct RollingUpdate {
    /// Readings written, and how many distinct ones were scored.
    pub(crate) written: usize,
    pub(crate) scored: usize,
    /// Each readings partition's longest stretch without a new score, from the first stop
    /// to the end of the update.
    pub(crate) longest_gaps: BTreeMap<i32, Duration>,
    /// Per replaced replica: from its SIGTERM to its exit, and to its successor's readiness.
    pub(crate) steps: Vec<(Duration, Duration)>,
}

pub(crate) async fn rolling_update() -> RollingUpdate {
    let kafka = env("VIGIL_TANSU_BROKERS");
    let config = ClientConfig::new().set("bootstrap.servers", &kafka).clone();
    for (topic, partitions) in [(READINGS, PARTITIONS), (SCORES, PARTITIONS), ("rolling-anomalies", PARTITIONS)]
        .into_iter()
        .chain([("rolling-dead-letters", 1)])
    {
        let spec = kafka::TopicSpec { partitions, compacted: false };
        kafka::ensure_topic(&config, topic, spec).await.unwrap_or_else(|e| panic!("creating {topic}: {e}"));
    }
    let tail = Tail::start(&kafka, &[SCORES]);
    let model = ModelServer::start(0);
    model.rest.wait_ready("the model server", STEP).await;
    let replica = |name: &str| {
        Launch::processor(&kafka, model.grpc)
            .with_env("PROCESSOR_GROUP_ID", "vigil-rolling-update")
            .with_env("PROCESSOR_GROUP_INSTANCE_ID", name)
            .with_env("PROCESSOR_READINGS_TOPIC", READINGS)
            .with_env("PROCESSOR_SCORES_TOPIC", SCORES)
            .with_env("PROCESSOR_ANOMALIES_TOPIC", "rolling-anomalies")
            .with_env("PROCESSOR_DEAD_LETTER_TOPIC", "rolling-dead-letters")
    };
    let (a, b) = (replica("processor-a-1").start(), replica("processor-b-1").start());
    a.admin.wait_ready("replica a", STEP).await;
    b.admin.wait_ready("replica b", STEP).await;

    let stop_writing = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_readings(kafka.clone(), stop_writing.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let update_began = SystemTime::now();
    let mut steps = Vec::new();
    // The successors run to the end (dropping one kills it).
    let mut successors = Vec::new();
    for (old, successor) in [(a, "processor-a-2"), (b, "processor-b-2")] {
        let stopping = Instant::now();
        let status = old.terminate(STEP);
        assert!(status.success(), "a replica stops cleanly on SIGTERM: {status}");
        let exited = stopping.elapsed();
        let new = replica(successor).start();
        new.admin.wait_ready(successor, STEP).await;
        steps.push((exited, stopping.elapsed()));
        successors.push(new);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let update_ended = SystemTime::now();
    stop_writing.store(true, Ordering::Relaxed);
    let written = writer.await.expect("the writer");

    let scored = test_support::observe_until(
        Duration::from_secs(60),
        || async { tail.with(SCORES, |records| distinct_scored(records).len()) },
        |scored| *scored >= written,
    )
    .await;
    let longest_gaps = tail.with(SCORES, |records| longest_gaps(records, update_began, update_ended));
    drop(successors);
    RollingUpdate { written, scored, longest_gaps, steps }
}

/// Writes the cars' readings every [`TICK`] until `stop`; returns how many were written.
async fn write_readings(kafka: String, stop: Arc<AtomicBool>) -> usize {
    let producer = test_support::kafka::producer(&kafka);
    let options = FleetOptions { cars: CARS, seed: 7, ..FleetOptions::default() };
    let mut fleet = Fleet::new(&options, SystemTime::now().into());
    let mut written = 0;
    let mut tick = tokio::time::interval(TICK);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let readings = fleet.step(TICK.as_secs_f64());
        let payloads: Vec<(String, Vec<u8>)> =
            readings.iter().map(|reading| (reading.device_id.clone(), reading.encode_to_vec())).collect();
        let records = payloads
            .iter()
            .map(|(key, payload)| FutureRecord::to(READINGS).key(key.as_str()).payload(payload))
            .collect();
        test_support::kafka::produce(&producer, records).await;
        written += payloads.len();
    }
    written
}

fn distinct_scored(records: &[test_support::TailedRecord]) -> std::collections::BTreeSet<(String, u64)> {
    records
        .iter()
        .filter_map(|record| proto::vigil::scoring::v1::Score::decode(record.record.payload.as_slice()).ok())
        .map(|score| (score.device_id, score.sequence))
        .collect()
}

/// Each readings partition's longest stretch without a new score between `from` and `to`,
/// by the scores' `scored_at`.
fn longest_gaps(records: &[test_support::TailedRecord], from: SystemTime, to: SystemTime) -> BTreeMap<i32, Duration> {
    let mut times: BTreeMap<i32, Vec<SystemTime>> = BTreeMap::new();
    for record in records {
        let Ok(score) = proto::vigil::scoring::v1::Score::decode(record.record.payload.as_slice()) else { continue };
        let Some(at) = score.scored_at.and_then(|t| SystemTime::try_from(t).ok()) else { continue };
        times.entry(score.source_partition).or_default().push(at);
    }
    times
        .into_iter()
        .map(|(partition, mut at)| {
            at.sort();
            let inside = at.into_iter().filter(|t| *t > from && *t <= to);
            let points: Vec<SystemTime> = std::iter::once(from).chain(inside).chain(std::iter::once(to)).collect();
            let longest = points
                .windows(2)
                .map(|pair| pair[1].duration_since(pair[0]).unwrap_or_default())
                .max()
                .unwrap_or_default();
            (partition, longest)
        })
        .collect()
}
