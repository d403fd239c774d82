//! The run itself: topics created up front, the services started and ready, the fleet
//! publishing, then each service killed and restarted in turn once the stream has got
//! observably far (a share of the readings written or scored, so the kills land while
//! readings flow however fast this machine is), the poison injected after the last
//! restart (a restarted service's counters start again from zero, and the final ones must
//! count the dead letters), and the end awaited: every reading scored, the alerts service
//! caught up with the scores, every poison record dead-lettered.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use device_simulator::fleet::FleetOptions;
use rdkafka::ClientConfig;
use test_support::{Poll, Tail, TempFile};

use super::accounting::{CountRule, Kill, ReadingId};
use super::poison::{self, Injection};
use super::processes::{Launch, ModelServer, Service, Simulator, SimulatorReport, printed_config};
use super::topics::{
    ALERT_DEAD_LETTERS, ALERTS, ANOMALIES, CHANGELOG, INGEST_DEAD_LETTERS, READINGS, SCORES, SCORING_DEAD_LETTERS,
};

/// Partitions of the readings, scores and anomalies topics.
const PARTITIONS: usize = 4;
/// The fleet: 100 cars, each its own MQTT client, 5 readings a second each for 20 s.
const CARS: usize = 100;
const READINGS_PER_CAR: u64 = 100;
const INTERVAL: Duration = Duration::from_millis(200);
/// How far the stream has got (a share of the fleet's readings) when each fault comes.
const KILL_INGEST_AT: f64 = 0.15;
const KILL_PROCESSOR_AT: f64 = 0.30;
const KILL_MODEL_SERVER_AT: f64 = 0.50;
const KILL_ALERTS_AT: f64 = 0.65;
const POISON_AT: f64 = 0.75;
/// How long any one stage may take before the run is declared stuck.
const STAGE: Duration = Duration::from_secs(90);

/// The bounds the services' defaults give (their `--print-config`).
pub(crate) struct Limits {
    pub(crate) partitions: usize,
    pub(crate) processor_in_flight_per_partition: usize,
    pub(crate) ingest_in_flight: usize,
    /// Ingest's limit on an MQTT payload.
    pub(crate) ingest_max_payload_bytes: usize,
}

impl Limits {
    fn of_the_defaults() -> Self {
        let (processor, ingest) = (printed_config("stream-processor"), printed_config("ingest"));
        let number = |config: &toml::Table, path: &[&str]| -> usize {
            let mut value = config.get(path[0]);
            for key in &path[1..] {
                value = value.and_then(|v| v.get(key));
            }
            let value = value.and_then(toml::Value::as_integer).unwrap_or_else(|| panic!("no {path:?} in {config}"));
            usize::try_from(value).expect("a count")
        };
        Self {
            partitions: PARTITIONS,
            processor_in_flight_per_partition: number(&processor, &["max_in_flight_per_partition"]),
            ingest_in_flight: number(&ingest, &["max_in_flight"]),
            ingest_max_payload_bytes: number(&ingest, &["mqtt", "max_payload_bytes"]),
        }
    }
}

/// The services started, ready, and the topics followed.
pub(crate) struct Pipeline {
    kafka: String,
    mqtt: String,
    tail: Tail,
    model: ModelServer,
    ingest: (Launch, Service),
    processor: (Launch, Service),
    alerts: (Launch, Service),
    _alert_rules: TempFile,
    rule: CountRule,
    limits: Limits,
    /// From start to the first partitions assigned: (processor, alerts).
    first_assignment: (Duration, Duration),
}

/// What was measured besides the topics' contents.
pub(crate) struct Figures {
    pub(crate) fleet: FleetOptions,
    pub(crate) report: SimulatorReport,
    pub(crate) limits: Limits,
    pub(crate) first_assignment: (Duration, Duration),
    pub(crate) kills: Vec<Kill>,
    /// From the alerts service's restart until it consumed a score again.
    pub(crate) alerts_recovery: Option<Duration>,
    pub(crate) rule: CountRule,
}

pub(crate) struct Outcome {
    pub(crate) figures: Figures,
    pub(crate) tail: Tail,
    /// Problems found while running (stages that did not finish, poison not caught).
    pub(crate) failures: Vec<String>,
    pub(crate) poison_lines: Vec<String>,
    /// Each alerts changelog partition: the records consumed against the end tansu reports.
    pub(crate) changelog_lines: Vec<String>,
    /// When the poison was injected.
    pub(crate) poison_at: SystemTime,
    pub(crate) fleet_started: SystemTime,
    /// How long the fleet published.
    pub(crate) publishing: Duration,
    pub(crate) readings_per_car: u64,
}

