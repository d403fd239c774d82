//! `vigil.rollout.v1.RolloutService`: start, inspect, steer and end canary rollouts.
//! Every change goes through the [`RolloutLog`], so it reaches every replica; a malformed
//! request gets INVALID_ARGUMENT naming the field.

use pb::rollout_service_server::RolloutService;
use proto::vigil::rollout::v1 as pb;
use tonic::{Request, Response, Status};

use crate::repository::{Repository, VersionSelector};
use crate::rollout::log::{ProposeError, RolloutLog};
use crate::rollout::{AnalysisPlan, Phase, RolloutSpec, RolloutState, Source};

/// Longest abort reason kept: it is stored in the rollout state, published to every replica
/// and shown by `vigil rollout`; free text from a caller is bounded like everything else.
pub const MAX_REASON_BYTES: usize = 1024;

#[derive(Debug, Clone)]
pub struct RolloutApi {
    pub log: RolloutLog,
    pub repository: Repository,
}

fn spec_from_proto(spec: pb::RolloutSpec) -> RolloutSpec {
    let analysis = spec.analysis.map(|a| {
        let defaults = AnalysisPlan::default();
        let or = |value: f64, default: f64| if value == 0.0 { default } else { value };
        AnalysisPlan {
            step_weights_percent: if a.step_weights_percent.is_empty() {
                defaults.step_weights_percent
            } else {
                a.step_weights_percent
            },
            interval_seconds: if a.interval_seconds == 0 {
                defaults.interval_seconds
            } else {
                a.interval_seconds.into()
            },
            failure_limit: if a.failure_limit == 0 { defaults.failure_limit } else { a.failure_limit },
            min_samples: if a.min_samples == 0 { defaults.min_samples } else { a.min_samples as usize },
            max_error_rate_increase: or(a.max_error_rate_increase, defaults.max_error_rate_increase),
            max_latency_p99_ratio: or(a.max_latency_p99_ratio, defaults.max_latency_p99_ratio),
            max_anomaly_rate_difference: or(a.max_anomaly_rate_difference, defaults.max_anomaly_rate_difference),
            score_significance: or(a.score_significance, defaults.score_significance),
            max_score_shift: or(a.max_score_shift, defaults.max_score_shift),
        }
    });
    RolloutSpec {
        model: spec.model,
        stable: spec.stable_version,
        canary: spec.canary_version,
        canary_weight_percent: spec.canary_weight_percent,
        shadow_percent: spec.shadow_percent,
        analysis,
    }
}

pub fn to_proto(state: &RolloutState) -> pb::Rollout {
    let spec = &state.spec;
    pb::Rollout {
        spec: Some(pb::RolloutSpec {
            model: spec.model.clone(),
            stable_version: spec.stable,
            canary_version: spec.canary,
            canary_weight_percent: spec.canary_weight_percent,
            shadow_percent: spec.shadow_percent,
            analysis: spec.analysis.as_ref().map(|a| pb::Analysis {
                step_weights_percent: a.step_weights_percent.clone(),
                interval_seconds: a.interval_seconds.try_into().unwrap_or(u32::MAX),
                failure_limit: a.failure_limit,
                min_samples: a.min_samples.try_into().unwrap_or(u32::MAX),
                max_error_rate_increase: a.max_error_rate_increase,
                max_latency_p99_ratio: a.max_latency_p99_ratio,
                max_anomaly_rate_difference: a.max_anomaly_rate_difference,
                score_significance: a.score_significance,
                max_score_shift: a.max_score_shift,
            }),
        }),
        phase: match state.phase {
            Phase::Progressing => pb::Phase::Progressing,
            Phase::Manual => pb::Phase::Manual,
            Phase::Promoted => pb::Phase::Promoted,
            Phase::RolledBack => pb::Phase::RolledBack,
            Phase::Aborted => pb::Phase::Aborted,
        } as i32,
        canary_weight_percent: state.canary_weight_percent,
        step: state.step.try_into().unwrap_or(u32::MAX),
        failures: state.failures,
        revision: state.revision,
        last_decision: state.last_decision.clone(),
        updated_unix_ms: state.updated_unix_ms,
        source: match state.source {
            Source::File => "file",
            Source::Api => "api",
        }
        .into(),
        updated_by: state.updated_by.clone(),
    }
}

impl RolloutApi {
    fn current(&self, model: &str) -> Result<std::sync::Arc<RolloutState>, Status> {
        if model.is_empty() {
            return Err(Status::invalid_argument("model is empty"));
        }
        if !crate::repository::valid_model_name(model) {
            return Err(Status::invalid_argument("model: not a valid model name"));
        }
        self.log.rollouts().get(model).ok_or_else(|| Status::not_found(format!("model {model:?} has no rollout")))
    }

