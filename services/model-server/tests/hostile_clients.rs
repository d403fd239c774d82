//! The model server as a hostile client finds it: the real binary, on loopback, sent what
//! no well-behaved client sends. Every case asserts the answer's code, that the server keeps
//! serving afterwards, and, over the whole run, that its peak resident memory stays within
//! [`RSS_BOUND_MIB`] of what it used before the first hostile request.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

mod support;
use std::process::{Command, Stdio};
use std::time::Duration;

use proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use proto::inference::model_infer_request::InferInputTensor;
use proto::inference::{InferTensorContents, ModelInferRequest, ServerReadyRequest};
use proto::tensorflow::serving::model_service_client::ModelServiceClient;
use proto::tensorflow::serving::prediction_service_client::PredictionServiceClient;
use proto::tensorflow::serving::{GetModelStatusRequest, ModelConfig, ModelSpec, PredictRequest};
use proto::tensorflow::{TensorProto, TensorShapeProto, tensor_shape_proto};
use proto::vigil::rollout::v1::AbortRolloutRequest;
use proto::vigil::rollout::v1::rollout_service_client::RolloutServiceClient;
use test_support::{ChildService, Endpoint, Output};
use tonic::Code;
use tonic::transport::Channel;

/// How far above its pre-attack resident size the server may ever go.
const RSS_BOUND_MIB: u64 = 256;

const MODEL: &str = "autoencoder";
const BUNDLED: &str = "car-anomaly";

/// The real `model-server` binary serving the autoencoder fixture from `models/autoencoder`
/// (killed when dropped).
struct Server {
    process: ChildService,
    grpc: SocketAddr,
    rest: Endpoint,
    models: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Server::start_in(tempfile::tempdir().unwrap(), extra)
    }

    /// Serves from `dir/models` (so a flag can name `dir`, e.g. as an allowed root).
    fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Server {
        let models =
            support::model_base(&dir.path().join("models"), MODEL, "autoencoder", &[1]).parent().unwrap().to_owned();
        let model = [format!("--model_name={MODEL}"), format!("--model_base_path={}", models.join(MODEL).display())];
        Server::spawn(dir, models, &model, extra)
    }

    /// Serves every version of the bundled car-anomaly model (v1 and v2 take one reading per
    /// signal, `[-1]`; v3 a window of 10, `[-1, 10]`).
    fn start_bundled() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/models/car-anomaly");
        let config = dir.path().join("models.config");
        std::fs::write(&config, model_server::model_config::all_versions_config(BUNDLED, &base).unwrap()).unwrap();
        Server::spawn(dir, base, &[format!("--model_config_file={}", config.display())], &[])
    }

    fn spawn(dir: tempfile::TempDir, models: PathBuf, model: &[String], extra: &[&str]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_model-server"));
        command
            .args(["--port=0", "--bind_address=127.0.0.1", "--rest_api_address=127.0.0.1:0"])
            .args(model)
            .args(["--enable_grpc_healthcheck_service", "--file_system_poll_wait_seconds=0"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null());
        let mut process = ChildService::spawn("model-server", command, Output::Stdout);
        // Its first two lines, as TF Serving prints them.
        let mut address = |prefix: &str| -> SocketAddr {
            let line = process.next_line(Duration::from_secs(60));
            line.strip_prefix(prefix).unwrap_or_else(|| panic!("{line:?}")).trim().parse().unwrap()
        };
        let grpc = address("Running gRPC ModelServer at ");
        let rest = Endpoint::new(address("Exporting HTTP/REST API at "));
        Server { process, grpc, rest, models, _dir: dir }
    }

    async fn channel(&self) -> Channel {
        support::channel_to(self.grpc, Duration::from_secs(60)).await
    }

    /// (current, peak) resident set size in KiB, from /proc.
    fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.process.id())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} in /proc status"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    fn is_running(&mut self) -> bool {
        self.process.is_running()
    }
}

fn shape(dims: &[i64]) -> Option<TensorShapeProto> {
    Some(TensorShapeProto {
        dim: dims.iter().map(|&size| tensor_shape_proto::Dim { size, ..Default::default() }).collect(),
        ..Default::default()
    })
}

