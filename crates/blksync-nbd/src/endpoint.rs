//! [`Nbd`]: an NBD export as a blksync `Source` and `Target` (`docs/NBD.md`, "Block status and
//! caps", "Alignment", "Errors").

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use blksync_core::endpoint::{Caps, Identity, Segment, Source, Target, report_cleanup_failure};
use blksync_core::extent::Extent;
use blksync_core::{Error, ErrorKind, Result};

use crate::address::NbdAddress;
use crate::connection::{Cause, Connection, Failure, Terms, extents_of};
use crate::handshake::Export;
use crate::socket::Socket;
use crate::wire::transmission::Request;
use crate::wire::{cmd, state, transmission_flag};

/// Default size of one READ or WRITE: the engine's 2 workers with 2 MiB buffers keep 16 of them
/// in flight.
pub const DEFAULT_REQUEST_SIZE: usize = 256 << 10;
/// The largest request this client sends, whatever the server allows: a hostile server's
/// "maximum payload" must not size our buffers.
const MAX_REQUEST_SIZE: usize = 32 << 20;
/// How much one block-status request asks about.
const STATUS_SPAN: u64 = 1 << 30;
/// How long the handshake may wait for the server.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How to open an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdOptions {
    /// Select qemu's dirty bitmap of this name (`qemu:dirty-bitmap:NAME`, exported by
    /// `qemu-nbd -B NAME`) for [`Nbd::changed_extents`]; the open fails when the server has
    /// none of that name.
    pub bitmap: Option<String>,
    /// Bytes per READ or WRITE request (default 256 KiB); raised to the server's preferred
    /// block size, capped by its maximum payload and 32 MiB, rounded to its minimum block.
    pub request_size: usize,
}

impl Default for NbdOptions {
    fn default() -> NbdOptions {
        NbdOptions { bitmap: None, request_size: DEFAULT_REQUEST_SIZE }
    }
}

/// An open NBD export.
pub struct Nbd {
    address: NbdAddress,
    name: PathBuf,
    export: Export,
    conn: Connection,
    writable: bool,
    /// The minimum block size: alignment of every request.
    align: u64,
    /// Bytes per READ/WRITE.
    piece: usize,
    segments: Mutex<Vec<Segment>>,
    zeros: OnceLock<Vec<u8>>,
    closed: AtomicBool,
}

impl std::fmt::Debug for Nbd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nbd")
            .field("address", &self.address.as_str())
            .field("export", &self.export)
            .field("writable", &self.writable)
            .field("request_size", &self.piece)
            .finish_non_exhaustive()
    }
}

