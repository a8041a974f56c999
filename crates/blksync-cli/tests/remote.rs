//! Remote sync over a real sshd on 127.0.0.1, started by tests/lab/sshd. Each test gives the
//! remote agent its own upload cache, so the first connection of every test exercises the
//! upload of the binary.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::*;

const MIB: usize = 1 << 20;

struct Env(RemoteDir);

impl std::ops::Deref for Env {
    type Target = RemoteDir;
    fn deref(&self) -> &RemoteDir {
        &self.0
    }
}

impl Env {
    fn new() -> Option<Env> {
        RemoteDir::new("blksync-remote").map(Env)
    }
    /// `blksync COMMAND -e RSH [--progress=none] ARGS...`.
    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut all = vec![args[0], "-e", &self.rsh];
        if !["info", "list"].contains(&args[0]) {
            all.extend(["--progress=none"]);
        }
        all.extend_from_slice(&args[1..]);
        let mut command = support::blksync();
        command.args(all);
        command
    }
    /// Runs a command, interrupts it (SIGINT) once its agent has moved a MiB (the job is under
    /// way, whatever the machine's load), and checks that it stopped within five seconds.
    /// Returns its output and standard error.
    fn interrupted(&self, args: &[&str]) -> (std::process::Output, String) {
        // Agents of earlier commands may still be exiting: only a new one counts, and from
        // its first sight (what the bootstrap read is not the job).
        let earlier = self.agents();
        let mut first = std::collections::HashMap::new();
        self.interrupted_when(args, "its agent moved a MiB", || {
            let new = self.agents().into_iter().filter(|pid| !earlier.contains(pid));
            let moved: u64 = new
                .map(|pid| {
                    let now = agent_io(pid);
                    now.saturating_sub(*first.entry(pid).or_insert(now))
                })
                .sum();
            moved >= MIB as u64
        })
    }
    /// Runs a command, interrupts it (SIGINT) as soon as `ready` (polled) says so, and checks
    /// that it stopped within five seconds. Returns its output and standard error.
    fn interrupted_when(
        &self,
        args: &[&str],
        what: &str,
        ready: impl FnMut() -> bool,
    ) -> (std::process::Output, String) {
        let mut child = self.command(args).stderr(Stdio::piped()).spawn().unwrap();
        wait_until(&mut child, what, ready);
        let stopped = Instant::now();
        std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(stopped.elapsed() < Duration::from_secs(5), "took {:?} to stop", stopped.elapsed());
        (out, err)
    }
    /// `pkill -f` pattern of this test's agents (the ones in its upload cache).
    fn agent_pattern(&self) -> String {
        format!("{}/cache/blksync/blksync-.* agent", self.dir.path().display())
    }
    /// PIDs of this test's running agents.
    fn agents(&self) -> Vec<u32> {
        let out = std::process::Command::new("pgrep").args(["-f", &self.agent_pattern()]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
    }
    /// Kills this test's agents (SIGKILL); true when there was one.
    fn kill_agents(&self) -> bool {
        std::process::Command::new("pkill").args(["-KILL", "-f", &self.agent_pattern()]).status().unwrap().success()
    }
    fn run(&self, args: &[&str]) -> std::process::Output {
        self.command(args).output().expect("running blksync")
    }
    #[track_caller]
    fn ok(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec![args[0], "--json"];
        all.extend_from_slice(&args[1..]);
        let out = self.run(&all);
        assert_eq!(out.code(), 0, "blksync {args:?} failed:\n{}", out.stderr_text());
        out.json()
    }
}

/// Bytes process `pid` has read and written so far (any file, pipe or socket; 0 once it is
/// gone).
fn agent_io(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines()
        .filter_map(|l| l.strip_prefix("rchar: ").or_else(|| l.strip_prefix("wchar: ")))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum()
}

#[test]
fn push_pull_and_remote_to_remote_make_identical_copies() {
    let Some(env) = Env::new() else { return };
    let src = env.path("src");
    let mut data = random_bytes(6 * MIB + 1000, 1);
    data[2 * MIB..3 * MIB].fill(0);
    write_file(src.as_ref(), &data);
    // Push to a missing destination, then a small change.
    let j = env.ok(&["sync", &src, &env.remote("pushed")]);
    assert_same(src.as_ref(), env.path("pushed").as_ref());
    assert!(j["bytes_sent"].as_u64().unwrap() > 5 * MIB as u64);
    patch(src.as_ref(), 4 * MIB as u64 + 5, b"changed");
    let j = env.ok(&["sync", &src, &env.remote("pushed")]);
    assert_same(src.as_ref(), env.path("pushed").as_ref());
    assert_eq!(j["bytes_written"], 4096);
    assert!(j["bytes_sent"].as_u64().unwrap() < 64 * 1024, "a 4 KiB change must not cost much: {j}");
    // Pull, then pull a change made on the remote side.
    env.ok(&["sync", &env.remote("src"), &env.path("pulled")]);
    assert_same(src.as_ref(), env.path("pulled").as_ref());
    patch(src.as_ref(), 10, &random_bytes(9000, 2));
    let j = env.ok(&["sync", "--verify", &env.remote("src"), &env.path("pulled")]);
    assert_same(src.as_ref(), env.path("pulled").as_ref());
    assert_eq!(j["verified"], true);
    assert_eq!(j["bytes_written"], 3 * 4096);
    // Remote to remote through this host (different ssh options make them two "hosts"), ssh://
    // form, then with a zero range to punch.
    let url = format!("ssh://root@127.0.0.1{}", env.path("r2r"));
    let two_hosts = ["--source-ssh-opt", "-oConnectTimeout=30"];
    let j = env.ok(&["sync", two_hosts[0], two_hosts[1], &env.remote("src"), &url]);
    assert_same(src.as_ref(), env.path("r2r").as_ref());
    assert!(j["bytes_received"].as_u64().unwrap() > 5 * MIB as u64, "data was relayed: {j}");
    patch(src.as_ref(), 0, &vec![0u8; MIB]);
    let j = env.ok(&["sync", two_hosts[0], two_hosts[1], &env.remote("src"), &url]);
    assert_same(src.as_ref(), env.path("r2r").as_ref());
    assert_eq!(j["bytes_zeroed"], MIB as u64);
    assert!(allocated(env.path("r2r").as_ref()) < (data.len() - MIB) as u64, "zeros became holes remotely");
}

