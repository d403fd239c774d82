//! The bundled windowed model (`car-anomaly` version 3) against the processor's own
//! windows, without TensorFlow: stretches of consecutive hold-out readings, pushed through
//! [`Windows`] as a partition worker pushes them, give TensorFlow's scores
//! (`tests/fixtures/car_anomaly_golden.json`, written by the training script, which builds
//! its windows by the same rule: a device's first readings padded with its oldest).

use std::path::PathBuf;
use std::time::SystemTime;

use savedmodel::{SavedModel, Tensor};
use sensor::SensorReading;
use sensor::json::{Envelope, parse};
use stream_processor::config::WindowConfig;
use stream_processor::windows::{Windows, window_length};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn the_processors_windows_give_tensorflows_scores() {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/car_anomaly_golden.json")).unwrap())
            .unwrap();
    let expected = &golden["versions"]["3"];
    let plan = SavedModel::open(root().join("deploy/models/car-anomaly/3")).unwrap().load("serving_default").unwrap();
    let k = expected["window"].as_u64().unwrap() as usize;
    // The signature says the window: every input is [-1, k].
    for (name, input) in &plan.spec().inputs {
        assert_eq!(window_length(input.shape.as_deref()), Ok(Some(k)), "input {name}");
    }
    let threshold = expected["threshold"].as_f64().unwrap() as f32;
    let stretches = golden["sequences"].as_array().unwrap();
    assert!(stretches.len() >= 7, "a healthy car and one of every fault kind");
    let mut flagged_faulty = 0;
    for (stretch, tf_scores) in stretches.iter().zip(expected["sequence_scores"].as_array().unwrap()) {
        let readings: Vec<SensorReading> = stretch
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let envelope = Envelope { topic_device_id: None, received_at: SystemTime::now() };
                parse(r.to_string().as_bytes(), &envelope).unwrap()
            })
            .collect();
        let mut windows = Windows::new(&WindowConfig::default());
        windows.set_keep(k);
        let pushed: Vec<_> = readings.iter().map(|r| windows.push(r)).collect();
        let inputs: Vec<(String, Tensor)> = plan
            .spec()
            .inputs
            .keys()
            .map(|name| {
                let index = sensor::signals().iter().position(|s| s.name == name).unwrap();
                let mut values = Vec::new();
                for window in &pushed {
                    window.extend_signal(index, k, &mut values);
                }
                (name.clone(), Tensor::from_shape(&[readings.len(), k], &values).unwrap())
            })
            .collect();
        let outputs = plan.run(inputs).unwrap();
        let ours = outputs["anomaly_score"].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        let thresholds = outputs["threshold"].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        for (i, (reading, (score, tf))) in
            readings.iter().zip(ours.iter().zip(tf_scores.as_array().unwrap())).enumerate()
        {
            let tf = tf.as_f64().unwrap() as f32;
            assert!(
                (score - tf).abs() <= 1e-4 * tf.abs().max(1.0),
                "{} reading {i}: {score} vs TensorFlow's {tf}",
                reading.device_id
            );
            assert_eq!(thresholds[i], threshold);
            if reading.fault() != sensor::FaultKind::None && *score > threshold {
                flagged_faulty += 1;
            }
        }
    }
    // Not a parity matter, but the stretches do show faults being caught.
    assert!(flagged_faulty > 0, "some faulty reading of the stretches is flagged");
}
