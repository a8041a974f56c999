//! Typed messages (docs/PROTOCOL.md, "Messages") and their encoding.

use crate::error::{Error, ErrorKind, Result};
use crate::protocol::MAX_DATA;
use crate::protocol::frame::{Decoder, Encoder};

/// A 16-byte truncated keyed BLAKE3 hash.
pub type Hash = [u8; 16];

/// Role of an opened endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Read only, never written.
    Source,
    /// Written.
    Target,
}

/// `Open` flag bits.
pub mod open_flags {
    /// Create a missing file.
    pub const CREATE: u32 = 1;
    /// Open read-only; a missing path is reported as absent.
    pub const READ_ONLY: u32 = 2;
    /// No `O_EXCL` on block devices.
    pub const FORCE: u32 = 4;
    /// Zero devices by discarding where that guarantees zeros.
    pub const DISCARD: u32 = 8;
    /// Keep read pages in the page cache.
    pub const KEEP_CACHE: u32 = 16;
    /// Create a missing file as a compressed image at `Open.level` (`sync --compress`).
    pub const COMPRESS: u32 = 32;
    /// A source seen through its filesystems (`--fs-aware`): their free blocks are unused
    /// (`Unused`), and `Filesystem` replies before `Opened` say what was found.
    pub const FS_AWARE: u32 = 64;
    /// Every defined bit.
    pub const ALL: u32 = 127;
}

/// `Data` codecs.
pub mod codec {
    /// Payload is the bytes themselves.
    pub const RAW: u8 = 0;
    /// Payload is one zstd frame.
    pub const ZSTD: u8 = 1;
}

/// Bulk data: `raw_len` bytes at `offset`, encoded with `codec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Where the bytes go.
    pub offset: u64,
    /// [`codec`] value.
    pub codec: u8,
    /// Length once decoded.
    pub raw_len: u32,
    /// Encoded bytes.
    pub payload: Vec<u8>,
}

