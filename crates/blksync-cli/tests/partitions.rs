//! Partitions as endpoints (issue 11, part 1): `DISK#N`, `DISK#name=NAME`, `DISK#partuuid=UUID`
//! of DOS and GPT disks made by the real tools (sfdisk, sgdisk), as source and target, here and
//! through the test sshd. Nothing outside the partition may change.

mod support;

use std::path::Path;

use support::*;

const MIB: usize = 1 << 20;

/// A 64 MiB GPT disk of junk with partitions `boot` (16 MiB at 1 MiB) and `root` (24 MiB after).
fn gpt_disk(path: &Path) {
    write_file(path, &random_bytes(64 * MIB, 3));
    let p = path.to_str().unwrap();
    tool_in("sgdisk", &["-o", "-n", "1:2048:+16M", "-c", "1:boot", "-n", "2:0:+24M", "-c", "2:root", p], "");
}

/// `(start, len)` in bytes of partition `n` of `path`, from `sfdisk -J`, and its PARTUUID.
fn sfdisk_partition(path: &Path, n: usize) -> (u64, u64, String) {
    let json: serde_json::Value =
        serde_json::from_str(&tool_in("sfdisk", &["-J", path.to_str().unwrap()], "")).unwrap();
    let table = &json["partitiontable"];
    let sector = table["sectorsize"].as_u64().unwrap_or(512);
    let part = table["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"].as_str().unwrap().ends_with(&n.to_string()))
        .unwrap();
    let uuid = part["uuid"].as_str().unwrap_or_default().to_string();
    (part["start"].as_u64().unwrap() * sector, part["size"].as_u64().unwrap() * sector, uuid)
}

/// The bytes of `disk` outside `[start, start + len)`.
fn outside(disk: &Path, start: u64, len: u64) -> Vec<u8> {
    let mut bytes = read(disk);
    bytes.drain(start as usize..(start + len) as usize);
    bytes
}

