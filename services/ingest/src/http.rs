//! HTTP ingest, `POST /v1/readings`, for devices and gateways that speak HTTP rather than
//! MQTT (the REST-proxy way into Kafka). The body is one reading or an array of them in
//! the JSON that the MQTT path accepts (`Content-Type: application/json`), or a protobuf
//! `vigil.ingest.v1.PublishRequest` (`application/x-protobuf`). Like the gRPC API it takes a
//! request all or nothing ([`crate::batch`]): 200 `{"accepted": n}` once Kafka confirmed
//! every reading; 400 naming the first invalid reading's index and field, with nothing of
//! the request written; 503 when Kafka cannot take them.
//!
//! What a request can make the process allocate is bounded before it is allocated: the
//! body is refused (413) past `http.max_body_bytes`, and the readings are counted on the
//! raw body (JSON array elements, protobuf field tags) and refused (413) past
//! `http.max_readings_per_request` before any is decoded into a reading, so a body of
//! empty readings cannot turn 1 MiB into a hundred times that in structs; and at most
//! `http.max_concurrent_requests` are handled at once.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use prost::Message as _;
use proto::vigil::ingest::v1::PublishRequest;
use sensor::json::Envelope;
use sensor::{EventTimeBounds, SensorReading};
use serde_json::json;

use crate::batch;
use crate::kafka::Sink;
use crate::metrics::Metrics;

pub const PATH: &str = "/v1/readings";
const PROTOBUF: &str = "application/x-protobuf";

/// What the endpoint needs; one per server.
pub struct HttpIngest {
    pub sink: Sink,
    pub topic: String,
    pub metrics: Metrics,
    pub event_time: EventTimeBounds,
    pub max_readings: usize,
    /// The bearer token requests must present, if one is configured.
    pub token: Option<admin::token::Token>,
}

/// The routes, with the body limit applied before any handler reads a byte
/// ([`admin::body_limit`]: refused past it with a 413 the client reads, counted as
/// `body_too_large`), and at most `max_concurrent` requests handled at once (the others
/// wait, their bodies unread).
pub fn router(ingest: Arc<HttpIngest>, max_body_bytes: usize, max_concurrent: usize) -> Router {
    let limit = admin::body_limit::BodyLimit {
        max_bytes: max_body_bytes,
        setting: "http.max_body_bytes",
        refused: Some(ingest.metrics.http_refused.with_label_values(&["body_too_large"])),
    };
    limit
        .apply(Router::new().route(PATH, post(publish)))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(max_concurrent))
        .with_state(ingest)
}

/// A refusal: its status, the metric reason (a fixed set: an invalid reading's reason, or
/// `body_too_large` (counted by the body limit), `unauthorized`, `unsupported_media_type`,
/// `not_json`, `not_protobuf`, `too_many_readings`, `kafka_unavailable`) and the message the
/// client reads.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    reason: &'static str,
    message: String,
    /// The first invalid reading's position and field, for a 400 on a reading.
    index: Option<usize>,
    field: Option<String>,
}

impl Refusal {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self { status, reason, message: message.into(), index: None, field: None }
    }

    /// A 400 naming the invalid reading, its index and field.
    fn invalid(refused: &batch::Refused) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            reason: refused.invalid.reason(),
            message: refused.describe(""),
            index: Some(refused.index),
            field: refused.invalid.field().map(str::to_owned),
        }
    }
}

async fn publish(State(ingest): State<Arc<HttpIngest>>, headers: HeaderMap, body: Bytes) -> Response {
    match take(&ingest, &headers, &body).await {
        Ok(accepted) => (StatusCode::OK, axum::Json(json!({ "accepted": accepted }))).into_response(),
        Err(refusal) => {
            ingest.metrics.http_refused.with_label_values(&[refusal.reason]).inc();
            let mut answer = json!({ "error": refusal.message });
            if let Some(index) = refusal.index {
                answer["index"] = json!(index);
            }
            if let Some(field) = refusal.field {
                answer["field"] = json!(field);
            }
            let mut response = (refusal.status, axum::Json(answer)).into_response();
            if refusal.status == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            }
            response
        }
    }
}

/// Checks the credentials, decodes, checks every reading, writes them and waits for Kafka.
async fn take(ingest: &HttpIngest, headers: &HeaderMap, body: &[u8]) -> Result<usize, Refusal> {
    if let Some(token) = &ingest.token {
        let offered = headers.get(header::AUTHORIZATION).and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        match offered {
            Some(offered) if token.matches(offered) => {}
            Some(_) => return Err(Refusal::new(StatusCode::UNAUTHORIZED, "unauthorized", "the bearer token is wrong")),
            None => {
                return Err(Refusal::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "this endpoint needs `Authorization: Bearer <token>`",
                ));
            }
        }
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media_type = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let mut readings = match media_type.as_str() {
        "application/json" => from_json(body, ingest.max_readings)?,
        PROTOBUF => from_protobuf(body, ingest.max_readings)?,
        _ => {
            return Err(Refusal::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("Content-Type must be application/json or {PROTOBUF}, not {content_type:?}"),
            ));
        }
    };
    batch::check(&mut readings, &ingest.event_time).map_err(|refused| Refusal::invalid(&refused))?;
    batch::send_and_confirm(&ingest.sink, &ingest.topic, &readings, &ingest.metrics, "http")
        .await
        .map_err(|error| Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "kafka_unavailable", error.to_string()))?;
    Ok(readings.len())
}

