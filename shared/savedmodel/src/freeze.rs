//! Freezing: turn one signature of a SavedModel MetaGraph into a flat `GraphDef` whose
//! weights are `Const` nodes — the only form tract-tensorflow can run.
//!
//! The walk starts at the signature's output tensors and goes backwards, so the result
//! holds exactly what the outputs need (saving/restoring machinery, initialisers and
//! other signatures are never visited). On the way:
//! - function calls (`StatefulPartitionedCall`, `PartitionedCall`, or an op named after a
//!   library function) are inlined: body nodes get the call node's name as a prefix and
//!   argument names are bound to the caller's inputs;
//! - variables become constants read from the checkpoint: a TF2 variable handle is
//!   identified through the object graph (`bound_inputs` of the called concrete function
//!   -> trackable object -> checkpoint key), a TF1 variable by its node or shared name;
//! - pass-through ops (`Identity`, `IdentityN`, `StopGradient`, ...) and control edges
//!   are dropped.
//!
//! The walk is recursive over graph depth; `stacker` grows the stack on demand so deep
//! graphs cannot overflow it, and cycles or runaway function nesting are reported as
//! errors naming the node.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use tract_tensorflow::tfpb::tensorflow::attr_value::Value as AttrValueKind;
use tract_tensorflow::tfpb::tensorflow::{
    AttrValue, DataType, FunctionDef, GraphDef, NodeDef, SignatureDef, TensorInfo, TensorProto,
};

use crate::bundle::TensorBundle;
use crate::error::LoadError;
use crate::op_defaults;

/// Ops whose output `i` is their data input `i` (or `0`): skipped by the freezer.
const PASS_THROUGH_OPS: &[&str] =
    &["Identity", "StopGradient", "Snapshot", "PreventGradient", "EnsureShape", "CheckNumerics"];
/// Ops that call a library function named by their `f` attr.
const CALL_OPS: &[&str] = &["StatefulPartitionedCall", "PartitionedCall"];
/// Ops that create a variable (TF2 resource handles and TF1 ref variables).
const VARIABLE_OPS: &[&str] = &["VarHandleOp", "VariableV2", "Variable"];
/// Function nesting deeper than this is treated as runaway recursion.
const MAX_CALL_DEPTH: usize = 64;
/// Name prefix of the constants that replace variables.
const FROZEN_PREFIX: &str = "vigil_frozen/";

/// Output argument names of the multi-output ops whose outputs a function body may
/// reference by name (`node:arg:index`). Ops not listed have a single output argument.
fn output_args(op: &str) -> Option<&'static [&'static str]> {
    Some(match op {
        "FusedBatchNorm" | "FusedBatchNormV2" | "FusedBatchNormV3" => {
            &["y", "batch_mean", "batch_variance", "reserve_space_1", "reserve_space_2", "reserve_space_3"]
        }
        "Unique" => &["y", "idx"],
        "TopKV2" => &["values", "indices"],
        _ => return None,
    })
}

/// A frozen signature: a self-contained graph plus where its inputs and outputs are.
#[derive(Debug, Clone)]
pub(crate) struct FrozenGraph {
    pub(crate) graph: GraphDef,
    /// Signature input key -> placeholder node name, in the graph's input order.
    pub(crate) inputs: Vec<(String, String)>,
    /// Signature output key -> (node name, output index).
    pub(crate) outputs: Vec<(String, String, usize)>,
    /// Checkpoint keys of the variables that became constants.
    pub(crate) frozen_variables: Vec<String>,
}

/// What the freezer needs from a loaded SavedModel.
pub(crate) struct FreezeInput<'a> {
    pub(crate) pb_path: &'a Path,
    pub(crate) graph: &'a GraphDef,
    pub(crate) bundle: Option<&'a TensorBundle>,
    /// Top-level variable node name -> checkpoint key, from the TF2 object graph.
    pub(crate) variable_keys: &'a HashMap<String, String>,
}

