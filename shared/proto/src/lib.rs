//! Vigil's protobuf APIs, compiled once from the workspace's `proto/` directory.
//!
//! Vigil's own messages live under `vigil.*` (see `proto/vigil/`).
//!
//! The TensorFlow Serving and KServe v2 protos are written by hand rather than vendored:
//! they declare only the messages and fields Vigil uses, with the upstream packages,
//! names and field numbers, so the official clients interoperate on the wire. Field
//! numbers are checked against the official Python packages by
//! `tests/compat/check_proto_wire_compat.py`.

// Generated code: its docs and names are protoc's, not ours.
#![allow(unreachable_pub, clippy::all, rust_2018_idioms)]

/// Package `tensorflow`.
pub mod tensorflow {
    tonic::include_proto!("tensorflow");

    /// Package `tensorflow.error`.
    pub mod error {
        tonic::include_proto!("tensorflow.error");
    }

    /// Package `tensorflow.serving`.
    pub mod serving {
        tonic::include_proto!("tensorflow.serving");
    }
}

/// Package `inference` (KServe v2 / Open Inference Protocol).
pub mod inference {
    tonic::include_proto!("inference");
}

/// `pub mod <api> { pub mod v1 { <package vigil.<api>.v1> } }` for each of Vigil's APIs.
macro_rules! vigil_v1_packages {
    ($($(#[$doc:meta])* $api:ident),* $(,)?) => {
        $(
            $(#[$doc])*
            pub mod $api {
                #[doc = concat!("Package `vigil.", stringify!($api), ".v1`.")]
                pub mod v1 {
                    // tonic::include_proto! takes a literal; this is what it expands to.
                    include!(concat!(env!("OUT_DIR"), "/vigil.", stringify!($api), ".v1.rs"));
                }
            }
        )*
    };
}

/// Vigil's own APIs.
pub mod vigil {
    vigil_v1_packages! {
        /// The alerts service's records: alerts, and its changelog.
        alerts,
        /// The ingest service's gRPC API.
        ingest,
        /// The model server's canary rollout API.
        rollout,
        /// The stream processor's score and anomaly records.
        scoring,
        /// Replaying history through a candidate model (the stream processor's API).
        replay,
        /// The car sensor reading every service shares.
        sensor,
    }
}

/// The canonical name of a gRPC status code (`INVALID_ARGUMENT`), as gRPC's docs, TF
/// Serving's metric labels and operators' searches spell it; tonic's own descriptions are
/// sentences. The services' metric labels and the CLI's messages are made from it.
pub fn status_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Every compiled file's descriptor, for gRPC reflection and text-format parsing.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
