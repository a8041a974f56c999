//! This executable as the agent an upload would send: its size, its POSIX `cksum` (which the
//! bootstrap checks a cached agent against) and its BLAKE3 (the build id and the agent's `Hello`
//! check).
//!
//! Reading and hashing 5 MB on every connection costs time and memory for nothing: the values
//! depend only on the file. They are kept in the user's cache (`blksync/executable`) under the
//! file's identity (device, inode, size, modification and change time), so a new build, or the
//! same path replaced, is hashed once and every other connection reads one short line. The bytes
//! themselves are read only for an upload, and checked against the remembered hash then.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};

/// What the bootstrap and the handshake need of this executable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Executable {
    /// Where it is.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Its POSIX `cksum` CRC.
    pub cksum: u32,
    /// Its BLAKE3.
    pub blake3: [u8; 32],
}

impl Executable {
    /// The running executable, from the cache when it was seen before.
    pub fn current() -> Result<Executable> {
        let path = std::env::current_exe()
            .map_err(|e| Error::new(ErrorKind::Io, format!("finding our own executable: {e}")))?;
        Executable::at(&path, memo_path().as_deref())
    }

    /// The executable at `path`, remembered in `memo` (none: always computed).
    pub fn at(path: &Path, memo: Option<&Path>) -> Result<Executable> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io("inspecting", path, None, e))?;
        let key = format!(
            "{} {} {} {}.{} {}.{}",
            meta.dev(),
            meta.ino(),
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec()
        );
        if let Some(found) = memo.and_then(|m| recall(m, &key, path, meta.len())) {
            return Ok(found);
        }
        let found = Executable::of_bytes(path, &std::fs::read(path).map_err(|e| Error::io("reading", path, None, e))?);
        if let Some(memo) = memo {
            remember(memo, &key, &found);
        }
        Ok(found)
    }

    fn of_bytes(path: &Path, bytes: &[u8]) -> Executable {
        Executable {
            path: path.to_path_buf(),
            size: bytes.len() as u64,
            cksum: super::posix_cksum(bytes),
            blake3: *blake3::hash(bytes).as_bytes(),
        }
    }

    /// The bytes to upload, checked to be the ones described (the file may have been replaced
    /// since: then the upload would not match what the bootstrap was told).
    pub fn bytes(&self) -> Result<Vec<u8>> {
        let bytes = std::fs::read(&self.path).map_err(|e| Error::io("reading", &self.path, None, e))?;
        if Executable::of_bytes(&self.path, &bytes) != *self {
            if let Some(memo) = memo_path() {
                let _ = std::fs::remove_file(memo);
            }
            return Err(Error::new(
                ErrorKind::Io,
                format!("{} changed while blksync ran (a new build?); run it again", self.path.display()),
            ));
        }
        Ok(bytes)
    }

    /// The build id: the version and the start of the BLAKE3, which names the upload cache entry.
    #[must_use]
    pub fn build(&self) -> String {
        format!("{}-{}", env!("CARGO_PKG_VERSION"), &blake3::Hash::from(self.blake3).to_hex()[..12])
    }
}

/// `$XDG_CACHE_HOME/blksync/executable` (or `~/.cache/…`), where the values are remembered.
fn memo_path() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(cache.join("blksync").join("executable"))
}

/// The remembered values, when `memo` holds them for `key`: `KEY\tSIZE CKSUM BLAKE3HEX`.
fn recall(memo: &Path, key: &str, path: &Path, size: u64) -> Option<Executable> {
    let text = std::fs::read_to_string(memo).ok()?;
    let (found_key, values) = text.trim_end().split_once('\t')?;
    if found_key != key {
        return None;
    }
    let mut words = values.split(' ');
    let found_size: u64 = words.next()?.parse().ok()?;
    let cksum: u32 = words.next()?.parse().ok()?;
    let hex = words.next()?;
    let mut blake3 = [0u8; 32];
    if found_size != size || hex.len() != 64 || words.next().is_some() {
        return None;
    }
    for (i, byte) in blake3.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(Executable { path: path.to_path_buf(), size, cksum, blake3 })
}

/// Remembers `found` for `key`, atomically (a reader sees the old line or the new one), through a
/// temporary file that nothing planted can redirect. A cache that cannot be written costs only
/// the hashing next time.
fn remember(memo: &Path, key: &str, found: &Executable) {
    let Some(dir) = memo.parent() else { return };
    let _ = std::fs::create_dir_all(dir);
    let line = format!("{key}\t{} {} {}\n", found.size, found.cksum, blake3::Hash::from(found.blake3).to_hex());
    let Ok((mut file, tmp)) = crate::temp::create(memo, 0o600) else { return };
    if std::io::Write::write_all(&mut file, line.as_bytes()).is_err() || crate::temp::commit(&tmp, memo).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first look computes and remembers; the next reads the memo (a memo doctored on
    /// purpose shows it was used); a changed file is computed again; garbage in the memo is
    /// ignored; and the upload's bytes are checked against what was remembered.
    #[test]
    fn values_are_remembered_per_file_identity_and_checked_before_an_upload() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("blksync");
        let memo = dir.path().join("cache/executable");
        std::fs::write(&exe, b"first build").unwrap();
        let first = Executable::at(&exe, Some(&memo)).unwrap();
        assert_eq!(first, Executable::of_bytes(&exe, b"first build"));
        assert!(first.build().starts_with(env!("CARGO_PKG_VERSION")));
        let text = std::fs::read_to_string(&memo).unwrap();
        let doctored = text.replace(&format!(" {} ", first.cksum), " 7 ");
        std::fs::write(&memo, &doctored).unwrap();
        assert_eq!(Executable::at(&exe, Some(&memo)).unwrap().cksum, 7, "the memo was used, not the file");
        assert!(Executable { cksum: 7, ..first.clone() }.bytes().is_err(), "an upload checks the bytes");
        assert_eq!(first.bytes().unwrap(), b"first build");

        std::fs::write(&exe, b"second build, longer").unwrap();
        let second = Executable::at(&exe, Some(&memo)).unwrap();
        assert_eq!(second, Executable::of_bytes(&exe, b"second build, longer"));
        for garbage in ["", "x", "a\tb c d", "\t\t\t"] {
            std::fs::write(&memo, garbage).unwrap();
            assert_eq!(Executable::at(&exe, Some(&memo)).unwrap(), second);
        }
    }
}
