//! The parts of a `vigil up` run, each started by one step: the ports it must own, the
//! brokers and topics, the model server, the stream processor, the alerts service and
//! ingest. Every part runs in this process as a [`Running`] task until its stop is sent.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use alerts::config::AlertsConfig;
use anyhow::{Context as _, bail};
use clap::Parser as _;
use embedded_brokers::{KafkaCluster, KafkaUnderTest, MqttBroker};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::{ALERTS_COMMIT_INTERVAL, MODEL_NAME, MqttMode, Scoring, UpOptions, describe_rule};
use crate::observe::Topics;

/// Where the MQTT side is: the simulator publishes with MQTT 3.1.1, ingest reads with 5
/// from the broker, or (proxy mode) takes the simulator's connections itself.
pub(super) struct Mqtt {
    pub(super) host: String,
    pub(super) publish_port: u16,
    /// Empty in proxy mode: ingest subscribes to no broker.
    pub(super) ingest_url: String,
    pub(super) name: String,
    /// Proxy mode: the port the simulator publishes to, bound here for ingest to serve.
    pub(super) proxy: Option<tokio::net::TcpListener>,
}

/// A service running in this process until its stop is sent.
pub(super) struct Running<E> {
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

    pub(super) async fn stop(self) -> anyhow::Result<()> {
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

/// The ports the run must have, bound first so a taken one fails the run before anything
/// starts.
pub(super) struct Ports {
    pub(super) model_server: TcpListener,
    pub(super) processor: TcpListener,
}

impl Ports {
    pub(super) async fn bind(options: &UpOptions) -> anyhow::Result<Self> {
        let model_server = TcpListener::bind(("127.0.0.1", options.model_server_port)).await.with_context(|| {
            format!(
                "binding the model server's gRPC port 127.0.0.1:{} (pass --model-server-port 0 for a free port, or another port)",
                options.model_server_port
            )
        })?;
        let processor = TcpListener::bind(("127.0.0.1", options.processor_grpc_port)).await.with_context(|| {
            format!(
                "binding the stream processor's gRPC port 127.0.0.1:{} (pass --processor-grpc-port 0 for a free port, or another port)",
                options.processor_grpc_port
            )
        })?;
        Ok(Self { model_server, processor })
    }
}

/// Kafka and MQTT for the run, with its topics. External brokers get this run's own topics,
/// so nothing else on them is counted and nothing of theirs is disturbed.
pub(super) struct Brokers {
    pub(super) kafka: KafkaUnderTest,
    pub(super) kafka_name: String,
    pub(super) topics: Topics,
    pub(super) mqtt: Mqtt,
    /// The MQTT topic prefix the fleet publishes under.
    pub(super) mqtt_prefix: String,
}

impl Brokers {
    pub(super) async fn start(options: &UpOptions, run_id: u64) -> anyhow::Result<Self> {
        let (kafka, kafka_name, topics) = match &options.kafka_brokers {
            Some(servers) => {
                let kafka = KafkaUnderTest::External { servers: servers.clone(), name: format!("Kafka at {servers}") };
                (kafka, format!("Kafka at {servers}"), run_topics(&format!("vigil-up-{run_id}-")))
            }
            None => {
                let cluster = KafkaCluster::start(1).context("starting the embedded Kafka cluster")?;
                let name =
                    "embedded Kafka: librdkafka's mock cluster (in memory; the development default, not a Kafka)";
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
        let mqtt = match (&options.mqtt_url, options.mqtt) {
            (Some(_), MqttMode::Proxy) => {
                anyhow::bail!("--mqtt-url and --mqtt proxy do not go together: the proxy replaces the broker")
            }
            (None, MqttMode::Proxy) => {
                let listener = loopback().await?;
                let port = address(&listener)?.port();
                Mqtt {
                    host: "127.0.0.1".into(),
                    publish_port: port,
                    ingest_url: String::new(),
                    name: format!("no MQTT broker: the cars connect to ingest's MQTT proxy at 127.0.0.1:{port}"),
                    proxy: Some(listener),
                }
            }
            (Some(url), MqttMode::Broker) => {
                let (host, port) = host_port(url)?;
                Mqtt {
                    host,
                    publish_port: port,
                    ingest_url: url.clone(),
                    name: format!("MQTT broker at {url}"),
                    proxy: None,
                }
            }
            (None, MqttMode::Broker) => {
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
                    proxy: None,
                }
            }
        };
        let mqtt_prefix = match &options.mqtt_url {
            Some(_) => format!("vigil-up/{run_id}/vehicles/sensor/data"),
            None => device_simulator::publish::DEFAULT_TOPIC_PREFIX.to_owned(),
        };
        Ok(Self { kafka, kafka_name, topics, mqtt, mqtt_prefix })
    }
}

/// The model server, serving every version of the model, with rollout state and events on
/// the run's Kafka (its own topics and leader group on an external one).
pub(super) struct ModelServer {
    pub(super) running: Running<anyhow::Error>,
    pub(super) grpc: SocketAddr,
    /// Holds the model config file the server reads.
    pub(super) _config_dir: tempfile::TempDir,
}

pub(super) async fn start_model_server(
    options: &UpOptions,
    brokers: &Brokers,
    run_id: u64,
    grpc: TcpListener,
    say: &dyn Fn(String),
) -> anyhow::Result<ModelServer> {
    let kafka = &brokers.kafka;
    let config_dir =
        tempfile::Builder::new().prefix("vigil-up-").tempdir().context("creating a temporary directory")?;
    let model_config_file = config_dir.path().join("models.config");
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
    if let KafkaUnderTest::Mock(_) = kafka {
        kafka.create_topic(&serve.rollout_state_topic, 1).await?;
    }
    kafka.create_topic(&serve.rollout_events_topic, 1).await?;
    let server_config = serve.resolve().map_err(anyhow::Error::msg)?;
    let rest = loopback().await?;
    let (grpc_address, rest_address) = (address(&grpc)?, address(&rest)?);
    let running = Running::spawn("model server", |stopped| {
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
    Ok(ModelServer { running, grpc: grpc_address, _config_dir: config_dir })
}

/// A service of the pipeline and the base URL of its admin port (`/ready`, `/metrics`).
pub(super) struct Service<E> {
    pub(super) running: Running<E>,
    pub(super) admin: String,
}

/// The stream processor, scoring through the model server at `model_server`, with its gRPC
/// ReplayService on `grpc`.
pub(super) async fn start_processor(
    options: &UpOptions,
    brokers: &Brokers,
    run_id: u64,
    model_server: SocketAddr,
    grpc: TcpListener,
) -> anyhow::Result<(Service<stream_processor::ProcessorError>, SocketAddr)> {
    let topics = &brokers.topics;
    let mut config = stream_processor::config::ProcessorConfig::default();
    config.kafka.insert("bootstrap.servers".into(), brokers.kafka.bootstrap_servers().into());
    config.readings_topic.clone_from(&topics.readings);
    config.scores_topic.clone_from(&topics.scores);
    config.anomalies_topic.clone_from(&topics.anomalies);
    config.dead_letter_topic.clone_from(&topics.dead_letters[1]);
    config.group_id = format!("vigil-up-{run_id}");
    config.model.endpoints = vec![format!("http://{model_server}")];
    config.model.name = MODEL_NAME.into();
    match options.scoring {
        Scoring::Batched => {}
        Scoring::PerReading => config.model.max_rows_per_call = 1,
        Scoring::Embedded => {
            config.model.mode = stream_processor::config::ModelMode::Embedded;
            config.model.model_dir = Some(options.model_dir.clone());
        }
    }
    let admin = loopback().await?;
    let metrics = format!("http://{}", address(&admin)?);
    let grpc_address = address(&grpc)?;
    let running = Running::spawn("stream processor", |stopped| {
        let listeners = stream_processor::Listeners { admin: Some(admin), grpc: Some(grpc) };
        stream_processor::run(config, listeners, until(stopped))
    });
    Ok((Service { running, admin: metrics }, grpc_address))
}

/// The alerts service: the options' window rules over the scores.
pub(super) async fn start_alerts(
    options: &UpOptions,
    brokers: &Brokers,
    run_id: u64,
    say: &dyn Fn(String),
) -> anyhow::Result<Service<alerts::AlertsError>> {
    let topics = &brokers.topics;
    let config = AlertsConfig {
        group_id: format!("vigil-up-alerts-{run_id}"),
        scores_topic: topics.scores.clone(),
        alerts_topic: topics.alerts.clone(),
        changelog_topic: topics.alerts_changelog.clone(),
        dead_letter_topic: topics.alert_dead_letters.clone(),
        commit_interval_ms: ALERTS_COMMIT_INTERVAL.as_millis() as u64,
        admin_listen: String::new(),
        rules: options.alert_rules.clone(),
        kafka: [("bootstrap.servers".to_owned(), brokers.kafka.bootstrap_servers().to_owned())].into(),
        ..AlertsConfig::default()
    };
    for rule in &config.rules {
        say(format!("alerts:       rule {}: {}", rule.name, describe_rule(rule)));
    }
    let admin = loopback().await?;
    let metrics = format!("http://{}", address(&admin)?);
    let running = Running::spawn("alerts", |stopped| {
        alerts::run(config, alerts::Listeners { admin: Some(admin) }, until(stopped))
    });
    Ok(Service { running, admin: metrics })
}

/// Ingest: MQTT 5 from the run's broker (or the cars' own connections, in proxy mode)
/// into the readings topic.
pub(super) async fn start_ingest(brokers: &mut Brokers, run_id: u64) -> anyhow::Result<Service<ingest::IngestError>> {
    let proxy = brokers.mqtt.proxy.take();
    let mut config = ingest::config::IngestConfig::default();
    config.mqtt.url.clone_from(&brokers.mqtt.ingest_url);
    config.mqtt.protocol = ingest::config::MqttProtocol::V5;
    config.mqtt.client_id = format!("vigil-up-ingest-{run_id}");
    let filter = format!("{}/+", brokers.mqtt_prefix);
    config.mqtt.subscriptions = vec![filter.clone()];
    config.rules = vec![ingest::config::RuleConfig {
        filter: Some(filter),
        regex: None,
        topic: brokers.topics.readings.clone(),
        key: None,
        device_id: Some(format!("{{level:{}}}", brokers.mqtt_prefix.split('/').count())),
        payload: ingest::config::PayloadKind::SensorReading,
    }];
    config.dead_letter_topic.clone_from(&brokers.topics.dead_letters[0]);
    config.kafka.insert("bootstrap.servers".into(), brokers.kafka.bootstrap_servers().into());
    config.grpc.listen.clear();
    let admin = loopback().await?;
    let metrics = format!("http://{}", address(&admin)?);
    let running = Running::spawn("ingest", |stopped| {
        ingest::run(
            config,
            ingest::Listeners { admin: Some(admin), mqtt_proxy: proxy, ..Default::default() },
            until(stopped),
        )
    });
    Ok(Service { running, admin: metrics })
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

/// The numbered version directories in `dir`, ascending.
pub(super) fn versions_on_disk(dir: &Path) -> Vec<i64> {
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

pub(super) async fn ready(admin: &str) -> bool {
    reqwest::get(format!("{admin}/ready")).await.is_ok_and(|r| r.status().is_success())
}

pub(super) async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F) -> anyhow::Result<()>
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
