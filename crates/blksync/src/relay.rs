//! Sync and compare between two peers when at least one is remote: the client's side of the
//! protocol (docs/PROTOCOL.md, "The sync algorithm").
//!
//! ```text
//!  source peer ──Summary/Groups/Leaves──▶ source router ──events──▶ brain ──requests──▶ peers
//!              ──Data───────────────────▶ source router ──Write───────────────────────▶ target peer
//!  target peer ──Summary/Groups/Leaves/Done──▶ target router ──events──▶ brain
//! ```
//!
//! The brain keeps a small state machine per chunk: both summaries → (if they differ) group
//! hashes of each non-zero side → leaf hashes of each differing group → `Read`s of differing
//! non-zero source leaves and `Zero`s for source-zero leaves. Every request is sent as soon as
//! its answer is known to be needed, so many chunks are in flight and the round-trip time does
//! not limit throughput. Data never passes through the brain: the source router hands each
//! `Data` to the target as a `Write`, untouched (still compressed). The only bounded queue on
//! that path is the target's, which is the back-pressure we want; every other queue the brain
//! reads is unbounded and the brain never waits on a peer, so no cycle can deadlock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, Sender, unbounded};

use crate::compare::Comparison;
use crate::endpoint::{Identity, Kind};
use crate::error::{Error, ErrorKind, Result};
use crate::extent::{Extent, Runs};
use crate::hash::{FANOUT, chunk_size};
use crate::link::Link;
use crate::location::Location;
use crate::peer::{opened_identity, opened_kind};
use crate::progress::{Control, Counters, Phase};
use crate::protocol::Msg;
use crate::protocol::message::{Role, open_flags};
use crate::sizing;
use crate::ssh::SshOptions;
use crate::sync::{Summary, SyncOptions};
use crate::throttle::Throttle;

/// Options of a sync that involves a remote peer.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Everything a local sync takes.
    pub sync: SyncOptions,
    /// `compress` value for data frames (see [`crate::compress`]).
    pub compress: i32,
    /// Sleep this long after relaying each data frame (`--pause`).
    pub pause: Option<Duration>,
}

/// How many differing ranges are remembered for reports.
const RANGE_CAP: usize = 100_000;
/// Send an `Ack` after this many chunks finish.
const ACK_EVERY: u64 = 16;

/// What `Open` told us.
#[derive(Debug, Clone, Copy)]
struct Opened {
    kind: Kind,
    size: u64,
    identity: Identity,
    created: bool,
}

fn open(link: &mut Link, role: Role, flags: u32, path: &OsStr, name: &[u8]) -> Result<Opened> {
    let msg = Msg::Open { role, flags, mode: 0, path: path.as_bytes().to_vec(), name: name.to_vec() };
    match link.call(msg)? {
        Msg::Opened { kind, size, identity_tag, id_a, id_b, created } => {
            Ok(Opened { kind: opened_kind(kind), size, identity: opened_identity(identity_tag, id_a, id_b), created })
        }
        other => Err(link.unexpected(&other)),
    }
}

fn display(link: &Link, path: &OsStr) -> String {
    if link.is_remote() {
        format!("{}:{}", link.name, Path::new(path).display())
    } else {
        Path::new(path).display().to_string()
    }
}

fn random_key() -> Result<[u8; 32]> {
    use std::io::Read;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(|e| Error::new(ErrorKind::Io, format!("reading /dev/urandom for the session key: {e}")))?;
    Ok(key)
}

/// Syncs `source_path` at `source` onto `target_path` at `target`.
pub fn sync(
    source: &mut Link,
    source_path: &OsStr,
    target: &mut Link,
    target_path: &OsStr,
    options: &RemoteOptions,
    control: Control<'_>,
) -> Result<Summary> {
    let o = &options.sync;
    let cache = if o.keep_cache { open_flags::KEEP_CACHE } else { 0 };
    let s = open(source, Role::Source, cache, source_path, b"")?;
    let name = Path::new(source_path).file_name().map(OsStr::as_bytes).unwrap_or_default();
    let mut flags = cache | if o.dry_run { open_flags::READ_ONLY } else { open_flags::CREATE };
    if o.force {
        flags |= open_flags::FORCE;
    }
    if o.discard {
        flags |= open_flags::DISCARD;
    }
    let t = open(target, Role::Target, flags, target_path, name)?;
    let names = (display(source, source_path), display(target, target_path));
    transfer(source, s, target, t, names, false, options, control)
}

