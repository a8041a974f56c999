//! The used-block map against real filesystems made by mke2fs, checked against `dumpe2fs`
//! (`shared/lab/e2used.py`), e2fsck and debugfs.

mod support;

use std::fmt::Write as _;

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
    std::fs::File::create(&path).unwrap().set_len(4 << 20).unwrap();
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

// The journal (docs/FILESYSTEMS.md, "The journal"). debugfs writes transactions into the
// journal of an unmounted image (`jo`, `jw`, `jc`), replays them (`jr`), and is the oracle:
// the map must equal dumpe2fs's after debugfs's replay, block for block.

/// Filesystem block size of an image, from its superblock.
fn block_size(data: &[u8]) -> usize {
    1024 << le32(data, 1024 + 0x18)
}

/// The blocks where `b` differs from `a`, as debugfs block list ranges (`3-5,9`).
fn differing(a: &[u8], b: &[u8], bs: usize) -> (Vec<u64>, String) {
    let blocks: Vec<u64> =
        a.chunks(bs).zip(b.chunks(bs)).enumerate().filter(|(_, (x, y))| x != y).map(|(i, _)| i as u64).collect();
    let mut list = String::new();
    let mut i = 0;
    while i < blocks.len() {
        let mut j = i;
        while j + 1 < blocks.len() && blocks[j + 1] == blocks[j] + 1 {
            j += 1;
        }
        if !list.is_empty() {
            list.push(',');
        }
        if i == j {
            let _ = write!(list, "{}", blocks[i]);
        } else {
            let _ = write!(list, "{}-{}", blocks[i], blocks[j]);
        }
        i = j + 1;
    }
    (blocks, list)
}

/// Writes into the journal of `image` (not needing recovery) one committed transaction that
/// replays into what the debugfs commands `change` do to a copy of it: every block that
/// differs. The journal is opened with `open` (`jo`, `jo -c`, `jo -c -v 2`); `more` are
/// journal commands after it (more transactions). Returns the blocks of the transaction.
fn journal_change(image: &support::Image, open: &str, change: &str, more: &str) -> Vec<u64> {
    let target = support::copy_of(&image.path, image.dir.path(), "target.img");
    support::debugfs(&target, change, true);
    journal_towards(image, &target, open, more)
}

/// [`journal_change`] towards `target`, a changed copy of `image`.
fn journal_towards(image: &support::Image, target: &std::path::Path, open: &str, more: &str) -> Vec<u64> {
    let dir = image.dir.path();
    let (a, b) = (std::fs::read(&image.path).unwrap(), std::fs::read(target).unwrap());
    let bs = block_size(&a);
    let (blocks, list) = differing(&a, &b, bs);
    assert!(!blocks.is_empty(), "{} is no change", target.display());
    let data: Vec<u8> = blocks.iter().flat_map(|&n| b[n as usize * bs..(n as usize + 1) * bs].to_vec()).collect();
    let dat = dir.join("blocks.dat");
    std::fs::write(&dat, data).unwrap();
    let out = support::debugfs(&image.path, &format!("{open}\njw -b {list} {}\n{more}jc\n", dat.display()), true);
    assert!(!out.contains("rror"), "debugfs: {out}");
    assert!(dumpe2fs(&image.path).contains("needs_recovery"));
    assert_ne!(journal_start(&image.path), 0);
    blocks
}

/// A debugfs script that writes a new file, makes a directory and removes two files: blocks
/// allocated and freed, an inode, a directory, bitmaps, descriptors and the superblock.
fn some_changes(image: &support::Image) -> String {
    let new = image.dir.path().join("new.dat");
    std::fs::write(&new, support::Rng::new(5).bytes(300_000)).unwrap();
    let (a, b) = (&image.files[0].0, &image.files[1].0);
    format!("write {} new\nmkdir newdir\nrm {a}\nrm {b}\n", new.display())
}

