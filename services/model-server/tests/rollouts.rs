//! Canary rollouts driven through the `RolloutService` gRPC API, on the car-anomaly model
//! Vigil ships (versions 1 and 2) and a deliberately bad version 3 that flags every
//! reading (`tests/fixtures/savedmodels/car_anomaly_flags_everything`): the API's
//! lifecycle and its errors, shadow scoring that never leaks the canary's answer, the
//! automated analysis rolling the bad canary back under load with no failed request and
//! promoting the good one, and several replicas converging through the Kafka state topic
//! (librdkafka's mock cluster), with one of them running the analysis.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use embedded_brokers::KafkaCluster;
use pb::rollout_service_client::RolloutServiceClient;
use proto::tensorflow::serving::PredictRequest;
use proto::tensorflow::serving::model_spec::VersionChoice;
use proto::tensorflow::serving::prediction_service_client::PredictionServiceClient;
use proto::vigil::rollout::v1 as pb;
use serde_json::Value;
use support::*;
use test_support::kafka::read_topic;
use test_support::{metric, observe_until};
use tonic::Code;
use tonic::transport::Channel;

const MODEL: &str = "car-anomaly";

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A model config serving car-anomaly 1 and 2 (the bundled ones) and 3 (flags everything).
fn models_flag(dir: &Path) -> String {
    let base = dir.join(MODEL);
    for version in ["1", "2"] {
        copy_dir(&workspace().join("deploy/models/car-anomaly").join(version), &base.join(version));
    }
    copy_dir(&fixture_root("car_anomaly_flags_everything").join("1"), &base.join("3"));
    let config = dir.join("models.config");
    std::fs::write(&config, model_server::model_config::all_versions_config(MODEL, &base).unwrap()).unwrap();
    format!("--model_config_file={}", config.display())
}

/// TensorFlow-scored readings of every kind (healthy and each fault), with v1's scores.
struct Golden {
    readings: Vec<Value>,
    v1_scores: Vec<f32>,
    v1_threshold: f32,
}

fn golden() -> Golden {
    let text = std::fs::read_to_string(workspace().join("tests/fixtures/car_anomaly_golden.json")).unwrap();
    let golden: Value = serde_json::from_str(&text).unwrap();
    let v1 = &golden["versions"]["1"];
    Golden {
        readings: golden["readings"].as_array().unwrap().clone(),
        v1_scores: v1["anomaly_score"].as_array().unwrap().iter().map(|s| s.as_f64().unwrap() as f32).collect(),
        v1_threshold: v1["threshold"].as_f64().unwrap() as f32,
    }
}

/// A one-row Predict of `reading`, unpinned unless `version`, with routing key `key`.
fn predict(reading: &Value, version: Option<i64>, key: &str) -> tonic::Request<PredictRequest> {
    let inputs = reading
        .as_object()
        .unwrap()
        .iter()
        .filter_map(|(name, value)| Some((name.clone(), float_tensor(&[1], &[value.as_f64()? as f32]))))
        .filter(|(name, _)| !["control_unit_firmware", "fault", "sequence"].contains(&name.as_str()))
        .collect();
    let mut request = tonic::Request::new(PredictRequest {
        model_spec: spec(MODEL, version, None, ""),
        inputs,
        output_filter: vec![],
    });
    request.metadata_mut().insert(canary::ROUTING_KEY_METADATA, key.parse().unwrap());
    request
}

/// (version that answered, anomaly score, threshold) of one Predict.
async fn answer(client: &mut PredictionServiceClient<Channel>, reading: &Value, key: &str) -> (i64, f32, f32) {
    let response = client.predict(predict(reading, None, key)).await.expect("a rollout never fails a request");
    let response = response.into_inner();
    let version = match response.model_spec.unwrap().version_choice {
        Some(VersionChoice::Version(v)) => v,
        other => panic!("no version in the response: {other:?}"),
    };
    (version, response.outputs["anomaly_score"].float_val[0], response.outputs["threshold"].float_val[0])
}

