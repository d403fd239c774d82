//! Benchmark: readings/s from MQTT into Kafka through ingest, next to the ceiling of the
//! same broker delivering the same readings to a subscriber that only counts them.
//!
//! Per round a simulated fleet (the device simulator, N cars) publishes a fixed number of
//! readings while the consumer is offline, so they queue in the consumer's persistent
//! session on the embedded broker (rumqttd); then the consumer connects and the clock runs
//! until it has taken all of them. The consumer is either ingest (in this process, writing
//! to librdkafka's mock cluster in this process, or with `VIGIL_BENCH_KAFKA=host:port` an
//! external broker, the clock stopping when its last PUBACK was sent, that is
//! after Kafka confirmed every reading) or the ceiling: a rumqttc MQTT 5 client that
//! acknowledges on arrival and discards. Both have the same broker, session settings and
//! receive maximum, and the publishers are not running while either is timed, so the
//! ratio is ingest's per-reading cost (parse, validate, protobuf, produce, confirm, ack)
//! against the bare cost of receiving. Rounds alternate the two, so a slow spell on a
//! shared machine hits both alike.
//!
//! Run: `cargo bench -p ingest --bench bridge` (writes
//! `benchmarks/results/ingest-bridge.json`; see docs/benchmarks.md).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use device_simulator::fleet::FleetOptions;
use device_simulator::metrics::PublishMetrics;
use device_simulator::publish::{PublishOptions, publish};
use embedded_brokers::{KafkaUnderTest, MqttBroker};
use ingest::config::{IngestConfig, MqttProtocol, PayloadKind, RuleConfig};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::json;
use test_support::Endpoint;

/// Readings per round, whatever the fleet's size.
const READINGS_PER_ROUND: u64 = 60_000;
/// (cars, cars per MQTT connection) of the fleet.
const FLEETS: [(usize, usize); 2] = [(100, 10), (2_000, 100)];
const ROUNDS: usize = 3;
/// Ingest's default, and the ceiling subscriber's receive maximum alike.
const IN_FLIGHT: usize = 1000;

/// MQTT sessions of the line-rate rounds (`mqtt.connections`), sharing one subscription.
const SESSIONS: usize = 4;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Consumer {
    Ceiling,
    Ingest,
    /// Ingest with [`SESSIONS`] sessions of one shared subscription (Mosquitto only:
    /// rumqttd 0.20 mishandles shared groups with persistent sessions).
    IngestSessions,
    /// Not an MQTT consumer: the Kafka side alone, for reference.
    KafkaOnly,
}

impl Consumer {
    fn name(self) -> &'static str {
        match self {
            Self::Ceiling => "ceiling: subscriber that discards",
            Self::Ingest => "ingest: MQTT -> Kafka, ack after Kafka",
            Self::IngestSessions => "ingest, 4 sessions of a shared subscription",
            Self::KafkaOnly => "kafka only: ingest's producer, no MQTT",
        }
    }
}

/// An MQTT broker under test: where publishers (MQTT 3.1.1) and consumers (MQTT 5) connect.
struct Mqtt {
    name: &'static str,
    publish_port: u16,
    consume_port: u16,
}

struct Brokers {
    mqtt: Mqtt,
    kafka: KafkaUnderTest,
    /// Named per run, so an external Kafka broker can be reused.
    readings_topic: String,
    dead_letter_topic: String,
}

/// Publishes `per_car` readings from each car of `fleet` under `prefix/<device>`.
async fn publish_fleet(brokers: &Brokers, cars: usize, per_connection: usize, per_car: u64, prefix: &str) {
    let fleet = FleetOptions { cars, ..FleetOptions::default() };
    // The simulator speaks MQTT 3.1.1; rumqttd routes it to the MQTT 5 consumers.
    let mut options = PublishOptions::new("127.0.0.1", brokers.mqtt.publish_port);
    options.version = device_simulator::publish::MqttVersion::V311;
    options.topic_prefix = prefix.to_owned();
    options.interval = Duration::from_millis(1);
    options.readings_per_car = Some(per_car);
    options.cars_per_connection = per_connection;
    options.client_id_prefix = format!("{prefix}-sim").replace('/', "-");
    let report = publish(&fleet, &options, &PublishMetrics::unregistered(), std::future::pending()).await.unwrap();
    assert_eq!(report.acknowledged, cars as u64 * per_car, "the broker took every reading");
}

