//! Guard rails: what blksync refuses before it reads or writes a byte, and how it stops.
//!
//! Each test is named after what went wrong before (issue 8): a merge that destroyed its input
//! or fit no image, two writers mixing one file, a FIFO that hung the run, a loop device synced
//! onto its own backing file, a typo under /dev that became a file in RAM.

mod support;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;
use tempfile::TempDir;

const MIB: usize = 1 << 20;

fn tmp() -> TempDir {
    tempfile::Builder::new().prefix("blksync-guards").tempdir().unwrap()
}

/// Polls `done` (an event we cannot wait on directly) every few milliseconds, for a minute at
/// most.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for `child` to exit within `limit`; kills it and fails if it does not (it blocked).
fn exits_within(mut child: Child, limit: Duration, what: &str) -> std::process::Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn spawn(args: &[&str]) -> Child {
    blksync().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

fn signal(child: &Child, name: &str) {
    let sent = Command::new("kill").args(["-s", name, &child.id().to_string()]).status().unwrap();
    assert!(sent.success());
}

fn header_of(delta: &str) -> serde_json::Value {
    ok(&["info", "--json", delta]).json()["header"].clone()
}

// ---- merge (issue 8, item 4) ----

#[test]
fn merge_onto_one_of_its_inputs_is_refused_and_the_input_survives() {
    let d = tmp();
    let (base, v1, v2) = (arg(d.path(), "base"), arg(d.path(), "v1"), arg(d.path(), "v2"));
    let (a, b) = (arg(d.path(), "a.delta"), arg(d.path(), "b.delta"));
    let mut data = random_bytes(MIB, 1);
    write_file(base.as_ref(), &data);
    data[1000..5000].copy_from_slice(&random_bytes(4000, 2));
    write_file(v1.as_ref(), &data);
    data[9000..20000].copy_from_slice(&random_bytes(11000, 3));
    write_file(v2.as_ref(), &data);
    ok(&["diff", "-q", &v1, &base, "-o", &a]);
    ok(&["diff", "-q", &v2, &v1, "-o", &b]);
    for out in [&a, &b] {
        let before = read(out.as_ref());
        let run = run(&["merge", "-q", &a, &b, "-o", out]);
        assert_eq!(run.code(), 2, "merge -o {out}: {}", run.stderr_text());
        assert!(run.stderr_text().contains("also an input"), "{}", run.stderr_text());
        assert!(read(out.as_ref()) == before, "merge -o {out} changed its input");
    }
    assert!(temporary_files(d.path()).is_empty());
}

#[test]
fn merge_of_deltas_that_do_not_follow_each_other_is_refused() {
    let d = tmp();
    let (img, chain, m) = (arg(d.path(), "img"), arg(d.path(), "chain"), arg(d.path(), "m.delta"));
    let mut data = random_bytes(2 * MIB, 4);
    write_file(img.as_ref(), &data);
    for seed in 5..8 {
        ok(&["backup", "-q", &img, &chain]);
        data[seed * 10_000..seed * 10_000 + 8192].copy_from_slice(&random_bytes(8192, seed as u64));
        write_file(img.as_ref(), &data);
    }
    let (i1, i2) = (arg(d.path(), "chain/inc-000001.delta"), arg(d.path(), "chain/inc-000002.delta"));
    // The same delta twice (also under another name), and increments in the wrong order.
    let copy = arg(d.path(), "copy.delta");
    std::fs::copy(&i1, &copy).unwrap();
    for inputs in [[&i1, &i1], [&i1, &copy], [&i2, &i1]] {
        let out = run(&["merge", "-q", inputs[0], inputs[1], "-o", &m]);
        assert_eq!(out.code(), 10, "merge {inputs:?}: {}", out.stderr_text());
        assert!(out.stderr_text().contains("does not follow"), "{}", out.stderr_text());
        assert!(!Path::new(&m).exists());
    }
    // A patch from `diff` carries no link; made against other content than the first leaves
    // where both change the image, it is refused by content.
    let (other, p1, p2) = (arg(d.path(), "other"), arg(d.path(), "p1"), arg(d.path(), "p2"));
    let (v0, v1) = (arg(d.path(), "v0"), arg(d.path(), "v1"));
    write_file(v0.as_ref(), &random_bytes(MIB, 10));
    write_file(v1.as_ref(), &random_bytes(MIB, 11));
    write_file(other.as_ref(), &random_bytes(MIB, 12));
    ok(&["diff", "-q", &v1, &v0, "-o", &p1]);
    ok(&["diff", "-q", &other, &v0, "-o", &p2]);
    let out = run(&["merge", "-q", &p1, &p2, "-o", &m]);
    assert_eq!(out.code(), 10, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("fingerprint"), "{}", out.stderr_text());
}

fn info_of(delta: &str) -> serde_json::Value {
    ok(&["info", "--json", delta]).json()
}

/// Two `diff` patches of unrelated images whose changes never overlap: their records cannot
/// conflict, and `diff` writes no parent link, so merge took them and wrote a delta that fits no
/// image. Each patch now records the fingerprints of the image before and after.
#[test]
fn merge_of_unrelated_patches_whose_changes_do_not_overlap_is_refused() {
    let d = tmp();
    let path = |name: &str| arg(d.path(), name);
    let mut ours = random_bytes(3 * MIB + 4096, 40);
    write_file(path("v0").as_ref(), &ours);
    ours[..4096].copy_from_slice(&random_bytes(4096, 41));
    write_file(path("v1").as_ref(), &ours);
    ours[2 * MIB..2 * MIB + 8192].copy_from_slice(&random_bytes(8192, 42));
    write_file(path("v2").as_ref(), &ours);
    let mut theirs = random_bytes(3 * MIB + 4096, 43);
    write_file(path("w0").as_ref(), &theirs);
    theirs[MIB..MIB + 4096].copy_from_slice(&random_bytes(4096, 44));
    write_file(path("w1").as_ref(), &theirs);
    ok(&["diff", "-q", &path("v1"), &path("v0"), "-o", &path("a.delta")]);
    ok(&["diff", "-q", &path("v2"), &path("v1"), "-o", &path("b.delta")]);
    ok(&["diff", "-q", &path("w1"), &path("w0"), "-o", &path("w.delta")]);

    let out = run(&["merge", "-q", &path("a.delta"), &path("w.delta"), "-o", &path("m.delta")]);
    assert_eq!(out.code(), 10, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("fingerprint"), "{}", out.stderr_text());
    assert!(!Path::new(&path("m.delta")).exists());

    // Patches that do follow each other: the fingerprints meet, and the merge carries the
    // outer two, so that it can itself be merged again.
    let (first, second) = (info_of(&path("a.delta")), info_of(&path("b.delta")));
    assert_eq!(first["after_fingerprint"], second["before_fingerprint"]);
    assert_eq!(first["after_fingerprint"].as_str().unwrap().len(), 64);
    let merged = ok(&["merge", &path("a.delta"), &path("b.delta"), "-o", &path("m.delta")]);
    assert!(!merged.stderr_text().contains("nothing proves"), "{}", merged.stderr_text());
    let merged_info = info_of(&path("m.delta"));
    assert_eq!(merged_info["before_fingerprint"], first["before_fingerprint"]);
    assert_eq!(merged_info["after_fingerprint"], second["after_fingerprint"]);
    std::fs::copy(path("v0"), path("copy")).unwrap();
    ok(&["apply", "-q", &path("m.delta"), &path("copy")]);
    assert_same(path("copy").as_ref(), path("v2").as_ref());
    // The same images give the same fingerprints, whichever diff saw them.
    ok(&["diff", "-q", &path("v2"), &path("v0"), "-o", &path("direct.delta")]);
    let direct = info_of(&path("direct.delta"));
    assert_eq!(direct["before_fingerprint"], first["before_fingerprint"]);
    assert_eq!(direct["after_fingerprint"], second["after_fingerprint"]);
}

#[test]
fn merged_delta_gets_a_fresh_id_and_the_first_inputs_parent() {
    let d = tmp();
    let (img, chain, m) = (arg(d.path(), "img"), arg(d.path(), "chain"), arg(d.path(), "m.delta"));
    let mut data = random_bytes(2 * MIB, 20);
    write_file(img.as_ref(), &data);
    for seed in 21..24 {
        ok(&["backup", "-q", &img, &chain]);
        data[seed * 10_000..seed * 10_000 + 4096].copy_from_slice(&random_bytes(4096, seed as u64));
        write_file(img.as_ref(), &data);
    }
    let (i1, i2) = (arg(d.path(), "chain/inc-000001.delta"), arg(d.path(), "chain/inc-000002.delta"));
    ok(&["merge", "-q", &i1, &i2, "-o", &m]);
    let (h1, h2, merged) = (header_of(&i1), header_of(&i2), header_of(&m));
    assert_eq!(merged["parent"], h1["parent"]);
    assert_ne!(merged["id"], h1["id"]);
    assert_ne!(merged["id"], h2["id"], "the merge reused the last input's id");
}

/// Changes of several MiB: the merge cut them into 1 MiB records without before-hashes, so the
/// merged delta applied to an unrelated image and applied twice.
#[test]
fn merged_delta_of_large_changes_refuses_an_unrelated_target_and_a_second_apply() {
    let d = tmp();
    let (base, v1, v2) = (arg(d.path(), "base"), arg(d.path(), "v1"), arg(d.path(), "v2"));
    let (a, b, m) = (arg(d.path(), "a.delta"), arg(d.path(), "b.delta"), arg(d.path(), "m.delta"));
    let mut data = random_bytes(12 * MIB, 30);
    write_file(base.as_ref(), &data);
    // Aligned to the 2 MiB chunks that `diff` reads, so that every record is 2 MiB.
    data[2 * MIB..6 * MIB].copy_from_slice(&random_bytes(4 * MIB, 31));
    write_file(v1.as_ref(), &data);
    data[8 * MIB..12 * MIB].copy_from_slice(&random_bytes(4 * MIB, 32));
    write_file(v2.as_ref(), &data);
    ok(&["diff", "-q", &v1, &base, "-o", &a]);
    ok(&["diff", "-q", &v2, &v1, "-o", &b]);
    let merged = ok(&["merge", &a, &b, "-o", &m]);
    assert!(!merged.stderr_text().contains("cannot be checked"), "{}", merged.stderr_text());
    let (copy, unrelated) = (arg(d.path(), "copy"), arg(d.path(), "unrelated"));
    std::fs::copy(&base, &copy).unwrap();
    ok(&["apply", "-q", &m, &copy]);
    assert_same(copy.as_ref(), v2.as_ref());
    let again = run(&["apply", "-q", &m, &copy]);
    assert_eq!(again.code(), 10, "a second apply: {}", again.stderr_text());
    assert_same(copy.as_ref(), v2.as_ref());
    let other = random_bytes(12 * MIB, 33);
    write_file(unrelated.as_ref(), &other);
    let wrong = run(&["apply", "-q", &m, &unrelated]);
    assert_eq!(wrong.code(), 10, "an unrelated target: {}", wrong.stderr_text());
    assert!(read(unrelated.as_ref()) == other);
}

/// Writes `deltas` linked deltas of `records` small records each onto a zero image, the
/// records of each shifted against the previous one so that they partly overlap.
fn many_record_deltas(dir: &Path, deltas: u64, records: u64) -> Vec<String> {
    use blksync::delta::{Header, Kind, Writer};
    let size = records * 64 + 64;
    let mut paths = Vec::new();
    for k in 0..deltas {
        let header = Header {
            id: [k as u8 + 1; 16],
            parent: [k as u8; 16],
            block_size: 4096,
            size_before: size,
            size_after: size,
            created: 1_700_000_000,
            utc_offset: 0,
            source: "test".into(),
            source_identity: String::new(),
            comment: String::new(),
            tool_version: "test".into(),
        };
        let path = dir.join(format!("{k}.delta"));
        let w = Writer::create(&path, &header).unwrap();
        for i in 0..records {
            // Before-hashes are not what this is about: leave them unrecorded.
            let data = random_bytes(24, i * 7 + k);
            w.record_hashed(Kind::Data, i * 64 + k * 16, 24, &data, blksync::delta::UNRECORDED).unwrap();
        }
        w.commit().unwrap();
        paths.push(path.to_str().unwrap().to_string());
    }
    paths
}

/// True when process `pid` has `path` open.
fn has_open(pid: u32, path: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|p| p == Path::new(path)))
}

