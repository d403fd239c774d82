//! A rollout's spec (what it was asked to do) and state (where it stands), and every change
//! a rollout can go through. Changes return a new state one revision on; whoever keeps the
//! state ([`super::log`]) applies them in revision order, so every replica ends up in the
//! same place.

use canary::analysis::{Bounds, Decision, Progress, Steps};
use canary::split::{Split, Weight};
use serde::{Deserialize, Serialize};

/// What a rollout is asked to do; fixed once started. The rollout file's `[[rollouts]]`
/// entries and the gRPC `RolloutSpec` both read into this.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    pub model: String,
    pub stable: i64,
    pub canary: i64,
    /// The canary's first share of unpinned requests (0-100); with an analysis plan, 0
    /// means the plan's first step.
    #[serde(default)]
    pub canary_weight_percent: f64,
    /// Share (0-100) of stable-answered requests the canary also scores in shadow.
    #[serde(default)]
    pub shadow_percent: f64,
    /// Automated analysis; without it the weight stays where it is set.
    #[serde(default)]
    pub analysis: Option<AnalysisPlan>,
}

/// Automated analysis in the manner of Flagger and Argo Rollouts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnalysisPlan {
    /// Canary weights to go through, ascending, each in (0, 100); passing a check at the
    /// last one promotes the canary.
    pub step_weights_percent: Vec<f64>,
    /// Seconds between checks; each check judges the window since the previous one.
    pub interval_seconds: u64,
    /// Failed checks (cumulative over the rollout) that roll the canary back.
    pub failure_limit: u32,
    pub min_samples: usize,
    pub max_error_rate_increase: f64,
    pub max_latency_p99_ratio: f64,
    pub max_anomaly_rate_difference: f64,
    pub score_significance: f64,
    pub max_score_shift: f64,
}

impl Default for AnalysisPlan {
    fn default() -> Self {
        let bounds = Bounds::default();
        Self {
            step_weights_percent: vec![5.0, 25.0, 50.0],
            interval_seconds: 60,
            failure_limit: 2,
            min_samples: bounds.min_samples,
            max_error_rate_increase: bounds.max_error_rate_increase,
            max_latency_p99_ratio: bounds.max_latency_p99_ratio,
            max_anomaly_rate_difference: bounds.max_anomaly_rate_difference,
            score_significance: bounds.score_significance,
            max_score_shift: bounds.max_score_shift,
        }
    }
}

impl AnalysisPlan {
    pub fn steps(&self) -> Steps {
        Steps {
            weights: self
                .step_weights_percent
                .iter()
                .map(|&p| Weight::from_percent(p).unwrap_or(Weight::ZERO))
                .collect(),
            failure_limit: self.failure_limit,
        }
    }

    pub fn bounds(&self) -> Bounds {
        Bounds {
            min_samples: self.min_samples,
            max_error_rate_increase: self.max_error_rate_increase,
            max_latency_p99_ratio: self.max_latency_p99_ratio,
            max_anomaly_rate_difference: self.max_anomaly_rate_difference,
            score_significance: self.score_significance,
            max_score_shift: self.max_score_shift,
        }
    }

    fn validate(&self) -> Result<(), String> {
        let steps = &self.step_weights_percent;
        if steps.is_empty() {
            return Err("analysis.step_weights_percent is empty".into());
        }
        if steps.len() > MAX_STEPS {
            return Err(format!("analysis.step_weights_percent: {} steps, more than {MAX_STEPS}", steps.len()));
        }
        for (i, &step) in steps.iter().enumerate() {
            if !(step > 0.0 && step < 100.0) {
                return Err(format!("analysis.step_weights_percent[{i}]: {step} is not strictly between 0 and 100"));
            }
            if i > 0 && step <= steps[i - 1] {
                return Err(format!(
                    "analysis.step_weights_percent[{i}]: {step} does not ascend from {}",
                    steps[i - 1]
                ));
            }
        }
        if self.interval_seconds == 0 {
            return Err("analysis.interval_seconds must be at least 1".into());
        }
        if self.failure_limit == 0 {
            return Err("analysis.failure_limit must be at least 1".into());
        }
        if self.min_samples < 2 {
            return Err(format!("analysis.min_samples: {} is below 2", self.min_samples));
        }
        let positive = [
            ("max_error_rate_increase", self.max_error_rate_increase),
            ("max_latency_p99_ratio", self.max_latency_p99_ratio),
            ("max_anomaly_rate_difference", self.max_anomaly_rate_difference),
            ("score_significance", self.score_significance),
            ("max_score_shift", self.max_score_shift),
        ];
        for (name, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!("analysis.{name}: {value} is not a positive number"));
            }
        }
        Ok(())
    }
}

/// Most weight steps an analysis plan may have (a plan is state every replica holds).
const MAX_STEPS: usize = 100;

