//! Sync and compare between two peers when at least one is remote: the client's side of the
//! protocol (docs/PROTOCOL.md, "The sync algorithm").
//!
//! ```text
//!  source peer ──Summary/Groups/Leaves──▶ source router ──events──▶ brain ──requests──▶ peers
//!              ──Data───────────────────▶ source router ──Write───────────────────────▶ target peer
//!  target peer ──Summary/Groups/Leaves/Done──▶ target router ──events──▶ brain
//! ```
//!
//! The per-chunk algorithm itself lives in `relay/pass.rs`; this module opens the endpoints, decides
//! sizes, runs passes (transfer, then verification) and handles the shortcuts: two paths on one
//! host run there, and backup chains open through `OpenChain`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;

use crate::compare::Comparison;
use crate::endpoint::{Caps, Identity, Source};
use crate::error::{Error, ErrorKind, Result};
use crate::hash::chunk_size;
use crate::job::{Job, WirePath};
use crate::link::Link;
use crate::location::Location;
use crate::peer::opened_identity;
use crate::progress::{Control, Counters, Phase};
use crate::protocol::Msg;
use crate::protocol::message::{Role, open_flags};
use crate::ssh::SshOptions;
use crate::sync::{Summary, SyncOptions};
use crate::transfer::{Commit, End};

mod chunk_set;
mod history;
mod pass;

pub use history::{apply_locations, diff_locations, info_location, list_location, merge_locations, prune_location};
use pass::{Mode, Pass};

/// Options of a sync that involves a remote peer.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Everything a local sync takes.
    pub sync: SyncOptions,
    /// `compress` value for data frames (see [`crate::compress`]).
    pub compress: i32,
    /// Sleep this long after relaying each data frame (`--pause`).
    pub pause: Option<Duration>,
    /// `--undo`: where the undo log goes (`sync.undo` is for local syncs). It is written at the
    /// destination's end, which holds the old bytes; a local path receives it from there.
    pub undo: Option<Location>,
}

