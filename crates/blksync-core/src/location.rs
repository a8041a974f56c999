//! Where an endpoint is: an *address* on this host, or behind `[user@]host:` /
//! `ssh://[user@]host[:port]/`.
//!
//! An address is a path (a file or block device) or URL-like: `loop://FILE`, `lvm://VG/LV`,
//! `lvm+snapshot://VG/LV`, and the schemes of later endpoint kinds ([`SCHEMES`]). URL-like
//! addresses are recognised before the `host:path` rule, so `nbd://x` is never an ssh host called
//! `nbd`; an unknown scheme is a usage error that lists the known ones. Either form may stand
//! behind a host: `root@vmhost:lvm+snapshot://vg0/vm1`, `ssh://root@nas/lvm://vg/backup`. As with
//! rsync and scp, a colon before the first slash makes a remote location, so a local path with a
//! colon is written `./a:b` (or `/abs/a:b`).

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use crate::error::{Error, Result};

/// A parsed endpoint location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A path on this host.
    Local(PathBuf),
    /// A path on another host, reached with ssh.
    Remote(Remote),
}

/// A remote location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// Login name, when given.
    pub user: Option<String>,
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port, when given (`ssh://` form only).
    pub port: Option<u16>,
    /// Path on the remote host, as bytes (any encoding).
    pub path: PathBuf,
}

impl Remote {
    /// `user@host` or `host`, as ssh takes it.
    #[must_use]
    pub fn destination(&self) -> String {
        match &self.user {
            Some(u) => format!("{u}@{}", self.host),
            None => self.host.clone(),
        }
    }

    /// `host:path` for messages.
    #[must_use]
    pub fn display(&self) -> String {
        format!("{}:{}", self.destination(), self.path.display())
    }
}

/// The URL-like address schemes an endpoint can have (`ssh://` is a way to reach one).
pub const SCHEMES: &[&str] = &["loop", "lvm", "lvm+snapshot", "nbd", "nbd+unix", "nbds", "nbds+unix", "iscsi"];

/// The scheme of a URL-like argument (`SCHEME://…`, the scheme made of letters, digits, `+`,
/// `-` and `.`, starting with a letter), if it is one.
#[must_use]
pub fn scheme_of(bytes: &[u8]) -> Option<&str> {
    let end = bytes.windows(3).position(|w| w == b"://")?;
    let scheme = std::str::from_utf8(&bytes[..end]).ok()?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic() && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))).then_some(scheme)
}

/// Checks an address's scheme: a plain path, or a known scheme.
fn check_scheme(address: &[u8], arg: &OsString) -> Result<()> {
    match scheme_of(address) {
        Some(s) if !SCHEMES.contains(&s) => Err(Error::usage(format!(
            "{:?}: unknown address scheme {s}://; known: {}, and ssh:// to reach one on another host (a local file of that name is written ./{})",
            arg.to_string_lossy(),
            SCHEMES.iter().map(|s| format!("{s}://")).collect::<Vec<_>>().join(", "),
            arg.to_string_lossy()
        ))),
        _ => Ok(()),
    }
}

impl Location {
    /// Parses a command-line argument.
    pub fn parse(arg: &OsString) -> Result<Location> {
        let bytes = arg.as_bytes();
        if let Some(rest) = bytes.strip_prefix(b"ssh://") {
            return parse_url(rest, arg);
        }
        if scheme_of(bytes).is_some() {
            check_scheme(bytes, arg)?;
            return Ok(Location::Local(PathBuf::from(arg)));
        }
        let slash = bytes.iter().position(|&b| b == b'/');
        let colon = if bytes.first() == Some(&b'[') {
            // [v6addr]:path or user@[v6addr]:path
            bytes.windows(2).position(|w| w == b"]:").map(|i| i + 1)
        } else {
            bytes.iter().position(|&b| b == b':')
        };
        let colon = bytes.iter().position(|&b| b == b'@').map_or(colon, |at| {
            if bytes.get(at + 1) == Some(&b'[') {
                bytes.windows(2).position(|w| w == b"]:").map(|i| i + 1)
            } else {
                colon
            }
        });
        match colon {
            Some(c) if slash.is_none_or(|s| c < s) && c > 0 => {
                let (login, path) = (&bytes[..c], &bytes[c + 1..]);
                let (user, host) = split_login(login, arg)?;
                check_scheme(path, arg)?;
                let path = if path.is_empty() { b".".to_vec() } else { path.to_vec() };
                Ok(Location::Remote(Remote { user, host, port: None, path: PathBuf::from(OsString::from_vec(path)) }))
            }
            _ => Ok(Location::Local(PathBuf::from(arg))),
        }
    }
}

fn split_login(login: &[u8], arg: &OsString) -> Result<(Option<String>, String)> {
    let text = std::str::from_utf8(login)
        .map_err(|_| Error::usage(format!("host name in {} is not UTF-8", arg.to_string_lossy())))?;
    let (user, host) = match text.rsplit_once('@') {
        Some((u, h)) => (Some(u.to_string()), h),
        None => (None, text),
    };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() || user.as_deref() == Some("") {
        return Err(Error::usage(format!("invalid remote location {:?}", arg.to_string_lossy())));
    }
    // ssh parses `user@host` as an option when it starts with `-` (`-oProxyCommand=…@host` runs
    // a command here), and a host starting with `-` the same; no real name does either.
    for (what, name) in [("user name", user.as_deref()), ("host name", Some(host))] {
        if name.is_some_and(|n| n.starts_with('-')) {
            return Err(Error::usage(format!(
                "invalid remote location {:?}: the {what} starts with '-', which ssh would take as an option",
                arg.to_string_lossy()
            )));
        }
    }
    Ok((user, host.to_string()))
}

