//! The NBD protocol's messages, in both directions: what a client sends and decodes, and what a
//! server (a later `blksync serve`) sends and decodes. Encoders build byte arrays; decoders take
//! byte slices whose length the caller has already bounded, and check every field. Nothing here
//! touches a socket, so every decoder can be fed arbitrary bytes (fuzz target `nbd_decoders`).
//!
//! Spec: `docs/NBD.md`, after the NBD project's `doc/proto.md`. Every number is big-endian.
//!
//! - [`option`]: the handshake phase: greeting, option requests and their replies.
//! - [`transmission`]: requests, simple replies, structured reply chunks and their payloads.

pub mod option;
pub mod transmission;

use blksync_core::{Error, Result};

/// `NBDMAGIC`, the first 8 bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Oldstyle negotiation's second magic (`cliserv_magic`), recognised only to refuse it clearly.
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of an option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of the experimental extended headers, never negotiated here.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// The protocol's limit on a string (names, messages): 4096 bytes.
pub const MAX_STRING: usize = 4096;
/// The largest option reply accepted: every legal one is a few strings of at most 4096 bytes.
pub const MAX_OPTION_REPLY: u32 = 64 << 10;
/// The largest option request a server should accept (a name and a few queries).
pub const MAX_OPTION_REQUEST: u32 = 64 << 10;
/// The protocol's cap on descriptors in one block-status chunk (servers SHOULD NOT send more).
pub const MAX_EXTENTS: usize = 1 << 20;
/// The largest payload the protocol says a peer must accept when none was advertised.
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

