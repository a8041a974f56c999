//! `compare`: are two images identical, and if not, where do they differ?
//!
//! Like `cmp` for disk images: bytes are compared directly (both sides are local), holes are
//! known zeros and not read, and the answer lists differing ranges at block granularity. Images
//! of different sizes differ; their common part is still compared so the report is useful.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::endpoint::OpenTarget;
use crate::endpoint::Source;
use crate::engine::{Action, Scan};
use crate::error::{Error, ErrorKind, Result};
use crate::extent::Extent;
use crate::progress::{Control, Counters, Phase, Snapshot};

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
}

/// Compares two local images.
pub fn compare_paths(a: &Path, b: &Path, options: &CompareOptions, control: Control<'_>) -> Result<Comparison> {
    let first = crate::endpoint::open_source(a)?;
    let second = crate::endpoint::open_target(b, OpenTarget { read_only: true, ..OpenTarget::default() })?;
    let result = if second.exists() {
        compare(first.as_ref(), second.as_ref(), options, control)
    } else {
        Err(Error::new(ErrorKind::NotFound, format!("{} does not exist", b.display())))
    };
    let closed = second.close().and(first.close());
    crate::endpoint::after_close(result, closed, "the comparison itself completed")
}

/// Compares two endpoints.
pub fn compare(a: &dyn Source, b: &dyn Source, options: &CompareOptions, control: Control<'_>) -> Result<Comparison> {
    let common = a.size().min(b.size());
    let counters = Counters::new();
    counters.set_total(common);
    control.observer.phase(Phase::Compare, common);
    let found = Scan {
        source: a,
        source_len: common,
        dest: b,
        scan_len: common,
        block_size: options.block_size,
        threads: options.threads,
        keep_cache: options.keep_cache,
        action: Action::Compare,
        keep_ranges: options.max_ranges,
        throttle: None,
    }
    .run(&counters, control)?;
    if found.cancelled {
        return Err(Error::new(ErrorKind::Interrupted, "interrupted: comparison incomplete"));
    }
    a.check_intact()?;
    b.check_intact()?;
    let mut counters = counters.snapshot();
    let tail = a.size().abs_diff(b.size());
    counters.bytes_differing += tail;
    Ok(Comparison {
        source: a.name().display().to_string(),
        destination: b.name().display().to_string(),
        source_size: a.size(),
        destination_size: b.size(),
        identical: counters.bytes_differing == 0,
        counters,
        ranges_differing: found.range_count,
        ranges: found.ranges,
    })
}
