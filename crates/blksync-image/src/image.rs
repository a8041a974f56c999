//! An open compressed image: a [`Source`] and a [`Target`] over one file
//! (docs/COMPRESSED-IMAGE.md).
//!
//! Locks, always taken in this order, never the other: `cache` (which chunks are in memory or
//! busy), then `commit` (one commit at a time), then `state` (the index, the free space and the
//! committed header). Compression, decompression and payload I/O run under none of them; a chunk
//! being worked on is marked busy in the cache instead, which is what keeps its entry and its
//! payload's space from changing under the thread that reads it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use blksync_core::endpoint::{Caps, Identity, Segment, Source, Target};
use blksync_core::error::IoContext;
use blksync_core::{Error, ErrorKind, Result};
use xxhash_rust::xxh3::Xxh3;

use blksync_core::buffer::Aligned;

use crate::cache::{Blocks, Cache, Held, Slot};
use crate::chunk;
use crate::file::ImageFile;
use crate::header::{self, DATA_START, Header, Invalid, PATCH_LEN, SLOT, UNIT, max_record_blocks, round_up};
use crate::index::{self, BLOCK, Entry, Kind, Patch, Patches, record_len};
use crate::space::Space;

/// Most patched chunks a writer makes (docs/COMPRESSED-IMAGE.md, "Limits"): past it, a chunk that
/// has no patch is rewritten whole instead of getting one, which bounds the patch map's memory.
pub const MAX_PATCHES: usize = 1 << 18;

/// The choices recorded in a new image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Bytes per chunk: a power of two, 4 KiB ..= 16 MiB. Smaller chunks make small changes
    /// cheaper to rewrite; larger ones compress better. Default 1 MiB.
    pub chunk_size: u32,
    /// zstd level: 1 ..= 19, or -7 ..= -1 for the fast levels. Default 3.
    pub level: i32,
    /// Permission bits of the new file. Default `0o600`: an image holds a whole disk.
    pub mode: u32,
}

impl Default for Options {
    fn default() -> Options {
        Options { chunk_size: 1 << 20, level: 3, mode: 0o600 }
    }
}

/// How an open image behaves; nothing of it is recorded in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Commit after this many bytes of payloads were written since the last commit (at least
    /// 8 × the index's size, so that index writes stay a small part of the data). Default 256 MiB.
    pub commit_every: u64,
    /// Memory for decompressed chunks (dirty and recently read), never fewer than two chunks.
    /// Default 8 MiB: the engine has two chunks per worker in flight, an NBD client reading
    /// sequentially one.
    pub cache_bytes: u64,
    /// Most blocks a patch record holds; past it a chunk is rewritten whole. `Some(0)` turns
    /// patches off; it is capped at half a chunk's blocks (the format's limit). Default `None`:
    /// an eighth of the chunk (32 blocks of 1 MiB), no patches below 64 KiB chunks.
    pub patch_blocks: Option<u32>,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning { commit_every: 256 << 20, cache_bytes: 8 << 20, patch_blocks: None }
    }
}

/// Counters of an open image, for reports and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Commits made since it was opened.
    pub commits: u64,
    /// Chunks stored: as a new payload (zero chunks included, which write nothing) or as a
    /// patch record.
    pub chunks_stored: u64,
    /// Of those, the patch records written.
    pub patches_stored: u64,
    /// Payload and record bytes written.
    pub bytes_stored: u64,
    /// Chunks read from the file (decompressed) and checked.
    pub chunks_loaded: u64,
    /// Patch records read and checked (with their chunk, or to merge them into a new record).
    pub patches_loaded: u64,
}

/// Where an open image's file space goes, for reports and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Logical size.
    pub size: u64,
    /// Space the current payloads and patch records take (each rounded up to 4 KiB).
    pub live: u64,
    /// Payload and record bytes of the current chunks, unrounded.
    pub stored: u64,
    /// Chunks with a patch record.
    pub patched_chunks: u64,
    /// Record bytes, unrounded (a part of `stored`).
    pub patch_bytes: u64,
    /// Chunks stored as zstd frames.
    pub zstd_chunks: u64,
    /// Chunks stored raw.
    pub raw_chunks: u64,
    /// Chunks that are holes: a zero base without a patch (a zero base with one is counted in
    /// none of the three kinds, only in `patched_chunks`).
    pub zero_chunks: u64,
    /// Space of the committed index and patch table (each rounded up to 4 KiB).
    pub index: u64,
}

/// The index, the free space and the committed header.
#[derive(Debug)]
struct State {
    entries: Vec<Entry>,
    patches: Patches,
    size: u64,
    space: Space,
    /// Payloads and records the committed index and table reference but the current ones do
    /// not: free after the next commit.
    pending: Vec<(u64, u64)>,
    /// The last committed header and its slot.
    header: Header,
    slot: usize,
    /// Payload bytes written since the last commit.
    since_commit: u64,
    /// Anything (an entry, the size) differs from the committed header and index.
    changed: bool,
}

/// What `open` found in a file: the chosen header and its slot, the index and the free space.
#[derive(Debug)]
pub struct Loaded {
    /// The header of the last commit.
    pub header: Header,
    /// Which slot it is in.
    pub slot: usize,
    /// One entry per chunk.
    pub entries: Vec<Entry>,
    /// The patch table.
    pub patches: Patches,
    /// What the index and the table do not reference, ascending.
    pub free: Vec<(u64, u64)>,
}

