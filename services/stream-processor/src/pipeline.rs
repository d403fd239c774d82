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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use opentelemetry::trace::TraceContextExt as _;
use prost::Message as _;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers as _, Message as _, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, Producer as _};
use rdkafka::{ClientContext, Statistics, TopicPartitionList};
use sensor::SensorReading;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::config::ProcessorConfig;
use crate::metrics::Metrics;
use crate::model::{ModelClient, ScoreError};
use crate::output::{self, CARRIED_HEADERS, OutKind, OutRecord, Source};
use crate::trace;
use crate::transactions::Transactions;

/// What the workers share.
pub struct Shared {
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

impl Shared {
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

/// What the rebalance callback needs to start workers, known once the consumer exists.
struct Wiring {
    consumer: Weak<BaseConsumer<ConsumerCtx>>,
    shared: Arc<Shared>,
}

/// librdkafka callbacks: rebalances (start workers for assigned partitions, drain
/// revoked ones) and statistics (lag).
pub struct ConsumerCtx {
    workers: Arc<Mutex<Workers>>,
    runtime: Handle,
    drain_for: Duration,
    metrics: Metrics,
    wiring: OnceLock<Wiring>,
}

impl ConsumerCtx {
    pub fn new(workers: Arc<Mutex<Workers>>, runtime: Handle, drain_for: Duration, metrics: Metrics) -> Self {
        Self { workers, runtime, drain_for, metrics, wiring: OnceLock::new() }
    }

    /// Must be called before subscribing: assigned partitions get their workers from here.
    pub fn wire(&self, consumer: &Arc<BaseConsumer<ConsumerCtx>>, shared: Arc<Shared>) {
        let _ = self.wiring.set(Wiring { consumer: Arc::downgrade(consumer), shared });
    }

    /// Starts a worker reading each newly assigned partition from its own queue. Runs in
    /// the rebalance callback, after the assignment and before fetching starts, which is
    /// when librdkafka wants partition queues split off.
    fn start_workers(&self, partitions: &TopicPartitionList) {
        let Some(wiring) = self.wiring.get() else { return };
        let Some(consumer) = wiring.consumer.upgrade() else { return };
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        for element in partitions.elements() {
            let key = (element.topic().to_owned(), element.partition());
            if workers.0.contains_key(&key) {
                continue;
            }
            let queue = consumer.split_partition_queue(&key.0, key.1);
            if queue.is_none() {
                tracing::warn!(topic = %key.0, partition = key.1, "no queue of its own for this partition: its readings come through the main queue");
            }
            let worker = spawn_worker(&self.runtime, key.clone(), queue, &wiring.shared, &consumer);
            workers.0.insert(key, worker);
        }
    }
}

fn spawn_worker(
    runtime: &Handle,
    (topic, partition): (String, i32),
    queue: Option<PartitionQueue<ConsumerCtx>>,
    shared: &Arc<Shared>,
    consumer: &Arc<BaseConsumer<ConsumerCtx>>,
) -> Worker {
    let (sender, receiver) = mpsc::channel(shared.config.max_in_flight_per_partition);
    let task = runtime.spawn(partition_worker(topic, partition, queue, receiver, shared.clone(), consumer.clone()));
    Worker { sender, overflow: VecDeque::new(), paused: false, task }
}

/// Lets the workers of `partitions` finish what they hold (under `drain_for`), so their
/// offsets are stored; what is still unfinished after that is abandoned, for the next
/// owner to redo. `false` when some worker had to be abandoned.
fn drain(
    workers: &Mutex<Workers>,
    runtime: &Handle,
    drain_for: Duration,
    metrics: &Metrics,
    partitions: &[(String, i32)],
) -> bool {
    let mut stopping = Vec::new();
    {
        let mut workers = workers.lock().unwrap_or_else(|e| e.into_inner());
        for key in partitions {
            if let Some(worker) = workers.0.remove(key) {
                if worker.paused {
                    metrics.paused_partitions.dec();
                }
                // Closing the channel tells the worker to finish and stop; what it has
                // not taken yet (its queue, the overflow) is simply read again.
                drop(worker.sender);
                stopping.push((key.clone(), worker.task));
            }
        }
    }
    if stopping.is_empty() {
        return true;
    }
    let deadline = tokio::time::Instant::now() + drain_for;
    runtime.block_on(async {
        let mut finished = true;
        for ((topic, partition), task) in &mut stopping {
            if tokio::time::timeout_at(deadline, &mut *task).await.is_err() {
                tracing::warn!(topic = %topic, partition = *partition, "in-flight work did not finish in time; the next owner redoes it");
                task.abort();
                let _ = task.await;
                finished = false;
            }
        }
        finished
    })
}

impl ClientContext for ConsumerCtx {
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, stats) in &stats.partitions {
                // Exactly-once stores no offsets (they go into transactions): lag from
                // the committed offset then.
                let lag = if stats.consumer_lag_stored >= 0 { stats.consumer_lag_stored } else { stats.consumer_lag };
                // Only partitions this instance fetches: librdkafka keeps reporting a
                // revoked one, whose lag is its new owner's to report.
                if *partition >= 0 && lag >= 0 && stats.fetch_state == "active" {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&[topic.as_str(), partition.to_string().as_str()])
                        .set(lag);
                }
            }
        }
    }
}

