//! `blksync serve`: a backup point, read through its chain, exported over NBD to real clients
//! (nbdinfo, nbdcopy, qemu-img, blksync itself); a writable file; a clean stop on SIGINT and
//! SIGTERM; and what is refused. The server itself is tested in crates/blksync-nbd.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use support::*;

const MIB: usize = 1 << 20;

/// Starts `blksync serve ARGS…` and returns it with the address it printed, once it listens.
fn start(args: &[&str]) -> (Child, String) {
    start_serve(args)
}

/// Sends `signal` and returns the exit code and stderr.
fn stop(child: Child, signal: &str) -> (i32, String) {
    let status = Command::new("kill").args(["-s", signal, &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn tool(args: &[&str]) -> std::process::Output {
    Command::new(args[0]).args(&args[1..]).output().unwrap()
}

#[test]
fn a_backup_point_is_served_to_real_clients_without_restoring_it() {
    if !have_nbd_tool("nbdinfo") || !have_nbd_tool("nbdcopy") || !have_nbd_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vm.img");
    let mut data = random_bytes(8 * MIB, 1);
    data[2 * MIB..4 * MIB].fill(0);
    write_file(&image, &data);
    let chain = arg(dir.path(), "chain");
    ok(&["backup", image.to_str().unwrap(), &chain]);
    patch(&image, MIB as u64, &random_bytes(MIB, 2));
    ok(&["backup", image.to_str().unwrap(), &chain]);
    let point0 = dir.path().join("point0.img");
    ok(&["restore", "--at", "0", &chain, point0.to_str().unwrap()]);

    let socket = dir.path().join("nbd.sock");
    let (child, uri) = start(&["--at", "0", "--socket", socket.to_str().unwrap(), &chain]);
    assert!(uri.starts_with("nbd+unix:///") && uri.contains("socket="), "{uri}");
    let info = tool(&["nbdinfo", "--json", &uri]);
    assert!(info.status.success(), "{}", String::from_utf8_lossy(&info.stderr));
    let json: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(json["exports"][0]["export-size"], 8 * MIB as u64, "{json}");
    assert_eq!(json["exports"][0]["is_read_only"], true, "{json}");
    let copied = dir.path().join("copied.img");
    let out = tool(&["nbdcopy", &uri, copied.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_same(&point0, &copied);
    let out = tool(&["qemu-img", "compare", "-f", "raw", "-F", "raw", point0.to_str().unwrap(), &uri]);
    assert!(out.status.success(), "qemu-img compare: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(run(&["compare", point0.to_str().unwrap(), &uri]).code(), 0, "blksync reads it as any source");
    let (code, err) = stop(child, "INT");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("stopped serving"), "{err}");
}

/// The "instant restore": an ext4 backup point served over NBD, put on a block device by
/// nbdfuse and a loop device, mounted read-only, and a file read from it, without restoring.
#[test]
fn an_ext4_point_is_mounted_through_nbdfuse_and_a_file_read_from_it() {
    if !have_nbd_tool("nbdfuse") || !can_use_loop_devices() || !Path::new("/dev/fuse").exists() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(content.join("etc")).unwrap();
    let secret = random_bytes(300_000, 11);
    write_file(&content.join("etc/config"), &secret);
    let image = dir.path().join("fs.img");
    write_file(&image, &vec![0; 32 * MIB]);
    let out = Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(&content).arg(&image).output().unwrap();
    assert!(out.status.success(), "mkfs.ext4 -d: {}", String::from_utf8_lossy(&out.stderr));
    let chain = arg(dir.path(), "chain");
    ok(&["backup", "-q", image.to_str().unwrap(), &chain]);
    // A later point differs; point 0 is the one mounted.
    write_file(&image, &vec![0; 32 * MIB]);
    ok(&["backup", "-q", image.to_str().unwrap(), &chain]);

    let socket = dir.path().join("nbd.sock");
    let (server, uri) = start(&["--at", "0", "--socket", socket.to_str().unwrap(), &chain]);
    let fuse = dir.path().join("fuse");
    std::fs::create_dir_all(&fuse).unwrap();
    let disk = fuse.join("disk");
    let mut nbdfuse = Command::new("nbdfuse").arg(&disk).arg(&uri).stderr(Stdio::piped()).spawn().unwrap();
    wait_until(&mut nbdfuse, "nbdfuse shows the disk", || disk.exists());
    {
        let device = Loop::attach(&disk);
        let mounted = Mount::new(&dir.path().join("mnt"), &["-o", "ro,noload", device.path()]);
        let read_back = std::fs::read(mounted.dir.join("etc/config")).unwrap();
        assert!(read_back == secret, "the file read through the served point is the one backed up");
    }
    let _ = Command::new("umount").arg(&fuse).status();
    let _ = nbdfuse.kill();
    let _ = nbdfuse.wait();
    let (code, err) = stop(server, "INT");
    assert_eq!(code, 0, "{err}");
}

/// A compressed image is served as the disk it holds, its zero chunks as holes, to real clients.
#[test]
fn a_compressed_image_is_served_as_the_disk_it_holds() {
    if !have_nbd_tool("nbdinfo") || !have_nbd_tool("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let mut data = random_bytes(6 * MIB, 7);
    data[MIB..4 * MIB].fill(0);
    write_file(&raw, &data);
    let img = dir.path().join("disk.bsz");
    ok(&["sync", "-q", "--compress", raw.to_str().unwrap(), img.to_str().unwrap()]);
    let socket = dir.path().join("nbd.sock");
    let (child, uri) = start(&["--socket", socket.to_str().unwrap(), img.to_str().unwrap()]);
    let map = tool(&["nbdinfo", "--map", &uri]);
    assert!(map.status.success(), "{}", String::from_utf8_lossy(&map.stderr));
    let map = String::from_utf8_lossy(&map.stdout);
    assert!(map.lines().any(|l| l.contains("hole") && l.trim_start().starts_with(&MIB.to_string())), "{map}");
    let copied = dir.path().join("copied.raw");
    let out = tool(&["nbdcopy", &uri, copied.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_same(&raw, &copied);
    let (code, err) = stop(child, "TERM");
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_writable_file_takes_a_sync_and_sigterm_stops_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    write_file(&file, &vec![0; 4 * MIB]);
    let new = dir.path().join("new.img");
    write_file(&new, &random_bytes(4 * MIB, 3));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let (child, uri) = start(&["--writable", "--listen", &listen, file.to_str().unwrap()]);
    assert_eq!(uri, format!("nbd://127.0.0.1:{port}/"));
    let j = ok(&["sync", "--json", new.to_str().unwrap(), &uri]).json();
    assert_eq!(j["bytes_written"], 4 * MIB as u64, "{j}");
    let (code, err) = stop(child, "TERM");
    assert_eq!(code, 0, "{err}");
    assert_same(&new, &file);
}

/// `--writable` on a point: clients write to an overlay, the chain's files and hashes stay as
/// they were, and `--save-overlay` keeps the writes as a delta that `apply` lays on a restore.
#[test]
fn a_writable_point_keeps_writes_in_an_overlay_and_can_save_them() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vm.img");
    let data = random_bytes(4 * MIB, 21);
    write_file(&image, &data);
    let chain = arg(dir.path(), "chain");
    ok(&["backup", "-q", image.to_str().unwrap(), &chain]);
    let files = |dir: &str| {
        let mut all: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_file() && !e.file_name().to_string_lossy().ends_with("lock"))
            .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
            .collect();
        all.sort();
        all
    };
    let before = files(&chain);

    // What a client writes: another image, through blksync itself as the NBD client.
    let mut new = data.clone();
    new[MIB..MIB + 8192].copy_from_slice(&random_bytes(8192, 22));
    new[3 * MIB..4 * MIB].fill(0);
    let new_path = dir.path().join("new.img");
    write_file(&new_path, &new);
    let saved = dir.path().join("writes.delta");
    let socket = dir.path().join("nbd.sock");
    let args = ["--writable", "--save-overlay", saved.to_str().unwrap(), "--socket", socket.to_str().unwrap(), &chain];
    let (child, uri) = start(&args);
    let j = ok(&["sync", "--json", "--verify", new_path.to_str().unwrap(), &uri]).json();
    assert_eq!(j["bytes_written"].as_u64().unwrap() + j["bytes_zeroed"].as_u64().unwrap(), 8192 + MIB as u64, "{j}");
    assert_eq!(run(&["compare", new_path.to_str().unwrap(), &uri]).code(), 0, "reads see the writes");
    let (code, err) = stop(child, "INT");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("saved in"), "{err}");

    let after = files(&chain);
    let names = |f: &[(String, Vec<u8>)]| f.iter().map(|(n, d)| format!("{n}:{}", d.len())).collect::<Vec<_>>();
    assert!(after == before, "the chain's files are untouched: {:?} -> {:?}", names(&before), names(&after));
    ok(&["list", "--verify", &chain]);
    let restored = dir.path().join("restored.img");
    ok(&["restore", "-q", &chain, restored.to_str().unwrap()]);
    assert!(read(&restored) == data, "the point is what it was");
    ok(&["apply", "-q", saved.to_str().unwrap(), restored.to_str().unwrap()]);
    assert!(read(&restored) == new, "the saved overlay turns the point into what the client wrote");

    // Without --save-overlay, the writes are gone with the server.
    let (child, uri) = start(&["--writable", "--socket", socket.to_str().unwrap(), &chain]);
    ok(&["sync", "-q", new_path.to_str().unwrap(), &uri]);
    let (code, err) = stop(child, "TERM");
    assert_eq!(code, 0, "{err}");
    assert!(files(&chain) == before);
    let out = run(&["serve", "--save-overlay", saved.to_str().unwrap(), image.to_str().unwrap()]);
    assert_eq!(out.code(), 2, "--save-overlay needs --writable: {}", out.stderr_text());
}

#[test]
fn what_serve_refuses_it_says_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vm.img");
    write_file(&image, &random_bytes(MIB, 4));
    let chain = arg(dir.path(), "chain");
    ok(&["backup", image.to_str().unwrap(), &chain]);
    let socket = arg(dir.path(), "s.sock");
    // The overlay saved over something that is not a file it may replace.
    let out =
        run(&["serve", "--writable", "--save-overlay", dir.path().to_str().unwrap(), "--socket", &socket, &chain]);
    assert_eq!(out.code(), 2, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("not a regular file"), "{}", out.stderr_text());
    let out = run(&["serve", "--at", "0", "--socket", &socket, image.to_str().unwrap()]);
    assert_eq!(out.code(), 2, "--at needs a chain: {}", out.stderr_text());
    let out = run(&["serve", "--socket", &socket, "root@127.0.0.1:/x.img"]);
    assert_eq!(out.code(), 2, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("ssh root@127.0.0.1 blksync serve"), "{}", out.stderr_text());
    let out = run(&["serve", "--listen", "203.0.113.1:10809", image.to_str().unwrap()]);
    assert_ne!(out.code(), 0, "an address this host does not have cannot be bound");
    assert!(!Path::new(&socket).exists(), "nothing was left listening");
}
