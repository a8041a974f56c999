//! Integration tests: the real `blksync` binary on real files, loop devices and mounts.
//!
//! Tests that need root (loop devices, mounts) print a message and pass when run without it.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use support::*;
use tempfile::TempDir;

const MIB: usize = 1 << 20;

fn tmp() -> TempDir {
    tempfile::Builder::new().prefix("blksync-test").tempdir().unwrap()
}

fn sync_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["sync", "--json", "--progress=none"];
    all.extend_from_slice(args);
    ok(&all).json()
}

#[test]
fn sync_copies_random_data_to_a_missing_destination() {
    let d = tmp();
    let (src, dst) = (arg(d.path(), "src"), arg(d.path(), "dst"));
    write_file(src.as_ref(), &random_bytes(5 * MIB + 123, 1));
    let j = sync_json(&[&src, &dst]);
    assert_same(src.as_ref(), dst.as_ref());
    assert_eq!(j["bytes_written"], (5 * MIB + 123) as u64);
    assert_eq!(j["bytes_read_destination"], 0, "a fresh destination is never read");
}

#[test]
fn sync_writes_only_differing_blocks_and_coalesces_neighbours() {
    let d = tmp();
    let (src, dst) = (arg(d.path(), "src"), arg(d.path(), "dst"));
    let data = random_bytes(8 * MIB, 2);
    write_file(src.as_ref(), &data);
    write_file(dst.as_ref(), &data);
    // One byte in block 10, two adjacent whole blocks at 3 MiB, one byte in the last block.
    patch(src.as_ref(), 10 * 4096 + 7, b"x");
    patch(src.as_ref(), 3 * MIB as u64, &random_bytes(8192, 3));
    patch(src.as_ref(), 8 * MIB as u64 - 1, b"y");
    let j = sync_json(&[&src, &dst]);
    assert_same(src.as_ref(), dst.as_ref());
    assert_eq!(j["bytes_differing"], 4 * 4096);
    assert_eq!(j["bytes_written"], 4 * 4096);
    assert_eq!(j["ranges_differing"], 3);
    let again = sync_json(&[&src, &dst]);
    assert_eq!(again["bytes_written"], 0);
    assert_eq!(again["bytes_differing"], 0);
}

#[test]
fn sync_punches_holes_for_zero_blocks() {
    let d = tmp();
    let (src, dst) = (arg(d.path(), "src"), arg(d.path(), "dst"));
    // Source: allocated zeros (not holes) in the middle.
    let mut data = random_bytes(4 * MIB, 4);
    data[MIB..3 * MIB].fill(0);
    write_file(src.as_ref(), &data);
    write_file(dst.as_ref(), &random_bytes(4 * MIB, 5));
    let j = sync_json(&[&src, &dst]);
    assert_same(src.as_ref(), dst.as_ref());
    assert_eq!(j["bytes_zeroed"], 2 * MIB as u64);
    assert_eq!(j["bytes_written"], 2 * MIB as u64);
    assert!(allocated(dst.as_ref()) <= 2 * MIB as u64 + 64 * 1024, "zero blocks must become holes");
}

#[test]
fn fresh_copy_of_a_sparse_source_stays_sparse() {
    let d = tmp();
    let (src, dst) = (arg(d.path(), "src"), arg(d.path(), "dst"));
    let chunk = random_bytes(64 * 1024, 6);
    // 256 MiB, 1 MiB of data, and an allocated-but-zero block that must not become data.
    sparse_file(src.as_ref(), 256 << 20, &[(0, &chunk), (100 << 20, &chunk), (200 << 20, &vec![0u8; 65536])]);
    let j = sync_json(&[&src, &dst]);
    assert_same(src.as_ref(), dst.as_ref());
    assert_eq!(j["bytes_written"], 2 * 65536);
    assert!(allocated(dst.as_ref()) <= allocated(src.as_ref()));
    assert!(j["bytes_read_source"].as_u64().unwrap() < 8 << 20, "holes are skipped, not read: {j}");
}

