//! Which blocks of a filesystem are used (docs/FILESYSTEMS.md is the specification).
//!
//! Why: a copy of a disk needs only the blocks its filesystem uses; free space holds nothing
//! anyone will read. [`probe`] looks at a byte range of a [`Source`] (a device, an image, or a
//! partition at an offset inside a disk) and answers [`Usage::Known`] with a [`Map`] of used
//! and free runs, or [`Usage::Whole`] with the reason to copy everything: an unknown
//! filesystem, a damaged one, a feature whose allocation rules this reader does not know.
//! `Whole` is never wrong, so every doubt ends there; only an I/O error is an `Err`.
//!
//! Recognised: ext2, ext3 and ext4 (block bitmaps, with `BLOCK_UNINIT` groups, `flex_bg`, `meta_bg`,
//! `sparse_super` and `sparse_super2`, 64bit, descriptor and bitmap checksums) and Linux swap
//! (only its header page is used). An ext3 or ext4 whose journal needs recovery (a snapshot of a
//! mounted one) is read as replay would leave it: its superblock, descriptors and bitmaps
//! through the journal's committed copies, without writing anything.
//!
//! Memory stays bounded at any size: the group descriptors are read once (16 bytes kept per
//! group, at most 2^20 groups), and each group's bitmap is read when [`Map::state_at`] first
//! needs it and kept in a cache of a few groups. A `Map` is `Send + Sync`; the engine's workers
//! may ask it from several threads.
//!
//! ```no_run
//! use blksync_core::endpoint::Source;
//! use blksync_fs::{Usage, probe};
//! # fn copy(source: &dyn Source) -> blksync_core::Result<()> {
//! let len = source.size();
//! match probe(source, 0, len)? {
//!     Usage::Known(map) => {
//!         let mut offset = 0;
//!         while offset < len {
//!             let (end, used) = map.state_at(source, offset)?;
//!             if used { /* copy [offset, end) */ }
//!             offset = end;
//!         }
//!     }
//!     Usage::Whole { reason } => eprintln!("copying all of it: {reason}"),
//! }
//! # Ok(()) }
//! ```
//!
//! [`Source`]: blksync_core::endpoint::Source

mod crc;
mod ext;
mod swap;

use blksync_core::endpoint::Source;
use blksync_core::endpoint::memory::Memory;
use blksync_core::{Error, Result};

/// What was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// An ext2, ext3 or ext4 filesystem.
    Ext {
        /// 2, 3 or 4, decided by its features as blkid does.
        version: u8,
        /// Bytes per block.
        block_size: u32,
        /// The filesystem UUID, `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
        uuid: String,
        /// The volume label, empty when there is none.
        label: String,
    },
    /// A Linux swap area (version 1).
    Swap {
        /// The UUID, `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
        uuid: String,
        /// The label, empty when there is none.
        label: String,
    },
}

/// The answer of [`probe`].
#[derive(Debug)]
pub enum Usage {
    /// A recognised filesystem whose allocation can be trusted.
    Known(Map),
    /// Copy everything.
    Whole {
        /// Why, for a message: "no filesystem recognised", "ext filesystem: ...".
        reason: String,
    },
}

/// Which parts of a recognised filesystem are used.
#[derive(Debug)]
pub struct Map {
    kind: Kind,
    start: u64,
    len: u64,
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Ext(Box<ext::Ext>),
    /// The first `n` bytes are used, the rest is free.
    Prefix(u64),
}

/// A decision with a reason to copy everything instead.
pub(crate) type Verdict<T> = std::result::Result<T, String>;

/// Reads of `[start, start + len)` of a source, at offsets relative to `start`.
pub(crate) struct Reader<'a> {
    source: &'a dyn Source,
    start: u64,
    len: u64,
}

impl Reader<'_> {
    /// Fills `buf` from `offset`; the caller has checked that it lies within `len`.
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.source.read_at(buf, self.start + offset)
    }
}

