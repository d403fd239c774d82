//! Vigil's ingest service: MQTT in, Kafka out, and an MQTT acknowledgement only once
//! Kafka has the reading.
//!
//! ```text
//!  MQTT broker ──PUBLISH──▶ mqtt (bridge sessions, ordered acks, in-flight bound)
//!  devices ────PUBLISH────▶ proxy (MQTT server: connections, ACL, bounds; TLS)
//!                              │ record::from_mqtt (routing rules, validation)
//!                              ▼
//!  gRPC or HTTP ──Publish──▶ kafka::Sink (idempotent producer, acks=all) ──▶ Kafka
//!                              │ readings topic · dead-letter topic
//!  broker / devices ◀─PUBACK── (after Kafka confirmed, in arrival order)
//! ```
//!
//! [`config`] layers defaults, file, environment and flags; [`routing`] maps MQTT topics
//! to Kafka topics and keys; [`record`] builds the canonical `SensorReading` record or a
//! dead letter with the reason; [`kafka`] sends and waits for confirmation; [`mqtt`]
//! drives the bridge's sessions with a broker; [`proxy`] is the MQTT server devices connect
//! to directly; [`grpc`] serves `IngestService` and [`http`] `POST /v1/readings`, both
//! through [`batch`] (all or nothing per request); [`tls`] serves the proxy's and HTTP's
//! ports over TLS; [`run`] wires them.

#![forbid(unsafe_code)]

pub mod batch;
pub mod cli;
pub mod config;
pub mod grpc;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod mqtt;
pub mod proxy;
pub mod record;
pub mod routing;
pub mod tls;
pub mod trace;

use std::sync::Arc;
use std::time::Duration;

use admin::Shutdown;
use proto::vigil::ingest::v1::ingest_service_server::IngestServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::IngestConfig;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{0}")]
    Config(String),
    #[error("kafka producer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Source(#[from] mqtt::SourceError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("grpc server: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// Listeners bound by the caller (tests bind port 0); `None` serves nothing there.
#[derive(Debug, Default)]
pub struct Listeners {
    pub grpc: Option<TcpListener>,
    /// HTTP ingest (`POST /v1/readings`).
    pub http: Option<TcpListener>,
    /// MQTT proxy mode: devices connect here.
    pub mqtt_proxy: Option<TcpListener>,
    pub admin: Option<TcpListener>,
}

