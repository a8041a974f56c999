//! Where a peer's writes go: a plain target, a backup chain, a delta, or a target with an undo
//! log.
//!
//! A chain sink makes `backup` work through the same protocol as `sync`: the peer scans the
//! chain's newest image (a [`crate::chain::Image`]) as if it were the destination, and the
//! client's `Write`s and `Zero`s become records of the next increment, each with the image's
//! old bytes as its "before" content; `Flush` commits the increment. For a chain that does not
//! exist yet the sink writes the base image instead, and `Flush` makes it part of the chain.
//! This runs wherever the chain is: in-process for a local chain, inside the agent for a remote
//! one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::chain::{Chain, Image, base_paths, increment_path};
use crate::delta::{Header, Kind, Writer};
use crate::endpoint::local::{Local, OpenTarget};
use crate::endpoint::{Source, Target};
use crate::error::{Error, Result};

/// The write side of a peer.
pub enum Sink {
    /// A file or device.
    Plain(Arc<Local>),
    /// The next point of a backup chain.
    Chain(Box<ChainSink>),
    /// A delta against the opened file, which itself is never written (`diff`).
    Record(Box<RecordSink>),
    /// A file or device whose old content is saved in an undo log first (`sync --undo`).
    Undo(Box<UndoSink>),
}

/// Writes the next point of a backup chain.
pub struct ChainSink {
    dir: PathBuf,
    state: State,
    _lock: std::fs::File,
}

enum State {
    /// No chain yet: writing the base image under a temporary name.
    First { tmp: PathBuf, file: Arc<Local>, header: Header },
    /// Recording the next increment against the newest image.
    Next(RecordSink),
    /// Committed.
    Done,
    /// Given up (the transfer ended early): nothing was or will be committed.
    Abandoned,
}

