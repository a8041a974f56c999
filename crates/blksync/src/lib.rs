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
pub mod clone;
pub mod compare;
pub mod compress;
mod engine;
pub mod estimate;
pub mod hash;
pub mod job;
pub mod link;
pub mod overlay;
pub mod patch;
pub mod peer;
pub mod place;
pub mod protocol;
pub mod relay;
pub mod serve;
pub mod sizing;
pub mod ssh;
pub mod sync;
mod transfer;
mod write_behind;

pub use blksync_core::{
    buffer, chain_files, error, extent, fingerprint, id, location, progress, size, temp, throttle, zero,
};
pub use blksync_history::{chain, delta, prune, record, sums};
pub use error::{Error, ErrorKind, Hint, Result};

/// Endpoints: the seam (`Source`, `Target`, `Caps`, from `blksync-core`) and the local kinds
/// (from `blksync-endpoint`), under one name.
pub mod endpoint {
    pub use blksync_core::endpoint::*;
    pub use blksync_endpoint::{OpenTarget, iscsi, local, loopdev, lvm, open_source, open_target, usage};
}
