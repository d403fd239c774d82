//! The anomaly model Vigil ships (`deploy/models/car-anomaly`, all three versions) is
//! served: every version loads and answers Predict with its own threshold and TensorFlow's
//! score (v3 from a window of a device's last 10 readings), each version's scores and
//! anomalies are counted under its own labels, and the metadata lists the signals the model
//! takes, which is how a client learns the feature names (and, from their shapes, whether
//! it takes windows).

mod support;

use std::path::PathBuf;

use proto::tensorflow::serving::model_service_client::ModelServiceClient;
use proto::tensorflow::serving::{GetModelMetadataRequest, GetModelStatusRequest, PredictRequest, SignatureDefMap};
use support::*;
use test_support::metric;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bundled_version_loads_and_answers_with_its_own_threshold() {
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
    assert_eq!(available, [(1, 30), (2, 30), (3, 30)], "every version AVAILABLE");

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

    // v3 takes each signal over the device's last 10 readings, oldest first: the window
    // ending with the last reading of the golden stretch of a faulty car.
    let expected = &golden["versions"]["3"];
    let stretch = golden["sequences"][1].as_array().unwrap();
    let window = &stretch[stretch.len() - 10..];
    let request = PredictRequest {
        model_spec: spec("car-anomaly", Some(3), None, ""),
        inputs: names
            .iter()
            .map(|n| {
                let values: Vec<f32> = window.iter().map(|r| r[n.as_str()].as_f64().unwrap() as f32).collect();
                ((*n).clone(), float_tensor(&[1, 10], &values))
            })
            .collect(),
        output_filter: vec![],
    };
    let response = client.predict(request).await.unwrap().into_inner();
    assert_eq!(response.outputs["threshold"].float_val, [expected["threshold"].as_f64().unwrap() as f32]);
    let score = response.outputs["anomaly_score"].float_val[0];
    let tf = expected["sequence_scores"][1][stretch.len() - 1].as_f64().unwrap() as f32;
    assert!((score - tf).abs() <= 1e-4 * tf.abs().max(1.0), "v3: {score} vs TensorFlow's {tf}");
    flagged.push(score > response.outputs["threshold"].float_val[0]);

    // The same window sent to v2, which scores one reading, is narrowed to its newest
    // reading (docs/windowed-models.md): one request serves both sides of a v2 -> v3
    // canary. Its answer is v2's for the newest reading alone.
    let v2 = |shape: &[usize], rows: &[serde_json::Value]| PredictRequest {
        model_spec: spec("car-anomaly", Some(2), None, ""),
        inputs: names
            .iter()
            .map(|n| {
                let values: Vec<f32> = rows.iter().map(|r| r[n.as_str()].as_f64().unwrap() as f32).collect();
                ((*n).clone(), float_tensor(shape, &values))
            })
            .collect(),
        output_filter: vec![],
    };
    let windowed = client.predict(v2(&[1, 10], window)).await.unwrap().into_inner();
    let alone = client.predict(v2(&[1], &window[9..])).await.unwrap().into_inner();
    assert_eq!(windowed.outputs["anomaly_score"].float_val, alone.outputs["anomaly_score"].float_val);
    let newest_flagged = alone.outputs["anomaly_score"].float_val[0] > alone.outputs["threshold"].float_val[0];

    // Each version's outputs are counted under its own labels, for canary analysis.
    let text = get_text(server.rest, "/metrics").await;
    // v2 answered three calls: the golden reading, the window and its newest reading.
    let count = |flags: &[bool]| f64::from(flags.iter().map(|&f| u8::from(f)).sum::<u8>());
    let expected = [
        ("1", 1.0, count(&flagged[..1])),
        ("2", 3.0, count(&[flagged[1], newest_flagged, newest_flagged])),
        ("3", 1.0, count(&flagged[2..])),
    ];
    for (version, calls, anomalies) in expected {
        let labels = [("model", "car-anomaly"), ("version", version)];
        assert_eq!(metric(&text, "model_server_output_scores_count", &labels), Some(calls), "v{version}\n{text}");
        assert_eq!(metric(&text, "model_server_output_anomalies_total", &labels), Some(anomalies), "v{version}");
    }
    server.stop().await;
}
