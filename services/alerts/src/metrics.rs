//! Every Prometheus metric the alerts service exports, declared in one place.

use admin::metrics::MetricsRegistrar;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};

#[derive(Debug, Clone)]
pub struct Metrics {
    /// Score records read.
    pub consumed: IntCounter,
    /// Score records skipped because the restored state already held them (redeliveries).
    pub skipped: IntCounter,
    /// Alerts Kafka confirmed, by rule.
    pub fired: IntCounterVec,
    /// Readings that came after their window had closed, by rule.
    pub late: IntCounterVec,
    /// Unreadable score records written to the dead-letter topic, by reason.
    pub dead_lettered: IntCounterVec,
    /// Windows open over every assigned partition.
    pub open_windows: IntGauge,
    pub assigned_partitions: IntGauge,
    pub rebalances: IntCounterVec,
    /// Changelog records read to restore state.
    pub restored_records: IntCounter,
    /// Devices evicted with their open windows because a partition held
    /// `max_devices_per_partition`.
    pub devices_evicted: IntCounter,
    /// Changelog records skipped on restore because they are not the service's own
    /// (another writer's, or corrupt).
    pub changelog_unreadable: IntCounter,
    /// Offset commits that failed (redone safely by the next owner).
    pub commit_failures: IntCounter,
}

impl Metrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = MetricsRegistrar::new(registry);
        Ok(Self {
            consumed: metrics.counter("alerts_scores_consumed_total", "Score records read")?,
            skipped: metrics.counter(
                "alerts_scores_skipped_total",
                "Score records skipped because the restored state already held them",
            )?,
            fired: metrics.counter_vec("alerts_fired_total", "Alerts Kafka confirmed, by rule", &["rule"])?,
            late: metrics.counter_vec(
                "alerts_late_readings_total",
                "Readings that came after their window closed, by rule",
                &["rule"],
            )?,
            dead_lettered: metrics.counter_vec(
                "alerts_dead_lettered_total",
                "Unreadable score records dead-lettered, by reason",
                &["reason"],
            )?,
            open_windows: metrics.gauge("alerts_open_windows", "Windows open over the assigned partitions")?,
            assigned_partitions: metrics.gauge("alerts_assigned_partitions", "Scores partitions this instance owns")?,
            rebalances: metrics.counter_vec("alerts_rebalances_total", "Rebalances, by kind", &["kind"])?,
            restored_records: metrics
                .counter("alerts_restored_records_total", "Changelog records read to restore window state")?,
            devices_evicted: metrics.counter(
                "alerts_devices_evicted_total",
                "Devices evicted with their open windows because a partition held max_devices_per_partition",
            )?,
            changelog_unreadable: metrics.counter(
                "alerts_changelog_unreadable_total",
                "Changelog records skipped on restore because they could not be read",
            )?,
            commit_failures: metrics.counter("alerts_commit_failures_total", "Offset commits that failed")?,
        })
    }
}
