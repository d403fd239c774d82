//! Wires the model server together: repository, pollers, rollouts, gRPC (TF Serving,
//! KServe v2, rollouts, health, reflection) on one port, REST on another, each over TLS when
//! configured (see [`crate::security`]), and graceful shutdown.
//!
//! [`run`] takes listeners that are already bound, so tests bind `127.0.0.1:0` and hand
//! them in (no port races), and a shutdown future, so tests stop the server in-process.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use proto::tensorflow::serving::model_service_server::ModelServiceServer;
use proto::tensorflow::serving::prediction_service_server::PredictionServiceServer;
use proto::vigil::rollout::v1::rollout_service_server::RolloutServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::ServerConfig;
use crate::grpc::kserve::Kserve;
use crate::grpc::rollout::RolloutApi;
use crate::grpc::tf_serving::{ModelServiceImpl, TfServing};
use crate::inference::Inference;
use crate::metrics::Metrics;
use crate::model_config;
use crate::overload::{self, InFlight};
use crate::repository::Repository;
use crate::rest::{self, RestState};
use crate::rollout::Rollouts;
use crate::rollout::controller;
use crate::rollout::log::RolloutLog;

/// The listeners the server serves on.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    pub rest: Option<TcpListener>,
}

/// gRPC service names reported by the health service besides one per model.
const HEALTH_SERVICES: [&str; 6] = [
    "",
    "PredictionService",
    "ModelService",
    "tensorflow.serving.PredictionService",
    "tensorflow.serving.ModelService",
    "inference.GRPCInferenceService",
];

/// Loads the configured models, then serves until `shutdown` resolves and in-flight
/// requests have drained (or the grace period ran out).
pub async fn run(config: ServerConfig, listeners: Listeners, shutdown: impl admin::Shutdown) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let repository = Repository::new(config.models.clone(), config.repository.clone(), metrics.clone())?;

    // Like TF Serving, finish the initial loads before answering; connections made
    // meanwhile wait in the listen backlog. A version that fails is reported, not fatal.
    let initial = repository.reconcile();
    tokio::task::spawn_blocking(move || Repository::wait(initial)).await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let mut background = Vec::new();
    if let Some(every) = config.file_system_poll {
        background.push(tokio::spawn(poll_versions(repository.clone(), every, stop_rx.clone())));
    }
    if let (Some(every), Some(path)) = (config.model_config_poll, config.model_config_file.clone()) {
        background.push(tokio::spawn(poll_config_file(repository.clone(), path, every, stop_rx.clone())));
    }

    // Rollout state: read it (from Kafka, to its end) before serving, then the file's
    // rollouts on top; the analysis loop runs on whichever replica leads.
    let rollouts = Rollouts::default();
    let rollout_log = match config.rollout_kafka.clone() {
        Some(options) => {
            let (log, task) =
                RolloutLog::kafka(rollouts.clone(), config.replica_id.clone(), options, stop_rx.clone()).await?;
            background.push(task);
            log
        }
        None => RolloutLog::in_memory(rollouts.clone(), config.replica_id.clone()),
    };
    if config.rollout_config_file.is_some() {
        controller::apply_file(&rollout_log, &config.rollouts).await;
    }
    if let (Some(every), Some(path)) = (config.rollout_config_poll, config.rollout_config_file.clone()) {
        background.push(tokio::spawn(controller::poll_file(rollout_log.clone(), path, every, stop_rx.clone())));
    }
    let inference = Inference::new(repository.clone(), config.limits.clone(), rollouts, metrics.clone());
    background.push(tokio::spawn(controller::run_analysis(
        rollout_log.clone(),
        inference.windows.clone(),
        metrics.clone(),
        stop_rx.clone(),
    )));
    let limit = config.grpc_max_message_bytes;
    let tf = TfServing {
        inference: inference.clone(),
        metrics: metrics.clone(),
        tensor_content_outputs: config.tensor_content_outputs,
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let health = if config.grpc_health {
        let (reporter, service) = tonic_health::server::health_reporter();
        update_health(&reporter, &repository).await;
        background.push(tokio::spawn(watch_health(reporter.clone(), repository.clone(), stop_rx.clone())));
        Some((reporter, service))
    } else {
        None
    };

    let overload = &config.overload;
    let in_flight = InFlight::new(overload.max_in_flight, metrics.clone());
    let mut builder = tonic::transport::Server::builder()
        // tonic leaves streams per connection unlimited unless told; one connection must
        // not be able to open thousands of concurrent calls.
        .max_concurrent_streams(overload.grpc_max_concurrent_streams)
        // Find peers that went away without closing (a pod killed, a cable pulled).
        .http2_keepalive_interval(Some(overload::HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(overload::HTTP2_KEEPALIVE_TIMEOUT));
    if let Some(timeout) = overload.request_timeout {
        // A client's shorter grpc-timeout wins (tonic takes the smaller of the two).
        builder = builder.timeout(timeout);
    }
    let mut router = builder
        // Outermost: a request past the in-flight limit costs nothing more than its refusal.
        .layer(in_flight.clone())
        .layer(telemetry::GrpcTraceLayer::new(crate::grpc::TRACE_SCOPE))
        // Inside the trace layer, so refused calls are traced too: management calls need
        // credentials when configured, and every one is audited.
        .layer(config.security.auth().layer())
        .add_service(
            PredictionServiceServer::new(tf).max_decoding_message_size(limit).max_encoding_message_size(usize::MAX),
        )
        .add_service(ModelServiceServer::new(ModelServiceImpl { repository: repository.clone() }))
        .add_service(
            GrpcInferenceServiceServer::new(Kserve { inference: inference.clone(), metrics: metrics.clone() })
                .max_decoding_message_size(limit)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(RolloutServiceServer::new(RolloutApi { log: rollout_log, repository: repository.clone() }))
        .add_service(reflection)
        .add_service(reflection_alpha);
    if let Some((_, service)) = &health {
        router = router.add_service(service.clone());
    }

    // One shutdown signal fans out to both servers and the pollers (a watch channel keeps
    // the value, so a listener that subscribes late still sees it).
    let signalled = {
        let reporter = health.as_ref().map(|(r, _)| r.clone());
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down: refusing new work, draining in-flight requests");
            if let Some(reporter) = reporter {
                for name in HEALTH_SERVICES {
                    reporter.set_service_status(name, ServingStatus::NotServing).await;
                }
            }
            let _ = stop_tx.send(true);
        })
    };

    // With --ssl_config_file the listeners stay plain TCP and each accepted connection is
    // handshaken in its own task (security::tls), with the certificate current at the time.
    config.security.log_summary();
    background.extend(config.security.watch(&stop_rx));
    let grpc = match config.security.tls() {
        // TCP_NODELAY and keepalive, as every accepted connection gets (overload::tune_accepted).
        None => {
            let incoming = TcpIncoming::from(listeners.grpc)
                .with_nodelay(Some(true))
                .with_keepalive(Some(overload::TCP_KEEPALIVE));
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone())))
        }
        Some(tls) => {
            let incoming = tls.grpc_incoming(listeners.grpc);
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone())))
        }
    };
    let rest = listeners.rest.map(|listener| {
        let state = RestState {
            inference,
            metrics: metrics.clone(),
            in_flight: in_flight.clone(),
            request_timeout: config.overload.request_timeout,
        };
        let app = rest::router(state, config.monitoring_path.clone(), config.overload.rest_max_body_bytes);
        let stop = stopped(stop_rx.clone());
        let tls = config.security.tls().cloned();
        tokio::spawn(async move {
            match tls {
                None => {
                    use axum::serve::ListenerExt as _;
                    let listener = listener.tap_io(|tcp| overload::tune_accepted(tcp));
                    axum::serve(listener, app).with_graceful_shutdown(stop).await
                }
                Some(tls) => tls.serve_rest(listener, app, stop).await,
            }
        })
    });

    // Serve until the servers end on their own (an error) or the signal drains them.
    let grace = config.shutdown_grace;
    let drained = async {
        let grpc_result = grpc.await?;
        if let Some(rest) = rest {
            rest.await??;
        }
        grpc_result?;
        anyhow::Ok(())
    };
    tokio::pin!(drained);
    let result = tokio::select! {
        result = &mut drained => result,
        _ = async { stopped(stop_rx.clone()).await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_seconds = grace.as_secs(), "grace period over; exiting with requests in flight");
            Ok(())
        }
    };
    signalled.abort();
    // Every background task ends on the stop flag; wait for them (briefly), so the Kafka
    // clients of the rollout log have closed when this returns.
    let _ = stop_tx.send(true);
    let ending = join_in_turn(background);
    if tokio::time::timeout(Duration::from_secs(5), ending).await.is_err() {
        tracing::warn!("background tasks still running 5 s after shutdown; leaving them");
    }
    result
}

