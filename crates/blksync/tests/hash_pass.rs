//! The hash pass (docs/PROTOCOL.md, "The sync algorithm") between two peers of this process,
//! so that it is tested without root, ssh or sshd.
//!
//! `relay::sync_locations` and `relay::compare_locations` given two local locations connect
//! each through [`blksync::link::Link::local`], a peer served by a thread, and run the same
//! pass as between two hosts: summaries, group and leaf hashes, reads, writes and zeros cross
//! the links as messages. Every sync here verifies (a second, comparing pass) and the files are
//! then compared byte for byte.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use blksync::compare::Comparison;
use blksync::location::Location;
use blksync::progress::{Control, Silent};
use blksync::relay::{RemoteOptions, Side, compare_locations, sync_locations};
use blksync::ssh::SshOptions;
use blksync::sync::{Summary, SyncOptions};
use proptest::prelude::*;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// Every block size the pass takes, smallest to largest.
const BLOCK_SIZES: [usize; 5] = [512, 4 * KIB, 64 * KIB, 256 * KIB, MIB];

/// Deterministic pseudo-random bytes (xorshift64*).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// An image on disk: `data`, with the all-zero stretches listed in `holes` left unwritten
/// (holes of a sparse file, where the filesystem has them).
fn write_image(path: &Path, data: &[u8], holes: &[(usize, usize)]) {
    let file = std::fs::File::create(path).unwrap();
    file.set_len(data.len() as u64).unwrap();
    let mut pos = 0;
    for &(start, end) in holes.iter().chain(std::iter::once(&(data.len(), data.len()))) {
        assert!(data[start..end].iter().all(|&b| b == 0), "a hole holds zeros");
        if start > pos {
            file.write_all_at(&data[pos..start], pos as u64).unwrap();
        }
        pos = pos.max(end);
    }
}

fn options(block_size: usize) -> RemoteOptions {
    RemoteOptions {
        sync: SyncOptions { block_size, verify: true, threads: 2, ..SyncOptions::default() },
        compress: blksync::compress::AUTO,
        pause: None,
        undo: None,
    }
}

/// Syncs `src` onto `dst` through two in-process peers.
fn sync_through_links(src: &Path, dst: &Path, options: &RemoteOptions) -> Summary {
    let cancel = AtomicBool::new(false);
    let control = Control { observer: &Silent, cancel: &cancel };
    let ssh = SshOptions::default();
    let (a, b) = (Location::Local(src.to_path_buf()), Location::Local(dst.to_path_buf()));
    sync_locations(&Side { location: &a, ssh: &ssh }, &Side { location: &b, ssh: &ssh }, options, control)
        .unwrap_or_else(|e| panic!("sync {} → {}: {e}", src.display(), dst.display()))
}

/// Compares `a` with `b` through two in-process peers.
fn compare_through_links(a: &Path, b: &Path, block_size: usize) -> Comparison {
    let cancel = AtomicBool::new(false);
    let control = Control { observer: &Silent, cancel: &cancel };
    let ssh = SshOptions::default();
    let (x, y) = (Location::Local(a.to_path_buf()), Location::Local(b.to_path_buf()));
    let options = blksync::compare::CompareOptions {
        block_size,
        keep_cache: false,
        threads: 0,
        max_ranges: 1000,
        fs_aware: false,
    };
    compare_locations(&Side { location: &x, ssh: &ssh }, &Side { location: &y, ssh: &ssh }, &options, control)
        .unwrap_or_else(|e| panic!("compare {} {}: {e}", a.display(), b.display()))
}

/// The bytes of the blocks of `block` bytes where `a` and `b` (of one size) differ.
fn differing_bytes(a: &[u8], b: &[u8], block: usize) -> u64 {
    a.chunks(block).zip(b.chunks(block)).filter(|(x, y)| x != y).map(|(x, _)| x.len() as u64).sum()
}

#[track_caller]
fn assert_same_bytes(path: &Path, expected: &[u8]) {
    let got = std::fs::read(path).unwrap();
    assert_eq!(got.len(), expected.len(), "{}: size", path.display());
    if let Some(i) = got.iter().zip(expected).position(|(a, b)| a != b) {
        panic!("{}: differs first at byte {i}", path.display());
    }
}

/// A source image and an older copy of it: random data with holes and zero runs, and the copy
/// with scattered changes (single bytes, blocks, runs across block and chunk boundaries), some
/// of them where the source now has zeros, and of another size.
struct Pair {
    source: Vec<u8>,
    source_holes: Vec<(usize, usize)>,
    target: Vec<u8>,
}

