//! Free space in the data area: where new payloads and indexes go.
//!
//! Rebuilt at open from the committed index (everything it does not reference is free), then
//! kept as extents indexed both by start (to merge neighbours when space is freed) and by length
//! (best fit: the smallest free extent that holds a request, so that large extents stay whole
//! for large payloads). A request nothing holds goes to the end of the file.

use std::collections::{BTreeMap, BTreeSet};

use crate::header::{UNIT, round_up};

/// The free extents of a file, and its end.
#[derive(Debug, Default)]
pub struct Space {
    /// start → end.
    by_start: BTreeMap<u64, u64>,
    /// (length, start).
    by_len: BTreeSet<(u64, u64)>,
    /// One past the last byte in use or free: the file's length rounded up to the unit.
    end: u64,
}

impl Space {
    /// The free extents `free` (ascending, disjoint, aligned) of a file ending at `end`.
    #[must_use]
    pub fn new(free: &[(u64, u64)], end: u64) -> Space {
        let mut space = Space { end: round_up(end), ..Space::default() };
        for &(start, end) in free {
            space.release(start, end);
        }
        space
    }

    /// Takes `len` bytes (rounded up to the unit) and returns where they start.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let len = round_up(len.max(1));
        let Some(&(have, start)) = self.by_len.range((len, 0)..).next() else {
            let start = self.end;
            self.end += len;
            return start;
        };
        self.by_len.remove(&(have, start));
        self.by_start.remove(&start);
        if have > len {
            self.insert(start + len, start + have);
        }
        start
    }

    /// Gives `[start, end)` back, merged with free neighbours; returns the merged extent.
    pub fn release(&mut self, start: u64, end: u64) -> (u64, u64) {
        debug_assert!(
            start.is_multiple_of(UNIT) && end.is_multiple_of(UNIT) && start < end && end <= self.end,
            "{start}..{end}"
        );
        let (mut start, mut end) = (start, end);
        if let Some((&s, &e)) = self.by_start.range(..start).next_back()
            && e == start
        {
            self.remove(s, e);
            start = s;
        }
        if let Some(&e) = self.by_start.get(&end) {
            self.remove(end, e);
            end = e;
        }
        self.insert(start, end);
        (start, end)
    }

    /// Drops free space at the end of the file and returns the new end, when there was some.
    pub fn trim_tail(&mut self) -> Option<u64> {
        let (&s, &e) = self.by_start.iter().next_back()?;
        (e == self.end).then(|| {
            self.remove(s, e);
            self.end = s;
            s
        })
    }

    /// One past the last byte in use or free.
    #[cfg(test)]
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Bytes free before the end.
    #[cfg(test)]
    pub fn free_bytes(&self) -> u64 {
        self.by_len.iter().map(|(len, _)| len).sum()
    }

    fn insert(&mut self, start: u64, end: u64) {
        self.by_start.insert(start, end);
        self.by_len.insert((end - start, start));
    }

    fn remove(&mut self, start: u64, end: u64) {
        self.by_start.remove(&start);
        self.by_len.remove(&(end - start, start));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const U: u64 = UNIT;

    #[test]
    fn best_fit_then_the_end_and_neighbours_merge() {
        let mut s = Space::new(&[(2 * U, 3 * U), (5 * U, 9 * U)], 10 * U);
        assert_eq!(s.alloc(1), 2 * U, "the smallest extent that fits");
        assert_eq!(s.alloc(2 * U), 5 * U);
        assert_eq!(s.alloc(3 * U), 10 * U, "nothing holds 3 units: the end");
        assert_eq!(s.end(), 13 * U);
        assert_eq!(s.release(5 * U, 7 * U), (5 * U, 9 * U));
        assert_eq!(s.release(2 * U, 3 * U), (2 * U, 3 * U));
        assert_eq!(s.release(10 * U, 13 * U), (10 * U, 13 * U));
        assert_eq!(s.trim_tail(), Some(10 * U));
        assert_eq!(s.trim_tail(), None);
        assert_eq!(s.free_bytes(), 5 * U);
    }

    proptest! {
        /// Allocations never overlap each other or free space, and freeing everything leaves
        /// one extent (nothing is lost or counted twice).
        #[test]
        fn allocations_are_disjoint_and_everything_comes_back(ops in proptest::collection::vec((1u64..40_000, any::<bool>()), 1..200)) {
            let mut s = Space::new(&[], 2 * U);
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (len, free) in ops {
                if free && !live.is_empty() {
                    let (a, b) = live.swap_remove(len as usize % live.len());
                    s.release(a, b);
                } else {
                    let a = s.alloc(len);
                    let b = a + round_up(len);
                    prop_assert!(a >= 2 * U && b <= s.end());
                    prop_assert!(live.iter().all(|&(x, y)| b <= x || a >= y), "{a}..{b} overlaps");
                    live.push((a, b));
                }
                let used: u64 = live.iter().map(|(a, b)| b - a).sum();
                prop_assert_eq!(used + s.free_bytes(), s.end() - 2 * U);
            }
            for (a, b) in live {
                s.release(a, b);
            }
            prop_assert_eq!(s.trim_tail(), Some(2 * U));
        }
    }
}
