//! Judging a canary by what it produces, against the stable version over the same window,
//! and stepping a rollout forward, holding it, or rolling it back (in the manner of
//! Flagger and Argo Rollouts: an interval, a list of step weights, a failure limit).
//!
//! Traffic splitters judge a canary by errors and latency only. An anomaly detector can
//! fail while answering every request quickly: a model that flags everything floods the
//! alert topic, one that flags nothing misses defects. So [`judge`] also compares the
//! outputs: the anomaly rate (absolute difference) and the whole score distribution, with
//! a Mann-Whitney U test. A large window makes the test significant for differences too
//! small to matter, so a score shift fails only when it is both significant and larger
//! than a bound on its size (the common-language effect size: how far P(canary score >
//! stable score) is from one half). Too few samples on either side is inconclusive, never
//! a pass.

use statrs::distribution::{ContinuousCDF as _, Normal};

use crate::split::Weight;

/// What one version did over an analysis window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowStats {
    pub requests: u64,
    /// Requests that failed on the server's side (not the caller's invalid arguments).
    pub errors: u64,
    pub latencies_ms: Vec<f64>,
    /// Anomaly scores of the rows answered, and how many of them were flagged.
    pub scores: Vec<f64>,
    pub anomalies: u64,
}

impl WindowStats {
    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }

    pub fn anomaly_rate(&self) -> Option<f64> {
        (!self.scores.is_empty()).then(|| self.anomalies as f64 / self.scores.len() as f64)
    }

    pub fn latency_p99_ms(&self) -> Option<f64> {
        percentile(&self.latencies_ms, 0.99)
    }
}

/// How far a canary may stray from the stable version and still pass a check.
#[derive(Debug, Clone, PartialEq)]
pub struct Bounds {
    /// Requests and scored rows each side needs before a window says anything.
    pub min_samples: usize,
    /// Canary error rate minus stable error rate, at most (0.01: one point).
    pub max_error_rate_increase: f64,
    /// Canary p99 latency over stable p99 latency, at most.
    pub max_latency_p99_ratio: f64,
    /// |canary anomaly rate - stable anomaly rate|, at most.
    pub max_anomaly_rate_difference: f64,
    /// A score shift counts only when the Mann-Whitney p-value is below this ...
    pub score_significance: f64,
    /// ... and |P(canary score > stable score) - 1/2| is above this.
    pub max_score_shift: f64,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            min_samples: 200,
            max_error_rate_increase: 0.01,
            max_latency_p99_ratio: 1.5,
            max_anomaly_rate_difference: 0.05,
            score_significance: 0.001,
            // Just under Vargha and Delaney's "large" effect (A = 0.71). A retrained model
            // scores differently without flagging differently: the bundled v2 against v1
            // measures 0.10-0.15 on the same readings, with the same anomaly rate; a model
            // that flags everything measures 0.5.
            max_score_shift: 0.2,
        }
    }
}

/// The Mann-Whitney U test of canary scores against stable scores (two-sided, normal
/// approximation with tie and continuity corrections, as SciPy's `method="asymptotic"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MannWhitney {
    /// U of the canary sample.
    pub u: f64,
    pub p_value: f64,
    /// P(canary > stable) + P(tie) / 2 - 1/2: 0 when neither tends to score higher.
    pub shift: f64,
}

/// A bound a canary broke, with the figures that broke it.
#[derive(Debug, Clone, PartialEq)]
pub enum Breach {
    ErrorRate { stable: f64, canary: f64 },
    LatencyP99 { stable_ms: f64, canary_ms: f64 },
    AnomalyRate { stable: f64, canary: f64 },
    ScoreDistribution { shift: f64, p_value: f64 },
}

impl std::fmt::Display for Breach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Breach::ErrorRate { stable, canary } => write!(f, "error rate {canary:.4} vs stable {stable:.4}"),
            Breach::LatencyP99 { stable_ms, canary_ms } => {
                write!(f, "p99 latency {canary_ms:.1} ms vs stable {stable_ms:.1} ms")
            }
            Breach::AnomalyRate { stable, canary } => write!(f, "anomaly rate {canary:.4} vs stable {stable:.4}"),
            Breach::ScoreDistribution { shift, p_value } => {
                write!(f, "scores shifted by {shift:+.3} (Mann-Whitney p = {p_value:.2e})")
            }
        }
    }
}

/// What one check concluded.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Pass,
    Fail(Vec<Breach>),
    /// Not enough to go on (the reason says what is missing).
    Inconclusive(String),
}

