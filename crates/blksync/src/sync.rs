//! `sync`: make a destination identical to a source.
//!
//! The order of operations is what makes a sync safe:
//! 1. open the source read-only and the destination (exclusively, for a device);
//! 2. decide sizes ([`crate::sizing`]) and refuse impossible ones *before* writing anything;
//! 3. resize a destination file; scan and write what differs (the engine);
//! 4. fsync the destination, even when interrupted or failing, so that what was written is on
//!    disk and correct; only then report;
//! 5. with `--verify`, drop the destination's cached pages and compare both ends again.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::delta;
use crate::endpoint::OpenTarget;
use crate::endpoint::{Identity, Source, Target};
use crate::engine::{Action, Scan};
use crate::error::{Error, ErrorKind, Result};
use crate::extent::Extent;
use crate::progress::{Control, Counters, Phase, Snapshot};
use crate::record::Undo;
use crate::sizing::{self, SizePolicy};
use crate::throttle::Throttle;

/// Options of a sync, validated by the front end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncOptions {
    /// Comparison granularity: a power of two from 512 B to 1 MiB.
    pub block_size: usize,
    /// Report what would change; open the destination read-only and write nothing.
    pub dry_run: bool,
    /// Re-read both ends after syncing and fail if they differ.
    pub verify: bool,
    /// Leave what was read in the page cache.
    pub keep_cache: bool,
    /// What to do when sizes differ.
    pub size_policy: SizePolicy,
    /// On a larger destination device, zero everything past the source's end.
    pub zero_tail: bool,
    /// Write to a mounted or in-use block device.
    pub force: bool,
    /// On block devices, zero by unmapping where the device guarantees zeros.
    pub discard: bool,
    /// Worker threads; 0 for the default of the host that runs the work (one per core, 2 to 8).
    pub threads: usize,
    /// Read the source at most this many bytes per second.
    pub bwlimit: Option<u64>,
    /// Save the old content of every block overwritten into this delta file (`--undo`). Not
    /// serialized: a job carries it as bytes ([`crate::job::Job::Sync`]).
    #[serde(skip)]
    pub undo: Option<std::path::PathBuf>,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            block_size: 4096,
            dry_run: false,
            verify: false,
            keep_cache: false,
            size_policy: SizePolicy::Resize,
            zero_tail: false,
            force: false,
            discard: false,
            threads: default_threads(),
            bwlimit: None,
            undo: None,
        }
    }
}

/// Worker threads by default: every core, at least two (one can wait on I/O while the other
/// compares), at most eight (memory is 4 MiB a worker).
#[must_use]
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from).clamp(2, 8)
}

/// Checks a block size: a power of two from 512 B to 1 MiB.
pub fn check_block_size(block_size: u64) -> Result<usize> {
    if !(512..=1 << 20).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(Error::usage(format!(
            "block size {block_size} is not a power of two between 512 and 1048576 bytes"
        )));
    }
    Ok(block_size as usize)
}

/// The outcome of a sync, for humans and for `--json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// The source, as given.
    pub source: String,
    /// The destination actually written (after directory resolution).
    pub destination: String,
    /// Nothing was written.
    pub dry_run: bool,
    /// Comparison granularity.
    pub block_size: usize,
    /// Counters at the end.
    #[serde(flatten)]
    pub counters: Snapshot,
    /// Number of separate differing ranges.
    pub ranges_differing: u64,
    /// Destination size before the sync.
    pub destination_size_before: u64,
    /// Destination size after the sync.
    pub destination_size_after: u64,
    /// Both ends were re-read and found equal.
    pub verified: bool,
    /// Non-fatal notes (size differences).
    pub warnings: Vec<String>,
    /// Bytes sent over ssh (0 when both sides are local).
    pub bytes_sent: u64,
    /// Bytes received over ssh.
    pub bytes_received: u64,
    /// The undo log written, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undo_log: Option<String>,
}

/// The destination path: `dest` itself, or `dest/<source file name>` when `dest` is a directory
/// or ends in `/`, as with `cp` and `rsync`.
pub fn resolve_destination(source: &Path, dest: &Path) -> Result<PathBuf> {
    let trailing_slash = dest.as_os_str().as_encoded_bytes().ends_with(b"/");
    if trailing_slash || dest.is_dir() {
        let name = source.file_name().ok_or_else(|| {
            Error::usage(format!("{} has no file name to use inside directory {}", source.display(), dest.display()))
        })?;
        if trailing_slash && !dest.is_dir() {
            return Err(Error::new(ErrorKind::NotFound, format!("directory {} does not exist", dest.display())));
        }
        return Ok(dest.join(name));
    }
    Ok(dest.to_path_buf())
}

