//! Delta files: diff, apply, info, and the failures older tools got wrong.

mod support;

use support::*;
use tempfile::TempDir;

const MIB: usize = 1 << 20;

fn tmp() -> TempDir {
    tempfile::Builder::new().prefix("blksync-history").tempdir().unwrap()
}

#[test]
fn diff_then_apply_reproduces_the_new_image() {
    let d = tmp();
    let (base, new, target, patch) =
        (arg(d.path(), "base"), arg(d.path(), "new"), arg(d.path(), "t"), arg(d.path(), "p"));
    let old = random_bytes(5 * MIB + 100, 1);
    write_file(base.as_ref(), &old);
    let mut data = old.clone();
    data[10..20].fill(9); // a change
    data[MIB..2 * MIB].fill(0); // zeros
    let last = data.len() - 1;
    data[last] ^= 1; // a changed partial last block
    data.extend_from_slice(&random_bytes(MIB + 7, 2)); // growth
    write_file(new.as_ref(), &data);
    let j = ok(&["diff", "--json", "-q", &new, &base, "-o", &patch]).json();
    assert_eq!(j["bytes_zeroed"], MIB as u64);
    assert_eq!(j["header"]["size_before"], old.len() as u64);
    std::fs::copy(&base, &target).unwrap();
    ok(&["apply", "-q", &patch, &target]);
    assert_same(new.as_ref(), target.as_ref());
    // Shrinking works too.
    ok(&["diff", "-q", &base, &new, "-o", &patch]);
    ok(&["apply", "-q", &patch, &target]);
    assert_same(base.as_ref(), target.as_ref());
}

#[test]
fn a_chain_applies_in_order_and_matches_applying_each() {
    let d = tmp();
    let v: Vec<String> = (0..3).map(|i| arg(d.path(), &format!("v{i}"))).collect();
    let mut data = random_bytes(3 * MIB, 3);
    write_file(v[0].as_ref(), &data);
    data[5000..9000].fill(1);
    write_file(v[1].as_ref(), &data);
    data[2 * MIB..2 * MIB + 100].fill(2);
    data.truncate(2 * MIB + 5000);
    write_file(v[2].as_ref(), &data);
    let (a, b) = (arg(d.path(), "a"), arg(d.path(), "b"));
    ok(&["diff", "-q", &v[1], &v[0], "-o", &a]);
    ok(&["diff", "-q", &v[2], &v[1], "-o", &b]);
    let (one, two) = (arg(d.path(), "one"), arg(d.path(), "two"));
    std::fs::copy(&v[0], &one).unwrap();
    std::fs::copy(&v[0], &two).unwrap();
    ok(&["apply", "-q", &a, &b, &one]);
    ok(&["apply", "-q", &a, &two]);
    ok(&["apply", "-q", &b, &two]);
    assert_same(v[2].as_ref(), one.as_ref());
    assert_same(v[2].as_ref(), two.as_ref());
    // Out of order: refused before anything is written.
    std::fs::copy(&v[0], &one).unwrap();
    let out = run(&["apply", &b, &a, &one]);
    assert_eq!(out.code(), 10, "{}", out.stderr_text());
    assert_same(v[0].as_ref(), one.as_ref());
}

#[test]
fn corrupt_truncated_and_foreign_deltas_leave_the_target_untouched() {
    let d = tmp();
    let (base, new, patch, target) =
        (arg(d.path(), "base"), arg(d.path(), "new"), arg(d.path(), "p"), arg(d.path(), "t"));
    let old = random_bytes(2 * MIB, 4);
    write_file(base.as_ref(), &old);
    let mut data = old.clone();
    data[100..200].fill(5);
    data[MIB + 3..MIB + 9].fill(6);
    write_file(new.as_ref(), &data);
    ok(&["diff", "-q", &new, &base, "-o", &patch]);
    let good = read(patch.as_ref());
    // A flipped byte in the middle, and a truncation (a copy cut short).
    for (name, bytes) in [
        ("flipped", {
            let mut b = good.clone();
            b[good.len() / 2] ^= 1;
            b
        }),
        ("truncated", good[..good.len() - 30].to_vec()),
    ] {
        let bad = arg(d.path(), name);
        write_file(bad.as_ref(), &bytes);
        std::fs::copy(&base, &target).unwrap();
        let out = run(&["apply", &bad, &target]);
        assert_eq!(out.code(), 9, "{name}: {}", out.stderr_text());
        assert!(out.stderr_text().contains(&bad), "{}", out.stderr_text());
        assert_eq!(read(target.as_ref()), old, "{name}: target untouched");
        assert_eq!(run(&["info", &bad]).code(), 9);
    }
    // A delta made against other content, with the same size.
    let other = arg(d.path(), "other");
    write_file(other.as_ref(), &random_bytes(2 * MIB, 5));
    let out = run(&["apply", &patch, &other]);
    assert_eq!(out.code(), 10, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("not what the delta was made against"), "{}", out.stderr_text());
    assert!(read(other.as_ref()) != data);
    // Not a delta at all.
    assert_eq!(run(&["apply", &base, &target]).code(), 9);
    assert_eq!(run(&["apply", &arg(d.path(), "missing"), &target]).code(), 3);
}

