//! Per-device windows: the last readings of each device, for models that score a window
//! of readings rather than one (docs/windowed-models.md).
//!
//! A model asks for a window through its signature: an input of shape `[-1, k]` is the
//! signal's values over the device's last `k` readings, oldest first, the reading being
//! scored last ([`window_length`]). Each partition worker keeps a [`Windows`] and pushes
//! every valid reading into it in the partition's order, before the reading is scored, so
//! readings scored concurrently still see exactly the readings before them. A device's
//! readings all land in one partition (readings are keyed by device), so partition-local
//! state is the device's whole recent history.
//!
//! Rules, the same wherever a reading is scored (live, after a rebalance, in a replay):
//! - a device with fewer than `k` readings has its window filled by repeating its oldest
//!   one in front (a device's first reading is scored as if it had been standing still);
//! - a reading whose event time is more than `max_gap_seconds` away from the device's
//!   previous one starts a new window (the device was off, or its clock jumped);
//! - at most `max_devices_per_partition` devices are kept; the one seen least recently is
//!   forgotten first, and its next reading starts a new window.
//!
//! State is bounded: at most `max_devices_per_partition` devices per partition, each with
//! `k` readings of 18 floats (72 bytes, plus each reading's allocation and the device's
//! id and entry), so about 50 MB for 50,000 devices at `k = 10`. The devices kept are
//! counted in `processor_window_devices`.

use std::collections::VecDeque;
use std::sync::Arc;

use sensor::SensorReading;

use crate::config::WindowConfig;

/// One reading's signal values, in [`sensor::signals`] order.
type Values = Arc<[f32]>;

/// The readings a model sees for one reading: the device's recent ones, oldest first,
/// ending with the reading itself. Empty when no history is kept (the model scores one
/// reading): the reading alone is then its window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window(Vec<Values>);

impl Window {
    /// Readings in the window (at most the `keep` of the [`Windows`] it came from).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Appends the values of signal number `signal` over the newest `k` readings, oldest
    /// first; with fewer than `k`, the oldest is repeated in front.
    pub fn extend_signal(&self, signal: usize, k: usize, out: &mut Vec<f32>) {
        let Some(oldest) = self.0.first() else { return };
        let have = self.0.len().min(k);
        out.extend(std::iter::repeat_n(oldest[signal], k - have));
        out.extend(self.0[self.0.len() - have..].iter().map(|values| values[signal]));
    }
}

fn values(reading: &SensorReading) -> Values {
    sensor::signals().iter().map(|signal| signal.get(reading) as f32).collect()
}

/// Milliseconds since the epoch of a reading's event time (0 when it has none: such a
/// reading is refused by validation before it gets here).
fn event_ms(reading: &SensorReading) -> i64 {
    reading
        .event_time
        .as_ref()
        .map_or(0, |t| t.seconds.saturating_mul(1000).saturating_add(i64::from(t.nanos) / 1_000_000))
}

struct History {
    last_ms: i64,
    readings: VecDeque<Values>,
}

/// One partition's devices and their recent readings.
pub struct Windows {
    /// Readings kept per device (the longest window the model asks for); 1: none kept.
    keep: usize,
    max_devices: usize,
    max_gap_ms: i64,
    devices: hashlink::LruCache<String, History>,
}

impl Windows {
    pub fn new(config: &WindowConfig) -> Self {
        Self {
            keep: 1,
            max_devices: config.max_devices_per_partition.max(1),
            max_gap_ms: i64::try_from(config.max_gap_seconds.saturating_mul(1000)).unwrap_or(i64::MAX),
            devices: hashlink::LruCache::new_unbounded(),
        }
    }

    /// Keeps `keep` readings per device from now on (the model's window changed). A longer
    /// window fills as readings arrive; until then its front is padded.
    pub fn set_keep(&mut self, keep: usize) {
        let keep = keep.max(1);
        if keep == self.keep {
            return;
        }
        self.keep = keep;
        if keep == 1 {
            self.devices.clear();
        } else {
            for (_, history) in self.devices.iter_mut() {
                while history.readings.len() > keep {
                    history.readings.pop_front();
                }
            }
        }
    }

    pub fn keep(&self) -> usize {
        self.keep
    }

    /// Devices with history kept.
    pub fn devices(&self) -> usize {
        self.devices.len()
    }

    /// Records `reading` as its device's newest and returns the window that ends with it
    /// (empty while no history is kept: nothing is allocated for a one-reading model).
    pub fn push(&mut self, reading: &SensorReading) -> Window {
        if self.keep == 1 {
            return Window::default();
        }
        let now_ms = event_ms(reading);
        let values = values(reading);
        let keep = self.keep;
        let history = match self.devices.get_mut(&reading.device_id) {
            Some(history) => history,
            None => {
                if self.devices.len() >= self.max_devices {
                    self.devices.remove_lru();
                }
                self.devices.insert(
                    reading.device_id.clone(),
                    History { last_ms: now_ms, readings: VecDeque::with_capacity(keep) },
                );
                self.devices.get_mut(&reading.device_id).expect("just inserted")
            }
        };
        if now_ms.abs_diff(history.last_ms) > self.max_gap_ms.unsigned_abs() {
            history.readings.clear();
        }
        history.last_ms = now_ms;
        if history.readings.len() == keep {
            history.readings.pop_front();
        }
        history.readings.push_back(values);
        Window(history.readings.iter().cloned().collect())
    }
}

