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
