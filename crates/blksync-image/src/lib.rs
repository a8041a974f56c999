//! A seekable, zstd-compressed disk image that blksync reads as a [`Source`] and updates in
//! place as a [`Target`] (docs/COMPRESSED-IMAGE.md is the format).
//!
//! Why: `blksync sync SRC img.bsz --compress` keeps a compressed copy of a disk, as diskrsync
//! does, and every later sync must rewrite only what changed, not the whole file. So the image is
//! cut into fixed-size chunks (1 MiB by default), each compressed on its own: any byte is one
//! chunk's decompression away, a changed chunk is rewritten alone, and an all-zero chunk is
//! stored as nothing and reported as a hole, so the engine skips it like a hole of a sparse file.
//!
//! Updates are copy-on-write: a changed chunk goes to space the committed index does not
//! reference, and a commit (a new index, then a header in the inactive one of two slots, each
//! step synced) makes the changes current at once. A process killed at any moment leaves every
//! chunk as it was at the last completed commit; commits happen at every flush and every 256 MiB
//! of new data. Space a commit frees is punched out and reused, so the file stays about the size
//! of its live data.
//!
//! A chunk with a few changed 4 KiB blocks can instead keep its payload and carry a small patch
//! record of those blocks, so that scattered small changes do not recompress whole chunks.
//!
//! Every header, the index, the patch table, every chunk and every record are checksummed:
//! damage is an error naming the file and the offset, never a wrong read; every length read from the file is checked against its
//! size before anything is allocated.
//!
//! ```no_run
//! use blksync_core::endpoint::{Source, Target};
//! use blksync_image::{Image, Options};
//! # fn main() -> blksync_core::Result<()> {
//! let path = std::path::Path::new("disk.bsz");
//! let image = Image::create(path, 1 << 30, Options::default())?;
//! image.write_at(b"hello", 4096)?;
//! image.flush()?; // the commit
//! drop(image);
//! assert!(blksync_image::is_image(path)?);
//! let image = Image::open(path, false)?;
//! let mut buf = [0u8; 5];
//! image.read_at(&mut buf, 4096)?;
//! assert_eq!(&buf, b"hello");
//! assert!(!image.segment_at(1 << 20)?.allocated); // untouched chunks are holes
//! # Ok(()) }
//! ```
//!
//! Modules: [`header`] (the two slots), [`index`] (the per-chunk table), `space` (free
//! extents), `chunk` (compression and checksums), `cache` (decompressed chunks), `file` (the
//! file's I/O) and `image` (the [`Image`] that ties them together).
//!
//! [`Source`]: blksync_core::endpoint::Source
//! [`Target`]: blksync_core::endpoint::Target

mod cache;
mod chunk;
mod file;
pub mod header;
mod image;
pub mod index;
mod space;

use std::path::Path;

use blksync_core::Result;
use blksync_core::error::IoContext;

pub use header::{MAGIC, sniff};
pub use image::{Image, Options, Stats, Tuning, Usage};

/// Whether the regular file at `path` begins with a compressed image's magic (a missing path is
/// not one). Only the first 8 bytes are read: this says what the file claims to be; `open`
/// checks it.
pub fn is_image(path: &Path) -> Result<bool> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    // Only a regular file can be an image; anything else (a FIFO, which an open would block on,
    // a device, a directory) is left to the opener that refuses or handles it.
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).on("inspecting", path),
    }
    // Non-blocking, should the path become a FIFO after the check.
    let file = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).on("opening", path),
    };
    if !file.metadata().on("inspecting", path)?.is_file() {
        return Ok(false);
    }
    let mut head = [0u8; 8];
    let mut n = 0;
    while n < head.len() {
        match file.read_at(&mut head[n..], n as u64).at("reading", path, n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(sniff(&head[..n]))
}

/// Rewrites the checksums of both header slots of `bytes` (and the index and patch table hashes
/// each names, where they lie inside `bytes`), so that random or mutated inputs reach the index,
/// table, chunk and record checks instead of stopping at a hash. For the fuzz target and the
/// random-input tests.
#[doc(hidden)]
pub fn fix_checksums(bytes: &mut [u8]) {
    for slot in [0, header::SLOT as usize] {
        let Some(h) = bytes.get(slot..slot + header::LEN) else { continue };
        let field = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(h[12..16].try_into().unwrap_or_default());
        let table = |offset: u64, count: u64, len: u64| {
            let end = count.checked_mul(len).and_then(|len| offset.checked_add(len))?;
            Some(xxhash_rust::xxh3::xxh3_64(bytes.get(offset as usize..usize::try_from(end).ok()?)?))
        };
        let index_hash = table(field(40), field(48), header::ENTRY_LEN);
        let patch_hash = table(field(72), field(80), header::PATCH_LEN);
        if let Some(hash) = index_hash {
            bytes[slot + 56..slot + 64].copy_from_slice(&hash.to_le_bytes());
        }
        let hash = xxhash_rust::xxh3::xxh3_64(&bytes[slot..slot + 64]);
        bytes[slot + 64..slot + 72].copy_from_slice(&hash.to_le_bytes());
        if flags & header::PATCHES != 0 {
            if let Some(hash) = patch_hash {
                bytes[slot + 88..slot + 96].copy_from_slice(&hash.to_le_bytes());
            }
            let hash = xxhash_rust::xxh3::xxh3_64(&bytes[slot..slot + 96]);
            bytes[slot + 96..slot + 104].copy_from_slice(&hash.to_le_bytes());
        }
    }
}

/// Runs every decoder on `data` as an image file, as is and with its checksums fixed up: the
/// header slots, the index, the patch table, the free-space check, and the first chunks with
/// their patch records. Any input must give a
/// value or an error, never a panic or an allocation beyond the limits of the spec. For the fuzz
/// target and the random-input tests.
#[doc(hidden)]
pub fn exercise(data: &[u8]) {
    let _ = header::Header::decode(data);
    let mut fixed = data.to_vec();
    fix_checksums(&mut fixed);
    for bytes in [data, &fixed[..]] {
        let mut read = |buf: &mut [u8], at: u64| -> Result<()> {
            let src = usize::try_from(at)
                .ok()
                .and_then(|at| bytes.get(at..at.checked_add(buf.len())?))
                .ok_or_else(|| blksync_core::Error::new(blksync_core::ErrorKind::Corrupt, "past the end"))?;
            buf.copy_from_slice(src);
            Ok(())
        };
        let path = Path::new("fuzz.bsz");
        let Ok(loaded) = image::load(&mut read, bytes.len() as u64, path) else { continue };
        assert_eq!(loaded.entries.len() as u64, loaded.header.count);
        assert_eq!(loaded.patches.len() as u64, loaded.header.patch_count);
        if loaded.entries.iter().all(|e| e.kind == index::Kind::Zero) && loaded.patches.is_empty() {
            continue;
        }
        let mut dst = vec![0u8; loaded.header.chunk_size as usize];
        let patched = loaded.patches.keys().take(8).map(|&i| i as usize);
        for i in (0..loaded.entries.len().min(16)).chain(patched) {
            let patch = loaded.patches.get(&(i as u64));
            let _ = image::read_content(&mut read, i as u64, &loaded.entries[i], patch, &mut dst, path);
        }
    }
}