fn spec_of(stable: i64, canary: i64, weight: f64, analysis: Option<pb::Analysis>) -> pb::StartRolloutRequest {
    pb::StartRolloutRequest {
        spec: Some(pb::RolloutSpec {
            model: MODEL.into(),
            stable_version: stable,
            canary_version: canary,
            canary_weight_percent: weight,
            shadow_percent: 0.0,
            analysis,
        }),
    }
}

/// Quick checks: every second, from 30 requests and rows a side. Latency here is noise (a
/// debug build sharing two cores with other tests), so its bound is wide; the scores are
/// what these tests are about.
fn quick_analysis() -> pb::Analysis {
    pb::Analysis {
        step_weights_percent: vec![20.0, 50.0],
        interval_seconds: 1,
        failure_limit: 2,
        min_samples: 30,
        max_latency_p99_ratio: 20.0,
        ..Default::default()
    }
}

async fn rollouts(server: &TestServer) -> RolloutServiceClient<Channel> {
    RolloutServiceClient::new(server.channel().await)
}

async fn status(client: &mut RolloutServiceClient<Channel>) -> pb::Rollout {
    client.get_rollout(pb::GetRolloutRequest { model: MODEL.into() }).await.unwrap().into_inner()
}

fn phase(rollout: &pb::Rollout) -> pb::Phase {
    pb::Phase::try_from(rollout.phase).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rollout_api_starts_steers_and_ends_rollouts_and_names_bad_fields() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&[&models_flag(dir.path())]).await;
    let mut api = rollouts(&server).await;
    let mut client = server.predict_client().await;
    let reading = &golden().readings[0];

    let started = api.start_rollout(spec_of(1, 2, 20.0, None)).await.unwrap().into_inner();
    assert_eq!((phase(&started), started.canary_weight_percent, started.revision), (pb::Phase::Manual, 20.0, 1));
    assert_eq!(started.source, "api");
    assert_eq!(status(&mut api).await, started);
    let listed = api.list_rollouts(pb::ListRolloutsRequest {}).await.unwrap().into_inner().rollouts;
    assert_eq!(listed, [started]);

    let error = |r: Result<tonic::Response<pb::Rollout>, tonic::Status>| r.unwrap_err();
    let again = error(api.start_rollout(spec_of(1, 3, 5.0, None)).await);
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
    let weight = error(
        api.set_canary_weight(pb::SetCanaryWeightRequest { model: MODEL.into(), canary_weight_percent: 150.0 }).await,
    );
    assert!(weight.code() == Code::InvalidArgument && weight.message().contains("canary_weight_percent"), "{weight:?}");
    let missing = error(api.start_rollout(pb::StartRolloutRequest { spec: None }).await);
    assert!(missing.code() == Code::InvalidArgument && missing.message().contains("spec"), "{missing:?}");
    let mut steps =
        spec_of(1, 2, 0.0, Some(pb::Analysis { step_weights_percent: vec![50.0, 10.0], ..Default::default() }));
    steps.spec.as_mut().unwrap().model = "other".into();
    let steps = error(api.start_rollout(steps).await);
    assert!(steps.code() == Code::InvalidArgument && steps.message().contains("step_weights_percent[1]"), "{steps:?}");
    let mut unknown = spec_of(1, 2, 5.0, None);
    unknown.spec.as_mut().unwrap().model = "nope".into();
    assert_eq!(error(api.start_rollout(unknown).await).code(), Code::NotFound);
    let not_found = api.get_rollout(pb::GetRolloutRequest { model: "nope".into() }).await.unwrap_err();
    assert_eq!(not_found.code(), Code::NotFound);

    // All keys to the canary, then all back to stable.
    let full = api
        .set_canary_weight(pb::SetCanaryWeightRequest { model: MODEL.into(), canary_weight_percent: 100.0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((full.revision, full.canary_weight_percent), (2, 100.0));
    for i in 0..20 {
        assert_eq!(answer(&mut client, reading, &format!("car-{i}")).await.0, 2);
    }
    let aborted = api
        .abort_rollout(pb::AbortRolloutRequest { model: MODEL.into(), reason: "testing".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(phase(&aborted), pb::Phase::Aborted);
    assert!(aborted.last_decision.contains("testing"), "{}", aborted.last_decision);
    for i in 0..20 {
        assert_eq!(answer(&mut client, reading, &format!("car-{i}")).await.0, 1);
    }
    let over = error(api.promote_rollout(pb::PromoteRolloutRequest { model: MODEL.into() }).await);
    assert_eq!(over.code(), Code::FailedPrecondition, "{over:?}");

    // A finished rollout makes way for the next; its revisions go on.
    let next = api.start_rollout(spec_of(1, 3, 0.0, None)).await.unwrap().into_inner();
    assert_eq!(next.revision, 4);
    let promoted = api.promote_rollout(pb::PromoteRolloutRequest { model: MODEL.into() }).await.unwrap().into_inner();
    assert_eq!(phase(&promoted), pb::Phase::Promoted);
    for i in 0..20 {
        assert_eq!(answer(&mut client, reading, &format!("car-{i}")).await.0, 3);
    }
    // Pinned requests are never split.
    let pinned = client.predict(predict(reading, Some(1), "car-0")).await.unwrap().into_inner();
    assert_eq!(pinned.model_spec.unwrap().version_choice, Some(VersionChoice::Version(1)));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_scores_stable_traffic_in_shadow_without_its_answer_leaking() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&[&models_flag(dir.path())]).await;
    let mut api = rollouts(&server).await;
    let mut client = server.predict_client().await;
    let mut request = spec_of(1, 3, 0.0, None);
    request.spec.as_mut().unwrap().shadow_percent = 100.0;
    api.start_rollout(request).await.unwrap();

    // Every answer is version 1's, to the bit TensorFlow computed; none is the canary's.
    let golden = golden();
    for (i, reading) in golden.readings.iter().enumerate() {
        let (version, score, threshold) = answer(&mut client, reading, &format!("car-{i}")).await;
        assert_eq!((version, threshold), (1, golden.v1_threshold), "reading {i}");
        assert!((score - golden.v1_scores[i]).abs() <= 1e-4 * golden.v1_scores[i].abs().max(1.0), "reading {i}");
    }
    // The canary flagged every row; it agreed with stable only where stable flagged too.
    let rows = golden.readings.len() as f64;
    let stable_flags = golden.v1_scores.iter().filter(|&&s| s > golden.v1_threshold).count() as f64;
    let (text, agree, disagree) = observe_until(
        Duration::from_secs(30),
        async || {
            let text = get_text(server.rest, "/metrics").await;
            let shadow = |agreement| {
                metric(&text, "model_server_shadow_rows_total", &[("version", "3"), ("agreement", agreement)])
                    .unwrap_or(0.0)
            };
            let (agree, disagree) = (shadow("agree"), shadow("disagree"));
            (text, agree, disagree)
        },
        |(_, agree, disagree)| agree + disagree >= rows,
    )
    .await;
    assert!(agree + disagree >= rows, "shadow rows counted: {agree} + {disagree} of {rows}");
    assert_eq!((agree, disagree), (stable_flags, rows - stable_flags));
    // Shadow rows are not answers: version 3 answered nothing.
    assert_eq!(metric(&text, "model_server_output_anomalies_total", &[("version", "3")]), None);
    server.stop().await;
}

/// Sends keyed requests of random golden readings from `workers` tasks until `stop`;
/// returns the count of successes and failures.
fn load(
    server: &TestServer,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> (Arc<AtomicU64>, Arc<AtomicU64>, Vec<tokio::task::JoinHandle<()>>) {
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let readings = Arc::new(golden().readings);
    let tasks = (0..workers)
        .map(|worker| {
            let (ok, failed, stop, readings) = (ok.clone(), failed.clone(), stop.clone(), readings.clone());
            let endpoint = format!("http://{}", server.grpc);
            tokio::spawn(async move {
                let mut client = PredictionServiceClient::connect(endpoint).await.unwrap();
                let mut i = worker;
                while !stop.load(Ordering::Relaxed) {
                    let reading = &readings[i % readings.len()];
                    match client.predict(predict(reading, None, &format!("car-{}", i % 500))).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    i += workers * 7 + 1;
                }
            })
        })
        .collect();
    (ok, failed, tasks)
}

/// Runs `rollout` under load until it leaves PROGRESSING; returns the final state.
async fn under_load(server: &TestServer, rollout: pb::StartRolloutRequest) -> pb::Rollout {
    let mut api = rollouts(server).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, tasks) = load(server, 4, stop.clone());
    api.start_rollout(rollout).await.unwrap();
    let concluded = |rollout: &pb::Rollout| phase(rollout) != pb::Phase::Progressing;
    let last = observe_until(Duration::from_secs(90), async || status(&mut api).await, concluded).await;
    assert!(concluded(&last), "the analysis never concluded: {last:?}");
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed during the rollout");
    assert!(ok.load(Ordering::Relaxed) > 100, "the rollout ran under load");
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_analysis_rolls_back_a_canary_that_flags_everything_and_promotes_a_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&[&models_flag(dir.path())]).await;
    let mut client = server.predict_client().await;
    let reading = &golden().readings[0];

    let bad = under_load(&server, spec_of(1, 3, 0.0, Some(quick_analysis()))).await;
    assert_eq!(phase(&bad), pb::Phase::RolledBack, "{bad:?}");
    assert_eq!((bad.failures, bad.canary_weight_percent), (2, 0.0));
    assert!(bad.last_decision.contains("anomaly rate"), "the decision gives its figures: {}", bad.last_decision);
    for i in 0..20 {
        assert_eq!(answer(&mut client, reading, &format!("car-{i}")).await.0, 1, "rolled back to stable");
    }

    let good = under_load(&server, spec_of(1, 2, 0.0, Some(quick_analysis()))).await;
    assert_eq!(phase(&good), pb::Phase::Promoted, "{good:?}");
    assert!(good.last_decision.starts_with("promoted: within bounds"), "{}", good.last_decision);
    for i in 0..20 {
        assert_eq!(answer(&mut client, reading, &format!("car-{i}")).await.0, 2, "promoted");
    }

    // The rollout gauges follow the state within a tick of the analysis loop.
    let promoted = |text: &String| metric(text, "model_server_rollout_phase", &[("phase", "promoted")]) == Some(1.0);
    let text = observe_until(Duration::from_secs(10), async || get_text(server.rest, "/metrics").await, promoted).await;
    assert!(promoted(&text), "the phase gauge never showed the promotion");
    let decisions =
        |decision| metric(&text, "model_server_rollout_decisions_total", &[("decision", decision)]).unwrap_or(0.0);
    // The bad canary's first failed check, then any the good one was allowed (a check can
    // fail on latency noise here; the good rollout carries its own count).
    assert!(good.failures < quick_analysis().failure_limit, "{good:?}");
    assert_eq!((decisions("failed_check"), decisions("rolled_back")), (1.0 + f64::from(good.failures), 1.0));
    assert_eq!((decisions("advanced"), decisions("promoted")), (1.0, 1.0));
    assert_eq!(metric(&text, "model_server_rollout_canary_weight_percent", &[("model", MODEL)]), Some(100.0));
    let anomalies = |version| metric(&text, "model_server_output_anomalies_total", &[("version", version)]).unwrap();
    assert!(anomalies("3") > 0.0 && anomalies("2") > 0.0, "both canaries' answers are counted");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_converge_on_the_rollout_state_through_kafka() {
    let kafka = KafkaCluster::start(1).unwrap();
    // As operators would: the state topic compacted with one partition (the mock cluster
    // takes no CreateTopics; against a real cluster the server creates it).
    kafka.create_topic("vigil.rollout-state", 1).unwrap();
    kafka.create_topic("vigil.rollout-events", 1).unwrap();
    let brokers = format!("--rollout_kafka_brokers={}", kafka.bootstrap_servers());
    let dir = tempfile::tempdir().unwrap();
    let models = models_flag(dir.path());
    let replica = |id: &str| format!("--replica_id={id}");
    let a = TestServer::start(&[&models, &brokers, &replica("a")]).await;
    let b = TestServer::start(&[&models, &brokers, &replica("b")]).await;
    let (mut api_a, mut api_b) = (rollouts(&a).await, rollouts(&b).await);

    let converged = async |api: &mut RolloutServiceClient<Channel>, revision: u64| {
        let reached = async || {
            let answer = api.get_rollout(pb::GetRolloutRequest { model: MODEL.into() }).await;
            answer.ok().map(tonic::Response::into_inner).filter(|rollout| rollout.revision >= revision)
        };
        let rollout = observe_until(Duration::from_secs(30), reached, Option::is_some).await;
        rollout.unwrap_or_else(|| panic!("revision {revision} never reached the other replica"))
    };
    let started = api_a.start_rollout(spec_of(1, 2, 30.0, None)).await.unwrap().into_inner();
    assert_eq!(converged(&mut api_b, 1).await, started);
    let changed = api_b
        .set_canary_weight(pb::SetCanaryWeightRequest { model: MODEL.into(), canary_weight_percent: 60.0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((changed.revision, changed.updated_by.as_str()), (2, "b"));
    assert_eq!(converged(&mut api_a, 2).await, changed);

    // Both replicas send each device to the same side.
    let (mut client_a, mut client_b) = (a.predict_client().await, b.predict_client().await);
    let reading = &golden().readings[0];
    let mut on_canary = 0;
    for i in 0..100 {
        let key = format!("car-{i}");
        let side = answer(&mut client_a, reading, &key).await.0;
        assert_eq!(answer(&mut client_b, reading, &key).await.0, side, "{key}");
        on_canary += usize::from(side == 2);
    }
    assert!((40..=80).contains(&on_canary), "60% of 100 keys on the canary: {on_canary}");

    // A replica started later reads the state before it serves.
    let c = TestServer::start(&[&models, &brokers, &replica("c")]).await;
    let mut api_c = rollouts(&c).await;
    assert_eq!(status(&mut api_c).await, changed);

    // One replica runs the analysis: with too few samples to decide, its checks hold, and
    // every "held" event on the events topic names the same replica.
    api_c.abort_rollout(pb::AbortRolloutRequest { model: MODEL.into(), reason: "next".into() }).await.unwrap();
    let mut slow = quick_analysis();
    slow.min_samples = 1_000_000;
    converged(&mut api_a, 3).await;
    api_a.start_rollout(spec_of(1, 2, 0.0, Some(slow))).await.unwrap();
    let events = read_topic(&kafka, "vigil.rollout-events", Duration::from_secs(60), |records| {
        records.iter().filter(|r| String::from_utf8_lossy(&r.payload).contains("\"event\":\"held\"")).count() >= 3
    })
    .await;
    let events: Vec<Value> = events.iter().map(|r| serde_json::from_slice(&r.payload).unwrap()).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(&kinds[..4], ["started", "weight_set", "aborted", "started"], "{kinds:?}");
    let deciders: std::collections::BTreeSet<&str> =
        events.iter().filter(|e| e["event"] == "held").map(|e| e["replica"].as_str().unwrap()).collect();
    assert_eq!(deciders.len(), 1, "one replica decides: {deciders:?}");
    let held = events.iter().find(|e| e["event"] == "held").unwrap();
    assert!(held["message"].as_str().unwrap().contains("inconclusive"), "{held}");
    assert_eq!(held["figures"]["verdict"]["result"], "inconclusive");
    for server in [a, b, c] {
        server.stop().await;
    }
}

/// Waits until both replicas hold the same rollout at `revision`, and returns it.
async fn both_at(a: &RolloutServiceClient<Channel>, b: &RolloutServiceClient<Channel>, revision: u64) -> pb::Rollout {
    let (mut a, mut b) = (a.clone(), b.clone());
    let agree = |(on_a, on_b): &(pb::Rollout, pb::Rollout)| on_a.revision >= revision && on_a == on_b;
    let both =
        observe_until(Duration::from_secs(30), async || (status(&mut a).await, status(&mut b).await), agree).await;
    let (on_a, on_b) = &both;
    assert!(agree(&both), "replicas at {} and {}, not {revision}", on_a.revision, on_b.revision);
    assert_eq!(on_a.revision, revision, "each change is applied once: {on_a:?}");
    both.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rollout_file_owns_its_rollouts_and_replicas_reading_it_apply_each_change_once() {
    let kafka = KafkaCluster::start(1).unwrap();
    kafka.create_topic("vigil.rollout-state", 1).unwrap();
    kafka.create_topic("vigil.rollout-events", 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let models = models_flag(dir.path());
    let file = dir.path().join("rollouts.toml");
    let declare = |canary: i64, weight: f64| {
        std::fs::write(
            &file,
            format!(
                "[[rollouts]]\nmodel = \"{MODEL}\"\nstable = 1\ncanary = {canary}\ncanary_weight_percent = {weight}\n"
            ),
        )
        .unwrap()
    };
    declare(2, 25.0);
    let flags = |id: &str| {
        vec![
            models.clone(),
            format!("--rollout_kafka_brokers={}", kafka.bootstrap_servers()),
            format!("--rollout_config_file={}", file.display()),
            "--rollout_config_file_poll_wait_seconds=1".into(),
            format!("--replica_id={id}"),
        ]
    };
    let start = async |id: &str| {
        let flags = flags(id);
        TestServer::start(&flags.iter().map(String::as_str).collect::<Vec<_>>()).await
    };
    let (a, b) = (start("a").await, start("b").await);
    let (mut api_a, mut api_b) = (rollouts(&a).await, rollouts(&b).await);
    let declared = both_at(&api_a, &api_b, 1).await;
    assert_eq!((declared.source.as_str(), declared.canary_weight_percent), ("file", 25.0));

    // The API may steer a declared rollout but not replace it; an unchanged file leaves
    // the steering alone.
    let refused = api_a.start_rollout(spec_of(1, 3, 5.0, None)).await.unwrap_err();
    assert!(refused.code() == Code::FailedPrecondition && refused.message().contains("rollout file"), "{refused:?}");
    api_b
        .set_canary_weight(pb::SetCanaryWeightRequest { model: MODEL.into(), canary_weight_percent: 50.0 })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        both_at(&api_a, &api_b, 2).await.canary_weight_percent,
        50.0,
        "three polls of an unchanged file change nothing"
    );

    // A changed entry starts its rollout over; a removed one ends it and frees the model.
    declare(3, 10.0);
    let changed = both_at(&api_a, &api_b, 3).await;
    assert_eq!((changed.spec.unwrap().canary_version, changed.canary_weight_percent), (3, 10.0));
    std::fs::write(&file, "").unwrap();
    let removed = both_at(&api_a, &api_b, 4).await;
    assert_eq!((phase(&removed), removed.source.as_str()), (pb::Phase::Aborted, "api"));
    api_a.start_rollout(spec_of(1, 2, 5.0, None)).await.unwrap();
    both_at(&api_a, &api_b, 5).await;
    for server in [a, b] {
        server.stop().await;
    }
}
