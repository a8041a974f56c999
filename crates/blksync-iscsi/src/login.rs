//! The login phase (RFC 7143 §6, docs/ISCSI.md "Login"): connecting, the security stage with
//! CHAP and mutual CHAP, the operational stage, and `SendTargets` discovery in a session of its
//! own. Everything here runs on the caller's thread, one request and one answer at a time, with
//! a read timeout; the full feature phase ([`crate::session`]) takes the connection over after.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use blksync_core::{Error, ErrorKind, Result};

use crate::chap;
use crate::options::{Credentials, IscsiOptions};
use crate::pdu::{self, Digests, Pdu, WireError, flag, opcode};
use crate::text::{self, Pairs};

/// What we declare as `MaxRecvDataSegmentLength`: the largest Data-In we accept.
pub(crate) const OUR_MRDSL: u32 = 256 << 10;
/// The largest data segment accepted during login and discovery.
const MAX_LOGIN_SEGMENT: usize = 64 << 10;
/// Text collected over continuation PDUs: per login stage, and per `SendTargets` answer.
const MAX_LOGIN_TEXT: usize = 64 << 10;
const MAX_DISCOVERY_TEXT: usize = 1 << 20;
/// Requests sent in one stage before the target must have moved on.
const MAX_ROUNDS: usize = 16;
/// `MaxBurstLength` and `FirstBurstLength` we offer.
const OUR_MAX_BURST: u32 = 1 << 20;
const OUR_FIRST_BURST: u32 = 256 << 10;
/// Our burst limits are capped here whatever the target says (memory per command).
const BURST_CAP: u32 = 16 << 20;

/// What the operational stage agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// CRC32C digests in use.
    pub digests: Digests,
    /// The target's `MaxRecvDataSegmentLength`: the largest Data-Out (or immediate data) PDU.
    pub target_mrdsl: u32,
    /// Our `MaxRecvDataSegmentLength`.
    pub our_mrdsl: u32,
    /// `MaxBurstLength`.
    pub max_burst: u32,
    /// `FirstBurstLength`.
    pub first_burst: u32,
    /// `ImmediateData`.
    pub immediate_data: bool,
    /// `InitialR2T`.
    pub initial_r2t: bool,
    /// The session's TSIH, as the target assigned it.
    pub tsih: u16,
}

/// One connection during login: the socket and the sequence numbers so far.
pub(crate) struct Link {
    pub stream: TcpStream,
    pub digests: Digests,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub max_cmd_sn: u32,
    pub next_itt: u32,
    /// `HOST:PORT`, for messages.
    pub portal: String,
    /// What messages name (the address without password).
    pub what: String,
    /// How long each answer may take (`IscsiOptions::timeout`).
    pub timeout: Duration,
}

/// A target `SendTargets` discovery found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredTarget {
    /// Its name (IQN).
    pub name: String,
    /// Its portals, as the target wrote them: `HOST:PORT,TPGT` (brackets kept for IPv6).
    pub addresses: Vec<String>,
}

/// Connects to `host:port`, trying each of its addresses for at most `timeout`.
pub(crate) fn connect(host: &str, port: u16, what: &str, timeout: Duration) -> Result<TcpStream> {
    let portal = crate::address::portal(host, port);
    let fail = |why: String| Error::new(ErrorKind::Connection, format!("connecting to {portal} for {what}: {why}"));
    let addrs: Vec<_> = (host, port).to_socket_addrs().map_err(|e| fail(e.to_string()))?.collect();
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                s.set_nodelay(true).map_err(|e| fail(e.to_string()))?;
                s.set_read_timeout(Some(timeout)).map_err(|e| fail(e.to_string()))?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(fail(last.map_or_else(|| "the name has no address".to_string(), |e| e.to_string())))
}

/// A duration for messages: `30 s`, `2.5 s`.
pub(crate) fn seconds(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

/// 6 random bytes of `/dev/urandom` (for the ISID and CHAP challenges); the clock when it is
/// missing, which still keeps two sessions apart.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0; N];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut out)).is_err() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let seed = t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32;
        for (i, b) in out.iter_mut().enumerate() {
            *b = (seed.rotate_left(i as u32 * 7) >> 8) as u8;
        }
    }
    out
}

