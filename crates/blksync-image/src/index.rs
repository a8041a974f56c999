//! The index (docs/COMPRESSED-IMAGE.md, "Index"): one 24-byte entry per chunk saying where its
//! payload lies, how it is stored and what its content hashes to. Held in memory as a flat
//! table of [`Entry`], 24 bytes each too, so that a 1 TiB image at 1 MiB chunks costs 24 MiB.

use std::collections::BTreeMap;
use std::path::Path;

use blksync_core::{Error, ErrorKind, Result};
use xxhash_rust::xxh3::Xxh3;

use crate::header::{DATA_START, ENTRY_LEN, Header, PATCH_LEN, UNIT, max_record_blocks, round_up};

/// How a chunk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Kind {
    /// No payload: the chunk reads as zeros (a hole).
    #[default]
    Zero = 0,
    /// The content itself.
    Raw = 1,
    /// One zstd frame.
    Zstd = 2,
}

/// Where and how one chunk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    /// File offset of the payload (0 for a zero chunk).
    pub offset: u64,
    /// XXH3-64 of the content, seeded with the chunk number (0 for a zero chunk).
    pub checksum: u64,
    /// Payload bytes.
    pub stored: u32,
    /// How it is stored.
    pub kind: Kind,
    /// Written since the last commit: no committed index references its payload, so replacing
    /// it frees the payload at once. Never written to the file.
    pub fresh: bool,
}

impl Entry {
    /// A zero chunk.
    pub const ZERO: Entry = Entry { offset: 0, checksum: 0, stored: 0, kind: Kind::Zero, fresh: false };

    /// The file space its payload occupies, `[start, end)` rounded up to the allocation unit;
    /// `None` for a zero chunk.
    #[must_use]
    pub fn extent(&self) -> Option<(u64, u64)> {
        (self.kind != Kind::Zero).then(|| (self.offset, self.offset + round_up(u64::from(self.stored))))
    }

    /// Its 24 bytes in the file.
    #[must_use]
    pub fn encode(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..8].copy_from_slice(&self.offset.to_le_bytes());
        out[8..12].copy_from_slice(&self.stored.to_le_bytes());
        out[12] = self.kind as u8;
        out[16..24].copy_from_slice(&self.checksum.to_le_bytes());
        out
    }

    /// Decodes and checks one entry of an image with chunks of `chunk_size` (everything but its
    /// place in the file, which [`free_space`] checks).
    pub fn decode(bytes: &[u8; 24], chunk_size: u32) -> std::result::Result<Entry, String> {
        let offset = u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default());
        let stored = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
        let checksum = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or_default());
        if bytes[13..16] != [0, 0, 0] {
            return Err("reserved bytes are not zero".into());
        }
        let kind = match bytes[12] {
            0 => Kind::Zero,
            1 => Kind::Raw,
            2 => Kind::Zstd,
            other => return Err(format!("unknown chunk kind {other}")),
        };
        let entry = Entry { offset, checksum, stored, kind, fresh: false };
        match kind {
            Kind::Zero if entry != Entry::ZERO => Err("a zero chunk with a payload".into()),
            Kind::Zero => Ok(entry),
            Kind::Raw if stored != chunk_size => Err(format!("a raw payload of {stored} bytes")),
            Kind::Zstd if stored == 0 || stored >= chunk_size => Err(format!("a zstd payload of {stored} bytes")),
            _ if offset < DATA_START || offset % UNIT != 0 => Err(format!("a payload at file offset {offset}")),
            _ => Ok(entry),
        }
    }
}

/// Bytes of a block, the unit a patch replaces.
pub const BLOCK: u64 = 4096;

/// Bytes of a patch record's content holding `blocks` blocks: their numbers (u16 each), then
/// their data.
#[must_use]
pub fn record_len(blocks: u32) -> u64 {
    u64::from(blocks) * (BLOCK + 2)
}

