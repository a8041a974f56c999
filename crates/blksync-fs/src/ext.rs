//! ext2, ext3 and ext4: the superblock, the group descriptors and the block bitmaps
//! (docs/FILESYSTEMS.md, "ext2, ext3, ext4").
//!
//! [`probe`] reads and checks the superblock and every group descriptor once; each group's
//! bitmap is read on demand by [`Ext::state_at`] and kept in a small cache, so memory stays
//! bounded whatever the filesystem's size. A filesystem whose journal needs recovery is read
//! through the journal's committed copies of those blocks ([`journal`]).

use std::sync::{Arc, Mutex, PoisonError};

use blksync_core::Result;

use crate::crc::{crc16, crc32c};
use crate::{Kind, Reader, Verdict};
use journal::Overlay;

/// `s_magic`.
const MAGIC: u16 = 0xEF53;
/// At most this many groups (docs/FILESYSTEMS.md, "Limits"): 16 bytes each are kept.
pub(crate) const MAX_GROUPS: u64 = 1 << 20;
/// Bitmaps kept in the cache.
const CACHE_SLOTS: usize = 16;
/// Groups a run is extended over at most: a caller asking every few MiB of a full 16 TiB
/// filesystem must not walk all its groups on each call.
const MERGE_GROUPS: u64 = 64;
/// Descriptor blocks read at once where they are contiguous.
const DESC_READ: u64 = 256 << 10;

const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;

const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
/// Incompatible features that do not change what a block bitmap means, or that are handled.
const INCOMPAT_KNOWN: u32 = 0x2 // filetype
    | INCOMPAT_RECOVER // the journal is read (ext/journal.rs)
    | INCOMPAT_META_BG
    | 0x40 // extents
    | INCOMPAT_64BIT
    | 0x100 // mmp
    | INCOMPAT_FLEX_BG
    | 0x400 // ea_inode
    | 0x1000 // dirdata
    | INCOMPAT_CSUM_SEED
    | 0x4000 // largedir
    | 0x8000 // inline_data
    | 0x1_0000 // encrypt
    | 0x2_0000; // casefold
/// What ext3 knew; anything beyond makes it ext4 (as blkid decides).
const INCOMPAT_EXT3: u32 = 0x2 | INCOMPAT_RECOVER | INCOMPAT_JOURNAL_DEV | INCOMPAT_META_BG;

const RO_SPARSE_SUPER: u32 = 0x1;
const RO_GDT_CSUM: u32 = 0x10;
const RO_METADATA_CSUM: u32 = 0x400;
/// Read-only-compatible features that do not change what a block bitmap means.
const RO_KNOWN: u32 = RO_SPARSE_SUPER
    | 0x2 // large_file
    | 0x4 // btree_dir
    | 0x8 // huge_file
    | RO_GDT_CSUM
    | 0x20 // dir_nlink
    | 0x40 // extra_isize
    | 0x100 // quota
    | RO_METADATA_CSUM
    | 0x1000 // readonly
    | 0x2000 // project
    | 0x4000 // shared_blocks
    | 0x8000 // verity
    | 0x1_0000; // orphan_present
const RO_EXT3: u32 = RO_SPARSE_SUPER | 0x2 | 0x4;

const BG_BLOCK_UNINIT: u16 = 0x2;

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

macro_rules! refuse {
    ($($arg:tt)*) => { return Ok(Err(format!($($arg)*))) };
}

/// The value of a [`Verdict`], or its reason to copy whole returned as the caller's.
macro_rules! accept {
    ($verdict:expr) => {
        match $verdict {
            Ok(value) => value,
            Err(reason) => return Ok(Err(reason)),
        }
    };
}

mod inode;
mod journal;

/// Whether group `g` holds a superblock backup.
#[derive(Debug, Clone, Copy)]
enum Backups {
    /// Every group (no `sparse_super`).
    All,
    /// Groups 0, 1 and powers of 3, 5 and 7.
    Sparse,
    /// Group 0 and the two of `s_backup_bgs`.
    Two(u32, u32),
}

impl Backups {
    fn has_super(self, g: u64) -> bool {
        fn power_of(mut g: u64, base: u64) -> bool {
            while g.is_multiple_of(base) && g > 1 {
                g /= base;
            }
            g == 1
        }
        match self {
            _ if g == 0 => true,
            Backups::All => true,
            Backups::Sparse => g == 1 || (g & 1 == 1 && (power_of(g, 3) || power_of(g, 5) || power_of(g, 7))),
            Backups::Two(a, b) => g == u64::from(a) || g == u64::from(b),
        }
    }
}

