//! The client's side of the handshake (`docs/NBD.md`, "Connecting and the handshake"): fixed
//! newstyle, structured replies, metadata contexts, then `NBD_OPT_GO` asking for block sizes,
//! with `NBD_OPT_EXPORT_NAME` for servers that know neither fixed newstyle nor `GO`.
//!
//! It runs on the bare stream before the connection's reader thread exists, one option at a
//! time as the protocol requires. What it learns is an [`Export`].

use std::io::{self, Read, Write};

use blksync_core::{Error, ErrorKind, Result};

use crate::address::NbdAddress;
use crate::socket::io_text;
use crate::wire::option::{ExportName, Go, Greeting, Info, MetaContext, MetaContextQuery, ReplyHeader};
use crate::wire::{self, client_flag, handshake_flag, info, opt, rep};

/// At most this many `NBD_REP_INFO` replies to one `GO`: there are four kinds.
const MAX_INFOS: usize = 64;
/// At most this many contexts from one `SET_META_CONTEXT`: we ask for two.
const MAX_CONTEXTS: usize = 16;

/// The size constraints of an export (`NBD_INFO_BLOCK_SIZE`, or the protocol's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Every offset and length is a multiple of this (a power of two ≤ 64 KiB).
    pub minimum: u32,
    /// I/O at multiples of this avoids read-modify-write on the server.
    pub preferred: u32,
    /// The largest READ or WRITE payload.
    pub maximum: u32,
}

impl BlockSizes {
    /// What applies when the server says nothing: 1, 4096 and 32 MiB.
    pub const DEFAULT: BlockSizes = BlockSizes { minimum: 1, preferred: 4096, maximum: wire::DEFAULT_MAX_PAYLOAD };

    fn check(self) -> Result<BlockSizes> {
        let BlockSizes { minimum, preferred, maximum } = self;
        let ok = minimum.is_power_of_two()
            && minimum <= 1 << 16
            && preferred.is_power_of_two()
            && preferred >= minimum.max(512)
            && maximum >= preferred;
        if ok {
            Ok(self)
        } else {
            Err(Error::protocol(format!(
                "the server's block sizes break the protocol's rules: minimum {minimum}, preferred {preferred}, maximum {maximum}"
            )))
        }
    }
}

/// What the handshake agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags ([`wire::transmission_flag`]).
    pub flags: u16,
    /// Structured replies were negotiated.
    pub structured_replies: bool,
    /// The export was chosen with `NBD_OPT_EXPORT_NAME` (a server without `GO`).
    pub export_name_fallback: bool,
    /// Size constraints.
    pub block_sizes: BlockSizes,
    /// The id of `base:allocation`, when negotiated.
    pub allocation_context: Option<u32>,
    /// The id of the requested `qemu:dirty-bitmap:NAME`, when negotiated.
    pub bitmap_context: Option<u32>,
    /// Every context the server selected (block status answers with one chunk for each).
    pub contexts: Vec<u32>,
}

impl Export {
    /// The export has this transmission flag.
    #[must_use]
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// Negotiates `address`'s export over `stream`; `bitmap` names a dirty bitmap to select.
pub(crate) fn negotiate<S: Read + Write>(stream: &mut S, address: &NbdAddress, bitmap: Option<&str>) -> Result<Export> {
    Handshake { stream, address }.run(bitmap)
}

struct Handshake<'a, S> {
    stream: &'a mut S,
    address: &'a NbdAddress,
}