/// Group 0's block bitmap, from its descriptor (first descriptor block, either size).
fn bitmap_of_group_0(data: &[u8]) -> u64 {
    let bs = block_size(data);
    let at = if bs == 1024 { 2048 } else { bs };
    u64::from(le32(data, at))
}

#[test]
fn journalled_changes_read_as_replay_leaves_them_without_checksums_or_with_v2_or_v3() {
    let variants: [(&str, &[&str], &str); 6] = [
        ("ext4 4K, checksum v3", &["-t", "ext4", "-b", "4096"], "jo -c"),
        ("ext4 4K, checksum v2", &["-t", "ext4", "-b", "4096"], "jo -c -v 2"),
        ("ext4 1K, no checksums", &["-t", "ext4", "-b", "1024", "-O", "^metadata_csum"], "jo"),
        ("ext4 1K 32-bit, checksum v3", &["-t", "ext4", "-b", "1024", "-O", "^64bit"], "jo -c"),
        ("ext3 4K, block-mapped journal", &["-t", "ext3", "-b", "4096"], "jo"),
        ("ext3 1K", &["-t", "ext3", "-b", "1024"], "jo"),
    ];
    for (i, (what, args, open)) in variants.into_iter().enumerate() {
        let image = make(&Spec { args, seed: 30 + i as u64, ..Spec::default() });
        let change = some_changes(&image);
        let blocks = journal_change(&image, open, &change, "");
        let report = support::check_journalled(&image, true);
        eprintln!("{what}: {} blocks journalled: {report:?}", blocks.len());
        assert!(report.missed_on_disk > 0, "{what}: the journal changes no allocation: {report:?}");
    }
}

#[test]
fn a_revoke_record_cancels_copies_up_to_its_transaction_and_not_after() {
    // Without bitmap checksums: the revoked bitmap would fail the journalled descriptor's.
    let args = &["-t", "ext4", "-b", "4096", "-O", "^metadata_csum"];
    let image = make(&Spec { args, seed: 40, ..Spec::default() });
    let bitmap = bitmap_of_group_0(&std::fs::read(&image.path).unwrap());
    let change = some_changes(&image);
    // The first transaction's copy of group 0's bitmap is revoked by the second.
    journal_change(&image, "jo", &change, &format!("jw -r {bitmap}\n"));
    let revoked = support::check_journalled(&image, false);
    eprintln!("revoked: {revoked:?}");
    // A revoke followed by a new copy in a later transaction: the copy counts.
    let image = make(&Spec { args, seed: 40, ..Spec::default() });
    let change = some_changes(&image);
    let dir = image.dir.path();
    let copy = dir.join("bitmap.dat");
    let mut ones = vec![0u8; 4096];
    ones[..512].fill(0xFF); // the first 4096 blocks used
    std::fs::write(&copy, &ones).unwrap();
    journal_change(&image, "jo", &change, &format!("jw -r {bitmap}\njw -b {bitmap} {}\n", copy.display()));
    let recopied = support::check_journalled(&image, false);
    eprintln!("revoked, then copied again: {recopied:?}");
    assert!(revoked.added_by_replay == 0 && recopied.added_by_replay > 1000, "{revoked:?} {recopied:?}");
}

#[test]
fn an_uncommitted_transaction_is_not_replayed() {
    let image = make(&Spec { args: &["-t", "ext4", "-b", "1024"], seed: 41, ..Spec::default() });
    let data = std::fs::read(&image.path).unwrap();
    let bitmap = bitmap_of_group_0(&data);
    let change = some_changes(&image);
    let ones = image.dir.path().join("ones.dat");
    std::fs::write(&ones, vec![0xFFu8; 1024]).unwrap();
    // An all-used bitmap for group 0 in a transaction without its commit block.
    journal_change(&image, "jo -c", &change, &format!("jw -c -b {bitmap} {}\n", ones.display()));
    let report = support::check_journalled(&image, true);
    assert!(report.missed_on_disk > 0, "{report:?}");
}

