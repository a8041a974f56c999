//! A table for a disk of another size with partitions moved or resized (`blksync clone`,
//! issue 11 part 4; docs/CLONE.md is the specification).
//!
//! [`plan`] decides where each partition goes: those that start before the one that grows
//! keep their place and size; those after it keep their size and order and are packed against
//! the end of the new disk (each start aligned down to 1 MiB); the one that grows keeps its
//! start and fills the room between. [`Table::rebuilt`] turns the plan into the writes: for GPT
//! the entry array with its CRC and both headers (through [`crate::gpt::relocate`]), for DOS the
//! primary entries of sector 0. Logical DOS partitions and the extended one are not moved or
//! resized (their EBR chain would have to be rewritten): a plan that needs it is refused.

use blksync_core::{Error, ErrorKind, Result};

use crate::{Partition, Scheme, Table};

/// Where partitions are aligned when they move.
pub const ALIGN: u64 = 1 << 20;

/// One partition's place on the new disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// Its number (unchanged).
    pub number: u32,
    /// Its first byte on the new disk.
    pub start: u64,
    /// Its length in bytes.
    pub len: u64,
}

/// The last byte + 1 a partition may end at on a disk of `disk_size` bytes with `table`'s
/// scheme: for GPT before the backup entries (as [`crate::gpt::relocate`] puts them), for DOS
/// the end of the disk (at most 2^32 sectors).
#[must_use]
pub fn usable_end(table: &Table, disk_size: u64) -> u64 {
    let ss = u64::from(table.sector_size);
    match &table.scheme {
        Scheme::Gpt { entry_count, entry_size, .. } => {
            let array = (u64::from(*entry_count) * u64::from(*entry_size)).div_ceil(ss);
            (disk_size / ss).saturating_sub(array + 1) * ss
        }
        Scheme::Dos { .. } => (disk_size / ss).min(u64::from(u32::MAX)) * ss,
    }
}

/// The partition that grows by default: the one that ends last (not an extended one).
#[must_use]
pub fn default_grow(table: &Table) -> Option<u32> {
    table.partitions.iter().filter(|p| !p.is_extended()).max_by_key(|p| p.end()).map(|p| p.number)
}

/// Where every partition of `table` goes on a disk of `disk_size` bytes when partition `grow`
/// takes the room that is left (see the module doc), in the table's order.
///
/// Errors: `Usage` when `grow` is not a partition of the table or is an extended one;
/// `Unsupported` when a logical or extended DOS partition would have to move or change size;
/// `SizeMismatch` when the partitions that keep their size leave no room.
pub fn plan(table: &Table, disk_size: u64, grow: u32) -> Result<Vec<Place>> {
    let name = table.name().display();
    let Some(g) = table.partitions.iter().find(|p| p.number == grow) else {
        let numbers: Vec<String> = table.partitions.iter().map(|p| p.number.to_string()).collect();
        return Err(Error::usage(format!(
            "{name}: no partition {grow} to grow (the partitions are {})",
            numbers.join(", ")
        )));
    };
    if g.is_extended() {
        return Err(Error::usage(format!(
            "{name}: partition {grow} is the extended partition; name a logical or primary one"
        )));
    }
    let ss = u64::from(table.sector_size);
    let end = usable_end(table, disk_size);
    let dos = matches!(table.scheme, Scheme::Dos { .. });
    let unsupported = |number: u32| {
        Error::new(
            ErrorKind::Unsupported,
            format!(
                "{name}: partition {number} would have to move or change size, and moving a logical or extended DOS partition needs its EBR chain rewritten (not supported yet); name a primary partition with --grow that comes after them"
            ),
        )
    };
    let mut after: Vec<&Partition> = table.partitions.iter().filter(|p| p.start > g.start).collect();
    after.sort_by_key(|p| std::cmp::Reverse(p.start));
    let mut places = Vec::new();
    let mut limit = end;
    for p in after {
        if p.is_extended() || (dos && p.number > 4) {
            return Err(unsupported(p.number));
        }
        // Packed against the end, in order, each start aligned down (which keeps whole sectors).
        let Some(start) = limit.checked_sub(p.len).map(|s| s / ALIGN * ALIGN).filter(|&s| s > g.start) else {
            return Err(no_room(table, disk_size, grow));
        };
        places.push(Place { number: p.number, start, len: p.len });
        limit = start;
    }
    if limit <= g.start {
        return Err(no_room(table, disk_size, grow));
    }
    let grown = Place { number: g.number, start: g.start, len: (limit - g.start) / ss * ss };
    if dos && g.number > 4 && grown.len != g.len {
        return Err(unsupported(g.number));
    }
    places.push(grown);
    places.extend(table.partitions.iter().filter(|p| p.start < g.start).map(|p| Place {
        number: p.number,
        start: p.start,
        len: p.len,
    }));
    let order = |n: u32| table.partitions.iter().position(|p| p.number == n).unwrap_or(usize::MAX);
    places.sort_by_key(|q| order(q.number));
    Ok(places)
}

