//! Handshake-phase messages: the server's greeting, option requests (`IHAVEOPT | option |
//! length | data`), option replies (`magic | option | type | length | data`) and the payloads
//! of the options and replies this client uses. A server uses the same types the other way.

use blksync_core::{Error, ErrorKind, Result};

use super::{Fields, IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, info};

/// The server's first message: `NBDMAGIC | IHAVEOPT | handshake flags (16)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// Handshake flags ([`super::handshake_flag`]).
    pub flags: u16,
}

impl Greeting {
    /// Bytes on the wire.
    pub const LEN: usize = 18;

    /// The bytes a server sends.
    #[must_use]
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0; Self::LEN];
        out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[16..].copy_from_slice(&self.flags.to_be_bytes());
        out
    }

    /// Decodes a greeting. Oldstyle negotiation (the second magic `cliserv_magic`) is
    /// `Unsupported`: it has no export names and the reference server dropped it in 3.10.
    pub fn decode(bytes: &[u8; Self::LEN]) -> Result<Greeting> {
        let mut f = Fields::new(bytes, "greeting");
        if f.u64()? != NBDMAGIC {
            return Err(Error::protocol("not an NBD server (no NBDMAGIC in its greeting)"));
        }
        match f.u64()? {
            IHAVEOPT => Ok(Greeting { flags: f.u16()? }),
            super::CLISERV_MAGIC => Err(Error::new(
                ErrorKind::Unsupported,
                "the server speaks oldstyle NBD negotiation, which is not supported (it has no export names)",
            )),
            other => Err(Error::protocol(format!("unknown NBD negotiation magic {other:#x}"))),
        }
    }
}

/// The header of an option request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option ([`super::opt`]).
    pub option: u32,
    /// Bytes of data that follow.
    pub len: u32,
}

impl OptionHeader {
    /// Bytes on the wire.
    pub const LEN: usize = 16;

    /// The bytes of the header.
    #[must_use]
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0; Self::LEN];
        out[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Decodes a header (for a server); data longer than [`super::MAX_OPTION_REQUEST`] is refused.
    pub fn decode(bytes: &[u8; Self::LEN]) -> Result<OptionHeader> {
        let mut f = Fields::new(bytes, "option request");
        if f.u64()? != IHAVEOPT {
            return Err(Error::protocol("an option request without IHAVEOPT"));
        }
        let header = OptionHeader { option: f.u32()?, len: f.u32()? };
        if header.len > super::MAX_OPTION_REQUEST {
            return Err(Error::protocol(format!("option {} carries {} bytes", header.option, header.len)));
        }
        Ok(header)
    }
}

/// A whole option request: header and data.
#[must_use]
pub fn request(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = OptionHeader { option, len: data.len() as u32 }.encode().to_vec();
    out.extend_from_slice(data);
    out
}

/// The header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyHeader {
    /// The option this answers.
    pub option: u32,
    /// Reply type ([`super::rep`]).
    pub kind: u32,
    /// Bytes of data that follow.
    pub len: u32,
}

impl ReplyHeader {
    /// Bytes on the wire.
    pub const LEN: usize = 20;

    /// The bytes of the header.
    #[must_use]
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0; Self::LEN];
        out[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..16].copy_from_slice(&self.kind.to_be_bytes());
        out[16..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Decodes a header; data longer than [`super::MAX_OPTION_REPLY`] is refused before anything
    /// is allocated for it.
    pub fn decode(bytes: &[u8; Self::LEN]) -> Result<ReplyHeader> {
        let mut f = Fields::new(bytes, "option reply");
        let magic = f.u64()?;
        if magic != OPTION_REPLY_MAGIC {
            return Err(Error::protocol(format!("bad option reply magic {magic:#x}")));
        }
        let header = ReplyHeader { option: f.u32()?, kind: f.u32()?, len: f.u32()? };
        if header.len > super::MAX_OPTION_REPLY {
            return Err(Error::protocol(format!(
                "an option reply of {} bytes (at most {} accepted)",
                header.len,
                super::MAX_OPTION_REPLY
            )));
        }
        Ok(header)
    }
}

