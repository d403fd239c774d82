//! The alerts service against a Kafka-protocol broker (librdkafka's mock cluster, in
//! process): alerts with their figures, dead letters, state recovered across a restart
//! and a rebalance, redelivered records firing nothing twice, and a replay of the same
//! scores into fresh state giving the same alerts. The expected alerts come from the
//! engine itself fed the same records per partition (its window semantics have their own
//! unit tests), so these tests are about what Kafka adds: partitions, restarts, commits.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use alerts::config::{AlertsConfig, RuleConfig};
use alerts::engine::{Observation, Partition, Rule};
use embedded_brokers::KafkaCluster;
use prost::Message as _;
use proto::vigil::alerts::v1::Alert;
use proto::vigil::scoring::v1::Score;
use rdkafka::producer::FutureRecord;
use test_support::kafka::{produce, producer, read_to_end, read_topic};
use test_support::{Endpoint, eventually, observe_until};
use tokio::sync::oneshot;

const PARTITIONS: i32 = 3;

/// One score to produce: (partition, device, event time in s, anomalous).
type Planned = (i32, String, f64, bool);

fn rules() -> Vec<RuleConfig> {
    vec![
        // The seed's emergency rule: more than 3 anomalies in 5 minutes (here 60 s, 3+).
        RuleConfig {
            name: "repeated".into(),
            window_seconds: 60,
            advance_seconds: None,
            allowed_lateness_seconds: 5,
            min_anomalies: Some(3),
            min_readings: None,
            mean_score_above: None,
            max_score_above: None,
        },
        // Hopping: mean score over 1.5 in 30 s windows every 10 s.
        RuleConfig {
            name: "hot".into(),
            window_seconds: 30,
            advance_seconds: Some(10),
            allowed_lateness_seconds: 0,
            min_anomalies: None,
            min_readings: Some(2),
            mean_score_above: Some(1.5),
            max_score_above: None,
        },
    ]
}

fn config(kafka: &KafkaCluster, group: &str, topics: &Topics) -> AlertsConfig {
    let mut config = AlertsConfig { rules: rules(), ..AlertsConfig::default() };
    config.kafka.insert("bootstrap.servers".into(), kafka.bootstrap_servers().into());
    config.kafka.insert("session.timeout.ms".into(), "6000".into());
    config.kafka.insert("heartbeat.interval.ms".into(), "500".into());
    config.group_id = group.into();
    config.scores_topic = topics.scores.clone();
    config.alerts_topic = topics.alerts.clone();
    config.changelog_topic = topics.changelog.clone();
    config.dead_letter_topic = topics.dead_letters.clone();
    config.commit_interval_ms = 100;
    config.admin_listen.clear();
    config
}

struct Topics {
    scores: String,
    alerts: String,
    changelog: String,
    dead_letters: String,
}

impl Topics {
    fn create(kafka: &KafkaCluster, tag: &str) -> Self {
        let topics = Self {
            scores: format!("{tag}.scores"),
            alerts: format!("{tag}.alerts"),
            changelog: format!("{tag}.changelog"),
            dead_letters: format!("{tag}.dead-letters"),
        };
        kafka.create_topic(&topics.scores, PARTITIONS).unwrap();
        kafka.create_topic(&topics.changelog, PARTITIONS).unwrap();
        kafka.create_topic(&topics.alerts, 1).unwrap();
        kafka.create_topic(&topics.dead_letters, 1).unwrap();
        topics
    }

    /// Fresh output topics over the same scores: a replay from scratch.
    fn replay(kafka: &KafkaCluster, of: &Topics, tag: &str) -> Self {
        let topics = Self {
            scores: of.scores.clone(),
            alerts: format!("{tag}.alerts"),
            changelog: format!("{tag}.changelog"),
            dead_letters: format!("{tag}.dead-letters"),
        };
        kafka.create_topic(&topics.changelog, PARTITIONS).unwrap();
        kafka.create_topic(&topics.alerts, 1).unwrap();
        kafka.create_topic(&topics.dead_letters, 1).unwrap();
        topics
    }
}

struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), alerts::AlertsError>>,
    admin: Endpoint,
}

impl Running {
    /// A static member gets an instance id of its own unless the config names one (the
    /// host name would make two instances of one test fence each other).
    fn start(mut config: AlertsConfig) -> Self {
        if config.static_membership && config.group_instance_id.is_empty() {
            config.group_instance_id = test_support::unique_name("alerts");
        }
        let (stop, stopped) = oneshot::channel();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let admin = Endpoint::new(listener.local_addr().unwrap());
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let task = tokio::spawn(alerts::run(config, alerts::Listeners { admin: Some(listener) }, async {
            let _ = stopped.await;
        }));
        Self { stop, task, admin }
    }

    async fn metric(&self, name: &str) -> f64 {
        self.admin.metric_sum(name).await
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.task).await.expect("stops").unwrap().unwrap();
    }
}

fn score(device: &str, seconds: f64, anomalous: bool) -> Score {
    Score {
        device_id: device.into(),
        event_time: Some(prost_types::Timestamp {
            seconds: 1_780_000_000 + seconds.floor() as i64,
            nanos: ((seconds.fract()) * 1e9) as i32,
        }),
        score: if anomalous { 2.5 } else { 0.4 },
        threshold: 1.0,
        is_anomaly: anomalous,
        model_name: "car-anomaly".into(),
        model_version: 2,
        ..Default::default()
    }
}

/// Writes `planned` to `topic`, each score on its partition, keyed by its device, with its
/// reading's time as the Kafka timestamp (as the processor writes scores).
async fn produce_scores(kafka: &KafkaCluster, topic: &str, planned: &[Planned]) {
    let payloads: Vec<Vec<u8>> = planned
        .iter()
        .map(|(_, device, seconds, anomalous)| score(device, *seconds, *anomalous).encode_to_vec())
        .collect();
    let records = planned
        .iter()
        .zip(&payloads)
        .map(|((partition, device, seconds, _), payload)| {
            FutureRecord::<str, [u8]>::to(topic)
                .partition(*partition)
                .key(device.as_str())
                .payload(payload.as_slice())
                .timestamp(((1_780_000_000.0 + seconds) * 1000.0) as i64)
        })
        .collect();
    produce(&producer(kafka), records).await;
}

/// A fleet on three partitions: per partition some devices with anomalies in various
/// windows, then a tick well later that closes every window.
fn plan(from: f64, to: f64, ticks: bool) -> Vec<Planned> {
    let mut planned = Vec::new();
    for partition in 0..PARTITIONS {
        let mut t = from;
        while t < to {
            for car in 0..3 {
                // Each car has its own rhythm of anomalies.
                let anomalous = ((t as i64) / 7 + i64::from(car) + i64::from(partition)) % 3 != 0;
                planned.push((partition, format!("car-{partition}{car}"), t + f64::from(car) * 0.5, anomalous));
            }
            t += 6.0;
        }
        if ticks {
            planned.push((partition, format!("tick-{partition}"), to + 400.0, false));
        }
    }
    planned
}

/// The alerts the engine gives for `planned`, each partition's records in order.
fn expected(planned: &[Planned]) -> BTreeMap<String, Alert> {
    let rules: Arc<[Rule]> = rules().iter().map(Rule::new).collect();
    let mut out = BTreeMap::new();
    for partition in 0..PARTITIONS {
        let mut engine = Partition::new(rules.clone());
        for (offset, (_, device, seconds, anomalous)) in planned.iter().filter(|p| p.0 == partition).enumerate() {
            let score = score(device, *seconds, *anomalous);
            let t = score.event_time.unwrap();
            engine.apply(
                offset as i64,
                &Observation {
                    device_id: device,
                    event_time_ms: t.seconds * 1000 + i64::from(t.nanos / 1_000_000),
                    score: f64::from(score.score),
                    is_anomaly: anomalous.to_owned(),
                    model_version: 2,
                },
            );
        }
        out.extend(engine.take_alerts().into_iter().map(|a| (a.id.clone(), a)));
    }
    out
}