/// The ceiling: an MQTT 5 client with a persistent session that acks on arrival.
fn ceiling_client(brokers: &Brokers, client_id: &str) -> (AsyncClient, rumqttc::v5::EventLoop) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", brokers.mqtt.consume_port);
    options
        .set_clean_start(false)
        .set_session_expiry_interval(Some(600))
        .set_receive_maximum(Some(IN_FLIGHT as u16))
        .set_keep_alive(Duration::from_secs(30));
    AsyncClient::new(options, IN_FLIGHT * 2)
}

async fn ceiling_round(brokers: &Brokers, cars: usize, per_connection: usize, per_car: u64, tag: &str) -> f64 {
    let prefix = format!("bench/{tag}");
    let client_id = format!("ceiling-{tag}");
    {
        let (client, mut events) = ceiling_client(brokers, &client_id);
        client.subscribe(format!("{prefix}/+"), QoS::AtLeastOnce).await.unwrap();
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.unwrap() {
                break;
            }
        }
        client.disconnect().await.unwrap();
        while events.poll().await.is_ok() {}
    }
    publish_fleet(brokers, cars, per_connection, per_car, &prefix).await;
    let total = cars as u64 * per_car;
    let start = Instant::now();
    let (client, mut events) = ceiling_client(brokers, &client_id);
    let mut received = 0u64;
    while received < total {
        if let Event::Incoming(Packet::Publish(_)) = events.poll().await.unwrap() {
            received += 1;
        }
    }
    let elapsed = start.elapsed();
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), async { while events.poll().await.is_ok() {} }).await;
    total as f64 / elapsed.as_secs_f64()
}

fn ingest_config(brokers: &Brokers, prefix: &str, client_id: &str, sessions: usize) -> IngestConfig {
    let mut config = IngestConfig::default();
    config.mqtt.url = format!("mqtt://127.0.0.1:{}", brokers.mqtt.consume_port);
    config.mqtt.protocol = MqttProtocol::V5;
    config.mqtt.client_id = client_id.to_owned();
    config.mqtt.subscriptions = vec![format!("{prefix}/+")];
    // A plain persistent subscription, like the ceiling's (rumqttd 0.20 mishandles a
    // shared group's last member leaving with a persistent session); several sessions
    // share one.
    if sessions == 1 {
        config.mqtt.share_group.clear();
    } else {
        config.mqtt.share_group = format!("{client_id}-group");
        config.mqtt.connections = sessions;
    }
    config.rules = vec![RuleConfig {
        filter: Some(format!("{prefix}/+")),
        regex: None,
        topic: brokers.readings_topic.clone(),
        key: None,
        device_id: Some("{level:2}".to_owned()),
        payload: PayloadKind::SensorReading,
    }];
    config.kafka.insert("bootstrap.servers".into(), brokers.kafka.bootstrap_servers().into());
    config.dead_letter_topic = brokers.dead_letter_topic.clone();
    config.max_in_flight = IN_FLIGHT;
    if let Ok(linger) = std::env::var("VIGIL_BENCH_LINGER_MS") {
        config.kafka.insert("linger.ms".into(), linger);
    }
    config.grpc.listen.clear();
    config
}

struct RunningIngest {
    admin: Endpoint,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), ingest::IngestError>>,
}

