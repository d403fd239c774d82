//! Server-side scheduling of inference work: every signature of a loaded version owns one
//! [`Scheduler`], a bounded queue drained by dedicated OS threads, so tract never runs on the
//! async runtime's threads and overload is refused (RESOURCE_EXHAUSTED) instead of queued
//! without bound.
//!
//! With batching on, a thread that picks up work takes every queued request that fits in
//! `max_batch_size` rows (waiting up to `batch_timeout` for more to arrive) and runs them as
//! one tract call, then splits the outputs back, request by request, in queue order. With
//! a zero timeout this is adaptive: an idle server runs each request at once, a busy one
//! merges whatever queued while the previous batch ran. With batching off, each request
//! runs alone on the same threads.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
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
    /// Threads running batches, per signature.
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
    closed: bool,
}

struct Shared {
    plan: Arc<SignaturePlan>,
    mode: SchedulingMode,
    queue: Mutex<Queue>,
    ready: Condvar,
    metrics: SignatureMetrics,
}

/// The queue and threads for one signature. Dropping it lets queued work finish, then
/// stops the threads.
pub struct Scheduler {
    shared: Arc<Shared>,
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
        let shared = Arc::new(Shared {
            plan,
            mode,
            queue: Mutex::new(Queue { tasks: VecDeque::new(), rows: 0, closed: false }),
            ready: Condvar::new(),
            metrics,
        });
        let threads = (0..threads.max(1))
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

    pub fn is_batching(&self) -> bool {
        matches!(self.shared.mode, SchedulingMode::Batched(_))
    }

    /// Queues a validated request; the outputs (only its own rows) arrive on the receiver.
    pub fn submit(
        &self,
        inputs: PreparedInputs,
    ) -> Result<oneshot::Receiver<Result<Outputs, PredictError>>, SubmitError> {
        let rows = inputs.rows().unwrap_or(1);
        let (reply, receiver) = oneshot::channel();
        let mut queue = self.shared.queue.lock().expect("scheduler lock");
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
        drop(queue);
        self.shared.ready.notify_one();
        Ok(receiver)
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shared.queue.lock().expect("scheduler lock").closed = true;
        self.shared.ready.notify_all();
        for thread in self.threads.drain(..) {
            // A thread only ends by returning; a panic inside tract is caught per run.
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn work(&self) {
        while let Some(batch) = self.next_batch() {
            self.run(batch);
        }
    }

    /// Blocks until there is work; `None` once closed and drained.
    fn next_batch(&self) -> Option<Vec<Task>> {
        let mut queue = self.queue.lock().expect("scheduler lock");
        loop {
            while queue.tasks.is_empty() {
                if queue.closed {
                    return None;
                }
                queue = self.ready.wait(queue).expect("scheduler lock");
            }
            let (max_rows, timeout) = match &self.mode {
                SchedulingMode::Batched(o) => (o.max_batch_size, o.batch_timeout),
                SchedulingMode::Unbatched(_) => (0, Duration::ZERO),
            };
            // Let the batch fill until it is full or its oldest request has waited long enough.
            while !queue.closed && queue.rows < max_rows && !timeout.is_zero() {
                let Some(oldest) = queue.tasks.front() else { break };
                let deadline = oldest.enqueued + timeout;
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                queue = self.ready.wait_timeout(queue, deadline - now).expect("scheduler lock").0;
            }
            if queue.tasks.is_empty() {
                continue; // another thread took them while this one waited
            }
            let mut batch = Vec::new();
            let mut rows = 0;
            while let Some(task) = queue.tasks.front() {
                if !batch.is_empty() && rows + task.rows > max_rows {
                    break;
                }
                rows += task.rows;
                batch.push(queue.tasks.pop_front().expect("front exists"));
            }
            queue.rows -= rows;
            self.metrics.queue_depth.set(queue.tasks.len() as i64);
            if !queue.tasks.is_empty() {
                self.ready.notify_one();
            }
            return Some(batch);
        }
    }

    fn run(&self, batch: Vec<Task>) {
        if batch.len() == 1 && !self.needs_padding(batch[0].rows) {
            let task = batch.into_iter().next().expect("one task");
            self.metrics.batch_size.observe(task.rows as f64);
            let result = self.plan.run_prepared(task.inputs);
            let _ = task.reply.send(result); // the caller may have gone away; nothing to do
            return;
        }
        let rows: usize = batch.iter().map(|t| t.rows).sum();
        let pad_to = self.padded_size(rows);
        self.metrics.batch_size.observe(pad_to.unwrap_or(rows) as f64);
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
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn plan() -> Arc<SignaturePlan> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/savedmodels/autoencoder/1");
        Arc::new(savedmodel::SavedModel::open(dir).unwrap().load("serving_default").unwrap())
    }

    fn rows(plan: &SignaturePlan, n: usize) -> PreparedInputs {
        plan.prepare([("sensors".to_owned(), Tensor::from_shape(&[n, 18], &vec![0.5f32; n * 18]).unwrap())]).unwrap()
    }

    #[test]
    fn a_full_queue_refuses_instead_of_growing_and_queued_work_still_completes() {
        let plan = plan();
        // A batch waits up to a minute to fill, so submitted rows stay queued.
        let options = BatchingOptions {
            max_batch_size: 4,
            batch_timeout: Duration::from_secs(60),
            max_enqueued_batches: 1,
            num_batch_threads: 1,
            allowed_batch_sizes: Vec::new(),
        };
        let metrics = Metrics::new().signature("m", 1, "serving_default");
        let scheduler = Scheduler::start(Arc::clone(&plan), SchedulingMode::Batched(options), metrics, "test");
        // A full batch runs at once.
        let first = scheduler.submit(rows(&plan, 4)).unwrap().blocking_recv().unwrap().unwrap();
        assert_eq!(first["output_0"].shape(), &[4, 18]);
        // The queue holds max_batch_size x max_enqueued_batches = 4 rows; 3 wait for more.
        let mut pending = vec![scheduler.submit(rows(&plan, 3)).unwrap()];
        let refused = scheduler.submit(rows(&plan, 2));
        assert!(matches!(refused, Err(SubmitError::QueueFull(1))), "{refused:?}");
        assert!(matches!(scheduler.submit(rows(&plan, 5)), Err(SubmitError::TooLarge { rows: 5, max: 4 })));
        // One more row fills the batch: 3 + 1 run together, each gets its own rows.
        pending.push(scheduler.submit(rows(&plan, 1)).unwrap());
        let shapes: Vec<Vec<usize>> =
            pending.drain(..).map(|r| r.blocking_recv().unwrap().unwrap()["output_0"].shape().to_vec()).collect();
        assert_eq!(shapes, [vec![3, 18], vec![1, 18]]);
        // Closing runs what was accepted instead of dropping it.
        let last = scheduler.submit(rows(&plan, 2)).unwrap();
        drop(scheduler);
        assert_eq!(last.blocking_recv().unwrap().unwrap()["output_0"].shape(), &[2, 18]);
    }
}
