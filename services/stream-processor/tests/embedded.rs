//! Embedded mode (`model.mode = "embedded"`): the processor scores with the SavedModel in
//! its own process. Every reading is scored once, in order per device, by the version
//! the model directory's latest is; a new version directory takes over without a restart
//! and a corrupt one never displaces the served version.

mod support;

use std::time::Duration;

use support::*;
use test_support::{copy_dir, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reading_is_scored_once_in_order_by_the_model_in_the_process() {
    let kafka = kafka();
    let mut config = config(&kafka, &[]);
    embedded(&mut config, &bundled_model_dir());
    config.max_in_flight_per_partition = 64;
    let processor = Processor::start(config).await;
    let readings = fleet_readings(40, 30, 23);
    produce_readings(&kafka, &readings).await;
    let total = readings.len();
    let records = read(&kafka, SCORES, move |r| r.len() >= total).await;
    assert_eq!(distinct(&records), total, "every reading scored once");
    for (device, sequences) in sequences_by_device(&records) {
        assert!(sequences.windows(2).all(|w| w[0] < w[1]), "{device}: scores out of order: {sequences:?}");
    }
    assert!(scores(&records).iter().all(|s| s.model_version == 3), "the directory's latest (windowed) scored");
    assert_eq!(processor.metric("processor_scores_total").await, total as f64);
    assert_eq!(processor.metric("processor_model_rows_per_call_sum").await, total as f64);
    processor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_takes_over_without_a_restart_and_a_corrupt_one_never_does() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("car-anomaly");
    copy_dir(&bundled_model_dir().join("1"), &models.join("1"));
    let kafka = kafka();
    let mut config = config(&kafka, &[]);
    embedded(&mut config, &models);
    config.model.reload_poll_seconds = 1;
    config.model.metadata_refresh_seconds = 1;
    let processor = Processor::start(config).await;
    let first = fleet_readings(10, 5, 3);
    produce_readings(&kafka, &first).await;
    let records = read(&kafka, SCORES, |r| r.len() >= 50).await;
    assert!(scores(&records).iter().all(|s| s.model_version == 1), "version 1 is all there is");

    // A corrupt version 3 is refused (and logged naming the file); version 1 keeps scoring.
    std::fs::create_dir_all(models.join("3")).unwrap();
    std::fs::write(models.join("3/saved_model.pb"), b"not a SavedModel").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    produce_readings(&kafka, &fleet_readings(10, 5, 4)).await;
    let records = read(&kafka, SCORES, |r| r.len() >= 100).await;
    assert!(scores(&records).iter().all(|s| s.model_version == 1), "the corrupt version never scored");

    // Version 2 appears (written elsewhere, then moved in, as a deployment would): it
    // takes over once loaded, with no reading lost in between.
    std::fs::remove_dir_all(models.join("3")).unwrap();
    copy_dir(&bundled_model_dir().join("2"), &dir.path().join("staging"));
    std::fs::rename(dir.path().join("staging"), models.join("2")).unwrap();
    let mut sent = 100;
    eventually(Duration::from_secs(60), "version 2 scoring", async || {
        produce_readings(&kafka, &fleet_readings(10, 1, sent as u64)).await;
        sent += 10;
        let records = read(&kafka, SCORES, move |r| r.len() >= sent).await;
        scores(&records).iter().any(|s| s.model_version == 2)
    })
    .await;
    let records = read(&kafka, SCORES, move |r| r.len() >= sent).await;
    assert_eq!(records.len(), sent, "one score per reading across the switch");
    processor.stop().await;
}
