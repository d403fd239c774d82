//! `tensorflow.serving.PredictionService` and `tensorflow.serving.ModelService`, wire
//! compatible with TF Serving so its clients work unchanged.

use std::collections::HashMap;
use std::time::Instant;

use prost::Message;
use proto::tensorflow::serving::model_service_server::ModelService;
use proto::tensorflow::serving::model_spec::VersionChoice;
use proto::tensorflow::serving::prediction_service_server::PredictionService;
use proto::tensorflow::serving::{
    ClassificationRequest, ClassificationResponse, GetModelMetadataRequest, GetModelMetadataResponse,
    GetModelStatusRequest, GetModelStatusResponse, ModelSpec, ModelVersionStatus, MultiInferenceRequest,
    MultiInferenceResponse, PredictRequest, PredictResponse, RegressionRequest, RegressionResponse,
    ReloadConfigRequest, ReloadConfigResponse, SignatureDefMap, StatusProto,
};
use proto::tensorflow::{
    DataType, SignatureDef, TensorInfo, TensorProto, TensorShapeProto, tensor_info, tensor_shape_proto,
};
use savedmodel::SignatureSpec;
use tonic::{Request, Response, Status};

use crate::admission::WireTensor;
use crate::error::ServeError;
use crate::inference::{Inference, InferenceRequest};
use crate::metrics::{Api, Metrics};
use crate::model_config;
use crate::repository::{Repository, VersionSelector};
use crate::tensor_codec;

/// The one metadata field TF Serving defines.
const SIGNATURE_DEF_FIELD: &str = "signature_def";

#[derive(Debug, Clone)]
pub struct TfServing {
    pub inference: Inference,
    pub metrics: Metrics,
    /// `--enable_serialization_as_tensor_content`.
    pub tensor_content_outputs: bool,
}

/// The model name and version selector of a `ModelSpec`; the name is required.
pub fn spec_target(spec: Option<&ModelSpec>) -> Result<(String, VersionSelector), ServeError> {
    let spec = spec.ok_or_else(|| ServeError::InvalidArgument("model_spec is missing".into()))?;
    if spec.name.is_empty() {
        return Err(ServeError::InvalidArgument("model_spec.name is empty".into()));
    }
    let selector = match &spec.version_choice {
        None => VersionSelector::Latest,
        Some(VersionChoice::Version(v)) => VersionSelector::Version(*v),
        Some(VersionChoice::VersionLabel(label)) if label.is_empty() => VersionSelector::Latest,
        Some(VersionChoice::VersionLabel(label)) => VersionSelector::Label(label.clone()),
    };
    Ok((spec.name.clone(), selector))
}

/// The `ModelSpec` a response echoes: the version that actually answered.
pub fn answered_spec(model: &str, version: i64, signature: &str) -> ModelSpec {
    ModelSpec {
        name: model.to_owned(),
        version_choice: Some(VersionChoice::Version(version)),
        signature_name: signature.to_owned(),
    }
}

impl TfServing {
    async fn predict_inner(
        &self,
        mut request: PredictRequest,
        routing_key: Option<Vec<u8>>,
        target: &mut Option<(String, i64, String)>,
    ) -> Result<PredictResponse, ServeError> {
        let (model, selector) = spec_target(request.model_spec.as_ref())?;
        let signature = request.model_spec.as_ref().map(|s| s.signature_name.clone());
        let row_keys = match request.inputs.remove(canary::ROW_ROUTING_KEYS_INPUT) {
            Some(keys) => Some(row_routing_keys(keys, self.inference.limits.max_request_rows)?),
            None => None,
        };
        // Undecoded: admission checks them against the signature before anything is allocated.
        let inputs = request.inputs.into_iter().map(|(name, tensor)| (name, WireTensor::TfProto(tensor))).collect();
        let answer = self
            .inference
            .run(
                InferenceRequest {
                    model,
                    selector,
                    signature,
                    inputs,
                    output_filter: request.output_filter,
                    routing_key,
                    row_keys,
                },
                target,
            )
            .await?;
        let mut outputs = HashMap::with_capacity(answer.outputs.len());
        for (name, tensor) in &answer.outputs {
            let proto = tensor_codec::tensor_to_proto(name, tensor, self.tensor_content_outputs)
                .map_err(ServeError::Internal)?;
            outputs.insert(name.clone(), proto);
        }
        Ok(PredictResponse {
            model_spec: Some(answered_spec(&answer.version.model, answer.version.version, &answer.signature)),
            outputs,
        })
    }

