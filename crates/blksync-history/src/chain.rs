//! Backup chains: a base image plus increments, in one directory (docs/DELTA-FORMAT.md,
//! "Backup chains").
//!
//! ```text
//! DEST/base-N-<id>.img     full sparse copy of point N (0 until a prune), changed only by prune
//! DEST/base-N-<id>.delta   its metadata: a delta with no records (id, time, size, comment)
//! DEST/base-N-<id>.sums    its content hashes, one per MiB ([`crate::sums`])
//! DEST/inc-000001.delta    increment 1, parent = the base's id
//! DEST/inc-000002.delta    increment 2, parent = increment 1's id ...
//! ```
//!
//! Only `prune` rewrites a file in place (the base, with a journal: [`crate::prune`]); the
//! directory listing is the only other state. The base is valid once its `.delta` exists
//! (written after the image is complete and flushed). [`Chain::load`] picks the base with the
//! longest unbroken chain.
//!
//! [`Image`] presents "base + the first N increments" as a [`Source`]: newest record wins, each
//! byte is read once, holes and zero records read as holes, and every byte read from the base is
//! checked against its content hashes.
//!
//! A chain can break: an increment deleted, damaged beyond its structure, or one from another
//! chain dropped in. [`Chain::load`] then keeps the points before the break (they stay
//! restorable) and records the break in [`Chain::broken`]: restoring a later point, or extending
//! the chain with `backup`, is refused with the file to blame and how to recover.

pub use blksync_core::chain_files::{base_paths, chain_of, increment_path};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::delta::{Delta, Entry, Kind, to_hex};
use crate::endpoint::local::Local;
use crate::endpoint::{Identity, Segment, Source};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::sums::Sums;

/// One increment of a chain.
#[derive(Debug)]
pub struct Increment {
    /// Its number (from the file name).
    pub seq: u64,
    /// The validated delta.
    pub delta: Delta,
}

/// A loaded chain.
#[derive(Debug)]
pub struct Chain {
    /// The directory.
    pub dir: PathBuf,
    /// Metadata of the base.
    pub base: Delta,
    /// Path of the base image.
    pub base_image: PathBuf,
    /// The point number the base holds.
    pub base_number: u64,
    /// Increments, oldest first, each the parent of the next.
    pub increments: Vec<Increment>,
    /// Why the increments after the last one above are unusable, if they are.
    pub broken: Option<Break>,
    /// A reader's shared lock on the base (see [`crate::prune`]), held as long as the chain.
    pub reading: Option<Arc<std::fs::File>>,
}

/// Takes the chain's lock for a run that changes it (backup, prune): two at once would remove
/// each other's temporary files. The lock goes away with the process, even if it is killed.
pub fn lock(dir: &Path) -> Result<std::fs::File> {
    flock(&dir.join(".lock"), true).map_err(|e| match e.kind() {
        ErrorKind::InUse => {
            Error::new(ErrorKind::InUse, format!("{} is in use by another blksync backup or prune", dir.display()))
        }
        _ => e,
    })
}

/// Takes the lock on the base's content: shared for a reader (restore, list, a backup's scan),
/// exclusive for a prune that changes the base in place. A directory readers cannot write to
/// (a read-only mount) needs no lock: nobody can prune it either.
pub fn lock_base(dir: &Path, exclusive: bool) -> Result<Option<std::fs::File>> {
    match flock(&dir.join(".base-lock"), exclusive) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == ErrorKind::InUse => Err(Error::new(
            ErrorKind::InUse,
            if exclusive {
                format!("{} is being read (a restore or a verification); prune it when that is done", dir.display())
            } else {
                format!("{} is being pruned; try again when the prune is done", dir.display())
            },
        )),
        Err(_) if !exclusive => Ok(None),
        Err(e) => Err(e),
    }
}

fn flock(path: &Path, exclusive: bool) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .on("opening", path)?;
    let how = if exclusive {
        rustix::fs::FlockOperation::NonBlockingLockExclusive
    } else {
        rustix::fs::FlockOperation::NonBlockingLockShared
    };
    match rustix::fs::flock(&file, how) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => {
            Err(Error::new(ErrorKind::InUse, format!("{} is locked", path.display())))
        }
        Err(e) => Err(Error::io("locking", path, None, e.into())),
    }
}

