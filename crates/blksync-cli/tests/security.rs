//! Attacks on how blksync reaches a remote host, over a real sshd on 127.0.0.1 (tests/lab/sshd):
//! the agent upload cache, addresses that look like ssh options, signals on a terminal, and a
//! wrong `--remote-path`. Each test is named after what broke (issue 8).

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::*;

const MIB: usize = 1 << 20;

/// A test directory whose remote side (the same host, through sshd) has its own upload cache,
/// `DIR/cache/blksync`.
struct Env(RemoteDir);

impl std::ops::Deref for Env {
    type Target = RemoteDir;
    fn deref(&self) -> &RemoteDir {
        &self.0
    }
}

impl Env {
    fn new() -> Option<Env> {
        RemoteDir::new("blksync-security").map(Env)
    }
    /// The remote upload cache, `$XDG_CACHE_HOME/blksync`.
    fn cache(&self) -> PathBuf {
        self.dir.path().join("cache/blksync")
    }
    /// `blksync COMMAND -e RSH --progress=none ARGS...`.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = support::blksync();
        command.args([args[0], "-e", &self.rsh, "--progress=none"]).args(&args[1..]);
        command
    }
    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running blksync")
    }
    /// A small source file, `src`.
    fn source(&self) -> String {
        let src = self.path("src");
        write_file(src.as_ref(), &random_bytes(MIB, 80));
        src
    }
}

/// The name this build's agent gets in the upload cache (`blksync-VERSION-HASH`), learnt from a
/// real upload into a cache of its own.
fn cached_name() -> String {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        let env = Env::new().expect("sshd");
        let src = env.source();
        let out = env.run(&["sync", &src, &env.remote("dst")]);
        assert_eq!(out.code(), 0, "{}", out.stderr_text());
        let names: Vec<String> =
            std::fs::read_dir(env.cache()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        names[0].clone()
    })
    .clone()
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A cache directory made by hand, as a user (or an attacker) would: `mode`, owned by root.
fn make_cache(env: &Env, mode: u32) -> PathBuf {
    let cache = env.cache();
    std::fs::create_dir_all(&cache).unwrap();
    chmod(&cache, mode);
    cache
}

#[test]
fn a_binary_planted_under_the_cache_name_is_not_run() {
    let Some(env) = Env::new() else { return };
    let name = cached_name();
    let cache = make_cache(&env, 0o700);
    let marker = env.dir.path().join("planted-agent-ran");
    let planted = cache.join(&name);
    // It even answers the protocol probe, as a hostile or stale agent would.
    let script = format!("#!/bin/sh\ntouch '{}'\necho {}\n", marker.display(), blksync::protocol::VERSION);
    let plant = || {
        std::fs::write(&planted, &script).unwrap();
        chmod(&planted, 0o755);
    };
    let src = env.source();
    // With uploads forbidden, nothing usable is left: refused, naming the file, not run.
    plant();
    let out = env.run(&["sync", "--no-upload", &src, &env.remote("dst")]);
    assert!(!marker.exists(), "the planted agent ran");
    assert_eq!(out.code(), 8, "{}", out.stderr_text());
    assert!(out.stderr_text().contains("does not match this blksync and was not run"), "{}", out.stderr_text());
    // With uploads allowed, it is replaced by our own binary, with a warning.
    let out = env.run(&["sync", &src, &env.remote("dst")]);
    assert_eq!(out.code(), 0, "{}", out.stderr_text());
    assert!(!marker.exists(), "the planted agent ran");
    assert!(
        out.stderr_text().contains("warning") && out.stderr_text().contains("did not match"),
        "{}",
        out.stderr_text()
    );
    assert!(read(&planted) == read(Path::new(env!("CARGO_BIN_EXE_blksync"))), "the cache holds our agent");
    assert_same(src.as_ref(), env.path("dst").as_ref());
    // A damaged copy of the real agent (same size) is not run either.
    let mut damaged = read(&planted);
    let at = damaged.len() / 2;
    damaged[at] ^= 1;
    // A new file, not a rewrite: the agent of the run before may still be exiting (ETXTBSY).
    std::fs::remove_file(&planted).unwrap();
    std::fs::write(&planted, &damaged).unwrap();
    chmod(&planted, 0o755);
    let out = env.run(&["sync", "--no-upload", &src, &env.remote("dst")]);
    assert_eq!(out.code(), 8, "{}", out.stderr_text());
}