#[test]
fn sync_handles_sizes_that_are_not_block_multiples() {
    let d = tmp();
    for (i, size) in [0usize, 1, 511, 4095, 4097, MIB + 1, 2 * MIB - 1, 2 * MIB + 4096 + 3].into_iter().enumerate() {
        let (src, dst) = (arg(d.path(), &format!("s{i}")), arg(d.path(), &format!("d{i}")));
        write_file(src.as_ref(), &random_bytes(size, i as u64));
        ok(&["sync", "-q", &src, &dst]);
        assert_same(src.as_ref(), dst.as_ref());
        // A changed partial last block must be found and copied (older tools missed it).
        if size > 0 {
            patch(src.as_ref(), size as u64 - 1, &[0xAA]);
            let j = sync_json(&["--block-size", "512", &src, &dst]);
            assert_same(src.as_ref(), dst.as_ref());
            assert!(j["bytes_written"].as_u64().unwrap() <= 512);
        }
    }
}

#[test]
fn destination_files_of_other_sizes_are_resized() {
    let d = tmp();
    let (src, dst) = (arg(d.path(), "src"), arg(d.path(), "dst"));
    write_file(src.as_ref(), &random_bytes(MIB, 7));
    write_file(dst.as_ref(), &random_bytes(3 * MIB, 8));
    ok(&["sync", "-q", &src, &dst]);
    assert_same(src.as_ref(), dst.as_ref());
    write_file(dst.as_ref(), &random_bytes(1000, 9));
    let j = sync_json(&[&src, &dst]);
    assert_same(src.as_ref(), dst.as_ref());
    assert_eq!(j["destination_size_before"], 1000);
    assert_eq!(j["destination_size_after"], MIB as u64);
}

#[test]
fn no_resize_refuses_and_leaves_the_destination_alone() {
    let d = tmp();
    let (src, dst) = (arg(d.path(), "src"), arg(d.path(), "dst"));
    write_file(src.as_ref(), &random_bytes(MIB, 10));
    let before = random_bytes(MIB / 2, 11);
    write_file(dst.as_ref(), &before);
    let out = run(&["sync", "--no-resize", &src, &dst]);
    assert_eq!(out.code(), 5, "{}", out.stderr_text());
    assert!(
        out.stderr_text().contains("not resizing the destination, as asked (--common-size"),
        "{}",
        out.stderr_text()
    );
    assert_eq!(read(dst.as_ref()), before);
}

#[test]
fn common_size_touches_nothing_beyond_the_shorter_side() {
    let d = tmp();
    let (src, dst) = (arg(d.path(), "src"), arg(d.path(), "dst"));
    let s = random_bytes(3 * MIB, 12);
    let t = random_bytes(2 * MIB + 5, 13);
    write_file(src.as_ref(), &s);
    write_file(dst.as_ref(), &t);
    ok(&["sync", "-q", "--common-size", &src, &dst]);
    let got = read(dst.as_ref());
    assert_eq!(got.len(), t.len(), "never resized");
    assert_eq!(&got[..], &s[..t.len()]);
    // And the other way round: a longer destination keeps its tail.
    let t = random_bytes(4 * MIB, 14);
    write_file(dst.as_ref(), &t);
    ok(&["sync", "-q", "--common-size", &src, &dst]);
    let got = read(dst.as_ref());
    assert_eq!(&got[..s.len()], &s[..]);
    assert_eq!(&got[s.len()..], &t[s.len()..]);
}

#[test]
fn directory_destination_receives_the_source_file_name() {
    let d = tmp();
    let src = arg(d.path(), "disk.img");
    write_file(src.as_ref(), &random_bytes(100_000, 15));
    std::fs::create_dir(d.path().join("out")).unwrap();
    ok(&["sync", "-q", &src, &arg(d.path(), "out")]);
    assert_same(src.as_ref(), &d.path().join("out/disk.img"));
    std::fs::create_dir(d.path().join("slash")).unwrap();
    ok(&["sync", "-q", &src, &format!("{}/", arg(d.path(), "slash"))]);
    assert_same(src.as_ref(), &d.path().join("slash/disk.img"));
    let out = run(&["sync", &src, &format!("{}/", arg(d.path(), "missing"))]);
    assert_eq!(out.code(), 3);
    assert!(out.stderr_text().contains("does not exist"), "{}", out.stderr_text());
}

