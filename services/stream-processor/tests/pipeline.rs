//! The processor end to end on in-process brokers: librdkafka's mock cluster for Kafka,
//! real model servers (this workspace's, on the bundled model) over gRPC on loopback.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use prost::Message as _;
use proto::vigil::scoring::v1::Anomaly;
use support::*;
use test_support::eventually;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reading_is_scored_once_in_order_per_device_across_two_balanced_replicas() {
    scored_once_in_order_across_two_replicas(Calls::Batched).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_per_reading_scores_each_once_in_order_across_two_balanced_replicas() {
    scored_once_in_order_across_two_replicas(Calls::PerReading).await;
}

async fn scored_once_in_order_across_two_replicas(calls: Calls) {
    let kafka = kafka();
    let (a, b) = (ModelServer::start(&[]).await, ModelServer::start(&[]).await);
    let mut config = config(&kafka, &[a.grpc, b.grpc]);
    calls.apply(&mut config);
    config.max_in_flight_per_partition = 64;
    let processor = Processor::start(config).await;
    let readings = fleet_readings(40, 50, 11);
    produce_readings(&kafka, &readings).await;
    let total = readings.len();
    let records = read(&kafka, SCORES, move |r| r.len() >= total).await;
    assert_eq!(records.len(), total, "one score per reading");
    assert_eq!(distinct(&records), total, "no reading scored twice, none missed");
    for (device, sequences) in sequences_by_device(&records) {
        assert!(sequences.windows(2).all(|w| w[0] < w[1]), "{device}: scores out of order: {sequences:?}");
    }
    for record in &records {
        let score = proto::vigil::scoring::v1::Score::decode(record.payload.as_slice()).unwrap();
        assert_eq!(record.key.as_deref(), Some(score.device_id.as_bytes()), "keyed by device");
        assert_eq!(score.model_name, "car-anomaly");
        assert_eq!(score.model_version, 3, "the server's latest version (windowed) answered");
        assert_eq!(score.is_anomaly, score.score > score.threshold);
        assert_eq!(record.header("vigil.model.version"), Some(&b"3"[..]));
    }
    // Anomalies: exactly the flagged scores, with their reading attached.
    let flagged = support::scores(&records).iter().filter(|s| s.is_anomaly).count();
    assert!(flagged > 0, "the faulty cars were flagged");
    let anomalies = read(&kafka, ANOMALIES, move |r| r.len() >= flagged).await;
    assert_eq!(anomalies.len(), flagged);
    for record in &anomalies {
        let anomaly = Anomaly::decode(record.payload.as_slice()).unwrap();
        let (score, reading) = (anomaly.score.unwrap(), anomaly.reading.unwrap());
        assert!(score.is_anomaly);
        assert_eq!((score.device_id.as_str(), score.sequence), (reading.device_id.as_str(), reading.sequence));
    }
    // Both replicas took calls (power of two choices over the two).
    let (on_a, on_b) = (a.predictions().await, b.predictions().await);
    let calls_made = on_a + on_b;
    match calls {
        Calls::PerReading => assert_eq!(calls_made, total as f64, "one Predict per reading"),
        Calls::Batched => assert!(calls_made < total as f64, "{calls_made} calls for {total} readings: none batched"),
    }
    assert!(on_a > calls_made * 0.2 && on_b > calls_made * 0.2, "balanced: {on_a} and {on_b}");
    let rows = processor.metric("processor_model_rows_per_call_sum").await;
    assert_eq!(rows, total as f64, "every reading was one row of one call");
    assert_eq!(processor.metric("processor_scores_total").await, total as f64);
    processor.stop().await;
    a.stop().await;
    b.stop().await;
}

test_both_scorings!(scores_are_tensorflows:
    scores_are_tensorflows_for_the_golden_readings,
    embedded_scores_are_tensorflows_for_the_golden_readings);

/// The golden stretches' scores from the latest version, the windowed v3: each stretch is
/// a car's consecutive readings from its first, so the processor's windows are
/// TensorFlow's (padded alike at the start).
async fn scores_are_tensorflows(scoring: Scoring) {
    let (kafka, mut config, server) = scoring.setup().await;
    config.output_format = stream_processor::config::OutputFormat::Json;
    let processor = Processor::start(config).await;
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/car_anomaly_golden.json")).unwrap())
            .unwrap();
    let now = std::time::SystemTime::now();
    let mut readings = Vec::new();
    let mut expected_scores = Vec::new();
    for (stretch, tf_scores) in golden["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .zip(golden["versions"]["3"]["sequence_scores"].as_array().unwrap())
    {
        let stretch = stretch.as_array().unwrap();
        for (i, (r, tf)) in stretch.iter().zip(tf_scores.as_array().unwrap()).enumerate() {
            let envelope = sensor::json::Envelope { topic_device_id: None, received_at: now };
            let mut reading = sensor::json::parse(r.to_string().as_bytes(), &envelope).unwrap();
            // Recorded in January 2026; written now, so dated now (the processor refuses
            // event times a day from their Kafka timestamp), a second apart as recorded.
            // The scores do not depend on the date.
            reading.event_time = Some((now - std::time::Duration::from_secs((stretch.len() - i) as u64)).into());
            readings.push(reading);
            expected_scores.push(tf.as_f64().unwrap());
        }
    }
    produce_readings(&kafka, &readings).await;
    let total = readings.len();
    let records = read(&kafka, SCORES, move |r| r.len() >= total).await;
    let threshold = golden["versions"]["3"]["threshold"].as_f64().unwrap();
    let mut checked = 0;
    for record in &records {
        let score: serde_json::Value = serde_json::from_slice(&record.payload).unwrap();
        let index = readings
            .iter()
            .position(|r| r.device_id == score["device_id"] && serde_json::json!(r.sequence) == score["sequence"])
            .unwrap();
        let tf = expected_scores[index];
        let ours = score["score"].as_f64().unwrap();
        assert!((ours - tf).abs() <= 1e-4 * tf.abs().max(1.0), "reading {index}: {ours} vs TensorFlow's {tf}");
        assert!((score["threshold"].as_f64().unwrap() - threshold).abs() < 1e-5);
        assert_eq!(score["model_version"], 3);
        assert_eq!(score["is_anomaly"], ours > score["threshold"].as_f64().unwrap());
        checked += 1;
    }
    assert_eq!(checked, total);
    processor.stop().await;
    if let Some(server) = server {
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_larger_than_the_servers_batches_are_split_and_every_reading_is_scored() {
    // The server refuses calls over 8 rows (INVALID_ARGUMENT); the processor sends up to
    // its default max_rows_per_call. Refused calls are split until they fit: nothing is
    // dead-lettered for it.
    let dir = tempfile::tempdir().unwrap();
    let batching = dir.path().join("batching.config");
    std::fs::write(&batching, "max_batch_size { value: 8 }\nbatch_timeout_micros { value: 0 }\n").unwrap();
    let batching = format!("--batching_parameters_file={}", batching.display());
    let server = ModelServer::start(&["--enable_batching", &batching]).await;
    let kafka = kafka();
    let processor = Processor::start(config(&kafka, &[server.grpc])).await;
    let readings = fleet_readings(20, 20, 17);
    produce_readings(&kafka, &readings).await;
    let total = readings.len();
    let records = read(&kafka, SCORES, move |r| r.len() >= total).await;
    assert_eq!(distinct(&records), total, "every reading scored");
    let refused = processor.metric("processor_model_errors_total").await;
    assert!(refused > 0.0, "no call was over 8 rows, so nothing was split: the test proves nothing");
    assert_eq!(processor.metric("processor_dead_lettered_total").await, 0.0);
    processor.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_scored_is_dead_lettered_with_the_reason_and_the_stream_goes_on() {
    let kafka = kafka();
    let server = ModelServer::start(&[]).await;
    let processor = Processor::start(config(&kafka, &[server.grpc])).await;
    let good = fleet_readings(2, 3, 5);
    produce_readings(&kafka, &good[..3]).await;
    produce_raw(
        &kafka,
        "car-x",
        b"{\"not\": \"protobuf\"}",
        &[("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")],
    )
    .await;
    let mut out_of_range = good[0].clone();
    out_of_range.speed = 1.0e6;
    produce_raw(&kafka, &out_of_range.device_id, &out_of_range.encode_to_vec(), &[]).await;
    // Written by some other producer: a reading from the year 9999, and one for a device id
    // of 300 KB (its outputs would exceed Kafka's record limit).
    let mut far_future = good[1].clone();
    far_future.event_time = Some(prost_types::Timestamp { seconds: 253_402_300_799, nanos: 0 });
    produce_raw(&kafka, "car-9999", &far_future.encode_to_vec(), &[]).await;
    let mut huge_id = good[1].clone();
    huge_id.device_id = "x".repeat(300_000);
    produce_raw(&kafka, "car-huge", &huge_id.encode_to_vec(), &[]).await;
    produce_readings(&kafka, &good[3..]).await;

    let dead = read(&kafka, DEAD_LETTERS, |r| r.len() >= 4).await;
    assert_eq!(dead.len(), 4);
    let reason_of =
        |key: &[u8]| dead.iter().find(|r| r.key.as_deref() == Some(key)).unwrap().header("vigil.dead_letter.reason");
    assert_eq!(reason_of(b"car-9999"), Some(&b"implausible_event_time"[..]));
    assert_eq!(reason_of(b"car-huge"), Some(&b"too_long"[..]));
    let garbage = dead.iter().find(|r| r.key.as_deref() == Some(&b"car-x"[..])).unwrap();
    assert_eq!(garbage.payload, b"{\"not\": \"protobuf\"}", "the original bytes");
    assert_eq!(garbage.header("vigil.dead_letter.reason"), Some(&b"not_a_sensor_reading"[..]));
    assert_eq!(garbage.header("vigil.dead_letter.source_topic"), Some(READINGS.as_bytes()));
    assert!(garbage.header("vigil.dead_letter.source_offset").is_some());
    assert_eq!(
        garbage.header("traceparent"),
        Some(&b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"[..]),
        "trace context carried"
    );
    let range = dead.iter().find(|r| r.key.as_deref() == Some(out_of_range.device_id.as_bytes())).unwrap();
    assert_eq!(range.header("vigil.dead_letter.reason"), Some(&b"out_of_range"[..]));
    let error = String::from_utf8(range.header("vigil.dead_letter.error").unwrap().to_vec()).unwrap();
    assert!(error.contains("speed"), "{error}");

    let total = good.len();
    let scored = read(&kafka, SCORES, move |r| r.len() >= total).await;
    assert_eq!(distinct(&scored), total, "the valid readings around them are scored");
    eventually(Duration::from_secs(10), "dead letters counted", async || {
        processor.metric("processor_dead_lettered_total").await == 4.0
    })
    .await;
    processor.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_kafka_refuses_for_good_is_dead_lettered_and_the_partition_goes_on() {
    let kafka = kafka();
    let models = tempfile::tempdir().unwrap();
    // The latest version, 3, flags every reading: each gets a score and an anomaly record.
    let server = ModelServer::start(&[&three_versions(models.path())]).await;
    let mut config = config(&kafka, &[server.grpc]);
    config.output_format = stream_processor::config::OutputFormat::Json;
    // Records over 1,000 bytes (the least limit librdkafka takes) are refused for good: an
    // anomaly record in JSON (score and reading) is larger, a score record is not.
    config.producer.insert("message.max.bytes".into(), "1000".into());
    let processor = Processor::start(config).await;
    let readings = fleet_readings(3, 4, 11);
    produce_readings(&kafka, &readings).await;

    let total = readings.len();
    let scored = read(&kafka, SCORES, move |r| r.len() >= total).await;
    let readings_scored: std::collections::BTreeSet<(String, u64)> = scored
        .iter()
        .map(|record| {
            let score: serde_json::Value = serde_json::from_slice(&record.payload).unwrap();
            (score["device_id"].as_str().unwrap().to_owned(), score["sequence"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(readings_scored.len(), total, "every reading is scored: nothing blocked its partition");
    let dead = read(&kafka, DEAD_LETTERS, move |r| r.len() >= total).await;
    assert_eq!(dead.len(), total, "one dead letter per refused anomaly record");
    for letter in &dead {
        assert_eq!(letter.header("vigil.dead_letter.reason"), Some(&b"record_too_large"[..]));
        assert_eq!(letter.header("vigil.dead_letter.target_topic"), Some(ANOMALIES.as_bytes()));
        assert!(letter.payload.is_empty(), "too large to carry");
        let bytes: usize =
            std::str::from_utf8(letter.header("vigil.dead_letter.payload_bytes").unwrap()).unwrap().parse().unwrap();
        assert!(bytes > 900, "{bytes}");
    }
    eventually(Duration::from_secs(10), "the dead letters counted by reason", async || {
        processor.metric("processor_dead_lettered_total").await == total as f64
    })
    .await;
    processor.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_server_outage_pauses_the_partitions_and_loses_nothing() {
    let kafka = kafka();
    let server = ModelServer::start(&[]).await;
    let relay = embedded_brokers::Outage::relay_to(server.grpc.port()).await.unwrap();
    let relay_address: std::net::SocketAddr = ([127, 0, 0, 1], relay.port).into();
    let mut config = config(&kafka, &[relay_address]);
    config.max_in_flight_per_partition = 8;
    config.model.timeout_ms = 300;
    let processor = Processor::start(config).await;
    let readings = fleet_readings(20, 30, 7);
    let (before, during) = readings.split_at(200);
    produce_readings(&kafka, before).await;
    let first = before.len();
    read(&kafka, SCORES, move |r| r.len() >= first).await;

    let outage = relay.happen(Duration::from_secs(4));
    let producing = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        produce_readings(&kafka, during).await;
        // While the model server is away: partitions fill their bound and are paused,
        // readings wait and are tried again.
        eventually(Duration::from_secs(3), "partitions paused during the outage", async || {
            processor.metric("processor_paused_partitions").await > 0.0
        })
        .await;
    };
    tokio::join!(outage, producing);
    assert!(processor.metric("processor_model_backoffs_total").await > 0.0, "scoring was retried");

    let total = readings.len();
    let records = read(&kafka, SCORES, move |r| distinct(r) >= total).await;
    assert_eq!(distinct(&records), total, "every reading scored after the outage");
    assert_first_scores_in_order(&records);
    assert_eq!(processor.metric("processor_dead_lettered_total").await, 0.0, "nothing dead-lettered");
    eventually(Duration::from_secs(5), "partitions resumed", async || {
        processor.metric("processor_paused_partitions").await == 0.0
    })
    .await;
    processor.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_processor_joining_takes_partitions_without_loss_or_reordering() {
    let kafka = kafka();
    let server = ModelServer::start(&[]).await;
    let config = config(&kafka, &[server.grpc]);
    let first = Processor::start(config.clone()).await;
    let readings = fleet_readings(40, 40, 9);
    let (early, late) = readings.split_at(readings.len() / 2);
    produce_readings(&kafka, early).await;
    let count = early.len();
    read(&kafka, SCORES, move |r| r.len() >= count / 2).await;
    // Lag comes with librdkafka's statistics (every 5 s): the first owns every partition.
    eventually(Duration::from_secs(30), "the first processor's lag on every partition", async || {
        lag_partitions(&first).await.len() == PARTITIONS as usize
    })
    .await;
    let second = Processor::start(config).await;
    eventually(Duration::from_secs(30), "the partitions split between the two", async || {
        first.metric("processor_assigned_partitions").await > 0.0
            && second.metric("processor_assigned_partitions").await > 0.0
    })
    .await;
    // Each reports lag for its own partitions only: none keeps a revoked partition's
    // last value (the dashboard takes the max over instances).
    eventually(Duration::from_secs(30), "each processor's lag series to be its own partitions", async || {
        let (mine, theirs) = (lag_partitions(&first).await, lag_partitions(&second).await);
        mine.len() == first.metric("processor_assigned_partitions").await as usize
            && theirs.len() == second.metric("processor_assigned_partitions").await as usize
            && mine.is_disjoint(&theirs)
    })
    .await;
    produce_readings(&kafka, late).await;
    let total = readings.len();
    let records = read(&kafka, SCORES, move |r| distinct(r) >= total).await;
    assert_eq!(distinct(&records), total, "every reading scored");
    let repeats = records.len() - total;
    assert_first_scores_in_order(&records);
    let (by_first, by_second) =
        (first.metric("processor_scores_total").await, second.metric("processor_scores_total").await);
    assert!(by_second > 0.0, "the newcomer scored readings ({by_first} + {by_second})");
    // Revoked partitions finish their in-flight work and commit before they move, so
    // repeats come only from a commit that did not land: the mock cluster refuses
    // OffsetCommit while the group is joining (Kafka accepts it from the current
    // generation), and then the last auto-commit (100 ms before) is where the newcomer
    // starts. At most an in-flight window per partition plus one commit interval.
    let bound = PARTITIONS as usize * 32 * 2;
    eprintln!("repeats across the rebalance: {repeats} (bound {bound})");
    assert!(repeats <= bound, "{repeats} repeats: more than the in-flight windows and a commit interval");
    first.stop().await;
    second.stop().await;
    server.stop().await;
}

/// The partitions a processor reports `processor_consumer_lag` for.
async fn lag_partitions(processor: &Processor) -> std::collections::BTreeSet<String> {
    let page = processor.admin.metrics().await;
    page.lines()
        .filter(|line| line.starts_with("processor_consumer_lag{"))
        .filter_map(|line| line.split("partition=\"").nth(1)?.split('"').next().map(str::to_owned))
        .collect()
}

/// Each device's readings were first scored in sequence order (repeats, allowed after a
/// crash or rebalance, are skipped).
fn assert_first_scores_in_order(records: &[embedded_brokers::ReadRecord]) {
    for (device, sequences) in sequences_by_device(records) {
        let mut seen = BTreeSet::new();
        let first_seen: Vec<u64> = sequences.into_iter().filter(|s| seen.insert(*s)).collect();
        assert!(first_seen.windows(2).all(|w| w[0] < w[1]), "{device}: out of order");
    }
}