/// Where and why a chain is broken.
#[derive(Debug, Clone)]
pub struct Break {
    /// The first point that cannot be restored.
    pub first_lost: u64,
    /// What is wrong, naming the file.
    pub reason: String,
}

impl Break {
    /// The error for using a point at or after the break.
    #[must_use]
    pub fn error(&self, dir: &Path, last_good: u64) -> Error {
        Error::new(
            ErrorKind::Corrupt,
            format!(
                "the backup chain in {} is broken: {}. Points 0 to {last_good} can still be restored; point {} and later cannot. \
                 To continue backing up, move the increments from point {} on out of the directory (the next backup then follows point {last_good}), \
                 or restore point {last_good} and start a new chain",
                dir.display(),
                self.reason,
                self.first_lost,
                self.first_lost,
            ),
        )
    }
}

/// Follows the increments from the base `base_id` (point `number`) in number order: each must be
/// the next number and name the previous point as its parent. Returns the indices of those that
/// do, and what is wrong with the first that does not.
fn walk(
    dir: &Path,
    (number, base_id): (u64, [u8; 16]),
    increments: &[Increment],
    damaged: &BTreeMap<u64, String>,
) -> (Vec<usize>, Option<Break>) {
    let mut links = Vec::new();
    let (mut id, mut seq) = (base_id, number);
    let lost = |seq: u64| {
        let reason =
            damaged.get(&seq).cloned().unwrap_or_else(|| format!("{} is missing", increment_path(dir, seq).display()));
        Some(Break { first_lost: seq, reason })
    };
    for (i, inc) in increments.iter().enumerate().filter(|(_, i)| i.seq > number) {
        if inc.seq != seq + 1 {
            return (links, lost(seq + 1));
        }
        if inc.delta.header.parent != id {
            let reason = format!(
                "{} does not follow point {seq} (it belongs to another chain, or point {seq} was replaced)",
                inc.delta.path().display()
            );
            return (links, Some(Break { first_lost: inc.seq, reason }));
        }
        links.push(i);
        (id, seq) = (inc.delta.header.id, inc.seq);
    }
    if damaged.range(seq + 1..).next().is_some() {
        return (links, lost(seq + 1));
    }
    (links, None)
}

/// Creates a backup directory (and its parents), readable by its owner only: a chain holds
/// whole disk images.
pub fn create_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).on("creating backup directory", dir)
}

