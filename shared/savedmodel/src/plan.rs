//! A compiled signature: an optimized tract plan plus the mapping between signature
//! keys and plan inputs/outputs.
//!
//! Unknown dimensions become tract symbols: axis 0 of every input shares the symbol `N`
//! (the batch, which TF requires to agree across inputs), other unknown axes get their own
//! symbol. The plan is therefore built once and runs any batch size. (A second plan with
//! the batch fixed to 1 was tried for single-row calls: tract optimizes it into more nodes,
//! not fewer, and it was no faster; pooling execution states made no measurable difference
//! either. See docs/benchmarks.md.)
//!
//! A symbolic batch does cost something in big batches: tract picks its fast kernels for
//! broadcasting element-wise ops (a row by a scalar, a row by a row) only where it can
//! prove the operands are big enough, and with `N` free it cannot (`N` may be 1). So a
//! signature gets a second plan for calls of at least [`LARGE_BATCH`] rows, built with the
//! assertion `N >= LARGE_BATCH`, when that plan differs from the first and the graph is
//! small enough to hold twice. It ran the bundled windowed model (v3) 1.4x as fast at 100
//! rows a call; a dense network alone gets the same plan twice and keeps one.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;

use prost::Message;

use tract_tensorflow::tract_hir::internal::*;
use tract_tensorflow::tract_hir::prelude::{InferenceModelExt, TypedRunnableModel};

use crate::error::{LoadError, PredictError};
use crate::freeze::FrozenGraph;
use crate::saved_model::{SignatureSpec, engine};

/// Symbol used for the batch axis of every input.
const BATCH_SYMBOL: &str = "N";

/// Calls of at least this many rows run on the large-batch plan, when there is one.
pub const LARGE_BATCH: usize = 32;

/// Largest frozen graph (its constants, mostly) given a second, large-batch plan: each plan
/// holds its own packed copy of the weights.
const LARGE_BATCH_PLAN_MAX_GRAPH_BYTES: usize = 64 << 20;

/// An input's datum type and shape as the plan expects them (`None` = any size).
#[derive(Debug, Clone)]
struct InputCheck {
    key: String,
    datum_type: DatumType,
    dims: Vec<Option<usize>>,
}

/// Signature output key -> index in the plan's outputs.
type OutputMap = Vec<(String, usize)>;

/// A signature ready to run, safe to share across threads (hold it in an `Arc`).
#[derive(Debug)]
pub struct SignaturePlan {
    spec: SignatureSpec,
    /// Runs any batch size.
    plan: Arc<TypedRunnableModel>,
    /// Runs batches of at least [`LARGE_BATCH`] rows, faster; see the module docs.
    large_batch_plan: Option<Arc<TypedRunnableModel>>,
    inputs: Vec<InputCheck>,
    outputs: OutputMap,
}

impl SignaturePlan {
    pub(crate) fn build(pb_path: &Path, spec: SignatureSpec, frozen: &FrozenGraph) -> Result<Self, LoadError> {
        let error = |detail: String| LoadError::Plan { path: pb_path.to_owned(), signature: spec.name.clone(), detail };
        let mut inputs = Vec::new();
        for (key, _) in &frozen.inputs {
            let tensor = &spec.inputs[key];
            let datum_type = DatumType::try_from(tensor.dtype)
                .ok()
                .filter(|dt| dt.is_number() || *dt == DatumType::Bool)
                .ok_or_else(|| {
                    error(format!(
                        "input {key:?} has dtype {}; only numeric inputs are supported",
                        tensor.dtype.as_str_name()
                    ))
                })?;
            let shape = tensor
                .shape
                .as_ref()
                .ok_or_else(|| error(format!("input {key:?} has an unknown rank; the engine needs a rank")))?;
            let dims = shape.iter().map(|&d| usize::try_from(d).ok()).collect();
            inputs.push(InputCheck { key: key.clone(), datum_type, dims });
        }

        // tract may panic on graphs it does not expect; a bad model must not take the
        // process down, so a panic becomes a load error like any other.
        let (plan, outputs) = catch_unwind(AssertUnwindSafe(|| build_plan(frozen, &inputs, None)))
            .map_err(|panic| error(format!("the engine panicked: {}", panic_message(&panic))))?
            .map_err(|e| error(format!("{e:#}")))?;
        // The large-batch plan is an optimization: if it cannot be built, calls use the first.
        let has_batch_axis = inputs.iter().any(|i| i.dims.first() == Some(&None));
        let large_batch_plan = (has_batch_axis && frozen.graph.encoded_len() <= LARGE_BATCH_PLAN_MAX_GRAPH_BYTES)
            .then(|| catch_unwind(AssertUnwindSafe(|| build_plan(frozen, &inputs, Some(LARGE_BATCH)))).ok()?.ok())
            .flatten()
            .map(|(large, _)| large)
            .filter(|large| op_names(large) != op_names(&plan));
        Ok(Self { spec, plan, large_batch_plan, inputs, outputs })
    }

    pub fn spec(&self) -> &SignatureSpec {
        &self.spec
    }

