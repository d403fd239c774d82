//! What the ingest benches share: a fleet's readings, the records ingest would write for
//! them, the Kafka-only reference rate (those records through ingest's own `Sink`), and
//! the statistics.

#![allow(dead_code, unreachable_pub)] // each bench uses part of it

use std::time::Instant;

use device_simulator::fleet::{Fleet, FleetOptions};
use ingest::config::IngestConfig;
use ingest::record::{MqttChecks, MqttMessage, OutRecord, from_mqtt};

/// `per_car` readings of each of `cars` cars, 1 ms of simulated time apart.
pub fn fleet_readings(cars: usize, per_car: u64) -> Vec<sensor::SensorReading> {
    let mut fleet = Fleet::new(&FleetOptions { cars, ..FleetOptions::default() }, std::time::SystemTime::now().into());
    (0..per_car).flat_map(|_| fleet.step(0.001)).collect()
}

/// Each reading as published under `prefix/<device>`: (MQTT topic, JSON payload).
pub fn mqtt_messages(prefix: &str, readings: &[sensor::SensorReading]) -> Vec<(String, Vec<u8>)> {
    readings.iter().map(|r| (format!("{prefix}/{}", r.device_id), sensor::json::to_json(r).into_bytes())).collect()
}

/// The records `config`'s rules make of `messages`, as ingest converts them on arrival.
pub fn mqtt_records(config: &IngestConfig, messages: &[(String, Vec<u8>)]) -> Vec<OutRecord> {
    let routes = ingest::routing::Routes::new(&config.rules).unwrap();
    messages
        .iter()
        .map(|(topic, payload)| {
            let message = MqttMessage {
                topic,
                payload,
                qos: 1,
                user_properties: &[],
                content_type: None,
                received_at: std::time::SystemTime::now(),
            };
            from_mqtt(&routes, &MqttChecks::of(config), &message)
        })
        .collect()
}

/// CPU cores an external broker's process (`VIGIL_BENCH_BROKER_PID`) keeps busy while
/// `work` runs, with `work`'s output; `None` without a broker process to look at.
pub async fn with_broker_cpu<T>(work: impl Future<Output = T>) -> (T, Option<f64>) {
    let broker = std::env::var("VIGIL_BENCH_BROKER_PID").ok();
    let before = broker.as_deref().map(cpu_seconds);
    let start = Instant::now();
    let output = work.await;
    let elapsed = start.elapsed().as_secs_f64();
    let cores = broker.zip(before).map(|(pid, before)| (cpu_seconds(&pid) - before) / elapsed);
    (output, cores)
}

/// The Kafka side alone: `records` (converted beforehand, untimed) sent through ingest's
/// own `Sink` for `config`'s Kafka, `in_flight` at a time and in order, as ingest does.
/// The mock cluster, when it is the Kafka broker, runs in this process, on the same cores,
/// in every round that writes to Kafka.
pub async fn kafka_only_rate(config: &IngestConfig, records: Vec<OutRecord>, in_flight: usize) -> f64 {
    use futures::StreamExt as _;
    let metrics = ingest::metrics::Metrics::new(&prometheus::Registry::new()).unwrap();
    let sink = ingest::kafka::Sink::new(&config.kafka, &config.dead_letter_topic, metrics).unwrap();
    let total = records.len() as u64;
    let start = Instant::now();
    let written = futures::stream::iter(records).map(|record| sink.send(record)).buffered(in_flight);
    let confirmed = written.filter(|w| std::future::ready(w.is_ok())).count().await as u64;
    let elapsed = start.elapsed();
    assert_eq!(confirmed, total, "Kafka confirmed every record");
    total as f64 / elapsed.as_secs_f64()
}

/// The Kafka side alone at a steady `rate`: `records` handed to ingest's own `Sink` at
/// that pace, each one's time from the hand-over to Kafka's confirmation, in seconds. The
/// floor any intake path's acknowledgement latency sits on at that rate.
pub async fn kafka_only_latencies(config: &IngestConfig, records: Vec<OutRecord>, rate: f64) -> Vec<f64> {
    use futures::StreamExt as _;
    let metrics = ingest::metrics::Metrics::new(&prometheus::Registry::new()).unwrap();
    let sink = ingest::kafka::Sink::new(&config.kafka, &config.dead_letter_topic, metrics).unwrap();
    let mut pending = futures::stream::FuturesUnordered::new();
    let mut latencies = Vec::with_capacity(records.len());
    // Ticks of 1 ms (the timer's grain), each sending what the rate owes by then.
    let mut ticks = tokio::time::interval(std::time::Duration::from_millis(1));
    let start = Instant::now();
    let mut records = records.into_iter().peekable();
    while records.peek().is_some() || !pending.is_empty() {
        tokio::select! {
            _ = ticks.tick(), if records.peek().is_some() => {
                let owed = (start.elapsed().as_secs_f64() * rate) as usize;
                while latencies.len() + pending.len() < owed {
                    let Some(record) = records.next() else { break };
                    let sent = Instant::now();
                    let delivery = sink.send(record);
                    pending.push(async move { (delivery.await, sent.elapsed().as_secs_f64()) });
                }
            }
            Some((written, seconds)) = pending.next() => {
                written.expect("Kafka confirmed the record");
                latencies.push(seconds);
            }
        }
    }
    latencies
}

/// CPU time of this process so far (user + system), from /proc.
pub fn process_cpu_seconds() -> f64 {
    cpu_seconds("self")
}

/// CPU time of process `pid` (or `self`) so far (user + system), from /proc.
pub fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap_or_default().split(' ').collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|t| t.parse::<f64>().ok()).sum());
    ticks / 100.0
}

pub fn median(values: Vec<f64>) -> f64 {
    quantile(values, 0.5)
}

/// The `q` quantile (nearest rank) of `values`.
pub fn quantile(mut values: Vec<f64>, q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let rank = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}
