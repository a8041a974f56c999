//! Fuzzes the compressed image reader: any file must open as a valid image (and its first
//! chunks read or fail with an error) or be refused, never a panic or an allocation beyond the
//! limits of docs/COMPRESSED-IMAGE.md.
//!
//! Each input is tried as it is and with its header, index and patch table checksums fixed up
//! (`blksync_image::fix_checksums`), so mutations reach the header's fields, the index entries,
//! the patch table, the overlap checks, the chunk decoder and the patch record decoder instead
//! of stopping at a hash.
//!
//! Run: `cargo +nightly fuzz run image_reader -- -max_len=70000` (from `fuzz/`; the
//! seed `BLKSYNC_IMAGE_SEEDS=$PWD/fuzz/corpus/image_reader cargo test -p blksync-image --test
//! image random_and` writes are valid images: `valid.bsz`, 66 KB, and `patched.bsz`, with
//! patch records).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blksync_image::exercise(data);
});
