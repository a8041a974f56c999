//! Local regular files and block devices.
//!
//! Regular files: holes are found with `SEEK_DATA`/`SEEK_HOLE` and made with
//! `fallocate(PUNCH_HOLE)`; where the filesystem cannot punch (some NFS, FUSE, older tmpfs),
//! zeros are written instead, detected once and remembered.
//!
//! Block devices: the size comes from `lseek(SEEK_END)` (`metadata().len()` is 0 for a device).
//! Zeroing uses `fallocate` on the device, which the kernel turns into `blkdev_issue_zeroout`:
//! `ZERO_RANGE` writes zeros or uses the device's write-zeroes offload, never leaving stale data;
//! `PUNCH_HOLE|KEEP_SIZE` (with `--discard`) unmaps *only* where the device guarantees that
//! unmapped blocks read back as zeros, and fails otherwise. That is the guarantee `BLKDISCARD`
//! lacks, so we never issue a plain discard. A destination device is opened with `O_EXCL`, which
//! the kernel refuses while the device is mounted or claimed (by LVM, md, swap, another
//! `O_EXCL` opener).

use std::fs::{File, OpenOptions};
use std::io;
use std::num::NonZeroU64;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rustix::fs::{Advice, FallocateFlags, SeekFrom};

use crate::endpoint::{Identity, Segment, Source, Target};

/// What a path turned out to be: it decides how sizes, holes and zeros are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A regular file: can be resized and can hold holes.
    File,
    /// A block device: fixed size, zeroed by the device, never truncated.
    BlockDevice,
    /// A destination that does not exist yet (seen only in a dry run): reads as empty.
    Absent,
}
use crate::error::{Error, ErrorKind, Hint, IoContext, Result};

/// What an address names (see [`blksync_core::location`] for the forms).
enum Address {
    /// A path: a regular file or a block device.
    Path,
    /// `loop://FILE` or `loop://DEVICE`.
    Loop(PathBuf),
    /// `lvm://VG/LV`.
    Lvm(crate::lvm::Volume),
    /// `lvm+snapshot://VG/LV`.
    LvmSnapshot(crate::lvm::Volume),
}

impl Address {
    fn of(address: &Path) -> Result<Address> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = address.as_os_str().as_bytes();
        let Some(scheme) = crate::location::scheme_of(bytes) else { return Ok(Address::Path) };
        let rest = Path::new(std::ffi::OsStr::from_bytes(&bytes[scheme.len() + 3..]));
        match scheme {
            "loop" if !rest.as_os_str().is_empty() => Ok(Address::Loop(rest.to_path_buf())),
            "loop" => Err(Error::usage(format!("{}: expected loop://FILE or loop://DEVICE", address.display()))),
            "lvm" | "lvm+snapshot" => {
                let text = rest.to_str().ok_or_else(|| Error::usage(format!("{}: not UTF-8", address.display())))?;
                let volume = crate::lvm::Volume::parse(text, address)?;
                Ok(if scheme == "lvm" { Address::Lvm(volume) } else { Address::LvmSnapshot(volume) })
            }
            other => Err(Error::new(
                ErrorKind::Unsupported,
                format!("{}: {other}:// endpoints are not implemented in this version of blksync", address.display()),
            )),
        }
    }
}

/// How a destination is opened.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenTarget {
    /// Open read-only and accept a missing path (dry runs and `compare`).
    pub read_only: bool,
    /// Create a missing regular file (sparse, empty).
    pub create: bool,
    /// Open block devices without `O_EXCL`, even when mounted or in use.
    pub force: bool,
    /// On block devices, zero by unmapping where the device guarantees zeros afterwards.
    pub discard: bool,
    /// Permission bits for a created file.
    pub mode: Option<u32>,
    /// The source's size, for a target created with it (`loop://FILE`).
    pub size: Option<u64>,
    /// Create a missing file as a compressed image (docs/COMPRESSED-IMAGE.md) at this zstd
    /// level (`sync --compress`). An existing image is recognised by its header without it.
    pub compress: Option<i32>,
}

