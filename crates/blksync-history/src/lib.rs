//! The history of images: what blksync keeps besides the images themselves.
//!
//! - [`delta`]: the delta file format (docs/DELTA-FORMAT.md), its writer and validating reader;
//! - [`record`]: recorders, `Target`s that wrap an endpoint and turn a sync into history: a
//!   delta against a base (`diff`), an undo log (`sync --undo`), the next point of a chain
//!   (`backup`);
//! - [`chain`]: a backup chain, and any of its points as a `Source` read through the chain;
//! - [`sums`]: a base image's content hashes, which every read of it is checked against;
//! - [`store`], [`point`], [`prune`]: a chain's directory as storage, naming its points, and
//!   folding old increments into the base in place.
//!
//! It is a crate of its own because it is storage with its own format and its own growth
//! (other stores for chains, serving a point over NBD), and it needs only the endpoint seam: it
//! knows no command, no remote protocol and no front end.

pub(crate) use blksync_core::{buffer, error, fields, fingerprint, id, progress, temp, throttle, workers, zero};

/// The endpoint seam and the local endpoints, under one name.
pub(crate) mod endpoint {
    pub use blksync_core::endpoint::*;
    pub use blksync_endpoint::local;
}

pub mod chain;
pub mod delta;
pub mod point;
pub mod prune;
pub mod record;
pub mod store;
pub mod sums;