#[test]
fn an_escaped_copy_gets_its_magic_back() {
    // Group 2 (no superblock backup, its metadata elsewhere with flex_bg) with the blocks
    // allocated whose bits spell the journal magic C0 3B 39 98 in its bitmap's first bytes:
    // debugfs escapes the copy, and the map reads those blocks as used.
    let image = make(&Spec { args: &["-t", "ext4", "-b", "1024", "-g", "1024"], seed: 42, ..Spec::default() });
    let first = 1 + 2 * 1024;
    let (oracle, _) = support::oracle(&image.path);
    let used = support::block_set(&oracle);
    assert!((first..first + 32).all(|b| !used.contains(&b)), "group 2 starts with used blocks");
    let mut change = String::new();
    for (i, byte) in [0xC0u8, 0x3B, 0x39, 0x98].into_iter().enumerate() {
        for bit in 0..8 {
            if byte & (1 << bit) != 0 {
                let _ = writeln!(change, "setb {}", first + 8 * i as u64 + bit);
            }
        }
    }
    journal_change(&image, "jo -c", &change, "");
    // The transaction's descriptor (log block 1) has a tag flagged ESCAPE (v3 tags: 16 bytes,
    // flags in the low half of the word at 4, a UUID after the first).
    let journal = image.dir.path().join("journal.dat");
    support::debugfs(&image.path, &format!("dump <8> {}\n", journal.display()), false);
    let log = std::fs::read(&journal).unwrap();
    let descriptor = &log[1024..2048];
    assert_eq!(descriptor[..8], [0xC0, 0x3B, 0x39, 0x98, 0, 0, 0, 1]);
    let mut escaped = false;
    let mut p = 12;
    while p + 16 <= 1024 - 4 {
        let flags = u16::from_be_bytes([descriptor[p + 6], descriptor[p + 7]]);
        escaped |= flags & 0x1 != 0;
        p += if flags & 0x2 != 0 { 16 } else { 32 };
        if flags & 0x8 != 0 {
            break;
        }
    }
    assert!(escaped, "debugfs escaped no copy");
    let report = support::check_journalled(&image, true);
    assert!(report.added_by_replay >= 14, "{report:?}");
}

// Snapshots of mounted filesystems, as of a running machine's disk: the kernel writes the
// journal, and the map must agree with debugfs's replay of it and cover e2fsck's result.

/// Unmounts on drop.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Mounts `image` (with `options`) on a loop device and works on it: small files and a larger
/// one written, a file deleted while held open (an orphan), directories made and removed,
/// files of the image removed; then commits the journal with fsync, which writes no metadata
/// home, and copies the image while it is still mounted: a crash-consistent snapshot. Rounds
/// go on until the copy's journal is not empty. `None` where mounting is not possible.
fn snapshot_while_mounted(image: &support::Image, options: &str) -> Option<std::path::PathBuf> {
    let dir = image.dir.path();
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .arg("-o")
        .arg(format!("loop,noatime,{options}"))
        .arg(&image.path)
        .arg(&mnt)
        .output();
    if !mounted.is_ok_and(|out| out.status.success()) {
        eprintln!("skipped: cannot mount a loop device here");
        return None;
    }
    let _mounted = Mounted(mnt.clone());
    let mut rng = support::Rng::new(image.len);
    let snap = dir.join("snap.img");
    for round in 0..8 {
        let work = mnt.join(format!("r{round}"));
        std::fs::create_dir(&work).unwrap();
        let mut written = Vec::new();
        for i in 0..48 {
            let path = work.join(format!("s{i}"));
            let n = 100 + (rng.next() % 6000) as usize;
            std::fs::write(&path, rng.bytes(n)).unwrap();
            written.push(path);
        }
        let big = work.join("big");
        std::fs::write(&big, rng.bytes(700_000)).unwrap();
        written.push(big);
        for i in 0..12 {
            std::fs::create_dir(work.join(format!("d{i}"))).unwrap();
        }
        for i in (0..12).step_by(2) {
            std::fs::remove_dir(work.join(format!("d{i}"))).unwrap();
        }
        for path in written.iter().step_by(3) {
            std::fs::remove_file(path).unwrap();
        }
        if let Some((name, _)) = image.files.get(round) {
            std::fs::remove_file(mnt.join(name)).unwrap();
        }
        let orphan_path = work.join("orphan");
        std::fs::write(&orphan_path, rng.bytes(200_000)).unwrap();
        let orphan = std::fs::File::open(&orphan_path).unwrap();
        orphan.sync_all().unwrap();
        std::fs::remove_file(&orphan_path).unwrap();
        // fsync commits the running transaction (all of the above) to the journal.
        for path in written.iter().filter(|p| p.exists()) {
            std::fs::File::open(path).unwrap().sync_all().unwrap();
        }
        support::run(std::process::Command::new("cp").arg("--sparse=always").arg(&image.path).arg(&snap));
        drop(orphan);
        if journal_start(&snap) != 0 && dumpe2fs(&snap).contains("needs_recovery") {
            eprintln!("snapshot after round {round}");
            return Some(snap);
        }
    }
    panic!("no copy in 8 rounds had transactions in its journal");
}

