//! `backup --dry-run` and `diff --dry-run` (issue 13, item 12): what the next point or the delta
//! would record and how large it would be at most, with nothing written, here and across ssh.

mod support;

use std::path::Path;

use support::*;

const MIB: usize = 1 << 20;

/// The files in `dir`, but the lock files that readers create and leave.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with("lock"))
        .collect();
    names.sort();
    names
}

#[test]
fn backup_dry_run_estimates_the_next_point_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = arg(dir.path(), "vm.img");
    let chain = arg(dir.path(), "chain");
    write_file(Path::new(&src), &random_bytes(8 * MIB, 1));

    let j = ok(&["backup", "-n", "--json", &src, &chain]).json();
    assert_eq!((j["dry_run"].as_bool(), j["new_chain"].as_bool()), (Some(true), Some(true)), "{j}");
    assert_eq!(j["bytes_written"], 8 * MIB as u64);
    assert!(!Path::new(&chain).exists(), "a dry run creates nothing");

    ok(&["backup", &src, &chain]);
    patch(Path::new(&src), 2 * MIB as u64, &random_bytes(MIB, 2));
    let before = names(Path::new(&chain));
    let out = ok(&["backup", "--dry-run", "--json", &src, &chain]);
    let j = out.json();
    assert_eq!(j["new_chain"], false);
    assert_eq!(j["bytes_written"], MIB as u64, "{j}");
    let estimate = j["estimated_file_size"].as_u64().unwrap();
    assert!(estimate >= MIB as u64 && estimate < MIB as u64 + 64 * 1024, "{j}");
    assert_eq!(names(Path::new(&chain)), before, "a dry run writes nothing");
    let human = ok(&["backup", "-n", &src, &chain]).stderr_text();
    assert!(human.contains("would record 1.0 MiB of data") && human.contains("dry run"), "{human}");

    ok(&["backup", &src, &chain]);
    let increment = Path::new(&chain).join("inc-000001.delta");
    assert!(std::fs::metadata(&increment).unwrap().len() <= estimate, "the estimate is an upper bound");

    // Across ssh: the comparison runs by hashes, and no image data crosses.
    let Some(remote) = RemoteDir::new("blksync-dry-") else { return };
    let there = remote.path("vm.img");
    std::fs::copy(&src, &there).unwrap();
    patch(Path::new(&there), 5 * MIB as u64, &random_bytes(MIB / 2, 3));
    let j = ok(&["backup", "-n", "--json", "-e", &remote.rsh, &remote.remote("vm.img"), &chain]).json();
    assert_eq!(j["bytes_written"], (MIB / 2) as u64, "{j}");
    let wire = j["bytes_sent"].as_u64().unwrap() + j["bytes_received"].as_u64().unwrap();
    assert!(wire < 64 * 1024, "no data crosses: {wire} bytes");
    let j = ok(&["backup", "-n", "--json", "-e", &remote.rsh, &src, &remote.remote("new-chain")]).json();
    assert_eq!((j["new_chain"].as_bool(), j["bytes_written"].as_u64()), (Some(true), Some(8 * MIB as u64)), "{j}");
    assert!(!Path::new(&remote.path("new-chain")).exists());
}

#[test]
fn diff_dry_run_estimates_the_delta_and_takes_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (arg(dir.path(), "old.img"), arg(dir.path(), "new.img"));
    write_file(Path::new(&old), &random_bytes(4 * MIB, 4));
    std::fs::copy(&old, &new).unwrap();
    patch(Path::new(&new), MIB as u64, &random_bytes(MIB / 2, 5));
    let j = ok(&["diff", "-n", "--json", &new, &old]).json();
    assert_eq!(j["bytes_written"], (MIB / 2) as u64, "{j}");
    assert_eq!(names(dir.path()), ["new.img", "old.img"], "nothing written");
    let estimate = j["estimated_file_size"].as_u64().unwrap();
    let patch_file = arg(dir.path(), "p.delta");
    ok(&["diff", &new, &old, "-o", &patch_file]);
    assert!(std::fs::metadata(&patch_file).unwrap().len() <= estimate);
    assert_eq!(run(&["diff", &new, &old]).code(), 2, "a real diff needs -o");
    assert_eq!(run(&["diff", "-n", "-o", &patch_file, &new, &old]).code(), 2, "a dry run writes no -o");

    let Some(remote) = RemoteDir::new("blksync-dry-diff-") else { return };
    std::fs::copy(&old, remote.path("old.img")).unwrap();
    let j = ok(&["diff", "-n", "--json", "-e", &remote.rsh, &new, &remote.remote("old.img")]).json();
    assert_eq!(j["bytes_written"], (MIB / 2) as u64, "{j}");
}