/// The header of a delta written now, by this version.
pub(crate) fn new_header(parent: [u8; 16], block: u32, source: &str, comment: &str) -> Result<Header> {
    let (created, utc_offset) = crate::patch::now();
    Ok(Header {
        id: crate::patch::random_id()?,
        parent,
        block_size: block,
        size_before: 0,
        size_after: 0,
        created,
        utc_offset,
        source: source.to_string(),
        source_identity: String::new(),
        comment: comment.to_string(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
    })
}

impl ChainSink {
    /// Opens the chain in `dir` (created if missing) for a new point. Returns the sink and what
    /// the peer should read as the destination's current content (`None` for a new chain).
    /// `source_size` is the source's size, for the same-image check (0 skips it: `--force`).
    pub fn open(
        dir: &Path,
        comment: &str,
        (source, source_size): (&str, u64),
        block: u32,
    ) -> Result<(ChainSink, Option<Arc<Image>>)> {
        crate::chain::create_dir(dir)?;
        let lock = crate::backup::lock(dir)?;
        crate::backup::clean(dir);
        crate::backup::repair(dir)?;
        let mut header = new_header([0; 16], block, source, comment)?;
        match Chain::load(dir)?.map(Arc::new) {
            None => {
                let (image, _) = base_paths(dir, 0, &header.id);
                let (file, tmp) = crate::temp::create(&image, 0o600)?;
                drop(file);
                let file = Local::open_target(&tmp, OpenTarget { create: true, ..OpenTarget::default() })?;
                let state = State::First { tmp, file: Arc::new(file), header };
                Ok((ChainSink { dir: dir.to_path_buf(), state, _lock: lock }, None))
            }
            Some(chain) => {
                let (parent, newest) = chain.newest();
                chain.check_extendable()?;
                if source_size != 0 {
                    let last = chain.increments.last().map_or(&chain.base.header, |i| &i.delta.header);
                    crate::backup::same_path_and_size(dir, last, source, source_size)?;
                }
                let image = Arc::new(chain.image(newest)?);
                header.parent = parent;
                let record =
                    RecordSink::new(Arc::clone(&image) as Arc<dyn Source>, increment_path(dir, newest + 1), header);
                Ok((ChainSink { dir: dir.to_path_buf(), state: State::Next(record), _lock: lock }, Some(image)))
            }
        }
    }

    /// The file written for a new chain (the peer reads it as the destination).
    #[must_use]
    pub fn first_file(&self) -> Option<Arc<Local>> {
        match &self.state {
            State::First { file, .. } => Some(Arc::clone(file)),
            _ => None,
        }
    }

    fn next(&mut self) -> Result<&mut RecordSink> {
        match &mut self.state {
            State::Next(record) => Ok(record),
            _ => Err(Error::protocol("not recording an increment")),
        }
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, data: &[u8], offset: u64) -> Result<()> {
        match &self.state {
            State::First { file, .. } => file.write_at(data, offset),
            _ => self.next()?.write(data, offset),
        }
    }

    /// Zeroes `[offset, offset + len)`.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        match &self.state {
            State::First { file, .. } => file.zero(offset, len),
            _ => self.next()?.zero(offset, len),
        }
    }

    /// Sets the size of the new point (before anything is written).
    pub fn set_size(&mut self, size: u64) -> Result<()> {
        match &mut self.state {
            State::First { file, header, .. } => {
                header.size_after = size;
                file.set_size(size)
            }
            _ => self.next()?.set_size(size),
        }
    }

    /// Commits the new point: the increment, or the base and its metadata.
    pub fn commit(&mut self) -> Result<()> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::First { tmp, file, mut header } => {
                let committed = file.flush().and_then(|()| {
                    header.size_after = file.size();
                    crate::backup::commit_base(&self.dir, 0, file.as_ref(), &tmp, &header)
                });
                if let Err(e) = committed {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            }
            State::Next(mut record) => record.commit()?,
            State::Done => {}
            State::Abandoned => {
                self.state = State::Abandoned;
                return Err(abandoned());
            }
        }
        Ok(())
    }

    /// Gives the new point up: a transfer that ended early must not leave a point that claims
    /// content that never existed. What was started is removed.
    pub fn abandon(&mut self) {
        match std::mem::replace(&mut self.state, State::Abandoned) {
            State::First { tmp, .. } => {
                let _ = std::fs::remove_file(tmp);
            }
            State::Next(mut record) => record.abandon(),
            State::Done => self.state = State::Done,
            State::Abandoned => {}
        }
    }
}

fn abandoned() -> Error {
    Error::protocol("commit after the transfer was abandoned")
}

impl Drop for ChainSink {
    fn drop(&mut self) {
        // Never committed: remove what was started, so it cannot be mistaken for a point. (A
        // `RecordSink` abandons its own file.)
        if let State::First { tmp, .. } = std::mem::replace(&mut self.state, State::Done) {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Turns writes into the records of a delta against `base`: each record gets the base's bytes
/// under it as its "before" content, and `commit` writes the delta.
pub struct RecordSink {
    base: Arc<dyn Source>,
    path: PathBuf,
    header: Header,
    writer: Option<Box<Writer>>,
    committed: bool,
    abandoned: bool,
}

impl RecordSink {
    /// Records into `path` (written atomically on commit), with `header`'s ids and comment.
    #[must_use]
    pub fn new(base: Arc<dyn Source>, path: PathBuf, mut header: Header) -> RecordSink {
        header.size_before = base.size();
        header.size_after = base.size();
        RecordSink { base, path, header, writer: None, committed: false, abandoned: false }
    }

    /// Where the delta goes.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn writer(&mut self) -> Result<&Writer> {
        if self.abandoned {
            return Err(abandoned());
        }
        if self.committed {
            return Err(Error::protocol("write after the delta was committed"));
        }
        if self.writer.is_none() {
            self.writer = Some(Box::new(Writer::create(&self.path, &self.header)?));
        }
        self.writer.as_deref().ok_or_else(|| Error::protocol("no delta writer"))
    }

    fn record(&mut self, kind: Kind, data: &[u8], offset: u64, len: u64) -> Result<()> {
        let before = read_or_zero(self.base.as_ref(), offset, len as usize)?;
        self.writer()?.record(kind, offset, len as u32, data, Some(&before))
    }

    /// Records `data` at `offset`.
    pub fn write(&mut self, data: &[u8], offset: u64) -> Result<()> {
        self.record(Kind::Data, data, offset, data.len() as u64)
    }

    /// Records zeros at `[offset, offset + len)`, split into records of at most 16 MiB.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        for (pos, n) in pieces(offset, len) {
            self.record(Kind::Zeros, &[], pos, n)?;
        }
        Ok(())
    }

