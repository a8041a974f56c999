//! One implementation of every command that moves an image or compares two: `sync`, `restore`,
//! `backup`, `diff` and `compare`, whatever their ends are.
//!
//! Both ends in this process: the engine compares bytes ([`local::LocalEnds`]). An end behind a
//! link (ssh, or a peer in a thread): the hash pass compares hashes (`relay::LinkEnds`). Those
//! two differ only in how a pass runs and how a target is resized, which is the [`Ends`] trait.
//! Everything a user can see is written once, here: the order of the steps, the size policy
//! and its warnings, removing a copy this run created and could not fill, what an interruption
//! or a failed verification says, and the summary.
//!
//! The steps of [`sync`], and why in this order:
//! 1. refuse an end synced onto itself, and decide sizes (`sizing`), before anything is written;
//! 2. prepare: start an undo log (it must exist before the first overwrite), resize a file;
//! 3. one pass that writes what differs and, however it ends, makes what it wrote durable:
//!    `flush` after a complete pass (which commits a log, a backup point or a delta),
//!    `flush_partial` otherwise (which commits nothing that claims to be complete);
//! 4. with `--verify`, a second pass that only compares, reading the target from its medium.

pub(crate) mod local;
pub(crate) mod table;

use crate::compare::{CompareOptions, Comparison};
use crate::endpoint::Caps;
use crate::engine::Found;
use crate::error::{Error, ErrorKind, Result};
use crate::progress::{Control, Counters, Phase};
use crate::sizing;
use crate::sync::{Summary, SyncOptions};
use crate::throttle::Throttle;

/// The target as it was opened.
#[derive(Debug, Clone, Copy)]
pub(crate) struct End {
    /// False for a destination that is not there (seen only in a dry run).
    pub exists: bool,
    /// Its size before the run.
    pub size: u64,
    /// This run created it (empty).
    pub created: bool,
    /// What it can do.
    pub caps: Caps,
}

/// What the target's flush commits besides the data. Anything but `None` makes the flush
/// unconditional (even when nothing changed), and a recorder's target is never removed on
/// failure: it is not the user's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Commit {
    /// Nothing: a plain target.
    None,
    /// An undo log (`sync --undo`).
    Log,
    /// A backup point or a delta.
    Point,
}

/// What a pass does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The target is new and empty: send every non-zero source byte, compare nothing.
    Copy,
    /// Find differences and write them.
    Apply,
    /// Find differences only (a dry run, `compare`).
    Compare,
    /// Compare again after writing, reading the target from its medium.
    Verify,
}

impl Mode {
    /// The pass writes to the target.
    pub(crate) fn writes(self) -> bool {
        matches!(self, Mode::Copy | Mode::Apply)
    }
}

/// What a pass covers and how it runs.
#[derive(Clone, Copy)]
pub(crate) struct Plan<'a> {
    /// Bytes of the source that take part; beyond them it counts as zeros.
    pub source_len: u64,
    /// Bytes compared (and made equal): `[0, scan_len)`.
    pub scan_len: u64,
    /// The target's size during the pass (after a resize).
    pub target_len: u64,
    /// Comparison granularity.
    pub block_size: usize,
    /// Workers; 0 for the default of the host that runs them.
    pub threads: usize,
    /// Leave what was read in the page cache.
    pub keep_cache: bool,
    /// Leave clean pages in the page cache (a small image: `write_behind::cheap_to_keep`).
    pub keep_clean: bool,
    /// How many differing ranges to list (all are counted).
    pub keep_ranges: usize,
    /// Limits the rate of source reads.
    pub throttle: Option<&'a Throttle>,
    /// Flush even when no data changed: the target was resized, or the flush commits.
    pub must_flush: bool,
    /// The target records the new image's fingerprint (a delta, a backup point): a source read
    /// by the hash pass computes it as it reads (memory: 16 bytes per MiB of image).
    pub fingerprint: bool,
}

/// The two ends of a command, however they are reached.
pub(crate) trait Ends {
    /// Both names as the user wrote them (with the host of a remote one), for messages.
    fn names(&self) -> (String, String);
    /// Both ends are one object: syncing it onto itself would read what it writes.
    fn same_object(&self) -> bool;
    /// The source's size.
    fn source_size(&self) -> u64;
    /// The target as it was opened.
    fn target(&self) -> End;
    /// Before the first write: starts what records the writes (an undo log) for a target going
    /// to `new_size` bytes, then resizes the target when `resize` says so.
    fn prepare(&mut self, new_size: u64, resize: Option<u64>) -> Result<()>;
    /// One pass over `[0, plan.scan_len)`. A writing pass makes what it wrote durable however it
    /// ends: a complete one flushes (and commits), an incomplete one flushes partially.
    fn pass(&mut self, mode: Mode, plan: &Plan<'_>, counters: &Counters, control: Control<'_>) -> Result<Found>;
    /// Removes the target this run created.
    fn discard_created(&mut self);
    /// What the source said when it was opened (mounted read-write, a disk-image format).
    fn warnings(&self) -> Vec<String>;
    /// What a source read `--fs-aware` found, region by region.
    fn filesystems(&self) -> Vec<crate::endpoint::FsRegion>;
    /// For `--verbose`: how the pass compares and where each end is.
    fn strategy(&self) -> String;
    /// The source's abilities.
    fn source_caps(&self) -> Caps;
    /// The undo log written, for the summary, when this end writes one itself.
    fn undo_log(&self) -> Option<String> {
        None
    }
    /// The source's partition table, for a whole-disk sync onto a disk of another size
    /// ([`table`]); `None` when it has none, or when the target records its writes.
    fn source_table(&mut self) -> Result<Option<blksync_disk::Table>>;
    /// The target's partition table as it is before the pass, for the DOS rule of [`table`]
    /// (a compatible one is kept); `None` when it has none or it cannot be read.
    fn target_table(&mut self) -> Option<blksync_disk::Table>;
    /// Writes `writes` to the target and flushes it: its table fitted to its size.
    fn write_target(&mut self, writes: &[(u64, Vec<u8>)]) -> Result<()>;
}

