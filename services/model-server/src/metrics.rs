//! Every Prometheus metric the model server exports, declared in one place.
//!
//! Request metrics carry `model`, `version` and `signature` labels so a canary analysis
//! can compare two versions of one model over the same window, and `api` so gRPC, REST
//! and KServe traffic can be told apart. Label values are only ever names the server itself
//! resolved (a configured model, a loaded version, a signature the model defines) or fixed
//! strings: a name a client sent that resolves to nothing counts under an empty label, so no
//! request can add a series.
//!
//! TensorFlow Serving's own names are exported beside Vigil's, for the figures that mean
//! the same ([`TfServingMetrics`]), so dashboards and alerts written for TF Serving work
//! unchanged. docs/observability.md has the table.

use std::time::Duration;

use admin::metrics::MetricsRegistrar;
use prometheus::{Encoder, Histogram, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Registry, TextEncoder};

/// Which front door a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    GrpcPredict,
    GrpcMetadata,
    RestPredict,
    KserveInfer,
    KserveRestInfer,
}

impl Api {
    /// TF Serving's `API` and `entrypoint` labels for the inference calls it also has
    /// (KServe's is named as its RPC is); `None` for calls TF Serving does not count.
    fn tf_serving_labels(self) -> Option<(&'static str, &'static str)> {
        match self {
            Api::GrpcPredict => Some(("Predict", "GRPC")),
            // TF Serving labels REST calls with the URL's verb, lower case.
            Api::RestPredict => Some(("predict", "REST")),
            Api::KserveInfer => Some(("ModelInfer", "GRPC")),
            Api::KserveRestInfer => Some(("ModelInfer", "REST")),
            Api::GrpcMetadata => None,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Api::GrpcPredict => "grpc_predict",
            Api::GrpcMetadata => "grpc_metadata",
            Api::RestPredict => "rest_predict",
            Api::KserveInfer => "kserve_infer",
            Api::KserveRestInfer => "kserve_rest_infer",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    errors: IntCounterVec,
    latency: HistogramVec,
    batch_size: HistogramVec,
    queue_depth: IntGaugeVec,
    load_failures: IntCounterVec,
    versions_available: IntGaugeVec,
    output_scores: HistogramVec,
    output_anomalies: IntCounterVec,
    shadow_rows: IntCounterVec,
    shadow_skipped: IntCounterVec,
    rollout_weight: prometheus::GaugeVec,
    rollout_phase: IntGaugeVec,
    rollout_decisions: IntCounterVec,
    requests_shed: IntCounterVec,
    tf_serving: TfServingMetrics,
}

/// TensorFlow Serving's metrics, with its names, labels, units (microseconds) and buckets.
/// Its model label is `model_name`, holding the same resolved names as Vigil's `model`.
#[derive(Debug, Clone)]
struct TfServingMetrics {
    /// `status`: the request's TF error code name (`OK`, `INVALID_ARGUMENT`, ...).
    request_count: IntCounterVec,
    /// Successful requests only, as TF Serving records them.
    request_latency: HistogramVec,
    /// `status`: `success` or `fail`, by version directory (`model_path`).
    load_attempts: IntCounterVec,
    /// Cumulative microseconds spent loading, by version directory: a counter in TF too.
    load_latency: IntCounterVec,
    batching: TfBatchingMetrics,
}

/// TF Serving's `batching_session` figures: process-wide, recorded in batched mode only.
#[derive(Debug, Clone)]
pub struct TfBatchingMetrics {
    queuing_latency: Histogram,
    input_batch_size: Histogram,
    processed_batch_size: Histogram,
    /// By `execution_batch_size`, one of the configured `allowed_batch_sizes`.
    padding_size: HistogramVec,
}

/// The per-signature instruments the scheduler updates on its hot path.
#[derive(Debug, Clone)]
pub struct SignatureMetrics {
    pub(crate) batch_size: Histogram,
    pub queue_depth: IntGauge,
    tf_batching: TfBatchingMetrics,
}

impl SignatureMetrics {
    /// Records one engine run of `rows` request rows, padded to `padded`; `batched` adds
    /// TF Serving's batching figures.
    pub fn observe_run(&self, rows: usize, padded: usize, batched: bool) {
        self.batch_size.observe(padded as f64);
        if batched {
            let tf = &self.tf_batching;
            tf.input_batch_size.observe(rows as f64);
            tf.processed_batch_size.observe(padded as f64);
            if padded > rows {
                tf.padding_size.with_label_values(&[padded.to_string().as_str()]).observe((padded - rows) as f64);
            }
        }
    }

    /// Records how long a request waited in the batching queue for its run.
    pub fn observe_queued(&self, waited: Duration) {
        self.tf_batching.queuing_latency.observe(micros(waited));
    }
}

fn micros(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1e6
}

/// TensorFlow's name for a gRPC status code, as TF Serving's `status` labels use it.
fn tf_status(code: Option<tonic::Code>) -> &'static str {
    code.map_or("OK", proto::status_code_name)
}

impl Metrics {
    pub fn new() -> Self {
        Self::declare().expect("the model server's metric definitions are valid and their names unique")
    }

