//! GUID partition tables (UEFI §5.3, docs/PARTITIONS.md "GPT"): both headers and both entry
//! arrays checked, the good copy read; the writes that move a GPT to a disk of another size
//! ([`relocate`]); and an encoder of a new GPT ([`encode`]).

use std::path::{Path, PathBuf};

use blksync_core::endpoint::Source;
use blksync_core::{Error, ErrorKind, Result};

use crate::crc32::crc32;
use crate::{Guid, PartKind, Partition, Scheme, Table, corrupt, mbr};

/// The header signature.
pub const SIGNATURE: &[u8; 8] = b"EFI PART";
/// The revision written by [`encode`] (1.0).
pub const REVISION: u32 = 0x0001_0000;
/// The size of the header's defined fields.
pub const HEADER_SIZE: u32 = 92;
/// The largest entry array read (entries × entry size), the allocation cap.
pub const MAX_ARRAY: u64 = 1 << 20;
/// The size of an entry's defined fields.
pub const ENTRY_SIZE: u32 = 128;
/// The UTF-16 code units of an entry's name.
pub const NAME_UNITS: usize = 36;

/// The header fields used (offsets in docs/PARTITIONS.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Bytes 8..12.
    pub revision: u32,
    /// Bytes 12..16.
    pub header_size: u32,
    /// Bytes 24..32: where this header is.
    pub my_lba: u64,
    /// Bytes 32..40: where the other header is.
    pub alternate_lba: u64,
    /// Bytes 40..48.
    pub first_usable: u64,
    /// Bytes 48..56, inclusive.
    pub last_usable: u64,
    /// Bytes 56..72.
    pub disk_guid: Guid,
    /// Bytes 72..80.
    pub entry_lba: u64,
    /// Bytes 80..84.
    pub entry_count: u32,
    /// Bytes 84..88.
    pub entry_size: u32,
    /// Bytes 88..92.
    pub array_crc: u32,
}

/// What relocation needs of the table that was read: the good copy's header and array bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Raw {
    header: Header,
    /// `header_size` bytes, as read.
    header_bytes: Vec<u8>,
    array: Vec<u8>,
    from_backup: bool,
    /// Where the backup header was (or the header read, when that was the backup).
    old_backup_lba: u64,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

fn guid_at(b: &[u8], at: usize) -> Guid {
    Guid(b[at..at + 16].try_into().unwrap_or([0; 16]))
}

/// The header CRC: over `header_size` bytes with the CRC field (16..20) zeroed.
fn header_crc(bytes: &[u8]) -> u32 {
    let mut copy = bytes.to_vec();
    copy[16..20].fill(0);
    crc32(&copy)
}

