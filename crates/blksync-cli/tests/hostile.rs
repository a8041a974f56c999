//! Hostile and broken agents (tests/lab/hostile-agent, run through the real sshd as
//! `--remote-path`): the client never writes what it did not ask for, and never waits for ever.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use support::*;

/// A `--remote-path` wrapper that runs the hostile agent in `mode`.
fn agent(dir: &Path, mode: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/lab/hostile-agent");
    let wrapper = dir.join(format!("agent-{mode}"));
    std::fs::write(&wrapper, format!("#!/bin/sh\nexec {} {mode} \"$@\"\n", script.display())).unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrapper.to_str().unwrap().to_string()
}

#[test]
fn data_the_client_never_asked_for_is_not_written() {
    let Some(options) = sshd_options() else { return };
    let dir = tempfile::tempdir().unwrap();
    let rsh = format!("ssh {options}");
    let agent = agent(dir.path(), "unrequested");
    let remote = format!("root@127.0.0.1:{}", dir.path().join("src").display());
    // A fresh destination (the copy path) and an existing one (the hash path).
    for existing in [false, true] {
        let dst = dir.path().join(format!("dst-{existing}"));
        if existing {
            write_file(&dst, &random_bytes(1 << 20, 3));
        }
        let before = std::fs::read(&dst).ok();
        let dst_arg = dst.to_str().unwrap();
        let out = run(&["sync", "-q", "-e", &rsh, "--remote-path", &agent, "--no-upload", &remote, dst_arg]);
        assert_ne!(out.code(), 0, "existing={existing}");
        let err = out.stderr_text();
        assert!(err.contains("never asked for") && err.contains("900000000000"), "{err}");
        let size = std::fs::metadata(&dst).map_or(0, |m| m.len());
        assert!(size <= 1 << 20, "the destination grew to {size} bytes");
        if let Some(before) = before {
            assert!(read(&dst) == before, "an existing destination was written");
        }
    }
}

/// Runs `blksync ARGS` and returns its output and how long it took.
fn timed(args: &[&str]) -> (std::process::Output, std::time::Duration) {
    let start = std::time::Instant::now();
    let out = run(args);
    (out, start.elapsed())
}

#[test]
fn an_agent_that_goes_silent_or_stalls_mid_frame_ends_the_run() {
    let Some(options) = sshd_options() else { return };
    let dir = tempfile::tempdir().unwrap();
    let rsh = format!("ssh {options}");
    let remote = format!("root@127.0.0.1:{}", dir.path().join("src").display());
    let dst = dir.path().join("dst");
    for mode in ["stall", "bigframe"] {
        let agent = agent(dir.path(), mode);
        let args =
            ["sync", "-q", "-e", &rsh, "--timeout", "2", "--remote-path", &agent, &remote, dst.to_str().unwrap()];
        let (out, took) = timed(&args);
        let err = out.stderr_text();
        assert_eq!(out.code(), 8, "{mode}: {err}");
        assert!(err.contains("no word from the agent for 2 s") || err.contains("no progress for 2 s"), "{mode}: {err}");
        assert!(took < std::time::Duration::from_secs(30), "{mode}: took {took:?}");
    }
}

#[test]
fn a_stopped_agent_is_seen_and_plain_progress_reports_the_stall() {
    let Some(options) = sshd_options() else { return };
    let dir = tempfile::tempdir().unwrap();
    let rsh = format!("ssh {options} -o SetEnv=XDG_CACHE_HOME={}", dir.path().join("cache").display());
    let src = dir.path().join("src");
    write_file(&src, &random_bytes(32 << 20, 8));
    let dst = format!("root@127.0.0.1:{}", dir.path().join("dst").display());
    let child = blksync()
        .args(["sync", "-e", &rsh, "--progress=plain", "--timeout", "20", "--bwlimit", "2M"])
        .args([src.to_str().unwrap(), &dst])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Stop the agent once it is writing (the destination exists and grows).
    let start = std::time::Instant::now();
    while std::fs::metadata(dir.path().join("dst")).map_or(0, |m| m.len()) == 0 {
        assert!(start.elapsed() < std::time::Duration::from_secs(60), "the sync never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pattern = format!("{}/cache/blksync/blksync-.* agent", dir.path().display());
    assert!(std::process::Command::new("pkill").args(["-STOP", "-f", &pattern]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let _ = std::process::Command::new("pkill").args(["-KILL", "-f", &pattern]).status();
    let err = out.stderr_text();
    assert_eq!(out.code(), 8, "{err}");
    assert!(err.contains("stalled for"), "plain progress reports the stall:\n{err}");
    assert!(err.contains("no word from the agent") || err.contains("no progress for 20 s"), "{err}");
}

#[test]
fn a_pull_that_fails_before_any_data_leaves_no_file_of_zeros() {
    let Some(options) = sshd_options() else { return };
    let dir = tempfile::tempdir().unwrap();
    let rsh = format!("ssh {options}");
    let remote = format!("root@127.0.0.1:{}", dir.path().join("src").display());
    let dst = dir.path().join("copy.img");
    let agent = agent(dir.path(), "stall");
    let out =
        run(&["sync", "-q", "-e", &rsh, "--timeout", "2", "--remote-path", &agent, &remote, dst.to_str().unwrap()]);
    assert_eq!(out.code(), 8, "{}", out.stderr_text());
    assert!(!dst.exists(), "a file that looks like a copy was left");
}
