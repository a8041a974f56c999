//! Fuzzes the delta reader: any file must open as a valid delta or give an error, never a panic
//! or an allocation beyond the limits of docs/DELTA-FORMAT.md.
//!
//! The header checksum is fixed up before each run, and the file is opened by structure
//! (`Delta::open_index`, which does not check the whole-file hash), so mutations reach the
//! header fields, the footer, the index and every record instead of stopping at a checksum.
//!
//! Run: `cargo +nightly fuzz run delta_reader` (from the repository root).

#![no_main]

use libfuzzer_sys::fuzz_target;

/// Writes the right header checksum after the header, when the input is long enough to hold one.
fn fix_header_hash(bytes: &mut [u8]) {
    let Some(len) = bytes.get(20..24) else { return };
    let end = 24 + u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if end.checked_add(32).is_some_and(|e| e <= bytes.len()) {
        let hash = blake3::hash(&bytes[..end]);
        bytes[end..end + 32].copy_from_slice(hash.as_bytes());
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("blksync-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("input.delta");
    let mut bytes = data.to_vec();
    fix_header_hash(&mut bytes);
    if std::fs::write(&path, &bytes).is_ok() {
        if let Ok(delta) = blksync::delta::Delta::open_index(&path) {
            for entry in &delta.index {
                let _ = delta.read(entry);
            }
            let _ = delta.verify();
        }
    }
});
