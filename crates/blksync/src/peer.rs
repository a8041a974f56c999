//! A peer: serves one endpoint to the client (docs/PROTOCOL.md, "Roles").
//!
//! [`serve`] answers requests from a channel and sends replies to another. The remote agent runs
//! it between stdin and stdout; a local endpoint of a remote sync runs the very same code in a
//! thread, so both sides of a transfer behave identically.
//!
//! Scans and copies run in background threads (reading and hashing on every core) while the
//! request loop keeps answering refinements, reads and writes. A scan never runs more than
//! [`WINDOW`] chunks ahead of the client's last `Ack`, which bounds the memory held for leaf
//! hashes and guarantees refinements are answered from memory.

use std::collections::HashMap;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::compress::{self, Compressor};
use crate::endpoint::OpenTarget;
use crate::endpoint::{Identity, SegmentCursor, Source, Target, UsageCursor};
use crate::engine::fill;
use crate::error::{Error, ErrorKind, Result};
use crate::extent::{Extent, Runs};
use crate::hash::{Hasher, Tree, chunk_size};
use crate::protocol::message::{Role, open_flags};
use crate::protocol::{FEATURES, Msg, VERSION};
use crate::record::{Append, Recorder, Undo};
use crate::write_behind::WriteBehind;
use crate::zero::is_zero;

mod files;
mod writers;

/// How many chunks a scan may run ahead of the last `Ack`.
pub const WINDOW: u64 = 512;
/// Zero-detection granularity of `Copy`.
const COPY_BLOCK: usize = 4096;

/// Serves requests until `Bye` or until the request channel closes.
pub fn serve(requests: &Receiver<Msg>, replies: &Sender<Msg>) {
    let mut peer = Peer {
        replies: replies.clone(),
        endpoint: None,
        target: None,
        plain: None,
        recorder: None,
        role: Role::Source,
        fs_aware: false,
        keep_cache: false,
        keep_clean: false,
        write_behind: WriteBehind::default(),
        writers: None,
        scan: None,
        jobs: Vec::new(),
        stop: Arc::new(AtomicBool::new(false)),
        cancel: Arc::new(AtomicBool::new(false)),
        compressors: HashMap::new(),
        upload: None,
        spool: files::Spool::default(),
    };
    let mut goodbye = false;
    for msg in requests {
        if msg == Msg::Bye {
            goodbye = true;
            break;
        }
        if let Err(e) = peer.handle(msg) {
            let _ = replies.send(Msg::failure(&e));
        }
    }
    if !goodbye {
        // The connection broke: an undo log or delta spooled for the client to fetch may be all
        // that can roll a half-synced mirror back. Keep it; the spool drops it after a day.
        peer.spool.keep();
    }
    peer.stop.store(true, Ordering::Relaxed);
    // A job still running has lost its client (a dropped connection, a killed client): stop
    // it at its next chunk, as Ctrl-C would, rather than run on unobserved and hold its locks.
    peer.cancel.store(true, Ordering::Relaxed);
    if let Some(scan) = &peer.scan {
        scan.cond.notify_all();
    }
    for job in peer.jobs.drain(..) {
        let _ = job.join();
    }
}

struct Peer {
    replies: Sender<Msg>,
    endpoint: Option<Arc<dyn Source>>,
    /// The endpoint again, as the target that writes go to (a recorder, for `Record`, `Undo`
    /// and a chain).
    target: Option<Arc<dyn Target>>,
    /// A target just opened, before `Record` or `Undo` wrap it.
    plain: Option<Arc<dyn Target>>,
    /// The recorder `Record` made, which takes the new image's fingerprint (`Fingerprint`).
    recorder: Option<Arc<Recorder<Arc<dyn Target>>>>,
    role: Role,
    /// The source was opened `FS_AWARE`: its scans tell free blocks.
    fs_aware: bool,
    keep_cache: bool,
    /// Clean pages of a small image stay cached; written ones still leave.
    keep_clean: bool,
    /// When written pages leave the cache.
    write_behind: WriteBehind,
    /// The threads applying writes to the target, when its writes cost CPU.
    writers: Option<writers::Writers>,
    scan: Option<Arc<ScanState>>,
    jobs: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    /// Cancels a job.
    cancel: Arc<AtomicBool>,
    compressors: HashMap<i32, Compressor>,
    /// The file a `Put` is writing.
    upload: Option<files::Upload>,
    /// Files this session spooled; removed when it ends.
    spool: files::Spool,
}

struct ScanState {
    hasher: Hasher,
    chunk: usize,
    end: u64,
    data_len: u64,
    trees: Mutex<HashMap<u64, Arc<Tree>>>,
    acked: Mutex<u64>,
    cond: Condvar,
    /// Fingerprint the endpoint as it is read (`ScanDone.fingerprint`): only a source's is
    /// used (the client hands it to a recording target), so a target's scan skips the work.
    fingerprint: bool,
    /// Skip what the source's changed-block map says is as at its mark (`Scan.changes`).
    changes: bool,
    /// The endpoint is a source opened `FS_AWARE`: tell its free blocks (`Unused`).
    unused: bool,
}

/// What a run of chunks told without reading them is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RunKind {
    Holes,
    Clean,
    /// Free blocks of the source's filesystem, whole chunks of them.
    Unused,
}

/// A run of chunks not yet reported: `(kind, first, count)`.
#[derive(Default)]
struct Run(Option<(RunKind, u64, u64)>);

