//! The contract every endpoint kind keeps, checked on each: what is written reads back, `zero`
//! makes a range read as zeros, segments are never wrong (they tile the endpoint, and a hole
//! reads as zeros), only a resizable endpoint changes size, and flush succeeds.
//!
//! Each check keeps a model of what the endpoint must hold and compares the whole endpoint
//! with it after every step, so a step that damages bytes outside its range is caught too.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use blksync::endpoint::local::{Local, OpenTarget};
use blksync::endpoint::memory::{Memory, Op};
use blksync::endpoint::{Source, Target};
use blksync::progress::{Control, Silent};
use blksync::sync::SyncOptions;

/// The size every endpoint starts with.
const SIZE: u64 = 1 << 20;

/// Deterministic bytes (xorshift64*), different for each seed.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// Runs the whole contract on `t`, which holds `SIZE` zero bytes.
fn keeps_the_contract(t: &dyn Target) {
    assert_eq!(t.size(), SIZE, "{}: starting size", t.name().display());
    let mut model = vec![0u8; SIZE as usize];
    matches_model(t, &model, "at the start");
    segments_are_never_wrong(t, "at the start");
    reads_back_what_was_written(t, &mut model);
    zero_makes_a_range_read_as_zeros(t, &mut model);
    segments_are_never_wrong(t, "after writes and zeros");
    resizes_only_where_allowed(t, &mut model);
    segments_are_never_wrong(t, "after resizing");
    reading_past_the_end_fails(t);
    t.flush().unwrap_or_else(|e| panic!("{}: flush: {e}", t.name().display()));
    matches_model(t, &model, "after flush");
}

/// Compares the whole endpoint with `model`.
#[track_caller]
fn matches_model(t: &dyn Target, model: &[u8], when: &str) {
    assert_eq!(t.size(), model.len() as u64, "{}: size {when}", t.name().display());
    let mut buf = vec![0; model.len()];
    t.read_at(&mut buf, 0).unwrap_or_else(|e| panic!("{}: reading {when}: {e}", t.name().display()));
    if let Some(i) = buf.iter().zip(model).position(|(a, b)| a != b) {
        panic!("{}: byte {i} is {} instead of {} {when}", t.name().display(), buf[i], model[i]);
    }
}

fn write(t: &dyn Target, model: &mut Vec<u8>, offset: u64, data: &[u8]) {
    t.write_at(data, offset).unwrap_or_else(|e| panic!("{}: write at {offset}: {e}", t.name().display()));
    let end = offset as usize + data.len();
    if model.len() < end {
        model.resize(end, 0);
    }
    model[offset as usize..end].copy_from_slice(data);
}

fn zero(t: &dyn Target, model: &mut [u8], offset: u64, len: u64) {
    t.zero(offset, len).unwrap_or_else(|e| panic!("{}: zero {len} bytes at {offset}: {e}", t.name().display()));
    model[offset as usize..(offset + len) as usize].fill(0);
}

fn reads_back_what_was_written(t: &dyn Target, model: &mut Vec<u8>) {
    // Aligned and not, one byte and many blocks, at the start and at the very end.
    let writes: [(u64, usize); 6] =
        [(0, 4096), (4096 * 3, 65536), (100_001, 7), (300_000, 200_000), (SIZE - 1, 1), (SIZE - 5000, 4999)];
    for (seed, &(offset, len)) in writes.iter().enumerate() {
        write(t, model, offset, &pattern(len, seed as u64 + 1));
        matches_model(t, model, &format!("after writing {len} bytes at {offset}"));
    }
    // Reads of parts, not only of the whole.
    let mut buf = vec![0; 10_000];
    t.read_at(&mut buf, 99_000).unwrap();
    assert!(buf == model[99_000..109_000], "{}: a read of a part", t.name().display());
}

