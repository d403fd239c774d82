//! What a request may make the server allocate, decided before anything is allocated.
//!
//! A wire tensor states its size in its shape, not in its length: a `TensorProto` with one
//! `float_val` and a dim of 250,000,000 is 32 bytes on the wire and 1 GB decoded
//! (TensorFlow's fill rule repeats the last value), and a KServe or JSON tensor is as large
//! as its declared shape. So the front doors hand inputs over undecoded ([`WireTensor`]), and
//! [`admit`] checks them against the signature that will run them: every name an input of
//! the signature and given once, each input in the signature's dtype, rank and fixed
//! dimensions, the rows within the limit, and the decoded bytes (checked arithmetic,
//! summed over the inputs) within the request's [`budget`]. Only then are tensors decoded:
//! once, straight into the engine's buffer, off the async workers when large
//! ([`decode_admitted`]).

use std::collections::BTreeSet;

use proto::inference::InferTensorContents;
use proto::tensorflow::TensorProto;
use savedmodel::{DatumType, PredictError, SignatureSpec, Tensor};

use crate::error::ServeError;
use crate::tensor_codec::{self, Element, MAX_TENSOR_BYTES};
use crate::tensor_json;

/// A request's budget when neither `--max_request_bytes` nor the signature sizes it (a
/// signature with unknown inner dimensions): what a default gRPC message can carry.
pub const FALLBACK_REQUEST_BYTES: usize = 64 << 20;

/// The smallest budget a signature sizes: a small model still takes requests of a few rows
/// of any layout without tuning.
const MIN_SIZED_REQUEST_BYTES: usize = 1 << 20;

/// Requests decoding to more than this are decoded on the blocking pool, not on an async
/// worker (a 1 MiB copy or fill is ~100 us, past the half-millisecond an async task may block).
const DECODE_INLINE_MAX_BYTES: usize = 256 << 10;

/// One input as it came off the wire, not yet decoded.
#[derive(Debug, Clone)]
pub enum WireTensor {
    /// TF Serving's `TensorProto` (typed `*_val` fields or `tensor_content`).
    TfProto(TensorProto),
    /// A KServe v2 input with its typed contents or its raw bytes.
    Kserve(KserveTensor),
    /// A TF Serving REST JSON value (nested arrays; the dtype is the signature's).
    Json(serde_json::Value),
    /// Already a tensor (tools and tests).
    Decoded(Tensor),
}

#[derive(Debug, Clone)]
pub struct KserveTensor {
    pub datatype: String,
    pub shape: Vec<i64>,
    pub contents: Option<InferTensorContents>,
    /// The input's entry of `raw_input_contents`, moved out of the request.
    pub raw: Option<Vec<u8>>,
}

/// The request-wide limits admission applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Most rows (batch axis) one request may carry (`--max_request_rows`).
    pub max_rows: usize,
    /// With batching on, the signature's `max_batch_size`: a request may not exceed it either.
    pub max_batch_rows: Option<usize>,
    /// Most decoded tensor bytes one request may carry; `None` sizes it from the signature.
    pub max_bytes: Option<usize>,
}

/// An input that passed admission: its name, shape and element type are the signature's.
#[derive(Debug)]
pub struct Admitted {
    name: String,
    element: Element,
    shape: Vec<usize>,
    wire: WireTensor,
}

/// Inputs that passed admission, with what they will take decoded.
#[derive(Debug)]
pub struct AdmittedRequest {
    pub inputs: Vec<Admitted>,
    pub bytes: usize,
}

/// The decoded-bytes budget of one request to `spec`: `max_bytes` if set; otherwise a row of
/// the signature times the row limit (the smaller of the two) (at least 1 MiB, at most the 1 GiB tensor limit), or
/// [`FALLBACK_REQUEST_BYTES`] when a row's size is not fixed by the signature.
pub fn budget(spec: &SignatureSpec, limits: RequestLimits) -> usize {
    if let Some(bytes) = limits.max_bytes {
        return bytes;
    }
    let mut row_bytes: usize = 0;
    for input in spec.inputs.values() {
        let Some(element) = DatumType::try_from(input.dtype).ok().and_then(Element::from_datum_type) else {
            return FALLBACK_REQUEST_BYTES;
        };
        let Some((&first, rest)) = input.shape.as_deref().and_then(<[i64]>::split_first) else {
            return FALLBACK_REQUEST_BYTES;
        };
        if first >= 0 || rest.iter().any(|&d| d < 0) {
            return FALLBACK_REQUEST_BYTES;
        }
        let per_row = rest.iter().try_fold(element.size(), |acc, &d| acc.checked_mul(d as usize));
        row_bytes = match per_row.and_then(|bytes| row_bytes.checked_add(bytes)) {
            Some(bytes) => bytes,
            None => return MAX_TENSOR_BYTES,
        };
    }
    let rows = limits.max_batch_rows.map_or(limits.max_rows, |batch| batch.min(limits.max_rows));
    row_bytes.saturating_mul(rows).clamp(MIN_SIZED_REQUEST_BYTES, MAX_TENSOR_BYTES)
}