fn too_many(max: usize) -> Refusal {
    Refusal::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_many_readings",
        format!("a request carries at most {max} readings (http.max_readings_per_request)"),
    )
}

/// One JSON reading, or an array of them, each parsed as the MQTT path parses a payload.
fn from_json(body: &[u8], max: usize) -> Result<Vec<SensorReading>, Refusal> {
    let not_json = |error: serde_json::Error| {
        Refusal::new(StatusCode::BAD_REQUEST, "not_json", format!("the body is not a JSON reading or array: {error}"))
    };
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let raw: Vec<&serde_json::value::RawValue> = if first == Some(&b'[') {
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        let raw = serde::Deserializer::deserialize_seq(&mut deserializer, BoundedArray(max))
            .map_err(|error| if error.to_string().starts_with(TOO_MANY) { too_many(max) } else { not_json(error) })?;
        deserializer.end().map_err(not_json)?;
        raw
    } else {
        vec![serde_json::from_slice(body).map_err(not_json)?]
    };
    let envelope = Envelope { topic_device_id: None, received_at: SystemTime::now() };
    raw.iter()
        .enumerate()
        .map(|(index, raw)| {
            sensor::json::parse(raw.get().as_bytes(), &envelope)
                .map_err(|invalid| Refusal::invalid(&batch::Refused { index, invalid }))
        })
        .collect()
}

const TOO_MANY: &str = "too many readings";

/// A JSON array's elements as raw slices of the body, refused once there are more than the
/// bound (before the vector grows past it).
struct BoundedArray(usize);

impl<'de> serde::de::Visitor<'de> for BoundedArray {
    type Value = Vec<&'de serde_json::value::RawValue>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("an array of readings")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut elements = Vec::new();
        while let Some(element) = seq.next_element()? {
            if elements.len() == self.0 {
                return Err(serde::de::Error::custom(TOO_MANY));
            }
            elements.push(element);
        }
        Ok(elements)
    }
}

/// A protobuf `PublishRequest`, its readings counted on the wire before it is decoded.
fn from_protobuf(body: &[u8], max: usize) -> Result<Vec<SensorReading>, Refusal> {
    let malformed = |error: prost::DecodeError| {
        Refusal::new(StatusCode::BAD_REQUEST, "not_protobuf", format!("the body is not a PublishRequest: {error}"))
    };
    if count_top_level_fields(body, 1).map_err(malformed)? > max {
        return Err(too_many(max));
    }
    Ok(PublishRequest::decode(body).map_err(malformed)?.readings)
}

/// How many times field `number` occurs at the top level of a protobuf message, walking
/// the tags and skipping the values without decoding them.
fn count_top_level_fields(mut body: &[u8], number: u32) -> Result<usize, prost::DecodeError> {
    use prost::encoding::{DecodeContext, decode_key, skip_field};
    let mut count = 0;
    while !body.is_empty() {
        let (tag, wire_type) = decode_key(&mut body)?;
        if tag == number {
            count += 1;
        }
        skip_field(wire_type, tag, &mut body, DecodeContext::default())?;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_counted_on_the_wire_before_decoding() {
        let request = PublishRequest { readings: vec![SensorReading::default(); 5] };
        let bytes = request.encode_to_vec();
        assert_eq!(count_top_level_fields(&bytes, 1).unwrap(), 5);
        assert_eq!(from_protobuf(&bytes, 4).err().unwrap().status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(from_protobuf(&bytes, 5).unwrap().len(), 5);
        assert_eq!(from_protobuf(&[0xff, 0xff], 5).err().unwrap().reason, "not_protobuf");
    }

    #[test]
    fn a_json_array_past_the_bound_is_refused_and_garbage_is_named() {
        let one = r#"{"device_id": "car-1", "speed": 10}"#;
        let three = format!("[{one}, {one}, {one}]");
        assert_eq!(from_json(three.as_bytes(), 2).err().unwrap().status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(from_json(b"[1, 2", 2).err().unwrap().reason, "not_json");
        assert_eq!(from_json(b"[] []", 2).err().unwrap().reason, "not_json", "trailing data");
        assert_eq!(from_json(b"[]", 2).unwrap().len(), 0);
    }
}
