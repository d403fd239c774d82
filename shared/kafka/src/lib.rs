//! Vigil's Kafka plumbing, in one place so that every service does these things the same way
//! (they had drifted while copied between the alerts service, the rollout log, the replay and
//! the processor):
//!
//! - [`config`]: a librdkafka config built from a service's defaults and the user's tables,
//!   and the guard against user properties a service sets itself;
//! - [`group`]: joining a consumer group so that a crash or a rolling update costs seconds;
//! - [`topics`]: how many partitions a topic has, and "create it if missing, then wait until
//!   its partitions appear";
//! - [`read`]: reading a partition from the beginning to its high watermark (state restore),
//!   and a record's timestamp;
//! - [`send`]: handing a record to a producer, waiting while its queue is full;
//! - [`refusal`]: whether Kafka refused a record for good (dead-letter it) or for now (retry);
//! - [`headers`]: the names of the headers a dead letter carries.
//!
//! What stays in the services: which topics, which defaults, and what a record means.

#![forbid(unsafe_code)]

pub mod config;
pub mod group;
pub mod headers;
pub mod read;
pub mod refusal;
pub mod send;
pub mod topics;

pub use config::{Properties, client_config, service_owned};
pub use read::{ReadError, read_partition_to_end, record_time};
pub use refusal::{is_permanent, refusal_reason};
pub use send::send_waiting;
pub use topics::{Ensured, TopicError, TopicSpec, ensure_topic, partitions_of};