#[test]
fn a_gpt_partition_is_a_source_and_a_target_by_number_name_and_partuuid() {
    if !have("sgdisk") || !have("sfdisk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    gpt_disk(&disk);
    let (start, len, uuid) = sfdisk_partition(&disk, 2);
    let before = outside(&disk, start, len);
    let data = dir.path().join("root.img");
    write_file(&data, &random_bytes(len as usize, 7));
    let d = disk.to_str().unwrap();

    ok(&["sync", "-q", data.to_str().unwrap(), &format!("{d}#name=root")]);
    assert_eq!(read(&disk)[start as usize..(start + len) as usize], read(&data)[..]);
    assert_eq!(outside(&disk, start, len), before, "bytes outside the partition changed");

    let out = dir.path().join("out.img");
    ok(&["sync", "-q", &format!("{d}#2"), out.to_str().unwrap()]);
    assert_same(&out, &data);
    let cmp = ok(&["compare", data.to_str().unwrap(), &format!("{d}#partuuid={}", uuid.to_lowercase())]);
    assert!(cmp.stdout_text().contains("identical"), "{}", cmp.stdout_text());
    // The table itself is untouched: sgdisk finds nothing wrong.
    let verify = tool_in("sgdisk", &["-v", d], "");
    assert!(verify.contains("No problems found"), "{verify}");
}

#[test]
fn a_logical_dos_partition_is_found_through_the_ebr_chain() {
    if !have("sfdisk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("dos.img");
    write_file(&disk, &random_bytes(64 * MIB, 4));
    let d = disk.to_str().unwrap();
    tool_in("sfdisk", &["-q", d], "label: dos\n,8M,83\n,,5\n,4M,83\n,6M,83\n,,83\n");
    let (start, len, _) = sfdisk_partition(&disk, 6);
    let before = outside(&disk, start, len);
    let data = dir.path().join("six.img");
    write_file(&data, &random_bytes(len as usize, 8));
    ok(&["sync", "-q", data.to_str().unwrap(), &format!("{d}#6")]);
    assert_eq!(read(&disk)[start as usize..(start + len) as usize], read(&data)[..]);
    assert_eq!(outside(&disk, start, len), before, "bytes outside the partition changed");
    // sfdisk still reads the same table.
    let (start2, len2, _) = sfdisk_partition(&disk, 6);
    assert_eq!((start2, len2), (start, len));
}

#[test]
fn wrong_partitions_and_damaged_tables_are_clear_errors_that_write_nothing() {
    if !have("sgdisk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    gpt_disk(&disk);
    let d = disk.to_str().unwrap();
    let data = dir.path().join("data.img");
    write_file(&data, &random_bytes(20 * MIB, 9));
    let before = read(&disk);

    // No such partition: the ones there are listed.
    let out = run(&["sync", "-q", data.to_str().unwrap(), &format!("{d}#7")]);
    assert_eq!(out.code(), 2, "{}", out.stderr_text());
    assert!(
        out.stderr_text().contains("name=boot") && out.stderr_text().contains("name=root"),
        "{}",
        out.stderr_text()
    );
    // Larger than the partition: refused before any write.
    let out = run(&["sync", "-q", data.to_str().unwrap(), &format!("{d}#1")]);
    assert_ne!(out.code(), 0, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("too small"), "{}", out.stderr_text());
    // A disk without a table.
    let bare = dir.path().join("bare.img");
    write_file(&bare, &vec![0; 4 * MIB]);
    let out = run(&["sync", "-q", &format!("{}#1", bare.display()), data.to_str().unwrap()]);
    assert_eq!(out.code(), 2, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("no partition table"), "{}", out.stderr_text());
    assert_eq!(read(&disk), before);

    // The primary header damaged: the backup is used, with a warning that says so.
    let mut damaged = before.clone();
    damaged[512 + 40] ^= 0xff; // first usable LBA, under the header CRC
    write_file(&disk, &damaged);
    let out = run(&["sync", &format!("{d}#2"), dir.path().join("x.img").to_str().unwrap()]);
    assert_eq!(out.code(), 0, "{}", out.stderr_text());
    assert!(out.stderr_text().to_lowercase().contains("primary"), "{}", out.stderr_text());
    // Both headers damaged: an error naming the damage, nothing written.
    let last = damaged.len() - 512;
    damaged[last + 40] ^= 0xff;
    write_file(&disk, &damaged);
    let out = run(&["sync", "-q", data.to_str().unwrap(), &format!("{d}#2")]);
    assert_ne!(out.code(), 0, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("CRC") || out.stderr_text().contains("damaged"), "{}", out.stderr_text());
    assert_eq!(read(&disk), damaged);
}

#[test]
fn a_file_named_like_a_partition_is_that_file() {
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("odd#2");
    write_file(&odd, &random_bytes(MIB, 5));
    let out = dir.path().join("out.img");
    ok(&["sync", "-q", odd.to_str().unwrap(), out.to_str().unwrap()]);
    assert_same(&odd, &out);
}

#[test]
fn partitions_work_on_the_far_side_of_ssh() {
    if !have("sgdisk") {
        return;
    }
    let Some(env) = RemoteDir::new("blksync-partitions") else { return };
    let disk = env.path("disk.img");
    gpt_disk(Path::new(&disk));
    let (start, len, _) = sfdisk_partition(Path::new(&disk), 2);
    let data = env.path("root.img");
    write_file(Path::new(&data), &random_bytes(len as usize, 11));
    ok(&["sync", "-q", "-e", &env.rsh, &data, &format!("{}#name=root", env.remote("disk.img"))]);
    assert_eq!(read(Path::new(&disk))[start as usize..(start + len) as usize], read(Path::new(&data))[..]);
    let back = env.path("back.img");
    ok(&["sync", "-q", "-e", &env.rsh, &format!("{}#2", env.remote("disk.img")), &back]);
    assert_same(Path::new(&back), Path::new(&data));
}

#[test]
fn help_says_how_to_address_a_partition() {
    for command in [&["--help"][..], &["sync", "--help"], &["backup", "--help"]] {
        let out = ok(command);
        assert!(out.stdout_text().contains("ADDRESS#N") && out.stdout_text().contains("#name=NAME"), "{command:?}");
    }
}

/// `sgdisk -v` on `path` finds nothing wrong.
fn assert_gpt_clean(path: &Path) {
    let verify = tool_in("sgdisk", &["-v", path.to_str().unwrap()], "");
    assert!(verify.contains("No problems found"), "{verify}");
}

/// Issue 11, part 2: a GPT disk synced onto a larger or smaller fixed-size disk (a loop device)
/// gets its backup header and entries at the destination's end; one too small for its
/// partitions is refused before any write.
#[test]
fn a_gpt_disk_synced_onto_a_disk_of_another_size_keeps_a_valid_table() {
    if !have("sgdisk") || !have("sfdisk") || !can_use_loop_devices() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    gpt_disk(&disk);
    let (start, len, _) = sfdisk_partition(&disk, 2);
    let source = read(&disk);
    for (mib, fits) in [(96, true), (48, true), (40, false)] {
        let dst = dir.path().join(format!("dst{mib}.img"));
        write_file(&dst, &random_bytes(mib * MIB, mib as u64));
        let before = read(&dst);
        let out =
            run(&["sync", "--json", "--progress=none", disk.to_str().unwrap(), &format!("loop://{}", dst.display())]);
        if !fits {
            assert_eq!(out.code(), 5, "{}", out.stderr_text());
            assert!(out.stderr_text().contains("too small for the partitions"), "{}", out.stderr_text());
            assert_eq!(read(&dst), before, "a refused sync wrote");
            continue;
        }
        assert_eq!(out.code(), 0, "{mib} MiB: {}", out.stderr_text());
        let json = out.json();
        let partitions = json["partitions"].as_array().unwrap();
        assert!(partitions.iter().any(|p| p.as_str().unwrap().contains("\"root\"")), "{json}");
        assert_gpt_clean(&dst);
        let copy = read(&dst);
        assert_eq!(copy[start as usize..(start + len) as usize], source[start as usize..(start + len) as usize]);
        let (start2, len2, _) = sfdisk_partition(&dst, 2);
        assert_eq!((start2, len2), (start, len));
        // A rerun rewrites the table's few sectors and leaves a valid table again.
        let again =
            run(&["sync", "--json", "--progress=none", disk.to_str().unwrap(), &format!("loop://{}", dst.display())]);
        assert_eq!(again.code(), 0, "{}", again.stderr_text());
        assert!(again.json()["bytes_written"].as_u64().unwrap() < 64 * 1024, "{}", again.stdout_text());
        assert_gpt_clean(&dst);
    }
}

/// The same with the source behind ssh: its table is read over the link.
#[test]
fn a_remote_gpt_disk_pulled_onto_a_larger_disk_keeps_a_valid_table() {
    if !have("sgdisk") || !can_use_loop_devices() {
        return;
    }
    let Some(env) = RemoteDir::new("blksync-partitions-pull") else { return };
    let disk = env.path("disk.img");
    gpt_disk(Path::new(&disk));
    let dst = env.path("big.img");
    write_file(Path::new(&dst), &random_bytes(80 * MIB, 13));
    ok(&["sync", "-q", "-e", &env.rsh, &env.remote("disk.img"), &format!("loop://{dst}")]);
    assert_gpt_clean(Path::new(&dst));
}

/// Issue 11, part 2: the boot code in sector 0, the gap before the first partition (where
/// GRUB's core.img lives on a DOS disk) and a GPT BIOS-boot partition arrive intact on a disk
/// of another size, the table fitted around them.
#[test]
fn boot_code_boot_gap_and_bios_boot_partition_survive_a_sync_onto_a_larger_disk() {
    if !have("sgdisk") || !have("sfdisk") || !can_use_loop_devices() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // GPT: a BIOS-boot partition (EF02) at sectors 34-2047 and a data partition after.
    let gpt = dir.path().join("gpt.img");
    write_file(&gpt, &vec![0; 32 * MIB]);
    let g = gpt.to_str().unwrap();
    tool_in("sgdisk", &["-o", "-a", "1", "-n", "1:34:2047", "-t", "1:EF02", "-n", "2:2048:0", g], "");
    let boot_code = random_bytes(440, 41);
    patch(&gpt, 0, &boot_code);
    let core = random_bytes(2014 * 512, 42);
    patch(&gpt, 34 * 512, &core);
    // DOS: the gap between sector 1 and the first partition at 1 MiB.
    let dos = dir.path().join("dos.img");
    write_file(&dos, &vec![0; 32 * MIB]);
    let d = dos.to_str().unwrap();
    tool_in("sfdisk", &["-q", d], "label: dos\nstart=2048, type=83\n");
    patch(&dos, 0, &boot_code);
    let gap = random_bytes(2047 * 512, 43);
    patch(&dos, 512, &gap);

    for (disk, gap_at, gap_bytes) in [(&gpt, 34 * 512, &core), (&dos, 512, &gap)] {
        let dst = dir.path().join("big.img");
        write_file(&dst, &vec![0; 48 * MIB]);
        ok(&["sync", "-q", disk.to_str().unwrap(), &format!("loop://{}", dst.display())]);
        let copy = read(&dst);
        assert_eq!(copy[..440], boot_code[..], "{}: boot code", disk.display());
        assert_eq!(copy[gap_at..gap_at + gap_bytes.len()], gap_bytes[..], "{}: boot gap", disk.display());
        if disk == &gpt {
            assert_gpt_clean(&dst);
        } else {
            let (start, len, _) = sfdisk_partition(&dst, 1);
            assert_eq!((start, len), (MIB as u64, 31 * MIB as u64));
        }
    }
}

/// The partitions of `path` by `sfdisk -J`: `(number, start, size)` in sectors.
fn sfdisk_layout(path: &Path) -> Vec<(u64, u64, u64)> {
    let json: serde_json::Value =
        serde_json::from_str(&tool_in("sfdisk", &["-J", path.to_str().unwrap()], "")).unwrap();
    json["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let node = p["node"].as_str().unwrap();
            let digits = node.len() - node.trim_end_matches(|c: char| c.is_ascii_digit()).len();
            let number: u64 = node[node.len() - digits..].parse().unwrap();
            (number, p["start"].as_u64().unwrap(), p["size"].as_u64().unwrap())
        })
        .collect()
}

/// Issue 11, part 2, bsync's 446/512 rule: onto a disk whose DOS table already holds the
/// source's partitions (each at least as large), that table is kept and only the boot code (with
/// the source's disk signature) is copied; onto one with another layout, the whole table is.
#[test]
fn a_dos_disk_onto_a_compatible_table_keeps_it_and_takes_only_the_boot_code() {
    if !have("sfdisk") || !can_use_loop_devices() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("dos.img");
    write_file(&disk, &random_bytes(48 * MIB, 41));
    let d = disk.to_str().unwrap();
    let layout =
        "label: dos\nlabel-id: 0x11223344\nstart=2048, size=16M, type=83\ntype=5\nsize=8M, type=83\nsize=8M, type=82\n";
    tool_in("sfdisk", &["-q", d], layout);
    let source = read(&disk);
    for (compatible, seed) in [(true, 42), (false, 43)] {
        let dst = dir.path().join(format!("dst-{compatible}.img"));
        write_file(&dst, &random_bytes(80 * MIB, seed));
        let theirs = if compatible {
            // The same partitions, the last logical larger, another disk signature.
            "label: dos\nlabel-id: 0x55667788\nstart=2048, size=16M, type=83\ntype=5\nsize=8M, type=83\nsize=40M, type=82\n"
        } else {
            "label: dos\nlabel-id: 0x55667788\nstart=4096, size=30M, type=83\n"
        };
        tool_in("sfdisk", &["-q", dst.to_str().unwrap()], theirs);
        let before = sfdisk_layout(&dst);
        let out = run(&["sync", "--json", "--progress=none", d, &format!("loop://{}", dst.display())]);
        assert_eq!(out.code(), 0, "{}", out.stderr_text());
        let lines = out.json()["partitions"].to_string();
        let copy = read(&dst);
        // The boot code and the disk signature are the source's either way.
        assert_eq!(copy[..446], source[..446]);
        if compatible {
            assert!(lines.contains("was kept"), "{lines}");
            assert_eq!(sfdisk_layout(&dst), before, "the destination's table changed");
        } else {
            assert!(!lines.contains("was kept"), "{lines}");
            assert_eq!(sfdisk_layout(&dst), sfdisk_layout(&disk));
        }
        // Every partition's content arrived.
        for (number, start, size) in sfdisk_layout(&disk) {
            if number == 2 {
                continue; // the extended partition holds the logicals and their EBRs
            }
            let (a, b) = ((start * 512) as usize, ((start + size) * 512) as usize);
            assert!(copy[a..b] == source[a..b], "partition {number} differs");
        }
    }
}
