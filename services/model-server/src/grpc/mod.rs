//! The gRPC front doors, all served on the one `--port`.

pub mod kserve;
pub mod tf_serving;