impl Run {
    /// Adds `chunk`, reporting the run before it when it cannot grow. False: the client is gone.
    fn add(&mut self, kind: RunKind, chunk: u64, replies: &Sender<Msg>, state: &ScanState) -> bool {
        match &mut self.0 {
            Some((k, first, count)) if *k == kind && *first + *count == chunk => {
                *count += 1;
                true
            }
            _ => {
                let sent = self.report(replies, state);
                self.0 = Some((kind, chunk, 1));
                sent
            }
        }
    }

    /// Sends the pending run, if any. False: the client is gone.
    fn report(&mut self, replies: &Sender<Msg>, state: &ScanState) -> bool {
        match self.0.take() {
            Some((RunKind::Unused, first, count)) => {
                let (start, _) = state.range(first);
                let (last, len) = state.range(first + count - 1);
                replies.send(Msg::Unused { start, len: last + len as u64 - start }).is_ok()
            }
            Some((RunKind::Holes, first, count)) => replies.send(Msg::Holes { first, count }).is_ok(),
            Some((RunKind::Clean, first, count)) => replies.send(Msg::Clean { first, count }).is_ok(),
            None => true,
        }
    }
}

impl ScanState {
    fn chunks(&self) -> u64 {
        self.end.div_ceil(self.chunk as u64)
    }

    fn range(&self, chunk: u64) -> (u64, usize) {
        let start = chunk * self.chunk as u64;
        (start, (self.end - start).min(self.chunk as u64) as usize)
    }

    /// What `chunk` is without reading it, if anything: as at the changed-block mark, free
    /// blocks of its filesystem, or a hole. Otherwise `data` receives its allocated extents.
    /// The free parts of a chunk that is partly used go into `unused`, to be told before it.
    fn told(
        &self,
        chunk: u64,
        (changes, usage): (Option<&mut crate::endpoint::ChangeCursor<'_>>, Option<&mut UsageCursor<'_>>),
        map: &mut SegmentCursor<'_>,
        (data, unused): (&mut Vec<crate::extent::Extent>, &mut Vec<crate::extent::Extent>),
    ) -> Result<Option<RunKind>> {
        let (start, len) = self.range(chunk);
        let end = start + len as u64;
        unused.clear();
        if let Some(changes) = changes
            && !changes.any_in(start, end)?
        {
            return Ok(Some(RunKind::Clean));
        }
        if let Some(usage) = usage {
            usage.used_in(start, end, data)?;
            if data.is_empty() {
                return Ok(Some(RunKind::Unused));
            }
            *unused = crate::extent::gaps(crate::extent::Extent::between(start, end), data);
        }
        map.allocated_in(start, end.min(self.data_len), data)?;
        Ok(data.is_empty().then_some(RunKind::Holes))
    }

    /// Reads and hashes one chunk.
    fn tree(&self, endpoint: &dyn Source, chunk: u64, buf: &mut Vec<u8>, map: &mut SegmentCursor<'_>) -> Result<Tree> {
        let (start, len) = self.range(chunk);
        buf.resize(len, 0);
        let mut data = Vec::new();
        map.allocated_in(start, (start + len as u64).min(self.data_len), &mut data)?;
        fill(endpoint, &mut buf[..len], start, &data)?;
        Ok(self.hasher.tree(&buf[..len], data.is_empty()))
    }
}

impl Peer {
    fn endpoint(&self) -> Result<&Arc<dyn Source>> {
        self.endpoint.as_ref().ok_or_else(|| Error::protocol("request before Open"))
    }

    fn target(&self) -> Result<&Arc<dyn Target>> {
        if self.role != Role::Target {
            return Err(Error::protocol("write request to a source (the source is never written)"));
        }
        self.target.as_ref().ok_or_else(|| Error::protocol("write request before Open"))
    }

    /// Serves `target` (a plain one, or a recorder around it) from now on.
    fn serve_target(&mut self, target: Arc<impl Target + 'static>) {
        self.set_target(Some(Arc::clone(&target) as Arc<dyn Target>));
        self.endpoint = Some(target);
    }

    /// Writes go to `target` from now on: through a pool of threads when its writes cost CPU
    /// (`writers`). The request that changes the target was a barrier, so the old pool, if
    /// any, holds nothing.
    fn set_target(&mut self, target: Option<Arc<dyn Target>>) {
        self.writers = target.as_ref().filter(|t| t.caps().costly_writes).map(writers::Writers::new);
        self.target = target;
    }

    fn reply(&self, msg: Msg) {
        let _ = self.replies.send(msg);
    }

