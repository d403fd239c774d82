//! Payload parsing: Vigil's own JSON round-trips exactly, the seed demo's payloads are
//! accepted as published, and every rejection names the field and the problem.

use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use sensor::json::{Envelope, parse, to_json};
use sensor::{FaultKind, InvalidReading, SensorReading, signals};

fn envelope(topic_device_id: Option<&str>) -> Envelope<'_> {
    Envelope { topic_device_id, received_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_057_600_250) }
}

/// A valid reading with every signal in the middle of its range.
fn valid() -> SensorReading {
    let mut reading = SensorReading {
        device_id: "car-00042".into(),
        event_time: Some(prost_types::Timestamp { seconds: 1_764_057_000, nanos: 5_000_000 }),
        sequence: 7,
        ..Default::default()
    };
    for signal in signals() {
        signal.set(&mut reading, (signal.min / 2.0 + signal.max / 2.0).round());
    }
    reading
}

fn object(reading: &SensorReading) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::from_str(&to_json(reading)).unwrap() {
        serde_json::Value::Object(o) => o,
        _ => unreachable!("to_json writes an object"),
    }
}

fn parse_object(
    o: &serde_json::Map<String, serde_json::Value>,
    topic: Option<&str>,
) -> Result<SensorReading, InvalidReading> {
    parse(serde_json::to_string(o).unwrap().as_bytes(), &envelope(topic))
}

#[test]
fn a_payload_in_the_seed_demos_form_is_accepted_as_published() {
    // The seed's publisher: no device id or time, every signal twice (snake_case with
    // `_1_1` and camelCase), whole-number tyre pressures, a string label.
    let payload = br#"{"coolant_temp":88.5,"intake_air_temp":18.75,"intake_air_flow_speed":15.5,
        "battery_percentage":35.25,"battery_voltage":398.5,"current_draw":23.5,"speed":9.75,
        "engine_vibration_amplitude":978.0,"throttle_pos":0.5,"tire_pressure_1_1":33,"tire_pressure_1_2":30,
        "tire_pressure_2_1":30,"tire_pressure_2_2":33,"accelerometer_1_1_value":0.25,"accelerometer_1_2_value":0.5,
        "accelerometer_2_1_value":0.75,"accelerometer_2_2_value":0.625,"control_unit_firmware":2000,
        "coolantTemp":88.5,"intakeAirTemp":18.75,"tirePressure11":33,"accelerometer11Value":0.25,
        "controlUnitFirmware":2000,"failure_occurred":"false"}"#;
    let reading = parse(payload, &envelope(Some("car7"))).unwrap();
    assert_eq!(reading.device_id, "car7", "the device id comes from the topic");
    assert_eq!(reading.event_time.unwrap().seconds, 1_764_057_600, "arrival time stands in for the event time");
    assert_eq!(reading.event_time.unwrap().nanos, 250_000_000);
    assert_eq!(reading.coolant_temp, 88.5);
    assert_eq!(reading.tire_pressure_1_1, 33.0);
    assert_eq!(reading.accelerometer_2_2_value, 0.625);
    assert_eq!(reading.control_unit_firmware, 2000);
    assert_eq!(reading.fault(), FaultKind::None);
    assert_eq!(reading.sequence, 0);
}

#[test]
fn the_seeds_squashed_and_camel_case_spellings_each_work_alone() {
    let reading = valid();
    for (from, to) in [
        ("tire_pressure_1_1", "tire_pressure11"),
        ("tire_pressure_2_2", "tirePressure22"),
        ("accelerometer_1_2_value", "accelerometer12_value"),
        ("accelerometer_2_1_value", "accelerometer21Value"),
        ("coolant_temp", "coolantTemp"),
    ] {
        let mut o = object(&reading);
        let value = o.remove(from).unwrap();
        o.insert(to.into(), value);
        assert_eq!(parse_object(&o, None).unwrap(), reading, "{to}");
    }
}

#[test]
fn failure_occurred_becomes_a_label_and_fault_kinds_are_read_by_name() {
    let mut o = object(&valid());
    o.insert("failure_occurred".into(), "true".into());
    assert_eq!(parse_object(&o, None).unwrap().fault(), FaultKind::Unknown);
    o.remove("failure_occurred");
    o.insert("fault".into(), "tire_pressure_loss".into());
    assert_eq!(parse_object(&o, None).unwrap().fault(), FaultKind::TirePressureLoss);
    o.insert("failure_occurred".into(), "false".into());
    let error = parse_object(&o, None).unwrap_err();
    assert_eq!(error.to_string(), "field failure_occurred: false contradicts fault \"tire_pressure_loss\"");
    o.remove("failure_occurred");
    o.insert("fault".into(), "flat".into());
    let error = parse_object(&o, None).unwrap_err().to_string();
    assert!(
        error.starts_with("field fault: \"flat\" is not a fault kind (one of: none, unknown, shock_absorber"),
        "{error}"
    );
}

