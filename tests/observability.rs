//! What operators see of the running fleet, checked on the real services in this process
//! (embedded MQTT broker and Kafka cluster, model server on the bundled model, stream
//! processor, alerts, ingest, all on loopback):
//!
//! - one reading is one trace: a device's `traceparent` (an MQTT 5 user property, as the
//!   device simulator sets on its traced share, or gRPC metadata on ingest's IngestService)
//!   is continued by ingest's span, the processor's
//!   span under it, the processor's `Predict` client span (under it, or, for a reading
//!   batched behind another reading in one call, linked to it), and the model server's
//!   span under that; the score record's headers carry the processor's span;
//! - every service's `/metrics` endpoint answers in the Prometheus text format with the
//!   figures of what just happened, and every metric the Grafana dashboard
//!   (`deploy/grafana/dashboards/vigil.json`) queries is exported by some service;
//! - with a Prometheus binary (`VIGIL_PROMETHEUS`, which `tests/run-all.sh` installs and
//!   sets), a real Prometheus scrapes all five services through the run, and every query
//!   of the dashboard, evaluated through its HTTP API, returns data.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use clap::Parser as _;
use embedded_brokers::{KafkaCluster, MqttBroker, ReadRecord};
use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use prost::Message as _;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use test_support::kafka::{produce, producer, read_topic};
use test_support::{Endpoint, eventually, observe_until};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const READINGS: &str = "obs.readings";
const SCORES: &str = "obs.scores";
const ANOMALIES: &str = "obs.anomalies";
const INGEST_DEAD_LETTERS: &str = "obs.ingest-dead-letters";
const PROCESSOR_DEAD_LETTERS: &str = "obs.processor-dead-letters";
const ALERTS: &str = "obs.alerts";
const ALERTS_CHANGELOG: &str = "obs.alerts-changelog";
const ALERTS_DEAD_LETTERS: &str = "obs.alerts-dead-letters";
const PREFIX: &str = device_simulator::publish::DEFAULT_TOPIC_PREFIX;
const PREDICT: &str = "tensorflow.serving.PredictionService/Predict";

/// Every span any service in this process ends, from the first test on.
fn spans() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
        opentelemetry::global::set_tracer_provider(provider);
        exporter
    })
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[derive(clap::Parser)]
struct ServeCli {
    #[command(flatten)]
    serve: model_server::config::ServeArgs,
}

type Task = tokio::task::JoinHandle<anyhow::Result<()>>;

/// The pipeline's services on embedded brokers.
struct Pipeline {
    kafka: KafkaCluster,
    mqtt: MqttBroker,
    model_server_grpc: SocketAddr,
    model_server_rest: SocketAddr,
    ingest_grpc: SocketAddr,
    ingest_admin: SocketAddr,
    processor_admin: SocketAddr,
    alerts_admin: SocketAddr,
    /// Stopped in this order: ingest first, the model server last.
    services: Vec<(oneshot::Sender<()>, Task)>,
    _model_config: tempfile::TempDir,
}

async fn loopback() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    (listener, address)
}

fn spawn(run: impl FnOnce(oneshot::Receiver<()>) -> Task) -> (oneshot::Sender<()>, Task) {
    let (stop, stopped) = oneshot::channel();
    (stop, run(stopped))
}

