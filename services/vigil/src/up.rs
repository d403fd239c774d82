//! `vigil up`: the whole fleet in one process, each part talking to the others over its
//! real protocol on loopback, as in production:
//!
//! ```text
//!  device simulator ──MQTT 3.1.1──▶ MQTT broker ──MQTT 5──▶ ingest ──Kafka──▶ readings
//!   (fault injection)              (embedded rumqttd,                          │
//!                                   or --mqtt-url)        stream processor ◀──┘
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
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use alerts::config::{AlertsConfig, RuleConfig};
use anyhow::{Context as _, bail};
use clap::Parser as _;
use device_simulator::fleet::FleetOptions;
use device_simulator::metrics::PublishMetrics;
use device_simulator::publish::{PublishOptions, publish};
use embedded_brokers::{KafkaCluster, KafkaUnderTest, MqttBroker};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::observe::{Observed, Observer, Topics};
use crate::summary::{Ending, Summary};
use crate::view::LiveView;

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
    /// The model server's model (a directory of numbered SavedModel versions, all served).
    pub model_dir: PathBuf,
    /// The model server's gRPC port on 127.0.0.1; 0 picks a free one.
    pub model_server_port: u16,
    /// The stream processor's gRPC port (ReplayService) on 127.0.0.1; 0 picks a free one.
    pub processor_grpc_port: u16,
    /// Print the live view (progress each second, anomalies and alerts as they come).
    pub live: bool,
    /// The alerts service's rules (default: [`demo_alert_rules`]).
    pub alert_rules: Vec<RuleConfig>,
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
            model_dir: bundled_model(),
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

/// Where the MQTT side is: the simulator publishes with MQTT 3.1.1, ingest reads with 5.
struct Mqtt {
    host: String,
    publish_port: u16,
    ingest_url: String,
    name: String,
}

/// A service running in this process until its stop is sent.
struct Running<E> {
    name: &'static str,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), E>>,
}

impl<E: std::fmt::Display> Running<E> {
    fn spawn<F>(name: &'static str, run: impl FnOnce(oneshot::Receiver<()>) -> F) -> Self
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Send + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        Self { name, stop, task: tokio::spawn(run(stopped)) }
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => bail!("{}: {error}", self.name),
            Err(error) => bail!("{}: {error}", self.name),
        }
    }
}

async fn until(stopped: oneshot::Receiver<()>) {
    let _ = stopped.await;
}

async fn loopback() -> anyhow::Result<TcpListener> {
    TcpListener::bind("127.0.0.1:0").await.context("binding a loopback port")
}

