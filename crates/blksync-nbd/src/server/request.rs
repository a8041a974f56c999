//! The server's check of a request header before anything is done or allocated for it
//! (`docs/NBD.md`, "Commands"): a request either becomes a [`Command`] whose offset, length and
//! payload are within the export and the limits, or a [`Refusal`] with the error to reply and
//! the payload bytes to read past so that the stream stays framed. Pure, so it is fuzzed.

use crate::wire::transmission::Request;
use crate::wire::{cmd, cmd_flag, errno};

/// What a connection allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// The export's size.
    pub size: u64,
    /// Every offset and length is a multiple of it (a power of two).
    pub min_block: u32,
    /// The largest READ or WRITE.
    pub max_payload: u32,
    /// Writes are allowed.
    pub writable: bool,
    /// `base:allocation` was selected: `BLOCK_STATUS` is allowed.
    pub allocation: bool,
    /// Zeroing is cheap: `FAST_ZERO` may succeed.
    pub zero_is_cheap: bool,
}

/// A checked request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    /// Read `len` bytes; `df`: in one content chunk.
    Read { offset: u64, len: u32, df: bool },
    /// Write the `len` bytes of payload that follow.
    Write { offset: u64, len: u32, fua: bool },
    /// End the connection.
    Disc,
    /// Make completed writes durable.
    Flush,
    /// Discard (as a cheap zero, or nothing).
    Trim { offset: u64, len: u32, fua: bool },
    /// Make the range read as zeros; `no_hole`: allocated.
    WriteZeroes { offset: u64, len: u32, no_hole: bool, fua: bool },
    /// Allocation status; `one`: a single extent.
    BlockStatus { offset: u64, len: u32, one: bool },
}

impl Command {
    /// Changes the export: a later FLUSH waits for it.
    pub(crate) fn writes(&self) -> bool {
        matches!(self, Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. })
    }

    /// Bytes of buffer it needs: a write's payload, a read's data.
    pub(crate) fn buffer(&self) -> u32 {
        match *self {
            Command::Read { len, .. } | Command::Write { len, .. } => len,
            _ => 0,
        }
    }
}

/// A request refused before it was executed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The error value to reply.
    pub errno: u32,
    /// Why, for a structured error chunk.
    pub message: String,
    /// Payload bytes that follow the header and must be read and dropped.
    pub discard: u32,
}

fn refuse(errno: u32, discard: u32, message: String) -> Refusal {
    Refusal { errno, message, discard }
}

/// Checks `r` against `limits`.
pub(crate) fn check(r: &Request, limits: &Limits) -> Result<Command, Refusal> {
    let (offset, len) = (r.offset, r.len);
    let payload = if r.kind == cmd::WRITE { len } else { 0 };
    let end = offset.checked_add(u64::from(len));
    let inside = end.is_some_and(|end| end <= limits.size);
    let align = u64::from(limits.min_block.max(1));
    let aligned = offset % align == 0 && u64::from(len) % align == 0;
    let past_end = || format!("{len} bytes at offset {offset} pass the end of the export ({} bytes)", limits.size);
    let read_only = || refuse(errno::EPERM, payload, "the export is read-only".into());
    let has = |flag: u16| r.flags & flag != 0;

    if matches!(r.kind, cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM) && !limits.writable {
        return Err(read_only());
    }
    if matches!(r.kind, cmd::READ | cmd::WRITE) && len > limits.max_payload {
        return Err(refuse(
            errno::EINVAL,
            payload,
            format!("a request of {len} bytes is larger than the maximum payload of {} bytes", limits.max_payload),
        ));
    }
    if matches!(r.kind, cmd::READ | cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM | cmd::BLOCK_STATUS) {
        if !aligned {
            return Err(refuse(
                errno::EINVAL,
                payload,
                format!("{len} bytes at offset {offset} are not aligned to the minimum block of {align} bytes"),
            ));
        }
        if !inside {
            let value = if matches!(r.kind, cmd::WRITE | cmd::WRITE_ZEROES) { errno::ENOSPC } else { errno::EINVAL };
            return Err(refuse(value, payload, past_end()));
        }
    }
    let fua = has(cmd_flag::FUA);
    match r.kind {
        cmd::READ => Ok(Command::Read { offset, len, df: has(cmd_flag::DF) }),
        cmd::WRITE => Ok(Command::Write { offset, len, fua }),
        cmd::DISC => Ok(Command::Disc),
        cmd::FLUSH => Ok(Command::Flush),
        cmd::TRIM => Ok(Command::Trim { offset, len, fua }),
        cmd::WRITE_ZEROES => {
            let no_hole = has(cmd_flag::NO_HOLE);
            if has(cmd_flag::FAST_ZERO) && (no_hole || !limits.zero_is_cheap) {
                return Err(refuse(errno::ENOTSUP, 0, "zeroing here is no faster than writing".into()));
            }
            Ok(Command::WriteZeroes { offset, len, no_hole, fua })
        }
        cmd::BLOCK_STATUS if !limits.allocation => {
            Err(refuse(errno::EINVAL, 0, "block status without the base:allocation context selected".into()))
        }
        cmd::BLOCK_STATUS if len == 0 => Err(refuse(errno::EINVAL, 0, "block status of 0 bytes".into())),
        cmd::BLOCK_STATUS => Ok(Command::BlockStatus { offset, len, one: has(cmd_flag::REQ_ONE) }),
        other => Err(refuse(errno::EINVAL, 0, format!("command {other} is not supported"))),
    }
}

