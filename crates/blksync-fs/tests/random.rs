//! Random inputs: mutated small ext4 images (superblock, descriptors, bitmaps) and random
//! bytes never make `probe` or `state_at` panic, loop, or allocate much more than the image.
//!
//! A binary of its own because it counts allocations with a global allocator, which must see
//! only this test's.

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

/// Runs `exercise` on what `make` gives, one test at a time, so the largest allocation seen is
/// its own.
fn check(make: impl FnOnce() -> Vec<u8>) {
    static ONE: Mutex<()> = Mutex::new(());
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
