//! A partition of a disk as an endpoint: `DISK#N`, `DISK#name=NAME`, `DISK#partuuid=UUID`.
//!
//! The disk is any endpoint (an image file, a device, an NBD export, a compressed image, a loop
//! device), on either side of ssh: the address travels to the agent as it is, and the agent opens
//! it with this same code. The table is read by `blksync-disk` (DOS with its EBR chain, or GPT,
//! both CRC-checked), and the partition is a window onto the disk: offsets shift by its start,
//! and nothing outside it is read or written. No loop device and no kernel partition device is
//! needed, which is what a kernel without a partition parser (this project's CI) requires.
//!
//! Why `#`: a selector must survive every address form (`host:path`, `nbd://host/export`,
//! `loop://FILE`) without a scheme of its own, and a URI fragment is what `#` already means.
//! A path that exists as it is written (a file named `disk#2`) is that file: the selector is
//! taken only when the whole address names nothing.

use std::path::{Path, PathBuf};

use crate::endpoint::{Caps, Identity, Segment, Source, Target};
use crate::error::{Error, Result};

/// Splits `address` into the disk's address and the selector after its last `#`, when that is
/// one (`N`, `name=…`, `partuuid=…`) and the whole address names no file.
#[must_use]
pub fn split(address: &Path) -> Option<(PathBuf, &str)> {
    let text = address.to_str()?;
    let (disk, selector) = text.rsplit_once('#')?;
    let looks_like = !disk.is_empty()
        && (selector.bytes().all(|b| b.is_ascii_digit()) && !selector.is_empty()
            || selector.strip_prefix("name=").is_some_and(|n| !n.is_empty())
            || selector.strip_prefix("partuuid=").is_some_and(|n| !n.is_empty()));
    if !looks_like || std::fs::symlink_metadata(address).is_ok() {
        return None;
    }
    Some((PathBuf::from(disk), selector))
}

/// The partition `selector` names in the table of `disk` (at `disk_address`).
fn locate(disk: &dyn Source, disk_address: &Path, selector: &str) -> Result<(blksync_disk::Partition, Vec<String>)> {
    let wanted = blksync_disk::Selector::parse(selector)?;
    // A device's logical block size is its sector size, which a DOS table counts in. A file's
    // `block_size` is only an I/O hint, and a disk image is 512-byte sectors unless its GPT says
    // otherwise (the reader looks for one at 512 and at 4096).
    let hint = matches!(disk.identity(), Identity::Device { .. }).then(|| disk.caps().block_size);
    let Some(table) = blksync_disk::read(disk, hint)? else {
        return Err(Error::usage(format!(
            "{}: no partition table (neither DOS nor GPT), so it has no partition {selector}",
            disk_address.display()
        )));
    };
    Ok((table.find(&wanted)?.clone(), table.warnings))
}

/// A window of an endpoint: `[start, start + len)` of the disk it holds.
pub struct Window<E: ?Sized> {
    disk: Box<E>,
    name: PathBuf,
    start: u64,
    len: u64,
    number: u32,
    /// What the table's reader found wrong but could read past (a damaged primary GPT).
    table_warnings: Vec<String>,
}

impl<E: Source + ?Sized> Window<E> {
    /// The partition `selector` names on `disk` (opened from `disk_address`), as `address`.
    pub fn open(disk: Box<E>, disk_address: &Path, selector: &str, address: &Path) -> Result<Window<E>> {
        // Through a reference: `&E` is a sized `Source` (no trait upcasting before Rust 1.86).
        let (part, table_warnings) = locate(&&*disk, disk_address, selector)?;
        let table_warnings = table_warnings.into_iter().map(|w| format!("{}: {w}", disk_address.display())).collect();
        Ok(Window {
            disk,
            name: address.to_path_buf(),
            start: part.start,
            len: part.len,
            number: part.number,
            table_warnings,
        })
    }

