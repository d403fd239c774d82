//! Arbitrary requests and model configs, thrown at a running server (in-process, real gRPC on
//! loopback): whatever arrives, every call answers within a bounded time, nothing panics or
//! wedges a lock, and the server still serves a real prediction afterwards.

mod support;

use std::time::Duration;

use proptest::prelude::*;
use proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use proto::inference::model_infer_request::InferInputTensor;
use proto::inference::{InferTensorContents, ModelInferRequest};
use proto::tensorflow::serving::model_service_client::ModelServiceClient;
use proto::tensorflow::serving::{GetModelStatusRequest, ModelConfig, ModelSpec, PredictRequest};
use proto::tensorflow::{TensorProto, TensorShapeProto, tensor_shape_proto};
use support::{TestServer, model_base, reload_request as reload};
use tonic::transport::Channel;

/// Longest any single call may take, whatever it carries.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

const MODEL: &str = "autoencoder";

/// Dimensions from the ordinary to the absurd (negative, huge, overflowing).
fn dim() -> impl Strategy<Value = i64> {
    prop_oneof![0i64..40, Just(18), Just(-1), Just(i64::MAX), Just(1 << 32), Just(250_000_000), any::<i64>()]
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![Just("sensors".to_owned()), Just(String::new()), ".{0,40}", "\\PC{0,300}"]
}

fn tensor() -> impl Strategy<Value = TensorProto> {
    (
        prop_oneof![Just(1i32), Just(9), 0i32..30, any::<i32>()],
        prop::collection::vec(dim(), 0..5),
        any::<bool>(),
        prop::collection::vec(any::<f32>(), 0..40),
        prop::collection::vec(any::<u8>(), 0..80),
        prop::collection::vec(any::<i32>(), 0..10),
    )
        .prop_map(|(dtype, dims, unknown_rank, float_val, tensor_content, int_val)| TensorProto {
            dtype,
            tensor_shape: Some(TensorShapeProto {
                dim: dims.into_iter().map(|size| tensor_shape_proto::Dim { size, ..Default::default() }).collect(),
                unknown_rank,
            }),
            float_val,
            tensor_content,
            half_val: int_val.clone(),
            int_val,
            ..Default::default()
        })
}

fn predict_request() -> impl Strategy<Value = PredictRequest> {
    (
        prop_oneof![Just(MODEL.to_owned()), name()],
        prop_oneof![Just(String::new()), Just("serving_default".to_owned()), name()],
        prop::collection::vec((name(), tensor()), 0..4),
    )
        .prop_map(|(model, signature_name, inputs)| PredictRequest {
            model_spec: Some(ModelSpec { name: model, signature_name, ..Default::default() }),
            inputs: inputs.into_iter().collect(),
            output_filter: Vec::new(),
        })
}

fn infer_request() -> impl Strategy<Value = ModelInferRequest> {
    let input = (
        name(),
        prop_oneof![Just("FP32".to_owned()), Just("INT64".to_owned()), Just("BYTES".to_owned()), ".{0,8}"],
        prop::collection::vec(dim(), 0..4),
        prop::collection::vec(any::<f32>(), 0..40),
    )
        .prop_map(|(name, datatype, shape, fp32)| InferInputTensor {
            name,
            datatype,
            shape,
            contents: Some(InferTensorContents { fp32_contents: fp32, ..Default::default() }),
            ..Default::default()
        });
    (
        prop_oneof![Just(MODEL.to_owned()), name()],
        prop_oneof![Just(String::new()), "[0-9]{1,3}", ".{0,5}"],
        prop::collection::vec(input, 0..4),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..100), 0..4),
    )
        .prop_map(|(model_name, model_version, inputs, raw_input_contents)| ModelInferRequest {
            model_name,
            model_version,
            inputs,
            raw_input_contents,
            ..Default::default()
        })
}

