//! Alert rules over the scores stream, Kafka-natively (no KSQL cluster to run): per
//! device, tumbling or hopping windows on the readings' event time with allowed
//! lateness, conditions on counts and score aggregates, one alert per rule and window on
//! the alerts topic. Window state lives in a compacted changelog topic, so a restarted or
//! rebalanced instance carries on where the last owner left off, and a replayed input
//! gives the same alerts with the same ids.
//!
//! - `config`: rules and settings (file, `ALERTS_*` environment, flags);
//! - `engine`: the windows and rules of one partition, without Kafka;
//! - `service`: the consumer group, restoring from and writing to the changelog, commits;
//! - `error`: why the service stops, and why a scores record is dead-lettered.

#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod service;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use admin::Shutdown;
use tokio::net::TcpListener;

use crate::config::{AlertsConfig, ServiceConfig as _};
pub use crate::error::AlertsError;

pub struct Listeners {
    pub admin: Option<TcpListener>,
}

/// Runs the service until `shutdown` resolves, then writes what is pending, commits and
/// returns. An error (a write Kafka refused, a changelog that cannot be read) stops it
/// without committing more: a restart redoes the rest.
pub async fn run(config: AlertsConfig, listeners: Listeners, shutdown: impl Shutdown) -> Result<(), AlertsError> {
    config.check()?;
    let registry = prometheus::Registry::new();
    let metrics = metrics::Metrics::new(&registry)?;
    let readiness = admin::Readiness::new();
    let admin_endpoint = admin::AdminEndpoint::start(listeners.admin, registry, readiness.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopping.store(true, Ordering::Relaxed);
    });
    tracing::info!(rules = config.rules.len(), scores = %config.scores_topic, alerts = %config.alerts_topic, "starting");
    let result = tokio::task::spawn_blocking(move || service::run_loop(config, metrics, readiness, stop)).await?;
    admin_endpoint.stop().await;
    result
}
