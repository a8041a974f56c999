//! Test helpers: a file as a `Source`, images made by mke2fs from random files, the `dumpe2fs`
//! oracle (`shared/lab/e2used.py`), and a copy of only the used blocks checked by e2fsck and
//! debugfs.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use blksync_core::Result;
use blksync_core::endpoint::{Identity, Segment, Source};
use blksync_core::error::IoContext;
use blksync_fs::{Map, Usage};

/// A regular file, read-only.
pub struct FileSource {
    path: PathBuf,
    file: File,
    size: u64,
}

impl FileSource {
    pub fn open(path: &Path) -> FileSource {
        let file = File::open(path).unwrap();
        let size = file.metadata().unwrap().len();
        FileSource { path: path.to_owned(), file, size }
    }
}

impl Source for FileSource {
    fn name(&self) -> &Path {
        &self.path
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).at("reading", &self.path, offset)
    }
    fn segment_at(&self, offset: u64) -> Result<Segment> {
        Ok(Segment { start: offset, end: self.size, allocated: true })
    }
    fn drop_cache(&self, _offset: u64, _len: u64) {}
    fn identity(&self) -> Identity {
        Identity::None
    }
}

/// A small deterministic generator (xorshift64*), so that failures repeat.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An image made by mke2fs.
pub struct Image {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    /// Where the filesystem starts in the image, and its length.
    pub start: u64,
    pub len: u64,
    /// The files left in it (name, content).
    pub files: Vec<(String, Vec<u8>)>,
}

/// How to make an image.
pub struct Spec<'a> {
    /// mke2fs arguments before the image (`-t ext4 -b 1024 -O ^flex_bg`).
    pub args: &'a [&'a str],
    /// Filesystem size in bytes.
    pub size: u64,
    /// Bytes before and after the filesystem in the image (a "partition").
    pub offset: u64,
    pub tail: u64,
    /// Files, about this many bytes in all.
    pub data: usize,
    /// The junk file removed afterwards (0: a quarter of the size).
    pub junk: usize,
    pub seed: u64,
}

impl Default for Spec<'_> {
    fn default() -> Self {
        Spec { args: &["-t", "ext4"], size: 32 << 20, offset: 0, tail: 0, data: 4 << 20, junk: 0, seed: 1 }
    }
}

/// Makes the image: random files and a large junk file, then removes the junk and every
/// third file with debugfs, so free blocks holding junk lie between used ones.
pub fn make(spec: &Spec<'_>) -> Image {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let mut rng = Rng::new(spec.seed);
    let mut files = Vec::new();
    let mut total = 0;
    let mut i = 0;
    while total < spec.data {
        let n = (rng.next() % (spec.data as u64 / 8 + 1)) as usize + 1;
        let name = format!("f{i}");
        let content = rng.bytes(n);
        std::fs::write(tree.join(&name), &content).unwrap();
        files.push((name, content));
        total += n;
        i += 1;
    }
    let junk = rng.bytes(if spec.junk > 0 { spec.junk } else { (spec.size / 4) as usize });
    std::fs::write(tree.join("junk"), &junk).unwrap();
    let path = dir.path().join("disk.img");
    let image = File::create(&path).unwrap();
    image.set_len(spec.offset + spec.size + spec.tail).unwrap();
    drop(image);
    let mut cmd = Command::new("mke2fs");
    cmd.args(["-F", "-q"]).args(spec.args).arg("-d").arg(&tree);
    if spec.offset > 0 {
        cmd.arg("-E").arg(format!("offset={}", spec.offset));
    }
    cmd.arg(&path).arg(format!("{}k", spec.size / 1024));
    run(&mut cmd);
    // Remove the junk and every third file.
    let mut rm = String::from("rm /junk\n");
    let mut kept = Vec::new();
    for (k, (name, content)) in files.into_iter().enumerate() {
        if k % 3 == 1 {
            let _ = writeln!(rm, "rm /{name}");
        } else {
            kept.push((name, content));
        }
    }
    let fs = partition(&path, spec.offset, spec.size, dir.path());
    debugfs(&fs, &rm, true);
    if spec.offset > 0 {
        put_partition(&path, spec.offset, &fs);
    }
    Image { path, start: spec.offset, len: spec.size, files: kept, dir }
}

