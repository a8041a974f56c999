//! Helpers of the NBD integration tests: real servers started through `tests/lab/nbd` (stopped
//! when the guard drops), an in-test server for what no real server does (only
//! `NBD_OPT_EXPORT_NAME`, garbage), and the nbdkit log parsed into requests.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use blksync_nbd::wire::option::{ExportName, Go, Greeting, Info, MetaContext, MetaContextQuery, OptionHeader, reply};
use blksync_nbd::wire::transmission::{ReplyHeader, Request, SimpleReply};
use blksync_nbd::wire::{cmd, handshake_flag, opt, rep, transmission_flag};

/// True when `tool` runs here. Without it a test prints `skipping: …` and passes, unless
/// `BLKSYNC_REQUIRE_NBD=1`, which makes the missing tool a failure.
pub fn have(tool: &str) -> bool {
    let found = Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("BLKSYNC_REQUIRE_NBD").as_deref() != Ok("1"),
            "{tool} is not installed (BLKSYNC_REQUIRE_NBD=1)"
        );
        println!("skipping: {tool} is not installed");
    }
    found
}

/// Returns from the test (it passes) unless every tool is installed.
#[macro_export]
macro_rules! require {
    ($($tool:expr),+) => {
        if !($(support::have($tool))&&+) {
            return;
        }
    };
}

/// A server started by `tests/lab/nbd`, stopped (by the script, which checks its PID) on drop.
pub struct Server {
    pub uri: String,
    pub pid: u32,
    pub log: PathBuf,
    lab: PathBuf,
}

impl Server {
    /// Runs `tests/lab/nbd start --dir DIR ARGS…` and reads the assignments it prints. The
    /// server accepts connections when this returns (the script waits for it).
    pub fn start(dir: &Path, args: &[&str]) -> Server {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/lab/nbd");
        let lab = dir.join("lab");
        let out = Command::new(&script).arg("start").arg("--dir").arg(&lab).args(args).output().unwrap();
        assert!(out.status.success(), "tests/lab/nbd start {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let var = |name: &str| {
            let line = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name} in {text}"));
            line.trim_matches('\'').to_string()
        };
        Server {
            uri: var("LAB_NBD_URI"),
            pid: var("LAB_NBD_PID").parse().unwrap(),
            log: PathBuf::from(var("LAB_NBD_LOG")),
            lab,
        }
    }

    /// Kills the server at once, as a crash would.
    pub fn kill(&self) {
        let status = Command::new("kill").arg("-9").arg(self.pid.to_string()).status().unwrap();
        assert!(status.success());
    }

    /// Stops it now (the drop does the same, idempotently).
    pub fn stop(&self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/lab/nbd");
        let status = Command::new(script).arg("stop").arg("--dir").arg(&self.lab).status().unwrap();
        assert!(status.success());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/lab/nbd");
        let _ = Command::new(script).arg("stop").arg("--dir").arg(&self.lab).status();
    }
}

/// One request as nbdkit's log filter records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    /// `Read`, `Write`, `Zero`, `Flush`, `Extents`, `Trim`…
    pub op: String,
    pub id: u64,
    pub offset: u64,
    pub count: u64,
    /// The line is the request's completion (`...Read id=N … return=…`).
    pub reply: bool,
}

/// The requests of nbdkit's log (`--filter=log logfile=PATH`), in the order it wrote them:
/// the request when the filter passed it on, `...OP` when it returned.
pub fn nbdkit_log(path: &Path) -> Vec<Logged> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let field = |words: &[&str], key: &str| {
        words.iter().find_map(|w| w.strip_prefix(key)).map_or(0, |v| {
            let v = v.trim_start_matches("0x");
            u64::from_str_radix(v, 16).unwrap_or(0)
        })
    };
    let mut out = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(i) = words.iter().position(|w| w.starts_with("connection=")) else { continue };
        let Some(op) = words.get(i + 1) else { continue };
        let (op, reply) = match op.strip_prefix("...") {
            Some(op) => (op, true),
            None => (*op, false),
        };
        if ["Connect", "Disconnect"].contains(&op) {
            continue;
        }
        let id = words.iter().find_map(|w| w.strip_prefix("id=")).and_then(|v| v.parse().ok()).unwrap_or(0);
        out.push(Logged {
            op: op.to_string(),
            id,
            offset: field(&words, "offset="),
            count: field(&words, "count="),
            reply,
        });
    }
    out
}

/// What the in-test server offers in its handshake.
#[derive(Debug, Clone, Copy)]
pub struct Offer {
    pub size: u64,
    /// Answer `NBD_OPT_GO` (else `ERR_UNSUP`, and the client must use `NBD_OPT_EXPORT_NAME`).
    pub go: bool,
    /// Structured replies and `base:allocation` (context id 1).
    pub structured: bool,
    pub flags: u16,
}

