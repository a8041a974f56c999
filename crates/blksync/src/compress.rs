//! Compression of data frames (`--compress auto|off|LEVEL`).
//!
//! Auto uses zstd level 1 and sends a block raw when compression saves less than an eighth. On
//! incompressible data (encrypted volumes, media, already compressed images) trying costs CPU
//! that a fast link cannot spare, so after 8 misses in a row a compressor stops trying for the
//! next 64 blocks, then samples again.

use crate::error::{Error, Result};
use crate::protocol::MAX_DATA;
use crate::protocol::message::{Chunk, codec};

/// `compress` value meaning "never".
pub const OFF: i32 = -1000;
/// `compress` value meaning "auto".
pub const AUTO: i32 = 0;

/// A per-thread compressor.
pub struct Compressor {
    level: i32,
    misses: u32,
    skip: u32,
    ctx: Option<zstd::bulk::Compressor<'static>>,
}

impl Compressor {
    /// A compressor for a `compress` setting ([`OFF`], [`AUTO`] or a zstd level).
    #[must_use]
    pub fn new(setting: i32) -> Compressor {
        let level = if setting == AUTO { 1 } else { setting };
        let ctx = if setting == OFF { None } else { zstd::bulk::Compressor::new(level).ok() };
        Compressor { level, misses: 0, skip: 0, ctx }
    }

    /// `data` at `offset`, compressed when that pays.
    pub fn encode(&mut self, offset: u64, data: &[u8]) -> Chunk {
        let raw = |data: &[u8]| Chunk { offset, codec: codec::RAW, raw_len: data.len() as u32, payload: data.to_vec() };
        let Some(ctx) = self.ctx.as_mut() else { return raw(data) };
        if self.skip > 0 {
            self.skip -= 1;
            return raw(data);
        }
        match ctx.compress(data) {
            Ok(packed) if packed.len() < data.len() - data.len() / 8 => {
                self.misses = 0;
                Chunk { offset, codec: codec::ZSTD, raw_len: data.len() as u32, payload: packed }
            }
            _ => {
                self.misses += 1;
                if self.misses >= 8 && self.level <= 3 {
                    self.misses = 0;
                    self.skip = 64;
                }
                raw(data)
            }
        }
    }
}

/// The bytes of a data chunk, decompressed and checked against its announced length.
pub fn decode(chunk: &Chunk) -> Result<std::borrow::Cow<'_, [u8]>> {
    match chunk.codec {
        codec::RAW => Ok(std::borrow::Cow::Borrowed(&chunk.payload)),
        codec::ZSTD => {
            let want = chunk.raw_len as usize;
            if want > MAX_DATA {
                return Err(Error::protocol(format!("data frame announces {want} bytes")));
            }
            let out = zstd::bulk::decompress(&chunk.payload, want).map_err(|e| {
                Error::protocol(format!("corrupt compressed data at byte offset {}: {e}", chunk.offset))
            })?;
            if out.len() != want {
                return Err(Error::protocol(format!(
                    "compressed data at byte offset {} holds {} bytes, not {want}",
                    chunk.offset,
                    out.len()
                )));
            }
            Ok(std::borrow::Cow::Owned(out))
        }
        c => Err(Error::protocol(format!("unknown codec {c}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressible_data_shrinks_and_round_trips() {
        let data = b"blksync ".repeat(8192);
        let mut c = Compressor::new(AUTO);
        let chunk = c.encode(42, &data);
        assert_eq!(chunk.codec, codec::ZSTD);
        assert!(chunk.payload.len() < data.len() / 10);
        assert_eq!(&*decode(&chunk).unwrap(), &data[..]);
    }

    #[test]
    fn incompressible_data_goes_raw_and_auto_backs_off() {
        let mut x = 1u64;
        let data: Vec<u8> = (0..65536)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                (x >> 56) as u8
            })
            .collect();
        let mut c = Compressor::new(AUTO);
        for _ in 0..8 {
            assert_eq!(c.encode(0, &data).codec, codec::RAW);
        }
        assert_eq!(c.skip, 64);
        assert_eq!(Compressor::new(OFF).encode(0, b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa").codec, codec::RAW);
    }

    #[test]
    fn corrupt_or_lying_frames_are_errors() {
        let mut c = Compressor::new(AUTO);
        let mut chunk = c.encode(0, &[7u8; 10000]);
        chunk.raw_len = 9999;
        assert!(decode(&chunk).is_err());
        chunk.raw_len = 10000;
        chunk.payload[5] ^= 0xFF;
        assert!(decode(&chunk).is_err() || decode(&chunk).unwrap().len() == 10000);
        let huge = Chunk { offset: 0, codec: codec::ZSTD, raw_len: u32::MAX, payload: vec![] };
        assert!(decode(&huge).is_err());
    }
}
