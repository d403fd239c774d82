//! Benchmark: readings/s into Kafka through ingest with no MQTT broker in between, MQTT
//! proxy mode (devices connect to ingest, QoS 1, each PUBACK after Kafka confirmed) and
//! HTTP ingest (`POST /v1/readings`, batches of 100, each 200 after Kafka confirmed), next
//! to the Kafka side alone: the same records through ingest's own `Sink`, which is what
//! the targets are ratios of. Then publish-to-PUBACK latency through the proxy at
//! half of its measured peak.
//!
//! Per round, ingest starts in this process (proxy and HTTP listeners) and the readings
//! (made and serialised beforehand, untimed) are sent by [`CONNECTIONS`] rumqttc MQTT 3.1.1
//! clients or [`HTTP_CLIENTS`] HTTP clients, also in this process: the clock runs from the
//! first send to the last acknowledgement. So the rate includes the clients' own cost on
//! the same 2 cores, which a real fleet pays on its own devices; the CPU figures say how
//! much. Rounds alternate the order of the three, so a slow spell hits all alike. Kafka is
//! librdkafka's mock cluster in this process, or with `VIGIL_BENCH_KAFKA=host:port` an
//! external broker (benchmarks/ingest-bridge.sh runs it on tansu too).
//!
//! Run: `cargo bench -p ingest --bench proxy` (writes
//! `benchmarks/results/ingest-proxy.json`; see docs/benchmarks.md).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use embedded_brokers::KafkaUnderTest;
use ingest::config::{IngestConfig, PayloadKind, RuleConfig};
use serde_json::json;

const READINGS_PER_ROUND: u64 = 60_000;
const CARS: usize = 100;
/// Device connections to the proxy (10 cars each, as a gateway or a car's several ECUs).
const CONNECTIONS: usize = 10;
/// Each client's window of unacknowledged QoS 1 messages: the proxy's default receive
/// maximum.
const CLIENT_IN_FLIGHT: u16 = 64;
const HTTP_CLIENTS: usize = 8;
const HTTP_BATCH: usize = 100;
/// The Kafka-only reference's window: the most the proxy holds for these clients.
const KAFKA_ONLY_IN_FLIGHT: usize = CONNECTIONS * CLIENT_IN_FLIGHT as usize;
const ROUNDS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Proxy,
    Http,
    KafkaOnly,
}

struct Kafka {
    broker: KafkaUnderTest,
    readings_topic: String,
    dead_letter_topic: String,
}

fn ingest_config(kafka: &Kafka, prefix: &str) -> IngestConfig {
    let mut config = IngestConfig::default();
    config.mqtt.url.clear();
    config.grpc.listen.clear();
    config.rules = vec![RuleConfig {
        filter: Some(format!("{prefix}/+")),
        regex: None,
        topic: kafka.readings_topic.clone(),
        key: None,
        device_id: Some("{level:2}".to_owned()),
        payload: PayloadKind::SensorReading,
    }];
    config.http.topic = kafka.readings_topic.clone();
    config.kafka.insert("bootstrap.servers".into(), kafka.broker.bootstrap_servers().into());
    config.dead_letter_topic = kafka.dead_letter_topic.clone();
    // As in the bridge bench: another linger for every path alike.
    if let Ok(linger) = std::env::var("VIGIL_BENCH_LINGER_MS") {
        config.kafka.insert("linger.ms".into(), linger);
    }
    config
}

struct RunningIngest {
    admin: test_support::Endpoint,
    proxy: SocketAddr,
    http: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), ingest::IngestError>>,
}

