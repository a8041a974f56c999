//! Backup chains under damage: a damaged base, missing, foreign or crafted increments, and the
//! permissions of what a chain holds.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use support::*;
use tempfile::TempDir;

const MIB: usize = 1 << 20;

type Damage = Box<dyn Fn(&Path)>;

/// A chain of `points` backups of a changing 4 MiB image; returns the image at each point.
fn chain(d: &TempDir, points: usize) -> (String, String, Vec<Vec<u8>>) {
    let (src, chain) = (arg(d.path(), "src.img"), arg(d.path(), "chain"));
    let mut data = random_bytes(4 * MIB, 1);
    data[3 * MIB..].fill(0);
    let mut states = Vec::new();
    for i in 0..points {
        if i > 0 {
            let at = i * 200_000;
            data[at..at + 30_000].copy_from_slice(&random_bytes(30_000, i as u64 + 10));
        }
        write_file(src.as_ref(), &data);
        ok(&["backup", "-q", &src, &chain]);
        states.push(data.clone());
    }
    (src, chain, states)
}

fn base_image(chain: &str) -> PathBuf {
    std::fs::read_dir(chain)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("base-") && p.extension().unwrap() == "img")
        .unwrap()
}

#[track_caller]
fn fails_with(args: &[&str], code: i32, needles: &[&str]) -> String {
    let out = run(args);
    let err = out.stderr_text();
    assert_eq!(out.code(), code, "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: {n:?} not in: {err}");
    }
    err
}

#[test]
fn a_damaged_base_image_is_found_by_list_verify_restore_and_prune() {
    let d = tempfile::tempdir().unwrap();
    let (_, chain, states) = chain(&d, 3);
    let base = base_image(&chain);
    let pristine = read(&base);
    let out = arg(d.path(), "out.img");
    let name = base.file_name().unwrap().to_string_lossy().into_owned();
    // A flipped byte (as with `printf Z | dd seek=100 conv=notrunc`), then a truncation to half,
    // then a hole punched where data was.
    let damage: [(&str, Damage); 3] = [
        ("a flipped byte", Box::new(|p| patch(p, 100, b"Z"))),
        (
            "a truncation",
            Box::new(|p| std::fs::OpenOptions::new().write(true).open(p).unwrap().set_len(2 * MIB as u64).unwrap()),
        ),
        ("a punched hole", Box::new(|p| punch(p, MIB as u64, 64 << 10))),
    ];
    for (what, damage) in &damage {
        write_file(&base, &pristine);
        damage(&base);
        fails_with(&["list", "--verify", &chain], 9, &[&name]);
        let _ = std::fs::remove_file(&out);
        let err = fails_with(&["restore", "-q", "--at", "0", &chain, &out], 9, &[&name]);
        assert!(err.contains("offset") || err.contains("bytes long"), "{what}: {err}");
        let _ = std::fs::remove_file(&out);
        fails_with(&["restore", "-q", &chain, &out], 9, &[&name]);
        fails_with(&["prune", "-q", "--keep", "1", &chain], 9, &[&name]);
        assert_eq!(
            run(&["list", "--json", &chain]).json()["points"].as_array().unwrap().len(),
            3,
            "{what}: prune folded nothing"
        );
    }
    write_file(&base, &pristine);
    ok(&["list", "--verify", &chain]);
    for (i, state) in states.iter().enumerate() {
        let _ = std::fs::remove_file(&out);
        ok(&["restore", "-q", "--at", &i.to_string(), &chain, &out]);
        assert!(read(out.as_ref()) == *state, "point {i}");
    }
}