impl Link {
    pub(crate) fn new(stream: TcpStream, portal: String, what: String, timeout: Duration) -> Link {
        Link {
            stream,
            digests: Digests::default(),
            cmd_sn: 1,
            exp_stat_sn: 0,
            max_cmd_sn: 1,
            next_itt: 1,
            portal,
            what,
            timeout,
        }
    }

    fn itt(&mut self) -> u32 {
        let itt = self.next_itt;
        self.next_itt = self.next_itt.wrapping_add(1).max(1);
        itt
    }

    fn send(&mut self, pdu: &Pdu) -> Result<()> {
        let wire = pdu.encode(self.digests);
        self.stream.write_all(&wire).map_err(|e| {
            Error::new(ErrorKind::Connection, format!("{}: sending to {} failed: {e}", self.what, self.portal))
        })
    }

    fn recv(&mut self) -> Result<Pdu> {
        let pdu = pdu::read_pdu(&mut self.stream, self.digests, MAX_LOGIN_SEGMENT).map_err(|e| self.wire_error(&e))?;
        if pdu.opcode() != opcode::NOP_IN || pdu.itt() != pdu::RESERVED_TAG {
            self.exp_stat_sn = pdu.stat_sn().wrapping_add(1);
        }
        let (exp, max) = pdu.cmd_window();
        if !pdu::sn_after(exp, max.wrapping_add(1)) {
            self.max_cmd_sn = max;
        }
        Ok(pdu)
    }

    pub(crate) fn wire_error(&self, e: &WireError) -> Error {
        let kind = match e {
            WireError::Protocol(_) => ErrorKind::Protocol,
            WireError::Io(io) if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Error::new(
                    ErrorKind::Connection,
                    format!("{}: {} did not answer within {}", self.what, self.portal, seconds(self.timeout)),
                );
            }
            _ => ErrorKind::Connection,
        };
        let prefix = if kind == ErrorKind::Protocol { "the target broke the iSCSI protocol: " } else { "" };
        Error::new(kind, format!("{} (portal {}): {prefix}{e}", self.what, self.portal))
    }

    /// One login request and its whole answer (continuations joined).
    fn login_exchange(
        &mut self,
        isid: [u8; 6],
        tsih: u16,
        stage: (u8, u8, bool),
        keys: &[(&str, &str)],
    ) -> Result<(Pdu, Pairs)> {
        let (csg, nsg, transit) = stage;
        let mut data = text::encode(keys.iter().copied());
        let mut collected = Vec::new();
        let mut rounds = 0;
        loop {
            let mut req = Pdu::new(opcode::LOGIN_REQUEST);
            req.set_immediate();
            // A request fetching the rest of a continued answer is empty and does not transit
            // (RFC 7143 §11.12.2).
            let t = transit && rounds == 0;
            req.bhs[1] = (if t { flag::TRANSIT } else { 0 }) | (csg << 2) | nsg;
            req.bhs[8..14].copy_from_slice(&isid);
            req.bhs[14..16].copy_from_slice(&tsih.to_be_bytes());
            let itt = self.itt();
            req.set_u32(16, itt);
            req.set_u32(24, self.cmd_sn);
            req.set_u32(28, self.exp_stat_sn);
            req.data = std::mem::take(&mut data);
            self.send(&req)?;
            let resp = self.recv()?;
            if resp.opcode() != opcode::LOGIN_RESPONSE {
                return Err(self.protocol(&format!("a PDU of opcode {:#04x} during login", resp.opcode())));
            }
            if resp.itt() != itt {
                return Err(self.protocol("a login response for another task tag"));
            }
            let (class, detail) = (resp.bhs[36], resp.bhs[37]);
            if class != 0 {
                return Err(self.status_error(class, detail, &resp.data));
            }
            collected.extend_from_slice(&resp.data);
            if collected.len() > MAX_LOGIN_TEXT {
                return Err(self.protocol("more than 64 KiB of login text"));
            }
            if resp.flags() & flag::CONTINUE == 0 {
                let pairs = text::parse(&collected).map_err(|why| self.protocol(&why))?;
                return Ok((resp, pairs));
            }
            rounds += 1;
            if rounds > MAX_ROUNDS {
                return Err(self.protocol("a login text continued over too many PDUs"));
            }
            // RFC 7143 §11.12: a continued answer is fetched with empty requests, T=0.
            if transit && resp.flags() & flag::TRANSIT != 0 {
                return Err(self.protocol("a login response with both C and T set"));
            }
        }
    }

    fn protocol(&self, why: &str) -> Error {
        Error::new(
            ErrorKind::Protocol,
            format!("{} (portal {}): the target broke the iSCSI protocol: {why}", self.what, self.portal),
        )
    }

    fn status_error(&self, class: u8, detail: u8, data: &[u8]) -> Error {
        let what = &self.what;
        let code = format!("login status {class:#04x}/{detail:#04x}");
        match (class, detail) {
            (1, _) => {
                let moved = text::parse(data).ok().and_then(|p| text::get(&p, "TargetAddress").map(String::from));
                Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "{what}: the target moved to {} ({code}); use that portal",
                        moved.as_deref().unwrap_or("another portal")
                    ),
                )
            }
            (2, 1) => Error::new(ErrorKind::PermissionDenied, format!("{what}: authentication failed ({code})")),
            (2, 2) => Error::new(
                ErrorKind::PermissionDenied,
                format!("{what}: the target does not allow this initiator ({code}: authorization failure)"),
            ),
            (2, 3) => Error::new(
                ErrorKind::NotFound,
                format!("{what}: the portal {} has no such target ({code})", self.portal),
            ),
            (2, 4) => Error::new(ErrorKind::NotFound, format!("{what}: the target was removed ({code})")),
            (2, _) => Error::new(
                ErrorKind::Protocol,
                format!("{what}: the target refused the login ({code}: initiator error)"),
            ),
            (3, _) => Error::new(
                ErrorKind::Connection,
                format!("{what}: the target could not log us in ({code}: target error)"),
            ),
            _ => Error::new(ErrorKind::Protocol, format!("{what}: the login failed ({code})")),
        }
    }
}

