//! `prune`: fold a chain's oldest increments into its base, in place, crash-safe at every step
//! (docs/DELTA-FORMAT.md, "Pruning in place").
//!
//! Writing a second, complete base needed free space for a whole image, exactly when a user is
//! pruning because the disk is full. Instead the base is changed where it lies, with a journal
//! of what it overwrites, so the room needed is on the order of the increments folded:
//!
//! 1. `prune.journal`: the base's current content under every range the folded increments
//!    change (and a tail a shrink cuts), as a committed delta (fsynced, renamed).
//! 2. The new content is written into the base image, which is then fsynced.
//! 3. Content hashes and metadata of the new base (`base-M-<id of point M>.sums`, `.delta`).
//! 4. The commit: the image is renamed `base-N-…img` → `base-M-…img` (and the directory fsynced).
//! 5. The folded increments, the old metadata and hashes, and the journal are removed.
//!
//! A journal found later means a prune died: before step 4 (the old name still exists) the
//! journal rolls the base back and the new metadata goes; after it, the clean-up is finished.
//! Whoever opens the chain next does this first (`recover`). Readers hold a shared lock on
//! `.base-lock` and a prune an exclusive one, so nobody reads a base that is being changed.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::chain::{Chain, base_paths, increment_path};
use crate::delta::{Delta, Header, Kind, Writer};
use crate::endpoint::Source;
use crate::endpoint::Target;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::progress::{Control, Counters, Phase};
use crate::record::DiffOptions;
use crate::sums::Sums;

/// The journal's name in the chain's directory.
pub const JOURNAL: &str = "prune.journal";
/// Bytes handled per step (a record of the journal, a write into the base).
const PIECE: u64 = 4 << 20;

/// What `prune` did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PruneSummary {
    /// Increments folded into the new base.
    pub folded: u64,
    /// Number of the point the base now holds.
    pub base_number: u64,
    /// Increments left.
    pub kept: u64,
}

/// Folds the oldest increments of the chain in `dir` into its base, keeping `keep` increments.
#[allow(clippy::too_many_lines)] // The steps of the module doc, in order, read best in one place.
pub fn prune(dir: &Path, keep: u64, options: &DiffOptions, control: Control<'_>) -> Result<PruneSummary> {
    let _lock = crate::chain::lock(dir)?;
    crate::store::clean(dir);
    let _base = crate::chain::lock_base(dir, true)?;
    recover(dir)?;
    let chain = crate::store::load_unlocked(dir)?;
    chain.check_whole()?;
    let total = chain.increments.len() as u64;
    if total <= keep {
        return Ok(PruneSummary { folded: 0, base_number: chain.base_number, kept: total });
    }
    let fold = (total - keep) as usize;
    let last = &chain.increments[fold - 1];
    // Everything is checked before the base is touched: a damaged increment or base is refused,
    // never folded forward (costs one read of the base and of the folded increments).
    chain.verify(last.seq, false)?;
    if chain.sums()?.is_some() {
        chain.verify_base()?;
    }
    // The increments alone: the base is read on its own below, then rewritten in place.
    let image = chain.changes(last.seq)?;
    let (old_size, new_size) = (chain.base.header.size_after, image.size());
    let mut ranges = image.changed();
    if new_size < old_size {
        ranges.push((new_size, old_size));
    }
    let counters = Counters::new();
    counters.set_total(ranges.iter().map(|(s, e)| e - s).sum::<u64>() * 2);
    control.observer.phase(Phase::Sync, counters.snapshot().bytes_total);
    let throttle = options.bwlimit.map(crate::throttle::Throttle::new);
    let take = |n: usize| {
        if let Some(t) = &throttle {
            t.take(n as u64, control.cancel);
        }
    };
    let cancelled = || {
        control.cancelled().then(|| {
            Error::new(ErrorKind::Interrupted, "interrupted: nothing was pruned; a rerun starts over".to_string())
        })
    };

    // 1. The journal of what the base holds under the changes.
    let sums = chain.sums()?;
    let base = chain.open_base()?;
    let journal_path = dir.join(JOURNAL);
    let journal = Writer::create(&journal_path, &journal_header(&chain, &last.delta.header, last.seq))?;
    let mut buf = crate::buffer::Aligned::new(PIECE as usize);
    for &(start, end) in &ranges {
        let mut pos = start;
        while pos < end.min(old_size) {
            if let Some(e) = cancelled() {
                journal.abandon();
                return Err(e);
            }
            let n = (end.min(old_size) - pos).min(PIECE) as usize;
            take(n);
            match &sums {
                Some(s) => crate::sums::read_checked(s, (&chain.base_image, None), base.as_ref(), &mut buf[..n], pos)?,
                None => base.read_at(&mut buf[..n], pos)?,
            }
            let kind = if crate::zero::is_zero(&buf[..n]) { Kind::Zeros } else { Kind::Data };
            journal.record(kind, pos, n as u32, &buf[..n], None)?;
            counters.add_scanned(n as u64);
            control.observer.progress(&counters.snapshot());
            pos += n as u64;
        }
    }
    journal.commit()?;
    // A compressed base takes one writer and no reader besides.
    drop(base);

    // 2. The new content, in place. From here on the journal is the way back.
    let mut fold_in = || -> Result<()> {
        let file = BaseWriter::open(&chain.base_image)?;
        if new_size > old_size {
            file.set_len(&chain.base_image, new_size)?;
        }
        for &(start, end) in ranges.iter().filter(|(s, _)| *s < new_size) {
            let mut pos = start;
            while pos < end.min(new_size) {
                if let Some(e) = cancelled() {
                    return Err(e);
                }
                let n = (end.min(new_size) - pos).min(PIECE) as usize;
                take(n);
                image.read_changed(&mut buf[..n], pos)?;
                file.write(&chain.base_image, &buf[..n], pos)?;
                counters.add_scanned(n as u64);
                counters.add_written(n as u64);
                control.observer.progress(&counters.snapshot());
                pos += n as u64;
            }
        }
        if new_size < old_size {
            file.set_len(&chain.base_image, new_size)?;
        }
        file.sync(&chain.base_image)
    };
    if let Err(e) = fold_in() {
        // Half-folded (an interruption, a full disk, an I/O error): the journal puts the base
        // back as it was, so the chain is exactly what it was before the prune.
        return Err(match recover(dir) {
            Ok(()) => e,
            Err(r) => Error::new(
                r.kind(),
                format!("{e}; the base could not be rolled back yet ({r}); the next command on the chain retries"),
            ),
        });
    }
    drop(image);

    // 3. Hashes and metadata of the new base, 4. the commit, 5. the clean-up.
    commit(&chain, &last.delta.header, last.seq, &ranges, sums, options.threads)?;
    Ok(PruneSummary { folded: fold as u64, base_number: last.seq, kept: keep })
}

