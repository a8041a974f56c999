//! The used-block map against real filesystems made by mke2fs, checked against `dumpe2fs`
//! (`shared/lab/e2used.py`), e2fsck and debugfs.

mod support;

use blksync_fs::{Kind, Usage};
use support::{FileSource, Spec, check, dumpe2fs, journal_start, make, partition, probe_known};

fn uninit_groups(image: &support::Image) -> usize {
    let fs = partition(&image.path, image.start, image.len, image.dir.path());
    dumpe2fs(&fs).matches("BLOCK_UNINIT").count()
}

#[test]
fn ext2_matches_dumpe2fs_and_copies_clean() {
    let image = make(&Spec { args: &["-t", "ext2", "-b", "4096", "-g", "4096"], ..Spec::default() });
    check(&image);
    let (_, map) = probe_known(&image);
    assert!(matches!(map.kind(), Kind::Ext { version: 2, block_size: 4096, .. }), "{:?}", map.kind());
}

#[test]
fn ext3_with_1k_blocks_matches_dumpe2fs_and_copies_clean() {
    let image = make(&Spec { args: &["-t", "ext3", "-b", "1024", "-L", "three"], ..Spec::default() });
    check(&image);
    let (_, map) = probe_known(&image);
    assert!(
        matches!(map.kind(), Kind::Ext { version: 3, block_size: 1024, label, .. } if label == "three"),
        "{:?}",
        map.kind()
    );
}

#[test]
fn ext4_default_matches_dumpe2fs_and_copies_clean() {
    let image = make(&Spec { args: &["-t", "ext4", "-g", "4096"], ..Spec::default() });
    assert!(uninit_groups(&image) > 0, "the image should have BLOCK_UNINIT groups");
    check(&image);
    let (_, map) = probe_known(&image);
    assert!(matches!(map.kind(), Kind::Ext { version: 4, .. }));
}

#[test]
fn ext4_with_1k_blocks_matches_dumpe2fs_and_copies_clean() {
    check(&make(&Spec { args: &["-t", "ext4", "-b", "1024"], seed: 2, ..Spec::default() }));
}

#[test]
fn ext4_without_flex_bg_matches_dumpe2fs_and_copies_clean() {
    let image = make(&Spec { args: &["-t", "ext4", "-g", "4096", "-O", "^flex_bg"], seed: 3, ..Spec::default() });
    assert!(uninit_groups(&image) > 0);
    check(&image);
}

#[test]
fn ext4_without_64bit_matches_dumpe2fs_and_copies_clean() {
    check(&make(&Spec { args: &["-t", "ext4", "-g", "4096", "-O", "^64bit"], seed: 4, ..Spec::default() }));
}

#[test]
fn ext4_with_gdt_csum_instead_of_metadata_csum_matches_dumpe2fs() {
    let image = make(&Spec {
        args: &["-t", "ext4", "-g", "4096", "-O", "^metadata_csum,uninit_bg"],
        seed: 5,
        ..Spec::default()
    });
    assert!(uninit_groups(&image) > 0);
    check(&image);
}

#[test]
fn ext4_with_meta_bg_matches_dumpe2fs_and_copies_clean() {
    // 1 KiB blocks and 64-byte descriptors: 16 per block, so 40 groups make three metablock
    // groups and descriptors in groups 16, 17, 31, 32, 33.
    let image = make(&Spec {
        args: &["-t", "ext4", "-b", "1024", "-O", "meta_bg,^resize_inode"],
        size: 320 << 20,
        seed: 6,
        ..Spec::default()
    });
    assert!(dumpe2fs(&image.path).contains("meta_bg"));
    assert!(uninit_groups(&image) > 0);
    check(&image);
}

#[test]
fn ext4_with_sparse_super2_matches_dumpe2fs_and_copies_clean() {
    let image = make(&Spec { args: &["-t", "ext4", "-g", "2048", "-O", "sparse_super2"], seed: 7, ..Spec::default() });
    assert!(uninit_groups(&image) > 0);
    check(&image);
}

#[test]
fn ext2_without_sparse_super_matches_dumpe2fs_and_copies_clean() {
    check(&make(&Spec {
        args: &["-t", "ext2", "-b", "4096", "-g", "4096", "-O", "^sparse_super,^resize_inode"],
        seed: 8,
        ..Spec::default()
    }));
}

#[test]
fn ext4_at_an_offset_inside_an_image_matches_dumpe2fs() {
    let image =
        make(&Spec { args: &["-t", "ext4", "-g", "4096"], offset: 1 << 20, tail: 3 << 20, seed: 9, ..Spec::default() });
    check(&image);
    // Probing the whole image instead finds no superblock at byte 1024.
    let source = FileSource::open(&image.path);
    let len = image.start + image.len + (3 << 20);
    assert!(matches!(blksync_fs::probe(&source, 0, len).unwrap(), Usage::Whole { .. }));
}

