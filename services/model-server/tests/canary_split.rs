//! Canary rollouts through the real gRPC API: unpinned requests are split by the
//! rollout's weight, each routing key (`vigil-routing-key` metadata, the device id) always
//! lands on the side its bucket says, pinned requests get what they pin, a canary that is
//! not loaded leaves everything to stable, and the rollout file is re-read (a bad one
//! keeps the rollout in force). Versions 1 and 2 are copies of the autoencoder fixture;
//! the response's `model_spec` names the version that answered.

mod support;

use std::path::Path;
use std::time::Duration;

use canary::split::{Weight, bucket};
use proto::tensorflow::serving::PredictRequest;
use proto::tensorflow::serving::model_spec::VersionChoice;
use proto::tensorflow::serving::prediction_service_client::PredictionServiceClient;
use support::*;
use test_support::eventually;
use tonic::transport::Channel;

const MODEL: &str = "ae";

/// A model config serving every version under `base`, and a rollout file, in `dir`.
fn configs(dir: &Path, base: &Path, rollout: &str) -> (String, String) {
    let models = dir.join("models.config");
    std::fs::write(&models, model_server::model_config::all_versions_config(MODEL, base).unwrap()).unwrap();
    let rollouts = dir.join("rollouts.toml");
    std::fs::write(&rollouts, rollout).unwrap();
    (format!("--model_config_file={}", models.display()), format!("--rollout_config_file={}", rollouts.display()))
}

fn rollout(stable: i64, canary: i64, percent: f64) -> String {
    format!(
        "[[rollouts]]\nmodel = \"{MODEL}\"\nstable = {stable}\ncanary = {canary}\ncanary_weight_percent = {percent}\n"
    )
}

/// The version that answered one Predict, sent with `key` as the routing key if given.
async fn answered(client: &mut PredictionServiceClient<Channel>, version: Option<i64>, key: Option<&str>) -> i64 {
    let (dims, values, _) = autoencoder_golden().remove(0);
    let inputs = [("sensors".to_owned(), float_tensor(&dims, &values))].into();
    let mut request = tonic::Request::new(PredictRequest {
        model_spec: spec(MODEL, version, None, ""),
        inputs,
        output_filter: vec![],
    });
    if let Some(key) = key {
        request.metadata_mut().insert(canary::ROUTING_KEY_METADATA, key.parse().unwrap());
    }
    let response = client.predict(request).await.expect("the rollout never fails a request").into_inner();
    match response.model_spec.unwrap().version_choice {
        Some(VersionChoice::Version(v)) => v,
        other => panic!("the response names no version: {other:?}"),
    }
}

/// A server with versions 1 and 2, a rollout file sending `weight`% from `stable` to
/// `canary`, and `extra` flags (the directory holding them goes with the first value).
async fn rolled_out(stable: i64, canary: i64, weight: f64, extra: &[&str]) -> (tempfile::TempDir, TestServer) {
    let root = tempfile::tempdir().unwrap();
    let base = model_base(root.path(), MODEL, "autoencoder", &[1, 2]);
    let (models, rollouts) = configs(root.path(), &base, &rollout(stable, canary, weight));
    let flags: Vec<&str> = [models.as_str(), rollouts.as_str()].into_iter().chain(extra.iter().copied()).collect();
    (root, TestServer::start(&flags).await)
}

/// A server with versions 1 and 2 and a rollout sending 25% to version 2.
async fn quarter_on_the_canary() -> (tempfile::TempDir, TestServer) {
    rolled_out(1, 2, 25.0, &[]).await
}

