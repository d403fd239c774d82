//! Canary rollouts in the model server: which version answers a request that does not pin
//! one, and how a canary's share grows, or ends, on its own.
//!
//! A rollout ([`state`]) names a stable and a canary version of a model and the canary's
//! weight. Requests that pin a version or label get exactly that; the rest are split by
//! [`canary::split`], sticky by the `vigil-routing-key` gRPC metadata or HTTP header (the
//! stream processor sends the device id), at random without it. If the side a request
//! falls on is not loaded, the other side answers, so a rollout never fails a request the
//! model could have answered. A share of stable's requests can also be scored by the
//! canary in shadow ([`crate::inference`]), its answer discarded and compared. A finished
//! rollout keeps routing (promoted: everything unpinned to the canary; rolled back or
//! aborted: to stable) until the model's next rollout, so a newer version that appears
//! meanwhile gets no traffic without one.
//!
//! Rollouts come from the rollout file (`--rollout_config_file`, TOML, re-read while
//! serving) and the gRPC `RolloutService` ([`crate::grpc::rollout`]); with an analysis
//! plan, [`controller`] judges the canary against stable every interval from what both
//! produced ([`windows`]) and steps, holds, promotes or rolls back. Every change is a new
//! revision of the model's [`state::RolloutState`], kept by the [`log`]: in memory for a
//! single replica, or a compacted Kafka topic every replica reads, so all replicas apply
//! the same changes in the same order. Decisions are logged with their figures and
//! published to a Kafka rollout events topic.
//!
//! ```toml
//! [[rollouts]]
//! model = "car-anomaly"
//! stable = 1
//! canary = 2
//! canary_weight_percent = 5   # with [rollouts.analysis], 0 starts at the first step
//! shadow_percent = 10         # optional
//! [rollouts.analysis]         # optional; every field has a default
//! step_weights_percent = [5, 25, 50]
//! interval_seconds = 60
//! failure_limit = 2
//! ```

pub mod controller;
pub mod log;
pub mod state;
pub mod windows;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use canary::split::{Arm, Split};
use serde::Deserialize;
use tokio::sync::watch;

pub use state::{AnalysisPlan, Phase, RolloutSpec, RolloutState, Source};

/// The rollout file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutFile {
    #[serde(default)]
    rollouts: Vec<RolloutSpec>,
}

