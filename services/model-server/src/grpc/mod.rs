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

/// Ends an inference or metadata call: notes its target (model, version, signature) on the
/// call's span, records it in the metrics, and turns its result into gRPC's.
pub(crate) fn finish_call<T>(
    metrics: &crate::metrics::Metrics,
    api: crate::metrics::Api,
    started: std::time::Instant,
    target: Option<&(String, i64, String)>,
    result: Result<T, crate::error::ServeError>,
) -> Result<tonic::Response<T>, tonic::Status> {
    trace_target(target.map(|(model, version, signature)| (model.as_str(), *version, signature.as_str())));
    metrics.observe_result(api, target, started, &result);
    result.map(tonic::Response::new).map_err(tonic::Status::from)
}

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
