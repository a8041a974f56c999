//! `blksync clone` (issue 11, part 4): whole disks (GPT and DOS) onto larger and smaller disks,
//! partitions and filesystem images onto partitions, checked with the real tools: `e2fsck -fn`,
//! `blkid` (UUID, LABEL), `sfdisk -J` (PARTUUID, sizes), `sgdisk -v`, every file dumped with
//! `debugfs`. A partition is checked by copying it out (`sync DISK#N FILE`), so no loop device
//! or mount is needed.

mod support;

use std::path::Path;
use std::process::Command;

use support::*;

const MIB: usize = 1 << 20;

/// The files of every filesystem made here.
fn files() -> Vec<(String, Vec<u8>)> {
    (0..6).map(|i| (format!("f{i}"), random_bytes(700_000 + i * 1000, 50 + i as u64))).collect()
}

/// An ext4 filesystem of `size` bytes over junk, with [`files`] and label `label`.
fn ext4(path: &Path, size: usize, label: &str) {
    write_file(path, &random_bytes(size, 9));
    let dir = tempfile::tempdir().unwrap();
    for (name, data) in files() {
        write_file(&dir.path().join(name), &data);
    }
    tool(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-E",
            "nodiscard",
            "-L",
            label,
            "-d",
            dir.path().to_str().unwrap(),
            path.to_str().unwrap(),
        ],
    );
}

/// Partition `n` of `disk`: (start, len, PARTUUID) from `sfdisk -J`.
fn part(disk: &Path, n: u32) -> (u64, u64, String) {
    let json: serde_json::Value = serde_json::from_str(&tool("sfdisk", &["-J", disk.to_str().unwrap()])).unwrap();
    let t = &json["partitiontable"];
    let p = t["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"].as_str().unwrap().ends_with(&n.to_string()))
        .unwrap_or_else(|| panic!("no partition {n} in {json}"));
    (
        p["start"].as_u64().unwrap() * 512,
        p["size"].as_u64().unwrap() * 512,
        p["uuid"].as_str().unwrap_or_default().to_lowercase(),
    )
}

/// Partition `n` of `disk` made an ext4 filesystem ([`ext4`]) labelled `label`, built in `dir`.
fn put_ext4(disk: &Path, n: u32, label: &str, dir: &Path) {
    let (_, len, _) = part(disk, n);
    let fs = dir.join(format!("p{n}.fs"));
    ext4(&fs, len as usize, label);
    ok(&["sync", "-q", fs.to_str().unwrap(), &format!("{}#{n}", disk.display())]);
}

/// Partition `n` of `disk` made a swap area by `mkswap -q ARGS`, built in `dir`.
fn put_swap(disk: &Path, n: u32, args: &[&str], dir: &Path) {
    let (_, len, _) = part(disk, n);
    let swap = dir.join(format!("swap{n}.fs"));
    write_file(&swap, &vec![0; len as usize]);
    let mut all = vec!["-q"];
    all.extend_from_slice(args);
    all.push(swap.to_str().unwrap());
    tool("mkswap", &all);
    ok(&["sync", "-q", swap.to_str().unwrap(), &format!("{}#{n}", disk.display())]);
}

/// `blkid -p` of a file: (TYPE, UUID, LABEL).
fn blkid(path: &Path) -> (String, String, String) {
    let out = tool("blkid", &["-p", "-o", "export", path.to_str().unwrap()]);
    let get = |k: &str| out.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).unwrap_or_default().to_string();
    (get("TYPE"), get("UUID"), get("LABEL"))
}

/// Partition `n` of `disk` copied out to a file.
fn extract(disk: &Path, n: u32, dir: &Path) -> std::path::PathBuf {
    let out = dir.join(format!("out{n}.img"));
    let _ = std::fs::remove_file(&out);
    ok(&["sync", "-q", &format!("{}#{n}", disk.display()), out.to_str().unwrap()]);
    out
}

/// `image` is a clean ext filesystem of `size` bytes holding [`files`].
#[track_caller]
fn assert_fs(image: &Path, size: u64) {
    let p = image.to_str().unwrap();
    let fsck = Command::new("e2fsck").args(["-fn", p]).output().unwrap();
    assert!(fsck.status.success(), "e2fsck -fn {p}: {}", String::from_utf8_lossy(&fsck.stdout));
    let dumpe2fs = tool("dumpe2fs", &["-h", p]);
    let field = |k: &str| -> u64 { dumpe2fs.lines().find_map(|l| l.strip_prefix(k)).unwrap().trim().parse().unwrap() };
    let fs_size = field("Block count:") * field("Block size:");
    assert!(fs_size <= size && fs_size + 4 * 4096 > size, "filesystem is {fs_size} bytes, partition {size}");
    let dir = tempfile::tempdir().unwrap();
    for (name, data) in files() {
        let out = dir.path().join(&name);
        tool("debugfs", &["-R", &format!("dump /{name} {}", out.display()), p]);
        assert_eq!(read(&out), data, "{name} in {p}");
    }
}

#[track_caller]
fn sgdisk_clean(disk: &Path) {
    let v = tool("sgdisk", &["-v", disk.to_str().unwrap()]);
    assert!(v.contains("No problems found"), "{v}");
}

/// A 64 MiB GPT disk: 1 BIOS boot (1 MiB of known bytes), 2 ext4 "root" (40 MiB), 3 swap (the
/// rest), and known bytes in the boot gap (LBA 34..2048).
fn gpt_disk(disk: &Path, dir: &Path) -> Vec<u8> {
    write_file(disk, &random_bytes(64 * MIB, 1));
    let d = disk.to_str().unwrap();
    tool(
        "sgdisk",
        &["-o", "-n", "1:2048:+1M", "-t", "1:ef02", "-n", "2:0:+40M", "-c", "2:root", "-n", "3:0:0", "-t", "3:8200", d],
    );
    let gap = random_bytes(2048 * 512 - 34 * 512, 2);
    patch(disk, 34 * 512, &gap);
    put_ext4(disk, 2, "rootfs", dir);
    put_swap(disk, 3, &["-L", "sw"], dir);
    gap
}

fn clone_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["clone", "--json", "--progress=none"];
    all.extend_from_slice(args);
    ok(&all).json()
}