#[test]
fn diff_of_identical_images_is_small_and_harmless() {
    let d = tmp();
    let (a, patch, target) = (arg(d.path(), "a"), arg(d.path(), "p"), arg(d.path(), "t"));
    write_file(a.as_ref(), &random_bytes(MIB, 6));
    ok(&["diff", "-q", &a, &a, "-o", &patch]);
    assert!(std::fs::metadata(&patch).unwrap().len() < 400);
    let j = ok(&["info", "--json", &patch]).json();
    assert_eq!(j["records"], 0);
    std::fs::copy(&a, &target).unwrap();
    ok(&["apply", "-q", &patch, &target]);
    assert_same(a.as_ref(), target.as_ref());
}

#[test]
fn info_describes_a_delta() {
    let d = tmp();
    let (a, b, patch) = (arg(d.path(), "a"), arg(d.path(), "b"), arg(d.path(), "p"));
    write_file(a.as_ref(), &random_bytes(MIB, 7));
    write_file(b.as_ref(), &random_bytes(MIB, 8));
    ok(&["diff", "-q", "--comment", "before upgrade", &a, &b, "-o", &patch]);
    let text = ok(&["info", &patch]).stdout_text();
    assert!(text.contains("before upgrade") && text.contains("valid") && text.contains("1048576 -> 1048576"), "{text}");
    let j = ok(&["info", "--json", &patch]).json();
    for key in ["file_size", "records", "data_bytes", "zero_bytes"] {
        assert!(j.get(key).is_some(), "{key}: {j}");
    }
    for key in
        ["id", "parent", "created", "utc_offset", "size_before", "size_after", "comment", "source", "tool_version"]
    {
        assert!(j["header"].get(key).is_some(), "{key}: {j}");
    }
    assert_eq!(j["data_bytes"], MIB as u64);
}

/// Applies a random change to `data`: overwrite, zero, or (sometimes) resize.
fn mutate(data: &mut Vec<u8>, seed: u64) {
    let r = random_bytes(32, seed);
    let pick = |i: usize| u64::from_le_bytes(r[i * 8..i * 8 + 8].try_into().unwrap());
    let len = data.len().max(1);
    match pick(0) % 6 {
        0 => {
            let size = (pick(1) % (4 * MIB as u64)) as usize + 1;
            data.resize(size, 0);
            let at = size - 1;
            data[at] = 0x5A; // a changed partial last block
        }
        1 => {
            let at = (pick(1) as usize) % len;
            let n = ((pick(2) as usize) % (300 * 1024)).min(data.len() - at);
            data[at..at + n].fill(0);
        }
        _ => {
            for k in 0..4 {
                let at = (pick(1).rotate_left(k * 16) as usize) % len;
                let n = (((pick(2) >> (k * 8)) as usize) % 20_000 + 1).min(data.len() - at);
                data[at..at + n].copy_from_slice(&random_bytes(n, seed * 10 + u64::from(k)));
            }
        }
    }
}

