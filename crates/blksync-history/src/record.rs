//! Recorders: targets that keep history of what is written to them. Each wraps an endpoint and
//! is itself a [`Target`] (and a [`Source`] reading what it wraps), so the engine, a peer and
//! every command write through them the same way, locally or at the far end of a link:
//!
//! - [`Recorder`] (`diff`, and the increments of a backup): writes become the records of a delta
//!   against a base, which itself is never written. `flush` commits the delta.
//! - [`Undo`] (`sync --undo`): the old content of every range is made durable in an undo log
//!   before the range is overwritten. `flush` flushes the target, then commits the log.
//! - [`Append`] (`backup`): the next point of a chain: a [`Recorder`] over the newest point's
//!   image, or the base image of a new chain. `flush` commits the point.
//!
//! A run that ends early calls [`Target::flush_partial`]: an undo log is committed (it covers
//! what was overwritten), a delta or a point is abandoned, so nothing claims content that never
//! existed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::chain::{Chain, Image, base_paths, increment_path};
use crate::delta::{self, Header, Kind, States, Writer};
use crate::endpoint::local::{Local, OpenTarget};
use crate::endpoint::{Caps, Identity, Segment, Source, Target};
use crate::error::{Error, Result};
use crate::fingerprint::{Blocks, read_or_zero};

/// How a recording runs: options of `diff`, `backup` and `prune`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// `backup --compress`: a new chain's base is a compressed image at this zstd level.
    #[serde(default)]
    pub compress: Option<i32>,
    /// `--fs-aware`: only the blocks the source's filesystems use are read and recorded.
    #[serde(default)]
    pub fs_aware: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `[offset, offset + len)` in pieces a delta record can hold.
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let step = u64::from(delta::MAX_RECORD);
    (offset..offset + len).step_by(step as usize).map(move |pos| (pos, (offset + len - pos).min(step)))
}

fn zeros_or_read(image: &dyn Source, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    read_or_zero(image, &mut buf, offset)?;
    Ok(buf)
}

/// What a range held before a write, as far as the writer knows.
#[derive(Clone, Copy)]
enum Old<'a> {
    /// Not known: read it.
    Unknown,
    /// Zeros.
    Zeros,
    /// These bytes.
    Bytes(&'a [u8]),
}