    fn active(&self, model: &str) -> Result<std::sync::Arc<RolloutState>, Status> {
        let current = self.current(model)?;
        if !current.phase.is_active() {
            return Err(Status::failed_precondition(format!(
                "the rollout of model {model:?} is over ({}); start a new one",
                current.phase.name()
            )));
        }
        Ok(current)
    }

    async fn commit(&self, state: RolloutState, event: &str) -> Result<Response<pb::Rollout>, Status> {
        match self.log.propose(state.clone()).await {
            Ok(applied) => {
                self.log.publish(crate::rollout::log::RolloutEvent::of(event, &applied, None)).await;
                Ok(Response::new(to_proto(&applied)))
            }
            Err(ProposeError::Conflict(winner)) => Err(Status::aborted(format!(
                "a concurrent change to the rollout of model {:?} won (now revision {}: {}); retry",
                winner.spec.model, winner.revision, winner.last_decision
            ))),
            Err(e @ ProposeError::Unavailable(_)) => Err(Status::unavailable(e.to_string())),
        }
    }
}

#[tonic::async_trait]
impl RolloutService for RolloutApi {
    async fn start_rollout(&self, request: Request<pb::StartRolloutRequest>) -> Result<Response<pb::Rollout>, Status> {
        let spec = request.into_inner().spec.ok_or_else(|| Status::invalid_argument("spec is missing"))?;
        let spec = spec_from_proto(spec);
        spec.validate().map_err(|e| Status::invalid_argument(format!("spec: {e}")))?;
        let model = spec.model.clone();
        if !self.repository.model_names().contains(&model) {
            return Err(Status::not_found(format!(
                "spec.model: {model:?} is not served (served: {})",
                self.repository.model_names().join(", ")
            )));
        }
        for (field, version) in [("stable_version", spec.stable), ("canary_version", spec.canary)] {
            self.repository.resolve(&model, &VersionSelector::Version(version)).map_err(|e| {
                Status::failed_precondition(format!(
                    "spec.{field}: {e}; both versions must be loaded (list them in the model's version policy)"
                ))
            })?;
        }
        let current = self.log.rollouts().get(&model);
        if let Some(current) = &current {
            if current.source == Source::File {
                return Err(Status::failed_precondition(format!(
                    "the rollout file declares model {model:?}'s rollout; change it there"
                )));
            }
            if current.phase.is_active() {
                return Err(Status::already_exists(format!(
                    "model {model:?} has a rollout in progress (version {} on {}%); promote or abort it first",
                    current.spec.canary, current.canary_weight_percent
                )));
            }
        }
        let state = RolloutState::start(spec, Source::Api, current.as_deref(), self.log.replica());
        self.commit(state, "started").await
    }

    async fn get_rollout(&self, request: Request<pb::GetRolloutRequest>) -> Result<Response<pb::Rollout>, Status> {
        let state = self.current(&request.into_inner().model)?;
        Ok(Response::new(to_proto(&state)))
    }

    async fn list_rollouts(
        &self,
        _request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        let rollouts = self.log.rollouts().list().iter().map(|s| to_proto(s)).collect();
        Ok(Response::new(pb::ListRolloutsResponse { rollouts }))
    }

    async fn set_canary_weight(
        &self,
        request: Request<pb::SetCanaryWeightRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let request = request.into_inner();
        canary::split::Weight::from_percent(request.canary_weight_percent)
            .map_err(|e| Status::invalid_argument(format!("canary_weight_percent: {e}")))?;
        let current = self.active(&request.model)?;
        self.commit(current.with_weight(request.canary_weight_percent, self.log.replica()), "weight_set").await
    }

    async fn promote_rollout(
        &self,
        request: Request<pb::PromoteRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let current = self.active(&request.into_inner().model)?;
        let why = format!("promoted by hand: version {} takes all unpinned traffic", current.spec.canary);
        self.commit(current.promoted(self.log.replica(), why), "promoted").await
    }

    async fn abort_rollout(&self, request: Request<pb::AbortRolloutRequest>) -> Result<Response<pb::Rollout>, Status> {
        let request = request.into_inner();
        if request.reason.len() > MAX_REASON_BYTES {
            return Err(Status::invalid_argument(format!(
                "reason: {} bytes, more than the {MAX_REASON_BYTES} allowed",
                request.reason.len()
            )));
        }
        let current = self.active(&request.model)?;
        let reason = if request.reason.is_empty() { "no reason given".to_owned() } else { request.reason };
        self.commit(current.aborted(self.log.replica(), format!("aborted by hand: {reason}")), "aborted").await
    }
}