/// Reads and checks an image's header slots and index through `read`, for a file of
/// `file_len` bytes at `path` (docs/COMPRESSED-IMAGE.md, "Validation on open").
pub fn load(read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>, file_len: u64, path: &Path) -> Result<Loaded> {
    let name = path.display();
    if file_len < DATA_START {
        let mut head = [0u8; 8];
        let n = (file_len as usize).min(8);
        read(&mut head[..n], 0)?;
        return Err(if header::MAGIC.starts_with(&head[..n]) {
            Error::new(
                ErrorKind::Corrupt,
                format!("{name}: truncated: {file_len} bytes, while a compressed image has at least {DATA_START}"),
            )
        } else {
            not_image(path)
        });
    }
    let mut slots = [0u8; 2 * header::LEN];
    read(&mut slots[..header::LEN], 0)?;
    read(&mut slots[header::LEN..], SLOT)?;
    let decoded = [Header::decode(&slots[..header::LEN]), Header::decode(&slots[header::LEN..])];
    let (slot, header) = header::choose(decoded).map_err(|why| match why {
        Invalid::Magic => not_image(path),
        Invalid::Version(_) | Invalid::Flags(_) => {
            Error::new(ErrorKind::Unsupported, format!("{name}: compressed image of {why}"))
        }
        _ => Error::new(ErrorKind::Corrupt, format!("{name}: no valid header in either slot (slot 0: {why})")),
    })?;
    let entries = index::load(read, &header, file_len, path)?;
    let patches = index::load_patches(read, &header, file_len, path)?;
    let free = index::free_space(&entries, &patches, &header, file_len, path)?;
    Ok(Loaded { header, slot, entries, patches, free })
}

/// Reads chunk `i`, stored as `entry`, through `read` into `dst` (one chunk) and checks its
/// content: any damage is an error naming the chunk's logical offset and its file offset.
pub fn read_chunk(
    read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    i: u64,
    entry: &Entry,
    dst: &mut [u8],
    path: &Path,
) -> Result<()> {
    let logical = i * dst.len() as u64;
    let damaged = |what: &str| {
        Error::new(
            ErrorKind::Corrupt,
            format!(
                "{}: damaged chunk at byte offset {logical} (stored at file offset {}): {what}",
                path.display(),
                entry.offset
            ),
        )
    };
    let past_end = |e: Error| {
        if e.kind() == ErrorKind::Corrupt { damaged("its payload ends past the end of the file") } else { e }
    };
    match entry.kind {
        Kind::Zero => {
            dst.fill(0);
            return Ok(());
        }
        Kind::Raw => read(dst, entry.offset).map_err(past_end)?,
        Kind::Zstd => chunk::with_scratch(entry.stored as usize, |payload| {
            read(payload, entry.offset).map_err(past_end)?;
            chunk::decompress(payload, dst).map_err(|what| damaged(&what))
        })?,
    }
    if chunk::checksum(dst, i) != entry.checksum {
        return Err(damaged("checksum mismatch"));
    }
    Ok(())
}

/// Reads chunk `i`'s patch record, stored as `patch`, through `read` and checks it (checksum,
/// frame, block numbers); then calls `each` with every block number and its 4096 bytes,
/// ascending. Any damage is an error naming the chunk's logical offset and the record's file
/// offset.
pub fn read_record(
    read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    i: u64,
    patch: &Patch,
    chunk_size: u32,
    path: &Path,
    each: &mut dyn FnMut(usize, &[u8]),
) -> Result<()> {
    let logical = i * u64::from(chunk_size);
    let damaged = |what: &str| {
        Error::new(
            ErrorKind::Corrupt,
            format!(
                "{}: damaged patch record of the chunk at byte offset {logical} (stored at file offset {}): {what}",
                path.display(),
                patch.offset
            ),
        )
    };
    let past_end =
        |e: Error| if e.kind() == ErrorKind::Corrupt { damaged("it ends past the end of the file") } else { e };
    let n = usize::from(patch.blocks);
    if n == 0 || n > max_record_blocks(chunk_size) as usize {
        return Err(damaged(&format!("{n} blocks")));
    }
    chunk::with_record(record_len(u32::from(patch.blocks)) as usize, |content| {
        match patch.kind {
            Kind::Raw => read(content, patch.offset).map_err(past_end)?,
            Kind::Zstd => chunk::with_scratch(patch.stored as usize, |payload| {
                read(payload, patch.offset).map_err(past_end)?;
                chunk::decompress(payload, content).map_err(|what| damaged(&what))
            })?,
            Kind::Zero => return Err(damaged("a record of kind zero")),
        }
        if chunk::record_checksum(content, i) != patch.checksum {
            return Err(damaged("checksum mismatch"));
        }
        let (numbers, data) = content.split_at(2 * n);
        let per_chunk = (u64::from(chunk_size) / BLOCK) as usize;
        let mut next = 0;
        for (k, pair) in numbers.chunks_exact(2).enumerate() {
            let b = usize::from(u16::from_le_bytes([pair[0], pair[1]]));
            if b < next || b >= per_chunk {
                return Err(damaged(&format!("block number {b} out of order or past the chunk's {per_chunk}")));
            }
            next = b + 1;
            each(b, &data[k * BLOCK as usize..(k + 1) * BLOCK as usize]);
        }
        Ok(())
    })
}

/// Reads chunk `i`'s content into `dst` (one chunk): its base, stored as `entry`, with the
/// blocks of its patch record over it, each checked.
pub fn read_content(
    read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    i: u64,
    entry: &Entry,
    patch: Option<&Patch>,
    dst: &mut [u8],
    path: &Path,
) -> Result<()> {
    read_chunk(read, i, entry, dst, path)?;
    if let Some(patch) = patch {
        let chunk_size = dst.len() as u32;
        read_record(read, i, patch, chunk_size, path, &mut |b, data| {
            dst[b * BLOCK as usize..(b + 1) * BLOCK as usize].copy_from_slice(data);
        })?;
    }
    Ok(())
}

/// A chunk as the file stores it now: its base and its patch.
#[derive(Debug, Clone, Copy)]
struct Stored {
    entry: Entry,
    patch: Option<Patch>,
}

impl Stored {
    /// Reads as zeros without a read: a zero base and no patch.
    fn is_hole(&self) -> bool {
        self.entry.kind == Kind::Zero && self.patch.is_none()
    }
}

/// What a store changes in the index and the patch table.
#[derive(Debug, Clone, Copy)]
enum Change {
    /// A new base; the patch goes.
    Base(Entry),
    /// A new patch on the same base.
    Patch(Patch),
}

/// Copies `held`'s dirty blocks over `dst`, a whole chunk.
fn overlay(dst: &mut [u8], held: &Held) {
    for b in held.dirty.iter() {
        let range = b * BLOCK as usize..(b + 1) * BLOCK as usize;
        dst[range.clone()].copy_from_slice(&held.buf[range]);
    }
}

