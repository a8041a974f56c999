//! Partition tables made by the real tools (`sfdisk`, `sgdisk`, a loop device with 4096-byte
//! sectors), read through the local endpoint and compared with `sfdisk -J`; GPT relocation
//! checked by `sgdisk -v`; damage, loops, overlaps; and random input.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use blksync_core::ErrorKind;
use blksync_core::endpoint::Source;
use blksync_core::endpoint::memory::Memory;
use blksync_disk::gpt::{self, NewEntry};
use blksync_disk::{Guid, PartKind, Scheme, Selector, Table, dos_compatible, read};
use proptest::prelude::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn have(tool: &str) -> bool {
    let found = Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !found {
        eprintln!("skipping: {tool} is not installed (package fdisk / gdisk)");
    }
    found
}

/// Runs `cmd args` with `input` on stdin; its stdout, or a panic with its stderr.
fn run(cmd: &str, args: &[&str], input: &str) -> String {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    File::create(&path).unwrap().set_len(size).unwrap();
    path
}

fn open(path: &Path) -> Box<dyn Source> {
    blksync_endpoint::open_source(path).unwrap()
}

fn read_path(path: &Path, hint: Option<u32>) -> Table {
    read(&*open(path), hint).unwrap().expect("a table")
}

fn apply(path: &Path, writes: &[(u64, Vec<u8>)]) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    for (at, bytes) in writes {
        file.write_all_at(bytes, *at).unwrap();
    }
}

fn memory(size: u64, writes: &[(u64, Vec<u8>)]) -> Memory {
    let mut bytes = vec![0u8; size as usize];
    for (at, data) in writes {
        bytes[*at as usize..*at as usize + data.len()].copy_from_slice(data);
    }
    Memory::with_bytes("mem.img", bytes)
}

/// Asserts that `table` says what `sfdisk -J` says of `device`.
fn assert_matches_sfdisk(table: &Table, device: &Path) {
    let json: Value = serde_json::from_str(&run("sfdisk", &["-J", device.to_str().unwrap()], "")).unwrap();
    let pt = &json["partitiontable"];
    assert_eq!(pt["label"], table.label());
    assert_eq!(pt["sectorsize"], u64::from(table.sector_size));
    let ss = u64::from(table.sector_size);
    match &table.scheme {
        Scheme::Dos { signature } => assert_eq!(pt["id"], format!("0x{signature:08x}")),
        Scheme::Gpt { disk_guid, first_usable, last_usable, .. } => {
            assert_eq!(pt["id"], disk_guid.to_string());
            assert_eq!(pt["firstlba"], *first_usable);
            assert_eq!(pt["lastlba"], *last_usable);
        }
    }
    let theirs = pt["partitions"].as_array().unwrap();
    assert_eq!(theirs.len(), table.partitions.len(), "{theirs:?}\n{:?}", table.partitions);
    let prefix = format!("{}", device.display());
    for (p, s) in table.partitions.iter().zip(theirs) {
        let node = s["node"].as_str().unwrap().strip_prefix(&prefix).unwrap().trim_start_matches('p');
        assert_eq!(node, p.number.to_string());
        assert_eq!(s["start"], p.start / ss);
        assert_eq!(s["size"], p.len / ss);
        assert_eq!(s["bootable"].as_bool().unwrap_or(false), matches!(p.kind, PartKind::Dos(_)) && p.bootable);
        match p.kind {
            PartKind::Dos(t) => assert_eq!(s["type"], format!("{t:x}")),
            PartKind::Gpt(g) => {
                assert_eq!(s["type"], g.to_string());
                assert_eq!(s["uuid"], p.partuuid);
                assert_eq!(s["name"].as_str(), p.name.as_deref());
            }
        }
    }
}

