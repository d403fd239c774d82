//! Topics followed from their beginning as records arrive, for tests against a broker whose
//! watermarks cannot be trusted: tansu 0.6 reports a wrong high watermark once a producer
//! writes multi-record batches, so a read "to the end" stops early there and lag is wrong.
//! A [`Tail`] never asks for a watermark: it keeps every record it has consumed, with its
//! Kafka timestamp and the moment it was read, and the test counts what it holds or waits
//! until that satisfies it.
//!
//! librdkafka's calls block, so the tail polls on a thread of its own.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use embedded_brokers::ReadRecord;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;

use crate::kafka::Bootstrap;

/// One record as the tail read it.
#[derive(Debug, Clone)]
pub struct TailedRecord {
    pub record: ReadRecord,
    /// Its Kafka timestamp (create or log-append time), in ms since the epoch.
    pub timestamp_ms: Option<i64>,
    /// When the tail read it.
    pub read_at: Instant,
}

/// Records of each topic in the order they were read (per partition, in offset order).
type Records = BTreeMap<String, Vec<TailedRecord>>;

/// Topics followed from their beginning until dropped.
pub struct Tail {
    records: Arc<Mutex<Records>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Tail {
    /// Follows every partition of `topics`, which must exist, from its beginning. Empty
    /// fetches are answered within 10 ms (`fetch.wait.max.ms`; tansu holds one for the full
    /// wait), so `read_at` trails the record's arrival at the broker by little.
    pub fn start(kafka: &(impl Bootstrap + ?Sized), topics: &[&str]) -> Self {
        let servers = kafka.bootstrap_servers();
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", servers)
            .set("group.id", "vigil-test-tail") // required by librdkafka; nothing is committed
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()
            .unwrap_or_else(|e| panic!("a consumer for {servers}: {e}"));
        let mut assignment = rdkafka::TopicPartitionList::new();
        let mut records = Records::new();
        for topic in topics {
            let partitions = ::kafka::partitions_of(consumer.client(), topic)
                .unwrap_or_else(|e| panic!("the partitions of {topic}: {e}"));
            assert!(partitions > 0, "{topic} does not exist on {servers}: create it before tailing it");
            for partition in 0..partitions {
                let partition = i32::try_from(partition).expect("a partition number fits an i32");
                assignment
                    .add_partition_offset(topic, partition, rdkafka::Offset::Beginning)
                    .unwrap_or_else(|e| panic!("assigning {topic} [{partition}]: {e}"));
            }
            records.insert((*topic).to_owned(), Vec::new());
        }
        consumer.assign(&assignment).unwrap_or_else(|e| panic!("assigning {topics:?}: {e}"));
        let records = Arc::new(Mutex::new(records));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (records, stop) = (records.clone(), stop.clone());
            std::thread::Builder::new()
                .name("kafka tail".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match consumer.poll(Duration::from_millis(50)) {
                            Some(Ok(message)) => {
                                let tailed = TailedRecord {
                                    record: ReadRecord::from_message(&message),
                                    timestamp_ms: message.timestamp().to_millis(),
                                    read_at: Instant::now(),
                                };
                                let mut records = records.lock().unwrap_or_else(|e| e.into_inner());
                                records.entry(message.topic().to_owned()).or_default().push(tailed);
                            }
                            // Transient (a broker restarting, a leader moving): librdkafka
                            // goes on by itself; a test waiting on records names what is missing.
                            Some(Err(error)) => eprintln!("kafka tail: {error}"),
                            None => {}
                        }
                    }
                })
                .expect("a thread for the tail")
        };
        Self { records, stop, thread: Some(thread) }
    }

    /// Calls `look` with the records of `topic` read so far.
    pub fn with<R>(&self, topic: &str, look: impl FnOnce(&[TailedRecord]) -> R) -> R {
        look(self.lock().get(topic).map_or(&[][..], Vec::as_slice))
    }

    /// Records of `topic` read so far.
    pub fn count(&self, topic: &str) -> usize {
        self.with(topic, <[TailedRecord]>::len)
    }

    /// A copy of the records of `topic` read so far.
    pub fn records(&self, topic: &str) -> Vec<TailedRecord> {
        self.with(topic, <[TailedRecord]>::to_vec)
    }

    fn lock(&self) -> MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::{produce, producer};
    use crate::wait_until;
    use embedded_brokers::KafkaCluster;
    use rdkafka::producer::FutureRecord;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tail_keeps_records_written_before_and_after_it_started_with_their_times() {
        let kafka = KafkaCluster::start(1).unwrap();
        kafka.create_topic("first", 2).unwrap();
        kafka.create_topic("second", 1).unwrap();
        let producer = producer(&kafka);
        let write = |topic: &'static str, payloads: &[&'static str]| -> Vec<FutureRecord<'static, str, str>> {
            payloads.iter().map(|p| FutureRecord::to(topic).key("k").payload(*p).timestamp(1_000)).collect()
        };
        produce(&producer, write("first", &["a", "b"])).await;
        let tail = Tail::start(&kafka, &["first", "second"]);
        let started = Instant::now();
        produce(&producer, write("second", &["c"])).await;
        tokio::task::spawn_blocking(move || {
            wait_until(Duration::from_secs(30), "three records tailed", || {
                tail.count("first") == 2 && tail.count("second") == 1
            });
            let mut first: Vec<Vec<u8>> = tail.records("first").into_iter().map(|r| r.record.payload).collect();
            first.sort();
            assert_eq!(first, [b"a".to_vec(), b"b".to_vec()]);
            tail.with("second", |records| {
                assert_eq!(records[0].record.payload, b"c");
                assert_eq!(records[0].timestamp_ms, Some(1_000));
                assert!(records[0].read_at >= started);
            });
            assert_eq!(tail.count("not-followed"), 0);
        })
        .await
        .unwrap();
    }
}
