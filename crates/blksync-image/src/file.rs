//! The image's file: positioned reads and writes, hole punching, sync and truncation, each error
//! naming the path and the file offset.
//!
//! Every operation that changes the file passes one counter, so that the crash tests can stop
//! the image after any number of them (the last write torn in half) and check what a reopened
//! image holds.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use blksync_core::error::IoContext;
use blksync_core::{Error, ErrorKind, Result};
use rustix::fs::FallocateFlags;

/// An open image file.
#[derive(Debug)]
pub struct ImageFile {
    path: PathBuf,
    file: File,
    /// Cleared the first time the filesystem refuses to punch a hole: freed space is then
    /// reused but stays allocated.
    can_punch: AtomicBool,
    #[cfg(test)]
    pub(crate) faults: faults::Faults,
}

impl ImageFile {
    /// Wraps `file`, opened at `path`.
    pub fn new(path: &Path, file: File) -> ImageFile {
        ImageFile {
            path: path.to_path_buf(),
            file,
            can_punch: AtomicBool::new(true),
            #[cfg(test)]
            faults: faults::Faults::default(),
        }
    }

    /// The path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file itself (metadata, locks, advice).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Fills `buf` from file offset `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "reading {} at file offset {offset}: unexpected end of file (truncated?)",
                        self.path.display()
                    ),
                )
            } else {
                Error::io("reading", &self.path, Some(offset), e)
            }
        })
    }

    /// Writes `buf` at file offset `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        #[cfg(test)]
        if self.faults.tick(&self.path)? {
            // The crash hits in the middle of this write: half of it lands.
            let half = buf.len() / 2;
            self.file.write_all_at(&buf[..half], offset).at("writing", &self.path, offset)?;
            return Err(faults::crashed(&self.path));
        }
        self.file.write_all_at(buf, offset).at("writing", &self.path, offset)
    }

    /// Frees `[offset, offset + len)` (which then reads as zeros) where the filesystem can.
    pub fn punch(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 || !self.can_punch.load(Ordering::Relaxed) {
            return Ok(());
        }
        #[cfg(test)]
        if self.faults.tick(&self.path)? {
            return Err(faults::crashed(&self.path));
        }
        let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, mode, offset, len) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS | rustix::io::Errno::INVAL) => {
                self.can_punch.store(false, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(e).at("punching a hole in", &self.path, offset),
        }
    }

    /// Makes everything written so far durable (`fdatasync`).
    pub fn sync(&self) -> Result<()> {
        #[cfg(test)]
        if self.faults.tick(&self.path)? {
            return Err(faults::crashed(&self.path));
        }
        self.file.sync_data().map_err(|e| {
            let err = Error::io("flushing", &self.path, None, e);
            Error::new(err.kind(), format!("{err} (a write since the last flush did not reach the disk)"))
        })
    }

    /// Cuts the file to `len` bytes.
    pub fn set_len(&self, len: u64) -> Result<()> {
        #[cfg(test)]
        if self.faults.tick(&self.path)? {
            return Err(faults::crashed(&self.path));
        }
        self.file.set_len(len).on("resizing", &self.path)
    }
}

#[cfg(test)]
pub(crate) mod faults {
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use blksync_core::{Error, ErrorKind, Result};

    /// A crash planned after a number of changes to the file.
    #[derive(Debug)]
    pub struct Faults {
        /// Changes left before the crash; `u64::MAX` for none planned.
        pub left: AtomicU64,
        /// Changes made so far.
        pub done: AtomicU64,
        /// The crash happened: nothing more is written.
        pub dead: AtomicBool,
    }

    impl Default for Faults {
        fn default() -> Faults {
            Faults { left: AtomicU64::new(u64::MAX), done: AtomicU64::new(0), dead: AtomicBool::new(false) }
        }
    }

    pub fn crashed(path: &Path) -> Error {
        Error::new(ErrorKind::Io, format!("{}: simulated crash", path.display()))
    }

    impl Faults {
        /// Counts one change: true when the crash hits this one, an error after it.
        pub fn tick(&self, path: &Path) -> Result<bool> {
            if self.dead.load(Ordering::SeqCst) {
                return Err(crashed(path));
            }
            self.done.fetch_add(1, Ordering::SeqCst);
            let left = self.left.load(Ordering::SeqCst);
            if left == u64::MAX {
                return Ok(false);
            }
            if left == 0 {
                self.dead.store(true, Ordering::SeqCst);
                return Ok(true);
            }
            self.left.store(left - 1, Ordering::SeqCst);
            Ok(false)
        }
    }
}