/// Looks at `[start, start + len)` of `source` for a filesystem.
///
/// Errors only when reading fails, or when the range is not inside the source; anything
/// unrecognised or suspicious is [`Usage::Whole`].
pub fn probe(source: &dyn Source, start: u64, len: u64) -> Result<Usage> {
    if start.checked_add(len).is_none_or(|end| end > source.size()) {
        return Err(Error::usage(format!(
            "{}: bytes {start} to {start}+{len} are not inside its {} bytes",
            source.name().display(),
            source.size()
        )));
    }
    let reader = Reader { source, start, len };
    let whole = |what: &str, reason: String| Ok(Usage::Whole { reason: format!("{what}: {reason}") });
    match ext::probe(&reader)? {
        Some(Ok((kind, ext))) => return Ok(Usage::Known(Map { kind, start, len, inner: Inner::Ext(Box::new(ext)) })),
        Some(Err(reason)) => return whole("ext filesystem", reason),
        None => {}
    }
    match swap::probe(&reader)? {
        Some(Ok((kind, page))) => Ok(Usage::Known(Map { kind, start, len, inner: Inner::Prefix(page) })),
        Some(Err(reason)) => whole("swap", reason),
        None => Ok(Usage::Whole { reason: "no filesystem recognised".into() }),
    }
}

impl Map {
    /// What was found.
    #[must_use]
    pub fn kind(&self) -> &Kind {
        &self.kind
    }

    /// Where the filesystem starts in the source.
    #[must_use]
    pub fn start(&self) -> u64 {
        self.start
    }

    /// The length of the range probed.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the range probed is empty (it never is: a filesystem needs bytes).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes in use, for a summary: for ext, from the group descriptors' free counts (no
    /// bitmap is read), so it can differ from the bitmaps on a filesystem e2fsck would fix.
    #[must_use]
    pub fn used_bytes(&self) -> u64 {
        match &self.inner {
            Inner::Ext(ext) => ext.used_bytes(),
            Inner::Prefix(n) => *n,
        }
    }

    /// For an ext3 or ext4 whose journal needs recovery: how many blocks replaying it would
    /// write home (its committed copies), through which this map was read. 0 otherwise.
    #[must_use]
    pub fn replayed_blocks(&self) -> u64 {
        match &self.inner {
            Inner::Ext(ext) => ext.replayed_blocks(),
            Inner::Prefix(_) => 0,
        }
    }

    /// The run at `offset` (relative to the filesystem's start, below [`len`](Map::len)):
    /// `(end, used)`, `end` relative too and greater than `offset`. Runs of one state are merged
    /// as far as is known without reading more, so the next run may have the same state.
    /// `source` is the one given to [`probe`]; a group's bitmap is read on first use.
    pub fn state_at(&self, source: &dyn Source, offset: u64) -> Result<(u64, bool)> {
        if offset >= self.len {
            return Err(Error::usage(format!(
                "{}: offset {offset} is past the filesystem's {} bytes",
                source.name().display(),
                self.len
            )));
        }
        let reader = Reader { source, start: self.start, len: self.len };
        match &self.inner {
            Inner::Ext(ext) => ext.state_at(&reader, offset),
            Inner::Prefix(n) if offset < *n => Ok((*n, true)),
            Inner::Prefix(_) => Ok((self.len, false)),
        }
    }
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` of 16 bytes.
fn uuid(b: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        let _ = write!(s, "{byte:02x}");
    }
    s
}

/// A label field: up to the first NUL, invalid UTF-8 replaced.
fn label(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Recomputes the checksums of an ext superblock and of its group descriptors in the normal
/// layout, so that a mutated image gets past them to the checks behind. For the fuzz target
/// and the tests.
#[doc(hidden)]
pub fn fix_checksums(data: &mut [u8]) {
    ext::fix_checksums(data);
}

/// Probes `data` as a whole filesystem, as it is and with its checksums fixed up, and walks its
/// map (at most a few thousand runs),
/// checking that every run moves forward and stays in range: any input must give an answer,
/// never a panic or an allocation beyond the limits of the spec. For the fuzz target and the
/// random-input tests.
#[doc(hidden)]
pub fn exercise(data: &[u8]) {
    let mut fixed = data.to_vec();
    fix_checksums(&mut fixed);
    walk(data.to_vec());
    if fixed != data {
        walk(fixed);
    }
}

fn walk(data: Vec<u8>) {
    let len = data.len() as u64;
    let source = Memory::with_bytes("fuzz.img", data);
    let Ok(Usage::Known(map)) = probe(&source, 0, len) else { return };
    let _ = map.used_bytes();
    let mut offset = 0;
    for _ in 0..4096 {
        if offset >= len {
            break;
        }
        let Ok((end, _)) = map.state_at(&source, offset) else { return };
        assert!(end > offset && end <= len, "run [{offset}, {end}) of {len} bytes");
        offset = end;
    }
}
