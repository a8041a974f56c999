//! Random inputs: mutated small ext4 images (superblock, descriptors, bitmaps), mutated
//! journals that need recovery, and random bytes never make `probe` or `state_at` panic, loop,
//! or allocate much more than the image. A mutated journal the map is given for (not copied
//! whole) covers what e2fsprogs' own replay of it leaves used.
//!
//! A binary of its own because it counts allocations with a global allocator, which must see
//! only this test's.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use proptest::prelude::*;

/// The largest single allocation so far.
static LARGEST: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: forwards to the system allocator; only records the largest size asked for.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Small ext4 images: 1 KiB blocks with `meta_bg` and `BLOCK_UNINIT` groups, and 4 KiB blocks in
/// four groups of the normal layout.
fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let make = |name: &str, args: &[&str], size: &str| {
            let path = dir.path().join(name);
            let status = Command::new("mke2fs")
                .args(["-F", "-q", "-t", "ext4"])
                .args(args)
                .arg(&path)
                .arg(size)
                .status()
                .unwrap();
            assert!(status.success());
            std::fs::read(Path::new(&path)).unwrap()
        };
        vec![
            make("a.img", &["-b", "1024", "-g", "256", "-N", "64"], "1M"),
            make("b.img", &["-b", "4096", "-g", "256", "-N", "64", "-O", "^resize_inode"], "4M"),
        ]
    })
}

/// Small images whose journal needs recovery, written by debugfs, with the byte offset of the
/// journal's first block: ext4 (1 KiB blocks, 64bit, checksum v3) and ext3 (1 KiB blocks,
/// 32-bit, no checksums), each with a transaction that allocates and frees (a file written, a
/// directory made, a file removed: bitmaps, descriptors, superblock, inodes), one that revokes
/// a block, and one left uncommitted.
fn journal_seeds() -> &'static [(Vec<u8>, usize)] {
    static SEEDS: OnceLock<Vec<(Vec<u8>, usize)>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, support::Rng::new(3).bytes(40_000)).unwrap();
        let make = |name: &str, args: &[&str], open: &str| {
            let path = dir.path().join(name);
            let status = Command::new("mke2fs")
                .args(["-F", "-q", "-b", "1024"])
                .args(args)
                .arg(&path)
                .arg("2M")
                .status()
                .unwrap();
            assert!(status.success());
            support::debugfs(&path, &format!("write {} old\nmkdir d\n", file.display()), true);
            let target = support::copy_of(&path, dir.path(), "target.img");
            support::debugfs(&target, &format!("write {} new\nmkdir e\nrm old\n", file.display()), true);
            let (a, b) = (std::fs::read(&path).unwrap(), std::fs::read(&target).unwrap());
            let blocks: Vec<usize> =
                (0..a.len() / 1024).filter(|&i| a[i * 1024..(i + 1) * 1024] != b[i * 1024..(i + 1) * 1024]).collect();
            let list = blocks.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
            let data: Vec<u8> = blocks.iter().flat_map(|&i| b[i * 1024..(i + 1) * 1024].to_vec()).collect();
            let dat = dir.path().join("blocks.dat");
            std::fs::write(&dat, data).unwrap();
            let cmds = format!(
                "{open}\njw -b {list} {dat}\njw -r {}\njw -c -b {} {dat}\njc\n",
                blocks[blocks.len() / 2],
                blocks[0],
                dat = dat.display()
            );
            support::debugfs(&path, &cmds, true);
            let at = support::debugfs(&path, "bmap <8> 0\n", false);
            let journal: usize = at.lines().filter_map(|l| l.trim().parse().ok()).next_back().unwrap();
            (std::fs::read(&path).unwrap(), journal * 1024)
        };
        vec![
            make("j4.img", &["-t", "ext4", "-N", "64"], "jo -c"),
            make("j3.img", &["-t", "ext3", "-N", "64", "-O", "^resize_inode"], "jo"),
        ]
    })
}

/// A journal seed with `edits` made in its first journal blocks (`at` modulo 8 KiB from the
/// journal's start) or, for `at` past 24 KiB, in the filesystem's first 24 KiB.
fn mutated_journal(seed: usize, edits: &[(usize, u8)]) -> Vec<u8> {
    let (image, journal) = &journal_seeds()[seed];
    let mut data = image.clone();
    for &(at, byte) in edits {
        let at = if at < 8192 { journal + at } else { (at - 8192) % 24576 };
        data[at] = byte;
    }
    data
}

