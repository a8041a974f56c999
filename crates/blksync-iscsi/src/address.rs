//! iSCSI addresses, as libiscsi and qemu write them (docs/ISCSI.md, "Addresses"):
//! `iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET-IQN/LUN`, and bsync's form without `/LUN`,
//! which means the first disk LUN. IPv6 hosts are written in brackets.
//!
//! `Display` never shows the password: every message names the address, and messages reach
//! logs and terminals that others read.

use std::fmt;

use blksync_core::{Error, Result};

/// The port IANA assigned to iSCSI, used when an address names none.
pub const DEFAULT_PORT: u16 = 3260;

/// The largest LUN of single-level addressing (SAM-5 §4.7.3), which is what tgtd and LIO use.
pub const MAX_LUN: u16 = 16383;

/// A parsed `iscsi://` address.
#[derive(Clone, PartialEq, Eq)]
pub struct IscsiAddress {
    host: String,
    port: u16,
    iqn: String,
    lun: Option<u16>,
    user: Option<String>,
    password: Option<String>,
}

impl fmt::Debug for IscsiAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IscsiAddress")
            .field("portal", &self.portal())
            .field("iqn", &self.iqn)
            .field("lun", &self.lun)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "…"))
            .finish_non_exhaustive()
    }
}

impl IscsiAddress {
    /// Host name or address (IPv6 without brackets).
    #[must_use]
    pub fn host(&self) -> &str {
        &self.host
    }

    /// TCP port.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `HOST:PORT`, brackets around an IPv6 address: what `connect` and messages use.
    #[must_use]
    pub fn portal(&self) -> String {
        portal(&self.host, self.port)
    }

    /// The target's name.
    #[must_use]
    pub fn iqn(&self) -> &str {
        &self.iqn
    }

    /// The LUN, or `None` for "the first disk LUN".
    #[must_use]
    pub fn lun(&self) -> Option<u16> {
        self.lun
    }

    /// The CHAP user written in the address.
    #[must_use]
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The CHAP secret written in the address (accepted, never required: see
    /// [`crate::Credentials`]).
    #[must_use]
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// The same address with another LUN (after REPORT LUNS chose one).
    #[must_use]
    pub fn with_lun(&self, lun: u16) -> IscsiAddress {
        IscsiAddress { lun: Some(lun), ..self.clone() }
    }
}

/// `HOST:PORT`, with brackets around an IPv6 address.
#[must_use]
pub fn portal(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

impl fmt::Display for IscsiAddress {
    /// The address without the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "iscsi://")?;
        if let Some(user) = &self.user {
            write!(f, "{}@", escape(user))?;
        }
        write!(f, "{}", self.portal())?;
        if !self.iqn.is_empty() {
            write!(f, "/{}", escape(&self.iqn))?;
        }
        if let Some(lun) = self.lun {
            write!(f, "/{lun}")?;
        }
        Ok(())
    }
}

/// True when `address` is meant for this crate (`iscsi://`, any case).
#[must_use]
pub fn is_iscsi(address: &str) -> bool {
    address.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("iscsi://"))
}

/// Parses an `iscsi://` address.
pub fn parse(address: &str) -> Result<IscsiAddress> {
    // Messages about a bad address quote it without whatever may be a password.
    let shown = redact(address);
    let bad = |why: &str| Error::usage(format!("{shown}: {why} (iscsi://[USER@]HOST[:PORT]/TARGET-IQN[/LUN])"));
    if !is_iscsi(address) {
        return Err(bad("not an iscsi:// address"));
    }
    let rest = &address[8..];
    if rest.contains(['?', '#']) {
        return Err(bad("query strings and fragments are not supported"));
    }
    let (authority, path) = rest.split_once('/').ok_or_else(|| bad("no target IQN"))?;
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, password) = match userinfo {
        None => (None, None),
        Some(u) => {
            let (user, password) = split_userinfo(u);
            let user = decode(user).ok_or_else(|| bad("the user is not valid percent-encoded UTF-8"))?;
            if user.is_empty() {
                return Err(bad("an empty user"));
            }
            let password = password
                .map(|p| decode(p).ok_or_else(|| bad("the password is not valid percent-encoded UTF-8")))
                .transpose()?;
            (Some(user), password)
        }
    };
    let (host, port) = split_host(hostport).ok_or_else(|| bad("a bad host or port"))?;
    let mut parts = path.split('/');
    let iqn = decode(parts.next().unwrap_or("")).ok_or_else(|| bad("the IQN is not valid percent-encoded UTF-8"))?;
    if iqn.is_empty() {
        return Err(bad("no target IQN"));
    }
    if iqn.len() > 223 || iqn.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("an iSCSI name has at most 223 bytes and no spaces"));
    }
    let lun = match parts.next() {
        None | Some("") => None,
        Some(l) => Some(
            l.parse::<u16>()
                .ok()
                .filter(|n| *n <= MAX_LUN && l.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| bad("the LUN must be a number from 0 to 16383"))?,
        ),
    };
    if parts.next().is_some() {
        return Err(bad("more path after the LUN"));
    }
    Ok(IscsiAddress { host, port, iqn, lun, user, password })
}

