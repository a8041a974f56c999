//! What the binary prints, and what happens when it cannot print: failing output streams,
//! `--at` errors, hints, and the format of progress lines. Every test runs the real binary on
//! real files.

mod support;

use std::fs::File;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use support::*;
use tempfile::TempDir;

/// Where a stream of the child goes.
#[derive(Clone, Copy, Debug)]
enum Sink {
    /// `/dev/full`: every write fails with ENOSPC.
    Full,
    /// A pipe whose read end was closed before the child started: every write fails with EPIPE.
    ClosedPipe,
}

impl Sink {
    fn stdio(self) -> Stdio {
        match self {
            Sink::Full => Stdio::from(File::options().write(true).open("/dev/full").unwrap()),
            Sink::ClosedPipe => {
                // The write end of `true`'s stdin: once `true` has exited, nobody holds the read
                // end (Rust opens pipes close-on-exec), so every write fails with EPIPE.
                let mut reader = Command::new("true").stdin(Stdio::piped()).spawn().unwrap();
                let writer = reader.stdin.take().unwrap();
                reader.wait().unwrap();
                Stdio::from(writer)
            }
        }
    }
}

/// A directory with two images that differ, a backup chain of both and a delta between them.
struct Fixture {
    dir: TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = TempDir::new().unwrap();
        let a = dir.path().join("a.img");
        write_file(&a, &random_bytes(1 << 20, 1));
        let mut b = random_bytes(1 << 20, 1);
        b[70_000] ^= 1;
        b[900_000] ^= 1;
        write_file(&dir.path().join("b.img"), &b);
        let f = Fixture { dir };
        ok(&["backup", &f.path("a.img"), &f.path("bk"), "-q"]);
        ok(&["backup", &f.path("b.img"), &f.path("bk"), "-q"]);
        ok(&["diff", &f.path("b.img"), &f.path("a.img"), "-o", &f.path("d.delta"), "-q"]);
        f
    }

    fn path(&self, name: &str) -> String {
        arg(self.dir.path(), name)
    }

    /// The commands that print a result on stdout, each with its normal exit code.
    fn printing_commands(&self) -> Vec<(Vec<String>, i32)> {
        let s = |v: &[&str]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        vec![
            (s(&["list", &self.path("bk")]), 0),
            (s(&["list", &self.path("bk"), "--json"]), 0),
            (s(&["info", &self.path("d.delta")]), 0),
            (s(&["info", &self.path("d.delta"), "--json"]), 0),
            (s(&["compare", &self.path("a.img"), &self.path("b.img")]), 1),
            (s(&["compare", &self.path("a.img"), &self.path("a.img")]), 0),
            (s(&["compare", &self.path("a.img"), &self.path("b.img"), "--json"]), 1),
            (s(&["sync", &self.path("a.img"), &self.path("copy.img"), "--json"]), 0),
        ]
    }
}

fn run_with(args: &[String], stdout: Stdio, stderr: Stdio) -> Output {
    blksync().args(args).stdin(Stdio::null()).stdout(stdout).stderr(stderr).output().unwrap()
}

#[track_caller]
fn assert_no_panic(args: &[String], out: &Output) {
    assert_ne!(out.code(), 101, "blksync {args:?} panicked:\n{}", out.stderr_text());
    assert!(!out.stderr_text().contains("panicked"), "blksync {args:?}:\n{}", out.stderr_text());
}

#[test]
fn stdout_closed_by_its_reader_exits_quietly_with_the_commands_code() {
    let f = Fixture::new();
    for (args, code) in f.printing_commands() {
        let out = run_with(&args, Sink::ClosedPipe.stdio(), Stdio::piped());
        assert_no_panic(&args, &out);
        assert_eq!(out.code(), code, "blksync {args:?}:\n{}", out.stderr_text());
        assert!(!out.stderr_text().contains("error"), "blksync {args:?}:\n{}", out.stderr_text());
    }
}

#[test]
fn stdout_on_a_full_disk_is_a_write_error_not_a_panic() {
    let f = Fixture::new();
    for (args, _) in f.printing_commands() {
        let out = run_with(&args, Sink::Full.stdio(), Stdio::piped());
        assert_no_panic(&args, &out);
        // The result was the output and it is lost: exit 4 (no space), compare 2 (as cmp).
        let expected = if args[0] == "compare" { 2 } else { 4 };
        assert_eq!(out.code(), expected, "blksync {args:?}:\n{}", out.stderr_text());
        let err = out.stderr_text();
        assert!(err.contains("writing standard output: No space left on device"), "{args:?}: {err}");
        if args[0] == "sync" {
            assert!(err.contains("the sync completed, but its JSON summary could not be printed"), "{err}");
        }
    }
    // The sync itself was done; only its summary was lost.
    assert_same(Path::new(&f.path("a.img")), Path::new(&f.path("copy.img")));
}

