//! Patch files: `diff` writes a delta that turns one image into another, `apply` replays one
//! delta or a chain onto a target, `info` describes a delta.
//!
//! `apply` validates before it writes: every delta's integrity first (docs/DELTA-FORMAT.md,
//! "Validation"), then, just before applying each one, the target's size and the content under
//! every record (`before_hash`). A corrupt, truncated or foreign delta leaves the target
//! untouched; in a chain, a later delta that does not fit leaves the target as the earlier ones
//! made it, and says so.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::delta::{self, Delta, Header, Kind, Writer};
use crate::endpoint::local::{Local, OpenTarget};
use crate::endpoint::{Source, Target};
use crate::engine::{Action, Scan};
use crate::error::{Error, ErrorKind, Result};
use crate::progress::{Control, Counters, Phase, Snapshot};

/// Options of `diff`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffOptions {
    /// Comparison granularity.
    pub block_size: usize,
    /// Worker threads; 0 for the default of the host that runs the work (one per core, 2 to 8).
    pub threads: usize,
    /// Leave what was read in the page cache.
    pub keep_cache: bool,
    /// Stored in the header.
    pub comment: String,
    /// Read the source at most this many bytes per second.
    pub bwlimit: Option<u64>,
    /// `backup --force`: add to a chain even a source that does not look like the image it backs
    /// up (another filesystem UUID, or another path and size).
    #[serde(default)]
    pub force: bool,
}

/// What `diff` wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiffSummary {
    /// The delta file.
    pub delta: String,
    /// Its header.
    pub header: Header,
    /// Counters (`bytes_written`: data recorded, `bytes_zeroed`: zero ranges recorded).
    #[serde(flatten)]
    pub counters: Snapshot,
    /// Size of the delta file.
    pub file_size: u64,
    /// Bytes sent over ssh by a scan between hosts (0 when SRC and BASE are on one host).
    #[serde(default)]
    pub bytes_sent: u64,
    /// Bytes received over ssh.
    #[serde(default)]
    pub bytes_received: u64,
}