/// Where and how one chunk's patch record is stored (docs/COMPRESSED-IMAGE.md, "Patches").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Patch {
    /// File offset of the record.
    pub offset: u64,
    /// XXH3-64 of the record's content, seeded with 2^63 + the chunk number.
    pub checksum: u64,
    /// Record bytes in the file.
    pub stored: u32,
    /// Blocks in the record.
    pub blocks: u16,
    /// Raw or zstd.
    pub kind: Kind,
    /// Written since the last commit (see [`Entry::fresh`]). Never written to the file.
    pub fresh: bool,
}

/// The patches of an image, by chunk number.
pub type Patches = BTreeMap<u64, Patch>;

impl Patch {
    /// The file space its record occupies, `[start, end)` rounded up to the allocation unit.
    #[must_use]
    pub fn extent(&self) -> (u64, u64) {
        (self.offset, self.offset + round_up(u64::from(self.stored)))
    }

    /// Its 32 bytes in the table, as the patch of chunk `chunk`.
    #[must_use]
    pub fn encode(&self, chunk: u64) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[..4].copy_from_slice(&(chunk as u32).to_le_bytes());
        out[4..8].copy_from_slice(&self.stored.to_le_bytes());
        out[8..16].copy_from_slice(&self.offset.to_le_bytes());
        out[16..18].copy_from_slice(&self.blocks.to_le_bytes());
        out[18] = self.kind as u8;
        out[24..32].copy_from_slice(&self.checksum.to_le_bytes());
        out
    }

    /// Decodes and checks one table entry of an image with chunks of `chunk_size`, `count` of
    /// them: the chunk number and the patch (everything but the record's place in the file and
    /// the table's order).
    pub fn decode(bytes: &[u8; 32], chunk_size: u32, count: u64) -> std::result::Result<(u64, Patch), String> {
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
        let chunk = u64::from(word(0));
        let stored = word(4);
        let offset = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default());
        let blocks = u16::from_le_bytes(bytes[16..18].try_into().unwrap_or_default());
        let checksum = u64::from_le_bytes(bytes[24..32].try_into().unwrap_or_default());
        if bytes[19..24] != [0; 5] {
            return Err("reserved bytes are not zero".into());
        }
        if chunk >= count {
            return Err(format!("a patch of chunk {chunk}, past the last one ({count} chunks)"));
        }
        let kind = match bytes[18] {
            1 => Kind::Raw,
            2 => Kind::Zstd,
            other => return Err(format!("unknown record kind {other}")),
        };
        if blocks == 0 || u32::from(blocks) > max_record_blocks(chunk_size) {
            return Err(format!("a record of {blocks} blocks"));
        }
        let raw = record_len(u32::from(blocks));
        match kind {
            Kind::Raw if u64::from(stored) != raw => return Err(format!("a raw record of {stored} bytes")),
            Kind::Zstd if stored == 0 || u64::from(stored) >= raw => {
                return Err(format!("a zstd record of {stored} bytes"));
            }
            _ => {}
        }
        if offset < DATA_START || offset % UNIT != 0 {
            return Err(format!("a record at file offset {offset}"));
        }
        Ok((chunk, Patch { offset, checksum, stored, blocks, kind, fresh: false }))
    }
}

/// A damaged patch table.
fn corrupt_table(path: &Path, at: u64, what: &str) -> Error {
    Error::new(ErrorKind::Corrupt, format!("{}: damaged patch table at file offset {at}: {what}", path.display()))
}

/// Bytes of the patch table read at once: a whole number of entries, about 1 MiB.
const TABLE_PIECE: usize = (1 << 20) / PATCH_LEN as usize * PATCH_LEN as usize;

