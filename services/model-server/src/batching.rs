//! Server-side scheduling of inference work: every signature of a loaded version owns one
//! [`Scheduler`], a bounded queue with at most `threads` engine runs at a time, so overload
//! is refused (RESOURCE_EXHAUSTED) instead of queued without bound.
//!
//! With batching on, whoever picks up work takes every queued request that fits in
//! `max_batch_size` rows (waiting up to `batch_timeout` for more to arrive) and runs them as
//! one tract call, then splits the outputs back, request by request, in queue order. With
//! a zero timeout this is adaptive: an idle server runs each request at once, a busy one
//! merges whatever queued while the previous batch ran. With batching off, each request
//! runs alone under the same bound.
//!
//! Who runs a batch: dedicated OS threads, or — when the signature has proven cheap (its
//! last run took under [`INLINE_RUN_LIMIT`]) and no batch timeout is set — a request that
//! found a free run slot, on its own async worker ("combining"). It yields to the runtime
//! once, so requests already decoded on that worker queue up behind it, then runs the
//! queue for everyone waiting. Handing each request to another thread and back costs two
//! context switches, more than a small model's whole run on a 2-core machine; running a few
//! tens of microseconds of tract inline costs the runtime less than that, and the yield is
//! what makes concurrent requests meet in one batch (measured in docs/benchmarks.md). A
//! combiner runs at most [`INLINE_BUDGET`] of batches, then leaves the rest to the threads,
//! so one request never holds its worker for long, and an expensive model never runs on
//! the runtime at all.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use savedmodel::{PredictError, PreparedInputs, SignaturePlan, Tensor};
use tokio::sync::oneshot;

use crate::metrics::SignatureMetrics;

/// TF Serving's `BatchingParameters`, resolved to plain values with its defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchingOptions {
    /// Most rows merged into one run; a single request larger than this is refused.
    pub max_batch_size: usize,
    /// How long the oldest queued request may wait for a batch to fill.
    pub batch_timeout: Duration,
    /// Queue bound, in batches of `max_batch_size` rows.
    pub max_enqueued_batches: usize,
    /// Threads running batches, per signature; also the most batches running at once
    /// (inline combiners included).
    pub num_batch_threads: usize,
    /// If set, batches are padded up to the next allowed size (the last must equal
    /// `max_batch_size`), as TF Serving does to bound the shapes a model sees.
    pub allowed_batch_sizes: Vec<usize>,
}

impl Default for BatchingOptions {
    fn default() -> Self {
        // TF Serving's defaults (session_bundle_config.proto / batching_session.cc).
        Self {
            max_batch_size: 1000,
            batch_timeout: Duration::ZERO,
            max_enqueued_batches: 10,
            num_batch_threads: default_threads(),
            allowed_batch_sizes: Vec::new(),
        }
    }
}

impl BatchingOptions {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_batch_size == 0 {
            return Err("max_batch_size must be positive".into());
        }
        if self.num_batch_threads == 0 {
            return Err("num_batch_threads must be positive".into());
        }
        if self.max_enqueued_batches == 0 {
            return Err("max_enqueued_batches must be positive".into());
        }
        if let Some(&last) = self.allowed_batch_sizes.last() {
            if !self.allowed_batch_sizes.windows(2).all(|w| w[0] < w[1]) || self.allowed_batch_sizes[0] == 0 {
                return Err("allowed_batch_sizes must be positive and strictly increasing".into());
            }
            if last != self.max_batch_size {
                return Err(format!(
                    "the last entry of allowed_batch_sizes ({last}) must equal max_batch_size ({})",
                    self.max_batch_size
                ));
            }
        }
        Ok(())
    }
}

/// Queue limits and threads when batching is off: each request runs alone.
#[derive(Debug, Clone, PartialEq)]
pub struct UnbatchedOptions {
    pub threads: usize,
    /// Requests queued beyond this are refused with RESOURCE_EXHAUSTED.
    pub max_queued_requests: usize,
}

