//! One connection in the transmission phase, shared by every thread that uses the endpoint.
//!
//! ```text
//!  callers ──register (state lock)──▶ pending: cookie → request
//!          ──send (writer lock)─────▶ socket ──▶ server
//!  reader thread ◀── replies ──────── socket
//!      └─ finds the request by cookie, fills its buffer, completes it:
//!         a waiting caller gets it over its channel; a write-behind updates the window
//! ```
//!
//! Requests are registered before they are sent, so a reply can never arrive for a request the
//! reader does not know yet; a reply for a cookie that is not pending is a protocol error.
//! Writes do not wait for their replies (write-behind, bounded by a window), and the first one
//! that fails is kept and returned by every write-side call after it. A read or write that
//! overlaps a write still in flight waits for it, since a server may execute requests in any
//! order. When the reader stops (end of file, an error, a protocol violation), every pending
//! request fails with the cause, and so does every later call: nothing waits forever.

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use crate::socket::{Socket, io_text};
use crate::wire::transmission::{BlockStatus, ChunkHeader, ErrorChunk, Extent, OffsetHole, ReplyHeader, Request};
use crate::wire::transmission::{MAX_ERROR_CHUNK, MAX_STATUS_CHUNK};
use crate::wire::{cmd, errno, reply};

/// Write-behind window: requests in flight without a waiting caller.
const MAX_BEHIND: usize = 64;
/// Write-behind window: their payload bytes.
const MAX_BEHIND_BYTES: u64 = 64 << 20;
/// Error chunks accepted in one reply.
const MAX_ERROR_CHUNKS: u32 = 64;
/// Bytes of read buffers kept for reuse (32 of the default 256 KiB pieces).
const POOL_BYTES: usize = 8 << 20;

/// What a request was for, which names the operation in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Read,
    Write,
    Zero,
    Flush,
    Status,
}

impl Op {
    pub(crate) fn verb(self) -> &'static str {
        match self {
            Op::Read => "reading",
            Op::Write => "writing",
            Op::Zero => "zeroing",
            Op::Flush => "flushing",
            Op::Status => "reading the allocation map of",
        }
    }
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The server answered with an error value, and maybe a message.
    Server { errno: u32, message: String },
    /// The connection is gone.
    Connection(String),
    /// The server broke the protocol; the connection was closed.
    Protocol(String),
}

/// A failed request: what, where, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub op: Op,
    pub offset: Option<u64>,
    pub cause: Cause,
}

/// What a completed request gives its caller.
enum Payload {
    Data(Vec<u8>),
    Status(Vec<BlockStatus>),
    Unit,
}

struct Done {
    offset: u64,
    result: Result<Payload, Failure>,
}

/// Where a reply goes.
enum Sink {
    /// A read: its buffer, the content chunks that filled it (relative start and end), and
    /// how many bytes they cover.
    Read { buf: Vec<u8>, covered: Vec<(u32, u32)>, bytes: u64, tx: Sender<Done> },
    /// A block status: one chunk per context.
    Status { chunks: Vec<BlockStatus>, tx: Sender<Done> },
    /// A flush: only success or failure.
    Wait { tx: Sender<Done> },
    /// A write or zero nobody waits for.
    Behind,
}

struct Pending {
    op: Op,
    offset: u64,
    len: u32,
    sink: Sink,
    error: Option<Failure>,
    error_chunks: u32,
}

impl Pending {
    fn is_write(&self) -> bool {
        matches!(self.op, Op::Write | Op::Zero)
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.offset < end && start < self.offset + u64::from(self.len)
    }

    fn fail(&self, cause: Cause, offset: Option<u64>) -> Failure {
        Failure { op: self.op, offset: offset.or(Some(self.offset)).filter(|_| self.op != Op::Flush), cause }
    }
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    /// Why new requests are refused: the connection stopped, or the server is shutting down.
    refused: Option<Cause>,
    /// The reader has stopped: no reply will come.
    dead: bool,
    /// Write-behind requests in flight and their bytes.
    behind: usize,
    behind_bytes: u64,
    /// The first write-behind that failed.
    failed_write: Option<Failure>,
}

impl State {
    fn write_in_flight(&self, start: u64, end: u64) -> bool {
        self.pending.values().any(|p| p.is_write() && p.overlaps(start, end))
    }

