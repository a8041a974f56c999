//! Byte ranges and lists of them.
//!
//! The engine thinks in half-open ranges `[offset, offset + len)`. [`Runs`] collects ranges
//! in ascending order and merges neighbours, which is how adjacent differing blocks become one
//! large write.

use serde::Serialize;

/// A half-open byte range `[offset, offset + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Number of bytes.
    pub len: u64,
}

impl Extent {
    /// The range `[start, end)`; `end` must not be below `start`.
    #[must_use]
    pub fn between(start: u64, end: u64) -> Extent {
        debug_assert!(end >= start);
        Extent { offset: start, len: end - start }
    }

    /// One past the last byte.
    #[must_use]
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }

    /// The overlap of two ranges, if they overlap.
    #[must_use]
    pub fn intersect(&self, other: &Extent) -> Option<Extent> {
        let start = self.offset.max(other.offset);
        let end = self.end().min(other.end());
        (start < end).then(|| Extent::between(start, end))
    }
}

/// Ranges pushed in ascending order, with touching neighbours of the same tag merged.
///
/// The tag distinguishes runs that must not merge (data to write versus zeros to punch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runs<T> {
    runs: Vec<(T, Extent)>,
}

impl<T> Default for Runs<T> {
    fn default() -> Self {
        Runs { runs: Vec::new() }
    }
}

impl<T: Copy + PartialEq> Runs<T> {
    /// An empty list.
    #[must_use]
    pub fn new() -> Self {
        Runs::default()
    }

    /// Appends `[offset, offset + len)` with `tag`, merging it into the last run when that run
    /// ends exactly at `offset` and has the same tag. Empty ranges are ignored.
    pub fn push(&mut self, tag: T, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        if let Some((last_tag, last)) = self.runs.last_mut()
            && *last_tag == tag
            && last.end() == offset
        {
            last.len += len;
            return;
        }
        debug_assert!(self.runs.last().is_none_or(|(_, l)| l.end() <= offset), "pushed out of order");
        self.runs.push((tag, Extent { offset, len }));
    }

    /// The runs, ascending.
    pub fn iter(&self) -> impl Iterator<Item = &(T, Extent)> {
        self.runs.iter()
    }

    /// Number of runs.
    #[must_use]
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// True when nothing was pushed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Forgets all runs, keeping the allocation.
    pub fn clear(&mut self) {
        self.runs.clear();
    }
}

/// The parts of `range` that `covered` (ascending, non-overlapping) leaves out.
#[must_use]
pub fn gaps(range: Extent, covered: &[Extent]) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut pos = range.offset;
    for c in covered {
        if let Some(i) = c.intersect(&range) {
            if i.offset > pos {
                out.push(Extent::between(pos, i.offset));
            }
            pos = pos.max(i.end());
        }
    }
    if pos < range.end() {
        out.push(Extent::between(pos, range.end()));
    }
    out
}

/// The parts common to `a` and `b` (each ascending and non-overlapping), ascending.
#[must_use]
pub fn overlap(a: &[Extent], b: &[Extent]) -> Vec<Extent> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if let Some(x) = a[i].intersect(&b[j]) {
            out.push(x);
        }
        if a[i].end() <= b[j].end() {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn touching_runs_of_one_tag_merge() {
        let mut r = Runs::new();
        r.push('d', 0, 4096);
        r.push('d', 4096, 4096);
        r.push('z', 8192, 4096);
        r.push('d', 16384, 10);
        r.push('d', 16394, 0);
        let v: Vec<_> = r.iter().copied().collect();
        assert_eq!(
            v,
            vec![
                ('d', Extent { offset: 0, len: 8192 }),
                ('z', Extent { offset: 8192, len: 4096 }),
                ('d', Extent { offset: 16384, len: 10 }),
            ]
        );
    }

    #[test]
    fn intersection_of_disjoint_ranges_is_none() {
        assert_eq!(Extent::between(0, 10).intersect(&Extent::between(10, 20)), None);
        assert_eq!(Extent::between(0, 15).intersect(&Extent::between(10, 20)), Some(Extent::between(10, 15)));
    }

    proptest! {
        /// Pushing blocks one at a time covers exactly the bytes pushed, with no two touching
        /// runs of one tag left unmerged.
        #[test]
        fn runs_cover_what_was_pushed(blocks in proptest::collection::vec((0u8..3, 0u64..5), 0..200)) {
            let mut r = Runs::new();
            let mut pos = 0u64;
            let mut expect = Vec::new();
            for (tag, gap) in &blocks {
                pos += gap * 512;
                r.push(*tag, pos, 512);
                expect.push((*tag, pos));
                pos += 512;
            }
            let total: u64 = r.iter().map(|(_, e)| e.len).sum();
            prop_assert_eq!(total, 512 * blocks.len() as u64);
            for w in r.runs.windows(2) {
                prop_assert!(w[0].1.end() <= w[1].1.offset);
                prop_assert!(!(w[0].0 == w[1].0 && w[0].1.end() == w[1].1.offset));
            }
            for (tag, off) in expect {
                prop_assert!(r.iter().any(|(t, e)| *t == tag && e.offset <= off && off + 512 <= e.end()));
            }
        }

        #[test]
        fn gaps_and_covered_partition_the_range(
            start in 0u64..1000, len in 0u64..1000,
            cuts in proptest::collection::vec((0u64..2000, 0u64..300), 0..10),
        ) {
            let range = Extent { offset: start, len };
            let mut covered: Vec<Extent> = cuts.iter().map(|(o, l)| Extent { offset: *o, len: *l }).collect();
            covered.sort_by_key(|e| e.offset);
            // make them non-overlapping
            let mut merged: Vec<Extent> = Vec::new();
            for c in covered {
                match merged.last_mut() {
                    Some(m) if c.offset <= m.end() => m.len = m.len.max(c.end() - m.offset),
                    _ => merged.push(c),
                }
            }
            let holes = gaps(range, &merged);
            for b in range.offset..range.end() {
                let in_hole = holes.iter().any(|h| h.offset <= b && b < h.end());
                let in_cov = merged.iter().any(|c| c.offset <= b && b < c.end());
                prop_assert!(in_hole != in_cov, "byte {} hole={} covered={}", b, in_hole, in_cov);
            }
        }
    }

    proptest! {
        #[test]
        fn overlap_is_what_both_cover(a in proptest::collection::vec((0u64..64, 1u64..8), 0..8), b in proptest::collection::vec((0u64..64, 1u64..8), 0..8)) {
            let list = |v: &[(u64, u64)]| {
                let mut out: Vec<Extent> = Vec::new();
                let mut pos = 0;
                for &(gap, len) in v {
                    out.push(Extent { offset: pos + gap, len });
                    pos += gap + len + 1;
                }
                out
            };
            let (a, b) = (list(&a), list(&b));
            let both = overlap(&a, &b);
            for x in 0..700u64 {
                let inside = |l: &[Extent]| l.iter().any(|e| e.offset <= x && x < e.end());
                prop_assert_eq!(inside(&both), inside(&a) && inside(&b));
            }
            prop_assert!(both.windows(2).all(|w| w[0].end() <= w[1].offset));
        }
    }
}
