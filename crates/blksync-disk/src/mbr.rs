//! DOS (MBR) partition tables: the four primary entries of sector 0 and the EBR chain of the
//! extended partition (docs/PARTITIONS.md, "DOS / MBR").

use std::path::PathBuf;

use blksync_core::Result;
use blksync_core::endpoint::Source;

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
    fn decode(sector: &[u8], at: usize) -> Entry {
        let u32_at = |o: usize| u32::from_le_bytes([sector[o], sector[o + 1], sector[o + 2], sector[o + 3]]);
        Entry { boot: sector[at], kind: sector[at + 4], start: u32_at(at + 8), sectors: u32_at(at + 12) }
    }

    /// Type 0 or zero sectors: no partition.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.kind == 0 || self.sectors == 0
    }
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
