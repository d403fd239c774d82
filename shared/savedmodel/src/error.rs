//! Errors of loading and running a SavedModel. Every load error names the file it is
//! about, and graph errors also name the op and node, so an operator can act on the
//! message alone.

use std::path::PathBuf;

use thiserror::Error;

/// Why a SavedModel (or one of its signatures) could not be loaded.
#[derive(Debug, Error)]
pub enum LoadError {
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{}: {what} is truncated or not a valid protobuf: {source}", path.display())]
    Decode { path: PathBuf, what: &'static str, source: prost::DecodeError },

    #[error("{}: no MetaGraph tagged {wanted:?} (available tag sets: {available:?})", path.display())]
    NoMetaGraph { path: PathBuf, wanted: Vec<String>, available: Vec<Vec<String>> },

    #[error("{}: no signature named {name:?} (available: {})", path.display(), available.join(", "))]
    MissingSignature { path: PathBuf, name: String, available: Vec<String> },

    #[error("{}: signature {signature:?} {detail}", path.display())]
    InvalidSignature { path: PathBuf, signature: String, detail: String },

    #[error("{}: corrupt TensorBundle: {detail}", path.display())]
    CorruptBundle { path: PathBuf, detail: String },

    #[error(
        "{}: CRC32C mismatch for tensor {key:?} (stored {stored:#010x}, computed {computed:#010x}); the file is corrupt",
        path.display()
    )]
    ChecksumMismatch { path: PathBuf, key: String, stored: u32, computed: u32 },

    #[error("{}: the checkpoint has no tensor {key:?}", path.display())]
    MissingVariable { path: PathBuf, key: String },

    #[error("{}: variable {key:?} is not supported: {detail}", path.display())]
    UnsupportedVariable { path: PathBuf, key: String, detail: String },

    #[error("{}: op {op:?} (node {node:?}) is not supported by the engine", path.display())]
    UnsupportedOp { path: PathBuf, op: String, node: String },

    #[error("{}: node {node:?}: {detail}", path.display())]
    InvalidGraph { path: PathBuf, node: String, detail: String },

    #[error("{}: could not build an inference plan for signature {signature:?}: {detail}", path.display())]
    Plan { path: PathBuf, signature: String, detail: String },
}

/// Why a prediction was refused or failed. Input errors name the signature input.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum PredictError {
    #[error("input {name:?} is not an input of this signature (expected: {})", expected.join(", "))]
    UnknownInput { name: String, expected: Vec<String> },

    #[error("input {name:?} is missing")]
    MissingInput { name: String },

    #[error("input {name:?} has dtype {got}, expected {expected}")]
    Dtype { name: String, expected: String, got: String },

    #[error("input {name:?} has shape {got:?}, expected {expected}")]
    Shape { name: String, expected: String, got: Vec<usize> },

    #[error("inputs disagree on the batch size: {detail}")]
    Batch { detail: String },

    #[error("inference failed: {0}")]
    Engine(String),
}
