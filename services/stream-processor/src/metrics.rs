//! Every Prometheus metric the stream processor exports, declared in one place.

use admin::metrics::MetricsRegistrar;
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};

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
    /// Outputs Kafka refused for good even as dead letters without their payload, by
    /// refusal (`not_authorized`, ...): not written.
    pub outputs_dropped: IntCounterVec,
    /// Readings being scored or written (all partitions).
    pub in_flight: IntGauge,
    pub assigned_partitions: IntGauge,
    /// Partitions not being read because their in-flight bound is full.
    pub paused_partitions: IntGauge,
    /// Devices whose recent readings are kept for windowed models (all partitions).
    pub window_devices: IntGauge,
    /// Records read back to rebuild windows when partitions were assigned.
    pub window_rebuild_records: IntCounter,
    pub rebalances: IntCounterVec,
    /// Messages in a partition after the last stored offset, from librdkafka's statistics.
    pub consumer_lag: IntGaugeVec,
    /// Predict call duration (retries included), by the version that answered.
    pub model_latency: HistogramVec,
    /// Readings per Predict call (1 unless calls are batched).
    pub model_rows_per_call: Histogram,
    /// Failed Predict calls, by gRPC code.
    pub model_errors: IntCounterVec,
    /// Attempts retried inside a call (under the retry budget).
    pub model_retries: IntCounter,
    /// Readings tried again after a backoff because the model server could not score them.
    pub model_backoffs: IntCounter,
    pub model_replicas: IntGauge,
    /// From the reading's Kafka timestamp to Kafka confirming its outputs.
    pub event_latency: Histogram,
    /// Where that time goes, by stage ([`Stage`]).
    pub stage_latency: HistogramVec,
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

/// The stages of a scored reading's latency (`processor_stage_seconds{stage}`).
#[derive(Debug, Clone, Copy)]
pub enum Stage {
    /// From its Kafka timestamp until a partition worker took it: the producer's send, the
    /// broker, the consumer's fetch and waiting for room in the in-flight window.
    Fetch,
    /// Waiting for its Predict call to start (batched calls).
    CallWait,
    /// The Predict call, retries included.
    Call,
    /// From scored to its outputs confirmed by Kafka, in its partition's order.
    Produce,
}

impl Stage {
    pub fn label(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
            Stage::CallWait => "call_wait",
            Stage::Call => "call",
            Stage::Produce => "produce",
        }
    }
}

impl Metrics {
    /// Records `duration` for `stage`.
    pub fn stage(&self, stage: Stage, duration: std::time::Duration) {
        self.stage_latency.with_label_values(&[stage.label()]).observe(duration.as_secs_f64());
    }

    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let latency_buckets = vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0];
        let metrics = MetricsRegistrar::new(registry);
        Ok(Self {
            consumed: metrics.counter("processor_readings_consumed_total", "Readings taken from the readings topic")?,
            scored: metrics.counter_vec(
                "processor_scores_total",
                "Score records Kafka confirmed, by model version",
                &["model_version"],
            )?,
            anomalies: metrics.counter_vec(
                "processor_anomalies_total",
                "Anomaly records Kafka confirmed, by model version",
                &["model_version"],
            )?,
            dead_lettered: metrics.counter_vec(
                "processor_dead_lettered_total",
                "Readings written to the dead-letter topic, by reason",
                &["reason"],
            )?,
            outputs_dropped: metrics.counter_vec(
                "processor_outputs_dropped_total",
                "Outputs Kafka refused for good even as dead letters without their payload, by refusal",
                &["reason"],
            )?,
            in_flight: metrics.gauge("processor_in_flight", "Readings being scored or written")?,
            assigned_partitions: metrics.gauge("processor_assigned_partitions", "Partitions this processor owns")?,
            paused_partitions: metrics.gauge(
                "processor_paused_partitions",
                "Partitions not being read because their in-flight bound is full",
            )?,
            window_devices: metrics
                .gauge("processor_window_devices", "Devices whose recent readings are kept for a windowed model")?,
            window_rebuild_records: metrics.counter(
                "processor_window_rebuild_records_total",
                "Records read back to rebuild devices' windows after partitions were assigned",
            )?,
            rebalances: metrics.counter_vec(
                "processor_rebalances_total",
                "Consumer group rebalances, by kind",
                &["kind"],
            )?,
            consumer_lag: metrics.gauge_vec(
                "processor_consumer_lag",
                "Messages in a partition after the last offset whose outputs are safe",
                &["topic", "partition"],
            )?,
            model_latency: metrics.histogram_vec(
                "processor_model_latency_seconds",
                "Predict call duration, retries included",
                latency_buckets.clone(),
                &["model_version"],
            )?,
            model_rows_per_call: metrics.histogram(
                "processor_model_rows_per_call",
                "Readings scored per Predict call: batched calls take what queued while others were in flight",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0],
            )?,
            model_errors: metrics.counter_vec(
                "processor_model_errors_total",
                "Failed Predict calls, by gRPC code",
                &["code"],
            )?,
            model_retries: metrics.counter(
                "processor_model_retries_total",
                "Predict attempts retried inside a call, under the retry budget",
            )?,
            model_backoffs: metrics.counter(
                "processor_model_backoffs_total",
                "Readings tried again after a backoff because the model server could not score them",
            )?,
            model_replicas: metrics.gauge("processor_model_replicas", "Model server replicas discovered")?,
            event_latency: metrics.histogram(
                "processor_event_latency_seconds",
                "From the reading's Kafka timestamp to Kafka confirming its outputs",
                latency_buckets.clone(),
            )?,
            stage_latency: metrics.histogram_vec(
                "processor_stage_seconds",
                "A scored reading's time by stage: fetch (Kafka timestamp to a worker taking it), call_wait \
                 (waiting for its Predict call to start), call (the call), produce (scored to outputs confirmed, \
                 in partition order)",
                latency_buckets.clone(),
                &["stage"],
            )?,
            produce_retries: metrics.counter("processor_produce_retries_total", "Sends retried after a Kafka error")?,
            transactions: metrics.counter_vec(
                "processor_transactions_total",
                "Exactly-once mode: Kafka transactions, by outcome",
                &["outcome"],
            )?,
            replays: metrics.counter_vec(
                "processor_replays_total",
                "Replays through a candidate model version, by outcome",
                &["outcome"],
            )?,
            replay_readings: metrics.counter_vec(
                "processor_replay_readings_total",
                "Readings replays re-scored, failed or skipped",
                &["result"],
            )?,
        })
    }
}
