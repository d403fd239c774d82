//! `vigil`: one command for the whole fleet. `vigil up` ([`up`]) runs an MQTT broker, a
//! Kafka-protocol cluster, the model server, the stream processor, ingest and a simulated
//! fleet with injected faults in one process, each talking to the others over its real
//! protocol on loopback; [`observe`] watches the output topics like a dashboard would,
//! [`view`] prints the live view, [`summary`] reconciles the counts and measures detection.
//! `vigil rollout` ([`rollout`]) steers a running model server's canary rollouts; `vigil
//! replay` ([`replay`]) re-scores history through a candidate version on a running stream
//! processor and reports how it differs from the live model; both dial through [`dial`] (TLS,
//! bearer token). `vigil export-readings` ([`export`]) writes a time range of the readings
//! topic to a file the model's training script reads.

#![forbid(unsafe_code)]

pub mod detection;
pub mod dial;
pub mod export;
pub mod grpc_errors;
pub mod observe;
pub mod replay;
pub mod rollout;
pub mod summary;
pub mod up;
pub mod view;
