//! `iscsi://` endpoints through the binary (issue 12): against real tgtd started by
//! `tests/lab/iscsi`, here and through the test sshd, with bsync's own examples; credentials from
//! the environment and from a secrets file; `list-targets`; Ctrl-C, which logs out; a target
//! that stops answering (SIGSTOP), which times out. The initiator itself is tested in
//! crates/blksync-iscsi/tests.
//!
//! No test waits for time: an interrupt or a stop is sent once the session shows up in tgtd and
//! bytes have arrived, and what follows is polled for with generous deadlines.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const MIB: usize = 1 << 20;

fn have_tgtd() -> bool {
    let found = Command::new("tgtadm").arg("--help").output().is_ok_and(|o| o.status.success())
        && Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0"));
    if !found {
        assert!(
            std::env::var("BLKSYNC_REQUIRE_ISCSI").as_deref() != Ok("1"),
            "tgtd (Debian package tgt) is not installed or this is not root (BLKSYNC_REQUIRE_ISCSI=1)"
        );
        eprintln!("skipping: tgtd is not installed or this is not root");
    }
    found
}

/// A tgtd of `tests/lab/iscsi`, stopped on drop.
struct Tgtd {
    url: String,
    portal: String,
    file: PathBuf,
    lab: PathBuf,
    pid: u32,
    port: u16,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/lab/iscsi")
}

impl Tgtd {
    fn start(dir: &Path, name: &str, args: &[&str]) -> Tgtd {
        let lab = dir.join(name);
        let out = Command::new(script()).arg("start").arg("--dir").arg(&lab).args(args).output().unwrap();
        assert!(out.status.success(), "tests/lab/iscsi start {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let var = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("no {key} in {text}"))
                .trim_matches('\'')
                .to_string()
        };
        Tgtd {
            url: var("LAB_ISCSI_URL"),
            portal: var("LAB_ISCSI_PORTAL"),
            file: var("LAB_ISCSI_FILE").into(),
            lab,
            pid: var("LAB_ISCSI_PID").parse().unwrap(),
            port: var("LAB_ISCSI_PORT").parse().unwrap(),
        }
    }