impl ConsumerContext for ConsumerCtx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => {
                self.metrics.rebalances.with_label_values(&["revoke"]).inc();
                let keys: Vec<(String, i32)> =
                    partitions.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
                tracing::info!(partitions = keys.len(), "partitions revoked: finishing their in-flight work");
                let finished = drain(&self.workers, &self.runtime, self.drain_for, &self.metrics, &keys);
                match self.wiring.get() {
                    Some(wiring) => commit_drained(consumer, &wiring.shared, finished),
                    None => commit_stored(consumer),
                }
                // Their lag is the next owner's to report: a series left here would keep
                // its last value and add to (or, under max, hide) the real one.
                for (topic, partition) in &keys {
                    let _ = self.metrics.consumer_lag.remove_label_values(&[topic.as_str(), &partition.to_string()]);
                }
            }
            Rebalance::Assign(partitions) => {
                self.metrics.rebalances.with_label_values(&["assign"]).inc();
                tracing::info!(partitions = partitions.count(), "partitions assigned");
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            self.start_workers(partitions);
        }
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        self.metrics.assigned_partitions.set(assigned as i64);
    }
}

/// Commits what is done: the open transaction in exactly-once mode (a failure stops the
/// processor), else the stored offsets.
fn commit(consumer: &BaseConsumer<ConsumerCtx>, shared: &Shared) {
    match &shared.transactions {
        Some(transactions) => match transactions.commit(consumer) {
            Ok(true) => shared.metrics.transactions.with_label_values(&["committed"]).inc(),
            Ok(false) => {}
            Err(error) => {
                shared.metrics.transactions.with_label_values(&["failed"]).inc();
                let _ = shared.fatal.send(Some(error.to_string()));
            }
        },
        None => commit_stored(consumer),
    }
}

/// After draining: commits, unless in exactly-once mode a worker had to be abandoned (it
/// may have left part of a reading's outputs in the open transaction without its offset):
/// then the transaction is aborted and the processor stops, and the readings since the
/// last commit are redone from the committed offsets.
fn commit_drained(consumer: &BaseConsumer<ConsumerCtx>, shared: &Shared, finished: bool) {
    match &shared.transactions {
        Some(transactions) if transactions.is_broken() => transactions.abort(),
        Some(transactions) if !finished => {
            transactions.abort();
            shared.metrics.transactions.with_label_values(&["failed"]).inc();
            let error = "exactly-once: in-flight work did not finish in time; its transaction was aborted";
            let _ = shared.fatal.send(Some(error.to_owned()));
        }
        _ => commit(consumer, shared),
    }
}