/// Everything after both ends are open: sizes, the pass, the flush, verification.
/// `chain_target` makes the flush unconditional: it commits a backup point even when nothing
/// changed.
#[allow(clippy::too_many_arguments)] // Both ends, as opened, and how to run.
fn transfer(
    source: &mut Link,
    s: Opened,
    target: &mut Link,
    t: Opened,
    (source_name, target_name): (String, String),
    chain_target: bool,
    options: &RemoteOptions,
    control: Control<'_>,
) -> Result<Summary> {
    let o = &options.sync;
    if s.identity != Identity::None && s.identity == t.identity && source.info.boot_id == target.info.boot_id {
        return Err(Error::usage(format!("{source_name} and {target_name} are the same file or device")));
    }
    let sizing = sizing::resolve(s.size, t.kind, t.size, t.created, o.size_policy, o.zero_tail)?;
    let mut warnings = Vec::new();
    if let Some(w) = &sizing.warning {
        control.observer.warn(w);
        warnings.push(w.clone());
    }
    if let (Some(size), false) = (sizing.resize_to, o.dry_run) {
        match target.call(Msg::SetSize { size })? {
            Msg::Done => {}
            other => return Err(target.unexpected(&other)),
        }
    }
    let fresh = !o.dry_run && t.kind == Kind::File && (t.created || t.size == 0);
    let mode = if o.dry_run {
        Mode::Compare
    } else if fresh {
        Mode::Copy
    } else {
        Mode::Apply
    };
    let throttle = o.bwlimit.map(Throttle::new);
    let counters = Counters::new();
    counters.set_total(sizing.scan_len);
    control.observer.phase(if o.dry_run { Phase::Compare } else { Phase::Sync }, sizing.scan_len);
    let pass = Pass {
        source,
        target,
        block: o.block_size,
        chunk: chunk_size(o.block_size),
        scan_len: sizing.scan_len,
        source_len: sizing.source_len,
        target_len: if o.dry_run { t.size } else { sizing.resize_to.unwrap_or(t.size) },
        mode,
        compress: options.compress,
        throttle: throttle.as_ref(),
        pause: options.pause,
        must_flush: chain_target || (sizing.resize_to.is_some() && !o.dry_run),
    };
    let found = pass.run(&counters, control)?;
    if found.cancelled {
        return Err(Error::new(
            ErrorKind::Interrupted,
            format!(
                "interrupted: sync of {target_name} is incomplete; the first {} bytes are in sync and flushed to disk, run it again to finish",
                found.done
            ),
        ));
    }
    let mut summary = Summary {
        source: source_name,
        destination: target_name,
        dry_run: o.dry_run,
        block_size: o.block_size,
        counters: counters.snapshot(),
        ranges_differing: found.range_count,
        destination_size_before: t.size,
        destination_size_after: sizing.resize_to.unwrap_or(t.size),
        verified: false,
        warnings,
        bytes_sent: 0,
        bytes_received: 0,
        undo_log: None,
    };
    if o.verify && !o.dry_run {
        verify(&pass, &summary, control)?;
        summary.verified = true;
    }
    Ok(summary)
}

/// Compares both ends again after a sync; any difference is an error.
fn verify(pass: &Pass<'_>, summary: &Summary, control: Control<'_>) -> Result<()> {
    let counters = Counters::new();
    counters.set_total(pass.scan_len);
    control.observer.phase(Phase::Verify, pass.scan_len);
    let check = Pass { mode: Mode::Compare, throttle: None, pause: None, ..*pass };
    let found = check.run(&counters, control)?;
    if found.cancelled {
        return Err(Error::new(ErrorKind::Interrupted, "interrupted during verification; the sync itself completed"));
    }
    if let Some(first) = found.ranges.first() {
        return Err(Error::new(
            ErrorKind::VerifyFailed,
            format!(
                "verification failed: {} differs from {} in {} bytes ({} ranges), the first at byte offset {}",
                summary.destination,
                summary.source,
                counters.snapshot().bytes_differing,
                found.range_count,
                first.offset
            ),
        ));
    }
    Ok(())
}

