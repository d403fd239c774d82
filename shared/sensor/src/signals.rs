//! The 18 signals of a reading, their units and valid ranges, as `sensor.proto` declares
//! them in its `signal` field options. Read from the compiled descriptor once, so the
//! ranges are never restated in Rust.
//!
//! Values are reached by name through an accessor table: the one place the field names
//! appear in Rust, checked against the descriptor when the table is built (a field added
//! to the proto without an accessor, or the reverse, fails at start-up and in tests).

use std::sync::LazyLock;

use prost_reflect::{DescriptorPool, Value};

use crate::{InvalidReading, SensorReading};

/// One signal: its field name, unit, valid range and what it measures.
#[derive(Debug, Clone)]
pub struct Signal {
    pub name: &'static str,
    pub unit: String,
    pub min: f64,
    pub max: f64,
    pub description: String,
    /// Whole numbers only (the firmware version).
    pub integer: bool,
    get: fn(&SensorReading) -> f64,
    set: fn(&mut SensorReading, f64),
}

impl Signal {
    /// This signal's value in `reading`.
    pub fn get(&self, reading: &SensorReading) -> f64 {
        (self.get)(reading)
    }

    /// Sets this signal in `reading` (rounded and saturated for the integer one).
    pub fn set(&self, reading: &mut SensorReading, value: f64) {
        (self.set)(reading, value)
    }

    /// This signal's value in `reading` as text for JSON and CSV: the whole number for the
    /// integer signal, otherwise f32's shortest text that parses back to the same f32.
    pub fn display(&self, reading: &SensorReading) -> impl std::fmt::Display + use<> {
        let value = self.get(reading);
        if self.integer { Text::Whole(value as u64) } else { Text::Float(value as f32) }
    }

    /// `Ok` if `value` is a value a working sensor can report for this signal.
    pub fn check(&self, value: f64) -> Result<(), InvalidReading> {
        if !value.is_finite() || value < self.min || value > self.max {
            return Err(InvalidReading::OutOfRange {
                field: self.name.to_owned(),
                value,
                min: self.min,
                max: self.max,
                unit: self.unit.clone(),
            });
        }
        if self.integer && value.fract() != 0.0 {
            return Err(InvalidReading::BadValue {
                field: self.name.to_owned(),
                problem: format!("{value} is not a whole number"),
            });
        }
        Ok(())
    }
}

enum Text {
    Whole(u64),
    Float(f32),
}

impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Whole(v) => v.fmt(f),
            Self::Float(v) => v.fmt(f),
        }
    }
}

/// Every signal, in the order the proto declares them.
pub fn signals() -> &'static [Signal] {
    &SIGNALS
}

/// The signal with this field name.
pub fn signal(name: &str) -> Option<&'static Signal> {
    SIGNALS.iter().find(|s| s.name == name)
}

