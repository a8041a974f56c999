//! One pass of the remote algorithm (docs/PROTOCOL.md, "The sync algorithm"): the brain's
//! per-chunk state machine and the router threads that relay the peers' replies.
//!
//! The brain keeps a small state machine per chunk: both summaries → (if they differ) group
//! hashes of each non-zero side → leaf hashes of each differing group → `Read`s of differing
//! non-zero source leaves and `Zero`s for source-zero leaves. Every request is sent as soon as
//! its answer is known to be needed, so many chunks are in flight and the round-trip time does
//! not limit throughput. Data never passes through the brain: the source router hands each
//! `Data` to the target as a `Write`, untouched (still compressed), and keeps draining the
//! source even when the target is gone, so that no thread can wait on another forever.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, Sender, unbounded};

use super::chunk_set::ChunkSet;
use crate::engine::Found;
use crate::error::{Error, ErrorKind, Result};
use crate::extent::{Extent, Runs};
use crate::hash::FANOUT;
use crate::link::Link;
use crate::progress::{Control, Counters};
use crate::protocol::Msg;
use crate::throttle::Throttle;

/// How many differing ranges are remembered for reports.
const RANGE_CAP: usize = 100_000;
/// Send an `Ack` after this many chunks finish.
const ACK_EVERY: u64 = 16;

fn random_key() -> Result<[u8; 32]> {
    crate::id::random()
}

/// Whether two `Scan`s ask for the same scan, speculative or not.
fn same_scan(a: &Msg, b: &Msg) -> bool {
    let plain = |m: &Msg| match m.clone() {
        Msg::Scan { key, block, end, data_len, threads, rate, fingerprint, changes, .. } => {
            Some(Msg::Scan { key, block, end, data_len, threads, rate, fingerprint, changes, only_if_size: None })
        }
        _ => None,
    };
    plain(a).is_some() && plain(a) == plain(b)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Target is empty: stream every non-zero source byte, no hashing.
    Copy,
    /// Find differences and write them.
    Apply,
    /// Find differences only.
    Compare,
}

#[derive(Clone, Copy)]
pub(super) struct Pass<'a> {
    pub(super) source: &'a Link,
    pub(super) target: &'a Link,
    pub(super) block: usize,
    pub(super) chunk: usize,
    pub(super) scan_len: u64,
    pub(super) source_len: u64,
    pub(super) target_len: u64,
    pub(super) mode: Mode,
    pub(super) compress: i32,
    /// Workers each peer reads and hashes with (0: its own default).
    pub(super) threads: u16,
    pub(super) throttle: Option<&'a Throttle>,
    pub(super) pause: Option<Duration>,
    /// Flush even if no data changes: the target was resized, or it is a backup point that the
    /// flush commits.
    pub(super) must_flush: bool,
    /// Ask the source for its fingerprint, for a target that records it (a delta, a point).
    pub(super) fingerprint: bool,
    /// Let the source skip what its changed-block map marks unchanged (`Scan.changes`).
    pub(super) changes: bool,
    /// The source was opened `FS_AWARE`: it tells its free blocks (`Unused`).
    pub(super) fs_aware: bool,
    /// The target's `Scan`, already running: it was sent behind the target's `Open`.
    pub(super) started: Option<&'a Msg>,
    /// The source's `Scan`, already running: it was sent behind the source's `Open`, with the
    /// key of `started`.
    pub(super) source_started: Option<&'a Msg>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Source = 0,
    Target = 1,
}

impl End {
    fn other(self) -> End {
        match self {
            End::Source => End::Target,
            End::Target => End::Source,
        }
    }
}

/// Zero flags and hashes of a list of nodes (groups or leaves).
#[derive(Debug, Clone)]
struct Nodes {
    zero: Vec<u8>,
    hashes: Vec<u8>,
}

impl Nodes {
    fn zeros(n: usize) -> Nodes {
        Nodes { zero: vec![1; n], hashes: vec![0; n * 16] }
    }

