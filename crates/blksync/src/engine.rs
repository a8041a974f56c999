//! The local engine: compare two endpoints chunk by chunk and, when syncing, write what differs.
//!
//! ```text
//!  dispatcher ──(chunk + allocation maps)──▶ worker 1 ─┐  read source chunk, read destination
//!   (walks both allocation maps,            worker 2 ─┤  chunk, compare block by block,
//!    skips chunks that are holes on          …        │  write/punch coalesced runs
//!    both sides without reading)                      ▼
//!                                             collector (in order: done prefix, differing ranges)
//! ```
//!
//! Chunks are large (2 MiB) so every read is one big request; the comparison granularity (the
//! block size, 4 KiB by default) only decides how finely differences are found. Both sides are
//! local, so blocks are compared with `memcmp`, not hashed. A chunk that is a hole on the
//! destination is never read there: its blocks are checked against zero instead. Workers share
//! no buffers; memory is `threads × 2 × CHUNK`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::bounded;

use crate::endpoint::{SegmentCursor, Source, Target};
use crate::error::{Error, Result};
use crate::extent::{Extent, Runs};
use crate::progress::{Control, Counters};
use crate::throttle::Throttle;
use crate::write_behind;
use crate::zero::is_zero;

/// Bytes per unit of work: one read per side, at most one write per run.
pub(crate) const CHUNK: usize = 2 << 20;

/// What to do with differences.
#[derive(Clone, Copy)]
pub(crate) enum Action<'a> {
    /// Only find them.
    Compare,
    /// Write them to this target (a recorder, to record them: [`crate::record`]).
    Apply(&'a dyn Target),
}

/// One comparison of `source` against `dest` over `[0, scan_len)`.
pub(crate) struct Scan<'a> {
    pub source: &'a dyn Source,
    /// Bytes of the source that take part; beyond this the source counts as zeros.
    pub source_len: u64,
    pub dest: &'a dyn Source,
    pub scan_len: u64,
    pub block_size: usize,
    pub threads: usize,
    /// `--keep-cache`: nothing read or written is dropped from the page cache.
    pub keep_cache: bool,
    /// Clean pages may stay: the image is small next to memory (`write_behind::cheap_to_keep`).
    /// Densely written stretches are still dropped, which starts their writeback early.
    pub keep_clean: bool,
    pub action: Action<'a>,
    /// How many differing ranges to remember (all are counted).
    pub keep_ranges: usize,
    /// Limits the rate of source reads.
    pub throttle: Option<&'a Throttle>,
    /// Skip what the source's changed-block map says is as it was at its mark (a qemu dirty
    /// bitmap): the destination is the copy made then. Off for a verification, which compares
    /// everything.
    pub trust_changes: bool,
}

