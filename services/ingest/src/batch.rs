//! Readings pushed through an API (gRPC `IngestService`, HTTP `POST /v1/readings`), taken
//! all or nothing: every reading of a request is checked before any is written, and the
//! request is answered only once Kafka confirmed each of them. Both APIs share this, so
//! they refuse the same readings with the same words.

use std::pin::Pin;
use std::time::SystemTime;

use futures::stream::FuturesUnordered;
use sensor::{EventTimeBounds, InvalidReading, SensorReading};

use crate::kafka::{Sink, SinkError, Written};
use crate::metrics::Metrics;
use crate::record::from_reading;
use crate::trace;

/// The first invalid reading of a request, and why.
#[derive(Debug)]
pub struct Refused {
    /// Its position in the request.
    pub index: usize,
    pub invalid: InvalidReading,
}

impl Refused {
    /// `readings[3].speed: ...`: the reading's index and field, then the reason.
    pub fn describe(&self, context: &str) -> String {
        let field = self.invalid.field().map_or(String::new(), |f| format!(".{f}"));
        format!("{context}readings[{}]{field}: {}", self.index, self.invalid)
    }
}

/// Checks every reading, filling a missing event time with the arrival time and refusing
/// one too far from it; names the first invalid one.
pub fn check(readings: &mut [SensorReading], event_time: &EventTimeBounds) -> Result<(), Refused> {
    let now = SystemTime::now();
    for (index, reading) in readings.iter_mut().enumerate() {
        if reading.event_time.is_none() {
            reading.event_time = Some(now.into());
        }
        let checked = sensor::validate(reading).and_then(|()| event_time.check(reading.event_time.as_ref(), now));
        if let Err(invalid) = checked {
            return Err(Refused { index, invalid });
        }
    }
    Ok(())
}

/// A reading handed to Kafka, until it is confirmed.
pub type Delivery = Pin<Box<dyn Future<Output = Result<Written, SinkError>> + Send>>;

/// Hands every reading (checked) to `sink` for `topic`, each with its span; their
/// confirmations go into `pending`. `source` names the API in `ingest_messages_received_total`.
pub fn send_all(
    sink: &Sink,
    topic: &str,
    readings: &[SensorReading],
    metrics: &Metrics,
    source: &'static str,
    pending: &mut FuturesUnordered<Delivery>,
) {
    metrics.received.with_label_values(&[source]).inc_by(readings.len() as u64);
    for reading in readings {
        let span = trace::api_reading(&reading.device_id);
        let mut record = from_reading(topic, reading);
        trace::attach(&span, &mut record);
        let delivery = sink.send(record);
        pending.push(Box::pin(async move {
            let written = delivery.await;
            trace::written(&span, &written);
            written
        }));
    }
}

/// Sends every reading and waits until Kafka confirmed them all.
pub async fn send_and_confirm(
    sink: &Sink,
    topic: &str,
    readings: &[SensorReading],
    metrics: &Metrics,
    source: &'static str,
) -> Result<(), SinkError> {
    use futures::StreamExt as _;
    let mut pending = FuturesUnordered::new();
    send_all(sink, topic, readings, metrics, source, &mut pending);
    while let Some(written) = pending.next().await {
        written?;
    }
    Ok(())
}
