//! Helpers for the integration tests: run the real binary on real files, loop devices and
//! mounts in a temporary directory.

#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A `blksync` command.
pub fn blksync() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_blksync"));
    cmd.env_remove("RUST_BACKTRACE");
    cmd
}

/// Runs `blksync ARGS...` and returns its output.
pub fn run(args: &[&str]) -> Output {
    blksync().args(args).output().expect("running blksync")
}

/// Exit code, stdout and stderr of an output, for assertions.
pub trait OutputExt {
    fn code(&self) -> i32;
    fn stdout_text(&self) -> String;
    fn stderr_text(&self) -> String;
    fn json(&self) -> serde_json::Value;
}

impl OutputExt for Output {
    fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
    fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.stdout).unwrap_or_else(|e| {
            panic!("stdout is not JSON ({e}): {}\nstderr: {}", self.stdout_text(), self.stderr_text())
        })
    }
}

/// Asserts success and returns the output.
#[track_caller]
pub fn ok(args: &[&str]) -> Output {
    let out = run(args);
    assert_eq!(out.code(), 0, "blksync {args:?} failed:\n{}", out.stderr_text());
    out
}

/// Names of the temporary files (`NAME.tmp-PID`) left in `dir`; none if `dir` does not exist
/// (a first backup killed before it made its chain's directory).
pub fn temporary_files(dir: &Path) -> Vec<String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.contains(".tmp-")).collect()
}

/// Deterministic pseudo-random bytes (xorshift64*), incompressible enough for tests.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `data` to a new file.
pub fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

/// Overwrites `data` at `offset` in an existing file.
pub fn patch(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
}

/// Bytes allocated on disk for a file.
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Reads a whole file or device.
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Asserts two files or devices hold the same bytes, naming the first difference.
#[track_caller]
pub fn assert_same(a: &Path, b: &Path) {
    let (x, y) = (read(a), read(b));
    assert_eq!(x.len(), y.len(), "{} and {} differ in size", a.display(), b.display());
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ first at byte {i}", a.display(), b.display());
    }
}

/// True when we can use loop devices and mounts (root, /dev/loop-control, losetup).
pub fn can_use_loop_devices() -> bool {
    let root = rustix_is_root();
    let ok = root
        && Path::new("/dev/loop-control").exists()
        && Command::new("losetup").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipping: this test needs root, /dev/loop-control and losetup");
    }
    ok
}

fn rustix_is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A loop device over a backing file, detached on drop.
pub struct Loop {
    pub dev: PathBuf,
}