fn not_image(path: &Path) -> Error {
    Error::new(ErrorKind::Corrupt, format!("{}: not a blksync compressed image (bad magic)", path.display()))
}

/// A compressed image, open for reading or for reading and writing (see the crate docs).
pub struct Image {
    file: ImageFile,
    identity: Identity,
    writable: bool,
    created: bool,
    chunk_size: u32,
    level: i32,
    tuning: Tuning,
    size: AtomicU64,
    cache: Mutex<Cache>,
    /// Signalled whenever a busy chunk becomes ready or is dropped.
    ready: Condvar,
    commit: Mutex<()>,
    state: Mutex<State>,
    /// Why the image refuses writes: a commit or a sync failed.
    failed: Mutex<Option<String>>,
    commits: AtomicU64,
    chunks_stored: AtomicU64,
    patches_stored: AtomicU64,
    bytes_stored: AtomicU64,
    chunks_loaded: AtomicU64,
    patches_loaded: AtomicU64,
}

impl std::fmt::Debug for Image {
    /// The path and the shape, not the index (a million entries for a terabyte).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("path", &self.file.path())
            .field("size", &self.size())
            .field("chunk_size", &self.chunk_size)
            .field("level", &self.level)
            .field("writable", &self.writable)
            .finish_non_exhaustive()
    }
}

/// A piece of an operation that falls in one chunk.
struct Piece {
    chunk: u64,
    /// Offset in the chunk.
    at: usize,
    len: usize,
    /// Offset in the caller's buffer.
    pos: usize,
}

impl Image {
    /// Creates a new image of `size` logical bytes (all holes) at `path`, which must not exist.
    pub fn create(path: &Path, size: u64, options: Options) -> Result<Image> {
        let name = path.display();
        if !header::chunk_size_ok(options.chunk_size) {
            return Err(Error::usage(format!(
                "compressed image chunk size {} is not a power of two between 4 KiB and 16 MiB",
                options.chunk_size
            )));
        }
        if !header::level_ok(options.level) {
            return Err(Error::usage(format!("zstd level {} is not one of 1 ..= 19 or -7 ..= -1", options.level)));
        }
        let count = header::chunks_for(size, options.chunk_size);
        if size > header::MAX_SIZE || count > header::MAX_COUNT {
            return Err(Error::usage(format!("{name}: {size} bytes is too large for a compressed image")));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(options.mode)
            .open(path)
            .on("creating", path)?;
        let made = (|| {
            lock(&file, true, path)?;
            // A new index is all zero entries, and so all zero bytes: extending the file writes
            // it (as a hole).
            let index_len = count * header::ENTRY_LEN;
            let mut hasher = Xxh3::new();
            let zeros = vec![0u8; index_len.min(1 << 20) as usize];
            let mut left = index_len;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                hasher.update(&zeros[..n]);
                left -= n as u64;
            }
            let index_offset = if count == 0 { 0 } else { DATA_START };
            file.set_len(DATA_START + round_up(index_len)).on("sizing", path)?;
            let header = Header {
                chunk_size: options.chunk_size,
                level: options.level,
                generation: 1,
                size,
                index_offset,
                count,
                index_hash: hasher.digest(),
                patch_offset: 0,
                patch_count: 0,
                patch_hash: 0,
            };
            let image = ImageFile::new(path, file);
            image.write_at(&header.encode(), 0)?;
            image.sync()?;
            if let Some(dir) = path.parent() {
                let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
                // The new name durable too; a directory that cannot be synced is no reason to fail.
                let _ = File::open(dir).and_then(|d| d.sync_all());
            }
            let file_len = image.file().metadata().on("inspecting", path)?.len();
            let mut read = |buf: &mut [u8], at: u64| image.read_at(buf, at);
            let loaded = load(&mut read, file_len, path)?;
            Image::from_parts(image, loaded, true, true)
        })();
        if made.is_err() {
            let _ = std::fs::remove_file(path);
        }
        made
    }

    /// Opens the image at `path`, for writing too when `writable`. A writer takes an exclusive
    /// lock on the file and a reader a shared one: either fails at once (`InUse`) while the
    /// other kind is held.
    pub fn open(path: &Path, writable: bool) -> Result<Image> {
        let file = OpenOptions::new().read(true).write(writable).open(path).on("opening", path)?;
        let meta = file.metadata().on("inspecting", path)?;
        if !meta.is_file() {
            return Err(Error::usage(format!("{}: a compressed image must be a regular file", path.display())));
        }
        lock(&file, writable, path)?;
        let image = ImageFile::new(path, file);
        let mut read = |buf: &mut [u8], at: u64| image.read_at(buf, at);
        let loaded = load(&mut read, meta.len(), path)?;
        if writable {
            // What a killed run wrote and never committed is still allocated: punch it out,
            // when the allocated size says there is something to punch.
            let used: u64 = loaded.entries.iter().filter_map(Entry::extent).map(|(s, e)| e - s).sum::<u64>()
                + loaded.patches.values().map(|p| p.extent().1 - p.extent().0).sum::<u64>()
                + round_up(loaded.header.index_len())
                + round_up(loaded.header.patch_len())
                + DATA_START;
            if meta.blocks() * 512 > used + (1 << 20) {
                for &(start, end) in &loaded.free {
                    image.punch(start, end - start)?;
                }
            }
        }
        Image::from_parts(image, loaded, writable, false)
    }