/// What a scan found.
#[derive(Debug, Default)]
pub(crate) struct Found {
    /// The first differing ranges, ascending and merged.
    pub ranges: Vec<Extent>,
    /// How many merged differing ranges there are in all.
    pub range_count: u64,
    /// `[0, done)` was fully processed (compared and, when applying, written).
    pub done: u64,
    /// The scan stopped early because it was cancelled.
    pub cancelled: bool,
    /// What the source had to say after it was read (it changed meanwhile).
    pub warnings: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fix {
    Data,
    Zero,
}

struct Work {
    offset: u64,
    len: usize,
    source_data: Vec<Extent>,
    dest_data: Vec<Extent>,
    /// The parts the source's filesystem uses (`--fs-aware`), when not all of the chunk: blocks
    /// outside them are neither compared nor written.
    used: Option<Vec<Extent>>,
}

/// Orders completed chunks to track the done prefix and merge differing ranges across chunk
/// borders.
struct Collector {
    next: u64,
    pending: BTreeMap<u64, (u64, bool, Vec<Extent>)>,
    open: Option<Extent>,
    found: Found,
    keep: usize,
    /// Where the done prefix's part that was read and not yet dropped from the page cache
    /// starts (none: everything done so far was dropped or never read).
    cached: Option<u64>,
    /// The differing ranges are written (not only counted).
    applying: bool,
    /// Bytes written in the part of the done prefix not yet dropped.
    written: u64,
}

/// What leaves the page cache after a chunk completed.
#[derive(Default, Clone, Copy)]
struct Drops {
    source: Option<Extent>,
    dest: Option<Extent>,
    /// The destination's stretch was written (densely), not only read.
    dest_written: bool,
}

impl Collector {
    /// Records a completed chunk (`read`: it was read, and so cached). Returns what of the done
    /// prefix no worker reads again and can leave the cache: the source in ranges of
    /// `write_behind::WINDOW` or more, the destination likewise unless scattered writes went
    /// there. Both are behind every chunk in flight, so a drop never evicts what a worker is
    /// about to read.
    fn complete(&mut self, offset: u64, len: u64, read: bool, diffs: Vec<Extent>) -> Drops {
        self.pending.insert(offset, (len, read, diffs));
        while let Some((len, read, diffs)) = self.pending.remove(&self.next) {
            if read {
                self.cached.get_or_insert(self.next);
            }
            if self.applying {
                self.written += diffs.iter().map(|d| d.len).sum::<u64>();
            }
            for d in diffs {
                match &mut self.open {
                    Some(open) if open.end() == d.offset => open.len += d.len,
                    open => {
                        if let Some(prev) = open.replace(d) {
                            self.close(prev);
                        }
                    }
                }
            }
            self.next += len;
        }
        if matches!(self.cached, Some(start) if self.next - start >= write_behind::WINDOW) {
            return self.take_cached();
        }
        Drops::default()
    }

    /// The read part of the done prefix not yet dropped from the cache, from now on counted as
    /// dropped. The destination's part stays when scattered writes went there
    /// (`write_behind::worth_dropping`).
    fn take_cached(&mut self) -> Drops {
        let Some(start) = self.cached.take() else { return Drops::default() };
        let read = Extent { offset: start, len: self.next - start };
        let written = std::mem::take(&mut self.written);
        Drops {
            source: Some(read),
            dest: write_behind::worth_dropping(read.len, written).then_some(read),
            dest_written: written > 0,
        }
    }

    fn close(&mut self, range: Extent) {
        self.found.range_count += 1;
        if self.found.ranges.len() < self.keep {
            self.found.ranges.push(range);
        }
    }