/// A local regular file or block device.
#[derive(Debug)]
pub struct Local {
    path: PathBuf,
    file: Option<File>,
    kind: Kind,
    size: AtomicU64,
    identity: Identity,
    writable: bool,
    discard: bool,
    /// Cleared the first time the filesystem refuses to punch a hole.
    can_punch: AtomicBool,
    /// Set when this run created the file.
    created: bool,
    /// The loop device this endpoint attached (`loop://FILE`), detached when it is dropped,
    /// after `file` is closed (fields drop in order).
    attached: Option<crate::loopdev::Attached>,
    /// The snapshot this endpoint reads (`lvm+snapshot://`), removed when it is dropped, after
    /// `file` is closed.
    snapshot: Option<crate::lvm::Snapshot>,
    /// The LV this run created (`lvm://` target), for [`Local::remove_created`].
    created_lv: Option<crate::lvm::Volume>,
    /// The file this run created behind an address (`loop://FILE`), for [`Local::remove_created`].
    created_file: Option<PathBuf>,
    /// A source file's size and times when it was opened, to tell whether it changed meanwhile.
    stamp: Option<crate::advice::Stamp>,
}

impl Local {
    /// Opens the endpoint at `address` for reading only: a path (a regular file or a block
    /// device, refused before it is opened when it is anything else, see `check_kind`), or a
    /// URL-like address (see [`blksync_core::location`]).
    pub fn open_source(address: &Path) -> Result<Local> {
        match Address::of(address)? {
            Address::Path => Local::open_path_source(address),
            Address::Loop(inner) if crate::loopdev::is_loop_device(&inner) => {
                Ok(Local::open_path_source(&inner)?.named(address))
            }
            Address::Loop(inner) => {
                let attached = crate::loopdev::attach(&inner, true)?;
                let mut local = Local::open_path_source(attached.device())?.named(address);
                local.attached = Some(attached);
                Ok(local)
            }
            Address::Lvm(volume) => {
                Ok(Local::open_path_source(&crate::lvm::source_device(&volume, address)?)?.named(address))
            }
            Address::LvmSnapshot(volume) => {
                let snapshot = crate::lvm::Snapshot::create(&volume, address)?;
                let mut local = Local::open_path_source(&snapshot.device())?.named(address);
                local.snapshot = Some(snapshot);
                Ok(local)
            }
        }
    }

    /// Closes the endpoint and undoes what opening it set up: removes its snapshot, detaches its
    /// loop device. Unlike dropping it (which can only print a warning), a failure is returned,
    /// naming what to run by hand.
    pub fn close(mut self) -> Result<()> {
        drop(self.file.take());
        let snapshot = self.snapshot.take().map_or(Ok(()), crate::lvm::Snapshot::close);
        let attached = self.attached.take().map_or(Ok(()), crate::loopdev::Attached::detach);
        snapshot.and(attached)
    }

    fn named(mut self, address: &Path) -> Local {
        self.path = address.to_path_buf();
        self
    }

    /// Removes the file (or LV) this run created (a failed copy must not look like one).
    pub fn remove_created(&self) {
        if !self.created {
            return;
        }
        match &self.created_lv {
            Some(volume) => crate::lvm::remove_created(volume),
            None => {
                let _ = std::fs::remove_file(self.created_file.as_deref().unwrap_or(&self.path));
            }
        }
    }