impl Nbd {
    /// Connects to the export at `address` (`nbd://` or `nbd+unix://`, see [`crate::address`])
    /// and negotiates it. A `writable` open of a read-only export is refused right after the
    /// handshake, before any request.
    pub fn open(address: &str, writable: bool, options: &NbdOptions) -> Result<Nbd> {
        let address = crate::address::parse(address)?;
        let mut socket = Socket::connect(&address)?;
        let timeout = |s: &Socket, t| {
            s.set_read_timeout(t)
                .map_err(|e| Error::io("setting a timeout on the connection to", Path::new(address.as_str()), None, e))
        };
        timeout(&socket, Some(HANDSHAKE_TIMEOUT))?;
        let export = crate::handshake::negotiate(&mut socket, &address, options.bitmap.as_deref())?;
        timeout(&socket, None)?;
        if writable && export.has(transmission_flag::READ_ONLY) {
            let disc = Request { flags: 0, kind: cmd::DISC, cookie: 1, offset: 0, len: 0 };
            let _ = io::Write::write_all(&mut socket, &disc.encode());
            socket.shutdown();
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("{address} is a read-only export; refusing to open it as a destination"),
            ));
        }
        let sizes = export.block_sizes;
        let align = u64::from(sizes.minimum);
        let max = (sizes.maximum as usize).min(MAX_REQUEST_SIZE);
        let wanted = if options.request_size == 0 { DEFAULT_REQUEST_SIZE } else { options.request_size };
        let piece = wanted.max(sizes.preferred as usize).min(max);
        let piece = (piece / align as usize * align as usize).max(align as usize);
        let terms = Terms { structured: export.structured_replies, contexts: export.contexts.clone() };
        let conn = Connection::start(socket, terms)
            .map_err(|e| Error::io("starting the reader thread for", Path::new(address.as_str()), None, e))?;
        Ok(Nbd {
            name: PathBuf::from(address.as_str()),
            address,
            export,
            conn,
            writable,
            align,
            piece,
            segments: Mutex::new(Vec::new()),
            zeros: OnceLock::new(),
            closed: AtomicBool::new(false),
        })
    }

    /// The address, parsed.
    #[must_use]
    pub fn address(&self) -> &NbdAddress {
        &self.address
    }

    /// What the handshake agreed on.
    #[must_use]
    pub fn export(&self) -> &Export {
        &self.export
    }

    /// Bytes per READ or WRITE request, as chosen from the options and the server's sizes.
    #[must_use]
    pub fn request_size(&self) -> usize {
        self.piece
    }

    /// The parts of `[offset, offset + len)` that the dirty bitmap marks as written since it was
    /// created (bit 0 of `qemu:dirty-bitmap:NAME`), ascending and merged. `Unsupported` unless
    /// [`NbdOptions::bitmap`] named a bitmap.
    pub fn changed_extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let Some(context) = self.export.bitmap_context else {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{}: no dirty bitmap was selected when it was opened", self.address),
            ));
        };
        let end = offset.saturating_add(len).min(self.export.size);
        let mut out: Vec<Extent> = Vec::new();
        let mut start = offset / self.align * self.align;
        while start < end {
            let span = self.status_span(start);
            if span == 0 {
                // The unaligned tail cannot be asked about: count it as changed (never wrong).
                push_merged(&mut out, Extent::between(start.max(offset), end));
                break;
            }
            let chunks = self.conn.block_status(start, span).map_err(|f| self.error(&f))?;
            let mut at = start;
            for e in extents_of(&chunks, context) {
                let stop = (at + u64::from(e.len)).min(end);
                if e.flags & state::DIRTY != 0 && stop > offset {
                    push_merged(&mut out, Extent::between(at.max(offset), stop));
                }
                at = stop;
                if at >= end {
                    break;
                }
            }
            start = (at / self.align * self.align).max(start + self.align);
        }
        Ok(out)
    }

    /// How many bytes a block-status request from `start` (aligned) may ask about.
    fn status_span(&self, start: u64) -> u32 {
        let aligned_size = self.export.size / self.align * self.align;
        aligned_size.saturating_sub(start).min(STATUS_SPAN) as u32
    }

    fn error(&self, f: &Failure) -> Error {
        let address = self.address.as_str();
        let at = f.offset.map_or(String::new(), |o| format!(" at byte offset {o}"));
        match &f.cause {
            Cause::Server { errno, message } => {
                let os = io::Error::from_raw_os_error(crate::wire::local_errno(*errno));
                let source = if message.is_empty() {
                    os
                } else {
                    io::Error::new(os.kind(), format!("{} (the server said: {message})", crate::socket::io_text(&os)))
                };
                Error::io(f.op.verb(), Path::new(address), f.offset, source)
            }
            Cause::Connection(why) => {
                Error::new(ErrorKind::Connection, format!("{} {address}{at}: {why}", f.op.verb()))
            }
            Cause::Protocol(why) => Error::new(
                ErrorKind::Protocol,
                format!("{} {address}{at}: the server broke the NBD protocol: {why}", f.op.verb()),
            ),
        }
    }

    fn check_range(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.export.size => Ok(()),
            _ => Err(Error::new(
                ErrorKind::Io,
                format!(
                    "{what} {} at byte offset {offset}: {len} bytes would pass the end of the export ({} bytes)",
                    self.address, self.export.size
                ),
            )),
        }
    }

    fn check_aligned(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        if offset.is_multiple_of(self.align) && len.is_multiple_of(self.align) {
            return Ok(());
        }
        let tail = if !self.export.size.is_multiple_of(self.align) && offset + len == self.export.size {
            format!(
                "; the export's size ({} bytes) is not a multiple of it, so its last {} bytes cannot be addressed",
                self.export.size,
                self.export.size % self.align
            )
        } else {
            String::new()
        };
        Err(Error::usage(format!(
            "{what} {} at byte offset {offset}: {len} bytes are not aligned to the export's minimum block size of {} bytes{tail}",
            self.address, self.align
        )))
    }

    /// Checks that a write may go out: opened writable, no earlier write failed, in range and
    /// aligned. Marks the range allocated in the cache of block status.
    fn before_write(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::usage(format!("{what} {}: it was opened read-only", self.address)));
        }
        if let Some(f) = self.conn.failed_write() {
            return Err(self.error(&f));
        }
        self.check_range(what, offset, len)?;
        self.check_aligned(what, offset, len)?;
        mark_allocated(&mut self.segments.lock().unwrap_or_else(PoisonError::into_inner), offset, offset + len);
        Ok(())
    }

    /// Waits for outstanding replies, disconnects, and returns the first failed write.
    fn shut(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.conn.drain();
        // After the disconnect: a write whose reply never came has failed too.
        self.conn.disconnect();
        self.conn.failed_write().map_or(Ok(()), |f| Err(self.error(&f)))
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        if let Err(e) = self.shut() {
            report_cleanup_failure(&e);
        }
    }
}

