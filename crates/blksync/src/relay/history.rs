//! History commands with remote files: `diff`, `apply`, `merge`, `info`, `list`, `prune`.
//!
//! The rule is to move as little as possible. When every file of a command is on one remote
//! host, that host runs the command (a `Job`) and only progress crosses the network. Otherwise:
//!
//! - `diff`: SRC and BASE on one host run it there (into that session's spool when OUT is
//!   elsewhere, then copied out). Otherwise it is the ordinary remote scan between SRC and BASE;
//!   BASE's peer turns the writes into the records of the delta (`Record`), so only the changed
//!   blocks travel, once. The delta is written on BASE's host and then moved if OUT is elsewhere.
//! - `apply` runs on TARGET's host: deltas from elsewhere are first copied into that session's
//!   spool (`Put`), which the host removes when the session ends.
//! - `merge`: inputs all on one host merge there (and the result is copied out if needed);
//!   otherwise remote inputs are fetched (`Get`) into temporary files here, merged here, and the
//!   result uploaded atomically (`Put`) when OUT is remote.
//!
//! Deltas are compressed already, so files cross the network as they are stored.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::{Commit, Side, connect, follow_job, open, transfer, with_link, with_two_links};
use crate::backup::{Point, PruneSummary};
use crate::endpoint::Identity;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::job::{Job, WirePath};
use crate::link::Link;
use crate::location::Location;
use crate::patch::{ApplySummary, DiffOptions, DiffSummary, Info};
use crate::progress::{Control, Counters, Phase};
use crate::protocol::Msg;
use crate::protocol::message::{Role, open_flags};

/// Bytes per `Write` of an upload.
const PIECE: usize = 1 << 20;

/// Whether two sides are on the same host, reached the same way.
pub(crate) fn same_host(a: &Side<'_>, b: &Side<'_>) -> bool {
    match (a.location, b.location) {
        (Location::Local(_), Location::Local(_)) => true,
        (Location::Remote(x), Location::Remote(y)) => {
            (&x.user, &x.host, x.port) == (&y.user, &y.host, y.port) && a.ssh == b.ssh
        }
        _ => false,
    }
}

/// The path of a side, on its host.
pub(crate) fn path_of<'a>(side: &Side<'a>) -> &'a Path {
    match side.location {
        Location::Local(p) => p,
        Location::Remote(r) => &r.path,
    }
}

/// `host:path` for a remote side, the path for a local one.
pub(crate) fn shown(side: &Side<'_>, path: &Path) -> String {
    match side.location {
        Location::Local(_) => path.display().to_string(),
        Location::Remote(r) => format!("{}:{}", r.destination(), path.display()),
    }
}

/// Refuses a local output that must not be replaced before any remote work starts (a remote
/// one is checked by its peer).
fn check_local_output(output: &Side<'_>, inputs: &[&Side<'_>]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let identity = |side: &&Side<'_>| match side.location {
        Location::Local(p) => std::fs::metadata(p).ok().map(|m| Identity::File { dev: m.dev(), ino: m.ino() }),
        Location::Remote(_) => None,
    };
    let inputs: Vec<Identity> = inputs.iter().filter_map(identity).collect();
    match output.location {
        Location::Local(path) => crate::delta::check_output(path, &inputs),
        Location::Remote(_) => Ok(()),
    }
}

/// Runs `job` on the link's host, relaying its progress; returns its result document.
fn run_job<T: DeserializeOwned>(link: &mut Link, job: &Job, control: Control<'_>) -> Result<T> {
    match follow_job(link, Msg::Job { request: job.encode() }, control)? {
        (Msg::JobDone { result }, _) => crate::job::result(&result),
        (other, _) => Err(link.unexpected(&other)),
    }
}

/// Connects to `side`'s host, runs `job` there, and closes.
fn job_at<T: DeserializeOwned>(side: &Side<'_>, job: &Job, control: Control<'_>) -> Result<T> {
    job_counted(side, job, control).map(|(result, _)| result)
}