    fn declare() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let metrics = MetricsRegistrar::new(&registry);
        let labels = &["api", "model", "version", "signature"];
        let declared = Self {
            requests: metrics.counter_vec(
                "model_server_requests_total",
                "Inference and metadata requests, by API, model, version and signature",
                labels,
            )?,
            errors: metrics.counter_vec(
                "model_server_request_errors_total",
                "Failed requests, by API, model, version, signature and gRPC code",
                &["api", "model", "version", "signature", "code"],
            )?,
            latency: metrics.histogram_vec(
                "model_server_request_duration_seconds",
                "Time from request decoded to response built",
                prometheus::exponential_buckets(25e-6, 2.0, 18)?,
                labels,
            )?,
            batch_size: metrics.histogram_vec(
                "model_server_batch_size",
                "Rows per engine run (after padding)",
                prometheus::exponential_buckets(1.0, 2.0, 12)?,
                &["model", "version", "signature"],
            )?,
            queue_depth: metrics.gauge_vec(
                "model_server_queue_depth",
                "Requests queued for an engine run",
                &["model", "version", "signature"],
            )?,
            load_failures: metrics.counter_vec(
                "model_server_load_failures_total",
                "Model versions that failed to load",
                &["model"],
            )?,
            versions_available: metrics.gauge_vec(
                "model_server_version_available",
                "1 while a model version is AVAILABLE",
                &["model", "version"],
            )?,
            // What a version answers, for judging a canary by its outputs: every row's
            // anomaly score, and the rows over their threshold. Scores of this workspace's
            // models run from ~0.3 (healthy) to ~1e5 (a flat tyre), hence the wide buckets.
            output_scores: metrics.histogram_vec(
                "model_server_output_scores",
                "Each answered row's anomaly score (signatures with an `anomaly_score` output)",
                prometheus::exponential_buckets(0.05, 2.0, 22)?,
                &["model", "version"],
            )?,
            output_anomalies: metrics.counter_vec(
                "model_server_output_anomalies_total",
                "Answered rows whose anomaly score exceeds their `threshold` output",
                &["model", "version"],
            )?,
            // Canary rollouts: rows the canary scored in shadow and whether it flagged them
            // as stable did; each rollout's weight and phase; the analysis decisions.
            shadow_rows: metrics.counter_vec(
                "model_server_shadow_rows_total",
                "Rows a canary scored in shadow, by whether its flag agreed with the stable answer's",
                &["model", "version", "agreement"],
            )?,
            shadow_skipped: metrics.counter_vec(
                "model_server_shadow_skipped_total",
                "Requests picked for shadowing that were not (too many shadow runs in flight, or the canary's queue full)",
                &["model", "version"],
            )?,
            rollout_weight: metrics.float_gauge_vec(
                "model_server_rollout_canary_weight_percent",
                "The canary's share of unpinned requests",
                &["model"],
            )?,
            rollout_phase: metrics.gauge_vec(
                "model_server_rollout_phase",
                "1 for the phase each model's rollout is in",
                &["model", "phase"],
            )?,
            rollout_decisions: metrics.counter_vec(
                "model_server_rollout_decisions_total",
                "Canary analysis decisions made by this replica",
                &["model", "decision"],
            )?,
            // Label: "grpc" or "rest" only (never anything a client sent).
            requests_shed: metrics.counter_vec(
                "model_server_requests_shed_total",
                "Requests refused at once because the server had --max_in_flight_requests in flight",
                &["api"],
            )?,
            tf_serving: Self::declare_tf_serving(&metrics)?,
            registry: registry.clone(),
        };
        // process_start_time_seconds among them (the server declared its own before).
        admin::register_process_metrics(&registry);
        Ok(declared)
    }