pub(crate) fn freeze(input: &FreezeInput<'_>, name: &str, signature: &SignatureDef) -> Result<FrozenGraph, LoadError> {
    let functions: HashMap<&str, FunctionIndex<'_>> = input
        .graph
        .library
        .iter()
        .flat_map(|lib| &lib.function)
        .filter_map(|f| f.signature.as_ref().map(|s| (s.name.as_str(), FunctionIndex::new(f))))
        .collect();
    let top_nodes: HashMap<&str, &NodeDef> = input.graph.node.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut freezer = Freezer {
        input,
        functions,
        top_nodes,
        scopes: vec![Scope { prefix: String::new(), function: None, args: HashMap::new(), depth: 0 }],
        call_scopes: HashMap::new(),
        emitted: HashMap::new(),
        in_progress: HashSet::new(),
        constants: HashMap::new(),
        names: HashSet::new(),
        placeholders: HashMap::new(),
        nodes: Vec::new(),
    };
    let invalid = |detail: String| LoadError::InvalidSignature {
        path: input.pb_path.to_owned(),
        signature: name.to_owned(),
        detail,
    };

    let mut input_nodes = Vec::new();
    for (key, info, tensor) in dense_tensors(&signature.inputs, "input", invalid)? {
        let (node_name, _) = parse_tensor_name(tensor);
        let node = freezer
            .top_nodes
            .get(node_name)
            .ok_or_else(|| invalid(format!("input {key:?} refers to a missing node {node_name:?}")))?;
        if !matches!(node.op.as_str(), "Placeholder" | "PlaceholderWithDefault") {
            return Err(invalid(format!("input {key:?} is node {node_name:?} of op {}, not a placeholder", node.op)));
        }
        let mut attr = HashMap::new();
        attr.insert("dtype".to_owned(), AttrValue { value: Some(AttrValueKind::Type(info.dtype)) });
        if let Some(shape) = &info.tensor_shape {
            attr.insert("shape".to_owned(), AttrValue { value: Some(AttrValueKind::Shape(shape.clone())) });
        }
        let flat = freezer.unique_name(node_name);
        freezer.nodes.push(NodeDef {
            name: flat.clone(),
            op: "Placeholder".into(),
            input: vec![],
            device: String::new(),
            attr,
        });
        freezer.placeholders.insert(node_name.to_owned(), flat.clone());
        input_nodes.push((key.clone(), flat));
    }

    let mut output_tensors = Vec::new();
    for (key, info, tensor) in dense_tensors(&signature.outputs, "output", invalid)? {
        let (node_name, index) = parse_tensor_name(tensor);
        let index = index.ok_or_else(|| invalid(format!("output {key:?} has a malformed tensor name {tensor:?}")))?;
        let value = freezer.resolve_output(TOP, node_name, index)?;
        let tensor = freezer.materialize(value, Some(info.dtype), node_name)?;
        let (node, index) = parse_tensor_name(&tensor);
        output_tensors.push((key.clone(), node.to_owned(), index.unwrap_or(0)));
    }

    let graph = GraphDef { node: freezer.nodes, versions: input.graph.versions.clone(), ..Default::default() };
    let mut frozen_variables: Vec<String> = freezer.constants.keys().cloned().collect();
    frozen_variables.sort();
    Ok(FrozenGraph { graph, inputs: input_nodes, outputs: output_tensors, frozen_variables })
}

/// The function a `StatefulPartitionedCall`/`PartitionedCall` node calls (its `f` attr).
pub(crate) fn call_target(node: &NodeDef) -> Option<&str> {
    match node.attr.get("f").and_then(|a| a.value.as_ref()) {
        Some(AttrValueKind::Func(f)) => Some(f.name.as_str()),
        _ => None,
    }
}

/// A signature's inputs or outputs (`side`) in key order, each with its dense tensor's
/// name; a sparse or composite one is refused.
fn dense_tensors<'s>(
    tensors: &'s HashMap<String, TensorInfo>,
    side: &str,
    invalid: impl Fn(String) -> LoadError,
) -> Result<Vec<(&'s String, &'s TensorInfo, &'s str)>, LoadError> {
    let mut sorted: Vec<_> = tensors.iter().collect();
    sorted.sort_by_key(|(key, _)| key.as_str());
    sorted
        .into_iter()
        .map(|(key, info)| {
            let tensor = dense_name(info.encoding.as_ref())
                .ok_or_else(|| invalid(format!("{side} {key:?} is not a dense tensor")))?;
            Ok((key, info, tensor))
        })
        .collect()
}

