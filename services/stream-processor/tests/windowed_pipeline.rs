//! A windowed model in the pipeline (docs/windowed-models.md): the bundled `car-anomaly`
//! v3 scores each reading with its device's last 10 readings. A reading must get the same
//! score whichever replica scores it: a processor that takes a partition over (after a
//! restart or a rebalance) rebuilds its devices' windows from the partition's history
//! before the committed offset, so its scores equal those of a processor that read the
//! whole topic in one go. A replay from the middle of the topic reads the devices' earlier
//! readings first, so it reproduces the live scores too.

mod support;

use std::collections::BTreeMap;

use proto::vigil::replay::v1::ReplayRequest;
use proto::vigil::replay::v1::replay_service_client::ReplayServiceClient;
use proto::vigil::scoring::v1::Score;
use support::*;

/// Each reading's score, by (device, sequence); a reading scored twice (at least once)
/// must have scored the same both times.
fn by_reading(scores: Vec<Score>) -> BTreeMap<(String, u64), f32> {
    let mut out: BTreeMap<(String, u64), f32> = BTreeMap::new();
    for score in scores {
        let key = (score.device_id.clone(), score.sequence);
        if let Some(before) = out.insert(key.clone(), score.score) {
            assert_eq!(before, score.score, "{key:?} scored twice, differently");
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_gets_the_same_score_whichever_replica_scores_it() {
    let kafka = kafka();
    let server = ModelServer::start(&[]).await;
    // 8 cars, 40 readings each; faults start within the first minute.
    let readings = fleet_readings(8, 40, 11);
    let (first, second) = readings.split_at(readings.len() / 2);

    // Replica one scores the first half and stops (its offsets committed); replica two
    // takes the partitions over and scores the second half.
    let mut handover = config(&kafka, &[server.grpc]);
    handover.group_id = "windows-handover".into();
    produce_readings(&kafka, first).await;
    let one = Processor::start(handover.clone()).await;
    let half = first.len();
    read(&kafka, SCORES, move |r| distinct(r) >= half).await;
    assert_eq!(one.metric("processor_window_devices").await, 8.0, "one window per device");
    one.stop().await;
    // Where the replay below starts: a range's start is rounded up to Kafka's whole
    // milliseconds, so the second half is written from the next one on.
    let second_from = std::time::SystemTime::now();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    produce_readings(&kafka, second).await;
    let two = Processor::start(handover).await;
    let total = readings.len();
    let records = read(&kafka, SCORES, move |r| distinct(r) >= total).await;
    assert!(
        two.metric("processor_window_rebuild_records_total").await >= half as f64,
        "the new owner read the partitions' history back"
    );
    two.stop().await;
    let handed_over = by_reading(scores(&records));
    assert!(scores(&records).iter().all(|s| s.model_version == 3), "the windowed version scored");

    // One processor over the whole topic, never interrupted, in a group of its own.
    let mut whole = config(&kafka, &[server.grpc]);
    whole.group_id = "windows-whole".into();
    whole.scores_topic = "vigil-scores-whole".into();
    whole.anomalies_topic = "vigil-anomalies-whole".into();
    let processor = Processor::start(whole).await;
    let records = read(&kafka, "vigil-scores-whole", move |r| distinct(r) >= total).await;

    // A replay of the second half through v3 against those live scores: same windows,
    // same scores.
    let mut replays = ReplayServiceClient::connect(processor.grpc.clone()).await.unwrap();
    let report = replays
        .replay(ReplayRequest {
            from: Some(second_from.into()),
            to: Some(std::time::SystemTime::now().into()),
            model: "car-anomaly".into(),
            candidate_version: 3,
            output_topic: "vigil-replay-windows".into(),
            bounds: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((report.replayed, report.compared), (second.len() as u64, second.len() as u64), "{report:?}");
    assert_eq!(report.agreement, 1.0, "{report:?}");
    processor.stop().await;
    let uninterrupted = by_reading(scores(&records));
    let replayed_count = second.len();
    let replayed = read(&kafka, "vigil-replay-windows", move |r| distinct(r) >= replayed_count).await;
    for (key, score) in by_reading(scores(&replayed)) {
        let live = uninterrupted[&key];
        assert!((live - score).abs() <= 1e-5 * live.abs().max(1.0), "{key:?}: replayed {score}, live {live}");
    }

    assert_eq!(handed_over.len(), total);
    assert_eq!(uninterrupted.len(), total);
    let mut differing = Vec::new();
    for (key, score) in &uninterrupted {
        let other = handed_over[key];
        // Batches of other sizes may round differently in the last bits.
        if (other - score).abs() > 1e-5 * score.abs().max(1.0) {
            differing.push((key.clone(), *score, other));
        }
    }
    assert!(differing.is_empty(), "scores that depend on the replica: {differing:?}");
    server.stop().await;
}