#[test]
fn stderr_failing_loses_only_the_display() {
    let f = Fixture::new();
    for sink in [Sink::Full, Sink::ClosedPipe] {
        let mut commands = f.printing_commands();
        commands
            .push((["sync", &f.path("b.img"), &f.path("copy2.img"), "--progress=plain"].map(String::from).to_vec(), 0));
        commands
            .push((["sync", &f.path("a.img"), &f.path("copy2.img"), "--progress=bar"].map(String::from).to_vec(), 0));
        for (args, code) in commands {
            let out = run_with(&args, Stdio::piped(), sink.stdio());
            assert_eq!(out.code(), code, "blksync {args:?} with stderr to {sink:?}");
        }
        // An error whose message cannot be shown still has its exit code.
        let missing = ["info".to_string(), f.path("missing.delta")];
        assert_eq!(run_with(&missing, Stdio::piped(), sink.stdio()).code(), 3, "{sink:?}");
    }
    assert_same(Path::new(&f.path("a.img")), Path::new(&f.path("copy2.img")));
}

#[test]
fn help_to_a_full_disk_or_closed_pipe_does_not_panic() {
    for sink in [Sink::Full, Sink::ClosedPipe] {
        let args = ["--help".to_string()];
        let out = run_with(&args, sink.stdio(), Stdio::piped());
        assert_no_panic(&args, &out);
    }
}

#[test]
fn restore_at_empty_is_a_usage_error_not_midnight() {
    let f = Fixture::new();
    for at in ["", "  "] {
        let out = run(&["restore", &f.path("bk"), &f.path("out.img"), "--at", at]);
        assert_eq!(out.code(), 2, "--at {at:?}: {}", out.stderr_text());
        assert!(out.stderr_text().contains("--at is empty"), "{}", out.stderr_text());
        assert!(!Path::new(&f.path("out.img")).exists());
    }
}

#[test]
fn restore_at_a_missing_point_exits_2_with_the_time_and_the_points_there_are() {
    let f = Fixture::new();
    let out = run(&["restore", &f.path("bk"), &f.path("out.img"), "--at", "7"]);
    assert_eq!(out.code(), 2, "{}", out.stderr_text());
    let err = out.stderr_text();
    assert!(err.contains("has no point 7; it has 2 points, 0 (20"), "{err}");
    assert!(err.contains(") to 1 (20"), "{err}");
    // A time before the first point: the message shows what the time was read as.
    let out = run(&["restore", &f.path("bk"), &f.path("out.img"), "--at", "1999-01-01 12:00"]);
    assert_eq!(out.code(), 2, "{}", out.stderr_text());
    let err = out.stderr_text();
    assert!(err.contains("has no point at or before 1999-01-01 12:00:00"), "{err}");
    assert!(err.contains("it has 2 points, 0 (20"), "{err}");
    // Neither a number nor a time.
    let out = run(&["restore", &f.path("bk"), &f.path("out.img"), "--at", "not a time"]);
    assert_eq!(out.code(), 2, "{}", out.stderr_text());
    assert!(!Path::new(&f.path("out.img")).exists());
    // A good one still works, by number and by time.
    ok(&["restore", &f.path("bk"), &f.path("out.img"), "--at", "0", "-q"]);
    assert_same(Path::new(&f.path("a.img")), Path::new(&f.path("out.img")));
    ok(&["restore", &f.path("bk"), &f.path("out.img"), "--at", "tomorrow", "-q"]);
    assert_same(Path::new(&f.path("b.img")), Path::new(&f.path("out.img")));
}

/// The long options `--help` of `command` lists.
fn options_of(command: &str) -> Vec<String> {
    let help = ok(&[command, "--help"]).stdout_text();
    let mut options: Vec<String> = help
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_string)
        .collect();
    options.sort();
    options.dedup();
    options
}

/// Asserts that every `--flag` named in `text` is an option of `command`.
#[track_caller]
fn assert_hints_are_options_of(command: &str, text: &str) {
    let options = options_of(command);
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
        if word.starts_with("--") && word.len() > 2 {
            assert!(options.iter().any(|o| o == word), "{command} has no {word}, but its message names it: {text}");
        }
    }
}

