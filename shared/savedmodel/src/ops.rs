//! TensorFlow ops that common Keras / `tf.function` exports use and that tract-tensorflow
//! 0.23 does not register, added to its op register so such models load instead of being
//! rejected.
//!
//! Each entry lowers the TF op onto tract's own core ops, with TensorFlow's semantics
//! (e.g. `Softmax` over the last axis, a numerically stable `Softplus`). Parity with
//! TensorFlow is proven by the `elementwise_ops` and `keras_activations` fixtures.

use tract_tensorflow::model::{ParsingContext, TfOpRegister};
use tract_tensorflow::tfpb::tensorflow::NodeDef;
use tract_tensorflow::tract_hir::internal::*;
use tract_tensorflow::tract_hir::ops;
use tract_tensorflow::tract_hir::ops::activations;
use tract_tensorflow::tract_hir::ops::binary::BinIntoHir;
use tract_tensorflow::tract_hir::ops::element_wise::ElementWiseIntoHir;
use tract_tensorflow::tract_hir::tract_core::ops::math as core_math;

/// SELU constants, as in `tf.nn.selu`.
const SELU_ALPHA: f32 = 1.673_263_2;
const SELU_SCALE: f32 = 1.050_701;

/// Registers every op this module provides. Three replace tract's own: `Softmax`, whose
/// ONNX-style "flatten from axis 1" semantics differ from TensorFlow's last-axis softmax for
/// rank > 2; `ExpandDims`, which tract wires at `axis + rank` instead of TensorFlow's
/// `axis + rank + 1` for negative axes (Keras `Conv1D` uses axis -3); and `ConcatV2`, which
/// tract casts to `usize` unresolved, so Keras' `axis=-1` makes its shape inference loop
/// without end.
pub(crate) fn register(reg: &mut TfOpRegister) {
    reg.insert("Square", |_, _| Ok(core_math::square().into_hir()));
    reg.insert("Exp", |_, _| Ok(core_math::exp().into_hir()));
    reg.insert("Sqrt", |_, _| Ok(core_math::sqrt().into_hir()));
    reg.insert("Reciprocal", |_, _| Ok(core_math::recip().into_hir()));
    reg.insert("Inv", |_, _| Ok(core_math::recip().into_hir()));
    reg.insert("Floor", |_, _| Ok(core_math::floor().into_hir()));
    // TF rounds half to even ("banker's rounding").
    reg.insert("Round", |_, _| Ok(core_math::round_half_to_even().into_hir()));
    reg.insert("Sign", |_, _| Ok(core_math::sign().into_hir()));
    reg.insert("Sin", |_, _| Ok(core_math::sin().into_hir()));
    reg.insert("Cos", |_, _| Ok(core_math::cos().into_hir()));
    reg.insert("Erf", |_, _| Ok(core_math::erf().into_hir()));
    reg.insert("Erfc", |_, _| Ok(expand(Erfc)));
    reg.insert("Log1p", |_, _| Ok(expand(Log1p)));
    reg.insert("Softplus", |_, _| Ok(expand(StableSoftplus)));
    reg.insert("Softsign", |_, _| Ok(expand(activations::Softsign)));
    reg.insert("Elu", |_, _| Ok(expand(activations::Elu(1.0))));
    reg.insert("Selu", |_, _| Ok(expand(activations::Selu(SELU_ALPHA, SELU_SCALE))));
    reg.insert("LeakyRelu", leaky_relu);
    reg.insert("SquaredDifference", |_, _| Ok(expand(SquaredDifference)));
    reg.insert("NotEqual", |_, _| Ok(ops::logic::CompNE.into_hir()));
    reg.insert("LogicalNot", |_, _| Ok(ops::logic::not().into_hir()));
    reg.insert("SelectV2", |_, _| Ok(expand(ops::logic::Iff)));
    reg.insert("Select", |_, _| Ok(expand(ops::logic::Iff)));
    reg.insert("Softmax", |_, _| Ok(expand(ops::nn::Softmax::new(-1))));
    reg.insert("LogSoftmax", |_, _| Ok(expand(LastAxisLogSoftmax)));
    reg.insert("ArgMax", arg_max);
    reg.insert("BatchMatMul", batch_mat_mul);
    reg.insert("BatchMatMulV2", batch_mat_mul);
    reg.insert("BatchMatMulV3", batch_mat_mul);
    reg.insert("ExpandDims", |_, _| Ok(expand(ExpandDims)));
    reg.insert("ConcatV2", |_, _| Ok(expand(ConcatV2)));
    reg.insert("FusedBatchNormV2", tract_tensorflow::ops::nn::fused_batch_norm::fused_batch_norm);
    reg.insert("FusedBatchNormV3", tract_tensorflow::ops::nn::fused_batch_norm::fused_batch_norm);
}

