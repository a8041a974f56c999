//! The header slots (docs/COMPRESSED-IMAGE.md, "Header slot"): two copies at file offsets 0 and
//! 4096, each with its own hash and a generation counter, so a commit that dies while writing
//! one leaves the other.

use blksync_core::fields::Decoder;
use xxhash_rust::xxh3::xxh3_64;

/// The first bytes of every compressed image.
pub const MAGIC: [u8; 8] = *b"BLKSYNCZ";
/// The format version written and read.
pub const VERSION: u32 = 1;
/// Bytes of a slot that carry fields (the rest of its 4096 are zeros): 72, and 32 more with
/// the [`PATCHES`] flag.
pub const LEN: usize = 104;
/// Bytes of a slot without the [`PATCHES`] flag: the format before patches.
pub const BASE_LEN: usize = 72;
/// Flag bit 0: the slot carries the patch table's fields.
pub const PATCHES: u32 = 1;
/// Bytes reserved for each slot.
pub const SLOT: u64 = 4096;
/// Where the data area starts: after both slots.
pub const DATA_START: u64 = 2 * SLOT;
/// The allocation unit: every payload and index starts on a multiple of it.
pub const UNIT: u64 = 4096;
/// Bytes of one index entry.
pub const ENTRY_LEN: u64 = 24;
/// Bytes of one patch table entry.
pub const PATCH_LEN: u64 = 32;

/// Smallest and largest chunk size.
pub const MIN_CHUNK: u32 = 4096;
/// Largest chunk size: decompression buffers are one chunk each.
pub const MAX_CHUNK: u32 = 16 << 20;
/// Largest logical size.
pub const MAX_SIZE: u64 = 1 << 62;
/// Most chunks an image may have (chunk numbers fit a u32).
pub const MAX_COUNT: u64 = u32::MAX as u64;

/// Why a slot is not usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// Not a compressed image's header at all.
    Magic,
    /// Another format version: written by another blksync.
    Version(u32),
    /// A flag this reader does not know.
    Flags(u32),
    /// The hash does not match: a torn write, or damage.
    Hash,
    /// A field is outside its limits.
    Field(String),
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Invalid::Magic => f.write_str("not a blksync compressed image (bad magic)"),
            Invalid::Version(v) => write!(f, "format version {v}, but this blksync reads version {VERSION}"),
            Invalid::Flags(flags) => write!(f, "unknown feature flags {flags:#x} (written by a newer blksync)"),
            Invalid::Hash => f.write_str("header checksum mismatch"),
            Invalid::Field(what) => f.write_str(what),
        }
    }
}

/// One header slot's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Bytes per chunk.
    pub chunk_size: u32,
    /// zstd level for new chunks.
    pub level: i32,
    /// Commit counter.
    pub generation: u64,
    /// Logical size.
    pub size: u64,
    /// File offset of the index.
    pub index_offset: u64,
    /// Entries in the index.
    pub count: u64,
    /// XXH3-64 of the index bytes.
    pub index_hash: u64,
    /// File offset of the patch table (0 when `patch_count` is 0).
    pub patch_offset: u64,
    /// Entries in the patch table; the [`PATCHES`] flag is set exactly when it is not 0.
    pub patch_count: u64,
    /// XXH3-64 of the patch table bytes (0 when `patch_count` is 0).
    pub patch_hash: u64,
}

/// Most blocks a patch record of an image with chunks of `chunk_size` may hold: half the
/// chunk's (0 for 4 KiB chunks, which have no patches).
#[must_use]
pub fn max_record_blocks(chunk_size: u32) -> u32 {
    chunk_size / 8192
}

/// Whether `level` is a zstd level this format accepts.
#[must_use]
pub fn level_ok(level: i32) -> bool {
    (-7..=19).contains(&level) && level != 0
}

/// Whether `chunk_size` is one this format accepts.
#[must_use]
pub fn chunk_size_ok(chunk_size: u32) -> bool {
    chunk_size.is_power_of_two() && (MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size)
}

/// Chunks needed for `size` bytes.
#[must_use]
pub fn chunks_for(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size))
}

/// `n` rounded up to the allocation unit.
#[must_use]
pub fn round_up(n: u64) -> u64 {
    n.div_ceil(UNIT) * UNIT
}

