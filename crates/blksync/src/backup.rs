//! `backup`, `list`, `restore` and `prune` over a backup chain ([`crate::chain`]).
//!
//! The first backup writes a full sparse copy as the base; every later one writes an increment
//! holding only the blocks that differ from the chain's newest point. An increment is written
//! even when nothing changed: it costs about 250 bytes and records that the image was checked
//! at that time (`list` shows "0 B changed"). Leftovers of an interrupted or killed run (files
//! ending in `.tmp-PID`) are never part of the chain and are removed by the next backup.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::delta::Header;
use crate::endpoint::OpenTarget;
use crate::endpoint::Source;
use crate::error::{Error, ErrorKind, Result};
use crate::patch::DiffOptions;
use crate::progress::Control;
use crate::sync::{SyncOptions, sync};

use crate::transfer::Commit;
use crate::transfer::local::LocalEnds;
pub(crate) use blksync_history::point::point;
pub use blksync_history::point::{At, format_time};
pub use blksync_history::prune::{PruneSummary, prune};
pub(crate) use blksync_history::store::load;

/// What `backup` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupSummary {
    /// The file written (base image or increment), when the chain's host said.
    pub file: Option<String>,
    /// Its point number (0 for the base), when the chain's host said.
    pub number: Option<u64>,
    /// The sync into the chain (its destination is the file written).
    #[serde(flatten)]
    pub summary: crate::sync::Summary,
}

/// Backs `source` up into the chain in `dir` (created if missing).
pub fn backup(source: &Path, dir: &Path, options: &DiffOptions, control: Control<'_>) -> Result<BackupSummary> {
    let src = crate::endpoint::usage::open(source, options.fs_aware)?;
    let result = backup_from(source, src.as_ref(), dir, options, control);
    let closed = src.close();
    crate::endpoint::after_close(result, closed, "the backup point was recorded")
}

fn backup_from(
    source: &Path,
    src: &dyn Source,
    dir: &Path,
    options: &DiffOptions,
    control: Control<'_>,
) -> Result<BackupSummary> {
    let mut header = Header::new([0; 16], options.block_size as u32, &source.display().to_string(), &options.comment)?;
    header.source_identity = crate::patch::source_identity(source);
    let point = crate::record::Append::open(dir, header, options.compress, |last| {
        if options.force { Ok(()) } else { same_image(dir, last, source, src) }
    })?;
    let mut ends = LocalEnds::new(src, &point, point.is_new());
    let summary = crate::transfer::sync(&mut ends, Commit::Point, &crate::patch::recording(options), control)?;
    let file = point.file().display().to_string();
    let summary = crate::sync::Summary { source: source.display().to_string(), destination: file.clone(), ..summary };
    Ok(BackupSummary { file: Some(file), number: Some(point.number()), summary })
}

/// Refuses to add `source` to a chain whose newest point `last` came from another image: its
/// filesystem UUID differs, or both its path and its size do. (A disk that was resized, or an
/// image that was moved, is still the same image; `--force` takes anything.) Otherwise the
/// point would be a 100 % increment of an unrelated image, and zfs refuses unrelated streams
/// for the same reason.
fn same_image(dir: &Path, last: &Header, source: &Path, src: &dyn Source) -> Result<()> {
    let uuid = |identity: &str| identity.split(' ').find_map(|w| w.strip_prefix("UUID=")).map(str::to_string);
    let now = crate::patch::source_identity(source);
    let other = |why: String| {
        Error::new(
            ErrorKind::WrongTarget,
            format!(
                "{} does not look like the image backed up in {}: {why}; back it up into another directory, or make it the next point anyway",
                source.display(),
                dir.display()
            ),
        )
        .with_hint(crate::error::Hint::Force)
    };
    if let (Some(was), Some(is)) = (uuid(&last.source_identity), uuid(&now))
        && was != is
    {
        return Err(other(format!("its filesystem UUID is {is}, the chain's is {was}")));
    }
    same_path_and_size(dir, last, &source.display().to_string(), src.size())
}

