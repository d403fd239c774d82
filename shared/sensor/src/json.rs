//! MQTT payloads to readings and back.
//!
//! [`parse`] accepts Vigil's JSON form (see `sensor.proto`) and the seed demo's payloads
//! as they are published: every signal under its snake_case name, its camelCase name
//! (`tirePressure11`) or the seed's squashed spelling (`tire_pressure11`,
//! `accelerometer11_value`); a device id from the topic when the payload has none; the
//! arrival time when it has no event time; `failure_occurred` "true"/"false" as a label.
//! Spellings are derived from the proto field names by rule, so no list of aliases can
//! drift from the schema. Unknown keys are ignored, so publishers can add fields.
//! [`to_json`] writes the canonical form, values as [`crate::Signal::display`] writes them.

use std::fmt::Write as _;
use std::sync::LazyLock;
use std::time::SystemTime;

use chrono::{DateTime, SecondsFormat, Utc};
use prost_types::Timestamp;
use serde_json::{Map, Value};

use crate::{FaultKind, InvalidReading, SensorReading, fault_from_name, fault_name, signals};

/// What the transport knows about a payload besides its bytes.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    /// The device id the topic names (the last level of `vehicles/sensor/data/<id>`).
    pub topic_device_id: Option<&'a str>,
    /// When the payload arrived: the event time of a payload that carries none.
    pub received_at: SystemTime,
}

/// Parses and validates one payload.
pub fn parse(payload: &[u8], envelope: &Envelope<'_>) -> Result<SensorReading, InvalidReading> {
    let value: Value = serde_json::from_slice(payload).map_err(|e| InvalidReading::NotJson(e.to_string()))?;
    let Value::Object(object) = value else { return Err(InvalidReading::NotAnObject) };
    let mut reading = SensorReading { device_id: device_id(&object, envelope.topic_device_id)?, ..Default::default() };
    reading.event_time = Some(match lookup(&object, &["event_time", "eventTime"])? {
        None => envelope.received_at.into(),
        Some((key, Value::String(text))) => parse_time(text).ok_or_else(|| InvalidReading::BadValue {
            field: key.to_owned(),
            problem: format!("{text:?} is not an RFC 3339 time such as \"2026-11-25T08:00:00.250Z\""),
        })?,
        Some((key, other)) => return Err(wrong_type(key, "an RFC 3339 time string", other)),
    });
    reading.sequence = match lookup(&object, &["sequence"])? {
        None => 0,
        Some((key, value)) => value.as_u64().ok_or_else(|| wrong_type(key, "a non-negative integer", value))?,
    };
    reading.fault = fault(&object)? as i32;
    for (signal, spellings) in signals().iter().zip(SPELLINGS.iter()) {
        let (key, value) =
            lookup(&object, spellings)?.ok_or_else(|| InvalidReading::Missing { field: signal.name.to_owned() })?;
        let number = value.as_f64().ok_or_else(|| wrong_type(key, "a number", value))?;
        signal.check(number).map_err(|e| rename(e, key))?;
        signal.set(&mut reading, number);
    }
    // Every signal was range-checked above and `device_id` refuses an empty id, so the
    // reading is valid as `crate::validate` defines it.
    Ok(reading)
}

/// The canonical JSON form of a reading (keys in proto order; `sequence`, `event_time` and
/// `fault` only when set).
pub fn to_json(reading: &SensorReading) -> String {
    let mut out = String::with_capacity(640);
    out.push('{');
    out.push_str("\"device_id\":");
    out.push_str(&Value::String(reading.device_id.clone()).to_string());
    if let Some(time) = reading.event_time.as_ref().and_then(format_time) {
        let _ = write!(out, ",\"event_time\":\"{time}\"");
    }
    if reading.sequence != 0 {
        let _ = write!(out, ",\"sequence\":{}", reading.sequence);
    }
    for signal in signals() {
        let _ = write!(out, ",\"{}\":{}", signal.name, signal.display(reading));
    }
    let fault = FaultKind::try_from(reading.fault).unwrap_or(FaultKind::Unspecified);
    if fault != FaultKind::Unspecified {
        let _ = write!(out, ",\"fault\":\"{}\"", fault_name(fault));
    }
    out.push('}');
    out
}

/// RFC 3339 in UTC with as many fractional digits as needed.
pub fn format_time(time: &Timestamp) -> Option<String> {
    let nanos = u32::try_from(time.nanos).ok()?;
    DateTime::<Utc>::from_timestamp(time.seconds, nanos).map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

fn parse_time(text: &str) -> Option<Timestamp> {
    let time = DateTime::parse_from_rfc3339(text).ok()?;
    Some(Timestamp { seconds: time.timestamp(), nanos: time.timestamp_subsec_nanos() as i32 })
}

/// Each signal's accepted keys, derived from its proto name: `tire_pressure_1_1`,
/// `tirePressure11`, `tire_pressure11`.
static SPELLINGS: LazyLock<Vec<Vec<String>>> = LazyLock::new(|| {
    signals()
        .iter()
        .map(|s| {
            let mut spellings = vec![s.name.to_owned()];
            for other in [camel_case(s.name), squashed(s.name)] {
                if !spellings.contains(&other) {
                    spellings.push(other);
                }
            }
            spellings
        })
        .collect()
});

/// `accelerometer_1_1_value` -> `accelerometer11Value`.
fn camel_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, part) in name.split('_').enumerate() {
        let mut chars = part.chars();
        match chars.next() {
            Some(first) if i > 0 => {
                out.extend(first.to_uppercase());
                out.extend(chars);
            }
            _ => out.push_str(part),
        }
    }
    out
}

