//! `vigil up`: the whole fleet in one process, each part talking to the others over its
//! real protocol on loopback, as in production:
//!
//! ```text
//!  device simulator ──MQTT 3.1.1──▶ MQTT broker ──MQTT 5──▶ ingest ──Kafka──▶ readings
//!   (fault injection)              (embedded rumqttd,                          │
//!        │                          or --mqtt-url)        stream processor ◀──┘
//!        └──MQTT 3.1.1 (--mqtt proxy: no broker)──────▶ ingest
//!                                                             │ gRPC Predict
//!  observer (live view, summary) ◀──Kafka── scores, anomalies ◀┘ model server
//!                    ▲                 │    (embedded mock cluster, or --kafka-brokers)
//!                    └──Kafka── alerts ◀── alerts service (window rules, changelog)
//! ```
//!
//! The model server loads every version of the model (unpinned requests go to the newest)
//! and keeps rollout state and events on the run's Kafka, so `vigil rollout` can roll a
//! canary out on the running fleet as it would on replicas in production.
//!
//! The end is ordered so the counts reconcile exactly: the simulator stops first (its
//! last readings acknowledged, which ingest does only once Kafka has them), then the run
//! waits until the processor has scored every reading the observer saw ingested, and only
//! then stops the services. The alerts service is stopped once it has read every score and
//! the observer has seen every alert it fired; windows still open then (alerts fire when a
//! window closes) are counted in the summary.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use alerts::config::{AlertsConfig, RuleConfig, ServiceConfig as _};
use anyhow::Context as _;
use device_simulator::fleet::FleetOptions;
use device_simulator::metrics::PublishMetrics;
use device_simulator::publish::{PublishOptions, Report as PublishReport, publish};

use crate::observe::{Observed, Observer};
use crate::summary::{Ending, Summary};
use crate::view::LiveView;

mod parts;

use parts::{
    Brokers, Ports, Service, ready, start_alerts, start_ingest, start_model_server, start_processor, versions_on_disk,
    wait_until,
};

/// What `vigil up` runs.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Until Ctrl-C when `None`.
    pub duration: Option<Duration>,
    pub cars: usize,
    pub seed: u64,
    /// Share of cars that develop a fault during the run.
    pub fault_share: f64,
    /// Time between two readings of a car (also the simulated time step).
    pub interval: Duration,
    /// External Kafka (bootstrap servers) instead of the embedded mock cluster.
    pub kafka_brokers: Option<String>,
    /// External MQTT broker (`mqtt://host:port`) instead of the embedded rumqttd.
    pub mqtt_url: Option<String>,
    /// Whether the cars publish to an MQTT broker that ingest subscribes to, or straight
    /// to ingest's MQTT proxy.
    pub mqtt: MqttMode,
    /// The model server's model (a directory of numbered SavedModel versions, all served).
    pub model_dir: PathBuf,
    /// How the stream processor scores (docs/stream-processor.md, "Three ways to score").
    pub scoring: Scoring,
    /// The model server's gRPC port on 127.0.0.1; 0 picks a free one.
    pub model_server_port: u16,
    /// The stream processor's gRPC port (ReplayService) on 127.0.0.1; 0 picks a free one.
    pub processor_grpc_port: u16,
    /// Print the live view (progress each second, anomalies and alerts as they come).
    pub live: bool,
    /// The alerts service's rules (default: [`demo_alert_rules`]).
    pub alert_rules: Vec<RuleConfig>,
}

/// Where the demo's cars publish.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MqttMode {
    /// To an MQTT broker (embedded rumqttd, or `--mqtt-url`), which ingest subscribes to
    /// (the default).
    #[default]
    Broker,
    /// Straight to ingest's MQTT proxy: no MQTT broker runs (docs/mqtt-proxy.md).
    Proxy,
}

/// How the demo's stream processor scores its readings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Scoring {
    /// Readings that arrive while calls are out go together in one Predict (the default).
    #[default]
    Batched,
    /// One Predict call per reading (`model.max_rows_per_call = 1`).
    PerReading,
    /// The model runs inside the processor (`model.mode = "embedded"`), from the same
    /// model directory; the model server still runs, for `vigil rollout` and clients.
    Embedded,
}