/// The element type and dims a wire tensor declares, without decoding it. JSON carries no
/// dtype (`None`: it takes the signature's).
fn declared(name: &str, wire: &WireTensor) -> Result<(Option<Element>, Vec<i64>), String> {
    match wire {
        WireTensor::TfProto(proto) => {
            let element = Element::from_tf_dtype(proto.dtype).ok_or_else(|| {
                format!(
                    "input {name:?} has dtype {}, which this server does not support",
                    tensor_codec::tf_dtype_name(proto.dtype)
                )
            })?;
            let shape = proto.tensor_shape.as_ref().ok_or_else(|| format!("input {name:?} has no tensor_shape"))?;
            if shape.unknown_rank {
                return Err(format!("input {name:?} has an unknown rank"));
            }
            Ok((Some(element), shape.dim.iter().map(|d| d.size).collect()))
        }
        WireTensor::Kserve(input) => {
            let element = Element::from_kserve_name(&input.datatype)
                .ok_or_else(|| format!("input {name:?} has datatype {:?}, which is not supported", input.datatype))?;
            Ok((Some(element), input.shape.clone()))
        }
        WireTensor::Json(value) => Ok((None, tensor_json::json_shape(value).into_iter().map(|d| d as i64).collect())),
        WireTensor::Decoded(tensor) => {
            Ok((Element::from_datum_type(tensor.datum_type()), tensor.shape().iter().map(|&d| d as i64).collect()))
        }
    }
}

fn dtype_name(element: Element) -> String {
    format!("{:?}", element.datum_type()).to_lowercase()
}

/// Checks `inputs` against `spec` and the limits without allocating anything in proportion
/// to what they declare. Errors name the model, version, signature and input.
pub fn admit(
    model: &str,
    version: i64,
    spec: &SignatureSpec,
    inputs: Vec<(String, WireTensor)>,
    limits: RequestLimits,
) -> Result<AdmittedRequest, ServeError> {
    let predict = |source: PredictError| ServeError::Predict {
        model: model.to_owned(),
        version,
        signature: spec.name.clone(),
        source: Box::new(source),
    };
    let invalid = |detail: String| {
        ServeError::InvalidArgument(format!("model {model:?} version {version} signature {:?}: {detail}", spec.name))
    };
    let budget = budget(spec, limits);
    let mut seen = BTreeSet::new();
    let mut admitted = Vec::with_capacity(inputs.len().min(spec.inputs.len()));
    let mut total: usize = 0;
    for (name, wire) in inputs {
        let Some(expected) = spec.inputs.get(&name) else {
            return Err(predict(PredictError::UnknownInput { name, expected: spec.inputs.keys().cloned().collect() }));
        };
        if !seen.insert(name.clone()) {
            return Err(invalid(format!("input {name:?} is given more than once")));
        }
        let element = DatumType::try_from(expected.dtype)
            .ok()
            .and_then(Element::from_datum_type)
            .ok_or_else(|| invalid(format!("input {name:?} has a dtype this server cannot take")))?;
        let (given, dims) = declared(&name, &wire).map_err(invalid)?;
        if let Some(given) = given.filter(|g| *g != element) {
            return Err(predict(PredictError::Dtype { name, expected: dtype_name(element), got: dtype_name(given) }));
        }
        let mut shape = Vec::with_capacity(dims.len().min(64));
        for &d in &dims {
            shape.push(
                usize::try_from(d)
                    .map_err(|_| invalid(format!("input {name:?} has a negative dimension in shape {dims:?}")))?,
            );
        }
        if let Some(fixed) = &expected.shape {
            // A longer window than the input's is taken too: the version that runs the
            // request uses its newest part (crate::inference::reading_windows).
            let fits = (fixed.len() == shape.len()
                && fixed.iter().zip(&shape).all(|(&f, &s)| f < 0 || f as usize == s))
                || crate::inference::reading_windows::is_wider_window(fixed, &shape);
            if !fits {
                let expected = fixed.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
                return Err(predict(PredictError::Shape { name, expected: format!("[{expected}]"), got: shape }));
            }
            if fixed.first().is_some_and(|&f| f < 0)
                && let Some(&rows) = shape.first()
            {
                if rows > limits.max_rows {
                    return Err(invalid(format!(
                        "input {name:?} has {rows} rows, more than the limit of {} rows per request",
                        limits.max_rows
                    )));
                }
                if let Some(batch) = limits.max_batch_rows.filter(|&batch| rows > batch) {
                    return Err(invalid(format!(
                        "input {name:?} has {rows} rows, more than the max_batch_size ({batch}) of one batch"
                    )));
                }
            }
        }
        let bytes = shape
            .iter()
            .try_fold(element.size(), |acc, &d| acc.checked_mul(d))
            .and_then(|bytes| total.checked_add(bytes).map(|sum| (bytes, sum)));
        match bytes {
            Some((_, sum)) if sum <= budget => total = sum,
            Some((bytes, _)) => {
                return Err(invalid(format!(
                    "input {name:?} (shape {dims:?}, {bytes} bytes decoded) takes the request over its limit of \
                     {budget} decoded bytes; send fewer rows per request"
                )));
            }
            None => return Err(invalid(format!("input {name:?} shape {dims:?} overflows"))),
        }
        admitted.push(Admitted { name, element, shape, wire });
    }
    if let Some(missing) = spec.inputs.keys().find(|k| !seen.contains(*k)) {
        return Err(predict(PredictError::MissingInput { name: missing.clone() }));
    }
    Ok(AdmittedRequest { inputs: admitted, bytes: total })
}

