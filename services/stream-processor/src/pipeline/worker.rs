//! One partition's worker: takes readings while the in-flight window has room, scores them
//! concurrently through the model server, and writes each reading's outputs and stores its
//! offset in the partition's order.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt as _;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use opentelemetry::trace::TraceContextExt as _;
use prost::Message as _;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers as _, Message as _, OwnedMessage};
use sensor::SensorReading;
use tokio::sync::mpsc;

use crate::metrics::{Metrics, Stage};
use crate::model::{Retry, ScoreError};
use crate::output::{self, CARRIED_HEADERS, OutKind, OutRecord, Source};
use crate::trace;
use crate::windows::{Window, Windows};

use super::*;

/// A reading turned into its outputs.
pub(super) struct Prepared {
    pub(super) offset: i64,
    pub(super) timestamp: Option<SystemTime>,
    pub(super) records: Vec<OutRecord>,
    pub(super) model_version: Option<i64>,
    /// The reading's span, ended once its outputs are written.
    pub(super) trace: telemetry::Context,
    /// When its score came back (for the produce stage's latency); `None` for a dead letter.
    pub(super) scored_at: Option<Instant>,
}

/// One partition: takes readings from its queue while fewer than the bound are in
/// flight, scores them concurrently, writes outputs and stores offsets in the
/// partition's order, until its channel closes and everything taken is done.
///
/// Taking only what there is room for is the flow control: readings wait in librdkafka's
/// queue, whose prefetch librdkafka bounds itself (`queued.max.messages.kbytes`). The
/// partition is paused only while the model server is failing and the window is full,
/// so fetching stops during an outage; pausing is not used for ordinary flow control
/// because every resume makes librdkafka drop what it had prefetched and fetch it again.
pub(super) async fn partition_worker(
    topic: String,
    partition: i32,
    mut queue: Option<PartitionQueue<RebalanceHandler>>,
    mut messages: mpsc::Receiver<OwnedMessage>,
    shared: Arc<WorkerResources>,
    consumer: Arc<BaseConsumer<RebalanceHandler>>,
) {
    let bound = shared.config.max_in_flight_per_partition;
    let arrived = Arc::new(tokio::sync::Notify::new());
    if let Some(queue) = queue.as_mut() {
        let arrived = arrived.clone();
        queue.set_nonempty_callback(move || arrived.notify_one());
    }
    let mut scoring: FuturesOrdered<BoxFuture<'static, Prepared>> = FuturesOrdered::new();
    let mut writing: FuturesOrdered<BoxFuture<'static, Result<Prepared, String>>> = FuturesOrdered::new();
    let mut open = true;
    let mut paused = false;
    let mut model_state = shared.model_state.subscribe();
    // A windowed model needs its devices' recent readings: learn the window from the
    // signature, then read back what came before this partition's committed offset.
    let Some(window) = super::rebuild::window_when_known(&shared, &messages).await else { return };
    let mut windows = Windows::new(&shared.config.windows);
    windows.set_keep(window);
    if window > 1 {
        windows = super::rebuild::rebuild(&shared, &consumer, &topic, partition, windows, &messages).await;
    }
    let mut devices_counted = windows.devices();
    shared.metrics.window_devices.add(devices_counted as i64);
    loop {
        // Take what there is room for: readings handed over by the poll thread first
        // (they are older), then the partition's own queue.
        while open && scoring.len() + writing.len() < bound {
            let message = match messages.try_recv() {
                Ok(message) => message,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
                Err(mpsc::error::TryRecvError::Empty) => match queue.as_ref().and_then(|q| q.poll(Duration::ZERO)) {
                    Some(Ok(message)) => {
                        shared.metrics.consumed.inc();
                        message.detach()
                    }
                    Some(Err(error)) => {
                        tracing::debug!(%topic, partition, %error, "consumer error");
                        continue;
                    }
                    None => break,
                },
            };
            shared.metrics.in_flight.inc();
            scoring.push_back(take(&shared, &mut windows, message));
        }
        let devices = windows.devices();
        if devices != devices_counted {
            shared.metrics.window_devices.add(devices as i64 - devices_counted as i64);
            devices_counted = devices;
        }
        if !open && scoring.is_empty() && writing.is_empty() {
            break;
        }
        let full = scoring.len() + writing.len() >= bound;
        if full
            && !paused
            && shared.model_failing.load(Ordering::Relaxed)
            && set_paused(&consumer, &topic, partition, true)
        {
            paused = true;
            shared.metrics.paused_partitions.inc();
        }
        tokio::select! {
            biased;
            Some(written) = writing.next() => {
                // This and every other reading already written, in order; the offset is
                // stored once for all of them (each store is a librdkafka call with a
                // partition list of its own).
                let mut stored = None;
                let mut fatal = None;
                let mut next = Some(written);
                while let Some(written) = next.take() {
                    match written {
                        Ok(done) => {
                            shared.metrics.in_flight.dec();
                            record_written(&shared.metrics, &done);
                            stored = Some(done.offset);
                            next = writing.next().now_or_never().flatten();
                        }
                        Err(error) => fatal = Some(error),
                    }
                }
                if shared.transactions.is_some() {
                    // Their offsets went into the transaction with their outputs.
                } else if let Some(offset) = stored
                    && let Err(error) = consumer.store_offset(&topic, partition, offset)
                {
                    // The partition was taken away meanwhile: its next owner redoes it.
                    tracing::debug!(%topic, partition, %error, "storing an offset failed");
                }
                if let Some(fatal) = fatal {
                    tracing::error!(%fatal, "the producer failed fatally: stopping without storing more offsets");
                    let _ = shared.fatal.send(Some(fatal));
                    break;
                }
            }
            Some(mut prepared) = scoring.next() => {
                if paused && set_paused(&consumer, &topic, partition, false) {
                    paused = false;
                    shared.metrics.paused_partitions.dec();
                }
                // Handed to the producer here, in the partition's order.
                if let Some(transactions) = &shared.transactions {
                    let Some(_open) = transactions.enter().await else {
                        // A transaction failed; the processor is stopping.
                        break;
                    };
                    match enqueue_all_in_transaction(&shared, &mut prepared.records).await {
                        Ok(deliveries) => {
                            transactions.record(&topic, partition, prepared.offset);
                            writing.push_back(Box::pin(delivered(prepared, deliveries)));
                        }
                        Err(error) => {
                            // Typically the open transaction already failed (a record
                            // Kafka refused). It may hold part of this reading's outputs
                            // without its offset, so it must not commit: it is aborted at
                            // shutdown.
                            transactions.mark_failed();
                            let error = format!("exactly-once: the transaction cannot take more records ({error})");
                            tracing::error!(%error, "stopping");
                            let _ = shared.fatal.send(Some(error));
                            break;
                        }
                    }
                } else {
                    let deliveries = enqueue_all(&shared, &mut prepared.records).await;
                    writing.push_back(Box::pin(confirm(shared.clone(), prepared, deliveries)));
                }
            }
            () = arrived.notified(), if open && !full => {}
            // A full window and the model server failing: time to pause (above).
            Ok(()) = model_state.changed(), if full && !paused => {}
            message = messages.recv(), if open && !full => match message {
                Some(message) => {
                    shared.metrics.in_flight.inc();
                    scoring.push_back(take(&shared, &mut windows, message));
                }
                None => open = false,
            },
        }
    }
    if paused && set_paused(&consumer, &topic, partition, false) {
        shared.metrics.paused_partitions.dec();
    }
    shared.metrics.window_devices.sub(devices_counted as i64);
}