/// Commits the stored offsets now (a revoke or shutdown must not wait for auto-commit).
fn commit_stored(consumer: &BaseConsumer<ConsumerCtx>) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => {}
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {} // nothing new stored
        Err(error) => tracing::warn!(%error, "committing offsets failed; the next owner may redo some readings"),
    }
}

/// The poll loop, on its own thread, until `stop` is set; then drains every worker
/// (under the shutdown grace), commits and leaves the group. Polling serves librdkafka's
/// callbacks; readings normally go straight from each partition's queue to its worker,
/// and only the rare ones that arrive here are handed over.
pub fn poll_loop(
    consumer: Arc<BaseConsumer<ConsumerCtx>>,
    workers: Arc<Mutex<Workers>>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    runtime: Handle,
) {
    let transaction_interval = Duration::from_millis(shared.config.transaction_interval_ms);
    let mut last_commit = std::time::Instant::now();
    while !stop.load(Ordering::Acquire) {
        if shared.transactions.is_some() && last_commit.elapsed() >= transaction_interval {
            commit(&consumer, &shared);
            last_commit = std::time::Instant::now();
        }
        let mut waiting = false;
        {
            let mut workers = workers.lock().unwrap_or_else(|e| e.into_inner());
            for ((topic, partition), worker) in &mut workers.0 {
                while let Some(message) = worker.overflow.pop_front() {
                    match worker.sender.try_send(message) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(message)) => {
                            worker.overflow.push_front(message);
                            break;
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => worker.overflow.clear(),
                    }
                }
                if worker.overflow.is_empty() && worker.paused {
                    if set_paused(&consumer, topic, *partition, false) {
                        worker.paused = false;
                        shared.metrics.paused_partitions.dec();
                    }
                } else if !worker.overflow.is_empty() {
                    waiting = true;
                }
            }
        }
        // Poll more often while some partition waits for room.
        let timeout = if waiting { Duration::from_millis(5) } else { Duration::from_millis(100) };
        let timeout = if shared.transactions.is_some() { timeout.min(transaction_interval) } else { timeout };
        let message = match consumer.poll(timeout) {
            None => continue,
            Some(Err(error)) => {
                tracing::debug!(%error, "consumer error");
                continue;
            }
            Some(Ok(message)) => message.detach(),
        };
        shared.metrics.consumed.inc();
        let mut workers = workers.lock().unwrap_or_else(|e| e.into_inner());
        let key = (message.topic().to_owned(), message.partition());
        let worker = workers
            .0
            .entry(key.clone())
            .or_insert_with(|| spawn_worker(&runtime, key.clone(), None, &shared, &consumer));
        if !worker.overflow.is_empty() {
            worker.overflow.push_back(message);
            continue;
        }
        if let Err(mpsc::error::TrySendError::Full(message)) = worker.sender.try_send(message) {
            worker.overflow.push_back(message);
            if !worker.paused && set_paused(&consumer, &key.0, key.1, true) {
                worker.paused = true;
                shared.metrics.paused_partitions.inc();
            }
        }
    }

    // Shutdown: every worker finishes what it holds, under the grace period.
    let all: Vec<(String, i32)> = workers.lock().unwrap_or_else(|e| e.into_inner()).0.keys().cloned().collect();
    tracing::info!(partitions = all.len(), "stopping: finishing in-flight work");
    let grace = Duration::from_secs(shared.config.shutdown_grace_seconds);
    let finished = drain(&workers, &runtime, grace, &shared.metrics, &all);
    commit_drained(&consumer, &shared, finished);
    consumer.unsubscribe();
    tracing::info!("consumer stopped; offsets committed");
}

fn set_paused(consumer: &BaseConsumer<ConsumerCtx>, topic: &str, partition: i32, pause: bool) -> bool {
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, partition);
    let result = if pause { consumer.pause(&list) } else { consumer.resume(&list) };
    match result {
        Ok(()) => {
            tracing::debug!(topic, partition, pause, "partition flow changed");
            true
        }
        Err(error) => {
            tracing::warn!(topic, partition, pause, %error, "pausing or resuming a partition failed");
            false
        }
    }
}

