//! Calling the model server: one `Predict` per reading over a long-lived, balanced set of
//! connections, through a tower stack.
//!
//! ```text
//!  score() ─▶ ConcurrencyLimit ─▶ Retry (transient codes, retry budget, backoff)
//!          ─▶ Timeout (per attempt) ─▶ PredictionServiceClient
//!          ─▶ Buffer ─▶ p2c Balance (pending requests) ─▶ Eject ─▶ Channel per replica
//! ```
//!
//! The model's inputs are not configured here: they are read from the served
//! signature (`GetModelMetadata`), whose input names are reading signals
//! (`coolant_temp`, ...), and refreshed periodically, so a new model version with other
//! features needs no processor change. The signature's outputs `anomaly_score` and
//! `threshold` carry the score (the reconstruction error on the scaled reading, computed
//! in the graph) and the threshold of the version that answered.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prost::Message as _;
use proto::tensorflow::serving::model_spec::VersionChoice;
use proto::tensorflow::serving::prediction_service_client::PredictionServiceClient;
use proto::tensorflow::serving::{
    GetModelMetadataRequest, ModelSpec, PredictRequest, PredictResponse, SignatureDefMap,
};
use proto::tensorflow::{DataType, TensorProto, TensorShapeProto, tensor_shape_proto};
use sensor::{SensorReading, Signal};
use tonic::Code;
use tower::retry::budget::{Budget as _, TpsBudget};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt as _};

use crate::config::ModelConfig;
use crate::discovery::{self, Target};
use crate::metrics::Metrics;
use crate::trace;

/// gRPC metadata naming the device, for sticky canary routing on the model server.
pub use canary::ROUTING_KEY_METADATA;
/// The signature outputs the processor reads.
pub use canary::{SCORE_OUTPUT, THRESHOLD_OUTPUT};

/// A reading's score from the model version that answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub score: f32,
    pub threshold: f32,
    pub model_name: String,
    pub model_version: i64,
    /// The whole call, retries included.
    pub latency: Duration,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ScoreError {
    /// The model server refused the reading itself (INVALID_ARGUMENT): calling again
    /// cannot help, the reading goes to the dead-letter topic.
    #[error("the model server rejected the reading: {0}")]
    Rejected(String),
    /// Anything else (unreachable, timed out, model not loaded, unexpected answer):
    /// the reading is tried again later.
    #[error("{0}")]
    Transient(String),
}

/// After a transient failure: wait this long and call again, or give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    After(Duration),
    GiveUp,
}

/// Why the served signature could not be read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SignatureError {
    /// The model server refused GetModelMetadata (NOT_FOUND: that model or version is not
    /// served; UNAVAILABLE: not reachable).
    #[error("GetModelMetadata: {}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
    #[error("GetModelMetadata timed out")]
    TimedOut,
    /// It answered with a signature the processor cannot score with.
    #[error("{0}")]
    Unusable(String),
}

/// The model's inputs, in the signature's order: each a reading signal.
#[derive(Debug, Clone)]
pub struct ModelInputs {
    pub inputs: Vec<(String, &'static Signal)>,
    /// The version whose signature this is.
    pub version: i64,
}

/// One Predict call: the request plus the metadata it carries.
#[derive(Debug, Clone)]
pub struct Call {
    pub request: PredictRequest,
    pub routing_key: String,
    /// The reading's span: each attempt's span is its child.
    pub parent: telemetry::Context,
}

type HttpRequest = tonic::codegen::http::Request<tonic::body::Body>;
type HttpResponse = tonic::codegen::http::Response<tonic::body::Body>;
type Balance = tower::balance::p2c::Balance<discovery::ReplicaChanges, HttpRequest>;

/// The balanced replicas as one cloneable HTTP/2 service for the generated client.
#[derive(Clone)]
struct Balanced(tower::buffer::Buffer<HttpRequest, <Balance as Service<HttpRequest>>::Future>);

impl Service<HttpRequest> for Balanced {
    type Response = HttpResponse;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: HttpRequest) -> Self::Future {
        Box::pin(self.0.call(request))
    }
}

