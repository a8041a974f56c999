//! A table for a disk of another size with partitions moved or resized (`blksync clone`,
//! issue 11 part 4; docs/CLONE.md is the specification).
//!
//! [`plan`] decides where each partition goes: those that start before the one that grows
//! keep their place and size; those after it keep their size and order and are packed against
//! the end of the new disk (each start aligned down to 1 MiB); the one that grows keeps its
//! start and fills the room between. On DOS the grown partition may be a logical one, and
//! logical partitions move as the others do, each with its EBR as far before it as in the
//! source (the gap is kept: 2048 sectors, 63, 1, whatever it was); the extended partition is
//! their container: it starts at the first EBR (where it was while its first logical stays)
//! and ends with its last logical.
//!
//! [`Table::rebuilt`] turns the plan into the writes: for GPT the entry array with its CRC and
//! both headers (through [`crate::gpt::relocate`]); for DOS a new EBR chain when the extended
//! or a logical partition moves or changes size (`mbr::write_chain`: each EBR with the boot
//! area of the one it replaces, the logical relative to it, the link relative to the extended
//! partition, with the source's link type), then sector 0 with its primary entries changed.
//! Partition numbers, and with them DOS PARTUUIDs, stay, as the order of the logicals does.

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

/// The partition that grows by default: the one that ends last (not an extended one; often a
/// logical one, as the swap partition of Debian's default DOS layout).
#[must_use]
pub fn default_grow(table: &Table) -> Option<u32> {
    table.partitions.iter().filter(|p| !p.is_extended()).max_by_key(|p| p.end()).map(|p| p.number)
}

/// Whether `places` moves or resizes the extended DOS partition or a logical one, so that
/// [`Table::rebuilt`] writes a new EBR chain (otherwise the chain stays where it is, as read).
#[must_use]
pub fn moves_ebr_chain(table: &Table, places: &[Place]) -> bool {
    matches!(table.scheme, Scheme::Dos { .. })
        && table
            .partitions
            .iter()
            .filter(|p| p.is_extended() || p.number > 4)
            .any(|p| places.iter().any(|q| q.number == p.number && (q.start, q.len) != (p.start, p.len)))
}

/// A DOS table's extended partition with its logical partitions, each with its *lead*: the
/// bytes from its EBR to its start, which it keeps when it moves.
struct Extended<'a> {
    ext: &'a Partition,
    /// (logical, lead), in chain order, which is number order.
    logicals: Vec<(&'a Partition, u64)>,
}

