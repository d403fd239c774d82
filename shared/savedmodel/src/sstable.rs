//! A reader for the LevelDB table format ("SSTable") that TensorFlow uses for
//! `variables.index`.
//!
//! Only what a TensorBundle index needs: a footer with the index block handle,
//! uncompressed blocks of prefix-compressed keys, and a masked CRC32C per block.
//! Every offset and length read from the file is checked against the file before it is
//! used, so a corrupt or hostile index yields a [`TableError`], never a panic or an
//! allocation larger than the file itself.

use thiserror::Error;

/// Size of the fixed footer at the end of every table.
const FOOTER_LEN: usize = 48;
/// `kTableMagicNumber`, stored little-endian in the last 8 bytes.
const TABLE_MAGIC: u64 = 0xdb47_7524_8b80_fb57;
/// Each block is followed by a 1-byte compression type and a 4-byte masked CRC32C.
const BLOCK_TRAILER_LEN: usize = 5;
/// CRC mask delta used by LevelDB and TensorFlow (`crc32c::Mask`).
const CRC_MASK_DELTA: u32 = 0xa282_ead8;

/// One key and its value.
pub(crate) type Entry = (Vec<u8>, Vec<u8>);

/// Why a table could not be read. The caller adds the file name.
#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum TableError {
    #[error("file is {0} bytes, too short for a table footer ({FOOTER_LEN} bytes)")]
    TooShort(usize),
    #[error("bad table magic {found:#018x} (expected {TABLE_MAGIC:#018x}); not a TensorBundle index")]
    BadMagic { found: u64 },
    #[error("{what} at byte {at}: {detail}")]
    Malformed { what: &'static str, at: usize, detail: String },
    #[error(
        "block at byte {offset} ({size} bytes) fails its CRC32C check (stored {stored:#010x}, computed {computed:#010x})"
    )]
    BlockCrc { offset: u64, size: u64, stored: u32, computed: u32 },
    #[error("block at byte {offset} uses compression type {kind}; only uncompressed tables (type 0) are supported")]
    Compressed { offset: u64, kind: u8 },
}

/// TensorFlow's masked CRC32C (`crc32c::Mask`): rotate right by 15 and add a constant,
/// so that CRCs of data that embeds CRCs stay well distributed.
pub(crate) fn mask_crc(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(CRC_MASK_DELTA)
}

/// Reads every `(key, value)` of a table held in memory, in key order.
pub(crate) fn read_entries(file: &[u8]) -> Result<Vec<Entry>, TableError> {
    if file.len() < FOOTER_LEN {
        return Err(TableError::TooShort(file.len()));
    }
    let footer_at = file.len() - FOOTER_LEN;
    let footer = &file[footer_at..];
    let magic = u64::from_le_bytes(footer[40..48].try_into().expect("8-byte slice"));
    if magic != TABLE_MAGIC {
        return Err(TableError::BadMagic { found: magic });
    }
    let mut cursor = Cursor { data: footer, pos: 0, base: footer_at };
    let _metaindex = cursor.block_handle()?;
    let index = cursor.block_handle()?;

    let index_block = read_block(file, index)?;
    let mut entries = Vec::new();
    for (_, handle_bytes) in block_entries(index_block, index.offset as usize)? {
        let mut cursor = Cursor { data: &handle_bytes, pos: 0, base: index.offset as usize };
        let handle = cursor.block_handle()?;
        let block = read_block(file, handle)?;
        entries.extend(block_entries(block, handle.offset as usize)?);
    }
    Ok(entries)
}

#[derive(Debug, Clone, Copy)]
struct BlockHandle {
    offset: u64,
    size: u64,
}