async fn start_ingest(config: IngestConfig) -> RunningIngest {
    let bind = || async { tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap() };
    let (admin, proxy, http) = (bind().await, bind().await, bind().await);
    let addresses = (admin.local_addr().unwrap(), proxy.local_addr().unwrap(), http.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listeners = ingest::Listeners { admin: Some(admin), mqtt_proxy: Some(proxy), http: Some(http), grpc: None };
    let task = tokio::spawn(ingest::run(config, listeners, async {
        let _ = stopped.await;
    }));
    let admin = test_support::Endpoint::new(addresses.0);
    admin.wait_ready("ingest", Duration::from_secs(20)).await;
    RunningIngest { admin, proxy: addresses.1, http: addresses.2, stop, task }
}

impl RunningIngest {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// One device connection publishing `messages` at QoS 1, one every `gap` (as fast as its
/// window allows when `None`); the publish-to-PUBACK time of each, in seconds. The clock
/// of a message starts when rumqttc wrote its PUBLISH.
async fn device(proxy: SocketAddr, id: String, messages: Vec<(String, Vec<u8>)>, gap: Option<Duration>) -> Vec<f64> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let mut options = MqttOptions::new(id, proxy.ip().to_string(), proxy.port());
    options.set_inflight(CLIENT_IN_FLIGHT).set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 2 * usize::from(CLIENT_IN_FLIGHT));
    let total = messages.len();
    let sender = tokio::spawn(async move {
        let mut ticks = gap.map(tokio::time::interval);
        for (topic, payload) in messages {
            if let Some(ticks) = &mut ticks {
                ticks.tick().await;
            }
            client.publish(topic, QoS::AtLeastOnce, false, payload).await.unwrap();
        }
        client
    });
    let mut written_at: HashMap<u16, Instant> = HashMap::new();
    let mut latencies = Vec::with_capacity(total);
    while latencies.len() < total {
        match events.poll().await.expect("the proxy keeps the connection") {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                written_at.insert(pkid, Instant::now());
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let written = written_at.remove(&ack.pkid).expect("a PUBACK for a PUBLISH sent");
                latencies.push(written.elapsed().as_secs_f64());
            }
            _ => {}
        }
    }
    let client = sender.await.unwrap();
    let _ = client.disconnect().await;
    latencies
}

