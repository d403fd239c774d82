//! Kafka records in and out of a test or bench: a producer that neither repeats nor
//! reorders, records handed to it and confirmed (waiting while its queue is full, as the
//! services do, with `kafka::send_waiting`), a topic read from its beginning until the test
//! has what it waits for or to its end as it is now (`kafka::read_partition_to_end`), and
//! the offsets a topic ends at and a consumer group has committed.
//!
//! librdkafka's calls block: the async readers run them off the runtime's workers.

use std::collections::BTreeMap;
use std::time::Duration;

use embedded_brokers::{KafkaCluster, KafkaUnderTest, ReadRecord};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::ToBytes;
use rdkafka::producer::{FutureProducer, FutureRecord};

/// How long a metadata, watermark or offset request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a read to the end may go without a record before it fails.
const STALL: Duration = Duration::from_secs(30);

/// Where the brokers are: anything that knows its `bootstrap.servers`.
pub trait Bootstrap {
    fn bootstrap_servers(&self) -> &str;
}

impl Bootstrap for str {
    fn bootstrap_servers(&self) -> &str {
        self
    }
}

impl Bootstrap for String {
    fn bootstrap_servers(&self) -> &str {
        self
    }
}

impl Bootstrap for KafkaCluster {
    fn bootstrap_servers(&self) -> &str {
        KafkaCluster::bootstrap_servers(self)
    }
}

impl Bootstrap for KafkaUnderTest {
    fn bootstrap_servers(&self) -> &str {
        KafkaUnderTest::bootstrap_servers(self)
    }
}

/// A producer for test records: idempotent (a retried send neither repeats nor reorders a
/// partition's records) and quick to send (1 ms linger).
pub fn producer(kafka: &(impl Bootstrap + ?Sized)) -> FutureProducer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .create()
        .unwrap_or_else(|e| panic!("a producer for {}: {e}", kafka.bootstrap_servers()))
}

/// Hands every one of `records` to `producer` in order, then waits until Kafka has
/// confirmed them all; panics on the first refusal, naming the topic. (A `Vec`, not any
/// iterator: a lazy `map` held across the sends' awaits makes a spawned task's future
/// fail rustc's `Send` check with "implementation of `FnOnce` is not general enough".)
pub async fn produce<K, P>(producer: &FutureProducer, records: Vec<FutureRecord<'_, K, P>>)
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    let mut deliveries = Vec::new();
    for record in records {
        let topic = record.topic.to_owned();
        let delivery = ::kafka::send_waiting(producer, record)
            .await
            .unwrap_or_else(|e| panic!("Kafka refused a record for {topic}: {e}"));
        deliveries.push((topic, delivery));
    }
    for (topic, delivery) in deliveries {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((error, _))) => panic!("Kafka did not take a record for {topic}: {error}"),
            Err(_) => panic!("the producer went away before confirming a record for {topic}"),
        }
    }
}

/// Every record of `topic` from its beginning, read (without a consumer group) until
/// `enough` holds for the records so far or `within` passes; in partition and offset order.
pub async fn read_topic(
    kafka: &(impl Bootstrap + ?Sized),
    topic: &str,
    within: Duration,
    enough: impl Fn(&[ReadRecord]) -> bool + Send + 'static,
) -> Vec<ReadRecord> {
    let (servers, topic) = (kafka.bootstrap_servers().to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        embedded_brokers::read_topic(&servers, &topic, within, enough)
            .unwrap_or_else(|e| panic!("reading {topic} from {servers}: {e}"))
    })
    .await
    .expect("the read does not panic")
}

/// Every record on `topic` now: each partition read from its beginning to the end it had
/// when its read began. None when the topic does not exist.
pub async fn read_to_end(kafka: &(impl Bootstrap + ?Sized), topic: &str) -> Vec<ReadRecord> {
    let (servers, topic) = (kafka.bootstrap_servers().to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer = reader(&servers);
        let mut records = Vec::new();
        for partition in 0..partitions(&consumer, &topic) {
            ::kafka::read_partition_to_end(&reader_config(&servers), &topic, partition, STALL, |message| {
                records.push(ReadRecord::from_message(message));
            })
            .unwrap_or_else(|e| panic!("{e} ({servers})"));
        }
        records
    })
    .await
    .expect("the read does not panic")
}

