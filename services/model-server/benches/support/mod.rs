//! What both model-server benches send and how they summarise latencies.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use proto::tensorflow::serving::{ModelSpec, PredictRequest};
use proto::tensorflow::{TensorProto, TensorShapeProto, tensor_shape_proto};

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
