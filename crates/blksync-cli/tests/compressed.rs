//! Compressed images (docs/COMPRESSED-IMAGE.md) through the binary: `sync --compress` creates
//! one, a later sync updates it in place, and every command reads it as the disk it holds, on
//! either side of ssh.

mod support;

use std::path::Path;

use support::*;

const MIB: usize = 1 << 20;

/// 8 MiB with holes, random and compressible stretches.
fn disk(seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; 8 * MIB];
    data[MIB..3 * MIB].copy_from_slice(&random_bytes(2 * MIB, seed));
    let text: Vec<u8> = b"blksync keeps copies of disks. ".iter().copied().cycle().take(3 * MIB).collect();
    data[4 * MIB..7 * MIB].copy_from_slice(&text);
    data
}

fn is_image(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.starts_with(b"BLKSYNCZ"))
}

fn sync(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["sync", "--json", "--progress=none"];
    all.extend_from_slice(args);
    ok(&all).json()
}

#[test]
fn a_compressed_copy_is_created_updated_in_place_and_read_as_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (src, img, raw) = (dir.path().join("src"), dir.path().join("img.bsz"), dir.path().join("raw"));
    let mut data = disk(1);
    write_file(&src, &data);
    let (s, i, r) = (src.to_str().unwrap(), img.to_str().unwrap(), raw.to_str().unwrap());

    sync(&["--verify", "--compress", s, i]);
    assert!(is_image(&img), "DST is a compressed image");
    assert!(allocated(&img) < 4 * MIB as u64, "compressed and sparse: {} bytes", allocated(&img));
    assert_eq!(run(&["compare", "-q", s, i]).code(), 0, "compare says identical");

    // A later sync, without --compress, recognises the image and rewrites only what changed.
    for k in 0..8 {
        patch(&src, (k * MIB + 4096 * 7) as u64, &random_bytes(4096, 10 + k as u64));
        data[k * MIB + 4096 * 7..k * MIB + 4096 * 8].copy_from_slice(&random_bytes(4096, 10 + k as u64));
    }
    let before = allocated(&img);
    let j = sync(&["--verify", s, i]);
    assert_eq!(j["bytes_written"], 8 * 4096, "{j}");
    assert!(is_image(&img));
    assert!(allocated(&img) < before + 3 * MIB as u64, "{} -> {} bytes", before, allocated(&img));

    // Decompressed by a sync to a raw file, holes kept.
    sync(&[i, r]);
    assert!(read(&raw) == data);
    assert!(allocated(&raw) < 7 * MIB as u64, "holes of the image stay holes: {}", allocated(&raw));

    // A backup of the image, and its restore.
    let chain = dir.path().join("chain");
    ok(&["backup", "-q", i, chain.to_str().unwrap()]);
    let restored = dir.path().join("restored");
    ok(&["restore", "-q", chain.to_str().unwrap(), restored.to_str().unwrap()]);
    assert!(read(&restored) == data);
}

#[test]
fn compress_refuses_an_existing_raw_destination_and_bad_levels() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    write_file(&src, &disk(2));
    write_file(&dst, &disk(3));
    let before = read(&dst);
    let out = run(&["sync", "--compress=5", src.to_str().unwrap(), dst.to_str().unwrap()]);
    assert_eq!(out.code(), 2, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("not a compressed image"), "{}", out.stderr_text());
    assert!(read(&dst) == before, "nothing written");
    let out = run(&["sync", "--compress=42", src.to_str().unwrap(), dir.path().join("new").to_str().unwrap()]);
    assert_eq!(out.code(), 2, "{}", out.stderr_text());
    assert!(!dir.path().join("new").exists());
    // The old word forms still name the wire's compression, and make a raw copy.
    let plain = dir.path().join("plain");
    ok(&["sync", "-q", "--compress=off", src.to_str().unwrap(), plain.to_str().unwrap()]);
    assert!(!is_image(&plain) && read(&plain) == read(&src));
    // A level without `=` is not taken for the old wire level: too many arguments.
    let out = run(&["sync", "--compress", "19", src.to_str().unwrap(), plain.to_str().unwrap()]);
    assert_eq!(out.code(), 2, "{}", out.stderr_text());
}

#[test]
fn a_corrupt_image_is_an_error_naming_the_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (src, img) = (dir.path().join("src"), dir.path().join("img.bsz"));
    write_file(&src, &disk(4));
    sync(&["--compress", src.to_str().unwrap(), img.to_str().unwrap()]);
    // Damage the middle of the data area (chunk payloads start after the two header slots).
    let len = std::fs::metadata(&img).unwrap().len();
    let mut bytes = read(&img);
    let at = (8192 + (len as usize - 8192) / 3) & !4095;
    for b in &mut bytes[at..at + 512] {
        *b ^= 0x5a;
    }
    write_file(&img, &bytes);
    let out = run(&["sync", "--progress=none", img.to_str().unwrap(), dir.path().join("out").to_str().unwrap()]);
    assert_ne!(out.code(), 0, "a corrupt image is not read silently");
    let err = out.stderr_text();
    assert!(err.contains("img.bsz") && err.contains("offset"), "{err}");
}

