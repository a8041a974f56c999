//! `nbd://` and `nbd+unix://` endpoints through the binary, against real servers (qemu-nbd,
//! nbdkit) started by tests/lab/nbd: sync into a qcow2 image and back, compare, an export on the
//! far side of ssh, and the addresses that are refused. The client itself is tested in
//! crates/blksync-nbd.

mod support;

use std::path::Path;
use std::process::Command;

use support::*;

const MIB: usize = 1 << 20;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// README's example: a raw image synced into a qcow2 image that qemu-nbd serves, then only the
/// change on the next run; the qcow2 file converted back is the image.
#[test]
fn an_image_syncs_into_a_qcow2_through_qemu_nbd_and_back() {
    if !have_nbd_tool("qemu-nbd") || !have_nbd_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let mut data = random_bytes(16 * MIB, 1);
    data[4 * MIB..8 * MIB].fill(0);
    write_file(&image, &data);
    let qcow2 = dir.path().join("vm.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", qcow2.to_str().unwrap(), "16M"]);
    let server = NbdServer::start(dir.path(), &["--tcp", "--file", qcow2.to_str().unwrap(), "--format", "qcow2"]);
    assert!(server.uri.starts_with("nbd://127.0.0.1:"), "{}", server.uri);

    let j = ok(&["sync", "--json", "--verify", image.to_str().unwrap(), &server.uri]).json();
    assert_eq!(j["verified"], true);
    assert_eq!(j["bytes_written"], 12 * MIB as u64, "zeros are not written as data: {j}");
    assert_eq!(j["destination"], server.uri.as_str());
    assert_eq!(run(&["compare", image.to_str().unwrap(), &server.uri]).code(), 0);

    patch(&image, 9 * MIB as u64, b"changed");
    let j = ok(&["sync", "--json", image.to_str().unwrap(), &server.uri]).json();
    assert_eq!(j["bytes_written"], 4096, "only the changed block: {j}");
    // The export as a source, into a new file.
    let back = dir.path().join("back.img");
    ok(&["sync", &server.uri, back.to_str().unwrap()]);
    assert_same(&image, &back);
    server.stop();
    let raw = dir.path().join("converted.img");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", qcow2.to_str().unwrap(), raw.to_str().unwrap()]);
    assert_same(&image, &raw);
}

/// `HOST:nbd+unix:///EXPORT?socket=PATH`: the export is reached by the agent on that host.
#[test]
fn an_export_behind_ssh_is_opened_by_the_agent_there() {
    if !have_nbd_tool("nbdkit") {
        return;
    }
    let Some(remote) = RemoteDir::new("blksync-nbd-") else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = NbdServer::start(dir.path(), &["--nbdkit", "memory size=8M"]);
    assert!(server.uri.starts_with("nbd+unix:///"), "{}", server.uri);
    let image = Path::new(&remote.path("a.img")).to_path_buf();
    write_file(&image, &random_bytes(8 * MIB, 2));
    let there = format!("root@127.0.0.1:{}", server.uri);
    let j = ok(&["sync", "--json", "-e", &remote.rsh, image.to_str().unwrap(), &there]).json();
    assert_eq!(j["bytes_written"], 8 * MIB as u64, "{j}");
    let back = dir.path().join("back.img");
    ok(&["sync", "-e", &remote.rsh, &there, back.to_str().unwrap()]);
    assert_same(&image, &back);
}

#[test]
fn refused_nbd_addresses_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("a.img");
    write_file(&image, &random_bytes(MIB, 3));
    let out = run(&["sync", image.to_str().unwrap(), "nbds://127.0.0.1/x"]);
    assert_eq!(out.code(), 2, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("ssh tunnel"), "{}", out.stderr_text());
    let out = run(&["sync", image.to_str().unwrap(), "nbd+unix:///x"]);
    assert_eq!(out.code(), 2, "a unix address needs its socket: {}", out.stderr_text());
    let out = run(&["sync", image.to_str().unwrap(), "nbd://127.0.0.1:1/x"]);
    assert_eq!(out.code(), 8, "nothing listens there: {}", out.stderr_text());
    assert!(out.stderr_text().contains("nbd://127.0.0.1:1/x"), "{}", out.stderr_text());
}

