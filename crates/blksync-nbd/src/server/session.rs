//! One connection's transmission phase (`docs/NBD.md`, "Transmission"): a reader that checks
//! requests and reads payloads, a bounded pool of workers that execute them against the export
//! and write whole replies under the socket's lock, a byte budget that bounds what is buffered,
//! and the write log that makes FLUSH wait for the writes received before it.

use blksync_core::buffer::Aligned;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use blksync_core::endpoint::{Segment, Source};

use crate::socket::Socket;
use crate::wire::transmission::{
    BlockStatus, ErrorChunk, Extent, OffsetHole, ReplyHeader, Request, SimpleReply, chunk,
};
use crate::wire::{reply, state};

use super::ServerOptions;
use super::export::{Export, MAX_PAYLOAD, errno_of};
use super::negotiation::{ALLOCATION_ID, Agreed, discard};
use super::request::{Command, Limits, Refusal, check};

/// The most extents in one block-status reply (the protocol lets a server answer less than
/// asked; 512 KiB of descriptors).
const MAX_REPLY_EXTENTS: usize = 1 << 16;
/// Zeros written by `WRITE_ZEROES` with `NO_HOLE`, at most this many at a time.
const ZERO_BUFFER: usize = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Bytes of payload the connection may hold at once.
struct Budget {
    limit: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    /// Waits until `n` more bytes fit (or nothing is held: one request may be larger).
    fn take(&self, n: u64) {
        let mut used = lock(&self.used);
        while *used > 0 && *used + n > self.limit {
            used = self.freed.wait(used).unwrap_or_else(PoisonError::into_inner);
        }
        *used += n;
    }

    fn give(&self, n: u64) {
        *lock(&self.used) -= n;
        self.freed.notify_all();
    }
}

/// Sequence numbers of the writes (zeros, trims) received and not yet done.
#[derive(Default)]
struct WriteLog {
    next: u64,
    pending: BTreeSet<u64>,
}

/// One request, checked and with its payload, on its way to a worker.
struct Job {
    cookie: u64,
    command: Command,
    payload: Vec<u8>,
    /// Its place among the writes: a write's own number, or for FLUSH the first number after
    /// every write received before it.
    seq: u64,
}

/// What the reader and the workers share.
struct Shared<'a> {
    export: &'a Export,
    writer: Mutex<Socket>,
    structured: bool,
    budget: Budget,
    writes: Mutex<WriteLog>,
    written: Condvar,
}

