//! Opening a SavedModel directory: the MetaGraph, its signatures, the checkpoint index
//! and the TF2 variable -> checkpoint-key mapping. Opening checksums every tensor of the
//! checkpoint but keeps none; freezing a signature reads exactly the weights it uses.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use prost::Message;
use tract_tensorflow::Tensorflow;
use tract_tensorflow::tfpb::tensorflow::{
    DataType, MetaGraphDef, SavedModel as SavedModelProto, SignatureDef, TensorInfo, TrackableObjectGraph,
};

use crate::bundle::{OBJECT_GRAPH_KEY, TensorBundle};
use crate::error::LoadError;
use crate::freeze::{self, FreezeInput, FrozenGraph};
use crate::plan::SignaturePlan;
use crate::{SERVE_TAG, ops};

/// Signatures TensorFlow adds for its own bookkeeping; never served.
const INTERNAL_SIGNATURES: &[&str] = &["__saved_model_init_op", "__saved_model_train_op"];

/// tract's TensorFlow front end with Vigil's extra ops registered; built once.
pub(crate) fn engine() -> &'static Tensorflow {
    static ENGINE: OnceLock<Tensorflow> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut tf = tract_tensorflow::tensorflow();
        ops::register(&mut tf.op_register);
        tf
    })
}

/// One tensor of a signature, as `GetModelMetadata` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The graph tensor (`serving_default_sensors:0`).
    pub tensor_name: String,
    pub dtype: DataType,
    /// `None` when the rank is unknown; `-1` marks a dimension of unknown size.
    pub shape: Option<Vec<i64>>,
}

impl TensorSpec {
    fn from_info(info: &TensorInfo) -> Self {
        let tensor_name = freeze::dense_name(info.encoding.as_ref()).unwrap_or_default().to_owned();
        let shape = match &info.tensor_shape {
            Some(shape) if shape.unknown_rank => None,
            Some(shape) => Some(shape.dim.iter().map(|d| d.size).collect()),
            None => None,
        };
        Self { tensor_name, dtype: DataType::try_from(info.dtype).unwrap_or(DataType::DtInvalid), shape }
    }

    /// `float32[-1,18]`-style rendering for messages and reports.
    pub fn describe(&self) -> String {
        let dtype = dtype_label(self.dtype);
        match &self.shape {
            Some(dims) => format!("{dtype}[{}]", dims.iter().map(i64::to_string).collect::<Vec<_>>().join(",")),
            None => format!("{dtype}[unknown rank]"),
        }
    }
}

/// The NumPy-style name of a dtype (`float32`, `int64`), as data scientists know them.
pub(crate) fn dtype_label(dtype: DataType) -> String {
    match dtype {
        DataType::DtFloat => "float32".into(),
        DataType::DtDouble => "float64".into(),
        DataType::DtHalf => "float16".into(),
        other => other.as_str_name().trim_start_matches("DT_").to_lowercase(),
    }
}

/// A signature's interface: named inputs and outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureSpec {
    pub name: String,
    pub method_name: String,
    pub inputs: BTreeMap<String, TensorSpec>,
    pub outputs: BTreeMap<String, TensorSpec>,
}

impl SignatureSpec {
    fn new(name: &str, def: &SignatureDef) -> Self {
        Self {
            name: name.to_owned(),
            method_name: def.method_name.clone(),
            inputs: def.inputs.iter().map(|(k, v)| (k.clone(), TensorSpec::from_info(v))).collect(),
            outputs: def.outputs.iter().map(|(k, v)| (k.clone(), TensorSpec::from_info(v))).collect(),
        }
    }
}

/// An opened SavedModel directory (one version).
#[derive(Debug)]
pub struct SavedModel {
    dir: PathBuf,
    pb_path: PathBuf,
    meta_graph: MetaGraphDef,
    bundle: Option<TensorBundle>,
    variable_keys: HashMap<String, String>,
    signatures: BTreeMap<String, SignatureSpec>,
}