impl Pipeline {
    async fn start(name: &str) -> Self {
        spans();
        let kafka = KafkaCluster::start(1).unwrap();
        // Two partitions each: the alerts changelog has as many as the scores topic.
        for topic in [
            READINGS,
            SCORES,
            ANOMALIES,
            INGEST_DEAD_LETTERS,
            PROCESSOR_DEAD_LETTERS,
            ALERTS,
            ALERTS_CHANGELOG,
            ALERTS_DEAD_LETTERS,
        ] {
            kafka.create_topic(topic, 2).unwrap();
        }
        let mqtt = MqttBroker::start().unwrap();

        // Every bundled version, so a canary rollout can run.
        let models = root().join("deploy/models/car-anomaly");
        let config_dir = tempfile::tempdir().unwrap();
        let model_config = config_dir.path().join("models.config");
        std::fs::write(&model_config, model_server::model_config::all_versions_config("car-anomaly", &models).unwrap())
            .unwrap();
        let flags = ["model-server", &format!("--model_config_file={}", model_config.display())];
        let server_config = ServeCli::try_parse_from(flags).unwrap().serve.resolve().unwrap();
        let ((grpc, model_server_grpc), (rest, model_server_rest)) = (loopback().await, loopback().await);
        let model_server = spawn(|stopped| {
            tokio::spawn(async move {
                let listeners = model_server::server::Listeners { grpc, rest: Some(rest) };
                model_server::server::run(server_config, listeners, async {
                    let _ = stopped.await;
                })
                .await
            })
        });

        let mut processor_config = stream_processor::config::ProcessorConfig::default();
        processor_config.kafka.insert("bootstrap.servers".into(), kafka.bootstrap_servers().into());
        processor_config.kafka.insert("session.timeout.ms".into(), "6000".into());
        processor_config.readings_topic = READINGS.into();
        processor_config.scores_topic = SCORES.into();
        processor_config.anomalies_topic = ANOMALIES.into();
        processor_config.dead_letter_topic = PROCESSOR_DEAD_LETTERS.into();
        processor_config.group_id = format!("{name}-processor");
        processor_config.model.endpoints = vec![format!("http://{model_server_grpc}")];
        processor_config.model.name = "car-anomaly".into();
        let (admin, processor_admin) = loopback().await;
        let processor = spawn(|stopped| {
            tokio::spawn(async move {
                let listeners = stream_processor::Listeners { admin: Some(admin), grpc: None };
                stream_processor::run(processor_config, listeners, async {
                    let _ = stopped.await;
                })
                .await
                .map_err(anyhow::Error::from)
            })
        });

        // A rule every car meets: each one-second window with a reading fires once it
        // closes, so the fleet's readings fire alerts.
        let alerts_config = alerts::config::AlertsConfig {
            group_id: format!("{name}-alerts"),
            scores_topic: SCORES.into(),
            alerts_topic: ALERTS.into(),
            changelog_topic: ALERTS_CHANGELOG.into(),
            dead_letter_topic: ALERTS_DEAD_LETTERS.into(),
            rules: vec![alerts::config::RuleConfig {
                name: "any-reading".into(),
                window_seconds: 1,
                advance_seconds: None,
                allowed_lateness_seconds: 0,
                min_anomalies: None,
                min_readings: Some(1),
                mean_score_above: None,
                max_score_above: None,
            }],
            kafka: [("bootstrap.servers".to_owned(), kafka.bootstrap_servers().to_owned())].into(),
            ..Default::default()
        };
        let (admin, alerts_admin) = loopback().await;
        let alerts_service = spawn(|stopped| {
            tokio::spawn(async move {
                Ok(alerts::run(alerts_config, alerts::Listeners { admin: Some(admin) }, async {
                    let _ = stopped.await;
                })
                .await?)
            })
        });

        let mut ingest_config = ingest::config::IngestConfig::default();
        ingest_config.mqtt.url = format!("mqtt://127.0.0.1:{}", mqtt.v5.port());
        ingest_config.mqtt.protocol = ingest::config::MqttProtocol::V5;
        ingest_config.mqtt.client_id = format!("{name}-ingest");
        ingest_config.mqtt.subscriptions = vec![format!("{PREFIX}/+")];
        ingest_config.rules = vec![ingest::config::RuleConfig {
            filter: Some(format!("{PREFIX}/+")),
            regex: None,
            topic: READINGS.into(),
            key: None,
            device_id: Some(format!("{{level:{}}}", PREFIX.split('/').count())),
            payload: ingest::config::PayloadKind::SensorReading,
        }];
        ingest_config.grpc.topic = READINGS.into();
        ingest_config.dead_letter_topic = INGEST_DEAD_LETTERS.into();
        ingest_config.kafka.insert("bootstrap.servers".into(), kafka.bootstrap_servers().into());
        let ((grpc, ingest_grpc), (admin, ingest_admin)) = (loopback().await, loopback().await);
        let ingest = spawn(|stopped| {
            tokio::spawn(async move {
                let listeners = ingest::Listeners { grpc: Some(grpc), admin: Some(admin), ..Default::default() };
                ingest::run(ingest_config, listeners, async {
                    let _ = stopped.await;
                })
                .await
                .map_err(anyhow::Error::from)
            })
        });

        let pipeline = Self {
            kafka,
            mqtt,
            model_server_grpc,
            model_server_rest,
            ingest_grpc,
            ingest_admin,
            processor_admin,
            alerts_admin,
            services: vec![ingest, alerts_service, processor, model_server],
            _model_config: config_dir,
        };
        let (ingest, processor) = (Endpoint::new(pipeline.ingest_admin), Endpoint::new(pipeline.processor_admin));
        let what = "the pipeline to be ready: ingest subscribed, the processor owning the readings' partitions";
        eventually(Duration::from_secs(60), what, async || {
            ingest.is_ready().await && processor.metric_sum("processor_assigned_partitions").await >= 2.0
        })
        .await;
        pipeline
    }