    fn metadata_inner(&self, request: GetModelMetadataRequest) -> Result<GetModelMetadataResponse, ServeError> {
        let (model, selector) = spec_target(request.model_spec.as_ref())?;
        if request.metadata_field.is_empty() {
            return Err(ServeError::InvalidArgument("metadata_field is empty; ask for \"signature_def\"".into()));
        }
        if let Some(other) = request.metadata_field.iter().find(|f| *f != SIGNATURE_DEF_FIELD) {
            return Err(ServeError::InvalidArgument(format!(
                "metadata_field {other:?} is not supported (only \"signature_def\")"
            )));
        }
        let version = self.inference.repository.resolve(&model, &selector)?;
        let map = SignatureDefMap {
            signature_def: version.specs.iter().map(|(name, spec)| (name.clone(), signature_def(spec))).collect(),
        };
        let any = prost_types::Any {
            type_url: "type.googleapis.com/tensorflow.serving.SignatureDefMap".into(),
            value: map.encode_to_vec(),
        };
        Ok(GetModelMetadataResponse {
            model_spec: Some(answered_spec(&version.model, version.version, "")),
            metadata: [(SIGNATURE_DEF_FIELD.to_owned(), any)].into(),
        })
    }
}

/// The per-row routing keys of a batched call ([`canary::ROW_ROUTING_KEYS_INPUT`]): one
/// string per row, each short; anything else is refused naming the input.
fn row_routing_keys(tensor: TensorProto, max_rows: usize) -> Result<Vec<Vec<u8>>, ServeError> {
    let name = canary::ROW_ROUTING_KEYS_INPUT;
    let refuse = |why: String| Err(ServeError::InvalidArgument(format!("input {name:?}: {why}")));
    if tensor.dtype != DataType::DtString as i32 {
        return refuse("must be DT_STRING, one routing key per row".into());
    }
    let keys = tensor.string_val;
    let dims: Vec<i64> = tensor.tensor_shape.map(|s| s.dim.iter().map(|d| d.size).collect()).unwrap_or_default();
    if dims != [keys.len() as i64] {
        return refuse(format!("shape {dims:?} does not match its {} strings (one per row, shape [rows])", keys.len()));
    }
    if keys.is_empty() || keys.len() > max_rows {
        return refuse(format!("{} keys; between 1 and {max_rows} (one per row)", keys.len()));
    }
    if let Some((row, key)) = keys.iter().enumerate().find(|(_, k)| k.len() > canary::MAX_ROUTING_KEY_BYTES) {
        return refuse(format!(
            "the key of row {row} has {} bytes, more than {}",
            key.len(),
            canary::MAX_ROUTING_KEY_BYTES
        ));
    }
    Ok(keys)
}

