//! Content hashes of a chain's base image (docs/DELTA-FORMAT.md, "Base content hashes").
//!
//! Increments carry a checksum per record and a whole-file hash, but the base is a plain sparse
//! image: a flipped byte or a truncation used to restore silently as wrong bytes or zeros, and
//! `prune` folded the damage forward. A base therefore gets a `.sums` file beside it: one flag
//! and one BLAKE3-128 per MiB of the image. Every read of the base through
//! [`crate::chain::Image`] checks the blocks it reads, a hole in the base must be a block recorded
//! as zeros, and `list --verify` checks them all.
//!
//! Cost: 17 bytes per MiB (17 MiB per TiB of image), one extra read of a new base to hash it
//! (holes are not read), and hashing every base byte a restore, backup or prune reads (BLAKE3
//! runs at several GB/s per core, faster than the disks it checks).

use std::collections::BTreeSet;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use crate::endpoint::{SegmentCursor, Source};
use crate::error::{Error, ErrorKind, IoContext, Result};

/// Bytes of image per hash.
pub const BLOCK: u64 = 1 << 20;
const MAGIC: &[u8; 16] = b"BLKSYNC-SUMS\0\0\0\0";
const VERSION: u32 = 1;
/// Fixed part before the entries: magic, version, block, size, id, count.
const HEAD: usize = 16 + 4 + 4 + 8 + 16 + 8;
const ENTRY: usize = 17;
/// Largest image a sums file may describe (one entry per MiB): 1 EiB.
const MAX_BLOCKS: u64 = 1 << 40;

/// The content hashes of one base image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sums {
    /// Id of the base they belong to.
    pub id: [u8; 16],
    /// Image size they describe.
    pub size: u64,
    /// One per block: `None` for all zeros, else the BLAKE3-128 of the block.
    pub blocks: Vec<Option<[u8; 16]>>,
}

fn hash_block(data: &[u8]) -> Option<[u8; 16]> {
    if crate::zero::is_zero(data) {
        return None;
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&blake3::hash(data).as_bytes()[..16]);
    Some(out)
}

/// The path of the sums of the base whose image is `image` (`base-N-ID.img` → `base-N-ID.sums`).
#[must_use]
pub fn path_for(image: &Path) -> PathBuf {
    image.with_extension("sums")
}