#[test]
fn every_rejection_names_the_field_and_the_problem() {
    let reading = valid();
    type Change = Box<dyn Fn(&mut serde_json::Map<String, serde_json::Value>)>;
    let cases: Vec<(Change, &str)> = vec![
        (Box::new(|o| drop(o.remove("speed"))), "field speed is missing"),
        (
            Box::new(|o| {
                o.remove("coolant_temp");
                o.insert("coolantTemp".into(), 262.26807.into());
            }),
            "field coolantTemp is 262.26807, outside its valid range [-40, 150] degC",
        ),
        (
            Box::new(|o| {
                o.remove("battery_percentage");
                o.insert("batteryPercentage".into(), (-29.9).into());
            }),
            "field batteryPercentage is -29.9, outside its valid range [0, 100] %",
        ),
        (
            Box::new(|o| drop(o.insert("tirePressure11".into(), 12.into()))),
            "field tire_pressure_1_1: tire_pressure_1_1 is 40 but tirePressure11 is 12; send one",
        ),
        (
            Box::new(|o| drop(o.insert("throttle_pos".into(), "0.5".into()))),
            "field throttle_pos: expected a number, got a string (\"0.5\")",
        ),
        (
            Box::new(|o| drop(o.insert("control_unit_firmware".into(), 2000.5.into()))),
            "field control_unit_firmware: 2000.5 is not a whole number",
        ),
        (
            Box::new(|o| drop(o.insert("event_time".into(), "yesterday".into()))),
            "field event_time: \"yesterday\" is not an RFC 3339 time such as \"2026-11-25T08:00:00.250Z\"",
        ),
        (
            Box::new(|o| drop(o.insert("sequence".into(), (-1).into()))),
            "field sequence: expected a non-negative integer, got a number (-1)",
        ),
    ];
    for (change, expected) in cases {
        let mut o = object(&reading);
        change(&mut o);
        assert_eq!(parse_object(&o, None).unwrap_err().to_string(), expected);
    }
    // The device id: from the payload or the topic, never two different ones, never none.
    let mut o = object(&reading);
    assert_eq!(
        parse_object(&o, Some("car-00043")).unwrap_err().to_string(),
        "field device_id: \"car-00042\" differs from the topic's device id \"car-00043\""
    );
    o.remove("device_id");
    assert_eq!(
        parse_object(&o, None).unwrap_err().to_string(),
        "field device_id (not in the payload, none in the topic) is missing"
    );
    assert_eq!(parse(b"{\"speed\": 1", &envelope(None)).unwrap_err().field(), None);
    assert!(matches!(parse(b"{\"speed\": 1", &envelope(None)), Err(InvalidReading::NotJson(_))));
    assert_eq!(parse(b"[1, 2]", &envelope(None)), Err(InvalidReading::NotAnObject));
}

fn any_reading() -> impl Strategy<Value = SensorReading> {
    let strategies: Vec<_> = signals()
        .iter()
        .map(|s| {
            if s.integer {
                (s.min as u64..=s.max as u64).prop_map(|v| v as f64).boxed()
            } else {
                (s.min..=s.max).prop_map(|v| f64::from(v as f32)).boxed()
            }
        })
        .collect();
    ("[a-z][a-z0-9-]{0,20}", 0i64..4_102_444_800, 0i32..1_000_000_000, any::<u64>(), 0i32..=8, strategies).prop_map(
        |(device_id, seconds, nanos, sequence, fault, values)| {
            let mut reading = SensorReading {
                device_id,
                event_time: Some(prost_types::Timestamp { seconds, nanos }),
                sequence,
                fault,
                ..Default::default()
            };
            for (signal, value) in signals().iter().zip(values) {
                // The range ends as f32 may fall just outside the f64 range; keep inside.
                let value = if (value as f32 as f64) < signal.min || value > signal.max { signal.min } else { value };
                signal.set(&mut reading, value);
            }
            reading
        },
    )
}

proptest! {
    #[test]
    fn vigils_json_round_trips_every_valid_reading_exactly(reading in any_reading()) {
        let json = to_json(&reading);
        let parsed = parse(json.as_bytes(), &envelope(None));
        prop_assert_eq!(parsed, Ok(reading), "{}", json);
    }
}