impl Chain {
    /// Loads the chain in `dir`. `Ok(None)` when the directory holds no complete base yet.
    pub fn load(dir: &Path) -> Result<Option<Chain>> {
        let mut bases = Vec::new();
        let mut increments = Vec::new();
        let mut damaged = BTreeMap::new();
        for entry in std::fs::read_dir(dir).on("reading backup directory", dir)? {
            let entry = entry.on("reading backup directory", dir)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((number, hex)) =
                name.strip_prefix("base-").and_then(|n| n.strip_suffix(".delta")).and_then(|n| n.split_once('-'))
            {
                let Ok(number) = number.parse::<u64>() else { continue };
                let meta = Delta::open_index(&entry.path())?;
                if to_hex(&meta.header.id) != hex {
                    return Err(Error::new(
                        ErrorKind::Corrupt,
                        format!("{}: id does not match its name", entry.path().display()),
                    ));
                }
                if base_paths(dir, number, &meta.header.id).0.exists() {
                    bases.push((number, meta));
                }
            } else if let Some(seq) = name.strip_prefix("inc-").and_then(|n| n.strip_suffix(".delta")) {
                let Ok(seq) = seq.parse::<u64>() else { continue };
                match Delta::open_index(&entry.path()) {
                    Ok(delta) => increments.push(Increment { seq, delta }),
                    // Unreadable: a break at this point, not the end of the whole chain.
                    Err(e) if e.kind() == ErrorKind::Corrupt => {
                        damaged.insert(seq, e.to_string());
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        increments.sort_by_key(|i| i.seq);
        // Two files with one id make the links ambiguous (a copied increment, or a crafted one
        // that names itself as its parent): a corrupt chain, never a loop.
        let mut ids = std::collections::HashSet::new();
        for id in bases.iter().map(|(_, b)| b.header.id).chain(increments.iter().map(|i| i.delta.header.id)) {
            if !ids.insert(id) {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!("{}: two files of the backup chain have the id {}", dir.display(), to_hex(&id)),
                ));
            }
        }
        // The base with the longest unbroken chain. During a prune two bases exist: the old one
        // is preferred while its increments are all there, and deleting the folded increments
        // oldest first hands over to the new one.
        let walks: Vec<(Vec<usize>, Option<Break>)> =
            bases.iter().map(|(n, b)| walk(dir, (*n, b.header.id), &increments, &damaged)).collect();
        let best = (0..bases.len()).max_by_key(|&i| (walks[i].0.len(), walks[i].1.is_none(), bases[i].0));
        let Some(best) = best else {
            if let Some(first) = increments.first() {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "{}: the chain's base image or its metadata is missing, but increments such as {} remain; nothing can be restored or added until the base is put back",
                        dir.display(),
                        first.delta.path().display()
                    ),
                ));
            }
            return Ok(None);
        };
        let (links, broken) = walks.into_iter().nth(best).unwrap_or_default();
        let (base_number, base) = bases.swap_remove(best);
        let mut slots: Vec<Option<Increment>> = increments.into_iter().map(Some).collect();
        let chain: Vec<Increment> = links.iter().filter_map(|&i| slots[i].take()).collect();
        let (base_image, _) = base_paths(dir, base_number, &base.header.id);
        Ok(Some(Chain {
            dir: dir.to_path_buf(),
            base,
            base_image,
            base_number,
            increments: chain,
            broken,
            reading: None,
        }))
    }

    /// Checks, before a backup adds a point, that every point is restorable: the chain is whole
    /// and every file matches its whole-file hash. A nightly backup onto a damaged chain must
    /// fail loudly, not stay green while nothing after the damage can be restored. Costs a read
    /// of the increments (not of the base, which the backup reads and checks as it scans).
    pub fn check_extendable(&self) -> Result<()> {
        self.check_whole()?;
        self.verify(self.newest().1, false)
    }

    /// Fails when the chain is broken (for commands that need all of it: `backup`, `prune`).
    pub fn check_whole(&self) -> Result<()> {
        match &self.broken {
            Some(b) => Err(b.error(&self.dir, self.newest().1)),
            None => Ok(()),
        }
    }

    /// The content hashes of the base image (`None` for a base written before they existed).
    pub fn sums(&self) -> Result<Option<Sums>> {
        let path = crate::sums::path_for(&self.base_image);
        if !path.exists() {
            return Ok(None);
        }
        Sums::load(&path, self.base.header.id, self.base.header.size_after).map(Some)
    }

    /// Checks the whole base image against its content hashes (`list --verify`).
    pub fn verify_base(&self) -> Result<()> {
        let Some(sums) = self.sums()? else {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "{} has no content hashes (it was written by an older blksync), so it cannot be verified",
                    self.base_image.display()
                ),
            ));
        };
        let base = self.open_base()?;
        let found = Sums::compute(base.as_ref(), sums.id, crate::workers::default_threads())?;
        if let Some(b) = (0..sums.blocks.len()).find(|&b| sums.blocks[b] != found.blocks[b]) {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "{}: the base image is damaged: the MiB at byte offset {} does not match its content hash",
                    self.base_image.display(),
                    b as u64 * crate::sums::BLOCK
                ),
            ));
        }
        Ok(())
    }

    /// Opens the base image, which must have the size its metadata records: a raw file, or a
    /// compressed image (`backup --compress`), which its header says.
    pub fn open_base(&self) -> Result<Box<dyn Source>> {
        let base = open_base_file(&self.base_image)?;
        if base.size() != self.base.header.size_after {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "{}: the base image is damaged: it is {} bytes long where {} were written",
                    self.base_image.display(),
                    base.size(),
                    self.base.header.size_after
                ),
            ));
        }
        Ok(base)
    }

    /// The id and number of the newest point (0 for the base alone).
    #[must_use]
    pub fn newest(&self) -> ([u8; 16], u64) {
        self.increments.last().map_or((self.base.header.id, self.base_number), |i| (i.delta.header.id, i.seq))
    }

    /// Checks the files that make point `n` (base metadata and increments up to `n`) against
    /// their whole-file hashes, and with `records` also decodes every record. `load` checks only
    /// their structure and records are checked whenever they are read: `restore` calls this to
    /// refuse a damaged point before it writes, `list --verify` to check everything. The files
    /// are checked in parallel.
    pub fn verify(&self, n: u64, records: bool) -> Result<()> {
        let files: Vec<&Delta> = std::iter::once(&self.base)
            .chain(self.increments.iter().filter(|i| i.seq <= n).map(|i| &i.delta))
            .collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let check = || -> Result<()> {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(delta) = files.get(i) else { return Ok(()) };
                if records { delta.verify()? } else { delta.verify_hash()? }
            }
        };
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..crate::workers::default_threads()).map(|_| s.spawn(check)).collect();
            workers.into_iter().try_for_each(|w| w.join().unwrap_or_else(|_| Err(Error::protocol("a check panicked"))))
        })
    }

    /// The image at point `n`: the base plus every increment numbered up to `n`.
    pub fn image(self: &Arc<Self>, n: u64) -> Result<Image> {
        self.image_over(n, self.open_base()?)
    }

    /// What the increments up to `n` hold, without opening the base (a prune rewrites it, and a
    /// compressed base admits one writer only): only [`Image::changed`] and
    /// [`Image::read_changed`] work; a read of the base is an error.
    pub fn changes(self: &Arc<Self>, n: u64) -> Result<Image> {
        let base = Unopened { name: self.base_image.clone(), size: self.base.header.size_after };
        self.image_over(n, Box::new(base))
    }

    fn image_over(self: &Arc<Self>, n: u64, base: Box<dyn Source>) -> Result<Image> {
        if self.broken.is_some() && n > self.newest().1 {
            return Err(self.check_whole().err().unwrap_or_else(|| Error::protocol("broken chain")));
        }
        let sums = self.sums()?;
        let deltas: Vec<usize> = (0..self.increments.len()).filter(|&i| self.increments[i].seq <= n).collect();
        let mut size = self.base.header.size_after;
        let mut pieces: BTreeMap<u64, Piece> = BTreeMap::new();
        for (d, delta) in deltas.iter().map(|&i| &self.increments[i].delta).enumerate() {
            let after = delta.header.size_after;
            if after < size {
                // Shrunk: what lay beyond reads as zeros if the image grows again later.
                cut(&mut pieces, after, size);
                pieces.insert(after, Piece { end: size, source: None });
            }
            size = after;
            for entry in &delta.index {
                let end = entry.offset + u64::from(entry.len);
                cut(&mut pieces, entry.offset, end);
                let source = (entry.kind == Kind::Data).then_some((d, *entry));
                pieces.insert(entry.offset, Piece { end, source });
            }
        }
        cut(&mut pieces, size, u64::MAX);
        let name = self.dir.join(format!("@{n}"));
        let checked = sums.as_ref().map(crate::sums::Checked::new);
        let base_map = std::sync::OnceLock::new();
        Ok(Image { name, base, sums, checked, size, pieces, deltas, chain: Arc::clone(self), base_map })
    }
}

