//! Frames: `u32 LE length | u8 type | payload`, with the length checked before anything is
//! allocated.

use std::io::{self, Read, Write};

use crate::error::{Error, Result};
use crate::protocol::MAX_FRAME;

pub use blksync_core::fields::{Decoder, Encoder};

/// Reads one frame body into `buf` (reused between calls) and returns its type; the payload is
/// `buf[1..]` (not shifted down: that would copy every data frame once more). `Ok(None)` means
/// the stream ended cleanly between frames.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Option<u8>> {
    let mut len = [0u8; 4];
    match read_full(r, &mut len)? {
        0 => return Ok(None),
        4 => {}
        _ => {
            return Err(Error::protocol("connection closed in the middle of a frame header"));
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(Error::protocol(format!("frame length {len} is outside 1..={MAX_FRAME}")));
    }
    buf.clear();
    buf.resize(len, 0);
    if read_full(r, buf)? != len {
        return Err(Error::protocol("connection closed in the middle of a frame"));
    }
    Ok(Some(buf[0]))
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::new(crate::ErrorKind::Connection, format!("reading from the connection: {e}")));
            }
        }
    }
    Ok(n)
}

/// Writes a finished frame.
pub fn write_frame(w: &mut impl Write, frame: &[u8]) -> Result<()> {
    w.write_all(frame).map_err(|e| Error::new(crate::ErrorKind::Connection, format!("writing to the connection: {e}")))
}
