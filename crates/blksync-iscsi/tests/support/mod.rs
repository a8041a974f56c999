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

/// The connection of the in-test target after login: sends answers with sequence numbers.
pub struct Conn {
    pub stream: TcpStream,
    stat_sn: u32,
    max_cmd_sn: u32,
    /// Commands that came while a write's Data-Out was awaited: this target serves one
    /// command at a time, the initiator sends many.
    backlog: std::collections::VecDeque<Pdu>,
}

impl Conn {
    /// The next PDU from the initiator.
    pub fn next(&mut self) -> Option<Pdu> {
        if let Some(p) = self.backlog.pop_front() {
            return Some(p);
        }
        self.read()
    }

    fn read(&mut self) -> Option<Pdu> {
        let p = pdu::read_pdu(&mut self.stream, Digests::default(), 1 << 20).ok()?;
        if p.opcode() == opcode::SCSI_COMMAND {
            self.max_cmd_sn = p.u32_at(24).wrapping_add(64);
        }
        Some(p)
    }

    fn stamp(&mut self, p: &mut Pdu, status: bool) {
        p.set_u32(24, self.stat_sn);
        if status {
            self.stat_sn += 1;
        }
        p.set_u32(28, self.max_cmd_sn.wrapping_sub(63));
        p.set_u32(32, self.max_cmd_sn);
    }

    pub fn send(&mut self, p: &Pdu) {
        let _ = self.stream.write_all(&p.encode(Digests::default()));
    }

    /// A SCSI Response with `status` and, for CHECK CONDITION, fixed-format sense.
    pub fn respond(&mut self, itt: u32, status: u8, sense: Option<(u8, u8, u8)>) {
        let mut r = Pdu::new(opcode::SCSI_RESPONSE);
        r.bhs[1] = flag::FINAL;
        r.bhs[3] = status;
        r.set_u32(16, itt);
        self.stamp(&mut r, true);
        if let Some((key, asc, ascq)) = sense {
            let mut s = vec![0u8; 18];
            s[0] = 0x70;
            s[2] = key;
            s[7] = 10;
            s[12] = asc;
            s[13] = ascq;
            r.data = [(s.len() as u16).to_be_bytes().to_vec(), s].concat();
        }
        self.send(&r);
    }

    /// `data` as one Data-In PDU with GOOD status.
    pub fn data_in(&mut self, itt: u32, data: &[u8]) {
        let mut d = Pdu::new(opcode::DATA_IN);
        d.bhs[1] = flag::FINAL | flag::STATUS;
        d.set_u32(16, itt);
        d.set_u32(20, pdu::RESERVED_TAG);
        self.stamp(&mut d, true);
        d.data = data.to_vec();
        self.send(&d);
    }

    /// An unsolicited NOP-In: a ping when `ttt` is not the reserved tag.
    pub fn nop_in(&mut self, ttt: u32) {
        let mut n = Pdu::new(opcode::NOP_IN);
        n.bhs[1] = flag::FINAL;
        n.set_u32(16, pdu::RESERVED_TAG);
        n.set_u32(20, ttt);
        self.stamp(&mut n, false);
        self.send(&n);
    }

    /// An Asynchronous Message with `event`.
    pub fn async_event(&mut self, event: u8) {
        let mut a = Pdu::new(opcode::ASYNC);
        a.bhs[1] = flag::FINAL;
        a.set_u32(16, pdu::RESERVED_TAG);
        self.stamp(&mut a, true);
        a.bhs[36] = event;
        self.send(&a);
    }

    /// The data of a write: its immediate data, then R2Ts for the rest (≤ 256 KiB each).
    pub fn receive_write(&mut self, cmd: &Pdu) -> Option<Vec<u8>> {
        let total = cmd.u32_at(20) as usize;
        let mut data = cmd.data.clone();
        let mut r2t_sn = 0;
        while data.len() < total {
            let want = (total - data.len()).min(256 << 10);
            let mut r = Pdu::new(opcode::R2T);
            r.bhs[1] = flag::FINAL;
            r.set_u32(16, cmd.itt());
            r.set_u32(20, 0x100 + r2t_sn);
            self.stamp(&mut r, false);
            r.set_u32(36, r2t_sn);
            r.set_u32(40, data.len() as u32);
            r.set_u32(44, want as u32);
            self.send(&r);
            r2t_sn += 1;
            loop {
                let d = self.read()?;
                if d.opcode() != opcode::DATA_OUT {
                    self.backlog.push_back(d);
                    continue;
                }
                assert_eq!(d.itt(), cmd.itt(), "Data-Out of the write asked for");
                assert_eq!(d.u32_at(40) as usize, data.len(), "Data-Out in order");
                data.extend_from_slice(&d.data);
                if d.flags() & flag::FINAL != 0 {
                    break;
                }
            }
        }
        Some(data)
    }
}

/// How the in-test LUN looks.
#[derive(Clone, Copy)]
pub struct Lun {
    pub blocks: u64,
    pub block_size: u32,
    /// READ CAPACITY's LBPME and LBPRZ, and VPD 0xB2's LBPU (UNMAP, no WRITE SAME).
    pub thin_unmap: bool,
}

