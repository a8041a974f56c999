//! `compare`: are two images identical, and if not, where do they differ?
//!
//! Like `cmp` for disk images: bytes are compared directly (both sides are local), holes are
//! known zeros and not read, and the answer lists differing ranges at block granularity. Images
//! of different sizes differ; their common part is still compared so the report is useful.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::endpoint::OpenTarget;
use crate::endpoint::Source;
use crate::error::{Error, ErrorKind, Result};
use crate::extent::Extent;
use crate::progress::{Control, Snapshot};
use crate::transfer::local::LocalEnds;

/// Options of a comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompareOptions {
    /// Comparison granularity.
    pub block_size: usize,
    /// Leave what was read in the page cache.
    pub keep_cache: bool,
    /// Worker threads; 0 for the default of the host that runs the work (one per core, 2 to 8).
    pub threads: usize,
    /// How many differing ranges to list.
    pub max_ranges: usize,
    /// `--fs-aware`: compare only the blocks the first image's filesystems use.
    #[serde(default)]
    pub fs_aware: bool,
}

/// The result of a comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    /// First image.
    pub source: String,
    /// Second image.
    pub destination: String,
    /// Size of the first.
    pub source_size: u64,
    /// Size of the second.
    pub destination_size: u64,
    /// True when sizes and contents are equal.
    pub identical: bool,
    /// Counters; `bytes_differing` includes the size difference.
    #[serde(flatten)]
    pub counters: Snapshot,
    /// Number of separate differing ranges in the common part.
    pub ranges_differing: u64,
    /// The first differing ranges.
    pub ranges: Vec<Extent>,
    /// With `--fs-aware`: the first image's regions, of which only used blocks were compared.
    #[serde(default)]
    pub filesystems: Vec<crate::endpoint::FsRegion>,
}

/// Compares two local images.
pub fn compare_paths(a: &Path, b: &Path, options: &CompareOptions, control: Control<'_>) -> Result<Comparison> {
    let first = crate::endpoint::usage::open(a, options.fs_aware)?;
    let second = crate::endpoint::open_target(b, OpenTarget { read_only: true, ..OpenTarget::default() })?;
    let result = if second.exists() {
        compare(first.as_ref(), second.as_ref(), options, control)
    } else {
        Err(Error::new(ErrorKind::NotFound, format!("{} does not exist", b.display())))
    };
    let closed = second.close().and(first.close());
    crate::endpoint::after_close(result, closed, "the comparison itself completed")
}

/// Compares two endpoints (the steps are those of every comparison, `transfer::compare`).
pub fn compare(a: &dyn Source, b: &dyn Source, options: &CompareOptions, control: Control<'_>) -> Result<Comparison> {
    crate::transfer::compare(&mut LocalEnds::reading(a, b), options, control)
}
