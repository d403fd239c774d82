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
    // Big calls run on a plan of their own (see savedmodel's plan.rs); both plans are
    // checked against TensorFlow below.
    assert!(plan.has_large_batch_plan(), "v3 gets a large-batch plan");
    let k = expected["window"].as_u64().unwrap() as usize;
    // The signature says the window: every input is [-1, k].
    for (name, input) in &plan.spec().inputs {
        assert_eq!(window_length(input.shape.as_deref()), Ok(Some(k)), "input {name}");
    }
    let threshold = expected["threshold"].as_f64().unwrap() as f32;
    let stretches = golden["sequences"].as_array().unwrap();
    assert!(stretches.len() >= 7, "a healthy car and one of every fault kind");
    // Every stretch's readings, each with its window's values per signal and TensorFlow's score.
    let mut readings: Vec<SensorReading> = Vec::new();
    let mut columns: Vec<Vec<f32>> = vec![Vec::new(); plan.spec().inputs.len()];
    let mut tf_scores: Vec<f32> = Vec::new();
    let mut stretch_rows = Vec::new();
    for (stretch, scores) in stretches.iter().zip(expected["sequence_scores"].as_array().unwrap()) {
        let stretch: Vec<SensorReading> = stretch
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
        let pushed: Vec<_> = stretch.iter().map(|r| windows.push(r)).collect();
        for (column, name) in columns.iter_mut().zip(plan.spec().inputs.keys()) {
            let index = sensor::signals().iter().position(|s| s.name == name).unwrap();
            for window in &pushed {
                window.extend_signal(index, k, column);
            }
        }
        stretch_rows.push(readings.len()..readings.len() + stretch.len());
        tf_scores.extend(scores.as_array().unwrap().iter().map(|s| s.as_f64().unwrap() as f32));
        readings.extend(stretch);
    }
    assert_eq!(tf_scores.len(), readings.len());
    // Rows `range` of every input, scored in one call: (scores, thresholds).
    let score = |range: std::ops::Range<usize>| {
        let inputs: Vec<(String, Tensor)> = plan
            .spec()
            .inputs
            .keys()
            .zip(&columns)
            .map(|(name, column)| {
                let values = &column[range.start * k..range.end * k];
                (name.clone(), Tensor::from_shape(&[range.len(), k], values).unwrap())
            })
            .collect();
        let outputs = plan.run(inputs).unwrap();
        let column = |key: &str| outputs[key].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        (column("anomaly_score"), column("threshold"))
    };
    // A stretch a call (fewer rows than LARGE_BATCH: the general plan), then all in one.
    assert!(stretch_rows.iter().all(|r| r.len() < savedmodel::LARGE_BATCH));
    assert!(readings.len() >= savedmodel::LARGE_BATCH);
    let mut by_stretch = (Vec::new(), Vec::new());
    for range in &stretch_rows {
        let (scores, thresholds) = score(range.clone());
        by_stretch.0.extend(scores);
        by_stretch.1.extend(thresholds);
    }
    let mut flagged_faulty = 0;
    for (plan_name, (scores, thresholds)) in [("general", by_stretch), ("large-batch", score(0..readings.len()))] {
        for (i, (reading, (score, tf))) in readings.iter().zip(scores.iter().zip(&tf_scores)).enumerate() {
            assert!(
                (score - tf).abs() <= 1e-4 * tf.abs().max(1.0),
                "{plan_name} plan, {} reading {i}: {score} vs TensorFlow's {tf}",
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
