//! jbd2, the journal of ext3 and ext4 (docs/FILESYSTEMS.md, "The journal").
//!
//! A filesystem whose journal needs recovery is read as replay would leave it, without
//! replaying: [`read`] finds the journal through its inode, checks its superblock and walks its
//! log as recovery's scan and revoke passes do, and gives an [`Overlay`]: for each block, the
//! copy of the last committed transaction that holds one and does not revoke it. The
//! superblock, the group descriptors and the block bitmaps are then read through it.
//!
//! Where recovery would stop early, skip a copy or fail (a checksum that does not match, a
//! block it does not expect), the answer is a reason to copy whole: stopping early would miss
//! committed allocations, and after a failed recovery e2fsck rebuilds the bitmaps from the
//! inodes, which the journal does not tell.
//!
//! jbd2 is big-endian throughout.

use std::collections::HashMap;

use blksync_core::Result;

use super::inode::{self, FileMap, Inode};
use super::{COMPAT_HAS_JOURNAL, Super, le32};
use crate::crc::{crc32_be, crc32c};
use crate::{Reader, Verdict};

/// `h_magic` of every journal block with a header.
const MAGIC: u32 = 0xC03B_3998;

const DESCRIPTOR: u32 = 1;
const COMMIT: u32 = 2;
const SUPERBLOCK_V1: u32 = 3;
const SUPERBLOCK_V2: u32 = 4;
const REVOKE: u32 = 5;

const COMPAT_CHECKSUM: u32 = 0x1;
const INCOMPAT_REVOKE: u32 = 0x1;
const INCOMPAT_64BIT: u32 = 0x2;
const INCOMPAT_ASYNC_COMMIT: u32 = 0x4;
const INCOMPAT_CSUM_V2: u32 = 0x8;
const INCOMPAT_CSUM_V3: u32 = 0x10;
const INCOMPAT_FAST_COMMIT: u32 = 0x20;
const INCOMPAT_KNOWN: u32 =
    INCOMPAT_REVOKE | INCOMPAT_64BIT | INCOMPAT_ASYNC_COMMIT | INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3;

/// `s_checksum_type` of checksums v2 and v3.
const CRC32C_CHKSUM: u8 = 4;
/// `h_chksum_type` and `h_chksum_size` of checksum v1.
const CRC32_CHKSUM: u8 = 1;
const CRC32_CHKSUM_SIZE: u8 = 4;

const FLAG_ESCAPE: u16 = 0x1;
const FLAG_SAME_UUID: u16 = 0x2;
const FLAG_LAST_TAG: u16 = 0x8;

/// jbd2's `JBD2_MIN_JOURNAL_BLOCKS` and `JBD2_MAX_JOURNAL_BLOCKS` (mke2fs makes none larger).
const MIN_BLOCKS: u64 = 1024;
const MAX_BLOCKS: u64 = 10_240_000;
/// The log is read this many bytes at a time where it is contiguous, as recovery reads ahead
/// 128 KiB: one request per block would be slow over a network (iSCSI, NBD).
const READ_AHEAD: u64 = 256 << 10;
/// Distinct blocks with a committed copy, and distinct revoked blocks, kept at most.
const MAX_COPIES: usize = 1 << 20;
const MAX_REVOKES: usize = 1 << 20;

/// ext4's compat `fast_commit`.
const EXT_COMPAT_FAST_COMMIT: u32 = 0x400;
/// `s_jnl_backup_type`: `s_jnl_blocks` holds the journal inode's `i_block` and size.
const JNL_BACKUP_BLOCKS: u8 = 1;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A home block's replacement: the log copy at filesystem block `at`.
#[derive(Debug, Clone, Copy)]
struct Copy {
    home: u64,
    at: u64,
    /// Its first four bytes were the magic, and are zero in the log.
    escape: bool,
}

/// The journal's committed copies that replay would write home, by home block.
#[derive(Debug, Default)]
pub(super) struct Overlay {
    /// Sorted by `home`, one per home block.
    copies: Vec<Copy>,
    block_size: u64,
}

