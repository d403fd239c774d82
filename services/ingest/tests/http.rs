//! HTTP ingest (`POST /v1/readings`) over a real HTTP connection: a 200 means Kafka has
//! every reading of the request, a bad reading gets a 400 naming its index and field with
//! nothing of its request written, and hostile requests (too large, too many readings,
//! garbage, no token) are refused before they cost memory, while the endpoint keeps
//! serving.

mod support;

use std::time::Duration;

use device_simulator::fleet::{Fleet, FleetOptions};
use prost::Message as _;
use proto::vigil::ingest::v1::PublishRequest;
use reqwest::StatusCode;
use serde_json::Value;
use support::{Brokers, READINGS, RunningIngest, readings};

/// `rounds` readings from each of `cars` cars.
fn fleet_readings(cars: usize, rounds: usize) -> Vec<sensor::SensorReading> {
    let options = FleetOptions { cars, ..FleetOptions::default() };
    let mut fleet = Fleet::new(&options, std::time::SystemTime::now().into());
    (0..rounds).flat_map(|_| fleet.step(1.0)).collect()
}

/// Ingest with HTTP ingest on a loopback port (and `token` asked for, if given); the URL
/// of its readings endpoint.
async fn start(brokers: &Brokers, client_id: &str, token: Option<&str>) -> (RunningIngest, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = brokers.config(client_id);
    config.http.max_body_bytes = 128 * 1024;
    config.http.max_readings_per_request = 100;
    if let Some(token) = token {
        let path = dir.path().join("token");
        std::fs::write(&path, format!("{token}\n")).unwrap();
        config.http.token_file = Some(path);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}{}", listener.local_addr().unwrap(), ingest::http::PATH);
    let listeners = ingest::Listeners { http: Some(listener), ..Default::default() };
    (RunningIngest::start_with(config, listeners).await, url, dir)
}

