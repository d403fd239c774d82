//! Vigil's stream processor: every reading on the readings topic is scored by the model
//! server (gRPC `Predict`, readings batched into calls adaptively; or, embedded, by the
//! SavedModel in this process) and its score, and anomaly when it is one, is written back
//! to Kafka, in order per partition and at least once (or, with
//! `delivery = "exactly-once"`, in Kafka transactions: [`transactions`]).
//!
//! ```text
//!  readings topic ──▶ pipeline (consumer group; a worker per partition, bounded)
//!                       │ model::ModelClient ──Predict──▶ model server replicas
//!                       ▼    (batches; tower: limit, retry budget, timeout, p2c over DNS)
//!                     output (Score / Anomaly / dead letter; protobuf or JSON)
//!                       ▼
//!  scores · anomalies · dead-letter topics  (idempotent producer; offsets stored only
//!                                             once a reading's outputs are confirmed)
//! ```
//!
//! [`config`] layers defaults, file, environment and flags; [`discovery`] finds model
//! server replicas; [`model`] calls them; [`windows`] keeps each device's last readings
//! for models that score a window; [`output`] builds the records; [`pipeline`]
//! consumes, orders, writes and commits (and rebuilds windows when partitions move); [`replay`] re-scores a time range through a
//! candidate model version (gRPC `ReplayService`) beside the live group, never in it;
//! [`run`] wires them together.

#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod discovery;
pub mod kafka_clients;
pub mod metrics;
pub mod model;
pub mod output;
pub mod pipeline;
pub mod replay;
pub mod trace;
pub mod transactions;
pub mod windows;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use admin::Shutdown;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::Producer as _;
use tokio::net::TcpListener;

use crate::config::{Delivery, ProcessorConfig, ServiceConfig as _};
use crate::pipeline::{RebalanceHandler, WorkerResources, Workers};

#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error("{0}")]
    Config(String),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("stopped: {0}")]
    Fatal(String),
}

/// Listeners bound by the caller (tests bind port 0); `None` serves nothing.
#[derive(Debug, Default)]
pub struct Listeners {
    /// `/live`, `/ready`, `/metrics`.
    pub admin: Option<TcpListener>,
    /// gRPC `vigil.replay.v1.ReplayService` and `grpc.health.v1`.
    pub grpc: Option<TcpListener>,
}

