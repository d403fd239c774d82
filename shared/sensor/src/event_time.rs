//! Whether a reading's event time is plausible: not further in the past or the future of
//! when it arrived than the configured bounds. Event time drives every window downstream
//! (the alerts service's stream time only moves forward), so one reading dated in the year
//! 9999 would make every later reading of its partition "late"; such a reading is refused
//! at the edge (ingest) and again where it is read (the processor), never trusted.

use std::time::{Duration, SystemTime};

use prost_types::Timestamp;
use serde::{Deserialize, Serialize};

use crate::InvalidReading;

/// How far a reading's event time may lie from its arrival time: ingest compares with when
/// the message arrived, the processor with the record's Kafka timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventTimeBounds {
    /// Older than this is refused (a device that buffered readings while offline sends
    /// them late; a day by default).
    pub max_past_seconds: u64,
    /// Later than this is refused (clock skew; five minutes by default).
    pub max_future_seconds: u64,
}

impl Default for EventTimeBounds {
    fn default() -> Self {
        Self { max_past_seconds: 24 * 3600, max_future_seconds: 300 }
    }
}

impl EventTimeBounds {
    /// Checks `event_time` (absent: nothing to check) against `arrival`.
    pub fn check(&self, event_time: Option<&Timestamp>, arrival: SystemTime) -> Result<(), InvalidReading> {
        let Some(event_time) = event_time else { return Ok(()) };
        let implausible = |problem: String| InvalidReading::ImplausibleEventTime { problem };
        let event = to_system_time(event_time).ok_or_else(|| {
            implausible(format!("{}s {}ns is not a representable time", event_time.seconds, event_time.nanos))
        })?;
        match event.duration_since(arrival) {
            Ok(ahead) if ahead > Duration::from_secs(self.max_future_seconds) => Err(implausible(format!(
                "{} s after its arrival, more than the {} s allowed (max_future_seconds)",
                ahead.as_secs(),
                self.max_future_seconds
            ))),
            Ok(_) => Ok(()),
            Err(behind) if behind.duration() > Duration::from_secs(self.max_past_seconds) => Err(implausible(format!(
                "{} s before its arrival, more than the {} s allowed (max_past_seconds)",
                behind.duration().as_secs(),
                self.max_past_seconds
            ))),
            Err(_) => Ok(()),
        }
    }
}

/// `time` as a `SystemTime`, if it is one (nanos within a second, no overflow).
fn to_system_time(time: &Timestamp) -> Option<SystemTime> {
    let nanos = u32::try_from(time.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    let seconds = Duration::from_secs(time.seconds.unsigned_abs());
    let base = if time.seconds >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(seconds)?
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(seconds)?
    };
    base.checked_add(Duration::from_nanos(u64::from(nanos)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp { seconds, nanos: 0 }
    }

    #[test]
    fn readings_within_the_bounds_pass_and_the_rest_are_refused_with_the_bound_named() {
        let bounds = EventTimeBounds::default();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000);
        let check = |seconds: i64| bounds.check(Some(&at(seconds)), now);
        assert!(check(1_780_000_000).is_ok());
        assert!(check(1_780_000_000 - 24 * 3600).is_ok(), "a day late is allowed");
        assert!(check(1_780_000_000 + 300).is_ok());
        assert!(check(1_780_000_000 - 24 * 3600 - 1).unwrap_err().to_string().contains("max_past_seconds"));
        assert!(check(1_780_000_000 + 301).unwrap_err().to_string().contains("max_future_seconds"));
        // The year 9999, and times no clock can hold.
        assert!(check(253_402_300_799).unwrap_err().to_string().contains("max_future_seconds"));
        for extreme in [i64::MAX, i64::MIN, i64::MAX - 1] {
            let error = check(extreme).unwrap_err();
            assert_eq!(error.reason(), "implausible_event_time", "{extreme}: {error}");
        }
        let bad_nanos = Timestamp { seconds: 1_780_000_000, nanos: -1 };
        assert!(bounds.check(Some(&bad_nanos), now).is_err());
        assert!(bounds.check(None, now).is_ok(), "no event time: nothing to check");
    }
}