/// Returns the block's contents after checking bounds, compression type and CRC.
fn read_block(file: &[u8], handle: BlockHandle) -> Result<&[u8], TableError> {
    let end = handle
        .offset
        .checked_add(handle.size)
        .and_then(|end| end.checked_add(BLOCK_TRAILER_LEN as u64))
        .filter(|&end| end <= file.len() as u64)
        .ok_or_else(|| TableError::Malformed {
            what: "block handle",
            at: handle.offset as usize,
            detail: format!(
                "block of {} bytes at byte {} runs past the end of the {}-byte file",
                handle.size,
                handle.offset,
                file.len()
            ),
        })?;
    let start = handle.offset as usize;
    let contents_end = end as usize - BLOCK_TRAILER_LEN;
    let kind = file[contents_end];
    let stored = u32::from_le_bytes(file[contents_end + 1..end as usize].try_into().expect("4 bytes"));
    // The CRC covers the contents and the compression-type byte.
    let computed = mask_crc(crc32c::crc32c(&file[start..=contents_end]));
    if stored != computed {
        return Err(TableError::BlockCrc { offset: handle.offset, size: handle.size, stored, computed });
    }
    if kind != 0 {
        return Err(TableError::Compressed { offset: handle.offset, kind });
    }
    Ok(&file[start..contents_end])
}

/// Decodes a block's prefix-compressed entries. `base` is the block's file offset, for errors.
fn block_entries(block: &[u8], base: usize) -> Result<Vec<Entry>, TableError> {
    let malformed = |at: usize, detail: String| TableError::Malformed { what: "block", at: base + at, detail };
    if block.len() < 4 {
        return Err(malformed(0, format!("{} bytes is too short for a restart count", block.len())));
    }
    let restarts = u32::from_le_bytes(block[block.len() - 4..].try_into().expect("4 bytes")) as usize;
    let restart_bytes = restarts
        .checked_add(1)
        .and_then(|n| n.checked_mul(4))
        .filter(|&n| n <= block.len())
        .ok_or_else(|| malformed(block.len() - 4, format!("{restarts} restart points do not fit")))?;
    let entries_end = block.len() - restart_bytes;

    let mut cursor = Cursor { data: &block[..entries_end], pos: 0, base };
    let mut key: Vec<u8> = Vec::new();
    let mut entries = Vec::new();
    while cursor.pos < entries_end {
        let shared = cursor.varint32("shared key length")? as usize;
        let unshared = cursor.varint32("unshared key length")? as usize;
        let value_len = cursor.varint32("value length")? as usize;
        if shared > key.len() {
            return Err(malformed(
                cursor.pos,
                format!("entry shares {shared} bytes with a {}-byte previous key", key.len()),
            ));
        }
        key.truncate(shared);
        key.extend_from_slice(cursor.take(unshared, "key")?);
        let value = cursor.take(value_len, "value")?.to_vec();
        entries.push((key.clone(), value));
    }
    Ok(entries)
}