#[test]
fn a_gpt_disk_onto_a_larger_disk_grows_the_named_partition_and_keeps_ids_boot_gap_and_files() {
    if !have_all(&["sgdisk", "sfdisk", "mke2fs", "debugfs", "e2fsck", "resize2fs", "mkswap", "blkid", "dumpe2fs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    let gap = gpt_disk(&src, dir.path());
    write_file(&dst, &random_bytes(128 * MIB, 3));
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    let before = read(&src);
    let json = clone_json(&["--grow", "2", s, d]);
    assert_eq!(read(&src), before, "the source changed");
    assert_eq!(json["table"], "gpt", "{json}");
    let parts = json["partitions"].as_array().unwrap();
    assert_eq!(parts[0]["action"], "copied-whole", "{json}");
    assert_eq!(parts[1]["action"], "grown", "{json}");
    assert_eq!(parts[2]["action"], "copied", "{json}");
    sgdisk_clean(&dst);
    // BIOS boot partition and boot gap as they were.
    let copied = read(&dst);
    assert_eq!(&copied[34 * 512..2048 * 512], &gap[..]);
    let (s1, l1, _) = part(&src, 1);
    assert_eq!(copied[s1 as usize..(s1 + l1) as usize], before[s1 as usize..(s1 + l1) as usize]);
    // Root fills the disk up to swap, which moved to the end with its size.
    let (ss3, sl3, su3) = part(&src, 3);
    let (ds2, dl2, du2) = part(&dst, 2);
    let (ds3, dl3, du3) = part(&dst, 3);
    let (_, _, su2) = part(&src, 2);
    assert_eq!((dl3, du3.clone()), (sl3, su3), "swap keeps its size and PARTUUID");
    assert!(ds3 > ss3 && ds3 + dl3 > 127 * MIB as u64, "swap at the end: {ds3}");
    assert_eq!(ds2 + dl2, ds3);
    assert_eq!(du2, su2, "PARTUUID kept");
    let root = extract(&dst, 2, dir.path());
    assert_fs(&root, dl2);
    assert_eq!(blkid(&root), ("ext4".into(), blkid(&extract(&src, 2, dir.path())).1, "rootfs".into()));
    let swap = extract(&dst, 3, dir.path());
    assert_eq!(blkid(&swap).0, "swap");
    assert_eq!(blkid(&swap).2, "sw");

    // A second clone after a change moves about what changed.
    let fs = dir.path().join("root.fs");
    ok(&["sync", "-q", &format!("{s}#2"), fs.to_str().unwrap()]);
    let new = dir.path().join("new");
    write_file(&new, &random_bytes(2 * MIB, 77));
    tool("debugfs", &["-w", "-R", &format!("write {} new", new.display()), fs.to_str().unwrap()]);
    ok(&["sync", "-q", fs.to_str().unwrap(), &format!("{s}#2")]);
    let again = clone_json(&["--grow", "2", s, d]);
    let written = again["bytes_written"].as_u64().unwrap();
    eprintln!("rerun after a 2 MiB change wrote {written} bytes");
    assert!(written >= 2 * MIB as u64 && written < 4 * MIB as u64, "{again}");
    assert_eq!(again["table_written"], false, "{again}");
    sgdisk_clean(&dst);
    let root = extract(&dst, 2, dir.path());
    assert_fs(&root, dl2);
    let out = dir.path().join("new.out");
    tool("debugfs", &["-R", &format!("dump /new {}", out.display()), root.to_str().unwrap()]);
    assert_eq!(read(&out), read(&new));
}

#[test]
fn a_gpt_disk_onto_a_smaller_disk_shrinks_root_and_swap_follows_it() {
    if !have_all(&["sgdisk", "sfdisk", "mke2fs", "debugfs", "e2fsck", "resize2fs", "mkswap", "blkid", "dumpe2fs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    gpt_disk(&src, dir.path());
    write_file(&dst, &random_bytes(40 * MIB, 4));
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    let before = read(&src);
    // A dry run says what would be done and writes nothing.
    let untouched = read(&dst);
    let plan = clone_json(&["-n", "--grow", "2", s, d]);
    assert_eq!(
        (plan["dry_run"].clone(), plan["partitions"][1]["action"].clone()),
        (true.into(), "shrunk".into()),
        "{plan}"
    );
    assert_eq!(read(&dst), untouched, "a dry run wrote");
    let json = clone_json(&["--grow", "2", s, d]);
    assert_eq!(read(&src), before, "the source changed");
    let parts = json["partitions"].as_array().unwrap();
    assert_eq!(parts[1]["action"], "shrunk", "{json}");
    assert!(json["temp_dir"].is_string(), "{json}");
    assert!(no_clone_temps(dir.path()), "a temporary copy was left");
    sgdisk_clean(&dst);
    let (_, dl2, du2) = part(&dst, 2);
    let (ds3, dl3, du3) = part(&dst, 3);
    assert_eq!(du2, part(&src, 2).2);
    assert_eq!((dl3, du3), (part(&src, 3).1, part(&src, 3).2));
    assert!(ds3 + dl3 <= 40 * MIB as u64);
    let root = extract(&dst, 2, dir.path());
    assert_fs(&root, dl2);
    assert_eq!(blkid(&root).1, blkid(&extract(&src, 2, dir.path())).1);
    assert_eq!(blkid(&root).2, "rootfs");
    // A rerun redoes the shrink (a new temporary copy); the destination gets what differs.
    let again = clone_json(&["--grow", "2", s, d]);
    eprintln!("rerun of a shrink, nothing changed, wrote {} bytes", again["bytes_written"]);
    assert_eq!(again["partitions"][1]["action"], "shrunk", "{again}");
    assert_eq!(again["table_written"], false, "{again}");
    assert_fs(&extract(&dst, 2, dir.path()), dl2);
}

#[test]
fn data_that_cannot_fit_is_refused_before_any_write_saying_how_much_room_it_needs() {
    if !have_all(&["sgdisk", "sfdisk", "mke2fs", "debugfs", "e2fsck", "resize2fs", "mkswap"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    gpt_disk(&src, dir.path());
    // Room for swap (about 22 MiB) but not for root's 4 MiB of files with it.
    write_file(&dst, &random_bytes(26 * MIB, 5));
    let before = read(&dst);
    let out = run(&["clone", "--grow", "2", src.to_str().unwrap(), dst.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5), "{}", out.stderr_text());
    assert!(
        out.stderr_text().contains("needs at least") && out.stderr_text().contains("resize2fs -P"),
        "{}",
        out.stderr_text()
    );
    assert_eq!(read(&dst), before, "the destination was written");
    assert!(no_clone_temps(dir.path()), "a temporary copy was left");
}

/// A 64 MiB DOS disk: 1 ext4 (16 MiB), 2 ext4 root (the rest), boot code and gap of known bytes.
fn dos_disk(disk: &Path, dir: &Path) -> (Vec<u8>, Vec<u8>) {
    write_file(disk, &random_bytes(64 * MIB, 6));
    let d = disk.to_str().unwrap();
    tool_in("sfdisk", &["-q", d], "label: dos\nlabel-id: 0x12345678\n,16M,83\n,,83\n");
    let boot = random_bytes(440, 7);
    patch(disk, 0, &boot);
    let gap = random_bytes(2047 * 512, 8);
    patch(disk, 512, &gap);
    for (n, label) in [(1, "boot"), (2, "root")] {
        put_ext4(disk, n, label, dir);
    }
    (boot, gap)
}

/// bsync's 446/512 rule: a destination whose DOS table already holds the source's partitions
/// (same numbers, starts, types, each at least as large) keeps it, and each partition fills the
/// destination's; one without such a table gets the source's, fitted. Either way the gap
/// between two partitions that keep their place is copied.
#[test]
fn a_dos_destination_with_a_compatible_table_keeps_it_and_gaps_between_partitions_are_copied() {
    if !have_all(&["sfdisk", "mke2fs", "debugfs", "e2fsck", "resize2fs", "blkid", "dumpe2fs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    write_file(&src, &random_bytes(64 * MIB, 30));
    let s = src.to_str().unwrap();
    // 1 at 1 MiB (16 MiB), a 1 MiB gap of known bytes, 2 at 18 MiB to the end.
    tool_in(
        "sfdisk",
        &["-q", s],
        "label: dos\nlabel-id: 0x12345678\nstart=2048,size=32768,type=83\nstart=36864,type=83\n",
    );
    let boot = random_bytes(440, 31);
    patch(&src, 0, &boot);
    let gap = random_bytes(MIB, 32);
    patch(&src, 17 * MIB as u64, &gap);
    for (n, label) in [(1, "boot"), (2, "root")] {
        put_ext4(&src, n, label, dir.path());
    }

    // A destination partitioned by hand: the same starts, 2 larger (70 MiB) but not to the
    // end of the disk, another signature.
    let kept = dir.path().join("kept.img");
    write_file(&kept, &random_bytes(100 * MIB, 33));
    let k = kept.to_str().unwrap();
    tool_in(
        "sfdisk",
        &["-q", k],
        "label: dos\nlabel-id: 0xdeadbeef\nstart=2048,size=32768,type=83\nstart=36864,size=143360,type=83\n",
    );
    let json = clone_json(&[s, k]);
    assert_eq!(json["table_kept"], true, "{json}");
    let actions: Vec<&str> =
        json["partitions"].as_array().unwrap().iter().map(|p| p["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["copied", "grown"], "{json}");
    let (start2, len2, uuid2) = part(&kept, 2);
    assert_eq!((start2, len2), (18 * MIB as u64, 70 * MIB as u64), "the destination's table was not kept");
    // The source's boot code and signature: PARTUUIDs are the source's.
    assert_eq!(uuid2, part(&src, 2).2);
    let head = read(&kept);
    assert_eq!(head[..440], boot[..]);
    assert_eq!(head[17 * MIB..18 * MIB], gap[..], "the gap between the partitions");
    let root = extract(&kept, 2, dir.path());
    assert_fs(&root, len2);
    assert_eq!(blkid(&root).2, "root");
    // A rerun writes only the few blocks resize2fs stamps anew (superblocks, descriptors).
    let again = clone_json(&[s, k]);
    assert!(again["bytes_written"].as_u64().unwrap() < MIB as u64, "{again}");
    assert_eq!(again["table_kept"], true, "{again}");

    // Junk instead of a table: the source's table, fitted, the last partition grown to the end;
    // the gap still copied.
    let fitted = dir.path().join("fitted.img");
    write_file(&fitted, &random_bytes(100 * MIB, 34));
    let f = fitted.to_str().unwrap();
    let json = clone_json(&[s, f]);
    assert_eq!(json["table_kept"], false, "{json}");
    let (start2, len2, _) = part(&fitted, 2);
    assert_eq!(start2 + len2, 100 * MIB as u64);
    assert_eq!(read(&fitted)[17 * MIB..18 * MIB], gap[..], "the gap between the partitions");
    assert_fs(&extract(&fitted, 2, dir.path()), len2);
}

#[test]
fn a_dos_disk_grows_and_shrinks_its_last_partition_keeping_boot_code_gap_and_partuuids() {
    if !have_all(&["sfdisk", "mke2fs", "debugfs", "e2fsck", "resize2fs", "blkid", "dumpe2fs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let (boot, gap) = dos_disk(&src, dir.path());
    for (size, action) in [(100 * MIB, "grown"), (30 * MIB, "shrunk")] {
        let dst = dir.path().join(format!("dst{size}.img"));
        write_file(&dst, &random_bytes(size, 9));
        let json = clone_json(&[src.to_str().unwrap(), dst.to_str().unwrap()]);
        assert_eq!(json["table"], "dos");
        let parts = json["partitions"].as_array().unwrap();
        assert_eq!(parts[0]["action"], "copied", "{json}");
        assert_eq!(parts[1]["action"], action, "{json}");
        let copied = read(&dst);
        assert_eq!(&copied[..440], &boot[..]);
        assert_eq!(&copied[512..2048 * 512], &gap[..]);
        for n in [1, 2] {
            let (ss, _, su) = part(&src, n);
            let (ds, dl, du) = part(&dst, n);
            assert_eq!((ds, du), (ss, su), "partition {n}: start and PARTUUID");
            let fs = extract(&dst, n, dir.path());
            assert_fs(&fs, dl);
            assert_eq!(blkid(&fs).1, blkid(&extract(&src, n, dir.path())).1);
        }
        let (ds2, dl2, _) = part(&dst, 2);
        assert_eq!(ds2 + dl2, size as u64, "{action}: partition 2 fills the disk");
    }
}

#[test]
fn a_swap_partition_that_grows_is_made_anew_with_its_uuid_and_label() {
    if !have_all(&["sgdisk", "sfdisk", "mke2fs", "debugfs", "mkswap", "blkid"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    gpt_disk(&src, dir.path());
    write_file(&dst, &random_bytes(80 * MIB, 10));
    let json = clone_json(&[src.to_str().unwrap(), dst.to_str().unwrap()]);
    assert_eq!(json["partitions"][2]["action"], "mkswap", "{json}");
    sgdisk_clean(&dst);
    let (_, dl3, _) = part(&dst, 3);
    assert!(dl3 > part(&src, 3).1);
    let (want, got) = (blkid(&extract(&src, 3, dir.path())), blkid(&extract(&dst, 3, dir.path())));
    assert_eq!(got, want, "TYPE, UUID and LABEL of the swap area");
    // mkswap's header says the new size (last page, at byte 1028).
    let header = read(&extract(&dst, 3, dir.path()));
    let last_page = u32::from_le_bytes(header[1028..1032].try_into().unwrap());
    assert_eq!(u64::from(last_page) + 1, dl3 / 4096);
}

#[test]
fn an_unknown_filesystem_is_copied_whole_and_refused_when_it_must_shrink() {
    if !have_all(&["sgdisk", "sfdisk"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    write_file(&src, &random_bytes(32 * MIB, 11));
    tool("sgdisk", &["-o", "-n", "1:2048:+8M", "-n", "2:0:0", src.to_str().unwrap()]);
    let (s2, l2, _) = part(&src, 2);
    let big = dir.path().join("big.img");
    write_file(&big, &random_bytes(48 * MIB, 12));
    let json = clone_json(&[src.to_str().unwrap(), big.to_str().unwrap()]);
    assert_eq!(json["partitions"][1]["action"], "copied-whole", "{json}");
    sgdisk_clean(&big);
    let (copied, source) = (read(&big), read(&src));
    assert_eq!(copied[s2 as usize..(s2 + l2) as usize], source[s2 as usize..(s2 + l2) as usize]);

    let small = dir.path().join("small.img");
    write_file(&small, &random_bytes(24 * MIB, 13));
    let before = read(&small);
    let out = run(&["clone", src.to_str().unwrap(), small.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5), "{}", out.stderr_text());
    assert!(out.stderr_text().contains("copied whole"), "{}", out.stderr_text());
    assert_eq!(read(&small), before, "the destination was written");
}

#[test]
fn a_filesystem_image_and_a_partition_clone_onto_partitions_of_other_sizes() {
    if !have_all(&["sgdisk", "sfdisk", "mke2fs", "debugfs", "e2fsck", "resize2fs", "blkid", "dumpe2fs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = dir.path().join("root.fs");
    ext4(&fs, 20 * MIB, "img");
    let disk = dir.path().join("disk.img");
    write_file(&disk, &random_bytes(64 * MIB, 14));
    let d = disk.to_str().unwrap();
    tool("sgdisk", &["-o", "-n", "1:2048:+36M", "-n", "2:0:0", d]);
    let table = read(&disk)[..34 * 512].to_vec();
    // An image onto a larger partition: grown to fill it.
    let json = clone_json(&[fs.to_str().unwrap(), &format!("{d}#1")]);
    assert_eq!(json["partitions"][0]["action"], "grown", "{json}");
    let (_, l1, _) = part(&disk, 1);
    let p1 = extract(&disk, 1, dir.path());
    assert_fs(&p1, l1);
    assert_eq!(blkid(&p1).1, blkid(&fs).1);
    // That partition onto the smaller partition 2: shrunk, its copy built in --temp-dir.
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let json = clone_json(&["--temp-dir", scratch.to_str().unwrap(), &format!("{d}#1"), &format!("{d}#2")]);
    assert_eq!(json["partitions"][0]["action"], "shrunk", "{json}");
    assert_eq!(json["temp_dir"], scratch.canonicalize().unwrap().to_str().unwrap(), "{json}");
    assert!(no_clone_temps(&scratch), "a temporary copy was left");
    let (_, l2, _) = part(&disk, 2);
    let p2 = extract(&disk, 2, dir.path());
    assert_fs(&p2, l2);
    assert_eq!(blkid(&p2).1, blkid(&fs).1);
    assert_eq!(read(&disk)[..34 * 512], table[..], "the table changed");
    sgdisk_clean(&disk);
}

/// No temporary copy of `clone` is left in `dir`.
fn no_clone_temps(dir: &Path) -> bool {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".blksync-clone-"))
        .collect();
    left.is_empty() && temporary_files(dir).is_empty()
}

#[test]
fn logical_dos_partitions_of_unknown_content_move_and_grow_and_refusals_come_before_any_write() {
    if !have_all(&["sfdisk"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    write_file(&src, &random_bytes(32 * MIB, 15));
    let s = src.to_str().unwrap();
    tool_in("sfdisk", &["-q", s], "label: dos\n,8M,83\n,,5\n,,82\n");
    let (s5, l5, _) = part(&src, 5);
    // The default grows 5, which ends last: copied whole into the larger logical partition.
    write_file(&dst, &random_bytes(48 * MIB, 16));
    let json = clone_json(&[s, dst.to_str().unwrap()]);
    assert_eq!(json["partitions"][1]["action"], "copied-whole", "{json}");
    assert_dos(
        &src,
        &dst,
        &[
            (1, MIB as u64, 8 * MIB as u64, "83"),
            (2, s5 - MIB as u64, 48 * MIB as u64 - (s5 - MIB as u64), "5"),
            (5, s5, 48 * MIB as u64 - s5, "82"),
        ],
    );
    let (copied, source) = (read(&dst), read(&src));
    assert_eq!(copied[s5 as usize..(s5 + l5) as usize], source[s5 as usize..(s5 + l5) as usize]);
    // Growing 1 onto a disk without room for 5 after it, and shrinking 5, are refused (exit 5)
    // with the numbers, before any write.
    let small = dir.path().join("small.img");
    write_file(&small, &random_bytes(20 * MIB, 17));
    let before = read(&small);
    let room = format!("partitions after it need {} bytes", l5 + MIB as u64);
    for (args, says) in [(vec!["--grow", "1"], room.as_str()), (vec![], "is copied whole")] {
        let out = run(&[&["clone"][..], &args, &[s, small.to_str().unwrap()]].concat());
        assert_eq!(out.status.code(), Some(5), "{}", out.stderr_text());
        let err = out.stderr_text();
        assert!(err.contains(says), "{err}");
        assert_eq!(read(&small), before, "the destination was written");
    }
}

/// Partition `n` of `disk` as `sfdisk -J` places it, copied out to a file: what the table
/// says is there, whatever blksync reads.
fn sfdisk_region(disk: &Path, n: u32, dir: &Path) -> std::path::PathBuf {
    let (start, len, _) = part(disk, n);
    let out = dir.join(format!("region{n}.img"));
    write_file(&out, &read(disk)[start as usize..(start + len) as usize]);
    out
}

/// `dst` holds a DOS table with exactly `want` (number, start, size in bytes, type) as
/// `sfdisk -J` reads it, the boot flags and the disk signature of `src` as `sfdisk` and `blkid`
/// read it (so every
/// PARTUUID, `SIGNATURE-NN`, is the source's), and `sfdisk -V` finds no error.
#[track_caller]
fn assert_dos(src: &Path, dst: &Path, want: &[(u32, u64, u64, &str)]) {
    let json = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&tool("sfdisk", &["-J", d.to_str().unwrap()])).unwrap()
    };
    let (s, d) = (json(src), json(dst));
    assert_eq!(d["partitiontable"]["label"], "dos", "{d}");
    assert_eq!(d["partitiontable"]["id"], s["partitiontable"]["id"], "disk signature");
    let got: Vec<(u32, u64, u64, String)> = d["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let node = p["node"].as_str().unwrap();
            let n = node.strip_prefix(dst.to_str().unwrap()).unwrap().parse().unwrap();
            (
                n,
                p["start"].as_u64().unwrap() * 512,
                p["size"].as_u64().unwrap() * 512,
                p["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(u32, u64, u64, String)> = want.iter().map(|&(n, a, l, t)| (n, a, l, t.to_string())).collect();
    assert_eq!(got, want, "sfdisk -J {}", dst.display());
    let boot = |j: &serde_json::Value| -> Vec<bool> {
        let parts = j["partitiontable"]["partitions"].as_array().unwrap();
        parts.iter().map(|p| p["bootable"].as_bool().unwrap_or(false)).collect()
    };
    assert_eq!(boot(&d), boot(&s), "boot flags");
    let ptuuid = |d: &Path| tool("blkid", &["-p", "-o", "value", "-s", "PTUUID", d.to_str().unwrap()]);
    assert_eq!(ptuuid(dst), ptuuid(src));
    let v = tool("sfdisk", &["-V", dst.to_str().unwrap()]);
    assert!(v.contains("No errors detected"), "{v}");
}

/// Debian's installer default on a 64 MiB DOS disk: 1 ext4 root (40 MiB, bootable, with
/// [`files`]), 2 extended, 5 swap (the rest, ending last) with a UUID and label; boot code and
/// gap of known bytes.
fn debian_disk(disk: &Path, dir: &Path) -> (Vec<u8>, Vec<u8>) {
    write_file(disk, &random_bytes(64 * MIB, 30));
    let d = disk.to_str().unwrap();
    tool_in("sfdisk", &["-q", d], "label: dos\nlabel-id: 0x5eed1234\n,40M,83,*\n,,5\n,,82\n");
    let boot = random_bytes(440, 31);
    patch(disk, 0, &boot);
    let gap = random_bytes(2047 * 512, 32);
    patch(disk, 512, &gap);
    put_ext4(disk, 1, "root", dir);
    put_swap(disk, 5, &["-U", "0b5e55ed-0000-4000-8000-000000000005", "-L", "swap5"], dir);
    (boot, gap)
}

#[test]
fn the_debian_dos_layout_grows_or_shrinks_its_logical_swap_keeping_root_ids_and_boot_code() {
    if !have_all(&["sfdisk", "mke2fs", "debugfs", "e2fsck", "resize2fs", "mkswap", "blkid", "dumpe2fs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let (boot, gap) = debian_disk(&src, dir.path());
    let (s1, l1, _) = part(&src, 1);
    let (s2, _, _) = part(&src, 2);
    let (s5, _, _) = part(&src, 5);
    let before = read(&src);
    for size in [128 * MIB as u64, 52 * MIB as u64] {
        let dst = dir.path().join(format!("dst{size}.img"));
        write_file(&dst, &random_bytes(size as usize, 33));
        let json = clone_json(&[src.to_str().unwrap(), dst.to_str().unwrap()]);
        assert_eq!(read(&src), before, "the source changed");
        let actions: Vec<&str> =
            json["partitions"].as_array().unwrap().iter().map(|p| p["action"].as_str().unwrap()).collect();
        assert_eq!(actions, ["copied", "mkswap"], "{json}");
        assert_eq!(json["table_written"], true, "{json}");
        // The swap grows or shrinks to the end of the disk, the extended partition with it.
        assert_dos(&src, &dst, &[(1, s1, l1, "83"), (2, s2, size - s2, "5"), (5, s5, size - s5, "82")]);
        let copied = read(&dst);
        assert_eq!(&copied[..440], &boot[..], "boot code");
        assert_eq!(&copied[512..2048 * 512], &gap[..], "boot gap");
        assert_fs(&sfdisk_region(&dst, 1, dir.path()), l1);
        assert_eq!(blkid(&sfdisk_region(&dst, 1, dir.path())), blkid(&sfdisk_region(&src, 1, dir.path())));
        let swap = blkid(&sfdisk_region(&dst, 5, dir.path()));
        assert_eq!(swap, ("swap".into(), "0b5e55ed-0000-4000-8000-000000000005".into(), "swap5".into()));
        // A second clone onto it writes nothing: the table, the chain and every block are there.
        let again = clone_json(&[src.to_str().unwrap(), dst.to_str().unwrap()]);
        eprintln!("rerun of the Debian layout onto {size} bytes wrote {}", again["bytes_written"]);
        assert_eq!(again["table_written"], false, "{again}");
        assert!(again["bytes_written"].as_u64().unwrap() < 64 * 1024, "{again}");
    }
}

#[test]
fn a_grown_primary_moves_two_logical_partitions_to_the_end_with_their_ebrs() {
    if !have_all(&["sfdisk", "mke2fs", "debugfs", "e2fsck", "resize2fs", "mkswap", "blkid", "dumpe2fs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    write_file(&src, &random_bytes(64 * MIB, 40));
    let s = src.to_str().unwrap();
    // 1 root, 2 extended (5 ext4 of 12 MiB, 6 swap: the rest).
    tool_in("sfdisk", &["-q", s], "label: dos\nlabel-id: 0xabcd0001\n,24M,83\n,,5\n,12M,83\n,,82\n");
    for (n, label) in [(1, "root"), (5, "five")] {
        put_ext4(&src, n, label, dir.path());
    }
    put_swap(&src, 6, &["-L", "six"], dir.path());
    let (s1, _, _) = part(&src, 1);
    let (s2, _, _) = part(&src, 2);
    let (s5, l5, _) = part(&src, 5);
    let (s6, l6, _) = part(&src, 6);
    // Where sfdisk put 6's EBR: the link in 5's EBR, relative to the extended partition.
    let link = &read(&src)[s2 as usize + 462..s2 as usize + 478];
    let ebr6 = s2 + u64::from(u32::from_le_bytes(link[8..12].try_into().unwrap())) * 512;
    for (size, action) in [(100 * MIB as u64, "grown"), (56 * MIB as u64, "shrunk")] {
        let dst = dir.path().join(format!("dst{size}.img"));
        write_file(&dst, &random_bytes(size as usize, 41));
        let json = clone_json(&["--grow", "1", s, dst.to_str().unwrap()]);
        let actions: Vec<&str> =
            json["partitions"].as_array().unwrap().iter().map(|p| p["action"].as_str().unwrap()).collect();
        assert_eq!(actions, [action, "copied", "copied"], "{json}");
        // 6 at the end (aligned down to 1 MiB), 5 before it as far from 6's EBR, each EBR as
        // far before its partition as in the source; 1 fills up to the extended partition.
        let d6 = (size - l6) / MIB as u64 * MIB as u64;
        let d5 = (d6 - (s6 - ebr6) - l5) / MIB as u64 * MIB as u64;
        let d2 = d5 - (s5 - s2);
        assert_dos(
            &src,
            &dst,
            &[(1, s1, d2 - s1, "83"), (2, d2, d6 + l6 - d2, "5"), (5, d5, l5, "83"), (6, d6, l6, "82")],
        );
        let link = &read(&dst)[d2 as usize + 462..d2 as usize + 478];
        assert_eq!(link[4], 0x05, "the link type");
        assert_eq!(d2 + u64::from(u32::from_le_bytes(link[8..12].try_into().unwrap())) * 512, d6 - (s6 - ebr6));
        assert_fs(&sfdisk_region(&dst, 1, dir.path()), d2 - s1);
        assert_fs(&sfdisk_region(&dst, 5, dir.path()), l5);
        for n in [1, 5, 6] {
            assert_eq!(blkid(&sfdisk_region(&dst, n, dir.path())), blkid(&sfdisk_region(&src, n, dir.path())), "{n}");
        }
    }
}

#[test]
fn a_middle_logical_ext4_grows_or_shrinks_and_the_last_logical_moves_to_the_end() {
    if !have_all(&["sfdisk", "mke2fs", "debugfs", "e2fsck", "resize2fs", "blkid", "dumpe2fs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    write_file(&src, &random_bytes(64 * MIB, 50));
    let s = src.to_str().unwrap();
    tool_in("sfdisk", &["-q", s], "label: dos\n,8M,83\n,,5\n,16M,83\n,,83\n");
    for (n, label) in [(1, "one"), (5, "five"), (6, "six")] {
        put_ext4(&src, n, label, dir.path());
    }
    let (s1, l1, _) = part(&src, 1);
    let (s2, _, _) = part(&src, 2);
    let (s5, _, _) = part(&src, 5);
    let (s6, l6, _) = part(&src, 6);
    let gap6 = s6 - (s5 + part(&src, 5).1);
    for (size, action) in [(100 * MIB as u64, "grown"), (60 * MIB as u64, "shrunk")] {
        let dst = dir.path().join(format!("dst{size}.img"));
        write_file(&dst, &random_bytes(size as usize, 51));
        let json = clone_json(&["--grow", "5", s, dst.to_str().unwrap()]);
        let actions: Vec<&str> =
            json["partitions"].as_array().unwrap().iter().map(|p| p["action"].as_str().unwrap()).collect();
        assert_eq!(actions, ["copied", action, "copied"], "{json}");
        let d6 = (size - l6) / MIB as u64 * MIB as u64;
        assert_dos(
            &src,
            &dst,
            &[(1, s1, l1, "83"), (2, s2, d6 + l6 - s2, "5"), (5, s5, d6 - gap6 - s5, "83"), (6, d6, l6, "83")],
        );
        for (n, len) in [(1, l1), (5, d6 - gap6 - s5), (6, l6)] {
            let fs = sfdisk_region(&dst, n, dir.path());
            assert_fs(&fs, len);
            assert_eq!(blkid(&fs), blkid(&sfdisk_region(&src, n, dir.path())), "{n}");
        }
    }
}

const CLONE_TOOLS: [&str; 9] =
    ["sgdisk", "sfdisk", "mke2fs", "debugfs", "e2fsck", "resize2fs", "mkswap", "blkid", "dumpe2fs"];

#[test]
fn a_remote_disk_onto_a_local_disk_is_pulled_into_staging_and_grown_here() {
    if !have_all(&CLONE_TOOLS) {
        return;
    }
    let Some(env) = RemoteDir::new("blksync-clone-pull") else { return };
    let src = Path::new(&env.path("src.img")).to_path_buf();
    let gap = gpt_disk(&src, env.dir.path());
    let before = read(&src);
    let local = tempfile::tempdir().unwrap();
    let dst = local.path().join("dst.img");
    write_file(&dst, &random_bytes(128 * MIB, 23));
    let scratch = local.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let json = ok(&[
        "clone",
        "--json",
        "--progress=none",
        "--grow",
        "2",
        "--temp-dir",
        scratch.to_str().unwrap(),
        "-e",
        &env.rsh,
        &env.remote("src.img"),
        dst.to_str().unwrap(),
    ])
    .json();
    assert!(json["source"].as_str().unwrap().starts_with("root@127.0.0.1:"), "{json}");
    assert_eq!(json["partitions"][1]["action"], "grown", "{json}");
    assert_eq!(read(&src), before, "the source changed");
    assert!(no_clone_temps(&scratch), "a staging copy was left");
    sgdisk_clean(&dst);
    // The boot gap came across although no filesystem holds it.
    assert_eq!(read(&dst)[34 * 512..2048 * 512], gap[..]);
    let (_, l2, u2) = part(&dst, 2);
    assert_eq!(u2, part(&src, 2).2);
    let root = extract(&dst, 2, local.path());
    assert_fs(&root, l2);
    assert_eq!(blkid(&root).2, "rootfs");
    assert_eq!(blkid(&extract(&dst, 3, local.path())), blkid(&extract(&src, 3, local.path())));
}

#[test]
fn a_remote_disk_onto_a_third_host_goes_through_staging_here() {
    if !have_all(&CLONE_TOOLS) {
        return;
    }
    let Some(env) = RemoteDir::new("blksync-clone-relay") else { return };
    let src = Path::new(&env.path("src.img")).to_path_buf();
    gpt_disk(&src, env.dir.path());
    let dst = Path::new(&env.path("dst.img")).to_path_buf();
    write_file(&dst, &random_bytes(96 * MIB, 24));
    // Another name for the test sshd: not the same host to blksync, so nothing runs as a job.
    let third = format!("root@localhost:{}", env.path("dst.img"));
    let json =
        ok(&["clone", "--json", "--progress=none", "--grow", "2", "-e", &env.rsh, &env.remote("src.img"), &third])
            .json();
    assert_eq!(json["destination"], third, "{json}");
    assert_eq!(json["partitions"][1]["action"], "grown", "{json}");
    sgdisk_clean(&dst);
    let (_, l2, u2) = part(&dst, 2);
    assert_eq!(u2, part(&src, 2).2);
    assert_fs(&extract(&dst, 2, env.dir.path()), l2);
}

#[test]
fn a_filesystem_image_onto_a_remote_partition_grows_into_it_and_leaves_the_rest() {
    if !have_all(&CLONE_TOOLS) {
        return;
    }
    let Some(env) = RemoteDir::new("blksync-clone-part") else { return };
    let local = tempfile::tempdir().unwrap();
    let fs = local.path().join("root.fs");
    ext4(&fs, 24 * MIB, "small");
    let disk = Path::new(&env.path("disk.img")).to_path_buf();
    write_file(&disk, &random_bytes(64 * MIB, 25));
    tool("sgdisk", &["-o", "-n", "1:2048:+40M", "-n", "2:0:0", disk.to_str().unwrap()]);
    let (start2, _, _) = part(&disk, 2);
    let (start1, len1, _) = part(&disk, 1);
    let before = read(&disk);
    let json = ok(&[
        "clone",
        "--json",
        "--progress=none",
        "-e",
        &env.rsh,
        fs.to_str().unwrap(),
        &format!("{}#1", env.remote("disk.img")),
    ])
    .json();
    assert_eq!(json["partitions"][0]["action"], "grown", "{json}");
    let after = read(&disk);
    // Only partition 1 changed: the table, the gap before it and partition 2 are as they were.
    assert_eq!(after[..start1 as usize], before[..start1 as usize]);
    assert_eq!(after[start2 as usize..], before[start2 as usize..]);
    let root = extract(&disk, 1, env.dir.path());
    assert_fs(&root, len1);
    assert_eq!(blkid(&root).2, "small");
}

#[test]
fn a_clone_with_both_disks_on_one_remote_host_runs_there() {
    if !have_all(&["sgdisk", "sfdisk", "mke2fs", "debugfs", "e2fsck", "resize2fs", "mkswap", "blkid", "dumpe2fs"]) {
        return;
    }
    let Some(env) = RemoteDir::new("blksync-clone") else { return };
    let (src, dst) = (Path::new(&env.path("src.img")).to_path_buf(), Path::new(&env.path("dst.img")).to_path_buf());
    gpt_disk(&src, env.dir.path());
    write_file(&dst, &random_bytes(96 * MIB, 19));
    let out = ok(&[
        "clone",
        "--json",
        "--progress=none",
        "--grow",
        "2",
        "-e",
        &env.rsh,
        &env.remote("src.img"),
        &env.remote("dst.img"),
    ]);
    let json = out.json();
    assert_eq!(json["partitions"][1]["action"], "grown", "{json}");
    assert!(json["destination"].as_str().unwrap().starts_with("root@127.0.0.1:"), "{json}");
    sgdisk_clean(&dst);
    let (_, l2, u2) = part(&dst, 2);
    assert_eq!(u2, part(&src, 2).2);
    let root = extract(&dst, 2, env.dir.path());
    assert_fs(&root, l2);
    assert_eq!(blkid(&root).2, "rootfs");
}

#[test]
fn a_gpt_disk_onto_an_offset_loop_device_grows_root() {
    if !can_use_loop_devices()
        || !have_all(&["sgdisk", "sfdisk", "mke2fs", "debugfs", "e2fsck", "resize2fs", "mkswap", "blkid", "dumpe2fs"])
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    gpt_disk(&src, dir.path());
    // The destination disk: 96 MiB at byte offset 4 MiB of a larger host file.
    let host = dir.path().join("host.img");
    write_file(&host, &random_bytes(104 * MIB, 18));
    let out = Command::new("losetup")
        .args(["--find", "--show", "--offset", &(4 * MIB).to_string(), "--sizelimit", &(96 * MIB).to_string()])
        .arg(&host)
        .output()
        .unwrap();
    assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
    let dev = Loop { dev: String::from_utf8(out.stdout).unwrap().trim().into() };
    let json = clone_json(&["--grow", "2", src.to_str().unwrap(), dev.path()]);
    assert_eq!(json["partitions"][1]["action"], "grown", "{json}");
    drop(dev);
    let disk = dir.path().join("disk.img");
    write_file(&disk, &read(&host)[4 * MIB..100 * MIB]);
    sgdisk_clean(&disk);
    let (_, l2, u2) = part(&disk, 2);
    assert_eq!(u2, part(&src, 2).2);
    let root = extract(&disk, 2, dir.path());
    assert_fs(&root, l2);
    assert_eq!(blkid(&root).2, "rootfs");
    // Nothing outside the loop device's window changed.
    let (before, after) = (random_bytes(104 * MIB, 18), read(&host));
    assert_eq!(before[..4 * MIB], after[..4 * MIB]);
    assert_eq!(before[100 * MIB..], after[100 * MIB..]);
}

#[test]
fn a_dos_disk_with_logical_partitions_keeps_them_and_grows_its_last_primary() {
    if !have_all(&["sfdisk", "mke2fs", "debugfs", "e2fsck", "resize2fs", "mkswap", "blkid", "dumpe2fs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    write_file(&src, &random_bytes(64 * MIB, 20));
    let s = src.to_str().unwrap();
    // 1 primary, 2 extended (5 ext4, 6 swap), 3 primary root after it.
    tool_in("sfdisk", &["-q", s], "label: dos\n,8M,83\n,30M,5\n,,83\n,16M,83\n,,82\n");
    for (n, label) in [(1, "one"), (5, "five"), (3, "root")] {
        put_ext4(&src, n, label, dir.path());
    }
    put_swap(&src, 6, &["-L", "six"], dir.path());
    write_file(&dst, &random_bytes(100 * MIB, 21));
    let json = clone_json(&[s, dst.to_str().unwrap()]);
    let actions: Vec<&str> =
        json["partitions"].as_array().unwrap().iter().map(|p| p["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["copied", "grown", "copied", "copied"], "{json}");
    for n in [1, 2, 5, 6] {
        assert_eq!(part(&dst, n), part(&src, n), "partition {n}");
    }
    let (s3, l3, u3) = part(&dst, 3);
    assert_eq!((s3, u3), (part(&src, 3).0, part(&src, 3).2));
    assert_eq!(s3 + l3, 100 * MIB as u64);
    for (n, size) in [(1, part(&dst, 1).1), (5, part(&dst, 5).1), (3, l3)] {
        assert_fs(&extract(&dst, n, dir.path()), size);
    }
    assert_eq!(blkid(&extract(&dst, 6, dir.path())), blkid(&extract(&src, 6, dir.path())));
}

#[test]
fn a_local_disk_onto_a_remote_disk_sends_only_used_blocks_and_a_rerun_what_changed() {
    if !have_all(&["sgdisk", "sfdisk", "mke2fs", "debugfs", "e2fsck", "resize2fs", "mkswap", "blkid", "dumpe2fs"]) {
        return;
    }
    let Some(env) = RemoteDir::new("blksync-clone-push") else { return };
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("src.img");
    gpt_disk(&src, local.path());
    let dst = Path::new(&env.path("vm.img")).to_path_buf();
    write_file(&dst, &random_bytes(96 * MIB, 22));
    let s = src.to_str().unwrap();
    let scratch = local.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let t = scratch.to_str().unwrap();
    let args = ["clone", "--json", "--progress=none", "--grow", "2", "--temp-dir", t, "-e", &env.rsh, s];
    let first = ok(&[&args[..], &[&env.remote("vm.img")]].concat()).json();
    assert_eq!(first["partitions"][1]["action"], "grown", "{first}");
    // About the used blocks (the files: 4 MiB), not the disk's 96 MiB.
    assert!(first["bytes_written"].as_u64().unwrap() < 16 * MIB as u64, "{first}");
    sgdisk_clean(&dst);
    let (_, l2, u2) = part(&dst, 2);
    assert_eq!(u2, part(&src, 2).2);
    let root = extract(&dst, 2, env.dir.path());
    assert_fs(&root, l2);
    assert_eq!(blkid(&root).2, "rootfs");
    assert!(no_clone_temps(&scratch), "a temporary copy was left");

    // A 1 MiB change: the rerun writes about that much on the remote disk.
    let fs = local.path().join("root.fs");
    ok(&["sync", "-q", &format!("{s}#2"), fs.to_str().unwrap()]);
    let new = local.path().join("new");
    write_file(&new, &random_bytes(MIB, 78));
    tool("debugfs", &["-w", "-R", &format!("write {} new", new.display()), fs.to_str().unwrap()]);
    ok(&["sync", "-q", fs.to_str().unwrap(), &format!("{s}#2")]);
    let again = ok(&[&args[..], &[&env.remote("vm.img")]].concat()).json();
    let written = again["bytes_written"].as_u64().unwrap();
    eprintln!("remote rerun after a 1 MiB change wrote {written} bytes");
    assert!(written >= MIB as u64 && written < 3 * MIB as u64, "{again}");
    assert_fs(&extract(&dst, 2, env.dir.path()), l2);
}

#[test]
fn the_debian_dos_layout_onto_a_remote_disk_with_a_grown_root_moves_the_swap_and_its_ebr_there() {
    if !have_all(&["sfdisk", "mke2fs", "debugfs", "e2fsck", "resize2fs", "mkswap", "blkid", "dumpe2fs"]) {
        return;
    }
    let Some(env) = RemoteDir::new("blksync-clone-ebr") else { return };
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("src.img");
    debian_disk(&src, local.path());
    let dst = Path::new(&env.path("vm.img")).to_path_buf();
    let size = 96 * MIB as u64;
    write_file(&dst, &random_bytes(size as usize, 60));
    let scratch = local.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let (s, t) = (src.to_str().unwrap(), scratch.to_str().unwrap());
    let args = ["clone", "--json", "--progress=none", "--grow", "1", "--temp-dir", t, "-e", &env.rsh, s];
    let json = ok(&[&args[..], &[&env.remote("vm.img")]].concat()).json();
    assert_eq!(json["partitions"][0]["action"], "grown", "{json}");
    // The swap at the end with its size, its EBR 1 MiB before it as sfdisk put it; root
    // fills the disk up to the extended partition, which starts at that EBR.
    let (s1, _, _) = part(&src, 1);
    let (s2, _, _) = part(&src, 2);
    let (s5, l5, _) = part(&src, 5);
    let d5 = (size - l5) / MIB as u64 * MIB as u64;
    let d2 = d5 - (s5 - s2);
    assert_dos(&src, &dst, &[(1, s1, d2 - s1, "83"), (2, d2, d5 + l5 - d2, "5"), (5, d5, l5, "82")]);
    assert_fs(&sfdisk_region(&dst, 1, env.dir.path()), d2 - s1);
    let swap = blkid(&sfdisk_region(&dst, 5, env.dir.path()));
    assert_eq!(swap, ("swap".into(), "0b5e55ed-0000-4000-8000-000000000005".into(), "swap5".into()));
    assert!(no_clone_temps(&scratch), "a temporary copy was left");
}

#[test]
fn a_snapshot_of_a_mounted_ext4_clones_onto_larger_smaller_and_equal_files_replayed() {
    if !have_all(&["mke2fs", "debugfs", "e2fsck", "resize2fs", "dumpe2fs", "blkid"]) || !can_use_loop_devices() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = dir.path().join("live.fs");
    ext4(&fs, 24 * MIB, "live");
    let added = random_bytes(900_000, 60);
    let snap = dir.path().join("snap.fs");
    snapshot_while_mounted(&fs, &snap, |mnt| {
        write_file(&mnt.join("added"), &added);
        std::fs::File::open(mnt.join("added")).unwrap().sync_all().unwrap();
    });
    for (size, action) in [(32 * MIB, "grown"), (16 * MIB, "shrunk"), (24 * MIB, "copied")] {
        let dst = dir.path().join(format!("{action}.img"));
        write_file(&dst, &random_bytes(size, 61));
        let json = clone_json(&[snap.to_str().unwrap(), dst.to_str().unwrap()]);
        assert_eq!(json["partitions"][0]["action"], action, "{json}");
        // Copied as it is, the journal is replayed where the copy is checked or mounted.
        if action == "copied" {
            let out = Command::new("e2fsck").arg("-fy").arg(&dst).output().unwrap();
            assert!(matches!(out.status.code(), Some(0 | 1)), "{}", String::from_utf8_lossy(&out.stdout));
        }
        assert_fs(&dst, size as u64);
        assert_eq!(blkid(&dst).1, blkid(&fs).1);
        let out = dir.path().join("added.out");
        tool("debugfs", &["-R", &format!("dump /added {}", out.display()), dst.to_str().unwrap()]);
        assert_eq!(read(&out), added, "{action}");
    }
}
