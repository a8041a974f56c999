//! Fuzzes the used-block reader of blksync-fs: any bytes must probe as a filesystem whose map
//! tiles the input (every run moving forward and staying inside it) or as "copy whole", never a
//! panic or an allocation beyond the limits of docs/FILESYSTEMS.md.
//!
//! Each input is tried as it is and with its ext superblock and group descriptor checksums
//! fixed up (`blksync_fs::fix_checksums`), so mutations reach the geometry, the descriptor
//! checks and the bitmaps instead of stopping at a checksum.
//!
//! Run: `cargo +nightly fuzz run ext_reader -- -max_len=1100000` (from `fuzz/`; a seed is any
//! small image, for example `truncate -s 1M a.img && mke2fs -t ext4 -b 1024 -g 256 -N 64 a.img`
//! copied into `fuzz/corpus/ext_reader/`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blksync_fs::exercise(data);
});