/// Parses a portal for discovery: `iscsi://[USER[%PASSWORD]@]HOST[:PORT][/…]` (anything after
/// the host is ignored) or a plain `HOST[:PORT]`. The result has an empty IQN and no LUN.
pub fn parse_portal(address: &str) -> Result<IscsiAddress> {
    let full = if is_iscsi(address) { address.to_string() } else { format!("iscsi://{address}") };
    let (scheme_host, _) = match full[8..].find('/') {
        Some(i) => full.split_at(8 + i),
        None => (full.as_str(), ""),
    };
    let parsed = parse(&format!("{scheme_host}/portal"))?;
    Ok(IscsiAddress { iqn: String::new(), lun: None, ..parsed })
}

/// `USER%PASSWORD`: the first `%` that does not start a two-hex-digit escape separates them,
/// so that `%25` in a user is still a literal `%` (libiscsi splits at the first `%`; a user
/// with an escape in it is rare, a password after `%` is the convention).
fn split_userinfo(u: &str) -> (&str, Option<&str>) {
    let bytes = u.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let escape = bytes.get(i + 1..i + 3).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit));
            // `%` + 2 hex digits is ambiguous: libiscsi reads it as the separator. Follow it
            // unless the user asked for an escape explicitly with `%25`.
            if !escape || !u[i + 1..].starts_with("25") {
                return (&u[..i], Some(&u[i + 1..]));
            }
            i += 3;
            continue;
        }
        i += 1;
    }
    (u, None)
}

fn split_host(hostport: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        if !host.contains(':') {
            return None;
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (host, port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() || host.contains(['[', ']', '@', '/', '%']) || (host.contains(':') && !hostport.starts_with('['))
    {
        return None;
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok().filter(|p| *p != 0)?,
        Some(_) => return None,
    };
    Some((host.to_string(), port))
}

/// Percent-decodes to UTF-8.
fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let h = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().filter(|s| !s.contains('\0'))
}

/// Escapes what would not read back the same in an address.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' | '/' | '@' | '?' | '#' | ' ' => {
                use std::fmt::Write;
                let _ = write!(out, "%{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// The address with anything between `://` and `@` after the first `%` replaced, for messages
/// about an address that did not parse.
#[must_use]
pub fn redact(address: &str) -> String {
    let Some(start) = address.find("://").map(|i| i + 3) else { return address.to_string() };
    let end = address[start..].find('/').map_or(address.len(), |i| start + i);
    match address[start..end].rfind('@') {
        Some(at) if address[start..start + at].contains('%') => {
            let user_end = start + address[start..start + at].find('%').unwrap_or(at);
            format!("{}%…{}", &address[..user_end], &address[start + at..])
        }
        _ => address.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_libiscsi_form_with_user_password_port_and_lun() {
        let a = parse("iscsi://joe%s3cret@10.0.0.1:3261/iqn.2024-01.lab.test:disk/1").unwrap();
        assert_eq!(
            (a.host(), a.port(), a.iqn(), a.lun(), a.user(), a.password()),
            ("10.0.0.1", 3261, "iqn.2024-01.lab.test:disk", Some(1), Some("joe"), Some("s3cret"))
        );
        assert_eq!(a.to_string(), "iscsi://joe@10.0.0.1:3261/iqn.2024-01.lab.test:disk/1", "no password shown");
        assert!(!format!("{a:?}").contains("s3cret"));
    }

    #[test]
    fn bsync_form_without_lun_and_default_port() {
        let a = parse("iscsi://portal.example/iqn.2000-01.example:t0").unwrap();
        assert_eq!((a.port(), a.lun(), a.user()), (3260, None, None));
        assert_eq!(parse("iscsi://h/iqn.x/").unwrap().lun(), None);
        assert_eq!(a.with_lun(3).lun(), Some(3));
    }

    #[test]
    fn ipv6_in_brackets() {
        let a = parse("iscsi://[::1]:3300/iqn.x/0").unwrap();
        assert_eq!((a.host(), a.port(), a.portal()), ("::1", 3300, "[::1]:3300".to_string()));
        assert_eq!(parse("iscsi://[2001:db8::1]/iqn.x/0").unwrap().port(), 3260);
        assert!(parse("iscsi://::1/iqn.x/0").is_err());
    }

    #[test]
    fn a_user_without_password_and_escapes() {
        let a = parse("iscsi://joe@h/iqn.x/2").unwrap();
        assert_eq!((a.user(), a.password()), (Some("joe"), None));
        let a = parse("iscsi://joe%pa%40ss@h/iqn.x/2").unwrap();
        assert_eq!((a.user(), a.password()), (Some("joe"), Some("pa@ss")));
    }

    #[test]
    fn bad_addresses_are_usage_errors_that_hide_the_password() {
        for bad in [
            "nbd://h/x",
            "iscsi://h",
            "iscsi://h/",
            "iscsi://h:0/iqn/1",
            "iscsi://h:x/iqn/1",
            "iscsi://h/iqn/16384",
            "iscsi://h/iqn/-1",
            "iscsi://h/iqn/1/2",
            "iscsi://h/iqn/1?x=y",
            "iscsi://@h/iqn/1",
            "iscsi:///iqn/1",
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.kind(), blksync_core::ErrorKind::Usage, "{bad}");
        }
        let p = parse_portal("127.0.0.1:3261").unwrap();
        assert_eq!(
            (p.portal(), p.iqn(), p.to_string()),
            ("127.0.0.1:3261".to_string(), "", "iscsi://127.0.0.1:3261".to_string())
        );
        assert_eq!(parse_portal("iscsi://u%p@[::1]/iqn.x/1").unwrap().password(), Some("p"));
        let e = parse("iscsi://joe%topsecret@h:x/iqn/1").unwrap_err();
        assert!(!e.to_string().contains("topsecret"), "{e}");
    }
}