/// The dense tensor name of a `TensorInfo`, or `None` for sparse/composite encodings.
pub(crate) fn dense_name(encoding: Option<&tract_tensorflow::tfpb::tensorflow::tensor_info::Encoding>) -> Option<&str> {
    match encoding {
        Some(tract_tensorflow::tfpb::tensorflow::tensor_info::Encoding::Name(name)) => Some(name),
        _ => None,
    }
}

/// Splits a graph-level tensor name `node:index` (`node` alone means index 0). The index
/// is `None` when it is not a number.
fn parse_tensor_name(name: &str) -> (&str, Option<usize>) {
    match name.rsplit_once(':') {
        Some((node, index)) => (node, index.parse().ok()),
        None => (name, Some(0)),
    }
}

type ScopeId = usize;
const TOP: ScopeId = 0;

/// A resolved tensor: either a real tensor in the output graph (`node:index`) or a
/// variable that has not been read yet.
#[derive(Debug, Clone)]
enum Value {
    Tensor(String),
    Variable { key: String },
}

struct FunctionIndex<'a> {
    def: &'a FunctionDef,
    nodes: HashMap<&'a str, &'a NodeDef>,
}

impl<'a> FunctionIndex<'a> {
    fn new(def: &'a FunctionDef) -> Self {
        Self { def, nodes: def.node_def.iter().map(|n| (n.name.as_str(), n)).collect() }
    }
}

/// One instantiation of the top-level graph or of an inlined function call.
struct Scope<'a> {
    /// Prepended to body node names to make them unique in the flat graph.
    prefix: String,
    function: Option<&'a str>,
    args: HashMap<&'a str, Value>,
    depth: usize,
}