/// Snapshots `spec`'s image while mounted with `options` and checks the map of the snapshot,
/// whose journal has `features` (dumpe2fs's words).
fn check_snapshot(spec: &Spec<'_>, options: &str, features: &str) {
    let image = make(spec);
    let Some(snap) = snapshot_while_mounted(&image, options) else { return };
    let header = support::run(std::process::Command::new("dumpe2fs").arg("-h").arg(&snap));
    let line = header.lines().find(|l| l.starts_with("Journal features:")).unwrap();
    assert_eq!(line.split_once(':').unwrap().1.trim(), features);
    let snapshot = support::Image {
        path: snap,
        start: 0,
        len: image.len,
        files: Vec::new(),
        dir: tempfile::tempdir_in(image.dir.path()).unwrap(),
    };
    let report = support::check_journalled(&snapshot, true);
    let bs = report.block_size;
    eprintln!(
        "{:?} mounted {options}: {report:?}; used by the map {} KiB, after e2fsck {} KiB, on disk unreplayed {} KiB",
        spec.args,
        report.ours * bs / 1024,
        report.fsck * bs / 1024,
        report.on_disk * bs / 1024
    );
    assert!(report.missed_on_disk > 0, "the journal held no allocation the disk did not: {report:?}");
    // Only the orphan's blocks (and what else e2fsck frees) more than e2fsck.
    assert!((report.ours - report.fsck) * bs <= 4 << 20, "{report:?}");
}

#[test]
fn ext4_copied_while_mounted_reads_as_its_journal_replays() {
    check_snapshot(
        &Spec { args: &["-t", "ext4", "-b", "4096"], size: 64 << 20, seed: 50, ..Spec::default() },
        "",
        "journal_incompat_revoke journal_64bit journal_checksum_v3",
    );
}

#[test]
fn ext3_copied_while_mounted_reads_as_its_journal_replays() {
    check_snapshot(
        &Spec { args: &["-t", "ext3", "-b", "4096"], size: 64 << 20, seed: 51, ..Spec::default() },
        "",
        "journal_incompat_revoke",
    );
}

#[test]
fn ext4_without_metadata_csum_with_journal_checksum_v1_copied_while_mounted_reads_as_it_replays() {
    // journal_checksum on a filesystem without metadata_csum: jbd2's checksum v1 (crc32_be).
    let args = &["-t", "ext4", "-b", "1024", "-O", "^metadata_csum,^64bit"];
    check_snapshot(
        &Spec { args, size: 48 << 20, seed: 52, ..Spec::default() },
        "journal_checksum",
        "journal_checksum journal_incompat_revoke",
    );
}

