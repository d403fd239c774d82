//! The real `ingest` binary in MQTT proxy mode, against librdkafka's mock Kafka cluster
//! (in this test process, so it outlives the binary): hostile connections are refused
//! before they cost memory while devices keep being served, and kill -9 while a fleet
//! publishes loses no acknowledged reading.

mod support;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use device_simulator::fleet::{Fleet, FleetOptions};
use embedded_brokers::KafkaCluster;
use support::{READINGS, readings};
use test_support::{ChildService, Endpoint, Output};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The ingest binary with only the MQTT proxy (no bridge), `env` added to its
/// environment; its admin endpoint and proxy address.
fn spawn(kafka: &KafkaCluster, env: &[(&str, &str)]) -> (ChildService, Endpoint, SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ingest"));
    command
        .args(["--mqtt-url", "", "--kafka-brokers", kafka.bootstrap_servers()])
        .args(["--grpc-listen", "", "--admin-listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .envs(env.iter().copied());
    let mut process = ChildService::spawn("ingest", command, Output::Stderr);
    let [admin, proxy] = process.logged_addresses(["serving /live", "serving MQTT proxy"], Duration::from_secs(60));
    (process, Endpoint::new(admin), proxy)
}

const CONNECT_V5: [u8; 17] =
    [0x10, 15, 0x00, 0x04, b'M', b'Q', b'T', b'T', 5, 0x02, 0x00, 60, 0x00, 0x00, 0x02, b'h', b'x'];

/// Sends `bytes` on a new connection and returns what the server sent before closing it
/// (`None`: still open after `within`).
async fn send_and_read_to_close(proxy: SocketAddr, bytes: &[u8], within: Duration) -> Option<Vec<u8>> {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    // The server may close before taking everything: the answer is what it sent.
    let _ = stream.write_all(bytes).await;
    let mut received = Vec::new();
    match tokio::time::timeout(within, stream.read_to_end(&mut received)).await {
        Ok(_) => Some(received),
        Err(_) => None,
    }
}

/// One QoS 1 MQTT 5 reading with rumqttc: whether it was acknowledged.
async fn one_reading_acknowledged(proxy: SocketAddr, client_id: &str) -> bool {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let options = MqttOptions::new(client_id, proxy.ip().to_string(), proxy.port());
    let (client, mut events) = AsyncClient::new(options, 4);
    let mut fleet =
        Fleet::new(&FleetOptions { cars: 1, ..FleetOptions::default() }, std::time::SystemTime::now().into());
    let reading = fleet.step(1.0).remove(0);
    let topic = format!("vehicles/sensor/data/{}", reading.device_id);
    client.publish(topic, QoS::AtLeastOnce, false, sensor::json::to_json(&reading)).await.unwrap();
    let acked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await;
    acked.unwrap_or(false)
}

/// Each hostile case on 32 connections at once, at the proxy's default limits but for 200
/// connections and a 2 s CONNECT timeout: every one gets its refusal (or is closed), the
/// binary keeps serving devices, and its peak resident memory stays within
/// [`support::RSS_BOUND_MIB`] of what it used before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_refuses_hostile_connections_keeps_serving_and_stays_within_its_memory_bound() {
    support::init_logs();
    let kafka = support::kafka();
    let env = [("INGEST_MQTT_PROXY__MAX_CONNECTIONS", "200"), ("INGEST_MQTT_PROXY__CONNECT_TIMEOUT_SECONDS", "2")];
    let (process, admin, proxy) = spawn(&kafka, &env);
    admin.wait_ready("ingest", Duration::from_secs(20)).await;
    assert!(one_reading_acknowledged(proxy, "before").await);
    let (before, _) = support::rss_kib(process.id());

    let huge_header = [0x30, 0xFF, 0xFF, 0xFF, 0x7F]; // a PUBLISH announcing 256 MiB
    let mut connect_then_huge = CONNECT_V5.to_vec();
    connect_then_huge.extend_from_slice(&huge_header);
    let mut connect_then_garbage = CONNECT_V5.to_vec();
    connect_then_garbage.extend((0..4096u32).map(|i| (i * 7919 % 251) as u8 | 0x0F));
    // A raw payload (no rule for its topic: dead-lettered) of 15 KiB, 64 times, QoS 1.
    let mut connect_then_flood = CONNECT_V5.to_vec();
    for pkid in 1..=64u16 {
        let mut body = vec![0x00, 0x05, b'x', b'/', b'y', b'/', b'z'];
        body.extend_from_slice(&pkid.to_be_bytes());
        body.push(0x00);
        body.resize(body.len() + 15 * 1024, b'#');
        connect_then_flood.extend_from_slice(&[0x32, (body.len() & 0x7F) as u8 | 0x80, (body.len() >> 7) as u8]);
        connect_then_flood.extend_from_slice(&body);
    }
    connect_then_flood.extend_from_slice(&[0xE0, 0x00]); // DISCONNECT: answered, then closed
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a CONNECT announcing 256 MiB", huge_header.map(|b| if b == 0x30 { 0x10 } else { b }).to_vec()),
        ("a PUBLISH announcing 256 MiB", connect_then_huge),
        ("garbage after CONNECT", connect_then_garbage),
        ("nothing at all (slowloris)", Vec::new()),
        ("64 QoS 1 PUBLISHes of 15 KiB", connect_then_flood),
        ("not MQTT", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
    ];
    for (case, bytes) in &cases {
        let clients: Vec<_> = (0..32)
            .map(|_| {
                let bytes = bytes.clone();
                tokio::spawn(async move { send_and_read_to_close(proxy, &bytes, Duration::from_secs(15)).await })
            })
            .collect();
        for client in clients {
            let received = client.await.unwrap();
            let received = received.unwrap_or_else(|| panic!("{case}: the connection is still open after 15 s"));
            match *case {
                "a PUBLISH announcing 256 MiB" => {
                    assert!(received.ends_with(&[0xE0, 0x01, 0x95]), "{case}: DISCONNECT 0x95: {received:02x?}")
                }
                "garbage after CONNECT" => {
                    let after_connack = received.get(2 + usize::from(received[1])..).filter(|_| received[0] == 0x20);
                    assert!(
                        matches!(after_connack, Some([0xE0, 0x01, code]) if *code >= 0x80),
                        "{case}: CONNACK, then DISCONNECT with an error reason: {received:02x?}"
                    )
                }
                "64 QoS 1 PUBLISHes of 15 KiB" => {
                    // Closed only after the 64 PUBACKs (the client closed its side): not refused.
                    let pubacks = received.windows(2).filter(|w| w == &[0x40, 0x02]).count();
                    assert!(pubacks >= 64, "{case}: {pubacks} PUBACKs");
                }
                _ => assert!(received.is_empty(), "{case}: closed without an answer: {received:02x?}"),
            }
        }
    }

    // Over the connection limit: 250 connections that stay, of which 200 are served.
    test_support::eventually(Duration::from_secs(10), "every earlier connection gone", async || {
        admin.metric_sum("ingest_proxy_connections").await == 0.0
    })
    .await;
    let mut streams = Vec::new();
    for _ in 0..250 {
        streams.push(TcpStream::connect(proxy).await.unwrap());
    }
    let mut closed = 0;
    for stream in &mut streams {
        let _ = stream.write_all(&CONNECT_V5).await;
        let mut byte = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut byte)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 50, "connections over the limit of 200 are closed");
    drop(streams);

    assert!(one_reading_acknowledged(proxy, "after").await, "still serving");
    let (_, peak) = support::rss_kib(process.id());
    let grown_mib = peak.saturating_sub(before) / 1024;
    println!("resident before {} MiB, peak {} MiB", before / 1024, peak / 1024);
    assert!(grown_mib < support::RSS_BOUND_MIB, "peak RSS grew {grown_mib} MiB (bound {} MiB)", support::RSS_BOUND_MIB);
    let metrics = admin.metrics().await;
    let count = |name: &str, reason: &str| test_support::metrics::metric_total(&metrics, name, &[("reason", reason)]);
    assert_eq!(count("ingest_proxy_connects_refused_total", "packet_too_large"), 32.0);
    assert_eq!(count("ingest_proxy_connects_refused_total", "connect_timeout"), 32.0);
    assert!(count("ingest_proxy_connects_refused_total", "connection_limit") >= 50.0);
    assert_eq!(count("ingest_proxy_disconnects_total", "packet_too_large"), 32.0);
    assert_eq!(count("ingest_proxy_connects_refused_total", "malformed"), 32.0, "not MQTT");
    process.terminate(Duration::from_secs(30));
}

