//! Traces for every Vigil service, so that one reading is one trace from the device to
//! its score record:
//!
//! ```text
//!  device ──MQTT 5 user properties──▶ ingest ──Kafka headers──▶ stream processor
//!     ──gRPC metadata──▶ model server          stream processor ──Kafka headers──▶ scores
//! ```
//!
//! Each hop carries W3C trace context (`traceparent`, `tracestate`) and each service adds
//! its span as a child of what arrived. The services call the OpenTelemetry API through
//! the global tracer provider: [`Tracing::from_env`] installs an OTLP/gRPC exporter when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and
//! nothing when it is not — then spans cost next to nothing and the context that arrived
//! is passed on unchanged, so a traced device still gets one trace through untraced
//! services. The SDK's own variables apply (`OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`/`_ARG`: every reading makes a few
//! spans, so busy fleets want `parentbased_traceidratio`).

#![forbid(unsafe_code)]

mod grpc;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
pub use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;

pub use grpc::{GrpcTraceLayer, GrpcTraceService, context_into_metadata};

/// The W3C trace context headers, as named on every carrier.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
pub const CONTEXT_HEADERS: [&str; 2] = [TRACEPARENT, TRACESTATE];

/// Environment variables that switch export on.
const ENDPOINT_VARIABLES: [&str; 2] = ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"];

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(
        "{variable}={value:?}: Vigil exports OTLP over gRPC only; unset it or set it to \"grpc\" and point \
         OTEL_EXPORTER_OTLP_ENDPOINT at the collector's gRPC port (usually 4317)"
    )]
    UnsupportedProtocol { variable: &'static str, value: String },
    #[error("setting up the OTLP trace exporter for {endpoint}: {source}")]
    Exporter { endpoint: String, source: opentelemetry_otlp::ExporterBuildError },
}

/// The process's trace export: on when the environment asks for it. Keep it for the
/// life of the process and call [`Tracing::shutdown`] on the way out, which sends what
/// is still buffered.
#[derive(Debug)]
#[must_use = "dropping it does not flush; call shutdown() at exit"]
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
    endpoint: Option<String>,
}

impl Tracing {
    /// Reads the OpenTelemetry environment and installs the global tracer provider if an
    /// OTLP endpoint is set (`OTEL_SDK_DISABLED=true` keeps it off). `service_name` is the
    /// default `service.name`; `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` override
    /// it. Must be called inside a Tokio runtime (the gRPC exporter lives on it).
    pub fn from_env(service_name: &str) -> Result<Self, TelemetryError> {
        Self::from_vars(service_name, |name| std::env::var(name).ok())
    }

    /// As [`Tracing::from_env`], reading the variables through `var`.
    pub fn from_vars(service_name: &str, var: impl Fn(&str) -> Option<String>) -> Result<Self, TelemetryError> {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let off = Self { provider: None, endpoint: None };
        if set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(off);
        }
        let Some(endpoint) = ENDPOINT_VARIABLES.iter().find_map(|name| set(name)) else {
            return Ok(off);
        };
        for variable in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
            if let Some(value) = set(variable)
                && value != "grpc"
            {
                return Err(TelemetryError::UnsupportedProtocol { variable, value });
            }
        }
        // The builder reads the headers, timeout and compression variables itself.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|source| TelemetryError::Exporter { endpoint: endpoint.clone(), source })?;
        let named_elsewhere = set("OTEL_SERVICE_NAME").is_some()
            || set("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
        let mut resource = opentelemetry_sdk::Resource::builder();
        if !named_elsewhere {
            resource = resource.with_service_name(service_name.to_owned());
        }
        let provider =
            SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        tracing::info!(%endpoint, "exporting traces over OTLP/gRPC");
        Ok(Self { provider: Some(provider), endpoint: Some(endpoint) })
    }

    /// Where traces go, if anywhere.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// Sends what is buffered and stops exporting (off the async workers: the flush
    /// blocks until the exporter is done).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else { return };
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(error)) = flushed {
            tracing::warn!(%error, "flushing traces at exit failed");
        }
    }
}

/// A tracer of the global provider, named for the code that makes the spans.
pub fn tracer(scope: &'static str) -> opentelemetry::global::BoxedTracer {
    opentelemetry::global::tracer(scope)
}

/// The trace context carried by `pairs` (header or user-property name, value); an empty
/// context when there is none or it does not parse.
pub fn context_from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Context {
    let carried = CarriedPairs(
        pairs
            .into_iter()
            .filter(|(name, _)| CONTEXT_HEADERS.iter().any(|h| name.eq_ignore_ascii_case(h)))
            .filter_map(|(name, value)| Some((name.to_ascii_lowercase(), std::str::from_utf8(value).ok()?.to_owned())))
            .collect(),
    );
    TraceContextPropagator::new().extract(&carried)
}

/// A message a service took from a broker, as OpenTelemetry's messaging conventions
/// describe it: the system (`mqtt`, `kafka`), where it came from, and more attributes (its
/// partition and offset, say).
pub struct ReceivedMessage {
    pub system: &'static str,
    pub destination: String,
    pub attributes: Vec<KeyValue>,
}