fn zero_makes_a_range_read_as_zeros(t: &dyn Target, model: &mut Vec<u8>) {
    // Block-aligned (a hole can be punched), unaligned at both ends (the edges must be written),
    // inside one block, an already zero range, and the last byte.
    let zeros: [(u64, u64); 6] =
        [(8192, 65536), (300_123, 100_000), (100_002, 3), (SIZE / 2 + 10, 1), (700_000, 1), (SIZE - 1, 1)];
    for &(offset, len) in &zeros {
        zero(t, model, offset, len);
        matches_model(t, model, &format!("after zeroing {len} bytes at {offset}"));
    }
    // A write over a zeroed range reads back too.
    write(t, model, 8192 + 4096, &pattern(4096, 99));
    zero(t, model, 0, 0);
    matches_model(t, model, "after writing into a zeroed range");
}

/// Walks the allocation map: segments start where the previous one ended, are not empty, end
/// at the size at the latest, and a hole reads as zeros.
#[track_caller]
fn segments_are_never_wrong(t: &dyn Target, when: &str) {
    let name = t.name().display();
    let size = t.size();
    let mut pos = 0;
    while pos < size {
        let s = t.segment_at(pos).unwrap_or_else(|e| panic!("{name}: segment at {pos} {when}: {e}"));
        assert_eq!(s.start, pos, "{name}: segment at {pos} {when} starts at {}", s.start);
        assert!(s.start < s.end && s.end <= size, "{name}: segment {s:?} {when} (size {size})");
        if !s.allocated {
            let mut buf = vec![0; (s.end - s.start) as usize];
            t.read_at(&mut buf, s.start).unwrap();
            if let Some(i) = buf.iter().position(|&b| b != 0) {
                panic!("{name}: the hole {s:?} {when} holds data at byte {}", s.start + i as u64);
            }
        }
        pos = s.end;
    }
}

fn resizes_only_where_allowed(t: &dyn Target, model: &mut Vec<u8>) {
    let name = t.name().display().to_string();
    if !t.caps().resizable {
        for size in [SIZE * 2, SIZE / 2] {
            assert!(t.set_size(size).is_err(), "{name}: a fixed-size endpoint resized to {size}");
            matches_model(t, model, &format!("after refusing to resize to {size}"));
        }
        return;
    }
    // Grow: the new tail reads as zeros and can be written.
    let grown = SIZE + 300_007;
    t.set_size(grown).unwrap_or_else(|e| panic!("{name}: growing: {e}"));
    model.resize(grown as usize, 0);
    matches_model(t, model, "after growing");
    segments_are_never_wrong(t, "after growing");
    write(t, model, SIZE + 1000, &pattern(5000, 7));
    // Shrink, then grow again: what was cut off is gone.
    let shrunk = SIZE / 2 + 123;
    t.set_size(shrunk).unwrap_or_else(|e| panic!("{name}: shrinking: {e}"));
    model.truncate(shrunk as usize);
    matches_model(t, model, "after shrinking");
    segments_are_never_wrong(t, "after shrinking");
    t.set_size(SIZE).unwrap_or_else(|e| panic!("{name}: growing again: {e}"));
    model.resize(SIZE as usize, 0);
    matches_model(t, model, "after growing again");
}

fn reading_past_the_end_fails(t: &dyn Target) {
    let mut buf = [0; 2];
    assert!(t.read_at(&mut buf, t.size() - 1).is_err(), "{}: a read past the end", t.name().display());
}

#[test]
fn memory_endpoints_keep_the_contract_with_every_capability_setting() {
    for resizable in [false, true] {
        for holes in [false, true] {
            let name = format!("memory (resizable: {resizable}, holes: {holes})");
            let m = Memory::new(name, SIZE).resizable(resizable).reports_holes(holes);
            keeps_the_contract(&m);
            assert_eq!(m.flushes(), 1);
            if holes {
                // Never written: a hole, where holes are reported.
                assert!(!m.segment_at(SIZE - 100_000).unwrap().allocated);
            } else {
                assert_eq!(m.segment_at(0).unwrap().end, SIZE, "all one allocated segment");
            }
        }
    }
}

