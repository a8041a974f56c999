//! How to open a LUN: [`IscsiOptions`], and the CHAP [`Credentials`] gathered from the address,
//! the environment and a secrets file (docs/ISCSI.md, "Secrets").

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use blksync_core::{Error, Result};

use crate::address::IscsiAddress;

/// Default bytes per READ(16) or WRITE(16).
pub const DEFAULT_REQUEST_SIZE: usize = 256 << 10;
/// Default number of commands in flight.
pub const DEFAULT_QUEUE_DEPTH: usize = 32;
/// How long a target may leave us waiting by default (docs/ISCSI.md, "Timeouts").
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How to open a LUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IscsiOptions {
    /// `InitiatorName`; `None` for `iqn.2024-01.org.blksync:HOSTNAME`.
    pub initiator_name: Option<String>,
    /// A file of `key=value` lines (`user`, `password`, `target_user`, `target_password`),
    /// read when the address and the environment leave a secret out.
    pub secrets_file: Option<PathBuf>,
    /// Prefer CRC32C header and data digests (offered first); without it they are used only
    /// when the target insists.
    pub digests: bool,
    /// Bytes per READ(16)/WRITE(16) command (default 256 KiB; rounded to whole blocks).
    pub request_size: usize,
    /// Commands in flight at most (default 32), within the target's `CmdSN` window.
    pub queue_depth: usize,
    /// Read the environment (`LIBISCSI_CHAP_*`) for secrets; tests turn it off.
    pub use_environment: bool,
    /// How long the target may leave us waiting (default 30 s): for the connection, for each
    /// login answer, and in the full feature phase while commands are outstanding; a NOP-Out
    /// ping goes out after half of it. The address's `?timeout=SECONDS` sets it.
    pub timeout: Duration,
}

impl Default for IscsiOptions {
    fn default() -> Self {
        IscsiOptions {
            initiator_name: None,
            secrets_file: None,
            digests: false,
            request_size: DEFAULT_REQUEST_SIZE,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            use_environment: true,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl IscsiOptions {
    /// The initiator name to log in with.
    #[must_use]
    pub fn initiator(&self) -> String {
        self.initiator_name.clone().unwrap_or_else(default_initiator_name)
    }
}

/// `iqn.2024-01.org.blksync:HOSTNAME`, the host name reduced to what an iSCSI name may hold.
#[must_use]
pub fn default_initiator_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':') { c } else { '-' })
        .collect();
    let host = if host.is_empty() { "localhost".to_string() } else { host };
    format!("iqn.2024-01.org.blksync:{host}")
}

/// One direction of CHAP: a name and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    /// The CHAP name (`CHAP_N`); for the target's side, `None` accepts any.
    pub user: Option<String>,
    /// The secret.
    pub secret: Vec<u8>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret").field("user", &self.user).finish_non_exhaustive()
    }
}

/// The CHAP credentials of a login.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// Ours, proven to the target (CHAP).
    pub initiator: Option<Secret>,
    /// The target's, which it must prove to us (mutual CHAP).
    pub target: Option<Secret>,
    /// Where they came from, for messages ("the address", "`LIBISCSI_CHAP_PASSWORD`", a file).
    pub source: String,
}

