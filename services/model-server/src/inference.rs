//! The one inference path every API (TF Serving gRPC and REST, KServe v2) goes through:
//! resolve the version, validate inputs against the signature *before* queueing, check
//! limits, queue on the signature's scheduler, and filter outputs.

use std::collections::BTreeMap;
use std::sync::Arc;

use canary::split::Arm;
use savedmodel::{PredictError, Tensor};

use crate::batching::SubmitError;
use crate::error::ServeError;
use crate::metrics::Metrics;
use crate::repository::{LoadedVersion, Repository, VersionSelector};
use crate::rollout::Rollouts;

/// Request limits (checked before any work is queued).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Most rows (batch axis) one request may carry.
    pub max_request_rows: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_request_rows: 65_536 }
    }
}

/// (model, version, signature): what metrics are labelled with.
pub type Target = (String, i64, String);

#[derive(Debug)]
pub struct InferenceRequest {
    pub model: String,
    pub selector: VersionSelector,
    /// `None` or empty: `serving_default`.
    pub signature: Option<String>,
    pub inputs: Vec<(String, Tensor)>,
    /// Only these outputs (all when empty).
    pub output_filter: Vec<String>,
    /// Sticks the request to one side of a canary split (the device id, say).
    pub routing_key: Option<Vec<u8>>,
}

#[derive(Debug)]
pub struct InferenceResponse {
    /// The version that answered (kept alive until the response is sent).
    pub version: Arc<LoadedVersion>,
    pub signature: String,
    pub outputs: BTreeMap<String, Tensor>,
}

#[derive(Debug, Clone)]
pub struct Inference {
    pub repository: Repository,
    pub limits: Limits,
    pub rollouts: Rollouts,
    pub metrics: Metrics,
}

impl Inference {
    pub fn new(repository: Repository, limits: Limits, rollouts: Rollouts, metrics: Metrics) -> Self {
        Self { repository, limits, rollouts, metrics }
    }

    /// The version that answers: the one a request pins; for an unpinned request to a
    /// model under a rollout, the side its routing key (or chance) falls on, or the other
    /// side if that one is not loaded; otherwise the latest.
    pub fn resolve(
        &self,
        model: &str,
        selector: &VersionSelector,
        routing_key: Option<&[u8]>,
    ) -> Result<Arc<LoadedVersion>, ServeError> {
        if matches!(selector, VersionSelector::Latest)
            && let Some((split, arm)) = self.rollouts.route(model, routing_key)
        {
            let other = match arm {
                Arm::Stable => Arm::Canary,
                Arm::Canary => Arm::Stable,
            };
            for side in [arm, other] {
                if let Ok(version) = self.repository.resolve(model, &VersionSelector::Version(split.version(side))) {
                    return Ok(version);
                }
            }
        }
        self.repository.resolve(model, selector)
    }

    /// Runs a request. `target` is set to (model, version, signature) as soon as the version
    /// is resolved, so failures after that point are counted against the right version.
    pub async fn run(
        &self,
        request: InferenceRequest,
        target: &mut Option<Target>,
    ) -> Result<InferenceResponse, ServeError> {
        let version = self.resolve(&request.model, &request.selector, request.routing_key.as_deref())?;
        let signature =
            request.signature.filter(|s| !s.is_empty()).unwrap_or_else(|| savedmodel::DEFAULT_SIGNATURE.to_owned());
        *target = Some((version.model.clone(), version.version, signature.clone()));
        let predict_error = |source: PredictError| ServeError::Predict {
            model: version.model.clone(),
            version: version.version,
            signature: signature.clone(),
            source: Box::new(source),
        };
        let (plan, scheduler) = version.signature(&signature)?;
        for name in &request.output_filter {
            if !plan.spec().outputs.contains_key(name) {
                return Err(ServeError::InvalidArgument(format!(
                    "output_filter names {name:?}, which is not an output of model {:?} signature {signature:?} \
                     (outputs: {})",
                    version.model,
                    plan.spec().outputs.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        let prepared = plan.prepare(request.inputs).map_err(predict_error)?;
        if let Some(rows) = prepared.rows()
            && rows > self.limits.max_request_rows
        {
            return Err(ServeError::InvalidArgument(format!(
                "model {:?} signature {signature:?}: the request has {rows} rows, more than the limit of {}",
                version.model, self.limits.max_request_rows
            )));
        }
        let mut outputs = scheduler
            .infer(prepared)
            .await
            .map_err(|e| match e {
                SubmitError::TooLarge { .. } => ServeError::InvalidArgument(format!(
                    "model {:?} version {} signature {signature:?}: {e}",
                    version.model, version.version
                )),
                SubmitError::QueueFull(_) => ServeError::Overloaded(format!(
                    "model {:?} version {} signature {signature:?}: {e}",
                    version.model, version.version
                )),
                SubmitError::Closed => ServeError::Overloaded(format!(
                    "model {:?} version {} is unloading; retry",
                    version.model, version.version
                )),
            })?
            .map_err(predict_error)?;
        let floats = |name: &str| outputs.get(name)?.try_as_plain_ram().ok()?.as_slice::<f32>().ok();
        if let Some(scores) = floats(canary::SCORE_OUTPUT) {
            self.metrics.observe_scores(&version.model, version.version, scores, floats(canary::THRESHOLD_OUTPUT));
        }
        if !request.output_filter.is_empty() {
            outputs.retain(|name, _| request.output_filter.contains(name));
        }
        Ok(InferenceResponse { version, signature, outputs })
    }
}