/// A whole option reply: header and data (for a server).
#[must_use]
pub fn reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut out = ReplyHeader { option, kind, len: data.len() as u32 }.encode().to_vec();
    out.extend_from_slice(data);
    out
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`: an export name and the information requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Go {
    /// Export name ("" for the default export).
    pub export: String,
    /// Information types requested ([`super::info`]).
    pub requests: Vec<u16>,
}

impl Go {
    /// The option's data.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + self.export.len() + 2 * self.requests.len());
        put_name(&mut out, &self.export);
        out.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            out.extend_from_slice(&r.to_be_bytes());
        }
        out
    }

    /// Decodes the option's data (for a server).
    pub fn decode(data: &[u8]) -> Result<Go> {
        let mut f = Fields::new(data, "NBD_OPT_GO");
        let len = f.u32()? as usize;
        let export = f.name(len)?;
        let count = f.u16()?;
        let requests = (0..count).map(|_| f.u16()).collect::<Result<_>>()?;
        f.end()?;
        Ok(Go { export, requests })
    }
}

/// The data of `NBD_OPT_SET_META_CONTEXT` and `NBD_OPT_LIST_META_CONTEXT`: an export name and
/// queries (`namespace:leaf`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextQuery {
    /// Export name.
    pub export: String,
    /// Queries, such as `base:allocation`.
    pub queries: Vec<String>,
}

impl MetaContextQuery {
    /// The option's data.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_name(&mut out, &self.export);
        out.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            put_name(&mut out, q);
        }
        out
    }

    /// Decodes the option's data (for a server); the query count is bounded by the data's
    /// length before anything is allocated for it.
    pub fn decode(data: &[u8]) -> Result<MetaContextQuery> {
        let mut f = Fields::new(data, "NBD_OPT_SET_META_CONTEXT");
        let len = f.u32()? as usize;
        let export = f.name(len)?;
        let count = f.u32()? as usize;
        if count > data.len() / 4 {
            return Err(Error::protocol(format!("{count} metadata context queries in {} bytes", data.len())));
        }
        let mut queries = Vec::with_capacity(count);
        for _ in 0..count {
            let len = f.u32()? as usize;
            queries.push(f.name(len)?);
        }
        f.end()?;
        Ok(MetaContextQuery { export, queries })
    }
}

/// The data of an `NBD_REP_INFO` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`: size in bytes and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags ([`super::transmission_flag`]).
        flags: u16,
    },
    /// `NBD_INFO_NAME`: the canonical name.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`: for humans.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`: the size constraints.
    BlockSize {
        /// Minimum block: alignment of every offset and length.
        minimum: u32,
        /// Preferred block: efficient I/O at multiples of it.
        preferred: u32,
        /// Largest payload of one request.
        maximum: u32,
    },
    /// A type this client does not know, ignored as the protocol asks.
    Other(u16),
}

impl Info {
    /// The reply's data.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Info::Export { size, flags } => {
                out.extend_from_slice(&info::EXPORT.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
            }
            Info::Name(s) | Info::Description(s) => {
                let kind = if matches!(self, Info::Name(_)) { info::NAME } else { info::DESCRIPTION };
                out.extend_from_slice(&kind.to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Info::BlockSize { minimum, preferred, maximum } => {
                out.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
                for v in [minimum, preferred, maximum] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            Info::Other(kind) => out.extend_from_slice(&kind.to_be_bytes()),
        }
        out
    }

    /// Decodes the reply's data; the known fixed-size types must have their exact length.
    pub fn decode(data: &[u8]) -> Result<Info> {
        let mut f = Fields::new(data, "NBD_REP_INFO");
        let info = match f.u16()? {
            info::EXPORT => Info::Export { size: f.u64()?, flags: f.u16()? },
            info::NAME => Info::Name(super::text(f.rest())),
            info::DESCRIPTION => Info::Description(super::text(f.rest())),
            info::BLOCK_SIZE => Info::BlockSize { minimum: f.u32()?, preferred: f.u32()?, maximum: f.u32()? },
            other => {
                f.rest();
                Info::Other(other)
            }
        };
        f.end()?;
        Ok(info)
    }
}

/// The data of an `NBD_REP_META_CONTEXT` reply: a context's id for this connection and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    /// The id block-status chunks carry.
    pub id: u32,
    /// The context's name.
    pub name: String,
}

