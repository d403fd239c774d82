//! What the model-server benches send, how they load a server and how they summarise
//! latencies.
#![allow(dead_code, unreachable_pub)]

use std::time::{Duration, Instant};

use proto::tensorflow::serving::prediction_service_client::PredictionServiceClient;
use proto::tensorflow::serving::{ModelSpec, PredictRequest};
use proto::tensorflow::{TensorProto, TensorShapeProto, tensor_shape_proto};

/// The tests' support, for what the benches do alike: the server's config from flags and
/// model reload requests.
#[path = "../../tests/support/mod.rs"]
mod tests_support;

#[allow(unused_imports)] // each bench uses part of it
pub use tests_support::{reload_request, serve_config};

/// A one-row Predict for the autoencoder fixture (`sensors`: float32[1,18]).
pub fn autoencoder_request(row: Vec<f32>) -> PredictRequest {
    assert_eq!(row.len(), 18, "the autoencoder takes 18 signals");
    PredictRequest {
        model_spec: Some(ModelSpec { name: "autoencoder".into(), ..Default::default() }),
        inputs: [(
            "sensors".to_owned(),
            TensorProto {
                dtype: 1,
                tensor_shape: Some(TensorShapeProto {
                    dim: [1, 18].iter().map(|&size| tensor_shape_proto::Dim { size, ..Default::default() }).collect(),
                    ..Default::default()
                }),
                float_val: row,
                ..Default::default()
            },
        )]
        .into(),
        output_filter: vec![],
    }
}

/// The `p`-quantile (0..=1) of sorted latencies, in microseconds.
pub fn percentile_us(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e6
}

/// `concurrency` closed-loop clients spread over `channels`: client `i` sends
/// `request(i)`, `request(i + concurrency)`, ... one after the other until `duration` is
/// over. Every request's latency, unsorted.
pub async fn closed_loop<F>(
    channels: &[tonic::transport::Channel],
    concurrency: usize,
    duration: Duration,
    request: F,
) -> Vec<Duration>
where
    F: Fn(usize) -> tonic::Request<PredictRequest> + Clone + Send + 'static,
{
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let mut client = PredictionServiceClient::new(channels[i % channels.len()].clone());
            let request = request.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = i;
                while Instant::now() < deadline {
                    let request = request(n);
                    let started = Instant::now();
                    client.predict(request).await.expect("benchmark requests succeed");
                    latencies.push(started.elapsed());
                    n += concurrency;
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all
}
