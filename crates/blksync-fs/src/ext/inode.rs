//! One inode of an ext filesystem, and where its file's blocks are: an extent tree (ext4) or
//! direct and indirect blocks (ext2, ext3). Used for the journal's inode
//! (docs/FILESYSTEMS.md, "The journal").
//!
//! Every read is of one block, at a number checked to lie inside the filesystem; the tree is
//! walked with a depth limit, a node budget and a run budget, so a hostile inode gives a
//! reason to copy whole, never a loop or a large allocation.

use blksync_core::Result;

use super::{Super, le16, le32, parse_desc};
use crate::crc::crc32c;
use crate::{Reader, Verdict};

/// `i_flags`: the file is mapped by an extent tree.
const EXTENTS_FL: u32 = 0x8_0000;
/// `i_flags`: encrypted, or data inside the inode: neither can be a journal.
const ENCRYPT_FL: u32 = 0x800;
const INLINE_DATA_FL: u32 = 0x1000_0000;
const EXTENT_MAGIC: u16 = 0xF30A;
/// The kernel's `EXT4_MAX_EXTENT_DEPTH`.
const MAX_DEPTH: u16 = 5;
/// Extent tree blocks read at most: 65536 runs fit in about 200 leaves.
const MAX_NODES: usize = 1024;
/// Runs of a file kept at most (24 bytes each).
pub(super) const MAX_RUNS: usize = 1 << 16;
/// The longest initialised extent; longer lengths mark unwritten extents.
const MAX_EXTENT_LEN: u64 = 32768;

/// `len` blocks of a file from its block `logical`, at filesystem block `physical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Run {
    pub(super) logical: u64,
    pub(super) physical: u64,
    pub(super) len: u64,
}

/// Where blocks `[0, n)` of a file are: runs in logical order, without holes.
#[derive(Debug)]
pub(super) struct FileMap {
    runs: Vec<Run>,
}

impl FileMap {
    /// The filesystem block holding block `logical` of the file, if it is mapped.
    pub(super) fn physical(&self, logical: u64) -> Option<u64> {
        let at = self.runs.partition_point(|r| r.logical + r.len <= logical);
        let run = self.runs.get(at)?;
        (run.logical <= logical).then(|| run.physical + (logical - run.logical))
    }
}

/// The fields of an inode read here.
pub(super) struct Inode {
    pub(super) raw: Vec<u8>,
}

impl Inode {
    pub(super) fn mode(&self) -> u16 {
        le16(&self.raw, 0x00)
    }

    pub(super) fn size(&self) -> u64 {
        u64::from(le32(&self.raw, 0x04)) | u64::from(le32(&self.raw, 0x6C)) << 32
    }

    pub(super) fn links(&self) -> u16 {
        le16(&self.raw, 0x1A)
    }

    pub(super) fn flags(&self) -> u32 {
        le32(&self.raw, 0x20)
    }

    /// `i_block`, the 60 bytes of the block map.
    pub(super) fn block(&self) -> &[u8] {
        &self.raw[0x28..0x64]
    }
}

/// Reads inode `ino` from its group's inode table, found through the descriptor on disk.
pub(super) fn read(reader: &Reader<'_>, sb: &Super, ino: u64) -> Result<Verdict<Inode>> {
    if ino == 0 || ino > sb.groups * sb.inodes_per_group {
        refuse!("there is no such inode");
    }
    let (g, index) = ((ino - 1) / sb.inodes_per_group, (ino - 1) % sb.inodes_per_group);
    let dpb = sb.dpb();
    let at = sb.desc_block(g / dpb);
    if at >= sb.blocks {
        refuse!("group descriptor block {at} is past the end");
    }
    let mut desc = vec![0u8; sb.desc_size as usize];
    reader.read(&mut desc, at * sb.block_size + (g % dpb) * sb.desc_size)?;
    let table = match parse_desc(sb, g, &desc) {
        Ok((_, _, _, table)) => table,
        Err(reason) => refuse!("group {g}: {reason}"),
    };
    // Inside the table, which parse_desc checked to be inside the filesystem.
    let mut raw = vec![0u8; sb.inode_size as usize];
    reader.read(&mut raw, table * sb.block_size + index * sb.inode_size)?;
    let inode = Inode { raw };
    if let Some(seed) = sb.csum_seed
        && !csum_ok(seed, ino, &inode.raw)
    {
        refuse!("its checksum is wrong (byte {})", table * sb.block_size + index * sb.inode_size);
    }
    Ok(Ok(inode))
}