/// How a group's blocks are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GroupState {
    /// From its bitmap block.
    Bitmap,
    /// `BLOCK_UNINIT`: computed from the layout.
    Uninit,
    /// No free block: all used, unread.
    Full,
}

/// What is kept of a group descriptor.
#[derive(Debug, Clone, Copy)]
struct Group {
    bitmap: u64,
    csum: u32,
    state: GroupState,
}

/// A group's used blocks, one bit each (bit `i`: the group's block `i`).
#[derive(Debug)]
enum Bits {
    Map(Vec<u8>),
    /// A bitmap that failed its checksum: all used.
    AllUsed,
}

impl Bits {
    fn get(&self, i: u64) -> bool {
        match self {
            Bits::Map(map) => map[(i / 8) as usize] & (1 << (i % 8)) != 0,
            Bits::AllUsed => true,
        }
    }

    /// The first bit at or after `i` (below `n`) whose state differs from `used`, or `n`.
    fn run_end(&self, mut i: u64, n: u64, used: bool) -> u64 {
        let Bits::Map(map) = self else { return if used { n } else { i } };
        let skip = if used { 0xFF } else { 0x00 };
        while i < n {
            if i.is_multiple_of(8) && map[(i / 8) as usize] == skip {
                i += 8;
                continue;
            }
            if self.get(i) != used {
                return i;
            }
            i += 1;
        }
        n
    }
}

/// The most recently used bitmaps, most recent last.
#[derive(Debug, Default)]
struct Cache {
    slots: Vec<(u64, Arc<Bits>)>,
}

impl Cache {
    fn get(&mut self, g: u64) -> Option<Arc<Bits>> {
        let at = self.slots.iter().position(|(h, _)| *h == g)?;
        let slot = self.slots.remove(at);
        let bits = Arc::clone(&slot.1);
        self.slots.push(slot);
        Some(bits)
    }

    fn put(&mut self, g: u64, bits: Arc<Bits>) {
        if self.slots.iter().any(|(h, _)| *h == g) {
            return;
        }
        if self.slots.len() >= CACHE_SLOTS {
            self.slots.remove(0);
        }
        self.slots.push((g, bits));
    }
}

/// The fields of the superblock that decide the layout.
#[derive(Debug, Clone)]
struct Super {
    block_size: u64,
    first_data_block: u64,
    blocks: u64,
    blocks_per_group: u64,
    groups: u64,
    desc_size: u64,
    desc_blocks: u64,
    inodes_per_group: u64,
    inode_size: u64,
    inode_blocks: u64,
    reserved_gdt: u64,
    first_meta_bg: u64,
    meta_bg: bool,
    flex_bg: bool,
    backups: Backups,
    /// `gdt_csum` or `metadata_csum`: `BLOCK_UNINIT` is honoured and descriptors are checked.
    group_csum: bool,
    /// `metadata_csum`: the crc32c seed.
    csum_seed: Option<u32>,
    /// `recover`: the journal holds transactions not yet written home.
    recover: bool,
    uuid: [u8; 16],
    kind: Kind,
}

impl Super {
    /// Descriptors per block.
    fn dpb(&self) -> u64 {
        self.block_size / self.desc_size
    }

    fn group_first(&self, g: u64) -> u64 {
        self.first_data_block + g * self.blocks_per_group
    }

    fn group_len(&self, g: u64) -> u64 {
        (self.blocks - self.group_first(g)).min(self.blocks_per_group)
    }

    fn group_of(&self, block: u64) -> u64 {
        (block - self.first_data_block) / self.blocks_per_group
    }

    /// Where descriptor block `i` lives (its primary copy).
    fn desc_block(&self, i: u64) -> u64 {
        if !self.meta_bg || i < self.first_meta_bg {
            return self.first_data_block + 1 + i;
        }
        let g = i * self.dpb();
        self.group_first(g) + u64::from(self.backups.has_super(g))
    }