/// Reads, hashes and decodes the patch table `header` names (none without the flag), in pieces
/// of about 1 MiB; the table lies inside the file (`file_len`), which bounds the map's size.
pub fn load_patches(
    read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    header: &Header,
    file_len: u64,
    path: &Path,
) -> Result<Patches> {
    let mut patches = Patches::new();
    let len = header.patch_len();
    if len == 0 {
        return Ok(patches);
    }
    if header.patch_offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(corrupt_table(
            path,
            header.patch_offset,
            &format!("{len} bytes of patch table past the end of the file ({file_len} bytes)"),
        ));
    }
    let mut hasher = Xxh3::new();
    let mut piece = vec![0u8; TABLE_PIECE.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(TABLE_PIECE as u64) as usize;
        let at = header.patch_offset + done;
        read(&mut piece[..n], at)?;
        hasher.update(&piece[..n]);
        for (k, bytes) in piece[..n].chunks_exact(PATCH_LEN as usize).enumerate() {
            let here = at + k as u64 * PATCH_LEN;
            let bytes: &[u8; 32] = bytes.try_into().map_err(|_| corrupt_table(path, here, "short entry"))?;
            let (chunk, patch) = Patch::decode(bytes, header.chunk_size, header.count)
                .map_err(|what| corrupt_table(path, here, &what))?;
            if patches.last_key_value().is_some_and(|(&last, _)| last >= chunk) {
                return Err(corrupt_table(path, here, &format!("chunk {chunk} out of order")));
            }
            patches.insert(chunk, patch);
        }
        done += n as u64;
    }
    if hasher.digest() != header.patch_hash {
        return Err(corrupt_table(path, header.patch_offset, "checksum mismatch"));
    }
    Ok(patches)
}

/// The patch table's bytes for `patches`, a piece at a time.
pub fn encode_patches(patches: &Patches, out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let mut piece = Vec::with_capacity((1 << 16).min(patches.len() * PATCH_LEN as usize));
    for (&chunk, patch) in patches {
        piece.extend_from_slice(&patch.encode(chunk));
        if piece.len() >= 1 << 16 {
            out(&piece)?;
            piece.clear();
        }
    }
    if !piece.is_empty() {
        out(&piece)?;
    }
    Ok(())
}

/// A damaged index, in the words of the spec.
fn corrupt(path: &Path, at: u64, what: &str) -> Error {
    Error::new(ErrorKind::Corrupt, format!("{}: damaged index at file offset {at}: {what}", path.display()))
}

/// Bytes of the index read at once: a whole number of entries, about 1 MiB.
const PIECE: usize = (1 << 20) / ENTRY_LEN as usize * ENTRY_LEN as usize;

/// Reads, hashes and decodes the index `header` names, through `read` (which fills a buffer
/// from a file offset), in pieces of about 1 MiB. The header's limits and the check that the
/// index lies inside the file (`file_len`) bound the table's size by the file's.
pub fn load(
    read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    header: &Header,
    file_len: u64,
    path: &Path,
) -> Result<Vec<Entry>> {
    let len = header.index_len();
    if header.count > 0 && header.index_offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(corrupt(
            path,
            header.index_offset,
            &format!("{len} bytes of index past the end of the file ({file_len} bytes)"),
        ));
    }
    let mut entries = Vec::with_capacity(header.count as usize);
    let mut hasher = Xxh3::new();
    let mut piece = vec![0u8; PIECE.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(PIECE as u64) as usize;
        let at = header.index_offset + done;
        read(&mut piece[..n], at)?;
        hasher.update(&piece[..n]);
        for (k, bytes) in piece[..n].chunks_exact(ENTRY_LEN as usize).enumerate() {
            let bytes: &[u8; 24] = bytes.try_into().map_err(|_| corrupt(path, at, "short entry"))?;
            let entry = Entry::decode(bytes, header.chunk_size).map_err(|what| {
                let i = done / ENTRY_LEN + k as u64;
                corrupt(path, at + k as u64 * ENTRY_LEN, &format!("entry of chunk {i}: {what}"))
            })?;
            entries.push(entry);
        }
        done += n as u64;
    }
    if hasher.digest() != header.index_hash {
        return Err(corrupt(path, header.index_offset, "checksum mismatch"));
    }
    Ok(entries)
}

/// What else than a chunk's payload occupies the data area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Other {
    Index,
    Table,
    Record(u64),
}