/// The per-inode checksum seed of `metadata_csum`: `crc32c(crc32c(seed, le32(ino)),
/// i_generation)`.
fn inode_seed(seed: u32, ino: u64, raw: &[u8]) -> u32 {
    crc32c(crc32c(seed, &(ino as u32).to_le_bytes()), &raw[0x64..0x68])
}

/// Whether the inode's checksum is right, as e2fsprogs' `ext2fs_inode_csum_verify`: crc32c over
/// the whole inode with `i_checksum_lo` (and `i_checksum_hi` when `i_extra_isize` reaches it)
/// zero; only the low 16 bits count without the high half.
fn csum_ok(seed: u32, ino: u64, raw: &[u8]) -> bool {
    let has_hi = raw.len() > 128 && le16(raw, 0x80) >= 4;
    let mut copy = raw.to_vec();
    copy[0x7C..0x7E].fill(0);
    let mut provided = u32::from(le16(raw, 0x7C));
    if has_hi {
        copy[0x82..0x84].fill(0);
        provided |= u32::from(le16(raw, 0x82)) << 16;
    }
    let mut calculated = crc32c(inode_seed(seed, ino, raw), &copy);
    if !has_hi {
        calculated &= 0xFFFF;
    }
    provided == calculated || raw[..128].iter().all(|&b| b == 0)
}

/// Where blocks `[0, n)` of inode `ino`'s file are. Every one must be mapped.
pub(super) fn map(reader: &Reader<'_>, sb: &Super, ino: u64, inode: &Inode, n: u64) -> Result<Verdict<FileMap>> {
    let flags = inode.flags();
    if flags & (ENCRYPT_FL | INLINE_DATA_FL) != 0 {
        refuse!("it is encrypted or holds inline data");
    }
    let mut walk = Walk { reader, sb, n, runs: Vec::new(), nodes: 0 };
    let walked = if flags & EXTENTS_FL != 0 {
        let seed = sb.csum_seed.map(|seed| inode_seed(seed, ino, &inode.raw));
        walk.extents(inode.block(), None, seed)?
    } else {
        walk.indirect_root(inode.block())?
    };
    accept!(walked);
    let mut expect = 0;
    for run in &walk.runs {
        if run.logical != expect {
            break;
        }
        expect = run.logical + run.len;
    }
    if expect < n {
        refuse!("its block {expect} is a hole");
    }
    Ok(Ok(FileMap { runs: walk.runs }))
}

struct Walk<'a, 'r> {
    reader: &'a Reader<'r>,
    sb: &'a Super,
    /// Blocks of the file needed.
    n: u64,
    runs: Vec<Run>,
    /// Blocks of the map read so far.
    nodes: usize,
}

impl Walk<'_, '_> {
    /// Adds `len` blocks from `logical` at `physical`, merged with the last run when they
    /// continue it. Runs must come in logical order and stay inside the filesystem.
    fn push(&mut self, logical: u64, physical: u64, len: u64) -> Verdict<()> {
        let sb = self.sb;
        if physical < sb.first_data_block || physical.checked_add(len).is_none_or(|end| end > sb.blocks) {
            return Err(format!("blocks {physical}+{len} are outside the filesystem"));
        }
        match self.runs.last_mut() {
            Some(last) if logical < last.logical + last.len => {
                return Err(format!("block {logical} is mapped twice or out of order"));
            }
            Some(last) if logical == last.logical + last.len && physical == last.physical + last.len => {
                last.len += len;
                return Ok(());
            }
            _ => {}
        }
        if self.runs.len() >= MAX_RUNS {
            return Err(format!("more than {MAX_RUNS} runs"));
        }
        self.runs.push(Run { logical, physical, len });
        Ok(())
    }

