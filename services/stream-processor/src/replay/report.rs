//! The replay's figures and verdict: the candidate's score for each reading against the
//! live score of the same reading (joined by topic, partition and offset).
//!
//! The pairs are compared three ways: anomaly rates (both over the compared readings),
//! agreement (the share of readings both flag or both pass), and the score distributions
//! (Mann-Whitney U, as a rollout's analysis does: a shift fails only when it is both
//! significant and larger than a bound on its size). Too few compared readings is never a
//! pass: the verdict says so instead.

use std::collections::BTreeSet;

use proto::vigil::replay::v1::ReplayReport;

use super::request::Plan;

/// One reading's two scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pair {
    pub candidate: f32,
    pub candidate_anomaly: bool,
    pub live: f32,
    pub live_anomaly: bool,
    pub live_version: i64,
}

/// What the replay counted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// Readings the candidate scored.
    pub replayed: u64,
    pub failed: u64,
    pub skipped: u64,
    /// The replayed readings whose live score was found.
    pub pairs: Vec<Pair>,
}

fn share(count: u64, of: u64) -> f64 {
    if of == 0 { 0.0 } else { count as f64 / of as f64 }
}

/// The report of a finished replay.
pub fn report(plan: &Plan, tally: &Tally) -> ReplayReport {
    let pairs = &tally.pairs;
    let compared = pairs.len() as u64;
    let count = |f: fn(&Pair) -> bool| pairs.iter().filter(|p| f(p)).count() as u64;
    let candidate_anomaly_rate = share(count(|p| p.candidate_anomaly), compared);
    let live_anomaly_rate = share(count(|p| p.live_anomaly), compared);
    let agreement = share(count(|p| p.candidate_anomaly == p.live_anomaly), compared);
    let mean_score_difference = if compared == 0 {
        0.0
    } else {
        pairs.iter().map(|p| f64::from(p.candidate) - f64::from(p.live)).sum::<f64>() / compared as f64
    };
    let candidate: Vec<f64> = pairs.iter().map(|p| f64::from(p.candidate)).collect();
    let live: Vec<f64> = pairs.iter().map(|p| f64::from(p.live)).collect();
    // None: no pairs, or every score ties (no shift either way).
    let test = canary::analysis::mann_whitney(&candidate, &live);
    let (score_shift, score_p_value) = test.map_or((0.0, 1.0), |t| (t.shift, t.p_value));
    let live_versions: BTreeSet<i64> = pairs.iter().map(|p| p.live_version).collect();

    let b = &plan.bounds;
    let mut reasons = Vec::new();
    if compared < b.min_compared {
        reasons.push(format!(
            "compared {compared} readings, fewer than min_compared {} (is the range empty, or are its live \
             scores gone from the scores topic?)",
            b.min_compared
        ));
    }
    let asked = tally.replayed + tally.failed;
    let failure_rate = share(tally.failed, asked);
    if failure_rate > b.max_failure_rate {
        reasons.push(format!(
            "failed to score {} of {asked} readings ({failure_rate:.4}), more than max_failure_rate {}",
            tally.failed, b.max_failure_rate
        ));
    }
    if compared > 0 {
        let difference = (candidate_anomaly_rate - live_anomaly_rate).abs();
        if difference > b.max_anomaly_rate_difference {
            reasons.push(format!(
                "anomaly rate {candidate_anomaly_rate:.4} against live {live_anomaly_rate:.4}: a difference of \
                 {difference:.4}, more than max_anomaly_rate_difference {}",
                b.max_anomaly_rate_difference
            ));
        }
        if agreement < b.min_agreement {
            reasons.push(format!("agreement {agreement:.4}, less than min_agreement {}", b.min_agreement));
        }
        if score_p_value < b.score_significance && score_shift.abs() > b.max_score_shift {
            reasons.push(format!(
                "scores shifted by {score_shift:+.3} (Mann-Whitney p = {score_p_value:.2e}), more than max_score_shift {}",
                b.max_score_shift
            ));
        }
    }
    ReplayReport {
        model: plan.model.clone(),
        candidate_version: plan.version,
        output_topic: plan.output_topic.clone(),
        replayed: tally.replayed,
        compared,
        failed: tally.failed,
        candidate_anomaly_rate,
        live_anomaly_rate,
        agreement,
        mean_score_difference,
        score_shift,
        score_p_value,
        live_versions: live_versions.into_iter().collect(),
        passed: reasons.is_empty(),
        reasons,
        skipped: tally.skipped,
        bounds: Some(*b),
    }
}

