//! How TensorFlow lays out and checksums one tensor's bytes in a data shard, so that any
//! entry of the index can be verified the way `BundleReader::GetValue` does at restore
//! (tensorflow/core/util/tensor_bundle/tensor_bundle.cc, `WriteTensor`,
//! `WriteStringTensor`, `WriteVariantTensor` and their readers).
//!
//! Pure functions over bytes already read and bounds-checked: no I/O, no allocation
//! driven by a declared size, and every malformed input is a [`Defect`], never a panic.

use tract_tensorflow::tfpb::tensorflow::{DataType, TensorShapeProto};

use super::{element_count, numeric_size};
use crate::sstable::mask_crc;

/// dtypes newer than the `DataType` enum tract ships (TF 2.21 `types.proto`): the float8
/// variants (24-28), int4/uint4 (29-30) and int2/uint2 (31-32). TensorFlow stores all of
/// them as plain element bytes, like the older numeric types.
const RAW_DTYPES_NEWER_THAN_PROTO: std::ops::RangeInclusive<i32> = 24..=32;

/// How an entry's bytes are laid out, which decides how its CRC32C is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Layout {
    /// Numeric dtypes: the little-endian element bytes, checksummed as they are.
    Raw,
    /// `DT_STRING`: a varint64 length per element, the masked CRC32C of those lengths,
    /// then the strings back to back.
    String { elements: u64 },
    /// `DT_VARIANT`: per element, a varint64 length, that many bytes of serialized
    /// `VariantTensorDataProto`, and the masked CRC32C of everything so far.
    Variant { elements: u64 },
}

/// Why an entry's bytes do not match their layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Defect {
    /// The bytes do not follow the layout (a truncated length, lengths that do not add up).
    Framing(String),
    /// A checksum embedded in the layout does not match; `part` says which.
    Checksum { part: String, stored: u32, computed: u32 },
}

impl Layout {
    /// The layout of an entry, after the checks TensorFlow makes on the index alone
    /// (`GetBundleEntryProto`, `GetValue`): a fully defined shape, a size that matches
    /// dtype and shape, and a dtype a checkpoint can hold. `Err` is a detail for a
    /// message that starts with the tensor's key.
    pub(super) fn of(dtype: i32, shape: Option<&TensorShapeProto>, size: i64) -> Result<Self, String> {
        let elements = element_count(shape).ok_or_else(|| format!("has an invalid shape {shape:?}"))?;
        match DataType::try_from(dtype) {
            Ok(DataType::DtString) => {
                // Every string needs at least one byte for its length (TF's lower bound).
                if u64::try_from(size).map_or(true, |size| size < elements) {
                    return Err(format!("declares {size} bytes for {elements} strings"));
                }
                Ok(Self::String { elements })
            }
            Ok(DataType::DtVariant) => Ok(Self::Variant { elements }),
            // Resources are handles and `_REF` types (100+) only type old graphs' op
            // arguments: TensorFlow never saves either, and its reader would refuse them.
            Ok(dt @ (DataType::DtInvalid | DataType::DtResource)) => {
                Err(format!("has dtype {}, which a checkpoint cannot hold", dt.as_str_name()))
            }
            Ok(dt) if dtype >= 100 => Err(format!("has dtype {}, which a checkpoint cannot hold", dt.as_str_name())),
            Ok(dt) => {
                let expected = element_size(dt).map(|element_size| elements.checked_mul(element_size));
                if expected.is_some_and(|expected| expected != u64::try_from(size).ok()) {
                    return Err(format!(
                        "declares {size} bytes but its dtype {} and shape hold {elements} elements",
                        dt.as_str_name()
                    ));
                }
                Ok(Self::Raw)
            }
            Err(_) if RAW_DTYPES_NEWER_THAN_PROTO.contains(&dtype) => Ok(Self::Raw),
            Err(_) => Err(format!("has dtype {dtype}, unknown to TensorFlow 2.21")),
        }
    }

    /// The unmasked CRC32C TensorFlow computes over an entry's bytes, after checking the
    /// checksums the layout embeds. Empty entries checksum to 0, as in TF.
    pub(super) fn crc(self, bytes: &[u8]) -> Result<u32, Defect> {
        match self {
            Self::Raw => Ok(crc32c::crc32c(bytes)),
            _ if bytes.is_empty() => Ok(0),
            Self::String { elements } => string_tensor(bytes, elements).map(|(crc, _)| crc),
            Self::Variant { elements } => variant_tensor(bytes, elements),
        }
    }
}