fn no_room(table: &Table, disk_size: u64, grow: u32) -> Error {
    let g = table.partitions.iter().find(|p| p.number == grow).map_or(0, |p| p.start);
    let need: u64 = table.partitions.iter().filter(|p| p.start > g && !p.is_extended()).map(|p| p.len).sum();
    Error::new(
        ErrorKind::SizeMismatch,
        format!(
            "{}: partition {grow} starts at byte {g} and the partitions after it need {need} bytes: no room for them on a disk of {disk_size} bytes",
            table.name().display()
        ),
    )
}

impl Table {
    /// The writes (byte offset, bytes) that put this table on a disk of `disk_size` bytes with
    /// its partitions where `places` says (partitions not named stay). GPT: the entries changed
    /// with the array's CRC, then relocated ([`crate::gpt::relocate`]); DOS: sector 0 with its
    /// primary entries changed (the boot code and disk signature kept).
    ///
    /// Errors: `Unsupported` for a moved logical DOS partition, `SizeMismatch` when a partition
    /// would not fit, `Usage` for a number that is not in the table.
    pub fn rebuilt(&self, disk_size: u64, places: &[Place]) -> Result<Vec<(u64, Vec<u8>)>> {
        let ss = u64::from(self.sector_size);
        let mut new = self.clone();
        for place in places {
            let Some(p) = new.partitions.iter_mut().find(|p| p.number == place.number) else {
                return Err(Error::usage(format!("{}: no partition {}", self.name().display(), place.number)));
            };
            if place.start % ss != 0 || place.len % ss != 0 || place.len == 0 {
                return Err(Error::usage(format!(
                    "partition {}: {} bytes at {} is not whole sectors of {ss} bytes",
                    place.number, place.len, place.start
                )));
            }
            if p.start == place.start && p.len == place.len {
                continue;
            }
            p.start = place.start;
            p.len = place.len;
            if let Some(raw) = &mut new.gpt {
                raw.set_extent(place.number, place.start / ss, (place.start + place.len) / ss - 1)
                    .ok_or_else(|| Error::usage(format!("no GPT entry {}", place.number)))?;
            } else {
                {
                    if place.number > 4 {
                        return Err(Error::new(
                            ErrorKind::Unsupported,
                            format!("logical partition {}: moving or resizing it is not supported yet", place.number),
                        ));
                    }
                    let (Ok(lba), Ok(sectors)) = (u32::try_from(place.start / ss), u32::try_from(place.len / ss))
                    else {
                        return Err(Error::new(
                            ErrorKind::SizeMismatch,
                            format!("partition {}: past the 2^32 sectors a DOS table can address", place.number),
                        ));
                    };
                    let at = crate::mbr::ENTRIES_AT + 16 * (place.number as usize - 1);
                    let e = &mut new.mbr[at..at + 16];
                    // CHS "beyond CHS" (FE FF FF), as sfdisk writes past cylinder 1023.
                    e[1..4].copy_from_slice(&[0xFE, 0xFF, 0xFF]);
                    e[5..8].copy_from_slice(&[0xFE, 0xFF, 0xFF]);
                    e[8..12].copy_from_slice(&lba.to_le_bytes());
                    e[12..16].copy_from_slice(&sectors.to_le_bytes());
                }
            }
        }
        let end = usable_end(self, disk_size);
        if let Some(p) = new.partitions.iter().find(|p| p.end() > end) {
            return Err(Error::new(
                ErrorKind::SizeMismatch,
                format!("partition {} would end at byte {}, past the last usable byte {end}", p.number, p.end()),
            ));
        }
        match new.scheme {
            Scheme::Gpt { .. } => new.relocate_gpt(disk_size),
            Scheme::Dos { .. } => {
                let mut sector = new.mbr.clone();
                sector.resize(512, 0);
                Ok(vec![(0, sector)])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Guid;
    use crate::gpt::{NewEntry, encode};
    use blksync_core::endpoint::memory::Memory;

    const MIB: u64 = 1 << 20;

    /// A GPT disk of `size` bytes with partitions (first LBA, last LBA), read back.
    fn gpt(size: u64, parts: &[(u64, u64)]) -> (Table, Vec<u8>) {
        let entries: Vec<NewEntry> = parts
            .iter()
            .enumerate()
            .map(|(i, &(first_lba, last_lba))| NewEntry {
                type_guid: Guid([1; 16]),
                unique_guid: Guid([i as u8 + 2; 16]),
                first_lba,
                last_lba,
                attributes: 0,
                name: format!("p{i}"),
            })
            .collect();
        let mut disk = vec![0u8; size as usize];
        for (at, w) in encode(512, size, Guid([9; 16]), &entries).unwrap() {
            disk[at as usize..at as usize + w.len()].copy_from_slice(&w);
        }
        let table = crate::read(&Memory::with_bytes("d.img", disk.clone()), None).unwrap().unwrap();
        (table, disk)
    }

    fn apply(size: u64, disk: &[u8], writes: &[(u64, Vec<u8>)]) -> Table {
        let mut new = disk.to_vec();
        new.resize(size as usize, 0);
        for (at, w) in writes {
            new[*at as usize..*at as usize + w.len()].copy_from_slice(w);
        }
        crate::read(&Memory::with_bytes("n.img", new), None).unwrap().unwrap()
    }

    #[test]
    fn the_last_partition_grows_to_the_last_usable_byte() {
        let (t, disk) = gpt(32 * MIB, &[(2048, 4095), (4096, 20479)]);
        let places = plan(&t, 64 * MIB, 2).unwrap();
        assert_eq!(places[0], Place { number: 1, start: MIB, len: MIB });
        assert_eq!(places[1].start, 2 * MIB);
        assert_eq!(places[1].start + places[1].len, usable_end(&t, 64 * MIB));
        let new = apply(64 * MIB, &disk, &t.rebuilt(64 * MIB, &places).unwrap());
        assert!(new.warnings.is_empty(), "{:?}", new.warnings);
        assert_eq!(new.partitions[1].end(), usable_end(&t, 64 * MIB));
        assert_eq!(new.partitions[1].partuuid, t.partitions[1].partuuid);
    }

    #[test]
    fn partitions_after_the_grown_one_keep_their_size_and_move_to_the_end_aligned() {
        let (t, disk) = gpt(32 * MIB, &[(2048, 20479), (20480, 40959)]);
        for size in [64 * MIB, 24 * MIB] {
            let places = plan(&t, size, 1).unwrap();
            assert_eq!(places[1].len, t.partitions[1].len);
            assert_eq!(places[1].start % ALIGN, 0);
            assert!(places[1].start + places[1].len <= usable_end(&t, size));
            assert_eq!(places[0].start + places[0].len, places[1].start);
            let new = apply(size, &disk, &t.rebuilt(size, &places).unwrap());
            assert_eq!(new.partitions[1].start, places[1].start);
        }
    }

    #[test]
    fn no_room_for_the_partitions_that_keep_their_size_is_a_size_mismatch() {
        let (t, _) = gpt(32 * MIB, &[(2048, 4095), (4096, 40959), (40960, 61439)]);
        let e = plan(&t, 11 * MIB, 2).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::SizeMismatch, "{e}");
        assert!(plan(&t, 64 * MIB, 7).is_err());
    }

    proptest::proptest! {
        // Each case builds disks of tens of MiB: fewer cases than the default 256.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Any GPT of up to 4 partitions, any partition grown into any size: an accepted plan
        /// reads back as planned, without overlaps, inside the usable bytes and with the
        /// PARTUUIDs kept; a refused one is a size mismatch.
        #[test]
        fn plans_read_back_as_planned(
            lens in proptest::collection::vec(1u64..8, 1..5),
            grow in 0usize..4,
            new_mib in 4u64..48,
        ) {
            let mut parts = Vec::new();
            let mut lba = 2048;
            for l in &lens {
                parts.push((lba, lba + l * 2048 - 1));
                lba += l * 2048 + 2048;
            }
            let size = (lba + 2048) * 512;
            let (t, disk) = gpt(size, &parts);
            let grow = t.partitions[grow % t.partitions.len()].number;
            let new_size = new_mib * MIB;
            match plan(&t, new_size, grow) {
                Ok(places) => {
                    let new = apply(new_size, &disk, &t.rebuilt(new_size, &places).unwrap());
                    for (p, q) in new.partitions.iter().zip(&places) {
                        proptest::prop_assert_eq!((p.number, p.start, p.len), (q.number, q.start, q.len));
                        proptest::prop_assert!(p.end() <= usable_end(&t, new_size));
                    }
                    let uuids: Vec<_> = new.partitions.iter().map(|p| &p.partuuid).collect();
                    proptest::prop_assert_eq!(uuids, t.partitions.iter().map(|p| &p.partuuid).collect::<Vec<_>>());
                }
                Err(e) => proptest::prop_assert_eq!(e.kind(), ErrorKind::SizeMismatch, "{}", e),
            }
        }
    }
}