impl Default for UnbatchedOptions {
    fn default() -> Self {
        Self { threads: default_threads(), max_queued_requests: 4096 }
    }
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// How a scheduler forms work units.
#[derive(Debug, Clone, PartialEq)]
pub enum SchedulingMode {
    Batched(BatchingOptions),
    Unbatched(UnbatchedOptions),
}

/// A signature whose last run took less than this may run on the submitting async worker.
pub const INLINE_RUN_LIMIT: Duration = Duration::from_micros(100);
/// Most time a request spends running other requests' batches inline before handing the
/// rest of the queue to the threads.
pub const INLINE_BUDGET: Duration = Duration::from_micros(250);

pub type Outputs = BTreeMap<String, Tensor>;
type Reply = oneshot::Sender<Result<Outputs, PredictError>>;

/// Why a request was not queued.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("the request has {rows} rows, more than max_batch_size ({max})")]
    TooLarge { rows: usize, max: usize },
    #[error("the queue for this signature is full ({0} queued); retry later")]
    QueueFull(usize),
    #[error("this model version is unloading")]
    Closed,
}

struct Task {
    inputs: PreparedInputs,
    rows: usize,
    enqueued: Instant,
    reply: Reply,
}

struct Queue {
    tasks: VecDeque<Task>,
    rows: usize,
    /// Batches being run right now, by threads or inline; at most `SchedulerState::slots`.
    running: usize,
    closed: bool,
    /// Threads parked waiting for work. Only tests read it: a thread that has not reached
    /// its first wait yet takes queued work without being woken, which would race with
    /// what a test sets up.
    #[cfg_attr(not(test), allow(dead_code))]
    idle_threads: usize,
}

struct SchedulerState {
    plan: Arc<SignaturePlan>,
    mode: SchedulingMode,
    /// Most concurrent engine runs (the thread count).
    slots: usize,
    queue: Mutex<Queue>,
    ready: Condvar,
    /// The last run was fast enough to run inline ([`INLINE_RUN_LIMIT`]).
    cheap: AtomicBool,
    metrics: SignatureMetrics,
}

/// The queue and threads for one signature. Dropping it lets queued work finish, then
/// stops the threads.
pub struct Scheduler {
    shared: Arc<SchedulerState>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").field("mode", &self.shared.mode).finish_non_exhaustive()
    }
}

impl Scheduler {
    pub fn start(plan: Arc<SignaturePlan>, mode: SchedulingMode, metrics: SignatureMetrics, name: &str) -> Self {
        // Merging needs every input to carry the batch on axis 0; otherwise run one by one.
        let mode = match mode {
            SchedulingMode::Batched(options) if !plan.is_batchable() => SchedulingMode::Unbatched(UnbatchedOptions {
                threads: options.num_batch_threads,
                max_queued_requests: options.max_enqueued_batches * options.max_batch_size,
            }),
            mode => mode,
        };
        let threads = match &mode {
            SchedulingMode::Batched(o) => o.num_batch_threads,
            SchedulingMode::Unbatched(o) => o.threads,
        };
        let slots = threads.max(1);
        let shared = Arc::new(SchedulerState {
            plan,
            mode,
            slots,
            queue: Mutex::new(Queue { tasks: VecDeque::new(), rows: 0, running: 0, closed: false, idle_threads: 0 }),
            ready: Condvar::new(),
            cheap: AtomicBool::new(false),
            metrics,
        });
        let threads = (0..slots)
            .map(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("infer-{name}-{i}"))
                    .spawn(move || shared.work())
                    .expect("spawning an inference thread")
            })
            .collect();
        Self { shared, threads }
    }

    /// The most rows one request may carry here (`max_batch_size` when batching).
    pub fn max_rows(&self) -> Option<usize> {
        match &self.shared.mode {
            SchedulingMode::Batched(o) => Some(o.max_batch_size),
            SchedulingMode::Unbatched(_) => None,
        }
    }

    pub fn is_batching(&self) -> bool {
        matches!(self.shared.mode, SchedulingMode::Batched(_))
    }

    /// Queues a validated request for the threads; the outputs (only its own rows) arrive
    /// on the receiver. For callers outside the async runtime (warmup).
    pub fn submit(
        &self,
        inputs: PreparedInputs,
    ) -> Result<oneshot::Receiver<Result<Outputs, PredictError>>, SubmitError> {
        let (receiver, next) = self.enqueue(inputs, false)?;
        debug_assert!(matches!(next, Next::WakeThread));
        self.shared.ready.notify_one();
        Ok(receiver)
    }

    /// Runs a validated request and returns its outputs (only its own rows). When the
    /// signature is cheap and a run slot is free, this request becomes a combiner: it
    /// yields once so requests already ready on this worker can queue too, then runs the
    /// queue for everyone (see the module docs).
    pub async fn infer(&self, inputs: PreparedInputs) -> Result<Result<Outputs, PredictError>, SubmitError> {
        let (receiver, next) = self.enqueue(inputs, true)?;
        match next {
            Next::Combine(claim) => {
                if self.is_batching() {
                    tokio::task::yield_now().await;
                }
                claim.combine();
            }
            Next::WakeThread => self.shared.ready.notify_one(),
            // Every slot is running a batch; whoever finishes first takes this request next.
            Next::Queued => {}
        }
        // A dropped sender means the scheduler closed without answering, which Drop prevents
        // by draining; report it as a closed scheduler all the same.
        receiver.await.map_err(|_| SubmitError::Closed)
    }

    /// Queues a request and decides, under the queue's lock, who will run it: with
    /// `may_lead`, this caller (claiming a run slot) if the signature is cheap and a slot is
    /// free; a batch already running if every slot is busy; otherwise a thread.
    #[allow(clippy::type_complexity)]
    fn enqueue(
        &self,
        inputs: PreparedInputs,
        may_lead: bool,
    ) -> Result<(oneshot::Receiver<Result<Outputs, PredictError>>, Next<'_>), SubmitError> {
        let rows = inputs.rows().unwrap_or(1);
        let (reply, receiver) = oneshot::channel();
        let mut queue = self.shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.closed {
            return Err(SubmitError::Closed);
        }
        match &self.shared.mode {
            SchedulingMode::Batched(o) => {
                if rows > o.max_batch_size {
                    return Err(SubmitError::TooLarge { rows, max: o.max_batch_size });
                }
                if queue.rows + rows > o.max_batch_size * o.max_enqueued_batches {
                    return Err(SubmitError::QueueFull(queue.tasks.len()));
                }
            }
            SchedulingMode::Unbatched(o) => {
                if queue.tasks.len() >= o.max_queued_requests {
                    return Err(SubmitError::QueueFull(queue.tasks.len()));
                }
            }
        }
        queue.tasks.push_back(Task { inputs, rows, enqueued: Instant::now(), reply });
        queue.rows += rows;
        self.shared.metrics.queue_depth.set(queue.tasks.len() as i64);
        let next = if !(may_lead && self.shared.runs_inline()) {
            Next::WakeThread
        } else if queue.running < self.shared.slots {
            queue.running += 1;
            Next::Combine(Combiner { shared: &self.shared, holds_slot: true })
        } else {
            Next::Queued
        };
        Ok((receiver, next))
    }
}