/// The filesystem's bytes as a file of their own (the image itself when it starts at 0 and
/// has no tail).
pub fn partition(image: &Path, start: u64, len: u64, dir: &Path) -> PathBuf {
    let size = std::fs::metadata(image).unwrap().len();
    if start == 0 && size == len {
        return image.to_owned();
    }
    let out = dir.join("part.img");
    let src = File::open(image).unwrap();
    let dst = File::create(&out).unwrap();
    dst.set_len(len).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = buf.len().min((len - at) as usize);
        src.read_exact_at(&mut buf[..n], start + at).unwrap();
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], at).unwrap();
        }
        at += n as u64;
    }
    out
}

fn put_partition(image: &Path, start: u64, part: &Path) {
    let data = std::fs::read(part).unwrap();
    File::options().write(true).open(image).unwrap().write_all_at(&data, start).unwrap();
}

/// Runs debugfs commands from a file.
pub fn debugfs(image: &Path, commands: &str, write: bool) -> String {
    let cmds = image.with_extension("cmds");
    std::fs::write(&cmds, commands).unwrap();
    let mut cmd = Command::new("debugfs");
    if write {
        cmd.arg("-w");
    }
    run(cmd.arg("-f").arg(&cmds).arg(image))
}

/// The used blocks by the oracle: `(start, len)` in filesystem blocks, and the block size.
pub fn oracle(fs: &Path) -> (Vec<(u64, u64)>, u64) {
    let lab = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/lab/e2used.py");
    let lab = if lab.exists() { lab } else { PathBuf::from("/work/shared/lab/e2used.py") };
    let out = Command::new("python3").arg(&lab).arg(fs).output().unwrap();
    assert!(out.status.success(), "e2used.py: {}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let bs: u64 = stderr.split("block size ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    let runs = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let mut it = l.split_whitespace().map(|n| n.parse::<u64>().unwrap());
            (it.next().unwrap(), it.next().unwrap())
        })
        .collect();
    (runs, bs)
}

/// Every run of the map, `(start, end, used)` in bytes relative to the filesystem, checking
/// that they tile `[0, len)`.
pub fn runs(map: &Map, source: &dyn Source) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut offset = 0;
    while offset < map.len() {
        let (end, used) = map.state_at(source, offset).unwrap();
        assert!(end > offset && end <= map.len(), "run [{offset}, {end})");
        match out.last_mut() {
            Some(last) if last.2 == used => last.1 = end,
            _ => out.push((offset, end, used)),
        }
        offset = end;
    }
    out
}

/// The used runs in blocks of `bs`, as the oracle prints them.
pub fn used_blocks(runs: &[(u64, u64, bool)], bs: u64, fs_blocks: u64) -> Vec<(u64, u64)> {
    runs.iter()
        .filter(|r| r.2)
        .map(|&(s, e, _)| {
            assert_eq!(s % bs, 0);
            let end = e.div_ceil(bs).min(fs_blocks);
            (s / bs, end - s / bs)
        })
        .collect()
}

pub fn probe_known(image: &Image) -> (FileSource, Map) {
    let source = FileSource::open(&image.path);
    match blksync_fs::probe(&source, image.start, image.len).unwrap() {
        Usage::Known(map) => (source, map),
        Usage::Whole { reason } => panic!("{}: copy whole: {reason}", image.path.display()),
    }
}

/// Compares the map with the oracle block for block, then copies only the used blocks into a
/// fresh sparse file and checks it with e2fsck and by dumping every file. Returns the runs.
pub fn check(image: &Image) -> Vec<(u64, u64, bool)> {
    let (source, map) = probe_known(image);
    let runs = runs(&map, &source);
    let fs = partition(&image.path, image.start, image.len, image.dir.path());
    let (expected, bs) = oracle(&fs);
    let fs_blocks = image.len / bs;
    let ours = used_blocks(&runs, bs, fs_blocks);
    if ours != expected {
        let diff = first_difference(&ours, &expected);
        panic!("used blocks differ from dumpe2fs: {diff}");
    }
    let used: u64 = expected.iter().map(|r| r.1).sum();
    assert_eq!(map.used_bytes(), used * bs, "used bytes from the descriptors");
    let free_runs = runs.iter().filter(|r| !r.2 && r.1 < image.len).count();
    eprintln!(
        "{}: {used} of {fs_blocks} blocks used in {} extents, {free_runs} free runs between them",
        image.path.display(),
        expected.len()
    );
    assert!(free_runs > 0, "no free space between used blocks: the test proves little");
    copy_used(image, &source, &runs);
    runs
}