/// Every message through the proxy on [`CONNECTIONS`] connections, each paced to a share
/// of `rate` (as fast as acknowledgements allow when `None`): (readings/s, latencies,
/// cores busy in this process).
async fn proxy_round(kafka: &Kafka, tag: &str, rate: Option<f64>) -> (f64, Vec<f64>, f64) {
    let prefix = format!("bench/{tag}");
    let messages = common::mqtt_messages(&prefix, &common::fleet_readings(CARS, READINGS_PER_ROUND / CARS as u64));
    let ingest = start_ingest(ingest_config(kafka, &prefix)).await;
    let mut shares: Vec<Vec<(String, Vec<u8>)>> = vec![Vec::new(); CONNECTIONS];
    for (i, message) in messages.into_iter().enumerate() {
        // Cars stay on one connection: car i of the fleet's step goes to i % CONNECTIONS.
        shares[(i % CARS) % CONNECTIONS].push(message);
    }
    let gap = rate.map(|rate| Duration::from_secs_f64(CONNECTIONS as f64 / rate));
    let start = Instant::now();
    let cpu = common::process_cpu_seconds();
    let devices: Vec<_> = shares
        .into_iter()
        .enumerate()
        .map(|(c, share)| tokio::spawn(device(ingest.proxy, format!("{tag}-{c}"), share, gap)))
        .collect();
    let mut latencies = Vec::new();
    for device in devices {
        latencies.extend(device.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cores = (common::process_cpu_seconds() - cpu) / elapsed;
    assert_eq!(ingest.admin.metric_sum("ingest_dead_lettered_total").await, 0.0, "every reading valid");
    ingest.stop().await;
    (latencies.len() as f64 / elapsed, latencies, cores)
}

/// Every reading through HTTP ingest in batches of [`HTTP_BATCH`] from [`HTTP_CLIENTS`]
/// clients at once: (readings/s, cores busy in this process).
async fn http_round(kafka: &Kafka, tag: &str) -> (f64, f64) {
    let prefix = format!("bench/{tag}");
    let readings = common::fleet_readings(CARS, READINGS_PER_ROUND / CARS as u64);
    let bodies: Vec<String> = readings
        .chunks(HTTP_BATCH)
        .map(|batch| format!("[{}]", batch.iter().map(sensor::json::to_json).collect::<Vec<_>>().join(",")))
        .collect();
    let ingest = start_ingest(ingest_config(kafka, &prefix)).await;
    let url = format!("http://{}{}", ingest.http, ingest::http::PATH);
    let mut shares: Vec<Vec<String>> = vec![Vec::new(); HTTP_CLIENTS];
    for (i, body) in bodies.into_iter().enumerate() {
        shares[i % HTTP_CLIENTS].push(body);
    }
    let start = Instant::now();
    let cpu = common::process_cpu_seconds();
    let clients: Vec<_> = shares
        .into_iter()
        .map(|bodies| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                for body in bodies {
                    let response =
                        client.post(&url).header("content-type", "application/json").body(body).send().await.unwrap();
                    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap_or_default());
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cores = (common::process_cpu_seconds() - cpu) / elapsed;
    ingest.stop().await;
    (readings.len() as f64 / elapsed, cores)
}

async fn kafka_round(kafka: &Kafka, tag: &str) -> f64 {
    let prefix = format!("bench/{tag}");
    let config = ingest_config(kafka, &prefix);
    let messages = common::mqtt_messages(&prefix, &common::fleet_readings(CARS, READINGS_PER_ROUND / CARS as u64));
    common::kafka_only_rate(&config, common::mqtt_records(&config, &messages), KAFKA_ONLY_IN_FLIGHT).await
}

async fn measure(kafka: &Kafka) -> serde_json::Value {
    let mut rates: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut cores: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut broker_cores: HashMap<&str, Vec<f64>> = HashMap::new();
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 {
            [Path::Proxy, Path::Http, Path::KafkaOnly]
        } else {
            [Path::KafkaOnly, Path::Http, Path::Proxy]
        };
        for path in order {
            let tag = format!("{path:?}-r{round}").to_lowercase();
            let ((name, rate, busy), broker) = common::with_broker_cpu(async {
                match path {
                    Path::Proxy => {
                        let (rate, _, busy) = proxy_round(kafka, &tag, None).await;
                        ("proxy", rate, Some(busy))
                    }
                    Path::Http => {
                        let (rate, busy) = http_round(kafka, &tag).await;
                        ("http", rate, Some(busy))
                    }
                    Path::KafkaOnly => ("kafka_only", kafka_round(kafka, &tag).await, None),
                }
            })
            .await;
            let busy_text = busy.map_or(String::new(), |b| format!(", {b:.2} cores busy in this process"));
            let broker_text = broker.map_or(String::new(), |b| format!(", {b:.2} in the broker's"));
            eprintln!(
                "{:28} {name:10} round {round}: {rate:>9.0} readings/s{busy_text}{broker_text}",
                kafka.broker.name()
            );
            rates.entry(name).or_default().push(rate);
            if let Some(busy) = busy {
                cores.entry(name).or_default().push(busy);
            }
            if let Some(broker) = broker {
                broker_cores.entry(name).or_default().push(broker);
            }
        }
    }
    let median = |name: &str| common::median(rates[name].clone());
    let round3 = |x: f64| (x * 1000.0).round() / 1000.0;
    let (proxy, http, kafka_only) = (median("proxy"), median("http"), median("kafka_only"));

    // Latency at half of the proxy's peak, paced; and the Kafka side alone at that rate,
    // the floor under it.
    let half = proxy / 2.0;
    let (achieved, latencies, busy) = proxy_round(kafka, "latency", Some(half)).await;
    let ms = |latencies: &[f64], q: f64| round3(common::quantile(latencies.to_vec(), q) * 1e3);
    eprintln!(
        "{:28} proxy at {achieved:.0}/s (half of peak): publish-to-PUBACK p50 {} ms, p99 {} ms, {busy:.2} cores busy",
        kafka.broker.name(),
        ms(&latencies, 0.5),
        ms(&latencies, 0.99)
    );
    let floor = {
        let prefix = "bench/kafka-latency";
        let config = ingest_config(kafka, prefix);
        let messages = common::mqtt_messages(prefix, &common::fleet_readings(CARS, READINGS_PER_ROUND / CARS as u64));
        common::kafka_only_latencies(&config, common::mqtt_records(&config, &messages), half).await
    };
    eprintln!(
        "{:28} kafka only at {half:.0}/s: hand-over to confirmation p50 {} ms, p99 {} ms",
        kafka.broker.name(),
        ms(&floor, 0.5),
        ms(&floor, 0.99)
    );
    let by_round = |name: &str| rates[name].iter().map(|r| r.round()).collect::<Vec<_>>();
    let proxy_cores = common::median(cores["proxy"].clone());
    json!({
        "kafka": kafka.broker.name(),
        "kafka_only_readings_per_second": kafka_only.round(),
        "proxy_readings_per_second": proxy.round(),
        "http_readings_per_second": http.round(),
        "proxy_share_of_kafka_only": round3(proxy / kafka_only),
        "http_share_of_kafka_only": round3(http / kafka_only),
        "proxy_cores_busy": round3(proxy_cores),
        "proxy_readings_per_second_per_busy_core": (proxy / proxy_cores).round(),
        "http_cores_busy": round3(common::median(cores["http"].clone())),
        "broker_cores_busy": broker_cores
            .iter()
            .map(|(name, cores)| (name.to_string(), json!(round3(common::median(cores.clone())))))
            .collect::<serde_json::Map<_, _>>(),
        "by_round": {"proxy": by_round("proxy"), "http": by_round("http"), "kafka_only": by_round("kafka_only")},
        "latency_at_half_peak": {
            "target_readings_per_second": half.round(), "achieved_readings_per_second": achieved.round(),
            "publish_to_puback_p50_ms": ms(&latencies, 0.5), "publish_to_puback_p99_ms": ms(&latencies, 0.99),
            "cores_busy": round3(busy),
            "kafka_only_p50_ms": ms(&floor, 0.5), "kafka_only_p99_ms": ms(&floor, 0.99),
        },
    })
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let row = runtime.block_on(async {
        let broker = KafkaUnderTest::from_env().unwrap();
        let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let kafka = Kafka {
            readings_topic: format!("bench-proxy-readings-{run}"),
            dead_letter_topic: format!("bench-proxy-dead-letters-{run}"),
            broker,
        };
        kafka.broker.create_topic(&kafka.readings_topic, 4).await.unwrap();
        kafka.broker.create_topic(&kafka.dead_letter_topic, 1).await.unwrap();
        let mut row = measure(&kafka).await;
        // A run with another linger is kept beside the default's.
        if let Ok(linger) = std::env::var("VIGIL_BENCH_LINGER_MS") {
            row["kafka"] = json!(format!("{}, linger.ms {linger}", kafka.broker.name()));
        }
        row
    });
    let out = root.join("benchmarks/results/ingest-proxy.json");
    // One file holds the latest run per Kafka broker.
    let mut kept: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|file| file["results"].as_array().cloned())
        .unwrap_or_default();
    kept.retain(|kept| kept["kafka"] != row["kafka"]);
    kept.push(row);
    let report = json!({
        "benchmark": "readings/s into Kafka through ingest with no MQTT broker: MQTT proxy mode (QoS 1, PUBACK after \
                      Kafka) and HTTP ingest (batches of 100, 200 after Kafka) vs the Kafka side alone (the same \
                      records through ingest's Sink); clients in the bench process; one machine",
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "rounds": ROUNDS, "readings_per_round": READINGS_PER_ROUND, "cars": CARS,
        "proxy_connections": CONNECTIONS, "client_in_flight": CLIENT_IN_FLIGHT,
        "http_clients": HTTP_CLIENTS, "http_batch": HTTP_BATCH, "kafka_only_in_flight": KAFKA_ONLY_IN_FLIGHT,
        "results": kept,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap() + "\n").unwrap();
    eprintln!("wrote {}", out.display());
}
