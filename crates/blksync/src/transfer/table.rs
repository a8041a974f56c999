//! A partition table in a whole-disk sync onto a disk of another size (issue 11, part 2).
//!
//! A byte copy of a disk onto a larger one leaves the GPT's backup header and entries where the
//! smaller disk ended, mid-disk: firmware and `sgdisk -v` then find a damaged table, and the
//! space past the old end cannot be partitioned. Onto a smaller disk a byte copy is refused,
//! although every partition may fit. So when the source holds a table and the destination is
//! a fixed-size disk (a device, an NBD export, a `loop://` image) of another size:
//!
//! - **Smaller**: if every partition fits (for GPT, with room for the backup entries and
//!   header after the last), only the destination's size is synced; otherwise the sync is
//!   refused before any write, saying how much room the partitions need.
//! - **Larger or smaller, GPT**: after the pass (and after `--verify`, which compares the bytes
//!   as copied), the primary header is rewritten for the destination's size (alternate and last
//!   usable LBA, CRC), the entries and the backup header go to the destination's last LBAs,
//!   the protective MBR's size is fixed, and a stale backup header in what is now free space is
//!   zeroed. `sgdisk -v` is clean afterwards.
//! - **DOS**: nothing to move (a DOS table has no backup). bsync's 446/512 rule: when the
//!   destination already holds a DOS table with the source's partitions (the same numbers,
//!   starts and types, each at least as large: `blksync_disk::dos_compatible`), that table is
//!   kept: its sector 0 entries and its EBRs are written back after the pass, so only the boot
//!   code (bytes 0..446) came from the source. Otherwise the source's whole table is copied.
//!   Either way the disk signature (bytes 440..443) is the source's, as it is in the boot code:
//!   PARTUUIDs (`SSSSSSSS-NN`) derive from it, and the copy's fstab and GRUB find their
//!   partitions by them, as a GPT copy keeps its disk GUID and partition GUIDs. Two disks with
//!   one signature should not be attached to one machine at once; `sfdisk --disk-id` gives
//!   either a new one.
//!
//! Equal sizes, resizable files, backups and deltas are byte copies, untouched by this: a sync
//! stays byte-identical unless the destination's size forces otherwise. A rerun compares the
//! source's table sectors with the rewritten ones, finds them different, copies them again and
//! rewrites them again: a few sectors, not a reason to remember anything.

use blksync_disk::{Scheme, Table};

use super::End;
use crate::endpoint::{Caps, Identity, Source};
use crate::error::{Error, ErrorKind, Result};
use crate::size::format_size;

/// Whether a sync of a source of `source_size` bytes onto `target` should look for a table: a
/// fixed-size destination of another size, for a plain sync (no undo log, no recorder).
pub(crate) fn wanted(source_size: u64, target: &End, plain: bool) -> bool {
    plain && target.exists && !target.caps.resizable && target.size != source_size && source_size > 0
}

/// The logical sector size to read a table with: a device's; a file's `block_size` is only an
/// I/O hint, and an image is 512-byte sectors unless its GPT says otherwise.
pub(crate) fn sector_hint(identity: Identity, caps: &Caps) -> Option<u32> {
    matches!(identity, Identity::Device { .. }).then_some(caps.block_size)
}

/// Reads the table of `source`, if it has one.
pub(crate) fn read(source: &dyn Source, hint: Option<u32>) -> Result<Option<Table>> {
    blksync_disk::read(source, hint)
}

/// The fewest bytes a destination needs to hold every partition of `table` (and, for GPT, the
/// backup entries and header after the last one).
pub(crate) fn needs(table: &Table) -> u64 {
    let last = table.partitions.iter().map(blksync_disk::Partition::end).max().unwrap_or(0);
    match &table.scheme {
        Scheme::Gpt { entry_count, entry_size, .. } => {
            let sector = u64::from(table.sector_size);
            let array = (u64::from(*entry_count) * u64::from(*entry_size)).div_ceil(sector) * sector;
            last.div_ceil(sector) * sector + array + sector
        }
        Scheme::Dos { .. } => last,
    }
}

/// How many bytes to sync onto a destination of `dest_size` smaller than the source: all of it
/// when the partitions fit, else the error that says what they need.
pub(crate) fn smaller(table: &Table, dest_size: u64, names: &(String, String)) -> Result<u64> {
    let need = needs(table);
    if need <= dest_size {
        return Ok(dest_size);
    }
    Err(Error::new(
        ErrorKind::SizeMismatch,
        format!(
            "destination device is too small for the partitions of {}: they need {need} bytes ({}), {} has {dest_size} ({}); nothing was written",
            names.0,
            format_size(need),
            names.1,
            format_size(dest_size)
        ),
    )
    .with_hint(crate::error::Hint::CommonSize))
}

/// The writes that fit `table` to a destination of `dest_size` bytes (none for DOS).
pub(crate) fn fitted(table: &Table, dest_size: u64) -> Result<Vec<(u64, Vec<u8>)>> {
    match table.scheme {
        Scheme::Gpt { .. } => table.relocate_gpt(dest_size),
        Scheme::Dos { .. } => Ok(Vec::new()),
    }
}

/// The destination's DOS table `dest`, when it is to be kept for the DOS source `table`: it
/// holds the source's partitions, each at least as large.
pub(crate) fn kept(table: &Table, dest: Option<Table>) -> Option<Table> {
    dest.filter(|d| blksync_disk::dos_compatible(table, d))
}

/// What the summary says about the table: one line per partition, and what was done.
pub(crate) fn report(table: &Table, dest_size: u64, moved: bool, kept: Option<&Table>) -> Vec<String> {
    let mut lines = Vec::new();
    for p in &table.partitions {
        let name = p.name.as_deref().map(|n| format!(" {n:?}")).unwrap_or_default();
        lines.push(format!(
            "partition {}{name}: {} at byte offset {}, copied as it is",
            p.number,
            format_size(p.len),
            p.start
        ));
    }
    if let Some(dest) = kept {
        let larger = table
            .partitions
            .iter()
            .filter(|p| dest.partitions.iter().any(|d| d.number == p.number && d.len > p.len))
            .map(|p| p.number.to_string())
            .collect::<Vec<_>>();
        let larger = if larger.is_empty() { String::new() } else { format!("; larger there: {}", larger.join(", ")) };
        lines.push(format!(
            "the destination's DOS table holds these partitions, each at least as large, and was kept: only the boot code and the disk signature came from the source{larger}"
        ));
    } else if moved {
        lines.push(format!(
            "{} table fitted to the destination's {}: the backup header and entries are at its end",
            table.label().to_uppercase(),
            format_size(dest_size)
        ));
    }
    lines
}
