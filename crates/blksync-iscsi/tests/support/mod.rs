//! Helpers of the iSCSI integration tests: tgtd started through `tests/lab/iscsi` (stopped when
//! the guard drops), and a small fake target for what tgtd never does (garbage, huge lengths).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use blksync_iscsi::pdu::{self, Digests, Pdu, flag, opcode};

/// True when tgtd runs here (and we are root, which it needs). Without it a test prints
/// `skipping: …` and passes, unless `BLKSYNC_REQUIRE_ISCSI=1`, which makes it a failure.
pub fn have_tgtd() -> bool {
    let found = Command::new("tgtadm").arg("--help").output().is_ok_and(|o| o.status.success())
        && Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0"));
    if !found {
        assert!(
            std::env::var("BLKSYNC_REQUIRE_ISCSI").as_deref() != Ok("1"),
            "tgtd (Debian package tgt) is not installed or this is not root (BLKSYNC_REQUIRE_ISCSI=1)"
        );
        println!("skipping: tgtd is not installed or this is not root");
    }
    found
}

/// Returns from the test (it passes) unless tgtd can run.
#[macro_export]
macro_rules! require_tgtd {
    () => {
        if !support::have_tgtd() {
            return;
        }
    };
}

/// A tgtd started by `tests/lab/iscsi`, stopped (by the script, which checks its PID) on drop.
pub struct Tgtd {
    /// `iscsi://127.0.0.1:PORT/IQN/1`, no credentials.
    pub url: String,
    pub portal: String,
    pub port: u16,
    pub iqn: String,
    pub pid: u32,
    /// LUN 1's backing file.
    pub file: PathBuf,
    lab: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/lab/iscsi")
}

impl Tgtd {
    /// Runs `tests/lab/iscsi start --dir DIR/lab ARGS…`; the target accepts logins when this
    /// returns (the script waits for it).
    pub fn start(dir: &Path, args: &[&str]) -> Tgtd {
        let lab = dir.join("lab");
        let out = Command::new(script()).arg("start").arg("--dir").arg(&lab).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "tests/lab/iscsi start {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let var = |name: &str| {
            let line = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name} in {text}"));
            line.trim_matches('\'').to_string()
        };
        Tgtd {
            url: var("LAB_ISCSI_URL"),
            portal: var("LAB_ISCSI_PORTAL"),
            port: var("LAB_ISCSI_PORT").parse().unwrap(),
            iqn: var("LAB_ISCSI_IQN"),
            pid: var("LAB_ISCSI_PID").parse().unwrap(),
            file: PathBuf::from(var("LAB_ISCSI_FILE")),
            lab,
        }
    }

    /// The URL with `user%password@` in it.
    pub fn url_with(&self, userinfo: &str) -> String {
        self.url.replacen("iscsi://", &format!("iscsi://{userinfo}@"), 1)
    }

    /// Kills tgtd at once, as a crash would, and waits until it is gone.
    pub fn kill(&self) {
        let status = Command::new("kill").arg("-9").arg(self.pid.to_string()).status().unwrap();
        assert!(status.success());
        // Gone means reaped or a zombie: the event, not a time.
        loop {
            let st = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
            if !st.lines().any(|l| l.starts_with("State:") && !l.contains('Z')) {
                break;
            }
            std::thread::yield_now();
        }
    }

    /// `tgtadm --op show --mode target` of this instance.
    pub fn show(&self) -> String {
        let out = Command::new("tgtadm")
            .args(["-C", &(self.port % 32768).to_string(), "--lld", "iscsi", "--op", "show", "--mode", "target"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg("--dir").arg(&self.lab).status();
    }
}

/// Bytes that differ from block to block and from seed to seed.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What the fake target does once a client logged in.
pub type Script = Box<dyn FnOnce(&mut TcpStream) + Send>;

/// A fake target on a free port: it answers every login request with success (moving to the
/// full feature phase at the operational stage) unless `login_garbage` is given, which it sends
/// instead of the first login response; after login it runs `after`. Returns the portal.
pub fn fake_target(login_garbage: Option<Vec<u8>>, after: Script) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let portal = listener.local_addr().unwrap().to_string();
    let handle = std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else { return };
        let mut stat_sn = 1u32;
        loop {
            let Ok(req) = pdu::read_pdu(&mut s, Digests::default(), 1 << 20) else { return };
            if req.opcode() != opcode::LOGIN_REQUEST {
                return;
            }
            if let Some(g) = &login_garbage {
                let _ = s.write_all(g);
                let _ = s.shutdown(std::net::Shutdown::Write);
                let _ = std::io::copy(&mut s, &mut std::io::sink());
                return;
            }
            let csg = (req.flags() >> 2) & 3;
            let mut resp = Pdu::new(opcode::LOGIN_RESPONSE);
            resp.bhs[1] = flag::TRANSIT | (csg << 2) | if csg == 0 { 1 } else { 3 };
            resp.bhs[8..16].copy_from_slice(&req.bhs[8..16]);
            resp.bhs[14..16].copy_from_slice(&7u16.to_be_bytes());
            resp.set_u32(16, req.itt());
            resp.set_u32(24, stat_sn);
            resp.set_u32(28, 1);
            resp.set_u32(32, 64);
            stat_sn += 1;
            if csg == 0 {
                resp.data = b"AuthMethod=None\0".to_vec();
            }
            s.write_all(&resp.encode(Digests::default())).unwrap();
            if csg == 1 {
                break;
            }
        }
        after(&mut s);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    (portal, handle)
}

/// Reads the next SCSI command the client sends (skipping nothing else).
pub fn next_command(s: &mut TcpStream) -> Option<Pdu> {
    pdu::read_pdu(s, Digests::default(), 1 << 20).ok()
}
