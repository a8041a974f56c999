//! Endpoints: where bytes live.
//!
//! The engine never touches a file descriptor. It asks a [`Source`] for its size, its allocation
//! map and its bytes, and tells a [`Target`] to write, zero, resize and flush. Local files and
//! block devices implement both (`blksync_endpoint::local::Local`); a remote agent, NBD or iSCSI export plugs in
//! the same way. A source has no write methods at all: "the source is never written" holds by
//! construction.

pub mod memory;

/// The result of a command after its endpoints were closed: the command's own error first; a
/// failed close (a snapshot left behind) turns success into an error that says what did
/// complete (`done`).
pub fn after_close<T>(result: crate::Result<T>, closed: crate::Result<()>, done: &str) -> crate::Result<T> {
    let value = result?;
    closed.map_err(|e| crate::Error::new(e.kind(), format!("{e} ({done})")))?;
    Ok(value)
}

/// Reports a cleanup that failed where no caller can be told (a `Drop`): on stderr, which a
/// remote agent's client shows too. Explicit closes return the error instead.
pub fn report_cleanup_failure(e: &crate::Error) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "blksync: warning: {e}");
}

use std::path::Path;

use crate::error::Result;

/// What an endpoint can do. The size policy, zero handling and the wire read these, not the
/// endpoint's kind, so that a new kind (an NBD export, an iSCSI LUN) says what it can do and the
/// rest follows. Every default is the answer that is never wrong: not resizable, no holes
/// reported (everything reads as allocated), zeroing by writing zeros, no discard, no changed
/// blocks, contents that may change, and 4096-byte alignment (enough for 512- and 4096-byte
/// devices alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)] // One flag per ability, as the NBD and SCSI flags are.
pub struct Caps {
    /// `set_size` works (files; never devices, LUNs or NBD exports).
    pub resizable: bool,
    /// `segment_at` can report holes (`SEEK_DATA`, NBD `base:allocation`, a thin LV).
    pub holes: bool,
    /// `zero` is cheap (a punched hole, `ZERO_RANGE`, write-zeroes offload), not written zeros.
    pub zero_offload: bool,
    /// A discard is guaranteed to read back as zeros afterwards (`--discard` may be used).
    pub discard_zeroes: bool,
    /// The endpoint can list the blocks changed since a mark (changed-block tracking).
    pub changed_blocks: bool,
    /// The contents cannot change while it is open (a backup point, an LV snapshot).
    pub stable: bool,
    /// Some blocks are unused (`--fs-aware`: a filesystem's free blocks). They read as zeros
    /// here, and a copy leaves the destination's bytes there as they were, so what was read is
    /// not what the copy holds: no fingerprint of the copy is taken from the reads.
    pub unused_blocks: bool,
    /// A write costs CPU, not just a copy (a compressed image compresses the chunk it goes
    /// into): whoever applies many writes should spread them over its cores. Not on the wire:
    /// only the endpoint's own host acts on it.
    pub costly_writes: bool,
    /// Logical block size: what I/O should be aligned to.
    pub block_size: u32,
}

impl Default for Caps {
    fn default() -> Caps {
        Caps::NEVER_WRONG
    }
}

impl Caps {
    /// The answers that are never wrong (the default).
    pub const NEVER_WRONG: Caps = Caps {
        resizable: false,
        holes: false,
        zero_offload: false,
        discard_zeroes: false,
        changed_blocks: false,
        stable: false,
        unused_blocks: false,
        costly_writes: false,
        block_size: 4096,
    };

    /// In words, for `--verbose`: "holes, zero offload, block 512" ("no abilities" when none).
    #[must_use]
    pub fn words(&self) -> String {
        let names = [
            (self.resizable, "resizable"),
            (self.holes, "holes"),
            (self.zero_offload, "zero offload"),
            (self.discard_zeroes, "discard zeroes"),
            (self.changed_blocks, "changed blocks"),
            (self.stable, "stable"),
            (self.unused_blocks, "unused blocks"),
        ];
        let mut words: Vec<String> = names.iter().filter(|(on, _)| *on).map(|(_, name)| (*name).to_string()).collect();
        words.push(format!("block {}", self.block_size));
        words.join(", ")
    }

