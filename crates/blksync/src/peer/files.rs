//! Whole files in and out of a peer: `Put` (an upload, atomic), `Get` (a download, streamed) and
//! the session's spool, where a client leaves files that a job reads (a delta to apply here)
//! or that a job writes for the client to fetch. Spooled files go away with the session, unless
//! the connection broke (then they stay for a day: one may be an undo log).

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::Sender;

use crate::compress::Compressor;
use crate::error::{Error, IoContext, Result};
use crate::protocol::Msg;

/// Bytes per `Data` frame of a download.
const PIECE: usize = 1 << 20;
/// Spooled files older than this were left by an agent that was killed; they are removed.
const STALE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A session's spool: files named `spool-PID-N` in `~/.cache/blksync/spool`, removed when the
/// session ends.
#[derive(Default)]
pub(crate) struct Spool {
    files: Vec<PathBuf>,
    keep: bool,
}

impl Spool {
    fn dir() -> PathBuf {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir);
        cache.join("blksync").join("spool")
    }

    /// A new, not yet existing path in the spool.
    pub(crate) fn path(&mut self) -> Result<PathBuf> {
        let dir = Spool::dir();
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).on("creating the spool", &dir)?;
        if self.files.is_empty() {
            remove_stale(&dir);
        }
        let path = dir.join(format!("spool-{}-{}", std::process::id(), self.files.len()));
        self.files.push(path.clone());
        Ok(path)
    }
}

impl Spool {
    /// Leaves the session's files in place (until they are stale) instead of removing them.
    pub(crate) fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let old = e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
        if old.is_some_and(|age| age > STALE) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A file being uploaded: written under a temporary name, renamed into place by `commit`, removed
/// if the session ends first. A spooled upload has no temporary name (the spool is private).
pub(crate) struct Upload {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl Upload {
    /// Starts an upload to `path` with permissions `mode` (0: 0600).
    pub(crate) fn start(path: PathBuf, mode: u32, spooled: bool) -> Result<Upload> {
        let tmp = if spooled {
            path.clone()
        } else {
            crate::delta::check_output(&path, &[])?;
            let mut name = path
                .file_name()
                .ok_or_else(|| Error::usage(format!("{} is not a file name", path.display())))?
                .to_os_string();
            name.push(format!(".tmp-{}", std::process::id()));
            path.with_file_name(name)
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if mode == 0 { 0o600 } else { mode })
            .open(&tmp)
            .on("creating", &tmp)?;
        Ok(Upload { file, tmp, path, committed: false })
    }

    /// Where the file ends up.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `data` at `offset`.
    pub(crate) fn write(&self, data: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(data, offset).map_err(|e| Error::io("writing", &self.tmp, Some(offset), e))
    }

    /// Makes the file durable under its final name.
    pub(crate) fn commit(mut self) -> Result<()> {
        self.file.sync_all().on("flushing", &self.tmp)?;
        if self.tmp != self.path {
            std::fs::rename(&self.tmp, &self.path).on("renaming into place", &self.path)?;
            let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            File::open(dir).and_then(|d| d.sync_all()).on("flushing directory", dir)?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Streams the file at `path` to the client: `Opened` with its size, `Data` frames in order
/// (compressed per `compress`), then `Done`.
pub(crate) fn send(path: &Path, compress: i32, replies: &Sender<Msg>, stop: &AtomicBool) -> Result<()> {
    let file = File::open(path).on("opening", path)?;
    let size = file.metadata().on("reading the size of", path)?.len();
    let reply = |msg| replies.send(msg).map_err(|_| Error::protocol("the client went away"));
    let caps = crate::endpoint::Caps::default();
    reply(Msg::Opened {
        exists: true,
        size,
        identity_tag: 0,
        id_a: 0,
        id_b: 0,
        created: false,
        mode: 0,
        caps: caps.to_bits(),
        block_size: caps.block_size,
        path: Vec::new(),
    })?;
    let mut compressor = Compressor::new(compress);
    let mut buf = crate::buffer::Aligned::new(PIECE);
    let mut offset = 0;
    while offset < size {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let n = (size - offset).min(PIECE as u64) as usize;
        file.read_exact_at(&mut buf[..n], offset).map_err(|e| Error::io("reading", path, Some(offset), e))?;
        reply(Msg::Data(compressor.encode(offset, &buf[..n])))?;
        offset += n as u64;
    }
    reply(Msg::Done)
}
