//! Parity with TensorFlow: every fixture under tests/fixtures/savedmodels (exported by
//! TensorFlow 2.21 itself, see tests/fixtures/export_savedmodels.py) must load and
//! reproduce the golden outputs TensorFlow computed, at every recorded batch size, to
//! within 1e-5 absolute for floats and exactly for integers.
//!
//! Two kinds of fixture check the large-batch plan itself: the keras_conv1d and
//! elementwise_ops ones get one (a dense network does not: its second plan is the same).

mod golden;

use golden::{Golden, fixture_dir};
use savedmodel::SavedModel;

/// Maximum absolute difference allowed between the engine and TensorFlow.
const TOLERANCE: f64 = 1e-5;

fn assert_parity(fixture: &str) {
    let golden = Golden::read(fixture);
    let model = SavedModel::open(fixture_dir(fixture)).unwrap();
    let spec = &model.signatures()[&golden.signature];
    for (key, expected) in &golden.inputs {
        assert_eq!(spec.inputs[key].describe(), expected.describe(), "{fixture}: input {key} metadata");
    }
    for (key, expected) in &golden.outputs {
        assert_eq!(spec.outputs[key].describe(), expected.describe(), "{fixture}: output {key} metadata");
    }
    assert_eq!(spec.inputs.len(), golden.inputs.len(), "{fixture}: input count");
    assert_eq!(spec.outputs.len(), golden.outputs.len(), "{fixture}: output count");

    // The plans serve every batch size: they are built once, outside the loop. Where a
    // signature has a large-batch plan, the recorded batches cover both plans.
    let plan = model.load(&golden.signature).unwrap();
    if plan.has_large_batch_plan() {
        let batches: Vec<usize> = golden.cases.iter().map(|c| c.batch()).collect();
        assert!(
            batches.iter().any(|&b| b < savedmodel::LARGE_BATCH)
                && batches.iter().any(|&b| b >= savedmodel::LARGE_BATCH),
            "{fixture}: batches {batches:?} run one of the two plans only"
        );
    }
    for case in &golden.cases {
        let inputs = case.inputs.iter().map(|(k, v)| (k.clone(), v.to_tensor()));
        let outputs = plan.run(inputs).unwrap();
        assert_eq!(outputs.len(), case.outputs.len(), "{fixture}: output count");
        for (key, expected) in &case.outputs {
            let actual = &outputs[key];
            let batch = case.batch();
            assert_eq!(actual.shape(), expected.shape.as_slice(), "{fixture}: shape of {key} at batch {batch}");
            let diff = expected.max_abs_diff(actual);
            assert!(
                diff <= TOLERANCE,
                "{fixture}: output {key} at batch {batch} differs from TensorFlow by {diff:e} (> {TOLERANCE:e})"
            );
        }
    }
}

#[test]
fn keras_dense_autoencoder_matches_tensorflow() {
    assert_parity("autoencoder");
}

#[test]
fn keras_batchnorm_and_dropout_match_tensorflow() {
    assert_parity("keras_batchnorm_dropout");
}

#[test]
fn keras_conv1d_pooling_and_reshape_match_tensorflow() {
    assert_parity("keras_conv1d");
}

#[test]
fn keras_activations_match_tensorflow() {
    assert_parity("keras_activations");
}

#[test]
fn tf_module_with_two_inputs_and_two_outputs_matches_tensorflow() {
    assert_parity("module_two_io");
}

#[test]
fn ops_missing_from_tract_are_registered_and_match_tensorflow() {
    assert_parity("elementwise_ops");
}

#[test]
fn float64_int64_and_int32_graphs_match_tensorflow() {
    assert_parity("non_float32");
}

#[test]
fn tf1_simple_save_matches_tensorflow() {
    assert_parity("tf1_simple_save");
}

#[test]
fn keras_export_also_serves_its_serve_signature() {
    let model = SavedModel::open(fixture_dir("autoencoder")).unwrap();
    let names: Vec<_> = model.signatures().keys().cloned().collect();
    assert_eq!(names, ["serve", "serving_default"]);
    let golden = Golden::read("autoencoder");
    let serve = model.load("serve").unwrap();
    let case = &golden.cases[1];
    let out = serve.run(case.inputs.iter().map(|(k, v)| (k.clone(), v.to_tensor()))).unwrap();
    let expected = case.outputs.values().next().unwrap();
    assert!(expected.max_abs_diff(out.values().next().unwrap()) <= TOLERANCE);
}

#[test]
fn broadcasting_graphs_get_a_large_batch_plan_and_dense_ones_do_not() {
    let has_large = |fixture: &str| {
        SavedModel::open(fixture_dir(fixture)).unwrap().load("serving_default").unwrap().has_large_batch_plan()
    };
    assert!(has_large("keras_conv1d"));
    assert!(has_large("elementwise_ops"));
    assert!(!has_large("autoencoder"));
}