#[test]
fn dos_primaries_and_a_chain_of_logicals_match_sfdisk() {
    if !have("sfdisk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "dos.img", 64 * MIB);
    let script = "label: dos\nlabel-id: 0x1234abcd\n,8M,83,*\n,8M,82\n,,5\n,4M,83\n,4M,7\n,2M,c\n,,83\n";
    run("sfdisk", &["-q", path.to_str().unwrap()], script);
    let table = read_path(&path, None);
    assert_matches_sfdisk(&table, &path);
    assert!(table.warnings.is_empty(), "{:?}", table.warnings);
    let numbers: Vec<u32> = table.partitions.iter().map(|p| p.number).collect();
    assert_eq!(numbers, [1, 2, 3, 5, 6, 7, 8]);
    assert!(table.partitions[1].is_swap());
    assert!(table.partitions[2].is_extended());
    assert!(table.partitions[0].bootable);
    assert_eq!(table.partitions[3].partuuid, "1234abcd-05");
    assert_eq!(table.first_partition_start(), Some(MIB));
    assert_eq!(table.find(&Selector::parse("partuuid=1234ABCD-07").unwrap()).unwrap().number, 7);
    let err = table.find(&Selector::parse("4").unwrap()).unwrap_err();
    assert!(
        err.message().contains("no partition matches 4") && err.message().contains("8 (partuuid=1234abcd-08)"),
        "{err}"
    );

    // The same layout on a larger disk with the last partitions grown is compatible; not
    // the other way round, nor with a partition moved.
    let big = image(dir.path(), "big.img", 96 * MIB);
    run("sfdisk", &["-q", big.to_str().unwrap()], script);
    let bigger = read_path(&big, None);
    assert!(dos_compatible(&table, &bigger));
    assert!(!dos_compatible(&bigger, &table));
    let moved = image(dir.path(), "moved.img", 96 * MIB);
    run("sfdisk", &["-q", moved.to_str().unwrap()], &script.replace(",8M,82", ",7M,82"));
    assert!(!dos_compatible(&table, &read_path(&moved, None)));
}

fn sgdisk_image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = image(dir, name, size);
    let p = path.to_str().unwrap();
    run(
        "sgdisk",
        &[
            "-U",
            "11111111-2222-3333-4444-555555555555",
            "-n1:2048:+1M",
            "-t1:ef02",
            "-c1:bios",
            "-n2:0:+16M",
            "-t2:ef00",
            "-c2:EFI system",
            "-n3:0:+8M",
            "-t3:8200",
            "-c3:swap",
            "-u3:AAAAAAAA-0000-1111-2222-333333333333",
            "-n4:0:+20M",
            "-t4:8304",
            "-c4:root",
            "-A4:set:2",
            p,
        ],
        "",
    );
    path
}

