//! The processor's part of a reading's trace: a consumer span per reading, child of the
//! context ingest put in the record's headers, open until the reading's outputs are
//! written; a client span per `Predict` attempt, whose context goes to the model server
//! in the call's metadata; and the reading span's context in the headers of the score,
//! anomaly or dead-letter record, for whoever reads those next.

use opentelemetry::trace::{SpanKind, Status, TraceContextExt as _, Tracer as _};
use telemetry::{Context, KeyValue};

use crate::model::Scored;
use crate::output::Source;

/// The instrumentation scope of the processor's spans.
pub const SCOPE: &str = "vigil-stream-processor";

/// The `Predict` method, as the span of a call to it is named.
const PREDICT: &str = "tensorflow.serving.PredictionService/Predict";

/// Starts the span of the reading `source` describes and makes its headers carry it.
pub fn reading(source: &mut Source) -> Context {
    let message = telemetry::ReceivedMessage {
        system: "kafka",
        destination: source.topic.clone(),
        attributes: vec![
            KeyValue::new("messaging.destination.partition.id", source.partition.to_string()),
            KeyValue::new("messaging.kafka.offset", source.offset),
        ],
    };
    let carrier = source.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
    let cx = message.process_span(SCOPE, "score reading", carrier);
    telemetry::set_context_headers(&mut source.headers, &cx);
    cx
}

/// Notes the score on the reading's span.
pub fn scored(cx: &Context, device_id: &str, scored: &Scored) {
    let span = cx.span();
    if span.is_recording() {
        span.set_attributes([
            KeyValue::new("vigil.device_id", device_id.to_owned()),
            KeyValue::new("vigil.model.name", scored.model_name.clone()),
            KeyValue::new("vigil.model.version", scored.model_version),
            KeyValue::new("vigil.score", f64::from(scored.score)),
            KeyValue::new("vigil.anomaly", scored.score > scored.threshold),
        ]);
    }
}

/// Notes why the reading went to the dead-letter topic.
pub fn dead_lettered(cx: &Context, reason: &'static str, error: &str) {
    let span = cx.span();
    span.set_attribute(KeyValue::new("vigil.dead_letter.reason", reason));
    span.set_status(Status::error(error.to_owned()));
}

/// Starts the client span of one `Predict` attempt: a child of the (first) reading's span,
/// carrying the routing key when the call scores one reading, and linked to the spans of
/// the other readings of a batched call (`batched`), as OpenTelemetry models batches.
pub fn predict_call(parent: &Context, device_id: Option<&str>, rows: usize, batched: &[Context]) -> Context {
    let tracer = telemetry::tracer(SCOPE);
    let mut attributes = vec![
        KeyValue::new("rpc.system", "grpc"),
        KeyValue::new("rpc.service", "tensorflow.serving.PredictionService"),
        KeyValue::new("rpc.method", "Predict"),
        KeyValue::new("vigil.rows", rows as i64),
    ];
    if let Some(device_id) = device_id {
        attributes.push(KeyValue::new("vigil.routing_key", device_id.to_owned()));
    }
    let span = tracer
        .span_builder(PREDICT)
        .with_kind(SpanKind::Client)
        .with_attributes(attributes)
        .with_links(
            batched
                .iter()
                .map(|cx| cx.span().span_context().clone())
                .filter(|span| span.is_valid())
                .map(opentelemetry::trace::Link::with_context)
                .collect(),
        )
        .start_with_context(&tracer, parent);
    parent.with_span(span)
}

/// Ends an attempt's span with its outcome.
pub fn predict_done<T>(cx: &Context, result: &Result<T, tonic::Status>) {
    let span = cx.span();
    let code = match result {
        Ok(_) => tonic::Code::Ok,
        Err(status) => {
            span.set_status(Status::error(status.message().to_owned()));
            status.code()
        }
    };
    span.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
    span.end();
}