impl Header {
    /// Decodes and checks the header in `sector` (one sector, read at LBA `lba` of a disk of
    /// `total` sectors of `ss` bytes). A damaged header is `Err(why, with its byte offset)`.
    pub fn decode(sector: &[u8], lba: u64, ss: u64, total: u64) -> std::result::Result<Header, String> {
        let at = lba * ss;
        if sector.len() < HEADER_SIZE as usize || &sector[..8] != SIGNATURE {
            return Err(format!("no \"EFI PART\" signature at byte offset {at}"));
        }
        let h = Header {
            revision: u32_at(sector, 8),
            header_size: u32_at(sector, 12),
            my_lba: u64_at(sector, 24),
            alternate_lba: u64_at(sector, 32),
            first_usable: u64_at(sector, 40),
            last_usable: u64_at(sector, 48),
            disk_guid: guid_at(sector, 56),
            entry_lba: u64_at(sector, 72),
            entry_count: u32_at(sector, 80),
            entry_size: u32_at(sector, 84),
            array_crc: u32_at(sector, 88),
        };
        if h.revision >> 16 != 1 {
            return Err(format!("unsupported revision 0x{:08x} at byte offset {}", h.revision, at + 8));
        }
        if h.header_size < HEADER_SIZE || u64::from(h.header_size) > ss {
            return Err(format!(
                "header size {} outside {HEADER_SIZE}..={ss} at byte offset {}",
                h.header_size,
                at + 12
            ));
        }
        let stored = u32_at(sector, 16);
        let computed = header_crc(&sector[..h.header_size as usize]);
        if stored != computed {
            return Err(format!(
                "bad header CRC32 (stored 0x{stored:08x}, computed 0x{computed:08x}) at byte offset {}",
                at + 16
            ));
        }
        if h.my_lba != lba {
            return Err(format!("my_lba is {} but the header is at LBA {lba} (byte offset {})", h.my_lba, at + 24));
        }
        if h.last_usable >= total || h.first_usable > h.last_usable.saturating_add(1) || h.first_usable < 2 {
            return Err(format!(
                "usable LBAs {}..={} do not fit a disk of {total} sectors at byte offset {}",
                h.first_usable,
                h.last_usable,
                at + 40
            ));
        }
        let array_bytes = u64::from(h.entry_count) * u64::from(h.entry_size);
        if h.entry_size < ENTRY_SIZE || !h.entry_size.is_multiple_of(8) || array_bytes > MAX_ARRAY {
            return Err(format!(
                "entry array of {} entries of {} bytes (an entry is a multiple of 8, at least {ENTRY_SIZE}; at most {MAX_ARRAY} bytes in all) at byte offset {}",
                h.entry_count,
                h.entry_size,
                at + 80
            ));
        }
        let array_end = h.entry_lba.checked_add(array_bytes.div_ceil(ss));
        let outside_usable = |end: u64| end <= h.first_usable || h.entry_lba > h.last_usable;
        let clear_of_header = |end: u64| end <= lba || h.entry_lba > lba;
        if h.entry_lba < 2 || !array_end.is_some_and(|end| end <= total && outside_usable(end) && clear_of_header(end))
        {
            return Err(format!(
                "entry array at LBA {} does not lie inside the disk, clear of the usable LBAs and of the header, at byte offset {}",
                h.entry_lba,
                at + 72
            ));
        }
        Ok(h)
    }

    /// The entry array's size in bytes.
    #[must_use]
    pub fn array_len(&self) -> usize {
        self.entry_count as usize * self.entry_size as usize
    }
}

/// One copy (header and array), checked, or why it is damaged.
struct Copy {
    header: Header,
    header_bytes: Vec<u8>,
    array: Vec<u8>,
}

fn read_copy(source: &dyn Source, lba: u64, ss: u64, total: u64) -> Result<std::result::Result<Copy, String>> {
    if lba >= total {
        return Ok(Err(format!("header LBA {lba} is past the end of the disk ({total} sectors)")));
    }
    let mut sector = vec![0u8; ss as usize];
    source.read_at(&mut sector, lba * ss)?;
    let header = match Header::decode(&sector, lba, ss, total) {
        Ok(h) => h,
        Err(why) => return Ok(Err(why)),
    };
    let mut array = vec![0u8; header.array_len()];
    source.read_at(&mut array, header.entry_lba * ss)?;
    let computed = crc32(&array);
    if computed != header.array_crc {
        return Ok(Err(format!(
            "bad entry array CRC32 (stored 0x{:08x}, computed 0x{computed:08x}) at byte offset {}",
            header.array_crc,
            header.entry_lba * ss
        )));
    }
    sector.truncate(header.header_size as usize);
    Ok(Ok(Copy { header, header_bytes: sector, array }))
}

/// The sector size: where `"EFI PART"` is, primary first (at the hint, 512, 4096), then a
/// backup at the last LBA.
fn sector_size(source: &dyn Source, hint: Option<u32>) -> Result<Option<u32>> {
    let mut candidates = vec![];
    for ss in hint.into_iter().chain([512, 4096]) {
        if !candidates.contains(&ss) {
            candidates.push(ss);
        }
    }
    let size = source.size();
    let mut sig = [0u8; 8];
    for &ss in &candidates {
        if size >= 2 * u64::from(ss) {
            source.read_at(&mut sig, u64::from(ss))?;
            if &sig == SIGNATURE {
                return Ok(Some(ss));
            }
        }
    }
    for &ss in &candidates {
        let total = size / u64::from(ss);
        if total >= 3 {
            source.read_at(&mut sig, (total - 1) * u64::from(ss))?;
            if &sig == SIGNATURE {
                return Ok(Some(ss));
            }
        }
    }
    Ok(None)
}