impl Shared<'_> {
    /// Writes one whole reply; a socket that fails is shut, which ends the reader too.
    fn send(&self, parts: &[&[u8]]) {
        let mut w = lock(&self.writer);
        for part in parts {
            if w.write_all(part).is_err() {
                w.shutdown();
                return;
            }
        }
    }

    fn simple(&self, cookie: u64, error: u32, data: &[u8]) {
        self.send(&[&ReplyHeader::Simple(SimpleReply { error, cookie }).encode(), data]);
    }

    /// An error reply: an `ERROR` chunk with the message where a structured reply is required
    /// (`READ`, `BLOCK_STATUS`), a simple reply otherwise.
    fn error(&self, cookie: u64, command: u16, error: u32, message: &str) {
        use crate::wire::cmd;
        if self.structured && (command == cmd::READ || command == cmd::BLOCK_STATUS) {
            let (kind, payload) = ErrorChunk { error, message: message.to_string(), offset: None }.encode();
            self.send(&[&chunk(reply::FLAG_DONE, kind, cookie, &payload)]);
        } else {
            self.simple(cookie, error, &[]);
        }
    }

    /// Waits until every write numbered below `seq` is done.
    fn wait_for_writes(&self, seq: u64) {
        let mut log = lock(&self.writes);
        while log.pending.first().is_some_and(|&first| first < seq) {
            log = self.written.wait(log).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn write_done(&self, seq: u64) {
        lock(&self.writes).pending.remove(&seq);
        self.written.notify_all();
    }
}

/// Serves requests on `socket` until the client disconnects, the socket breaks or is shut for
/// reading (a stop), or the client breaks the framing; requests already read are finished and
/// answered first.
pub(crate) fn transmit(socket: &Socket, export: &Export, agreed: Agreed, options: &ServerOptions) {
    let (Ok(mut reader), Ok(writer)) = (socket.try_clone(), socket.try_clone()) else { return };
    let target = export.target();
    let limits = Limits {
        size: export.source().size(),
        min_block: options.min_block,
        max_payload: MAX_PAYLOAD,
        writable: target.is_some(),
        allocation: agreed.allocation,
        zero_is_cheap: target.is_some() && export.source().caps().zero_offload,
    };
    let workers = options.workers.max(1);
    let shared = Shared {
        export,
        writer: Mutex::new(writer),
        structured: agreed.structured,
        budget: Budget { limit: options.max_buffered.max(1) as u64, used: Mutex::new(0), freed: Condvar::new() },
        writes: Mutex::new(WriteLog::default()),
        written: Condvar::new(),
    };
    let (jobs, queue) = sync_channel::<Job>(workers * 2);
    let queue = Mutex::new(queue);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| work(&shared, &queue));
        }
        loop {
            let mut header = [0; Request::LEN];
            if reader.read_exact(&mut header).is_err() {
                break;
            }
            // A bad magic: nothing after it can be framed.
            let Ok(r) = Request::decode(&header) else { break };
            let command = match check(&r, &limits) {
                Ok(Command::Disc) => break,
                Ok(c) => c,
                Err(Refusal { errno, message, discard: skip }) => {
                    if skip > 0 && discard(&mut reader, u64::from(skip)).is_err() {
                        break;
                    }
                    shared.error(r.cookie, r.kind, errno, &message);
                    continue;
                }
            };
            let charge = u64::from(command.buffer());
            shared.budget.take(charge);
            let mut payload = Vec::new();
            if let Command::Write { len, .. } = command {
                payload = vec![0; len as usize];
                if reader.read_exact(&mut payload).is_err() {
                    shared.budget.give(charge);
                    break;
                }
            }
            let seq = {
                let mut log = lock(&shared.writes);
                let seq = log.next;
                if command.writes() {
                    log.pending.insert(seq);
                    log.next += 1;
                }
                seq
            };
            if jobs.send(Job { cookie: r.cookie, command, payload, seq }).is_err() {
                break;
            }
        }
        // The workers finish what is queued, then see the channel closed.
        drop(jobs);
    });
}

/// A worker: takes jobs in the order they were read until the reader is done.
fn work(shared: &Shared<'_>, queue: &Mutex<Receiver<Job>>) {
    // Page-aligned, like every buffer that receives a read (blksync_core::buffer): a `pread`
    // into a misaligned one copies several times slower.
    let mut buf = Aligned::new(0);
    loop {
        let job = { lock(queue).recv() };
        let Ok(job) = job else { return };
        let charge = u64::from(job.command.buffer());
        execute(shared, &job, &mut buf);
        if job.command.writes() {
            shared.write_done(job.seq);
        }
        shared.budget.give(charge);
        if buf.len() > 4 << 20 {
            // Keep small buffers for the next read; give a large one back.
            buf = Aligned::new(0);
        }
    }
}