    fn open_path_source(path: &Path) -> Result<Local> {
        let meta = std::fs::metadata(path).on("opening source", path)?;
        check_kind(path, &meta, "source")?;
        // O_NONBLOCK: should the path become a FIFO after the check, open() returns at once
        // instead of waiting for a writer; from_file then refuses it and clears the flag.
        let file =
            OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).on("opening source", path)?;
        let local = Local::from_file(path, file, false, false, false)?;
        local.advise_sequential();
        Ok(local)
    }

    /// Opens the endpoint at `address` as a destination.
    pub fn open_target(address: &Path, how: OpenTarget) -> Result<Local> {
        match Address::of(address)? {
            Address::Path => Local::open_path_target(address, how),
            Address::Loop(inner) if crate::loopdev::is_loop_device(&inner) => {
                Ok(Local::open_path_target(&inner, how)?.named(address))
            }
            Address::Loop(inner) => {
                // A missing image is created with the source's size (bsync needed dd first).
                let created = !inner.exists() && how.create && !how.read_only;
                if created {
                    let size = how.size.ok_or_else(|| {
                        Error::usage(format!(
                            "{} does not exist, and its size is not known here: create it first (truncate -s SIZE)",
                            address.display()
                        ))
                    })?;
                    let file = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(how.mode.unwrap_or(0o600))
                        .open(&inner)
                        .on("creating", &inner)?;
                    file.set_len(size).on("sizing", &inner)?;
                }
                let attached = match crate::loopdev::attach(&inner, how.read_only) {
                    Ok(a) => a,
                    Err(e) => {
                        if created {
                            let _ = std::fs::remove_file(&inner);
                        }
                        return Err(e);
                    }
                };
                let mut local = Local::open_path_target(attached.device(), how)?.named(address);
                local.attached = Some(attached);
                local.created = created;
                local.created_file = created.then_some(inner);
                Ok(local)
            }
            Address::Lvm(volume) => {
                let create = how.create && !how.read_only;
                let (device, created) = crate::lvm::target_device(&volume, address, how.size, create)?;
                let mut local = match Local::open_path_target(&device, how) {
                    Ok(l) => l.named(address),
                    Err(e) => {
                        if created {
                            crate::lvm::remove_created(&volume);
                        }
                        return Err(e);
                    }
                };
                local.created = created;
                local.created_lv = created.then_some(volume);
                Ok(local)
            }
            Address::LvmSnapshot(_) => Err(Error::usage(format!(
                "{} is a source only (a snapshot is how a live volume is read); write to lvm://VG/LV instead",
                address.display()
            ))),
        }
    }

    fn open_path_target(path: &Path, how: OpenTarget) -> Result<Local> {
        if !how.read_only
            && let Some(dir) = blksync_core::chain_files::chain_of(path)
        {
            return Err(Error::usage(format!(
                "{} is a file of the backup chain in {}, which is never modified; write to a copy elsewhere",
                path.display(),
                dir.display()
            )));
        }
        let existing = std::fs::metadata(path);
        if let Ok(meta) = &existing {
            check_kind(path, meta, "destination")?;
        }
        let is_device = existing.as_ref().is_ok_and(|m| m.file_type().is_block_device());
        let mut options = OpenOptions::new();
        options.read(true).write(!how.read_only);
        // O_NONBLOCK as for sources: a path swapped for a FIFO must not block the open.
        let mut flags = libc::O_NONBLOCK;
        if is_device && !how.read_only && !how.force {
            flags |= libc::O_EXCL;
        }
        options.custom_flags(flags);
        let missing = |e: &io::Error| e.kind() == io::ErrorKind::NotFound && (how.read_only || how.create);
        match options.open(path) {
            Ok(file) => {
                let local = Local::from_file(path, file, !how.read_only, how.discard, false)?;
                if !how.read_only {
                    local.lock()?;
                }
                local.advise_sequential();
                Ok(local)
            }
            Err(e) if missing(&e) && under_dev(path) => Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "{} does not exist: no such device (a regular file created under /dev would \
                     live in RAM and vanish at reboot; check the name with lsblk)",
                    path.display()
                ),
            )),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && is_device => Err(Error::new(
                ErrorKind::InUse,
                format!("{} is mounted or in use by another program; refusing to write to it", path.display()),
            )
            .with_hint(Hint::Force)),
            Err(e) if e.kind() == io::ErrorKind::NotFound && how.read_only => Ok(Local::absent(path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound && how.create => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(how.mode.unwrap_or(0o600))
                    .open(path)
                    .on("creating destination", path)?;
                let local = Local::from_file(path, file, true, false, true)?;
                local.lock()?;
                Ok(local)
            }
            Err(e) => Err(Error::io("opening destination", path, None, e)),
        }
    }

    /// A destination that does not exist (dry run): size 0, all holes.
    fn absent(path: &Path) -> Local {
        Local {
            path: path.to_path_buf(),
            file: None,
            kind: Kind::Absent,
            size: AtomicU64::new(0),
            identity: Identity::None,
            writable: false,
            discard: false,
            can_punch: AtomicBool::new(false),
            created: false,
            attached: None,
            created_file: None,
            snapshot: None,
            created_lv: None,
            stamp: None,
        }
    }

    fn from_file(path: &Path, file: File, writable: bool, discard: bool, created: bool) -> Result<Local> {
        let meta = file.metadata().on("inspecting", path)?;
        let ft = meta.file_type();
        let (kind, size, identity) = if ft.is_file() {
            (Kind::File, meta.len(), Identity::File { dev: meta.dev(), ino: meta.ino() })
        } else if ft.is_block_device() {
            let size = rustix::fs::seek(&file, SeekFrom::End(0)).on("finding the size of", path)?;
            (Kind::BlockDevice, size, Identity::Device { rdev: meta.rdev() })
        } else {
            return Err(Error::usage(format!(
                "{} is {}: neither a regular file nor a block device",
                path.display(),
                describe(ft)
            )));
        };
        // Only there to keep open() from blocking; reads and writes should wait as usual.
        let flags = rustix::fs::fcntl_getfl(&file).on("inspecting", path)?;
        if flags.contains(rustix::fs::OFlags::NONBLOCK) {
            rustix::fs::fcntl_setfl(&file, flags - rustix::fs::OFlags::NONBLOCK).on("inspecting", path)?;
        }
        let stamp = (ft.is_file() && !writable).then(|| crate::advice::Stamp::of(&meta));
        Ok(Local {
            stamp,
            path: path.to_path_buf(),
            file: Some(file),
            kind,
            size: AtomicU64::new(size),
            identity,
            writable,
            discard,
            can_punch: AtomicBool::new(true),
            created,
            attached: None,
            created_file: None,
            snapshot: None,
            created_lv: None,
        })
    }

    /// Takes an exclusive `flock` on a regular file for as long as this endpoint is open, so
    /// that a second writer (another sync, apply or restore, local or through an agent) fails
    /// at once instead of interleaving its writes with ours. Block devices need none: they are
    /// opened with `O_EXCL`. Read-only opens (dry runs, `compare`) take no lock: they write
    /// nothing, and a report of a file that someone else is writing is as good as the moment it
    /// was read.
    fn lock(&self) -> Result<()> {
        let (Some(file), Kind::File) = (&self.file, self.kind) else { return Ok(()) };
        match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "{} is being written by another blksync run, which holds a lock on it; \
                     refusing to write to it at the same time",
                    self.path.display()
                ),
            )),
            // Held until the file is closed; or a filesystem without flock (some FUSE and
            // network filesystems), where we run unlocked as any other program would.
            Ok(()) | Err(_) => Ok(()),
        }
    }

    /// True when this run created the file.
    #[must_use]
    pub fn created(&self) -> bool {
        self.created
    }

    /// Unix permission bits of a regular file (to give a created copy the same).
    #[must_use]
    pub fn mode(&self) -> Option<u32> {
        let meta = self.file.as_ref()?.metadata().ok()?;
        meta.file_type().is_file().then(|| meta.permissions().mode() & 0o7777)
    }

    fn file(&self) -> Result<&File> {
        self.file
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("{} does not exist", self.path.display())))
    }

    fn writable_file(&self) -> Result<&File> {
        if !self.writable {
            return Err(Error::usage(format!("{} is open read-only", self.path.display())));
        }
        self.file()
    }

    /// Doubles the kernel's read-ahead window: we read front to back.
    fn advise_sequential(&self) {
        if let Some(f) = &self.file {
            let _ = rustix::fs::fadvise(f, 0, None, Advice::Sequential);
        }
    }

    fn write_zeros(&self, file: &File, offset: u64, len: u64) -> Result<()> {
        static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(ZEROS.len() as u64) as usize;
            file.write_all_at(&ZEROS[..n], pos).at("writing zeros to", &self.path, pos)?;
            pos += n as u64;
        }
        Ok(())
    }
}

