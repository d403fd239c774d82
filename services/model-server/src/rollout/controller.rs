//! The rollout control loops: applying the rollout file, and the automated analysis.
//!
//! The file owns the rollouts it declares: an entry that is new or changed starts its
//! rollout over (one revision on); an entry that disappears ends its rollout (aborted if
//! still running) and hands the model back to the API. An unchanged entry leaves its
//! rollout alone, whatever the analysis or an operator did to it since, so a restart or a
//! second replica reading the same file changes nothing.
//!
//! The analysis runs on the leader only ([`super::log`]). For each progressing rollout it
//! takes the stable and canary windows every `interval_seconds`, judges them
//! ([`canary::analysis::judge`]), and applies the plan's decision: advance to the next
//! step, promote after the last, hold when inconclusive, count a failure, or roll back at
//! the failure limit. With shadow scoring on, the score checks use the paired window (both
//! versions on the same rows, see [`super::windows`]). A change of revision (by anyone) restarts the interval with fresh
//! windows, so a check never mixes traffic from two weights.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use canary::analysis::{Decision, Judgement, Verdict, WindowStats, judge};
use serde_json::json;
use tokio::sync::watch;

use super::log::{ProposeError, RolloutEvent, RolloutLog};
use super::state::{Phase, RolloutSpec, RolloutState, Source};
use super::windows::Windows;
use crate::metrics::Metrics;

/// Brings the rollouts in line with the file's entries (see the module doc).
pub async fn apply_file(log: &RolloutLog, specs: &[RolloutSpec]) {
    for spec in specs {
        let current = log.rollouts().get(&spec.model);
        if current.as_ref().is_some_and(|c| c.source == Source::File && c.spec == *spec) {
            continue;
        }
        let state = RolloutState::start(spec.clone(), Source::File, current.as_deref(), log.replica());
        propose_and_publish(log, state, "started").await;
    }
    for current in log.rollouts().list() {
        if current.source == Source::File && !specs.iter().any(|s| s.model == current.spec.model) {
            propose_and_publish(log, current.released_by_file(log.replica()), "removed_from_file").await;
        }
    }
}

/// Proposes a change and, if it took effect, publishes it as `event`; a lost race is
/// logged (the winner's change stands).
pub(crate) async fn propose_and_publish(
    log: &RolloutLog,
    state: RolloutState,
    event: &str,
) -> Option<Arc<RolloutState>> {
    propose_with_figures(log, state, event, None).await
}

async fn propose_with_figures(
    log: &RolloutLog,
    state: RolloutState,
    event: &str,
    figures: Option<serde_json::Value>,
) -> Option<Arc<RolloutState>> {
    match log.propose(state).await {
        Ok(applied) => {
            log.publish(RolloutEvent::of(event, &applied, figures)).await;
            Some(applied)
        }
        Err(ProposeError::Conflict(winner)) => {
            tracing::info!(model = %winner.spec.model, revision = winner.revision, "rollout change superseded: {event}");
            None
        }
        Err(e) => {
            tracing::error!("rollout change {event} not applied: {e}");
            None
        }
    }
}

/// Re-reads the rollout file every `period`; a bad file keeps the rollouts in force.
pub async fn poll_file(log: RolloutLog, path: PathBuf, period: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.changed() => return,
        }
        let read = path.clone();
        match tokio::task::spawn_blocking(move || super::read_rollout_file(&read)).await {
            Ok(Ok(specs)) => apply_file(&log, &specs).await,
            Ok(Err(e)) => tracing::error!("rollout file rejected, keeping the rollouts in force: {e}"),
            Err(e) => tracing::error!("rollout file read task failed: {e}"),
        }
    }
}

/// Where the analysis of one rollout stands on this replica.
struct Watch {
    revision: u64,
    since: Instant,
}