/// Reads the GPT of a disk whose MBR is protective.
pub(crate) fn read(source: &dyn Source, hint: Option<u32>) -> Result<Table> {
    let name = source.name();
    let size = source.size();
    let Some(sector_size) = sector_size(source, hint)? else {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "{}: a protective MBR but no GPT header: no \"EFI PART\" at byte offset 512 or 4096 (primary) nor in the last sector (backup)",
                name.display()
            ),
        ));
    };
    let ss = u64::from(sector_size);
    let total = size / ss;
    let mut warnings = Vec::new();
    let primary = read_copy(source, 1, ss, total)?;
    let backup_lba = match &primary {
        Ok(p) if p.header.alternate_lba > 1 && p.header.alternate_lba < total => p.header.alternate_lba,
        _ => total - 1,
    };
    if let Ok(p) = &primary
        && p.header.alternate_lba != total - 1
    {
        warnings.push(format!(
                "{}: the primary GPT header names its backup at LBA {}, not at the last LBA {} (the disk changed size since the table was written)",
                name.display(),
                p.header.alternate_lba,
                total - 1
            ));
    }
    let backup = if backup_lba > 1 {
        read_copy(source, backup_lba, ss, total)?
    } else {
        Err(format!("no room for a backup header on a disk of {total} sectors"))
    };
    let (copy, from_backup) = match (primary, backup) {
        (Ok(p), Ok(b)) => {
            if p.array != b.array {
                warnings.push(format!(
                    "{}: the primary and backup GPT entry arrays differ; the primary is used",
                    name.display()
                ));
            }
            (p, false)
        }
        (Ok(p), Err(why)) => {
            warnings.push(format!("{}: backup GPT damaged ({why}); the primary is used", name.display()));
            (p, false)
        }
        (Err(why), Ok(b)) => {
            warnings.push(format!("{}: primary GPT damaged ({why}); the backup is used", name.display()));
            (b, true)
        }
        (Err(p), Err(b)) => {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("{}: both GPT copies are damaged: primary: {p}; backup: {b}", name.display()),
            ));
        }
    };
    let h = &copy.header;
    let partitions = entries(name, h, &copy.array, ss, total)?;
    let old_backup_lba = if from_backup { h.my_lba } else { backup_lba };
    Ok(Table {
        scheme: Scheme::Gpt {
            disk_guid: h.disk_guid,
            first_usable: h.first_usable,
            last_usable: h.last_usable,
            entry_count: h.entry_count,
            entry_size: h.entry_size,
            entry_lba: h.entry_lba,
            from_backup,
        },
        sector_size,
        partitions,
        warnings,
        disk_size: size,
        mbr: Vec::new(),
        gpt: Some(Raw {
            header: h.clone(),
            header_bytes: copy.header_bytes,
            array: copy.array,
            from_backup,
            old_backup_lba,
        }),
        ebrs: Vec::new(),
        name: PathBuf::from(name),
    })
}

/// The used entries of an array, numbered by index + 1.
fn entries(name: &Path, h: &Header, array: &[u8], ss: u64, total: u64) -> Result<Vec<Partition>> {
    let mut out = Vec::new();
    for (number, e) in (1u32..).zip(array.chunks_exact(h.entry_size as usize)) {
        let kind = guid_at(e, 0);
        if kind.is_zero() {
            continue;
        }
        let at = h.entry_lba * ss + u64::from(number - 1) * u64::from(h.entry_size);
        let (first, last) = (u64_at(e, 32), u64_at(e, 40));
        if last < first {
            return Err(corrupt(
                name,
                at + 32,
                format!("GPT partition {number}: last LBA {last} before first LBA {first}"),
            ));
        }
        if last >= total {
            return Err(corrupt(
                name,
                at + 40,
                format!(
                    "GPT partition {number} (LBAs {first}..={last}) runs past the end of the disk ({total} sectors)"
                ),
            ));
        }
        let units: Vec<u16> =
            e[56..128].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|&u| u != 0).collect();
        let label = String::from_utf16_lossy(&units);
        let attributes = u64_at(e, 48);
        out.push(Partition {
            number,
            start: first * ss,
            len: (last - first + 1) * ss,
            kind: PartKind::Gpt(kind),
            name: (!label.is_empty()).then_some(label),
            partuuid: guid_at(e, 16).to_string(),
            bootable: attributes & 4 != 0,
            attributes,
        });
    }
    Ok(out)
}