/// Where the undo log is written, as seen from the destination's peer.
#[derive(Clone, Copy)]
enum UndoAt<'a> {
    None,
    /// At this path on the destination's host.
    There(&'a Path),
    /// In the destination's spool, then fetched to this local path.
    Fetch(&'a Path),
}

/// What `Open` told us.
#[derive(Debug, Clone)]
struct Opened {
    /// False for a target that is not there (a dry run's).
    exists: bool,
    size: u64,
    identity: Identity,
    created: bool,
    /// Permission bits of a regular file, 0 otherwise.
    mode: u32,
    /// What it can do.
    caps: Caps,
    /// What a source said as it was opened (`Warning`s before `Opened`).
    warnings: Vec<String>,
    /// What a source opened `FS_AWARE` found (`Filesystem`s before `Opened`).
    filesystems: Vec<crate::endpoint::FsRegion>,
    /// The path opened, when not the one asked for (a directory destination).
    path: Option<std::ffi::OsString>,
}

/// Sends an `Open` or `OpenChain` (and `then` right behind it, which has no reply of its own
/// before the opening's) and reads what was opened.
fn opened(link: &mut Link, msg: Msg, then: Option<Msg>) -> Result<Opened> {
    let mut warnings = Vec::new();
    let mut filesystems = Vec::new();
    let mut reply = match then {
        None => link.call(msg)?,
        Some(then) => {
            link.send(msg)?;
            link.call(then)?
        }
    };
    loop {
        match reply {
            Msg::Warning { text } => warnings.push(text),
            Msg::Filesystem { start, len, used, filesystem, detail, whole } => {
                let text = |b: Vec<u8>| (!b.is_empty()).then(|| String::from_utf8_lossy(&b).into_owned());
                filesystems.push(crate::endpoint::FsRegion {
                    start,
                    len,
                    filesystem: text(filesystem),
                    detail: text(detail).unwrap_or_default(),
                    used,
                    whole: text(whole),
                });
            }
            _ => break,
        }
        reply = link.recv()?;
    }
    match reply {
        Msg::Opened { exists, size, identity_tag, id_a, id_b, created, mode, caps, block_size, path } => Ok(Opened {
            exists,
            size,
            identity: opened_identity(identity_tag, id_a, id_b),
            created,
            mode,
            caps: Caps::from_bits(caps, block_size),
            warnings,
            filesystems,
            path: (!path.is_empty()).then(|| OsStr::from_bytes(&path).to_os_string()),
        }),
        other => Err(link.unexpected(&other)),
    }
}

/// Opens `path` on `link`. A target gets the source's permission bits (for a file it creates,
/// as a local sync does) and size (for a `loop://FILE` it creates) from `like`. `then` goes
/// right behind the `Open` (a speculative `Scan`).
fn open(
    link: &mut Link,
    role: Role,
    flags: u32,
    path: &OsStr,
    (name, like, level): (&[u8], Option<&Opened>, i32),
    then: Option<Msg>,
) -> Result<Opened> {
    let (mode, size) = like.map_or((0, 0), |s| (s.mode, s.size));
    let msg = Msg::Open { role, flags, mode, size, path: path.as_bytes().to_vec(), name: name.to_vec(), level };
    opened(link, msg, then)
}

/// `Open.flags` for a source read `--fs-aware`.
fn fs_aware(o: &SyncOptions) -> u32 {
    if o.fs_aware { open_flags::FS_AWARE } else { 0 }
}

/// Whether `path` names a file or a device, not a managed endpoint (`loop://`, `lvm+snapshot://`,
/// `nbd://`), whose closing can fail or print.
fn plain_path(path: &OsStr) -> bool {
    crate::location::scheme_of(path.as_bytes()).is_none()
}

/// The source's scan as the pass will ask for it when the target has the source's size (the
/// one case in which the target's early scan runs): the key of `target_scan`, and the plan a
/// plain sync of equal sizes makes (`transfer::sync`).
fn source_scan(target_scan: &Msg, o: &crate::sync::SyncOptions) -> Option<Msg> {
    let Msg::Scan { key, block, end, data_len, threads, .. } = target_scan.clone() else { return None };
    Some(Msg::Scan {
        key,
        block,
        end,
        data_len,
        threads,
        rate: o.bwlimit.map_or(0, |b| crate::throttle::Throttle::new(b).rate()),
        fingerprint: false,
        changes: true,
        only_if_size: None,
    })
}

/// The target's scan as the pass will ask for it if the target turns out to have the source's
/// size (`Scan.only_if_size`): sent behind the target's `Open`, it saves the round trip between
/// `Opened` and `Scan` on a slow link. None when the pass would not scan (an empty source).
fn speculative_scan(s: &Opened, o: &crate::sync::SyncOptions) -> Result<Option<Msg>> {
    if !s.exists || s.size == 0 {
        return Ok(None);
    }
    Ok(Some(Msg::Scan {
        key: crate::id::random()?,
        block: o.block_size as u32,
        end: s.size,
        data_len: s.size,
        threads: u16::try_from(o.threads).unwrap_or(u16::MAX),
        rate: 0,
        fingerprint: false,
        changes: false,
        only_if_size: Some(s.size),
    }))
}

fn display(link: &Link, path: &OsStr) -> String {
    if link.is_remote() {
        format!("{}:{}", link.name, Path::new(path).display())
    } else {
        Path::new(path).display().to_string()
    }
}

/// Syncs `source_path` at `source` onto `target_path` at `target`.
fn sync(
    source: &mut Link,
    source_path: &OsStr,
    target: &mut Link,
    target_path: &OsStr,
    options: &RemoteOptions,
    undo: UndoAt<'_>,
    control: Control<'_>,
) -> Result<Summary> {
    let o = &options.sync;
    let cache = if o.keep_cache { open_flags::KEEP_CACHE } else { 0 };
    let s = open(source, Role::Source, cache | fs_aware(o), source_path, (b"", None, 0), None)?;
    let name = Path::new(source_path).file_name().map(OsStr::as_bytes).unwrap_or_default();
    let mut flags = cache | if o.dry_run { open_flags::READ_ONLY } else { open_flags::CREATE };
    if o.force {
        flags |= open_flags::FORCE;
    }
    if o.discard {
        flags |= open_flags::DISCARD;
    }
    if o.compress.is_some() {
        flags |= open_flags::COMPRESS;
    }
    // Behind the `Open`, the target's scan as the pass will want it when both have one size.
    // Not with an undo log: its request's reply must not meet the scan's.
    let speculative = match undo {
        UndoAt::None => speculative_scan(&s, o)?,
        UndoAt::There(_) | UndoAt::Fetch(_) => None,
    };
    // A source here and a target over ssh: the source's scan starts now, with the target's key,
    // so that its hashing overlaps ssh's start-up (issue 13, item 2); its replies are set aside
    // while the target opens.
    let early = speculative
        .as_ref()
        .filter(|_| !source.is_remote() && target.is_remote())
        .and_then(|scan| source_scan(scan, o));
    let like = (name, Some(&s), o.compress.unwrap_or(0));
    let t = match &early {
        Some(scan) => {
            source.send(scan.clone())?;
            source.setting_aside(|| open(target, Role::Target, flags, target_path, like, speculative.clone()))?
        }
        None => open(target, Role::Target, flags, target_path, like, speculative.clone())?,
    };
    // The peer started it exactly when this holds.
    let started = speculative.filter(|_| t.exists && t.size == s.size);
    let (s, source_started) = match (early, &started) {
        (Some(scan), Some(_)) => (s, Some(scan)),
        (Some(_), None) => {
            // The pass will want another scan, or none: a fresh peer for the source (it is in
            // this process, so that costs an open), rather than stopping a scan mid-stream.
            std::mem::replace(source, Link::local()).close();
            (open(source, Role::Source, cache | fs_aware(o), source_path, (b"", None, 0), None)?, None)
        }
        (None, _) => (s, None),
    };
    let names = (display(source, source_path), display(target, t.path.as_deref().unwrap_or(target_path)));
    let log = match undo {
        UndoAt::None => None,
        UndoAt::There(path) | UndoAt::Fetch(path) => {
            let there = if let UndoAt::There(_) = undo { path.as_os_str().as_bytes().to_vec() } else { Vec::new() };
            let comment = format!("undo log of a sync from {}", names.0);
            match target.call(Msg::Undo { path: there, comment: comment.into_bytes() })? {
                Msg::Path { path } => Some(std::path::PathBuf::from(OsStr::from_bytes(&path))),
                other => return Err(target.unexpected(&other)),
            }
        }
    };
    // With an undo log the flush is unconditional: it commits the log, even an empty one.
    let commit = if log.is_some() { Commit::Log } else { Commit::None };
    let result = transfer(source, (s, t, (started, source_started)), target, names, commit, options, control);
    if let (Some(written), UndoAt::Fetch(local)) = (&log, undo) {
        // A failed or interrupted transfer flushed what reached the target, which commits the
        // log of all of it: fetch it all the same, so the mirror can be rolled back.
        // Not even Ctrl-C stops this copy: after an interruption it is what makes it safe.
        let uninterrupted = std::sync::atomic::AtomicBool::new(false);
        let salvage = Control { observer: control.observer, cancel: &uninterrupted };
        let fetched = history::fetch(target, written, local, salvage);
        // A log that was never committed stays as PATH.partial, which `apply` reads.
        let at = || format!("{}:{}", target.name, crate::delta::partial_path(written).display());
        match (&result, fetched) {
            (Ok(_), Err(e)) => {
                return Err(Error::new(
                    e.kind(),
                    format!("the sync completed, but its undo log could not be fetched: {e}"),
                ));
            }
            (Err(e), Ok(())) => {
                let text = format!("{e}; the undo log of what was written is {}", local.display());
                return Err(Error::new(e.kind(), text));
            }
            (Err(e), Err(lost)) => {
                let text = format!(
                    "{e}; the undo log of what was written could not be fetched ({lost}); if the connection broke, it stays on {} for a day (`blksync apply` reads it there)",
                    at()
                );
                return Err(Error::new(e.kind(), text));
            }
            (Ok(_), Ok(())) => {}
        }
    }
    let mut summary = result?;
    if matches!(undo, UndoAt::None) && plain_path(source_path) && plain_path(target_path) {
        source.allow_quick_close();
        target.allow_quick_close();
    }
    summary.undo_log = match undo {
        UndoAt::None => None,
        UndoAt::There(path) => Some(display(target, path.as_os_str())),
        UndoAt::Fetch(path) => Some(path.display().to_string()),
    };
    Ok(summary)
}

/// Both ends of a command as opened on their links: the hash pass compares and moves their
/// bytes ([`crate::transfer`] runs the steps).
struct LinkEnds<'a> {
    source: &'a mut Link,
    s: Opened,
    target: &'a mut Link,
    t: Opened,
    /// The target's scan, started behind its `Open` (`speculative_scan`), for the first pass.
    started: Option<Msg>,
    /// The source's, started behind its `Open` (`source_scan`), for the first pass.
    source_started: Option<Msg>,
    /// As the user wrote them, with the host.
    names: (String, String),
    /// `compress` value for data frames.
    compress: i32,
    /// `--pause` after each data frame.
    pause: Option<Duration>,
}

