//! The live terminal view of `vigil up`: a progress line each second (published,
//! ingested, scored, rate, end-to-end latency, anomalies) and each anomaly as it is
//! detected, with its device, score and the model version that flagged it, and each
//! alert as a rule fires it, with its window and figures. Plain lines
//! (no cursor tricks), so it reads the same in a terminal, a log or CI.

use std::time::Instant;

use device_simulator::metrics::PublishMetrics;

use crate::observe::Observer;

pub struct LiveView {
    enabled: bool,
    last_scored: u64,
    last_tick: Option<Instant>,
    /// Latency samples already reported (each line shows the newer ones).
    latency_from: usize,
}

impl LiveView {
    pub fn new(enabled: bool) -> Self {
        Self { enabled, last_scored: 0, last_tick: None, latency_from: 0 }
    }

    pub fn tick(&mut self, started: Instant, publishing: &PublishMetrics, observer: &Observer) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let mut state = observer.state();
        for anomaly in std::mem::take(&mut state.unshown) {
            let truth = match sensor::fault_name(anomaly.fault).as_str() {
                "none" => "a false alarm: this reading was healthy".to_owned(),
                fault => format!("injected fault: {fault}"),
            };
            println!(
                "  ANOMALY  {:<10} score {:>8.2} > {:.2}  {} v{}  ({truth})",
                anomaly.device_id, anomaly.score, anomaly.threshold, anomaly.model, anomaly.version
            );
        }
        for alert in std::mem::take(&mut state.unshown_alerts) {
            let versions: Vec<String> = alert.model_versions.iter().map(|v| format!("v{v}")).collect();
            println!(
                "  ALERT    {:<10} {} {}-{}: {} anomalies in {} readings, mean score {:.2}, max {:.2} ({}; {})",
                alert.device_id,
                alert.rule,
                clock(alert.window_start.as_ref()),
                clock(alert.window_end.as_ref()),
                alert.anomalies,
                alert.readings,
                alert.mean_score,
                alert.max_score,
                alert.condition,
                versions.join(", ")
            );
        }
        let seconds = self.last_tick.map_or(1.0, |t| now.duration_since(t).as_secs_f64().max(1e-3));
        let rate = (state.scored - self.last_scored) as f64 / seconds;
        let latency =
            match (state.latency_percentile(self.latency_from, 0.5), state.latency_percentile(self.latency_from, 0.99))
            {
                (Some(p50), Some(p99)) => format!("latency p50 {p50:.0} ms p99 {p99:.0} ms"),
                _ => "latency -".to_owned(),
            };
        println!(
            "[{:>4} s] published {:>7} | ingested {:>7} | scored {:>7} ({:>5.0}/s, {latency}) | anomalies {:>6} on {} cars | alerts {}",
            started.elapsed().as_secs(),
            published(publishing),
            state.readings,
            state.scored,
            rate,
            state.anomalies,
            state.anomalous_devices.len(),
            state.alerts.len()
        );
        self.last_scored = state.scored;
        self.latency_from = state.latencies_ms.len();
        self.last_tick = Some(now);
    }
}

/// Readings the simulator handed to its MQTT client, over every label it uses.
pub fn published(metrics: &PublishMetrics) -> u64 {
    let labels = std::iter::once(sensor::FaultKind::None).chain(device_simulator::fleet::FAULT_KINDS);
    labels.map(|kind| metrics.published.with_label_values(&[sensor::fault_name(kind).as_str()]).get()).sum()
}

/// A window edge as the time of day (UTC), the way the live view shows it.
fn clock(timestamp: Option<&prost_types::Timestamp>) -> String {
    timestamp
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .map_or_else(|| "?".to_owned(), |time| time.format("%H:%M:%S").to_string())
}