fn pair(size: usize, target_size: usize, seed: u64) -> Pair {
    let mut source = random_bytes(size, seed);
    // Holes (unwritten) and zero runs (written zeros), some on chunk boundaries.
    let source_holes: Vec<(usize, usize)> =
        [(0, 8 * KIB), (MIB - 4 * KIB, MIB + 300 * KIB), (3 * MIB + 17, 3 * MIB + 70_000)]
            .into_iter()
            .filter(|&(_, end)| end <= size)
            .collect();
    for &(start, end) in &source_holes {
        source[start..end].fill(0);
    }
    for (start, len) in [(200 * KIB + 3, 5000), (2 * MIB - 100, 200), (2 * MIB + 512, 64 * KIB)] {
        if start + len <= size {
            source[start..start + len].fill(0);
        }
    }
    let mut target = source.clone();
    target.resize(target_size, 0);
    let changes = random_bytes(target_size, seed + 1000);
    // Scattered changes of every width, and data where the source has holes or zeros.
    for (i, len) in [1, 3, 511, 513, 4 * KIB, 100 * KIB, 700 * KIB].into_iter().enumerate() {
        let start = (i * 654_321 + 77) % target_size.max(1);
        let end = (start + len).min(target_size);
        target[start..end].copy_from_slice(&changes[start..end]);
    }
    for &(start, end) in source_holes.iter().take(2) {
        let end = end.min(target_size);
        if start < end {
            let mid = start + (end - start) / 2;
            target[start..mid].copy_from_slice(&changes[start..mid]);
        }
    }
    // Past the source's end, a larger copy holds data to be cut off.
    if target_size > size {
        target[size..].copy_from_slice(&changes[size..]);
    }
    Pair { source, source_holes, target }
}

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        Dir { dir: tempfile::Builder::new().prefix("blksync-hash-pass").tempdir().unwrap() }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

#[test]
fn scattered_changes_holes_and_zero_runs_sync_byte_identical_at_every_block_size() {
    let dir = Dir::new();
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let size = 5 * MIB + 1234;
    for (n, &block) in BLOCK_SIZES.iter().enumerate() {
        let p = pair(size, size, n as u64 + 1);
        write_image(&src, &p.source, &p.source_holes);
        write_image(&dst, &p.target, &[]);
        let summary = sync_through_links(&src, &dst, &options(block));
        assert_same_bytes(&dst, &p.source);
        assert!(summary.verified, "block {block}: verified");
        // Only the blocks that differ move.
        let moved = summary.counters.bytes_written + summary.counters.bytes_zeroed;
        let differing = differing_bytes(&p.source, &p.target, block);
        assert!(moved > 0 && moved <= differing, "block {block}: {moved} bytes written or zeroed, {differing} differ");
        // And once in sync, nothing at all.
        let again = sync_through_links(&src, &dst, &options(block));
        assert_eq!(again.counters.bytes_written + again.counters.bytes_zeroed, 0, "block {block}: a rerun");
        assert_same_bytes(&dst, &p.source);
    }
}

#[test]
fn a_larger_copy_shrinks_and_a_smaller_one_grows_to_the_source() {
    let dir = Dir::new();
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let size = 3 * MIB + 4321;
    for (n, target_size) in [size + 2 * MIB + 5, size - MIB - 999, 1, size + 1].into_iter().enumerate() {
        let block = BLOCK_SIZES[n % BLOCK_SIZES.len()];
        let p = pair(size, target_size, 40 + n as u64);
        write_image(&src, &p.source, &p.source_holes);
        write_image(&dst, &p.target, &[]);
        let summary = sync_through_links(&src, &dst, &options(block));
        assert_eq!(summary.destination_size_before, target_size as u64);
        assert_eq!(summary.destination_size_after, size as u64);
        assert_same_bytes(&dst, &p.source);
    }
}

#[test]
fn a_new_copy_is_byte_identical_and_keeps_the_holes() {
    let dir = Dir::new();
    let src = dir.path("src.img");
    let size = 4 * MIB + 100;
    let p = pair(size, size, 70);
    write_image(&src, &p.source, &p.source_holes);
    for block in [512, MIB] {
        let dst = dir.path(&format!("new-{block}.img"));
        sync_through_links(&src, &dst, &options(block));
        assert_same_bytes(&dst, &p.source);
        let allocated = |path: &Path| std::fs::metadata(path).unwrap().blocks() * 512;
        if allocated(&src) < size as u64 {
            // This filesystem has holes: the copy's zeros are holes too, not written.
            assert!(allocated(&dst) < size as u64, "block {block}: the new copy is sparse");
        }
    }
}