    /// Sets the size of the new content (before anything is recorded).
    pub fn set_size(&mut self, size: u64) -> Result<()> {
        if self.writer.is_some() {
            return Err(Error::protocol("SetSize after data was written"));
        }
        self.header.size_after = size;
        Ok(())
    }

    /// Writes the index and footer, and renames the delta into place.
    pub fn commit(&mut self) -> Result<()> {
        if self.abandoned {
            return Err(abandoned());
        }
        if self.committed {
            return Ok(());
        }
        let writer = match self.writer.take() {
            Some(w) => *w,
            None => Writer::create(&self.path, &self.header)?,
        };
        self.committed = true;
        writer.commit()?;
        Ok(())
    }
}

impl RecordSink {
    /// Gives the delta up: its temporary file is removed and nothing is committed.
    pub fn abandon(&mut self) {
        self.abandoned = true;
        if let Some(w) = self.writer.take() {
            (*w).abandon();
        }
    }
}

impl Drop for RecordSink {
    fn drop(&mut self) {
        if let Some(w) = self.writer.take() {
            (*w).abandon();
        }
    }
}

/// Saves the old content of everything it overwrites into an undo log (`sync --undo` at the
/// destination's end). Each record is appended before its bytes are overwritten, so the log
/// is valid even when the sync stops half way; it is committed at `Flush`, or when the
/// connection ends without one.
pub struct UndoSink {
    target: Arc<Local>,
    path: PathBuf,
    comment: String,
    writer: Option<Box<Writer>>,
    committed: bool,
}

impl UndoSink {
    /// Saves into `path` what is overwritten in `target`.
    #[must_use]
    pub fn new(target: Arc<Local>, path: PathBuf, comment: String) -> UndoSink {
        UndoSink { target, path, comment, writer: None, committed: false }
    }

    /// The log, started for a destination that will be `new_size` bytes long.
    fn writer(&mut self, new_size: u64) -> Result<&Writer> {
        if self.committed {
            return Err(Error::protocol("write after the undo log was committed"));
        }
        if self.writer.is_none() {
            let old = self.target.size();
            let writer = crate::sync::start_undo(&self.path, &self.comment, self.target.as_ref(), new_size, old)?;
            self.writer = Some(Box::new(writer));
        }
        self.writer.as_deref().ok_or_else(|| Error::protocol("no undo writer"))
    }

    fn save(&mut self, offset: u64, len: u64, new: Option<&[u8]>) -> Result<()> {
        let old = read_or_zero(self.target.as_ref(), offset, len as usize)?;
        let size = self.target.size();
        let writer = self.writer(size)?;
        if crate::zero::is_zero(&old) {
            writer.record(Kind::Zeros, offset, len as u32, &[], new)
        } else {
            writer.record(Kind::Data, offset, len as u32, &old, new)
        }
    }

    /// Saves, makes the log durable (write-ahead), then writes `data` at `offset`.
    pub fn write(&mut self, data: &[u8], offset: u64) -> Result<()> {
        self.save(offset, data.len() as u64, Some(data))?;
        self.durable()?;
        self.target.write_at(data, offset)
    }