/// Reads and checks a rollout file; errors name the file and the rollout.
pub fn read_rollout_file(path: &Path) -> Result<Vec<RolloutSpec>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_rollouts(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn parse_rollouts(text: &str) -> Result<Vec<RolloutSpec>, String> {
    let file: RolloutFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut models = HashSet::new();
    for spec in &file.rollouts {
        spec.validate().map_err(|e| format!("rollout of model {:?}: {e}", spec.model))?;
        if !models.insert(spec.model.as_str()) {
            return Err(format!("model {:?} has two rollouts", spec.model));
        }
    }
    Ok(file.rollouts)
}

/// Every model's rollout as this replica last applied it, read lock-free per request.
#[derive(Debug, Clone)]
pub struct Rollouts {
    states: Arc<ArcSwap<BTreeMap<String, Arc<RolloutState>>>>,
    /// Serialises [`Rollouts::apply`]; readers never take it.
    writer: Arc<Mutex<()>>,
    /// Counts applied changes, for waiters.
    applied: Arc<watch::Sender<u64>>,
}

impl Default for Rollouts {
    fn default() -> Self {
        Self { states: Arc::default(), writer: Arc::default(), applied: Arc::new(watch::channel(0).0) }
    }
}

impl Rollouts {
    /// Applies `state` if it is newer than the model's current revision; returns whether
    /// it was. Every replica applies the same sequence with this rule, so a stale change
    /// (two replicas changing the same revision) loses everywhere.
    pub fn apply(&self, state: RolloutState) -> bool {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.states.load();
        if current.get(&state.spec.model).is_some_and(|c| c.revision >= state.revision) {
            return false;
        }
        let mut next = BTreeMap::clone(&current);
        next.insert(state.spec.model.clone(), Arc::new(state));
        self.states.store(Arc::new(next));
        self.applied.send_modify(|n| *n += 1);
        true
    }

    pub fn get(&self, model: &str) -> Option<Arc<RolloutState>> {
        self.states.load().get(model).cloned()
    }

    pub fn list(&self) -> Vec<Arc<RolloutState>> {
        self.states.load().values().cloned().collect()
    }

    /// Waits until the model's rollout is at `revision` or later; `None` on timeout.
    pub async fn wait_for(&self, model: &str, revision: u64, timeout: Duration) -> Option<Arc<RolloutState>> {
        let mut applied = self.applied.subscribe();
        let reached = || self.get(model).filter(|s| s.revision >= revision);
        tokio::time::timeout(timeout, async {
            loop {
                if let Some(state) = reached() {
                    return state;
                }
                if applied.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await
        .ok()
    }

    /// The split and side answering an unpinned request for `model`, if it has a rollout.
    pub fn route(&self, model: &str, routing_key: Option<&[u8]>) -> Option<(Split, Arm)> {
        let split = self.get(model)?.split();
        Some((split, split.arm(model, routing_key, &mut rand::rng())))
    }

    /// The canary version to score a stable-answered request in shadow, if it is picked.
    pub fn shadow(&self, model: &str, routing_key: Option<&[u8]>) -> Option<i64> {
        let state = self.get(model)?;
        let share = state.shadow();
        (share.basis_points() > 0 && canary::split::shadowed(model, routing_key, share, &mut rand::rng()))
            .then_some(state.spec.canary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rollout_file_reads_into_specs() {
        let specs = parse_rollouts(
            "[[rollouts]]\nmodel = \"car-anomaly\"\nstable = 1\ncanary = 2\ncanary_weight_percent = 12.5\n\
             [rollouts.analysis]\ninterval_seconds = 5\n",
        )
        .unwrap();
        assert_eq!(specs.len(), 1);
        assert_eq!((specs[0].stable, specs[0].canary, specs[0].canary_weight_percent), (1, 2, 12.5));
        let plan = specs[0].analysis.as_ref().unwrap();
        assert_eq!((plan.interval_seconds, plan.step_weights_percent.as_slice()), (5, &[5.0, 25.0, 50.0][..]));
        assert!(parse_rollouts("").unwrap().is_empty());
    }

    #[test]
    fn bad_rollouts_are_refused_naming_what_is_wrong() {
        let rollout = |body: &str| parse_rollouts(&format!("[[rollouts]]\n{body}")).unwrap_err();
        let weight = rollout("model = \"m\"\nstable = 1\ncanary = 2\ncanary_weight_percent = 150");
        assert!(weight.contains("model \"m\": canary_weight_percent") && weight.contains("150"), "{weight}");
        let same = rollout("model = \"m\"\nstable = 2\ncanary = 2\ncanary_weight_percent = 5");
        assert!(same.contains("both version 2"), "{same}");
        let unknown = rollout("model = \"m\"\nstable = 1\ncanary = 2\ncanary_weight = 5");
        assert!(unknown.contains("canary_weight"), "{unknown}");
        let plan = rollout("model = \"m\"\nstable = 1\ncanary = 2\n[rollouts.analysis]\nfailure_limit = 0");
        assert!(plan.contains("analysis.failure_limit"), "{plan}");
        let twice = parse_rollouts(
            "[[rollouts]]\nmodel = \"m\"\nstable = 1\ncanary = 2\ncanary_weight_percent = 5\n\
             [[rollouts]]\nmodel = \"m\"\nstable = 1\ncanary = 3\ncanary_weight_percent = 5\n",
        )
        .unwrap_err();
        assert!(twice.contains("two rollouts"), "{twice}");
    }

    #[test]
    fn a_file_error_names_the_file() {
        let error = read_rollout_file(Path::new("/nonexistent/rollouts.toml")).unwrap_err();
        assert!(error.starts_with("/nonexistent/rollouts.toml: "), "{error}");
    }

    #[test]
    fn only_newer_revisions_apply() {
        let rollouts = Rollouts::default();
        let spec = RolloutSpec {
            model: "m".into(),
            stable: 1,
            canary: 2,
            canary_weight_percent: 10.0,
            shadow_percent: 0.0,
            analysis: None,
        };
        let first = RolloutState::start(spec, Source::Api, None, "a");
        assert!(rollouts.apply(first.clone()));
        let (by_a, by_b) = (first.with_weight(20.0, "a"), first.with_weight(30.0, "b"));
        assert!(rollouts.apply(by_a));
        assert!(!rollouts.apply(by_b), "the second change of revision 1 loses");
        assert_eq!(rollouts.get("m").unwrap().canary_weight_percent, 20.0);
    }
}