/// Appends `e`, merging it into the last extent when they touch.
fn push_merged(out: &mut Vec<Extent>, e: Extent) {
    match out.last_mut() {
        Some(last) if last.end() >= e.offset => last.len = e.end().max(last.end()) - last.offset,
        _ if e.len > 0 => out.push(e),
        _ => {}
    }
}

/// Sets `[start, end)` allocated in a list of consecutive segments, merging neighbours.
fn mark_allocated(segments: &mut Vec<Segment>, start: u64, end: u64) {
    if start >= end || !segments.iter().any(|s| s.start < end && start < s.end && !s.allocated) {
        return;
    }
    let mut out: Vec<Segment> = Vec::with_capacity(segments.len() + 2);
    let mut push = |s: Segment| match out.last_mut() {
        Some(last) if last.allocated == s.allocated && last.end == s.start => last.end = s.end,
        _ if s.start < s.end => out.push(s),
        _ => {}
    };
    for s in segments.iter() {
        if s.allocated || s.end <= start || end <= s.start {
            push(*s);
            continue;
        }
        push(Segment { end: start.max(s.start), ..*s });
        push(Segment { start: start.max(s.start), end: end.min(s.end), allocated: true });
        push(Segment { start: end.min(s.end), ..*s });
    }
    *segments = out;
}

impl Source for Nbd {
    fn name(&self) -> &Path {
        &self.name
    }

    fn caps(&self) -> Caps {
        let minimum = self.export.block_sizes.minimum;
        Caps {
            resizable: false,
            holes: self.export.allocation_context.is_some(),
            zero_offload: self.export.has(transmission_flag::SEND_WRITE_ZEROES),
            discard_zeroes: false,
            changed_blocks: self.export.bitmap_context.is_some(),
            stable: false,
            unused_blocks: false,
            costly_writes: false,
            block_size: minimum.next_power_of_two().clamp(512, 1 << 20),
        }
    }

    fn size(&self) -> u64 {
        self.export.size
    }

    fn changed(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        if self.export.bitmap_context.is_none() {
            return Ok(vec![Extent { offset, len }]);
        }
        self.changed_extents(offset, len)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        self.check_range("reading", offset, len)?;
        if offset.is_multiple_of(self.align) && len.is_multiple_of(self.align) {
            return self.conn.read(offset, buf, self.piece).map_err(|f| self.error(&f));
        }
        // Widened to whole blocks through a bounce buffer.
        let start = offset / self.align * self.align;
        let end = (offset + len).div_ceil(self.align) * self.align;
        if end > self.export.size {
            return self.check_aligned("reading", offset, len);
        }
        let mut bounce = vec![0; (end - start) as usize];
        self.conn.read(start, &mut bounce, self.piece).map_err(|f| self.error(&f))?;
        let rel = (offset - start) as usize;
        buf.copy_from_slice(&bounce[rel..rel + buf.len()]);
        Ok(())
    }