/// A block device's logical block size, from sysfs (a partition's is its disk's).
fn logical_block_size(rdev: u64) -> Option<u32> {
    let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    let dev = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    [dev.join("queue/logical_block_size"), dev.join("../queue/logical_block_size")]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse().ok())
}

/// Refuses, before it is opened, what is not a disk image: anything but a regular file or a
/// block device, and files of the kernel's pseudo-filesystems.
///
/// Opening is not harmless for the others: `open()` of a FIFO waits for a writer (and a signal
/// does not end the wait), opening some character devices acts (a watchdog starts, a tape
/// rewinds), and `/dev/zero` would be an endless source. Files under `/proc` or `/sys` are
/// regular files whose size (0 or 4096) says nothing about their content. An empty regular file
/// elsewhere is a valid, empty image.
fn check_kind(path: &Path, meta: &std::fs::Metadata, role: &str) -> Result<()> {
    let ft = meta.file_type();
    if ft.is_block_device() {
        return Ok(());
    }
    if !ft.is_file() {
        return Err(Error::usage(format!(
            "{} is {}: neither a regular file nor a block device, so it cannot be a {role}",
            path.display(),
            describe(ft)
        )));
    }
    if let Ok(fs) = rustix::fs::statfs(path)
        && let Some(name) = pseudo_filesystem(fs.f_type)
    {
        return Err(Error::usage(format!(
            "{} is a file of the kernel's {name} pseudo-filesystem, not a disk image, so it \
             cannot be a {role}",
            path.display()
        )));
    }
    Ok(())
}

