//! Checking a `ReplayRequest` against the processor's configuration before anything is
//! read: each refusal names the field at fault, and the bounds get their defaults.

use proto::vigil::replay::v1::{Bounds, ReplayRequest};

use crate::config::ProcessorConfig;

/// The bounds a zero field stands for (the proto's bracketed defaults).
pub const DEFAULT_BOUNDS: Bounds = Bounds {
    max_anomaly_rate_difference: 0.05,
    min_agreement: 0.9,
    // As a rollout's analysis: the bundled v2 against v1 measures 0.10-0.15 on the same
    // readings with the same anomaly rate; a model that flags everything measures 0.5.
    max_score_shift: 0.2,
    min_compared: 100,
    score_significance: 0.001,
    max_failure_rate: 0.01,
};

/// A checked request: what one replay does.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Kafka timestamps in `[from_ms, to_ms)`, in milliseconds since the epoch.
    pub from_ms: i64,
    pub to_ms: i64,
    pub model: String,
    pub version: i64,
    pub output_topic: String,
    /// With defaults filled in.
    pub bounds: Bounds,
}

/// A field of the request that cannot be replayed as given.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    /// The proto's name for it (`bounds.min_agreement` for a nested one).
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> Invalid {
    Invalid { field, message: message.into() }
}

/// Checks `request`; the model defaults to the processor's.
pub fn check(config: &ProcessorConfig, request: &ReplayRequest) -> Result<Plan, Invalid> {
    if request.candidate_version <= 0 {
        return Err(invalid(
            "candidate_version",
            format!("{} is not a model version (give the candidate's version, 1 or more)", request.candidate_version),
        ));
    }
    let output_topic = request.output_topic.trim();
    if output_topic.is_empty() {
        return Err(invalid("output_topic", "missing: name the topic the candidate's scores go to"));
    }
    if let Some(problem) = topic_name_problem(output_topic) {
        return Err(invalid("output_topic", format!("{output_topic:?} is not a Kafka topic name: {problem}")));
    }
    for (name, live) in [
        ("readings", &config.readings_topic),
        ("scores", &config.scores_topic),
        ("anomalies", &config.anomalies_topic),
        ("dead-letter", &config.dead_letter_topic),
    ] {
        if output_topic == live {
            return Err(invalid(
                "output_topic",
                format!("{output_topic} is the processor's {name} topic; a replay writes to a topic of its own"),
            ));
        }
    }
    let prefix = config.replay_topic_prefix.as_str();
    if output_topic.len() <= prefix.len() || !output_topic.starts_with(prefix) {
        return Err(invalid(
            "output_topic",
            format!(
                "{output_topic} does not start with {prefix:?}: replays write only to replay topics (e.g. {prefix}v3)"
            ),
        ));
    }
    let from = request.from.as_ref().ok_or_else(|| invalid("from", "missing: the range's start"))?;
    let to = request.to.as_ref().ok_or_else(|| invalid("to", "missing: the range's end"))?;
    let from_ms = millis(from).ok_or_else(|| invalid("from", format!("{from} is not a valid timestamp")))?;
    let to_ms = millis(to).ok_or_else(|| invalid("to", format!("{to} is not a valid timestamp")))?;
    if (to.seconds, to.nanos) <= (from.seconds, from.nanos) || to_ms <= from_ms {
        return Err(invalid("to", format!("{to} is not after from ({from}): the range [from, to) is empty")));
    }
    let model = match request.model.trim() {
        "" => config.model.name.clone(),
        model => model.to_owned(),
    };
    Ok(Plan {
        from_ms,
        to_ms,
        model,
        version: request.candidate_version,
        output_topic: output_topic.to_owned(),
        bounds: bounds(request.bounds.as_ref())?,
    })
}

/// The bounds with zero fields defaulted; a value out of its range is refused by name.
pub fn bounds(given: Option<&Bounds>) -> Result<Bounds, Invalid> {
    let given = given.cloned().unwrap_or_default();
    let d = DEFAULT_BOUNDS;
    let share = |field: &'static str, value: f64, max: f64, default: f64| -> Result<f64, Invalid> {
        if !value.is_finite() || !(0.0..=max).contains(&value) {
            return Err(invalid(field, format!("{value} is outside 0 to {max}")));
        }
        Ok(if value == 0.0 { default } else { value })
    };
    Ok(Bounds {
        max_anomaly_rate_difference: share(
            "bounds.max_anomaly_rate_difference",
            given.max_anomaly_rate_difference,
            1.0,
            d.max_anomaly_rate_difference,
        )?,
        min_agreement: share("bounds.min_agreement", given.min_agreement, 1.0, d.min_agreement)?,
        // |P(candidate > live) - 1/2| is at most 1/2.
        max_score_shift: share("bounds.max_score_shift", given.max_score_shift, 0.5, d.max_score_shift)?,
        min_compared: if given.min_compared == 0 { d.min_compared } else { given.min_compared },
        score_significance: share("bounds.score_significance", given.score_significance, 1.0, d.score_significance)?,
        max_failure_rate: share("bounds.max_failure_rate", given.max_failure_rate, 1.0, d.max_failure_rate)?,
    })
}

