//! TensorFlow's checkpoint format, the TensorBundle: `variables.index` (a LevelDB table
//! of `BundleEntryProto`s) plus data shards `variables.data-NNNNN-of-MMMMM`.
//!
//! Only the tensors a signature actually reads are loaded, each one bounds-checked
//! against its shard's real size and verified against its stored CRC32C before use.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use prost::Message;
use tract_tensorflow::tfpb::tensorflow::{DataType, TensorProto, TensorShapeProto, VersionDef};

use crate::error::LoadError;
use crate::sstable::{self, mask_crc};

/// Checkpoint key of the serialized `TrackableObjectGraph` in TF2 checkpoints.
pub(crate) const OBJECT_GRAPH_KEY: &str = "_CHECKPOINTABLE_OBJECT_GRAPH";

/// `tensorflow.BundleHeaderProto` (tensorflow/core/protobuf/tensor_bundle.proto), the
/// value under the empty key.
#[derive(Clone, PartialEq, Message)]
struct BundleHeaderProto {
    #[prost(int32, tag = "1")]
    num_shards: i32,
    /// 0 = little endian, 1 = big endian.
    #[prost(int32, tag = "2")]
    endianness: i32,
    #[prost(message, optional, tag = "3")]
    version: Option<VersionDef>,
}

/// `tensorflow.BundleEntryProto`: where one tensor's bytes live and their checksum.
#[derive(Clone, PartialEq, Message)]
struct BundleEntryProto {
    #[prost(enumeration = "DataType", tag = "1")]
    dtype: i32,
    #[prost(message, optional, tag = "2")]
    shape: Option<TensorShapeProto>,
    #[prost(int32, tag = "3")]
    shard_id: i32,
    #[prost(int64, tag = "4")]
    offset: i64,
    #[prost(int64, tag = "5")]
    size: i64,
    #[prost(fixed32, tag = "6")]
    crc32c: u32,
    /// Set for partitioned variables (`TensorSliceProto`); kept opaque, only its presence matters.
    #[prost(bytes = "vec", repeated, tag = "7")]
    slices: Vec<Vec<u8>>,
}

/// An opened TensorBundle: the parsed index; shards are read on demand.
#[derive(Debug)]
pub(crate) struct TensorBundle {
    index_path: PathBuf,
    prefix: PathBuf,
    num_shards: i32,
    entries: HashMap<String, BundleEntryProto>,
}

impl TensorBundle {
    /// Opens `<prefix>.index`, e.g. prefix `<dir>/variables/variables`.
    pub(crate) fn open(prefix: &Path) -> Result<Self, LoadError> {
        let index_path = with_suffix(prefix, ".index");
        let bytes = std::fs::read(&index_path).map_err(|source| LoadError::Io { path: index_path.clone(), source })?;
        let corrupt = |detail: String| LoadError::CorruptBundle { path: index_path.clone(), detail };
        let table = sstable::read_entries(&bytes).map_err(|e| corrupt(e.to_string()))?;

        let mut header = None;
        let mut entries = HashMap::with_capacity(table.len());
        for (key, value) in table {
            if key.is_empty() {
                let h = BundleHeaderProto::decode(value.as_slice())
                    .map_err(|e| corrupt(format!("bundle header does not decode: {e}")))?;
                header = Some(h);
                continue;
            }
            let key =
                String::from_utf8(key).map_err(|e| corrupt(format!("non-UTF-8 tensor key {:?}", e.as_bytes())))?;
            let entry = BundleEntryProto::decode(value.as_slice())
                .map_err(|e| corrupt(format!("entry for {key:?} does not decode: {e}")))?;
            entries.insert(key, entry);
        }
        let header = header.ok_or_else(|| corrupt("no bundle header (empty key) in the index".into()))?;
        if header.endianness != 0 {
            return Err(corrupt("big-endian bundles are not supported".into()));
        }
        if !(1..=100_000).contains(&header.num_shards) {
            return Err(corrupt(format!("header declares {} shards", header.num_shards)));
        }
        Ok(Self { index_path, prefix: prefix.to_owned(), num_shards: header.num_shards, entries })
    }

    pub(crate) fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn index_path(&self) -> &Path {
        &self.index_path
    }