impl Loop {
    /// Attaches `backing` to a free loop device.
    pub fn attach(backing: &Path) -> Loop {
        let out = Command::new("losetup").args(["--find", "--show"]).arg(backing).output().unwrap();
        assert!(out.status.success(), "losetup failed: {}", String::from_utf8_lossy(&out.stderr));
        Loop { dev: PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()) }
    }

    pub fn path(&self) -> &str {
        self.dev.to_str().unwrap()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A mounted filesystem, unmounted on drop.
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    /// Runs `mount ARGS... DIR`.
    pub fn new(dir: &Path, args: &[&str]) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount").args(args).arg(dir).output().unwrap();
        assert!(out.status.success(), "mount {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        Mount { dir: dir.to_path_buf() }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// `image` (an ext filesystem) mounted on a loop device, changed by `work` (given the mount
/// point; what it returns, open files, is kept until the copy is made), its journal committed
/// by fsync of a file written last (which writes no metadata home), then copied sparsely to
/// `snap` while still mounted: a snapshot whose journal needs recovery, as of a running
/// machine's disk or a VM's, taken without freezing.
pub fn snapshot_while_mounted<T>(image: &Path, snap: &Path, work: impl FnOnce(&Path) -> T) {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    let mount = Mount::new(&mnt, &["-o", "loop,noatime", image.to_str().unwrap()]);
    let held = work(&mount.dir);
    let last = mount.dir.join("written-last");
    write_file(&last, b"committed with everything before it\n");
    File::open(&last).unwrap().sync_all().unwrap();
    tool("cp", &["--sparse=always", image.to_str().unwrap(), snap.to_str().unwrap()]);
    drop(held);
    drop(mount);
    let header = tool("dumpe2fs", &["-h", snap.to_str().unwrap()]);
    assert!(header.contains("needs_recovery"), "{header}");
    let start = header.lines().find_map(|l| l.strip_prefix("Journal start:")).unwrap().trim();
    assert_ne!(start, "0", "the snapshot's journal is empty");
}

/// Makes an ext4 filesystem on `target` quietly.
pub fn mkfs_ext4(target: &Path) {
    // No lazy init: a background thread would otherwise write to the device after mount.
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(target)
        .output()
        .unwrap();
    assert!(out.status.success(), "mkfs.ext4 failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A file of `size` bytes holding `data` at each `(offset, data)`, holes elsewhere.
pub fn sparse_file(path: &Path, size: u64, pieces: &[(u64, &[u8])]) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (offset, data) in pieces {
        f.write_all_at(data, *offset).unwrap();
    }
}

/// A path inside `dir` as a `&str` argument.
pub fn arg(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_string()
}

/// ssh options for the test sshd, started once per test binary by tests/lab/sshd (and stopped
/// by its watchdog when the test process exits). `None` (with a message) where it cannot run.
pub fn sshd_options() -> Option<String> {
    static SSHD: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    SSHD.get_or_init(|| {
        if !rustix_is_root() || !Path::new("/usr/sbin/sshd").exists() {
            eprintln!("skipping: remote tests need root and openssh-server");
            return None;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/lab/sshd");
        // A free port is asked of the kernel and released for sshd, so another socket (an ssh
        // client's of a test running alongside) may take it first: then sshd cannot bind it and
        // exits, and another port is tried.
        let mut failures = Vec::new();
        for attempt in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
            let dir = std::env::temp_dir().join(format!("blksync-test-sshd-{}-{attempt}", std::process::id()));
            let out = Command::new(&script)
                .args([
                    "start",
                    "--dir",
                    dir.to_str()?,
                    "--port",
                    &port.to_string(),
                    "--owner",
                    &std::process::id().to_string(),
                ])
                .output()
                .ok()?;
            if out.status.success() {
                return Some(String::from_utf8(out.stdout).ok()?.trim().to_string());
            }
            failures.push(format!("port {port}: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        panic!("tests/lab/sshd failed five times: {}", failures.join("; "))
    })
    .clone()
}

/// `-e "ssh ... -o SetEnv=XDG_CACHE_HOME=cache"`: each test gets its own remote upload cache.
pub fn rsh(cache: &Path) -> Option<String> {
    Some(format!("ssh {} -o SetEnv=XDG_CACHE_HOME={}", sshd_options()?, cache.display()))
}

/// A test directory whose remote side (this host, through the test sshd) has its own upload
/// cache, `DIR/cache/blksync`: the first connection of each test exercises the upload. `None`
/// (with a message) where sshd cannot run.
pub struct RemoteDir {
    pub dir: tempfile::TempDir,
    /// The `-e` value reaching the test sshd with that cache.
    pub rsh: String,
}

impl RemoteDir {
    pub fn new(prefix: &str) -> Option<RemoteDir> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        let rsh = rsh(&dir.path().join("cache"))?;
        Some(RemoteDir { dir, rsh })
    }
    /// A path in the directory, as an argument.
    pub fn path(&self, name: &str) -> String {
        arg(self.dir.path(), name)
    }
    /// The same path, through sshd.
    pub fn remote(&self, name: &str) -> String {
        format!("root@127.0.0.1:{}", self.path(name))
    }
}

/// Polls `ready` until it holds, for the event a test waits for before it interrupts or kills
/// `child`. Fails if `child` ends first (the event came too late: the kill would not land
/// mid-run), or after a minute.
#[track_caller]
pub fn wait_until(child: &mut std::process::Child, what: &str, mut ready: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !ready() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
            }
            panic!("the run ended ({status}) before {what}: {err}");
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(60), "waited a minute for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// True when `tool` runs here; otherwise the test prints `skipping` and passes, unless CI set
/// `BLKSYNC_REQUIRE_NBD=1`, which makes the missing tool a failure.
pub fn have_nbd_tool(tool: &str) -> bool {
    let found = Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var("BLKSYNC_REQUIRE_NBD").as_deref() != Ok("1"), "{tool} is not installed");
        eprintln!("skipping: {tool} is not installed");
    }
    found
}

/// An NBD server started by `tests/lab/nbd` in `DIR/lab`, stopped on drop.
pub struct NbdServer {
    pub uri: String,
    lab: PathBuf,
}

impl NbdServer {
    /// `tests/lab/nbd start --dir DIR/lab ARGS…`; the server accepts when this returns.
    pub fn start(dir: &Path, args: &[&str]) -> NbdServer {
        let lab = dir.join("lab");
        let out = Command::new(lab_script("nbd")).arg("start").arg("--dir").arg(&lab).args(args).output().unwrap();
        assert!(out.status.success(), "tests/lab/nbd start {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let uri = text.lines().find_map(|l| l.strip_prefix("LAB_NBD_URI=")).expect("LAB_NBD_URI");
        NbdServer { uri: uri.trim_matches('\'').to_string(), lab }
    }

    /// Stops it now (the drop does the same).
    pub fn stop(&self) {
        let _ = Command::new(lab_script("nbd")).arg("stop").arg("--dir").arg(&self.lab).status();
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A script of tests/lab.
pub fn lab_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/lab").join(name)
}

/// Starts `blksync serve ARGS…` and returns it with the address it printed on stdout, once it
/// listens (it prints the address only then).
pub fn start_serve(args: &[&str]) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = blksync()
        .arg("serve")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert!(!line.is_empty(), "serve printed no address");
    (child, line.trim().to_string())
}

/// Whether `tool` is installed; says "skipping" when it is not, for a test that then returns.
pub fn have(tool: &str) -> bool {
    let found =
        Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipping: {tool} is not installed");
    }
    found
}

/// Whether all of `tools` are installed (see [`have`]).
pub fn have_all(tools: &[&str]) -> bool {
    tools.iter().all(|t| have(t))
}

/// Runs `cmd ARGS…`, which must succeed, and returns its stdout.
#[track_caller]
pub fn tool(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd ARGS…` with `stdin` as its input, which must succeed, and returns its stdout.
#[track_caller]
pub fn tool_in(cmd: &str, args: &[&str], stdin: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}