#[test]
fn the_upload_does_not_write_through_a_symlink_planted_at_its_temporary_name() {
    let Some(env) = Env::new() else { return };
    let name = cached_name();
    let cache = make_cache(&env, 0o755);
    let victim = env.dir.path().join("victim");
    std::fs::write(&victim, "root's secret\n").unwrap();
    chmod(&victim, 0o600);
    // The old temporary name was `.NAME.PID`: plant one for every possible PID.
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    for pid in 1..=pid_max.min(1 << 16) {
        std::os::unix::fs::symlink(&victim, cache.join(format!(".{name}.{pid}"))).unwrap();
    }
    let src = env.source();
    let out = env.run(&["sync", &src, &env.remote("dst")]);
    assert_eq!(out.code(), 0, "{}", out.stderr_text());
    assert_same(src.as_ref(), env.path("dst").as_ref());
    assert!(read(&victim) == b"root's secret\n", "the victim was overwritten");
    assert_eq!(mode(&victim), 0o600, "the victim's mode changed");
    assert!(std::fs::symlink_metadata(cache.join(&name)).unwrap().file_type().is_file(), "the agent is a file");
    let left: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".upload"))
        .collect();
    assert!(left.is_empty(), "temporary directories left behind: {left:?}");
}

#[test]
fn a_cache_directory_others_could_write_is_refused() {
    let Some(env) = Env::new() else { return };
    let src = env.source();
    let cache = make_cache(&env, 0o700);
    let shown = cache.display().to_string();
    // The cache itself writable by others or by its group, or someone else's.
    for (mode, owner, expected) in [
        (0o777, 0, "is writable by group or others"),
        (0o770, 0, "is writable by group or others"),
        (0o700, 65534, "belongs to uid 65534"),
    ] {
        chmod(&cache, mode);
        std::os::unix::fs::chown(&cache, Some(owner), None).unwrap();
        let out = env.run(&["sync", &src, &env.remote("dst")]);
        let err = out.stderr_text();
        assert_eq!(out.code(), 8, "mode {mode:o}, owner {owner}: {err}");
        assert!(err.contains(&format!("{shown} {expected}")), "mode {mode:o}, owner {owner}: {err}");
        assert!(std::fs::read_dir(&cache).unwrap().next().is_none(), "nothing was stored in it");
    }
    std::os::unix::fs::chown(&cache, Some(0), None).unwrap();
    chmod(&cache, 0o700);
    // A directory above it that others can write (they could swap the cache for their own).
    let parent = cache.parent().unwrap();
    chmod(parent, 0o777);
    let out = env.run(&["sync", &src, &env.remote("dst")]);
    assert_eq!(out.code(), 8, "{}", out.stderr_text());
    assert!(out.stderr_text().contains(&format!("{} is writable by group or others", parent.display())));
    // Sticky, like /tmp: others cannot rename what is ours, so it is fine.
    chmod(parent, 0o1777);
    let out = env.run(&["sync", &src, &env.remote("dst")]);
    assert_eq!(out.code(), 0, "{}", out.stderr_text());
    assert_same(src.as_ref(), env.path("dst").as_ref());
}

#[test]
fn a_user_name_starting_with_a_dash_does_not_reach_ssh_as_an_option() {
    let Some(env) = Env::new() else { return };
    let src = env.source();
    // ssh would run the proxy command in our working directory; no slash, so that the scp-style
    // form stays remote.
    let marker = env.dir.path().join("proxy-command-ran");
    let inject = "-oProxyCommand=touch proxy-command-ran #";
    for address in
        [format!("ssh://{inject}@127.0.0.1{}", env.path("dst")), format!("{inject}@127.0.0.1:{}", env.path("dst"))]
    {
        // `--`: the scp-style form would otherwise stop at our own option parser.
        for args in [vec!["sync", "--", &src, &address], vec!["sync", "--", &address, &src]] {
            let out = env.command(&args).current_dir(env.dir.path()).output().unwrap();
            assert!(!marker.exists(), "{args:?} ran the ProxyCommand");
            // (OpenSSH 9.2 then happens to refuse our remote command as a host name, "hostname
            // contains invalid characters": still exit 8, the address taken as an option.)
            assert_eq!(out.code(), 2, "{args:?}: {}", out.stderr_text());
            assert!(out.stderr_text().contains(&address), "the error names the address: {}", out.stderr_text());
            assert!(!marker.exists(), "{args:?} ran the ProxyCommand");
        }
    }
    // A host starting with a dash is refused in the same way.
    let out = env.run(&["sync", &src, "root@-oProxyCommand=x:/tmp/dst"]);
    assert_eq!(out.code(), 2, "{}", out.stderr_text());
}

