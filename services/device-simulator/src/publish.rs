//! Live publishing: the fleet's readings over MQTT, as the seed demo's cars send them
//! (QoS 1 to `vehicles/sensor/data/<device-id>`, Vigil's JSON form with the label).
//!
//! By default every car is its own MQTT client, as in a real fleet; `cars_per_connection`
//! multiplexes several cars over one connection for fleets larger than the broker's
//! connection limit. Each connection steps its cars every `interval` and publishes; the
//! client's bounded request queue is the backpressure (a slow broker slows the cars rather
//! than growing memory). The event loop is polled continuously (acks and pings depend on
//! it); when the connection drops, it reconnects with exponential backoff, resumes its
//! persistent session and rumqttc resends the unacknowledged QoS 1 messages. At the end (reading count reached or
//! shutdown) each connection waits for its outstanding acks before disconnecting, so the
//! report's counts are final.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prost_types::Timestamp;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::watch;

use crate::car::Car;
use crate::fleet::FleetOptions;
use crate::metrics::PublishMetrics;

/// The seed demo's topic layout; the device id is appended as the last level.
pub const DEFAULT_TOPIC_PREFIX: &str = "vehicles/sensor/data";

#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub host: String,
    pub port: u16,
    pub topic_prefix: String,
    /// Time between two readings of one car (also the simulated time step).
    pub interval: Duration,
    /// Stop after this many readings per car (`None`: until shutdown).
    pub readings_per_car: Option<u64>,
    pub cars_per_connection: usize,
    pub client_id_prefix: String,
    /// The fleet's clock origin: event times are `start` + simulated time.
    pub start: Timestamp,
    /// How long to wait for outstanding acks at the end.
    pub drain_timeout: Duration,
    /// Simulated time each car drives before its first published reading (in steps of
    /// `interval`), so a short run starts with warm engines rather than every car's cold
    /// start at once. Event times still begin at `start`; fault onsets count from the
    /// car's own start, that is, they include this time.
    pub warm_up: Duration,
}

impl PublishOptions {
    /// Options for a broker at `host:port` with the seed's topics, one reading per second.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            topic_prefix: DEFAULT_TOPIC_PREFIX.into(),
            interval: Duration::from_secs(1),
            readings_per_car: None,
            cars_per_connection: 1,
            client_id_prefix: "vigil-sim".into(),
            start: std::time::SystemTime::now().into(),
            drain_timeout: Duration::from_secs(10),
            warm_up: Duration::ZERO,
        }
    }
}

/// What was sent: readings handed to the MQTT client, acknowledged by the broker, and
/// published readings by ground-truth label.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Report {
    pub published: u64,
    pub acknowledged: u64,
    pub by_label: BTreeMap<String, u64>,
}