fn first_difference(ours: &[(u64, u64)], expected: &[(u64, u64)]) -> String {
    let blocks =
        |v: &[(u64, u64)]| -> std::collections::BTreeSet<u64> { v.iter().flat_map(|&(s, n)| s..s + n).collect() };
    let (a, b) = (blocks(ours), blocks(expected));
    let extra: Vec<_> = a.difference(&b).take(10).collect();
    let missing: Vec<_> = b.difference(&a).take(10).collect();
    format!("extra {extra:?}, missing {missing:?} ({} vs {} extents)", ours.len(), expected.len())
}

/// Writes the used runs of `source` (the image's filesystem) into `copy`, at the same offsets.
fn write_used(copy: &File, image: &Image, source: &FileSource, runs: &[(u64, u64, bool)]) {
    let mut buf = vec![0u8; 1 << 20];
    for &(s, e, _) in runs.iter().filter(|r| r.2) {
        let mut at = s;
        while at < e {
            let n = buf.len().min((e - at) as usize);
            source.read_at(&mut buf[..n], image.start + at).unwrap();
            copy.write_all_at(&buf[..n], at).unwrap();
            at += n as u64;
        }
    }
}

/// Copies the used runs into a sparse file of the same size; e2fsck must find it clean and
/// every file must read back equal.
fn copy_used(image: &Image, source: &FileSource, runs: &[(u64, u64, bool)]) {
    let copy_path = image.dir.path().join("copy.img");
    let copy = File::create(&copy_path).unwrap();
    copy.set_len(image.len).unwrap();
    write_used(&copy, image, source, runs);
    copy.sync_all().unwrap();
    drop(copy);
    let out = Command::new("e2fsck").arg("-fn").arg(&copy_path).output().unwrap();
    assert!(
        out.status.success(),
        "e2fsck on the copy: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dumps = image.dir.path().join("dumps");
    std::fs::create_dir_all(&dumps).unwrap();
    let mut cmds = String::new();
    for (name, _) in &image.files {
        let _ = writeln!(cmds, "dump /{name} {}", dumps.join(name).display());
    }
    debugfs(&copy_path, &cmds, false);
    for (name, content) in &image.files {
        let got = std::fs::read(dumps.join(name)).unwrap_or_default();
        assert!(got == *content, "{name} differs in the copy ({} vs {} bytes)", got.len(), content.len());
    }
}

/// Writes `bytes` at `offset` of a file.
pub fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let f = File::options().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.sync_all().unwrap();
    let _ = std::io::stdout().flush();
}

/// `dumpe2fs`'s output.
pub fn dumpe2fs(fs: &Path) -> String {
    run(Command::new("dumpe2fs").arg(fs))
}

/// `path` copied to `dir/name`, sparsely.
pub fn copy_of(path: &Path, dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    run(Command::new("cp").arg("--sparse=always").arg(path).arg(&out));
    out
}

/// A copy of `fs` with its journal replayed by debugfs (`journal_run`: e2fsprogs' recovery,
/// nothing else).
pub fn replayed(fs: &Path, dir: &Path) -> PathBuf {
    let out = copy_of(fs, dir, "replayed.img");
    debugfs(&out, "jr\n", true);
    assert!(!dumpe2fs(&out).contains("needs_recovery"), "debugfs jr left {} needing recovery", out.display());
    out
}

/// `e2fsck -fy`, which replays the journal and fixes what it finds: exit 0 or 1 (fixed).
pub fn fsck_fix(fs: &Path) -> String {
    let out = Command::new("e2fsck").arg("-fy").arg(fs).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(matches!(out.status.code(), Some(0 | 1)), "e2fsck -fy {}: {text}", fs.display());
    text
}

/// `Journal start:` of `dumpe2fs -h`: 0 when the journal is empty.
pub fn journal_start(fs: &Path) -> u64 {
    let out = run(Command::new("dumpe2fs").arg("-h").arg(fs));
    out.lines().find_map(|l| l.strip_prefix("Journal start:")).map_or(0, |v| v.trim().parse().unwrap())
}

/// The blocks of runs `(start, len)`, as a set.
pub fn block_set(runs: &[(u64, u64)]) -> std::collections::BTreeSet<u64> {
    runs.iter().flat_map(|&(s, n)| s..s + n).collect()
}

/// What [`check_journalled`] measured.
#[derive(Debug)]
pub struct Journalled {
    /// Used blocks: by the map, by dumpe2fs on disk (unreplayed), after debugfs's replay, after
    /// e2fsck -fy.
    pub ours: u64,
    pub on_disk: u64,
    pub replayed: u64,
    pub fsck: u64,
    /// Blocks used after e2fsck that the unreplayed bitmaps call free: what reading the journal
    /// is for.
    pub missed_on_disk: u64,
    /// Blocks used after replay that the unreplayed bitmaps call free.
    pub added_by_replay: u64,
    pub block_size: u64,
}

