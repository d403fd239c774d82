//! The `vigil export-readings` binary against librdkafka's mock cluster and, from
//! tests/system/pipeline_faults.sh, against tansu (a real broker answers the range's start
//! by timestamp, where the mock cluster makes the reader start at the beginning): exactly
//! the readings whose Kafka timestamps fall in `[--from, --to)` are written, from every
//! partition, in the simulator's JSON-lines format (they parse back to the readings that
//! were sent); a record that is not a reading is skipped and counted; a range over
//! `--max-readings`, a bad time and a missing topic exit 2 with a message naming the cause
//! and leave no file behind.

use std::path::Path;
use std::process::{Command, Output};
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use prost::Message as _;
use rdkafka::producer::FutureRecord;
use sensor::SensorReading;
use sensor::json::Envelope;
use test_support::kafka::{produce, producer};

fn reading(device: usize, sequence: u64) -> SensorReading {
    SensorReading {
        device_id: format!("car-{device:05}"),
        sequence,
        event_time: Some(prost_types::Timestamp { seconds: 1_790_000_000 + sequence as i64, nanos: 0 }),
        coolant_temp: 88.5 + sequence as f32,
        speed: 12.25,
        battery_percentage: 71.0,
        fault: sensor::FaultKind::None as i32,
        ..Default::default()
    }
}

fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms).unwrap().to_rfc3339()
}

fn export(brokers: &str, topic: &str, from: &str, to: &str, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["export-readings", "--kafka-brokers", brokers, "--topic", topic, "--from", from, "--to", to, "--out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_range_of_the_readings_topic_is_written_as_the_simulators_json_lines() {
    let kafka = embedded_brokers::KafkaCluster::start(1).unwrap();
    kafka.create_topic("vigil-readings", 3).unwrap();
    exports_a_time_range(kafka.bootstrap_servers(), "vigil-readings").await;

    // A topic that does not exist (here only: a broker that creates topics when asked for
    // them would make one).
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("none.jsonl");
    let output =
        tokio::task::block_in_place(|| export(kafka.bootstrap_servers(), "no-such-readings", "-1h", "now", &out, &[]));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no-such-readings") && stderr.contains("does not exist"), "{stderr}");
    assert!(!out.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tansu: VIGIL_TANSU_BROKERS (tests/system/pipeline_faults.sh)"]
async fn a_time_range_of_the_readings_topic_on_tansu_is_written_as_the_simulators_json_lines() {
    let brokers = std::env::var("VIGIL_TANSU_BROKERS").expect("VIGIL_TANSU_BROKERS");
    let topic = format!("export-readings-{}", std::process::id());
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", &brokers);
    let spec = kafka::TopicSpec { partitions: 3, compacted: false };
    let ensured = kafka::ensure_topic(&config, &topic, spec).await.unwrap();
    assert_eq!(ensured.partitions, 3, "{topic} created on tansu");
    exports_a_time_range(&brokers, &topic).await;
}

/// Writes 6 devices' readings (2 per partition of `topic`'s 3) before, in and after a
/// range, and a record that is not a reading inside it, then exports the range.
async fn exports_a_time_range(brokers: &str, topic: &str) {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as i64;
    let start = now - 60_000;
    // Every 2 s a reading of each device: 3 before the range, 5 in it, 2 after; and a
    // record that is not a reading inside it. In time order, as producers write them (a
    // partition is read up to its first record at or past the range's end).
    let mut records = vec![(0, start + 1_000, vec![0xff; 11])];
    let mut inside = Vec::new();
    for sequence in 0..10_u64 {
        for device in 0..6 {
            let reading = reading(device, sequence);
            if (3..8).contains(&sequence) {
                inside.push(reading.clone());
            }
            records.push((device, start + (sequence as i64 - 3) * 2_000, reading.encode_to_vec()));
        }
    }
    records.sort_by_key(|(_, at, _)| *at);
    inside.sort_by(|a, b| (&a.device_id, a.sequence).cmp(&(&b.device_id, b.sequence)));
    let keys: Vec<String> = records.iter().map(|(device, _, _)| format!("car-{device:05}")).collect();
    let producer = producer(brokers);
    produce(
        &producer,
        records
            .iter()
            .zip(&keys)
            .map(|((device, at, payload), key)| {
                FutureRecord::to(topic).key(key).payload(payload).partition((device % 3) as i32).timestamp(*at)
            })
            .collect(),
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("readings.jsonl");
    let (from, to) = (rfc3339(start), rfc3339(start + 10_000));
    let output = tokio::task::block_in_place(|| export(brokers, topic, &from, &to, &out, &[]));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("wrote 30 readings") && stderr.contains("1 records that are not a SensorReading skipped"),
        "{stderr}"
    );

    let envelope = Envelope { topic_device_id: None, received_at: SystemTime::now() };
    let text = std::fs::read_to_string(&out).unwrap();
    let mut written: Vec<SensorReading> =
        text.lines().map(|line| sensor::json::parse(line.as_bytes(), &envelope).unwrap()).collect();
    written.sort_by(|a, b| (&a.device_id, a.sequence).cmp(&(&b.device_id, b.sequence)));
    assert_eq!(written, inside);
    assert!(text.lines().all(|line| line.contains("\"fault\":\"none\"")), "the label travels: {text}");
    assert!(!dir.path().join("readings.jsonl.partial").exists());

    // Over --max-readings: exit 2, nothing left behind.
    let capped = dir.path().join("capped.jsonl");
    let output = tokio::task::block_in_place(|| export(brokers, topic, &from, &to, &capped, &["--max-readings", "7"]));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--max-readings 7"), "{stderr}");
    assert!(!capped.exists() && !dir.path().join("capped.jsonl.partial").exists());

    // A time that is not one, an empty range.
    let output = tokio::task::block_in_place(|| export(brokers, topic, "yesterday", &to, &capped, &[]));
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--from \"yesterday\" is not a time"));
    let output = tokio::task::block_in_place(|| export(brokers, topic, &to, &from, &capped, &[]));
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not before --to"));
}