#[test]
fn a_chain_of_32_increments_restores_every_point_and_survives_pruning() {
    let d = tmp();
    let (src, dest) = (arg(d.path(), "src"), arg(d.path(), "backups"));
    let mut data = random_bytes(3 * MIB + 333, 100);
    let mut history = Vec::new();
    for i in 0..33u64 {
        if i > 0 {
            mutate(&mut data, 100 + i);
        }
        write_file(src.as_ref(), &data);
        ok(&["backup", "-q", "--comment", &format!("point {i}"), &src, &dest]);
        history.push(data.clone());
    }
    let points = ok(&["list", "--json", &dest]).json()["points"].clone();
    assert_eq!(points.as_array().unwrap().len(), 33);
    assert_eq!(points[7]["comment"], "point 7");
    let out = arg(d.path(), "restored");
    for (i, expected) in history.iter().enumerate() {
        ok(&["restore", "-q", "--at", &i.to_string(), &dest, &out]);
        assert!(read(out.as_ref()) == *expected, "point {i} restored wrong");
    }
    ok(&["prune", "-q", "--keep", "10", &dest]);
    let points = ok(&["list", "--json", &dest]).json()["points"].clone();
    assert_eq!(points.as_array().unwrap().len(), 11, "the base and 10 increments");
    assert_eq!(points[0]["number"], 22);
    for (i, expected) in history.iter().enumerate().skip(22) {
        ok(&["restore", "-q", "--at", &i.to_string(), &dest, &out]);
        assert!(read(out.as_ref()) == *expected, "point {i} restored wrong after pruning");
    }
    assert_eq!(run(&["restore", "--at", "5", &dest, &out]).code(), 2);
    // Backups go on after a prune, and the newest restores to stdout too.
    mutate(&mut data, 999);
    write_file(src.as_ref(), &data);
    ok(&["backup", "-q", &src, &dest]);
    let streamed = support::blksync().args(["restore", &dest, "-"]).output().unwrap();
    assert!(streamed.stdout == data);
}

#[test]
fn an_unchanged_backup_is_a_tiny_harmless_increment() {
    let d = tmp();
    let (src, dest) = (arg(d.path(), "src"), arg(d.path(), "b"));
    write_file(src.as_ref(), &random_bytes(4 * MIB, 7));
    ok(&["backup", "-q", &src, &dest]);
    let j = ok(&["backup", "-q", "--json", &src, &dest]).json();
    assert_eq!(j["number"], 1);
    assert_eq!(j["bytes_written"], 0);
    let points = ok(&["list", "--json", &dest]).json()["points"].clone();
    assert!(points[1]["file_size"].as_u64().unwrap() < 400);
    assert_eq!(points[1]["bytes_changed"], 0);
}

#[test]
fn a_backup_killed_mid_run_leaves_a_chain_that_backs_up_and_restores() {
    let d = tmp();
    let (src, dest, out) = (arg(d.path(), "src"), arg(d.path(), "b"), arg(d.path(), "r"));
    let mut data = random_bytes(8 * MIB, 8);
    write_file(src.as_ref(), &data);
    ok(&["backup", "-q", &src, &dest]);
    data[MIB..5 * MIB].copy_from_slice(&random_bytes(4 * MIB, 9));
    write_file(src.as_ref(), &data);
    // Killed while writing an increment, then while writing the very first base elsewhere.
    for target in [dest.clone(), arg(d.path(), "fresh")] {
        let mut child = support::blksync()
            .args(["backup", "-q", "--bwlimit", "2M", &src, &target])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Killed once the point's temporary file exists: mid-write.
        wait_until(&mut child, "the new point's temporary file", || {
            std::path::Path::new(&target).is_dir() && !temporary_files(target.as_ref()).is_empty()
        });
        child.kill().unwrap();
        child.wait().unwrap();
    }
    assert_eq!(
        ok(&["list", "--json", &dest]).json()["points"].as_array().unwrap().len(),
        1,
        "no half increment in the chain"
    );
    // Two runs at once: the second is refused while the first holds the chain.
    let mut first = support::blksync()
        .args(["backup", "-q", "--bwlimit", "2M", &src, &dest])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It holds the chain's lock once it writes its increment (its own temporary file, not one
    // the killed runs above left).
    let own = format!(".tmp-{}-", first.id());
    wait_until(&mut first, "the first backup's temporary file", || {
        temporary_files(dest.as_ref()).iter().any(|n| n.contains(&own))
    });
    let second = run(&["backup", "-q", &src, &dest]);
    assert_eq!(second.code(), 6, "{}", second.stderr_text());
    assert!(second.stderr_text().contains("in use by another blksync"), "{}", second.stderr_text());
    first.kill().unwrap();
    first.wait().unwrap();
    ok(&["backup", "-q", &src, &dest]);
    ok(&["restore", "-q", &dest, &out]);
    assert!(read(out.as_ref()) == data);
    assert!(temporary_files(dest.as_ref()).is_empty(), "leftovers are cleaned up");
    assert_eq!(run(&["list", &arg(d.path(), "fresh")]).code(), 3, "a killed first backup is no backup");
    ok(&["backup", "-q", &src, &arg(d.path(), "fresh")]);
}