    /// Saves, makes the log durable, then zeroes `[offset, offset + len)`.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        for (pos, n) in pieces(offset, len) {
            self.save(pos, n, None)?;
        }
        self.durable()?;
        self.target.zero(offset, len)
    }

    fn durable(&self) -> Result<()> {
        self.writer.as_deref().map_or(Ok(()), Writer::sync_through)
    }

    /// Starts the log (saving a tail that is cut off), then resizes.
    pub fn set_size(&mut self, size: u64) -> Result<()> {
        self.writer(size)?;
        self.target.set_size(size)
    }

    /// Flushes the destination, then commits the log (once: a later flush only flushes).
    pub fn commit(&mut self) -> Result<()> {
        self.target.flush()?;
        if self.committed {
            return Ok(());
        }
        let size = self.target.size();
        self.writer(size)?;
        self.committed = true;
        match self.writer.take() {
            Some(w) => (*w).commit().map(|_| ()),
            None => Ok(()),
        }
    }
}

impl Drop for UndoSink {
    fn drop(&mut self) {
        // The client went away mid-sync: the log covers everything written so far, keep it.
        if self.writer.is_some() && !self.committed {
            let _ = self.commit();
        }
    }
}

/// `[offset, offset + len)` in pieces a delta record can hold.
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let step = u64::from(crate::delta::MAX_RECORD);
    (offset..offset + len).step_by(step as usize).map(move |pos| (pos, (offset + len - pos).min(step)))
}

/// The bytes of `source` at `[offset, offset + len)`, zeros past its end.
fn read_or_zero(source: &dyn Source, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    if offset < source.size() {
        let n = (source.size() - offset).min(len as u64) as usize;
        source.read_at(&mut buf[..n], offset)?;
    }
    Ok(buf)
}

impl Sink {
    /// Writes `data` at `offset`.
    pub fn write(&mut self, data: &[u8], offset: u64) -> Result<()> {
        match self {
            Sink::Plain(local) => local.write_at(data, offset),
            Sink::Chain(chain) => chain.write(data, offset),
            Sink::Record(record) => record.write(data, offset),
            Sink::Undo(undo) => undo.write(data, offset),
        }
    }

    /// Zeroes a range.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        match self {
            Sink::Plain(local) => local.zero(offset, len),
            Sink::Chain(chain) => chain.zero(offset, len),
            Sink::Record(record) => record.zero(offset, len),
            Sink::Undo(undo) => undo.zero(offset, len),
        }
    }

    /// Resizes (a file) or sets the new point's size (a chain).
    pub fn set_size(&mut self, size: u64) -> Result<()> {
        match self {
            Sink::Plain(local) => local.set_size(size),
            Sink::Chain(chain) => chain.set_size(size),
            Sink::Record(record) => record.set_size(size),
            Sink::Undo(undo) => undo.set_size(size),
        }
    }

    /// Makes everything durable; for a chain, commits the new point.
    pub fn flush(&mut self) -> Result<()> {
        match self {
            Sink::Plain(local) => local.flush(),
            Sink::Chain(chain) => chain.commit(),
            Sink::Record(record) => record.commit(),
            Sink::Undo(undo) => undo.commit(),
        }
    }

    /// The transfer ended early: makes what was written durable, but commits nothing that
    /// claims to be complete. A plain target is flushed and an undo log committed (it covers
    /// what was overwritten); a backup point or a delta is abandoned.
    pub fn flush_partial(&mut self) -> Result<()> {
        match self {
            Sink::Plain(local) => local.flush(),
            Sink::Chain(chain) => {
                chain.abandon();
                Ok(())
            }
            Sink::Record(record) => {
                record.abandon();
                Ok(())
            }
            Sink::Undo(undo) => undo.commit(),
        }
    }

    /// Drops written pages from the cache (starting their writeback).
    pub fn drop_cache(&self, offset: u64, len: u64) {
        match self {
            Sink::Plain(local) => local.drop_cache(offset, len),
            Sink::Undo(undo) => undo.target.drop_cache(offset, len),
            Sink::Chain(_) | Sink::Record(_) => {}
        }
    }
}
