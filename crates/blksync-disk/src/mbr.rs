//! DOS (MBR) partition tables: the four primary entries of sector 0 and the EBR chain of the
//! extended partition (docs/PARTITIONS.md, "DOS / MBR").

use std::path::PathBuf;

use blksync_core::endpoint::Source;
use blksync_core::{Error, ErrorKind, Result};

use crate::{PartKind, Partition, Scheme, Table, corrupt};

/// The type of a GPT protective MBR entry.
pub const PROTECTIVE: u8 = 0xEE;
/// Where the four primary entries start in sector 0 (and in an EBR).
pub const ENTRIES_AT: usize = 446;
/// Where the disk signature is in sector 0.
pub const SIGNATURE_AT: usize = 440;
/// The most logical partitions followed in an EBR chain.
pub const MAX_LOGICAL: u32 = 128;

/// Whether a DOS type byte marks an extended partition (CHS, LBA, Linux extended).
#[must_use]
pub fn is_extended_type(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0F | 0x85)
}

/// One 16-byte MBR entry (CHS fields ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The boot flag byte (`0x80` bootable).
    pub boot: u8,
    /// The type byte.
    pub kind: u8,
    /// The start LBA (relative, in an EBR).
    pub start: u32,
    /// The number of sectors.
    pub sectors: u32,
}

impl Entry {
    /// Decodes the entry at `at` of a 512-byte sector.
    pub(crate) fn decode(sector: &[u8], at: usize) -> Entry {
        let u32_at = |o: usize| u32::from_le_bytes([sector[o], sector[o + 1], sector[o + 2], sector[o + 3]]);
        Entry { boot: sector[at], kind: sector[at + 4], start: u32_at(at + 8), sectors: u32_at(at + 12) }
    }

    /// Type 0 or zero sectors: no partition.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.kind == 0 || self.sectors == 0
    }

    /// The 16 bytes of this entry, with both CHS fields "beyond CHS" (`FE FF FF`), as sfdisk
    /// writes them past cylinder 1023: nothing reads CHS any more, and it cannot say where a
    /// partition of a large disk is.
    #[must_use]
    pub fn encode(&self) -> [u8; 16] {
        let mut e = [0u8; 16];
        e[0] = self.boot;
        e[1..4].copy_from_slice(&[0xFE, 0xFF, 0xFF]);
        e[4] = self.kind;
        e[5..8].copy_from_slice(&[0xFE, 0xFF, 0xFF]);
        e[8..12].copy_from_slice(&self.start.to_le_bytes());
        e[12..16].copy_from_slice(&self.sectors.to_le_bytes());
        e
    }
}

/// One EBR of a table's chain as it was read.
pub(crate) struct Ebr<'a> {
    /// Its byte offset on the disk.
    pub(crate) at: u64,
    /// Its 512 bytes.
    pub(crate) sector: &'a [u8],
    /// The logical partition it holds; `None` for an EBR whose first entry is empty.
    pub(crate) logical: Option<&'a Partition>,
}

/// The EBR chain of a DOS `table` as read, in chain order, each with its logical partition
/// (empty for GPT, or a DOS table without an extended partition).
pub(crate) fn chain(table: &Table) -> Vec<Ebr<'_>> {
    // The reader numbers logicals in chain order, skipping EBRs without one: the same walk.
    let mut logicals = table.partitions.iter().filter(|p| p.number > 4 && !p.is_extended());
    table
        .ebrs
        .iter()
        .map(|(at, sector)| {
            let holds = !Entry::decode(sector, ENTRIES_AT).is_empty();
            Ebr { at: *at, sector, logical: if holds { logicals.next() } else { None } }
        })
        .collect()
}

/// Whether a 512-byte sector ends in `55 AA`.
#[must_use]
pub fn has_signature(sector: &[u8]) -> bool {
    sector.len() >= 512 && sector[510] == 0x55 && sector[511] == 0xAA
}

/// The four primary entries of sector 0, or `None` when it is not a partition table (no
/// `55 AA`, or a boot flag other than 0 and `0x80`: a filesystem's boot sector).
#[must_use]
pub fn primary_entries(sector0: &[u8]) -> Option<[Entry; 4]> {
    if !has_signature(sector0) {
        return None;
    }
    let entries = [0, 1, 2, 3].map(|i| Entry::decode(sector0, ENTRIES_AT + 16 * i));
    entries.iter().all(|e| e.boot == 0 || e.boot == 0x80).then_some(entries)
}

