//! The `vigil replay` binary against a stream processor started in this process (mock
//! Kafka, a model server serving car-anomaly 1, 2 and 3, where 3 flags everything, and the
//! live processor pinned to 1, having scored a simulated fleet's readings): exit 0 and a
//! readable report for a good candidate, exit 1 naming each breached bound and its flag
//! for a bad one, `--json`, exit 2 for refusals and an unreachable processor; and `vigil
//! rollout start --require-replay-from` starting a rollout only when its replay passes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::Parser as _;
use prost::Message as _;
use rdkafka::producer::FutureRecord;
use serde_json::Value;
use test_support::kafka::{produce, producer, read_topic};
use tokio::sync::oneshot;

mod support;

use support::{Run, assert_unreachable, words};

const READINGS: &str = "vigil-readings";
const SCORES: &str = "vigil-scores";

#[derive(clap::Parser)]
struct ServeCli {
    #[command(flatten)]
    serve: model_server::config::ServeArgs,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A model config serving the bundled car-anomaly 1 and 2 and, as 3, the fixture whose
/// scores are all over the threshold.
fn three_versions(dir: &Path) -> PathBuf {
    let base = dir.join("car-anomaly");
    std::fs::create_dir_all(&base).unwrap();
    for (from, version) in [
        ("deploy/models/car-anomaly/1", "1"),
        ("deploy/models/car-anomaly/2", "2"),
        ("tests/fixtures/savedmodels/car_anomaly_flags_everything/1", "3"),
    ] {
        let status = Command::new("cp").arg("-r").arg(root().join(from)).arg(base.join(version)).status().unwrap();
        assert!(status.success());
    }
    let config = dir.join("models.config");
    std::fs::write(&config, model_server::model_config::all_versions_config("car-anomaly", &base).unwrap()).unwrap();
    config
}

/// Kafka, the model server and the live processor, with 240 readings scored.
struct Stack {
    model_server: String,
    processor: String,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _kafka: embedded_brokers::KafkaCluster,
    _models: tempfile::TempDir,
}

impl Stack {
    async fn start() -> Self {
        let _ = tracing_subscriber::fmt().with_env_filter("warn").with_test_writer().try_init();
        let kafka = embedded_brokers::KafkaCluster::start(1).unwrap();
        for topic in [READINGS, SCORES, "vigil-anomalies"] {
            kafka.create_topic(topic, 4).unwrap();
        }
        kafka.create_topic("vigil-scoring-dead-letter", 1).unwrap();
        let models = tempfile::tempdir().unwrap();
        let flags =
            ["model-server".to_owned(), format!("--model_config_file={}", three_versions(models.path()).display())];
        let server_config = ServeCli::try_parse_from(flags).unwrap().serve.resolve().unwrap();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let model_server = grpc.local_addr().unwrap();
        let (stop_server, server_stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let listeners = model_server::server::Listeners { grpc, rest: None };
            model_server::server::run(server_config, listeners, async {
                let _ = server_stopped.await;
            })
            .await
            .unwrap();
        });

        let mut config = stream_processor::config::ProcessorConfig::default();
        config.kafka.insert("bootstrap.servers".into(), kafka.bootstrap_servers().into());
        config.consumer.insert("session.timeout.ms".into(), "6000".into());
        config.model.endpoints = vec![format!("http://{model_server}")];
        // The live model (unpinned requests would get the newest, the bad 3).
        config.model.version = Some(1);
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let processor = format!("http://{}", grpc.local_addr().unwrap());
        let (stop_processor, processor_stopped) = oneshot::channel::<()>();
        let listeners = stream_processor::Listeners { admin: None, grpc: Some(grpc) };
        let live = tokio::spawn(async move {
            stream_processor::run(config, listeners, async {
                let _ = processor_stopped.await;
            })
            .await
            .unwrap();
        });

        // History: a simulated fleet's readings, as ingest writes them.
        let options = device_simulator::fleet::FleetOptions {
            cars: 30,
            seed: 13,
            fault_share: 0.3,
            onset_window_s: (5.0, 60.0),
            ..Default::default()
        };
        // Two hours ago: within the processor's default event-time bounds of now.
        let start = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
        let mut fleet = device_simulator::fleet::Fleet::new(&options, start.into());
        let readings: Vec<_> = (0..8).flat_map(|_| fleet.step(1.0)).collect();
        let payloads: Vec<Vec<u8>> = readings.iter().map(|reading| reading.encode_to_vec()).collect();
        let records = readings
            .iter()
            .zip(&payloads)
            .map(|(reading, payload)| FutureRecord::to(READINGS).key(reading.device_id.as_str()).payload(payload))
            .collect();
        produce(&producer(&kafka), records).await;
        let total = readings.len();
        let scored = read_topic(&kafka, SCORES, Duration::from_secs(60), move |r| r.len() >= total).await;
        assert!(scored.len() >= total, "the live processor scored the history");
        Self {
            model_server: format!("http://{model_server}"),
            processor,
            stops: vec![stop_processor, stop_server],
            tasks: vec![live, server],
            _kafka: kafka,
            _models: models,
        }
    }

    async fn stop(self) {
        for (stop, task) in self.stops.into_iter().zip(self.tasks) {
            let _ = stop.send(());
            tokio::time::timeout(Duration::from_secs(60), task).await.unwrap().unwrap();
        }
    }
}

