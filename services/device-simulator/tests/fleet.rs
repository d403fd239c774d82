//! The simulated fleet: reproducible for a seed, every reading valid under the schema, and
//! every fault labelled from its onset and visible in the signals it should change
//! (checked against the same car without the fault, which drives identically).

use std::time::SystemTime;

use device_simulator::car::{Car, FaultPlan, RAMP_S};
use device_simulator::fleet::{FAULT_KINDS, Fleet, FleetOptions};
use prost_types::Timestamp;
use sensor::json::{Envelope, parse, to_json};
use sensor::{FaultKind, SensorReading};

const START: Timestamp = Timestamp { seconds: 1_767_225_600, nanos: 0 };

fn run(options: &FleetOptions, steps: usize) -> Vec<SensorReading> {
    let mut fleet = Fleet::new(options, START);
    (0..steps).flat_map(|_| fleet.step(1.0)).collect()
}

#[test]
fn the_same_seed_gives_the_same_fleet_and_another_seed_a_different_one() {
    let options = FleetOptions { cars: 30, fault_share: 0.5, ..FleetOptions::default() };
    let first = run(&options, 200);
    assert_eq!(first, run(&options, 200));
    let other = run(&FleetOptions { seed: options.seed + 1, ..options.clone() }, 200);
    assert_eq!(first.len(), other.len());
    assert!(first.iter().zip(&other).filter(|(a, b)| a == b).count() < first.len() / 100);
}

#[test]
fn a_cars_driving_does_not_depend_on_the_fleets_size_or_fault_share() {
    let small = run(&FleetOptions { cars: 3, fault_share: 0.0, ..FleetOptions::default() }, 100);
    let large = run(&FleetOptions { cars: 40, fault_share: 0.0, ..FleetOptions::default() }, 100);
    let car2 = |readings: &[SensorReading]| -> Vec<SensorReading> {
        readings.iter().filter(|r| r.device_id == "car-00002").cloned().collect()
    };
    assert_eq!(car2(&small), car2(&large));
}

#[test]
fn every_reading_is_valid_and_round_trips_through_vigils_json() {
    let options = FleetOptions { cars: 60, fault_share: 1.0, onset_window_s: (5.0, 300.0), ..FleetOptions::default() };
    let readings = run(&options, 900);
    let mut kinds = std::collections::BTreeSet::new();
    for reading in &readings {
        sensor::validate(reading).unwrap_or_else(|e| panic!("{e}: {reading:?}"));
        let envelope = Envelope { topic_device_id: Some(&reading.device_id), received_at: SystemTime::now() };
        assert_eq!(&parse(to_json(reading).as_bytes(), &envelope).unwrap(), reading);
        kinds.insert(reading.fault);
    }
    let expected: std::collections::BTreeSet<i32> =
        FAULT_KINDS.iter().chain([&FaultKind::None]).map(|k| *k as i32).collect();
    assert_eq!(kinds, expected, "every fault kind occurs, and healthy readings");
}

/// A car with `kind` from second 100 on, and the same car healthy, for 400 seconds.
fn with_twin(kind: FaultKind) -> (Vec<SensorReading>, Vec<SensorReading>) {
    let plan = FaultPlan { kind, onset_s: 100.0, target: 2 };
    let mut faulty = Car::new(7, 42, Some(plan));
    let mut healthy = Car::new(7, 42, None);
    (0..400).map(|_| (faulty.step(1.0, &START), healthy.step(1.0, &START))).unzip()
}

fn after_ramp(readings: &[SensorReading]) -> impl Iterator<Item = &SensorReading> + Clone {
    readings.iter().skip(100 + RAMP_S as usize)
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let values: Vec<f64> = values.collect();
    values.iter().sum::<f64>() / values.len() as f64
}

fn std_dev(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = mean(values.clone());
    mean(values.map(|v| (v - m).powi(2))).sqrt()
}

#[test]
fn each_fault_is_labelled_from_its_onset_and_shows_in_its_signals() {
    for kind in FAULT_KINDS {
        let (faulty, healthy) = with_twin(kind);
        // Identical until the onset, then labelled with its kind on every reading.
        assert_eq!(faulty[..99], healthy[..99], "{kind:?}: the twins drive alike before the onset");
        assert!(faulty[99..].iter().all(|r| r.fault() == kind), "{kind:?}");
        assert!(healthy.iter().all(|r| r.fault() == FaultKind::None));
        let (f, h) = (after_ramp(&faulty), after_ramp(&healthy));
        match kind {
            FaultKind::ShockAbsorber => {
                let (af, ah) = (
                    mean(f.map(|r| f64::from(r.accelerometer_2_1_value))),
                    mean(h.map(|r| f64::from(r.accelerometer_2_1_value))),
                );
                assert!(af > 3.5 * ah, "rear-left wheel RMS acceleration {af} vs healthy {ah}");
            }
            FaultKind::TirePressureLoss => {
                let lost = mean(h.zip(f).map(|(h, f)| f64::from(h.tire_pressure_2_1 - f.tire_pressure_2_1)));
                assert!(lost > 14.0, "rear-left tyre lost {lost} psi");
            }
            FaultKind::DriveShaftWear => {
                let moving = |r: &&SensorReading| r.speed > 5.0;
                let per_speed = |rs: &mut dyn Iterator<Item = &SensorReading>| {
                    mean(rs.filter(moving).map(|r| f64::from(r.engine_vibration_amplitude / r.speed)))
                };
                let (vf, vh) = (per_speed(&mut f.clone()), per_speed(&mut h.clone()));
                assert!(vf > 1.6 * vh, "vibration per m/s {vf} vs healthy {vh}");
            }
            FaultKind::Overheating => {
                let hottest = faulty.iter().map(|r| r.coolant_temp).fold(f32::MIN, f32::max);
                let healthy_hottest = healthy.iter().map(|r| r.coolant_temp).fold(f32::MIN, f32::max);
                assert!(hottest > 125.0 && healthy_hottest < 100.0, "{hottest} vs {healthy_hottest}");
            }
            FaultKind::BatteryFailure => {
                // Under load a failing battery's voltage sags well below the healthy one's.
                let sag = mean(
                    h.zip(f)
                        .filter(|(h, f)| h.current_draw > 20.0 && f.current_draw > 20.0)
                        .map(|(h, f)| f64::from(h.battery_voltage - f.battery_voltage)),
                );
                assert!(sag > 8.0, "voltage sag under load {sag} V");
            }
            FaultKind::StuckSensor => {
                // Target 2 is the speed sensor: reading zero while the car keeps moving.
                assert!(faulty[99..].iter().all(|r| r.speed == 0.0), "a stuck speed sensor reads 0");
                assert!(std_dev(h.map(|r| f64::from(r.speed))) > 1.0, "the healthy car's speed varies");
            }
            other => unreachable!("{other:?} is not injected"),
        }
    }
}