#[test]
fn two_paths_on_one_host_sync_there_over_one_connection() {
    let Some(env) = Env::new() else { return };
    let src = env.path("src");
    write_file(src.as_ref(), &random_bytes(8 * MIB, 12));
    let j = env.ok(&["sync", "--verify", &env.remote("src"), &env.remote("copy")]);
    assert_same(src.as_ref(), env.path("copy").as_ref());
    assert_eq!(j["verified"], true);
    assert_eq!(j["bytes_written"], 8 * MIB as u64);
    let wire = j["bytes_sent"].as_u64().unwrap() + j["bytes_received"].as_u64().unwrap();
    assert!(wire < 16 * 1024, "no data crosses the network: {wire} bytes");
    assert_eq!(j["destination"], env.remote("copy"));
    // Errors there come back typed.
    let out = env.run(&["sync", "--no-resize", &env.remote("src"), &env.remote("nope/x")]);
    assert_eq!(out.code(), 3, "{}", out.stderr_text());
    // compare runs there too.
    assert_eq!(env.run(&["compare", &env.remote("src"), &env.remote("copy")]).code(), 0);
    patch(env.path("copy").as_ref(), 3 * MIB as u64, b"!");
    let out = env.run(&["compare", &env.remote("src"), &env.remote("copy")]);
    assert_eq!(out.code(), 1);
    assert!(out.stdout_text().contains(&format!("bytes {}..{}", 3 * MIB, 3 * MIB + 4096)), "{}", out.stdout_text());
    let j = env.run(&["compare", "--json", &env.remote("src"), &env.remote("copy")]).json();
    assert_eq!(j["destination"], env.remote("copy"));
    assert_eq!(env.run(&["compare", &env.remote("src"), &env.remote("nope")]).code(), 2);
}

#[test]
fn unchanged_image_costs_almost_nothing_on_the_wire() {
    let Some(env) = Env::new() else { return };
    let src = env.path("src");
    write_file(src.as_ref(), &random_bytes(64 * MIB, 3));
    std::fs::copy(&src, env.path("dst")).unwrap();
    let j = env.ok(&["sync", &src, &env.remote("dst")]);
    assert_eq!(j["bytes_written"], 0);
    let wire = j["bytes_sent"].as_u64().unwrap() + j["bytes_received"].as_u64().unwrap();
    assert!(wire < 8 * 1024, "64 chunks of metadata should be a few KiB, was {wire}");
}

#[test]
fn odd_paths_work_on_both_sides() {
    let Some(env) = Env::new() else { return };
    let name = "it's a \"ünï cödé\" $HOME `x` file.img";
    let src = env.path(name);
    write_file(src.as_ref(), &random_bytes(MIB + 3, 4));
    let dst = env.path("dest dir/with 'quote'");
    std::fs::create_dir_all(&dst).unwrap();
    // A remote directory destination receives the source's name.
    env.ok(&["sync", &src, &format!("root@127.0.0.1:{dst}/")]);
    assert_same(src.as_ref(), &Path::new(&dst).join(name));
    env.ok(&["sync", &env.remote(name), &env.path("back home.img")]);
    assert_same(src.as_ref(), env.path("back home.img").as_ref());
}

#[test]
fn dry_run_and_compare_work_remotely() {
    let Some(env) = Env::new() else { return };
    let (a, b) = (env.path("a"), env.path("b"));
    let data = random_bytes(3 * MIB, 5);
    write_file(a.as_ref(), &data);
    write_file(b.as_ref(), &data);
    assert_eq!(env.run(&["compare", &env.remote("a"), &b]).code(), 0);
    patch(b.as_ref(), MIB as u64, b"x");
    let out = env.run(&["compare", &a, &env.remote("b")]);
    assert_eq!(out.code(), 1);
    assert!(out.stdout_text().contains(&format!("bytes {}..{}", MIB, MIB + 4096)), "{}", out.stdout_text());
    let j = env.ok(&["sync", "-n", &a, &env.remote("b")]);
    assert_eq!(j["bytes_differing"], 4096);
    assert_eq!(read(b.as_ref())[MIB], b'x', "dry run wrote nothing");
    assert_eq!(env.run(&["compare", &a, &env.remote("missing")]).code(), 2);
}

#[test]
fn sudo_runs_the_agent_under_sudo() {
    let Some(env) = Env::new() else { return };
    if !Path::new("/usr/bin/sudo").exists() {
        eprintln!("skipping: sudo is not installed");
        return;
    }
    let src = env.path("src");
    write_file(src.as_ref(), &random_bytes(MIB, 6));
    env.ok(&["sync", "--dest-sudo", &src, &env.remote("dst")]);
    assert_same(src.as_ref(), env.path("dst").as_ref());
}

#[test]
fn upload_happens_once_and_no_upload_refuses() {
    let Some(env) = Env::new() else { return };
    let src = env.path("src");
    write_file(src.as_ref(), &random_bytes(MIB, 7));
    let out = env.run(&["sync", "--no-upload", &src, &env.remote("dst")]);
    assert_eq!(out.code(), 8, "{}", out.stderr_text());
    let expected = format!("no blksync speaking protocol {}", blksync::protocol::VERSION);
    assert!(out.stderr_text().contains(&expected), "{}", out.stderr_text());
    env.ok(&["sync", &src, &env.remote("dst")]);
    let cache = env.dir.path().join("cache/blksync");
    let entries: Vec<_> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(entries.len(), 1, "one cached agent: {entries:?}");
    let cached = &entries[0];
    let name = cached.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with(&format!("blksync-{}-", env!("CARGO_PKG_VERSION"))), "{name}");
    let mtime = std::fs::metadata(cached).unwrap().modified().unwrap();
    env.ok(&["sync", "--no-upload", &src, &env.remote("dst")]);
    assert_eq!(std::fs::metadata(cached).unwrap().modified().unwrap(), mtime, "second run reuses the cache");
}