impl Header {
    /// The slot's bytes.
    #[must_use]
    pub fn encode(&self) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let flags = if self.patch_count > 0 { PATCHES } else { 0 };
        out[12..16].copy_from_slice(&flags.to_le_bytes());
        out[16..20].copy_from_slice(&self.chunk_size.to_le_bytes());
        out[20..24].copy_from_slice(&self.level.to_le_bytes());
        out[24..32].copy_from_slice(&self.generation.to_le_bytes());
        out[32..40].copy_from_slice(&self.size.to_le_bytes());
        out[40..48].copy_from_slice(&self.index_offset.to_le_bytes());
        out[48..56].copy_from_slice(&self.count.to_le_bytes());
        out[56..64].copy_from_slice(&self.index_hash.to_le_bytes());
        let hash = xxh3_64(&out[..64]);
        out[64..72].copy_from_slice(&hash.to_le_bytes());
        if flags & PATCHES != 0 {
            out[72..80].copy_from_slice(&self.patch_offset.to_le_bytes());
            out[80..88].copy_from_slice(&self.patch_count.to_le_bytes());
            out[88..96].copy_from_slice(&self.patch_hash.to_le_bytes());
            let hash = xxh3_64(&out[..96]);
            out[96..104].copy_from_slice(&hash.to_le_bytes());
        }
        out
    }

    /// Decodes a slot (at least [`BASE_LEN`] bytes, [`LEN`] with the [`PATCHES`] flag; fewer is
    /// a bad magic or a torn slot) and checks every field against the limits that do not depend
    /// on the file. Checks in the spec's order: magic, version, hash, flags, tail hash, fields.
    pub fn decode(bytes: &[u8]) -> Result<Header, Invalid> {
        if bytes.len() < 8 || bytes[..8] != MAGIC {
            return Err(Invalid::Magic);
        }
        if bytes.len() < BASE_LEN {
            return Err(Invalid::Hash);
        }
        let field = |e: blksync_core::Error| Invalid::Field(e.to_string());
        let mut d = Decoder::new(&bytes[8..BASE_LEN], "header");
        let version = d.u32().map_err(field)?;
        if version != VERSION {
            return Err(Invalid::Version(version));
        }
        let flags = d.u32().map_err(field)?;
        // The hash first: a torn slot's fields are noise, and must be reported as torn.
        let stored_hash = u64::from_le_bytes(bytes[64..72].try_into().map_err(|_| Invalid::Hash)?);
        if xxh3_64(&bytes[..64]) != stored_hash {
            return Err(Invalid::Hash);
        }
        if flags & !PATCHES != 0 {
            return Err(Invalid::Flags(flags));
        }
        let (mut patch_offset, mut patch_count, mut patch_hash) = (0, 0, 0);
        if flags & PATCHES != 0 {
            let tail = bytes.get(..LEN).ok_or(Invalid::Hash)?;
            let word = |at: usize| u64::from_le_bytes(tail[at..at + 8].try_into().unwrap_or_default());
            if xxh3_64(&tail[..96]) != word(96) {
                return Err(Invalid::Hash);
            }
            (patch_offset, patch_count, patch_hash) = (word(72), word(80), word(88));
            if patch_count == 0 {
                return Err(Invalid::Field("the patches flag with an empty patch table".into()));
            }
        }
        let header = Header {
            chunk_size: d.u32().map_err(field)?,
            level: d.i32().map_err(field)?,
            generation: d.u64().map_err(field)?,
            size: d.u64().map_err(field)?,
            index_offset: d.u64().map_err(field)?,
            count: d.u64().map_err(field)?,
            index_hash: d.u64().map_err(field)?,
            patch_offset,
            patch_count,
            patch_hash,
        };
        header.check().map_err(Invalid::Field)?;
        Ok(header)
    }

    /// The limits of the spec that hold whatever the file's length.
    fn check(&self) -> Result<(), String> {
        if !chunk_size_ok(self.chunk_size) {
            return Err(format!("chunk size {} is not a power of two in 4 KiB ..= 16 MiB", self.chunk_size));
        }
        if !level_ok(self.level) {
            return Err(format!("compression level {} is outside -7 ..= 19 (or 0)", self.level));
        }
        if self.generation == 0 {
            return Err("generation 0".into());
        }
        if self.size > MAX_SIZE {
            return Err(format!("logical size {} is larger than 2^62", self.size));
        }
        let count = chunks_for(self.size, self.chunk_size);
        if self.count != count || count > MAX_COUNT {
            return Err(format!("index of {} entries for {count} chunks", self.count));
        }
        if self.count == 0 && self.index_offset != 0 {
            return Err("an empty index with an offset".into());
        }
        if self.count > 0 && (self.index_offset < DATA_START || !self.index_offset.is_multiple_of(UNIT)) {
            return Err(format!("index at file offset {} (not an aligned offset in the data area)", self.index_offset));
        }
        if self.patch_count > self.count {
            return Err(format!("patch table of {} entries for {} chunks", self.patch_count, self.count));
        }
        if self.patch_count > 0 && max_record_blocks(self.chunk_size) == 0 {
            return Err(format!("a patch table in an image of {}-byte chunks", self.chunk_size));
        }
        if self.patch_count == 0 && (self.patch_offset != 0 || self.patch_hash != 0) {
            return Err("an empty patch table with an offset".into());
        }
        if self.patch_count > 0 && (self.patch_offset < DATA_START || !self.patch_offset.is_multiple_of(UNIT)) {
            return Err(format!(
                "patch table at file offset {} (not an aligned offset in the data area)",
                self.patch_offset
            ));
        }
        Ok(())
    }

    /// Bytes of the patch table.
    #[must_use]
    pub fn patch_len(&self) -> u64 {
        self.patch_count * PATCH_LEN
    }

    /// Bytes of the index.
    #[must_use]
    pub fn index_len(&self) -> u64 {
        self.count * ENTRY_LEN
    }
}

