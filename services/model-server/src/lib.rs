//! The model server: serves TensorFlow SavedModels natively (no TensorFlow runtime) and
//! gives data scientists the tools to check a model before deploying it.
#![forbid(unsafe_code)]

pub mod inspect;
pub mod tensor_json;