/// [`job_at`], also returning the bytes sent and received.
pub(crate) fn job_counted<T: DeserializeOwned>(
    side: &Side<'_>,
    job: &Job,
    control: Control<'_>,
) -> Result<(T, (u64, u64))> {
    with_link(side, control, |link, _| {
        control.observer.note(&format!(
            "strategy: every path is on {}: the command runs there, and only progress and the result cross the network",
            link.name
        ));
        run_job(link, job, control)
    })
}

/// Progress and Ctrl-C for copying a whole file.
struct Copying<'a> {
    control: Control<'a>,
    counters: Counters,
    what: &'a Path,
}

impl<'a> Copying<'a> {
    fn start(control: Control<'a>, size: u64, what: &'a Path) -> Copying<'a> {
        let counters = Counters::new();
        counters.set_total(size);
        control.observer.phase(Phase::Sync, size);
        Copying { control, counters, what }
    }

    /// `n` more bytes copied; an error once the user asked to stop.
    fn step(&self, n: u64) -> Result<()> {
        self.counters.add_scanned(n);
        self.counters.add_written(n);
        self.control.observer.progress(&self.counters.snapshot());
        if self.control.cancelled() {
            return Err(Error::new(
                ErrorKind::Interrupted,
                format!("interrupted while copying {}; nothing was written", self.what.display()),
            ));
        }
        Ok(())
    }
}

/// A name for a temporary file of this process in `$TMPDIR`, removed when dropped. The name is
/// random (others share `/tmp`); the file itself is made by a rename onto it, which replaces,
/// and never follows, whatever was planted there.
struct Temp(PathBuf);

