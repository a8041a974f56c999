//! Fuzzes the delta reader: any file must open as a valid delta or give an error, never a panic
//! or an allocation beyond the limits of docs/DELTA-FORMAT.md.
//!
//! Run: `cargo +nightly fuzz run delta_reader` (from the repository root).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("blksync-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("input.delta");
    if std::fs::write(&path, data).is_ok() {
        if let Ok(delta) = blksync::delta::Delta::open(&path) {
            for entry in &delta.index {
                let _ = delta.read(entry);
            }
        }
    }
});