fn leaky_relu(_: &ParsingContext, node: &NodeDef) -> TractResult<Box<dyn InferenceOp>> {
    let alpha = node.get_attr_opt_float::<f32>("alpha")?.unwrap_or(0.2);
    Ok(expand(activations::LeakyRelu(alpha)))
}

fn batch_mat_mul(_: &ParsingContext, node: &NodeDef) -> TractResult<Box<dyn InferenceOp>> {
    let adj_x = node.get_attr_opt_bool("adj_x")?.unwrap_or(false);
    let adj_y = node.get_attr_opt_bool("adj_y")?.unwrap_or(false);
    Ok(expand(ops::matmul::MatMulInference::default().with_a_trans(adj_x).with_b_trans(adj_y)))
}

fn arg_max(_: &ParsingContext, node: &NodeDef) -> TractResult<Box<dyn InferenceOp>> {
    let output_type = node.get_attr_opt_datum_type("output_type")?.unwrap_or(DatumType::I64);
    if !matches!(output_type, DatumType::I64 | DatumType::I32) {
        bail!("ArgMax output_type must be int32 or int64, found {output_type:?}");
    }
    Ok(expand(ArgMax { output_type }))
}

/// Resolves a TF axis argument against `positions` valid positions (the rank, or the
/// rank + 1 for ops that insert an axis); negative axes count from the end.
fn tf_axis(op: &str, axis: &Tensor, positions: i64) -> TractResult<usize> {
    let axis = axis.cast_to_scalar::<i64>()?;
    let resolved = if axis < 0 { axis + positions } else { axis };
    if !(0..positions).contains(&resolved) {
        bail!("{op} axis {axis} is out of range ({positions} positions)");
    }
    Ok(resolved as usize)
}

/// A constant of `value` with `like`'s datum type, broadcastable against it.
fn scalar_like(model: &mut TypedModel, name: String, like: OutletId, value: f32) -> TractResult<OutletId> {
    let fact = model.outlet_fact(like)?.clone();
    let scalar = tensor0(value).cast_to_dt(fact.datum_type)?.into_owned();
    let scalar = scalar.broadcast_into_rank(fact.rank())?;
    model.add_const(name, scalar)
}

fn unary_rules<'r, 'p: 'r>(
    s: &mut Solver<'r>,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
) -> InferenceResult {
    check_input_arity(inputs, 1)?;
    check_output_arity(outputs, 1)?;
    s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
    s.equals(&inputs[0].shape, &outputs[0].shape)?;
    Ok(())
}

/// `softplus(x) = max(x, 0) + ln(1 + exp(-|x|))`: never overflows, unlike `ln(1 + exp(x))`.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct StableSoftplus;

impl Expansion for StableSoftplus {
    fn name(&self) -> StaticName {
        "Softplus".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        unary_rules(s, inputs, outputs)
    }

    fn wire(&self, name: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let x = inputs[0];
        let zero = scalar_like(model, format!("{name}.zero"), x, 0.0)?;
        let one = scalar_like(model, format!("{name}.one"), x, 1.0)?;
        let abs = model.wire_node(format!("{name}.abs"), core_math::abs(), &[x])?[0];
        let neg_abs = model.wire_node(format!("{name}.neg_abs"), core_math::neg(), &[abs])?[0];
        let exp = model.wire_node(format!("{name}.exp"), core_math::exp(), &[neg_abs])?[0];
        let one_plus = model.wire_node(format!("{name}.one_plus"), core_math::add(), &[one, exp])?[0];
        let ln = model.wire_node(format!("{name}.ln"), core_math::ln(), &[one_plus])?[0];
        let relu = model.wire_node(format!("{name}.relu"), core_math::max(), &[x, zero])?[0];
        model.wire_node(name, core_math::add(), &[relu, ln])
    }
}