    /// Bits on the wire (docs/PROTOCOL.md, `Opened.caps`).
    #[must_use]
    pub fn to_bits(self) -> u32 {
        [
            self.resizable,
            self.holes,
            self.zero_offload,
            self.discard_zeroes,
            self.changed_blocks,
            self.stable,
            self.unused_blocks,
        ]
        .iter()
        .enumerate()
        .fold(0, |bits, (i, &on)| bits | (u32::from(on) << i))
    }

    /// From the wire; unknown bits are ignored (a newer peer's abilities this one cannot use).
    #[must_use]
    pub fn from_bits(bits: u32, block_size: u32) -> Caps {
        let on = |i: u32| bits & (1 << i) != 0;
        Caps {
            resizable: on(0),
            holes: on(1),
            zero_offload: on(2),
            discard_zeroes: on(3),
            changed_blocks: on(4),
            stable: on(5),
            unused_blocks: on(6),
            costly_writes: false,
            block_size: if block_size.is_power_of_two() && (512..=1 << 20).contains(&block_size) {
                block_size
            } else {
                4096
            },
        }
    }
}

/// A stretch of an endpoint that is either allocated (may hold data) or a hole (reads as zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// False for a hole, which reads as zeros without touching the disk.
    pub allocated: bool,
}

/// One region of an `--fs-aware` source, as [`Source::filesystems`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FsRegion {
    /// First byte, in the source.
    pub start: u64,
    /// Bytes.
    pub len: u64,
    /// What is there: `"ext4"`, `"swap"`, or `null` when nothing was recognised.
    pub filesystem: Option<String>,
    /// UUID and label of what was recognised, for the summary (`UUID 5f3…, label "root"`).
    pub detail: String,
    /// Bytes the filesystem uses, and so copies: all of `len` for a region copied whole.
    pub used: u64,
    /// Why the region is copied whole (`null` when only its used blocks are): never wrong.
    pub whole: Option<String>,
}

/// Identifies the object behind an endpoint, to refuse syncing something onto itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// A file: device and inode numbers.
    File {
        /// `st_dev`.
        dev: u64,
        /// `st_ino`.
        ino: u64,
    },
    /// A block device: its device number.
    Device {
        /// `st_rdev`.
        rdev: u64,
    },
    /// Nothing there yet.
    None,
}

