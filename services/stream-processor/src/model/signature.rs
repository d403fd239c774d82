//! What a served signature asks of a reading: its inputs as reading signals, alone or over
//! a device's window, read from `GetModelMetadata` (or the embedded model), and the values
//! each input takes for a call's rows.

use sensor::Signal;

use super::{Row, SCORE_OUTPUT, THRESHOLD_OUTPUT};
use crate::windows;

/// Why the served signature could not be read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SignatureError {
    /// The model server refused GetModelMetadata (NOT_FOUND: that model or version is not
    /// served; UNAVAILABLE: not reachable).
    #[error("GetModelMetadata: {}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
    #[error("GetModelMetadata timed out")]
    TimedOut,
    /// It answered with a signature the processor cannot score with.
    #[error("{0}")]
    Unusable(String),
}

/// The model's inputs, in the signature's order: each a reading signal.
#[derive(Debug, Clone)]
pub struct ModelInputs {
    pub inputs: Vec<ModelInput>,
    /// The version whose signature this is.
    pub version: i64,
}

/// One input of the signature: a reading signal, alone or over a window.
#[derive(Debug, Clone)]
pub struct ModelInput {
    pub name: String,
    pub signal: &'static Signal,
    /// Its place in [`sensor::signals`] (how [`Window`] holds values).
    pub signal_index: usize,
    /// `None`: shape `[-1]`, one value per reading; `Some(k)`: shape `[-1, k]`, the
    /// device's last `k` values, oldest first.
    pub window: Option<usize>,
}

impl ModelInput {
    /// The shape of this input's tensor for `rows` readings: `[rows]` or `[rows, k]`.
    pub(super) fn dims(&self, rows: usize) -> Vec<usize> {
        match self.window {
            None => vec![rows],
            Some(k) => vec![rows, k],
        }
    }
}

impl ModelInputs {
    /// The longest window any input asks for (1: none).
    pub fn window(&self) -> usize {
        self.inputs.iter().filter_map(|input| input.window).max().unwrap_or(1)
    }
}

/// One input's values for `rows`, row after row: a value per row, or `k` per row.
pub(super) fn input_values(input: &ModelInput, rows: &[Row]) -> Vec<f32> {
    match input.window {
        None => rows.iter().map(|row| input.signal.get(&row.reading) as f32).collect(),
        Some(k) => {
            let mut values = Vec::with_capacity(rows.len() * k);
            for row in rows {
                if row.window.is_empty() {
                    values.extend(std::iter::repeat_n(input.signal.get(&row.reading) as f32, k));
                } else {
                    row.window.extend_signal(input.signal_index, k, &mut values);
                }
            }
            values
        }
    }
}

/// Whether a signature has the outputs the processor reads.
pub(super) fn check_outputs(
    model: &str,
    version: i64,
    signature: &str,
    has: impl Fn(&str) -> bool,
) -> Result<(), SignatureError> {
    match [SCORE_OUTPUT, THRESHOLD_OUTPUT].into_iter().find(|output| !has(output)) {
        Some(output) => Err(SignatureError::Unusable(format!(
            "model {model} version {version}: signature {signature:?} has no output {output:?} (the processor reads \
             {SCORE_OUTPUT:?} and {THRESHOLD_OUTPUT:?})"
        ))),
        None => Ok(()),
    }
}

/// A signature's inputs (name, whether float32, shape when known) as reading signals,
/// alone or over windows of at most `max_window` readings, or why they are not.
pub(super) fn reading_inputs(
    model: &str,
    version: i64,
    inputs: impl IntoIterator<Item = (String, bool, Option<Vec<i64>>)>,
    max_window: usize,
) -> Result<ModelInputs, SignatureError> {
    let unusable = |name: &str, why: String| {
        SignatureError::Unusable(format!("model {model} version {version}: input {name:?} {why}"))
    };
    let mut signals = Vec::new();
    for (name, float, shape) in inputs {
        let signal = sensor::signal(&name).ok_or_else(|| unusable(&name, "is not a reading signal".into()))?;
        if !float {
            return Err(unusable(&name, "is not float32".into()));
        }
        let window = windows::window_length(shape.as_deref()).map_err(|why| unusable(&name, why))?;
        if window.is_some_and(|k| k > max_window) {
            return Err(unusable(
                &name,
                format!(
                    "asks for a window of {} readings, more than model.max_window_readings ({max_window})",
                    window.unwrap_or(0)
                ),
            ));
        }
        let signal_index = sensor::signals().iter().position(|s| std::ptr::eq(s, signal)).unwrap_or_default();
        signals.push(ModelInput { name, signal, signal_index, window });
    }
    Ok(ModelInputs { inputs: signals, version })
}