fn percent(field: &str, value: f64) -> Result<Weight, String> {
    Weight::from_percent(value).map_err(|e| format!("{field}: {e}"))
}

impl RolloutSpec {
    /// Checks the spec; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.model.is_empty() {
            return Err("model is empty".into());
        }
        if self.stable <= 0 || self.canary <= 0 {
            return Err(format!("stable ({}) and canary ({}) must be positive versions", self.stable, self.canary));
        }
        if self.stable == self.canary {
            return Err(format!("stable and canary are both version {}", self.stable));
        }
        percent("canary_weight_percent", self.canary_weight_percent)?;
        percent("shadow_percent", self.shadow_percent)?;
        if let Some(plan) = &self.analysis {
            plan.validate()?;
        }
        Ok(())
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The analysis plan steps the canary's weight.
    Progressing,
    /// The weight is set by hand.
    Manual,
    /// All unpinned traffic goes to the canary.
    Promoted,
    /// The analysis failed the canary; all unpinned traffic goes to stable.
    RolledBack,
    /// Stopped by an operator (or removed from the rollout file); all to stable.
    Aborted,
}

impl Phase {
    pub fn is_active(self) -> bool {
        matches!(self, Phase::Progressing | Phase::Manual)
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Progressing => "progressing",
            Phase::Manual => "manual",
            Phase::Promoted => "promoted",
            Phase::RolledBack => "rolled_back",
            Phase::Aborted => "aborted",
        }
    }
}

/// Who owns a rollout: the rollout file (which restarts it when its entry changes) or the
/// gRPC API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    File,
    Api,
}

/// A rollout as every replica holds it. Serialized as JSON into the rollout state topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutState {
    pub spec: RolloutSpec,
    pub source: Source,
    pub phase: Phase,
    pub canary_weight_percent: f64,
    /// Index into the plan's steps.
    pub step: usize,
    pub failures: u32,
    /// One more with every change; a change is applied only over a lower revision.
    pub revision: u64,
    pub last_decision: String,
    pub updated_unix_ms: i64,
    pub updated_by: String,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl RolloutState {
    /// A new rollout from a checked spec, one revision after `previous` (the model's last
    /// rollout, if any).
    pub fn start(spec: RolloutSpec, source: Source, previous: Option<&RolloutState>, replica: &str) -> Self {
        let (phase, weight, step) = match &spec.analysis {
            Some(plan) => {
                let steps = &plan.step_weights_percent;
                let weight = if spec.canary_weight_percent > 0.0 { spec.canary_weight_percent } else { steps[0] };
                let step = steps.iter().rposition(|&s| s <= weight).unwrap_or(0);
                (Phase::Progressing, weight, step)
            }
            None => (Phase::Manual, spec.canary_weight_percent, 0),
        };
        let decision = format!(
            "started: version {} stable, version {} canary at {weight}%{}",
            spec.stable,
            spec.canary,
            if spec.shadow_percent > 0.0 { format!(", shadowing {}%", spec.shadow_percent) } else { String::new() }
        );
        Self {
            spec,
            source,
            phase,
            canary_weight_percent: weight,
            step,
            failures: 0,
            revision: previous.map_or(0, |p| p.revision) + 1,
            last_decision: decision,
            updated_unix_ms: now_ms(),
            updated_by: replica.to_owned(),
        }
    }

    /// This state one revision on, with `decision` recorded.
    fn changed(&self, replica: &str, decision: String) -> Self {
        Self {
            revision: self.revision + 1,
            last_decision: decision,
            updated_unix_ms: now_ms(),
            updated_by: replica.to_owned(),
            ..self.clone()
        }
    }

    /// The weight set by hand; the analysis plan, if any, stops.
    pub fn with_weight(&self, percent: f64, replica: &str) -> Self {
        let mut next = self.changed(replica, format!("canary weight set to {percent}% by hand"));
        next.canary_weight_percent = percent;
        next.phase = Phase::Manual;
        next
    }

    pub fn promoted(&self, replica: &str, why: String) -> Self {
        let mut next = self.changed(replica, why);
        next.phase = Phase::Promoted;
        next.canary_weight_percent = 100.0;
        next
    }

    pub fn aborted(&self, replica: &str, why: String) -> Self {
        let mut next = self.changed(replica, why);
        next.phase = Phase::Aborted;
        next.canary_weight_percent = 0.0;
        next
    }

    /// Hands the rollout from the file to the API (its file entry is gone).
    pub fn released_by_file(&self, replica: &str) -> Self {
        let mut next = if self.phase.is_active() {
            self.aborted(replica, "aborted: removed from the rollout file".into())
        } else {
            self.changed(replica, "removed from the rollout file".into())
        };
        next.source = Source::Api;
        next
    }

    /// The analysis position this state is at.
    pub fn progress(&self) -> Progress {
        Progress { step: self.step, failures: self.failures }
    }

    /// The state after an analysis decision (`progress` is where the decision left the
    /// plan); `None` when the decision changes nothing (hold).
    pub fn decided(&self, decision: &Decision, progress: Progress, figures: &str, replica: &str) -> Option<Self> {
        let mut next = match decision {
            Decision::Hold(_) => return None,
            Decision::Advance(weight) => {
                let mut next = self.changed(replica, format!("advanced to {}%: {figures}", weight.percent()));
                next.canary_weight_percent = weight.percent();
                next
            }
            Decision::Promote => self.promoted(replica, format!("promoted: {figures}")),
            Decision::Retry { failures, .. } => self.changed(replica, format!("failed check {failures}: {figures}")),
            Decision::RollBack { .. } => {
                let mut next = self.changed(replica, format!("rolled back: {figures}"));
                next.phase = Phase::RolledBack;
                next.canary_weight_percent = 0.0;
                next
            }
        };
        next.step = progress.step;
        next.failures = progress.failures;
        Some(next)
    }

    /// How unpinned requests are split now.
    pub fn split(&self) -> Split {
        let canary_weight = match self.phase {
            Phase::Promoted => Weight::FULL,
            Phase::RolledBack | Phase::Aborted => Weight::ZERO,
            Phase::Progressing | Phase::Manual => {
                Weight::from_percent(self.canary_weight_percent).unwrap_or(Weight::ZERO)
            }
        };
        Split { stable: self.spec.stable, canary: self.spec.canary, canary_weight }
    }

    /// The share of stable-answered requests the canary shadows (none once finished).
    pub fn shadow(&self) -> Weight {
        if self.phase.is_active() {
            Weight::from_percent(self.spec.shadow_percent).unwrap_or(Weight::ZERO)
        } else {
            Weight::ZERO
        }
    }
}