#[test]
fn an_agent_of_another_protocol_version_is_replaced_or_named() {
    let Some(env) = Env::new() else { return };
    let fake = env.path("old-blksync");
    std::fs::write(&fake, "#!/bin/sh\n[ \"$1 $2\" = \"agent --protocol\" ] && echo 0\n").unwrap();
    std::process::Command::new("chmod").args(["755", &fake]).status().unwrap();
    let src = env.path("src");
    write_file(src.as_ref(), &random_bytes(MIB, 8));
    let out = env.run(&["sync", "--remote-path", &fake, "--no-upload", &src, &env.remote("dst")]);
    assert_eq!(out.code(), 8);
    let err = out.stderr_text();
    let expected = format!("speaking protocol {}", blksync::protocol::VERSION);
    assert!(err.contains("found: protocol 0") && err.contains(&expected), "{err}");
    env.ok(&["sync", "--remote-path", &fake, &src, &env.remote("dst")]);
    assert_same(src.as_ref(), env.path("dst").as_ref());
}

#[test]
fn login_script_junk_is_quoted_in_a_clear_error() {
    let Some(env) = Env::new() else { return };
    let src = env.path("src");
    write_file(src.as_ref(), b"x");
    let noisy = format!("sh -c 'echo Welcome to the machine; exec {} \"$@\"' sh", env.rsh.replace('\'', ""));
    let out = run(&["sync", "-e", &noisy, &src, &env.remote("dst")]);
    assert_eq!(out.code(), 8, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("\"Welcome to the machine\""), "{}", out.stderr_text());
    assert!(out.stderr_text().contains("login script"), "{}", out.stderr_text());
}

#[test]
fn remote_failures_keep_their_kind_and_name_the_host() {
    let Some(env) = Env::new() else { return };
    let src = env.path("src");
    write_file(src.as_ref(), &random_bytes(4 * MIB, 9));
    let out = env.run(&["sync", &env.remote("nope"), &env.path("x")]);
    assert_eq!(out.code(), 3, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("root@127.0.0.1: opening source"), "{}", out.stderr_text());
    let out = env.run(&["sync", &src, "root@127.0.0.1:/nonexistent-dir/x"]);
    assert_eq!(out.code(), 3, "{}", out.stderr_text());
    let out = run(&["sync", "-e", "ssh -p 1 -o BatchMode=yes -o ConnectTimeout=2", &src, "root@127.0.0.1:/tmp/x"]);
    assert_eq!(out.code(), 8, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("Connection refused"), "{}", out.stderr_text());
    if can_use_loop_devices() {
        let small = env.dir.path().join("small");
        let _m = Mount::new(&small, &["-t", "tmpfs", "-o", "size=1M", "tmpfs"]);
        let out = env.run(&["sync", &src, &format!("root@127.0.0.1:{}/dst", small.display())]);
        assert_eq!(out.code(), 4, "{}", out.stderr_text());
        assert!(out.stderr_text().contains("No space left on device"), "{}", out.stderr_text());
        let backing = env.dir.path().join("backing");
        write_file(&backing, &random_bytes(MIB, 10));
        let lo = Loop::attach(&backing);
        let out = env.run(&["sync", &src, &format!("root@127.0.0.1:{}", lo.path())]);
        assert_eq!(out.code(), 5, "{}", out.stderr_text());
        assert!(out.stderr_text().contains("too small"), "{}", out.stderr_text());
    }
}

#[test]
fn killed_agent_gives_a_clean_error_and_a_consistent_destination() {
    let Some(env) = Env::new() else { return };
    let src = env.path("src");
    let data = random_bytes(32 * MIB, 11);
    write_file(src.as_ref(), &data);
    // Install the agent in this test's cache first, so the one we kill is easy to find.
    env.ok(&["sync", &src, &env.remote("warmup")]);
    let dst = env.path("dst");
    // The warmup's agent may still be exiting: the one to kill is a new one.
    let earlier = env.agents();
    // Throttled, the pull takes 8 s: the kill lands once data flows, long before the end.
    let mut child = support::blksync()
        .args(["sync", "-e", &env.rsh, "--progress=none", "--bwlimit", "4M", &env.remote("src"), &dst])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(&mut child, "a new agent ran and the copy held a MiB", || {
        env.agents().iter().any(|pid| !earlier.contains(pid))
            && std::fs::metadata(&dst).is_ok_and(|_| allocated(dst.as_ref()) >= MIB as u64)
    });
    assert!(env.kill_agents(), "no agent found to kill");
    let killed = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(killed.elapsed() < Duration::from_secs(20), "the client hung after the agent died");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(8), "{err}");
    assert!(err.contains("root@127.0.0.1") && err.contains("connection"), "{err}");
    // A file the failed run created is removed, as a local sync does (it must not look like a
    // copy); a rerun makes it.
    assert!(!Path::new(&dst).exists(), "the failed copy's new file was removed");
    env.ok(&["sync", &env.remote("src"), &dst]);
    assert_same(src.as_ref(), dst.as_ref());
}

#[test]
fn sigint_during_a_remote_sync_flushes_and_exits_130() {
    let Some(env) = Env::new() else { return };
    let src = env.path("src");
    let data = random_bytes(32 * MIB, 13);
    write_file(src.as_ref(), &data);
    let (out, err) = env.interrupted(&["sync", "--bwlimit", "8M", &src, &env.remote("dst")]);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("incomplete"), "{err}");
    let done: usize = err.split("the first ").nth(1).and_then(|s| s.split(' ').next()).unwrap().parse().unwrap();
    assert_eq!(&read(env.path("dst").as_ref())[..done], &data[..done], "the synced prefix is correct");
    env.ok(&["sync", &src, &env.remote("dst")]);
    assert_same(src.as_ref(), env.path("dst").as_ref());
}