    fn handle(&mut self, msg: Msg) -> Result<()> {
        // Every request waits for the writes before it (`writers`), except a write and the hash
        // pass's questions about its scan (`Ack`, `Groups`, `Leaves`), which read the scan's trees
        // and the chunks the writes are still to go to: waiting there would stall the pass on
        // every write.
        if !matches!(msg, Msg::Write(_) | Msg::Ack { .. } | Msg::Groups { .. } | Msg::Leaves { .. })
            && let Some(writers) = &self.writers
        {
            writers.drain()?;
        }
        match msg {
            Msg::Hello { want_exe_hash, .. } => {
                let exe_hash = if want_exe_hash { exe_hash() } else { Vec::new() };
                self.reply(Msg::HelloReply {
                    version: VERSION,
                    features: FEATURES,
                    tool_version: env!("CARGO_PKG_VERSION").as_bytes().to_vec(),
                    boot_id: boot_id(),
                    exe_hash,
                });
            }
            Msg::Open { role, flags, mode, size, path, name, level } => {
                let compress = (flags & open_flags::COMPRESS != 0).then_some(level);
                self.open(role, flags, (mode, size, compress), &path, &name)?;
            }
            Msg::SetSize { size } => {
                self.target()?.set_size(size)?;
                self.reply(Msg::Done);
            }
            Msg::Scan { key, block, end, data_len, threads, rate, fingerprint, changes, only_if_size } => {
                // A speculative scan runs only on an endpoint of the size it was made for; the
                // client knows from `Opened` (or its error) which it was.
                let wanted = match (only_if_size, &self.endpoint) {
                    (None, _) => true,
                    (Some(size), Some(endpoint)) => endpoint.exists() && endpoint.size() == size,
                    (Some(_), None) => false,
                };
                if wanted {
                    self.start_scan(key, block, (end, data_len), threads, (rate, fingerprint, changes))?;
                }
            }
            Msg::Ack { chunks } => self.ack(chunks),
            Msg::Groups { chunk } => {
                let tree = self.tree_of(chunk)?;
                let (zero, hashes) = tree.group_list();
                self.reply(Msg::GroupHashes { chunk, zero, hashes });
            }
            Msg::Leaves { chunk, group } => {
                let (zero, hashes) = self.leaves_of(chunk, group)?;
                self.reply(Msg::LeafHashes { chunk, group, zero, hashes });
            }
            Msg::Read { offset, len, compress } => self.read(offset, len, compress)?,
            Msg::Write(chunk) if self.upload.is_some() => {
                let data = compress::decode(&chunk)?;
                self.upload.as_ref().map_or(Ok(()), |u| u.write(&data, chunk.offset))?;
            }
            Msg::Flush if self.upload.is_some() => {
                self.upload.take().map_or(Ok(()), files::Upload::commit)?;
                self.reply(Msg::Done);
            }
            Msg::Write(chunk) => self.write(chunk)?,
            Msg::Zero { offset, len } => self.target()?.zero(offset, len)?,
            Msg::Flush => self.flush()?,
            Msg::Discard | Msg::FlushPartial => self.end_early(&msg)?,
            Msg::Fingerprint { after } => {
                if let Some(recorder) = &self.recorder {
                    recorder.set_after(after);
                }
            }
            Msg::CheckIntact => {
                let endpoint = self.endpoint()?;
                endpoint.check_intact()?;
                for text in endpoint.warnings(true) {
                    self.reply(Msg::Warning { text });
                }
                self.reply(Msg::Done);
            }
            Msg::OpenChain { dir, role, at_kind, at, comment, source, block, source_size, level } => {
                let compress = (level != 0).then_some(level);
                self.open_chain(&dir, role, (at_kind, at), &comment, (&source, source_size), (block, compress))?;
            }
            Msg::Copy { end, data_len, compress, threads } => self.start_copy(end, data_len, compress, threads)?,
            Msg::Job { request } => {
                let mut job = crate::job::Job::decode(&request)?;
                job.spool_output(|| self.spool.path())?;
                self.spawn_job(move |control| match job.run(control) {
                    Ok(result) => Msg::JobDone { result },
                    Err(e) => Msg::failure(&e),
                });
            }
            Msg::Put { path, mode } => self.put(&path, mode)?,
            Msg::Get { path, compress } => {
                let (replies, stop) = (self.replies.clone(), Arc::clone(&self.stop));
                let path = path_of(&path);
                self.jobs.push(std::thread::spawn(move || {
                    if let Err(e) = files::send(&path, compress, &replies, &stop) {
                        let _ = replies.send(Msg::failure(&e));
                    }
                }));
            }
            Msg::Record { path, comment, source, block } => self.record(&path, &comment, &source, block)?,
            Msg::Undo { path, comment } => self.undo(&path, &comment)?,
            Msg::Cancel => self.cancel.store(true, Ordering::Relaxed),
            other => return Err(Error::protocol(format!("unexpected message from the client: {other:?}"))),
        }
        Ok(())
    }

    /// The transfer ended early (docs/PROTOCOL.md): `FlushPartial` makes what was written
    /// durable without committing a point, delta or upload; `Discard` removes a target this
    /// session created.
    fn end_early(&mut self, msg: &Msg) -> Result<()> {
        match (msg, self.upload.take()) {
            (Msg::FlushPartial, Some(upload)) => drop(upload), // removes its temporary file
            (Msg::FlushPartial, None) => self.target()?.flush_partial()?,
            _ => {
                if let Some(target) = &self.plain {
                    target.remove_created();
                }
            }
        }
        self.reply(Msg::Done);
        Ok(())
    }

