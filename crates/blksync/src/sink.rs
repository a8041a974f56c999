//! Where a peer's writes go: a plain target, or a backup chain.
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
use crate::error::{Error, IoContext, Result};

/// The write side of a peer.
pub enum Sink {
    /// A file or device.
    Plain(Arc<Local>),
    /// The next point of a backup chain.
    Chain(Box<ChainSink>),
}

/// Writes the next point of a backup chain.
pub struct ChainSink {
    dir: PathBuf,
    header: Header,
    state: State,
    _lock: std::fs::File,
}

enum State {
    /// No chain yet: writing the base image under a temporary name.
    First { tmp: PathBuf, file: Arc<Local> },
    /// Recording the next increment against the newest image.
    Next { image: Arc<Image>, path: PathBuf, writer: Option<Box<Writer>> },
    /// Committed.
    Done,
}

impl ChainSink {
    /// Opens the chain in `dir` (created if missing) for a new point. Returns the sink and what
    /// the peer should read as the destination's current content (`None` for a new chain).
    pub fn open(dir: &Path, comment: &str, source: &str, block: u32) -> Result<(ChainSink, Option<Arc<Image>>)> {
        std::fs::create_dir_all(dir).on("creating backup directory", dir)?;
        let lock = crate::backup::lock(dir)?;
        crate::backup::clean(dir);
        let (created, utc_offset) = crate::patch::now();
        let mut header = Header {
            id: crate::patch::random_id()?,
            parent: [0; 16],
            block_size: block,
            size_before: 0,
            size_after: 0,
            created,
            utc_offset,
            source: source.to_string(),
            source_identity: String::new(),
            comment: comment.to_string(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
        };
        match Chain::load(dir)?.map(Arc::new) {
            None => {
                let (image, _) = base_paths(dir, 0, &header.id);
                let tmp = image.with_extension(format!("img.tmp-{}", std::process::id()));
                let file =
                    Local::open_target(&tmp, OpenTarget { create: true, mode: Some(0o600), ..OpenTarget::default() })?;
                let sink = ChainSink {
                    dir: dir.to_path_buf(),
                    header,
                    state: State::First { tmp, file: Arc::new(file) },
                    _lock: lock,
                };
                Ok((sink, None))
            }
            Some(chain) => {
                let (parent, newest) = chain.newest();
                let image = Arc::new(chain.image(newest)?);
                header.parent = parent;
                header.size_before = image.size();
                header.size_after = image.size();
                let path = increment_path(dir, newest + 1);
                let state = State::Next { image: Arc::clone(&image), path, writer: None };
                Ok((ChainSink { dir: dir.to_path_buf(), header, state, _lock: lock }, Some(image)))
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

    fn writer(&mut self) -> Result<&Writer> {
        let header = &self.header;
        match &mut self.state {
            State::Next { path, writer, .. } => {
                if writer.is_none() {
                    *writer = Some(Box::new(Writer::create(path, header)?));
                }
                writer.as_deref().ok_or_else(|| Error::protocol("no increment writer"))
            }
            _ => Err(Error::protocol("not recording an increment")),
        }
    }

    /// The image's current bytes at `[offset, offset + len)`, zeros past its end.
    fn before(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let State::Next { image, .. } = &self.state else { return Ok(vec![0; len]) };
        let mut buf = vec![0u8; len];
        if offset < image.size() {
            let n = (image.size() - offset).min(len as u64) as usize;
            image.read_at(&mut buf[..n], offset)?;
        }
        Ok(buf)
    }

    fn record(&mut self, kind: Kind, data: &[u8], offset: u64, len: u64) -> Result<()> {
        if let State::First { file, .. } = &self.state {
            return match kind {
                Kind::Data => file.write_at(data, offset),
                Kind::Zeros => file.zero(offset, len),
            };
        }
        let before = self.before(offset, len as usize)?;
        self.writer()?.record(kind, offset, len as u32, data, Some(&before))
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, data: &[u8], offset: u64) -> Result<()> {
        self.record(Kind::Data, data, offset, data.len() as u64)
    }

    /// Zeroes `[offset, offset + len)`.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        // Records are at most 16 MiB; larger zero ranges are split.
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(u64::from(crate::delta::MAX_RECORD));
            self.record(Kind::Zeros, &[], pos, n)?;
            pos += n;
        }
        Ok(())
    }

    /// Sets the size of the new point (before anything is written).
    pub fn set_size(&mut self, size: u64) -> Result<()> {
        self.header.size_after = size;
        match &self.state {
            State::First { file, .. } => file.set_size(size),
            State::Next { writer: None, .. } => Ok(()),
            _ => Err(Error::protocol("SetSize after data was written")),
        }
    }

    /// Commits the new point: the increment, or the base and its metadata.
    pub fn commit(&mut self) -> Result<()> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::First { tmp, file } => {
                file.flush()?;
                self.header.size_after = file.size();
                let (image, meta) = base_paths(&self.dir, 0, &self.header.id);
                std::fs::rename(&tmp, &image).on("renaming into place", &image)?;
                std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).on("flushing directory", &self.dir)?;
                Writer::create(&meta, &self.header)?.commit()?;
            }
            State::Next { path, writer, .. } => {
                let writer = match writer {
                    Some(w) => *w,
                    None => Writer::create(&path, &self.header)?,
                };
                writer.commit()?;
            }
            State::Done => {}
        }
        Ok(())
    }
}

impl Drop for ChainSink {
    fn drop(&mut self) {
        // Never committed: remove what was started, so it cannot be mistaken for a point.
        match std::mem::replace(&mut self.state, State::Done) {
            State::First { tmp, .. } => {
                let _ = std::fs::remove_file(tmp);
            }
            State::Next { writer: Some(w), .. } => (*w).abandon(),
            _ => {}
        }
    }
}

impl Sink {
    /// Writes `data` at `offset`.
    pub fn write(&mut self, data: &[u8], offset: u64) -> Result<()> {
        match self {
            Sink::Plain(local) => local.write_at(data, offset),
            Sink::Chain(chain) => chain.write(data, offset),
        }
    }

    /// Zeroes a range.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        match self {
            Sink::Plain(local) => local.zero(offset, len),
            Sink::Chain(chain) => chain.zero(offset, len),
        }
    }

    /// Resizes (a file) or sets the new point's size (a chain).
    pub fn set_size(&mut self, size: u64) -> Result<()> {
        match self {
            Sink::Plain(local) => local.set_size(size),
            Sink::Chain(chain) => chain.set_size(size),
        }
    }

    /// Makes everything durable; for a chain, commits the new point.
    pub fn flush(&mut self) -> Result<()> {
        match self {
            Sink::Plain(local) => local.flush(),
            Sink::Chain(chain) => chain.commit(),
        }
    }

    /// Drops written pages from the cache (starting their writeback).
    pub fn drop_cache(&self, offset: u64, len: u64) {
        if let Sink::Plain(local) = self {
            local.drop_cache(offset, len);
        }
    }
}