/// A bounds-checked reader over a byte slice; `base` is the slice's offset in the file.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], TableError> {
        let end =
            self.pos.checked_add(len).filter(|&end| end <= self.data.len()).ok_or_else(|| TableError::Malformed {
                what,
                at: self.base + self.pos,
                detail: format!("{len} bytes declared, {} left", self.data.len() - self.pos),
            })?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn varint64(&mut self, what: &'static str) -> Result<u64, TableError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.data.get(self.pos).ok_or_else(|| TableError::Malformed {
                what,
                at: self.base + self.pos,
                detail: "varint runs past the end".into(),
            })?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(TableError::Malformed { what, at: self.base + self.pos, detail: "varint longer than 10 bytes".into() })
    }

    fn varint32(&mut self, what: &'static str) -> Result<u32, TableError> {
        let at = self.base + self.pos;
        let value = self.varint64(what)?;
        u32::try_from(value).map_err(|_| TableError::Malformed { what, at, detail: format!("{value} exceeds 32 bits") })
    }

    fn block_handle(&mut self) -> Result<BlockHandle, TableError> {
        Ok(BlockHandle { offset: self.varint64("block handle offset")?, size: self.varint64("block handle size")? })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// Appends a block (restart at every entry, no prefix sharing) with its trailer.
    fn push_block(file: &mut Vec<u8>, entries: &[(&[u8], &[u8])]) -> (u64, u64) {
        let offset = file.len();
        let mut block = Vec::new();
        let mut restarts = Vec::new();
        for (key, value) in entries {
            restarts.push(block.len() as u32);
            put_varint(&mut block, 0);
            put_varint(&mut block, key.len() as u64);
            put_varint(&mut block, value.len() as u64);
            block.extend_from_slice(key);
            block.extend_from_slice(value);
        }
        if restarts.is_empty() {
            restarts.push(0);
        }
        for r in &restarts {
            block.extend_from_slice(&r.to_le_bytes());
        }
        block.extend_from_slice(&(restarts.len() as u32).to_le_bytes());
        let size = block.len() as u64;
        file.extend_from_slice(&block);
        file.push(0);
        let crc = mask_crc(crc32c::crc32c(&file[offset..]));
        file.extend_from_slice(&crc.to_le_bytes());
        (offset as u64, size)
    }

    /// Builds a minimal valid table holding `entries` (already in key order). Used by the
    /// bundle tests to craft hostile indexes that TensorFlow would never write.
    pub(crate) fn build_table(entries: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut file = Vec::new();
        let (data_off, data_size) = push_block(&mut file, entries);
        let (meta_off, meta_size) = push_block(&mut file, &[]);
        let mut handle = Vec::new();
        put_varint(&mut handle, data_off);
        put_varint(&mut handle, data_size);
        let last_key = entries.last().map(|(k, _)| *k).unwrap_or(b"");
        let (index_off, index_size) = push_block(&mut file, &[(last_key, &handle)]);
        let mut footer = Vec::new();
        put_varint(&mut footer, meta_off);
        put_varint(&mut footer, meta_size);
        put_varint(&mut footer, index_off);
        put_varint(&mut footer, index_size);
        footer.resize(40, 0);
        footer.extend_from_slice(&TABLE_MAGIC.to_le_bytes());
        file.extend_from_slice(&footer);
        file
    }

    #[test]
    fn reads_back_what_was_written() {
        let table = build_table(&[(b"", b"header"), (b"a/kernel", b"one"), (b"b", b"")]);
        let entries = read_entries(&table).unwrap();
        assert_eq!(
            entries,
            vec![
                (b"".to_vec(), b"header".to_vec()),
                (b"a/kernel".to_vec(), b"one".to_vec()),
                (b"b".to_vec(), b"".to_vec())
            ]
        );
    }

    #[test]
    fn rejects_short_files_and_bad_magic() {
        assert_eq!(read_entries(&[0u8; 10]), Err(TableError::TooShort(10)));
        let mut table = build_table(&[(b"k", b"v")]);
        let n = table.len();
        table[n - 1] ^= 0xff;
        assert!(matches!(read_entries(&table), Err(TableError::BadMagic { .. })));
    }

    #[test]
    fn detects_a_flipped_byte_in_a_block() {
        let mut table = build_table(&[(b"key", b"value")]);
        table[4] ^= 0x01;
        assert!(matches!(read_entries(&table), Err(TableError::BlockCrc { .. })));
    }

    #[test]
    fn block_handles_past_the_end_are_errors_not_panics() {
        let mut table = build_table(&[(b"key", b"value")]);
        let footer_at = table.len() - FOOTER_LEN;
        // Point the index handle far past the end of the file.
        let mut footer = Vec::new();
        put_varint(&mut footer, 0);
        put_varint(&mut footer, 0);
        put_varint(&mut footer, u64::MAX - 2);
        put_varint(&mut footer, 1 << 40);
        footer.resize(40, 0);
        footer.extend_from_slice(&TABLE_MAGIC.to_le_bytes());
        table.splice(footer_at.., footer);
        assert!(matches!(read_entries(&table), Err(TableError::Malformed { what: "block handle", .. })));
    }

    #[test]
    fn truncation_at_every_length_is_an_error() {
        let table = build_table(&[(b"", b"header"), (b"kernel", b"0123456789")]);
        for len in 0..table.len() {
            assert!(read_entries(&table[..len]).is_err(), "truncated to {len} bytes was accepted");
        }
    }
}