/// What a file that is not a regular file or a block device is, for messages.
fn describe(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO (named pipe)"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "an unknown kind of file"
    }
}

/// The name of a kernel pseudo-filesystem by its `statfs` magic (linux/magic.h), `None` for a
/// filesystem that stores data.
fn pseudo_filesystem(magic: rustix::fs::FsWord) -> Option<&'static str> {
    const PSEUDO: [(rustix::fs::FsWord, &str); 11] = [
        (0x9fa0, "proc"),
        (0x6265_6572, "sysfs"),
        (0x6462_6720, "debugfs"),
        (0x7472_6163, "tracefs"),
        (0x7363_6673, "securityfs"),
        (0x0027_e0eb, "cgroup"),
        (0x6367_7270, "cgroup2"),
        (0xcafe_4a11, "bpf"),
        (0x6265_6570, "configfs"),
        (0x6165_676c, "pstore"),
        (0xde5e_81e4, "efivarfs"),
    ];
    PSEUDO.iter().find(|(m, _)| *m == magic).map(|(_, name)| *name)
}

/// True when a missing `path` would be created on the filesystem that holds `/dev` or on any
/// devtmpfs: there, a missing name is a device that does not exist (a typo such as
/// `/dev/loop3p1`), and a regular file would only fill RAM. Separate mounts below `/dev`
/// (`/dev/shm`) are ordinary filesystems and are not refused.
fn under_dev(path: &Path) -> bool {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(dev) = std::fs::metadata(dir).map(|m| m.dev()) else { return false };
    if std::fs::metadata("/dev").is_ok_and(|m| m.dev() == dev) {
        return true;
    }
    let id = format!("{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev));
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
        info.lines().any(|line| {
            let mut fields = line.split(' ');
            let same = fields.nth(2) == Some(id.as_str());
            same && line.split(" - ").nth(1).is_some_and(|rest| rest.starts_with("devtmpfs "))
        })
    })
}