fn punch(path: &Path, offset: u64, len: u64) {
    let status = std::process::Command::new("fallocate")
        .args(["--punch-hole", "--offset", &offset.to_string(), "--length", &len.to_string()])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn a_missing_increment_keeps_the_points_before_it_restorable() {
    let d = tempfile::tempdir().unwrap();
    let (src, chain, states) = chain(&d, 5);
    std::fs::remove_file(Path::new(&chain).join("inc-000002.delta")).unwrap();
    let out = arg(d.path(), "out.img");
    for (i, state) in states.iter().enumerate().take(2) {
        let _ = std::fs::remove_file(&out);
        ok(&["restore", "-q", "--at", &i.to_string(), &chain, &out]);
        assert!(read(out.as_ref()) == *state, "point {i}");
    }
    for args in [
        vec!["restore", "-q", &chain, &out],
        vec!["restore", "-q", "--at", "3", &chain, &out],
        vec!["backup", "-q", &src, &chain],
        vec!["list", &chain],
        vec!["prune", "-q", "--keep", "1", &chain],
    ] {
        let err = fails_with(&args, 9, &["inc-000002.delta", "missing", "Points 0 to 1"]);
        assert!(err.contains("move"), "the error says how to recover: {err}");
    }
    // Following the advice: move the later increments aside, and backups continue from point 1.
    let aside = d.path().join("aside");
    std::fs::create_dir(&aside).unwrap();
    for n in [3, 4] {
        let name = format!("inc-00000{n}.delta");
        std::fs::rename(Path::new(&chain).join(&name), aside.join(&name)).unwrap();
    }
    ok(&["backup", "-q", &src, &chain]);
    let _ = std::fs::remove_file(&out);
    ok(&["restore", "-q", &chain, &out]);
    assert!(read(out.as_ref()) == states[4]);
}

#[test]
fn a_foreign_increment_is_named_and_the_points_before_it_stay_restorable() {
    let d = tempfile::tempdir().unwrap();
    let (_, chain, states) = chain(&d, 3);
    // An increment of another chain, dropped in under the next number.
    let other = tempfile::tempdir().unwrap();
    let (_, other_chain, _) = self::chain(&other, 2);
    std::fs::copy(Path::new(&other_chain).join("inc-000001.delta"), Path::new(&chain).join("inc-000003.delta"))
        .unwrap();
    let out = arg(d.path(), "out.img");
    fails_with(&["restore", "-q", &chain, &out], 9, &["inc-000003.delta", "another chain"]);
    ok(&["restore", "-q", "--at", "2", &chain, &out]);
    assert!(read(out.as_ref()) == states[2]);
}

#[test]
fn an_increment_that_is_its_own_parent_is_a_corrupt_chain_not_a_hang() {
    let d = tempfile::tempdir().unwrap();
    let (src, chain, _) = chain(&d, 2);
    // A copy of increment 1 as increment 2: the same id twice.
    std::fs::copy(Path::new(&chain).join("inc-000001.delta"), Path::new(&chain).join("inc-000002.delta")).unwrap();
    let out = arg(d.path(), "out.img");
    for args in [
        vec!["list", &chain],
        vec!["restore", "-q", &chain, &out],
        vec!["backup", "-q", &src, &chain],
        vec!["prune", "-q", "--keep", "0", &chain],
    ] {
        fails_with(&args, 9, &["two files", "id"]);
    }
}

#[test]
fn a_vanished_base_is_an_error_not_a_second_base() {
    let d = tempfile::tempdir().unwrap();
    let (src, chain, _) = chain(&d, 3);
    std::fs::remove_file(base_image(&chain)).unwrap();
    fails_with(&["backup", "-q", &src, &chain], 9, &["base", "missing", "inc-000001.delta"]);
    let bases = std::fs::read_dir(&chain)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".img"))
        .count();
    assert_eq!(bases, 0, "no new base was written");
}

#[test]
fn a_damaged_increment_makes_the_next_backup_fail_loudly() {
    let d = tempfile::tempdir().unwrap();
    let (src, chain, _) = chain(&d, 3);
    let inc = Path::new(&chain).join("inc-000001.delta");
    let mut bytes = read(&inc);
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    write_file(&inc, &bytes);
    fails_with(&["backup", "-q", &src, &chain], 9, &["inc-000001.delta"]);
    assert!(!Path::new(&chain).join("inc-000003.delta").exists());
}

#[test]
fn history_files_are_readable_by_their_owner_only() {
    let d = tempfile::tempdir().unwrap();
    let (src, chain, _) = chain(&d, 2);
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(chain.as_ref()), 0o700, "the chain directory");
    for e in std::fs::read_dir(&chain).unwrap().flatten() {
        if e.file_name() != ".lock" {
            assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
        }
    }
    let (old, undo, delta) = (arg(d.path(), "old.img"), arg(d.path(), "undo.delta"), arg(d.path(), "p.delta"));
    write_file(old.as_ref(), &random_bytes(4 * MIB, 99));
    ok(&["sync", "-q", &src, &old, "--undo", &undo]);
    assert_eq!(mode(undo.as_ref()), 0o600, "an undo log holds the mirror's old content");
    write_file(old.as_ref(), &random_bytes(4 * MIB, 98));
    ok(&["diff", "-q", &src, &old, "-o", &delta]);
    assert_eq!(mode(delta.as_ref()), 0o600, "a delta holds the changed blocks");
}

#[test]
fn backing_up_a_different_image_into_a_chain_is_refused_unless_forced() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, chain) = (arg(d.path(), "a.img"), arg(d.path(), "b.img"), arg(d.path(), "chain"));
    for img in [&a, &b] {
        sparse_file(img.as_ref(), 16 * MIB as u64, &[]);
        mkfs_ext4(img.as_ref());
    }
    ok(&["backup", "-q", &a, &chain]);
    // Another filesystem (another UUID), same size.
    fails_with(&["backup", "-q", &b, &chain], 10, &["UUID", "--force"]);
    // Another path and another size.
    let c = arg(d.path(), "c.img");
    write_file(c.as_ref(), &random_bytes(3 * MIB, 4));
    fails_with(&["backup", "-q", &c, &chain], 10, &["c.img", "bytes"]);
    assert_eq!(run(&["list", "--json", &chain]).json()["points"].as_array().unwrap().len(), 1);
    // The same image, grown, is still the same image.
    std::fs::OpenOptions::new().write(true).open(&a).unwrap().set_len(20 * MIB as u64).unwrap();
    ok(&["backup", "-q", &a, &chain]);
    ok(&["backup", "-q", "--force", &b, &chain]);
    let out = arg(d.path(), "out.img");
    ok(&["restore", "-q", &chain, &out]);
    assert_same(out.as_ref(), b.as_ref());
}

