//! Reads the golden files written by tests/fixtures/export_savedmodels.py.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use savedmodel::Tensor;
use serde::Deserialize;

/// `tests/fixtures/savedmodels/<name>` in the workspace.
pub fn fixture_root(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/savedmodels").join(name)
}

/// The version directory TensorFlow exported (`<name>/1`).
pub fn fixture_dir(name: &str) -> PathBuf {
    fixture_root(name).join("1")
}

#[derive(Debug, Deserialize)]
pub struct Spec {
    pub dtype: String,
    pub shape: Option<Vec<i64>>,
}

impl Spec {
    /// Same rendering as `savedmodel::TensorSpec::describe`.
    pub fn describe(&self) -> String {
        match &self.shape {
            Some(dims) => format!("{}[{}]", self.dtype, dims.iter().map(i64::to_string).collect::<Vec<_>>().join(",")),
            None => format!("{}[unknown rank]", self.dtype),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct Values {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

impl Values {
    pub fn to_tensor(&self) -> Tensor {
        let v = &self.values;
        match self.dtype.as_str() {
            "float32" => Tensor::from_shape(&self.shape, &v.iter().map(|&x| x as f32).collect::<Vec<_>>()),
            "float64" => Tensor::from_shape(&self.shape, v),
            "int32" => Tensor::from_shape(&self.shape, &v.iter().map(|&x| x as i32).collect::<Vec<_>>()),
            "int64" => Tensor::from_shape(&self.shape, &v.iter().map(|&x| x as i64).collect::<Vec<_>>()),
            other => panic!("golden dtype {other} not handled"),
        }
        .unwrap()
    }

    /// Max |expected - actual|; integer outputs must also have the same dtype.
    pub fn max_abs_diff(&self, actual: &Tensor) -> f64 {
        let expected_dt = self.to_tensor().datum_type();
        assert_eq!(actual.datum_type(), expected_dt, "dtype");
        let actual = actual.cast_to::<f64>().unwrap();
        let actual = actual.try_as_plain_ram().unwrap();
        let actual = actual.as_slice::<f64>().unwrap();
        assert_eq!(actual.len(), self.values.len(), "element count");
        self.values.iter().zip(actual).map(|(e, a)| (e - a).abs()).fold(0.0, f64::max)
    }
}

#[derive(Debug, Deserialize)]
pub struct Case {
    pub inputs: BTreeMap<String, Values>,
    pub outputs: BTreeMap<String, Values>,
}

impl Case {
    pub fn batch(&self) -> usize {
        self.inputs.values().next().map(|v| v.shape[0]).unwrap_or(0)
    }
}

#[derive(Debug, Deserialize)]
pub struct Golden {
    pub signature: String,
    pub inputs: BTreeMap<String, Spec>,
    pub outputs: BTreeMap<String, Spec>,
    pub cases: Vec<Case>,
}

impl Golden {
    pub fn read(name: &str) -> Self {
        let path = fixture_root(name).join("golden.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap()
    }
}
