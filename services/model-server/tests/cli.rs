//! The `model-server inspect` / `predict` commands, run as a user runs them: the real
//! binary on the TensorFlow-exported fixtures.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/savedmodels")
}

fn model_server(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_model-server"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn inspect_reports_every_servable_fixture() {
    let servable = [
        ("autoencoder", "sensors", "float32[-1,18]"),
        ("keras_batchnorm_dropout", "features", "float32[-1,10]"),
        ("keras_conv1d", "window", "float32[-1,24]"),
        ("keras_activations", "x", "float32[-1,8]"),
        ("module_two_io", "readings", "float32[-1,4]"),
        ("elementwise_ops", "square", "float32[-1,6]"),
        ("non_float32", "ids", "int64[-1,2]"),
        ("tf1_simple_save", "x", "float32[-1,5]"),
    ];
    for (fixture, key, tensor_type) in servable {
        let dir = fixtures().join(fixture).join("1");
        let out = model_server(&["inspect", dir.to_str().unwrap()], None);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{fixture}: {stdout}{}", text(&out.stderr));
        assert!(stdout.contains("signature \"serving_default\""), "{fixture}: {stdout}");
        let listed = stdout.lines().any(|line| line.split_whitespace().take(2).eq([key, tensor_type]));
        assert!(listed, "{fixture}: expected {key} {tensor_type} in\n{stdout}");
        assert!(stdout.contains("engine: supported"), "{fixture}: {stdout}");
    }
}

#[test]
fn inspect_json_lists_ops_and_variables() {
    let dir = fixtures().join("autoencoder/1");
    let out = model_server(&["inspect", dir.to_str().unwrap(), "--signature", "serving_default", "--json"], None);
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let signature = &report["signatures"][0];
    assert_eq!(signature["name"], "serving_default");
    assert_eq!(signature["frozen_variables"], 8); // 4 kernels + 4 biases
    assert_eq!(signature["supported"], true);
    let ops: Vec<&str> = signature["ops"].as_array().unwrap().iter().map(|o| o["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["BiasAdd", "Const", "MatMul", "Placeholder", "Relu"]);
}

#[test]
fn inspect_flags_an_unsupported_op_and_exits_non_zero() {
    let dir = fixtures().join("unsupported_op/1");
    let out = model_server(&["inspect", dir.to_str().unwrap()], None);
    let stdout = text(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("!BesselI0ex1"), "{stdout}");
    assert!(stdout.contains("engine: NOT SUPPORTED") && stdout.contains("op \"BesselI0e\" (node"), "{stdout}");
}

#[test]
fn inspect_of_a_corrupted_model_prints_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("1");
    std::fs::create_dir_all(&dir).unwrap();
    let original = std::fs::read(fixtures().join("module_two_io/1/saved_model.pb")).unwrap();
    std::fs::write(dir.join("saved_model.pb"), &original[..original.len() / 3]).unwrap();
    let out = model_server(&["inspect", dir.to_str().unwrap()], None);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.starts_with("error: ") && stderr.contains(&format!("{}", dir.join("saved_model.pb").display())),
        "{stderr}"
    );
    assert!(stderr.contains("truncated or not a valid protobuf"), "{stderr}");
}

#[test]
fn predict_runs_one_request_and_matches_tensorflow() {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tf1_simple_save/golden.json")).unwrap())
            .unwrap();
    let case = &golden["cases"][0]; // batch of one
    let x: Vec<f64> = case["inputs"]["x"]["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let expected: Vec<f64> =
        case["outputs"]["y"]["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let request = serde_json::json!({ "instances": [x] }).to_string();
    let dir = fixtures().join("tf1_simple_save/1");
    let out = model_server(&["predict", dir.to_str().unwrap()], Some(&request));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let response: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let y = response["outputs"]["y"][0].as_array().unwrap();
    assert_eq!(y.len(), expected.len());
    for (actual, expected) in y.iter().zip(&expected) {
        assert!((actual.as_f64().unwrap() - expected).abs() <= 1e-5);
    }
}

#[test]
fn predict_with_a_bad_request_names_the_input() {
    let dir: &Path = &fixtures().join("module_two_io/1");
    let request = r#"{"inputs": {"readings": [[1.0, 2.0, 3.0, 4.0]]}}"#;
    let out = model_server(&["predict", dir.to_str().unwrap(), "--request", request], None);
    assert!(!out.status.success());
    assert_eq!(text(&out.stderr).trim(), "error: input \"context\" is missing");
}