#[test]
fn dry_run_writes_nothing() {
    let d = tmp();
    let (src, dst) = (arg(d.path(), "src"), arg(d.path(), "dst"));
    write_file(src.as_ref(), &random_bytes(2 * MIB, 16));
    let before = random_bytes(MIB, 17);
    write_file(dst.as_ref(), &before);
    let j = sync_json(&["-n", &src, &dst]);
    assert_eq!(read(dst.as_ref()), before);
    assert_eq!(j["dry_run"], true);
    assert_eq!(j["bytes_differing"], 2 * MIB as u64);
    assert_eq!(j["destination_size_after"], 2 * MIB as u64);
    let missing = arg(d.path(), "missing");
    ok(&["sync", "-q", "--dry-run", &src, &missing]);
    assert!(!Path::new(&missing).exists(), "dry run must not create the destination");
}

/// `sync -n` said "would write 0 B": it now reports what the real sync then writes and zeroes.
#[test]
fn dry_run_reports_what_it_would_write_and_zero() {
    let d = tmp();
    let (src, dst) = (arg(d.path(), "src"), arg(d.path(), "dst"));
    let mut data = random_bytes(4 * MIB, 30);
    data[MIB..2 * MIB].fill(0);
    write_file(src.as_ref(), &data);
    let mut old = data.clone();
    old[MIB..MIB + 300_000].copy_from_slice(&random_bytes(300_000, 31));
    old[3 * MIB..3 * MIB + 50_000].copy_from_slice(&random_bytes(50_000, 32));
    write_file(dst.as_ref(), &old);
    let would = sync_json(&["-n", &src, &dst]);
    let out = run(&["sync", "-n", &src, &dst]);
    assert!(out.stderr_text().contains("would write 52.0 KiB and zero 296.0 KiB"), "{}", out.stderr_text());
    let did = sync_json(&[&src, &dst]);
    assert!(would["bytes_written"].as_u64().unwrap() > 0);
    assert_eq!(would["bytes_written"], did["bytes_written"]);
    assert_eq!(would["bytes_zeroed"], did["bytes_zeroed"]);
}

#[test]
fn compare_exit_codes_follow_cmp() {
    let d = tmp();
    let (a, b) = (arg(d.path(), "a"), arg(d.path(), "b"));
    let data = random_bytes(3 * MIB, 18);
    write_file(a.as_ref(), &data);
    write_file(b.as_ref(), &data);
    assert_eq!(run(&["compare", &a, &b]).code(), 0);
    patch(b.as_ref(), 5000, b"z");
    patch(b.as_ref(), 2 * MIB as u64, b"zz");
    let out = run(&["compare", &a, &b]);
    assert_eq!(out.code(), 1);
    let text = out.stdout_text();
    assert!(text.contains("8192 bytes") && text.contains("bytes 4096..8192"), "{text}");
    let j = run(&["compare", "--json", &a, &b]).json();
    assert_eq!(j["identical"], false);
    assert_eq!(j["ranges"][1]["offset"], 2 * MIB as u64);
    // Different sizes differ, even when the common part is equal.
    write_file(b.as_ref(), &data[..MIB]);
    assert_eq!(run(&["compare", &a, &b]).code(), 1);
    // Any error is 2, as with cmp.
    assert_eq!(run(&["compare", &a, &arg(d.path(), "nope")]).code(), 2);
    assert_eq!(run(&["compare", "--block-size", "100", &a, &b]).code(), 2);
}

#[test]
fn verify_rereads_both_ends() {
    let d = tmp();
    let (src, dst) = (arg(d.path(), "src"), arg(d.path(), "dst"));
    write_file(src.as_ref(), &random_bytes(3 * MIB, 19));
    let j = sync_json(&["--verify", &src, &dst]);
    assert_eq!(j["verified"], true);
}