type Accessor = (&'static str, fn(&SensorReading) -> f64, fn(&mut SensorReading, f64));

macro_rules! accessors {
    ($($field:ident),* ; $($int_field:ident),*) => {
        [
            $((stringify!($field), |r: &SensorReading| f64::from(r.$field), |r: &mut SensorReading, v: f64| r.$field = v as f32),)*
            $((stringify!($int_field), |r: &SensorReading| f64::from(r.$int_field), |r: &mut SensorReading, v: f64| r.$int_field = v.round() as u32),)*
        ]
    };
}

const ACCESSORS: [Accessor; 18] = accessors!(
    coolant_temp, intake_air_temp, intake_air_flow_speed, battery_percentage, battery_voltage, current_draw,
    speed, engine_vibration_amplitude, throttle_pos, tire_pressure_1_1, tire_pressure_1_2, tire_pressure_2_1,
    tire_pressure_2_2, accelerometer_1_1_value, accelerometer_1_2_value, accelerometer_2_1_value,
    accelerometer_2_2_value;
    control_unit_firmware
);

static SIGNALS: LazyLock<Vec<Signal>> =
    LazyLock::new(|| load(proto::FILE_DESCRIPTOR_SET).expect("sensor.proto's signal options are consistent"));

fn load(descriptors: &[u8]) -> Result<Vec<Signal>, String> {
    let pool = DescriptorPool::decode(descriptors).map_err(|e| format!("descriptor set: {e}"))?;
    let message = pool
        .get_message_by_name("vigil.sensor.v1.SensorReading")
        .ok_or("vigil.sensor.v1.SensorReading is not in the descriptor set")?;
    let extension =
        pool.get_extension_by_name("vigil.sensor.v1.signal").ok_or("the vigil.sensor.v1.signal option is missing")?;
    let mut signals = Vec::new();
    for field in message.fields() {
        let options = field.options();
        if !options.has_extension(&extension) {
            continue;
        }
        let spec = options.get_extension(&extension);
        let spec = spec.as_message().ok_or("the signal option is not a message")?;
        let text = |name: &str| spec.get_field_by_name(name).and_then(|v| v.as_str().map(str::to_owned));
        let number = |name: &str| match spec.get_field_by_name(name).as_deref() {
            Some(Value::F64(v)) => Ok(*v),
            _ => Err(format!("{}: signal option without {name}", field.name())),
        };
        let &(name, get, set) = ACCESSORS
            .iter()
            .find(|(name, ..)| *name == field.name())
            .ok_or_else(|| format!("{}: a signal without an accessor in signals.rs", field.name()))?;
        let (min, max) = (number("min")?, number("max")?);
        if min >= max {
            return Err(format!("{name}: min {min} is not below max {max}"));
        }
        signals.push(Signal {
            name,
            unit: text("unit").unwrap_or_default(),
            min,
            max,
            description: text("description").unwrap_or_default(),
            integer: !matches!(field.kind(), prost_reflect::Kind::Float | prost_reflect::Kind::Double),
            get,
            set,
        });
    }
    if signals.len() != ACCESSORS.len() {
        let declared: Vec<_> = signals.iter().map(|s| s.name).collect();
        let missing: Vec<_> = ACCESSORS.iter().map(|a| a.0).filter(|n| !declared.contains(n)).collect();
        return Err(format!("accessors without a signal option in sensor.proto: {missing:?}"));
    }
    Ok(signals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_signal_has_a_unit_range_and_accessor_in_proto_order() {
        let names: Vec<_> = signals().iter().map(|s| s.name).collect();
        assert_eq!(names.len(), 18);
        assert_eq!(names[0], "coolant_temp");
        assert_eq!(names[17], "control_unit_firmware");
        let coolant = signal("coolant_temp").unwrap();
        assert_eq!((coolant.unit.as_str(), coolant.min, coolant.max), ("degC", -40.0, 150.0));
        assert!(signal("control_unit_firmware").unwrap().integer);
        assert!(!signal("speed").unwrap().integer);
        // Each accessor reaches its own field: set distinct values, read them back.
        let mut reading = SensorReading::default();
        for (i, s) in signals().iter().enumerate() {
            s.set(&mut reading, i as f64);
        }
        for (i, s) in signals().iter().enumerate() {
            assert_eq!(s.get(&reading), i as f64, "{}", s.name);
        }
    }

    #[test]
    fn a_range_check_names_the_field_value_range_and_unit() {
        let error = signal("coolant_temp").unwrap().check(262.26807).unwrap_err();
        assert_eq!(error.to_string(), "field coolant_temp is 262.26807, outside its valid range [-40, 150] degC");
        assert!(signal("throttle_pos").unwrap().check(f64::NAN).is_err());
        let error = signal("control_unit_firmware").unwrap().check(2000.5).unwrap_err();
        assert_eq!(error.to_string(), "field control_unit_firmware: 2000.5 is not a whole number");
    }
}
