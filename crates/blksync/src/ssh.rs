//! Reaching a remote agent: the ssh command line, the bootstrap script, the upload of our own
//! binary, the banner and the handshake.
//!
//! We spawn the system `ssh` so that `~/.ssh/config`, agents, `ProxyJump`, `ControlMaster`,
//! known-hosts checks and password prompts all keep working. The remote side needs nothing but
//! a POSIX shell: the bootstrap (docs/PROTOCOL.md, "Connection start") finds a matching agent or
//! receives ours.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::error::{Error, ErrorKind, Result};
use crate::location::Remote;
use crate::protocol::{BANNER, VERSION};

mod executable;

/// How to run ssh for one side.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SshOptions {
    /// The whole ssh command (`-e/--rsh`), split like a shell would; default `ssh`.
    pub rsh: Option<String>,
    /// Extra arguments, each split like a shell would (`--ssh-opt`).
    pub extra: Vec<String>,
    /// `-i` identity file.
    pub identity: Option<PathBuf>,
    /// Run the agent under `sudo -n`.
    pub sudo: bool,
    /// Agent binary on the remote host (`--remote-path`).
    pub remote_path: Option<String>,
    /// Never upload our binary.
    pub no_upload: bool,
    /// `--timeout`: how long the agent may stay silent, and a transfer make no progress, before
    /// the run ends with an error (default: silence [`crate::link::DEFAULT_SILENCE`], progress
    /// unlimited).
    pub timeout: Option<std::time::Duration>,
}

/// A started agent: the ssh child, its pipes, and what it printed on stderr.
pub struct Connection {
    /// The ssh process.
    pub child: Child,
    /// Frames to the agent.
    pub stdin: ChildStdin,
    /// Frames from the agent (buffered; the banner has been consumed).
    pub stdout: BufReader<ChildStdout>,
    /// The last lines ssh and the agent wrote to stderr.
    pub stderr: Arc<Mutex<Vec<String>>>,
    /// The binary was uploaded during this start.
    pub uploaded: bool,
    /// The agent is our build from the upload cache (the bootstrap checked its `cksum`).
    pub cached: bool,
    /// BLAKE3 of our executable, which an uploaded or cached agent must match.
    pub exe_hash: Vec<u8>,
    /// What the user should know about this start (an unusable `--remote-path`, a replaced
    /// cached agent), each naming the host.
    pub warnings: Vec<String>,
}