/// Runs the analysis of every progressing rollout until `stop` (see the module doc).
pub async fn run_analysis(log: RolloutLog, windows: Windows, metrics: Metrics, mut stop: watch::Receiver<bool>) {
    let mut watched: HashMap<String, Watch> = HashMap::new();
    let mut was_leader = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.changed() => return,
        }
        for state in log.rollouts().list() {
            metrics.set_rollout(&state.spec.model, state.phase.name(), state.split().canary_weight.percent());
        }
        let leader = log.is_leader();
        if leader != was_leader {
            tracing::info!(replica = log.replica(), leader, "rollout analysis leadership changed");
            watched.clear();
            was_leader = leader;
        }
        if !leader {
            continue;
        }
        for state in log.rollouts().list() {
            let (model, spec) = (&state.spec.model, &state.spec);
            let Some(plan) = spec.analysis.as_ref().filter(|_| state.phase == Phase::Progressing) else {
                watched.remove(model);
                continue;
            };
            let watch = watched.entry(model.clone()).or_insert(Watch { revision: 0, since: Instant::now() });
            if watch.revision != state.revision {
                // A new weight (or a new rollout): start both windows from here.
                windows.take(model, spec.stable);
                windows.take(model, spec.canary);
                windows.take_paired(model);
                *watch = Watch { revision: state.revision, since: Instant::now() };
                continue;
            }
            if watch.since.elapsed() < Duration::from_secs(plan.interval_seconds) {
                continue;
            }
            watch.since = Instant::now();
            let (mut stable, mut canary) = (windows.take(model, spec.stable), windows.take(model, spec.canary));
            // Judge the scores on the same readings when shadowing gave enough of them.
            let paired = windows.take_paired(model);
            let on_same_rows = paired.stable.scores.len() >= plan.min_samples;
            if on_same_rows {
                (stable.scores, stable.anomalies) = (paired.stable.scores, paired.stable.anomalies);
                (canary.scores, canary.anomalies) = (paired.canary.scores, paired.canary.anomalies);
            }
            let judgement = judge(&stable, &canary, &plan.bounds());
            let mut progress = state.progress();
            let decision = progress.next(&plan.steps(), &judgement.verdict);
            let mut figures = figures(&stable, &canary, &judgement);
            figures["scores_on_same_rows"] = on_same_rows.into();
            let mut summary = summarize(&judgement, &stable, &canary);
            if on_same_rows {
                summary.push_str(&format!(" (on the same {} shadowed rows)", stable.scores.len()));
            }
            metrics.rollout_decision(model, decision_name(&decision));
            match state.decided(&decision, progress, &summary, log.replica()) {
                None => {
                    let message = format!("held: {summary}");
                    let event = RolloutEvent {
                        message: &message,
                        replica: log.replica(),
                        ..RolloutEvent::of("held", &state, Some(figures))
                    };
                    log.publish(event).await;
                }
                Some(next) => {
                    propose_with_figures(&log, next, decision_name(&decision), Some(figures)).await;
                }
            }
        }
    }
}

fn decision_name(decision: &Decision) -> &'static str {
    match decision {
        Decision::Advance(_) => "advanced",
        Decision::Promote => "promoted",
        Decision::Hold(_) => "held",
        Decision::Retry { .. } => "failed_check",
        Decision::RollBack { .. } => "rolled_back",
    }
}

/// One line: the verdict and the figures it rests on.
fn summarize(judgement: &Judgement, stable: &WindowStats, canary: &WindowStats) -> String {
    let rate = |r: Option<f64>| r.map_or("-".to_owned(), |r| format!("{r:.4}"));
    let ms = |r: Option<f64>| r.map_or("-".to_owned(), |r| format!("{r:.2}"));
    let verdict = match &judgement.verdict {
        Verdict::Pass => "within bounds".to_owned(),
        Verdict::Fail(breaches) => {
            format!("breached {}", breaches.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
        }
        Verdict::Inconclusive(reason) => format!("inconclusive ({reason})"),
    };
    let scores = judgement
        .scores
        .as_ref()
        .map_or("-".to_owned(), |t| format!("shift {:+.3}, Mann-Whitney p {:.2e}", t.shift, t.p_value));
    format!(
        "{verdict}; requests stable {} canary {}; error rate {} vs {}; p99 {} vs {} ms; anomaly rate {} vs {}; scores {scores}",
        stable.requests,
        canary.requests,
        rate(judgement.stable_error_rate),
        rate(judgement.canary_error_rate),
        ms(judgement.stable_latency_p99_ms),
        ms(judgement.canary_latency_p99_ms),
        rate(judgement.stable_anomaly_rate),
        rate(judgement.canary_anomaly_rate),
    )
}

fn figures(stable: &WindowStats, canary: &WindowStats, judgement: &Judgement) -> serde_json::Value {
    let side = |w: &WindowStats, error_rate, p99, anomaly_rate| {
        json!({
            "requests": w.requests, "errors": w.errors, "scored_rows": w.scores.len(), "anomalies": w.anomalies,
            "error_rate": error_rate, "latency_p99_ms": p99, "anomaly_rate": anomaly_rate,
            "mean_score": (!w.scores.is_empty()).then(|| w.scores.iter().sum::<f64>() / w.scores.len() as f64),
        })
    };
    let verdict = match &judgement.verdict {
        Verdict::Pass => json!({"result": "pass"}),
        Verdict::Fail(breaches) => {
            json!({"result": "fail", "breaches": breaches.iter().map(ToString::to_string).collect::<Vec<_>>()})
        }
        Verdict::Inconclusive(reason) => json!({"result": "inconclusive", "reason": reason}),
    };
    json!({
        "verdict": verdict,
        "stable": side(stable, judgement.stable_error_rate, judgement.stable_latency_p99_ms, judgement.stable_anomaly_rate),
        "canary": side(canary, judgement.canary_error_rate, judgement.canary_latency_p99_ms, judgement.canary_anomaly_rate),
        "mann_whitney": judgement.scores.as_ref().map(|t| json!({"u": t.u, "p_value": t.p_value, "shift": t.shift})),
    })
}