/// One test at a time, so that the largest allocation seen is its own.
static ONE: Mutex<()> = Mutex::new(());

/// Runs `exercise` on what `make` gives, alone.
fn check(make: impl FnOnce() -> Vec<u8>) {
    let _one = ONE.lock().unwrap_or_else(PoisonError::into_inner);
    let data = make();
    LARGEST.store(0, Ordering::Relaxed);
    blksync_fs::exercise(&data);
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest <= 2 * data.len() + (1 << 20), "an allocation of {largest} bytes for {} bytes", data.len());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn mutated_ext4_images_never_panic(
        seed in 0..2usize,
        edits in proptest::collection::vec((0..24576usize, any::<u8>()), 1..24),
    ) {
        check(|| {
            let mut data = seeds()[seed].clone();
            let n = data.len();
            for (at, byte) in edits {
                data[at % n] = byte;
            }
            data
        });
    }

    #[test]
    fn mutated_journals_never_panic(
        seed in 0..2usize,
        edits in proptest::collection::vec((0..16384usize, any::<u8>()), 1..16),
    ) {
        check(|| mutated_journal(seed, &edits));
    }

    #[test]
    fn random_bytes_with_an_ext_magic_never_panic(
        mut data in proptest::collection::vec(any::<u8>(), 0..65536),
        magic in any::<bool>(),
    ) {
        if magic && data.len() >= 2048 {
            data[1080] = 0x53;
            data[1081] = 0xEF;
        }
        check(|| data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn mutated_journals_the_map_is_given_for_cover_what_e2fsprogs_replays(
        seed in 0..2usize,
        edits in proptest::collection::vec((0..8192usize, any::<u8>()), 1..6),
    ) {
        covers_replay(|| mutated_journal(seed, &edits));
    }
}

#[test]
fn unmutated_journal_seeds_are_read_and_cover_their_replay() {
    for seed in 0..2 {
        assert!(covers_replay(|| journal_seeds()[seed].0.clone()), "seed {seed} is copied whole");
    }
}

/// When the map of what `make` gives (a whole filesystem) is given, checks that its used blocks
/// include every block dumpe2fs finds used after debugfs replays the journal of a copy (when
/// e2fsprogs can). Whether the map was given.
fn covers_replay(make: impl FnOnce() -> Vec<u8>) -> bool {
    let _one = ONE.lock().unwrap_or_else(PoisonError::into_inner);
    let data: &[u8] = &make();
    let source = blksync_core::endpoint::memory::Memory::with_bytes("journal.img", data.to_vec());
    let Ok(blksync_fs::Usage::Known(map)) = blksync_fs::probe(&source, 0, data.len() as u64) else { return false };
    let runs = support::runs(&map, &source);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.img");
    std::fs::write(&path, data).unwrap();
    let _ = Command::new("debugfs").args(["-w", "-R", "jr"]).arg(&path).output().unwrap();
    let lab = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/lab/e2used.py");
    let lab = if lab.exists() { lab } else { std::path::PathBuf::from("/work/shared/lab/e2used.py") };
    let header = Command::new("dumpe2fs").arg("-h").arg(&path).output().unwrap();
    let out = Command::new("python3").arg(&lab).arg(&path).output().unwrap();
    if !header.status.success()
        || String::from_utf8_lossy(&header.stdout).contains("needs_recovery")
        || !out.status.success()
    {
        // e2fsprogs could not replay it, or cannot read what it replayed.
        return true;
    }
    let blksync_fs::Kind::Ext { block_size, .. } = map.kind() else { return false };
    let bs = u64::from(*block_size);
    let ours = support::block_set(&support::used_blocks(&runs, bs, data.len() as u64 / bs));
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut it = line.split_whitespace().map(|n| n.parse::<u64>().unwrap());
        let (start, len) = (it.next().unwrap(), it.next().unwrap());
        // dumpe2fs lists a last group's padding bits that are clear as free blocks past the
        // end, so e2used.py may call the block at the end used: only blocks inside count.
        let end = (start + len).min(data.len() as u64 / bs);
        let missing: Vec<u64> = (start..end).filter(|b| !ours.contains(b)).take(10).collect();
        assert!(missing.is_empty(), "used after e2fsprogs' replay, free in the map: {missing:?}");
    }
    true
}
