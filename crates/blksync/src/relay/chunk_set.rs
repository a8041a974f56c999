//! A set of chunk numbers kept as disjoint ranges, so that a run of a million hole chunks is one
//! entry and every operation costs the number of ranges it touches, not of chunks.

use std::collections::BTreeMap;

/// Disjoint, non-adjacent `[start, end)` ranges of chunk numbers.
#[derive(Debug, Default)]
pub(super) struct ChunkSet {
    ranges: BTreeMap<u64, u64>,
}

impl ChunkSet {
    /// Adds `[a, b)`; returns how many of its chunks were not in the set.
    pub(super) fn insert(&mut self, a: u64, b: u64) -> u64 {
        if a >= b {
            return 0;
        }
        let (mut start, mut end, mut added) = (a, b, b - a);
        // Every range that overlaps or touches the growing one is merged into it.
        while let Some((&s, &e)) = self.ranges.range(..=end).next_back() {
            if e < start {
                break;
            }
            added -= e.min(b).saturating_sub(s.max(a));
            start = start.min(s);
            end = end.max(e);
            self.ranges.remove(&s);
        }
        self.ranges.insert(start, end);
        added
    }

    /// Removes `[a, b)`.
    pub(super) fn remove(&mut self, a: u64, b: u64) {
        for (s, e) in self.within(a, b) {
            let (&start, &end) = self.ranges.range(..=s).next_back().expect("within returns parts of ranges");
            self.ranges.remove(&start);
            if start < s {
                self.ranges.insert(start, s);
            }
            if e < end {
                self.ranges.insert(e, end);
            }
        }
    }

    /// Chunk `c` is in the set.
    pub(super) fn contains(&self, c: u64) -> bool {
        self.ranges.range(..=c).next_back().is_some_and(|(_, &e)| c < e)
    }

    /// The parts of `[a, b)` that are in the set, ascending.
    pub(super) fn within(&self, a: u64, b: u64) -> Vec<(u64, u64)> {
        let first = self.ranges.range(..=a).next_back().filter(|&(_, &e)| e > a).map_or(a, |(&s, _)| s);
        self.ranges.range(first..b).map(|(&s, &e)| (s.max(a), e.min(b))).filter(|(s, e)| s < e).collect()
    }

    /// Removes the range that starts at `c`, if there is one, and returns its end.
    pub(super) fn take_from(&mut self, c: u64) -> Option<u64> {
        self.ranges.remove(&c)
    }
}

#[cfg(test)]
mod tests {
    use super::ChunkSet;
    use proptest::prelude::*;

    proptest! {
        /// Against a plain set of numbers: inserts count what is new, removes and lookups agree,
        /// and the ranges stay disjoint and merged.
        #[test]
        fn behaves_as_a_set_of_numbers(ops in proptest::collection::vec((any::<bool>(), 0u64..64, 0u64..16), 1..60)) {
            let mut set = ChunkSet::default();
            let mut plain = std::collections::BTreeSet::new();
            for (insert, a, len) in ops {
                let b = a + len;
                if insert {
                    let new = (a..b).filter(|c| !plain.contains(c)).count() as u64;
                    prop_assert_eq!(set.insert(a, b), new);
                    plain.extend(a..b);
                } else {
                    set.remove(a, b);
                    for c in a..b {
                        plain.remove(&c);
                    }
                }
                for c in 0..90 {
                    prop_assert_eq!(set.contains(c), plain.contains(&c));
                }
                let inside: u64 = set.within(10, 50).iter().map(|(s, e)| e - s).sum();
                prop_assert_eq!(inside, plain.range(10..50).count() as u64);
                let mut last_end = None;
                for (&s, &e) in &set.ranges {
                    prop_assert!(s < e);
                    prop_assert!(last_end.is_none_or(|l| l < s), "ranges must be disjoint and not touch");
                    last_end = Some(e);
                }
            }
        }
    }
}
