//! Temporary files that become a file by rename: deltas, undo logs, base images, content hashes,
//! uploads.
//!
//! A temporary file is created beside its final name (a rename never crosses filesystems) as
//! `NAME.tmp-PID-RANDOM`, with `O_CREAT|O_EXCL|O_NOFOLLOW`: a name planted in advance, a symlink
//! to a victim file included, makes the creation fail instead of writing through it, and the
//! random part means nobody can plant it at the right moment anyway. Leftovers of a killed run
//! (its PID no longer running) are removed the next time a temporary file for the same NAME is
//! made, so a kill -9 or a full disk does not leave a 24 MiB `.tmp` behind for ever.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Creates a new temporary file for `path` with permissions `mode`. Returns it and its path.
pub fn create(path: &Path, mode: u32) -> Result<(File, PathBuf)> {
    let name = path.file_name().ok_or_else(|| Error::usage(format!("{} is not a file name", path.display())))?;
    sweep(path);
    let mut random = [0u8; 6];
    fill_random(&mut random)?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".tmp-{}-{}", std::process::id(), hex(&random)));
    let tmp = path.with_file_name(tmp_name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(&tmp)
        .on("creating", &tmp)?;
    Ok((file, tmp))
}

/// Renames a complete, flushed temporary file to `path` and flushes the directory, so the name
/// survives a crash.
pub fn commit(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path).on("renaming into place", path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).on("flushing directory", dir)
}

/// Removes `NAME.tmp-PID-…` files beside `path` whose PID is no longer running.
pub fn sweep(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let prefix = format!("{}.tmp-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let file = e.file_name();
        let file = file.to_string_lossy();
        let Some(rest) = file.strip_prefix(&prefix) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else { continue };
        if !running(pid) && e.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Whether a process with this PID exists on this host.
fn running(pid: i32) -> bool {
    if pid <= 0 {
        return true;
    }
    // Without /proc we cannot tell, and a file that might be in use is never removed.
    !Path::new("/proc/self").exists() || Path::new(&format!("/proc/{pid}")).exists()
}

/// Fills `buf` from the kernel's random source.
pub fn fill_random(buf: &mut [u8]) -> Result<()> {
    use std::io::Read;
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(|e| Error::new(crate::ErrorKind::Io, format!("reading /dev/urandom: {e}")))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_planted_symlink_at_a_temporary_name_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let (file, tmp) = create(&dir.path().join("out.delta"), 0o600).unwrap();
        drop(file);
        std::fs::remove_file(&tmp).unwrap();
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        // The same name again (as if guessed) fails instead of following the link.
        let again = OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).open(&tmp);
        assert!(again.is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn leftovers_of_dead_processes_are_swept_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.delta");
        let dead = dir.path().join("x.delta.tmp-999999999-abcdef");
        let live = dir.path().join(format!("x.delta.tmp-{}-abcdef", std::process::id()));
        let other = dir.path().join("y.delta.tmp-999999999-abcdef");
        for p in [&dead, &live, &other] {
            std::fs::write(p, b"x").unwrap();
        }
        sweep(&path);
        assert!(!dead.exists() && live.exists() && other.exists());
    }
}
