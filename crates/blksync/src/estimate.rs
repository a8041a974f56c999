//! `backup --dry-run` and `diff --dry-run`: what the next point or the delta would record,
//! without writing anything (as `zfs send -nv` estimates a stream).
//!
//! The estimate is the comparison a real run makes first, with nothing written: the source
//! against the chain's newest point (or BASE) by the same steps as any sync
//! (`transfer.rs`, in compare mode), across hosts by the hash pass, so that no image data
//! crosses the network. Its size is an upper bound: what differs, uncompressed, plus each
//! record's header and index entry; records of data are zstd-compressed where that helps.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::endpoint::Source;
use crate::error::{ErrorKind, Result};
use crate::location::Location;
use crate::patch::DiffOptions;
use crate::progress::{Control, Snapshot};
use crate::relay::Side;
use crate::sync::{Summary, SyncOptions};
use crate::transfer::Commit;
use crate::transfer::local::LocalEnds;

/// What a backup or a diff would record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Estimate {
    /// The new image.
    pub source: String,
    /// What it was compared with: the chain's newest point, or BASE.
    pub base: String,
    /// `backup` to a directory that holds no chain yet: the point would be the chain's base,
    /// a full (sparse) copy of the source.
    pub new_chain: bool,
    /// Counters of the comparison: `bytes_written` is the data that would be recorded,
    /// `bytes_zeroed` the zeros.
    #[serde(flatten)]
    pub counters: Snapshot,
    /// Separate ranges that differ.
    pub ranges_differing: u64,
    /// At most this many bytes of file (uncompressed records; compression makes it smaller).
    pub estimated_file_size: u64,
    /// Bytes sent over ssh.
    pub bytes_sent: u64,
    /// Bytes received over ssh.
    pub bytes_received: u64,
}

/// Header, states and footer of a delta, with room for its strings.
const FIXED: u64 = 1024;
/// A record's header and hash, and its index entry.
const PER_RECORD: u64 = 96;
/// Records are cut at most this long (the engine writes a chunk at a time).
const RECORD: u64 = 2 << 20;

impl Estimate {
    fn of(summary: Summary, base: String, new_chain: bool) -> Estimate {
        let c = summary.counters;
        let records = summary.ranges_differing + (c.bytes_written + c.bytes_zeroed).div_ceil(RECORD);
        Estimate {
            source: summary.source,
            base,
            new_chain,
            estimated_file_size: if new_chain {
                c.bytes_written
            } else {
                FIXED + c.bytes_written + records * PER_RECORD
            },
            counters: c,
            ranges_differing: summary.ranges_differing,
            bytes_sent: summary.bytes_sent,
            bytes_received: summary.bytes_received,
        }
    }
}

/// The comparison of a dry run.
fn dry(options: &DiffOptions) -> SyncOptions {
    SyncOptions { dry_run: true, ..crate::patch::recording(options) }
}

/// Compares `src` with `base`, both here.
fn compare_here(src: &dyn Source, base: &dyn Source, options: &DiffOptions, control: Control<'_>) -> Result<Summary> {
    crate::transfer::sync(&mut LocalEnds::reading(src, base), Commit::None, &dry(options), control)
}

/// What `backup SOURCE DEST` would record now.
pub fn backup(source: &Side<'_>, dest: &Side<'_>, options: &DiffOptions, control: Control<'_>) -> Result<Estimate> {
    match (source.location, dest.location) {
        (Location::Local(src), Location::Local(dir)) => {
            let src_end = crate::endpoint::usage::open(src, options.fs_aware)?;
            let result = backup_here(src_end.as_ref(), dir, options, control);
            let closed = src_end.close();
            crate::endpoint::after_close(result, closed, "the estimate was made")
        }
        _ => crate::relay::estimate_backup(source, dest, &dry(options), control)
            .map(|(summary, base, new_chain)| Estimate::of(summary, base, new_chain)),
    }
}

fn backup_here(src: &dyn Source, dir: &Path, options: &DiffOptions, control: Control<'_>) -> Result<Estimate> {
    let chain = match crate::backup::load(dir) {
        Ok(chain) => chain,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            // No chain yet: the first point is a full copy, what differs from nothing.
            let empty = crate::endpoint::memory::Memory::new(dir.join("(no chain yet)"), 0).resizable(true);
            let summary = compare_here(src, &empty, options, control)?;
            return Ok(Estimate::of(summary, dir.display().to_string(), true));
        }
        Err(e) => return Err(e),
    };
    let newest = crate::backup::point(&chain, crate::backup::At::Latest)?;
    let image = chain.image(newest)?;
    let summary = compare_here(src, &image, options, control)?;
    Ok(Estimate::of(summary, format!("{} (point {newest})", dir.display()), false))
}

/// What `diff SOURCE BASE` would record.
pub fn diff(source: &Side<'_>, base: &Side<'_>, options: &DiffOptions, control: Control<'_>) -> Result<Estimate> {
    match (source.location, base.location) {
        (Location::Local(src), Location::Local(old)) => {
            let (a, b) = (crate::endpoint::usage::open(src, options.fs_aware)?, crate::endpoint::open_source(old)?);
            let result = compare_here(a.as_ref(), b.as_ref(), options, control);
            let closed = a.close().and(b.close());
            crate::endpoint::after_close(result, closed, "the estimate was made")
                .map(|summary| Estimate::of(summary, old.display().to_string(), false))
        }
        _ => crate::relay::estimate_diff(source, base, &dry(options), control).map(|summary| {
            let base = summary.destination.clone();
            Estimate::of(summary, base, false)
        }),
    }
}