#[test]
fn pause_and_a_compression_level_still_give_an_identical_copy() {
    let Some(env) = Env::new() else { return };
    let src = env.path("src");
    // Compressible: text-like data.
    let data: Vec<u8> = b"blksync keeps copies of disks. ".iter().copied().cycle().take(3 * MIB).collect();
    write_file(src.as_ref(), &data);
    let j = env.ok(&["sync", "--pause", "1", "--wire-compress", "3", &src, &env.remote("dst")]);
    assert_same(src.as_ref(), env.path("dst").as_ref());
    assert!(j["bytes_sent"].as_u64().unwrap() < MIB as u64 / 4, "compressible data is compressed: {j}");
    let out = env.run(&["sync", "--wire-compress", "99", &src, &env.remote("dst")]);
    assert_eq!(out.code(), 2, "{}", out.stderr_text());
}

#[test]
fn backups_and_restores_work_across_ssh_in_both_directions() {
    let Some(env) = Env::new() else { return };
    let src = env.path("src");
    let mut data = random_bytes(6 * MIB, 20);
    let mut points = Vec::new();
    // Push: a local image into a chain on the remote host.
    for i in 0..4u8 {
        if i > 0 {
            data[usize::from(i) * 100_000..usize::from(i) * 100_000 + 5000].fill(i);
        }
        if i == 3 {
            data.truncate(5 * MIB + 11);
        }
        write_file(src.as_ref(), &data);
        let j = env.ok(&["backup", "--comment", &format!("p{i}"), &src, &env.remote("chain")]);
        if i == 1 {
            assert!(j["bytes_sent"].as_u64().unwrap() < 64 * 1024, "an increment sends only the change: {j}");
        }
        points.push(data.clone());
    }
    let list = ok(&["list", "--json", &env.path("chain")]).json()["points"].clone();
    assert_eq!(list.as_array().unwrap().len(), 4);
    assert_eq!(list[2]["comment"], "p2");
    // Restore from the remote chain, at every point, onto a local file.
    let out = env.path("out");
    for (i, expected) in points.iter().enumerate() {
        env.ok(&["restore", "--at", &i.to_string(), &env.remote("chain"), &out]);
        assert!(read(out.as_ref()) == *expected, "point {i}");
    }
    // Pull: a remote image into a local chain, restored locally.
    let local_chain = env.path("local-chain");
    env.ok(&["backup", &env.remote("src"), &local_chain]);
    ok(&["restore", "-q", &local_chain, &out]);
    assert!(read(out.as_ref()) == data);
    // To standard output, from the remote chain.
    let streamed = env.run(&["restore", "--at", "2", &env.remote("chain"), "-"]);
    assert_eq!(streamed.code(), 0, "{}", streamed.stderr_text());
    assert!(streamed.stdout == points[2], "point 2 on stdout");
    assert!(!Path::new("-").exists());
    // A missing point is the same error as locally.
    assert_eq!(env.run(&["restore", "--at", "9", &env.remote("chain"), &out]).code(), 2);
    // Image and chain on one remote host: both run there, and no image data crosses the network.
    let j = env.ok(&["backup", &env.remote("src"), &env.remote("chain")]);
    let wire = j["bytes_sent"].as_u64().unwrap() + j["bytes_received"].as_u64().unwrap();
    assert!(wire < 16 * 1024, "{j}");
    assert!(j["destination"].as_str().unwrap().contains("inc-"), "{j}");
    let j = env.ok(&["restore", "--at", "1", &env.remote("chain"), &env.remote("there.img")]);
    let wire = j["bytes_sent"].as_u64().unwrap() + j["bytes_received"].as_u64().unwrap();
    assert!(wire < 16 * 1024, "{j}");
    assert!(read(env.path("there.img").as_ref()) == points[1]);
}

#[test]
fn a_remote_backup_killed_mid_run_leaves_the_chain_whole() {
    let Some(env) = Env::new() else { return };
    let src = env.path("src");
    let mut data = random_bytes(8 * MIB, 21);
    write_file(src.as_ref(), &data);
    env.ok(&["backup", &src, &env.remote("chain")]);
    data[..4 * MIB].copy_from_slice(&random_bytes(4 * MIB, 22));
    write_file(src.as_ref(), &data);
    // Throttled, the backup reads 8 MiB in 8 s: the kill lands once the new point's temporary
    // file has grown, long before it could be committed.
    let mut child = support::blksync()
        .args(["backup", "-e", &env.rsh, "--progress=none", "--bwlimit", "1M", &src, &env.remote("chain")])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let chain = env.dir.path().join("chain");
    wait_until(&mut child, "the new point's temporary file grew", || {
        temporary_files(&chain).iter().any(|name| std::fs::metadata(chain.join(name)).is_ok_and(|m| m.len() > 0))
    });
    assert!(env.kill_agents(), "no agent found to kill");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(8), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ok(&["list", "--json", &env.path("chain")]).json()["points"].as_array().unwrap().len(), 1);
    env.ok(&["backup", &src, &env.remote("chain")]);
    ok(&["restore", "-q", &env.path("chain"), &env.path("out")]);
    assert!(read(env.path("out").as_ref()) == data);
}

