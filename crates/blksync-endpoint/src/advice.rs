//! What a user should hear about a local source that does not stop the run, in one line each:
//! a block device mounted read-write (its filesystem may change under the reads), a disk-image
//! format read as raw bytes (the copy is of the container, not of the disk in it), and a file
//! that changed while it was read (the copy may mix old and new content).
//!
//! Warnings, not errors: each has legitimate uses (a quiesced filesystem, a qcow2 copied as a
//! file on purpose, an append-only log), and the user decides.

use std::os::unix::fs::MetadataExt;

/// What the size and times of a regular file were when it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// The stamp of `meta` (a regular file's).
    #[must_use]
    pub fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp { size: meta.len(), mtime: (meta.mtime(), meta.mtime_nsec()), ctime: (meta.ctime(), meta.ctime_nsec()) }
    }

    /// What changed between `self` and `now`, in words: "size", "modification time", "change time".
    #[must_use]
    pub fn changes(&self, now: &Stamp) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.size != now.size {
            out.push("size");
        }
        if self.mtime != now.mtime {
            out.push("modification time");
        }
        if self.ctime != now.ctime && out.is_empty() {
            out.push("change time");
        }
        out
    }
}

/// The warning for a source whose stamp moved from `then` to `now` during the run, if it did.
#[must_use]
pub fn changed_while_read(name: &str, then: &Stamp, now: &Stamp) -> Option<String> {
    let changes = then.changes(now);
    (!changes.is_empty()).then(|| {
        format!(
            "{name} changed while it was read (its {} moved): the copy may mix old and new content; \
             compare it with the source, or read a snapshot (lvm+snapshot://)",
            changes.join(" and ")
        )
    })
}

/// Where the block device `rdev` is mounted read-write, from `mountinfo` (the text of
/// `/proc/self/mountinfo`).
#[must_use]
pub fn mounted_read_write(mountinfo: &str, rdev: u64) -> Option<String> {
    let id = format!("{}:{}", rustix::fs::major(rdev), rustix::fs::minor(rdev));
    mountinfo.lines().find_map(|line| {
        // id parent major:minor root mount-point options ... - type source super-options
        let fields: Vec<&str> = line.split(' ').collect();
        let rw = fields.get(5).is_some_and(|o| o.split(',').any(|o| o == "rw"));
        (fields.get(2) == Some(&id.as_str()) && rw).then(|| unescape(fields.get(4).copied().unwrap_or("?")))
    })
}

/// The warning for a source mounted read-write at `at`.
#[must_use]
pub fn mounted_warning(name: &str, at: &str) -> String {
    format!(
        "{name} is mounted read-write at {at}: its filesystem may change while it is read, and the copy \
         may not be consistent; read a snapshot (lvm+snapshot://) or unmount it first"
    )
}

/// The disk-image format whose header `head` (the first bytes of a source) starts with.
#[must_use]
pub fn image_format(head: &[u8]) -> Option<&'static str> {
    const FORMATS: [(&[u8], &str); 5] = [
        (b"QFI\xfb", "qcow2"),
        (b"KDMV", "vmdk"),
        (b"# Disk DescriptorFile", "vmdk"),
        (b"vhdxfile", "vhdx"),
        (b"<<< Oracle VM VirtualBox Disk Image >>>", "vdi"),
    ];
    FORMATS.iter().find(|(magic, _)| head.starts_with(magic)).map(|&(_, format)| format)
}

/// The warning for a source that holds a `format` image.
#[must_use]
pub fn image_warning(name: &str, format: &str) -> String {
    format!(
        "{name} starts with a {format} header and is synced as raw bytes: the copy is of the {format} \
         file, not of the disk in it; to sync the disk, serve it with `qemu-nbd` and use nbd://"
    )
}

/// `\040` and friends in a mountinfo path, back to the bytes.
fn unescape(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal =
            bytes.get(i + 1..i + 4).filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let Some(d) = octal {
            out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8).wrapping_add(c - b'0')));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_write_mount_of_the_device_is_found_and_a_read_only_one_is_not() {
        let info = "22 1 7:3 / /mnt/my\\040disk rw,relatime shared:1 - ext4 /dev/loop3 rw\n\
                    23 1 7:4 / /ro ro,relatime - ext4 /dev/loop4 ro\n";
        let rdev = |major, minor| rustix::fs::makedev(major, minor);
        assert_eq!(mounted_read_write(info, rdev(7, 3)).as_deref(), Some("/mnt/my disk"));
        assert_eq!(mounted_read_write(info, rdev(7, 4)), None);
        assert_eq!(mounted_read_write(info, rdev(7, 5)), None);
        assert_eq!(mounted_read_write("garbage\n\n1 2", rdev(7, 3)), None);
    }

    #[test]
    fn image_headers_are_recognised_and_raw_data_is_not() {
        assert_eq!(image_format(b"QFI\xfb\0\0\0\x03"), Some("qcow2"));
        assert_eq!(image_format(b"KDMV\x01\0\0\0"), Some("vmdk"));
        assert_eq!(image_format(b"vhdxfile"), Some("vhdx"));
        assert_eq!(image_format(&[0; 512]), None);
        assert_eq!(image_format(b"QF"), None);
    }
}
