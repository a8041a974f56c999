//! `blksync clone SRC DST`: a disk, a partition or a filesystem image onto a destination of
//! another size, filesystem by filesystem (issue 11 part 4; docs/CLONE.md is the
//! specification).
//!
//! Two phases, so that nothing is written to the destination before everything that can be
//! refused has been: **prepare** reads the source's table, plans the destination's
//! ([`blksync_disk::layout::plan`]), probes every filesystem and builds, in a temporary
//! directory, what is copied instead of an ext filesystem of another size (a sparse fs-aware
//! copy grown or shrunk with `resize2fs`) or a swap area of another size (`mkswap` with the
//! source's UUID and label); **commit** writes the boot gap and the table, then syncs each
//! partition fs-aware (only used blocks read and written) from the source or from its
//! resized copy. Both ends here; both on one remote host (a job there); a local source onto a
//! remote disk or partition (built here in a staging image, then synced fs-aware); or a remote
//! source (its used blocks pulled into a staging copy here, which is then cloned).

use std::path::{Path, PathBuf};
use std::process::Command;

use blksync_core::endpoint::{Source, Target};
use blksync_disk::layout::{self, Place};
use blksync_disk::{Partition, Table};
use blksync_fs::{Kind, Usage};

use crate::endpoint::OpenTarget;
use crate::error::{Error, ErrorKind, Result};
use crate::job::WirePath;
use crate::location::Location;
use crate::progress::Control;
use crate::relay::Side;
use crate::size::format_size;
use crate::sync::SyncOptions;

/// How `clone` runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CloneOptions {
    /// The partition that takes the room left (`--grow N`); the last one when `None`.
    pub grow: Option<u32>,
    /// Where resized copies are built (`--temp-dir`); see [`temp_dir`] for the default. In a
    /// job it travels beside the options, as bytes.
    #[serde(skip)]
    pub temp_dir: Option<PathBuf>,
    /// Comparison granularity of each partition's sync.
    pub block_size: usize,
    /// Workers; 0 for the default.
    pub threads: usize,
    /// Open a destination device even when it is in use.
    pub force: bool,
    /// `-n`: prepare (plan, probe, build and resize the temporary copies, so that every refusal
    /// is real) and report, but write nothing to the destination.
    #[serde(default)]
    pub dry_run: bool,
}

/// What was done with one partition (or with the one filesystem of a partition clone).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PartReport {
    /// Its number, `None` for a partition or filesystem image cloned on its own.
    pub number: Option<u32>,
    /// What it holds: "ext4", "swap", "unknown".
    pub filesystem: String,
    /// The filesystem's UUID and label, when it has them.
    pub uuid: Option<String>,
    /// The label (empty when none).
    pub label: Option<String>,
    /// Where it starts on the destination.
    pub start: u64,
    /// Its size on the source and on the destination.
    pub size_before: u64,
    /// Its size on the destination.
    pub size_after: u64,
    /// "copied", "grown", "shrunk", "mkswap", "copied-whole".
    pub action: String,
    /// The bytes the sync of this partition wrote; `None` for a remote disk, which receives
    /// the whole clone in one sync (the summary's `bytes_written`).
    pub bytes_written: Option<u64>,
    /// One sentence for the human summary.
    pub detail: String,
}

/// The result of [`clone`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CloneSummary {
    /// The source as given.
    pub source: String,
    /// The destination as given.
    pub destination: String,
    /// "gpt", "dos", or `None` for a partition or filesystem clone.
    pub table: Option<String>,
    /// `-n`: nothing was written; `partitions` says what would be done.
    pub dry_run: bool,
    /// Whether the table and boot gap were written (they differed).
    pub table_written: bool,
    /// bsync's 446/512 rule: the destination's DOS table already held the source's partitions
    /// (the same numbers, starts and types, each at least as large) and was kept; each partition
    /// was cloned into the destination's, and only the boot code came from the source.
    #[serde(default)]
    pub table_kept: bool,
    /// One entry per partition, in table order.
    pub partitions: Vec<PartReport>,
    /// Bytes written to the destination in all (table, boot gap and every partition's sync;
    /// not counting what `resize2fs` and `e2fsck` wrote).
    pub bytes_written: u64,
    /// Where temporary copies were built, when any was.
    pub temp_dir: Option<String>,
    /// What was wrong but did not stop the clone (a damaged GPT copy of the source, a source
    /// mounted read-write), as shown on stderr when it happened.
    pub warnings: Vec<String>,
}

