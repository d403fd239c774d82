//! Live publishing through a real MQTT broker (rumqttd, in-process on loopback): a
//! subscriber receives exactly the readings the offline simulation produces for the same
//! seed and clock, on the seed's topics, every one acknowledged.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use device_simulator::fleet::{Fleet, FleetOptions};
use device_simulator::metrics::PublishMetrics;
use device_simulator::publish::{MqttVersion, PublishOptions, publish};
use embedded_brokers::{MqttBroker, Outage};
use prost_types::Timestamp;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use sensor::SensorReading;
use sensor::json::{Envelope, parse};

/// A client of `broker` subscribed to the seed's topic filter (its SUBACK received, so
/// nothing published from now on is missed), and its event loop to receive on.
async fn subscriber(broker: &MqttBroker, client_id: &str) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", broker.v4.port());
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (subscriber, mut events) = AsyncClient::new(options, 100);
    subscriber.subscribe("vehicles/sensor/data/+", QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.unwrap() {
            break;
        }
    }
    (subscriber, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_publishes_every_labelled_reading_to_its_topic_and_gets_it_acknowledged() {
    let broker = MqttBroker::start().unwrap();
    let fleet = FleetOptions { cars: 12, fault_share: 0.5, onset_window_s: (0.05, 0.2), ..FleetOptions::default() };
    let readings_per_car = 25;

    // A subscriber on the seed's topic filter, subscribed before anything is published.
    let (_subscriber, mut events) = subscriber(&broker, "test-subscriber").await;
    let expected_count = fleet.cars * readings_per_car;
    let received = tokio::spawn(async move {
        let mut received = Vec::new();
        while received.len() < expected_count {
            if let Event::Incoming(Packet::Publish(message)) = events.poll().await.unwrap() {
                received.push(message);
            }
        }
        received
    });

    // Cars 3 to a connection, 10 ms apart in simulated and real time.
    let start = Timestamp { seconds: 1_767_225_600, nanos: 0 };
    let mut publishing = PublishOptions::new("127.0.0.1", broker.v4.port());
    publishing.version = MqttVersion::V311;
    publishing.interval = Duration::from_millis(10);
    publishing.readings_per_car = Some(readings_per_car as u64);
    publishing.cars_per_connection = 3;
    publishing.start = start;
    let report = publish(&fleet, &publishing, &PublishMetrics::unregistered(), std::future::pending()).await.unwrap();
    assert_eq!(report.published, expected_count as u64);
    assert_eq!(report.acknowledged, report.published, "every QoS 1 reading acknowledged");

    let received = tokio::time::timeout(Duration::from_secs(30), received).await.expect("all readings arrive").unwrap();
    let mut by_device: BTreeMap<String, Vec<SensorReading>> = BTreeMap::new();
    for message in received {
        let topic = message.topic.clone();
        let device = topic.strip_prefix("vehicles/sensor/data/").expect("the seed's topic layout");
        let envelope = Envelope { topic_device_id: Some(device), received_at: SystemTime::now() };
        let reading = parse(&message.payload, &envelope).expect("a valid reading");
        by_device.entry(reading.device_id.clone()).or_default().push(reading);
    }

    // The same fleet simulated offline, 10 ms steps from the same clock.
    let mut offline = Fleet::new(&fleet, start);
    let mut expected: BTreeMap<String, Vec<SensorReading>> = BTreeMap::new();
    for _ in 0..readings_per_car {
        for reading in offline.step(0.01) {
            expected.entry(reading.device_id.clone()).or_default().push(reading);
        }
    }
    assert_eq!(by_device, expected, "each car's readings arrive complete and in order");
    let labelled_faulty: u64 = report.by_label.iter().filter(|(k, _)| *k != "none").map(|(_, v)| v).sum();
    assert!(labelled_faulty > 0 && report.by_label["none"] > 0, "{:?}", report.by_label);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_outage_mid_run_loses_no_reading_the_cars_reconnect_and_resend() {
    let broker = MqttBroker::start().unwrap();
    let outage = Outage::relay_to(broker.v4.port()).await.unwrap();
    let fleet = FleetOptions { cars: 6, fault_share: 0.0, ..FleetOptions::default() };
    let readings_per_car = 60;

    // The subscriber is behind no relay: it sees what reached the broker.
    let (_subscriber, mut events) = subscriber(&broker, "outage-subscriber").await;
    let expected_count = fleet.cars * readings_per_car;
    let received = tokio::spawn(async move {
        // At least once: a reading whose ack was lost in the outage may arrive twice.
        let mut distinct = std::collections::BTreeSet::new();
        while distinct.len() < expected_count {
            if let Event::Incoming(Packet::Publish(message)) = events.poll().await.unwrap() {
                let reading: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
                distinct
                    .insert((reading["device_id"].as_str().unwrap().to_owned(), reading["sequence"].as_u64().unwrap()));
            }
        }
        distinct
    });

    // Each car its own client, one reading every 20 ms (1.2 s in all); the network goes
    // down for 400 ms a third of the way in.
    let mut publishing = PublishOptions::new("127.0.0.1", outage.port);
    publishing.version = MqttVersion::V311;
    publishing.interval = Duration::from_millis(20);
    publishing.readings_per_car = Some(readings_per_car as u64);
    let metrics = PublishMetrics::unregistered();
    let publishing_done = publish(&fleet, &publishing, &metrics, std::future::pending());
    let network = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        outage.happen(Duration::from_millis(400)).await;
    };
    let (report, ()) = tokio::join!(publishing_done, network);
    let report = report.unwrap();

    assert!(metrics.connection_errors.get() >= fleet.cars as u64, "every car saw the outage");
    assert_eq!(metrics.connected.get(), 0, "every connection closed at the end");
    assert_eq!(report.published, expected_count as u64);
    assert_eq!(report.acknowledged, report.published, "every reading acknowledged after reconnecting");
    let distinct = tokio::time::timeout(Duration::from_secs(30), received).await.expect("all readings arrive").unwrap();
    assert_eq!(distinct.len(), expected_count, "no reading lost to the outage");
}

/// MQTT 5, the default: two replicas split one fleet between them by car index, every
/// reading gets to the broker once and is acknowledged, and the traced share carries a
/// W3C `traceparent` user property naming a new trace (here every reading: share 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_mqtt5_replicas_split_the_fleet_and_traced_readings_carry_trace_context() {
    use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
    let broker = MqttBroker::start().unwrap();
    let fleet = FleetOptions { cars: 9, ..FleetOptions::default() };
    let readings_per_car = 4;
    let mut options = rumqttc::v5::MqttOptions::new("v5-subscriber", "127.0.0.1", broker.v5.port());
    options.set_max_packet_size(Some(1 << 20));
    let (subscriber, mut events) = rumqttc::v5::AsyncClient::new(options, 100);
    subscriber.subscribe("vehicles/sensor/data/+", rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await.unwrap();
    loop {
        if let rumqttc::v5::Event::Incoming(Packet5::SubAck(_)) = events.poll().await.unwrap() {
            break;
        }
    }
    let expected = fleet.cars * readings_per_car;
    let received = tokio::spawn(async move {
        let mut received = Vec::new();
        while received.len() < expected {
            if let rumqttc::v5::Event::Incoming(Packet5::Publish(message)) = events.poll().await.unwrap() {
                let properties = message.properties.unwrap_or_default().user_properties;
                received.push((String::from_utf8(message.topic.to_vec()).unwrap(), properties));
            }
        }
        received
    });

    let mut reports = Vec::new();
    for index in 0..2 {
        let mut publishing = PublishOptions::new("127.0.0.1", broker.v5.port());
        assert_eq!(publishing.version, MqttVersion::V5, "MQTT 5 by default");
        publishing.interval = Duration::from_millis(10);
        publishing.readings_per_car = Some(readings_per_car as u64);
        publishing.trace_share = 1.0;
        publishing.client_id_prefix = format!("replica-{index}");
        publishing.replica = Some(device_simulator::publish::Replica { index, count: 2 });
        let metrics = PublishMetrics::unregistered();
        let report = publish(&fleet, &publishing, &metrics, std::future::pending()).await.unwrap();
        assert_eq!(report.acknowledged, report.published, "replica {index}");
        assert_eq!(metrics.traced.get(), report.published, "replica {index}: every reading traced");
        reports.push(report.published);
    }
    // Car indices 0, 2, 4, 6, 8 to replica 0; 1, 3, 5, 7 to replica 1.
    assert_eq!(reports, vec![5 * readings_per_car as u64, 4 * readings_per_car as u64]);
    let received = tokio::time::timeout(Duration::from_secs(30), received).await.unwrap().unwrap();
    let devices: std::collections::BTreeSet<&str> =
        received.iter().map(|(topic, _)| topic.rsplit('/').next().unwrap()).collect();
    assert_eq!(devices.len(), fleet.cars, "every car published by exactly one replica");
    let mut traces = std::collections::BTreeSet::new();
    for (topic, properties) in &received {
        let traceparent = properties
            .iter()
            .find(|(key, _)| key == "traceparent")
            .map(|(_, value)| value.as_str())
            .unwrap_or_else(|| panic!("{topic}: no traceparent"));
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(parts.len(), 4, "{traceparent}");
        assert_eq!((parts[0], parts[1].len(), parts[2].len(), parts[3]), ("00", 32, 16, "01"), "{traceparent}");
        assert_ne!(parts[1], "0".repeat(32));
        traces.insert(parts[1].to_owned());
    }
    assert_eq!(traces.len(), received.len(), "each traced reading starts its own trace");
}

#[tokio::test]
async fn a_replica_without_cars_is_refused_before_connecting() {
    // No broker: the refusal must come before any connection is tried.
    let fleet = FleetOptions { cars: 2, ..FleetOptions::default() };
    let mut publishing = PublishOptions::new("127.0.0.1", 1);
    publishing.replica = Some(device_simulator::publish::Replica { index: 2, count: 3 });
    let metrics = PublishMetrics::unregistered();
    let error = publish(&fleet, &publishing, &metrics, std::future::pending()).await.unwrap_err();
    assert_eq!(error.to_string(), "replica 2 of 3 has no cars: the fleet has 2");
    assert_eq!(metrics.connection_errors.get(), 0);
}
