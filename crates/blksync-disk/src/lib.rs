//! Partition tables: DOS/MBR (with the extended partition's EBR chain) and GPT, read from any
//! [`Source`] (a file, a block device, an NBD export, a compressed image), checked, and, for a
//! whole-disk sync onto a disk of another size, the writes that move a GPT's backup to the new
//! end (docs/PARTITIONS.md is the specification this code mirrors).
//!
//! Why: `blksync sync` of one partition of a disk image, or of a whole disk onto a larger one,
//! needs to know where partitions are and to leave a valid table behind (GitHub issue 11).
//!
//! Reading checks everything it uses: signatures, both GPT headers and both entry arrays with
//! their CRC-32, the EBR chain (forward only, at most 128 logicals), and the bounds of every
//! partition (inside the disk, inside GPT's usable range, no overlaps). Damage is an error of
//! kind [`ErrorKind::Corrupt`] naming the source and the byte offset; a damaged GPT copy next
//! to a good one is a warning in [`Table::warnings`]. Every length read from the disk is checked
//! against a limit before anything is allocated.
//!
//! ```no_run
//! use blksync_core::endpoint::memory::Memory;
//! use blksync_disk::{Selector, read};
//! # fn main() -> blksync_core::Result<()> {
//! let disk = Memory::with_bytes("disk.img", std::fs::read("disk.img").unwrap());
//! if let Some(table) = read(&disk, None)? {
//!     let root = table.find(&Selector::parse("name=root")?)?;
//!     println!("root: {} bytes at {}, PARTUUID {}", root.len, root.start, root.partuuid);
//! }
//! # Ok(()) }
//! ```
//!
//! Modules: [`mbr`] (DOS tables and the EBR chain), [`gpt`] (headers, entries, relocation and
//! an encoder), [`layout`] (a table with partitions moved or resized for `clone`, logical DOS
//! partitions with a new EBR chain), [`crc32`], [`guid`], `select` (choosing a partition by
//! number, name or PARTUUID).
//!
//! [`Source`]: blksync_core::endpoint::Source

pub mod crc32;
pub mod gpt;
pub mod guid;
pub mod layout;
pub mod mbr;
mod select;

use std::path::{Path, PathBuf};

use blksync_core::endpoint::Source;
use blksync_core::{Error, ErrorKind, Result};

pub use guid::Guid;
pub use select::Selector;

/// The GPT type of a BIOS boot partition (GRUB's core image on a GPT disk).
pub const GPT_BIOS_BOOT: Guid =
    Guid([0x48, 0x61, 0x68, 0x21, 0x49, 0x64, 0x6F, 0x6E, 0x74, 0x4E, 0x65, 0x65, 0x64, 0x45, 0x46, 0x49]);
/// The GPT type of Linux swap.
pub const GPT_LINUX_SWAP: Guid =
    Guid([0x6D, 0xFD, 0x57, 0x06, 0xAB, 0xA4, 0xC4, 0x43, 0x84, 0xE5, 0x09, 0x33, 0xC8, 0x4B, 0x4F, 0x4F]);

/// The smallest and largest sector sizes accepted (a power of two in between).
pub const SECTOR_SIZES: (u32, u32) = (512, 65536);

/// A partition table as read from a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// DOS or GPT, with the fields of the scheme.
    pub scheme: Scheme,
    /// The logical block size the table's LBAs count in.
    pub sector_size: u32,
    /// The partitions, in number order (for DOS: primaries, the extended one, then logicals).
    pub partitions: Vec<Partition>,
    /// What is wrong but did not stop the read, one line each: a damaged GPT copy, a hybrid
    /// MBR, a backup header not at the end of the disk.
    pub warnings: Vec<String>,
    /// The size of the disk it was read from, in bytes.
    pub disk_size: u64,
    /// Sector 0 as read (the MBR, protective for GPT).
    pub(crate) mbr: Vec<u8>,
    /// For GPT: the good header and entry array, for relocation.
    pub(crate) gpt: Option<gpt::Raw>,
    /// For DOS: every EBR of the chain as read, at its byte offset.
    pub(crate) ebrs: Vec<(u64, Vec<u8>)>,
    name: PathBuf,
}