    /// Reads a numeric tensor as a `TensorProto` with `tensor_content` (raw little-endian
    /// bytes, exactly the bundle's own encoding), ready to become a `Const` node.
    pub(crate) fn read_tensor(&self, key: &str) -> Result<TensorProto, LoadError> {
        let entry = self.entry(key)?;
        let dtype = DataType::try_from(entry.dtype).unwrap_or(DataType::DtInvalid);
        let element_size = numeric_size(dtype).ok_or_else(|| LoadError::UnsupportedVariable {
            path: self.index_path.clone(),
            key: key.into(),
            detail: format!("dtype {} cannot be frozen into a constant", dtype.as_str_name()),
        })?;
        let elements = element_count(entry.shape.as_ref()).ok_or_else(|| LoadError::CorruptBundle {
            path: self.index_path.clone(),
            detail: format!("tensor {key:?} has an invalid shape {:?}", entry.shape),
        })?;
        let expected = elements.checked_mul(element_size as u64);
        if expected != Some(entry.size as u64) {
            return Err(LoadError::CorruptBundle {
                path: self.index_path.clone(),
                detail: format!(
                    "tensor {key:?} declares {} bytes but its dtype {} and shape hold {} elements",
                    entry.size,
                    dtype.as_str_name(),
                    elements
                ),
            });
        }
        let (shard, bytes) = self.read_bytes(key, entry)?;
        let computed = mask_crc(crc32c::crc32c(&bytes));
        if computed != entry.crc32c {
            return Err(LoadError::ChecksumMismatch { path: shard, key: key.into(), stored: entry.crc32c, computed });
        }
        Ok(TensorProto {
            dtype: entry.dtype,
            tensor_shape: entry.shape.clone(),
            tensor_content: bytes,
            ..Default::default()
        })
    }

    /// Reads a scalar `DT_STRING` tensor (e.g. the object graph). Bundles encode strings as
    /// varint64 lengths, a masked CRC of the lengths, then the bytes; the entry's CRC covers
    /// the lengths (little-endian u32 when they fit, else u64), that checksum, and the bytes.
    pub(crate) fn read_scalar_string(&self, key: &str) -> Result<Vec<u8>, LoadError> {
        let entry = self.entry(key)?;
        let corrupt = |detail: String| LoadError::CorruptBundle { path: self.index_path.clone(), detail };
        if entry.dtype != DataType::DtString as i32 || element_count(entry.shape.as_ref()) != Some(1) {
            return Err(corrupt(format!("{key:?} is not a scalar string")));
        }
        let (shard, bytes) = self.read_bytes(key, entry)?;
        let mut pos = 0;
        let mut len = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *bytes.get(pos).ok_or_else(|| corrupt(format!("{key:?}: truncated string length")))?;
            pos += 1;
            len |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let checksum_end = pos + 4;
        let body = bytes.get(checksum_end..).filter(|body| body.len() as u64 == len).ok_or_else(|| {
            corrupt(format!("{key:?}: string length {len} does not match its {} stored bytes", bytes.len()))
        })?;
        // TF checksums each length as a u32 when it fits (backwards compatibility), else as u64.
        let mut crc = match u32::try_from(len) {
            Ok(len) => crc32c::crc32c(&len.to_le_bytes()),
            Err(_) => crc32c::crc32c(&len.to_le_bytes()),
        };
        let length_checksum = &bytes[pos..checksum_end];
        if length_checksum != mask_crc(crc).to_le_bytes() {
            return Err(LoadError::ChecksumMismatch {
                path: shard,
                key: format!("{key} (string lengths)"),
                stored: u32::from_le_bytes(length_checksum.try_into().expect("4 bytes")),
                computed: mask_crc(crc),
            });
        }
        crc = crc32c::crc32c_append(crc, length_checksum);
        crc = crc32c::crc32c_append(crc, body);
        let computed = mask_crc(crc);
        if computed != entry.crc32c {
            return Err(LoadError::ChecksumMismatch { path: shard, key: key.into(), stored: entry.crc32c, computed });
        }
        Ok(body.to_vec())
    }

    fn entry(&self, key: &str) -> Result<&BundleEntryProto, LoadError> {
        let entry = self
            .entries
            .get(key)
            .ok_or_else(|| LoadError::MissingVariable { path: self.index_path.clone(), key: key.into() })?;
        if !entry.slices.is_empty() {
            return Err(LoadError::UnsupportedVariable {
                path: self.index_path.clone(),
                key: key.into(),
                detail: "partitioned (sliced) variables are not supported".into(),
            });
        }
        Ok(entry)
    }

