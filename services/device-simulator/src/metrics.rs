//! The simulator's Prometheus metrics, declared in one place. As a load generator its
//! own figures are what a load test is read against: how much it offered, how much the
//! broker acknowledged, and whether its connections held.

use admin::metrics::MetricsRegistrar;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};

#[derive(Debug, Clone)]
pub struct PublishMetrics {
    /// Readings handed to the MQTT client, by ground-truth label.
    pub published: IntCounterVec,
    /// PUBACKs received from the broker.
    pub acknowledged: IntCounter,
    /// Readings the broker refused in its PUBACK (MQTT 5 reason codes: not authorized, quota).
    pub refused: IntCounter,
    /// Readings sent with a `traceparent` user property (the device's span).
    pub traced: IntCounter,
    /// Connection attempts or connections that failed (each one is retried after a backoff).
    pub connection_errors: IntCounter,
    /// MQTT connections currently up.
    pub connected: IntGauge,
    /// MQTT connections the fleet uses (cars / cars per connection, rounded up).
    pub connections: IntGauge,
}

impl PublishMetrics {
    /// Creates the metrics and registers them with `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = MetricsRegistrar::new(registry);
        Ok(Self {
            published: metrics.counter_vec(
                "simulator_readings_published_total",
                "Readings handed to the MQTT client, by label",
                &["label"],
            )?,
            acknowledged: metrics.counter(
                "simulator_readings_acknowledged_total",
                "Readings the MQTT broker acknowledged (QoS 1 PUBACK)",
            )?,
            refused: metrics.counter(
                "simulator_readings_refused_total",
                "Readings the broker refused in its PUBACK (an MQTT 5 reason code)",
            )?,
            traced: metrics.counter(
                "simulator_readings_traced_total",
                "Readings sent with a W3C traceparent user property: their traces start at the device",
            )?,
            connection_errors: metrics.counter(
                "simulator_connection_errors_total",
                "MQTT connections that failed or dropped; each is retried with backoff",
            )?,
            connected: metrics.gauge("simulator_connections_up", "MQTT connections currently up")?,
            connections: metrics.gauge("simulator_connections", "MQTT connections the fleet uses")?,
        })
    }

    /// Unregistered metrics, for callers that do not export them.
    pub fn unregistered() -> Self {
        Self::new(&Registry::new()).expect("metric definitions are valid")
    }

    /// Ready when every connection of the fleet is up.
    pub fn all_connected(&self) -> bool {
        let expected = self.connections.get();
        expected > 0 && self.connected.get() == expected
    }
}
