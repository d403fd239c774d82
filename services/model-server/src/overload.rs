//! Overload protection: what the server does when more is asked of it than it can do.
//!
//! A shared server must degrade by refusing, not by queueing without bound: every request in
//! flight holds its decoded tensors, a scheduler slot and a task. So requests take a permit
//! from one process-wide pool ([`InFlight`], shared by gRPC and REST), and a request finding
//! none is refused at once with RESOURCE_EXHAUSTED (HTTP 429) and counted, which a client's
//! retry policy understands. Per connection, HTTP/2 streams are capped (tonic's default
//! leaves them unlimited), every request has a deadline (a client's shorter `grpc-timeout`
//! wins), and keepalives find dead peers. Health checks are never shed: an overloaded
//! server is still alive, and a probe that fails would restart it when it most needs not to.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::http;

use crate::metrics::Metrics;

/// The limits this module enforces, from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverloadLimits {
    /// Requests in flight across every connection and both protocols.
    pub max_in_flight: usize,
    /// HTTP/2 streams one gRPC connection may have open.
    pub grpc_max_concurrent_streams: u32,
    /// Longest a request may run; `None` for no limit.
    pub request_timeout: Option<Duration>,
    /// Largest REST request body.
    pub rest_max_body_bytes: usize,
}

impl Default for OverloadLimits {
    fn default() -> Self {
        Self {
            max_in_flight: 512,
            grpc_max_concurrent_streams: 128,
            request_timeout: Some(Duration::from_secs(30)),
            rest_max_body_bytes: 4 << 20,
        }
    }
}

/// HTTP/2 keepalive: a ping every 30 s, and a peer that does not answer in 10 s is gone.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive for connections idle below HTTP/2 (and REST's HTTP/1).
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Sets what every accepted connection gets: TCP keepalive, and TCP_NODELAY as gRPC
/// servers set it (with Nagle on, a response written in two segments waits for the client's
/// delayed ACK, 40 ms on Linux). Best effort: a socket refusing an option still serves.
pub fn tune_accepted(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE));
}

/// The process-wide pool of in-flight permits.
#[derive(Debug, Clone)]
pub struct InFlight {
    permits: Arc<Semaphore>,
    limit: usize,
    metrics: Metrics,
}

impl InFlight {
    pub fn new(limit: usize, metrics: Metrics) -> Self {
        Self { permits: Arc::new(Semaphore::new(limit)), limit, metrics }
    }

    /// A permit, or `None` (counted as shed under `api`) when every one is taken.
    pub fn try_acquire(&self, api: &'static str) -> Option<OwnedSemaphorePermit> {
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                self.metrics.request_shed(api);
                None
            }
        }
    }

    /// What a shed request is told.
    pub fn refusal(&self) -> String {
        format!("the server has {} requests in flight, its limit; retry with backoff", self.limit)
    }
}

impl<S> tower::Layer<S> for InFlight {
    type Service = ShedWhenFull<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ShedWhenFull { inner, in_flight: self.clone() }
    }
}

/// gRPC requests hold a permit until their response is ready; without one they are answered
/// RESOURCE_EXHAUSTED at once (health checks excepted).
#[derive(Debug, Clone)]
pub struct ShedWhenFull<S> {
    inner: S,
    in_flight: InFlight,
}

const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

type ResponseFuture<E> = Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for ShedWhenFull<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path().starts_with(HEALTH_PREFIX) {
            return Box::pin(self.inner.call(request));
        }
        match self.in_flight.try_acquire("grpc") {
            Some(permit) => {
                let response = self.inner.call(request);
                Box::pin(async move {
                    let response = response.await;
                    drop(permit);
                    response
                })
            }
            None => {
                let status = tonic::Status::resource_exhausted(self.in_flight.refusal());
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}