impl crate::transfer::Ends for LinkEnds<'_> {
    fn names(&self) -> (String, String) {
        self.names.clone()
    }

    fn same_object(&self) -> bool {
        self.s.identity != Identity::None
            && self.s.identity == self.t.identity
            && self.source.info().boot_id == self.target.info().boot_id
    }

    fn source_size(&self) -> u64 {
        self.s.size
    }

    fn target(&self) -> End {
        End { exists: self.t.exists, size: self.t.size, created: self.t.created, caps: self.t.caps }
    }

    fn prepare(&mut self, _new_size: u64, resize: Option<u64>) -> Result<()> {
        // An undo log was started by its own message before (`Msg::Undo`).
        if let Some(size) = resize {
            match self.target.call(Msg::SetSize { size })? {
                Msg::Done => {}
                other => return Err(self.target.unexpected(&other)),
            }
        }
        Ok(())
    }

    fn pass(
        &mut self,
        mode: crate::transfer::Mode,
        plan: &crate::transfer::Plan<'_>,
        counters: &Counters,
        control: Control<'_>,
    ) -> Result<crate::engine::Found> {
        use crate::transfer::Mode as M;
        let started = self.started.take();
        let source_started = self.source_started.take();
        Pass {
            source: self.source,
            target: self.target,
            block: plan.block_size,
            chunk: chunk_size(plan.block_size),
            scan_len: plan.scan_len,
            source_len: plan.source_len,
            target_len: plan.target_len,
            mode: match mode {
                M::Copy => Mode::Copy,
                M::Apply => Mode::Apply,
                M::Compare | M::Verify => Mode::Compare,
            },
            compress: self.compress,
            threads: u16::try_from(plan.threads).unwrap_or(u16::MAX),
            throttle: plan.throttle,
            pause: self.pause.filter(|_| mode.writes()),
            must_flush: plan.must_flush,
            fingerprint: plan.fingerprint,
            // Only onto a copy of the source's size can a changed-block map be trusted.
            changes: mode != M::Verify && self.s.size == self.t.size,
            fs_aware: self.s.caps.unused_blocks,
            started: started.as_ref(),
            source_started: source_started.as_ref(),
        }
        .run(counters, control)
    }

    fn discard_created(&mut self) {
        let _ = self.target.call(Msg::Discard);
    }

    fn warnings(&self) -> Vec<String> {
        self.s.warnings.clone()
    }

    fn filesystems(&self) -> Vec<crate::endpoint::FsRegion> {
        self.s.filesystems.clone()
    }

    fn strategy(&self) -> String {
        let at =
            |link: &Link| if link.is_remote() { format!("on {} (its agent)", link.name) } else { "here".to_string() };
        format!(
            "the hash pass: both ends hash what they hold and only differing blocks move; the source is {}, the destination {}",
            at(self.source),
            at(self.target)
        )
    }

    fn source_caps(&self) -> Caps {
        self.s.caps
    }

    fn source_table(&mut self) -> Result<Option<blksync_disk::Table>> {
        // Asked only of a target of another size, for which no early scan runs: the replies
        // read here are the `Read`s' own.
        let source = LinkSource { link: self.source, size: self.s.size, name: PathBuf::from(&self.names.0) };
        crate::transfer::table::read(&source, crate::transfer::table::sector_hint(self.s.identity, &self.s.caps))
    }

    fn target_table(&mut self) -> Option<blksync_disk::Table> {
        // As `source_table`: no early scan runs on a target of another size.
        let target = LinkSource { link: self.target, size: self.t.size, name: PathBuf::from(&self.names.1) };
        crate::transfer::table::read(&target, crate::transfer::table::sector_hint(self.t.identity, &self.t.caps))
            .ok()
            .flatten()
    }

    fn write_target(&mut self, writes: &[(u64, Vec<u8>)]) -> Result<()> {
        for (offset, data) in writes {
            let chunk = crate::protocol::message::Chunk {
                offset: *offset,
                codec: crate::protocol::message::codec::RAW,
                raw_len: data.len() as u32,
                payload: data.clone(),
            };
            self.target.send(Msg::Write(chunk))?;
        }
        match self.target.call(Msg::Flush)? {
            Msg::Done => Ok(()),
            other => Err(self.target.unexpected(&other)),
        }
    }
}

