//! System test of MQTT proxy mode with the clients devices really use, unmodified: Eclipse
//! Paho (Python, MQTT 3.1.1 and 5), Mosquitto's `mosquitto_pub`, and curl for HTTP ingest,
//! against the real `ingest` binary writing to tansu, a Kafka-protocol broker in its own
//! process. No MQTT broker anywhere. `tests/system/ingest_proxy.sh` installs the clients,
//! starts tansu and runs these with `--ignored`; `cargo test` alone skips them.
//!
//! Checked: every acknowledged reading is in Kafka (after kill -9 of a replica too), the
//! seed demo's payloads land as readings or dead letters, logins and the ACL are refused
//! with the protocol's codes, and HTTP ingest takes a good batch and refuses a bad one whole.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use device_simulator::fleet::{Fleet, FleetOptions};
use embedded_brokers::ReadRecord;
use support::readings;
use test_support::{ChildService, Endpoint, Output};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run tests/system/ingest_proxy.sh"))
}

fn brokers() -> String {
    env("VIGIL_TANSU_BROKERS")
}

/// A readings topic and a dead-letter topic of their own on tansu.
async fn topics(prefix: &str) -> (String, String) {
    let readings = test_support::unique_name(&format!("{prefix}-readings"));
    let dead = test_support::unique_name(&format!("{prefix}-dead"));
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", brokers());
    for (topic, partitions) in [(&readings, 4), (&dead, 1)] {
        let spec = kafka::TopicSpec { partitions, compacted: false };
        kafka::ensure_topic(&config, topic, spec).await.unwrap_or_else(|e| panic!("creating {topic}: {e}"));
    }
    (readings, dead)
}

/// The ingest binary as an MQTT proxy and HTTP ingest, nothing else, writing to `readings`
/// and `dead` on tansu; `proxy_section` is added to its `[mqtt_proxy]` config.
struct Ingest {
    process: ChildService,
    admin: Endpoint,
    mqtt: SocketAddr,
    http: SocketAddr,
    _config: test_support::TempFile,
}