/// A check's verdict and every figure it was based on, for the decision log.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    pub verdict: Verdict,
    pub stable_error_rate: Option<f64>,
    pub canary_error_rate: Option<f64>,
    pub stable_latency_p99_ms: Option<f64>,
    pub canary_latency_p99_ms: Option<f64>,
    pub stable_anomaly_rate: Option<f64>,
    pub canary_anomaly_rate: Option<f64>,
    pub scores: Option<MannWhitney>,
}

/// Compares the canary with the stable version over the same window.
pub fn judge(stable: &WindowStats, canary: &WindowStats, bounds: &Bounds) -> Judgement {
    let mut judgement = Judgement {
        verdict: Verdict::Pass,
        stable_error_rate: stable.error_rate(),
        canary_error_rate: canary.error_rate(),
        stable_latency_p99_ms: stable.latency_p99_ms(),
        canary_latency_p99_ms: canary.latency_p99_ms(),
        stable_anomaly_rate: stable.anomaly_rate(),
        canary_anomaly_rate: canary.anomaly_rate(),
        scores: None,
    };
    let min = bounds.min_samples;
    for (side, stats) in [("stable", stable), ("canary", canary)] {
        if (stats.requests as usize) < min || stats.scores.len() < min {
            judgement.verdict = Verdict::Inconclusive(format!(
                "{side}: {} requests and {} scores in the window, fewer than the {min} needed",
                stats.requests,
                stats.scores.len()
            ));
            return judgement;
        }
    }
    let mut breaches = Vec::new();
    if let (Some(s), Some(c)) = (judgement.stable_error_rate, judgement.canary_error_rate)
        && c - s > bounds.max_error_rate_increase
    {
        breaches.push(Breach::ErrorRate { stable: s, canary: c });
    }
    if let (Some(s), Some(c)) = (judgement.stable_latency_p99_ms, judgement.canary_latency_p99_ms)
        && c > s * bounds.max_latency_p99_ratio
    {
        breaches.push(Breach::LatencyP99 { stable_ms: s, canary_ms: c });
    }
    if let (Some(s), Some(c)) = (judgement.stable_anomaly_rate, judgement.canary_anomaly_rate)
        && (c - s).abs() > bounds.max_anomaly_rate_difference
    {
        breaches.push(Breach::AnomalyRate { stable: s, canary: c });
    }
    let test = mann_whitney(&canary.scores, &stable.scores);
    if let Some(test) = test
        && test.p_value < bounds.score_significance
        && test.shift.abs() > bounds.max_score_shift
    {
        breaches.push(Breach::ScoreDistribution { shift: test.shift, p_value: test.p_value });
    }
    judgement.scores = test;
    if !breaches.is_empty() {
        judgement.verdict = Verdict::Fail(breaches);
    }
    judgement
}

/// Mann-Whitney U of `a` against `b`; `None` if either is empty or every value ties.
pub fn mann_whitney(a: &[f64], b: &[f64]) -> Option<MannWhitney> {
    let (n1, n2) = (a.len() as f64, b.len() as f64);
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let mut all: Vec<(f64, bool)> = a.iter().map(|&x| (x, true)).chain(b.iter().map(|&x| (x, false))).collect();
    all.sort_by(|x, y| x.0.total_cmp(&y.0));
    // Average ranks over ties; the tie term for the variance.
    let (mut rank_sum_a, mut tie_term) = (0.0, 0.0);
    let mut start = 0;
    while start < all.len() {
        let mut end = start + 1;
        while end < all.len() && all[end].0 == all[start].0 {
            end += 1;
        }
        let ties = (end - start) as f64;
        let rank = (start + end + 1) as f64 / 2.0; // ranks start..end, 1-based, averaged
        rank_sum_a += rank * all[start..end].iter().filter(|(_, from_a)| *from_a).count() as f64;
        tie_term += ties * ties * ties - ties;
        start = end;
    }
    let n = n1 + n2;
    let u1 = rank_sum_a - n1 * (n1 + 1.0) / 2.0;
    let u = u1.max(n1 * n2 - u1);
    let variance = n1 * n2 / 12.0 * ((n + 1.0) - tie_term / (n * (n - 1.0)));
    if variance <= 0.0 {
        return None;
    }
    let z = (u - n1 * n2 / 2.0 - 0.5) / variance.sqrt();
    let normal = Normal::standard();
    let p_value = (2.0 * (1.0 - normal.cdf(z))).clamp(0.0, 1.0);
    Some(MannWhitney { u: u1, p_value, shift: u1 / (n1 * n2) - 0.5 })
}

/// The `p` quantile (0-1) by the nearest-rank method.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// A rollout's analysis plan: the canary weights to go through, the last being the most
/// the canary gets before promotion, and how many failed checks roll it back.
#[derive(Debug, Clone, PartialEq)]
pub struct Steps {
    pub weights: Vec<Weight>,
    pub failure_limit: u32,
}

