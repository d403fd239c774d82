//! Adaptive batching of Predict calls. Readings wait in one queue for every partition;
//! a single task takes them out as calls: when fewer than `model.calls_in_flight` calls
//! are out, whatever is queued (up to `model.max_rows_per_call`) goes at once, so an idle
//! pipeline sends each reading alone with no added wait, and a busy one sends what queued
//! while the other calls were out, together. Nothing is ever held back to fill a batch.
//!
//! Each reading still gets its own result (its own score, threshold and version), so the
//! partition workers keep their order, commits and dead-lettering per reading; what a
//! batch changes is only how many readings share a round trip, an HTTP/2 frame and a
//! model run.

use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{Caller, Row, ScoreError, Scored};

/// A reading waiting for its call, and where its result goes.
pub(super) struct Pending {
    row: Row,
    queued: Instant,
    reply: oneshot::Sender<Result<Scored, ScoreError>>,
}

/// Readings that may wait for a call. Readings in flight are bounded upstream (by the
/// partition workers' windows); this only keeps a burst from growing the queue.
const QUEUE: usize = 8192;

/// Starts the task that turns queued readings into calls; it ends when every sender
/// (every clone of the client) is gone, after the calls it started answer.
pub(super) fn start(caller: Caller) -> mpsc::Sender<Pending> {
    let (sender, queue) = mpsc::channel(QUEUE);
    tokio::spawn(run(caller, queue));
    sender
}

/// Queues `row` for the next call and waits for its result.
pub(super) async fn submit(batches: &mpsc::Sender<Pending>, row: Row) -> Result<Scored, ScoreError> {
    let (reply, result) = oneshot::channel();
    if batches.send(Pending { row, queued: Instant::now(), reply }).await.is_err() {
        return Err(ScoreError::Transient("the model client is shutting down".into()));
    }
    result.await.unwrap_or_else(|_| Err(ScoreError::Transient("the model client is shutting down".into())))
}

async fn run(caller: Caller, mut queue: mpsc::Receiver<Pending>) {
    let max_rows = caller.config.max_rows_per_call.max(1);
    let calls = Arc::new(Semaphore::new(caller.config.calls_in_flight.max(1)));
    while let Some(first) = queue.recv().await {
        let Ok(permit) = calls.clone().acquire_owned().await else { return };
        // Everything that queued while every call was out goes in this one.
        let mut batch = vec![first];
        while batch.len() < max_rows {
            match queue.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        let caller = caller.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let (rows, replies): (Vec<Row>, Vec<_>) =
                batch.into_iter().map(|p| (p.row, (p.reply, started - p.queued))).unzip();
            let results = caller.call(&rows).await;
            drop(permit);
            for ((reply, waited), result) in replies.into_iter().zip(results) {
                // The reading's scorer may have gone (its partition was revoked): nothing to do.
                let _ = reply.send(result.map(|scored| Scored { waited, ..scored }));
            }
        });
    }
}

/// Calls `call` on `rows`; if the server refuses the call (a rejection), calls it again on
/// each half, and so on down to single rows, so only the rows it refuses alone come back
/// rejected and their neighbours are scored. One result per row, in order; a transient
/// failure fails the rows of that call (they are tried again later).
pub(super) fn split_rejected<'a, T, R, F, Fut>(rows: &'a [T], call: &'a F) -> BoxFuture<'a, Vec<Result<R, ScoreError>>>
where
    T: Sync,
    R: Send + 'a,
    F: Fn(&'a [T]) -> Fut + Sync,
    Fut: Future<Output = Result<Vec<R>, ScoreError>> + Send + 'a,
{
    Box::pin(async move {
        match call(rows).await {
            Ok(results) => results.into_iter().map(Ok).collect(),
            Err(ScoreError::Rejected(_)) if rows.len() > 1 => {
                let (left, right) = rows.split_at(rows.len() / 2);
                let (mut left, right) = futures::join!(split_rejected(left, call), split_rejected(right, call));
                left.extend(right);
                left
            }
            Err(error) => (0..rows.len()).map(|_| Err(error.clone())).collect(),
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A server that refuses any call holding a row over 100, and counts calls.
    async fn server(rows: &[u32], calls: &AtomicUsize) -> Result<Vec<u32>, ScoreError> {
        calls.fetch_add(1, Ordering::Relaxed);
        if rows.iter().any(|r| *r > 100) {
            return Err(ScoreError::Rejected(format!("{rows:?} holds a bad row")));
        }
        Ok(rows.iter().map(|r| r * 2).collect())
    }

    #[tokio::test]
    async fn only_the_rows_refused_alone_are_rejected_and_the_rest_are_scored_in_order() {
        let calls = AtomicUsize::new(0);
        let call = |rows| server(rows, &calls);
        let rows: Vec<u32> = (1..=16).map(|r| if r == 6 || r == 7 { r + 200 } else { r }).collect();
        let results = split_rejected(&rows, &call).await;
        assert_eq!(results.len(), 16);
        for (row, result) in rows.iter().zip(&results) {
            match result {
                Ok(doubled) => assert_eq!(*doubled, row * 2, "row {row} got its own answer"),
                Err(ScoreError::Rejected(why)) => assert!(*row > 100 && why.contains(&row.to_string()), "{why}"),
                Err(other) => panic!("{other}"),
            }
        }
        assert_eq!(results.iter().filter(|r| r.is_err()).count(), 2, "only the two bad rows");
        // 16 -> 8+8 -> (4+4) -> (2+2) -> (1+1): a bad row costs a few calls, not one per row.
        assert!(calls.load(Ordering::Relaxed) <= 11, "{} calls", calls.load(Ordering::Relaxed));

        // A call that fails for another reason fails its rows, unsplit.
        let transient = |rows: &[u32]| {
            let n = rows.len();
            async move { Err::<Vec<u32>, _>(ScoreError::Transient(format!("{n} rows: unavailable"))) }
        };
        let results = split_rejected(&rows, &transient).await;
        assert!(results.iter().all(|r| matches!(r, Err(ScoreError::Transient(why)) if why.starts_with("16 rows"))));
    }
}