    fn open(
        &mut self,
        role: Role,
        flags: u32,
        (mode, size, compress): (u32, u64, Option<i32>),
        path: &[u8],
        name: &[u8],
    ) -> Result<()> {
        if self.endpoint.is_some() {
            return Err(Error::protocol("a peer serves one endpoint; Open came twice"));
        }
        let asked = path_of(path);
        let mut path = asked.clone();
        if role == Role::Target && !name.is_empty() {
            // A directory destination receives the source's file name, as with cp and rsync.
            path = crate::sync::resolve_destination(&path_of(name), &path)?;
        }
        let resolved = if path == asked { Vec::new() } else { path.as_os_str().as_encoded_bytes().to_vec() };
        let path = path.as_path();
        let (endpoint, target): (Arc<dyn Source>, Option<Arc<dyn Target>>) = match role {
            Role::Source if flags & open_flags::FS_AWARE != 0 => {
                let source = crate::endpoint::usage::FsAware::new(crate::endpoint::open_source(path)?)?;
                self.fs_aware = true;
                (Arc::new(source) as Arc<dyn Source>, None)
            }
            Role::Source => (Arc::from(crate::endpoint::open_source(path)?), None),
            Role::Target => {
                let target: Arc<dyn Target> = Arc::from(crate::endpoint::open_target(
                    path,
                    OpenTarget {
                        read_only: flags & open_flags::READ_ONLY != 0,
                        create: flags & open_flags::CREATE != 0,
                        force: flags & open_flags::FORCE != 0,
                        discard: flags & open_flags::DISCARD != 0,
                        mode: (mode != 0).then_some(mode),
                        size: (size != 0).then_some(size),
                        compress,
                    },
                )?);
                (Arc::clone(&target) as Arc<dyn Source>, Some(target))
            }
        };
        let (identity_tag, id_a, id_b) = match endpoint.identity() {
            Identity::None => (0, 0, 0),
            Identity::File { dev, ino } => (1, dev, ino),
            Identity::Device { rdev } => (2, rdev, 0),
        };
        let mode = endpoint.mode().unwrap_or(0);
        let caps = endpoint.caps();
        if role == Role::Source {
            // Before `Opened`, which the client waits for: docs/PROTOCOL.md, `Open`.
            for text in endpoint.warnings(false) {
                self.reply(Msg::Warning { text });
            }
            for r in endpoint.filesystems() {
                self.reply(Msg::Filesystem {
                    start: r.start,
                    len: r.len,
                    used: r.used,
                    filesystem: r.filesystem.unwrap_or_default().into_bytes(),
                    detail: r.detail.into_bytes(),
                    whole: r.whole.unwrap_or_default().into_bytes(),
                });
            }
        }
        self.reply(Msg::Opened {
            exists: endpoint.exists(),
            size: endpoint.size(),
            identity_tag,
            id_a,
            id_b,
            created: target.as_ref().is_some_and(|t| Target::created(t.as_ref())),
            mode,
            caps: caps.to_bits(),
            block_size: caps.block_size,
            path: resolved,
        });
        self.role = role;
        self.keep_cache = flags & open_flags::KEEP_CACHE != 0;
        // What a small image read stays cached (`write_behind::cheap_to_keep`); a target is
        // judged by the size it is synced to, which a fresh one does not have yet.
        self.keep_clean = crate::write_behind::cheap_to_keep(endpoint.size().max(size));
        self.plain.clone_from(&target);
        self.set_target(target);
        self.endpoint = Some(endpoint);
        Ok(())
    }

    /// Opens a backup chain: as a source, its image at a point (restore); as a target, a sink
    /// that writes the next point (backup).
    #[allow(clippy::too_many_arguments)] // The fields of one message.
    fn open_chain(
        &mut self,
        dir: &[u8],
        role: Role,
        (at_kind, at): (u8, i64),
        comment: &[u8],
        (source, source_size): (&[u8], u64),
        (block, compress): (u32, Option<i32>),
    ) -> Result<()> {
        if self.endpoint.is_some() {
            return Err(Error::protocol("a peer serves one endpoint; Open came twice"));
        }
        let dir = path_of(dir);
        let dir = dir.as_path();
        let (endpoint, created): (Arc<dyn Source>, bool) = match role {
            Role::Source => {
                let chain = crate::backup::load(dir)?;
                let at = match at_kind {
                    0 => crate::backup::At::Latest,
                    1 => crate::backup::At::Number(at.unsigned_abs()),
                    _ => crate::backup::At::Time(at),
                };
                let n = crate::backup::point(&chain, at)?;
                chain.verify(n, false)?;
                (Arc::new(chain.image(n)?), false)
            }
            Role::Target => {
                let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                let source = text(source);
                let header = crate::delta::Header::new([0; 16], block, &source, &text(comment))?;
                let point = Arc::new(Append::open(dir, header, compress, |last| {
                    // 0 skips the same-image check (`--force`).
                    if source_size == 0 {
                        Ok(())
                    } else {
                        crate::backup::same_path_and_size(dir, last, &source, source_size)
                    }
                })?);
                let created = point.is_new();
                self.set_target(Some(Arc::clone(&point) as Arc<dyn Target>));
                (point, created)
            }
        };
        let caps = endpoint.caps();
        self.reply(Msg::Opened {
            exists: true,
            size: endpoint.size(),
            identity_tag: 0,
            id_a: 0,
            id_b: 0,
            created,
            mode: 0,
            caps: caps.to_bits(),
            block_size: caps.block_size,
            path: Vec::new(),
        });
        self.role = role;
        self.endpoint = Some(endpoint);
        Ok(())
    }

    /// A path for a file this session writes: the given one, or a new spool file when empty.
    fn output_path(&mut self, path: &[u8]) -> Result<std::path::PathBuf> {
        if path.is_empty() { self.spool.path() } else { Ok(path_of(path)) }
    }

