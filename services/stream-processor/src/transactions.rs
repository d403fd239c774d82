//! Exactly-once mode: outputs and the offsets of the readings they came from are written
//! in one Kafka transaction, so a reader with `isolation.level=read_committed` sees every
//! reading's outputs once, whatever crashes in between.
//!
//! One transactional producer per processor, with the consumer group's metadata sent in
//! each transaction (KIP-447), so a zombie that lost its partitions is fenced by the
//! group's generation. Workers hand outputs to the producer while holding the gate open
//! (shared) and record the reading's offset under it; committing closes the gate
//! (exclusive), so a commit never races a half-written reading: it takes the recorded
//! offsets, sends them into the transaction, commits, and begins the next. Commits run on
//! the consumer's poll thread, every `transaction_interval_ms` and on every revoke and
//! shutdown after the workers drained, so no partition changes owner with its outputs
//! uncommitted.
//!
//! A transaction librdkafka says must be aborted (or a fatal producer error) ends the
//! processor: the open transaction is aborted, its outputs are never visible to
//! read_committed readers, and the readings since the last commit are read again by the
//! next owner from the committed offsets. Rewinding in place would need every worker
//! stopped and every partition sought back; a restart does exactly that.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{RwLock, RwLockReadGuard};

/// How long one transactional call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Transactions {
    producer: FutureProducer,
    gate: RwLock<()>,
    /// Per partition: the last reading whose outputs are in the open transaction.
    offsets: Mutex<HashMap<(String, i32), i64>>,
    /// Set once a transaction failed: nothing more is produced or committed.
    broken: AtomicBool,
}

/// Why the open transaction could not be committed.
#[derive(Debug, thiserror::Error)]
pub enum TransactionError {
    #[error("the transaction was aborted ({0}); restart to read again from the committed offsets")]
    Aborted(String),
    #[error("the transactional producer failed: {0}")]
    Failed(String),
}

impl Transactions {
    /// Registers the transactional id (fencing any earlier producer with it and aborting
    /// what it left open) and begins the first transaction.
    pub fn start(producer: FutureProducer) -> Result<Self, KafkaError> {
        producer.init_transactions(CALL_TIMEOUT)?;
        producer.begin_transaction()?;
        Ok(Self {
            producer,
            gate: RwLock::new(()),
            offsets: Mutex::new(HashMap::new()),
            broken: AtomicBool::new(false),
        })
    }

    /// Held while a reading's outputs are handed to the producer and its offset recorded;
    /// `None` once a transaction failed.
    pub async fn enter(&self) -> Option<RwLockReadGuard<'_, ()>> {
        let guard = self.gate.read().await;
        (!self.broken.load(Ordering::Acquire)).then_some(guard)
    }

    /// Records that the outputs of the reading at `offset` are in the open transaction
    /// (call while holding [`Self::enter`]'s guard, after handing them over).
    pub fn record(&self, topic: &str, partition: i32, offset: i64) {
        let mut offsets = self.offsets.lock().unwrap_or_else(|e| e.into_inner());
        offsets.insert((topic.to_owned(), partition), offset);
    }

    /// Marks the open transaction unusable (a record it should hold was refused): it is
    /// never committed, only aborted.
    pub fn mark_failed(&self) {
        self.broken.store(true, Ordering::Release);
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Commits the open transaction with the recorded offsets and begins the next; does
    /// nothing (`Ok(false)`) when nothing was recorded since the last commit. Blocks
    /// (call it off the async runtime: the poll thread does).
    pub fn commit<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) -> Result<bool, TransactionError> {
        let _exclusive = self.gate.blocking_write();
        if self.is_broken() {
            return Err(TransactionError::Failed("an earlier transaction failed".into()));
        }
        let offsets = std::mem::take(&mut *self.offsets.lock().unwrap_or_else(|e| e.into_inner()));
        if offsets.is_empty() {
            return Ok(false);
        }
        let result = self.commit_offsets(consumer, &offsets);
        if let Err(error) = &result {
            self.broken.store(true, Ordering::Release);
            tracing::error!(%error, "exactly-once: the transaction failed");
        }
        result.map(|()| true)
    }

    fn commit_offsets<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        offsets: &HashMap<(String, i32), i64>,
    ) -> Result<(), TransactionError> {
        let mut list = TopicPartitionList::new();
        for ((topic, partition), offset) in offsets {
            // The committed offset is the next one to read.
            list.add_partition_offset(topic, *partition, Offset::Offset(offset + 1))
                .map_err(|e| TransactionError::Failed(e.to_string()))?;
        }
        let metadata = consumer
            .group_metadata()
            .ok_or_else(|| TransactionError::Failed("the consumer has no group metadata".into()))?;
        self.retrying(|producer| producer.send_offsets_to_transaction(&list, &metadata, CALL_TIMEOUT))?;
        self.retrying(|producer| producer.commit_transaction(CALL_TIMEOUT))?;
        self.producer.begin_transaction().map_err(|e| TransactionError::Failed(e.to_string()))
    }

    /// Runs a transactional call, again while librdkafka says the error is retriable;
    /// aborts the transaction when it says so.
    fn retrying(&self, call: impl Fn(&FutureProducer) -> Result<(), KafkaError>) -> Result<(), TransactionError> {
        let mut attempts = 0;
        loop {
            let error = match call(&self.producer) {
                Ok(()) => return Ok(()),
                Err(KafkaError::Transaction(error)) => error,
                Err(other) => return Err(TransactionError::Failed(other.to_string())),
            };
            attempts += 1;
            if error.is_retriable() && attempts < 10 {
                tracing::warn!(%error, "exactly-once: a transactional call failed; trying again");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            if error.txn_requires_abort() {
                if let Err(abort) = self.producer.abort_transaction(CALL_TIMEOUT) {
                    tracing::error!(%abort, "exactly-once: aborting the transaction failed as well");
                }
                return Err(TransactionError::Aborted(error.to_string()));
            }
            return Err(TransactionError::Failed(error.to_string()));
        }
    }

    /// Aborts the open transaction (shutdown after a failure), so its outputs are never
    /// visible; nothing when it is already finished.
    pub fn abort(&self) {
        let _exclusive = self.gate.blocking_write();
        self.broken.store(true, Ordering::Release);
        if let Err(error) = self.producer.abort_transaction(CALL_TIMEOUT) {
            tracing::debug!(%error, "exactly-once: aborting the open transaction");
        }
    }
}