#[test]
fn bad_input_gets_clear_errors_and_exit_codes() {
    let d = tmp();
    let src = arg(d.path(), "src");
    write_file(src.as_ref(), b"hello");
    let cases: &[(&[&str], i32, &str)] = &[
        (&["sync", "/nonexistent/x", "y"], 3, "opening source /nonexistent/x: No such file"),
        (&["sync", &src, &src], 2, "same file"),
        (&["sync", "--block-size", "3K", &src, "y"], 2, "power of two"),
        (&["sync", "--block-size", "2M", &src, "y"], 2, "power of two"),
        (&["sync", "--block-size", "lots", &src, "y"], 2, "invalid size"),
        (&["sync", d.path().to_str().unwrap(), "y"], 2, "is a directory"),
        (&["sync", "/dev/null", "y"], 2, "neither a regular file nor a block device"),
        (&["sync", "--common-size", "--no-resize", &src, "y"], 2, "cannot be used with"),
    ];
    for (args, code, text) in cases {
        let out = run(args);
        assert_eq!(out.code(), *code, "{args:?}: {}", out.stderr_text());
        assert!(out.stderr_text().contains(text), "{args:?}: {}", out.stderr_text());
    }
}

#[test]
fn json_summary_has_the_documented_fields() {
    let d = tmp();
    let (src, dst) = (arg(d.path(), "src"), arg(d.path(), "dst"));
    write_file(src.as_ref(), &random_bytes(10_000, 20));
    let j = sync_json(&[&src, &dst]);
    for key in ["bytes_total", "bytes_scanned", "bytes_differing", "bytes_written", "bytes_zeroed", "seconds"] {
        assert!(j.get(key).is_some(), "missing {key}: {j}");
    }
    assert_eq!(j["bytes_total"], 10_000);
    assert_eq!(j["bytes_scanned"], 10_000);
}

#[test]
fn sigint_stops_promptly_leaving_a_correct_prefix() {
    let d = tmp();
    let (src, dst) = (arg(d.path(), "src"), arg(d.path(), "dst"));
    let data = random_bytes(64 * MIB, 21);
    write_file(src.as_ref(), &data);
    let mut child = blksync()
        .args(["sync", "--bwlimit", "16M", "--progress=none", &src, &dst])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once a few chunks are on disk.
    wait_until(&mut child, "4 MiB written", || Path::new(&dst).exists() && allocated(dst.as_ref()) >= 4 * MIB as u64);
    let started = std::time::Instant::now();
    rustix_kill(child.id(), "INT");
    let out = child.wait_with_output().unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?} to stop", started.elapsed());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("incomplete"), "{err}");
    let done: u64 = err.split("the first ").nth(1).and_then(|s| s.split(' ').next()).unwrap().parse().unwrap();
    assert!(done > 0 && done < data.len() as u64, "{err}");
    let got = read(dst.as_ref());
    assert_eq!(&got[..done as usize], &data[..done as usize], "the synced prefix is correct");
    // Running again finishes the job.
    ok(&["sync", "-q", &src, &dst]);
    assert_same(src.as_ref(), dst.as_ref());
}

fn rustix_kill(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap();
    assert!(status.success());
}

#[test]
fn disk_full_on_the_destination_is_a_clear_error() {
    if !can_use_loop_devices() {
        return;
    }
    let d = tmp();
    let src = arg(d.path(), "src");
    write_file(src.as_ref(), &random_bytes(16 * MIB, 22));
    let mnt = d.path().join("small");
    let _m = Mount::new(&mnt, &["-t", "tmpfs", "-o", "size=4M", "tmpfs"]);
    let dst = arg(&mnt, "dst");
    let out = run(&["sync", &src, &dst]);
    assert_eq!(out.code(), 4, "{}", out.stderr_text());
    let err = out.stderr_text();
    assert!(err.contains("No space left on device") && err.contains("at byte offset"), "{err}");
    assert!(!Path::new(&dst).exists(), "a destination we created and could not fill is removed");
}

#[test]
fn block_device_destination_is_synced_with_zeros_written_only_where_needed() {
    if !can_use_loop_devices() {
        return;
    }
    let d = tmp();
    let src = arg(d.path(), "src");
    let mut data = random_bytes(8 * MIB, 23);
    data[2 * MIB..4 * MIB].fill(0);
    write_file(src.as_ref(), &data);
    let backing = d.path().join("backing");
    write_file(&backing, &random_bytes(8 * MIB, 24));
    let lo = Loop::attach(&backing);
    let j = sync_json(&["--verify", &src, lo.path()]);
    assert_same(src.as_ref(), &lo.dev);
    assert_eq!(j["bytes_zeroed"], 2 * MIB as u64);
    assert_eq!(j["verified"], true);
    let j = sync_json(&[&src, lo.path()]);
    assert_eq!(j["bytes_written"], 0);
    assert_eq!(j["bytes_zeroed"], 0, "zeros already on the device are not written again");
}