/// An endpoint location with the ssh options for reaching it.
pub struct Side<'a> {
    /// Where it is.
    pub location: &'a Location,
    /// How to reach it when remote.
    pub ssh: &'a SshOptions,
}

fn connect(side: &Side<'_>) -> Result<(Link, std::ffi::OsString)> {
    match side.location {
        Location::Local(path) => Ok((Link::local(), path.clone().into_os_string())),
        Location::Remote(remote) => Ok((Link::ssh(remote, side.ssh)?, remote.path.clone().into_os_string())),
    }
}

fn add_wire(summary_sent: &mut u64, summary_received: &mut u64, links: &[&Link]) {
    for link in links {
        *summary_sent += link.wire.sent.load(Ordering::Relaxed);
        *summary_received += link.wire.received.load(Ordering::Relaxed);
    }
}

/// Syncs between two locations, at least one of them remote: connects, syncs, says goodbye.
/// Two paths on one remote host use one connection, and the sync runs there.
pub fn sync_locations(
    source: &Side<'_>,
    target: &Side<'_>,
    options: &RemoteOptions,
    control: Control<'_>,
) -> Result<Summary> {
    if let (Location::Remote(a), Location::Remote(b)) = (source.location, target.location)
        && (&a.user, &a.host, a.port) == (&b.user, &b.host, b.port)
        && source.ssh == target.ssh
    {
        return sync_on_host(a, &b.path, source.ssh, &options.sync, control);
    }
    let (mut s, s_path) = connect(source)?;
    let (mut t, t_path) = connect(target)?;
    let result = sync(&mut s, &s_path, &mut t, &t_path, options, control).map(|mut summary| {
        add_wire(&mut summary.bytes_sent, &mut summary.bytes_received, &[&s, &t]);
        summary
    });
    s.close();
    t.close();
    result
}

/// Runs a sync between two paths of one remote host on that host (`LocalSync`).
fn sync_on_host(
    remote: &crate::location::Remote,
    target_path: &Path,
    ssh: &SshOptions,
    o: &SyncOptions,
    control: Control<'_>,
) -> Result<Summary> {
    use crate::protocol::message::sync_flags as f;
    let mut link = Link::ssh(remote, ssh)?;
    let flag = |on: bool, bit: u32| if on { bit } else { 0 };
    let flags = flag(o.dry_run, f::DRY_RUN)
        | flag(o.verify, f::VERIFY)
        | flag(o.keep_cache, f::KEEP_CACHE)
        | flag(o.zero_tail, f::ZERO_TAIL)
        | flag(o.force, f::FORCE)
        | flag(o.discard, f::DISCARD)
        | flag(o.size_policy == sizing::SizePolicy::NoResize, f::NO_RESIZE)
        | flag(o.size_policy == sizing::SizePolicy::Common, f::COMMON_SIZE);
    let request = Msg::LocalSync {
        source: remote.path.as_os_str().as_bytes().to_vec(),
        target: target_path.as_os_str().as_bytes().to_vec(),
        block: o.block_size as u32,
        flags,
        threads: 0,
        bwlimit: o.bwlimit.unwrap_or(0),
    };
    let result = follow_local_sync(&mut link, request, o, control).map(|mut summary| {
        summary.source = format!("{}:{}", link.name, remote.path.display());
        summary.destination = format!("{}:{}", link.name, summary.destination);
        add_wire(&mut summary.bytes_sent, &mut summary.bytes_received, &[&link]);
        summary
    });
    link.close();
    result
}