async fn start_ingest(config: IngestConfig) -> RunningIngest {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = Endpoint::new(listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listeners = ingest::Listeners { admin: Some(listener), ..Default::default() };
    let task = tokio::spawn(ingest::run(config, listeners, async {
        let _ = stopped.await;
    }));
    RunningIngest { admin, stop, task }
}

impl RunningIngest {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

async fn ingest_round(
    brokers: &Brokers,
    cars: usize,
    per_connection: usize,
    per_car: u64,
    tag: &str,
    sessions: usize,
) -> f64 {
    let prefix = format!("bench/{tag}");
    let config = ingest_config(brokers, &prefix, &format!("ingest-{tag}"), sessions);
    // Subscribe once, then leave the session behind for the readings to queue in.
    let first = start_ingest(config.clone()).await;
    first.admin.wait_ready("ingest", Duration::from_secs(20)).await;
    first.stop().await;
    publish_fleet(brokers, cars, per_connection, per_car, &prefix).await;
    let total = cars as u64 * per_car;
    let start = Instant::now();
    let cpu = common::process_cpu_seconds();
    let ingest = start_ingest(config).await;
    // The clock, not a wait: no deadline, and looked at every 2 ms over one kept-alive
    // connection (the endpoint's client), so the reading costs the measured process little.
    while (ingest.admin.metric_sum("ingest_mqtt_acked_total").await as u64) < total {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = start.elapsed();
    let latency = ingest.admin.metric_sum("ingest_produce_latency_seconds_sum").await
        / ingest.admin.metric_sum("ingest_produce_latency_seconds_count").await;
    eprintln!(
        "  mean produce latency {:.2} ms, {:.2} cores busy in this process",
        latency * 1e3,
        (common::process_cpu_seconds() - cpu) / elapsed.as_secs_f64()
    );
    let dead = ingest.admin.metric_sum("ingest_dead_lettered_total").await;
    assert_eq!(dead, 0.0, "the simulator's readings are all valid");
    ingest.stop().await;
    total as f64 / elapsed.as_secs_f64()
}

/// Every fleet size on `brokers`, rounds alternating the ceiling and ingest.
async fn measure(brokers: &Brokers, only: Option<Consumer>) -> Vec<serde_json::Value> {
    let mut rows = Vec::new();
    for (cars, per_connection) in FLEETS {
        let per_car = READINGS_PER_ROUND / cars as u64;
        let mut ceiling = Vec::new();
        let mut bridge = Vec::new();
        let mut kafka_only = Vec::new();
        let mut sessions = Vec::new();
        let shared_groups = brokers.mqtt.name == "Mosquitto";
        for round in 0..ROUNDS {
            // Alternate which goes first within a round.
            let order = if round % 2 == 0 {
                [Consumer::Ceiling, Consumer::Ingest, Consumer::IngestSessions, Consumer::KafkaOnly]
            } else {
                [Consumer::KafkaOnly, Consumer::IngestSessions, Consumer::Ingest, Consumer::Ceiling]
            };
            for consumer in order {
                if only.is_some_and(|only| only != consumer) || (consumer == Consumer::IngestSessions && !shared_groups)
                {
                    continue;
                }
                let broker = brokers.mqtt.name.split(' ').next().unwrap_or_default().to_lowercase();
                let tag = format!("{broker}-c{cars}-r{round}-{consumer:?}").to_lowercase();
                let rate = match consumer {
                    Consumer::Ceiling => ceiling_round(brokers, cars, per_connection, per_car, &tag).await,
                    Consumer::Ingest => ingest_round(brokers, cars, per_connection, per_car, &tag, 1).await,
                    Consumer::IngestSessions => {
                        ingest_round(brokers, cars, per_connection, per_car, &tag, SESSIONS).await
                    }
                    Consumer::KafkaOnly => kafka_round(brokers, cars, per_car, &tag).await,
                };
                eprintln!(
                    "{:18} {:40} cars={cars:<5} round {round}: {rate:>9.0} readings/s",
                    brokers.mqtt.name,
                    consumer.name()
                );
                match consumer {
                    Consumer::Ceiling => ceiling.push(rate),
                    Consumer::Ingest => bridge.push(rate),
                    Consumer::IngestSessions => sessions.push(rate),
                    Consumer::KafkaOnly => kafka_only.push(rate),
                }
            }
        }
        if only.is_some() {
            continue;
        }
        let shares: Vec<f64> = bridge.iter().zip(&ceiling).map(|(b, c)| b / c).collect();
        let round3 = |x: f64| (x * 1000.0).round() / 1000.0;
        let share = round3(common::median(shares.clone()));
        eprintln!(
            "  {} cars={cars}: ingest at {share} of the ceiling (median of the per-round ratios)",
            brokers.mqtt.name
        );
        rows.push(json!({
            "cars": cars, "cars_per_connection": per_connection,
            "readings": per_car * cars as u64,
            "ceiling_readings_per_second": common::median(ceiling.clone()).round(),
            "ingest_readings_per_second": common::median(bridge.clone()).round(),
            "ceiling_by_round": ceiling.iter().map(|r| r.round()).collect::<Vec<_>>(),
            "ingest_by_round": bridge.iter().map(|r| r.round()).collect::<Vec<_>>(),
            "kafka_only_readings_per_second": common::median(kafka_only.clone()).round(),
            "kafka_only_by_round": kafka_only.iter().map(|r| r.round()).collect::<Vec<_>>(),
            "share_of_ceiling": share,
            "share_of_ceiling_by_round": shares.into_iter().map(round3).collect::<Vec<_>>(),
            "ingest_share_of_kafka_only": round3(common::median(bridge.clone()) / common::median(kafka_only.clone())),
        }));
        if !sessions.is_empty() {
            let row = rows.last_mut().unwrap();
            let rate = common::median(sessions.clone());
            row["ingest_sessions"] = json!(SESSIONS);
            row["ingest_sessions_readings_per_second"] = json!(rate.round());
            row["ingest_sessions_by_round"] = json!(sessions.iter().map(|r| r.round()).collect::<Vec<_>>());
            row["ingest_sessions_share_of_kafka_only"] = json!(round3(rate / common::median(kafka_only.clone())));
        }
    }
    rows
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    // `VIGIL_BENCH_CONSUMER=ingest` (or `ceiling`) runs only that one and writes nothing,
    // for profiling.
    let only = std::env::var("VIGIL_BENCH_CONSUMER").ok().map(|name| match name.as_str() {
        "ingest" => Consumer::Ingest,
        "sessions" => Consumer::IngestSessions,
        "ceiling" => Consumer::Ceiling,
        "kafka" => Consumer::KafkaOnly,
        other => panic!("VIGIL_BENCH_CONSUMER: {other:?} is neither ingest nor ceiling"),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let mut rows = Vec::new();
    let mut kafka_name = String::new();
    runtime.block_on(async {
        let kafka = KafkaUnderTest::from_env().unwrap();
        let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let (readings_topic, dead_letter_topic) =
            (format!("bench-readings-{run}"), format!("bench-dead-letters-{run}"));
        kafka.create_topic(&readings_topic, 4).await.unwrap();
        kafka.create_topic(&dead_letter_topic, 1).await.unwrap();
        kafka_name = kafka.name().to_owned();
        let embedded = MqttBroker::start().unwrap();
        let mut brokers = vec![Mqtt {
            name: "rumqttd (embedded)",
            publish_port: embedded.v4.port(),
            consume_port: embedded.v5.port(),
        }];
        if let Ok(port) = std::env::var("VIGIL_BENCH_MOSQUITTO_PORT") {
            let port = port.parse().expect("VIGIL_BENCH_MOSQUITTO_PORT: a port");
            brokers.push(Mqtt { name: "Mosquitto", publish_port: port, consume_port: port });
        }
        let mut kafka = Some(kafka);
        for mqtt in brokers {
            let name = mqtt.name;
            let under_test = Brokers {
                mqtt,
                kafka: kafka.take().unwrap(),
                readings_topic: readings_topic.clone(),
                dead_letter_topic: dead_letter_topic.clone(),
            };
            for mut row in measure(&under_test, only).await {
                row["broker"] = json!(name);
                row["kafka"] = json!(under_test.kafka.name());
                rows.push(row);
            }
            kafka = Some(under_test.kafka);
        }
    });
    if only.is_some() {
        return;
    }
    let out = root.join("benchmarks/results/ingest-bridge.json");
    // One file holds the latest run per Kafka broker.
    let mut kept: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|file| file["results"].as_array().cloned())
        .unwrap_or_default();
    kept.retain(|row| row["kafka"].as_str().is_some_and(|kafka| kafka != kafka_name));
    kept.extend(rows);
    let rows = kept;
    let report = json!({
        "benchmark": "MQTT -> Kafka readings/s: ingest (MQTT broker -> ingest -> Kafka broker, ack after Kafka) \
                      vs the same broker delivering to a subscriber that discards; readings queued in a persistent \
                      session, then drained; one machine",
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "rounds": ROUNDS, "in_flight": IN_FLIGHT,
        "results": rows,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap() + "\n").unwrap();
    eprintln!("wrote {}", out.display());
}

/// The Kafka side alone ([`common::kafka_only_rate`]) for the records ingest would write
/// for the same fleet.
async fn kafka_round(brokers: &Brokers, cars: usize, per_car: u64, tag: &str) -> f64 {
    let prefix = format!("bench/{tag}");
    let config = ingest_config(brokers, &prefix, "unused", 1);
    let messages = common::mqtt_messages(&prefix, &common::fleet_readings(cars, per_car));
    common::kafka_only_rate(&config, common::mqtt_records(&config, &messages), IN_FLIGHT).await
}