/// `erfc(x) = 1 - erf(x)`.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Erfc;

impl Expansion for Erfc {
    fn name(&self) -> StaticName {
        "Erfc".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        unary_rules(s, inputs, outputs)
    }

    fn wire(&self, name: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let one = scalar_like(model, format!("{name}.one"), inputs[0], 1.0)?;
        let erf = model.wire_node(format!("{name}.erf"), core_math::erf(), inputs)?[0];
        model.wire_node(name, core_math::sub(), &[one, erf])
    }
}

/// `log1p(x) = ln(1 + x)`.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Log1p;

impl Expansion for Log1p {
    fn name(&self) -> StaticName {
        "Log1p".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        unary_rules(s, inputs, outputs)
    }

    fn wire(&self, name: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let one = scalar_like(model, format!("{name}.one"), inputs[0], 1.0)?;
        let sum = model.wire_node(format!("{name}.one_plus"), core_math::add(), &[one, inputs[0]])?[0];
        model.wire_node(name, core_math::ln(), &[sum])
    }
}

/// `squared_difference(a, b) = (a - b)^2`, with TF's broadcasting.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct SquaredDifference;

impl Expansion for SquaredDifference {
    fn name(&self) -> StaticName {
        "SquaredDifference".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        ops::binary::rules(s, inputs, outputs, |a, b| {
            a.common_super_type(b).with_context(|| format!("no common type for {a:?} and {b:?}"))
        })
    }

    fn wire(&self, name: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let (a, b) = (model.outlet_fact(inputs[0])?.datum_type, model.outlet_fact(inputs[1])?.datum_type);
        let dt = a.common_super_type(b).with_context(|| format!("no common type for {a:?} and {b:?}"))?;
        let wires = ops::binary::wire_rank_broadcast(name, model, inputs)?;
        let wires = ops::binary::wire_cast(name, model, &wires, dt)?;
        let diff = model.wire_node(format!("{name}.sub"), core_math::sub(), &wires)?;
        model.wire_node(name, core_math::square(), &diff)
    }
}

/// `log_softmax` over the last axis: `x - max - ln(sum(exp(x - max)))`.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct LastAxisLogSoftmax;

impl Expansion for LastAxisLogSoftmax {
    fn name(&self) -> StaticName {
        "LogSoftmax".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        unary_rules(s, inputs, outputs)
    }

    fn wire(&self, name: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        use tract_tensorflow::tract_hir::tract_core::ops::nn::{Reduce, Reducer};
        let x = inputs[0];
        let axis = model.outlet_fact(x)?.rank().checked_sub(1).context("log_softmax of a scalar")?;
        let max = model.wire_node(format!("{name}.max"), Reduce::new(tvec![axis], Reducer::Max), &[x])?[0];
        let shifted = model.wire_node(format!("{name}.shift"), core_math::sub(), &[x, max])?[0];
        let exp = model.wire_node(format!("{name}.exp"), core_math::exp(), &[shifted])?[0];
        let sum = model.wire_node(format!("{name}.sum"), Reduce::new(tvec![axis], Reducer::Sum), &[exp])?[0];
        let ln = model.wire_node(format!("{name}.ln"), core_math::ln(), &[sum])?[0];
        model.wire_node(name, core_math::sub(), &[shifted, ln])
    }
}

/// TF `ArgMax(input, dimension)`: the axis is a (constant) input, the result drops it.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct ArgMax {
    output_type: DatumType,
}

