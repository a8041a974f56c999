//! Fuzzes what the NBD server decodes and checks (`blksync_nbd::server`): any bytes as a
//! request header (its check against limits taken from the input: a command that passes must
//! lie inside the export, be aligned and within the maximum payload; a refusal must carry an
//! error), and as every option and transmission message of `blksync_nbd::wire`. Never a panic
//! or an allocation beyond the bounds of docs/NBD.md ("Hostile clients").
//!
//! Run: `cargo +nightly fuzz run nbd_server` (from the repository root).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blksync_nbd::server::exercise_decoders(data);
});
