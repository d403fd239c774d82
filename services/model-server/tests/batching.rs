//! Server-side batching: many concurrent clients with different inputs and row counts;
//! every response must carry exactly its own request's rows (checked against the same
//! rows run alone), and the batch-size metric must show that requests were merged.

mod support;

use std::sync::Arc;

use proto::tensorflow::serving::PredictRequest;
use savedmodel::{SavedModel, Tensor};
use support::*;
use test_support::metric;

/// A distinct input per client: rows of values derived from the client index.
fn input(client: usize, rows: usize) -> Vec<f32> {
    (0..rows * 18).map(|i| ((client * 31 + i * 7) % 97) as f32 / 97.0 - 0.5).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_merged_and_each_gets_its_own_rows() {
    let root = tempfile::tempdir().unwrap();
    let base = model_base(root.path(), "ae", "autoencoder", &[1]);
    // A 5 ms window so concurrent requests reliably meet in one batch.
    let [enable, parameters] = batching_flags(
        root.path(),
        "max_batch_size { value: 32 }\nbatch_timeout_micros { value: 5000 }\nnum_batch_threads { value: 2 }\n\
         max_enqueued_batches { value: 100 }\nallowed_batch_sizes: 8\nallowed_batch_sizes: 16\nallowed_batch_sizes: 32\n",
    );
    let server = TestServer::serving("ae", &base, &[&enable, &parameters]).await;

    // The engine alone gives the expected answer for every client's rows.
    let plan = Arc::new(SavedModel::open(base.join("1")).unwrap().load("serving_default").unwrap());
    let channel = server.channel().await;
    let clients = 64;
    let rounds = 5;
    let mut tasks = Vec::new();
    for client in 0..clients {
        let channel = channel.clone();
        let plan = Arc::clone(&plan);
        tasks.push(tokio::spawn(async move {
            let mut grpc = proto::tensorflow::serving::prediction_service_client::PredictionServiceClient::new(channel);
            for round in 0..rounds {
                let rows = 1 + (client + round) % 3;
                let values = input(client * rounds + round, rows);
                let expected = plan
                    .run([("sensors".to_owned(), Tensor::from_shape(&[rows, 18], &values).unwrap())])
                    .unwrap()
                    .remove("output_0")
                    .unwrap();
                let expected = expected.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
                let request = PredictRequest {
                    model_spec: spec("ae", None, None, ""),
                    inputs: [("sensors".to_owned(), float_tensor(&[rows, 18], &values))].into(),
                    output_filter: vec![],
                };
                let response = grpc.predict(request).await.unwrap().into_inner();
                let output = &response.outputs["output_0"];
                let dims: Vec<i64> = output.tensor_shape.as_ref().unwrap().dim.iter().map(|d| d.size).collect();
                assert_eq!(dims, vec![rows as i64, 18], "client {client} round {round}: its own row count back");
                assert_close(&output.float_val, &expected, &format!("client {client} round {round}"));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }

    // Merging happened: fewer engine runs than requests, and batches padded to allowed sizes.
    let metrics = get_text(server.rest, "/metrics").await;
    let labels = [("model", "ae"), ("version", "1"), ("signature", "serving_default")];
    let count = metric(&metrics, "model_server_batch_size_count", &labels).unwrap();
    let requests = (clients * rounds) as f64;
    assert!(count < requests / 2.0, "{count} engine runs for {requests} requests: batching did not merge");
    let small = metric(&metrics, "model_server_batch_size_bucket", &[labels[0], labels[1], labels[2], ("le", "4")]);
    assert_eq!(small, Some(0.0), "every batch was padded to an allowed size (8, 16 or 32)");
    server.stop().await;
}