    async fn scrape(&self, admin: SocketAddr) -> String {
        Endpoint::new(admin).metrics().await
    }

    /// Reads `topic` until `count` records are there.
    async fn read(&self, topic: &'static str, count: usize) -> Vec<ReadRecord> {
        let records = read_topic(&self.kafka, topic, Duration::from_secs(30), move |r| r.len() >= count).await;
        assert_eq!(records.len(), count, "records on {topic}");
        records
    }

    async fn stop(self) {
        for (stop, task) in self.services {
            let _ = stop.send(());
            tokio::time::timeout(Duration::from_secs(30), task).await.expect("stops").unwrap().unwrap();
        }
    }
}

/// A healthy reading of one simulated car, as its device would publish it.
fn reading(device: &str) -> sensor::SensorReading {
    let options = device_simulator::fleet::FleetOptions { cars: 1, seed: 7, ..Default::default() };
    // Within ingest's default event-time bounds of its arrival.
    let mut fleet = device_simulator::fleet::Fleet::new(&options, std::time::SystemTime::now().into());
    let mut reading = fleet.step(1.0).remove(0);
    reading.device_id = device.into();
    reading
}

fn traceparent(trace: TraceId, span: SpanId) -> String {
    format!("00-{trace}-{span}-01")
}

/// `traceparent`'s (trace id, span id).
fn parse_traceparent(value: &[u8]) -> (TraceId, SpanId) {
    let text = std::str::from_utf8(value).unwrap();
    let parts: Vec<_> = text.split('-').collect();
    assert_eq!(parts.len(), 4, "{text}");
    (TraceId::from_hex(parts[1]).unwrap(), SpanId::from_hex(parts[2]).unwrap())
}

/// The one span named `name` made by `scope`.
fn one<'a>(spans: &'a [SpanData], scope: &str, name: &str) -> &'a SpanData {
    let matching: Vec<_> = spans.iter().filter(|s| s.instrumentation_scope.name() == scope && s.name == name).collect();
    assert_eq!(matching.len(), 1, "one {scope} span {name:?} in {:#?}", names(spans));
    matching[0]
}

fn names(spans: &[SpanData]) -> Vec<(String, String, SpanId, SpanId)> {
    spans
        .iter()
        .map(|s| {
            (s.instrumentation_scope.name().to_owned(), s.name.to_string(), s.span_context.span_id(), s.parent_span_id)
        })
        .collect()
}

fn attribute(span: &SpanData, key: &str) -> Option<opentelemetry::Value> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.clone())
}

/// The Predict client span that scored the reading whose span is `processor`, and the model
/// server's span under it: a child of the reading's span when the reading was alone or first
/// in its call; for a reading batched behind another, the call (in the first reading's
/// trace) links to it instead.
fn call_of(all: &[SpanData], processor: &SpanData) -> Option<(SpanData, SpanData)> {
    let reading = processor.span_context.span_id();
    let client = all.iter().find(|s| {
        s.instrumentation_scope.name() == "vigil-stream-processor"
            && s.name == PREDICT
            && (s.parent_span_id == reading || s.links.iter().any(|link| link.span_context.span_id() == reading))
    })?;
    let server = all.iter().find(|s| {
        s.instrumentation_scope.name() == "vigil-model-server"
            && s.name == PREDICT
            && s.parent_span_id == client.span_context.span_id()
    })?;
    Some((client.clone(), server.clone()))
}

/// Waits until the trace `id` has its reading's processor span and that reading's call and
/// the model server's span under it are ended, and returns the trace's spans (what there is
/// after 20 s: the caller's assertion names them).
async fn trace(id: TraceId) -> Vec<SpanData> {
    let ended = async || spans().get_finished_spans().unwrap();
    let complete = |all: &Vec<SpanData>| {
        all.iter()
            .find(|s| s.span_context.trace_id() == id && s.name == "score reading")
            .is_some_and(|processor| call_of(all, processor).is_some())
    };
    let all = observe_until(Duration::from_secs(20), ended, complete).await;
    all.into_iter().filter(|s| s.span_context.trace_id() == id).collect()
}