/// Who logs in, to what.
pub(crate) struct Login<'a> {
    pub initiator: &'a str,
    /// `None` for a discovery session.
    pub target: Option<&'a str>,
    pub credentials: &'a Credentials,
    pub prefer_digests: bool,
}

/// Runs the login on `link`; on success the link is in the full feature phase.
pub(crate) fn login(link: &mut Link, who: &Login<'_>) -> Result<Negotiated> {
    let isid = {
        let r: [u8; 5] = random_bytes();
        [0x80, r[0], r[1], r[2], r[3], r[4]]
    };
    let session_type = if who.target.is_some() { "Normal" } else { "Discovery" };
    let mut first: Vec<(&str, &str)> = vec![("InitiatorName", who.initiator), ("SessionType", session_type)];
    if let Some(t) = who.target {
        first.push(("TargetName", t));
    }
    let mut all: Pairs = Vec::new();
    // Security stage.
    let (mut resp, pairs) = if let Some(ours) = &who.credentials.initiator {
        first.push(("AuthMethod", "CHAP,None"));
        let (_, pairs) = link.login_exchange(isid, 0, (0, 1, false), &first)?;
        match text::get(&pairs, "AuthMethod") {
            Some("CHAP") => chap_exchange(link, isid, who.credentials, ours)?,
            Some("None") => link.login_exchange(isid, 0, (0, 1, true), &[])?,
            other => {
                return Err(link.protocol(&format!("AuthMethod answered {other:?} to an offer of CHAP,None")));
            }
        }
    } else {
        first.push(("AuthMethod", "None"));
        match link.login_exchange(isid, 0, (0, 1, true), &first) {
            Err(e) if e.kind() == ErrorKind::PermissionDenied && e.message().contains("authentication failed") => {
                return Err(Error::new(
                    ErrorKind::PermissionDenied,
                    format!(
                        "{e}: the target requires CHAP; give the user in the address (iscsi://USER@…) and the secret in LIBISCSI_CHAP_PASSWORD or a secrets file"
                    ),
                ));
            }
            other => other?,
        }
    };
    all.extend(pairs);
    let mut rounds = 0;
    while !(resp.flags() & flag::TRANSIT != 0 && resp.flags() & 3 == 1) {
        rounds += 1;
        if rounds > MAX_ROUNDS {
            return Err(link.protocol("the target never left the security stage"));
        }
        let (r, p) = link.login_exchange(isid, 0, (0, 1, true), &[])?;
        resp = r;
        all.extend(p);
    }
    if let Some(theirs) = &who.credentials.target {
        // Mutual CHAP was checked in chap_exchange; make sure it was not skipped.
        let _ = theirs;
        if text::get(&all, "CHAP_R").is_none() {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("{}: the target did not prove its identity (mutual CHAP was asked for)", link.what),
            ));
        }
    }
    // Operational stage.
    let digest = if who.prefer_digests { "CRC32C,None" } else { "None,CRC32C" };
    let (mrdsl, max_burst, first_burst) =
        (OUR_MRDSL.to_string(), OUR_MAX_BURST.to_string(), OUR_FIRST_BURST.to_string());
    let mut ops: Vec<(&str, &str)> = vec![
        ("HeaderDigest", digest),
        ("DataDigest", digest),
        ("MaxRecvDataSegmentLength", &mrdsl),
        ("DefaultTime2Wait", "0"),
        ("DefaultTime2Retain", "0"),
        ("IFMarker", "No"),
        ("OFMarker", "No"),
        ("ErrorRecoveryLevel", "0"),
    ];
    if who.target.is_some() {
        ops.extend([
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", max_burst.as_str()),
            ("FirstBurstLength", first_burst.as_str()),
            ("MaxOutstandingR2T", "1"),
            ("MaxConnections", "1"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
        ]);
    }
    let mut ops_answers: Pairs = Vec::new();
    let (mut resp, pairs) = link.login_exchange(isid, 0, (1, 3, true), &ops)?;
    ops_answers.extend(pairs);
    let mut rounds = 0;
    while !(resp.flags() & flag::TRANSIT != 0 && resp.flags() & 3 == 3) {
        rounds += 1;
        if rounds > MAX_ROUNDS {
            return Err(link.protocol("the target never entered the full feature phase"));
        }
        let (r, p) = link.login_exchange(isid, 0, (1, 3, true), &[])?;
        resp = r;
        ops_answers.extend(p);
    }
    let negotiated =
        negotiate(&ops_answers, u16::from_be_bytes([resp.bhs[14], resp.bhs[15]])).map_err(|why| link.protocol(&why))?;
    link.digests = negotiated.digests;
    Ok(negotiated)
}