#[test]
fn restore_onto_a_device_of_another_size_names_no_sync_only_flags() {
    if !can_use_loop_devices() {
        return;
    }
    let f = Fixture::new();
    for (size, code) in [(512 << 10, 5), (2 << 20, 0)] {
        let backing = f.dir.path().join(format!("backing-{size}"));
        write_file(&backing, &random_bytes(size, 5));
        let lo = Loop::attach(&backing);
        let out = run(&["restore", &f.path("bk"), lo.path()]);
        assert_eq!(out.code(), code, "{}", out.stderr_text());
        let err = out.stderr_text();
        assert!(err.contains("too small") || err.contains("left as they are"), "{err}");
        assert_hints_are_options_of("restore", &err);
        // sync reaches the same messages and does have the flags: it still names them.
        let out = run(&["sync", &f.path("b.img"), lo.path()]);
        assert_eq!(out.code(), code, "{}", out.stderr_text());
        let err = out.stderr_text();
        assert!(err.contains("--common-size") || err.contains("--zero-tail"), "{err}");
        assert_hints_are_options_of("sync", &err);
    }
}

/// Bytes a size as printed stands for (`512 B`, `4.0 KiB`), or `None` if it is not one.
fn size_value(text: &str) -> Option<f64> {
    let (number, unit) = text.split_once(' ')?;
    let shift = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"].iter().position(|u| *u == unit)?;
    let decimals = number.split_once('.').map_or(0, |(_, d)| d.len());
    // One format everywhere: whole bytes, or one decimal in a binary unit.
    if (shift == 0 && decimals != 0) || (shift > 0 && decimals != 1) {
        return None;
    }
    Some(number.parse::<f64>().ok()? * 1024f64.powi(i32::try_from(shift).ok()?))
}

/// Checks one `--progress=plain` line of `label` and returns (done, written) in bytes.
#[track_caller]
fn check_plain_line(line: &str, label: &str) -> (f64, f64) {
    let rest = line.strip_prefix(&format!("blksync: {label} ")).unwrap_or_else(|| panic!("not {label}: {line:?}"));
    let parts: Vec<&str> = rest.split(", ").collect();
    assert_eq!(parts.len(), 6, "{line:?}");
    let (done, rest) = parts[0].split_once(" / ").unwrap_or_else(|| panic!("{line:?}"));
    let (total, percent) = rest.split_once(" (").unwrap_or_else(|| panic!("{line:?}"));
    assert!(percent.ends_with("%)"), "{line:?}");
    let value = |s: &str| size_value(s).unwrap_or_else(|| panic!("{s:?} is not a size in {line:?}"));
    let (done, _) = (value(done), value(total));
    let field = |i: usize, name: &str| {
        let text = parts[i].strip_prefix(name).unwrap_or_else(|| panic!("no {name:?} in {line:?}"));
        value(text)
    };
    field(1, "differing ");
    let written = field(2, "written ");
    field(3, "zeroed ");
    value(parts[4].strip_suffix("/s").unwrap_or_else(|| panic!("no rate in {line:?}")));
    // ETA as a clock (m:ss or h:mm:ss), not raw seconds.
    let eta = parts[5].strip_prefix("ETA ").unwrap_or_else(|| panic!("no ETA in {line:?}"));
    let fields: Vec<&str> = eta.split(':').collect();
    assert!(
        (2..=3).contains(&fields.len())
            && fields.iter().all(|f| !f.is_empty() && f.chars().all(|c| c.is_ascii_digit()))
            && fields[1..].iter().all(|f| f.len() == 2),
        "ETA {eta:?} is not m:ss in {line:?}"
    );
    assert!(written <= done, "written is more than scanned: {line:?}");
    (done, written)
}

/// Runs a command slowed down by --bwlimit past the first plain progress line (after 5 s) and
/// returns its progress lines.
fn plain_progress(args: &[&str]) -> (Vec<String>, String) {
    let out = ok(args);
    let err = out.stderr_text();
    let lines = err.lines().filter(|l| l.contains(" ETA ")).map(str::to_string).collect::<Vec<_>>();
    assert!(!lines.is_empty(), "no progress line: {err}");
    (lines, err)
}