    /// Completes a request: its caller gets the result, or the window gets the write back.
    fn complete(&mut self, p: Pending, result: Result<Payload, Failure>) {
        let done = |r| Done { offset: p.offset, result: r };
        match p.sink {
            Sink::Read { tx, .. } | Sink::Status { tx, .. } | Sink::Wait { tx } => {
                let _ = tx.send(done(result));
            }
            Sink::Behind => {
                self.behind -= 1;
                self.behind_bytes -= if p.op == Op::Write { u64::from(p.len) } else { 0 };
                if let Err(f) = result {
                    self.failed_write.get_or_insert(f);
                }
            }
        }
    }

    /// Stops the connection: every pending request fails with the first cause.
    fn die(&mut self, cause: Cause) {
        self.dead = true;
        let cause = self.refused.get_or_insert(cause).clone();
        for (_, p) in std::mem::take(&mut self.pending) {
            let failure = p.fail(cause.clone(), None);
            self.complete(p, Err(failure));
        }
    }
}

struct Shared {
    state: Mutex<State>,
    /// Signalled whenever a request completes or the connection dies.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What the connection knows of the export, for the reader's checks.
#[derive(Debug, Clone)]
pub(crate) struct Terms {
    pub structured: bool,
    /// Every context id the server selected.
    pub contexts: Vec<u32>,
}

/// The transmission phase of one connection.
pub(crate) struct Connection {
    socket: Socket,
    writer: Mutex<Socket>,
    shared: Arc<Shared>,
    reader: Mutex<Option<JoinHandle<()>>>,
    cookies: AtomicU64,
    pool: Mutex<Vec<Vec<u8>>>,
}

/// One request to register: what it is, where, and its sink.
struct New {
    op: Op,
    kind: u16,
    offset: u64,
    len: u32,
    sink: Sink,
}

impl Connection {
    /// Starts the reader thread on `socket`, whose handshake is done.
    pub(crate) fn start(socket: Socket, terms: Terms) -> std::io::Result<Connection> {
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), changed: Condvar::new() });
        let reading = socket.try_clone()?;
        let writer = socket.try_clone()?;
        let for_reader = Arc::clone(&shared);
        let reader = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || Reader { input: BufReader::with_capacity(64 << 10, reading), terms }.run(&for_reader))?;
        Ok(Connection {
            socket,
            writer: Mutex::new(writer),
            shared,
            reader: Mutex::new(Some(reader)),
            cookies: AtomicU64::new(1),
            pool: Mutex::new(Vec::new()),
        })
    }

    /// Reads `out.len()` bytes at `offset` in pieces of at most `piece` bytes, all sent before
    /// the first reply is awaited.
    pub(crate) fn read(&self, offset: u64, out: &mut [u8], piece: usize) -> Result<(), Failure> {
        if out.is_empty() {
            return Ok(());
        }
        let (tx, rx) = channel();
        let mut new = Vec::new();
        for (rel, len) in pieces(out.len(), piece) {
            let buf = self.buffer(len);
            let sink = Sink::Read { buf, covered: Vec::new(), bytes: 0, tx: tx.clone() };
            new.push(New { op: Op::Read, kind: cmd::READ, offset: offset + rel as u64, len: len as u32, sink });
        }
        drop(tx);
        let count = new.len();
        self.submit(new, offset, offset + out.len() as u64, false, &[])?;
        let mut first: Option<Failure> = None;
        for _ in 0..count {
            let Ok(done) = rx.recv() else {
                return Err(self.lost(Op::Read, offset));
            };
            match done.result {
                Ok(Payload::Data(buf)) => {
                    let rel = (done.offset - offset) as usize;
                    out[rel..rel + buf.len()].copy_from_slice(&buf);
                    self.recycle(buf);
                }
                Ok(_) => unreachable!("a read completes with data"),
                Err(f) => {
                    if first.as_ref().is_none_or(|e| f.offset < e.offset) {
                        first = Some(f);
                    }
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Sends `data` as writes of at most `piece` bytes and returns without waiting for replies.
    pub(crate) fn write(&self, offset: u64, data: &[u8], piece: usize) -> Result<(), Failure> {
        for (rel, len) in pieces(data.len(), piece) {
            let at = offset + rel as u64;
            let new = New { op: Op::Write, kind: cmd::WRITE, offset: at, len: len as u32, sink: Sink::Behind };
            self.submit(vec![new], at, at + len as u64, true, &data[rel..rel + len])?;
        }
        Ok(())
    }

    /// Sends `WRITE_ZEROES` requests of at most `piece` bytes each, without waiting for replies.
    pub(crate) fn write_zeroes(&self, offset: u64, len: u64, piece: usize) -> Result<(), Failure> {
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(piece as u64) as u32;
            let new = New { op: Op::Zero, kind: cmd::WRITE_ZEROES, offset: at, len: n, sink: Sink::Behind };
            self.submit(vec![new], at, at + u64::from(n), true, &[])?;
            at += u64::from(n);
        }
        Ok(())
    }

    /// Block status of `[offset, offset + len)`: one chunk per context.
    pub(crate) fn block_status(&self, offset: u64, len: u32) -> Result<Vec<BlockStatus>, Failure> {
        let (tx, rx) = channel();
        let sink = Sink::Status { chunks: Vec::new(), tx };
        let new = New { op: Op::Status, kind: cmd::BLOCK_STATUS, offset, len, sink };
        self.submit(vec![new], offset, offset + u64::from(len), false, &[])?;
        match rx.recv().map_err(|_| self.lost(Op::Status, offset))?.result? {
            Payload::Status(chunks) => Ok(chunks),
            _ => unreachable!("a block status completes with status"),
        }
    }

    /// Waits for every write in flight, then fails if one failed, then sends FLUSH when the
    /// server has it.
    pub(crate) fn flush(&self, send_flush: bool) -> Result<(), Failure> {
        self.drain();
        if let Some(f) = self.failed_write() {
            return Err(f);
        }
        if !send_flush {
            return Ok(());
        }
        let (tx, rx) = channel();
        let new = New { op: Op::Flush, kind: cmd::FLUSH, offset: 0, len: 0, sink: Sink::Wait { tx } };
        self.submit(vec![new], 0, 0, false, &[])?;
        rx.recv().map_err(|_| self.lost(Op::Flush, 0))?.result.map(|_| ())
    }

    /// The first write-behind that failed, if any.
    pub(crate) fn failed_write(&self) -> Option<Failure> {
        self.shared.lock().failed_write.clone()
    }

    /// Waits until no write is in flight (or the connection is gone).
    pub(crate) fn drain(&self) {
        let mut state = self.shared.lock();
        while state.behind > 0 && !state.dead {
            state = self.shared.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Ends the connection: `NBD_CMD_DISC` (no reply comes), then the socket is shut and the
    /// reader thread joined. Requests still in flight fail; call [`Connection::drain`] first.
    pub(crate) fn disconnect(&self) {
        let Some(reader) = self.reader.lock().unwrap_or_else(PoisonError::into_inner).take() else { return };
        // Harmless when the connection is already broken (the write fails, quietly).
        let disc = Request { flags: 0, kind: cmd::DISC, cookie: self.cookie(), offset: 0, len: 0 };
        let _ = self.writer.lock().unwrap_or_else(PoisonError::into_inner).write_all(&disc.encode());
        self.socket.shutdown();
        let _ = reader.join();
        self.shared.lock().die(Cause::Connection("the connection was closed".into()));
        self.shared.changed.notify_all();
    }

    /// Registers requests (waiting until none overlaps a write in flight in `[start, end)`
    /// and, for write-behind, until the window has room), then sends them, with `payload` after
    /// a single write's header.
    fn submit(&self, new: Vec<New>, start: u64, end: u64, behind: bool, payload: &[u8]) -> Result<(), Failure> {
        let first = (new[0].op, new[0].offset);
        let mut headers = Vec::with_capacity(new.len() * Request::LEN);
        {
            let mut state = self.shared.lock();
            loop {
                if let Some(cause) = &state.refused {
                    return Err(Failure { op: first.0, offset: Some(first.1), cause: cause.clone() });
                }
                let full = behind
                    && state.behind > 0
                    && (state.behind >= MAX_BEHIND || state.behind_bytes + payload.len() as u64 > MAX_BEHIND_BYTES);
                if !full && !state.write_in_flight(start, end) {
                    break;
                }
                state = self.shared.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
            }
            for n in new {
                let cookie = self.cookie();
                headers.extend_from_slice(
                    &Request { flags: 0, kind: n.kind, cookie, offset: n.offset, len: n.len }.encode(),
                );
                if behind {
                    state.behind += 1;
                    state.behind_bytes += payload.len() as u64;
                }
                let p = Pending { op: n.op, offset: n.offset, len: n.len, sink: n.sink, error: None, error_chunks: 0 };
                state.pending.insert(cookie, p);
            }
        }
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let sent = writer.write_all(&headers).and_then(|()| writer.write_all(payload));
        drop(writer);
        sent.map_err(|e| {
            let cause = Cause::Connection(format!("sending to the server failed: {}", io_text(&e)));
            self.shared.lock().die(cause.clone());
            self.shared.changed.notify_all();
            self.socket.shutdown();
            Failure { op: first.0, offset: Some(first.1), cause }
        })
    }

    fn cookie(&self) -> u64 {
        self.cookies.fetch_add(1, Ordering::Relaxed)
    }

    fn lost(&self, op: Op, offset: u64) -> Failure {
        let cause = self.shared.lock().refused.clone();
        Failure { op, offset: Some(offset), cause: cause.unwrap_or(Cause::Connection("the reader stopped".into())) }
    }

    fn buffer(&self, len: usize) -> Vec<u8> {
        let mut buf = self.pool.lock().unwrap_or_else(PoisonError::into_inner).pop().unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    fn recycle(&self, buf: Vec<u8>) {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        if pool.iter().map(Vec::capacity).sum::<usize>() + buf.capacity() <= POOL_BYTES {
            pool.push(buf);
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.disconnect();
    }
}

/// `(start, len)` pieces of at most `piece` bytes covering `len` bytes.
fn pieces(len: usize, piece: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len).step_by(piece.max(1)).map(move |start| (start, piece.min(len - start)))
}

/// The reader thread: reads every reply and completes its request.
struct Reader {
    input: BufReader<Socket>,
    terms: Terms,
}

impl Reader {
    fn run(mut self, shared: &Shared) {
        let cause = loop {
            if let Err(cause) = self.one(shared) {
                break cause;
            }
        };
        shared.lock().die(cause);
        shared.changed.notify_all();
    }

    /// Reads one reply message and acts on it.
    fn one(&mut self, shared: &Shared) -> Result<(), Cause> {
        let mut header = [0; ReplyHeader::CHUNK_LEN];
        self.input.read_exact(&mut header[..4]).map_err(|e| broken(&e, true))?;
        let len = ReplyHeader::len_for(header[..4].try_into().unwrap_or_default()).map_err(protocol)?;
        self.input.read_exact(&mut header[4..len]).map_err(|e| broken(&e, false))?;
        let header = ReplyHeader::decode(&header[..len]).map_err(protocol)?;
        let cookie = match header {
            ReplyHeader::Simple(s) => s.cookie,
            ReplyHeader::Chunk(c) => c.cookie,
        };
        let Some(mut p) = shared.lock().pending.remove(&cookie) else {
            return Err(Cause::Protocol(format!("a reply to cookie {cookie}, which is no request in flight")));
        };
        // The request is out of the table while its payload is read (no lock held during I/O);
        // on any error it goes back, so that dying fails it with the others.
        let outcome = match header {
            ReplyHeader::Simple(s) => self.simple(&mut p, s.error).map(|()| true),
            ReplyHeader::Chunk(c) => self.chunk(&mut p, c).map(|()| c.done()),
        };
        let mut state = shared.lock();
        if let Some(Failure { cause: cause @ Cause::Connection(_), .. }) = &p.error {
            // NBD_ESHUTDOWN: the protocol says to disconnect; nothing new is sent, and the
            // replies to what is in flight are still read.
            state.refused.get_or_insert_with(|| cause.clone());
        }
        match outcome {
            Ok(true) => {
                let result = finish(&mut p, &self.terms);
                if let Err(Failure { cause: Cause::Protocol(why), .. }) = &result {
                    let why = why.clone();
                    state.pending.insert(cookie, p);
                    return Err(Cause::Protocol(why));
                }
                state.complete(p, result);
                drop(state);
                shared.changed.notify_all();
                Ok(())
            }
            Ok(false) => {
                state.pending.insert(cookie, p);
                Ok(())
            }
            Err(cause) => {
                state.pending.insert(cookie, p);
                Err(cause)
            }
        }
    }

    fn simple(&mut self, p: &mut Pending, error: u32) -> Result<(), Cause> {
        if error != 0 {
            p.error = Some(p.fail(server(error, String::new()), None));
            return Ok(());
        }
        match &mut p.sink {
            Sink::Read { .. } if self.terms.structured => {
                Err(Cause::Protocol("a simple reply with data to a read, though structured replies were agreed".into()))
            }
            Sink::Read { buf, covered, bytes, .. } => {
                self.input.read_exact(buf).map_err(|e| broken(&e, false))?;
                covered.push((0, p.len));
                *bytes = u64::from(p.len);
                Ok(())
            }
            Sink::Status { .. } => {
                Err(Cause::Protocol("a simple reply without error to a block-status request".into()))
            }
            Sink::Wait { .. } | Sink::Behind => Ok(()),
        }
    }

    fn chunk(&mut self, p: &mut Pending, c: ChunkHeader) -> Result<(), Cause> {
        if !self.terms.structured {
            return Err(Cause::Protocol("a structured reply chunk, though structured replies were not agreed".into()));
        }
        let (start, end) = (p.offset, p.offset + u64::from(p.len));
        match (c.kind, &mut p.sink) {
            (reply::NONE, _) if c.len == 0 && c.done() => Ok(()),
            (reply::NONE, _) => Err(Cause::Protocol("a NONE chunk with a payload or without DONE".into())),
            (reply::OFFSET_DATA, Sink::Read { buf, covered, bytes, .. }) => {
                // Bounded by the request before a byte of it is read.
                if c.len <= 8 || c.len - 8 > p.len {
                    return Err(Cause::Protocol(format!(
                        "an OFFSET_DATA chunk of {} bytes for a read of {}",
                        c.len, p.len
                    )));
                }
                let mut at = [0; 8];
                self.input.read_exact(&mut at).map_err(|e| broken(&e, false))?;
                let at = u64::from_be_bytes(at);
                let n = c.len - 8;
                let rel = within(at, u64::from(n), start, end, "OFFSET_DATA")?;
                add_content(covered, bytes, rel, n, p.len)?;
                self.input.read_exact(&mut buf[rel as usize..(rel + n) as usize]).map_err(|e| broken(&e, false))
            }
            (reply::OFFSET_HOLE, Sink::Read { buf, covered, bytes, .. }) => {
                if c.len as usize != OffsetHole::LEN {
                    return Err(Cause::Protocol(format!("an OFFSET_HOLE chunk of {} bytes", c.len)));
                }
                let payload = self.payload(c.len)?;
                let hole = OffsetHole::decode(&payload).map_err(protocol)?;
                let rel = within(hole.offset, u64::from(hole.size), start, end, "OFFSET_HOLE")?;
                add_content(covered, bytes, rel, hole.size, p.len)?;
                buf[rel as usize..(rel + hole.size) as usize].fill(0);
                Ok(())
            }
            (reply::BLOCK_STATUS, Sink::Status { chunks, .. }) => {
                if c.len > MAX_STATUS_CHUNK {
                    return Err(Cause::Protocol(format!("a BLOCK_STATUS chunk of {} bytes", c.len)));
                }
                let status = BlockStatus::decode(&self.payload(c.len)?).map_err(protocol)?;
                if !self.terms.contexts.contains(&status.context) {
                    return Err(Cause::Protocol(format!(
                        "block status for context {}, never selected",
                        status.context
                    )));
                }
                if chunks.iter().any(|s| s.context == status.context) {
                    return Err(Cause::Protocol(format!("two block-status chunks for context {}", status.context)));
                }
                chunks.push(status);
                Ok(())
            }
            (kind, _) if kind & reply::ERROR_BIT != 0 => {
                if c.len > MAX_ERROR_CHUNK {
                    return Err(Cause::Protocol(format!("an error chunk of {} bytes", c.len)));
                }
                let e = ErrorChunk::decode(kind, &self.payload(c.len)?).map_err(protocol)?;
                if let Some(at) = e.offset {
                    within(at, 1, start, end.max(start + 1), "ERROR_OFFSET")?;
                }
                p.error_chunks += 1;
                if p.error_chunks > MAX_ERROR_CHUNKS {
                    return Err(Cause::Protocol("more than 64 error chunks in one reply".into()));
                }
                if p.error.is_none() {
                    p.error = Some(p.fail(server(e.error, e.message), e.offset));
                }
                Ok(())
            }
            (kind, _) => Err(Cause::Protocol(format!("a chunk of type {kind} in reply to {}", p.op.verb()))),
        }
    }

    /// A small payload (its length already bounded by the caller).
    fn payload(&mut self, len: u32) -> Result<Vec<u8>, Cause> {
        let mut buf = vec![0; len as usize];
        self.input.read_exact(&mut buf).map_err(|e| broken(&e, false))?;
        Ok(buf)
    }
}

/// The result of a request whose last reply arrived.
fn finish(p: &mut Pending, terms: &Terms) -> Result<Payload, Failure> {
    if let Some(f) = p.error.take() {
        return Err(f);
    }
    let bad = |why: String| Err(Failure { op: p.op, offset: Some(p.offset), cause: Cause::Protocol(why) });
    match &mut p.sink {
        Sink::Read { buf, covered, .. } => {
            covered.sort_unstable();
            let mut pos = 0;
            for &(start, end) in covered.iter() {
                if start != pos {
                    return bad(format!("a read's reply left bytes {pos}..{start} out or sent them twice"));
                }
                pos = end;
            }
            if pos != p.len {
                return bad(format!("a read's reply covered {pos} of {} bytes", p.len));
            }
            Ok(Payload::Data(std::mem::take(buf)))
        }
        Sink::Status { chunks, .. } => {
            if chunks.len() != terms.contexts.len() {
                return bad(format!("{} block-status chunks for {} contexts", chunks.len(), terms.contexts.len()));
            }
            Ok(Payload::Status(std::mem::take(chunks)))
        }
        Sink::Wait { .. } | Sink::Behind => Ok(Payload::Unit),
    }
}

/// Checks that `[at, at + n)` lies in `[start, end)`; returns `at - start`.
fn within(at: u64, n: u64, start: u64, end: u64, what: &str) -> Result<u32, Cause> {
    match at.checked_add(n) {
        Some(stop) if at >= start && stop <= end => Ok((at - start) as u32),
        _ => Err(Cause::Protocol(format!("an {what} chunk for bytes {at}+{n}, outside the request's {start}..{end}"))),
    }
}

/// Records a content chunk; more bytes than the request, or more chunks than a server that
/// follows the protocol's advice (512-byte multiples) would send, is a protocol error.
fn add_content(covered: &mut Vec<(u32, u32)>, bytes: &mut u64, rel: u32, n: u32, len: u32) -> Result<(), Cause> {
    *bytes += u64::from(n);
    if *bytes > u64::from(len) {
        return Err(Cause::Protocol("a read's content chunks overlap".into()));
    }
    if covered.len() as u64 >= u64::from(len) / 512 + 64 {
        return Err(Cause::Protocol("too many content chunks for one read".into()));
    }
    covered.push((rel, rel + n));
    Ok(())
}

fn server(error: u32, message: String) -> Cause {
    if error == errno::ESHUTDOWN {
        return Cause::Connection("the server is shutting down".into());
    }
    Cause::Server { errno: error, message }
}

#[allow(clippy::needless_pass_by_value)] // Used as `map_err(protocol)`.
fn protocol(e: blksync_core::Error) -> Cause {
    Cause::Protocol(e.message().to_string())
}

fn broken(e: &std::io::Error, between_messages: bool) -> Cause {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof if between_messages => {
            Cause::Connection("the server closed the connection".into())
        }
        std::io::ErrorKind::UnexpectedEof => {
            Cause::Connection("the server closed the connection in the middle of a reply".into())
        }
        _ => Cause::Connection(format!("the connection broke: {}", io_text(e))),
    }
}

/// Extents of one context from a block-status reply.
pub(crate) fn extents_of(chunks: &[BlockStatus], context: u32) -> &[Extent] {
    chunks.iter().find(|c| c.context == context).map_or(&[], |c| &c.extents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_range_in_order() {
        assert_eq!(pieces(10, 4).collect::<Vec<_>>(), vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(pieces(8, 4).collect::<Vec<_>>(), vec![(0, 4), (4, 4)]);
        assert_eq!(pieces(0, 4).count(), 0);
    }

    #[test]
    fn content_chunks_must_cover_a_read_exactly_once() {
        let (tx, _rx) = channel();
        let terms = Terms { structured: true, contexts: vec![] };
        let read = |chunks: &[(u32, u32)]| {
            let mut p = Pending {
                op: Op::Read,
                offset: 0,
                len: 8,
                sink: Sink::Read { buf: vec![0; 8], covered: Vec::new(), bytes: 0, tx: tx.clone() },
                error: None,
                error_chunks: 0,
            };
            for &(rel, n) in chunks {
                let Sink::Read { covered, bytes, .. } = &mut p.sink else { unreachable!() };
                add_content(covered, bytes, rel, n, 8).map_err(|_| ())?;
            }
            finish(&mut p, &terms).map(|_| ()).map_err(|_| ())
        };
        assert!(read(&[(4, 4), (0, 4)]).is_ok(), "any order");
        assert!(read(&[(0, 4)]).is_err(), "a gap");
        assert!(read(&[(0, 4), (2, 4)]).is_err(), "an overlap");
        assert!(read(&[(0, 4), (2, 2), (6, 2)]).is_err(), "an overlap that sums up right");
    }

    /// Seeded random replies (framed well enough to get past the magic now and then) end every
    /// request in a result or an error: no panic, no hang, whatever the bytes.
    #[test]
    fn random_replies_end_in_errors_never_in_panics_or_hangs() {
        use crate::wire::transmission::SimpleReply;
        use std::os::unix::net::UnixStream;

        let mut next = crate::wire::random_stream(0x2545_f491_4f6c_dd1d);
        for round in 0..300 {
            let mut bytes = Vec::new();
            for _ in 0..=next() % 6 {
                let cookie = 1 + next() % 4;
                match next() % 4 {
                    0 => bytes
                        .extend(ReplyHeader::Simple(SimpleReply { error: (next() % 2) as u32 * 5, cookie }).encode()),
                    1 | 2 => {
                        let kinds = [0, 1, 2, 5, reply::ERROR, reply::ERROR_OFFSET, next() as u16];
                        let kind = kinds[(next() % 7) as usize];
                        let len = if next().is_multiple_of(8) { next() as u32 } else { (next() % 40) as u32 };
                        let flags = (next() % 2) as u16;
                        bytes.extend(ReplyHeader::Chunk(ChunkHeader { flags, kind, cookie, len }).encode());
                        let payload = (next() % 48) as usize;
                        bytes.extend((0..payload).map(|_| if next().is_multiple_of(3) { 0 } else { next() as u8 }));
                    }
                    _ => bytes.extend((0..next() % 24).map(|_| next() as u8)),
                }
            }
            let (ours, mut theirs) = UnixStream::pair().unwrap();
            let terms = Terms { structured: round % 3 != 0, contexts: vec![1] };
            let conn = Connection::start(Socket::Unix(ours), terms).unwrap();
            let feeder = std::thread::spawn(move || {
                let _ = theirs.write_all(&bytes);
                let _ = theirs.shutdown(std::net::Shutdown::Write);
                let _ = std::io::copy(&mut theirs, &mut std::io::sink());
            });
            let mut buf = vec![0; 8192];
            let _ = conn.read(0, &mut buf, 4096);
            let _ = conn.block_status(0, 8192);
            drop(conn);
            feeder.join().unwrap();
        }
    }

    #[test]
    fn ranges_outside_the_request_are_refused() {
        assert_eq!(within(10, 5, 10, 15, "x"), Ok(0));
        assert!(within(9, 5, 10, 15, "x").is_err());
        assert!(within(11, 5, 10, 15, "x").is_err());
        assert!(within(u64::MAX, 2, 10, 15, "x").is_err());
    }
}