/// Takes one reading in the partition's order: decodes and checks it and, when valid,
/// adds it to its device's window (now, not when scored: readings scored concurrently
/// must still see exactly the readings before them); then scores it.
fn take(shared: &Arc<WorkerResources>, windows: &mut Windows, message: OwnedMessage) -> BoxFuture<'static, Prepared> {
    if let Some(window) = shared.model.window()
        && window != windows.keep()
    {
        windows.set_keep(window);
    }
    match receive(shared, message) {
        Received::Valid(reading) => {
            let window = windows.push(&reading.reading);
            Box::pin(prepare(shared.clone(), reading, window))
        }
        Received::Dead(prepared) => Box::pin(std::future::ready(*prepared)),
    }
}

fn record_written(metrics: &Metrics, done: &Prepared) {
    let version = done.model_version.map(|v| v.to_string()).unwrap_or_default();
    for record in &done.records {
        match record.kind {
            OutKind::Score { .. } => metrics.scored.with_label_values(&[version.as_str()]).inc(),
            OutKind::Anomaly => metrics.anomalies.with_label_values(&[version.as_str()]).inc(),
            OutKind::DeadLetter(reason) => metrics.dead_lettered.with_label_values(&[reason]).inc(),
            OutKind::Dropped(reason) => metrics.outputs_dropped.with_label_values(&[reason]).inc(),
        }
    }
    if let Some(latency) = done.timestamp.and_then(|t| SystemTime::now().duration_since(t).ok()) {
        metrics.event_latency.observe(latency.as_secs_f64());
    }
    if let Some(scored_at) = done.scored_at {
        metrics.stage(Stage::Produce, scored_at.elapsed());
    }
    done.trace.span().end();
}