/// Every message of the protocol, in both directions.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)] // Fields are specified in docs/PROTOCOL.md, table "Messages".
pub enum Msg {
    // client -> peer
    Hello {
        version: u32,
        features: u64,
        want_exe_hash: bool,
    },
    Open {
        role: Role,
        flags: u32,
        mode: u32,
        /// The source's size, for a target that is created with it (`loop://FILE`); 0: none.
        size: u64,
        path: Vec<u8>,
        name: Vec<u8>,
        /// The zstd level of a compressed image created (with `COMPRESS`); 0 otherwise.
        level: i32,
    },
    SetSize {
        size: u64,
    },
    Scan {
        key: [u8; 32],
        block: u32,
        end: u64,
        data_len: u64,
        threads: u16,
        /// Read the endpoint at most this many bytes per second (`--bwlimit`, for the source);
        /// 0 for no limit.
        rate: u64,
        /// Fingerprint the endpoint as it is read (`ScanDone.fingerprint`): asked of a source
        /// only when its target records a delta or a backup point, which keeps it.
        fingerprint: bool,
        /// Skip what the source's changed-block map says is as at its mark (`Clean`): the
        /// target is the copy made then. Never for a verification.
        changes: bool,
        /// A speculative scan, sent right behind `Open`: start it only if the endpoint opened
        /// exists with exactly this size; otherwise ignore it, without a reply.
        only_if_size: Option<u64>,
    },
    Ack {
        chunks: u64,
    },
    Groups {
        chunk: u64,
    },
    Leaves {
        chunk: u64,
        group: u32,
    },
    Read {
        offset: u64,
        len: u32,
        compress: i32,
    },
    Write(Chunk),
    Zero {
        offset: u64,
        len: u64,
    },
    Flush,
    /// The transfer ended early (an error or an interruption): make what was written durable,
    /// but commit nothing that claims to be complete (a backup point or a delta is discarded;
    /// an undo log, which covers what was written, is committed).
    FlushPartial,
    /// The transfer failed: remove the target if this session created it (a file of the full
    /// size that holds nothing, or part, of the source looks like a copy and is not one).
    Discard,
    /// Before success is reported: is what the source read still what it holds (a snapshot
    /// that overflowed while it was read is not)? Reply `Done`, or an error.
    CheckIntact,
    /// The fingerprint of the image the target now holds (the source's, from its scan), for a
    /// target that records a delta; others ignore it. Sent before `Flush`.
    Fingerprint {
        after: [u8; 32],
    },
    Copy {
        end: u64,
        data_len: u64,
        compress: i32,
        threads: u16,
    },
    Bye,
    Cancel,
    OpenChain {
        dir: Vec<u8>,
        role: Role,
        at_kind: u8,
        at: i64,
        comment: Vec<u8>,
        source: Vec<u8>,
        block: u32,
        /// The source's size, for the chain's same-image check; 0 skips it (`backup --force`).
        source_size: u64,
        /// A new chain's base is a compressed image at this zstd level; 0: raw.
        level: i32,
    },
    Job {
        request: Vec<u8>,
    },
    Put {
        path: Vec<u8>,
        mode: u32,
    },
    Get {
        path: Vec<u8>,
        compress: i32,
    },
    Record {
        path: Vec<u8>,
        comment: Vec<u8>,
        source: Vec<u8>,
        block: u32,
    },
    Undo {
        path: Vec<u8>,
        comment: Vec<u8>,
    },
    // peer -> client
    HelloReply {
        version: u32,
        features: u64,
        tool_version: Vec<u8>,
        boot_id: Vec<u8>,
        exe_hash: Vec<u8>,
    },
    Opened {
        /// False for a target that is not there (a dry run's), which reads as empty.
        exists: bool,
        size: u64,
        identity_tag: u8,
        id_a: u64,
        id_b: u64,
        created: bool,
        /// Permission bits of a regular file (0 otherwise), given to a copy created elsewhere.
        mode: u32,
        /// What the endpoint can do (`Caps::to_bits`).
        caps: u32,
        /// Its logical block size.
        block_size: u32,
        /// The path opened, when it is not the one asked for (a directory destination takes
        /// the source's file name); empty otherwise.
        path: Vec<u8>,
    },
    Summary {
        chunk: u64,
        zero: bool,
        hash: Hash,
    },
    /// Chunks `[first, first + count)` are holes in the endpoint's allocation map: zeros, neither
    /// read nor hashed. Stands for a zero `Summary` of each.
    Holes {
        first: u64,
        count: u64,
    },
    /// Chunks `[first, first + count)` are as at the source's changed-block mark (`Scan.changes`):
    /// the same as the target's, neither read nor hashed.
    Clean {
        first: u64,
        count: u64,
    },
    /// Bytes `[start, start + len)` of a source opened `FS_AWARE` are free blocks of its
    /// filesystem: hashed as zeros, never read, and not to be written on the target. Sent before
    /// the `Summary` or `Holes` of every chunk it touches; a chunk it covers whole gets nothing
    /// else.
    Unused {
        start: u64,
        len: u64,
    },
    /// One region of a source opened `FS_AWARE`, before `Opened` ([`crate::endpoint::FsRegion`];
    /// empty `filesystem` and `whole` stand for none).
    Filesystem {
        start: u64,
        len: u64,
        used: u64,
        filesystem: Vec<u8>,
        detail: Vec<u8>,
        whole: Vec<u8>,
    },
    ScanDone {
        chunks: u64,
        /// Bytes the scan read from the endpoint (holes are not read).
        read: u64,
        /// The fingerprint of the whole endpoint ([`crate::fingerprint`]), when the scan covered
        /// exactly all of it; zeros otherwise.
        fingerprint: [u8; 32],
    },
    GroupHashes {
        chunk: u64,
        zero: Vec<u8>,
        hashes: Vec<u8>,
    },
    LeafHashes {
        chunk: u64,
        group: u32,
        zero: Vec<u8>,
        hashes: Vec<u8>,
    },
    Data(Chunk),
    Zeros {
        offset: u64,
        len: u64,
    },
    ReadDone {
        offset: u64,
        len: u64,
        /// Bytes read from the endpoint for this answer.
        read: u64,
    },
    Done,
    /// The agent is alive (sent every few seconds whatever it is doing; see "Liveness").
    Alive,
    Error {
        kind: ErrorKind,
        message: String,
        /// What would help ([`crate::error::Hint`]).
        hint: Option<crate::error::Hint>,
    },
    Progress {
        phase: u8,
        counters: [u64; 7],
    },
    Warning {
        text: String,
    },
    JobDone {
        result: Vec<u8>,
    },
    Path {
        path: Vec<u8>,
    },
}