/// What a source region holds.
struct Probed {
    kind: Option<Kind>,
    /// Bytes its filesystem uses (all, for an unknown one).
    used: u64,
    why_whole: Option<String>,
}

/// One partition's copy, decided in the prepare phase.
struct Job {
    report: PartReport,
    /// What is synced: the source partition, or a temporary file.
    from: PathBuf,
    /// The destination partition's address (`DST#N`, or DST itself).
    to: PathBuf,
}

/// A temporary file removed when dropped.
struct Temp(PathBuf);

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Where resized copies go when `--temp-dir` is not given: the destination's directory when it
/// is a regular file (the same filesystem, usually with the room), else `$TMPDIR` (`/tmp`).
#[must_use]
pub fn temp_dir(dest: &Path, given: Option<&Path>) -> PathBuf {
    if let Some(dir) = given {
        return dir.to_path_buf();
    }
    let disk = blksync_endpoint_split(dest).unwrap_or_else(|| dest.to_path_buf());
    match std::fs::metadata(&disk) {
        Ok(m) if m.is_file() => {
            disk.parent().filter(|p| !p.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        }
        _ => std::env::temp_dir(),
    }
}

fn blksync_endpoint_split(address: &Path) -> Option<PathBuf> {
    blksync_endpoint::partition::split(address).map(|(disk, _)| disk)
}

/// Clones `source` onto `dest`: both local; both on one remote host, where it runs as a job
/// (only progress and the result cross the network); or through a staging image here when
/// only one end, or each end on another host, is remote.
pub fn clone(source: &Side<'_>, dest: &Side<'_>, o: &CloneOptions, control: Control<'_>) -> Result<CloneSummary> {
    match (source.location, dest.location) {
        (Location::Local(src), Location::Local(dst)) => clone_paths(src, dst, o, control),
        (Location::Remote(a), Location::Remote(b)) if crate::relay::same_remote_host(source, dest) => {
            let job = crate::job::Job::Clone {
                source: WirePath::new(&a.path),
                target: WirePath::new(&b.path),
                temp_dir: o.temp_dir.as_deref().map(WirePath::new),
                options: CloneOptions { temp_dir: None, ..o.clone() },
            };
            let (mut summary, _): (CloneSummary, _) = crate::relay::job_on_host(source, &job, control)?;
            let host = a.destination();
            summary.source = format!("{host}:{}", summary.source);
            summary.destination = format!("{host}:{}", summary.destination);
            Ok(summary)
        }
        (Location::Local(src), Location::Remote(r)) => clone_to_remote(src, dest, &r.display(), o, control),
        (Location::Remote(r), _) => clone_from_remote(source, dest, &r.display(), o, control),
    }
}

/// A remote source onto this host or another one: its used blocks are pulled, fs-aware, into
/// a sparse staging copy here (only they cross the network; free blocks stay holes), and the
/// staging copy is cloned onto `dest` as a local source. The source is only read.
fn clone_from_remote(
    source: &Side<'_>,
    dest: &Side<'_>,
    name: &str,
    o: &CloneOptions,
    control: Control<'_>,
) -> Result<CloneSummary> {
    let dir = o.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let mut temps = Vec::new();
    let probed = probe_remote(source, true, (&dir, &mut temps), o, control)?;
    let used: u64 = probed.filesystems.iter().map(|r| r.used).sum();
    let outside = probed.source_size.saturating_sub(probed.filesystems.iter().map(|r| r.len).sum());
    let staging = temp_file(&dir, "the staging copy of the source", used + outside, &mut temps)?;
    set_len(&staging, probed.source_size)?;
    let pull = crate::relay::RemoteOptions {
        sync: SyncOptions { block_size: o.block_size, threads: o.threads, fs_aware: true, ..SyncOptions::default() },
        compress: crate::compress::AUTO,
        pause: None,
        undo: None,
    };
    let staged = Location::Local(staging.clone());
    let staged_side = Side { location: &staged, ssh: source.ssh };
    let pulled = crate::place::sync(source, &staged_side, &pull, control)?;
    let local = CloneOptions { temp_dir: Some(dir.clone()), ..o.clone() };
    let mut summary = match dest.location {
        Location::Local(dst) => clone_paths(&staging, dst, &local, control)?,
        Location::Remote(r) => clone_to_remote(&staging, dest, &r.display(), &local, control)?,
    };
    summary.source = name.to_string();
    summary.temp_dir = Some(std::fs::canonicalize(&dir).unwrap_or(dir).display().to_string());
    summary.warnings.splice(0..0, pulled.warnings);
    drop(temps);
    Ok(summary)
}

/// What a remote disk or partition is, without reading its blocks: a comparison of it with an
/// empty file here, which stops at the sizes. The remote end opens it, and `fs_aware` probes
/// its filesystems there (`filesystems`: what each uses); `source_size` is its size.
fn probe_remote(
    remote: &Side<'_>,
    fs_aware: bool,
    (dir, temps): (&Path, &mut Vec<Temp>),
    o: &CloneOptions,
    control: Control<'_>,
) -> Result<crate::compare::Comparison> {
    let empty = temp_file(dir, "an empty probe", 0, temps)?;
    set_len(&empty, 0)?;
    let compare = crate::compare::CompareOptions {
        block_size: o.block_size,
        keep_cache: false,
        threads: o.threads,
        max_ranges: 0,
        fs_aware,
    };
    let here = Side { location: &Location::Local(empty), ssh: remote.ssh };
    crate::relay::compare_locations(remote, &here, &compare, control)
}

/// A local source onto a remote disk or partition: the clone is built here, in a sparse
/// staging image of the remote destination's size (holding only the used blocks), which an fs-aware sync then sends:
/// only the used blocks that differ cross the network, so a rerun moves what changed.
fn clone_to_remote(
    src: &Path,
    dest: &Side<'_>,
    name: &str,
    o: &CloneOptions,
    control: Control<'_>,
) -> Result<CloneSummary> {
    let dir = o.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let mut temps = Vec::new();
    let size = probe_remote(dest, false, (&dir, &mut temps), o, control)?.source_size;
    let src_disk = crate::endpoint::open_source(src)?;
    let used: u64 = crate::endpoint::usage::FsAware::new(src_disk)?.filesystems().iter().map(|r| r.used).sum();
    let staging = temp_file(&dir, "the staging image", used, &mut temps)?;
    set_len(&staging, size)?;
    let local = CloneOptions { temp_dir: Some(dir.clone()), ..o.clone() };
    let mut summary = clone_paths(src, &staging, &local, control)?;
    if o.dry_run {
        summary.destination = name.to_string();
        return Ok(summary);
    }
    let remote = crate::relay::RemoteOptions {
        sync: SyncOptions {
            block_size: o.block_size,
            threads: o.threads,
            force: o.force,
            fs_aware: true,
            ..SyncOptions::default()
        },
        compress: crate::compress::AUTO,
        pause: None,
        undo: None,
    };
    let staged = Side { location: &Location::Local(staging.clone()), ssh: dest.ssh };
    let sent = crate::place::sync(&staged, dest, &remote, control)?;
    summary.destination = sent.destination;
    summary.bytes_written = sent.counters.bytes_written;
    summary.table_written = false;
    for p in &mut summary.partitions {
        // What each partition's sync wrote was written to the staging image, not to the disk.
        p.bytes_written = None;
    }
    summary.temp_dir = Some(std::fs::canonicalize(&dir).unwrap_or(dir).display().to_string());
    summary.warnings.extend(sent.warnings);
    drop(temps);
    Ok(summary)
}

/// Clones local `src` onto local `dst` (see the module doc).
pub fn clone_paths(src: &Path, dst: &Path, o: &CloneOptions, control: Control<'_>) -> Result<CloneSummary> {
    let src_disk = crate::endpoint::open_source(src)?;
    let hint = crate::transfer::table::sector_hint(src_disk.identity(), &src_disk.caps());
    let src_table =
        if blksync_endpoint::partition::split(src).is_none() { blksync_disk::read(&*src_disk, hint)? } else { None };
    let temp = temp_dir(dst, o.temp_dir.as_deref());
    let mut temps = Vec::new();
    let mut warnings = Vec::new();
    let sync_options = SyncOptions {
        block_size: o.block_size,
        threads: o.threads,
        force: o.force,
        fs_aware: true,
        ..SyncOptions::default()
    };
    let mut summary = CloneSummary {
        source: src.display().to_string(),
        destination: dst.display().to_string(),
        table: src_table.as_ref().map(|t| t.label().to_string()),
        dry_run: o.dry_run,
        table_written: false,
        table_kept: false,
        partitions: Vec::new(),
        bytes_written: 0,
        temp_dir: None,
        warnings: Vec::new(),
    };
    let mut ctx = Ctx { temp: &temp, temps: &mut temps, sync: &sync_options, control };
    let jobs = if let Some(table) = &src_table {
        for w in &table.warnings {
            control.observer.warn(w);
            warnings.push(w.clone());
        }
        let (jobs, written, kept) = disk_jobs(table, &*src_disk, (src, dst), o, &mut ctx)?;
        summary.table_written = written > 0;
        summary.table_kept = kept;
        summary.bytes_written += written;
        jobs
    } else {
        // A partition or a filesystem image onto a partition (or onto a disk without table).
        let (disk, start, len) = dest_region(dst)?;
        let probed = probe(&*src_disk, 0, src_disk.size())?;
        let place = Place { number: 0, start, len };
        vec![prepare(&probed, None, src_disk.size(), (src, dst, &disk, place), &mut ctx)?]
    };
    drop(src_disk);
    if !temps.is_empty() {
        summary.temp_dir = Some(std::fs::canonicalize(&temp).unwrap_or_else(|_| temp.clone()).display().to_string());
    }
    if o.dry_run {
        summary.partitions = jobs.into_iter().map(|j| j.report).collect();
        summary.warnings = warnings;
        return Ok(summary);
    }
    for mut job in jobs {
        let s = crate::sync::sync_paths(&job.from, &job.to, &sync_options, control)?;
        job.report.bytes_written = Some(s.counters.bytes_written);
        summary.bytes_written += s.counters.bytes_written;
        // Already shown as they happened, by the sync.
        warnings.extend(s.warnings);
        summary.partitions.push(job.report);
    }
    summary.warnings = warnings;
    drop(temps);
    Ok(summary)
}

/// What preparing the copies needs.
struct Ctx<'a> {
    temp: &'a Path,
    temps: &'a mut Vec<Temp>,
    sync: &'a SyncOptions,
    control: Control<'a>,
}

