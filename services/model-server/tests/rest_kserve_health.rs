//! The other front doors: TF Serving's REST API (status, metadata, `:predict` in row and
//! columnar forms), KServe v2 gRPC (typed and raw contents), gRPC health and reflection.

mod support;

use proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use proto::inference::model_infer_request::InferInputTensor;
use proto::inference::{
    InferTensorContents, ModelInferRequest, ModelMetadataRequest, ModelReadyRequest, ServerReadyRequest,
};
use serde_json::{Value, json};
use support::*;
use test_support::metric;
use tonic::Code;

async fn server(flags: &[&str]) -> (tempfile::TempDir, TestServer) {
    let root = tempfile::tempdir().unwrap();
    let base = model_base(root.path(), "ae", "autoencoder", &[4]);
    let mut all = vec!["--model_name=ae".to_owned(), format!("--model_base_path={}", base.display())];
    all.extend(flags.iter().map(|f| (*f).to_owned()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    (root, TestServer::start(&all).await)
}

async fn post(addr: std::net::SocketAddr, path: &str, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new().post(format!("http://{addr}{path}")).json(&body).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

fn floats(value: &Value) -> Vec<f32> {
    value.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_api_speaks_tf_serving_json() {
    let (_root, server) = server(&[]).await;
    drop(server.channel().await);
    let (shape, input, expected) = autoencoder_golden().remove(0);
    assert_eq!(shape, [1, 18]);

    let status: Value = serde_json::from_str(&get_text(server.rest, "/v1/models/ae").await).unwrap();
    assert_eq!(status["model_version_status"][0]["version"], "4");
    assert_eq!(status["model_version_status"][0]["state"], "AVAILABLE");
    let metadata: Value =
        serde_json::from_str(&get_text(server.rest, "/v1/models/ae/versions/4/metadata").await).unwrap();
    let sensors = &metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]["sensors"];
    assert_eq!(sensors["dtype"], "DT_FLOAT");
    assert_eq!(sensors["tensor_shape"]["dim"][1]["size"], "18");

    // Row form: predictions[i] is row i of the single output.
    let (code, body) =
        post(server.rest, "/v1/models/ae:predict", json!({ "instances": [input.clone(), input.clone()] })).await;
    assert_eq!(code, 200, "{body}");
    let predictions = body["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 2);
    assert_close(&floats(&predictions[1]), &expected, "REST instances");
    // Columnar form, pinned to the version; a single output comes back bare.
    let (code, body) = post(
        server.rest,
        "/v1/models/ae/versions/4:predict",
        json!({ "signature_name": "serving_default", "inputs": { "sensors": [input.clone()] } }),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_close(&floats(&body["outputs"][0]), &expected, "REST inputs");
    // f32 outputs print in their shortest form, as TF Serving's do.
    let text = body["outputs"][0][0].to_string();
    assert!(text.len() <= 14, "shortest f32 digits, got {text}");

    // Errors: status codes and messages.
    let (code, body) = post(server.rest, "/v1/models/ae:predict", json!({ "instances": [[1.0, 2.0]] })).await;
    assert_eq!(code, 400);
    assert!(body["error"].as_str().unwrap().contains("[-1,18]"), "{body}");
    let (code, body) = post(server.rest, "/v1/models/nope:predict", json!({ "instances": [input] })).await;
    assert_eq!(code, 404, "{body}");
    let (code, _) = post(server.rest, "/v1/models/ae:classify", json!({ "examples": [] })).await;
    assert_eq!(code, 501);
    let metrics = get_text(server.rest, "/metrics").await;
    let labels = [("api", "rest_predict"), ("model", "ae"), ("version", "4"), ("signature", "serving_default")];
    assert_eq!(metric(&metrics, "model_server_requests_total", &labels), Some(3.0), "{metrics}");
    assert!(metrics.contains("process_start_time_seconds"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_v2_infer_with_typed_and_raw_contents() {
    let (_root, server) = server(&[]).await;
    let mut client = GrpcInferenceServiceClient::new(server.channel().await);
    assert!(client.server_ready(ServerReadyRequest {}).await.unwrap().into_inner().ready);
    let ready = client.model_ready(ModelReadyRequest { name: "ae".into(), version: "4".into() }).await.unwrap();
    assert!(ready.into_inner().ready);
    let metadata = client
        .model_metadata(ModelMetadataRequest { name: "ae".into(), version: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metadata.versions, ["4"]);
    assert_eq!((metadata.inputs[0].name.as_str(), metadata.inputs[0].datatype.as_str()), ("sensors", "FP32"));
    assert_eq!(metadata.inputs[0].shape, [-1, 18]);

    let (shape, input, expected) = autoencoder_golden().remove(0);
    let tensor = |contents| InferInputTensor {
        name: "sensors".into(),
        datatype: "FP32".into(),
        shape: shape.iter().map(|&d| d as i64).collect(),
        contents,
        ..Default::default()
    };
    let typed = ModelInferRequest {
        model_name: "ae".into(),
        id: "req-1".into(),
        inputs: vec![tensor(Some(InferTensorContents { fp32_contents: input.clone(), ..Default::default() }))],
        ..Default::default()
    };
    let raw = ModelInferRequest {
        model_name: "ae".into(),
        model_version: "4".into(),
        inputs: vec![tensor(None)],
        raw_input_contents: vec![input.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>()],
        ..Default::default()
    };
    for request in [typed, raw] {
        let id = request.id.clone();
        let response = client.model_infer(request).await.unwrap().into_inner();
        assert_eq!(
            (response.model_name.as_str(), response.model_version.as_str(), response.id.as_str()),
            ("ae", "4", id.as_str())
        );
        assert_eq!(response.outputs[0].name, "output_0");
        assert_eq!(response.outputs[0].datatype, "FP32");
        assert_eq!(response.outputs[0].shape, [1, 18]);
        let values: Vec<f32> =
            response.raw_output_contents[0].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_close(&values, &expected, "KServe ModelInfer");
    }
    let bad = ModelInferRequest {
        model_name: "ae".into(),
        inputs: vec![tensor(Some(InferTensorContents { fp32_contents: vec![1.0; 5], ..Default::default() }))],
        ..Default::default()
    };
    let status = client.model_infer(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("\"sensors\"") && status.message().contains("5 values"), "{}", status.message());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_and_reflection() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let (_root, server) = server(&["--enable_grpc_healthcheck_service"]).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "tensorflow.serving.PredictionService", "PredictionService", "ModelService", "ae"] {
        let response = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(response.status(), ServingStatus::Serving, "service {service:?}");
    }
    let unknown = health.check(HealthCheckRequest { service: "other".into() }).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    // Reflection lists the three APIs, so grpcurl works without .proto files.
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("no service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in
        ["tensorflow.serving.PredictionService", "tensorflow.serving.ModelService", "inference.GRPCInferenceService"]
    {
        assert!(names.iter().any(|n| n == expected), "{expected} in {names:?}");
    }
    server.stop().await;
}

/// KServe v2 over HTTP: health, server and model metadata, readiness, and `infer` with
/// JSON tensors (flat and nested) and with Triton's binary tensor data extension, each
/// answer TensorFlow's; errors in the protocol's `{"error": ...}` form, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_v2_over_http_with_json_and_binary_tensors() {
    let (_root, server) = server(&[]).await;
    let http = reqwest::Client::new();
    let url = |path: &str| format!("http://{}{path}", server.rest);
    let status = async |path: &str| http.get(url(path)).send().await.unwrap().status().as_u16();
    assert_eq!(status("/v2/health/live").await, 200);
    assert_eq!(status("/v2/health/ready").await, 200);
    assert_eq!(status("/v2/models/ae/ready").await, 200);
    assert_eq!(status("/v2/models/ae/versions/4/ready").await, 200);
    assert_eq!(status("/v2/models/ae/versions/5/ready").await, 400);
    assert_eq!(status("/v2/models/nope/ready").await, 400);
    let server_metadata: Value = http.get(url("/v2")).send().await.unwrap().json().await.unwrap();
    assert_eq!(server_metadata["extensions"], json!(["binary_tensor_data"]));
    let metadata: Value = http.get(url("/v2/models/ae")).send().await.unwrap().json().await.unwrap();
    assert_eq!(metadata["versions"], json!(["4"]));
    assert_eq!(metadata["inputs"], json!([{ "name": "sensors", "datatype": "FP32", "shape": [-1, 18] }]));

    for (case, (dims, input, expected)) in autoencoder_golden().into_iter().enumerate() {
        // JSON in, JSON out; nested data for one case, flat for the others.
        let data = if case == 0 { json!([input.clone()]) } else { json!(input.clone()) };
        let request = json!({
            "id": format!("case-{case}"),
            "inputs": [{ "name": "sensors", "shape": dims, "datatype": "FP32", "data": data }],
        });
        let (code, body) = post(server.rest, "/v2/models/ae/infer", request).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["id"], json!(format!("case-{case}")));
        assert_eq!((body["model_name"].as_str(), body["model_version"].as_str()), (Some("ae"), Some("4")));
        let output = &body["outputs"][0];
        assert_eq!((output["name"].as_str(), output["datatype"].as_str()), (Some("output_0"), Some("FP32")));
        assert_eq!(output["shape"], json!(dims));
        assert_close(&floats(&output["data"]), &expected, &format!("JSON case {case}"));

        // Binary in, binary out, as tritonclient.http sends by default.
        let header = serde_json::to_vec(&json!({
            "inputs": [{ "name": "sensors", "shape": dims, "datatype": "FP32",
                         "parameters": { "binary_data_size": input.len() * 4 } }],
            "outputs": [{ "name": "output_0", "parameters": { "binary_data": true } }],
        }))
        .unwrap();
        let mut body = header.clone();
        body.extend(input.iter().flat_map(|x| x.to_le_bytes()));
        let response = http
            .post(url("/v2/models/ae/versions/4/infer"))
            .header("Inference-Header-Content-Length", header.len())
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let json_length: usize =
            response.headers()["inference-header-content-length"].to_str().unwrap().parse().unwrap();
        let bytes = response.bytes().await.unwrap();
        let answer: Value = serde_json::from_slice(&bytes[..json_length]).unwrap();
        assert_eq!(answer["outputs"][0]["parameters"]["binary_data_size"], json!(expected.len() * 4));
        let got: Vec<f32> =
            bytes[json_length..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_close(&got, &expected, &format!("binary case {case}"));
    }

    // Errors name what was wrong, with the protocol's form and the HTTP status of the code.
    let refused = async |body: Vec<u8>, header_length: Option<usize>| {
        let mut request = http.post(url("/v2/models/ae/infer")).body(body);
        if let Some(length) = header_length {
            request = request.header("Inference-Header-Content-Length", length);
        }
        let response = request.send().await.unwrap();
        let code = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        (code, body["error"].as_str().unwrap_or_default().to_owned())
    };
    let input = |extra: Value| {
        let mut tensor = json!({ "name": "sensors", "shape": [1, 18], "datatype": "FP32" });
        tensor.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::to_vec(&json!({ "inputs": [tensor] })).unwrap()
    };
    let (code, message) = refused(input(json!({ "data": vec![0.5; 17] })), None).await;
    assert_eq!(code, 400);
    assert!(message.contains("sensors"), "{message}");
    let (code, message) = refused(input(json!({ "data": [["x"]] })), None).await;
    assert_eq!(code, 400);
    assert!(message.contains("\"sensors\"") && message.contains("a string"), "{message}");
    let (code, message) = refused(br#"{"inputs": [{"name": "sensors", "shap": [1]}]}"#.to_vec(), None).await;
    assert_eq!(code, 400);
    assert!(message.contains("shap"), "{message}");
    let (code, message) = refused(input(json!({})), None).await;
    assert_eq!(code, 400);
    assert!(message.contains("neither data nor binary_data_size"), "{message}");
    // A binary size past the body, a header length past the body, bytes left over.
    let claims_too_much = input(json!({ "parameters": { "binary_data_size": 1_u64 << 40 } }));
    let length = claims_too_much.len();
    let (code, message) = refused(claims_too_much, Some(length)).await;
    assert_eq!(code, 400);
    assert!(message.contains("binary_data_size is 1099511627776"), "{message}");
    let (code, message) = refused(input(json!({ "data": vec![0.5; 18] })), Some(1 << 30)).await;
    assert_eq!(code, 400);
    assert!(message.contains("Inference-Header-Content-Length"), "{message}");
    let mut left_over = input(json!({ "data": vec![0.5; 18] }));
    let length = left_over.len();
    left_over.extend([0u8; 8]);
    let (code, message) = refused(left_over, Some(length)).await;
    assert_eq!(code, 400);
    assert!(message.contains("8 bytes of binary data follow"), "{message}");
    let (code, message) = refused(input(json!({ "data": vec![0.5; 18] })), None).await;
    assert_eq!(code, 200, "{message}");
    let (code, body) = post(server.rest, "/v2/models/nope/infer", json!({ "inputs": [] })).await;
    assert_eq!(code, 404, "{body}");

    // Counted like the other front doors, under their own API label.
    let metrics = get_text(server.rest, "/metrics").await;
    let answered = metric(&metrics, "model_server_requests_total", &[("api", "kserve_rest_infer"), ("model", "ae")]);
    assert!(answered.unwrap_or(0.0) >= 7.0, "{answered:?}");
    server.stop().await;
}
