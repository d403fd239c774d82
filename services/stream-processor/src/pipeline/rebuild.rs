//! Rebuilding a partition's windows when it is assigned, so a reading gets the same
//! window, and so the same score, whichever replica scores it and however often the
//! partition moved (docs/windowed-models.md).
//!
//! The new owner starts at the partition's committed offset. Before it scores anything it
//! reads back up to `windows.rebuild_records` records before that offset with a consumer
//! of its own (assigned, never in the group, committing nothing: [`range`]) and pushes
//! every valid reading into the windows, just as the previous owner did when it scored
//! them. A device whose previous readings lie further back than that starts padded, as a
//! new device does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::{RebalanceHandler, WorkerResources};
use crate::replay::range::{self, Span, Take};
use crate::windows::Windows;

/// Kafka metadata and offset requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The window the model asks for, once its signature could be read: waits (trying again
/// with backoff) while the model server cannot answer; `None` if the partition is taken
/// away meanwhile.
pub(super) async fn window_when_known(
    shared: &WorkerResources,
    messages: &mpsc::Receiver<rdkafka::message::OwnedMessage>,
) -> Option<usize> {
    let mut backoff = shared.config.model.backoff();
    loop {
        if let Some(window) = shared.model.window() {
            return Some(window);
        }
        if messages.is_closed() {
            return None;
        }
        match shared.model.inputs().await {
            Ok(inputs) => return Some(inputs.window()),
            Err(error) => {
                // As a failing call would: a warning now and then, the readings held.
                let wait = backoff.next_delay();
                super::worker::warn_now_and_then(shared, &format!("reading the model's signature: {error}"), wait);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Pushes the valid readings among the `windows.rebuild_records` records before the
/// partition's committed offset into `windows`. Failures are logged, never fatal: scoring
/// then starts with what was read. Stops early if the partition is taken away meanwhile
/// (`messages` closed), so a rebalance never waits for a read-back.
pub(super) async fn rebuild(
    shared: &Arc<WorkerResources>,
    consumer: &Arc<BaseConsumer<RebalanceHandler>>,
    topic: &str,
    partition: i32,
    windows: Windows,
    messages: &mpsc::Receiver<rdkafka::message::OwnedMessage>,
) -> Windows {
    let config = &shared.config.windows;
    if config.rebuild_records == 0 {
        return windows;
    }
    let started = Instant::now();
    // What a panicked read-back leaves: empty windows of the same length.
    let keep = windows.keep();
    let cancel = Arc::new(AtomicBool::new(false));
    let (shared, consumer, topic_owned, stop) = (shared.clone(), consumer.clone(), topic.to_owned(), cancel.clone());
    let mut reading = tokio::task::spawn_blocking(move || {
        let mut windows = windows;
        let outcome = read_back(&shared, &consumer, &topic_owned, partition, &mut windows, &stop);
        (windows, outcome)
    });
    let result = loop {
        tokio::select! {
            result = &mut reading => break result,
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                if messages.is_closed() {
                    cancel.store(true, Ordering::Relaxed);
                }
            }
        }
    };
    match result {
        Ok((windows, Ok(read))) => {
            tracing::info!(
                topic,
                partition,
                records = read,
                devices = windows.devices(),
                ms = started.elapsed().as_millis() as u64,
                "rebuilt the partition's windows"
            );
            windows
        }
        Ok((windows, Err(error))) => {
            tracing::warn!(topic, partition, %error, "rebuilding the partition's windows failed; scoring with what was read");
            windows
        }
        Err(error) => {
            tracing::error!(topic, partition, %error, "rebuilding the partition's windows panicked");
            let mut windows = Windows::new(config);
            windows.set_keep(keep);
            windows
        }
    }
}

/// Reads `[committed - rebuild_records, committed)` into `windows`; the records read.
fn read_back(
    shared: &WorkerResources,
    consumer: &BaseConsumer<RebalanceHandler>,
    topic: &str,
    partition: i32,
    windows: &mut Windows,
    cancel: &AtomicBool,
) -> Result<u64, String> {
    let config = &shared.config;
    let mut wanted = TopicPartitionList::new();
    wanted.add_partition(topic, partition);
    let committed =
        consumer.committed_offsets(wanted, REQUEST_TIMEOUT).map_err(|e| format!("committed offset: {e}"))?;
    let end = match committed.find_partition(topic, partition).map(|p| p.offset()) {
        Some(Offset::Offset(offset)) => offset,
        // Nothing committed: the partition is read from its beginning (or end), with
        // nothing before it to rebuild from.
        _ => return Ok(0),
    };
    let reader = range::consumer(config, &format!("{}-windows", config.group_id)).map_err(|e| e.to_string())?;
    let (low, _) =
        reader.fetch_watermarks(topic, partition, REQUEST_TIMEOUT).map_err(|e| format!("watermarks: {e}"))?;
    let rebuild_records = i64::try_from(config.windows.rebuild_records).unwrap_or(i64::MAX);
    let start = end.saturating_sub(rebuild_records).max(low);
    if start >= end {
        return Ok(0);
    }
    let deadline = Instant::now() + Duration::from_secs(config.windows.rebuild_timeout_seconds);
    let mut read = 0u64;
    let span = Span { partition, start, end };
    range::scan(&reader, topic, &[span], cancel, |message| {
        read += 1;
        // Only what the live path scored was in its windows.
        if let Some(reading) = super::scorable_reading(config, message) {
            windows.push(&reading);
        }
        if Instant::now() > deadline { Take::Stop } else { Take::Next }
    })
    .map_err(|e| e.to_string())?;
    shared.metrics.window_rebuild_records.inc_by(read);
    Ok(read)
}
