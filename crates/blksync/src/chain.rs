//! Backup chains: a base image plus increments, in one directory (docs/DELTA-FORMAT.md,
//! "Backup chains").
//!
//! ```text
//! DEST/base-N-<id>.img     full sparse copy of point N (0 until a prune), never modified
//! DEST/base-N-<id>.delta   its metadata: a delta with no records (id, time, size, comment)
//! DEST/inc-000001.delta    increment 1, parent = the base's id
//! DEST/inc-000002.delta    increment 2, parent = increment 1's id ...
//! ```
//!
//! No file is ever rewritten in place; the directory listing is the only state. The base is
//! valid once its `.delta` exists (written after the image is complete and flushed). `prune`
//! writes a new base named after the last increment it folds in, then deletes the folded
//! increments oldest first, then the old base: at every moment one base has an unbroken chain
//! to the newest increment, and [`Chain::load`] picks the base with the longest one.
//!
//! [`Image`] presents "base + the first N increments" as a [`Source`]: newest record wins, each
//! byte is read once, holes and zero records read as holes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::delta::{Delta, Entry, Kind, to_hex};
use crate::endpoint::local::Local;
use crate::endpoint::{Identity, Segment, Source};
use crate::error::{Error, ErrorKind, IoContext, Result};

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
}

/// Paths of the image and metadata of a base holding point `number`.
#[must_use]
pub fn base_paths(dir: &Path, number: u64, id: &[u8; 16]) -> (PathBuf, PathBuf) {
    let stem = format!("base-{number:06}-{}", to_hex(id));
    (dir.join(format!("{stem}.img")), dir.join(format!("{stem}.delta")))
}

/// The directory of the backup chain that `path` (or what it links to) belongs to, if it is a
/// chain's base image, metadata or increment: those files are never written in place, so a
/// `sync`, `apply` or `restore` onto one is refused. Recognised by name, beside a base's metadata.
#[must_use]
pub fn chain_of(path: &Path) -> Option<PathBuf> {
    let path = std::fs::canonicalize(path).ok()?;
    let name = path.file_name()?.to_str()?;
    let numbered = |rest: &str| rest.len() > 6 && rest.as_bytes()[..6].iter().all(u8::is_ascii_digit);
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
    let named = match (name.strip_prefix("base-"), name.strip_prefix("inc-")) {
        (Some(rest), _) => numbered(rest) && (ext == "img" || ext == "delta"),
        (_, Some(rest)) => numbered(rest) && ext == "delta",
        _ => false,
    };
    let dir = path.parent()?;
    let has_base = named
        && std::fs::read_dir(dir).ok()?.flatten().any(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("base-") && n.ends_with(".delta")
        });
    has_base.then(|| dir.to_path_buf())
}

/// Path of increment `seq`.
#[must_use]
pub fn increment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("inc-{seq:06}.delta"))
}

impl Chain {
    /// Loads the chain in `dir`. `Ok(None)` when the directory holds no complete base yet.
    pub fn load(dir: &Path) -> Result<Option<Chain>> {
        let mut bases = Vec::new();
        let mut increments = Vec::new();
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
                let delta = Delta::open_index(&entry.path())?;
                increments.push(Increment { seq, delta });
            }
        }
        increments.sort_by_key(|i| i.seq);
        // For each base, the increments that chain from it; keep the longest chain.
        let mut best: Option<((u64, Delta), Vec<usize>)> = None;
        for (number, base) in bases {
            let mut links = Vec::new();
            let mut id = base.header.id;
            while let Some(i) = increments.iter().position(|inc| inc.delta.header.parent == id) {
                links.push(i);
                id = increments[i].delta.header.id;
            }
            if best.as_ref().is_none_or(|(_, l)| links.len() > l.len()) {
                best = Some(((number, base), links));
            }
        }
        let Some(((base_number, base), links)) = best else { return Ok(None) };
        let newest = increments.iter().map(|i| i.seq).max();
        let mut slots: Vec<Option<Increment>> = increments.into_iter().map(Some).collect();
        let chain: Vec<Increment> = links.iter().filter_map(|&i| slots[i].take()).collect();
        if newest.is_some_and(|n| chain.last().is_none_or(|last| last.seq != n)) {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "{}: increment {} does not chain to the base through the increments before it; the chain is broken",
                    dir.display(),
                    newest.unwrap_or(0)
                ),
            ));
        }
        let (base_image, _) = base_paths(dir, base_number, &base.header.id);
        Ok(Some(Chain { dir: dir.to_path_buf(), base, base_image, base_number, increments: chain }))
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
            let workers: Vec<_> = (0..crate::sync::default_threads()).map(|_| s.spawn(check)).collect();
            workers.into_iter().try_for_each(|w| w.join().unwrap_or_else(|_| Err(Error::protocol("a check panicked"))))
        })
    }

    /// The image at point `n`: the base plus every increment numbered up to `n`.
    pub fn image(self: &Arc<Self>, n: u64) -> Result<Image> {
        let base = Local::open_source(&self.base_image)?;
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
        Ok(Image { name, base, size, pieces, deltas, chain: Arc::clone(self) })
    }
}

/// What covers `[start, end)` in an image: a record of a delta, or zeros.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Piece {
    pub(crate) end: u64,
    /// `None` for zeros.
    pub(crate) source: Option<(usize, Entry)>,
}

/// Removes `[start, end)` from the pieces, trimming those that overlap it.
pub(crate) fn cut(pieces: &mut BTreeMap<u64, Piece>, start: u64, end: u64) {
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

/// A chain's image at one point, readable as a [`Source`].
pub struct Image {
    name: PathBuf,
    base: Local,
    size: u64,
    pieces: BTreeMap<u64, Piece>,
    /// Indices of the increments applied, into `chain.increments`.
    deltas: Vec<usize>,
    chain: Arc<Chain>,
}

impl Source for Image {
    fn name(&self) -> &Path {
        &self.name
    }

    fn kind(&self) -> crate::endpoint::Kind {
        crate::endpoint::Kind::File
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
        buf.fill(0);
        if offset < base_end {
            self.base.read_at(&mut buf[..(base_end - offset) as usize], offset)?;
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
        let base = self.base.segment_at(offset)?;
        Ok(Segment { start: offset, end: base.end.min(next).max(offset + 1), allocated: base.allocated })
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