impl Default for UpOptions {
    fn default() -> Self {
        Self {
            duration: Some(Duration::from_secs(60)),
            cars: 50,
            seed: 42,
            fault_share: 0.3,
            // The cadence the bundled model was trained and evaluated on.
            interval: Duration::from_secs(1),
            kafka_brokers: None,
            mqtt_url: None,
            mqtt: MqttMode::default(),
            model_dir: bundled_model(),
            scoring: Scoring::default(),
            // TF Serving's, where `vigil rollout` looks by default.
            model_server_port: 8500,
            // The processor's own default, where `vigil replay` looks.
            processor_grpc_port: 50062,
            live: true,
            alert_rules: demo_alert_rules(),
        }
    }
}

/// The seed's emergency rule ("more than 3 anomalies in 5 minutes") at the pace of a
/// one-minute run of one reading a second per car: half of a car's readings anomalous in
/// 20-second windows. Sporadic false alarms never add up to that; a fault under way does.
pub fn demo_alert_rules() -> Vec<RuleConfig> {
    vec![RuleConfig {
        name: "repeated-anomalies".into(),
        window_seconds: 20,
        advance_seconds: None,
        allowed_lateness_seconds: 2,
        min_anomalies: Some(10),
        min_readings: None,
        mean_score_above: None,
        max_score_above: None,
    }]
}

/// Reads `rules` from a TOML file in the alerts service's own format (`[[rules]]`
/// tables; see docs/alerts.md); every other key is refused.
pub fn read_alert_rules(path: &Path) -> anyhow::Result<Vec<RuleConfig>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RulesFile {
        rules: Vec<RuleConfig>,
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: RulesFile = toml::from_str(&text).with_context(|| path.display().to_string())?;
    let config = AlertsConfig { rules: file.rules, ..AlertsConfig::default() };
    config.check().with_context(|| path.display().to_string())?;
    Ok(config.rules)
}

/// The anomaly model bundled in `deploy/models/`.
pub fn bundled_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/models/car-anomaly")
}

const MODEL_NAME: &str = "car-anomaly";

/// Simulated driving before the first published reading.
const WARM_UP: Duration = Duration::from_secs(600);

/// How long the pipeline may take to score what was published once the simulator stopped.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// How often the alerts service writes its alerts and state (its default).
const ALERTS_COMMIT_INTERVAL: Duration = Duration::from_millis(200);

/// What a run leaves: its summary, and what the observer saw (for checks beyond it).
pub struct Finished {
    pub summary: Summary,
    pub observed: Observed,
}

/// Runs the fleet until `options.duration` passes or `interrupt` resolves, then drains
/// and returns the summary.
pub async fn up(options: UpOptions, interrupt: impl Future<Output = ()>) -> anyhow::Result<Finished> {
    let run_id = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    let say = |line: String| {
        if options.live {
            println!("{line}");
        }
    };
    // First, so bad rules or a taken port fail the run before anything starts.
    AlertsConfig { rules: options.alert_rules.clone(), ..AlertsConfig::default() }
        .check()
        .context("the alert rules")?;
    let ports = Ports::bind(&options).await?;

    let mut brokers = Brokers::start(&options, run_id).await?;
    say(format!("Kafka:        {} at {}", brokers.kafka_name, brokers.kafka.bootstrap_servers()));
    say(format!("MQTT:         {}", brokers.mqtt.name));
    let model_server = start_model_server(&options, &brokers, run_id, ports.model_server, &say).await?;
    let (processor, processor_grpc) =
        start_processor(&options, &brokers, run_id, model_server.grpc, ports.processor).await?;
    let alerts_service = start_alerts(&options, &brokers, run_id, &say).await?;
    let ingest = start_ingest(&mut brokers, run_id).await?;
    say(format!(
        "ingest:       metrics {}/metrics; stream processor: metrics {}/metrics, gRPC {processor_grpc} (replays)",
        ingest.admin, processor.admin
    ));
    if let [.., older, _] = versions_on_disk(&options.model_dir)[..] {
        say(format!(
            "              try, after a minute: vigil replay --processor http://{processor_grpc} --from -1m \
             --version {older} --output-topic vigil-replay-v{older}"
        ));
    }

    // Wait until the pipeline is there: ingest subscribed, the processor owning the
    // readings' partitions (so its group starts at the first reading).
    wait_until(Duration::from_secs(60), "ingest and the stream processor to be ready", || async {
        ready(&ingest.admin).await
            && ready(&processor.admin).await
            && ready(&alerts_service.admin).await
            && metric(&processor.admin, "processor_assigned_partitions").await > 0.0
    })
    .await?;
    let observer = Observer::start(brokers.kafka.bootstrap_servers(), &brokers.topics)?;

    let started = Instant::now();
    let mut view = LiveView::new(options.live);
    let publish_metrics = PublishMetrics::new(&prometheus::Registry::new())?;
    let report =
        drive_fleet(&options, &brokers, run_id, interrupt, &publish_metrics, &observer, &mut view, &say).await?;
    let acknowledged = report.acknowledged;
    say(format!(
        "\nsimulator stopped: {} readings published, {acknowledged} acknowledged; draining the pipeline...",
        report.published
    ));
    let drained = drain(acknowledged, &observer, &mut view, started, &publish_metrics).await;
    let alerts = settle_alerts(drained, &alerts_service, &observer).await;
    view.tick(started, &publish_metrics, &observer);
    let elapsed = started.elapsed();

    let alerts_stopped = alerts_service.running.stop().await;
    let processor_stopped = processor.running.stop().await;
    let ingest_stopped = ingest.running.stop().await;
    let model_server_stopped = model_server.running.stop().await;
    let observed = observer.finish();
    let Brokers { kafka, kafka_name, mqtt, .. } = brokers;
    drop(kafka);
    drop(model_server._config_dir);
    let ending = Ending { elapsed, drained, alerts };
    let summary = Summary::new(&options, &report, &observed, &ending, &kafka_name, &mqtt.name);
    alerts_stopped?;
    processor_stopped?;
    ingest_stopped?;
    model_server_stopped?;
    Ok(Finished { summary, observed })
}

