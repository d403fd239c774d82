//! MQTT proxy mode with real MQTT clients (rumqttc's 3.1.1 and 5 clients, the device
//! simulator, hand-written packets for what no client sends) and librdkafka's mock
//! Kafka cluster, no MQTT broker anywhere: an acknowledgement means Kafka has the
//! reading, acknowledgements come in publish order, logins and the ACL refuse with the
//! protocol's reason codes, and nothing is acknowledged while Kafka is down.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use device_simulator::fleet::{Fleet, FleetOptions};
use embedded_brokers::KafkaCluster;
use ingest::config::IngestConfig;
use support::{DEAD_LETTERS, READINGS, RunningIngest, readings};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Ingest with only the MQTT proxy (no bridge, no MQTT broker) on a loopback port.
async fn start_proxy(kafka: &KafkaCluster, adjust: impl FnOnce(&mut IngestConfig)) -> (RunningIngest, SocketAddr) {
    let mut config = support::config(kafka, "", "proxy");
    config.mqtt.url.clear();
    adjust(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let listeners = ingest::Listeners { mqtt_proxy: Some(listener), ..Default::default() };
    (RunningIngest::start_with(config, listeners).await, address)
}

/// `rounds` readings of each of `cars` cars, as (MQTT topic, JSON payload).
fn fleet_messages(cars: usize, rounds: usize) -> Vec<(String, Vec<u8>)> {
    let options = FleetOptions { cars, ..FleetOptions::default() };
    let mut fleet = Fleet::new(&options, std::time::SystemTime::now().into());
    (0..rounds)
        .flat_map(|_| fleet.step(1.0))
        .map(|r| (format!("vehicles/sensor/data/{}", r.device_id), sensor::json::to_json(&r).into_bytes()))
        .collect()
}

/// What a client saw: the packet ids of its QoS 1/2 PUBLISHes in the order it sent them,
/// the answers (PUBACK or PUBREC: id and reason) in the order they came, and how the
/// session ended.
#[derive(Debug, Default)]
struct Session {
    sent: Vec<u16>,
    answered: Vec<(u16, String)>,
    /// QoS 2 exchanges completed (PUBCOMP).
    completed: usize,
    /// The connection error that ended it, if one did (a refused CONNECT among them).
    error: Option<String>,
}

impl Session {
    fn answered_ids(&self) -> Vec<u16> {
        self.answered.iter().map(|(id, _)| *id).collect()
    }
}

/// Publishes `messages` (topic, payload, QoS) with rumqttc's MQTT 5 client, then waits
/// until each QoS 1/2 message was answered (or the connection ended, or 20 s passed);
/// SUBSCRIBEs to `subscribe` first, when given.
async fn mqtt5(
    proxy: SocketAddr,
    client_id: &str,
    login: Option<(&str, &str)>,
    subscribe: Option<&str>,
    messages: &[(String, Vec<u8>, u8)],
) -> (Session, Vec<String>) {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut options = MqttOptions::new(client_id, proxy.ip().to_string(), proxy.port());
    if let Some((user, password)) = login {
        options.set_credentials(user, password);
    }
    let (client, mut events) = AsyncClient::new(options, messages.len() + 16);
    if let Some(filter) = subscribe {
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    }
    for (topic, payload, qos) in messages {
        let qos = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][usize::from(*qos)];
        client.publish(topic, qos, false, payload.clone()).await.unwrap();
    }
    let expected = messages.iter().filter(|m| m.2 > 0).count();
    let mut session = Session::default();
    let mut suback = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while session.answered.len() < expected || suback.len() < usize::from(subscribe.is_some()) {
            match events.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Publish(id))) if id != 0 => session.sent.push(id),
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    session.answered.push((ack.pkid, format!("{:?}", ack.reason)))
                }
                Ok(Event::Incoming(Packet::PubRec(rec))) => {
                    session.answered.push((rec.pkid, format!("{:?}", rec.reason)))
                }
                Ok(Event::Incoming(Packet::PubComp(_))) => session.completed += 1,
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    suback = ack.return_codes.iter().map(|c| format!("{c:?}")).collect()
                }
                Ok(_) => {}
                Err(error) => {
                    session.error = Some(format!("{error:?}"));
                    return;
                }
            }
        }
        // The QoS 2 exchanges finish after their PUBREC.
        while session.completed < messages.iter().filter(|m| m.2 == 2).count() {
            if let Ok(Event::Incoming(Packet::PubComp(_))) = events.poll().await {
                session.completed += 1;
            }
        }
    })
    .await;
    let _ = client.try_disconnect();
    (session, suback)
}