/// The client at the bottom of the stack.
#[derive(Clone)]
struct PredictCall {
    client: PredictionServiceClient<Balanced>,
}

impl Service<Call> for PredictCall {
    type Response = PredictResponse;
    type Error = tonic::Status;
    type Future = Pin<Box<dyn Future<Output = Result<PredictResponse, tonic::Status>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The client waits for the balancer inside the call (under the timeout).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let mut client = self.client.clone();
        Box::pin(async move {
            let span = trace::predict_call(&call.parent, &call.routing_key);
            let mut request = tonic::Request::new(call.request);
            if let Ok(value) = call.routing_key.parse() {
                request.metadata_mut().insert(ROUTING_KEY_METADATA, value);
            }
            telemetry::context_into_metadata(&span, request.metadata_mut());
            let result = client.predict(request).await;
            trace::predict_done(&span, &result);
            result.map(tonic::Response::into_inner)
        })
    }
}

/// Retries transient failures while the shared budget allows, after a short backoff.
#[derive(Clone)]
struct RetryTransient {
    budget: Arc<TpsBudget>,
    attempt: u32,
    backoff: Duration,
    retries: prometheus::IntCounter,
}

/// At most this many tries per call; the pipeline tries the reading again after that.
const ATTEMPTS_PER_CALL: u32 = 3;

impl tower::retry::Policy<Call, PredictResponse, BoxError> for RetryTransient {
    type Future = tokio::time::Sleep;

    fn retry(&mut self, _: &mut Call, result: &mut Result<PredictResponse, BoxError>) -> Option<Self::Future> {
        match result {
            Ok(_) => {
                self.budget.deposit();
                None
            }
            Err(error) => {
                if !retryable(error) || self.attempt + 1 >= ATTEMPTS_PER_CALL || !self.budget.withdraw() {
                    return None;
                }
                self.attempt += 1;
                self.retries.inc();
                Some(tokio::time::sleep(self.backoff * 2u32.pow(self.attempt - 1)))
            }
        }
    }

    fn clone_request(&mut self, call: &Call) -> Option<Call> {
        Some(call.clone())
    }
}

/// Codes worth another attempt right away: the server (or the path to it) was busy or
/// away, not wrong about the request.
fn retryable(error: &BoxError) -> bool {
    match error.downcast_ref::<tonic::Status>() {
        Some(status) => {
            matches!(
                status.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted
            )
        }
        // Timeouts, a closed buffer, connection failures.
        None => true,
    }
}

type Stack = tower::limit::ConcurrencyLimit<tower::retry::Retry<RetryTransient, tower::timeout::Timeout<PredictCall>>>;

/// The signature's inputs and when they were read.
type CachedInputs = (Arc<ModelInputs>, Instant);

/// The model server client; clones share connections, limits and the retry budget.
#[derive(Clone)]
pub struct ModelClient {
    stack: Stack,
    metadata: PredictionServiceClient<Balanced>,
    config: Arc<ModelConfig>,
    inputs: Arc<RwLock<Option<CachedInputs>>>,
    metrics: Metrics,
    _discovery: Arc<DiscoveryTask>,
}

struct DiscoveryTask(tokio::task::JoinHandle<()>);