/// `header_bytes` with its location fields set and its CRC fixed, padded to a sector.
fn patched(
    header_bytes: &[u8],
    ss: usize,
    my_lba: u64,
    alternate_lba: u64,
    last_usable: u64,
    entry_lba: u64,
) -> Vec<u8> {
    let mut b = header_bytes.to_vec();
    b[24..32].copy_from_slice(&my_lba.to_le_bytes());
    b[32..40].copy_from_slice(&alternate_lba.to_le_bytes());
    b[48..56].copy_from_slice(&last_usable.to_le_bytes());
    b[72..80].copy_from_slice(&entry_lba.to_le_bytes());
    let crc = header_crc(&b);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    b.resize(ss, 0);
    b
}

/// The writes (byte offset, bytes), ascending, that put `table`'s GPT on a disk of `new_size`
/// bytes (docs/PARTITIONS.md, "Writing"): the protective MBR's size, the primary header, the
/// entry array at both places, the backup header at the new last LBA, and zeros over the old
/// backup header when it is now in free space.
///
/// An error of kind `SizeMismatch` when a partition would end past the new last usable LBA,
/// `Usage` when `table` is not a GPT.
pub fn relocate(table: &Table, new_size: u64) -> Result<Vec<(u64, Vec<u8>)>> {
    let name = table.name().display();
    let Some(raw) = &table.gpt else {
        return Err(Error::usage(format!("{name}: relocating a GPT, but the table is {}", table.label())));
    };
    let ss = u64::from(table.sector_size);
    let h = &raw.header;
    let total = new_size / ss;
    let array_sectors = (raw.array.len() as u64).div_ceil(ss);
    let primary_entry_lba = if raw.from_backup { 2 } else { h.entry_lba };
    let last_part = table.partitions.iter().map(|p| p.end() / ss - 1).max();
    let needed = last_part.unwrap_or(0).max(h.first_usable).max(primary_entry_lba + array_sectors) + array_sectors + 2;
    let too_small = |what: String| {
        Error::new(
            ErrorKind::SizeMismatch,
            format!(
                "{name}: the GPT does not fit a disk of {new_size} bytes: {what} (at least {} bytes are needed)",
                needed * ss
            ),
        )
    };
    if total < needed {
        let last = total.saturating_sub(array_sectors + 2);
        return Err(match table.partitions.iter().find(|p| p.end() / ss - 1 > last) {
            Some(p) => too_small(format!("{} would end past the last usable byte {}", p.describe(), (last + 1) * ss)),
            None => too_small("no room for the entry arrays and headers".into()),
        });
    }
    if primary_entry_lba < 2 || primary_entry_lba + array_sectors > h.first_usable {
        // Only possible when read from a backup whose usable range starts too early: writing
        // the primary array at LBA 2 would overwrite partition data.
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "{name}: no room for the primary GPT entry array ({array_sectors} sectors from LBA {primary_entry_lba}) before the first usable LBA {}",
                h.first_usable
            ),
        ));
    }
    let last = total - 1;
    let backup_entry_lba = last - array_sectors;
    let last_usable = backup_entry_lba - 1;
    let ss_usize = ss as usize;

    let mut mbr_sector = table.mbr.clone();
    mbr_sector.resize(512, 0);
    let entries = mbr::primary_entries(&mbr_sector);
    let protective_only = entries.is_some_and(|es| es.iter().all(|e| e.kind == mbr::PROTECTIVE || e.is_empty()));
    if protective_only {
        let sectors = u32::try_from(total - 1).unwrap_or(u32::MAX);
        for i in 0..4 {
            let at = mbr::ENTRIES_AT + 16 * i;
            if mbr_sector[at + 4] == mbr::PROTECTIVE {
                mbr_sector[at + 12..at + 16].copy_from_slice(&sectors.to_le_bytes());
            }
        }
    }
    let mut writes = vec![
        (0, mbr_sector),
        (ss, patched(&raw.header_bytes, ss_usize, 1, last, last_usable, primary_entry_lba)),
        (primary_entry_lba * ss, raw.array.clone()),
    ];
    let old = raw.old_backup_lba;
    if old != last && old > last_part.unwrap_or(0) && old >= h.first_usable && old < backup_entry_lba {
        writes.push((old * ss, vec![0; ss_usize]));
    }
    writes.push((backup_entry_lba * ss, raw.array.clone()));
    writes.push((last * ss, patched(&raw.header_bytes, ss_usize, last, 1, last_usable, backup_entry_lba)));
    Ok(writes)
}

