//! KServe v2 / Open Inference Protocol (`inference.GRPCInferenceService`), so Triton and
//! KServe clients (`tritonclient`, `perf_analyzer`) can call the same models. Inference
//! uses each model's `serving_default` signature unless the request's `signature_name`
//! parameter names another. Outputs always come back as `raw_output_contents`, as Triton
//! does.

use std::time::Instant;

use proto::inference::grpc_inference_service_server::GrpcInferenceService;
use proto::inference::infer_parameter::ParameterChoice;
use proto::inference::model_infer_response::InferOutputTensor;
use proto::inference::model_metadata_response::TensorMetadata;
use proto::inference::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest,
    ModelReadyResponse, ServerLiveRequest, ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse,
    ServerReadyRequest, ServerReadyResponse,
};
use savedmodel::{DatumType, TensorSpec};
use tonic::{Request, Response, Status};

use crate::admission::{KserveTensor, WireTensor};
use crate::error::ServeError;
use crate::inference::{Inference, InferenceRequest};
use crate::metrics::{Api, Metrics};
use crate::repository::VersionSelector;
use crate::tensor_codec::Element;

/// The name KServe's server metadata gives.
pub(crate) const SERVER_NAME: &str = "vigil-model-server";

#[derive(Debug, Clone)]
pub struct Kserve {
    pub inference: Inference,
    pub metrics: Metrics,
}

/// The version a request's `model_version` names (empty: the latest).
pub(crate) fn selector(version: &str) -> Result<VersionSelector, ServeError> {
    if version.is_empty() {
        return Ok(VersionSelector::Latest);
    }
    version
        .parse::<i64>()
        .map(VersionSelector::Version)
        .map_err(|_| ServeError::InvalidArgument(format!("model_version {version:?} is not a number")))
}

/// KServe datatype for a signature tensor (`BYTES` for strings, which we cannot run).
pub(crate) fn datatype(spec: &TensorSpec) -> String {
    DatumType::try_from(spec.dtype)
        .ok()
        .and_then(Element::from_datum_type)
        .map_or_else(|| "BYTES".to_owned(), |e| e.kserve_name().to_owned())
}

fn tensor_metadata(name: &str, spec: &TensorSpec) -> TensorMetadata {
    TensorMetadata { name: name.to_owned(), datatype: datatype(spec), shape: spec.shape.clone().unwrap_or_default() }
}

/// The model metadata KServe answers with, over gRPC and HTTP alike: the default
/// signature's tensors (or the first signature's), and every version loaded.
pub(crate) fn model_metadata(
    inference: &Inference,
    name: &str,
    version: &str,
) -> Result<ModelMetadataResponse, ServeError> {
    let version = inference.repository.resolve(name, &selector(version)?)?;
    let spec = version.specs.get(savedmodel::DEFAULT_SIGNATURE).or_else(|| version.specs.values().next());
    let table = inference.repository.table();
    let versions = table.models.get(name).map(|m| m.versions.keys().map(i64::to_string).collect()).unwrap_or_default();
    Ok(ModelMetadataResponse {
        name: version.model.clone(),
        versions,
        platform: "tensorflow_savedmodel".into(),
        inputs: spec.map(|s| s.inputs.iter().map(|(n, t)| tensor_metadata(n, t)).collect()).unwrap_or_default(),
        outputs: spec.map(|s| s.outputs.iter().map(|(n, t)| tensor_metadata(n, t)).collect()).unwrap_or_default(),
    })
}

/// Whether the named version (empty: the latest) is there to answer.
pub(crate) fn model_ready(inference: &Inference, name: &str, version: &str) -> bool {
    selector(version).and_then(|s| inference.repository.resolve(name, &s)).is_ok()
}

/// One KServe inference, whichever transport carried it.
pub(crate) struct KserveCall {
    pub model: String,
    /// `model_version` as sent (empty: the latest).
    pub version: String,
    pub signature: Option<String>,
    /// As received, undecoded: admission checks each against the signature first.
    pub inputs: Vec<(String, KserveTensor)>,
    /// The outputs asked for, in the order to answer them (empty: all, signature order).
    pub outputs: Vec<String>,
    pub routing_key: Option<Vec<u8>>,
}

/// What a [`KserveCall`] answers: the version that ran and its outputs, in order.
pub(crate) struct KserveAnswer {
    pub model: String,
    pub version: i64,
    pub outputs: Vec<(String, Element, savedmodel::Tensor)>,
}