    /// TF Serving's names, help texts and buckets (`ExponentialBuckets` in its source: the
    /// first limit, the growth, the count).
    fn declare_tf_serving(metrics: &MetricsRegistrar<'_>) -> prometheus::Result<TfServingMetrics> {
        let latency_buckets = || prometheus::exponential_buckets(10.0, 1.8, 33);
        let batch_buckets = || prometheus::exponential_buckets(1.0, 2.0, 14);
        let queuing_latency = metrics.histogram_vec(
            ":tensorflow:serving:batching_session:queuing_latency",
            "Microseconds requests waited in the batching queue (TF Serving's name)",
            prometheus::exponential_buckets(100.0, 1.2, 52)?,
            &["thread_pool_name"],
        )?;
        Ok(TfServingMetrics {
            request_count: metrics.counter_vec(
                ":tensorflow:serving:request_count",
                "Inference requests, by model and TF status code (TF Serving's name)",
                &["model_name", "status"],
            )?,
            request_latency: metrics.histogram_vec(
                ":tensorflow:serving:request_latency",
                "Microseconds from request decoded to response built, successful requests (TF Serving's name)",
                latency_buckets()?,
                &["model_name", "API", "entrypoint"],
            )?,
            load_attempts: metrics.counter_vec(
                ":tensorflow:cc:saved_model:load_attempt_count",
                "SavedModel version loads attempted, by version directory and outcome (TensorFlow's name)",
                &["model_path", "status"],
            )?,
            load_latency: metrics.counter_vec(
                ":tensorflow:cc:saved_model:load_latency",
                "Microseconds spent loading, summed over attempts, by version directory (TensorFlow's name)",
                &["model_path"],
            )?,
            batching: TfBatchingMetrics {
                // TF Serving's model server names no thread pool.
                queuing_latency: queuing_latency.with_label_values(&[""]),
                input_batch_size: metrics.histogram(
                    ":tensorflow:serving:batching_session:input_batch_size",
                    "Request rows per engine run, before padding (TF Serving's name)",
                    batch_buckets()?,
                )?,
                processed_batch_size: metrics.histogram(
                    ":tensorflow:serving:batching_session:processed_batch_size",
                    "Rows per engine run, after padding (TF Serving's name)",
                    batch_buckets()?,
                )?,
                padding_size: metrics.histogram_vec(
                    ":tensorflow:serving:batching_session:padding_size",
                    "Padding rows per padded engine run, by padded size (TF Serving's name)",
                    batch_buckets()?,
                    &["execution_batch_size"],
                )?,
            },
        })
    }

    /// Records one attempt to load the version in `dir`, for TF Serving's load metrics.
    pub fn observe_load(&self, dir: &std::path::Path, loaded: bool, elapsed: Duration) {
        let path = dir.display().to_string();
        let status = if loaded { "success" } else { "fail" };
        self.tf_serving.load_attempts.with_label_values(&[path.as_str(), status]).inc();
        self.tf_serving.load_latency.with_label_values(&[path.as_str()]).inc_by(elapsed.as_micros() as u64);
    }

    /// Counts a request refused for want of an in-flight permit (`api`: "grpc" or "rest").
    pub fn request_shed(&self, api: &'static str) {
        self.requests_shed.with_label_values(&[api]).inc();
    }

    pub fn signature(&self, model: &str, version: i64, signature: &str) -> SignatureMetrics {
        let version = version.to_string();
        let labels = [model, version.as_str(), signature];
        SignatureMetrics {
            batch_size: self.batch_size.with_label_values(&labels),
            queue_depth: self.queue_depth.with_label_values(&labels),
            tf_batching: self.tf_serving.batching.clone(),
        }
    }

