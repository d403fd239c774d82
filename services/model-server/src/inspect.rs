//! `model-server inspect`: what a data scientist checks before deploying a SavedModel —
//! its signatures, the ops each one really uses after freezing, how many variables it
//! reads, and whether the engine can run it (by actually building the plan).

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use savedmodel::{LoadError, OpUse, SavedModel, SignatureSpec};
use serde_json::{Value, json};

/// Findings for one signature.
#[derive(Debug)]
pub struct SignatureReport {
    pub spec: SignatureSpec,
    pub frozen_variables: usize,
    pub ops: Vec<OpUse>,
    /// `Ok(build time)` if the plan was built, else why not.
    pub engine: Result<Duration, String>,
}

/// Findings for a SavedModel directory.
#[derive(Debug)]
pub struct Report {
    pub dir: String,
    pub checkpoint_tensors: usize,
    pub signatures: Vec<SignatureReport>,
}

impl Report {
    /// True when every signature can be served.
    pub fn all_supported(&self) -> bool {
        self.signatures.iter().all(|s| s.engine.is_ok())
    }

    pub fn to_json(&self) -> Value {
        json!({
            "dir": self.dir,
            "checkpoint_tensors": self.checkpoint_tensors,
            "signatures": self.signatures.iter().map(|s| json!({
                "name": s.spec.name,
                "method_name": s.spec.method_name,
                "inputs": s.spec.inputs.iter().map(|(k, t)| (k.clone(), json!({"tensor": t.tensor_name, "type": t.describe()}))).collect::<serde_json::Map<_, _>>(),
                "outputs": s.spec.outputs.iter().map(|(k, t)| (k.clone(), json!({"tensor": t.tensor_name, "type": t.describe()}))).collect::<serde_json::Map<_, _>>(),
                "frozen_variables": s.frozen_variables,
                "ops": s.ops.iter().map(|o| json!({"op": o.op, "count": o.count, "supported": o.supported})).collect::<Vec<_>>(),
                "supported": s.engine.is_ok(),
                "error": s.engine.as_ref().err(),
                "plan_build_ms": s.engine.as_ref().ok().map(|d| d.as_secs_f64() * 1e3),
            })).collect::<Vec<_>>(),
        })
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "SavedModel {}", self.dir);
        let _ = writeln!(out, "  checkpoint: {} variable tensors", self.checkpoint_tensors);
        for s in &self.signatures {
            let _ = writeln!(out, "\nsignature {:?} ({})", s.spec.name, s.spec.method_name);
            let width = s.spec.inputs.keys().chain(s.spec.outputs.keys()).map(String::len).max().unwrap_or(0);
            for (title, tensors) in [("inputs", &s.spec.inputs), ("outputs", &s.spec.outputs)] {
                let _ = writeln!(out, "  {title}:");
                for (key, t) in tensors {
                    let _ = writeln!(out, "    {key:width$}  {:<20} {}", t.describe(), t.tensor_name);
                }
            }
            let _ = writeln!(out, "  variables read: {}", s.frozen_variables);
            let ops: Vec<String> =
                s.ops.iter().map(|o| format!("{}{}x{}", if o.supported { "" } else { "!" }, o.op, o.count)).collect();
            let _ = writeln!(out, "  ops ({} nodes): {}", s.ops.iter().map(|o| o.count).sum::<usize>(), ops.join(" "));
            match &s.engine {
                Ok(took) => {
                    let _ = writeln!(out, "  engine: supported (plan built in {:.1} ms)", took.as_secs_f64() * 1e3);
                }
                Err(e) => {
                    let _ = writeln!(out, "  engine: NOT SUPPORTED: {e}");
                }
            }
        }
        out
    }
}

/// Opens `dir` and examines every signature (or just `only`). Fails only when the
/// SavedModel itself cannot be opened; per-signature problems land in the report.
pub fn inspect(dir: &Path, only: Option<&str>) -> Result<Report, LoadError> {
    let model = SavedModel::open(dir)?;
    let names: Vec<String> = match only {
        Some(name) => vec![name.to_owned()],
        None => model.signatures().keys().cloned().collect(),
    };
    let mut signatures = Vec::new();
    for name in names {
        let frozen = model.freeze(&name)?;
        let spec = frozen.spec().clone();
        let frozen_variables = frozen.frozen_variables().len();
        let ops = frozen.ops();
        let started = Instant::now();
        let engine = frozen.plan().map(|_| started.elapsed()).map_err(|e| e.to_string());
        signatures.push(SignatureReport { spec, frozen_variables, ops, engine });
    }
    Ok(Report { dir: dir.display().to_string(), checkpoint_tensors: model.checkpoint_tensor_count(), signatures })
}
