//! Every buffer the engine reads image data into starts on a page boundary (issue 13): on the
//! CPUs we measure on, a `pread` into memory 8 or 16 bytes past a 64-byte boundary runs about
//! five times slower, and `vec![0; 2 MiB]` lands exactly there. This proves the alignment, so
//! that it cannot silently regress.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use blksync::buffer::is_aligned;
use blksync::endpoint::memory::Memory;
use blksync::endpoint::{Caps, Identity, Segment, Source, Target};
use blksync::progress::{Control, Silent};
use blksync::sync::SyncOptions;

/// An endpoint that counts the reads it was given a misaligned buffer for.
struct Probe {
    inner: Memory,
    reads: AtomicU64,
    misaligned: AtomicU64,
}

impl Probe {
    fn new(inner: Memory) -> Probe {
        Probe { inner, reads: AtomicU64::new(0), misaligned: AtomicU64::new(0) }
    }
}

impl Source for Probe {
    fn name(&self) -> &Path {
        self.inner.name()
    }
    fn caps(&self) -> Caps {
        self.inner.caps()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blksync::Result<()> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        if !is_aligned(buf) {
            self.misaligned.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.read_at(buf, offset)
    }
    fn segment_at(&self, offset: u64) -> blksync::Result<Segment> {
        self.inner.segment_at(offset)
    }
    fn drop_cache(&self, offset: u64, len: u64) {
        self.inner.drop_cache(offset, len);
    }
    fn identity(&self) -> Identity {
        Identity::None
    }
}

impl Target for Probe {
    fn write_at(&self, buf: &[u8], offset: u64) -> blksync::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn zero(&self, offset: u64, len: u64) -> blksync::Result<()> {
        self.inner.zero(offset, len)
    }
    fn set_size(&self, size: u64) -> blksync::Result<()> {
        self.inner.set_size(size)
    }
    fn flush(&self) -> blksync::Result<()> {
        self.inner.flush()
    }
}

#[test]
fn the_engine_reads_both_sides_into_page_aligned_buffers() {
    let size: u64 = 9 << 20;
    let bytes: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    let mut other = bytes.clone();
    other[5 << 20] ^= 1;
    let (src, dst) = (Probe::new(Memory::with_bytes("src", bytes)), Probe::new(Memory::with_bytes("dst", other)));
    let cancel = AtomicBool::new(false);
    let control = Control { observer: &Silent, cancel: &cancel };
    let options = SyncOptions { threads: 3, verify: true, ..SyncOptions::default() };
    blksync::sync::sync(&src, &dst, false, &options, control).unwrap();
    for (side, p) in [("source", &src), ("destination", &dst)] {
        let reads = p.reads.load(Ordering::Relaxed);
        assert!(reads >= 5, "{side}: {reads} reads");
        assert_eq!(p.misaligned.load(Ordering::Relaxed), 0, "{side}: misaligned reads out of {reads}");
    }
}
