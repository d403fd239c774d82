//! JSON <-> tensor conversion in TensorFlow Serving's REST conventions: a tensor is a
//! (nested) JSON array in row-major order whose nesting gives the shape.
//!
//! Request bodies use TF Serving's two layouts: columnar `{"inputs": {"name": [...]}}`
//! (or a bare value for a single-input signature) and row `{"instances": [...]}`, where
//! each instance is an object keyed by input name or, for a single input, the row itself.

use std::collections::BTreeMap;

use savedmodel::{DatumType, SignatureSpec, Tensor};
use serde_json::{Map, Value, json};
use thiserror::Error;

use crate::tensor_codec::plain;

#[derive(Debug, Error, PartialEq)]
pub enum JsonTensorError {
    #[error("request must be an object with \"inputs\" or \"instances\"")]
    Layout,
    #[error("input {name:?}: {detail}")]
    Input { name: String, detail: String },
    #[error("\"instances\" must be a non-empty array")]
    EmptyInstances,
    #[error("instance {index} is missing input {name:?}")]
    InstanceMissing { index: usize, name: String },
    #[error("signature has {0} inputs; name them in an object")]
    Unnamed(usize),
}

/// Splits a request body into its named input values (not yet tensors: admission checks
/// them against the signature first, see [`crate::admission`]).
pub fn parse_request(body: Value, spec: &SignatureSpec) -> Result<Vec<(String, Value)>, JsonTensorError> {
    let Value::Object(mut object) = body else { return Err(JsonTensorError::Layout) };
    let names: Vec<&String> = spec.inputs.keys().collect();
    if let Some(inputs) = object.remove("inputs") {
        return match inputs {
            // An object keyed by input names; a single-input signature may also take the bare value.
            Value::Object(map) if names.len() != 1 || map.contains_key(names[0].as_str()) => {
                Ok(map.into_iter().collect())
            }
            single if names.len() == 1 => Ok(vec![(names[0].clone(), single)]),
            _ => Err(JsonTensorError::Unnamed(names.len())),
        };
    }
    let Some(instances) = object.remove("instances") else { return Err(JsonTensorError::Layout) };
    let Value::Array(rows) = instances else { return Err(JsonTensorError::EmptyInstances) };
    if rows.is_empty() {
        return Err(JsonTensorError::EmptyInstances);
    }
    let mut columns: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let count = rows.len();
    for (index, row) in rows.into_iter().enumerate() {
        match row {
            Value::Object(mut map) => {
                for name in &names {
                    let value = map
                        .remove(name.as_str())
                        .ok_or_else(|| JsonTensorError::InstanceMissing { index, name: name.to_string() })?;
                    columns.entry(name.to_string()).or_insert_with(|| Vec::with_capacity(count)).push(value);
                }
            }
            value if names.len() == 1 => {
                columns.entry(names[0].clone()).or_insert_with(|| Vec::with_capacity(count)).push(value)
            }
            _ => return Err(JsonTensorError::Unnamed(names.len())),
        }
    }
    Ok(columns.into_iter().map(|(k, v)| (k, Value::Array(v))).collect())
}

/// The shape a nested JSON array gives (its first element's nesting; [`json_to_tensor`]
/// refuses ragged arrays).
pub fn json_shape(value: &Value) -> Vec<usize> {
    let mut shape = Vec::new();
    let mut probe = value;
    while let Value::Array(items) = probe {
        shape.push(items.len());
        match items.first() {
            Some(first) => probe = first,
            None => break,
        }
    }
    shape
}

/// Builds a tensor of `datum_type` from a nested JSON array (or a scalar).
pub fn json_to_tensor(value: &Value, datum_type: DatumType) -> Result<Tensor, String> {
    let shape = json_shape(value);
    let mut flat = Vec::new();
    flatten(value, &shape, 0, &mut flat)?;
    let tensor = match datum_type {
        DatumType::F32 => {
            Tensor::from_shape(&shape, &numbers(&flat, |v| v.as_f64().map(|x| x as f32).filter(|x| x.is_finite()))?)
        }
        DatumType::F64 => Tensor::from_shape(&shape, &numbers(&flat, Value::as_f64)?),
        DatumType::I32 => {
            Tensor::from_shape(&shape, &numbers(&flat, |v| v.as_i64().and_then(|x| i32::try_from(x).ok()))?)
        }
        DatumType::I64 => Tensor::from_shape(&shape, &numbers(&flat, Value::as_i64)?),
        DatumType::Bool => Tensor::from_shape(&shape, &numbers(&flat, Value::as_bool)?),
        other => return Err(format!("dtype {other:?} is not supported in JSON")),
    };
    tensor.map_err(|e| e.to_string())
}

fn flatten<'a>(value: &'a Value, shape: &[usize], depth: usize, out: &mut Vec<&'a Value>) -> Result<(), String> {
    match value {
        Value::Array(items) => {
            if shape.get(depth) != Some(&items.len()) {
                return Err(format!(
                    "ragged array: expected {} items at depth {depth}, found {}",
                    shape.get(depth).copied().unwrap_or(0),
                    items.len()
                ));
            }
            items.iter().try_for_each(|item| flatten(item, shape, depth + 1, out))
        }
        scalar if depth == shape.len() => {
            out.push(scalar);
            Ok(())
        }
        _ => Err(format!("ragged array: a scalar at depth {depth} where {} levels are nested", shape.len())),
    }
}

fn numbers<T>(flat: &[&Value], convert: impl Fn(&Value) -> Option<T>) -> Result<Vec<T>, String> {
    flat.iter()
        .map(|v| {
            convert(v).ok_or_else(|| {
                let what = std::any::type_name::<T>();
                // TensorFlow refuses a number its dtype cannot hold rather than storing infinity.
                if what == "f32" && v.is_number() {
                    format!("{v} is not a valid f32 (finite and within +-3.4e38)")
                } else {
                    format!("{v} is not a valid {what}")
                }
            })
        })
        .collect()
}