/// What to do after a check.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Passed: give the canary this weight.
    Advance(Weight),
    /// Passed at the last step: the canary becomes stable.
    Promote,
    /// Inconclusive: stay at this weight and check again.
    Hold(String),
    /// Failed, but fewer times than the limit: stay and check again.
    Retry { failures: u32, breaches: Vec<Breach> },
    /// Failed `failure_limit` times: all traffic back to stable.
    RollBack { breaches: Vec<Breach> },
}

/// Where a rollout stands in its [`Steps`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Index into [`Steps::weights`] of the current weight.
    pub step: usize,
    /// Failed checks so far in this rollout (they do not reset on a pass, as in Flagger).
    pub failures: u32,
}

impl Progress {
    /// Applies one check's verdict.
    pub fn next(&mut self, steps: &Steps, verdict: &Verdict) -> Decision {
        match verdict {
            Verdict::Inconclusive(reason) => Decision::Hold(reason.clone()),
            Verdict::Fail(breaches) => {
                self.failures += 1;
                if self.failures >= steps.failure_limit {
                    Decision::RollBack { breaches: breaches.clone() }
                } else {
                    Decision::Retry { failures: self.failures, breaches: breaches.clone() }
                }
            }
            Verdict::Pass if self.step + 1 >= steps.weights.len() => Decision::Promote,
            Verdict::Pass => {
                self.step += 1;
                Decision::Advance(steps.weights[self.step])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng as _;
    use rand::rngs::StdRng;
    use rand_distr::{Distribution as _, Normal as Gaussian};

    use super::*;

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance * b.abs().max(1e-300)
    }

    #[test]
    fn mann_whitney_matches_scipy() {
        // scipy.stats.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic")
        // (SciPy 1.17.1), ties included.
        for (a, b, u, p) in SCIPY_GOLDEN {
            let test = mann_whitney(a, b).unwrap();
            assert!(close(test.u, *u, 1e-12), "U {} vs SciPy's {u}", test.u);
            assert!(close(test.p_value, *p, 1e-9), "p {} vs SciPy's {p}", test.p_value);
        }
    }

    const SCIPY_GOLDEN: &[(&[f64], &[f64], f64, f64)] = &[
        (&[0.1, 0.5, 0.5, 0.9, 1.3, 2.0], &[0.2, 0.5, 0.7, 0.7, 3.1], 15.0, 1.0),
        (&[1.0, 1.0, 1.0, 2.0], &[1.0, 2.0, 2.0, 2.0, 3.0, 3.0], 4.0, 0.08696432431499454),
        (
            &[
                0.6, 0.69, 0.52, 0.33, 0.46, 0.3, 0.62, 1.0, 0.45, 0.41, 0.75, 0.71, 0.63, 0.32, 0.59, 0.81, 0.2, 0.46,
                0.03, 0.21, 0.05, 0.53, 0.22, 0.68, 0.65, 0.54, -0.16, 0.44, 0.59, 0.63, 0.14, 0.46, 0.31, 0.36, 0.92,
                0.36, 0.59, 0.87, 0.42, 0.57,
            ],
            &[
                0.83, 0.82, 0.43, 0.82, 1.21, 0.34, 1.06, 0.84, 0.61, 1.4, 1.03, 0.44, 0.82, 0.97, 0.74, 1.0, 0.78,
                1.0, 1.23, 0.6, 0.86, 0.66, 0.84, 0.44, 0.63, 0.74, 1.07, 1.14, 0.4, 0.56,
            ],
            226.5,
            9.520780709347993e-06,
        ),
    ];

    fn window(rng: &mut StdRng, n: usize, mean: f64, threshold: f64, latency_ms: f64, errors: u64) -> WindowStats {
        let (score, jitter) = (Gaussian::new(mean, 0.3).unwrap(), Gaussian::new(0.0, 0.1).unwrap());
        let scores: Vec<f64> = (0..n).map(|_| f64::abs(score.sample(rng))).collect();
        let anomalies = scores.iter().filter(|&&s| s > threshold).count() as u64;
        let latencies_ms = (0..n).map(|_| latency_ms * (1.0 + f64::abs(jitter.sample(rng)))).collect();
        WindowStats { requests: n as u64, errors, latencies_ms, scores, anomalies }
    }

    /// One side's window: rows, mean score, threshold, latency (ms), errors.
    type Drawn = (usize, f64, f64, f64, u64);

    /// Stable's window, then the canary's, drawn from one generator seeded with `seed`, and
    /// judged by the default bounds.
    fn judge_drawn(seed: u64, stable: Drawn, canary: Drawn) -> Judgement {
        let mut rng = StdRng::seed_from_u64(seed);
        let stable = window(&mut rng, stable.0, stable.1, stable.2, stable.3, stable.4);
        let canary = window(&mut rng, canary.0, canary.1, canary.2, canary.3, canary.4);
        judge(&stable, &canary, &Bounds::default())
    }

    #[test]
    fn an_equivalent_canary_passes() {
        let judgement = judge_drawn(1, (5_000, 0.6, 1.2, 10.0, 5), (1_000, 0.6, 1.2, 10.5, 1));
        assert_eq!(judgement.verdict, Verdict::Pass, "{judgement:?}");
        assert!(judgement.scores.unwrap().shift.abs() < 0.05);
    }

    #[test]
    fn a_canary_that_flags_everything_fails_on_anomaly_rate_and_scores() {
        let judgement = judge_drawn(2, (5_000, 0.6, 1.2, 10.0, 0), (1_000, 3.0, 1.2, 10.0, 0));
        let Verdict::Fail(breaches) = judgement.verdict else { panic!("a flag-everything canary passed") };
        assert!(matches!(breaches[0], Breach::AnomalyRate { canary, .. } if canary > 0.99), "{breaches:?}");
        assert!(matches!(breaches[1], Breach::ScoreDistribution { shift, .. } if shift > 0.45), "{breaches:?}");
    }

    #[test]
    fn errors_and_latency_beyond_bounds_fail() {
        let judgement = judge_drawn(3, (2_000, 0.6, 1.2, 10.0, 2), (2_000, 0.6, 1.2, 20.0, 100));
        let Verdict::Fail(breaches) = judgement.verdict else { panic!() };
        assert!(matches!(breaches[0], Breach::ErrorRate { canary, .. } if (canary - 0.05).abs() < 1e-12));
        assert!(matches!(breaches[1], Breach::LatencyP99 { .. }), "{breaches:?}");
        assert_eq!(breaches.len(), 2, "{breaches:?}");
    }

    #[test]
    fn a_small_but_significant_score_shift_passes() {
        // 50,000 each: a 0.02 shift in mean is highly significant and irrelevant.
        let judgement = judge_drawn(4, (50_000, 0.60, 5.0, 10.0, 0), (50_000, 0.62, 5.0, 10.0, 0));
        let test = judgement.scores.unwrap();
        assert!(test.p_value < 1e-3, "the shift is significant: {test:?}");
        assert_eq!(judgement.verdict, Verdict::Pass, "but small: {test:?}");
    }

    #[test]
    fn too_few_samples_is_inconclusive_whatever_the_figures() {
        let judgement = judge_drawn(5, (5_000, 0.6, 1.2, 10.0, 0), (50, 3.0, 1.2, 100.0, 50));
        let Verdict::Inconclusive(reason) = judgement.verdict else { panic!() };
        assert!(reason.starts_with("canary: 50 requests"), "{reason}");
    }

    fn steps() -> Steps {
        let weights = [5.0, 25.0, 50.0, 100.0].map(|p| Weight::from_percent(p).unwrap()).to_vec();
        Steps { weights, failure_limit: 2 }
    }

    #[test]
    fn passing_checks_step_through_the_weights_then_promote() {
        let (steps, mut progress) = (steps(), Progress::default());
        let decisions: Vec<Decision> = (0..4).map(|_| progress.next(&steps, &Verdict::Pass)).collect();
        let w = |p| Weight::from_percent(p).unwrap();
        assert_eq!(
            decisions,
            [Decision::Advance(w(25.0)), Decision::Advance(w(50.0)), Decision::Advance(w(100.0)), Decision::Promote]
        );
    }

    #[test]
    fn failures_roll_back_at_the_limit_and_inconclusive_checks_hold() {
        let (steps, mut progress) = (steps(), Progress::default());
        let breach = vec![Breach::AnomalyRate { stable: 0.01, canary: 0.9 }];
        assert!(matches!(progress.next(&steps, &Verdict::Inconclusive("few".into())), Decision::Hold(_)));
        assert!(matches!(progress.next(&steps, &Verdict::Fail(breach.clone())), Decision::Retry { failures: 1, .. }));
        assert!(matches!(progress.next(&steps, &Verdict::Pass), Decision::Advance(_)));
        assert_eq!(progress.next(&steps, &Verdict::Fail(breach.clone())), Decision::RollBack { breaches: breach });
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.99), Some(99.0));
        assert_eq!(percentile(&values, 0.5), Some(50.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
