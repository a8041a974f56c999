//! `--fs-aware` (issue 11, part 3): only the blocks a filesystem uses are read, sent and written,
//! for sync (here and over the test sshd, both ways), backup, diff and compare, with the real
//! e2fsprogs as oracles: `dumpe2fs` for the free blocks, `e2fsck -fn` for a clean copy and
//! `debugfs` for every file. The images are made with `mke2fs -d` over junk, so that free
//! blocks hold garbage, and a file is then deleted with `debugfs -w`.

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

use support::*;

const MIB: usize = 1 << 20;

/// The files put into every image, by name.
fn files() -> Vec<(&'static str, Vec<u8>)> {
    vec![("small", random_bytes(300_000, 21)), ("hi", b"hello\n".to_vec()), ("mid", random_bytes(3 * MIB, 22))]
}

/// A `size`-byte ext image at `path` over junk, made with `mke2fs ARGS -d` from [`files`] and a
/// 6 MiB file `gone`, which is then deleted: its blocks are free and hold its data. Returns
/// `gone`'s content.
fn ext_image(path: &Path, size: usize, args: &[&str], seed: u64) -> Vec<u8> {
    write_file(path, &random_bytes(size, seed));
    let dir = tempfile::tempdir().unwrap();
    for (name, data) in files() {
        write_file(&dir.path().join(name), &data);
    }
    let gone = random_bytes(6 * MIB, seed + 1);
    write_file(&dir.path().join("gone"), &gone);
    let p = path.to_str().unwrap();
    // nodiscard: mke2fs would punch the junk out of a file.
    let mut mkfs = vec!["-q", "-F", "-E", "nodiscard"];
    mkfs.extend_from_slice(args);
    mkfs.extend_from_slice(&["-d", dir.path().to_str().unwrap(), p]);
    tool("mke2fs", &mkfs);
    tool("debugfs", &["-w", "-R", "rm gone", p]);
    gone
}

/// Checks that `image` is a clean filesystem holding every file of [`files`].
#[track_caller]
fn assert_files(image: &Path) {
    let p = image.to_str().unwrap();
    let fsck = Command::new("e2fsck").args(["-fn", p]).output().unwrap();
    assert!(fsck.status.success(), "e2fsck -fn {p}: {}", String::from_utf8_lossy(&fsck.stdout));
    let dir = tempfile::tempdir().unwrap();
    for (name, data) in files() {
        let out = dir.path().join(name);
        tool("debugfs", &["-R", &format!("dump /{name} {}", out.display()), p]);
        assert_eq!(read(&out), data, "{name} in {p}");
    }
}

/// The free blocks of `image` by `dumpe2fs`, as byte ranges.
fn free_ranges(image: &Path) -> Vec<(usize, usize)> {
    let out = tool("dumpe2fs", &[image.to_str().unwrap()]);
    let block: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .map(|v| v.trim().parse().unwrap())
        .expect("dumpe2fs gives the block size");
    let mut free = Vec::new();
    for line in out.lines().filter_map(|l| l.trim().strip_prefix("Free blocks: ")) {
        for part in line.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
            free.push((a * block, (b + 1) * block));
        }
    }
    free
}

/// No 4 KiB block of `data` appears, 4 KiB-aligned, in `image`.
#[track_caller]
fn assert_absent(image: &Path, data: &[u8]) {
    let blocks: HashSet<&[u8]> = data.chunks_exact(4096).collect();
    let copy = read(image);
    let found = copy.chunks_exact(4096).filter(|b| blocks.contains(b)).count();
    assert_eq!(found, 0, "{} holds {found} blocks of the deleted file", image.display());
}

fn summary_region(json: &serde_json::Value, i: usize) -> &serde_json::Value {
    &json["filesystems"][i]
}

