//! Fuzzes the NBD client's decoders (`blksync_nbd::wire`): any bytes must decode to a message
//! or give an error, never a panic or an allocation beyond the bounds of docs/NBD.md ("Limits
//! against a hostile server"), and whatever decodes must encode back to a message that decodes
//! to the same value.
//!
//! Run: `cargo +nightly fuzz run nbd_decoders` (from the repository root).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blksync_nbd::wire::exercise_decoders(data);
});
