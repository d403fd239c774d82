//! Topics a service needs: how many partitions one has, and "create it if missing, then
//! wait until its partitions appear" (a new topic's metadata reaches every broker a moment
//! after the create answers).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{Client, ClientContext, DefaultClientContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// How long a metadata request may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a created topic gets to show its partitions.
const APPEAR_WITHIN: Duration = Duration::from_secs(10);
const APPEAR_POLL: Duration = Duration::from_millis(200);

/// A topic to create when it is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicSpec {
    pub partitions: i32,
    /// `cleanup.policy=compact`: state topics (changelogs, rollout state).
    pub compacted: bool,
}

/// What [`ensure_topic`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ensured {
    /// 0: still missing (the create was refused or has not shown yet); the caller decides
    /// whether it can go on (a producer may still auto-create it) or must stop.
    pub partitions: usize,
    /// Whether this call created it.
    pub created: bool,
}

/// Why a topic's state could not be learnt.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("{0}")]
    Kafka(#[from] KafkaError),
    #[error("the metadata request for topic {topic} did not finish: {reason}")]
    Metadata { topic: String, reason: String },
}

/// Partitions of `topic` as the cluster reports them; 0 when it does not exist. Blocks for
/// up to ten seconds (a metadata request). A client that may auto-create topics
/// (`allow.auto.create.topics`, on by default for producers) makes a broker that allows it
/// create `topic` by asking: pass a consumer's client, or one with it off.
pub fn partitions_of<C: ClientContext>(client: &Client<C>, topic: &str) -> Result<usize, KafkaError> {
    let metadata = client.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
    Ok(metadata.topics().first().filter(|t| t.error().is_none()).map_or(0, |t| t.partitions().len()))
}

/// Creates `topic` as `spec` says when it does not exist (the broker's default replication),
/// then waits up to ten seconds for its partitions to appear. A topic that exists is left
/// as it is, whatever its partitions. A refused create (no permission, say) is logged, not
/// returned: the caller sees `partitions: 0` and says what to do about it.
pub async fn ensure_topic(config: &ClientConfig, topic: &str, spec: TopicSpec) -> Result<Ensured, TopicError> {
    // A metadata request naming a missing topic makes a broker with auto-creation on create
    // it with its defaults (not compacted, its partition count): ask without that.
    let admin: Arc<AdminClient<DefaultClientContext>> =
        Arc::new(config.clone().set("allow.auto.create.topics", "false").create()?);
    let count = |admin: Arc<AdminClient<DefaultClientContext>>| {
        let name = topic.to_owned();
        async move {
            // A metadata request blocks: off the async workers.
            tokio::task::spawn_blocking(move || partitions_of(admin.inner(), &name))
                .await
                .map_err(|e| TopicError::Metadata { topic: topic.to_owned(), reason: e.to_string() })?
                .map_err(TopicError::from)
        }
    };
    let existing = count(admin.clone()).await?;
    if existing > 0 {
        return Ok(Ensured { partitions: existing, created: false });
    }
    let mut new = NewTopic::new(topic, spec.partitions.max(1), TopicReplication::Fixed(-1));
    if spec.compacted {
        new = new.set("cleanup.policy", "compact");
    }
    let options = AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT)).request_timeout(Some(METADATA_TIMEOUT));
    let mut created = false;
    match admin.create_topics([&new], &options).await {
        Ok(results) => {
            for result in results {
                match result {
                    Ok(_) => created = true,
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((_, code)) => tracing::warn!(topic, %code, "creating the topic was refused"),
                }
            }
        }
        Err(error) => tracing::warn!(topic, %error, "creating the topic failed"),
    }
    let deadline = Instant::now() + APPEAR_WITHIN;
    let mut partitions = count(admin.clone()).await?;
    while partitions == 0 && Instant::now() < deadline {
        tokio::time::sleep(APPEAR_POLL).await;
        partitions = count(admin.clone()).await?;
    }
    if created && partitions > 0 {
        tracing::info!(topic, partitions, compacted = spec.compacted, "created the topic");
    }
    Ok(Ensured { partitions, created })
}