/// `--undo FILE` and `-o FILE` replaced an existing file that was not a delta (a 32 MiB disk
/// image became a 57 KB delta).
#[test]
fn an_output_never_replaces_a_file_that_is_not_a_delta() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, image) = (arg(d.path(), "a.img"), arg(d.path(), "b.img"), arg(d.path(), "precious.img"));
    write_file(a.as_ref(), &random_bytes(MIB, 20));
    write_file(b.as_ref(), &random_bytes(MIB, 21));
    let precious = random_bytes(2 * MIB, 22);
    write_file(image.as_ref(), &precious);
    fails_with(&["diff", "-q", &a, &b, "-o", &image], 2, &["not a blksync delta"]);
    fails_with(&["sync", "-q", &a, &b, "--undo", &image], 2, &["not a blksync delta"]);
    assert!(read(image.as_ref()) == precious && read(b.as_ref()) == random_bytes(MIB, 21));
    // An earlier delta is replaced, as a nightly job expects; --force lets --undo replace anything.
    let delta = arg(d.path(), "p.delta");
    ok(&["diff", "-q", &a, &b, "-o", &delta]);
    ok(&["diff", "-q", &a, &b, "-o", &delta]);
    ok(&["sync", "-q", "--force", &a, &b, "--undo", &image]);
    ok(&["info", &image]);
}

/// A prune needed room for a complete second base: on a disk that holds the chain with some
/// room to spare, it failed with ENOSPC, exactly when users prune. It folds in place now.
#[test]
fn prune_needs_room_for_the_increments_not_for_a_second_base() {
    if !can_use_loop_devices() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let mount = Mount::new(&d.path().join("small"), &["-t", "tmpfs", "-o", "size=40m", "tmpfs"]);
    let chain = mount.dir.join("chain");
    let chain = chain.to_str().unwrap();
    let src = arg(d.path(), "src.img");
    let mut data = random_bytes(24 * MIB, 23);
    let mut states = Vec::new();
    for i in 0..3 {
        data[i * 2 * MIB..i * 2 * MIB + MIB].copy_from_slice(&random_bytes(MIB, 24 + i as u64));
        write_file(src.as_ref(), &data);
        ok(&["backup", "-q", &src, chain]);
        states.push(data.clone());
    }
    // 24 MiB base + 3 MiB of increments on 40 MiB: a second base does not fit.
    ok(&["prune", "-q", "--keep", "1", chain]);
    ok(&["list", "--verify", chain]);
    let out = arg(d.path(), "out.img");
    for n in [1, 2] {
        let _ = std::fs::remove_file(&out);
        ok(&["restore", "-q", "--at", &n.to_string(), chain, &out]);
        assert!(read(out.as_ref()) == states[n], "point {n}");
    }
}

/// An interrupted first backup said its base's temporary file was "in sync … run it again",
/// but had removed it.
#[test]
fn an_interrupted_first_backup_says_nothing_was_kept() {
    let d = tempfile::tempdir().unwrap();
    let (src, chain) = (arg(d.path(), "src.img"), arg(d.path(), "chain"));
    write_file(src.as_ref(), &random_bytes(32 * MIB, 25));
    let child = blksync()
        .args(["backup", "-q", "--bwlimit", "4M", &src, &chain])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the base is being written (its temporary file exists).
    let start = std::time::Instant::now();
    while !Path::new(&chain).exists() || temporary_files(chain.as_ref()).is_empty() {
        assert!(start.elapsed() < std::time::Duration::from_secs(60));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.code(), 130, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("no backup was made"), "{}", out.stderr_text());
    assert!(!out.stderr_text().contains("run it again to finish"), "{}", out.stderr_text());
    assert!(temporary_files(chain.as_ref()).is_empty());
}

/// A failed `apply` left behind the target file it had created (here: its disk fills up).
#[test]
fn a_failed_apply_removes_the_target_it_created() {
    if !can_use_loop_devices() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (empty, new, delta) = (arg(d.path(), "empty.img"), arg(d.path(), "new.img"), arg(d.path(), "p.delta"));
    write_file(empty.as_ref(), &[]);
    write_file(new.as_ref(), &random_bytes(4 * MIB, 26));
    ok(&["diff", "-q", &new, &empty, "-o", &delta]);
    let mount = Mount::new(&d.path().join("small"), &["-t", "tmpfs", "-o", "size=1m", "tmpfs"]);
    let target = mount.dir.join("made.img");
    let o = run(&["apply", "-q", &delta, target.to_str().unwrap()]);
    assert_eq!(o.code(), 4, "{}", o.stderr_text());
    assert!(!target.exists(), "the created target was removed");
}