/// Runs the processor until `shutdown` resolves, then drains: in-flight readings are
/// finished and written, their offsets committed, and the group left. Needs a
/// multi-threaded tokio runtime.
pub async fn run(config: ProcessorConfig, listeners: Listeners, shutdown: impl Shutdown) -> Result<(), ProcessorError> {
    config.check().map_err(|e| ProcessorError::Config(e.to_string()))?;
    let config = Arc::new(config);
    let registry = prometheus::Registry::new();
    let metrics = metrics::Metrics::new(&registry)?;
    let readiness = admin::Readiness::new();
    // Dropped on an early return, which stops it too.
    let admin_endpoint = admin::AdminEndpoint::start(listeners.admin, registry.clone(), readiness.clone());

    // Dropped on any return, which also stops the gRPC server and cancels a running replay.
    let (stopping, stopping_seen) = tokio::sync::watch::channel(false);
    let grpc_task = listeners.grpc.map(|listener| {
        let replayer = Arc::new(replay::Replayer::new(config.clone(), metrics.clone()));
        serve_grpc(listener, replayer, stopping_seen)
    });

    let model = model::ModelClient::new(&config.model, metrics.clone()).map_err(ProcessorError::Config)?;
    let exactly_once = config.delivery == Delivery::ExactlyOnce;
    let mut producer_config = kafka_clients::producer_config(&config);
    if exactly_once {
        // A transaction must finish within transaction.timeout.ms, so a record may not
        // wait forever (message.timeout.ms 0) inside one.
        let transaction_timeout = producer_config.get("transaction.timeout.ms").unwrap_or("60000").to_owned();
        producer_config
            .set("transactional.id", config.transactional_id())
            .set("transaction.timeout.ms", &transaction_timeout)
            .set("message.timeout.ms", &transaction_timeout);
    }
    let producer: rdkafka::producer::FutureProducer = producer_config.create()?;
    let workers = Arc::new(Mutex::new(Workers::default()));
    let runtime = tokio::runtime::Handle::current();
    let context = RebalanceHandler::new(
        workers.clone(),
        runtime.clone(),
        Duration::from_secs(config.rebalance_drain_seconds),
        metrics.clone(),
        readiness.clone(),
    );
    let mut consumer_config = kafka_clients::consumer_config(&config);
    kafka::group::join(&mut consumer_config, &config.group_id, config.group_instance_id().as_deref());
    consumer_config
        // Exactly-once: offsets are committed in the producer's transactions instead.
        .set("enable.auto.commit", if exactly_once { "false" } else { "true" })
        .set("enable.auto.offset.store", "false");
    let consumer: Arc<BaseConsumer<RebalanceHandler>> = Arc::new(consumer_config.create_with_context(context)?);

    let mut shutdown = std::pin::pin!(shutdown);
    // Read nothing before the model's signature is known: scoring needs it.
    let mut backoff = config.model.backoff();
    loop {
        match model.inputs().await {
            Ok(_) => break,
            Err(error) => {
                let wait = backoff.next_delay();
                tracing::warn!(%error, retry_in_ms = wait.as_millis() as u64, "waiting for the model (its server, or its first version to load when embedded)");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = &mut shutdown => {
                        admin_endpoint.stop().await;
                        return Ok(());
                    }
                }
            }
        }
    }
    let transactions = if exactly_once {
        let producer = producer.clone();
        let id = config.transactional_id();
        tracing::info!(transactional_id = %id, "exactly-once: outputs and offsets are committed in Kafka transactions");
        let started = tokio::task::spawn_blocking(move || transactions::Transactions::start(producer))
            .await
            .map_err(|e| ProcessorError::Config(format!("starting transactions: {e}")))?;
        Some(started.map_err(|e| ProcessorError::Fatal(format!("starting transactions as {id}: {e}")))?)
    } else {
        None
    };
    let (fatal, mut fatal_seen) = tokio::sync::watch::channel(None);
    let shared = Arc::new(WorkerResources::new(producer.clone(), model, config.clone(), metrics, transactions, fatal));
    consumer.context().wire(&consumer, shared.clone());
    consumer.subscribe(&[config.readings_topic.as_str()])?;
    tracing::info!(
        topic = %config.readings_topic,
        group = %config.group_id,
        instance = config.group_instance_id().as_deref().unwrap_or("(dynamic member)"),
        "consuming"
    );
    // Ready once the group has answered (the rebalance handler sets it), even with no
    // partitions for this replica.
    readiness.set_waiting(kafka::group::NO_PARTITIONS_YET);
    let stop = Arc::new(AtomicBool::new(false));
    let poll_thread = {
        let (consumer, workers, shared, stop) = (consumer.clone(), workers.clone(), shared.clone(), stop.clone());
        std::thread::Builder::new()
            .name("kafka-consumer".into())
            .spawn(move || pipeline::poll_loop(consumer, workers, shared, stop, runtime))
            .map_err(|e| ProcessorError::Config(format!("starting the consumer thread: {e}")))?
    };
    drop(consumer); // the poll thread holds the last reference and closes it

    let failure = tokio::select! {
        () = &mut shutdown => None,
        Ok(()) = fatal_seen.changed() => fatal_seen.borrow().clone(),
    };
    readiness.set(false);
    let _ = stopping.send(true);
    stop.store(true, Ordering::Release);
    let _ = tokio::task::spawn_blocking(move || poll_thread.join()).await;
    let grace = Duration::from_secs(config.shutdown_grace_seconds.min(5));
    drop(shared);
    let _ = tokio::task::spawn_blocking(move || producer.flush(grace)).await;
    admin_endpoint.stop().await;
    if let Some(task) = grpc_task {
        let _ = task.await;
    }
    match failure {
        Some(error) => Err(ProcessorError::Fatal(error)),
        None => Ok(()),
    }
}

/// Serves `ReplayService` and gRPC health on `listener` until `stopping` (health then says
/// NOT_SERVING, and a running replay is cancelled).
fn serve_grpc(
    listener: TcpListener,
    replayer: Arc<replay::Replayer>,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    use proto::vigil::replay::v1::replay_service_server::ReplayServiceServer;
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "serving gRPC ReplayService");
    }
    tokio::spawn(async move {
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<ReplayServiceServer<replay::grpc::ReplayGrpc>>().await;
        let service = replay::grpc::ReplayGrpc::new(replayer, stopping.clone());
        let mut stopping = stopping;
        let shutdown = async move {
            // A closed channel (run returned) stops the server too.
            let _ = stopping.wait_for(|stopping| *stopping).await;
            health.set_not_serving::<ReplayServiceServer<replay::grpc::ReplayGrpc>>().await;
        };
        let served = tonic::transport::Server::builder()
            .layer(telemetry::GrpcTraceLayer::new(trace::SCOPE))
            .add_service(health_service)
            .add_service(ReplayServiceServer::new(service))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "the gRPC server failed");
        }
    })
}