struct Freezer<'a, 'i> {
    input: &'i FreezeInput<'a>,
    functions: HashMap<&'a str, FunctionIndex<'a>>,
    top_nodes: HashMap<&'a str, &'a NodeDef>,
    scopes: Vec<Scope<'a>>,
    call_scopes: HashMap<(ScopeId, &'a str), ScopeId>,
    emitted: HashMap<(ScopeId, &'a str), String>,
    in_progress: HashSet<(ScopeId, &'a str)>,
    /// Checkpoint key -> name of the `Const` node holding its value.
    constants: HashMap<String, String>,
    names: HashSet<String>,
    /// Top-level placeholder node -> its node in the output graph.
    placeholders: HashMap<String, String>,
    nodes: Vec<NodeDef>,
}

impl<'a, 'i> Freezer<'a, 'i> {
    fn error(&self, scope: ScopeId, node: &str, detail: impl Into<String>) -> LoadError {
        let scope = &self.scopes[scope];
        let node = match scope.function {
            Some(function) => format!("{}{node} (in function {function})", scope.prefix),
            None => node.to_owned(),
        };
        LoadError::InvalidGraph { path: self.input.pb_path.to_owned(), node, detail: detail.into() }
    }

    fn unique_name(&mut self, wanted: &str) -> String {
        let mut name = wanted.to_owned();
        let mut n = 1;
        while !self.names.insert(name.clone()) {
            name = format!("{wanted}_vigil{n}");
            n += 1;
        }
        name
    }

    fn lookup(&self, scope: ScopeId, node: &str) -> Result<&'a NodeDef, LoadError> {
        let found = match self.scopes[scope].function {
            None => self.top_nodes.get(node).copied(),
            Some(function) => self.functions[function].nodes.get(node).copied(),
        };
        found.ok_or_else(|| self.error(scope, node, "is referenced but not defined"))
    }

    /// Resolves an input reference as written in `scope`: `node:index` at top level;
    /// `arg`, `node:out_arg` or `node:out_arg:index` inside a function body.
    fn resolve_ref(&mut self, scope: ScopeId, reference: &'a str) -> Result<Value, LoadError> {
        if self.scopes[scope].function.is_none() {
            let (node, index) = parse_tensor_name(reference);
            let index = index.ok_or_else(|| self.error(scope, reference, "malformed tensor reference"))?;
            return self.resolve_output(scope, node, index);
        }
        let mut parts = reference.split(':');
        let first = parts.next().unwrap_or_default();
        let (second, third) = (parts.next(), parts.next());
        if let Some(value) = self.scopes[scope].args.get(first) {
            // A function argument (`arg`, or `arg:0` for a non-list argument).
            return match second {
                None | Some("0") => Ok(value.clone()),
                Some(_) => Err(self.error(scope, reference, "indexes into a non-list function argument")),
            };
        }
        let out_arg = second.ok_or_else(|| self.error(scope, reference, "is neither an argument nor node:output"))?;
        let index: usize = match third {
            None => 0,
            Some(i) => i.parse().map_err(|_| self.error(scope, reference, "malformed output index"))?,
        };
        let node = self.lookup(scope, first)?;
        let offset = self.output_arg_offset(scope, node, out_arg)?;
        self.resolve_output(scope, first, offset + index)
    }

    /// Flat index of the first tensor of output argument `arg` of `node`.
    fn output_arg_offset(&self, scope: ScopeId, node: &NodeDef, arg: &str) -> Result<usize, LoadError> {
        if CALL_OPS.contains(&node.op.as_str()) {
            return Ok(0); // calls expose one list argument, `output`
        }
        if let Some(function) = self.functions.get(node.op.as_str()) {
            let outputs = function.def.signature.as_ref().map(|s| s.output_arg.as_slice()).unwrap_or_default();
            return outputs
                .iter()
                .position(|o| o.name == arg)
                .ok_or_else(|| self.error(scope, &node.name, format!("function {} has no output {arg:?}", node.op)));
        }
        match output_args(&node.op) {
            Some(args) => args
                .iter()
                .position(|a| *a == arg)
                .ok_or_else(|| self.error(scope, &node.name, format!("op {} has no output {arg:?}", node.op))),
            None => Ok(0),
        }
    }

    fn data_inputs(node: &'a NodeDef) -> impl Iterator<Item = &'a str> {
        node.input.iter().map(String::as_str).filter(|i| !i.starts_with('^'))
    }

    fn resolve_output(&mut self, scope: ScopeId, name: &'a str, index: usize) -> Result<Value, LoadError> {
        // Deep graphs recurse deeply: grow the stack instead of overflowing it.
        stacker::maybe_grow(64 * 1024, 1024 * 1024, || self.resolve_output_inner(scope, name, index))
    }

    fn resolve_output_inner(&mut self, scope: ScopeId, name: &'a str, index: usize) -> Result<Value, LoadError> {
        let node = self.lookup(scope, name)?;
        let op = node.op.as_str();
        let top = self.scopes[scope].function.is_none();

        if PASS_THROUGH_OPS.contains(&op) || op == "IdentityN" {
            let wanted = if op == "IdentityN" { index } else { 0 };
            let input = Self::data_inputs(node)
                .nth(wanted)
                .ok_or_else(|| self.error(scope, name, format!("{op} has no input {wanted}")))?;
            return self.guarded(scope, name, |f| f.resolve_ref(scope, input));
        }
        if op == "ReadVariableOp" {
            let input = Self::data_inputs(node)
                .next()
                .ok_or_else(|| self.error(scope, name, "ReadVariableOp without input"))?;
            let value = self.guarded(scope, name, |f| f.resolve_ref(scope, input))?;
            let dtype = match node.attr.get("dtype").and_then(|a| a.value.as_ref()) {
                Some(AttrValueKind::Type(t)) => Some(*t),
                _ => None,
            };
            return match value {
                Value::Variable { .. } => Ok(Value::Tensor(self.materialize(value, dtype, name)?)),
                Value::Tensor(_) => Err(self.error(scope, name, "reads something that is not a variable")),
            };
        }
        if VARIABLE_OPS.contains(&op) {
            if !top {
                return Err(self.error(scope, name, format!("creates a variable ({op}) inside a function")));
            }
            return Ok(Value::Variable { key: self.variable_key(node)? });
        }
        if top && matches!(op, "Placeholder" | "PlaceholderWithDefault") {
            if let Some(flat) = self.placeholders.get(name) {
                return Ok(Value::Tensor(format!("{flat}:{index}")));
            }
            if op == "PlaceholderWithDefault" {
                let input =
                    Self::data_inputs(node).next().ok_or_else(|| self.error(scope, name, "no default value"))?;
                return self.guarded(scope, name, |f| f.resolve_ref(scope, input));
            }
            return Err(self.error(scope, name, "is a placeholder the signature does not feed"));
        }
        if CALL_OPS.contains(&op) || self.functions.contains_key(op) {
            let callee = self.call_scope(scope, node)?;
            let function_name = self.scopes[callee].function.expect("call scope has a function");
            let def: &'a FunctionDef = self.functions[function_name].def;
            let outputs = def.signature.as_ref().map(|s| s.output_arg.as_slice()).unwrap_or_default();
            let out = outputs
                .get(index)
                .ok_or_else(|| self.error(scope, name, format!("function {function_name} has no output {index}")))?;
            let ret: &'a str = def.ret.get(&out.name).ok_or_else(|| {
                self.error(scope, name, format!("function {function_name} does not return {:?}", out.name))
            })?;
            return self.guarded(scope, name, |f| f.resolve_ref(callee, ret));
        }
        if op == "NoOp" {
            return Err(self.error(scope, name, "NoOp used as a data input"));
        }

        // A computing op: emit it once, with its inputs resolved to tensors.
        if let Some(flat) = self.emitted.get(&(scope, name)) {
            return Ok(Value::Tensor(format!("{flat}:{index}")));
        }
        let inputs = self.guarded(scope, name, |f| {
            Self::data_inputs(node)
                .map(|input| {
                    let value = f.resolve_ref(scope, input)?;
                    f.materialize(value, None, input)
                })
                .collect::<Result<Vec<_>, _>>()
        })?;
        let wanted = format!("{}{}", self.scopes[scope].prefix, name);
        let flat = self.unique_name(&wanted);
        let mut attr = node.attr.clone();
        // Function bodies omit attrs equal to their default; tract's builders need them.
        op_defaults::fill(op, &mut attr);
        self.nodes.push(NodeDef {
            name: flat.clone(),
            op: node.op.clone(),
            input: inputs,
            device: String::new(),
            attr,
        });
        self.emitted.insert((scope, name), flat.clone());
        Ok(Value::Tensor(format!("{flat}:{index}")))
    }

    /// Runs `f` with `(scope, name)` marked in progress, so a cycle is an error, not a hang.
    fn guarded<T>(
        &mut self,
        scope: ScopeId,
        name: &'a str,
        f: impl FnOnce(&mut Self) -> Result<T, LoadError>,
    ) -> Result<T, LoadError> {
        if !self.in_progress.insert((scope, name)) {
            return Err(self.error(scope, name, "is part of a cycle"));
        }
        let result = f(self);
        self.in_progress.remove(&(scope, name));
        result
    }

    /// Instantiates the function `node` calls, binding its arguments; memoized per call node.
    fn call_scope(&mut self, scope: ScopeId, node: &'a NodeDef) -> Result<ScopeId, LoadError> {
        if let Some(&id) = self.call_scopes.get(&(scope, node.name.as_str())) {
            return Ok(id);
        }
        let name = node.name.as_str();
        let function_name: &'a str = if CALL_OPS.contains(&node.op.as_str()) {
            call_target(node).ok_or_else(|| self.error(scope, name, "call without a function attr `f`"))?
        } else {
            node.op.as_str()
        };
        let def: &'a FunctionDef = self
            .functions
            .get(function_name)
            .map(|f| f.def)
            .ok_or_else(|| self.error(scope, name, format!("calls undefined function {function_name}")))?;
        let depth = self.scopes[scope].depth + 1;
        if depth > MAX_CALL_DEPTH {
            return Err(self.error(scope, name, format!("function calls nest deeper than {MAX_CALL_DEPTH}")));
        }
        let input_args = def.signature.as_ref().map(|s| s.input_arg.as_slice()).unwrap_or_default();
        let arg_names: Vec<&'a str> = input_args.iter().map(|a| a.name.as_str()).collect();
        if input_args.iter().any(|a| !a.number_attr.is_empty() || !a.type_list_attr.is_empty()) {
            return Err(self.error(scope, name, format!("function {function_name} takes list arguments")));
        }
        let inputs: Vec<&'a str> = Self::data_inputs(node).collect();
        if inputs.len() != arg_names.len() {
            return Err(self.error(
                scope,
                name,
                format!("passes {} inputs to function {function_name}, which takes {}", inputs.len(), arg_names.len()),
            ));
        }
        let values = self.guarded(scope, name, |f| {
            inputs.iter().map(|input| f.resolve_ref(scope, input)).collect::<Result<Vec<_>, _>>()
        })?;
        let prefix = format!("{}{}/", self.scopes[scope].prefix, name);
        self.scopes.push(Scope {
            prefix,
            function: Some(function_name),
            args: arg_names.into_iter().zip(values).collect(),
            depth,
        });
        let id = self.scopes.len() - 1;
        self.call_scopes.insert((scope, name), id);
        Ok(id)
    }

