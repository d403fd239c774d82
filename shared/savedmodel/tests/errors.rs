//! Every way a SavedModel can be broken yields a clear error that names the file (and,
//! for graph problems, the op and node), never a panic, and never an allocation driven
//! by a size the file merely declares.

mod golden;

use std::fs;
use std::path::{Path, PathBuf};

use golden::fixture_dir;
use prost::Message;
use savedmodel::{LoadError, PredictError, SavedModel, Tensor};
use tract_tensorflow::tfpb::tensorflow::SavedModel as SavedModelProto;

/// Copies a fixture's version directory into a fresh temp dir the test may damage.
fn scratch_copy(fixture: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("1");
    copy_dir(&fixture_dir(fixture), &dir);
    (tmp, dir)
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn open_and_load(dir: &Path) -> Result<(), LoadError> {
    SavedModel::open(dir)?.load("serving_default").map(|_| ())
}

fn rewrite_saved_model(dir: &Path, edit: impl FnOnce(&mut SavedModelProto)) {
    let path = dir.join("saved_model.pb");
    let mut proto = SavedModelProto::decode(fs::read(&path).unwrap().as_slice()).unwrap();
    edit(&mut proto);
    fs::write(path, proto.encode_to_vec()).unwrap();
}

const SHARD: &str = "variables/variables.data-00000-of-00001";

#[test]
fn unsupported_op_names_the_op_the_node_and_the_file() {
    let err = open_and_load(&fixture_dir("unsupported_op")).unwrap_err();
    let LoadError::UnsupportedOp { path, op, node } = &err else { panic!("unexpected error: {err}") };
    assert_eq!(op, "BesselI0e");
    assert!(node.ends_with("BesselI0e"), "{node}");
    assert!(path.ends_with("saved_model.pb"));
    assert!(err.to_string().contains("\"BesselI0e\""), "{err}");
}

#[test]
fn missing_signature_lists_the_available_ones() {
    let model = SavedModel::open(fixture_dir("autoencoder")).unwrap();
    let err = model.load("predict_everything").unwrap_err();
    assert!(matches!(err, LoadError::MissingSignature { ref name, .. } if name == "predict_everything"));
    let message = err.to_string();
    assert!(message.contains("serve, serving_default"), "{message}");
    assert!(message.contains("saved_model.pb"), "{message}");
}

#[test]
fn a_corrupted_weight_fails_its_crc_naming_the_shard_and_variable() {
    let (_tmp, dir) = scratch_copy("autoencoder");
    let shard = dir.join(SHARD);
    let mut bytes = fs::read(&shard).unwrap();
    bytes[0] ^= 0x55; // the first bytes hold a kernel the signature reads
    fs::write(&shard, bytes).unwrap();
    let err = open_and_load(&dir).unwrap_err();
    let LoadError::ChecksumMismatch { path, key, .. } = &err else { panic!("unexpected error: {err}") };
    assert!(path.ends_with(SHARD), "{}", path.display());
    assert!(key.starts_with("variables/"), "{key}");
    assert!(err.to_string().contains("CRC32C mismatch"), "{err}");
}

#[test]
fn a_corrupted_weight_no_signature_reads_still_fails_the_load_naming_the_shard_and_key() {
    // An Adam slot of car_anomaly_flags_everything: 2176 bytes at offset 7288 of the shard
    // (from its variables.index). Serving never reads optimizer state, which is exactly
    // why only a check of every entry, as TensorFlow's restore makes, can catch this.
    const KEY: &str = "base/network/optimizer/_variables/2/.ATTRIBUTES/VARIABLE_VALUE";
    const OFFSET: usize = 7288;
    let pristine = SavedModel::open(fixture_dir("car_anomaly_flags_everything")).unwrap();
    for signature in pristine.signatures().keys() {
        let frozen = pristine.freeze(signature).unwrap();
        assert!(!frozen.frozen_variables().iter().any(|k| k == KEY), "{signature} reads {KEY}; pick another");
    }

    let (_tmp, dir) = scratch_copy("car_anomaly_flags_everything");
    let shard = dir.join(SHARD);
    let mut bytes = fs::read(&shard).unwrap();
    bytes[OFFSET + 1000] ^= 0x08;
    fs::write(&shard, bytes).unwrap();
    let err = SavedModel::open(&dir).unwrap_err();
    let LoadError::ChecksumMismatch { path, key, .. } = &err else { panic!("unexpected error: {err}") };
    assert!(path.ends_with(SHARD), "{}", path.display());
    assert_eq!(key, KEY);
    let message = err.to_string();
    assert!(message.contains(SHARD) && message.contains(KEY) && message.contains("CRC32C mismatch"), "{message}");
}

#[test]
fn a_corrupted_index_block_fails_its_crc_naming_the_index() {
    let (_tmp, dir) = scratch_copy("autoencoder");
    let index = dir.join("variables/variables.index");
    let mut bytes = fs::read(&index).unwrap();
    bytes[10] ^= 0x01;
    fs::write(&index, bytes).unwrap();
    let err = open_and_load(&dir).unwrap_err();
    assert!(matches!(err, LoadError::CorruptBundle { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("variables.index") && message.contains("CRC32C"), "{message}");
}

#[test]
fn a_truncated_saved_model_pb_is_a_decode_error_naming_the_file() {
    let (_tmp, dir) = scratch_copy("module_two_io");
    let path = dir.join("saved_model.pb");
    let full = fs::read(&path).unwrap();
    fs::write(&path, &full[..full.len() / 2]).unwrap();
    let err = open_and_load(&dir).unwrap_err();
    assert!(matches!(err, LoadError::Decode { .. }), "{err}");
    assert!(err.to_string().contains("saved_model.pb: SavedModel is truncated"), "{err}");
}

#[test]
fn a_truncated_shard_is_caught_before_reading_past_its_end() {
    let (_tmp, dir) = scratch_copy("autoencoder");
    let shard = dir.join(SHARD);
    let full = fs::read(&shard).unwrap();
    fs::write(&shard, &full[..64]).unwrap();
    let err = open_and_load(&dir).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, LoadError::CorruptBundle { .. }), "{message}");
    assert!(message.contains("the shard holds 64 bytes") && message.contains(SHARD), "{message}");
}

#[test]
fn missing_files_are_io_errors_naming_the_path() {
    let (_tmp, dir) = scratch_copy("autoencoder");
    fs::remove_file(dir.join(SHARD)).unwrap();
    let err = open_and_load(&dir).unwrap_err();
    assert!(matches!(err, LoadError::Io { ref path, .. } if path.ends_with(SHARD)), "{err}");

    let err = SavedModel::open(dir.join("no-such-version")).unwrap_err();
    assert!(err.to_string().contains("no-such-version/saved_model.pb"), "{err}");
}

#[test]
fn a_saved_model_without_the_serve_tag_is_rejected_listing_the_tags_present() {
    let (_tmp, dir) = scratch_copy("tf1_simple_save");
    rewrite_saved_model(&dir, |proto| {
        proto.meta_graphs[0].meta_info_def.as_mut().unwrap().tags = vec!["train".into()];
    });
    let err = SavedModel::open(&dir).unwrap_err();
    assert!(matches!(err, LoadError::NoMetaGraph { .. }), "{err}");
    assert!(err.to_string().contains("[[\"train\"]]"), "{err}");
}

#[test]
fn a_cycle_in_the_graph_is_reported_not_followed_forever() {
    let (_tmp, dir) = scratch_copy("tf1_simple_save");
    rewrite_saved_model(&dir, |proto| {
        let graph = proto.meta_graphs[0].graph_def.as_mut().unwrap();
        let add = graph.node.iter_mut().find(|n| n.name == "add").unwrap();
        add.input[0] = "y".into(); // y = Tanh(add), add = y + b
    });
    let err = open_and_load(&dir).unwrap_err();
    assert!(matches!(err, LoadError::InvalidGraph { ref detail, .. } if detail.contains("cycle")), "{err}");
}

#[test]
fn a_call_to_an_undefined_function_names_the_call_node() {
    let (_tmp, dir) = scratch_copy("module_two_io");
    rewrite_saved_model(&dir, |proto| {
        proto.meta_graphs[0].graph_def.as_mut().unwrap().library.as_mut().unwrap().function.clear();
    });
    let err = open_and_load(&dir).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("StatefulPartitionedCall") && message.contains("undefined function"), "{message}");
}

