//! The vocabulary of blksync, shared by every other crate of it: typed errors with exit codes
//! and hints ([`error`]), byte ranges ([`extent`]), zero detection ([`zero`]), counters, observers
//! and cancellation ([`progress`]), sizes ([`size`]), the rate limiter ([`throttle`]), ids
//! ([`id`]), temporary files ([`temp`]), addresses ([`location`]), image fingerprints
//! ([`fingerprint`]), the names of a chain's files ([`chain_files`]), the field encoding of
//! binary records ([`fields`]), default worker counts ([`workers`]), and the endpoint seam
//! itself ([`endpoint`]: `Source`, `Target`, `Caps`, and an in-memory endpoint for tests).
//!
//! It depends on nothing of blksync, and on little else, so that an endpoint crate (files and
//! devices today, NBD and iSCSI next) builds against it alone.

pub mod buffer;
pub mod chain_files;
pub mod endpoint;
pub mod error;
pub mod extent;
pub mod fields;
pub mod fingerprint;
pub mod id;
pub mod location;
pub mod progress;
pub mod size;
pub mod temp;
pub mod throttle;
pub mod workers;
pub mod zero;

pub use error::{Error, ErrorKind, Hint, Result};
