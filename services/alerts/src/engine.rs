//! The rules engine of one scores partition, free of Kafka so its semantics can be tested
//! on their own. Per device and rule it keeps the open windows' figures on event time;
//! the partition's *stream time* (the latest event time seen on it) closes a window once
//! it passes the window's end by the rule's allowed lateness, and the rule's condition is
//! judged then, once, on the window's final figures. Readings for a closed window are late
//! and dropped.
//!
//! Everything depends only on the records and their order in the partition, so the same
//! input gives the same alerts, with the same ids (`<device>/<rule>/<window start>`). The
//! state the engine hands out as changelog records (each device's open windows and the
//! last offset applied to it; the partition's stream time and last offset) is what a new
//! owner restores from; it then skips every record already applied, so a redelivered
//! record changes nothing and fires nothing twice.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use prost::Message as _;
use proto::vigil::alerts::v1::{Alert, DeviceWindows, OpenWindow, PartitionProgress};

use crate::config::RuleConfig;

/// Changelog key of the partition's progress record; devices are `d/<device id>`.
pub const PROGRESS_KEY: &str = "p";
const DEVICE_KEY_PREFIX: &str = "d/";

/// A rule, in milliseconds.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    window_ms: i64,
    advance_ms: i64,
    lateness_ms: i64,
    min_anomalies: Option<u64>,
    min_readings: Option<u64>,
    mean_score_above: Option<f64>,
    max_score_above: Option<f64>,
    /// The condition in words, for the alert.
    condition: String,
}

impl Rule {
    pub fn new(config: &RuleConfig) -> Self {
        let seconds = |s: u64| i64::try_from(s).unwrap_or(i64::MAX / 4_000).saturating_mul(1000);
        let mut parts = Vec::new();
        if let Some(n) = config.min_anomalies {
            parts.push(format!("anomalies >= {n}"));
        }
        if let Some(n) = config.min_readings {
            parts.push(format!("readings >= {n}"));
        }
        if let Some(x) = config.mean_score_above {
            parts.push(format!("mean score > {x}"));
        }
        if let Some(x) = config.max_score_above {
            parts.push(format!("max score > {x}"));
        }
        Self {
            name: config.name.clone(),
            window_ms: seconds(config.window_seconds),
            advance_ms: seconds(config.advance_seconds.unwrap_or(config.window_seconds)),
            lateness_ms: seconds(config.allowed_lateness_seconds),
            min_anomalies: config.min_anomalies,
            min_readings: config.min_readings,
            mean_score_above: config.mean_score_above,
            max_score_above: config.max_score_above,
            condition: parts.join(" and "),
        }
    }

    /// The starts of the windows holding event time `t`: every multiple of the advance in
    /// (t - window, t]. Computed in 128 bits, so no event time (the service refuses
    /// implausible ones, but the engine does not rely on it) can overflow the arithmetic or
    /// make the iteration endless; starts outside `i64` are left out.
    fn window_starts(&self, t: i64) -> impl Iterator<Item = i64> + use<> {
        let (t, window, advance) = (i128::from(t), i128::from(self.window_ms), i128::from(self.advance_ms));
        let last = t.div_euclid(advance) * advance;
        let first = (t - window).div_euclid(advance) * advance + advance;
        (0..)
            .map(move |k: i128| first + k * advance)
            .take_while(move |start| *start <= last)
            .filter_map(|start| i64::try_from(start).ok())
    }

    /// The condition in words ("anomalies >= 3 and mean score > 2.5").
    pub fn condition(&self) -> &str {
        &self.condition
    }

    fn closes_at(&self, start: i64) -> i64 {
        start.saturating_add(self.window_ms).saturating_add(self.lateness_ms)
    }

    fn holds(&self, figures: &Figures) -> bool {
        let readings = figures.readings.max(1) as f64;
        self.min_anomalies.is_none_or(|n| figures.anomalies >= n)
            && self.min_readings.is_none_or(|n| figures.readings >= n)
            && self.mean_score_above.is_none_or(|x| figures.score_sum / readings > x)
            && self.max_score_above.is_none_or(|x| figures.max_score > x)
    }
}

/// One scored reading, as the rules see it.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    pub device_id: &'a str,
    pub event_time_ms: i64,
    pub score: f64,
    pub is_anomaly: bool,
    pub model_version: i64,
}