/// Who runs a request just queued.
enum Next<'a> {
    /// The caller, inline, holding this run slot.
    Combine(Combiner<'a>),
    /// A scheduler thread, which must be woken.
    WakeThread,
    /// Whoever finishes a running batch first (every slot is busy).
    Queued,
}

/// The run slot of a request that runs the queue inline. Dropping it (also when the
/// request is cancelled before it ran anything) gives the slot back and wakes a thread
/// for whatever is still queued, so no queued request is stranded.
struct Combiner<'a> {
    shared: &'a SchedulerState,
    holds_slot: bool,
}

impl Combiner<'_> {
    /// Runs batches until the queue is empty, the budget is spent, or the signature stops
    /// being cheap; leftovers go to the threads.
    fn combine(mut self) {
        let started = Instant::now();
        loop {
            let mut queue = self.shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
            if queue.tasks.is_empty() {
                queue.running -= 1;
                self.holds_slot = false;
                return;
            }
            if started.elapsed() >= INLINE_BUDGET || !self.shared.runs_inline() {
                return; // Drop hands the rest to the threads
            }
            let batch = self.shared.take_batch(&mut queue);
            drop(queue);
            self.shared.run(batch);
        }
    }
}

impl Drop for Combiner<'_> {
    fn drop(&mut self) {
        if self.holds_slot {
            self.shared.release_slot();
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shared.queue.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
        self.shared.ready.notify_all();
        for thread in self.threads.drain(..) {
            // A thread only ends by returning; a panic inside tract is caught per run.
            let _ = thread.join();
        }
    }
}

impl SchedulerState {
    fn work(&self) {
        while let Some(batch) = self.next_batch() {
            self.run(batch);
            self.release_slot();
        }
    }

