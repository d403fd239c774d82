//! Ingest's part of a reading's trace: one span per message, from its arrival until Kafka
//! confirmed it, child of the trace context the device sent (MQTT 5 user properties
//! `traceparent`/`tracestate`) or of the gRPC call it came in. The Kafka record carries
//! this span's context in its headers, so the stream processor continues the trace.

use opentelemetry::trace::{SpanKind, Status, TraceContextExt as _, Tracer as _};
use telemetry::{Context, KeyValue};

use crate::kafka::{SinkError, Written};
use crate::record::OutRecord;

/// The instrumentation scope of ingest's spans.
pub const SCOPE: &str = "vigil-ingest";

/// Starts the span of a message that arrived on `mqtt_topic` with `user_properties`.
pub fn mqtt_message(mqtt_topic: &str, user_properties: &[(String, String)]) -> Context {
    let carrier = user_properties.iter().map(|(k, v)| (k.as_str(), v.as_bytes()));
    let message =
        telemetry::ReceivedMessage { system: "mqtt", destination: mqtt_topic.to_owned(), attributes: Vec::new() };
    message.process_span(SCOPE, "ingest reading", carrier)
}

/// Starts the span of a reading that came in the current API call (gRPC or HTTP).
pub fn api_reading(device_id: &str) -> Context {
    let parent = Context::current();
    let tracer = telemetry::tracer(SCOPE);
    let span = tracer
        .span_builder("ingest reading")
        .with_kind(SpanKind::Internal)
        .with_attributes([KeyValue::new("vigil.device_id", device_id.to_owned())])
        .start_with_context(&tracer, &parent);
    parent.with_span(span)
}

/// Puts the span's context on the record it became, and says what the record is.
pub fn attach(cx: &Context, record: &mut OutRecord) {
    let span = cx.span();
    if span.is_recording() {
        span.set_attribute(KeyValue::new("vigil.kafka.topic", record.topic.clone()));
        if let Some(reason) = record.dead_letter {
            span.set_attribute(KeyValue::new("vigil.dead_letter.reason", reason));
        }
    }
    telemetry::set_context_headers(&mut record.headers, cx);
}

/// Ends the span with where Kafka put the record, or why it could not.
pub fn written(cx: &Context, outcome: &Result<Written, SinkError>) {
    let span = cx.span();
    match outcome {
        Ok(written) => {
            span.set_attribute(KeyValue::new("messaging.destination.partition.id", written.partition.to_string()));
            span.set_attribute(KeyValue::new("messaging.kafka.offset", written.offset));
        }
        Err(error) => span.set_status(Status::error(error.to_string())),
    }
    span.end();
}
