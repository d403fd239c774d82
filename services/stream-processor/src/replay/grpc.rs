//! `vigil.replay.v1.ReplayService` over gRPC: one replay per call, run to its end. A
//! replay stops when its caller goes away (the call's future is dropped) or the processor
//! begins to stop, which answers UNAVAILABLE rather than holding the shutdown for the
//! length of a replay.

use std::sync::Arc;

use proto::vigil::replay::v1::replay_service_server::ReplayService;
use proto::vigil::replay::v1::{ReplayReport, ReplayRequest};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::Replayer;

pub struct ReplayGrpc {
    replayer: Arc<Replayer>,
    /// `true` once the processor is stopping.
    stopping: watch::Receiver<bool>,
}

impl ReplayGrpc {
    pub fn new(replayer: Arc<Replayer>, stopping: watch::Receiver<bool>) -> Self {
        Self { replayer, stopping }
    }
}

#[tonic::async_trait]
impl ReplayService for ReplayGrpc {
    async fn replay(&self, request: Request<ReplayRequest>) -> Result<Response<ReplayReport>, Status> {
        let mut stopping = self.stopping.clone();
        let request = request.into_inner();
        tokio::select! {
            result = self.replayer.replay(&request) => result.map(Response::new).map_err(Status::from),
            _ = stopping.wait_for(|stopping| *stopping) => {
                Err(Status::unavailable("the stream processor is stopping; the replay was cancelled"))
            }
        }
    }
}