    /// Starts an upload (`Put`): the following `Write`s go to it, `Flush` commits it.
    fn put(&mut self, path: &[u8], mode: u32) -> Result<()> {
        if self.upload.is_some() || self.target.is_some() {
            return Err(Error::protocol("Put while another file is being written"));
        }
        let spooled = path.is_empty();
        let path = self.output_path(path)?;
        let upload = files::Upload::start(path, mode, spooled)?;
        self.reply(Msg::Path { path: upload.path().as_os_str().as_bytes().to_vec() });
        self.upload = Some(upload);
        Ok(())
    }

    /// Makes the opened target the base of a delta (`Record`): writes become records of a delta
    /// at `path` (or in the spool), and the base itself is never written.
    fn record(&mut self, path: &[u8], comment: &[u8], source: &[u8], block: u32) -> Result<()> {
        let path = self.output_path(path)?;
        let Some(local) = self.plain.take() else {
            return Err(Error::protocol("Record needs a freshly opened target"));
        };
        if !local.exists() {
            return Err(Error::new(ErrorKind::NotFound, format!("{}: no such file or device", local.name().display())));
        }
        crate::delta::check_output(&path, &[local.identity()])?;
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let header = crate::delta::Header::new([0; 16], block, &text(source), &text(comment))?;
        // The base is read through the recorder, which fingerprints it as the scan goes.
        let recorder = Arc::new(Recorder::new(local, path.clone(), header, true));
        self.recorder = Some(Arc::clone(&recorder));
        self.serve_target(recorder);
        self.reply(Msg::Path { path: path.into_os_string().into_vec() });
        Ok(())
    }

    /// Makes the opened target save what it overwrites into an undo log at `path` (or in the
    /// spool) first (`Undo`).
    fn undo(&mut self, path: &[u8], comment: &[u8]) -> Result<()> {
        let path = self.output_path(path)?;
        let Some(local) = self.plain.take() else {
            return Err(Error::protocol("Undo needs a freshly opened target"));
        };
        crate::delta::check_output(&path, &[local.identity()])?;
        let text = String::from_utf8_lossy(comment).into_owned();
        self.serve_target(Arc::new(Undo::new(local, path.clone(), text)));
        self.reply(Msg::Path { path: path.into_os_string().into_vec() });
        Ok(())
    }

    /// Writes a data frame to the target: here, or on the pool when the target's writes cost
    /// CPU (`writers`).
    fn write(&mut self, chunk: crate::protocol::message::Chunk) -> Result<()> {
        let target = Arc::clone(self.target()?);
        let len = if chunk.codec == crate::protocol::message::codec::RAW {
            chunk.payload.len() as u64
        } else {
            u64::from(chunk.raw_len)
        };
        let written = Extent { offset: chunk.offset, len };
        match &self.writers {
            Some(writers) => writers.submit(chunk)?,
            None => target.write_at(&compress::decode(&chunk)?, chunk.offset)?,
        }
        if !self.keep_cache {
            // As in the local engine (`crate::write_behind`): scattered writes stay cached,
            // dense ones leave the cache, which starts their writeback early.
            if let Some(range) = self.write_behind.wrote(written) {
                target.drop_cache(range.offset, range.len);
            }
        }
        Ok(())
    }

    /// Makes what was written durable (a recorder commits), then says `Done`.
    fn flush(&mut self) -> Result<()> {
        self.target()?.flush()?;
        if let Some(range) = self.write_behind.finish().filter(|_| !self.keep_cache) {
            self.target()?.drop_cache(range.offset, range.len);
        }
        self.reply(Msg::Done);
        Ok(())
    }

    fn start_scan(
        &mut self,
        key: [u8; 32],
        block: u32,
        (end, data_len): (u64, u64),
        threads: u16,
        (rate, fingerprint, changes): (u64, bool, bool),
    ) -> Result<()> {
        let block = crate::sync::check_block_size(u64::from(block))?;
        let endpoint = Arc::clone(self.endpoint()?);
        // Only a source's map, and only over all of it (the client asks only when the copy has
        // the source's size).
        let trusted = changes
            && self.role == Role::Source
            && endpoint.caps().changed_blocks
            && end == endpoint.size()
            && data_len >= end;
        let state = Arc::new(ScanState {
            hasher: Hasher::new(key, block),
            chunk: chunk_size(block),
            end,
            data_len: data_len.min(endpoint.size()),
            trees: Mutex::new(HashMap::new()),
            acked: Mutex::new(0),
            cond: Condvar::new(),
            changes: trusted,
            // A scan that skips unchanged blocks does not read the source whole, and one that
            // skips free blocks leaves the target's bytes there as they were.
            fingerprint: fingerprint && !trusted && !self.fs_aware && self.role == Role::Source,
            unused: self.fs_aware && self.role == Role::Source,
        });
        self.scan = Some(Arc::clone(&state));
        let (replies, stop) = (self.replies.clone(), Arc::clone(&self.stop));
        let threads = worker_count(threads);
        let throttle = (rate > 0).then(|| crate::throttle::Throttle::new(rate));
        self.jobs.push(std::thread::spawn(move || {
            if let Err(e) = scan(endpoint.as_ref(), &state, (&replies, &stop), threads, throttle.as_ref()) {
                stop.store(true, Ordering::Relaxed);
                let _ = replies.send(Msg::failure(&e));
            }
        }));
        Ok(())
    }

