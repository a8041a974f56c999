//! An endpoint held in memory, whose capabilities a test sets: the seam for testing the engine
//! and the endpoint contract without files, devices or root.
//!
//! What can be set:
//! - whether it can be resized (a file) or has a fixed size (a device);
//! - whether it reports holes: where it was never written, or was zeroed, `segment_at` says
//!   "hole"; without that it reports everything as allocated, the answer that is never wrong;
//! - a failure at a byte offset, for error paths: any read (or any write or zero) that covers
//!   the offset fails as a disk would, with an I/O error naming it.
//!
//! The defaults are the answers that are never wrong: a fixed size and no holes.
//!
//! ```
//! use blksync_core::endpoint::memory::Memory;
//! use blksync_core::endpoint::{Source, Target};
//!
//! let image = Memory::new("image", 8192).resizable(true).reports_holes(true);
//! image.write_at(b"data", 4096)?;
//! assert!(!image.segment_at(0)?.allocated);
//! assert_eq!(&image.contents()[4096..4100], b"data");
//! # Ok::<(), blksync_core::Error>(())
//! ```

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};

use crate::endpoint::{Identity, Segment, Source, Target};
use crate::error::{Error, ErrorKind, Result};

/// Which operations an injected failure hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `read_at`.
    Read,
    /// `write_at` and `zero`.
    Write,
}

/// An in-memory source and target (see the module documentation).
#[derive(Debug)]
pub struct Memory {
    name: PathBuf,
    resizable: bool,
    holes: bool,
    state: RwLock<State>,
    failure: Mutex<Option<(u64, Op)>>,
    flushes: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    bytes: Vec<u8>,
    /// The allocated stretches, start to end, disjoint and not touching: what was written and
    /// not zeroed since.
    allocated: BTreeMap<u64, u64>,
}

impl State {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn allocate(&mut self, start: u64, end: u64) {
        let (mut start, mut end) = (start, end);
        // Swallow every stretch that overlaps or touches [start, end).
        let touching: Vec<(u64, u64)> =
            self.allocated.range(..=end).filter(|&(_, &e)| e >= start).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in touching {
            self.allocated.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.allocated.insert(start, end);
    }

    fn deallocate(&mut self, start: u64, end: u64) {
        let overlapping: Vec<(u64, u64)> =
            self.allocated.range(..end).filter(|&(_, &e)| e > start).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in overlapping {
            self.allocated.remove(&s);
            if s < start {
                self.allocated.insert(s, start);
            }
            if e > end {
                self.allocated.insert(end, e);
            }
        }
    }
}

impl Memory {
    /// An endpoint called `name` of `size` zero bytes, never written (so all a hole, where it
    /// reports holes), with the defaults that are never wrong: a fixed size and no holes
    /// reported.
    pub fn new(name: impl Into<PathBuf>, size: u64) -> Memory {
        let bytes = vec![0; usize::try_from(size).unwrap_or(usize::MAX)];
        Memory::with_bytes(name, bytes).with_hole(0, size)
    }

    /// An endpoint holding `bytes`, all of them allocated.
    pub fn with_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Memory {
        let mut state = State { bytes, allocated: BTreeMap::new() };
        let size = state.size();
        if size > 0 {
            state.allocate(0, size);
        }
        Memory {
            name: name.into(),
            resizable: false,
            holes: false,
            state: RwLock::new(state),
            failure: Mutex::new(None),
            flushes: AtomicU64::new(0),
        }
    }

    /// The same endpoint, resizable (as a file) or of a fixed size (as a device).
    #[must_use]
    pub fn resizable(self, resizable: bool) -> Memory {
        Memory { resizable, ..self }
    }

    /// The same endpoint, reporting holes where it was never written or was zeroed (`true`), or
    /// everything as allocated (`false`).
    #[must_use]
    pub fn reports_holes(self, holes: bool) -> Memory {
        Memory { holes, ..self }
    }

    /// The same endpoint, with `[offset, offset + len)` a hole (where it reports holes; its
    /// bytes are zeroed either way), as a sparse image would have.
    #[must_use]
    pub fn with_hole(self, offset: u64, len: u64) -> Memory {
        {
            let mut state = self.write_state();
            let end = (offset + len).min(state.size());
            let start = offset.min(end);
            state.bytes[start as usize..end as usize].fill(0);
            state.deallocate(start, end);
        }
        self
    }

    /// Makes every later operation `op` that covers byte `offset` fail with an I/O error (EIO),
    /// until [`Memory::clear_failure`].
    pub fn fail_at(&self, offset: u64, op: Op) {
        *self.failure.lock().unwrap_or_else(PoisonError::into_inner) = Some((offset, op));
    }

    /// Removes the failure set by [`Memory::fail_at`].
    pub fn clear_failure(&self) {
        *self.failure.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// A copy of all the bytes.
    #[must_use]
    pub fn contents(&self) -> Vec<u8> {
        self.read_state().bytes.clone()
    }

    /// How many times [`Target::flush`] was called.
    #[must_use]
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The injected failure, if `op` on `[offset, offset + len)` hits it.
    fn check(&self, op: Op, verb: &str, offset: u64, len: u64) -> Result<()> {
        match *self.failure.lock().unwrap_or_else(PoisonError::into_inner) {
            Some((at, o)) if o == op && offset <= at && at < offset + len.max(1) => {
                Err(Error::io(verb, &self.name, Some(at), io::Error::from_raw_os_error(libc::EIO)))
            }
            _ => Ok(()),
        }
    }

    fn past_end(&self, verb: &str, offset: u64, len: u64, size: u64) -> Error {
        Error::new(
            ErrorKind::Io,
            format!(
                "{verb} {} at byte offset {offset}: {len} bytes would pass its end ({size} bytes)",
                self.name.display()
            ),
        )
    }
}

impl Source for Memory {
    fn name(&self) -> &Path {
        &self.name
    }