    fn from_parts(file: ImageFile, loaded: Loaded, writable: bool, created: bool) -> Result<Image> {
        let meta = file.file().metadata().on("inspecting", file.path())?;
        let header = loaded.header;
        let chunk = u64::from(header.chunk_size);
        let capacity = (Tuning::default().cache_bytes / chunk) as usize;
        Ok(Image {
            identity: Identity::File { dev: meta.dev(), ino: meta.ino() },
            writable,
            created,
            chunk_size: header.chunk_size,
            level: header.level,
            tuning: Tuning::default(),
            size: AtomicU64::new(header.size),
            cache: Mutex::new(Cache::new(capacity, header.chunk_size as usize)),
            ready: Condvar::new(),
            commit: Mutex::new(()),
            state: Mutex::new(State {
                entries: loaded.entries,
                patches: loaded.patches,
                size: header.size,
                space: Space::new(&loaded.free, meta.len()),
                pending: Vec::new(),
                header,
                slot: loaded.slot,
                since_commit: 0,
                changed: false,
            }),
            failed: Mutex::new(None),
            file,
            commits: AtomicU64::new(0),
            chunks_stored: AtomicU64::new(0),
            patches_stored: AtomicU64::new(0),
            bytes_stored: AtomicU64::new(0),
            chunks_loaded: AtomicU64::new(0),
            patches_loaded: AtomicU64::new(0),
        })
    }

    /// The same image with other tuning (cache size, commit interval).
    #[must_use]
    pub fn tuned(mut self, tuning: Tuning) -> Image {
        let chunk = u64::from(self.chunk_size);
        self.tuning = tuning;
        self.cache
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .set_capacity((tuning.cache_bytes / chunk) as usize);
        self
    }

    /// Bytes per chunk.
    #[must_use]
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The zstd level new chunks are written with.
    #[must_use]
    pub fn level(&self) -> i32 {
        self.level
    }

