//! Trace context over gRPC: a tower layer for tonic servers that makes one server span per
//! call, child of the `traceparent` in the request's metadata, and current while the
//! handler runs (so handlers can add attributes and their own children); and
//! [`context_into_metadata`] for clients.

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue};
use tonic::codegen::http;
use tonic::metadata::{MetadataMap, MetadataValue};

/// A layer for `tonic::transport::Server::builder().layer(...)`.
#[derive(Debug, Clone, Copy)]
pub struct GrpcTraceLayer {
    scope: &'static str,
}

impl GrpcTraceLayer {
    /// Spans are made by the global provider's tracer named `scope`.
    pub fn new(scope: &'static str) -> Self {
        Self { scope }
    }
}

impl<S> tower::Layer<S> for GrpcTraceLayer {
    type Service = GrpcTraceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTraceService { inner, scope: self.scope }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcTraceService<S> {
    inner: S,
    scope: &'static str,
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcTraceService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let parent = context_from_http(request.headers());
        // `/package.Service/Method`
        let path = request.uri().path().trim_start_matches('/');
        let (service, method) = path.split_once('/').unwrap_or((path, ""));
        let tracer = crate::tracer(self.scope);
        let span = tracer
            .span_builder(path.to_owned())
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", service.to_owned()),
                KeyValue::new("rpc.method", method.to_owned()),
            ])
            .start_with_context(&tracer, &parent);
        let cx = parent.with_span(span);
        let response = self.inner.call(request).with_context(cx.clone());
        Box::pin(async move {
            let result = response.await;
            let span = cx.span();
            match &result {
                // Unary calls that fail answer "trailers only": the status is in the headers.
                // A call that succeeds sends its status in the trailers, after this point.
                Ok(response) => match grpc_status(response.headers()) {
                    Some((code, message)) if code != 0 => {
                        span.set_attribute(KeyValue::new("rpc.grpc.status_code", i64::from(code)));
                        span.set_status(Status::error(message));
                    }
                    _ => span.set_attribute(KeyValue::new("rpc.grpc.status_code", 0i64)),
                },
                Err(error) => span.set_status(Status::error(error.to_string())),
            }
            span.end();
            result
        })
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<(i32, String)> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers.get("grpc-message").and_then(|m| m.to_str().ok()).unwrap_or_default();
    Some((code, message.to_owned()))
}

fn context_from_http(headers: &http::HeaderMap) -> Context {
    crate::context_from_pairs(
        crate::CONTEXT_HEADERS.iter().filter_map(|name| Some((*name, headers.get(*name)?.as_bytes()))),
    )
}

/// Puts `cx`'s span into a request's metadata, for the server to continue the trace.
pub fn context_into_metadata(cx: &Context, metadata: &mut MetadataMap) {
    for (name, value) in crate::context_headers(cx) {
        if let Ok(value) = MetadataValue::try_from(value) {
            metadata.insert(name, value);
        }
    }
}