/// True when `a` and `b` are different objects over the same storage, as this host's sysfs
/// tells: a loop device and its backing file (or a partition of that loop device and the file),
/// two loop devices over one file, a partition and its disk, a device-mapper device and what it
/// is built on. Partitions of one disk, or of one loop device, are separate storage.
///
/// Identical identities are the caller's first check; this finds what they cannot show.
#[must_use]
pub fn same_storage(a: Identity, b: Identity) -> bool {
    let (x, y) = (Storage::of(a), Storage::of(b));
    if x.objects.contains(&b) || y.objects.contains(&a) {
        return true;
    }
    // Two loop devices over one file (or device) alias it; a loop device they share (two
    // partitions of it) does not.
    let shared_loop = x.loops.iter().any(|l| y.loops.contains(l));
    !shared_loop && x.objects.iter().any(|o| y.objects.contains(o) && (x.backing.contains(o) || y.backing.contains(o)))
}

/// Everything an endpoint's bytes lie on: itself, the disk of a partition, the backing file of
/// a loop device, the devices under a device-mapper or md device, and so on down.
#[derive(Debug, Default)]
struct Storage {
    objects: Vec<Identity>,
    /// Loop devices among `objects`.
    loops: Vec<Identity>,
    /// Objects that are the backing file (or device) of a loop device.
    backing: Vec<Identity>,
}

impl Storage {
    fn of(identity: Identity) -> Storage {
        let device = |dir: &Path| -> Option<Identity> {
            let text = std::fs::read_to_string(dir.join("dev")).ok()?;
            let (major, minor) = text.trim().split_once(':')?;
            Some(Identity::Device { rdev: rustix::fs::makedev(major.parse().ok()?, minor.parse().ok()?) })
        };
        let mut out = Storage::default();
        let mut todo = vec![(identity, false)];
        // Stacks are shallow; the bound only guards against a cycle the kernel would not make.
        while let Some((id, backing)) = todo.pop() {
            if out.objects.contains(&id) || out.objects.len() >= 64 {
                continue;
            }
            out.objects.push(id);
            if backing {
                out.backing.push(id);
            }
            let Identity::Device { rdev } = id else { continue };
            let link = format!("/sys/dev/block/{}:{}", rustix::fs::major(rdev), rustix::fs::minor(rdev));
            let Ok(dir) = std::fs::canonicalize(link) else { continue };
            if dir.join("partition").exists()
                && let Some(disk) = dir.parent().and_then(device)
            {
                todo.push((disk, false));
            }
            if let Ok(file) = std::fs::read_to_string(dir.join("loop/backing_file")) {
                out.loops.push(id);
                // A deleted backing file reads "PATH (deleted)" and cannot be found: nothing to
                // compare with, and nothing the other side can be.
                if let Ok(meta) = std::fs::metadata(file.trim_end_matches('\n')) {
                    let under = if meta.file_type().is_block_device() {
                        Identity::Device { rdev: meta.rdev() }
                    } else {
                        Identity::File { dev: meta.dev(), ino: meta.ino() }
                    };
                    todo.push((under, true));
                }
            }
            for slave in std::fs::read_dir(dir.join("slaves")).into_iter().flatten().flatten() {
                if let Some(under) = device(&slave.path()) {
                    todo.push((under, false));
                }
            }
        }
        out
    }
}

/// Errors that mean "this filesystem or device cannot do that fallocate mode", as opposed to a
/// real failure.
fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENOTTY))
}