fn chap_exchange(
    link: &mut Link,
    isid: [u8; 6],
    credentials: &Credentials,
    ours: &crate::options::Secret,
) -> Result<(Pdu, Pairs)> {
    let (_, pairs) = link.login_exchange(isid, 0, (0, 1, false), &[("CHAP_A", "5")])?;
    if text::get(&pairs, "CHAP_A") != Some("5") {
        return Err(link.protocol(&format!("CHAP_A answered {:?} to an offer of 5 (MD5)", text::get(&pairs, "CHAP_A"))));
    }
    let id = text::get(&pairs, "CHAP_I").and_then(text::number).filter(|n| *n <= 255);
    let challenge = text::get(&pairs, "CHAP_C").and_then(|c| chap::decode_binary(c, 1024));
    let (Some(id), Some(challenge)) = (id, challenge) else {
        return Err(link.protocol("CHAP without a valid CHAP_I and CHAP_C"));
    };
    let answer = chap::hex(&chap::response(id as u8, &ours.secret, &challenge));
    let user = ours.user.clone().unwrap_or_default();
    let mut keys: Vec<(&str, &str)> = vec![("CHAP_N", &user), ("CHAP_R", &answer)];
    let mutual = credentials.target.as_ref().map(|theirs| {
        let id: [u8; 1] = random_bytes();
        let ours: [u8; 16] = random_bytes();
        (theirs, id[0], ours)
    });
    let (mutual_id, mutual_challenge);
    if let Some((_, id, challenge)) = &mutual {
        if challenge[..] == challenge_bytes(&pairs)[..] {
            return Err(link.protocol("the target's CHAP challenge equals ours"));
        }
        mutual_id = id.to_string();
        mutual_challenge = chap::hex(challenge);
        keys.push(("CHAP_I", &mutual_id));
        keys.push(("CHAP_C", &mutual_challenge));
    }
    let (resp, pairs) = match link.login_exchange(isid, 0, (0, 1, true), &keys) {
        Err(e) if e.kind() == ErrorKind::PermissionDenied && e.message().contains("authentication failed") => {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "{}: CHAP authentication failed for user {user:?} (wrong user or password?; from {})",
                    link.what,
                    if credentials.source.is_empty() { "the address" } else { &credentials.source }
                ),
            ));
        }
        other => other?,
    };
    if let Some((theirs, id, challenge)) = mutual {
        let expected = chap::hex(&chap::response(id, &theirs.secret, &challenge));
        let name_ok = theirs.user.as_deref().is_none_or(|u| text::get(&pairs, "CHAP_N") == Some(u));
        let response = text::get(&pairs, "CHAP_R").and_then(|r| chap::decode_binary(r, 16)).map(|r| chap::hex(&r));
        if !name_ok || response.as_deref() != Some(expected.as_str()) {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "{}: the target failed mutual CHAP: it does not know the target secret{}",
                    link.what,
                    if name_ok { "" } else { " (or its CHAP_N is not LIBISCSI_CHAP_TARGET_USERNAME)" }
                ),
            ));
        }
    }
    Ok((resp, pairs))
}

