//! The wire protocol between the client and a remote agent (specified in docs/PROTOCOL.md).
//!
//! [`frame`] reads and writes length-prefixed frames with a hard size limit; [`message`] turns
//! frames into typed messages and back. Bulk data is never passed through a serialiser: a
//! `Data` payload is copied once into the frame and relayed as is.

pub mod frame;
pub mod message;

pub use message::Msg;

/// Protocol version spoken by this build.
pub const VERSION: u32 = 7;
/// Feature bits this build announces (none yet).
pub const FEATURES: u64 = 0;
/// Bytes the agent writes before the first frame.
pub const BANNER: &[u8; 16] = b"BLKSYNC-AGENT-1\n";
/// Largest frame body (type byte + payload) accepted.
pub const MAX_FRAME: usize = (16 << 20) + 4096;
/// Largest uncompressed `Data` payload.
pub const MAX_DATA: usize = 16 << 20;
