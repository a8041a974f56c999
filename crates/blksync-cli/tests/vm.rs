//! Tests that need a real kernel with device-mapper (LVM snapshots), which the host's and CI's
//! kernels lack (issue 9, "Tests with a real kernel"). They run in a user-mode-linux VM built
//! from Debian packages by `tests/lab/vm-build` and booted by `tests/lab/vm-run`
//! (docs/TESTING.md).
//!
//! Each top-level `#[test]` runs on the host and stands for a group: it boots the VM once and
//! re-runs this very test binary inside it, filtered to one module of `#[ignore]`d tests, with
//! `BLKSYNC_IN_VM=1` set. The guest sees the workspace and the directories of this binary and of
//! `blksync` at their host paths, so `env!("CARGO_BIN_EXE_blksync")` and `tests/lab/sshd` work
//! unchanged there. The guest's exit status passes or fails the host test; on failure its whole
//! output is shown.
//!
//! A host test skips, with a message, only where the VM cannot run at all (not root, or no
//! image and no way to build one). `BLKSYNC_REQUIRE_VM=1` (set by `.ci/run`) turns that skip
//! into a failure, so CI never passes without running them.

mod support;

use std::path::Path;
use support::*;

/// Runs the tests in the VM: the host side, and the guest's side of `run_group`.
mod vm {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::OnceLock;

    /// Set in the guest, where the `#[ignore]`d group members do their work.
    const IN_VM: &str = "BLKSYNC_IN_VM";
    /// Set by CI: a VM that cannot run is a failure, not a skip.
    const REQUIRE_VM: &str = "BLKSYNC_REQUIRE_VM";
    /// Guest RAM: the guest's /tmp (where the PVs' backing files live) is a tmpfs of half of it.
    const GUEST_MEM: &str = "3072M";
    /// Generous for a group of LVM tests (each takes seconds), yet fails a hang within minutes.
    const GROUP_TIMEOUT_SECONDS: u32 = 600;

    /// True inside the VM.
    pub fn in_guest() -> bool {
        std::env::var_os(IN_VM).is_some()
    }

    /// Prints how long the current test took when dropped (for docs/TESTING.md's timings).
    pub struct Elapsed(std::time::Instant);

    impl Elapsed {
        pub fn start() -> Elapsed {
            Elapsed(std::time::Instant::now())
        }
    }

    impl Drop for Elapsed {
        fn drop(&mut self) {
            let name = std::thread::current().name().unwrap_or("?").to_string();
            eprintln!("{name}: {:.1} s", self.0.elapsed().as_secs_f64());
        }
    }

    fn lab(script: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/lab").join(script)
    }

    /// Makes sure the image is built and current, once per test binary. `false` (after a
    /// message) when the VM cannot run here and that is allowed.
    fn ready() -> bool {
        static READY: OnceLock<Result<(), String>> = OnceLock::new();
        let outcome = READY.get_or_init(|| {
            // vm-build is idempotent and quick when the image is current; it rebuilds when the
            // script changed. It never installs host packages from a test run.
            let out = Command::new(lab("vm-build"))
                .arg("--no-host-install")
                .output()
                .map_err(|e| format!("cannot run tests/lab/vm-build: {e}"))?;
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            match out.status.code() {
                Some(0) => Ok(()),
                // 4: it cannot build here (not root, host packages missing).
                Some(4) => Err(stderr.trim().to_string()),
                _ => panic!("tests/lab/vm-build failed ({}):\n{stderr}", out.status),
            }
        });
        match outcome {
            Ok(()) => true,
            Err(why) if std::env::var(REQUIRE_VM).is_ok_and(|v| v == "1") => {
                panic!("{REQUIRE_VM} is set but the VM cannot run here: {why}")
            }
            Err(why) => {
                eprintln!(
                    "skipping: the VM tests need root, user-mode-linux and an image from \
                     tests/lab/vm-build ({why})"
                );
                false
            }
        }
    }

    /// Host directories the guest must see at the same paths: the workspace (for
    /// `tests/lab/sshd` and the like) and the directories of this test binary and of `blksync`
    /// (outside it with `CARGO_TARGET_DIR`), without one that lies inside another.
    fn shares() -> Vec<PathBuf> {
        let exe = std::env::current_exe().expect("the test binary's path");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut dirs: Vec<PathBuf> = [exe.as_path(), Path::new(env!("CARGO_BIN_EXE_blksync"))]
            .iter()
            .map(|p| p.parent().expect("a binary in a directory"))
            .chain([workspace.as_path()])
            .map(|p| p.canonicalize().expect("canonical path"))
            .collect();
        dirs.sort();
        dirs.dedup();
        let all = dirs.clone();
        dirs.retain(|d| !all.iter().any(|o| o != d && d.starts_with(o)));
        dirs
    }