impl Credentials {
    /// Gathers the credentials for `address`: the address first, then the environment (when
    /// `options.use_environment`), then the secrets file.
    pub fn gather(address: &IscsiAddress, options: &IscsiOptions) -> Result<Credentials> {
        let env = |name: &str| if options.use_environment { std::env::var(name).ok() } else { None };
        let file = match &options.secrets_file {
            Some(path) => read_secrets_file(path)?,
            None => SecretsFile::default(),
        };
        let mut sources = Vec::new();
        let mut pick = |values: [(Option<String>, &'static str); 3]| {
            values.into_iter().find_map(|(v, from)| {
                v.filter(|v| !v.is_empty()).inspect(|_| {
                    if !sources.contains(&from) {
                        sources.push(from);
                    }
                })
            })
        };
        let file_name = "the secrets file";
        let user = pick([
            (address.user().map(String::from), "the address"),
            (env("LIBISCSI_CHAP_USERNAME"), "LIBISCSI_CHAP_USERNAME"),
            (file.user.clone(), file_name),
        ]);
        let password = pick([
            (address.password().map(String::from), "the address"),
            (env("LIBISCSI_CHAP_PASSWORD"), "LIBISCSI_CHAP_PASSWORD"),
            (file.password.clone(), file_name),
        ]);
        let target_user = pick([
            (None, ""),
            (env("LIBISCSI_CHAP_TARGET_USERNAME"), "LIBISCSI_CHAP_TARGET_USERNAME"),
            (file.target_user.clone(), file_name),
        ]);
        let target_password = pick([
            (None, ""),
            (env("LIBISCSI_CHAP_TARGET_PASSWORD"), "LIBISCSI_CHAP_TARGET_PASSWORD"),
            (file.target_password.clone(), file_name),
        ]);
        let initiator = match (user, password) {
            (None, None) => None,
            (Some(user), Some(secret)) => Some(Secret { user: Some(user), secret: secret.into_bytes() }),
            (Some(user), None) => {
                return Err(Error::usage(format!(
                    "{address}: CHAP user {user:?} has no password; set LIBISCSI_CHAP_PASSWORD or password= in a secrets file"
                )));
            }
            (None, Some(_)) => {
                return Err(Error::usage(format!(
                    "{address}: a CHAP password without a user; write iscsi://USER@… or set LIBISCSI_CHAP_USERNAME"
                )));
            }
        };
        let target = target_password.map(|secret| Secret { user: target_user, secret: secret.into_bytes() });
        if target.is_some() && initiator.is_none() {
            return Err(Error::usage(format!(
                "{address}: a target (mutual CHAP) password without the initiator's CHAP user and password"
            )));
        }
        Ok(Credentials { initiator, target, source: sources.join(", ") })
    }
}

#[derive(Debug, Default)]
struct SecretsFile {
    user: Option<String>,
    password: Option<String>,
    target_user: Option<String>,
    target_password: Option<String>,
}

fn read_secrets_file(path: &std::path::Path) -> Result<SecretsFile> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading the iSCSI secrets file", path, None, e))?;
    let mut out = SecretsFile::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| Error::usage(format!("{} line {}: {why}", path.display(), n + 1));
        let (key, value) = line.split_once('=').ok_or_else(|| bad("expected key=value"))?;
        let slot = match key.trim() {
            "user" => &mut out.user,
            "password" => &mut out.password,
            "target_user" => &mut out.target_user,
            "target_password" => &mut out.target_password,
            other => {
                return Err(bad(&format!("unknown key {other:?} (user, password, target_user, target_password)")));
            }
        };
        *slot = Some(value.trim().to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(file: Option<PathBuf>) -> IscsiOptions {
        IscsiOptions { secrets_file: file, use_environment: false, ..IscsiOptions::default() }
    }

    #[test]
    fn the_address_gives_user_and_password() {
        let a = crate::address::parse("iscsi://u%p@h/iqn.x/1").unwrap();
        let c = Credentials::gather(&a, &opts(None)).unwrap();
        assert_eq!(c.initiator, Some(Secret { user: Some("u".into()), secret: b"p".to_vec() }));
        assert_eq!(c.target, None);
        let none = Credentials::gather(&crate::address::parse("iscsi://h/iqn.x/1").unwrap(), &opts(None)).unwrap();
        assert_eq!(none.initiator, None);
    }

    #[test]
    fn a_secrets_file_fills_in_what_the_address_leaves_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets");
        std::fs::write(&path, "# iSCSI\nuser=file-user\npassword = s1\n\ntarget_password=t1\n").unwrap();
        let a = crate::address::parse("iscsi://joe@h/iqn.x/1").unwrap();
        let c = Credentials::gather(&a, &opts(Some(path.clone()))).unwrap();
        assert_eq!(c.initiator, Some(Secret { user: Some("joe".into()), secret: b"s1".to_vec() }));
        assert_eq!(c.target, Some(Secret { user: None, secret: b"t1".to_vec() }));
        std::fs::write(&path, "pasword=x\n").unwrap();
        let e = Credentials::gather(&a, &opts(Some(path))).unwrap_err();
        assert!(e.to_string().contains("unknown key"), "{e}");
    }

    #[test]
    fn a_user_without_a_password_is_a_usage_error() {
        let a = crate::address::parse("iscsi://joe@h/iqn.x/1").unwrap();
        let e = Credentials::gather(&a, &opts(None)).unwrap_err();
        assert!(e.to_string().contains("LIBISCSI_CHAP_PASSWORD"), "{e}");
    }

    #[test]
    fn the_default_initiator_name_is_an_iqn() {
        let n = default_initiator_name();
        assert!(n.starts_with("iqn.2024-01.org.blksync:") && !n.contains(' '), "{n}");
    }
}