/// qemu's changed-block tracking: after a full backup, a dirty bitmap records what the VM writes;
/// `--bitmap` then reads only those blocks of the export, for the next point and for a sync onto
/// the old copy, and both end equal to the image.
#[test]
fn a_dirty_bitmap_limits_a_backup_and_a_sync_to_the_changed_blocks() {
    if !have_nbd_tool("qemu-nbd") || !have_nbd_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    write_file(&image, &random_bytes(16 * MIB, 7));
    let qcow2 = dir.path().join("vm.qcow2");
    let q = qcow2.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", q, "16M"]);
    let serve = |args: &[&str]| {
        let mut all = vec!["--tcp", "--file", q, "--format", "qcow2"];
        all.extend_from_slice(args);
        NbdServer::start(dir.path(), &all)
    };
    {
        let vm = serve(&[]);
        ok(&["sync", image.to_str().unwrap(), &vm.uri]);
    }
    let chain = arg(dir.path(), "chain");
    let old_copy = dir.path().join("copy.img");
    {
        let vm = serve(&["--readonly"]);
        ok(&["backup", &vm.uri, &chain]);
        ok(&["sync", &vm.uri, old_copy.to_str().unwrap()]);
    }
    // The mark: from here the bitmap records every write.
    qemu_img(&["bitmap", "--add", q, "b0"]);
    patch(&image, 5 * MIB as u64, &random_bytes(MIB, 8));
    {
        let vm = serve(&[]);
        ok(&["sync", image.to_str().unwrap(), &vm.uri]);
    }
    let vm = serve(&["--bitmap", "b0"]);
    let j = ok(&["backup", "--json", "--bitmap", "b0", &vm.uri, &chain]).json();
    let read = j["bytes_read_source"].as_u64().unwrap();
    assert!(read <= 2 * MIB as u64, "only the changed chunk is read: {j}");
    assert_eq!(j["bytes_written"], MIB as u64, "{j}");
    let restored = dir.path().join("restored.img");
    ok(&["restore", &chain, restored.to_str().unwrap()]);
    assert_same(&image, &restored);

    let j = ok(&["sync", "--json", "--bitmap", "b0", &vm.uri, old_copy.to_str().unwrap()]).json();
    assert!(j["bytes_read_source"].as_u64().unwrap() <= 2 * MIB as u64, "{j}");
    assert_same(&image, &old_copy);

    let out = run(&["sync", "--bitmap", "b0", image.to_str().unwrap(), old_copy.to_str().unwrap()]);
    assert_eq!(out.code(), 2, "a bitmap needs an NBD source: {}", out.stderr_text());

    // The export behind ssh: its host's agent reads only the changed chunks, and the hash pass
    // takes the rest as equal.
    let Some(remote) = RemoteDir::new("blksync-bitmap-") else { return };
    let older = dir.path().join("older.img");
    std::fs::copy(&restored, &older).unwrap();
    patch(&older, 5 * MIB as u64, &random_bytes(MIB, 9));
    let there = format!("root@127.0.0.1:{}", vm.uri);
    let j = ok(&["sync", "--json", "--bitmap", "b0", "-e", &remote.rsh, &there, older.to_str().unwrap()]).json();
    assert!(j["bytes_read_source"].as_u64().unwrap() <= 2 * MIB as u64, "{j}");
    assert_same(&image, &older);
    let j = ok(&["sync", "--json", "--verify", "--bitmap", "b0", "-e", &remote.rsh, &there, older.to_str().unwrap()])
        .json();
    assert_eq!(j["verified"], true, "a verification compares everything: {j}");
}
