//! `run_batch` merges requests into one engine run and splits the outputs back: each
//! request must get exactly what running it alone gives, including with padding and with
//! two inputs and two outputs.

mod golden;

use savedmodel::{SavedModel, Tensor};

fn rows(seed: usize, n: usize, width: usize) -> Tensor {
    let values: Vec<f32> = (0..n * width).map(|i| ((seed * 13 + i * 5) % 23) as f32 / 23.0 - 0.4).collect();
    Tensor::from_shape(&[n, width], &values).unwrap()
}

#[test]
fn merged_requests_get_their_own_rows_back() {
    let model = SavedModel::open(golden::fixture_dir("module_two_io")).unwrap();
    let plan = model.load("serving_default").unwrap();
    assert!(plan.is_batchable());
    let spec = plan.spec().clone();
    let width = |name: &str| spec.inputs[name].shape.as_ref().unwrap()[1] as usize;
    let requests: Vec<Vec<(String, Tensor)>> = [1, 3, 2]
        .iter()
        .enumerate()
        .map(|(seed, &n)| {
            vec![
                ("readings".to_owned(), rows(seed, n, width("readings"))),
                ("context".to_owned(), rows(seed + 100, n, width("context"))),
            ]
        })
        .collect();
    let alone: Vec<_> = requests.iter().map(|r| plan.run(r.clone()).unwrap()).collect();
    for pad_to in [None, Some(8)] {
        let prepared = requests.iter().map(|r| plan.prepare(r.clone()).unwrap()).collect();
        let merged = plan.run_batch(prepared, pad_to).unwrap();
        assert_eq!(merged.len(), 3);
        for (index, (got, expected)) in merged.iter().zip(&alone).enumerate() {
            assert_eq!(got.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
            for (name, tensor) in expected {
                assert_eq!(got[name].shape(), tensor.shape(), "request {index} output {name} (pad {pad_to:?})");
                let (a, b) = (got[name].cast_to::<f32>().unwrap(), tensor.cast_to::<f32>().unwrap());
                let (a, b) = (a.try_as_plain_ram().unwrap(), b.try_as_plain_ram().unwrap());
                for (x, y) in a.as_slice::<f32>().unwrap().iter().zip(b.as_slice::<f32>().unwrap()) {
                    assert!((x - y).abs() < 1e-5, "request {index} output {name}: {x} vs {y} (pad {pad_to:?})");
                }
            }
        }
    }
}