/// Reads a DOS table whose sector 0 (`sector0`, with its `entries`) was read already.
pub(crate) fn read(source: &dyn Source, sector0: &[u8], entries: &[Entry; 4], sector_size: u32) -> Result<Table> {
    let name = source.name();
    let ss = u64::from(sector_size);
    let signature = u32::from_le_bytes([sector0[440], sector0[441], sector0[442], sector0[443]]);
    let mut table = Table {
        scheme: Scheme::Dos { signature },
        sector_size,
        partitions: Vec::new(),
        warnings: Vec::new(),
        disk_size: source.size(),
        mbr: Vec::new(),
        gpt: None,
        ebrs: Vec::new(),
        name: PathBuf::from(name),
    };
    let part = |number: u32, e: &Entry, start_lba: u64| partition(signature, ss, number, e, start_lba);
    let mut extended: Option<Partition> = None;
    for (slot, e) in (1u32..).zip(entries) {
        if e.is_empty() {
            continue;
        }
        let p = part(slot, e, u64::from(e.start));
        if p.is_extended() {
            if extended.is_some() {
                table.warnings.push(format!(
                    "{}: more than one extended partition: {} is ignored",
                    name.display(),
                    p.describe()
                ));
                continue;
            }
            extended = Some(p.clone());
        }
        table.partitions.push(p);
    }
    if let Some(ext) = extended {
        logicals(source, &ext, signature, &mut table)?;
    }
    Ok(table)
}

fn partition(signature: u32, ss: u64, number: u32, e: &Entry, start_lba: u64) -> Partition {
    Partition {
        number,
        start: start_lba * ss,
        len: u64::from(e.sectors) * ss,
        kind: PartKind::Dos(e.kind),
        name: None,
        partuuid: format!("{signature:08x}-{number:02x}"),
        bootable: e.boot == 0x80,
        attributes: 0,
    }
}

/// Follows the EBR chain of the extended partition `ext`, adding its logical partitions.
fn logicals(source: &dyn Source, ext: &Partition, signature: u32, table: &mut Table) -> Result<()> {
    // The EBR chain: each EBR's first entry is a logical partition relative to the EBR, the
    // second the next EBR relative to the extended partition. Strictly forward links make a
    // loop impossible and bound the walk with the count limit.
    let name = source.name();
    let ss = u64::from(table.sector_size);
    let part = |number: u32, e: &Entry, start_lba: u64| partition(signature, ss, number, e, start_lba);
    let ext_lba = ext.start / ss;
    let mut ebr_lba = ext_lba;
    let mut number = 5u32;
    let mut sector = vec![0u8; 512];
    for ebrs in 1u32.. {
        let at = ebr_lba * ss;
        // EBRs without a logical partition count too: the walk is bounded either way.
        if ebrs > MAX_LOGICAL {
            return Err(corrupt(name, at, format!("more than {MAX_LOGICAL} EBRs in the chain of logical partitions")));
        }
        if at + 512 > ext.end() || at + 512 > source.size() {
            return Err(corrupt(
                name,
                at,
                format!("EBR of partition {number} lies outside extended {}", ext.describe()),
            ));
        }
        source.read_at(&mut sector, at)?;
        if !has_signature(&sector) {
            table.warnings.push(format!(
                "{}: EBR at byte offset {at} has no 55 AA signature: the chain of logical partitions ends there",
                name.display()
            ));
            break;
        }
        table.ebrs.push((at, sector.clone()));
        let this = Entry::decode(&sector, ENTRIES_AT);
        let next = Entry::decode(&sector, ENTRIES_AT + 16);
        if !this.is_empty() {
            let p = part(number, &this, ebr_lba + u64::from(this.start));
            if this.start == 0 || p.end() > ext.end() {
                return Err(corrupt(
                    name,
                    at,
                    format!(
                        "logical {} (of the EBR) does not lie inside extended {} after its EBR",
                        p.describe(),
                        ext.describe()
                    ),
                ));
            }
            table.partitions.push(p);
            number += 1;
        }
        if next.is_empty() || !is_extended_type(next.kind) {
            break;
        }
        let next_lba = ext_lba + u64::from(next.start);
        if next_lba <= ebr_lba {
            return Err(corrupt(
                name,
                at + ENTRIES_AT as u64 + 16,
                format!(
                    "the EBR at byte offset {at} links back to byte offset {} (a loop in the EBR chain)",
                    next_lba * ss
                ),
            ));
        }
        ebr_lba = next_lba;
    }
    Ok(())
}