/// A readable endpoint.
pub trait Source: Send + Sync {
    /// The path or address, for messages.
    fn name(&self) -> &Path;
    /// False for a destination that is not there yet (seen only in a dry run), which reads as
    /// empty.
    fn exists(&self) -> bool {
        true
    }
    /// What it can do (see [`Caps`]); by default, what is never wrong.
    fn caps(&self) -> Caps {
        Caps::default()
    }
    /// Its current size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset`. Reading past the end is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// The segment that contains `offset` (`offset < size`). Endpoints that cannot tell holes
    /// from data report everything as allocated.
    fn segment_at(&self, offset: u64) -> Result<Segment>;
    /// Hints that `[offset, offset + len)` will not be read again soon, so its cached pages can
    /// go. Failures are ignored: this is advice.
    fn drop_cache(&self, offset: u64, len: u64);
    /// Hints that reads will skip much of the endpoint (`--fs-aware` reads only used blocks):
    /// read-ahead past what is asked would read what nobody wants. Advice, as `drop_cache`.
    fn read_sparsely(&self) {}
    /// Hints that `[offset, offset + len)` will be read soon: start reading it now, so that the
    /// reads of many small runs overlap (`fadvise(WILLNEED)`). Advice, as `drop_cache`.
    fn prefetch(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }
    /// What object this is.
    fn identity(&self) -> Identity;
    /// Checks, after the last read and before success is reported, that what was read is what
    /// the endpoint held: a snapshot that overflowed while it was read is not. Never wrong by
    /// default: most endpoints cannot go bad this way.
    fn check_intact(&self) -> Result<()> {
        Ok(())
    }
    /// Unix permission bits of a regular file, for a copy created elsewhere; `None` otherwise.
    fn mode(&self) -> Option<u32> {
        None
    }
    /// The parts of `[offset, offset + len)` that changed since the mark this endpoint was opened
    /// against (a qemu dirty bitmap), ascending, when it tracks changes (`caps().changed_blocks`).
    /// Everything else is promised to hold what it held at the mark, so a sync onto a copy made
    /// then skips it unread. Never wrong by default: all of it changed.
    fn changed(&self, offset: u64, len: u64) -> Result<Vec<crate::extent::Extent>> {
        Ok(vec![crate::extent::Extent { offset, len }])
    }
    /// The run of bytes at `offset` as a filesystem on this source uses them, `(end, used)` with
    /// `end > offset`: only a source opened `--fs-aware` has unused runs (a filesystem's free
    /// blocks). They read as zeros and are reported as holes, and a copy neither reads, sends
    /// nor writes them: the destination keeps what it holds there. Never wrong by default:
    /// everything is used.
    fn usage_at(&self, offset: u64) -> Result<(u64, bool)> {
        Ok((offset.max(self.size()).max(offset + 1), true))
    }
    /// With `--fs-aware`: what was found on this source, region by region, for the summary.
    /// Empty otherwise.
    fn filesystems(&self) -> Vec<FsRegion> {
        Vec::new()
    }
    /// What the user should hear about this source that does not stop the run, one line each:
    /// asked when the run starts (a device mounted read-write, a disk-image format read as raw
    /// bytes) and again after its last read (`after_reading`: a file that changed meanwhile).
    fn warnings(&self, after_reading: bool) -> Vec<String> {
        let _ = after_reading;
        Vec::new()
    }
    /// Closes the endpoint and undoes what opening it set up (removes a snapshot, detaches a
    /// loop device, ends a session). Unlike a drop, which can only print a warning, a failure
    /// is returned, saying what to run by hand.
    fn close(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// A writable endpoint.
pub trait Target: Source {
    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes `[offset, offset + len)` read as zeros, as cheaply as the endpoint allows: a hole in
    /// a file, a discard or write-zeroes on a device, written zeros as a last resort.
    fn zero(&self, offset: u64, len: u64) -> Result<()>;
    /// Truncates or extends a file to `size`; extension leaves a hole.
    fn set_size(&self, size: u64) -> Result<()>;
    /// Makes everything written so far durable. For a recorder (a delta, a backup point, an undo
    /// log) this is also the commit: what was recorded becomes valid.
    fn flush(&self) -> Result<()>;
    /// The run ended early (an error, a cancel, a lost peer): makes what was written durable,
    /// but commits nothing that claims to be complete. A plain target is flushed and an undo log
    /// committed (it covers what was overwritten); a backup point or a delta is abandoned.
    fn flush_partial(&self) -> Result<()> {
        self.flush()
    }
    /// Writes `new` (zeros when `None`) over `[offset, offset + len)`, which the caller has just
    /// read as `old` (`None`: zeros). Recorders keep `old` instead of reading it again; other
    /// endpoints ignore it.
    fn overwrite(&self, new: Option<&[u8]>, offset: u64, len: u64, old: Option<&[u8]>) -> Result<()> {
        let _ = old;
        match new {
            Some(bytes) => self.write_at(bytes, offset),
            None => self.zero(offset, len),
        }
    }
    /// This run created the target (a file, a volume).
    fn created(&self) -> bool {
        false
    }
    /// Removes what this run created: a copy that failed must not look like one.
    fn remove_created(&self) {}
}

/// Forwards every method, so that wrappers (recorders, undo logs) take an endpoint by value, by
/// reference or shared, alike.
macro_rules! forward {
    ($($ty:ty),*) => {$(
        impl<S: Source + ?Sized> Source for $ty {
            fn name(&self) -> &Path { (**self).name() }
            fn exists(&self) -> bool { (**self).exists() }
            fn caps(&self) -> Caps { (**self).caps() }
            fn size(&self) -> u64 { (**self).size() }
            fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> { (**self).read_at(buf, offset) }
            fn segment_at(&self, offset: u64) -> Result<Segment> { (**self).segment_at(offset) }
            fn drop_cache(&self, offset: u64, len: u64) { (**self).drop_cache(offset, len) }
            fn read_sparsely(&self) { (**self).read_sparsely() }
            fn prefetch(&self, offset: u64, len: u64) { (**self).prefetch(offset, len) }
            fn identity(&self) -> Identity { (**self).identity() }
            fn check_intact(&self) -> Result<()> { (**self).check_intact() }
            fn mode(&self) -> Option<u32> { (**self).mode() }
            fn warnings(&self, after_reading: bool) -> Vec<String> { (**self).warnings(after_reading) }
            fn changed(&self, offset: u64, len: u64) -> Result<Vec<crate::extent::Extent>> { (**self).changed(offset, len) }
            fn usage_at(&self, offset: u64) -> Result<(u64, bool)> { (**self).usage_at(offset) }
            fn filesystems(&self) -> Vec<FsRegion> { (**self).filesystems() }
        }
        impl<S: Target + ?Sized> Target for $ty {
            fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> { (**self).write_at(buf, offset) }
            fn zero(&self, offset: u64, len: u64) -> Result<()> { (**self).zero(offset, len) }
            fn set_size(&self, size: u64) -> Result<()> { (**self).set_size(size) }
            fn flush(&self) -> Result<()> { (**self).flush() }
            fn flush_partial(&self) -> Result<()> { (**self).flush_partial() }
            fn overwrite(&self, new: Option<&[u8]>, offset: u64, len: u64, old: Option<&[u8]>) -> Result<()> {
                (**self).overwrite(new, offset, len, old)
            }
            fn created(&self) -> bool { (**self).created() }
            fn remove_created(&self) { (**self).remove_created() }
        }
    )*};
}
forward!(&S, std::sync::Arc<S>);

/// Walks a source's changed blocks forwards (see [`Source::changed`]), asking for a large span
/// at a time rather than once per chunk (one NBD block-status request answers a gigabyte).
pub struct ChangeCursor<'a> {
    source: &'a dyn Source,
    /// `[start, end)` asked so far, and the changed extents in it.
    asked: (u64, u64),
    changed: Vec<crate::extent::Extent>,
    /// The first extent of `changed` that may still matter (the ones before it end earlier than
    /// the last position asked about): each extent is looked at once, however fragmented.
    next: usize,
}

impl<'a> ChangeCursor<'a> {
    /// How much is asked at once.
    const SPAN: u64 = 1 << 30;

