//! Detection judged per fault, as an operator asks it, beside the per-reading figures: for
//! each kind of injected fault, how many of the cars that had it were caught, how long
//! after the fault began the first anomaly and the first alert came, and how often cars
//! without any fault raised a false alarm per hour of driving.
//!
//! A car's onset is the event time of its first scored reading labelled with its fault.
//! The simulator can start a fault during its warm-up drive, before the first published
//! reading; that fault's onset is then the first reading. An alert counts at its window's
//! end, when its window can close at the earliest.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde::Serialize;

use crate::observe::Observed;

/// One fault kind, over the cars that had it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultDetection {
    /// Cars with a reading of this fault scored.
    pub cars: usize,
    /// Those with at least one of this fault's readings flagged.
    pub caught: usize,
    /// Seconds from onset to the first anomaly, over the caught cars.
    pub onset_to_anomaly_p50_s: Option<f64>,
    pub onset_to_anomaly_p90_s: Option<f64>,
    /// Seconds from onset to the end of the first alerted window, over the alerted cars.
    pub alerted: usize,
    pub onset_to_alert_p50_s: Option<f64>,
    pub onset_to_alert_p90_s: Option<f64>,
}

/// The whole fleet's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PerFault {
    pub by_fault: BTreeMap<String, FaultDetection>,
    /// Every faulty car, whatever its fault: the fleet's time to detect a fault.
    pub all_faults: FaultDetection,
    /// Cars with no faulty reading, the hours they drove (readings times the interval),
    /// and the anomalies flagged on them.
    pub healthy_cars: usize,
    pub healthy_car_hours: f64,
    pub false_alarms: u64,
    pub false_alarms_per_healthy_car_hour: Option<f64>,
}

/// One car's fault, as far as its scores show it.
#[derive(Default)]
struct CarFault {
    kind: String,
    onset_ms: i64,
    first_anomaly_ms: Option<i64>,
}

/// Judges `observed` per fault; `interval` is the time between two readings of a car.
pub fn judge(observed: &Observed, interval: Duration) -> PerFault {
    let mut faults: HashMap<&str, CarFault> = HashMap::new();
    let mut readings_by_car: HashMap<&str, u64> = HashMap::new();
    let mut anomalies_by_car: HashMap<&str, u64> = HashMap::new();
    for reading in &observed.scored_readings {
        let car = reading.device_id.as_str();
        *readings_by_car.entry(car).or_default() += 1;
        *anomalies_by_car.entry(car).or_default() += u64::from(reading.is_anomaly);
        let Some(kind) = &reading.fault else { continue };
        let fault = faults.entry(car).or_insert_with(|| CarFault {
            kind: kind.clone(),
            onset_ms: reading.event_time_ms,
            first_anomaly_ms: None,
        });
        fault.onset_ms = fault.onset_ms.min(reading.event_time_ms);
        if reading.is_anomaly {
            let first = fault.first_anomaly_ms.get_or_insert(reading.event_time_ms);
            *first = (*first).min(reading.event_time_ms);
        }
    }
    let mut first_alert_ms: HashMap<&str, i64> = HashMap::new();
    for alert in observed.alerts.values() {
        let end = alert.window_end.as_ref().map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos / 1_000_000));
        let Some(fault) = faults.get(alert.device_id.as_str()) else { continue };
        if end > fault.onset_ms {
            let first = first_alert_ms.entry(alert.device_id.as_str()).or_insert(end);
            *first = (*first).min(end);
        }
    }

    let mut by_kind: BTreeMap<&str, Vec<(&str, &CarFault)>> = BTreeMap::new();
    for (car, fault) in &faults {
        by_kind.entry(fault.kind.as_str()).or_default().push((car, fault));
    }
    let seconds = |from: i64, to: i64| ((to - from).max(0) as f64 / 1000.0 * 10.0).round() / 10.0;
    let detection = |cars: &[(&str, &CarFault)]| {
        let to_anomaly: Vec<f64> =
            cars.iter().filter_map(|(_, f)| f.first_anomaly_ms.map(|t| seconds(f.onset_ms, t))).collect();
        let to_alert: Vec<f64> =
            cars.iter().filter_map(|(car, f)| first_alert_ms.get(car).map(|&t| seconds(f.onset_ms, t))).collect();
        FaultDetection {
            cars: cars.len(),
            caught: to_anomaly.len(),
            onset_to_anomaly_p50_s: quantile(&to_anomaly, 0.5),
            onset_to_anomaly_p90_s: quantile(&to_anomaly, 0.9),
            alerted: to_alert.len(),
            onset_to_alert_p50_s: quantile(&to_alert, 0.5),
            onset_to_alert_p90_s: quantile(&to_alert, 0.9),
        }
    };
    let by_fault = by_kind.iter().map(|(kind, cars)| ((*kind).to_owned(), detection(cars))).collect();
    let every_car: Vec<(&str, &CarFault)> = by_kind.into_values().flatten().collect();
    let all_faults = detection(&every_car);

    let faulty: HashSet<&str> = faults.keys().copied().collect();
    let healthy: Vec<&str> = readings_by_car.keys().copied().filter(|car| !faulty.contains(car)).collect();
    let healthy_readings: u64 = healthy.iter().map(|car| readings_by_car[car]).sum();
    let false_alarms: u64 = healthy.iter().map(|car| anomalies_by_car[car]).sum();
    let healthy_car_hours = healthy_readings as f64 * interval.as_secs_f64() / 3600.0;
    PerFault {
        by_fault,
        all_faults,
        healthy_cars: healthy.len(),
        healthy_car_hours: (healthy_car_hours * 1000.0).round() / 1000.0,
        false_alarms,
        false_alarms_per_healthy_car_hour: (healthy_car_hours > 0.0)
            .then(|| (false_alarms as f64 / healthy_car_hours * 100.0).round() / 100.0),
    }
}

