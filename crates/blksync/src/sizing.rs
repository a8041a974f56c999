//! How much to sync when source and destination differ in size.
//!
//! Older tools hung, truncated devices or silently synced a prefix here. The rules, in one pure
//! function so that every case has a test:
//!
//! | destination | smaller than source | larger than source |
//! |---|---|---|
//! | missing file | created sparse at the source's size | — |
//! | regular file | extended (`--no-resize`: refused) | truncated (`--no-resize`: refused) |
//! | block device | refused before any write | source length synced, rest left alone with a warning; `--zero-tail` zeroes it |
//!
//! `--common-size` syncs the first min(source, destination) bytes of anything and touches
//! nothing beyond.

use crate::endpoint::Caps;
use crate::error::{Error, ErrorKind, Result};
use crate::size::format_size;

/// What to do when sizes differ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SizePolicy {
    /// Resize a destination file to the source's size (the default).
    #[default]
    Resize,
    /// Refuse to sync when a destination file's size differs.
    NoResize,
    /// Sync only the first min(source, destination) bytes.
    Common,
}

/// The sizes a sync works with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sizing {
    /// Bytes of the source that take part: `[0, source_len)`.
    pub source_len: u64,
    /// Bytes of the destination examined and made equal: `[0, scan_len)`. Beyond `source_len`
    /// the source counts as zeros (`--zero-tail`).
    pub scan_len: u64,
    /// New size for a destination file.
    pub resize_to: Option<u64>,
    /// Something to tell the user.
    pub warning: Option<String>,
}

/// Decides the sizes for syncing a source of `source_size` bytes onto a destination that has
/// `dest_size` bytes and can do what `dest` says (only whether it is resizable matters here);
/// `exists` is false for a destination that is not there (a dry run's). `fresh` is true when
/// the destination file did not exist before this run.
pub fn resolve(
    source_size: u64,
    (dest, exists): (&Caps, bool),
    dest_size: u64,
    fresh: bool,
    policy: SizePolicy,
    zero_tail: bool,
) -> Result<Sizing> {
    let same = Sizing { source_len: source_size, scan_len: source_size, resize_to: None, warning: None };
    if zero_tail && policy == SizePolicy::Common {
        return Err(Error::usage(
            "zeroing the destination past the source's end and syncing only the common part contradict each other",
        ));
    }
    if fresh || !exists {
        return Ok(Sizing { resize_to: (dest_size != source_size).then_some(source_size), ..same });
    }
    if dest_size == source_size {
        return Ok(same);
    }
    let sizes = format!(
        "source is {source_size} bytes ({}), destination is {dest_size} bytes ({})",
        format_size(source_size),
        format_size(dest_size)
    );
    if policy == SizePolicy::Common {
        let n = source_size.min(dest_size);
        return Ok(Sizing {
            source_len: n,
            scan_len: n,
            resize_to: None,
            warning: Some(format!("{sizes}; syncing only the first {n} bytes")),
        });
    }
    match dest.resizable {
        true => {
            if policy == SizePolicy::NoResize {
                return Err(Error::new(
                    ErrorKind::SizeMismatch,
                    format!("{sizes}; not resizing the destination, as asked"),
                )
                .with_hint(crate::error::Hint::CommonSize));
            }
            Ok(Sizing { resize_to: Some(source_size), ..same })
        }
        false if dest_size < source_size => Err(Error::new(
            ErrorKind::SizeMismatch,
            format!("destination device is too small: {sizes}; nothing was written"),
        )
        .with_hint(crate::error::Hint::CommonSize)),
        false if zero_tail => Ok(Sizing { scan_len: dest_size, ..same }),
        false => Ok(Sizing {
            warning: Some(format!(
                "{sizes}; the last {} bytes of the destination are left as they are",
                dest_size - source_size
            )),
            ..same
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SizePolicy::{Common, NoResize, Resize};

    /// A regular file's abilities (resizable), a device's (fixed size) and a missing
    /// destination's, as `resolve` takes them.
    const FILE: (&Caps, bool) = (&Caps { resizable: true, holes: true, ..Caps::NEVER_WRONG }, true);
    const DEVICE: (&Caps, bool) = (&Caps::NEVER_WRONG, true);
    const ABSENT: (&Caps, bool) = (&Caps::NEVER_WRONG, false);

    #[test]
    fn missing_file_is_created_at_source_size() {
        let s = resolve(100, FILE, 0, true, Resize, false).unwrap();
        assert_eq!((s.scan_len, s.resize_to), (100, Some(100)));
        let s = resolve(100, ABSENT, 0, false, NoResize, false).unwrap();
        assert_eq!(s.resize_to, Some(100));
    }

    #[test]
    fn file_of_other_size_is_resized_or_refused() {
        assert_eq!(resolve(100, FILE, 50, false, Resize, false).unwrap().resize_to, Some(100));
        assert_eq!(resolve(100, FILE, 500, false, Resize, false).unwrap().resize_to, Some(100));
        let e = resolve(100, FILE, 500, false, NoResize, false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::SizeMismatch);
        assert!(resolve(100, FILE, 100, false, NoResize, false).is_ok());
    }

    #[test]
    fn small_device_is_refused_large_device_warned_or_tail_zeroed() {
        let e = resolve(100, DEVICE, 50, false, Resize, false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::SizeMismatch);
        assert!(e.to_string().contains("nothing was written"));
        let s = resolve(100, DEVICE, 500, false, Resize, false).unwrap();
        assert_eq!((s.source_len, s.scan_len, s.resize_to), (100, 100, None));
        assert!(s.warning.is_some());
        let s = resolve(100, DEVICE, 500, false, Resize, true).unwrap();
        assert_eq!((s.source_len, s.scan_len), (100, 500));
    }

    #[test]
    fn common_size_syncs_the_shorter_length_and_never_resizes() {
        for (src, dst, kind) in [(100, 50, DEVICE), (50, 100, DEVICE), (100, 50, FILE), (50, 100, FILE)] {
            let s = resolve(src, kind, dst, false, Common, false).unwrap();
            assert_eq!((s.source_len, s.scan_len, s.resize_to), (50, 50, None));
        }
        assert!(resolve(1, FILE, 2, false, Common, true).is_err());
    }

    #[test]
    fn zero_and_one_byte_sizes_work() {
        assert_eq!(resolve(0, FILE, 0, true, Resize, false).unwrap().scan_len, 0);
        assert_eq!(resolve(1, FILE, 0, false, Resize, false).unwrap().resize_to, Some(1));
        assert_eq!(resolve(0, FILE, 1, false, Resize, false).unwrap().resize_to, Some(0));
    }
}
