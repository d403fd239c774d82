//! Live publishing through a real MQTT broker (rumqttd, in-process on loopback): a
//! subscriber receives exactly the readings the offline simulation produces for the same
//! seed and clock, on the seed's topics, every one acknowledged.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use device_simulator::fleet::{Fleet, FleetOptions};
use device_simulator::publish::{PublishOptions, publish};
use embedded_brokers::MqttBroker;
use prost_types::Timestamp;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sensor::SensorReading;
use sensor::json::{Envelope, parse};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_publishes_every_labelled_reading_to_its_topic_and_gets_it_acknowledged() {
    let broker = MqttBroker::start().unwrap();
    let fleet = FleetOptions { cars: 12, fault_share: 0.5, onset_window_s: (0.05, 0.2), ..FleetOptions::default() };
    let readings_per_car = 25;

    // A subscriber on the seed's topic filter, subscribed before anything is published.
    let mut options = MqttOptions::new("test-subscriber", "127.0.0.1", broker.v4.port());
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (subscriber, mut events) = AsyncClient::new(options, 100);
    subscriber.subscribe("vehicles/sensor/data/+", QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.unwrap() {
            break;
        }
    }
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
    publishing.interval = Duration::from_millis(10);
    publishing.readings_per_car = Some(readings_per_car as u64);
    publishing.cars_per_connection = 3;
    publishing.start = start;
    let report = publish(&fleet, &publishing, std::future::pending()).await.unwrap();
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