impl SavedModel {
    /// Opens the `serve` MetaGraph of the SavedModel in `dir`. Fails if any tensor of the
    /// checkpoint, used by a signature or not, does not match its CRC32C.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, LoadError> {
        Self::open_with_tags(dir, &[SERVE_TAG])
    }

    /// Opens the MetaGraph whose tag set contains all of `tags`.
    pub fn open_with_tags(dir: impl AsRef<Path>, tags: &[&str]) -> Result<Self, LoadError> {
        let dir = dir.as_ref().to_owned();
        let pb_path = dir.join("saved_model.pb");
        let bytes = std::fs::read(&pb_path).map_err(|source| LoadError::Io { path: pb_path.clone(), source })?;
        let saved = SavedModelProto::decode(bytes.as_slice()).map_err(|source| LoadError::Decode {
            path: pb_path.clone(),
            what: "SavedModel",
            source,
        })?;
        let available: Vec<Vec<String>> = saved
            .meta_graphs
            .iter()
            .map(|m| m.meta_info_def.as_ref().map(|i| i.tags.clone()).unwrap_or_default())
            .collect();
        let meta_graph = saved
            .meta_graphs
            .into_iter()
            .find(|m| {
                let have = m.meta_info_def.as_ref().map(|i| i.tags.as_slice()).unwrap_or_default();
                tags.iter().all(|t| have.iter().any(|h| h == t))
            })
            .ok_or_else(|| LoadError::NoMetaGraph {
                path: pb_path.clone(),
                wanted: tags.iter().map(|t| t.to_string()).collect(),
                available,
            })?;
        if meta_graph.graph_def.is_none() {
            return Err(LoadError::InvalidGraph {
                path: pb_path,
                node: String::new(),
                detail: "the MetaGraph has no graph_def".into(),
            });
        }

        let prefix = dir.join("variables").join("variables");
        let index = prefix.with_extension("index");
        let bundle = if index.exists() { Some(TensorBundle::open(&prefix)?) } else { None };
        let variable_keys = match &bundle {
            Some(bundle) if bundle.contains(OBJECT_GRAPH_KEY) => variable_keys(&meta_graph, bundle, &index)?,
            _ => HashMap::new(),
        };
        let signatures = meta_graph
            .signature_def
            .iter()
            .filter(|(name, _)| !INTERNAL_SIGNATURES.contains(&name.as_str()))
            .map(|(name, def)| (name.clone(), SignatureSpec::new(name, def)))
            .collect();
        Ok(Self { dir, pb_path, meta_graph, bundle, variable_keys, signatures })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Servable signatures by name (TensorFlow's internal ones are left out).
    pub fn signatures(&self) -> &BTreeMap<String, SignatureSpec> {
        &self.signatures
    }

    /// Number of tensors in the checkpoint (variables), not counting bookkeeping entries.
    pub fn checkpoint_tensor_count(&self) -> usize {
        self.bundle.as_ref().map(|b| b.len() - usize::from(b.contains(OBJECT_GRAPH_KEY))).unwrap_or(0)
    }

    /// Freezes one signature into a flat graph with its weights as constants.
    pub fn freeze(&self, signature: &str) -> Result<FrozenSignature, LoadError> {
        let spec = self.signatures.get(signature).ok_or_else(|| LoadError::MissingSignature {
            path: self.pb_path.clone(),
            name: signature.to_owned(),
            available: self.signatures.keys().cloned().collect(),
        })?;
        let graph = self.meta_graph.graph_def.as_ref().expect("checked at open");
        let input = FreezeInput {
            pb_path: &self.pb_path,
            graph,
            bundle: self.bundle.as_ref(),
            variable_keys: &self.variable_keys,
        };
        let frozen = freeze::freeze(&input, signature, &self.meta_graph.signature_def[signature])?;
        Ok(FrozenSignature { pb_path: self.pb_path.clone(), spec: spec.clone(), frozen })
    }

    /// Freezes a signature and builds its optimized inference plan.
    pub fn load(&self, signature: &str) -> Result<SignaturePlan, LoadError> {
        self.freeze(signature)?.plan()
    }
}

/// TF2: maps each top-level variable handle node to its checkpoint key.
///
/// Every top-level call of a concrete function passes the function's captured variables
/// as trailing inputs; `object_graph_def.concrete_functions[f].bound_inputs` lists, in
/// the same order, the object-graph ids of those variables, and the checkpoint's
/// `TrackableObjectGraph` node with the same id names the key of its `VARIABLE_VALUE`.
fn variable_keys(
    meta: &MetaGraphDef,
    bundle: &TensorBundle,
    index: &Path,
) -> Result<HashMap<String, String>, LoadError> {
    let raw = bundle.read_scalar_string(OBJECT_GRAPH_KEY)?;
    let trackable = TrackableObjectGraph::decode(raw.as_slice()).map_err(|source| LoadError::Decode {
        path: index.to_owned(),
        what: "checkpoint object graph (_CHECKPOINTABLE_OBJECT_GRAPH)",
        source,
    })?;
    let checkpoint_key = |id: i32| -> Option<&str> {
        let node = trackable.nodes.get(usize::try_from(id).ok()?)?;
        node.attributes.iter().find(|a| a.name == "VARIABLE_VALUE").map(|a| a.checkpoint_key.as_str())
    };
    let Some(object_graph) = &meta.object_graph_def else { return Ok(HashMap::new()) };
    let graph = meta.graph_def.as_ref().expect("checked at open");
    let mut keys = HashMap::new();
    for node in &graph.node {
        let Some(function) = freeze::call_target(node) else { continue };
        let Some(concrete) = object_graph.concrete_functions.get(function) else { continue };
        let inputs: Vec<&str> = node.input.iter().map(String::as_str).filter(|i| !i.starts_with('^')).collect();
        let Some(first_bound) = inputs.len().checked_sub(concrete.bound_inputs.len()) else { continue };
        for (input, &object_id) in inputs[first_bound..].iter().zip(&concrete.bound_inputs) {
            let handle = input.split(':').next().unwrap_or(input);
            if let Some(key) = checkpoint_key(object_id) {
                keys.insert(handle.to_owned(), key.to_owned());
            }
        }
    }
    Ok(keys)
}

/// How often a frozen signature uses an op, and whether the engine can run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpUse {
    pub op: String,
    pub count: usize,
    pub supported: bool,
    /// One node using the op, for error messages.
    pub example_node: String,
}