impl ReceivedMessage {
    /// Starts the consumer span `name` (in `scope`) that processes the message, a child of
    /// the trace context its `carrier` (header or user-property pairs) holds, or the root
    /// of a new trace.
    pub fn process_span<'a>(
        self,
        scope: &'static str,
        name: &'static str,
        carrier: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Context {
        use opentelemetry::trace::{SpanKind, Tracer as _};
        let parent = context_from_pairs(carrier);
        let tracer = tracer(scope);
        let mut attributes = Vec::with_capacity(3 + self.attributes.len());
        attributes.extend([
            KeyValue::new("messaging.system", self.system),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.destination.name", self.destination),
        ]);
        attributes.extend(self.attributes);
        let span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes)
            .start_with_context(&tracer, &parent);
        parent.with_span(span)
    }
}

/// `cx`'s span as trace context headers (`traceparent`, and `tracestate` when it has
/// one); empty when `cx` holds no valid span context.
pub fn context_headers(cx: &Context) -> Vec<(&'static str, String)> {
    let mut out = CarriedPairs(Vec::new());
    TraceContextPropagator::new().inject_context(cx, &mut out);
    out.0
        .into_iter()
        .filter(|(_, value)| !value.is_empty()) // an empty `tracestate` says nothing
        .filter_map(|(name, value)| Some((CONTEXT_HEADERS.into_iter().find(|h| *h == name)?, value)))
        .collect()
}

/// Replaces the trace context in a record's headers with `cx`'s, so whoever reads the
/// record continues this span's trace. Headers are left alone when `cx` has no span.
pub fn set_context_headers(headers: &mut Vec<(String, Vec<u8>)>, cx: &Context) {
    let context = context_headers(cx);
    if context.is_empty() {
        return;
    }
    headers.retain(|(name, _)| !CONTEXT_HEADERS.contains(&name.as_str()));
    headers.extend(context.into_iter().map(|(name, value)| (name.to_owned(), value.into_bytes())));
}

/// The trace id of `cx`'s span as 32 hex digits, for logs and records; `None` without one.
pub fn trace_id(cx: &Context) -> Option<String> {
    let span = cx.span();
    let context = span.span_context();
    context.is_valid().then(|| context.trace_id().to_string())
}

struct CarriedPairs(Vec<(String, String)>);

impl Extractor for CarriedPairs {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(name, _)| name == key).map(|(_, value)| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_str()).collect()
    }
}

impl Injector for CarriedPairs {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn context_survives_a_round_trip_through_headers() {
        let cx = context_from_pairs([("content-type", &b"x"[..]), ("traceparent", PARENT.as_bytes())]);
        assert_eq!(trace_id(&cx).as_deref(), Some("0af7651916cd43dd8448eb211c80319c"));
        assert_eq!(cx.span().span_context().span_id().to_string(), "b7ad6b7169203331");
        assert!(cx.span().span_context().is_remote());
        assert_eq!(context_headers(&cx), vec![(TRACEPARENT, PARENT.to_owned())]);
    }

    #[test]
    fn property_names_are_matched_without_case_and_garbage_is_no_context() {
        let cx = context_from_pairs([("TraceParent", PARENT.as_bytes())]);
        assert!(trace_id(&cx).is_some());
        for bad in ["", "00-xyz", "00-00000000000000000000000000000000-b7ad6b7169203331-01"] {
            let cx = context_from_pairs([("traceparent", bad.as_bytes())]);
            assert_eq!(trace_id(&cx), None, "{bad:?}");
            assert!(context_headers(&cx).is_empty());
        }
        assert_eq!(trace_id(&context_from_pairs([("traceparent", &[0xff, 0xfe][..])])), None);
    }

    #[test]
    fn record_headers_get_the_new_context_and_keep_the_rest() {
        let child = SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::from_key_value([("vigil", "1")]).unwrap(),
        );
        let cx = Context::new().with_remote_span_context(child);
        let mut headers =
            vec![("mqtt.topic".to_owned(), b"t".to_vec()), ("traceparent".to_owned(), PARENT.as_bytes().to_vec())];
        set_context_headers(&mut headers, &cx);
        assert_eq!(headers[0], ("mqtt.topic".to_owned(), b"t".to_vec()));
        assert_eq!(headers[1].1, b"00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01");
        assert_eq!(headers[2], ("tracestate".to_owned(), b"vigil=1".to_vec()));
        assert_eq!(headers.len(), 3);

        // No span: what was carried stays.
        let mut untouched = vec![("traceparent".to_owned(), PARENT.as_bytes().to_vec())];
        set_context_headers(&mut untouched, &Context::new());
        assert_eq!(untouched[0].1, PARENT.as_bytes());
    }

    #[test]
    fn export_is_off_unless_an_endpoint_is_set_and_other_protocols_are_refused() {
        fn env<'a>(pairs: &'a [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> + 'a {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
        }
        assert!(Tracing::from_vars("t", env(&[])).unwrap().endpoint().is_none());
        assert!(Tracing::from_vars("t", env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])).unwrap().endpoint().is_none());
        let disabled = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"), ("OTEL_SDK_DISABLED", "true")];
        assert!(Tracing::from_vars("t", env(&disabled)).unwrap().endpoint().is_none());
        let http = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ];
        let error = Tracing::from_vars("t", env(&http)).unwrap_err().to_string();
        assert!(error.contains("OTEL_EXPORTER_OTLP_PROTOCOL") && error.contains("gRPC"), "{error}");
    }
}