fn challenge_bytes(pairs: &Pairs) -> Vec<u8> {
    text::get(pairs, "CHAP_C").and_then(|c| chap::decode_binary(c, 1024)).unwrap_or_default()
}

/// The operational values from the target's answers (keys it did not answer keep the RFC's
/// defaults; what cannot be an answer to our offer is an error).
pub(crate) fn negotiate(answers: &Pairs, tsih: u16) -> Result<Negotiated, String> {
    let refused = |v: &str| matches!(v, "Reject" | "Irrelevant" | "NotUnderstood");
    let get = |key: &str| text::get(answers, key).filter(|v| !refused(v));
    let digest = |key: &str| match get(key) {
        None | Some("None") => Ok(false),
        Some("CRC32C") => Ok(true),
        Some(other) => Err(format!("{key}={other}, which was not offered")),
    };
    let num = |key: &str, default: u32| match get(key) {
        None => Ok(default),
        Some(v) => text::number(v).ok_or_else(|| format!("{key}={v:.32} is not a number")),
    };
    let boolean = |key: &str, default: bool| match get(key) {
        None => Ok(default),
        Some("Yes") => Ok(true),
        Some("No") => Ok(false),
        Some(v) => Err(format!("{key}={v:.32} is neither Yes nor No")),
    };
    let target_mrdsl = num("MaxRecvDataSegmentLength", 8192)?;
    if !(512..1 << 24).contains(&target_mrdsl) {
        return Err(format!("MaxRecvDataSegmentLength={target_mrdsl} is outside 512..2^24-1"));
    }
    let max_burst = num("MaxBurstLength", 262_144)?.min(OUR_MAX_BURST).min(BURST_CAP);
    let first_burst = num("FirstBurstLength", 65536)?.min(OUR_FIRST_BURST).min(max_burst);
    if max_burst < 512 || first_burst < 512 {
        return Err(format!("MaxBurstLength={max_burst}, FirstBurstLength={first_burst}: below 512"));
    }
    if num("ErrorRecoveryLevel", 0)? != 0 {
        return Err("ErrorRecoveryLevel other than 0 answered to an offer of 0".into());
    }
    Ok(Negotiated {
        digests: Digests { header: digest("HeaderDigest")?, data: digest("DataDigest")? },
        target_mrdsl,
        our_mrdsl: OUR_MRDSL,
        max_burst,
        first_burst,
        // The result functions: ImmediateData is AND (ours Yes), InitialR2T is OR (ours No).
        immediate_data: boolean("ImmediateData", true)?,
        initial_r2t: boolean("InitialR2T", true)?,
        tsih,
    })
}

/// Sends a Logout Request (close the session) and waits for its answer.
pub(crate) fn logout(link: &mut Link) -> Result<()> {
    let mut req = Pdu::new(opcode::LOGOUT_REQUEST);
    req.set_immediate();
    req.bhs[1] = flag::FINAL;
    let itt = link.itt();
    req.set_u32(16, itt);
    req.set_u32(24, link.cmd_sn);
    req.set_u32(28, link.exp_stat_sn);
    link.send(&req)?;
    let resp = link.recv()?;
    if resp.opcode() != opcode::LOGOUT_RESPONSE || resp.bhs[2] != 0 {
        return Err(link.protocol("the logout was not answered with success"));
    }
    Ok(())
}