/// A 3.1.1 device publishing `readings` at QoS 1 with rumqttc until its connection
/// breaks; the (device, sequence) of every reading acknowledged.
async fn publish_until_broken(
    proxy: SocketAddr,
    client_id: String,
    readings: Vec<sensor::SensorReading>,
) -> Vec<(String, u64)> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let mut options = MqttOptions::new(client_id, proxy.ip().to_string(), proxy.port());
    options.set_inflight(32);
    let (client, mut events) = AsyncClient::new(options, 64);
    let mut queued: VecDeque<(String, u64)> = VecDeque::new();
    let mut by_id: HashMap<u16, (String, u64)> = HashMap::new();
    let mut acknowledged = Vec::new();
    let mut to_send = readings.into_iter();
    loop {
        // Keep the request queue topped up without blocking on it.
        while queued.len() < 32 {
            let Some(reading) = to_send.next() else { break };
            let topic = format!("vehicles/sensor/data/{}", reading.device_id);
            if client.try_publish(topic, QoS::AtLeastOnce, false, sensor::json::to_json(&reading)).is_err() {
                break;
            }
            queued.push_back((reading.device_id.clone(), reading.sequence));
        }
        match events.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(id))) => {
                if let Some(sent) = queued.pop_front() {
                    by_id.insert(id, sent);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => acknowledged.extend(by_id.remove(&ack.pkid)),
            Ok(_) => {}
            Err(_) => return acknowledged,
        }
    }
}

