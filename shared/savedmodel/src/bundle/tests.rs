//! Unit tests of `bundle.rs`, kept apart so the module reads as code.

use super::*;
use crate::sstable::tests::build_table;
use tract_tensorflow::tfpb::tensorflow::tensor_shape_proto::Dim;

fn shape(dims: &[i64]) -> Option<TensorShapeProto> {
    Some(TensorShapeProto {
        dim: dims.iter().map(|&size| Dim { size, name: String::new() }).collect(),
        unknown_rank: false,
    })
}

/// Writes a one-shard bundle holding `entries` (sorted by key) and returns its prefix.
fn write_bundle_entries(dir: &Path, entries: &[(&str, BundleEntryProto)], data: &[u8]) -> PathBuf {
    let header = BundleHeaderProto { num_shards: 1, endianness: 0, version: None }.encode_to_vec();
    let encoded: Vec<(&[u8], Vec<u8>)> = entries.iter().map(|(k, e)| (k.as_bytes(), e.encode_to_vec())).collect();
    let mut rows: Vec<(&[u8], &[u8])> = vec![(b"", &header)];
    rows.extend(encoded.iter().map(|(k, v)| (*k, v.as_slice())));
    let prefix = dir.join("variables");
    std::fs::write(with_suffix(&prefix, ".index"), build_table(&rows)).unwrap();
    std::fs::write(shard_of(&prefix), data).unwrap();
    prefix
}

/// Writes a one-shard bundle with one float tensor `w` and returns its prefix.
fn write_bundle(dir: &Path, entry: BundleEntryProto, data: &[u8]) -> PathBuf {
    write_bundle_entries(dir, &[("w", entry)], data)
}

fn shard_of(prefix: &Path) -> PathBuf {
    with_suffix(prefix, ".data-00000-of-00001")
}

fn float_entry(data: &[u8], dims: &[i64]) -> BundleEntryProto {
    BundleEntryProto {
        dtype: DataType::DtFloat as i32,
        shape: shape(dims),
        shard_id: 0,
        offset: 0,
        size: data.len() as i64,
        crc32c: mask_crc(crc32c::crc32c(data)),
        slices: vec![],
    }
}

fn floats(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn reads_a_tensor_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let data = floats(&[1.0, -2.5]);
    let prefix = write_bundle(dir.path(), float_entry(&data, &[2]), &data);
    let tensor = TensorBundle::open(&prefix).unwrap().read_tensor("w").unwrap();
    assert_eq!(tensor.tensor_content, data);
    assert_eq!(tensor.dtype, DataType::DtFloat as i32);
}

#[test]
fn a_declared_size_beyond_the_shard_is_rejected_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let data = [0u8; 8];
    let mut entry = float_entry(&data, &[1 << 40]);
    entry.size = 4 << 40; // 4 TiB: consistent with the shape, absurd for the 8-byte shard
    let prefix = write_bundle(dir.path(), entry, &data);
    let err = TensorBundle::open(&prefix).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("shard holds 8 bytes"), "{message}");
    assert!(message.contains("variables.data-00000-of-00001"), "{message}");
}

#[test]
fn a_size_that_disagrees_with_dtype_and_shape_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let data = [0u8; 8];
    let prefix = write_bundle(dir.path(), float_entry(&data, &[3]), &data);
    let err = TensorBundle::open(&prefix).unwrap_err();
    assert!(err.to_string().contains("declares 8 bytes"), "{err}");
}

#[test]
fn a_flipped_data_byte_fails_the_crc_and_names_the_shard_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = floats(&[3.0]);
    let mut corrupted = data.clone();
    corrupted[0] ^= 0x40;
    let prefix = write_bundle(dir.path(), float_entry(&data, &[1]), &corrupted);
    let err = TensorBundle::open(&prefix).unwrap_err();
    assert!(matches!(err, LoadError::ChecksumMismatch { ref key, .. } if key == "w"), "{err}");
    assert!(err.to_string().contains("variables.data-00000-of-00001"), "{err}");
}