    fn caps(&self) -> super::Caps {
        super::Caps { resizable: self.resizable, holes: self.holes, ..super::Caps::default() }
    }

    fn size(&self) -> u64 {
        self.read_state().size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(Op::Read, "reading", offset, buf.len() as u64)?;
        let state = self.read_state();
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= state.size());
        let Some(end) = end else { return Err(self.past_end("reading", offset, buf.len() as u64, state.size())) };
        buf.copy_from_slice(&state.bytes[offset as usize..end as usize]);
        Ok(())
    }

    fn segment_at(&self, offset: u64) -> Result<Segment> {
        let state = self.read_state();
        let size = state.size();
        if offset >= size {
            return Err(Error::usage(format!(
                "{}: no segment at byte offset {offset}, past its end ({size} bytes)",
                self.name.display()
            )));
        }
        if !self.holes {
            return Ok(Segment { start: offset, end: size, allocated: true });
        }
        if let Some((_, &end)) = state.allocated.range(..=offset).next_back()
            && end > offset
        {
            return Ok(Segment { start: offset, end: end.min(size), allocated: true });
        }
        let next = state.allocated.range(offset..).next().map_or(size, |(&start, _)| start);
        Ok(Segment { start: offset, end: next.min(size), allocated: false })
    }

    fn drop_cache(&self, _offset: u64, _len: u64) {}

    fn identity(&self) -> Identity {
        Identity::None
    }
}

impl Target for Memory {
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check(Op::Write, "writing", offset, buf.len() as u64)?;
        let mut state = self.write_state();
        let end = offset + buf.len() as u64;
        if end > state.size() {
            // As pwrite does: a file grows, a device is full.
            if !self.resizable {
                return Err(Error::io("writing", &self.name, Some(offset), io::Error::from_raw_os_error(libc::ENOSPC)));
            }
            state.bytes.resize(end as usize, 0);
        }
        state.bytes[offset as usize..end as usize].copy_from_slice(buf);
        if !buf.is_empty() {
            state.allocate(offset, end);
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check(Op::Write, "zeroing", offset, len)?;
        let mut state = self.write_state();
        let size = state.size();
        // A file keeps its size (PUNCH_HOLE | KEEP_SIZE); a device has nothing past its end.
        let end = match offset.checked_add(len) {
            Some(end) if end <= size => end,
            Some(_) if self.resizable => size,
            _ => return Err(self.past_end("zeroing", offset, len, size)),
        };
        let start = offset.min(end);
        state.bytes[start as usize..end as usize].fill(0);
        state.deallocate(start, end);
        Ok(())
    }

    fn set_size(&self, size: u64) -> Result<()> {
        if !self.resizable {
            return Err(Error::new(ErrorKind::Unsupported, format!("{} cannot be resized", self.name.display())));
        }
        let mut state = self.write_state();
        let old = state.size();
        state.bytes.resize(usize::try_from(size).unwrap_or(usize::MAX), 0);
        if size < old {
            state.deallocate(size, old);
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(m: &Memory) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < m.size() {
            let s = m.segment_at(pos).unwrap();
            out.push((s.start, s.end, s.allocated));
            pos = s.end;
        }
        out
    }

    #[test]
    fn holes_are_where_nothing_was_written_or_zeros_were() {
        let m = Memory::new("m", 100).reports_holes(true);
        assert_eq!(segments(&m), [(0, 100, false)]);
        m.write_at(b"abc", 10).unwrap();
        m.write_at(b"de", 13).unwrap();
        m.write_at(b"x", 50).unwrap();
        assert_eq!(segments(&m), [(0, 10, false), (10, 15, true), (15, 50, false), (50, 51, true), (51, 100, false)]);
        m.zero(12, 40).unwrap();
        assert_eq!(segments(&m), [(0, 10, false), (10, 12, true), (12, 100, false)]);
        assert_eq!(&m.contents()[10..15], b"ab\0\0\0");
    }

    #[test]
    fn without_holes_everything_is_allocated() {
        let m = Memory::new("m", 100);
        assert_eq!(segments(&m), [(0, 100, true)]);
    }

    #[test]
    fn an_injected_failure_hits_only_what_covers_its_offset() {
        let m = Memory::new("m", 100);
        m.fail_at(40, Op::Read);
        let mut buf = [0; 10];
        assert!(m.read_at(&mut buf, 30).is_ok());
        let e = m.read_at(&mut buf, 35).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.to_string().contains("byte offset 40"), "{e}");
        assert!(m.write_at(&buf, 35).is_ok(), "writes are not hit");
        m.fail_at(40, Op::Write);
        assert!(m.zero(40, 1).is_err());
        m.clear_failure();
        assert!(m.zero(40, 1).is_ok());
    }

    #[test]
    fn only_a_resizable_endpoint_grows() {
        let device = Memory::new("d", 10);
        assert_eq!(device.set_size(20).unwrap_err().kind(), ErrorKind::Unsupported);
        assert!(device.write_at(b"xy", 9).is_err());
        let file = Memory::new("f", 10).resizable(true);
        file.write_at(b"xy", 9).unwrap();
        assert_eq!(file.size(), 11);
        file.set_size(4).unwrap();
        assert_eq!(file.contents(), [0; 4]);
    }
}