/// Runs the sync of [`crate::transfer`] between two ends opened on their links.
#[allow(clippy::too_many_arguments)] // Both ends, as opened, and how to run.
fn transfer(
    source: &mut Link,
    (s, t, (started, source_started)): (Opened, Opened, (Option<Msg>, Option<Msg>)),
    target: &mut Link,
    names: (String, String),
    commit: Commit,
    options: &RemoteOptions,
    control: Control<'_>,
) -> Result<Summary> {
    let mut ends = LinkEnds {
        source,
        s,
        target,
        t,
        started,
        source_started,
        names,
        compress: options.compress,
        pause: options.pause,
    };
    crate::transfer::sync(&mut ends, commit, &options.sync, control)
}

/// A source behind a link, read a piece at a time with `Read` (the few sectors of a partition
/// table, before a pass: not for bulk data, which the hash pass moves).
struct LinkSource<'a> {
    link: &'a Link,
    size: u64,
    name: PathBuf,
}

impl Source for LinkSource<'_> {
    fn name(&self) -> &Path {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        const PIECE: usize = 1 << 20;
        for (i, piece) in buf.chunks_mut(PIECE).enumerate() {
            let at = offset + (i * PIECE) as u64;
            self.link.send(Msg::Read { offset: at, len: piece.len() as u32, compress: crate::compress::AUTO })?;
            loop {
                match self.link.recv()? {
                    Msg::Data(chunk) => {
                        let data = crate::compress::decode(&chunk)?;
                        let from = chunk.offset.checked_sub(at).map(|d| d as usize);
                        match from {
                            Some(from) if from + data.len() <= piece.len() => {
                                piece[from..from + data.len()].copy_from_slice(&data);
                            }
                            _ => return Err(self.link.unexpected(&Msg::Data(chunk))),
                        }
                    }
                    Msg::ReadDone { .. } => break,
                    other => return Err(self.link.unexpected(&other)),
                }
            }
        }
        Ok(())
    }

    fn segment_at(&self, offset: u64) -> Result<crate::endpoint::Segment> {
        Ok(crate::endpoint::Segment { start: offset, end: self.size, allocated: true })
    }

    fn drop_cache(&self, _offset: u64, _len: u64) {}

    fn identity(&self) -> Identity {
        Identity::None
    }
}