/// The files of a history command on any mix of hosts: the result is what the local command
/// gives, and files cross the network only when they must.
#[test]
fn history_commands_take_remote_paths_anywhere() {
    let Some(env) = Env::new() else { return };
    let (base, src) = (env.path("base.img"), env.path("src.img"));
    let old = random_bytes(8 * MIB, 20);
    write_file(base.as_ref(), &old);
    write_file(src.as_ref(), &old);
    patch(src.as_ref(), 123_456, &random_bytes(10_000, 21));
    patch(src.as_ref(), 5 * MIB as u64, &vec![0u8; MIB]);
    // diff: pulled (SRC remote), pushed (BASE and PATCH remote), BASE remote with a local PATCH,
    // everything remote. Each records the same change.
    let cases = [
        (env.remote("src.img"), base.clone(), env.path("pull.delta")),
        (src.clone(), env.remote("base.img"), env.remote("push.delta")),
        (src.clone(), env.remote("base.img"), env.path("fetched.delta")),
        (env.remote("src.img"), env.remote("base.img"), env.remote("there.delta")),
        (env.remote("src.img"), env.remote("base.img"), env.path("moved.delta")),
    ];
    for (s, b, o) in &cases {
        let j = env.ok(&["diff", s, b, "-o", o]);
        assert_eq!(j["bytes_written"], 3 * 4096, "{s} {b} {o}: {j}");
        assert_eq!(j["bytes_zeroed"], MIB as u64);
        assert_eq!(&j["delta"], o);
        let info = env.ok(&["info", o]);
        assert_eq!(info["header"]["size_after"], 8 * MIB as u64);
        assert_eq!(info["header"]["id"], j["header"]["id"]);
    }
    // apply: a local delta onto a remote target, remote onto local, remote onto remote.
    for (i, (delta, target)) in [
        (env.path("pull.delta"), env.remote("t0.img")),
        (env.remote("push.delta"), env.path("t1.img")),
        (env.remote("there.delta"), env.remote("t2.img")),
    ]
    .iter()
    .enumerate()
    {
        std::fs::copy(&base, env.path(&format!("t{i}.img"))).unwrap();
        let j = env.ok(&["apply", delta, target]);
        assert_eq!(&j["target"], target);
        assert_same(src.as_ref(), env.path(&format!("t{i}.img")).as_ref());
    }
    // Applying again is refused before any write, and the error names the delta as given.
    let out = env.run(&["apply", &env.path("pull.delta"), &env.remote("t0.img")]);
    assert_eq!(out.code(), 10, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("pull.delta"), "{}", out.stderr_text());
    let spool = env.dir.path().join("cache/blksync/spool");
    assert_eq!(std::fs::read_dir(&spool).map_or(0, Iterator::count), 0, "the session's spool is cleaned");
    // merge: remote and local inputs into a remote output; all remote.
    let newer = env.path("newer.img");
    write_file(newer.as_ref(), &random_bytes(8 * MIB, 22));
    ok(&["diff", "--progress=none", &newer, &src, "-o", &env.path("second.delta")]);
    env.ok(&["merge", &env.remote("push.delta"), &env.path("second.delta"), "-o", &env.remote("m1.delta")]);
    env.ok(&["merge", &env.remote("push.delta"), &env.remote("second.delta"), "-o", &env.remote("m2.delta")]);
    env.ok(&["merge", &env.remote("push.delta"), &env.remote("second.delta"), "-o", &env.path("m3.delta")]);
    // A chain of remote deltas onto a local target (fetched over one connection).
    std::fs::copy(&base, env.path("t.img")).unwrap();
    let j = env.ok(&["apply", &env.remote("push.delta"), &env.remote("second.delta"), &env.path("t.img")]);
    assert_eq!(j["deltas"][1], env.remote("second.delta"));
    assert_same(newer.as_ref(), env.path("t.img").as_ref());
    for m in ["m1.delta", "m2.delta", "m3.delta"] {
        std::fs::copy(&base, env.path("t.img")).unwrap();
        env.ok(&["apply", &env.remote(m), &env.path("t.img")]);
        assert_same(newer.as_ref(), env.path("t.img").as_ref());
    }
}

#[test]
fn remote_chains_are_listed_and_pruned_where_they_are() {
    let Some(env) = Env::new() else { return };
    let src = env.path("src.img");
    let mut states = Vec::new();
    write_file(src.as_ref(), &random_bytes(4 * MIB, 30));
    for i in 0..5u64 {
        patch(src.as_ref(), i * 300_000, &random_bytes(5000, 31 + i));
        env.ok(&["backup", "--comment", &format!("run {i}"), &src, &env.remote("chain")]);
        states.push(read(src.as_ref()));
    }
    let points = env.ok(&["list", &env.remote("chain")])["points"].clone();
    assert_eq!(points.as_array().unwrap().len(), 5);
    assert_eq!(points[3]["comment"], "run 3");
    assert!(points[0]["file"].as_str().unwrap().starts_with("root@127.0.0.1:"), "{points}");
    let out = env.run(&["list", &env.remote("chain")]);
    assert!(out.stdout_text().contains("run 4"), "{}", out.stdout_text());
    let j = env.ok(&["prune", "--keep", "2", &env.remote("chain")]);
    assert_eq!(j["folded"], 2);
    assert_eq!(env.ok(&["list", &env.remote("chain")])["points"].as_array().unwrap().len(), 3);
    for (n, state) in states.iter().enumerate().skip(2) {
        env.ok(&["restore", "--at", &n.to_string(), &env.remote("chain"), &env.path("r.img")]);
        assert_eq!(&read(env.path("r.img").as_ref()), state, "point {n}");
    }
    // Errors come back typed and name the host.
    let out = env.run(&["list", &env.remote("nothing")]);
    assert_eq!(out.code(), 3, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("127.0.0.1"), "{}", out.stderr_text());
    assert_eq!(env.run(&["prune", "--keep", "1", &env.remote("nothing")]).code(), 3);
}