impl<'a> Old<'a> {
    /// What the engine passes: the bytes it read, or `None` for a hole.
    fn of(old: Option<&'a [u8]>) -> Old<'a> {
        old.map_or(Old::Zeros, Old::Bytes)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    Open,
    Committed,
    Abandoned,
}

fn abandoned() -> Error {
    Error::protocol("write or commit after the transfer was abandoned")
}

/// Turns writes into the records of a delta against `base`: each record gets the base's bytes
/// under it as its "before" content, and `flush` commits the delta. With fingerprints on
/// (`diff`), the delta also records the fingerprints of the base and of the image it produces
/// ([`crate::fingerprint`]): the base's blocks are hashed as they are read through the
/// recorder, and at commit the blocks no read covered are read, and the changed blocks are
/// hashed with the records laid over them (one more read of each changed mebibyte).
pub struct Recorder<B: Source> {
    base: B,
    path: PathBuf,
    header: Mutex<Header>,
    writer: Mutex<Option<Arc<Writer>>>,
    blocks: Option<Mutex<Blocks>>,
    after: Mutex<Option<[u8; 32]>>,
    status: Mutex<Status>,
}

impl<B: Source> Recorder<B> {
    /// Records into `path` (written atomically on commit), with `header`'s ids and comment; the
    /// sizes come from `base` until [`Target::set_size`].
    pub fn new(base: B, path: PathBuf, mut header: Header, fingerprints: bool) -> Recorder<B> {
        header.size_before = base.size();
        header.size_after = base.size();
        let blocks = fingerprints.then(|| Mutex::new(Blocks::new(base.size())));
        Recorder {
            base,
            path,
            header: Mutex::new(header),
            writer: Mutex::new(None),
            blocks,
            after: Mutex::new(None),
            status: Mutex::new(Status::Open),
        }
    }

    /// Where the delta goes.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The delta's header (final once committed).
    #[must_use]
    pub fn header(&self) -> Header {
        lock(&self.header).clone()
    }

    fn writer(&self) -> Result<Arc<Writer>> {
        match *lock(&self.status) {
            Status::Open => {}
            Status::Abandoned => return Err(abandoned()),
            Status::Committed => return Err(Error::protocol("write after the delta was committed")),
        }
        let mut writer = lock(&self.writer);
        if writer.is_none() {
            *writer = Some(Arc::new(Writer::create(&self.path, &lock(&self.header))?));
        }
        writer.clone().ok_or_else(|| Error::protocol("no delta writer"))
    }

    /// Records `[offset, offset + len)`, with what the base holds there as its "before".
    fn record(&self, kind: Kind, data: &[u8], offset: u64, len: u64, old: Old<'_>) -> Result<()> {
        let writer = self.writer()?;
        match old {
            Old::Bytes(old) => writer.record(kind, offset, len as u32, data, Some(old)),
            Old::Zeros => writer.record(kind, offset, len as u32, data, None),
            Old::Unknown => {
                writer.record(kind, offset, len as u32, data, Some(&zeros_or_read(&self.base, offset, len)?))
            }
        }
    }

    /// Takes the fingerprint of the new image from whoever read it whole (the source, in `diff`)
    /// instead of computing it from the base and the records at commit.
    pub fn set_after(&self, fingerprint: [u8; 32]) {
        *lock(&self.after) = Some(fingerprint);
    }

    /// The fingerprints of the base and of the new image, `writer`'s records laid over the base.
    fn states(&self, writer: &Writer, size_after: u64) -> Result<States> {
        let Some(blocks) = &self.blocks else { return Ok(States::default()) };
        let mut before = lock(blocks);
        before.complete(&self.base)?;
        if let Some(after) = *lock(&self.after) {
            return Ok(States { before: before.fingerprint(), after });
        }
        let entries = writer.entries();
        let mut after = Blocks::new(size_after);
        let size_before = before.size();
        let mut buf = Vec::new();
        let mut last: Option<(u64, delta::Record)> = None;
        for i in 0..after.count() {
            let (a, b) = after.range(i);
            let first = entries.partition_point(|e| e.offset + u64::from(e.len) <= a);
            let over = entries[first..].iter().take_while(|e| e.offset < b);
            let touched = over.clone().next().is_some();
            if !touched && before.range(i) == (a, b) && b <= size_before {
                after.set(i, before.get(i).unwrap_or_default());
                continue;
            }
            if !touched && a >= size_before {
                after.set(i, crate::fingerprint::zero_block(b - a));
                continue;
            }
            buf.resize((b - a) as usize, 0);
            read_or_zero(&self.base, &mut buf, a)?;
            for e in over {
                let (from, to) = (e.offset.max(a), (e.offset + u64::from(e.len)).min(b));
                let span = &mut buf[(from - a) as usize..(to - a) as usize];
                if e.kind == Kind::Zeros {
                    span.fill(0);
                    continue;
                }
                if last.as_ref().is_none_or(|(at, _)| *at != e.position) {
                    last = Some((e.position, writer.read_back(e)?));
                }
                if let Some((_, record)) = &last {
                    span.copy_from_slice(&record.data[(from - e.offset) as usize..(to - e.offset) as usize]);
                }
            }
            after.set(i, crate::fingerprint::block_hash(&buf));
        }
        Ok(States { before: before.fingerprint(), after: after.fingerprint() })
    }

    /// Commits the delta: its fingerprints (when kept), index and footer, then its name.
    /// Returns the delta's size in bytes.
    pub fn commit(&self) -> Result<u64> {
        match *lock(&self.status) {
            Status::Open => {}
            Status::Abandoned => return Err(abandoned()),
            Status::Committed => return Ok(std::fs::metadata(&self.path).map_or(0, |m| m.len())),
        }
        let writer = match lock(&self.writer).take() {
            Some(w) => w,
            None => Arc::new(Writer::create(&self.path, &lock(&self.header))?),
        };
        let size_after = lock(&self.header).size_after;
        let committed = self.states(&writer, size_after).and_then(|states| {
            writer.set_states(states);
            Arc::try_unwrap(writer).map_err(|_| Error::protocol("a write is still in progress at commit"))
        });
        match committed {
            Ok(writer) => {
                *lock(&self.status) = Status::Committed;
                writer.commit()
            }
            Err(e) => {
                *lock(&self.status) = Status::Abandoned;
                Err(e)
            }
        }
    }

    /// Gives the delta up: its temporary file is removed and nothing is committed.
    pub fn abandon(&self) {
        let mut status = lock(&self.status);
        if *status == Status::Open {
            *status = Status::Abandoned;
            if let Some(w) = lock(&self.writer).take()
                && let Ok(w) = Arc::try_unwrap(w)
            {
                w.abandon();
            }
        }
    }
}

impl<B: Source> Drop for Recorder<B> {
    fn drop(&mut self) {
        // Never committed: its temporary file goes, so it cannot be taken for a delta.
        if let Some(w) = lock(&self.writer).take()
            && let Ok(w) = Arc::try_unwrap(w)
        {
            w.abandon();
        }
    }
}

impl<B: Source> Source for Recorder<B> {
    fn name(&self) -> &Path {
        self.base.name()
    }
    fn caps(&self) -> Caps {
        // A new image being described: any size, and zeroing is one small record.
        Caps { resizable: true, zero_offload: true, discard_zeroes: false, ..self.base.caps() }
    }
    fn size(&self) -> u64 {
        lock(&self.header).size_after
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_or_zero(&self.base, buf, offset)?;
        if let Some(blocks) = &self.blocks {
            Blocks::note(blocks, buf, offset);
        }
        Ok(())
    }
    fn segment_at(&self, offset: u64) -> Result<Segment> {
        let base = self.base.size();
        if offset >= base {
            return Ok(Segment { start: offset, end: self.size().max(offset + 1), allocated: false });
        }
        let s = self.base.segment_at(offset)?;
        Ok(Segment { end: s.end.min(base), ..s })
    }
    fn drop_cache(&self, offset: u64, len: u64) {
        self.base.drop_cache(offset, len);
    }
    fn identity(&self) -> Identity {
        // The delta is a new object: writing it never touches the base.
        Identity::None
    }
    fn check_intact(&self) -> Result<()> {
        self.base.check_intact()
    }
}

impl<B: Source> Target for Recorder<B> {
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.record(Kind::Data, buf, offset, buf.len() as u64, Old::Unknown)
    }
    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        pieces(offset, len).try_for_each(|(pos, n)| self.record(Kind::Zeros, &[], pos, n, Old::Unknown))
    }
    fn overwrite(&self, new: Option<&[u8]>, offset: u64, len: u64, old: Option<&[u8]>) -> Result<()> {
        for (pos, n) in pieces(offset, len) {
            let part = (pos - offset) as usize..(pos - offset + n) as usize;
            let old = Old::of(old.map(|o| &o[part.clone()]));
            match new {
                Some(bytes) => self.record(Kind::Data, &bytes[part], pos, n, old)?,
                None => self.record(Kind::Zeros, &[], pos, n, old)?,
            }
        }
        Ok(())
    }
    fn set_size(&self, size: u64) -> Result<()> {
        if lock(&self.writer).is_some() {
            return Err(Error::protocol("SetSize after data was written"));
        }
        lock(&self.header).size_after = size;
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.commit().map(|_| ())
    }
    fn flush_partial(&self) -> Result<()> {
        self.abandon();
        Ok(())
    }
}