    /// Whether calls of [`LARGE_BATCH`] rows or more run on a plan of their own.
    pub fn has_large_batch_plan(&self) -> bool {
        self.large_batch_plan.is_some()
    }

    fn plan_for(&self, rows: Option<usize>) -> &Arc<TypedRunnableModel> {
        match (&self.large_batch_plan, rows) {
            (Some(large), Some(rows)) if rows >= LARGE_BATCH => large,
            _ => &self.plan,
        }
    }

    /// Whether every input's first axis is the batch, so requests can be merged row-wise.
    pub fn is_batchable(&self) -> bool {
        !self.inputs.is_empty() && self.inputs.iter().all(|i| i.dims.first() == Some(&None))
    }

    /// Runs the signature. Inputs are keyed by signature input name; outputs likewise.
    pub fn run(
        &self,
        inputs: impl IntoIterator<Item = (String, Tensor)>,
    ) -> Result<BTreeMap<String, Tensor>, PredictError> {
        let prepared = self.prepare(inputs)?;
        self.run_prepared(prepared)
    }

    /// Validates inputs (names, dtypes, shapes, agreeing batch sizes) and puts them in plan
    /// order, without running anything: servers check a request before queueing it.
    pub fn prepare(&self, inputs: impl IntoIterator<Item = (String, Tensor)>) -> Result<PreparedInputs, PredictError> {
        let mut given: BTreeMap<String, Tensor> = BTreeMap::new();
        for (name, tensor) in inputs {
            if !self.inputs.iter().any(|i| i.key == name) {
                return Err(PredictError::UnknownInput {
                    name,
                    expected: self.inputs.iter().map(|i| i.key.clone()).collect(),
                });
            }
            given.insert(name, tensor);
        }
        let mut ordered = Vec::with_capacity(self.inputs.len());
        let mut batch: Option<(&str, usize)> = None;
        for check in &self.inputs {
            let tensor =
                given.remove(&check.key).ok_or_else(|| PredictError::MissingInput { name: check.key.clone() })?;
            check.validate(&tensor)?;
            if check.dims.first() == Some(&None) {
                let size = tensor.shape()[0];
                match batch {
                    Some((other, expected)) if expected != size => {
                        return Err(PredictError::Batch {
                            detail: format!("{other:?} has {expected} rows, {:?} has {size}", check.key),
                        });
                    }
                    _ => batch = Some((&check.key, size)),
                }
            }
            ordered.push(tensor);
        }
        Ok(PreparedInputs { tensors: ordered, rows: batch.map(|(_, rows)| rows) })
    }

    /// Runs inputs already checked by [`SignaturePlan::prepare`].
    pub fn run_prepared(&self, prepared: PreparedInputs) -> Result<BTreeMap<String, Tensor>, PredictError> {
        let plan = self.plan_for(prepared.rows);
        let ordered: TVec<TValue> = prepared.tensors.into_iter().map(Tensor::into_tvalue).collect();
        let mut results = catch_unwind(AssertUnwindSafe(|| plan.run(ordered)))
            .map_err(|panic| PredictError::Engine(format!("the engine panicked: {}", panic_message(&panic))))?
            .map_err(|e| PredictError::Engine(format!("{e:#}")))?;
        // Each plan output is moved out once; outputs sharing a tensor get a copy.
        let mut taken: Vec<Option<TValue>> = results.drain(..).map(Some).collect();
        let mut outputs = BTreeMap::new();
        for (position, (key, index)) in self.outputs.iter().enumerate() {
            let shared = self.outputs[position + 1..].iter().any(|(_, i)| i == index);
            let value = if shared { taken[*index].clone() } else { taken[*index].take() };
            let value = value.ok_or_else(|| PredictError::Engine(format!("output {key:?} was not produced")))?;
            outputs.insert(key.clone(), value.into_tensor());
        }
        Ok(outputs)
    }