/// What a scripted target does with a PDU: `true` when the hook handled it.
pub type Hook = Box<dyn FnMut(&Pdu, &mut Conn, &std::sync::Mutex<Vec<u8>>) -> bool + Send>;

/// A fake target that logs in and serves a LUN in memory: TEST UNIT READY, INQUIRY (standard,
/// VPD 0x00, 0xB2), READ CAPACITY(16), READ(16), WRITE(16), SYNCHRONIZE CACHE(16), UNMAP
/// (deallocated blocks read as zeros) and GET LBA STATUS (nothing deallocated: every block
/// "mapped"), one command at a time; `hook` sees every PDU first. Returns the address of LUN 1,
/// the disk and the thread.
pub fn mini_target(
    lun: Lun,
    mut hook: Hook,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<u8>>>, std::thread::JoinHandle<()>) {
    let disk = std::sync::Arc::new(std::sync::Mutex::new(vec![0u8; (lun.blocks * u64::from(lun.block_size)) as usize]));
    let for_thread = std::sync::Arc::clone(&disk);
    let (tx, rx) = std::sync::mpsc::channel();
    let (portal, handle) = fake_target(
        None,
        Box::new(move |s| {
            let mut conn = Conn {
                stream: s.try_clone().unwrap(),
                stat_sn: 100,
                max_cmd_sn: 64,
                backlog: std::collections::VecDeque::new(),
            };
            let disk = for_thread;
            let bs = lun.block_size as usize;
            while let Some(p) = conn.next() {
                if hook(&p, &mut conn, &disk) {
                    continue;
                }
                match p.opcode() {
                    opcode::LOGOUT_REQUEST => {
                        let mut r = Pdu::new(opcode::LOGOUT_RESPONSE);
                        r.bhs[1] = flag::FINAL;
                        r.set_u32(16, p.itt());
                        conn.stamp(&mut r, true);
                        conn.send(&r);
                        let _ = tx.send(());
                        return;
                    }
                    opcode::SCSI_COMMAND => {}
                    _ => continue,
                }
                let cdb = &p.bhs[32..48];
                let itt = p.itt();
                let lba = u64::from_be_bytes(cdb[2..10].try_into().unwrap()) as usize;
                let n = u32::from_be_bytes(cdb[10..14].try_into().unwrap()) as usize;
                match (cdb[0], cdb[1] & 0x1f, cdb[1] & 1, cdb[2]) {
                    (0x00 | 0x91 | 0x35, ..) => conn.respond(itt, 0, None),
                    (0x12, _, 0, _) => {
                        let mut d = vec![0u8; 96];
                        d[8..16].copy_from_slice(b"FAKE    ");
                        d[16..32].copy_from_slice(b"MINI-TARGET     ");
                        conn.data_in(itt, &d);
                    }
                    (0x12, _, 1, 0x00) => conn.data_in(itt, &[0, 0, 0, 2, 0x00, 0xB2]),
                    (0x12, _, 1, 0xB2) => {
                        let flags = if lun.thin_unmap { 0x80 | 0x04 } else { 0 };
                        conn.data_in(itt, &[0, 0xB2, 0, 4, 0, flags, 0, 0]);
                    }
                    (0x12, ..) => conn.respond(itt, 2, Some((5, 0x24, 0))),
                    (0x9E, 0x10, ..) => {
                        let mut d = vec![0u8; 32];
                        d[..8].copy_from_slice(&(lun.blocks - 1).to_be_bytes());
                        d[8..12].copy_from_slice(&lun.block_size.to_be_bytes());
                        if lun.thin_unmap {
                            d[14] = 0xC0;
                        }
                        conn.data_in(itt, &d);
                    }
                    (0x9E, 0x12, ..) => {
                        let mut d = vec![0u8; 24];
                        d[..4].copy_from_slice(&20u32.to_be_bytes());
                        d[8..16].copy_from_slice(&(lba as u64).to_be_bytes());
                        d[16..20].copy_from_slice(&((lun.blocks as usize - lba) as u32).to_be_bytes());
                        conn.data_in(itt, &d);
                    }
                    (0x88, ..) => {
                        let d = disk.lock().unwrap()[lba * bs..(lba + n) * bs].to_vec();
                        conn.data_in(itt, &d);
                    }
                    (0x8A, ..) => {
                        let Some(data) = conn.receive_write(&p) else { return };
                        disk.lock().unwrap()[lba * bs..lba * bs + data.len()].copy_from_slice(&data);
                        conn.respond(itt, 0, None);
                    }
                    (0x42, ..) => {
                        // UNMAP is advice: this target ignores it (its blocks stay mapped).
                        let _ = conn.receive_write(&p);
                        conn.respond(itt, 0, None);
                    }
                    _ => conn.respond(itt, 2, Some((5, 0x20, 0))),
                }
            }
        }),
    );
    let _ = rx;
    (format!("iscsi://{portal}/iqn.x:mini/1"), disk, handle)
}