/// A window's figures so far.
#[derive(Debug, Clone, Default, PartialEq)]
struct Figures {
    readings: u64,
    anomalies: u64,
    score_sum: f64,
    max_score: f64,
    versions: BTreeSet<i64>,
}

impl Figures {
    fn add(&mut self, observation: &Observation<'_>) {
        self.max_score = if self.readings == 0 { observation.score } else { self.max_score.max(observation.score) };
        self.readings += 1;
        self.anomalies += u64::from(observation.is_anomaly);
        self.score_sum += observation.score;
        self.versions.insert(observation.model_version);
    }
}

#[derive(Debug, Default)]
struct Device {
    /// The last partition offset applied to this device; -1: none.
    applied_offset: i64,
    /// (rule index, window start) -> figures.
    windows: BTreeMap<(usize, i64), Figures>,
}

/// What applying one record did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Applied before (a redelivery): nothing changed.
    Skipped,
    /// Applied; the rules (indexes) for which it came too late, if any.
    Applied { late_for: Vec<usize> },
}

/// The engine of one partition.
#[derive(Debug)]
pub struct Partition {
    rules: Arc<[Rule]>,
    devices: HashMap<String, Device>,
    /// (closes at, device, rule index, window start), in the order windows close.
    closing: BTreeSet<(i64, String, usize, i64)>,
    stream_time_ms: i64,
    applied_offset: i64,
    /// Devices whose state changed since the last `take_changes`.
    changed: BTreeSet<String>,
    progress_changed: bool,
    alerts: Vec<Alert>,
}

impl Partition {
    pub fn new(rules: Arc<[Rule]>) -> Self {
        Self {
            rules,
            devices: HashMap::new(),
            closing: BTreeSet::new(),
            stream_time_ms: i64::MIN,
            applied_offset: -1,
            changed: BTreeSet::new(),
            progress_changed: false,
            alerts: Vec::new(),
        }
    }