/// Syncs local `source` onto local `dest` (a path, a directory or a block device).
pub fn sync_paths(source: &Path, dest: &Path, options: &SyncOptions, control: Control<'_>) -> Result<Summary> {
    let src = crate::endpoint::open_source(source)?;
    let dest = resolve_destination(source, dest)?;
    let dst = crate::endpoint::open_target(
        &dest,
        OpenTarget {
            read_only: options.dry_run,
            create: !options.dry_run,
            force: options.force,
            discard: options.discard,
            mode: src.mode(),
            size: Some(src.size()),
        },
    )?;
    check_storage(src.as_ref(), dst.as_ref())?;
    let fresh = dst.created();
    let result = sync(src.as_ref(), dst.as_ref(), fresh, options, control);
    if fresh && result.as_ref().is_err_and(|e| e.kind() != ErrorKind::Interrupted) {
        // A file we created and could not fill is worse than no file: a later run or a user
        // might take it for a copy. Interrupted copies stay (a rerun resumes them cheaply).
        dst.remove_created();
    }
    // Closing can fail (a snapshot that cannot be removed, a loop device that cannot be
    // detached): the user must hear of it, with what to run by hand.
    let closed = dst.close().and(src.close());
    crate::endpoint::after_close(result, closed, "the sync itself completed")
}

/// Refuses two local endpoints that are different names for the same bytes (a loop device and
/// its backing file, say), as [`sync`] refuses the same file: writing one while reading the
/// other corrupts both.
fn check_storage(src: &dyn Source, dst: &dyn Target) -> Result<()> {
    if src.identity() != dst.identity() && crate::endpoint::local::same_storage(src.identity(), dst.identity()) {
        return Err(Error::usage(format!(
            "{} and {} are the same storage (one lies on the other, as a loop device on its backing \
             file or a partition on its disk, or both are loop devices over one file); writing \
             one while reading the other would corrupt both",
            src.name().display(),
            dst.name().display()
        )));
    }
    Ok(())
}

/// Syncs `src` onto `dst`. `fresh` says the destination was just created (empty).
pub fn sync(
    src: &dyn Source,
    dst: &dyn Target,
    fresh: bool,
    options: &SyncOptions,
    control: Control<'_>,
) -> Result<Summary> {
    if options.undo.is_some() && options.dry_run {
        return Err(Error::usage("an undo log and a dry run contradict each other: a dry run changes nothing to undo"));
    }
    if src.identity() != Identity::None && src.identity() == dst.identity() {
        return Err(Error::usage(format!(
            "{} and {} are the same file or device",
            src.name().display(),
            dst.name().display()
        )));
    }
    let before = dst.size();
    let exists = dst.exists();
    let sizing =
        sizing::resolve(src.size(), (&dst.caps(), exists), before, fresh, options.size_policy, options.zero_tail)?;
    let mut warnings = Vec::new();
    if let Some(w) = &sizing.warning {
        control.observer.warn(w);
        warnings.push(w.clone());
    }
    let undo = match &options.undo {
        Some(path) => Some(begin_undo(path, src, dst, sizing.resize_to.unwrap_or(before), options.force)?),
        None => None,
    };
    // Everything below writes through the undo log when there is one.
    let dst: &dyn Target = match &undo {
        Some(undo) => undo,
        None => dst,
    };
    if let (Some(size), false) = (sizing.resize_to, options.dry_run)
        && let Err(e) = dst.set_size(size)
    {
        if let Some(undo) = &undo {
            undo.abandon();
        }
        return Err(e);
    }

    let throttle = options.bwlimit.map(Throttle::new);
    let counters = Counters::new();
    counters.set_total(sizing.scan_len);
    control.observer.phase(if options.dry_run { Phase::Compare } else { Phase::Sync }, sizing.scan_len);
    let scan = Scan {
        source: src,
        source_len: sizing.source_len,
        dest: dst,
        scan_len: sizing.scan_len,
        block_size: options.block_size,
        threads: options.threads,
        keep_cache: options.keep_cache,
        action: if options.dry_run { Action::Compare } else { Action::Apply(dst) },
        keep_ranges: 0,
        throttle: throttle.as_ref(),
    };
    // A snapshot that overflowed while it was read gave garbage: that is a failure, found
    // before the undo log or anything else claims success.
    let scanned = scan.run(&counters, control).and_then(|found| {
        if !found.cancelled {
            src.check_intact()?;
        }
        Ok(found)
    });
    finish(dst, options.dry_run, &scanned, undo.is_some())?;
    let undo_log = undo.as_ref().map(|u| u.path().display().to_string());
    let found = scanned?;
    if !options.keep_cache {
        dst.drop_cache(0, sizing.scan_len);
    }
    if found.cancelled {
        return Err(Error::new(
            ErrorKind::Interrupted,
            format!(
                "interrupted: sync of {} is incomplete; the first {} bytes are in sync and flushed to disk, run it again to finish",
                dst.name().display(),
                found.done
            ),
        ));
    }

    let mut summary = Summary {
        source: src.name().display().to_string(),
        destination: dst.name().display().to_string(),
        dry_run: options.dry_run,
        block_size: options.block_size,
        counters: counters.snapshot(),
        ranges_differing: found.range_count,
        destination_size_before: before,
        destination_size_after: if options.dry_run { sizing.resize_to.unwrap_or(before) } else { dst.size() },
        verified: false,
        warnings,
        bytes_sent: 0,
        bytes_received: 0,
        undo_log,
    };
    if options.verify && !options.dry_run {
        verify(src, dst, &sizing, options, control)?;
        summary.verified = true;
    }
    Ok(summary)
}

