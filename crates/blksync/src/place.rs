//! Where a command runs. The front end calls one function per command with the addresses the
//! user gave, and never chooses: this module does.
//!
//! - Both ends in this process: the byte scan ([`crate::sync`], [`crate::compare`],
//!   [`crate::backup`]), which compares bytes with `memcmp`.
//! - An end behind a link: the hash pass ([`crate::relay`]), which compares streamed hashes and
//!   moves only what differs; a local end is a peer in a thread.
//! - Every path on one remote host: the command runs there as a job, and only progress and the
//!   result cross the network (also in [`crate::relay`]).
//!
//! The other commands (`diff`, `apply`, `merge`, `info`, `list`, `prune`) make the same choice
//! in `relay/history.rs`.

use std::path::Path;

use crate::backup::{At, BackupSummary};
use crate::compare::{CompareOptions, Comparison};
use crate::error::{Error, Result};
use crate::location::Location;
use crate::patch::DiffOptions;
use crate::progress::Control;
use crate::relay::{RemoteOptions, Side};
use crate::sync::{Summary, SyncOptions};

/// `sync`: makes `target` identical to `source`.
pub fn sync(source: &Side<'_>, target: &Side<'_>, options: &RemoteOptions, control: Control<'_>) -> Result<Summary> {
    let (Location::Local(src), Location::Local(dst)) = (source.location, target.location) else {
        return crate::relay::sync_locations(source, target, options, control);
    };
    let undo = match &options.undo {
        None => None,
        Some(Location::Local(path)) => Some(path.clone()),
        Some(Location::Remote(r)) => {
            return Err(Error::usage(format!(
                "undo log {}: an undo log is written on the destination's host, and {} is local",
                r.display(),
                dst.display()
            )));
        }
    };
    crate::sync::sync_paths(src, dst, &SyncOptions { undo, ..options.sync.clone() }, control)
}

/// `compare`: finds where `a` and `b` differ.
pub fn compare(a: &Side<'_>, b: &Side<'_>, options: &CompareOptions, control: Control<'_>) -> Result<Comparison> {
    match (a.location, b.location) {
        (Location::Local(x), Location::Local(y)) => crate::compare::compare_paths(x, y, options, control),
        _ => crate::relay::compare_locations(a, b, options, control),
    }
}

/// `backup`: adds a point for `source` to the chain at `dest`.
pub fn backup(
    source: &Side<'_>,
    dest: &Side<'_>,
    options: &DiffOptions,
    control: Control<'_>,
) -> Result<BackupSummary> {
    if let (Location::Local(src), Location::Local(dir)) = (source.location, dest.location) {
        return crate::backup::backup(src, dir, options, control);
    }
    let remote = RemoteOptions {
        sync: SyncOptions {
            block_size: options.block_size,
            keep_cache: options.keep_cache,
            threads: options.threads,
            bwlimit: options.bwlimit,
            force: options.force,
            compress: options.compress,
            ..SyncOptions::default()
        },
        compress: crate::compress::AUTO,
        pause: None,
        undo: None,
    };
    crate::relay::backup_locations(source, dest, &options.comment, &remote, control)
}

/// `restore`: writes point `at` of the chain at `chain` onto `target`.
pub fn restore(chain: &Side<'_>, at: At, target: &Side<'_>, force: bool, control: Control<'_>) -> Result<Summary> {
    if let (Location::Local(dir), Location::Local(path)) = (chain.location, target.location) {
        return crate::backup::restore(dir, path, at, force, control);
    }
    let options = RemoteOptions {
        sync: SyncOptions { force, ..SyncOptions::default() },
        compress: crate::compress::AUTO,
        pause: None,
        undo: None,
    };
    crate::relay::restore_locations(chain, at, target, &options, control)
}

/// `restore CHAIN -`: writes point `at` to `out` as one stream. Returns the bytes written.
pub fn restore_to(chain: &Side<'_>, at: At, out: &mut dyn std::io::Write, control: Control<'_>) -> Result<u64> {
    match chain.location {
        Location::Local(dir) => crate::backup::restore_to(dir, out, at),
        Location::Remote(_) => crate::relay::restore_stream(chain, at, out, control),
    }
}

/// Whether `location` is the standard stream (`-`).
#[must_use]
pub fn is_stdio(location: &Location) -> bool {
    matches!(location, Location::Local(path) if path == Path::new("-"))
}
