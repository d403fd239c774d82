//! A device-id flood against the real `stream-processor` binary scoring the windowed
//! car-anomaly v3 embedded: readings that each come from a device never seen before, with
//! the longest id a reading may carry. The processor keeps windows for at most
//! `windows.max_devices_per_partition` devices per partition (least recently seen forgotten
//! first), so its memory stays flat: its resident size after the flood is compared with
//! its size after readings from a few devices (the same traffic otherwise). Every reading
//! is still scored, and no device id becomes a metric label. (With the bound lifted, the
//! same flood grew the processor by 123 MiB; with it, by 4 to 15 MiB over five runs.)

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;
use test_support::{ChildService, Endpoint, Output, eventually};

/// Readings from the few devices, before the flood: enough for the allocator and Kafka's
/// buffers to reach their working size.
const FEW_DEVICE_READINGS: usize = 40_000;
/// Readings in the flood, each from a new device: enough that unbounded windows would grow
/// the process far past the resident size's run-to-run noise (up to 13 MiB seen between
/// two points of the same traffic).
const FLOOD_READINGS: usize = 160_000;
/// Windows kept per partition.
const MAX_DEVICES: usize = 100;
/// How much the flood may grow the resident size over the few-device phase: about three
/// times the most seen with the bound, a third of the growth without it (123 MiB for
/// 160,000 windows of 10 readings with 256-byte ids).
const FLOOD_GROWTH_BOUND_MIB: u64 = 40;

/// A device id of `sensor::MAX_DEVICE_ID_BYTES`, unique per `n`.
fn long_id(n: usize) -> String {
    let id = format!("flood-{n:08}-");
    format!("{id}{}", "x".repeat(sensor::MAX_DEVICE_ID_BYTES - id.len()))
}

fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).expect("VmRSS in /proc status");
    line.trim().trim_end_matches("kB").trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_new_devices_keeps_the_windows_bounded_and_every_reading_scored() {
    let kafka = kafka();
    let mut command = Command::new(env!("CARGO_BIN_EXE_stream-processor"));
    command
        .env("PROCESSOR_MODEL__MODE", "embedded")
        .env("PROCESSOR_MODEL__MODEL_DIR", bundled_model_dir())
        .env("PROCESSOR_WINDOWS__MAX_DEVICES_PER_PARTITION", MAX_DEVICES.to_string())
        .args(["--kafka-brokers", kafka.bootstrap_servers(), "--admin-listen", "127.0.0.1:0"])
        .args(["--group-id", "device-flood"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let mut process = ChildService::spawn("processor", command, Output::Stderr);
    let admin = Endpoint::new(process.logged_address("serving /live", Duration::from_secs(60)));
    // Written a chunk at a time, each scored before the next: the mock cluster keeps only
    // the newest few MB of a partition, and a flood written all at once would lose its
    // oldest records before the processor read them.
    let write_paced = |readings: Vec<sensor::SensorReading>, already: usize| {
        let (kafka, admin) = (&kafka, &admin);
        async move {
            for (n, chunk) in readings.chunks(2_000).enumerate() {
                produce_readings(kafka, chunk).await;
                let written = already + n * 2_000 + chunk.len();
                eventually(Duration::from_secs(60), &format!("{written} readings scored"), || async {
                    admin.metric_sum("processor_scores_total").await >= written as f64
                })
                .await;
            }
        }
    };

    // Real readings of a simulated fleet, 50 cars; phase one renamed to 50 long ids, phase
    // two to a new long id each.
    let fleet = fleet_readings(50, FLOOD_READINGS / 50, 23);
    let few: Vec<_> = fleet[..FEW_DEVICE_READINGS]
        .iter()
        .map(|reading| {
            let car: usize = reading.device_id.trim_start_matches(|c: char| !c.is_ascii_digit()).parse().unwrap();
            sensor::SensorReading { device_id: long_id(1_000_000 + car), ..reading.clone() }
        })
        .collect();
    let flood: Vec<_> = fleet
        .iter()
        .enumerate()
        .map(|(n, reading)| sensor::SensorReading { device_id: long_id(n), ..reading.clone() })
        .collect();

    write_paced(few.clone(), 0).await;
    let devices = admin.metric_sum("processor_window_devices").await;
    assert_eq!(devices, 50.0, "one window per device");
    let before = resident_kib(process.id());

    write_paced(flood.clone(), few.len()).await;
    let after = resident_kib(process.id());
    let devices = admin.metric_sum("processor_window_devices").await;
    let cap = (MAX_DEVICES * PARTITIONS as usize) as f64;
    assert!(devices <= cap, "{devices} windows kept, more than {cap} ({MAX_DEVICES} per partition)");
    let grown_mib = after.saturating_sub(before) / 1024;
    eprintln!(
        "resident: {} MiB after 50 devices, {} MiB after {} new devices",
        before / 1024,
        after / 1024,
        flood.len()
    );
    assert!(grown_mib < FLOOD_GROWTH_BOUND_MIB, "the flood grew the processor by {grown_mib} MiB");

    let metrics = admin.metrics().await;
    assert!(!metrics.contains("flood-"), "a device id became a metric label");
    // Counted, not read back: the mock cluster has dropped the oldest scores by now.
    let total = (few.len() + flood.len()) as f64;
    assert_eq!(admin.metric_sum("processor_scores_total").await, total, "every reading scored once");
    assert_eq!(admin.metric_sum("processor_readings_consumed_total").await, total);
    assert_eq!(admin.metric_sum("processor_dead_lettered_total").await, 0.0, "none dead-lettered");
    assert!(process.is_running());
    assert!(process.terminate(Duration::from_secs(60)).success(), "SIGTERM: a clean exit");
}