    fn ack(&mut self, chunks: u64) {
        let Some(scan) = &self.scan else { return };
        let previous = {
            let mut acked = scan.acked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let previous = *acked;
            *acked = (*acked).max(chunks);
            previous
        };
        scan.cond.notify_all();
        scan.trees.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|&c, _| c >= chunks);
        if !(self.keep_cache || self.keep_clean)
            && chunks > previous
            && let Some(endpoint) = &self.endpoint
        {
            let from = previous * scan.chunk as u64;
            endpoint.drop_cache(from, (chunks * scan.chunk as u64).min(scan.end).saturating_sub(from));
        }
    }

    /// The tree of a chunk: from memory, or read and hashed again when it was forgotten.
    fn tree_of(&self, chunk: u64) -> Result<Arc<Tree>> {
        let scan = self.scan.as_ref().ok_or_else(|| Error::protocol("hash request before Scan"))?;
        if chunk >= scan.chunks() {
            return Err(Error::protocol(format!("hash request for chunk {chunk} of {}", scan.chunks())));
        }
        if let Some(tree) = scan.trees.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&chunk) {
            return Ok(Arc::clone(tree));
        }
        let endpoint = self.endpoint()?;
        let mut map = SegmentCursor::new(endpoint.as_ref());
        Ok(Arc::new(scan.tree(endpoint.as_ref(), chunk, &mut Vec::new(), &mut map)?))
    }

    /// Leaf hashes of one group, from a fresh read of its bytes (still in the page cache: pages
    /// are dropped only once the client acknowledges the chunk).
    fn leaves_of(&self, chunk: u64, group: u32) -> Result<(Vec<u8>, Vec<u8>)> {
        let scan = self.scan.as_ref().ok_or_else(|| Error::protocol("hash request before Scan"))?;
        let (start, len) = if chunk < scan.chunks() { scan.range(chunk) } else { (0, 0) };
        let group_size = scan.hasher.group_size();
        let offset = group as usize * group_size;
        if offset >= len {
            return Err(Error::protocol(format!("leaf request for chunk {chunk} group {group}, which does not exist")));
        }
        let mut buf = vec![0u8; (len - offset).min(group_size)];
        let at = start + offset as u64;
        if at < scan.data_len {
            let n = (scan.data_len - at).min(buf.len() as u64) as usize;
            self.endpoint()?.read_at(&mut buf[..n], at)?;
        }
        Ok(scan.hasher.leaves(&buf))
    }

    fn read(&mut self, offset: u64, len: u32, compress: i32) -> Result<()> {
        let endpoint = Arc::clone(self.endpoint()?);
        let mut buf = crate::buffer::Aligned::new(len as usize);
        let size = endpoint.size();
        let mut read = 0;
        if offset < size {
            let n = (size - offset).min(u64::from(len)) as usize;
            endpoint.read_at(&mut buf[..n], offset)?;
            read = n as u64;
        }
        let compressor = self.compressors.entry(compress).or_insert_with(|| Compressor::new(compress));
        let chunk = compressor.encode(offset, &buf);
        self.reply(Msg::Data(chunk));
        self.reply(Msg::ReadDone { offset, len: u64::from(len), read });
        Ok(())
    }

    fn start_copy(&mut self, end: u64, data_len: u64, compress: i32, threads: u16) -> Result<()> {
        let endpoint = Arc::clone(self.endpoint()?);
        let (replies, stop) = (self.replies.clone(), Arc::clone(&self.stop));
        let keep_cache = self.keep_cache;
        let threads = worker_count(threads);
        self.jobs.push(std::thread::spawn(move || {
            let job = CopyJob {
                endpoint: endpoint.as_ref(),
                end,
                data_len: data_len.min(endpoint.size()),
                compress,
                keep_cache,
            };
            if let Err(e) = job.run(&replies, &stop, threads) {
                stop.store(true, Ordering::Relaxed);
                let _ = replies.send(Msg::failure(&e));
            }
        }));
        Ok(())
    }

    /// Runs a local job in a thread: its progress goes to the client as `Progress`/`Warning`,
    /// its result (or error) as the final reply. `Cancel` stops it.
    fn spawn_job(&mut self, job: impl FnOnce(crate::progress::Control<'_>) -> Msg + Send + 'static) {
        let (replies, cancel) = (self.replies.clone(), Arc::clone(&self.cancel));
        self.jobs.push(std::thread::spawn(move || {
            let observer = WireObserver { replies: replies.clone(), state: Mutex::new((0, std::time::Instant::now())) };
            let reply = job(crate::progress::Control { observer: &observer, cancel: &cancel });
            let _ = replies.send(reply);
        }));
    }
}

/// A path received on the wire (any bytes: Unix paths need not be UTF-8).
fn path_of(bytes: &[u8]) -> std::path::PathBuf {
    use std::os::unix::ffi::OsStrExt;
    std::path::PathBuf::from(std::ffi::OsStr::from_bytes(bytes))
}

/// Counters in wire order (docs/PROTOCOL.md, `Progress`).
#[must_use]
pub fn counters_of(s: &crate::progress::Snapshot) -> [u64; 7] {
    [
        s.bytes_total,
        s.bytes_scanned,
        s.bytes_read_source,
        s.bytes_read_destination,
        s.bytes_differing,
        s.bytes_written,
        s.bytes_zeroed,
    ]
}