/// Saves the old content of everything it overwrites in `target` into an undo log, which turns
/// the target back into what it was (docs/DELTA-FORMAT.md, "Undo logs").
///
/// Write-ahead: a range's old content is durable in the log before the range is overwritten.
/// Writes are held back until the log's records of them are durable: one fdatasync for up to
/// [`Undo::HELD`] bytes of changes instead of one per write (1 % of 1 GiB changed: 2.6× a plain
/// sync with a sync per 2 MiB). Held writes go out before anything reads their range, and at
/// every flush. The log is committed by `flush` and `flush_partial` (it covers what was
/// overwritten even when the run stopped half way), and as a last resort when dropped.
pub struct Undo<T: Target> {
    target: T,
    path: PathBuf,
    comment: String,
    writer: Mutex<Option<Arc<Writer>>>,
    /// Offset → (length, new bytes; `None` for zeros).
    held: Mutex<Held>,
    committed: Mutex<bool>,
}

#[derive(Default)]
struct Held {
    writes: BTreeMap<u64, (u64, Option<Vec<u8>>)>,
    bytes: usize,
}

impl<T: Target> Undo<T> {
    /// Bytes of changes held before the log is synced and they are written: bounds memory and
    /// the fdatasync rate.
    pub const HELD: usize = 16 << 20;