#[test]
fn ext4_partition_longer_than_its_filesystem_has_a_used_tail() {
    // A 24 MiB filesystem in a 32 MiB range: the last 8 MiB belong to no block, and are copied
    // (an md superblock lives there).
    let image =
        make(&Spec { args: &["-t", "ext4", "-g", "4096"], size: 24 << 20, tail: 8 << 20, seed: 10, ..Spec::default() });
    let source = FileSource::open(&image.path);
    let Usage::Known(map) = blksync_fs::probe(&source, 0, 32 << 20).unwrap() else { panic!() };
    let runs = support::runs(&map, &source);
    let last = runs.last().unwrap();
    assert!(last.2 && last.1 == 32 << 20 && last.0 <= 24 << 20, "{last:?}");
}

#[test]
fn ext4_of_512_mib_mostly_empty_has_uninit_groups_and_matches_dumpe2fs() {
    let image = make(&Spec { args: &["-t", "ext4"], size: 512 << 20, junk: 16 << 20, seed: 11, ..Spec::default() });
    assert!(uninit_groups(&image) > 0);
    check(&image);
}

fn probe_file(path: &std::path::Path) -> Usage {
    let source = FileSource::open(path);
    let len = std::fs::metadata(path).unwrap().len();
    blksync_fs::probe(&source, 0, len).unwrap()
}

fn whole_reason(usage: Usage) -> String {
    match usage {
        Usage::Whole { reason } => reason,
        Usage::Known(map) => panic!("expected copy-whole, got a map of {:?}", map.kind()),
    }
}

/// Reads, changes and writes back bytes of an image file, then fixes its checksums when asked.
fn edit(path: &std::path::Path, fix: bool, change: impl FnOnce(&mut Vec<u8>)) {
    let mut data = std::fs::read(path).unwrap();
    change(&mut data);
    if fix {
        blksync_fs::fix_checksums(&mut data);
    }
    std::fs::write(path, data).unwrap();
}

fn le32(data: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(data[at..at + 4].try_into().unwrap())
}

/// Where group `g`'s descriptor is in an image with 4 KiB blocks.
fn desc_at(data: &[u8], g: usize) -> usize {
    let size = if le32(data, 1024 + 0x60) & 0x80 != 0 {
        usize::from(u16::from_le_bytes([data[1024 + 0xFE], data[1024 + 0xFF]]))
    } else {
        32
    };
    4096 + g * size
}

#[test]
fn swap_uses_only_its_first_page() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("swap.img");
    std::fs::File::create(&path).unwrap().set_len(16 << 20).unwrap();
    support::run(
        std::process::Command::new("mkswap")
            .args(["-q", "-L", "lbl", "-U", "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9"])
            .arg(&path),
    );
    let source = FileSource::open(&path);
    let Usage::Known(map) = blksync_fs::probe(&source, 0, 16 << 20).unwrap() else { panic!("swap not recognised") };
    assert_eq!(map.kind(), &Kind::Swap { uuid: "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9".into(), label: "lbl".into() });
    assert_eq!(support::runs(&map, &source), vec![(0, 4096, true), (4096, 16 << 20, false)]);
    assert_eq!(map.used_bytes(), 4096);
}

#[test]
fn swap_holding_a_hibernation_image_is_copied_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("swap.img");
    std::fs::File::create(&path).unwrap().set_len(8 << 20).unwrap();
    support::run(std::process::Command::new("mkswap").arg("-q").arg(&path));
    support::poke(&path, 4096 - 10, b"S1SUSPEND\0");
    assert!(whole_reason(probe_file(&path)).contains("hibernation"));
}

#[test]
fn random_bytes_and_zeros_are_copied_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("random.img");
    std::fs::write(&path, support::Rng::new(42).bytes(4 << 20)).unwrap();
    assert_eq!(whole_reason(probe_file(&path)), "no filesystem recognised");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    assert_eq!(whole_reason(probe_file(&path)), "no filesystem recognised");
    std::fs::write(&path, [0u8; 100]).unwrap();
    assert_eq!(whole_reason(probe_file(&path)), "no filesystem recognised");
}

#[test]
fn ext_superblock_changed_without_its_checksum_is_copied_whole() {
    let image = make(&Spec { args: &["-t", "ext4", "-b", "4096", "-g", "4096"], data: 1 << 20, ..Spec::default() });
    edit(&image.path, false, |d| d[1024 + 0x78] ^= 1); // the label
    assert!(whole_reason(probe_file(&image.path)).contains("superblock's checksum"));
}

#[test]
fn ext_superblock_with_impossible_geometry_is_copied_whole() {
    let image = make(&Spec { args: &["-t", "ext2", "-b", "4096", "-g", "4096"], data: 1 << 20, ..Spec::default() });
    let orig = std::fs::read(&image.path).unwrap();
    for (at, value) in [(0x20, 5u32), (0x20, 0), (0x18, 9), (0x04, u32::MAX), (0x28, 0), (0x14, 3)] {
        edit(&image.path, false, |d| {
            d.copy_from_slice(&orig);
            d[1024 + at..1024 + at + 4].copy_from_slice(&value.to_le_bytes());
        });
        let reason = whole_reason(probe_file(&image.path));
        assert!(reason.starts_with("ext filesystem: "), "{reason}");
    }
}