/// Counters back from wire order.
#[must_use]
pub fn snapshot_of(c: [u64; 7], seconds: f64) -> crate::progress::Snapshot {
    crate::progress::Snapshot {
        bytes_total: c[0],
        bytes_scanned: c[1],
        bytes_read_source: c[2],
        bytes_read_destination: c[3],
        bytes_differing: c[4],
        bytes_written: c[5],
        bytes_zeroed: c[6],
        seconds,
    }
}

/// Sends a local job's progress to the client, at most five times a second.
struct WireObserver {
    replies: Sender<Msg>,
    state: Mutex<(u8, std::time::Instant)>,
}

impl crate::progress::Observer for WireObserver {
    fn phase(&self, phase: crate::progress::Phase, total: u64) {
        let code = match phase {
            crate::progress::Phase::Sync => 0,
            crate::progress::Phase::Compare => 1,
            crate::progress::Phase::Verify => 2,
        };
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).0 = code;
        let _ = self.replies.send(Msg::Progress { phase: code, counters: [total, 0, 0, 0, 0, 0, 0] });
    }

    fn progress(&self, snapshot: &crate::progress::Snapshot) {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.1.elapsed() >= Duration::from_millis(200) {
            state.1 = std::time::Instant::now();
            let _ = self.replies.send(Msg::Progress { phase: state.0, counters: counters_of(snapshot) });
        }
    }

    fn warn(&self, message: &str) {
        let _ = self.replies.send(Msg::Warning { text: message.to_string() });
    }
}

fn worker_count(requested: u16) -> usize {
    if requested == 0 { crate::sync::default_threads() } else { usize::from(requested).min(64) }
}

/// Records the first failure of a job's threads and tells the others to stop.
fn fail(failure: &Mutex<Option<Error>>, stop: &AtomicBool, e: Error) {
    failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(e);
    stop.store(true, Ordering::Relaxed);
}

/// The scan job: hashes every chunk on `threads` workers, streaming summaries.
fn scan(
    endpoint: &dyn Source,
    state: &ScanState,
    (replies, stop): (&Sender<Msg>, &AtomicBool),
    threads: usize,
    throttle: Option<&crate::throttle::Throttle>,
) -> Result<()> {
    let (tx, rx) = bounded::<(u64, Vec<crate::extent::Extent>)>(threads * 2);
    let failure = Mutex::new(None);
    let read = std::sync::atomic::AtomicU64::new(0);
    // The endpoint's fingerprint, as the scan reads it all (docs/PROTOCOL.md, `ScanDone`).
    let blocks = state.fingerprint.then(|| Mutex::new(crate::fingerprint::Blocks::new(state.end)));
    std::thread::scope(|s| {
        for _ in 0..threads {
            let rx = rx.clone();
            let (failure, read, blocks) = (&failure, &read, &blocks);
            s.spawn(move || {
                let mut buf = crate::buffer::Aligned::new(state.chunk);
                for (chunk, data) in rx {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let (start, len) = state.range(chunk);
                    let tree = match fill(endpoint, &mut buf[..len], start, &data) {
                        Ok(n) => {
                            read.fetch_add(n, Ordering::Relaxed);
                            if let Some(blocks) = blocks {
                                crate::fingerprint::Blocks::note(blocks, &buf[..len], start);
                            }
                            state.hasher.tree(&buf[..len], data.is_empty())
                        }
                        Err(e) => {
                            fail(failure, stop, e);
                            break;
                        }
                    };
                    let summary = Msg::Summary { chunk, zero: tree.is_zero(), hash: tree.top };
                    state.trees.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(chunk, Arc::new(tree));
                    if replies.send(summary).is_err() {
                        break;
                    }
                }
            });
        }
        drop(rx);
        let mut map = SegmentCursor::new(endpoint);
        // Chunks told without reading them: holes, and what the changed-block map says is as
        // at its mark (`Clean`). A run of either is one message (a sparse 16 TiB image is mostly
        // holes); a pending run is reported before the scan waits, so the client can
        // acknowledge past it.
        let mut run = Run::default();
        let mut changes = state.changes.then(|| crate::endpoint::ChangeCursor::new(endpoint));
        let mut usage = state.unused.then(|| UsageCursor::new(endpoint));
        let mut unused = Vec::new();
        for chunk in 0..state.chunks() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let mut data = Vec::new();
            let told = state.told(chunk, (changes.as_mut(), usage.as_mut()), &mut map, (&mut data, &mut unused));
            // The free parts of this chunk go before anything else is said of it.
            if unused.iter().any(|u| replies.send(Msg::Unused { start: u.offset, len: u.len }).is_err()) {
                break;
            }
            match told {
                Err(e) => {
                    fail(&failure, stop, e);
                    break;
                }
                Ok(Some(kind)) => {
                    if !run.add(kind, chunk, replies, state) {
                        break;
                    }
                    continue;
                }
                Ok(None) => {}
            }
            if !run.report(replies, state) {
                break;
            }
            // Stay within WINDOW chunks of the client's acknowledgements (holes hold nothing).
            let mut acked = state.acked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            while chunk >= *acked + WINDOW && !stop.load(Ordering::Relaxed) {
                acked = state
                    .cond
                    .wait_timeout(acked, Duration::from_millis(100))
                    .map_or_else(|e| e.into_inner().0, |r| r.0);
            }
            drop(acked);
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if let Some(throttle) = throttle {
                throttle.take(data.iter().map(|e| e.len).sum(), stop);
            }
            if tx.send((chunk, data)).is_err() {
                break;
            }
        }
        if !stop.load(Ordering::Relaxed) {
            run.report(replies, state);
        }
        drop(tx);
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
        return Err(e);
    }
    if !stop.load(Ordering::Relaxed) {
        let blocks = blocks.map(|b| b.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner));
        let fingerprint = fingerprint_of(endpoint, state, blocks)?;
        let _ = replies.send(Msg::ScanDone { chunks: state.chunks(), read: read.into_inner(), fingerprint });
    }
    Ok(())
}