#[test]
fn opening_verifies_every_entry_not_only_the_ones_later_read() {
    let dir = tempfile::tempdir().unwrap();
    let (used, unused) = (floats(&[1.0, 2.0]), floats(&[0.5]));
    let mut unused_entry = float_entry(&unused, &[1]);
    unused_entry.offset = used.len() as i64;
    let mut data = [used.as_slice(), unused.as_slice()].concat();
    *data.last_mut().unwrap() ^= 0x01;
    let prefix =
        write_bundle_entries(dir.path(), &[("optimizer/slot", unused_entry), ("w", float_entry(&used, &[2]))], &data);
    let err = TensorBundle::open(&prefix).unwrap_err();
    let LoadError::ChecksumMismatch { path, key, .. } = &err else { panic!("unexpected error: {err}") };
    assert_eq!(key, "optimizer/slot");
    assert_eq!(path, &shard_of(&prefix));
}

#[test]
fn a_shard_rewritten_after_open_still_fails_the_crc_when_a_tensor_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = floats(&[3.0, 4.0]);
    let prefix = write_bundle(dir.path(), float_entry(&data, &[2]), &data);
    let bundle = TensorBundle::open(&prefix).unwrap();
    let mut rewritten = data.clone();
    rewritten[5] ^= 0x10;
    std::fs::write(shard_of(&prefix), &rewritten).unwrap();
    let err = bundle.read_tensor("w").unwrap_err();
    assert!(matches!(err, LoadError::ChecksumMismatch { ref key, .. } if key == "w"), "{err}");

    std::fs::write(shard_of(&prefix), &data[..4]).unwrap();
    let err = bundle.read_tensor("w").unwrap_err();
    assert!(err.to_string().contains("the shard holds 4 bytes"), "{err}");
}

#[test]
fn string_entries_are_verified_with_their_own_layout_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let strings: &[&[u8]] = &[b"vocab-a", b"vocab-b", b""];
    let (mut data, crc32c) = layout::tests::encode_strings(strings);
    let entry = BundleEntryProto {
        dtype: DataType::DtString as i32,
        shape: shape(&[3]),
        size: data.len() as i64,
        crc32c,
        ..float_entry(&[], &[])
    };
    let prefix = write_bundle_entries(dir.path(), &[("table/keys", entry)], &data);
    TensorBundle::open(&prefix).unwrap();

    *data.last_mut().unwrap() ^= 0x20; // inside "vocab-b"
    std::fs::write(shard_of(&prefix), &data).unwrap();
    let err = TensorBundle::open(&prefix).unwrap_err();
    assert!(matches!(err, LoadError::ChecksumMismatch { ref key, .. } if key == "table/keys"), "{err}");
}

#[test]
fn a_partitioned_variables_own_entry_holds_no_bytes_and_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let data = floats(&[1.0]);
    // As TF's BundleWriter::AddSlice leaves it: dtype, shape and slices; no shard range.
    let full = BundleEntryProto {
        shape: shape(&[4, 2]),
        size: 0,
        crc32c: 0,
        slices: vec![vec![0x0a, 0x00]],
        ..float_entry(&[], &[])
    };
    let prefix = write_bundle_entries(dir.path(), &[("partitioned", full), ("w", float_entry(&data, &[1]))], &data);
    let bundle = TensorBundle::open(&prefix).unwrap();
    assert!(matches!(bundle.read_tensor("partitioned"), Err(LoadError::UnsupportedVariable { .. })));
}

#[test]
fn an_entry_of_a_dtype_no_checkpoint_holds_fails_the_open_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = [0u8; 4];
    let entry = BundleEntryProto { dtype: DataType::DtResource as i32, ..float_entry(&data, &[1]) };
    let prefix = write_bundle(dir.path(), entry, &data);
    let err = TensorBundle::open(&prefix).unwrap_err();
    assert!(matches!(err, LoadError::CorruptBundle { .. }), "{err}");
    assert!(err.to_string().contains("\"w\" has dtype DT_RESOURCE"), "{err}");
}