fn address(listener: &TcpListener) -> anyhow::Result<SocketAddr> {
    listener.local_addr().context("a listener's address")
}

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
    let grpc = TcpListener::bind(("127.0.0.1", options.model_server_port)).await.with_context(|| {
        format!(
            "binding the model server's gRPC port 127.0.0.1:{} (pass --model-server-port 0 for a free port, or another port)",
            options.model_server_port
        )
    })?;
    let processor_grpc = TcpListener::bind(("127.0.0.1", options.processor_grpc_port)).await.with_context(|| {
        format!(
            "binding the stream processor's gRPC port 127.0.0.1:{} (pass --processor-grpc-port 0 for a free port, or another port)",
            options.processor_grpc_port
        )
    })?;

    // Brokers. External ones get this run's own topics, so nothing else on them is
    // counted and nothing of theirs is disturbed.
    let (kafka, kafka_name, topics) = match &options.kafka_brokers {
        Some(servers) => {
            let kafka = KafkaUnderTest::External { servers: servers.clone(), name: format!("Kafka at {servers}") };
            (kafka, format!("Kafka at {servers}"), run_topics(&format!("vigil-up-{run_id}-")))
        }
        None => {
            let cluster = KafkaCluster::start(1).context("starting the embedded Kafka cluster")?;
            let name = "embedded Kafka: librdkafka's mock cluster (in memory; the development default, not a Kafka)";
            (KafkaUnderTest::Mock(cluster), name.to_owned(), run_topics("vigil-"))
        }
    };
    for (topic, partitions) in [
        (&topics.readings, 4),
        (&topics.scores, 4),
        (&topics.anomalies, 4),
        (&topics.dead_letters[0], 1),
        (&topics.dead_letters[1], 1),
        (&topics.alerts, 4),
        (&topics.alert_dead_letters, 1),
    ] {
        kafka.create_topic(topic, partitions).await?;
    }
    // The alerts service creates its changelog, compacted, on a real Kafka; the mock
    // cluster answers no CreateTopics, so the run creates it there (as many partitions as
    // the scores topic: partition p keeps the state of scores partition p).
    if let KafkaUnderTest::Mock(_) = &kafka {
        kafka.create_topic(&topics.alerts_changelog, 4).await?;
    }
    let mqtt = match &options.mqtt_url {
        Some(url) => {
            let (host, port) = host_port(url)?;
            Mqtt { host, publish_port: port, ingest_url: url.clone(), name: format!("MQTT broker at {url}") }
        }
        None => {
            let broker = MqttBroker::start().context("starting the embedded MQTT broker")?;
            Mqtt {
                host: "127.0.0.1".into(),
                publish_port: broker.v4.port(),
                ingest_url: format!("mqtt://127.0.0.1:{}", broker.v5.port()),
                name: format!(
                    "embedded MQTT broker (rumqttd): 127.0.0.1:{} (3.1.1), 127.0.0.1:{} (5)",
                    broker.v4.port(),
                    broker.v5.port()
                ),
            }
        }
    };
    let mqtt_prefix = match &options.mqtt_url {
        Some(_) => format!("vigil-up/{run_id}/vehicles/sensor/data"),
        None => device_simulator::publish::DEFAULT_TOPIC_PREFIX.to_owned(),
    };
    say(format!("Kafka:        {kafka_name} at {}", kafka.bootstrap_servers()));
    say(format!("MQTT:         {}", mqtt.name));

    // Model server: every version of the model, rollout state and events on this run's
    // Kafka (its own topics and leader group on an external one).
    let model_config =
        tempfile::Builder::new().prefix("vigil-up-").tempdir().context("creating a temporary directory")?;
    let model_config_file = model_config.path().join("models.config");
    std::fs::write(
        &model_config_file,
        model_server::model_config::all_versions_config(MODEL_NAME, &options.model_dir).map_err(anyhow::Error::msg)?,
    )
    .with_context(|| format!("writing {}", model_config_file.display()))?;
    let mut flags = vec![
        "model-server".to_owned(),
        format!("--model_config_file={}", model_config_file.display()),
        format!("--rollout_kafka_brokers={}", kafka.bootstrap_servers()),
    ];
    if options.kafka_brokers.is_some() {
        flags.push(format!("--rollout_state_topic=vigil-up-{run_id}-rollout-state"));
        flags.push(format!("--rollout_events_topic=vigil-up-{run_id}-rollout-events"));
        flags.push(format!("--rollout_leader_group=vigil-up-{run_id}-rollouts"));
    }
    let serve = ServeCli::try_parse_from(flags)?.serve;
    // The mock cluster answers no CreateTopics, so the run creates the state topic there;
    // on a real Kafka the server creates it itself, compacted as it must be (this run's
    // topics would not be). The server only produces events, so the run creates that topic.
    if let KafkaUnderTest::Mock(_) = &kafka {
        kafka.create_topic(&serve.rollout_state_topic, 1).await?;
    }
    kafka.create_topic(&serve.rollout_events_topic, 1).await?;
    let server_config = serve.resolve().map_err(anyhow::Error::msg)?;
    let rest = loopback().await?;
    let (grpc_address, rest_address) = (address(&grpc)?, address(&rest)?);
    let model_server = Running::spawn("model server", |stopped| {
        model_server::server::run(
            server_config,
            model_server::server::Listeners { grpc, rest: Some(rest) },
            until(stopped),
        )
    });
    say(format!("model server: gRPC {grpc_address} (TF Serving, KServe v2, rollouts), REST http://{rest_address}"));
    // A plan that concludes within the default one-minute run of 50 readings a second (the
    // defaults check once a minute on 200 samples a side, for production traffic); shadow
    // scoring judges scores on the same readings, since the split gives each side other cars.
    if let [.., canary, stable] = versions_on_disk(&options.model_dir)[..] {
        say(format!(
            "              try: vigil rollout --server http://{grpc_address} start {MODEL_NAME} --stable {stable} \
             --canary {canary} --steps 25,50 --interval-seconds 10 --min-samples 100 --shadow 50"
        ));
    }

    // Stream processor.
    let mut processor_config = stream_processor::config::ProcessorConfig::default();
    processor_config.kafka.insert("bootstrap.servers".into(), kafka.bootstrap_servers().into());
    processor_config.readings_topic.clone_from(&topics.readings);
    processor_config.scores_topic.clone_from(&topics.scores);
    processor_config.anomalies_topic.clone_from(&topics.anomalies);
    processor_config.dead_letter_topic.clone_from(&topics.dead_letters[1]);
    processor_config.group_id = format!("vigil-up-{run_id}");
    processor_config.model.endpoints = vec![format!("http://{grpc_address}")];
    processor_config.model.name = MODEL_NAME.into();
    let processor_admin = loopback().await?;
    let processor_metrics = format!("http://{}", address(&processor_admin)?);
    let processor_grpc_address = address(&processor_grpc)?;
    let processor = Running::spawn("stream processor", |stopped| {
        let listeners = stream_processor::Listeners { admin: Some(processor_admin), grpc: Some(processor_grpc) };
        stream_processor::run(processor_config, listeners, until(stopped))
    });

    // Alerts: window rules over the scores.
    let alerts_config = AlertsConfig {
        group_id: format!("vigil-up-alerts-{run_id}"),
        scores_topic: topics.scores.clone(),
        alerts_topic: topics.alerts.clone(),
        changelog_topic: topics.alerts_changelog.clone(),
        dead_letter_topic: topics.alert_dead_letters.clone(),
        commit_interval_ms: ALERTS_COMMIT_INTERVAL.as_millis() as u64,
        admin_listen: String::new(),
        rules: options.alert_rules.clone(),
        kafka: [("bootstrap.servers".to_owned(), kafka.bootstrap_servers().to_owned())].into(),
        ..AlertsConfig::default()
    };
    for rule in &alerts_config.rules {
        say(format!("alerts:       rule {}: {}", rule.name, describe_rule(rule)));
    }
    let alerts_admin = loopback().await?;
    let alerts_metrics = format!("http://{}", address(&alerts_admin)?);
    let alerts_service = Running::spawn("alerts", |stopped| {
        alerts::run(alerts_config, alerts::Listeners { admin: Some(alerts_admin) }, until(stopped))
    });

    // Ingest.
    let mut ingest_config = ingest::config::IngestConfig::default();
    ingest_config.mqtt.url.clone_from(&mqtt.ingest_url);
    ingest_config.mqtt.protocol = ingest::config::MqttProtocol::V5;
    ingest_config.mqtt.client_id = format!("vigil-up-ingest-{run_id}");
    let filter = format!("{mqtt_prefix}/+");
    ingest_config.mqtt.subscriptions = vec![filter.clone()];
    ingest_config.rules = vec![ingest::config::RuleConfig {
        filter: Some(filter),
        regex: None,
        topic: topics.readings.clone(),
        key: None,
        device_id: Some(format!("{{level:{}}}", mqtt_prefix.split('/').count())),
        payload: ingest::config::PayloadKind::SensorReading,
    }];
    ingest_config.dead_letter_topic.clone_from(&topics.dead_letters[0]);
    ingest_config.kafka.insert("bootstrap.servers".into(), kafka.bootstrap_servers().into());
    ingest_config.grpc.listen.clear();
    let ingest_admin = loopback().await?;
    let ingest_metrics = format!("http://{}", address(&ingest_admin)?);
    let ingest = Running::spawn("ingest", |stopped| {
        ingest::run(ingest_config, ingest::Listeners { grpc: None, admin: Some(ingest_admin) }, until(stopped))
    });
    say(format!(
        "ingest:       metrics {ingest_metrics}/metrics; stream processor: metrics {processor_metrics}/metrics, \
         gRPC {processor_grpc_address} (replays)"
    ));
    if let [.., older, _] = versions_on_disk(&options.model_dir)[..] {
        say(format!(
            "              try, after a minute: vigil replay --processor http://{processor_grpc_address} --from -1m \
             --version {older} --output-topic vigil-replay-v{older}"
        ));
    }

    // Wait until the pipeline is there: ingest subscribed, the processor owning the
    // readings' partitions (so its group starts at the first reading).
    wait_until(Duration::from_secs(60), "ingest and the stream processor to be ready", || async {
        ready(&ingest_metrics).await
            && ready(&processor_metrics).await
            && ready(&alerts_metrics).await
            && metric(&processor_metrics, "processor_assigned_partitions").await > 0.0
    })
    .await?;
    let observer = Observer::start(kafka.bootstrap_servers(), &topics)?;

    // The simulated fleet: every car has driven for WARM_UP before the run shows it (a
    // short run would otherwise be mostly cold starts), and faults begin early enough in
    // the run to be seen.
    let seconds = options.duration.map_or(600.0, |d| d.as_secs_f64());
    let warm = WARM_UP.as_secs_f64();
    let fleet = FleetOptions {
        cars: options.cars,
        seed: options.seed,
        fault_share: options.fault_share,
        onset_window_s: (warm + seconds * 0.1, warm + seconds * 0.5),
        ..FleetOptions::default()
    };
    let mut publishing = PublishOptions::new(mqtt.host.clone(), mqtt.publish_port);
    publishing.topic_prefix = mqtt_prefix;
    publishing.interval = options.interval;
    publishing.cars_per_connection = 10;
    publishing.client_id_prefix = format!("vigil-up-{run_id}");
    publishing.start = SystemTime::now().into();
    publishing.drain_timeout = Duration::from_secs(30);
    publishing.warm_up = WARM_UP;
    let publish_metrics = PublishMetrics::new(&prometheus::Registry::new())?;
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
    let mut view = LiveView::new(options.live);
    let stop_publishing = async {
        match options.duration {
            Some(duration) => tokio::select! {
                () = tokio::time::sleep(duration) => {}
                () = interrupt => {}
            },
            None => interrupt.await,
        }
    };
    let report = {
        let publishing = publish(&fleet, &publishing, &publish_metrics, stop_publishing);
        tokio::pin!(publishing);
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                report = &mut publishing => break report.context("the device simulator")?,
                _ = ticks.tick() => view.tick(started, &publish_metrics, &observer),
            }
        }
    };
    let acknowledged = report.acknowledged;
    say(format!(
        "\nsimulator stopped: {} readings published, {acknowledged} acknowledged; draining the pipeline...",
        report.published
    ));

    // Drain: everything acknowledged is in Kafka; wait for it to be observed and scored.
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
        view.tick(started, &publish_metrics, &observer);
    };
    view.tick(started, &publish_metrics, &observer);

    // The alerts service has read every score, and the observer has seen every alert it
    // fired (it writes them every commit interval).
    let alerts_settled = drained
        && wait_until(DRAIN_LIMIT, "the alerts service to read every score", || async {
            metric(&alerts_metrics, "alerts_scores_consumed_total").await >= observer.state().score_records as f64
        })
        .await
        .is_ok()
        && {
            tokio::time::sleep(ALERTS_COMMIT_INTERVAL * 3).await;
            wait_until(Duration::from_secs(30), "the observer to see every alert", || async {
                metric(&alerts_metrics, "alerts_fired_total").await as usize <= observer.state().alerts.len()
            })
            .await
            .is_ok()
        };
    let alerts = AlertsOutcome {
        open_windows: metric(&alerts_metrics, "alerts_open_windows").await as u64,
        late_readings: metric(&alerts_metrics, "alerts_late_readings_total").await as u64,
        settled: alerts_settled,
    };
    view.tick(started, &publish_metrics, &observer);
    let elapsed = started.elapsed();
    let alerts_stopped = alerts_service.stop().await;
    let processor_stopped = processor.stop().await;
    let ingest_stopped = ingest.stop().await;
    let model_server_stopped = model_server.stop().await;
    let observed = observer.finish();
    drop(kafka);
    drop(model_config);
    let ending = Ending { elapsed, drained, alerts };
    let summary = Summary::new(&options, &report, &observed, &ending, &kafka_name, &mqtt.name);
    alerts_stopped?;
    processor_stopped?;
    ingest_stopped?;
    model_server_stopped?;
    Ok(Finished { summary, observed })
}

