//! Which of a destination's pages leave the page cache.
//!
//! By default blksync drops what it read from the page cache as it goes, so that a large sync
//! does not evict everyone else's cache. Pages it wrote are another matter:
//! `fadvise(DONTNEED)` over a range holding a few dirty blocks starts their writeback in small
//! batches, fails to drop them, drains every CPU's LRU lists and walks the range again, and ext4
//! then frees the buffer heads of whole large folios. On the 1 GiB benchmark with 1 % of 4 KiB
//! blocks changed, a drop per 16 MiB of destination made the sync take 0.21–0.24 s, against
//! 0.10–0.12 s without dropping what was written (`cat` of both files: 0.09 s). Dropping after
//! the final `fsync` was no better: 0.24–0.40 s.
//!
//! So a stretch of the destination is dropped when nothing was written in it (clean pages cost a
//! fraction of a microsecond each), or when writes fill a quarter of it or more: a fresh copy or
//! a large change, where the early writeback that a drop starts lets the disk work while the copy
//! goes on. A stretch with scattered writes stays cached, and the kernel reclaims it like any
//! other written data.

//!
//! An image small next to the host's memory is not dropped at all ([`cheap_to_keep`]): at most
//! a sixteenth of the memory (and never more than 1 GiB) per end, which evicts nobody's working
//! set, and the drops cost more than they save. On the 1 GiB benchmark (24 GiB of memory) the
//! 1 %-changed sync took 0.12–0.26 s with the drops and a steady 0.12–0.13 s without, on a day
//! when `fsync` on this VM's disk was slow.

use crate::extent::Extent;

/// Whether an end of `bytes` is small enough to leave in the page cache: at most a sixteenth
/// of the host's memory, and 1 GiB.
pub(crate) fn cheap_to_keep(bytes: u64) -> bool {
    static LIMIT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    bytes <= *LIMIT.get_or_init(|| (memory_total() / 16).min(1 << 30))
}

/// The host's memory in bytes, from `/proc/meminfo` (0 when unknown: then everything is dropped,
/// as before).
fn memory_total() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else { return 0 };
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// A stretch written this densely or more is dropped, to start its writeback early.
const DENSE_PART: u64 = 4;
/// Writes are judged in stretches of this size (the engine's own drop window).
pub(crate) const WINDOW: u64 = 16 << 20;

/// Whether to drop a stretch of `len` bytes of the destination in which `written` bytes were
/// written.
pub(crate) fn worth_dropping(len: u64, written: u64) -> bool {
    written == 0 || written.saturating_mul(DENSE_PART) >= len
}

/// The same decision for a writer that only writes (the peer applying what the client sends):
/// writes are gathered into stretches of up to [`WINDOW`].
#[derive(Debug, Default)]
pub(crate) struct WriteBehind {
    span: Option<Extent>,
    written: u64,
}

impl WriteBehind {
    /// Notes that `range` was written. Returns a stretch to drop now. Writes mostly come in
    /// ascending order; one that does not starts a new stretch.
    pub(crate) fn wrote(&mut self, range: Extent) -> Option<Extent> {
        let mut done = None;
        if self.span.is_some_and(|s| range.offset < s.offset || range.end() - s.offset > WINDOW) {
            done = self.take();
        }
        let span = self.span.get_or_insert(range);
        span.len = range.end().max(span.end()) - span.offset;
        self.written += range.len;
        done
    }

    /// The writes ended: the last stretch, if it is worth dropping.
    pub(crate) fn finish(&mut self) -> Option<Extent> {
        self.take()
    }

    /// The stretch gathered so far, if it is worth dropping.
    fn take(&mut self) -> Option<Extent> {
        let written = std::mem::take(&mut self.written);
        self.span.take().filter(|s| worth_dropping(s.len, written))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn small_images_stay_cached_large_ones_do_not() {
        assert!(cheap_to_keep(0));
        assert!(!cheap_to_keep((1 << 30) + 1), "never more than 1 GiB");
        assert!(memory_total() > 0, "/proc/meminfo has MemTotal");
    }

    #[test]
    fn clean_and_dense_stretches_are_dropped_scattered_ones_kept() {
        assert!(worth_dropping(WINDOW, 0));
        assert!(worth_dropping(WINDOW, WINDOW / 4));
        assert!(!worth_dropping(WINDOW, 40 * 4096));
    }

    #[test]
    fn a_dense_writer_drops_each_window() {
        let mut wb = WriteBehind::default();
        let dropped: Vec<_> = (0..64).filter_map(|i| wb.wrote(Extent { offset: i * MIB, len: MIB })).collect();
        assert_eq!(dropped, (0..3).map(|i| Extent { offset: i * WINDOW, len: WINDOW }).collect::<Vec<_>>());
    }

    #[test]
    fn writes_out_of_order_start_a_new_stretch() {
        let mut wb = WriteBehind::default();
        assert_eq!(wb.wrote(Extent { offset: 8 * MIB, len: 8 * MIB }), None);
        assert_eq!(wb.wrote(Extent { offset: 0, len: 4096 }), Some(Extent { offset: 8 * MIB, len: 8 * MIB }));
        assert_eq!(wb.finish(), Some(Extent { offset: 0, len: 4096 }));
        assert_eq!(wb.finish(), None);
    }

    #[test]
    fn a_scattered_writer_drops_nothing() {
        let mut wb = WriteBehind::default();
        assert!((0..4096).all(|i| wb.wrote(Extent { offset: i * 400 * 1024, len: 4096 }).is_none()));
    }
}