/// Relays a remote job's progress and warnings to the observer until it ends; returns its final
/// reply and the warnings.
fn follow_job(link: &mut Link, request: Msg, control: Control<'_>) -> Result<(Msg, Vec<String>)> {
    let mut warnings = Vec::new();
    let mut cancel_sent = false;
    let mut next = Some(link.call(request)?);
    loop {
        let msg = match next.take() {
            Some(msg) => msg,
            None => match link.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Msg::Error { kind, message }) => return Err(link.error(kind, message)),
                Ok(msg) => msg,
                Err(RecvTimeoutError::Timeout) => {
                    if control.cancelled() && !cancel_sent {
                        link.send(Msg::Cancel)?;
                        cancel_sent = true;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::new(ErrorKind::Connection, format!("{}: the connection was lost", link.name)));
                }
            },
        };
        match msg {
            Msg::Progress { phase, counters } if counters[1..].iter().all(|&c| c == 0) => {
                let phase = match phase {
                    0 => Phase::Sync,
                    1 => Phase::Compare,
                    _ => Phase::Verify,
                };
                control.observer.phase(phase, counters[0]);
            }
            Msg::Progress { counters, .. } => control.observer.progress(&crate::peer::snapshot_of(counters, 0.0)),
            Msg::Warning { text } => {
                control.observer.warn(&text);
                warnings.push(text);
            }
            last => return Ok((last, warnings)),
        }
    }
}

/// Relays a remote `LocalSync` until it ends.
fn follow_local_sync(link: &mut Link, request: Msg, o: &SyncOptions, control: Control<'_>) -> Result<Summary> {
    match follow_job(link, request, control)? {
        (Msg::Synced { counters, seconds, ranges, size_before, size_after, verified, destination }, warnings) => {
            Ok(Summary {
                source: String::new(),
                destination: String::from_utf8_lossy(&destination).into_owned(),
                dry_run: o.dry_run,
                block_size: o.block_size,
                counters: crate::peer::snapshot_of(counters, f64::from_bits(seconds)),
                ranges_differing: ranges,
                destination_size_before: size_before,
                destination_size_after: size_after,
                verified,
                warnings,
                bytes_sent: 0,
                bytes_received: 0,
                undo_log: None,
            })
        }
        (other, _) => Err(link.unexpected(&other)),
    }
}

/// Compares two paths of one remote host on that host (`LocalCompare`), over one connection.
fn compare_on_host(
    remote: &crate::location::Remote,
    second: &Path,
    ssh: &SshOptions,
    block_size: usize,
    max_ranges: usize,
    control: Control<'_>,
) -> Result<Comparison> {
    let mut link = Link::ssh(remote, ssh)?;
    let request = Msg::LocalCompare {
        first: remote.path.as_os_str().as_bytes().to_vec(),
        second: second.as_os_str().as_bytes().to_vec(),
        block: block_size as u32,
        max_ranges: u32::try_from(max_ranges).unwrap_or(u32::MAX),
    };
    let result = match follow_job(&mut link, request, control) {
        Ok((Msg::Compared { counters, seconds, first_size, second_size, range_count, ranges }, _)) => {
            let counters = crate::peer::snapshot_of(counters, f64::from_bits(seconds));
            Ok(Comparison {
                source: format!("{}:{}", link.name, remote.path.display()),
                destination: format!("{}:{}", link.name, second.display()),
                source_size: first_size,
                destination_size: second_size,
                identical: counters.bytes_differing == 0,
                counters,
                ranges_differing: range_count,
                ranges: ranges
                    .chunks_exact(16)
                    .map(|r| Extent {
                        offset: u64::from_le_bytes(r[..8].try_into().unwrap_or_default()),
                        len: u64::from_le_bytes(r[8..].try_into().unwrap_or_default()),
                    })
                    .collect(),
            })
        }
        Ok((other, _)) => Err(link.unexpected(&other)),
        Err(e) => Err(e),
    };
    link.close();
    result
}

fn open_chain(
    link: &mut Link,
    dir: &OsStr,
    role: Role,
    at: crate::backup::At,
    comment: &str,
    source: &str,
    block: usize,
) -> Result<Opened> {
    let (at_kind, at) = match at {
        crate::backup::At::Latest => (0, 0),
        crate::backup::At::Number(n) => (1, i64::try_from(n).unwrap_or(i64::MAX)),
        crate::backup::At::Time(t) => (2, t),
    };
    let msg = Msg::OpenChain {
        dir: dir.as_bytes().to_vec(),
        role,
        at_kind,
        at,
        comment: comment.as_bytes().to_vec(),
        source: source.as_bytes().to_vec(),
        block: block as u32,
    };
    match link.call(msg)? {
        Msg::Opened { kind, size, identity_tag, id_a, id_b, created } => {
            Ok(Opened { kind: opened_kind(kind), size, identity: opened_identity(identity_tag, id_a, id_b), created })
        }
        other => Err(link.unexpected(&other)),
    }
}

