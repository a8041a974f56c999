//! The endpoints of blksync: regular files and block devices ([`local`]), `loop://`
//! ([`loopdev`]), `lvm://` and `lvm+snapshot://` ([`lvm`]). [`local::Local::open_source`] and
//! [`local::Local::open_target`] are the one opener, keyed by address: a new endpoint kind is a
//! module here, an arm in `Address::of`, and its scheme in `location::SCHEMES`.
//!
//! Each implements `Source` and `Target` of `blksync-core`, which is all the engine, the peer and
//! the recorders see.

pub(crate) use blksync_core::{endpoint, error, location, size};

pub mod local;
pub mod loopdev;
pub mod lvm;
