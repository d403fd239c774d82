//! The car sensor reading every Vigil service shares.
//!
//! The schema is `proto/vigil/sensor/v1/sensor.proto`: [`SensorReading`] is its generated
//! type, and each signal's unit and valid range are read from that file's field options at
//! start-up ([`signals`]), so the ranges exist in one place. [`json`] turns MQTT payloads
//! (Vigil's own JSON form and the seed demo's, as published) into validated readings and
//! readings back into JSON. [`score_json`] is the score record's JSON form, written by the
//! processor and read by alerts and replays.

#![forbid(unsafe_code)]

mod event_time;
pub mod json;
pub mod score_json;
mod signals;

pub use event_time::EventTimeBounds;
pub use proto::vigil::sensor::v1::{FaultKind, SensorReading};

/// The most bytes a device id may have. It is a Kafka key, an MQTT topic level and a
/// header on every record of the device; ids in the field are far shorter (`car-0042`, a
/// VIN, a UUID), and a longer one is a mistake or an attack (a few hundred KB made records
/// exceed Kafka's limit).
pub const MAX_DEVICE_ID_BYTES: usize = 256;
pub use signals::{Signal, signal, signals};

/// Why a reading was rejected: the field and what is wrong with it, in words a publisher
/// can act on. Ingest puts this text on the dead-letter record.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidReading {
    #[error("the payload is not JSON: {0}")]
    NotJson(String),
    #[error("the payload is JSON but not an object")]
    NotAnObject,
    #[error("field {field} is missing")]
    Missing { field: String },
    #[error("field {field}: {problem}")]
    BadValue { field: String, problem: String },
    #[error("field {field} is {value}, outside its valid range [{min}, {max}] {unit}")]
    OutOfRange { field: String, value: f64, min: f64, max: f64, unit: String },
    #[error("field {field} is {bytes} bytes long, more than the {max} allowed")]
    TooLong { field: String, bytes: usize, max: usize },
    #[error("field event_time is implausible: {problem}")]
    ImplausibleEventTime { problem: String },
}

impl InvalidReading {
    /// A short machine-readable name of the problem (`out_of_range`, ...), for dead-letter
    /// headers and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotJson(_) => "not_json",
            Self::NotAnObject => "not_an_object",
            Self::Missing { .. } => "missing_field",
            Self::BadValue { .. } => "bad_value",
            Self::OutOfRange { .. } => "out_of_range",
            Self::TooLong { .. } => "too_long",
            Self::ImplausibleEventTime { .. } => "implausible_event_time",
        }
    }

    /// The field at fault, if one is.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::NotJson(_) | Self::NotAnObject => None,
            Self::Missing { field }
            | Self::BadValue { field, .. }
            | Self::OutOfRange { field, .. }
            | Self::TooLong { field, .. } => Some(field),
            Self::ImplausibleEventTime { .. } => Some("event_time"),
        }
    }
}

/// Checks every signal of a reading against its valid range, and that it names a device
/// (at most [`MAX_DEVICE_ID_BYTES`]). The event time is checked apart, against when the
/// reading arrived ([`EventTimeBounds`]).
pub fn validate(reading: &SensorReading) -> Result<(), InvalidReading> {
    if reading.device_id.is_empty() {
        return Err(InvalidReading::Missing { field: "device_id".into() });
    }
    check_device_id_length("device_id", &reading.device_id)?;
    for signal in signals() {
        signal.check(signal.get(reading))?;
    }
    Ok(())
}

/// Refuses a device id longer than [`MAX_DEVICE_ID_BYTES`] (without echoing it).
pub fn check_device_id_length(field: &str, id: &str) -> Result<(), InvalidReading> {
    if id.len() > MAX_DEVICE_ID_BYTES {
        return Err(InvalidReading::TooLong { field: field.to_owned(), bytes: id.len(), max: MAX_DEVICE_ID_BYTES });
    }
    Ok(())
}

/// The JSON spelling of a fault kind: the enum name without its prefix, lowercase
/// (`FAULT_KIND_TIRE_PRESSURE_LOSS` is `tire_pressure_loss`).
pub fn fault_name(kind: FaultKind) -> String {
    kind.as_str_name().trim_start_matches("FAULT_KIND_").to_ascii_lowercase()
}

/// The fault kind a JSON spelling names (see [`fault_name`]).
pub fn fault_from_name(name: &str) -> Option<FaultKind> {
    FaultKind::from_str_name(&format!("FAULT_KIND_{}", name.to_ascii_uppercase()))
}
