//! The bridge end to end, in-process: a simulated fleet publishing to an embedded MQTT
//! broker (rumqttd), ingest, and librdkafka's mock Kafka cluster.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use device_simulator::fleet::FleetOptions;
use device_simulator::metrics::PublishMetrics;
use device_simulator::publish::{PublishOptions, Report, publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::{AsyncClient, MqttOptions};
use support::{Brokers, DEAD_LETTERS, READINGS, RunningIngest, readings};
use test_support::Poll;

fn fleet(cars: usize) -> FleetOptions {
    FleetOptions { cars, fault_share: 0.3, onset_window_s: (0.05, 0.2), ..FleetOptions::default() }
}

/// Publishes `fleet` in a task, `per_car` readings a car every `interval_ms`, and returns
/// the simulator's report. The simulator speaks MQTT 3.1.1 (as the seed's cars do);
/// rumqttd routes between its 3.1.1 and 5 listeners, so ingest gets them on either.
fn publishing(
    brokers: &Brokers,
    fleet: &FleetOptions,
    per_car: u64,
    interval_ms: u64,
    cars_per_connection: usize,
) -> tokio::task::JoinHandle<Report> {
    let mut options = PublishOptions::new("127.0.0.1", brokers.mqtt.v4.port());
    options.version = device_simulator::publish::MqttVersion::V311;
    options.interval = Duration::from_millis(interval_ms);
    options.readings_per_car = Some(per_car);
    options.cars_per_connection = cars_per_connection;
    let fleet = fleet.clone();
    tokio::spawn(async move {
        publish(&fleet, &options, &PublishMetrics::unregistered(), std::future::pending()).await.unwrap()
    })
}

/// Publishes `fleet` and returns how many readings the broker acknowledged (all of them).
async fn simulate(brokers: &Brokers, fleet: &FleetOptions, readings_per_car: u64, interval_ms: u64) -> u64 {
    let report = publishing(brokers, fleet, readings_per_car, interval_ms, 4).await.unwrap();
    assert_eq!(report.acknowledged, report.published);
    report.published
}

/// Each device's sequences as they appear in Kafka (its records share one partition).
fn sequences_by_device(records: &[embedded_brokers::ReadRecord]) -> BTreeMap<String, Vec<u64>> {
    let mut by_device: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (record, reading) in records.iter().zip(readings(records)) {
        assert_eq!(record.key.as_deref(), Some(reading.device_id.as_bytes()), "keyed by device id");
        by_device.entry(reading.device_id).or_default().push(reading.sequence);
    }
    by_device
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reading_reaches_kafka_once_in_order_per_device_keyed_by_device() {
    let brokers = Brokers::start();
    let ingest = RunningIngest::start(brokers.config("ingest-order"), None).await;
    let fleet = fleet(12);
    let sent = simulate(&brokers, &fleet, 30, 5).await;

    let records = brokers.read(READINGS, Duration::from_secs(30), move |r| r.len() as u64 >= sent).await;
    assert_eq!(records.len() as u64, sent, "every reading, once (no crash, so no repeats)");
    let by_device = sequences_by_device(&records);
    assert_eq!(by_device.len(), fleet.cars);
    for (device, sequences) in &by_device {
        assert_eq!(sequences, &(1..=30).collect::<Vec<u64>>(), "{device}: in order");
    }
    let partitions: BTreeSet<i32> = records.iter().map(|r| r.partition).collect();
    assert!(partitions.len() > 1, "devices spread over partitions: {partitions:?}");
    assert_eq!(ingest.metric("ingest_mqtt_acked_total").await as u64, sent, "each acknowledged to MQTT");
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_1_works_the_same() {
    let brokers = Brokers::start();
    let mut config = brokers.config("ingest-v311");
    config.mqtt.url = format!("mqtt://127.0.0.1:{}", brokers.mqtt.v4.port());
    config.mqtt.protocol = ingest::config::MqttProtocol::V311;
    let ingest = RunningIngest::start(config, None).await;
    let fleet = fleet(4);
    let sent = simulate(&brokers, &fleet, 20, 5).await;
    let records = brokers.read(READINGS, Duration::from_secs(30), move |r| r.len() as u64 >= sent).await;
    assert_eq!(records.len() as u64, sent);
    for sequences in sequences_by_device(&records).values() {
        assert_eq!(sequences, &(1..=20).collect::<Vec<u64>>());
    }
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_sessions_of_one_replica_share_the_subscription_and_every_reading_arrives_once() {
    let brokers = Brokers::start();
    let mut config = brokers.config("ingest-sessions");
    config.mqtt.connections = 3;
    let ingest = RunningIngest::start(config, None).await;
    assert_eq!(ingest.metric("ingest_mqtt_connected").await, 3.0, "ready once all three are subscribed");
    let fleet = fleet(12);
    let sent = simulate(&brokers, &fleet, 30, 5).await;
    let records = brokers.read(READINGS, Duration::from_secs(30), move |r| r.len() as u64 >= sent).await;
    assert_eq!(records.len() as u64, sent, "every reading, once");
    for (device, mut sequences) in sequences_by_device(&records) {
        // Sessions take turns, so a device's readings may interleave across them.
        sequences.sort_unstable();
        assert_eq!(sequences, (1..=30).collect::<Vec<u64>>(), "{device}");
    }
    assert_eq!(ingest.metric("ingest_mqtt_acked_total").await as u64, sent);
    ingest.stop().await.unwrap();
}

/// A raw MQTT 5 publisher.
async fn publisher(brokers: &Brokers, id: &str) -> AsyncClient {
    let (client, mut events) = AsyncClient::new(MqttOptions::new(id, "127.0.0.1", brokers.mqtt.v5.port()), 100);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_readings_are_dead_lettered_with_their_reason_and_acknowledged_not_redelivered() {
    let brokers = Brokers::start();
    let ingest = RunningIngest::start(brokers.config("ingest-dlq"), None).await;
    let client = publisher(&brokers, "bad-publisher").await;
    let trace = ("traceparent".to_owned(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned());
    let properties = PublishProperties { user_properties: vec![trace.clone()], ..Default::default() };
    let bad: [(&str, &[u8], &str); 3] = [
        ("vehicles/sensor/data/car-a", b"{not json", "not_json"),
        ("vehicles/sensor/data/car-b", br#"{"speed": 10}"#, "missing_field"),
        ("vehicles/sensor/data/car-c", br#"[1, 2]"#, "not_an_object"),
    ];
    for (topic, payload, _) in bad {
        client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.to_vec(), properties.clone())
            .await
            .unwrap();
    }
    let letters = brokers.read(DEAD_LETTERS, Duration::from_secs(20), |r| r.len() >= 3).await;
    assert_eq!(letters.len(), 3);
    for ((topic, payload, reason), letter) in bad.iter().zip(&letters) {
        assert_eq!(letter.payload, *payload, "the original bytes");
        assert_eq!(letter.header("vigil.dead_letter.reason"), Some(reason.as_bytes()));
        assert!(!letter.header("vigil.dead_letter.error").unwrap().is_empty());
        assert_eq!(letter.header("mqtt.topic"), Some(topic.as_bytes()));
        assert_eq!(letter.header("traceparent"), Some(trace.1.as_bytes()), "user properties carried as headers");
    }
    assert_eq!(
        letters[1].header("vigil.dead_letter.field"),
        Some(&b"coolant_temp"[..]),
        "the first missing signal is named"
    );
    assert_eq!(ingest.metric("ingest_dead_lettered_total").await, 3.0);

    // Acknowledged: a restarted ingest on the same session gets none of them again.
    ingest.stop().await.unwrap();
    let ingest = RunningIngest::start(brokers.config("ingest-dlq"), None).await;
    client.publish("vehicles/sensor/data/car-d", QoS::AtLeastOnce, false, b"marker".to_vec()).await.unwrap();
    let letters = brokers.read(DEAD_LETTERS, Duration::from_secs(20), |r| r.len() >= 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // room for a wrongful redelivery
    let letters_after = brokers.read(DEAD_LETTERS, Duration::from_secs(2), |_| false).await;
    assert_eq!(letters.len(), 4);
    assert_eq!(
        letters_after.len(),
        4,
        "nothing redelivered: {:?}",
        letters_after.iter().map(|l| &l.payload).collect::<Vec<_>>()
    );
    assert_eq!(letters_after[3].payload, b"marker");
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_kafka_down_ingest_holds_at_most_its_in_flight_bound_and_recovers_by_itself() {
    let brokers = Brokers::start();
    let mut config = brokers.config("ingest-backpressure");
    config.max_in_flight = 16;
    let ingest = RunningIngest::start(config, None).await;
    brokers.kafka.brokers_down().unwrap();

    let fleet = fleet(8);
    let sending = publishing(&brokers, &fleet, 25, 5, 8);
    // The fleet publishes 200 readings; with Kafka down ingest takes its bound and waits.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let received = ingest.metric("ingest_messages_received_total").await;
    let in_flight = ingest.metric("ingest_in_flight").await;
    assert!(received > 0.0, "ingest read something");
    assert!(received <= 16.0 && in_flight <= 16.0, "bounded: received {received}, in flight {in_flight}");
    assert_eq!(ingest.metric("ingest_mqtt_acked_total").await, 0.0, "nothing acknowledged while Kafka is down");

    brokers.kafka.brokers_up().unwrap();
    let sent = sending.await.unwrap().published;
    let records = brokers.read(READINGS, Duration::from_secs(60), move |r| r.len() as u64 >= sent).await;
    assert_eq!(records.len() as u64, sent, "everything arrives once Kafka is back");
    for sequences in sequences_by_device(&records).values() {
        assert_eq!(sequences, &(1..=25).collect::<Vec<u64>>(), "in order through the outage");
    }
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_reading_is_lost_when_ingest_crashes_mid_stream() {
    let brokers = Brokers::start();
    let mut config = brokers.config("ingest-crash");
    // A plain persistent subscription here: rumqttd 0.20's router panics ("group must
    // exists", routing.rs) when the last member of a shared group drops with messages
    // unacknowledged. The shared-subscription crash is tested against Mosquitto
    // (tests/mosquitto.rs, killing the process).
    config.mqtt.share_group.clear();
    let ingest = RunningIngest::start(config.clone(), None).await;
    let fleet = fleet(10);
    let readings_per_car = 80;
    let sending = publishing(&brokers, &fleet, readings_per_car, 10, 5);
    // Crash once a tenth of the stream is through, stay down a while, come back on the same
    // session.
    let total = fleet.cars as u64 * readings_per_car;
    // Looked at often: the stream lasts under a second, and the crash must come mid-stream.
    Poll::within(Duration::from_secs(30))
        .every(Duration::from_millis(10))
        .until("ingest to acknowledge a tenth of the stream", async || {
            ingest.metric("ingest_mqtt_acked_total").await as u64 >= total / 10
        })
        .await;
    let acked_before_crash = ingest.metric("ingest_mqtt_acked_total").await as u64;
    assert!(
        acked_before_crash > 0 && acked_before_crash < total,
        "mid-stream: {acked_before_crash} of {total} acknowledged"
    );
    ingest.crash().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ingest = RunningIngest::start(config, None).await;
    let sent = sending.await.unwrap().published;

    let expected = sent;
    let records = brokers
        .read(READINGS, Duration::from_secs(60), move |r| {
            readings(r).iter().map(|x| (x.device_id.clone(), x.sequence)).collect::<BTreeSet<_>>().len() as u64
                >= expected
        })
        .await;
    let distinct: BTreeSet<(String, u64)> = readings(&records).into_iter().map(|r| (r.device_id, r.sequence)).collect();
    assert_eq!(distinct.len() as u64, sent, "every published reading is in Kafka after the crash");
    assert!(records.len() as u64 >= sent, "repeats are allowed (at least once), losses are not");
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_mqtt_connection_loses_nothing_and_old_acks_are_not_sent_on_the_new_one() {
    let brokers = Brokers::start();
    let outage = embedded_brokers::Outage::relay_to(brokers.mqtt.v5.port()).await.unwrap();
    let mut config = brokers.config("ingest-reconnect");
    config.mqtt.url = format!("mqtt://127.0.0.1:{}", outage.port);
    config.mqtt.share_group.clear(); // see the crash test: rumqttd and shared groups
    let ingest = RunningIngest::start(config, None).await;
    // Kafka down: ingest holds what it read, unacknowledged, when the connection drops.
    brokers.kafka.brokers_down().unwrap();
    let fleet = fleet(4);
    let sending = publishing(&brokers, &fleet, 20, 5, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(ingest.metric("ingest_in_flight").await > 0.0, "readings held while Kafka is down");
    outage.happen(Duration::from_millis(300)).await;
    brokers.kafka.brokers_up().unwrap();
    let sent = sending.await.unwrap().published;

    let records = brokers
        .read(READINGS, Duration::from_secs(60), move |r| {
            readings(r).iter().map(|x| (x.device_id.clone(), x.sequence)).collect::<BTreeSet<_>>().len() as u64 >= sent
        })
        .await;
    let distinct: BTreeSet<(String, u64)> = readings(&records).into_iter().map(|r| (r.device_id, r.sequence)).collect();
    assert_eq!(distinct.len() as u64, sent, "every reading reached Kafka across the reconnect");
    assert!(ingest.metric("ingest_mqtt_connection_errors_total").await >= 1.0, "the drop was seen");
    assert!(
        ingest.metric("ingest_mqtt_stale_acks_dropped_total").await > 0.0,
        "the acks of messages read on the lost connection were not sent on the new one"
    );
    ingest.stop().await.unwrap();
}

/// An oversized message never stalls ingest: a payload over `max_payload_bytes` is
/// dead-lettered with its first bytes; one over `max_packet_bytes`, which with MQTT 3.1.1
/// breaks the connection (the broker cannot know the limit) and is resent on every
/// reconnect, is read once more on a connection with a raised limit and dead-lettered, so
/// readings keep flowing after it. With MQTT 5 the broker may drop it unseen instead.
async fn oversized_messages_are_dead_lettered_and_ingest_keeps_flowing(protocol: ingest::config::MqttProtocol) {
    let brokers = Brokers::start();
    let mut config = brokers.config("ingest-oversized");
    if protocol == ingest::config::MqttProtocol::V311 {
        config.mqtt.url = format!("mqtt://127.0.0.1:{}", brokers.mqtt.v4.port());
    }
    config.mqtt.protocol = protocol;
    config.mqtt.share_group.clear(); // see the crash test: rumqttd and shared groups
    config.mqtt.max_payload_bytes = 4 * 1024;
    config.mqtt.max_packet_bytes = 16 * 1024;
    let ingest = RunningIngest::start(config, None).await;
    let client = publisher(&brokers, "oversized-publisher").await;
    let (large, huge) = (vec![b'x'; 8 * 1024], vec![b'y'; 100 * 1024]);
    for payload in [&large, &huge] {
        client.publish("vehicles/sensor/data/car-big", QoS::AtLeastOnce, false, payload.clone()).await.unwrap();
    }
    let sent = simulate(&brokers, &fleet(2), 10, 5).await;
    let records = brokers.read(READINGS, Duration::from_secs(30), move |r| r.len() as u64 >= sent).await;
    assert_eq!(records.len() as u64, sent, "readings after the oversized messages flow");

    // The 8 KiB one may be dead-lettered twice: its ack is dropped when the 100 KiB one
    // breaks the connection, and the broker resends it (at least once, never lost).
    let size_of = |letter: &embedded_brokers::ReadRecord| {
        String::from_utf8_lossy(letter.header("vigil.dead_letter.payload_bytes").unwrap_or_default()).into_owned()
    };
    let v311 = protocol == ingest::config::MqttProtocol::V311;
    let letters = brokers
        .read(DEAD_LETTERS, Duration::from_secs(20), move |letters| {
            let sizes: Vec<String> = letters.iter().map(size_of).collect();
            sizes.iter().any(|s| s == "8192") && (!v311 || sizes.iter().any(|s| s == "102400"))
        })
        .await;
    let sizes: Vec<String> = letters.iter().map(size_of).collect();
    assert!(sizes.iter().any(|s| s == "8192"), "dead letters: {sizes:?}");
    for letter in &letters {
        assert_eq!(letter.header("vigil.dead_letter.reason"), Some(&b"payload_too_large"[..]), "{sizes:?}");
        assert_eq!(letter.payload.len(), 4096, "the dead letter keeps the first 4 KiB");
        assert!(["8192", "102400"].contains(&size_of(letter).as_str()), "{sizes:?}");
    }
    let oversized = ingest.metric("ingest_mqtt_oversized_packets_total").await;
    if v311 {
        assert!(sizes.iter().any(|s| s == "102400"), "dead letters: {sizes:?}");
        assert_eq!(oversized, 1.0, "broke one connection, once");
    }
    // No loop: at most the one broken connection, however long it runs.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(oversized <= 1.0);
    assert!(ingest.metric("ingest_mqtt_connection_errors_total").await <= 1.0);
    let letters = brokers.read(DEAD_LETTERS, Duration::from_secs(1), |_| false).await;
    assert_eq!(ingest.metric("ingest_dead_lettered_total").await, letters.len() as f64, "every one counted");
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_over_mqtt_3_1_1_are_dead_lettered_without_a_reconnect_loop() {
    oversized_messages_are_dead_lettered_and_ingest_keeps_flowing(ingest::config::MqttProtocol::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_over_mqtt_5_are_dead_lettered_or_dropped_by_the_broker() {
    oversized_messages_are_dead_lettered_and_ingest_keeps_flowing(ingest::config::MqttProtocol::V5).await;
}