impl Overlay {
    /// Whether replay would write nothing.
    pub(super) fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }

    /// How many blocks replay would write (before [`Overlay::keep`]).
    pub(super) fn len(&self) -> usize {
        self.copies.len()
    }

    /// Fills `buf` from byte `offset` of the filesystem as replay would leave it: the home
    /// blocks, with the journal's copies in place of those it holds.
    pub(super) fn read(&self, reader: &Reader<'_>, buf: &mut [u8], offset: u64) -> Result<()> {
        reader.read(buf, offset)?;
        if self.copies.is_empty() || buf.is_empty() {
            return Ok(());
        }
        let bs = self.block_size;
        let end = offset + buf.len() as u64;
        let from = self.copies.partition_point(|c| c.home < offset / bs);
        let mut block = Vec::new();
        for copy in self.copies[from..].iter().take_while(|c| c.home * bs < end) {
            block.resize(bs as usize, 0);
            reader.read(&mut block, copy.at * bs)?;
            if copy.escape {
                block[..4].copy_from_slice(&MAGIC.to_be_bytes());
            }
            let start = copy.home * bs;
            let (lo, hi) = (start.max(offset), (start + bs).min(end));
            buf[(lo - offset) as usize..(hi - offset) as usize]
                .copy_from_slice(&block[(lo - start) as usize..(hi - start) as usize]);
        }
        Ok(())
    }

    /// Keeps only the copies of `blocks`: what is read later.
    pub(super) fn keep(&mut self, blocks: impl Iterator<Item = u64>) {
        let mut kept: Vec<Copy> = blocks
            .filter_map(|b| self.copies.binary_search_by_key(&b, |c| c.home).ok().map(|i| self.copies[i]))
            .collect();
        kept.sort_unstable_by_key(|c| c.home);
        kept.dedup_by_key(|c| c.home);
        kept.shrink_to_fit();
        self.copies = kept;
    }
}

/// Finds the journal of the filesystem whose superblock is `raw` (parsed: `sb`), as it is on
/// disk, and scans it.
pub(super) fn read(reader: &Reader<'_>, sb: &Super, raw: &[u8]) -> Result<Verdict<Overlay>> {
    let compat = le32(raw, 0x5C);
    if compat & COMPAT_HAS_JOURNAL == 0 {
        refuse!("has_journal is clear");
    }
    if compat & EXT_COMPAT_FAST_COMMIT != 0 {
        refuse!("fast commits are on (ext4 replays them from records that name no blocks)");
    }
    if raw[0xD0..0xE0].iter().any(|&b| b != 0) {
        refuse!("the journal is on another device");
    }
    let ino = u64::from(le32(raw, 0xE0));
    let inode = match inode::read(reader, sb, ino)? {
        Ok(inode) => inode,
        Err(reason) => refuse!("journal inode {ino}: {reason}"),
    };
    if let Err(reason) = check_inode(sb, raw, &inode) {
        refuse!("journal inode {ino}: {reason}");
    }
    let n = inode.size() / sb.block_size;
    let map = match inode::map(reader, sb, ino, &inode, n)? {
        Ok(map) => map,
        Err(reason) => refuse!("journal inode {ino}: {reason}"),
    };
    let Some(log) = accept!(Log::open(reader, map, n, sb.block_size)?) else {
        return Ok(Ok(Overlay::default()));
    };
    log.scan(reader.len / sb.block_size)
}

/// The journal inode's checks: a regular file in use, of a size jbd2 accepts, agreeing with
/// the superblock's backup of it.
fn check_inode(sb: &Super, raw: &[u8], inode: &Inode) -> Verdict<()> {
    if inode.mode() & 0xF000 != 0x8000 || inode.links() == 0 {
        return Err("it is not a regular file in use".into());
    }
    if raw[0xFD] == JNL_BACKUP_BLOCKS
        && (raw[0x10C..0x148] != *inode.block()
            || le32(raw, 0x148) != le32(&inode.raw, 0x6C)
            || le32(raw, 0x14C) != le32(&inode.raw, 0x04))
    {
        return Err("it differs from the superblock's backup of it (s_jnl_blocks)".into());
    }
    let n = inode.size() / sb.block_size;
    if !(MIN_BLOCKS..=MAX_BLOCKS).contains(&n) || n > sb.blocks {
        return Err(format!("a journal of {n} blocks is impossible"));
    }
    Ok(())
}

/// The journal's checksums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Csum {
    None,
    /// `COMPAT_CHECKSUM`: `crc32_be` of each transaction in its commit block.
    V1,
    /// crc32c of each block; 16 bits of it in a tag.
    V2,
    /// crc32c of each block, in full.
    V3,
}

/// An open journal: its log is blocks `[first, maxlen)` of its file.
struct Log<'a, 'r> {
    reader: &'a Reader<'r>,
    map: FileMap,
    bs: u64,
    first: u64,
    maxlen: u64,
    start: u64,
    sequence: u32,
    csum: Csum,
    /// v2, v3: `crc32c(~0, s_uuid)`.
    seed: u32,
    is64: bool,
    /// Log blocks `[ahead.0, ahead.0 + ahead.1)`, read ahead.
    ahead: (u64, u64),
    ahead_buf: Vec<u8>,
}