#[test]
fn plain_progress_of_a_sync_has_one_size_format_and_a_clock_eta() {
    let d = TempDir::new().unwrap();
    write_file(&d.path().join("src"), &random_bytes(7 << 20, 40));
    let (src, dst) = (arg(d.path(), "src"), arg(d.path(), "dst"));
    let (lines, err) = plain_progress(&["sync", &src, &dst, "--progress=plain", "--bwlimit", "1M"]);
    for line in &lines {
        check_plain_line(line, "sync");
    }
    // The summary: one range, singular.
    assert!(err.contains("7.0 MiB differing in 1 range;"), "{err}");
    assert_same(Path::new(&src), Path::new(&dst));
}

#[test]
fn plain_progress_of_a_backup_is_labelled_backup_not_compare() {
    let d = TempDir::new().unwrap();
    let src = arg(d.path(), "src");
    let bk = arg(d.path(), "bk");
    write_file(src.as_ref(), &random_bytes(7 << 20, 41));
    ok(&["backup", "-q", &src, &bk]);
    patch(src.as_ref(), 5_000_000, b"changed");
    let (lines, err) = plain_progress(&["backup", &src, &bk, "--progress=plain", "--bwlimit", "1M"]);
    for line in &lines {
        check_plain_line(line, "backup");
    }
    assert!(!err.contains("compare"), "{err}");
}

#[test]
fn counts_of_one_are_singular_in_summaries() {
    let f = Fixture::new();
    std::fs::copy(f.path("a.img"), f.path("t.img")).unwrap();
    let out = ok(&["apply", &f.path("d.delta"), &f.path("t.img")]);
    assert!(out.stderr_text().contains("applied 1 delta to"), "{}", out.stderr_text());
    let out = ok(&["merge", &f.path("d.delta"), "-o", &f.path("m.delta")]);
    assert!(out.stderr_text().contains("merged 1 delta into"), "{}", out.stderr_text());
    let out = ok(&["prune", "--keep", "0", &f.path("bk")]);
    assert!(out.stderr_text().contains("folded 1 increment into"), "{}", out.stderr_text());
    let mut one = random_bytes(1 << 20, 1);
    one[5] ^= 1;
    write_file(&f.dir.path().join("one.img"), &one);
    let out = run(&["compare", &f.path("a.img"), &f.path("one.img")]);
    assert!(out.stdout_text().contains(" in 1 range\n"), "{}", out.stdout_text());
}

/// `-v` says what was opened and what it can do, which strategy ran and where, and how long
/// each phase took, on stderr (issue 13, item 9); without it none of that shows, and `-q -v`
/// contradict each other.
#[test]
fn verbose_says_what_was_opened_the_strategy_and_how_long_each_phase_took() {
    let dir = tempfile::tempdir().unwrap();
    let src = arg(dir.path(), "a.img");
    let dst = arg(dir.path(), "b.img");
    write_file(Path::new(&src), &random_bytes(4 << 20, 3));
    let out = ok(&["sync", "-v", "--verify", "--progress=none", &src, &dst]);
    let err = out.stderr_text();
    assert!(err.contains(&format!("blksync: source {src}: 4.0 MiB, resizable, holes")), "{err}");
    assert!(err.contains(&format!("blksync: destination {dst}: ")) && err.contains(", created, "), "{err}");
    assert!(err.contains("blksync: strategy: both ends in this process"), "{err}");
    assert!(err.contains("blksync: sync took ") && err.contains("blksync: verify took "), "{err}");
    assert!(out.stdout.is_empty() || !out.stdout_text().contains("strategy"), "notes go to stderr");
    let quiet = ok(&["sync", "--progress=none", &src, &dst]);
    assert!(!quiet.stderr_text().contains("strategy"), "{}", quiet.stderr_text());
    assert_eq!(run(&["sync", "-q", "-v", &src, &dst]).code(), 2);

    let Some(remote) = RemoteDir::new("blksync-verbose-") else { return };
    write_file(Path::new(&remote.path("a.img")), &random_bytes(1 << 20, 4));
    let out = ok(&["sync", "-v", "-e", &remote.rsh, &remote.remote("a.img"), &dst]);
    let err = out.stderr_text();
    assert!(err.contains("strategy: the hash pass") && err.contains("source is on root@127.0.0.1"), "{err}");
    let out = ok(&["sync", "-v", "-e", &remote.rsh, &remote.remote("a.img"), &remote.remote("c.img")]);
    assert!(out.stderr_text().contains("every path is on root@127.0.0.1"), "{}", out.stderr_text());
}