/// Waits for `count` alerts, then a little longer for any extra one; returns them all.
async fn alerts(kafka: &KafkaCluster, topic: &str, count: usize) -> Vec<Alert> {
    read_topic(kafka, topic, Duration::from_secs(60), move |r| r.len() >= count).await;
    // Room for a wrongful extra alert: there is no event to wait on for one that must
    // not come, so the read below also takes whatever arrives in its 3 s.
    tokio::time::sleep(Duration::from_millis(800)).await;
    read_topic(kafka, topic, Duration::from_secs(3), |_| false)
        .await
        .iter()
        .map(|r| {
            let alert = Alert::decode(r.payload.as_slice()).unwrap();
            assert_eq!(r.key.as_deref(), Some(alert.id.as_bytes()), "keyed by its id");
            alert
        })
        .collect()
}

fn by_id(alerts: Vec<Alert>) -> BTreeMap<String, Alert> {
    let mut out = BTreeMap::new();
    for alert in alerts {
        let id = alert.id.clone();
        assert!(out.insert(id.clone(), alert).is_none(), "alert {id} written twice");
    }
    out
}

/// A one-broker cluster with the service's topics, named after `name`.
fn cluster(name: &str) -> (KafkaCluster, Topics) {
    let kafka = KafkaCluster::start(1).unwrap();
    let topics = Topics::create(&kafka, name);
    (kafka, topics)
}