    /// The checkpoint key holding a top-level variable node's value.
    fn variable_key(&self, node: &NodeDef) -> Result<String, LoadError> {
        if let Some(key) = self.input.variable_keys.get(&node.name) {
            return Ok(key.clone());
        }
        // TF1: saved under the variable's name (the node name, or `shared_name` for handles).
        let shared = match node.attr.get("shared_name").and_then(|a| a.value.as_ref()) {
            Some(AttrValueKind::S(s)) if !s.is_empty() => String::from_utf8(s.clone()).ok(),
            _ => None,
        };
        let candidates: Vec<String> = shared.into_iter().chain([node.name.clone()]).collect();
        match self.input.bundle {
            Some(bundle) => {
                candidates.iter().find(|k| bundle.contains(k)).cloned().ok_or_else(|| LoadError::MissingVariable {
                    path: bundle.index_path().to_owned(),
                    key: format!("{} (for variable node {:?})", candidates.join(" or "), node.name),
                })
            }
            None => Err(self.error(TOP, &node.name, "is a variable but the SavedModel has no variables/ checkpoint")),
        }
    }

    /// Makes `value` a real tensor, reading a variable into a `Const` node (once per key).
    fn materialize(&mut self, value: Value, dtype: Option<i32>, reader: &str) -> Result<String, LoadError> {
        let key = match value {
            Value::Tensor(t) => return Ok(t),
            Value::Variable { key } => key,
        };
        if let Some(name) = self.constants.get(&key) {
            return Ok(format!("{name}:0"));
        }
        let bundle = self.input.bundle.ok_or_else(|| {
            self.error(TOP, reader, "reads a variable but the SavedModel has no variables/ checkpoint")
        })?;
        let tensor: TensorProto = bundle.read_tensor(&key)?;
        if let Some(expected) = dtype
            && expected != tensor.dtype
        {
            return Err(LoadError::UnsupportedVariable {
                path: bundle.index_path().to_owned(),
                key,
                detail: format!(
                    "stored as {} but read by {reader:?} as {}",
                    dtype_name(tensor.dtype),
                    dtype_name(expected)
                ),
            });
        }
        let name = self.unique_name(&format!("{FROZEN_PREFIX}{key}"));
        let mut attr = HashMap::new();
        attr.insert("dtype".to_owned(), AttrValue { value: Some(AttrValueKind::Type(tensor.dtype)) });
        attr.insert("value".to_owned(), AttrValue { value: Some(AttrValueKind::Tensor(tensor)) });
        self.nodes.push(NodeDef { name: name.clone(), op: "Const".into(), input: vec![], device: String::new(), attr });
        self.constants.insert(key, name.clone());
        Ok(format!("{name}:0"))
    }
}

pub(crate) fn dtype_name(dtype: i32) -> &'static str {
    DataType::try_from(dtype).map(|d| d.as_str_name()).unwrap_or("DT_INVALID")
}