    /// `tgtadm` on this instance's management channel.
    fn admin(&self, args: &[&str]) -> String {
        let out = Command::new("tgtadm")
            .args(["-C", &(self.port % 32768).to_string(), "--lld", "iscsi"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "tgtadm {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether an initiator has a session (an `I_T` nexus) with the target.
    fn has_session(&self) -> bool {
        self.admin(&["--op", "show", "--mode", "target"]).contains("I_T nexus: ")
    }

    /// Waits until no session is left: the initiator logged out (or its connection ended).
    #[track_caller]
    fn wait_until_no_session(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.has_session() {
            assert!(Instant::now() < deadline, "the session is still there a minute later");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Tgtd {
    /// Sends `signal` to tgtd (`STOP`, `CONT`).
    fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.pid.to_string()).status().unwrap();
        assert!(status.success(), "kill -{signal} tgtd");
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        // A test that failed while tgtd was stopped must not leave the lab's tgtadm hanging.
        let _ = Command::new("kill").arg("-CONT").arg(self.pid.to_string()).status();
        let _ = Command::new(script()).arg("stop").arg("--dir").arg(&self.lab).status();
    }
}

/// Sends SIGINT to `child` and returns its output.
fn interrupt(child: std::process::Child) -> std::process::Output {
    let status = Command::new("kill").arg("-INT").arg(child.id().to_string()).status().unwrap();
    assert!(status.success());
    child.wait_with_output().unwrap()
}

/// Waits for `child` to end by itself; a child still running after `limit` is killed and the
/// test fails (a hang, not a slow machine: the limit is generous).
#[track_caller]
fn wait_for(mut child: std::process::Child, limit: Duration) -> std::process::Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running after {limit:?}: {:?}", child.wait_with_output().map(|o| o.stderr_text()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// N of an interrupted sync's "the first N bytes are in sync".
#[track_caller]
fn done_prefix(stderr: &str) -> usize {
    stderr
        .split("the first ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no done prefix in: {stderr}"))
}

#[test]
fn a_file_goes_onto_a_lun_and_back_into_a_loop_image_created_for_it() {
    if !have_tgtd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lun = Tgtd::start(dir.path(), "t1", &["--size", "32M"]);
    let src = dir.path().join("system.img");
    write_file(&src, &random_bytes(32 * MIB, 1));
    let s = src.to_str().unwrap();
    ok(&["sync", "-q", s, &lun.url]);
    assert_same(&src, &lun.file);
    let cmp = ok(&["compare", s, &lun.url]);
    assert!(cmp.stdout_text().contains("identical"), "{}", cmp.stdout_text());
    // bsync's example: a LUN into loop:///srv/system.img, with no need to create the file first,
    // and bsync's address form (no LUN: the first disk LUN).
    let image = dir.path().join("copy.img");
    let bsync_form = lun.url.trim_end_matches("/1");
    ok(&["sync", "-q", bsync_form, &format!("loop://{}", image.display())]);
    assert_same(&image, &src);
    // A rerun writes nothing.
    let again = ok(&["sync", "--json", "--progress=none", s, &lun.url]).json();
    assert_eq!(again["bytes_written"], 0);
}

#[test]
fn a_lun_goes_onto_another_lun_and_a_loop_source_onto_a_lun() {
    if !have_tgtd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Tgtd::start(dir.path(), "a", &["--size", "16M"]), Tgtd::start(dir.path(), "b", &["--size", "16M"]));
    let src = dir.path().join("src.img");
    write_file(&src, &random_bytes(16 * MIB, 2));
    // bsync's example with a loop source.
    ok(&["sync", "-q", &format!("loop://{}", src.display()), &a.url]);
    assert_same(&a.file, &src);
    ok(&["sync", "-q", &a.url, &b.url]);
    assert_same(&b.file, &src);
}

#[test]
fn a_lun_smaller_than_the_source_is_refused_before_any_write() {
    if !have_tgtd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lun = Tgtd::start(dir.path(), "small", &["--size", "8M"]);
    let before = read(&lun.file);
    let src = dir.path().join("big.img");
    write_file(&src, &random_bytes(9 * MIB, 3));
    let out = run(&["sync", src.to_str().unwrap(), &lun.url]);
    assert_ne!(out.code(), 0);
    assert!(out.stderr_text().contains("too small"), "{}", out.stderr_text());
    assert_eq!(read(&lun.file), before, "a refused sync wrote");
}

#[test]
fn chap_secrets_come_from_a_file_or_the_environment_never_the_command_line() {
    if !have_tgtd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lun = Tgtd::start(dir.path(), "chap", &["--size", "8M", "--chap", "alice:s3cret-secret"]);
    let src = dir.path().join("src.img");
    write_file(&src, &random_bytes(8 * MIB, 4));
    let s = src.to_str().unwrap();
    let user_url = lun.url.replacen("iscsi://", "iscsi://alice@", 1);
    // Without the secret: a clear refusal, nothing written.
    let out = blksync().args(["sync", s, &user_url]).env_remove("LIBISCSI_CHAP_PASSWORD").output().unwrap();
    assert_ne!(out.code(), 0);
    // The wrong one, from a file.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "user=alice\npassword=not-the-secret\n").unwrap();
    let out = run(&["sync", "--iscsi-secrets", wrong.to_str().unwrap(), s, &lun.url]);
    assert_ne!(out.code(), 0);
    assert!(out.stderr_text().to_lowercase().contains("auth"), "{}", out.stderr_text());
    assert!(!out.stderr_text().contains("not-the-secret"), "the secret was printed: {}", out.stderr_text());
    // The right one from the environment, as libiscsi and qemu users know it.
    let out =
        blksync().args(["sync", "-q", s, &user_url]).env("LIBISCSI_CHAP_PASSWORD", "s3cret-secret").output().unwrap();
    assert_eq!(out.code(), 0, "{}", out.stderr_text());
    assert_same(&lun.file, &src);
    // And from a file.
    let right = dir.path().join("right");
    std::fs::write(&right, "user=alice\npassword=s3cret-secret\n").unwrap();
    ok(&["compare", "-q", "--iscsi-secrets", right.to_str().unwrap(), s, &lun.url]);
}

#[test]
fn list_targets_prints_the_addresses_to_use() {
    if !have_tgtd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lun = Tgtd::start(dir.path(), "list", &["--size", "8M"]);
    let out = ok(&["list-targets", &lun.portal]);
    let target = lun.url.trim_end_matches("/1");
    assert!(out.stdout_text().starts_with(target), "{}", out.stdout_text());
    let json = ok(&["list-targets", "--json", &format!("iscsi://{}", lun.portal)]).json();
    assert_eq!(json["targets"][0]["url"], target);
    // A wrong IQN names the portal's targets.
    let wrong = format!("iscsi://{}/iqn.2024-01.nowhere:none/1", lun.portal);
    let out = run(&["sync", "-n", &wrong, dir.path().join("x").to_str().unwrap()]);
    assert_ne!(out.code(), 0);
    assert!(out.stderr_text().contains("iqn.2024-01.lab.test:disk"), "{}", out.stderr_text());
}

#[test]
fn an_iscsi_lun_is_reached_on_the_far_side_of_ssh() {
    if !have_tgtd() {
        return;
    }
    let Some(env) = RemoteDir::new("blksync-iscsi") else { return };
    let lun = Tgtd::start(env.dir.path(), "remote", &["--size", "16M"]);
    let src = env.path("src.img");
    write_file(Path::new(&src), &random_bytes(16 * MIB, 5));
    let remote = format!("root@127.0.0.1:{}", lun.url);
    ok(&["sync", "-q", "-e", &env.rsh, &src, &remote]);
    assert_same(&lun.file, Path::new(&src));
    let back = env.path("back.img");
    ok(&["sync", "-q", "-e", &env.rsh, &remote, &back]);
    assert_same(Path::new(&back), Path::new(&src));
}

#[test]
fn ctrl_c_during_a_sync_from_a_lun_logs_out_and_a_rerun_completes_the_copy() {
    if !have_tgtd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lun.img");
    let data = random_bytes(64 * MIB, 6);
    write_file(&image, &data);
    let lun = Tgtd::start(dir.path(), "ctrl-c-source", &["--file", image.to_str().unwrap()]);
    let copy = dir.path().join("copy.img");
    let mut child = blksync()
        .args(["sync", "--bwlimit", "16M", "--progress=none", &lun.url, copy.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The event: the session is up and data has arrived in the copy.
    wait_until(&mut child, "a session and 4 MiB copied", || {
        lun.has_session() && copy.exists() && allocated(&copy) >= 4 * MIB as u64
    });
    let out = interrupt(child);
    let err = out.stderr_text();
    assert_eq!(out.code(), 130, "{err}");
    assert!(err.contains("incomplete"), "{err}");
    lun.wait_until_no_session();
    let done = done_prefix(&err);
    assert!(done > 0 && done < data.len(), "{err}");
    assert!(read(&copy)[..done] == data[..done], "the synced prefix is correct");
    // A rerun finishes the copy.
    ok(&["sync", "-q", &lun.url, copy.to_str().unwrap()]);
    assert_same(&copy, &image);
    ok(&["compare", "-q", &lun.url, copy.to_str().unwrap()]);
}

#[test]
fn ctrl_c_during_a_sync_onto_a_lun_logs_out_and_a_rerun_completes_it() {
    if !have_tgtd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lun = Tgtd::start(dir.path(), "ctrl-c-target", &["--size", "64M"]);
    let src = dir.path().join("src.img");
    let data = random_bytes(64 * MIB, 7);
    write_file(&src, &data);
    let s = src.to_str().unwrap();
    let mut child = blksync()
        .args(["sync", "--bwlimit", "16M", "--progress=none", s, &lun.url])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The LUN's file is sparse: what tgtd wrote to it is allocated.
    wait_until(&mut child, "a session and 4 MiB on the LUN", || {
        lun.has_session() && allocated(&lun.file) >= 4 * MIB as u64
    });
    let out = interrupt(child);
    let err = out.stderr_text();
    assert_eq!(out.code(), 130, "{err}");
    assert!(err.contains("incomplete") && err.contains(&lun.url), "{err}");
    lun.wait_until_no_session();
    let done = done_prefix(&err);
    assert!(done > 0 && done < data.len(), "{err}");
    assert!(read(&lun.file)[..done] == data[..done], "what the sync says it wrote is on the LUN");
    ok(&["sync", "-q", s, &lun.url]);
    assert_same(&lun.file, &src);
    ok(&["compare", "-q", s, &lun.url]);
}

/// tgtd stopped (SIGSTOP) mid-transfer: with `?timeout=2` the sync gives up on it, pinging it
/// first, and fails naming the portal, the target and the offset; once tgtd runs again, a rerun
/// completes the copy.
#[test]
fn a_target_that_stops_answering_times_out_naming_portal_target_and_offset() {
    if !have_tgtd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lun.img");
    write_file(&image, &random_bytes(64 * MIB, 8));
    let lun = Tgtd::start(dir.path(), "stopped-source", &["--file", image.to_str().unwrap()]);
    let copy = dir.path().join("copy.img");
    let url = format!("{}?timeout=2", lun.url);
    let mut child = blksync()
        .args(["sync", "--bwlimit", "16M", "--progress=none", &url, copy.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(&mut child, "a session and 4 MiB copied", || {
        lun.has_session() && copy.exists() && allocated(&copy) >= 4 * MIB as u64
    });
    lun.signal("STOP");
    let out = wait_for(child, Duration::from_secs(120));
    lun.signal("CONT");
    let err = out.stderr_text();
    assert_eq!(out.code(), 8, "{err}");
    assert!(err.contains("no answer from the target for 2 s"), "{err}");
    assert!(
        err.contains(&lun.portal) && err.contains("iqn.2024-01.lab.test:disk") && err.contains("at byte offset"),
        "{err}"
    );
    lun.wait_until_no_session();
    ok(&["sync", "-q", &url, copy.to_str().unwrap()]);
    assert_same(&copy, &image);
}

/// The same onto a LUN, where the initiator may be blocked sending (tgtd reads nothing while
/// stopped): the silence of the target still ends the run.
#[test]
fn a_target_that_stops_answering_during_writes_times_out() {
    if !have_tgtd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lun = Tgtd::start(dir.path(), "stopped-target", &["--size", "64M"]);
    let src = dir.path().join("src.img");
    write_file(&src, &random_bytes(64 * MIB, 9));
    let s = src.to_str().unwrap();
    let url = format!("{}?timeout=2", lun.url);
    let mut child = blksync()
        .args(["sync", "--bwlimit", "16M", "--progress=none", s, &url])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(&mut child, "a session and 4 MiB on the LUN", || {
        lun.has_session() && allocated(&lun.file) >= 4 * MIB as u64
    });
    lun.signal("STOP");
    let out = wait_for(child, Duration::from_secs(120));
    lun.signal("CONT");
    let err = out.stderr_text();
    assert_eq!(out.code(), 8, "{err}");
    assert!(
        err.contains("no answer from the target for 2 s")
            && err.contains(&lun.portal)
            && err.contains("at byte offset"),
        "{err}"
    );
    lun.wait_until_no_session();
    ok(&["sync", "-q", s, &url]);
    assert_same(&lun.file, &src);
}

/// A thick LUN (no UNMAP, no WRITE SAME) of a target that wants every byte of a write on R2T
/// (`InitialR2T=Yes`, `ImmediateData=No`) in small bursts: a sync onto it over old data, zeros
/// included, leaves its backing file equal to the source, and back.
#[test]
fn a_sync_onto_a_thick_lun_that_takes_data_only_on_r2t_equals_the_source() {
    if !have_tgtd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lun.img");
    write_file(&image, &random_bytes(32 * MIB, 10));
    let lun = Tgtd::start(
        dir.path(),
        "r2t-only",
        &[
            "--file",
            image.to_str().unwrap(),
            "--param",
            "InitialR2T=Yes",
            "--param",
            "ImmediateData=No",
            "--param",
            "MaxBurstLength=65536",
            "--param",
            "MaxRecvDataSegmentLength=16384",
            "--lun-params",
            "thin_provisioning=0",
        ],
    );
    let src = dir.path().join("src.img");
    let mut data = random_bytes(32 * MIB, 11);
    data[4 * MIB..9 * MIB].fill(0);
    write_file(&src, &data);
    let s = src.to_str().unwrap();
    let j = ok(&["sync", "--json", "--progress=none", s, &lun.url]).json();
    assert_eq!(j["bytes_zeroed"], 5 * MIB as u64, "{j}");
    assert_same(&image, &src);
    let back = dir.path().join("back.img");
    ok(&["sync", "-q", &lun.url, back.to_str().unwrap()]);
    assert_same(&back, &src);
    let again = ok(&["sync", "--json", "--progress=none", s, &lun.url]).json();
    assert_eq!((again["bytes_written"].as_u64(), again["bytes_zeroed"].as_u64()), (Some(0), Some(0)), "{again}");
}