impl<'a> Extended<'a> {
    fn of(table: &'a Table) -> Option<Extended<'a>> {
        let ext = table.partitions.iter().find(|p| p.is_extended())?;
        let logicals = crate::mbr::chain(table)
            .iter()
            .filter_map(|e| e.logical.map(|p| (p, p.start.saturating_sub(e.at))))
            .collect();
        Some(Extended { ext, logicals })
    }

    fn lead(&self, number: u32) -> u64 {
        self.logicals.iter().find(|(p, _)| p.number == number).map_or(0, |&(_, lead)| lead)
    }

    /// Moving the chain needs it in disk order (each EBR after the logical before it) and no
    /// primary partition inside the extended one: what the rebuilt chain is. A table that is
    /// otherwise (which only a hand-made one is) is refused.
    fn check_movable(&self, table: &Table) -> Result<()> {
        let name = table.name().display();
        let refuse = |what: String| {
            Error::new(
                ErrorKind::Unsupported,
                format!("{name}: {what}: its EBR chain cannot be rewritten; clone partition by partition"),
            )
        };
        let mut free = self.ext.start;
        for (p, lead) in &self.logicals {
            if p.start - lead < free {
                return Err(refuse(format!(
                    "the EBR of logical {} at byte offset {} lies before the end of the partition before it",
                    p.describe(),
                    p.start - lead
                )));
            }
            free = p.end();
        }
        if let Some(p) = table
            .partitions
            .iter()
            .find(|p| p.number <= 4 && !p.is_extended() && p.start < self.ext.end() && p.end() > self.ext.start)
        {
            return Err(refuse(format!("primary {} lies inside extended {}", p.describe(), self.ext.describe())));
        }
        Ok(())
    }
}

/// Where every partition of `table` goes on a disk of `disk_size` bytes when partition `grow`
/// takes the room that is left (see the module doc), in the table's order.
///
/// Errors: `Usage` when `grow` is not a partition of the table or is an extended one;
/// `Unsupported` when the logical DOS partitions would have to move and their EBR chain is not
/// in disk order, or a primary partition lies inside the extended one; `SizeMismatch` when the
/// partitions that keep their size leave no room.
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
    let extended = Extended::of(table);
    // An extended partition without logicals is packed as a primary one would be.
    let empty_ext = extended.as_ref().filter(|x| x.logicals.is_empty()).map(|x| x.ext.number);
    let lead = |n: u32| extended.as_ref().map_or(0, |x| x.lead(n));
    let mut after: Vec<&Partition> = table
        .partitions
        .iter()
        .filter(|p| p.start > g.start && (!p.is_extended() || empty_ext == Some(p.number)))
        .collect();
    after.sort_by_key(|p| std::cmp::Reverse(p.start));
    let moves_logicals =
        extended.as_ref().filter(|x| x.logicals.iter().any(|(p, _)| p.number == grow || p.start > g.start));
    if let Some(x) = moves_logicals {
        x.check_movable(table)?;
    }
    let mut places = Vec::new();
    let mut limit = end;
    for p in after {
        // Packed against the end, in order, each start aligned down (which keeps whole
        // sectors); a logical partition with its EBR as far before it as in the source.
        let lead = lead(p.number);
        let Some(start) = limit.checked_sub(p.len).map(|s| s / ALIGN * ALIGN).filter(|&s| s > g.start + lead) else {
            return Err(no_room(table, disk_size, grow));
        };
        places.push(Place { number: p.number, start, len: p.len });
        limit = start - lead;
    }
    if limit <= g.start {
        return Err(no_room(table, disk_size, grow));
    }
    places.push(Place { number: g.number, start: g.start, len: (limit - g.start) / ss * ss });
    places.extend(table.partitions.iter().filter(|p| p.start < g.start && !p.is_extended()).map(|p| Place {
        number: p.number,
        start: p.start,
        len: p.len,
    }));
    if let Some(x) = &extended {
        let place = |n: u32| places.iter().find(|q| q.number == n).copied();
        let ext = match (x.logicals.first(), x.logicals.last()) {
            // A container: from its first EBR (where it was when its first logical stays) to
            // the end of its last logical.
            (Some(&(first, lead)), Some(&(last, _))) if moves_logicals.is_some() => {
                let (Some(f), Some(l)) = (place(first.number), place(last.number)) else {
                    return Err(no_room(table, disk_size, grow));
                };
                let start = if f.start == first.start { x.ext.start } else { f.start - lead };
                Place { number: x.ext.number, start, len: l.start + l.len - start }
            }
            _ => place(x.ext.number).unwrap_or(Place { number: x.ext.number, start: x.ext.start, len: x.ext.len }),
        };
        places.retain(|q| q.number != ext.number);
        places.push(ext);
    }
    let order = |n: u32| table.partitions.iter().position(|p| p.number == n).unwrap_or(usize::MAX);
    places.sort_by_key(|q| order(q.number));
    Ok(places)
}

fn no_room(table: &Table, disk_size: u64, grow: u32) -> Error {
    let g = table.partitions.iter().find(|p| p.number == grow).map_or(0, |p| p.start);
    let lead = |n: u32| Extended::of(table).map_or(0, |x| x.lead(n));
    let need: u64 =
        table.partitions.iter().filter(|p| p.start > g && !p.is_extended()).map(|p| p.len + lead(p.number)).sum();
    let end = usable_end(table, disk_size);
    if g >= end {
        return Error::new(
            ErrorKind::SizeMismatch,
            format!(
                "{}: partition {grow}, the one that takes the room (with --grow, or by default the one that ends last), starts at byte {g}, and a disk of {disk_size} bytes must hold its partitions before byte {end}: name one that starts earlier with --grow N",
                table.name().display()
            ),
        );
    }
    Error::new(
        ErrorKind::SizeMismatch,
        format!(
            "{}: partition {grow} starts at byte {g} and the partitions after it need {need} bytes with their EBRs, each start aligned to 1 MiB: no room for them on a disk of {disk_size} bytes, whose partitions must end by byte {end}",
            table.name().display()
        ),
    )
}

