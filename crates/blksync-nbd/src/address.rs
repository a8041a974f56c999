//! NBD addresses, as the NBD project's URI standard (`doc/uri.md`) writes them:
//! `nbd://HOST[:PORT]/EXPORT` and `nbd+unix:///EXPORT?socket=PATH`.
//!
//! The export name is the path after its first `/`, percent-decoded, so `nbd://h//disk` names
//! `/disk` and `nbd://h` the default export (the empty name). Whatever this client would
//! otherwise ignore is refused, quoting the address as written: an unknown query parameter, TLS
//! parameters (asking for TLS and silently getting none would be a downgrade), a user name (only
//! TLS uses one), a host on a unix socket. `nbds://` and `nbds+unix://` are `Unsupported`.

use std::ffi::OsString;
use std::fmt;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use blksync_core::{Error, ErrorKind, Result};

/// The port IANA assigned to NBD, used when an `nbd://` address names none.
pub const DEFAULT_PORT: u16 = 10809;

/// The protocol's limit on a string (an export name): 4096 bytes.
pub const MAX_NAME: usize = 4096;

/// How to reach the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// TCP to a host name or address (IPv6 without brackets) and a port.
    Tcp {
        /// Host name, IPv4 or IPv6 address.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A unix socket at a path (relative to the working directory unless absolute).
    Unix(PathBuf),
    /// A unix socket in Linux's abstract namespace (`socket=%00name`), without the NUL.
    Abstract(Vec<u8>),
}

/// A parsed NBD address; `Display` gives it back as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdAddress {
    written: String,
    transport: Transport,
    export: String,
}

impl NbdAddress {
    /// How to reach the server.
    #[must_use]
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The export's name ("" for the server's default export).
    #[must_use]
    pub fn export(&self) -> &str {
        &self.export
    }

    /// The address as the user wrote it.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.written
    }
}

impl fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.written)
    }
}

/// Says whether `address` is one this crate opens (`nbd://`, `nbd+unix://`, or the TLS forms
/// that [`parse`] refuses with a clear message).
#[must_use]
pub fn is_nbd(address: &str) -> bool {
    let Some((scheme, _)) = address.split_once("://") else { return false };
    ["nbd", "nbd+unix", "nbds", "nbds+unix"].iter().any(|s| scheme.eq_ignore_ascii_case(s))
}

/// Parses an `nbd://` or `nbd+unix://` address.
///
/// Errors are `Usage`, naming the address as written, except TLS (`nbds://`, `nbds+unix://`,
/// `tls-*` parameters), which is `Unsupported`.
pub fn parse(address: &str) -> Result<NbdAddress> {
    let usage = |why: &str| Error::usage(format!("{address}: {why}"));
    let tls = || {
        Error::new(
            ErrorKind::Unsupported,
            format!("{address}: NBD over TLS is not supported; use nbd:// through an ssh tunnel"),
        )
    };
    let (scheme, rest) = address.split_once("://").ok_or_else(|| usage("not an NBD address (nbd://HOST/EXPORT)"))?;
    let unix = match scheme.to_ascii_lowercase().as_str() {
        "nbd" => false,
        "nbd+unix" => true,
        "nbds" | "nbds+unix" => return Err(tls()),
        _ => return Err(usage("not an NBD address (nbd://HOST/EXPORT or nbd+unix:///EXPORT?socket=PATH)")),
    };
    if rest.contains('#') {
        return Err(usage("an NBD address has no #fragment"));
    }
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = rest.find('/').map_or((rest, ""), |i| (&rest[..i], &rest[i..]));

    let mut socket = None;
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        match key {
            "socket" if !unix => return Err(usage("socket= is for nbd+unix:// addresses")),
            "socket" if socket.is_some() => return Err(usage("socket= is given twice")),
            "socket" => socket = Some(decode(value).map_err(|e| usage(&e))?),
            k if k.starts_with("tls-") => return Err(tls()),
            k => return Err(usage(&format!("unknown parameter {k:?} (the only one is socket=, for nbd+unix://)"))),
        }
    }

    let export = decode(path.strip_prefix('/').unwrap_or(path)).map_err(|e| usage(&e))?;
    let export = String::from_utf8(export).map_err(|_| usage("the export name is not UTF-8"))?;
    if export.contains('\0') {
        return Err(usage("the export name contains a NUL byte"));
    }
    if export.len() > MAX_NAME {
        return Err(usage("the export name is longer than the protocol's 4096 bytes"));
    }

    let transport = if unix {
        if !authority.is_empty() {
            return Err(usage("nbd+unix:// takes no host: nbd+unix:///EXPORT?socket=PATH"));
        }
        match socket {
            None => return Err(usage("nbd+unix:// needs the socket: nbd+unix:///EXPORT?socket=PATH")),
            Some(s) if s.is_empty() => return Err(usage("the socket= path is empty")),
            Some(s) if s[0] == 0 => Transport::Abstract(s[1..].to_vec()),
            Some(s) => Transport::Unix(PathBuf::from(OsString::from_vec(s))),
        }
    } else {
        let (host, port) = split_authority(authority).map_err(|e| usage(&e))?;
        Transport::Tcp { host, port }
    };
    Ok(NbdAddress { written: address.to_string(), transport, export })
}

