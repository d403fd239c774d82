//! The Vigil model server: TensorFlow SavedModels served natively in Rust, wire
//! compatible with TensorFlow Serving (gRPC and REST) and KServe v2 (gRPC).
//!
//! Layout, request path first: [`overload`] admits a request into the in-flight pool,
//! [`grpc`] and [`rest`] take it apart, [`inference`] resolves the version in the
//! [`repository`] (under a canary [`rollout`], the side the request's routing key falls
//! on) and the signature, [`admission`] checks the still-undecoded inputs against both and
//! the request's byte budget before [`tensor_codec`] / [`tensor_json`] decode them, and the
//! work queues on that signature's [`batching::Scheduler`], which runs it (merged with
//! others when batching is on) off the async threads. [`server`] wires it together;
//! [`config`] is the command line.

pub mod admission;
pub mod batching;
pub mod cli;
pub mod config;
pub mod error;
pub mod grpc;
pub mod inference;
pub mod inspect;
pub mod metrics;
pub mod model_config;
pub mod overload;
pub mod repository;
pub mod rest;
pub mod rest_kserve;
pub mod rollout;
pub mod security;
pub mod server;
pub mod tensor_codec;
pub mod tensor_json;
pub mod warmup;
