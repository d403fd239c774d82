//! What the records on the topics say happened, read the way a downstream consumer reads
//! them: which readings made it onto the readings topic and how often, which were scored
//! and how often, when scoring stopped and started again around each kill (from the
//! `scored_at` each score carries: the record's Kafka timestamp is its reading's, carried
//! on), and which alerts the rule must have fired, recounted from the score records with
//! the alerts engine's semantics (services/alerts/src/engine.rs).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use prost::Message as _;
use proto::vigil::alerts::v1::Alert;
use proto::vigil::scoring::v1::Score;
use sensor::SensorReading;
use test_support::TailedRecord;

/// A reading's identity: its device and the sequence number the device gave it.
pub(crate) type ReadingId = (String, u64);

/// Whether a device id is one of the simulated fleet's (the poison records' are not).
fn is_car(device_id: &str) -> bool {
    device_id.starts_with("car-")
}

fn time_of(timestamp: Option<&prost_types::Timestamp>) -> Option<SystemTime> {
    let t = timestamp?;
    let since_epoch = Duration::from_secs(u64::try_from(t.seconds).ok()?) + Duration::from_nanos(t.nanos.max(0) as u64);
    Some(SystemTime::UNIX_EPOCH + since_epoch)
}

fn kafka_time(record: &TailedRecord) -> Option<SystemTime> {
    let ms = u64::try_from(record.timestamp_ms?).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

/// The fleet's readings on the readings topic.
pub(crate) struct Readings {
    pub(crate) records: usize,
    pub(crate) distinct: BTreeSet<ReadingId>,
    /// Each record's Kafka timestamp (when ingest wrote it), in order of arrival.
    pub(crate) written_at: Vec<SystemTime>,
}

pub(crate) fn readings(records: &[TailedRecord]) -> Readings {
    let mut readings = Readings { records: 0, distinct: BTreeSet::new(), written_at: Vec::new() };
    for record in records {
        let Ok(reading) = SensorReading::decode(record.record.payload.as_slice()) else { continue };
        if !is_car(&reading.device_id) {
            continue;
        }
        readings.records += 1;
        readings.distinct.insert((reading.device_id, reading.sequence));
        readings.written_at.extend(kafka_time(record));
    }
    readings
}

/// The fleet's scores on the scores topic.
pub(crate) struct Scores {
    pub(crate) records: usize,
    pub(crate) distinct: BTreeSet<ReadingId>,
    /// The readings records scored (partition, offset): a record scored twice is the
    /// processor's repeat; two records of one reading are ingest's.
    pub(crate) sources: BTreeSet<(i32, i64)>,
    pub(crate) anomalies: usize,
    /// When each score was made, sorted.
    pub(crate) scored_at: Vec<SystemTime>,
    /// Each score's model call: when it was sent (`scored_at` less the model's latency,
    /// which says which model server answered) and when the score was made.
    pub(crate) calls: Vec<(SystemTime, SystemTime)>,
}

pub(crate) fn scores(records: &[TailedRecord]) -> Scores {
    let mut scores = Scores {
        records: 0,
        distinct: BTreeSet::new(),
        sources: BTreeSet::new(),
        anomalies: 0,
        scored_at: Vec::new(),
        calls: Vec::new(),
    };
    for record in records {
        let Ok(score) = Score::decode(record.record.payload.as_slice()) else { continue };
        if !is_car(&score.device_id) {
            continue;
        }
        scores.records += 1;
        scores.anomalies += usize::from(score.is_anomaly);
        scores.sources.insert((score.source_partition, score.source_offset));
        if let Some(scored_at) = time_of(score.scored_at.as_ref()) {
            scores.scored_at.push(scored_at);
            scores.calls.push((scored_at - Duration::from_micros(score.model_latency_us), scored_at));
        }
        scores.distinct.insert((score.device_id, score.sequence));
    }
    scores.scored_at.sort();
    scores
}

/// A service killed with SIGKILL and started again.
#[derive(Debug, Clone)]
pub(crate) struct Kill {
    pub(crate) service: &'static str,
    pub(crate) killed_at: SystemTime,
    pub(crate) restarted_at: SystemTime,
}

/// How long after `from` the first of `times` (sorted or not) came; `None` if none did.
pub(crate) fn first_after(times: &[SystemTime], from: SystemTime) -> Option<Duration> {
    times.iter().filter_map(|t| t.duration_since(from).ok()).min()
}

/// How long after `from` the first score of a model call sent after `from` was made:
/// the first answer of a model server started at `from`.
pub(crate) fn first_answer_after(calls: &[(SystemTime, SystemTime)], from: SystemTime) -> Option<Duration> {
    calls.iter().filter(|(sent, _)| *sent >= from).filter_map(|(_, scored)| scored.duration_since(from).ok()).min()
}

/// The longest stretch between two consecutive scores (`scored_at`, sorted), from the
/// first score to the last, less any time in it when no processor process existed
/// (`down`: from a kill to the restart); and when it began.
pub(crate) fn longest_gap(
    scored_at: &[SystemTime],
    down: &[(SystemTime, SystemTime)],
) -> (Duration, Option<SystemTime>) {
    let overlap = |from: SystemTime, to: SystemTime| -> Duration {
        down.iter()
            .map(|(a, b)| {
                let (start, end) = (from.max(*a), to.min(*b));
                end.duration_since(start).unwrap_or_default()
            })
            .sum()
    };
    scored_at
        .windows(2)
        .map(|pair| {
            let gap = pair[1].duration_since(pair[0]).unwrap_or_default();
            (gap.saturating_sub(overlap(pair[0], pair[1])), Some(pair[0]))
        })
        .max_by_key(|(gap, _)| *gap)
        .unwrap_or_default()
}

/// A per-device count rule on tumbling windows (the test's rule has no other condition).
#[derive(Debug, Clone)]
pub(crate) struct CountRule {
    pub(crate) name: String,
    pub(crate) window_ms: i64,
    pub(crate) lateness_ms: i64,
    pub(crate) min_anomalies: u64,
}

/// Alert id (`<device>/<rule>/<window start ms>`) -> (readings, anomalies).
pub(crate) type AlertFigures = BTreeMap<String, (u64, u64)>;

/// The alerts `rule` fires on the score records of the scores topic, as the alerts engine
/// applies them: each partition in offset order, every record it accepts counted (a
/// score repeated by the processor counts twice, as it does there), records it
/// dead-letters (unreadable, an over-long device id, an implausible event time) left out,
/// a window closed once its partition's stream time passes its end plus the lateness and
/// judged then, readings for a closed window dropped as late. With `distinct_only`, each
/// reading counts once: what the alerts would be without the processor's repeats.
pub(crate) fn recount_alerts(records: &[TailedRecord], rule: &CountRule, distinct_only: bool) -> AlertFigures {
    let mut by_partition: BTreeMap<i32, Vec<&TailedRecord>> = BTreeMap::new();
    for record in records {
        by_partition.entry(record.record.partition).or_default().push(record);
    }
    let bounds = sensor::EventTimeBounds::default();
    let mut fired = AlertFigures::new();
    for (_, mut partition) in by_partition {
        partition.sort_by_key(|record| record.record.offset);
        let mut seen: BTreeSet<ReadingId> = BTreeSet::new();
        let mut stream_time = i64::MIN;
        // (device, window start) -> (readings, anomalies); (closes at, device, start).
        let mut windows: HashMap<(String, i64), (u64, u64)> = HashMap::new();
        let mut closing: BTreeSet<(i64, String, i64)> = BTreeSet::new();
        for record in partition {
            let Ok(score) = Score::decode(record.record.payload.as_slice()) else { continue };
            let arrival = kafka_time(record).unwrap_or_else(SystemTime::now);
            if score.device_id.is_empty()
                || score.device_id.len() > sensor::MAX_DEVICE_ID_BYTES
                || !score.score.is_finite()
                || bounds.check(score.event_time.as_ref(), arrival).is_err()
            {
                continue;
            }
            if distinct_only && !seen.insert((score.device_id.clone(), score.sequence)) {
                continue;
            }
            let t = score
                .event_time
                .map(|t| t.seconds.saturating_mul(1000).saturating_add(i64::from(t.nanos / 1_000_000)))
                .or(record.timestamp_ms)
                .unwrap_or(0);
            let start = t.div_euclid(rule.window_ms) * rule.window_ms;
            let closes_at = start + rule.window_ms + rule.lateness_ms;
            if closes_at > stream_time {
                let figures = windows.entry((score.device_id.clone(), start)).or_insert_with(|| {
                    closing.insert((closes_at, score.device_id.clone(), start));
                    (0, 0)
                });
                figures.0 += 1;
                figures.1 += u64::from(score.is_anomaly);
            }
            stream_time = stream_time.max(t);
            while let Some(first) = closing.first()
                && first.0 <= stream_time
            {
                let (_, device, start) = closing.pop_first().expect("there is a first");
                let (readings, anomalies) = windows.remove(&(device.clone(), start)).expect("an open window");
                if anomalies >= rule.min_anomalies {
                    fired.insert(format!("{device}/{}/{start}", rule.name), (readings, anomalies));
                }
            }
        }
    }
    fired
}

/// The alerts on the alerts topic.
pub(crate) struct FiredAlerts {
    pub(crate) records: usize,
    /// Each alert's figures, as its first record gave them.
    pub(crate) by_id: AlertFigures,
    /// Alerts written again with other figures (a repeat after a restart must be the same
    /// alert): `id: first vs later`.
    pub(crate) rewritten: Vec<String>,
}

pub(crate) fn fired_alerts(records: &[TailedRecord]) -> FiredAlerts {
    let mut fired = FiredAlerts { records: 0, by_id: AlertFigures::new(), rewritten: Vec::new() };
    for alert in records.iter().filter_map(|r| Alert::decode(r.record.payload.as_slice()).ok()) {
        fired.records += 1;
        let figures = (alert.readings, alert.anomalies);
        let first = *fired.by_id.entry(alert.id.clone()).or_insert(figures);
        if first != figures {
            fired.rewritten.push(format!("{}: {first:?} vs {figures:?}", alert.id));
        }
    }
    fired
}

/// Ids whose figures differ between `a` and `b`, or that only one has.
pub(crate) fn differing(a: &AlertFigures, b: &AlertFigures) -> Vec<String> {
    let ids: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    ids.into_iter()
        .filter(|id| a.get(*id) != b.get(*id))
        .map(|id| format!("{id}: {:?} vs {:?}", a.get(id), b.get(id)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn the_longest_gap_leaves_out_the_time_no_processor_existed() {
        let scored = [at(0), at(1_000), at(5_000), at(5_500)];
        assert_eq!(longest_gap(&scored, &[]), (Duration::from_secs(4), Some(at(1_000))));
        let (gap, from) = longest_gap(&scored, &[(at(1_500), at(4_000))]);
        assert_eq!((gap, from), (Duration::from_millis(1_500), Some(at(1_000))));
        assert_eq!(first_after(&scored, at(1_200)), Some(Duration::from_millis(3_800)));
        assert_eq!(first_after(&scored, at(6_000)), None);
    }

    #[test]
    fn the_first_answer_after_a_restart_is_of_a_call_sent_after_it() {
        // (sent, scored): the first was answered by the old server, though scored later.
        let calls = [(at(900), at(1_100)), (at(1_500), at(1_600)), (at(1_200), at(1_700))];
        assert_eq!(first_answer_after(&calls, at(1_000)), Some(Duration::from_millis(600)));
        assert_eq!(first_answer_after(&calls, at(2_000)), None);
    }
}