    /// Reads map block `block` (checked to lie inside the filesystem).
    fn node(&mut self, block: u64) -> Result<Verdict<Vec<u8>>> {
        let sb = self.sb;
        if block < sb.first_data_block || block >= sb.blocks {
            refuse!("map block {block} is outside the filesystem");
        }
        self.nodes += 1;
        let mut buf = vec![0u8; sb.block_size as usize];
        self.reader.read(&mut buf, block * sb.block_size)?;
        Ok(Ok(buf))
    }

    /// An extent tree node: the root in `i_block` (`depth` None) or a block of the tree at
    /// `depth`; `seed`, with `metadata_csum`, checks each block's tail.
    fn extents(&mut self, node: &[u8], depth: Option<u16>, seed: Option<u32>) -> Result<Verdict<()>> {
        let (magic, entries, max, d) = (le16(node, 0), le16(node, 2), le16(node, 4), le16(node, 6));
        if magic != EXTENT_MAGIC {
            refuse!("no extent header");
        }
        if usize::from(max) > (node.len() - 12) / 12 || entries > max {
            refuse!("an extent node of {entries} entries, {max} at most, is impossible");
        }
        match depth {
            None if d > MAX_DEPTH => refuse!("extent tree depth {d} is more than {MAX_DEPTH}"),
            Some(expected) if d != expected => refuse!("an extent node at depth {d} where {expected} belongs"),
            _ => {}
        }
        if let (Some(seed), Some(_)) = (seed, depth) {
            let tail = 12 + 12 * usize::from(max);
            if crc32c(seed, &node[..tail]) != le32(node, tail) {
                refuse!("an extent block fails its checksum");
            }
        }
        for e in node[12..].chunks_exact(12).take(usize::from(entries)) {
            let logical = u64::from(le32(e, 0));
            if logical >= self.n {
                continue;
            }
            if d == 0 {
                let len = u64::from(le16(e, 4));
                if len == 0 || len > MAX_EXTENT_LEN {
                    refuse!("extent at block {logical} is empty or unwritten");
                }
                let start = u64::from(le16(e, 6)) << 32 | u64::from(le32(e, 8));
                accept!(self.push(logical, start, len));
            } else {
                if self.nodes >= MAX_NODES {
                    refuse!("more than {MAX_NODES} extent blocks");
                }
                let child = u64::from(le16(e, 8)) << 32 | u64::from(le32(e, 4));
                let node = accept!(self.node(child)?);
                accept!(self.extents(&node, Some(d - 1), seed)?);
            }
        }
        Ok(Ok(()))
    }

    /// `i_block` as 12 direct blocks, then a single, a double and a triple indirect block.
    fn indirect_root(&mut self, block: &[u8]) -> Result<Verdict<()>> {
        let per = self.sb.block_size / 4;
        for (i, word) in block.chunks_exact(4).take(12).enumerate() {
            let logical = i as u64;
            if logical >= self.n {
                return Ok(Ok(()));
            }
            accept!(self.entry(u64::from(le32(word, 0)), 0, logical)?);
        }
        let mut logical = 12;
        let mut span = per;
        for level in 1..=3 {
            if logical >= self.n {
                break;
            }
            accept!(self.entry(u64::from(le32(block, 44 + 4 * level as usize)), level, logical)?);
            logical += span;
            span *= per;
        }
        Ok(Ok(()))
    }

    /// Entry `target` of the map, for the file's blocks from `logical`: a data block (`level`
    /// 0) or an indirect block `level` levels above the data.
    fn entry(&mut self, target: u64, level: u32, logical: u64) -> Result<Verdict<()>> {
        if target == 0 {
            refuse!("no block {logical} (a hole)");
        }
        if level == 0 {
            return Ok(self.push(logical, target, 1));
        }
        let node = accept!(self.node(target)?);
        let per = self.sb.block_size / 4;
        let span = per.pow(level - 1);
        for (i, word) in node.chunks_exact(4).enumerate() {
            let at = logical + i as u64 * span;
            if at >= self.n {
                break;
            }
            accept!(self.entry(u64::from(le32(word, 0)), level - 1, at)?);
        }
        Ok(Ok(()))
    }
}