impl<S: Read + Write> Handshake<'_, S> {
    fn run(&mut self, bitmap: Option<&str>) -> Result<Export> {
        let mut bytes = [0; Greeting::LEN];
        self.read(&mut bytes)?;
        let greeting = Greeting::decode(&bytes).map_err(|e| self.context(e))?;
        let fixed = greeting.flags & handshake_flag::FIXED_NEWSTYLE != 0;
        let no_zeroes = greeting.flags & handshake_flag::NO_ZEROES != 0;
        let flags =
            if fixed { client_flag::FIXED_NEWSTYLE } else { 0 } | if no_zeroes { client_flag::NO_ZEROES } else { 0 };
        self.write(&flags.to_be_bytes())?;
        let wanted_bitmap = bitmap.map(|b| format!("{}{b}", wire::DIRTY_BITMAP_PREFIX));
        if !fixed {
            // Plain newstyle allows no other option.
            let export = self.export_name(no_zeroes)?;
            return self.check_bitmap(export, wanted_bitmap.as_deref());
        }

        let structured = self.structured_replies()?;
        let contexts = if structured { self.meta_contexts(wanted_bitmap.as_deref())? } else { Vec::new() };
        let mut export = match self.go()? {
            Some(export) => export,
            None => self.export_name(no_zeroes)?,
        };
        export.structured_replies = structured;
        export.allocation_context = contexts.iter().find(|c| c.name == wire::BASE_ALLOCATION).map(|c| c.id);
        export.bitmap_context =
            wanted_bitmap.as_deref().and_then(|w| contexts.iter().find(|c| c.name == w)).map(|c| c.id);
        export.contexts = contexts.iter().map(|c| c.id).collect();
        self.check_bitmap(export, wanted_bitmap.as_deref())
    }

    fn check_bitmap(&self, export: Export, wanted: Option<&str>) -> Result<Export> {
        match wanted {
            Some(name) if export.bitmap_context.is_none() => Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{}: the server offers no {name} context for this export (qemu-nbd -B NAME exports a bitmap)",
                    self.address
                ),
            )),
            _ => Ok(export),
        }
    }

    fn structured_replies(&mut self) -> Result<bool> {
        self.send(opt::STRUCTURED_REPLY, &[])?;
        let (header, data) = self.reply(opt::STRUCTURED_REPLY)?;
        match header.kind {
            rep::ACK => Ok(true),
            rep::ERR_TLS_REQD => Err(self.tls_required()),
            kind if kind & rep::ERR != 0 => Ok(false),
            kind => Err(self.unexpected(kind, &data, "NBD_OPT_STRUCTURED_REPLY")),
        }
    }

    fn meta_contexts(&mut self, bitmap: Option<&str>) -> Result<Vec<MetaContext>> {
        let mut queries = vec![wire::BASE_ALLOCATION.to_string()];
        queries.extend(bitmap.map(str::to_string));
        if queries.iter().any(|q| q.len() > wire::MAX_STRING) {
            return Err(Error::usage(format!("{}: the bitmap's name is longer than 4096 bytes", self.address)));
        }
        let query = MetaContextQuery { export: self.address.export().to_string(), queries };
        self.send(opt::SET_META_CONTEXT, &query.encode())?;
        let mut contexts = Vec::new();
        loop {
            let (header, data) = self.reply(opt::SET_META_CONTEXT)?;
            match header.kind {
                rep::META_CONTEXT if contexts.len() < MAX_CONTEXTS => {
                    contexts.push(MetaContext::decode(&data).map_err(|e| self.context(e))?);
                }
                rep::META_CONTEXT => {
                    return Err(self.context(Error::protocol("too many metadata contexts (more than 16)")));
                }
                rep::ACK => return Ok(contexts),
                rep::ERR_TLS_REQD => return Err(self.tls_required()),
                // The protocol: after an error, disregard the contexts already sent.
                kind if kind & rep::ERR != 0 => return Ok(Vec::new()),
                kind => return Err(self.unexpected(kind, &data, "NBD_OPT_SET_META_CONTEXT")),
            }
        }
    }

    /// `NBD_OPT_GO`: the export, or `None` when the server does not know the option.
    fn go(&mut self) -> Result<Option<Export>> {
        let go = Go { export: self.address.export().to_string(), requests: vec![info::BLOCK_SIZE] };
        self.send(opt::GO, &go.encode())?;
        let mut size_flags = None;
        let mut block_sizes = BlockSizes::DEFAULT;
        for _ in 0..=MAX_INFOS {
            let (header, data) = self.reply(opt::GO)?;
            match header.kind {
                rep::INFO => match Info::decode(&data).map_err(|e| self.context(e))? {
                    Info::Export { size, flags } => size_flags = Some((size, flags)),
                    Info::BlockSize { minimum, preferred, maximum } => {
                        block_sizes =
                            BlockSizes { minimum, preferred, maximum }.check().map_err(|e| self.context(e))?;
                    }
                    Info::Name(_) | Info::Description(_) | Info::Other(_) => {}
                },
                rep::ACK => {
                    let (size, flags) = size_flags.ok_or_else(|| {
                        self.context(Error::protocol("the server accepted NBD_OPT_GO without NBD_INFO_EXPORT"))
                    })?;
                    return Ok(Some(Export::new(size, flags, block_sizes, false)));
                }
                rep::ERR_UNSUP => return Ok(None),
                kind => return Err(self.go_error(kind, &data)),
            }
        }
        Err(self.context(Error::protocol("more than 64 NBD_REP_INFO replies to NBD_OPT_GO")))
    }

    fn go_error(&self, kind: u32, data: &[u8]) -> Error {
        let export = self.address.export();
        let said = said(data);
        let (kind, message) = match kind {
            rep::ERR_UNKNOWN => (ErrorKind::NotFound, format!("the server has no export {export:?}{said}")),
            rep::ERR_TLS_REQD => return self.tls_required(),
            rep::ERR_POLICY => (ErrorKind::PermissionDenied, format!("the server refuses export {export:?}{said}")),
            rep::ERR_SHUTDOWN => (ErrorKind::Connection, format!("the server is shutting down{said}")),
            rep::ERR_BLOCK_SIZE_REQD => {
                (ErrorKind::Protocol, format!("the server asks for block sizes, which were asked for{said}"))
            }
            kind if kind & rep::ERR != 0 => {
                (ErrorKind::Protocol, format!("the server refused export {export:?} (error {kind:#x}){said}"))
            }
            kind => return self.unexpected(kind, data, "NBD_OPT_GO"),
        };
        Error::new(kind, format!("{}: {message}", self.address))
    }

    /// `NBD_OPT_EXPORT_NAME`, which ends the handshake; a server that does not have the export
    /// hangs up instead of answering.
    fn export_name(&mut self, no_zeroes: bool) -> Result<Export> {
        self.send(opt::EXPORT_NAME, self.address.export().as_bytes().to_vec().as_slice())?;
        let mut bytes = [0; ExportName::LEN];
        self.read(&mut bytes)?;
        if !no_zeroes {
            self.read(&mut [0; ExportName::ZEROES])?;
        }
        let reply = ExportName::decode(&bytes);
        Ok(Export::new(reply.size, reply.flags, BlockSizes::DEFAULT, true))
    }

    fn send(&mut self, option: u32, data: &[u8]) -> Result<()> {
        self.write(&wire::option::request(option, data))
    }

    /// The next reply, which must answer `option`.
    fn reply(&mut self, option: u32) -> Result<(ReplyHeader, Vec<u8>)> {
        let mut bytes = [0; ReplyHeader::LEN];
        self.read(&mut bytes)?;
        let header = ReplyHeader::decode(&bytes).map_err(|e| self.context(e))?;
        if header.option != option {
            return Err(self.context(Error::protocol(format!(
                "a reply to option {} while option {option} was asked",
                header.option
            ))));
        }
        let mut data = vec![0; header.len as usize];
        self.read(&mut data)?;
        Ok((header, data))
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<()> {
        self.stream.read_exact(buf).map_err(|e| self.broken(&e))
    }

    fn write(&mut self, buf: &[u8]) -> Result<()> {
        self.stream.write_all(buf).map_err(|e| self.broken(&e))
    }

    fn broken(&self, e: &io::Error) -> Error {
        let why = match e.kind() {
            io::ErrorKind::UnexpectedEof => "the server closed the connection".to_string(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "the server did not answer within 30 s".to_string(),
            _ => io_text(e),
        };
        Error::new(ErrorKind::Connection, format!("{}: during the NBD handshake: {why}", self.address))
    }

    fn tls_required(&self) -> Error {
        Error::new(
            ErrorKind::Unsupported,
            format!(
                "{}: the server requires TLS, which is not supported; use nbd:// through an ssh tunnel",
                self.address
            ),
        )
    }

    fn unexpected(&self, kind: u32, data: &[u8], option: &str) -> Error {
        self.context(Error::protocol(format!("unexpected reply type {kind:#x} to {option}{}", said(data))))
    }

    fn context(&self, e: Error) -> Error {
        e.context(&self.address.to_string())
    }
}

impl Export {
    fn new(size: u64, flags: u16, block_sizes: BlockSizes, export_name_fallback: bool) -> Export {
        Export {
            size,
            flags,
            structured_replies: false,
            export_name_fallback,
            block_sizes,
            allocation_context: None,
            bitmap_context: None,
            contexts: Vec::new(),
        }
    }
}

/// `: "the server's message"`, or nothing when it sent none.
fn said(data: &[u8]) -> String {
    let text = wire::text(data);
    if text.is_empty() { String::new() } else { format!(" (the server said: {text})") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::option::{reply, request};
    use crate::wire::transmission_flag;

    /// A scripted peer: what the server sends is given up front; what the client sends is kept.
    struct Script {
        input: io::Cursor<Vec<u8>>,
        sent: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.sent.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn run(server: &[Vec<u8>], bitmap: Option<&str>) -> (Result<Export>, Vec<u8>) {
        let mut script = Script { input: io::Cursor::new(server.concat()), sent: Vec::new() };
        let address = crate::address::parse("nbd://h/disk").unwrap();
        (negotiate(&mut script, &address, bitmap), script.sent)
    }

    fn greeting(flags: u16) -> Vec<u8> {
        Greeting { flags }.encode().to_vec()
    }

    fn info(i: &Info) -> Vec<u8> {
        reply(opt::GO, rep::INFO, &i.encode())
    }

    const FIXED: u16 = handshake_flag::FIXED_NEWSTYLE | handshake_flag::NO_ZEROES;

    #[test]
    fn a_modern_server_gives_structured_replies_contexts_and_block_sizes() {
        let (export, sent) = run(
            &[
                greeting(FIXED),
                reply(opt::STRUCTURED_REPLY, rep::ACK, &[]),
                reply(
                    opt::SET_META_CONTEXT,
                    rep::META_CONTEXT,
                    &MetaContext { id: 7, name: "base:allocation".into() }.encode(),
                ),
                reply(opt::SET_META_CONTEXT, rep::ACK, &[]),
                info(&Info::Name("disk".into())),
                info(&Info::BlockSize { minimum: 512, preferred: 4096, maximum: 1 << 20 }),
                info(&Info::Export { size: 1 << 30, flags: transmission_flag::HAS_FLAGS }),
                reply(opt::GO, rep::ACK, &[]),
            ],
            None,
        );
        let export = export.unwrap();
        assert!(export.structured_replies && !export.export_name_fallback);
        assert_eq!((export.size, export.allocation_context, export.contexts), (1 << 30, Some(7), vec![7]));
        assert_eq!(export.block_sizes, BlockSizes { minimum: 512, preferred: 4096, maximum: 1 << 20 });
        // client flags, then the options in order
        assert_eq!(&sent[..4], &3u32.to_be_bytes());
        assert_eq!(&sent[4..20], &request(opt::STRUCTURED_REPLY, &[])[..]);
    }

    #[test]
    fn a_server_without_go_is_asked_with_export_name() {
        let (export, sent) = run(
            &[
                greeting(handshake_flag::FIXED_NEWSTYLE),
                reply(opt::STRUCTURED_REPLY, rep::ERR_UNSUP, &[]),
                reply(opt::GO, rep::ERR_UNSUP, &[]),
                ExportName { size: 4096, flags: 1 }.encode(false),
            ],
            None,
        );
        let export = export.unwrap();
        assert!(export.export_name_fallback && !export.structured_replies);
        assert_eq!((export.size, export.block_sizes), (4096, BlockSizes::DEFAULT));
        assert!(sent.ends_with(&request(opt::EXPORT_NAME, b"disk")), "the export's name, without NO_ZEROES");
        assert_eq!(&sent[..4], &1u32.to_be_bytes());
    }

    #[test]
    fn plain_newstyle_goes_straight_to_export_name() {
        let (export, sent) = run(&[greeting(0), ExportName { size: 512, flags: 1 }.encode(false)], None);
        assert!(export.unwrap().export_name_fallback);
        assert_eq!(sent, [&0u32.to_be_bytes()[..], &request(opt::EXPORT_NAME, b"disk")].concat());
    }

    #[test]
    fn go_errors_map_to_kinds_naming_the_address() {
        for (kind, expect) in [
            (rep::ERR_UNKNOWN, ErrorKind::NotFound),
            (rep::ERR_TLS_REQD, ErrorKind::Unsupported),
            (rep::ERR_POLICY, ErrorKind::PermissionDenied),
            (rep::ERR_SHUTDOWN, ErrorKind::Connection),
            (rep::ERR_INVALID, ErrorKind::Protocol),
        ] {
            let (export, _) = run(
                &[
                    greeting(FIXED),
                    reply(opt::STRUCTURED_REPLY, rep::ACK, &[]),
                    reply(opt::SET_META_CONTEXT, rep::ACK, &[]),
                    reply(opt::GO, kind, b"go away"),
                ],
                None,
            );
            let e = export.unwrap_err();
            assert_eq!(e.kind(), expect, "{e}");
            assert!(e.to_string().starts_with("nbd://h/disk: "), "{e}");
        }
    }

    #[test]
    fn a_missing_bitmap_fails_the_open() {
        let (export, _) = run(
            &[
                greeting(FIXED),
                reply(opt::STRUCTURED_REPLY, rep::ACK, &[]),
                reply(
                    opt::SET_META_CONTEXT,
                    rep::META_CONTEXT,
                    &MetaContext { id: 1, name: "base:allocation".into() }.encode(),
                ),
                reply(opt::SET_META_CONTEXT, rep::ACK, &[]),
                info(&Info::Export { size: 1, flags: 1 }),
                reply(opt::GO, rep::ACK, &[]),
            ],
            Some("b0"),
        );
        let e = export.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("qemu:dirty-bitmap:b0"), "{e}");
    }

    #[test]
    fn hostile_handshakes_are_errors() {
        let huge = ReplyHeader { option: opt::STRUCTURED_REPLY, kind: rep::ACK, len: u32::MAX }.encode().to_vec();
        let wrong = reply(opt::GO, rep::ACK, &[]);
        let bad_sizes = [
            greeting(FIXED),
            reply(opt::STRUCTURED_REPLY, rep::ERR_UNSUP, &[]),
            info(&Info::BlockSize { minimum: 3, preferred: 4096, maximum: 1 << 20 }),
        ];
        let no_export =
            [greeting(FIXED), reply(opt::STRUCTURED_REPLY, rep::ERR_UNSUP, &[]), reply(opt::GO, rep::ACK, &[])];
        for (what, server) in [
            ("a huge reply", vec![greeting(FIXED), huge]),
            ("a reply to another option", vec![greeting(FIXED), wrong]),
            ("bad block sizes", bad_sizes.to_vec()),
            ("ACK without NBD_INFO_EXPORT", no_export.to_vec()),
            ("not NBD", vec![b"SSH-2.0-OpenSSH_9.2\r\n".to_vec()]),
        ] {
            let e = run(&server, None).0.expect_err(what);
            assert_eq!(e.kind(), ErrorKind::Protocol, "{what}: {e}");
        }
        let e = run(&[greeting(FIXED)], None).0.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Connection, "a server that hangs up: {e}");
        let many = std::iter::once(greeting(FIXED))
            .chain(std::iter::once(reply(opt::STRUCTURED_REPLY, rep::ERR_UNSUP, &[])))
            .chain(std::iter::repeat_n(info(&Info::Other(99)), 100))
            .collect::<Vec<_>>();
        assert_eq!(run(&many, None).0.unwrap_err().kind(), ErrorKind::Protocol, "endless infos");
    }
}
