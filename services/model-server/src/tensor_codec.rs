//! Tensors on the wire <-> engine tensors, for TensorFlow's `TensorProto` and KServe v2's
//! `InferTensorContents` / raw contents.
//!
//! Both protocols put raw tensor bytes in little-endian order, which is the host order on
//! every target this server builds for (checked at compile time), so raw contents are
//! copied, not decoded element by element. Typed fields follow TensorFlow's own rules
//! (`Tensor::FromProto`): fewer values than elements repeats the last value, none means
//! zeros, more is an error. Every failure names the tensor and says what was expected.

use savedmodel::{DatumType, Tensor, f16};

use proto::inference::InferTensorContents;
use proto::tensorflow::{TensorProto, TensorShapeProto, tensor_shape_proto};

const _: () = assert!(cfg!(target_endian = "little"), "wire tensors are little-endian; so must the host be");

/// Largest request (in decoded bytes) any budget allows. Typed fields can describe a huge
/// tensor with one value, so limits apply to the shape, not the message size.
pub const MAX_TENSOR_BYTES: usize = 1 << 30;

/// The element types both protocols and the engine share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    F32,
    F64,
}

impl Element {
    const ALL: [Element; 12] = [
        Element::Bool,
        Element::U8,
        Element::U16,
        Element::U32,
        Element::U64,
        Element::I8,
        Element::I16,
        Element::I32,
        Element::I64,
        Element::F16,
        Element::F32,
        Element::F64,
    ];

    pub fn from_datum_type(dt: DatumType) -> Option<Self> {
        Some(match dt {
            DatumType::Bool => Element::Bool,
            DatumType::U8 => Element::U8,
            DatumType::U16 => Element::U16,
            DatumType::U32 => Element::U32,
            DatumType::U64 => Element::U64,
            DatumType::I8 => Element::I8,
            DatumType::I16 => Element::I16,
            DatumType::I32 => Element::I32,
            DatumType::I64 => Element::I64,
            DatumType::F16 => Element::F16,
            DatumType::F32 => Element::F32,
            DatumType::F64 => Element::F64,
            _ => return None,
        })
    }

    pub fn datum_type(self) -> DatumType {
        match self {
            Element::Bool => DatumType::Bool,
            Element::U8 => DatumType::U8,
            Element::U16 => DatumType::U16,
            Element::U32 => DatumType::U32,
            Element::U64 => DatumType::U64,
            Element::I8 => DatumType::I8,
            Element::I16 => DatumType::I16,
            Element::I32 => DatumType::I32,
            Element::I64 => DatumType::I64,
            Element::F16 => DatumType::F16,
            Element::F32 => DatumType::F32,
            Element::F64 => DatumType::F64,
        }
    }

    pub fn size(self) -> usize {
        self.datum_type().size_of()
    }

    /// `tensorflow.DataType` enum value.
    pub fn tf_dtype(self) -> i32 {
        match self {
            Element::F32 => 1,
            Element::F64 => 2,
            Element::I32 => 3,
            Element::U8 => 4,
            Element::I16 => 5,
            Element::I8 => 6,
            Element::I64 => 9,
            Element::Bool => 10,
            Element::U16 => 17,
            Element::F16 => 19,
            Element::U32 => 22,
            Element::U64 => 23,
        }
    }

    pub fn from_tf_dtype(dtype: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.tf_dtype() == dtype)
    }

    /// KServe v2 datatype name.
    pub fn kserve_name(self) -> &'static str {
        match self {
            Element::Bool => "BOOL",
            Element::U8 => "UINT8",
            Element::U16 => "UINT16",
            Element::U32 => "UINT32",
            Element::U64 => "UINT64",
            Element::I8 => "INT8",
            Element::I16 => "INT16",
            Element::I32 => "INT32",
            Element::I64 => "INT64",
            Element::F16 => "FP16",
            Element::F32 => "FP32",
            Element::F64 => "FP64",
        }
    }

    pub fn from_kserve_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.kserve_name() == name)
    }
}

/// The TF name of a `DataType` value, for messages (`DT_FLOAT`).
pub fn tf_dtype_name(dtype: i32) -> String {
    proto::tensorflow::DataType::try_from(dtype).map_or_else(|_| format!("dtype {dtype}"), |d| d.as_str_name().into())
}

