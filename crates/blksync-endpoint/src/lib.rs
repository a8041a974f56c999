//! The endpoints of blksync: regular files and block devices ([`local`]), `loop://`
//! ([`loopdev`]), `lvm://` and `lvm+snapshot://` ([`lvm`]). [`open_source`] and [`open_target`]
//! are the one opener, keyed by address, and return trait objects: a new endpoint kind is a
//! module here, an arm in `Address::of` and in the opener, and its scheme in
//! `location::SCHEMES`.
//!
//! Each implements `Source` and `Target` of `blksync-core`, which is all the engine, the peer and
//! the recorders see.

pub(crate) use blksync_core::{endpoint, error, location, size};

pub mod advice;
pub mod local;
pub mod loopdev;
pub mod lvm;

use std::path::Path;

use blksync_core::endpoint::{Source, Target};

pub use local::OpenTarget;

/// Opens the endpoint at `address` for reading: the one opener every command and the agent use.
/// A new kind of endpoint that is not a local file or device (NBD, iSCSI) gets its arm here.
pub fn open_source(address: &Path) -> blksync_core::Result<Box<dyn Source>> {
    Ok(Box::new(local::Local::open_source(address)?))
}

/// Opens (or creates, as `how` says) the endpoint at `address` for writing.
pub fn open_target(address: &Path, how: OpenTarget) -> blksync_core::Result<Box<dyn Target>> {
    Ok(Box::new(local::Local::open_target(address, how)?))
}