/// Where block `l` of the journal (inode 8) is in the image.
fn journal_block(image: &std::path::Path, l: u64) -> u64 {
    let out = support::debugfs(image, &format!("bmap <8> {l}\n"), false);
    out.lines().filter_map(|line| line.trim().parse().ok()).next_back().unwrap()
}

/// Byte offset of inode 8 in an image (group 0's inode table, in the first descriptor).
fn journal_inode_at(data: &[u8]) -> usize {
    let bs = block_size(data);
    let desc = if bs == 1024 { 2048 } else { bs };
    let inode_size = usize::from(u16::from_le_bytes([data[1024 + 0x58], data[1024 + 0x59]]));
    le32(data, desc + 8) as usize * bs + 7 * inode_size
}

#[test]
fn a_journal_failing_a_checksum_is_copied_whole() {
    let image = make(&Spec { args: &["-t", "ext4", "-b", "4096"], seed: 60, ..Spec::default() });
    let change = some_changes(&image);
    // One transaction: its descriptor at log block 1, the copies, the commit block.
    let copies = journal_change(&image, "jo -c", &change, "").len() as u64;
    assert!(copies < 250, "one descriptor block");
    let orig = std::fs::read(&image.path).unwrap();
    let cases = [
        ("a copy", 2, 100, "the copy of block"),
        ("the descriptor", 1, 40, "the descriptor at log block 1"),
        ("the commit block", 2 + copies, 0x30, "the commit block at log block"),
        ("the journal superblock", 0, 0x60, "journal superblock"),
    ];
    for (what, l, offset, expected) in cases {
        let at = journal_block(&image.path, l) * 4096 + offset;
        edit(&image.path, false, |d| {
            d.copy_from_slice(&orig);
            d[at as usize] ^= 0x10;
        });
        let reason = whole_reason(probe_file(&image.path));
        eprintln!("{what}: {reason}");
        assert!(reason.contains(expected) && reason.contains("checksum"), "{what}: {reason}");
    }
}

/// A change to an image's bytes.
type Change = Box<dyn Fn(&mut Vec<u8>)>;

#[test]
fn a_journal_with_fast_commits_elsewhere_or_damaged_is_copied_whole() {
    let image = make(&Spec { args: &["-t", "ext4", "-b", "4096"], seed: 61, ..Spec::default() });
    let change = some_changes(&image);
    journal_change(&image, "jo", &change, "");
    let orig = std::fs::read(&image.path).unwrap();
    let jsb = journal_block(&image.path, 0) as usize * 4096;
    let inode = journal_inode_at(&orig);
    let set_be32 = |d: &mut Vec<u8>, at: usize, value: u32| d[at..at + 4].copy_from_slice(&value.to_be_bytes());
    let cases: Vec<(&str, Change, &str)> = vec![
        ("ext4 fast_commit", Box::new(|d| d[1024 + 0x5C + 1] |= 0x4), "fast commits"),
        ("an external journal", Box::new(|d| d[1024 + 0xD0] = 1), "another device"),
        ("the backup of the inode", Box::new(|d| d[1024 + 0x10C] ^= 1), "s_jnl_blocks"),
        ("the inode's checksum", Box::new(move |d| d[inode + 0x28] ^= 1), "journal inode 8: its checksum is wrong"),
        ("no journal magic", Box::new(move |d| d[jsb] = 0), "no journal superblock"),
        ("superblock type", Box::new(move |d| set_be32(d, jsb + 4, 7)), "type 7"),
        ("block size", Box::new(move |d| set_be32(d, jsb + 0x0C, 1024)), "block size"),
        ("s_errno", Box::new(move |d| set_be32(d, jsb + 0x20, 5)), "recorded error 5"),
        ("jbd2 fast commits", Box::new(move |d| d[jsb + 0x2B] |= 0x20), "fast commits"),
        ("unknown incompat", Box::new(move |d| d[jsb + 0x2A] |= 0x1), "incompatible features 0x100"),
        ("ro_compat", Box::new(move |d| d[jsb + 0x2F] |= 0x1), "read-only-compatible"),
        ("two checksums", Box::new(move |d| d[jsb + 0x2B] |= 0x18), "more than one kind"),
        ("a start past the end", Box::new(move |d| set_be32(d, jsb + 0x1C, 1 << 20)), "start"),
        ("a block type", Box::new(move |d| set_be32(d, jsb + 4096 + 4, 9)), "of type 9"),
    ];
    for (what, change, expected) in cases {
        edit(&image.path, true, |d| {
            d.copy_from_slice(&orig);
            change(d);
        });
        let reason = whole_reason(probe_file(&image.path));
        eprintln!("{what}: {reason}");
        assert!(reason.contains("journal needs recovery") && reason.contains(expected), "{what}: {reason}");
    }
}