/// Builds a tensor from little-endian bytes whose length must match the shape exactly.
pub fn tensor_from_le_bytes(name: &str, element: Element, shape: &[usize], bytes: &[u8]) -> Result<Tensor, String> {
    let count: usize = shape.iter().product();
    let expected = count * element.size();
    if bytes.len() != expected {
        return Err(format!(
            "tensor {name:?}: {} content bytes, but shape {shape:?} of {} needs {expected}",
            bytes.len(),
            element.kserve_name()
        ));
    }
    if element == Element::Bool && bytes.iter().any(|b| *b > 1) {
        return Err(format!("tensor {name:?}: bool content bytes must be 0 or 1"));
    }
    let mut tensor = Tensor::zero_dt(element.datum_type(), shape).map_err(|e| format!("tensor {name:?}: {e}"))?;
    tensor.as_bytes_mut().copy_from_slice(bytes);
    Ok(tensor)
}

/// Writes `values` (converted) into a new tensor of `shape`, in place: one allocation, the
/// tensor's own. `repeat_last` is TensorFlow's rule for typed `*_val` fields (fewer values
/// than elements repeats the last one, none means zeros); without it the count must match.
fn fill<S: Copy, T: savedmodel::Datum + Copy>(
    name: &str,
    shape: &[usize],
    values: &[S],
    repeat_last: bool,
    convert: impl Fn(S) -> Result<T, String>,
) -> Result<Tensor, String> {
    let count: usize = shape.iter().product();
    if values.len() > count || (!repeat_last && values.len() != count) {
        return Err(format!("tensor {name:?} has {} values but shape {shape:?} holds {count}", values.len()));
    }
    let mut tensor = Tensor::zero_dt(T::datum_type(), shape).map_err(|e| format!("tensor {name:?}: {e}"))?;
    {
        let mut view = tensor.try_as_plain_ram_mut().map_err(|e| format!("tensor {name:?}: {e}"))?;
        let slice = view.as_slice_mut::<T>().map_err(|e| format!("tensor {name:?}: {e}"))?;
        for (slot, value) in slice.iter_mut().zip(values) {
            *slot = convert(*value)?;
        }
        if let Some(&last) = values.last()
            && values.len() < count
        {
            let last = convert(last)?;
            slice[values.len()..].fill(last);
        }
    }
    Ok(tensor)
}

/// Values that need no conversion.
fn same<T>(value: T) -> Result<T, String> {
    Ok(value)
}

fn narrow<S: Copy + std::fmt::Display, T: TryFrom<S>>(
    name: &str,
    what: &'static str,
) -> impl Fn(S) -> Result<T, String> {
    move |v| T::try_from(v).map_err(|_| format!("tensor {name:?}: value {v} does not fit {what}"))
}

/// `TensorProto` -> engine tensor of an admitted `element` and `shape` (see
/// [`crate::admission`], which checked both against the proto's own before any allocation).
pub fn tensor_from_proto(name: &str, element: Element, shape: &[usize], proto: TensorProto) -> Result<Tensor, String> {
    if !proto.tensor_content.is_empty() {
        return tensor_from_le_bytes(name, element, shape, &proto.tensor_content);
    }
    match element {
        Element::F32 => fill(name, shape, &proto.float_val, true, same),
        Element::F64 => fill(name, shape, &proto.double_val, true, same),
        Element::I32 => fill(name, shape, &proto.int_val, true, same),
        Element::I64 => fill(name, shape, &proto.int64_val, true, same),
        Element::Bool => fill(name, shape, &proto.bool_val, true, same),
        Element::U32 => fill(name, shape, &proto.uint32_val, true, same),
        Element::U64 => fill(name, shape, &proto.uint64_val, true, same),
        Element::I16 => fill::<i32, i16>(name, shape, &proto.int_val, true, narrow(name, "int16")),
        Element::I8 => fill::<i32, i8>(name, shape, &proto.int_val, true, narrow(name, "int8")),
        Element::U8 => fill::<i32, u8>(name, shape, &proto.int_val, true, narrow(name, "uint8")),
        Element::U16 => fill::<i32, u16>(name, shape, &proto.int_val, true, narrow(name, "uint16")),
        Element::F16 => fill(name, shape, &proto.half_val, true, |v: i32| {
            u16::try_from(v)
                .map(f16::from_bits)
                .map_err(|_| format!("tensor {name:?}: half_val {v} is not a 16-bit pattern"))
        }),
    }
}