/// `UUID=… LABEL=… TYPE=…` of the filesystem on `path`, as `blkid` reports it; empty when there
/// is none or blkid is missing. Informational: it tells which volume a delta came from.
#[must_use]
pub fn source_identity(path: &Path) -> String {
    let Ok(out) = std::process::Command::new("blkid").args(["-o", "export"]).arg(path).output() else {
        return String::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| ["UUID=", "LABEL=", "TYPE="].iter().any(|k| l.starts_with(k)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A random 16-byte id.
pub fn random_id() -> Result<[u8; 16]> {
    use std::io::Read;
    let mut id = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .map_err(|e| Error::new(ErrorKind::Io, format!("reading /dev/urandom: {e}")))?;
    Ok(id)
}

/// Seconds since the epoch and the local UTC offset, from `date` semantics without a time-zone
/// database: the offset is what `localtime_r` says, via the `TZ`-aware `date +%z`.
pub(crate) fn now() -> (i64, i32) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let offset = std::process::Command::new("date")
        .arg("+%z")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|z| {
            let z = z.trim();
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let digits = z.trim_start_matches(['+', '-']);
            let hours: i32 = digits.get(..2)?.parse().ok()?;
            let minutes: i32 = digits.get(2..4)?.parse().ok()?;
            Some(sign * (hours * 3600 + minutes * 60))
        })
        .unwrap_or(0);
    (secs, offset)
}

/// Writes to `out` a delta that turns `base` into `source`.
pub fn diff(
    source: &Path,
    base: &Path,
    out: &Path,
    options: &DiffOptions,
    control: Control<'_>,
) -> Result<DiffSummary> {
    let src = Local::open_source(source)?;
    let old = Local::open_source(base)?;
    write_delta(&src, &old, out, [0; 16], options, control)
}

/// Writes to `out` a delta that turns `old` into `src`, linked to `parent`.
pub fn write_delta(
    src: &dyn Source,
    old: &dyn Source,
    out: &Path,
    parent: [u8; 16],
    options: &DiffOptions,
    control: Control<'_>,
) -> Result<DiffSummary> {
    delta::check_output(out, &[src.identity(), old.identity()])?;
    let (created, utc_offset) = now();
    let header = Header {
        id: random_id()?,
        parent,
        block_size: options.block_size as u32,
        size_before: old.size(),
        size_after: src.size(),
        created,
        utc_offset,
        source: src.name().display().to_string(),
        source_identity: source_identity(src.name()),
        comment: options.comment.clone(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
    };
    let writer = Writer::create(out, &header)?;
    let throttle = options.bwlimit.map(crate::throttle::Throttle::new);
    let counters = Counters::new();
    counters.set_total(src.size());
    control.observer.phase(Phase::Compare, src.size());
    let scan = Scan {
        source: src,
        source_len: src.size(),
        dest: old,
        scan_len: src.size(),
        block_size: options.block_size,
        threads: options.threads,
        keep_cache: options.keep_cache,
        action: Action::Record(&writer),
        keep_ranges: 0,
        throttle: throttle.as_ref(),
        undo: None,
    };
    let found = match scan.run(&counters, control) {
        Ok(found) if !found.cancelled => found,
        Ok(_) => {
            writer.abandon();
            return Err(Error::new(ErrorKind::Interrupted, "interrupted: no delta was written"));
        }
        Err(e) => {
            writer.abandon();
            return Err(e);
        }
    };
    let _ = found;
    let file_size = writer.commit()?;
    Ok(DiffSummary {
        delta: out.display().to_string(),
        header,
        counters: counters.snapshot(),
        file_size,
        bytes_sent: 0,
        bytes_received: 0,
    })
}

/// What `apply` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplySummary {
    /// The target.
    pub target: String,
    /// Deltas applied, in order.
    pub deltas: Vec<String>,
    /// Counters (`bytes_written`, `bytes_zeroed`).
    #[serde(flatten)]
    pub counters: Snapshot,
    /// Target size at the end.
    pub size_after: u64,
}

/// Applies `deltas` in order to `target`.
///
/// Resumable: a record whose range already holds its new content counts as applied, so a rerun
/// after a kill finishes the job. While a record is written its offset is noted in a marker file
/// (`~/.cache/blksync/apply/`); a rerun accepts that one record holding neither the old nor the
/// new content (a write cut short) and writes it again. Anything else that holds neither is the
/// wrong target, and nothing is written.
pub fn apply(deltas: &[&Path], target: &Path, force: bool, control: Control<'_>) -> Result<ApplySummary> {
    // Integrity of every delta before anything else. An undo log left by a killed sync
    // (`NAME.partial`) is recovered up to its first torn record.
    let opened: Vec<Delta> =
        deltas.iter().map(|p| if is_partial(p) { Delta::recover(p) } else { Delta::open(p) }).collect::<Result<_>>()?;
    for pair in opened.windows(2) {
        if pair[1].header.size_before != pair[0].header.size_after {
            return Err(Error::new(
                ErrorKind::WrongTarget,
                format!(
                    "{} produces {} bytes but {} applies to {} bytes: not consecutive deltas",
                    pair[0].path().display(),
                    pair[0].header.size_after,
                    pair[1].path().display(),
                    pair[1].header.size_before
                ),
            ));
        }
    }
    let create = opened.first().is_some_and(|d| d.header.size_before == 0);
    let dst = Local::open_target(target, OpenTarget { create, force, ..OpenTarget::default() })?;
    let created = dst.created();
    let result = apply_to(&opened, &dst, control);
    if created && result.is_err() {
        // Nothing of the target existed before: leave nothing that looks like a result.
        let _ = std::fs::remove_file(target);
    }
    let counters = result?;
    Ok(ApplySummary {
        target: target.display().to_string(),
        deltas: deltas.iter().map(|p| p.display().to_string()).collect(),
        counters,
        size_after: dst.size(),
    })
}

fn is_partial(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "partial")
}