    /// Gives a run slot back and, if work is queued, wakes a thread to take it.
    fn release_slot(&self) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.running -= 1;
        let more = !queue.tasks.is_empty();
        drop(queue);
        if more {
            self.ready.notify_one();
        }
    }

    /// Most rows per batch (0: one request per run) and how long a batch may wait to fill.
    fn batch_limits(&self) -> (usize, Duration) {
        match &self.mode {
            SchedulingMode::Batched(o) => (o.max_batch_size, o.batch_timeout),
            SchedulingMode::Unbatched(_) => (0, Duration::ZERO),
        }
    }

    fn is_batched(&self) -> bool {
        matches!(self.mode, SchedulingMode::Batched(_))
    }

    /// Whether submitters may run batches on their own (async) thread.
    fn runs_inline(&self) -> bool {
        self.batch_limits().1.is_zero() && self.cheap.load(Ordering::Relaxed)
    }

    /// Blocks until there is work and a free slot; `None` once closed and drained.
    fn next_batch(&self) -> Option<Vec<Task>> {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            while queue.tasks.is_empty() || queue.running >= self.slots {
                if queue.closed && queue.tasks.is_empty() {
                    return None;
                }
                queue.idle_threads += 1;
                queue = self.ready.wait(queue).unwrap_or_else(PoisonError::into_inner);
                queue.idle_threads -= 1;
            }
            let (max_rows, timeout) = self.batch_limits();
            // Let the batch fill until it is full or its oldest request has waited long enough.
            while !queue.closed && queue.rows < max_rows && !timeout.is_zero() {
                let Some(oldest) = queue.tasks.front() else { break };
                let deadline = oldest.enqueued + timeout;
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                queue = self.ready.wait_timeout(queue, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
            }
            if queue.tasks.is_empty() || queue.running >= self.slots {
                continue; // someone else took them, or the slot, while this thread waited
            }
            let batch = self.take_batch(&mut queue);
            queue.running += 1;
            if !queue.tasks.is_empty() && queue.running < self.slots {
                self.ready.notify_one();
            }
            return Some(batch);
        }
    }

    /// Takes the next batch off the queue (at least one task; `queue.tasks` must not be
    /// empty). The caller holds, or claims, a run slot for it.
    fn take_batch(&self, queue: &mut Queue) -> Vec<Task> {
        let (max_rows, _) = self.batch_limits();
        let mut batch = Vec::new();
        let mut rows = 0;
        while let Some(task) = queue.tasks.front() {
            if !batch.is_empty() && rows + task.rows > max_rows {
                break;
            }
            rows += task.rows;
            if self.is_batched() {
                self.metrics.observe_queued(task.enqueued.elapsed());
            }
            batch.push(queue.tasks.pop_front().expect("front exists"));
        }
        queue.rows -= rows;
        self.metrics.queue_depth.set(queue.tasks.len() as i64);
        batch
    }

    /// Runs one batch and answers its requests; records whether the run was cheap.
    fn run(&self, batch: Vec<Task>) {
        let started = Instant::now();
        self.answer(batch);
        self.cheap.store(started.elapsed() < INLINE_RUN_LIMIT, Ordering::Relaxed);
    }

    fn answer(&self, batch: Vec<Task>) {
        if batch.len() == 1 && !self.needs_padding(batch[0].rows) {
            let task = batch.into_iter().next().expect("one task");
            self.metrics.observe_run(task.rows, task.rows, self.is_batched());
            let result = self.plan.run_prepared(task.inputs);
            let _ = task.reply.send(result); // the caller may have gone away; nothing to do
            return;
        }
        let rows: usize = batch.iter().map(|t| t.rows).sum();
        let pad_to = self.padded_size(rows);
        self.metrics.observe_run(rows, pad_to.unwrap_or(rows), self.is_batched());
        let (inputs, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|t| (t.inputs, t.reply)).unzip();
        match self.plan.run_batch(inputs, pad_to) {
            Ok(outputs) => {
                for (reply, output) in replies.into_iter().zip(outputs) {
                    let _ = reply.send(Ok(output));
                }
            }
            Err(error) => {
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }

    fn needs_padding(&self, rows: usize) -> bool {
        self.padded_size(rows).is_some_and(|p| p != rows)
    }

    fn padded_size(&self, rows: usize) -> Option<usize> {
        match &self.mode {
            SchedulingMode::Batched(o) => o.allowed_batch_sizes.iter().copied().find(|&s| s >= rows),
            SchedulingMode::Unbatched(_) => None,
        }
    }
}

#[cfg(test)]
mod tests;