/// A copy in a transaction not yet committed.
struct Pending {
    home: u64,
    at: u64,
    escape: bool,
}

impl<'a, 'r> Log<'a, 'r> {
    /// Reads and checks the journal superblock (block 0 of a journal of `n` blocks): `None`
    /// when the log is empty.
    fn open(reader: &'a Reader<'r>, map: FileMap, n: u64, bs: u64) -> Result<Verdict<Option<Log<'a, 'r>>>> {
        let Some(at) = map.physical(0) else { refuse!("the journal has no block 0") };
        let mut j = vec![0u8; bs as usize];
        reader.read(&mut j, at * bs)?;
        let place = at * bs;
        if be32(&j, 0) != MAGIC {
            refuse!("no journal superblock at byte {place}");
        }
        let v2 = be32(&j, 4) == SUPERBLOCK_V2;
        let (compat, incompat, ro) = match be32(&j, 4) {
            SUPERBLOCK_V1 => (0, 0, 0),
            SUPERBLOCK_V2 => (be32(&j, 0x24), be32(&j, 0x28), be32(&j, 0x2C)),
            t => refuse!("journal superblock (byte {place}) of type {t}"),
        };
        if u64::from(be32(&j, 0x0C)) != bs {
            refuse!("the journal's block size {} is not the filesystem's", be32(&j, 0x0C));
        }
        let maxlen = u64::from(be32(&j, 0x10));
        if maxlen > n {
            refuse!("the journal superblock says {maxlen} blocks, its inode has {n}");
        }
        let first = u64::from(be32(&j, 0x14));
        if first == 0 || first >= maxlen {
            refuse!("the log's first block {first} is outside the journal's {maxlen}");
        }
        let (sequence, start, errno) = (be32(&j, 0x18), u64::from(be32(&j, 0x1C)), be32(&j, 0x20));
        if errno != 0 {
            refuse!(
                "the journal recorded error {} (e2fsck would check everything)",
                i32::from_be_bytes(errno.to_be_bytes())
            );
        }
        if incompat & INCOMPAT_FAST_COMMIT != 0 {
            refuse!("the journal has fast commits");
        }
        if incompat & !INCOMPAT_KNOWN != 0 {
            refuse!("journal incompatible features {:#x} are not supported", incompat & !INCOMPAT_KNOWN);
        }
        if ro != 0 {
            refuse!("journal read-only-compatible features {ro:#x} are not supported");
        }
        let csum =
            match (compat & COMPAT_CHECKSUM != 0, incompat & INCOMPAT_CSUM_V2 != 0, incompat & INCOMPAT_CSUM_V3 != 0) {
                (false, false, false) => Csum::None,
                (true, false, false) => Csum::V1,
                (false, true, false) => Csum::V2,
                (false, false, true) => Csum::V3,
                _ => refuse!("the journal has more than one kind of checksum"),
            };
        let mut seed = 0;
        if matches!(csum, Csum::V2 | Csum::V3) {
            if j[0x50] != CRC32C_CHKSUM {
                refuse!("journal checksum type {} is unknown", j[0x50]);
            }
            let c = crc32c(crc32c(crc32c(!0, &j[..0xFC]), &[0; 4]), &j[0x100..1024]);
            if c != be32(&j, 0xFC) {
                refuse!("the journal superblock (byte {place}) fails its checksum");
            }
            seed = crc32c(!0, &j[0x30..0x40]);
        }
        if v2 {
            let users = be32(&j, 0x40);
            if users > 1 {
                refuse!("the journal is shared by {users} filesystems");
            }
        }
        if start == 0 {
            return Ok(Ok(None));
        }
        if start < first || start >= maxlen {
            refuse!("the log's start {start} is outside blocks {first} to {maxlen}");
        }
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let ahead = (0, 0);
        let ahead_buf = Vec::new();
        Ok(Ok(Some(Log { reader, map, bs, first, maxlen, start, sequence, csum, seed, is64, ahead, ahead_buf })))
    }

    /// The log block after `l`.
    fn next(&self, l: u64) -> u64 {
        if l + 1 >= self.maxlen { self.first } else { l + 1 }
    }

