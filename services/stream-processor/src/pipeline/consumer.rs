//! The poll thread's side: librdkafka's rebalance and statistics callbacks (start a worker
//! for each assigned partition, drain revoked ones and commit what they finished), the poll
//! loop that feeds the workers, and pausing a partition whose worker is full.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::{ClientContext, Statistics, TopicPartitionList};
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

use super::*;

/// What the rebalance callback needs to start workers, known once the consumer exists.
struct Wiring {
    consumer: Weak<BaseConsumer<RebalanceHandler>>,
    shared: Arc<WorkerResources>,
}

/// librdkafka callbacks: rebalances (start workers for assigned partitions, drain
/// revoked ones) and statistics (lag).
pub struct RebalanceHandler {
    workers: Arc<Mutex<Workers>>,
    runtime: Handle,
    drain_for: Duration,
    metrics: Metrics,
    /// Set ready at the first assignment: the group has taken this replica in.
    readiness: admin::Readiness,
    wiring: OnceLock<Wiring>,
}

impl RebalanceHandler {
    pub fn new(
        workers: Arc<Mutex<Workers>>,
        runtime: Handle,
        drain_for: Duration,
        metrics: Metrics,
        readiness: admin::Readiness,
    ) -> Self {
        Self { workers, runtime, drain_for, metrics, readiness, wiring: OnceLock::new() }
    }

    /// Must be called before subscribing: assigned partitions get their workers from here.
    pub fn wire(&self, consumer: &Arc<BaseConsumer<RebalanceHandler>>, shared: Arc<WorkerResources>) {
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
    queue: Option<PartitionQueue<RebalanceHandler>>,
    shared: &Arc<WorkerResources>,
    consumer: &Arc<BaseConsumer<RebalanceHandler>>,
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

impl ClientContext for RebalanceHandler {
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

impl ConsumerContext for RebalanceHandler {
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
            self.readiness.set(true);
        }
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        self.metrics.assigned_partitions.set(assigned as i64);
    }
}

/// Commits what is done: the open transaction in exactly-once mode (a failure stops the
/// processor), else the stored offsets.
fn commit(consumer: &BaseConsumer<RebalanceHandler>, shared: &WorkerResources) {
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
fn commit_drained(consumer: &BaseConsumer<RebalanceHandler>, shared: &WorkerResources, finished: bool) {
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
fn commit_stored(consumer: &BaseConsumer<RebalanceHandler>) {
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
    consumer: Arc<BaseConsumer<RebalanceHandler>>,
    workers: Arc<Mutex<Workers>>,
    shared: Arc<WorkerResources>,
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
                let instance = shared.config.group_instance_id();
                if let Some(why) = kafka::group::fatal_reason(consumer.client(), instance.as_deref()) {
                    tracing::error!(%why, "the consumer cannot go on");
                    let _ = shared.fatal.send(Some(why));
                    return;
                }
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
    kafka::group::leave(&consumer, Duration::from_secs(2));
    tracing::info!("consumer stopped; offsets committed; left the group");
}

pub(super) fn set_paused(consumer: &BaseConsumer<RebalanceHandler>, topic: &str, partition: i32, pause: bool) -> bool {
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