    /// Calls `mark(start, len)` for the superblock backup and descriptor blocks in group `g`,
    /// as e2fsprogs' `ext2fs_reserve_super_and_bgd`.
    fn reserved(&self, g: u64, mark: &mut impl FnMut(u64, u64)) {
        let first = self.group_first(g);
        let has_super = self.backups.has_super(g);
        if has_super {
            mark(first, 1);
        }
        let dpb = self.dpb();
        if !self.meta_bg || g / dpb < self.first_meta_bg {
            if has_super {
                let old = if self.meta_bg { self.first_meta_bg } else { self.desc_blocks + self.reserved_gdt };
                mark(first + 1, old.min(self.blocks.saturating_sub(first + 1)));
            }
        } else if matches!(g % dpb, 0 | 1) || g % dpb == dpb - 1 {
            mark(first + u64::from(has_super), 1);
        }
    }
}

/// Parses and checks the superblock (`sb`: its 1024 bytes) of a filesystem of `len` bytes.
// One check per field, in the order of docs/FILESYSTEMS.md: splitting it would hide that.
#[allow(clippy::too_many_lines)]
fn parse_super(sb: &[u8], len: u64) -> Result<Verdict<Super>> {
    let log = le32(sb, 0x18);
    if log > 6 {
        refuse!("block size 1024 << {log} is not supported");
    }
    let block_size = 1024u64 << log;
    if le32(sb, 0x1C) != log {
        refuse!("the cluster size differs from the block size (bigalloc)");
    }
    let rev = le32(sb, 0x4C);
    let (compat, incompat, ro) = match rev {
        0 => (0, 0, 0),
        1 => (le32(sb, 0x5C), le32(sb, 0x60), le32(sb, 0x64)),
        _ => refuse!("revision {rev} is unknown"),
    };
    let state = le16(sb, 0x3A);
    if state & 0x2 != 0 {
        refuse!("the filesystem is marked as having errors");
    }
    if state & 0x1 == 0 {
        refuse!("the filesystem was not cleanly unmounted");
    }
    if incompat & INCOMPAT_JOURNAL_DEV != 0 {
        refuse!("an external journal device");
    }
    if incompat & !INCOMPAT_KNOWN != 0 {
        refuse!("incompatible features {:#x} are not supported", incompat & !INCOMPAT_KNOWN);
    }
    if ro & !RO_KNOWN != 0 {
        refuse!("read-only-compatible features {:#x} are not supported", ro & !RO_KNOWN);
    }
    let metadata_csum = ro & RO_METADATA_CSUM != 0;
    let csum_seed = if metadata_csum {
        if sb[0x175] != 1 {
            refuse!("checksum type {} is unknown", sb[0x175]);
        }
        let stored = le32(sb, 0x3FC);
        if crc32c(!0, &sb[..0x3FC]) != stored {
            refuse!("the superblock's checksum is wrong");
        }
        Some(if incompat & INCOMPAT_CSUM_SEED != 0 { le32(sb, 0x270) } else { crc32c(!0, &sb[0x68..0x78]) })
    } else {
        None
    };
    let is64 = incompat & INCOMPAT_64BIT != 0;
    let mut blocks = u64::from(le32(sb, 0x04));
    if is64 {
        blocks |= u64::from(le32(sb, 0x150)) << 32;
    }
    let first_data_block = u64::from(le32(sb, 0x14));
    if first_data_block != u64::from(block_size == 1024) {
        refuse!("first data block {first_data_block} does not fit block size {block_size}");
    }
    if blocks <= first_data_block {
        refuse!("block count {blocks} is too small");
    }
    match blocks.checked_mul(block_size) {
        Some(bytes) if bytes <= len => {}
        _ => refuse!("{blocks} blocks of {block_size} bytes do not fit in {len} bytes"),
    }
    let blocks_per_group = u64::from(le32(sb, 0x20));
    if blocks_per_group < 8
        || blocks_per_group > 8 * block_size
        || blocks_per_group > 65528
        || blocks_per_group % 8 != 0
    {
        refuse!("{blocks_per_group} blocks per group is impossible");
    }
    if u64::from(le32(sb, 0x24)) != blocks_per_group {
        refuse!("clusters per group differ from blocks per group");
    }
    let groups = (blocks - first_data_block).div_ceil(blocks_per_group);
    if groups > MAX_GROUPS {
        refuse!("{groups} groups is more than the {MAX_GROUPS} supported");
    }
    let inodes_per_group = u64::from(le32(sb, 0x28));
    if inodes_per_group == 0 || inodes_per_group > 8 * block_size || inodes_per_group > 65536 {
        refuse!("{inodes_per_group} inodes per group is impossible");
    }
    if groups * inodes_per_group != u64::from(le32(sb, 0x00)) {
        refuse!("the inode count does not match {groups} groups");
    }
    let inode_size = if rev == 0 { 128 } else { u64::from(le16(sb, 0x58)) };
    if inode_size < 128 || inode_size > block_size || !inode_size.is_power_of_two() {
        refuse!("inode size {inode_size} is impossible");
    }
    let desc_size = if is64 { u64::from(le16(sb, 0xFE)) } else { 32 };
    if !(32..=1024).contains(&desc_size) || !desc_size.is_power_of_two() || (is64 && desc_size < 64) {
        refuse!("group descriptor size {desc_size} is impossible");
    }
    let dpb = block_size / desc_size;
    let desc_blocks = groups.div_ceil(dpb);
    let reserved_gdt = u64::from(le16(sb, 0xCE));
    if reserved_gdt > block_size / 4 {
        refuse!("{reserved_gdt} reserved descriptor blocks is impossible");
    }
    let meta_bg = incompat & INCOMPAT_META_BG != 0;
    let first_meta_bg = u64::from(le32(sb, 0x104));
    if meta_bg && first_meta_bg > desc_blocks {
        refuse!("first meta_bg {first_meta_bg} is past the {desc_blocks} descriptor blocks");
    }
    let backups = if compat & COMPAT_SPARSE_SUPER2 != 0 {
        Backups::Two(le32(sb, 0x24C), le32(sb, 0x250))
    } else if ro & RO_SPARSE_SUPER != 0 {
        Backups::Sparse
    } else {
        Backups::All
    };
    let version = if incompat & !INCOMPAT_EXT3 != 0 || ro & !RO_EXT3 != 0 {
        4
    } else if compat & COMPAT_HAS_JOURNAL != 0 {
        3
    } else {
        2
    };
    let kind = Kind::Ext {
        version,
        block_size: block_size as u32,
        uuid: crate::uuid(&sb[0x68..0x78]),
        label: crate::label(&sb[0x78..0x88]),
    };
    Ok(Ok(Super {
        block_size,
        first_data_block,
        blocks,
        blocks_per_group,
        groups,
        desc_size,
        desc_blocks,
        inodes_per_group,
        inode_size,
        inode_blocks: (inodes_per_group * inode_size).div_ceil(block_size),
        reserved_gdt,
        first_meta_bg,
        meta_bg,
        flex_bg: incompat & INCOMPAT_FLEX_BG != 0,
        backups,
        group_csum: metadata_csum || ro & RO_GDT_CSUM != 0,
        csum_seed,
        recover: incompat & INCOMPAT_RECOVER != 0,
        uuid: sb[0x68..0x78].try_into().unwrap_or_default(),
        kind,
    }))
}

