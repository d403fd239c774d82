//! How a service joins its consumer group so that a crash or a rolling update costs seconds,
//! not the minute and more librdkafka's defaults cost (a killed member keeps its partitions
//! for its whole 45 s session; every rebalance stops every partition):
//!
//! - **static membership** (KIP-345, `group.instance.id`): a member restarted with the same
//!   id takes its partitions back at once instead of waiting out its predecessor's session.
//!   The id defaults to the host name, which is the pod name in Kubernetes, so a container
//!   restarted in its pod (or a process restarted on its host) is the same member. Two live
//!   members with one id fence each other: the older one stops with a fatal error
//!   ([`fatal_reason`] says which setting to change).
//! - **short sessions** ([`FAST_FAILOVER`]): a member that dies for good (its pod deleted)
//!   is noticed after 6 s, the least Apache Kafka accepts by default; librdkafka heartbeats
//!   from its own thread, so a busy service does not miss them.
//! - **leaving on a graceful stop** ([`leave`]): a static member that just closes stays in
//!   the group until its session ends (KIP-345), which in a rolling update, where the
//!   replacement has another name, stops its partitions for that long; one that
//!   unsubscribes first hands them over at once.
//! - **cooperative rebalancing** (`cooperative-sticky`): a rebalance moves only the
//!   partitions that change owner; the others keep flowing.
//!
//! Measured on tansu 0.6 (docs/failure-model.md): it honours `group.instance.id`; its first
//! assignment of a group takes about the session timeout with static members and half of
//! it without.

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::client::{Client, ClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext};
use rdkafka::types::RDKafkaErrorCode;

/// Consumer settings for fast failure detection and cooperative rebalances, applied before
/// the user's tables (which may change them).
pub const FAST_FAILOVER: &[(&str, &str)] = &[
    ("session.timeout.ms", "6000"),
    ("heartbeat.interval.ms", "500"),
    ("partition.assignment.strategy", "cooperative-sticky"),
];

/// What a consumer service's `/ready` says between subscribing and the group's first
/// assignment (a replica the group gives no partition is ready once it has answered).
pub const NO_PARTITIONS_YET: &str = "not ready: no partitions yet (waiting for the consumer group to assign them)";

/// This host's name: `$HOSTNAME`, else the kernel's (a container's is its pod's name).
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|host| host.trim().to_owned())
        .filter(|host| !host.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The `group.instance.id` a service uses: `configured` when given, else the host name;
/// `None` when static membership is off.
pub fn instance_id(static_membership: bool, configured: &str) -> Option<String> {
    static_membership.then(|| if configured.is_empty() { host_name() } else { configured.to_owned() })
}

/// Sets the group and, for a static member, its instance id.
pub fn join(config: &mut ClientConfig, group_id: &str, instance_id: Option<&str>) {
    config.set("group.id", group_id);
    if let Some(id) = instance_id {
        config.set("group.instance.id", id);
    }
}

/// Leaves the group before the consumer is closed, so its partitions go to the other
/// members at once (a static member that only closes keeps them until its session ends):
/// unsubscribes, then polls (running the revoke callback; records polled now are dropped
/// unprocessed, their offsets not stored) until the assignment is empty, at most `within`.
pub fn leave<C: ConsumerContext>(consumer: &BaseConsumer<C>, within: Duration) {
    consumer.unsubscribe();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let _ = consumer.poll(Duration::from_millis(20));
        if consumer.assignment().map(|a| a.count() == 0).unwrap_or(true) {
            break;
        }
    }
    // librdkafka sends the LeaveGroup once the revoke is done; a few more polls let it go.
    for _ in 0..5 {
        let _ = consumer.poll(Duration::from_millis(20));
    }
}

/// Why the consumer cannot go on, once librdkafka has raised a fatal error: for a static
/// member fenced by another with its id, which setting tells them apart.
pub fn fatal_reason<C: ClientContext>(client: &Client<C>, instance_id: Option<&str>) -> Option<String> {
    let (code, text) = client.fatal_error()?;
    Some(match (code, instance_id) {
        (RDKafkaErrorCode::FencedInstanceId, Some(id)) => format!(
            "another consumer joined the group as group.instance.id {id:?} and fenced this one ({text}); \
             give every instance its own group_instance_id (it defaults to the host name), or set \
             static_membership = false"
        ),
        _ => format!("the Kafka consumer failed for good: {text}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_instance_id_is_the_configured_one_else_the_host_name_and_none_without_static_membership() {
        assert_eq!(instance_id(true, "processor-0"), Some("processor-0".to_owned()));
        assert_eq!(instance_id(true, ""), Some(host_name()));
        assert!(!host_name().is_empty());
        assert_eq!(instance_id(false, "processor-0"), None);
    }

    #[test]
    fn a_static_member_gets_its_instance_id_and_a_dynamic_one_none() {
        let mut config = ClientConfig::new();
        join(&mut config, "g", Some("pod-1"));
        assert_eq!((config.get("group.id"), config.get("group.instance.id")), (Some("g"), Some("pod-1")));
        let mut config = ClientConfig::new();
        join(&mut config, "g", None);
        assert_eq!(config.get("group.instance.id"), None);
    }
}
