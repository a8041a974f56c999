//! blksync: make a block device or disk image identical to another, moving only what differs.
//!
//! The crate is the whole engine; the `blksync` binary is a thin front end over it.
//!
//! - [`endpoint`]: where bytes live ([`endpoint::Source`], [`endpoint::Target`]) and the local
//!   file/block-device implementation.
//! - [`sync`](mod@sync) and [`compare`](mod@compare): the operations.
//! - [`sizing`]: what happens when the two sides differ in size.
//! - [`progress`]: counters, observers and cancellation.
//! - [`error`]: typed errors with path, offset and an exit code.
//!
//! ```no_run
//! use std::path::Path;
//! use std::sync::atomic::AtomicBool;
//! use blksync::progress::{Control, Silent};
//! use blksync::sync::{sync_paths, SyncOptions};
//!
//! let cancel = AtomicBool::new(false);
//! let control = Control { observer: &Silent, cancel: &cancel };
//! let summary = sync_paths(Path::new("vm.img"), Path::new("/dev/vg/backup"), &SyncOptions::default(), control)?;
//! println!("{} bytes written", summary.counters.bytes_written);
//! # Ok::<(), blksync::Error>(())
//! ```

pub mod agent;
pub mod backup;
pub mod chain;
pub mod compare;
pub mod compress;
pub mod delta;
pub mod endpoint;
mod engine;
pub mod error;
pub mod extent;
pub mod fingerprint;
pub mod hash;
pub mod id;
pub mod job;
pub mod link;
pub mod location;
pub mod patch;
pub mod peer;
pub mod place;
pub mod progress;
pub mod protocol;
pub mod prune;
pub mod record;
pub mod relay;
pub mod size;
pub mod sizing;
pub mod ssh;
pub mod sums;
pub mod sync;
pub mod temp;
pub mod throttle;
pub mod zero;

pub use error::{Error, ErrorKind, Hint, Result};