    /// Saves into `path` (`PATH.partial` until committed) what is overwritten in `target`.
    pub fn new(target: T, path: PathBuf, comment: String) -> Undo<T> {
        Undo {
            target,
            path,
            comment,
            writer: Mutex::new(None),
            held: Mutex::new(Held::default()),
            committed: Mutex::new(false),
        }
    }

    /// The log's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The wrapped target.
    pub fn target(&self) -> &T {
        &self.target
    }

    /// Starts the log for a target that will be `new_size` bytes long: a tail the resize cuts
    /// off is saved, and durable, first. Does nothing when started already.
    pub fn begin(&self, new_size: u64) -> Result<()> {
        self.started(new_size).map(|_| ())
    }

    /// Gives the log up before anything was overwritten (the resize it was started for
    /// failed): its `.partial` file is removed.
    pub fn abandon(&self) {
        *lock(&self.committed) = true;
        *lock(&self.held) = Held::default();
        if let Some(w) = lock(&self.writer).take()
            && let Ok(w) = Arc::try_unwrap(w)
        {
            w.abandon();
        }
    }

    fn started(&self, new_size: u64) -> Result<Arc<Writer>> {
        if *lock(&self.committed) {
            return Err(Error::protocol("write after the undo log was committed"));
        }
        let mut slot = lock(&self.writer);
        if let Some(w) = &*slot {
            return Ok(Arc::clone(w));
        }
        let old_size = self.target.size();
        let mut header = Header::new([0; 16], 4096, &self.target.name().display().to_string(), &self.comment)?;
        header.size_before = new_size;
        header.size_after = old_size;
        let writer = Writer::create_journal(&self.path, &header)?;
        let saved = (|| {
            let mut buf = vec![0u8; 1 << 20];
            let mut pos = new_size;
            while pos < old_size {
                let n = (old_size - pos).min(buf.len() as u64) as usize;
                self.target.read_at(&mut buf[..n], pos)?;
                let (kind, data) =
                    if crate::zero::is_zero(&buf[..n]) { (Kind::Zeros, &[][..]) } else { (Kind::Data, &buf[..n]) };
                writer.record(kind, pos, n as u32, data, None)?;
                pos += n as u64;
            }
            // The tail is durable before the target is cut.
            writer.sync_through()
        })();
        if let Err(e) = saved {
            writer.abandon();
            return Err(e);
        }
        let writer = Arc::new(writer);
        *slot = Some(Arc::clone(&writer));
        Ok(writer)
    }

    /// Records the old content of `[offset, offset + len)`, before `new` (zeros: `None`) is
    /// written there.
    fn save(&self, offset: u64, len: u64, new: Option<&[u8]>, old: Old<'_>) -> Result<()> {
        self.release_over(offset, len)?;
        let writer = self.started(self.target.size())?;
        let read;
        let old = match old {
            Old::Unknown => {
                read = zeros_or_read(&self.target, offset, len)?;
                &read[..]
            }
            Old::Zeros => &[][..],
            Old::Bytes(bytes) => bytes,
        };
        if old.is_empty() || crate::zero::is_zero(old) {
            writer.record(Kind::Zeros, offset, len as u32, &[], new)
        } else {
            writer.record(Kind::Data, offset, len as u32, old, new)
        }
    }

    fn hold(&self, offset: u64, len: u64, data: Option<Vec<u8>>) -> Result<()> {
        let full = {
            let mut held = lock(&self.held);
            held.bytes += len as usize;
            held.writes.insert(offset, (len, data));
            held.bytes >= Self::HELD
        };
        if full { self.release() } else { Ok(()) }
    }

    /// Writes held back whose range meets `[offset, offset + len)` go out first.
    fn release_over(&self, offset: u64, len: u64) -> Result<()> {
        let meets = {
            let held = lock(&self.held);
            held.writes.range(..offset + len).next_back().is_some_and(|(&at, &(n, _))| at + n > offset)
        };
        if meets { self.release() } else { Ok(()) }
    }

