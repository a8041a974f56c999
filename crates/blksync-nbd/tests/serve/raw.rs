//! A raw NBD client for what no real client does: garbage, huge lengths, requests past the end,
//! a disconnect in the middle of a request; and to see exactly which chunks a reply has.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use blksync_nbd::wire::option::{Go, Greeting, ReplyHeader as OptionReply, request};
use blksync_nbd::wire::transmission::{ErrorChunk, OffsetHole, ReplyHeader, Request};
use blksync_nbd::wire::{client_flag, cmd, opt, rep, reply};

/// How long a test waits for a reply before it fails (never a synchronisation: a bound).
const PATIENCE: Duration = Duration::from_secs(60);

pub struct Raw {
    s: UnixStream,
}

fn greet(path: &Path) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut greeting = [0; Greeting::LEN];
    s.read_exact(&mut greeting).unwrap();
    Greeting::decode(&greeting).unwrap();
    s
}

impl Raw {
    /// Negotiates `export` with `NBD_OPT_GO`, with structured replies or not.
    pub fn connect(path: &Path, export: &str, structured: bool) -> Raw {
        let mut s = greet(path);
        s.write_all(&(client_flag::FIXED_NEWSTYLE | client_flag::NO_ZEROES).to_be_bytes()).unwrap();
        let mut raw = Raw { s };
        if structured {
            raw.write(&request(opt::STRUCTURED_REPLY, &[]));
            assert_eq!(raw.option_reply().0, rep::ACK);
        }
        raw.write(&request(opt::GO, &Go { export: export.into(), requests: vec![] }.encode()));
        loop {
            match raw.option_reply().0 {
                rep::INFO => {}
                rep::ACK => return raw,
                other => panic!("GO answered {other:#x}"),
            }
        }
    }

    /// Sends `bytes` after the greeting; true when the server then closes the connection.
    pub fn garbage(path: &Path, bytes: &[u8]) -> bool {
        let mut raw = Raw { s: greet(path) };
        raw.write(bytes);
        raw.closed()
    }

    fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0; OptionReply::LEN];
        self.s.read_exact(&mut h).unwrap();
        let h = OptionReply::decode(&h).unwrap();
        let mut data = vec![0; h.len as usize];
        self.s.read_exact(&mut data).unwrap();
        (h.kind, data)
    }

    pub fn write(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// A request of `payload.len()` bytes (512 when empty), with the payload for a WRITE.
    pub fn send(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, payload: &[u8]) {
        let len = if payload.is_empty() { 512 } else { payload.len() as u32 };
        self.send_len(kind, flags, cookie, offset, len);
        if kind == cmd::WRITE {
            self.write(payload);
        }
    }

    /// A request header only.
    pub fn send_len(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        self.write(&Request { flags, kind, cookie, offset, len }.encode());
    }

    fn header(&mut self) -> ReplyHeader {
        let mut magic = [0; 4];
        self.s.read_exact(&mut magic).unwrap();
        let len = ReplyHeader::len_for(magic).unwrap();
        let mut rest = vec![0; len];
        rest[..4].copy_from_slice(&magic);
        self.s.read_exact(&mut rest[4..]).unwrap();
        ReplyHeader::decode(&rest).unwrap()
    }

    fn payload(&mut self, len: u32) -> Vec<u8> {
        let mut data = vec![0; len as usize];
        self.s.read_exact(&mut data).unwrap();
        data
    }

    /// A simple reply: its cookie and error.
    pub fn simple_reply(&mut self) -> (u64, u32) {
        match self.header() {
            ReplyHeader::Simple(s) => (s.cookie, s.error),
            other @ ReplyHeader::Chunk(_) => panic!("expected a simple reply, got {other:?}"),
        }
    }

    /// The data of a read of `len` bytes, or the error, from a simple or a structured reply.
    pub fn read_reply(&mut self, cookie: u64, len: u32) -> Result<Vec<u8>, u32> {
        let mut out = vec![0; len as usize];
        let mut error = None;
        loop {
            match self.header() {
                ReplyHeader::Simple(s) => {
                    assert_eq!(s.cookie, cookie);
                    if s.error != 0 {
                        return Err(s.error);
                    }
                    return Ok(self.payload(len));
                }
                ReplyHeader::Chunk(c) => {
                    assert_eq!(c.cookie, cookie);
                    let data = self.payload(c.len);
                    match c.kind {
                        reply::OFFSET_DATA => {
                            let at = u64::from_be_bytes(data[..8].try_into().unwrap()) as usize;
                            out[at..at + data.len() - 8].copy_from_slice(&data[8..]);
                        }
                        reply::OFFSET_HOLE => {
                            let h = OffsetHole::decode(&data).unwrap();
                            out[h.offset as usize..h.offset as usize + h.size as usize].fill(0);
                        }
                        reply::NONE => {}
                        kind => error = Some(ErrorChunk::decode(kind, &data).unwrap().error),
                    }
                    if c.done() {
                        return error.map_or(Ok(out), Err);
                    }
                }
            }
        }
    }

    /// The chunks of a structured reply, in words: `data OFFSET+LEN`, `hole OFFSET+LEN`, `none`,
    /// `error N`, with ` done` on the last.
    pub fn chunks(&mut self, cookie: u64) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let ReplyHeader::Chunk(c) = self.header() else { panic!("a simple reply") };
            assert_eq!(c.cookie, cookie);
            let data = self.payload(c.len);
            let mut word = match c.kind {
                reply::OFFSET_DATA => {
                    format!("data {}+{}", u64::from_be_bytes(data[..8].try_into().unwrap()), data.len() - 8)
                }
                reply::OFFSET_HOLE => {
                    let h = OffsetHole::decode(&data).unwrap();
                    format!("hole {}+{}", h.offset, h.size)
                }
                reply::NONE => "none".to_string(),
                kind => format!("error {}", ErrorChunk::decode(kind, &data).unwrap().error),
            };
            if c.done() {
                if c.kind != reply::NONE {
                    word.push_str(" done");
                }
                out.push(word);
                return out;
            }
            out.push(word);
        }
    }

    /// True when the server closed the connection (end of file or a reset), after any bytes it
    /// still sent.
    pub fn closed(&mut self) -> bool {
        let mut sink = Vec::new();
        match self.s.read_to_end(&mut sink) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}