/// The used-block map of an ext2/3/4 filesystem.
#[derive(Debug)]
pub(crate) struct Ext {
    sb: Super,
    groups: Vec<Group>,
    /// Block extents `[start, end)`, sorted and disjoint: the bitmaps and inode tables (of any
    /// group) that lie in `BLOCK_UNINIT` groups.
    uninit_meta: Vec<(u64, u64)>,
    used_blocks: u64,
    /// The journal's copies of block bitmaps (none unless the journal needs recovery).
    overlay: Overlay,
    /// Blocks replay would write: the journal's committed copies of all kinds.
    replayed: u64,
    cache: Mutex<Cache>,
}

/// Reads the superblock and the group descriptors: `Ok(None)` when there is no ext magic.
pub(crate) fn probe(reader: &Reader<'_>) -> Result<Option<Verdict<(Kind, Ext)>>> {
    if reader.len < 2048 {
        return Ok(None);
    }
    let mut sb = vec![0u8; 1024];
    reader.read(&mut sb, 1024)?;
    if le16(&sb, 0x38) != MAGIC {
        return Ok(None);
    }
    let disk = match parse_super(&sb, reader.len)? {
        Ok(disk) => disk,
        Err(reason) => return Ok(Some(Err(reason))),
    };
    if !disk.recover {
        return Ok(Some(load(reader, disk, Overlay::default())?));
    }
    // The journal is found from what is on disk, as the kernel and e2fsck find it before
    // replaying; then everything is read as replay would leave it.
    let overlay = match journal::read(reader, &disk, &sb)? {
        Ok(overlay) => overlay,
        Err(reason) => return Ok(Some(Err(format!("the journal needs recovery: {reason}")))),
    };
    if overlay.is_empty() {
        return Ok(Some(load(reader, disk, overlay)?));
    }
    overlay.read(reader, &mut sb, 1024)?;
    if le16(&sb, 0x38) != MAGIC {
        return Ok(Some(Err("the journal's copy of the superblock has no ext magic".into())));
    }
    let replayed = match parse_super(&sb, reader.len)? {
        Ok(replayed) => replayed,
        Err(reason) => return Ok(Some(Err(format!("the journal's copy of the superblock: {reason}")))),
    };
    if replayed.block_size != disk.block_size {
        return Ok(Some(Err("the journal's copy of the superblock has another block size".into())));
    }
    Ok(Some(load(reader, replayed, overlay)?))
}