#[test]
fn discard_unmaps_zero_blocks_on_a_device() {
    if !can_use_loop_devices() {
        return;
    }
    let d = tmp();
    let src = arg(d.path(), "src");
    let mut data = random_bytes(8 * MIB, 25);
    data[MIB..7 * MIB].fill(0);
    write_file(src.as_ref(), &data);
    let backing = d.path().join("backing");
    write_file(&backing, &random_bytes(8 * MIB, 26));
    let lo = Loop::attach(&backing);
    let j = sync_json(&["--discard", &src, lo.path()]);
    assert_same(src.as_ref(), &lo.dev);
    assert_eq!(j["bytes_zeroed"], 6 * MIB as u64);
    assert!(allocated(&backing) <= 3 * MIB as u64, "the loop's backing file was not thinned: {}", allocated(&backing));
}

#[test]
fn device_too_small_is_refused_before_anything_is_written() {
    if !can_use_loop_devices() {
        return;
    }
    let d = tmp();
    let src = arg(d.path(), "src");
    write_file(src.as_ref(), &random_bytes(4 * MIB, 27));
    let backing = d.path().join("backing");
    let before = random_bytes(2 * MIB, 28);
    write_file(&backing, &before);
    let lo = Loop::attach(&backing);
    let out = run(&["sync", &src, lo.path()]);
    assert_eq!(out.code(), 5, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("too small"), "{}", out.stderr_text());
    assert_eq!(read(&lo.dev), before);
    // --common-size syncs what fits.
    ok(&["sync", "-q", "--common-size", &src, lo.path()]);
    assert_eq!(read(&lo.dev), read(src.as_ref())[..2 * MIB]);
}

#[test]
fn larger_device_keeps_its_tail_unless_zero_tail() {
    if !can_use_loop_devices() {
        return;
    }
    let d = tmp();
    let src = arg(d.path(), "src");
    let data = random_bytes(2 * MIB + 512, 29);
    write_file(src.as_ref(), &data);
    let backing = d.path().join("backing");
    let before = random_bytes(4 * MIB, 30);
    write_file(&backing, &before);
    let lo = Loop::attach(&backing);
    let out = ok(&["sync", &src, lo.path()]);
    assert!(out.stderr_text().contains("--zero-tail"), "{}", out.stderr_text());
    let got = read(&lo.dev);
    assert_eq!(&got[..data.len()], &data[..]);
    assert_eq!(&got[data.len()..], &before[data.len()..]);
    ok(&["sync", "-q", "--zero-tail", &src, lo.path()]);
    let got = read(&lo.dev);
    assert_eq!(&got[..data.len()], &data[..]);
    assert!(got[data.len()..].iter().all(|&b| b == 0));
}

#[test]
fn mounted_destination_device_is_refused() {
    if !can_use_loop_devices() {
        return;
    }
    let d = tmp();
    let backing = d.path().join("backing");
    std::fs::File::create(&backing).unwrap().set_len(16 * MIB as u64).unwrap();
    let lo = Loop::attach(&backing);
    mkfs_ext4(&lo.dev);
    let _m = Mount::new(&d.path().join("mnt"), &[lo.path()]);
    let src = arg(d.path(), "src");
    write_file(src.as_ref(), &random_bytes(16 * MIB, 31));
    let before = read(&lo.dev);
    let out = run(&["sync", &src, lo.path()]);
    assert_eq!(out.code(), 6, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("mounted or in use"), "{}", out.stderr_text());
    assert!(read(&lo.dev) == before, "nothing written");
    // A dry run only reads, so it is allowed.
    ok(&["sync", "-q", "-n", &src, lo.path()]);
}