    /// Node `i` is the same on both sides.
    fn same(ours: &Nodes, theirs: &Nodes, index: usize) -> bool {
        let hash = |nodes: &Nodes| nodes.hashes.get(index * 16..index * 16 + 16).map(<[u8]>::to_vec);
        match (ours.zero.get(index), theirs.zero.get(index)) {
            (Some(1), Some(1)) => true,
            (Some(zero), Some(other)) if zero == other => hash(ours) == hash(theirs),
            _ => false,
        }
    }
}

/// What a differing leaf needs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fix {
    /// Source data: read it and write it.
    Read,
    /// Source zeros: zero the target.
    Zero,
}

#[derive(Default)]
struct ChunkState {
    summary: [Option<(bool, [u8; 16])>; 2],
    groups: [Option<Nodes>; 2],
    leaves: HashMap<u32, [Option<Nodes>; 2]>,
    /// Requests sent for this chunk and not yet answered.
    pending: u32,
}

/// The brain's state during one pass.
struct Brain<'a> {
    pass: &'a Pass<'a>,
    counters: &'a Counters,
    chunks: HashMap<u64, ChunkState>,
    /// Chunks done beyond `prefix`.
    finished: ChunkSet,
    /// Hole chunks each side reported (`Holes`) that the other side has not reported yet.
    holes: [ChunkSet; 2],
    /// Free blocks of the source's filesystem in chunks not done yet (`Unused`), start → end,
    /// merged: leaves inside them are neither read nor written.
    unused: BTreeMap<u64, u64>,
    prefix: u64,
    acked: u64,
    total: u64,
    ranges: BTreeMap<u64, u64>,
    flushed: bool,
    /// Reads sent and not yet done (start → end), which the source router checks every `Data`
    /// against. In `Copy` mode, the ranges copied instead (the router records them).
    requested: &'a Mutex<BTreeMap<u64, u64>>,
    /// `ScanDone`s received (one per scanning side).
    scans_done: u8,
    /// The source's fingerprint, from its `ScanDone`.
    source_fingerprint: Option<[u8; 32]>,
    /// What the source said after it was read (`Warning`s before its `CheckIntact` reply).
    warnings: Vec<String>,
}

