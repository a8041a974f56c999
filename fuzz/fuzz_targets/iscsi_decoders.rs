//! Fuzzes the iSCSI initiator's decoders (`blksync_iscsi::pdu`, `text`, `scsi`): any bytes must
//! decode to PDUs, keys and SCSI data or give an error, never a panic or an allocation beyond
//! the bounds of docs/ISCSI.md ("Limits against a hostile target"), and whatever decodes must
//! encode back to itself.
//!
//! Run: `cargo +nightly fuzz run iscsi_decoders` (from the repository root).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blksync_iscsi::pdu::exercise_decoders(data);
});