/// A reading turned into its outputs.
struct Prepared {
    offset: i64,
    timestamp: Option<SystemTime>,
    records: Vec<OutRecord>,
    model_version: Option<i64>,
    /// The reading's span, ended once its outputs are written.
    trace: telemetry::Context,
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
async fn partition_worker(
    topic: String,
    partition: i32,
    mut queue: Option<PartitionQueue<ConsumerCtx>>,
    mut messages: mpsc::Receiver<OwnedMessage>,
    shared: Arc<Shared>,
    consumer: Arc<BaseConsumer<ConsumerCtx>>,
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
            scoring.push_back(Box::pin(prepare(shared.clone(), message)));
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
            Some(written) = writing.next() => match written {
                Ok(done) => {
                    shared.metrics.in_flight.dec();
                    record_written(&shared.metrics, &done);
                    if shared.transactions.is_some() {
                        // Its offset went into the transaction with its outputs.
                    } else if let Err(error) = consumer.store_offset(&topic, partition, done.offset) {
                        // The partition was taken away meanwhile: its next owner redoes it.
                        tracing::debug!(%topic, partition, %error, "storing an offset failed");
                    }
                }
                Err(fatal) => {
                    tracing::error!(%fatal, "the producer failed fatally: stopping without storing more offsets");
                    let _ = shared.fatal.send(Some(fatal));
                    break;
                }
            },
            Some(prepared) = scoring.next() => {
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
                    match enqueue_all_in_transaction(&shared, &prepared.records).await {
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
                    let deliveries = enqueue_all(&shared, &prepared.records).await;
                    writing.push_back(Box::pin(confirm(shared.clone(), prepared, deliveries)));
                }
            }
            () = arrived.notified(), if open && !full => {}
            // A full window and the model server failing: time to pause (above).
            Ok(()) = model_state.changed(), if full && !paused => {}
            message = messages.recv(), if open && !full => match message {
                Some(message) => {
                    shared.metrics.in_flight.inc();
                    scoring.push_back(Box::pin(prepare(shared.clone(), message)));
                }
                None => open = false,
            },
        }
    }
    if paused && set_paused(&consumer, &topic, partition, false) {
        shared.metrics.paused_partitions.dec();
    }
}

fn record_written(metrics: &Metrics, done: &Prepared) {
    let version = done.model_version.map(|v| v.to_string()).unwrap_or_default();
    for record in &done.records {
        match record.kind {
            OutKind::Score { .. } => metrics.scored.with_label_values(&[version.as_str()]).inc(),
            OutKind::Anomaly => metrics.anomalies.with_label_values(&[version.as_str()]).inc(),
            OutKind::DeadLetter(reason) => metrics.dead_lettered.with_label_values(&[reason]).inc(),
        }
    }
    if let Some(latency) = done.timestamp.and_then(|t| SystemTime::now().duration_since(t).ok()) {
        metrics.event_latency.observe(latency.as_secs_f64());
    }
    done.trace.span().end();
}

/// Decodes and scores one reading; waits out model server trouble (never drops it).
async fn prepare(shared: Arc<Shared>, message: OwnedMessage) -> Prepared {
    let config = &shared.config;
    let mut source = Source {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        timestamp: message
            .timestamp()
            .to_millis()
            .and_then(|ms| u64::try_from(ms).ok())
            .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
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
        trace::dead_lettered(&trace, reason, error);
        Prepared {
            offset: source.offset,
            timestamp: source.timestamp,
            records: vec![output::dead_letter(config, &source, payload, reason, error)],
            model_version: None,
            trace: trace.clone(),
        }
    };
    let reading = match SensorReading::decode(payload) {
        Ok(reading) => reading,
        Err(error) => return dead("not_a_sensor_reading", &format!("not a vigil.sensor.v1.SensorReading: {error}")),
    };
    if let Err(invalid) = sensor::validate(&reading) {
        return dead(invalid.reason(), &invalid.to_string());
    }
    let mut backoff = Duration::from_millis(config.model.backoff_initial_ms);
    let mut rejected_before = false;
    loop {
        match shared.model.score(&reading, &trace).await {
            Ok(scored) => {
                shared.set_model_failing(false);
                trace::scored(&trace, &reading.device_id, &scored);
                return Prepared {
                    offset: source.offset,
                    timestamp: source.timestamp,
                    records: output::scored(config, &source, &reading, &scored),
                    model_version: Some(scored.model_version),
                    trace,
                };
            }
            // The first refusal may come from a signature that changed under us (the
            // client reads it again); a second one is about the reading.
            Err(ScoreError::Rejected(_)) if !rejected_before => rejected_before = true,
            Err(ScoreError::Rejected(error)) => return dead("model_rejected", &error),
            Err(ScoreError::Transient(error)) => {
                shared.set_model_failing(true);
                shared.metrics.model_backoffs.inc();
                warn_now_and_then(&shared, &error, backoff);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(config.model.backoff_max_ms));
            }
        }
    }
}