    /// The engine as a changelog partition's records (in their order; a later record for
    /// a key replaces an earlier one, `None` deletes it) left it, and why each record it
    /// could not read was skipped. A record that is not the engine's (another writer's, a
    /// corrupt one) must not stop the service from starting: it is skipped, and what it
    /// held is rebuilt from the scores after the last commit. Windows of rules no longer
    /// configured are dropped.
    pub fn restore<'a>(
        rules: Arc<[Rule]>,
        records: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    ) -> (Self, Vec<String>) {
        let mut latest: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
        for (key, value) in records {
            latest.insert(key.to_vec(), value.map(<[u8]>::to_vec));
        }
        let mut partition = Self::new(rules);
        let mut skipped = Vec::new();
        for (key, value) in latest {
            let Some(value) = value else { continue };
            let Ok(key) = String::from_utf8(key) else {
                skipped.push("a key that is not UTF-8".to_owned());
                continue;
            };
            // What is echoed of a key is bounded: it came from whoever wrote the topic.
            let shown: String = key.chars().take(80).collect();
            if key == PROGRESS_KEY {
                match PartitionProgress::decode(value.as_slice()) {
                    Ok(progress) => {
                        partition.stream_time_ms = progress.stream_time_unix_ms;
                        partition.applied_offset = progress.applied_offset;
                    }
                    Err(error) => skipped.push(format!("{PROGRESS_KEY:?}: {error}")),
                }
                continue;
            }
            let Some(device_id) = key.strip_prefix(DEVICE_KEY_PREFIX) else {
                skipped.push(format!("key {shown:?} is neither {PROGRESS_KEY:?} nor {DEVICE_KEY_PREFIX}<device>"));
                continue;
            };
            let stored = match DeviceWindows::decode(value.as_slice()) {
                Ok(stored) => stored,
                Err(error) => {
                    skipped.push(format!("{shown:?}: {error}"));
                    continue;
                }
            };
            let mut device = Device { applied_offset: stored.applied_offset, windows: BTreeMap::new() };
            for window in stored.windows {
                let Some(index) = partition.rules.iter().position(|r| r.name == window.rule) else {
                    tracing::warn!(rule = %window.rule, device = device_id, "dropping a window of a rule no longer configured");
                    continue;
                };
                let figures = Figures {
                    readings: window.readings,
                    anomalies: window.anomalies,
                    score_sum: window.score_sum,
                    max_score: window.max_score,
                    versions: window.model_versions.into_iter().collect(),
                };
                let closes_at = partition.rules[index].closes_at(window.start_unix_ms);
                partition.closing.insert((closes_at, device_id.to_owned(), index, window.start_unix_ms));
                device.windows.insert((index, window.start_unix_ms), figures);
            }
            partition.devices.insert(device_id.to_owned(), device);
        }
        (partition, skipped)
    }

    /// Applies the record at `offset` (in the partition's order); windows it closes are
    /// judged and their alerts queued (see [`Partition::take_alerts`]).
    pub fn apply(&mut self, offset: i64, observation: &Observation<'_>) -> Applied {
        if offset <= self.applied_offset {
            return Applied::Skipped;
        }
        let t = observation.event_time_ms;
        let mut late_for = Vec::new();
        let device = self
            .devices
            .entry(observation.device_id.to_owned())
            .or_insert_with(|| Device { applied_offset: -1, windows: BTreeMap::new() });
        // A device's state can be ahead of the partition's progress when the last writes
        // before a crash got only part of the way: what it holds is not applied again.
        if offset > device.applied_offset {
            for (index, rule) in self.rules.iter().enumerate() {
                let mut late = false;
                for start in rule.window_starts(t) {
                    if rule.closes_at(start) <= self.stream_time_ms {
                        late = true;
                        continue;
                    }
                    let figures = device.windows.entry((index, start)).or_insert_with(|| {
                        self.closing.insert((rule.closes_at(start), observation.device_id.to_owned(), index, start));
                        Figures::default()
                    });
                    figures.add(observation);
                }
                if late {
                    late_for.push(index);
                }
            }
            device.applied_offset = offset;
            self.changed.insert(observation.device_id.to_owned());
        }
        self.stream_time_ms = self.stream_time_ms.max(t);
        self.applied_offset = offset;
        self.progress_changed = true;
        self.close_windows();
        Applied::Applied { late_for }
    }

    fn close_windows(&mut self) {
        while let Some(first) = self.closing.first()
            && first.0 <= self.stream_time_ms
        {
            let (_, device_id, index, start) = self.closing.pop_first().expect("first exists");
            let Some(device) = self.devices.get_mut(&device_id) else { continue };
            let Some(figures) = device.windows.remove(&(index, start)) else { continue };
            self.changed.insert(device_id.clone());
            let rule = &self.rules[index];
            if rule.holds(&figures) {
                self.alerts.push(alert(rule, &device_id, start, &figures));
            }
        }
    }

    /// The alerts of the windows closed since the last call, in closing order.
    pub fn take_alerts(&mut self) -> Vec<Alert> {
        std::mem::take(&mut self.alerts)
    }

    /// Changelog records for what changed since the last call: each changed device's
    /// state (`None`, a tombstone, once it has no open window: it is then forgotten
    /// here too), then the partition's progress. Write them in this order.
    pub fn take_changes(&mut self) -> Vec<(String, Option<Vec<u8>>)> {
        let mut out = Vec::new();
        for device_id in std::mem::take(&mut self.changed) {
            let key = format!("{DEVICE_KEY_PREFIX}{device_id}");
            let Some(device) = self.devices.get(&device_id) else { continue };
            if device.windows.is_empty() {
                self.devices.remove(&device_id);
                out.push((key, None));
                continue;
            }
            let stored = DeviceWindows {
                device_id: device_id.clone(),
                applied_offset: device.applied_offset,
                windows: device
                    .windows
                    .iter()
                    .map(|((index, start), figures)| OpenWindow {
                        rule: self.rules[*index].name.clone(),
                        start_unix_ms: *start,
                        readings: figures.readings,
                        anomalies: figures.anomalies,
                        score_sum: figures.score_sum,
                        max_score: figures.max_score,
                        model_versions: figures.versions.iter().copied().collect(),
                    })
                    .collect(),
            };
            out.push((key, Some(stored.encode_to_vec())));
        }
        if std::mem::take(&mut self.progress_changed) {
            let progress =
                PartitionProgress { stream_time_unix_ms: self.stream_time_ms, applied_offset: self.applied_offset };
            out.push((PROGRESS_KEY.to_owned(), Some(progress.encode_to_vec())));
        }
        out
    }

    /// The offset of the last record applied (-1: none).
    pub fn applied_offset(&self) -> i64 {
        self.applied_offset
    }

    pub fn open_windows(&self) -> usize {
        self.closing.len()
    }
}