/// The same with rumqttc's MQTT 3.1.1 client.
async fn mqtt311(
    proxy: SocketAddr,
    client_id: &str,
    login: Option<(&str, &str)>,
    messages: &[(String, Vec<u8>, u8)],
) -> Session {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut options = MqttOptions::new(client_id, proxy.ip().to_string(), proxy.port());
    if let Some((user, password)) = login {
        options.set_credentials(user, password);
    }
    let (client, mut events) = AsyncClient::new(options, messages.len() + 16);
    for (topic, payload, qos) in messages {
        let qos = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][usize::from(*qos)];
        client.publish(topic, qos, false, payload.clone()).await.unwrap();
    }
    let expected = messages.iter().filter(|m| m.2 > 0).count();
    let mut session = Session::default();
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while session.answered.len() < expected || session.completed < messages.iter().filter(|m| m.2 == 2).count() {
            match events.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Publish(id))) if id != 0 => session.sent.push(id),
                Ok(Event::Incoming(Packet::PubAck(ack))) => session.answered.push((ack.pkid, "Success".into())),
                Ok(Event::Incoming(Packet::PubRec(rec))) => session.answered.push((rec.pkid, "Success".into())),
                Ok(Event::Incoming(Packet::PubComp(_))) => session.completed += 1,
                Ok(_) => {}
                Err(error) => {
                    session.error = Some(format!("{error:?}"));
                    return;
                }
            }
        }
    })
    .await;
    let _ = client.try_disconnect();
    session
}

