//! Both ends in this process: the engine reads both and compares bytes.

use std::path::{Path, PathBuf};

use super::{End, Ends, Mode, Plan};
use crate::endpoint::{Identity, Source, Target};
use crate::engine::{Action, Found, Scan};
use crate::error::{Error, Result};
use crate::progress::{Control, Counters};
use crate::record::Undo;

/// The second end: written (a sync), or only read (a comparison).
#[derive(Clone, Copy)]
enum Dest<'a> {
    Write(&'a dyn Target),
    Read(&'a dyn Source),
}

/// Two endpoints of this process.
pub(crate) struct LocalEnds<'a> {
    src: &'a dyn Source,
    dest: Dest<'a>,
    created: bool,
    /// `--undo PATH` and `--force` (which lets the log replace a file), until it is started.
    undo_at: Option<(PathBuf, bool)>,
    /// The undo log, once started: every write goes through it.
    undo: Option<Undo<&'a dyn Target>>,
    /// Runs after a complete writing pass, before its flush commits (a recorder takes the new
    /// image's fingerprint from the source that was read).
    before_commit: Option<&'a dyn Fn() -> Result<()>>,
}

impl<'a> LocalEnds<'a> {
    /// `src` synced onto `dst`; `created` says this run created `dst` (empty).
    pub(crate) fn new(src: &'a dyn Source, dst: &'a dyn Target, created: bool) -> LocalEnds<'a> {
        LocalEnds { src, dest: Dest::Write(dst), created, undo_at: None, undo: None, before_commit: None }
    }

    /// `a` compared with `b`.
    pub(crate) fn reading(a: &'a dyn Source, b: &'a dyn Source) -> LocalEnds<'a> {
        LocalEnds { src: a, dest: Dest::Read(b), created: false, undo_at: None, undo: None, before_commit: None }
    }

    /// Saves the old content of every block overwritten into an undo log at `path`.
    pub(crate) fn with_undo(mut self, path: Option<PathBuf>, force: bool) -> LocalEnds<'a> {
        self.undo_at = path.map(|p| (p, force));
        self
    }

    /// Runs `hook` after a complete writing pass, before the flush that commits.
    pub(crate) fn before_commit(mut self, hook: &'a dyn Fn() -> Result<()>) -> LocalEnds<'a> {
        self.before_commit = Some(hook);
        self
    }

    /// What is written: the target, through its undo log when there is one.
    fn writer(&self) -> Option<&dyn Target> {
        match self.dest {
            Dest::Write(t) => Some(self.undo.as_ref().map_or(t, |u| u as &dyn Target)),
            Dest::Read(_) => None,
        }
    }

    fn dest(&self) -> &dyn Source {
        match (self.writer(), self.dest) {
            (Some(w), _) => w,
            (None, Dest::Read(s)) => s,
            (None, Dest::Write(t)) => t,
        }
    }
}

