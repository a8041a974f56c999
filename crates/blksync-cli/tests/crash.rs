//! Crash tests: commands killed (or failing) at random moments must leave history that is
//! either complete and correct or absent, never a point, delta or log that claims content that
//! never existed. Each test runs 30 or more random kill points; the seed is printed so that a
//! failure can be replayed (`BLKSYNC_CRASH_SEED`).

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::*;
use tempfile::TempDir;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// Kill points per test.
const ROUNDS: usize = 30;

/// A small xorshift generator, seeded from the clock or `BLKSYNC_CRASH_SEED`, that also counts
/// the kills that landed while the command was running (printed when the test ends).
struct Rng(u64, &'static str, usize, usize);

impl Drop for Rng {
    fn drop(&mut self) {
        eprintln!("{}: {} kill points, {} of them while the command was running", self.1, self.2, self.3);
    }
}

impl Rng {
    fn new(test: &'static str) -> Rng {
        let seed = std::env::var("BLKSYNC_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        });
        eprintln!("{test}: BLKSYNC_CRASH_SEED={seed}");
        Rng(seed | 1, test, 0, 0)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Overwrites a few random pieces of `data` with fresh bytes.
    fn mutate(&mut self, data: &mut [u8]) {
        for _ in 0..=self.below(8) {
            let len = (1 + self.below(256)) as usize * KIB;
            let at = self.below((data.len() - len) as u64) as usize;
            let seed = self.next();
            data[at..at + len].copy_from_slice(&random_bytes(len, seed));
        }
    }
}

struct Env {
    dir: TempDir,
    rsh: Option<String>,
}

impl Env {
    fn local() -> Env {
        Env { dir: tempfile::Builder::new().prefix("blksync-crash").tempdir().unwrap(), rsh: None }
    }
    fn remote() -> Option<Env> {
        let mut env = Env::local();
        env.rsh = Some(rsh(&env.dir.path().join("cache"))?);
        Some(env)
    }
    fn path(&self, name: &str) -> String {
        arg(self.dir.path(), name)
    }
    fn remote_path(&self, name: &str) -> String {
        format!("root@127.0.0.1:{}", self.path(name))
    }
    fn command(&self, args: &[&str]) -> Command {
        let mut command = support::blksync();
        command.arg(args[0]);
        if let Some(rsh) = &self.rsh {
            command.args(["-e", rsh]);
        }
        if !["info", "list"].contains(&args[0]) {
            command.args(["--progress=none"]);
        }
        command.args(&args[1..]);
        command
    }
    #[track_caller]
    fn ok(&self, args: &[&str]) -> std::process::Output {
        let out = self.command(args).output().unwrap();
        assert_eq!(out.code(), 0, "blksync {args:?} failed:\n{}", out.stderr_text());
        out
    }
    fn spawn(&self, args: &[&str]) -> Child {
        self.command(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
    }
    /// Kills this test's remote agents (by their upload-cache path).
    fn kill_agents(&self) {
        let pattern = format!("{}/cache/blksync/blksync-.* agent", self.dir.path().display());
        let _ = Command::new("pkill").args(["-KILL", "-f", &pattern]).status();
    }
    fn points(chain: &str) -> usize {
        let out = support::run(&["list", "--json", chain]);
        // No directory, or one a killed first backup left empty: no points.
        if out.code() != 0 && (!Path::new(chain).exists() || out.stderr_text().contains("holds no backup")) {
            return 0;
        }
        assert_eq!(out.code(), 0, "list {chain}: {}", out.stderr_text());
        out.json()["points"].as_array().unwrap().len()
    }
    /// Restores every point of a local chain and compares it with what the source held when that
    /// point was made.
    #[track_caller]
    fn check_points(&self, chain: &str, expected: &[Vec<u8>]) {
        assert_eq!(Env::points(chain), expected.len(), "points in {chain}");
        let out = support::run(&["list", "--verify", chain]);
        assert_eq!(out.code(), 0, "list --verify {chain}: {}", out.stderr_text());
        let restored = self.path("restored");
        for (i, data) in expected.iter().enumerate() {
            let _ = std::fs::remove_file(&restored);
            ok(&["restore", "-q", "--at", &i.to_string(), chain, &restored]);
            assert!(read(restored.as_ref()) == *data, "point {i} of {chain} is not what the source held");
        }
    }
}

/// Waits a random moment (up to `max_ms`), kills, and waits for the command to end.
fn kill_at_random(rng: &mut Rng, child: Child, max_ms: u64, kill: impl FnOnce(&Child)) -> std::process::Output {
    std::thread::sleep(Duration::from_millis(rng.below(max_ms)));
    let mut child = child;
    rng.2 += 1;
    if child.try_wait().unwrap().is_none() {
        rng.3 += 1;
    }
    kill(&child);
    child.wait_with_output().unwrap()
}

/// Runs `ROUNDS` backups of a changing image, each killed at a random moment by `kill`, and
/// checks that every point the chain holds restores to the source's content at that time.
/// `bwlimit` slows the part of the run that is worth killing: a push reads the source here
/// (throttled as it is read), a pull receives only changed data (throttled as it arrives).
fn backups_killed_at_random(env: &Env, test: &'static str, (source, chain): (&str, &str), bwlimit: &str) {
    let mut rng = Rng::new(test);
    let src = env.path("src");
    let mut data = random_bytes(4 * MIB, rng.next());
    let mut expected = Vec::new();
    let local_chain = env.path("chain");
    for _ in 0..ROUNDS {
        rng.mutate(&mut data);
        write_file(src.as_ref(), &data);
        let before = Env::points(&local_chain);
        let child = env.spawn(&["backup", "--bwlimit", bwlimit, source, chain]);
        let out = kill_at_random(&mut rng, child, 1200, |_| env.kill_agents());
        let after = Env::points(&local_chain);
        eprintln!("exit {}, points {before} -> {after}: {}", out.code(), out.stderr_text().trim());
        if out.code() == 0 {
            assert_eq!(after, before + 1, "a successful backup adds one point");
        } else {
            // Killed after its commit, the point is complete; before it, there is none.
            assert!(after == before || after == before + 1, "{after} points after {before}");
        }
        if after > before {
            expected.push(data.clone());
        }
        assert!(temporary_files(local_chain.as_ref()).is_empty() || out.code() != 0);
    }
    env.check_points(&local_chain, &expected);
}

#[test]
fn remote_push_backups_killed_at_random_never_commit_a_partial_point() {
    let Some(env) = Env::remote() else { return };
    let (src, chain) = (env.path("src"), env.remote_path("chain"));
    backups_killed_at_random(&env, "push", (&src, &chain), "2M");
}

#[test]
fn remote_pull_backups_killed_at_random_never_commit_a_partial_point() {
    let Some(env) = Env::remote() else { return };
    let (src, chain) = (env.remote_path("src"), env.path("chain"));
    backups_killed_at_random(&env, "pull", (&src, &chain), "2M");
}

/// A source that fails part way (here: it shrinks under a push backup and a remote diff) ends
/// the command with an error and leaves no point and no delta.
#[test]
fn a_source_that_fails_mid_transfer_leaves_no_point_and_no_delta() {
    let Some(env) = Env::remote() else { return };
    let src = env.path("src");
    let data = random_bytes(8 * MIB, 5);
    write_file(src.as_ref(), &data);
    let remote_chain = env.remote_path("chain");
    env.ok(&["backup", &src, &remote_chain]);
    write_file(env.path("base").as_ref(), &random_bytes(8 * MIB, 6));
    let (remote_src, base, delta) = (env.remote_path("src"), env.path("base"), env.path("d"));
    for (what, args) in [
        ("push backup", vec!["backup", "--bwlimit", "2M", &src, &remote_chain]),
        ("remote diff", vec!["diff", "--bwlimit", "2M", &remote_src, &base, "-o", &delta]),
    ] {
        write_file(src.as_ref(), &random_bytes(8 * MIB, 7));
        let mut child = env.spawn(&args);
        // Shrink the source once the command is writing its output (its temporary file exists).
        wait_until(|| {
            !temporary_files(env.dir.path()).is_empty()
                || !temporary_files(env.path("chain").as_ref()).is_empty()
                || child.try_wait().unwrap().is_some()
        });
        std::fs::OpenOptions::new().write(true).open(&src).unwrap().set_len(MIB as u64).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_ne!(out.code(), 0, "{what} of a shrinking source succeeded");
        assert_eq!(Env::points(&env.path("chain")), 1, "{what} committed a point");
        assert!(!Path::new(&env.path("d")).exists(), "{what} committed a delta");
    }
    env.check_points(&env.path("chain"), &[data]);
}

/// Polls `done` (an event we cannot wait on directly) every few milliseconds, for a minute at
/// most.
fn wait_until(mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The undo log of a destination, whichever form a run left: committed, or `.partial` after a
/// kill or a full disk. `None` when no log was started (the destination was not touched).
fn undo_log(path: &str) -> Option<String> {
    let partial = format!("{path}.partial");
    match (Path::new(path).exists(), Path::new(&partial).exists()) {
        (true, false) => Some(path.to_string()),
        (false, true) => Some(partial),
        (false, false) => None,
        (true, true) => panic!("both {path} and its .partial exist"),
    }
}

/// Rolls `mirror` back with whatever undo log the run left, and checks it holds `before`.
#[track_caller]
fn rolls_back(mirror: &str, log: &str, before: &[u8], what: &str) {
    if let Some(log) = undo_log(log) {
        let out = support::run(&["apply", "-q", &log, mirror]);
        assert_eq!(out.code(), 0, "{what}: apply {log}: {}", out.stderr_text());
        std::fs::remove_file(&log).unwrap();
    }
    assert!(read(mirror.as_ref()) == before, "{what}: the undo log did not restore the mirror's earlier bytes");
}

/// `sync --undo` killed with SIGKILL at random moments, onto destinations that stay the same
/// size, grow and shrink: the log it leaves always rolls the destination back exactly.
#[test]
fn sync_undo_killed_at_random_always_leaves_a_log_that_rolls_back() {
    let env = Env::local();
    let mut rng = Rng::new("undo");
    let (src, mirror, log) = (env.path("src"), env.path("mirror"), env.path("undo.delta"));
    for round in 0..ROUNDS {
        let size = 6 * MIB;
        let mut old = random_bytes(size, rng.next());
        old[MIB..2 * MIB].fill(0);
        write_file(mirror.as_ref(), &old);
        let mut new = old.clone();
        rng.mutate(&mut new);
        new[3 * MIB..3 * MIB + 300 * KIB].fill(0);
        match round % 3 {
            1 => new.extend_from_slice(&random_bytes(MIB + 17, rng.next())),
            2 => new.truncate(size - MIB - 4095),
            _ => {}
        }
        write_file(src.as_ref(), &new);
        let child = env.spawn(&["sync", "--bwlimit", "16M", &src, &mirror, "--undo", &log]);
        let out = kill_at_random(&mut rng, child, 500, |c| {
            let _ = Command::new("kill").args(["-KILL", &c.id().to_string()]).status();
        });
        if out.code() == 0 {
            assert!(read(mirror.as_ref()) == new, "a completed sync");
        }
        rolls_back(&mirror, &log, &old, &format!("round {round}"));
    }
}

/// The undo log on a small full filesystem: the sync stops before it overwrites what the log
/// could not save, and the log it leaves rolls the destination back exactly.
#[test]
fn sync_undo_with_its_log_on_a_full_filesystem_stays_reversible() {
    if !can_use_loop_devices() {
        return;
    }
    let env = Env::local();
    let (src, mirror) = (env.path("src"), env.path("mirror"));
    let old = random_bytes(16 * MIB, 40);
    for (i, tmpfs) in ["1m", "2m", "4m", "6m"].iter().enumerate() {
        let dir = env.dir.path().join(format!("small{i}"));
        let _mount = Mount::new(&dir, &["-t", "tmpfs", "-o", &format!("size={tmpfs}"), "tmpfs"]);
        let log = dir.join("undo.delta").to_str().unwrap().to_string();
        write_file(mirror.as_ref(), &old);
        // Every block differs and nothing compresses: the log needs 16 MiB.
        let mut new = random_bytes(16 * MIB, 41 + i as u64);
        if i % 2 == 1 {
            new.truncate(8 * MIB); // a shrink: the cut tail goes into the log first
        }
        write_file(src.as_ref(), &new);
        let out = env.command(&["sync", &src, &mirror, "--undo", &log]).output().unwrap();
        assert_eq!(out.code(), 4, "tmpfs {tmpfs}: {}", out.stderr_text());
        let err = out.stderr_text();
        assert!(err.contains("apply") || err.contains("nothing was changed"), "the error says what to do: {err}");
        // Apply needs room of its own only on the destination's filesystem.
        rolls_back(&mirror, &log, &old, &format!("tmpfs {tmpfs}"));
    }
}

/// The remote agent killed during a push with `--undo` on the destination's host: the log left
/// there rolls the mirror back.
#[test]
fn remote_sync_undo_with_a_killed_agent_leaves_a_log_that_rolls_back() {
    let Some(env) = Env::remote() else { return };
    let mut rng = Rng::new("remote undo");
    let (src, mirror, log) = (env.path("src"), env.path("mirror"), env.path("undo.delta"));
    for round in 0..ROUNDS {
        let mut old = random_bytes(4 * MIB, rng.next());
        old[..MIB].fill(0);
        write_file(mirror.as_ref(), &old);
        let mut new = old.clone();
        for _ in 0..4 {
            rng.mutate(&mut new);
        }
        if round % 3 == 1 {
            new.truncate(3 * MIB + 5);
        }
        write_file(src.as_ref(), &new);
        let (remote_mirror, remote_log) = (env.remote_path("mirror"), env.remote_path("undo.delta"));
        let child = env.spawn(&["sync", "--bwlimit", "4M", &src, &remote_mirror, "--undo", &remote_log]);
        let out = kill_at_random(&mut rng, child, 1200, |_| env.kill_agents());
        if out.code() == 0 {
            assert!(read(mirror.as_ref()) == new, "a completed sync");
        }
        rolls_back(&mirror, &log, &old, &format!("round {round}: {}", out.stderr_text().trim()));
    }
}

/// `apply` killed at random moments: a rerun finishes the job (no "not what the delta was made
/// against"), and nothing is damaged on the way.
#[test]
fn apply_killed_at_random_is_finished_by_a_rerun() {
    let env = Env::local();
    let mut rng = Rng::new("apply");
    let (old_path, new_path, target, delta) =
        (env.path("old"), env.path("new"), env.path("target"), env.path("p.delta"));
    for round in 0..ROUNDS {
        let old = random_bytes(8 * MIB, rng.next());
        let mut new = old.clone();
        for _ in 0..6 {
            rng.mutate(&mut new);
        }
        new[5 * MIB..6 * MIB].fill(0);
        write_file(old_path.as_ref(), &old);
        write_file(new_path.as_ref(), &new);
        let _ = std::fs::remove_file(&delta);
        env.ok(&["diff", &new_path, &old_path, "-o", &delta]);
        write_file(target.as_ref(), &old);
        let child = env.spawn(&["apply", &delta, &target]);
        let out = kill_at_random(&mut rng, child, 60, |c| {
            let _ = Command::new("kill").args(["-KILL", &c.id().to_string()]).status();
        });
        if out.code() != 0 {
            let again = support::run(&["apply", "-q", &delta, &target]);
            // A kill that landed after the last write was flushed and the resume marker removed
            // (as the process exited) leaves a target that is done: "applied before" is then
            // the truth, and the only other answer a rerun may give.
            let done = again.code() == 10 && again.stderr_text().contains("applied before");
            assert!(
                again.code() == 0 || done && read(target.as_ref()) == new,
                "round {round}: the rerun refused: {}",
                again.stderr_text()
            );
        }
        assert!(read(target.as_ref()) == new, "round {round}: the target is not the new image");
        let twice = support::run(&["apply", "-q", &delta, &target]);
        assert_eq!(twice.code(), 10, "round {round}: applying twice is refused: {}", twice.stderr_text());
    }
}

/// `prune` killed with SIGKILL at random moments (it folds into the base in place, with a
/// journal): afterwards `list --verify` passes and every point listed restores to what the
/// source held when it was made.
#[test]
fn prune_killed_at_random_keeps_every_point_restorable() {
    let env = Env::local();
    let mut rng = Rng::new("prune");
    let (src, chain) = (env.path("src"), env.path("chain"));
    for round in 0..ROUNDS {
        let _ = std::fs::remove_dir_all(&chain);
        let mut data = random_bytes(6 * MIB, rng.next());
        data[2 * MIB..3 * MIB].fill(0);
        let mut states = Vec::new();
        for i in 0..5 {
            rng.mutate(&mut data);
            match (round % 3, i) {
                (1, 2) => data.extend_from_slice(&random_bytes(MIB + 3, rng.next())),
                (2, 3) => data.truncate(data.len() - 2 * MIB - 7),
                _ => {}
            }
            write_file(src.as_ref(), &data);
            // Every other round keeps its base compressed: the fold and its journal's replay
            // then go through the image's own commits.
            if i == 0 && round % 2 == 1 {
                env.ok(&["backup", "-q", "--compress", &src, &chain]);
            } else {
                env.ok(&["backup", "-q", &src, &chain]);
            }
            states.push(data.clone());
        }
        let child = env.spawn(&["prune", "--keep", "1", "--bwlimit", "16M", &chain]);
        let out = kill_at_random(&mut rng, child, 400, |c| {
            let _ = Command::new("kill").args(["-KILL", &c.id().to_string()]).status();
        });
        let journal = Path::new(&chain).join("prune.journal").exists();
        eprintln!("round {round}: prune exit {}, journal left: {journal}", out.code());
        let verified = support::run(&["list", "--verify", &chain]);
        assert_eq!(verified.code(), 0, "round {round} (prune exit {}): {}", out.code(), verified.stderr_text());
        let listed = support::run(&["list", "--json", &chain]).json();
        let points: Vec<u64> =
            listed["points"].as_array().unwrap().iter().map(|p| p["number"].as_u64().unwrap()).collect();
        assert!(points == [0, 1, 2, 3, 4] || points == [3, 4], "round {round}: points {points:?}");
        if out.code() == 0 {
            assert_eq!(points, [3, 4], "round {round}: a completed prune");
        }
        let restored = env.path("restored");
        for &n in &points {
            let _ = std::fs::remove_file(&restored);
            env.ok(&["restore", "-q", "--at", &n.to_string(), &chain, &restored]);
            assert!(read(restored.as_ref()) == states[n as usize], "round {round}: point {n}");
        }
        assert!(!Path::new(&chain).join("prune.journal").exists(), "round {round}: the journal was dealt with");
    }
}

/// `restore` to a new file, interrupted (SIGINT) at random moments: what it says holds. An
/// interrupted restore keeps what it wrote and a rerun finishes it; a restore that failed
/// leaves no file.
#[test]
fn an_interrupted_restore_keeps_what_it_says_it_kept() {
    let env = Env::local();
    let mut rng = Rng::new("restore");
    let (src, chain, out) = (env.path("src"), env.path("chain"), env.path("out.img"));
    let mut data = random_bytes(24 * MIB, rng.next());
    data[8 * MIB..9 * MIB].fill(0);
    write_file(src.as_ref(), &data);
    env.ok(&["backup", "-q", &src, &chain]);
    for round in 0..ROUNDS {
        let _ = std::fs::remove_file(&out);
        let child = env.spawn(&["restore", &chain, &out]);
        let done = kill_at_random(&mut rng, child, 150, |c| {
            let _ = Command::new("kill").args(["-INT", &c.id().to_string()]).status();
        });
        let err = done.stderr_text();
        match done.code() {
            0 => assert!(read(out.as_ref()) == data, "round {round}"),
            130 => {
                assert!(err.contains("run it again"), "round {round}: {err}");
                assert!(Path::new(&out).exists(), "round {round}: it says run it again, but removed the file: {err}");
                env.ok(&["restore", "-q", &chain, &out]);
                assert!(read(out.as_ref()) == data, "round {round}: the rerun finished it");
            }
            // Killed by the signal itself: it came before the process could catch it (while
            // it was being loaded), so nothing was started.
            -1 => assert!(!Path::new(&out).exists(), "round {round}: killed before it started, yet {out} exists"),
            code => panic!("round {round}: exit {code}: {err}"),
        }
    }
}

/// A `sync --undo` killed as its log was created left an empty `FILE.partial`, which `apply`
/// refused as too short: nothing had been overwritten, so it rolls back nothing, successfully.
#[test]
fn an_undo_log_cut_off_before_its_header_rolls_back_nothing() {
    let env = Env::local();
    let (mirror, log) = (env.path("mirror"), env.path("undo.delta.partial"));
    let data = random_bytes(MIB, 90);
    write_file(mirror.as_ref(), &data);
    for cut in [0, 10, 60] {
        write_file(log.as_ref(), &b"BLKSYNC-DELTA\0\0\0\x01\0\0\0\x40\0\0\0"[..cut.min(24)]);
        env.ok(&["apply", "-q", &log, &mirror]);
        assert!(read(mirror.as_ref()) == data);
    }
}