/// The part of the same-image check that needs no access to the source: refuses when both the
/// recorded source name and the size differ (a backup from another host checks only this).
pub(crate) fn same_path_and_size(dir: &Path, last: &Header, source: &str, size: u64) -> Result<()> {
    if last.source != source && last.size_after != size {
        return Err(Error::new(
            ErrorKind::WrongTarget,
            format!(
                "{source} does not look like the image backed up in {}: the chain holds {} ({} bytes), this is {size} bytes; back it up into another directory, or make it the next point anyway",
                dir.display(),
                last.source,
                last.size_after
            ),
        )
        .with_hint(crate::error::Hint::Force));
    }
    Ok(())
}

/// One point of a chain, for `list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    /// Its number (0 = base).
    pub number: u64,
    /// Creation time, seconds since the epoch.
    pub created: i64,
    /// Creator's UTC offset, seconds.
    pub utc_offset: i32,
    /// Comment.
    pub comment: String,
    /// Bytes changed from the previous point (data and zeros); the full size for the base.
    pub bytes_changed: u64,
    /// Image size at this point.
    pub size: u64,
    /// Size of the file holding it.
    pub file_size: u64,
    /// The file.
    pub file: String,
}

/// The points of the chain in `dir`, oldest first. Listing reads the headers and indexes only;
/// `verify` also checks every file in full (whole-file hashes, every record), as a restore would.
pub fn list(dir: &Path, verify: bool) -> Result<Vec<Point>> {
    let chain = load(dir)?;
    chain.check_whole()?;
    if verify {
        chain.verify(chain.newest().1, true)?;
        chain.verify_base()?;
    }
    let base_file = std::fs::metadata(&chain.base_image).map_or(0, |m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    });
    let h = &chain.base.header;
    let mut points = vec![Point {
        number: chain.base_number,
        created: h.created,
        utc_offset: h.utc_offset,
        comment: h.comment.clone(),
        bytes_changed: h.size_after,
        size: h.size_after,
        file_size: base_file,
        file: chain.base_image.display().to_string(),
    }];
    for inc in &chain.increments {
        let h = &inc.delta.header;
        points.push(Point {
            number: inc.seq,
            created: h.created,
            utc_offset: h.utc_offset,
            comment: h.comment.clone(),
            bytes_changed: inc.delta.index.iter().map(|e| u64::from(e.len)).sum(),
            size: h.size_after,
            file_size: inc.delta.file_size,
            file: inc.delta.path().display().to_string(),
        });
    }
    Ok(points)
}

/// Restores point `at` of the chain in `dir` onto `target` (a file, which is created, or a
/// device), writing only what differs from what the target holds.
pub fn restore(dir: &Path, target: &Path, at: At, force: bool, control: Control<'_>) -> Result<crate::sync::Summary> {
    let chain = load(dir)?;
    let n = point(&chain, at)?;
    chain.verify(n, false)?;
    let image = chain.image(n)?;
    let dst = crate::endpoint::open_target(target, OpenTarget { create: true, force, ..OpenTarget::default() })?;
    // As for sync: a file this run created and could not fill goes, but an interrupted restore
    // stays, as its message says: a rerun writes only what is still missing.
    let result = sync(&image, dst.as_ref(), dst.created(), &SyncOptions::default(), control);
    let closed = dst.close();
    crate::endpoint::after_close(result, closed, "the restore itself completed")
}

/// Writes point `at` of the chain in `dir` to `out` as a stream (stdout), holes as zeros.
pub fn restore_to(dir: &Path, out: &mut dyn std::io::Write, at: At) -> Result<u64> {
    let chain = load(dir)?;
    let n = point(&chain, at)?;
    chain.verify(n, false)?;
    let image = chain.image(n)?;
    let mut buf = crate::buffer::Aligned::new(1 << 20);
    let mut pos = 0;
    while pos < image.size() {
        let n = (image.size() - pos).min(buf.len() as u64) as usize;
        image.read_at(&mut buf[..n], pos)?;
        out.write_all(&buf[..n]).map_err(|e| Error::io("writing", Path::new("standard output"), Some(pos), e))?;
        pos += n as u64;
    }
    out.flush().map_err(|e| Error::io("writing", Path::new("standard output"), None, e))?;
    Ok(pos)
}