    /// The generation of the last commit (1 for a new image).
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.state().header.generation
    }

    /// Counters since it was opened.
    #[must_use]
    pub fn stats(&self) -> Stats {
        Stats {
            commits: self.commits.load(Ordering::Relaxed),
            chunks_stored: self.chunks_stored.load(Ordering::Relaxed),
            patches_stored: self.patches_stored.load(Ordering::Relaxed),
            bytes_stored: self.bytes_stored.load(Ordering::Relaxed),
            chunks_loaded: self.chunks_loaded.load(Ordering::Relaxed),
            patches_loaded: self.patches_loaded.load(Ordering::Relaxed),
        }
    }

    /// Where the file's space goes now (chunks still in the cache not counted).
    #[must_use]
    pub fn usage(&self) -> Usage {
        let st = self.state();
        let mut usage = Usage {
            size: st.size,
            index: round_up(st.header.index_len()) + round_up(st.header.patch_len()),
            ..Usage::default()
        };
        for p in st.patches.values() {
            usage.patched_chunks += 1;
            usage.patch_bytes += u64::from(p.stored);
            usage.stored += u64::from(p.stored);
            usage.live += p.extent().1 - p.extent().0;
        }
        for (i, e) in st.entries.iter().enumerate() {
            match e.kind {
                Kind::Zero if st.patches.contains_key(&(i as u64)) => {}
                Kind::Zero => usage.zero_chunks += 1,
                Kind::Raw => usage.raw_chunks += 1,
                Kind::Zstd => usage.zstd_chunks += 1,
            }
            if let Some((start, end)) = e.extent() {
                usage.live += end - start;
                usage.stored += u64::from(e.stored);
            }
        }
        usage
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, cache: MutexGuard<'a, Cache>) -> MutexGuard<'a, Cache> {
        self.ready.wait(cache).unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    pub(crate) fn faults(&self) -> &crate::file::faults::Faults {
        &self.file.faults
    }

    /// Fails unless the image may be written: opened writable, and no commit failed.
    fn check_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::usage(format!("{} is open read-only", self.file.path().display())));
        }
        if let Some(why) = self.failed.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "{}: refusing to write after an earlier failure ({why}); the file holds its last commit, reopen it",
                    self.file.path().display()
                ),
            ));
        }
        Ok(())
    }

    /// Remembers that a write the commit needs failed: later writes are refused.
    fn fail(&self, e: &Error) {
        self.failed.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert_with(|| e.to_string());
    }

    /// The pieces of `[offset, offset + len)`, one per chunk, after checking the range.
    fn pieces(&self, offset: u64, len: usize, op: &str) -> Result<impl Iterator<Item = Piece> + use<>> {
        let size = self.size();
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "{op} {} at byte offset {offset}: {len} bytes past the end of the image ({size} bytes)",
                    self.file.path().display()
                ),
            ));
        }
        let chunk = u64::from(self.chunk_size);
        let mut pos = 0usize;
        Ok(std::iter::from_fn(move || {
            (pos < len).then(|| {
                let at_abs = offset + pos as u64;
                let at = (at_abs % chunk) as usize;
                let n = (chunk as usize - at).min(len - pos);
                let piece = Piece { chunk: at_abs / chunk, at, len: n, pos };
                pos += n;
                piece
            })
        }))
    }

    /// Chunk `i` as the file stores it now.
    fn stored(&self, i: u64) -> Stored {
        let st = self.state();
        Stored { entry: st.entries.get(i as usize).copied().unwrap_or(Entry::ZERO), patch: st.patches.get(&i).copied() }
    }

    /// Most blocks a new patch record may hold; 0 when patches are off.
    fn patch_limit(&self) -> usize {
        let default = if self.chunk_size >= 64 << 10 { self.chunk_size / 32768 } else { 0 };
        self.tuning.patch_blocks.unwrap_or(default).min(max_record_blocks(self.chunk_size)) as usize
    }

    /// Reads and checks chunk `i` as `stored` says into `dst`: its base, then its patch. The
    /// caller holds the chunk (busy), so that neither can be freed and reused meanwhile.
    fn load(&self, i: u64, stored: &Stored, dst: &mut [u8]) -> Result<()> {
        if !stored.is_hole() {
            self.chunks_loaded.fetch_add(1, Ordering::Relaxed);
        }
        if stored.patch.is_some() {
            self.patches_loaded.fetch_add(1, Ordering::Relaxed);
        }
        let mut read = |buf: &mut [u8], at: u64| self.file.read_at(buf, at);
        read_content(&mut read, i, &stored.entry, stored.patch.as_ref(), dst, self.file.path())
    }

    /// Compresses `content` (a whole chunk) and makes it chunk `i`'s new payload, without a
    /// patch; commits when enough was written since the last commit. The caller holds the chunk
    /// (busy or ready).
    fn store(&self, i: u64, content: &[u8]) -> Result<()> {
        self.check_writable()?;
        let path = self.file.path();
        let entry = chunk::encode(content, self.level, |kind, payload| -> Result<Entry> {
            if kind == Kind::Zero {
                return Ok(Entry::ZERO);
            }
            let len = payload.len() as u64;
            let offset = self.write_new(payload)?;
            Ok(Entry { offset, checksum: chunk::checksum(content, i), stored: len as u32, kind, fresh: true })
        })
        .on("compressing a chunk for", path)??;
        self.replace(i, Change::Base(entry))
    }

    /// Writes `payload` to newly allocated free space and returns where.
    fn write_new(&self, payload: &[u8]) -> Result<u64> {
        let len = payload.len() as u64;
        let offset = self.state().space.alloc(len);
        if let Err(e) = self.file.write_at(payload, offset) {
            self.state().space.release(offset, offset + round_up(len));
            return Err(e);
        }
        Ok(offset)
    }

    /// Stores what a holder of dirty chunk `i` holds: as a patch record when that fits
    /// ([`Image::store_patch`]), else as a new payload, the whole content read first when the
    /// buffer is sparse (the buffer is then full). Afterwards it is clean.
    fn store_held(&self, i: u64, held: &mut Held) -> Result<()> {
        self.check_writable()?;
        let stored = self.stored(i);
        if !self.store_patch(i, held, &stored)? {
            if !held.full {
                let mut buf = Aligned::new(self.chunk_size as usize);
                self.load(i, &stored, &mut buf)?;
                overlay(&mut buf, held);
                held.buf = buf;
                held.full = true;
            }
            self.store(i, &held.buf)?;
        }
        held.dirty = Blocks::default();
        Ok(())
    }

    /// Stores chunk `i`'s dirty blocks, merged with the blocks of its current patch that they do
    /// not replace, as a new record, when patches are on and the merged record holds at most
    /// their limit. False (and nothing written) when it would not, or when the content is in
    /// memory and all zeros (a hole, stored as such).
    fn store_patch(&self, i: u64, held: &Held, stored: &Stored) -> Result<bool> {
        let limit = self.patch_limit();
        let dirty = held.dirty.len();
        if limit == 0 || dirty == 0 || dirty > limit {
            return Ok(false);
        }
        if held.full && blksync_core::zero::is_zero(&held.buf) {
            return Ok(false);
        }
        if stored.patch.is_none() && self.state().patches.len() >= MAX_PATCHES {
            return Ok(false);
        }
        let path = self.file.path();
        let (mut kept, mut kept_data) = (Vec::new(), Vec::new());
        if let Some(patch) = &stored.patch {
            self.patches_loaded.fetch_add(1, Ordering::Relaxed);
            let mut read = |buf: &mut [u8], at: u64| self.file.read_at(buf, at);
            read_record(&mut read, i, patch, self.chunk_size, path, &mut |b, data| {
                if !held.dirty.contains(b) && kept.len() + dirty <= limit {
                    kept.push(b);
                    kept_data.extend_from_slice(data);
                }
            })?;
            if kept.len() + dirty > limit {
                return Ok(false);
            }
        }
        // Both lists ascend and are disjoint: merge them.
        let mut order: Vec<(usize, Option<usize>)> =
            held.dirty.iter().map(|b| (b, None)).chain(kept.iter().enumerate().map(|(k, &b)| (b, Some(k)))).collect();
        order.sort_unstable_by_key(|&(b, _)| b);
        let n = order.len();
        let mut content = Vec::with_capacity(record_len(n as u32) as usize);
        for &(b, _) in &order {
            content.extend_from_slice(&(b as u16).to_le_bytes());
        }
        let block = BLOCK as usize;
        for &(b, from) in &order {
            match from {
                None => content.extend_from_slice(&held.buf[b * block..(b + 1) * block]),
                Some(k) => content.extend_from_slice(&kept_data[k * block..(k + 1) * block]),
            }
        }
        let checksum = chunk::record_checksum(&content, i);
        // zstd when it saves a unit of the raw record's space.
        let limit = round_up(content.len() as u64).saturating_sub(UNIT) as usize;
        let patch = chunk::compress(&content, self.level, limit, |kind, payload| -> Result<Patch> {
            let offset = self.write_new(payload)?;
            Ok(Patch { offset, checksum, stored: payload.len() as u32, blocks: n as u16, kind, fresh: true })
        })
        .on("compressing a patch record for", path)??;
        self.replace(i, Change::Patch(patch))?;
        Ok(true)
    }

    /// Makes `change` chunk `i`'s (freeing what it replaces) and commits when due.
    fn replace(&self, i: u64, change: Change) -> Result<()> {
        let due = {
            let mut st = self.state();
            let (extent, stored) = match &change {
                Change::Base(e) => (e.extent(), e.stored),
                Change::Patch(p) => (Some(p.extent()), p.stored),
            };
            if i >= st.entries.len() as u64 {
                // Shrunk meanwhile (a resize concurrent with a write): the write is past the end.
                if let Some((s, e)) = extent {
                    st.space.release(s, e);
                }
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "{}: chunk {i} is past the end of the image (resized meanwhile)",
                        self.file.path().display()
                    ),
                ));
            }
            match change {
                Change::Base(entry) => {
                    let old = std::mem::replace(&mut st.entries[i as usize], entry);
                    self.free(&mut st, old.extent(), old.fresh)?;
                    if let Some(old) = st.patches.remove(&i) {
                        self.free(&mut st, Some(old.extent()), old.fresh)?;
                    }
                }
                Change::Patch(patch) => {
                    if let Some(old) = st.patches.insert(i, patch) {
                        self.free(&mut st, Some(old.extent()), old.fresh)?;
                    }
                    self.patches_stored.fetch_add(1, Ordering::Relaxed);
                }
            }
            st.since_commit += u64::from(stored);
            st.changed = true;
            self.chunks_stored.fetch_add(1, Ordering::Relaxed);
            self.bytes_stored.fetch_add(u64::from(stored), Ordering::Relaxed);
            let tables = st.entries.len() as u64 * header::ENTRY_LEN + st.patches.len() as u64 * PATCH_LEN;
            st.since_commit >= self.tuning.commit_every.max(8 * tables)
        };
        if due { self.commit() } else { Ok(()) }
    }

    /// Frees a payload's or record's space: at once when no committed index or table references
    /// it (`fresh`), else at the next commit.
    fn free(&self, st: &mut State, extent: Option<(u64, u64)>, fresh: bool) -> Result<()> {
        let Some((start, end)) = extent else { return Ok(()) };
        if fresh {
            st.space.release(start, end);
            self.file.punch(start, end - start)
        } else {
            st.pending.push((start, end));
            Ok(())
        }
    }

    /// Writes the index, the patch table and the header (docs/COMPRESSED-IMAGE.md, "Commit"),
    /// when anything changed since the last commit.
    pub fn commit(&self) -> Result<()> {
        self.check_writable()?;
        if !self.state().changed {
            return Ok(());
        }
        let _one = self.commit.lock().unwrap_or_else(PoisonError::into_inner);
        // Most payloads reach the disk here, before the index is locked; the second sync below
        // covers those written meanwhile.
        self.file.sync().inspect_err(|e| self.fail(e))?;
        let mut st = self.state();
        if !st.changed {
            return Ok(());
        }
        let new_header = self.write_index(&mut st).inspect_err(|e| self.fail(e))?;
        // Committed: what only the old index and table referenced is free now.
        let old = st.header;
        let old_index = (old.count > 0).then(|| (old.index_offset, old.index_offset + round_up(old.index_len())));
        let old_table = (old.patch_count > 0).then(|| (old.patch_offset, old.patch_offset + round_up(old.patch_len())));
        st.slot = 1 - st.slot;
        st.header = new_header;
        st.since_commit = 0;
        st.changed = false;
        for e in &mut st.entries {
            e.fresh = false;
        }
        for p in st.patches.values_mut() {
            p.fresh = false;
        }
        self.commits.fetch_add(1, Ordering::Relaxed);
        let freed: Vec<(u64, u64)> =
            std::mem::take(&mut st.pending).into_iter().chain(old_index).chain(old_table).collect();
        for (start, end) in freed {
            let (start, end) = st.space.release(start, end);
            self.file.punch(start, end - start)?;
        }
        if let Some(end) = st.space.trim_tail() {
            self.file.set_len(end)?;
        }
        Ok(())
    }

    /// Steps 2 and 3 of a commit: the index and the patch table to free space, synced, then the
    /// header to the inactive slot, synced. Returns the header written.
    fn write_index(&self, st: &mut State) -> Result<Header> {
        let count = st.entries.len() as u64;
        let len = count * header::ENTRY_LEN;
        let index_offset = if count == 0 { 0 } else { st.space.alloc(len) };
        let mut hasher = Xxh3::new();
        let mut pos = index_offset;
        index::encode(&st.entries, &mut |piece| {
            hasher.update(piece);
            self.file.write_at(piece, pos)?;
            pos += piece.len() as u64;
            Ok(())
        })?;
        let patch_count = st.patches.len() as u64;
        let (mut patch_offset, mut patch_hash) = (0, 0);
        if patch_count > 0 {
            patch_offset = st.space.alloc(patch_count * PATCH_LEN);
            let mut hasher = Xxh3::new();
            let mut pos = patch_offset;
            index::encode_patches(&st.patches, &mut |piece| {
                hasher.update(piece);
                self.file.write_at(piece, pos)?;
                pos += piece.len() as u64;
                Ok(())
            })?;
            patch_hash = hasher.digest();
        }
        self.file.sync()?;
        let header = Header {
            chunk_size: self.chunk_size,
            level: self.level,
            generation: st.header.generation + 1,
            size: st.size,
            index_offset,
            count,
            index_hash: hasher.digest(),
            patch_offset,
            patch_count,
            patch_hash,
        };
        self.file.write_at(&header.encode(), (1 - st.slot) as u64 * SLOT)?;
        self.file.sync()?;
        Ok(header)
    }

    /// Applies a write (`Some`) or a zeroing (`None`) of one piece to its chunk. Whole aligned
    /// blocks need nothing from the file (the chunk is cached sparse); part of a block needs
    /// the chunk's content first.
    fn apply(&self, piece: &Piece, data: Option<&[u8]>) -> Result<()> {
        let i = piece.chunk;
        let whole = piece.at == 0 && piece.len == self.chunk_size as usize;
        let block = BLOCK as usize;
        let (first, end) = (piece.at / block, (piece.at + piece.len).div_ceil(block));
        let aligned = piece.at.is_multiple_of(block) && piece.len.is_multiple_of(block);
        let write = |held: &mut Held| {
            let dst = &mut held.buf[piece.at..piece.at + piece.len];
            match data {
                Some(d) => dst.copy_from_slice(d),
                None => dst.fill(0),
            }
            held.dirty.insert(first, end);
            held.full |= whole;
        };
        let mut cache = self.cache();
        loop {
            match cache.get_mut(i) {
                Some(Slot::Busy) => cache = self.wait(cache),
                Some(Slot::Ready { held, .. }) => {
                    if aligned || held.knows(first, end) {
                        write(held);
                        return Ok(());
                    }
                    // Part of a block the buffer does not know: the chunk's content first.
                    cache = self.complete(i, cache)?;
                }
                None => break,
            }
        }
        let stored = self.stored(i);
        if data.is_none() && stored.is_hole() {
            return Ok(());
        }
        cache.set_busy(i);
        if whole {
            drop(cache);
            let done = match data {
                Some(d) => self.store(i, d),
                None => self.check_writable().and_then(|()| self.replace(i, Change::Base(Entry::ZERO))),
            };
            let mut cache = self.cache();
            cache.remove(i);
            drop(cache);
            self.ready.notify_all();
            return done;
        }
        let mut held = if aligned {
            Held { buf: cache.buffer(), dirty: Blocks::default(), full: false }
        } else {
            let (again, buf) = self.load_busy(i, &stored, cache)?;
            cache = again;
            Held { buf, dirty: Blocks::default(), full: true }
        };
        write(&mut held);
        cache.set_ready(i, held);
        self.ready.notify_all();
        self.make_room(cache)
    }

    /// Makes ready chunk `i`'s slot full: reads its stored content (outside the lock, the chunk
    /// busy meanwhile) and lays its dirty blocks over it. On failure the slot is as it was.
    fn complete<'a>(&'a self, i: u64, mut cache: MutexGuard<'a, Cache>) -> Result<MutexGuard<'a, Cache>> {
        let Some(mut held) = cache.take(i) else { return Ok(cache) };
        let mut buf = cache.buffer();
        drop(cache);
        let stored = self.stored(i);
        let loaded = self.load(i, &stored, &mut buf);
        let mut cache = self.cache();
        match loaded {
            Ok(()) => {
                overlay(&mut buf, &held);
                let sparse = std::mem::replace(&mut held.buf, buf);
                held.full = true;
                cache.set_ready(i, held);
                cache.recycle(sparse);
                self.ready.notify_all();
                Ok(cache)
            }
            Err(e) => {
                cache.recycle(buf);
                cache.set_ready(i, held);
                drop(cache);
                self.ready.notify_all();
                Err(e)
            }
        }
    }

    /// Loads chunk `i`, which the caller marked busy, into a buffer of the cache, outside its
    /// lock; returns the lock again with the buffer. On failure the chunk is no longer busy and
    /// those waiting for it are woken.
    fn load_busy<'a>(
        &'a self,
        i: u64,
        stored: &Stored,
        mut cache: MutexGuard<'a, Cache>,
    ) -> Result<(MutexGuard<'a, Cache>, Aligned)> {
        let mut buf = cache.buffer();
        drop(cache);
        let loaded = self.load(i, stored, &mut buf);
        let mut cache = self.cache();
        if let Err(e) = loaded {
            cache.remove(i);
            cache.recycle(buf);
            drop(cache);
            self.ready.notify_all();
            return Err(e);
        }
        Ok((cache, buf))
    }

    /// Evicts least recently used chunks while the cache holds more than its capacity; a dirty
    /// one is stored first (with the lock released).
    fn make_room<'a>(&'a self, mut cache: MutexGuard<'a, Cache>) -> Result<()> {
        while let Some((i, dirty)) = cache.over_capacity() {
            if !dirty {
                cache.remove(i);
                continue;
            }
            let Some(mut held) = cache.take(i) else { continue };
            drop(cache);
            let stored = self.store_held(i, &mut held);
            cache = self.cache();
            match stored {
                Ok(()) => {
                    cache.remove(i);
                    cache.recycle(held.buf);
                }
                Err(e) => {
                    cache.set_ready(i, held);
                    drop(cache);
                    self.ready.notify_all();
                    return Err(e);
                }
            }
            self.ready.notify_all();
        }
        Ok(())
    }

    /// Stores every dirty chunk, keeping it cached as clean (when its buffer is full), and waits
    /// for chunks other threads are writing out: afterwards, every write that returned before
    /// the call is in the index or the patch table.
    fn write_back(&self) -> Result<()> {
        let mut cache = self.cache();
        loop {
            if let Some(i) = cache.dirty() {
                let Some(mut held) = cache.take(i) else { continue };
                drop(cache);
                let stored = self.store_held(i, &mut held);
                cache = self.cache();
                cache.set_ready(i, held);
                self.ready.notify_all();
                stored?;
            } else if cache.any_busy() {
                cache = self.wait(cache);
            } else {
                return Ok(());
            }
        }
    }

    fn read_piece(&self, piece: &Piece, out: &mut [u8]) -> Result<()> {
        let i = piece.chunk;
        let block = BLOCK as usize;
        let (first, end) = (piece.at / block, (piece.at + piece.len).div_ceil(block));
        let mut cache = self.cache();
        loop {
            match cache.get_mut(i) {
                Some(Slot::Busy) => cache = self.wait(cache),
                Some(Slot::Ready { held, .. }) => {
                    if held.knows(first, end) {
                        out.copy_from_slice(&held.buf[piece.at..piece.at + piece.len]);
                        return Ok(());
                    }
                    cache = self.complete(i, cache)?;
                }
                None => break,
            }
        }
        let stored = self.stored(i);
        if stored.is_hole() {
            out.fill(0);
            return Ok(());
        }
        cache.set_busy(i);
        if piece.len == self.chunk_size as usize {
            // A whole chunk goes straight into the caller's buffer: the engine reads whole
            // chunks once.
            drop(cache);
            let loaded = self.load(i, &stored, out);
            let mut cache = self.cache();
            if loaded.is_err() || !self.writable {
                cache.remove(i);
                drop(cache);
                self.ready.notify_all();
                return loaded;
            }
            // A writable image keeps a copy as well: a sync reads a chunk to compare it and
            // then writes its differences into it, which would decompress it a second time
            // (2.7 of the 12.4 CPU-seconds of a 1 %-changed 4 GiB update).
            let mut buf = cache.buffer();
            buf.copy_from_slice(out);
            cache.set_ready(i, Held { buf, dirty: Blocks::default(), full: true });
            self.ready.notify_all();
            return self.make_room(cache);
        }
        let (mut cache, buf) = self.load_busy(i, &stored, cache)?;
        out.copy_from_slice(&buf[piece.at..piece.at + piece.len]);
        cache.set_ready(i, Held { buf, dirty: Blocks::default(), full: true });
        self.ready.notify_all();
        self.make_room(cache)
    }

    /// Makes everything written so far durable and commits it.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.write_back()?;
        self.commit()
    }
}