    /// Makes the log durable, then writes what was held back. If the log cannot be made
    /// durable, nothing held is written.
    fn release(&self) -> Result<()> {
        let taken = std::mem::take(&mut *lock(&self.held));
        if taken.writes.is_empty() {
            return Ok(());
        }
        if let Some(writer) = lock(&self.writer).clone() {
            writer.sync_through()?;
        }
        for (at, (len, data)) in taken.writes {
            match data {
                Some(bytes) => self.target.write_at(&bytes, at)?,
                None => self.target.zero(at, len)?,
            }
        }
        Ok(())
    }

    /// Writes what is held, flushes the target, then commits the log (once: a later call only
    /// flushes). A log that cannot be committed stays as `PATH.partial`, which rolls back what
    /// was overwritten; the error says so.
    fn finish(&self) -> Result<()> {
        let released = self.release();
        let flushed = self.target.flush();
        if *lock(&self.committed) {
            return released.and(flushed);
        }
        let size = self.target.size();
        let writer = self.started(size);
        *lock(&self.committed) = true;
        let committed = writer.and_then(|w| {
            drop(lock(&self.writer).take());
            Arc::try_unwrap(w).map_err(|_| Error::protocol("a write is still in progress at commit"))?.commit()
        });
        if let Err(e) = committed {
            let partial = delta::partial_path(&self.path);
            return Err(Error::new(
                e.kind(),
                format!(
                    "the undo log could not be completed ({e}), but {} holds the old content of everything that was overwritten: \
                     `blksync apply {} {}` rolls the destination back",
                    partial.display(),
                    partial.display(),
                    self.target.name().display()
                ),
            ));
        }
        released.and(flushed)
    }
}

impl<T: Target> Drop for Undo<T> {
    fn drop(&mut self) {
        // The run went away mid-sync: the log covers everything written so far; keep it.
        if lock(&self.writer).is_some() && !*lock(&self.committed) {
            let _ = self.finish();
        }
    }
}

impl<T: Target> Source for Undo<T> {
    fn name(&self) -> &Path {
        self.target.name()
    }
    fn exists(&self) -> bool {
        self.target.exists()
    }
    fn caps(&self) -> Caps {
        self.target.caps()
    }
    fn size(&self) -> u64 {
        self.target.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.release_over(offset, buf.len() as u64)?;
        self.target.read_at(buf, offset)
    }
    fn segment_at(&self, offset: u64) -> Result<Segment> {
        self.target.segment_at(offset)
    }
    fn drop_cache(&self, offset: u64, len: u64) {
        self.target.drop_cache(offset, len);
    }
    fn identity(&self) -> Identity {
        self.target.identity()
    }
    fn check_intact(&self) -> Result<()> {
        self.target.check_intact()
    }
    fn mode(&self) -> Option<u32> {
        self.target.mode()
    }
}

impl<T: Target> Target for Undo<T> {
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        // The undo log turns the new content back into the old: the old bytes are the record,
        // the new ones its "before".
        self.save(offset, buf.len() as u64, Some(buf), Old::Unknown)?;
        self.hold(offset, buf.len() as u64, Some(buf.to_vec()))
    }
    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        for (pos, n) in pieces(offset, len) {
            self.save(pos, n, None, Old::Unknown)?;
        }
        self.hold(offset, len, None)
    }
    fn overwrite(&self, new: Option<&[u8]>, offset: u64, len: u64, old: Option<&[u8]>) -> Result<()> {
        for (pos, n) in pieces(offset, len) {
            let part = (pos - offset) as usize..(pos - offset + n) as usize;
            self.save(pos, n, new.map(|b| &b[part.clone()]), Old::of(old.map(|o| &o[part])))?;
        }
        self.hold(offset, len, new.map(<[u8]>::to_vec))
    }
    fn set_size(&self, size: u64) -> Result<()> {
        self.release()?;
        self.begin(size)?;
        self.target.set_size(size)
    }
    fn flush(&self) -> Result<()> {
        self.finish()
    }
    fn flush_partial(&self) -> Result<()> {
        self.finish()
    }
    fn created(&self) -> bool {
        self.target.created()
    }
    fn remove_created(&self) {
        self.target.remove_created();
    }
}

/// The next point of a backup chain, as a target: `flush` commits it, `flush_partial` (or a
/// drop without a flush) abandons it, and what was started is removed.
pub struct Append {
    dir: PathBuf,
    point: Point,
    number: u64,
    status: Mutex<Status>,
    _lock: std::fs::File,
}