#[cfg(test)]
mod tests {
    use canary::analysis::Breach;

    use super::*;

    fn spec(analysis: Option<AnalysisPlan>) -> RolloutSpec {
        RolloutSpec {
            model: "m".into(),
            stable: 1,
            canary: 2,
            canary_weight_percent: 0.0,
            shadow_percent: 0.0,
            analysis,
        }
    }

    #[test]
    fn a_rollout_with_a_plan_starts_at_its_first_step_and_walks_them() {
        let start = RolloutState::start(spec(Some(AnalysisPlan::default())), Source::Api, None, "r");
        assert_eq!(
            (start.phase, start.canary_weight_percent, start.step, start.revision),
            (Phase::Progressing, 5.0, 0, 1)
        );
        let plan = start.spec.analysis.clone().unwrap();
        let mut progress = start.progress();
        let decision = progress.next(&plan.steps(), &canary::analysis::Verdict::Pass);
        let next = start.decided(&decision, progress, "figures", "r").unwrap();
        assert_eq!((next.canary_weight_percent, next.step, next.revision), (25.0, 1, 2));
        assert!(next.last_decision.starts_with("advanced to 25%"), "{}", next.last_decision);
        let back = next
            .decided(
                &Decision::RollBack { breaches: vec![Breach::AnomalyRate { stable: 0.1, canary: 1.0 }] },
                progress,
                "f",
                "r",
            )
            .unwrap();
        assert_eq!((back.phase, back.split().canary_weight), (Phase::RolledBack, Weight::ZERO));
    }

    #[test]
    fn a_later_start_continues_the_revisions() {
        let first = RolloutState::start(spec(None), Source::Api, None, "r").aborted("r", "stop".into());
        let second = RolloutState::start(spec(None), Source::Api, Some(&first), "r");
        assert_eq!((first.revision, second.revision, second.phase), (2, 3, Phase::Manual));
    }

    #[test]
    fn specs_are_checked_naming_the_field() {
        let mut bad = spec(None);
        bad.canary_weight_percent = 120.0;
        assert!(bad.validate().unwrap_err().starts_with("canary_weight_percent"));
        let mut steps = spec(Some(AnalysisPlan { step_weights_percent: vec![10.0, 5.0], ..Default::default() }));
        assert!(steps.validate().unwrap_err().contains("step_weights_percent[1]"));
        steps.analysis = Some(AnalysisPlan { step_weights_percent: vec![100.0], ..Default::default() });
        assert!(steps.validate().unwrap_err().contains("step_weights_percent[0]"));
        let same = RolloutSpec { canary: 1, ..spec(None) };
        assert!(same.validate().unwrap_err().contains("both version 1"));
    }

    #[test]
    fn finished_rollouts_send_everything_one_way() {
        let start = RolloutState::start(spec(None), Source::Api, None, "r");
        assert_eq!(start.promoted("r", "ok".into()).split().canary_weight, Weight::FULL);
        assert_eq!(start.aborted("r", "no".into()).split().canary_weight, Weight::ZERO);
        assert_eq!(start.aborted("r", "no".into()).shadow(), Weight::ZERO);
    }
}