/// Milliseconds since the epoch, rounded up: a Kafka timestamp (whole milliseconds) `t`
/// is at or after the instant exactly when `t >= millis(instant)`. `vigil export-readings`
/// bounds its ranges by the same rule, so an export and a replay of one range agree.
pub fn millis(time: &prost_types::Timestamp) -> Option<i64> {
    if !(0..1_000_000_000).contains(&time.nanos) {
        return None;
    }
    let whole = time.seconds.checked_mul(1000)?;
    whole.checked_add((i64::from(time.nanos) + 999_999) / 1_000_000)
}

/// Why `name` cannot be a Kafka topic (Kafka's own rule), if it cannot.
fn topic_name_problem(name: &str) -> Option<&'static str> {
    if name.len() > 249 {
        return Some("longer than 249 characters");
    }
    if name == "." || name == ".." {
        return Some("\".\" and \"..\" are reserved");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Some("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> ReplayRequest {
        ReplayRequest {
            from: Some(prost_types::Timestamp { seconds: 1_767_225_600, nanos: 0 }),
            to: Some(prost_types::Timestamp { seconds: 1_767_229_200, nanos: 0 }),
            model: String::new(),
            candidate_version: 3,
            output_topic: "vigil-replay-3".into(),
            bounds: None,
        }
    }

    fn refused(change: impl FnOnce(&mut ReplayRequest)) -> Invalid {
        let mut request = request();
        change(&mut request);
        check(&ProcessorConfig::default(), &request).unwrap_err()
    }

    #[test]
    fn a_good_request_gets_the_processors_model_and_the_default_bounds() {
        let plan = check(&ProcessorConfig::default(), &request()).unwrap();
        assert_eq!((plan.from_ms, plan.to_ms), (1_767_225_600_000, 1_767_229_200_000));
        assert_eq!((plan.model.as_str(), plan.version), ("car-anomaly", 3));
        assert_eq!(plan.bounds, DEFAULT_BOUNDS);
        let custom = Bounds { min_agreement: 0.8, min_compared: 10, ..Default::default() };
        let plan = check(&ProcessorConfig::default(), &ReplayRequest { bounds: Some(custom), ..request() }).unwrap();
        assert_eq!((plan.bounds.min_agreement, plan.bounds.min_compared), (0.8, 10));
        assert_eq!(plan.bounds.max_score_shift, 0.2, "the others keep their defaults");
    }

    #[test]
    fn each_refusal_names_its_field() {
        assert_eq!(refused(|r| r.candidate_version = 0).field, "candidate_version");
        assert_eq!(refused(|r| r.candidate_version = -2).field, "candidate_version");
        assert_eq!(refused(|r| r.output_topic.clear()).field, "output_topic");
        assert_eq!(refused(|r| r.output_topic = "a topic".into()).field, "output_topic");
        for other in ["vigil-alerts-changelog", "vigil-replay-", "replay-v3"] {
            let error = refused(|r| r.output_topic = other.into());
            assert!(error.field == "output_topic" && error.message.contains("vigil-replay-"), "{other}: {error:?}");
        }
        for live in ["vigil-readings", "vigil-scores", "vigil-anomalies", "vigil-scoring-dead-letter"] {
            let error = refused(|r| r.output_topic = live.into());
            assert_eq!(error.field, "output_topic", "{live}");
            assert!(error.message.contains(live), "{error}");
        }
        assert_eq!(refused(|r| r.from = None).field, "from");
        assert_eq!(refused(|r| r.to = None).field, "to");
        assert_eq!(refused(|r| r.to = r.from).field, "to");
        assert_eq!(refused(|r| r.from.as_mut().unwrap().nanos = -1).field, "from");
        let swapped = refused(|r| std::mem::swap(&mut r.from, &mut r.to));
        assert_eq!(
            swapped.to_string(),
            "to: 2026-01-01T00:00:00Z is not after from (2026-01-01T01:00:00Z): the range [from, to) is empty"
        );
        let bounds = |b: Bounds| refused(|r| r.bounds = Some(b)).field;
        assert_eq!(bounds(Bounds { min_agreement: 1.5, ..Default::default() }), "bounds.min_agreement");
        assert_eq!(bounds(Bounds { max_score_shift: 0.6, ..Default::default() }), "bounds.max_score_shift");
        assert_eq!(bounds(Bounds { max_failure_rate: -0.1, ..Default::default() }), "bounds.max_failure_rate");
        assert_eq!(
            bounds(Bounds { max_anomaly_rate_difference: f64::NAN, ..Default::default() }),
            "bounds.max_anomaly_rate_difference"
        );
        assert_eq!(bounds(Bounds { score_significance: 2.0, ..Default::default() }), "bounds.score_significance");
    }

    #[test]
    fn the_range_is_in_whole_milliseconds_rounded_up() {
        let at = |seconds, nanos| millis(&prost_types::Timestamp { seconds, nanos }).unwrap();
        assert_eq!(at(1, 0), 1000);
        assert_eq!(at(1, 1), 1001, "a record at 1000 ms is before 1 s + 1 ns");
        assert_eq!(at(1, 999_000_000), 1999);
        // Less than a millisecond apart with no whole millisecond between: empty.
        let error = refused(|r| {
            r.from = Some(prost_types::Timestamp { seconds: 5, nanos: 100 });
            r.to = Some(prost_types::Timestamp { seconds: 5, nanos: 200 });
        });
        assert_eq!(error.field, "to");
    }
}
