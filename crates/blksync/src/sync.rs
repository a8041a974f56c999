//! `sync`: make a destination identical to a source. This module opens local ends (the source
//! read-only, the destination exclusively for a device) and holds the options and the summary;
//! the steps themselves, the same for every sync whatever its ends, are in `transfer.rs`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::endpoint::OpenTarget;
use crate::endpoint::{Source, Target};
use crate::error::{Error, ErrorKind, Result};
use crate::progress::{Control, Snapshot};
use crate::sizing::SizePolicy;
use crate::transfer::Commit;
use crate::transfer::local::LocalEnds;

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
    /// Create a missing destination as a compressed image at this zstd level (`--compress`);
    /// an existing one is updated in place whatever this says.
    #[serde(default)]
    pub compress: Option<i32>,
    /// `--fs-aware`: only the blocks the source's filesystems use are read, compared and
    /// written ([`crate::endpoint::usage`]).
    #[serde(default)]
    pub fs_aware: bool,
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
            compress: None,
            fs_aware: false,
        }
    }
}

pub use blksync_core::workers::default_threads;

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
    /// The source's partitions and what was done with each, when its table was fitted to a
    /// destination disk of another size (`transfer::table`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<String>,
    /// With `--fs-aware`: the source's regions, what each holds and how much of it was copied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filesystems: Vec<crate::endpoint::FsRegion>,
}

/// The destination path: `dest` itself, or `dest/<source file name>` when `dest` is a directory
/// or ends in `/`, as with `cp` and `rsync`.
pub fn resolve_destination(source: &Path, dest: &Path) -> Result<PathBuf> {
    if crate::location::scheme_of(dest.as_os_str().as_encoded_bytes()).is_some() {
        // An address (`nbd://host/`, `lvm://vg/lv`) names the endpoint itself, slash or not.
        return Ok(dest.to_path_buf());
    }
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
    let src = crate::endpoint::usage::open(source, options.fs_aware)?;
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
            compress: options.compress,
        },
    )?;
    check_storage(src.as_ref(), dst.as_ref())?;
    let result = sync(src.as_ref(), dst.as_ref(), dst.created(), options, control);
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

/// Syncs `src` onto `dst`. `fresh` says the destination was just created (empty). The steps are
/// those of every sync, local or not (`transfer.rs`); here both ends are in this process.
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
    let commit = if options.undo.is_some() { Commit::Log } else { Commit::None };
    let mut ends = LocalEnds::new(src, dst, fresh).with_undo(options.undo.clone(), options.force);
    crate::transfer::sync(&mut ends, commit, options, control)
}
