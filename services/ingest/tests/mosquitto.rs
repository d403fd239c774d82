//! System tests against a real, independent MQTT broker: Mosquitto, started by
//! `tests/system/ingest_mosquitto.sh` (which `.ci/run` runs) with a plain listener and a
//! TLS listener that requires a password. They are `#[ignore]`d in a plain `cargo test`
//! because they need that broker; the script runs them with `--ignored` and the
//! environment below. Kafka is librdkafka's mock cluster, in this process.
//!
//! - `VIGIL_MOSQUITTO_URL`: the plain listener (anonymous).
//! - `VIGIL_MOSQUITTO_TLS_URL`, `VIGIL_MOSQUITTO_CA`, `VIGIL_MOSQUITTO_USER`,
//!   `VIGIL_MOSQUITTO_PASSWORD`: the TLS listener, its CA, and an account on it.
//! - `VIGIL_SEED_DATA`: the seed demo's data folder (`car-sensor-data.csv`, `cardata-v1.json`).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use device_simulator::fleet::FleetOptions;
use device_simulator::metrics::PublishMetrics;
use device_simulator::publish::{PublishOptions, publish};
use embedded_brokers::KafkaCluster;
use ingest::config::IngestConfig;
use support::{DEAD_LETTERS, READINGS, RunningIngest, kafka, readings};
use test_support::kafka::{read_to_end, read_topic};
use test_support::{ChildService, Endpoint, Output, observe_until};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run tests/system/ingest_mosquitto.sh"))
}

/// Host and port of the plain listener.
fn plain() -> (String, u16) {
    let endpoint = ingest::mqtt::parse_url(&env("VIGIL_MOSQUITTO_URL")).unwrap();
    (endpoint.host, endpoint.port)
}

/// Each test shares its own group (`group`): the tests run against one broker, and the
/// sessions of a finished test must not take a share of the next test's readings.
fn config(kafka: &KafkaCluster, url: &str, client_id: &str, group: &str) -> IngestConfig {
    let mut config = support::config(kafka, url, client_id);
    config.mqtt.share_group = group.to_owned();
    config.mqtt.session_expiry_seconds = 120;
    config
}

fn fleet(cars: usize) -> FleetOptions {
    FleetOptions { cars, fault_share: 0.3, onset_window_s: (0.05, 0.2), ..FleetOptions::default() }
}

/// Publishes `per_car` readings per car to the plain listener, every `interval_ms`.
fn simulate(fleet: &FleetOptions, per_car: u64, interval_ms: u64, prefix: &str) -> tokio::task::JoinHandle<u64> {
    let (host, port) = plain();
    let fleet = fleet.clone();
    let mut options = PublishOptions::new(host, port);
    options.interval = Duration::from_millis(interval_ms);
    options.readings_per_car = Some(per_car);
    options.cars_per_connection = 5;
    options.client_id_prefix = prefix.to_owned();
    tokio::spawn(async move {
        let report = publish(&fleet, &options, &PublishMetrics::unregistered(), std::future::pending()).await.unwrap();
        assert_eq!(report.acknowledged, report.published, "Mosquitto acknowledged every reading");
        report.published
    })
}

/// Distinct (device, sequence) pairs among `records`.
fn distinct(records: &[embedded_brokers::ReadRecord]) -> BTreeSet<(String, u64)> {
    readings(records).into_iter().map(|r| (r.device_id, r.sequence)).collect()
}

/// The `ingest` binary as a child process, its admin endpoint on a port it picked.
struct IngestProcess {
    process: ChildService,
    admin: Endpoint,
}