fn timestamp(unix_ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: unix_ms.div_euclid(1000), nanos: (unix_ms.rem_euclid(1000) * 1_000_000) as i32 }
}

fn alert(rule: &Rule, device_id: &str, start: i64, figures: &Figures) -> Alert {
    Alert {
        id: format!("{device_id}/{}/{start}", rule.name),
        rule: rule.name.clone(),
        device_id: device_id.to_owned(),
        window_start: Some(timestamp(start)),
        window_end: Some(timestamp(start + rule.window_ms)),
        readings: figures.readings,
        anomalies: figures.anomalies,
        mean_score: figures.score_sum / figures.readings.max(1) as f64,
        max_score: figures.max_score,
        model_versions: figures.versions.iter().copied().collect(),
        condition: rule.condition.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, window: u64, advance: Option<u64>, lateness: u64, min_anomalies: u64) -> RuleConfig {
        RuleConfig {
            name: name.into(),
            window_seconds: window,
            advance_seconds: advance,
            allowed_lateness_seconds: lateness,
            min_anomalies: Some(min_anomalies),
            min_readings: None,
            mean_score_above: None,
            max_score_above: None,
        }
    }

    fn engine(rules: &[RuleConfig]) -> Partition {
        Partition::new(rules.iter().map(Rule::new).collect())
    }

    fn anomaly(device: &str, seconds: f64) -> Observation<'_> {
        Observation {
            device_id: device,
            event_time_ms: (seconds * 1000.0) as i64,
            score: 2.0,
            is_anomaly: true,
            model_version: 2,
        }
    }

    fn normal(device: &str, seconds: f64) -> Observation<'_> {
        Observation { score: 0.5, is_anomaly: false, ..anomaly(device, seconds) }
    }

    /// Applies observations at consecutive offsets; returns the alerts' ids.
    fn run(engine: &mut Partition, observations: &[Observation<'_>]) -> Vec<String> {
        let first = engine.applied_offset() + 1;
        for (i, observation) in observations.iter().enumerate() {
            engine.apply(first + i as i64, observation);
        }
        engine.take_alerts().into_iter().map(|a| a.id).collect()
    }

    #[test]
    fn tumbling_windows_are_half_open_and_judged_once_they_close() {
        let mut e = engine(&[rule("r", 60, None, 0, 3)]);
        // Three anomalies in [0, 60): the one at exactly 60 s belongs to the next window.
        let ids =
            run(&mut e, &[anomaly("car", 0.0), anomaly("car", 30.0), anomaly("car", 59.999), anomaly("car", 60.0)]);
        assert_eq!(ids, vec!["car/r/0"], "closed by the reading at 60 s");
        // [60, 120) has one anomaly: nothing when it closes.
        assert!(run(&mut e, &[normal("car", 125.0)]).is_empty());
    }

    #[test]
    fn an_alert_carries_the_windows_figures() {
        let mut e = engine(&[rule("r", 10, None, 0, 2)]);
        for (offset, (observation, version)) in
            [(anomaly("c", 1.0), 1), (normal("c", 2.0), 2), (anomaly("c", 3.0), 2), (normal("c", 10.0), 2)]
                .into_iter()
                .enumerate()
        {
            e.apply(offset as i64, &Observation { model_version: version, ..observation });
        }
        let alerts = e.take_alerts();
        assert_eq!(alerts.len(), 1);
        let a = &alerts[0];
        assert_eq!((a.readings, a.anomalies), (3, 2));
        assert!((a.mean_score - 1.5).abs() < 1e-9 && (a.max_score - 2.0).abs() < 1e-9);
        assert_eq!(a.model_versions, vec![1, 2]);
        assert_eq!(a.window_start.unwrap().seconds, 0);
        assert_eq!(a.window_end.unwrap().seconds, 10);
        assert_eq!(a.condition, "anomalies >= 2");
    }

    #[test]
    fn hopping_windows_count_a_reading_in_every_window_holding_it() {
        // 60 s windows every 20 s: a reading at 65 s is in [20,80), [40,100), [60,120).
        let r = Rule::new(&rule("r", 60, Some(20), 0, 1));
        assert_eq!(r.window_starts(65_000).collect::<Vec<_>>(), vec![20_000, 40_000, 60_000]);
        assert_eq!(r.window_starts(60_000).collect::<Vec<_>>(), vec![20_000, 40_000, 60_000]);
        assert_eq!(r.window_starts(59_999).collect::<Vec<_>>(), vec![0, 20_000, 40_000]);
        let mut e = engine(&[rule("r", 60, Some(20), 0, 1)]);
        let ids = run(&mut e, &[anomaly("car", 65.0), normal("car", 200.0)]);
        assert_eq!(ids, vec!["car/r/20000", "car/r/40000", "car/r/60000"]);
    }

    #[test]
    fn extreme_event_times_neither_overflow_nor_hang() {
        for rule in [rule("r", 60, Some(20), 30, 1), rule("r", 1, None, 0, 1), rule("r", u64::MAX, None, u64::MAX, 1)] {
            let rule = Rule::new(&rule);
            for t in [i64::MIN, i64::MIN + 1, -1, 0, i64::MAX - 1, i64::MAX] {
                let starts: Vec<i64> = rule.window_starts(t).take(1_000).collect();
                assert!(starts.len() < 1_000, "{t}: the windows of one time are few");
                assert!(starts.iter().all(|start| *start <= t), "{t}: {starts:?}");
            }
        }
        let mut e = engine(&[rule("r", 60, Some(20), 30, 1)]);
        assert!(matches!(e.apply(1, &anomaly("car", 9.2e15)), Applied::Applied { .. }));
        assert!(matches!(e.apply(2, &anomaly("car", -9.2e15)), Applied::Applied { .. }));
    }

    #[test]
    fn lateness_lets_a_reading_in_until_the_window_closes_and_drops_it_after() {
        let mut e = engine(&[rule("r", 60, None, 10, 2)]);
        e.apply(0, &anomaly("car", 50.0));
        e.apply(1, &normal("car", 65.0)); // stream time 65 s: [0,60) closes at 70 s
        assert_eq!(e.apply(2, &anomaly("car", 55.0)), Applied::Applied { late_for: vec![] }, "within lateness");
        assert!(e.take_alerts().is_empty(), "not closed yet");
        e.apply(3, &normal("car", 70.0)); // closes [0,60) with 2 anomalies
        assert_eq!(e.take_alerts().iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), vec!["car/r/0"]);
        assert_eq!(e.apply(4, &anomaly("car", 58.0)), Applied::Applied { late_for: vec![0] }, "too late");
        assert!(e.take_alerts().is_empty());
    }

    #[test]
    fn stream_time_is_the_partitions_so_a_quiet_device_still_gets_its_alert() {
        let mut e = engine(&[rule("r", 60, None, 0, 2)]);
        let ids = run(&mut e, &[anomaly("silent", 1.0), anomaly("silent", 2.0), normal("other", 61.0)]);
        assert_eq!(ids, vec!["silent/r/0"]);
    }

    #[test]
    fn conditions_combine_and_each_rule_has_its_own_windows() {
        let mean = RuleConfig { mean_score_above: Some(1.0), min_readings: Some(2), ..rule("mean", 10, None, 0, 0) };
        let mean = RuleConfig { min_anomalies: None, ..mean };
        let count = rule("count", 20, None, 0, 3);
        let mut e = engine(&[mean, count]);
        let ids = run(
            &mut e,
            &[anomaly("c", 1.0), anomaly("c", 2.0), normal("c", 12.0), anomaly("c", 15.0), normal("c", 41.0)],
        );
        // mean: [0,10) mean 2.0 over 2 readings fires; [10,20) mean 1.25 over 2 fires too.
        // count: [0,20) has 3 anomalies and fires; [20,40) is empty.
        assert_eq!(ids, vec!["c/mean/0", "c/mean/10000", "c/count/0"]);
    }

    #[test]
    fn restoring_from_the_changelog_continues_exactly_and_skips_what_was_applied() {
        let rules = [rule("r", 60, None, 5, 3)];
        let input: Vec<_> =
            [anomaly("a", 1.0), anomaly("b", 2.0), anomaly("a", 3.0), normal("b", 4.0), anomaly("a", 40.0)]
                .into_iter()
                .chain([anomaly("b", 50.0), anomaly("b", 55.0), normal("a", 70.0), normal("a", 130.0)])
                .collect();
        let mut whole = engine(&rules);
        let expected = run(&mut whole, &input);
        assert_eq!(expected, vec!["a/r/0", "b/r/0"], "both have 3 anomalies in [0, 60)");
        // The same, stopped after 5 records: restored from what it wrote, then fed
        // everything again from offset 3 (a redelivery of offsets 3 and 4).
        let mut first = engine(&rules);
        assert!(run(&mut first, &input[..5]).is_empty());
        let changelog = first.take_changes();
        let rules: Arc<[Rule]> = rules.iter().map(Rule::new).collect();
        let (mut second, skipped) =
            Partition::restore(rules, changelog.iter().map(|(k, v)| (k.as_bytes(), v.as_deref())));
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(second.applied_offset(), 4);
        for (offset, observation) in input.iter().enumerate().skip(3) {
            let applied = second.apply(offset as i64, observation);
            if offset <= 4 {
                assert_eq!(applied, Applied::Skipped);
            }
        }
        assert_eq!(second.take_alerts().into_iter().map(|a| a.id).collect::<Vec<_>>(), expected);
    }

    #[test]
    fn records_of_other_writers_in_the_changelog_are_skipped_and_named() {
        let rules = [rule("r", 60, None, 5, 3)];
        let mut first = engine(&rules);
        assert!(run(&mut first, &[anomaly("a", 1.0), anomaly("a", 2.0)]).is_empty());
        let mut changelog = first.take_changes();
        // A score record a misdirected writer put there, a corrupt device record, a long
        // foreign key, and a key that is not UTF-8.
        changelog.push(("car-1".to_owned(), Some(b"\x08\x01 a score".to_vec())));
        changelog.push(("d/b".to_owned(), Some(b"\xff\xff\xff".to_vec())));
        changelog.push(("k".repeat(10_000), Some(b"x".to_vec())));
        let rules: Arc<[Rule]> = rules.iter().map(Rule::new).collect();
        let records =
            changelog.iter().map(|(k, v)| (k.as_bytes(), v.as_deref())).chain([(&b"\xff"[..], Some(&b"x"[..]))]);
        let (mut restored, skipped) = Partition::restore(rules, records);
        assert_eq!(skipped.len(), 4, "{skipped:?}");
        assert!(skipped.iter().all(|why| why.len() < 300), "what is echoed of a key is bounded");
        assert_eq!(restored.applied_offset(), 1, "the engine's own records are restored");
        assert_eq!(run(&mut restored, &[anomaly("a", 3.0), normal("a", 70.0)]), vec!["a/r/0"]);
    }

    #[test]
    fn a_device_ahead_of_the_partitions_progress_is_not_counted_twice() {
        // A crash after a device's state was written but before the partition's progress:
        // the device holds offset 1 already; re-applying it must not count it again.
        let rules = [rule("r", 60, None, 0, 2)];
        let mut e = engine(&rules);
        e.apply(0, &anomaly("a", 1.0));
        let early = e.take_changes(); // device a at offset 0, progress at 0
        e.apply(1, &anomaly("a", 2.0));
        let later = e.take_changes(); // device a at offset 1, progress at 1
        let device_only: Vec<_> = early.iter().chain(later.iter().filter(|(k, _)| k != PROGRESS_KEY)).collect();
        let rules: Arc<[Rule]> = rules.iter().map(Rule::new).collect();
        let mut restored = Partition::restore(rules, device_only.iter().map(|(k, v)| (k.as_bytes(), v.as_deref()))).0;
        assert_eq!(restored.applied_offset(), 0, "the progress record of offset 1 was lost");
        restored.apply(1, &anomaly("a", 2.0)); // redelivered
        restored.apply(2, &normal("z", 61.0));
        let alerts = restored.take_alerts();
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].anomalies, 2, "offset 1 counted once");
    }

    #[test]
    fn closed_windows_leave_the_state_and_empty_devices_become_tombstones() {
        let mut e = engine(&[rule("r", 10, None, 0, 1)]);
        e.apply(0, &anomaly("a", 1.0));
        e.apply(1, &normal("b", 11.0)); // closes a's window
        let changes = e.take_changes();
        let keys: Vec<_> = changes.iter().map(|(k, v)| (k.as_str(), v.is_some())).collect();
        assert_eq!(keys, vec![("d/a", false), ("d/b", true), ("p", true)]);
        assert_eq!(e.open_windows(), 1);
        assert!(e.take_changes().is_empty(), "nothing changed since");
    }
}