/// Takes an exclusive (`writable`) or shared `flock` on the image, failing at once when the
/// other kind is held. Filesystems without `flock` run unlocked, as any other program would.
fn lock(file: &File, writable: bool, path: &Path) -> Result<()> {
    use rustix::fs::FlockOperation;
    let op = if writable { FlockOperation::NonBlockingLockExclusive } else { FlockOperation::NonBlockingLockShared };
    match rustix::fs::flock(file, op) {
        Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::new(
            ErrorKind::InUse,
            format!(
                "{} is {} by another program, which holds a lock on it",
                path.display(),
                if writable { "open" } else { "being written" }
            ),
        )),
        Ok(()) | Err(_) => Ok(()),
    }
}

impl Drop for Image {
    /// Flushes what was written and not yet committed, so that forgetting `flush` loses
    /// nothing; a failure can only be reported on stderr (call `flush` to see it).
    fn drop(&mut self) {
        let failed = self.failed.get_mut().unwrap_or_else(PoisonError::into_inner).is_some();
        // A simulated crash: nothing more reaches the file, as after a real one.
        #[cfg(test)]
        let failed = failed || self.file.faults.dead.load(Ordering::SeqCst);
        if self.writable
            && !failed
            && let Err(e) = self.flush()
        {
            blksync_core::endpoint::report_cleanup_failure(&e);
        }
    }
}