/// Runs ingest until `shutdown` resolves, then drains: stops taking messages, waits for
/// Kafka to confirm what was taken, acknowledges it, and returns.
pub async fn run(config: IngestConfig, listeners: Listeners, shutdown: impl Shutdown) -> Result<(), IngestError> {
    let registry = prometheus::Registry::new();
    let metrics = metrics::Metrics::new(&registry)?;
    let readiness = admin::Readiness::new();
    let routes = Arc::new(routing::Routes::new(&config.rules).map_err(|e| IngestError::Config(e.to_string()))?);
    let sink = kafka::Sink::new(&config.kafka, &config.dead_letter_topic, metrics.clone())?;
    // `draining` fires on shutdown: intake stops (MQTT and gRPC). The admin endpoint stays
    // up until the drain is over, reporting not ready.
    let (drain, draining) = watch::channel(false);
    let signal = |mut receiver: watch::Receiver<bool>| async move {
        let _ = receiver.wait_for(|fired| *fired).await;
    };
    let stop = drain.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });

    let admin_endpoint = admin::AdminEndpoint::start(listeners.admin, registry.clone(), readiness.clone());
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(listener) = listeners.grpc {
        tracing::info!(address = %local_addr(&listener)?, "serving gRPC IngestService");
        let (health, health_service) = tonic_health::server::health_reporter();
        let service = grpc::IngestGrpc::new(
            sink.clone(),
            config.grpc.topic.clone(),
            metrics.clone(),
            config.max_in_flight,
            config.event_time,
        );
        health.set_serving::<IngestServiceServer<grpc::IngestGrpc>>().await;
        let draining = signal(draining.clone());
        tasks.spawn(async move {
            let shutdown = async move {
                draining.await;
                health.set_not_serving::<IngestServiceServer<grpc::IngestGrpc>>().await;
            };
            // Graceful: calls under way finish (their readings confirmed) before it returns.
            tonic::transport::Server::builder()
                .layer(telemetry::GrpcTraceLayer::new(trace::SCOPE))
                .add_service(health_service)
                .add_service(IngestServiceServer::new(service))
                .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
                .await
                .map_err(IngestError::from)
        });
    }

    if let Some(listener) = listeners.http {
        tracing::info!(address = %local_addr(&listener)?, path = http::PATH, "serving HTTP ingest");
        let token = match &config.http.token_file {
            Some(path) => Some(
                admin::token::Token::from_file(path)
                    .map_err(|e| IngestError::Config(format!("http.token_file: {e}")))?,
            ),
            None => None,
        };
        let ingest = Arc::new(http::HttpIngest {
            sink: sink.clone(),
            topic: config.http.topic.clone(),
            metrics: metrics.clone(),
            event_time: config.event_time,
            max_readings: config.http.max_readings_per_request,
            token,
        });
        let router = http::router(ingest, config.http.max_body_bytes, config.http.max_concurrent_requests);
        let tls = serve_tls(&config.http.tls, "http.tls", vec![b"http/1.1".to_vec()], &draining)?;
        let stopped = signal(draining.clone());
        let failed = |e: std::io::Error| IngestError::Config(format!("http server: {e}"));
        // Graceful: requests under way finish (their readings confirmed) before it returns.
        tasks.spawn(async move {
            match tls {
                None => axum::serve(listener, router).with_graceful_shutdown(stopped).await.map_err(failed),
                Some(tls) => {
                    let listener = server_tls::TlsListener::new(listener, move || tls.current(), nodelay, "http")
                        .map_err(failed)?;
                    axum::serve(listener, router).with_graceful_shutdown(stopped).await.map_err(failed)
                }
            }
        });
    }

    if let Some(listener) = listeners.mqtt_proxy {
        tracing::info!(address = %local_addr(&listener)?, "serving MQTT proxy");
        let shared = proxy::shared(&config, Arc::clone(&routes), sink.clone(), metrics.clone())?;
        let grace = Duration::from_secs(config.shutdown_grace_seconds);
        let tls = serve_tls(&config.mqtt_proxy.tls, "mqtt_proxy.tls", Vec::new(), &draining)?;
        let (draining, drain) = (draining.clone(), drain.clone());
        tasks.spawn(async move {
            let result = proxy::run(listener, tls, shared, draining, grace).await;
            // A fatal producer error ends ingest, as it does the bridge.
            let _ = drain.send(true);
            result.map_err(|e| IngestError::Source(mqtt::SourceError::Kafka(e)))
        });
    }

    let result = if config.mqtt.url.is_empty() {
        // No MQTT bridge: the APIs alone take readings in, ready from the start.
        readiness.set(true);
        signal(draining).await;
        Ok(())
    } else {
        mqtt::run(&config, routes, sink.clone(), metrics, readiness.clone(), signal(draining)).await
    };
    readiness.set(false);
    admin_endpoint.stop().await;
    let mut result = result.map_err(IngestError::from);
    while let Some(task) = tasks.join_next().await {
        if let Ok(Err(error)) = task {
            tracing::error!(%error, "ingest task failed");
            if result.is_ok() {
                result = Err(error);
            }
        }
    }
    // Everything acknowledged was confirmed already; this only waits for sends that
    // were cut short (the grace period ran out), so the next session sees fewer repeats.
    let grace = Duration::from_secs(config.shutdown_grace_seconds.min(5));
    let _ = tokio::task::spawn_blocking(move || sink.flush(grace)).await;
    result
}

/// The TLS of one port, when `config` asks for it: loaded now (a bad file fails start-up,
/// named by `key`) and re-read until `draining` fires.
fn serve_tls(
    config: &Option<tls::ServerTlsConfig>,
    key: &'static str,
    alpn: Vec<Vec<u8>>,
    draining: &watch::Receiver<bool>,
) -> Result<Option<tls::ServerTls>, IngestError> {
    let Some(config) = config else { return Ok(None) };
    let source = tls::TlsSource { config: config.clone(), key, alpn };
    let loaded = source.load().map_err(IngestError::Config)?;
    source.watch(&loaded, draining.clone());
    Ok(Some(loaded))
}

/// Readings are small and acknowledgements smaller: no Nagle delay on ingest's ports.
fn nodelay(stream: &tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
}

fn local_addr(listener: &TcpListener) -> Result<std::net::SocketAddr, IngestError> {
    listener.local_addr().map_err(|e| IngestError::Config(format!("listener: {e}")))
}
