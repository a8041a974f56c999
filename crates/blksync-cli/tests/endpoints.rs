//! Endpoints named by address: `loop://FILE`, `loop://DEVICE`, and the schemes this build does
//! not implement. Loop devices are real (root and /dev/loop-control needed).

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const MIB: usize = 1 << 20;

/// The loop devices attached to `file` (`losetup -j`).
fn attached_to(file: &Path) -> Vec<String> {
    let out = Command::new("losetup").arg("-j").arg(file).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split(':').next()).map(str::to_string).collect()
}

/// Polls until `file` has a loop device (the run is using it), for a minute at most.
fn wait_attached(file: &Path) {
    let start = Instant::now();
    while attached_to(file).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(60), "{} was never attached", file.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn loop_addresses_work_as_source_and_target_and_detach_after() {
    if !can_use_loop_devices() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (img, out, created) = (d.path().join("img"), d.path().join("out"), d.path().join("created.img"));
    let mut data = random_bytes(8 * MIB, 1);
    data[2 * MIB..3 * MIB].fill(0);
    write_file(&img, &data);
    let source = format!("loop://{}", img.display());
    ok(&["sync", "-q", &source, out.to_str().unwrap()]);
    assert!(read(&out) == data);
    assert!(attached_to(&img).is_empty(), "the source's loop device was detached");
    // A missing image as a target is created with the source's size.
    let target = format!("loop://{}", created.display());
    let j = ok(&["sync", "--json", "-q", img.to_str().unwrap(), &target]).json();
    assert_eq!(j["destination"], target, "results name the address the user wrote: {j}");
    assert!(read(&created) == data);
    assert!(attached_to(&created).is_empty());
    // loop://DEVICE is the device itself, left attached.
    let dev = Loop::attach(&created);
    write_file(&img, &random_bytes(8 * MIB, 2));
    ok(&["sync", "-q", img.to_str().unwrap(), &format!("loop://{}", dev.path())]);
    assert_same(&img, &dev.dev);
    assert_eq!(attached_to(&created), vec![dev.path().to_string()]);
}

#[test]
fn a_loop_device_is_detached_after_ctrl_c_and_after_a_kill_by_the_next_run() {
    if !can_use_loop_devices() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (src, img) = (d.path().join("src"), d.path().join("img"));
    write_file(&src, &random_bytes(32 * MIB, 3));
    write_file(&img, &random_bytes(32 * MIB, 4));
    let target = format!("loop://{}", img.display());
    for signal in ["-INT", "-KILL"] {
        let child = blksync()
            .args(["sync", "-q", "--bwlimit", "4M", src.to_str().unwrap(), &target])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_attached(&img);
        Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
        let out = child.wait_with_output().unwrap();
        if signal == "-INT" {
            assert_eq!(out.code(), 130, "{}", out.stderr_text());
            assert!(attached_to(&img).is_empty(), "Ctrl-C detached the loop device");
        } else {
            assert_eq!(attached_to(&img).len(), 1, "SIGKILL cannot detach");
        }
    }
    // The next run recognises the leftover as its own (by its record) and detaches it.
    ok(&["sync", "-q", src.to_str().unwrap(), &target]);
    assert!(attached_to(&img).is_empty(), "the killed run's loop device was detached");
    assert_same(&src, &img);
}

#[test]
fn unknown_or_unimplemented_schemes_are_clear_usage_errors() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let o = run(&["sync", "-q", "foo://x", out.to_str().unwrap()]);
    assert_eq!(o.code(), 2, "{}", o.stderr_text());
    assert!(o.stderr_text().contains("loop://") && o.stderr_text().contains("foo://"), "{}", o.stderr_text());
    let o = run(&["sync", "-q", "nbds://host/x", out.to_str().unwrap()]);
    assert_eq!(o.code(), 2, "{}", o.stderr_text());
    assert!(o.stderr_text().contains("TLS"), "{}", o.stderr_text());
    assert!(!out.exists());
}