/// A partition for [`encode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    /// The partition type.
    pub type_guid: Guid,
    /// The PARTUUID.
    pub unique_guid: Guid,
    /// The first LBA.
    pub first_lba: u64,
    /// The last LBA, inclusive.
    pub last_lba: u64,
    /// The attribute bits.
    pub attributes: u64,
    /// The name, at most 36 UTF-16 code units.
    pub name: String,
}

/// The layout [`encode`] gives a disk of `disk_size` bytes with `entries` partitions: (first
/// usable LBA, last usable LBA), or `None` when the disk is too small for the table.
#[must_use]
pub fn usable(sector_size: u32, disk_size: u64, entries: usize) -> Option<(u64, u64)> {
    let ss = u64::from(sector_size);
    let count = entries.max(128) as u64;
    let array_sectors = (count * u64::from(ENTRY_SIZE)).div_ceil(ss);
    let total = disk_size / ss;
    let first = 2 + array_sectors;
    let last = total.checked_sub(array_sectors + 2)?;
    (first <= last).then_some((first, last))
}

/// The writes (byte offset, bytes) of a new GPT: a protective MBR, both headers and both
/// arrays of `max(128, entries.len())` entries of 128 bytes, entries in order (numbered from
/// 1). An error of kind `Usage` when an entry lies outside the usable LBAs or has a name too
/// long; overlaps are not checked here (reading them back does).
pub fn encode(sector_size: u32, disk_size: u64, disk_guid: Guid, entries: &[NewEntry]) -> Result<Vec<(u64, Vec<u8>)>> {
    let ss = u64::from(sector_size);
    let Some((first_usable, last_usable)) = usable(sector_size, disk_size, entries.len()) else {
        return Err(Error::usage(format!("a disk of {disk_size} bytes is too small for a GPT")));
    };
    let count = entries.len().max(128);
    let mut array = vec![0u8; count * ENTRY_SIZE as usize];
    for (e, out) in entries.iter().zip(array.chunks_exact_mut(ENTRY_SIZE as usize)) {
        let units: Vec<u16> = e.name.encode_utf16().collect();
        if units.len() > NAME_UNITS
            || e.first_lba < first_usable
            || e.last_lba > last_usable
            || e.last_lba < e.first_lba
        {
            return Err(Error::usage(format!(
                "GPT entry {:?} (LBAs {}..={}) does not fit the usable LBAs {first_usable}..={last_usable} or its name is longer than {NAME_UNITS} units",
                e.name, e.first_lba, e.last_lba
            )));
        }
        out[0..16].copy_from_slice(&e.type_guid.0);
        out[16..32].copy_from_slice(&e.unique_guid.0);
        out[32..40].copy_from_slice(&e.first_lba.to_le_bytes());
        out[40..48].copy_from_slice(&e.last_lba.to_le_bytes());
        out[48..56].copy_from_slice(&e.attributes.to_le_bytes());
        for (i, u) in units.iter().enumerate() {
            out[56 + 2 * i..58 + 2 * i].copy_from_slice(&u.to_le_bytes());
        }
    }
    let array_sectors = (array.len() as u64).div_ceil(ss);
    let last = disk_size / ss - 1;
    let mut header = vec![0u8; HEADER_SIZE as usize];
    header[0..8].copy_from_slice(SIGNATURE);
    header[8..12].copy_from_slice(&REVISION.to_le_bytes());
    header[12..16].copy_from_slice(&HEADER_SIZE.to_le_bytes());
    header[40..48].copy_from_slice(&first_usable.to_le_bytes());
    header[56..72].copy_from_slice(&disk_guid.0);
    header[80..84].copy_from_slice(&(count as u32).to_le_bytes());
    header[84..88].copy_from_slice(&ENTRY_SIZE.to_le_bytes());
    header[88..92].copy_from_slice(&crc32(&array).to_le_bytes());

    let mut mbr_sector = vec![0u8; 512];
    let e = mbr::ENTRIES_AT;
    // CHS 0/0/2 to "beyond CHS" (FF FF FF), as gdisk and sfdisk write it.
    mbr_sector[e + 1..e + 8].copy_from_slice(&[0x00, 0x02, 0x00, mbr::PROTECTIVE, 0xFF, 0xFF, 0xFF]);
    mbr_sector[e + 8..e + 12].copy_from_slice(&1u32.to_le_bytes());
    mbr_sector[e + 12..e + 16].copy_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_le_bytes());
    mbr_sector[510] = 0x55;
    mbr_sector[511] = 0xAA;
    let ss_usize = ss as usize;
    Ok(vec![
        (0, mbr_sector),
        (ss, patched(&header, ss_usize, 1, last, last_usable, 2)),
        (2 * ss, array.clone()),
        ((last - array_sectors) * ss, array),
        (last * ss, patched(&header, ss_usize, last, 1, last_usable, last - array_sectors)),
    ])
}