impl Outcome {
    /// Every reading the fleet sent: its cars' ids (the simulator's) with sequences from 1.
    pub(crate) fn expected_readings(&self) -> BTreeSet<ReadingId> {
        let fleet = &self.figures.fleet;
        (0..fleet.cars)
            .flat_map(|car| {
                let device = device_simulator::fleet::car(fleet, car).device_id;
                (1..=self.readings_per_car).map(move |sequence| (device.clone(), sequence))
            })
            .collect()
    }
}

pub(crate) fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run tests/system/pipeline_faults.sh"))
}

fn fleet() -> FleetOptions {
    // Faults begin within the run's first seconds, so windows fill with anomalies.
    FleetOptions { cars: CARS, seed: 25, fault_share: 0.3, onset_window_s: (2.0, 8.0), ..FleetOptions::default() }
}

impl Pipeline {
    pub(crate) async fn start() -> Self {
        let (kafka, mqtt) = (env("VIGIL_TANSU_BROKERS"), env("VIGIL_MOSQUITTO_URL"));
        create_topics(&kafka).await;
        let tail = Tail::start(
            &kafka,
            &[READINGS, SCORES, INGEST_DEAD_LETTERS, SCORING_DEAD_LETTERS, ALERTS, ALERT_DEAD_LETTERS],
        );
        let limits = Limits::of_the_defaults();
        // The seed's rule ("more than 3 anomalies in 5 minutes") at the pace of a 20 s run.
        let rule =
            CountRule { name: "repeated-anomalies".into(), window_ms: 5_000, lateness_ms: 1_000, min_anomalies: 5 };
        let alert_rules = test_support::temp_file(
            "alerts.toml",
            &format!(
                "[[rules]]\nname = \"{}\"\nwindow_seconds = {}\nallowed_lateness_seconds = {}\nmin_anomalies = {}\n",
                rule.name,
                rule.window_ms / 1000,
                rule.lateness_ms / 1000,
                rule.min_anomalies
            ),
        );

        let model = ModelServer::start(0);
        model.rest.wait_ready("the model server", STAGE).await;
        let launches = (
            Launch::ingest(&kafka, &mqtt),
            Launch::processor(&kafka, model.grpc),
            Launch::alerts(&kafka, &alert_rules.path),
        );
        let started = Instant::now();
        let (processor, alerts, ingest) = (launches.1.start(), launches.2.start(), launches.0.start());
        let first_assignment = first_assignments(&processor, &alerts, started).await;
        ingest.admin.wait_ready("ingest", STAGE).await;
        Self {
            kafka,
            mqtt,
            tail,
            model,
            ingest: (launches.0, ingest),
            processor: (launches.1, processor),
            alerts: (launches.2, alerts),
            _alert_rules: alert_rules,
            rule,
            limits,
            first_assignment,
        }
    }

