//! The engine (`blksync::sync::sync`) with a compressed image (the `blksync-image` crate) as
//! its destination: a first sync into an empty image, then an update that rewrites only the
//! chunks it changes.

use blksync::endpoint::{Source, Target};
use blksync_image::{Image, Options};

/// xorshift64* from `seed`: a failure replays exactly.
fn numbers(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// `len` bytes: random for an odd `kind`, text-like (compressible) for an even one.
fn data(kind: u64, seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&[u8]; 8] = [b"block ", b"sync ", b"chunk ", b"zstd ", b"image ", b"hole ", b"disk ", b"\n"];
    let mut next = numbers(seed);
    if kind % 2 == 1 {
        return (0..len).map(|_| next() as u8).collect();
    }
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(WORDS[(next() % 8) as usize]);
    }
    out.truncate(len);
    out
}

fn read_all(image: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; image.size() as usize];
    image.read_at(&mut buf, 0).unwrap();
    buf
}

/// The real engine syncs a source with holes into a new, empty image (resizing it), and a
/// second sync after 5 % of the source's 4 KiB blocks changed rewrites each changed chunk once;
/// both verify, and the image reads back as the source after reopening.
#[test]
fn the_engine_syncs_into_an_image_and_then_updates_only_changed_chunks() {
    use blksync::endpoint::memory::Memory;
    use blksync::progress::{Control, Silent};
    use blksync::sync::{SyncOptions, sync};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.bsz");
    let mib = 1u64 << 20;
    let size = 24 * mib + 12_345;
    let src = Memory::new("src", size).reports_holes(true);
    for k in 0..size / mib {
        if k % 5 != 4 {
            src.write_at(&data(1 + k % 2, k, mib as usize), k * mib).unwrap();
        }
    }
    src.write_at(&data(2, 99, 12_345), 24 * mib).unwrap();
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let control = Control { observer: &Silent, cancel: &cancel };
    let options = SyncOptions { verify: true, threads: 2, ..SyncOptions::default() };
    let image = Image::create(&path, 0, Options::default()).unwrap();
    let summary = sync(&src, &image, true, &options, control).unwrap();
    assert!(summary.verified);
    assert_eq!(image.size(), size);
    drop(image);
    let image = Image::open(&path, false).unwrap();
    assert!(read_all(&image) == src.contents());
    assert_eq!(image.usage().zero_chunks, 4, "the source's holes");
    drop(image);

    let mut next = numbers(3);
    let mut touched = std::collections::BTreeSet::new();
    for _ in 0..(size / 4096) / 20 {
        let block = next() % (size / 4096);
        src.write_at(&data(1, next(), 4096), block * 4096).unwrap();
        touched.insert(block * 4096 / mib);
    }
    let image = Image::open(&path, true).unwrap();
    let summary = sync(&src, &image, false, &options, control).unwrap();
    assert!(summary.verified);
    assert_eq!(image.stats().chunks_stored, touched.len() as u64, "each changed chunk rewritten once");
    drop(image);
    let image = Image::open(&path, false).unwrap();
    assert!(read_all(&image) == src.contents());
}
