//! A copy-on-write overlay over a read-only source: `serve --writable` on a backup point.
//!
//! Clients of a served point (a VM booted from last Tuesday's backup, an `fsck`) want to write,
//! and the chain must never change. Writes go to an overlay file instead, which is unlinked as
//! soon as it is made (nothing is left behind, whatever ends the server), and a map of the
//! written ranges says where a read takes the overlay's bytes instead of the point's. When the
//! server stops, [`Overlay::save`] can keep what was written as a delta against the point
//! (`--save-overlay FILE`), which `blksync apply` lays on a restore of that point.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::delta::Header;
use crate::endpoint::{Caps, Identity, Segment, Source, Target};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::extent::Extent;

/// The piece size in which saved ranges are copied into the delta.
const PIECE: u64 = 1 << 20;

/// A read-only `base` with the writes it was given kept in an unlinked file.
pub struct Overlay {
    base: Arc<dyn Source>,
    name: PathBuf,
    file: File,
    /// The written ranges, merged: start → end.
    written: Mutex<BTreeMap<u64, u64>>,
}

impl Overlay {
    /// An overlay over `base`, its file made in `dir` and unlinked at once.
    pub fn new(base: Arc<dyn Source>, dir: &Path) -> Result<Overlay> {
        let id: [u8; 4] = crate::id::random()?;
        let path = dir.join(format!(".blksync-overlay-{:02x}{:02x}{:02x}{:02x}", id[0], id[1], id[2], id[3]));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .on("creating the overlay", &path)?;
        std::fs::remove_file(&path).on("unlinking the overlay", &path)?;
        file.set_len(base.size()).on("sizing the overlay", &path)?;
        let name = base.name().to_path_buf();
        Ok(Overlay { base, name, file, written: Mutex::new(BTreeMap::new()) })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, u64>> {
        self.written.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The written ranges that meet `[start, end)`, clipped to it, ascending.
    fn written_in(&self, start: u64, end: u64) -> Vec<Extent> {
        let map = self.map();
        let first = map.range(..=start).next_back().map_or(start, |(&s, _)| s);
        map.range(first..end)
            .filter(|&(_, &e)| e > start)
            .map(|(&s, &e)| Extent { offset: s.max(start), len: e.min(end) - s.max(start) })
            .collect()
    }

    /// Notes `[start, end)` as written, merging it with what it touches.
    fn note(&self, start: u64, end: u64) {
        let mut map = self.map();
        let (mut s, mut e) = (start, end);
        let touching: Vec<(u64, u64)> =
            map.range(..=end).rev().take_while(|&(_, &re)| re >= start).map(|(&rs, &re)| (rs, re)).collect();
        for (rs, re) in touching {
            map.remove(&rs);
            s = s.min(rs);
            e = e.max(re);
        }
        map.insert(s, e);
    }

    /// Bytes written so far.
    #[must_use]
    pub fn written_bytes(&self) -> u64 {
        self.map().iter().map(|(s, e)| e - s).sum()
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(Error::new(
                ErrorKind::Usage,
                format!("{}: a write at offset {offset} runs past the end of the point", self.name.display()),
            ));
        }
        Ok(())
    }

    /// Writes what was written as a delta at `path`, against the point (`header` gives its
    /// parent, source and comment). Nothing written makes an empty delta all the same: the
    /// user asked for a file.
    pub fn save(&self, path: &Path, header: Header) -> Result<u64> {
        let recorder = crate::record::Recorder::new(Arc::clone(&self.base), path.to_path_buf(), header, false);
        let ranges: Vec<(u64, u64)> = self.map().iter().map(|(&s, &e)| (s, e)).collect();
        let mut buf = crate::buffer::Aligned::new(PIECE as usize);
        for (start, end) in ranges {
            let mut pos = start;
            while pos < end {
                let n = (end - pos).min(PIECE) as usize;
                self.file.read_exact_at(&mut buf[..n], pos).at("reading the overlay of", &self.name, pos)?;
                recorder.write_at(&buf[..n], pos)?;
                pos += n as u64;
            }
        }
        recorder.flush()?;
        Ok(self.written_bytes())
    }
}

impl Source for Overlay {
    fn name(&self) -> &Path {
        &self.name
    }
    fn caps(&self) -> Caps {
        Caps { resizable: false, stable: false, changed_blocks: false, ..self.base.caps() }
    }
    fn size(&self) -> u64 {
        self.base.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        self.base.read_at(buf, offset)?;
        for w in self.written_in(offset, end) {
            let at = (w.offset - offset) as usize;
            self.file.read_exact_at(&mut buf[at..at + w.len as usize], w.offset).at(
                "reading the overlay of",
                &self.name,
                w.offset,
            )?;
        }
        Ok(())
    }
    fn segment_at(&self, offset: u64) -> Result<Segment> {
        let size = self.size();
        let holding = self.map().range(..=offset).next_back().map(|(_, &e)| e).filter(|&e| e > offset);
        if let Some(end) = holding {
            return Ok(Segment { start: offset, end: end.min(size), allocated: true });
        }
        let base = self.base.segment_at(offset)?;
        // Up to the next written range, which reads as data.
        let next = self.map().range(offset..).next().map_or(size, |(&s, _)| s);
        Ok(Segment { end: base.end.min(next).max(offset + 1), ..base })
    }
    fn drop_cache(&self, _offset: u64, _len: u64) {}
    fn identity(&self) -> Identity {
        Identity::None
    }
}

impl Target for Overlay {
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset).at("writing the overlay of", &self.name, offset)?;
        self.note(offset, offset + buf.len() as u64);
        Ok(())
    }
    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        // A hole in the overlay reads as zeros, and the map says to read it.
        rustix::fs::fallocate(
            &self.file,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .map_err(std::io::Error::from)
        .at("zeroing the overlay of", &self.name, offset)?;
        self.note(offset, offset + len);
        Ok(())
    }
    fn set_size(&self, _size: u64) -> Result<()> {
        Err(Error::new(ErrorKind::Unsupported, format!("{}: a served point keeps its size", self.name.display())))
    }
    fn flush(&self) -> Result<()> {
        // The overlay is thrown away or saved at the end; a client's flush has nothing to make
        // durable beyond this process.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::memory::Memory;

    fn overlay(base: &[u8]) -> (Overlay, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let mem = Memory::new("point", base.len() as u64);
        mem.write_at(base, 0).unwrap();
        (Overlay::new(Arc::new(mem), dir.path()).unwrap(), dir)
    }

    fn read(o: &Overlay) -> Vec<u8> {
        let mut buf = vec![0; o.size() as usize];
        o.read_at(&mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn reads_see_the_writes_over_the_base_and_the_base_is_untouched() {
        let base: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        let (o, dir) = overlay(&base);
        let mut model = base.clone();
        let mut x = 7u64;
        for _ in 0..200 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let at = (x >> 33) as usize % base.len();
            let len = ((x >> 13) as usize % 3000 + 1).min(base.len() - at);
            if x.is_multiple_of(5) {
                o.zero(at as u64, len as u64).unwrap();
                model[at..at + len].fill(0);
            } else {
                let data = vec![(x >> 7) as u8; len];
                o.write_at(&data, at as u64).unwrap();
                model[at..at + len].copy_from_slice(&data);
            }
            // Partial reads too.
            let mut part = vec![0; 1000.min(base.len() - at)];
            o.read_at(&mut part, at as u64).unwrap();
            assert!(part == model[at..at + part.len()]);
        }
        assert!(read(&o) == model);
        assert!(o.written_bytes() <= base.len() as u64);
        // Segments tile the image and agree with the writes.
        let mut pos = 0;
        while pos < o.size() {
            let s = o.segment_at(pos).unwrap();
            assert!(s.start == pos && s.end > pos && s.end <= o.size());
            pos = s.end;
        }
        // Nothing of the overlay is left in its directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(o.write_at(&[1], o.size()).is_err(), "a write past the end is refused");
    }

    #[test]
    fn the_map_merges_touching_ranges() {
        let (o, _dir) = overlay(&[0; 10_000]);
        o.note(100, 200);
        o.note(300, 400);
        o.note(200, 300);
        assert_eq!(o.map().iter().map(|(&s, &e)| (s, e)).collect::<Vec<_>>(), vec![(100, 400)]);
        o.note(50, 120);
        o.note(390, 500);
        assert_eq!(o.map().iter().map(|(&s, &e)| (s, e)).collect::<Vec<_>>(), vec![(50, 500)]);
        assert_eq!(o.written_in(0, 60), vec![Extent { offset: 50, len: 10 }]);
        assert_eq!(o.written_in(450, 1000), vec![Extent { offset: 450, len: 50 }]);
    }
}
