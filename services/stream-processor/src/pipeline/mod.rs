//! The at-least-once path from the readings topic to the output topics.
//!
//! ```text
//!  poll thread (BaseConsumer::poll)     one worker task per owned partition, reading
//!    serves librdkafka's callbacks:     its partition's own queue (split off when the
//!    rebalances start workers for  ──▶  partition is assigned):
//!    assigned partitions and drain        scoring: takes readings only while fewer than
//!    revoked ones; statistics (lag)         max_in_flight_per_partition are in flight
//!                                           (FuturesOrdered: results in the partition's order)
//!                                         writing: outputs handed to the producer in that
//!                                           order, confirmations awaited in that order
//!                                         store_offset(offset) once every output of that
//!                                           reading and of all before it is confirmed;
//!                                           librdkafka auto-commits stored offsets (100 ms)
//! ```
//!
//! The consumer lives on its own thread because librdkafka runs rebalance callbacks
//! inside `poll`, and revoking partitions has to wait for their workers to finish what
//! they hold (so their offsets are stored and committed before the next owner reads)
//! without stalling the async runtime. Each worker reads its own partition queue, so a
//! full worker just stops taking and its readings wait in librdkafka's bounded prefetch;
//! the poll loop never blocks, and `max.poll.interval.ms` is never exceeded even when
//! the model server is down for long. During such an outage a full worker also pauses its
//! partition, so fetching stops. A crash loses nothing: what was not stored is read
//! again, so outputs may repeat for what was in flight or confirmed since the last commit.
//!
//! [`consumer`] is the poll thread's side (callbacks, the poll loop, pausing), [`worker`]
//! one partition's scoring and ordering, [`produce`] handing outputs to Kafka and waiting
//! for them; this module holds what they share.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureProducer;
use tokio::sync::mpsc;

use crate::config::ProcessorConfig;
use crate::metrics::Metrics;
use crate::model::ModelClient;
use crate::transactions::Transactions;

mod consumer;
mod produce;
mod rebuild;
mod worker;

use consumer::set_paused;
pub use consumer::{RebalanceHandler, poll_loop};
use produce::{confirm, delivered, enqueue_all, enqueue_all_in_transaction};
use worker::{Prepared, partition_worker};

/// Whether a reading read from Kafka may be scored: valid ([`sensor::validate`]) and with
/// an event time within `config.event_time` of its Kafka timestamp (`None`: of now). The
/// live path dead-letters what fails; a replay skips it, as the live path did.
pub fn check_reading(
    config: &ProcessorConfig,
    reading: &sensor::SensorReading,
    kafka_timestamp: Option<std::time::SystemTime>,
) -> Result<(), sensor::InvalidReading> {
    sensor::validate(reading)?;
    let arrival = kafka_timestamp.unwrap_or_else(std::time::SystemTime::now);
    config.event_time.check(reading.event_time.as_ref(), arrival)
}

/// The reading a Kafka record holds, if the live path would score it (it decodes and
/// passes [`check_reading`] against the record's timestamp); `None` for what it
/// dead-letters. Replays and window rebuilds take records by this rule; the live path
/// checks the same, keeping the reason for the dead letter.
pub fn scorable_reading<M: rdkafka::Message>(config: &ProcessorConfig, message: &M) -> Option<sensor::SensorReading> {
    let reading = <sensor::SensorReading as prost::Message>::decode(message.payload().unwrap_or_default()).ok()?;
    check_reading(config, &reading, kafka::record_time(message)).ok()?;
    Some(reading)
}

/// What every partition worker uses: the producer, the model client, the config and
/// metrics, and the processor-wide failure signals.
pub struct WorkerResources {
    pub producer: FutureProducer,
    pub model: ModelClient,
    pub config: Arc<ProcessorConfig>,
    pub metrics: Metrics,
    /// Exactly-once mode: outputs and offsets go into Kafka transactions instead of
    /// offsets being stored once outputs are confirmed.
    pub transactions: Option<Transactions>,
    /// Set when the producer failed fatally or a transaction failed: the processor must stop.
    pub fatal: tokio::sync::watch::Sender<Option<String>>,
    /// Unix seconds of the last "model server unavailable" warning (one per 5 s).
    last_warning: AtomicU64,
    /// The last Predict failed with a transient error (cleared by the next success).
    model_failing: AtomicBool,
    /// The same, for workers to wait on (sent only when it changes).
    model_state: tokio::sync::watch::Sender<bool>,
}

impl WorkerResources {
    pub fn new(
        producer: FutureProducer,
        model: ModelClient,
        config: Arc<ProcessorConfig>,
        metrics: Metrics,
        transactions: Option<Transactions>,
        fatal: tokio::sync::watch::Sender<Option<String>>,
    ) -> Self {
        Self {
            producer,
            model,
            config,
            metrics,
            transactions,
            fatal,
            last_warning: AtomicU64::new(0),
            model_failing: AtomicBool::new(false),
            model_state: tokio::sync::watch::Sender::new(false),
        }
    }

    fn set_model_failing(&self, failing: bool) {
        if self.model_failing.swap(failing, Ordering::Relaxed) != failing {
            self.model_state.send_replace(failing);
        }
    }
}

/// A partition's worker, as the poll thread sees it.
struct Worker {
    /// Messages for the partition that arrive on the consumer's main queue (only those
    /// fetched before its own queue was split off, or all of them if splitting failed);
    /// dropping the sender tells the worker to finish and stop.
    sender: mpsc::Sender<OwnedMessage>,
    /// Main-queue messages delivered while the worker was full (its partition is paused).
    overflow: VecDeque<OwnedMessage>,
    paused: bool,
    task: tokio::task::JoinHandle<()>,
}

/// The workers by (topic, partition); the poll loop and the rebalance callback share it
/// (both run on the poll thread).
#[derive(Default)]
pub struct Workers(HashMap<(String, i32), Worker>);