/// The endpoint's fingerprint from what a scan read (`ScanDone.fingerprint`): zeros unless it
/// was asked for and the scan covered exactly all of the endpoint.
fn fingerprint_of(
    endpoint: &dyn Source,
    state: &ScanState,
    blocks: Option<crate::fingerprint::Blocks>,
) -> Result<[u8; 32]> {
    let whole = state.end == endpoint.size() && state.data_len == state.end;
    Ok(match blocks {
        // Every allocated chunk was read; what is left are holes, which `complete` fills in as
        // zeros without reading.
        Some(mut blocks) if whole => {
            blocks.complete(endpoint)?;
            blocks.fingerprint()
        }
        _ => [0; 32],
    })
}

/// The copy job for an empty target: every non-zero run of the source, no hashing.
struct CopyJob<'a> {
    endpoint: &'a dyn Source,
    end: u64,
    data_len: u64,
    compress: i32,
    keep_cache: bool,
}

impl CopyJob<'_> {
    const CHUNK: usize = 1 << 20;

    fn run(&self, replies: &Sender<Msg>, stop: &AtomicBool, threads: usize) -> Result<()> {
        let (tx, rx) = bounded::<(u64, usize, Vec<crate::extent::Extent>)>(threads * 2);
        let failure = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..threads {
                let rx = rx.clone();
                let failure = &failure;
                s.spawn(move || {
                    let mut buf = crate::buffer::Aligned::new(Self::CHUNK);
                    let mut compressor = Compressor::new(self.compress);
                    let mut runs = Runs::new();
                    for (start, len, data) in rx {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let read = match fill(self.endpoint, &mut buf[..len], start, &data) {
                            Ok(read) => read,
                            Err(e) => {
                                fail(failure, stop, e);
                                break;
                            }
                        };
                        runs.clear();
                        if !data.is_empty() {
                            for (i, block) in buf[..len].chunks(COPY_BLOCK).enumerate() {
                                if !is_zero(block) {
                                    runs.push((), (i * COPY_BLOCK) as u64, block.len() as u64);
                                }
                            }
                        }
                        for &((), run) in runs.iter() {
                            let bytes = &buf[run.offset as usize..run.end() as usize];
                            if replies.send(Msg::Data(compressor.encode(start + run.offset, bytes))).is_err() {
                                return;
                            }
                        }
                        if !self.keep_cache {
                            self.endpoint.drop_cache(start, len as u64);
                        }
                        if replies.send(Msg::ReadDone { offset: start, len: len as u64, read }).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(rx);
            let mut map = SegmentCursor::new(self.endpoint);
            let mut start = 0u64;
            // A run of holes not yet reported: `[from, start)`. One `ReadDone` answers it all.
            let mut holes_from = None;
            let report = |from: &mut Option<u64>, to: u64| match from.take() {
                Some(offset) => replies.send(Msg::ReadDone { offset, len: to - offset, read: 0 }).is_ok(),
                None => true,
            };
            while start < self.end && !stop.load(Ordering::Relaxed) {
                let len = (self.end - start).min(Self::CHUNK as u64) as usize;
                let mut data = Vec::new();
                if let Err(e) = map.allocated_in(start, (start + len as u64).min(self.data_len), &mut data) {
                    fail(&failure, stop, e);
                    break;
                }
                if data.is_empty() {
                    holes_from.get_or_insert(start);
                } else if !report(&mut holes_from, start) || tx.send((start, len, data)).is_err() {
                    break;
                }
                start += len as u64;
            }
            if !stop.load(Ordering::Relaxed) {
                report(&mut holes_from, start);
            }
            drop(tx);
        });
        match failure.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// BLAKE3 of this process's executable, to check an uploaded agent.
/// BLAKE3 of our own executable, read in small pieces: the client asks for it on every
/// connection, and reading the file whole would add its size to the agent's memory.
fn exe_hash() -> Vec<u8> {
    let mut hasher = blake3::Hasher::new();
    match std::fs::File::open("/proc/self/exe").and_then(|f| hasher.update_reader(f).map(|_| ())) {
        Ok(()) => hasher.finalize().as_bytes().to_vec(),
        Err(_) => Vec::new(),
    }
}

/// This boot of this machine, to recognise that two endpoints are on the same host.
#[must_use]
pub fn boot_id() -> Vec<u8> {
    std::fs::read("/proc/sys/kernel/random/boot_id").map(|b| b.trim_ascii().to_vec()).unwrap_or_default()
}

/// Maps an `Opened` identity back.
#[must_use]
pub fn opened_identity(tag: u8, a: u64, b: u64) -> Identity {
    match tag {
        1 => Identity::File { dev: a, ino: b },
        2 => Identity::Device { rdev: a },
        _ => Identity::None,
    }
}

/// A peer's error as a library error.
#[must_use]
pub fn remote_error(kind: ErrorKind, message: String) -> Error {
    Error::new(kind, message)
}
