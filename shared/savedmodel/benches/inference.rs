//! Inference latency of the engine on the 18-feature autoencoder fixture: one row (the
//! stream processor's per-event call) and a batch of 64 (the server's batching path).
//!
//! `benchmarks/savedmodel-vs-tensorflow.sh` runs this next to TensorFlow's own signature
//! call on the same SavedModel and writes the side-by-side ratios; see docs/benchmarks.md.

use std::path::PathBuf;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use savedmodel::{SavedModel, Tensor};

fn autoencoder_inference(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/savedmodels/autoencoder/1");
    let plan = SavedModel::open(dir).unwrap().load("serving_default").unwrap();
    let mut group = c.benchmark_group("autoencoder");
    for rows in [1usize, 64] {
        let values: Vec<f32> = (0..rows * 18).map(|i| ((i % 37) as f32 - 18.0) / 9.0).collect();
        let input = Tensor::from_shape(&[rows, 18], &values).unwrap();
        group.throughput(Throughput::Elements(rows as u64));
        group.bench_with_input(BenchmarkId::new("predict", rows), &input, |b, input| {
            b.iter(|| plan.run([("sensors".to_string(), input.clone())]).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, autoencoder_inference);
criterion_main!(benches);