impl MetaContext {
    /// The reply's data.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.id.to_be_bytes().to_vec();
        out.extend_from_slice(self.name.as_bytes());
        out
    }

    /// Decodes the reply's data.
    pub fn decode(data: &[u8]) -> Result<MetaContext> {
        let mut f = Fields::new(data, "NBD_REP_META_CONTEXT");
        let id = f.u32()?;
        Ok(MetaContext { id, name: f.name(data.len() - 4)? })
    }
}

/// The data of an `NBD_REP_SERVER` reply (to `NBD_OPT_LIST`): an export's name, then its
/// description filling the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportEntry {
    /// The export's name.
    pub name: String,
    /// For humans (may be empty).
    pub description: String,
}

impl ExportEntry {
    /// The reply's data (for a server); the description is cut to the protocol's 4096 bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.name.len() + self.description.len());
        put_name(&mut out, &self.name);
        out.extend_from_slice(super::text(self.description.as_bytes()).as_bytes());
        out
    }

    /// Decodes the reply's data.
    pub fn decode(data: &[u8]) -> Result<ExportEntry> {
        let mut f = Fields::new(data, "NBD_REP_SERVER");
        let len = f.u32()? as usize;
        let name = f.name(len)?;
        Ok(ExportEntry { name, description: super::text(f.rest()) })
    }
}

/// The server's answer to `NBD_OPT_EXPORT_NAME`: size and transmission flags, then 124 zero
/// bytes unless `NO_ZEROES` was agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportName {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
}

impl ExportName {
    /// Bytes of size and flags, without the zeros.
    pub const LEN: usize = 10;
    /// The zero bytes that follow unless `NO_ZEROES` was agreed.
    pub const ZEROES: usize = 124;

    /// The reply's bytes, with the zeros unless `no_zeroes`.
    #[must_use]
    pub fn encode(&self, no_zeroes: bool) -> Vec<u8> {
        let mut out = self.size.to_be_bytes().to_vec();
        out.extend_from_slice(&self.flags.to_be_bytes());
        if !no_zeroes {
            out.extend_from_slice(&[0; Self::ZEROES]);
        }
        out
    }

