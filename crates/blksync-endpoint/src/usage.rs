//! `--fs-aware` (docs/FILESYSTEMS.md, "Where it applies"): a source seen through its
//! filesystems, in which the free blocks of each recognised filesystem read as zeros, are
//! reported as holes and are marked unused ([`Source::usage_at`]), so that a copy neither reads,
//! sends nor writes them.
//!
//! Why a view and not a list handed to the engine: every reader of the source then agrees
//! without knowing about filesystems. The allocation map skips the free blocks (nothing reads
//! them), a hash of a block that is partly free covers zeros there on every run (so it
//! converges), and a fresh copy keeps them as holes. Only the writers ask [`Source::usage_at`],
//! to leave the destination's bytes in free blocks alone instead of zeroing them.
//!
//! Regions: a disk with a partition table is probed partition by partition; the table itself,
//! the gaps between partitions (boot code, GRUB's core.img), a DOS extended partition's EBRs and
//! anything not recognised are used. A disk without a table, a partition (`DISK#N`) or a
//! filesystem image is probed whole. Bytes past a filesystem's end inside its region are used:
//! an md superblock or a filesystem that was shrunk without its partition may live there.

use std::fmt::Write as _;
use std::path::Path;

use blksync_core::endpoint::{Caps, FsRegion, Identity, Segment, Source};
use blksync_core::{Error, Result};
use blksync_fs::{Kind, Map, Usage};

/// Free gaps shorter than this between used runs are read across (and still read as zeros).
const MERGE: u64 = 64 << 10;

/// Opens the source at `address`, seen through its filesystems when `fs_aware`.
pub fn open(address: &Path, fs_aware: bool) -> Result<Box<dyn Source>> {
    let source = crate::open_source(address)?;
    Ok(if fs_aware { Box::new(FsAware::new(source)?) } else { source })
}

/// A source whose filesystems' free blocks are unused.
pub struct FsAware {
    inner: Box<dyn Source>,
    /// Ascending, disjoint; bytes outside every region are used.
    regions: Vec<Region>,
}

struct Region {
    start: u64,
    end: u64,
    /// `None`: used whole.
    map: Option<Map>,
    report: FsRegion,
}

impl FsAware {
    /// Probes `inner` (its partition table, then each partition's filesystem, or the whole
    /// source). Fails only when reading fails or the table is damaged (an error that says which
    /// part).
    pub fn new(inner: Box<dyn Source>) -> Result<FsAware> {
        let size = inner.size();
        let hint = matches!(inner.identity(), Identity::Device { .. }).then(|| inner.caps().block_size);
        let spans: Vec<(u64, u64)> = match blksync_disk::read(&*inner, hint)? {
            Some(table) => {
                table.partitions.iter().filter(|p| !p.is_extended() && p.len > 0).map(|p| (p.start, p.len)).collect()
            }
            None => vec![(0, size)],
        };
        let mut regions = Vec::with_capacity(spans.len());
        for (start, len) in spans {
            let len = len.min(size.saturating_sub(start));
            if len == 0 {
                continue;
            }
            let (map, report) = match blksync_fs::probe(&*inner, start, len)? {
                Usage::Known(map) => {
                    let (filesystem, mut detail) = describe(map.kind());
                    let replayed = map.replayed_blocks();
                    if replayed > 0 {
                        // A snapshot of a mounted filesystem: the copy replays the journal.
                        let _ = write!(detail, ", read through the {replayed} blocks its journal replays");
                    }
                    let used = map.used_bytes().min(len);
                    let report = FsRegion { start, len, filesystem: Some(filesystem), detail, used, whole: None };
                    (Some(map), report)
                }
                Usage::Whole { reason } => (
                    None,
                    FsRegion { start, len, filesystem: None, detail: String::new(), used: len, whole: Some(reason) },
                ),
            };
            regions.push(Region { start, end: start + len, map, report });
        }
        regions.sort_by_key(|r| r.start);
        if regions.iter().any(|r| r.map.is_some()) {
            inner.read_sparsely();
        }
        Ok(FsAware { inner, regions })
    }