/// A whole disk: plans the destination's table (or keeps the destination's, by the 446/512
/// rule), prepares every partition's copy, then (the commit begins) writes the boot gap, the
/// gaps between partitions that keep their place, and the table. Returns the jobs, the bytes
/// written, and whether the destination's table was kept.
fn disk_jobs(
    table: &Table,
    src_disk: &dyn Source,
    (src, dst): (&Path, &Path),
    o: &CloneOptions,
    ctx: &mut Ctx<'_>,
) -> Result<(Vec<Job>, u64, bool)> {
    if blksync_endpoint::partition::split(dst).is_some() {
        return Err(Error::usage(format!(
            "{} is a whole disk and {} a partition: clone a disk onto a disk, or name a partition of the source too (SRC#N)",
            src.display(),
            dst.display()
        )));
    }
    if std::fs::canonicalize(src).ok().is_some_and(|s| std::fs::canonicalize(dst).ok() == Some(s)) {
        return Err(Error::usage(format!("{} and {} are the same disk", src.display(), dst.display())));
    }
    let dst_size = target_size(dst)?;
    let dst_sector = {
        let t = crate::endpoint::open_source(dst)?;
        crate::transfer::table::sector_hint(t.identity(), &t.caps())
    };
    if let Some(ss) = dst_sector.filter(|&ss| ss != table.sector_size) {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{} counts its table in sectors of {} bytes and {} has sectors of {ss} bytes: a table cannot be translated (not supported)",
                src.display(),
                table.sector_size,
                dst.display()
            ),
        ));
    }
    // bsync's 446/512 rule: a DOS destination whose table already holds the source's
    // partitions, each at least as large, keeps it (unless --grow asks for a new layout); each
    // partition fills the destination's, and only the boot code (with the disk signature, so
    // PARTUUIDs stay) is written to sector 0.
    let kept = match (&table.scheme, o.grow) {
        (blksync_disk::Scheme::Dos { .. }, None) => {
            let d = crate::endpoint::open_source(dst)?;
            blksync_disk::read(&*d, dst_sector).ok().flatten().filter(|t| blksync_disk::dos_compatible(table, t))
        }
        _ => None,
    };
    let (places, writes) = if let Some(dest) = &kept {
        let places = dest.partitions.iter().map(|p| Place { number: p.number, start: p.start, len: p.len }).collect();
        (places, vec![(0, table.boot_code().to_vec())])
    } else {
        let grow = match o.grow {
            Some(n) => n,
            None => layout::default_grow(table)
                .ok_or_else(|| Error::usage(format!("{}: the table has no partition", src.display())))?,
        };
        let places = layout::plan(table, dst_size, grow)?;
        let writes = table.rebuilt(dst_size, &places)?;
        (places, writes)
    };
    let mut jobs = Vec::new();
    for p in table.partitions.iter().filter(|p| !p.is_extended()) {
        let place = places.iter().find(|q| q.number == p.number).copied().unwrap_or(Place {
            number: p.number,
            start: p.start,
            len: p.len,
        });
        let from = PathBuf::from(format!("{}#{}", src.display(), p.number));
        let to = PathBuf::from(format!("{}#{}", dst.display(), p.number));
        let probed = probe(src_disk, p.start, p.len)?;
        jobs.push(prepare(&probed, Some(p), p.len, (&from, &to, dst, place), ctx)?);
    }
    // The commit begins: the boot gap (GRUB's core.img on a DOS disk, whatever a GPT disk
    // keeps before its first partition) and the table. Sector 0, with its boot code, and the
    // GPT's array are in `writes`; the gap is what follows them.
    let head = table.first_partition_start().unwrap_or(0);
    let table_end = match table.scheme {
        blksync_disk::Scheme::Gpt { entry_lba, entry_count, entry_size, .. } => {
            let ss = u64::from(table.sector_size);
            (entry_lba + (u64::from(entry_count) * u64::from(entry_size)).div_ceil(ss)) * ss
        }
        blksync_disk::Scheme::Dos { .. } => u64::from(table.sector_size),
    };
    if o.dry_run {
        return Ok((jobs, 0, kept.is_some()));
    }
    let target = open_dest(dst, o.force)?;
    let mut written = copy_differing(src_disk, &*target, table_end.min(head), head)?;
    for (from, to) in kept_gaps(table, &places, layout::usable_end(table, dst_size)) {
        written += copy_differing(src_disk, &*target, from, to)?;
    }
    // A DOS extended partition that stays as it is, with its logicals: its EBR chain (all of it
    // outside the logical partitions) is copied in place, so that DST#5 and on are found before
    // their sync. One that moves or changes size gets a new chain, which is in `writes`; a kept
    // destination table keeps its own.
    let chain_moves = kept.is_some() || layout::moves_ebr_chain(table, &places);
    for ext in table.partitions.iter().filter(|p| p.is_extended() && !chain_moves) {
        let mut logicals: Vec<&Partition> = table
            .partitions
            .iter()
            .filter(|p| !p.is_extended() && p.start >= ext.start && p.end() <= ext.end())
            .collect();
        logicals.sort_by_key(|p| p.start);
        let mut at = ext.start;
        for p in logicals.iter().map(|p| (p.start, p.end())).chain([(ext.end(), ext.end())]) {
            written += copy_differing(src_disk, &*target, at, p.0)?;
            at = at.max(p.1);
        }
    }
    // The new EBRs before sector 0 (`rebuilt` puts it last), so that an interrupted commit
    // never leaves sector 0 pointing at a chain that is not there yet.
    for (at, bytes) in &writes {
        written += write_differing(&*target, *at, bytes)?;
    }
    target.flush()?;
    Ok((jobs, written, kept.is_some()))
}

