//! One chunk's payload: choosing how to store it (zero, raw or one zstd frame), compressing it,
//! decompressing it and checking its content (docs/COMPRESSED-IMAGE.md, "Index").
//!
//! zstd contexts and the compression buffer are per thread and reused: a level-3 context holds a
//! few MiB of tables, and making one per chunk would cost more than compressing it.

use std::cell::RefCell;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::header::UNIT;
use crate::index::Kind;

/// The checksum of chunk `chunk`'s content.
#[must_use]
pub fn checksum(content: &[u8], chunk: u64) -> u64 {
    xxh3_64_with_seed(content, chunk)
}

/// The checksum of chunk `chunk`'s patch record content: seeded apart from every chunk's (chunk
/// numbers are below 2^32).
#[must_use]
pub fn record_checksum(content: &[u8], chunk: u64) -> u64 {
    xxh3_64_with_seed(content, (1 << 63) | chunk)
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    static OUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static RECORD: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Calls `f` with this thread's record buffer of `len` bytes (for a patch record's content; at
/// most half a chunk and its block numbers).
pub fn with_record<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    RECORD.with_borrow_mut(|record| {
        if record.len() < len {
            record.resize(len, 0);
        }
        f(&mut record[..len])
    })
}

/// Calls `f` with this thread's scratch buffer of `len` bytes (for a payload read from the file).
pub fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with_borrow_mut(|scratch| {
        if scratch.len() < len {
            scratch.resize(len, 0);
        }
        f(&mut scratch[..len])
    })
}

/// Chooses how to store `content` (a whole chunk) at zstd `level` and calls `store` with the
/// kind and payload: an all-zero chunk has none; a chunk whose frame would not save at least one
/// allocation unit is stored raw.
pub fn encode<R>(content: &[u8], level: i32, store: impl FnOnce(Kind, &[u8]) -> R) -> std::io::Result<R> {
    if blksync_core::zero::is_zero(content) {
        return Ok(store(Kind::Zero, &[]));
    }
    // A frame must end at least one unit before a raw chunk would.
    compress(content, level, content.len().saturating_sub(UNIT as usize), store)
}

/// Calls `store` with `content` as one zstd frame when it takes at most `limit` bytes, else
/// raw (a patch record, which is never a zero payload, or a chunk).
pub fn compress<R>(
    content: &[u8],
    level: i32,
    limit: usize,
    store: impl FnOnce(Kind, &[u8]) -> R,
) -> std::io::Result<R> {
    // Capacity for `limit` and no more, so that incompressible content fails fast instead of
    // being compressed in full.
    OUT.with_borrow_mut(|out| {
        out.clear();
        out.reserve(limit);
        let compressed = COMPRESSOR.with_borrow_mut(|slot| -> std::io::Result<bool> {
            if slot.as_ref().is_none_or(|(l, _)| *l != level) {
                *slot = Some((level, zstd::bulk::Compressor::new(level)?));
            }
            let (_, compressor) = slot.as_mut().expect("set above");
            // Writes at most `out.capacity()` bytes: an error here is "does not fit".
            Ok(limit > 0 && compressor.compress_to_buffer(content, &mut *out).is_ok() && out.len() <= limit)
        })?;
        Ok(if compressed { store(Kind::Zstd, out) } else { store(Kind::Raw, content) })
    })
}

/// Decompresses one zstd frame `payload` into `dst`, which it must fill exactly.
pub fn decompress(payload: &[u8], dst: &mut [u8]) -> Result<(), String> {
    DECOMPRESSOR.with_borrow_mut(|slot| {
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
        }
        let decompressor = slot.as_mut().expect("set above");
        match decompressor.decompress_to_buffer(payload, dst) {
            Ok(n) if n == dst.len() => Ok(()),
            Ok(n) => Err(format!("the zstd frame holds {n} bytes instead of {}", dst.len())),
            Err(e) => Err(format!("the zstd frame does not decode ({e})")),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(content: &[u8], level: i32) -> (Kind, Vec<u8>) {
        encode(content, level, |kind, payload| (kind, payload.to_vec())).unwrap()
    }

    #[test]
    fn zeros_compressible_and_random_chunks_are_stored_as_zero_zstd_and_raw() {
        let chunk = 1 << 16;
        assert_eq!(stored(&vec![0; chunk], 3), (Kind::Zero, vec![]));
        let text: Vec<u8> = (0..chunk).map(|i| b"blksync "[i % 8]).collect();
        let (kind, payload) = stored(&text, 3);
        assert_eq!(kind, Kind::Zstd);
        assert!(payload.len() < 1000);
        let mut back = vec![0; chunk];
        decompress(&payload, &mut back).unwrap();
        assert_eq!(back, text);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..chunk)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(stored(&noise, 3), (Kind::Raw, noise.clone()));
        for level in [-7, -1, 1, 19] {
            let (kind, payload) = stored(&text, level);
            assert_eq!(kind, Kind::Zstd, "level {level}");
            decompress(&payload, &mut back).unwrap();
            assert_eq!(back, text);
        }
    }

    #[test]
    fn a_frame_of_the_wrong_length_or_garbage_is_refused() {
        let content = vec![7u8; 8192];
        let (_, payload) = stored(&content, 3);
        assert!(decompress(&payload, &mut [0; 8191]).is_err());
        assert!(decompress(&payload, &mut vec![0; 8193]).unwrap_err().contains("8192 bytes"));
        assert!(decompress(&payload[..payload.len() - 1], &mut [0; 8192]).is_err());
        assert!(decompress(b"not zstd", &mut [0; 8192]).is_err());
    }
}