impl Drop for DiscoveryTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ModelClient {
    /// Starts discovering replicas; connections are made as calls need them.
    pub fn new(config: &ModelConfig, metrics: Metrics) -> Result<Self, String> {
        let targets = config.endpoints.iter().map(|e| Target::parse(e)).collect::<Result<Vec<_>, _>>()?;
        let tls = match &config.tls_ca_file {
            Some(ca) => {
                let identity = config.tls_cert_file.as_deref().zip(config.tls_key_file.as_deref());
                Some(discovery::client_tls(ca, identity).map_err(|e| format!("model.tls: {e}"))?)
            }
            None if targets.iter().any(|t| t.tls) => {
                return Err("model.endpoints: https needs model.tls_ca_file".into());
            }
            None => None,
        };
        let (changes, task) = discovery::discover(
            targets,
            Duration::from_secs(config.discovery_refresh_seconds.max(1)),
            Duration::from_millis(config.eject_ms),
            metrics.model_replicas.clone(),
            tls,
        );
        let balance = tower::balance::p2c::Balance::new(changes);
        let balanced = Balanced(tower::buffer::Buffer::new(balance, config.concurrency_limit.max(16)));
        let client = PredictionServiceClient::new(balanced);
        let policy = RetryTransient {
            budget: Arc::new(TpsBudget::new(
                Duration::from_secs(10),
                config.retry_min_per_second,
                config.retry_budget_percent / 100.0,
            )),
            attempt: 0,
            backoff: Duration::from_millis(config.backoff_initial_ms),
            retries: metrics.model_retries.clone(),
        };
        let stack = ServiceBuilder::new()
            .concurrency_limit(config.concurrency_limit)
            .retry(policy)
            .timeout(config.timeout())
            .service(PredictCall { client: client.clone() });
        Ok(Self {
            stack,
            metadata: client,
            config: Arc::new(config.clone()),
            inputs: Arc::new(RwLock::new(None)),
            metrics,
            _discovery: Arc::new(DiscoveryTask(task)),
        })
    }

    fn spec(&self) -> ModelSpec {
        let version_choice = match (&self.config.version, &self.config.version_label) {
            (Some(version), _) => Some(VersionChoice::Version(*version)),
            (None, Some(label)) => Some(VersionChoice::VersionLabel(label.clone())),
            (None, None) => None,
        };
        ModelSpec { name: self.config.name.clone(), version_choice, signature_name: self.config.signature.clone() }
    }

    /// The model's inputs, read from its signature (cached, refreshed periodically).
    pub async fn inputs(&self) -> Result<Arc<ModelInputs>, ScoreError> {
        let refresh = Duration::from_secs(self.config.metadata_refresh_seconds.max(1));
        if let Some((inputs, at)) = self.inputs.read().unwrap_or_else(|e| e.into_inner()).as_ref()
            && at.elapsed() < refresh
        {
            return Ok(inputs.clone());
        }
        let fetched = Arc::new(self.fetch_inputs().await.map_err(|e| ScoreError::Transient(e.to_string()))?);
        *self.inputs.write().unwrap_or_else(|e| e.into_inner()) = Some((fetched.clone(), Instant::now()));
        Ok(fetched)
    }