/// Reads and checks every group descriptor, through `overlay` (the journal's copies).
fn load(reader: &Reader<'_>, sb: Super, mut overlay: Overlay) -> Result<Verdict<(Kind, Ext)>> {
    let n = sb.groups as usize;
    let mut groups = Vec::with_capacity(n);
    // The inode bitmap and inode table of each group, until the uninit extents are known.
    let mut others = Vec::with_capacity(n);
    let mut free_total = 0u64;
    let dpb = sb.dpb();
    let bs = sb.block_size;
    let mut buf = Vec::new();
    let mut i = 0;
    while i < sb.desc_blocks {
        // Contiguous descriptor blocks are read together.
        let mut count = 1;
        if !sb.meta_bg || i < sb.first_meta_bg {
            let limit = if sb.meta_bg { sb.first_meta_bg } else { sb.desc_blocks };
            count = (limit - i).min(DESC_READ / bs).max(1);
        }
        let at = sb.desc_block(i);
        if at + count > sb.blocks {
            refuse!("group descriptor block {at} is past the end");
        }
        buf.resize((count * bs) as usize, 0);
        overlay.read(reader, &mut buf, at * bs)?;
        for (k, desc) in buf.chunks_exact(sb.desc_size as usize).enumerate() {
            let g = i * dpb + k as u64;
            if g >= sb.groups {
                break;
            }
            match parse_desc(&sb, g, desc) {
                Ok((group, free, inode_bitmap, inode_table)) => {
                    free_total += free;
                    groups.push(group);
                    others.push((inode_bitmap, inode_table));
                }
                Err(reason) => refuse!("group {g}: {reason}"),
            }
        }
        i += count;
    }
    let mut uninit_meta = Vec::new();
    for (group, (inode_bitmap, inode_table)) in groups.iter().zip(&others) {
        for (start, len) in [(group.bitmap, 1), (*inode_bitmap, 1), (*inode_table, sb.inode_blocks)] {
            if len == 0 {
                continue;
            }
            let end = start + len;
            let lands_uninit =
                (sb.group_of(start)..=sb.group_of(end - 1)).any(|h| groups[h as usize].state == GroupState::Uninit);
            if lands_uninit {
                uninit_meta.push((start, end));
            }
        }
    }
    drop(others);
    uninit_meta.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(uninit_meta.len());
    for (start, end) in uninit_meta {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged.shrink_to_fit();
    let replayed = overlay.len() as u64;
    // Only the bitmaps are read from here on.
    overlay.keep(groups.iter().filter(|g| g.state == GroupState::Bitmap).map(|g| g.bitmap));
    let kind = sb.kind.clone();
    let used_blocks = sb.blocks.saturating_sub(free_total);
    let cache = Mutex::new(Cache::default());
    Ok(Ok((kind, Ext { sb, groups, uninit_meta: merged, used_blocks, overlay, replayed, cache })))
}

/// Parses and checks descriptor `g`: the kept part, its free count, its inode bitmap and its
/// inode table.
fn parse_desc(sb: &Super, g: u64, d: &[u8]) -> std::result::Result<(Group, u64, u64, u64), String> {
    let wide = sb.desc_size >= 64;
    let hi = |at: usize| if wide { u64::from(le32(d, at)) << 32 } else { 0 };
    let block_bitmap = u64::from(le32(d, 0x00)) | hi(0x20);
    let inode_bitmap = u64::from(le32(d, 0x04)) | hi(0x24);
    let inode_table = u64::from(le32(d, 0x08)) | hi(0x28);
    let mut free = u64::from(le16(d, 0x0C));
    if wide {
        free |= u64::from(le16(d, 0x2C)) << 16;
    }
    let flags = le16(d, 0x12);
    let mut csum = u32::from(le16(d, 0x18));
    if sb.desc_size >= 0x3A {
        csum |= u32::from(le16(d, 0x38)) << 16;
    }
    if sb.group_csum && desc_csum(sb.csum_seed, &sb.uuid, g, d) != le16(d, 0x1E) {
        return Err("the descriptor's checksum is wrong".into());
    }
    let (lo, hi) = if sb.flex_bg {
        (sb.first_data_block, sb.blocks)
    } else {
        let first = sb.group_first(g);
        (first, first + sb.group_len(g))
    };
    let inside = |start: u64, len: u64| start >= lo && start.checked_add(len).is_some_and(|end| end <= hi);
    if !inside(block_bitmap, 1) {
        return Err(format!("block bitmap at {block_bitmap} is outside its range"));
    }
    if !inside(inode_bitmap, 1) {
        return Err(format!("inode bitmap at {inode_bitmap} is outside its range"));
    }
    if !inside(inode_table, sb.inode_blocks) {
        return Err(format!("inode table at {inode_table} is outside its range"));
    }
    if free > sb.group_len(g) {
        return Err(format!("{free} free blocks is more than the group holds"));
    }
    let state = if free == 0 {
        GroupState::Full
    } else if sb.group_csum && flags & BG_BLOCK_UNINIT != 0 {
        GroupState::Uninit
    } else {
        GroupState::Bitmap
    };
    Ok((Group { bitmap: block_bitmap, csum, state }, free, inode_bitmap, inode_table))
}

/// The checksum of descriptor `d` of group `g`: crc32c with `metadata_csum` (`seed`), else
/// crc16 (`gdt_csum`).
fn desc_csum(seed: Option<u32>, uuid: &[u8], g: u64, d: &[u8]) -> u16 {
    let group = (g as u32).to_le_bytes();
    if let Some(seed) = seed {
        let c = crc32c(crc32c(crc32c(crc32c(seed, &group), &d[..0x1E]), &[0, 0]), &d[0x20..]);
        c as u16
    } else {
        crc16(crc16(crc16(crc16(!0, uuid), &group), &d[..0x1E]), &d[0x20..])
    }
}

/// Recomputes the superblock's checksum and those of the descriptors in the normal layout
/// (after the superblock), so that mutated images get past them: for the random-input tests.
pub(crate) fn fix_checksums(data: &mut [u8]) {
    if data.len() < 2048 || le16(&data[1024..], 0x38) != MAGIC {
        return;
    }
    let sb = data[1024..2048].to_vec();
    let ro = le32(&sb, 0x64);
    let incompat = le32(&sb, 0x60);
    let metadata = ro & RO_METADATA_CSUM != 0;
    let log = le32(&sb, 0x18);
    if ro & (RO_METADATA_CSUM | RO_GDT_CSUM) != 0 && log <= 6 {
        let seed = metadata
            .then(|| if incompat & INCOMPAT_CSUM_SEED != 0 { le32(&sb, 0x270) } else { crc32c(!0, &sb[0x68..0x78]) });
        let bs = 1024u64 << log;
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let desc_size = if is64 { u64::from(le16(&sb, 0xFE)) } else { 32 };
        let fdb = u64::from(le32(&sb, 0x14));
        let bpg = u64::from(le32(&sb, 0x20)).max(1);
        let mut blocks = u64::from(le32(&sb, 0x04));
        if is64 {
            blocks |= u64::from(le32(&sb, 0x150)) << 32;
        }
        let groups = blocks.saturating_sub(fdb).div_ceil(bpg).min(MAX_GROUPS);
        if (32..=1024).contains(&desc_size) && desc_size.is_power_of_two() {
            for g in 0..groups {
                let at = (fdb + 1).saturating_mul(bs).saturating_add(g * desc_size);
                let Some(d) =
                    usize::try_from(at).ok().and_then(|at| data.get_mut(at..at.checked_add(desc_size as usize)?))
                else {
                    break;
                };
                let c = desc_csum(seed, &sb[0x68..0x78], g, d);
                d[0x1E..0x20].copy_from_slice(&c.to_le_bytes());
            }
        }
    }
    if metadata {
        let c = crc32c(!0, &data[1024..1024 + 0x3FC]);
        data[1024 + 0x3FC..2048].copy_from_slice(&c.to_le_bytes());
    }
}

impl Ext {
    /// Used bytes, from the descriptors' free counts.
    pub(crate) fn used_bytes(&self) -> u64 {
        self.used_blocks * self.sb.block_size
    }

    /// Blocks the journal holds that replay would write home.
    pub(crate) fn replayed_blocks(&self) -> u64 {
        self.replayed
    }

    /// The run at `offset` (< `len`, relative to the filesystem's start): its end and whether
    /// it is used.
    pub(crate) fn state_at(&self, reader: &Reader<'_>, offset: u64) -> Result<(u64, bool)> {
        let sb = &self.sb;
        let bs = sb.block_size;
        let fs_end = sb.blocks * bs;
        if offset >= fs_end {
            // Past the filesystem, inside its partition: an md superblock, or what a shrink
            // left, may live there. Copying it is never wrong.
            return Ok((reader.len, true));
        }
        let block = offset / bs;
        if block < sb.first_data_block {
            return Ok((sb.first_data_block * bs, true));
        }
        let mut g = sb.group_of(block);
        let first_group = g;
        let bits = self.bits(reader, g)?;
        let used = bits.get(block - sb.group_first(g));
        let mut bits = Some(bits);
        let mut start = block - sb.group_first(g);
        // Extend the run over following groups as far as they are known without reading.
        let end = loop {
            let n = sb.group_len(g);
            let end = match &bits {
                Some(bits) => bits.run_end(start, n, used),
                None => start,
            };
            if end < n || g + 1 >= sb.groups || g >= first_group + MERGE_GROUPS {
                break sb.group_first(g) + end;
            }
            g += 1;
            start = 0;
            bits = self.cheap_bits(g);
            if bits.is_none() {
                break sb.group_first(g);
            }
        };
        let end = end * bs;
        Ok((end.min(fs_end), used))
    }

    /// Group `g`'s bits if they are known without reading: a full group, or a cached one.
    fn cheap_bits(&self, g: u64) -> Option<Arc<Bits>> {
        if self.groups[g as usize].state == GroupState::Full {
            return Some(Arc::new(Bits::AllUsed));
        }
        self.cache.lock().unwrap_or_else(PoisonError::into_inner).get(g)
    }

    /// Group `g`'s bits, from the cache, its bitmap or its layout.
    fn bits(&self, reader: &Reader<'_>, g: u64) -> Result<Arc<Bits>> {
        if let Some(bits) = self.cheap_bits(g) {
            return Ok(bits);
        }
        let group = self.groups[g as usize];
        let sb = &self.sb;
        let bytes = (sb.blocks_per_group / 8) as usize;
        let bits = match group.state {
            GroupState::Full => Bits::AllUsed,
            GroupState::Bitmap => {
                // Read outside the lock: other workers go on meanwhile.
                let mut map = vec![0u8; bytes];
                self.overlay.read(reader, &mut map, group.bitmap * sb.block_size)?;
                match sb.csum_seed {
                    Some(seed) if !self.bitmap_csum_ok(seed, &map, group.csum) => Bits::AllUsed,
                    _ => Bits::Map(map),
                }
            }
            GroupState::Uninit => Bits::Map(self.uninit_bits(g, bytes)),
        };
        let bits = Arc::new(bits);
        self.cache.lock().unwrap_or_else(PoisonError::into_inner).put(g, Arc::clone(&bits));
        Ok(bits)
    }

    fn bitmap_csum_ok(&self, seed: u32, map: &[u8], stored: u32) -> bool {
        let c = crc32c(seed, map);
        if self.sb.desc_size >= 0x3A { c == stored } else { c & 0xFFFF == stored }
    }

    /// The used blocks of `BLOCK_UNINIT` group `g` (docs/FILESYSTEMS.md, "Block bitmaps").
    fn uninit_bits(&self, g: u64, bytes: usize) -> Vec<u8> {
        let sb = &self.sb;
        let first = sb.group_first(g);
        let end = first + sb.group_len(g);
        let mut map = vec![0u8; bytes];
        let mut mark = |start: u64, len: u64| {
            let (from, to) = (start.max(first), (start + len).min(end));
            for b in from..to.max(from) {
                let i = b - first;
                map[(i / 8) as usize] |= 1 << (i % 8);
            }
        };
        sb.reserved(g, &mut mark);
        let at = self.uninit_meta.partition_point(|&(_, e)| e <= first);
        for &(s, e) in self.uninit_meta[at..].iter().take_while(|&&(s, _)| s < end) {
            mark(s, e - s);
        }
        map
    }
}