#[test]
fn a_truncated_increment_is_a_clear_error() {
    let d = tmp();
    let (src, dest, out) = (arg(d.path(), "src"), arg(d.path(), "b"), arg(d.path(), "r"));
    let mut data = random_bytes(2 * MIB, 10);
    write_file(src.as_ref(), &data);
    ok(&["backup", "-q", &src, &dest]);
    data[..100_000].copy_from_slice(&random_bytes(100_000, 11));
    write_file(src.as_ref(), &data);
    ok(&["backup", "-q", &src, &dest]);
    let inc = d.path().join("b/inc-000001.delta");
    let bytes = read(&inc);
    write_file(&inc, &bytes[..bytes.len() / 2]);
    for args in [vec!["restore", "-q", &dest, &out], vec!["list", &dest], vec!["backup", "-q", &src, &dest]] {
        let out = run(&args);
        assert_eq!(out.code(), 9, "{args:?}: {}", out.stderr_text());
        assert!(out.stderr_text().contains("inc-000001.delta"), "{}", out.stderr_text());
    }
    assert!(!std::path::Path::new(&out).exists(), "nothing restored from a damaged chain");
}

#[test]
fn restore_at_a_time_picks_the_newest_point_before_it() {
    let d = tmp();
    let (src, dest, out) = (arg(d.path(), "src"), arg(d.path(), "b"), arg(d.path(), "r"));
    let first = random_bytes(MIB, 12);
    write_file(src.as_ref(), &first);
    ok(&["backup", "-q", &src, &dest]);
    write_file(src.as_ref(), &random_bytes(MIB, 13));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    ok(&["backup", "-q", &src, &dest]);
    let created = ok(&["list", "--json", &dest]).json()["points"][0]["created"].as_i64().unwrap();
    ok(&["restore", "-q", "--at", &format!("@{created}"), &dest, &out]);
    assert!(read(out.as_ref()) == first);
    assert_eq!(run(&["restore", "--at", "1999-01-01", &dest, &out]).code(), 2);
    assert_eq!(run(&["restore", "--at", "not a time", &dest, &out]).code(), 2);
}

#[test]
fn an_undo_log_rolls_a_mirror_back_byte_for_byte() {
    let d = tmp();
    let (src, mirror, undo) = (arg(d.path(), "src"), arg(d.path(), "mirror"), arg(d.path(), "undo"));
    // Bigger mirror (a tail to restore), zeros in the source, changes everywhere.
    let old = random_bytes(5 * MIB + 17, 14);
    write_file(mirror.as_ref(), &old);
    let mut new = old[..3 * MIB].to_vec();
    new[..MIB].fill(0);
    new[2 * MIB..2 * MIB + 5000].copy_from_slice(&random_bytes(5000, 15));
    write_file(src.as_ref(), &new);
    let j = ok(&["sync", "--json", "-q", "--undo", &undo, &src, &mirror]).json();
    assert_eq!(j["undo_log"], undo.as_str());
    assert_same(src.as_ref(), mirror.as_ref());
    ok(&["apply", "-q", &undo, &mirror]);
    assert!(read(mirror.as_ref()) == old, "rolled back byte for byte");
    // The log checks what it is applied to: a second roll-back is refused.
    assert_eq!(run(&["apply", &undo, &mirror]).code(), 10);
    assert_eq!(run(&["sync", "-n", "--undo", &undo, &src, &mirror]).code(), 2);
}