/// The simulated fleet, publishing until the run's time is up or `interrupt`: every car has
/// driven for WARM_UP before the run shows it (a short run would otherwise be mostly cold
/// starts), and faults begin early enough in the run to be seen. The live view ticks each
/// second meanwhile.
#[allow(clippy::too_many_arguments)] // each is one of the run's parts; a struct would only rename them
async fn drive_fleet(
    options: &UpOptions,
    brokers: &Brokers,
    run_id: u64,
    interrupt: impl Future<Output = ()>,
    publish_metrics: &PublishMetrics,
    observer: &Observer,
    view: &mut LiveView,
    say: &dyn Fn(String),
) -> anyhow::Result<PublishReport> {
    let seconds = options.duration.map_or(600.0, |d| d.as_secs_f64());
    let warm = WARM_UP.as_secs_f64();
    let fleet = FleetOptions {
        cars: options.cars,
        seed: options.seed,
        fault_share: options.fault_share,
        onset_window_s: (warm + seconds * 0.1, warm + seconds * 0.5),
        ..FleetOptions::default()
    };
    let mut publishing = PublishOptions::new(brokers.mqtt.host.clone(), brokers.mqtt.publish_port);
    // The embedded broker's 3.1.1 port (its MQTT 5 one is ingest's).
    publishing.version = device_simulator::publish::MqttVersion::V311;
    publishing.topic_prefix.clone_from(&brokers.mqtt_prefix);
    publishing.interval = options.interval;
    publishing.cars_per_connection = 10;
    publishing.client_id_prefix = format!("vigil-up-{run_id}");
    publishing.start = SystemTime::now().into();
    publishing.drain_timeout = Duration::from_secs(30);
    publishing.warm_up = WARM_UP;
    say(format!(
        "fleet:        {} cars, {} s between readings, {:.0}% develop a fault (kinds: {})",
        fleet.cars,
        options.interval.as_secs_f64(),
        fleet.fault_share * 100.0,
        fleet.fault_kinds.iter().map(|k| sensor::fault_name(*k)).collect::<Vec<_>>().join(", ")
    ));
    say(match options.duration {
        Some(d) => format!("running for {} s (Ctrl-C ends it sooner; the pipeline drains first)\n", d.as_secs()),
        None => "running until Ctrl-C (the pipeline drains first)\n".to_owned(),
    });
    let started = Instant::now();
    let stop_publishing = async {
        match options.duration {
            Some(duration) => tokio::select! {
                () = tokio::time::sleep(duration) => {}
                () = interrupt => {}
            },
            None => interrupt.await,
        }
    };
    let publishing = publish(&fleet, &publishing, publish_metrics, stop_publishing);
    tokio::pin!(publishing);
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            report = &mut publishing => return report.context("the device simulator"),
            _ = ticks.tick() => view.tick(started, publish_metrics, observer),
        }
    }
}

/// Waits until everything acknowledged (in Kafka, since ingest acknowledges only then) has
/// been observed and scored, for at most DRAIN_LIMIT; whether it was.
async fn drain(
    acknowledged: u64,
    observer: &Observer,
    view: &mut LiveView,
    started: Instant,
    publish_metrics: &PublishMetrics,
) -> bool {
    let drain_started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    let drained = loop {
        {
            let state = observer.state();
            if state.readings + state.dead_letters >= acknowledged && state.scored >= state.readings {
                break true;
            }
        }
        if drain_started.elapsed() > DRAIN_LIMIT {
            break false;
        }
        ticks.tick().await;
        view.tick(started, publish_metrics, observer);
    };
    view.tick(started, publish_metrics, observer);
    drained
}