    /// Forgets the cached signature, so the next call reads it again (after a version
    /// refused what the old signature described).
    pub fn forget_inputs(&self) {
        *self.inputs.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Reads the signature now (not from the cache) and caches it; unlike [`Self::inputs`],
    /// the error says whether the server refused (e.g. NOT_FOUND: the version is not
    /// served), did not answer, or served something the processor cannot score with.
    pub async fn signature(&self) -> Result<Arc<ModelInputs>, SignatureError> {
        let fetched = Arc::new(self.fetch_inputs().await?);
        *self.inputs.write().unwrap_or_else(|e| e.into_inner()) = Some((fetched.clone(), Instant::now()));
        Ok(fetched)
    }

    async fn fetch_inputs(&self) -> Result<ModelInputs, SignatureError> {
        let unusable = |text: String| SignatureError::Unusable(text);
        let mut client = self.metadata.clone();
        let request =
            GetModelMetadataRequest { model_spec: Some(self.spec()), metadata_field: vec!["signature_def".into()] };
        let response = tokio::time::timeout(self.config.timeout(), client.get_model_metadata(request))
            .await
            .map_err(|_| SignatureError::TimedOut)?
            .map_err(SignatureError::Status)?
            .into_inner();
        let version = match response.model_spec.and_then(|s| s.version_choice) {
            Some(VersionChoice::Version(version)) => version,
            _ => 0,
        };
        let any = response
            .metadata
            .get("signature_def")
            .ok_or_else(|| unusable("no signature_def in the model's metadata".into()))?;
        let signatures =
            SignatureDefMap::decode(any.value.as_slice()).map_err(|e| unusable(format!("signature_def: {e}")))?;
        let signature = signatures.signature_def.get(&self.config.signature).ok_or_else(|| {
            unusable(format!(
                "model {} version {version} has no signature {:?}",
                self.config.name, self.config.signature
            ))
        })?;
        for output in [SCORE_OUTPUT, THRESHOLD_OUTPUT] {
            if !signature.outputs.contains_key(output) {
                return Err(unusable(format!(
                    "model {} version {version}: signature {:?} has no output {output:?} (the processor reads {SCORE_OUTPUT:?} and {THRESHOLD_OUTPUT:?})",
                    self.config.name, self.config.signature
                )));
            }
        }
        let mut inputs = Vec::new();
        for (name, info) in &signature.inputs {
            let signal = sensor::signal(name).ok_or_else(|| {
                unusable(format!(
                    "model {} version {version}: input {name:?} is not a reading signal",
                    self.config.name
                ))
            })?;
            if info.dtype != DataType::DtFloat as i32 {
                return Err(unusable(format!(
                    "model {} version {version}: input {name:?} is not float32",
                    self.config.name
                )));
            }
            inputs.push((name.clone(), signal));
        }
        tracing::info!(model = %self.config.name, version, inputs = inputs.len(), "read the model's signature");
        Ok(ModelInputs { inputs, version })
    }

    /// The Predict request for one reading.
    pub fn request(&self, inputs: &ModelInputs, reading: &SensorReading) -> PredictRequest {
        let shape = Some(TensorShapeProto {
            dim: vec![tensor_shape_proto::Dim { size: 1, ..Default::default() }],
            ..Default::default()
        });
        let inputs: BTreeMap<String, TensorProto> = inputs
            .inputs
            .iter()
            .map(|(name, signal)| {
                let tensor = TensorProto {
                    dtype: DataType::DtFloat as i32,
                    tensor_shape: shape.clone(),
                    float_val: vec![signal.get(reading) as f32],
                    ..Default::default()
                };
                (name.clone(), tensor)
            })
            .collect();
        PredictRequest {
            model_spec: Some(self.spec()),
            inputs: inputs.into_iter().collect(),
            output_filter: vec![SCORE_OUTPUT.into(), THRESHOLD_OUTPUT.into()],
        }
    }

    /// Scores `reading` as the live path and replays both do: one rejection is tolerated
    /// (the first may come from a signature that changed under us, which the client reads
    /// again; a second one is about the reading), and after each transient failure
    /// `on_transient` (told the error and the attempt, from 1) says whether to wait and
    /// call again or give up with that error.
    pub async fn score_with_retry(
        &self,
        reading: &SensorReading,
        trace: &telemetry::Context,
        mut on_transient: impl FnMut(&str, u32) -> Retry,
    ) -> Result<Scored, ScoreError> {
        let (mut attempt, mut rejected_before) = (0u32, false);
        loop {
            attempt += 1;
            match self.score(reading, trace).await {
                Ok(scored) => return Ok(scored),
                Err(ScoreError::Rejected(_)) if !rejected_before => rejected_before = true,
                Err(rejected @ ScoreError::Rejected(_)) => return Err(rejected),
                Err(ScoreError::Transient(error)) => match on_transient(&error, attempt) {
                    Retry::After(wait) => tokio::time::sleep(wait).await,
                    Retry::GiveUp => return Err(ScoreError::Transient(error)),
                },
            }
        }
    }

    /// Scores one reading: one call through the stack (which retries transient failures
    /// a few times under the budget), each attempt traced as a child of `trace`.
    pub async fn score(&self, reading: &SensorReading, trace: &telemetry::Context) -> Result<Scored, ScoreError> {
        let inputs = self.inputs().await?;
        let call = Call {
            request: self.request(&inputs, reading),
            routing_key: reading.device_id.clone(),
            parent: trace.clone(),
        };
        let started = Instant::now();
        let result = self.stack.clone().oneshot(call).await;
        let latency = started.elapsed();
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                let (code, text) = match error.downcast_ref::<tonic::Status>() {
                    Some(status) => (status.code(), format!("{}: {}", status.code(), status.message())),
                    None => (Code::Unavailable, format!("model server: {error}")),
                };
                self.metrics.model_errors.with_label_values(&[code_name(code)]).inc();
                if code == Code::InvalidArgument {
                    // Perhaps the signature changed under us: read it again next time.
                    self.forget_inputs();
                    return Err(ScoreError::Rejected(text));
                }
                return Err(ScoreError::Transient(text));
            }
        };
        let scored = self.decode(response, latency)?;
        self.metrics
            .model_latency
            .with_label_values(&[&scored.model_version.to_string()])
            .observe(latency.as_secs_f64());
        Ok(scored)
    }

    fn decode(&self, response: PredictResponse, latency: Duration) -> Result<Scored, ScoreError> {
        let (model_name, model_version) = match response.model_spec {
            Some(spec) => {
                let version = match spec.version_choice {
                    Some(VersionChoice::Version(version)) => version,
                    _ => 0,
                };
                (if spec.name.is_empty() { self.config.name.clone() } else { spec.name }, version)
            }
            None => (self.config.name.clone(), 0),
        };
        let value = |name: &str| -> Result<f32, ScoreError> {
            let tensor = response.outputs.get(name).ok_or_else(|| {
                ScoreError::Transient(format!("model {model_name} version {model_version} returned no {name:?}"))
            })?;
            first_float(tensor).ok_or_else(|| {
                ScoreError::Transient(format!("model {model_name} version {model_version}: {name:?} is not one float"))
            })
        };
        let (score, threshold) = (value(SCORE_OUTPUT)?, value(THRESHOLD_OUTPUT)?);
        Ok(Scored { score, threshold, model_name, model_version, latency })
    }
}

