//! Decompressed chunks held in memory: dirty ones that partial writes go into (each is
//! stored once, when it is evicted or flushed: as a patch record of its changed blocks or as a
//! new payload), and clean ones recently read.
//!
//! A slot knows which 4 KiB blocks of its chunk are dirty, and whether its buffer holds the
//! whole chunk (*full*) or only the dirty blocks (*sparse*: writes of whole blocks need nothing
//! from the file).
//!
//! A chunk that one thread is loading or writing out is [`Slot::Busy`]: every other thread that
//! wants it waits on the image's condition variable, which serialises all I/O on one chunk
//! while different chunks proceed in parallel. The image (`image.rs`) runs that protocol; this
//! module is the bookkeeping: slots, least-recently-used order, and spare buffers.

use std::collections::HashMap;

use blksync_core::buffer::Aligned;

/// A set of a chunk's 4 KiB blocks, one bit each (empty without an allocation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blocks(Vec<u64>);

impl Blocks {
    /// Adds blocks `[first, end)`.
    pub fn insert(&mut self, first: usize, end: usize) {
        if end > self.0.len() * 64 {
            self.0.resize(end.div_ceil(64), 0);
        }
        for b in first..end {
            self.0[b / 64] |= 1 << (b % 64);
        }
    }

    /// Whether block `b` is in.
    #[must_use]
    pub fn contains(&self, b: usize) -> bool {
        self.0.get(b / 64).is_some_and(|w| w & (1 << (b % 64)) != 0)
    }

    /// Whether every block of `[first, end)` is in.
    #[must_use]
    pub fn covers(&self, first: usize, end: usize) -> bool {
        (first..end).all(|b| self.contains(b))
    }

    /// Blocks in.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether none is in.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// The blocks in, ascending.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0
            .iter()
            .enumerate()
            .flat_map(|(k, &w)| (0..64).filter(move |b| w & (1 << b) != 0).map(move |b| k * 64 + b))
    }
}

/// A chunk's buffer and what it knows, while a thread holds it (busy) or in a ready slot.
#[derive(Debug)]
pub struct Held {
    /// A chunk's bytes: all of it when `full`, else the dirty blocks only.
    pub buf: Aligned,
    /// Blocks written and not yet stored in the file.
    pub dirty: Blocks,
    /// The buffer holds the whole chunk's current content.
    pub full: bool,
}

impl Held {
    /// Whether the buffer knows the content of blocks `[first, end)`.
    #[must_use]
    pub fn knows(&self, first: usize, end: usize) -> bool {
        self.full || self.dirty.covers(first, end)
    }
}

/// One cached chunk.
#[derive(Debug)]
pub enum Slot {
    /// A thread is loading it or writing it out.
    Busy,
    /// Its content.
    Ready {
        /// The buffer and its dirty blocks.
        held: Held,
        /// When it was last used, for eviction.
        used: u64,
    },
}

/// The cache of one image.
#[derive(Debug)]
pub struct Cache {
    slots: HashMap<u64, Slot>,
    clock: u64,
    /// Most ready slots kept.
    capacity: usize,
    chunk_size: usize,
    spare: Vec<Aligned>,
}

impl Cache {
    /// A cache of at most `capacity` chunks of `chunk_size` bytes.
    pub fn new(capacity: usize, chunk_size: usize) -> Cache {
        Cache { slots: HashMap::new(), clock: 0, capacity: capacity.max(2), chunk_size, spare: Vec::new() }
    }