/// Checks a `DT_STRING` entry of `elements` strings; returns its CRC32C and the offset at
/// which the string bytes start.
///
/// The CRC covers each length as a little-endian u32 when it fits (older checkpoints only
/// had u32 lengths, and TF kept that for compatibility) or else as a u64, then the
/// 4-byte length checksum as stored, then the string bytes.
pub(super) fn string_tensor(bytes: &[u8], elements: u64) -> Result<(u32, usize), Defect> {
    let mut pos = 0;
    let mut crc = 0u32;
    let mut total = 0u64;
    // Each iteration consumes at least one byte or fails, so a huge declared element
    // count cannot make this loop longer than the entry.
    for i in 0..elements {
        let len = read_varint64(bytes, &mut pos)
            .ok_or_else(|| Defect::Framing(format!("length of string {i} is truncated")))?;
        crc = match u32::try_from(len) {
            Ok(len) => crc32c::crc32c_append(crc, &len.to_le_bytes()),
            Err(_) => crc32c::crc32c_append(crc, &len.to_le_bytes()),
        };
        total = total.saturating_add(len);
    }
    let stored =
        read_u32(bytes, pos).ok_or_else(|| Defect::Framing("the string-length checksum is truncated".into()))?;
    if stored != mask_crc(crc) {
        return Err(Defect::Checksum { part: "string lengths".into(), stored, computed: mask_crc(crc) });
    }
    crc = crc32c::crc32c_append(crc, &stored.to_le_bytes());
    let body_at = pos + 4;
    let body = &bytes[body_at..];
    if body.len() as u64 != total {
        return Err(Defect::Framing(format!(
            "string lengths add up to {total} bytes but {} bytes follow them",
            body.len()
        )));
    }
    Ok((crc32c::crc32c_append(crc, body), body_at))
}

/// Checks a `DT_VARIANT` entry of `elements` values; returns its CRC32C.
///
/// Unlike strings, each length enters the CRC as a little-endian u64, and each element
/// is followed by the masked running CRC, which itself enters the CRC. The serialized
/// variants are not decoded: no variant is ever frozen into a graph, only verified.
fn variant_tensor(bytes: &[u8], elements: u64) -> Result<u32, Defect> {
    let mut pos = 0;
    let mut crc = 0u32;
    for i in 0..elements {
        let len = read_varint64(bytes, &mut pos)
            .ok_or_else(|| Defect::Framing(format!("length of variant {i} is truncated")))?;
        crc = crc32c::crc32c_append(crc, &len.to_le_bytes());
        let end = usize::try_from(len).ok().and_then(|len| pos.checked_add(len)).filter(|&end| end <= bytes.len());
        let end = end.ok_or_else(|| {
            Defect::Framing(format!("variant {i} declares {len} bytes but {} remain", bytes.len() - pos))
        })?;
        crc = crc32c::crc32c_append(crc, &bytes[pos..end]);
        pos = end;
        let stored =
            read_u32(bytes, pos).ok_or_else(|| Defect::Framing(format!("checksum of variant {i} is truncated")))?;
        if stored != mask_crc(crc) {
            return Err(Defect::Checksum { part: format!("variant {i}"), stored, computed: mask_crc(crc) });
        }
        crc = crc32c::crc32c_append(crc, &stored.to_le_bytes());
        pos += 4;
    }
    if pos != bytes.len() {
        return Err(Defect::Framing(format!("{elements} variants end at byte {pos} of {}", bytes.len())));
    }
    Ok(crc)
}