impl Sums {
    /// Hashes `image` (as it is now) for the base `id`, reading only its allocated parts, on
    /// `threads` workers.
    pub fn compute(image: &dyn Source, id: [u8; 16], threads: usize) -> Result<Sums> {
        let size = image.size();
        let count = size.div_ceil(BLOCK);
        let mut blocks = vec![None; count as usize];
        // Allocation map first (cheap), then the allocated blocks hashed in parallel.
        let mut cursor = SegmentCursor::new(image);
        let mut wanted = Vec::new();
        let mut extents = Vec::new();
        for b in 0..count {
            cursor.allocated_in(b * BLOCK, ((b + 1) * BLOCK).min(size), &mut extents)?;
            if !extents.is_empty() {
                wanted.push(b);
            }
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results = std::sync::Mutex::new(Vec::with_capacity(wanted.len()));
        std::thread::scope(|s| -> Result<()> {
            let work = || -> Result<()> {
                let mut buf = crate::buffer::Aligned::new(BLOCK as usize);
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&b) = wanted.get(i) else { return Ok(()) };
                    let len = (size - b * BLOCK).min(BLOCK) as usize;
                    image.read_at(&mut buf[..len], b * BLOCK)?;
                    let h = hash_block(&buf[..len]);
                    results.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((b, h));
                }
            };
            let workers: Vec<_> = (0..threads.max(1)).map(|_| s.spawn(work)).collect();
            for w in workers {
                w.join().map_err(|_| Error::new(ErrorKind::Io, "a hashing thread panicked"))??;
            }
            Ok(())
        })?;
        for (b, h) in results.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
            blocks[b as usize] = h;
        }
        Ok(Sums { id, size, blocks })
    }

    /// Recomputes the blocks of `image` that overlap `[start, end)` (after an in-place change).
    pub fn update(&mut self, image: &dyn Source, start: u64, end: u64) -> Result<()> {
        let mut buf = crate::buffer::Aligned::new(BLOCK as usize);
        let first = start / BLOCK;
        let last = end.div_ceil(BLOCK).min(self.blocks.len() as u64);
        for b in first..last {
            let len = (self.size - b * BLOCK).min(BLOCK) as usize;
            image.read_at(&mut buf[..len], b * BLOCK)?;
            self.blocks[b as usize] = hash_block(&buf[..len]);
        }
        Ok(())
    }

    /// Resizes the description to `size` bytes (new blocks are zeros; the block that holds the
    /// old end must be recomputed with [`Sums::update`]).
    pub fn resize(&mut self, size: u64) {
        self.size = size;
        self.blocks.resize(size.div_ceil(BLOCK) as usize, None);
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD + self.blocks.len() * ENTRY + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(BLOCK as u32).to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&(self.blocks.len() as u64).to_le_bytes());
        for b in &self.blocks {
            match b {
                None => out.extend_from_slice(&[0u8; ENTRY]),
                Some(h) => {
                    out.push(1);
                    out.extend_from_slice(h);
                }
            }
        }
        let hash = blake3::hash(&out);
        out.extend_from_slice(hash.as_bytes());
        out
    }

    /// Decodes and validates a sums file's bytes.
    pub fn decode(bytes: &[u8]) -> std::result::Result<Sums, String> {
        if bytes.len() < HEAD + 32 {
            return Err(format!("{} bytes is too short", bytes.len()));
        }
        if &bytes[..16] != MAGIC {
            return Err("bad magic".into());
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
        if u32_at(16) != VERSION {
            return Err(format!("version {}; this blksync reads version {VERSION}", u32_at(16)));
        }
        if u64::from(u32_at(20)) != BLOCK {
            return Err(format!("block size {} is not {BLOCK}", u32_at(20)));
        }
        let size = u64_at(24);
        let id: [u8; 16] = bytes[32..48].try_into().unwrap_or_default();
        let count = u64_at(48);
        if count != size.div_ceil(BLOCK) || count > MAX_BLOCKS {
            return Err(format!("{count} hashes cannot describe {size} bytes"));
        }
        let body = HEAD + count as usize * ENTRY;
        if bytes.len() != body + 32 {
            return Err(format!("{} bytes where {} were expected", bytes.len(), body + 32));
        }
        if blake3::hash(&bytes[..body]).as_bytes() != &bytes[body..] {
            return Err("checksum mismatch".into());
        }
        let mut blocks = Vec::with_capacity(count as usize);
        for e in bytes[HEAD..body].chunks_exact(ENTRY) {
            blocks.push(match e[0] {
                0 if e[1..].iter().all(|&b| b == 0) => None,
                1 => Some(e[1..].try_into().unwrap_or_default()),
                f => return Err(format!("bad entry flag {f}")),
            });
        }
        Ok(Sums { id, size, blocks })
    }

    /// Loads the sums at `path`, which must belong to base `id` of `size` bytes.
    pub fn load(path: &Path, id: [u8; 16], size: u64) -> Result<Sums> {
        let bytes = std::fs::read(path).on("reading", path)?;
        let sums = Sums::decode(&bytes).map_err(|e| corrupt(path, e))?;
        if sums.id != id || sums.size != size {
            return Err(corrupt(path, "they belong to another base image"));
        }
        Ok(sums)
    }

    /// Writes the sums to `path` atomically (temporary file, fsync, rename, directory fsync).
    pub fn store(&self, path: &Path) -> Result<()> {
        let (mut file, tmp) = crate::temp::create(path, 0o600)?;
        let written = file.write_all(&self.encode()).and_then(|()| file.sync_all());
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io("writing", &tmp, None, e));
        }
        crate::temp::commit(&tmp, path)
    }

    /// Checks `data`, read from the base at `offset` (block-aligned; a whole block, or the last
    /// one's remainder) against its hashes. `image` names the file in the error.
    pub fn check(&self, image: &Path, offset: u64, data: &[u8]) -> Result<()> {
        debug_assert_eq!(offset % BLOCK, 0);
        for (i, piece) in data.chunks(BLOCK as usize).enumerate() {
            let at = offset + i as u64 * BLOCK;
            let expected = self.blocks.get((at / BLOCK) as usize).copied().flatten();
            if hash_block(piece) != expected {
                return Err(damaged(image, at));
            }
        }
        Ok(())
    }
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Corrupt, format!("{}: the base's content hashes are unusable: {what}", path.display()))
}

fn damaged(image: &Path, offset: u64) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!(
            "{}: the base image is damaged: the MiB at byte offset {offset} does not match its content hash",
            image.display()
        ),
    )
}

/// The blocks of a base that one reader has already checked, one bit each, and the blocks being
/// checked right now.
///
/// A reader that asks for a block in pieces (an NBD client reads 256 KiB at a time, a MiB block
/// is four of them) would otherwise read and hash the whole block once per piece: `serve` read a
/// point at 0.1 × the speed of the raw file. Once a block passed its check, the reader trusts it
/// for as long as it runs: the base does not change while a reader holds the chain (a prune waits
/// for readers), and damage is found the first time it is read, as before.
///
/// The pieces of one block arrive together, on several of the server's workers: the first to
/// come claims the block (`busy`) and hashes it, and the others wait for its verdict rather than
/// hash the same MiB again (that doubled the time `serve` took to read a point).
#[derive(Debug)]
pub struct Checked {
    bits: Vec<AtomicU64>,
    busy: Mutex<BTreeSet<u64>>,
    /// Signalled whenever blocks stop being busy.
    released: Condvar,
}