/// Splits a command line like a POSIX shell would (quotes and backslashes; no expansions).
pub fn split_words(text: &str) -> Result<Vec<String>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err(Error::usage(format!("unterminated ' in {text:?}"))),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err(Error::usage(format!("unterminated \" in {text:?}"))),
                        },
                        Some(c) => word.push(c),
                        None => return Err(Error::usage(format!("unterminated \" in {text:?}"))),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(c) = chars.next() {
                    word.push(c);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// Quotes `s` for a POSIX shell: `'…'`, with `'` written as `'\''`.
#[must_use]
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The bootstrap (docs/PROTOCOL.md, "Connection start"): one line with no `!`, so that
/// csh-family login shells pass it to `sh` intact, and nothing beyond POSIX `sh` but `head -c`
/// and, where present, `mktemp -d`. Arguments: protocol, build (version and binary hash), remote
/// path, upload allowed, sudo, arch, binary size. The first line on its stdin holds the POSIX
/// `cksum` CRC of the binary and the length of the frames that follow it: the client's first
/// requests, which ride with the bootstrap instead of waiting a round trip for the banner (issue
/// 13, item 4). The script reads that line before any agent starts, so no agent ever sees it;
/// the agent it starts reads the frames. An upload skips them first and gets them again after
/// the banner.
///
/// The upload cache is the one place where we run a program nobody installed, so it is
/// checked before anything in it runs (`why`, `safe`): the cache directory must be a directory
/// owned by the user and writable by no one else, every directory above it (physically, after
/// symbolic links) must belong to the user or root and not be writable by others unless sticky,
/// as OpenSSH's `StrictModes` asks of `~/.ssh`; and the cached agent must be a regular file owned by
/// the user, writable by no one else, whose `cksum` and size are the client's. A mismatching
/// agent is never run: it is replaced by an upload, or, under `--no-upload`, reported. The upload
/// goes to a fresh private directory (`mktemp -d`, or `mkdir`, which fails rather than follow
/// anything planted), is created with `set -C`, then made executable and renamed into place.
const BOOTSTRAP: &str = concat!(
    r#"P=$1; V=$2; R=$3; U=$4; A=$6; N=$7; read -r K M || exit 0; set -f; "#,
    r#"if [ "$5" = 1 ]; then X="sudo -n"; else X=; fi; "#,
    r#"C="${XDG_CACHE_HOME:-$HOME/.cache}/blksync"; I=$(id -u); "#,
    r#"say() { printf '%s\n' "$*"; }; "#,
    r#"ok() { command -v "$1" >/dev/null 2>&1 && [ "$("$1" agent --protocol 2>/dev/null)" = "$P" ]; }; "#,
    r#"try() { if ok "$1"; then exec $X "$1" agent; fi; }; "#,
    // why PATH KIND: prints what makes PATH unsafe (KIND d: the cache directory, f: the cached
    // agent, a: a directory above the cache), nothing when it is safe.
    r#"why() { set -- "$1" "$2" $(ls -ldn "$1" 2>/dev/null); case "$2:$3" in "#,
    r#"d:d????-??-*|f:-????-??-*) [ "$5" = "$I" ] || say "$1 belongs to uid $5, not to you (uid $I)";; "#,
    r#"a:d????-??-*|a:d????????[tT]*) [ "$5" = "$I" ] || [ "$5" = 0 ] || say "$1 belongs to uid $5, neither to you (uid $I) nor to root";; "#,
    r#"d:d*|a:d*|f:-*) say "$1 is writable by group or others";; "#,
    r#"*) say "$1 is not a plain directory or file";; esac; }; "#,
    // safe: Q = the cache's physical path, W = why it is unsafe (empty when safe).
    r#"safe() { Q=$(CDPATH= cd -P -- "$C" 2>/dev/null && pwd -P) || { W="$C is not a directory"; return; }; "#,
    r#"W=$(why "$Q" d); D=$Q; while [ -z "$W" ] && [ -n "$D" ]; do D=${D%/*}; W=$(why "${D:-/}" a); done; }; "#,
    r#"if [ -n "$R" ]; then try "$R"; F=$("$R" agent --protocol 2>/dev/null); [ -n "$F" ] || F=none; say "BLKSYNC-REMOTE-PATH $F"; "#,
    r#"else try blksync; F=$(blksync agent --protocol 2>/dev/null); [ -n "$F" ] || F=none; fi; "#,
    r#"B="$C/blksync-$V"; if [ -e "$B" ] || [ -h "$B" ]; then safe; "#,
    r#"[ -z "$W" ] || { say "BLKSYNC-ERROR refusing to run the cached agent: $W"; exit 0; }; B="$Q/blksync-$V"; "#,
    r#"if [ -z "$(why "$B" f)" ] && [ "$(cksum < "$B" 2>/dev/null)" = "$K $N" ]; then say BLKSYNC-CACHED; exec $X "$B" agent; fi; "#,
    r#"say "BLKSYNC-STALE $B"; fi; "#,
    r#"[ "$U" = 1 ] || { say "BLKSYNC-NO-AGENT $F"; exit 0; }; "#,
    r#"[ "$(uname -m)" = "$A" ] || { say "BLKSYNC-ARCH $(uname -m)"; exit 0; }; "#,
    r#"(umask 077; mkdir -p -- "$C") 2>/dev/null; safe; "#,
    r#"[ -z "$W" ] || { say "BLKSYNC-ERROR refusing to store the agent in its cache: $W"; exit 0; }; "#,
    r#"T=$(mktemp -d "$Q/.upload-XXXXXXXX" 2>/dev/null) || { T="$Q/.upload-$$"; mkdir -m 700 -- "$T" 2>/dev/null; } "#,
    r#"|| { say "BLKSYNC-ERROR could not create a private directory in $Q"; exit 0; }; "#,
    // The client's first frames (M bytes) are on stdin already: the upload must not read them
    // as its binary. They come again once the uploaded agent has said its banner.
    r#"[ "${M:-0}" = 0 ] || head -c "$M" > /dev/null; say "BLKSYNC-UPLOAD $A"; set -C; "#,
    r#"head -c "$N" > "$T/blksync" && [ "$(wc -c < "$T/blksync")" -eq "$N" ] && chmod 755 "$T/blksync" "#,
    r#"&& mv -f -- "$T/blksync" "$Q/blksync-$V" && rmdir -- "$T" && exec $X "$Q/blksync-$V" agent; "#,
    r#"rm -rf -- "$T"; say "BLKSYNC-ERROR could not store the uploaded agent in $Q""#,
);

/// The POSIX `cksum` CRC of `data` (CRC-32, polynomial 0x04C11DB7, most significant bit first,
/// the length appended, complemented). Not a cryptographic hash, and it need not be one: the
/// bootstrap uses it to tell our build from a damaged or different file with the one tool POSIX
/// guarantees; what keeps others from planting a file is the ownership check (see `BOOTSTRAP`).
///
/// Eight bytes a step (slicing-by-8): the client computes it over its whole executable at every
/// connection, and a byte at a time took a third of a second for a debug build.
#[must_use]
pub fn posix_cksum(data: &[u8]) -> u32 {
    // TABLES[k][b]: the CRC of byte b followed by k zero bytes.
    const TABLES: [[u32; 256]; 8] = {
        let mut t = [[0u32; 256]; 8];
        let mut i = 0;
        while i < 256 {
            let mut c = (i as u32) << 24;
            let mut bit = 0;
            while bit < 8 {
                c = if c & 0x8000_0000 != 0 { (c << 1) ^ 0x04C1_1DB7 } else { c << 1 };
                bit += 1;
            }
            t[0][i] = c;
            i += 1;
        }
        let mut k = 1;
        while k < 8 {
            let mut i = 0;
            while i < 256 {
                let prev = t[k - 1][i];
                t[k][i] = (prev << 8) ^ t[0][(prev >> 24) as usize];
                i += 1;
            }
            k += 1;
        }
        t
    };
    let step = |crc: u32, byte: u8| (crc << 8) ^ TABLES[0][((crc >> 24) as u8 ^ byte) as usize];
    let t = &TABLES;
    let mut crc = 0u32;
    let mut chunks = data.chunks_exact(8);
    for b in &mut chunks {
        let c = crc ^ u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        crc = t[7][(c >> 24) as usize]
            ^ t[6][((c >> 16) & 0xff) as usize]
            ^ t[5][((c >> 8) & 0xff) as usize]
            ^ t[4][(c & 0xff) as usize]
            ^ t[3][b[4] as usize]
            ^ t[2][b[5] as usize]
            ^ t[1][b[6] as usize]
            ^ t[0][b[7] as usize];
    }
    crc = chunks.remainder().iter().fold(crc, |crc, &b| step(crc, b));
    let mut len = data.len() as u64;
    while len > 0 {
        crc = step(crc, len as u8);
        len >>= 8;
    }
    !crc
}

/// True when `program` (the first word of the ssh command) is OpenSSH's `ssh`, which takes `--`
/// before the destination. Other `--rsh` programs may not (`kubectl exec` would take it as the
/// start of the command), so they get the destination alone; it cannot start with `-` anyway
/// (`Location::parse` refuses that).
fn takes_double_dash(program: &str) -> bool {
    std::path::Path::new(program).file_name().is_some_and(|name| name == "ssh")
}

/// The ssh command for `remote`, with the bootstrap as the remote command. `build` names this
/// exact binary in the remote cache (version and hash), so two builds of one version never
/// share a cache entry. The caller writes the binary's [`posix_cksum`] as the first line of
/// ssh's stdin, which the bootstrap checks a cached agent against before running it.
///
/// ssh runs with SIGINT ignored (`trap '' INT`, inherited across `exec`; OpenSSH leaves an
/// ignored SIGINT ignored). Ctrl-C on a terminal signals the whole foreground process group, and
/// an ssh that dies of it races our orderly shutdown (cancel the remote job, flush, report what
/// is in sync) and turns an interrupt into "the connection was lost". We do not move ssh to a
/// process group of its own instead (`process_group(0)`), which would also keep the signal away:
/// ssh reads password, passphrase and host-key prompts from `/dev/tty`, and a process outside
/// the terminal's foreground group is stopped (SIGTTOU/SIGTTIN) when it sets the terminal up for a
/// prompt or reads it, so every interactive login would hang. Borg does the same for its ssh.
/// The price: Ctrl-C at an ssh prompt no longer ends ssh (it answers the prompt empty); blksync
/// still gets the signal, and a second Ctrl-C ends blksync, and with it ssh, at once.
pub fn command(remote: &Remote, options: &SshOptions, build: &str, binary_size: u64) -> Result<Command> {
    let mut words = match &options.rsh {
        Some(rsh) => split_words(rsh)?,
        None => vec!["ssh".to_string()],
    };
    if words.is_empty() {
        return Err(Error::usage("--rsh is empty"));
    }
    for extra in &options.extra {
        words.extend(split_words(extra)?);
    }
    if let Some(identity) = &options.identity {
        words.push("-i".into());
        words.push(identity.display().to_string());
    }
    if let Some(port) = remote.port {
        words.push("-p".into());
        words.push(port.to_string());
    }
    if takes_double_dash(&words[0]) {
        // Whatever the destination looks like, ssh takes no option after this.
        words.push("--".into());
    }
    words.push(remote.destination());
    let args = [
        VERSION.to_string(),
        build.to_string(),
        options.remote_path.clone().unwrap_or_default(),
        if options.no_upload { "0" } else { "1" }.to_string(),
        if options.sudo { "1" } else { "0" }.to_string(),
        std::env::consts::ARCH.to_string(),
        binary_size.to_string(),
    ];
    let mut remote_command = format!("sh -c {} blksync-bootstrap", shell_quote(BOOTSTRAP));
    for a in &args {
        remote_command.push(' ');
        remote_command.push_str(&shell_quote(a));
    }
    words.push(remote_command);
    // `sh` execs ssh in its own process, so the child is ssh itself (kill and wait reach it).
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(r#"trap '' INT; exec "$0" "$@""#).args(&words);
    Ok(cmd)
}

/// An ssh whose bootstrap waits for its first line ([`Starting::finish`]): the connection is
/// set up while the client prepares its first requests.
pub struct Starting {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    stderr: Arc<Mutex<Vec<String>>>,
    exe: executable::Executable,
    host: String,
    options: SshOptions,
}

/// Runs ssh and the bootstrap on `remote`. Nothing is written yet: the bootstrap waits.
pub fn spawn(remote: &Remote, options: &SshOptions) -> Result<Starting> {
    // The bytes are read only for an upload (issue 13, item 2): size and checksums are remembered.
    let exe = executable::Executable::current()?;
    let mut cmd = command(remote, options, &exe.build(), exe.size)?;
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let program: OsString = cmd.get_program().to_owned();
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::new(ErrorKind::Connection, format!("cannot run {}: {e}", program.to_string_lossy())))?;
    let stderr = Arc::new(Mutex::new(Vec::new()));
    if let Some(err) = child.stderr.take() {
        let lines = Arc::clone(&stderr);
        std::thread::spawn(move || collect_stderr(err, &lines));
    }
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(Error::new(ErrorKind::Connection, "ssh started without pipes"));
    };
    // 1 MiB pipes, as in the agent: fewer wake-ups per data frame.
    let _ = rustix::pipe::fcntl_setpipe_size(&stdin, 1 << 20);
    let _ = rustix::pipe::fcntl_setpipe_size(&stdout, 1 << 20);
    let stdout = BufReader::with_capacity(1 << 20, stdout);
    Ok(Starting { child, stdin, stdout, stderr, exe, host: remote.destination(), options: options.clone() })
}