mod tag {
    pub const HELLO: u8 = 0x01;
    pub const OPEN: u8 = 0x02;
    pub const SET_SIZE: u8 = 0x03;
    pub const SCAN: u8 = 0x04;
    pub const ACK: u8 = 0x05;
    pub const GROUPS: u8 = 0x06;
    pub const LEAVES: u8 = 0x07;
    pub const READ: u8 = 0x08;
    pub const WRITE: u8 = 0x09;
    pub const ZERO: u8 = 0x0A;
    pub const FLUSH: u8 = 0x0B;
    pub const COPY: u8 = 0x0C;
    pub const BYE: u8 = 0x0D;
    pub const CANCEL: u8 = 0x0F;
    pub const OPEN_CHAIN: u8 = 0x11;
    pub const JOB: u8 = 0x12;
    pub const PUT: u8 = 0x13;
    pub const GET: u8 = 0x14;
    pub const RECORD: u8 = 0x15;
    pub const UNDO: u8 = 0x16;
    pub const FLUSH_PARTIAL: u8 = 0x17;
    pub const DISCARD: u8 = 0x18;
    pub const CHECK_INTACT: u8 = 0x19;
    pub const FINGERPRINT: u8 = 0x1A;
    pub const HELLO_REPLY: u8 = 0x81;
    pub const OPENED: u8 = 0x82;
    pub const SUMMARY: u8 = 0x83;
    pub const SCAN_DONE: u8 = 0x84;
    pub const GROUP_HASHES: u8 = 0x85;
    pub const LEAF_HASHES: u8 = 0x86;
    pub const DATA: u8 = 0x87;
    pub const ZEROS: u8 = 0x88;
    pub const READ_DONE: u8 = 0x89;
    pub const DONE: u8 = 0x8A;
    pub const PROGRESS: u8 = 0x8B;
    pub const WARNING: u8 = 0x8C;
    pub const ERROR: u8 = 0x8F;
    pub const JOB_DONE: u8 = 0x90;
    pub const PATH: u8 = 0x91;
    pub const ALIVE: u8 = 0x92;
    pub const HOLES: u8 = 0x93;
    pub const CLEAN: u8 = 0x94;
    pub const UNUSED: u8 = 0x95;
    pub const FILESYSTEM: u8 = 0x96;
}

fn chunk(kind: u8, c: &Chunk) -> Vec<u8> {
    let mut e = Encoder::new(kind, c.payload.len() + 17);
    e.u64(c.offset).u8(c.codec).u32(c.raw_len).bytes(&c.payload);
    e.finish()
}

fn decode_chunk(d: &mut Decoder<'_>) -> Result<Chunk> {
    let offset = d.u64()?;
    let codec = d.u8()?;
    let raw_len = d.u32()?;
    let payload = d.bytes()?.to_vec();
    if codec > codec::ZSTD {
        return Err(Error::protocol(format!("unknown data codec {codec}")));
    }
    if raw_len as usize > MAX_DATA || (codec == codec::RAW && payload.len() != raw_len as usize) {
        return Err(Error::protocol(format!(
            "bad data frame: {} payload bytes for {raw_len} raw bytes",
            payload.len()
        )));
    }
    Ok(Chunk { offset, codec, raw_len, payload })
}