    /// Keeps at most `capacity` chunks (never fewer than two) from now on; what is cached stays
    /// until the next eviction.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(2);
        self.spare.truncate(self.capacity);
    }

    /// The slot of chunk `i`.
    pub fn get_mut(&mut self, i: u64) -> Option<&mut Slot> {
        self.clock += 1;
        let clock = self.clock;
        let slot = self.slots.get_mut(&i)?;
        if let Slot::Ready { used, .. } = slot {
            *used = clock;
        }
        Some(slot)
    }

    /// Whether chunk `i` has a slot.
    #[cfg(test)]
    pub fn holds(&self, i: u64) -> bool {
        self.slots.contains_key(&i)
    }

    /// Whether chunk `i` may hold data the index and the patch table do not show: busy, or
    /// dirty.
    pub fn unstored(&self, i: u64) -> bool {
        match self.slots.get(&i) {
            Some(Slot::Busy) => true,
            Some(Slot::Ready { held, .. }) => !held.dirty.is_empty(),
            None => false,
        }
    }

    /// Marks chunk `i` busy (it must have no slot).
    pub fn set_busy(&mut self, i: u64) {
        let old = self.slots.insert(i, Slot::Busy);
        debug_assert!(old.is_none(), "chunk {i} already had a slot");
    }

    /// Takes what ready chunk `i` holds, leaving it busy.
    pub fn take(&mut self, i: u64) -> Option<Held> {
        match self.slots.insert(i, Slot::Busy) {
            Some(Slot::Ready { held, .. }) => Some(held),
            other => {
                // Not ready: put back what was there.
                match other {
                    Some(slot) => self.slots.insert(i, slot),
                    None => self.slots.remove(&i),
                };
                None
            }
        }
    }

    /// Makes busy chunk `i` ready with `held`; a clean sparse one (which knows nothing) is
    /// dropped instead.
    pub fn set_ready(&mut self, i: u64, held: Held) {
        if !held.full && held.dirty.is_empty() {
            self.slots.remove(&i);
            self.recycle(held.buf);
            return;
        }
        self.clock += 1;
        self.slots.insert(i, Slot::Ready { held, used: self.clock });
    }

    /// Drops chunk `i`'s slot, keeping its buffer for reuse.
    pub fn remove(&mut self, i: u64) {
        if let Some(Slot::Ready { held, .. }) = self.slots.remove(&i) {
            self.recycle(held.buf);
        }
    }

    /// A chunk-sized buffer (its content is whatever it last held).
    pub fn buffer(&mut self) -> Aligned {
        self.spare.pop().unwrap_or_else(|| Aligned::new(self.chunk_size))
    }

    /// Keeps `buf` for reuse while cached and spare buffers together stay within the capacity:
    /// the cache's memory is its capacity, not twice that.
    pub fn recycle(&mut self, buf: Aligned) {
        if self.slots.len() + self.spare.len() < self.capacity {
            self.spare.push(buf);
        }
    }

    /// The least recently used ready chunk, when more chunks are ready than the capacity.
    pub fn over_capacity(&self) -> Option<(u64, bool)> {
        let ready = self.slots.values().filter(|s| matches!(s, Slot::Ready { .. })).count();
        if ready <= self.capacity {
            return None;
        }
        self.slots
            .iter()
            .filter_map(|(&i, s)| match s {
                Slot::Ready { used, held } => Some((*used, i, !held.dirty.is_empty())),
                Slot::Busy => None,
            })
            .min()
            .map(|(_, i, dirty)| (i, dirty))
    }

    /// A dirty ready chunk, lowest first.
    pub fn dirty(&self) -> Option<u64> {
        self.slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Ready { held, .. } if !held.dirty.is_empty()))
            .map(|(&i, _)| i)
            .min()
    }

    /// Whether any chunk is busy.
    pub fn any_busy(&self) -> bool {
        self.slots.values().any(|s| matches!(s, Slot::Busy))
    }

    /// Clean ready chunks in `[first, last]`, dropped (their buffers kept for reuse).
    pub fn drop_clean(&mut self, first: u64, last: u64) {
        let clean: Vec<u64> = self
            .slots
            .iter()
            .filter(|&(&i, s)| {
                (first..=last).contains(&i) && matches!(s, Slot::Ready { held, .. } if held.dirty.is_empty())
            })
            .map(|(&i, _)| i)
            .collect();
        for i in clean {
            self.remove(i);
        }
    }

    /// Drops every slot (none may be busy or dirty).
    pub fn clear(&mut self) {
        let all: Vec<u64> = self.slots.keys().copied().collect();
        for i in all {
            self.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_ready_chunk_goes_first_and_busy_ones_never() {
        let mut c = Cache::new(2, 4096);
        for i in 0..3 {
            c.set_busy(i);
            let buf = c.buffer();
            let mut dirty = Blocks::default();
            if i == 1 {
                dirty.insert(0, 1);
            }
            c.set_ready(i, Held { buf, dirty, full: true });
        }
        assert!(matches!(c.get_mut(0), Some(Slot::Ready { .. })));
        assert_eq!(c.over_capacity(), Some((1, true)), "0 was used since");
        assert_eq!(c.dirty(), Some(1));
        let mut held = c.take(1).unwrap();
        assert!(!held.dirty.is_empty() && c.any_busy() && c.take(1).is_none());
        assert_eq!(c.over_capacity(), None, "two ready, one busy");
        held.dirty = Blocks::default();
        c.set_ready(1, held);
        c.drop_clean(0, 1);
        assert!(!c.holds(0) && !c.holds(1) && c.holds(2));
        assert!(c.take(7).is_none() && !c.holds(7));
        // A sparse slot made clean knows nothing: dropped.
        c.set_busy(3);
        let buf = c.buffer();
        c.set_ready(3, Held { buf, dirty: Blocks::default(), full: false });
        assert!(!c.holds(3));
    }

    #[test]
    fn block_sets_count_cover_and_list() {
        let mut b = Blocks::default();
        assert!(b.is_empty() && !b.contains(3));
        b.insert(3, 5);
        b.insert(63, 66);
        b.insert(255, 256);
        assert_eq!(b.iter().collect::<Vec<_>>(), [3, 4, 63, 64, 65, 255]);
        assert_eq!(b.len(), 6);
        assert!(b.covers(63, 66) && !b.covers(2, 4) && b.covers(7, 7));
    }
}
