//! The server's side of the handshake (`docs/NBD.md`, "Negotiation"): the greeting, the client's
//! flags, and the option loop until `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME` chooses an export, or
//! the client aborts. Generic over the stream, so random bytes can be fed to it in a test.

use std::io::{self, Read, Write};

use crate::wire::option::{
    ExportEntry, ExportName, Go, Greeting, Info, MetaContext, MetaContextQuery, OptionHeader, reply,
};
use crate::wire::{BASE_ALLOCATION, MAX_STRING, client_flag, handshake_flag, info, opt, rep};

use super::export::Export;

/// The most options one connection may send: enough for any client (nbdinfo `--list` sends one
/// `INFO` per export), few enough that a looping client cannot hold its slot for ever.
const MAX_OPTIONS: usize = 256;
/// The most option data read into memory; more is read past and answered `ERR_TOO_BIG`.
/// A name is at most 4096 bytes, so a legal option needs a little over that.
pub(crate) const MAX_OPTION_DATA: u32 = 16 << 10;
/// The id of `base:allocation` after `NBD_OPT_SET_META_CONTEXT`.
pub(crate) const ALLOCATION_ID: u32 = 1;

/// What the negotiation agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Agreed {
    /// Index of the chosen export.
    pub export: usize,
    /// Structured replies are on.
    pub structured: bool,
    /// `base:allocation` is selected for the chosen export.
    pub allocation: bool,
}

/// The export a name means: the one of that name; the empty name means the first export
/// unless one is called "".
pub(crate) fn find(exports: &[Export], name: &str) -> Option<usize> {
    exports.iter().position(|e| e.name() == name).or((name.is_empty() && !exports.is_empty()).then_some(0))
}