async fn ingest(readings: &str, dead: &str, proxy_section: &str) -> Ingest {
    let config = test_support::temp_file(
        "ingest.toml",
        &format!(
            r#"
dead_letter_topic = "{dead}"
[kafka]
"bootstrap.servers" = "{brokers}"
[[rules]]
filter = "vehicles/sensor/data/+"
topic = "{readings}"
device_id = "{{level:3}}"
[http]
topic = "{readings}"
[mqtt_proxy]
{proxy_section}
"#,
            brokers = brokers()
        ),
    );
    let mut command = Command::new(env!("CARGO_BIN_EXE_ingest"));
    command
        .arg("--config")
        .arg(&config.path)
        .args(["--mqtt-url", "", "--grpc-listen", "", "--admin-listen", "127.0.0.1:0"])
        .args(["--mqtt-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let mut process = ChildService::spawn("ingest", command, Output::Stderr);
    let [admin, mqtt, http] = process
        .logged_addresses(["serving /live", "serving MQTT proxy", "serving HTTP ingest"], Duration::from_secs(60));
    let admin = Endpoint::new(admin);
    admin.wait_ready("ingest", Duration::from_secs(20)).await;
    Ingest { process, admin, mqtt, http, _config: config }
}

/// What Paho reported (tests/system/mqtt_publisher.py).
#[derive(Debug, serde::Deserialize)]
struct Paho {
    connack: Option<u8>,
    acked: Vec<usize>,
    refused: Vec<(usize, u8)>,
    disconnected: bool,
}

/// Publishes `messages` at QoS 1 with Paho over MQTT `protocol` ("3.1.1" or "5").
fn paho(
    proxy: SocketAddr,
    protocol: &str,
    client_id: &str,
    login: Option<(&str, &str)>,
    messages: &[(String, Vec<u8>)],
) -> Paho {
    let file = tempfile::NamedTempFile::new().unwrap();
    let lines: String = messages
        .iter()
        .map(|(topic, payload)| format!("{topic}\t{}\n", String::from_utf8(payload.clone()).unwrap()))
        .collect();
    std::fs::write(file.path(), lines).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/system/mqtt_publisher.py");
    let mut command = Command::new(env("VIGIL_PAHO_PYTHON"));
    command.arg(script).args(["--port", &proxy.port().to_string(), "--protocol", protocol, "--client-id", client_id]);
    command.arg("--messages").arg(file.path());
    if let Some((user, password)) = login {
        command.args(["--username", user, "--password", password]);
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "paho: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("paho's report: {e}: {}", String::from_utf8_lossy(&output.stdout)))
}

/// `cars` cars' readings, `per_car` each 10 ms apart (plausible event times), as
/// (MQTT topic, JSON payload); car `c` gets device id `{prefix}-{c}`.
fn fleet(prefix: &str, cars: usize, per_car: usize) -> Vec<Vec<(String, Vec<u8>)>> {
    let mut fleet = Fleet::new(&FleetOptions { cars, ..FleetOptions::default() }, std::time::SystemTime::now().into());
    let mut by_car = vec![Vec::new(); cars];
    for _ in 0..per_car {
        for (car, mut reading) in fleet.step(0.01).into_iter().enumerate() {
            reading.device_id = format!("{prefix}-{car}");
            let topic = format!("vehicles/sensor/data/{}", reading.device_id);
            by_car[car].push((topic, sensor::json::to_json(&reading).into_bytes()));
        }
    }
    by_car
}

/// (device, sequence) of each reading in `messages` picked by `indices`.
fn identities(messages: &[(String, Vec<u8>)], indices: &[usize]) -> BTreeSet<(String, u64)> {
    indices
        .iter()
        .map(|&i| {
            let json: serde_json::Value = serde_json::from_slice(&messages[i].1).unwrap();
            (json["device_id"].as_str().unwrap().to_owned(), json["sequence"].as_u64().unwrap_or(0))
        })
        .collect()
}

fn in_kafka(records: &[ReadRecord]) -> BTreeSet<(String, u64)> {
    readings(records).into_iter().map(|r| (r.device_id, r.sequence)).collect()
}

async fn read_to_end(topic: &str) -> Vec<ReadRecord> {
    test_support::kafka::read_to_end(&brokers(), topic).await
}

fn curl(url: &str, body: &str) -> (u16, String) {
    let output = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
            url,
        ])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.trim().parse().unwrap(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tansu, Paho, mosquitto_pub and curl: tests/system/ingest_proxy.sh runs it"]
async fn paho_3_1_1_and_5_mosquitto_pub_and_curl_write_through_ingest_alone() {
    let (readings_topic, dead) = topics("proxy-clients").await;
    let ingest = ingest(&readings_topic, &dead, "").await;
    let cars = fleet("paho", 2, 500);
    let mut expected = BTreeSet::new();
    for (protocol, messages) in ["3.1.1", "5"].into_iter().zip(&cars) {
        let report = paho(ingest.mqtt, protocol, &format!("paho-{protocol}"), None, messages);
        assert_eq!((report.connack, report.acked.len(), report.disconnected), (Some(0), 500, false), "Paho {protocol}");
        expected.extend(identities(messages, &report.acked));
    }

    let one = fleet("mosquitto-pub", 2, 1);
    for (version, car) in ["mqttv311", "mqttv5"].into_iter().zip(&one) {
        let (topic, payload) = &car[0];
        let status = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &ingest.mqtt.port().to_string(), "-V", version, "-q", "1"])
            .args(["-t", topic, "-m", std::str::from_utf8(payload).unwrap()])
            .status()
            .expect("mosquitto_pub");
        assert!(status.success(), "mosquitto_pub {version}: a PUBACK came");
        expected.extend(identities(car, &[0]));
    }

    let url = format!("http://{}{}", ingest.http, ingest::http::PATH);
    let batch = fleet("curl", 3, 1);
    let good =
        format!("[{}]", batch.iter().map(|c| String::from_utf8(c[0].1.clone()).unwrap()).collect::<Vec<_>>().join(","));
    let (status, body) = curl(&url, &good);
    assert_eq!(status, 200, "{body}");
    for car in &batch {
        expected.extend(identities(car, &[0]));
    }
    let bad = good.replacen("\"speed\":", "\"speed\":\"fast\",\"x\":", 1).replacen("curl-0", "curl-bad", 1);
    let (status, body) = curl(&url, &bad);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("readings[0]"), "names the reading: {body}");

    let records = read_to_end(&readings_topic).await;
    assert_eq!(in_kafka(&records), expected, "every acknowledged reading, and nothing of the refused batch");
    assert_eq!(records.len(), expected.len(), "each once");
    ingest.process.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tansu, Paho and the seed data: tests/system/ingest_proxy.sh runs it"]
async fn every_payload_the_seed_demo_publishes_through_the_proxy_is_a_reading_or_a_dead_letter() {
    let seed = std::path::PathBuf::from(env("VIGIL_SEED_DATA"));
    let payloads = support::seed_payloads(&seed);
    let messages: Vec<_> =
        payloads.into_iter().map(|(car, payload)| (format!("vehicles/sensor/data/{car}"), payload)).collect();
    let (readings_topic, dead) = topics("proxy-seed").await;
    let ingest = ingest(&readings_topic, &dead, "").await;
    let report = paho(ingest.mqtt, "3.1.1", "seed-publisher", None, &messages);
    assert_eq!(report.acked.len(), messages.len(), "every payload acknowledged");
    let (records, letters) = (read_to_end(&readings_topic).await, read_to_end(&dead).await);
    assert_eq!(records.len() + letters.len(), messages.len(), "none lost: each is a reading or a dead letter");
    assert!(letters.iter().all(|l| l.header("vigil.dead_letter.reason").is_some()));
    assert!(!records.is_empty(), "the seed's plausible readings are accepted");
    eprintln!("seed data through the proxy: {} readings, {} dead letters", records.len(), letters.len());
    ingest.process.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tansu, Paho and mosquitto_pub: tests/system/ingest_proxy.sh runs it"]
async fn logins_and_the_acl_refuse_paho_and_mosquitto_pub_with_the_protocols_codes() {
    let users = test_support::temp_file("users", "car-1:secret-1\ncar-2:secret-2\n");
    let (readings_topic, dead) = topics("proxy-acl").await;
    let section = format!(
        "users_file = \"{}\"\ndevice_id_from = \"username\"\nacl = [\"vehicles/sensor/data/{{device}}\"]",
        users.path.display()
    );
    let ingest = ingest(&readings_topic, &dead, &section).await;
    let cars = fleet("car", 3, 1);
    let own = cars[1][0].clone();
    let foreign = cars[2][0].clone();

    // Paho 2 reports a 3.1.1 return code as its MQTT 5 equivalent: 4 -> 134.
    let report = paho(ingest.mqtt, "3.1.1", "wrong", Some(("car-1", "nope")), std::slice::from_ref(&own));
    assert!(matches!(report.connack, Some(4 | 134)), "bad user name or password: {report:?}");
    let report = paho(ingest.mqtt, "5", "wrong", Some(("car-1", "nope")), std::slice::from_ref(&own));
    assert_eq!(report.connack, Some(134), "MQTT 5: 0x86");
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &ingest.mqtt.port().to_string(), "-q", "1", "-u", "car-1", "-P", "nope"])
        .args(["-t", &own.0, "-m", "{}"])
        .status()
        .unwrap();
    assert!(!status.success(), "mosquitto_pub is refused");

    let messages = [own.clone(), foreign.clone(), own.clone()];
    let report = paho(ingest.mqtt, "5", "car-1-device", Some(("car-1", "secret-1")), &messages);
    assert_eq!(report.acked, [0, 2], "{report:?}");
    assert_eq!(report.refused, [(1, 0x87)], "another car's topic: 0x87 Not authorized");
    let report = paho(ingest.mqtt, "3.1.1", "car-1-device", Some(("car-1", "secret-1")), &[own.clone(), foreign]);
    assert_eq!(report.acked, [0], "{report:?}");
    assert!(report.disconnected, "3.1.1 cannot refuse a PUBLISH: the connection closes");

    let records = read_to_end(&readings_topic).await;
    assert_eq!(records.len(), 3, "only the car's own readings (one repeated)");
    assert!(readings(&records).iter().all(|r| r.device_id == "car-1"));
    ingest.process.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tansu and Paho: tests/system/ingest_proxy.sh runs it"]
async fn kill_9_of_one_of_two_proxy_replicas_while_paho_devices_publish_loses_no_acknowledged_reading() {
    let (readings_topic, dead) = topics("proxy-kill").await;
    let doomed = ingest(&readings_topic, &dead, "").await;
    let survivor = ingest(&readings_topic, &dead, "").await;
    let cars = fleet("kill", 4, 8_000);
    let mut devices = Vec::new();
    for (car, messages) in cars.into_iter().enumerate() {
        let proxy = if car < 2 { doomed.mqtt } else { survivor.mqtt };
        let protocol = if car % 2 == 0 { "3.1.1" } else { "5" };
        devices.push(tokio::task::spawn_blocking(move || {
            let report = paho(proxy, protocol, &format!("kill-{car}"), None, &messages);
            (report, messages)
        }));
    }
    test_support::eventually(
        Duration::from_secs(60),
        "1,000 readings acknowledged by the doomed replica",
        async || doomed.admin.metric_sum("ingest_mqtt_acked_total").await >= 1_000.0,
    )
    .await;
    doomed.process.kill();
    let mut acknowledged = BTreeSet::new();
    for (car, device) in devices.into_iter().enumerate() {
        let (report, messages) = device.await.unwrap();
        if car < 2 {
            assert!(report.disconnected, "car {car}: its replica died");
        } else {
            assert_eq!(report.acked.len(), messages.len(), "car {car}: its replica lived");
        }
        acknowledged.extend(identities(&messages, &report.acked));
    }
    let records = read_to_end(&readings_topic).await;
    let stored = in_kafka(&records);
    let missing: Vec<_> = acknowledged.difference(&stored).take(5).collect();
    eprintln!("kill -9: {} readings acknowledged, {} in Kafka", acknowledged.len(), stored.len());
    assert!(missing.is_empty(), "acknowledged but not in Kafka: {missing:?}");
    survivor.process.terminate(Duration::from_secs(30));
}