impl Starting {
    /// The pid of ssh.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What ssh and the bootstrap wrote on stderr so far.
    #[must_use]
    pub fn stderr(&self) -> Arc<Mutex<Vec<String>>> {
        Arc::clone(&self.stderr)
    }

    /// Ends ssh before the bootstrap was answered: it reads end of file for its first line and
    /// starts nothing.
    pub fn abandon(mut self) {
        drop(self.stdin);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Answers the bootstrap, with `preface` (encoded frames) riding behind its first line,
    /// uploads when asked, and reads the banner. After an upload the preface is written again,
    /// for the agent that just started.
    pub fn finish(self, preface: &[u8]) -> Result<Connection> {
        let Starting { mut child, mut stdin, mut stdout, stderr, exe, host, options } = self;
        let exe_hash = exe.blake3.to_vec();
        // ssh is connecting meanwhile, or done. An error here shows as the connection's end, below.
        let _ = writeln!(stdin, "{} {}", exe.cksum, preface.len())
            .and_then(|()| stdin.write_all(preface))
            .and_then(|()| stdin.flush());
        let fail = |child: &mut Child, stderr: &Arc<Mutex<Vec<String>>>, what: String| {
            let _ = child.kill();
            let status = child.wait().ok();
            // Give the stderr thread a moment to collect ssh's last words.
            std::thread::sleep(std::time::Duration::from_millis(50));
            let tail = stderr_tail(stderr);
            let status = status.and_then(|s| s.code()).map(|c| format!(" (ssh exit status {c})")).unwrap_or_default();
            Error::new(ErrorKind::Connection, format!("{host}: {what}{status}{tail}"))
        };
        let (mut uploaded, mut cached) = (false, false);
        // What the bootstrap found wrong on the way: the protocol of an unusable --remote-path, a
        // cached agent that did not match.
        let (mut remote_path_found, mut stale) = (None, None);
        loop {
            let mut line = Vec::new();
            let n = (&mut stdout).take(4096).read_until(b'\n', &mut line).unwrap_or(0);
            if n == 0 {
                return Err(fail(&mut child, &stderr, "the connection closed before the agent started".into()));
            }
            if line == BANNER {
                break;
            }
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            if text.starts_with("BLKSYNC-UPLOAD ") {
                let binary = match exe.bytes() {
                    Ok(binary) => binary,
                    Err(e) => return Err(fail(&mut child, &stderr, e.to_string())),
                };
                if let Err(e) = stdin.write_all(&binary).and_then(|()| stdin.flush()) {
                    return Err(fail(&mut child, &stderr, format!("uploading blksync failed: {e}")));
                }
                uploaded = true;
            } else if text == "BLKSYNC-CACHED" {
                cached = true;
            } else if let Some(found) = text.strip_prefix("BLKSYNC-REMOTE-PATH ") {
                remote_path_found = Some(found.to_string());
            } else if let Some(path) = text.strip_prefix("BLKSYNC-STALE ") {
                stale = Some(path.to_string());
            } else if let Some(found) = text.strip_prefix("BLKSYNC-NO-AGENT ") {
                let stale = stale
                    .as_ref()
                    .map(|p| format!("; the cached agent {p} does not match this blksync and was not run"))
                    .unwrap_or_default();
                return Err(fail(
                    &mut child,
                    &stderr,
                    format!(
                        "no blksync speaking protocol {VERSION} (blksync {}) found there (found: {}{stale}); install it, or allow uploading it (remove --no-upload)",
                        env!("CARGO_PKG_VERSION"),
                        if found == "none" { "none".to_string() } else { format!("protocol {found}") }
                    ),
                ));
            } else if let Some(arch) = text.strip_prefix("BLKSYNC-ARCH ") {
                return Err(fail(
                    &mut child,
                    &stderr,
                    format!(
                        "the host is {arch}, this blksync is built for {}; install blksync there",
                        std::env::consts::ARCH
                    ),
                ));
            } else if let Some(msg) = text.strip_prefix("BLKSYNC-ERROR ") {
                return Err(fail(&mut child, &stderr, msg.to_string()));
            } else {
                let mut junk = text;
                junk.truncate(200);
                return Err(fail(
                    &mut child,
                    &stderr,
                    format!(
                        "unexpected output before the agent started: {junk:?}; a login script (.bashrc, .profile) is probably printing text for non-interactive shells"
                    ),
                ));
            }
        }
        // The bootstrap skipped the preface to read the upload; the new agent gets it now. (Not
        // right behind the binary: a `head -c` that reads ahead would take it as binary.)
        if uploaded && let Err(e) = stdin.write_all(preface).and_then(|()| stdin.flush()) {
            return Err(fail(&mut child, &stderr, format!("writing to the agent failed: {e}")));
        }
        let warnings = start_warnings(&host, &options, uploaded, stale, remote_path_found);
        Ok(Connection { child, stdin, stdout, stderr, uploaded, cached, exe_hash, warnings })
    }
}

/// What the user should know about a start that worked: a cached agent that was replaced
/// (`stale`), a `--remote-path` that was not usable (`remote_path_found`: the protocol it
/// speaks, or `none`) and what ran instead.
fn start_warnings(
    host: &str,
    options: &SshOptions,
    uploaded: bool,
    stale: Option<String>,
    remote_path_found: Option<String>,
) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Some(path) = stale.filter(|_| uploaded) {
        warnings.push(format!(
            "{host}: the cached agent {path} did not match this blksync (damaged, or not written by blksync); it was not run, and a fresh upload replaced it"
        ));
    }
    if let (Some(found), Some(path)) = (remote_path_found, &options.remote_path) {
        let why = if found == "none" {
            "no such program, or it is not blksync".to_string()
        } else {
            format!("it speaks protocol {found}, this blksync speaks {VERSION}")
        };
        let instead = if uploaded {
            "blksync uploaded its own agent instead"
        } else {
            "blksync ran its own agent from the upload cache there instead"
        };
        warnings.push(format!("{host}: --remote-path {path} is not usable ({why}); {instead}"));
    }
    warnings
}

