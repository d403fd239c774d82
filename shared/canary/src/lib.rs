//! Canary rollouts of a model, independent of how requests arrive: [`split`] decides which
//! version answers a request (pinned requests get what they pin, the rest are split by
//! weight, sticky per routing key), and [`analysis`] judges a canary against the stable
//! version over the same window by what they produce (error rate, p99 latency, anomaly
//! rate and the distribution of scores) and steps a rollout forward, pauses it, or rolls
//! it back. The model server holds the state and serves the traffic; this crate is the
//! policy, kept pure so every rule is tested on its own.

#![forbid(unsafe_code)]

pub mod analysis;
pub mod split;

/// The gRPC metadata key (and HTTP header) carrying a request's routing key: the stream
/// processor sends the device id, so a device sticks to one side of a split.
pub const ROUTING_KEY_METADATA: &str = "vigil-routing-key";

/// The signature outputs a canary is judged by: one anomaly score per row, and the
/// threshold the answering version flags it against.
pub const SCORE_OUTPUT: &str = "anomaly_score";
pub const THRESHOLD_OUTPUT: &str = "threshold";

/// A Predict input carrying one routing key per row (`DT_STRING`, shape `[rows]`): a
/// client that batches many devices' readings in one call sends it so each row sticks to
/// the side of a split its own key falls on. Vigil's model server takes it off before the
/// signature sees the inputs; a server that does not know it refuses the request.
pub const ROW_ROUTING_KEYS_INPUT: &str = "vigil_routing_keys";

/// The output a request with [`ROW_ROUTING_KEYS_INPUT`] gets back beside the signature's:
/// the version that answered each row (`DT_INT64`, shape `[rows]`).
pub const ROW_VERSIONS_OUTPUT: &str = "vigil_model_versions";

/// Most bytes of one routing key.
pub const MAX_ROUTING_KEY_BYTES: usize = 256;
