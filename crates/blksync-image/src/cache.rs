//! Decompressed chunks held in memory: dirty ones that partial writes go into (each is
//! compressed and written once, when it is evicted or flushed), and clean ones recently read.
//!
//! A chunk that one thread is loading or writing out is [`Slot::Busy`]: every other thread that
//! wants it waits on the image's condition variable, which serialises all I/O on one chunk
//! while different chunks proceed in parallel. The image (`image.rs`) runs that protocol; this
//! module is the bookkeeping: slots, least-recently-used order, and spare buffers.

use std::collections::HashMap;

use blksync_core::buffer::Aligned;

/// One cached chunk.
#[derive(Debug)]
pub enum Slot {
    /// A thread is loading it or writing it out.
    Busy,
    /// Its content.
    Ready {
        /// The whole chunk.
        buf: Aligned,
        /// Holds writes not yet stored in the file.
        dirty: bool,
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

    /// Whether chunk `i` is cached or busy (so that it may hold data the index does not show).
    pub fn holds(&self, i: u64) -> bool {
        self.slots.contains_key(&i)
    }

    /// Marks chunk `i` busy (it must have no slot).
    pub fn set_busy(&mut self, i: u64) {
        let old = self.slots.insert(i, Slot::Busy);
        debug_assert!(old.is_none(), "chunk {i} already had a slot");
    }

    /// Takes the buffer of ready chunk `i`, leaving it busy, with whether it was dirty.
    pub fn take(&mut self, i: u64) -> Option<(Aligned, bool)> {
        match self.slots.insert(i, Slot::Busy) {
            Some(Slot::Ready { buf, dirty, .. }) => Some((buf, dirty)),
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

    /// Makes busy chunk `i` ready with `buf`.
    pub fn set_ready(&mut self, i: u64, buf: Aligned, dirty: bool) {
        self.clock += 1;
        self.slots.insert(i, Slot::Ready { buf, dirty, used: self.clock });
    }

    /// Drops chunk `i`'s slot, keeping its buffer for reuse.
    pub fn remove(&mut self, i: u64) {
        if let Some(Slot::Ready { buf, .. }) = self.slots.remove(&i) {
            self.recycle(buf);
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
                Slot::Ready { used, dirty, .. } => Some((*used, i, *dirty)),
                Slot::Busy => None,
            })
            .min()
            .map(|(_, i, dirty)| (i, dirty))
    }

    /// A dirty ready chunk, lowest first.
    pub fn dirty(&self) -> Option<u64> {
        self.slots.iter().filter(|(_, s)| matches!(s, Slot::Ready { dirty: true, .. })).map(|(&i, _)| i).min()
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
            .filter(|&(&i, s)| (first..=last).contains(&i) && matches!(s, Slot::Ready { dirty: false, .. }))
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
            c.set_ready(i, buf, i == 1);
        }
        assert!(matches!(c.get_mut(0), Some(Slot::Ready { .. })));
        assert_eq!(c.over_capacity(), Some((1, true)), "0 was used since");
        assert_eq!(c.dirty(), Some(1));
        let (buf, dirty) = c.take(1).unwrap();
        assert!(dirty && c.any_busy() && c.take(1).is_none());
        assert_eq!(c.over_capacity(), None, "two ready, one busy");
        c.set_ready(1, buf, false);
        c.drop_clean(0, 1);
        assert!(!c.holds(0) && !c.holds(1) && c.holds(2));
        assert!(c.take(7).is_none() && !c.holds(7));
    }
}