/// Awaits every task, in order (each has been told to stop).
async fn join_in_turn(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}

/// Resolves once the shutdown flag is set.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Runs `tick` every `every` until the shutdown flag is set.
async fn every<F, Fut>(every: Duration, mut stop: watch::Receiver<bool>, mut tick: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        tick().await;
    }
}

async fn poll_versions(repository: Repository, period: Duration, stop: watch::Receiver<bool>) {
    tokio::select! {
        () = repository.follow_versions(period) => {}
        () = stopped(stop) => {}
    }
}

async fn poll_config_file(
    repository: Repository,
    path: std::path::PathBuf,
    period: Duration,
    stop: watch::Receiver<bool>,
) {
    every(period, stop, || async {
        let path = path.clone();
        match tokio::task::spawn_blocking(move || model_config::read_model_config_file(&path)).await {
            Ok(Ok(configs)) if configs != repository.configs() => {
                tracing::info!(models = configs.len(), "model config file changed; applying");
                let repository = repository.clone();
                match tokio::task::spawn_blocking(move || repository.set_configs(configs)).await {
                    Ok(Ok(_loads)) => {}
                    Ok(Err(e)) => tracing::error!("model config file rejected: {e}"),
                    Err(e) => tracing::error!("applying the model config file failed: {e}"),
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!("model config file unreadable, keeping the current config: {e}"),
            Err(e) => tracing::error!("model config file read task failed: {e}"),
        }
    })
    .await;
}

async fn update_health(reporter: &HealthReporter, repository: &Repository) {
    let table = repository.table();
    let names = repository.model_names();
    let all_ready = repository.readiness().is_ok();
    for name in HEALTH_SERVICES {
        let status = if all_ready { ServingStatus::Serving } else { ServingStatus::NotServing };
        reporter.set_service_status(name, status).await;
    }
    for name in names {
        let status = if table.models.contains_key(&name) { ServingStatus::Serving } else { ServingStatus::NotServing };
        reporter.set_service_status(&name, status).await;
    }
}

async fn watch_health(reporter: HealthReporter, repository: Repository, mut stop: watch::Receiver<bool>) {
    let mut last: Option<Arc<crate::repository::ServingTable>> = None;
    loop {
        let table = repository.table();
        if last.as_ref().is_none_or(|l| !Arc::ptr_eq(l, &table)) {
            update_health(&reporter, &repository).await;
            last = Some(table);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.changed() => return,
        }
    }
}