/// Checks the map of `image`, whose journal needs recovery: used blocks exactly as dumpe2fs
/// finds them after debugfs replays the journal of a copy. When the journal replays into a
/// `consistent` filesystem (as a kernel's does), also a superset of those after `e2fsck -fy`
/// on another copy; and then copies only the used blocks over junk, replays and checks that
/// copy with e2fsck and compares every file with the replayed source's.
pub fn check_journalled(image: &Image, consistent: bool) -> Journalled {
    let (source, map) = probe_known(image);
    let runs = runs(&map, &source);
    let fs = partition(&image.path, image.start, image.len, image.dir.path());
    let (on_disk, bs) = oracle(&fs);
    let fs_blocks = image.len / bs;
    let ours = used_blocks(&runs, bs, fs_blocks);
    let replay = replayed(&fs, image.dir.path());
    let (expected, _) = oracle(&replay);
    assert!(
        ours == expected,
        "used blocks differ from dumpe2fs after debugfs replays the journal: {}",
        first_difference(&ours, &expected)
    );
    let fixed = copy_of(&fs, image.dir.path(), "fixed.img");
    if !consistent {
        fsck_fix(&fixed);
        let (on_disk_set, replayed_set) = (block_set(&on_disk), block_set(&expected));
        return Journalled {
            ours: replayed_set.len() as u64,
            on_disk: on_disk_set.len() as u64,
            replayed: replayed_set.len() as u64,
            fsck: block_set(&oracle(&fixed).0).len() as u64,
            missed_on_disk: 0,
            added_by_replay: replayed_set.difference(&on_disk_set).count() as u64,
            block_size: bs,
        };
    }
    fsck_fix(&fixed);
    let (after_fsck, _) = oracle(&fixed);
    let (ours_set, fsck_set) = (block_set(&ours), block_set(&after_fsck));
    let missing: Vec<_> = fsck_set.difference(&ours_set).take(10).collect();
    assert!(missing.is_empty(), "blocks used after e2fsck -fy that the map calls free: {missing:?}");
    let on_disk_set = block_set(&on_disk);
    let report = Journalled {
        ours: ours_set.len() as u64,
        on_disk: on_disk_set.len() as u64,
        replayed: block_set(&expected).len() as u64,
        fsck: fsck_set.len() as u64,
        missed_on_disk: fsck_set.difference(&on_disk_set).count() as u64,
        added_by_replay: block_set(&expected).difference(&on_disk_set).count() as u64,
        block_size: bs,
    };
    copy_used_replayed(image, &source, &runs, &fixed);
    report
}

/// Copies the used runs over junk, lets e2fsck replay the journal of the copy, and compares it
/// with `fixed` (the source, fixed by e2fsck alike): clean, and every file the same.
fn copy_used_replayed(image: &Image, source: &FileSource, runs: &[(u64, u64, bool)], fixed: &Path) {
    let copy_path = image.dir.path().join("copy.img");
    std::fs::write(&copy_path, Rng::new(77).bytes(image.len as usize)).unwrap();
    let copy = File::options().write(true).open(&copy_path).unwrap();
    write_used(&copy, image, source, runs);
    drop(copy);
    fsck_fix(&copy_path);
    let out = Command::new("e2fsck").arg("-fn").arg(&copy_path).output().unwrap();
    assert!(out.status.success(), "e2fsck -fn on the replayed copy: {}", String::from_utf8_lossy(&out.stdout));
    let (a, b) = (image.dir.path().join("tree.copy"), image.dir.path().join("tree.source"));
    for (fs, dir) in [(&copy_path, &a), (&fixed.to_path_buf(), &b)] {
        std::fs::create_dir_all(dir).unwrap();
        debugfs(fs, &format!("rdump / {}\n", dir.display()), false);
    }
    assert_same_tree(&a, &b);
}

/// Two directory trees hold the same names, and the same bytes in their files.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    let (na, nb) = (names(a), names(b));
    assert_eq!(na, nb, "{} and {} list different names", a.display(), b.display());
    for name in na {
        let (pa, pb) = (a.join(&name), b.join(&name));
        let meta = std::fs::symlink_metadata(&pa).unwrap();
        if meta.is_dir() {
            assert_same_tree(&pa, &pb);
        } else if meta.is_file() {
            assert!(std::fs::read(&pa).unwrap() == std::fs::read(&pb).unwrap(), "{} differs", pa.display());
        }
    }
}
