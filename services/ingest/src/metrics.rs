//! Every Prometheus metric ingest exports, declared in one place.

use admin::metrics::MetricsRegistrar;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, Registry};

#[derive(Debug, Clone)]
pub struct Metrics {
    /// Messages taken in, by source (`mqtt`, `grpc`, `http`).
    pub received: IntCounterVec,
    /// Records Kafka confirmed, by topic as configured (a templated topic's template, so
    /// devices choosing MQTT topics cannot add series).
    pub produced: IntCounterVec,
    /// Dead letters Kafka confirmed, by reason.
    pub dead_lettered: IntCounterVec,
    /// gRPC requests refused with INVALID_ARGUMENT, by the first invalid reading's reason
    /// (a fixed set: `missing_field`, `out_of_range`, `too_long`, `implausible_event_time`...).
    pub grpc_refused: IntCounterVec,
    /// HTTP requests refused, by reason: the first invalid reading's (as for gRPC), or
    /// `unauthorized`, `unsupported_media_type`, `not_json`, `not_protobuf`,
    /// `too_many_readings`, `kafka_unavailable`. (A body over the size limit is refused
    /// with 413 before the handler and not counted here.)
    pub http_refused: IntCounterVec,
    /// Sends retried after a Kafka error.
    pub produce_retries: IntCounter,
    /// MQTT PUBACKs (and QoS 2 PUBRECs) sent after Kafka confirmed: to the broker by the
    /// bridge, to devices by the proxy.
    pub mqtt_acked: IntCounter,
    /// Acks not sent because their connection was lost (the broker resends the message).
    pub mqtt_stale_acks: IntCounter,
    /// Messages read and not yet confirmed by Kafka.
    pub in_flight: IntGauge,
    /// The bridge's MQTT sessions connected and subscribed (`mqtt.connections` when all are).
    pub mqtt_connected: IntGauge,
    pub mqtt_connection_errors: IntCounter,
    /// Connections broken by a message over `mqtt.max_packet_bytes` (each such message is
    /// then read once more, with a raised limit, and dead-lettered).
    pub mqtt_oversized: IntCounter,
    /// From handing a record to the producer to Kafka's confirmation.
    pub produce_latency: Histogram,
    /// MQTT proxy: device connections open.
    pub proxy_connections: IntGauge,
    /// MQTT proxy: connections refused before or at CONNECT, by reason (a fixed set:
    /// `connection_limit`, `connect_timeout`, `tls_handshake`, `bad_credentials`, `not_authorized`,
    /// `bad_client_id`, `unsupported_protocol`, `packet_too_large`, `malformed`, `closed`).
    pub proxy_connects_refused: IntCounterVec,
    /// MQTT proxy: connections ended, by reason (`client_disconnect`, `closed`,
    /// `io_error`, `write_timeout`, or the DISCONNECT reason the server gave: `malformed`,
    /// `protocol_error`, `keep_alive_timeout`, `packet_too_large`, `not_authorized`...).
    pub proxy_disconnects: IntCounterVec,
    /// MQTT proxy: PUBLISHes refused (`not_authorized`: the ACL) and SUBSCRIBEs refused
    /// (`subscribe`).
    pub proxy_publishes_refused: IntCounterVec,
    /// MQTT proxy: from reading a PUBLISH to its PUBACK (after Kafka confirmed it).
    pub proxy_ack_latency: Histogram,
}

impl Metrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = MetricsRegistrar::new(registry);
        Ok(Self {
            received: metrics.counter_vec(
                "ingest_messages_received_total",
                "Messages taken in, by source",
                &["source"],
            )?,
            produced: metrics.counter_vec(
                "ingest_records_produced_total",
                "Records Kafka confirmed, by topic as configured (templates unexpanded)",
                &["topic"],
            )?,
            dead_lettered: metrics.counter_vec(
                "ingest_dead_lettered_total",
                "Messages written to the dead-letter topic, by reason",
                &["reason"],
            )?,
            grpc_refused: metrics.counter_vec(
                "ingest_grpc_requests_refused_total",
                "gRPC requests refused with INVALID_ARGUMENT, by the first invalid reading's reason",
                &["reason"],
            )?,
            http_refused: metrics.counter_vec(
                "ingest_http_requests_refused_total",
                "HTTP ingest requests refused, by reason",
                &["reason"],
            )?,
            produce_retries: metrics.counter("ingest_produce_retries_total", "Sends retried after a Kafka error")?,
            mqtt_acked: metrics
                .counter("ingest_mqtt_acked_total", "MQTT PUBACKs sent after Kafka confirmed the write")?,
            mqtt_stale_acks: metrics.counter(
                "ingest_mqtt_stale_acks_dropped_total",
                "Acks not sent because the connection their message came on was lost",
            )?,
            in_flight: metrics.gauge("ingest_in_flight", "Messages read and not yet confirmed by Kafka")?,
            mqtt_connected: metrics
                .gauge("ingest_mqtt_connected", "The bridge's MQTT sessions connected and subscribed")?,
            mqtt_connection_errors: metrics
                .counter("ingest_mqtt_connection_errors_total", "MQTT connections that failed or dropped")?,
            mqtt_oversized: metrics.counter(
                "ingest_mqtt_oversized_packets_total",
                "MQTT connections broken by a message over mqtt.max_packet_bytes",
            )?,
            produce_latency: metrics.histogram(
                "ingest_produce_latency_seconds",
                "From handing a record to the producer to Kafka's confirmation",
                prometheus::exponential_buckets(0.0005, 2.0, 16)?,
            )?,
            proxy_connections: metrics.gauge("ingest_proxy_connections", "MQTT proxy: device connections open")?,
            proxy_connects_refused: metrics.counter_vec(
                "ingest_proxy_connects_refused_total",
                "MQTT proxy: connections refused before or at CONNECT, by reason",
                &["reason"],
            )?,
            proxy_disconnects: metrics.counter_vec(
                "ingest_proxy_disconnects_total",
                "MQTT proxy: connections ended, by reason",
                &["reason"],
            )?,
            proxy_publishes_refused: metrics.counter_vec(
                "ingest_proxy_refused_total",
                "MQTT proxy: PUBLISHes (ACL) and SUBSCRIBEs refused, by reason",
                &["reason"],
            )?,
            proxy_ack_latency: metrics.histogram(
                "ingest_proxy_ack_latency_seconds",
                "MQTT proxy: from reading a PUBLISH to its acknowledgement, sent after Kafka confirmed it",
                prometheus::exponential_buckets(0.0005, 2.0, 16)?,
            )?,
        })
    }
}