/// A huge sparse image crosses the hash pass by its allocation map: a hole is neither read nor
/// hashed on either side, and a run of them is one message. One summary per hole chunk (as
/// before protocol version 5) took minutes for a terabyte of holes.
#[test]
fn a_huge_sparse_image_syncs_by_its_allocation_map_on_both_sides() {
    let dir = Dir::new();
    let size = 1u64 << 40;
    let src = dir.path("src.img");
    let data = random_bytes(MIB, 71);
    let file = std::fs::File::create(&src).unwrap();
    file.set_len(size).unwrap();
    file.write_all_at(&data, size / 3).unwrap();
    file.write_all_at(b"end", size - 3).unwrap();
    let allocated = |path: &Path| std::fs::metadata(path).unwrap().blocks() * 512;
    if allocated(&src) > 64 * MIB as u64 {
        eprintln!("skipping: this filesystem has no holes");
        return;
    }
    let read_back = |path: &Path, offset: u64, len: usize| {
        let mut buf = vec![0; len];
        std::fs::File::open(path).unwrap().read_exact_at(&mut buf, offset).unwrap();
        buf
    };
    // A new copy, then a sparse target with data of its own where the source has holes.
    let copy = dir.path("copy.img");
    let other = dir.path("other.img");
    let file = std::fs::File::create(&other).unwrap();
    file.set_len(size).unwrap();
    file.write_all_at(&random_bytes(MIB, 72), size / 2).unwrap();
    file.write_all_at(&random_bytes(4096, 73), size / 3).unwrap();
    for dst in [&copy, &other] {
        let summary = sync_through_links(&src, dst, &options(64 * KIB));
        assert!(summary.verified);
        assert_eq!(summary.counters.bytes_scanned, size);
        assert!(summary.counters.bytes_read_source <= 2 * 2 * MIB as u64, "{:?}", summary.counters);
        assert!(summary.counters.bytes_read_destination <= 2 * 3 * MIB as u64, "{:?}", summary.counters);
        assert_eq!(read_back(dst, size / 3, MIB), data);
        assert_eq!(read_back(dst, size - 3, 3), b"end");
        assert!(read_back(dst, size / 2, MIB).iter().all(|&b| b == 0), "the target's own data went");
        assert!(allocated(dst) < 64 * MIB as u64, "{} stays sparse", dst.display());
    }
}

#[test]
fn compare_through_two_peers_finds_exactly_the_differing_blocks() {
    let dir = Dir::new();
    let (a, b) = (dir.path("a.img"), dir.path("b.img"));
    let data = random_bytes(3 * MIB, 90);
    write_image(&a, &data, &[]);
    let mut other = data.clone();
    other[MIB + 10] ^= 1;
    other[2 * MIB..2 * MIB + 5000].fill(0);
    write_image(&b, &other, &[]);
    let c = compare_through_links(&a, &b, 4096);
    assert!(!c.identical);
    let ranges: Vec<(u64, u64)> = c.ranges.iter().map(|r| (r.offset, r.len)).collect();
    assert_eq!(ranges, [(MIB as u64, 4096), (2 * MIB as u64, 8192)]);
    assert!(compare_through_links(&a, &a, 512).identical);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Small random images, related or not, of any sizes: the copy always ends byte-identical.
    #[test]
    fn small_random_images_always_end_byte_identical(
        base in proptest::collection::vec(prop_oneof![3 => Just(0u8), 1 => any::<u8>()], 0..40_000),
        edits in proptest::collection::vec((0usize..40_000, 1usize..3000, any::<u8>()), 0..8),
        target_len in 0usize..45_000,
        zero_runs in proptest::collection::vec((0usize..40_000, 1usize..5000), 0..4),
        block_shift in 9u32..14,
        fresh in any::<bool>(),
    ) {
        let dir = Dir::new();
        let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
        let mut source = base.clone();
        for (start, len) in zero_runs {
            let end = (start + len).min(source.len());
            if start < end {
                source[start..end].fill(0);
            }
        }
        let mut target = base;
        target.resize(target_len, 0xa5);
        for (start, len, byte) in edits {
            let end = (start + len).min(target.len());
            if start < end {
                target[start..end].fill(byte);
            }
        }
        write_image(&src, &source, &[]);
        if !fresh {
            write_image(&dst, &target, &[]);
        }
        let summary = sync_through_links(&src, &dst, &options(1 << block_shift));
        prop_assert!(summary.verified);
        let got = std::fs::read(&dst).unwrap();
        prop_assert_eq!(got.len(), source.len());
        prop_assert!(got == source, "differs first at byte {:?}", got.iter().zip(&source).position(|(a, b)| a != b));
    }
}
