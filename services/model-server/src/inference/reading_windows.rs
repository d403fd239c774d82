//! Windows of readings across model versions (docs/windowed-models.md).
//!
//! A model that scores a device's last `k` readings takes each signal as an input of shape
//! `[-1, k]` (oldest first); a model that scores one reading takes `[-1]`. During a canary
//! rollout from one to the other, one request reaches both: its rows are split by device
//! between the versions ([`super::per_row`]), and the stable side may be shadowed on the
//! canary. So a request may carry a longer window than the version that runs it needs, and
//! each version takes the newest part: `[n, K]` becomes `[n, k]` (the last `k` columns) for
//! a `[-1, k]` input with `k <= K`, and `[n]` (the last column) for a `[-1]` input. The
//! caller sends the longest window any served version asks for. Admission sizes the request
//! as sent, so the budget still bounds it before anything is decoded.

use savedmodel::{SignatureSpec, Tensor};

use crate::error::ServeError;

/// Whether a given shape is a window a `[-1]` or `[-1, k]` input can take its newest part
/// from: rank 2, no shorter than the input's window.
pub fn is_wider_window(expected: &[i64], given: &[usize]) -> bool {
    match (expected, given) {
        ([rows], [_, k]) => *rows < 0 && *k >= 1,
        ([rows, want], [_, k]) => *rows < 0 && *want > 0 && *k > *want as usize,
        _ => false,
    }
}

/// Narrows each input sent with a longer window than `spec` takes to its newest part;
/// anything else passes unchanged (the engine checks it).
pub fn narrow(
    model: &str,
    version: i64,
    spec: &SignatureSpec,
    inputs: Vec<(String, Tensor)>,
) -> Result<Vec<(String, Tensor)>, ServeError> {
    inputs
        .into_iter()
        .map(|(name, tensor)| {
            let Some(expected) = spec.inputs.get(&name).and_then(|t| t.shape.as_deref()) else {
                return Ok((name, tensor));
            };
            if !is_wider_window(expected, tensor.shape()) {
                return Ok((name, tensor));
            }
            let (rows, given) = (tensor.shape()[0], tensor.shape()[1]);
            let keep = match expected {
                [_, want] => *want as usize,
                _ => 1,
            };
            let failed = |e: anyhow::Error| {
                ServeError::Internal(format!(
                    "model {model:?} version {version}: narrowing input {name:?} from {given} readings to {keep}: {e:#}"
                ))
            };
            let newest = tensor.slice(1, given - keep, given).map_err(failed)?;
            let narrowed = if expected.len() == 1 { newest.into_shape(&[rows]).map_err(failed)? } else { newest };
            Ok((name, narrowed))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use savedmodel::{DataType, TensorSpec};

    fn spec(shape: &[i64]) -> SignatureSpec {
        SignatureSpec {
            name: "serving_default".into(),
            method_name: String::new(),
            inputs: [(
                "speed".to_owned(),
                TensorSpec { tensor_name: String::new(), dtype: DataType::DtFloat, shape: Some(shape.to_vec()) },
            )]
            .into(),
            outputs: Default::default(),
        }
    }

    fn values(tensor: &Tensor) -> Vec<f32> {
        tensor.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
    }

    #[test]
    fn each_version_takes_the_newest_part_of_a_longer_window() {
        // Two rows, windows of 3 readings, oldest first.
        let window = Tensor::from_shape(&[2, 3], &[1f32, 2., 3., 10., 20., 30.]).unwrap();
        let one = narrow("m", 1, &spec(&[-1]), vec![("speed".into(), window.clone())]).unwrap();
        assert_eq!(one[0].1.shape(), &[2]);
        assert_eq!(values(&one[0].1), [3., 30.]);
        let two = narrow("m", 2, &spec(&[-1, 2]), vec![("speed".into(), window.clone())]).unwrap();
        assert_eq!(two[0].1.shape(), &[2, 2]);
        assert_eq!(values(&two[0].1), [2., 3., 20., 30.]);
        // The window the version asks for, or a shorter one, passes as it is (a shorter one
        // is then refused by the engine, naming the input).
        let same = narrow("m", 3, &spec(&[-1, 3]), vec![("speed".into(), window.clone())]).unwrap();
        assert_eq!(values(&same[0].1), values(&window));
        assert!(!is_wider_window(&[-1, 4], &[2, 3]));
        assert!(!is_wider_window(&[-1], &[2]));
        assert!(!is_wider_window(&[3], &[3, 2]), "only a batch axis of any size");
    }
}