/// Checks the chain from ingest's span down to the model server's, and returns the
/// processor's span.
fn assert_chain<'a>(spans: &'a [SpanData], ingest: &SpanData, score: &ReadRecord) -> &'a SpanData {
    let processor = one(spans, "vigil-stream-processor", "score reading");
    assert_eq!(processor.parent_span_id, ingest.span_context.span_id(), "processor under ingest: {:#?}", names(spans));
    assert!(processor.parent_span_is_remote, "the processor's parent came in a Kafka header");
    assert_eq!(processor.span_kind, SpanKind::Consumer);
    let all = self::spans().get_finished_spans().unwrap();
    let (client, server) = call_of(&all, processor).expect("the reading's Predict call and the model server's span");
    if client.parent_span_id == processor.span_context.span_id() {
        // Alone or first in its call: the call and the server are in the reading's trace.
        assert_eq!(spans.len(), names(spans).iter().filter(|s| s.1 != PREDICT).count() + 2, "{:#?}", names(spans));
    } else {
        assert!(client.links.iter().any(|l| l.span_context == processor.span_context), "linked to the reading");
        assert!(!spans.iter().any(|s| s.name == PREDICT), "{:#?}", names(spans));
    }
    assert_eq!(client.span_kind, SpanKind::Client);
    let server = &server;
    assert!(server.parent_span_is_remote, "the model server's parent came in gRPC metadata");
    assert_eq!(server.span_kind, SpanKind::Server);
    assert_eq!(attribute(server, "rpc.grpc.status_code"), Some(0i64.into()));

    // The version that answered is on the model server's span and in the score record.
    let record = proto::vigil::scoring::v1::Score::decode(score.payload.as_slice()).unwrap();
    assert_eq!(attribute(server, "vigil.model.version"), Some(record.model_version.into()));
    assert_eq!(attribute(processor, "vigil.model.version"), Some(record.model_version.into()));
    // The score record continues the processor's span.
    let (trace_id, span_id) = parse_traceparent(score.header("traceparent").expect("the score carries traceparent"));
    assert_eq!(trace_id, processor.span_context.trace_id());
    assert_eq!(span_id, processor.span_context.span_id());
    processor
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_reading_is_one_trace_from_the_device_through_ingest_the_processor_and_the_model_server() {
    let pipeline = Pipeline::start("traces").await;

    // A device publishing over MQTT 5 with its own span in the user properties.
    let device_trace = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
    let device_span = SpanId::from_hex("00f067aa0ba902b7").unwrap();
    let options = rumqttc::v5::MqttOptions::new("traced-device", "127.0.0.1", pipeline.mqtt.v5.port());
    let (client, mut events) = rumqttc::v5::AsyncClient::new(options, 10);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let properties = PublishProperties {
        user_properties: vec![("traceparent".into(), traceparent(device_trace, device_span))],
        ..Default::default()
    };
    let traced = reading("car-traced");
    let payload = sensor::json::to_json(&traced).into_bytes();
    client
        .publish_with_properties(format!("{PREFIX}/car-traced"), QoS::AtLeastOnce, false, payload, properties)
        .await
        .unwrap();

    // Another over MQTT 5 without trace context: ingest starts the trace.
    let untraced = reading("car-untraced");
    let payload = sensor::json::to_json(&untraced).into_bytes();
    client.publish(format!("{PREFIX}/car-untraced"), QoS::AtLeastOnce, false, payload).await.unwrap();

    // A gateway calling ingest's IngestService with its span in the metadata.
    let gateway_trace = TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap();
    let gateway_span = SpanId::from_hex("b7ad6b7169203331").unwrap();
    let mut ingest_client = proto::vigil::ingest::v1::ingest_service_client::IngestServiceClient::connect(format!(
        "http://{}",
        pipeline.ingest_grpc
    ))
    .await
    .unwrap();
    let mut request =
        tonic::Request::new(proto::vigil::ingest::v1::PublishRequest { readings: vec![reading("car-gateway")] });
    request.metadata_mut().insert("traceparent", traceparent(gateway_trace, gateway_span).parse().unwrap());
    ingest_client.publish(request).await.unwrap();

    // A simulated car over MQTT 5 (the simulator's default), every reading traced: the
    // device's own span is the trace's root.
    let fleet = device_simulator::fleet::FleetOptions { cars: 1, seed: 5, ..Default::default() };
    let simulated_device = device_simulator::fleet::car(&fleet, 0).device_id;
    let mut publishing = device_simulator::publish::PublishOptions::new("127.0.0.1", pipeline.mqtt.v5.port());
    publishing.readings_per_car = Some(1);
    publishing.trace_share = 1.0;
    publishing.client_id_prefix = "traced-fleet".into();
    let metrics = device_simulator::metrics::PublishMetrics::unregistered();
    device_simulator::publish::publish(&fleet, &publishing, &metrics, std::future::pending()).await.unwrap();
    assert_eq!(metrics.traced.get(), 1);

    let readings = pipeline.read(READINGS, 4).await;
    let scores = pipeline.read(SCORES, 4).await;
    let by_device = |records: &[ReadRecord], device: &str| -> ReadRecord {
        records.iter().find(|r| r.key.as_deref() == Some(device.as_bytes())).cloned().unwrap()
    };

    // The device's trace: device span -> ingest -> processor -> Predict client -> model server.
    let spans = trace(device_trace).await;
    let ingest = one(&spans, "vigil-ingest", "ingest reading");
    assert_eq!(ingest.parent_span_id, device_span, "ingest continues the device's span");
    assert!(ingest.parent_span_is_remote);
    assert_eq!(ingest.span_kind, SpanKind::Consumer);
    assert_eq!(attribute(ingest, "messaging.system"), Some("mqtt".into()));
    assert_eq!(attribute(ingest, "messaging.destination.name"), Some(format!("{PREFIX}/car-traced").into()));
    let (_, carried) = parse_traceparent(by_device(&readings, "car-traced").header("traceparent").unwrap());
    assert_eq!(carried, ingest.span_context.span_id(), "the readings record carries ingest's span");
    let processor = assert_chain(&spans, ingest, &by_device(&scores, "car-traced"));
    assert_eq!(attribute(processor, "vigil.device_id"), Some("car-traced".into()));

    // The untraced device: ingest's span is the root of a new trace, and the rest follows.
    let (untraced_trace, _) = parse_traceparent(by_device(&readings, "car-untraced").header("traceparent").unwrap());
    assert_ne!(untraced_trace, device_trace);
    let spans = trace(untraced_trace).await;
    let ingest = one(&spans, "vigil-ingest", "ingest reading");
    assert_eq!(ingest.parent_span_id, SpanId::INVALID, "a root span");
    assert_chain(&spans, ingest, &by_device(&scores, "car-untraced"));

    // The simulated car's trace starts at the device: its span, a root, then ingest's.
    let (simulated_trace, _) =
        parse_traceparent(by_device(&readings, &simulated_device).header("traceparent").unwrap());
    let spans = trace(simulated_trace).await;
    let device = one(&spans, device_simulator::publish::TRACE_SCOPE, "publish reading");
    assert_eq!(device.parent_span_id, SpanId::INVALID, "the device's span is the root");
    assert_eq!(device.span_kind, SpanKind::Producer);
    assert_eq!(attribute(device, "vigil.device.id"), Some(simulated_device.clone().into()));
    let ingest = one(&spans, "vigil-ingest", "ingest reading");
    assert_eq!(ingest.parent_span_id, device.span_context.span_id(), "ingest continues the device's span");
    assert_chain(&spans, ingest, &by_device(&scores, &simulated_device));

    // The gateway's trace: gateway span -> ingest's server span -> the reading's span -> ...
    let spans = trace(gateway_trace).await;
    let call = one(&spans, "vigil-ingest", "vigil.ingest.v1.IngestService/Publish");
    assert_eq!(call.parent_span_id, gateway_span);
    assert_eq!(call.span_kind, SpanKind::Server);
    let ingest = one(&spans, "vigil-ingest", "ingest reading");
    assert_eq!(ingest.parent_span_id, call.span_context.span_id());
    assert_chain(&spans, ingest, &by_device(&scores, "car-gateway"));

    pipeline.stop().await;
}