/// An endpoint location with the ssh options for reaching it.
pub struct Side<'a> {
    /// Where it is.
    pub location: &'a Location,
    /// How to reach it when remote.
    pub ssh: &'a SshOptions,
}

/// A link to `side` and the path there. A remote agent starts with the link's first call.
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

/// Bytes sent to and received from the peers of `links`.
fn wire_of(links: &[&Link]) -> (u64, u64) {
    let (mut sent, mut received) = (0, 0);
    add_wire(&mut sent, &mut received, links);
    (sent, received)
}

/// Connects to `side`, runs `run` on the link and the path there, and closes the link whatever
/// happened. Also returns the bytes that crossed the wire.
fn with_link<T>(
    side: &Side<'_>,
    control: Control<'_>,
    run: impl FnOnce(&mut Link, &OsStr) -> Result<T>,
) -> Result<(T, (u64, u64))> {
    let (mut link, path) = connect(side)?;
    let result = run(&mut link, &path);
    let wire = wire_of(&[&link]);
    link.report(control.observer);
    link.close();
    result.map(|r| (r, wire))
}

/// [`with_link`] for two sides at once.
fn with_two_links<T>(
    a: &Side<'_>,
    b: &Side<'_>,
    control: Control<'_>,
    run: impl FnOnce(&mut Link, &OsStr, &mut Link, &OsStr) -> Result<T>,
) -> Result<(T, (u64, u64))> {
    let ((result, y_wire), x_wire) =
        with_link(a, control, |x, x_path| with_link(b, control, |y, y_path| run(x, x_path, y, y_path)))?;
    Ok((result, (x_wire.0 + y_wire.0, x_wire.1 + y_wire.1)))
}

/// Connects both sides, runs `run` on the two links and their paths, adds the bytes that crossed
/// the wire to its summary, and closes both links whatever happened.
fn with_links(
    a: &Side<'_>,
    b: &Side<'_>,
    control: Control<'_>,
    run: impl FnOnce(&mut Link, &OsStr, &mut Link, &OsStr) -> Result<Summary>,
) -> Result<Summary> {
    with_two_links(a, b, control, run).map(|(mut summary, (sent, received))| {
        summary.bytes_sent += sent;
        summary.bytes_received += received;
        summary
    })
}

/// Syncs between two locations through the hash pass (a local side is a peer in a thread; two local
/// sides are how the library tests drive it): connects, syncs, says goodbye.
/// Two paths on one remote host use one connection, and the sync runs there.
pub fn sync_locations(
    source: &Side<'_>,
    target: &Side<'_>,
    options: &RemoteOptions,
    control: Control<'_>,
) -> Result<Summary> {
    if options.sync.dry_run && options.undo.is_some() {
        return Err(Error::usage("an undo log and a dry run contradict each other: a dry run changes nothing to undo"));
    }
    let undo_side = options.undo.as_ref().map(|location| Side { location, ssh: target.ssh });
    let undo = match (&undo_side, target.location) {
        (None, _) => UndoAt::None,
        (Some(u), _) if history::same_host(u, target) => UndoAt::There(history::path_of(u)),
        (Some(Side { location: Location::Local(path), .. }), Location::Remote(_)) => UndoAt::Fetch(path),
        (Some(u), _) => {
            return Err(Error::usage(format!(
                "undo log {}: an undo log is written on the destination's host or here, not on a third host",
                history::shown(u, history::path_of(u))
            )));
        }
    };
    if let (Location::Remote(a), Location::Remote(b)) = (source.location, target.location)
        && history::same_host(source, target)
        && !matches!(undo, UndoAt::Fetch(_))
    {
        let mut o = options.sync.clone();
        o.undo = match undo {
            UndoAt::There(path) => Some(path.to_path_buf()),
            _ => None,
        };
        return sync_on_host(source, a, &b.path, &o, control);
    }
    with_links(source, target, control, |s, s_path, t, t_path| sync(s, s_path, t, t_path, options, undo, control))
}