fn predict_request(model: &str, signature: &str, inputs: Vec<(&str, TensorProto)>) -> PredictRequest {
    PredictRequest {
        model_spec: Some(ModelSpec { name: model.into(), signature_name: signature.into(), ..Default::default() }),
        inputs: inputs.into_iter().map(|(n, t)| (n.to_owned(), t)).collect(),
        output_filter: Vec::new(),
    }
}

fn one_row() -> TensorProto {
    TensorProto { dtype: 1, tensor_shape: shape(&[1, 18]), float_val: vec![0.5; 18], ..Default::default() }
}

/// A 32-byte tensor declaring `rows` x 18 floats with one value (TF's fill rule repeats it).
fn huge_declared(rows: i64) -> TensorProto {
    TensorProto { dtype: 1, tensor_shape: shape(&[rows, 18]), float_val: vec![1.0], ..Default::default() }
}

async fn predict(channel: &Channel, request: PredictRequest) -> Result<(), tonic::Status> {
    PredictionServiceClient::new(channel.clone()).predict(request).await.map(drop)
}

fn expect_code(result: Result<(), tonic::Status>, code: Code, needle: &str, case: &str) {
    let status = result.expect_err(case);
    assert_eq!(status.code(), code, "{case}: {status:?}");
    assert!(status.message().contains(needle), "{case}: {:?} lacks {needle:?}", status.message());
}

/// The server still does its job: a real prediction answers, and REST says ready.
async fn assert_serving(server: &Server, channel: &Channel, case: &str) {
    predict(channel, predict_request(MODEL, "", vec![("sensors", one_row())]))
        .await
        .unwrap_or_else(|e| panic!("after {case}: Predict failed: {e:?}"));
    assert_eq!(server.rest.status("/ready").await, 200, "after {case}: /ready");
}

fn model_config(name: &str, base_path: &Path) -> ModelConfig {
    ModelConfig {
        name: name.into(),
        base_path: base_path.display().to_string(),
        model_platform: "tensorflow".into(),
        ..Default::default()
    }
}

