//! TF Serving's gRPC API end to end over real HTTP/2 on loopback: Predict answers match
//! TensorFlow's golden outputs in both tensor encodings, metadata and status read like TF
//! Serving's, and every error path answers with the right code and a message naming the
//! model, input and expectation.

mod support;

use prost::Message;
use proto::tensorflow::serving::model_service_client::ModelServiceClient;
use proto::tensorflow::serving::model_spec::VersionChoice;
use proto::tensorflow::serving::{
    ClassificationRequest, GetModelMetadataRequest, GetModelStatusRequest, PredictRequest, SignatureDefMap,
};
use proto::tensorflow::{TensorProto, tensor_info};
use support::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predict_matches_tensorflow_in_typed_and_content_encodings() {
    let root = tempfile::tempdir().unwrap();
    let base = model_base(root.path(), "autoencoder", "autoencoder", &[1]);
    let server =
        TestServer::start(&["--model_name=autoencoder", &format!("--model_base_path={}", base.display())]).await;
    let mut client = server.predict_client().await;
    for (case, (dims, input, expected)) in autoencoder_golden().into_iter().enumerate() {
        let request = PredictRequest {
            model_spec: spec("autoencoder", None, None, ""),
            inputs: [("sensors".to_owned(), float_tensor(&dims, &input))].into(),
            output_filter: vec![],
        };
        let response = client.predict(request).await.unwrap().into_inner();
        let answered = response.model_spec.unwrap();
        assert_eq!(answered.name, "autoencoder");
        assert_eq!(answered.version_choice, Some(VersionChoice::Version(1)));
        assert_eq!(answered.signature_name, "serving_default", "the response names the signature used");
        let output = &response.outputs["output_0"];
        assert_eq!(output.dtype, 1);
        assert!(output.tensor_content.is_empty(), "typed fields by default, as TF Serving");
        assert_close(&output.float_val, &expected, &format!("case {case}"));

        // The same input as tensor_content bytes.
        let bytes: Vec<u8> = input.iter().flat_map(|f| f.to_le_bytes()).collect();
        let tensor = TensorProto { dtype: 1, tensor_shape: shape(&dims), tensor_content: bytes, ..Default::default() };
        let request = PredictRequest {
            model_spec: spec("autoencoder", Some(1), None, "serving_default"),
            inputs: [("sensors".to_owned(), tensor)].into(),
            output_filter: vec!["output_0".into()],
        };
        let response = client.predict(request).await.unwrap().into_inner();
        assert_close(&response.outputs["output_0"].float_val, &expected, &format!("case {case}, tensor_content"));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensor_content_responses_when_asked() {
    let root = tempfile::tempdir().unwrap();
    let base = model_base(root.path(), "ae", "autoencoder", &[1]);
    let server = TestServer::serving("ae", &base, &["--enable_serialization_as_tensor_content"]).await;
    let (shape, input, expected) = autoencoder_golden().remove(0);
    let request = PredictRequest {
        model_spec: spec("ae", None, None, ""),
        inputs: [("sensors".to_owned(), float_tensor(&shape, &input))].into(),
        output_filter: vec![],
    };
    let response = server.predict_client().await.predict(request).await.unwrap().into_inner();
    let output = &response.outputs["output_0"];
    assert!(output.float_val.is_empty());
    let values: Vec<f32> = output.tensor_content.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_close(&values, &expected, "tensor_content output");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_and_status_read_like_tf_serving() {
    let root = tempfile::tempdir().unwrap();
    let base = model_base(root.path(), "two_io", "module_two_io", &[3]);
    let server = TestServer::start(&["--model_name=two_io", &format!("--model_base_path={}", base.display())]).await;
    let mut client = server.predict_client().await;
    let response = client
        .get_model_metadata(GetModelMetadataRequest {
            model_spec: spec("two_io", None, None, ""),
            metadata_field: vec!["signature_def".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.model_spec.unwrap().version_choice, Some(VersionChoice::Version(3)));
    let any = &response.metadata["signature_def"];
    assert_eq!(any.type_url, "type.googleapis.com/tensorflow.serving.SignatureDefMap");
    let map = SignatureDefMap::decode(any.value.as_slice()).unwrap();
    let def = &map.signature_def["serving_default"];
    assert_eq!(def.method_name, "tensorflow/serving/predict");
    let mut inputs: Vec<&String> = def.inputs.keys().collect();
    inputs.sort();
    assert_eq!(inputs, ["context", "readings"]);
    let readings = &def.inputs["readings"];
    assert!(matches!(&readings.encoding, Some(tensor_info::Encoding::Name(n)) if n.contains("readings")));
    assert_eq!(readings.dtype, 1);
    assert_eq!(readings.tensor_shape.as_ref().unwrap().dim[0].size, -1);
    assert!(def.outputs.contains_key("anomaly_score") && def.outputs.contains_key("embedding"));

    let mut models = ModelServiceClient::new(server.channel().await);
    let status = models
        .get_model_status(GetModelStatusRequest { model_spec: spec("two_io", None, None, "") })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.model_version_status.len(), 1);
    let v = &status.model_version_status[0];
    assert_eq!((v.version, v.state), (3, 30), "version 3 AVAILABLE");
    assert_eq!(v.status.as_ref().unwrap().error_code, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_path_has_its_code_and_names_what_was_wrong() {
    let root = tempfile::tempdir().unwrap();
    let base = model_base(root.path(), "ae", "autoencoder", &[1]);
    // The bare flag, as TF Serving's users write it.
    let [_, parameters] = batching_flags(root.path(), "max_batch_size { value: 8 }\nnum_batch_threads { value: 1 }\n");
    let server = TestServer::serving("ae", &base, &["--enable_batching", &parameters, "--max_request_rows=100"]).await;
    let mut client = server.predict_client().await;
    let row = vec![0.5f32; 18];
    let good = |rows: usize| [("sensors".to_owned(), float_tensor(&[rows, 18], &row.repeat(rows)))].into();
    let request =
        |spec, inputs, filter: Vec<String>| PredictRequest { model_spec: spec, inputs, output_filter: filter };

    let cases: Vec<(PredictRequest, Code, Vec<&str>)> = vec![
        (request(None, good(1), vec![]), Code::InvalidArgument, vec!["model_spec"]),
        (request(spec("", None, None, ""), good(1), vec![]), Code::InvalidArgument, vec!["model_spec.name"]),
        (request(spec("nope", None, None, ""), good(1), vec![]), Code::NotFound, vec!["\"nope\"", "ae"]),
        (request(spec("ae", Some(7), None, ""), good(1), vec![]), Code::NotFound, vec!["version 7", "available: 1"]),
        (request(spec("ae", None, Some("stable"), ""), good(1), vec![]), Code::NotFound, vec!["\"stable\""]),
        (
            request(spec("ae", None, None, "predict"), good(1), vec![]),
            Code::InvalidArgument,
            vec!["\"predict\"", "serving_default"],
        ),
        (
            request(
                spec("ae", None, None, ""),
                [("sensors".into(), float_tensor(&[1, 17], &row[..17]))].into(),
                vec![],
            ),
            Code::InvalidArgument,
            vec!["\"ae\"", "\"sensors\"", "[1, 17]", "[-1,18]"],
        ),
        (
            request(spec("ae", None, None, ""), [("readings".into(), float_tensor(&[1, 18], &row))].into(), vec![]),
            Code::InvalidArgument,
            vec!["\"readings\"", "sensors"],
        ),
        (
            request(
                spec("ae", None, None, ""),
                [(
                    "sensors".into(),
                    TensorProto {
                        dtype: 9,
                        tensor_shape: shape(&[1, 18]),
                        int64_val: vec![1; 18],
                        ..Default::default()
                    },
                )]
                .into(),
                vec![],
            ),
            Code::InvalidArgument,
            vec!["\"sensors\"", "i64", "f32"],
        ),
        (
            request(
                spec("ae", None, None, ""),
                [("sensors".into(), TensorProto { dtype: 7, tensor_shape: shape(&[1]), ..Default::default() })].into(),
                vec![],
            ),
            Code::InvalidArgument,
            vec!["\"sensors\"", "DT_STRING"],
        ),
        (
            request(spec("ae", None, None, ""), Default::default(), vec![]),
            Code::InvalidArgument,
            vec!["\"sensors\"", "missing"],
        ),
        (
            request(spec("ae", None, None, ""), good(1), vec!["nope".into()]),
            Code::InvalidArgument,
            vec!["output_filter", "\"nope\"", "output_0"],
        ),
        (
            request(spec("ae", None, None, ""), good(9), vec![]),
            Code::InvalidArgument,
            vec!["9 rows", "max_batch_size (8)"],
        ),
        (request(spec("ae", None, None, ""), good(101), vec![]), Code::InvalidArgument, vec!["101 rows", "100"]),
    ];
    for (index, (request, code, fragments)) in cases.into_iter().enumerate() {
        let status = client.predict(request).await.expect_err(&format!("case {index} must fail"));
        assert_eq!(status.code(), code, "case {index}: {}", status.message());
        for fragment in fragments {
            assert!(status.message().contains(fragment), "case {index}: {:?} lacks {fragment:?}", status.message());
        }
    }
    let status = client.classify(ClassificationRequest { model_spec: spec("ae", None, None, "") }).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(status.message().contains("Predict"), "{}", status.message());
    let status = client
        .get_model_metadata(GetModelMetadataRequest {
            model_spec: spec("ae", None, None, ""),
            metadata_field: vec!["x".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("\"x\""), "{}", status.message());
    server.stop().await;
}

/// TF Serving's metric names at its monitoring path (`--monitoring_config_file`), from
/// the same requests as Vigil's own: a TF Serving dashboard's queries find their series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tf_serving_metric_names_answer_at_the_monitoring_path() {
    use test_support::metric;
    let root = tempfile::tempdir().unwrap();
    let base = model_base(root.path(), "ae", "autoencoder", &[1]);
    let monitoring = root.path().join("monitoring.config");
    std::fs::write(&monitoring, "prometheus_config { enable: true path: \"/monitoring/prometheus/metrics\" }\n")
        .unwrap();
    // A batch window, so every request goes through the queue; sizes padded to 8.
    let [enable, parameters] = batching_flags(
        root.path(),
        "max_batch_size { value: 8 }\nbatch_timeout_micros { value: 1000 }\nallowed_batch_sizes: 8\n",
    );
    let monitoring = format!("--monitoring_config_file={}", monitoring.display());
    let server = TestServer::serving("ae", &base, &[&enable, &parameters, &monitoring]).await;
    let mut client = server.predict_client().await;
    let predict = |model: &str, rows: usize, width: usize| PredictRequest {
        model_spec: spec(model, None, None, ""),
        inputs: [("sensors".to_owned(), float_tensor(&[rows, width], &vec![0.25; rows * width]))].into(),
        output_filter: vec![],
    };
    let answered = 5;
    for _ in 0..answered {
        client.predict(predict("ae", 3, 18)).await.unwrap();
    }
    let wrong_shape = client.predict(predict("ae", 1, 17)).await.unwrap_err();
    assert_eq!(wrong_shape.code(), Code::InvalidArgument);
    let unknown = client.predict(predict("a-name-no-series-may-carry", 1, 18)).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let text = get_text(server.rest, "/monitoring/prometheus/metrics").await;
    let count = |labels: &[(&str, &str)]| metric(&text, ":tensorflow:serving:request_count", labels);
    assert_eq!(count(&[("model_name", "ae"), ("status", "OK")]), Some(answered as f64));
    assert_eq!(count(&[("model_name", "ae"), ("status", "INVALID_ARGUMENT")]), Some(1.0));
    // A model name nobody configured is counted, under an empty name: never a new series.
    assert_eq!(count(&[("model_name", ""), ("status", "NOT_FOUND")]), Some(1.0));
    assert!(!text.contains("a-name-no-series-may-carry"), "a client's string became a label");
    // Latency in microseconds, successful requests only, as TF Serving records it.
    let latency = [("API", "Predict"), ("entrypoint", "GRPC"), ("model_name", "ae")];
    assert_eq!(metric(&text, ":tensorflow:serving:request_latency_count", &latency), Some(answered as f64));
    let mean_us = metric(&text, ":tensorflow:serving:request_latency_sum", &latency).unwrap() / answered as f64;
    assert!((1.0..10_000_000.0).contains(&mean_us), "a mean latency of {mean_us} us");
    // Batching: every answered request queued; 3 rows padded to 8 per run.
    assert_eq!(
        metric(&text, ":tensorflow:serving:batching_session:queuing_latency_count", &[("thread_pool_name", "")]),
        Some(answered as f64)
    );
    let runs = metric(&text, ":tensorflow:serving:batching_session:processed_batch_size_count", &[]).unwrap();
    assert!((1.0..=answered as f64).contains(&runs), "{runs} engine runs for {answered} requests");
    let input_rows = metric(&text, ":tensorflow:serving:batching_session:input_batch_size_sum", &[]).unwrap();
    assert_eq!(input_rows, (answered * 3) as f64, "every request's rows, before padding");
    let processed = metric(&text, ":tensorflow:serving:batching_session:processed_batch_size_sum", &[]).unwrap();
    assert_eq!(processed, runs * 8.0, "each run padded to 8 rows");
    let padding =
        metric(&text, ":tensorflow:serving:batching_session:padding_size_sum", &[("execution_batch_size", "8")]);
    assert_eq!(padding, Some(processed - input_rows));
    // The load, by version directory.
    let path = base.join("1").display().to_string();
    let load = [("model_path", path.as_str()), ("status", "success")];
    assert_eq!(metric(&text, ":tensorflow:cc:saved_model:load_attempt_count", &load), Some(1.0));
    let load_us = metric(&text, ":tensorflow:cc:saved_model:load_latency", &[("model_path", path.as_str())]).unwrap();
    assert!(load_us > 0.0, "the load took {load_us} us");
    // Vigil's own names are still there, beside TF Serving's.
    assert!(text.contains("model_server_requests_total"));
    server.stop().await;
}
