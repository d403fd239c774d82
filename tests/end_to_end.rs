//! The whole fleet end to end, as `vigil up` runs it (embedded MQTT broker and Kafka
//! cluster, model server on the bundled model, stream processor, ingest, a simulated
//! fleet with injected faults, all on loopback):
//!
//! - the README's default run (50 cars, 60 s, seed 42): every published reading is
//!   acknowledged, ingested and scored exactly once, each device's scores are in order,
//!   and the bundled model flags the injected faults with precision and recall >= 0.9;
//! - the `vigil` binary stopped with Ctrl-C (SIGINT) instead of a duration: the simulator
//!   stops first, the pipeline drains, and the summary it writes still reconciles.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vigil::up::{UpOptions, up};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_run_scores_every_reading_once_in_order_and_catches_the_faults() {
    // Exactly what `cargo run --release -p vigil -- up` runs, without the live view and
    // with the model server on a free port. The fleet's readings depend only on the seed,
    // so this is the README's run.
    let options = UpOptions { live: false, model_server_port: 0, processor_grpc_port: 0, ..UpOptions::default() };
    let (cars, seconds) = (options.cars as u64, options.duration.unwrap().as_secs());
    let summary = up(options, std::future::pending()).await.unwrap();
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
    let (precision, recall) = (summary.precision.unwrap(), summary.recall.unwrap());
    assert!(precision >= 0.9, "precision {precision}");
    assert!(recall >= 0.9, "recall {recall}");
}

/// The `vigil` binary, its stdout read line by line on a thread.
struct Vigil {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Vigil {
    fn up(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vigil"))
            .arg("up")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("vigil starts");
        let stdout = child.stdout.take().unwrap();
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("vigil| {line}");
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines, seen: Vec::new() }
    }

    /// Reads lines until one satisfies `wanted`, or panics after `limit`.
    fn wait_for(&mut self, limit: Duration, what: &str, wanted: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = wanted(&line);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => panic!("waited {} s for {what}", limit.as_secs()),
            }
        }
    }

    fn interrupt(&self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("SIGINT sent");
    }

    /// Waits for the process to exit (killing it after `limit`) and reads the rest of its output.
    fn exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.seen.extend(self.lines.iter());
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("vigil did not exit within {} s of Ctrl-C", limit.as_secs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Vigil {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let mut vigil = Vigil::up(&[
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
    vigil.wait_for(Duration::from_secs(180), "the fleet to start", |line| line.starts_with("running until Ctrl-C"));
    vigil.wait_for(Duration::from_secs(60), "readings to be scored", |line| scored(line).is_some_and(|n| n >= 50));
    vigil.interrupt();
    let status = vigil.exit(Duration::from_secs(180));
    assert!(status.success(), "vigil exits 0 when the counts reconcile: {status}");
    let said = |text: &str| vigil.seen.iter().any(|line| line.contains(text));
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