fn execute(shared: &Shared<'_>, job: &Job, buf: &mut Aligned) {
    use crate::wire::cmd;
    let source = shared.export.source();
    let target = shared.export.target();
    let cookie = job.cookie;
    let done = |result: blksync_core::Result<()>, kind: u16| match result {
        Ok(()) => shared.simple(cookie, 0, &[]),
        Err(e) => shared.error(cookie, kind, errno_of(&e), &e.to_string()),
    };
    let flush_if = |fua: bool| match target {
        Some(t) if fua => t.flush(),
        _ => Ok(()),
    };
    match job.command {
        Command::Read { offset, len, df } => read(shared, cookie, offset, len, df, buf),
        Command::Write { offset, fua, .. } => {
            let result = target.map_or(Ok(()), |t| t.write_at(&job.payload, offset)).and_then(|()| flush_if(fua));
            done(result, cmd::WRITE);
        }
        Command::WriteZeroes { offset, len, no_hole, fua } => {
            let result = target.map_or(Ok(()), |t| {
                if no_hole {
                    let zeros = vec![0; ZERO_BUFFER.min(len as usize)];
                    let mut pos = 0;
                    while pos < u64::from(len) {
                        let n = (u64::from(len) - pos).min(zeros.len() as u64) as usize;
                        t.write_at(&zeros[..n], offset + pos)?;
                        pos += n as u64;
                    }
                    Ok(())
                } else {
                    t.zero(offset, u64::from(len))
                }
            });
            done(result.and_then(|()| flush_if(fua)), cmd::WRITE_ZEROES);
        }
        Command::Trim { offset, len, fua } => {
            let result = match target {
                Some(t) if shared.export.zero_is_cheap() => t.zero(offset, u64::from(len)),
                _ => Ok(()),
            };
            done(result.and_then(|()| flush_if(fua)), cmd::TRIM);
        }
        Command::Flush => {
            shared.wait_for_writes(job.seq);
            done(target.map_or(Ok(()), blksync_core::endpoint::Target::flush), cmd::FLUSH);
        }
        Command::BlockStatus { offset, len, one } => {
            let extents = extents(source, offset, u64::from(len), if one { 1 } else { MAX_REPLY_EXTENTS });
            let payload = BlockStatus { context: ALLOCATION_ID, extents }.encode();
            shared.send(&[&chunk(reply::FLAG_DONE, reply::BLOCK_STATUS, cookie, &payload)]);
        }
        Command::Disc => {}
    }
}

/// The segments of `[offset, end)`, clipped to it, neighbours of one kind merged; a segment
/// that cannot be told counts as data, as does an endpoint that reports no holes.
///
/// Merged, because an endpoint may cut its data where nothing changes for a reader: a backup
/// point's segments end at every record of its increments, every few KiB. Unmerged, a READ sent
/// a chunk per piece and read each on its own (`serve` read a point 1.3 × slower than the file
/// it was restored to, hashing aside).
fn segments(source: &dyn Source, offset: u64, end: u64) -> impl Iterator<Item = Segment> + '_ {
    let holes = source.caps().holes;
    let mut pos = offset;
    let mut next = move || {
        if pos >= end {
            return None;
        }
        let seg = if holes { source.segment_at(pos).ok().filter(|s| s.end > pos) } else { None };
        let seg = seg.map_or(Segment { start: pos, end, allocated: true }, |s| Segment {
            start: pos,
            end: s.end.min(end),
            allocated: s.allocated,
        });
        pos = seg.end;
        Some(seg)
    };
    let mut pending = None;
    std::iter::from_fn(move || {
        let mut seg: Segment = pending.take().or_else(&mut next)?;
        while let Some(after) = next() {
            if after.allocated == seg.allocated {
                seg.end = after.end;
            } else {
                pending = Some(after);
                break;
            }
        }
        Some(seg)
    })
}

/// Block-status extents of `[offset, offset + len)`: holes `HOLE | ZERO`, data 0, neighbours
/// of the same kind merged, at most `max`.
fn extents(source: &dyn Source, offset: u64, len: u64, max: usize) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for seg in segments(source, offset, offset + len) {
        let flags = if seg.allocated { 0 } else { state::HOLE | state::ZERO };
        let n = (seg.end - seg.start) as u32;
        let full = out.len() == max;
        match out.last_mut() {
            Some(last) if last.flags == flags => last.len += n,
            _ if full => break,
            _ => out.push(Extent { len: n, flags }),
        }
    }
    out
}