/// A plain (in-memory) tensor's elements; engine outputs are always plain.
pub(crate) fn plain<T: savedmodel::Datum + Copy>(tensor: &Tensor) -> Vec<T> {
    tensor
        .try_as_plain_ram()
        .and_then(|view| view.as_slice::<T>().map(<[T]>::to_vec))
        .expect("engine outputs are plain, and the element type was checked")
}

/// Engine tensor -> `TensorProto`: typed `*_val` fields (TF Serving's default), or
/// `tensor_content` when `as_content` (`--enable_serialization_as_tensor_content`).
pub fn tensor_to_proto(name: &str, tensor: &Tensor, as_content: bool) -> Result<TensorProto, String> {
    let element = Element::from_datum_type(tensor.datum_type())
        .ok_or_else(|| format!("output {name:?} has type {:?}, which cannot be returned", tensor.datum_type()))?;
    let mut proto = TensorProto {
        dtype: element.tf_dtype(),
        tensor_shape: Some(TensorShapeProto {
            dim: tensor
                .shape()
                .iter()
                .map(|&d| tensor_shape_proto::Dim { size: d as i64, ..Default::default() })
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    if as_content {
        proto.tensor_content = tensor.as_bytes().to_vec();
        return Ok(proto);
    }
    match element {
        Element::F32 => proto.float_val = plain::<f32>(tensor),
        Element::F64 => proto.double_val = plain::<f64>(tensor),
        Element::I32 => proto.int_val = plain::<i32>(tensor),
        Element::I64 => proto.int64_val = plain::<i64>(tensor),
        Element::Bool => proto.bool_val = plain::<bool>(tensor),
        Element::U32 => proto.uint32_val = plain::<u32>(tensor),
        Element::U64 => proto.uint64_val = plain::<u64>(tensor),
        Element::I16 => proto.int_val = plain::<i16>(tensor).into_iter().map(i32::from).collect(),
        Element::I8 => proto.int_val = plain::<i8>(tensor).into_iter().map(i32::from).collect(),
        Element::U8 => proto.int_val = plain::<u8>(tensor).into_iter().map(i32::from).collect(),
        Element::U16 => proto.int_val = plain::<u16>(tensor).into_iter().map(i32::from).collect(),
        Element::F16 => proto.half_val = plain::<f16>(tensor).into_iter().map(|h| i32::from(h.to_bits())).collect(),
    }
    Ok(proto)
}

/// KServe typed contents -> engine tensor of an admitted `element` and `shape`. Each
/// datatype has exactly one contents field, and it must hold exactly the shape's elements.
pub fn tensor_from_kserve(
    name: &str,
    element: Element,
    shape: &[usize],
    contents: InferTensorContents,
) -> Result<Tensor, String> {
    let c = &contents;
    match element {
        Element::Bool => fill(name, shape, &c.bool_contents, false, same),
        Element::I8 => fill::<i32, i8>(name, shape, &c.int_contents, false, narrow(name, "INT8")),
        Element::I16 => fill::<i32, i16>(name, shape, &c.int_contents, false, narrow(name, "INT16")),
        Element::I32 => fill(name, shape, &c.int_contents, false, same),
        Element::I64 => fill(name, shape, &c.int64_contents, false, same),
        Element::U8 => fill::<u32, u8>(name, shape, &c.uint_contents, false, narrow(name, "UINT8")),
        Element::U16 => fill::<u32, u16>(name, shape, &c.uint_contents, false, narrow(name, "UINT16")),
        Element::U32 => fill(name, shape, &c.uint_contents, false, same),
        Element::U64 => fill(name, shape, &c.uint64_contents, false, same),
        Element::F32 => fill(name, shape, &c.fp32_contents, false, same),
        Element::F64 => fill(name, shape, &c.fp64_contents, false, same),
        Element::F16 => Err(format!("tensor {name:?}: FP16 has no typed contents field; send raw_input_contents")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(dims: &[i64]) -> Option<TensorShapeProto> {
        Some(TensorShapeProto {
            dim: dims.iter().map(|&size| tensor_shape_proto::Dim { size, ..Default::default() }).collect(),
            ..Default::default()
        })
    }

    /// Decodes as admission would after checking the proto's declared dtype and shape.
    fn decode(proto: &TensorProto) -> Result<Tensor, String> {
        let element = Element::from_tf_dtype(proto.dtype).expect("a supported dtype");
        let dims: Vec<usize> = proto.tensor_shape.as_ref().unwrap().dim.iter().map(|d| d.size as usize).collect();
        tensor_from_proto("sensors", element, &dims, proto.clone())
    }

    #[test]
    fn typed_and_content_forms_decode_to_the_same_tensor() {
        let typed = TensorProto {
            dtype: 1,
            tensor_shape: shape(&[2, 2]),
            float_val: vec![1.0, 2.0, 3.0, 4.0],
            ..Default::default()
        };
        let bytes: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|f| f.to_le_bytes()).collect();
        let content =
            TensorProto { dtype: 1, tensor_shape: shape(&[2, 2]), tensor_content: bytes, ..Default::default() };
        let a = decode(&typed).unwrap();
        let b = decode(&content).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.shape(), &[2, 2]);
        // and back: typed by default, content when asked
        let out = tensor_to_proto("y", &a, false).unwrap();
        assert_eq!(out.float_val, vec![1.0, 2.0, 3.0, 4.0]);
        assert!(out.tensor_content.is_empty());
        let out = tensor_to_proto("y", &a, true).unwrap();
        assert!(out.float_val.is_empty());
        assert_eq!(decode(&out).unwrap(), a);
    }

    #[test]
    fn typed_values_follow_tensorflow_fill_rules() {
        let one = TensorProto { dtype: 9, tensor_shape: shape(&[3]), int64_val: vec![7], ..Default::default() };
        let t = decode(&one).unwrap();
        assert_eq!(t.try_as_plain_ram().unwrap().as_slice::<i64>().unwrap(), &[7, 7, 7]);
        let none = TensorProto { dtype: 1, tensor_shape: shape(&[2]), ..Default::default() };
        assert_eq!(decode(&none).unwrap().try_as_plain_ram().unwrap().as_slice::<f32>().unwrap(), &[0.0, 0.0]);
        let narrow = TensorProto { dtype: 6, tensor_shape: shape(&[3]), int_val: vec![1, -2], ..Default::default() };
        assert_eq!(decode(&narrow).unwrap().try_as_plain_ram().unwrap().as_slice::<i8>().unwrap(), &[1, -2, -2]);
        let too_many = TensorProto { dtype: 9, tensor_shape: shape(&[1]), int64_val: vec![1, 2], ..Default::default() };
        assert!(decode(&too_many).unwrap_err().contains("2 values"));
    }

    #[test]
    fn kserve_contents_must_hold_exactly_the_shape() {
        let contents = InferTensorContents { fp32_contents: vec![1.0, 2.0], ..Default::default() };
        let t = tensor_from_kserve("x", Element::F32, &[1, 2], contents.clone()).unwrap();
        assert_eq!(t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap(), &[1.0, 2.0]);
        let error = tensor_from_kserve("x", Element::F32, &[1, 3], contents).unwrap_err();
        assert!(error.contains("2 values") && error.contains("holds 3"), "{error}");
        let wide = InferTensorContents { uint_contents: vec![256], ..Default::default() };
        assert!(tensor_from_kserve("x", Element::U8, &[1], wide).unwrap_err().contains("UINT8"));
    }

    #[test]
    fn bad_tensors_are_refused_with_the_tensor_named() {
        let cases = [
            (
                TensorProto { dtype: 1, tensor_shape: shape(&[2]), tensor_content: vec![0; 5], ..Default::default() },
                "needs 8",
            ),
            (
                TensorProto { dtype: 10, tensor_shape: shape(&[1]), tensor_content: vec![2], ..Default::default() },
                "0 or 1",
            ),
            (TensorProto { dtype: 4, tensor_shape: shape(&[1]), int_val: vec![300], ..Default::default() }, "uint8"),
        ];
        for (proto, expected) in cases {
            let error = decode(&proto).unwrap_err();
            assert!(error.contains("\"sensors\"") && error.contains(expected), "{error} (wanted {expected})");
        }
    }
}