/// The partitioning scheme of a [`Table`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scheme {
    /// A DOS (MBR) table.
    Dos {
        /// The disk signature at byte 440 (`sfdisk`'s `label-id`).
        signature: u32,
    },
    /// A GUID partition table.
    Gpt {
        /// The disk GUID (`sfdisk`'s `label-id`).
        disk_guid: Guid,
        /// The first LBA a partition may use.
        first_usable: u64,
        /// The last LBA a partition may use (inclusive).
        last_usable: u64,
        /// The number of entries in the array (usually 128).
        entry_count: u32,
        /// The size of one entry in bytes (usually 128).
        entry_size: u32,
        /// The LBA of the primary entry array (usually 2).
        entry_lba: u64,
        /// Which copy the table was read from.
        from_backup: bool,
    },
}

/// What kind of partition an entry says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PartKind {
    /// A DOS type byte.
    Dos(u8),
    /// A GPT partition type GUID.
    Gpt(Guid),
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Its number as Linux gives it (`sda3`: 3).
    pub number: u32,
    /// Its first byte on the disk.
    pub start: u64,
    /// Its length in bytes.
    pub len: u64,
    /// Its type.
    pub kind: PartKind,
    /// Its GPT name (`PARTLABEL`), when it has a non-empty one.
    pub name: Option<String>,
    /// `PARTUUID` as `blkid` prints it: the unique GUID (GPT) or `SSSSSSSS-NN` (DOS).
    pub partuuid: String,
    /// The DOS boot flag, or GPT attribute bit 2 (legacy BIOS bootable).
    pub bootable: bool,
    /// The GPT attribute bits (0 for DOS).
    pub attributes: u64,
}

impl Partition {
    /// Whether this is a BIOS boot partition (GPT type `21686148-6449-6E6F-744E-656564454649`).
    #[must_use]
    pub fn is_bios_boot(&self) -> bool {
        self.kind == PartKind::Gpt(GPT_BIOS_BOOT)
    }

    /// Whether this is Linux swap (DOS `0x82`, GPT `0657FD6D-A4AB-43C4-84E5-0933C84B4F4F`).
    #[must_use]
    pub fn is_swap(&self) -> bool {
        matches!(self.kind, PartKind::Dos(0x82)) || self.kind == PartKind::Gpt(GPT_LINUX_SWAP)
    }

    /// Whether this is a DOS extended partition (a container of logical partitions).
    #[must_use]
    pub fn is_extended(&self) -> bool {
        matches!(self.kind, PartKind::Dos(t) if mbr::is_extended_type(t))
    }

    /// One byte past its last byte.
    #[must_use]
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// "partition 2 (bytes 1048576..9437184)", for messages.
    fn describe(&self) -> String {
        format!("partition {} (bytes {}..{})", self.number, self.start, self.end())
    }
}

impl Table {
    /// The partition `sel` names; an error listing the partitions there are when none (or, for
    /// a name, more than one) matches.
    pub fn find(&self, sel: &Selector) -> Result<&Partition> {
        select::find(self, sel)
    }

    /// Where the first partition starts, in bytes: the end of the gap at the start of the disk
    /// (the table itself and, on DOS disks, often a boot loader). `None` without partitions.
    #[must_use]
    pub fn first_partition_start(&self) -> Option<u64> {
        self.partitions.iter().map(|p| p.start).min()
    }

    /// The source the table was read from, for messages.
    #[must_use]
    pub fn name(&self) -> &Path {
        &self.name
    }

    /// "dos" or "gpt", as `sfdisk -J` names the label.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self.scheme {
            Scheme::Dos { .. } => "dos",
            Scheme::Gpt { .. } => "gpt",
        }
    }

    /// Bytes 0..446 of sector 0 as read: a DOS disk's boot code, with the disk signature at
    /// 440..444 (shorter only for a disk smaller than a sector).
    #[must_use]
    pub fn boot_code(&self) -> &[u8] {
        &self.mbr[..self.mbr.len().min(crate::mbr::ENTRIES_AT)]
    }

    /// The bytes that hold a DOS table, as read (byte offset, bytes): the partition entries and
    /// the `55 AA` of sector 0 (bytes 446..512) and every EBR of the chain, whole. Writing them
    /// back onto the disk restores this table and leaves the boot code, bytes 0..446 with the
    /// disk signature, as it is then. Empty for GPT.
    #[must_use]
    pub fn dos_table_sectors(&self) -> Vec<(u64, Vec<u8>)> {
        if !matches!(self.scheme, Scheme::Dos { .. }) || self.mbr.len() < 512 {
            return Vec::new();
        }
        let mut out = vec![(446, self.mbr[446..512].to_vec())];
        out.extend(self.ebrs.iter().cloned());
        out
    }

    /// The writes (byte offset, bytes) that put this GPT on a disk of `new_size` bytes: see
    /// [`gpt::relocate`]. An error of kind `Usage` for a DOS table.
    pub fn relocate_gpt(&self, new_size: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        gpt::relocate(self, new_size)
    }
}