    /// Runs several prepared requests as one batch: inputs are concatenated along the batch
    /// axis (padded to `pad_to` rows by repeating the first row, if given), run once, and
    /// every output is split back so each request gets exactly its own rows, in order.
    /// Only for [batchable](SignaturePlan::is_batchable) signatures.
    pub fn run_batch(
        &self,
        requests: Vec<PreparedInputs>,
        pad_to: Option<usize>,
    ) -> Result<Vec<BTreeMap<String, Tensor>>, PredictError> {
        if requests.len() == 1 && pad_to.is_none() {
            let only = requests.into_iter().next().expect("one request");
            return Ok(vec![self.run_prepared(only)?]);
        }
        if !self.is_batchable() {
            return Err(PredictError::Batch { detail: "this signature has inputs without a batch axis".into() });
        }
        let rows: Vec<usize> = requests.iter().map(|r| r.rows.unwrap_or(0)).collect();
        let total: usize = rows.iter().sum();
        let padding = pad_to.map_or(0, |p| p.saturating_sub(total));
        let mut merged = Vec::with_capacity(self.inputs.len());
        for (position, check) in self.inputs.iter().enumerate() {
            let mut parts: Vec<Tensor> = Vec::with_capacity(requests.len() + 1);
            parts.extend(requests.iter().map(|r| r.tensors[position].clone()));
            if padding > 0 {
                let first = parts
                    .iter()
                    .find(|t| t.shape()[0] > 0)
                    .ok_or_else(|| PredictError::Batch { detail: "cannot pad a batch with no rows".into() })?;
                let row = first.slice(0, 0, 1).map_err(|e| PredictError::Engine(format!("{e:#}")))?;
                parts.extend(std::iter::repeat_n(row, padding));
            }
            let tensor = Tensor::stack_tensors(0, &parts)
                .map_err(|e| PredictError::Engine(format!("merging input {:?}: {e:#}", check.key)))?;
            merged.push(tensor);
        }
        let outputs = self.run_prepared(PreparedInputs { tensors: merged, rows: Some(total + padding) })?;
        let mut split: Vec<BTreeMap<String, Tensor>> = vec![BTreeMap::new(); rows.len()];
        for (key, tensor) in outputs {
            if tensor.rank() == 0 || tensor.shape()[0] != total + padding {
                return Err(PredictError::Engine(format!(
                    "output {key:?} has shape {:?}, which does not keep the batch axis; it cannot be batched",
                    tensor.shape()
                )));
            }
            let mut start = 0;
            for (slot, &n) in split.iter_mut().zip(&rows) {
                let part = tensor.slice(0, start, start + n).map_err(|e| PredictError::Engine(format!("{e:#}")))?;
                slot.insert(key.clone(), part);
                start += n;
            }
        }
        Ok(split)
    }
}

/// Inputs validated against a signature, in plan order. See [`SignaturePlan::prepare`].
#[derive(Debug, Clone)]
pub struct PreparedInputs {
    tensors: Vec<Tensor>,
    rows: Option<usize>,
}

impl PreparedInputs {
    /// The batch size, when the signature has a batch axis.
    pub fn rows(&self) -> Option<usize> {
        self.rows
    }
}

impl InputCheck {
    fn validate(&self, tensor: &Tensor) -> Result<(), PredictError> {
        if tensor.datum_type() != self.datum_type {
            return Err(PredictError::Dtype {
                name: self.key.clone(),
                expected: format!("{:?}", self.datum_type).to_lowercase(),
                got: format!("{:?}", tensor.datum_type()).to_lowercase(),
            });
        }
        let shape = tensor.shape();
        let fits =
            shape.len() == self.dims.len() && self.dims.iter().zip(shape).all(|(d, s)| d.is_none_or(|d| d == *s));
        if !fits {
            let expected = self.dims.iter().map(|d| d.map_or("-1".to_owned(), |d| d.to_string())).collect::<Vec<_>>();
            return Err(PredictError::Shape {
                name: self.key.clone(),
                expected: format!("[{}]", expected.join(",")),
                got: shape.to_vec(),
            });
        }
        Ok(())
    }
}

/// Builds the signature's plan; with `min_batch`, one that may assume at least that many rows.
fn build_plan(
    frozen: &FrozenGraph,
    inputs: &[InputCheck],
    min_batch: Option<usize>,
) -> TractResult<(Arc<TypedRunnableModel>, OutputMap)> {
    let mut model = engine().parse_graph(&frozen.graph)?.0;
    let batch = model.symbols.sym(BATCH_SYMBOL).to_dim();
    if let Some(min) = min_batch {
        model.symbols.add_assertion(format!("{BATCH_SYMBOL}>={min}"))?;
    }
    for (ix, check) in inputs.iter().enumerate() {
        let shape: TVec<TDim> = check
            .dims
            .iter()
            .enumerate()
            .map(|(axis, d)| match d {
                Some(d) => d.to_dim(),
                None if axis == 0 => batch.clone(),
                None => model.symbols.sym(&format!("{}_{axis}", check.key)).to_dim(),
            })
            .collect();
        model.set_input_fact(ix, InferenceFact::dt_shape(check.datum_type, shape))?;
    }
    // Several signature outputs may name the same tensor: give the plan each tensor once.
    let mut outlets: Vec<OutletId> = Vec::new();
    let mut outputs = Vec::new();
    for (key, node, index) in &frozen.outputs {
        let outlet = OutletId::new(model.node_id_by_name(node)?, *index);
        let position = outlets.iter().position(|o| *o == outlet).unwrap_or_else(|| {
            outlets.push(outlet);
            outlets.len() - 1
        });
        outputs.push((key.clone(), position));
    }
    model.select_output_outlets(&outlets)?;
    let mut optimized = model.into_optimized()?;
    crate::reduce::speed_up_extremes(&mut optimized)?;
    Ok((optimized.into_runnable()?, outputs))
}

/// The plan's ops in order: two plans with the same ops are the same plan.
fn op_names(plan: &TypedRunnableModel) -> Vec<String> {
    plan.model().nodes.iter().map(|node| node.op.name().into_owned()).collect()
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_plan_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<super::SignaturePlan>();
    }
}