/// The first SIGTERM went unheard while the merge planned (and planning was quadratic, so it
/// could take hours): now it stops at the next record, exits 130 and leaves nothing behind.
#[test]
fn first_sigterm_stops_a_merge_while_it_plans() {
    let d = tmp();
    let inputs = many_record_deltas(d.path(), 3, 100_000);
    let m = arg(d.path(), "m.delta");
    let mut args = vec!["merge", "-q"];
    args.extend(inputs.iter().map(String::as_str));
    args.extend(["-o", &m]);
    let child = spawn(&args);
    let pid = child.id();
    wait_until("the merge has opened its last input", || has_open(pid, &inputs[2]));
    signal(&child, "TERM");
    let out = exits_within(child, Duration::from_secs(20), "merge after SIGTERM");
    assert_eq!(out.code(), 130, "{}", out.stderr_text());
    assert!(!Path::new(&m).exists());
    assert!(temporary_files(d.path()).is_empty());
}

// ---- what a source or destination can be (item 17) ----

fn mkfifo(path: &str) {
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
}

/// A FIFO source hung in `open()` (waiting for a writer), and SIGTERM did not end it.
#[test]
fn fifo_source_or_destination_is_refused_without_blocking() {
    let d = tmp();
    let (fifo, img, dst) = (arg(d.path(), "fifo"), arg(d.path(), "img"), arg(d.path(), "dst"));
    mkfifo(&fifo);
    write_file(img.as_ref(), &random_bytes(MIB, 50));
    for args in [
        vec!["sync", "-q", &fifo, &dst],
        vec!["sync", "-q", &img, &fifo],
        vec!["sync", "-q", "-n", &img, &fifo],
        vec!["diff", "-q", &img, &fifo, "-o", &dst],
    ] {
        let out = exits_within(spawn(&args), Duration::from_secs(20), &format!("{args:?}"));
        assert_eq!(out.code(), 2, "{args:?}: {}", out.stderr_text());
        assert!(out.stderr_text().contains("FIFO"), "{}", out.stderr_text());
    }
    // compare follows cmp (2 for any error), and must not block either.
    let out = exits_within(spawn(&["compare", &img, &fifo]), Duration::from_secs(20), "compare with a FIFO");
    assert_eq!(out.code(), 2, "{}", out.stderr_text());
    assert!(!Path::new(&dst).exists());
}

