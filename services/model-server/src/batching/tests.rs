//! Unit tests of `batching.rs`, kept apart so the module reads as code.

use std::future::Future;

use super::*;
use crate::metrics::Metrics;

fn plan() -> Arc<SignaturePlan> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/savedmodels/autoencoder/1");
    Arc::new(savedmodel::SavedModel::open(dir).unwrap().load("serving_default").unwrap())
}

fn batched(max_batch_size: usize, num_batch_threads: usize) -> SchedulingMode {
    SchedulingMode::Batched(BatchingOptions {
        max_batch_size,
        batch_timeout: Duration::ZERO,
        max_enqueued_batches: 4,
        num_batch_threads,
        allowed_batch_sizes: Vec::new(),
    })
}

/// Distinct rows per request, so a response carrying another request's rows shows.
fn distinct(plan: &SignaturePlan, seed: usize) -> (PreparedInputs, Vec<f32>) {
    let values: Vec<f32> = (0..18).map(|i| ((seed * 13 + i * 5) % 29) as f32 / 29.0).collect();
    let input = Tensor::from_shape(&[1, 18], &values).unwrap();
    let expected = plan.run([("sensors".to_owned(), input.clone())]).unwrap().remove("output_0").unwrap();
    let prepared = plan.prepare([("sensors".to_owned(), input)]).unwrap();
    (prepared, expected.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec())
}

/// Waits until every scheduler thread is parked, so none takes queued work unless woken.
fn until_threads_wait(scheduler: &Scheduler) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while scheduler.shared.queue.lock().unwrap().idle_threads < scheduler.shared.slots {
        assert!(Instant::now() < deadline, "scheduler threads never parked");
        std::thread::sleep(Duration::from_millis(1));
    }
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

#[tokio::test(flavor = "current_thread")]
async fn a_cheap_signature_runs_on_the_caller_and_merges_what_is_ready() {
    let plan = plan();
    let metrics = Metrics::new().signature("m", 1, "serving_default");
    let scheduler = Arc::new(Scheduler::start(Arc::clone(&plan), batched(64, 2), metrics.clone(), "test"));
    // Inline running is earned by a measured run; debug builds may be slower than the
    // limit, so mark the signature cheap as a release build of this model is.
    scheduler.shared.cheap.store(true, Ordering::Relaxed);
    until_threads_wait(&scheduler);
    let tasks: Vec<_> = (0..8)
        .map(|seed| {
            let scheduler = Arc::clone(&scheduler);
            let (inputs, expected) = distinct(&plan, seed);
            tokio::spawn(async move {
                let outputs = scheduler.infer(inputs).await.unwrap().unwrap();
                assert_eq!(outputs["output_0"].shape(), &[1, 18]);
                let got = outputs["output_0"].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
                assert_eq!(got, expected, "request {seed} got its own row back");
                std::thread::current().name().map(str::to_owned)
            })
        })
        .collect();
    let mut ran_on = Vec::new();
    for task in tasks {
        ran_on.push(task.await.unwrap());
    }
    // The first two requests took the two run slots and yielded, the other six queued;
    // the first then ran all eight as one batch on this runtime's thread.
    assert_eq!(metrics.batch_size.get_sample_count(), 1, "one engine run");
    assert_eq!(metrics.batch_size.get_sample_sum(), 8.0, "of eight rows");
    assert!(ran_on.iter().all(|name| name == &ran_on[0]), "{ran_on:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_cancelled_combiner_hands_queued_requests_to_the_threads() {
    let plan = plan();
    let metrics = Metrics::new().signature("m", 1, "serving_default");
    let scheduler = Scheduler::start(Arc::clone(&plan), batched(64, 1), metrics, "test");
    scheduler.shared.cheap.store(true, Ordering::Relaxed);
    until_threads_wait(&scheduler);
    let waker = std::task::Waker::noop();
    let mut context = std::task::Context::from_waker(waker);
    // The first request claims the only run slot and yields; the second queues behind it.
    let mut combiner = Box::pin(scheduler.infer(rows(&plan, 1)));
    assert!(combiner.as_mut().poll(&mut context).is_pending());
    let (inputs, expected) = distinct(&plan, 3);
    let mut queued = Box::pin(scheduler.infer(inputs));
    assert!(queued.as_mut().poll(&mut context).is_pending());
    // The client of the first request goes away before it ran anything.
    drop(combiner);
    let outputs = tokio::time::timeout(Duration::from_secs(10), queued)
        .await
        .expect("the queued request is answered by a thread, not stranded")
        .unwrap()
        .unwrap();
    let got = outputs["output_0"].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
    assert_eq!(got, expected);
}
