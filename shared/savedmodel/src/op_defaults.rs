//! Default attr values of TensorFlow ops.
//!
//! TensorFlow strips attrs that equal their OpDef default from function bodies
//! (`FunctionDef.node_def`), while tract-tensorflow's op builders expect them present,
//! as they are in TF1 top-level graphs. The freezer restores them from this table,
//! which copies the defaults of TensorFlow's op registry for the ops the engine runs.

use std::collections::HashMap;

use tract_tensorflow::tfpb::tensorflow::attr_value::{ListValue, Value};
use tract_tensorflow::tfpb::tensorflow::{AttrValue, DataType};

enum AttrDefault {
    Bool(bool),
    Int(i64),
    Float(f32),
    Str(&'static str),
    Type(DataType),
    Ints(&'static [i64]),
}

const INT32: AttrDefault = AttrDefault::Type(DataType::DtInt32);

fn defaults(op: &str) -> &'static [(&'static str, AttrDefault)] {
    use AttrDefault::*;
    match op {
        "MatMul" => &[("transpose_a", Bool(false)), ("transpose_b", Bool(false))],
        "BatchMatMul" | "BatchMatMulV2" | "BatchMatMulV3" => &[("adj_x", Bool(false)), ("adj_y", Bool(false))],
        "Sum" | "Mean" | "Max" | "Min" | "Prod" | "All" | "Any" => &[("keep_dims", Bool(false)), ("Tidx", INT32)],
        "ArgMax" | "ArgMin" => &[("Tidx", INT32), ("output_type", Type(DataType::DtInt64))],
        "Pack" | "Unpack" => &[("axis", Int(0))],
        "ConcatV2" => &[("Tidx", INT32)],
        "Conv2D" => &[
            ("data_format", Str("NHWC")),
            ("dilations", Ints(&[1, 1, 1, 1])),
            ("use_cudnn_on_gpu", Bool(true)),
            ("explicit_paddings", Ints(&[])),
        ],
        "DepthwiseConv2dNative" => {
            &[("data_format", Str("NHWC")), ("dilations", Ints(&[1, 1, 1, 1])), ("explicit_paddings", Ints(&[]))]
        }
        "MaxPool" | "AvgPool" => &[("data_format", Str("NHWC")), ("explicit_paddings", Ints(&[]))],
        "FusedBatchNorm" | "FusedBatchNormV2" | "FusedBatchNormV3" => &[
            ("epsilon", Float(0.0001)),
            ("data_format", Str("NHWC")),
            ("is_training", Bool(true)),
            ("exponential_avg_factor", Float(1.0)),
        ],
        "ExpandDims" => &[("Tdim", INT32)],
        "Squeeze" => &[("squeeze_dims", Ints(&[]))],
        "StridedSlice" => &[
            ("begin_mask", Int(0)),
            ("end_mask", Int(0)),
            ("ellipsis_mask", Int(0)),
            ("new_axis_mask", Int(0)),
            ("shrink_axis_mask", Int(0)),
        ],
        "Reshape" => &[("Tshape", INT32)],
        "Transpose" => &[("Tperm", INT32)],
        "Shape" | "Size" => &[("out_type", INT32)],
        "Cast" => &[("Truncate", Bool(false))],
        "GatherV2" => &[("batch_dims", Int(0))],
        "Range" => &[("Tidx", INT32)],
        "Fill" => &[("index_type", INT32)],
        "Pad" | "PadV2" | "MirrorPad" => &[("Tpaddings", INT32)],
        "Tile" => &[("Tmultiples", INT32)],
        "RandomUniform" | "RandomStandardNormal" => &[("seed", Int(0)), ("seed2", Int(0))],
        "LeakyRelu" => &[("alpha", Float(0.2))],
        _ => &[],
    }
}

/// Adds every default attr of `op` that `attrs` lacks.
pub(crate) fn fill(op: &str, attrs: &mut HashMap<String, AttrValue>) {
    for (name, default) in defaults(op) {
        attrs.entry((*name).to_owned()).or_insert_with(|| AttrValue {
            value: Some(match default {
                AttrDefault::Bool(b) => Value::B(*b),
                AttrDefault::Int(i) => Value::I(*i),
                AttrDefault::Float(f) => Value::F(*f),
                AttrDefault::Str(s) => Value::S(s.as_bytes().to_vec()),
                AttrDefault::Type(t) => Value::Type(*t as i32),
                AttrDefault::Ints(list) => Value::List(ListValue { i: list.to_vec(), ..Default::default() }),
            }),
        });
    }
}