/// Backs `source` up into the chain at `dest`, either or both remote: the chain's side scans its
/// newest point and writes the new one (an increment, or the base of a new chain).
pub fn backup_locations(
    source: &Side<'_>,
    dest: &Side<'_>,
    comment: &str,
    options: &RemoteOptions,
    control: Control<'_>,
) -> Result<Summary> {
    let (mut s, s_path) = connect(source)?;
    let (mut t, t_path) = connect(dest)?;
    let options = RemoteOptions {
        sync: SyncOptions { verify: false, dry_run: false, ..options.sync.clone() },
        ..options.clone()
    };
    let result = (|| {
        let cache = if options.sync.keep_cache { open_flags::KEEP_CACHE } else { 0 };
        let so = open(&mut s, Role::Source, cache, &s_path, b"")?;
        let source_name = display(&s, &s_path);
        let to = open_chain(
            &mut t,
            &t_path,
            Role::Target,
            crate::backup::At::Latest,
            comment,
            &source_name,
            options.sync.block_size,
        )?;
        let names = (source_name, display(&t, &t_path));
        transfer(&mut s, so, &mut t, to, names, true, &options, control)
    })()
    .map(|mut summary| {
        add_wire(&mut summary.bytes_sent, &mut summary.bytes_received, &[&s, &t]);
        summary
    });
    s.close();
    t.close();
    result
}

/// Restores point `at` of the chain at `chain` onto `target`, either or both remote.
pub fn restore_locations(
    chain: &Side<'_>,
    at: crate::backup::At,
    target: &Side<'_>,
    options: &RemoteOptions,
    control: Control<'_>,
) -> Result<Summary> {
    let (mut s, s_path) = connect(chain)?;
    let (mut t, t_path) = connect(target)?;
    let result = (|| {
        let so = open_chain(&mut s, &s_path, Role::Source, at, "", "", options.sync.block_size)?;
        let o = &options.sync;
        let mut flags = open_flags::CREATE | if o.keep_cache { open_flags::KEEP_CACHE } else { 0 };
        if o.force {
            flags |= open_flags::FORCE;
        }
        let to = open(&mut t, Role::Target, flags, &t_path, b"")?;
        let names = (display(&s, &s_path), display(&t, &t_path));
        transfer(&mut s, so, &mut t, to, names, false, options, control)
    })()
    .map(|mut summary| {
        add_wire(&mut summary.bytes_sent, &mut summary.bytes_received, &[&s, &t]);
        summary
    });
    s.close();
    t.close();
    result
}

/// Compares two locations, at least one of them remote.
pub fn compare_locations(
    a: &Side<'_>,
    b: &Side<'_>,
    block_size: usize,
    max_ranges: usize,
    control: Control<'_>,
) -> Result<Comparison> {
    if let (Location::Remote(first), Location::Remote(second)) = (a.location, b.location)
        && (&first.user, &first.host, first.port) == (&second.user, &second.host, second.port)
        && a.ssh == b.ssh
    {
        return compare_on_host(first, &second.path, a.ssh, block_size, max_ranges, control);
    }
    let (mut x, x_path) = connect(a)?;
    let (mut y, y_path) = connect(b)?;
    let result = compare(&mut x, &x_path, &mut y, &y_path, block_size, max_ranges, control);
    x.close();
    y.close();
    result
}