/// The `q` quantile (nearest rank) of `values`; `None` when there are none.
fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

impl PerFault {
    /// The summary's lines: a row per fault kind, then the false alarms.
    pub fn render(&self) -> Vec<String> {
        let pair = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => format!("{a} s / {b} s"),
            _ => "-".to_owned(),
        };
        let mut lines = vec![format!(
            "  per fault  {:<20} {:>7}  {:>22}  {:>22}",
            "kind", "caught", "onset->anomaly p50/p90", "onset->alert p50/p90"
        )];
        for (kind, d) in
            self.by_fault.iter().map(|(kind, d)| (kind.as_str(), d)).chain([("all faults", &self.all_faults)])
        {
            lines.push(format!(
                "             {kind:<20} {:>7}  {:>22}  {:>22}",
                format!("{}/{}", d.caught, d.cars),
                pair(d.onset_to_anomaly_p50_s, d.onset_to_anomaly_p90_s),
                pair(d.onset_to_alert_p50_s, d.onset_to_alert_p90_s),
            ));
        }
        lines.push(format!(
            "  false alarms {} per healthy car-hour ({} on {} healthy cars, {} car-hours)",
            self.false_alarms_per_healthy_car_hour.map_or_else(|| "-".to_owned(), |r| r.to_string()),
            self.false_alarms,
            self.healthy_cars,
            self.healthy_car_hours
        ));
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::ScoredReading;

    fn reading(car: &str, second: i64, fault: Option<&str>, is_anomaly: bool) -> ScoredReading {
        ScoredReading {
            partition: 0,
            device_id: car.to_owned(),
            event_time_ms: second * 1000,
            is_anomaly,
            faulty: fault.is_some(),
            fault: fault.map(str::to_owned),
        }
    }

    #[test]
    fn each_fault_is_judged_by_its_cars_onsets_and_first_alarms() {
        let mut observed = Observed::default();
        observed.scored_readings = vec![
            // car-a: overheating from second 10, first flagged at 13.
            reading("car-a", 9, None, false),
            reading("car-a", 10, Some("overheating"), false),
            reading("car-a", 13, Some("overheating"), true),
            // car-b: overheating from 20, never flagged.
            reading("car-b", 20, Some("overheating"), false),
            // car-c: stuck sensor from 5, flagged at once.
            reading("car-c", 5, Some("stuck_sensor"), true),
            // car-d: healthy, one false alarm in 4 readings.
            reading("car-d", 1, None, false),
            reading("car-d", 2, None, true),
            reading("car-d", 3, None, false),
            reading("car-d", 4, None, false),
        ];
        let alert = |car: &str, end: i64| proto::vigil::alerts::v1::Alert {
            id: format!("{car}/{end}"),
            device_id: car.to_owned(),
            window_end: Some(prost_types::Timestamp { seconds: end, nanos: 0 }),
            ..Default::default()
        };
        observed.alerts = [alert("car-a", 5), alert("car-a", 30), alert("car-a", 50)]
            .into_iter()
            .map(|a| (a.id.clone(), a))
            .collect();
        let judged = judge(&observed, Duration::from_secs(900));
        let overheating = &judged.by_fault["overheating"];
        assert_eq!((overheating.cars, overheating.caught, overheating.alerted), (2, 1, 1));
        assert_eq!(overheating.onset_to_anomaly_p50_s, Some(3.0));
        assert_eq!(overheating.onset_to_alert_p50_s, Some(20.0), "the first window ending after onset");
        let stuck = &judged.by_fault["stuck_sensor"];
        assert_eq!((stuck.caught, stuck.onset_to_anomaly_p90_s, stuck.onset_to_alert_p50_s), (1, Some(0.0), None));
        // Every faulty car: a, b and c, caught after 3 s and 0 s (the lower median: 0 s).
        let all = &judged.all_faults;
        assert_eq!((all.cars, all.caught, all.alerted), (3, 2, 1));
        assert_eq!((all.onset_to_anomaly_p50_s, all.onset_to_anomaly_p90_s), (Some(0.0), Some(3.0)));
        // car-d drove 4 readings x 15 min = 1 hour.
        assert_eq!((judged.healthy_cars, judged.false_alarms), (1, 1));
        assert_eq!(judged.false_alarms_per_healthy_car_hour, Some(1.0));
        assert_eq!(judged.render().len(), 5, "a header, two kinds, all faults, the false alarms");
    }
}