/// The alerts service has read every score, and the observer has seen every alert it fired
/// (it writes them every commit interval); what it ended with.
async fn settle_alerts<E>(drained: bool, alerts: &Service<E>, observer: &Observer) -> AlertsOutcome {
    let settled = drained
        && wait_until(DRAIN_LIMIT, "the alerts service to read every score", || async {
            metric(&alerts.admin, "alerts_scores_consumed_total").await >= observer.state().score_records as f64
        })
        .await
        .is_ok()
        && {
            tokio::time::sleep(ALERTS_COMMIT_INTERVAL * 3).await;
            wait_until(Duration::from_secs(30), "the observer to see every alert", || async {
                metric(&alerts.admin, "alerts_fired_total").await as usize <= observer.state().alerts.len()
            })
            .await
            .is_ok()
        };
    AlertsOutcome {
        open_windows: metric(&alerts.admin, "alerts_open_windows").await as u64,
        late_readings: metric(&alerts.admin, "alerts_late_readings_total").await as u64,
        settled,
    }
}

/// How the alerts service ended the run.
#[derive(Debug, Clone, Copy)]
pub struct AlertsOutcome {
    /// Windows still open when the run ended: alerts fire only when a window closes.
    pub open_windows: u64,
    /// Readings that came after their window had closed (not counted in it).
    pub late_readings: u64,
    /// It read every score and the observer saw every alert it fired.
    pub settled: bool,
}

/// A rule in words: "anomalies >= 10 in 20 s tumbling windows (2 s lateness)".
pub fn describe_rule(rule: &RuleConfig) -> String {
    let windows = match rule.advance_seconds {
        Some(advance) if advance != rule.window_seconds => format!("hopping every {advance} s"),
        _ => "tumbling".to_owned(),
    };
    format!(
        "{} in {} s {windows} windows ({} s lateness)",
        alerts::engine::Rule::new(rule).condition(),
        rule.window_seconds,
        rule.allowed_lateness_seconds
    )
}

/// An unlabelled metric's value, or the sum over a labelled one's series (0 if absent).
pub async fn metric(admin: &str, name: &str) -> f64 {
    let Ok(response) = reqwest::get(format!("{admin}/metrics")).await else { return 0.0 };
    admin::metric_sum(&response.text().await.unwrap_or_default(), name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_rules_come_from_a_file_of_rules_and_bad_ones_are_refused_naming_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let good = write(
            "good.toml",
            "[[rules]]\nname = \"hot\"\nwindow_seconds = 30\nadvance_seconds = 10\nmean_score_above = 2.0\n",
        );
        let rules = read_alert_rules(&good).unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(
            (rules[0].name.as_str(), rules[0].advance_seconds, rules[0].mean_score_above),
            ("hot", Some(10), Some(2.0))
        );
        assert_eq!(describe_rule(&rules[0]), "mean score > 2 in 30 s hopping every 10 s windows (0 s lateness)");
        assert_eq!(describe_rule(&demo_alert_rules()[0]), "anomalies >= 10 in 20 s tumbling windows (2 s lateness)");

        let error = |path: &Path| format!("{:#}", read_alert_rules(path).unwrap_err());
        let other_key = write(
            "other.toml",
            "alerts_topic = \"x\"\n[[rules]]\nname = \"a\"\nwindow_seconds = 5\nmin_anomalies = 1\n",
        );
        assert!(
            error(&other_key).contains("other.toml") && error(&other_key).contains("alerts_topic"),
            "{}",
            error(&other_key)
        );
        let no_window = write("zero.toml", "[[rules]]\nname = \"a\"\nwindow_seconds = 0\nmin_anomalies = 1\n");
        assert!(
            error(&no_window).contains("zero.toml") && error(&no_window).contains("window_seconds"),
            "{}",
            error(&no_window)
        );
        assert!(error(&dir.path().join("missing.toml")).contains("missing.toml"));
    }

    #[test]
    fn the_rollout_hint_reads_the_bundled_models_versions() {
        assert_eq!(versions_on_disk(&bundled_model()), [1, 2, 3]);
        assert!(versions_on_disk(Path::new("/nonexistent")).is_empty());
    }
}
