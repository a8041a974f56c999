//! A chain's directory as storage: loading a chain to read it, repairing what an interrupted
//! run left, and committing a new base. Commands build on these; none of them writes a point's
//! bytes (the recorders in [`crate::record`] do).

use std::path::Path;
use std::sync::Arc;

use crate::chain::{Chain, base_paths};
use crate::delta::{Header, Writer};
use crate::endpoint::Source;
use crate::error::{Error, ErrorKind, Result};
use crate::sums::Sums;

/// Removes leftovers of interrupted runs.
pub fn clean(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().contains(".tmp-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Makes the complete, flushed base image at `tmp` part of the chain in `dir`: its content hashes
/// are written, then it gets its name, then its metadata, which is what makes it a base. A crash
/// at any step leaves either no base or a whole one.
pub fn commit_base(dir: &Path, number: u64, image: &dyn Source, tmp: &Path, header: &Header) -> Result<()> {
    let (path, meta) = base_paths(dir, number, &header.id);
    let sums = Sums::compute(image, header.id, crate::workers::default_threads())?;
    sums.store(&crate::sums::path_for(&path))?;
    crate::temp::commit(tmp, &path)?;
    Writer::create(&meta, header)?.commit()?;
    Ok(())
}

/// The chain in `dir`, for reading: an interrupted prune is repaired first, and the base is
/// locked against a prune for as long as the chain is held.
pub fn load(dir: &Path) -> Result<Arc<Chain>> {
    let chain = if dir.is_dir() { crate::prune::open_for_reading(dir)? } else { None };
    chain.map(Arc::new).ok_or_else(|| no_backup(dir))
}

/// The chain in `dir` for a command that holds its lock.
pub fn load_unlocked(dir: &Path) -> Result<Arc<Chain>> {
    Chain::load(dir)?.map(Arc::new).ok_or_else(|| no_backup(dir))
}

fn no_backup(dir: &Path) -> Error {
    Error::new(ErrorKind::NotFound, format!("{} holds no backup", dir.display()))
}

/// Repairs an interrupted prune before a backup extends the chain (the caller holds its lock).
pub fn repair(dir: &Path) -> Result<()> {
    if crate::prune::journal_path(dir).exists() {
        let _base = crate::chain::lock_base(dir, true)?;
        crate::prune::recover(dir)?;
    }
    Ok(())
}