#[test]
fn undo_logs_of_remote_syncs_roll_the_mirror_back() {
    let Some(env) = Env::new() else { return };
    let (src, mirror) = (env.path("src.img"), env.path("mirror.img"));
    let old = random_bytes(6 * MIB, 40);
    write_file(mirror.as_ref(), &old);
    let mut new = old.clone();
    new[MIB..MIB + 20_000].copy_from_slice(&random_bytes(20_000, 41));
    new.truncate(5 * MIB + 7);
    write_file(src.as_ref(), &new);
    // The log on the mirror's host, pushed and from the same host; then a local log of a
    // remote mirror, fetched from there.
    for (from, undo) in [
        (src.clone(), env.remote("u1.delta")),
        (env.remote("src.img"), env.remote("u2.delta")),
        (src.clone(), env.path("u3.delta")),
    ] {
        write_file(mirror.as_ref(), &old);
        let j = env.ok(&["sync", &from, &env.remote("mirror.img"), "--undo", &undo]);
        assert_eq!(&j["undo_log"], &undo);
        assert_same(src.as_ref(), mirror.as_ref());
        env.ok(&["apply", &undo, &env.remote("mirror.img")]);
        assert_eq!(read(mirror.as_ref()), old, "rolled back with {undo}");
    }
    // A log that cannot be written where the old bytes are is refused before anything happens.
    let out = env.run(&["sync", &src, &mirror, "--undo", &env.remote("u4.delta")]);
    assert_eq!(out.code(), 2, "{}", out.stderr_text());
    assert_eq!(read(mirror.as_ref()), old);
}

#[test]
fn corrupt_or_missing_remote_deltas_are_refused_and_touch_nothing() {
    let Some(env) = Env::new() else { return };
    let (a, b) = (env.path("a.img"), env.path("b.img"));
    write_file(a.as_ref(), &random_bytes(2 * MIB, 50));
    write_file(b.as_ref(), &random_bytes(2 * MIB, 51));
    env.ok(&["diff", &env.remote("b.img"), &a, "-o", &env.path("d.delta")]);
    // The fingerprints of the images are the same whichever end read them.
    env.ok(&["diff", &b, &env.remote("a.img"), "-o", &env.path("d2.delta")]);
    env.ok(&["diff", &b, &a, "-o", &env.path("d3.delta")]);
    let info = |p: &str| env.ok(&["info", p]);
    let (one, two, local) = (info(&env.path("d.delta")), info(&env.path("d2.delta")), info(&env.path("d3.delta")));
    for key in ["before_fingerprint", "after_fingerprint"] {
        assert_eq!(one[key], local[key], "{key}");
        assert_eq!(two[key], local[key], "{key}");
        assert_eq!(local[key].as_str().unwrap().len(), 64, "{key}");
    }
    let bytes = read(env.path("d.delta").as_ref());
    let mut bad = bytes.clone();
    bad[bytes.len() / 2] ^= 1;
    write_file(env.path("bad.delta").as_ref(), &bad);
    write_file(env.path("short.delta").as_ref(), &bytes[..bytes.len() - 100]);
    for delta in [env.path("bad.delta"), env.remote("bad.delta"), env.remote("short.delta")] {
        for target in [env.remote("a.img"), a.clone()] {
            let out = env.run(&["apply", &delta, &target]);
            assert_eq!(out.code(), 9, "{delta} onto {target}: {}", out.stderr_text());
            assert_eq!(read(a.as_ref()), random_bytes(2 * MIB, 50), "{delta} onto {target}");
        }
    }
    assert_eq!(env.run(&["info", &env.remote("bad.delta")]).code(), 9);
    assert_eq!(env.run(&["apply", &env.remote("missing.delta"), &a]).code(), 3);
    assert_eq!(env.run(&["diff", &a, &env.remote("missing.img"), "-o", &env.path("x.delta")]).code(), 3);
    assert!(!Path::new(&env.path("x.delta")).exists());
    // An output over an input is refused on the far side too, before anything is written.
    assert_eq!(env.run(&["diff", &b, &env.remote("a.img"), "-o", &env.remote("a.img")]).code(), 2);
    assert_eq!(env.run(&["sync", &b, &env.remote("a.img"), "--undo", &env.remote("a.img")]).code(), 2);
    // A device node is never replaced by an output, here or there.
    assert_eq!(env.run(&["diff", &env.remote("b.img"), &env.remote("a.img"), "-o", "/dev/null"]).code(), 2);
    assert_eq!(env.run(&["merge", &env.path("d.delta"), "-o", "root@127.0.0.1:/dev/null"]).code(), 2);
    assert_eq!(read(a.as_ref()), random_bytes(2 * MIB, 50));
    assert_eq!(temporary_files(env.dir.path()), Vec::<String>::new());
}

#[test]
fn sigint_during_a_remote_prune_cancels_it_there_and_keeps_every_point() {
    let Some(env) = Env::new() else { return };
    let src = env.path("src.img");
    let mut data = random_bytes(32 * MIB, 60);
    let mut states = Vec::new();
    for i in 0..3 {
        // A prune folds in place, touching only what the increments changed: change a lot.
        data[i * 8 * MIB..(i + 1) * 8 * MIB].copy_from_slice(&random_bytes(8 * MIB, 61 + i as u64));
        write_file(src.as_ref(), &data);
        env.ok(&["backup", &src, &env.remote("chain")]);
        states.push(data.clone());
    }
    // Throttled, the fold (16 MiB journalled, 16 MiB written) takes about 30 s on the chain's
    // host; Ctrl-C, sent once the agent is doing I/O, is relayed there.
    let (out, err) = env.interrupted(&["prune", "--bwlimit", "1M", "--keep", "0", &env.remote("chain")]);
    assert_eq!(out.status.code(), Some(130), "{err}");
    let points = env.ok(&["list", &env.remote("chain")])["points"].clone();
    assert_eq!(points.as_array().unwrap().len(), 3, "nothing was folded: {points}");
    for (n, state) in states.iter().enumerate() {
        env.ok(&["restore", "--at", &n.to_string(), &env.remote("chain"), &env.path("r.img")]);
        assert!(&read(env.path("r.img").as_ref()) == state, "point {n}");
    }
    assert_eq!(temporary_files(env.path("chain").as_ref()), Vec::<String>::new());
}

