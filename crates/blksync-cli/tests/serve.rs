//! `blksync serve`: a backup point, read through its chain, exported over NBD to real clients
//! (nbdinfo, nbdcopy, qemu-img, blksync itself); a writable file; a clean stop on SIGINT and
//! SIGTERM; and what is refused. The server itself is tested in crates/blksync-nbd.

mod support;

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use support::*;

const MIB: usize = 1 << 20;

/// Starts `blksync serve ARGS…` and returns it with the address it printed, once it listens.
fn start(args: &[&str]) -> (Child, String) {
    let mut child = blksync().arg("serve").args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert!(!line.is_empty(), "serve printed no address");
    (child, line.trim().to_string())
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

#[test]
fn what_serve_refuses_it_says_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vm.img");
    write_file(&image, &random_bytes(MIB, 4));
    let chain = arg(dir.path(), "chain");
    ok(&["backup", image.to_str().unwrap(), &chain]);
    let socket = arg(dir.path(), "s.sock");
    let out = run(&["serve", "--writable", "--socket", &socket, &chain]);
    assert_eq!(out.code(), 2, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("read-only"), "{}", out.stderr_text());
    let out = run(&["serve", "--at", "0", "--socket", &socket, image.to_str().unwrap()]);
    assert_eq!(out.code(), 2, "--at needs a chain: {}", out.stderr_text());
    let out = run(&["serve", "--socket", &socket, "root@127.0.0.1:/x.img"]);
    assert_eq!(out.code(), 2, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("ssh root@127.0.0.1 blksync serve"), "{}", out.stderr_text());
    let out = run(&["serve", "--listen", "203.0.113.1:10809", image.to_str().unwrap()]);
    assert_ne!(out.code(), 0, "an address this host does not have cannot be bound");
    assert!(!Path::new(&socket).exists(), "nothing was left listening");
}