/// A run in two halves: in the first, windows open on every partition and none closes yet
/// (no tick); the second closes them. Also both together, per partition the first half's
/// records first, as they are produced.
fn two_halves() -> (Vec<Planned>, Vec<Planned>, Vec<Planned>) {
    let (first, second) = (plan(0.0, 90.0, false), plan(90.0, 240.0, true));
    let all = first.iter().chain(&second).cloned().collect();
    (first, second, all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_carry_their_windows_figures_and_unreadable_scores_are_dead_lettered() {
    let (kafka, topics) = cluster("figures");
    let planned = plan(0.0, 240.0, true);
    let want = expected(&planned);
    assert!(want.len() >= 10, "the plan fires both rules: {:?}", want.keys().collect::<Vec<_>>());
    assert!(want.keys().any(|id| id.contains("/hot/")) && want.keys().any(|id| id.contains("/repeated/")));

    let service = Running::start(config(&kafka, "figures", &topics));
    // Poison first: a score dated in the year 9999 would move partition 1's stream time
    // past every planned window (none would alert), and one for a device id of 300 KB.
    let far_future = score("car-from-9999", (253_402_300_799i64 - 1_780_000_000) as f64, true).encode_to_vec();
    let huge_id = Score { device_id: "x".repeat(300_000), ..score("car-huge", 1.0, true) }.encode_to_vec();
    let poison = vec![
        FutureRecord::<str, [u8]>::to(&topics.scores).partition(1).key("car-from-9999").payload(far_future.as_slice()),
        FutureRecord::<str, [u8]>::to(&topics.scores).partition(2).key("car-huge").payload(huge_id.as_slice()),
    ];
    produce(&producer(&kafka), poison).await;
    produce_scores(&kafka, &topics.scores, &planned).await;
    let odd = FutureRecord::<str, [u8]>::to(&topics.scores).partition(1).key("odd").payload(&b"\xff not a score"[..]);
    produce(&producer(&kafka), vec![odd]).await;

    let got = by_id(alerts(&kafka, &topics.alerts, want.len()).await);
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    assert_eq!(got, want, "every alert with the engine's figures");
    let sample = got.values().find(|a| a.rule == "repeated").unwrap();
    assert!(sample.anomalies >= 3 && sample.readings >= sample.anomalies);
    assert_eq!(sample.condition, "anomalies >= 3");
    assert_eq!(sample.model_versions, vec![2]);

    let dead = read_topic(&kafka, &topics.dead_letters, Duration::from_secs(20), |r| r.len() >= 3).await;
    let reason = |payload: &[u8]| {
        let letter = dead.iter().find(|r| r.payload == payload).expect("dead-lettered with its original bytes");
        String::from_utf8_lossy(letter.header("vigil.dead_letter.reason").unwrap()).into_owned()
    };
    assert_eq!(dead.len(), 3, "{:?}", dead.iter().map(|r| r.header("vigil.dead_letter.reason")).collect::<Vec<_>>());
    let odd = dead.iter().find(|r| r.payload == b"\xff not a score").expect("the original bytes");
    assert_eq!(odd.header("vigil.dead_letter.reason"), Some(&b"not_a_score"[..]));
    assert_eq!(odd.header("vigil.dead_letter.source_partition"), Some(&b"1"[..]));
    assert_eq!(reason(far_future.as_slice()), "implausible_event_time");
    assert_eq!(reason(huge_id.as_slice()), "device_id_too_long");
    assert_eq!(service.metric("alerts_dead_lettered_total").await, 3.0);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_kafka_refuses_for_good_is_dead_lettered_and_the_others_still_fire() {
    let (kafka, topics) = cluster("refused");
    let planned = plan(0.0, 240.0, true);
    let want: BTreeMap<String, Alert> =
        expected(&planned).into_iter().filter(|(id, _)| id.contains("/repeated/")).collect();
    assert!(!want.is_empty());
    let mut config = config(&kafka, "refused", &topics);
    // A copy of `repeated` under a 300-character name: its alerts (the name is in the id,
    // the rule and a header) exceed 1,000 bytes, the record limit set here, and are refused
    // for good; everything else stays under it.
    let long = RuleConfig { name: "r".repeat(300), ..rules()[0].clone() };
    config.rules = vec![rules()[0].clone(), long];
    config.kafka.insert("message.max.bytes".into(), "1000".into());
    let service = Running::start(config);
    produce_scores(&kafka, &topics.scores, &planned).await;

    let got = by_id(alerts(&kafka, &topics.alerts, want.len()).await);
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "the other rule's alerts all fire");
    let dead = read_topic(&kafka, &topics.dead_letters, Duration::from_secs(30), move |r| r.len() >= want.len()).await;
    assert_eq!(dead.len(), got.len(), "one dead letter per refused alert");
    for letter in &dead {
        assert_eq!(letter.header("vigil.dead_letter.reason"), Some(&b"record_too_large"[..]));
        assert_eq!(letter.header("vigil.dead_letter.target_topic"), Some(topics.alerts.as_bytes()));
        assert!(letter.key.as_deref().is_some_and(|id| id.windows(300).any(|w| w == "r".repeat(300).as_bytes())));
    }
    assert_eq!(service.metric("alerts_dead_lettered_total").await, dead.len() as f64);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_restart_redelivery_fires_nothing_twice_and_a_replay_gives_the_same_alerts() {
    let (kafka, topics) = cluster("restart");
    let (first, second, all) = two_halves();
    let want = expected(&all);

    let service = Running::start(config(&kafka, "restart", &topics));
    produce_scores(&kafka, &topics.scores, &first).await;
    // Some alerts of the first half's closed windows may be out already; wait until the
    // service has read everything, then stop it (it writes its state and commits).
    let applied = async || {
        let changelog = read_to_end(&kafka, &topics.changelog).await;
        (0..PARTITIONS)
            .filter_map(|p| {
                changelog.iter().rev().find(|r| r.partition == p && r.key.as_deref() == Some(b"p")).map(|r| {
                    proto::vigil::alerts::v1::PartitionProgress::decode(r.payload.as_slice()).unwrap().applied_offset
                        + 1
                })
            })
            .sum::<i64>()
    };
    let progress = observe_until(Duration::from_secs(60), applied, |progress| *progress as usize == first.len()).await;
    assert_eq!(progress as usize, first.len(), "the first half was not applied: {progress} of {}", first.len());
    service.stop().await;

    // Restarted: the second half, on the state the first instance left.
    let service = Running::start(config(&kafka, "restart", &topics));
    produce_scores(&kafka, &topics.scores, &second).await;
    let got = by_id(alerts(&kafka, &topics.alerts, want.len()).await);
    assert_eq!(got, want, "the same alerts as one uninterrupted run");
    let spanning =
        want.values().filter(|a| (60..90).contains(&(a.window_start.unwrap().seconds - 1_780_000_000))).count();
    assert!(spanning > 0, "some windows straddle the restart");
    service.stop().await;

    // A new group reads every score again (a redelivery of everything) on the same state:
    // nothing fires again.
    let service = Running::start(config(&kafka, "restart-redelivered", &topics));
    eventually(Duration::from_secs(60), "the new group to read every score again", async || {
        service.metric("alerts_scores_skipped_total").await >= all.len() as f64
    })
    .await;
    let after = alerts(&kafka, &topics.alerts, want.len()).await;
    assert_eq!(after.len(), want.len(), "no alert written twice");
    service.stop().await;

    // A replay of the same scores into fresh state and fresh topics: the same alerts.
    let replay = Topics::replay(&kafka, &topics, "restart-replay");
    let service = Running::start(config(&kafka, "restart-replay", &replay));
    let replayed = by_id(alerts(&kafka, &replay.alerts, want.len()).await);
    assert_eq!(replayed, want, "deterministic: same ids, same figures");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_moves_state_with_its_partitions_and_every_alert_is_written_once() {
    let (kafka, topics) = cluster("rebalance");
    let (first, second, all) = two_halves();
    let want = expected(&all);

    let a = Running::start(config(&kafka, "rebalance", &topics));
    produce_scores(&kafka, &topics.scores, &first).await;
    eventually(Duration::from_secs(60), "a to read the first half", async || {
        a.metric("alerts_scores_consumed_total").await >= first.len() as f64
    })
    .await;
    let b = Running::start(config(&kafka, "rebalance", &topics));
    // b joins: partitions move, and both hold some once the rebalance is over.
    eventually(Duration::from_secs(60), "the partitions to be split between a and b", async || {
        let (on_a, on_b) = (a.metric("alerts_assigned_partitions").await, b.metric("alerts_assigned_partitions").await);
        on_a >= 1.0 && on_b >= 1.0 && on_a + on_b == f64::from(PARTITIONS)
    })
    .await;
    produce_scores(&kafka, &topics.scores, &second).await;
    let got = by_id(alerts(&kafka, &topics.alerts, want.len()).await);
    assert_eq!(got, want);
    assert!(a.metric("alerts_rebalances_total").await >= 2.0, "a gave partitions away");
    let (on_a, on_b) = (a.metric("alerts_assigned_partitions").await, b.metric("alerts_assigned_partitions").await);
    assert!(on_a >= 1.0 && on_b >= 1.0 && on_a + on_b == f64::from(PARTITIONS), "split: {on_a} + {on_b}");
    assert!(b.metric("alerts_restored_records_total").await > 0.0, "b restored what a had written");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changelog_without_the_scores_partitions_stops_the_start_naming_both() {
    let (kafka, topics) = cluster("mismatch");
    let mut config = config(&kafka, "mismatch", &topics);
    config.changelog_topic = "mismatch.changelog-one".into();
    kafka.create_topic(&config.changelog_topic, 1).unwrap();
    let error = alerts::run(config, alerts::Listeners { admin: None }, std::future::pending()).await.unwrap_err();
    let text = format!("{error:#}");
    assert!(
        text.contains("mismatch.changelog-one") && text.contains("has 1 partitions") && text.contains("3"),
        "{text}"
    );
}