/// Reads the partition table of `source`: `Ok(None)` when there is none (no `55 AA` in sector
/// 0, or sector 0 is not a table), an error when there is one but it is damaged or impossible.
///
/// `sector_hint` is the logical block size of the device, when the caller knows it: it is the
/// sector size of a DOS table, and the first size tried for GPT (then 512, then 4096).
pub fn read(source: &dyn Source, sector_hint: Option<u32>) -> Result<Option<Table>> {
    if let Some(hint) = sector_hint
        && (!hint.is_power_of_two() || hint < SECTOR_SIZES.0 || hint > SECTOR_SIZES.1)
    {
        return Err(Error::usage(format!(
            "{}: sector size {hint} is not a power of two from {} to {}",
            source.name().display(),
            SECTOR_SIZES.0,
            SECTOR_SIZES.1
        )));
    }
    if source.size() < 512 {
        return Ok(None);
    }
    let mut sector0 = vec![0u8; 512];
    source.read_at(&mut sector0, 0)?;
    let Some(entries) = mbr::primary_entries(&sector0) else { return Ok(None) };
    let mut table = if entries.iter().any(|e| e.kind == mbr::PROTECTIVE) {
        let mut table = gpt::read(source, sector_hint)?;
        if entries.iter().any(|e| e.kind != mbr::PROTECTIVE && !e.is_empty()) {
            table.warnings.push(format!(
                "{}: hybrid MBR (a GPT protective entry beside other partitions): the GPT is used",
                source.name().display()
            ));
        }
        table
    } else {
        mbr::read(source, &sector0, &entries, sector_hint.unwrap_or(512))?
    };
    table.mbr = sector0;
    check_bounds(&table)?;
    Ok(Some(table))
}

/// Whether a DOS table `dst` holds the partitions of `src`: the same numbers, starts and
/// types, each at least as large. False when either is not DOS.
#[must_use]
pub fn dos_compatible(src: &Table, dst: &Table) -> bool {
    let dos = |t: &Table| matches!(t.scheme, Scheme::Dos { .. });
    dos(src)
        && dos(dst)
        && src.sector_size == dst.sector_size
        && src.partitions.len() == dst.partitions.len()
        && src.partitions.iter().all(|s| {
            dst.partitions
                .iter()
                .any(|d| d.number == s.number && d.start == s.start && d.kind == s.kind && d.len >= s.len)
        })
}

/// Reads `data` as a disk every way a caller could (no hint, 512, 4096), as it is and with its
/// GPT checksums fixed up so mutations reach the fields behind them; relocates every GPT found
/// to a smaller, the same and a larger size and reads the result back, which must give the same
/// partitions. Panics on a broken invariant; errors are fine. For the fuzz target and the
/// random-input test.
#[doc(hidden)]
pub fn exercise(data: &[u8]) {
    let mut fixed = data.to_vec();
    gpt::fix_checksums(&mut fixed);
    for bytes in [data, &fixed[..]] {
        let disk = blksync_core::endpoint::memory::Memory::with_bytes("fuzz.img", bytes.to_vec());
        for hint in [None, Some(512), Some(4096)] {
            let Ok(Some(table)) = read(&disk, hint) else { continue };
            for p in &table.partitions {
                assert!(p.end() <= table.disk_size, "{p:?}");
            }
            exercise_layout(&table, bytes, hint);
            let len = bytes.len() as u64;
            for new_size in [len / 2, len, len + len / 2 + 4096] {
                let Ok(writes) = table.relocate_gpt(new_size) else { continue };
                let mut moved = bytes.to_vec();
                moved.resize(new_size as usize, 0);
                for (at, w) in &writes {
                    let at = *at as usize;
                    assert!(at + w.len() <= moved.len(), "write at {at} past the end");
                    for p in &table.partitions {
                        assert!(
                            at as u64 + w.len() as u64 <= p.start || at as u64 >= p.end(),
                            "write at {at} over {p:?}"
                        );
                    }
                    moved[at..at + w.len()].copy_from_slice(w);
                }
                let moved = blksync_core::endpoint::memory::Memory::with_bytes("moved.img", moved);
                let again = read(&moved, hint).map(|t| t.map(|t| t.partitions));
                assert_eq!(again.ok().flatten().as_ref(), Some(&table.partitions), "relocated to {new_size}");
            }
        }
    }
}