/// The base of [`Chain::changes`]: its size only.
struct Unopened {
    name: PathBuf,
    size: u64,
}

impl Source for Unopened {
    fn name(&self) -> &Path {
        &self.name
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, _buf: &mut [u8], offset: u64) -> Result<()> {
        Err(Error::new(
            ErrorKind::Io,
            format!("{}: the base is not open here (offset {offset}): it is being rewritten", self.name.display()),
        ))
    }
    fn segment_at(&self, offset: u64) -> Result<Segment> {
        Ok(Segment { start: offset, end: self.size.max(offset + 1), allocated: true })
    }
    fn drop_cache(&self, _offset: u64, _len: u64) {}
    fn identity(&self) -> crate::endpoint::Identity {
        crate::endpoint::Identity::None
    }
}

/// What covers `[start, end)` in an image: a record of a delta, or zeros.
#[derive(Debug, Clone, Copy)]
pub struct Piece {
    /// One past its last byte (it starts at its key).
    pub end: u64,
    /// `None` for zeros.
    pub source: Option<(usize, Entry)>,
}

/// Removes `[start, end)` from the pieces, trimming those that overlap it.
pub fn cut(pieces: &mut BTreeMap<u64, Piece>, start: u64, end: u64) {
    if start >= end {
        return;
    }
    if let Some((&s, &p)) = pieces.range(..start).next_back()
        && p.end > start
    {
        pieces.insert(s, Piece { end: start, ..p });
        if p.end > end {
            pieces.insert(end, Piece { end: p.end, ..p });
        }
    }
    let inside: Vec<u64> = pieces.range(start..end).map(|(&s, _)| s).collect();
    for s in inside {
        if let Some(p) = pieces.remove(&s)
            && p.end > end
        {
            pieces.insert(end, p);
        }
    }
}

