//! The gRPC front doors, all served on the one `--port`. Every call has a server span
//! (`telemetry::GrpcTraceLayer`, child of the caller's `traceparent`); inference calls add
//! the model version that answered, which is how a canary shows in a trace.

pub mod kserve;
pub mod rollout;
pub mod tf_serving;

/// The request's canary routing key ([`canary::ROUTING_KEY_METADATA`]), if it sent one.
pub fn routing_key(metadata: &tonic::metadata::MetadataMap) -> Option<Vec<u8>> {
    metadata.get(canary::ROUTING_KEY_METADATA).map(|value| value.as_bytes().to_vec())
}

/// The instrumentation scope of the model server's spans.
pub const TRACE_SCOPE: &str = "vigil-model-server";

/// Notes on the current call's span which model version answered (or was asked for).
pub fn trace_target(target: Option<(&str, i64, &str)>) {
    use opentelemetry::trace::TraceContextExt as _;
    let Some((model, version, signature)) = target else { return };
    let cx = opentelemetry::Context::current();
    let span = cx.span();
    if span.is_recording() {
        span.set_attributes([
            opentelemetry::KeyValue::new("vigil.model.name", model.to_owned()),
            opentelemetry::KeyValue::new("vigil.model.version", version),
            opentelemetry::KeyValue::new("vigil.model.signature", signature.to_owned()),
        ]);
    }
}
