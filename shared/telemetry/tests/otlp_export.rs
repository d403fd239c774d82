//! With an OTLP endpoint set, spans reach a collector over gRPC with the service's name,
//! their parent and their attributes; a gRPC server behind `GrpcTraceLayer` continues the
//! trace a client put in the metadata. The collector here is a real OTLP/gRPC server on a
//! loopback port, speaking the protocol's own generated service.

use std::sync::{Arc, Mutex};

use opentelemetry::trace::{TraceContextExt as _, Tracer as _};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use telemetry::{Context, GrpcTraceLayer, Tracing};
use tonic::transport::server::TcpIncoming;

#[derive(Default, Clone)]
struct Collector {
    /// (service.name, span) for every span received.
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(name) => Some(name.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                spans.extend(scope.spans.into_iter().map(|span| (service.clone(), span)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_and_grpc_servers_continue_the_callers_trace() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );

    let tracing =
        Tracing::from_vars("vigil-test", |name| (name == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| endpoint.clone()))
            .unwrap();
    assert_eq!(tracing.endpoint(), Some(endpoint.as_str()));

    // A traced gRPC server (the collector's own service again, behind the layer) called
    // by a client that puts its span in the metadata.
    let served = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(GrpcTraceLayer::new("vigil-test-server"))
            .add_service(TraceServiceServer::new(served))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    let tracer = telemetry::tracer("vigil-test-client");
    let client_span = tracer.start_with_context("call", &Context::new());
    let client_cx = Context::new().with_span(client_span);
    let mut request = tonic::Request::new(ExportTraceServiceRequest { resource_spans: vec![] });
    telemetry::context_into_metadata(&client_cx, request.metadata_mut());
    let mut client =
        opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient::connect(address)
            .await
            .unwrap();
    client.export(request).await.unwrap();
    let trace_id = client_cx.span().span_context().trace_id().to_string();
    let client_span_id = client_cx.span().span_context().span_id().to_string();
    client_cx.span().end();

    tracing.shutdown().await; // flushes the batch

    let spans = collector.spans.lock().unwrap().clone();
    let names: Vec<_> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
    assert_eq!(spans.len(), 2, "{names:?}");
    assert!(spans.iter().all(|(service, _)| service == "vigil-test"));
    let server = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.name == "opentelemetry.proto.collector.trace.v1.TraceService/Export")
        .unwrap_or_else(|| panic!("no server span in {names:?}"));
    assert_eq!(hex(&server.trace_id), trace_id, "the server continued the client's trace");
    assert_eq!(hex(&server.parent_span_id), client_span_id, "the server span is the client span's child");
    let attribute =
        |key: &str| server.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()?.value.clone());
    assert_eq!(attribute("rpc.method"), Some(Value::StringValue("Export".into())));
    assert_eq!(attribute("rpc.grpc.status_code"), Some(Value::IntValue(0)));
}
