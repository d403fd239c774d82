//! Runs TensorFlow SavedModels natively in Rust: no TensorFlow runtime, just tract.
//!
//! tract-tensorflow runs *frozen* graphs only, so this crate freezes a SavedModel at load
//! time: it reads `saved_model.pb`, picks the `serve` MetaGraph and a signature, inlines
//! the signature's function calls, replaces variable reads by constants read (and
//! CRC-checked) from the `variables/` TensorBundle, and builds an optimized tract plan
//! whose batch dimension is symbolic, so one plan serves any batch size.
//!
//! Like TensorFlow's restore, opening a SavedModel verifies the CRC32C of every tensor
//! in the checkpoint, including ones no signature reads (optimizer slots, counters), so a
//! corrupt checkpoint never serves. That costs about 0.18 ms per MB of checkpoint (5.7 GB/s
//! from a warm page cache; see `bundle.rs`).
//!
//! ```no_run
//! use savedmodel::{SavedModel, Tensor};
//! let model = SavedModel::open("tests/fixtures/savedmodels/autoencoder/1")?;
//! let plan = model.load("serving_default")?;
//! let input = Tensor::from_shape(&[1, 18], &[0.0f32; 18])?;
//! let outputs = plan.run([("sensors".to_string(), input)])?;
//! println!("{:?}", outputs["output_0"]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Format facts this rests on: `shared/docs/savedmodel-format.md` beside the repository.
#![forbid(unsafe_code)]

mod bundle;
mod error;
mod freeze;
mod op_defaults;
mod ops;
mod plan;
mod reduce;
mod saved_model;
mod sstable;

pub use error::{LoadError, PredictError};
pub use plan::{LARGE_BATCH, PreparedInputs, SignaturePlan};
pub use saved_model::{FrozenSignature, OpUse, SavedModel, SignatureSpec, TensorSpec};
pub use tract_tensorflow::tfpb::tensorflow::DataType;
pub use tract_tensorflow::tract_hir::prelude::{Datum, DatumType, Tensor, f16};

/// TensorFlow's masked CRC32C of `data`, as LevelDB tables and TFRecord files store it.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    sstable::mask_crc(crc32c::crc32c(data))
}

/// The tag TensorFlow Serving loads by default.
pub const SERVE_TAG: &str = "serve";
/// The signature used when a request names none.
pub const DEFAULT_SIGNATURE: &str = "serving_default";