fn model_configs() -> impl Strategy<Value = Vec<ModelConfig>> {
    let config = (name(), prop_oneof![Just("/nonexistent/m".to_owned()), ".{0,60}", "\\PC{0,100}"], name()).prop_map(
        |(name, base_path, platform)| ModelConfig {
            version_labels: [("stable".to_owned(), 1), ("bad label!".to_owned(), -3)]
                .into_iter()
                .take(usize::from(platform.len() % 3 == 0))
                .collect(),
            name,
            base_path,
            model_platform: if platform.len() % 2 == 0 { "tensorflow".into() } else { platform },
            ..Default::default()
        },
    );
    prop::collection::vec(config, 0..4)
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    server: TestServer,
    channel: Channel,
    base: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = model_base(dir.path(), MODEL, "autoencoder", &[1]);
    let (server, channel) = runtime.block_on(async {
        let server = TestServer::start(&[
            &format!("--model_name={MODEL}"),
            &format!("--model_base_path={}", base.display()),
            "--file_system_poll_wait_seconds=0",
        ])
        .await;
        let channel = server.channel().await;
        (server, channel)
    });
    Fixture { runtime, server, channel, base, _dir: dir }
}

impl Fixture {
    /// A real prediction still answers.
    fn assert_serving(&self) {
        self.runtime.block_on(async {
            let mut client = self.server.predict_client().await;
            let request = PredictRequest {
                model_spec: support::spec(MODEL, None, None, ""),
                inputs: [("sensors".to_owned(), support::float_tensor(&[1, 18], &[0.5; 18]))].into(),
                output_filter: Vec::new(),
            };
            tokio::time::timeout(ANSWER_WITHIN, client.predict(request))
                .await
                .expect("a real prediction answers in time")
                .expect("a real prediction succeeds");
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_requests_are_answered_in_time_and_the_server_keeps_serving(
        predicts in prop::collection::vec(predict_request(), 1..6),
        infers in prop::collection::vec(infer_request(), 1..6),
    ) {
        let fixture = requests_server();
        fixture.runtime.block_on(async {
            let mut tf = proto::tensorflow::serving::prediction_service_client::PredictionServiceClient::new(
                fixture.channel.clone(),
            );
            for request in predicts {
                let answered = tokio::time::timeout(ANSWER_WITHIN, tf.predict(request)).await;
                prop_assert!(answered.is_ok(), "a Predict took over {ANSWER_WITHIN:?}");
                if let Ok(Err(status)) = answered {
                    prop_assert!(status.code() != tonic::Code::Unknown && status.code() != tonic::Code::Internal,
                        "{status:?}");
                }
            }
            let mut kserve = GrpcInferenceServiceClient::new(fixture.channel.clone());
            for request in infers {
                let answered = tokio::time::timeout(ANSWER_WITHIN, kserve.model_infer(request)).await;
                prop_assert!(answered.is_ok(), "a ModelInfer took over {ANSWER_WITHIN:?}");
                if let Ok(Err(status)) = answered {
                    prop_assert!(status.code() != tonic::Code::Unknown && status.code() != tonic::Code::Internal,
                        "{status:?}");
                }
            }
            Ok(())
        })?;
        fixture.assert_serving();
    }

    #[test]
    fn arbitrary_model_configs_never_wedge_the_repository(configs in model_configs()) {
        let fixture = configs_server();
        fixture.runtime.block_on(async {
            let mut models = ModelServiceClient::new(fixture.channel.clone());
            let answered = tokio::time::timeout(ANSWER_WITHIN, models.handle_reload_config_request(reload(configs))).await;
            prop_assert!(answered.is_ok(), "HandleReloadConfigRequest took over {ANSWER_WITHIN:?}");
            // Whatever it did, the repository still answers and takes the real config back.
            let status = GetModelStatusRequest { model_spec: support::spec("anything", None, None, "") };
            let answered = tokio::time::timeout(ANSWER_WITHIN, models.get_model_status(status)).await;
            prop_assert!(answered.is_ok(), "GetModelStatus took over {ANSWER_WITHIN:?}");
            let restore = ModelConfig {
                name: MODEL.into(),
                base_path: fixture.base.display().to_string(),
                model_platform: "tensorflow".into(),
                ..Default::default()
            };
            let restored = tokio::time::timeout(ANSWER_WITHIN, models.handle_reload_config_request(reload(vec![restore])))
                .await;
            prop_assert!(matches!(restored, Ok(Ok(_))), "restoring the config: {restored:?}");
            Ok(())
        })?;
        fixture.assert_serving();
    }
}

/// One server per test for all its cases (starting one per case would dominate the run);
/// the two tests run in parallel, and the config one replaces the model list.
fn requests_server() -> &'static Fixture {
    static FIXTURE: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(fixture)
}

fn configs_server() -> &'static Fixture {
    static FIXTURE: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(fixture)
}