impl Admitted {
    /// Decodes the input into one tensor of its admitted shape and type.
    fn decode(self) -> Result<(String, Tensor), String> {
        let Admitted { name, element, shape, wire } = self;
        let tensor = match wire {
            WireTensor::TfProto(proto) => tensor_codec::tensor_from_proto(&name, element, &shape, proto),
            WireTensor::Kserve(input) => match input.raw {
                Some(raw) => tensor_codec::tensor_from_le_bytes(&name, element, &shape, &raw),
                None => tensor_codec::tensor_from_kserve(&name, element, &shape, input.contents.unwrap_or_default()),
            },
            WireTensor::Json(value) => tensor_json::json_to_tensor(&value, element.datum_type())
                .map_err(|detail| format!("input {name:?}: {detail}")),
            WireTensor::Decoded(tensor) => Ok(tensor),
        }?;
        Ok((name, tensor))
    }
}

impl AdmittedRequest {
    /// Decodes every input, on the calling thread.
    pub fn decode(self) -> Result<Vec<(String, Tensor)>, String> {
        self.inputs.into_iter().map(Admitted::decode).collect()
    }
}

/// Decodes admitted inputs: inline when small, on the blocking pool when large.
pub async fn decode_admitted(request: AdmittedRequest) -> Result<Vec<(String, Tensor)>, ServeError> {
    let decoded = if request.bytes <= DECODE_INLINE_MAX_BYTES {
        request.decode()
    } else {
        tokio::task::spawn_blocking(move || request.decode())
            .await
            .map_err(|e| ServeError::Internal(format!("decoding the request's tensors: {e}")))?
    };
    decoded.map_err(ServeError::InvalidArgument)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proto::tensorflow::{TensorShapeProto, tensor_shape_proto};
    use savedmodel::{DataType, TensorSpec};

    use super::*;

    fn spec(inputs: &[(&str, DataType, &[i64])]) -> SignatureSpec {
        SignatureSpec {
            name: "serving_default".into(),
            method_name: String::new(),
            inputs: inputs
                .iter()
                .map(|(name, dtype, shape)| {
                    (
                        (*name).to_owned(),
                        TensorSpec { tensor_name: String::new(), dtype: *dtype, shape: Some(shape.to_vec()) },
                    )
                })
                .collect::<BTreeMap<_, _>>(),
            outputs: BTreeMap::new(),
        }
    }

    fn proto(dtype: i32, dims: &[i64], float_val: Vec<f32>) -> WireTensor {
        WireTensor::TfProto(TensorProto {
            dtype,
            tensor_shape: Some(TensorShapeProto {
                dim: dims.iter().map(|&size| tensor_shape_proto::Dim { size, ..Default::default() }).collect(),
                ..Default::default()
            }),
            float_val,
            ..Default::default()
        })
    }

    const LIMITS: RequestLimits = RequestLimits { max_rows: 65_536, max_batch_rows: None, max_bytes: None };

    #[test]
    fn the_budget_is_a_row_of_the_signature_times_the_row_limit() {
        let sensors = spec(&[("sensors", DataType::DtFloat, &[-1, 18])]);
        assert_eq!(budget(&sensors, LIMITS), 72 * 65_536);
        assert_eq!(
            budget(&sensors, RequestLimits { max_rows: 10, max_bytes: None, ..LIMITS }),
            MIN_SIZED_REQUEST_BYTES
        );
        assert_eq!(budget(&sensors, RequestLimits { max_rows: 10, max_bytes: Some(7), ..LIMITS }), 7);
        let ragged = spec(&[("tokens", DataType::DtFloat, &[-1, -1])]);
        assert_eq!(budget(&ragged, LIMITS), FALLBACK_REQUEST_BYTES);
    }

    #[test]
    fn a_huge_declared_shape_is_refused_before_anything_is_allocated() {
        let sensors = spec(&[("sensors", DataType::DtFloat, &[-1, 18])]);
        // One value, 250M rows x 18 (the fill rule would repeat it): refused by the row limit.
        let error = admit("m", 1, &sensors, vec![("sensors".into(), proto(1, &[250_000_000, 18], vec![1.0]))], LIMITS)
            .unwrap_err();
        assert!(error.to_string().contains("\"sensors\" has 250000000 rows"), "{error}");
        // Within the row limit but over an explicit byte budget: refused naming the input.
        let limits = RequestLimits { max_bytes: Some(1000), ..LIMITS };
        let error =
            admit("m", 1, &sensors, vec![("sensors".into(), proto(1, &[20, 18], vec![1.0]))], limits).unwrap_err();
        assert!(error.to_string().contains("\"sensors\"") && error.to_string().contains("1000"), "{error}");
        // Dims whose product overflows.
        let free = spec(&[("x", DataType::DtFloat, &[-1, -1, -1])]);
        let error =
            admit("m", 1, &free, vec![("x".into(), proto(1, &[1, i64::MAX, i64::MAX], vec![]))], LIMITS).unwrap_err();
        assert!(error.to_string().contains("overflows"), "{error}");
    }

    #[test]
    fn inputs_are_matched_to_the_signature_before_decoding() {
        let two = spec(&[("a", DataType::DtFloat, &[-1, 2]), ("b", DataType::DtFloat, &[-1, 2])]);
        let ok = || proto(1, &[1, 2], vec![1.0, 2.0]);
        let cases: Vec<(Vec<(String, WireTensor)>, &str)> = vec![
            (vec![("a".into(), ok()), ("a".into(), ok())], "given more than once"),
            (vec![("a".into(), ok()), ("c".into(), ok())], "\"c\" is not an input"),
            (vec![("a".into(), ok())], "\"b\" is missing"),
            (vec![("a".into(), ok()), ("b".into(), proto(9, &[1, 2], vec![]))], "dtype i64, expected f32"),
            (vec![("a".into(), ok()), ("b".into(), proto(1, &[1, 1], vec![]))], "expected [-1,2]"),
            (vec![("a".into(), ok()), ("b".into(), proto(1, &[1, 2, 1], vec![]))], "expected [-1,2]"),
            (vec![("a".into(), ok()), ("b".into(), proto(1, &[-1, 2], vec![]))], "negative"),
            (vec![("a".into(), ok()), ("b".into(), proto(7, &[1, 2], vec![]))], "DT_STRING"),
        ];
        for (inputs, expected) in cases {
            let error = admit("m", 3, &two, inputs, LIMITS).unwrap_err().to_string();
            assert!(error.contains(expected) && error.contains("\"m\""), "{error} (wanted {expected})");
        }
        // A longer window than an input's is admitted, sized as sent: the version running
        // the request takes its newest part (inference::reading_windows).
        let wider = admit("m", 3, &two, vec![("a".into(), ok()), ("b".into(), proto(1, &[1, 3], vec![]))], LIMITS);
        assert_eq!(wider.unwrap().bytes, 8 + 12);
        let admitted = admit("m", 3, &two, vec![("b".into(), ok()), ("a".into(), ok())], LIMITS).unwrap();
        assert_eq!(admitted.bytes, 16);
        let decoded = admitted.decode().unwrap();
        assert_eq!(
            decoded.iter().map(|(n, t)| (n.as_str(), t.shape().to_vec())).collect::<Vec<_>>(),
            [("b", vec![1, 2]), ("a", vec![1, 2])]
        );
    }
}
