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
    /// BLAKE3 of our executable, which the uploaded agent must match.
    pub exe_hash: Vec<u8>,
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

/// The bootstrap, one line with no `!` so that csh-family login shells pass it to `sh` intact.
/// Arguments: protocol, build (version and binary hash), remote path, upload allowed, sudo,
/// arch, binary size.
const BOOTSTRAP: &str = r#"P=$1; V=$2; R=$3; U=$4; A=$6; N=$7; if [ "$5" = 1 ]; then X="sudo -n"; else X=; fi; C="${XDG_CACHE_HOME:-$HOME/.cache}/blksync"; ok() { command -v "$1" >/dev/null 2>&1 && [ "$("$1" agent --protocol 2>/dev/null)" = "$P" ]; }; try() { if ok "$1"; then exec $X "$1" agent; fi; }; if [ -n "$R" ]; then try "$R"; F=$("$R" agent --protocol 2>/dev/null); else try blksync; try "$C/blksync-$V"; F=$(blksync agent --protocol 2>/dev/null); fi; [ -n "$F" ] || F=none; [ "$U" = 1 ] || { echo "BLKSYNC-NO-AGENT $F"; exit 0; }; [ "$(uname -m)" = "$A" ] || { echo "BLKSYNC-ARCH $(uname -m)"; exit 0; }; T="$C/.blksync-$V.$$"; mkdir -p "$C" && echo "BLKSYNC-UPLOAD $A" && head -c "$N" > "$T" && [ "$(wc -c < "$T")" -eq "$N" ] && chmod 755 "$T" && mv -f "$T" "$C/blksync-$V" && exec $X "$C/blksync-$V" agent; rm -f "$T"; echo "BLKSYNC-ERROR could not store the uploaded agent in $C""#;

/// The ssh command for `remote`, with the bootstrap as the remote command. `build` names this
/// exact binary in the remote cache (version and hash), so two builds of one version never
/// share a cache entry.
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
    let mut cmd = Command::new(&words[0]);
    cmd.args(&words[1..]);
    Ok(cmd)
}

/// Starts the agent on `remote`: runs ssh, answers the bootstrap, uploads when asked, and reads
/// the banner.
pub fn connect(remote: &Remote, options: &SshOptions) -> Result<Connection> {
    let exe =
        std::env::current_exe().map_err(|e| Error::new(ErrorKind::Io, format!("finding our own executable: {e}")))?;
    let binary = std::fs::read(&exe).map_err(|e| Error::io("reading", &exe, None, e))?;
    let exe_hash = blake3::hash(&binary).as_bytes().to_vec();
    let build = format!("{}-{}", env!("CARGO_PKG_VERSION"), &blake3::hash(&binary).to_hex()[..12]);
    let mut cmd = command(remote, options, &build, binary.len() as u64)?;
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
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(Error::new(ErrorKind::Connection, "ssh started without pipes"));
    };
    // 1 MiB pipes, as in the agent: fewer wake-ups per data frame.
    let _ = rustix::pipe::fcntl_setpipe_size(&stdin, 1 << 20);
    let _ = rustix::pipe::fcntl_setpipe_size(&stdout, 1 << 20);
    let mut stdout = BufReader::with_capacity(1 << 20, stdout);
    let host = remote.destination();
    let fail = |child: &mut Child, stderr: &Arc<Mutex<Vec<String>>>, what: String| {
        let _ = child.kill();
        let status = child.wait().ok();
        // Give the stderr thread a moment to collect ssh's last words.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let tail = stderr_tail(stderr);
        let status = status.and_then(|s| s.code()).map(|c| format!(" (ssh exit status {c})")).unwrap_or_default();
        Error::new(ErrorKind::Connection, format!("{host}: {what}{status}{tail}"))
    };
    let mut uploaded = false;
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
        if let Some(arch) = text.strip_prefix("BLKSYNC-UPLOAD ") {
            let _ = arch;
            if let Err(e) = stdin.write_all(&binary).and_then(|()| stdin.flush()) {
                return Err(fail(&mut child, &stderr, format!("uploading blksync failed: {e}")));
            }
            uploaded = true;
        } else if let Some(found) = text.strip_prefix("BLKSYNC-NO-AGENT ") {
            return Err(fail(
                &mut child,
                &stderr,
                format!(
                    "no blksync speaking protocol {VERSION} (blksync {}) found there (found: {}); install it, or allow uploading it (remove --no-upload)",
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
    Ok(Connection { child, stdin, stdout, stderr, uploaded, exe_hash })
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
    fn bootstrap_is_valid_sh_without_bang() {
        assert!(!BOOTSTRAP.contains('!') && !BOOTSTRAP.contains('\n'));
        let out = Command::new("sh").arg("-n").arg("-c").arg(BOOTSTRAP).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}
