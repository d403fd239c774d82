//! The anomaly model Vigil ships (`deploy/models/car-anomaly`, both versions) is served:
//! both versions load and answer Predict with their own threshold, each version's scores
//! and anomalies are counted under its own labels, and the metadata lists the signals the
//! model takes, which is how a client learns the feature names.

mod support;

use std::path::PathBuf;

use proto::tensorflow::serving::model_service_client::ModelServiceClient;
use proto::tensorflow::serving::{GetModelMetadataRequest, GetModelStatusRequest, PredictRequest, SignatureDefMap};
use support::*;
use test_support::metric;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_bundled_versions_load_and_answer_with_their_own_threshold() {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/models/car-anomaly");
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("models.config");
    std::fs::write(&config, model_server::model_config::all_versions_config("car-anomaly", &base).unwrap()).unwrap();
    let server = TestServer::start(&[&format!("--model_config_file={}", config.display())]).await;
    let channel = server.channel().await;

    let status = ModelServiceClient::new(channel.clone())
        .get_model_status(GetModelStatusRequest { model_spec: spec("car-anomaly", None, None, "") })
        .await
        .unwrap()
        .into_inner();
    let mut available: Vec<(i64, i32)> = status.model_version_status.iter().map(|s| (s.version, s.state)).collect();
    available.sort();
    assert_eq!(available, [(1, 30), (2, 30)], "both versions AVAILABLE");

    // The signature's inputs are the reading's signal names.
    let mut client = server.predict_client().await;
    let metadata = client
        .get_model_metadata(GetModelMetadataRequest {
            model_spec: spec("car-anomaly", Some(2), None, ""),
            metadata_field: vec!["signature_def".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let map: SignatureDefMap = prost::Message::decode(metadata.metadata["signature_def"].value.as_slice()).unwrap();
    let signature = &map.signature_def["serving_default"];
    let mut names: Vec<&String> = signature.inputs.keys().collect();
    names.sort();
    // Every signal but the firmware version, an identifier rather than a measurement.
    let mut signals: Vec<&str> =
        sensor::signals().iter().map(|s| s.name).filter(|n| *n != "control_unit_firmware").collect();
    signals.sort();
    assert_eq!(names, signals);

    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/car_anomaly_golden.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let reading = &golden["readings"][0];
    let mut flagged = Vec::new();
    for version in [1i64, 2] {
        let request = PredictRequest {
            model_spec: spec("car-anomaly", Some(version), None, ""),
            inputs: names
                .iter()
                .map(|n| ((*n).clone(), float_tensor(&[1], &[reading[n.as_str()].as_f64().unwrap() as f32])))
                .collect(),
            output_filter: vec![],
        };
        let response = client.predict(request).await.unwrap().into_inner();
        let expected = &golden["versions"][version.to_string()];
        assert_eq!(response.outputs["threshold"].float_val, [expected["threshold"].as_f64().unwrap() as f32]);
        let score = response.outputs["anomaly_score"].float_val[0];
        let tf = expected["anomaly_score"][0].as_f64().unwrap() as f32;
        assert!((score - tf).abs() <= 1e-4 * tf.abs().max(1.0), "v{version}: {score} vs TensorFlow's {tf}");
        flagged.push(score > response.outputs["threshold"].float_val[0]);
    }

    // Each version's outputs are counted under its own labels, for canary analysis.
    let text = get_text(server.rest, "/metrics").await;
    for (version, flagged) in [("1", flagged[0]), ("2", flagged[1])] {
        let labels = [("model", "car-anomaly"), ("version", version)];
        assert_eq!(metric(&text, "model_server_output_scores_count", &labels), Some(1.0), "v{version}\n{text}");
        let anomalies = metric(&text, "model_server_output_anomalies_total", &labels);
        assert_eq!(anomalies, Some(f64::from(u8::from(flagged))), "v{version}");
    }
    server.stop().await;
}
