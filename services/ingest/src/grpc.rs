//! `vigil.ingest.v1.IngestService`: readings pushed over gRPC by gateways and backends.
//! A response means Kafka confirmed every reading of the call; an invalid reading fails
//! the call with INVALID_ARGUMENT naming it before anything of that request is written.

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use proto::vigil::ingest::v1::ingest_service_server::IngestService;
use proto::vigil::ingest::v1::{PublishRequest, PublishResponse};
use sensor::EventTimeBounds;
use tonic::{Request, Response, Status, Streaming};

use crate::batch::{self, Delivery};
use crate::kafka::{Sink, SinkError};
use crate::metrics::Metrics;

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

    /// Validates every reading, or names the first invalid one (see [`batch::check`]).
    fn check(&self, request: &mut PublishRequest, context: &str) -> Result<(), Status> {
        batch::check(&mut request.readings, &self.event_time).map_err(|refused| {
            self.metrics.grpc_refused.with_label_values(&[refused.invalid.reason()]).inc();
            Status::invalid_argument(refused.describe(context))
        })
    }

    fn send_all(&self, request: &PublishRequest, pending: &mut FuturesUnordered<Delivery>) {
        batch::send_all(&self.sink, &self.topic, &request.readings, &self.metrics, "grpc", pending);
    }
}

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