/// `count` is within 5 standard deviations of a binomial(n, share) count.
fn assert_near_share(count: usize, n: usize, share: f64, what: &str) {
    let (expected, sd) = (n as f64 * share, (n as f64 * share * (1.0 - share)).sqrt());
    assert!((count as f64 - expected).abs() <= 5.0 * sd, "{what}: {count} of {n}, expected {expected:.0}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpinned_requests_split_by_weight_and_each_device_sticks_to_its_side() {
    let (_root, server) = quarter_on_the_canary().await;
    let mut client = server.predict_client().await;

    // Every device lands where its bucket says: the canary below 25% of the buckets.
    let weight = Weight::from_percent(25.0).unwrap().basis_points();
    let mut on_canary = 0;
    for i in 0..800 {
        let key = format!("car-{i:05}");
        let expected = if bucket(MODEL, key.as_bytes()) < weight { 2 } else { 1 };
        let version = answered(&mut client, None, Some(&key)).await;
        assert_eq!(version, expected, "{key}");
        on_canary += usize::from(version == 2);
        if i % 100 == 0 {
            for _ in 0..3 {
                assert_eq!(answered(&mut client, None, Some(&key)).await, version, "{key} sticks");
            }
        }
    }
    assert_near_share(on_canary, 800, 0.25, "devices on the canary");

    // Without a key, requests are split at random by the same weight.
    let mut unkeyed = 0;
    for _ in 0..800 {
        unkeyed += usize::from(answered(&mut client, None, None).await == 2);
    }
    assert_near_share(unkeyed, 800, 0.25, "unkeyed requests on the canary");

    // A pinned request gets what it pins, whatever its key says.
    let canary_key = (0..).map(|i| format!("car-{i:05}")).find(|k| bucket(MODEL, k.as_bytes()) < weight).unwrap();
    let stable_key = (0..).map(|i| format!("car-{i:05}")).find(|k| bucket(MODEL, k.as_bytes()) >= weight).unwrap();
    assert_eq!(answered(&mut client, Some(1), Some(&canary_key)).await, 1);
    assert_eq!(answered(&mut client, Some(2), Some(&stable_key)).await, 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_is_not_loaded_leaves_every_request_to_stable() {
    // Version 7 does not exist; 100% of traffic is meant for it.
    let (_root, server) = rolled_out(1, 7, 100.0, &[]).await;
    let mut client = server.predict_client().await;
    for i in 0..50 {
        assert_eq!(answered(&mut client, None, Some(&format!("car-{i}"))).await, 1);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rollout_file_is_reread_and_a_bad_one_keeps_the_rollout_in_force() {
    let (root, server) = rolled_out(1, 2, 0.0, &["--rollout_config_file_poll_wait_seconds=1"]).await;
    let mut client = server.predict_client().await;
    for i in 0..20 {
        assert_eq!(answered(&mut client, None, Some(&format!("car-{i}"))).await, 1, "0%: all stable");
    }

    let file = root.path().join("rollouts.toml");
    std::fs::write(&file, rollout(1, 2, 100.0)).unwrap();
    eventually(Duration::from_secs(30), "the new weight to be applied", async || {
        answered(&mut client, None, Some("car-0")).await == 2
    })
    .await;

    // A weight out of range is refused; the 100% rollout stays. Three poll periods pass
    // (there is no event to wait on for something that must not happen).
    std::fs::write(&file, rollout(1, 2, 150.0)).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..20 {
        assert_eq!(answered(&mut client, None, Some(&format!("car-{i}"))).await, 2, "still 100% canary");
    }
    server.stop().await;
}

/// The floats of a float tensor, from either encoding.
fn floats_of(tensor: &proto::tensorflow::TensorProto) -> Vec<f32> {
    if tensor.tensor_content.is_empty() {
        return tensor.float_val.clone();
    }
    tensor.tensor_content.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// A call carrying many devices' rows, as the stream processor batches them.
fn batched_request(rows: &[Vec<f32>], keys: Option<proto::tensorflow::TensorProto>) -> PredictRequest {
    let values: Vec<f32> = rows.concat();
    let mut inputs: std::collections::HashMap<String, proto::tensorflow::TensorProto> =
        [("sensors".to_owned(), float_tensor(&[rows.len(), 18], &values))].into();
    if let Some(keys) = keys {
        inputs.insert(canary::ROW_ROUTING_KEYS_INPUT.to_owned(), keys);
    }
    PredictRequest { model_spec: spec(MODEL, None, None, ""), inputs, output_filter: vec![] }
}

fn keys_tensor(keys: &[String]) -> proto::tensorflow::TensorProto {
    proto::tensorflow::TensorProto {
        dtype: proto::tensorflow::DataType::DtString as i32,
        tensor_shape: shape(&[keys.len()]),
        string_val: keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_call_routes_each_row_by_its_own_key_and_says_which_version_answered_it() {
    let (_root, server) = quarter_on_the_canary().await;
    let mut client = server.predict_client().await;
    let weight = Weight::from_percent(25.0).unwrap().basis_points();

    let rows: Vec<Vec<f32>> =
        (0..60).map(|i| (0..18).map(|j| ((i * 7 + j * 3) % 17) as f32 / 17.0).collect()).collect();
    let keys: Vec<String> = (0..60).map(|i| format!("car-{i:05}")).collect();
    let response = client.predict(batched_request(&rows, Some(keys_tensor(&keys)))).await.unwrap().into_inner();

    // Each row was answered by the version its own key routes to, as if it came alone.
    let versions = &response.outputs[canary::ROW_VERSIONS_OUTPUT];
    assert_eq!(versions.int64_val.len(), 60, "{versions:?}");
    for (key, version) in keys.iter().zip(&versions.int64_val) {
        let expected = if bucket(MODEL, key.as_bytes()) < weight { 2 } else { 1 };
        assert_eq!(*version, expected, "{key}");
        assert_eq!(answered(&mut client, None, Some(key)).await, expected, "{key} alone");
    }
    assert!(versions.int64_val.contains(&1) && versions.int64_val.contains(&2), "both sides answered rows");
    // And each row's outputs are its own, in the request's order (both versions are the
    // same model, so a row's answer does not depend on which one ran it).
    let merged = floats_of(&response.outputs["output_0"]);
    assert_eq!(merged.len(), 60 * 18);
    for (i, row) in rows.iter().enumerate() {
        let alone = PredictRequest {
            model_spec: spec(MODEL, Some(1), None, ""),
            inputs: [("sensors".to_owned(), float_tensor(&[1, 18], row))].into(),
            output_filter: vec![],
        };
        let alone = floats_of(&client.predict(alone).await.unwrap().into_inner().outputs["output_0"]);
        assert_close(&merged[i * 18..(i + 1) * 18], &alone, &format!("row {i}"));
    }

    // A call without per-row keys gets no extra output: plain TF Serving clients see nothing new.
    let plain = client.predict(batched_request(&rows, None)).await.unwrap().into_inner();
    assert!(!plain.outputs.contains_key(canary::ROW_VERSIONS_OUTPUT));

    // Keys that do not fit the rows, or are not strings, or are too long, are refused by name.
    let long = "x".repeat(canary::MAX_ROUTING_KEY_BYTES + 1);
    let wrong_dtype = proto::tensorflow::TensorProto { dtype: 1, ..keys_tensor(&keys) };
    for (keys, what) in [
        (keys_tensor(&keys[..59]), "59 keys for 60 rows"),
        (wrong_dtype, "floats"),
        (keys_tensor(&[vec![long], keys[1..].to_vec()].concat()), "a key too long"),
        (proto::tensorflow::TensorProto { tensor_shape: shape(&[7]), ..keys_tensor(&keys) }, "a shape that lies"),
    ] {
        let status = client.predict(batched_request(&rows, Some(keys))).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{what}: {status:?}");
        assert!(status.message().contains(canary::ROW_ROUTING_KEYS_INPUT), "{what}: {}", status.message());
    }
    assert_eq!(
        answered(&mut client, None, Some("car-00000")).await,
        answered(&mut client, None, Some("car-00000")).await
    );
    server.stop().await;
}