impl Pass<'_> {
    fn chunk_range(&self, chunk: u64) -> (u64, u64) {
        let start = chunk * self.chunk as u64;
        (start, (self.scan_len - start).min(self.chunk as u64))
    }

    pub(super) fn run(&self, counters: &Counters, control: Control<'_>) -> Result<Found> {
        let (events_tx, events) = unbounded::<(End, Msg)>();
        let routing = AtomicBool::new(true);
        let forwarding = AtomicBool::new(true);
        let requested = Mutex::new(BTreeMap::new());
        let mut brain = Brain {
            pass: self,
            counters,
            chunks: HashMap::new(),
            finished: ChunkSet::default(),
            holes: [ChunkSet::default(), ChunkSet::default()],
            unused: BTreeMap::new(),
            prefix: 0,
            acked: 0,
            total: self.scan_len.div_ceil(self.chunk as u64),
            ranges: BTreeMap::new(),
            flushed: false,
            requested: &requested,
            scans_done: 0,
            source_fingerprint: None,
            warnings: Vec::new(),
        };
        std::thread::scope(|scope| {
            let (routing, forwarding, requested) = (&routing, &forwarding, &requested);
            let tx = events_tx.clone();
            scope.spawn(move || self.route_source(&tx, counters, control, (routing, forwarding), requested));
            let tx = events_tx.clone();
            scope.spawn(move || route(self.target, End::Target, &tx, routing));
            drop(events_tx);
            let result = brain.drive(&events, control);
            if result.is_err() || control.cancelled() {
                // Stop relaying data, then make what reached the target durable, without
                // committing it as complete: for a backup point or a delta the flush is the
                // commit, and a partial one would restore content that never existed.
                forwarding.store(false, Ordering::Relaxed);
                if self.mode != Mode::Compare && !brain.flushed {
                    // Unconfirmed, nothing written can be called in sync (the target may have
                    // died with it still in flight).
                    if brain.flush(Msg::FlushPartial, &events, Duration::from_secs(60)).is_err() {
                        brain.prefix = 0;
                    }
                }
            }
            routing.store(false, Ordering::Relaxed);
            result
        })?;
        if self.mode == Mode::Copy {
            // What was copied is what differed from the empty target.
            let copied = std::mem::take(&mut *requested.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
            brain.ranges.extend(copied);
        }
        let mut found = Found {
            done: brain.prefix.min(brain.total) * self.chunk as u64,
            warnings: std::mem::take(&mut brain.warnings),
            ..Found::default()
        };
        found.done = found.done.min(self.scan_len);
        found.cancelled = control.cancelled() && brain.prefix < brain.total;
        for (&offset, &len) in &brain.ranges {
            match found.ranges.last_mut() {
                Some(last) if last.end() == offset => last.len += len,
                _ => found.ranges.push(Extent { offset, len }),
            }
        }
        found.range_count = found.ranges.len() as u64;
        Ok(found)
    }

    /// Relays the source's replies: data straight to the target, the rest to the brain.
    fn route_source(
        &self,
        events: &Sender<(End, Msg)>,
        counters: &Counters,
        control: Control<'_>,
        (routing, forwarding): (&AtomicBool, &AtomicBool),
        requested: &Mutex<BTreeMap<u64, u64>>,
    ) {
        while routing.load(Ordering::Relaxed) {
            let msg = match self.source.recv_timeout(Duration::from_millis(50)) {
                Ok(msg) => msg,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            match msg {
                Msg::Data(chunk) => {
                    if !forwarding.load(Ordering::Relaxed) {
                        continue;
                    }
                    if let Err(message) = self.asked_for(&chunk, requested) {
                        // A hostile or broken source: nothing it sends reaches the target any more.
                        forwarding.store(false, Ordering::Relaxed);
                        let _ =
                            events.send((End::Source, Msg::Error { kind: ErrorKind::Protocol, message, hint: None }));
                        continue;
                    }
                    if let Some(t) = self.throttle {
                        t.take(chunk.payload.len() as u64, control.cancel);
                    }
                    counters.add_written(u64::from(chunk.raw_len));
                    if self.mode == Mode::Copy {
                        // The target was empty: everything non-zero differs.
                        counters.add_differing(u64::from(chunk.raw_len));
                        let mut copied = requested.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        if copied.len() < RANGE_CAP {
                            copied.insert(chunk.offset, u64::from(chunk.raw_len));
                        }
                    }
                    if self.target.send(Msg::Write(chunk)).is_err() {
                        // Say so once, then keep draining the source: if this thread stopped,
                        // the source would block on its replies and the brain on its requests,
                        // and nobody would read the error.
                        let e = self.target.lost();
                        let (kind, hint, message) = (e.kind(), e.hint(), e.to_string());
                        let _ = events.send((End::Target, Msg::Error { kind, message, hint }));
                        forwarding.store(false, Ordering::Relaxed);
                    }
                    if let Some(pause) = self.pause {
                        std::thread::sleep(pause);
                    }
                }
                other => {
                    if events.send((End::Source, other)).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

impl Pass<'_> {
    /// Checks that a `Data` from the source answers a request (docs/PROTOCOL.md promises the
    /// client writes nothing else): inside an outstanding `Read`, or for `Copy` inside the
    /// scanned length.
    fn asked_for(
        &self,
        chunk: &crate::protocol::message::Chunk,
        requested: &Mutex<BTreeMap<u64, u64>>,
    ) -> std::result::Result<(), String> {
        let start = chunk.offset;
        let end = start.checked_add(u64::from(chunk.raw_len));
        let inside = match (self.mode, end) {
            (_, None) => false,
            (Mode::Copy, Some(end)) => end <= self.scan_len,
            (_, Some(end)) => requested
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .range(..=start)
                .next_back()
                .is_some_and(|(_, &stop)| end <= stop),
        };
        if inside {
            Ok(())
        } else {
            Err(format!(
                "{}: sent {} bytes at byte offset {start} that were never asked for; nothing more from it is written",
                self.source.name, chunk.raw_len
            ))
        }
    }
}

fn route(link: &Link, side: End, events: &Sender<(End, Msg)>, routing: &AtomicBool) {
    while routing.load(Ordering::Relaxed) {
        match link.recv_timeout(Duration::from_millis(50)) {
            Ok(msg) => {
                if events.send((side, msg)).is_err() {
                    return;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

impl Brain<'_> {
    fn link(&self, side: End) -> &Link {
        match side {
            End::Source => self.pass.source,
            End::Target => self.pass.target,
        }
    }

    fn send(&self, side: End, msg: Msg) -> Result<()> {
        self.link(side).send(msg)
    }

    fn drive(&mut self, events: &crossbeam_channel::Receiver<(End, Msg)>, control: Control<'_>) -> Result<()> {
        let p = self.pass;
        match p.mode {
            Mode::Copy => self.send(
                End::Source,
                Msg::Copy { end: p.scan_len, data_len: p.source_len, compress: p.compress, threads: p.threads },
            )?,
            Mode::Apply | Mode::Compare => {
                let key = match &p.started {
                    Some(Msg::Scan { key, .. }) => *key,
                    _ => random_key()?,
                };
                let block = p.block as u32;
                let threads = p.threads;
                // `--bwlimit` limits what is read of the source: its scan reads it all.
                let rate = p.throttle.map_or(0, Throttle::rate);
                let (end, source_len, target_len) = (p.scan_len, p.source_len, p.target_len);
                let (fingerprint, changes) = (p.fingerprint, p.changes);
                let only_if_size = None;
                let scan = Msg::Scan {
                    key,
                    block,
                    end,
                    data_len: source_len,
                    threads,
                    rate,
                    fingerprint,
                    changes,
                    only_if_size,
                };
                match &p.source_started {
                    None => self.send(End::Source, scan)?,
                    Some(started) if same_scan(started, &scan) => {}
                    Some(_) => return Err(Error::protocol("the source's early scan is not the one the pass needs")),
                }
                let (fingerprint, changes) = (false, false);
                let scan = Msg::Scan {
                    key,
                    block,
                    end,
                    data_len: target_len,
                    threads,
                    rate: 0,
                    fingerprint,
                    changes,
                    only_if_size,
                };
                match &p.started {
                    None => self.send(End::Target, scan)?,
                    // The speculative scan is the one the pass needs whenever the peer started
                    // it (both ends have one size); anything else is a bug, caught before any
                    // summary is trusted.
                    Some(started) if same_scan(started, &scan) => {}
                    Some(_) => return Err(Error::protocol("the target's early scan is not the one the pass needs")),
                }
            }
        }
        // `--timeout`: the longest the pass may go without a reply from either peer.
        let limit = [p.source.timeout, p.target.timeout].into_iter().flatten().min();
        let mut last = std::time::Instant::now();
        while self.prefix < self.total {
            if control.cancelled() {
                return Ok(());
            }
            let (side, msg) = match events.recv_timeout(Duration::from_millis(100)) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) => {
                    // Reports go on while nothing happens, so a display can show a stall.
                    control.observer.progress(&self.counters.snapshot());
                    if let Some(limit) = limit.filter(|&l| last.elapsed() >= l) {
                        return Err(Error::new(
                            ErrorKind::Connection,
                            format!("no progress for {} s: the transfer is stuck", limit.as_secs()),
                        )
                        .with_hint(crate::error::Hint::LongerTimeout));
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::new(ErrorKind::Connection, "both peers went away"));
                }
            };
            last = std::time::Instant::now();
            self.handle(side, msg)?;
            control.observer.progress(&self.counters.snapshot());
        }
        // The scans' `ScanDone` (with what they read) follows their last summary, which may
        // have finished the pass: wait a moment for it, for the counters.
        while p.mode != Mode::Copy && self.scans_done < 2 {
            match events.recv_timeout(Duration::from_secs(2)) {
                Ok((side, Msg::Error { kind, message, hint })) => {
                    return Err(self.link(side).error(kind, message).with_hint(hint));
                }
                Ok((side, msg @ Msg::ScanDone { .. })) => self.handle(side, msg)?,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        self.check_intact(events)?;
        let s = self.counters.snapshot();
        // Nothing written and nothing resized: there is nothing to make durable, and skipping the
        // flush saves a round trip on slow links.
        if p.mode != Mode::Compare && (p.must_flush || s.bytes_written + s.bytes_zeroed > 0 || p.mode == Mode::Copy) {
            // The target now holds what the source does: a recorder takes the source's
            // fingerprint for the new image instead of computing it again.
            if let Some(after) = self.source_fingerprint {
                self.send(End::Target, Msg::Fingerprint { after })?;
            }
            self.flush(Msg::Flush, events, Duration::from_secs(24 * 3600))?;
        }
        Ok(())
    }

    /// Asks the source whether what it read is still what it holds (`CheckIntact`), before
    /// anything is committed or reported: a snapshot that overflowed while it was read is not.
    fn check_intact(&mut self, events: &crossbeam_channel::Receiver<(End, Msg)>) -> Result<()> {
        self.send(End::Source, Msg::CheckIntact)?;
        loop {
            match events.recv_timeout(Duration::from_millis(500)) {
                Ok((End::Source, Msg::Done)) => return Ok(()),
                Ok((End::Source, Msg::Warning { text })) => self.warnings.push(text),
                Ok((side, Msg::Error { kind, message, hint })) => {
                    return Err(self.link(side).error(kind, message).with_hint(hint));
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) if !self.pass.source.is_gone() => {}
                Err(_) => {
                    return Err(self.pass.source.lost());
                }
            }
        }
    }

    /// Flushes the target (`Flush` or `FlushPartial`) and waits for its `Done`.
    fn flush(&mut self, how: Msg, events: &crossbeam_channel::Receiver<(End, Msg)>, limit: Duration) -> Result<()> {
        self.send(End::Target, how)?;
        let deadline = std::time::Instant::now() + limit;
        loop {
            let wait = deadline.saturating_duration_since(std::time::Instant::now());
            match events.recv_timeout(wait.min(Duration::from_millis(500))) {
                Ok((End::Target, Msg::Done)) => {
                    self.flushed = true;
                    return Ok(());
                }
                Ok((side, Msg::Error { kind, message, hint })) => {
                    return Err(self.link(side).error(kind, message).with_hint(hint));
                }
                // A target whose connection is gone will never confirm: say so now, not after
                // the full wait.
                Ok(_) | Err(RecvTimeoutError::Timeout) if self.pass.target.is_gone() => {
                    return Err(self.pass.target.lost());
                }
                Ok(_) | Err(RecvTimeoutError::Timeout) if !wait.is_zero() => {}
                _ => return Err(Error::new(ErrorKind::Connection, "the target did not confirm the flush")),
            }
        }
    }

    fn handle(&mut self, side: End, msg: Msg) -> Result<()> {
        match msg {
            Msg::Summary { chunk, zero, hash } => {
                self.check_chunk(side, chunk)?;
                if chunk < self.prefix || self.finished.contains(chunk) {
                    // Done already (the source said `Clean`): the target's word changes nothing,
                    // and keeping it would cost memory per chunk.
                    return Ok(());
                }
                let other = side.other();
                let hole = self.holes[other as usize].contains(chunk);
                if hole {
                    self.holes[other as usize].remove(chunk, chunk + 1);
                }
                let state = self.chunks.entry(chunk).or_default();
                if hole {
                    state.summary[other as usize] = Some((true, [0; 16]));
                }
                state.summary[side as usize] = Some((zero, hash));
                if let [Some(s), Some(t)] = state.summary {
                    if s == t || (s.0 && t.0) {
                        self.finish(chunk)?;
                    } else {
                        self.refine_groups(chunk, s.0, t.0)?;
                    }
                }
            }
            Msg::GroupHashes { chunk, zero, hashes } => {
                self.check_chunk(side, chunk)?;
                let state = self.state(side, chunk)?;
                state.groups[side as usize] = Some(Nodes { zero, hashes });
                state.pending -= 1;
                if state.groups.iter().all(Option::is_some) {
                    self.compare_groups(chunk)?;
                }
            }
            Msg::LeafHashes { chunk, group, zero, hashes } => {
                self.check_chunk(side, chunk)?;
                let state = self.state(side, chunk)?;
                let pair = state.leaves.entry(group).or_default();
                pair[side as usize] = Some(Nodes { zero, hashes });
                state.pending -= 1;
                if pair.iter().all(Option::is_some) {
                    self.compare_leaves(chunk, group)?;
                }
                self.finish_if_done(chunk)?;
            }
            Msg::Holes { first, count } => self.holes(side, first, count)?,
            Msg::Clean { first, count } if side == End::Source && self.pass.changes => {
                // The same on both sides, by the source's changed-block map: done, whatever the
                // target says of them later.
                let end = first.checked_add(count).filter(|&end| end <= self.total && count > 0).ok_or_else(|| {
                    Error::protocol(format!("{}: clean chunks {first}+{count} of {}", self.link(side).name, self.total))
                })?;
                self.holes[End::Target as usize].remove(first, end);
                self.finish_range(first, end)?;
            }
            Msg::Unused { start, len } if side == End::Source && self.pass.fs_aware => self.unused(start, len)?,
            Msg::ReadDone { offset, len, read } => {
                let chunk = offset / self.pass.chunk as u64;
                self.check_chunk(side, chunk)?;
                self.counters.add_read_source(read);
                if self.pass.mode == Mode::Copy {
                    // One answer covers a whole run of holes.
                    let end = offset.saturating_add(len).div_ceil(self.pass.chunk as u64).clamp(chunk + 1, self.total);
                    self.finish_range(chunk, end)?;
                } else {
                    let state = self.state(side, chunk)?;
                    state.pending -= 1;
                    let _ = len;
                    self.requested.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&offset);
                    self.finish_if_done(chunk)?;
                }
            }
            Msg::ScanDone { read, fingerprint, .. } => {
                self.scans_done += 1;
                match side {
                    End::Source => {
                        self.counters.add_read_source(read);
                        self.source_fingerprint = Some(fingerprint).filter(|f| *f != [0; 32]);
                    }
                    End::Target => self.counters.add_read_destination(read),
                }
            }
            Msg::Done => {}
            Msg::Error { kind, message, hint } => return Err(self.link(side).error(kind, message).with_hint(hint)),
            other => return Err(self.link(side).unexpected(&other)),
        }
        Ok(())
    }

    fn check_chunk(&self, side: End, chunk: u64) -> Result<()> {
        if chunk >= self.total {
            return Err(Error::protocol(format!(
                "{}: reply for chunk {chunk} of {}",
                self.link(side).name,
                self.total
            )));
        }
        Ok(())
    }

    fn state(&mut self, side: End, chunk: u64) -> Result<&mut ChunkState> {
        let name = self.link(side).name.clone();
        match self.chunks.get_mut(&chunk) {
            Some(s) if s.pending > 0 => Ok(s),
            _ => Err(Error::protocol(format!("{name}: unrequested reply for chunk {chunk}"))),
        }
    }

    fn counts(&self, chunk: u64) -> (usize, usize) {
        let (_, len) = self.pass.chunk_range(chunk);
        let leaves = (len as usize).div_ceil(self.pass.block);
        (leaves, leaves.div_ceil(FANOUT))
    }

    fn refine_groups(&mut self, chunk: u64, source_zero: bool, target_zero: bool) -> Result<()> {
        let (_, groups) = self.counts(chunk);
        for (side, zero) in [(End::Source, source_zero), (End::Target, target_zero)] {
            if zero {
                self.chunks.entry(chunk).or_default().groups[side as usize] = Some(Nodes::zeros(groups));
            } else {
                self.send(side, Msg::Groups { chunk })?;
                self.chunks.entry(chunk).or_default().pending += 1;
            }
        }
        if self.chunks.get(&chunk).is_some_and(|s| s.groups.iter().all(Option::is_some)) {
            self.compare_groups(chunk)?;
        }
        Ok(())
    }

    fn compare_groups(&mut self, chunk: u64) -> Result<()> {
        let (leaves, groups) = self.counts(chunk);
        let Some(state) = self.chunks.get(&chunk) else { return Ok(()) };
        let [Some(s), Some(t)] = &state.groups else { return Ok(()) };
        if s.zero.len() != groups || t.zero.len() != groups {
            return Err(Error::protocol(format!("wrong number of group hashes for chunk {chunk}")));
        }
        let differing: Vec<(usize, bool, bool)> =
            (0..groups).filter(|&g| !Nodes::same(s, t, g)).map(|g| (g, s.zero[g] == 1, t.zero[g] == 1)).collect();
        for (g, source_zero, target_zero) in differing {
            let n = (leaves - g * FANOUT).min(FANOUT);
            for (side, zero) in [(End::Source, source_zero), (End::Target, target_zero)] {
                let state = self.chunks.entry(chunk).or_default();
                if zero {
                    state.leaves.entry(g as u32).or_default()[side as usize] = Some(Nodes::zeros(n));
                } else {
                    state.pending += 1;
                    self.send(side, Msg::Leaves { chunk, group: g as u32 })?;
                }
            }
            if self
                .chunks
                .get(&chunk)
                .and_then(|s| s.leaves.get(&(g as u32)))
                .is_some_and(|p| p.iter().all(Option::is_some))
            {
                self.compare_leaves(chunk, g as u32)?;
            }
        }
        self.finish_if_done(chunk)
    }

    fn compare_leaves(&mut self, chunk: u64, group: u32) -> Result<()> {
        let p = self.pass;
        let (start, len) = p.chunk_range(chunk);
        let (leaves, _) = self.counts(chunk);
        let Some([Some(s), Some(t)]) = self.chunks.get_mut(&chunk).and_then(|st| st.leaves.remove(&group)) else {
            return Ok(());
        };
        let first = group as usize * FANOUT;
        let n = leaves.saturating_sub(first).min(FANOUT);
        if s.zero.len() != n || t.zero.len() != n {
            return Err(Error::protocol(format!("wrong number of leaf hashes for chunk {chunk} group {group}")));
        }
        let mut runs = Runs::new();
        for i in 0..n {
            if Nodes::same(&s, &t, i) {
                continue;
            }
            let offset = start + ((first + i) * p.block) as u64;
            let leaf_len = (start + len - offset).min(p.block as u64);
            if self.is_unused(offset, offset + leaf_len) {
                // Free on the source's filesystem: the target keeps what it holds.
                continue;
            }
            runs.push(if s.zero[i] == 1 { Fix::Zero } else { Fix::Read }, offset, leaf_len);
        }
        for &(fix, run) in runs.iter() {
            self.counters.add_differing(run.len);
            if self.ranges.len() < RANGE_CAP {
                self.ranges.insert(run.offset, run.len);
            }
            match (fix, p.mode) {
                (Fix::Zero, Mode::Compare) => self.counters.add_zeroed(run.len),
                (Fix::Read, Mode::Compare) => self.counters.add_written(run.len),
                (Fix::Zero, _) => {
                    self.send(End::Target, Msg::Zero { offset: run.offset, len: run.len })?;
                    self.counters.add_zeroed(run.len);
                }
                (Fix::Read, _) => {
                    self.chunks.entry(chunk).or_default().pending += 1;
                    self.requested
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(run.offset, run.offset + run.len);
                    self.send(
                        End::Source,
                        Msg::Read { offset: run.offset, len: run.len as u32, compress: p.compress },
                    )?;
                }
            }
        }
        Ok(())
    }

    fn finish_if_done(&mut self, chunk: u64) -> Result<()> {
        let done = self
            .chunks
            .get(&chunk)
            .is_some_and(|s| s.pending == 0 && s.summary.iter().all(Option::is_some) && s.leaves.is_empty());
        if done { self.finish(chunk) } else { Ok(()) }
    }

    /// `Holes`: chunks `[first, first + count)` of `side` are zeros. Where the other side's
    /// summary is already here, each pairs with it as a zero summary; where the other side
    /// reported holes too, the run is done at once; the rest waits for the other side.
    fn holes(&mut self, side: End, first: u64, count: u64) -> Result<()> {
        let end = first.checked_add(count).filter(|&end| end <= self.total && count > 0).ok_or_else(|| {
            Error::protocol(format!("{}: holes {first}+{count} of {} chunks", self.link(side).name, self.total))
        })?;
        let other = side.other() as usize;
        let waiting: Vec<u64> = self
            .chunks
            .iter()
            .filter(|(c, s)| (first..end).contains(*c) && s.summary[other].is_some())
            .map(|(&c, _)| c)
            .collect();
        self.holes[side as usize].insert(first, end);
        for chunk in waiting {
            self.holes[side as usize].remove(chunk, chunk + 1);
            self.handle(side, Msg::Summary { chunk, zero: true, hash: [0; 16] })?;
        }
        for (a, b) in self.holes[other].within(first, end) {
            self.holes[other].remove(a, b);
            self.holes[side as usize].remove(a, b);
            self.finish_range(a, b)?;
        }
        Ok(())
    }

    /// `Unused`: bytes `[start, start + len)` are free blocks of the source's filesystem. The
    /// chunks it covers whole are done; the rest is kept for their leaves.
    fn unused(&mut self, start: u64, len: u64) -> Result<()> {
        let p = self.pass;
        let end = start.checked_add(len).filter(|&end| end <= p.scan_len && len > 0).ok_or_else(|| {
            Error::protocol(format!("{}: unused bytes {start}+{len} of {}", p.source.name, p.scan_len))
        })?;
        let chunk = p.chunk as u64;
        let (first, last) = (start.div_ceil(chunk), if end == p.scan_len { self.total } else { end / chunk });
        if first < last {
            // Whatever the target says of these chunks changes nothing.
            self.holes[End::Target as usize].remove(first, last);
            self.chunks.retain(|c, _| !(first..last).contains(c));
            self.finish_range(first, last)?;
        }
        // Merged with its neighbours, so that a leaf across two messages is found.
        let (mut a, mut b) = (start, end);
        if let Some((&s, &e)) = self.unused.range(..=a).next_back()
            && e >= a
        {
            a = s;
            b = b.max(e);
        }
        while let Some((&s, &e)) = self.unused.range(a..=b).next() {
            self.unused.remove(&s);
            b = b.max(e);
        }
        if b > self.prefix * chunk {
            self.unused.insert(a, b);
        }
        Ok(())
    }

    /// Whether `[a, b)` lies in free blocks of the source's filesystem.
    fn is_unused(&self, a: u64, b: u64) -> bool {
        self.unused.range(..=a).next_back().is_some_and(|(_, &end)| b <= end)
    }

    fn finish(&mut self, chunk: u64) -> Result<()> {
        self.chunks.remove(&chunk);
        self.finish_range(chunk, chunk + 1)
    }

    /// Chunks `[a, b)` are done (none of them is in `chunks`).
    fn finish_range(&mut self, a: u64, b: u64) -> Result<()> {
        let a = a.max(self.prefix);
        let added = self.finished.insert(a, b);
        if added == 0 {
            return Ok(());
        }
        let bytes = |c: u64| (c * self.pass.chunk as u64).min(self.pass.scan_len);
        self.counters.add_scanned(if added == b - a { bytes(b) - bytes(a) } else { added * self.pass.chunk as u64 });
        while let Some(end) = self.finished.take_from(self.prefix) {
            self.prefix = end;
        }
        // Free blocks below the done prefix are asked about no more.
        let done = self.prefix * self.pass.chunk as u64;
        while let Some((&s, &e)) = self.unused.first_key_value()
            && e <= done
        {
            self.unused.remove(&s);
        }
        if self.pass.mode != Mode::Copy && (self.prefix >= self.acked + ACK_EVERY || self.prefix == self.total) {
            self.acked = self.prefix;
            self.send(End::Source, Msg::Ack { chunks: self.prefix })?;
            self.send(End::Target, Msg::Ack { chunks: self.prefix })?;
        }
        Ok(())
    }
}
