//! The endpoints of blksync: regular files and block devices ([`local`]), `loop://`
//! ([`loopdev`]), `lvm://` and `lvm+snapshot://` ([`lvm`]), and `nbd://` and `nbd+unix://`
//! exports (the `blksync-nbd` crate, which builds against the seam alone). [`open_source`] and [`open_target`]
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
/// A new kind of endpoint that is not a local file or device (iSCSI) gets its arm here.
pub fn open_source(address: &Path) -> blksync_core::Result<Box<dyn Source>> {
    if let Some(nbd) = nbd_address(address) {
        return Ok(Box::new(blksync_nbd::Nbd::open(nbd, false, &blksync_nbd::NbdOptions::default())?));
    }
    Ok(Box::new(local::Local::open_source(address)?))
}

/// Opens (or creates, as `how` says) the endpoint at `address` for writing. An export is never
/// created: it is there or the server says why not.
pub fn open_target(address: &Path, how: OpenTarget) -> blksync_core::Result<Box<dyn Target>> {
    if let Some(nbd) = nbd_address(address) {
        return Ok(Box::new(blksync_nbd::Nbd::open(nbd, !how.read_only, &blksync_nbd::NbdOptions::default())?));
    }
    Ok(Box::new(local::Local::open_target(address, how)?))
}

/// `address` as an NBD URI, when it is one (`nbd://`, `nbd+unix://`, and the TLS forms, which
/// the client refuses with the way around).
fn nbd_address(address: &Path) -> Option<&str> {
    address.to_str().filter(|a| blksync_nbd::address::is_nbd(a))
}