/// Picks the slot `open` uses from both slots' decodings: the valid one with the higher
/// generation (slot 0 on a tie). A slot of another version or with unknown flags refuses the
/// whole file, whichever slot it is: its writer may have reused what the other slot references.
pub fn choose(slots: [Result<Header, Invalid>; 2]) -> Result<(usize, Header), Invalid> {
    match slots {
        [Err(Invalid::Magic), _] => Err(Invalid::Magic),
        // A version or a flag is the more telling reason when neither slot is valid.
        [Err(e @ (Invalid::Version(_) | Invalid::Flags(_))), _]
        | [_, Err(e @ (Invalid::Version(_) | Invalid::Flags(_)))]
        | [Err(e), Err(_)] => Err(e),
        [Ok(a), Ok(b)] => Ok(if b.generation > a.generation { (1, b) } else { (0, a) }),
        [Ok(a), Err(_)] => Ok((0, a)),
        [Err(_), Ok(b)] => Ok((1, b)),
    }
}

/// Whether `head`, the first bytes of a file, begins a compressed image.
#[must_use]
pub fn sniff(head: &[u8]) -> bool {
    head.starts_with(&MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> Header {
        Header {
            chunk_size: 1 << 20,
            level: 3,
            generation: 7,
            size: (5 << 20) + 1,
            index_offset: DATA_START,
            count: 6,
            index_hash: 42,
            patch_offset: 0,
            patch_count: 0,
            patch_hash: 0,
        }
    }

    fn patched() -> Header {
        Header { patch_offset: 3 * DATA_START, patch_count: 2, patch_hash: 77, ..header() }
    }

    proptest! {
        #[test]
        fn every_valid_header_round_trips(
            shift in 12u32..=24, level in -7i32..=19, generation in 1u64.., size in any::<u64>(),
            at in 2u64..1 << 40, index_hash in any::<u64>(), patches in any::<u64>(), patch_at in 2u64..1 << 40,
            patch_hash in any::<u64>(),
        ) {
            let chunk_size = 1u32 << shift;
            let level = if level == 0 { 1 } else { level };
            let size = size % (MAX_COUNT * u64::from(chunk_size)).min(MAX_SIZE);
            let count = chunks_for(size, chunk_size);
            let index_offset = if count == 0 { 0 } else { at * UNIT };
            let patch_count = if chunk_size < 8192 { 0 } else { patches % (count + 1) };
            let (patch_offset, patch_hash) = if patch_count == 0 { (0, 0) } else { (patch_at * UNIT, patch_hash) };
            let h = Header {
                chunk_size, level, generation, size, index_offset, count, index_hash, patch_offset, patch_count, patch_hash,
            };
            let bytes = h.encode();
            prop_assert_eq!(Header::decode(&bytes), Ok(h));
            if patch_count == 0 {
                prop_assert!(bytes[BASE_LEN..].iter().all(|&b| b == 0), "no flag: the format before patches");
                prop_assert_eq!(Header::decode(&bytes[..BASE_LEN]), Ok(h));
            }
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_is_a_bad_magic_version_or_hash() {
        for (good, len) in [(header().encode(), BASE_LEN), (patched().encode(), LEN)] {
            for byte in 0..len {
                for bit in 0..8 {
                    let mut bad = good;
                    bad[byte] ^= 1 << bit;
                    let e = Header::decode(&bad).unwrap_err();
                    let expected = match byte {
                        0..8 => Invalid::Magic,
                        8..12 => Invalid::Version(VERSION ^ (1 << (8 * (byte - 8) + bit))),
                        _ => Invalid::Hash,
                    };
                    assert_eq!(e, expected, "byte {byte} bit {bit}");
                }
            }
            // Without the flag, what follows the 72 bytes is not read.
            let mut tail = header().encode();
            tail[80] = 1;
            assert_eq!(Header::decode(&tail), Ok(header()));
        }
        // A slot torn after the first hash: the old patch fields fail the tail hash.
        let mut torn = patched().encode();
        let older = Header { generation: 6, patch_count: 1, ..patched() };
        torn[BASE_LEN..].copy_from_slice(&older.encode()[BASE_LEN..]);
        assert_eq!(Header::decode(&torn), Err(Invalid::Hash));
        assert_eq!(Header::decode(&patched().encode()[..BASE_LEN]), Err(Invalid::Hash), "a flagged slot cut short");
    }

    #[test]
    fn fields_out_of_their_limits_are_refused_even_with_a_right_hash() {
        let bad = [
            Header { chunk_size: 3 << 20, ..header() },
            Header { chunk_size: 2048, ..header() },
            Header { chunk_size: 32 << 20, ..header() },
            Header { level: 0, ..header() },
            Header { level: 20, ..header() },
            Header { generation: 0, ..header() },
            Header { size: MAX_SIZE + 1, count: chunks_for(MAX_SIZE + 1, 1 << 20), ..header() },
            Header { count: 5, ..header() },
            Header { index_offset: 4096, ..header() },
            Header { index_offset: DATA_START + 1, ..header() },
            Header { size: 0, count: 0, ..header() },
            Header { size: 1 << 52, count: 1 << 32, chunk_size: 4096, ..header() },
            Header { patch_count: 7, ..patched() },
            Header { patch_offset: 4096, ..patched() },
            Header { patch_offset: DATA_START + 8, ..patched() },
            Header { chunk_size: 4096, size: 6 * 4096, ..patched() },
        ];
        for h in bad {
            assert!(matches!(Header::decode(&h.encode()), Err(Invalid::Field(_))), "{h:?}");
        }
        let mut flagged = header().encode();
        flagged[12] = 2;
        let hash = xxh3_64(&flagged[..64]);
        flagged[64..72].copy_from_slice(&hash.to_le_bytes());
        assert_eq!(Header::decode(&flagged), Err(Invalid::Flags(2)));
        // The patches flag with an empty table (the tail hash right).
        let mut empty = header().encode();
        empty[12] = 1;
        let hash = xxh3_64(&empty[..64]);
        empty[64..72].copy_from_slice(&hash.to_le_bytes());
        let hash = xxh3_64(&empty[..96]);
        empty[96..104].copy_from_slice(&hash.to_le_bytes());
        assert!(matches!(Header::decode(&empty), Err(Invalid::Field(_))));
    }

    #[test]
    fn the_newest_valid_slot_wins_and_a_torn_one_is_skipped() {
        let old = header();
        let new = Header { generation: 8, ..old };
        assert_eq!(choose([Ok(old), Ok(new)]), Ok((1, new)));
        assert_eq!(choose([Ok(new), Ok(old)]), Ok((0, new)));
        assert_eq!(choose([Err(Invalid::Hash), Ok(old)]), Ok((1, old)));
        assert_eq!(choose([Ok(old), Err(Invalid::Hash)]), Ok((0, old)));
        assert_eq!(choose([Err(Invalid::Magic), Ok(old)]), Err(Invalid::Magic));
        assert_eq!(choose([Err(Invalid::Hash), Err(Invalid::Version(2))]), Err(Invalid::Version(2)));
        assert_eq!(choose([Ok(new), Err(Invalid::Version(2))]), Err(Invalid::Version(2)));
        assert_eq!(choose([Err(Invalid::Flags(4)), Ok(new)]), Err(Invalid::Flags(4)));
        assert_eq!(choose([Err(Invalid::Hash), Err(Invalid::Hash)]), Err(Invalid::Hash));
    }

    #[test]
    fn sniff_knows_the_magic_and_nothing_else() {
        assert!(sniff(&header().encode()));
        assert!(sniff(b"BLKSYNCZ"));
        assert!(!sniff(b"BLKSYNC"));
        assert!(!sniff(b"BLKSYNC-DELTA\0\0\0"));
        assert!(!sniff(&[0; 4096]));
    }
}