/// `HOST[:PORT]` or `[V6]:PORT`, with the port defaulting to 10809.
fn split_authority(authority: &str) -> Result<(String, u16), String> {
    if authority.contains('@') {
        return Err("a user name in an NBD address is for TLS, which is not supported".into());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("unclosed [ in the host")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("expected :PORT after ]")?),
        };
        (host.to_string(), port)
    } else {
        match authority.split_once(':') {
            Some((_, p)) if p.contains(':') => {
                return Err("an IPv6 address is written in brackets: nbd://[::1]/".into());
            }
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let host = String::from_utf8(decode(&host)?).map_err(|_| "the host name is not UTF-8".to_string())?;
    if host.is_empty() {
        return Err("no host: nbd://HOST[:PORT]/EXPORT (a unix socket is nbd+unix:///EXPORT?socket=PATH)".into());
    }
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(format!("bad port {p:?}")),
        },
    };
    Ok((host, port))
}

/// Percent-decoding (RFC 3986): `%XX` is the byte XX; everything else stands for itself.
fn decode(text: &str) -> Result<Vec<u8>, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte =
                hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or("a % is not followed by two hex digits")?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(a: &str) -> (String, u16, String) {
        let p = parse(a).unwrap();
        assert_eq!(p.to_string(), a, "Display gives the address back as written");
        match p.transport() {
            Transport::Tcp { host, port } => (host.clone(), *port, p.export().to_string()),
            t => panic!("{a}: {t:?}"),
        }
    }

    #[test]
    fn export_names_follow_the_uri_standard_table() {
        for (address, export) in [
            ("nbd://example.com/disk", "disk"),
            ("nbd://example.com/", ""),
            ("nbd://example.com", ""),
            ("nbd://example.com//disk", "/disk"),
            ("nbd://example.com/hello%20world", "hello world"),
            ("nbd://example.com/a%2fb", "a/b"),
        ] {
            assert_eq!(tcp(address), ("example.com".into(), DEFAULT_PORT, export.into()), "{address}");
        }
        let p = parse("nbd+unix:///disk?socket=sock").unwrap();
        assert_eq!((p.transport(), p.export()), (&Transport::Unix("sock".into()), "disk"));
    }

    #[test]
    fn hosts_ports_and_ipv6() {
        assert_eq!(tcp("nbd://127.0.0.1:10810/x"), ("127.0.0.1".into(), 10810, "x".into()));
        assert_eq!(tcp("nbd://[::1]:9/x"), ("::1".into(), 9, "x".into()));
        assert_eq!(tcp("nbd://[fe80::1]/"), ("fe80::1".into(), DEFAULT_PORT, String::new()));
        assert_eq!(tcp("nbd://h:/e"), ("h".into(), DEFAULT_PORT, "e".into()));
        assert_eq!(tcp("NBD://h/e").0, "h", "schemes are case-insensitive");
    }

    #[test]
    fn unix_sockets_plain_relative_escaped_and_abstract() {
        let p = parse("nbd+unix:///?socket=/run/a%20b.sock").unwrap();
        assert_eq!((p.transport(), p.export()), (&Transport::Unix("/run/a b.sock".into()), ""));
        let p = parse("nbd+unix:///e?socket=%00lab").unwrap();
        assert_eq!(p.transport(), &Transport::Abstract(b"lab".to_vec()));
        let p = parse("nbd+unix:///e?socket=%ff").unwrap();
        assert_eq!(p.transport(), &Transport::Unix(PathBuf::from(OsString::from_vec(vec![0xff]))));
    }

    #[test]
    fn tls_is_unsupported_with_the_way_around_it() {
        for a in ["nbds://h/e", "nbds+unix:///e?socket=s", "nbd://h/e?tls-type=x509", "NBDS://h/"] {
            let e = parse(a).expect_err(a);
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{a}");
            assert!(e.to_string().contains(a) && e.to_string().contains("ssh tunnel"), "{e}");
        }
    }

    #[test]
    fn bad_addresses_are_usage_errors_naming_the_address() {
        for a in [
            "nbd:///e",
            "nbd://h:99999/e",
            "nbd://h:0/e",
            "nbd://h:+1/e",
            "nbd://h:x/e",
            "nbd://::1/e",
            "nbd://[::1/e",
            "nbd://[::1]x/e",
            "nbd://user@h/e",
            "nbd://h/e?socket=s",
            "nbd://h/e?x-foo=1",
            "nbd://h/e#frag",
            "nbd://h/%zz",
            "nbd://h/%4",
            "nbd://h/a%00b",
            "nbd://h/%ff",
            "nbd+unix:///e",
            "nbd+unix:///e?socket=",
            "nbd+unix://h/e?socket=s",
            "nbd+unix:///e?socket=a&socket=b",
            "http://h/e",
            "disk.img",
        ] {
            let e = parse(a).expect_err(a);
            assert_eq!(e.kind(), ErrorKind::Usage, "{a}: {e}");
            assert!(e.to_string().starts_with(a), "{e}");
        }
        let long = format!("nbd://h/{}", "x".repeat(MAX_NAME + 1));
        assert_eq!(parse(&long).unwrap_err().kind(), ErrorKind::Usage);
        assert!(parse(&format!("nbd://h/{}", "x".repeat(MAX_NAME))).is_ok());
    }

    #[test]
    fn which_addresses_are_nbd() {
        assert!(is_nbd("nbd://h/e") && is_nbd("nbd+unix:///e?socket=s") && is_nbd("nbds://h/"));
        assert!(!is_nbd("loop://x") && !is_nbd("/dev/sda") && !is_nbd("nbd"));
    }
}