/// Makes the target of `ends` equal to its source (see the module doc for the steps).
pub(crate) fn sync(ends: &mut dyn Ends, commit: Commit, o: &SyncOptions, control: Control<'_>) -> Result<Summary> {
    let created = ends.target().created;
    let result = run(ends, commit, o, control);
    if created && commit == Commit::None && result.as_ref().is_err_and(|e| e.kind() != ErrorKind::Interrupted) {
        // A file this run created and could not fill is worse than no file: a later run or a
        // user might take it for a copy. An interrupted copy stays: a rerun resumes it cheaply.
        ends.discard_created();
    }
    result
}

/// Tells `--verbose` what was opened and how the passes will run.
fn describe(ends: &dyn Ends, control: Control<'_>) {
    let (source, target) = ends.names();
    let t = ends.target();
    let size = crate::size::format_size;
    control.observer.note(&format!("source {source}: {}, {}", size(ends.source_size()), ends.source_caps().words()));
    let state = if t.created {
        "created"
    } else if t.exists {
        "exists"
    } else {
        "absent"
    };
    control.observer.note(&format!("destination {target}: {}, {state}, {}", size(t.size), t.caps.words()));
    control.observer.note(&format!("strategy: {}", ends.strategy()));
}

fn run(ends: &mut dyn Ends, commit: Commit, o: &SyncOptions, control: Control<'_>) -> Result<Summary> {
    describe(ends, control);
    let (source_name, target_name) = ends.names();
    if ends.same_object() {
        return Err(Error::usage(format!("{source_name} and {target_name} are the same file or device")));
    }
    let t = ends.target();
    let (sizing, partitions) = sizes(ends, &t, commit, o, (&source_name, &target_name))?;
    // Read before the pass overwrites it: a DOS table there that holds the source's partitions
    // is kept (`table::kept`).
    let kept = partitions.as_ref().and_then(|tb| table::kept(tb, ends.target_table()));
    let mut warnings = Vec::new();
    let mut warn = |w: String| {
        control.observer.warn(&w);
        warnings.push(w);
    };
    ends.warnings().into_iter().chain(sizing.warning.clone()).for_each(&mut warn);
    let resize = sizing.resize_to.filter(|_| !o.dry_run);
    let size_after = sizing.resize_to.unwrap_or(t.size);
    ends.prepare(size_after, resize)?;

    let mode = if o.dry_run {
        Mode::Compare
    } else if t.caps.resizable && (t.created || t.size == 0) {
        Mode::Copy
    } else {
        Mode::Apply
    };
    let throttle = o.bwlimit.map(Throttle::new);
    let plan = Plan {
        source_len: sizing.source_len,
        scan_len: sizing.scan_len,
        target_len: if o.dry_run { t.size } else { size_after },
        block_size: o.block_size,
        threads: o.threads,
        keep_cache: o.keep_cache,
        keep_clean: crate::write_behind::cheap_to_keep(sizing.scan_len.max(size_after)),
        keep_ranges: 0,
        throttle: throttle.as_ref(),
        must_flush: commit != Commit::None || resize.is_some(),
        fingerprint: commit == Commit::Point,
    };
    let counters = Counters::new();
    counters.set_total(sizing.scan_len);
    control.observer.phase(if o.dry_run { Phase::Compare } else { Phase::Sync }, sizing.scan_len);
    let mut found = ends.pass(mode, &plan, &counters, control)?;
    std::mem::take(&mut found.warnings).into_iter().for_each(&mut warn);
    if found.cancelled && commit == Commit::Point {
        // The partial flush discarded the point: say so, not "in sync".
        return Err(Error::new(
            ErrorKind::Interrupted,
            format!(
                "interrupted: nothing was committed at {target_name} (no backup was made, no delta kept); a rerun starts over"
            ),
        ));
    }
    if found.cancelled {
        return Err(Error::new(
            ErrorKind::Interrupted,
            format!(
                "interrupted: sync of {target_name} is incomplete; the first {} bytes are in sync and flushed to disk, run it again to finish",
                found.done
            ),
        ));
    }
    let mut summary = Summary {
        source: source_name,
        destination: target_name,
        dry_run: o.dry_run,
        block_size: o.block_size,
        counters: counters.snapshot(),
        ranges_differing: found.range_count,
        destination_size_before: t.size,
        destination_size_after: size_after,
        verified: false,
        warnings,
        bytes_sent: 0,
        bytes_received: 0,
        undo_log: ends.undo_log(),
        partitions: Vec::new(),
        filesystems: ends.filesystems(),
    };
    if o.verify && !o.dry_run {
        verify(ends, &Plan { throttle: None, keep_ranges: 1, ..plan }, &summary, control)?;
        summary.verified = true;
    }
    if let Some(tb) = &partitions {
        // After the verification, which compares the bytes as copied: the table is then fitted.
        let writes = match (&kept, o.dry_run) {
            (_, true) => Vec::new(),
            (Some(dest), false) => dest.dos_table_sectors(),
            (None, false) => table::fitted(tb, t.size)?,
        };
        if !writes.is_empty() {
            ends.write_target(&writes)?;
        }
        summary.partitions = table::report(tb, t.size, !writes.is_empty(), kept.as_ref());
    }
    Ok(summary)
}