/// Compares `a_path` at `a` with `b_path` at `b`.
pub fn compare(
    a: &mut Link,
    a_path: &OsStr,
    b: &mut Link,
    b_path: &OsStr,
    block_size: usize,
    max_ranges: usize,
    control: Control<'_>,
) -> Result<Comparison> {
    let first = open(a, Role::Source, 0, a_path, b"")?;
    let second = open(b, Role::Source, 0, b_path, b"")?;
    let common = first.size.min(second.size);
    let counters = Counters::new();
    counters.set_total(common);
    control.observer.phase(Phase::Compare, common);
    let pass = Pass {
        source: a,
        target: b,
        block: block_size,
        chunk: chunk_size(block_size),
        scan_len: common,
        source_len: common,
        target_len: common,
        mode: Mode::Compare,
        compress: crate::compress::OFF,
        throttle: None,
        pause: None,
        must_flush: false,
    };
    let mut found = pass.run(&counters, control)?;
    if found.cancelled {
        return Err(Error::new(ErrorKind::Interrupted, "interrupted: comparison incomplete"));
    }
    let mut counters = counters.snapshot();
    counters.bytes_differing += first.size.abs_diff(second.size);
    // In compare mode "written" counts what a sync would write; a comparison reports none.
    counters.bytes_written = 0;
    counters.bytes_zeroed = 0;
    found.ranges.truncate(max_ranges);
    Ok(Comparison {
        source: display(a, a_path),
        destination: display(b, b_path),
        source_size: first.size,
        destination_size: second.size,
        identical: counters.bytes_differing == 0,
        counters,
        ranges_differing: found.range_count,
        ranges: found.ranges,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Target is empty: stream every non-zero source byte, no hashing.
    Copy,
    /// Find differences and write them.
    Apply,
    /// Find differences only.
    Compare,
}

#[derive(Clone, Copy)]
struct Pass<'a> {
    source: &'a Link,
    target: &'a Link,
    block: usize,
    chunk: usize,
    scan_len: u64,
    source_len: u64,
    target_len: u64,
    mode: Mode,
    compress: i32,
    throttle: Option<&'a Throttle>,
    pause: Option<Duration>,
    /// Flush even if no data changes: the target was resized, or it is a backup point that the
    /// flush commits.
    must_flush: bool,
}

#[derive(Debug, Default)]
struct Found {
    done: u64,
    cancelled: bool,
    ranges: Vec<Extent>,
    range_count: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Source = 0,
    Target = 1,
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
    finished: BTreeSet<u64>,
    prefix: u64,
    acked: u64,
    total: u64,
    ranges: BTreeMap<u64, u64>,
    flushed: bool,
}

impl Pass<'_> {
    fn chunk_range(&self, chunk: u64) -> (u64, u64) {
        let start = chunk * self.chunk as u64;
        (start, (self.scan_len - start).min(self.chunk as u64))
    }

    fn run(&self, counters: &Counters, control: Control<'_>) -> Result<Found> {
        let (events_tx, events) = unbounded::<(End, Msg)>();
        let routing = AtomicBool::new(true);
        let forwarding = AtomicBool::new(true);
        let mut brain = Brain {
            pass: self,
            counters,
            chunks: HashMap::new(),
            finished: BTreeSet::new(),
            prefix: 0,
            acked: 0,
            total: self.scan_len.div_ceil(self.chunk as u64),
            ranges: BTreeMap::new(),
            flushed: false,
        };
        std::thread::scope(|scope| {
            let (routing, forwarding) = (&routing, &forwarding);
            let tx = events_tx.clone();
            scope.spawn(move || self.route_source(&tx, counters, control, routing, forwarding));
            let tx = events_tx.clone();
            scope.spawn(move || route(self.target, End::Target, &tx, routing));
            drop(events_tx);
            let result = brain.drive(&events, control);
            if result.is_err() || control.cancelled() {
                // Stop relaying data, then make what reached the target durable.
                forwarding.store(false, Ordering::Relaxed);
                if self.mode != Mode::Compare && !brain.flushed {
                    let _ = brain.flush(&events, Duration::from_secs(60));
                }
            }
            routing.store(false, Ordering::Relaxed);
            result
        })?;
        let mut found = Found { done: brain.prefix.min(brain.total) * self.chunk as u64, ..Found::default() };
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
        routing: &AtomicBool,
        forwarding: &AtomicBool,
    ) {
        while routing.load(Ordering::Relaxed) {
            let msg = match self.source.rx.recv_timeout(Duration::from_millis(50)) {
                Ok(msg) => msg,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            match msg {
                Msg::Data(chunk) => {
                    if !forwarding.load(Ordering::Relaxed) {
                        continue;
                    }
                    if let Some(t) = self.throttle {
                        t.take(chunk.payload.len() as u64, control.cancel);
                    }
                    counters.add_written(u64::from(chunk.raw_len));
                    if self.mode == Mode::Copy {
                        // The target was empty: everything non-zero differs.
                        counters.add_differing(u64::from(chunk.raw_len));
                    }
                    if self.target.send(Msg::Write(chunk)).is_err() {
                        // Say so once, then keep draining the source: if this thread stopped,
                        // the source would block on its replies and the brain on its requests,
                        // and nobody would read the error.
                        let message = format!("{}: the connection was lost", self.target.name);
                        let _ = events.send((End::Target, Msg::Error { kind: ErrorKind::Connection, message }));
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

fn route(link: &Link, side: End, events: &Sender<(End, Msg)>, routing: &AtomicBool) {
    while routing.load(Ordering::Relaxed) {
        match link.rx.recv_timeout(Duration::from_millis(50)) {
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
                Msg::Copy { end: p.scan_len, data_len: p.source_len, compress: p.compress, threads: 0 },
            )?,
            Mode::Apply | Mode::Compare => {
                let key = random_key()?;
                let block = p.block as u32;
                self.send(End::Source, Msg::Scan { key, block, end: p.scan_len, data_len: p.source_len, threads: 0 })?;
                self.send(End::Target, Msg::Scan { key, block, end: p.scan_len, data_len: p.target_len, threads: 0 })?;
            }
        }
        while self.prefix < self.total {
            if control.cancelled() {
                return Ok(());
            }
            let (side, msg) = match events.recv_timeout(Duration::from_millis(100)) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::new(ErrorKind::Connection, "both peers went away"));
                }
            };
            self.handle(side, msg)?;
            control.observer.progress(&self.counters.snapshot());
        }
        let s = self.counters.snapshot();
        // Nothing written and nothing resized: there is nothing to make durable, and skipping the
        // flush saves a round trip on slow links.
        if p.mode != Mode::Compare && (p.must_flush || s.bytes_written + s.bytes_zeroed > 0 || p.mode == Mode::Copy) {
            self.flush(events, Duration::from_secs(24 * 3600))?;
        }
        Ok(())
    }

    /// Flushes the target and waits for its `Done`.
    fn flush(&mut self, events: &crossbeam_channel::Receiver<(End, Msg)>, limit: Duration) -> Result<()> {
        self.send(End::Target, Msg::Flush)?;
        let deadline = std::time::Instant::now() + limit;
        loop {
            let wait = deadline.saturating_duration_since(std::time::Instant::now());
            match events.recv_timeout(wait.min(Duration::from_millis(500))) {
                Ok((End::Target, Msg::Done)) => {
                    self.flushed = true;
                    return Ok(());
                }
                Ok((side, Msg::Error { kind, message })) => return Err(self.link(side).error(kind, message)),
                Ok(_) | Err(RecvTimeoutError::Timeout) if !wait.is_zero() => {}
                _ => return Err(Error::new(ErrorKind::Connection, "the target did not confirm the flush")),
            }
        }
    }

    fn handle(&mut self, side: End, msg: Msg) -> Result<()> {
        match msg {
            Msg::Summary { chunk, zero, hash } => {
                self.check_chunk(side, chunk)?;
                let state = self.chunks.entry(chunk).or_default();
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
            Msg::ReadDone { offset, len } => {
                let chunk = offset / self.pass.chunk as u64;
                self.check_chunk(side, chunk)?;
                if self.pass.mode == Mode::Copy {
                    self.finish(chunk)?;
                } else {
                    let state = self.state(side, chunk)?;
                    state.pending -= 1;
                    let _ = len;
                    self.finish_if_done(chunk)?;
                }
            }
            Msg::ScanDone { .. } | Msg::Done => {}
            Msg::Error { kind, message } => return Err(self.link(side).error(kind, message)),
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

    fn finish(&mut self, chunk: u64) -> Result<()> {
        self.chunks.remove(&chunk);
        if chunk < self.prefix || !self.finished.insert(chunk) {
            return Ok(());
        }
        let (_, len) = self.pass.chunk_range(chunk);
        self.counters.add_scanned(len);
        while self.finished.remove(&self.prefix) {
            self.prefix += 1;
        }
        if self.pass.mode != Mode::Copy && (self.prefix >= self.acked + ACK_EVERY || self.prefix == self.total) {
            self.acked = self.prefix;
            self.send(End::Source, Msg::Ack { chunks: self.prefix })?;
            self.send(End::Target, Msg::Ack { chunks: self.prefix })?;
        }
        Ok(())
    }
}