/// Renders a tensor as a nested JSON array.
pub fn tensor_to_json(tensor: &Tensor) -> Value {
    fn nest(values: &[Value], shape: &[usize]) -> Value {
        match shape.split_first() {
            None => values.first().cloned().unwrap_or(Value::Null),
            Some((&n, rest)) => {
                let stride = rest.iter().product::<usize>();
                Value::Array((0..n).map(|i| nest(&values[i * stride..(i + 1) * stride], rest)).collect())
            }
        }
    }
    match flat_values(tensor) {
        Ok(values) => nest(&values, tensor.shape()),
        Err(e) => json!({ "error": e }),
    }
}

/// A tensor's elements as JSON numbers (booleans for BOOL), row-major, flat.
pub fn flat_values(tensor: &Tensor) -> Result<Vec<Value>, String> {
    fn cast<T: savedmodel::Datum + Copy>(tensor: &Tensor) -> Result<Vec<T>, String> {
        let cast = tensor.cast_to::<T>().map_err(|e| e.to_string())?;
        Ok(plain::<T>(&cast))
    }
    Ok(match tensor.datum_type() {
        DatumType::Bool => plain::<bool>(tensor).into_iter().map(Value::from).collect(),
        DatumType::I8 | DatumType::I16 | DatumType::I32 | DatumType::I64 => {
            cast::<i64>(tensor)?.into_iter().map(Value::from).collect()
        }
        DatumType::U8 | DatumType::U16 | DatumType::U32 | DatumType::U64 => {
            cast::<u64>(tensor)?.into_iter().map(Value::from).collect()
        }
        // Shortest f32 digits (0.021215577, not 0.02121557667851448), as TF Serving prints.
        DatumType::F32 => plain::<f32>(tensor).into_iter().map(shortest_f32).collect(),
        _ => cast::<f64>(tensor)?.into_iter().map(Value::from).collect(),
    })
}

/// An f32 as the f64 whose shortest form is the f32's shortest form. NaN and infinities,
/// which JSON numbers cannot carry, become the strings TF Serving uses.
fn shortest_f32(x: f32) -> Value {
    if x.is_nan() {
        return Value::from("NaN");
    }
    if x.is_infinite() {
        return Value::from(if x > 0.0 { "Infinity" } else { "-Infinity" });
    }
    Value::from(x.to_string().parse::<f64>().unwrap_or(f64::from(x)))
}

/// `{"outputs": {name: nested array}}`, TF Serving's columnar response.
pub fn outputs_to_json(outputs: &BTreeMap<String, Tensor>) -> Value {
    let map: Map<String, Value> = outputs.iter().map(|(k, t)| (k.clone(), tensor_to_json(t))).collect();
    json!({ "outputs": map })
}

/// `{"predictions": [...]}`, TF Serving's row response: one entry per row of the batch
/// axis; the row itself for a single output, an object keyed by output name otherwise.
pub fn predictions_to_json(outputs: &BTreeMap<String, Tensor>) -> Result<Value, String> {
    let rows = outputs.values().next().map(|t| t.shape().first().copied().unwrap_or(0)).unwrap_or(0);
    if let Some((name, t)) = outputs.iter().find(|(_, t)| t.rank() == 0 || t.shape()[0] != rows) {
        return Err(format!(
            "output {name:?} has shape {:?}, which does not share the batch size {rows}; use the \"inputs\" form",
            t.shape()
        ));
    }
    let columns: Vec<(&String, Vec<Value>)> = outputs
        .iter()
        .map(|(name, t)| match tensor_to_json(t) {
            Value::Array(items) => (name, items),
            other => (name, vec![other]),
        })
        .collect();
    let predictions = (0..rows)
        .map(|i| {
            if columns.len() == 1 {
                columns[0].1[i].clone()
            } else {
                Value::Object(columns.iter().map(|(name, items)| ((*name).clone(), items[i].clone())).collect())
            }
        })
        .collect();
    Ok(json!({ "predictions": Value::Array(predictions) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_arrays_round_trip_with_their_shape() {
        let value = json!([[1.5, 2.0, -3.0], [4.0, 5.0, 6.25]]);
        let tensor = json_to_tensor(&value, DatumType::F32).unwrap();
        assert_eq!(tensor.shape(), &[2, 3]);
        assert_eq!(tensor_to_json(&tensor), value);
    }

    #[test]
    fn ragged_arrays_and_wrong_types_are_rejected() {
        assert!(json_to_tensor(&json!([[1.0, 2.0], [3.0]]), DatumType::F32).unwrap_err().contains("ragged"));
        assert!(json_to_tensor(&json!([1.5]), DatumType::I64).unwrap_err().contains("not a valid"));
        assert!(json_to_tensor(&json!([3_000_000_000i64]), DatumType::I32).is_err());
    }

    #[test]
    fn numbers_a_float_cannot_hold_are_refused_not_stored_as_infinity() {
        let error = json_to_tensor(&json!([1.0, 1e300]), DatumType::F32).unwrap_err();
        assert!(error.contains("1e+300") && error.contains("finite"), "{error}");
        assert!(json_to_tensor(&json!([-3.5e38]), DatumType::F32).is_err());
        assert!(json_to_tensor(&json!([3.4e38]), DatumType::F32).is_ok());
        // f64 holds it; serde_json itself refuses numbers beyond f64's range.
        assert!(json_to_tensor(&json!([1e300]), DatumType::F64).is_ok());
        assert!(serde_json::from_str::<Value>("[1e400]").is_err());
    }
}
