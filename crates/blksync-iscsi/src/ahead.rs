//! Read-ahead of a LUN opened for reading (docs/ISCSI.md, "Read-ahead").
//!
//! The engine's workers each read a chunk and then compare and write it locally; while a
//! worker does its local part, none of its commands are in flight, and with two workers the
//! target sits idle whenever both are busy with their files. So a reader that goes on where the
//! furthest read ended (a sequential one) gets the next reads of the same length asked for
//! before it asks: [`GROUPS`] of them, each a group of commands whose answers wait in their
//! batch until a read of exactly that range takes them.
//!
//! This module is the bookkeeping only (which ranges, which group a read takes, which groups
//! are stale), generic over what a group holds, so that it is tested without a target.

use std::collections::VecDeque;

/// Reads asked for ahead of the furthest read: two groups of 2 MiB are 16 commands of 256 KiB,
/// which with the engine's two workers' own 16 stay within the default queue depth of 32.
pub(crate) const GROUPS: usize = 2;
/// A group more than this many read lengths away from a read is given up (the reader jumped:
/// holes skipped, a verification pass from the start).
const REACH: u64 = 8;

/// Groups read ahead, and where the stream goes on.
pub(crate) struct Ahead<G> {
    groups: VecDeque<(u64, u64, G)>,
    /// The end of the furthest read asked for, by a reader or ahead.
    end: u64,
}

impl<G> Default for Ahead<G> {
    fn default() -> Self {
        Ahead { groups: VecDeque::new(), end: 0 }
    }
}

impl<G> Ahead<G> {
    /// A read of `[offset, offset + len)`: the group read ahead for exactly that range, if any,
    /// and whether the read continues the stream (it took a group, or starts where the furthest
    /// read ended). Groups out of reach of this read are dropped, and a read out of reach of
    /// the stream starts a new one where it ends (a jump, forwards or back).
    pub(crate) fn take(&mut self, offset: u64, len: u64) -> (Option<G>, bool) {
        let reach = len.saturating_mul(REACH);
        self.groups.retain(|(o, l, _)| o + l > offset.saturating_sub(reach) && *o < offset.saturating_add(reach));
        let hit = self.groups.iter().position(|(o, l, _)| *o == offset && *l == len);
        let group = hit.and_then(|i| self.groups.remove(i)).map(|(_, _, g)| g);
        let sequential = group.is_some() || offset == self.end;
        // Two workers' reads may come a little out of order: within reach, the stream's end
        // stays the furthest.
        self.end =
            if sequential || offset.abs_diff(self.end) <= reach { self.end.max(offset + len) } else { offset + len };
        (group, sequential)
    }

    /// The ranges to read ahead after a sequential read of `len` bytes: from the stream's end,
    /// until [`GROUPS`] are outstanding, below `size`, and only while `wanted` says the range
    /// is worth reading (not a known hole). The caller reads each and [`Ahead::add`]s it.
    pub(crate) fn plan(&mut self, len: u64, size: u64, wanted: impl Fn(u64, u64) -> bool) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = self.end;
        while self.groups.len() + out.len() < GROUPS && at < size && len > 0 {
            let n = len.min(size - at);
            if !wanted(at, n) {
                break;
            }
            out.push((at, n));
            at += n;
        }
        self.end = at;
        out
    }

    /// A group read ahead for `[offset, offset + len)`.
    pub(crate) fn add(&mut self, offset: u64, len: u64, group: G) {
        self.groups.push_back((offset, len, group));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 2 << 20;

    /// Two workers reading chunks in turn, as the engine's do: after the first read, every
    /// read finds its group, and two groups stay ahead.
    #[test]
    fn a_sequential_reader_finds_its_reads_done_ahead() {
        let mut a = Ahead::default();
        let (g, seq) = a.take(0, M);
        assert!(g.is_none() && seq);
        let plan = a.plan(M, 100 * M, |_, _| true);
        assert_eq!(plan, [(M, M), (2 * M, M)]);
        for (o, l) in plan {
            a.add(o, l, o);
        }
        for k in 1..50 {
            let (g, seq) = a.take(k * M, M);
            assert_eq!(g, Some(k * M), "read {k}");
            assert!(seq);
            let plan = a.plan(M, 100 * M, |_, _| true);
            assert_eq!(plan, [((k + 2) * M, M)], "read {k}");
            a.add(plan[0].0, plan[0].1, plan[0].0);
        }
    }

    #[test]
    fn reads_ahead_stop_at_the_end_and_before_holes() {
        let mut a: Ahead<u64> = Ahead::default();
        a.take(0, M);
        assert_eq!(a.plan(M, M + 1000, |_, _| true), [(M, 1000)], "the last read is shorter");
        let mut a: Ahead<u64> = Ahead::default();
        a.take(0, M);
        assert_eq!(a.plan(M, 100 * M, |o, _| o < 2 * M), [(M, M)], "not into a hole");
    }

    /// A read elsewhere takes nothing and reads nothing ahead; groups out of reach go.
    #[test]
    fn a_jump_drops_what_was_read_ahead() {
        let mut a = Ahead::default();
        a.take(0, M);
        for (o, l) in a.plan(M, 100 * M, |_, _| true) {
            a.add(o, l, o);
        }
        let (g, seq) = a.take(50 * M, M);
        assert!(g.is_none() && !seq);
        assert!(a.groups.is_empty(), "groups far behind are dropped");
        // Back to the start (a verification pass): a fresh stream from there, which the next
        // read continues, even when the other worker's read comes first.
        let (g, seq) = a.take(0, M);
        assert!(g.is_none() && !seq);
        assert!(!a.take(2 * M, M).1);
        assert!(!a.take(M, M).1);
        assert!(a.take(3 * M, M).1);
        assert_eq!(a.plan(M, 100 * M, |_, _| true), [(4 * M, M), (5 * M, M)]);
    }

    /// Two workers out of order: the later chunk asked first still leaves the earlier one to be
    /// read on demand, and both continue the stream.
    #[test]
    fn reads_a_little_out_of_order_still_hit() {
        let mut a = Ahead::default();
        a.take(0, M);
        for (o, l) in a.plan(M, 100 * M, |_, _| true) {
            a.add(o, l, o);
        }
        assert_eq!(a.take(2 * M, M).0, Some(2 * M));
        assert_eq!(a.take(M, M).0, Some(M));
    }
}