fn apply_to(opened: &[Delta], dst: &Local, control: Control<'_>) -> Result<Snapshot> {
    let counters = Counters::new();
    counters.set_total(opened.iter().map(|d| d.index.iter().map(|e| u64::from(e.len)).sum::<u64>()).sum());
    control.observer.phase(Phase::Sync, counters.snapshot().bytes_total);
    let mut already = 0;
    for d in opened {
        if control.cancelled() {
            return Err(Error::new(
                ErrorKind::Interrupted,
                format!(
                    "interrupted before applying {}; what was applied stays, and a rerun finishes the job",
                    d.path().display()
                ),
            ));
        }
        let marker = Marker::new(dst, &d.header.id);
        let torn = marker.as_ref().and_then(Marker::torn);
        let plan = check_target(d, dst, torn)?;
        // Already applied, and not by a run that was killed before it could say so.
        if plan.already_applied && torn.is_none() {
            already += 1;
        }
        if dst.size() != d.header.size_after {
            dst.set_size(d.header.size_after)?;
        }
        for (entry, &write) in d.index.iter().zip(&plan.write) {
            counters.add_scanned(u64::from(entry.len));
            if !write {
                continue;
            }
            if control.cancelled() {
                dst.flush()?;
                return Err(Error::new(
                    ErrorKind::Interrupted,
                    format!(
                        "interrupted while applying {}; what was applied is flushed, and a rerun finishes the job",
                        d.path().display()
                    ),
                ));
            }
            let record = d.read(entry)?;
            if let Some(m) = &marker {
                m.note(entry.offset);
            }
            match entry.kind {
                Kind::Data => {
                    dst.write_at(&record.data, entry.offset)?;
                    counters.add_written(u64::from(entry.len));
                }
                Kind::Zeros => {
                    dst.zero(entry.offset, u64::from(entry.len))?;
                    counters.add_zeroed(u64::from(entry.len));
                }
            }
            control.observer.progress(&counters.snapshot());
        }
        dst.flush()?;
        if let Some(m) = marker {
            m.remove();
        }
    }
    if already == opened.len() && !opened.iter().any(|d| d.partial) {
        let names: Vec<String> = opened.iter().map(|d| d.path().display().to_string()).collect();
        return Err(Error::new(
            ErrorKind::WrongTarget,
            format!("{} already holds what {} produces: it was applied before", dst.name().display(), names.join(", ")),
        ));
    }
    Ok(counters.snapshot())
}

/// What applying one delta must write.
struct Plan {
    /// Per index entry: the range still needs its new content.
    write: Vec<bool>,
    /// Every record's range already holds its new content, and at least one differs from
    /// what the delta was made against: the delta was applied before.
    already_applied: bool,
}

/// How many records of an undo log left by a killed sync may hold neither their old nor their
/// new content: those being written when it died, one per worker at most.
const TORN_IN_JOURNAL: usize = 64;

/// Checks that `target` holds what `delta` was made against, or, range by range, what it
/// produces (a run that was cut short): its size, and the content under every record. `torn`
/// is the offset of a record that was being written when an earlier apply was killed.
fn check_target(delta: &Delta, target: &Local, torn: Option<u64>) -> Result<Plan> {
    let wrong = |what: String| {
        Error::new(
            ErrorKind::WrongTarget,
            format!(
                "{} does not fit {}: {what}; nothing of it was written",
                delta.path().display(),
                target.name().display()
            ),
        )
    };
    let size = target.size();
    let h = &delta.header;
    let fits = match target.kind() {
        crate::endpoint::Kind::BlockDevice => size == h.size_before && size == h.size_after,
        // A file already resized by a run that was cut short.
        _ => size == h.size_before || size == h.size_after,
    };
    if !fits {
        return Err(wrong(format!("the target is {size} bytes, the delta expects {}", h.size_before)));
    }
    // Records of a recovered undo log, newest written last: the last ones may be cut short.
    let mut by_position: Vec<u64> = delta.index.iter().map(|e| e.position).collect();
    by_position.sort_unstable();
    let tail_from = by_position.len().saturating_sub(TORN_IN_JOURNAL).min(by_position.len());
    let tail_start = by_position.get(tail_from).copied().unwrap_or(u64::MAX);
    let mut plan = Plan { write: Vec::with_capacity(delta.index.len()), already_applied: false };
    let (mut before_only, mut after_only) = (0usize, 0usize);
    let mut buf = Vec::new();
    for entry in &delta.index {
        let record = delta.read(entry)?;
        let len = u64::from(entry.len);
        buf.clear();
        buf.resize(len as usize, 0);
        if entry.offset < size {
            let n = (size - entry.offset).min(len) as usize;
            target.read_at(&mut buf[..n], entry.offset)?;
        }
        let holds_after = match entry.kind {
            Kind::Data => buf == record.data,
            Kind::Zeros => crate::zero::is_zero(&buf),
        };
        let holds_before = record.before_hash == delta::UNRECORDED || delta::hash16(&[&buf]) == record.before_hash;
        if holds_after {
            if !holds_before {
                after_only += 1;
            }
            plan.write.push(false);
        } else if holds_before {
            before_only += 1;
            plan.write.push(true);
        } else if torn == Some(entry.offset) || (delta.partial && entry.position >= tail_start) {
            // Being written when a run was killed: part old, part new. Writing it completes it.
            plan.write.push(true);
        } else {
            return Err(wrong(format!(
                "the content at byte offset {} is not what the delta was made against",
                entry.offset
            )));
        }
    }
    plan.already_applied = before_only == 0 && after_only > 0 && plan.write.iter().all(|w| !w);
    Ok(plan)
}