/// A signature frozen into a flat graph, not yet compiled.
#[derive(Debug, Clone)]
pub struct FrozenSignature {
    pb_path: PathBuf,
    spec: SignatureSpec,
    frozen: FrozenGraph,
}

impl FrozenSignature {
    pub fn spec(&self) -> &SignatureSpec {
        &self.spec
    }

    /// Checkpoint keys of the variables this signature reads (now constants).
    pub fn frozen_variables(&self) -> &[String] {
        &self.frozen.frozen_variables
    }

    /// Ops of the frozen graph with counts and engine support, sorted by op name.
    pub fn ops(&self) -> Vec<OpUse> {
        let register = &engine().op_register.0;
        let mut ops: BTreeMap<&str, OpUse> = BTreeMap::new();
        for node in &self.frozen.graph.node {
            ops.entry(node.op.as_str())
                .or_insert_with(|| OpUse {
                    op: node.op.clone(),
                    count: 0,
                    supported: register.contains_key(&node.op),
                    example_node: node.name.clone(),
                })
                .count += 1;
        }
        ops.into_values().collect()
    }

    /// Builds the optimized tract plan. Fails naming the op and node if any op is unsupported.
    pub fn plan(self) -> Result<SignaturePlan, LoadError> {
        if let Some(unsupported) = self.ops().into_iter().find(|o| !o.supported) {
            return Err(LoadError::UnsupportedOp {
                path: self.pb_path,
                op: unsupported.op,
                node: unsupported.example_node,
            });
        }
        SignaturePlan::build(&self.pb_path, self.spec, &self.frozen)
    }
}