#[allow(clippy::large_enum_variant)] // One per backup, made once and never moved in a loop.
enum Point {
    /// No chain yet: the base image, under a temporary name until committed.
    First { tmp: PathBuf, file: BaseFile, header: Box<Header> },
    /// The next increment, recorded against the newest image.
    Next(Recorder<Arc<Image>>),
}

/// A new chain's base file: raw, or a compressed image (`backup --compress`).
enum BaseFile {
    Raw(Local),
    Compressed(blksync_image::Image),
}

impl BaseFile {
    /// Makes it at `tmp`, which `temp::create` reserved (and which an image replaces).
    fn create(tmp: &Path, compress: Option<i32>) -> Result<BaseFile> {
        match compress {
            None => Ok(BaseFile::Raw(Local::open_target(tmp, OpenTarget { create: true, ..OpenTarget::default() })?)),
            Some(level) => {
                std::fs::remove_file(tmp).map_err(|e| crate::error::Error::io("replacing", tmp, None, e))?;
                let options = blksync_image::Options { level, ..blksync_image::Options::default() };
                Ok(BaseFile::Compressed(blksync_image::Image::create(tmp, 0, options)?))
            }
        }
    }

    fn target(&self) -> &dyn Target {
        match self {
            BaseFile::Raw(file) => file,
            BaseFile::Compressed(image) => image,
        }
    }

    fn source(&self) -> &dyn Source {
        match self {
            BaseFile::Raw(file) => file,
            BaseFile::Compressed(image) => image,
        }
    }
}

impl Append {
    /// Opens the chain in `dir` (created if missing) for a new point described by `header`
    /// (its source, comment and block size; the ids and sizes are set here). `check` is given
    /// the header of the chain's newest point and refuses a source that is not the image the
    /// chain backs up. A new chain's base is a compressed image at level `compress` when given
    /// (docs/COMPRESSED-IMAGE.md); a chain's later points are deltas either way. The chain is
    /// locked until the point is committed or given up.
    pub fn open(
        dir: &Path,
        mut header: Header,
        compress: Option<i32>,
        check: impl FnOnce(&Header) -> Result<()>,
    ) -> Result<Append> {
        crate::chain::create_dir(dir)?;
        let lock = crate::chain::lock(dir)?;
        crate::store::clean(dir);
        crate::store::repair(dir)?;
        let (point, number) = match Chain::load(dir)?.map(Arc::new) {
            None => {
                header.parent = [0; 16];
                let (image, _) = base_paths(dir, 0, &header.id);
                let (file, tmp) = crate::temp::create(&image, 0o600)?;
                drop(file);
                let file = BaseFile::create(&tmp, compress).inspect_err(|_| {
                    let _ = std::fs::remove_file(&tmp);
                })?;
                (Point::First { tmp, file, header: Box::new(header) }, 0)
            }
            Some(chain) => {
                let (parent, newest) = chain.newest();
                chain.check_extendable()?;
                check(chain.increments.last().map_or(&chain.base.header, |i| &i.delta.header))?;
                header.parent = parent;
                let image = Arc::new(chain.image(newest)?);
                (Point::Next(Recorder::new(image, increment_path(dir, newest + 1), header, false)), newest + 1)
            }
        };
        Ok(Append { dir: dir.to_path_buf(), point, number, status: Mutex::new(Status::Open), _lock: lock })
    }

    /// The point's number (0 for a new chain's base).
    #[must_use]
    pub fn number(&self) -> u64 {
        self.number
    }

    /// The file that holds the point once committed.
    #[must_use]
    pub fn file(&self) -> PathBuf {
        match &self.point {
            Point::First { header, .. } => base_paths(&self.dir, 0, &header.id).0,
            Point::Next(record) => record.path().to_path_buf(),
        }
    }

    /// A new chain: the target starts empty.
    #[must_use]
    pub fn is_new(&self) -> bool {
        matches!(self.point, Point::First { .. })
    }

    fn endpoint(&self) -> &dyn Target {
        match &self.point {
            Point::First { file, .. } => file.target(),
            Point::Next(record) => record,
        }
    }