    /// A cursor at the start of `source`.
    #[must_use]
    pub fn new(source: &'a dyn Source) -> Self {
        ChangeCursor { source, asked: (0, 0), changed: Vec::new(), next: 0 }
    }

    /// Whether anything in `[start, end)` changed. Calls must ask for ascending ranges.
    pub fn any_in(&mut self, start: u64, end: u64) -> Result<bool> {
        let end = end.min(self.source.size());
        let mut pos = start;
        while pos < end {
            if !(self.asked.0 <= pos && pos < self.asked.1) {
                let span = (self.source.size() - pos).min(Self::SPAN);
                self.changed = self.source.changed(pos, span)?;
                self.asked = (pos, pos + span);
                self.next = 0;
            }
            let stop = end.min(self.asked.1);
            while self.changed.get(self.next).is_some_and(|e| e.end() <= pos) {
                self.next += 1;
            }
            if self.changed[self.next..].iter().take_while(|e| e.offset < stop).any(|e| e.end() > pos) {
                return Ok(true);
            }
            pos = stop;
        }
        Ok(false)
    }
}

/// Walks an endpoint's allocation map forwards, asking the endpoint once per segment rather than
/// once per chunk (`SEEK_HOLE` can cost a walk over the extent tree).
pub struct SegmentCursor<'a> {
    source: &'a dyn Source,
    current: Option<Segment>,
}

impl<'a> SegmentCursor<'a> {
    /// A cursor at the start of `source`.
    #[must_use]
    pub fn new(source: &'a dyn Source) -> Self {
        SegmentCursor { source, current: None }
    }

    /// The allocated parts of `[start, end)`, ascending. Anything at or beyond the endpoint's
    /// size counts as a hole. Calls must ask for ascending, non-overlapping ranges.
    pub fn allocated_in(&mut self, start: u64, end: u64, out: &mut Vec<crate::extent::Extent>) -> Result<()> {
        out.clear();
        let end = end.min(self.source.size());
        let mut pos = start;
        while pos < end {
            let seg = match self.current {
                Some(s) if s.start <= pos && pos < s.end => s,
                _ => {
                    let s = self.source.segment_at(pos)?;
                    self.current = Some(s);
                    s
                }
            };
            let stop = seg.end.min(end);
            if seg.allocated {
                out.push(crate::extent::Extent::between(pos, stop));
            }
            pos = stop;
        }
        Ok(())
    }
}

/// Walks a source's usage ([`Source::usage_at`]) forwards, once per run.
pub struct UsageCursor<'a> {
    source: &'a dyn Source,
    current: Option<(u64, u64, bool)>,
}

