//! Transmission-phase messages: requests (`magic | flags | type | cookie | offset | length`,
//! then a write's data), simple replies (`magic | error | cookie`, then a read's data) and
//! structured reply chunks (`magic | flags | type | cookie | length | payload`) with the payloads
//! of their types.
//!
//! A reply's header is told apart by its magic, so a reader takes 4 bytes, asks
//! [`ReplyHeader::len_for`] how many make the header, and decodes the whole.

use blksync_core::{Error, Result};

use super::{Fields, MAX_EXTENTS, MAX_STRING, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, reply};

/// The largest error chunk: error, message length, a 4096-byte message, an offset.
pub const MAX_ERROR_CHUNK: u32 = 6 + MAX_STRING as u32 + 8;
/// The largest block-status chunk: a context id and 2^20 descriptors.
pub const MAX_STATUS_CHUNK: u32 = 4 + 8 * MAX_EXTENTS as u32;

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags ([`super::cmd_flag`]).
    pub flags: u16,
    /// Command ([`super::cmd`]).
    pub kind: u16,
    /// Chosen by the client, echoed in the reply.
    pub cookie: u64,
    /// First byte.
    pub offset: u64,
    /// Bytes (for a write, the data that follows).
    pub len: u32,
}

impl Request {
    /// Bytes on the wire.
    pub const LEN: usize = 28;

    /// The header's bytes.
    #[must_use]
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0; Self::LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Decodes a header (for a server).
    pub fn decode(bytes: &[u8; Self::LEN]) -> Result<Request> {
        let mut f = Fields::new(bytes, "request");
        let magic = f.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(Error::protocol(format!("bad request magic {magic:#x}")));
        }
        Ok(Request { flags: f.u16()?, kind: f.u16()?, cookie: f.u64()?, offset: f.u64()?, len: f.u32()? })
    }
}

/// A simple reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0, or an error value ([`super::errno`]).
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

/// The header of a structured reply chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Reply flags ([`reply::FLAG_DONE`]).
    pub flags: u16,
    /// Chunk type ([`super::reply`]).
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Bytes of payload that follow.
    pub len: u32,
}

impl ChunkHeader {
    /// This chunk ends its reply.
    #[must_use]
    pub fn done(&self) -> bool {
        self.flags & reply::FLAG_DONE != 0
    }
}

/// A reply header of either kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply.
    Simple(SimpleReply),
    /// A structured reply chunk.
    Chunk(ChunkHeader),
}

impl ReplyHeader {
    /// Bytes of a simple reply.
    pub const SIMPLE_LEN: usize = 16;
    /// Bytes of a chunk header.
    pub const CHUNK_LEN: usize = 20;

    /// How long the header that starts with these 4 bytes (its magic) is; an unknown magic,
    /// extended headers' included (never negotiated here), is a protocol error.
    pub fn len_for(magic: [u8; 4]) -> Result<usize> {
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => Ok(Self::SIMPLE_LEN),
            STRUCTURED_REPLY_MAGIC => Ok(Self::CHUNK_LEN),
            other => Err(Error::protocol(format!("bad reply magic {other:#010x}"))),
        }
    }

    /// Decodes a whole header (magic included).
    pub fn decode(bytes: &[u8]) -> Result<ReplyHeader> {
        let mut f = Fields::new(bytes, "reply header");
        let header = match u32::from_be_bytes(f.bytes(4)?.try_into().unwrap_or_default()) {
            SIMPLE_REPLY_MAGIC => ReplyHeader::Simple(SimpleReply { error: f.u32()?, cookie: f.u64()? }),
            STRUCTURED_REPLY_MAGIC => {
                ReplyHeader::Chunk(ChunkHeader { flags: f.u16()?, kind: f.u16()?, cookie: f.u64()?, len: f.u32()? })
            }
            other => return Err(Error::protocol(format!("bad reply magic {other:#010x}"))),
        };
        f.end()?;
        Ok(header)
    }

    /// The header's bytes (for a server).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::CHUNK_LEN);
        match self {
            ReplyHeader::Simple(s) => {
                out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                out.extend_from_slice(&s.error.to_be_bytes());
                out.extend_from_slice(&s.cookie.to_be_bytes());
            }
            ReplyHeader::Chunk(c) => {
                out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
                out.extend_from_slice(&c.flags.to_be_bytes());
                out.extend_from_slice(&c.kind.to_be_bytes());
                out.extend_from_slice(&c.cookie.to_be_bytes());
                out.extend_from_slice(&c.len.to_be_bytes());
            }
        }
        out
    }
}

/// A whole chunk: header and payload (for a server).
#[must_use]
pub fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = ReplyHeader::Chunk(ChunkHeader { flags, kind, cookie, len: payload.len() as u32 }).encode();
    out.extend_from_slice(payload);
    out
}