/// `accelerometer_1_1_value` -> `accelerometer11_value`: the underscores before digits go.
fn squashed(name: &str) -> String {
    let bytes = name.as_bytes();
    let mut out = String::with_capacity(name.len());
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'_' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
            continue;
        }
        out.push(b as char);
    }
    out
}

/// The value under the first of `keys` present; an error if two present keys disagree.
fn lookup<'a, K: AsRef<str>>(
    object: &'a Map<String, Value>,
    keys: &'a [K],
) -> Result<Option<(&'a str, &'a Value)>, InvalidReading> {
    let mut found: Option<(&str, &Value)> = None;
    for key in keys {
        let key = key.as_ref();
        let Some(value) = object.get(key) else { continue };
        match found {
            None => found = Some((key, value)),
            Some((first, seen)) if !same(seen, value) => {
                return Err(InvalidReading::BadValue {
                    field: first.to_owned(),
                    problem: format!("{first} is {seen} but {key} is {value}; send one"),
                });
            }
            Some(_) => {}
        }
    }
    Ok(found)
}

fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn device_id(object: &Map<String, Value>, from_topic: Option<&str>) -> Result<String, InvalidReading> {
    let from_topic = from_topic.filter(|id| !id.is_empty());
    if let Some(topic_id) = from_topic {
        crate::check_device_id_length("device_id (from the topic)", topic_id)?;
    }
    match lookup(object, &["device_id", "deviceId"])? {
        Some((key, Value::String(id))) => {
            crate::check_device_id_length(key, id)?;
            match from_topic {
                Some(topic_id) if topic_id != id => Err(InvalidReading::BadValue {
                    field: key.to_owned(),
                    problem: format!("{id:?} differs from the topic's device id {topic_id:?}"),
                }),
                _ if id.is_empty() => {
                    Err(InvalidReading::BadValue { field: key.to_owned(), problem: "is empty".into() })
                }
                _ => Ok(id.clone()),
            }
        }
        Some((key, other)) => Err(wrong_type(key, "a string", other)),
        None => from_topic.map(str::to_owned).ok_or_else(|| InvalidReading::Missing {
            field: "device_id (not in the payload, none in the topic)".into(),
        }),
    }
}

fn fault(object: &Map<String, Value>) -> Result<FaultKind, InvalidReading> {
    let labelled = match lookup(object, &["fault"])? {
        None => None,
        Some((key, Value::String(name))) => Some(fault_from_name(name).ok_or_else(|| InvalidReading::BadValue {
            field: key.to_owned(),
            problem: format!(
                "{name:?} is not a fault kind (one of: {})",
                (1..=8).filter_map(|k| FaultKind::try_from(k).ok()).map(fault_name).collect::<Vec<_>>().join(", ")
            ),
        })?),
        Some((key, other)) => return Err(wrong_type(key, "a fault kind string", other)),
    };
    let failure = match lookup(object, &["failure_occurred", "failureOccurred"])? {
        None => None,
        Some((_, Value::Bool(b))) => Some(*b),
        Some((_, Value::String(s))) if s.eq_ignore_ascii_case("true") => Some(true),
        Some((_, Value::String(s))) if s.eq_ignore_ascii_case("false") => Some(false),
        Some((key, other)) => return Err(wrong_type(key, "\"true\" or \"false\"", other)),
    };
    match (labelled, failure) {
        (Some(kind), Some(failed)) if (kind == FaultKind::None) == failed => Err(InvalidReading::BadValue {
            field: "failure_occurred".into(),
            problem: format!("{failed} contradicts fault {:?}", fault_name(kind)),
        }),
        (Some(kind), _) => Ok(kind),
        (None, Some(true)) => Ok(FaultKind::Unknown),
        (None, Some(false)) => Ok(FaultKind::None),
        (None, None) => Ok(FaultKind::Unspecified),
    }
}

fn wrong_type(key: &str, expected: &str, got: &Value) -> InvalidReading {
    let kind = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    InvalidReading::BadValue { field: key.to_owned(), problem: format!("expected {expected}, got {kind} ({got})") }
}

/// A range error reported under the key the publisher used.
fn rename(error: InvalidReading, key: &str) -> InvalidReading {
    match error {
        InvalidReading::OutOfRange { value, min, max, unit, .. } => {
            InvalidReading::OutOfRange { field: key.to_owned(), value, min, max, unit }
        }
        InvalidReading::BadValue { problem, .. } => InvalidReading::BadValue { field: key.to_owned(), problem },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_follow_the_seed_and_camel_case_rules() {
        assert_eq!(camel_case("tire_pressure_1_1"), "tirePressure11");
        assert_eq!(camel_case("accelerometer_1_1_value"), "accelerometer11Value");
        assert_eq!(camel_case("speed"), "speed");
        assert_eq!(squashed("tire_pressure_1_1"), "tire_pressure11");
        assert_eq!(squashed("accelerometer_2_1_value"), "accelerometer21_value");
        assert_eq!(squashed("coolant_temp"), "coolant_temp");
    }
}