/// The gaps between top-level partitions (primaries, and a DOS extended partition as a whole)
/// that stay where they were: those whose neighbours both keep their place, the one before
/// ending where it did and the one after starting where it did. They are copied like the boot
/// gap; a gap next to a partition that moved or grew has no place to go. Nothing past
/// `usable_end` (a GPT's backup entries) is a gap.
fn kept_gaps(table: &Table, places: &[Place], usable_end: u64) -> Vec<(u64, u64)> {
    let place = |p: &Partition| places.iter().find(|q| q.number == p.number);
    let mut top: Vec<&Partition> = table
        .partitions
        .iter()
        .filter(|p| {
            p.is_extended()
                || !table.partitions.iter().any(|e| e.is_extended() && e.start <= p.start && p.end() <= e.end())
        })
        .collect();
    top.sort_by_key(|p| p.start);
    top.windows(2)
        .filter(|w| w[0].end() < w[1].start && w[1].start <= usable_end)
        .filter(|w| {
            place(w[0]).is_some_and(|q| q.start + q.len == w[0].end())
                && place(w[1]).is_some_and(|q| q.start == w[1].start)
        })
        .map(|w| (w[0].end(), w[1].start))
        .collect()
}

/// Decides (and, for a filesystem or swap area of another size, builds) one partition's copy.
fn prepare(
    probed: &Probed,
    part: Option<&Partition>,
    size_before: u64,
    (from, to, dst_disk, place): (&Path, &Path, &Path, Place),
    ctx: &mut Ctx<'_>,
) -> Result<Job> {
    let number = part.map(|p| p.number);
    let what = number.map_or_else(|| from.display().to_string(), |n| format!("partition {n}"));
    let size_after = place.len;
    let (filesystem, uuid, label) = match &probed.kind {
        Some(Kind::Ext { version, uuid, label, .. }) => {
            (format!("ext{version}"), Some(uuid.clone()), Some(label.clone()))
        }
        Some(Kind::Swap { uuid, label }) => ("swap".to_string(), Some(uuid.clone()), Some(label.clone())),
        None => ("unknown".to_string(), None, None),
    };
    let mut report = PartReport {
        number,
        filesystem,
        uuid,
        label,
        start: place.start,
        size_before,
        size_after,
        action: "copied".into(),
        bytes_written: Some(0),
        detail: String::new(),
    };
    let sizes = format!("{} to {}", format_size(size_before), format_size(size_after));
    let mut job = Job { report: report.clone(), from: from.to_path_buf(), to: to.to_path_buf() };
    match &probed.kind {
        _ if size_after == size_before => {
            report.detail = match &probed.why_whole {
                Some(why) => format!("{} copied whole as it is ({why})", format_size(size_before)),
                None => format!("{} copied ({} used)", format_size(size_before), format_size(probed.used)),
            };
        }
        Some(Kind::Ext { block_size, .. }) => {
            let (copy, min) = resized_ext(
                from,
                &what,
                probed.used,
                u64::from(*block_size),
                (size_before, size_after),
                dst_disk,
                ctx,
            )?;
            if size_after > size_before {
                report.action = "grown".into();
                report.detail = format!("filesystem grown from {sizes} with resize2fs");
            } else {
                report.action = "shrunk".into();
                report.detail = format!(
                    "filesystem shrunk from {sizes} with resize2fs (its data needs at least {})",
                    format_size(min)
                );
            }
            job.from = copy;
        }
        Some(Kind::Swap { uuid, label }) => {
            need_tool("mkswap")?;
            let copy = temp_file(ctx.temp, &what, 1 << 20, ctx.temps)?;
            set_len(&copy, size_after)?;
            let mut cmd = Command::new("mkswap");
            cmd.arg("-U").arg(uuid);
            if !label.is_empty() {
                cmd.arg("-L").arg(label);
            }
            run(cmd.arg(&copy), "mkswap")?;
            report.action = "mkswap".into();
            let how = if size_after > size_before { "grown" } else { "shrunk" };
            report.detail = format!("swap area {how} from {sizes}: made anew by mkswap, UUID and label kept");
            job.from = copy;
        }
        None if size_after > size_before => {
            report.action = "copied-whole".into();
            report.detail = format!(
                "{} copied whole ({}); the partition is {} and the rest of it is left as it is",
                format_size(size_before),
                probed.why_whole.as_deref().unwrap_or("no filesystem recognised"),
                format_size(size_after)
            );
        }
        None => {
            return Err(Error::new(
                ErrorKind::SizeMismatch,
                format!(
                    "{what} ({}) is copied whole ({}) and needs {size_before} bytes ({}); its place on {} has {size_after} bytes ({}); nothing was written",
                    from.display(),
                    probed.why_whole.as_deref().unwrap_or("no filesystem recognised"),
                    format_size(size_before),
                    dst_disk.display(),
                    format_size(size_after)
                ),
            ));
        }
    }
    if size_after == size_before && probed.why_whole.is_some() {
        report.action = "copied-whole".into();
    }
    job.report = report;
    Ok(job)
}

