//! The Kafka a benchmark runs against: librdkafka's mock cluster in this process by
//! default, or an external broker named by `VIGIL_BENCH_KAFKA` (host:port) with
//! `VIGIL_BENCH_KAFKA_NAME` for the results. The scripts in `benchmarks/` start tansu for
//! the external case, so a ratio is not charged with an in-process broker's CPU.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

use crate::{BrokerError, KafkaCluster};

pub enum KafkaUnderTest {
    Mock(KafkaCluster),
    /// Bootstrap servers, and a name for the results.
    External {
        servers: String,
        name: String,
    },
}

impl KafkaUnderTest {
    /// The external broker from the environment, else a mock cluster of 3 brokers.
    pub fn from_env() -> Result<Self, BrokerError> {
        match std::env::var("VIGIL_BENCH_KAFKA") {
            Ok(servers) => Ok(Self::External {
                servers,
                name: std::env::var("VIGIL_BENCH_KAFKA_NAME").unwrap_or_else(|_| "external broker".to_owned()),
            }),
            Err(_) => KafkaCluster::start(3).map(Self::Mock),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Mock(_) => "librdkafka mock cluster (in process)",
            Self::External { name, .. } => name,
        }
    }

    pub fn bootstrap_servers(&self) -> &str {
        match self {
            Self::Mock(cluster) => cluster.bootstrap_servers(),
            Self::External { servers, .. } => servers,
        }
    }

    /// Creates `name` with `partitions` partitions (replication factor 1); on an external
    /// broker a topic that already exists is an error, so give each run its own names.
    pub async fn create_topic(&self, name: &str, partitions: i32) -> Result<(), BrokerError> {
        match self {
            Self::Mock(cluster) => cluster.create_topic(name, partitions),
            Self::External { servers, .. } => {
                let failed = |e: String| BrokerError::Kafka(format!("creating {name} on {servers}: {e}"));
                let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
                    .set("bootstrap.servers", servers)
                    .create()
                    .map_err(|e| failed(e.to_string()))?;
                let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
                let results =
                    admin.create_topics([&topic], &AdminOptions::new()).await.map_err(|e| failed(e.to_string()))?;
                for result in results {
                    result.map_err(|(_, code)| failed(code.to_string()))?;
                }
                Ok(())
            }
        }
    }
}