/// Makes the GPT headers at 512 and 4096 (and their entry arrays' CRCs) valid in `data`, where
/// they are plausible enough to locate, so that fuzzed and random inputs get past the CRCs.
#[doc(hidden)]
pub fn fix_checksums(data: &mut [u8]) {
    for ss in [512usize, 4096] {
        let Some(h) = data.get(ss..ss + HEADER_SIZE as usize) else { continue };
        if &h[..8] != SIGNATURE {
            continue;
        }
        let header_size = (u32_at(h, 12) as usize).clamp(HEADER_SIZE as usize, ss);
        let (lba, count, size) = (u64_at(h, 72), u64::from(u32_at(h, 80)), u64::from(u32_at(h, 84)));
        let array = lba
            .checked_mul(ss as u64)
            .and_then(|at| Some((at as usize, (count.checked_mul(size)?).min(MAX_ARRAY) as usize)));
        if let Some(crc) = array.and_then(|(at, len)| data.get(at..at.checked_add(len)?)).map(crc32) {
            data[ss + 88..ss + 92].copy_from_slice(&crc.to_le_bytes());
        }
        if let Some(hb) = data.get(ss..ss + header_size) {
            let crc = header_crc(hb);
            data[ss + 16..ss + 20].copy_from_slice(&crc.to_le_bytes());
        }
    }
}

impl Raw {
    /// Sets the first and last LBA of entry `number` (from 1) and fixes the header's array CRC;
    /// `None` when there is no such entry. For [`crate::layout`].
    pub(crate) fn set_extent(&mut self, number: u32, first: u64, last: u64) -> Option<()> {
        let size = self.header.entry_size as usize;
        let at = (number as usize).checked_sub(1)? * size;
        let e = self.array.get_mut(at..at + size)?;
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&last.to_le_bytes());
        let crc = crc32(&self.array);
        self.header.array_crc = crc;
        self.header_bytes[88..92].copy_from_slice(&crc.to_le_bytes());
        Some(())
    }
}