    pub(crate) async fn run_with_faults(mut self) -> Outcome {
        let fleet = fleet();
        let total = (CARS as u64 * READINGS_PER_CAR) as f64;
        let fleet_started = SystemTime::now();
        let publishing_since = Instant::now();
        let simulator = Simulator::start(&self.mqtt, &fleet, READINGS_PER_CAR, INTERVAL);
        let mut kills = Vec::new();

        self.progress(READINGS, total * KILL_INGEST_AT).await;
        let (launch, running) = self.ingest;
        let (ingest, kill) = restart(&launch, running);
        self.ingest = (launch, ingest);
        kills.push(kill);

        self.progress(SCORES, total * KILL_PROCESSOR_AT).await;
        let (launch, running) = self.processor;
        let (processor, kill) = restart(&launch, running);
        self.processor = (launch, processor);
        kills.push(kill);

        self.progress(SCORES, total * KILL_MODEL_SERVER_AT).await;
        let port = self.model.grpc.port();
        let killed_at = self.model.kill();
        self.model = ModelServer::start(port);
        kills.push(Kill { service: "model server", killed_at, restarted_at: self.model.started_at });

        self.progress(SCORES, total * KILL_ALERTS_AT).await;
        let (launch, running) = self.alerts;
        let (alerts, kill) = restart(&launch, running);
        let alerts_recovery = consuming_again(&alerts);
        self.alerts = (launch, alerts);
        kills.push(kill);

        self.progress(SCORES, total * POISON_AT).await;
        let template = device_simulator::fleet::Fleet::new(&fleet, SystemTime::now().into()).step(1.0).remove(0);
        let grpc = self.ingest.1.grpc.expect("ingest serves gRPC");
        let injection =
            poison::inject(&self.mqtt, &self.kafka, grpc, &template, self.limits.ingest_max_payload_bytes).await;

        let report =
            tokio::task::spawn_blocking(move || simulator.finish(STAGE)).await.expect("the simulator's report");
        let publishing = publishing_since.elapsed();
        let mut failures = Vec::new();
        self.wait_for_the_end(&injection, &mut failures).await;
        let (poison_lines, poison_failures) =
            injection.check(&self.tail, &self.ingest.1, &self.processor.1, &self.alerts.1).await;
        failures.extend(poison_failures);
        let alerts_recovery = alerts_recovery.await.expect("the alerts recovery probe");
        let changelog_lines = changelog_ends(&self.kafka).await;
        Outcome {
            figures: Figures {
                fleet,
                report,
                limits: self.limits,
                first_assignment: self.first_assignment,
                kills,
                alerts_recovery,
                rule: self.rule,
            },
            tail: self.tail,
            failures,
            poison_lines,
            changelog_lines,
            poison_at: injection.at,
            fleet_started,
            publishing,
            readings_per_car: READINGS_PER_CAR,
        }
    }

    /// Waits until `topic` holds `records` records.
    async fn progress(&self, topic: &str, records: f64) {
        let what = format!("{records:.0} records on {topic}");
        Poll::within(STAGE)
            .every(Duration::from_millis(100))
            .until(&what, async || self.tail.count(topic) as f64 >= records)
            .await;
    }

    /// Waits until every reading is scored, the alerts service has committed every score
    /// record (it commits only what it wrote the alerts and state of), and every poison
    /// record is dead-lettered; notes a wait that ran out instead of failing at once, so
    /// the figures are still printed.
    async fn wait_for_the_end(&self, injection: &Injection, failures: &mut Vec<String>) {
        let expected = CARS * READINGS_PER_CAR as usize;
        let poll = Poll::within(STAGE).every(Duration::from_millis(500));
        let scored = poll
            .observe(
                async || self.tail.with(SCORES, |records| super::accounting::scores(records).distinct.len()),
                |n| *n >= expected,
            )
            .await;
        if scored < expected {
            failures.push(format!("after {STAGE:?}, {scored} of {expected} readings scored"));
        }
        let caught_up = poll.observe(async || self.alerts_behind().await, BTreeMap::is_empty).await;
        if !caught_up.is_empty() {
            failures.push(format!("after {STAGE:?}, the alerts service has not committed the scores: {caught_up:?}"));
        }
        let poll = Poll::within(Duration::from_secs(30)).every(Duration::from_millis(500));
        if !poll.observe(async || injection.all_dead_lettered(&self.tail), |done| *done).await {
            failures.push("after 30 s, some poison records are not dead letters yet".into());
        }
    }

    /// Scores partitions whose records the alerts service's group has not all committed:
    /// partition -> (committed, records read).
    async fn alerts_behind(&self) -> BTreeMap<i32, (Option<i64>, i64)> {
        let ends: BTreeMap<i32, i64> = self.tail.with(SCORES, |records| {
            let mut ends = BTreeMap::new();
            for record in records {
                let end = ends.entry(record.record.partition).or_insert(0);
                *end = (*end).max(record.record.offset + 1);
            }
            ends
        });
        let (kafka, group) = (self.kafka.clone(), alerts::config::AlertsConfig::default().group_id);
        let partitions = PARTITIONS as i32;
        let committed = tokio::task::spawn_blocking(move || {
            test_support::kafka::committed_offsets(&kafka, &group, SCORES, partitions)
        })
        .await
        .expect("the committed offsets");
        ends.into_iter()
            .filter(|(partition, end)| committed.get(partition) != Some(end))
            .map(|(partition, end)| (partition, (committed.get(&partition).copied(), end)))
            .collect()
    }
}