/// A character device node whose driver is missing: opening it fails ("No such device or
/// address", exit 3), so a refusal with exit 2 shows it was refused before it was opened.
fn unopenable_char_device(dir: &Path) -> Option<String> {
    let registered = std::fs::read_to_string("/proc/devices").ok()?;
    let chars = registered.split("Block devices:").next()?;
    let used: Vec<u32> = chars.lines().filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect();
    let major = (234..=254).find(|m| !used.contains(m))?;
    let path = arg(dir, "nodev");
    let made = Command::new("mknod").args([&path, "c", &major.to_string(), "0"]).status().ok()?;
    made.success().then_some(path)
}

#[test]
fn character_devices_are_refused_before_they_are_opened() {
    let d = tmp();
    let (img, dst) = (arg(d.path(), "img"), arg(d.path(), "dst"));
    write_file(img.as_ref(), &random_bytes(MIB, 51));
    let mut cases = vec![vec!["sync", "-q", "/dev/zero", &dst], vec!["sync", "-q", &img, "/dev/null"]];
    let node = unopenable_char_device(d.path());
    if let Some(node) = &node {
        cases.push(vec!["sync", "-q", node, &dst]);
        cases.push(vec!["sync", "-q", &img, node]);
    } else {
        eprintln!("skipping the unopenable node: needs root and a free character major");
    }
    for args in cases {
        let out = exits_within(spawn(&args), Duration::from_secs(20), &format!("{args:?}"));
        assert_eq!(out.code(), 2, "{args:?}: {}", out.stderr_text());
        assert!(out.stderr_text().contains("is a character device"), "{}", out.stderr_text());
    }
    assert!(!Path::new(&dst).exists());
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
}