async fn post(url: &str, content_type: &str, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
    let response =
        reqwest::Client::new().post(url).header("content-type", content_type).body(body).send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn json_array(readings: &[sensor::SensorReading]) -> String {
    format!("[{}]", readings.iter().map(sensor::json::to_json).collect::<Vec<_>>().join(","))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_means_kafka_has_every_reading_in_json_or_protobuf() {
    let brokers = Brokers::start();
    let (ingest, url, _dir) = start(&brokers, "http-ok", None).await;

    let batch = fleet_readings(5, 4);
    let (status, body) = post(&url, "application/json", json_array(&batch)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["accepted"], 20);

    // One reading alone, as the seed's cars spell it (camelCase and squashed names beside
    // snake_case, no event time: the arrival time is used), with its device id in the body.
    let seed_style = r#"{"deviceId": "seed-car-1", "coolantTemp": 92.5, "intake_air_temp": 18.7,
        "intakeAirFlowSpeed": 15.9, "battery_percentage": 35.1, "batteryVoltage": 298.9,
        "current_draw": 23.1, "speed": 9.78, "engine_vibration_amplitude": 978.0,
        "throttle_pos": 0.84, "tire_pressure11": 33, "tire_pressure12": 30, "tirePressure21": 30,
        "tire_pressure_2_2": 33, "accelerometer11Value": 0.02, "accelerometer_1_2_value": 0.67,
        "accelerometer21Value": 0.96, "accelerometer_2_2_value": 0.62, "control_unit_firmware": 2000}"#;
    let (status, body) = post(&url, "application/json; charset=utf-8", seed_style).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["accepted"], 1);

    let protobuf = fleet_readings(3, 1);
    let request = PublishRequest { readings: protobuf.clone() }.encode_to_vec();
    let (status, body) = post(&url, "application/x-protobuf", request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["accepted"], 3);

    // The answers came after Kafka confirmed: everything is readable now.
    let records = brokers.read(READINGS, Duration::from_secs(10), |r| r.len() >= 24).await;
    assert_eq!(records.len(), 24);
    let got = readings(&records);
    for (record, reading) in records.iter().zip(&got) {
        assert_eq!(record.key.as_deref(), Some(reading.device_id.as_bytes()), "keyed by device");
    }
    let seed = got.iter().find(|r| r.device_id == "seed-car-1").expect("the seed-style reading");
    assert_eq!(seed.coolant_temp, 92.5);
    assert!(seed.event_time.is_some(), "the arrival time filled in");
    for sent in batch.iter().chain(&protobuf) {
        assert!(got.contains(sent), "{} #{} written as sent", sent.device_id, sent.sequence);
    }
    assert_eq!(ingest.metric("ingest_messages_received_total").await, 24.0);
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reading_gets_a_400_naming_index_and_field_and_nothing_of_its_request_is_written() {
    let brokers = Brokers::start();
    let (ingest, url, _dir) = start(&brokers, "http-bad", None).await;

    let mut bad = fleet_readings(3, 1);
    bad[1].speed = -4.0;
    let (status, body) = post(&url, "application/json", json_array(&bad)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["index"], 1);
    assert_eq!(body["field"], "speed");
    assert!(body["error"].as_str().unwrap().starts_with("readings[1].speed: "), "{body}");

    // Refused by the event-time check after parsing, in protobuf.
    let mut dated = fleet_readings(2, 1);
    dated[1].event_time = Some(prost_types::Timestamp { seconds: 0, nanos: 0 });
    let (status, body) = post(&url, "application/x-protobuf", PublishRequest { readings: dated }.encode_to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!((body["index"].as_u64(), body["field"].as_str()), (Some(1), Some("event_time")));

    // A reading without a device id, and one that is not an object.
    let (status, body) = post(&url, "application/json", r#"[{"speed": 3}]"#).await;
    assert_eq!((status, body["index"].as_u64()), (StatusCode::BAD_REQUEST, Some(0)), "{body}");
    assert!(body["error"].as_str().unwrap().contains("device_id"), "{body}");
    let (status, body) = post(&url, "application/json", "[1]").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // Then a good request: it alone is on the topic.
    let good = fleet_readings(2, 1);
    let (status, _) = post(&url, "application/json", json_array(&good)).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let records = brokers.read(READINGS, Duration::from_secs(5), |r| r.len() >= 2).await;
    assert_eq!(readings(&records), good, "only the good request's readings were written");
    assert!(ingest.admin.metrics().await.contains(r#"ingest_http_requests_refused_total{reason="out_of_range"} 1"#));
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_before_they_cost_memory_and_the_endpoint_keeps_serving() {
    let brokers = Brokers::start();
    let (ingest, url, _dir) = start(&brokers, "http-hostile", Some("s3cret-token")).await;
    let client = reqwest::Client::new();
    let authorized = |body: Vec<u8>, content_type: &str| {
        client
            .post(&url)
            .header("authorization", "Bearer s3cret-token")
            .header("content-type", content_type.to_owned())
            .body(body)
    };
    let one = json_array(&fleet_readings(1, 1)).into_bytes();

    // Credentials: none, a wrong token, a malformed header.
    let (status, body) = post(&url, "application/json", one.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    for header in ["Bearer wrong-token", "Basic czNjcmV0LXRva2Vu", "Bearer"] {
        let response = client
            .post(&url)
            .header("authorization", header)
            .header("content-type", "application/json")
            .body(one.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{header}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
    }

    // Over the body limit (128 KiB here), declared up front or streamed without a length.
    // The server reads and discards the rest before answering, so a client still sending
    // reads the 413 instead of a reset connection: repeated, as that race is rare.
    let large = vec![b' '; 300 * 1024];
    let response = authorized(large.clone(), "application/json").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let answer: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert!(answer["error"].as_str().unwrap().contains("http.max_body_bytes"), "{answer}");
    for attempt in 0..10 {
        let chunks = futures::stream::iter((0..50).map(|_| Ok::<_, std::io::Error>(vec![b' '; 8 * 1024])));
        let streamed = client
            .post(&url)
            .header("authorization", "Bearer s3cret-token")
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .unwrap_or_else(|error| panic!("streamed body {attempt}: {error:?}"));
        assert_eq!(streamed.status(), StatusCode::PAYLOAD_TOO_LARGE, "streamed body {attempt}");
    }

    // More readings than a request may carry (100 here): a JSON array, and protobuf
    // readings that are 2 bytes each on the wire (counted there, never decoded).
    let many = json_array(&fleet_readings(101, 1)).into_bytes();
    assert!(many.len() < 128 * 1024, "under the body limit: {}", many.len());
    assert_eq!(authorized(many, "application/json").send().await.unwrap().status(), StatusCode::PAYLOAD_TOO_LARGE);
    let empty_readings = [0x0a_u8, 0x00].repeat(30_000);
    let response = authorized(empty_readings, "application/x-protobuf").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // Garbage, a wrong content type, deep nesting.
    for (body, content_type, expected) in [
        (b"{\"device_id\": ".to_vec(), "application/json", StatusCode::BAD_REQUEST),
        (vec![0xff; 100], "application/x-protobuf", StatusCode::BAD_REQUEST),
        (one.clone(), "text/plain", StatusCode::UNSUPPORTED_MEDIA_TYPE),
        (
            format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
            "application/json",
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let response = authorized(body, content_type).send().await.unwrap();
        assert_eq!(response.status(), expected, "{content_type}");
    }

    // Still serving, and nothing of the refused requests was written.
    let response = authorized(one, "application/json").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let records = brokers.read(READINGS, Duration::from_secs(5), |r| !r.is_empty()).await;
    assert_eq!(records.len(), 1, "only the one accepted reading");
    let metrics = ingest.admin.metrics().await;
    for reason in
        ["unauthorized", "body_too_large", "too_many_readings", "not_json", "not_protobuf", "unsupported_media_type"]
    {
        assert!(metrics.contains(&format!("ingest_http_requests_refused_total{{reason=\"{reason}\"}}")), "{reason}");
    }
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_mqtt_broker_http_ingest_alone_is_ready_and_takes_readings() {
    // No MQTT broker anywhere: `mqtt.url` empty turns the bridge off.
    let kafka = support::kafka();
    let mut config = support::config(&kafka, "", "http-only");
    assert!(config.grpc.listen.is_empty());
    config.mqtt.url.clear();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}{}", listener.local_addr().unwrap(), ingest::http::PATH);
    let ingest =
        RunningIngest::start_with(config, ingest::Listeners { http: Some(listener), ..Default::default() }).await;
    let batch = fleet_readings(3, 2);
    let (status, body) = post(&url, "application/json", json_array(&batch)).await;
    assert_eq!((status, body["accepted"].as_u64()), (StatusCode::OK, Some(6)), "{body}");
    let records = test_support::kafka::read_topic(&kafka, READINGS, Duration::from_secs(10), |r| r.len() >= 6).await;
    assert_eq!(records.len(), 6);
    assert_eq!(ingest.metric("ingest_mqtt_connected").await, 0.0, "no MQTT connection was made");
    ingest.stop().await.unwrap();
}

/// The real `ingest` binary at its default HTTP limits (1 MiB bodies, 2,000 readings, 16
/// requests at once), sent what no well-behaved client sends by 64 clients at once: every
/// request gets its refusal, the binary keeps serving, and its peak resident memory stays
/// within [`support::RSS_BOUND_MIB`] of what it used before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_refuses_hostile_clients_keeps_serving_and_stays_within_its_memory_bound() {
    use std::process::Command;
    use test_support::{ChildService, Endpoint, Output};

    let brokers = Brokers::start();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ingest"));
    command
        .args(["--mqtt-url", &format!("mqtt://127.0.0.1:{}", brokers.mqtt.v5.port())])
        .args(["--kafka-brokers", brokers.kafka.bootstrap_servers(), "--client-id", "http-binary"])
        .args(["--grpc-listen", "", "--admin-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let mut process = ChildService::spawn("ingest", command, Output::Stderr);
    let [admin, http] = process.logged_addresses(["serving /live", "serving HTTP ingest"], Duration::from_secs(60));
    let admin = Endpoint::new(admin);
    admin.wait_ready("ingest", Duration::from_secs(20)).await;
    let url = format!("http://{http}{}", ingest::http::PATH);
    let good = json_array(&fleet_readings(2, 1));
    assert_eq!(post(&url, "application/json", good.clone()).await.0, StatusCode::OK);
    let (before, _) = support::rss_kib(process.id());

    // Each client sends, in turn: a body over the limit, 500,000 protobuf readings of 2
    // bytes (under the body limit, over the count), 2,001 JSON readings, and JSON nested
    // 100,000 deep.
    let oversized = vec![b' '; 4 * 1024 * 1024];
    let empty_readings = [0x0a_u8, 0x00].repeat(500_000);
    let over_full = format!("[{}]", vec![r#"{"device_id":"x"}"#; 2_001].join(","));
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(Vec<u8>, &str, StatusCode)> = vec![
        (oversized, "application/json", StatusCode::PAYLOAD_TOO_LARGE),
        (empty_readings, "application/x-protobuf", StatusCode::PAYLOAD_TOO_LARGE),
        (over_full.into_bytes(), "application/json", StatusCode::PAYLOAD_TOO_LARGE),
        (nested.into_bytes(), "application/json", StatusCode::BAD_REQUEST),
    ];
    let cases = std::sync::Arc::new(cases);
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let (cases, url, answered) = (cases.clone(), url.clone(), answered.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                for (body, content_type, expected) in cases.iter() {
                    let response =
                        client.post(&url).header("content-type", *content_type).body(body.clone()).send().await;
                    // A 413 may come before the whole body is sent, and the server then
                    // closes the connection: the refusal or a reset, never a 200.
                    if let Ok(response) = response {
                        assert_eq!(response.status(), *expected, "{content_type}");
                        answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let answered = answered.load(std::sync::atomic::Ordering::Relaxed);
    assert!(answered >= 3 * 64, "most requests got their refusal rather than a reset: {answered} of 256");

    assert_eq!(post(&url, "application/json", good).await.0, StatusCode::OK, "still serving");
    let (_, peak) = support::rss_kib(process.id());
    let grown_mib = peak.saturating_sub(before) / 1024;
    println!("resident before {} MiB, peak {} MiB, {answered} of 256 refusals answered", before / 1024, peak / 1024);
    assert!(grown_mib < support::RSS_BOUND_MIB, "peak RSS grew {grown_mib} MiB (bound {} MiB)", support::RSS_BOUND_MIB);
    let metrics = admin.metrics().await;
    for reason in ["too_many_readings", "not_json"] {
        assert!(metrics.contains(&format!("ingest_http_requests_refused_total{{reason=\"{reason}\"}}")), "{reason}");
    }
    process.terminate(Duration::from_secs(30));
}