/// Creates the topics with [`PARTITIONS`] partitions (dead letters and alerts with one),
/// as an operator would before starting the services. The alerts changelog is left to the
/// alerts service, which makes it like the scores topic.
async fn create_topics(kafka: &str) {
    let config = ClientConfig::new().set("bootstrap.servers", kafka).clone();
    let partitioned = [READINGS, SCORES, ANOMALIES].map(|topic| (topic, PARTITIONS as i32));
    let single = [INGEST_DEAD_LETTERS, SCORING_DEAD_LETTERS, ALERTS, ALERT_DEAD_LETTERS].map(|topic| (topic, 1));
    for (topic, partitions) in partitioned.into_iter().chain(single) {
        let spec = kafka::TopicSpec { partitions, compacted: false };
        let ensured =
            kafka::ensure_topic(&config, topic, spec).await.unwrap_or_else(|e| panic!("creating {topic}: {e}"));
        assert_eq!(ensured.partitions, partitions as usize, "{topic} on {kafka}");
    }
}

/// Each partition of the alerts changelog: the end its records, consumed, show against the
/// end tansu reports (its high watermark). The alerts service restores a partition's state
/// by reading it to that watermark (`kafka::read_partition_to_end`), so a watermark short
/// of the records means a restore that stops early.
async fn changelog_ends(kafka: &str) -> Vec<String> {
    let tail = Tail::start(kafka, &[CHANGELOG]);
    // Read until two looks a second apart find nothing new.
    let mut seen = usize::MAX;
    let poll = Poll::within(Duration::from_secs(30)).every(Duration::from_secs(1));
    poll.observe(
        async || {
            let (before, now) = (seen, tail.count(CHANGELOG));
            seen = now;
            before == now && now > 0
        },
        |settled| *settled,
    )
    .await;
    let consumed: BTreeMap<i32, i64> = tail.with(CHANGELOG, |records| {
        let mut ends = BTreeMap::new();
        for record in records {
            let end = ends.entry(record.record.partition).or_insert(0);
            *end = (*end).max(record.record.offset + 1);
        }
        ends
    });
    let servers = kafka.to_owned();
    let reported = tokio::task::spawn_blocking(move || test_support::kafka::end_offsets(&servers, CHANGELOG))
        .await
        .expect("the changelog's watermarks");
    reported
        .into_iter()
        .map(|(partition, watermark)| {
            let records = consumed.get(&partition).copied().unwrap_or_default();
            let short =
                if watermark < records { " (short: restores read on to the end-of-partition event)" } else { "" };
            format!("partition {partition}: records end at offset {records}, tansu's high watermark {watermark}{short}")
        })
        .collect()
}

/// SIGKILL, then the same service started again at once.
fn restart(launch: &Launch, running: Service) -> (Service, Kill) {
    let killed_at = running.kill();
    let restarted = launch.start();
    let kill = Kill { service: launch.name, killed_at, restarted_at: restarted.started_at };
    (restarted, kill)
}

/// How long after `alerts` started it consumed its first score (None: not within a stage).
fn consuming_again(alerts: &Service) -> tokio::task::JoinHandle<Option<Duration>> {
    let (admin, started_at) = (alerts.admin.clone(), alerts.started_at);
    // A loop rather than `Poll`: its async closure borrowing the endpoint is not `Send`
    // for every lifetime, which a spawned task needs.
    tokio::spawn(async move {
        let deadline = Instant::now() + STAGE;
        while Instant::now() < deadline {
            if admin.metric_sum("alerts_scores_consumed_total").await > 0.0 {
                return Some(started_at.elapsed().unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    })
}

/// How long after `started` the processor and the alerts service each first had
/// partitions (their group's first assignment).
async fn first_assignments(processor: &Service, alerts: &Service, started: Instant) -> (Duration, Duration) {
    let (mut processor_at, mut alerts_at) = (None, None);
    let deadline = started + STAGE;
    while (processor_at.is_none() || alerts_at.is_none()) && Instant::now() < deadline {
        if processor_at.is_none() && processor.metric("processor_assigned_partitions", &[]).await > 0.0 {
            processor_at = Some(started.elapsed());
        }
        if alerts_at.is_none() && alerts.metric("alerts_assigned_partitions", &[]).await > 0.0 {
            alerts_at = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (Some(processor_at), Some(alerts_at)) = (processor_at, alerts_at) else {
        panic!("no partitions within {STAGE:?}: processor {processor_at:?}, alerts {alerts_at:?}");
    };
    (processor_at, alerts_at)
}