/// Opens a base image for reading: raw, or compressed (its header says which).
pub fn open_base_file(path: &Path) -> Result<Box<dyn Source>> {
    if blksync_image::is_image(path)? {
        return Ok(Box::new(blksync_image::Image::open(path, false)?));
    }
    Ok(Box::new(Local::open_source(path)?))
}

/// A chain's image at one point, readable as a [`Source`].
pub struct Image {
    name: PathBuf,
    base: Box<dyn Source>,
    /// The base's content hashes, checked on the first read of each block of the base.
    sums: Option<Sums>,
    /// The blocks of the base this image has checked.
    checked: Option<crate::sums::Checked>,
    size: u64,
    pieces: BTreeMap<u64, Piece>,
    /// Indices of the increments applied, into `chain.increments`.
    deltas: Vec<usize>,
    chain: Arc<Chain>,
    /// The base's data and holes, asked of the file once ([`Image::base_segment`]).
    base_map: std::sync::OnceLock<Option<Vec<Segment>>>,
}

/// At most this many segments of a base are remembered; a base more fragmented than that is
/// asked each time.
const BASE_MAP_LIMIT: usize = 1 << 16;

/// The segments of `base`, neighbours of one kind merged; `None` if it cannot tell them or has
/// too many.
fn map_of(base: &dyn Source) -> Option<Vec<Segment>> {
    let mut map: Vec<Segment> = Vec::new();
    let mut pos = 0;
    while pos < base.size() {
        let seg = base.segment_at(pos).ok()?;
        if seg.end <= pos {
            return None;
        }
        let end = seg.end.min(base.size());
        let full = map.len() == BASE_MAP_LIMIT;
        match map.last_mut() {
            Some(last) if last.allocated == seg.allocated => last.end = end,
            _ if full => return None,
            _ => map.push(Segment { start: pos, end, allocated: seg.allocated }),
        }
        pos = end;
    }
    Some(map)
}

impl Image {
    /// The ranges where this point differs from the base (what its increments cover), merged
    /// and ascending.
    #[must_use]
    pub fn changed(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (&start, piece) in &self.pieces {
            match out.last_mut() {
                Some(last) if last.1 == start => last.1 = piece.end,
                _ => out.push((start, piece.end)),
            }
        }
        out
    }

    /// The base's segment at `offset` (below its size). The base does not change while the chain
    /// is held, so its map is asked of the file once: a reader such as `serve` asks for the
    /// segments of every request, and each question was two `lseek`s walking ext4's extent tree
    /// (7 % of the time `serve` took to read a point).
    fn base_segment(&self, offset: u64) -> Result<Segment> {
        let Some(map) = self.base_map.get_or_init(|| map_of(self.base.as_ref())) else {
            return self.base.segment_at(offset);
        };
        let i = map.partition_point(|s| s.end <= offset);
        match map.get(i) {
            Some(s) => Ok(Segment { start: offset, end: s.end, allocated: s.allocated }),
            None => self.base.segment_at(offset),
        }
    }

    /// Reads what the increments say at `[offset, offset + buf.len())`, which must lie in
    /// [`Image::changed`]: the base is not read (a prune is rewriting it).
    pub fn read_changed(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        buf.fill(0);
        let first = self.pieces.range(..=offset).next_back().map_or(offset, |(&s, _)| s);
        for (&start, piece) in self.pieces.range(first..end) {
            let (a, b) = (start.max(offset), piece.end.min(end));
            if a >= b {
                continue;
            }
            if let Some((d, entry)) = piece.source {
                let record = self.chain.increments[self.deltas[d]].delta.read(&entry)?;
                let from = (a - entry.offset) as usize;
                buf[(a - offset) as usize..(b - offset) as usize]
                    .copy_from_slice(&record.data[from..from + (b - a) as usize]);
            }
        }
        Ok(())
    }
}