#[test]
fn a_killed_client_stops_its_remote_job_and_frees_the_chain() {
    let Some(env) = Env::new() else { return };
    let src = env.path("src.img");
    write_file(src.as_ref(), &random_bytes(32 * MIB, 70));
    env.ok(&["backup", &src, &env.remote("chain")]);
    // Prune folds in place, touching only what changed: change enough for a long fold.
    patch(src.as_ref(), 0, &random_bytes(8 * MIB, 71));
    env.ok(&["backup", &src, &env.remote("chain")]);
    let before = env.agents();
    let mut child = support::blksync()
        .args(["prune", "-e", &env.rsh, "--progress=none", "--bwlimit", "1M", "--keep", "0"])
        .arg(env.remote("chain"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the client once the prune's agent is folding (it has done I/O).
    wait_until(&mut child, "the prune's agent doing I/O", || {
        env.agents().iter().filter(|p| !before.contains(p)).any(|&p| agent_io(p) > MIB as u64)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    // The fold (8 MiB journalled and 8 MiB written at 1 MiB/s) would hold the chain's lock for
    // about 16 s more; without its client it stops at once.
    let start = Instant::now();
    loop {
        let out = env.run(&["backup", &src, &env.remote("chain")]);
        if out.code() == 0 {
            break;
        }
        assert_eq!(out.code(), 6, "{}", out.stderr_text());
        assert!(start.elapsed() < Duration::from_secs(8), "the remote prune ran on without its client");
        std::thread::sleep(Duration::from_millis(300));
    }
    env.ok(&["restore", &env.remote("chain"), &env.path("r.img")]);
    assert_same(src.as_ref(), env.path("r.img").as_ref());
}

#[test]
fn an_interrupted_remote_sync_still_delivers_its_undo_log() {
    let Some(env) = Env::new() else { return };
    let (src, mirror) = (env.path("src.img"), env.path("mirror.img"));
    let old = random_bytes(32 * MIB, 110);
    write_file(src.as_ref(), &random_bytes(32 * MIB, 111));
    // Fetched to a local file, and kept on the mirror's host.
    for undo in [env.path("undo.delta"), env.remote("there.delta")] {
        write_file(mirror.as_ref(), &old);
        // Throttled, the sync takes 8 s; Ctrl-C comes once its first chunk has been written.
        let args: [&str; 7] = ["sync", "--bwlimit", "4M", "--undo", &undo, &src, &env.remote("mirror.img")];
        let (out, err) = env.interrupted_when(&args, "the mirror's first chunk changed", || {
            let mut start = vec![0; MIB];
            let file = std::fs::File::open(&mirror).unwrap();
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut start, 0).unwrap();
            start != old[..MIB]
        });
        assert_eq!(out.status.code(), Some(130), "{err}");
        assert_ne!(read(mirror.as_ref()), old, "part of the mirror was synced");
        env.ok(&["apply", &undo, &env.remote("mirror.img")]);
        assert!(read(mirror.as_ref()) == old, "rolled back byte for byte with {undo}");
    }
}

/// Remote syncs reported `bytes_read_source: 0` and "0 ranges": they now count what the peers
/// read and the ranges that differed, as a local sync does.
#[test]
fn remote_syncs_report_what_they_read_and_the_ranges_that_differed() {
    let Some(env) = Env::new() else { return };
    let src = env.path("src");
    let mut data = random_bytes(8 * MIB, 50);
    write_file(src.as_ref(), &data);
    // A fresh copy (the copy path), then an update of three ranges (the hash path).
    let fresh = env.ok(&["sync", &src, &env.remote("dst")]);
    assert_eq!(fresh["bytes_read_source"], 8 * MIB as u64, "{fresh}");
    assert!(fresh["ranges_differing"].as_u64().unwrap() >= 1, "{fresh}");
    for at in [MIB, 3 * MIB, 6 * MIB] {
        data[at..at + 10_000].copy_from_slice(&random_bytes(10_000, at as u64));
    }
    write_file(src.as_ref(), &data);
    write_file(env.path("local-copy").as_ref(), &read(env.path("dst").as_ref()));
    let local = ok(&["sync", "--json", &src, &env.path("local-copy")]).json();
    let remote = env.ok(&["sync", &src, &env.remote("dst")]);
    assert_eq!(remote["ranges_differing"], 3, "{remote}");
    assert_eq!(remote["ranges_differing"], local["ranges_differing"]);
    assert!(remote["bytes_read_source"].as_u64().unwrap() >= 8 * MIB as u64, "{remote}");
    assert!(remote["bytes_read_destination"].as_u64().unwrap() >= 8 * MIB as u64, "{remote}");
}

/// Files created on a remote host got mode 0600 whatever the source's permission bits were; a
/// local sync gives them the source's, and so do push and pull now.
#[test]
fn files_created_by_push_and_pull_get_the_source_permission_bits() {
    use std::os::unix::fs::PermissionsExt;
    let Some(env) = Env::new() else { return };
    let src = env.path("src");
    write_file(src.as_ref(), &random_bytes(MIB, 70));
    let mode = |p: &str| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    for bits in [0o644, 0o640] {
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(bits)).unwrap();
        let (pushed, pulled) = (env.path(&format!("pushed-{bits:o}")), env.path(&format!("pulled-{bits:o}")));
        env.ok(&["sync", &src, &env.remote(&format!("pushed-{bits:o}"))]);
        env.ok(&["sync", &env.remote("src"), &pulled]);
        assert_eq!(mode(&pushed), bits, "push");
        assert_eq!(mode(&pulled), bits, "pull");
    }
}

/// Backing up a different image into an existing chain across hosts was accepted as a 100 %
/// increment: another name and another size are refused there too, unless --force.
#[test]
fn a_different_image_is_refused_by_a_remote_chain_unless_forced() {
    let Some(env) = Env::new() else { return };
    let (a, b) = (env.path("a.img"), env.path("b.img"));
    write_file(a.as_ref(), &random_bytes(2 * MIB, 80));
    write_file(b.as_ref(), &random_bytes(3 * MIB, 81));
    env.ok(&["backup", &a, &env.remote("chain")]);
    let out = env.run(&["backup", &b, &env.remote("chain")]);
    assert_eq!(out.code(), 10, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("--force"), "{}", out.stderr_text());
    env.ok(&["backup", "--force", &b, &env.remote("chain")]);
    assert_eq!(ok(&["list", "--json", &env.path("chain")]).json()["points"].as_array().unwrap().len(), 2);
}

/// `--bwlimit` spares a production disk: it limited only the data that crossed the link, while
/// the far side's scan read the whole image at full speed. An unchanged 8 MiB image at 4 MiB/s
/// now takes at least the 2 s its reads are due in (a lower bound: a slow machine only adds).
#[test]
fn bwlimit_also_limits_the_scan_of_a_remote_source() {
    let Some(env) = Env::new() else { return };
    let (src, dst) = (env.path("src"), env.path("dst"));
    let data = random_bytes(8 * MIB, 95);
    write_file(src.as_ref(), &data);
    write_file(dst.as_ref(), &data);
    let started = std::time::Instant::now();
    env.ok(&["sync", "--bwlimit", "4M", &env.remote("src"), &dst]);
    let took = started.elapsed();
    assert!(took >= std::time::Duration::from_millis(1500), "8 MiB read at 4 MiB/s in {took:?}");
    assert_eq!(read(dst.as_ref()), data);
}

/// `HOST:` with an empty path is the remote home directory, as with scp and rsync: a file
/// there gets the source's name.
#[test]
fn an_empty_remote_path_is_the_home_directory() {
    let Some(env) = Env::new() else { return };
    let name = format!("blksync-home-test-{}.img", std::process::id());
    let src = env.path(&name);
    write_file(src.as_ref(), &random_bytes(MIB, 31));
    let home = std::path::PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()));
    let there = home.join(&name);
    let j = env.ok(&["sync", &src, "root@127.0.0.1:"]);
    let copied = std::fs::read(&there);
    let _ = std::fs::remove_file(&there);
    assert_eq!(copied.unwrap(), std::fs::read(&src).unwrap());
    assert!(j["destination"].as_str().unwrap().ends_with(&name), "{j}");
}