    /// Boots the VM once and runs, inside it, the `#[ignore]`d tests whose names contain
    /// `filter` (a module path such as `in_vm_lvm::`), one at a time. Panics with the guest's
    /// output if any fails or none ran.
    pub fn run_group(filter: &str) {
        assert!(!in_guest(), "run_group runs on the host");
        if !ready() {
            return;
        }
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut cmd = Command::new(lab("vm-run"));
        cmd.args(["--time", "--mem", GUEST_MEM]).args(["--timeout", &GROUP_TIMEOUT_SECONDS.to_string()]);
        for dir in shares() {
            cmd.arg("--share").arg(format!("{}:", dir.display()));
        }
        cmd.args(["--env", &format!("{IN_VM}=1"), "--env", "LVM_SUPPRESS_FD_WARNINGS=1"])
            .args(["--env", "RUST_BACKTRACE=1", "--"])
            .arg(&exe)
            .args([filter, "--ignored", "--nocapture", "--test-threads=1"]);
        let out = cmd.output().expect("running tests/lab/vm-run");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let report = format!("--- guest stdout\n{stdout}\n--- guest stderr\n{stderr}");
        assert!(out.status.success(), "the tests in the VM failed ({}):\n{report}", out.status);
        // A filter that matched nothing would pass silently.
        let passed = stdout
            .lines()
            .find_map(|l| l.strip_prefix("test result: ok. "))
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0);
        assert!(passed > 0, "no test in the VM matched {filter:?}:\n{report}");
        // Shown with --nocapture: what ran in the guest and how long the VM took.
        println!("{report}");
    }
}

/// The body of a group member runs in the guest only (`cargo test -- --ignored` on the host
/// would otherwise run LVM commands against the host).
macro_rules! in_vm_only {
    () => {
        if !vm::in_guest() {
            eprintln!("skipping: this test runs inside the VM, through its group's host test");
            return;
        }
        let _elapsed = vm::Elapsed::start();
    };
}

#[test]
fn lvm_tests_pass_inside_the_vm() {
    vm::run_group("in_vm_lvm::");
}

