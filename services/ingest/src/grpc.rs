//! `vigil.ingest.v1.IngestService`: readings pushed over gRPC by gateways and backends.
//! A response means Kafka confirmed every reading of the call; an invalid reading fails
//! the call with INVALID_ARGUMENT naming it before anything of that request is written.

use std::time::SystemTime;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use proto::vigil::ingest::v1::ingest_service_server::IngestService;
use proto::vigil::ingest::v1::{PublishRequest, PublishResponse};
use sensor::EventTimeBounds;
use tonic::{Request, Response, Status, Streaming};

use crate::kafka::{Sink, SinkError, Written};
use crate::metrics::Metrics;
use crate::record::from_reading;
use crate::trace;

pub struct IngestGrpc {
    sink: Sink,
    topic: String,
    metrics: Metrics,
    /// Sends awaiting Kafka per streaming call, at most.
    max_in_flight: usize,
    event_time: EventTimeBounds,
}

impl IngestGrpc {
    pub fn new(sink: Sink, topic: String, metrics: Metrics, max_in_flight: usize, event_time: EventTimeBounds) -> Self {
        Self { sink, topic, metrics, max_in_flight, event_time }
    }

    /// Validates every reading (filling a missing event time with the arrival time, and
    /// refusing one too far from it), or names the first invalid one.
    fn check(&self, request: &mut PublishRequest, context: &str) -> Result<(), Status> {
        let now = SystemTime::now();
        for (index, reading) in request.readings.iter_mut().enumerate() {
            if reading.event_time.is_none() {
                reading.event_time = Some(now.into());
            }
            let checked =
                sensor::validate(reading).and_then(|()| self.event_time.check(reading.event_time.as_ref(), now));
            checked.map_err(|invalid| {
                self.metrics.grpc_refused.with_label_values(&[invalid.reason()]).inc();
                let field = invalid.field().map_or(String::new(), |f| format!(".{f}"));
                Status::invalid_argument(format!("{context}readings[{index}]{field}: {invalid}"))
            })?;
        }
        Ok(())
    }

    fn send_all(&self, request: &PublishRequest, pending: &mut FuturesUnordered<Delivery>) {
        self.metrics.received.with_label_values(&["grpc"]).inc_by(request.readings.len() as u64);
        for reading in &request.readings {
            let span = trace::grpc_reading(&reading.device_id);
            let mut record = from_reading(&self.topic, reading);
            trace::attach(&span, &mut record);
            let delivery = self.sink.send(record);
            pending.push(Box::pin(async move {
                let written = delivery.await;
                trace::written(&span, &written);
                written
            }));
        }
    }
}

type Delivery = std::pin::Pin<Box<dyn Future<Output = Result<Written, SinkError>> + Send>>;

fn unavailable(error: SinkError) -> Status {
    Status::unavailable(error.to_string())
}

#[tonic::async_trait]
impl IngestService for IngestGrpc {
    async fn publish(&self, request: Request<PublishRequest>) -> Result<Response<PublishResponse>, Status> {
        let mut request = request.into_inner();
        self.check(&mut request, "")?;
        let mut pending = FuturesUnordered::new();
        self.send_all(&request, &mut pending);
        while let Some(written) = pending.next().await {
            written.map_err(unavailable)?;
        }
        Ok(Response::new(PublishResponse { accepted: request.readings.len() as u64 }))
    }

    async fn publish_stream(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<PublishResponse>, Status> {
        let mut stream = request.into_inner();
        let mut pending = FuturesUnordered::new();
        let mut accepted = 0u64;
        let mut index = 0usize;
        let outcome = loop {
            let mut request = match stream.message().await {
                Ok(Some(request)) => request,
                Ok(None) => break Ok(()),
                Err(status) => break Err(status),
            };
            if let Err(status) = self.check(&mut request, &format!("request {index}: ")) {
                break Err(status);
            }
            index += 1;
            accepted += request.readings.len() as u64;
            self.send_all(&request, &mut pending);
            // Bounded: wait for Kafka before reading further.
            while pending.len() > self.max_in_flight {
                if let Some(written) = pending.next().await {
                    written.map_err(unavailable)?;
                }
            }
        };
        // What was sent before an error is still confirmed before answering.
        while let Some(written) = pending.next().await {
            written.map_err(unavailable)?;
        }
        outcome?;
        Ok(Response::new(PublishResponse { accepted }))
    }
}