#[test]
fn a_local_regular_file_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image");
    let how = OpenTarget { create: true, ..OpenTarget::default() };
    let file = Local::open_target(&path, how).unwrap();
    assert!(file.created());
    file.set_size(SIZE).unwrap();
    keeps_the_contract(&file);
}

#[test]
fn a_loop_device_keeps_the_contract() {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    if !root || !Path::new("/dev/loop-control").exists() {
        eprintln!("skipping: a loop device needs root and /dev/loop-control");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    std::fs::File::create(&backing).unwrap().set_len(SIZE).unwrap();
    let address = format!("loop://{}", backing.display());
    let device = Local::open_target(Path::new(&address), OpenTarget::default()).unwrap();
    assert!(!device.caps().resizable, "a loop device has a fixed size");
    keeps_the_contract(&device);
    drop(device);
    // What the device held is in its backing file.
    let bytes = std::fs::read(&backing).unwrap();
    assert_eq!(bytes.len() as u64, SIZE);
    assert_eq!(&bytes[..4096], &pattern(4096, 1)[..], "the first write reached the backing file");
}

/// An NBD export through the one opener (`nbd+unix://…`), served by nbdkit's memory plugin and
/// by qemu-nbd over a raw file, started by tests/lab/nbd.
#[test]
fn nbd_exports_keep_the_contract() {
    let tool =
        |name: &str| std::process::Command::new(name).arg("--version").output().is_ok_and(|o| o.status.success());
    for (server, args) in [("nbdkit", vec!["--nbdkit", "memory size=1M"]), ("qemu-nbd", vec!["--size", "1M"])] {
        if !tool(server) {
            assert!(std::env::var("BLKSYNC_REQUIRE_NBD").as_deref() != Ok("1"), "{server} is not installed");
            eprintln!("skipping: {server} is not installed");
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        let lab = dir.path().join("lab");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/lab/nbd");
        let out = std::process::Command::new(&script).arg("start").arg("--dir").arg(&lab).args(&args).output().unwrap();
        assert!(out.status.success(), "{server}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let uri = text.lines().find_map(|l| l.strip_prefix("LAB_NBD_URI=")).unwrap().trim_matches('\'').to_string();
        let export = blksync::endpoint::open_target(Path::new(&uri), OpenTarget::default()).unwrap();
        assert!(!export.caps().resizable, "{server}: an export has a fixed size");
        keeps_the_contract(export.as_ref());
        export.close().unwrap();
        let _ = std::process::Command::new(&script).arg("stop").arg("--dir").arg(&lab).status();
    }
}

/// The failure injected into an endpoint reaches the caller of the engine with the offset: the
/// seam works for error paths.
#[test]
fn an_injected_failure_fails_a_sync_and_names_the_offset() {
    let cancel = AtomicBool::new(false);
    let control = Control { observer: &Silent, cancel: &cancel };
    let options = SyncOptions { block_size: 4096, threads: 2, ..SyncOptions::default() };
    let source = Memory::with_bytes("source", pattern(SIZE as usize, 5));
    let target = Memory::new("target", SIZE);
    source.fail_at(123_456, Op::Read);
    let e = blksync::sync::sync(&source, &target, false, &options, control).unwrap_err();
    assert_eq!(e.kind(), blksync::ErrorKind::Io);
    assert!(e.to_string().contains("source at byte offset 123456"), "{e}");
    source.clear_failure();
    target.fail_at(SIZE - 1, Op::Write);
    let e = blksync::sync::sync(&source, &target, false, &options, control).unwrap_err();
    assert!(e.to_string().contains("target at byte offset 1048575"), "{e}");
    target.clear_failure();
    blksync::sync::sync(&source, &target, false, &options, control).unwrap();
    assert!(target.contents() == source.contents());
}
