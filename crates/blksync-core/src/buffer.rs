//! Page-aligned buffers for every read of image data.
//!
//! Why: a `pread` into user memory is a kernel copy (`_copy_to_iter`), and on the AMD Zen 3
//! machines this project measures on, `rep movsb` runs about five times slower when its
//! destination lies 8 or 16 bytes past a 64-byte boundary. `vec![0; 2 MiB]` is served by `mmap`
//! with the allocator's 16-byte header in front, so every such buffer started a page plus 16
//! bytes in, and whether a buffer was fast depended on the allocator's history (issue 13: the
//! local engine spent 85 % of its CPU in that copy). An [`Aligned`] buffer starts on a page
//! boundary, always.
//!
//! No `unsafe`: the buffer over-allocates one page and hands out the aligned part of it.

use std::ops::{Deref, DerefMut};

/// The alignment every read buffer gets.
pub const ALIGN: usize = 4096;

/// A zeroed byte buffer of a fixed length whose first byte is page-aligned.
pub struct Aligned {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    /// `len` zero bytes, starting on a page boundary.
    #[must_use]
    pub fn new(len: usize) -> Aligned {
        let raw = vec![0u8; len + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN).min(ALIGN);
        Aligned { raw, start, len }
    }

    /// Its length.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Deref for Aligned {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl DerefMut for Aligned {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for Aligned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Aligned({} bytes)", self.len)
    }
}

/// Whether `buf` starts on a page boundary (for the tests that prove every read buffer does).
#[must_use]
pub fn is_aligned(buf: &[u8]) -> bool {
    buf.as_ptr().align_offset(ALIGN) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_of_any_length_start_on_a_page_and_are_zeroed() {
        // Allocations of various sizes, interleaved with others that shift the heap.
        let mut keep = Vec::new();
        for len in [0, 1, 17, 4096, 65_536, 1 << 20, (2 << 20) + 3] {
            keep.push(vec![0u8; 24]);
            let buf = Aligned::new(len);
            assert!(is_aligned(&buf), "{len} bytes");
            assert_eq!(buf.len(), len);
            assert!(buf.iter().all(|&b| b == 0));
        }
    }
}
