//! Every Prometheus metric the model server exports, declared in one place.
//!
//! Request metrics carry `model`, `version` and `signature` labels so a canary analysis
//! can compare two versions of one model over the same window, and `api` so gRPC, REST
//! and KServe traffic can be told apart. Label values are only ever names the server itself
//! resolved (a configured model, a loaded version, a signature the model defines) or fixed
//! strings: a name a client sent that resolves to nothing counts under an empty label, so no
//! request can add a series.

use std::time::Duration;

use admin::metrics::MetricsRegistrar;
use prometheus::{Encoder, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Registry, TextEncoder};

/// Which front door a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    GrpcPredict,
    GrpcMetadata,
    RestPredict,
    KserveInfer,
}

impl Api {
    fn label(self) -> &'static str {
        match self {
            Api::GrpcPredict => "grpc_predict",
            Api::GrpcMetadata => "grpc_metadata",
            Api::RestPredict => "rest_predict",
            Api::KserveInfer => "kserve_infer",
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
}

/// The per-signature instruments the scheduler updates on its hot path.
#[derive(Debug, Clone)]
pub struct SignatureMetrics {
    pub batch_size: prometheus::Histogram,
    pub queue_depth: IntGauge,
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
            registry: registry.clone(),
        };
        // process_start_time_seconds among them (the server declared its own before).
        admin::register_process_metrics(&registry);
        Ok(declared)
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