/// A sparse temporary copy of the ext filesystem at `from`, resized to `size_after` bytes, and
/// the minimum size `resize2fs -P` gave (an error before any write when it does not fit).
///
/// Resized on a copy, never on the source, and not on the destination either: resize2fs
/// truncates a regular file to the filesystem's size whatever `?offset=` says, which would cut
/// off the partitions after this one. The destination receives only what differs.
fn resized_ext(
    from: &Path,
    what: &str,
    used: u64,
    block_size: u64,
    (size_before, size_after): (u64, u64),
    dst_disk: &Path,
    ctx: &mut Ctx<'_>,
) -> Result<(PathBuf, u64)> {
    need_tool("resize2fs")?;
    need_tool("e2fsck")?;
    // Room for the used blocks, and for the group metadata a grow adds (inode tables of 256
    // bytes per 16 KiB at mke2fs's defaults: 1/64 of the new space, if resize2fs writes them).
    let grown = size_after.saturating_sub(size_before);
    let copy = temp_file(ctx.temp, what, used + grown / 64, ctx.temps)?;
    crate::sync::sync_paths(from, &copy, ctx.sync, ctx.control)?;
    // Before resize2fs -P, which refuses a journal to replay (a snapshot of a mounted
    // filesystem): e2fsck replays it.
    fsck(&copy)?;
    let min = min_size(&copy)? * block_size;
    if min > size_after {
        return Err(Error::new(
            ErrorKind::SizeMismatch,
            format!(
                "{what} ({}) holds an ext filesystem whose used data needs at least {min} bytes ({}, resize2fs -P), and its place on {} has {size_after} bytes ({}); nothing was written to {}",
                from.display(),
                format_size(min),
                dst_disk.display(),
                format_size(size_after),
                dst_disk.display()
            ),
        ));
    }
    set_len(&copy, size_after.max(size_before))?;
    run(Command::new("resize2fs").arg(&copy).arg(format!("{}s", size_after / 512)), "resize2fs")?;
    set_len(&copy, size_after)?;
    Ok((copy, min))
}