/// How much to sync (`sizing`), and the source's partition table when the destination is a
/// disk of another size, whose table decides what fits and is fitted after the pass (`table`).
fn sizes(
    ends: &mut dyn Ends,
    t: &End,
    commit: Commit,
    o: &SyncOptions,
    (source_name, target_name): (&str, &str),
) -> Result<(sizing::Sizing, Option<blksync_disk::Table>)> {
    let source_size = ends.source_size();
    let partitions =
        if table::wanted(source_size, t, commit == Commit::None) && o.size_policy != sizing::SizePolicy::Common {
            ends.source_table()?
        } else {
            None
        };
    let sizing = match &partitions {
        Some(tb) if t.size < source_size => {
            let n = table::smaller(tb, t.size, &(source_name.to_string(), target_name.to_string()))?;
            sizing::Sizing {
                source_len: n,
                scan_len: n,
                resize_to: None,
                warning: Some(format!(
                    "source is {source_size} bytes, destination is {} bytes: every partition fits, so the first {n} bytes are synced",
                    t.size
                )),
            }
        }
        _ => sizing::resolve(source_size, (&t.caps, t.exists), t.size, t.created, o.size_policy, o.zero_tail)?,
    };
    Ok((sizing, partitions))
}

/// Compares both ends again after a sync; any difference is an error.
fn verify(ends: &mut dyn Ends, plan: &Plan<'_>, summary: &Summary, control: Control<'_>) -> Result<()> {
    let counters = Counters::new();
    counters.set_total(plan.scan_len);
    control.observer.phase(Phase::Verify, plan.scan_len);
    let found = ends.pass(Mode::Verify, plan, &counters, control)?;
    if found.cancelled {
        return Err(Error::new(ErrorKind::Interrupted, "interrupted during verification; the sync itself completed"));
    }
    if let Some(first) = found.ranges.first() {
        return Err(Error::new(
            ErrorKind::VerifyFailed,
            format!(
                "verification failed: {} differs from {} in {} bytes ({} ranges), the first at byte offset {}",
                summary.destination,
                summary.source,
                counters.snapshot().bytes_differing,
                found.range_count,
                first.offset
            ),
        ));
    }
    Ok(())
}

/// Compares the two ends of `ends` (neither is written). Images of different sizes differ; their
/// common part is still compared, so that the report is useful.
pub(crate) fn compare(ends: &mut dyn Ends, o: &CompareOptions, control: Control<'_>) -> Result<Comparison> {
    describe(ends, control);
    let (a, b) = (ends.source_size(), ends.target().size);
    let common = a.min(b);
    let counters = Counters::new();
    counters.set_total(common);
    control.observer.phase(Phase::Compare, common);
    let plan = Plan {
        source_len: common,
        scan_len: common,
        target_len: common,
        block_size: o.block_size,
        threads: o.threads,
        keep_cache: o.keep_cache,
        keep_clean: crate::write_behind::cheap_to_keep(common),
        keep_ranges: o.max_ranges,
        throttle: None,
        must_flush: false,
        fingerprint: false,
    };
    let mut found = ends.pass(Mode::Compare, &plan, &counters, control)?;
    if found.cancelled {
        return Err(Error::new(ErrorKind::Interrupted, "interrupted: comparison incomplete"));
    }
    let mut counters = counters.snapshot();
    counters.bytes_differing += a.abs_diff(b);
    // A pass that compares counts what a sync would write; a comparison writes nothing.
    counters.bytes_written = 0;
    counters.bytes_zeroed = 0;
    found.ranges.truncate(o.max_ranges);
    let (source, destination) = ends.names();
    Ok(Comparison {
        source,
        destination,
        source_size: a,
        destination_size: b,
        identical: counters.bytes_differing == 0,
        counters,
        ranges_differing: found.range_count,
        ranges: found.ranges,
        filesystems: ends.filesystems(),
    })
}
