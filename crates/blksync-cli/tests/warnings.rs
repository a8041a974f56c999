//! Warnings a sysadmin wants (issue 13, item 11): one clear line each on stderr, silenced by
//! `-q`, and the run goes on. A source mounted read-write, a disk-image format read as raw
//! bytes, and a source file that changed while it was read.

mod support;

use std::os::unix::fs::FileExt;
use std::process::Stdio;

use support::*;

fn warning_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.starts_with("blksync: warning:")).collect()
}

#[test]
fn a_source_mounted_read_write_is_warned_about_and_quiet_silences_it() {
    if !can_use_loop_devices() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("fs.img");
    sparse_file(&image, 32 << 20, &[]);
    mkfs_ext4(&image);
    let dev = Loop::attach(&image);
    let copy = arg(dir.path(), "copy.img");
    {
        let _mount = Mount::new(&dir.path().join("mnt"), &[dev.path()]);
        let out = ok(&["sync", dev.path(), &copy]);
        let lines = warning_lines(&out.stderr_text()).join("\n");
        assert!(lines.contains(&format!("{} is mounted read-write at", dev.path())), "{lines}");
        assert!(lines.contains("lvm+snapshot://"), "the warning says what to do instead: {lines}");
        assert_eq!(warning_lines(&out.stderr_text()).len(), 1, "one line: {lines}");
        let quiet = ok(&["sync", "-q", dev.path(), &copy]);
        assert_eq!(quiet.stderr_text(), "", "-q silences warnings");
    }
    let _mount = Mount::new(&dir.path().join("mnt"), &["-o", "ro", dev.path()]);
    let out = ok(&["sync", dev.path(), &copy]);
    assert!(warning_lines(&out.stderr_text()).is_empty(), "a read-only mount is fine: {}", out.stderr_text());
}

#[test]
fn a_disk_image_format_synced_as_raw_bytes_is_warned_about_here_and_across_ssh() {
    let dir = tempfile::tempdir().unwrap();
    let qcow2 = dir.path().join("vm.qcow2");
    let mut data = b"QFI\xfb\0\0\0\x03".to_vec();
    data.resize(1 << 20, 7);
    write_file(&qcow2, &data);
    let raw = dir.path().join("raw.img");
    write_file(&raw, &random_bytes(1 << 20, 5));
    let out = ok(&["sync", qcow2.to_str().unwrap(), &arg(dir.path(), "copy.img")]);
    let lines = warning_lines(&out.stderr_text()).join("\n");
    assert!(lines.contains("starts with a qcow2 header") && lines.contains("nbd://"), "{lines}");
    let out = ok(&["sync", raw.to_str().unwrap(), &arg(dir.path(), "copy2.img")]);
    assert!(warning_lines(&out.stderr_text()).is_empty(), "{}", out.stderr_text());

    // The remote source's peer says it too, before anything is read.
    let Some(remote) = RemoteDir::new("blksync-warn-") else { return };
    write_file(std::path::Path::new(&remote.path("vm.qcow2")), &data);
    let out = ok(&["sync", "-e", &remote.rsh, &remote.remote("vm.qcow2"), &arg(dir.path(), "pulled.img")]);
    let lines = warning_lines(&out.stderr_text()).join("\n");
    assert!(lines.contains("starts with a qcow2 header"), "{lines}");
}

#[test]
fn a_source_file_that_changes_while_it_is_read_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("live.img");
    write_file(&src, &random_bytes(32 << 20, 9));
    let dst = dir.path().join("copy.img");
    // 4 MiB/s: the run lasts seconds, and the source is written once the copy has begun.
    let mut child = blksync()
        .args(["sync", "--bwlimit", "4M", src.to_str().unwrap(), dst.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(&mut child, "the first write to the copy", || dst.exists() && allocated(&dst) > 0);
    std::fs::OpenOptions::new().write(true).open(&src).unwrap().write_all_at(b"new", 30 << 20).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr_text());
    let lines = warning_lines(&out.stderr_text()).join("\n");
    assert!(lines.contains("changed while it was read (its modification time moved)"), "{lines}");
    assert!(lines.contains("(--verify compares the copy)"), "sync names its flag: {lines}");
}