#[test]
fn ext_descriptor_with_a_wrong_checksum_is_copied_whole() {
    let image = make(&Spec { args: &["-t", "ext4", "-b", "4096", "-g", "4096"], data: 1 << 20, ..Spec::default() });
    edit(&image.path, false, |d| {
        let at = desc_at(d, 1) + 0x0E; // group 1's free inode count
        d[at] ^= 1;
    });
    assert!(whole_reason(probe_file(&image.path)).contains("group 1: the descriptor's checksum is wrong"));
}

#[test]
fn ext_descriptor_pointing_outside_the_filesystem_is_copied_whole() {
    let image = make(&Spec { args: &["-t", "ext4", "-b", "4096", "-g", "4096"], data: 1 << 20, ..Spec::default() });
    // Group 1's block bitmap far past the end, with its checksum made right.
    edit(&image.path, true, |d| {
        let at = desc_at(d, 1);
        d[at..at + 4].copy_from_slice(&0x0FFF_FFF0u32.to_le_bytes());
    });
    let reason = whole_reason(probe_file(&image.path));
    assert!(reason.contains("group 1: block bitmap"), "{reason}");
}

#[test]
fn ext_bitmap_failing_its_checksum_makes_its_group_all_used() {
    let image = make(&Spec { args: &["-t", "ext4", "-b", "4096", "-g", "4096"], data: 1 << 20, ..Spec::default() });
    let data = std::fs::read(&image.path).unwrap();
    let bitmap = u64::from(le32(&data, 4096)) * 4096; // group 0's
    // A bit of a free block (past the first 2 MiB) set, within the 512 bytes checksummed.
    support::poke(&image.path, bitmap + 500, &[data[bitmap as usize + 500] ^ 0x10]);
    let (source, map) = probe_known(&image);
    let runs = support::runs(&map, &source);
    assert!(runs[0].2 && runs[0].1 >= 4096 * 4096, "group 0 should be all used: {:?}", runs[0]);
}

#[test]
fn ext_marked_with_errors_or_not_cleanly_unmounted_is_copied_whole() {
    let image = make(&Spec { args: &["-t", "ext3", "-b", "4096"], data: 1 << 20, ..Spec::default() });
    let orig = std::fs::read(&image.path).unwrap();
    edit(&image.path, false, |d| d[1024 + 0x3A] |= 0x2);
    assert!(whole_reason(probe_file(&image.path)).contains("errors"));
    edit(&image.path, false, |d| {
        d.copy_from_slice(&orig);
        d[1024 + 0x3A] &= !0x1;
    });
    assert!(whole_reason(probe_file(&image.path)).contains("cleanly"));
}

#[test]
fn ext_needing_recovery_with_an_empty_journal_reads_as_it_is_on_disk() {
    // `recover` set, but the journal's s_start is 0: recovery replays nothing.
    let image = make(&Spec { args: &["-t", "ext3", "-b", "4096"], data: 1 << 20, ..Spec::default() });
    let (source, map) = probe_known(&image);
    let clean = support::runs(&map, &source);
    drop((source, map));
    edit(&image.path, false, |d| d[1024 + 0x60] |= 0x4);
    assert_eq!(journal_start(&image.path), 0);
    let (source, map) = probe_known(&image);
    assert_eq!(support::runs(&map, &source), clean);
}

#[test]
fn ext_larger_than_the_range_given_is_copied_whole() {
    let image = make(&Spec { args: &["-t", "ext4"], data: 1 << 20, ..Spec::default() });
    let source = FileSource::open(&image.path);
    let reason = whole_reason(blksync_fs::probe(&source, 0, 16 << 20).unwrap());
    assert!(reason.contains("do not fit"), "{reason}");
}

#[test]
fn ext_map_answers_alike_from_several_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<blksync_fs::Map>();
    let image = make(&Spec { args: &["-t", "ext4", "-b", "1024"], seed: 12, ..Spec::default() });
    let (source, map) = probe_known(&image);
    let expected = support::runs(&map, &source);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| assert_eq!(support::runs(&map, &source), expected));
        }
    });
}

#[test]
fn ext4_while_mounted_is_read_through_its_journal_and_known_after_unmounting() {
    let image = make(&Spec { args: &["-t", "ext4", "-b", "4096"], data: 1 << 20, ..Spec::default() });
    let mnt = image.dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount").arg("-o").arg("loop").arg(&image.path).arg(&mnt).output();
    if !mounted.is_ok_and(|out| out.status.success()) {
        eprintln!("skipped: cannot mount a loop device here");
        return;
    }
    std::fs::write(mnt.join("new"), b"written while mounted").unwrap();
    sync_all_filesystems();
    let usage = probe_file(&image.path);
    let recovering = dumpe2fs(&image.path).contains("needs_recovery");
    support::run(std::process::Command::new("umount").arg(&mnt));
    assert!(recovering, "a mounted ext4 needs recovery");
    assert!(matches!(usage, Usage::Known(_)), "{usage:?}");
    assert!(matches!(probe_file(&image.path), Usage::Known(_)));
}

/// `sync(1)`: the mounted filesystem's superblock reaches the image file.
fn sync_all_filesystems() {
    support::run(&mut std::process::Command::new("sync"));
}