#[test]
fn negative_offsets_and_missing_keys_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = [0u8; 4];
    let mut entry = float_entry(&data, &[1]);
    entry.offset = -4;
    let prefix = write_bundle(dir.path(), entry, &data);
    assert!(matches!(TensorBundle::open(&prefix), Err(LoadError::CorruptBundle { .. })));

    let prefix = write_bundle(dir.path(), float_entry(&data, &[1]), &data);
    let bundle = TensorBundle::open(&prefix).unwrap();
    assert!(matches!(bundle.read_tensor("nope"), Err(LoadError::MissingVariable { .. })));
}

/// What the full check costs. Run once in release:
/// `cargo test -p savedmodel --release --lib -- --ignored --nocapture verification_cost`
#[test]
#[ignore = "timing, not a check; run by hand in release"]
fn verification_cost() {
    use std::time::{Duration, Instant};

    fn mean(runs: u32, mut f: impl FnMut()) -> Duration {
        f(); // warm the page cache and the allocator
        let start = Instant::now();
        for _ in 0..runs {
            f();
        }
        start.elapsed() / runs
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;

    // A real model: index alone vs index + every entry verified, and the whole load.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/savedmodels");
    for fixture in ["car_anomaly_flags_everything", "keras_batchnorm_dropout"] {
        let dir = root.join(fixture).join("1");
        let prefix = dir.join("variables/variables");
        let bytes = std::fs::metadata(shard_of(&prefix)).unwrap().len();
        let entries = TensorBundle::read_index(&prefix).unwrap().len();
        let index_only = mean(200, || drop(TensorBundle::read_index(&prefix).unwrap()));
        let verified = mean(200, || drop(TensorBundle::open(&prefix).unwrap()));
        let load = mean(20, || drop(crate::SavedModel::open(&dir).unwrap().load("serving_default").unwrap()));
        println!(
            "{fixture}: {entries} entries, {bytes} B of data; index only {:.3} ms, index + full check {:.3} ms \
             (check {:.3} ms); open + load(serving_default) {:.1} ms",
            ms(index_only),
            ms(verified),
            ms(verified.saturating_sub(index_only)),
            ms(load)
        );
    }

    // Throughput on a checkpoint large enough to measure: 256 MiB in 512 tensors of
    // 512 KiB (a mid-size model with its optimizer slots), page cache warm.
    let dir = tempfile::tempdir().unwrap();
    let tensor = 512 << 10;
    let data: Vec<u8> = (0..256usize << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let entries: Vec<(String, BundleEntryProto)> = data
        .chunks(tensor)
        .enumerate()
        .map(|(i, chunk)| {
            let entry = BundleEntryProto { offset: (i * tensor) as i64, ..float_entry(chunk, &[tensor as i64 / 4]) };
            (format!("variables/{i:04}"), entry)
        })
        .collect();
    let named: Vec<(&str, BundleEntryProto)> = entries.iter().map(|(k, e)| (k.as_str(), e.clone())).collect();
    let prefix = write_bundle_entries(dir.path(), &named, &data);
    let mb = data.len() as f64 / 1e6;
    let index_only = mean(5, || drop(TensorBundle::read_index(&prefix).unwrap()));
    let verified = mean(5, || drop(TensorBundle::open(&prefix).unwrap()));
    let check = verified.saturating_sub(index_only);
    let crc_only = mean(5, || assert_ne!(crc32c::crc32c(&data), 1));
    let bundle = TensorBundle::read_index(&prefix).unwrap();
    let reread = mean(5, || {
        for (key, _) in &entries {
            drop(bundle.read_tensor(key).unwrap());
        }
    });
    println!(
        "synthetic {mb:.0} MB in {} tensors: full check {:.1} ms = {:.0} MB/s (CRC32C alone in memory: {:.0} MB/s); \
         reading + re-checking all of them as freeze does: {:.1} ms",
        entries.len(),
        ms(check),
        mb / check.as_secs_f64(),
        mb / crc_only.as_secs_f64(),
        ms(reread)
    );
}