fn run_topics(prefix: &str) -> Topics {
    Topics {
        readings: format!("{prefix}readings"),
        scores: format!("{prefix}scores"),
        anomalies: format!("{prefix}anomalies"),
        dead_letters: [format!("{prefix}dead-letter"), format!("{prefix}scoring-dead-letter")],
        alerts: format!("{prefix}alerts"),
        alerts_changelog: format!("{prefix}alerts-changelog"),
        alert_dead_letters: format!("{prefix}alerts-dead-letter"),
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

/// The numbered version directories in `dir`, ascending.
fn versions_on_disk(dir: &Path) -> Vec<i64> {
    let mut versions: Vec<i64> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.path().is_dir())
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort_unstable();
    versions
}

fn host_port(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .with_context(|| format!("--mqtt-url {url:?}: expected mqtt://host:port"))?;
    let (host, port) = rest.rsplit_once(':').unwrap_or((rest, "1883"));
    let port = port.trim_end_matches('/').parse().with_context(|| format!("--mqtt-url {url:?}: the port"))?;
    Ok((host.to_owned(), port))
}

async fn ready(admin: &str) -> bool {
    reqwest::get(format!("{admin}/ready")).await.is_ok_and(|r| r.status().is_success())
}

/// An unlabelled metric's value, or the sum over a labelled one's series (0 if absent).
pub async fn metric(admin: &str, name: &str) -> f64 {
    let Ok(response) = reqwest::get(format!("{admin}/metrics")).await else { return 0.0 };
    admin::metric_sum(&response.text().await.unwrap_or_default(), name)
}

async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        if Instant::now() > deadline {
            bail!("waited {} s for {what}", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The model server's own flags, so `vigil up` configures it exactly as a user would.
#[derive(clap::Parser)]
struct ServeCli {
    #[command(flatten)]
    serve: model_server::config::ServeArgs,
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
        assert_eq!(versions_on_disk(&bundled_model()), [1, 2]);
        assert!(versions_on_disk(Path::new("/nonexistent")).is_empty());
    }
}