    fn finish(mut self) -> Found {
        if let Some(open) = self.open.take() {
            self.close(open);
        }
        self.found.done = self.next;
        self.found
    }
}

impl Scan<'_> {
    /// Runs the scan on `threads` workers. Returns the first error any worker hit; on
    /// cancellation returns normally with `cancelled` set.
    pub(crate) fn run(&self, counters: &Counters, control: Control<'_>) -> Result<Found> {
        assert!(self.block_size.is_power_of_two() && self.block_size <= CHUNK);
        let collector = Mutex::new(Collector {
            next: 0,
            pending: BTreeMap::new(),
            open: None,
            found: Found::default(),
            keep: self.keep_ranges,
            cached: None,
            applying: matches!(self.action, Action::Apply(_)),
            written: 0,
        });
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        let stop = AtomicBool::new(false);
        let threads = if self.threads == 0 { crate::sync::default_threads() } else { self.threads };
        let (tx, rx) = bounded::<Work>(threads * 2);

        std::thread::scope(|scope| {
            for _ in 0..threads {
                let rx = rx.clone();
                let (collector, failure, stop) = (&collector, &failure, &stop);
                scope.spawn(move || {
                    let mut bufs = Buffers::new();
                    for work in rx {
                        if stop.load(Ordering::Relaxed) || control.cancelled() {
                            break;
                        }
                        if let Some(throttle) = self.throttle {
                            let bytes = work.source_data.iter().map(|e| e.len).sum();
                            throttle.take(bytes, control.cancel);
                            if control.cancelled() {
                                break;
                            }
                        }
                        let processed =
                            self.process(&work, &mut bufs, counters).map(|diffs| {
                                let done = collector
                                    .lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                                    .complete(work.offset, work.len as u64, true, diffs);
                                self.drop_cache(done);
                            });
                        match processed {
                            Ok(()) => control.observer.progress(&counters.snapshot()),
                            Err(e) => {
                                failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(e);
                                stop.store(true, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                });
            }
            drop(rx);
            if let Err(e) = self.dispatch(&tx, &collector, counters, control, &stop) {
                failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(e);
                stop.store(true, Ordering::Relaxed);
            }
            drop(tx);
        });

        if let Some(e) = failure.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
            return Err(e);
        }
        let mut collector = collector.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        let rest = collector.take_cached();
        self.drop_cache(rest);
        let mut found = collector.finish();
        found.cancelled = found.done < self.scan_len && control.cancelled();
        Ok(found)
    }

    /// Walks the allocation maps of both sides and hands out chunks; chunks that are holes on
    /// both sides are done on the spot.
    fn dispatch(
        &self,
        tx: &crossbeam_channel::Sender<Work>,
        collector: &Mutex<Collector>,
        counters: &Counters,
        control: Control<'_>,
        stop: &AtomicBool,
    ) -> Result<()> {
        let mut source_map = SegmentCursor::new(self.source);
        let mut dest_map = SegmentCursor::new(self.dest);
        let mut usage = crate::endpoint::UsageCursor::new(self.source);
        let mut used = Vec::new();
        // Only a copy of the same size can be the one made at the mark.
        let mut changes = (self.trust_changes
            && self.source.caps().changed_blocks
            && self.source.size() == self.dest.size()
            && self.source_len == self.scan_len)
            .then(|| crate::endpoint::ChangeCursor::new(self.source));
        // A chunk done without reading it.
        let skip = |offset: u64, len: u64| {
            counters.add_scanned(len);
            let done = collector.lock().unwrap_or_else(std::sync::PoisonError::into_inner).complete(
                offset,
                len,
                false,
                Vec::new(),
            );
            self.drop_cache(done);
        };
        let mut offset = 0u64;
        while offset < self.scan_len {
            if stop.load(Ordering::Relaxed) || control.cancelled() {
                break;
            }
            let len = (self.scan_len - offset).min(CHUNK as u64) as usize;
            let end = offset + len as u64;
            if let Some(changes) = &mut changes
                && !changes.any_in(offset, end)?
            {
                // Unchanged since the mark, and so still what the copy holds: not read.
                skip(offset, len as u64);
                offset = end;
                continue;
            }
            usage.used_in(offset, end, &mut used)?;
            if used.is_empty() {
                // Free blocks of the source's filesystem, all of it (`--fs-aware`): nobody
                // needs them, so the destination keeps what it holds.
                skip(offset, len as u64);
                offset = end;
                continue;
            }
            let partly = !matches!(used.as_slice(), [only] if only.offset == offset && only.end() == end);
            let mut source_data = Vec::new();
            source_map.allocated_in(offset, end.min(self.source_len), &mut source_data)?;
            let mut dest_data = Vec::new();
            dest_map.allocated_in(offset, end, &mut dest_data)?;
            if partly {
                // What is unused on the source is not worth reading on the destination either.
                dest_data = crate::extent::overlap(&dest_data, &used);
            }
            let used = partly.then(|| used.clone());
            if source_data.is_empty() && dest_data.is_empty() {
                // Zeros on both sides: nothing to read, nothing to do.
                skip(offset, len as u64);
                control.observer.progress(&counters.snapshot());
            } else if tx.send(Work { offset, len, source_data, dest_data, used }).is_err() {
                // Every worker stopped (an error or a cancel); they say why.
                break;
            }
            offset = end;
        }
        Ok(())
    }

    /// Compares one chunk and applies the differences. Returns the differing ranges.
    fn process(&self, work: &Work, bufs: &mut Buffers, counters: &Counters) -> Result<Vec<Extent>> {
        let len = work.len;
        let src = &mut bufs.source[..len];
        let read = fill(self.source, src, work.offset, &work.source_data)?;
        counters.add_read_source(read);
        let dest_is_zero = work.dest_data.is_empty();
        let dst = &mut bufs.dest[..len];
        if !dest_is_zero {
            let read = fill(self.dest, dst, work.offset, &work.dest_data)?;
            counters.add_read_destination(read);
        }

        let runs = &mut bufs.runs;
        runs.clear();
        let mut unused = work.used.as_ref().map(|used| {
            crate::extent::gaps(Extent { offset: work.offset, len: len as u64 }, used).into_iter().peekable()
        });
        let mut start = 0;
        while start < len {
            let end = (start + self.block_size).min(len);
            if let Some(gaps) = &mut unused {
                let (a, b) = (work.offset + start as u64, work.offset + end as u64);
                while gaps.next_if(|g| g.end() <= a).is_some() {}
                if gaps.peek().is_some_and(|g| g.offset <= a && b <= g.end()) {
                    // Free on the source's filesystem: not compared, not written.
                    start = end;
                    continue;
                }
            }
            let s = &src[start..end];
            let fix = if dest_is_zero {
                (!is_zero(s)).then_some(Fix::Data)
            } else if s == &dst[start..end] {
                None
            } else if is_zero(s) {
                Some(Fix::Zero)
            } else {
                Some(Fix::Data)
            };
            if let Some(fix) = fix {
                runs.push(fix, start as u64, (end - start) as u64);
            }
            start = end;
        }

        let mut diffs = Vec::with_capacity(runs.len());
        for &(fix, run) in runs.iter() {
            let at = work.offset + run.offset;
            counters.add_differing(run.len);
            if let Action::Compare = self.action {
                // What a sync would write and zero (`sync -n`, and `compare`'s counters), as the
                // remote pass counts it.
                if fix == Fix::Zero {
                    counters.add_zeroed(run.len);
                } else {
                    counters.add_written(run.len);
                }
            }
            if let Action::Apply(target) = self.action {
                // What the destination held there goes along: a recorder needs it, and it was
                // just read.
                let range = run.offset as usize..run.end() as usize;
                let old = (!dest_is_zero).then(|| &dst[range.clone()]);
                match fix {
                    Fix::Data => {
                        target.overwrite(Some(&src[range]), at, run.len, old)?;
                        counters.add_written(run.len);
                    }
                    Fix::Zero => {
                        target.overwrite(None, at, run.len, old)?;
                        counters.add_zeroed(run.len);
                    }
                }
            }
            match diffs.last_mut() {
                Some(last) if Extent::end(last) == at => last.len += run.len,
                _ => diffs.push(Extent { offset: at, len: run.len }),
            }
        }
        counters.add_scanned(len as u64);
        Ok(diffs)
    }

    /// Drops what the sides cached of parts of the done prefix, unless asked to keep it.
    fn drop_cache(&self, drops: Drops) {
        if self.keep_cache {
            return;
        }
        if let Some(range) = drops.source.filter(|r| r.len > 0 && !self.keep_clean) {
            self.source.drop_cache(range.offset, range.len);
        }
        if let Some(range) = drops.dest.filter(|r| r.len > 0 && (drops.dest_written || !self.keep_clean)) {
            self.dest.drop_cache(range.offset, range.len);
        }
    }
}

struct Buffers {
    /// Page-aligned: reads into misaligned memory cost up to five times more (`crate::buffer`).
    source: crate::buffer::Aligned,
    dest: crate::buffer::Aligned,
    runs: Runs<Fix>,
}

impl Buffers {
    fn new() -> Buffers {
        Buffers {
            source: crate::buffer::Aligned::new(CHUNK),
            dest: crate::buffer::Aligned::new(CHUNK),
            runs: Runs::new(),
        }
    }
}

/// Reads the allocated parts of `[offset, offset + buf.len())` into `buf` and zeroes the rest.
/// Everything from the first allocated byte to the last is read in one request (holes in between
/// read as zeros), so a fragmented map does not turn into many small reads. Returns the bytes
/// read.
pub(crate) fn fill(from: &dyn Source, buf: &mut [u8], offset: u64, data: &[Extent]) -> Result<u64> {
    let (Some(first), Some(last)) = (data.first(), data.last()) else {
        buf.fill(0);
        return Ok(0);
    };
    let a = (first.offset - offset) as usize;
    let b = (last.end() - offset) as usize;
    buf[..a].fill(0);
    buf[b..].fill(0);
    from.read_at(&mut buf[a..b], first.offset)?;
    Ok((b - a) as u64)
}