    /// Records one finished request from the model version it resolved to (`target`: model,
    /// version, signature), when it started and how it ended.
    pub fn observe_result<T>(
        &self,
        api: Api,
        target: Option<&(String, i64, String)>,
        started: std::time::Instant,
        result: &Result<T, crate::error::ServeError>,
    ) {
        let target = target.map(|(model, version, signature)| (model.as_str(), *version, signature.as_str()));
        let code = result.as_ref().err().map(crate::error::ServeError::code);
        self.observe_request(api, target, started.elapsed(), code);
    }

    /// Records one finished request; `code` is `None` on success.
    pub fn observe_request(
        &self,
        api: Api,
        target: Option<(&str, i64, &str)>,
        elapsed: Duration,
        code: Option<tonic::Code>,
    ) {
        let (model, version, signature) = match target {
            Some((model, version, signature)) => (model, version.to_string(), signature),
            None => ("", String::new(), ""),
        };
        let labels = [api.label(), model, version.as_str(), signature];
        self.requests.with_label_values(&labels).inc();
        self.latency.with_label_values(&labels).observe(elapsed.as_secs_f64());
        if let Some(code) = code {
            let code = format!("{code:?}");
            self.errors.with_label_values(&[api.label(), model, version.as_str(), signature, code.as_str()]).inc();
        }
        if let Some((tf_api, entrypoint)) = api.tf_serving_labels() {
            self.tf_serving.request_count.with_label_values(&[model, tf_status(code)]).inc();
            if code.is_none() {
                self.tf_serving
                    .request_latency
                    .with_label_values(&[model, tf_api, entrypoint])
                    .observe(micros(elapsed));
            }
        }
    }

    /// Records the anomaly scores a version answered with, and how many rows exceeded
    /// their threshold (when the signature also outputs one per row).
    pub fn observe_scores(&self, model: &str, version: i64, scores: &[f32], thresholds: Option<&[f32]>) {
        let version = version.to_string();
        let labels = [model, version.as_str()];
        let histogram = self.output_scores.with_label_values(&labels);
        for &score in scores {
            histogram.observe(f64::from(score));
        }
        if let Some(thresholds) = thresholds.filter(|t| t.len() == scores.len()) {
            let over = scores.iter().zip(thresholds).filter(|(score, threshold)| score > threshold).count();
            self.output_anomalies.with_label_values(&labels).inc_by(over as u64);
        }
    }

    /// Counts a shadow run's rows by whether the canary flagged each as stable did.
    pub fn observe_shadow(&self, model: &str, canary: i64, agreed: u64, disagreed: u64) {
        let version = canary.to_string();
        self.shadow_rows.with_label_values(&[model, version.as_str(), "agree"]).inc_by(agreed);
        self.shadow_rows.with_label_values(&[model, version.as_str(), "disagree"]).inc_by(disagreed);
    }

    pub fn shadow_skipped(&self, model: &str, canary: i64) {
        self.shadow_skipped.with_label_values(&[model, canary.to_string().as_str()]).inc();
    }

    pub fn set_rollout(&self, model: &str, phase: &str, canary_weight_percent: f64) {
        self.rollout_weight.with_label_values(&[model]).set(canary_weight_percent);
        for name in ["progressing", "manual", "promoted", "rolled_back", "aborted"] {
            self.rollout_phase.with_label_values(&[model, name]).set(i64::from(name == phase));
        }
    }

    pub fn rollout_decision(&self, model: &str, decision: &str) {
        self.rollout_decisions.with_label_values(&[model, decision]).inc();
    }

    pub fn load_failed(&self, model: &str) {
        self.load_failures.with_label_values(&[model]).inc();
    }

    pub fn set_available(&self, model: &str, version: i64, available: bool) {
        let version = version.to_string();
        if available {
            self.versions_available.with_label_values(&[model, version.as_str()]).set(1);
        } else {
            let _ = self.versions_available.remove_label_values(&[model, version.as_str()]);
        }
    }

    /// Drops the per-signature series of an unloaded version.
    pub fn forget_signature(&self, model: &str, version: i64, signature: &str) {
        let version = version.to_string();
        let labels = [model, version.as_str(), signature];
        let _ = self.queue_depth.remove_label_values(&labels);
        let _ = self.batch_size.remove_label_values(&labels);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer).expect("text encoding never fails");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
