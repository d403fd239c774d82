//! `IngestService` over a real gRPC connection: a response means Kafka has the readings,
//! and an invalid reading is refused with INVALID_ARGUMENT naming it, before anything of
//! its request is written.

mod support;

use std::time::Duration;

use device_simulator::fleet::{Fleet, FleetOptions};
use proto::vigil::ingest::v1::PublishRequest;
use proto::vigil::ingest::v1::ingest_service_client::IngestServiceClient;
use support::{Brokers, READINGS, RunningIngest, readings};
use tonic::Code;

/// `rounds` readings from each of `cars` cars, in publishing order.
fn fleet_readings(cars: usize, rounds: usize) -> Vec<sensor::SensorReading> {
    let options = FleetOptions { cars, ..FleetOptions::default() };
    let mut fleet = Fleet::new(&options, std::time::SystemTime::now().into());
    (0..rounds).flat_map(|_| fleet.step(1.0)).collect()
}

async fn start(brokers: &Brokers, client_id: &str) -> (RunningIngest, IngestServiceClient<tonic::transport::Channel>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let ingest = RunningIngest::start(brokers.config(client_id), Some(listener)).await;
    (ingest, IngestServiceClient::connect(address).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_response_means_kafka_has_every_reading_keyed_by_device() {
    let brokers = Brokers::start();
    let (ingest, mut client) = start(&brokers, "grpc-unary").await;
    let sent = fleet_readings(5, 4);
    let response = client.publish(PublishRequest { readings: sent.clone() }).await.unwrap().into_inner();
    assert_eq!(response.accepted, 20);
    // The response came after Kafka confirmed: everything is readable now, no waiting.
    let records = brokers.read(READINGS, Duration::from_secs(10), |r| r.len() >= 20).await;
    assert_eq!(records.len(), 20);
    let mut got = readings(&records);
    for (record, reading) in records.iter().zip(&got) {
        assert_eq!(record.key.as_deref(), Some(reading.device_id.as_bytes()));
    }
    got.sort_by(|a, b| (&a.device_id, a.sequence).cmp(&(&b.device_id, b.sequence)));
    let mut expected = sent;
    expected.sort_by(|a, b| (&a.device_id, a.sequence).cmp(&(&b.device_id, b.sequence)));
    assert_eq!(got, expected, "written as sent");
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reading_fails_its_request_naming_the_field_and_nothing_of_it_is_written() {
    let brokers = Brokers::start();
    let (ingest, mut client) = start(&brokers, "grpc-invalid").await;
    let mut bad = fleet_readings(3, 1);
    bad[1].speed = -4.0;
    let status = client.publish(PublishRequest { readings: bad }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("readings[1].speed: "), "{}", status.message());

    let mut missing_device = fleet_readings(1, 1);
    missing_device[0].device_id.clear();
    let status = client.publish(PublishRequest { readings: missing_device }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("device_id"), "{}", status.message());

    // A device id of a few hundred KB, and event times no clock of the fleet can have.
    let mut huge_device = fleet_readings(1, 1);
    huge_device[0].device_id = "x".repeat(300_000);
    let status = client.publish(PublishRequest { readings: huge_device }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("readings[0].device_id: "), "{}", status.message());
    assert!(status.message().len() < 200, "the id is not echoed: {} bytes", status.message().len());
    for seconds in [253_402_300_799, i64::MAX, 0] {
        let mut dated = fleet_readings(1, 1);
        dated[0].event_time = Some(prost_types::Timestamp { seconds, nanos: 0 });
        let status = client.publish(PublishRequest { readings: dated }).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("readings[0].event_time: "), "{seconds}: {}", status.message());
    }

    // Each refusal counted by its reason, never by anything the client chose.
    let metrics = ingest.admin.metrics().await;
    for (reason, count) in
        [("out_of_range", 1.0), ("missing_field", 1.0), ("too_long", 1.0), ("implausible_event_time", 3.0)]
    {
        let counted = test_support::metric(&metrics, "ingest_grpc_requests_refused_total", &[("reason", reason)]);
        assert_eq!(counted, Some(count), "{reason}");
    }
    assert_eq!(test_support::metric_total(&metrics, "ingest_grpc_requests_refused_total", &[]), 6.0);

    // A good request afterwards is the only thing in the topic.
    let good = fleet_readings(2, 1);
    client.publish(PublishRequest { readings: good.clone() }).await.unwrap();
    let records = brokers.read(READINGS, Duration::from_secs(3), |_| false).await;
    assert_eq!(records.len(), good.len(), "nothing of the refused requests was written");
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_confirmed_whole_and_an_invalid_request_ends_it_naming_the_request() {
    let brokers = Brokers::start();
    let (ingest, mut client) = start(&brokers, "grpc-stream").await;
    let sent = fleet_readings(10, 30);
    let requests: Vec<PublishRequest> = sent.chunks(7).map(|c| PublishRequest { readings: c.to_vec() }).collect();
    let response = client.publish_stream(futures::stream::iter(requests)).await.unwrap().into_inner();
    assert_eq!(response.accepted, sent.len() as u64);
    let records = brokers.read(READINGS, Duration::from_secs(10), |r| r.len() >= 300).await;
    assert_eq!(records.len(), 300);
    // Each device's readings keep their order through the stream.
    let mut by_device = std::collections::BTreeMap::<String, Vec<u64>>::new();
    for reading in readings(&records) {
        by_device.entry(reading.device_id).or_default().push(reading.sequence);
    }
    for sequences in by_device.values() {
        assert_eq!(sequences, &(1..=30).collect::<Vec<u64>>());
    }

    let mut bad = fleet_readings(2, 3);
    bad[4].coolant_temp = f32::NAN;
    let requests: Vec<PublishRequest> = bad.chunks(2).map(|c| PublishRequest { readings: c.to_vec() }).collect();
    let status = client.publish_stream(futures::stream::iter(requests)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("request 2: readings[0].coolant_temp"), "{}", status.message());
    let records = brokers.read(READINGS, Duration::from_secs(3), |_| false).await;
    assert_eq!(records.len(), 300 + 4, "the two requests before the invalid one were written");
    ingest.stop().await.unwrap();
}