/// /proc files are regular files of size 0: a sync "copied" one into an empty file, exit 0.
#[test]
fn proc_and_sys_files_are_not_disk_images() {
    let d = tmp();
    let dst = arg(d.path(), "dst");
    for source in ["/proc/self/status", "/sys/kernel/mm/transparent_hugepage/enabled", "/proc/version"] {
        if !Path::new(source).exists() {
            continue;
        }
        let out = run(&["sync", "-q", source, &dst]);
        assert_eq!(out.code(), 2, "{source}: {}", out.stderr_text());
        assert!(out.stderr_text().contains("pseudo-filesystem"), "{}", out.stderr_text());
    }
    assert!(!Path::new(&dst).exists());
    // An empty regular file is still an empty image.
    let empty = arg(d.path(), "empty");
    write_file(empty.as_ref(), &[]);
    ok(&["sync", "-q", &empty, &dst]);
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), 0);
}

/// True when a thread of process `pid` is blocked writing to a full pipe.
fn blocked_on_a_pipe(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|task| std::fs::read_to_string(task.path().join("wchan")).is_ok_and(|w| w.contains("pipe_write")))
}

/// A restore to a standard output that nobody reads blocked in `write()`, and the first SIGTERM
/// went unheard (the flag is only read between chunks): now the watchdog ends the run.
#[test]
fn first_sigterm_ends_a_run_blocked_on_a_full_pipe() {
    let d = tmp();
    let (img, chain) = (arg(d.path(), "img"), arg(d.path(), "chain"));
    write_file(img.as_ref(), &random_bytes(8 * MIB, 52));
    ok(&["backup", "-q", &img, &chain]);
    let child = spawn(&["restore", "-q", &chain, "-"]);
    let pid = child.id();
    wait_until("the restore is blocked on its full stdout pipe", || blocked_on_a_pipe(pid));
    signal(&child, "TERM");
    let out = exits_within(child, Duration::from_secs(40), "restore blocked on a pipe after SIGTERM");
    assert_eq!(out.code(), 130, "{}", out.stderr_text());
}