impl Msg {
    /// The `Error` reply for `e`.
    #[must_use]
    pub fn failure(e: &crate::Error) -> Msg {
        Msg::Error { kind: e.kind(), message: e.to_string(), hint: e.hint() }
    }

    /// Writes the message as one frame and returns its size. Data frames are written as header
    /// and payload, without first copying the payload into a frame buffer.
    pub fn write_to(&self, w: &mut impl std::io::Write) -> Result<u64> {
        let (kind, c) = match self {
            Msg::Data(c) => (tag::DATA, c),
            Msg::Write(c) => (tag::WRITE, c),
            other => {
                let frame = other.encode();
                crate::protocol::frame::write_frame(w, &frame)?;
                return Ok(frame.len() as u64);
            }
        };
        let mut head = Encoder::new(kind, 17);
        head.u64(c.offset).u8(c.codec).u32(c.raw_len).u32(c.payload.len() as u32);
        let mut head = head.finish();
        let body = (head.len() - 4 + c.payload.len()) as u32;
        head[..4].copy_from_slice(&body.to_le_bytes());
        crate::protocol::frame::write_frame(w, &head)?;
        crate::protocol::frame::write_frame(w, &c.payload)?;
        Ok((head.len() + c.payload.len()) as u64)
    }

    /// The message as a complete frame.
    #[must_use]
    #[allow(clippy::too_many_lines)] // One arm per message, mirroring the spec's table.
    pub fn encode(&self) -> Vec<u8> {
        use tag::{
            ACK, ALIVE, BYE, CHECK_INTACT, CLEAN, COPY, DATA, DISCARD, DONE, ERROR, FINGERPRINT, FLUSH, FLUSH_PARTIAL,
            GROUP_HASHES, GROUPS, HELLO, HELLO_REPLY, HOLES, LEAF_HASHES, LEAVES, OPEN, OPENED, READ, READ_DONE, SCAN,
            SCAN_DONE, SET_SIZE, SUMMARY, WRITE, ZERO, ZEROS,
        };
        let e = |kind| Encoder::new(kind, 64);
        match self {
            Msg::Hello { version, features, want_exe_hash } => {
                let mut x = e(HELLO);
                x.u32(*version).u64(*features).u8(u8::from(*want_exe_hash));
                x.finish()
            }
            Msg::Open { role, flags, mode, size, path, name, level } => {
                let mut x = e(OPEN);
                x.u8(u8::from(*role == Role::Target)).u32(*flags).u32(*mode).u64(*size).bytes(path).bytes(name);
                x.i32(*level);
                x.finish()
            }
            Msg::SetSize { size } => {
                let mut x = e(SET_SIZE);
                x.u64(*size);
                x.finish()
            }
            Msg::Scan { key, block, end, data_len, threads, rate, fingerprint, changes, only_if_size } => {
                let mut x = e(SCAN);
                x.raw(key).u32(*block).u64(*end).u64(*data_len).u16(*threads).u64(*rate);
                x.u8(u8::from(*fingerprint)).u8(u8::from(*changes));
                x.u8(u8::from(only_if_size.is_some())).u64(only_if_size.unwrap_or(0));
                x.finish()
            }
            Msg::Ack { chunks } => {
                let mut x = e(ACK);
                x.u64(*chunks);
                x.finish()
            }
            Msg::Groups { chunk } => {
                let mut x = e(GROUPS);
                x.u64(*chunk);
                x.finish()
            }
            Msg::Leaves { chunk, group } => {
                let mut x = e(LEAVES);
                x.u64(*chunk).u32(*group);
                x.finish()
            }
            Msg::Read { offset, len, compress } => {
                let mut x = e(READ);
                x.u64(*offset).u32(*len).i32(*compress);
                x.finish()
            }
            Msg::Write(c) => chunk(WRITE, c),
            Msg::Zero { offset, len } => {
                let mut x = e(ZERO);
                x.u64(*offset).u64(*len);
                x.finish()
            }
            Msg::Flush => e(FLUSH).finish(),
            Msg::FlushPartial => e(FLUSH_PARTIAL).finish(),
            Msg::Discard => e(DISCARD).finish(),
            Msg::CheckIntact => e(CHECK_INTACT).finish(),
            Msg::Fingerprint { after } => {
                let mut x = e(FINGERPRINT);
                x.raw(after);
                x.finish()
            }
            Msg::Copy { end, data_len, compress, threads } => {
                let mut x = e(COPY);
                x.u64(*end).u64(*data_len).i32(*compress).u16(*threads);
                x.finish()
            }
            Msg::Bye => e(BYE).finish(),
            Msg::HelloReply { version, features, tool_version, boot_id, exe_hash } => {
                let mut x = e(HELLO_REPLY);
                x.u32(*version).u64(*features).bytes(tool_version).bytes(boot_id).bytes(exe_hash);
                x.finish()
            }
            Msg::Opened { exists, size, identity_tag, id_a, id_b, created, mode, caps, block_size, path } => {
                let mut x = e(OPENED);
                x.u8(u8::from(*exists))
                    .u64(*size)
                    .u8(*identity_tag)
                    .u64(*id_a)
                    .u64(*id_b)
                    .u8(u8::from(*created))
                    .u32(*mode);
                x.u32(*caps).u32(*block_size).bytes(path);
                x.finish()
            }
            Msg::Summary { chunk, zero, hash } => {
                let mut x = e(SUMMARY);
                x.u64(*chunk).u8(u8::from(*zero)).raw(hash);
                x.finish()
            }
            Msg::Holes { first, count } => {
                let mut x = e(HOLES);
                x.u64(*first).u64(*count);
                x.finish()
            }
            Msg::Clean { first, count } => {
                let mut x = e(CLEAN);
                x.u64(*first).u64(*count);
                x.finish()
            }
            Msg::Unused { start, len } => {
                let mut x = e(tag::UNUSED);
                x.u64(*start).u64(*len);
                x.finish()
            }
            Msg::Filesystem { start, len, used, filesystem, detail, whole } => {
                let mut x = e(tag::FILESYSTEM);
                x.u64(*start).u64(*len).u64(*used).bytes(filesystem).bytes(detail).bytes(whole);
                x.finish()
            }
            Msg::ScanDone { chunks, read, fingerprint } => {
                let mut x = e(SCAN_DONE);
                x.u64(*chunks).u64(*read).raw(fingerprint);
                x.finish()
            }
            Msg::GroupHashes { chunk, zero, hashes } => {
                let mut x = Encoder::new(GROUP_HASHES, hashes.len() + zero.len() + 16);
                x.u64(*chunk).bytes(zero).bytes(hashes);
                x.finish()
            }
            Msg::LeafHashes { chunk, group, zero, hashes } => {
                let mut x = Encoder::new(LEAF_HASHES, hashes.len() + zero.len() + 20);
                x.u64(*chunk).u32(*group).bytes(zero).bytes(hashes);
                x.finish()
            }
            Msg::Data(c) => chunk(DATA, c),
            Msg::Zeros { offset, len } => {
                let mut x = e(ZEROS);
                x.u64(*offset).u64(*len);
                x.finish()
            }
            Msg::ReadDone { offset, len, read } => {
                let mut x = e(READ_DONE);
                x.u64(*offset).u64(*len).u64(*read);
                x.finish()
            }
            Msg::Done => e(DONE).finish(),
            Msg::Alive => e(ALIVE).finish(),
            Msg::Error { kind, message, hint } => {
                let mut x = e(ERROR);
                x.u8(kind.to_wire()).bytes(message.as_bytes()).u8(crate::error::Hint::to_wire(*hint));
                x.finish()
            }
            Msg::Job { request } => {
                let mut x = Encoder::new(tag::JOB, request.len() + 4);
                x.bytes(request);
                x.finish()
            }
            Msg::Put { path, mode } => {
                let mut x = e(tag::PUT);
                x.bytes(path).u32(*mode);
                x.finish()
            }
            Msg::Get { path, compress } => {
                let mut x = e(tag::GET);
                x.bytes(path).i32(*compress);
                x.finish()
            }
            Msg::Record { path, comment, source, block } => {
                let mut x = e(tag::RECORD);
                x.bytes(path).bytes(comment).bytes(source).u32(*block);
                x.finish()
            }
            Msg::Undo { path, comment } => {
                let mut x = e(tag::UNDO);
                x.bytes(path).bytes(comment);
                x.finish()
            }
            Msg::JobDone { result } => {
                let mut x = Encoder::new(tag::JOB_DONE, result.len() + 4);
                x.bytes(result);
                x.finish()
            }
            Msg::Path { path } => {
                let mut x = e(tag::PATH);
                x.bytes(path);
                x.finish()
            }
            Msg::Cancel => e(tag::CANCEL).finish(),
            Msg::OpenChain { dir, role, at_kind, at, comment, source, block, source_size, level } => {
                let mut x = e(tag::OPEN_CHAIN);
                x.bytes(dir)
                    .u8(u8::from(*role == Role::Target))
                    .u8(*at_kind)
                    .i64(*at)
                    .bytes(comment)
                    .bytes(source)
                    .u32(*block)
                    .u64(*source_size);
                x.i32(*level);
                x.finish()
            }
            Msg::Progress { phase, counters } => {
                let mut x = e(tag::PROGRESS);
                x.u8(*phase);
                x.u64s(counters);
                x.finish()
            }
            Msg::Warning { text } => {
                let mut x = e(tag::WARNING);
                x.bytes(text.as_bytes());
                x.finish()
            }
        }
    }

