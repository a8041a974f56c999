//! Fuzzes the decoder of `Job` requests (JSON from the client, docs/PROTOCOL.md "Jobs"): any
//! bytes give a job or an error, never a panic; a decoded job re-encodes to the same job.
//!
//! Run: `cargo +nightly fuzz run job_request` (from the repository root).

#![no_main]

use blksync::job::Job;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(job) = Job::decode(data) {
        assert_eq!(Job::decode(&job.encode()).expect("re-decode"), job);
    }
});