/// The journal's header (see the module doc): from the old base to point `number`, whose
/// increment's header is `last`.
fn journal_header(chain: &Chain, last: &Header, number: u64) -> Header {
    Header {
        size_before: last.size_after,
        size_after: chain.base.header.size_after,
        parent: chain.base.header.id,
        source: format!("prune {} {number}", chain.base_number),
        comment: "prune journal: the base's content before the fold".into(),
        ..last.clone()
    }
}

/// Steps 3 to 5: the new base's hashes (updated where the fold changed it) and metadata, the
/// rename that commits, and the clean-up. `header` is the last folded increment's.
fn commit(
    chain: &Chain,
    header: &Header,
    number: u64,
    ranges: &[(u64, u64)],
    sums: Option<Sums>,
    threads: usize,
) -> Result<()> {
    let dir = chain.dir.as_path();
    let (old_size, new_size) = (chain.base.header.size_after, header.size_after);
    let new_id = header.id;
    let (new_image, new_meta) = base_paths(dir, number, &new_id);
    let reread = crate::chain::open_base_file(&chain.base_image)?;
    let mut sums = match sums {
        Some(mut s) => {
            s.resize(new_size);
            for &(start, end) in ranges {
                s.update(reread.as_ref(), start.min(new_size), end.min(new_size))?;
            }
            // The block that holds the shorter end changed length (verified with the whole base
            // before the fold, so no damage is hashed in).
            if old_size != new_size {
                let edge = old_size.min(new_size).saturating_sub(1);
                s.update(reread.as_ref(), edge, (edge + 1).min(new_size))?;
            }
            s
        }
        None => Sums::compute(reread.as_ref(), new_id, threads.max(1))?,
    };
    sums.id = new_id;
    sums.store(&crate::sums::path_for(&new_image))?;
    Writer::create(&new_meta, &Header { size_before: 0, ..header.clone() })?.commit()?;
    crate::temp::commit(&chain.base_image, &new_image)?;
    finish(dir, (chain.base_number, &chain.base.header.id), number)?;
    Ok(())
}

/// The base, opened to be rewritten in place: a raw file, or a compressed image (which keeps
/// its own crash safety: a commit at a time, each atomic).
enum BaseWriter {
    Raw(File),
    Compressed(Box<blksync_image::Image>),
}

impl BaseWriter {
    fn open(path: &Path) -> Result<BaseWriter> {
        if blksync_image::is_image(path)? {
            return Ok(BaseWriter::Compressed(Box::new(blksync_image::Image::open(path, true)?)));
        }
        Ok(BaseWriter::Raw(std::fs::OpenOptions::new().write(true).open(path).on("opening", path)?))
    }

    fn set_len(&self, path: &Path, size: u64) -> Result<()> {
        match self {
            BaseWriter::Raw(file) => file.set_len(size).on("resizing", path),
            BaseWriter::Compressed(image) => image.set_size(size),
        }
    }

