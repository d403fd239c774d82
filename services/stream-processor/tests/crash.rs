//! The `stream-processor` binary killed mid-stream (SIGKILL: no drain, no commit) and
//! started again: scoring resumes within the session timeout and a rebalance, every reading is scored, and
//! the repeats are bounded by what was in flight plus what was confirmed since the last
//! commit. Kafka is the in-process mock
//! cluster and the model server runs in this process; the processor is a real process.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::*;
use test_support::{ChildService, Endpoint, Output, eventually};

const IN_FLIGHT: usize = 16;

/// The `stream-processor` binary, its admin endpoint on the port it picked (killed when
/// dropped, so a failed assertion leaves nothing consuming).
struct ProcessorProcess {
    process: ChildService,
    admin: Endpoint,
}

impl ProcessorProcess {
    /// Scoring through the model server at `model`, or embedded (`None`).
    fn start(kafka: &embedded_brokers::KafkaCluster, model: Option<std::net::SocketAddr>) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_stream-processor"));
        match model {
            Some(model) => {
                command.args(["--model-endpoints", &format!("http://{model}")]);
            }
            None => {
                command.env("PROCESSOR_MODEL__MODE", "embedded").env("PROCESSOR_MODEL__MODEL_DIR", bundled_model_dir());
            }
        }
        command
            .args(["--kafka-brokers", kafka.bootstrap_servers(), "--admin-listen", "127.0.0.1:0"])
            .args(["--grpc-listen", "127.0.0.1:0"])
            .args(["--group-id", "crash-test"])
            .env("PROCESSOR_MAX_IN_FLIGHT_PER_PARTITION", IN_FLIGHT.to_string())
            .env("PROCESSOR_CONSUMER__SESSION_TIMEOUT_MS", "6000")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        let mut process = ChildService::spawn("processor", command, Output::Stderr);
        let admin = Endpoint::new(process.logged_address("serving /live", Duration::from_secs(60)));
        Self { process, admin }
    }

    async fn scored(&self) -> f64 {
        self.admin.metric_sum("processor_scores_total").await
    }
}

test_both_scorings!(killed_and_restarted:
    a_killed_processor_loses_no_reading_and_repeats_at_most_its_window,
    a_killed_embedded_processor_loses_no_reading_and_repeats_at_most_its_window);

/// The kill and restart of the processor binary.
async fn killed_and_restarted(scoring: Scoring) {
    let (kafka, _, server) = scoring.setup().await;
    let model = server.as_ref().map(|s| s.grpc);
    let readings = fleet_readings(50, 60, 13);
    let total = readings.len();
    // Readings arrive steadily while the processor runs, is killed and comes back.
    let started = Instant::now();
    let producing = {
        let (servers, readings) = (kafka.bootstrap_servers().to_owned(), readings.clone());
        tokio::spawn(async move {
            let producer = test_support::kafka::producer(&servers);
            for chunk in readings.chunks(10) {
                write_readings(&producer, READINGS, chunk.iter().map(|reading| (reading, None))).await;
                // Pacing, not waiting: the stream keeps arriving while the processor dies
                // (over 6 s: the processor keeps up with it, so it must still be arriving
                // when the processor is killed, or the restarted one has nothing to do).
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let first = ProcessorProcess::start(&kafka, model);
    eventually(Duration::from_secs(60), "scores flowing before the kill", || async { first.scored().await >= 600.0 })
        .await;
    // How fast it confirms outputs (and stores offsets) just before the kill: while it
    // catches up on the readings written before it had its partitions, ten times as fast
    // as they arrive.
    let (before, sampled) = (first.scored().await, Instant::now());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let scoring_rate = (first.scored().await - before) / sampled.elapsed().as_secs_f64();
    assert!(!producing.is_finished(), "the readings were all written before the kill: nothing tests the restart");
    first.process.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted = Instant::now();
    let second = ProcessorProcess::start(&kafka, model);
    // librdkafka's mock cluster does not hand a restarted static member its predecessor's
    // partitions (it waits out the dead member's session, 6 s by default, then rebalances),
    // so this bound is that plus the mock's rebalance; the 10 s of a broker that does
    // (tansu, Kafka) is checked by tests/pipeline_faults.rs. librdkafka's own default
    // session (45 s) would fail it.
    eventually(Duration::from_secs(60), "scoring again after the restart", || async { second.scored().await > 0.0 })
        .await;
    let recovery = restarted.elapsed();
    eprintln!("scoring resumed {:.1} s after the restart", recovery.as_secs_f64());
    assert!(recovery <= Duration::from_secs(20), "scoring resumed {recovery:?} after the restart (bound: 20 s)");
    producing.await.unwrap();
    let arrival_rate = total as f64 / started.elapsed().as_secs_f64();

    let records = read(&kafka, SCORES, move |r| distinct(r) >= total).await;
    assert_eq!(distinct(&records), total, "every reading scored after the crash");
    let repeats = records.len() - total;
    // Lost with the process: what was in flight (its outputs may be written, its
    // offset not committed) and what was confirmed since the last auto-commit: one
    // interval (100 ms) plus the commit's own round trip, which on a loaded 2-core
    // machine (this test, the processor, the model server and the mock cluster) was
    // seen to take longer than another interval; 0.5 s of scoring in all, at the rate it
    // scored just before the kill. (The readings' average arrival rate, used before,
    // counts the time the group took to recover too, and so shrank as that grew.)
    let rate = scoring_rate.max(arrival_rate);
    let bound = PARTITIONS as usize * IN_FLIGHT + (rate * 0.5).ceil() as usize;
    eprintln!(
        "{repeats} repeats after the crash (bound {bound}; scoring {scoring_rate:.0}/s before the kill, \
         readings arriving {arrival_rate:.0}/s on average)"
    );
    assert!(repeats <= bound, "{repeats} repeats exceed the in-flight windows plus a commit interval ({bound})");

    // A graceful stop drains and exits cleanly.
    assert!(second.process.terminate(Duration::from_secs(60)).success(), "SIGTERM: a clean exit");
    if let Some(server) = server {
        server.stop().await;
    }
}