impl Ends for LocalEnds<'_> {
    fn names(&self) -> (String, String) {
        (self.src.name().display().to_string(), self.dest().name().display().to_string())
    }

    fn same_object(&self) -> bool {
        self.src.identity() != Identity::None && self.src.identity() == self.dest().identity()
    }

    fn source_size(&self) -> u64 {
        self.src.size()
    }

    fn target(&self) -> End {
        let d = self.dest();
        End { exists: d.exists(), size: d.size(), created: self.created, caps: d.caps() }
    }

    fn prepare(&mut self, new_size: u64, resize: Option<u64>) -> Result<()> {
        if let (Some((path, force)), Dest::Write(dst)) = (self.undo_at.take(), self.dest) {
            self.undo = Some(begin_undo(&path, self.src, dst, new_size, force)?);
        }
        if let (Some(size), Some(w)) = (resize, self.writer())
            && let Err(e) = w.set_size(size)
        {
            if let Some(undo) = &self.undo {
                undo.abandon();
            }
            return Err(e);
        }
        Ok(())
    }

    fn pass(&mut self, mode: Mode, plan: &Plan<'_>, counters: &Counters, control: Control<'_>) -> Result<Found> {
        let writer = self.writer().filter(|_| mode.writes());
        let dest = self.dest();
        if mode == Mode::Verify {
            // The written pages are clean after the flush; dropping them makes the comparison
            // read what is on the medium, not what we left in memory.
            dest.drop_cache(0, plan.scan_len);
        }
        let scan = Scan {
            source: self.src,
            source_len: plan.source_len,
            dest,
            scan_len: plan.scan_len,
            block_size: plan.block_size,
            threads: plan.threads,
            keep_cache: plan.keep_cache,
            keep_clean: plan.keep_clean,
            action: writer.map_or(Action::Compare, Action::Apply),
            keep_ranges: plan.keep_ranges,
            throttle: plan.throttle,
            trust_changes: mode != Mode::Verify,
        };
        // A snapshot that overflowed while it was read gave garbage: that is a failure, found
        // before the undo log, the point or the delta claims success.
        let scanned = scan.run(counters, control).and_then(|found| {
            if !found.cancelled {
                self.src.check_intact()?;
                if mode == Mode::Compare {
                    dest.check_intact()?;
                }
                if let (Some(hook), Some(_)) = (self.before_commit, writer) {
                    hook()?;
                }
            }
            Ok(found)
        });
        if let Some(w) = writer {
            finish(w, &scanned, self.undo.is_some())?;
        }
        let mut found = scanned?;
        if !found.cancelled && mode != Mode::Verify {
            found.warnings = self.src.warnings(true);
        }
        // The scan dropped what it read of the destination, except stretches with scattered
        // writes: dropping those costs more than the sync of a few changes (`crate::write_behind`).
        Ok(found)
    }

    fn discard_created(&mut self) {
        if let Dest::Write(t) = self.dest {
            t.remove_created();
        }
    }

    fn warnings(&self) -> Vec<String> {
        self.src.warnings(false)
    }

    fn filesystems(&self) -> Vec<crate::endpoint::FsRegion> {
        self.src.filesystems()
    }

    fn strategy(&self) -> String {
        "both ends in this process: bytes are compared directly".to_string()
    }

    fn source_table(&mut self) -> Result<Option<blksync_disk::Table>> {
        if self.undo_at.is_some() || self.undo.is_some() {
            return Ok(None);
        }
        super::table::read(self.src, super::table::sector_hint(self.src.identity(), &self.src.caps()))
    }

    fn target_table(&mut self) -> Option<blksync_disk::Table> {
        let dest: &dyn Source = match &self.dest {
            Dest::Write(t) => t,
            Dest::Read(s) => s,
        };
        let hint = super::table::sector_hint(dest.identity(), &dest.caps());
        super::table::read(&dest, hint).ok().flatten()
    }

    fn write_target(&mut self, writes: &[(u64, Vec<u8>)]) -> Result<()> {
        let Some(t) = self.writer() else { return Ok(()) };
        for (offset, data) in writes {
            t.write_at(data, *offset)?;
        }
        t.flush()
    }

    fn source_caps(&self) -> crate::endpoint::Caps {
        self.src.caps()
    }

    fn undo_log(&self) -> Option<String> {
        self.undo.as_ref().map(|u| u.path().display().to_string())
    }
}

/// Whatever happened, makes what was written durable before anything is said about it. A run
/// that did not complete commits nothing that claims to be complete (a backup point, a delta);
/// an undo log is committed either way: it holds the old content of every block written so far,
/// each recorded before it was overwritten. The scan's own error is reported by the caller;
/// a flush error is returned here only with an undo log, which must be reported first.
fn finish(dst: &dyn Target, scanned: &Result<Found>, undo: bool) -> Result<()> {
    let complete = scanned.as_ref().is_ok_and(|found| !found.cancelled);
    let flushed = if complete { dst.flush() } else { dst.flush_partial() };
    match flushed {
        Err(e) if undo => Err(undo_incomplete(scanned, &e)),
        Err(e) if scanned.is_ok() => Err(e),
        _ => Ok(()),
    }
}

/// Starts `sync --undo PATH`'s log, for a destination going to `new` bytes.
fn begin_undo<'a>(
    path: &Path,
    src: &dyn Source,
    dst: &'a dyn Target,
    new: u64,
    force: bool,
) -> Result<Undo<&'a dyn Target>> {
    crate::delta::check_output_with(path, &[src.identity(), dst.identity()], force)?;
    let comment = format!("undo log of a sync from {}", src.name().display());
    let undo = Undo::new(dst, path.to_path_buf(), comment);
    undo.begin(new).map_err(|e| {
        let text = format!("{e}; the undo log could not be started, so nothing was changed");
        Error::new(e.kind(), text)
    })?;
    Ok(undo)
}

/// The error for an undo log that could not be committed (a full disk, most often), after what
/// the scan did: its records are durable, so the `.partial` file it left rolls the destination
/// back (the error says how).
fn undo_incomplete(scanned: &Result<Found>, e: &Error) -> Error {
    let what = match scanned {
        Ok(found) if !found.cancelled => "the sync completed".to_string(),
        Ok(_) => "the sync was interrupted".to_string(),
        Err(first) => first.to_string(),
    };
    let kind = scanned.as_ref().err().map_or(e.kind(), Error::kind);
    Error::new(kind, format!("{what}; {e}"))
}
