//! Calling the model server over a long-lived, balanced set of connections, through a
//! tower stack ([`stack`]). Readings are scored one `Predict` per reading, or, with
//! `model.max_rows_per_call` above 1 (the default), in batched calls ([`batch`]): readings
//! that arrive while `model.calls_in_flight` calls are out go together in the next one,
//! each row carrying its device id so a canary rollout still routes per device.
//!
//! The model's inputs are not configured here: they are read from the served
//! signature (`GetModelMetadata`), whose input names are reading signals
//! (`coolant_temp`, ...), and refreshed periodically, so a new model version with other
//! features needs no processor change. An input of shape `[-1, k]` asks for the device's
//! last `k` readings of that signal ([`crate::windows`]); each row carries its window. The signature's outputs `anomaly_score` and
//! `threshold` carry the score (the reconstruction error on the scaled reading, computed
//! in the graph) and the threshold of the version that answered.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use prost::Message as _;
use proto::tensorflow::serving::model_spec::VersionChoice;
use proto::tensorflow::serving::prediction_service_client::PredictionServiceClient;
use proto::tensorflow::serving::{
    GetModelMetadataRequest, ModelSpec, PredictRequest, PredictResponse, SignatureDefMap,
};
use proto::tensorflow::{DataType, TensorProto, TensorShapeProto, tensor_shape_proto};
use sensor::SensorReading;
use std::sync::atomic::{AtomicUsize, Ordering};
use tonic::Code;
use tower::ServiceExt as _;

use crate::config::{ModelConfig, ModelMode};
use crate::discovery::{self, Target};
use crate::metrics::Metrics;
use crate::windows::Window;

mod batch;
mod embedded;
mod signature;
mod stack;

pub use signature::{ModelInput, ModelInputs, SignatureError};
use signature::{check_outputs, input_values, reading_inputs};

use stack::{Balanced, Call, Stack};

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
    /// How long the reading waited for its (batched) call to start.
    pub waited: Duration,
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

/// The signature's inputs and when they were read.
type CachedInputs = (Arc<ModelInputs>, Instant);

/// The model server client; clones share connections, limits, the retry budget and the
/// batcher.
#[derive(Clone)]
pub struct ModelClient {
    caller: Caller,
    /// Where readings wait for a batched call; `None` when each reading is its own call.
    batches: Option<tokio::sync::mpsc::Sender<batch::Pending>>,
    /// `None` in embedded mode.
    _discovery: Option<Arc<DiscoveryTask>>,
}

/// What makes a call: the model server (or the embedded engine), the signature's inputs
/// and the settings.
#[derive(Clone)]
struct Caller {
    backend: Backend,
    config: Arc<ModelConfig>,
    inputs: Arc<RwLock<Option<CachedInputs>>>,
    /// The window the last signature read asks for (0: none read yet).
    window: Arc<AtomicUsize>,
    metrics: Metrics,
}

/// Where readings are scored.
#[derive(Clone)]
enum Backend {
    /// The model server's replicas, over gRPC (boxed: the stack is large, and cloned with
    /// every call).
    Remote(Box<Remote>),
    /// The model, in this process ([`embedded`]).
    Embedded(Arc<embedded::Engine>),
}

#[derive(Clone)]
struct Remote {
    stack: Stack,
    metadata: PredictionServiceClient<Balanced>,
}

struct DiscoveryTask(tokio::task::JoinHandle<()>);