/// Runs a KServe inference through the shared inference path (admission, limits, canary
/// routing, batching).
pub(crate) async fn infer(
    inference: &Inference,
    call: KserveCall,
    target: &mut Option<(String, i64, String)>,
) -> Result<KserveAnswer, ServeError> {
    if call.model.is_empty() {
        return Err(ServeError::InvalidArgument("model_name is empty".into()));
    }
    let selector = selector(&call.version)?;
    for (i, name) in call.outputs.iter().enumerate() {
        if call.outputs[..i].contains(name) {
            return Err(ServeError::InvalidArgument(format!("output {name:?} is asked for twice")));
        }
    }
    let inputs = call.inputs.into_iter().map(|(name, tensor)| (name, WireTensor::Kserve(tensor))).collect();
    let mut answer = inference
        .run(
            InferenceRequest {
                model: call.model,
                selector,
                signature: call.signature,
                inputs,
                output_filter: call.outputs.clone(),
                routing_key: call.routing_key,
                row_keys: None,
            },
            target,
        )
        .await?;
    // Requested outputs come back in the order asked; otherwise in signature order.
    let order: Vec<String> =
        if call.outputs.is_empty() { answer.outputs.keys().cloned().collect() } else { call.outputs };
    let mut outputs = Vec::with_capacity(order.len());
    for name in order {
        let tensor = answer
            .outputs
            .remove(&name)
            .ok_or_else(|| ServeError::Internal(format!("output {name:?} was not produced")))?;
        let element = Element::from_datum_type(tensor.datum_type())
            .ok_or_else(|| ServeError::Internal(format!("output {name:?} has type {:?}", tensor.datum_type())))?;
        outputs.push((name, element, tensor));
    }
    Ok(KserveAnswer { model: answer.version.model.clone(), version: answer.version.version, outputs })
}

impl Kserve {
    async fn infer_inner(
        &self,
        mut request: ModelInferRequest,
        routing_key: Option<Vec<u8>>,
        target: &mut Option<(String, i64, String)>,
    ) -> Result<ModelInferResponse, ServeError> {
        let signature = match request.parameters.get("signature_name").and_then(|p| p.parameter_choice.as_ref()) {
            Some(ParameterChoice::StringParam(s)) => Some(s.clone()),
            Some(_) => return Err(ServeError::InvalidArgument("parameter signature_name must be a string".into())),
            None => None,
        };
        if !request.raw_input_contents.is_empty() && request.raw_input_contents.len() != request.inputs.len() {
            return Err(ServeError::InvalidArgument(format!(
                "raw_input_contents has {} entries for {} inputs; give one per input or none",
                request.raw_input_contents.len(),
                request.inputs.len()
            )));
        }
        // Raw contents are moved, not copied.
        let mut raw = std::mem::take(&mut request.raw_input_contents).into_iter();
        let inputs = std::mem::take(&mut request.inputs)
            .into_iter()
            .map(|input| {
                let wire = KserveTensor {
                    datatype: input.datatype,
                    shape: input.shape,
                    contents: input.contents,
                    raw: raw.next(),
                };
                (input.name, wire)
            })
            .collect();
        let call = KserveCall {
            model: std::mem::take(&mut request.model_name),
            version: std::mem::take(&mut request.model_version),
            signature,
            inputs,
            outputs: request.outputs.iter().map(|o| o.name.clone()).collect(),
            routing_key,
        };
        let answer = infer(&self.inference, call, target).await?;
        let (outputs, raw) = answer
            .outputs
            .into_iter()
            .map(|(name, element, tensor)| {
                let output = InferOutputTensor {
                    name,
                    datatype: element.kserve_name().to_owned(),
                    shape: tensor.shape().iter().map(|&d| d as i64).collect(),
                    ..Default::default()
                };
                (output, tensor.as_bytes().to_vec())
            })
            .unzip();
        Ok(ModelInferResponse {
            model_name: answer.model,
            model_version: answer.version.to_string(),
            id: request.id,
            outputs,
            raw_output_contents: raw,
            ..Default::default()
        })
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Kserve {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: self.inference.repository.readiness().is_ok() }))
    }

    async fn model_ready(&self, request: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(ModelReadyResponse { ready: model_ready(&self.inference, &request.name, &request.version) }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: SERVER_NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(model_metadata(&self.inference, &request.name, &request.version)?))
    }

    async fn model_infer(&self, request: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let started = Instant::now();
        let mut target = None;
        let routing_key = super::routing_key(request.metadata());
        let result = self.infer_inner(request.into_inner(), routing_key, &mut target).await;
        super::finish_call(&self.metrics, Api::KserveInfer, started, target.as_ref(), result)
    }
}