/// Each partition's end (high watermark) of `topic`. Blocking.
pub fn end_offsets(kafka: &(impl Bootstrap + ?Sized), topic: &str) -> BTreeMap<i32, i64> {
    let consumer = reader(kafka.bootstrap_servers());
    (0..partitions(&consumer, topic))
        .map(|partition| {
            let (_, end) = consumer
                .fetch_watermarks(topic, partition, REQUEST_TIMEOUT)
                .unwrap_or_else(|e| panic!("the end of {topic} partition {partition}: {e}"));
            (partition, end)
        })
        .collect()
}

/// The offsets `group` has committed for `topic`'s partitions `0..partitions` (a partition
/// without one is absent), asked of the group coordinator without joining the group.
/// Blocking.
pub fn committed_offsets(
    kafka: &(impl Bootstrap + ?Sized),
    group: &str,
    topic: &str,
    partitions: i32,
) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("group.id", group)
        .create()
        .unwrap_or_else(|e| panic!("a consumer for {}: {e}", kafka.bootstrap_servers()));
    let mut wanted = rdkafka::TopicPartitionList::new();
    for partition in 0..partitions {
        wanted.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(wanted, REQUEST_TIMEOUT)
        .unwrap_or_else(|e| panic!("{group}'s committed offsets on {topic}: {e}"));
    committed
        .elements()
        .iter()
        .filter_map(|element| match element.offset() {
            rdkafka::Offset::Offset(offset) => Some((element.partition(), offset)),
            _ => None,
        })
        .collect()
}

/// A consumer that reads by assignment and commits nothing.
fn reader_config(servers: &str) -> rdkafka::ClientConfig {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", "vigil-test-reader") // required by librdkafka; nothing is committed
        .set("enable.auto.commit", "false")
        .clone()
}

fn reader(servers: &str) -> BaseConsumer {
    reader_config(servers).create().unwrap_or_else(|e| panic!("a consumer for {servers}: {e}"))
}

fn partitions(consumer: &BaseConsumer, topic: &str) -> i32 {
    let count =
        ::kafka::partitions_of(consumer.client(), topic).unwrap_or_else(|e| panic!("the partitions of {topic}: {e}"));
    i32::try_from(count).expect("a partition count fits an i32")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_produced_are_read_back_to_the_end_with_their_offsets() {
        let kafka = KafkaCluster::start(1).unwrap();
        kafka.create_topic("things", 2).unwrap();
        let payloads: Vec<(i32, String)> = (0..10).map(|i| (i % 2, format!("thing {i}"))).collect();
        let records = payloads
            .iter()
            .map(|(partition, payload)| {
                FutureRecord::<str, str>::to("things").partition(*partition).key("k").payload(payload.as_str())
            })
            .collect();
        produce(&producer(&kafka), records).await;

        let read = read_to_end(&kafka, "things").await;
        let seen: Vec<(i32, i64, &[u8])> = read.iter().map(|r| (r.partition, r.offset, r.payload.as_slice())).collect();
        let expected: Vec<(i32, i64, &[u8])> = [0, 1]
            .into_iter()
            .flat_map(|partition| {
                payloads
                    .iter()
                    .filter(move |(p, _)| *p == partition)
                    .enumerate()
                    .map(move |(offset, (_, payload))| (partition, offset as i64, payload.as_bytes()))
            })
            .collect();
        assert_eq!(seen, expected);
        assert_eq!(end_offsets(&kafka, "things"), BTreeMap::from([(0, 5), (1, 5)]));
        assert_eq!(read_topic(&kafka, "things", Duration::from_secs(30), |r| r.len() >= 10).await, read);
        assert!(read_to_end(&kafka, "no-such-topic").await.is_empty());
        assert_eq!(committed_offsets(&kafka, "nobody", "things", 2), BTreeMap::new());
    }
}