fn collect_stderr(err: impl Read, lines: &Mutex<Vec<String>>) {
    for line in BufReader::new(err).lines() {
        let Ok(line) = line else { break };
        let mut lines = lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if lines.len() >= 20 {
            lines.remove(0);
        }
        lines.push(line);
    }
}

/// `: <last stderr lines>` or nothing.
#[must_use]
pub fn stderr_tail(stderr: &Mutex<Vec<String>>) -> String {
    let lines = stderr.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let text: Vec<&str> = lines.iter().map(|l| l.trim()).filter(|l| !l.is_empty()).collect();
    if text.is_empty() { String::new() } else { format!(": {}", text.join(" / ")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_like_a_shell() {
        assert_eq!(split_words("ssh -p 2222").unwrap(), ["ssh", "-p", "2222"]);
        assert_eq!(
            split_words(r#"ssh -o 'ProxyCommand=nc %h %p' "-i" a\ b"#).unwrap(),
            ["ssh", "-o", "ProxyCommand=nc %h %p", "-i", "a b"]
        );
        assert_eq!(split_words("''").unwrap(), [""]);
        assert!(split_words("'open").is_err());
    }

    #[test]
    fn quoting_survives_a_shell() {
        for s in ["plain", "with space", "it's", "a'b'c", "ünïcödé", "$HOME `x` \"q\"", ""] {
            let out = Command::new("sh").arg("-c").arg(format!("printf %s {}", shell_quote(s))).output().unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), s);
        }
    }

    #[test]
    fn our_cksum_is_the_one_the_bootstrap_compares_with() {
        let mut big = vec![0u8; 300_000];
        for (i, b) in big.iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        for data in [&b""[..], b"hello", b"\xff\x00\x80", &big] {
            let mut child = Command::new("cksum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
            child.stdin.take().unwrap().write_all(data).unwrap();
            let out = child.wait_with_output().unwrap();
            let expected = format!("{} {}", posix_cksum(data), data.len());
            assert_eq!(String::from_utf8(out.stdout).unwrap().trim_end(), expected);
        }
    }

    fn args_of(rsh: Option<&str>, remote: &str) -> Vec<String> {
        let Ok(crate::location::Location::Remote(remote)) = crate::location::Location::parse(&OsString::from(remote))
        else {
            panic!("{remote} is not remote");
        };
        let options = SshOptions { rsh: rsh.map(str::to_string), ..SshOptions::default() };
        let cmd = command(&remote, &options, "0.1.0-abc", 10).unwrap();
        assert_eq!(cmd.get_program(), "/bin/sh");
        cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn ssh_takes_no_option_after_its_options_and_ignores_sigint() {
        let args = args_of(None, "ssh://me@host:2222/x");
        assert!(args[1].starts_with("trap '' INT;"), "{args:?}");
        assert_eq!(args[2..7], ["ssh", "-p", "2222", "--", "me@host"]);
        let args = args_of(Some("/usr/bin/ssh -F cfg"), "me@host:/x");
        assert_eq!(args[2..6], ["/usr/bin/ssh", "-F", "cfg", "--"]);
        // Another program may read `--` as the start of the command: none for it.
        let args = args_of(Some("sh -c 'exec ssh \"$@\"' sh"), "me@host:/x");
        assert_eq!(args[2..6], ["sh", "-c", "exec ssh \"$@\"", "sh"]);
        assert_eq!(args[6], "me@host");
    }

    #[test]
    fn bootstrap_is_valid_sh_without_bang() {
        assert!(!BOOTSTRAP.contains('!') && !BOOTSTRAP.contains('\n'));
        let out = Command::new("sh").arg("-n").arg("-c").arg(BOOTSTRAP).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}