fn kserve_input(name: &str, shape: Vec<i64>, contents: Option<InferTensorContents>) -> InferInputTensor {
    InferInputTensor { name: name.into(), datatype: "FP32".into(), shape, contents, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_clear_codes_and_the_server_keeps_serving_within_its_memory_bound() {
    let mut server = Server::start(&[]);
    let channel = server.channel().await;
    assert_serving(&server, &channel, "start-up").await;
    let (baseline, _) = server.rss_kib();

    // 1. One float and a 250M-row shape, to a model that is not served: NOT_FOUND, and
    //    nothing is decoded (it was 1.9 GiB resident before admission came first).
    let request = predict_request("not-served", "", vec![("sensors", huge_declared(250_000_000))]);
    expect_code(predict(&channel, request).await, Code::NotFound, "not-served", "unserved model, huge shape");

    // 2. The same to the served model, once and three times over: refused by the row limit.
    let request = predict_request(MODEL, "", vec![("sensors", huge_declared(250_000_000))]);
    expect_code(predict(&channel, request).await, Code::InvalidArgument, "rows", "served model, huge shape");
    let request = predict_request(
        MODEL,
        "",
        vec![
            ("sensors", huge_declared(250_000_000)),
            ("b", huge_declared(250_000_000)),
            ("c", huge_declared(250_000_000)),
        ],
    );
    // Inputs are a map: whichever is admitted first is refused (an unknown name or its rows).
    expect_code(predict(&channel, request).await, Code::InvalidArgument, "input \"", "three huge inputs");

    // 3. Within the row limit but declaring more than the per-request budget: a ragged
    //    dimension the signature fixes, and an overflow.
    let request = predict_request(
        MODEL,
        "",
        vec![(
            "sensors",
            TensorProto { dtype: 1, tensor_shape: shape(&[1, 1 << 40]), float_val: vec![1.0], ..Default::default() },
        )],
    );
    expect_code(predict(&channel, request).await, Code::InvalidArgument, "shape", "wrong fixed dimension");
    let request = predict_request(
        MODEL,
        "",
        vec![("sensors", TensorProto { dtype: 1, tensor_shape: shape(&[i64::MAX, i64::MAX]), ..Default::default() })],
    );
    expect_code(predict(&channel, request).await, Code::InvalidArgument, "sensors", "overflowing shape");
    let request = predict_request(
        MODEL,
        "",
        vec![("sensors", TensorProto { dtype: 9, tensor_shape: shape(&[1, 18]), ..Default::default() })],
    );
    expect_code(predict(&channel, request).await, Code::InvalidArgument, "dtype", "wrong dtype");
    assert_serving(&server, &channel, "huge TensorProtos").await;
    eprintln!("peak after the TensorProto cases: {} MiB", server.rss_kib().1 / 1024);

    // 4. KServe: a huge declared shape, typed and raw; a 60 MB typed request; duplicate names.
    let mut kserve = GrpcInferenceServiceClient::new(channel.clone()).max_encoding_message_size(usize::MAX);
    let infer = |inputs: Vec<InferInputTensor>, raw: Vec<Vec<u8>>| ModelInferRequest {
        model_name: MODEL.into(),
        inputs,
        raw_input_contents: raw,
        ..Default::default()
    };
    let one = || InferTensorContents { fp32_contents: vec![1.0], ..Default::default() };
    let status = kserve
        .model_infer(infer(vec![kserve_input("sensors", vec![250_000_000, 18], Some(one()))], vec![]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = kserve
        .model_infer(infer(vec![kserve_input("sensors", vec![250_000_000, 18], None)], vec![vec![0; 72]]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let rows = 15_000_000 / 18;
    let big = InferTensorContents { fp32_contents: vec![0.25; rows * 18], ..Default::default() };
    let status = kserve
        .model_infer(infer(vec![kserve_input("sensors", vec![rows as i64, 18], Some(big))], vec![]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "60 MB KServe request: {status:?}");
    let row = || InferTensorContents { fp32_contents: vec![0.5; 18], ..Default::default() };
    let status = kserve
        .model_infer(infer(
            vec![kserve_input("sensors", vec![1, 18], Some(row())), kserve_input("sensors", vec![1, 18], Some(row()))],
            vec![],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("more than once"), "{status:?}");
    assert_serving(&server, &channel, "hostile KServe requests").await;
    eprintln!("peak after the KServe cases (a 60 MB message among them): {} MiB", server.rss_kib().1 / 1024);

    // 5. Random 1 KiB signature names are not labels: /metrics does not grow with them.
    let before = server.rest.metrics().await;
    let calls: Vec<_> = (0..2000)
        .map(|i| {
            let channel = channel.clone();
            let name: String = format!("sig-{i}-").chars().chain(std::iter::repeat_n('x', 1024)).collect();
            async move { predict(&channel, predict_request(MODEL, &name, vec![("sensors", one_row())])).await }
        })
        .collect();
    for result in futures_join_all(calls).await {
        assert_eq!(result.unwrap_err().code(), Code::InvalidArgument);
    }
    // The same through REST.
    let url = format!("{}/v1/models/{MODEL}:predict", server.rest);
    for i in 0..200 {
        let body = serde_json::json!({ "signature_name": format!("rest-{i}-{}", "y".repeat(1024)), "instances": [vec![0.5; 18]] });
        let response = reqwest::Client::new().post(&url).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 400);
    }
    let after = server.rest.metrics().await;
    assert!(!after.contains("sig-1-x") && !after.contains("rest-1-y"), "a client's signature name became a label");
    assert!(
        after.len() < before.len() + 8 * 1024,
        "/metrics grew from {} to {} bytes with 2,200 unknown signatures",
        before.len(),
        after.len()
    );

    // 6. A model name with a NUL byte (it panicked while holding the repository's lock).
    let mut models = ModelServiceClient::new(channel.clone());
    let status = models
        .handle_reload_config_request(support::reload_request(vec![model_config("nul\0name", &server.models)]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status_request =
        GetModelStatusRequest { model_spec: Some(ModelSpec { name: MODEL.into(), ..Default::default() }) };
    models.get_model_status(status_request.clone()).await.expect("GetModelStatus after a NUL model name");
    let ready = GrpcInferenceServiceClient::new(channel.clone()).server_ready(ServerReadyRequest {}).await.unwrap();
    assert!(ready.into_inner().ready);
    assert_serving(&server, &channel, "a NUL model name").await;

    // 7. An empty model list unloads everything: then the server is not ready, and says so.
    models
        .handle_reload_config_request(support::reload_request(vec![]))
        .await
        .expect("an empty model list is a valid config");
    assert_eq!(server.rest.status("/ready").await, 503, "/ready with nothing configured");
    let ready = GrpcInferenceServiceClient::new(channel.clone()).server_ready(ServerReadyRequest {}).await.unwrap();
    assert!(!ready.into_inner().ready);
    models
        .handle_reload_config_request(support::reload_request(vec![model_config(MODEL, &server.models.join(MODEL))]))
        .await
        .expect("restoring the model");
    assert_serving(&server, &channel, "an empty model list, then the model back").await;

    // 8. Free text in management calls is bounded.
    let status = RolloutServiceClient::new(channel.clone())
        .abort_rollout(AbortRolloutRequest { model: MODEL.into(), reason: "r".repeat(1 << 20) })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("reason"), "{status:?}");

    // 9. REST: a number a float cannot hold, malformed JSON, a body over the limit.
    let http = reqwest::Client::new();
    let url = format!("{}/v1/models/{MODEL}:predict", server.rest);
    let row: Vec<f64> = std::iter::once(1e300).chain(std::iter::repeat_n(0.5, 17)).collect();
    let response = http.post(&url).json(&serde_json::json!({ "instances": [row] })).send().await.unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("1e+300"));
    let response = http.post(&url).body("{\"instances\": [[1,").send().await.unwrap();
    assert_eq!(response.status(), 400);
    let response = http.post(&url).body(vec![b' '; 5 << 20]).send().await.unwrap();
    assert_eq!(response.status(), 413);
    assert!(response.text().await.unwrap().contains("--rest_max_body_bytes"));
    // Streamed without a length: the rest is read and discarded, so the client reads the
    // 413 rather than a reset connection (repeated, as that race is rare).
    for attempt in 0..5 {
        let chunks = futures::stream::iter((0..72).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 << 10])));
        let response = http
            .post(&url)
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .unwrap_or_else(|error| panic!("streamed body {attempt}: {error:?}"));
        assert_eq!(response.status(), 413, "streamed body {attempt}");
    }

    // 9b. KServe v2 over HTTP: shapes and sizes that claim far more than the body holds,
    // a bogus JSON length header, nesting past the parser's limit, a long model name.
    let url = format!("{}/v2/models/{MODEL}/infer", server.rest);
    let kserve = |tensor: serde_json::Value| serde_json::to_vec(&serde_json::json!({ "inputs": [tensor] })).unwrap();
    let binary_claim = |shape: serde_json::Value, size: u64| {
        kserve(serde_json::json!({ "name": "sensors", "shape": shape, "datatype": "FP32",
                                   "parameters": { "binary_data_size": size } }))
    };
    let cases: Vec<(&str, Vec<u8>, Option<String>)> = vec![
        ("a 2^31-row shape with 72 bytes", [binary_claim(serde_json::json!([1_i64 << 31, 18]), 72), vec![0; 72]].concat(), None),
        ("a binary size of 2^62", binary_claim(serde_json::json!([1, 18]), 1 << 62), None),
        ("a shape whose product overflows", kserve(serde_json::json!({ "name": "sensors", "shape": [i64::MAX, 4], "datatype": "FP32", "data": [] })), None),
        ("a JSON length past the body", kserve(serde_json::json!({ "name": "sensors", "shape": [1, 18], "datatype": "FP32", "data": vec![0.5; 18] })), Some("99999999999999999999".into())),
        ("200 levels of nesting", format!("{{\"inputs\": [{{\"name\": \"sensors\", \"shape\": [1, 18], \"datatype\": \"FP32\", \"data\": {}1{}}}]}}", "[".repeat(200), "]".repeat(200)).into_bytes(), None),
        ("a million numbers for one row", kserve(serde_json::json!({ "name": "sensors", "shape": [1, 18], "datatype": "FP32", "data": vec![0; 1_000_000] })), None),
    ];
    for (case, body, header_length) in cases {
        let mut request = http.post(&url).body(body);
        if let Some(length) = header_length {
            request = request.header("Inference-Header-Content-Length", length);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 400, "{case}");
        let answer: serde_json::Value = response.json().await.unwrap();
        assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()), "{case}: {answer}");
        assert_serving(&server, &channel, case).await;
    }
    let long_name = "m".repeat(4096);
    let response = http
        .post(format!("{}/v2/models/{long_name}/infer", server.rest))
        .body("{\"inputs\": []}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert!(!server.rest.metrics().await.contains(&long_name), "a client's model name became a label");

    // 10. Not HTTP/2 at all on the gRPC port, and a connection that sends half a preface.
    for junk in [&b"GET / HTTP/1.1\r\n\r\n"[..], b"PRI * HTTP/2.0\r\n", &[0xff; 4096][..]] {
        let mut stream = std::net::TcpStream::connect(server.grpc).unwrap();
        let _ = stream.write_all(junk);
    }
    assert_serving(&server, &channel, "junk on the gRPC port").await;

    let (now, peak) = server.rss_kib();
    let grown_mib = peak.saturating_sub(baseline) / 1024;
    eprintln!("resident: {} MiB before, {} MiB peak, {} MiB now", baseline / 1024, peak / 1024, now / 1024);
    assert!(grown_mib < RSS_BOUND_MIB, "peak RSS rose {grown_mib} MiB above the {} MiB baseline", baseline / 1024);
    assert!(server.is_running());
}

/// A Predict request to a version of the bundled model: every signal `healthy`, except
/// `speed`.
fn bundled_request(version: i64, healthy: &TensorProto, speed: TensorProto) -> PredictRequest {
    let mut request = predict_request(BUNDLED, "", Vec::new());
    request.model_spec.as_mut().unwrap().version_choice =
        Some(proto::tensorflow::serving::model_spec::VersionChoice::Version(version));
    for signal in sensor::signals().iter().filter(|s| s.name != "control_unit_firmware") {
        request.inputs.insert(signal.name.to_owned(), healthy.clone());
    }
    request.inputs.insert("speed".to_owned(), speed);
    request
}

fn floats(dims: &[i64], values: Vec<f32>) -> TensorProto {
    TensorProto { dtype: 1, tensor_shape: shape(dims), float_val: values, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_of_any_width_are_bounded_before_decoding_and_the_server_keeps_serving() {
    let mut server = Server::start_bundled();
    let channel = server.channel().await;
    // A window of 64 readings of 1.0 per signal: every version takes its newest part.
    let window = || floats(&[1, 64], vec![1.0; 64]);
    for version in [1, 2, 3] {
        predict(&channel, bundled_request(version, &window(), window()))
            .await
            .unwrap_or_else(|e| panic!("v{version}, a 64-reading window: {e:?}"));
    }
    let (baseline, _) = server.rss_kib();

    // One float declaring a window of 2^40 readings, to a one-reading input and to a
    // windowed one: refused by the decoded-bytes budget, naming the input.
    for version in [2, 3] {
        let request = bundled_request(version, &window(), floats(&[1, 1 << 40], vec![1.0]));
        expect_code(predict(&channel, request).await, Code::InvalidArgument, "\"speed\"", "a 2^40-reading window");
    }
    // Many rows of a wide window; a window narrower than v3's, or empty; a third dimension.
    let cases: [(i64, Vec<i64>, &str); 5] = [
        (3, vec![1 << 30, 64], "rows"),
        (2, vec![1 << 20, 1 << 20], "speed"),
        (3, vec![1, 5], "speed"),
        (2, vec![1, 0], "speed"),
        (3, vec![1, 10, 1 << 30], "speed"),
    ];
    for (version, dims, needle) in cases {
        let request = bundled_request(version, &window(), floats(&dims, vec![1.0]));
        expect_code(predict(&channel, request).await, Code::InvalidArgument, needle, &format!("v{version} {dims:?}"));
    }
    // A window whose values do not fill its shape.
    let request = bundled_request(3, &window(), floats(&[2, 64], vec![1.0; 65]));
    expect_code(predict(&channel, request).await, Code::InvalidArgument, "speed", "65 values for [2, 64]");

    for version in [1, 2, 3] {
        predict(&channel, bundled_request(version, &window(), window()))
            .await
            .unwrap_or_else(|e| panic!("v{version} after the hostile windows: {e:?}"));
    }
    let (_, peak) = server.rss_kib();
    let grown_mib = peak.saturating_sub(baseline) / 1024;
    assert!(grown_mib < RSS_BOUND_MIB, "peak RSS rose {grown_mib} MiB above the {} MiB baseline", baseline / 1024);
    assert!(server.is_running());
}

/// Awaits every future concurrently (a small join_all, to need no extra crate).
async fn futures_join_all<F: std::future::Future + Send + 'static>(futures: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_base_paths_outside_the_allowed_roots_are_refused_and_nothing_leaks() {
    // A start-up model outside the allowed roots stops the start, naming the flag.
    let out = Command::new(env!("CARGO_BIN_EXE_model-server"))
        .args(["--port=0", "--bind_address=127.0.0.1", "--model_name=m", "--model_base_path=/proc"])
        .arg("--model_base_path_allow=/nonexistent-root-for-the-test")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--model_base_path_allow"), "{out:?}");

    // Serve from the allowed root this time.
    let root = tempfile::tempdir().unwrap();
    let root_path = root.path().to_owned();
    let server = Server::start_in(root, &[&format!("--model_base_path_allow={}", root_path.display())]);
    let channel = server.channel().await;
    let mut models_api = ModelServiceClient::new(channel.clone());
    for outside in ["/proc", "/etc/../proc", "relative/models"] {
        let status = models_api
            .handle_reload_config_request(support::reload_request(vec![model_config("m", Path::new(outside))]))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{outside}: {status:?}");
        assert!(!status.message().contains(&root_path.display().to_string()), "{status:?}");
    }
    predict(&channel, predict_request(MODEL, "", vec![("sensors", one_row())])).await.expect("still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_in_flight_limit_requests_are_shed_with_resource_exhausted_and_counted() {
    let server = Server::start(&["--max_in_flight_requests=2"]);
    let channel = server.channel().await;
    // 4,096-row requests take the engine a while; 64 at once cannot all hold one of 2 permits.
    let rows = 4096;
    let batch = || TensorProto {
        dtype: 1,
        tensor_shape: shape(&[rows, 18]),
        float_val: vec![0.5; rows as usize * 18],
        ..Default::default()
    };
    let calls: Vec<_> = (0..64)
        .map(|_| {
            let channel = channel.clone();
            let request = predict_request(MODEL, "", vec![("sensors", batch())]);
            async move { predict(&channel, request).await }
        })
        .collect();
    let results = futures_join_all(calls).await;
    let shed = results.iter().filter(|r| r.as_ref().is_err_and(|e| e.code() == Code::ResourceExhausted)).count();
    let other_errors: Vec<_> =
        results.iter().filter_map(|r| r.as_ref().err()).filter(|e| e.code() != Code::ResourceExhausted).collect();
    assert!(other_errors.is_empty(), "{other_errors:?}");
    assert!(shed > 0 && shed < 64, "{shed} of 64 shed");
    let text = server.rest.metrics().await;
    let counted =
        test_support::metric(&text, "model_server_requests_shed_total", &[("api", "grpc")]).expect("the shed counter");
    assert_eq!(counted as usize, shed);
    // Health checks are never shed, and the server serves once the burst is over.
    predict(&channel, predict_request(MODEL, "", vec![("sensors", one_row())])).await.unwrap();
}