impl Table {
    /// The writes (byte offset, bytes) that put this table on a disk of `disk_size` bytes with
    /// its partitions where `places` says (partitions not named stay). GPT: the entries changed
    /// with the array's CRC, then relocated ([`crate::gpt::relocate`]); DOS: the EBR chain (a
    /// new one when the extended or a logical partition moves or changes size, see
    /// [`moves_ebr_chain`]; else the chain as read), then sector 0 with its primary entries
    /// changed (the boot code and disk signature kept). Sector 0 comes last, so that writing
    /// them in order never leaves it pointing at a chain that is not there yet.
    ///
    /// Errors: `SizeMismatch` when a partition would not fit, `Usage` for a number that is not
    /// in the table or places that overlap the EBR chain.
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
            } else if place.number <= 4 {
                let (Ok(start), Ok(sectors)) = (u32::try_from(place.start / ss), u32::try_from(place.len / ss)) else {
                    return Err(Error::new(
                        ErrorKind::SizeMismatch,
                        format!("partition {}: past the 2^32 sectors a DOS table can address", place.number),
                    ));
                };
                let at = crate::mbr::ENTRIES_AT + 16 * (place.number as usize - 1);
                let old = crate::mbr::Entry { start, sectors, ..crate::mbr::Entry::decode(&new.mbr, at) };
                new.mbr[at..at + 16].copy_from_slice(&old.encode());
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
                let mut writes = if moves_ebr_chain(self, places) {
                    crate::mbr::write_chain(self, &new)?
                } else {
                    self.ebrs.clone()
                };
                let mut sector = new.mbr.clone();
                sector.resize(512, 0);
                writes.push((0, sector));
                Ok(writes)
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

    /// A logical partition of [`dos`]: its EBR `lead` sectors before its first LBA.
    #[derive(Debug, Clone, Copy)]
    struct Logical {
        lead: u32,
        start: u32,
        sectors: u32,
        kind: u8,
    }

    /// Sector 0 or an EBR: `boot` over the boot-code area, entries (boot, type, start,
    /// sectors) with CHS `01 02 03`, so a test sees which entries were rewritten.
    fn sector(boot: u8, entries: &[(u8, u8, u32, u32)]) -> Vec<u8> {
        let mut s = vec![boot; 512];
        s[446..].fill(0);
        for (i, &(flag, kind, start, sectors)) in entries.iter().enumerate() {
            let at = 446 + 16 * i;
            s[at] = flag;
            s[at + 1..at + 4].copy_from_slice(&[1, 2, 3]);
            s[at + 4] = kind;
            s[at + 8..at + 12].copy_from_slice(&start.to_le_bytes());
            s[at + 12..at + 16].copy_from_slice(&sectors.to_le_bytes());
        }
        s[510] = 0x55;
        s[511] = 0xAA;
        s
    }

    /// A DOS disk of `size` bytes, signature `0xdeadbeef`: `primaries` by slot (type, first
    /// LBA, sectors; type 0 for an empty slot), of which the one of type 5 or 0x0F is the
    /// extended partition holding `logicals`, linked with type `link`. EBR `i` has boot-code
    /// bytes `0x10 + i`; when the first logical's EBR is not at the extended partition's start,
    /// an empty EBR is there. Read back.
    fn dos(size: u64, primaries: &[(u8, u32, u32)], logicals: &[Logical], link: u8) -> (Table, Vec<u8>) {
        let mut disk = vec![0u8; size as usize];
        let entries: Vec<(u8, u8, u32, u32)> = primaries.iter().map(|&(k, s, n)| (0, k, s, n)).collect();
        disk[..512].copy_from_slice(&sector(0x90, &entries));
        disk[440..444].copy_from_slice(&0xdead_beef_u32.to_le_bytes());
        let ext = primaries.iter().find(|p| crate::mbr::is_extended_type(p.0)).map_or(0, |p| p.1);
        let mut ebrs: Vec<(u32, Option<Logical>)> = logicals.iter().map(|l| (l.start - l.lead, Some(*l))).collect();
        if ebrs.first().is_none_or(|e| e.0 != ext) {
            ebrs.insert(0, (ext, None));
        }
        for (i, &(at, l)) in ebrs.iter().enumerate() {
            let mut entries = vec![l.map_or((0, 0, 0, 0), |l| (0, l.kind, l.lead, l.sectors))];
            if let Some(&(next, Some(n))) = ebrs.get(i + 1) {
                entries.push((0, link, next - ext, n.start + n.sectors - next));
            }
            let at = at as usize * 512;
            disk[at..at + 512].copy_from_slice(&sector(0x10 + i as u8, &entries));
        }
        let table = crate::read(&Memory::with_bytes("d.img", disk.clone()), None).unwrap().unwrap();
        assert!(table.warnings.is_empty(), "{:?}", table.warnings);
        (table, disk)
    }

    /// The writes of `places` applied to `disk` resized to `size`, read back; each write that
    /// changes bytes lies outside every partition, and the table has the planned partitions.
    fn apply_dos(t: &Table, size: u64, disk: &[u8], places: &[Place]) -> (Table, Vec<u8>) {
        let writes = t.rebuilt(size, places).unwrap();
        let ext = t.partitions.iter().find(|p| p.is_extended()).map(|p| p.number);
        assert_eq!(writes.last().map(|w| w.0), Some(0), "sector 0 last");
        let mut new = disk.to_vec();
        new.resize(size as usize, 0);
        for (at, w) in &writes {
            let (at, end) = (*at, *at + w.len() as u64);
            if new[at as usize..end as usize] != w[..] {
                for q in places.iter().filter(|q| Some(q.number) != ext) {
                    assert!(end <= q.start || at >= q.start + q.len, "write at {at} over {q:?}");
                }
            }
            new[at as usize..end as usize].copy_from_slice(w);
        }
        let read = crate::read(&Memory::with_bytes("n.img", new.clone()), None).unwrap().unwrap();
        assert!(read.warnings.is_empty(), "{:?}", read.warnings);
        let got: Vec<Place> =
            read.partitions.iter().map(|p| Place { number: p.number, start: p.start, len: p.len }).collect();
        assert_eq!(got, places);
        let uuids: Vec<_> = read.partitions.iter().map(|p| &p.partuuid).collect();
        assert_eq!(uuids, t.partitions.iter().map(|p| &p.partuuid).collect::<Vec<_>>());
        (read, new)
    }

    /// The EBR at byte offset `at` of `disk`: its boot-code byte 0, its two entries' type,
    /// start and sectors, and whether entry 1 has CHS FE FF FF.
    fn ebr(disk: &[u8], at: u64) -> (u8, [(u8, u32, u32); 2], bool) {
        let s = &disk[at as usize..at as usize + 512];
        assert_eq!(&s[510..], &[0x55, 0xAA]);
        assert!(s[478..510].iter().all(|&b| b == 0), "entries 3 and 4 empty");
        let e = |i: usize| {
            let e = crate::mbr::Entry::decode(s, 446 + 16 * i);
            (e.kind, e.start, e.sectors)
        };
        (s[0], [e(0), e(1)], s[447..450] == [0xFE, 0xFF, 0xFF])
    }

    const S: u32 = 2048; // sectors in a MiB

    /// Debian's installer default: 1 primary root, 2 extended, 5 logical swap ending last.
    fn debian() -> (Table, Vec<u8>) {
        let swap = Logical { lead: S, start: 42 * S, sectors: 20 * S, kind: 0x82 };
        dos(64 * MIB, &[(0x83, S, 40 * S), (0x05, 41 * S, 21 * S)], &[swap], 0x05)
    }

    #[test]
    fn the_last_logical_partition_grows_and_its_extended_partition_with_it() {
        let (t, disk) = debian();
        assert_eq!(default_grow(&t), Some(5));
        for size in [128 * MIB, 48 * MIB] {
            let places = plan(&t, size, 5).unwrap();
            assert!(moves_ebr_chain(&t, &places));
            let want = [
                Place { number: 1, start: MIB, len: 40 * MIB },
                Place { number: 2, start: 41 * MIB, len: size - 41 * MIB },
                Place { number: 5, start: 42 * MIB, len: size - 42 * MIB },
            ];
            assert_eq!(places, want);
            let (_, new) = apply_dos(&t, size, &disk, &places);
            // The EBR where it was, its boot area kept; entry 1 rewritten (a new size).
            assert_eq!(ebr(&new, 41 * MIB), (0x10, [(0x82, S, (size / 512) as u32 - 42 * S), (0, 0, 0)], true));
            assert_eq!(new[440..444], disk[440..444], "disk signature");
        }
    }

    #[test]
    fn a_grown_primary_pushes_the_logicals_to_the_end_each_keeping_its_gap_and_link_type() {
        // 5 with a 63-sector gap, 6 with 1 sector, 7 with 2048; links of type 0x0F.
        let logicals = [
            Logical { lead: 63, start: 20 * S + 63, sectors: 4 * S, kind: 0x83 },
            Logical { lead: 1, start: 25 * S, sectors: 3 * S, kind: 0x82 },
            Logical { lead: S, start: 29 * S, sectors: 2 * S, kind: 0x07 },
        ];
        let (t, disk) = dos(48 * MIB, &[(0x83, S, 19 * S), (0x0F, 20 * S, 11 * S)], &logicals, 0x0F);
        for size in [96 * MIB, 40 * MIB] {
            let places = plan(&t, size, 1).unwrap();
            let end = size;
            let p7 = Place { number: 7, start: end - 2 * MIB, len: 2 * MIB };
            let p6 = Place { number: 6, start: (p7.start - MIB - 3 * MIB) / MIB * MIB, len: 3 * MIB };
            let p5 = Place { number: 5, start: (p6.start - 512 - 4 * MIB) / MIB * MIB, len: 4 * MIB };
            let ext = p5.start - 63 * 512;
            let want = [
                Place { number: 1, start: MIB, len: ext - MIB },
                Place { number: 2, start: ext, len: end - ext },
                p5,
                p6,
                p7,
            ];
            assert_eq!(places, want, "{size}");
            let (_, new) = apply_dos(&t, size, &disk, &places);
            let lba = |b: u64| (b / 512) as u32;
            let e5 = ebr(&new, ext);
            assert_eq!(e5.0, 0x10, "boot area of 5's EBR");
            assert_eq!(e5.1, [(0x83, 63, 4 * S), (0x0F, lba(p6.start - 512 - ext), 3 * S + 1)]);
            assert_eq!(ebr(&new, p6.start - 512).1[1], (0x0F, lba(p7.start - MIB - ext), 3 * S));
            assert_eq!(ebr(&new, p7.start - MIB), (0x12, [(0x07, S, 2 * S), (0, 0, 0)], true));
        }
    }

    #[test]
    fn a_middle_logical_partition_grows_and_the_one_after_it_moves_to_the_end() {
        let logicals = [
            Logical { lead: S, start: 10 * S, sectors: 8 * S, kind: 0x83 },
            Logical { lead: S, start: 19 * S, sectors: 8 * S, kind: 0x83 },
        ];
        let (t, disk) = dos(32 * MIB, &[(0x83, S, 8 * S), (0x05, 9 * S, 18 * S)], &logicals, 0x05);
        let places = plan(&t, 64 * MIB, 5).unwrap();
        assert_eq!(
            places,
            [
                Place { number: 1, start: MIB, len: 8 * MIB },
                Place { number: 2, start: 9 * MIB, len: 55 * MIB },
                Place { number: 5, start: 10 * MIB, len: 45 * MIB },
                Place { number: 6, start: 56 * MIB, len: 8 * MIB },
            ]
        );
        let (_, new) = apply_dos(&t, 64 * MIB, &disk, &places);
        // 5's EBR stays, both entries rewritten (a new size, a link to where 6's EBR went).
        assert_eq!(ebr(&new, 9 * MIB).1, [(0x83, S, 45 * S), (0x05, 46 * S, 9 * S)]);
        assert_eq!(ebr(&new, 55 * MIB), (0x11, [(0x83, S, 8 * S), (0, 0, 0)], true));
        // A smaller disk with no room for 6 after 5's data start is refused with numbers.
        let e = plan(&t, 12 * MIB, 5).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::SizeMismatch, "{e}");
        assert!(e.to_string().contains("need 9437184 bytes"), "{e}");
    }

    #[test]
    fn a_primary_after_the_extended_partition_moves_and_a_logical_before_it_grows() {
        let logicals = [Logical { lead: S, start: 10 * S, sectors: 8 * S, kind: 0x83 }];
        let (t, disk) = dos(32 * MIB, &[(0x83, S, 8 * S), (0x05, 9 * S, 9 * S), (0x83, 18 * S, 4 * S)], &logicals, 5);
        let places = plan(&t, 64 * MIB, 5).unwrap();
        assert_eq!(
            places,
            [
                Place { number: 1, start: MIB, len: 8 * MIB },
                Place { number: 2, start: 9 * MIB, len: 51 * MIB },
                Place { number: 3, start: 60 * MIB, len: 4 * MIB },
                Place { number: 5, start: 10 * MIB, len: 50 * MIB },
            ]
        );
        apply_dos(&t, 64 * MIB, &disk, &places);
    }

    #[test]
    fn an_unchanged_chain_is_written_as_read_and_unchanged_entries_keep_their_chs() {
        let logicals = [
            Logical { lead: S, start: 10 * S, sectors: 8 * S, kind: 0x83 },
            Logical { lead: S, start: 19 * S, sectors: 8 * S, kind: 0x82 },
        ];
        let (t, disk) = dos(32 * MIB, &[(0x83, S, 8 * S), (0x05, 9 * S, 18 * S), (0x83, 27 * S, 4 * S)], &logicals, 5);
        let places = plan(&t, 64 * MIB, 3).unwrap();
        assert!(!moves_ebr_chain(&t, &places));
        let writes = t.rebuilt(64 * MIB, &places).unwrap();
        assert_eq!(writes[..2], t.ebrs[..]);
        apply_dos(&t, 64 * MIB, &disk, &places);
        // 6 grows: 5's EBR keeps entry 1's bytes (CHS 01 02 03), its link is rewritten.
        let places = plan(&t, 64 * MIB, 6).unwrap();
        let (_, new) = apply_dos(&t, 64 * MIB, &disk, &places);
        assert_eq!(
            new[9 * MIB as usize + 446..9 * MIB as usize + 462],
            disk[9 * MIB as usize + 446..9 * MIB as usize + 462]
        );
        assert_eq!(ebr(&new, 18 * MIB).1, [(0x82, S, 41 * S), (0, 0, 0)]);
    }

    #[test]
    fn an_empty_first_ebr_stays_when_its_extended_partition_does_not_move_and_goes_when_it_does() {
        let logicals = [Logical { lead: S, start: 12 * S, sectors: 8 * S, kind: 0x83 }];
        let (t, disk) = dos(32 * MIB, &[(0x83, S, 8 * S), (0x05, 9 * S, 11 * S)], &logicals, 5);
        assert_eq!(crate::mbr::chain(&t).len(), 2);
        let places = plan(&t, 64 * MIB, 5).unwrap();
        let (_, new) = apply_dos(&t, 64 * MIB, &disk, &places);
        assert_eq!(ebr(&new, 9 * MIB).1, [(0, 0, 0), (0x05, 2 * S, 53 * S)]);
        let places = plan(&t, 64 * MIB, 1).unwrap();
        assert_eq!(places[1], Place { number: 2, start: 55 * MIB, len: 9 * MIB });
        let (read, _) = apply_dos(&t, 64 * MIB, &disk, &places);
        assert_eq!(read.ebrs.len(), 1);
    }

    #[test]
    fn a_chain_out_of_disk_order_is_refused_when_it_would_move() {
        // 5's EBR comes first in the chain but 5 lies after 6.
        let mut disk = vec![0u8; 32 * MIB as usize];
        disk[..512].copy_from_slice(&sector(0, &[(0, 0x83, S, 8 * S), (0, 0x05, 9 * S, 20 * S)]));
        let ebr5 = sector(0, &[(0, 0x83, 10 * S, 4 * S), (0, 0x05, S, 4 * S)]);
        let ebr6 = sector(0, &[(0, 0x83, S, 4 * S)]);
        disk[9 * MIB as usize..][..512].copy_from_slice(&ebr5);
        disk[10 * MIB as usize..][..512].copy_from_slice(&ebr6);
        let t = crate::read(&Memory::with_bytes("d.img", disk), None).unwrap().unwrap();
        assert_eq!(t.partitions.len(), 4);
        let e = plan(&t, 64 * MIB, 1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(e.to_string().contains("EBR chain cannot be rewritten"), "{e}");
        // 5 ends last and grows (6 stays): its chain is rewritten, so refused too.
        assert_eq!(plan(&t, 64 * MIB, 5).unwrap_err().kind(), ErrorKind::Unsupported);
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

        /// Random DOS layouts: primaries, an extended partition with 1 to 4 logicals (gaps
        /// between EBR and partition of 1, 63 or 2048 sectors, links of type 5 or 0x0F, maybe
        /// an empty first EBR), maybe a primary after it; any partition grown into any size. An
        /// accepted plan reads back as planned with the PARTUUIDs, no write lands on a
        /// partition, every logical keeps its gap; a refused one is a size mismatch.
        #[test]
        fn dos_plans_with_logicals_read_back_as_planned(
            before in proptest::collection::vec((1u32..6, 0u32..2), 0..3),
            logicals in proptest::collection::vec((0usize..3, 1u32..6, 0u32..2, 0usize..3), 1..5),
            after in proptest::option::of(1u32..6),
            link in proptest::sample::select(vec![0x05u8, 0x0F]),
            grow in 0usize..8,
            new_mib in 4u64..64,
        ) {
            let mut primaries = Vec::new();
            let mut lba = S;
            for (len, gap) in &before {
                primaries.push((0x83, lba, len * S));
                lba += (len + gap) * S;
            }
            let ext = lba;
            let mut parts = Vec::new();
            for &(lead, len, gap, kind) in &logicals {
                let lead = [1, 63, S][lead];
                lba += gap * S;
                parts.push(Logical { lead, start: lba + lead, sectors: len * S, kind: [0x83, 0x82, 0x07][kind] });
                lba += lead + len * S;
            }
            primaries.push((link, ext, lba - ext));
            if let Some(len) = after {
                let start = lba.div_ceil(S) * S;
                primaries.push((0x83, start, len * S));
                lba = start + len * S;
            }
            let (t, disk) = dos(u64::from(lba + S) * 512, &primaries, &parts, link);
            let numbers: Vec<u32> = t.partitions.iter().filter(|p| !p.is_extended()).map(|p| p.number).collect();
            let grow = numbers[grow % numbers.len()];
            let size = new_mib * MIB;
            let leads = |t: &Table| -> Vec<u64> {
                crate::mbr::chain(t).iter().filter_map(|e| e.logical.map(|p| p.start - e.at)).collect()
            };
            match plan(&t, size, grow) {
                Ok(places) => {
                    let (read, _) = apply_dos(&t, size, &disk, &places);
                    proptest::prop_assert_eq!(leads(&read), leads(&t));
                }
                Err(e) => proptest::prop_assert_eq!(e.kind(), ErrorKind::SizeMismatch, "{}", e),
            }
        }
    }
}