impl Expansion for ArgMax {
    fn name(&self) -> StaticName {
        "ArgMax".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, self.output_type)?;
        s.equals(inputs[0].rank.bex() - 1, &outputs[0].rank)?;
        s.given_2(&inputs[0].shape, &inputs[1].value, move |s, shape, axis| {
            let axis = tf_axis("ArgMax", &axis, shape.len() as i64)?;
            let mut out = shape.clone();
            out.remove(axis);
            s.equals(&outputs[0].shape, out)
        })
    }

    fn wire(&self, name: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let rank = model.outlet_fact(inputs[0])?.rank() as i64;
        let axis = model.outlet_fact(inputs[1])?.konst.clone().context("ArgMax needs a constant axis")?;
        let axis = tf_axis("ArgMax", &axis, rank)?;
        let reduce = ops::nn::Reduce::new(Some(vec![axis as i64]), false, ops::nn::Reducer::ArgMax(false));
        let wire = reduce.wire(&format!("{name}.argmax"), model, &inputs[..1])?;
        if self.output_type == DatumType::I64 {
            Ok(wire)
        } else {
            model.wire_node(name, ops::cast::cast(self.output_type), &wire)
        }
    }
}

/// TF `ExpandDims(input, axis)`: a negative axis counts from the end of the *output*.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct ExpandDims;

impl Expansion for ExpandDims {
    fn name(&self) -> StaticName {
        "ExpandDims".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(inputs[0].rank.bex() + 1, &outputs[0].rank)?;
        s.given_2(&inputs[0].shape, &inputs[1].value, move |s, shape, axis| {
            let axis = tf_axis("ExpandDims", &axis, shape.len() as i64 + 1)?;
            let mut out = shape.clone();
            out.insert(axis, 1.to_dim());
            s.equals(&outputs[0].shape, out)
        })
    }

    fn wire(&self, name: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let rank = model.outlet_fact(inputs[0])?.rank() as i64;
        let axis = model.outlet_fact(inputs[1])?.konst.clone().context("ExpandDims needs a constant axis")?;
        let axis = tf_axis("ExpandDims", &axis, rank + 1)?;
        model.wire_node(name, AxisOp::Add(axis), &inputs[..1])
    }
}

/// TF `ConcatV2(values.., axis)`, with negative axes counted from the end.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct ConcatV2;

impl Expansion for ConcatV2 {
    fn name(&self) -> StaticName {
        "ConcatV2".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_output_arity(outputs, 1)?;
        let n = inputs.len().checked_sub(1).filter(|n| *n > 0).context("ConcatV2 needs values and an axis")?;
        s.equals_all((0..n).map(|i| (&inputs[i].datum_type).bex()).collect())?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals_all((0..n).map(|i| (&inputs[i].rank).bex()).collect())?;
        s.equals(&outputs[0].rank, &inputs[0].rank)?;
        s.given_2(&inputs[n].value, &inputs[0].rank, move |s, axis, rank| {
            let axis = tf_axis("ConcatV2", &axis, rank)?;
            for d in (0..rank as usize).filter(|d| *d != axis) {
                s.equals_all((0..n).map(|i| (&inputs[i].shape[d]).bex()).collect())?;
                s.equals(&inputs[0].shape[d], &outputs[0].shape[d])?;
            }
            let mut concat_dim = -1 * outputs[0].shape[axis].bex();
            for input in inputs.iter().take(n) {
                concat_dim = concat_dim + input.shape[axis].bex();
            }
            s.equals_zero(concat_dim)
        })
    }

    fn wire(&self, name: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let (axis, values) = inputs.split_last().context("ConcatV2 without inputs")?;
        let rank = model.outlet_fact(values[0])?.rank() as i64;
        let axis = model.outlet_fact(*axis)?.konst.clone().context("ConcatV2 needs a constant axis")?;
        let axis = tf_axis("ConcatV2", &axis, rank)?;
        model.wire_node(name, ops::array::TypedConcat::new(axis), values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_axes_count_from_the_end_like_tensorflow() {
        // ConcatV2 on rank 2: -1 is the last axis.
        assert_eq!(tf_axis("ConcatV2", &tensor0(-1i32), 2).unwrap(), 1);
        // ExpandDims on rank 3 has 4 insertion points: -3 inserts at 1 (Keras Conv1D).
        assert_eq!(tf_axis("ExpandDims", &tensor0(-3i64), 3 + 1).unwrap(), 1);
        assert_eq!(tf_axis("ArgMax", &tensor0(0i32), 2).unwrap(), 0);
        let err = tf_axis("ArgMax", &tensor0(2i32), 2).unwrap_err().to_string();
        assert_eq!(err, "ArgMax axis 2 is out of range (2 positions)");
    }
}
