//! The operations endpoint every Vigil service serves beside its real work, for
//! Kubernetes probes and Prometheus: `/live` (the process answers), `/ready` (a latch the
//! service sets once it can do its job, and clears while it cannot or is draining) and
//! `/metrics` (the service's Prometheus registry in the text format, with the process's
//! own CPU, memory, threads and file descriptors: `process_*`, see [`register_process_metrics`]).
//!
//! The model server answers the same paths on its REST port ([`health_routes`] beside its
//! prediction routes); every other service takes a listener for this endpoint alone.

#![forbid(unsafe_code)]

pub mod body_limit;
pub mod layered_config;
pub mod metrics;
pub mod retry;
pub mod service;
pub mod token;

use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};

/// Whether the service can do its job now, and if not, why (the 503's body); starts not
/// ready. Clones share one latch.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<Mutex<Result<(), &'static str>>>);

impl Default for Readiness {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Err(NOT_READY))))
    }
}

const NOT_READY: &str = "not ready";

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&self, ready: bool) {
        self.put(if ready { Ok(()) } else { Err(NOT_READY) });
    }

    /// Not ready, for the reason `why` (e.g. "no partitions yet").
    pub fn set_waiting(&self, why: &'static str) {
        self.put(Err(why));
    }

    pub fn is_ready(&self) -> bool {
        self.state().is_ok()
    }

    /// `Ok` when ready, else why not.
    pub fn state(&self) -> Result<(), &'static str> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn put(&self, state: Result<(), &'static str>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }
}

/// What the probe and metrics routes ask of a service.
pub trait Health: Clone + Send + Sync + 'static {
    /// `Ok` when the service can do its job now; otherwise why not (the 503's body).
    fn readiness(&self) -> Result<(), String>;
    /// The service's metrics in the Prometheus text format.
    fn metrics_text(&self) -> Result<Vec<u8>, String>;
}

/// A service's own registry and readiness latch: the usual [`Health`].
#[derive(Clone)]
struct AdminState {
    registry: Registry,
    readiness: Readiness,
}

impl Health for AdminState {
    fn readiness(&self) -> Result<(), String> {
        self.readiness.state().map_err(str::to_owned)
    }

    fn metrics_text(&self) -> Result<Vec<u8>, String> {
        let mut body = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut body).map_err(|e| format!("encoding metrics: {e}"))?;
        Ok(body)
    }
}

/// Adds the process's CPU seconds, resident and virtual memory, threads, open and maximum
/// file descriptors and start time (`process_*`, read from /proc) to `registry`, once:
/// what a dashboard shows per service where no container metrics are scraped (Compose),
/// and the same figures the Go and Python clients export. Once per registry: a registry
/// that already has one of these names refuses them all (logged). Linux only.
pub fn register_process_metrics(registry: &Registry) {
    #[cfg(target_os = "linux")]
    if let Err(error) = registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self())) {
        tracing::warn!(%error, "not exporting the process metrics");
    }
}

/// The `/live`, `/ready` and `/metrics` routes over `registry` (with
/// [`register_process_metrics`]) and `readiness`.
pub fn router(registry: Registry, readiness: Readiness) -> Router {
    register_process_metrics(&registry);
    health_routes(AdminState { registry, readiness }, None)
}

/// `/live`, `/ready` and `/metrics` (and the metrics again at `extra_metrics_path`, e.g.
/// TF Serving's monitoring path) answered from `health`: for a service that serves them
/// beside other routes.
pub fn health_routes<H: Health>(health: H, extra_metrics_path: Option<&str>) -> Router {
    let mut router = Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready::<H>))
        .route("/metrics", get(metrics::<H>));
    if let Some(path) = extra_metrics_path.filter(|p| *p != "/metrics") {
        router = router.route(path, get(metrics::<H>));
    }
    router.with_state(health)
}

/// A service's signal to stop: a future that resolves when it should drain and return
/// (SIGTERM or SIGINT in a binary, a channel in a test). Any such future is one.
pub trait Shutdown: Future<Output = ()> + Send + 'static {}

impl<F: Future<Output = ()> + Send + 'static> Shutdown for F {}

/// Serves the endpoint on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    readiness: Readiness,
    shutdown: impl Shutdown,
) -> std::io::Result<()> {
    axum::serve(listener, router(registry, readiness)).with_graceful_shutdown(shutdown).await
}

/// The endpoint served on its own task, from [`AdminEndpoint::start`] until
/// [`AdminEndpoint::stop`] (or until it is dropped).
#[derive(Debug)]
pub struct AdminEndpoint {
    running: Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
}

impl AdminEndpoint {
    /// Serves `/live`, `/ready` and `/metrics` on `listener` (logging its address); with
    /// no listener, serves nothing.
    pub fn start(listener: Option<tokio::net::TcpListener>, registry: Registry, readiness: Readiness) -> Self {
        let Some(listener) = listener else { return Self { running: None } };
        if let Ok(address) = listener.local_addr() {
            tracing::info!(%address, "serving /live, /ready, /metrics");
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let stopped = async {
                let _ = stopped.await;
            };
            if let Err(error) = serve(listener, registry, readiness, stopped).await {
                tracing::error!(%error, "admin endpoint failed");
            }
        });
        Self { running: Some((stop, task)) }
    }

    /// Stops serving, letting requests under way finish.
    pub async fn stop(self) {
        if let Some((stop, task)) = self.running {
            let _ = stop.send(());
            let _ = task.await;
        }
    }
}

async fn ready<H: Health>(State(health): State<H>) -> impl IntoResponse {
    match health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn metrics<H: Health>(State(health): State<H>) -> impl IntoResponse {
    match health.metrics_text() {
        Ok(body) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response(),
    }
}

/// Resolves on the first Ctrl-C or SIGTERM (Kubernetes stops a pod with SIGTERM): the
/// signal every service starts its graceful shutdown on.
pub async fn termination_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// Resolves on the first termination signal, logging that the service drains; a second
/// signal exits the process at once (status 130) without draining.
pub async fn drain_signal() {
    termination_signal().await;
    tracing::info!("stopping: draining (a second signal exits at once)");
    tokio::spawn(async {
        termination_signal().await;
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(130);
    });
}

/// Logs to stderr, filtered by `RUST_LOG` (default: info), coloured on a terminal. Does
/// nothing when logging is already set up (`vigil` runs several services in one process).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// From a `/metrics` page (Prometheus text format): an unlabelled metric's value, or the
/// sum over a labelled one's series; 0 when absent. For tools and tests that read a
/// service's metrics over HTTP.
pub fn metric_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod metric_sum_tests {
    #[test]
    fn sums_a_metrics_series_and_ignores_longer_names() {
        let page = "# HELP x_total X\nx_total{kind=\"a\"} 2\nx_total{kind=\"b\"} 3.5\nx_total_bytes 100\ny 7\n";
        assert_eq!(super::metric_sum(page, "x_total"), 5.5);
        assert_eq!(super::metric_sum(page, "y"), 7.0);
        assert_eq!(super::metric_sum(page, "z"), 0.0);
    }
}

#[cfg(test)]
mod process_metrics_tests {
    #[test]
    fn the_registry_gets_the_process_metrics() {
        let registry = prometheus::Registry::new();
        super::register_process_metrics(&registry);
        let names: Vec<String> = registry.gather().iter().map(|f| f.name().to_owned()).collect();
        #[cfg(target_os = "linux")]
        for name in ["process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds_total"] {
            assert_eq!(names.iter().filter(|n| *n == name).count(), 1, "{name} in {names:?}");
        }
    }
}