fn probe(source: &dyn Source, start: u64, len: u64) -> Result<Probed> {
    Ok(match blksync_fs::probe(source, start, len)? {
        Usage::Known(map) => {
            Probed { kind: Some(map.kind().clone()), used: map.used_bytes().min(len), why_whole: None }
        }
        Usage::Whole { reason } => Probed { kind: None, used: len, why_whole: Some(reason) },
    })
}

fn io(path: &Path, e: &std::io::Error) -> Error {
    Error::new(ErrorKind::Io, format!("{}: {e}", path.display()))
}

/// Numbers temporary files: unique in the process, since nested steps (a staging copy, then
/// the resized copies of its partitions) each keep their own list.
static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A new temporary file in `dir`, after checking that `dir` has room for `need` bytes.
fn temp_file(dir: &Path, what: &str, need: u64, temps: &mut Vec<Temp>) -> Result<PathBuf> {
    let st = rustix::fs::statvfs(dir).map_err(|e| io(dir, &e.into()))?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    // The copy is sparse: its used blocks, and what resize2fs moves, which stays within them.
    if free < need + need / 8 {
        return Err(Error::new(
            ErrorKind::NoSpace,
            format!(
                "{}: {} free, and the temporary copy of {what} needs about {} (its used blocks); name another directory with --temp-dir",
                dir.display(),
                format_size(free),
                format_size(need + need / 8)
            ),
        ));
    }
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!(".blksync-clone-{}-{n}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&path);
    temps.push(Temp(path.clone()));
    Ok(path)
}

/// Creates `path` if need be and sets its length (sparse).
fn set_len(path: &Path, len: u64) -> Result<()> {
    let f =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(|e| io(path, &e))?;
    f.set_len(len).map_err(|e| io(path, &e))
}

fn need_tool(tool: &str) -> Result<()> {
    match Command::new(tool).arg("-V").output() {
        Ok(_) => Ok(()),
        Err(e) => Err(Error::new(
            ErrorKind::Unsupported,
            format!("{tool} is needed to resize a filesystem and could not be run ({e}); install e2fsprogs/util-linux"),
        )),
    }
}

fn run(cmd: &mut Command, tool: &str) -> Result<String> {
    let out = cmd.output().map_err(|e| Error::new(ErrorKind::Io, format!("{tool}: {e}")))?;
    if !out.status.success() {
        return Err(Error::new(
            ErrorKind::Io,
            format!("{tool} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `resize2fs -P`: the minimum size in blocks.
fn min_size(fs: &Path) -> Result<u64> {
    let out = run(Command::new("resize2fs").arg("-P").arg(fs), "resize2fs -P")?;
    out.lines()
        .find_map(|l| l.strip_prefix("Estimated minimum size of the filesystem:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| Error::new(ErrorKind::Io, format!("resize2fs -P {}: no minimum size in {out:?}", fs.display())))
}

/// `e2fsck -f -p`, which resize2fs wants after a mount: exit 0 and 1 (fixed) are fine.
fn fsck(fs: &Path) -> Result<()> {
    let out = Command::new("e2fsck")
        .arg("-f")
        .arg("-p")
        .arg(fs)
        .output()
        .map_err(|e| Error::new(ErrorKind::Io, format!("e2fsck: {e}")))?;
    match out.status.code() {
        Some(0 | 1) => Ok(()),
        _ => Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "e2fsck -f -p {} failed ({}): {}",
                fs.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim()
            ),
        )),
    }
}

fn open_dest(dst: &Path, force: bool) -> Result<Box<dyn Target>> {
    crate::endpoint::open_target(dst, OpenTarget { create: false, force, ..OpenTarget::default() })
}

fn target_size(dst: &Path) -> Result<u64> {
    let t = crate::endpoint::open_target(dst, OpenTarget { read_only: true, ..OpenTarget::default() })?;
    if !t.exists() {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("{}: no such destination (clone writes onto a disk that is there)", dst.display()),
        ));
    }
    Ok(t.size())
}

/// The disk, start and length of the destination of a partition or filesystem clone.
fn dest_region(dst: &Path) -> Result<(PathBuf, u64, u64)> {
    if let Some((disk, selector)) = blksync_endpoint::partition::split(dst) {
        let d = crate::endpoint::open_source(&disk)?;
        let hint = crate::transfer::table::sector_hint(d.identity(), &d.caps());
        let table = blksync_disk::read(&*d, hint)?
            .ok_or_else(|| Error::usage(format!("{}: no partition table", disk.display())))?;
        let p = table.find(&blksync_disk::Selector::parse(selector)?)?;
        return Ok((disk, p.start, p.len));
    }
    let size = target_size(dst)?;
    let d = crate::endpoint::open_source(dst)?;
    if blksync_disk::read(&*d, None)?.is_some() {
        return Err(Error::usage(format!(
            "{} holds a partition table: name the partition to clone onto (DST#N), or clone a whole disk",
            dst.display()
        )));
    }
    Ok((dst.to_path_buf(), 0, size))
}

const CHUNK: usize = 1 << 20;

/// Copies `[from, to)` of `src` onto `dst` where it differs; the bytes written.
fn copy_differing(src: &dyn Source, dst: &dyn Target, from: u64, to: u64) -> Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0;
    let mut at = from;
    while at < to {
        let n = usize::try_from((to - at).min(CHUNK as u64)).unwrap_or(CHUNK);
        src.read_at(&mut buf[..n], at)?;
        written += write_differing(dst, at, &buf[..n])?;
        at += n as u64;
    }
    Ok(written)
}

/// Writes `bytes` at `at` of `dst` unless they are there already; the bytes written.
fn write_differing(dst: &dyn Target, at: u64, bytes: &[u8]) -> Result<u64> {
    let mut old = vec![0u8; bytes.len()];
    dst.read_at(&mut old, at)?;
    if old == bytes {
        return Ok(0);
    }
    dst.write_at(bytes, at)?;
    Ok(bytes.len() as u64)
}