/// For [`exercise`]: every partition of `table` (read from `bytes`) grown into a smaller, the
/// same and a larger disk; a plan that is accepted must give a table that reads back with every
/// partition where the plan put it, and no write that changes a byte may land inside a
/// partition of the new table (it would be data; the EBRs go in the gaps).
fn exercise_layout(table: &Table, bytes: &[u8], hint: Option<u32>) {
    let len = bytes.len() as u64;
    for grow in table.partitions.iter().map(|p| p.number) {
        for new_size in [len / 2, len, len * 2] {
            let Ok(places) = layout::plan(table, new_size, grow) else { continue };
            let Ok(writes) = table.rebuilt(new_size, &places) else { continue };
            let mut moved = bytes.to_vec();
            moved.resize(new_size as usize, 0);
            for (at, w) in &writes {
                let at = *at as usize;
                assert!(at + w.len() <= moved.len(), "write at {at} past the end");
                if moved[at..at + w.len()] != w[..] {
                    for q in places
                        .iter()
                        .filter(|q| table.partitions.iter().any(|p| p.number == q.number && !p.is_extended()))
                    {
                        assert!(
                            (at + w.len()) as u64 <= q.start || at as u64 >= q.start + q.len,
                            "grow {grow} into {new_size}: write at {at} over {q:?}"
                        );
                    }
                }
                moved[at..at + w.len()].copy_from_slice(w);
            }
            let moved = blksync_core::endpoint::memory::Memory::with_bytes("moved.img", moved);
            let again = read(&moved, hint);
            let Ok(Some(again)) = again else { panic!("grow {grow} into {new_size}: {again:?}") };
            for place in &places {
                let p = again.partitions.iter().find(|p| p.number == place.number);
                assert_eq!(p.map(|p| (p.start, p.len)), Some((place.start, place.len)), "grow {grow} into {new_size}");
            }
            assert_eq!(again.partitions.len(), table.partitions.len(), "grow {grow} into {new_size}");
        }
    }
}

/// An error of kind `Corrupt`: "NAME: WHAT at byte offset AT".
pub(crate) fn corrupt(name: &Path, at: u64, what: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Corrupt, format!("{}: {what} at byte offset {at}", name.display()))
}

/// The checks of docs/PARTITIONS.md, "Bounds": inside the disk, inside GPT's usable range, no
/// overlaps (the extended DOS partition left out).
fn check_bounds(table: &Table) -> Result<()> {
    let name = table.name.display();
    let bad = |what: String| Error::new(ErrorKind::Corrupt, format!("{name}: {} table: {what}", table.label()));
    for p in &table.partitions {
        if p.end() > table.disk_size {
            return Err(bad(format!("{} runs past the end of the disk ({} bytes)", p.describe(), table.disk_size)));
        }
        if let Scheme::Gpt { first_usable, last_usable, .. } = table.scheme {
            let ss = u64::from(table.sector_size);
            let (lo, hi) = (first_usable * ss, (last_usable + 1) * ss);
            if p.start < lo || p.end() > hi {
                return Err(bad(format!("{} lies outside the usable bytes {lo}..{hi}", p.describe())));
            }
        }
    }
    let mut sorted: Vec<&Partition> = table.partitions.iter().filter(|p| !p.is_extended()).collect();
    sorted.sort_by_key(|p| (p.start, p.number));
    for pair in sorted.windows(2) {
        if pair[1].start < pair[0].end() {
            return Err(bad(format!("{} overlaps {}", pair[0].describe(), pair[1].describe())));
        }
    }
    Ok(())
}
