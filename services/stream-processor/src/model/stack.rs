//! The tower stack every Predict call goes through:
//!
//! ```text
//!  call ─▶ ConcurrencyLimit ─▶ Retry (transient codes, retry budget, backoff)
//!       ─▶ Timeout (per attempt) ─▶ PredictionServiceClient
//!       ─▶ Buffer ─▶ p2c Balance (pending requests) ─▶ Eject ─▶ Channel per replica
//! ```

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use proto::tensorflow::serving::prediction_service_client::PredictionServiceClient;
use proto::tensorflow::serving::{PredictRequest, PredictResponse};
use tonic::Code;
use tower::retry::budget::{Budget as _, TpsBudget};
use tower::{BoxError, Service, ServiceBuilder};

use super::ROUTING_KEY_METADATA;
use crate::config::ModelConfig;
use crate::discovery;
use crate::metrics::Metrics;
use crate::trace;

/// One Predict call: the request plus the metadata it carries.
/// One Predict call: the request plus the metadata it carries.
#[derive(Debug, Clone)]
pub(super) struct Call {
    pub request: PredictRequest,
    /// The one reading's device id, sent as the call's routing key (a batched call sends
    /// one key per row in the request instead).
    pub routing_key: Option<String>,
    /// Readings in the call.
    pub rows: usize,
    /// The (first) reading's span: each attempt's span is its child.
    pub parent: telemetry::Context,
    /// The other readings' spans, which each attempt's span links to.
    pub batched: Vec<telemetry::Context>,
}

type HttpRequest = tonic::codegen::http::Request<tonic::body::Body>;
type HttpResponse = tonic::codegen::http::Response<tonic::body::Body>;
type Balance = tower::balance::p2c::Balance<discovery::ReplicaChanges, HttpRequest>;

/// The balanced replicas as one cloneable HTTP/2 service for the generated client.
#[derive(Clone)]
pub(super) struct Balanced(tower::buffer::Buffer<HttpRequest, <Balance as Service<HttpRequest>>::Future>);

impl Service<HttpRequest> for Balanced {
    type Response = HttpResponse;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: HttpRequest) -> Self::Future {
        Box::pin(self.0.call(request))
    }
}

/// The client at the bottom of the stack.
#[derive(Clone)]
pub(super) struct PredictCall {
    client: PredictionServiceClient<Balanced>,
}

impl Service<Call> for PredictCall {
    type Response = PredictResponse;
    type Error = tonic::Status;
    type Future = Pin<Box<dyn Future<Output = Result<PredictResponse, tonic::Status>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The client waits for the balancer inside the call (under the timeout).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let mut client = self.client.clone();
        Box::pin(async move {
            let span = trace::predict_call(&call.parent, call.routing_key.as_deref(), call.rows, &call.batched);
            let mut request = tonic::Request::new(call.request);
            if let Some(Ok(value)) = call.routing_key.as_deref().map(str::parse) {
                request.metadata_mut().insert(ROUTING_KEY_METADATA, value);
            }
            telemetry::context_into_metadata(&span, request.metadata_mut());
            let result = client.predict(request).await;
            trace::predict_done(&span, &result);
            result.map(tonic::Response::into_inner)
        })
    }
}

/// Retries transient failures while the shared budget allows, after a short backoff.
#[derive(Clone)]
pub(super) struct RetryTransient {
    budget: Arc<TpsBudget>,
    attempt: u32,
    backoff: Duration,
    retries: prometheus::IntCounter,
}

/// At most this many tries per call; the pipeline tries the reading again after that.
const ATTEMPTS_PER_CALL: u32 = 3;

impl tower::retry::Policy<Call, PredictResponse, BoxError> for RetryTransient {
    type Future = tokio::time::Sleep;

    fn retry(&mut self, _: &mut Call, result: &mut Result<PredictResponse, BoxError>) -> Option<Self::Future> {
        match result {
            Ok(_) => {
                self.budget.deposit();
                None
            }
            Err(error) => {
                if !retryable(error) || self.attempt + 1 >= ATTEMPTS_PER_CALL || !self.budget.withdraw() {
                    return None;
                }
                self.attempt += 1;
                self.retries.inc();
                Some(tokio::time::sleep(self.backoff * 2u32.pow(self.attempt - 1)))
            }
        }
    }

    fn clone_request(&mut self, call: &Call) -> Option<Call> {
        Some(call.clone())
    }
}

/// Codes worth another attempt right away: the server (or the path to it) was busy or
/// away, not wrong about the request.
fn retryable(error: &BoxError) -> bool {
    match error.downcast_ref::<tonic::Status>() {
        Some(status) => {
            matches!(
                status.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted
            )
        }
        // Timeouts, a closed buffer, connection failures.
        None => true,
    }
}

pub(super) type Stack =
    tower::limit::ConcurrencyLimit<tower::retry::Retry<RetryTransient, tower::timeout::Timeout<PredictCall>>>;

/// The stack over the discovered replicas, and a plain client over the same balancer
/// (for `GetModelMetadata`).
pub(super) fn build(
    config: &ModelConfig,
    changes: discovery::ReplicaChanges,
    metrics: &Metrics,
) -> (Stack, PredictionServiceClient<Balanced>) {
    let balance = tower::balance::p2c::Balance::new(changes);
    let balanced = Balanced(tower::buffer::Buffer::new(balance, config.concurrency_limit.max(16)));
    let client = PredictionServiceClient::new(balanced);
    let policy = RetryTransient {
        budget: Arc::new(TpsBudget::new(
            Duration::from_secs(10),
            config.retry_min_per_second,
            config.retry_budget_percent / 100.0,
        )),
        attempt: 0,
        backoff: Duration::from_millis(config.backoff_initial_ms),
        retries: metrics.model_retries.clone(),
    };
    let stack = ServiceBuilder::new()
        .concurrency_limit(config.concurrency_limit)
        .retry(policy)
        .timeout(config.timeout())
        .service(PredictCall { client: client.clone() });
    (stack, client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_failures_are_retried() {
        let status = |code| -> BoxError { Box::new(tonic::Status::new(code, "x")) };
        assert!(retryable(&status(Code::Unavailable)));
        assert!(retryable(&status(Code::DeadlineExceeded)));
        assert!(!retryable(&status(Code::InvalidArgument)));
        assert!(!retryable(&status(Code::NotFound)));
        let elapsed: BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert!(retryable(&elapsed));
    }
}