impl Source for Image {
    fn name(&self) -> &Path {
        self.file.path()
    }

    fn caps(&self) -> Caps {
        Caps { resizable: true, holes: true, zero_offload: true, costly_writes: true, ..Caps::NEVER_WRONG }
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        for piece in self.pieces(offset, buf.len(), "reading")? {
            self.read_piece(&piece, &mut buf[piece.pos..piece.pos + piece.len])?;
        }
        Ok(())
    }

    /// Zero chunks without a patch are holes, at chunk granularity; a chunk with writes not yet
    /// stored is allocated. The segment reaches at most 65536 chunks on (the cursor asks again).
    fn segment_at(&self, offset: u64) -> Result<Segment> {
        let size = self.size();
        if offset >= size {
            return Ok(Segment { start: offset, end: offset.max(size), allocated: false });
        }
        let chunk = u64::from(self.chunk_size);
        let cache = self.cache();
        let st = self.state();
        let allocated = |i: u64| {
            cache.unstored(i)
                || st.entries.get(i as usize).is_some_and(|e| e.kind != Kind::Zero)
                || st.patches.contains_key(&i)
        };
        let first = offset / chunk;
        let kind = allocated(first);
        let last = (st.entries.len() as u64).min(first + (1 << 16));
        let end = (first + 1..last).find(|&i| allocated(i) != kind).unwrap_or(last);
        Ok(Segment { start: offset, end: (end * chunk).min(size), allocated: kind })
    }

