//! A file as a `Source` and `Target`, for tests only (`blksync-endpoint`, the real one, depends on
//! this crate): positioned reads and writes, zeros written, everything allocated.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use blksync_core::endpoint::{Identity, Segment, Source, Target};
use blksync_core::{Error, Result};

pub struct FileImage {
    path: PathBuf,
    file: File,
    size: u64,
}

impl FileImage {
    pub fn open(path: &Path, writable: bool) -> FileImage {
        let file = OpenOptions::new().read(true).write(writable).open(path).unwrap();
        let size = file.metadata().unwrap().len();
        FileImage { path: path.to_path_buf(), file, size }
    }
}

impl Source for FileImage {
    fn name(&self) -> &Path {
        &self.path
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| Error::io("reading", &self.path, Some(offset), e))
    }
    fn segment_at(&self, offset: u64) -> Result<Segment> {
        Ok(Segment { start: offset, end: self.size, allocated: true })
    }
    fn drop_cache(&self, _: u64, _: u64) {}
    fn identity(&self) -> Identity {
        Identity::None
    }
}

impl Target for FileImage {
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(buf, offset).map_err(|e| Error::io("writing", &self.path, Some(offset), e))
    }
    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0; len.min(1 << 20) as usize];
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], offset + pos)?;
            pos += n as u64;
        }
        Ok(())
    }
    fn set_size(&self, _: u64) -> Result<()> {
        Err(Error::new(blksync_core::ErrorKind::Unsupported, "fixed size"))
    }
    fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io("flushing", &self.path, None, e))
    }
}