    /// Reads log block `l` into `buf`: the filesystem block it is at. Reads ahead the blocks
    /// after it that are contiguous on disk, up to [`READ_AHEAD`] bytes and the log's end.
    fn read(&mut self, l: u64, buf: &mut [u8]) -> Result<Verdict<u64>> {
        let Some(at) = self.map.physical(l) else { refuse!("the journal has no block {l}") };
        let (from, count) = self.ahead;
        if l < from || l >= from + count {
            let most = (READ_AHEAD / self.bs).max(1).min(self.maxlen - l);
            let mut n = 1;
            while n < most && self.map.physical(l + n) == Some(at + n) {
                n += 1;
            }
            self.ahead_buf.resize((n * self.bs) as usize, 0);
            self.reader.read(&mut self.ahead_buf, at * self.bs)?;
            self.ahead = (l, n);
        }
        let offset = ((l - self.ahead.0) * self.bs) as usize;
        buf.copy_from_slice(&self.ahead_buf[offset..offset + buf.len()]);
        Ok(Ok(at))
    }

    /// Bytes at the end of a descriptor or revoke block for its checksum.
    fn tail(&self) -> usize {
        if matches!(self.csum, Csum::V2 | Csum::V3) { 4 } else { 0 }
    }

    /// Whether a descriptor or revoke block's tail checksum is right (v2, v3).
    fn tail_ok(&self, b: &[u8]) -> bool {
        let end = b.len() - 4;
        self.tail() == 0 || crc32c(crc32c(self.seed, &b[..end]), &[0; 4]) == be32(b, end)
    }

    /// Bytes per tag (without the UUID that may follow).
    fn tag_bytes(&self) -> usize {
        match (self.csum, self.is64) {
            (Csum::V3, _) => 16,
            (Csum::V2, true) => 14,
            (Csum::V2, false) => 10,
            (_, true) => 12,
            (_, false) => 8,
        }
    }