/// Labelled metrics the metrics test's run leaves without a series (the Rust client
/// exports a labelled family only once it has one), each with why.
const NOT_REACHED: [(&str, &str); 6] = [
    ("alerts_dead_lettered_total", "every score record is readable"),
    ("alerts_late_readings_total", "no reading comes after its window closed"),
    ("model_server_load_failures_total", "every version loads"),
    ("model_server_shadow_skipped_total", "no shadow run finds the slots full at this rate"),
    ("processor_model_errors_total", "every Predict succeeds"),
    ("processor_transactions_total", "exactly-once delivery only"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_exports_metrics_that_add_up_and_cover_the_dashboard() {
    let pipeline = Pipeline::start("metrics").await;

    // A canary rollout 1 -> 2 at 50% with shadow scoring and a one-second analysis.
    let mut rollouts = proto::vigil::rollout::v1::rollout_service_client::RolloutServiceClient::connect(format!(
        "http://{}",
        pipeline.model_server_grpc
    ))
    .await
    .unwrap();
    let spec = proto::vigil::rollout::v1::RolloutSpec {
        model: "car-anomaly".into(),
        stable_version: 1,
        canary_version: 2,
        canary_weight_percent: 50.0,
        shadow_percent: 100.0,
        analysis: Some(proto::vigil::rollout::v1::Analysis {
            step_weights_percent: vec![50.0],
            interval_seconds: 1,
            min_samples: 5,
            ..Default::default()
        }),
    };
    rollouts.start_rollout(proto::vigil::rollout::v1::StartRolloutRequest { spec: Some(spec) }).await.unwrap();

    // A small simulated fleet publishing a known number of readings, with its own
    // endpoint, as `device-simulator run --admin-listen` serves it.
    let registry = prometheus::Registry::new();
    let publish_metrics = device_simulator::metrics::PublishMetrics::new(&registry).unwrap();
    let (simulator_listener, simulator_admin) = loopback().await;
    let (stop_simulator_admin, simulator_admin_stopped) = oneshot::channel::<()>();
    tokio::spawn(admin::serve(simulator_listener, registry, admin::Readiness::new(), async {
        let _ = simulator_admin_stopped.await;
    }));
    let endpoints = [
        ("device-simulator", simulator_admin),
        ("ingest", pipeline.ingest_admin),
        ("stream-processor", pipeline.processor_admin),
        ("model-server", pipeline.model_server_rest),
        ("alerts", pipeline.alerts_admin),
    ];
    // Scraping from before the traffic, so rates over the run are not zero.
    let prometheus = Prometheus::start_if_configured(&endpoints);
    let (cars, per_car) = (4usize, 25u64);
    let fleet = device_simulator::fleet::FleetOptions { cars, seed: 11, ..Default::default() };
    let mut options = device_simulator::publish::PublishOptions::new("127.0.0.1", pipeline.mqtt.v4.port());
    options.version = device_simulator::publish::MqttVersion::V311;
    options.interval = Duration::from_millis(100);
    options.readings_per_car = Some(per_car);
    options.client_id_prefix = "metrics-fleet".into();
    let report =
        device_simulator::publish::publish(&fleet, &options, &publish_metrics, std::future::pending()).await.unwrap();
    let published = cars as u64 * per_car;
    assert_eq!(report.acknowledged, published);

    // What else operators watch for: a malformed message (ingest's dead letter), a record
    // that is no reading (the processor's), a reading far out of the ordinary (an
    // anomaly), and a request for a model that does not exist (a model server error).
    let options = rumqttc::v5::MqttOptions::new("odd-device", "127.0.0.1", pipeline.mqtt.v5.port());
    let (client, mut events) = rumqttc::v5::AsyncClient::new(options, 10);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    client.publish(format!("{PREFIX}/car-odd"), QoS::AtLeastOnce, false, b"{not json".to_vec()).await.unwrap();
    let mut hot = reading("car-hot");
    hot.coolant_temp = 140.0;
    hot.tire_pressure_1_1 = 5.0;
    client
        .publish(format!("{PREFIX}/car-hot"), QoS::AtLeastOnce, false, sensor::json::to_json(&hot).into_bytes())
        .await
        .unwrap();
    let garbage =
        rdkafka::producer::FutureRecord::<str, [u8]>::to(READINGS).key("car-garbage").payload(&b"garbage"[..]);
    produce(&producer(&pipeline.kafka), vec![garbage]).await;
    let mut predict = proto::tensorflow::serving::prediction_service_client::PredictionServiceClient::connect(format!(
        "http://{}",
        pipeline.model_server_grpc
    ))
    .await
    .unwrap();
    let unknown = proto::tensorflow::serving::PredictRequest {
        model_spec: Some(proto::tensorflow::serving::ModelSpec { name: "no-such-model".into(), ..Default::default() }),
        ..Default::default()
    };
    assert!(predict.predict(unknown).await.is_err());
    let scored = published + 1; // the fleet and the hot car
    pipeline.read(SCORES, scored as usize).await;

    // Every figure settles (the processor counts once its writes are confirmed, just
    // after the records appear; consumer lag comes with librdkafka's statistics; the
    // analysis decides once a second).
    let scrape_all = async || {
        let mut pages = Vec::new();
        for (service, address) in endpoints {
            pages.push((service, pipeline.scrape(address).await));
        }
        pages
    };
    let settled = |pages: &Vec<(&str, String)>| {
        admin::metric_sum(&pages[2].1, "processor_scores_total") as u64 >= scored
            && admin::metric_sum(&pages[2].1, "processor_dead_lettered_total") >= 1.0
            && pages[2].1.contains("processor_consumer_lag{")
            && admin::metric_sum(&pages[3].1, "model_server_rollout_decisions_total") >= 1.0
            && admin::metric_sum(&pages[4].1, "alerts_scores_consumed_total") as u64 >= scored
            && admin::metric_sum(&pages[4].1, "alerts_fired_total") >= 1.0
    };
    // What is there after 30 s either way: the assertions below say which figure is off.
    let pages = observe_until(Duration::from_secs(30), scrape_all, settled).await;
    for (service, page) in &pages {
        check_exposition(service, page);
        // Every service reports its process (admin::register_process_metrics); CPU comes
        // in whole seconds, which this short run may not have used yet.
        for family in ["process_resident_memory_bytes", "process_open_fds", "process_threads"] {
            assert!(admin::metric_sum(page, family) > 0.0, "{service}: no {family}");
        }
        assert!(page.contains("\nprocess_cpu_seconds_total "), "{service}: no process_cpu_seconds_total");
    }
    let figure = |index: usize, name: &str| admin::metric_sum(&pages[index].1, name) as u64;
    assert_eq!(figure(0, "simulator_readings_published_total"), published);
    assert_eq!(figure(0, "simulator_readings_acknowledged_total"), published);
    assert_eq!(figure(1, "ingest_messages_received_total"), published + 2);
    assert_eq!(figure(1, "ingest_records_produced_total"), published + 1);
    assert_eq!(figure(1, "ingest_dead_lettered_total"), 1);
    assert_eq!(figure(2, "processor_readings_consumed_total"), published + 2);
    assert_eq!(figure(2, "processor_scores_total"), scored);
    assert_eq!(figure(2, "processor_dead_lettered_total"), 1);
    assert!(figure(2, "processor_anomalies_total") >= 1, "the hot car is an anomaly");
    // Batched calls: every scored reading was a row of one call, and the model server
    // answered every call (and the shadow runs besides).
    assert_eq!(figure(2, "processor_model_rows_per_call_sum"), scored);
    let calls = figure(2, "processor_model_rows_per_call_count");
    assert!(calls >= 1 && figure(3, "model_server_requests_total") >= calls, "{calls} calls answered");
    assert!(figure(3, "model_server_request_errors_total") >= 1, "the unknown model");
    assert!(figure(3, "model_server_shadow_rows_total") >= 1, "shadow scoring ran");
    assert!(figure(3, "model_server_rollout_decisions_total") >= 1, "the analysis decided");
    assert_eq!(figure(4, "alerts_scores_consumed_total"), scored);
    assert_eq!(figure(4, "alerts_assigned_partitions"), 2);
    let fired = figure(4, "alerts_fired_total");
    assert!(fired >= cars as u64, "each car's first window closed as its later readings came: {fired}");

    // The dashboard queries only what the services export.
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (service, page) in &pages {
        let file = dir.path().join(format!("{service}.prom"));
        std::fs::write(&file, page).unwrap();
        files.push(file);
    }
    let dashboard = root().join("deploy/grafana/dashboards/vigil.json");
    let mut check = std::process::Command::new("python3");
    check.arg(root().join("deploy/grafana/check_dashboard.py")).arg(&dashboard).arg("--against").args(&files);
    for (metric, _why) in NOT_REACHED {
        check.args(["--ignore", metric]);
    }
    let output = check.output().expect("python3 runs");
    assert!(
        output.status.success(),
        "the dashboard queries metrics no service exports:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    if let Some(prometheus) = prometheus {
        prometheus.evaluate_dashboard(&dashboard, scored).await;
    }
    let _ = stop_simulator_admin.send(());
    pipeline.stop().await;
}

/// A real Prometheus scraping the test's services every second, from the binary named by
/// `VIGIL_PROMETHEUS` (Debian's `prometheus`, which `tests/run-all.sh` installs). Killed
/// when dropped.
struct Prometheus {
    process: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts it when `VIGIL_PROMETHEUS` is set. Unset, it says so, and fails instead when
    /// `VIGIL_REQUIRE_PROMETHEUS=1` (as `tests/run-all.sh` sets it): CI never skips it.
    fn start_if_configured(targets: &[(&str, SocketAddr)]) -> Option<Self> {
        let Some(binary) = std::env::var_os("VIGIL_PROMETHEUS") else {
            assert!(
                std::env::var("VIGIL_REQUIRE_PROMETHEUS").as_deref() != Ok("1"),
                "VIGIL_REQUIRE_PROMETHEUS=1 but VIGIL_PROMETHEUS names no Prometheus binary"
            );
            eprintln!("no VIGIL_PROMETHEUS: the dashboard's queries are not evaluated on a real Prometheus");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let mut config = String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
        for (job, address) in targets {
            config.push_str(&format!("  - job_name: {job}\n    static_configs:\n      - targets: ['{address}']\n"));
        }
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        // A port of the OS's choosing, given back for Prometheus to bind.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let process = std::process::Command::new(&binary)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting Prometheus ({}): {e}", binary.to_string_lossy()));
        Some(Self { process, url: format!("http://127.0.0.1:{port}"), _dir: dir })
    }

    /// The value of an instant query's first sample, if it has one.
    async fn value(&self, query: &str) -> Option<f64> {
        let response = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", query)])
            .send()
            .await
            .ok()?;
        let answer: serde_json::Value = response.json().await.ok()?;
        answer["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Waits until Prometheus has scraped the settled figures (every target up, all
    /// `scored` readings counted) and holds a few samples of every target (a rate needs
    /// two), then evaluates every query of the dashboard, and a TF Serving dashboard's
    /// request rate, through its HTTP API: each must return data.
    async fn evaluate_dashboard(&self, dashboard: &std::path::Path, scored: u64) {
        let what = "Prometheus to scrape all five services, three times and after the run settled";
        eventually(Duration::from_secs(60), what, async || {
            self.value("count(up == 1)").await == Some(5.0)
                && self.value("min(count_over_time(up[5m]))").await >= Some(3.0)
                && self.value("sum(processor_scores_total)").await >= Some(scored as f64)
                && self.value("sum(alerts_scores_consumed_total)").await >= Some(scored as f64)
        })
        .await;
        let mut evaluate = std::process::Command::new("python3");
        evaluate
            .arg(root().join("deploy/grafana/evaluate_dashboard.py"))
            .arg(dashboard)
            .args(["--prometheus", &self.url, "--var", "model=car-anomaly", "--var", "version=.*"])
            .args(["--rate-interval", "1m", "--range", "5m"])
            .args(["--query", "sum by (status) (:tensorflow:serving:request_count{model_name=\"car-anomaly\"}) > 0"]);
        for (metric, why) in NOT_REACHED {
            evaluate.args(["--may-be-empty", &format!("{metric}: {why}")]);
        }
        let output = evaluate.output().expect("python3 runs");
        let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "dashboard queries without data on a real Prometheus:\n{report}");
        eprintln!("{report}");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// A page in the Prometheus text format: `# HELP`/`# TYPE` comments and `name{labels}
/// value` samples with a number for a value, every sample's family declared.
fn check_exposition(service: &str, page: &str) {
    assert!(!page.trim().is_empty(), "{service}: empty /metrics");
    let mut declared = std::collections::HashSet::new();
    for line in page.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap();
            let kind = parts.next().unwrap_or_default();
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{service}: {line}");
            declared.insert(name.to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{service}: {line}"));
        assert!(value.parse::<f64>().is_ok(), "{service}: not a number in {line:?}");
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{service}: bad metric name in {line:?}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|f| declared.contains(*f)))
            .unwrap_or(name);
        assert!(declared.contains(family), "{service}: {name} has no # TYPE line");
    }
}
