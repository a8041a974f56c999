//! The names of a backup chain's files (docs/DELTA-FORMAT.md, "Backup chains"): what the
//! chain is made of, and what every endpoint refuses to write into.

use std::path::{Path, PathBuf};

use crate::id::to_hex;

/// Paths of the image and metadata of a base holding point `number`.
#[must_use]
pub fn base_paths(dir: &Path, number: u64, id: &[u8; 16]) -> (PathBuf, PathBuf) {
    let stem = format!("base-{number:06}-{}", to_hex(id));
    (dir.join(format!("{stem}.img")), dir.join(format!("{stem}.delta")))
}

/// Path of increment `seq`.
#[must_use]
pub fn increment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("inc-{seq:06}.delta"))
}

/// The directory of the backup chain that `path` (or what it links to) belongs to, if it is a
/// chain's base image, metadata or increment: those files are never written in place, so a
/// `sync`, `apply` or `restore` onto one is refused. Recognised by name, beside a base's metadata.
#[must_use]
pub fn chain_of(path: &Path) -> Option<PathBuf> {
    let path = std::fs::canonicalize(path).ok()?;
    let name = path.file_name()?.to_str()?;
    let numbered = |rest: &str| rest.len() > 6 && rest.as_bytes()[..6].iter().all(u8::is_ascii_digit);
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
    let named = match (name.strip_prefix("base-"), name.strip_prefix("inc-")) {
        (Some(rest), _) => numbered(rest) && (ext == "img" || ext == "delta"),
        (_, Some(rest)) => numbered(rest) && ext == "delta",
        _ => false,
    };
    let dir = path.parent()?;
    let has_base = named
        && std::fs::read_dir(dir).ok()?.flatten().any(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("base-") && n.ends_with(".delta")
        });
    has_base.then(|| dir.to_path_buf())
}