/// The metadata context of allocation status.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Prefix of qemu's dirty-bitmap contexts (`qemu:dirty-bitmap:NAME`).
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// Handshake flags (16 bits, from the server).
pub mod handshake_flag {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits, the client's answer to the greeting).
pub mod client_flag {
    /// The client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// No 124 zero bytes after `NBD_OPT_EXPORT_NAME`, please.
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Transmission flags (16 bits, with the export's size).
pub mod transmission_flag {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Writes will fail.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` works.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` works.
    pub const SEND_FUA: u16 = 1 << 3;
    /// A rotational medium.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_CMD_TRIM` works.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` works.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` works.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see each other's flushes.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_CACHE` works.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` works.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option numbers.
pub mod opt {
    /// Choose an export and enter transmission (no error reply possible).
    pub const EXPORT_NAME: u32 = 1;
    /// End the negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Start TLS.
    pub const STARTTLS: u32 = 5;
    /// Ask about an export.
    pub const INFO: u32 = 6;
    /// Ask about an export and enter transmission.
    pub const GO: u32 = 7;
    /// Structured replies in transmission.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub mod rep {
    /// Done, successfully.
    pub const ACK: u32 = 1;
    /// An export (to `NBD_OPT_LIST`).
    pub const SERVER: u32 = 2;
    /// Information about the export (to `INFO`/`GO`).
    pub const INFO: u32 = 3;
    /// A metadata context and its id.
    pub const META_CONTEXT: u32 = 4;
    /// Bit 31: an error.
    pub const ERR: u32 = 1 << 31;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// Invalid option data.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// Not on this platform.
    pub const ERR_PLATFORM: u32 = ERR | 4;
    /// TLS first.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    /// Ask for block sizes first.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR | 8;
    /// Too large.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
}

/// Information types of `NBD_REP_INFO`.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Description for humans.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Request types.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (payload follows).
    pub const WRITE: u16 = 1;
    /// Disconnect (no reply).
    pub const DISC: u16 = 2;
    /// Make completed writes durable.
    pub const FLUSH: u16 = 3;
    /// Discard (contents undefined afterwards).
    pub const TRIM: u16 = 4;
    /// Prefetch.
    pub const CACHE: u16 = 5;
    /// Make a range read as zeros.
    pub const WRITE_ZEROES: u16 = 6;
    /// Metadata of a range.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cmd_flag {
    /// Durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// `WRITE_ZEROES`: allocate, do not punch.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `READ`: one content chunk.
    pub const DF: u16 = 1 << 2;
    /// `BLOCK_STATUS`: one extent.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `WRITE_ZEROES`: fail unless faster than writing.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types.
pub mod reply {
    /// End of the reply, no payload.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Zeros at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Extents of one metadata context.
    pub const BLOCK_STATUS: u16 = 5;
    /// Bit 15: an error chunk.
    pub const ERROR_BIT: u16 = 1 << 15;
    /// An error.
    pub const ERROR: u16 = ERROR_BIT | 1;
    /// An error at an offset.
    pub const ERROR_OFFSET: u16 = ERROR_BIT | 2;
    /// Flag: the last chunk of the reply.
    pub const FLAG_DONE: u16 = 1 << 0;
}

/// Status flags of `base:allocation` extents (and bit 0 of a dirty bitmap).
pub mod state {
    /// Not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// Reads as zeros.
    pub const ZERO: u32 = 1 << 1;
    /// `qemu:dirty-bitmap:*`: written since the bitmap was created.
    pub const DIRTY: u32 = 1 << 0;
}

/// Error values on the wire (they happen to be Linux's errno numbers).
pub mod errno {
    /// Operation not permitted (a write to a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Cannot allocate memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument (also for unknown values).
    pub const EINVAL: u32 = 22;
    /// No space left on device.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported.
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// This machine's errno for an error value from the wire; unknown values count as `EINVAL`, as
/// the protocol asks.
#[must_use]
pub fn local_errno(value: u32) -> i32 {
    match value {
        errno::EPERM => libc::EPERM,
        errno::EIO => libc::EIO,
        errno::ENOMEM => libc::ENOMEM,
        errno::ENOSPC => libc::ENOSPC,
        errno::EOVERFLOW => libc::EOVERFLOW,
        errno::ENOTSUP => libc::ENOTSUP,
        errno::ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    }
}

/// The wire's error value for this machine's errno (for a server): the protocol's few values,
/// with `EDQUOT` and `EFBIG` as `ENOSPC` and anything unlisted as `EIO`.
#[must_use]
pub fn wire_errno(local: i32) -> u32 {
    match local {
        libc::EPERM | libc::EROFS | libc::EACCES => errno::EPERM,
        libc::ENOMEM => errno::ENOMEM,
        libc::EINVAL => errno::EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => errno::ENOSPC,
        libc::EOVERFLOW => errno::EOVERFLOW,
        libc::ENOTSUP => errno::ENOTSUP,
        libc::ESHUTDOWN => errno::ESHUTDOWN,
        _ => errno::EIO,
    }
}

/// Reads big-endian fields from a byte slice; running short is a protocol error naming `what`.
pub(crate) struct Fields<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Fields<'a> {
        Fields { buf, what }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(Error::protocol(format!("truncated {}", self.what)));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub(crate) fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Fails unless every byte was read: a message longer than its fields is malformed.
    pub(crate) fn end(&self) -> Result<()> {
        if self.buf.is_empty() { Ok(()) } else { Err(Error::protocol(format!("{} is too long", self.what))) }
    }

    /// A string of `len` bytes: UTF-8 without NUL, at most 4096 bytes (names compared by value).
    pub(crate) fn name(&mut self, len: usize) -> Result<String> {
        if len > MAX_STRING {
            return Err(Error::protocol(format!("a name in {} is longer than 4096 bytes", self.what)));
        }
        let bytes = self.bytes(len)?;
        match std::str::from_utf8(bytes) {
            Ok(s) if !s.contains('\0') => Ok(s.to_string()),
            _ => Err(Error::protocol(format!("a name in {} is not UTF-8 text", self.what))),
        }
    }
}

/// A message for humans from the wire: lossy UTF-8, control characters dropped (it is printed),
/// at most the protocol's 4096 bytes.
#[must_use]
pub fn text(bytes: &[u8]) -> String {
    let mut out = String::new();
    for c in String::from_utf8_lossy(bytes).chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_STRING {
            break;
        }
        out.push(c);
    }
    out
}

/// A seeded xorshift64 stream, for the random-input tests of this crate's decoders: the same
/// bytes on every run, so that a failure reproduces.
#[cfg(test)]
pub(crate) fn random_stream(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

/// Runs every decoder of this module over `data` and checks that whatever decodes encodes back
/// to a message that decodes to the same value. For the fuzz target `nbd_decoders` and the
/// random-input test; it panics only on a bug (a decoder that panics, or a round trip that
/// changes a message).
#[doc(hidden)]
pub fn exercise_decoders(data: &[u8]) {
    use option::{
        ExportEntry, ExportName, Go, Greeting, Info, MetaContext, MetaContextQuery, OptionHeader, ReplyHeader,
    };
    use transmission::{BlockStatus, ErrorChunk, OffsetHole, Request};

    fn fixed<const N: usize>(data: &[u8]) -> Option<[u8; N]> {
        data.get(..N).and_then(|d| d.try_into().ok())
    }
    if let Some(Ok(g)) = fixed(data).map(|b| Greeting::decode(&b)) {
        assert_eq!(Greeting::decode(&g.encode()).ok(), Some(g));
    }
    if let Some(Ok(h)) = fixed(data).map(|b| OptionHeader::decode(&b)) {
        assert_eq!(OptionHeader::decode(&h.encode()).ok(), Some(h));
    }
    if let Some(Ok(h)) = fixed(data).map(|b| ReplyHeader::decode(&b)) {
        assert_eq!(ReplyHeader::decode(&h.encode()).ok(), Some(h));
    }
    if let Some(e) = fixed(data).map(|b| ExportName::decode(&b)) {
        let bytes = e.encode(true);
        assert_eq!(fixed(&bytes).map(|b| ExportName::decode(&b)), Some(e));
    }
    if let Some(Ok(r)) = fixed(data).map(|b| Request::decode(&b)) {
        assert_eq!(fixed(&r.encode()).map(|b| Request::decode(&b).ok()), Some(Some(r)));
    }
    if let Ok(g) = Go::decode(data) {
        assert_eq!(Go::decode(&g.encode()).ok(), Some(g));
    }
    if let Ok(q) = MetaContextQuery::decode(data) {
        assert_eq!(MetaContextQuery::decode(&q.encode()).ok(), Some(q));
    }
    if let Ok(i) = Info::decode(data) {
        assert_eq!(Info::decode(&i.encode()).ok(), Some(i));
    }
    if let Ok(e) = ExportEntry::decode(data) {
        assert_eq!(ExportEntry::decode(&e.encode()).ok(), Some(e));
    }
    if let Ok(m) = MetaContext::decode(data) {
        assert_eq!(MetaContext::decode(&m.encode()).ok(), Some(m));
    }
    if let Some(len) = transmission::ReplyHeader::len_for(fixed(data).unwrap_or_default()).ok()
        && let Some(Ok(h)) = data.get(..len).map(transmission::ReplyHeader::decode)
    {
        assert_eq!(transmission::ReplyHeader::decode(&h.encode()).ok(), Some(h));
    }
    if let Ok(h) = OffsetHole::decode(data) {
        assert_eq!(OffsetHole::decode(&h.encode()).ok(), Some(h));
    }
    let kind = u16::from_be_bytes(fixed(data).unwrap_or_default()) | reply::ERROR_BIT;
    if let Some(Ok(e)) = data.get(2..).map(|payload| ErrorChunk::decode(kind, payload)) {
        let (kind, payload) = e.encode();
        assert_eq!(ErrorChunk::decode(kind, &payload).ok(), Some(e));
    }
    if let Ok(s) = BlockStatus::decode(data) {
        assert_eq!(BlockStatus::decode(&s.encode()).ok(), Some(s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeded stream of random inputs, biased towards the magics and small lengths that get
    /// a decoder past its first check.
    #[test]
    fn every_decoder_survives_random_input() {
        let mut next = crate::wire::random_stream(0x9e37_79b9_7f4a_7c15);
        let magics: [&[u8]; 6] = [
            &NBDMAGIC.to_be_bytes(),
            &IHAVEOPT.to_be_bytes(),
            &OPTION_REPLY_MAGIC.to_be_bytes(),
            &REQUEST_MAGIC.to_be_bytes(),
            &SIMPLE_REPLY_MAGIC.to_be_bytes(),
            &STRUCTURED_REPLY_MAGIC.to_be_bytes(),
        ];
        for _ in 0..50_000 {
            let len = (next() % 64) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            match next() % 4 {
                0 => data.splice(0..0, magics[(next() % 6) as usize].iter().copied()).for_each(drop),
                // Small big-endian lengths where decoders read them.
                1 if data.len() >= 8 => data[..4].copy_from_slice(&((next() % 16) as u32).to_be_bytes()),
                _ => {}
            }
            exercise_decoders(&data);
        }
    }

    #[test]
    fn error_values_map_both_ways_and_unknown_ones_are_einval() {
        for v in
            [errno::EPERM, errno::EIO, errno::ENOMEM, errno::EINVAL, errno::ENOSPC, errno::EOVERFLOW, errno::ENOTSUP]
        {
            assert_eq!(wire_errno(local_errno(v)), v);
        }
        assert_eq!(wire_errno(local_errno(errno::ESHUTDOWN)), errno::ESHUTDOWN);
        assert_eq!(local_errno(12345), libc::EINVAL);
        assert_eq!(wire_errno(libc::EDQUOT), errno::ENOSPC);
        assert_eq!(wire_errno(libc::ENOENT), errno::EIO);
    }

    #[test]
    fn text_from_the_wire_is_printable_and_bounded() {
        assert_eq!(text(b"bad\x1b[31m\nthing\xff"), "bad[31mthing\u{fffd}");
        assert_eq!(text(&[0xff; 4096]).len(), 4095, "whole replacement characters, within 4096 bytes");
    }
}
