//! The model repository under load: a new version found by polling swaps in with no
//! failed request, the old one unloads, a corrupt version is reported and never replaces
//! the healthy one; config reloads, version policies and labels behave as in TF Serving;
//! warmup runs before a version is AVAILABLE.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use prost::Message;
use proto::tensorflow::serving::model_service_client::ModelServiceClient;
use proto::tensorflow::serving::model_spec::VersionChoice;
use proto::tensorflow::serving::prediction_log::LogType;
use proto::tensorflow::serving::{GetModelStatusRequest, ModelConfig, PredictLog, PredictRequest, PredictionLog};
use support::*;
use test_support::{eventually, metric};
use tonic::Code;
use tonic::transport::Channel;

fn request(model: &str, version: Option<i64>, label: Option<&str>) -> PredictRequest {
    PredictRequest {
        model_spec: spec(model, version, label, ""),
        inputs: [("sensors".to_owned(), float_tensor(&[1, 18], &[0.25; 18]))].into(),
        output_filter: vec![],
    }
}

async fn statuses(channel: &Channel, model: &str) -> Vec<(i64, i32, String)> {
    let response = ModelServiceClient::new(channel.clone())
        .get_model_status(GetModelStatusRequest { model_spec: spec(model, None, None, "") })
        .await
        .unwrap()
        .into_inner();
    response
        .model_version_status
        .into_iter()
        .map(|s| (s.version, s.state, s.status.map(|s| s.error_message).unwrap_or_default()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_swaps_in_under_load_and_a_corrupt_one_never_replaces_it() {
    let root = tempfile::tempdir().unwrap();
    let base = model_base(root.path(), "ae", "autoencoder", &[1]);
    let server = TestServer::serving("ae", &base, &["--file_system_poll_wait_seconds=1"]).await;
    let channel = server.channel().await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (channel, stop, ok, seen) = (channel.clone(), stop.clone(), ok.clone(), seen.clone());
        clients.push(tokio::spawn(async move {
            let mut client =
                proto::tensorflow::serving::prediction_service_client::PredictionServiceClient::new(channel);
            while !stop.load(Ordering::Relaxed) {
                // Any failure fails the test: a swap must be invisible to clients.
                let response =
                    client.predict(request("ae", None, None)).await.expect("no request may fail during a reload");
                if let Some(VersionChoice::Version(v)) = response.into_inner().model_spec.unwrap().version_choice {
                    seen.lock().unwrap().insert(v);
                }
                ok.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    add_version(&base, "autoencoder", 2);
    eventually(Duration::from_secs(60), "version 2 to answer", async || seen.lock().unwrap().contains(&2)).await;
    eventually(Duration::from_secs(60), "version 1 to unload", async || {
        statuses(&channel, "ae").await.iter().any(|(v, state, _)| *v == 1 && *state == 50)
    })
    .await;

    // A corrupt version 3: reported with the file named, never served.
    let staging = base.join(".staging-3");
    copy_dir(&fixture_root("autoencoder").join("1"), &staging);
    std::fs::write(staging.join("saved_model.pb"), b"definitely not a protobuf").unwrap();
    std::fs::rename(&staging, base.join("3")).unwrap();
    eventually(Duration::from_secs(60), "version 3 to fail", async || {
        statuses(&channel, "ae").await.iter().any(|(v, state, _)| *v == 3 && *state == 50)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }

    let states = statuses(&channel, "ae").await;
    let v3 = states.iter().find(|(v, _, _)| *v == 3).unwrap();
    assert!(v3.2.contains("saved_model.pb"), "the load error names the file: {:?}", v3.2);
    assert!(states.iter().any(|(v, state, _)| *v == 2 && *state == 30), "version 2 still AVAILABLE: {states:?}");
    assert_eq!(*seen.lock().unwrap(), [1, 2].into(), "only healthy versions answered");
    assert!(ok.load(Ordering::Relaxed) > 50, "the clients kept running throughout");
    let metrics = get_text(server.rest, "/metrics").await;
    assert_eq!(metric(&metrics, "model_server_load_failures_total", &[("model", "ae")]), Some(1.0));
    server.stop().await;
}

fn model_config(name: &str, base: &std::path::Path, versions: &[i64], labels: &[(&str, i64)]) -> ModelConfig {
    use proto::tensorflow::serving::file_system_storage_path_source_config::ServableVersionPolicy;
    use proto::tensorflow::serving::file_system_storage_path_source_config::servable_version_policy::{
        PolicyChoice, Specific,
    };
    ModelConfig {
        name: name.into(),
        base_path: base.display().to_string(),
        model_platform: "tensorflow".into(),
        model_version_policy: Some(ServableVersionPolicy {
            policy_choice: Some(PolicyChoice::Specific(Specific { versions: versions.to_vec() })),
        }),
        version_labels: labels.iter().map(|(l, v)| ((*l).to_owned(), *v)).collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_policies_labels_and_reload_requests() {
    let root = tempfile::tempdir().unwrap();
    let ae = model_base(root.path(), "ae", "autoencoder", &[1, 2, 3]);
    let config = root.path().join("models.config");
    std::fs::write(
        &config,
        format!(
            "model_config_list {{ config {{ name: \"ae\" base_path: \"{}\" model_platform: \"tensorflow\"\n\
               model_version_policy {{ specific {{ versions: 1 versions: 2 }} }}\n\
               version_labels {{ key: \"stable\" value: 1 }} version_labels {{ key: \"canary\" value: 2 }} }} }}",
            ae.display()
        ),
    )
    .unwrap();
    let server = TestServer::start(&[&format!("--model_config_file={}", config.display())]).await;
    let channel = server.channel().await;
    let mut client =
        proto::tensorflow::serving::prediction_service_client::PredictionServiceClient::new(channel.clone());
    let version_of = |r: proto::tensorflow::serving::PredictResponse| r.model_spec.unwrap().version_choice;
    for (label, version) in [("stable", 1), ("canary", 2)] {
        let response = client.predict(request("ae", None, Some(label))).await.unwrap().into_inner();
        assert_eq!(version_of(response), Some(VersionChoice::Version(version)), "label {label}");
    }
    let latest = client.predict(request("ae", None, None)).await.unwrap().into_inner();
    assert_eq!(version_of(latest), Some(VersionChoice::Version(2)), "latest of the specific versions");
    let status = client.predict(request("ae", Some(3), None)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "version 3 is on disk but not in the policy");

    // Reload: add a second model, move the canary label to version 3 (not loaded): refused.
    let mut models = ModelServiceClient::new(channel.clone());
    let two_io = model_base(root.path(), "two_io", "module_two_io", &[1]);
    let refused = models
        .handle_reload_config_request(reload_request(vec![model_config("ae", &ae, &[1, 2], &[("canary", 3)])]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("canary") && refused.message().contains('3'), "{}", refused.message());
    let invalid = models
        .handle_reload_config_request(reload_request(vec![model_config("ae", &ae, &[1, 2], &[("can-ary", 1)])]))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);

    let accepted = models
        .handle_reload_config_request(reload_request(vec![
            model_config("ae", &ae, &[2, 3], &[("stable", 2)]),
            model_config("two_io", &two_io, &[1], &[]),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(accepted.status.unwrap().error_code, 0);
    let response = client.predict(request("ae", None, Some("stable"))).await.unwrap().into_inner();
    assert_eq!(version_of(response), Some(VersionChoice::Version(2)));
    let response = client.predict(request("ae", Some(3), None)).await.unwrap().into_inner();
    assert_eq!(version_of(response), Some(VersionChoice::Version(3)));
    eventually(Duration::from_secs(60), "version 1 to unload", async || {
        statuses(&channel, "ae").await.iter().any(|(v, state, _)| *v == 1 && *state == 50)
    })
    .await;
    assert!(statuses(&channel, "two_io").await.iter().any(|(v, state, _)| *v == 1 && *state == 30));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warmup_requests_run_before_available_and_a_bad_one_fails_the_load() {
    let root = tempfile::tempdir().unwrap();
    let base = model_base(root.path(), "ae", "autoencoder", &[1]);
    let warmup = |dir: &std::path::Path, rows: usize| {
        let log = PredictionLog {
            log_type: Some(LogType::PredictLog(PredictLog {
                request: Some(PredictRequest {
                    model_spec: spec("ae", None, None, ""),
                    inputs: [("sensors".to_owned(), float_tensor(&[rows, 18], &vec![0.1; rows * 18]))].into(),
                    output_filter: vec![],
                }),
                response: None,
            })),
        };
        std::fs::create_dir_all(dir.join("assets.extra")).unwrap();
        std::fs::write(
            dir.join(model_server::warmup::WARMUP_FILE),
            model_server::warmup::write_tfrecords(&[log.encode_to_vec(), log.encode_to_vec()]),
        )
        .unwrap();
    };
    warmup(&base.join("1"), 2);
    let server = TestServer::start(&["--model_name=ae", &format!("--model_base_path={}", base.display())]).await;
    drop(server.channel().await);
    // Both warmup records ran through the signature's scheduler before any request.
    let metrics = get_text(server.rest, "/metrics").await;
    let labels = [("model", "ae"), ("version", "1"), ("signature", "serving_default")];
    assert_eq!(metric(&metrics, "model_server_batch_size_count", &labels), Some(2.0), "{metrics}");
    assert_eq!(metric(&metrics, "model_server_batch_size_sum", &labels), Some(4.0), "two runs of two rows");
    server.stop().await;

    // Version 2's warmup request has a wrong shape: version 2 fails, naming the file.
    let tampered = tempfile::tempdir().unwrap();
    let base = model_base(tampered.path(), "ae", "autoencoder", &[2]);
    let bad = PredictionLog {
        log_type: Some(LogType::PredictLog(PredictLog {
            request: Some(PredictRequest {
                model_spec: spec("ae", None, None, ""),
                inputs: [("sensors".to_owned(), float_tensor(&[1, 3], &[0.1; 3]))].into(),
                output_filter: vec![],
            }),
            response: None,
        })),
    };
    std::fs::create_dir_all(base.join("2/assets.extra")).unwrap();
    std::fs::write(
        base.join("2").join(model_server::warmup::WARMUP_FILE),
        model_server::warmup::write_tfrecords(&[bad.encode_to_vec()]),
    )
    .unwrap();
    let server = TestServer::start(&["--model_name=ae", &format!("--model_base_path={}", base.display())]).await;
    let channel = server.channel().await;
    let states = statuses(&channel, "ae").await;
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].1, 50, "END: {states:?}");
    assert!(states[0].2.contains("warmup") && states[0].2.contains("tf_serving_warmup_requests"), "{states:?}");
    server.stop().await;
}