impl Source for Local {
    fn name(&self) -> &Path {
        &self.path
    }

    fn warnings(&self, after_reading: bool) -> Vec<String> {
        use crate::advice;
        let name = self.path.display().to_string();
        let mut out = Vec::new();
        if self.writable || self.kind == Kind::Absent {
            return out;
        }
        if after_reading {
            if let (Some(then), Ok(meta)) =
                (&self.stamp, self.file().and_then(|f| f.metadata().on("inspecting", &self.path)))
                && let Some(w) = advice::changed_while_read(&name, then, &advice::Stamp::of(&meta))
            {
                out.push(w);
            }
            return out;
        }
        // A snapshot is not the mounted volume: reading it is the advice.
        if let (Identity::Device { rdev }, None) = (self.identity, &self.snapshot)
            && let Some(at) =
                std::fs::read_to_string("/proc/self/mountinfo").ok().and_then(|i| advice::mounted_read_write(&i, rdev))
        {
            out.push(advice::mounted_warning(&name, &at));
        }
        let mut head = [0u8; 64];
        let n = self.size().min(head.len() as u64) as usize;
        if self.read_at(&mut head[..n], 0).is_ok()
            && let Some(format) = advice::image_format(&head[..n])
        {
            out.push(advice::image_warning(&name, format));
        }
        out
    }

    fn exists(&self) -> bool {
        self.kind != Kind::Absent
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let file = self.file()?;
        file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                // The file shrank under us (another writer); say so rather than "failed to fill
                // whole buffer".
                Error::new(
                    ErrorKind::Io,
                    format!(
                        "reading {} at byte offset {offset}: unexpected end of file (was it truncated while we ran?)",
                        self.path.display()
                    ),
                )
            } else if let Some(Err(overflowed)) = self.snapshot.as_ref().map(|s| s.check_intact(&self.path)) {
                // An overflowed snapshot reads as EIO: say what happened, not just "I/O error".
                overflowed
            } else {
                Error::io("reading", &self.path, Some(offset), e)
            }
        })
    }

    fn segment_at(&self, offset: u64) -> Result<Segment> {
        let size = self.size();
        let all = Segment { start: offset, end: size, allocated: true };
        if self.kind != Kind::File {
            return Ok(Segment { allocated: self.kind != Kind::Absent, ..all });
        }
        let file = self.file()?;
        let data = match rustix::fs::seek(file, SeekFrom::Data(offset)) {
            Ok(d) => d.min(size),
            // ENXIO: no data at or after offset.
            Err(rustix::io::Errno::NXIO) => size,
            // Filesystems without SEEK_DATA: treat everything as data.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => return Ok(all),
            Err(e) => return Err(e).at("looking for data in", &self.path, offset),
        };
        if data > offset {
            return Ok(Segment { start: offset, end: data, allocated: false });
        }
        let hole = match rustix::fs::seek(file, SeekFrom::Hole(offset)) {
            Ok(h) => h.min(size),
            Err(rustix::io::Errno::NXIO) => size,
            Err(e) => return Err(e).at("looking for holes in", &self.path, offset),
        };
        Ok(Segment { start: offset, end: hole.max(offset + 1).min(size), allocated: true })
    }

    fn read_sparsely(&self) {
        // Not even the kernel's default window: the reads asked for are large already.
        if let Some(f) = &self.file {
            let _ = rustix::fs::fadvise(f, 0, None, Advice::Random);
        }
    }

    fn prefetch(&self, offset: u64, len: u64) {
        if let (Some(f), Some(len)) = (&self.file, std::num::NonZeroU64::new(len)) {
            let _ = rustix::fs::fadvise(f, offset, Some(len), Advice::WillNeed);
        }
    }

    fn drop_cache(&self, offset: u64, len: u64) {
        if let (Some(file), Some(len)) = (&self.file, NonZeroU64::new(len)) {
            let _ = rustix::fs::fadvise(file, offset, Some(len), Advice::DontNeed);
        }
    }

    fn caps(&self) -> crate::endpoint::Caps {
        let caps = crate::endpoint::Caps::default();
        match self.kind {
            Kind::File => crate::endpoint::Caps {
                resizable: true,
                holes: true,
                zero_offload: self.can_punch.load(Ordering::Relaxed),
                ..caps
            },
            Kind::BlockDevice => crate::endpoint::Caps {
                // fallocate(ZERO_RANGE) on a device is blkdev_issue_zeroout: never stale data.
                zero_offload: true,
                // PUNCH_HOLE on a device only unmaps where zeros are guaranteed, and fails
                // otherwise (see the module doc).
                discard_zeroes: self.discard,
                stable: self.snapshot.is_some(),
                block_size: match self.identity {
                    Identity::Device { rdev } => logical_block_size(rdev).unwrap_or(caps.block_size),
                    _ => caps.block_size,
                },
                ..caps
            },
            Kind::Absent => crate::endpoint::Caps { resizable: true, ..caps },
        }
    }

    fn check_intact(&self) -> Result<()> {
        self.snapshot.as_ref().map_or(Ok(()), |s| s.check_intact(&self.path))
    }

    fn mode(&self) -> Option<u32> {
        Local::mode(self)
    }

    fn close(self: Box<Self>) -> Result<()> {
        Local::close(*self)
    }

    fn identity(&self) -> Identity {
        self.identity
    }
}

