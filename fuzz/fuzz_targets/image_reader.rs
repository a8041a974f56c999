//! Fuzzes the compressed image reader: any file must open as a valid image (and its first
//! chunks read or fail with an error) or be refused, never a panic or an allocation beyond the
//! limits of docs/COMPRESSED-IMAGE.md.
//!
//! Each input is tried as it is and with its header and index checksums fixed up
//! (`blksync_image::fix_checksums`), so mutations reach the header's fields, the index entries,
//! the overlap checks and the chunk decoder instead of stopping at a hash.
//!
//! Run: `cargo +nightly fuzz run image_reader -- -max_len=70000` (from `fuzz/`; the
//! seed `BLKSYNC_IMAGE_SEEDS=$PWD/fuzz/corpus/image_reader cargo test -p blksync-image --test
//! image random_and` writes is a valid 66 KB image).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blksync_image::exercise(data);
});
