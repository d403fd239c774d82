//! Replays through the processor's gRPC `ReplayService`, on the mock cluster with a model
//! server serving car-anomaly 1, 2 and 3 (3 flags everything) and a live processor pinned
//! to version 1: a replay leaves the live group alone (no rebalance, no commit, nothing
//! missed) while writing one candidate score per reading in its range, joinable with the
//! live scores; it takes exactly the readings in [from, to); a good candidate passes and
//! one that flags everything fails on anomaly rate and agreement; bad requests are refused
//! naming their field, an unserved version as a failed precondition.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use prost::Message as _;
use proto::vigil::replay::v1::replay_service_client::ReplayServiceClient;
use proto::vigil::replay::v1::{Bounds, ReplayReport, ReplayRequest};
use proto::vigil::scoring::v1::Score;
use sensor::SensorReading;
use support::*;
use test_support::eventually;
use test_support::kafka::{Bootstrap, committed_offsets, end_offsets};

const LIVE_GROUP: &str = "live-processor";

/// Kafka, the model server on three versions and a live processor on version 1.
struct Setup {
    kafka: embedded_brokers::KafkaCluster,
    server: ModelServer,
    processor: Processor,
    _models: tempfile::TempDir,
}

impl Setup {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// As [`Setup::start`], with the processor's config changed by `change`.
    async fn start_with(change: impl FnOnce(&mut stream_processor::config::ProcessorConfig)) -> Self {
        let models = tempfile::tempdir().unwrap();
        let server = ModelServer::start(&[&three_versions(models.path())]).await;
        let kafka = kafka();
        let mut config = config(&kafka, &[server.grpc]);
        config.group_id = LIVE_GROUP.into();
        // The live model: unpinned requests would get the newest, the bad version 3.
        config.model.version = Some(1);
        change(&mut config);
        let processor = Processor::start(config).await;
        Self { kafka, server, processor, _models: models }
    }

    async fn client(&self) -> ReplayServiceClient<tonic::transport::Channel> {
        ReplayServiceClient::connect(self.processor.grpc.clone()).await.unwrap()
    }

    async fn replay(&self, request: ReplayRequest) -> Result<ReplayReport, tonic::Status> {
        self.client().await.replay(request).await.map(tonic::Response::into_inner)
    }

    /// Waits until the live processor has scored `readings` readings and committed every
    /// offset of the readings topic.
    async fn live_caught_up(&self, readings: usize) {
        let ends = end_offsets(&self.kafka, READINGS);
        read(&self.kafka, SCORES, move |r| scored_readings(r).len() >= readings).await;
        eventually(Duration::from_secs(30), "the live group to commit every reading", async || {
            committed_offsets(&self.kafka, LIVE_GROUP, READINGS, PARTITIONS) == ends
        })
        .await;
    }

    async fn stop(self) {
        self.processor.stop().await;
        self.server.stop().await;
    }
}