/// Runs `vigil <args>`, with `VIGIL_PROCESSOR` set when given.
async fn vigil(env_processor: Option<&str>, args: &[&str]) -> Run {
    let env: Vec<_> = env_processor.map(|processor| ("VIGIL_PROCESSOR", processor)).into_iter().collect();
    support::vigil(args, &env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vigil_replay_passes_a_good_candidate_and_fails_a_bad_one_naming_its_bounds() {
    let stack = Stack::start().await;
    let processor = stack.processor.as_str();
    let replay = |args: &[&str]| {
        let mut all = vec!["replay", "--processor", processor, "--from", "-10m"];
        all.extend_from_slice(args);
        let all: Vec<String> = all.into_iter().map(str::to_owned).collect();
        async move { vigil(None, &all.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };

    let good = replay(&["--version", "2", "--output-topic", "vigil-replay-cli-good"]).await;
    assert_eq!(good.code, 0, "{}", good.stderr);
    assert_eq!(good.field("verdict"), "passed");
    assert_eq!(good.field("candidate"), "car-anomaly version 2 against live version 1");
    assert!(good.field("readings").starts_with("240 replayed, 240 compared with their live scores, 0 failed"));
    assert_eq!(good.field("output topic"), "vigil-replay-cli-good");

    let bad = replay(&["--version", "3", "--output-topic", "vigil-replay-cli-bad"]).await;
    assert_eq!(bad.code, 1, "{}", bad.stderr);
    assert_eq!(bad.field("verdict"), "FAILED (3 of the bounds)");
    assert!(bad.field("anomaly rate").starts_with("candidate 1.0000, live "), "{}", bad.stdout);
    let breached: Vec<&str> = bad.stdout.lines().filter(|l| l.starts_with("  - ")).collect();
    assert_eq!(breached.len(), 3, "{}", bad.stdout);
    assert!(breached[0].ends_with("more than max_anomaly_rate_difference 0.05 (--max-anomaly-rate-difference)"));
    assert!(breached[1].ends_with("less than min_agreement 0.9 (--min-agreement)"), "{}", breached[1]);
    assert!(breached[2].ends_with("(--max-score-shift)"), "{}", breached[2]);

    // JSON, with a bound given, and the processor named by the environment.
    let json = vigil(
        Some(processor),
        &words(
            "replay --from -10m --to now --version 3 --output-topic vigil-replay-cli-json --min-agreement 0.01 --json",
        ),
    )
    .await;
    assert_eq!(json.code, 1, "{}", json.stderr);
    let report = json.json();
    assert_eq!((report["passed"].as_bool(), report["candidate_version"].as_i64()), (Some(false), Some(3)));
    assert_eq!((report["replayed"].as_u64(), report["live_versions"].clone()), (Some(240), serde_json::json!([1])));
    assert_eq!(report["bounds"]["min_agreement"], 0.01);
    assert_eq!(report["bounds"]["max_anomaly_rate_difference"], 0.05, "the processor's default");
    let reasons: Vec<&str> = report["reasons"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(reasons.len(), 2, "agreement 0.02 is now enough: {reasons:?}");

    // No report: exit 2 with the processor's words.
    let unserved = replay(&["--version", "9", "--output-topic", "vigil-replay-cli-unserved"]).await;
    assert_eq!(unserved.code, 2);
    assert!(
        unserved.stderr.starts_with("error: failed precondition: model car-anomaly version 9 is not served"),
        "{}",
        unserved.stderr
    );
    let live_topic = replay(&["--version", "2", "--output-topic", SCORES]).await;
    assert_eq!(live_topic.code, 2);
    assert!(
        live_topic
            .stderr
            .starts_with("error: invalid argument: output_topic: vigil-scores is the processor's scores topic"),
        "{}",
        live_topic.stderr
    );
    let bad_time = vigil(None, &["replay", "--processor", processor, "--from", "yesterday", "--version", "2"]).await;
    assert_eq!(bad_time.code, 2);
    assert!(bad_time.stderr.starts_with("error: --from \"yesterday\" is not a time"), "{}", bad_time.stderr);
    let unreachable =
        vigil(None, &["replay", "--processor", "http://127.0.0.1:1", "--from", "-1m", "--version", "2"]).await;
    assert_unreachable(&unreachable, 2, "stream processor", "http://127.0.0.1:1", "--processor", "VIGIL_PROCESSOR");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_start_with_a_required_replay_starts_only_a_candidate_that_passes() {
    let stack = Stack::start().await;
    let start = |canary: &'static str| {
        let (server, processor) = (stack.model_server.clone(), stack.processor.clone());
        async move {
            let line = format!(
                "rollout --server {server} start car-anomaly --stable 1 --canary {canary} --weight 10 \
                 --require-replay-from -10m --processor {processor}"
            );
            vigil(None, &words(&line)).await
        }
    };

    let refused = start("3").await;
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused
            .stderr
            .starts_with("error: the rollout was not started: the replay of version 3 failed (anomaly rate 1.0000"),
        "{}",
        refused.stderr
    );
    assert_eq!(refused.field("verdict"), "FAILED (3 of the bounds)", "the report is shown");
    let status = vigil(None, &["rollout", "--server", &stack.model_server, "list"]).await;
    assert_eq!((status.code, status.stdout.as_str()), (0, "no rollouts\n"), "nothing was started");

    let started = start("2").await;
    assert_eq!(started.code, 0, "{}", started.stderr);
    assert!(
        started.stderr.starts_with("replay passed: version 2 on 240 readings (240 compared)"),
        "{}",
        started.stderr
    );
    assert_eq!(started.field("phase"), "manual");
    assert_eq!(started.field("versions"), "stable 1 -> canary 2");
    stack.stop().await;
}