    /// Drops clean cached chunks of the range and advises the kernel to drop their payloads'
    /// pages.
    fn drop_cache(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let chunk = u64::from(self.chunk_size);
        let (first, last) = (offset / chunk, (offset.saturating_add(len) - 1) / chunk);
        self.cache().drop_clean(first, last);
        let st = self.state();
        for e in st.entries.iter().skip(first as usize).take((last - first + 1).min(1 << 12) as usize) {
            if let (Some((start, _)), Some(n)) = (e.extent(), std::num::NonZeroU64::new(u64::from(e.stored))) {
                let _ = rustix::fs::fadvise(self.file.file(), start, Some(n), rustix::fs::Advice::DontNeed);
            }
        }
        for p in st.patches.range(first..=last).map(|(_, p)| p).take(1 << 12) {
            if let Some(n) = std::num::NonZeroU64::new(u64::from(p.stored)) {
                let _ = rustix::fs::fadvise(self.file.file(), p.offset, Some(n), rustix::fs::Advice::DontNeed);
            }
        }
    }

    fn identity(&self) -> Identity {
        self.identity
    }

    fn mode(&self) -> Option<u32> {
        self.file.file().metadata().ok().map(|m| m.permissions().mode() & 0o7777)
    }

    fn close(self: Box<Self>) -> Result<()> {
        self.flush()
    }
}

impl Target for Image {
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        for piece in self.pieces(offset, buf.len(), "writing")? {
            self.apply(&piece, Some(&buf[piece.pos..piece.pos + piece.len]))?;
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let len = usize::try_from(len).map_err(|_| Error::usage("zeroing more than the address space"))?;
        for piece in self.pieces(offset, len, "zeroing")? {
            self.apply(&piece, None)?;
        }
        Ok(())
    }

    /// Resizes the logical image. Growing adds zero chunks (holes); shrinking zeroes the cut
    /// part of the new last chunk and frees the chunks past it. Concurrent writes past the new
    /// end fail.
    fn set_size(&self, size: u64) -> Result<()> {
        self.check_writable()?;
        let old = self.size();
        if size == old {
            return Ok(());
        }
        let chunk = u64::from(self.chunk_size);
        let count = header::chunks_for(size, self.chunk_size);
        if size > header::MAX_SIZE || count > header::MAX_COUNT {
            return Err(Error::usage(format!(
                "{}: {size} bytes is too large for a compressed image",
                self.file.path().display()
            )));
        }
        if size < old && !size.is_multiple_of(chunk) {
            let end = old.min(size.div_ceil(chunk) * chunk);
            self.zero(size, end - size)?;
        }
        let mut cache = self.cache();
        while cache.any_busy() {
            cache = self.wait(cache);
        }
        // Holding the cache: no other thread can start on a chunk until the resize is done.
        while let Some(i) = cache.dirty() {
            let Some(mut held) = cache.take(i) else { break };
            let stored = self.store_held(i, &mut held);
            cache.set_ready(i, held);
            stored?;
        }
        cache.clear();
        let mut st = self.state();
        if count < st.entries.len() as u64 {
            let cut: Vec<Entry> = st.entries.drain(count as usize..).collect();
            for old in &cut {
                self.free(&mut st, old.extent(), old.fresh)?;
            }
            st.entries.shrink_to_fit();
            let cut = st.patches.split_off(&count);
            for old in cut.values() {
                self.free(&mut st, Some(old.extent()), old.fresh)?;
            }
        } else {
            st.entries.resize(count as usize, Entry::ZERO);
        }
        st.size = size;
        st.changed = true;
        self.size.store(size, Ordering::Release);
        drop(st);
        drop(cache);
        self.ready.notify_all();
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Image::flush(self)
    }

    fn created(&self) -> bool {
        self.created
    }

    fn remove_created(&self) {
        if self.created {
            let _ = std::fs::remove_file(self.file.path());
        }
    }
}

#[cfg(test)]
mod tests;
