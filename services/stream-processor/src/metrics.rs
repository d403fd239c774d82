//! Every Prometheus metric the stream processor exports, declared in one place.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

#[derive(Debug, Clone)]
pub struct Metrics {
    /// Readings taken from the readings topic.
    pub consumed: IntCounter,
    /// Score records Kafka confirmed, by model version.
    pub scored: IntCounterVec,
    /// Anomaly records Kafka confirmed, by model version.
    pub anomalies: IntCounterVec,
    /// Dead letters Kafka confirmed, by reason.
    pub dead_lettered: IntCounterVec,
    /// Readings being scored or written (all partitions).
    pub in_flight: IntGauge,
    pub assigned_partitions: IntGauge,
    /// Partitions not being read because their in-flight bound is full.
    pub paused_partitions: IntGauge,
    pub rebalances: IntCounterVec,
    /// Messages in a partition after the last stored offset, from librdkafka's statistics.
    pub consumer_lag: IntGaugeVec,
    /// Predict call duration (retries included), by the version that answered.
    pub model_latency: HistogramVec,
    /// Failed Predict calls, by gRPC code.
    pub model_errors: IntCounterVec,
    /// Attempts retried inside a call (under the retry budget).
    pub model_retries: IntCounter,
    /// Readings tried again after a backoff because the model server could not score them.
    pub model_backoffs: IntCounter,
    pub model_replicas: IntGauge,
    /// From the reading's Kafka timestamp to Kafka confirming its outputs.
    pub event_latency: Histogram,
    pub produce_retries: IntCounter,
    /// Exactly-once mode: transactions committed or failed.
    pub transactions: IntCounterVec,
    /// Replays run through the gRPC API, by outcome (`passed`, `failed`, `error`).
    pub replays: IntCounterVec,
    /// Readings replays took from the readings topic, by result (`replayed`, `failed`,
    /// `skipped`). A replay's Predict calls are not in the `model_*` metrics, which
    /// describe live scoring.
    pub replay_readings: IntCounterVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let latency_buckets = vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0];
        let metrics = Self {
            consumed: IntCounter::new("processor_readings_consumed_total", "Readings taken from the readings topic")?,
            scored: IntCounterVec::new(
                Opts::new("processor_scores_total", "Score records Kafka confirmed, by model version"),
                &["model_version"],
            )?,
            anomalies: IntCounterVec::new(
                Opts::new("processor_anomalies_total", "Anomaly records Kafka confirmed, by model version"),
                &["model_version"],
            )?,
            dead_lettered: IntCounterVec::new(
                Opts::new("processor_dead_lettered_total", "Readings written to the dead-letter topic, by reason"),
                &["reason"],
            )?,
            in_flight: IntGauge::new("processor_in_flight", "Readings being scored or written")?,
            assigned_partitions: IntGauge::new("processor_assigned_partitions", "Partitions this processor owns")?,
            paused_partitions: IntGauge::new(
                "processor_paused_partitions",
                "Partitions not being read because their in-flight bound is full",
            )?,
            rebalances: IntCounterVec::new(
                Opts::new("processor_rebalances_total", "Consumer group rebalances, by kind"),
                &["kind"],
            )?,
            consumer_lag: IntGaugeVec::new(
                Opts::new(
                    "processor_consumer_lag",
                    "Messages in a partition after the last offset whose outputs are safe",
                ),
                &["topic", "partition"],
            )?,
            model_latency: HistogramVec::new(
                HistogramOpts::new("processor_model_latency_seconds", "Predict call duration, retries included")
                    .buckets(latency_buckets.clone()),
                &["model_version"],
            )?,
            model_errors: IntCounterVec::new(
                Opts::new("processor_model_errors_total", "Failed Predict calls, by gRPC code"),
                &["code"],
            )?,
            model_retries: IntCounter::new(
                "processor_model_retries_total",
                "Predict attempts retried inside a call, under the retry budget",
            )?,
            model_backoffs: IntCounter::new(
                "processor_model_backoffs_total",
                "Readings tried again after a backoff because the model server could not score them",
            )?,
            model_replicas: IntGauge::new("processor_model_replicas", "Model server replicas discovered")?,
            event_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "processor_event_latency_seconds",
                    "From the reading's Kafka timestamp to Kafka confirming its outputs",
                )
                .buckets(latency_buckets),
            )?,
            produce_retries: IntCounter::new("processor_produce_retries_total", "Sends retried after a Kafka error")?,
            transactions: IntCounterVec::new(
                Opts::new("processor_transactions_total", "Exactly-once mode: Kafka transactions, by outcome"),
                &["outcome"],
            )?,
            replays: IntCounterVec::new(
                Opts::new("processor_replays_total", "Replays through a candidate model version, by outcome"),
                &["outcome"],
            )?,
            replay_readings: IntCounterVec::new(
                Opts::new("processor_replay_readings_total", "Readings replays re-scored, failed or skipped"),
                &["result"],
            )?,
        };
        registry.register(Box::new(metrics.consumed.clone()))?;
        registry.register(Box::new(metrics.scored.clone()))?;
        registry.register(Box::new(metrics.anomalies.clone()))?;
        registry.register(Box::new(metrics.dead_lettered.clone()))?;
        registry.register(Box::new(metrics.in_flight.clone()))?;
        registry.register(Box::new(metrics.assigned_partitions.clone()))?;
        registry.register(Box::new(metrics.paused_partitions.clone()))?;
        registry.register(Box::new(metrics.rebalances.clone()))?;
        registry.register(Box::new(metrics.consumer_lag.clone()))?;
        registry.register(Box::new(metrics.model_latency.clone()))?;
        registry.register(Box::new(metrics.model_errors.clone()))?;
        registry.register(Box::new(metrics.model_retries.clone()))?;
        registry.register(Box::new(metrics.model_backoffs.clone()))?;
        registry.register(Box::new(metrics.model_replicas.clone()))?;
        registry.register(Box::new(metrics.event_latency.clone()))?;
        registry.register(Box::new(metrics.produce_retries.clone()))?;
        registry.register(Box::new(metrics.transactions.clone()))?;
        registry.register(Box::new(metrics.replays.clone()))?;
        registry.register(Box::new(metrics.replay_readings.clone()))?;
        Ok(metrics)
    }
}
