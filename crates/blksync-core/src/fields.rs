//! Fields of a binary record, written and read in little-endian order: the messages of the
//! remote protocol and the headers and records of delta files share this encoding. Every read
//! is bounds-checked, and a length is checked before anything is allocated for it.

use crate::error::{Error, Result};

/// Builds a frame's body.
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// Starts a frame of `kind`, reserving `capacity` bytes of payload.
    #[must_use]
    pub fn new(kind: u8, capacity: usize) -> Encoder {
        let mut buf = Vec::with_capacity(capacity + 5);
        buf.extend_from_slice(&[0, 0, 0, 0, kind]);
        Encoder { buf }
    }

    /// Appends a u8.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    /// Appends a u16 LE.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u32 LE.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends an i32 LE.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends an i64 LE.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u64 LE.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends each value as a u64 LE.
    pub fn u64s(&mut self, values: &[u64]) -> &mut Self {
        for v in values {
            self.u64(*v);
        }
        self
    }
    /// Appends raw bytes of a fixed, known size.
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }
    /// Appends a length-prefixed byte string.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.buf.extend_from_slice(v);
        self
    }

    /// The finished frame, length prefix included.
    #[must_use]
    pub fn finish(mut self) -> Vec<u8> {
        let body = (self.buf.len() - 4) as u32;
        self.buf[..4].copy_from_slice(&body.to_le_bytes());
        self.buf
    }
}

/// Reads a frame's payload field by field; every read is bounds-checked.
pub struct Decoder<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Decoder<'a> {
    /// Decodes `payload` of message `what` (for error messages).
    #[must_use]
    pub fn new(payload: &'a [u8], what: &'static str) -> Decoder<'a> {
        Decoder { buf: payload, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(Error::protocol(format!("truncated {} message", self.what)));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// Reads a u8.
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    /// Reads a u16 LE.
    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    /// Reads a u32 LE.
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    /// Reads an i32 LE.
    pub fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_le_bytes(self.array()?))
    }
    /// Reads an i64 LE.
    pub fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    /// Reads a u64 LE.
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// Reads `N` raw bytes.
    pub fn fixed<const N: usize>(&mut self) -> Result<[u8; N]> {
        self.array()
    }
    /// Reads a length-prefixed byte string. The length is checked against what is left of the
    /// frame, never trusted for an allocation.
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    /// Fails unless the payload was consumed exactly.
    pub fn end(self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Error::protocol(format!("{} trailing bytes after a {} message", self.buf.len(), self.what)))
        }
    }
}
