//! What a `vigil up` run did, reconciled: readings published, acknowledged, ingested,
//! scored, flagged, detection against the simulator's injected faults, and the alerts the
//! rules fired, per car against the cars that had a fault. Printed at the
//! end and, with `--summary-json`, written for scripts.

use std::time::Duration;

use device_simulator::publish::Report;
use serde::Serialize;

use crate::observe::{Confusion, Observed};
use crate::up::{AlertsOutcome, UpOptions};

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub seconds: f64,
    pub cars: usize,
    pub kafka: String,
    pub mqtt: String,
    /// How the processor scored: `batched`, `per-reading` or `embedded`.
    pub scoring: String,
    /// Readings the simulator sent, and those the broker acknowledged (ingest has the
    /// broker acknowledge only once Kafka has the reading).
    pub published: u64,
    pub acknowledged: u64,
    /// Records on the readings topic.
    pub ingested: u64,
    pub dead_lettered: u64,
    /// Distinct readings scored, and score records (repeats included).
    pub scored: u64,
    pub score_records: u64,
    pub anomalies: u64,
    pub anomalous_cars: usize,
    /// Readings the simulator labelled faulty (their fault had begun).
    pub faulty_readings: u64,
    pub confusion: Confusion,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    /// Recall per injected fault kind: the share of that fault's readings flagged.
    pub recall_by_fault: std::collections::BTreeMap<String, FaultRecall>,
    /// Detection judged per fault (cars caught, onset to first anomaly and alert) and
    /// false alarms per healthy car-hour ([`crate::detection`]).
    pub per_fault: crate::detection::PerFault,
    /// Scores by the model version that answered.
    pub scored_by_model_version: std::collections::BTreeMap<i64, u64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    /// Distinct alerts (by id), and alert records (repeats included).
    pub alerts: u64,
    pub alert_records: u64,
    pub alerts_by_rule: std::collections::BTreeMap<String, u64>,
    /// Cars with at least one alert; those of them with an injected fault under way
    /// during the run; and the cars whose fault was under way (alerted or not).
    pub alerted_cars: usize,
    pub alerted_faulty_cars: usize,
    pub faulty_cars: usize,
    /// Windows still open when the run ended (alerts fire when a window closes).
    pub alert_windows_open: u64,
    /// Readings that came after their window had closed, so no window counted them.
    pub alert_late_readings: u64,
    /// Score records the alerts service could not read.
    pub alerts_dead_lettered: u64,
    /// The alerts service read every score and every alert it fired was seen.
    pub alerts_settled: bool,
    /// Devices whose scores arrived out of order: (previous sequence, this one).
    pub out_of_order: std::collections::BTreeMap<String, (u64, u64)>,
    /// Every published reading was acknowledged, ingested and scored once.
    pub reconciled: bool,
    /// The pipeline finished scoring within the drain limit.
    pub drained: bool,
}

/// How one fault kind's readings fared.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecall {
    pub readings: u64,
    pub flagged: u64,
    pub recall: f64,
}

/// How the run ended.
#[derive(Debug, Clone, Copy)]
pub struct Ending {
    pub elapsed: Duration,
    /// The pipeline scored every reading within the drain limit.
    pub drained: bool,
    pub alerts: AlertsOutcome,
}

impl Summary {
    pub fn new(
        options: &UpOptions,
        report: &Report,
        observed: &Observed,
        ending: &Ending,
        kafka: &str,
        mqtt: &str,
    ) -> Self {
        let (confusion, alerts) = (observed.confusion, ending.alerts);
        let faulty = observed.faulty_devices();
        let alerted: std::collections::HashSet<&str> =
            observed.alerts.values().map(|alert| alert.device_id.as_str()).collect();
        let mut alerts_by_rule = std::collections::BTreeMap::new();
        for alert in observed.alerts.values() {
            *alerts_by_rule.entry(alert.rule.clone()).or_default() += 1;
        }
        Self {
            seconds: round1(ending.elapsed.as_secs_f64()),
            cars: options.cars,
            kafka: kafka.to_owned(),
            mqtt: mqtt.to_owned(),
            scoring: clap::ValueEnum::to_possible_value(&options.scoring)
                .map(|value| value.get_name().to_owned())
                .unwrap_or_default(),
            published: report.published,
            acknowledged: report.acknowledged,
            ingested: observed.readings,
            dead_lettered: observed.dead_letters,
            scored: observed.scored,
            score_records: observed.score_records,
            anomalies: observed.anomalies,
            anomalous_cars: observed.anomalous_devices.len(),
            faulty_readings: confusion.true_positives + confusion.false_negatives,
            confusion,
            precision: confusion.precision(),
            recall: confusion.recall(),
            recall_by_fault: observed
                .by_fault
                .iter()
                .map(|(fault, &(flagged, readings))| {
                    let recall = round_to(flagged as f64 / readings.max(1) as f64, 3);
                    (fault.clone(), FaultRecall { readings, flagged, recall })
                })
                .collect(),
            per_fault: crate::detection::judge(observed, options.interval),
            scored_by_model_version: observed.by_model_version.clone(),
            latency_p50_ms: observed.latency_percentile(0, 0.5).map(round1),
            latency_p99_ms: observed.latency_percentile(0, 0.99).map(round1),
            alerts: observed.alerts.len() as u64,
            alert_records: observed.alert_records,
            alerts_by_rule,
            alerted_cars: alerted.len(),
            alerted_faulty_cars: alerted.intersection(&faulty).count(),
            faulty_cars: faulty.len(),
            alert_windows_open: alerts.open_windows,
            alert_late_readings: alerts.late_readings,
            alerts_dead_lettered: observed.alert_dead_letters,
            alerts_settled: alerts.settled,
            out_of_order: observed.out_of_order.clone(),
            reconciled: report.published == report.acknowledged
                && report.acknowledged == observed.readings
                && observed.dead_letters == 0
                && observed.scored == observed.readings,
            drained: ending.drained,
        }
    }

