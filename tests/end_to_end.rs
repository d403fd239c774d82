//! The whole fleet end to end, as `vigil up` runs it (embedded MQTT broker and Kafka
//! cluster, model server on the bundled model, stream processor, ingest, a simulated
//! fleet with injected faults, all on loopback):
//!
//! - the README's default run (50 cars, 60 s, seed 42): every published reading is
//!   acknowledged, ingested and scored exactly once, each device's scores are in order,
//!   and the bundled model meets issue 27's targets (precision >= 0.99, recall >= 0.95,
//!   every faulty car caught, no false alarm, median onset to first anomaly under 5 s);
//!   the alerts service fires exactly the alerts its rule gives on the scores the run
//!   produced (recounted here from the score records), once each, and only on cars with
//!   an injected fault;
//! - `--mqtt proxy`: the cars connect to ingest's MQTT proxy, no MQTT broker runs, and
//!   the counts reconcile all the same;
//! - the `vigil` binary stopped with Ctrl-C (SIGINT) instead of a duration: the simulator
//!   stops first, the pipeline drains, and the summary it writes still reconciles.

use std::process::{Command, Stdio};
use std::time::Duration;

use std::collections::{BTreeMap, HashMap};

use test_support::{ChildService, Output};
use vigil::observe::Observed;
use vigil::up::{Finished, MqttMode, UpOptions, up};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_run_scores_every_reading_once_in_order_and_catches_the_faults() {
    // Exactly what `cargo run --release -p vigil -- up` runs, without the live view and
    // with the model server on a free port. The fleet's readings depend only on the seed,
    // so this is the README's run.
    let options = UpOptions { live: false, model_server_port: 0, processor_grpc_port: 0, ..UpOptions::default() };
    let (cars, seconds) = (options.cars as u64, options.duration.unwrap().as_secs());
    let rule = options.alert_rules[0].clone();
    let Finished { summary, observed } = up(options, std::future::pending()).await.unwrap();
    println!("{}", summary.render());
    assert!(summary.drained, "the pipeline scored everything within the drain limit");
    assert!(summary.published >= cars * (seconds - 5), "the fleet published for the whole run: {}", summary.published);
    assert_eq!(summary.acknowledged, summary.published, "the broker acknowledged every reading");
    assert_eq!(summary.ingested, summary.published, "every reading on the readings topic");
    assert_eq!(summary.dead_lettered, 0);
    assert_eq!(summary.scored, summary.ingested, "every reading scored");
    assert_eq!(summary.score_records, summary.scored, "none scored twice");
    assert!(summary.out_of_order.is_empty(), "scores out of order: {:?}", summary.out_of_order);
    assert!(summary.reconciled);
    assert!(summary.faulty_readings > 500, "faults were injected: {}", summary.faulty_readings);
    assert_eq!(summary.recall_by_fault.len(), 6, "every fault kind was injected: {:?}", summary.recall_by_fault);
    let per_fault = &summary.per_fault;
    assert_eq!(per_fault.by_fault.len(), 6, "judged per fault kind: {per_fault:?}");
    let faulty_cars: usize = per_fault.by_fault.values().map(|d| d.cars).sum();
    assert_eq!(faulty_cars, summary.faulty_cars, "each faulty car under its one fault");
    assert_eq!(per_fault.healthy_cars + faulty_cars, summary.cars);
    assert!(per_fault.by_fault.values().all(|d| d.caught <= d.cars && d.alerted <= d.cars));
    // Issue 27's targets for this run, met by the windowed v3 (2026-12-06: precision
    // 1.000, recall 0.961, 32 of 812 faulty readings missed, most in a fault's first
    // seconds).
    let (precision, recall) = (summary.precision.unwrap(), summary.recall.unwrap());
    assert!(precision >= 0.99, "precision {precision}");
    assert!(recall >= 0.95, "recall {recall}");
    assert_eq!(summary.confusion.false_positives, 0, "no false alarm on a healthy car");
    for (kind, detection) in &per_fault.by_fault {
        assert_eq!(detection.caught, detection.cars, "every car with {kind} caught: {detection:?}");
    }
    let median = per_fault.all_faults.onset_to_anomaly_p50_s.unwrap();
    assert!(median < 5.0, "median {median} s from a fault's onset to its car's first anomaly");

    // Alerts: the demo rule is per car, tumbling windows, a count of anomalies.
    assert_eq!(
        (rule.advance_seconds, rule.mean_score_above, rule.max_score_above, rule.min_readings),
        (None, None, None, None)
    );
    assert!(summary.alerts_settled, "the alerts service read every score");
    assert_eq!(summary.alerts_dead_lettered, 0);
    assert_eq!(summary.alert_late_readings, 0, "no reading came after its window closed (the recount assumes it)");
    assert_eq!(summary.alert_records, summary.alerts, "each alert written once");
    assert!(summary.alerts > 0, "faults under way for tens of seconds fire the rule");
    assert_eq!(summary.alerted_faulty_cars, summary.alerted_cars, "no alert on a car without a fault");
    let expected =
        recount_alerts(&observed, rule.window_seconds, rule.allowed_lateness_seconds, rule.min_anomalies.unwrap());
    let fired: BTreeMap<String, (u64, u64)> =
        observed.alerts.values().map(|alert| (alert.id.clone(), (alert.readings, alert.anomalies))).collect();
    assert_eq!(fired, expected, "alerts (id -> readings, anomalies) against the recount from the score records");
    for alert in observed.alerts.values() {
        assert_eq!(alert.rule, rule.name);
        assert_eq!(alert.model_versions, [3], "the bundled model's newest version scored every reading");
        let window = |t: &Option<prost_types::Timestamp>| t.as_ref().unwrap().seconds;
        assert_eq!(window(&alert.window_end) - window(&alert.window_start), rule.window_seconds as i64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_mqtt_proxy_the_cars_publish_to_ingest_itself_and_every_reading_is_scored() {
    let options = UpOptions {
        live: false,
        model_server_port: 0,
        processor_grpc_port: 0,
        mqtt: MqttMode::Proxy,
        cars: 10,
        duration: Some(Duration::from_secs(15)),
        ..UpOptions::default()
    };
    let Finished { summary, .. } = up(options, std::future::pending()).await.unwrap();
    println!("{}", summary.render());
    assert!(summary.mqtt.contains("ingest's MQTT proxy"), "no broker: {}", summary.mqtt);
    assert!(summary.published >= 100, "{}", summary.published);
    assert_eq!(summary.acknowledged, summary.published, "ingest acknowledged every reading");
    assert_eq!(summary.ingested, summary.published, "every reading on the readings topic");
    assert_eq!(summary.scored, summary.ingested, "every reading scored");
    assert_eq!(summary.score_records, summary.scored, "none scored twice");
    assert!(summary.out_of_order.is_empty(), "scores out of order: {:?}", summary.out_of_order);
    assert!(summary.reconciled && summary.drained);
}

/// The alerts a per-car count rule on tumbling windows must fire, recounted from the
/// distinct score records: `id -> (readings, anomalies)` of every window with at least
/// `min_anomalies` that closed before the run ended, that is, whose end plus the
/// lateness was reached by the latest event time on its scores partition.
fn recount_alerts(
    observed: &Observed,
    window_s: u64,
    lateness_s: u64,
    min_anomalies: u64,
) -> BTreeMap<String, (u64, u64)> {
    let (window, lateness) = (window_s as i64 * 1000, lateness_s as i64 * 1000);
    let mut stream_time: HashMap<i32, i64> = HashMap::new();
    let mut windows: BTreeMap<(String, i64), (i32, u64, u64)> = BTreeMap::new();
    for reading in &observed.scored_readings {
        let latest = stream_time.entry(reading.partition).or_insert(i64::MIN);
        *latest = (*latest).max(reading.event_time_ms);
        let start = reading.event_time_ms.div_euclid(window) * window;
        let (_, readings, anomalies) =
            windows.entry((reading.device_id.clone(), start)).or_insert((reading.partition, 0, 0));
        *readings += 1;
        *anomalies += u64::from(reading.is_anomaly);
    }
    windows
        .into_iter()
        .filter(|((_, start), (partition, _, anomalies))| {
            *anomalies >= min_anomalies && stream_time[partition] >= start + window + lateness
        })
        .map(|((device, start), (_, readings, anomalies))| {
            (format!("{device}/repeated-anomalies/{start}"), (readings, anomalies))
        })
        .collect()
}

/// `vigil up <args>` as a child process, its stdout (the live view and the summary) read
/// line by line; killed when dropped.
fn vigil_up(args: &[&str]) -> ChildService {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vigil"));
    command.arg("up").args(args).stderr(Stdio::inherit());
    ChildService::spawn("vigil", command, Output::Stdout)
}

/// The scored count on a live-view progress line (`[  12 s] published ... | scored   340 (...`).
fn scored(line: &str) -> Option<u64> {
    let rest = line.strip_prefix('[')?.split("| scored").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn ctrl_c_stops_the_fleet_first_then_drains_so_the_summary_reconciles() {
    let dir = tempfile::tempdir().unwrap();
    let summary_path = dir.path().join("summary.json");
    let summary_file = summary_path.to_str().unwrap();
    let mut vigil = vigil_up(&[
        "--duration",
        "0",
        "--cars",
        "10",
        "--model-server-port",
        "0",
        "--processor-grpc-port",
        "0",
        "--summary-json",
        summary_file,
    ]);
    vigil
        .wait_for_line(Duration::from_secs(180), "the fleet to start", |line| line.starts_with("running until Ctrl-C"));
    vigil.wait_for_line(Duration::from_secs(60), "readings to be scored", |line| scored(line).is_some_and(|n| n >= 50));
    vigil.interrupt();
    let status = vigil.wait_exit(Duration::from_secs(180));
    assert!(status.success(), "vigil exits 0 when the counts reconcile: {status}");
    let said = |text: &str| vigil.seen().iter().any(|line| line.contains(text));
    assert!(said("stopping: the simulator stops first"), "Ctrl-C was acknowledged");
    assert!(said("simulator stopped:"), "the simulator stopped before the drain");
    assert!(said("counts reconcile"), "the printed summary reconciles");

    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap()).unwrap();
    let count = |key: &str| summary[key].as_u64().unwrap_or_else(|| panic!("{key} in {summary}"));
    assert!(count("published") >= 50, "{summary}");
    assert_eq!(count("acknowledged"), count("published"));
    assert_eq!(count("ingested"), count("published"));
    assert_eq!(count("scored"), count("published"));
    assert_eq!(summary["reconciled"], true);
    assert_eq!(summary["drained"], true);
}