fn protocol(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// Reads `len` bytes and drops them, 64 KiB at a time.
pub(crate) fn discard(s: &mut impl Read, len: u64) -> io::Result<()> {
    let copied = io::copy(&mut s.take(len), &mut io::sink())?;
    if copied < len { Err(io::Error::from(io::ErrorKind::UnexpectedEof)) } else { Ok(()) }
}

/// Negotiates with a client on `s`. `Ok(None)`: the client aborted, or was refused in a way the
/// protocol answers by closing (no fixed newstyle, an unknown flag, an unknown name for
/// `EXPORT_NAME`, too many options). `Err`: the stream broke or the client broke the protocol.
pub(crate) fn negotiate<S: Read + Write>(s: &mut S, exports: &[Export], min_block: u32) -> io::Result<Option<Agreed>> {
    s.write_all(&Greeting { flags: handshake_flag::FIXED_NEWSTYLE | handshake_flag::NO_ZEROES }.encode())?;
    let mut flags = [0; 4];
    s.read_exact(&mut flags)?;
    let flags = u32::from_be_bytes(flags);
    if flags & !(client_flag::FIXED_NEWSTYLE | client_flag::NO_ZEROES) != 0 || flags & client_flag::FIXED_NEWSTYLE == 0
    {
        return Ok(None);
    }
    let no_zeroes = flags & client_flag::NO_ZEROES != 0;
    let mut structured = false;
    // The export and whether base:allocation was selected, by the last SET_META_CONTEXT.
    let mut selected: Option<(usize, bool)> = None;
    for _ in 0..MAX_OPTIONS {
        let mut header = [0; OptionHeader::LEN];
        s.read_exact(&mut header)?;
        let header = OptionHeader::decode(&header).map_err(|e| protocol(e.to_string()))?;
        let option = header.option;
        let send = |s: &mut S, kind: u32, data: &[u8]| s.write_all(&reply(option, kind, data));
        if header.len > MAX_OPTION_DATA {
            discard(s, u64::from(header.len))?;
            send(s, rep::ERR_TOO_BIG, format!("option data of {} bytes is too large", header.len).as_bytes())?;
            continue;
        }
        let mut data = vec![0; header.len as usize];
        s.read_exact(&mut data)?;
        match option {
            opt::EXPORT_NAME => {
                let name = std::str::from_utf8(&data).ok().filter(|n| n.len() <= MAX_STRING);
                let Some(index) = name.and_then(|n| find(exports, n)) else { return Ok(None) };
                let export = &exports[index];
                s.write_all(
                    &ExportName { size: export.source().size(), flags: export.flags(structured) }.encode(no_zeroes),
                )?;
                let allocation = selected == Some((index, true));
                return Ok(Some(Agreed { export: index, structured, allocation }));
            }
            opt::ABORT => {
                // The client may already have gone; the protocol asks to take that gracefully.
                let _ = send(s, rep::ACK, &[]);
                return Ok(None);
            }
            opt::LIST if !data.is_empty() => send(s, rep::ERR_INVALID, b"NBD_OPT_LIST takes no data")?,
            opt::LIST => {
                for e in exports {
                    let entry = ExportEntry { name: e.name().to_string(), description: e.description().to_string() };
                    send(s, rep::SERVER, &entry.encode())?;
                }
                send(s, rep::ACK, &[])?;
            }
            opt::STARTTLS => send(s, rep::ERR_POLICY, b"TLS is not supported: use an ssh tunnel")?,
            opt::STRUCTURED_REPLY if !data.is_empty() => {
                send(s, rep::ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")?;
            }
            opt::STRUCTURED_REPLY => {
                structured = true;
                send(s, rep::ACK, &[])?;
            }
            opt::INFO | opt::GO => {
                let chosen = info_or_go(s, option, &data, exports, structured, min_block)?;
                if let Some(index) = chosen.filter(|_| option == opt::GO) {
                    let allocation = selected == Some((index, true));
                    return Ok(Some(Agreed { export: index, structured, allocation }));
                }
            }
            opt::SET_META_CONTEXT | opt::LIST_META_CONTEXT => {
                let set = option == opt::SET_META_CONTEXT;
                if set {
                    // A SET replaces the selection even when it fails.
                    selected = None;
                }
                let answer = meta_context(s, option, &data, exports, structured)?;
                if set {
                    selected = answer;
                }
            }
            other => send(s, rep::ERR_UNSUP, format!("option {other} is not supported").as_bytes())?,
        }
    }
    Ok(None)
}

/// Answers `NBD_OPT_INFO` or `NBD_OPT_GO`; the export chosen, when it succeeded.
fn info_or_go<S: Write>(
    s: &mut S,
    option: u32,
    data: &[u8],
    exports: &[Export],
    structured: bool,
    min_block: u32,
) -> io::Result<Option<usize>> {
    let send = |s: &mut S, kind: u32, data: &[u8]| s.write_all(&reply(option, kind, data));
    let go = match Go::decode(data) {
        Ok(go) => go,
        Err(e) => {
            send(s, rep::ERR_INVALID, e.to_string().as_bytes())?;
            return Ok(None);
        }
    };
    let Some(index) = find(exports, &go.export) else {
        send(s, rep::ERR_UNKNOWN, format!("no export {:?}", go.export).as_bytes())?;
        return Ok(None);
    };
    let export = &exports[index];
    let (minimum, preferred, maximum) = export.block_sizes(min_block);
    let mut infos = vec![
        Info::Export { size: export.source().size(), flags: export.flags(structured) },
        Info::BlockSize { minimum, preferred, maximum },
    ];
    if go.requests.contains(&info::NAME) {
        infos.push(Info::Name(export.name().to_string()));
    }
    if go.requests.contains(&info::DESCRIPTION) && !export.description().is_empty() {
        infos.push(Info::Description(crate::wire::text(export.description().as_bytes())));
    }
    for i in infos {
        send(s, rep::INFO, &i.encode())?;
    }
    send(s, rep::ACK, &[])?;
    Ok(Some(index))
}

/// Answers `NBD_OPT_SET_META_CONTEXT` or `NBD_OPT_LIST_META_CONTEXT`; for a SET that
/// succeeded, the export and whether `base:allocation` was selected.
fn meta_context<S: Write>(
    s: &mut S,
    option: u32,
    data: &[u8],
    exports: &[Export],
    structured: bool,
) -> io::Result<Option<(usize, bool)>> {
    let send = |s: &mut S, kind: u32, data: &[u8]| s.write_all(&reply(option, kind, data));
    let set = option == opt::SET_META_CONTEXT;
    if set && !structured {
        send(s, rep::ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY must come first")?;
        return Ok(None);
    }
    let query = match MetaContextQuery::decode(data) {
        Ok(q) => q,
        Err(e) => {
            send(s, rep::ERR_INVALID, e.to_string().as_bytes())?;
            return Ok(None);
        }
    };
    let Some(index) = find(exports, &query.export) else {
        send(s, rep::ERR_UNKNOWN, format!("no export {:?}", query.export).as_bytes())?;
        return Ok(None);
    };
    let matches = if set {
        query.queries.iter().any(|q| q == BASE_ALLOCATION)
    } else {
        query.queries.is_empty() || query.queries.iter().any(|q| q == BASE_ALLOCATION || q == "base:")
    };
    if matches {
        // The protocol reserves id 0 in LIST replies.
        let id = if set { ALLOCATION_ID } else { 0 };
        send(s, rep::META_CONTEXT, &MetaContext { id, name: BASE_ALLOCATION.into() }.encode())?;
    }
    send(s, rep::ACK, &[])?;
    Ok(set.then_some((index, matches)))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::wire::option::{ReplyHeader, request};
    use blksync_core::endpoint::memory::Memory;

    /// A client's bytes in, the server's bytes out.
    struct Script {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn exports() -> Vec<Export> {
        let m = Arc::new(Memory::new("m", 1 << 20));
        vec![Export::read_only("disk", m.clone()).with_description("a disk"), Export::writable("rw", m)]
    }

    /// Option, reply type and data of each reply.
    type Replies = Vec<(u32, u32, Vec<u8>)>;

    fn run(client: &[u8]) -> (io::Result<Option<Agreed>>, Replies) {
        let mut s = Script { input: io::Cursor::new(client.to_vec()), output: Vec::new() };
        let result = negotiate(&mut s, &exports(), 1);
        let mut replies = Vec::new();
        let mut out = &s.output[Greeting::LEN..];
        while out.len() >= ReplyHeader::LEN {
            let h = ReplyHeader::decode(out[..ReplyHeader::LEN].try_into().unwrap()).unwrap();
            let end = ReplyHeader::LEN + h.len as usize;
            replies.push((h.option, h.kind, out[ReplyHeader::LEN..end].to_vec()));
            out = &out[end..];
        }
        (result, replies)
    }

    fn fixed() -> Vec<u8> {
        (client_flag::FIXED_NEWSTYLE | client_flag::NO_ZEROES).to_be_bytes().to_vec()
    }

    #[test]
    fn go_after_structured_replies_and_a_context_agrees_on_all_three() {
        let mut c = fixed();
        c.extend(request(opt::STRUCTURED_REPLY, &[]));
        let q = MetaContextQuery { export: "rw".into(), queries: vec![BASE_ALLOCATION.into(), "qemu:x".into()] };
        c.extend(request(opt::SET_META_CONTEXT, &q.encode()));
        c.extend(request(opt::GO, &Go { export: "rw".into(), requests: vec![info::NAME] }.encode()));
        let (result, replies) = run(&c);
        assert_eq!(result.unwrap(), Some(Agreed { export: 1, structured: true, allocation: true }));
        let kinds: Vec<u32> = replies.iter().map(|r| r.1).collect();
        assert_eq!(kinds, [rep::ACK, rep::META_CONTEXT, rep::ACK, rep::INFO, rep::INFO, rep::INFO, rep::ACK]);
        assert_eq!(MetaContext::decode(&replies[1].2).unwrap().id, ALLOCATION_ID);
        assert_eq!(Info::decode(&replies[5].2).unwrap(), Info::Name("rw".into()));
    }

    #[test]
    fn a_context_set_for_another_export_does_not_count() {
        let mut c = fixed();
        c.extend(request(opt::STRUCTURED_REPLY, &[]));
        let q = MetaContextQuery { export: "disk".into(), queries: vec![BASE_ALLOCATION.into()] };
        c.extend(request(opt::SET_META_CONTEXT, &q.encode()));
        c.extend(request(opt::GO, &Go { export: "rw".into(), requests: vec![] }.encode()));
        assert!(!run(&c).0.unwrap().unwrap().allocation);
    }

    #[test]
    fn list_unknown_options_tls_and_unknown_exports_get_their_replies() {
        let mut c = fixed();
        c.extend(request(opt::LIST, &[]));
        c.extend(request(opt::STARTTLS, &[]));
        c.extend(request(77, b"xyz"));
        c.extend(request(opt::INFO, &Go { export: "nope".into(), requests: vec![] }.encode()));
        c.extend(request(opt::SET_META_CONTEXT, &[]));
        c.extend(request(opt::INFO, b"\xff\xff"));
        c.extend(request(opt::ABORT, &[]));
        let (result, replies) = run(&c);
        assert_eq!(result.unwrap(), None);
        let kinds: Vec<u32> = replies.iter().map(|r| r.1).collect();
        assert_eq!(
            kinds,
            [
                rep::SERVER,
                rep::SERVER,
                rep::ACK,
                rep::ERR_POLICY,
                rep::ERR_UNSUP,
                rep::ERR_UNKNOWN,
                rep::ERR_INVALID,
                rep::ERR_INVALID,
                rep::ACK
            ]
        );
        assert_eq!(ExportEntry::decode(&replies[0].2).unwrap().description, "a disk");
    }

    #[test]
    fn export_name_replies_size_and_flags_without_zeroes() {
        let mut c = fixed();
        c.extend(request(opt::EXPORT_NAME, b"disk"));
        let mut s = Script { input: io::Cursor::new(c), output: Vec::new() };
        let agreed = negotiate(&mut s, &exports(), 1).unwrap().unwrap();
        assert_eq!(agreed, Agreed { export: 0, structured: false, allocation: false });
        let e = ExportName::decode(s.output[Greeting::LEN..].try_into().unwrap());
        assert_eq!(e.size, 1 << 20);
        let mut c = fixed();
        c.extend(request(opt::EXPORT_NAME, b"nope"));
        assert_eq!(run(&c).0.unwrap(), None, "an unknown name closes the connection");
    }

    #[test]
    fn clients_without_fixed_newstyle_or_with_unknown_flags_are_closed() {
        assert_eq!(run(&0u32.to_be_bytes()).0.unwrap(), None);
        assert_eq!(run(&(1u32 | 1 << 7).to_be_bytes()).0.unwrap(), None);
    }

    #[test]
    fn large_option_data_is_read_past_and_refused() {
        let mut c = fixed();
        c.extend(request(opt::GO, &vec![0; MAX_OPTION_DATA as usize + 1]));
        c.extend(request(opt::ABORT, &[]));
        let (result, replies) = run(&c);
        assert_eq!(result.unwrap(), None);
        assert_eq!(replies[0].1, rep::ERR_TOO_BIG);
        let mut c = fixed();
        c.extend(crate::wire::option::OptionHeader { option: opt::GO, len: u32::MAX }.encode());
        assert!(run(&c).0.is_err(), "more than 64 KiB is a protocol error");
    }

    /// Random bytes after the client's flags: negotiation ends, with an error or not, and never
    /// panics or allocates beyond its bound.
    #[test]
    fn negotiation_survives_random_input() {
        let mut next = crate::wire::random_stream(0x1234_5678_9abc_def1);
        let options =
            [opt::GO, opt::INFO, opt::LIST, opt::SET_META_CONTEXT, opt::LIST_META_CONTEXT, opt::STRUCTURED_REPLY];
        for _ in 0..5_000 {
            let mut c = fixed();
            for _ in 0..(next() % 4) {
                let len = (next() % 24) as usize;
                let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                if len >= 4 && next().is_multiple_of(2) {
                    data[..4].copy_from_slice(&((next() % 8) as u32).to_be_bytes());
                }
                c.extend(request(options[(next() % 6) as usize], &data));
            }
            let len = (next() % 40) as usize;
            c.extend((0..len).map(|_| next() as u8));
            let _ = run(&c);
        }
    }
}