impl Target for Local {
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable_file()?.write_all_at(buf, offset).at("writing", &self.path, offset)
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        let file = self.writable_file()?;
        if len == 0 {
            return Ok(());
        }
        match self.kind {
            Kind::File => {
                if self.can_punch.load(Ordering::Relaxed) {
                    let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
                    match rustix::fs::fallocate(file, mode, offset, len) {
                        Ok(()) => return Ok(()),
                        Err(e) if unsupported(&e.into()) => {
                            self.can_punch.store(false, Ordering::Relaxed);
                        }
                        Err(e) => return Err(e).at("punching a hole in", &self.path, offset),
                    }
                }
                self.write_zeros(file, offset, len)
            }
            Kind::BlockDevice => {
                if self.discard && self.can_punch.load(Ordering::Relaxed) {
                    let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
                    match rustix::fs::fallocate(file, mode, offset, len) {
                        Ok(()) => return Ok(()),
                        Err(e) if unsupported(&e.into()) => {
                            self.can_punch.store(false, Ordering::Relaxed);
                        }
                        Err(e) => return Err(e).at("discarding", &self.path, offset),
                    }
                }
                let mode = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
                match rustix::fs::fallocate(file, mode, offset, len) {
                    Ok(()) => Ok(()),
                    Err(e) if unsupported(&e.into()) => self.write_zeros(file, offset, len),
                    Err(e) => Err(e).at("zeroing", &self.path, offset),
                }
            }
            Kind::Absent => Err(Error::usage(format!("{} does not exist", self.path.display()))),
        }
    }

    fn set_size(&self, size: u64) -> Result<()> {
        if self.kind != Kind::File {
            return Err(Error::usage(format!("{} cannot be resized", self.path.display())));
        }
        self.writable_file()?.set_len(size).on("resizing", &self.path)?;
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        // fsync reports that some write since the last one failed, never which: say so, rather
        // than give an error without an offset as if there were none to give.
        self.file()?.sync_all().map_err(|e| {
            let err = Error::io("flushing", &self.path, None, e);
            Error::new(
                err.kind(),
                format!("{err} (a write since the last flush did not reach the disk; the kernel does not say at which offset)"),
            )
        })
    }

    fn created(&self) -> bool {
        Local::created(self)
    }

    fn remove_created(&self) {
        Local::remove_created(self);
    }
}
