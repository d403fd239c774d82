//! TensorFlow's checkpoint format, the TensorBundle: `variables.index` (a LevelDB table
//! of `BundleEntryProto`s) plus data shards `variables.data-NNNNN-of-MMMMM`.
//!
//! Opening a bundle verifies every entry of the index against its stored CRC32C, as
//! TensorFlow does when it restores a SavedModel: optimizer slots, counters and any other
//! tensor no signature reads included, so a corrupt checkpoint fails the load instead of
//! loading silently. That pass reads each shard once in offset order and keeps none of
//! the bytes. Measured (`tests::verification_cost`, release, page cache warm): about
//! 0.18 ms per MB of checkpoint (5.7 GB/s; CRC32C alone runs at 10.5 GB/s), i.e. 15 µs
//! for the 28 KB `car_anomaly_flags_everything` checkpoint, 0.2% of its 7.3 ms load.
//!
//! Freezing then reads only the tensors a signature uses, and checks each one's bounds
//! and CRC32C again on the bytes it actually freezes. Those bytes are read twice (the
//! second time from the page cache) rather than trusted from the first pass, so a shard
//! rewritten between open and freeze is still caught; that second read is what loading
//! cost before the full check existed, about the same per byte as the first.

mod layout;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use prost::Message;
use tract_tensorflow::tfpb::tensorflow::{DataType, TensorProto, TensorShapeProto, VersionDef};

use self::layout::{Defect, Layout};
use crate::error::LoadError;
use crate::sstable::{self, mask_crc};

/// Checkpoint key of the serialized `TrackableObjectGraph` in TF2 checkpoints.
pub(crate) const OBJECT_GRAPH_KEY: &str = "_CHECKPOINTABLE_OBJECT_GRAPH";

/// Read size of the verification pass: large enough that syscalls do not matter, small
/// enough that verifying a multi-GB tensor never holds more than this in memory.
const VERIFY_CHUNK: usize = 1 << 20;

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

/// An opened TensorBundle: the parsed index, every entry verified; shards are read on demand.
#[derive(Debug)]
pub(crate) struct TensorBundle {
    index_path: PathBuf,
    prefix: PathBuf,
    num_shards: i32,
    entries: HashMap<String, BundleEntryProto>,
}

impl TensorBundle {
    /// Opens `<prefix>.index`, e.g. prefix `<dir>/variables/variables`, and verifies every
    /// entry's bytes in the data shards against its CRC32C.
    pub(crate) fn open(prefix: &Path) -> Result<Self, LoadError> {
        let bundle = Self::read_index(prefix)?;
        bundle.verify_all()?;
        Ok(bundle)
    }

    /// Parses the index alone; no shard is touched.
    fn read_index(prefix: &Path) -> Result<Self, LoadError> {
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
        check_crc(&shard, key, entry, crc32c::crc32c(&bytes))?;
        Ok(TensorProto {
            dtype: entry.dtype,
            tensor_shape: entry.shape.clone(),
            tensor_content: bytes,
            ..Default::default()
        })
    }

    /// Reads a scalar `DT_STRING` tensor (e.g. the object graph): its one string's bytes.
    pub(crate) fn read_scalar_string(&self, key: &str) -> Result<Vec<u8>, LoadError> {
        let entry = self.entry(key)?;
        if entry.dtype != DataType::DtString as i32 || element_count(entry.shape.as_ref()) != Some(1) {
            return Err(LoadError::CorruptBundle {
                path: self.index_path.clone(),
                detail: format!("{key:?} is not a scalar string"),
            });
        }
        let (shard, mut bytes) = self.read_bytes(key, entry)?;
        let (crc, body_at) = layout::string_tensor(&bytes, 1).map_err(|defect| defect_error(&shard, key, defect))?;
        check_crc(&shard, key, entry, crc)?;
        Ok(bytes.split_off(body_at))
    }