    /// Writes `data` at `offset`; zeros become a hole.
    fn write(&self, path: &Path, data: &[u8], offset: u64) -> Result<()> {
        match self {
            BaseWriter::Raw(file) => write_or_punch(file, path, data, offset),
            BaseWriter::Compressed(image) if crate::zero::is_zero(data) => image.zero(offset, data.len() as u64),
            BaseWriter::Compressed(image) => image.write_at(data, offset),
        }
    }

    /// Makes it durable (an image commits).
    fn sync(&self, path: &Path) -> Result<()> {
        match self {
            BaseWriter::Raw(file) => file.sync_all().on("flushing", path),
            BaseWriter::Compressed(image) => image.flush(),
        }
    }
}

/// Writes `data` at `offset` of the base, punching a hole where it is all zeros (the base stays
/// sparse); writes the zeros where the filesystem cannot punch.
fn write_or_punch(file: &File, path: &Path, data: &[u8], offset: u64) -> Result<()> {
    if crate::zero::is_zero(data) {
        let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        if rustix::fs::fallocate(file, flags, offset, data.len() as u64).is_ok() {
            return Ok(());
        }
    }
    file.write_all_at(data, offset).map_err(|e| Error::io("writing", path, Some(offset), e))
}

/// Removes what a committed fold left behind: the folded increments (numbered up to `new`), the
/// old base's metadata and hashes, and the journal.
fn finish(dir: &Path, (old, old_id): (u64, &[u8; 16]), new: u64) -> Result<()> {
    let remove = |p: &Path| match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("removing", p, None, e)),
        _ => Ok(()),
    };
    // Oldest first, so that a crash in between leaves a chain the loader still understands.
    for seq in old + 1..=new {
        remove(&increment_path(dir, seq))?;
    }
    let (old_image, old_meta) = base_paths(dir, old, old_id);
    remove(&old_meta)?;
    remove(&crate::sums::path_for(&old_image))?;
    remove(&dir.join(JOURNAL))?;
    File::open(dir).and_then(|d| d.sync_all()).on("flushing directory", dir)
}

/// Finishes or undoes a prune that died, if `dir` holds its journal. The caller holds the
/// chain's lock and the base's exclusive lock.
pub fn recover(dir: &Path) -> Result<()> {
    let path = dir.join(JOURNAL);
    if !path.exists() {
        return Ok(());
    }
    let journal = Delta::open(&path)?;
    let h = &journal.header;
    let numbers: Vec<u64> =
        h.source.strip_prefix("prune ").unwrap_or_default().split(' ').filter_map(|n| n.parse().ok()).collect();
    let [old, new] = numbers[..] else {
        return Err(Error::new(ErrorKind::Corrupt, format!("{}: not a prune journal", path.display())));
    };
    let (old_image, _) = base_paths(dir, old, &h.parent);
    let (new_image, new_meta) = base_paths(dir, new, &h.id);
    if old_image.exists() {
        // Died before the commit: put the old content back and forget the new base.
        let file = BaseWriter::open(&old_image)?;
        if let BaseWriter::Compressed(_) = file {
            // An image takes no write past its end: its old size first.
            file.set_len(&old_image, h.size_after)?;
        }
        for entry in &journal.index {
            let record = journal.read(entry)?;
            let data = match entry.kind {
                Kind::Data => record.data,
                Kind::Zeros => vec![0; entry.len as usize],
            };
            file.write(&old_image, &data, entry.offset)?;
        }
        file.set_len(&old_image, h.size_after)?;
        file.sync(&old_image)?;
        for p in [new_meta, crate::sums::path_for(&new_image)] {
            let _ = std::fs::remove_file(p);
        }
        std::fs::remove_file(&path).on("removing", &path)?;
        File::open(dir).and_then(|d| d.sync_all()).on("flushing directory", dir)
    } else if new_image.exists() {
        // Died after the commit: finish the clean-up.
        finish(dir, (old, &h.parent), new)
    } else {
        Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "{}: a prune was interrupted, and neither {} nor {} exists",
                path.display(),
                old_image.display(),
                new_image.display()
            ),
        ))
    }
}

/// The chain in `dir` for reading: shared lock on the base (a prune is not changing it), an
/// interrupted prune repaired first.
pub fn open_for_reading(dir: &Path) -> Result<Option<Chain>> {
    if dir.join(JOURNAL).exists() {
        // Repairing writes the base: that takes what a prune takes.
        let lock = crate::chain::lock(dir)?;
        let base = crate::chain::lock_base(dir, true)?;
        recover(dir)?;
        drop((base, lock));
    }
    let shared = crate::chain::lock_base(dir, false)?;
    let chain = Chain::load(dir)?;
    Ok(chain.map(|mut c| {
        c.reading = shared.map(Arc::new);
        c
    }))
}

/// The path of the journal in `dir`.
#[must_use]
pub fn journal_path(dir: &Path) -> PathBuf {
    dir.join(JOURNAL)
}
