//! The one inference path every API (TF Serving gRPC and REST, KServe v2) goes through:
//! resolve the version and signature, admit the wire inputs against them and decode them
//! ([`crate::admission`]: nothing is allocated for a request before it is known to fit),
//! queue on the signature's scheduler, and filter outputs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use canary::split::Arm;
use savedmodel::{PredictError, Tensor};
use tokio::sync::Semaphore;

use crate::admission::{self, RequestLimits, WireTensor};
use crate::batching::SubmitError;
use crate::error::ServeError;
use crate::metrics::Metrics;
use crate::repository::{LoadedVersion, Repository, VersionSelector};
use crate::rollout::Rollouts;
use crate::rollout::windows::{Outcome, Windows};

mod per_row;
pub mod reading_windows;

/// Request limits (checked before anything is decoded or queued).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Most rows (batch axis) one request may carry.
    pub max_request_rows: usize,
    /// Most decoded tensor bytes one request may carry; `None` sizes it per signature
    /// ([`admission::budget`]).
    pub max_request_bytes: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_request_rows: 65_536, max_request_bytes: None }
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
    /// As they came off the wire: decoded only once admitted.
    pub inputs: Vec<(String, WireTensor)>,
    /// Only these outputs (all when empty).
    pub output_filter: Vec<String>,
    /// Sticks the request to one side of a canary split (the device id, say).
    pub routing_key: Option<Vec<u8>>,
    /// Or one routing key per row: each row is answered by the side its key falls on, and
    /// the response says which version answered each row ([`per_row`]).
    pub row_keys: Option<Vec<Vec<u8>>>,
}

/// What a request's parts share while they run.
struct Call<'a> {
    signature: &'a str,
    /// The request asked for the latest version (so a rollout may route and shadow it).
    latest: bool,
    output_filter: &'a [String],
    started: Instant,
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
    /// What versions under an active rollout answered, for its analysis.
    pub windows: Windows,
    /// Bounds the shadow runs in flight; a request finding none free is not shadowed.
    shadow_slots: Arc<Semaphore>,
    pub metrics: Metrics,
}

/// Shadow runs in flight at most: shadowing adds work, and under overload it yields.
const MAX_SHADOW_IN_FLIGHT: usize = 64;

/// An answer's anomaly scores and thresholds, row by row (same length).
fn scored(outputs: &BTreeMap<String, Tensor>) -> Option<(&[f32], &[f32])> {
    let (scores, thresholds) = (floats(outputs, canary::SCORE_OUTPUT)?, floats(outputs, canary::THRESHOLD_OUTPUT)?);
    (scores.len() == thresholds.len()).then_some((scores, thresholds))
}

fn floats<'a>(outputs: &'a BTreeMap<String, Tensor>, name: &str) -> Option<&'a [f32]> {
    outputs.get(name)?.try_as_plain_ram().ok()?.as_slice::<f32>().ok()
}

