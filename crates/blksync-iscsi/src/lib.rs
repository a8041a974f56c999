//! An iSCSI initiator endpoint for blksync: a LUN of tgtd, LIO or any iSCSI target as a
//! [`Source`](blksync_core::endpoint::Source) and [`Target`](blksync_core::endpoint::Target),
//! in plain threads and safe Rust, without libiscsi or the kernel's initiator.
//!
//! ```no_run
//! use blksync_core::endpoint::Source;
//! use blksync_iscsi::{Iscsi, IscsiOptions};
//!
//! let lun = Iscsi::open("iscsi://127.0.0.1/iqn.2024-01.lab.test:disk/1", false, &IscsiOptions::default())?;
//! let mut head = vec![0; 4096];
//! lun.read_at(&mut head, 0)?;
//! println!("{} bytes, blocks of {}", lun.size(), lun.caps().block_size);
//! # Ok::<(), blksync_core::Error>(())
//! ```
//!
//! What it speaks and why is in `docs/ISCSI.md`. In short: RFC 7143 at `ErrorRecoveryLevel` 0 on
//! one connection, CHAP (MD5) and mutual CHAP, CRC32C digests when the target insists, many
//! commands in flight within the `CmdSN` window, R2T/Data-Out, NOP-In answers, logout on close;
//! SBC READ(16)/WRITE(16), SYNCHRONIZE CACHE, UNMAP and WRITE SAME(16) for zeros where LBPRZ
//! makes them zeros, GET LBA STATUS for the holes of thin LUNs. Every length from the target is
//! bounded before anything is allocated for it.
//!
//! Modules: [`address`] (the URI forms), [`options`] (options and CHAP secrets), [`pdu`] (the
//! PDU codec), [`text`] (login keys), [`scsi`] (CDBs, parsers, sense), `digest` (CRC32C),
//! `chap` (MD5), `login` (login and discovery), `session` (the full feature phase), `ahead`
//! (read-ahead),
//! [`lun`] (what open learns of the LUN), [`endpoint`] ([`Iscsi`]).

pub mod address;
mod ahead;
mod chap;
mod digest;
pub mod endpoint;
mod login;
pub mod lun;
pub mod options;
pub mod pdu;
pub mod scsi;
mod session;
pub mod text;

pub use address::{IscsiAddress, parse};
pub use endpoint::Iscsi;
pub use login::{DiscoveredTarget, Negotiated, discover};
pub use lun::{LunInfo, ZeroMethod};
pub use options::{Credentials, IscsiOptions, Secret};