#[test]
fn applying_a_merge_equals_applying_its_parts() {
    let d = tmp();
    let mut data = random_bytes(4 * MIB, 20);
    let mut versions = vec![data.clone()];
    for seed in 21..27 {
        mutate(&mut data, seed);
        versions.push(data.clone());
    }
    let paths: Vec<String> = (0..versions.len()).map(|i| arg(d.path(), &format!("v{i}"))).collect();
    for (p, v) in paths.iter().zip(&versions) {
        write_file(p.as_ref(), v);
    }
    let deltas: Vec<String> = (1..versions.len()).map(|i| arg(d.path(), &format!("d{i}"))).collect();
    for i in 1..versions.len() {
        ok(&["diff", "-q", &paths[i], &paths[i - 1], "-o", &deltas[i - 1]]);
    }
    let merged = arg(d.path(), "merged");
    let mut args = vec!["merge", "-o", &merged];
    args.extend(deltas.iter().map(String::as_str));
    ok(&args);
    let (one, two) = (arg(d.path(), "one"), arg(d.path(), "two"));
    std::fs::copy(&paths[0], &one).unwrap();
    std::fs::copy(&paths[0], &two).unwrap();
    ok(&["apply", "-q", &merged, &one]);
    let mut chain = vec!["apply", "-q"];
    chain.extend(deltas.iter().map(String::as_str));
    chain.push(&two);
    ok(&chain);
    assert!(read(one.as_ref()) == *versions.last().unwrap());
    assert!(read(two.as_ref()) == *versions.last().unwrap());
    // The merge still checks its target: applied again to its own result, it is refused.
    let out = run(&["apply", &merged, &one]);
    assert_eq!(out.code(), 10, "{}", out.stderr_text());
    // Linked deltas (backup increments) merged out of order are refused; patches from `diff`
    // carry no link, and apply's content check catches a wrong order instead.
    let dest = arg(d.path(), "chain");
    for p in &paths[..3] {
        ok(&["backup", "-q", p, &dest]);
    }
    let (i1, i2) = (arg(d.path(), "chain/inc-000001.delta"), arg(d.path(), "chain/inc-000002.delta"));
    let out = run(&["merge", "-o", &merged, &i2, &i1]);
    assert_eq!(out.code(), 10, "{}", out.stderr_text());
    ok(&["merge", "-o", &merged, &i1, &i2]);
}

#[test]
fn a_delta_names_the_filesystem_it_came_from() {
    let d = tmp();
    let (img, old, patch) = (arg(d.path(), "fs.img"), arg(d.path(), "old"), arg(d.path(), "p"));
    std::fs::File::create(&img).unwrap().set_len(16 * MIB as u64).unwrap();
    let made = std::process::Command::new("mkfs.ext4").args(["-q", "-F", "-L", "vmdisk", &img]).status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("skipping: mkfs.ext4 is not available");
        return;
    }
    write_file(old.as_ref(), &vec![0u8; 16 * MIB]);
    ok(&["diff", "-q", &img, &old, "-o", &patch]);
    let identity = ok(&["info", "--json", &patch]).json()["header"]["source_identity"].as_str().unwrap().to_string();
    assert!(identity.contains("LABEL=vmdisk") && identity.contains("TYPE=ext4"), "{identity}");
}

/// `diff new old -o old` used to replace the old image with the delta (the delta is renamed into
/// place), and `-o /dev/sdX` would have replaced a device node with a file.
#[test]
fn an_output_that_would_destroy_an_input_or_a_device_is_refused() {
    let d = tmp();
    let (a, b) = (arg(d.path(), "a.img"), arg(d.path(), "b.img"));
    write_file(a.as_ref(), &random_bytes(MIB, 80));
    write_file(b.as_ref(), &random_bytes(MIB, 81));
    let link = arg(d.path(), "link-to-b");
    std::os::unix::fs::symlink(&b, &link).unwrap();
    for out in [&a, &b, &link] {
        let o = run(&["diff", "-q", &a, &b, "-o", out]);
        assert_eq!(o.code(), 2, "-o {out}: {}", o.stderr_text());
        assert!(o.stderr_text().contains("also an input"), "{}", o.stderr_text());
    }
    assert_eq!(read(a.as_ref()), random_bytes(MIB, 80));
    assert_eq!(read(b.as_ref()), random_bytes(MIB, 81));
    let o = run(&["diff", "-q", &a, &b, "-o", "/dev/null"]);
    assert_eq!(o.code(), 2, "{}", o.stderr_text());
    assert!(o.stderr_text().contains("not a regular file"), "{}", o.stderr_text());
    ok(&["diff", "-q", &a, &b, "-o", &arg(d.path(), "p.delta")]);
    assert_eq!(run(&["merge", "-q", &arg(d.path(), "p.delta"), "-o", "/dev/null"]).code(), 2);
    // An undo log over the source or the destination of its own sync.
    for undo in [&a, &b] {
        let o = run(&["sync", "-q", &a, &b, "--undo", undo]);
        assert_eq!(o.code(), 2, "--undo {undo}: {}", o.stderr_text());
    }
    assert_eq!(read(b.as_ref()), random_bytes(MIB, 81), "nothing was synced");
}

