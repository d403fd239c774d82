//! Embedded inference (`model.mode = "embedded"`): the processor runs the SavedModel itself,
//! with the model server's own engine and repository, instead of calling a model server.
//! The repository is the model server's, used as a library, so a model directory of
//! numbered versions behaves exactly as it does there: the latest version is served (or
//! the pinned `model.version`), a new version directory is loaded in the background and
//! replaces the old one only once it is ready, and one that fails to load is reported and
//! never displaces a healthy one. Calls go through the same inference path (input
//! admission, the signature's batching scheduler), minus the network.
//!
//! What it gives up: canary rollouts and shadow scoring (they live in a model server), a
//! model shared by many processors (each replica loads its own copy), and batching across
//! processors. What it gains: no round trip, no serialisation and no second service to run.

use std::path::PathBuf;
use std::time::Duration;

use model_server::admission::WireTensor;
use model_server::batching::{BatchingOptions, SchedulingMode};
use model_server::error::ServeError;
use model_server::inference::{Inference, InferenceRequest, Limits};
use model_server::repository::{self, Repository, RepositoryOptions, VersionPolicy, VersionSelector};
use model_server::rollout::Rollouts;
use savedmodel::{DataType, Tensor};
use tonic::Code;

use super::{ModelInputs, Row, SCORE_OUTPUT, Scored, SignatureError, THRESHOLD_OUTPUT};
use crate::config::ModelConfig;

/// The loaded model versions and the task that watches their directory.
pub(super) struct Engine {
    inference: Inference,
    model: String,
    signature: String,
    selector: VersionSelector,
    poller: tokio::task::JoinHandle<()>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

impl Engine {
    /// Starts loading the model directory's versions (in the background: scoring waits
    /// until one is ready) and watching it for new ones. Needs a Tokio runtime.
    pub(super) fn start(config: &ModelConfig) -> Result<Self, String> {
        let dir: PathBuf = config
            .model_dir
            .clone()
            .ok_or("model.model_dir: embedded mode needs the model's directory (numbered versions under it)")?;
        if config.version_label.is_some() {
            return Err("model.version_label: labels are a model server's; pin model.version in embedded mode".into());
        }
        let policy = match config.version {
            Some(version) => VersionPolicy::Specific([version].into()),
            None => VersionPolicy::Latest(1),
        };
        let models = vec![repository::ModelConfig {
            name: config.name.clone(),
            base_path: dir,
            policy,
            labels: Default::default(),
        }];
        let options = RepositoryOptions {
            scheduling: SchedulingMode::Batched(BatchingOptions::default()),
            enable_warmup: false,
            saved_model_tags: vec!["serve".into()],
            allowed_base_paths: Vec::new(),
        };
        let metrics = model_server::metrics::Metrics::new();
        let repository = Repository::new(models, options, metrics.clone()).map_err(|e| format!("model: {e}"))?;
        let every = Duration::from_secs(config.reload_poll_seconds.max(1));
        // What the directory holds now, then a look every `every`: a new version loads beside
        // the served one and replaces it once ready (loads run on threads of their own).
        let poller = tokio::spawn({
            let repository = repository.clone();
            async move {
                let first = repository.clone();
                let _ = tokio::task::spawn_blocking(move || drop(first.reconcile())).await;
                repository.follow_versions(every).await;
            }
        });
        let selector = config.version.map_or(VersionSelector::Latest, VersionSelector::Version);
        Ok(Self {
            inference: Inference::new(repository, Limits::default(), Rollouts::default(), metrics),
            model: config.name.clone(),
            signature: config.signature.clone(),
            selector,
            poller,
        })
    }

    /// The served version's inputs, read from its signature.
    pub(super) fn inputs(&self, max_window: usize) -> Result<ModelInputs, SignatureError> {
        let version = self.inference.repository.resolve(&self.model, &self.selector).map_err(|error| {
            // Not loaded (yet): a status the caller waits on, like a model server's.
            SignatureError::Status(tonic::Status::new(error.code(), error.to_string()))
        })?;
        let spec = version.specs.get(&self.signature).ok_or_else(|| {
            SignatureError::Unusable(format!(
                "model {} version {} has no signature {:?}",
                self.model, version.version, self.signature
            ))
        })?;
        super::check_outputs(&self.model, version.version, &self.signature, |name| spec.outputs.contains_key(name))?;
        let inputs = spec
            .inputs
            .iter()
            .map(|(name, tensor)| (name.clone(), tensor.dtype == DataType::DtFloat, tensor.shape.clone()));
        super::reading_inputs(&self.model, version.version, inputs, max_window)
    }

    /// Scores `rows` in one run of the served version.
    pub(super) async fn score(&self, inputs: &ModelInputs, rows: &[Row]) -> Result<Vec<Scored>, (Code, String)> {
        let started = std::time::Instant::now();
        let tensors = inputs
            .inputs
            .iter()
            .map(|input| {
                let values = super::input_values(input, rows);
                let tensor = Tensor::from_shape(&input.dims(rows.len()), &values)
                    .map_err(|e| (Code::Internal, e.to_string()))?;
                Ok((input.name.clone(), WireTensor::Decoded(tensor)))
            })
            .collect::<Result<Vec<_>, (Code, String)>>()?;
        let request = InferenceRequest {
            model: self.model.clone(),
            selector: self.selector.clone(),
            signature: Some(self.signature.clone()),
            inputs: tensors,
            output_filter: vec![SCORE_OUTPUT.into(), THRESHOLD_OUTPUT.into()],
            routing_key: None,
            row_keys: None,
        };
        let answer = self.inference.run(request, &mut None).await.map_err(|e: ServeError| (e.code(), e.to_string()))?;
        let latency = started.elapsed();
        let floats = |name: &str| -> Result<Vec<f32>, (Code, String)> {
            let tensor = answer.outputs.get(name).ok_or((Code::Internal, format!("no {name:?} output")))?;
            let values = tensor
                .try_as_plain_ram()
                .ok()
                .and_then(|t| t.as_slice::<f32>().ok())
                .ok_or((Code::Internal, format!("{name:?} is not float32")))?;
            super::one_per_row(name, values.to_vec(), rows.len()).map_err(|why| (Code::Internal, why))
        };
        let (scores, thresholds) = (floats(SCORE_OUTPUT)?, floats(THRESHOLD_OUTPUT)?);
        let versions = vec![answer.version.version; rows.len()];
        Ok(super::scored_rows(&self.model, scores, thresholds, versions, latency))
    }
}
