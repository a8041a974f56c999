//! The per-chunk hash tree used to compare endpoints that are not on the same host
//! (docs/PROTOCOL.md, "Hash tree").
//!
//! A chunk's leaves are its blocks; 16 leaves make a group; the chunk hash covers the group
//! hashes. Each level is keyed BLAKE3 truncated to 16 bytes, with a random key per session so
//! data crafted without the key cannot collide. Zero leaves are detected (and holes are zero
//! without being read) so zeros can travel as ranges, not bytes.

use crate::protocol::message::Hash;
use crate::zero::is_zero;

/// Leaves per group.
pub const FANOUT: usize = 16;
/// Bytes per chunk for a block size.
#[must_use]
pub fn chunk_size(block: usize) -> usize {
    block.max(1 << 20)
}

fn keyed(key: &[u8; 32], data: &[u8]) -> Hash {
    let full = blake3::keyed_hash(key, data);
    let mut out = [0u8; 16];
    out.copy_from_slice(&full.as_bytes()[..16]);
    out
}

/// Leaf and group hashes of one chunk, with zero flags.
#[derive(Debug, Clone)]
pub struct Tree {
    /// Leaf hashes.
    pub leaves: Vec<Hash>,
    /// Leaf is all zeros.
    pub leaf_zero: Vec<bool>,
    /// Group hashes.
    pub groups: Vec<Hash>,
    /// Group is all zeros.
    pub group_zero: Vec<bool>,
    /// The chunk hash.
    pub top: Hash,
}

/// Precomputed hash of an all-zero leaf of full length.
#[derive(Debug, Clone)]
pub struct Hasher {
    key: [u8; 32],
    block: usize,
    zero_leaf: Hash,
}

impl Hasher {
    /// A hasher for `block`-byte leaves with `key`.
    #[must_use]
    pub fn new(key: [u8; 32], block: usize) -> Hasher {
        let zero_leaf = keyed(&key, &vec![0u8; block]);
        Hasher { key, block, zero_leaf }
    }

    /// The tree of `data` (one chunk; the last may be short). `known_zero` skips the zero check
    /// and the hashing of a chunk known to be a hole.
    #[must_use]
    pub fn tree(&self, data: &[u8], known_zero: bool) -> Tree {
        let n = data.len().div_ceil(self.block);
        let mut leaves = Vec::with_capacity(n);
        let mut leaf_zero = Vec::with_capacity(n);
        for leaf in data.chunks(self.block) {
            let zero = known_zero || is_zero(leaf);
            leaves.push(if zero && leaf.len() == self.block { self.zero_leaf } else { keyed(&self.key, leaf) });
            leaf_zero.push(zero);
        }
        let mut groups = Vec::with_capacity(n.div_ceil(FANOUT));
        let mut group_zero = Vec::with_capacity(n.div_ceil(FANOUT));
        let mut concat = Vec::with_capacity(FANOUT * 16);
        for (hashes, zeros) in leaves.chunks(FANOUT).zip(leaf_zero.chunks(FANOUT)) {
            concat.clear();
            for h in hashes {
                concat.extend_from_slice(h);
            }
            groups.push(keyed(&self.key, &concat));
            group_zero.push(zeros.iter().all(|&z| z));
        }
        let concat: Vec<u8> = groups.iter().flatten().copied().collect();
        let top = keyed(&self.key, &concat);
        Tree { leaves, leaf_zero, groups, group_zero, top }
    }
}

impl Tree {
    /// True when every leaf is zero.
    #[must_use]
    pub fn is_zero(&self) -> bool {
        self.group_zero.iter().all(|&z| z)
    }

    /// Group zero flags and hashes as sent in a `Groups` reply.
    #[must_use]
    pub fn group_list(&self) -> (Vec<u8>, Vec<u8>) {
        (self.group_zero.iter().map(|&z| u8::from(z)).collect(), self.groups.iter().flatten().copied().collect())
    }

    /// Leaf zero flags and hashes of group `g` as sent in a `Leaves` reply; empty when `g` is
    /// out of range.
    #[must_use]
    pub fn leaf_list(&self, g: usize) -> (Vec<u8>, Vec<u8>) {
        let start = (g * FANOUT).min(self.leaves.len());
        let end = (start + FANOUT).min(self.leaves.len());
        (
            self.leaf_zero[start..end].iter().map(|&z| u8::from(z)).collect(),
            self.leaves[start..end].iter().flatten().copied().collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_changed_byte_changes_one_leaf_one_group_and_the_top() {
        let h = Hasher::new([7; 32], 4096);
        let mut data = vec![1u8; 1 << 20];
        let a = h.tree(&data, false);
        data[70_000] ^= 1;
        let b = h.tree(&data, false);
        let diff_leaves: Vec<_> = (0..a.leaves.len()).filter(|&i| a.leaves[i] != b.leaves[i]).collect();
        assert_eq!(diff_leaves, vec![70_000 / 4096]);
        let diff_groups: Vec<_> = (0..a.groups.len()).filter(|&i| a.groups[i] != b.groups[i]).collect();
        assert_eq!(diff_groups, vec![70_000 / 4096 / 16]);
        assert_ne!(a.top, b.top);
    }

    #[test]
    fn holes_hash_like_read_zeros_and_the_key_matters() {
        let h = Hasher::new([1; 32], 4096);
        let zeros = vec![0u8; (1 << 20) - 100];
        let read = h.tree(&zeros, false);
        let hole = h.tree(&zeros, true);
        assert_eq!(read.top, hole.top);
        assert!(read.is_zero());
        assert_ne!(Hasher::new([2; 32], 4096).tree(&zeros, true).top, hole.top);
    }
}
