//! The bundled anomaly model (`deploy/models/car-anomaly`, trained and exported by
//! `deploy/models/train_car_anomaly.py`) against this simulator, without TensorFlow:
//! the Rust path from a reading to the model's inputs gives TensorFlow's own scores, and on
//! a fleet simulated fresh (a seed the training never saw) it separates faulty readings
//! from healthy ones.

use std::path::PathBuf;
use std::time::SystemTime;

use device_simulator::fleet::{Fleet, FleetOptions};
use prost_types::Timestamp;
use savedmodel::{SavedModel, SignaturePlan, Tensor};
use sensor::json::{Envelope, parse};
use sensor::{FaultKind, SensorReading};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn load(version: u32) -> SignaturePlan {
    let dir = root().join(format!("deploy/models/car-anomaly/{version}"));
    SavedModel::open(&dir).unwrap().load("serving_default").unwrap()
}

/// The model's inputs for a batch of readings: one tensor per signature input, each
/// signal found by the input's name. This is the whole preprocessing; scaling is in the
/// graph.
fn inputs(plan: &SignaturePlan, readings: &[SensorReading]) -> Vec<(String, Tensor)> {
    plan.spec()
        .inputs
        .keys()
        .map(|name| {
            let signal = sensor::signal(name).unwrap_or_else(|| panic!("model input {name} is not a signal"));
            let values: Vec<f32> = readings.iter().map(|r| signal.get(r) as f32).collect();
            (name.clone(), Tensor::from_shape(&[readings.len()], &values).unwrap())
        })
        .collect()
}

/// (anomaly_score, threshold) per reading.
fn score(plan: &SignaturePlan, readings: &[SensorReading]) -> Vec<(f32, f32)> {
    let outputs = plan.run(inputs(plan, readings)).unwrap();
    let column = |name: &str| outputs[name].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
    column("anomaly_score").into_iter().zip(column("threshold")).collect()
}

#[test]
fn rust_preprocessing_gives_tensorflows_scores_for_both_versions() {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/car_anomaly_golden.json")).unwrap())
            .unwrap();
    let readings: Vec<SensorReading> = golden["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let envelope = Envelope { topic_device_id: None, received_at: SystemTime::now() };
            parse(r.to_string().as_bytes(), &envelope).unwrap()
        })
        .collect();
    for version in [1, 2] {
        let expected = &golden["versions"][version.to_string()];
        let ours = score(&load(version), &readings);
        for (i, ((score, threshold), tf)) in ours.iter().zip(expected["anomaly_score"].as_array().unwrap()).enumerate()
        {
            let tf = tf.as_f64().unwrap() as f32;
            assert!(
                (score - tf).abs() <= 1e-4 * tf.abs().max(1.0),
                "v{version} reading {i}: {score} vs TensorFlow's {tf}"
            );
            assert_eq!(*threshold, expected["threshold"].as_f64().unwrap() as f32);
        }
    }
}

#[test]
fn on_a_fresh_fleet_the_bundled_model_flags_faults_and_spares_healthy_readings() {
    // Seed 3003 is not one the training script uses (1001, 1002, 2002).
    let options =
        FleetOptions { cars: 60, seed: 3003, fault_share: 0.3, onset_window_s: (60.0, 800.0), ..Default::default() };
    let mut fleet = Fleet::new(&options, Timestamp { seconds: 1_767_225_600, nanos: 0 });
    let readings: Vec<SensorReading> = (0..1200).flat_map(|_| fleet.step(1.0)).collect();
    for (version, min_recall) in [(1, 0.95), (2, 0.95)] {
        let plan = load(version);
        let (mut tp, mut fp, mut fn_) = (0u32, 0u32, 0u32);
        for chunk in readings.chunks(4096) {
            for (reading, (score, threshold)) in chunk.iter().zip(score(&plan, chunk)) {
                let faulty = reading.fault() != FaultKind::None;
                match (score > threshold, faulty) {
                    (true, true) => tp += 1,
                    (true, false) => fp += 1,
                    (false, true) => fn_ += 1,
                    (false, false) => {}
                }
            }
        }
        let precision = f64::from(tp) / f64::from(tp + fp);
        let recall = f64::from(tp) / f64::from(tp + fn_);
        eprintln!("car-anomaly v{version}: precision {precision:.4} recall {recall:.4} ({tp} tp, {fp} fp, {fn_} fn)");
        assert!(precision >= 0.95, "v{version} precision {precision}");
        // Measured 0.972 (v1) and 0.976 (v2) on this fleet. What is missed is mostly stuck
        // speed/throttle sensors and drive-shaft wear at low speed, which read like a
        // healthy car in a single reading (see deploy/models/car-anomaly/evaluation.md).
        assert!(recall >= min_recall, "v{version} recall {recall}");
    }
}