#[test]
fn source_on_a_read_only_mount_works() {
    if !can_use_loop_devices() {
        return;
    }
    let d = tmp();
    let backing = d.path().join("fs");
    std::fs::File::create(&backing).unwrap().set_len(32 * MIB as u64).unwrap();
    mkfs_ext4(&backing);
    let data = random_bytes(3 * MIB, 32);
    {
        let _m = Mount::new(&d.path().join("rw"), &["-o", "loop", backing.to_str().unwrap()]);
        write_file(&d.path().join("rw/image"), &data);
    }
    let _m = Mount::new(&d.path().join("ro"), &["-o", "loop,ro", backing.to_str().unwrap()]);
    let dst = arg(d.path(), "copy");
    ok(&["sync", "-q", "--verify", &arg(&d.path().join("ro"), "image"), &dst]);
    assert_eq!(read(dst.as_ref()), data);
}

#[test]
fn block_device_source_to_file() {
    if !can_use_loop_devices() {
        return;
    }
    let d = tmp();
    let backing = d.path().join("backing");
    let mut data = random_bytes(6 * MIB, 33);
    data[..2 * MIB].fill(0);
    write_file(&backing, &data);
    let lo = Loop::attach(&backing);
    let dst = arg(d.path(), "copy");
    let j = sync_json(&[lo.path(), &dst]);
    assert_eq!(read(dst.as_ref()), data);
    assert_eq!(j["bytes_written"], 4 * MIB as u64);
    assert!(allocated(dst.as_ref()) <= 4 * MIB as u64 + 65536, "zeros from a device become holes");
}

/// `--progress` alone means auto, and the word after it is a path, never a mode: `sync
/// --progress a.img b.img` took `a.img` for the mode. A mode is given as `--progress=MODE`.
#[test]
fn progress_alone_is_auto_and_the_next_word_stays_a_path() {
    let d = tmp();
    let (src, dst) = (arg(d.path(), "src"), arg(d.path(), "dst"));
    write_file(src.as_ref(), &random_bytes(MIB, 70));
    ok(&["sync", "--progress", &src, &dst]);
    assert_same(src.as_ref(), dst.as_ref());
    let out = ok(&["sync", "--progress=plain", &src, &dst]);
    assert!(out.stderr_text().contains("blksync:"), "{}", out.stderr_text());
    let out = run(&["sync", "--progress", "plain", &src, &dst]);
    assert_eq!(out.code(), 2, "`plain` is a third path here: {}", out.stderr_text());
}

/// A bare `--bwlimit` number is KiB/s, as with rsync: `--bwlimit 8192` (8 MiB/s) copies 2 MiB
/// in well under a second, where bytes per second would take over four minutes.
#[test]
fn a_bare_bwlimit_number_is_kib_per_second() {
    let d = tmp();
    let (src, dst) = (arg(d.path(), "src"), arg(d.path(), "dst"));
    write_file(src.as_ref(), &random_bytes(2 * MIB, 71));
    let mut child = blksync().args(["sync", "-q", "--bwlimit", "8192", &src, &dst]).spawn().unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("--bwlimit 8192 was taken as bytes per second");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_same(src.as_ref(), dst.as_ref());
}

/// Shell completions and the man page come from the CLI definition, so they cannot drift from
/// it: every subcommand and its flags are in them (issue 13, item 10).
#[test]
fn completions_and_the_man_page_are_generated_from_the_cli() {
    for (shell, marker) in [("bash", "_blksync()"), ("zsh", "#compdef blksync"), ("fish", "complete -c blksync")] {
        let out = ok(&["completions", shell]);
        let text = out.stdout_text();
        assert!(text.contains(marker), "{shell}: {}", &text[..text.len().min(200)]);
        for word in ["sync", "backup", "restore", "bwlimit", "undo"] {
            assert!(text.contains(word), "{shell} completions lack {word}");
        }
    }
    let man = ok(&["man"]).stdout_text();
    assert!(man.contains(".TH blksync 1"), "{}", &man[..man.len().min(200)]);
    for word in ["sync", "backup", "restore", "prune", "completions"] {
        assert!(man.contains(word), "the man page lacks {word}");
    }
    assert_eq!(run(&["completions", "tcsh"]).code(), 2, "an unknown shell is a usage error");
}