/// Notes, in `~/.cache/blksync/apply/`, which record an apply is writing, so that a rerun after
/// a kill recognises that record's range as cut short rather than foreign. Not fsynced: it
/// guards against a killed process, whose writes the page cache keeps; after a power cut the
/// target's own writes are as unordered as the marker's. Best effort: without a cache
/// directory, a record cut short makes the rerun refuse, as it would without markers.
struct Marker {
    path: PathBuf,
    file: std::fs::File,
}

impl Marker {
    fn new(target: &Local, delta_id: &[u8; 16]) -> Option<Marker> {
        let who = match target.identity() {
            crate::endpoint::Identity::File { dev, ino } => format!("f{dev}-{ino}"),
            crate::endpoint::Identity::Device { rdev } => format!("d{rdev}"),
            crate::endpoint::Identity::None => return None,
        };
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        let dir = cache.join("blksync").join("apply");
        std::fs::create_dir_all(&dir).ok()?;
        let path = dir.join(format!("{who}-{}", delta::to_hex(delta_id)));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .ok()?;
        Some(Marker { path, file })
    }

    /// The offset noted by an earlier run that did not finish.
    fn torn(&self) -> Option<u64> {
        let mut b = [0u8; 8];
        self.file.read_exact_at(&mut b, 0).ok().map(|()| u64::from_le_bytes(b))
    }

    fn note(&self, offset: u64) {
        let _ = self.file.write_all_at(&offset.to_le_bytes(), 0);
    }

    fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A delta's description for `info`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Info {
    /// The file.
    pub path: String,
    /// Its size.
    pub file_size: u64,
    /// Its header.
    pub header: Header,
    /// Number of records.
    pub records: u64,
    /// Bytes of data it carries (decoded).
    pub data_bytes: u64,
    /// Bytes it zeroes.
    pub zero_bytes: u64,
}

/// Validates a delta and describes it.
pub fn info(path: &Path) -> Result<Info> {
    let d = Delta::open(path)?;
    let sum = |k: Kind| d.index.iter().filter(|e| e.kind == k).map(|e| u64::from(e.len)).sum();
    Ok(Info {
        path: path.display().to_string(),
        file_size: d.file_size,
        records: d.index.len() as u64,
        data_bytes: sum(Kind::Data),
        zero_bytes: sum(Kind::Zeros),
        header: d.header,
    })
}