    fn check(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(Error::new(
                crate::error::ErrorKind::Io,
                format!(
                    "{}: {what} {len} bytes at byte offset {offset}, past the end of the partition ({} bytes)",
                    self.name.display(),
                    self.len
                ),
            ));
        }
        Ok(())
    }
}

impl<E: Source + ?Sized> Source for Window<E> {
    fn name(&self) -> &Path {
        &self.name
    }

    fn caps(&self) -> Caps {
        // The table fixes its size; the rest is the disk's.
        Caps { resizable: false, changed_blocks: false, ..self.disk.caps() }
    }

    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check("reading", offset, buf.len() as u64)?;
        self.disk.read_at(buf, self.start + offset)
    }

    fn segment_at(&self, offset: u64) -> Result<Segment> {
        let seg = self.disk.segment_at(self.start + offset)?;
        let end = seg.end.saturating_sub(self.start).min(self.len).max(offset + 1);
        Ok(Segment { start: offset, end, allocated: seg.allocated })
    }

    fn read_sparsely(&self) {
        self.disk.read_sparsely();
    }

    fn prefetch(&self, offset: u64, len: u64) {
        self.disk.prefetch(self.start + offset, len.min(self.len.saturating_sub(offset)));
    }

    fn drop_cache(&self, offset: u64, len: u64) {
        self.disk.drop_cache(self.start + offset, len.min(self.len.saturating_sub(offset)));
    }

    /// The disk's identity with the partition's number folded in: the same partition twice is
    /// refused like the same file twice, while two partitions of one disk are two objects (the
    /// table was checked for overlaps).
    fn identity(&self) -> Identity {
        let fold = |x: u64| x ^ (u64::from(self.number) << 56) ^ (1 << 63);
        match self.disk.identity() {
            Identity::File { dev, ino } => Identity::File { dev, ino: fold(ino) },
            Identity::Device { rdev } => Identity::Device { rdev: fold(rdev) },
            Identity::None => Identity::None,
        }
    }

    fn check_intact(&self) -> Result<()> {
        self.disk.check_intact()
    }

    fn warnings(&self, after_reading: bool) -> Vec<String> {
        let mut warnings = if after_reading { Vec::new() } else { self.table_warnings.clone() };
        warnings.extend(self.disk.warnings(after_reading));
        warnings
    }

    /// Closes the disk: a `loop://` detaches, a snapshot goes.
    fn close(self: Box<Self>) -> Result<()> {
        self.disk.close()
    }
}

impl<E: Target + ?Sized> Target for Window<E> {
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check("writing", offset, buf.len() as u64)?;
        self.disk.write_at(buf, self.start + offset)
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.check("zeroing", offset, len)?;
        self.disk.zero(self.start + offset, len)
    }

    fn set_size(&self, size: u64) -> Result<()> {
        if size == self.len {
            return Ok(());
        }
        Err(Error::usage(format!(
            "{}: a partition's size is set by its table ({} bytes), not by a sync ({size} bytes wanted); use `blksync clone` to copy onto a partition of another size",
            self.name.display(),
            self.len
        )))
    }

    fn flush(&self) -> Result<()> {
        self.disk.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_are_split_off_addresses_that_name_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        let at = |s: &str| PathBuf::from(format!("{}{s}", disk.display()));
        assert_eq!(split(&at("#2")), Some((disk.clone(), "2")));
        assert_eq!(split(&at("#name=root fs")), Some((disk.clone(), "name=root fs")));
        assert_eq!(split(&at("#partuuid=ABC")), Some((disk.clone(), "partuuid=ABC")));
        assert_eq!(split(Path::new("nbd://h/x#1")), Some((PathBuf::from("nbd://h/x"), "1")));
        for no in ["", "#", "#x", "#name=", "#2a"] {
            assert_eq!(split(&at(no)), None, "{no:?}");
        }
        // A file whose name ends like a selector is that file.
        std::fs::write(at("#3"), b"").unwrap();
        assert_eq!(split(&at("#3")), None);
    }
}