impl Drop for DiscoveryTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A reading to score, its window (its device's readings up to it; empty: the reading
/// alone) and the span its call is traced under.
#[derive(Debug, Clone)]
pub struct Row {
    pub reading: SensorReading,
    pub window: Window,
    pub trace: telemetry::Context,
}

impl ModelClient {
    /// Starts discovering replicas (and the batcher, when calls are batched); connections
    /// are made as calls need them. Needs a Tokio runtime.
    pub fn new(config: &ModelConfig, metrics: Metrics) -> Result<Self, String> {
        if config.mode == ModelMode::Embedded {
            let engine = Arc::new(embedded::Engine::start(config)?);
            let caller = Caller {
                backend: Backend::Embedded(engine),
                config: Arc::new(config.clone()),
                inputs: Arc::new(RwLock::new(None)),
                window: Arc::new(AtomicUsize::new(0)),
                metrics,
            };
            let batches = (config.max_rows_per_call > 1).then(|| batch::start(caller.clone()));
            return Ok(Self { caller, batches, _discovery: None });
        }
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
        let (stack, metadata) = stack::build(config, changes, &metrics);
        let caller = Caller {
            backend: Backend::Remote(Box::new(Remote { stack, metadata })),
            config: Arc::new(config.clone()),
            inputs: Arc::new(RwLock::new(None)),
            window: Arc::new(AtomicUsize::new(0)),
            metrics,
        };
        let batches = (config.max_rows_per_call > 1).then(|| batch::start(caller.clone()));
        Ok(Self { caller, batches, _discovery: Some(Arc::new(DiscoveryTask(task))) })
    }

    /// The model's inputs, read from its signature (cached, refreshed periodically).
    pub async fn inputs(&self) -> Result<Arc<ModelInputs>, ScoreError> {
        self.caller.inputs().await
    }

    /// The window the served signature asks for, in readings (1: the reading alone), as
    /// of the last time it was read; `None` before it was read at all.
    pub fn window(&self) -> Option<usize> {
        match self.caller.window.load(Ordering::Relaxed) {
            0 => None,
            window => Some(window),
        }
    }

    /// Reads the signature now (not from the cache) and caches it; unlike [`Self::inputs`],
    /// the error says whether the server refused (e.g. NOT_FOUND: the version is not
    /// served), did not answer, or served something the processor cannot score with.
    pub async fn signature(&self) -> Result<Arc<ModelInputs>, SignatureError> {
        self.caller.signature().await
    }

    /// Scores `reading` as the live path and replays both do: one rejection is tolerated
    /// (the first may come from a signature that changed under us, which the client reads
    /// again; a second one is about the reading), and after each transient failure
    /// `on_transient` (told the error and the attempt, from 1) says whether to wait and
    /// call again or give up with that error.
    pub async fn score_with_retry(
        &self,
        reading: &SensorReading,
        window: &Window,
        trace: &telemetry::Context,
        mut on_transient: impl FnMut(&str, u32) -> Retry,
    ) -> Result<Scored, ScoreError> {
        let (mut attempt, mut rejected_before) = (0u32, false);
        loop {
            attempt += 1;
            match self.score(reading, window, trace).await {
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

    /// Scores one reading: alone in one call through the stack (which retries transient
    /// failures a few times under the budget), or as a row of a batched call; each
    /// attempt traced as a child of `trace` (of the first row's, in a batched call).
    pub async fn score(
        &self,
        reading: &SensorReading,
        window: &Window,
        trace: &telemetry::Context,
    ) -> Result<Scored, ScoreError> {
        let row = Row { reading: reading.clone(), window: window.clone(), trace: trace.clone() };
        match &self.batches {
            Some(batches) => batch::submit(batches, row).await,
            None => self.caller.call(std::slice::from_ref(&row)).await.pop().expect("one result per row"),
        }
    }
}

impl Caller {
    fn spec(&self) -> ModelSpec {
        let version_choice = match (&self.config.version, &self.config.version_label) {
            (Some(version), _) => Some(VersionChoice::Version(*version)),
            (None, Some(label)) => Some(VersionChoice::VersionLabel(label.clone())),
            (None, None) => None,
        };
        ModelSpec { name: self.config.name.clone(), version_choice, signature_name: self.config.signature.clone() }
    }

    /// The model's inputs, read from its signature (cached, refreshed periodically).
    async fn inputs(&self) -> Result<Arc<ModelInputs>, ScoreError> {
        let refresh = Duration::from_secs(self.config.metadata_refresh_seconds.max(1));
        if let Some((inputs, at)) = self.inputs.read().unwrap_or_else(|e| e.into_inner()).as_ref()
            && at.elapsed() < refresh
        {
            return Ok(inputs.clone());
        }
        let fetched = Arc::new(self.fetch_inputs().await.map_err(|e| ScoreError::Transient(e.to_string()))?);
        self.cache(&fetched);
        Ok(fetched)
    }

    /// Forgets the cached signature, so the next call reads it again (after a version
    /// refused what the old signature described).
    fn forget_inputs(&self) {
        *self.inputs.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Reads the signature now (not from the cache) and caches it; unlike [`Self::inputs`],
    /// the error says whether the server refused (e.g. NOT_FOUND: the version is not
    /// served), did not answer, or served something the processor cannot score with.
    async fn signature(&self) -> Result<Arc<ModelInputs>, SignatureError> {
        let fetched = Arc::new(self.fetch_inputs().await?);
        self.cache(&fetched);
        Ok(fetched)
    }

    fn cache(&self, inputs: &Arc<ModelInputs>) {
        self.window.store(inputs.window(), Ordering::Relaxed);
        *self.inputs.write().unwrap_or_else(|e| e.into_inner()) = Some((inputs.clone(), Instant::now()));
    }

    async fn fetch_inputs(&self) -> Result<ModelInputs, SignatureError> {
        let inputs = match &self.backend {
            Backend::Remote(remote) => self.remote_inputs(&remote.metadata).await?,
            Backend::Embedded(engine) => engine.inputs(self.config.max_window_readings)?,
        };
        tracing::info!(model = %self.config.name, version = inputs.version, inputs = inputs.inputs.len(), window = inputs.window(), "read the model's signature");
        Ok(inputs)
    }

    /// The inputs of the signature a model server reports (GetModelMetadata).
    async fn remote_inputs(&self, metadata: &PredictionServiceClient<Balanced>) -> Result<ModelInputs, SignatureError> {
        let unusable = |text: String| SignatureError::Unusable(text);
        let mut client = metadata.clone();
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
        check_outputs(&self.config.name, version, &self.config.signature, |name| signature.outputs.contains_key(name))?;
        let inputs = signature.inputs.iter().map(|(name, info)| {
            let shape =
                info.tensor_shape.as_ref().filter(|s| !s.unknown_rank).map(|s| s.dim.iter().map(|d| d.size).collect());
            (name.clone(), info.dtype == DataType::DtFloat as i32, shape)
        });
        reading_inputs(&self.config.name, version, inputs, self.config.max_window_readings)
    }

    /// The Predict request for `rows`: one float tensor of shape `[rows]` (or `[rows, k]`
    /// for a window) per input and,
    /// for several rows with `per_row_routing`, each row's device id
    /// ([`canary::ROW_ROUTING_KEYS_INPUT`]).
    fn request(&self, inputs: &ModelInputs, rows: &[Row]) -> PredictRequest {
        let shape = |dims: &[usize]| {
            Some(TensorShapeProto {
                dim: dims.iter().map(|&n| tensor_shape_proto::Dim { size: n as i64, ..Default::default() }).collect(),
                ..Default::default()
            })
        };
        let mut tensors: BTreeMap<String, TensorProto> = inputs
            .inputs
            .iter()
            .map(|input| {
                let tensor = TensorProto {
                    dtype: DataType::DtFloat as i32,
                    tensor_shape: shape(&input.dims(rows.len())),
                    float_val: input_values(input, rows),
                    ..Default::default()
                };
                (input.name.clone(), tensor)
            })
            .collect();
        if rows.len() > 1 && self.config.per_row_routing {
            let keys = TensorProto {
                dtype: DataType::DtString as i32,
                tensor_shape: shape(&[rows.len()]),
                string_val: rows.iter().map(|row| row.reading.device_id.clone().into_bytes()).collect(),
                ..Default::default()
            };
            tensors.insert(canary::ROW_ROUTING_KEYS_INPUT.to_owned(), keys);
        }
        PredictRequest {
            model_spec: Some(self.spec()),
            inputs: tensors.into_iter().collect(),
            output_filter: vec![SCORE_OUTPUT.into(), THRESHOLD_OUTPUT.into()],
        }
    }

    /// Scores `rows` in one call (a few attempts under the retry budget); one result per
    /// row, in order. A call the server refuses (INVALID_ARGUMENT) is split and its halves
    /// called again ([`batch::split_rejected`]), so one bad row is refused alone.
    async fn call(&self, rows: &[Row]) -> Vec<Result<Scored, ScoreError>> {
        let call_once = |part| self.call_once(part);
        batch::split_rejected(rows, &call_once).await
    }

    async fn call_once(&self, rows: &[Row]) -> Result<Vec<Scored>, ScoreError> {
        let inputs = self.inputs().await?;
        self.metrics.model_rows_per_call.observe(rows.len() as f64);
        let scored = match &self.backend {
            Backend::Remote(remote) => self.call_remote(&remote.stack, &inputs, rows).await?,
            Backend::Embedded(engine) => {
                engine.score(&inputs, rows).await.map_err(|(code, text)| self.failed(code, text))?
            }
        };
        self.observe_latency(&scored);
        Ok(scored)
    }

    /// One Predict call for `rows` through the balanced stack of model server replicas.
    async fn call_remote(&self, stack: &Stack, inputs: &ModelInputs, rows: &[Row]) -> Result<Vec<Scored>, ScoreError> {
        let call = Call {
            request: self.request(inputs, rows),
            routing_key: (rows.len() == 1).then(|| rows[0].reading.device_id.clone()),
            rows: rows.len(),
            parent: rows[0].trace.clone(),
            batched: rows[1..].iter().map(|row| row.trace.clone()).collect(),
        };
        let started = Instant::now();
        let result = stack.clone().oneshot(call).await;
        let latency = started.elapsed();
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                return Err(match error.downcast_ref::<tonic::Status>() {
                    Some(status) => self.failed(status.code(), format!("{}: {}", status.code(), status.message())),
                    None => self.failed(Code::Unavailable, format!("model server: {error}")),
                });
            }
        };
        self.decode(response, rows.len(), latency)
    }

    /// A call that failed with `code`: a rejection of its readings (INVALID_ARGUMENT) or
    /// a transient failure, counted.
    fn failed(&self, code: Code, text: String) -> ScoreError {
        self.metrics.model_errors.with_label_values(&[code_label(code).as_str()]).inc();
        if code == Code::InvalidArgument {
            // Perhaps the signature changed under us: read it again next time.
            self.forget_inputs();
            return ScoreError::Rejected(text);
        }
        ScoreError::Transient(text)
    }

    fn observe_latency(&self, scored: &[Scored]) {
        if let Some(first) = scored.first() {
            self.metrics
                .model_latency
                .with_label_values(&[&first.model_version.to_string()])
                .observe(first.latency.as_secs_f64());
        }
    }

    /// One score per row: `anomaly_score` has one value per row, `threshold` one per row
    /// or one for all, and the version is the row's ([`canary::ROW_VERSIONS_OUTPUT`]) or
    /// the call's.
    fn decode(&self, response: PredictResponse, rows: usize, latency: Duration) -> Result<Vec<Scored>, ScoreError> {
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
        let wrong = |what: String| ScoreError::Transient(format!("model {model_name} version {model_version}: {what}"));
        let values = |name: &str| -> Result<Vec<f32>, ScoreError> {
            let tensor = response.outputs.get(name).ok_or_else(|| wrong(format!("returned no {name:?}")))?;
            let values = floats(tensor).ok_or_else(|| wrong(format!("{name:?} is not float32")))?;
            one_per_row(name, values, rows).map_err(wrong)
        };
        let (scores, thresholds) = (values(SCORE_OUTPUT)?, values(THRESHOLD_OUTPUT)?);
        let versions = match response.outputs.get(canary::ROW_VERSIONS_OUTPUT) {
            Some(tensor) if tensor.int64_val.len() == rows => tensor.int64_val.clone(),
            Some(tensor) => {
                return Err(wrong(format!(
                    "{:?} has {} values for {rows} readings",
                    canary::ROW_VERSIONS_OUTPUT,
                    tensor.int64_val.len()
                )));
            }
            None => vec![model_version; rows],
        };
        Ok(scored_rows(&model_name, scores, thresholds, versions, latency))
    }
}

/// An output's values for `rows` readings: one per row, or one for all (a threshold, say).
fn one_per_row(name: &str, values: Vec<f32>, rows: usize) -> Result<Vec<f32>, String> {
    match values.len() {
        n if n == rows => Ok(values),
        1 => Ok(vec![values[0]; rows]),
        n => Err(format!("{name:?} has {n} values for {rows} readings")),
    }
}

/// Each row's score from a call's (or an embedded run's) per-row outputs.
fn scored_rows(
    model_name: &str,
    scores: Vec<f32>,
    thresholds: Vec<f32>,
    versions: Vec<i64>,
    latency: Duration,
) -> Vec<Scored> {
    scores
        .into_iter()
        .zip(thresholds)
        .zip(versions)
        .map(|((score, threshold), model_version)| Scored {
            score,
            threshold,
            model_name: model_name.to_owned(),
            model_version,
            latency,
            waited: Duration::ZERO,
        })
        .collect()
}

/// The values of a float tensor, from `float_val` or `tensor_content`.
fn floats(tensor: &TensorProto) -> Option<Vec<f32>> {
    if tensor.dtype != DataType::DtFloat as i32 {
        return None;
    }
    if !tensor.float_val.is_empty() {
        return Some(tensor.float_val.clone());
    }
    let content = &tensor.tensor_content;
    content
        .len()
        .is_multiple_of(4)
        .then(|| content.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// A gRPC code as a metric label: its canonical name in lower case (`invalid_argument`).
pub fn code_label(code: Code) -> String {
    proto::status_code_name(code).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_come_from_either_encoding() {
        let listed = TensorProto { dtype: DataType::DtFloat as i32, float_val: vec![2.5, 3.0], ..Default::default() };
        assert_eq!(floats(&listed), Some(vec![2.5, 3.0]));
        let packed = TensorProto {
            dtype: DataType::DtFloat as i32,
            tensor_content: 7.25f32.to_le_bytes().to_vec(),
            ..Default::default()
        };
        assert_eq!(floats(&packed), Some(vec![7.25]));
        let wrong = TensorProto { dtype: DataType::DtDouble as i32, double_val: vec![1.0], ..Default::default() };
        assert_eq!(floats(&wrong), None);
    }
}