/// LevelDB's varint64 as TF reads it (`GetVarint64Ptr`): at most 10 bytes, bits past
/// the 64th dropped. `None` if the bytes end first or the 10th byte still continues.
fn read_varint64(bytes: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*pos)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Bytes per element, for the dtypes whose size TF checks against dtype and shape.
fn element_size(dtype: DataType) -> Option<u64> {
    let size = match dtype {
        DataType::DtQint8 | DataType::DtQuint8 => 1,
        DataType::DtQint16 | DataType::DtQuint16 => 2,
        DataType::DtQint32 => 4,
        DataType::DtComplex64 => 8,
        DataType::DtComplex128 => 16,
        other => numeric_size(other)?,
    };
    Some(size as u64)
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let word = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(word.try_into().expect("4 bytes")))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Encodes strings as TensorFlow's `WriteStringTensor` does; returns the bytes and
    /// the entry's masked CRC32C.
    pub(in crate::bundle) fn encode_strings(strings: &[&[u8]]) -> (Vec<u8>, u32) {
        let mut out = Vec::new();
        let mut crc = 0;
        for s in strings {
            put_varint64(&mut out, s.len() as u64);
            crc = crc32c::crc32c_append(crc, &(s.len() as u32).to_le_bytes());
        }
        let length_checksum = mask_crc(crc).to_le_bytes();
        out.extend_from_slice(&length_checksum);
        crc = crc32c::crc32c_append(crc, &length_checksum);
        for s in strings {
            out.extend_from_slice(s);
            crc = crc32c::crc32c_append(crc, s);
        }
        (out, mask_crc(crc))
    }

    /// Encodes serialized variants as TensorFlow's `WriteVariantTensor` does.
    fn encode_variants(values: &[&[u8]]) -> (Vec<u8>, u32) {
        let mut out = Vec::new();
        let mut crc = 0;
        for v in values {
            put_varint64(&mut out, v.len() as u64);
            crc = crc32c::crc32c_append(crc, &(v.len() as u64).to_le_bytes());
            out.extend_from_slice(v);
            crc = crc32c::crc32c_append(crc, v);
            let checksum = mask_crc(crc).to_le_bytes();
            out.extend_from_slice(&checksum);
            crc = crc32c::crc32c_append(crc, &checksum);
        }
        (out, mask_crc(crc))
    }

    fn put_varint64(out: &mut Vec<u8>, mut value: u64) {
        while value >= 0x80 {
            out.push(value as u8 | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }

    const STRINGS: &[&[u8]] = &[b"sensor", b"", &[0xff; 200]];

    #[test]
    fn string_tensors_checksum_exactly_as_tensorflow_writes_them() {
        let (bytes, stored) = encode_strings(STRINGS);
        let (crc, body_at) = string_tensor(&bytes, STRINGS.len() as u64).unwrap();
        assert_eq!(mask_crc(crc), stored);
        assert_eq!(&bytes[body_at..], [STRINGS[0], STRINGS[1], STRINGS[2]].concat());
        let empty = encode_strings(&[]);
        assert_eq!(mask_crc(Layout::String { elements: 0 }.crc(&empty.0).unwrap()), empty.1);
    }

    #[test]
    fn variant_tensors_checksum_exactly_as_tensorflow_writes_them() {
        let values: &[&[u8]] = &[b"\x0a\x04type", b"", &[7; 300]];
        let (bytes, stored) = encode_variants(values);
        assert_eq!(mask_crc(Layout::Variant { elements: 3 }.crc(&bytes).unwrap()), stored);
    }

    /// CRC32C catches every error burst of up to 32 bits, so any one corrupted byte of a
    /// string or variant entry must be reported, as a framing or a checksum defect.
    #[test]
    fn any_corrupted_byte_of_a_string_or_variant_entry_is_a_defect_never_a_panic() {
        let (strings, strings_crc) = encode_strings(STRINGS);
        let (variants, variants_crc) = encode_variants(STRINGS);
        let cases = [
            (Layout::String { elements: 3 }, strings, strings_crc),
            (Layout::Variant { elements: 3 }, variants, variants_crc),
        ];
        for (layout, original, stored) in cases {
            for at in 0..original.len() {
                let mut bytes = original.clone();
                bytes[at] ^= 0xa5;
                let verdict = layout.crc(&bytes).map(mask_crc);
                assert!(verdict != Ok(stored), "{layout:?}: byte {at} flipped yet the entry verifies");
            }
            for len in 0..original.len() {
                let verdict = layout.crc(&original[..len]).map(mask_crc);
                assert!(verdict != Ok(stored), "{layout:?}: truncated to {len} bytes yet the entry verifies");
            }
        }
    }

    #[test]
    fn a_flipped_string_length_is_reported_as_a_length_checksum_mismatch() {
        let (mut bytes, _) = encode_strings(&[b"abc", b"de"]);
        bytes[1] = 3; // second length 2 -> 3; the lengths no longer match their checksum
        let err = string_tensor(&bytes, 2).unwrap_err();
        assert!(matches!(err, Defect::Checksum { ref part, .. } if part == "string lengths"), "{err:?}");
    }

    #[test]
    fn a_huge_declared_element_count_fails_at_the_end_of_the_bytes() {
        let (strings, _) = encode_strings(&[b"x"]);
        assert!(matches!(string_tensor(&strings, u64::MAX), Err(Defect::Framing(_))));
        let (variants, _) = encode_variants(&[b"x"]);
        assert!(matches!(variant_tensor(&variants, u64::MAX), Err(Defect::Framing(_))));
    }

    #[test]
    fn dtypes_a_checkpoint_cannot_hold_are_refused_and_new_numeric_ones_are_raw() {
        let scalar = None;
        for dtype in [0, DataType::DtResource as i32, DataType::DtFloatRef as i32, 33, -1] {
            assert!(Layout::of(dtype, scalar, 4).is_err(), "dtype {dtype}");
        }
        assert_eq!(Layout::of(24, scalar, 1), Ok(Layout::Raw)); // DT_FLOAT8_E5M2
        assert_eq!(Layout::of(DataType::DtFloat as i32, scalar, 4), Ok(Layout::Raw));
        assert!(Layout::of(DataType::DtFloat as i32, scalar, 8).unwrap_err().contains("declares 8 bytes"));
        assert!(Layout::of(DataType::DtString as i32, scalar, 0).is_err());
        assert_eq!(Layout::of(DataType::DtVariant as i32, scalar, 0), Ok(Layout::Variant { elements: 1 }));
    }
}