impl Temp {
    fn new(what: &str) -> Result<Temp> {
        let mut random = [0u8; 8];
        crate::temp::fill_random(&mut random)?;
        let random = u64::from_le_bytes(random);
        Ok(Temp(std::env::temp_dir().join(format!("blksync-{}-{random:016x}.{what}", std::process::id()))))
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Downloads `remote` from the link's host into `local`: written under a temporary name,
/// flushed, then renamed, so `local` is never a partial file.
pub(crate) fn fetch(link: &mut Link, remote: &Path, local: &Path, control: Control<'_>) -> Result<()> {
    crate::delta::check_output(local, &[])?;
    let (file, tmp) = crate::temp::create(local, 0o600)?;
    let result = fetch_into(link, remote, &file, &tmp, control).and_then(|()| crate::temp::commit(&tmp, local));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn fetch_into(link: &mut Link, remote: &Path, file: &File, local: &Path, control: Control<'_>) -> Result<()> {
    let request = Msg::Get { path: remote.as_os_str().as_bytes().to_vec(), compress: crate::compress::OFF };
    let size = match link.call(request)? {
        Msg::Opened { size, .. } => size,
        other => return Err(link.unexpected(&other)),
    };
    let progress = Copying::start(control, size, remote);
    let mut got = 0;
    loop {
        match link.recv()? {
            Msg::Data(chunk) if chunk.offset == got => {
                let data = crate::compress::decode(&chunk)?;
                file.write_all_at(&data, chunk.offset)
                    .map_err(|e| Error::io("writing", local, Some(chunk.offset), e))?;
                got += data.len() as u64;
                progress.step(data.len() as u64)?;
            }
            Msg::Done if got == size => break,
            other => return Err(link.unexpected(&other)),
        }
    }
    file.sync_all().on("flushing", local)
}

/// Uploads the local file `local` to `remote` on the link's host (`None`: into the session's
/// spool); returns where it went. The file appears there only once complete.
fn put(link: &mut Link, local: &Path, remote: Option<&Path>, control: Control<'_>) -> Result<PathBuf> {
    let file = File::open(local).on("opening", local)?;
    let size = file.metadata().on("reading the size of", local)?.len();
    let request = Msg::Put { path: remote.map(|p| p.as_os_str().as_bytes().to_vec()).unwrap_or_default(), mode: 0o644 };
    let path = match link.call(request)? {
        Msg::Path { path } => PathBuf::from(OsStr::from_bytes(&path)),
        other => return Err(link.unexpected(&other)),
    };
    let progress = Copying::start(control, size, local);
    let mut buf = crate::buffer::Aligned::new(PIECE);
    let mut offset = 0;
    while offset < size {
        let n = (size - offset).min(PIECE as u64) as usize;
        file.read_exact_at(&mut buf[..n], offset).map_err(|e| Error::io("reading", local, Some(offset), e))?;
        progress.step(n as u64)?;
        let chunk = crate::protocol::message::Chunk {
            offset,
            codec: crate::protocol::message::codec::RAW,
            raw_len: n as u32,
            payload: buf[..n].to_vec(),
        };
        link.send(Msg::Write(chunk))?;
        offset += n as u64;
    }
    match link.call(Msg::Flush)? {
        Msg::Done => Ok(path),
        other => Err(link.unexpected(&other)),
    }
}

/// Local copies of the deltas at `sides`, in order: the file itself when local, else a
/// temporary download. Files on one host come over one connection.
fn local_copies(sides: &[&Side<'_>], temps: &mut Vec<Temp>, control: Control<'_>) -> Result<Vec<PathBuf>> {
    let mut links: Vec<(&Side<'_>, Link)> = Vec::new();
    let mut copies = Vec::new();
    let mut fetch_all = || -> Result<()> {
        for &side in sides {
            let Location::Remote(r) = side.location else {
                copies.push(path_of(side).to_path_buf());
                continue;
            };
            let i = if let Some(i) = links.iter().position(|(s, _)| same_host(s, side)) {
                i
            } else {
                links.push((side, connect(side)?.0));
                links.len() - 1
            };
            let link = &mut links[i].1;
            let temp = Temp::new("delta")?;
            fetch(link, &r.path, &temp.0, control)?;
            copies.push(temp.0.clone());
            temps.push(temp);
        }
        Ok(())
    };
    let result = fetch_all();
    for (_, link) in links {
        link.report(control.observer);
        link.close();
    }
    result.map(|()| copies)
}

/// `blksync info` of a delta anywhere.
pub fn info_location(side: &Side<'_>, control: Control<'_>) -> Result<Info> {
    match side.location {
        Location::Local(p) => crate::patch::info(p),
        Location::Remote(r) => {
            let mut info: Info = job_at(side, &Job::Info { path: WirePath::new(&r.path) }, control)?;
            info.path = shown(side, &r.path);
            Ok(info)
        }
    }
}

/// `blksync list` of a backup chain anywhere.
pub fn list_location(side: &Side<'_>, verify: bool, control: Control<'_>) -> Result<Vec<Point>> {
    match side.location {
        Location::Local(p) => crate::backup::list(p, verify),
        Location::Remote(r) => {
            let job = Job::List { dir: WirePath::new(&r.path), verify };
            let mut points: Vec<Point> = job_at(side, &job, control)?;
            for p in &mut points {
                p.file = shown(side, Path::new(&p.file));
            }
            Ok(points)
        }
    }
}

/// `blksync prune` of a backup chain anywhere: it runs where the chain is.
pub fn prune_location(side: &Side<'_>, keep: u64, options: &DiffOptions, control: Control<'_>) -> Result<PruneSummary> {
    match side.location {
        Location::Local(p) => crate::backup::prune(p, keep, options, control),
        Location::Remote(r) => {
            let job = Job::Prune { dir: WirePath::new(&r.path), keep, options: options.clone() };
            job_at(side, &job, control)
        }
    }
}

/// `blksync merge` of deltas anywhere into `output` anywhere.
pub fn merge_locations(inputs: &[Side<'_>], output: &Side<'_>, control: Control<'_>) -> Result<Info> {
    check_local_output(output, &inputs.iter().collect::<Vec<_>>())?;
    if inputs.iter().all(|i| same_host(i, output)) {
        let paths: Vec<&Path> = inputs.iter().map(|i| path_of(i)).collect();
        return match output.location {
            Location::Local(out) => crate::patch::merge(&paths, out, control),
            Location::Remote(r) => {
                let job = Job::Merge {
                    inputs: paths.iter().map(|p| WirePath::new(p)).collect(),
                    output: WirePath::new(&r.path),
                };
                let mut info: Info = job_at(output, &job, control)?;
                info.path = shown(output, &r.path);
                Ok(info)
            }
        };
    }
    if let Some(first) = inputs.first()
        && matches!(first.location, Location::Remote(_))
        && inputs.iter().all(|i| same_host(i, first))
    {
        // All inputs on one host: merge there into its spool, then copy the result out.
        let job = Job::Merge {
            inputs: inputs.iter().map(|i| WirePath::new(path_of(i))).collect(),
            output: WirePath(PathBuf::new()),
        };
        return job_then_move(first, &job, output, control, |i: &mut Info| &mut i.path);
    }
    let mut temps = Vec::new();
    let local = local_copies(&inputs.iter().collect::<Vec<_>>(), &mut temps, control)?;
    let local: Vec<&Path> = local.iter().map(PathBuf::as_path).collect();
    match output.location {
        Location::Local(out) => crate::patch::merge(&local, out, control),
        Location::Remote(r) => {
            let temp = Temp::new("delta")?;
            let mut info = crate::patch::merge(&local, &temp.0, control)?;
            with_link(output, control, |link, _| put(link, &temp.0, Some(&r.path), control))?;
            info.path = shown(output, &r.path);
            Ok(info)
        }
    }
}

/// `blksync apply` of deltas anywhere onto `target` anywhere; it runs on the target's host.
pub fn apply_locations(
    deltas: &[Side<'_>],
    target: &Side<'_>,
    force: bool,
    control: Control<'_>,
) -> Result<ApplySummary> {
    let mut temps = Vec::new();
    let Location::Remote(r) = target.location else {
        let local = local_copies(&deltas.iter().collect::<Vec<_>>(), &mut temps, control)?;
        let local: Vec<&Path> = local.iter().map(PathBuf::as_path).collect();
        let mut summary = crate::patch::apply(&local, path_of(target), force, control)?;
        summary.deltas = deltas.iter().map(|d| shown(d, path_of(d))).collect();
        return Ok(summary);
    };
    with_link(target, control, |link, _| {
        let elsewhere: Vec<&Side<'_>> = deltas.iter().filter(|d| !same_host(d, target)).collect();
        let mut copies = local_copies(&elsewhere, &mut temps, control)?.into_iter();
        let mut there = Vec::new();
        let mut spooled = Vec::new();
        for d in deltas {
            if same_host(d, target) {
                there.push(WirePath::new(path_of(d)));
            } else {
                let local = copies.next().ok_or_else(|| Error::protocol("a delta copy is missing"))?;
                let path = put(link, &local, None, control)?;
                spooled.push((path.display().to_string(), shown(d, path_of(d))));
                there.push(WirePath(path));
            }
        }
        let job = Job::Apply { deltas: there, target: WirePath::new(&r.path), force };
        let mut summary: ApplySummary = run_job(link, &job, control).map_err(|e| {
            // Name the user's file, not its copy in the spool.
            let text = spooled.iter().fold(e.to_string(), |t, (copy, name)| t.replace(copy, name));
            Error::new(e.kind(), text)
        })?;
        summary.target = shown(target, &r.path);
        summary.deltas = deltas.iter().map(|d| shown(d, path_of(d))).collect();
        Ok(summary)
    })
    .map(|(summary, _)| summary)
}

/// `blksync diff SRC BASE -o OUT` with any of them remote.
pub fn diff_locations(
    source: &Side<'_>,
    base: &Side<'_>,
    output: &Side<'_>,
    options: &DiffOptions,
    control: Control<'_>,
) -> Result<DiffSummary> {
    check_local_output(output, &[source, base])?;
    if same_host(source, base) && same_host(base, output) {
        return match output.location {
            Location::Local(out) => crate::patch::diff(path_of(source), path_of(base), out, options, control),
            Location::Remote(r) => {
                let job = Job::Diff {
                    source: WirePath::new(path_of(source)),
                    base: WirePath::new(path_of(base)),
                    output: WirePath::new(&r.path),
                    options: options.clone(),
                };
                let mut summary: DiffSummary = job_at(output, &job, control)?;
                summary.delta = shown(output, &r.path);
                Ok(summary)
            }
        };
    }
    if same_host(source, base) && matches!(base.location, Location::Remote(_)) {
        // SRC and BASE on one host: diff there into its spool, then copy the delta out.
        let job = Job::Diff {
            source: WirePath::new(path_of(source)),
            base: WirePath::new(path_of(base)),
            output: WirePath(PathBuf::new()),
            options: options.clone(),
        };
        return job_then_move(base, &job, output, control, |d: &mut DiffSummary| &mut d.delta);
    }
    with_two_links(source, base, control, |s, s_path, b, b_path| {
        diff_over(s, s_path, source, b, b_path, base, output, options, control)
    })
    .map(|(mut summary, (sent, received))| {
        (summary.bytes_sent, summary.bytes_received) = (sent, received);
        summary
    })
}

/// The remote scan of a diff, the delta written at BASE's end, then moved to OUT.
#[allow(clippy::too_many_arguments)] // Three sides and how to run.
fn diff_over(
    s: &mut Link,
    s_path: &OsStr,
    source: &Side<'_>,
    b: &mut Link,
    b_path: &OsStr,
    base: &Side<'_>,
    output: &Side<'_>,
    options: &DiffOptions,
    control: Control<'_>,
) -> Result<DiffSummary> {
    let cache = if options.keep_cache { open_flags::KEEP_CACHE } else { 0 };
    let fs_aware = if options.fs_aware { open_flags::FS_AWARE } else { 0 };
    let so = open(s, Role::Source, cache | fs_aware, s_path, (b"", None, 0), None)?;
    let mut bo = open(b, Role::Target, cache | open_flags::READ_ONLY, b_path, (b"", None, 0), None)?;
    if !bo.exists {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("{}: no such file or device", shown(base, Path::new(b_path))),
        ));
    }
    // A delta records any size change, whatever BASE is.
    bo.caps.resizable = true;
    let here = same_host(base, output).then(|| path_of(output));
    let source_name = shown(source, Path::new(s_path));
    let request = Msg::Record {
        path: here.map(|p| p.as_os_str().as_bytes().to_vec()).unwrap_or_default(),
        comment: options.comment.as_bytes().to_vec(),
        source: source_name.as_bytes().to_vec(),
        block: options.block_size as u32,
    };
    let written = match b.call(request)? {
        Msg::Path { path } => PathBuf::from(OsStr::from_bytes(&path)),
        other => return Err(b.unexpected(&other)),
    };
    let remote = super::RemoteOptions {
        sync: crate::patch::recording(options),
        compress: crate::compress::AUTO,
        pause: None,
        undo: None,
    };
    let names = (source_name, shown(base, Path::new(b_path)));
    let summary = transfer(s, (so, bo, (None, None)), b, names, Commit::Point, &remote, control)?;
    let info: Info = run_job(b, &Job::Info { path: WirePath::new(&written) }, control)?;
    if here.is_none() {
        move_out(b, &written, output, control)?;
    }
    Ok(DiffSummary {
        delta: shown(output, path_of(output)),
        header: info.header,
        counters: summary.counters,
        file_size: info.file_size,
        bytes_sent: 0,
        bytes_received: 0,
    })
}

/// Runs `job` at `side`, which writes a file into its spool and names it in the result (the
/// field that `file` picks), then moves that file to `output`.
fn job_then_move<T: DeserializeOwned>(
    side: &Side<'_>,
    job: &Job,
    output: &Side<'_>,
    control: Control<'_>,
    file: impl Fn(&mut T) -> &mut String,
) -> Result<T> {
    with_link(side, control, |link, _| {
        let mut result = run_job::<T>(link, job, control)?;
        let spooled = PathBuf::from(std::mem::take(file(&mut result)));
        move_out(link, &spooled, output, control)?;
        *file(&mut result) = shown(output, path_of(output));
        Ok(result)
    })
    .map(|(result, _)| result)
}

/// Moves the file `from` on the link's host (a spool file) to `to`, on another host.
fn move_out(link: &mut Link, from: &Path, to: &Side<'_>, control: Control<'_>) -> Result<()> {
    match to.location {
        Location::Local(path) => fetch(link, from, path, control),
        Location::Remote(r) => {
            let temp = Temp::new("delta")?;
            fetch(link, from, &temp.0, control)?;
            with_link(to, control, |out, _| put(out, &temp.0, Some(&r.path), control)).map(|_| ())
        }
    }
}