/// A reading as taken from Kafka: valid, or already a dead letter.
enum Received {
    Valid(Box<ValidReading>),
    Dead(Box<Prepared>),
}

struct ValidReading {
    reading: SensorReading,
    source: Source,
    trace: telemetry::Context,
    /// Kept for its payload, which a dead letter carries as it came.
    message: OwnedMessage,
}

/// Decodes and checks one record.
fn receive(shared: &WorkerResources, message: OwnedMessage) -> Received {
    let config = &shared.config;
    if let Some(fetched) = kafka::record_time(&message).and_then(|t| SystemTime::now().duration_since(t).ok()) {
        shared.metrics.stage(Stage::Fetch, fetched);
    }
    let mut source = Source {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        timestamp: kafka::record_time(&message),
        headers: message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .filter(|h| CARRIED_HEADERS.contains(&h.key))
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec).unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default(),
    };
    let trace = trace::reading(&mut source);
    let payload = message.payload().unwrap_or_default();
    let dead = |reason: &'static str, error: &str| {
        Received::Dead(Box::new(dead_letter(config, &source, &trace, payload, reason, error)))
    };
    let reading = match SensorReading::decode(payload) {
        Ok(reading) => reading,
        Err(error) => return dead("not_a_sensor_reading", &format!("not a vigil.sensor.v1.SensorReading: {error}")),
    };
    if let Err(invalid) = super::check_reading(config, &reading, source.timestamp) {
        return dead(invalid.reason(), &invalid.to_string());
    }
    Received::Valid(Box::new(ValidReading { reading, source, trace, message }))
}

fn dead_letter(
    config: &crate::config::ProcessorConfig,
    source: &Source,
    trace: &telemetry::Context,
    payload: &[u8],
    reason: &'static str,
    error: &str,
) -> Prepared {
    trace::dead_lettered(trace, reason, error);
    Prepared {
        offset: source.offset,
        timestamp: source.timestamp,
        records: vec![output::dead_letter(config, source, payload, reason, error)],
        model_version: None,
        trace: trace.clone(),
        scored_at: None,
    }
}

/// Scores one valid reading with its window; waits out model server trouble (never
/// drops it).
async fn prepare(shared: Arc<WorkerResources>, valid: Box<ValidReading>, window: Window) -> Prepared {
    let ValidReading { reading, source, trace, message } = *valid;
    let config = &shared.config;
    let mut backoff = config.model.backoff();
    // Never given up: a reading the model server cannot score yet waits (and holds its
    // partition's window) until it can.
    let scored = loop {
        let attempt = shared.model.score_with_retry(&reading, &window, &trace, |error, _| {
            shared.set_model_failing(true);
            shared.metrics.model_backoffs.inc();
            let wait = backoff.next_delay();
            warn_now_and_then(&shared, error, wait);
            Retry::After(wait)
        });
        match attempt.await {
            Ok(scored) => break scored,
            Err(ScoreError::Rejected(error)) => {
                let payload = message.payload().unwrap_or_default();
                return dead_letter(config, &source, &trace, payload, "model_rejected", &error);
            }
            Err(ScoreError::Transient(_)) => {}
        }
    };
    shared.set_model_failing(false);
    shared.metrics.stage(Stage::CallWait, scored.waited);
    shared.metrics.stage(Stage::Call, scored.latency);
    trace::scored(&trace, &reading.device_id, &scored);
    Prepared {
        offset: source.offset,
        timestamp: source.timestamp,
        records: output::scored(config, &source, &reading, &scored),
        model_version: Some(scored.model_version),
        trace,
        scored_at: Some(Instant::now()),
    }
}

pub(super) fn warn_now_and_then(shared: &WorkerResources, error: &str, backoff: Duration) {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let last = shared.last_warning.load(Ordering::Relaxed);
    if now >= last + 5 && shared.last_warning.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    {
        tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "the model server could not score readings; holding them and trying again");
    } else {
        tracing::debug!(%error, "scoring failed; trying again");
    }
}
