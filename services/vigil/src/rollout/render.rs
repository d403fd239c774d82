//! How a rollout is shown: text for people (`render`, `render_list`, `watch_line`) and JSON
//! with the proto's field names for scripts (`rollout_json`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use proto::vigil::rollout::v1 as pb;
use serde_json::{Value, json};

/// The phase as the server's events name it (`rolled_back`).
pub(super) fn phase_name(phase: i32) -> &'static str {
    match pb::Phase::try_from(phase) {
        Ok(pb::Phase::Progressing) => "progressing",
        Ok(pb::Phase::Manual) => "manual",
        Ok(pb::Phase::Promoted) => "promoted",
        Ok(pb::Phase::RolledBack) => "rolled_back",
        Ok(pb::Phase::Aborted) => "aborted",
        Ok(pb::Phase::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

/// The phase in words (`rolled back`), for text output.
pub(super) fn phase_words(phase: i32) -> String {
    phase_name(phase).replace('_', " ")
}

pub(super) fn rollout_json(rollout: &pb::Rollout) -> Value {
    json!({
        "spec": rollout.spec.as_ref().map(spec_json),
        "phase": phase_name(rollout.phase),
        "canary_weight_percent": rollout.canary_weight_percent,
        "step": rollout.step,
        "failures": rollout.failures,
        "revision": rollout.revision,
        "last_decision": rollout.last_decision,
        "updated_unix_ms": rollout.updated_unix_ms,
        "source": rollout.source,
        "updated_by": rollout.updated_by,
    })
}

pub(super) fn spec_json(spec: &pb::RolloutSpec) -> Value {
    json!({
        "model": spec.model,
        "stable_version": spec.stable_version,
        "canary_version": spec.canary_version,
        "canary_weight_percent": spec.canary_weight_percent,
        "shadow_percent": spec.shadow_percent,
        "analysis": spec.analysis.as_ref().map(|a| json!({
            "step_weights_percent": a.step_weights_percent,
            "interval_seconds": a.interval_seconds,
            "failure_limit": a.failure_limit,
            "min_samples": a.min_samples,
            "max_error_rate_increase": a.max_error_rate_increase,
            "max_latency_p99_ratio": a.max_latency_p99_ratio,
            "max_anomaly_rate_difference": a.max_anomaly_rate_difference,
            "score_significance": a.score_significance,
            "max_score_shift": a.max_score_shift,
        })),
    })
}

pub(super) fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// A rollout as a block of `label: value` lines.
pub(super) fn render(rollout: &pb::Rollout, now_ms: i64) -> String {
    let default_spec = pb::RolloutSpec::default();
    let spec = rollout.spec.as_ref().unwrap_or(&default_spec);
    let progress = match &spec.analysis {
        Some(plan) => format!(
            "step {} of {}, failures {} (roll back at {})",
            rollout.step + 1,
            plan.step_weights_percent.len(),
            rollout.failures,
            plan.failure_limit
        ),
        None => format!("step {}, failures {}", rollout.step, rollout.failures),
    };
    let mut lines = vec![
        ("model", spec.model.clone()),
        ("phase", phase_words(rollout.phase)),
        ("versions", format!("stable {} -> canary {}", spec.stable_version, spec.canary_version)),
        ("canary weight", format!("{}%", rollout.canary_weight_percent)),
        ("shadow", format!("{}%", spec.shadow_percent)),
        ("progress", progress),
        ("revision", format!("{} (source: {})", rollout.revision, rollout.source)),
        ("updated", format!("by {} at {}", rollout.updated_by, when(rollout.updated_unix_ms, now_ms))),
        ("last decision", rollout.last_decision.clone()),
    ];
    if let Some(plan) = &spec.analysis {
        lines.push(("analysis", plan_line(plan)));
    }
    lines.iter().map(|(label, value)| format!("{:<15}{value}\n", format!("{label}:"))).collect()
}

/// The analysis plan on one line.
pub(super) fn plan_line(plan: &pb::Analysis) -> String {
    let steps: Vec<String> = plan.step_weights_percent.iter().map(|w| format!("{w}%")).collect();
    format!(
        "steps {}, a check every {} s, {} failed checks roll back; each side needs {} samples; \
         fails beyond: error rate +{}, p99 latency x{}, anomaly rate ±{}, score shift {} (p < {})",
        steps.join(" "),
        plan.interval_seconds,
        plan.failure_limit,
        plan.min_samples,
        plan.max_error_rate_increase,
        plan.max_latency_p99_ratio,
        plan.max_anomaly_rate_difference,
        plan.max_score_shift,
        plan.score_significance,
    )
}

/// One line per rollout, columns aligned.
pub(super) fn render_list(rollouts: &[pb::Rollout], now_ms: i64) -> String {
    let model = |r: &pb::Rollout| r.spec.as_ref().map_or("", |s| s.model.as_str()).to_owned();
    let width = rollouts.iter().map(|r| model(r).len()).max().unwrap_or(0);
    rollouts
        .iter()
        .map(|r| {
            let (stable, canary) = r.spec.as_ref().map_or((0, 0), |s| (s.stable_version, s.canary_version));
            format!(
                "{:<width$}  {:<11}  stable {stable} -> canary {canary} at {:>3}%  revision {}  updated {}\n",
                model(r),
                phase_words(r.phase),
                r.canary_weight_percent,
                r.revision,
                when(r.updated_unix_ms, now_ms),
            )
        })
        .collect()
}

/// What `watch` prints for a revision.
pub(super) fn watch_line(rollout: &pb::Rollout) -> String {
    let time = DateTime::<Utc>::from_timestamp_millis(rollout.updated_unix_ms)
        .map_or_else(|| "--:--:--".to_owned(), |t| t.format("%H:%M:%S").to_string());
    format!(
        "{time} revision {}: {}, canary {}%: {}",
        rollout.revision,
        phase_words(rollout.phase),
        rollout.canary_weight_percent,
        rollout.last_decision
    )
}

/// A Unix-millisecond time in UTC with how long ago it was.
pub(super) fn when(unix_ms: i64, now_ms: i64) -> String {
    let Some(time) = DateTime::<Utc>::from_timestamp_millis(unix_ms).filter(|_| unix_ms > 0) else {
        return "an unknown time".to_owned();
    };
    let ago = Duration::from_millis(now_ms.saturating_sub(unix_ms).max(0).try_into().unwrap_or(0)).as_secs();
    let ago = match ago {
        0..60 => format!("{ago} s ago"),
        60..3600 => format!("{} min ago", ago / 60),
        3600..86_400 => format!("{} h ago", ago / 3600),
        _ => format!("{} days ago", ago / 86_400),
    };
    format!("{} ({ago})", time.format("%Y-%m-%d %H:%M:%S UTC"))
}