fn warn_now_and_then(shared: &Shared, error: &str, backoff: Duration) {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let last = shared.last_warning.load(Ordering::Relaxed);
    if now >= last + 5 && shared.last_warning.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    {
        tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "the model server could not score readings; holding them and trying again");
    } else {
        tracing::debug!(%error, "scoring failed; trying again");
    }
}

/// Hands every record to the producer, in order; waits while its queue is full.
async fn enqueue_all(shared: &Shared, records: &[OutRecord]) -> Vec<DeliveryFuture> {
    let mut deliveries = Vec::with_capacity(records.len());
    for record in records {
        deliveries.push(enqueue(shared, record).await);
    }
    deliveries
}

async fn enqueue(shared: &Shared, record: &OutRecord) -> DeliveryFuture {
    loop {
        match crate::kafka_clients::send(&shared.producer, record).await {
            Ok(delivery) => return delivery,
            Err(error) => {
                tracing::warn!(topic = %record.topic, %error, "handing a record to the producer failed; retrying");
                shared.metrics.produce_retries.inc();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Exactly-once: hands every record to the producer, in order, waiting while its queue is
/// full; any other refusal means the transaction is unusable.
async fn enqueue_all_in_transaction(shared: &Shared, records: &[OutRecord]) -> Result<Vec<DeliveryFuture>, String> {
    let mut deliveries = Vec::with_capacity(records.len());
    for record in records {
        let delivery = crate::kafka_clients::send(&shared.producer, record).await;
        deliveries.push(delivery.map_err(|error| format!("producing to {}: {error}", record.topic))?);
    }
    Ok(deliveries)
}

/// Exactly-once: waits for the records' delivery reports. A failed one is not sent again
/// (the transaction's commit fails and aborts instead); it only bounds the window.
async fn delivered(prepared: Prepared, deliveries: Vec<DeliveryFuture>) -> Result<Prepared, String> {
    for delivery in deliveries {
        if let Ok(Err((error, _))) = delivery.await {
            tracing::warn!(%error, "exactly-once: Kafka did not take a record; the transaction will abort");
        }
    }
    Ok(prepared)
}

/// Waits for Kafka to confirm each record (sending again what failed); `Err` only when
/// the producer failed fatally.
async fn confirm(shared: Arc<Shared>, prepared: Prepared, deliveries: Vec<DeliveryFuture>) -> Result<Prepared, String> {
    for (record, delivery) in prepared.records.iter().zip(deliveries) {
        let mut delivery = delivery;
        let mut backoff = Duration::from_millis(50);
        loop {
            let error = match delivery.await {
                Ok(Ok(_)) => break,
                Ok(Err((error, _))) => error,
                Err(_) => KafkaError::Canceled,
            };
            if let Some((code, reason)) = shared.producer.client().fatal_error() {
                return Err(format!("the Kafka producer failed fatally: {code:?}: {reason}"));
            }
            tracing::warn!(topic = %record.topic, %error, "Kafka did not take a record; sending it again");
            shared.metrics.produce_retries.inc();
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            delivery = enqueue(&shared, record).await;
        }
    }
    Ok(prepared)
}