/// Publishes until every car sent `readings_per_car` readings or `shutdown` resolves,
/// counting what happens in `metrics`.
pub async fn publish(
    fleet: &FleetOptions,
    options: &PublishOptions,
    metrics: &PublishMetrics,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Report> {
    anyhow::ensure!(options.cars_per_connection > 0, "cars per connection must be positive");
    anyhow::ensure!(!options.interval.is_zero(), "the publishing interval must be positive");
    let (stop, stopped) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let indices: Vec<usize> = (0..fleet.cars).collect();
    metrics.connections.set(fleet.cars.div_ceil(options.cars_per_connection) as i64);
    for (n, chunk) in indices.chunks(options.cars_per_connection).enumerate() {
        let cars: Vec<Car> = chunk.iter().map(|&i| crate::fleet::car(fleet, i)).collect();
        let client_id = if options.cars_per_connection == 1 {
            format!("{}-{}", options.client_id_prefix, cars[0].device_id)
        } else {
            format!("{}-conn-{n}", options.client_id_prefix)
        };
        connections.spawn(connection(client_id, cars, options.clone(), metrics.clone(), stopped.clone()));
    }
    let all_done = async {
        let mut report = Report::default();
        while let Some(result) = connections.join_next().await {
            let part = result??;
            report.published += part.published;
            report.acknowledged += part.acknowledged;
            for (label, count) in part.by_label {
                *report.by_label.entry(label).or_default() += count;
            }
        }
        anyhow::Ok(report)
    };
    tokio::pin!(all_done);
    tokio::select! {
        report = &mut all_done => report,
        () = shutdown => {
            let _ = stop.send(true);
            all_done.await
        }
    }
}

async fn connection(
    client_id: String,
    mut cars: Vec<Car>,
    options: PublishOptions,
    metrics: PublishMetrics,
    mut stopped: watch::Receiver<bool>,
) -> anyhow::Result<Report> {
    let mut mqtt = MqttOptions::new(&client_id, &options.host, options.port);
    // A persistent session (clean session off): after a dropped connection the broker
    // resumes the session and rumqttc resends the unacknowledged QoS 1 readings; with a
    // clean session it would discard them as belonging to the old one.
    mqtt.set_keep_alive(Duration::from_secs(30)).set_max_packet_size(1 << 20, 1 << 20).set_clean_session(false);
    let (client, mut event_loop) = AsyncClient::new(mqtt, 64);
    let acknowledged = Arc::new(AtomicU64::new(0));
    let driver = tokio::spawn({
        let acknowledged = Arc::clone(&acknowledged);
        let client_id = client_id.clone();
        let metrics = metrics.clone();
        async move {
            let mut backoff = admin::retry::Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
            let mut up = false;
            let mut set_up = |now: bool| {
                if now != up {
                    metrics.connected.add(if now { 1 } else { -1 });
                    up = now;
                }
            };
            loop {
                match event_loop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acknowledged.fetch_add(1, Ordering::Relaxed);
                        metrics.acknowledged.inc();
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff.reset();
                        set_up(true);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                        set_up(false);
                        return;
                    }
                    Ok(_) => {}
                    Err(error) => {
                        set_up(false);
                        metrics.connection_errors.inc();
                        let wait = backoff.next_delay();
                        tracing::warn!(client_id, %error, retry_in_ms = wait.as_millis() as u64, "mqtt connection failed");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
    });

    let mut report = Report::default();
    let dt = options.interval.as_secs_f64();
    let mut ticks = tokio::time::interval(options.interval);
    let mut sent_per_car = 0u64;
    let warm_up_steps = (options.warm_up.as_secs_f64() / dt).round() as u64;
    // Driven but not published; their event times are shifted back so published ones
    // begin at `start`.
    let warm_up_start = shift_back(&options.start, warm_up_steps as f64 * dt);
    for car in &mut cars {
        for _ in 0..warm_up_steps {
            car.step(dt, &warm_up_start);
        }
    }
    let start = if warm_up_steps > 0 { warm_up_start } else { options.start };
    loop {
        if options.readings_per_car.is_some_and(|n| sent_per_car >= n) || *stopped.borrow() {
            break;
        }
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped.changed() => break,
        }
        for car in &mut cars {
            let reading = car.step(dt, &start);
            let topic = format!("{}/{}", options.topic_prefix, reading.device_id);
            let label = sensor::fault_name(reading.fault());
            client.publish(topic, QoS::AtLeastOnce, false, sensor::json::to_json(&reading)).await?;
            report.published += 1;
            metrics.published.with_label_values(&[label.as_str()]).inc();
            *report.by_label.entry(label).or_default() += 1;
        }
        sent_per_car += 1;
    }

    // Wait for the broker to acknowledge what was sent, then leave cleanly.
    let deadline = tokio::time::Instant::now() + options.drain_timeout;
    while acknowledged.load(Ordering::Relaxed) < report.published && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    report.acknowledged = acknowledged.load(Ordering::Relaxed);
    if report.acknowledged < report.published {
        tracing::warn!(
            client_id,
            published = report.published,
            acknowledged = report.acknowledged,
            "unacknowledged readings at shutdown"
        );
    }
    let _ = client.disconnect().await;
    let mut driver = driver;
    if tokio::time::timeout(Duration::from_secs(2), &mut driver).await.is_err() {
        driver.abort();
    }
    Ok(report)
}

/// `start` moved `seconds` earlier.
fn shift_back(start: &prost_types::Timestamp, seconds: f64) -> prost_types::Timestamp {
    let nanos = i128::from(start.seconds) * 1_000_000_000 + i128::from(start.nanos) - (seconds * 1e9) as i128;
    prost_types::Timestamp {
        seconds: nanos.div_euclid(1_000_000_000) as i64,
        nanos: nanos.rem_euclid(1_000_000_000) as i32,
    }
}