/// The first value of a float tensor, from `float_val` or `tensor_content`.
fn first_float(tensor: &TensorProto) -> Option<f32> {
    if tensor.dtype != DataType::DtFloat as i32 {
        return None;
    }
    if let Some(value) = tensor.float_val.first() {
        return Some(*value);
    }
    let bytes: [u8; 4] = tensor.tensor_content.get(..4)?.try_into().ok()?;
    Some(f32::from_le_bytes(bytes))
}

pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_come_from_either_encoding() {
        let listed = TensorProto { dtype: DataType::DtFloat as i32, float_val: vec![2.5], ..Default::default() };
        assert_eq!(first_float(&listed), Some(2.5));
        let packed = TensorProto {
            dtype: DataType::DtFloat as i32,
            tensor_content: 7.25f32.to_le_bytes().to_vec(),
            ..Default::default()
        };
        assert_eq!(first_float(&packed), Some(7.25));
        let wrong = TensorProto { dtype: DataType::DtDouble as i32, double_val: vec![1.0], ..Default::default() };
        assert_eq!(first_float(&wrong), None);
    }

    #[test]
    fn only_transient_failures_are_retried() {
        let status = |code| -> BoxError { Box::new(tonic::Status::new(code, "x")) };
        assert!(retryable(&status(Code::Unavailable)));
        assert!(retryable(&status(Code::DeadlineExceeded)));
        assert!(!retryable(&status(Code::InvalidArgument)));
        assert!(!retryable(&status(Code::NotFound)));
        let elapsed: BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert!(retryable(&elapsed));
    }
}