/// The readings (partition, offset) score records name.
fn scored_readings(records: &[embedded_brokers::ReadRecord]) -> BTreeSet<(i32, i64)> {
    scores(records).iter().map(|s| (s.source_partition, s.source_offset)).collect()
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn request(from_ms: i64, to_ms: i64, version: i64, output_topic: &str) -> ReplayRequest {
    ReplayRequest {
        from: Some(timestamp(from_ms)),
        to: Some(timestamp(to_ms)),
        model: String::new(),
        candidate_version: version,
        output_topic: output_topic.into(),
        bounds: None,
    }
}

/// (partition, offset) -> (device, sequence) of every reading on the readings topic.
async fn readings_by_offset(kafka: &impl Bootstrap, count: usize) -> BTreeMap<(i32, i64), (String, u64)> {
    let records = read(kafka, READINGS, move |r| r.len() >= count).await;
    records
        .iter()
        .filter_map(|r| {
            let reading = SensorReading::decode(r.payload.as_slice()).ok()?;
            Some(((r.partition, r.offset), (reading.device_id, reading.sequence)))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_leaves_the_live_group_alone_and_writes_one_candidate_score_per_reading() {
    let setup = Setup::start().await;
    let kafka = &setup.kafka;
    // History: 200 readings written ten minutes ago, scored live by version 1.
    let start = now_ms() - 600_000;
    let history: Vec<(SensorReading, i64)> =
        fleet_readings(20, 10, 5).into_iter().enumerate().map(|(i, r)| (r, start + i as i64 * 10)).collect();
    produce_readings_at(kafka, &history).await;
    let replayed = readings_by_offset(kafka, history.len()).await;
    setup.live_caught_up(history.len()).await;
    let rebalances = setup.processor.metric("processor_rebalances_total").await;
    assert!(rebalances > 0.0, "the live processor was assigned its partitions once");

    // The replay of that history, with live traffic arriving while it runs.
    let replay = tokio::spawn({
        let mut client = setup.client().await;
        let request = request(start - 1000, start + 60_000, 2, "vigil-replay-isolation");
        async move { client.replay(request).await.map(tonic::Response::into_inner) }
    });
    let live = fleet_readings(20, 5, 6);
    produce_readings(kafka, &live).await;
    let report = replay.await.unwrap();
    // The live processor was never rebalanced (a consumer joining its group would have
    // taken partitions from it) ...
    assert_eq!(setup.processor.metric("processor_rebalances_total").await, rebalances, "no rebalance");
    assert_eq!(setup.processor.metric("processor_assigned_partitions").await, f64::from(PARTITIONS));
    let report = report.unwrap();
    let total = history.len() + live.len();
    setup.live_caught_up(total).await;

    // ... scored everything, and its group's committed offsets are its own: every
    // reading, and nothing on any other topic. (Kafka itself refuses commits to a group
    // with members from a consumer outside it; this holds the broker to that too.)
    let scores = read(kafka, SCORES, move |r| scored_readings(r).len() >= total).await;
    assert_eq!(scored_readings(&scores).len(), total, "the live processor scored every reading");
    assert_eq!(committed_offsets(kafka, LIVE_GROUP, READINGS, PARTITIONS), end_offsets(kafka, READINGS));
    for topic in [SCORES, "vigil-replay-isolation"] {
        assert_eq!(committed_offsets(kafka, LIVE_GROUP, topic, PARTITIONS), BTreeMap::new(), "{topic}");
    }

    // One candidate score per reading of the range, naming its reading, from version 2.
    assert_eq!((report.replayed, report.compared, report.failed), (200, 200, 0), "{report:?}");
    assert_eq!(report.live_versions, [1]);
    let outputs = read(kafka, "vigil-replay-isolation", |r| r.len() >= 200).await;
    let outputs: Vec<(Score, Option<Vec<u8>>)> =
        outputs.into_iter().map(|r| (Score::decode(r.payload.as_slice()).unwrap(), r.key)).collect();
    assert_eq!(outputs.len(), 200);
    let mut seen = BTreeSet::new();
    for (score, key) in &outputs {
        assert_eq!((score.model_name.as_str(), score.model_version), ("car-anomaly", 2));
        assert_eq!(score.source_topic, READINGS);
        let source = (score.source_partition, score.source_offset);
        let (device, sequence) = replayed.get(&source).unwrap_or_else(|| panic!("{source:?} is not a history reading"));
        assert_eq!((&score.device_id, score.sequence), (device, *sequence), "at {source:?}");
        assert_eq!(key.as_deref(), Some(device.as_bytes()), "keyed by device");
        assert!(seen.insert(source), "{source:?} replayed twice");
    }
    assert_eq!(seen, replayed.keys().copied().collect::<BTreeSet<_>>());
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_readings_from_from_up_to_before_to_are_replayed() {
    let setup = Setup::start().await;
    let kafka = &setup.kafka;
    let from = now_ms() - 3_600_000;
    let to = from + 60_000;
    // Each car: a reading before the range, one at its start, some inside, one just
    // before its end, one at its end and one after, in time order.
    let offsets = [-30_000, -1, 0, 10_000, 20_000, 59_999, 60_000, 90_000];
    let readings = fleet_readings(12, offsets.len(), 9);
    let timed: Vec<(SensorReading, i64)> =
        readings.into_iter().enumerate().map(|(i, r)| (r, from + offsets[i / 12])).collect();
    produce_readings_at(kafka, &timed).await;
    // And something in the range that is not a reading.
    produce_raw(kafka, "car-junk", b"not a reading", &[]).await;
    let expected: BTreeSet<(String, u64)> = timed
        .iter()
        .filter(|(_, ts)| (from..to).contains(ts))
        .map(|(r, _)| (r.device_id.clone(), r.sequence))
        .collect();
    assert_eq!(expected.len(), 12 * 4);
    let readings = readings_by_offset(kafka, timed.len() + 1).await;
    setup.live_caught_up(timed.len()).await;

    let mut in_range = request(from, to, 1, "vigil-replay-range");
    in_range.bounds = Some(Bounds { min_compared: 10, ..Bounds::default() });
    let report = setup.replay(in_range).await.unwrap();
    assert_eq!((report.replayed, report.compared, report.failed), (48, 48, 0), "{report:?}");
    assert_eq!(report.skipped, 0, "the junk was written now, after the range");
    assert!(report.passed, "the live version against itself: {:?}", report.reasons);
    assert_eq!(report.agreement, 1.0);
    let outputs = read(kafka, "vigil-replay-range", |r| r.len() >= 48).await;
    let replayed: BTreeSet<(String, u64)> =
        scores(&outputs).iter().map(|s| readings[&(s.source_partition, s.source_offset)].clone()).collect();
    assert_eq!(outputs.len(), 48);
    assert_eq!(replayed, expected);

    // A range holding the junk: skipped, neither scored nor failed.
    let mut recent = request(now_ms() - 120_000, now_ms() + 1000, 1, "vigil-replay-recent");
    recent.bounds = Some(Bounds { min_compared: 1, ..Bounds::default() });
    let report = setup.replay(recent).await.unwrap();
    assert_eq!((report.replayed, report.failed, report.skipped), (0, 0, 1), "{report:?}");
    assert!(!report.passed && report.reasons[0].starts_with("compared 0 readings"), "{:?}", report.reasons);
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_candidate_passes_and_one_that_flags_everything_fails_on_anomaly_rate_and_agreement() {
    let setup = Setup::start().await;
    let start = now_ms() - 600_000;
    let history: Vec<(SensorReading, i64)> =
        fleet_readings(30, 8, 13).into_iter().enumerate().map(|(i, r)| (r, start + i as i64 * 10)).collect();
    produce_readings_at(&setup.kafka, &history).await;
    setup.live_caught_up(history.len()).await;

    let good = setup.replay(request(start, start + 60_000, 2, "vigil-replay-good")).await.unwrap();
    println!("version 2: {good:?}");
    assert!(good.passed, "{:?}", good.reasons);
    assert_eq!((good.replayed, good.compared, good.live_versions.as_slice()), (240, 240, &[1][..]));
    assert!(good.reasons.is_empty());
    // The request left every bound at zero: the report names the defaults it judged by.
    assert_eq!(good.bounds, Some(stream_processor::replay::request::DEFAULT_BOUNDS));

    let bad = setup.replay(request(start, start + 60_000, 3, "vigil-replay-bad")).await.unwrap();
    println!("version 3: {bad:?}");
    assert!(!bad.passed);
    assert_eq!((bad.replayed, bad.compared, bad.candidate_anomaly_rate), (240, 240, 1.0));
    let has = |words: &[&str]| bad.reasons.iter().any(|r| words.iter().all(|w| r.contains(w)));
    assert!(has(&["anomaly rate 1.0000", "max_anomaly_rate_difference 0.05"]), "{:?}", bad.reasons);
    assert!(has(&["agreement", "min_agreement 0.9"]), "{:?}", bad.reasons);
    assert!(has(&["scores shifted by +0.5", "max_score_shift 0.2"]), "{:?}", bad.reasons);
    assert_eq!(setup.processor.metric("processor_replays_total").await, 2.0);
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_naming_the_field_and_an_unserved_version_fails_its_precondition() {
    let setup = Setup::start().await;
    let now = now_ms();
    type Change = fn(&mut ReplayRequest);
    let refused = |change: Change| {
        let mut request = request(now - 60_000, now, 2, "vigil-replay-refused");
        change(&mut request);
        async { setup.replay(request).await.unwrap_err() }
    };
    let cases: [(Change, &str); 8] = [
        (|r| r.candidate_version = 0, "candidate_version: "),
        (|r| r.output_topic.clear(), "output_topic: missing"),
        (
            |r| r.output_topic = "vigil-alerts-changelog".into(),
            "output_topic: vigil-alerts-changelog does not start with \"vigil-replay-\"",
        ),
        (|r| r.output_topic = SCORES.into(), "output_topic: vigil-scores is the processor's scores topic"),
        (|r| r.output_topic = READINGS.into(), "output_topic: vigil-readings is the processor's readings topic"),
        (|r| r.from = None, "from: missing"),
        (|r| r.to = r.from, "to: "),
        (|r| r.bounds = Some(Bounds { min_agreement: 1.5, ..Bounds::default() }), "bounds.min_agreement: "),
    ];
    for (change, message) in cases {
        let status = refused(change).await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(message), "{:?} does not start with {message:?}", status.message());
    }
    let unserved = setup.replay(request(now - 60_000, now, 9, "vigil-replay-refused")).await.unwrap_err();
    assert_eq!(unserved.code(), tonic::Code::FailedPrecondition, "{unserved:?}");
    assert!(unserved.message().starts_with("model car-anomaly version 9 is not served"), "{}", unserved.message());
    let mut other = request(now - 60_000, now, 1, "vigil-replay-refused");
    other.model = "no-such-model".into();
    let status = setup.replay(other).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");

    // The gRPC health service answers for the replay service.
    let channel =
        tonic::transport::Endpoint::from_shared(setup.processor.grpc.clone()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = tonic_health::pb::HealthCheckRequest { service: "vigil.replay.v1.ReplayService".into() };
    let status = health.check(check).await.unwrap().into_inner().status;
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    assert_eq!(setup.processor.metric("processor_replays_total").await, 10.0, "each refusal counted");
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_more_readings_than_it_may_hold_is_refused_part_way() {
    let setup = Setup::start_with(|config| config.replay_max_readings = 50).await;
    let start = now_ms() - 600_000;
    let history: Vec<(SensorReading, i64)> =
        fleet_readings(10, 8, 3).into_iter().enumerate().map(|(i, r)| (r, start + i as i64 * 10)).collect();
    produce_readings_at(&setup.kafka, &history).await;
    let status = setup.replay(request(start - 1000, start + 60_000, 2, "vigil-replay-too-many")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("more than 50 readings to re-score (replay_max_readings)"),
        "{}",
        status.message()
    );
    setup.stop().await;
}