    /// Decodes a frame of type `kind` with `payload`.
    #[allow(clippy::too_many_lines)] // One arm per message, mirroring the spec's table.
    pub fn decode(kind: u8, payload: &[u8]) -> Result<Msg> {
        let name = name_of(kind).ok_or_else(|| Error::protocol(format!("unknown message type 0x{kind:02x}")))?;
        let mut d = Decoder::new(payload, name);
        let msg = match kind {
            tag::HELLO => Msg::Hello { version: d.u32()?, features: d.u64()?, want_exe_hash: flag(d.u8()?)? },
            tag::OPEN => {
                let role = match d.u8()? {
                    0 => Role::Source,
                    1 => Role::Target,
                    r => return Err(Error::protocol(format!("unknown role {r}"))),
                };
                let flags = d.u32()?;
                if flags & !open_flags::ALL != 0 {
                    return Err(Error::protocol(format!("unknown open flags 0x{flags:x}")));
                }
                Msg::Open {
                    role,
                    flags,
                    mode: d.u32()?,
                    size: d.u64()?,
                    path: d.bytes()?.to_vec(),
                    name: d.bytes()?.to_vec(),
                    level: d.i32()?,
                }
            }
            tag::SET_SIZE => Msg::SetSize { size: d.u64()? },
            tag::SCAN => Msg::Scan {
                key: d.fixed()?,
                block: d.u32()?,
                end: d.u64()?,
                data_len: d.u64()?,
                threads: d.u16()?,
                rate: d.u64()?,
                fingerprint: flag(d.u8()?)?,
                changes: flag(d.u8()?)?,
                only_if_size: {
                    let only_if = flag(d.u8()?)?;
                    let size = d.u64()?;
                    only_if.then_some(size)
                },
            },
            tag::ACK => Msg::Ack { chunks: d.u64()? },
            tag::GROUPS => Msg::Groups { chunk: d.u64()? },
            tag::LEAVES => Msg::Leaves { chunk: d.u64()?, group: d.u32()? },
            tag::READ => Msg::Read { offset: d.u64()?, len: d.u32()?, compress: d.i32()? },
            tag::WRITE => Msg::Write(decode_chunk(&mut d)?),
            tag::ZERO => Msg::Zero { offset: d.u64()?, len: d.u64()? },
            tag::FLUSH => Msg::Flush,
            tag::FLUSH_PARTIAL => Msg::FlushPartial,
            tag::DISCARD => Msg::Discard,
            tag::CHECK_INTACT => Msg::CheckIntact,
            tag::FINGERPRINT => Msg::Fingerprint { after: d.fixed()? },
            tag::COPY => Msg::Copy { end: d.u64()?, data_len: d.u64()?, compress: d.i32()?, threads: d.u16()? },
            tag::BYE => Msg::Bye,
            tag::HELLO_REPLY => Msg::HelloReply {
                version: d.u32()?,
                features: d.u64()?,
                tool_version: d.bytes()?.to_vec(),
                boot_id: d.bytes()?.to_vec(),
                exe_hash: d.bytes()?.to_vec(),
            },
            tag::OPENED => Msg::Opened {
                exists: flag(d.u8()?)?,
                size: d.u64()?,
                identity_tag: d.u8()?,
                id_a: d.u64()?,
                id_b: d.u64()?,
                created: flag(d.u8()?)?,
                mode: d.u32()?,
                caps: d.u32()?,
                block_size: d.u32()?,
                path: d.bytes()?.to_vec(),
            },
            tag::SUMMARY => Msg::Summary { chunk: d.u64()?, zero: flag(d.u8()?)?, hash: d.fixed()? },
            tag::HOLES => Msg::Holes { first: d.u64()?, count: d.u64()? },
            tag::CLEAN => Msg::Clean { first: d.u64()?, count: d.u64()? },
            tag::UNUSED => Msg::Unused { start: d.u64()?, len: d.u64()? },
            tag::FILESYSTEM => Msg::Filesystem {
                start: d.u64()?,
                len: d.u64()?,
                used: d.u64()?,
                filesystem: d.bytes()?.to_vec(),
                detail: d.bytes()?.to_vec(),
                whole: d.bytes()?.to_vec(),
            },
            tag::SCAN_DONE => Msg::ScanDone { chunks: d.u64()?, read: d.u64()?, fingerprint: d.fixed()? },
            tag::GROUP_HASHES => {
                let chunk = d.u64()?;
                let (zero, hashes) = hash_list(&mut d)?;
                Msg::GroupHashes { chunk, zero, hashes }
            }
            tag::LEAF_HASHES => {
                let chunk = d.u64()?;
                let group = d.u32()?;
                let (zero, hashes) = hash_list(&mut d)?;
                Msg::LeafHashes { chunk, group, zero, hashes }
            }
            tag::DATA => Msg::Data(decode_chunk(&mut d)?),
            tag::ZEROS => Msg::Zeros { offset: d.u64()?, len: d.u64()? },
            tag::READ_DONE => Msg::ReadDone { offset: d.u64()?, len: d.u64()?, read: d.u64()? },
            tag::DONE => Msg::Done,
            tag::ALIVE => Msg::Alive,
            tag::ERROR => Msg::Error {
                kind: ErrorKind::from_wire(d.u8()?),
                message: String::from_utf8_lossy(d.bytes()?).into_owned(),
                hint: crate::error::Hint::from_wire(d.u8()?),
            },
            tag::CANCEL => Msg::Cancel,
            tag::OPEN_CHAIN => {
                let dir = d.bytes()?.to_vec();
                let role = match d.u8()? {
                    0 => Role::Source,
                    1 => Role::Target,
                    r => return Err(Error::protocol(format!("unknown role {r}"))),
                };
                let at_kind = d.u8()?;
                if at_kind > 2 {
                    return Err(Error::protocol(format!("unknown point kind {at_kind}")));
                }
                Msg::OpenChain {
                    dir,
                    role,
                    at_kind,
                    at: d.i64()?,
                    comment: d.bytes()?.to_vec(),
                    source: d.bytes()?.to_vec(),
                    block: d.u32()?,
                    source_size: d.u64()?,
                    level: d.i32()?,
                }
            }
            tag::PROGRESS => Msg::Progress { phase: d.u8()?, counters: counters(&mut d)? },
            tag::WARNING => Msg::Warning { text: String::from_utf8_lossy(d.bytes()?).into_owned() },
            tag::JOB => Msg::Job { request: d.bytes()?.to_vec() },
            tag::PUT => Msg::Put { path: d.bytes()?.to_vec(), mode: d.u32()? },
            tag::GET => Msg::Get { path: d.bytes()?.to_vec(), compress: d.i32()? },
            tag::RECORD => Msg::Record {
                path: d.bytes()?.to_vec(),
                comment: d.bytes()?.to_vec(),
                source: d.bytes()?.to_vec(),
                block: d.u32()?,
            },
            tag::UNDO => Msg::Undo { path: d.bytes()?.to_vec(), comment: d.bytes()?.to_vec() },
            tag::JOB_DONE => Msg::JobDone { result: d.bytes()?.to_vec() },
            tag::PATH => Msg::Path { path: d.bytes()?.to_vec() },
            _ => unreachable!("name_of knows every tag"),
        };
        d.end()?;
        Ok(msg)
    }
}