/// `SendTargets`=All in a discovery session on `link` (logged in), then logout.
pub(crate) fn send_targets(link: &mut Link) -> Result<Vec<DiscoveredTarget>> {
    let mut collected = Vec::new();
    let mut ttt = pdu::RESERVED_TAG;
    let mut data = text::encode([("SendTargets", "All")]);
    for _ in 0..=MAX_ROUNDS * 4 {
        let mut req = Pdu::new(opcode::TEXT_REQUEST);
        req.set_immediate();
        req.bhs[1] = flag::FINAL;
        let itt = link.itt();
        req.set_u32(16, itt);
        req.set_u32(20, ttt);
        req.set_u32(24, link.cmd_sn);
        req.set_u32(28, link.exp_stat_sn);
        req.data = std::mem::take(&mut data);
        link.send(&req)?;
        let resp = loop {
            let r = link.recv()?;
            if r.opcode() != opcode::NOP_IN {
                break r;
            }
        };
        if resp.opcode() != opcode::TEXT_RESPONSE || resp.itt() != itt {
            return Err(link.protocol(&format!("a PDU of opcode {:#04x} in answer to SendTargets", resp.opcode())));
        }
        collected.extend_from_slice(&resp.data);
        if collected.len() > MAX_DISCOVERY_TEXT {
            return Err(link.protocol("more than 1 MiB of SendTargets text"));
        }
        if resp.flags() & flag::CONTINUE == 0 {
            let pairs = text::parse(&collected).map_err(|why| link.protocol(&why))?;
            let mut out: Vec<DiscoveredTarget> = Vec::new();
            for (k, v) in pairs {
                match (k.as_str(), out.last_mut()) {
                    ("TargetName", _) => out.push(DiscoveredTarget { name: v, addresses: Vec::new() }),
                    ("TargetAddress", Some(t)) => t.addresses.push(v),
                    _ => {}
                }
            }
            let _ = logout(link);
            return Ok(out);
        }
        ttt = resp.ttt();
    }
    Err(link.protocol("a SendTargets answer continued over too many PDUs"))
}

/// Lists the targets of the portal of `address` (`iscsi://[USER@]HOST[:PORT][/…]`, or plain
/// `HOST[:PORT]`) with `SendTargets` discovery: for `blksync list-targets`, and for the message
/// about a target name the portal does not have.
pub fn discover(address: &str, options: &IscsiOptions) -> Result<Vec<DiscoveredTarget>> {
    let address = crate::address::parse_portal(address)?;
    let what = address.to_string();
    let credentials = Credentials::gather(&address, options)?;
    let stream = connect(address.host(), address.port(), &what, options.timeout)?;
    let mut link = Link::new(stream, address.portal(), what, options.timeout);
    let initiator = options.initiator();
    login(
        &mut link,
        &Login { initiator: &initiator, target: None, credentials: &credentials, prefer_digests: options.digests },
    )?;
    send_targets(&mut link)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Pairs {
        p.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect()
    }

    #[test]
    fn unanswered_keys_take_the_rfc_defaults() {
        // What tgtd answers: no MaxRecvDataSegmentLength.
        let n = negotiate(
            &pairs(&[
                ("HeaderDigest", "None"),
                ("InitialR2T", "Yes"),
                ("MaxBurstLength", "262144"),
                ("FirstBurstLength", "65536"),
            ]),
            5,
        )
        .unwrap();
        assert_eq!(n.target_mrdsl, 8192);
        assert!(n.initial_r2t && n.immediate_data && !n.digests.header);
        assert_eq!((n.max_burst, n.first_burst, n.tsih), (262_144, 65536, 5));
        let d = negotiate(&pairs(&[]), 0).unwrap();
        assert_eq!((d.max_burst, d.first_burst), (262_144, 65536));
    }

    #[test]
    fn answers_outside_the_offer_are_refused() {
        assert!(negotiate(&pairs(&[("HeaderDigest", "MD5")]), 0).is_err());
        assert!(negotiate(&pairs(&[("MaxRecvDataSegmentLength", "100")]), 0).is_err());
        assert!(negotiate(&pairs(&[("MaxBurstLength", "abc")]), 0).is_err());
        assert!(negotiate(&pairs(&[("ErrorRecoveryLevel", "2")]), 0).is_err());
        let n = negotiate(&pairs(&[("MaxBurstLength", "99999999"), ("DataDigest", "CRC32C")]), 0).unwrap();
        assert_eq!(n.max_burst, OUR_MAX_BURST, "never above our offer");
        assert!(n.digests.data);
        let n = negotiate(&pairs(&[("MaxBurstLength", "NotUnderstood")]), 0).unwrap();
        assert_eq!(n.max_burst, 262_144);
    }
}
