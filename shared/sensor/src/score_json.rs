//! The score record's JSON form (the stream processor's `output_format = "json"`), written
//! and read in one place: the processor writes it, and the alerts service and replays read
//! it back, so a field renamed or added on one side cannot leave a reader behind.
//!
//! Keys are the proto's field names (`vigil.scoring.v1.Score`); times are RFC 3339 in UTC
//! (`null` when unset); `fault` is the fault kind's spelling of [`crate::fault_name`].
//! Every key is always written; a reader requires the ones it is given by [`from_json`]'s
//! rules: all of them, with their JSON types.

use prost_types::Timestamp;
use proto::vigil::scoring::v1::Score;
use serde_json::{Map, Value, json};

use crate::json::format_time;
use crate::{fault_from_name, fault_name};

/// Why bytes are not a score record in JSON form; names the field at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScoreJsonError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("not a JSON object")]
    NotAnObject,
    #[error("JSON score without {0:?}")]
    Missing(&'static str),
    #[error("JSON score field {field:?}: {problem}")]
    Invalid { field: &'static str, problem: String },
}

/// The score as a JSON object.
pub fn to_json(score: &Score) -> Value {
    let time = |t: Option<Timestamp>| t.as_ref().and_then(format_time).map_or(Value::Null, Value::String);
    json!({
        "device_id": score.device_id,
        "event_time": time(score.event_time),
        "sequence": score.sequence,
        "score": score.score,
        "threshold": score.threshold,
        "is_anomaly": score.is_anomaly,
        "model_name": score.model_name,
        "model_version": score.model_version,
        "model_latency_us": score.model_latency_us,
        "pipeline_latency_us": score.pipeline_latency_us,
        "scored_at": time(score.scored_at),
        "source_topic": score.source_topic,
        "source_partition": score.source_partition,
        "source_offset": score.source_offset,
        "fault": fault_name(score.fault()),
    })
}

/// A score from the bytes [`to_json`] wrote. A non-finite score is written by serde_json as
/// `null` and read back as NaN, which readers then refuse as they would any NaN.
pub fn from_json(payload: &[u8]) -> Result<Score, ScoreJsonError> {
    let value: Value = serde_json::from_slice(payload).map_err(|e| ScoreJsonError::NotJson(e.to_string()))?;
    let object = value.as_object().ok_or(ScoreJsonError::NotAnObject)?;
    let fields = Fields(object);
    let mut score = Score {
        device_id: fields.string("device_id")?,
        event_time: fields.time("event_time")?,
        sequence: fields.unsigned("sequence")?,
        score: fields.float("score")?,
        threshold: fields.float("threshold")?,
        is_anomaly: fields.get("is_anomaly")?.as_bool().ok_or_else(|| invalid("is_anomaly", "not a boolean"))?,
        model_name: fields.string("model_name")?,
        model_version: fields.signed("model_version")?,
        model_latency_us: fields.unsigned("model_latency_us")?,
        pipeline_latency_us: fields.unsigned("pipeline_latency_us")?,
        scored_at: fields.time("scored_at")?,
        source_topic: fields.string("source_topic")?,
        source_partition: i32::try_from(fields.signed("source_partition")?)
            .map_err(|_| invalid("source_partition", "out of range"))?,
        source_offset: fields.signed("source_offset")?,
        fault: 0,
    };
    let fault = fields.string("fault")?;
    score.set_fault(fault_from_name(&fault).ok_or_else(|| invalid("fault", format!("{fault:?} is not a fault kind")))?);
    Ok(score)
}

fn invalid(field: &'static str, problem: impl Into<String>) -> ScoreJsonError {
    ScoreJsonError::Invalid { field, problem: problem.into() }
}

struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, field: &'static str) -> Result<&Value, ScoreJsonError> {
        self.0.get(field).ok_or(ScoreJsonError::Missing(field))
    }
    fn string(&self, field: &'static str) -> Result<String, ScoreJsonError> {
        Ok(self.get(field)?.as_str().ok_or_else(|| invalid(field, "not a string"))?.to_owned())
    }
    fn unsigned(&self, field: &'static str) -> Result<u64, ScoreJsonError> {
        self.get(field)?.as_u64().ok_or_else(|| invalid(field, "not a non-negative integer"))
    }
    fn signed(&self, field: &'static str) -> Result<i64, ScoreJsonError> {
        self.get(field)?.as_i64().ok_or_else(|| invalid(field, "not an integer"))
    }
    fn float(&self, field: &'static str) -> Result<f32, ScoreJsonError> {
        match self.get(field)? {
            Value::Null => Ok(f32::NAN),
            value => Ok(value.as_f64().ok_or_else(|| invalid(field, "not a number"))? as f32),
        }
    }
    fn time(&self, field: &'static str) -> Result<Option<Timestamp>, ScoreJsonError> {
        match self.get(field)? {
            Value::Null => Ok(None),
            Value::String(text) => {
                text.parse::<Timestamp>().map(Some).map_err(|_| invalid(field, format!("{text:?} is not RFC 3339")))
            }
            _ => Err(invalid(field, "not an RFC 3339 string")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FaultKind;
    use proptest::prelude::*;

    fn fault_kinds() -> Vec<FaultKind> {
        (0..32).filter_map(|n| FaultKind::try_from(n).ok()).collect()
    }

    fn timestamp() -> impl Strategy<Value = Option<Timestamp>> {
        // Years 0001-9999, as RFC 3339 can write them.
        proptest::option::of((-62_135_596_800i64..253_402_300_799, 0i32..1_000_000_000))
            .prop_map(|t| t.map(|(seconds, nanos)| Timestamp { seconds, nanos }))
    }

    prop_compose! {
        fn score()(
            device_id in ".{0,40}", event_time in timestamp(), sequence in any::<u64>(),
            value in proptest::num::f32::NORMAL | proptest::num::f32::ZERO, threshold in proptest::num::f32::NORMAL,
            is_anomaly in any::<bool>(), model_name in "[a-z0-9_.-]{0,20}", model_version in any::<i64>(),
            model_latency_us in any::<u64>(), pipeline_latency_us in any::<u64>(), scored_at in timestamp(),
            source_topic in "[a-zA-Z0-9._-]{0,30}", source_partition in any::<i32>(), source_offset in any::<i64>(),
            fault in proptest::sample::select(fault_kinds()),
        ) -> Score {
            let mut score = Score {
                device_id, event_time, sequence, score: value, threshold, is_anomaly, model_name, model_version,
                model_latency_us, pipeline_latency_us, scored_at, source_topic, source_partition, source_offset,
                fault: 0,
            };
            score.set_fault(fault);
            score
        }
    }

    proptest! {
        #[test]
        fn every_score_reads_back_as_written(score in score()) {
            let bytes = serde_json::to_vec(&to_json(&score)).unwrap();
            prop_assert_eq!(from_json(&bytes).unwrap(), score);
        }
    }

    #[test]
    fn a_missing_or_mistyped_field_is_named() {
        let mut value = to_json(&Score::default());
        value.as_object_mut().unwrap().remove("model_version");
        assert_eq!(from_json(value.to_string().as_bytes()), Err(ScoreJsonError::Missing("model_version")));
        let mut value = to_json(&Score::default());
        value["event_time"] = json!("yesterday");
        let error = from_json(value.to_string().as_bytes()).unwrap_err().to_string();
        assert!(error.contains("event_time") && error.contains("RFC 3339"), "{error}");
        assert!(matches!(from_json(b"[1]"), Err(ScoreJsonError::NotAnObject)));
        assert!(matches!(from_json(b"{"), Err(ScoreJsonError::NotJson(_))));
    }

    #[test]
    fn a_non_finite_score_reads_back_as_nan() {
        let score = Score { score: f32::INFINITY, ..Score::default() };
        let read = from_json(serde_json::to_vec(&to_json(&score)).unwrap().as_slice()).unwrap();
        assert!(read.score.is_nan());
    }
}