/// Runs `job` on `side`'s host, where every path it names is (`clone` on one remote host):
/// its result and the bytes sent and received.
pub(crate) fn job_on_host<T: serde::de::DeserializeOwned>(
    side: &Side<'_>,
    job: &Job,
    control: Control<'_>,
) -> Result<(T, (u64, u64))> {
    history::job_counted(side, job, control)
}

/// Whether two sides are on one remote host (the same user, host, port and ssh options).
pub(crate) fn same_remote_host(a: &Side<'_>, b: &Side<'_>) -> bool {
    history::same_host(a, b)
}

/// Runs a sync between two paths of one remote host on that host, as a job: no image data
/// crosses the network.
fn sync_on_host(
    side: &Side<'_>,
    remote: &crate::location::Remote,
    target_path: &Path,
    o: &SyncOptions,
    control: Control<'_>,
) -> Result<Summary> {
    let job = Job::Sync {
        source: WirePath::new(&remote.path),
        target: WirePath::new(target_path),
        undo: o.undo.as_deref().map(WirePath::new),
        options: SyncOptions { undo: None, ..o.clone() },
    };
    let (mut summary, wire): (Summary, _) = history::job_counted(side, &job, control)?;
    let host = remote.destination();
    summary.source = format!("{host}:{}", remote.path.display());
    summary.destination = format!("{host}:{}", summary.destination);
    summary.undo_log = o.undo.as_ref().map(|u| format!("{host}:{}", u.display()));
    (summary.bytes_sent, summary.bytes_received) = wire;
    Ok(summary)
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
            None => match link.recv_timeout(Duration::from_millis(100)) {
                Ok(Msg::Error { kind, message, hint }) => return Err(link.error(kind, message).with_hint(hint)),
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

/// Compares two paths of one remote host on that host, as a job.
fn compare_on_host(
    side: &Side<'_>,
    remote: &crate::location::Remote,
    second: &Path,
    options: crate::compare::CompareOptions,
    control: Control<'_>,
) -> Result<Comparison> {
    let job = Job::Compare { first: WirePath::new(&remote.path), second: WirePath::new(second), options };
    let (mut comparison, _): (Comparison, _) = history::job_counted(side, &job, control)?;
    let host = remote.destination();
    comparison.source = format!("{host}:{}", remote.path.display());
    comparison.destination = format!("{host}:{}", second.display());
    Ok(comparison)
}

fn open_chain(
    link: &mut Link,
    dir: &OsStr,
    role: Role,
    at: crate::backup::At,
    comment: &str,
    (source, source_size): (&str, u64),
    (block, level): (usize, i32),
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
        source_size,
        level,
    };
    opened(link, msg, None)
}

/// Backs `source` up into the chain at `dest`, either or both remote: the chain's side scans its
/// newest point and writes the new one (an increment, or the base of a new chain).
pub fn backup_locations(
    source: &Side<'_>,
    dest: &Side<'_>,
    comment: &str,
    options: &RemoteOptions,
    control: Control<'_>,
) -> Result<crate::backup::BackupSummary> {
    if let (Location::Remote(src), Location::Remote(dir)) = (source.location, dest.location)
        && history::same_host(source, dest)
    {
        // Both on one host: the backup runs there, and no image data crosses the network.
        let o = &options.sync;
        let options = crate::patch::DiffOptions {
            block_size: o.block_size,
            threads: o.threads,
            keep_cache: o.keep_cache,
            comment: comment.to_string(),
            bwlimit: o.bwlimit,
            force: o.force,
            compress: o.compress,
            fs_aware: o.fs_aware,
        };
        let job = Job::Backup { source: WirePath::new(&src.path), dir: WirePath::new(&dir.path), options };
        let (mut b, wire): (crate::backup::BackupSummary, _) = history::job_counted(dest, &job, control)?;
        b.file = b.file.map(|file| history::shown(dest, Path::new(&file)));
        b.summary.source = src.display();
        b.summary.destination = b.file.clone().unwrap_or_else(|| dir.display());
        (b.summary.bytes_sent, b.summary.bytes_received) = wire;
        return Ok(b);
    }
    let options = RemoteOptions {
        sync: SyncOptions { verify: false, dry_run: false, ..options.sync.clone() },
        undo: None,
        ..options.clone()
    };
    with_links(source, dest, control, |s, s_path, t, t_path| {
        let cache = if options.sync.keep_cache { open_flags::KEEP_CACHE } else { 0 };
        let so = open(s, Role::Source, cache | fs_aware(&options.sync), s_path, (b"", None, 0), None)?;
        let source_name = display(s, s_path);
        let to = open_chain(
            t,
            t_path,
            Role::Target,
            crate::backup::At::Latest,
            comment,
            (&source_name, if options.sync.force { 0 } else { so.size }),
            (options.sync.block_size, options.sync.compress.unwrap_or(0)),
        )?;
        let names = (source_name, display(t, t_path));
        transfer(s, (so, to, (None, None)), t, names, Commit::Point, &options, control)
    })
    .map(|summary| crate::backup::BackupSummary { file: None, number: None, summary })
}

/// `backup --dry-run` with an end across hosts: the source compared with the chain's newest
/// point by the hash pass, so that no image data moves. Returns the comparison, what it was
/// compared with, and whether the chain is new (no chain there yet: the first point would be a
/// full copy, which is then counted as the whole source, an upper bound).
pub(crate) fn estimate_backup(
    source: &Side<'_>,
    dest: &Side<'_>,
    o: &SyncOptions,
    control: Control<'_>,
) -> Result<(Summary, String, bool)> {
    let ((mut summary, base, new_chain), (sent, received)) =
        with_two_links(source, dest, control, |s, s_path, t, t_path| {
            let so = open(s, Role::Source, fs_aware(o), s_path, (b"", None, 0), None)?;
            let names = (display(s, s_path), display(t, t_path));
            match open_chain(t, t_path, Role::Source, crate::backup::At::Latest, "", ("", 0), (o.block_size, 0)) {
                Ok(to) => {
                    let base = format!("{} (its newest point)", names.1);
                    let mut ends = LinkEnds {
                        source: s,
                        s: so,
                        target: t,
                        t: to,
                        started: None,
                        source_started: None,
                        names,
                        compress: crate::compress::OFF,
                        pause: None,
                    };
                    Ok((crate::transfer::sync(&mut ends, Commit::None, o, control)?, base, false))
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    let mut summary = Summary {
                        source: names.0,
                        destination: names.1.clone(),
                        dry_run: true,
                        block_size: o.block_size,
                        counters: crate::progress::Snapshot::default(),
                        ranges_differing: 1,
                        destination_size_before: 0,
                        destination_size_after: so.size,
                        verified: false,
                        warnings: so.warnings.clone(),
                        bytes_sent: 0,
                        bytes_received: 0,
                        undo_log: None,
                        partitions: Vec::new(),
                        filesystems: so.filesystems.clone(),
                    };
                    summary.counters.bytes_total = so.size;
                    summary.counters.bytes_written = so.size;
                    Ok((summary, names.1, true))
                }
                Err(e) => Err(e),
            }
        })?;
    (summary.bytes_sent, summary.bytes_received) = (sent, received);
    Ok((summary, base, new_chain))
}

/// `diff --dry-run` with an end across hosts: SOURCE compared with BASE by the hash pass.
pub(crate) fn estimate_diff(
    source: &Side<'_>,
    base: &Side<'_>,
    o: &SyncOptions,
    control: Control<'_>,
) -> Result<Summary> {
    with_links(source, base, control, |s, s_path, b, b_path| {
        let so = open(s, Role::Source, fs_aware(o), s_path, (b"", None, 0), None)?;
        let bo = open(b, Role::Source, 0, b_path, (b"", None, 0), None)?;
        let names = (display(s, s_path), display(b, b_path));
        let mut ends = LinkEnds {
            source: s,
            s: so,
            target: b,
            t: bo,
            started: None,
            source_started: None,
            names,
            compress: crate::compress::OFF,
            pause: None,
        };
        crate::transfer::sync(&mut ends, Commit::None, o, control)
    })
}

/// Restores point `at` of the chain at `chain` onto `target`, either or both remote.
pub fn restore_locations(
    chain: &Side<'_>,
    at: crate::backup::At,
    target: &Side<'_>,
    options: &RemoteOptions,
    control: Control<'_>,
) -> Result<Summary> {
    if let (Location::Remote(dir), Location::Remote(path)) = (chain.location, target.location)
        && history::same_host(chain, target)
    {
        // Both on one host: the restore runs there.
        let job = Job::Restore {
            dir: WirePath::new(&dir.path),
            target: WirePath::new(&path.path),
            at,
            force: options.sync.force,
        };
        let (mut summary, wire): (Summary, _) = history::job_counted(target, &job, control)?;
        summary.source = dir.display();
        summary.destination = path.display();
        (summary.bytes_sent, summary.bytes_received) = wire;
        return Ok(summary);
    }
    with_links(chain, target, control, |s, s_path, t, t_path| {
        let so = open_chain(s, s_path, Role::Source, at, "", ("", 0), (options.sync.block_size, 0))?;
        let o = &options.sync;
        let mut flags = open_flags::CREATE | if o.keep_cache { open_flags::KEEP_CACHE } else { 0 };
        if o.force {
            flags |= open_flags::FORCE;
        }
        let to = open(t, Role::Target, flags, t_path, (b"", Some(&so), 0), None)?;
        let names = (display(s, s_path), display(t, t_path));
        transfer(s, (so, to, (None, None)), t, names, Commit::None, options, control)
    })
}

/// Writes point `at` of the remote chain at `chain` to `out` (`restore HOST:DIR -`), reading
/// ahead a few requests so the link stays busy. Returns the bytes written.
pub fn restore_stream(
    chain: &Side<'_>,
    at: crate::backup::At,
    out: &mut dyn std::io::Write,
    control: Control<'_>,
) -> Result<u64> {
    const PIECE: u64 = 4 << 20;
    const AHEAD: u64 = 4;
    let stdout = Path::new("standard output");
    with_link(chain, control, |link, path| {
        let size = open_chain(link, path, Role::Source, at, "", ("", 0), (4096, 0))?.size;
        let counters = Counters::new();
        counters.set_total(size);
        control.observer.phase(Phase::Sync, size);
        let request = |link: &Link, offset: u64| {
            let len = (size - offset).min(PIECE) as u32;
            link.send(Msg::Read { offset, len, compress: crate::compress::AUTO })
        };
        let (mut asked, mut done) = (0, 0);
        while asked < size && asked < AHEAD * PIECE {
            request(link, asked)?;
            asked += (size - asked).min(PIECE);
        }
        while done < size {
            if control.cancelled() {
                return Err(Error::new(ErrorKind::Interrupted, format!("interrupted after {done} bytes")));
            }
            match link.recv()? {
                Msg::Data(chunk) if chunk.offset == done => {
                    let data = crate::compress::decode(&chunk)?;
                    out.write_all(&data).map_err(|e| Error::io("writing", stdout, Some(done), e))?;
                    done += data.len() as u64;
                    counters.add_scanned(data.len() as u64);
                    counters.add_written(data.len() as u64);
                    control.observer.progress(&counters.snapshot());
                }
                Msg::ReadDone { .. } if asked < size => {
                    request(link, asked)?;
                    asked += (size - asked).min(PIECE);
                }
                Msg::ReadDone { .. } => {}
                other => return Err(link.unexpected(&other)),
            }
        }
        out.flush().map_err(|e| Error::io("writing", stdout, None, e))?;
        Ok(done)
    })
    .map(|(done, _)| done)
}

/// Compares two locations through the hash pass (local sides are peers in threads).
pub fn compare_locations(
    a: &Side<'_>,
    b: &Side<'_>,
    options: &crate::compare::CompareOptions,
    control: Control<'_>,
) -> Result<Comparison> {
    if let (Location::Remote(first), Location::Remote(second)) = (a.location, b.location)
        && history::same_host(a, b)
    {
        let options = crate::compare::CompareOptions { keep_cache: false, threads: 0, ..options.clone() };
        return compare_on_host(a, first, &second.path, options, control);
    }
    with_two_links(a, b, control, |x, x_path, y, y_path| compare(x, x_path, y, y_path, options, control))
        .map(|(comparison, _)| comparison)
}

/// Compares `a_path` at `a` with `b_path` at `b`.
pub fn compare(
    a: &mut Link,
    a_path: &OsStr,
    b: &mut Link,
    b_path: &OsStr,
    options: &crate::compare::CompareOptions,
    control: Control<'_>,
) -> Result<Comparison> {
    let flags = if options.fs_aware { open_flags::FS_AWARE } else { 0 };
    let first = open(a, Role::Source, flags, a_path, (b"", None, 0), None)?;
    let second = open(b, Role::Source, 0, b_path, (b"", None, 0), None)?;
    let names = (display(a, a_path), display(b, b_path));
    let mut ends = LinkEnds {
        source: a,
        s: first,
        target: b,
        t: second,
        started: None,
        source_started: None,
        names,
        compress: crate::compress::OFF,
        pause: None,
    };
    let options = crate::compare::CompareOptions { keep_cache: false, threads: 0, ..options.clone() };
    crate::transfer::compare(&mut ends, &options, control)
}
