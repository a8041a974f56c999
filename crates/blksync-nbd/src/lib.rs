//! An NBD client endpoint for blksync: an export of qemu-nbd, nbdkit or any NBD server as a
//! [`Source`](blksync_core::endpoint::Source) and [`Target`](blksync_core::endpoint::Target),
//! in plain threads and safe Rust, without libnbd or the kernel's NBD client.
//!
//! ```no_run
//! use blksync_core::endpoint::Source;
//! use blksync_nbd::{Nbd, NbdOptions};
//!
//! let export = Nbd::open("nbd://127.0.0.1/disk", false, &NbdOptions::default())?;
//! let mut head = vec![0; 4096];
//! export.read_at(&mut head, 0)?;
//! println!("{} bytes, holes reported: {}", export.size(), export.caps().holes);
//! # Ok::<(), blksync_core::Error>(())
//! ```
//!
//! What it speaks and why is in `docs/NBD.md`. In short: fixed newstyle with structured replies,
//! `base:allocation` (and a qemu dirty bitmap on request) and `NBD_OPT_GO` with block sizes,
//! falling back to `NBD_OPT_EXPORT_NAME` and simple replies for old servers; many requests in
//! flight on one connection (reads cut into pieces all sent at once, writes sent behind); every
//! length from the server bounded before anything is allocated for it. No TLS: `nbds://` is
//! refused with the way around it (an ssh tunnel).
//!
//! [`server`] is the other direction: an NBD server that exports any `Source` or `Target`.
//!
//! Modules: [`address`] (the URI forms), [`wire`] (the protocol's messages in both directions,
//! for a later server too), `handshake` (negotiation), `connection` (the multiplexed
//! transmission phase), [`endpoint`] ([`Nbd`]).

pub mod address;
mod connection;
pub mod endpoint;
mod handshake;
pub mod server;
mod socket;
pub mod wire;

pub use address::{NbdAddress, Transport, parse};
pub use endpoint::{Nbd, NbdOptions};
pub use handshake::{BlockSizes, Export};
pub use server::{Server, ServerOptions, StopHandle};
