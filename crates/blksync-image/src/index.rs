//! The index (docs/COMPRESSED-IMAGE.md, "Index"): one 24-byte entry per chunk saying where its
//! payload lies, how it is stored and what its content hashes to. Held in memory as a flat
//! table of [`Entry`], 24 bytes each too, so that a 1 TiB image at 1 MiB chunks costs 24 MiB.

use std::path::Path;

use blksync_core::{Error, ErrorKind, Result};
use xxhash_rust::xxh3::Xxh3;

use crate::header::{DATA_START, ENTRY_LEN, Header, UNIT, round_up};

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

/// Checks that payloads lie inside the file (`file_len`) and overlap neither each other nor the
/// index, and returns the free space: every part of the data area up to the file's length
/// (rounded up to the allocation unit) that nothing references, as `(start, end)` ascending.
pub fn free_space(entries: &[Entry], header: &Header, file_len: u64, path: &Path) -> Result<Vec<(u64, u64)>> {
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
    let index = (header.count > 0).then(|| (header.index_offset, header.index_offset + round_up(header.index_len())));
    let mut index_seen = index.is_none();
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
    for &i in &used {
        let (start, end) = entries[i as usize].extent().unwrap_or_default();
        if let Some((istart, iend)) = index.filter(|&(s, _)| !index_seen && s <= start) {
            take(istart, iend, &|| "the index".to_string(), &mut pos)?;
            index_seen = true;
        }
        take(start, end, &|| format!("chunk {i}'s payload at file offset {start}"), &mut pos)?;
    }
    if let Some((istart, iend)) = index.filter(|_| !index_seen) {
        take(istart, iend, &|| "the index".to_string(), &mut pos)?;
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
        let free = free_space(&entries, &h, 10 * u + 5, path).unwrap();
        assert_eq!(free, [(3 * u, 4 * u), (6 * u, 8 * u), (9 * u, 10 * u)]);
        // Overlapping payloads, a payload inside the index, one past the end.
        assert!(free_space(&[at(2 * u, 100), at(2 * u, 100), at(10 * u, 5)], &h, 11 * u, path).is_err());
        assert!(free_space(&[at(2 * u, u as u32 + 1), at(3 * u, 1), at(10 * u, 5)], &h, 11 * u, path).is_err());
        assert!(free_space(&[at(8 * u, 100), at(2 * u, 1), at(10 * u, 5)], &h, 11 * u, path).is_err());
        assert!(free_space(&entries, &h, 10 * u + 4, path).is_err());
        // Nothing but headers: all free.
        assert_eq!(free_space(&[], &header(0, 0), 5 * u, path).unwrap(), [(2 * u, 5 * u)]);
    }
}
