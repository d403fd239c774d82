//! What each version under an active rollout did since the last check: requests, server
//! errors, latencies, and the anomaly scores of the rows it answered (shadow runs
//! included, since they are the canary's real answers to real traffic). The analysis
//! takes a model's two windows at each check, which starts new ones.
//!
//! Shadow runs also fill a paired window: stable's and the canary's scores of the same
//! requests. A sticky split gives each side different devices, and with a few hundred
//! devices a handful of faulty cars more on one side shifts its scores and anomaly rate
//! as much as a worse model would; on the same readings only the model differs. So when
//! the paired window is big enough, the analysis judges the scores by it.
//!
//! A window keeps at most [`MAX_SAMPLES`] latencies and scores (the first ones; the counts
//! go on), so memory stays bounded however long an interval is.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use canary::analysis::WindowStats;

pub const MAX_SAMPLES: usize = 50_000;

/// One request (or shadow run) as the analysis sees it.
#[derive(Debug)]
pub struct Outcome<'a> {
    /// Failed on the server's side (the caller's invalid arguments are not counted).
    pub error: bool,
    pub latency_ms: f64,
    pub scores: &'a [f32],
    /// The answering version's threshold per row (a row over it is an anomaly).
    pub thresholds: Option<&'a [f32]>,
}

/// Both versions' answers to the same rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Paired {
    pub stable: WindowStats,
    pub canary: WindowStats,
}

#[derive(Debug, Clone, Default)]
pub struct Windows {
    windows: Arc<Mutex<HashMap<(String, i64), WindowStats>>>,
    paired: Arc<Mutex<HashMap<String, Paired>>>,
}

fn add_scores(window: &mut WindowStats, scores: &[f32], thresholds: Option<&[f32]>) {
    for (row, &score) in scores.iter().enumerate() {
        if window.scores.len() >= MAX_SAMPLES {
            break;
        }
        window.scores.push(f64::from(score));
        let threshold = thresholds.and_then(|t| t.get(row).copied());
        window.anomalies += u64::from(threshold.is_some_and(|t| score > t));
    }
}

impl Windows {
    pub fn record(&self, model: &str, version: i64, outcome: Outcome<'_>) {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let window = windows.entry((model.to_owned(), version)).or_default();
        window.requests += 1;
        window.errors += u64::from(outcome.error);
        if window.latencies_ms.len() < MAX_SAMPLES {
            window.latencies_ms.push(outcome.latency_ms);
        }
        add_scores(window, outcome.scores, outcome.thresholds);
    }

    /// Records a shadow run's rows beside stable's answer to the same request.
    pub fn record_paired(&self, model: &str, stable: (&[f32], &[f32]), canary: (&[f32], &[f32])) {
        if stable.0.len() != canary.0.len() {
            return;
        }
        let mut paired = self.paired.lock().unwrap_or_else(|e| e.into_inner());
        let window = paired.entry(model.to_owned()).or_default();
        if window.stable.scores.len() + stable.0.len() > MAX_SAMPLES {
            return;
        }
        add_scores(&mut window.stable, stable.0, Some(stable.1));
        add_scores(&mut window.canary, canary.0, Some(canary.1));
    }

    /// The paired window since the last take, and a fresh one from now.
    pub fn take_paired(&self, model: &str) -> Paired {
        self.paired.lock().unwrap_or_else(|e| e.into_inner()).remove(model).unwrap_or_default()
    }

    /// The window of `version` since the last take, and a fresh one from now.
    pub fn take(&self, model: &str, version: i64) -> WindowStats {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        windows.remove(&(model.to_owned(), version)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_counts_requests_errors_and_anomalies_until_taken() {
        let windows = Windows::default();
        let ok = Outcome { error: false, latency_ms: 2.0, scores: &[0.5, 3.0], thresholds: Some(&[1.0, 1.0]) };
        windows.record("m", 2, ok);
        windows.record("m", 2, Outcome { error: true, latency_ms: 9.0, scores: &[], thresholds: None });
        let window = windows.take("m", 2);
        assert_eq!((window.requests, window.errors, window.anomalies), (2, 1, 1));
        assert_eq!((window.scores, window.latencies_ms), (vec![0.5, 3.0], vec![2.0, 9.0]));
        assert_eq!(windows.take("m", 2), WindowStats::default(), "taking starts a new window");
    }

    #[test]
    fn paired_rows_are_kept_side_by_side() {
        let windows = Windows::default();
        windows.record_paired("m", (&[0.5, 0.75], &[1.0, 1.0]), (&[2.0, 0.25], &[1.0, 1.0]));
        windows.record_paired("m", (&[0.5], &[1.0]), (&[2.0, 3.0], &[1.0, 1.0]));
        let paired = windows.take_paired("m");
        assert_eq!((paired.stable.scores, paired.stable.anomalies), (vec![0.5, 0.75], 0));
        assert_eq!((paired.canary.scores, paired.canary.anomalies), (vec![2.0, 0.25], 1));
        assert_eq!(windows.take_paired("m"), Paired::default());
    }
}