/// A signature as `GetModelMetadata` reports it.
pub fn signature_def(spec: &SignatureSpec) -> SignatureDef {
    let info = |t: &savedmodel::TensorSpec| TensorInfo {
        encoding: Some(tensor_info::Encoding::Name(t.tensor_name.clone())),
        dtype: t.dtype as i32,
        tensor_shape: Some(match &t.shape {
            Some(dims) => TensorShapeProto {
                dim: dims.iter().map(|&size| tensor_shape_proto::Dim { size, ..Default::default() }).collect(),
                ..Default::default()
            },
            None => TensorShapeProto { unknown_rank: true, ..Default::default() },
        }),
    };
    SignatureDef {
        inputs: spec.inputs.iter().map(|(k, v)| (k.clone(), info(v))).collect(),
        outputs: spec.outputs.iter().map(|(k, v)| (k.clone(), info(v))).collect(),
        method_name: spec.method_name.clone(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl PredictionService for TfServing {
    async fn predict(&self, request: Request<PredictRequest>) -> Result<Response<PredictResponse>, Status> {
        let started = Instant::now();
        let mut target = None;
        let routing_key = super::routing_key(request.metadata());
        let result = self.predict_inner(request.into_inner(), routing_key, &mut target).await;
        super::finish_call(&self.metrics, Api::GrpcPredict, started, target.as_ref(), result)
    }

    async fn get_model_metadata(
        &self,
        request: Request<GetModelMetadataRequest>,
    ) -> Result<Response<GetModelMetadataResponse>, Status> {
        let started = Instant::now();
        let result = self.metadata_inner(request.into_inner());
        super::finish_call(&self.metrics, Api::GrpcMetadata, started, None, result)
    }

    async fn classify(&self, _: Request<ClassificationRequest>) -> Result<Response<ClassificationResponse>, Status> {
        Err(Status::unimplemented("Classify is not supported: it needs tf.Example string inputs; use Predict"))
    }

    async fn regress(&self, _: Request<RegressionRequest>) -> Result<Response<RegressionResponse>, Status> {
        Err(Status::unimplemented("Regress is not supported: it needs tf.Example string inputs; use Predict"))
    }

    async fn multi_inference(
        &self,
        _: Request<MultiInferenceRequest>,
    ) -> Result<Response<MultiInferenceResponse>, Status> {
        Err(Status::unimplemented("MultiInference is not supported (it combines Classify and Regress); use Predict"))
    }
}

/// `tensorflow.serving.ModelService`.
#[derive(Debug, Clone)]
pub struct ModelServiceImpl {
    pub repository: Repository,
}

fn status_proto(error: Option<&str>) -> StatusProto {
    match error {
        None => StatusProto::default(),
        // tensorflow.error.UNKNOWN: the load error is in the message.
        Some(message) => StatusProto { error_code: 2, error_message: message.to_owned() },
    }
}

#[tonic::async_trait]
impl ModelService for ModelServiceImpl {
    async fn get_model_status(
        &self,
        request: Request<GetModelStatusRequest>,
    ) -> Result<Response<GetModelStatusResponse>, Status> {
        let request = request.into_inner();
        let (model, selector) = spec_target(request.model_spec.as_ref())?;
        let statuses = self.repository.status(&model, &selector)?;
        Ok(Response::new(GetModelStatusResponse {
            model_version_status: statuses
                .into_iter()
                .map(|s| ModelVersionStatus {
                    version: s.version,
                    state: s.state.proto_value(),
                    status: Some(status_proto(s.error.as_deref())),
                })
                .collect(),
        }))
    }

    async fn handle_reload_config_request(
        &self,
        request: Request<ReloadConfigRequest>,
    ) -> Result<Response<ReloadConfigResponse>, Status> {
        let config = request.into_inner().config.ok_or_else(|| Status::invalid_argument("config is missing"))?;
        let configs = model_config::model_configs(config).map_err(Status::invalid_argument)?;
        // Checking base paths and scanning them is file I/O: off the async workers. Like TF
        // Serving, answer once the new config's versions have been tried.
        let repository = self.repository.clone();
        tokio::task::spawn_blocking(move || repository.set_configs(configs).map(Repository::wait))
            .await
            .map_err(|e| Status::internal(format!("applying the config: {e}")))??;
        Ok(Response::new(ReloadConfigResponse { status: Some(StatusProto::default()), ..Default::default() }))
    }
}