impl<'a> UsageCursor<'a> {
    /// A cursor at the start of `source`.
    #[must_use]
    pub fn new(source: &'a dyn Source) -> Self {
        UsageCursor { source, current: None }
    }

    /// The used parts of `[start, end)`, ascending (all of it for a source that is not
    /// `--fs-aware`). Calls must ask for ascending, non-overlapping ranges.
    pub fn used_in(&mut self, start: u64, end: u64, out: &mut Vec<crate::extent::Extent>) -> Result<()> {
        out.clear();
        let mut pos = start;
        while pos < end {
            let (_, to, used) = match self.current {
                Some(run @ (from, to, _)) if from <= pos && pos < to => run,
                _ => {
                    let (to, used) = self.source.usage_at(pos)?;
                    if to <= pos {
                        return Err(crate::Error::protocol(format!(
                            "{}: the usage run at byte offset {pos} ends at {to}",
                            self.source.name().display()
                        )));
                    }
                    self.current = Some((pos, to, used));
                    (pos, to, used)
                }
            };
            let stop = to.min(end);
            if used {
                match out.last_mut() {
                    Some(last) if last.end() == pos => last.len += stop - pos,
                    _ => out.push(crate::extent::Extent::between(pos, stop)),
                }
            }
            pos = stop;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Caps;

    #[test]
    fn caps_cross_the_wire_intact_and_bad_block_sizes_fall_back_to_the_safe_one() {
        let all = [false, true];
        for (i, &resizable) in all.iter().enumerate() {
            for &holes in &all {
                for &stable in &all {
                    let unused_blocks = stable != holes;
                    let caps = Caps {
                        resizable,
                        holes,
                        stable,
                        unused_blocks,
                        discard_zeroes: i == 0,
                        block_size: 512,
                        ..Caps::default()
                    };
                    assert_eq!(Caps::from_bits(caps.to_bits(), 512), caps);
                }
            }
        }
        assert_eq!(Caps::from_bits(0, 0).block_size, 4096);
        assert_eq!(Caps::from_bits(0, 3000).block_size, 4096);
        assert_eq!(Caps::from_bits(u32::MAX, 4096).to_bits(), 0b111_1111, "unknown bits are dropped");
    }
}

#[cfg(test)]
mod change_cursor_tests {
    use super::{ChangeCursor, Identity, Segment, Source};
    use crate::extent::Extent;
    use std::path::Path;

    /// A source whose changed-block map is `changed`, asked through the cursor.
    struct Marked {
        size: u64,
        changed: Vec<Extent>,
    }

    impl Source for Marked {
        fn name(&self) -> &Path {
            Path::new("marked")
        }
        fn size(&self) -> u64 {
            self.size
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> crate::Result<()> {
            unreachable!("a cursor only asks for changes")
        }
        fn segment_at(&self, offset: u64) -> crate::Result<Segment> {
            Ok(Segment { start: offset, end: self.size, allocated: true })
        }
        fn drop_cache(&self, _: u64, _: u64) {}
        fn identity(&self) -> Identity {
            Identity::None
        }
        fn changed(&self, offset: u64, len: u64) -> crate::Result<Vec<Extent>> {
            let end = offset + len;
            Ok(self.changed.iter().filter_map(|e| e.intersect(&Extent::between(offset, end))).collect())
        }
    }

    /// Ascending chunks see exactly the extents that overlap them, across the cursor's spans,
    /// and a source that tracks nothing reports every chunk changed.
    #[test]
    fn a_forward_walk_sees_exactly_the_overlapping_changes() {
        let gib = 1u64 << 30;
        let changed = vec![Extent::between(10, 20), Extent::between(4096, 4097), Extent::between(gib - 1, gib + 5)];
        let source = Marked { size: 3 * gib, changed: changed.clone() };
        let mut cursor = ChangeCursor::new(&source);
        let chunk = 1024;
        let mut found = Vec::new();
        let mut start = 0;
        while start < 2 * gib {
            if cursor.any_in(start, start + chunk).unwrap() {
                found.push(start);
            }
            start += chunk;
        }
        assert_eq!(found, [0, 4096, gib - chunk, gib]);
        let plain = crate::endpoint::memory::Memory::new("plain", 8192);
        let mut cursor = ChangeCursor::new(&plain);
        assert!(cursor.any_in(0, 4096).unwrap() && cursor.any_in(4096, 8192).unwrap());
    }
}