    /// Verifies every entry, shard by shard in offset order, so each shard is read once
    /// front to back. Sorting by (shard, offset, key) also makes the entry reported when
    /// several are corrupt the same on every run.
    fn verify_all(&self) -> Result<(), LoadError> {
        let mut planned: Vec<(&str, &BundleEntryProto)> = self
            .entries
            .iter()
            // A partitioned variable's own entry only lists its slices; each slice is an
            // entry of its own, with its own bytes and CRC (TF never reads the former).
            .filter(|(_, entry)| entry.slices.is_empty())
            .map(|(key, entry)| (key.as_str(), entry))
            .collect();
        planned.sort_unstable_by_key(|&(key, entry)| (entry.shard_id, entry.offset, key));

        let mut buffer = Vec::new();
        let mut current: Option<(i32, Shard)> = None;
        for (key, entry) in planned {
            let layout = Layout::of(entry.dtype, entry.shape.as_ref(), entry.size).map_err(|detail| {
                LoadError::CorruptBundle { path: self.index_path.clone(), detail: format!("tensor {key:?} {detail}") }
            })?;
            let shard = match &mut current {
                Some((id, shard)) if *id == entry.shard_id => shard,
                slot => &mut slot.insert((entry.shard_id, Shard::open(self.shard_path(key, entry)?, VERIFY_CHUNK)?)).1,
            };
            let (offset, size) = shard.range(key, entry)?;
            shard.seek(offset)?;
            let crc = match layout {
                // Streamed, so one huge tensor never needs its full size in memory.
                Layout::Raw => {
                    buffer.resize(VERIFY_CHUNK.min(size).max(buffer.len()), 0);
                    let mut crc = 0;
                    let mut left = size;
                    while left > 0 {
                        let chunk = &mut buffer[..left.min(VERIFY_CHUNK)];
                        shard.read_exact(chunk)?;
                        crc = crc32c::crc32c_append(crc, chunk);
                        left -= chunk.len();
                    }
                    crc
                }
                // Strings and variants are parsed whole; bounded by the shard's real size.
                Layout::String { .. } | Layout::Variant { .. } => {
                    buffer.resize(size, 0);
                    shard.read_exact(&mut buffer)?;
                    layout.crc(&buffer).map_err(|defect| defect_error(&shard.path, key, defect))?
                }
            };
            check_crc(&shard.path, key, entry, crc)?;
        }
        Ok(())
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
        let mut shard = Shard::open(self.shard_path(key, entry)?, 0)?;
        let (offset, size) = shard.range(key, entry)?;
        let mut bytes = vec![0u8; size];
        shard.seek(offset)?;
        shard.read_exact(&mut bytes)?;
        Ok((shard.path, bytes))
    }

    /// `<prefix>.data-NNNNN-of-MMMMM` of an entry, once its shard id is known to be valid.
    fn shard_path(&self, key: &str, entry: &BundleEntryProto) -> Result<PathBuf, LoadError> {
        if entry.shard_id < 0 || entry.shard_id >= self.num_shards {
            return Err(LoadError::CorruptBundle {
                path: self.index_path.clone(),
                detail: format!("tensor {key:?} is in shard {} of {}", entry.shard_id, self.num_shards),
            });
        }
        Ok(with_suffix(&self.prefix, &format!(".data-{:05}-of-{:05}", entry.shard_id, self.num_shards)))
    }
}

/// An open data shard, with its real length for bounds checks and the read position.
struct Shard {
    path: PathBuf,
    file: BufReader<File>,
    len: u64,
    pos: u64,
}

impl Shard {
    /// `buffer` is the read-ahead size: the verification pass reads many neighbouring
    /// entries, a single tensor read needs none.
    fn open(path: PathBuf, buffer: usize) -> Result<Self, LoadError> {
        let file = File::open(&path).map_err(|source| LoadError::Io { path: path.clone(), source })?;
        let len = file.metadata().map_err(|source| LoadError::Io { path: path.clone(), source })?.len();
        Ok(Self { path, file: BufReader::with_capacity(buffer, file), len, pos: 0 })
    }

    /// An entry's `(offset, size)`, checked to lie within the shard.
    fn range(&self, key: &str, entry: &BundleEntryProto) -> Result<(u64, usize), LoadError> {
        let range = u64::try_from(entry.offset).ok().zip(u64::try_from(entry.size).ok());
        match range {
            Some((offset, size)) if offset.checked_add(size).is_some_and(|end| end <= self.len) => {
                Ok((offset, usize::try_from(size).expect("no larger than a file we opened")))
            }
            _ => Err(LoadError::CorruptBundle {
                path: self.path.clone(),
                detail: format!(
                    "tensor {key:?} declares {} bytes at offset {} but the shard holds {} bytes",
                    entry.size, entry.offset, self.len
                ),
            }),
        }
    }

    /// Moves to `offset`, keeping the read-ahead buffer when the target is inside it.
    fn seek(&mut self, offset: u64) -> Result<(), LoadError> {
        if offset != self.pos {
            // Both are at most the shard's length, so the difference fits an i64.
            let delta = offset as i64 - self.pos as i64;
            self.file.seek_relative(delta).map_err(|source| LoadError::Io { path: self.path.clone(), source })?;
            self.pos = offset;
        }
        Ok(())
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), LoadError> {
        self.file.read_exact(buf).map_err(|source| LoadError::Io { path: self.path.clone(), source })?;
        self.pos += buf.len() as u64;
        Ok(())
    }
}

/// Compares the CRC32C computed over an entry's bytes with the one the index stores.
fn check_crc(shard: &Path, key: &str, entry: &BundleEntryProto, crc: u32) -> Result<(), LoadError> {
    let computed = mask_crc(crc);
    if computed != entry.crc32c {
        return Err(LoadError::ChecksumMismatch {
            path: shard.to_owned(),
            key: key.into(),
            stored: entry.crc32c,
            computed,
        });
    }
    Ok(())
}

/// The error for bytes that do not follow their string or variant layout.
fn defect_error(shard: &Path, key: &str, defect: Defect) -> LoadError {
    match defect {
        Defect::Framing(detail) => {
            LoadError::CorruptBundle { path: shard.to_owned(), detail: format!("tensor {key:?}: {detail}") }
        }
        Defect::Checksum { part, stored, computed } => {
            LoadError::ChecksumMismatch { path: shard.to_owned(), key: format!("{key} ({part})"), stored, computed }
        }
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
mod tests;