/// Runs a command in the guest and returns its stdout; panics with its stderr on failure.
#[track_caller]
fn sh(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A volume group on a loop device over a sparse file in the guest's tmpfs; removed, with
/// its LVs, on drop.
struct VolumeGroup {
    name: String,
    _pv: Loop,
    _dir: tempfile::TempDir,
}

impl VolumeGroup {
    fn new(name: &str, size: u64) -> VolumeGroup {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("pv.img");
        std::fs::File::create(&backing).unwrap().set_len(size).unwrap();
        let pv = Loop::attach(&backing);
        sh("pvcreate", &["-q", pv.path()]);
        sh("vgcreate", &["-q", name, pv.path()]);
        VolumeGroup { name: name.to_string(), _pv: pv, _dir: dir }
    }

    /// Creates an LV of `size` (lvcreate's units, e.g. "64M") and returns its device path.
    fn lv(&self, lv: &str, size: &str) -> String {
        sh("lvcreate", &["-q", "-y", "-L", size, "-n", lv, &self.name]);
        format!("/dev/{}/{lv}", self.name)
    }

    /// Takes a classic (dm-snapshot) snapshot of `origin` with `cow` of copy-on-write space.
    fn snapshot(&self, origin: &str, snap: &str, cow: &str) -> String {
        sh("lvcreate", &["-q", "-y", "-s", "-L", cow, "-n", snap, &format!("{}/{origin}", self.name)]);
        format!("/dev/{}/{snap}", self.name)
    }

    /// `lvs -o lv_attr` of one LV.
    fn attr(&self, lv: &str) -> String {
        sh("lvs", &["--noheadings", "-o", "lv_attr", &format!("{}/{lv}", self.name)]).trim().to_string()
    }
}

impl Drop for VolumeGroup {
    fn drop(&mut self) {
        // Before the loop device goes: a VG left active would keep it busy.
        let _ = std::process::Command::new("vgremove")
            .args(["-q", "-y", "-ff", &self.name])
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .output();
    }
}

/// Writes `data` at `offset` of a block device and flushes it to the device (through the page
/// cache, then fdatasync: the write reaches dm-snapshot's copy-on-write before this returns).
fn write_device(dev: &str, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_data().unwrap();
}

/// Group members: they run in the guest only, through `lvm_tests_pass_inside_the_vm`.
mod in_vm_lvm {
    use super::*;
    use std::process::Stdio;

    const MIB: usize = 1 << 20;

    #[test]
    #[ignore = "runs inside the VM, through lvm_tests_pass_inside_the_vm"]
    fn sync_of_a_snapshot_copies_the_origin_as_it_was_while_the_origin_is_written() {
        in_vm_only!();
        let vg = VolumeGroup::new("snapvg", 256 << 20);
        let origin = vg.lv("origin", "64M");
        let before = random_bytes(64 * MIB, 1);
        write_device(&origin, 0, &before);
        let snap = vg.snapshot("origin", "snap", "32M");
        let work = tempfile::tempdir().unwrap();
        let copy = work.path().join("copy.img");

        // The read is slowed (16 MiB/s: about 4 s for 64 MiB) so that the writer below, which
        // writes until blksync exits, overlaps it for certain.
        let mut child = blksync()
            .args(["sync", "-q", "--json", "--bwlimit", "16M", &snap])
            .arg(&copy)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Rewrites the same 64 KiB at 32 places spread over the origin, each time with new
        // bytes, until blksync exits; counts the writes that ended while blksync was still
        // running. The places stay fixed: only a chunk's first write after the snapshot costs
        // copy-on-write space (2 MiB in all), and a full snapshot would go invalid (EIO).
        let mut during = 0;
        let mut round = 0u64;
        while child.try_wait().unwrap().is_none() {
            for i in 0..32u64 {
                write_device(&origin, i * 2 * MIB as u64, &random_bytes(65536, 100 + round));
                if child.try_wait().unwrap().is_none() {
                    during += 1;
                }
            }
            round += 1;
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.code(), 0, "blksync sync of the snapshot failed:\n{}", out.stderr_text());
        assert!(during > 0, "no write to the origin overlapped the sync");

        assert_eq!(read(&copy), before, "the copy is not the origin as it was at snapshot time");
        assert_ne!(read(Path::new(&origin)), before, "the writes did not reach the origin");
        assert_eq!(out.json()["bytes_written"], 64 * MIB, "{}", out.stdout_text());
        // The 5th character is I when the snapshot overflowed and became invalid.
        let attr = vg.attr("snap");
        assert_eq!(attr.chars().nth(4), Some('a'), "the snapshot is not active and valid: {attr}");
        eprintln!("{during} writes to the origin ({round} rounds) overlapped the sync");
    }

    #[test]
    #[ignore = "runs inside the VM, through lvm_tests_pass_inside_the_vm"]
    fn sync_over_ssh_into_a_logical_volume_makes_it_equal() {
        in_vm_only!();
        // sshd (tests/lab/sshd) on the guest's loopback: the remote agent runs in the same VM.
        let work = tempfile::tempdir().unwrap();
        let rsh = rsh(&work.path().join("cache")).expect("sshd in the guest");
        let vg = VolumeGroup::new("sshvg", 64 << 20);
        let lv = vg.lv("target", "16M");
        let img = work.path().join("disk.img");
        sparse_file(&img, 16 << 20, &[(MIB as u64, &random_bytes(4 * MIB, 6))]);

        let remote = format!("root@127.0.0.1:{lv}");
        // The guest sees this very binary at its host path: no upload (42 MB, seconds in UML).
        let agent = env!("CARGO_BIN_EXE_blksync");
        let args = ["sync", "-q", "--json", "-e", &rsh, "--remote-path", agent, "--no-upload"];
        let out = ok(&[&args[..], &[img.to_str().unwrap(), &remote]].concat());
        assert_same(&img, Path::new(&lv));
        let result = out.json();
        assert_eq!(result["bytes_written"], 4 * MIB, "{result}");
    }

    #[test]
    #[ignore = "runs inside the VM, through lvm_tests_pass_inside_the_vm"]
    fn sync_into_a_logical_volume_makes_it_equal_and_rewrites_only_changes() {
        in_vm_only!();
        let vg = VolumeGroup::new("targetvg", 128 << 20);
        let lv = vg.lv("target", "48M");
        let work = tempfile::tempdir().unwrap();
        let img = work.path().join("disk.img");
        // Data, a hole and a run of written zeros: the LV starts with whatever the PV held.
        sparse_file(&img, 48 << 20, &[(0, &random_bytes(16 * MIB, 2)), (40 << 20, &random_bytes(MIB, 3))]);
        patch(&img, 20 << 20, &vec![0; MIB]);
        write_device(&lv, 24 << 20, &random_bytes(MIB, 4));

        let out = ok(&["sync", "-q", "--json", img.to_str().unwrap(), &lv]);
        assert_same(&img, Path::new(&lv));
        let first = out.json();
        assert!(first["bytes_written"].as_u64().unwrap() >= 17 * MIB as u64, "{first}");

        patch(&img, 5 << 20, &random_bytes(8192, 5));
        let out = ok(&["sync", "-q", "--json", "--verify", img.to_str().unwrap(), &lv]);
        assert_same(&img, Path::new(&lv));
        let second = out.json();
        assert_eq!(second["bytes_written"], 8192, "{second}");
        assert_eq!(second["verified"], true, "{second}");
    }

    /// LVs of the group whose names mark them as blksync's snapshots.
    fn our_snapshots(vg: &VolumeGroup) -> Vec<String> {
        sh("lvs", &["--noheadings", "-o", "lv_name", &vg.name])
            .lines()
            .map(str::trim)
            .filter(|n| n.contains("-blksync-snap-"))
            .map(str::to_string)
            .collect()
    }

    #[test]
    #[ignore = "runs inside the VM, through lvm_tests_pass_inside_the_vm"]
    fn lvm_snapshot_address_reads_the_origin_as_it_was_and_removes_its_snapshot() {
        in_vm_only!();
        let vg = VolumeGroup::new("addrvg", 256 << 20);
        let origin = vg.lv("origin", "32M");
        let before = random_bytes(32 * MIB, 11);
        write_device(&origin, 0, &before);
        let work = tempfile::tempdir().unwrap();
        let copy = work.path().join("copy.img");
        let mut child = blksync()
            .args(["sync", "-q", "--bwlimit", "16M", "--snapshot-size", "16M", "lvm+snapshot://addrvg/origin"])
            .arg(&copy)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Write the origin while the snapshot is being read (until the run ends).
        let mut round = 0u64;
        while child.try_wait().unwrap().is_none() {
            if !our_snapshots(&vg).is_empty() {
                write_device(&origin, (round % 8) * 4 * MIB as u64, &random_bytes(65536, 200 + round));
                round += 1;
            }
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.code(), 0, "{}", out.stderr_text());
        assert!(read(&copy) == before, "the copy is the origin as it was when the snapshot was made");
        assert!(our_snapshots(&vg).is_empty(), "the snapshot was removed");
        eprintln!("{round} writes to the origin during the read");
    }

    #[test]
    #[ignore = "runs inside the VM, through lvm_tests_pass_inside_the_vm"]
    fn an_overflowing_snapshot_fails_the_backup_and_records_no_point() {
        in_vm_only!();
        let vg = VolumeGroup::new("overvg", 256 << 20);
        let origin = vg.lv("origin", "64M");
        write_device(&origin, 0, &random_bytes(64 * MIB, 12));
        let work = tempfile::tempdir().unwrap();
        let chain = work.path().join("chain");
        let chain = chain.to_str().unwrap();
        ok(&["backup", "-q", "--snapshot-size", "8M", "lvm+snapshot://overvg/origin", chain]);
        // A 4 MiB copy-on-write area, and 16 MiB written to the origin during the read.
        let child = blksync()
            .args(["backup", "-q", "--bwlimit", "8M", "--snapshot-size", "4M", "lvm+snapshot://overvg/origin", chain])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        while our_snapshots(&vg).is_empty() {
            std::thread::yield_now();
        }
        for i in 0..16 {
            write_device(&origin, i * MIB as u64 * 4, &random_bytes(MIB, 300 + i));
        }
        let out = child.wait_with_output().unwrap();
        assert_ne!(out.code(), 0, "a backup of an overflowed snapshot succeeded");
        assert!(out.stderr_text().contains("a larger --snapshot-size"), "{}", out.stderr_text());
        assert_eq!(run(&["list", "--json", chain]).json()["points"].as_array().unwrap().len(), 1, "no point recorded");
        assert!(our_snapshots(&vg).is_empty(), "the snapshot was removed");
    }

    #[test]
    #[ignore = "runs inside the VM, through lvm_tests_pass_inside_the_vm"]
    fn snapshots_go_after_an_error_and_ctrl_c_and_a_killed_runs_snapshot_goes_with_the_next_run() {
        in_vm_only!();
        let vg = VolumeGroup::new("cleanvg", 256 << 20);
        let origin = vg.lv("origin", "32M");
        write_device(&origin, 0, &random_bytes(32 * MIB, 13));
        let work = tempfile::tempdir().unwrap();
        // An error after the snapshot exists: the destination is a directory that does not exist.
        let o = run(&["sync", "-q", "lvm+snapshot://cleanvg/origin", "/nonexistent/dir/"]);
        assert_ne!(o.code(), 0);
        assert!(our_snapshots(&vg).is_empty(), "after an error");
        // Ctrl-C and SIGKILL while the snapshot is read.
        let copy = work.path().join("copy.img");
        for signal in ["-INT", "-KILL"] {
            let child = blksync()
                .args(["sync", "-q", "--bwlimit", "4M", "lvm+snapshot://cleanvg/origin"])
                .arg(&copy)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            while our_snapshots(&vg).is_empty() {
                std::thread::yield_now();
            }
            std::process::Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
            let out = child.wait_with_output().unwrap();
            if signal == "-INT" {
                assert_eq!(out.code(), 130, "{}", out.stderr_text());
                assert!(our_snapshots(&vg).is_empty(), "after Ctrl-C");
            } else {
                assert_eq!(our_snapshots(&vg).len(), 1, "SIGKILL leaves it");
            }
        }
        // A snapshot we did not make is never touched.
        vg.snapshot("origin", "mine", "8M");
        ok(&["sync", "-q", "lvm+snapshot://cleanvg/origin", copy.to_str().unwrap()]);
        assert!(our_snapshots(&vg).is_empty(), "the killed run's snapshot went with the next run");
        assert!(vg.attr("mine").starts_with('s'), "the user's own snapshot is still there");
        assert_same(&copy, Path::new(&origin));
    }

    #[test]
    #[ignore = "runs inside the VM, through lvm_tests_pass_inside_the_vm"]
    fn a_thin_volume_gets_a_thin_snapshot_and_lvm_targets_are_created() {
        in_vm_only!();
        let vg = VolumeGroup::new("thinvg", 512 << 20);
        sh("lvcreate", &["-q", "-y", "--type", "thin-pool", "-L", "128M", "-n", "pool", "thinvg"]);
        sh("lvcreate", &["-q", "-y", "-V", "64M", "-T", "thinvg/pool", "-n", "thin"]);
        let data = random_bytes(16 * MIB, 14);
        write_device("/dev/thinvg/thin", MIB as u64, &data);
        let work = tempfile::tempdir().unwrap();
        let copy = work.path().join("copy.img");
        ok(&["sync", "-q", "lvm+snapshot://thinvg/thin", copy.to_str().unwrap()]);
        assert_same(&copy, Path::new("/dev/thinvg/thin"));
        assert!(our_snapshots(&vg).is_empty());
        // lvm:// targets that do not exist are created with the source's size: linear, or thin.
        ok(&["sync", "-q", copy.to_str().unwrap(), "lvm://thinvg/made"]);
        assert_eq!(vg.attr("made").chars().next(), Some('-'), "a linear LV");
        assert_same(&copy, Path::new("/dev/thinvg/made"));
        ok(&["sync", "-q", "--thin-pool", "pool", copy.to_str().unwrap(), "lvm://thinvg/madethin"]);
        assert_eq!(vg.attr("madethin").chars().next(), Some('V'), "a thin LV");
        // Too big for the volume group: refused before anything is created.
        let big = work.path().join("big.img");
        std::fs::File::create(&big).unwrap().set_len(4 << 30).unwrap();
        let o = run(&["sync", "-q", big.to_str().unwrap(), "lvm://thinvg/toobig"]);
        assert_eq!(o.code(), 4, "{}", o.stderr_text());
        assert!(sh("lvs", &["--noheadings", "-o", "lv_name", "thinvg"]).lines().all(|l| l.trim() != "toobig"));
    }

    #[test]
    #[ignore = "runs inside the VM, through lvm_tests_pass_inside_the_vm"]
    fn lvm_snapshot_address_works_behind_ssh_as_a_backup_source() {
        in_vm_only!();
        let work = tempfile::tempdir().unwrap();
        let rsh = rsh(&work.path().join("cache")).expect("sshd in the guest");
        let vg = VolumeGroup::new("remvg", 256 << 20);
        let origin = vg.lv("vm1", "16M");
        write_device(&origin, 0, &random_bytes(16 * MIB, 15));
        let chain = work.path().join("chain");
        let agent = env!("CARGO_BIN_EXE_blksync");
        let remote = "root@127.0.0.1:lvm+snapshot://remvg/vm1";
        ok(&["backup", "-q", "-e", &rsh, "--remote-path", agent, "--no-upload", remote, chain.to_str().unwrap()]);
        let out = work.path().join("out.img");
        ok(&["restore", "-q", chain.to_str().unwrap(), out.to_str().unwrap()]);
        assert_same(&out, Path::new(&origin));
        assert!(our_snapshots(&vg).is_empty(), "the remote run removed its snapshot");
    }
}