/// Runs the server's decoders over `data`: the request header (with the magic put in front)
/// and its check against limits taken from the data, asserting that a checked command stays
/// inside the export and its limits. For the fuzz target `nbd_server` and the random-input test;
/// it panics only on a bug.
pub(crate) fn exercise(data: &[u8]) {
    let Some(bytes) = data.get(..Request::LEN) else { return };
    let mut header = [0; Request::LEN];
    header.copy_from_slice(bytes);
    if data.len() > Request::LEN && data[Request::LEN] & 1 == 1 {
        header[..4].copy_from_slice(&crate::wire::REQUEST_MAGIC.to_be_bytes());
    }
    let Ok(r) = Request::decode(&header) else { return };
    let tail = &data[Request::LEN..];
    let byte = |i: usize| tail.get(i).copied().unwrap_or(0);
    let size = u64::from_be_bytes(std::array::from_fn(|i| byte(1 + i))) >> (byte(9) % 64);
    let limits = Limits {
        size,
        min_block: 1 << (byte(10) % 13),
        max_payload: 32 << 20,
        writable: byte(11) & 1 == 1,
        allocation: byte(11) & 2 == 2,
        zero_is_cheap: byte(11) & 4 == 4,
    };
    match check(&r, &limits) {
        Ok(c) => {
            if let Command::Read { offset, len, .. }
            | Command::Write { offset, len, .. }
            | Command::Trim { offset, len, .. }
            | Command::WriteZeroes { offset, len, .. }
            | Command::BlockStatus { offset, len, .. } = c
            {
                assert!(offset.checked_add(u64::from(len)).is_some_and(|e| e <= limits.size), "{c:?} past the end");
                assert!(offset % u64::from(limits.min_block) == 0 && len % limits.min_block == 0, "{c:?} unaligned");
            }
            assert!(c.buffer() <= limits.max_payload, "{c:?} beyond the maximum payload");
            assert!(!c.writes() || limits.writable, "{c:?} on a read-only export");
        }
        Err(refusal) => {
            assert_ne!(refusal.errno, 0);
            assert!(refusal.discard == 0 || r.kind == cmd::WRITE, "only a write has a payload to discard");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        size: 1 << 20,
        min_block: 512,
        max_payload: 32 << 20,
        writable: true,
        allocation: true,
        zero_is_cheap: false,
    };

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request { flags, kind, cookie: 7, offset, len }
    }

    fn errno_of(r: Request, limits: &Limits) -> (u32, u32) {
        let refusal = check(&r, limits).unwrap_err();
        (refusal.errno, refusal.discard)
    }

    #[test]
    fn requests_inside_the_export_become_commands() {
        assert_eq!(
            check(&req(cmd::READ, cmd_flag::DF, 512, 4096), &LIMITS),
            Ok(Command::Read { offset: 512, len: 4096, df: true })
        );
        assert_eq!(
            check(&req(cmd::WRITE, 0, 0, 1 << 20), &LIMITS),
            Ok(Command::Write { offset: 0, len: 1 << 20, fua: false })
        );
        assert_eq!(check(&req(cmd::FLUSH, 0, 0, 0), &LIMITS), Ok(Command::Flush));
        assert_eq!(check(&req(cmd::DISC, 0, 0, 0), &LIMITS), Ok(Command::Disc));
        assert_eq!(
            check(&req(cmd::BLOCK_STATUS, cmd_flag::REQ_ONE, 0, 512), &LIMITS),
            Ok(Command::BlockStatus { offset: 0, len: 512, one: true })
        );
    }

    #[test]
    fn bad_requests_get_the_errors_the_protocol_names() {
        use errno::{EINVAL, ENOSPC, ENOTSUP, EPERM};
        assert_eq!(errno_of(req(cmd::READ, 0, 1 << 20, 512), &LIMITS), (EINVAL, 0), "read past the end");
        assert_eq!(errno_of(req(cmd::READ, 0, u64::MAX - 511, 512), &LIMITS), (EINVAL, 0), "overflow");
        assert_eq!(errno_of(req(cmd::WRITE, 0, 1 << 20, 512), &LIMITS), (ENOSPC, 512), "write past the end");
        assert_eq!(errno_of(req(cmd::WRITE_ZEROES, 0, 1 << 20, 512), &LIMITS), (ENOSPC, 0));
        assert_eq!(errno_of(req(cmd::TRIM, 0, 1 << 20, 512), &LIMITS), (EINVAL, 0));
        assert_eq!(errno_of(req(cmd::READ, 0, 1, 512), &LIMITS), (EINVAL, 0), "unaligned");
        let huge = Limits { size: u64::MAX, ..LIMITS };
        assert_eq!(errno_of(req(cmd::WRITE, 0, 0, 64 << 20), &huge), (EINVAL, 64 << 20), "beyond the maximum");
        let ro = Limits { writable: false, ..LIMITS };
        assert_eq!(errno_of(req(cmd::WRITE, 0, 0, 512), &ro), (EPERM, 512));
        assert_eq!(errno_of(req(cmd::WRITE_ZEROES, 0, 0, 512), &ro), (EPERM, 0));
        assert_eq!(errno_of(req(cmd::TRIM, 0, 0, 512), &ro), (EPERM, 0));
        assert_eq!(errno_of(req(cmd::WRITE_ZEROES, cmd_flag::FAST_ZERO, 0, 512), &LIMITS), (ENOTSUP, 0));
        let cheap = Limits { zero_is_cheap: true, ..LIMITS };
        assert!(check(&req(cmd::WRITE_ZEROES, cmd_flag::FAST_ZERO, 0, 512), &cheap).is_ok());
        let flags = cmd_flag::FAST_ZERO | cmd_flag::NO_HOLE;
        assert_eq!(errno_of(req(cmd::WRITE_ZEROES, flags, 0, 512), &cheap), (ENOTSUP, 0), "allocating is slow");
        let no_context = Limits { allocation: false, ..LIMITS };
        assert_eq!(errno_of(req(cmd::BLOCK_STATUS, 0, 0, 512), &no_context), (EINVAL, 0));
        assert_eq!(errno_of(req(cmd::BLOCK_STATUS, 0, 0, 0), &LIMITS), (EINVAL, 0));
        assert_eq!(errno_of(req(cmd::CACHE, 0, 0, 512), &LIMITS), (EINVAL, 0));
        assert_eq!(errno_of(req(99, 0, 0, 0), &LIMITS), (EINVAL, 0));
    }

    /// A seeded stream of random headers: every one is a command inside the limits or a refusal.
    #[test]
    fn the_check_survives_random_requests() {
        let mut next = crate::wire::random_stream(0x2545_f491_4f6c_dd1d);
        for _ in 0..100_000 {
            let mut data: Vec<u8> = (0..40).map(|_| next() as u8).collect();
            data[28] |= 1;
            // Small kinds and lengths, so that most requests get past the first checks.
            data[6] = 0;
            data[7] %= 10;
            if next().is_multiple_of(2) {
                data[16..20].fill(0);
                data[24..26].fill(0);
            }
            exercise(&data);
        }
    }
}
