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
//! A window keeps at most [`MAX_SAMPLES`] latencies and scores, so memory stays bounded
//! however long an interval is. Past that it keeps a uniform sample of the whole interval
//! (reservoir sampling), not its first rows: a canary that degrades late in an interval,
//! or a burst of traffic at its end, counts as much as its beginning. The counts (requests,
//! errors) are always of everything; `anomalies` is of the kept scores, so the anomaly
//! rate is the sample's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use canary::analysis::WindowStats;
use rand::RngExt as _;

pub const MAX_SAMPLES: usize = 50_000;

/// Where the `seen`-th item (0-based) of a stream goes in a reservoir of [`MAX_SAMPLES`]:
/// appended while there is room, then in place of a uniformly chosen kept item with
/// probability MAX_SAMPLES / (seen + 1), else nowhere (Vitter's algorithm R).
enum Slot {
    Append,
    Replace(usize),
    Skip,
}

fn slot(seen: u64) -> Slot {
    if seen < MAX_SAMPLES as u64 {
        return Slot::Append;
    }
    match rand::rng().random_range(0..=seen) {
        j if j < MAX_SAMPLES as u64 => Slot::Replace(j as usize),
        _ => Slot::Skip,
    }
}

/// A window being filled: its stats, how many latencies and score rows it has seen, and
/// whether each kept score was an anomaly (a replaced score takes its flag with it).
#[derive(Debug, Default)]
struct Filling {
    stats: WindowStats,
    latencies_seen: u64,
    rows_seen: u64,
    flags: Vec<bool>,
}

impl Filling {
    fn put_score(&mut self, at: &Slot, score: f32, anomaly: bool) {
        match *at {
            Slot::Append => {
                self.stats.scores.push(f64::from(score));
                self.flags.push(anomaly);
                self.stats.anomalies += u64::from(anomaly);
            }
            Slot::Replace(index) => {
                self.stats.scores[index] = f64::from(score);
                self.stats.anomalies -= u64::from(std::mem::replace(&mut self.flags[index], anomaly));
                self.stats.anomalies += u64::from(anomaly);
            }
            Slot::Skip => {}
        }
    }

    fn add_latency(&mut self, latency_ms: f64) {
        match slot(self.latencies_seen) {
            Slot::Append => self.stats.latencies_ms.push(latency_ms),
            Slot::Replace(index) => self.stats.latencies_ms[index] = latency_ms,
            Slot::Skip => {}
        }
        self.latencies_seen += 1;
    }

    fn add_scores(&mut self, scores: &[f32], thresholds: Option<&[f32]>) {
        for (row, &score) in scores.iter().enumerate() {
            let at = slot(self.rows_seen);
            self.put_score(&at, score, is_anomaly(score, thresholds, row));
            self.rows_seen += 1;
        }
    }
}

fn is_anomaly(score: f32, thresholds: Option<&[f32]>, row: usize) -> bool {
    thresholds.and_then(|t| t.get(row).copied()).is_some_and(|t| score > t)
}

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

/// Both sides of the paired window, sampled together so row i of one is row i of the
/// other.
#[derive(Debug, Default)]
struct FillingPaired {
    stable: Filling,
    canary: Filling,
}

#[derive(Debug, Clone, Default)]
pub struct Windows {
    windows: Arc<Mutex<HashMap<(String, i64), Filling>>>,
    paired: Arc<Mutex<HashMap<String, FillingPaired>>>,
}

impl Windows {
    pub fn record(&self, model: &str, version: i64, outcome: Outcome<'_>) {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let window = windows.entry((model.to_owned(), version)).or_default();
        window.stats.requests += 1;
        window.stats.errors += u64::from(outcome.error);
        window.add_latency(outcome.latency_ms);
        window.add_scores(outcome.scores, outcome.thresholds);
    }

    /// Records a shadow run's rows beside stable's answer to the same request.
    pub fn record_paired(&self, model: &str, stable: (&[f32], &[f32]), canary: (&[f32], &[f32])) {
        if stable.0.len() != canary.0.len() {
            return;
        }
        let mut paired = self.paired.lock().unwrap_or_else(|e| e.into_inner());
        let window = paired.entry(model.to_owned()).or_default();
        for row in 0..stable.0.len() {
            let at = slot(window.stable.rows_seen);
            window.stable.put_score(&at, stable.0[row], is_anomaly(stable.0[row], Some(stable.1), row));
            window.canary.put_score(&at, canary.0[row], is_anomaly(canary.0[row], Some(canary.1), row));
            window.stable.rows_seen += 1;
            window.canary.rows_seen += 1;
        }
    }

    /// The paired window since the last take, and a fresh one from now.
    pub fn take_paired(&self, model: &str) -> Paired {
        let taken = self.paired.lock().unwrap_or_else(|e| e.into_inner()).remove(model).unwrap_or_default();
        Paired { stable: taken.stable.stats, canary: taken.canary.stats }
    }

    /// The window of `version` since the last take, and a fresh one from now.
    pub fn take(&self, model: &str, version: i64) -> WindowStats {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        windows.remove(&(model.to_owned(), version)).unwrap_or_default().stats
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
    fn past_the_cap_a_window_keeps_a_uniform_sample_of_the_whole_interval() {
        let windows = Windows::default();
        // 150k rows: the first third healthy (score 0), the rest anomalous (score 2).
        let total = 3 * MAX_SAMPLES;
        for i in 0..total {
            let score = if i < MAX_SAMPLES { 0.0 } else { 2.0 };
            let latency_ms = if i < MAX_SAMPLES { 1.0 } else { 9.0 };
            windows.record("m", 3, Outcome { error: false, latency_ms, scores: &[score], thresholds: Some(&[1.0]) });
        }
        let window = windows.take("m", 3);
        assert_eq!(window.requests, total as u64, "counts are of everything");
        assert_eq!((window.scores.len(), window.latencies_ms.len()), (MAX_SAMPLES, MAX_SAMPLES));
        let flagged = window.scores.iter().filter(|&&s| s > 1.0).count() as u64;
        assert_eq!(window.anomalies, flagged, "anomalies are the kept scores'");
        // Keeping the first rows would give 0 here; the interval's share is 2/3 (the
        // sample's standard deviation is 0.002).
        let rate = window.anomaly_rate().unwrap();
        assert!((rate - 2.0 / 3.0).abs() < 0.02, "anomaly rate {rate}");
        let slow = window.latencies_ms.iter().filter(|&&l| l > 5.0).count() as f64 / MAX_SAMPLES as f64;
        assert!((slow - 2.0 / 3.0).abs() < 0.02, "share of slow latencies {slow}");
    }

    #[test]
    fn a_full_paired_window_samples_rows_together() {
        let windows = Windows::default();
        for i in 0..2 * MAX_SAMPLES {
            let x = i as f32;
            windows.record_paired("m", (&[x, x + 0.5], &[1e9, 1e9]), (&[-x, -x - 0.5], &[1e9, 1e9]));
        }
        let paired = windows.take_paired("m");
        assert_eq!(paired.stable.scores.len(), MAX_SAMPLES);
        assert!(
            paired.stable.scores.iter().zip(&paired.canary.scores).all(|(s, c)| *s == -*c),
            "row i is the same row on both sides"
        );
        let late =
            paired.stable.scores.iter().filter(|&&s| s >= MAX_SAMPLES as f64).count() as f64 / MAX_SAMPLES as f64;
        // 200k rows, half of them from the second half of the interval.
        assert!((late - 0.5).abs() < 0.02, "rows from the whole interval: {late} from its second half");
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