fn parse_url(rest: &[u8], arg: &OsString) -> Result<Location> {
    let bad = || {
        Error::usage(format!(
            "invalid ssh:// location {:?}: expected ssh://[user@]host[:port]/path",
            arg.to_string_lossy()
        ))
    };
    let slash = rest.iter().position(|&b| b == b'/').ok_or_else(bad)?;
    let (authority, path) = (&rest[..slash], &rest[slash..]);
    let authority = std::str::from_utf8(authority).map_err(|_| bad())?;
    let (login, port) = match authority.rsplit_once(':') {
        Some((l, p)) if !p.contains(']') => (l, Some(p.parse::<u16>().map_err(|_| bad())?)),
        _ => (authority, None),
    };
    let (user, host) = split_login(login.as_bytes(), arg)?;
    // ssh://host/path is absolute; ssh://host/~/x is relative to the home directory;
    // ssh://host/lvm://vg/lv is an address on that host.
    let path = path.strip_prefix(b"/~/").map_or(path, |p| p);
    let path = match path.strip_prefix(b"/") {
        Some(address) if scheme_of(address).is_some() => {
            check_scheme(address, arg)?;
            address
        }
        _ => path,
    };
    Ok(Location::Remote(Remote { user, host, port, path: PathBuf::from(OsString::from_vec(path.to_vec())) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(s: &str) -> Remote {
        match Location::parse(&OsString::from(s)).unwrap() {
            Location::Remote(r) => r,
            Location::Local(p) => panic!("{s} parsed as local {}", p.display()),
        }
    }

    fn local(s: &str) {
        assert_eq!(Location::parse(&OsString::from(s)).unwrap(), Location::Local(PathBuf::from(s)), "{s}");
    }

    #[test]
    fn scp_style_locations() {
        let r = remote("backup@nas:/dev/vg/lv");
        assert_eq!((r.user.as_deref(), r.host.as_str(), r.path.to_str()), (Some("backup"), "nas", Some("/dev/vg/lv")));
        let r = remote("nas:disk.img");
        assert_eq!((r.user, r.path.to_str()), (None, Some("disk.img")));
        let r = remote("[::1]:/x");
        assert_eq!((r.host.as_str(), r.path.to_str()), ("::1", Some("/x")));
        let r = remote("me@[fe80::1]:/y z");
        assert_eq!((r.host.as_str(), r.path.to_str()), ("fe80::1", Some("/y z")));
        assert_eq!(remote("h:").path.to_str(), Some("."));
    }

    #[test]
    fn url_locations() {
        let r = remote("ssh://root@127.0.0.1:2222/tmp/a b");
        assert_eq!(
            (r.user.as_deref(), r.host.as_str(), r.port, r.path.to_str()),
            (Some("root"), "127.0.0.1", Some(2222), Some("/tmp/a b"))
        );
        let r = remote("ssh://h/~/img");
        assert_eq!(r.path.to_str(), Some("img"));
        assert!(Location::parse(&OsString::from("ssh://h:99999/x")).is_err());
        assert!(Location::parse(&OsString::from("ssh://h")).is_err());
    }

    #[test]
    fn url_like_addresses_come_before_the_host_rule() {
        for s in ["loop://disk.img", "loop:///dev/loop3", "lvm://vg0/vm1", "lvm+snapshot://vg0/vm1", "nbd://host/x"] {
            local(s);
        }
        let r = remote("root@vmhost:lvm+snapshot://vg0/vm1");
        assert_eq!((r.host.as_str(), r.path.to_str()), ("vmhost", Some("lvm+snapshot://vg0/vm1")));
        let r = remote("ssh://root@nas:2222/lvm://vg/backup");
        assert_eq!((r.port, r.path.to_str()), (Some(2222), Some("lvm://vg/backup")));
        for s in ["foo://x", "host:foo://x", "ssh://h/foo://x"] {
            let e = Location::parse(&OsString::from(s)).expect_err(s);
            assert_eq!(e.kind(), crate::error::ErrorKind::Usage);
            assert!(e.to_string().contains("loop://") && e.to_string().contains("foo"), "{e}");
        }
    }

    #[test]
    fn local_paths_even_with_colons() {
        for s in ["disk.img", "/dev/sda", "./a:b", "/abs/a:b", "dir/x:y", ":weird"] {
            local(s);
        }
        assert!(Location::parse(&OsString::from("-oProxyCommand=x:y")).is_err());
    }

    #[test]
    fn user_or_host_starting_with_a_dash_is_refused_not_passed_to_ssh() {
        for s in [
            "ssh://-oProxyCommand=touch x@host/p",
            "ssh://-oProxyCommand=x@host:22/p",
            "-oFoo@host:path",
            "-l@host:path",
            "me@-oFoo:path",
            "ssh://me@-oFoo/p",
            "[-x]:path",
        ] {
            let e = Location::parse(&OsString::from(s)).expect_err(s);
            assert_eq!(e.kind(), crate::error::ErrorKind::Usage, "{s}");
            assert!(e.to_string().contains(s), "the error names the address: {e}");
        }
        // A dash later in a name is ordinary.
        let r = remote("back-up@my-nas:/x");
        assert_eq!((r.user.as_deref(), r.host.as_str()), (Some("back-up"), "my-nas"));
    }
}