impl Default for Offer {
    fn default() -> Offer {
        Offer {
            size: 1 << 20,
            go: true,
            structured: true,
            flags: transmission_flag::HAS_FLAGS | transmission_flag::SEND_FLUSH,
        }
    }
}

/// A one-connection NBD server on a loopback port, run by `script` after a handshake that
/// follows `offer`; returns the address to open. The thread ends when the script returns.
pub fn serve(
    offer: Offer,
    script: impl FnOnce(&mut TcpStream) + Send + 'static,
) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let thread = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        if handshake(&mut s, offer).is_ok() {
            script(&mut s);
        }
    });
    (format!("nbd://127.0.0.1:{port}/x"), thread)
}

/// A server that sends `bytes` as soon as a client connects and nothing more (it shuts its side
/// down), then reads until the client hangs up.
pub fn serve_raw(bytes: Vec<u8>) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let thread = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = std::io::copy(&mut s, &mut std::io::sink());
    });
    (format!("nbd://127.0.0.1:{port}/x"), thread)
}

/// The server side of a fixed-newstyle handshake, with the wire module's encoders.
fn handshake(s: &mut TcpStream, offer: Offer) -> std::io::Result<()> {
    s.write_all(&Greeting { flags: handshake_flag::FIXED_NEWSTYLE | handshake_flag::NO_ZEROES }.encode())?;
    let mut flags = [0; 4];
    s.read_exact(&mut flags)?;
    loop {
        let mut header = [0; OptionHeader::LEN];
        s.read_exact(&mut header)?;
        let header = OptionHeader::decode(&header).map_err(std::io::Error::other)?;
        let mut data = vec![0; header.len as usize];
        s.read_exact(&mut data)?;
        match header.option {
            opt::STRUCTURED_REPLY if offer.structured => s.write_all(&reply(header.option, rep::ACK, &[]))?,
            opt::SET_META_CONTEXT if offer.structured => {
                let query = MetaContextQuery::decode(&data).map_err(std::io::Error::other)?;
                if query.queries.iter().any(|q| q == "base:allocation") {
                    let ctx = MetaContext { id: 1, name: "base:allocation".into() };
                    s.write_all(&reply(header.option, rep::META_CONTEXT, &ctx.encode()))?;
                }
                s.write_all(&reply(header.option, rep::ACK, &[]))?;
            }
            opt::GO if offer.go => {
                Go::decode(&data).map_err(std::io::Error::other)?;
                let export = Info::Export { size: offer.size, flags: offer.flags };
                s.write_all(&reply(header.option, rep::INFO, &export.encode()))?;
                s.write_all(&reply(header.option, rep::ACK, &[]))?;
                return Ok(());
            }
            opt::EXPORT_NAME => {
                s.write_all(&ExportName { size: offer.size, flags: offer.flags }.encode(true))?;
                return Ok(());
            }
            other => s.write_all(&reply(other, rep::ERR_UNSUP, &[]))?,
        }
    }
}

/// Reads one request and, for a write, its data.
pub fn request(s: &mut TcpStream) -> Option<(Request, Vec<u8>)> {
    let mut header = [0; Request::LEN];
    s.read_exact(&mut header).ok()?;
    let r = Request::decode(&header).ok()?;
    let mut data = Vec::new();
    if r.kind == cmd::WRITE {
        data = vec![0; r.len as usize];
        s.read_exact(&mut data).ok()?;
    }
    Some((r, data))
}

/// Serves an in-memory image with simple replies until the client disconnects: a server of
/// the time before structured replies.
pub fn serve_simple(s: &mut TcpStream, image: &mut [u8]) {
    while let Some((r, data)) = request(s) {
        let ok = ReplyHeader::Simple(SimpleReply { error: 0, cookie: r.cookie }).encode();
        let (start, end) = (r.offset as usize, r.offset as usize + r.len as usize);
        match r.kind {
            cmd::READ => {
                let _ = s.write_all(&[&ok[..], &image[start..end]].concat());
            }
            cmd::WRITE => {
                image[start..end].copy_from_slice(&data);
                let _ = s.write_all(&ok);
            }
            cmd::DISC => return,
            _ => {
                let _ = s.write_all(&ok);
            }
        }
    }
}

/// `len` bytes of a pattern that differs at every offset and between seeds.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed).collect()
}

/// Polls `ready` until it holds: for an event only a file shows (a request in a server's log).
/// Fails after a minute.
#[track_caller]
pub fn wait_for(mut ready: impl FnMut() -> bool, what: &str) {
    let start = std::time::Instant::now();
    while !ready() {
        assert!(start.elapsed() < std::time::Duration::from_secs(60), "waited a minute for {what}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