// ---- two writers (item 10) ----

/// Two syncs to one destination file both exited 0 and left a mix of their sources.
#[test]
fn second_sync_to_a_file_being_synced_fails_at_once_instead_of_mixing() {
    let d = tmp();
    let (a, b, dst) = (arg(d.path(), "a"), arg(d.path(), "b"), arg(d.path(), "dst"));
    write_file(a.as_ref(), &random_bytes(8 * MIB, 40));
    write_file(b.as_ref(), &random_bytes(8 * MIB, 41));
    let first = spawn(&["sync", "-q", "--bwlimit", "2M", &a, &dst]);
    // It takes the lock before it writes: once data has arrived, the lock is held.
    wait_until("the first sync has written data", || std::fs::metadata(&dst).is_ok_and(|m| m.blocks() > 0));
    let second = run(&["sync", "-q", &b, &dst]);
    assert_eq!(second.code(), 6, "{}", second.stderr_text());
    assert!(second.stderr_text().contains(&dst), "{}", second.stderr_text());
    // A dry run writes nothing and takes no lock.
    assert_eq!(run(&["sync", "-q", "-n", &b, &dst]).code(), 0);
    let first = exits_within(first, Duration::from_secs(60), "the first sync");
    assert_eq!(first.code(), 0, "{}", first.stderr_text());
    assert_same(a.as_ref(), dst.as_ref());
    // The lock ends with the run that held it.
    ok(&["sync", "-q", &b, &dst]);
    assert_same(b.as_ref(), dst.as_ref());
}

/// The lock is taken where the file is opened, so an agent writing a file excludes a local
/// run, and a local run an agent.
#[test]
fn writer_through_an_agent_and_a_local_writer_exclude_each_other() {
    let d = tmp();
    let Some(rsh) = rsh(&d.path().join("cache")) else { return };
    let (a, b, dst) = (arg(d.path(), "a"), arg(d.path(), "b"), arg(d.path(), "dst"));
    write_file(a.as_ref(), &random_bytes(8 * MIB, 42));
    write_file(b.as_ref(), &random_bytes(8 * MIB, 43));
    let remote = format!("root@127.0.0.1:{dst}");
    let first_local = ["sync", "-q", "--bwlimit", "2M", &a, &dst];
    let first_remote = ["sync", "-q", "-e", &rsh, "--bwlimit", "2M", &a, &remote];
    let second_local = ["sync", "-q", &b, &dst];
    let second_remote = ["sync", "-q", "-e", &rsh, &b, &remote];
    let pairs: [(&[&str], &[&str]); 2] = [(&first_local, &second_remote), (&first_remote, &second_local)];
    for (first, second) in pairs {
        let _ = std::fs::remove_file(&dst);
        let first = spawn(first);
        wait_until("the first sync has written data", || std::fs::metadata(&dst).is_ok_and(|m| m.blocks() > 0));
        let out = run(second);
        assert_eq!(out.code(), 6, "{second:?}: {}", out.stderr_text());
        assert!(out.stderr_text().contains("another blksync run"), "{}", out.stderr_text());
        let first = exits_within(first, Duration::from_secs(60), "the first sync");
        assert_eq!(first.code(), 0, "{}", first.stderr_text());
        assert_same(a.as_ref(), dst.as_ref());
    }
}

// ---- the same storage under two names (item 22) ----

/// A loop device with its partitions added by `partx`, removed again on drop (before the loop
/// device is detached).
struct Partitions(PathBuf);

impl Partitions {
    fn add(dev: &Path) -> Option<Partitions> {
        let added = Command::new("partx").arg("-a").arg(dev).output().ok()?;
        let p1 = PathBuf::from(format!("{}p1", dev.display()));
        (added.status.success() && p1.exists()).then(|| Partitions(dev.to_path_buf()))
    }