impl Source for Image {
    fn name(&self) -> &Path {
        &self.name
    }

    /// A point never changes, and as a backup's destination the next point may have any size.
    fn caps(&self) -> crate::endpoint::Caps {
        crate::endpoint::Caps { resizable: true, holes: true, stable: true, ..crate::endpoint::Caps::default() }
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.size {
            return Err(Error::new(ErrorKind::Io, format!("reading {} past its end", self.name.display())));
        }
        let base_end = self.base.size().min(end);
        // The base's read fills its part, and the increments' pieces theirs: only what lies past
        // the base is zeroed up front (a memset of every byte read cost serve 5 % of its time).
        let in_base = base_end.saturating_sub(offset) as usize;
        buf[in_base..].fill(0);
        if offset < base_end {
            let part = &mut buf[..in_base];
            match &self.sums {
                Some(sums) => crate::sums::read_checked(
                    sums,
                    (&self.chain.base_image, self.checked.as_ref()),
                    self.base.as_ref(),
                    part,
                    offset,
                )?,
                None => self.base.read_at(part, offset)?,
            }
        }
        let first = self.pieces.range(..=offset).next_back().map_or(offset, |(&s, _)| s);
        for (&start, piece) in self.pieces.range(first..end) {
            let (a, b) = (start.max(offset), piece.end.min(end));
            if a >= b {
                continue;
            }
            let out = &mut buf[(a - offset) as usize..(b - offset) as usize];
            match piece.source {
                None => out.fill(0),
                Some((d, entry)) => {
                    let record = self.chain.increments[self.deltas[d]].delta.read(&entry)?;
                    let from = (a - entry.offset) as usize;
                    out.copy_from_slice(&record.data[from..from + out.len()]);
                }
            }
        }
        Ok(())
    }

    fn segment_at(&self, offset: u64) -> Result<Segment> {
        if let Some((&start, piece)) = self.pieces.range(..=offset).next_back()
            && start <= offset
            && offset < piece.end
        {
            return Ok(Segment { start: offset, end: piece.end, allocated: piece.source.is_some() });
        }
        let next = self.pieces.range(offset..).next().map_or(self.size, |(&s, _)| s).min(self.size);
        if offset >= self.base.size() {
            return Ok(Segment { start: offset, end: next, allocated: false });
        }
        let base = self.base_segment(offset)?;
        let end = base.end.min(next).max(offset + 1);
        if let (false, Some(sums)) = (base.allocated, &self.sums) {
            // A hole in the base must be zeros in its hashes too. A block that should hold data
            // is reported as allocated, so that it is read, and its check names the damage.
            let block = crate::sums::BLOCK;
            let first_data = (offset / block..end.div_ceil(block))
                .find(|&b| sums.blocks.get(b as usize).copied().flatten().is_some());
            return Ok(match first_data {
                Some(b) if b * block <= offset => {
                    Segment { start: offset, end: ((b + 1) * block).min(end), allocated: true }
                }
                Some(b) => Segment { start: offset, end: b * block, allocated: false },
                None => Segment { start: offset, end, allocated: false },
            });
        }
        Ok(Segment { start: offset, end, allocated: base.allocated })
    }

    fn drop_cache(&self, offset: u64, len: u64) {
        self.base.drop_cache(offset, len);
    }

    fn identity(&self) -> Identity {
        Identity::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(list: &[(u64, u64)]) -> BTreeMap<u64, Piece> {
        list.iter().map(|&(s, e)| (s, Piece { end: e, source: None })).collect()
    }

    fn spans(p: &BTreeMap<u64, Piece>) -> Vec<(u64, u64)> {
        p.iter().map(|(&s, p)| (s, p.end)).collect()
    }

    #[test]
    fn cut_trims_splits_and_removes() {
        let mut p = pieces(&[(0, 10), (20, 30), (40, 50)]);
        cut(&mut p, 5, 45);
        assert_eq!(spans(&p), vec![(0, 5), (45, 50)]);
        let mut p = pieces(&[(0, 100)]);
        cut(&mut p, 10, 20);
        assert_eq!(spans(&p), vec![(0, 10), (20, 100)]);
        let mut p = pieces(&[(10, 20)]);
        cut(&mut p, 0, 10);
        assert_eq!(spans(&p), vec![(10, 20)]);
    }
}