/// Deterministic mutation sweep: flipping bytes anywhere in saved_model.pb or the
/// index must give `Ok` or a `LoadError`, never a panic (a panic fails the test).
#[test]
fn byte_flips_anywhere_never_panic() {
    for (file, stride) in [("saved_model.pb", 97), ("variables/variables.index", 7)] {
        let (_tmp, dir) = scratch_copy("keras_batchnorm_dropout");
        let path = dir.join(file);
        let original = fs::read(&path).unwrap();
        for at in (0..original.len()).step_by(stride) {
            let mut bytes = original.clone();
            bytes[at] ^= 0xa5;
            fs::write(&path, &bytes).unwrap();
            let _ = open_and_load(&dir);
        }
    }
}

#[test]
fn bad_inputs_are_rejected_naming_the_input() {
    let plan = SavedModel::open(fixture_dir("module_two_io")).unwrap().load("serving_default").unwrap();
    let readings = || Tensor::from_shape(&[2, 4], &[0.5f32; 8]).unwrap();
    let context = |rows: usize| Tensor::from_shape(&[rows, 3], &vec![0.1f32; rows * 3]).unwrap();
    let run = |inputs: Vec<(&str, Tensor)>| plan.run(inputs.into_iter().map(|(k, v)| (k.to_owned(), v)));

    assert!(run(vec![("readings", readings()), ("context", context(2))]).is_ok());
    assert_eq!(run(vec![("readings", readings())]).unwrap_err(), PredictError::MissingInput { name: "context".into() });
    assert!(matches!(
        run(vec![("readings", readings()), ("context", context(2)), ("extra", context(2))]).unwrap_err(),
        PredictError::UnknownInput { ref name, .. } if name == "extra"
    ));
    let wrong_dtype = Tensor::from_shape(&[2, 4], &[1i64; 8]).unwrap();
    let err = run(vec![("readings", wrong_dtype), ("context", context(2))]).unwrap_err();
    assert_eq!(err.to_string(), "input \"readings\" has dtype i64, expected f32");
    let wrong_shape = Tensor::from_shape(&[2, 5], &[0f32; 10]).unwrap();
    let err = run(vec![("readings", wrong_shape), ("context", context(2))]).unwrap_err();
    assert_eq!(err.to_string(), "input \"readings\" has shape [2, 5], expected [-1,4]");
    let err = run(vec![("readings", readings()), ("context", context(3))]).unwrap_err();
    assert!(matches!(err, PredictError::Batch { .. }), "{err}");
}