    /// Decodes size and flags.
    #[must_use]
    pub fn decode(bytes: &[u8; Self::LEN]) -> ExportName {
        let mut size = [0; 8];
        size.copy_from_slice(&bytes[..8]);
        ExportName { size: u64::from_be_bytes(size), flags: u16::from_be_bytes([bytes[8], bytes[9]]) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{opt, rep};

    #[test]
    fn greetings_round_trip_and_oldstyle_is_refused_clearly() {
        let g = Greeting { flags: 3 };
        assert_eq!(Greeting::decode(&g.encode()).unwrap(), g);
        let mut old = g.encode();
        old[8..16].copy_from_slice(&crate::wire::CLISERV_MAGIC.to_be_bytes());
        assert_eq!(Greeting::decode(&old).unwrap_err().kind(), ErrorKind::Unsupported);
        let mut bad = g.encode();
        bad[0] = b'X';
        assert_eq!(Greeting::decode(&bad).unwrap_err().kind(), ErrorKind::Protocol);
    }

    #[test]
    fn headers_round_trip_and_huge_lengths_are_refused() {
        let h = OptionHeader { option: opt::GO, len: 12 };
        assert_eq!(OptionHeader::decode(&h.encode()).unwrap(), h);
        let r = ReplyHeader { option: opt::GO, kind: rep::ERR_UNSUP, len: 7 };
        assert_eq!(ReplyHeader::decode(&r.encode()).unwrap(), r);
        let huge = ReplyHeader { len: u32::MAX, ..r };
        assert_eq!(ReplyHeader::decode(&huge.encode()).unwrap_err().kind(), ErrorKind::Protocol);
        assert!(OptionHeader::decode(&OptionHeader { option: 1, len: u32::MAX }.encode()).is_err());
    }

    #[test]
    fn payloads_round_trip() {
        let go = Go { export: "disk é".into(), requests: vec![info::BLOCK_SIZE, info::NAME] };
        assert_eq!(Go::decode(&go.encode()).unwrap(), go);
        let q = MetaContextQuery { export: String::new(), queries: vec!["base:allocation".into(), "qemu:x".into()] };
        assert_eq!(MetaContextQuery::decode(&q.encode()).unwrap(), q);
        for i in [
            Info::Export { size: 1 << 40, flags: 0x4d },
            Info::Name("n".into()),
            Info::Description("d".into()),
            Info::BlockSize { minimum: 512, preferred: 4096, maximum: 1 << 25 },
            Info::Other(77),
        ] {
            assert_eq!(Info::decode(&i.encode()).unwrap(), i);
        }
        let entry = ExportEntry { name: "disk".into(), description: "a disk".into() };
        assert_eq!(ExportEntry::decode(&entry.encode()).unwrap(), entry);
        let m = MetaContext { id: 9, name: "base:allocation".into() };
        assert_eq!(MetaContext::decode(&m.encode()).unwrap(), m);
        let e = ExportName { size: 123_456, flags: 3 };
        let bytes = e.encode(true);
        assert_eq!(ExportName::decode(bytes[..10].try_into().unwrap()), e);
        assert_eq!(e.encode(false).len(), 134);
    }

    proptest::proptest! {
        #[test]
        fn every_handshake_message_round_trips(
            flags: u16,
            option: u32,
            kind: u32,
            len in 0..=crate::wire::MAX_OPTION_REQUEST,
            export in "\\PC{0,40}",
            requests in proptest::collection::vec(proptest::prelude::any::<u16>(), 0..8),
            queries in proptest::collection::vec("[a-z]{1,8}:\\PC{0,20}", 0..4),
            size: u64,
            sizes: (u32, u32, u32),
            id: u32,
        ) {
            proptest::prop_assert_eq!(Greeting::decode(&Greeting { flags }.encode()).unwrap(), Greeting { flags });
            let h = OptionHeader { option, len };
            proptest::prop_assert_eq!(OptionHeader::decode(&h.encode()).unwrap(), h);
            let r = ReplyHeader { option, kind, len };
            proptest::prop_assert_eq!(ReplyHeader::decode(&r.encode()).unwrap(), r);
            let go = Go { export: export.clone(), requests };
            proptest::prop_assert_eq!(Go::decode(&go.encode()).unwrap(), go);
            let q = MetaContextQuery { export: export.clone(), queries };
            proptest::prop_assert_eq!(MetaContextQuery::decode(&q.encode()).unwrap(), q);
            let (minimum, preferred, maximum) = sizes;
            for i in [Info::Export { size, flags }, Info::BlockSize { minimum, preferred, maximum }, Info::Name(export.clone()), Info::Description(export.clone())] {
                proptest::prop_assert_eq!(Info::decode(&i.encode()).unwrap(), i);
            }
            let m = MetaContext { id, name: export };
            proptest::prop_assert_eq!(MetaContext::decode(&m.encode()).unwrap(), m);
            let e = ExportName { size, flags };
            proptest::prop_assert_eq!(ExportName::decode(e.encode(false)[..10].try_into().unwrap()), e);
        }
    }

    #[test]
    fn malformed_payloads_are_protocol_errors() {
        let mut export = Info::Export { size: 1, flags: 1 }.encode();
        export.push(0);
        assert!(Info::decode(&export).is_err(), "an info longer than its type");
        assert!(Info::decode(&Info::BlockSize { minimum: 1, preferred: 1, maximum: 1 }.encode()[..10]).is_err());
        let mut q = MetaContextQuery { export: "e".into(), queries: vec![] }.encode();
        q[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(MetaContextQuery::decode(&q).is_err(), "a huge query count");
        assert!(Go::decode(&[0, 0, 0x10, 0, b'x']).is_err(), "a name longer than its data");
        assert!(MetaContext::decode(&[0, 0, 0, 1, b'a', 0]).is_err(), "a NUL in a name");
    }
}
