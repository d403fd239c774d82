//! The gRPC front doors, all served on the one `--port`.

pub mod kserve;
pub mod rollout;
pub mod tf_serving;

/// The request's canary routing key ([`canary::ROUTING_KEY_METADATA`]), if it sent one.
pub fn routing_key(metadata: &tonic::metadata::MetadataMap) -> Option<Vec<u8>> {
    metadata.get(canary::ROUTING_KEY_METADATA).map(|value| value.as_bytes().to_vec())
}
