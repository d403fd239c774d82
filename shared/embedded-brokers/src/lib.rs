//! Brokers that run inside the process, on loopback, for tests and for the one-command
//! fleet's development default: nothing to install, real protocols on real sockets.
//!
//! [`MqttBroker`] is rumqttd with an MQTT 3.1.1 and an MQTT 5 listener. rumqttd binds its
//! own listeners from a configured address and cannot take a pre-bound socket or report
//! the port it chose for port 0, so [`MqttBroker::start`] asks the OS for a free loopback
//! port, hands it to rumqttd, and waits until the broker accepts connections there; if
//! another process took the port in between (rumqttd's bind fails), it tries a fresh one.
//!
//! [`KafkaCluster`] is librdkafka's mock cluster: the real Kafka wire protocol (produce,
//! idempotence, transactions, consumer groups, offset commits) served from memory. It is a
//! development and test default, not a Kafka: nothing is persisted and it is not tuned for
//! throughput. librdkafka's handle is not `Send`, so the cluster lives on its own thread
//! and is driven through a channel.
//!
//! [`Outage`] is a TCP relay that can cut its connections, to test reconnecting clients.
//!
//! [`KafkaUnderTest`] is what benchmarks run against: the mock cluster, or an external
//! broker named in the environment.

#![forbid(unsafe_code)]

mod outage;
mod under_test;
pub use outage::Outage;
pub use under_test::KafkaUnderTest;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use std::sync::mpsc;

use rdkafka::mocking::MockCluster;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("no free loopback port: {0}")]
    NoPort(std::io::Error),
    #[error("rumqttd did not start listening on {0} within 10 s ({1} attempts)")]
    NotListening(SocketAddr, usize),
    #[error("rumqttd: {0}")]
    Broker(String),
    #[error("kafka mock cluster: {0}")]
    Kafka(String),
}

/// An MQTT broker running on its own threads until the process exits (rumqttd has no
/// shutdown; tests and `vigil up` end with the process).
#[derive(Debug, Clone, Copy)]
pub struct MqttBroker {
    /// MQTT 3.1.1 listener.
    pub v4: SocketAddr,
    /// MQTT 5 listener.
    pub v5: SocketAddr,
}

/// Largest payload the broker accepts (rumqttd's sample config allows only 20 KiB).
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;

impl MqttBroker {
    pub fn start() -> Result<Self, BrokerError> {
        const ATTEMPTS: usize = 5;
        let mut last = None;
        for _ in 0..ATTEMPTS {
            let (v4, v5) = (free_port()?, free_port()?);
            let mut broker = Broker::new(config(v4, v5));
            std::thread::Builder::new()
                .name("mqtt-broker".into())
                // A failed start (the port was taken) shows below as "not listening".
                .spawn(move || drop(broker.start()))
                .map_err(|e| BrokerError::Broker(e.to_string()))?;
            if listening(v4) && listening(v5) {
                return Ok(Self { v4, v5 });
            }
            last = Some(v4);
        }
        Err(BrokerError::NotListening(last.expect("at least one attempt"), ATTEMPTS))
    }
}

fn free_port() -> Result<SocketAddr, BrokerError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|l| l.local_addr()).map_err(BrokerError::NoPort)
}

fn listening(addr: SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn config(v4: SocketAddr, v5: SocketAddr) -> Config {
    let server = |name: &str, listen| ServerSettings {
        name: name.into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: MAX_PAYLOAD_BYTES,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 20_000,
            max_outgoing_packet_count: 500,
            max_segment_size: 100 << 20,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_owned(), server("v4", v4))])),
        v5: Some(HashMap::from([("1".to_owned(), server("v5", v5))])),
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    }
}