/// Merges consecutive deltas into one that has the same effect as applying them in order.
///
/// Each record of the result covers the range where some delta first touched the image, so it
/// keeps that record's `before_hash` and `apply` still checks the target; parts that a later
/// delta touched beyond what earlier ones did are marked [`delta::UNRECORDED`].
pub fn merge(inputs: &[&Path], out: &Path, control: Control<'_>) -> Result<Info> {
    use crate::chain::{Piece, cut};
    use std::collections::BTreeMap;
    delta::check_output(out, &[])?;
    let deltas: Vec<Delta> = inputs.iter().map(|p| Delta::open(p)).collect::<Result<_>>()?;
    let (Some(first), Some(last)) = (deltas.first(), deltas.last()) else {
        return Err(Error::usage("merge needs at least one delta"));
    };
    for pair in deltas.windows(2) {
        let (a, b) = (&pair[0].header, &pair[1].header);
        let linked = b.parent == a.id || b.parent == [0; 16];
        if b.size_before != a.size_after || !linked {
            return Err(Error::new(
                ErrorKind::WrongTarget,
                format!(
                    "{} does not follow {}: not consecutive deltas",
                    pair[1].path().display(),
                    pair[0].path().display()
                ),
            ));
        }
    }
    // Final content: newest record wins; a shrink makes what lay beyond read as zeros.
    let mut pieces: BTreeMap<u64, Piece> = BTreeMap::new();
    // Where each region was first touched, with the old content's hash when exactly known.
    let mut touched: BTreeMap<u64, (u64, [u8; 16])> = BTreeMap::new();
    let mut size = first.header.size_before;
    for (d, delta) in deltas.iter().enumerate() {
        if delta.header.size_after < size {
            cut(&mut pieces, delta.header.size_after, size);
            pieces.insert(delta.header.size_after, Piece { end: size, source: None });
            mark(&mut touched, delta.header.size_after, size, None);
        }
        size = delta.header.size_after;
        for entry in &delta.index {
            let end = entry.offset + u64::from(entry.len);
            let record = delta.read(entry)?;
            mark(&mut touched, entry.offset, end, Some(record.before_hash));
            cut(&mut pieces, entry.offset, end);
            pieces.insert(entry.offset, Piece { end, source: (entry.kind == Kind::Data).then_some((d, *entry)) });
        }
    }
    let header = Header {
        parent: first.header.parent,
        size_before: first.header.size_before,
        comment: format!("merge of {} deltas", deltas.len()),
        ..last.header.clone()
    };
    let writer = Writer::create(out, &header)?;
    let counters = Counters::new();
    counters.set_total(touched.iter().map(|(&start, &(end, _))| end.min(size).saturating_sub(start)).sum());
    control.observer.phase(Phase::Sync, counters.snapshot().bytes_total);
    let result = (|| {
        for (&start, &(touched_end, before)) in &touched {
            if control.cancelled() {
                return Err(Error::new(ErrorKind::Interrupted, "interrupted: no merged delta was written"));
            }
            let end = touched_end.min(size);
            let mut pos = start;
            // Output records of at most 1 MiB.
            while pos < end {
                let stop = (pos + (1 << 20)).min(end);
                let mut buf = vec![0u8; (stop - pos) as usize];
                for (&s, piece) in pieces.range(..stop).rev().take_while(|(_, p)| p.end > pos) {
                    let (a, b) = (s.max(pos), piece.end.min(stop));
                    if let (Some((d, entry)), true) = (piece.source, a < b) {
                        let record = deltas[d].read(&entry)?;
                        let from = (a - entry.offset) as usize;
                        buf[(a - pos) as usize..(b - pos) as usize]
                            .copy_from_slice(&record.data[from..from + (b - a) as usize]);
                    }
                }
                // The old hash covers the whole first-touch range: exact only when it is
                // written as one record.
                let exact = if pos == start && stop == touched_end { before } else { delta::UNRECORDED };
                let kind = if crate::zero::is_zero(&buf) { Kind::Zeros } else { Kind::Data };
                writer.record_hashed(kind, pos, buf.len() as u32, &buf, exact)?;
                counters.add_scanned(stop - pos);
                control.observer.progress(&counters.snapshot());
                pos = stop;
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            writer.commit()?;
            info(out)
        }
        Err(e) => {
            writer.abandon();
            Err(e)
        }
    }
}

/// Records `[start, end)` as touched where it was not yet; `before` is kept only for a range
/// touched for the first time as a whole.
fn mark(
    touched: &mut std::collections::BTreeMap<u64, (u64, [u8; 16])>,
    start: u64,
    end: u64,
    before: Option<[u8; 16]>,
) {
    let covered: Vec<crate::extent::Extent> = touched
        .range(..end)
        .filter(|(_, (e, _))| *e > start)
        .map(|(&s, &(e, _))| crate::extent::Extent::between(s, e))
        .collect();
    let range = crate::extent::Extent::between(start, end);
    let gaps = crate::extent::gaps(range, &covered);
    let whole = gaps.len() == 1 && gaps[0] == range;
    for gap in gaps {
        let hash = if whole { before.unwrap_or(delta::UNRECORDED) } else { delta::UNRECORDED };
        touched.insert(gap.offset, (gap.end(), hash));
    }
}