#[test]
fn compressed_images_work_on_either_side_of_ssh() {
    let Some(env) = RemoteDir::new("blksync-compressed") else { return };
    let src = env.path("src");
    let data = disk(5);
    write_file(src.as_ref(), &data);
    let remote_img = env.remote("img.bsz");
    let e = ["-e", env.rsh.as_str()];
    let push = [&e[..], &["--compress", &src, &remote_img]].concat();
    sync(&push);
    assert!(is_image(Path::new(&env.path("img.bsz"))));
    // Updated in place over ssh, and pulled back as raw bytes.
    patch(src.as_ref(), 5 * MIB as u64, &random_bytes(4096, 6));
    let j = sync(&[&e[..], &[&src, &remote_img]].concat());
    assert_eq!(j["bytes_written"], 4096, "{j}");
    assert!(is_image(Path::new(&env.path("img.bsz"))));
    let back = env.path("back");
    sync(&[&e[..], &[&remote_img, &back]].concat());
    assert_same(src.as_ref(), back.as_ref());
}

/// The base image of the chain in `dir`.
fn base_of(dir: &Path) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().unwrap().to_string_lossy().starts_with("base-") && p.extension().is_some_and(|x| x == "img")
        })
        .expect("a base image")
}

#[test]
fn backup_compress_keeps_a_compressed_base_that_restore_prune_and_serve_read() {
    let dir = tempfile::tempdir().unwrap();
    let (src, chain) = (dir.path().join("src"), dir.path().join("chain"));
    let (s, c) = (src.to_str().unwrap(), chain.to_str().unwrap());
    let mut states = vec![disk(7)];
    write_file(&src, &states[0]);
    ok(&["backup", "-q", "--compress", s, c]);
    assert!(is_image(&base_of(&chain)), "the base is a compressed image");
    assert!(allocated(&base_of(&chain)) < 4 * MIB as u64, "{}", allocated(&base_of(&chain)));
    for k in 1..4u64 {
        let mut next = states.last().unwrap().clone();
        let at = (k as usize) * MIB + 12_288;
        next[at..at + 8192].copy_from_slice(&random_bytes(8192, 30 + k));
        write_file(&src, &next);
        ok(&["backup", "-q", s, c]);
        states.push(next);
    }
    let restored = dir.path().join("restored");
    let r = restored.to_str().unwrap();
    for (n, state) in states.iter().enumerate() {
        let _ = std::fs::remove_file(&restored);
        ok(&["restore", "-q", "--at", &n.to_string(), c, r]);
        assert!(read(&restored) == *state, "point {n}");
    }
    // A prune folds two increments into the compressed base, in place.
    ok(&["prune", "-q", "--keep", "1", c]);
    assert!(is_image(&base_of(&chain)), "still compressed after the fold");
    ok(&["list", "--verify", c]);
    for n in [2, 3] {
        let _ = std::fs::remove_file(&restored);
        ok(&["restore", "-q", "--at", &n.to_string(), c, r]);
        assert!(read(&restored) == states[n], "point {n} after the prune");
    }
    // Served over NBD, read through the compressed base, and compared by blksync as a client.
    let socket = dir.path().join("nbd.sock");
    let (server, uri) = start_serve(&["--at", "2", "--socket", socket.to_str().unwrap(), c]);
    write_file(&restored, &states[2]);
    assert_eq!(run(&["compare", "-q", r, &uri]).code(), 0, "the served point is point 2");
    let _ = std::process::Command::new("kill").args(["-INT", &server.id().to_string()]).status();
    let out = server.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn backup_compress_works_on_a_remote_chain() {
    let Some(env) = RemoteDir::new("blksync-compressed-chain") else { return };
    let src = env.path("src");
    let data = disk(8);
    write_file(src.as_ref(), &data);
    let chain = env.remote("chain");
    let e = ["-e", env.rsh.as_str()];
    ok(&[&["backup", "-q"], &e[..], &["--compress", &src, &chain]].concat());
    assert!(is_image(&base_of(Path::new(&env.path("chain")))), "the remote base is compressed");
    let back = env.path("back");
    ok(&[&["restore", "-q"], &e[..], &[&chain, &back]].concat());
    assert_same(src.as_ref(), back.as_ref());
}