/// Checks that payloads and records lie inside the file (`file_len`) and overlap neither each
/// other nor the index and the patch table, and returns the free space: every part of the data
/// area up to the file's length (rounded up to the allocation unit) that nothing references, as
/// `(start, end)` ascending.
pub fn free_space(
    entries: &[Entry],
    patches: &Patches,
    header: &Header,
    file_len: u64,
    path: &Path,
) -> Result<Vec<(u64, u64)>> {
    let mut used: Vec<u32> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.kind != Kind::Zero {
            if e.offset + u64::from(e.stored) > file_len {
                return Err(corrupt(
                    path,
                    header.index_offset + i as u64 * ENTRY_LEN,
                    &format!("chunk {i}'s payload at file offset {} ends past the end of the file", e.offset),
                ));
            }
            used.push(i as u32);
        }
    }
    used.sort_unstable_by_key(|&i| entries[i as usize].offset);
    // The index, the table and the records: few, next to the chunks.
    let mut others: Vec<(u64, u64, Other)> = Vec::with_capacity(patches.len() + 2);
    if header.count > 0 {
        others.push((header.index_offset, header.index_offset + round_up(header.index_len()), Other::Index));
    }
    if header.patch_count > 0 {
        others.push((header.patch_offset, header.patch_offset + round_up(header.patch_len()), Other::Table));
    }
    for (k, (&chunk, patch)) in patches.iter().enumerate() {
        if patch.offset + u64::from(patch.stored) > file_len {
            return Err(corrupt_table(
                path,
                header.patch_offset + k as u64 * PATCH_LEN,
                &format!("chunk {chunk}'s record at file offset {} ends past the end of the file", patch.offset),
            ));
        }
        let (start, end) = patch.extent();
        others.push((start, end, Other::Record(chunk)));
    }
    others.sort_unstable();
    let name = |other: Other| match other {
        Other::Index => "the index".to_string(),
        Other::Table => "the patch table".to_string(),
        Other::Record(chunk) => format!("chunk {chunk}'s patch record"),
    };
    let mut free = Vec::new();
    let mut pos = DATA_START;
    let mut take = |start: u64, end: u64, what: &dyn Fn() -> String, pos: &mut u64| -> Result<()> {
        if start < *pos {
            return Err(corrupt(path, header.index_offset, &format!("{} overlaps what precedes it", what())));
        }
        if start > *pos {
            free.push((*pos, start));
        }
        *pos = end;
        Ok(())
    };
    let mut rest = others.iter().peekable();
    for &i in &used {
        let (start, end) = entries[i as usize].extent().unwrap_or_default();
        while let Some(&&(s, e, other)) = rest.peek().filter(|&&&(s, _, _)| s <= start) {
            take(s, e, &|| format!("{} at file offset {s}", name(other)), &mut pos)?;
            rest.next();
        }
        take(start, end, &|| format!("chunk {i}'s payload at file offset {start}"), &mut pos)?;
    }
    for &(s, e, other) in rest {
        take(s, e, &|| format!("{} at file offset {s}", name(other)), &mut pos)?;
    }
    let end = round_up(file_len);
    if end > pos {
        free.push((pos, end));
    }
    Ok(free)
}

