//! Declaring a service's metrics: each one is made and registered in a single call, so no
//! metric can be declared and then left out of `/metrics`, and a service's metrics module
//! is a list of names, help texts and labels rather than constructor plumbing.

use prometheus::core::Collector;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Makes metrics and registers them with one registry.
#[derive(Debug, Clone, Copy)]
pub struct MetricsRegistrar<'a> {
    registry: &'a Registry,
}

impl<'a> MetricsRegistrar<'a> {
    pub fn new(registry: &'a Registry) -> Self {
        Self { registry }
    }

    pub fn counter(&self, name: &str, help: &str) -> prometheus::Result<IntCounter> {
        self.register(IntCounter::new(name, help)?)
    }

    pub fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
        self.register(IntCounterVec::new(Opts::new(name, help), labels)?)
    }

    pub fn gauge(&self, name: &str, help: &str) -> prometheus::Result<IntGauge> {
        self.register(IntGauge::new(name, help)?)
    }

    pub fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
        self.register(IntGaugeVec::new(Opts::new(name, help), labels)?)
    }

    /// A gauge of fractional values (a percentage, say).
    pub fn float_gauge(&self, name: &str, help: &str) -> prometheus::Result<Gauge> {
        self.register(Gauge::new(name, help)?)
    }

    pub fn float_gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<GaugeVec> {
        self.register(GaugeVec::new(Opts::new(name, help), labels)?)
    }

    pub fn histogram(&self, name: &str, help: &str, buckets: Vec<f64>) -> prometheus::Result<Histogram> {
        self.register(Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?)
    }

    pub fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        buckets: Vec<f64>,
        labels: &[&str],
    ) -> prometheus::Result<HistogramVec> {
        self.register(HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?)
    }

    fn register<C: Collector + Clone + 'static>(&self, collector: C) -> prometheus::Result<C> {
        self.registry.register(Box::new(collector.clone()))?;
        Ok(collector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_made_is_exported_and_a_name_is_taken_once() {
        let registry = Registry::new();
        let metrics = MetricsRegistrar::new(&registry);
        metrics.counter("a_total", "A").unwrap().inc();
        metrics.counter_vec("b_total", "B", &["kind"]).unwrap().with_label_values(&["x"]).inc_by(2);
        metrics.histogram("c_seconds", "C", vec![0.1, 1.0]).unwrap().observe(0.5);
        let names: Vec<String> = registry.gather().iter().map(|family| family.name().to_owned()).collect();
        assert_eq!(names, ["a_total", "b_total", "c_seconds"]);
        assert!(metrics.gauge("a_total", "again").is_err(), "a second metric of one name is refused");
    }
}
