//! Canary rollouts in the model server: which version answers a request that does not pin
//! one.
//!
//! Rollouts are declared in a TOML file (`--rollout_config_file`) and re-read every
//! `--rollout_config_file_poll_wait_seconds`, so every replica mounting the same file (a
//! ConfigMap) converges on the same rollouts without talking to the others. The split is
//! [`canary::split`]: sticky by the `vigil-routing-key` gRPC metadata or HTTP header (the
//! stream processor sends the device id), at random without it. A request that names a
//! version or a label is never split. If the version a request is routed to is not loaded
//! (a canary still loading, or left out of the model's version policy), the other side
//! answers, so a rollout never fails a request the model could have answered.
//!
//! ```toml
//! [[rollouts]]
//! model = "car-anomaly"
//! stable = 1
//! canary = 2
//! canary_weight_percent = 5
//! ```
//!
//! Each version's outputs are counted apart (`metrics.rs`: scores and anomalies per
//! version), which is what a canary will be judged by. Not here yet (issue 8): the
//! `RolloutService`, the automated analysis loop (its policy is `canary::analysis`),
//! shadow traffic and rollout events on Kafka.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use canary::split::{Arm, Split, Weight};
use serde::Deserialize;

/// The rollout file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutFile {
    #[serde(default)]
    rollouts: Vec<RolloutEntry>,
}

/// One model's rollout.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutEntry {
    /// The served model (its name in the model config).
    model: String,
    /// The version most traffic goes to.
    stable: i64,
    /// The version on trial.
    canary: i64,
    /// The canary's share of unpinned requests, 0-100.
    canary_weight_percent: f64,
}

/// Reads and checks a rollout file; errors name the file and the rollout.
pub fn read_rollout_file(path: &Path) -> Result<HashMap<String, Split>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_rollouts(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn parse_rollouts(text: &str) -> Result<HashMap<String, Split>, String> {
    let file: RolloutFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut splits = HashMap::new();
    for entry in file.rollouts {
        let model = &entry.model;
        if model.is_empty() {
            return Err("a rollout has an empty model name".into());
        }
        if entry.stable == entry.canary {
            return Err(format!("rollout of model {model:?}: stable and canary are both version {}", entry.stable));
        }
        let canary_weight = Weight::from_percent(entry.canary_weight_percent)
            .map_err(|e| format!("rollout of model {model:?}: canary_weight_percent: {e}"))?;
        let split = Split { stable: entry.stable, canary: entry.canary, canary_weight };
        if splits.insert(entry.model.clone(), split).is_some() {
            return Err(format!("model {model:?} has two rollouts"));
        }
    }
    Ok(splits)
}

/// The rollouts in force, read lock-free on every request.
#[derive(Debug, Clone, Default)]
pub struct Rollouts {
    splits: Arc<ArcSwap<HashMap<String, Split>>>,
}

impl Rollouts {
    pub fn new(splits: HashMap<String, Split>) -> Self {
        Self { splits: Arc::new(ArcSwap::from_pointee(splits)) }
    }

    /// Replaces the rollouts; returns whether anything changed.
    pub fn set(&self, splits: HashMap<String, Split>) -> bool {
        if **self.splits.load() == splits {
            return false;
        }
        self.splits.store(Arc::new(splits));
        true
    }

    pub fn get(&self, model: &str) -> Option<Split> {
        self.splits.load().get(model).copied()
    }

    /// The split and side answering an unpinned request for `model`, if it has a rollout.
    pub fn route(&self, model: &str, routing_key: Option<&[u8]>) -> Option<(Split, Arm)> {
        let split = self.get(model)?;
        Some((split, split.arm(model, routing_key, &mut rand::rng())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rollout_file_reads_into_splits() {
        let splits = parse_rollouts(
            "[[rollouts]]\nmodel = \"car-anomaly\"\nstable = 1\ncanary = 2\ncanary_weight_percent = 12.5\n",
        )
        .unwrap();
        assert_eq!(
            splits["car-anomaly"],
            Split { stable: 1, canary: 2, canary_weight: Weight::from_percent(12.5).unwrap() }
        );
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
}