impl Checked {
    /// None checked yet, for `sums`' blocks.
    #[must_use]
    pub fn new(sums: &Sums) -> Checked {
        Checked {
            bits: (0..sums.blocks.len().div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            busy: Mutex::new(BTreeSet::new()),
            released: Condvar::new(),
        }
    }

    fn is_checked(&self, b: u64) -> bool {
        self.bits.get((b / 64) as usize).is_some_and(|w| w.load(Ordering::Acquire) & (1 << (b % 64)) != 0)
    }

    fn all(&self, blocks: Range<u64>) -> bool {
        blocks.into_iter().all(|b| self.is_checked(b))
    }

    /// Waits until no other reader is checking a block of `blocks`, then claims every one that
    /// is still unchecked. Nothing is held while waiting, so two readers cannot wait for each
    /// other.
    fn claim(&self, blocks: Range<u64>) -> Vec<u64> {
        let mut busy = self.busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while blocks.clone().any(|b| !self.is_checked(b) && busy.contains(&b)) {
            busy = self.released.wait(busy).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        let mine: Vec<u64> = blocks.filter(|&b| !self.is_checked(b)).collect();
        busy.extend(mine.iter().copied());
        mine
    }

    /// Gives `block` back, checked when `passed`: a failed block is claimed and hashed again by
    /// the next reader, which then reports the damage too.
    fn release(&self, block: u64, passed: bool) {
        let mut busy = self.busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if passed && let Some(w) = self.bits.get((block / 64) as usize) {
            w.fetch_or(1 << (block % 64), Ordering::Release);
        }
        busy.remove(&block);
        drop(busy);
        self.released.notify_all();
    }
}

/// Reads `[offset, offset + buf.len())` of `file` (the base image at `image`) into `buf`,
/// checking every block it touches that `checked` does not hold yet. A block is read whole for
/// its check, so that the check sees the bytes its hash covers: straight into `buf` when the
/// request is exactly whole unchecked blocks, otherwise into a scratch buffer, one block at a
/// time, after which `buf` is read from the (now warm) file.
pub fn read_checked(
    sums: &Sums,
    (image, checked): (&Path, Option<&Checked>),
    file: &dyn Source,
    buf: &mut [u8],
    offset: u64,
) -> Result<()> {
    let end = offset + buf.len() as u64;
    let first = offset - offset % BLOCK;
    let last = end.div_ceil(BLOCK).saturating_mul(BLOCK).min(sums.size);
    let blocks = first / BLOCK..last.div_ceil(BLOCK);
    let Some(checked) = checked else {
        if first == offset && last == end {
            file.read_at(buf, offset)?;
            return sums.check(image, offset, buf);
        }
        let mut scratch = crate::buffer::Aligned::new((last - first) as usize);
        file.read_at(&mut scratch, first)?;
        sums.check(image, first, &scratch)?;
        let from = (offset - first) as usize;
        buf.copy_from_slice(&scratch[from..from + buf.len()]);
        return Ok(());
    };
    if checked.all(blocks.clone()) {
        return file.read_at(buf, offset);
    }
    let mine = checked.claim(blocks.clone());
    if first == offset && last == end && mine.len() as u64 == blocks.end - blocks.start {
        let result = file.read_at(buf, offset).and_then(|()| sums.check(image, offset, buf));
        for &b in &mine {
            checked.release(b, result.is_ok());
        }
        return result;
    }
    // One block-sized scratch buffer per thread, kept: a fresh one per block was a memset of
    // every byte checked (the allocator zeroes heap memory it hands out again).
    thread_local! {
        static SCRATCH: std::cell::RefCell<Option<crate::buffer::Aligned>> = const { std::cell::RefCell::new(None) };
    }
    SCRATCH.with_borrow_mut(|scratch| {
        let scratch = scratch.get_or_insert_with(|| crate::buffer::Aligned::new(BLOCK as usize));
        check_claimed(sums, image, checked, file, mine, scratch)
    })?;
    file.read_at(buf, offset)
}

/// Reads and checks each block of `mine`, claimed by this reader, releasing each with its
/// verdict; on damage, the rest are released unchecked.
fn check_claimed(
    sums: &Sums,
    image: &Path,
    checked: &Checked,
    file: &dyn Source,
    mine: Vec<u64>,
    scratch: &mut [u8],
) -> Result<()> {
    let mut mine = mine.into_iter();
    while let Some(b) = mine.next() {
        let at = b * BLOCK;
        let piece = &mut scratch[..(BLOCK.min(sums.size - at)) as usize];
        let result = file.read_at(piece, at).and_then(|()| sums.check(image, at, piece));
        checked.release(b, result.is_ok());
        if let Err(e) = result {
            for b in mine {
                checked.release(b, false);
            }
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(n: usize) -> Sums {
        let blocks = (0..n).map(|i| (i % 3 != 0).then_some([i as u8; 16])).collect();
        Sums { id: [7; 16], size: n as u64 * BLOCK - 5, blocks }
    }

    /// Counts the whole-block reads of a source: each is one check.
    struct Counting(crate::endpoint::memory::Memory, std::sync::atomic::AtomicUsize);

    impl Source for Counting {
        fn name(&self) -> &Path {
            self.0.name()
        }
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            if buf.len() as u64 == BLOCK {
                self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Give the other pieces' readers time to arrive while this one checks.
                std::thread::yield_now();
            }
            self.0.read_at(buf, offset)
        }
        fn segment_at(&self, offset: u64) -> Result<crate::endpoint::Segment> {
            self.0.segment_at(offset)
        }
        fn drop_cache(&self, _: u64, _: u64) {}
        fn identity(&self) -> crate::endpoint::Identity {
            crate::endpoint::Identity::None
        }
    }

    /// The four pieces of each block, read at once by four threads (as a server's workers do),
    /// hash each block once: the first claims it, the others wait for its verdict.
    #[test]
    fn pieces_read_at_once_hash_their_block_once() {
        use crate::endpoint::memory::Memory;
        let bytes: Vec<u8> = (0..8 * BLOCK as usize).map(|i| (i % 249) as u8).collect();
        let source = Counting(Memory::with_bytes("base", bytes.clone()), std::sync::atomic::AtomicUsize::new(0));
        let sums = Sums::compute(&source.0, [1; 16], 2).unwrap();
        let checked = Checked::new(&sums);
        let image = Path::new("base.img");
        let piece = (BLOCK / 4) as usize;
        for block in 0..8u64 {
            std::thread::scope(|scope| {
                for k in 0..4u64 {
                    let (sums, checked, source, bytes) = (&sums, &checked, &source, &bytes);
                    scope.spawn(move || {
                        let at = block * BLOCK + k * piece as u64;
                        let mut buf = vec![0; piece];
                        read_checked(sums, (image, Some(checked)), source, &mut buf, at).unwrap();
                        assert_eq!(buf, bytes[at as usize..at as usize + piece]);
                    });
                }
            });
        }
        assert_eq!(source.1.load(std::sync::atomic::Ordering::Relaxed), 8);
    }

    /// A block is checked on its first read, in whatever pieces: a damaged block is refused
    /// then, and a block that passed is read without hashing it again.
    #[test]
    fn each_block_is_checked_on_its_first_read_only() {
        use crate::endpoint::memory::Memory;
        let bytes: Vec<u8> = (0..3 * BLOCK as usize).map(|i| (i % 251) as u8).collect();
        let good = Memory::with_bytes("base", bytes.clone());
        let sums = Sums::compute(&good, [1; 16], 2).unwrap();
        let mut damaged = bytes;
        damaged[2 * BLOCK as usize + 10] ^= 1;
        let bad = Memory::with_bytes("base", damaged);
        let checked = Checked::new(&sums);
        let image = Path::new("base.img");
        let mut piece = vec![0; 256 << 10];
        for k in 0..4 {
            read_checked(&sums, (image, Some(&checked)), &good, &mut piece, k * (256 << 10)).unwrap();
        }
        // Block 0 passed: later reads trust it, even from other bytes.
        read_checked(&sums, (image, Some(&checked)), &bad, &mut piece, 0).unwrap();
        // Block 2 was never read: its damage is found, naming the offset.
        let e = read_checked(&sums, (image, Some(&checked)), &bad, &mut piece, 2 * BLOCK).unwrap_err();
        assert!(e.to_string().contains("base.img"), "{e}");
        assert!(read_checked(&sums, (image, None), &bad, &mut piece, 2 * BLOCK).is_err());
    }

    #[test]
    fn sums_round_trip() {
        for n in [1, 2, 17] {
            let s = sample(n);
            assert_eq!(Sums::decode(&s.encode()).unwrap(), s);
        }
    }

    #[test]
    fn damaged_sums_are_refused() {
        let bytes = sample(4).encode();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(Sums::decode(&b).is_err(), "flip at {i} accepted");
        }
        assert!(Sums::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic_the_sums_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Sums::decode(&bytes);
            let mut head = sample(2).encode();
            head.truncate(HEAD);
            head.extend_from_slice(&bytes);
            let _ = Sums::decode(&head);
        }
    }
}