fn with_qos(messages: Vec<(String, Vec<u8>)>, qos: u8) -> Vec<(String, Vec<u8>, u8)> {
    messages.into_iter().map(|(t, p)| (t, p, qos)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_on_3_1_1_and_5_are_acknowledged_in_publish_order_once_kafka_has_each_reading() {
    let kafka = support::kafka();
    let (ingest, proxy) = start_proxy(&kafka, |_| {}).await;

    // 150 QoS 1 readings of 3 cars, then a malformed one, 2 at QoS 2 and 2 at QoS 0.
    let mut expected_readings = 0;
    for (version, client_id) in [("5", "car-fleet-5"), ("3.1.1", "car-fleet-311")] {
        let mut messages = with_qos(fleet_messages(3, 50), 1);
        messages.push(("vehicles/sensor/data/car-x".into(), b"{not json".to_vec(), 1));
        messages.extend(with_qos(fleet_messages(1, 2), 2));
        messages.extend(with_qos(fleet_messages(1, 2), 0));
        let session = match version {
            "5" => mqtt5(proxy, client_id, None, None, &messages).await.0,
            _ => mqtt311(proxy, client_id, None, &messages).await,
        };
        assert_eq!(session.error, None, "MQTT {version}");
        assert_eq!(session.answered.len(), 153, "MQTT {version}: every QoS 1/2 message answered");
        assert_eq!(session.answered_ids(), session.sent, "MQTT {version}: answers in publish order");
        assert!(session.answered.iter().all(|(_, reason)| reason == "Success"), "{:?}", session.answered);
        assert_eq!(session.completed, 2, "MQTT {version}: QoS 2 exchanges completed");
        expected_readings += 150 + 2 + 2;
    }

    // An acknowledgement was sent only after Kafka confirmed: they are all there already.
    let records = test_support::kafka::read_to_end(&kafka, READINGS).await;
    assert_eq!(records.len(), expected_readings, "every reading, once (QoS 0's too, Kafka being up)");
    for (record, reading) in records.iter().zip(readings(&records)) {
        assert_eq!(record.key.as_deref(), Some(reading.device_id.as_bytes()));
        assert_eq!(record.header("mqtt.topic"), Some(format!("vehicles/sensor/data/{}", reading.device_id).as_bytes()));
    }
    let dead = test_support::kafka::read_to_end(&kafka, DEAD_LETTERS).await;
    assert_eq!(dead.len(), 2, "the malformed reading of each client, with its reason");
    assert!(dead.iter().all(|r| r.payload == b"{not json" && r.header("vigil.dead_letter.reason").is_some()));
    assert_eq!(ingest.metric("ingest_mqtt_acked_total").await, 306.0);
    assert_eq!(ingest.metric("ingest_proxy_connections").await, 0.0, "both clients left");
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulated_fleet_publishes_straight_to_the_proxy_with_no_broker_in_between() {
    use device_simulator::metrics::PublishMetrics;
    use device_simulator::publish::{PublishOptions, publish};
    let kafka = support::kafka();
    let (ingest, proxy) = start_proxy(&kafka, |_| {}).await;
    let fleet = FleetOptions { cars: 12, fault_share: 0.3, ..FleetOptions::default() };
    let mut options = PublishOptions::new("127.0.0.1", proxy.port());
    options.interval = Duration::from_millis(20);
    options.readings_per_car = Some(25);
    options.cars_per_connection = 4;
    let report = publish(&fleet, &options, &PublishMetrics::unregistered(), std::future::pending()).await.unwrap();
    assert_eq!((report.published, report.acknowledged), (300, 300));
    let records = test_support::kafka::read_to_end(&kafka, READINGS).await;
    assert_eq!(records.len(), 300, "every acknowledged reading is in Kafka");
    let devices: std::collections::BTreeSet<_> = readings(&records).into_iter().map(|r| r.device_id).collect();
    assert_eq!(devices.len(), 12);
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_and_the_acl_refuse_with_their_reason_codes_and_nothing_refused_is_written() {
    let kafka = support::kafka();
    let users = test_support::temp_file("users", "car-1:secret-1\ncar-2:secret-2\n");
    let (ingest, proxy) = start_proxy(&kafka, |config| {
        config.mqtt_proxy.users_file = Some(users.path.clone());
        config.mqtt_proxy.device_id_from = ingest::proxy::access::DeviceIdFrom::Username;
        config.mqtt_proxy.acl = vec!["vehicles/sensor/data/{device}".into()];
    })
    .await;
    let reading = |device: &str| {
        let mut fleet =
            Fleet::new(&FleetOptions { cars: 1, ..FleetOptions::default() }, std::time::SystemTime::now().into());
        let mut reading = fleet.step(1.0).remove(0);
        reading.device_id = device.to_owned();
        (format!("vehicles/sensor/data/{device}"), sensor::json::to_json(&reading).into_bytes(), 1)
    };

    // A wrong password: refused at CONNECT in each version's code.
    let (session, _) = mqtt5(proxy, "a", Some(("car-1", "wrong")), None, &[reading("car-1")]).await;
    assert!(session.error.unwrap().contains("BadUserNamePassword"));
    let session = mqtt311(proxy, "b", Some(("car-9", "secret-1")), &[reading("car-1")]).await;
    assert!(session.error.unwrap().contains("BadUserNamePassword"));
    let session = mqtt311(proxy, "c", None, &[reading("car-1")]).await;
    assert!(session.error.unwrap().contains("BadUserNamePassword"), "no login at all");

    // MQTT 5: its own topic is acknowledged, another car's refused with 0x87, and a
    // SUBSCRIBE refused with 0x87 too.
    let messages = [reading("car-1"), reading("car-2"), reading("car-1")];
    let (session, suback) = mqtt5(proxy, "car-1-client", Some(("car-1", "secret-1")), Some("#"), &messages).await;
    assert_eq!(session.error, None);
    let reasons: Vec<_> = session.answered.iter().map(|(_, r)| r.as_str()).collect();
    assert_eq!(reasons, ["Success", "NotAuthorized", "Success"]);
    assert_eq!(suback, ["NotAuthorized"]);

    // MQTT 3.1.1 cannot refuse a PUBLISH: the connection closes instead, after the
    // PUBACK of what came before. (Raw packets: a client library may drop what it read
    // just before the close.)
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(&connect_packet(false, "car-2-client", Some(("car-2", "secret-2")))).await.unwrap();
    let (own, foreign) = (reading("car-2"), reading("car-1"));
    stream.write_all(&publish_packet(false, &own.0, 1, &own.1)).await.unwrap();
    stream.write_all(&publish_packet(false, &foreign.0, 2, &foreign.1)).await.unwrap();
    let received = read_until_closed(&mut stream, Duration::from_secs(10)).await.expect("closed");
    assert_eq!(received, [0x20, 0x02, 0x00, 0x00, 0x40, 0x02, 0x00, 0x01], "CONNACK, PUBACK 1, close");

    let records = test_support::kafka::read_to_end(&kafka, READINGS).await;
    let mut devices: Vec<_> = readings(&records).into_iter().map(|r| r.device_id).collect();
    devices.sort();
    assert_eq!(devices, ["car-1", "car-1", "car-2"], "only what each car may publish");
    let metrics = ingest.admin.metrics().await;
    let count = |name: &str, reason: &str| test_support::metrics::metric_total(&metrics, name, &[("reason", reason)]);
    assert_eq!(count("ingest_proxy_connects_refused_total", "bad_credentials"), 3.0);
    assert_eq!(count("ingest_proxy_refused_total", "not_authorized"), 2.0);
    assert_eq!(count("ingest_proxy_refused_total", "subscribe"), 1.0);
    ingest.stop().await.unwrap();
}

/// A CONNECT as MQTT 5 (`v5`) or 3.1.1 with client id `id`, keep-alive 60 s and `login`.
fn connect_packet(v5: bool, id: &str, login: Option<(&str, &str)>) -> Vec<u8> {
    let flags = if login.is_some() { 0xC2 } else { 0x02 };
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', if v5 { 5 } else { 4 }, flags, 0x00, 60];
    if v5 {
        body.push(0x00);
    }
    let fields = [Some(id), login.map(|l| l.0), login.map(|l| l.1)];
    for field in fields.into_iter().flatten() {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field.as_bytes());
    }
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

/// A QoS 1 PUBLISH of `payload` to `topic`, id `pkid` (MQTT 5's with empty properties).
fn publish_packet(v5: bool, topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&pkid.to_be_bytes());
    if v5 {
        body.push(0x00);
    }
    body.extend_from_slice(payload);
    assert!(body.len() < 16_384);
    let length = body.len();
    let mut packet = vec![0x32, (length & 0x7F) as u8 | 0x80, (length >> 7) as u8];
    packet.extend_from_slice(&body);
    packet
}

/// A raw MQTT 5 connection, CONNACK read.
async fn raw_v5(proxy: SocketAddr, id: &str) -> TcpStream {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(&connect_packet(true, id, None)).await.unwrap();
    let mut header = [0u8; 2];
    stream.read_exact(&mut header).await.unwrap();
    let mut rest = vec![0u8; usize::from(header[1])];
    stream.read_exact(&mut rest).await.unwrap();
    assert_eq!((header[0], rest[1]), (0x20, 0x00), "CONNACK, success");
    stream
}

/// Everything the server sends until it closes the connection (or `within` passes).
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut received = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut received)).await.ok().map(|_| received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_kafka_is_down_nothing_is_acknowledged_and_a_client_over_its_receive_maximum_is_disconnected() {
    let kafka = support::kafka();
    let (ingest, proxy) = start_proxy(&kafka, |config| config.mqtt_proxy.receive_maximum = 8).await;
    kafka.brokers_down().unwrap();

    let (topic, payload) = &fleet_messages(1, 1)[0];
    let mut stream = raw_v5(proxy, "greedy").await;
    for pkid in 1..=8 {
        stream.write_all(&publish_packet(true, topic, pkid, payload)).await.unwrap();
    }
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut byte)).await;
    assert!(early.is_err(), "no PUBACK while Kafka is down: {early:?}");
    // A ninth unacknowledged QoS 1 message breaks the announced receive maximum.
    stream.write_all(&publish_packet(true, topic, 9, payload)).await.unwrap();
    kafka.brokers_up().unwrap();
    let received = read_until_closed(&mut stream, Duration::from_secs(20)).await.expect("closed");
    // The 8 PUBACKs once Kafka took the readings, then DISCONNECT 0x93.
    assert!(received.ends_with(&[0xE0, 0x01, 0x93]), "{received:02x?}");
    let pubacks = received.windows(4).filter(|w| w[0] == 0x40 && w[1] == 0x02).count();
    assert_eq!(pubacks, 8, "{received:02x?}");
    let records = test_support::kafka::read_to_end(&kafka, READINGS).await;
    assert_eq!(records.len(), 8, "the ninth was refused unread");
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_client_certificate_is_the_device_identity_and_https_ingest_answers() {
    use ingest::tls::{ClientCertificates, ServerTlsConfig};
    use test_support::pki::{Ca, tls_connect};
    let kafka = support::kafka();
    let ca = Ca::new("vigil-test-ca");
    let (server, car_1) = (ca.server(), ca.client("car-1"));
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (cert_file, key_file, ca_file) =
        (write("tls.crt", &server.cert), write("tls.key", &server.key), write("ca.crt", &ca.pem));
    let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let https = http_listener.local_addr().unwrap();
    let mut config = support::config(&kafka, "", "proxy-tls");
    config.mqtt.url.clear();
    config.mqtt_proxy.tls = Some(ServerTlsConfig {
        cert_file: cert_file.clone(),
        key_file: key_file.clone(),
        client_ca_file: Some(ca_file),
        client_certificates: ClientCertificates::Required,
    });
    config.mqtt_proxy.device_id_from = ingest::proxy::access::DeviceIdFrom::CertificateCn;
    config.mqtt_proxy.acl = vec!["vehicles/sensor/data/{device}".into()];
    config.http.tls = Some(ServerTlsConfig {
        cert_file,
        key_file,
        client_ca_file: None,
        client_certificates: ClientCertificates::None,
    });
    let proxy_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = proxy_listener.local_addr().unwrap();
    let listeners =
        ingest::Listeners { mqtt_proxy: Some(proxy_listener), http: Some(http_listener), ..Default::default() };
    let ingest = RunningIngest::start_with(config, listeners).await;
    let reading = |device: &str| {
        let mut fleet =
            Fleet::new(&FleetOptions { cars: 1, ..FleetOptions::default() }, std::time::SystemTime::now().into());
        let mut reading = fleet.step(1.0).remove(0);
        reading.device_id = device.to_owned();
        (format!("vehicles/sensor/data/{device}"), sensor::json::to_json(&reading))
    };

    // car-1's certificate: its own topic acknowledged, car-2's refused with 0x87.
    let mut stream = tls_connect(proxy, &ca, &[], Some(&car_1)).await.unwrap();
    stream.write_all(&connect_packet(true, "any-client-id", None)).await.unwrap();
    let (own, foreign) = (reading("car-1"), reading("car-2"));
    stream.write_all(&publish_packet(true, &own.0, 1, own.1.as_bytes())).await.unwrap();
    stream.write_all(&publish_packet(true, &foreign.0, 2, foreign.1.as_bytes())).await.unwrap();
    stream.write_all(&[0xE0, 0x00]).await.unwrap();
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut received)).await.unwrap().unwrap_or(0);
    let after_connack = &received[2 + usize::from(received[1])..];
    assert_eq!(after_connack, [0x40, 0x02, 0x00, 0x01, 0x40, 0x04, 0x00, 0x02, 0x87, 0x00], "{received:02x?}");

    // No certificate, or no TLS at all: never a CONNACK.
    for with_tls in [true, false] {
        let mut received = Vec::new();
        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
            if with_tls {
                let mut stream = tls_connect(proxy, &ca, &[], None).await?;
                stream.write_all(&connect_packet(true, "anonymous", None)).await?;
                stream.read_to_end(&mut received).await
            } else {
                let mut stream = TcpStream::connect(proxy).await?;
                stream.write_all(&connect_packet(true, "plain", None)).await?;
                stream.read_to_end(&mut received).await
            }
        })
        .await
        .expect("closed within the CONNECT timeout");
        assert!(outcome.is_err() || !received.starts_with(&[0x20]), "tls {with_tls}: {received:02x?}");
    }

    // HTTPS ingest takes the same reading (a plain HTTP/1.1 request over rustls).
    let body = reading("car-9").1;
    let mut stream = tls_connect(https, &ca, &[b"http/1.1"], None).await.unwrap();
    let request = format!(
        "POST {} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        ingest::http::PATH,
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let records = test_support::kafka::read_to_end(&kafka, READINGS).await;
    let mut devices: Vec<_> = readings(&records).into_iter().map(|r| r.device_id).collect();
    devices.sort();
    assert_eq!(devices, ["car-1", "car-9"]);
    let metrics = ingest.admin.metrics().await;
    let refused = test_support::metrics::metric_total(
        &metrics,
        "ingest_proxy_connects_refused_total",
        &[("reason", "tls_handshake")],
    );
    assert!(refused >= 1.0, "handshakes refused: {refused}");
    ingest.stop().await.unwrap();
}
