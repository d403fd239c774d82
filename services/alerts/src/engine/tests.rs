//! The engine's rules, windows, restore and bounds, without Kafka.

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
    let ids = run(&mut e, &[anomaly("car", 0.0), anomaly("car", 30.0), anomaly("car", 59.999), anomaly("car", 60.0)]);
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
    let ids =
        run(&mut e, &[anomaly("c", 1.0), anomaly("c", 2.0), normal("c", 12.0), anomaly("c", 15.0), normal("c", 41.0)]);
    // mean: [0,10) mean 2.0 over 2 readings fires; [10,20) mean 1.25 over 2 fires too.
    // count: [0,20) has 3 anomalies and fires; [20,40) is empty.
    assert_eq!(ids, vec!["c/mean/0", "c/mean/10000", "c/count/0"]);
}

#[test]
fn restoring_from_the_changelog_continues_exactly_and_skips_what_was_applied() {
    let rules = [rule("r", 60, None, 5, 3)];
    let input: Vec<_> = [anomaly("a", 1.0), anomaly("b", 2.0), anomaly("a", 3.0), normal("b", 4.0), anomaly("a", 40.0)]
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
    let (mut second, skipped) = Partition::restore(rules, changelog.iter().map(|(k, v)| (k.as_bytes(), v.as_deref())));
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
fn a_flood_of_device_ids_evicts_the_longest_idle_and_state_stays_bounded() {
    let rules = [rule("r", 60, None, 0, 3)];
    let mut e = engine(&rules).with_device_limit(100);
    let mut offset = 0;
    let mut apply = |e: &mut Partition, observation: &Observation<'_>| {
        e.apply(offset, observation);
        offset += 1;
    };
    // A steady device among 10,000 one-off ids, all within one window.
    for i in 0..10_000 {
        let t = f64::from(i) * 0.005;
        if i % 50 == 0 {
            apply(&mut e, &anomaly("steady", t));
        }
        apply(&mut e, &anomaly(&format!("flood-{i}"), t));
        assert!(e.device_count() <= 100, "held {} devices", e.device_count());
    }
    assert_eq!(e.take_evictions(), 10_001 - 100);
    let changes = e.take_changes();
    let deleted = changes.iter().filter(|(key, value)| key.starts_with("d/flood-") && value.is_none()).count();
    assert_eq!(deleted, 10_001 - 100, "an evicted device's changelog record is deleted");
    // The window closes: the steady device (never idle long) still alerts.
    apply(&mut e, &normal("steady", 200.0));
    let ids: Vec<String> = e.take_alerts().into_iter().map(|a| a.id).collect();
    assert!(ids.contains(&"steady/r/0".to_owned()), "{ids:?}");
    assert!(ids.iter().all(|id| id.starts_with("steady/")), "an evicted device fires nothing: {ids:?}");
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
    let records = changelog.iter().map(|(k, v)| (k.as_bytes(), v.as_deref())).chain([(&b"\xff"[..], Some(&b"x"[..]))]);
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