    /// The summary as the terminal shows it.
    pub fn render(&self) -> String {
        let share = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |x| format!("{x:.3}"));
        let c = &self.confusion;
        let versions: Vec<String> = self.scored_by_model_version.iter().map(|(v, n)| format!("v{v}: {n}")).collect();
        let mut lines = vec![
            format!("Summary ({} s, {} cars)", self.seconds, self.cars),
            format!("  Kafka      {}", self.kafka),
            format!("  MQTT       {}", self.mqtt),
            format!("  scoring    {}", self.scoring),
            format!("  published  {:>8}  readings sent by the simulator", self.published),
            format!("  acked      {:>8}  acknowledged by the broker (after Kafka had them)", self.acknowledged),
            format!("  ingested   {:>8}  on the readings topic ({} dead-lettered)", self.ingested, self.dead_lettered),
            format!(
                "  scored     {:>8}  distinct readings scored ({} score records; {})",
                self.scored,
                self.score_records,
                versions.join(", ")
            ),
            format!("  anomalies  {:>8}  flagged, on {} cars", self.anomalies, self.anomalous_cars),
            format!("  faulty     {:>8}  readings with an injected fault under way", self.faulty_readings),
            format!(
                "  detection  precision {}  recall {}  ({} true, {} false alarms, {} missed)",
                share(self.precision),
                share(self.recall),
                c.true_positives,
                c.false_positives,
                c.false_negatives
            ),
        ];
        if !self.recall_by_fault.is_empty() {
            let by_fault: Vec<String> = self
                .recall_by_fault
                .iter()
                .map(|(fault, r)| format!("{fault} {:.2} of {}", r.recall, r.readings))
                .collect();
            lines.push(format!("  recall     by fault: {}", by_fault.join(", ")));
            lines.extend(self.per_fault.render());
        }
        let by_rule: Vec<String> = self.alerts_by_rule.iter().map(|(rule, n)| format!("{rule}: {n}")).collect();
        lines.push(format!(
            "  alerts     {:>8}  fired{} on {} cars: {} of the {} cars with an injected fault, {} without",
            self.alerts,
            if by_rule.is_empty() { String::new() } else { format!(" ({})", by_rule.join(", ")) },
            self.alerted_cars,
            self.alerted_faulty_cars,
            self.faulty_cars,
            self.alerted_cars - self.alerted_faulty_cars
        ));
        lines.push(format!(
            "             {:>8}  windows still open at the end (an alert fires when its window closes){}",
            self.alert_windows_open,
            [
                (self.alert_late_readings > 0)
                    .then(|| format!("; {} readings came after their window closed", self.alert_late_readings)),
                (self.alerts_dead_lettered > 0).then(|| format!(
                    "; {} score records the alerts service could not read",
                    self.alerts_dead_lettered
                )),
                (!self.alerts_settled)
                    .then(|| "; the alerts service DID NOT catch up with the scores in time".to_owned()),
            ]
            .into_iter()
            .flatten()
            .collect::<String>()
        ));
        lines.push(format!(
            "  latency    p50 {} ms, p99 {} ms  (reading on the readings topic to its score handed to Kafka)",
            self.latency_p50_ms.map_or_else(|| "-".to_owned(), |v| v.to_string()),
            self.latency_p99_ms.map_or_else(|| "-".to_owned(), |v| v.to_string())
        ));
        lines.push(if self.reconciled {
            "  counts reconcile: every published reading was acknowledged, ingested and scored".to_owned()
        } else if !self.drained {
            "  counts DO NOT reconcile: the pipeline did not finish scoring within the drain limit".to_owned()
        } else {
            "  counts DO NOT reconcile (see the figures above)".to_owned()
        });
        if !self.out_of_order.is_empty() {
            lines.push(format!("  ORDER VIOLATED for {} devices: {:?}", self.out_of_order.len(), self.out_of_order));
        }
        lines.join("\n")
    }
}

fn round1(x: f64) -> f64 {
    round_to(x, 1)
}

fn round_to(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}
