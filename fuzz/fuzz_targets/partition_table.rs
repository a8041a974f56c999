//! Fuzzes the partition table reader: any disk must read as a table (DOS or GPT), as no table,
//! or fail with an error, never a panic or an allocation beyond the limits of
//! docs/PARTITIONS.md (entry arrays ≤ 1 MiB, ≤ 128 EBRs); and every GPT found must relocate to
//! other sizes into a table that reads back with the same partitions.
//!
//! Each input is tried as it is and with its GPT header and entry array checksums fixed up
//! (`blksync_disk::gpt::fix_checksums`), so mutations reach the fields behind the CRCs.
//!
//! Run: `cargo +nightly fuzz run partition_table -- -max_len=65536` (from `fuzz/`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blksync_disk::exercise(data);
});
