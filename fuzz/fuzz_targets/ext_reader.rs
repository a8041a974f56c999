//! Fuzzes the used-block reader of blksync-fs: any bytes must probe as a filesystem whose map
//! tiles the input (every run moving forward and staying inside it) or as "copy whole", never a
//! panic or an allocation beyond the limits of docs/FILESYSTEMS.md.
//!
//! Each input is tried as it is and with its ext superblock and group descriptor checksums
//! fixed up (`blksync_fs::fix_checksums`), so mutations reach the geometry, the descriptor
//! checks and the bitmaps instead of stopping at a checksum.
//!
//! A filesystem whose journal needs recovery takes the journal reader's paths too (the journal
//! inode's extent tree or block pointers, the journal superblock, descriptor, commit and revoke
//! blocks, the overlay). A journal's own checksums are not fixed up: a seed without them
//! (ext3, or ext4 without metadata_csum) lets mutations reach the log's parser.
//!
//! Run: `cargo +nightly fuzz run ext_reader -- -max_len=2200000` (from `fuzz/`; a seed is any
//! small image, for example `truncate -s 1M a.img && mke2fs -t ext4 -b 1024 -g 256 -N 64 a.img`
//! copied into `fuzz/corpus/ext_reader/`; with a journal to replay:
//! `mke2fs -t ext3 -b 1024 -N 64 j.img 2M`, then `debugfs -w j.img` with `jo`, `jw -b 3,4 FILE`,
//! `jw -r 4`, `jc`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blksync_fs::exercise(data);
});