/// The index's bytes for `entries`, a piece at a time (for the hash and for writing in pieces
/// rather than one buffer as large as the index): calls `out` with each piece.
pub fn encode(entries: &[Entry], out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let mut piece = Vec::with_capacity(PIECE.min(entries.len() * ENTRY_LEN as usize));
    for group in entries.chunks(PIECE / ENTRY_LEN as usize) {
        piece.clear();
        for e in group {
            piece.extend_from_slice(&e.encode());
        }
        out(&piece)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CHUNK: u32 = 1 << 16;

    fn header(count: u64, index_offset: u64) -> Header {
        Header {
            chunk_size: CHUNK,
            level: 3,
            generation: 1,
            size: count * u64::from(CHUNK),
            index_offset,
            count,
            index_hash: 0,
            patch_offset: 0,
            patch_count: 0,
            patch_hash: 0,
        }
    }

    #[test]
    fn an_entry_in_memory_takes_24_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 24);
        assert_eq!(Entry::ZERO.encode(), [0; 24]);
    }

    fn entry() -> impl Strategy<Value = Entry> {
        prop_oneof![
            Just(Entry::ZERO),
            (2u64..1 << 40, any::<u64>()).prop_map(|(at, checksum)| Entry {
                offset: at * UNIT,
                checksum,
                stored: CHUNK,
                kind: Kind::Raw,
                fresh: false
            }),
            (2u64..1 << 40, any::<u64>(), 1..CHUNK).prop_map(|(at, checksum, stored)| Entry {
                offset: at * UNIT,
                checksum,
                stored,
                kind: Kind::Zstd,
                fresh: false
            }),
        ]
    }

    proptest! {
        #[test]
        fn every_valid_entry_round_trips(e in entry()) {
            prop_assert_eq!(Entry::decode(&e.encode(), CHUNK), Ok(e));
        }

        #[test]
        fn an_index_loads_as_it_was_encoded(entries in proptest::collection::vec(entry(), 0..200)) {
            let mut bytes = Vec::new();
            encode(&entries, &mut |p| { bytes.extend_from_slice(p); Ok(()) }).unwrap();
            let mut h = header(entries.len() as u64, if entries.is_empty() { 0 } else { DATA_START });
            h.index_hash = xxhash_rust::xxh3::xxh3_64(&bytes);
            let file_len = DATA_START + bytes.len() as u64;
            let mut file = vec![0u8; DATA_START as usize];
            file.extend_from_slice(&bytes);
            let mut read = |buf: &mut [u8], at: u64| { buf.copy_from_slice(&file[at as usize..at as usize + buf.len()]); Ok(()) };
            let loaded = load(&mut read, &h, file_len, Path::new("x")).unwrap();
            prop_assert_eq!(loaded, entries);
        }
    }

    #[test]
    fn bad_entries_are_refused() {
        let raw = Entry { offset: DATA_START, checksum: 1, stored: CHUNK, kind: Kind::Raw, fresh: false };
        let zstd = Entry { stored: 100, kind: Kind::Zstd, ..raw };
        let bad = [
            Entry { stored: CHUNK - 1, ..raw },
            Entry { stored: 0, ..zstd },
            Entry { stored: CHUNK, ..zstd },
            Entry { offset: 4096, ..raw },
            Entry { offset: DATA_START + 512, ..zstd },
            Entry { offset: DATA_START, ..Entry::ZERO },
            Entry { checksum: 1, ..Entry::ZERO },
        ];
        for e in bad {
            assert!(Entry::decode(&e.encode(), CHUNK).is_err(), "{e:?}");
        }
        let mut kind = raw.encode();
        kind[12] = 3;
        assert!(Entry::decode(&kind, CHUNK).is_err());
        let mut reserved = raw.encode();
        reserved[15] = 1;
        assert!(Entry::decode(&reserved, CHUNK).is_err());
    }

    fn at(offset: u64, stored: u32) -> Entry {
        Entry { offset, checksum: 0, stored, kind: Kind::Zstd, fresh: false }
    }

    #[test]
    fn free_space_is_every_gap_and_overlaps_are_refused() {
        let path = Path::new("img");
        let u = UNIT;
        // Index of 3 entries (72 bytes: one unit) at 8 units; payloads at 2, 4..6 and 10 units.
        let h = header(3, 8 * u);
        let entries = [at(2 * u, 100), at(4 * u, 2 * u as u32 - 1), at(10 * u, 5)];
        let free = free_space(&entries, &Patches::new(), &h, 10 * u + 5, path).unwrap();
        assert_eq!(free, [(3 * u, 4 * u), (6 * u, 8 * u), (9 * u, 10 * u)]);
        // Overlapping payloads, a payload inside the index, one past the end.
        assert!(
            free_space(&[at(2 * u, 100), at(2 * u, 100), at(10 * u, 5)], &Patches::new(), &h, 11 * u, path).is_err()
        );
        assert!(
            free_space(&[at(2 * u, u as u32 + 1), at(3 * u, 1), at(10 * u, 5)], &Patches::new(), &h, 11 * u, path)
                .is_err()
        );
        assert!(free_space(&[at(8 * u, 100), at(2 * u, 1), at(10 * u, 5)], &Patches::new(), &h, 11 * u, path).is_err());
        assert!(free_space(&entries, &Patches::new(), &h, 10 * u + 4, path).is_err());
        // Nothing but headers: all free.
        assert_eq!(free_space(&[], &Patches::new(), &header(0, 0), 5 * u, path).unwrap(), [(2 * u, 5 * u)]);
    }
}