/// librdkafka's mock Kafka cluster on loopback ports, stopped when dropped.
#[derive(Debug)]
pub struct KafkaCluster {
    bootstrap_servers: String,
    commands: mpsc::Sender<ClusterCommand>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum ClusterCommand {
    CreateTopic {
        name: String,
        partitions: i32,
        done: mpsc::Sender<Result<(), String>>,
    },
    /// The next requests of one kind fail with these errors, one each.
    RequestErrors {
        api: rdkafka::types::RDKafkaApiKey,
        errors: Vec<rdkafka::types::RDKafkaRespErr>,
        done: mpsc::Sender<Result<(), String>>,
    },
    /// All brokers down (`false`) or up (`true`).
    SetBrokersUp {
        up: bool,
        done: mpsc::Sender<Result<(), String>>,
    },
}

impl KafkaCluster {
    /// Starts a cluster of `brokers` brokers.
    pub fn start(brokers: i32) -> Result<Self, BrokerError> {
        let (commands, inbox) = mpsc::channel::<ClusterCommand>();
        let (started, bootstrap) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("kafka-mock".into())
            .spawn(move || {
                let cluster = match MockCluster::new(brokers) {
                    Ok(cluster) => cluster,
                    Err(error) => {
                        let _ = started.send(Err(error.to_string()));
                        return;
                    }
                };
                let _ = started.send(Ok(cluster.bootstrap_servers()));
                // Until every sender is gone (the KafkaCluster was dropped).
                for command in inbox {
                    match command {
                        ClusterCommand::CreateTopic { name, partitions, done } => {
                            let _ = done.send(cluster.create_topic(&name, partitions, 1).map_err(|e| e.to_string()));
                        }
                        ClusterCommand::RequestErrors { api, errors, done } => {
                            cluster.request_errors(api, &errors);
                            let _ = done.send(Ok(()));
                        }
                        ClusterCommand::SetBrokersUp { up, done } => {
                            let result = if up { cluster.broker_up(-1) } else { cluster.broker_down(-1) };
                            let _ = done.send(result.map_err(|e| e.to_string()));
                        }
                    }
                }
            })
            .map_err(|e| BrokerError::Kafka(e.to_string()))?;
        let bootstrap_servers = bootstrap
            .recv()
            .map_err(|_| BrokerError::Kafka("the cluster thread ended before starting".into()))?
            .map_err(BrokerError::Kafka)?;
        Ok(Self { bootstrap_servers, commands, thread: Some(thread) })
    }

    /// The brokers' addresses, for `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// Creates `name` with `partitions` partitions (replication factor 1).
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), BrokerError> {
        self.call(|done| ClusterCommand::CreateTopic { name: name.to_owned(), partitions, done })
    }

    /// Takes every broker down: connections are refused until [`Self::brokers_up`].
    pub fn brokers_down(&self) -> Result<(), BrokerError> {
        self.call(|done| ClusterCommand::SetBrokersUp { up: false, done })
    }

    pub fn brokers_up(&self) -> Result<(), BrokerError> {
        self.call(|done| ClusterCommand::SetBrokersUp { up: true, done })
    }

    /// Makes the next requests of kind `api` fail with `errors`, one error each.
    pub fn request_errors(
        &self,
        api: rdkafka::types::RDKafkaApiKey,
        errors: Vec<rdkafka::types::RDKafkaRespErr>,
    ) -> Result<(), BrokerError> {
        self.call(|done| ClusterCommand::RequestErrors { api, errors, done })
    }

    fn call(
        &self,
        command: impl FnOnce(mpsc::Sender<Result<(), String>>) -> ClusterCommand,
    ) -> Result<(), BrokerError> {
        let (done, result) = mpsc::channel();
        let gone = || BrokerError::Kafka("the cluster thread is gone".into());
        self.commands.send(command(done)).map_err(|_| gone())?;
        result.recv().map_err(|_| gone())?.map_err(BrokerError::Kafka)
    }
}

/// A record as read back from Kafka.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl ReadRecord {
    /// A consumed message, copied out of the consumer's buffer.
    pub fn from_message(message: &impl rdkafka::message::Message) -> Self {
        use rdkafka::message::Headers as _;
        Self {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers: message
                .headers()
                .map(|headers| {
                    headers
                        .iter()
                        .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec).unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }
}

/// Reads every partition of `topic` from the start (no consumer group) until `enough`
/// says the records so far suffice or `timeout` passes; returns them in partition and
/// offset order. For tests and tools that check what landed in Kafka.
pub fn read_topic(
    bootstrap_servers: &str,
    topic: &str,
    timeout: Duration,
    enough: impl Fn(&[ReadRecord]) -> bool,
) -> Result<Vec<ReadRecord>, BrokerError> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let kafka = |e: rdkafka::error::KafkaError| BrokerError::Kafka(format!("reading {topic}: {e}"));
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .set("group.id", "vigil-read-topic") // required by librdkafka; no offsets are committed
        .set("enable.auto.commit", "false")
        .create()
        .map_err(kafka)?;
    let deadline = Instant::now() + timeout;
    let metadata = loop {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)).map_err(kafka)?;
        let known = metadata.topics().first().is_some_and(|t| t.error().is_none() && !t.partitions().is_empty());
        if known || Instant::now() > deadline {
            break metadata;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut assignment = rdkafka::TopicPartitionList::new();
    for partition in metadata.topics().first().map(|t| t.partitions()).unwrap_or_default() {
        assignment.add_partition_offset(topic, partition.id(), rdkafka::Offset::Beginning).map_err(kafka)?;
    }
    consumer.assign(&assignment).map_err(kafka)?;
    let mut records = Vec::new();
    while !enough(&records) && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => records.push(ReadRecord::from_message(&message)),
            Some(Err(error)) => return Err(kafka(error)),
            None => {}
        }
    }
    records.sort_by_key(|r| (r.partition, r.offset));
    Ok(records)
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop; the cluster is destroyed there.
        let (closed, _) = mpsc::channel();
        self.commands = closed;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