impl IngestProcess {
    fn start(kafka: &KafkaCluster, client_id: &str, group: &str) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ingest"));
        command
            .args(["--mqtt-url", &env("VIGIL_MOSQUITTO_URL"), "--kafka-brokers", kafka.bootstrap_servers()])
            .args(["--client-id", client_id, "--grpc-listen", "", "--admin-listen", "127.0.0.1:0"])
            .env("INGEST_MQTT__SHARE_GROUP", group)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        // The log names the admin address it bound; the rest of the log is echoed.
        let mut process = ChildService::spawn("ingest", command, Output::Stderr);
        let admin = Endpoint::new(process.logged_address("serving /live", Duration::from_secs(60)));
        Self { process, admin }
    }

    async fn wait_ready(&self) {
        self.admin.wait_ready("ingest", Duration::from_secs(20)).await;
    }

    /// SIGKILL: no drain, no acknowledgement, no DISCONNECT.
    fn kill(self) {
        self.process.kill();
    }

    /// SIGTERM, and the exit status of the graceful shutdown.
    fn terminate(self) -> std::process::ExitStatus {
        self.process.terminate(Duration::from_secs(60))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: tests/system/ingest_mosquitto.sh runs it"]
async fn a_killed_ingest_process_loses_no_reading_mosquitto_acknowledged() {
    let kafka = kafka();
    let ingest = IngestProcess::start(&kafka, "crash-ingest", "crash");
    ingest.wait_ready().await;
    let fleet = fleet(20);
    let per_car = 100;
    let sending = simulate(&fleet, per_car, 10, "crash-sim");

    // Kill it while readings are flowing, stay down while the broker queues, restart.
    let kafka_read =
        |enough: u64| read_topic(&kafka, READINGS, Duration::from_secs(30), move |r| r.len() as u64 >= enough);
    let before_kill = kafka_read(300).await.len();
    assert!(before_kill >= 300, "readings flowed before the kill");
    ingest.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ingest = IngestProcess::start(&kafka, "crash-ingest", "crash");
    let sent = sending.await.unwrap();
    assert_eq!(sent, 20 * per_car);

    let records =
        read_topic(&kafka, READINGS, Duration::from_secs(60), move |r| distinct(r).len() as u64 >= sent).await;
    assert_eq!(distinct(&records).len() as u64, sent, "every reading Mosquitto acknowledged reached Kafka");
    assert!(records.len() as u64 >= sent);
    let status = ingest.terminate();
    assert!(status.success(), "graceful shutdown on SIGTERM: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: tests/system/ingest_mosquitto.sh runs it"]
async fn two_replicas_on_one_shared_subscription_split_the_fleet_and_write_each_reading_once() {
    let kafka = kafka();
    let url = env("VIGIL_MOSQUITTO_URL");
    let a = RunningIngest::start(config(&kafka, &url, "replica-a", "replicas"), None).await;
    let b = RunningIngest::start(config(&kafka, &url, "replica-b", "replicas"), None).await;
    let sent = simulate(&fleet(10), 40, 5, "shared-sim").await.unwrap();

    let records = read_topic(&kafka, READINGS, Duration::from_secs(30), move |r| r.len() as u64 >= sent).await;
    assert_eq!(records.len() as u64, sent);
    assert_eq!(distinct(&records).len() as u64, sent, "each reading once: the group shares one subscription");
    let (from_a, from_b) =
        (a.metric("ingest_messages_received_total").await, b.metric("ingest_messages_received_total").await);
    assert_eq!(from_a + from_b, sent as f64);
    assert!(from_a > 0.0 && from_b > 0.0, "both replicas took a share: {from_a} and {from_b}");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: tests/system/ingest_mosquitto.sh runs it"]
async fn ingest_connects_over_tls_with_a_password_and_refuses_a_wrong_one_clearly() {
    let kafka = kafka();
    let mut tls = config(&kafka, &env("VIGIL_MOSQUITTO_TLS_URL"), "tls-ingest", "tls");
    tls.mqtt.username = Some(env("VIGIL_MOSQUITTO_USER"));
    tls.mqtt.password = Some(env("VIGIL_MOSQUITTO_PASSWORD"));
    tls.mqtt.tls.ca_file = Some(env("VIGIL_MOSQUITTO_CA").into());
    let ingest = RunningIngest::start(tls.clone(), None).await;
    let sent = simulate(&fleet(4), 10, 5, "tls-sim").await.unwrap();
    let records = read_topic(&kafka, READINGS, Duration::from_secs(30), move |r| r.len() as u64 >= sent).await;
    assert_eq!(records.len() as u64, sent, "readings published in the clear arrive through the TLS session");
    ingest.stop().await.unwrap();

    // A wrong password: never ready, the failure counted, and it keeps retrying.
    let mut wrong = tls.clone();
    wrong.mqtt.client_id = "tls-ingest-wrong".into();
    wrong.mqtt.password = Some("not-the-password".into());
    // Without a CA the broker's self-signed chain is refused before any password is sent.
    let mut untrusted = tls;
    untrusted.mqtt.client_id = "tls-ingest-untrusted".into();
    untrusted.mqtt.tls.ca_file = None;
    for refused in [wrong, untrusted] {
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = Endpoint::new(admin.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task =
            tokio::spawn(ingest::run(refused, ingest::Listeners { admin: Some(admin), ..Default::default() }, async {
                let _ = stopped.await;
            }));
        let errors = observe_until(
            Duration::from_secs(10),
            async || endpoint.metric_sum("ingest_mqtt_connection_errors_total").await,
            |errors| *errors >= 2.0,
        )
        .await;
        assert!(errors >= 2.0, "the refused connection is retried and counted");
        assert_eq!(endpoint.status("/ready").await, 503, "not ready");
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(15), task).await.unwrap().unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto and the seed data: tests/system/ingest_mosquitto.sh runs it"]
async fn every_payload_the_seed_demo_publishes_lands_in_readings_or_dead_letters_with_a_reason() {
    let seed = std::path::PathBuf::from(env("VIGIL_SEED_DATA"));
    let payloads = support::seed_payloads(&seed);
    let total = payloads.len();
    assert!(total > 10_000, "the seed's 10,000 CSV rows and its JSON payloads");

    let kafka = kafka();
    let ingest = RunningIngest::start(config(&kafka, &env("VIGIL_MOSQUITTO_URL"), "seed-ingest", "seed"), None).await;
    let (host, port) = plain();
    let (client, mut events) = rumqttc::AsyncClient::new(rumqttc::MqttOptions::new("seed-publisher", host, port), 1000);
    let acked = tokio::spawn(async move {
        let mut acked = 0;
        while acked < total {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = events.poll().await.unwrap() {
                acked += 1;
            }
        }
    });
    for (car, payload) in payloads {
        client.publish(format!("vehicles/sensor/data/{car}"), rumqttc::QoS::AtLeastOnce, false, payload).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(60), acked).await.expect("Mosquitto acknowledged every payload").unwrap();

    let (records, letters) = observe_until(
        Duration::from_secs(60),
        async || (read_to_end(&kafka, READINGS).await, read_to_end(&kafka, DEAD_LETTERS).await),
        |(records, letters)| records.len() + letters.len() >= total,
    )
    .await;
    assert_eq!(records.len() + letters.len(), total, "none lost: each is a reading or a dead letter");
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for letter in &letters {
        let reason = letter.header("vigil.dead_letter.reason").expect("a reason");
        let error = letter.header("vigil.dead_letter.error").expect("an explanation");
        assert!(!error.is_empty());
        let field = letter.header("vigil.dead_letter.field").map(|f| String::from_utf8_lossy(f).into_owned());
        let key = format!("{} {}", String::from_utf8_lossy(reason), field.unwrap_or_default());
        *reasons.entry(key).or_default() += 1;
    }
    eprintln!("seed data: {} readings accepted, {} dead-lettered: {reasons:?}", records.len(), letters.len());
    assert!(!records.is_empty(), "the seed's plausible readings are accepted");
    for reading in readings(&records) {
        assert!(reading.device_id.starts_with("car"), "device id from the topic: {}", reading.device_id);
    }
    ingest.stop().await.unwrap();
}