    fn commit(&self) -> Result<()> {
        let mut status = lock(&self.status);
        match *status {
            Status::Committed => return Ok(()),
            Status::Abandoned => return Err(abandoned()),
            Status::Open => {}
        }
        let committed = match &self.point {
            Point::First { tmp, file, header } => file.target().flush().and_then(|()| {
                let header = Header { size_after: file.source().size(), ..(**header).clone() };
                crate::store::commit_base(&self.dir, 0, file.source(), tmp, &header)
            }),
            Point::Next(record) => record.flush(),
        };
        *status = if committed.is_ok() { Status::Committed } else { Status::Abandoned };
        drop(status);
        if committed.is_err() {
            self.remove_started();
        }
        committed
    }

    fn remove_started(&self) {
        match &self.point {
            Point::First { tmp, .. } => {
                let _ = std::fs::remove_file(tmp);
            }
            Point::Next(record) => record.abandon(),
        }
    }
}

impl Drop for Append {
    fn drop(&mut self) {
        if *lock(&self.status) != Status::Committed {
            self.remove_started();
        }
    }
}

impl Source for Append {
    fn name(&self) -> &Path {
        self.endpoint().name()
    }
    fn caps(&self) -> Caps {
        self.endpoint().caps()
    }
    fn size(&self) -> u64 {
        self.endpoint().size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.endpoint().read_at(buf, offset)
    }
    fn segment_at(&self, offset: u64) -> Result<Segment> {
        self.endpoint().segment_at(offset)
    }
    fn drop_cache(&self, offset: u64, len: u64) {
        self.endpoint().drop_cache(offset, len);
    }
    fn identity(&self) -> Identity {
        Identity::None
    }
}

impl Target for Append {
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.endpoint().write_at(buf, offset)
    }
    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.endpoint().zero(offset, len)
    }
    fn set_size(&self, size: u64) -> Result<()> {
        self.endpoint().set_size(size)
    }
    fn overwrite(&self, new: Option<&[u8]>, offset: u64, len: u64, old: Option<&[u8]>) -> Result<()> {
        self.endpoint().overwrite(new, offset, len, old)
    }
    fn flush(&self) -> Result<()> {
        self.commit()
    }
    fn flush_partial(&self) -> Result<()> {
        let mut status = lock(&self.status);
        if *status == Status::Open {
            *status = Status::Abandoned;
            drop(status);
            self.remove_started();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::memory::Memory;
    use crate::fingerprint::BLOCK;

    /// A recorder that is not told the new image's fingerprint computes it from the base and
    /// its records: the same as fingerprinting the new image itself, whether the image grows,
    /// shrinks or keeps its size, and whichever blocks the records touch.
    #[test]
    fn a_recorder_fingerprints_both_images_from_the_base_and_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let base: Vec<u8> = (0..3 * BLOCK + 5000).map(|i| (i % 253) as u8).collect();
        for (k, new_size) in [base.len() as u64, 5 * BLOCK + 17, 2 * BLOCK - 3].into_iter().enumerate() {
            let path = dir.path().join(format!("{k}.delta"));
            let header = Header::new([0; 16], 4096, "src", "").unwrap();
            let recorder = Recorder::new(Memory::with_bytes("base", base.clone()), path.clone(), header, true);
            recorder.set_size(new_size).unwrap();
            let mut image = base.clone();
            image.resize(new_size as usize, 0);
            let mut write = |data: &[u8], at: u64| {
                if at + data.len() as u64 <= new_size {
                    recorder.write_at(data, at).unwrap();
                    image[at as usize..at as usize + data.len()].copy_from_slice(data);
                }
            };
            write(&[7; 4096], 4096);
            write(&[9; 8192], BLOCK - 4096);
            write(&[1; 100], 2 * BLOCK - 103);
            write(&[3; 4096], 4 * BLOCK);
            if new_size > 3 * BLOCK {
                recorder.zero(BLOCK * 3 / 2, 4096).unwrap();
                image[(BLOCK * 3 / 2) as usize..(BLOCK * 3 / 2 + 4096) as usize].fill(0);
            }
            // The scan reads part of the base through the recorder, as the engine would.
            let mut buf = vec![0; BLOCK as usize];
            recorder.read_at(&mut buf, 0).unwrap();
            recorder.commit().unwrap();
            let delta = crate::delta::Delta::open(&path).unwrap();
            let of = |bytes: &[u8]| crate::fingerprint::of(&Memory::with_bytes("x", bytes.to_vec())).unwrap();
            assert_eq!(delta.states.before, of(&base), "size {new_size}: before");
            assert_eq!(delta.states.after, of(&image), "size {new_size}: after");
        }
    }
}