/// The window an input of this signature shape asks for: `[-1]` (or an unknown shape) is
/// one value per reading (`None`), `[-1, k]` the last `k` (`Some(k)`); anything else is
/// not a reading input.
pub fn window_length(shape: Option<&[i64]>) -> Result<Option<usize>, String> {
    match shape {
        None | Some([_]) => Ok(None),
        Some([_, k]) if *k > 0 => Ok(Some(*k as usize)),
        Some([_, k]) => Err(format!("has shape [-1, {k}]: a window's length must be fixed (as [-1, 10])")),
        Some(other) => Err(format!(
            "has shape {other:?}: a reading input is [-1] (one reading) or [-1, k] (the device's last k readings)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::Timestamp;

    fn reading(device: &str, second: i64, speed: f32) -> SensorReading {
        SensorReading {
            device_id: device.into(),
            event_time: Some(Timestamp { seconds: 1_700_000_000 + second, nanos: 0 }),
            speed,
            ..Default::default()
        }
    }

    fn speeds(window: &Window, k: usize) -> Vec<f32> {
        let index = sensor::signals().iter().position(|s| s.name == "speed").unwrap();
        let mut out = Vec::new();
        window.extend_signal(index, k, &mut out);
        out
    }

    fn config(max_devices: usize) -> WindowConfig {
        WindowConfig { max_devices_per_partition: max_devices, max_gap_seconds: 60, ..Default::default() }
    }

    #[test]
    fn a_window_is_the_devices_last_readings_padded_in_front() {
        let mut windows = Windows::new(&config(10));
        windows.set_keep(3);
        assert_eq!(speeds(&windows.push(&reading("a", 0, 1.0)), 3), [1.0, 1.0, 1.0]);
        assert_eq!(speeds(&windows.push(&reading("b", 0, 50.0)), 3), [50.0, 50.0, 50.0]);
        assert_eq!(speeds(&windows.push(&reading("a", 1, 2.0)), 3), [1.0, 1.0, 2.0]);
        assert_eq!(speeds(&windows.push(&reading("a", 2, 3.0)), 3), [1.0, 2.0, 3.0]);
        let fourth = windows.push(&reading("a", 3, 4.0));
        assert_eq!(speeds(&fourth, 3), [2.0, 3.0, 4.0]);
        // A shorter window than kept takes the newest; a one-reading input is the reading.
        assert_eq!(speeds(&fourth, 1), [4.0]);
        assert_eq!(windows.devices(), 2);
    }

    #[test]
    fn a_gap_in_event_time_starts_a_new_window() {
        let mut windows = Windows::new(&config(10));
        windows.set_keep(3);
        windows.push(&reading("a", 0, 1.0));
        windows.push(&reading("a", 1, 2.0));
        assert_eq!(speeds(&windows.push(&reading("a", 100, 9.0)), 3), [9.0, 9.0, 9.0]);
        // Backwards by more than the gap, too.
        assert_eq!(speeds(&windows.push(&reading("a", 0, 5.0)), 3), [5.0, 5.0, 5.0]);
    }

    #[test]
    fn devices_past_the_bound_are_forgotten_least_recently_seen_first() {
        let mut windows = Windows::new(&config(2));
        windows.set_keep(2);
        windows.push(&reading("a", 0, 1.0));
        windows.push(&reading("b", 0, 2.0));
        windows.push(&reading("a", 1, 3.0));
        // "b" was seen least recently: "c" takes its place.
        windows.push(&reading("c", 0, 4.0));
        assert_eq!(windows.devices(), 2);
        assert_eq!(speeds(&windows.push(&reading("a", 2, 5.0)), 2), [3.0, 5.0]);
        assert_eq!(speeds(&windows.push(&reading("b", 1, 6.0)), 2), [6.0, 6.0], "b starts over");
    }

    #[test]
    fn without_a_window_nothing_is_kept() {
        let mut windows = Windows::new(&config(2));
        assert!(windows.push(&reading("a", 0, 1.0)).is_empty());
        assert_eq!(windows.devices(), 0);
        windows.set_keep(4);
        windows.push(&reading("a", 1, 1.0));
        windows.set_keep(1);
        assert_eq!(windows.devices(), 0);
    }

    #[test]
    fn signature_shapes_name_the_window() {
        assert_eq!(window_length(None), Ok(None));
        assert_eq!(window_length(Some(&[-1])), Ok(None));
        assert_eq!(window_length(Some(&[-1, 10])), Ok(Some(10)));
        assert!(window_length(Some(&[-1, -1])).unwrap_err().contains("fixed"));
        assert!(window_length(Some(&[-1, 10, 17])).is_err());
    }
}