/// Whatever happened, makes what was written durable before anything is said about it. A run
/// that did not complete commits nothing that claims to be complete (a backup point, a delta);
/// an undo log is committed either way: it holds the old content of every block written so far,
/// each recorded before it was overwritten. The scan's own error is reported by the caller;
/// a flush error is returned here only with an undo log, which must be reported first.
fn finish(dst: &dyn Target, dry_run: bool, scanned: &Result<crate::engine::Found>, undo: bool) -> Result<()> {
    let complete = scanned.as_ref().is_ok_and(|found| !found.cancelled);
    let flushed = match (dry_run, complete) {
        (true, _) => Ok(()),
        (false, true) => dst.flush(),
        (false, false) => dst.flush_partial(),
    };
    match flushed {
        Err(e) if undo => Err(undo_incomplete(scanned, &e)),
        Err(e) if scanned.is_ok() => Err(e),
        _ => Ok(()),
    }
}

/// Starts `sync --undo PATH`'s log, for a destination going to `new` bytes.
fn begin_undo<'a>(
    path: &Path,
    src: &dyn Source,
    dst: &'a dyn Target,
    new: u64,
    force: bool,
) -> Result<Undo<&'a dyn Target>> {
    delta::check_output_with(path, &[src.identity(), dst.identity()], force)?;
    let comment = format!("undo log of a sync from {}", src.name().display());
    let undo = Undo::new(dst, path.to_path_buf(), comment);
    undo.begin(new).map_err(|e| {
        let text = format!("{e}; the undo log could not be started, so nothing was changed");
        Error::new(e.kind(), text)
    })?;
    Ok(undo)
}

/// The error for an undo log that could not be committed (a full disk, most often), after what
/// the scan did: its records are durable, so the `.partial` file it left rolls the destination
/// back (the error says how).
fn undo_incomplete(scanned: &Result<crate::engine::Found>, e: &Error) -> Error {
    let what = match scanned {
        Ok(found) if !found.cancelled => "the sync completed".to_string(),
        Ok(_) => "the sync was interrupted".to_string(),
        Err(first) => first.to_string(),
    };
    let kind = scanned.as_ref().err().map_or(e.kind(), Error::kind);
    Error::new(kind, format!("{what}; {e}"))
}

fn verify(
    src: &dyn Source,
    dst: &dyn Target,
    sizing: &sizing::Sizing,
    options: &SyncOptions,
    control: Control<'_>,
) -> Result<()> {
    // The destination's written pages are clean after the flush; dropping them makes the
    // comparison read what is on the medium, not what we left in memory.
    dst.drop_cache(0, sizing.scan_len);
    let counters = Counters::new();
    counters.set_total(sizing.scan_len);
    control.observer.phase(Phase::Verify, sizing.scan_len);
    let found = Scan {
        source: src,
        source_len: sizing.source_len,
        dest: dst,
        scan_len: sizing.scan_len,
        block_size: options.block_size,
        threads: options.threads,
        keep_cache: options.keep_cache,
        action: Action::Compare,
        keep_ranges: 1,
        throttle: None,
    }
    .run(&counters, control)?;
    if found.cancelled {
        return Err(Error::new(ErrorKind::Interrupted, "interrupted during verification; the sync itself completed"));
    }
    if let Some(Extent { offset, .. }) = found.ranges.first() {
        let differing = counters.snapshot().bytes_differing;
        return Err(Error::new(
            ErrorKind::VerifyFailed,
            format!(
                "verification failed: {} differs from {} in {differing} bytes ({} ranges), the first at byte offset {offset}",
                dst.name().display(),
                src.name().display(),
                found.range_count
            ),
        ));
    }
    Ok(())
}
