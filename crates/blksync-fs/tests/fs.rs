//! The used-block map against real filesystems made by mke2fs, checked against dumpe2fs
//! (`shared/lab/e2used.py`), e2fsck and debugfs.

mod support;

use blksync_fs::{Kind, Usage};
use support::{FileSource, Spec, check, dumpe2fs, make, partition, probe_known};

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
fn ext4_partition_longer_than_its_filesystem_has_a_free_tail() {
    // A 24 MiB filesystem in a 32 MiB range: the last 8 MiB belong to no block.
    let image =
        make(&Spec { args: &["-t", "ext4", "-g", "4096"], size: 24 << 20, tail: 8 << 20, seed: 10, ..Spec::default() });
    let source = FileSource::open(&image.path);
    let Usage::Known(map) = blksync_fs::probe(&source, 0, 32 << 20).unwrap() else { panic!() };
    let runs = support::runs(&map, &source);
    let last = runs.last().unwrap();
    assert!(!last.2 && last.1 == 32 << 20 && last.0 <= 24 << 20, "{last:?}");
}

#[test]
fn ext4_of_512_mib_mostly_empty_has_uninit_groups_and_matches_dumpe2fs() {
    let image = make(&Spec { args: &["-t", "ext4"], size: 512 << 20, junk: 16 << 20, seed: 11, ..Spec::default() });
    assert!(uninit_groups(&image) > 0);
    check(&image);
}