/// Waits until `path` has data blocks (the sync has written some), at most 30 s.
fn wait_for_data(path: &Path, child: &mut std::process::Child) {
    let start = Instant::now();
    while std::fs::metadata(path).map_or(0, |m| m.blocks()) == 0 {
        assert!(child.try_wait().unwrap().is_none(), "blksync ended before writing anything");
        assert!(start.elapsed() < Duration::from_secs(30), "nothing reached {}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn ctrl_c_on_a_terminal_reaches_ssh_too_and_the_push_still_exits_130_in_sync() {
    let Some(env) = Env::new() else { return };
    let src = env.path("src");
    let data = random_bytes(32 * MIB, 81);
    write_file(src.as_ref(), &data);
    // Install the agent first, so every run below starts sending at once.
    assert_eq!(env.run(&["sync", &src, &env.remote("warmup")]).code(), 0);
    for run in 0..6 {
        let dst = env.path(&format!("dst{run}"));
        // A terminal's Ctrl-C signals its whole foreground process group: blksync and ssh.
        let mut child = env
            .command(&["sync", "--bwlimit", "8M", &src, &env.remote(&format!("dst{run}"))])
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_data(dst.as_ref(), &mut child);
        let group = format!("-{}", child.id());
        let sent = Command::new("kill").args(["-INT", "--", &group]).status().unwrap();
        assert!(sent.success());
        let out = child.wait_with_output().unwrap();
        let err = out.stderr_text();
        assert_eq!(out.code(), 130, "run {run}: {err}");
        let done: usize = err
            .split("the first ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("run {run}: no in-sync report: {err}"));
        assert!(err.contains("are in sync"), "run {run}: {err}");
        assert!(read(dst.as_ref())[..done] == data[..done], "run {run}: the synced prefix is correct");
    }
}

#[test]
fn a_remote_path_that_is_not_usable_is_named_in_one_warning() {
    let Some(env) = Env::new() else { return };
    let src = env.source();
    let missing = env.path("no-such-blksync");
    let warnings = |out: &Output| -> Vec<String> {
        out.stderr_text().lines().filter(|l| l.contains("warning")).map(str::to_string).collect()
    };
    let out = env.run(&["sync", "--remote-path", &missing, &src, &env.remote("dst")]);
    assert_eq!(out.code(), 0, "{}", out.stderr_text());
    let w = warnings(&out);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains(&format!("--remote-path {missing} is not usable")), "{w:?}");
    assert!(w[0].contains("uploaded its own agent instead"), "{w:?}");
    // The next run reuses the uploaded agent instead of uploading again, and says so, once, even
    // with two connections (remote to remote).
    let cached = env.cache().join(cached_name());
    let mtime = std::fs::metadata(&cached).unwrap().modified().unwrap();
    let args = ["sync", "--remote-path", &missing, "--source-ssh-opt", "-oConnectTimeout=30"];
    let out = env.run(&[&args[..], &[&env.remote("src"), &env.remote("dst2")]].concat());
    assert_eq!(out.code(), 0, "{}", out.stderr_text());
    let w = warnings(&out);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("from the upload cache"), "{w:?}");
    assert_eq!(std::fs::metadata(&cached).unwrap().modified().unwrap(), mtime, "no second upload");
    assert_same(src.as_ref(), env.path("dst2").as_ref());
    // A blksync of another protocol is named as such.
    let old = env.path("old-blksync");
    std::fs::write(&old, "#!/bin/sh\n[ \"$1 $2\" = \"agent --protocol\" ] && echo 0\n").unwrap();
    chmod(old.as_ref(), 0o755);
    let out = env.run(&["sync", "--remote-path", &old, &src, &env.remote("dst")]);
    assert_eq!(out.code(), 0, "{}", out.stderr_text());
    let w = warnings(&out);
    assert!(w.len() == 1 && w[0].contains("it speaks protocol 0"), "{w:?}");
    // A working --remote-path gets no warning.
    let out = env.run(&["sync", "--remote-path", &cached.display().to_string(), &src, &env.remote("dst")]);
    assert_eq!(out.code(), 0, "{}", out.stderr_text());
    assert_eq!(warnings(&out), Vec::<String>::new());
}