/// Issue 13, item 4: the first requests ride behind the bootstrap's first line instead of
/// waiting for the banner, and an upload (this test's cache is empty) gets them again after the
/// binary. What ssh was given on stdin is captured by a wrapper and decoded.
#[test]
fn first_requests_ride_with_the_bootstrap_and_survive_an_upload() {
    use blksync::protocol::Msg;
    let Some(env) = Env::new() else { return };
    let src = env.path("src");
    let dst = env.path("dst");
    write_file(src.as_ref(), &random_bytes(3 * MIB, 21));
    write_file(dst.as_ref(), &random_bytes(3 * MIB, 22));
    let capture = env.path("stdin");
    let rsh = format!("sh -c 'tee {capture} | exec {} \"$@\"' sh", env.rsh.replace('\'', ""));
    let out = run(&["sync", "-e", &rsh, "--progress=none", &src, &env.remote("dst")]);
    assert_eq!(out.code(), 0, "{}", out.stderr_text());
    assert_same(src.as_ref(), dst.as_ref());

    let bytes = read(capture.as_ref());
    let newline = bytes.iter().position(|&b| b == b'\n').unwrap();
    let line = std::str::from_utf8(&bytes[..newline]).unwrap();
    let len: usize = line.split(' ').nth(1).unwrap_or_else(|| panic!("{line:?}")).parse().unwrap();
    let preface = &bytes[newline + 1..newline + 1 + len];
    let decode = |mut bytes: &[u8]| {
        let mut msgs = Vec::new();
        let mut buf = Vec::new();
        while let Some(kind) = blksync::protocol::frame::read_frame(&mut bytes, &mut buf).unwrap() {
            msgs.push(Msg::decode(kind, &buf[1..]).unwrap());
        }
        msgs
    };
    let msgs = decode(preface);
    assert!(matches!(msgs[0], Msg::Hello { .. }), "{msgs:?}");
    assert!(matches!(&msgs[1], Msg::Open { path, .. } if path == dst.as_bytes()), "{msgs:?}");
    assert!(matches!(msgs[2], Msg::Scan { only_if_size: Some(s), .. } if s == 3 * MIB as u64), "{msgs:?}");
    // The upload: the binary, then the same frames again.
    let binary = std::fs::metadata(env!("CARGO_BIN_EXE_blksync")).unwrap().len() as usize;
    let again = newline + 1 + len + binary;
    assert_eq!(&bytes[again..again + len], preface);
}

/// Issue 13, item 2: a source here starts its scan behind its `Open`, before the remote target
/// has answered. When the target turns out to have another size (or not to exist), that scan is
/// not the one the pass needs, and the source is opened afresh: every case still ends equal.
#[test]
fn an_early_source_scan_is_used_or_replaced_whatever_the_target_turns_out_to_be() {
    let Some(env) = Env::new() else { return };
    let src = env.path("src");
    write_file(src.as_ref(), &random_bytes(5 * MIB + 4096, 31));
    for (name, dst) in
        [("same", Some(5 * MIB + 4096)), ("shorter", Some(3 * MIB)), ("longer", Some(9 * MIB)), ("missing", None)]
    {
        let path = env.path(name);
        if let Some(len) = dst {
            let mut bytes = read(src.as_ref());
            bytes.resize(len, 7);
            bytes[4096..8192].fill(9);
            write_file(path.as_ref(), &bytes);
        }
        let out = env.ok(&["sync", &src, &env.remote(name)]);
        assert_same(src.as_ref(), path.as_ref());
        if name == "same" {
            assert_eq!(out["bytes_written"].as_u64(), Some(4096), "{out}");
        }
    }
}