/// The EBR chain of `new`, which is `old` with its extended and logical partitions moved or
/// resized (docs/CLONE.md, "The new table"), as writes (byte offset, 512 bytes) in chain order.
///
/// One EBR per logical partition, as far before it as its EBR was in `old` (its *lead*: the
/// gap is the source's, whatever it was), and an empty EBR at the extended partition's start
/// when no logical's EBR is there. Each EBR keeps the boot-code area (bytes 0..446) of the
/// source EBR it replaces; entry 1 is the logical partition, its start relative to the EBR;
/// entry 2 the link to the next EBR, its start relative to the extended partition's, covering
/// the next EBR through the end of its logical (as fdisk writes it), of the type the source's
/// links had (`0x05` when it had none); entries 3 and 4 empty; `55 AA`. An entry that says what
/// the source's said at the same place keeps its bytes, CHS included; any other is written
/// with CHS `FE FF FF`.
///
/// Errors: `Usage` when an EBR or a logical partition would lie out of order, outside the
/// extended partition or over another partition, or a primary partition inside the extended
/// one; `SizeMismatch` for a value past the 2^32 sectors a DOS table can address.
pub(crate) fn write_chain(old: &Table, new: &Table) -> Result<Vec<(u64, Vec<u8>)>> {
    let name = old.name().display();
    let ss = u64::from(old.sector_size);
    let (Some(old_ext), Some(ext)) =
        (old.partitions.iter().find(|p| p.is_extended()), new.partitions.iter().find(|p| p.is_extended()))
    else {
        return Ok(Vec::new());
    };
    let source = chain(old);
    let link_kind = source
        .iter()
        .map(|e| Entry::decode(e.sector, ENTRIES_AT + 16))
        .find(|e| !e.is_empty() && is_extended_type(e.kind))
        .map_or(0x05, |e| e.kind);
    let ebrs = placed(&source, new, ext)?;
    let sectors = |bytes: u64| {
        u32::try_from(bytes / ss).map_err(|_| {
            Error::new(
                ErrorKind::SizeMismatch,
                format!("{name}: the EBR chain reaches past the 2^32 sectors a DOS table can address"),
            )
        })
    };
    let mut out = Vec::with_capacity(ebrs.len());
    for (i, (at, from, p)) in ebrs.iter().enumerate() {
        let mut sector = vec![0u8; 512];
        if let Some(from) = from {
            sector[..ENTRIES_AT].copy_from_slice(&from.sector[..ENTRIES_AT]);
        }
        let logical = match p {
            Some(p) => {
                let PartKind::Dos(kind) = p.kind else {
                    return Err(Error::usage(format!("{name}: {} is not a DOS partition", p.describe())));
                };
                let boot = from.map_or(0, |f| Entry::decode(f.sector, ENTRIES_AT).boot);
                Some(Entry { boot, kind, start: sectors(p.start - at)?, sectors: sectors(p.len)? })
            }
            None => None,
        };
        let link = match ebrs.get(i + 1) {
            Some((next, _, next_logical)) => Some(Entry {
                boot: 0,
                kind: link_kind,
                start: sectors(next - ext.start)?,
                sectors: sectors(next_logical.map_or(next + ss, Partition::end) - next)?,
            }),
            None => None,
        };
        // An EBR where it was, in an extended partition that starts where it did: its entries
        // that did not change keep their bytes (the CHS of a small disk's table stays right).
        let kept = from.filter(|f| f.at == *at && ext.start == old_ext.start);
        for (slot, entry) in [(0, logical), (1, link)] {
            let Some(entry) = entry else { continue };
            let off = ENTRIES_AT + 16 * slot;
            match kept {
                Some(f) if Entry::decode(f.sector, off) == entry => {
                    sector[off..off + 16].copy_from_slice(&f.sector[off..off + 16]);
                }
                _ => sector[off..off + 16].copy_from_slice(&entry.encode()),
            }
        }
        sector[510] = 0x55;
        sector[511] = 0xAA;
        out.push((*at, sector));
    }
    Ok(out)
}

/// One EBR of a new chain: its byte offset, the source EBR it replaces, its logical partition
/// on the new disk.
type Placed<'a> = (u64, Option<&'a Ebr<'a>>, Option<&'a Partition>);

/// Where the EBRs of `new` go (see [`write_chain`]), checked: in order, inside the extended
/// partition `ext`, each before its logical partition, none over another partition.
fn placed<'a>(source: &'a [Ebr<'a>], new: &'a Table, ext: &Partition) -> Result<Vec<Placed<'a>>> {
    let name = new.name().display();
    let ss = u64::from(new.sector_size);
    let mut ebrs: Vec<Placed<'a>> = Vec::new();
    for e in source {
        let Some(was) = e.logical else { continue };
        let Some(p) = new.partitions.iter().find(|p| p.number == was.number) else { continue };
        let at = p
            .start
            .checked_sub(was.start.saturating_sub(e.at))
            .ok_or_else(|| Error::usage(format!("{name}: no room for the EBR of {} before it", p.describe())))?;
        ebrs.push((at, Some(e), Some(p)));
    }
    if ebrs.first().is_none_or(|first| first.0 != ext.start) {
        ebrs.insert(0, (ext.start, source.first(), None));
    }
    let mut free = ext.start;
    for (at, _, p) in &ebrs {
        if *at < free || at + ss > ext.end() {
            return Err(Error::usage(format!(
                "{name}: an EBR at byte offset {at} would lie outside extended {} or over the partition before it",
                ext.describe()
            )));
        }
        free = at + ss;
        if let Some(p) = p {
            if p.start < free || p.end() > ext.end() {
                return Err(Error::usage(format!(
                    "{name}: logical {} would not lie inside extended {} after its EBR at byte offset {at}",
                    p.describe(),
                    ext.describe()
                )));
            }
            free = p.end();
        }
    }
    if let Some(p) =
        new.partitions.iter().find(|p| p.number <= 4 && !p.is_extended() && p.start < ext.end() && p.end() > ext.start)
    {
        return Err(Error::usage(format!(
            "{name}: primary {} would lie inside extended {}",
            p.describe(),
            ext.describe()
        )));
    }
    Ok(ebrs)
}