/// A READ: one piece of data (simple replies, `DF`, or an endpoint without holes), or a chunk
/// per segment, data read only where the endpoint has it.
fn read(shared: &Shared<'_>, cookie: u64, offset: u64, len: u32, df: bool, buf: &mut Aligned) {
    use crate::wire::cmd;
    let source = shared.export.source();
    let end = offset + u64::from(len);
    // The worker's buffer grows when needed and is never cleared: every byte that is sent was
    // read first, so zeroing it for each request (a memset of every byte served) buys nothing.
    if buf.len() < len as usize {
        *buf = Aligned::new(len as usize);
    }
    let buf = &mut buf[..len as usize];
    let fail = |e: &blksync_core::Error| shared.error(cookie, cmd::READ, errno_of(e), &e.to_string());
    if len == 0 {
        // No data: an `OFFSET_DATA` chunk must carry at least one byte.
        if shared.structured {
            shared.send(&[&chunk(reply::FLAG_DONE, reply::NONE, cookie, &[])]);
        } else {
            shared.simple(cookie, 0, &[]);
        }
        return;
    }
    let parts: Vec<Segment> =
        if shared.structured && !df { segments(source, offset, end).collect() } else { Vec::new() };
    if parts.len() <= 1 && parts.iter().all(|s| s.allocated) {
        if let Err(e) = source.read_at(buf, offset) {
            return fail(&e);
        }
        if shared.structured {
            let mut header = ReplyHeader::Chunk(crate::wire::transmission::ChunkHeader {
                flags: reply::FLAG_DONE,
                kind: reply::OFFSET_DATA,
                cookie,
                len: len + 8,
            })
            .encode();
            header.extend_from_slice(&offset.to_be_bytes());
            shared.send(&[&header, buf]);
        } else {
            shared.simple(cookie, 0, buf);
        }
        return;
    }
    // Read every data part first: an error is then one error chunk, with nothing sent before it.
    for seg in parts.iter().filter(|s| s.allocated) {
        let at = (seg.start - offset) as usize..(seg.end - offset) as usize;
        if let Err(e) = source.read_at(&mut buf[at], seg.start) {
            return fail(&e);
        }
    }
    let mut w = lock(&shared.writer);
    let mut sent = Ok(());
    for seg in &parts {
        let n = (seg.end - seg.start) as u32;
        sent = sent.and_then(|()| {
            if seg.allocated {
                let mut header = ReplyHeader::Chunk(crate::wire::transmission::ChunkHeader {
                    flags: 0,
                    kind: reply::OFFSET_DATA,
                    cookie,
                    len: n + 8,
                })
                .encode();
                header.extend_from_slice(&seg.start.to_be_bytes());
                let at = (seg.start - offset) as usize..(seg.end - offset) as usize;
                w.write_all(&header).and_then(|()| w.write_all(&buf[at]))
            } else {
                w.write_all(&chunk(0, reply::OFFSET_HOLE, cookie, &OffsetHole { offset: seg.start, size: n }.encode()))
            }
        });
    }
    sent = sent.and_then(|()| w.write_all(&chunk(reply::FLAG_DONE, reply::NONE, cookie, &[])));
    if sent.is_err() {
        w.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use blksync_core::endpoint::{Caps, Identity, Segment, Source};

    use super::segments;

    /// Data cut into 4 KiB segments, with a hole at [40 KiB, 48 KiB): as a backup point reports
    /// its increments' records.
    struct Pieces;

    impl Source for Pieces {
        fn name(&self) -> &Path {
            Path::new("pieces")
        }
        fn caps(&self) -> Caps {
            Caps { holes: true, ..Caps::default() }
        }
        fn size(&self) -> u64 {
            64 << 10
        }
        fn read_at(&self, buf: &mut [u8], _: u64) -> blksync_core::Result<()> {
            buf.fill(1);
            Ok(())
        }
        fn segment_at(&self, offset: u64) -> blksync_core::Result<Segment> {
            let end = (offset / 4096 + 1) * 4096;
            Ok(Segment { start: offset, end, allocated: !(40 << 10..48 << 10).contains(&offset) })
        }
        fn drop_cache(&self, _: u64, _: u64) {}
        fn identity(&self) -> Identity {
            Identity::None
        }
    }

    #[test]
    fn neighbouring_segments_of_one_kind_are_merged() {
        let got: Vec<(u64, u64, bool)> =
            segments(&Pieces, 1000, 60 << 10).map(|s| (s.start, s.end, s.allocated)).collect();
        assert_eq!(got, [(1000, 40 << 10, true), (40 << 10, 48 << 10, false), (48 << 10, 60 << 10, true)]);
    }
}