#[test]
fn fresh_fs_aware_copies_of_ext2_3_and_4_hold_every_file_and_no_deleted_data() {
    if !have("mke2fs") || !have("debugfs") || !have("dumpe2fs") {
        return;
    }
    let variants: [(&str, &[&str]); 6] = [
        ("ext2 1K", &["-t", "ext2", "-b", "1024"]),
        ("ext3", &["-t", "ext3"]),
        ("ext4", &["-t", "ext4"]),
        ("ext4 no flex_bg", &["-t", "ext4", "-O", "^flex_bg"]),
        ("ext4 no 64bit 2K", &["-t", "ext4", "-O", "^64bit", "-b", "2048"]),
        ("ext4 meta_bg", &["-t", "ext4", "-O", "^resize_inode,meta_bg"]),
    ];
    for (i, (what, args)) in variants.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.img");
        let gone = ext_image(&src, 48 * MIB, args, 100 + i as u64);
        let copy = dir.path().join("copy.img");
        let out =
            ok(&["sync", "--fs-aware", "--json", "--progress=none", src.to_str().unwrap(), copy.to_str().unwrap()]);
        let json = out.json();
        let region = summary_region(&json, 0);
        assert!(region["filesystem"].as_str().unwrap().starts_with("ext"), "{what}: {json}");
        assert!(region["whole"].is_null(), "{what}: {json}");
        let used = region["used"].as_u64().unwrap();
        // Only what the filesystem uses was read (its journal and tables are used but may be
        // holes in the image), and the copy holds no more.
        let read_bytes = json["bytes_read_source"].as_u64().unwrap();
        assert!(read_bytes * 100 <= used * 105, "{what}: read {read_bytes} of {used} used");
        assert!(allocated(&copy) <= used + 64 * 1024, "{what}: {} allocated, {used} used", allocated(&copy));
        assert_files(&copy);
        assert_absent(&copy, &gone);
        // Without --fs-aware the copy is byte-identical, garbage and all.
        let plain = dir.path().join("plain.img");
        ok(&["sync", "-q", src.to_str().unwrap(), plain.to_str().unwrap()]);
        assert_same(&src, &plain);
    }
}