    fn segment_at(&self, offset: u64) -> Result<Segment> {
        let size = self.export.size;
        if offset >= size {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "reading the allocation map of {} at byte offset {offset}: past its end ({size} bytes)",
                    self.address
                ),
            ));
        }
        let Some(context) = self.export.allocation_context else {
            return Ok(Segment { start: 0, end: size, allocated: true });
        };
        // The lock is held across the request, so that no write can start (and mark the cache)
        // between the server's answer and its being cached; the request itself waits for writes
        // in flight to its range.
        let mut cache = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = cache.iter().find(|s| s.start <= offset && offset < s.end) {
            return Ok(*s);
        }
        let mut start = offset / self.align * self.align;
        loop {
            let span = self.status_span(start);
            if span == 0 {
                return Ok(Segment { start: offset, end: size, allocated: true });
            }
            let chunks = match self.conn.block_status(start, span) {
                Ok(chunks) => chunks,
                // The server could not say (an error value, not a broken connection): count the
                // span as allocated, which is never wrong; a real I/O error shows when it is read.
                Err(Failure { cause: Cause::Server { .. }, .. }) => {
                    let s = Segment { start: offset, end: start + u64::from(span), allocated: true };
                    *cache = vec![s];
                    return Ok(s);
                }
                Err(f) => return Err(self.error(&f)),
            };
            let mut segments: Vec<Segment> = Vec::new();
            let mut at = start;
            for e in extents_of(&chunks, context) {
                let end = (at + u64::from(e.len)).min(size);
                // A hole is what reads as zeros: NBD_STATE_HOLE alone says nothing of that.
                let allocated = e.flags & state::ZERO == 0;
                match segments.last_mut() {
                    Some(last) if last.allocated == allocated => last.end = end,
                    _ => segments.push(Segment { start: at, end, allocated }),
                }
                at = end;
                if at >= size {
                    break;
                }
            }
            if let Some(s) = segments.iter().find(|s| s.start <= offset && offset < s.end).copied() {
                *cache = segments;
                return Ok(s);
            }
            // A reply that stopped short of an unaligned offset: ask again from where it ended.
            start = (at / self.align * self.align).max(start + self.align);
        }
    }

    fn drop_cache(&self, _offset: u64, _len: u64) {}

    fn identity(&self) -> Identity {
        Identity::None
    }

    fn close(self: Box<Self>) -> Result<()> {
        self.shut()
    }
}

impl Target for Nbd {
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.before_write("writing", offset, buf.len() as u64)?;
        self.conn.write(offset, buf, self.piece).map_err(|f| self.error(&f))
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.before_write("zeroing", offset, len)?;
        if self.export.has(transmission_flag::SEND_WRITE_ZEROES) {
            let piece = (self.export.block_sizes.maximum as usize).clamp(self.piece, MAX_REQUEST_SIZE);
            let piece = piece / self.align as usize * self.align as usize;
            return self.conn.write_zeroes(offset, len, piece).map_err(|f| self.error(&f));
        }
        let zeros = self.zeros.get_or_init(|| vec![0; self.piece]);
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            self.conn.write(at, &zeros[..n], self.piece).map_err(|f| self.error(&f))?;
            at += n as u64;
        }
        Ok(())
    }

    fn set_size(&self, size: u64) -> Result<()> {
        if size == self.export.size {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{}: an NBD export has a fixed size ({} bytes) and cannot be resized to {size} bytes",
                self.address, self.export.size
            ),
        ))
    }

    fn flush(&self) -> Result<()> {
        self.conn.flush(self.export.has(transmission_flag::SEND_FLUSH)).map_err(|f| self.error(&f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(start: u64, end: u64, allocated: bool) -> Segment {
        Segment { start, end, allocated }
    }

    #[test]
    fn writes_mark_cached_holes_allocated() {
        let mut s = vec![seg(0, 100, false), seg(100, 200, true), seg(200, 300, false)];
        mark_allocated(&mut s, 50, 60);
        assert_eq!(
            s,
            vec![seg(0, 50, false), seg(50, 60, true), seg(60, 100, false), seg(100, 200, true), seg(200, 300, false)]
        );
        mark_allocated(&mut s, 60, 100);
        assert_eq!(s, vec![seg(0, 50, false), seg(50, 200, true), seg(200, 300, false)]);
        mark_allocated(&mut s, 0, 50);
        assert_eq!(s, vec![seg(0, 200, true), seg(200, 300, false)]);
        mark_allocated(&mut s, 250, 400);
        assert_eq!(s, vec![seg(0, 200, true), seg(200, 250, false), seg(250, 300, true)]);
        mark_allocated(&mut s, 0, 300);
        assert_eq!(s, vec![seg(0, 300, true)]);
    }

    #[test]
    fn touching_extents_merge() {
        let mut out = Vec::new();
        push_merged(&mut out, Extent::between(0, 10));
        push_merged(&mut out, Extent::between(10, 20));
        push_merged(&mut out, Extent::between(30, 40));
        push_merged(&mut out, Extent::between(35, 35));
        assert_eq!(out, vec![Extent::between(0, 20), Extent::between(30, 40)]);
    }
}
