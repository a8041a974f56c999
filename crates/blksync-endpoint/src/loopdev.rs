//! `loop://FILE` and `loop://DEVICE`: an image used through a loop device (from bsync).
//!
//! `loop://FILE` attaches FILE to a free loop device (read-only for a source) with `losetup`,
//! and the endpoint is that block device: `O_EXCL`, the device's zeroing and discard, and a fixed
//! size, as for any device. It is what a user wants when the image must be seen as a disk, by
//! blksync as by the kernel (a test of what the device layer does, or a file whose size must not
//! change). `loop://DEVICE` is the loop device itself.
//!
//! The device is detached on every exit path: when the endpoint is dropped (success, error,
//! Ctrl-C and SIGTERM all unwind to there). A run killed with SIGKILL cannot detach; so each
//! attach is recorded in the state directory (`/run/blksync/loop-NAME`: our PID and the backing
//! file), and the next run detaches a device whose recorded PID is gone and whose backing file
//! is still the recorded one. A loop device blksync did not attach is never touched.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, ErrorKind, IoContext, Result};

/// A loop device this run attached; detached when dropped.
#[derive(Debug)]
pub struct Attached {
    device: PathBuf,
    state: PathBuf,
}

impl Attached {
    /// The device node (`/dev/loopN`).
    #[must_use]
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// Detaches the device now, reporting a failure (with what to run by hand).
    pub fn detach(self) -> Result<()> {
        let result = detach(&self.device);
        let _ = std::fs::remove_file(&self.state);
        std::mem::forget(self);
        result
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Err(e) = detach(&self.device) {
            // Drop cannot return it; say it where the user (or the client, for an agent) sees.
            crate::endpoint::report_cleanup_failure(&e);
        }
        let _ = std::fs::remove_file(&self.state);
    }
}

/// The directory that records what this host's blksync runs attached.
fn state_dir() -> PathBuf {
    let run = Path::new("/run/blksync");
    if std::fs::create_dir_all(run).is_ok() {
        return run.to_path_buf();
    }
    std::env::var_os("XDG_RUNTIME_DIR").map_or_else(
        || std::env::temp_dir().join(format!("blksync-{}", rustix::process::getuid().as_raw())),
        |d| PathBuf::from(d).join("blksync"),
    )
}

fn losetup(args: &[&std::ffi::OsStr]) -> Result<String> {
    let out = Command::new("losetup").args(args).output().map_err(|e| {
        Error::new(ErrorKind::Io, format!("running losetup (package mount/util-linux) for a loop:// address: {e}"))
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let kind = if err.contains("ermission") { ErrorKind::PermissionDenied } else { ErrorKind::Io };
        return Err(Error::new(kind, format!("losetup {}: {err}", join(args))));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn join(args: &[&std::ffi::OsStr]) -> String {
    args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

fn detach(device: &Path) -> Result<()> {
    losetup(&["-d".as_ref(), device.as_os_str()]).map(|_| ()).map_err(|e| {
        Error::new(
            e.kind(),
            format!("could not detach {} ({e}); detach it by hand: losetup -d {}", device.display(), device.display()),
        )
    })
}

/// Attaches `file` to a free loop device, read-only when `read_only`.
pub fn attach(file: &Path, read_only: bool) -> Result<Attached> {
    sweep();
    let meta = std::fs::metadata(file).on("opening", file)?;
    if !meta.is_file() {
        return Err(Error::usage(format!("loop://{}: not a regular file to attach", file.display())));
    }
    let file = std::fs::canonicalize(file).on("resolving", file)?;
    let mut args: Vec<&std::ffi::OsStr> = vec!["--find".as_ref(), "--show".as_ref()];
    if read_only {
        args.push("--read-only".as_ref());
    }
    args.push(file.as_os_str());
    let device = PathBuf::from(losetup(&args)?);
    let name = device.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = state_dir();
    let _ = std::fs::create_dir_all(&dir);
    let state = dir.join(format!("loop-{name}"));
    let record = format!("{}\n{}\n", std::process::id(), file.display());
    let attached = Attached { device, state };
    std::fs::write(&attached.state, record).on("recording", &attached.state)?;
    Ok(attached)
}

/// Detaches loop devices that a killed run attached: the recorded PID is gone, and the device
/// still has the recorded backing file. Anything else is left alone.
pub fn sweep() {
    let Ok(entries) = std::fs::read_dir(state_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(dev) = name.strip_prefix("loop-") else { continue };
        let Ok(text) = std::fs::read_to_string(e.path()) else { continue };
        let mut lines = text.lines();
        let (Some(pid), Some(backing)) = (lines.next().and_then(|p| p.parse::<u32>().ok()), lines.next()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let current = std::fs::read_to_string(format!("/sys/block/{dev}/loop/backing_file")).unwrap_or_default();
        if current.trim() == backing {
            let _ = detach(&Path::new("/dev").join(dev));
        }
        let _ = std::fs::remove_file(e.path());
    }
}

/// Whether `path` is a loop device node (`loop://DEVICE`).
#[must_use]
pub fn is_loop_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("loop"))
        && std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}