/// Writes by hand into the empty journal of `image` (a filesystem without 64bit and
/// `metadata_csum`: no journal checksums, 8-byte tags) one committed transaction holding
/// `target`'s content of every block where it differs, and marks the filesystem as needing
/// recovery: for copies past the filesystem's end, which debugfs does not write. debugfs's
/// replay is still the oracle.
fn journal_by_hand(image: &std::path::Path, target: &std::path::Path) -> usize {
    let mut data = std::fs::read(image).unwrap();
    let new = std::fs::read(target).unwrap();
    let bs = block_size(&data);
    assert_eq!(le32(&data, 1024 + 0x60) & 0x80, 0, "no 64bit");
    let (blocks, _) = differing(&data, &new, bs);
    assert!(blocks.len() < (bs - 12 - 16) / 8, "one descriptor block");
    let j0 = journal_block(image, 0) as usize * bs;
    assert_eq!(journal_block(image, blocks.len() as u64 + 3) as usize * bs, j0 + (blocks.len() + 3) * bs, "contiguous");
    let be = |d: &mut Vec<u8>, at: usize, v: u32| d[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let seq = u32::from_be_bytes(data[j0 + 0x18..j0 + 0x1C].try_into().unwrap());
    let uuid = data[j0 + 0x30..j0 + 0x40].to_vec();
    be(&mut data, j0 + 0x1C, 1); // s_start
    let desc = j0 + bs;
    data[desc..desc + bs].fill(0);
    be(&mut data, desc, 0xC03B_3998);
    be(&mut data, desc + 4, 1);
    be(&mut data, desc + 8, seq);
    let mut p = desc + 12;
    for (i, &b) in blocks.iter().enumerate() {
        be(&mut data, p, b as u32);
        let flags: u16 = if i == 0 { 0 } else { 0x2 } | if i + 1 == blocks.len() { 0x8 } else { 0 };
        data[p + 6..p + 8].copy_from_slice(&flags.to_be_bytes());
        p += 8;
        if i == 0 {
            data[p..p + 16].copy_from_slice(&uuid);
            p += 16;
        }
        let copy = j0 + (2 + i) * bs;
        data[copy..copy + bs].copy_from_slice(&new[b as usize * bs..(b as usize + 1) * bs]);
    }
    let commit = j0 + (2 + blocks.len()) * bs;
    data[commit..commit + 2 * bs].fill(0);
    be(&mut data, commit, 0xC03B_3998);
    be(&mut data, commit + 4, 2);
    be(&mut data, commit + 8, seq);
    data[1024 + 0x60] |= 0x4; // recover
    std::fs::write(image, data).unwrap();
    blocks.len()
}

#[test]
fn a_filesystem_grown_in_its_journal_is_read_at_its_new_size() {
    // A 32 MiB ext4 at the start of 64 MiB, and a transaction that holds what resize2fs
    // changes to grow it to 64 MiB (superblock, descriptors, the new groups' bitmaps), as an
    // online resize leaves its journal: read through it, the map has the new groups.
    let args = &["-t", "ext4", "-b", "4096", "-g", "4096", "-O", "^64bit,^metadata_csum"];
    let image = make(&Spec { args, tail: 32 << 20, seed: 62, ..Spec::default() });
    let target = support::copy_of(&image.path, image.dir.path(), "grown.img");
    support::run(std::process::Command::new("resize2fs").arg("-f").arg(&target).arg("64M"));
    let blocks = journal_by_hand(&image.path, &target);
    let grown = support::Image { len: 64 << 20, files: Vec::new(), ..image };
    let report = support::check_journalled(&grown, true);
    eprintln!("{blocks} blocks journalled: {report:?}");
    let (source, map) = probe_known(&grown);
    let runs = support::runs(&map, &source);
    assert!(runs.iter().any(|r| r.2 && r.0 >= 32 << 20), "nothing used past the old end: {runs:?}");
    assert!(report.added_by_replay > 0, "{report:?}");
}

/// A 4 MiB filesystem of 1 KiB blocks with two files and every other block from 600 on marked
/// used (as if by one-block files), and then a journal added by tune2fs in the holes: a journal
/// of hundreds of fragments (an extent tree of depth 2 with ext4, as many indirect pointers with
/// ext3). e2fsck later frees the marked blocks, which no file holds.
fn fragmented_journal(kind: &str) -> support::Image {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let mut files = Vec::new();
    for (i, n) in [5000, 70_000].into_iter().enumerate() {
        let content = support::Rng::new(i as u64).bytes(n);
        std::fs::write(tree.join(format!("f{i}")), &content).unwrap();
        files.push((format!("f{i}"), content));
    }
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(4 << 20).unwrap();
    support::run(
        std::process::Command::new("mke2fs")
            .args(["-F", "-q", "-t", kind, "-b", "1024", "-O", "^has_journal", "-d"])
            .arg(&tree)
            .arg(&path),
    );
    let mut setb = String::new();
    for b in (600..4096).step_by(2) {
        let _ = writeln!(setb, "setb {b}");
    }
    support::debugfs(&path, &setb, true);
    support::run(std::process::Command::new("tune2fs").args(["-J", "size=1"]).arg(&path));
    support::Image { path, start: 0, len: 4 << 20, files, dir }
}

#[test]
fn a_fragmented_journal_mapped_by_a_deep_extent_tree_or_by_indirect_blocks_is_read() {
    for (kind, open, map) in [("ext4", "jo -c", "Level"), ("ext3", "jo", "(IND)")] {
        let image = fragmented_journal(kind);
        let stat = support::debugfs(&image.path, "stat <8>\nex <8>\n", false);
        let pieces = stat.matches("):").count();
        assert!(pieces > 300 && stat.contains(map) && (kind == "ext3" || stat.contains(" 0/ 2 ")), "{kind}: {stat}");
        let change = some_changes(&image);
        journal_change(&image, open, &change, "");
        let report = support::check_journalled(&image, true);
        eprintln!("{kind}: a journal in {pieces} pieces: {report:?}");
        assert!(report.added_by_replay > 0, "{kind}: {report:?}");
        if kind == "ext4" {
            // The root's child, an extent block: changed, it fails its checksum.
            let root = stat.lines().find(|l| l.trim_start().starts_with("0/ 2")).unwrap();
            let child: u64 = root.split_whitespace().nth(7).unwrap().parse().unwrap();
            edit(&image.path, false, |d| d[child as usize * 1024 + 20] ^= 1);
            let reason = whole_reason(probe_file(&image.path));
            assert!(reason.contains("journal inode 8: an extent block fails its checksum"), "{reason}");
        }
    }
}