    /// Walks the log from its start, as recovery's scan and revoke passes (fs/jbd2/recovery.c,
    /// `do_one_pass`), and gives the copies replay would write. `blocks`: how many blocks the
    /// range given holds (a copy must go inside).
    // One loop over the log's block kinds, as recovery has: split, it would hide the order.
    #[allow(clippy::too_many_lines)]
    fn scan(mut self, blocks: u64) -> Result<Verdict<Overlay>> {
        let bs = self.bs as usize;
        let mut block = vec![0u8; bs];
        let mut data = vec![0u8; bs];
        let (mut next, mut seq, mut k) = (self.start, self.sequence, 0u32);
        // A log longer than the journal never ends: a hostile one, whose sequence matches all
        // the way round.
        let budget = self.maxlen - self.first;
        let mut walked = 0u64;
        // Committed: the transaction index and copy of each home block, and the last
        // transaction that revokes each revoked block.
        let mut copies: HashMap<u64, (u32, Copy)> = HashMap::new();
        let mut revoked: HashMap<u64, u32> = HashMap::new();
        let mut pending: Vec<Pending> = Vec::new();
        let mut pending_revokes: Vec<u64> = Vec::new();
        let mut crc_v1 = !0u32;
        // The first copy of this transaction whose checksum failed.
        let mut bad_copy: Option<String> = None;
        loop {
            if walked >= budget {
                refuse!("the log does not end within the journal's {} blocks", self.maxlen);
            }
            let here = next;
            let at = accept!(self.read(here, &mut block)?);
            walked += 1;
            next = self.next(next);
            // The end of the log: a block never written, or left from an older transaction.
            if be32(&block, 0) != MAGIC || be32(&block, 8) != seq {
                break;
            }
            let place = move || format!("log block {here} (byte {}) of transaction {seq}", at * self.bs);
            match be32(&block, 4) {
                DESCRIPTOR => {
                    if !self.tail_ok(&block) {
                        refuse!("the descriptor at {} fails its checksum", place());
                    }
                    if self.csum == Csum::V1 {
                        crc_v1 = crc32_be(crc_v1, &block);
                    }
                    let (size, end) = (self.tag_bytes(), bs - self.tail());
                    let mut p = 12;
                    while p + size <= end {
                        let tag = &block[p..p + size];
                        let flags = be16(tag, 6);
                        let mut home = u64::from(be32(tag, 0));
                        if self.is64 {
                            home |= u64::from(be32(tag, 8)) << 32;
                        }
                        if walked >= budget {
                            refuse!("the log does not end within the journal's {} blocks", self.maxlen);
                        }
                        let copy_l = next;
                        walked += 1;
                        next = self.next(next);
                        let copy_at = if self.csum == Csum::None {
                            match self.map.physical(copy_l) {
                                Some(copy_at) => copy_at,
                                None => refuse!("the journal has no block {copy_l}"),
                            }
                        } else {
                            let copy_at = accept!(self.read(copy_l, &mut data)?);
                            if !self.copy_ok(tag, seq, &data, &mut crc_v1) && bad_copy.is_none() {
                                bad_copy = Some(format!(
                                    "the copy of block {home} at log block {copy_l} (byte {}) of transaction {seq} fails its checksum",
                                    copy_at * self.bs
                                ));
                            }
                            copy_at
                        };
                        if pending.len() >= MAX_COPIES {
                            refuse!("a transaction of more than {MAX_COPIES} blocks");
                        }
                        pending.push(Pending { home, at: copy_at, escape: flags & FLAG_ESCAPE != 0 });
                        p += size;
                        if flags & FLAG_SAME_UUID == 0 {
                            p += 16;
                        }
                        if flags & FLAG_LAST_TAG != 0 {
                            break;
                        }
                    }
                }
                COMMIT => {
                    let ok = match self.csum {
                        Csum::None => true,
                        Csum::V1 => {
                            let (kind, size, sum) = (block[0x0C], block[0x0D], be32(&block, 0x10));
                            (kind == CRC32_CHKSUM && size == CRC32_CHKSUM_SIZE && sum == crc_v1)
                                || (kind == 0 && size == 0 && sum == 0)
                        }
                        Csum::V2 | Csum::V3 => {
                            let c = crc32c(crc32c(crc32c(self.seed, &block[..0x10]), &[0; 4]), &block[0x14..]);
                            c == be32(&block, 0x10)
                        }
                    };
                    if !ok {
                        refuse!("the commit block at {} fails its checksum", place());
                    }
                    if let Some(reason) = bad_copy.take() {
                        refuse!("{reason}");
                    }
                    for p in pending.drain(..) {
                        if p.home >= blocks {
                            refuse!("transaction {seq} has a copy of block {}, past the filesystem's end", p.home);
                        }
                        copies.insert(p.home, (k, Copy { home: p.home, at: p.at, escape: p.escape }));
                    }
                    if copies.len() > MAX_COPIES {
                        refuse!("the journal holds copies of more than {MAX_COPIES} blocks");
                    }
                    for b in pending_revokes.drain(..) {
                        revoked.insert(b, k);
                    }
                    if revoked.len() > MAX_REVOKES {
                        refuse!("the journal revokes more than {MAX_REVOKES} blocks");
                    }
                    crc_v1 = !0;
                    seq = seq.wrapping_add(1);
                    k += 1;
                }
                REVOKE => {
                    if !self.tail_ok(&block) {
                        refuse!("the revoke block at {} fails its checksum", place());
                    }
                    let count = be32(&block, 12) as usize;
                    if count > bs - self.tail() {
                        refuse!("the revoke block at {} says it uses {count} bytes", place());
                    }
                    let record = if self.is64 { 8 } else { 4 };
                    let mut p = 16;
                    while p + record <= count {
                        let b = if self.is64 {
                            u64::from(be32(&block, p)) << 32 | u64::from(be32(&block, p + 4))
                        } else {
                            u64::from(be32(&block, p))
                        };
                        pending_revokes.push(b);
                        p += record;
                    }
                    if pending_revokes.len() > MAX_REVOKES {
                        refuse!("a transaction revokes more than {MAX_REVOKES} blocks");
                    }
                }
                t => refuse!("{} is of type {t}, which recovery does not expect", place()),
            }
        }
        // What follows the last commit block (a transaction being written) is not replayed.
        let mut out: Vec<Copy> = copies
            .into_iter()
            .filter(|(home, (k, _))| revoked.get(home).is_none_or(|r| r < k))
            .map(|(_, (_, copy))| copy)
            .collect();
        out.sort_unstable_by_key(|c| c.home);
        Ok(Ok(Overlay { copies: out, block_size: self.bs }))
    }

    /// Checks a copy (`data`) against its tag (v2, v3) or adds it to the transaction's sum
    /// (v1).
    fn copy_ok(&self, tag: &[u8], seq: u32, data: &[u8], crc_v1: &mut u32) -> bool {
        match self.csum {
            Csum::None => true,
            Csum::V1 => {
                *crc_v1 = crc32_be(*crc_v1, data);
                true
            }
            Csum::V2 | Csum::V3 => {
                let c = crc32c(crc32c(self.seed, &seq.to_be_bytes()), data);
                if self.csum == Csum::V3 { c == be32(tag, 12) } else { c as u16 == be16(tag, 4) }
            }
        }
    }
}
