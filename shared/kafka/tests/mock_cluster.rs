//! The plumbing against librdkafka's mock cluster (a real Kafka protocol peer in-process):
//! an existing topic is found and left as it is (the mock does not answer CreateTopics, so
//! creation is not exercised here), records sent through `send_waiting` are read back to
//! the partition's end in order, and an empty partition ends at once.

use std::time::Duration;

use embedded_brokers::KafkaCluster;
use kafka::{TopicSpec, ensure_topic, read_partition_to_end, send_waiting};
use rdkafka::ClientConfig;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};

fn config(cluster: &KafkaCluster) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", cluster.bootstrap_servers());
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_topic_is_found_and_a_partition_is_read_back_to_its_end() {
    let cluster = KafkaCluster::start(1).unwrap();
    cluster.create_topic("state", 3).unwrap();
    let config = config(&cluster);
    let found = ensure_topic(&config, "state", TopicSpec { partitions: 7, compacted: true }).await.unwrap();
    assert_eq!((found.partitions, found.created), (3, false), "an existing topic is left as it is");

    let producer: FutureProducer = config.clone().set("linger.ms", "0").create().unwrap();
    for i in 0..5 {
        let payload = format!("record {i}");
        let delivery =
            send_waiting(&producer, FutureRecord::to("state").key("k").payload(&payload).partition(1)).await.unwrap();
        delivery.await.unwrap().unwrap();
    }

    let reader = config.clone().set("group.id", "reader").clone();
    let mut read = Vec::new();
    let end = tokio::task::spawn_blocking(move || {
        let end = read_partition_to_end(&reader, "state", 1, Duration::from_secs(10), |message| {
            read.push(String::from_utf8(message.payload().unwrap().to_vec()).unwrap());
        });
        (end, read)
    })
    .await
    .unwrap();
    let (end, read) = end;
    assert_eq!(end.unwrap(), 5);
    assert_eq!(read, (0..5).map(|i| format!("record {i}")).collect::<Vec<_>>());

    let reader = config.clone().set("group.id", "reader").clone();
    let empty = tokio::task::spawn_blocking(move || {
        read_partition_to_end(&reader, "state", 0, Duration::from_secs(10), |_| panic!("partition 0 is empty"))
    })
    .await
    .unwrap();
    assert_eq!(empty.unwrap(), 0);
}
