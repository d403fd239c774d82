//! Headers a dead letter carries, so a reader of any dead-letter topic finds why the record
//! landed there under the same names whichever service wrote it.

/// Why, from a fixed set per service (a metric label too): `invalid-json`, `model-rejected`...
pub const DEAD_LETTER_REASON: &str = "vigil.dead_letter.reason";
/// The error's text, for a person.
pub const DEAD_LETTER_ERROR: &str = "vigil.dead_letter.error";
/// The field at fault, when one is.
pub const DEAD_LETTER_FIELD: &str = "vigil.dead_letter.field";
/// A dead letter that Kafka refused even as such (too large) goes without its payload;
/// this says how many bytes it had.
pub const DEAD_LETTER_PAYLOAD_BYTES: &str = "vigil.dead_letter.payload_bytes";
/// Where the record was read from, when it came from Kafka: topic, partition and offset
/// (decimal text), so it can be found again or replayed.
pub const DEAD_LETTER_SOURCE_TOPIC: &str = "vigil.dead_letter.source_topic";
pub const DEAD_LETTER_SOURCE_PARTITION: &str = "vigil.dead_letter.source_partition";
pub const DEAD_LETTER_SOURCE_OFFSET: &str = "vigil.dead_letter.source_offset";
/// A record Kafka refused for good, dead-lettered instead: the topic it was written for.
pub const DEAD_LETTER_TARGET_TOPIC: &str = "vigil.dead_letter.target_topic";