    /// The region holding `offset`, or where the next one starts.
    fn region(&self, offset: u64) -> std::result::Result<&Region, u64> {
        let i = self.regions.partition_point(|r| r.end <= offset);
        match self.regions.get(i) {
            Some(r) if r.start <= offset => Ok(r),
            Some(r) => Err(r.start),
            None => Err(self.inner.size().max(offset + 1)),
        }
    }
}

fn describe(kind: &Kind) -> (String, String) {
    let detail = |uuid: &str, label: &str| {
        if label.is_empty() { format!("UUID {uuid}") } else { format!("UUID {uuid}, label \"{label}\"") }
    };
    match kind {
        Kind::Ext { version, uuid, label, .. } => (format!("ext{version}"), detail(uuid, label)),
        Kind::Swap { uuid, label } => ("swap".to_string(), detail(uuid, label)),
    }
}

impl Source for FsAware {
    fn name(&self) -> &Path {
        self.inner.name()
    }

    fn exists(&self) -> bool {
        self.inner.exists()
    }

    fn caps(&self) -> Caps {
        // Free blocks are holes here, and the view's holes are its own: a changed-block map
        // of the device below would not know them.
        Caps { holes: true, changed_blocks: false, unused_blocks: true, ..self.inner.caps() }
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64).ok_or_else(|| {
            Error::usage(format!("{}: a read at byte offset {offset} overflows", self.name().display()))
        })?;
        // The used runs, with free gaps shorter than `MERGE` read across: one request instead
        // of many small ones costs less than the few free bytes it reads. The gaps still read
        // as zeros.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut free: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (run_end, used) = self.usage_at(pos)?;
            let stop = run_end.min(end);
            if used {
                match runs.last_mut() {
                    Some(last) if pos - last.1 < MERGE => last.1 = stop,
                    _ => runs.push((pos, stop)),
                }
            } else {
                free.push((pos, stop));
            }
            pos = stop;
        }
        let at = |a: u64, b: u64| (a - offset) as usize..(b - offset) as usize;
        if runs.len() > 1 {
            // The kernel reads them all at once, instead of one after the other as asked.
            for &(a, b) in &runs {
                self.inner.prefetch(a, b - a);
            }
        }
        let mut done = offset;
        for &(a, b) in &runs {
            buf[at(done, a)].fill(0);
            self.inner.read_at(&mut buf[at(a, b)], a)?;
            done = b;
        }
        buf[at(done, end)].fill(0);
        for (a, b) in free {
            buf[at(a, b)].fill(0);
        }
        Ok(())
    }

    fn segment_at(&self, offset: u64) -> Result<Segment> {
        let (run_end, used) = self.usage_at(offset)?;
        if !used {
            return Ok(Segment { start: offset, end: run_end.min(self.size()), allocated: false });
        }
        let inner = self.inner.segment_at(offset)?;
        Ok(Segment { start: offset, end: inner.end.min(run_end), allocated: inner.allocated })
    }

    fn drop_cache(&self, offset: u64, len: u64) {
        self.inner.drop_cache(offset, len);
    }

    fn identity(&self) -> Identity {
        self.inner.identity()
    }

    fn check_intact(&self) -> Result<()> {
        self.inner.check_intact()
    }

    fn mode(&self) -> Option<u32> {
        self.inner.mode()
    }

    fn usage_at(&self, offset: u64) -> Result<(u64, bool)> {
        let region = match self.region(offset) {
            Ok(region) => region,
            Err(next) => return Ok((next, true)),
        };
        let Some(map) = &region.map else { return Ok((region.end, true)) };
        let relative = offset - region.start;
        if relative >= map.len() {
            return Ok((region.end, true));
        }
        let (end, used) = map.state_at(&*self.inner, relative)?;
        Ok(((region.start + end).min(region.end).max(offset + 1), used))
    }

    fn filesystems(&self) -> Vec<FsRegion> {
        self.regions.iter().map(|r| r.report.clone()).collect()
    }

    fn warnings(&self, after_reading: bool) -> Vec<String> {
        self.inner.warnings(after_reading)
    }

    fn close(self: Box<Self>) -> Result<()> {
        self.inner.close()
    }
}