/// An `OFFSET_DATA` chunk (for a server): the offset, then the data.
#[must_use]
pub fn data_chunk(flags: u16, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut payload = offset.to_be_bytes().to_vec();
    payload.extend_from_slice(data);
    chunk(flags, reply::OFFSET_DATA, cookie, &payload)
}

/// The payload of an `OFFSET_HOLE` chunk: `size` bytes at `offset` read as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetHole {
    /// First byte.
    pub offset: u64,
    /// Bytes (nonzero).
    pub size: u32,
}

impl OffsetHole {
    /// Bytes of payload.
    pub const LEN: usize = 12;

    /// The payload.
    #[must_use]
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0; Self::LEN];
        out[..8].copy_from_slice(&self.offset.to_be_bytes());
        out[8..].copy_from_slice(&self.size.to_be_bytes());
        out
    }

    /// Decodes the payload, which must be exactly 12 bytes with a nonzero size.
    pub fn decode(payload: &[u8]) -> Result<OffsetHole> {
        let mut f = Fields::new(payload, "OFFSET_HOLE chunk");
        let hole = OffsetHole { offset: f.u64()?, size: f.u32()? };
        f.end()?;
        if hole.size == 0 {
            return Err(Error::protocol("an OFFSET_HOLE chunk of 0 bytes"));
        }
        Ok(hole)
    }
}

/// The payload of an error chunk: `ERROR`, `ERROR_OFFSET`, or an error type this client does
/// not know (bit 15 set), whose extra fields are skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    /// The error value (nonzero).
    pub error: u32,
    /// The server's message for humans (may be empty).
    pub message: String,
    /// Where it happened (`ERROR_OFFSET` only).
    pub offset: Option<u64>,
}

impl ErrorChunk {
    /// The chunk type and payload (`ERROR_OFFSET` when there is an offset).
    #[must_use]
    pub fn encode(&self) -> (u16, Vec<u8>) {
        let mut cut = self.message.len().min(MAX_STRING);
        while !self.message.is_char_boundary(cut) {
            cut -= 1;
        }
        let message = &self.message.as_bytes()[..cut];
        let mut out = self.error.to_be_bytes().to_vec();
        out.extend_from_slice(&(message.len() as u16).to_be_bytes());
        out.extend_from_slice(message);
        match self.offset {
            Some(offset) => {
                out.extend_from_slice(&offset.to_be_bytes());
                (reply::ERROR_OFFSET, out)
            }
            None => (reply::ERROR, out),
        }
    }

    /// Decodes the payload of a chunk of type `kind` (bit 15 set).
    pub fn decode(kind: u16, payload: &[u8]) -> Result<ErrorChunk> {
        let mut f = Fields::new(payload, "error chunk");
        let error = f.u32()?;
        let len = usize::from(f.u16()?);
        if error == 0 {
            return Err(Error::protocol("an error chunk with error value 0"));
        }
        if len > MAX_STRING {
            return Err(Error::protocol("an error chunk's message is longer than 4096 bytes"));
        }
        let message = super::text(f.bytes(len)?);
        let offset = match kind {
            reply::ERROR_OFFSET => Some(f.u64()?),
            _ => None,
        };
        if kind == reply::ERROR || kind == reply::ERROR_OFFSET {
            f.end()?;
        }
        Ok(ErrorChunk { error, message, offset })
    }
}

/// One block-status descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes (nonzero).
    pub len: u32,
    /// Status flags, as the context defines them ([`super::state`]).
    pub flags: u32,
}

/// The payload of a `BLOCK_STATUS` chunk: one context's consecutive extents from the request's
/// offset on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatus {
    /// The metadata context's id.
    pub context: u32,
    /// Consecutive extents (at least one).
    pub extents: Vec<Extent>,
}