#[test]
fn an_fs_aware_sync_onto_an_old_copy_leaves_its_free_blocks_alone_and_verifies_used_blocks() {
    if !have("mke2fs") || !have("debugfs") || !have("dumpe2fs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    // 1 KiB blocks (mke2fs's choice at this size), compared in blocks of the same size: a
    // comparison block holding used and free filesystem blocks is written whole.
    ext_image(&src, 40 * MIB, &["-t", "ext4", "-b", "1024"], 7);
    let dst = dir.path().join("dst.img");
    write_file(&dst, &random_bytes(40 * MIB, 8));
    let before = read(&dst);
    let out =
        ok(&["sync", "--fs-aware", "--verify", "--block-size", "1K", src.to_str().unwrap(), dst.to_str().unwrap()]);
    assert!(out.stderr_text().contains("verified (used blocks only)"), "{}", out.stderr_text());
    assert!(out.stderr_text().contains("fs-aware: bytes 0.."), "{}", out.stderr_text());
    assert_files(&dst);
    let after = read(&dst);
    for (a, b) in free_ranges(&src) {
        assert!(after[a..b] == before[a..b], "free bytes {a}..{b} were written");
    }
    // A rerun finds nothing to do, and compare sees the copy equal only in used blocks.
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    let again = ok(&["sync", "--fs-aware", "--block-size", "1K", "--json", "--progress=none", s, d]);
    assert_eq!(again.json()["bytes_differing"], 0, "a rerun");
    assert_eq!(run(&["compare", "-q", s, d]).code(), 1);
    let cmp = ok(&["compare", "--fs-aware", "--block-size", "1K", s, d]);
    assert!(cmp.stdout_text().contains("identical"), "{}", cmp.stdout_text());
}

#[test]
fn a_partitioned_disk_is_read_partition_by_partition_and_unknown_ones_are_copied_whole() {
    if !have("mke2fs") || !have("sgdisk") || !have("mkswap") || !have("debugfs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    write_file(&disk, &random_bytes(96 * MIB, 31));
    let d = disk.to_str().unwrap();
    tool("sgdisk", &["-n", "1:2048:+40M", "-n", "2:0:+16M", "-t", "2:8200", "-n", "3:0:+16M", d]);
    let part = |n: usize| -> (usize, usize) {
        let out = tool("sgdisk", &["-i", &n.to_string(), d]);
        let sector = |key: &str| -> usize {
            out.lines().find_map(|l| l.strip_prefix(key)).unwrap().split_whitespace().next().unwrap().parse().unwrap()
        };
        let (first, last) = (sector("First sector:"), sector("Last sector:"));
        (first * 512, (last + 1 - first) * 512)
    };
    // Partition 1: ext4 made in an image of its own, then put in place; 2: swap; 3: junk.
    let (start1, len1) = part(1);
    let fs = dir.path().join("fs.img");
    let gone = ext_image(&fs, len1, &["-t", "ext4"], 32);
    ok(&["sync", "-q", fs.to_str().unwrap(), &format!("{d}#1")]);
    let (start2, len2) = part(2);
    let swap = dir.path().join("swap.img");
    write_file(&swap, &random_bytes(len2, 33));
    tool("mkswap", &["-L", "sw", swap.to_str().unwrap()]);
    ok(&["sync", "-q", swap.to_str().unwrap(), &format!("{d}#2")]);
    let (start3, len3) = part(3);

    let copy = dir.path().join("copy.img");
    let out = ok(&["sync", "--fs-aware", "--json", "--progress=none", d, copy.to_str().unwrap()]);
    let json = out.json();
    let regions = json["filesystems"].as_array().unwrap();
    assert_eq!(regions.len(), 3, "{json}");
    assert_eq!(regions[0]["filesystem"], "ext4");
    assert_eq!(regions[1]["filesystem"], "swap");
    assert!(regions[1]["detail"].as_str().unwrap().contains("\"sw\""), "{json}");
    assert!(regions[2]["filesystem"].is_null() && regions[2]["whole"].is_string(), "{json}");
    let (source, copied) = (read(&disk), read(&copy));
    // The table, and everything outside the partitions, as they were.
    assert_eq!(copied[..start1], source[..start1]);
    assert_eq!(copied[start3 + len3..], source[start3 + len3..]);
    // Swap: its header page only; the unknown partition whole.
    assert_eq!(copied[start2..start2 + 4096], source[start2..start2 + 4096]);
    assert!(copied[start2 + 4096..start2 + len2].iter().all(|&b| b == 0));
    assert_eq!(copied[start3..start3 + len3], source[start3..start3 + len3]);
    // The filesystem, read back through the partition address.
    let back = dir.path().join("back.img");
    ok(&["sync", "-q", &format!("{}#1", copy.display()), back.to_str().unwrap()]);
    assert_files(&back);
    assert_absent(&back, &gone);
    let _ = start2;
}

#[test]
fn an_fs_aware_backup_stores_no_deleted_data_and_restores_every_file() {
    if !have("mke2fs") || !have("debugfs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let gone = ext_image(&src, 40 * MIB, &["-t", "ext4"], 41);
    let chain = dir.path().join("chain");
    let (s, c) = (src.to_str().unwrap(), chain.to_str().unwrap());
    let first = ok(&["backup", "--fs-aware", "--json", "--progress=none", s, c]).json();
    let base = Path::new(first["file"].as_str().unwrap()).to_path_buf();
    let used = first["filesystems"][0]["used"].as_u64().unwrap();
    assert!(allocated(&base) <= used + 64 * 1024, "{} allocated, {used} used", allocated(&base));
    // A new file, then a second point: it records about that file only.
    let extra = dir.path().join("extra");
    write_file(&extra, &random_bytes(MIB, 42));
    tool("debugfs", &["-w", "-R", &format!("write {} extra", extra.display()), s]);
    let second = ok(&["backup", "--fs-aware", "--json", "--progress=none", s, c]).json();
    let recorded = second["bytes_written"].as_u64().unwrap();
    assert!(recorded < 2 * MIB as u64, "the second point recorded {recorded} bytes");
    let restored = dir.path().join("restored.img");
    ok(&["restore", "-q", c, restored.to_str().unwrap()]);
    assert_files(&restored);
    assert_absent(&restored, &gone);
    let out = dir.path().join("extra.out");
    tool("debugfs", &["-R", &format!("dump /extra {}", out.display()), restored.to_str().unwrap()]);
    assert_eq!(read(&out), read(&extra));
    // diff --fs-aware records the new file's blocks and the metadata, not the deleted data.
    let delta = dir.path().join("d.delta");
    let old = dir.path().join("old.img");
    ok(&["restore", "-q", "--at", "0", c, old.to_str().unwrap()]);
    ok(&["diff", "-q", "--fs-aware", s, old.to_str().unwrap(), "-o", delta.to_str().unwrap()]);
    assert!(std::fs::metadata(&delta).unwrap().len() < 2 * MIB as u64);
    ok(&["apply", "-q", delta.to_str().unwrap(), old.to_str().unwrap()]);
    assert_files(&old);
}

#[test]
fn something_that_is_not_a_filesystem_is_copied_whole_and_the_summary_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("junk.img");
    write_file(&src, &random_bytes(4 * MIB, 51));
    let copy = dir.path().join("copy.img");
    let out = ok(&["sync", "--fs-aware", src.to_str().unwrap(), copy.to_str().unwrap()]);
    assert!(out.stderr_text().contains("copied whole, no filesystem recognised"), "{}", out.stderr_text());
    assert_same(&src, &copy);
}

#[test]
fn fs_aware_over_ssh_pushes_and_pulls_only_used_blocks() {
    if !have("mke2fs") || !have("debugfs") || !have("dumpe2fs") {
        return;
    }
    let Some(env) = RemoteDir::new("blksync-fs-aware") else { return };
    let src = env.path("src.img");
    let gone = ext_image(Path::new(&src), 40 * MIB, &["-t", "ext4", "-b", "4096"], 61);
    let free = free_ranges(Path::new(&src));
    for (name, push) in [("pushed.img", true), ("pulled.img", false)] {
        let dst = env.path(name);
        write_file(Path::new(&dst), &random_bytes(40 * MIB, 62));
        let before = read(Path::new(&dst));
        let (from, to) = if push { (src.clone(), env.remote(name)) } else { (env.remote("src.img"), dst.clone()) };
        let out = ok(&["sync", "--fs-aware", "--verify", "--json", "--progress=none", "-e", &env.rsh, &from, &to]);
        let json = out.json();
        assert_eq!(json["verified"], true);
        assert_eq!(json["filesystems"][0]["filesystem"], "ext4", "{json}");
        assert_files(Path::new(&dst));
        let after = read(Path::new(&dst));
        for &(a, b) in &free {
            assert!(after[a..b] == before[a..b], "{name}: free bytes {a}..{b} were written");
        }
        // The deleted file's data never crossed the wire.
        let crossed = json["bytes_sent"].as_u64().unwrap() + json["bytes_received"].as_u64().unwrap();
        let used = json["filesystems"][0]["used"].as_u64().unwrap();
        assert!(crossed < used, "{name}: {crossed} bytes crossed, {used} used");
        // And a new copy over ssh keeps free blocks as holes.
        let fresh = env.path(&format!("fresh-{name}"));
        let to = if push { env.remote(&format!("fresh-{name}")) } else { fresh.clone() };
        ok(&["sync", "-q", "--fs-aware", "-e", &env.rsh, &from, &to]);
        assert_files(Path::new(&fresh));
        assert_absent(Path::new(&fresh), &gone);
    }
}

/// Work on a mounted filesystem: files written and removed (one of [`files`] too), directories
/// made and removed, a file removed while held open (an orphan, held until the snapshot is
/// taken: the file handle is returned).
fn work(mnt: &Path) -> std::fs::File {
    let work = mnt.join("work");
    std::fs::create_dir(&work).unwrap();
    let mut written = Vec::new();
    for i in 0..64 {
        let path = work.join(format!("s{i}"));
        write_file(&path, &random_bytes(200 + i * 97, 70 + i as u64));
        written.push(path);
    }
    let big = work.join("big");
    write_file(&big, &random_bytes(2 * MIB, 69));
    written.push(big);
    for i in 0..10 {
        std::fs::create_dir(work.join(format!("d{i}"))).unwrap();
    }
    for i in (0..10).step_by(2) {
        std::fs::remove_dir(work.join(format!("d{i}"))).unwrap();
    }
    for path in written.iter().step_by(4) {
        std::fs::remove_file(path).unwrap();
    }
    std::fs::remove_file(mnt.join("small")).unwrap();
    let orphan_path = work.join("orphan");
    write_file(&orphan_path, &random_bytes(MIB, 68));
    let orphan = std::fs::File::open(&orphan_path).unwrap();
    orphan.sync_all().unwrap();
    std::fs::remove_file(&orphan_path).unwrap();
    orphan
}

/// `e2fsck -fy` (journal replayed, orphans released): exit 0 or 1.
#[track_caller]
fn fsck_fix(image: &Path) {
    let out = Command::new("e2fsck").arg("-fy").arg(image).output().unwrap();
    assert!(matches!(out.status.code(), Some(0 | 1)), "e2fsck -fy: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn an_fs_aware_sync_of_a_snapshot_of_a_mounted_ext3_or_ext4_copies_what_replaying_its_journal_needs() {
    if !have_all(&["mke2fs", "debugfs", "dumpe2fs", "e2fsck", "diff"]) || !can_use_loop_devices() {
        return;
    }
    for (i, (what, args)) in
        [("ext4", &["-t", "ext4"][..]), ("ext3", &["-t", "ext3", "-b", "4096"])].into_iter().enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("mounted.img");
        let gone = ext_image(&image, 48 * MIB, args, 80 + i as u64);
        let snap = dir.path().join("snap.img");
        snapshot_while_mounted(&image, &snap, work);
        // Over junk: blocks the map calls free keep it.
        let dst = dir.path().join("dst.img");
        write_file(&dst, &random_bytes(48 * MIB, 90 + i as u64));
        let (s, d) = (snap.to_str().unwrap(), dst.to_str().unwrap());
        let json = ok(&["sync", "--fs-aware", "--json", "--progress=none", s, d]).json();
        let region = summary_region(&json, 0);
        assert_eq!(region["filesystem"], what, "{json}");
        assert!(region["whole"].is_null(), "{what}: {json}");
        assert!(region["detail"].as_str().unwrap().contains("blocks its journal replays"), "{what}: {json}");
        let used = region["used"].as_u64().unwrap();
        assert!(used < 24 * MIB as u64, "{what}: {used} bytes used");
        // Replayed, the copy is clean and holds what the replayed snapshot holds.
        let replayed = dir.path().join("replayed.img");
        tool("cp", &["--sparse=always", s, replayed.to_str().unwrap()]);
        fsck_fix(&replayed);
        fsck_fix(&dst);
        let fsck = Command::new("e2fsck").args(["-fn", d]).output().unwrap();
        assert!(fsck.status.success(), "{what}: e2fsck -fn: {}", String::from_utf8_lossy(&fsck.stdout));
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for (image, tree) in [(&replayed, &a), (&dst, &b)] {
            std::fs::create_dir(tree).unwrap();
            tool("debugfs", &["-R", &format!("rdump / {}", tree.display()), image.to_str().unwrap()]);
        }
        tool("diff", &["-r", a.to_str().unwrap(), b.to_str().unwrap()]);
        let has = |name: &str| b.join(name).exists();
        assert!(has("work/s1") && has("work/d1") && !has("work/s0") && !has("small"), "{what}: the work is missing");
        assert_absent(&dst, &gone);
    }
}