fn counters(d: &mut Decoder<'_>) -> Result<[u64; 7]> {
    let mut out = [0u64; 7];
    for c in &mut out {
        *c = d.u64()?;
    }
    Ok(out)
}

fn flag(v: u8) -> Result<bool> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(Error::protocol(format!("boolean field holds {v}"))),
    }
}

/// A zero-flag list and the matching hashes: one flag byte per 16-byte hash.
fn hash_list(d: &mut Decoder<'_>) -> Result<(Vec<u8>, Vec<u8>)> {
    let zero = d.bytes()?.to_vec();
    let hashes = d.bytes()?.to_vec();
    if hashes.len() != zero.len() * 16 || zero.iter().any(|&z| z > 1) {
        return Err(Error::protocol("hash list and zero flags do not match"));
    }
    Ok((zero, hashes))
}

fn name_of(kind: u8) -> Option<&'static str> {
    Some(match kind {
        tag::HELLO => "Hello",
        tag::OPEN => "Open",
        tag::SET_SIZE => "SetSize",
        tag::SCAN => "Scan",
        tag::ACK => "Ack",
        tag::GROUPS => "Groups",
        tag::LEAVES => "Leaves",
        tag::READ => "Read",
        tag::WRITE => "Write",
        tag::ZERO => "Zero",
        tag::FLUSH => "Flush",
        tag::FLUSH_PARTIAL => "FlushPartial",
        tag::DISCARD => "Discard",
        tag::CHECK_INTACT => "CheckIntact",
        tag::FINGERPRINT => "Fingerprint",
        tag::COPY => "Copy",
        tag::BYE => "Bye",
        tag::HELLO_REPLY => "Hello reply",
        tag::OPENED => "Opened",
        tag::SUMMARY => "Summary",
        tag::SCAN_DONE => "ScanDone",
        tag::HOLES => "Holes",
        tag::CLEAN => "Clean",
        tag::UNUSED => "Unused",
        tag::FILESYSTEM => "Filesystem",
        tag::GROUP_HASHES => "Groups reply",
        tag::LEAF_HASHES => "Leaves reply",
        tag::DATA => "Data",
        tag::ZEROS => "Zeros",
        tag::READ_DONE => "ReadDone",
        tag::DONE => "Done",
        tag::ALIVE => "Alive",
        tag::ERROR => "Error",
        tag::CANCEL => "Cancel",
        tag::PROGRESS => "Progress",
        tag::WARNING => "Warning",
        tag::OPEN_CHAIN => "OpenChain",
        tag::JOB => "Job",
        tag::PUT => "Put",
        tag::GET => "Get",
        tag::RECORD => "Record",
        tag::UNDO => "Undo",
        tag::JOB_DONE => "JobDone",
        tag::PATH => "Path",
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