impl BlockStatus {
    /// The payload.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 8 * self.extents.len());
        out.extend_from_slice(&self.context.to_be_bytes());
        for e in &self.extents {
            out.extend_from_slice(&e.len.to_be_bytes());
            out.extend_from_slice(&e.flags.to_be_bytes());
        }
        out
    }

    /// Decodes the payload: `4 + 8 × n` bytes with `1 ≤ n ≤ 2^20`, no extent of length 0.
    pub fn decode(payload: &[u8]) -> Result<BlockStatus> {
        if payload.len() < 12 || !(payload.len() - 4).is_multiple_of(8) || payload.len() > MAX_STATUS_CHUNK as usize {
            return Err(Error::protocol(format!("a BLOCK_STATUS chunk of {} bytes", payload.len())));
        }
        let mut f = Fields::new(payload, "BLOCK_STATUS chunk");
        let context = f.u32()?;
        let mut extents = Vec::with_capacity((payload.len() - 4) / 8);
        while !f.is_empty() {
            let e = Extent { len: f.u32()?, flags: f.u32()? };
            if e.len == 0 {
                return Err(Error::protocol("a block-status extent of length 0"));
            }
            extents.push(e);
        }
        Ok(BlockStatus { context, extents })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::cmd;

    #[test]
    fn requests_and_reply_headers_round_trip() {
        let r = Request { flags: 2, kind: cmd::WRITE_ZEROES, cookie: u64::MAX, offset: 1 << 50, len: 4096 };
        assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        for h in [
            ReplyHeader::Simple(SimpleReply { error: 5, cookie: 7 }),
            ReplyHeader::Chunk(ChunkHeader { flags: 1, kind: reply::OFFSET_DATA, cookie: 8, len: 9 }),
        ] {
            let bytes = h.encode();
            assert_eq!(ReplyHeader::len_for(bytes[..4].try_into().unwrap()).unwrap(), bytes.len());
            assert_eq!(ReplyHeader::decode(&bytes).unwrap(), h);
        }
        let extended = crate::wire::EXTENDED_REPLY_MAGIC.to_be_bytes();
        assert!(ReplyHeader::len_for(extended).is_err(), "extended headers are never negotiated");
    }

    #[test]
    fn chunk_payloads_round_trip() {
        let h = OffsetHole { offset: 4096, size: 512 };
        assert_eq!(OffsetHole::decode(&h.encode()).unwrap(), h);
        for e in [
            ErrorChunk { error: 5, message: "disk on fire".into(), offset: Some(8192) },
            ErrorChunk { error: 28, message: String::new(), offset: None },
        ] {
            let (kind, payload) = e.encode();
            assert_eq!(ErrorChunk::decode(kind, &payload).unwrap(), e);
        }
        let s = BlockStatus { context: 1, extents: vec![Extent { len: 512, flags: 3 }, Extent { len: 1, flags: 0 }] };
        assert_eq!(BlockStatus::decode(&s.encode()).unwrap(), s);
        let c = data_chunk(1, 5, 0, b"abc");
        assert_eq!(c.len(), 20 + 8 + 3);
    }

    proptest::proptest! {
        #[test]
        fn every_transmission_message_round_trips(
            flags: u16,
            kind: u16,
            cookie: u64,
            offset: u64,
            len: u32,
            error in 1u32..,
            message in "\\PC{0,100}",
            at: Option<u64>,
            size in 1u32..,
            extents in proptest::collection::vec((1u32.., proptest::prelude::any::<u32>()), 1..64),
        ) {
            let r = Request { flags, kind, cookie, offset, len };
            proptest::prop_assert_eq!(Request::decode(&r.encode()).unwrap(), r);
            for h in [
                ReplyHeader::Simple(SimpleReply { error: len, cookie }),
                ReplyHeader::Chunk(ChunkHeader { flags, kind, cookie, len }),
            ] {
                let bytes = h.encode();
                proptest::prop_assert_eq!(ReplyHeader::len_for(bytes[..4].try_into().unwrap()).unwrap(), bytes.len());
                proptest::prop_assert_eq!(ReplyHeader::decode(&bytes).unwrap(), h);
            }
            let e = ErrorChunk { error, message, offset: at };
            let (kind, payload) = e.encode();
            proptest::prop_assert_eq!(ErrorChunk::decode(kind, &payload).unwrap(), e);
            let h = OffsetHole { offset, size };
            proptest::prop_assert_eq!(OffsetHole::decode(&h.encode()).unwrap(), h);
            let extents = extents.into_iter().map(|(len, flags)| Extent { len, flags }).collect();
            let s = BlockStatus { context: len, extents };
            proptest::prop_assert_eq!(BlockStatus::decode(&s.encode()).unwrap(), s);
        }
    }

    #[test]
    fn malformed_chunks_are_protocol_errors() {
        assert!(OffsetHole::decode(&OffsetHole { offset: 0, size: 0 }.encode()).is_err());
        assert!(OffsetHole::decode(&[0; 13]).is_err());
        assert!(ErrorChunk::decode(reply::ERROR, &[0, 0, 0, 0, 0, 0]).is_err(), "error value 0");
        assert!(ErrorChunk::decode(reply::ERROR, &[0, 0, 0, 5, 0, 9, b'x']).is_err(), "message past the end");
        assert!(ErrorChunk::decode(reply::ERROR_OFFSET, &[0, 0, 0, 5, 0, 0]).is_err(), "no offset");
        let unknown = ErrorChunk::decode(reply::ERROR_BIT | 0x63, &[0, 0, 0, 5, 0, 1, b'x', 1, 2, 3]).unwrap();
        assert_eq!((unknown.error, unknown.message.as_str()), (5, "x"), "unknown error types keep their error");
        assert!(BlockStatus::decode(&[0; 4]).is_err(), "no extents");
        assert!(BlockStatus::decode(&[0; 13]).is_err(), "not a multiple of 8");
        assert!(BlockStatus::decode(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]).is_err(), "an empty extent");
    }
}
