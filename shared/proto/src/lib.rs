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

/// Vigil's own APIs.
pub mod vigil {
    /// The alerts service's records: alerts, and its changelog.
    pub mod alerts {
        /// Package `vigil.alerts.v1`.
        pub mod v1 {
            tonic::include_proto!("vigil.alerts.v1");
        }
    }

    /// The ingest service's gRPC API.
    pub mod ingest {
        /// Package `vigil.ingest.v1`.
        pub mod v1 {
            tonic::include_proto!("vigil.ingest.v1");
        }
    }

    /// The model server's canary rollout API.
    pub mod rollout {
        /// Package `vigil.rollout.v1`.
        pub mod v1 {
            tonic::include_proto!("vigil.rollout.v1");
        }
    }

    /// The stream processor's score and anomaly records.
    pub mod scoring {
        /// Package `vigil.scoring.v1`.
        pub mod v1 {
            tonic::include_proto!("vigil.scoring.v1");
        }
    }

    /// Replaying history through a candidate model (the stream processor's API).
    pub mod replay {
        /// Package `vigil.replay.v1`.
        pub mod v1 {
            tonic::include_proto!("vigil.replay.v1");
        }
    }

    /// The car sensor reading every service shares.
    pub mod sensor {
        /// Package `vigil.sensor.v1`.
        pub mod v1 {
            tonic::include_proto!("vigil.sensor.v1");
        }
    }
}

/// Every compiled file's descriptor, for gRPC reflection and text-format parsing.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