#[cfg(test)]
mod tests {
    use super::super::request::DEFAULT_BOUNDS;
    use super::*;

    fn plan() -> Plan {
        Plan {
            from_ms: 0,
            to_ms: 1,
            model: "car-anomaly".into(),
            version: 3,
            output_topic: "replay".into(),
            bounds: DEFAULT_BOUNDS,
        }
    }

    /// `n` pairs: live scores spread over 0..1 (threshold 0.9), the candidate's from `candidate`.
    fn pairs(n: usize, candidate: impl Fn(f32) -> f32) -> Vec<Pair> {
        (0..n)
            .map(|i| {
                let live = i as f32 / n as f32;
                let c = candidate(live);
                Pair { candidate: c, candidate_anomaly: c > 0.9, live, live_anomaly: live > 0.9, live_version: 1 }
            })
            .collect()
    }

    #[test]
    fn a_candidate_scoring_like_the_live_model_passes() {
        let tally = Tally { replayed: 300, pairs: pairs(300, |live| live + 0.01), ..Tally::default() };
        let report = report(&plan(), &tally);
        assert!(report.passed, "{:?}", report.reasons);
        assert_eq!((report.replayed, report.compared), (300, 300));
        assert!(report.agreement > 0.98, "{}", report.agreement);
        assert!((report.mean_score_difference - 0.01).abs() < 1e-6);
        assert!(report.score_shift.abs() < 0.05, "{}", report.score_shift);
        assert_eq!(report.live_versions, [1]);
        assert_eq!(report.bounds, Some(DEFAULT_BOUNDS));
    }

    #[test]
    fn a_candidate_that_flags_everything_breaks_rate_agreement_and_shift() {
        let tally = Tally { replayed: 300, pairs: pairs(300, |live| live + 10.0), ..Tally::default() };
        let report = report(&plan(), &tally);
        assert!(!report.passed);
        assert_eq!(report.candidate_anomaly_rate, 1.0);
        assert_eq!(report.reasons.len(), 3, "{:?}", report.reasons);
        assert!(report.reasons[0].starts_with("anomaly rate 1.0000 against live 0.0967"), "{:?}", report.reasons);
        assert!(report.reasons[0].ends_with("more than max_anomaly_rate_difference 0.05"), "{:?}", report.reasons);
        assert!(report.reasons[1].starts_with("agreement 0.0967, less than min_agreement 0.9"), "{:?}", report.reasons);
        assert!(report.reasons[2].starts_with("scores shifted by +0.500"), "{:?}", report.reasons);
    }

    #[test]
    fn too_few_compared_readings_or_too_many_failures_is_no_pass() {
        let tally = Tally { replayed: 50, pairs: pairs(50, |live| live), ..Tally::default() };
        let report = report(&plan(), &tally);
        assert!(!report.passed);
        assert_eq!(report.reasons.len(), 1, "{:?}", report.reasons);
        assert!(report.reasons[0].starts_with("compared 50 readings, fewer than min_compared 100"));
        let empty = super::report(&plan(), &Tally::default());
        assert_eq!((empty.passed, empty.score_p_value, empty.agreement), (false, 1.0, 0.0));
        let failing = Tally { replayed: 200, failed: 10, pairs: pairs(200, |live| live), ..Tally::default() };
        let report = super::report(&plan(), &failing);
        assert_eq!(report.reasons, ["failed to score 10 of 210 readings (0.0476), more than max_failure_rate 0.01"]);
    }

    #[test]
    fn a_small_shift_or_an_insignificant_one_passes() {
        // Shifted, but by less than the bound on its size.
        let small = Tally { replayed: 1000, pairs: pairs(1000, |live| live * 0.97), ..Tally::default() };
        assert!(report(&plan(), &small).passed, "{:?}", report(&plan(), &small).reasons);
        // Large, but on 6 readings it could be chance (only the shift is judged here).
        let mut few = plan();
        few.bounds.min_compared = 5;
        few.bounds.max_anomaly_rate_difference = 1.0;
        few.bounds.min_agreement = 0.0;
        let tally = Tally { replayed: 6, pairs: pairs(6, |live| live + 0.4), ..Tally::default() };
        let report = report(&few, &tally);
        assert!(report.score_shift > 0.2 && report.score_p_value > 0.001, "{report:?}");
        assert!(report.passed, "{:?}", report.reasons);
    }
}
