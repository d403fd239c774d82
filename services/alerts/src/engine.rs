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
    /// Devices held at once, at most; past it the one idle longest is evicted.
    max_devices: usize,
    /// (the device's last applied offset, device): the order devices went idle in.
    idle: BTreeSet<(i64, String)>,
    /// Devices evicted since the last `take_changes`: their changelog keys are deleted.
    evicted: Vec<String>,
    /// Devices evicted since the last `take_evictions`.
    evictions: u64,
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
            max_devices: usize::MAX,
            idle: BTreeSet::new(),
            evicted: Vec::new(),
            evictions: 0,
        }
    }

    /// Holds at most `max_devices` devices (with open windows): a flood of new device ids
    /// evicts the devices idle longest, windows and all, instead of growing without bound.
    /// An evicted device's open windows fire nothing; its changelog record is deleted.
    pub fn with_device_limit(mut self, max_devices: usize) -> Self {
        self.max_devices = max_devices.max(1);
        self.evict_over_limit();
        self
    }

    /// Devices evicted since the last call (for the metric).
    pub fn take_evictions(&mut self) -> u64 {
        std::mem::take(&mut self.evictions)
    }

    fn evict_over_limit(&mut self) {
        while self.devices.len() > self.max_devices {
            let Some((_, device_id)) = self.idle.pop_first() else { break };
            let Some(device) = self.devices.remove(&device_id) else { continue };
            for (index, start) in device.windows.keys() {
                let closes_at = self.rules[*index].closes_at(*start);
                self.closing.remove(&(closes_at, device_id.clone(), *index, *start));
            }
            self.changed.remove(&device_id);
            self.evicted.push(device_id);
            self.evictions += 1;
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
            partition.idle.insert((device.applied_offset, device_id.to_owned()));
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
            self.idle.remove(&(device.applied_offset, observation.device_id.to_owned()));
            self.idle.insert((offset, observation.device_id.to_owned()));
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
        self.evict_over_limit();
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
        let mut out: Vec<(String, Option<Vec<u8>>)> =
            self.evicted.drain(..).map(|device_id| (format!("{DEVICE_KEY_PREFIX}{device_id}"), None)).collect();
        for device_id in std::mem::take(&mut self.changed) {
            let key = format!("{DEVICE_KEY_PREFIX}{device_id}");
            let Some(device) = self.devices.get(&device_id) else { continue };
            if device.windows.is_empty() {
                self.idle.remove(&(device.applied_offset, device_id.clone()));
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

    /// Devices held (those with open windows, and any changed since the last
    /// `take_changes`).
    pub fn device_count(&self) -> usize {
        self.devices.len()
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
mod tests;