    fn part(&self, n: u32) -> String {
        format!("{}p{n}", self.0.display())
    }
}

impl Drop for Partitions {
    fn drop(&mut self) {
        let _ = Command::new("partx").arg("-d").arg(&self.0).status();
    }
}

/// A DOS partition table with two 4 MiB partitions at 1 MiB and 5 MiB.
fn partition_table() -> Vec<u8> {
    let mut mbr = vec![0u8; 512];
    for (i, start) in [2048u32, 10240].into_iter().enumerate() {
        let e = 446 + 16 * i;
        mbr[e + 4] = 0x83;
        mbr[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
        mbr[e + 12..e + 16].copy_from_slice(&8192u32.to_le_bytes());
    }
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    mbr
}

/// A loop device over the destination file (or over the source) was accepted: the sync read
/// and wrote the same bytes under two names.
#[test]
fn loop_device_and_its_backing_file_are_refused_as_the_same_storage() {
    if !can_use_loop_devices() {
        return;
    }
    let d = tmp();
    let (back, other) = (arg(d.path(), "back"), arg(d.path(), "other"));
    let mut data = random_bytes(16 * MIB, 60);
    data[..512].copy_from_slice(&partition_table());
    write_file(back.as_ref(), &data);
    write_file(other.as_ref(), &random_bytes(16 * MIB, 61));
    let (one, two) = (Loop::attach(back.as_ref()), Loop::attach(back.as_ref()));
    let mut pairs = vec![(one.path().to_string(), back.clone()), (back.clone(), one.path().to_string())];
    pairs.push((one.path().to_string(), two.path().to_string()));
    let parts = Partitions::add(&one.dev);
    let parts2 = Partitions::add(&two.dev);
    if let (Some(p), Some(q)) = (&parts, &parts2) {
        pairs.push((p.part(1), back.clone()));
        pairs.push((back.clone(), p.part(2)));
        pairs.push((one.path().to_string(), p.part(2)));
        pairs.push((p.part(1), q.part(2)));
    } else {
        eprintln!("skipping partitions: partx could not add them");
    }
    for (s, t) in &pairs {
        let out = run(&["sync", "-q", s, t]);
        assert_eq!(out.code(), 2, "sync {s} {t}: {}", out.stderr_text());
        assert!(out.stderr_text().contains("same storage"), "{}", out.stderr_text());
    }
    assert!(read(back.as_ref()) == data, "the backing file was written");
    // Separate storage is still fine: another file onto the loop device, and one partition of
    // a loop device onto another.
    if let Some(p) = &parts {
        ok(&["sync", "-q", &p.part(1), &p.part(2)]);
        assert_same(p.part(1).as_ref(), p.part(2).as_ref());
    }
    drop((parts, parts2));
    ok(&["sync", "-q", &other, one.path()]);
    assert_same(other.as_ref(), back.as_ref());
}

// ---- a typo under /dev (item 23) ----

/// A missing device name (/dev/loop3p1) was created as a regular file in RAM.
#[test]
fn missing_device_under_dev_is_refused_not_created_in_ram() {
    if !Path::new("/dev").is_dir() || std::fs::metadata("/dev").is_ok_and(|m| m.permissions().readonly()) {
        return;
    }
    let d = tmp();
    let img = arg(d.path(), "img");
    write_file(img.as_ref(), &random_bytes(MIB, 70));
    let typo = format!("/dev/blksync-test-{}p1", std::process::id());
    for args in [vec!["sync", "-q", &img, &typo], vec!["sync", "-q", "-n", &img, &typo]] {
        let out = run(&args);
        let created = Path::new(&typo).exists();
        let _ = std::fs::remove_file(&typo);
        assert!(!created, "{args:?} created {typo}");
        assert_eq!(out.code(), 3, "{args:?}: {}", out.stderr_text());
        assert!(out.stderr_text().contains("no such device"), "{}", out.stderr_text());
    }
    // /dev/shm is a filesystem of its own, for files.
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && std::fs::metadata(shm).unwrap().dev() != std::fs::metadata("/dev").unwrap().dev() {
        let file = format!("/dev/shm/blksync-test-{}", std::process::id());
        let out = run(&["sync", "-q", &img, &file]);
        let _ = std::fs::remove_file(&file);
        assert_eq!(out.code(), 0, "{}", out.stderr_text());
    }
}