impl Inference {
    pub fn new(repository: Repository, limits: Limits, rollouts: Rollouts, metrics: Metrics) -> Self {
        let shadow_slots = Arc::new(Semaphore::new(MAX_SHADOW_IN_FLIGHT));
        Self { repository, limits, rollouts, windows: Windows::default(), shadow_slots, metrics }
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
    ///
    /// Under an active rollout the outcome also goes into the answering version's analysis
    /// window, and a stable-answered, unpinned request picked for shadowing is run again on
    /// the canary in the background: its answer is compared with stable's and dropped. A
    /// request with per-row routing keys is split by the side each row's key falls on
    /// ([`per_row`]).
    pub async fn run(
        &self,
        request: InferenceRequest,
        target: &mut Option<Target>,
    ) -> Result<InferenceResponse, ServeError> {
        let started = Instant::now();
        let first_key = request.row_keys.as_ref().and_then(|keys| keys.first()).map(Vec::as_slice);
        let routing_key = first_key.or(request.routing_key.as_deref());
        let version = self.resolve(&request.model, &request.selector, routing_key)?;
        let signature =
            request.signature.filter(|s| !s.is_empty()).unwrap_or_else(|| savedmodel::DEFAULT_SIGNATURE.to_owned());
        *target = Some(version.metrics_target(&signature));
        let (plan, scheduler) = version.signature(&signature)?;
        let limits = RequestLimits {
            max_rows: self.limits.max_request_rows,
            max_batch_rows: scheduler.max_rows(),
            max_bytes: self.limits.max_request_bytes,
        };
        let admitted = admission::admit(&version.model, version.version, plan.spec(), request.inputs, limits)?;
        let inputs = admission::decode_admitted(admitted).await?;
        let call = Call {
            signature: &signature,
            latest: matches!(request.selector, VersionSelector::Latest),
            output_filter: &request.output_filter,
            started,
        };
        match request.row_keys {
            Some(keys) => self.run_per_row(version, &call, inputs, keys).await,
            None => {
                let outputs = self.answer(&version, &call, inputs, routing_key).await?;
                Ok(InferenceResponse { version, signature, outputs })
            }
        }
    }

    /// Runs admitted inputs on `version`: into its analysis window under an active rollout,
    /// shadowed on the canary if `routing_key` is picked for that; the filtered outputs.
    async fn answer(
        &self,
        version: &Arc<LoadedVersion>,
        call: &Call<'_>,
        inputs: Vec<(String, Tensor)>,
        routing_key: Option<&[u8]>,
    ) -> Result<BTreeMap<String, Tensor>, ServeError> {
        let signature = call.signature;
        let rollout = self.rollouts.get(&version.model).filter(|r| r.phase.is_active());
        let watched = rollout.as_ref().is_some_and(|r| [r.spec.stable, r.spec.canary].contains(&version.version));
        let shadow = rollout
            .as_ref()
            .filter(|r| call.latest && version.version == r.spec.stable)
            .and_then(|_| self.rollouts.shadow(&version.model, routing_key))
            .and_then(|canary| match self.shadow_slots.clone().try_acquire_owned() {
                Ok(slot) => Some((canary, slot, inputs.clone())),
                Err(_) => {
                    self.metrics.shadow_skipped(&version.model, canary);
                    None
                }
            });

        let result = self.execute(version, signature, inputs, call.output_filter).await;
        if watched {
            let outputs = result.as_ref().ok();
            self.windows.record(
                &version.model,
                version.version,
                Outcome {
                    error: result.as_ref().is_err_and(ServeError::is_server_side),
                    latency_ms: call.started.elapsed().as_secs_f64() * 1e3,
                    scores: outputs.and_then(|o| floats(o, canary::SCORE_OUTPUT)).unwrap_or_default(),
                    thresholds: outputs.and_then(|o| floats(o, canary::THRESHOLD_OUTPUT)),
                },
            );
        }
        let mut outputs = result?;
        if let Some(scores) = floats(&outputs, canary::SCORE_OUTPUT) {
            self.metrics.observe_scores(
                &version.model,
                version.version,
                scores,
                floats(&outputs, canary::THRESHOLD_OUTPUT),
            );
        }
        if let Some((canary, slot, inputs)) = shadow
            && let Some((scores, thresholds)) = scored(&outputs)
        {
            let stable = (scores.to_vec(), thresholds.to_vec());
            let run = self.clone().shadow(version.model.clone(), canary, signature.to_owned(), inputs, stable);
            tokio::spawn(async move {
                run.await;
                drop(slot);
            });
        }
        if !call.output_filter.is_empty() {
            outputs.retain(|name, _| call.output_filter.contains(name));
        }
        Ok(outputs)
    }

    /// Scores `inputs` with the canary in shadow: into its analysis window and, beside
    /// stable's answer (`stable`: scores, thresholds), into the paired window; its flags are
    /// compared row by row with stable's. Nothing of it reaches the caller.
    async fn shadow(
        self,
        model: String,
        canary: i64,
        signature: String,
        inputs: Vec<(String, Tensor)>,
        stable: (Vec<f32>, Vec<f32>),
    ) {
        let Ok(version) = self.repository.resolve(&model, &VersionSelector::Version(canary)) else { return };
        let started = Instant::now();
        let result = self.execute(&version, &signature, inputs, &[]).await;
        if let Err(ServeError::Overloaded(_)) = result {
            // Shadow work is best effort: a full queue skips it and is not the canary's error.
            return self.metrics.shadow_skipped(&model, canary);
        }
        let outputs = result.as_ref().ok();
        self.windows.record(
            &model,
            canary,
            Outcome {
                error: result.as_ref().is_err_and(ServeError::is_server_side),
                latency_ms: started.elapsed().as_secs_f64() * 1e3,
                scores: outputs.and_then(|o| floats(o, canary::SCORE_OUTPUT)).unwrap_or_default(),
                thresholds: outputs.and_then(|o| floats(o, canary::THRESHOLD_OUTPUT)),
            },
        );
        match outputs.map(scored) {
            Some(Some((scores, thresholds))) if scores.len() == stable.0.len() => {
                self.windows.record_paired(&model, (&stable.0, &stable.1), (scores, thresholds));
                let flag = |(s, t): (&f32, &f32)| s > t;
                let stable_flags = stable.0.iter().zip(&stable.1).map(flag);
                let agreed = scores.iter().zip(thresholds).map(flag).zip(stable_flags).filter(|(c, s)| c == s).count();
                self.metrics.observe_shadow(&model, canary, agreed as u64, (scores.len() - agreed) as u64);
            }
            Some(_) => tracing::debug!(model, canary, "shadow answer has no comparable scores"),
            None => tracing::debug!(model, canary, "shadow run failed: {:?}", result.err()),
        }
    }

    /// Validates, queues and runs one admitted, decoded request on `version`; all outputs.
    async fn execute(
        &self,
        version: &Arc<LoadedVersion>,
        signature: &str,
        inputs: Vec<(String, Tensor)>,
        output_filter: &[String],
    ) -> Result<BTreeMap<String, Tensor>, ServeError> {
        let predict_error = |source: PredictError| ServeError::Predict {
            model: version.model.clone(),
            version: version.version,
            signature: signature.to_owned(),
            source: Box::new(source),
        };
        let (plan, scheduler) = version.signature(signature)?;
        for name in output_filter {
            if !plan.spec().outputs.contains_key(name) {
                return Err(ServeError::InvalidArgument(format!(
                    "output_filter names {name:?}, which is not an output of model {:?} signature {signature:?} \
                     (outputs: {})",
                    version.model,
                    plan.spec().outputs.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        let inputs = reading_windows::narrow(&version.model, version.version, plan.spec(), inputs)?;
        let prepared = plan.prepare(inputs).map_err(predict_error)?;
        scheduler
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
            .map_err(predict_error)
    }
}