/// kill -9 of the proxy while 4 devices publish as fast as it acknowledges: every
/// reading any device had acknowledged is in Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_proxy_while_devices_publish_loses_no_acknowledged_reading() {
    support::init_logs();
    let kafka = support::kafka();
    let (process, admin, proxy) = spawn(&kafka, &[]);
    admin.wait_ready("ingest", Duration::from_secs(20)).await;
    let mut fleet =
        Fleet::new(&FleetOptions { cars: 4, ..FleetOptions::default() }, std::time::SystemTime::now().into());
    // 10 ms apart, so that every event time is plausible (within minutes of arrival).
    let all: Vec<_> = (0..20_000).flat_map(|_| fleet.step(0.01)).collect();
    let devices: Vec<_> = (0..4)
        .map(|car| {
            let own: Vec<_> = all.iter().skip(car).step_by(4).cloned().collect();
            tokio::spawn(publish_until_broken(proxy, format!("device-{car}"), own))
        })
        .collect();
    // Kill once the devices are well under way.
    test_support::eventually(Duration::from_secs(30), "2,000 readings acknowledged", async || {
        admin.metric_sum("ingest_mqtt_acked_total").await >= 2_000.0
    })
    .await;
    process.kill();
    let mut acknowledged = BTreeSet::new();
    for device in devices {
        acknowledged.extend(tokio::time::timeout(Duration::from_secs(30), device).await.unwrap().unwrap());
    }
    assert!(acknowledged.len() >= 2_000, "{} acknowledged", acknowledged.len());
    let records = test_support::kafka::read_to_end(&kafka, READINGS).await;
    let in_kafka: BTreeSet<_> = readings(&records).into_iter().map(|r| (r.device_id, r.sequence)).collect();
    let missing: Vec<_> = acknowledged.difference(&in_kafka).take(5).collect();
    println!("{} acknowledged, {} in Kafka", acknowledged.len(), in_kafka.len());
    assert!(missing.is_empty(), "acknowledged but not in Kafka: {missing:?}");
}