#[test]
fn gpt_with_names_matches_sfdisk() {
    if !have("sfdisk") || !have("sgdisk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = sgdisk_image(dir.path(), "gpt.img", 64 * MIB);
    let table = read_path(&path, None);
    assert_matches_sfdisk(&table, &path);
    assert!(table.warnings.is_empty(), "{:?}", table.warnings);
    assert_eq!(table.sector_size, 512);
    let Scheme::Gpt { disk_guid, .. } = &table.scheme else { panic!("{table:?}") };
    assert_eq!(disk_guid.to_string(), "11111111-2222-3333-4444-555555555555");
    assert!(table.partitions[0].is_bios_boot());
    assert!(table.partitions[2].is_swap());
    assert!(table.partitions[3].bootable && table.partitions[3].attributes == 4);
    assert_eq!(table.find(&Selector::parse("name=EFI system").unwrap()).unwrap().number, 2);
    let swap = Selector::parse("partuuid=aaaaaaaa-0000-1111-2222-333333333333").unwrap();
    assert_eq!(table.find(&swap).unwrap().number, 3);
    assert_eq!(table.first_partition_start(), Some(MIB));
    let err = table.find(&Selector::parse("name=home").unwrap()).unwrap_err();
    assert!(err.message().contains("4 (name=root, partuuid="), "{err}");
}

#[test]
fn gpt_on_a_device_with_4096_byte_sectors_matches_sfdisk() {
    if !have("sfdisk") || !have("sgdisk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "g4k.img", 64 * MIB);
    let attach = Command::new("losetup").args(["-b", "4096", "-f", "--show"]).arg(&path).output();
    let Some(device) = attach.ok().filter(|o| o.status.success()).map(|o| String::from_utf8(o.stdout).unwrap()) else {
        eprintln!("skipping: no loop device with 4096-byte sectors");
        return;
    };
    let device = PathBuf::from(device.trim());
    let dev = device.to_str().unwrap();
    let made =
        Command::new("sgdisk").args(["-n1:0:+4M", "-c1:esp", "-t1:ef00", "-n2:0:+8M", "-c2:my root", dev]).output();
    let json = Command::new("sfdisk").args(["-J", dev]).output();
    let _ = Command::new("losetup").args(["-d", dev]).status();
    assert!(made.unwrap().status.success());
    let json: Value = serde_json::from_slice(&json.unwrap().stdout).unwrap();
    // The file alone says nothing of its sector size: found by "EFI PART" at 4096.
    let table = read_path(&path, None);
    assert_eq!(table.sector_size, 4096);
    let theirs = json["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(json["partitiontable"]["sectorsize"], 4096);
    assert_eq!(theirs.len(), 2);
    for (p, s) in table.partitions.iter().zip(theirs) {
        assert_eq!(s["start"], p.start / 4096);
        assert_eq!(s["size"], p.len / 4096);
        assert_eq!(s["uuid"], p.partuuid);
        assert_eq!(s["name"].as_str(), p.name.as_deref());
    }
}

fn entry(first: u64, last: u64, name: &str, n: u8) -> NewEntry {
    NewEntry {
        type_guid: Guid::parse("0FC63DAF-8483-4772-8E79-3D69D8477DE4").unwrap(),
        unique_guid: Guid([n; 16]),
        first_lba: first,
        last_lba: last,
        attributes: 0,
        name: name.into(),
    }
}

#[test]
fn gpt_with_4096_byte_sectors_from_the_encoder_round_trips() {
    let size = 64 * MIB;
    let entries = [entry(256, 1279, "esp", 1), entry(1280, 3327, "my root", 2)];
    let writes = gpt::encode(4096, size, Guid([9; 16]), &entries).unwrap();
    let disk = memory(size, &writes);
    for hint in [None, Some(4096), Some(512)] {
        let table = read(&disk, hint).unwrap().unwrap();
        assert_eq!(table.sector_size, 4096);
        assert!(table.warnings.is_empty(), "{:?}", table.warnings);
        assert_eq!(table.partitions.len(), 2);
        assert_eq!((table.partitions[1].start, table.partitions[1].len), (1280 * 4096, 2048 * 4096));
        assert_eq!(table.partitions[1].name.as_deref(), Some("my root"));
        let Scheme::Gpt { first_usable, last_usable, .. } = table.scheme else { panic!() };
        assert_eq!((first_usable, last_usable), (6, 16384 - 6));
    }
}

#[test]
fn gpt_relocation_onto_a_larger_and_a_smaller_disk_passes_sgdisk_verify() {
    if !have("sgdisk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = sgdisk_image(dir.path(), "src.img", 64 * MIB);
    let table = read_path(&src, None);
    let last_end = table.partitions.iter().map(|p| p.start + p.len).max().unwrap();
    for (name, size) in [("grown.img", 96 * MIB), ("shrunk.img", last_end + 33 * 512)] {
        let dst = dir.path().join(name);
        std::fs::copy(&src, &dst).unwrap();
        File::options().write(true).open(&dst).unwrap().set_len(size).unwrap();
        apply(&dst, &table.relocate_gpt(size).unwrap());
        let verify = run("sgdisk", &["-v", dst.to_str().unwrap()], "");
        assert!(verify.contains("No problems found"), "{name}: {verify}");
        let moved = read_path(&dst, None);
        assert!(moved.warnings.is_empty(), "{name}: {:?}", moved.warnings);
        assert_eq!(moved.partitions, table.partitions);
        let Scheme::Gpt { last_usable, .. } = moved.scheme else { panic!() };
        assert_eq!(last_usable, size / 512 - 34);
    }
    let err = table.relocate_gpt(last_end + 32 * 512).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SizeMismatch);
    assert!(err.message().contains("partition 4"), "{err}");
}

#[test]
fn gpt_relocation_zeroes_the_old_backup_header() {
    let size = 8 * MIB;
    let writes = gpt::encode(512, size, Guid([3; 16]), &[entry(2048, 4095, "a", 1)]).unwrap();
    let disk = memory(size, &writes);
    let table = read(&disk, None).unwrap().unwrap();
    let moved = table.relocate_gpt(2 * size).unwrap();
    assert!(moved.iter().any(|(at, b)| *at == size - 512 && b.iter().all(|x| *x == 0)));
    let mut bytes = disk.contents();
    bytes.resize(2 * size as usize, 0);
    let grown = Memory::with_bytes("grown", bytes);
    let stale = read(&grown, None).unwrap().unwrap();
    assert!(stale.warnings[0].contains("not at the last LBA"), "{:?}", stale.warnings);
    let grown = memory(2 * size, &[writes, moved].concat());
    let table2 = read(&grown, None).unwrap().unwrap();
    assert!(table2.warnings.is_empty(), "{:?}", table2.warnings);
    assert_eq!(table2.partitions, table.partitions);
}

#[test]
fn gpt_with_a_damaged_primary_header_is_read_from_the_backup_with_a_warning() {
    let size = 8 * MIB;
    let mut writes = gpt::encode(512, size, Guid([3; 16]), &[entry(2048, 4095, "a", 1)]).unwrap();
    let good = read(&memory(size, &writes), None).unwrap().unwrap();
    writes[1].1[16] ^= 1; // the primary header's CRC
    let table = read(&memory(size, &writes), None).unwrap().unwrap();
    assert_eq!(table.partitions, good.partitions);
    assert!(matches!(table.scheme, Scheme::Gpt { from_backup: true, .. }));
    assert_eq!(table.warnings.len(), 1);
    assert!(table.warnings[0].contains("primary GPT damaged (bad header CRC32"), "{:?}", table.warnings);
    assert!(table.warnings[0].contains("at byte offset 528"), "{:?}", table.warnings);

    // Relocation from the backup still writes a valid primary.
    let fixed = memory(size, &[writes.clone(), table.relocate_gpt(size).unwrap()].concat());
    let again = read(&fixed, None).unwrap().unwrap();
    assert!(again.warnings.is_empty(), "{:?}", again.warnings);

    // The backup's array damaged as well: both named, with offsets.
    let last = writes.len() - 2;
    writes[last].1[0] ^= 1;
    let err = read(&memory(size, &writes), None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    let msg = err.message();
    assert!(msg.contains("both GPT copies are damaged"), "{msg}");
    assert!(msg.contains("primary: bad header CRC32") && msg.contains("offset 528"), "{msg}");
    let array_at = size - 512 - 32 * 512;
    assert!(
        msg.contains("backup: bad entry array CRC32 (stored") && msg.contains(&format!("offset {array_at}")),
        "{msg}"
    );
}

#[test]
fn gpt_damaged_backup_is_a_warning_and_a_missing_signature_is_named() {
    let size = 8 * MIB;
    let mut writes = gpt::encode(512, size, Guid([3; 16]), &[entry(2048, 4095, "a", 1)]).unwrap();
    writes.last_mut().unwrap().1[0] = b'X';
    let table = read(&memory(size, &writes), None).unwrap().unwrap();
    assert!(matches!(table.scheme, Scheme::Gpt { from_backup: false, .. }));
    assert!(
        table.warnings[0].contains("backup GPT damaged (no \"EFI PART\" signature at byte offset"),
        "{:?}",
        table.warnings
    );
    writes[1].1[0] = b'X';
    let err = read(&memory(size, &writes), None).unwrap_err();
    assert!(err.message().contains("no GPT header"), "{err}");
}

/// A DOS sector 0 (or EBR) with the given entries: (boot, type, start, sectors).
fn dos_sector(entries: &[(u8, u8, u32, u32)]) -> Vec<u8> {
    let mut s = vec![0u8; 512];
    s[440..444].copy_from_slice(&0xdead_beef_u32.to_le_bytes());
    for (i, (boot, kind, start, sectors)) in entries.iter().enumerate() {
        let at = 446 + 16 * i;
        s[at] = *boot;
        s[at + 4] = *kind;
        s[at + 8..at + 12].copy_from_slice(&start.to_le_bytes());
        s[at + 12..at + 16].copy_from_slice(&sectors.to_le_bytes());
    }
    s[510] = 0x55;
    s[511] = 0xAA;
    s
}

#[test]
fn dos_ebr_chain_that_links_back_is_an_error() {
    // Extended at 2048..; EBR at 2048 → logical at 2049 (+100), next EBR at +1000; that one
    // links back to +0.
    let writes = vec![
        (0, dos_sector(&[(0, 0x05, 2048, 10000)])),
        (2048 * 512, dos_sector(&[(0, 0x83, 1, 100), (0, 0x05, 1000, 200)])),
        (3048 * 512, dos_sector(&[(0, 0x83, 1, 100), (0, 0x05, 0, 200)])),
    ];
    let err = read(&memory(8 * MIB, &writes), None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.message().contains("links back to byte offset 1048576 (a loop"), "{err}");
    assert!(err.message().contains(&format!("at byte offset {}", 3048 * 512 + 462)), "{err}");
}

#[test]
fn dos_overlapping_partitions_are_an_error_naming_both() {
    let writes = vec![(0, dos_sector(&[(0, 0x83, 2048, 4096), (0, 0x83, 4096, 4096)]))];
    let err = read(&memory(8 * MIB, &writes), None).unwrap_err();
    assert!(err.message().contains("partition 1 (bytes 1048576..3145728) overlaps partition 2"), "{err}");
}

#[test]
fn dos_partition_past_the_end_is_an_error() {
    let writes = vec![(0, dos_sector(&[(0x80, 0x83, 2048, 16384)]))];
    let err = read(&memory(8 * MIB, &writes), None).unwrap_err();
    assert!(
        err.message().contains("partition 1 (bytes 1048576..9437184) runs past the end of the disk (8388608 bytes)"),
        "{err}"
    );
}

#[test]
fn gpt_partition_outside_the_usable_lbas_is_an_error() {
    let size = 8 * MIB;
    let (_, last) = gpt::usable(512, size, 1).unwrap();
    assert!(gpt::encode(512, size, Guid([1; 16]), &[entry(2048, last + 1, "a", 1)]).is_err());
    let writes =
        gpt::encode(512, size, Guid([1; 16]), &[entry(2048, 4095, "a", 1), entry(4000, 5000, "b", 2)]).unwrap();
    let err = read(&memory(size, &writes), None).unwrap_err();
    assert!(err.message().contains("partition 1 (bytes 1048576..2097152) overlaps partition 2"), "{err}");
}

#[test]
fn no_table_is_none_and_a_bad_hint_is_a_usage_error() {
    assert!(read(&Memory::new("zeros", MIB), None).unwrap().is_none());
    assert!(read(&Memory::new("tiny", 100), None).unwrap().is_none());
    // A FAT boot sector: 55 AA, but boot code where entries would be.
    let mut vbr = vec![0x4Eu8; 512];
    vbr[510] = 0x55;
    vbr[511] = 0xAA;
    assert!(read(&memory(MIB, &[(0, vbr)]), None).unwrap().is_none());
    let err = read(&Memory::new("zeros", MIB), Some(1000)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Usage);
    assert!(Selector::parse("0").is_err() && Selector::parse("name=").is_err() && Selector::parse("root").is_err());
}

#[test]
fn hybrid_mbr_reads_the_gpt_with_a_warning() {
    let size = 8 * MIB;
    let mut writes = gpt::encode(512, size, Guid([3; 16]), &[entry(2048, 4095, "a", 1)]).unwrap();
    writes[0].1[462 + 4] = 0x83;
    writes[0].1[462 + 8..462 + 16].copy_from_slice(&[0, 8, 0, 0, 0, 8, 0, 0]);
    let table = read(&memory(size, &writes), None).unwrap().unwrap();
    assert_eq!(table.label(), "gpt");
    assert!(table.warnings[0].contains("hybrid MBR"), "{:?}", table.warnings);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Random sectors where the tables are, and mutations of valid ones (GPT checksums fixed
    /// up as well): an error or a table, never a panic, never an allocation beyond the limits,
    /// and every relocation reads back as the same partitions (`blksync_disk::exercise`).
    #[test]
    fn random_and_mutated_tables_never_panic(
        seed in any::<u64>(),
        kind in 0u8..4,
        flips in proptest::collection::vec((0usize..(40 * 1024), any::<u8>()), 0..24),
    ) {
        let size = 256 * 1024;
        let mut bytes = vec![0u8; size];
        let mut x = seed | 1;
        let mut next = || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x as u8 };
        match kind {
            0 => bytes[..40 * 1024].iter_mut().for_each(|b| *b = next()),
            1 => {
                let es = [entry(40, 99, "a", 1), entry(100, 400, "b", 2)];
                for (at, w) in gpt::encode(512, size as u64, Guid([5; 16]), &es).unwrap() {
                    bytes[at as usize..at as usize + w.len()].copy_from_slice(&w);
                }
            }
            2 => {
                let es = [entry(8, 20, "a", 1), entry(30, 50, "b", 2)];
                for (at, w) in gpt::encode(4096, size as u64, Guid([5; 16]), &es).unwrap() {
                    bytes[at as usize..at as usize + w.len()].copy_from_slice(&w);
                }
            }
            _ => {
                bytes[..512].copy_from_slice(&dos_sector(&[(0, 0x05, 1, 300), (0, 0x83, 320, 100)]));
                for i in 0..4u32 {
                    let ebr = dos_sector(&[(0, 0x83, 1, 50), (0, 0x05, 60 * (i + 1), 60)]);
                    let at = (1 + 60 * i as usize) * 512;
                    bytes[at..at + 512].copy_from_slice(&ebr);
                }
            }
        }
        for (at, v) in flips {
            bytes[at] = v;
        }
        blksync_disk::exercise(&bytes);
    }
}

/// An 8 MiB DOS disk laid out at MiB boundaries, so that plans onto other sizes move its
/// logical partitions: 1 [1, 2) MiB; 2 extended [2, 7) MiB holding 5 (1 sector after its EBR),
/// 6 (63 sectors after it, linked with type 0x0F), 7 (1 MiB after it); 3 [7, 8) MiB. Its bytes
/// and the byte offsets of sector 0 and the three EBRs.
fn moving_dos_disk() -> (Vec<u8>, [usize; 4]) {
    const S: u32 = 2048;
    let mut bytes = vec![0u8; 8 * MIB as usize];
    let sectors = [
        (0, dos_sector(&[(0, 0x83, S, S), (0, 0x05, 2 * S, 5 * S), (0, 0x83, 7 * S, S)])),
        (2 * S, dos_sector(&[(0, 0x83, 1, S - 1), (0, 0x05, S, S)])),
        (3 * S, dos_sector(&[(0, 0x82, 63, S - 63), (0, 0x0F, 2 * S, 3 * S)])),
        (4 * S, dos_sector(&[(0, 0x07, S, 2 * S)])),
    ];
    for (lba, sector) in &sectors {
        let at = *lba as usize * 512;
        bytes[at..at + 512].copy_from_slice(sector);
    }
    (bytes, sectors.map(|(lba, _)| lba as usize * 512))
}

/// Every partition of `table` (read from `bytes`) grown onto disks of `sizes`: each accepted
/// plan is written into a file, and `sfdisk -J` must show the planned partitions (numbers,
/// types, starts, sizes, the disk signature) and `sfdisk -V` find no error. The plans made.
fn plans_checked_by_sfdisk(dir: &Path, table: &Table, bytes: &[u8], sizes: &[u64]) -> usize {
    let mut made = 0;
    for grow in table.partitions.iter().filter(|p| !p.is_extended()).map(|p| p.number) {
        for &size in sizes {
            let Ok(places) = blksync_disk::layout::plan(table, size, grow) else { continue };
            let path = image(dir, &format!("g{grow}-{size}.img"), size);
            let writes = table.rebuilt(size, &places).unwrap();
            let n = bytes.len().min(size as usize);
            apply(&path, &[(0, bytes[..n].to_vec())]);
            apply(&path, &writes);
            let new = read_path(&path, None);
            assert!(new.warnings.is_empty(), "{:?}", new.warnings);
            assert_matches_sfdisk(&new, &path);
            for q in &places {
                let p = new.partitions.iter().find(|p| p.number == q.number).unwrap();
                assert_eq!((p.start, p.len), (q.start, q.len), "grow {grow} onto {size}: partition {}", q.number);
            }
            assert_eq!(new.partitions.len(), table.partitions.len());
            assert_eq!(new.scheme, table.scheme, "disk signature");
            let verify = run("sfdisk", &["-V", path.to_str().unwrap()], "");
            assert!(verify.contains("No errors detected"), "grow {grow} onto {size}: {verify}");
            made += 1;
        }
    }
    made
}

#[test]
fn dos_plans_that_move_logical_partitions_are_read_by_sfdisk_as_planned() {
    if !have("sfdisk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (bytes, _) = moving_dos_disk();
    let table = read(&Memory::with_bytes("moving.img", bytes.clone()), None).unwrap().unwrap();
    let numbers: Vec<u32> = table.partitions.iter().map(|p| p.number).collect();
    assert_eq!(numbers, [1, 2, 3, 5, 6, 7]);
    let made = plans_checked_by_sfdisk(dir.path(), &table, &bytes, &[7 * MIB, 8 * MIB, 16 * MIB, 64 * MIB]);
    assert!(made >= 12, "{made} plans");
    // As sfdisk lays out Debian's default (1 root, 2 extended, 5 swap), and with two logicals.
    for script in
        ["label: dos\nlabel-id: 0x1234abcd\n,40M,83,*\n,,5\n,,82\n", "label: dos\n,8M,83\n,,5\n,16M,83\n,,82\n"]
    {
        let path = image(dir.path(), "sfdisk.img", 64 * MIB);
        run("sfdisk", &["-q", path.to_str().unwrap()], script);
        let table = read_path(&path, None);
        let bytes = std::fs::read(&path).unwrap();
        assert!(plans_checked_by_sfdisk(dir.path(), &table, &bytes, &[48 * MIB, 64 * MIB, 256 * MIB]) >= 5);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// [`moving_dos_disk`] with random bytes in the entries of sector 0 and of the EBRs: an
    /// error or a table, never a panic; every accepted plan reads back as planned with no
    /// write on a partition (`blksync_disk::exercise`).
    #[test]
    fn mutated_dos_chains_that_move_never_panic(
        flips in proptest::collection::vec((0usize..4, 446usize..512, any::<u8>()), 0..6),
    ) {
        let (mut bytes, sectors) = moving_dos_disk();
        for (which, offset, value) in flips {
            bytes[sectors[which] + offset] = value;
        }
        blksync_disk::exercise(&bytes);
    }
}