/// Restoring (or applying, or syncing) onto the chain's own base image wrote into it, and point
/// 0 then silently restored the wrong bytes.
#[test]
fn the_files_of_a_chain_are_never_written_in_place() {
    let d = tmp();
    let (src, chain) = (arg(d.path(), "src.img"), arg(d.path(), "chain"));
    let first = random_bytes(2 * MIB, 90);
    write_file(src.as_ref(), &first);
    ok(&["backup", "-q", &src, &chain]);
    patch(src.as_ref(), 100, b"second");
    ok(&["backup", "-q", &src, &chain]);
    let files: Vec<String> = std::fs::read_dir(&chain)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "img" || e == "delta"))
        .map(|p| p.to_str().unwrap().to_string())
        .collect();
    assert_eq!(files.len(), 3, "{files:?}");
    for file in &files {
        let o = run(&["restore", "-q", "--at", "1", &chain, file]);
        assert_eq!(o.code(), 2, "restore onto {file}: {}", o.stderr_text());
        assert!(o.stderr_text().contains("backup chain"), "{}", o.stderr_text());
        assert_eq!(run(&["sync", "-q", &src, file]).code(), 2, "sync onto {file}");
    }
    let inc = files.iter().find(|f| f.contains("inc-")).unwrap();
    let base = files.iter().find(|f| f.contains(".img")).unwrap();
    assert_eq!(run(&["apply", "-q", inc, base]).code(), 2);
    ok(&["restore", "-q", "--at", "0", &chain, &arg(d.path(), "r.img")]);
    assert_eq!(read(arg(d.path(), "r.img").as_ref()), first);
}

/// `list` reads headers and indexes only (a year of increments must not be read in full to be
/// listed); a damaged record is still caught before a restore writes anything, and by
/// `list --verify`.
#[test]
fn a_damaged_increment_is_listed_but_never_restored() {
    let d = tmp();
    let (src, chain) = (arg(d.path(), "src.img"), arg(d.path(), "chain"));
    let mut states = Vec::new();
    let mut data = random_bytes(2 * MIB, 100);
    for i in 0..3u8 {
        data[usize::from(i) * 300_000..usize::from(i) * 300_000 + 50_000].fill(i + 1);
        data[MIB..MIB + 40_000].copy_from_slice(&random_bytes(40_000, 101 + u64::from(i)));
        write_file(src.as_ref(), &data);
        ok(&["backup", "-q", &src, &chain]);
        states.push(data.clone());
    }
    let inc = std::path::Path::new(&chain).join("inc-000002.delta");
    let mut bytes = read(&inc);
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    write_file(&inc, &bytes);
    let listed = ok(&["list", "--json", &chain]).json()["points"].clone();
    assert_eq!(listed.as_array().unwrap().len(), 3);
    let o = run(&["list", "--verify", &chain]);
    assert_eq!(o.code(), 9, "{}", o.stderr_text());
    assert!(o.stderr_text().contains("inc-000002.delta"), "{}", o.stderr_text());
    let out = arg(d.path(), "out.img");
    let o = run(&["restore", "-q", &chain, &out]);
    assert_eq!(o.code(), 9, "{}", o.stderr_text());
    assert!(!std::path::Path::new(&out).exists(), "nothing was written");
    ok(&["restore", "-q", "--at", "1", &chain, &out]);
    assert_eq!(read(out.as_ref()), states[1]);
}

#[test]
fn restore_to_standard_output_refuses_a_terminal() {
    if std::process::Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipping: needs script(1) for a terminal");
        return;
    }
    let d = tmp();
    let (src, chain) = (arg(d.path(), "src.img"), arg(d.path(), "chain"));
    write_file(src.as_ref(), &random_bytes(MIB, 120));
    ok(&["backup", "-q", &src, &chain]);
    let blksync = env!("CARGO_BIN_EXE_blksync");
    // script(1) gives the command a terminal as standard output.
    let out = std::process::Command::new("script")
        .args(["-qec", &format!("{blksync} restore -q {chain} -"), "/dev/null"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("terminal"));
    // Redirected, it streams the image.
    assert_eq!(ok(&["restore", "-q", &chain, "-"]).stdout, read(src.as_ref()));
}