    /// Reads an entry's bytes from its shard, checking the declared range against the
    /// shard's actual length first so a hostile index cannot trigger a huge allocation.
    fn read_bytes(&self, key: &str, entry: &BundleEntryProto) -> Result<(PathBuf, Vec<u8>), LoadError> {
        if entry.shard_id < 0 || entry.shard_id >= self.num_shards {
            return Err(LoadError::CorruptBundle {
                path: self.index_path.clone(),
                detail: format!("tensor {key:?} is in shard {} of {}", entry.shard_id, self.num_shards),
            });
        }
        let shard = with_suffix(&self.prefix, &format!(".data-{:05}-of-{:05}", entry.shard_id, self.num_shards));
        let io = |source| LoadError::Io { path: shard.clone(), source };
        let mut file = File::open(&shard).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let in_bounds = u64::try_from(entry.offset)
            .ok()
            .zip(u64::try_from(entry.size).ok())
            .and_then(|(offset, size)| offset.checked_add(size))
            .is_some_and(|end| end <= file_len);
        if !in_bounds {
            return Err(LoadError::CorruptBundle {
                path: shard,
                detail: format!(
                    "tensor {key:?} declares {} bytes at offset {} but the shard holds {file_len} bytes",
                    entry.size, entry.offset
                ),
            });
        }
        let mut bytes = vec![0u8; entry.size as usize];
        file.seek(SeekFrom::Start(entry.offset as u64)).map_err(io)?;
        file.read_exact(&mut bytes).map_err(io)?;
        Ok((shard, bytes))
    }
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Bytes per element of the dtypes that can be frozen into constants.
fn numeric_size(dtype: DataType) -> Option<usize> {
    Some(match dtype {
        DataType::DtBool | DataType::DtInt8 | DataType::DtUint8 => 1,
        DataType::DtInt16 | DataType::DtUint16 | DataType::DtHalf | DataType::DtBfloat16 => 2,
        DataType::DtFloat | DataType::DtInt32 | DataType::DtUint32 => 4,
        DataType::DtDouble | DataType::DtInt64 | DataType::DtUint64 => 8,
        _ => return None,
    })
}

/// Number of elements of a fully-defined shape, or `None` if a dim is unknown or it overflows.
fn element_count(shape: Option<&TensorShapeProto>) -> Option<u64> {
    let Some(shape) = shape else { return Some(1) };
    if shape.unknown_rank {
        return None;
    }
    shape.dim.iter().try_fold(1u64, |acc, d| u64::try_from(d.size).ok().and_then(|d| acc.checked_mul(d)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sstable::tests::build_table;
    use tract_tensorflow::tfpb::tensorflow::tensor_shape_proto::Dim;

    fn shape(dims: &[i64]) -> Option<TensorShapeProto> {
        Some(TensorShapeProto {
            dim: dims.iter().map(|&size| Dim { size, name: String::new() }).collect(),
            unknown_rank: false,
        })
    }

    /// Writes a one-shard bundle with one float tensor and returns its prefix.
    fn write_bundle(dir: &Path, entry: BundleEntryProto, data: &[u8]) -> PathBuf {
        let header = BundleHeaderProto { num_shards: 1, endianness: 0, version: None }.encode_to_vec();
        let entry = entry.encode_to_vec();
        let table = build_table(&[(b"", &header), (b"w", &entry)]);
        let prefix = dir.join("variables");
        std::fs::write(with_suffix(&prefix, ".index"), table).unwrap();
        std::fs::write(with_suffix(&prefix, ".data-00000-of-00001"), data).unwrap();
        prefix
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

    #[test]
    fn reads_a_tensor_it_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = [1.0f32, -2.5].iter().flat_map(|v| v.to_le_bytes()).collect();
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
        let err = TensorBundle::open(&prefix).unwrap().read_tensor("w").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("shard holds 8 bytes"), "{message}");
        assert!(message.contains("variables.data-00000-of-00001"), "{message}");
    }

    #[test]
    fn a_size_that_disagrees_with_dtype_and_shape_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let data = [0u8; 8];
        let prefix = write_bundle(dir.path(), float_entry(&data, &[3]), &data);
        let err = TensorBundle::open(&prefix).unwrap().read_tensor("w").unwrap_err();
        assert!(err.to_string().contains("declares 8 bytes"), "{err}");
    }

    #[test]
    fn a_flipped_data_byte_fails_the_crc_and_names_the_shard_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = [3.0f32].iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut corrupted = data.clone();
        corrupted[0] ^= 0x40;
        let prefix = write_bundle(dir.path(), float_entry(&data, &[1]), &corrupted);
        let err = TensorBundle::open(&prefix).unwrap().read_tensor("w").unwrap_err();
        assert!(matches!(err, LoadError::ChecksumMismatch { ref key, .. } if key == "w"), "{err}");
        assert!(err.to_string().contains("variables.data-00000-of-00001"), "{err}");
    }

    #[test]
    fn negative_offsets_and_missing_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let data = [0u8; 4];
        let mut entry = float_entry(&data, &[1]);
        entry.offset = -4;
        let prefix = write_bundle(dir.path(), entry, &data);
        let bundle = TensorBundle::open(&prefix).unwrap();
        assert!(matches!(bundle.read_tensor("w"), Err(LoadError::CorruptBundle { .. })));
        assert!(matches!(bundle.read_tensor("nope"), Err(LoadError::MissingVariable { .. })));
    }
}
