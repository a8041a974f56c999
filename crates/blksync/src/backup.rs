//! `backup`, `list`, `restore` and `prune` over a backup chain ([`crate::chain`]).
//!
//! The first backup writes a full sparse copy as the base; every later one writes an increment
//! holding only the blocks that differ from the chain's newest point. An increment is written
//! even when nothing changed: it costs about 250 bytes and records that the image was checked
//! at that time (`list` shows "0 B changed"). Leftovers of an interrupted or killed run (files
//! ending in `.tmp-PID`) are never part of the chain and are removed by the next backup.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::chain::{Chain, base_paths};
use crate::delta::{Header, Writer};
use crate::endpoint::OpenTarget;
use crate::endpoint::Source;
use crate::error::{Error, ErrorKind, Result};
use crate::patch::DiffOptions;
use crate::progress::Control;
use crate::sums::Sums;
use crate::sync::{SyncOptions, sync};
use crate::transfer::Commit;
use crate::transfer::local::LocalEnds;

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

/// Removes leftovers of interrupted runs.
pub(crate) fn clean(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().contains(".tmp-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Makes the complete, flushed base image at `tmp` part of the chain in `dir`: its content hashes
/// are written, then it gets its name, then its metadata, which is what makes it a base. A crash
/// at any step leaves either no base or a whole one.
pub(crate) fn commit_base(dir: &Path, number: u64, image: &dyn Source, tmp: &Path, header: &Header) -> Result<()> {
    let (path, meta) = base_paths(dir, number, &header.id);
    let sums = Sums::compute(image, header.id, crate::sync::default_threads())?;
    sums.store(&crate::sums::path_for(&path))?;
    crate::temp::commit(tmp, &path)?;
    Writer::create(&meta, header)?.commit()?;
    Ok(())
}

/// Backs `source` up into the chain in `dir` (created if missing).
pub fn backup(source: &Path, dir: &Path, options: &DiffOptions, control: Control<'_>) -> Result<BackupSummary> {
    let src = crate::endpoint::open_source(source)?;
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
    let point = crate::record::Append::open(dir, header, |last| {
        if options.force { Ok(()) } else { same_image(dir, last, source, src) }
    })?;
    let mut ends = LocalEnds::new(src, &point, point.is_new());
    let summary = crate::transfer::sync(&mut ends, Commit::Point, &options.as_sync(), control)?;
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

/// The chain in `dir`, for reading: an interrupted prune is repaired first, and the base is
/// locked against a prune for as long as the chain is held.
pub(crate) fn load(dir: &Path) -> Result<std::sync::Arc<Chain>> {
    let chain = if dir.is_dir() { crate::prune::open_for_reading(dir)? } else { None };
    chain.map(std::sync::Arc::new).ok_or_else(|| no_backup(dir))
}

/// The chain in `dir` for a command that holds its lock.
pub(crate) fn load_unlocked(dir: &Path) -> Result<std::sync::Arc<Chain>> {
    Chain::load(dir)?.map(std::sync::Arc::new).ok_or_else(|| no_backup(dir))
}

fn no_backup(dir: &Path) -> Error {
    Error::new(ErrorKind::NotFound, format!("{} holds no backup", dir.display()))
}

/// Repairs an interrupted prune before a backup extends the chain (the caller holds its lock).
pub(crate) fn repair(dir: &Path) -> Result<()> {
    if crate::prune::journal_path(dir).exists() {
        let _base = crate::chain::lock_base(dir, true)?;
        crate::prune::recover(dir)?;
    }
    Ok(())
}

/// Which point to restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum At {
    /// The newest.
    Latest,
    /// Point number N.
    Number(u64),
    /// The newest point created at or before this time (seconds since the epoch).
    Time(i64),
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

/// The point `at` names, refusing a point at or after a break in the chain: "the newest" of a
/// broken chain is lost, and restoring the last good point instead would be a silent lie.
pub(crate) fn point(chain: &Chain, at: At) -> Result<u64> {
    if let Some(b) = &chain.broken {
        let lost = match at {
            At::Latest => true,
            At::Number(n) => n >= b.first_lost,
            At::Time(_) => false,
        };
        if lost {
            return Err(b.error(&chain.dir, chain.newest().1));
        }
    }
    pick(chain, at)
}

/// The point `at` names in `chain`. A point that does not exist is a usage error (exit 2), whose
/// message gives the time asked for (when it was one) and the points there are.
pub(crate) fn pick(chain: &Chain, at: At) -> Result<u64> {
    let points: Vec<(u64, i64, i32)> =
        std::iter::once((chain.base_number, chain.base.header.created, chain.base.header.utc_offset))
            .chain(chain.increments.iter().map(|i| (i.seq, i.delta.header.created, i.delta.header.utc_offset)))
            .collect();
    let missing = |what: String| {
        Error::usage(format!("{} has no point {what}; it has {}", chain.dir.display(), describe(&points)))
    };
    match at {
        At::Latest => Ok(chain.newest().1),
        At::Number(n) if points.iter().any(|p| p.0 == n) => Ok(n),
        At::Number(n) => Err(missing(n.to_string())),
        At::Time(t) => points.iter().rev().find(|p| p.1 <= t).map(|p| p.0).ok_or_else(|| {
            // Shown in the zone of the newest point, as `list` shows the points' times.
            let offset = points.last().map_or(0, |p| p.2);
            missing(format!("at or before {}", format_time(t, offset)))
        }),
    }
}

/// "points 0 (2026-11-20 03:00:00 +01:00) to 5 (…)": the range a user can pick from.
fn describe(points: &[(u64, i64, i32)]) -> String {
    let point = |p: &(u64, i64, i32)| format!("{} ({})", p.0, format_time(p.1, p.2));
    match points {
        [] => "no points".to_string(),
        [only] => format!("only point {}", point(only)),
        [first, .., last] => format!("{} points, {} to {}", points.len(), point(first), point(last)),
    }
}

/// `2026-11-22 05:59:09 +01:00`: a time in seconds since the epoch, as a local time at
/// `utc_offset` seconds from UTC (how `list` shows when a point was made).
#[must_use]
pub fn format_time(epoch: i64, utc_offset: i32) -> String {
    let local = epoch + i64::from(utc_offset);
    let (days, secs) = (local.div_euclid(86_400), local.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let sign = if utc_offset < 0 { '-' } else { '+' };
    let off = utc_offset.unsigned_abs();
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} {sign}{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60,
        off / 3600,
        off % 3600 / 60
    )
}

/// What `prune` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PruneSummary {
    /// Increments folded into the new base.
    pub folded: u64,
    /// Number of the point the base now holds.
    pub base_number: u64,
    /// Increments left.
    pub kept: u64,
}

pub use crate::prune::prune;
