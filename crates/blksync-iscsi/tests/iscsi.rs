//! The iSCSI initiator against a real target (tgtd, started by `tests/lab/iscsi`) and, for what
//! tgtd never does, against a small fake target in the test. Without tgtd a test prints
//! `skipping:` and passes, unless `BLKSYNC_REQUIRE_ISCSI=1`.
//!
//! No test waits for time: the target is ready when the lab script returns, and the test that
//! kills it mid-transfer does so after a read has completed, then waits for the process to go.

mod support;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;

use blksync_core::endpoint::{Segment, Source, Target};
use blksync_core::{ErrorKind, Result};
use blksync_iscsi::pdu::{Digests, Pdu, flag, opcode};
use blksync_iscsi::{Iscsi, IscsiOptions, ZeroMethod};
use support::{Lun, Tgtd, fake_target, mini_target, next_command, pattern};

const MIB: u64 = 1 << 20;

fn options() -> IscsiOptions {
    IscsiOptions { use_environment: false, ..IscsiOptions::default() }
}

fn open(url: &str, writable: bool) -> Result<Iscsi> {
    Iscsi::open(url, writable, &options())
}

fn read(lun: &Iscsi, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    lun.read_at(&mut buf, offset).unwrap();
    buf
}

fn file_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0; len];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, offset).unwrap();
    buf
}

fn sync(source: &dyn Source, target: &dyn Target) -> Result<blksync::sync::Summary> {
    let options = blksync::sync::SyncOptions { threads: 2, verify: true, ..Default::default() };
    let cancel = AtomicBool::new(false);
    let control = blksync::progress::Control { observer: &blksync::progress::Silent, cancel: &cancel };
    blksync::sync::sync(source, target, false, &options, control)
}

#[test]
fn reads_and_writes_equal_the_backing_file() {
    require_tgtd!();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lun.img");
    std::fs::write(&file, pattern(16 * MIB as usize, 1)).unwrap();
    let tgtd = Tgtd::start(dir.path(), &["--file", file.to_str().unwrap()]);
    let lun = open(&tgtd.url, true).unwrap();
    assert_eq!(lun.size(), 16 * MIB);
    assert_eq!(lun.name(), Path::new(&tgtd.url));
    let info = lun.info();
    assert_eq!((info.inquiry.vendor.as_str(), info.inquiry.product.as_str()), ("IET", "VIRTUAL-DISK"));
    assert_eq!(lun.caps().block_size, 512);
    assert!(!lun.caps().resizable && !lun.caps().holes, "a thick LUN reports no holes");
    // What tgtd negotiates (docs/ISCSI.md, "What tgtd does").
    let n = lun.negotiated();
    assert_eq!((n.target_mrdsl, n.initial_r2t, n.immediate_data), (8192, true, true));
    assert!(!n.digests.header && !n.digests.data);

    assert_eq!(read(&lun, 3 * MIB, 3 * MIB as usize), file_range(&file, 3 * MIB, 3 * MIB as usize));
    assert_eq!(read(&lun, 1000, 3000), file_range(&file, 1000, 3000), "an unaligned read");
    let data = pattern(5 * MIB as usize + 4096, 2);
    lun.write_at(&data, MIB).unwrap();
    lun.write_at(&data[..512], 15 * MIB).unwrap();
    lun.flush().unwrap();
    assert_eq!(read(&lun, MIB, data.len()), data);
    Box::new(lun).close().unwrap();
    assert_eq!(file_range(&file, MIB, data.len()), data, "the file holds what was written");
    assert_eq!(file_range(&file, 15 * MIB, 512), data[..512]);
    assert_eq!(file_range(&file, 0, 4096), pattern(16 * MIB as usize, 1)[..4096], "the rest is untouched");
}

#[test]
fn the_size_agrees_with_iscsi_readcapacity16_and_close_logs_out() {
    require_tgtd!();
    let dir = tempfile::tempdir().unwrap();
    let tgtd = Tgtd::start(dir.path(), &["--size", "24M"]);
    let lun = open(&tgtd.url, false).unwrap();
    assert!(tgtd.show().contains("I_T nexus: "), "a session while open");
    if let Ok(out) = Command::new("iscsi-readcapacity16").arg(&tgtd.url).output() {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("Total size:{}", lun.size())), "{text}");
    }
    Box::new(lun).close().unwrap();
    // The logout was answered before close returned; tgtd drops the nexus with the connection.
    let mut gone = false;
    for _ in 0..1000 {
        if !tgtd.show().contains("I_T nexus: ") {
            gone = true;
            break;
        }
        std::thread::yield_now();
    }
    assert!(gone, "the session ended: {}", tgtd.show());
}

#[test]
fn an_address_without_lun_opens_the_first_disk_lun() {
    require_tgtd!();
    let dir = tempfile::tempdir().unwrap();
    let tgtd = Tgtd::start(dir.path(), &["--size", "8M"]);
    let bsync = format!("iscsi://{}/{}", tgtd.portal, tgtd.iqn);
    let lun = open(&bsync, false).unwrap();
    assert_eq!(lun.address().lun(), Some(1), "LUN 0 of tgtd is its controller");
    assert_eq!(lun.size(), 8 * MIB);
    let e = open(&format!("iscsi://{}/{}/0", tgtd.portal, tgtd.iqn), false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("no disk"), "{e}");
    let e = open(&format!("iscsi://{}/{}/7", tgtd.portal, tgtd.iqn), false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

#[test]
fn chap_with_the_right_secret_logs_in_and_the_wrong_one_is_a_clear_error() {
    require_tgtd!();
    let dir = tempfile::tempdir().unwrap();
    let tgtd = Tgtd::start(dir.path(), &["--size", "4M", "--chap", "alice:s3cret-pass"]);
    let lun = open(&tgtd.url_with("alice%s3cret-pass"), false).unwrap();
    assert_eq!(lun.size(), 4 * MIB);
    drop(lun);

    let e = open(&tgtd.url_with("alice%wrong"), false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    let text = e.to_string();
    assert!(text.contains("CHAP authentication failed") && text.contains("wrong user or password"), "{text}");
    assert!(!text.contains("wrong@"), "no password in the message: {text}");
    assert_eq!(e.kind().exit_code(), 3);

    let e = open(&tgtd.url, false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("requires CHAP"), "{e}");

    // The secret from a file, the user from the address.
    let secrets = dir.path().join("secrets");
    std::fs::write(&secrets, "password=s3cret-pass\n").unwrap();
    let o = IscsiOptions { secrets_file: Some(secrets), ..options() };
    assert!(Iscsi::open(&tgtd.url_with("alice"), false, &o).is_ok());
}

#[test]
fn mutual_chap_checks_that_the_target_knows_its_secret() {
    require_tgtd!();
    let dir = tempfile::tempdir().unwrap();
    let tgtd =
        Tgtd::start(dir.path(), &["--size", "4M", "--chap", "alice:in-secret-1", "--mutual", "target:out-secret-2"]);
    let secrets = dir.path().join("secrets");
    std::fs::write(&secrets, "user=alice\npassword=in-secret-1\ntarget_user=target\ntarget_password=out-secret-2\n")
        .unwrap();
    let o = IscsiOptions { secrets_file: Some(secrets.clone()), ..options() };
    let lun = Iscsi::open(&tgtd.url, true, &o).unwrap();
    lun.write_at(&[7; 4096], 0).unwrap();
    Box::new(lun).close().unwrap();
    assert_eq!(file_range(&tgtd.file, 0, 4096), vec![7; 4096]);

    std::fs::write(&secrets, "user=alice\npassword=in-secret-1\ntarget_password=not-the-one\n").unwrap();
    let e = Iscsi::open(&tgtd.url, false, &o).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("failed mutual CHAP"), "{e}");
}

#[test]
fn digests_the_target_insists_on_are_used() {
    require_tgtd!();
    let dir = tempfile::tempdir().unwrap();
    let tgtd = Tgtd::start(dir.path(), &["--size", "8M", "--digest"]);
    for prefer in [false, true] {
        let o = IscsiOptions { digests: prefer, ..options() };
        let lun = Iscsi::open(&tgtd.url, true, &o).unwrap();
        let d = lun.negotiated().digests;
        assert!(d.header && d.data, "{d:?}");
        let data = pattern(2 * MIB as usize + 512, 3 + u64::from(prefer));
        lun.write_at(&data, 512).unwrap();
        lun.flush().unwrap();
        assert_eq!(read(&lun, 512, data.len()), data);
        Box::new(lun).close().unwrap();
        assert_eq!(file_range(&tgtd.file, 512, data.len()), data);
    }
}

/// Every way tgtd can be told to take a write's data, against its backing file: all of it on
/// R2T (`InitialR2T=Yes`, `ImmediateData=No`), unsolicited Data-Out without immediate data
/// (`InitialR2T=No`, `ImmediateData=No`), and immediate plus unsolicited data
/// (`InitialR2T=No`, `ImmediateData=Yes`); small bursts and PDUs, so that a command takes several
/// R2Ts and each R2T several Data-Out PDUs; a thick LUN (`thin_provisioning=0`: no UNMAP, no
/// WRITE SAME), so that zeros are written too.
#[test]
fn writes_reach_the_backing_file_however_tgtd_takes_their_data() {
    require_tgtd!();
    let small = [
        "--param",
        "MaxRecvDataSegmentLength=4096",
        "--param",
        "FirstBurstLength=16384",
        "--param",
        "MaxBurstLength=65536",
        "--lun-params",
        "thin_provisioning=0",
    ];
    for (initial_r2t, immediate_data) in [(true, false), (false, false), (false, true)] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lun.img");
        let old = pattern(16 * MIB as usize, 20);
        std::fs::write(&file, &old).unwrap();
        let yes = |b: bool| if b { "Yes" } else { "No" };
        let (r2t, imm) = (format!("InitialR2T={}", yes(initial_r2t)), format!("ImmediateData={}", yes(immediate_data)));
        let mut args = vec!["--file", file.to_str().unwrap(), "--param", &r2t, "--param", &imm];
        args.extend(small);
        let tgtd = Tgtd::start(dir.path(), &args);
        let lun = open(&tgtd.url, true).unwrap();
        let n = *lun.negotiated();
        let what = format!("{r2t} {imm}: {n:?}");
        assert_eq!((n.initial_r2t, n.immediate_data), (initial_r2t, immediate_data), "{what}");
        assert_eq!((n.target_mrdsl, n.first_burst, n.max_burst), (4096, 16384, 65536), "{what}");
        assert_eq!(lun.info().zero, ZeroMethod::Write, "{what}");
        assert!(!lun.caps().zero_offload && !lun.caps().holes, "{what}");
        let data = pattern(5 * MIB as usize + 4096, 21);
        lun.write_at(&data, MIB + 512).unwrap();
        // Shorter than the immediate data, the first burst and one PDU.
        lun.write_at(&data[..512], 15 * MIB).unwrap();
        lun.zero(8 * MIB, 2 * MIB).unwrap();
        lun.flush().unwrap();
        Box::new(lun).close().unwrap();
        let mut expect = old.clone();
        expect[MIB as usize + 512..][..data.len()].copy_from_slice(&data);
        expect[15 * MIB as usize..][..512].copy_from_slice(&data[..512]);
        expect[8 * MIB as usize..10 * MIB as usize].fill(0);
        assert!(std::fs::read(&file).unwrap() == expect, "the backing file differs: {what}");
    }
}

#[test]
fn blocks_of_4096_bytes_align_writes_and_widen_reads() {
    require_tgtd!();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lun.img");
    std::fs::write(&file, pattern(8 * MIB as usize, 4)).unwrap();
    let tgtd = Tgtd::start(dir.path(), &["--file", file.to_str().unwrap(), "--block-size", "4096"]);
    let lun = open(&tgtd.url, true).unwrap();
    assert_eq!((lun.caps().block_size, lun.info().capacity.blocks), (4096, 2048));
    assert_eq!(read(&lun, 5000, 100), file_range(&file, 5000, 100));
    let e = lun.write_at(&[1; 512], 4096).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage);
    assert!(e.to_string().contains("block size of 4096"), "{e}");
    lun.write_at(&[2; 8192], 4096).unwrap();
    lun.flush().unwrap();
    Box::new(lun).close().unwrap();
    assert_eq!(file_range(&file, 4096, 8192), vec![2; 8192]);
}

#[test]
fn a_thin_lun_punches_holes_for_zeros_and_reports_them() {
    require_tgtd!();
    let dir = tempfile::tempdir().unwrap();
    let tgtd = Tgtd::start(dir.path(), &["--size", "16M", "--thin"]);
    let lun = open(&tgtd.url, true).unwrap();
    let info = lun.info().clone();
    assert!(info.capacity.lbpme && info.capacity.lbprz, "{info:?}");
    assert!(info.lba_status, "tgtd answers GET LBA STATUS on a thin LUN");
    assert_eq!(info.zero, ZeroMethod::WriteSameUnmap);
    let caps = lun.caps();
    assert!(caps.holes && caps.zero_offload && caps.discard_zeroes, "{caps:?}");
    assert!(!lun.segment_at(0).unwrap().allocated, "a new sparse LUN is one hole");

    lun.write_at(&pattern(8 * MIB as usize, 5), 4 * MIB).unwrap();
    lun.flush().unwrap();
    let allocated = std::fs::metadata(&tgtd.file).unwrap().blocks();
    lun.zero(6 * MIB, 4 * MIB).unwrap();
    lun.flush().unwrap();
    assert_eq!(read(&lun, 6 * MIB, 4 * MIB as usize), vec![0; 4 * MIB as usize]);
    assert_eq!(read(&lun, 4 * MIB, 4096), pattern(8 * MIB as usize, 5)[..4096]);
    let after = std::fs::metadata(&tgtd.file).unwrap().blocks();
    assert!(
        allocated - after >= 4 * MIB / 512,
        "the zeroed range became a hole in the file: {allocated} -> {after} sectors"
    );
    Box::new(lun).close().unwrap();

    // A new session asks the target afresh.
    let lun = open(&tgtd.url, false).unwrap();
    assert_eq!(lun.segment_at(0).unwrap(), Segment { start: 0, end: 4 * MIB, allocated: false });
    assert_eq!(lun.segment_at(4 * MIB).unwrap(), Segment { start: 4 * MIB, end: 6 * MIB, allocated: true });
    assert_eq!(lun.segment_at(7 * MIB).unwrap(), Segment { start: 6 * MIB, end: 10 * MIB, allocated: false });
    assert!(lun.segment_at(11 * MIB).unwrap().allocated);
    assert_eq!(lun.segment_at(15 * MIB).unwrap().end, 16 * MIB);
}

/// A source that counts what is read from it, to prove the engine skips holes.
struct Counting<'a> {
    inner: &'a Iscsi,
    read: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl Source for Counting<'_> {
    fn name(&self) -> &Path {
        self.inner.name()
    }
    fn caps(&self) -> blksync_core::endpoint::Caps {
        self.inner.caps()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read.lock().unwrap().push((offset, buf.len() as u64));
        self.inner.read_at(buf, offset)
    }
    fn segment_at(&self, offset: u64) -> Result<Segment> {
        self.inner.segment_at(offset)
    }
    fn drop_cache(&self, offset: u64, len: u64) {
        self.inner.drop_cache(offset, len);
    }
    fn identity(&self) -> blksync_core::endpoint::Identity {
        self.inner.identity()
    }
}

#[test]
fn a_sync_from_a_thin_lun_reads_only_its_data_and_a_sync_onto_it_makes_holes() {
    require_tgtd!();
    let dir = tempfile::tempdir().unwrap();
    let tgtd = Tgtd::start(dir.path(), &["--size", "32M", "--thin"]);
    let data = pattern(MIB as usize, 6);
    {
        let lun = open(&tgtd.url, true).unwrap();
        lun.write_at(&data, 20 * MIB).unwrap();
        Box::new(lun).close().unwrap();
    }
    let lun = open(&tgtd.url, false).unwrap();
    let counting = Counting { inner: &lun, read: std::sync::Mutex::new(Vec::new()) };
    let copy = dir.path().join("copy.img");
    let target = blksync::endpoint::local::Local::open_target(
        &copy,
        blksync::endpoint::OpenTarget { create: true, ..Default::default() },
    )
    .unwrap();
    let options = blksync::sync::SyncOptions { threads: 2, ..Default::default() };
    let cancel = AtomicBool::new(false);
    let control = blksync::progress::Control { observer: &blksync::progress::Silent, cancel: &cancel };
    blksync::sync::sync(&counting, &target, true, &options, control).unwrap();
    drop(target);
    let reads = counting.read.lock().unwrap().clone();
    assert!(!reads.is_empty());
    for (offset, len) in &reads {
        assert!(*offset >= 20 * MIB && offset + len <= 21 * MIB, "a read in a hole: {offset}+{len}");
    }
    let mut expect = vec![0; 32 * MIB as usize];
    expect[20 * MIB as usize..21 * MIB as usize].copy_from_slice(&data);
    assert!(std::fs::read(&copy).unwrap() == expect);
    drop(lun);

    // Back the other way: a source with zeros where the LUN has data leaves holes there.
    let src = dir.path().join("src.img");
    let mut image = pattern(32 * MIB as usize, 7);
    image[16 * MIB as usize..24 * MIB as usize].fill(0);
    std::fs::write(&src, &image).unwrap();
    let source = blksync::endpoint::local::Local::open_source(&src).unwrap();
    let lun = open(&tgtd.url, true).unwrap();
    assert!(sync(&source, &lun).unwrap().verified);
    Box::new(lun).close().unwrap();
    assert!(std::fs::read(&tgtd.file).unwrap() == image, "the LUN's file equals the source");
    let lun = open(&tgtd.url, false).unwrap();
    assert_eq!(lun.segment_at(0).unwrap(), Segment { start: 0, end: 16 * MIB, allocated: true });
    assert_eq!(lun.segment_at(16 * MIB).unwrap(), Segment { start: 16 * MIB, end: 24 * MIB, allocated: false });
}

#[test]
fn zeros_on_a_thick_lun_are_written_only_where_it_is_not_zero() {
    require_tgtd!();
    let dir = tempfile::tempdir().unwrap();
    let tgtd = Tgtd::start(dir.path(), &["--size", "8M"]);
    let lun = open(&tgtd.url, true).unwrap();
    assert_eq!(lun.info().zero, ZeroMethod::Write);
    assert!(!lun.caps().zero_offload);
    lun.write_at(&[9; 8192], 3 * MIB).unwrap();
    lun.zero(0, 8 * MIB).unwrap();
    lun.flush().unwrap();
    Box::new(lun).close().unwrap();
    let file = std::fs::read(&tgtd.file).unwrap();
    assert!(file.iter().all(|&b| b == 0));
    // The file was sparse; only the 8 KiB written (and zeroed) were ever allocated.
    let sectors = std::fs::metadata(&tgtd.file).unwrap().blocks();
    assert!(sectors <= 64, "zeros were written over zeros: {sectors} sectors");
}

#[test]
fn a_lun_smaller_than_the_source_is_refused_before_any_write() {
    require_tgtd!();
    let dir = tempfile::tempdir().unwrap();
    let tgtd = Tgtd::start(dir.path(), &["--size", "4M"]);
    let src = dir.path().join("src.img");
    std::fs::write(&src, pattern(6 * MIB as usize, 8)).unwrap();
    let source = blksync::endpoint::local::Local::open_source(&src).unwrap();
    let lun = open(&tgtd.url, true).unwrap();
    let e = sync(&source, &lun).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::SizeMismatch, "{e}");
    let e = lun.set_size(6 * MIB).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::SizeMismatch);
    assert!(e.to_string().contains("smaller than"), "{e}");
    assert_eq!(lun.set_size(2 * MIB).unwrap_err().kind(), ErrorKind::Unsupported);
    drop(lun);
    assert!(std::fs::read(&tgtd.file).unwrap().iter().all(|&b| b == 0), "nothing was written");
}

#[test]
fn a_wrong_iqn_names_the_targets_the_portal_has() {
    require_tgtd!();
    let dir = tempfile::tempdir().unwrap();
    let tgtd = Tgtd::start(dir.path(), &["--size", "4M"]);
    let e = open(&format!("iscsi://{}/iqn.2024-01.lab.test:nothing/1", tgtd.portal), false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("no such target") && e.to_string().contains(&tgtd.iqn), "{e}");
    let found = blksync_iscsi::discover(&tgtd.portal, &options()).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].name, tgtd.iqn);
    assert_eq!(found[0].addresses, vec![format!("{},1", tgtd.portal)]);
}

#[test]
fn an_unreachable_portal_is_a_connection_error_naming_it() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let portal = listener.local_addr().unwrap().to_string();
    drop(listener);
    let e = open(&format!("iscsi://{portal}/iqn.x:y/1"), false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Connection, "{e}");
    assert!(e.to_string().contains(&portal), "{e}");
}

#[test]
fn a_target_killed_mid_transfer_fails_naming_portal_and_offset() {
    require_tgtd!();
    let dir = tempfile::tempdir().unwrap();
    let tgtd = Tgtd::start(dir.path(), &["--size", "64M"]);
    let lun = open(&tgtd.url, true).unwrap();
    let mut buf = vec![0; 2 * MIB as usize];
    for i in 0..4 {
        lun.read_at(&mut buf, i * 2 * MIB).unwrap();
    }
    // The event: four reads are done; now the target dies.
    tgtd.kill();
    let e = lun.read_at(&mut buf, 8 * MIB).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Connection, "{e}");
    let text = e.to_string();
    assert!(text.contains(&tgtd.portal) && text.contains("byte offset 8388608"), "{text}");
    let e = lun.write_at(&buf, 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Connection, "{e}");
    assert!(lun.flush().is_err());
    Box::new(lun).close().unwrap();
}

/// A fake target that logs in, then answers the first command (TEST UNIT READY) with `reply`.
fn hostile(reply: impl FnOnce(&Pdu) -> Vec<u8> + Send + 'static) -> blksync_core::Error {
    let (portal, handle) = fake_target(
        None,
        Box::new(move |s| {
            if let Some(cmd) = next_command(s) {
                let _ = s.write_all(&reply(&cmd));
            }
        }),
    );
    let e = open(&format!("iscsi://{portal}/iqn.x:fake/1"), false).unwrap_err();
    handle.join().unwrap();
    e
}

#[test]
fn a_hostile_target_gets_errors_never_panics_or_huge_allocations() {
    // A huge data segment in the login response.
    let mut huge = Pdu::new(opcode::LOGIN_RESPONSE).encode(Digests::default());
    huge[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    let (portal, handle) = fake_target(Some(huge), Box::new(|_| {}));
    let e = open(&format!("iscsi://{portal}/iqn.x:fake/1"), false).unwrap_err();
    handle.join().unwrap();
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    assert!(e.to_string().contains(&portal), "{e}");

    // Garbage instead of a login response.
    let (portal, handle) = fake_target(Some(pattern(1000, 9)), Box::new(|_| {}));
    let e = open(&format!("iscsi://{portal}/iqn.x:fake/1"), false).unwrap_err();
    handle.join().unwrap();
    assert!(matches!(e.kind(), ErrorKind::Protocol | ErrorKind::Connection), "{e}");

    // A Data-In of 16 MiB to a command that reads nothing.
    let e = hostile(|cmd| {
        let mut d = Pdu::new(opcode::DATA_IN);
        d.bhs[1] = flag::FINAL | flag::STATUS;
        d.set_u32(16, cmd.itt());
        let mut wire = d.encode(Digests::default());
        wire[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
        wire
    });
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    assert!(e.to_string().contains("MaxRecvDataSegmentLength"), "{e}");

    // A response for a task never sent.
    let e = hostile(|_| {
        let mut r = Pdu::new(opcode::SCSI_RESPONSE);
        r.bhs[1] = flag::FINAL;
        r.set_u32(16, 0x1234_5678);
        r.encode(Digests::default())
    });
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");

    // An R2T to a command that writes nothing, an unknown opcode, random bytes, a hang-up.
    let e = hostile(|cmd| {
        let mut r = Pdu::new(opcode::R2T);
        r.set_u32(16, cmd.itt());
        r.set_u32(44, 1 << 30);
        r.encode(Digests::default())
    });
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    let e = hostile(|cmd| {
        let mut r = Pdu::new(0x1c);
        r.set_u32(16, cmd.itt());
        r.encode(Digests::default())
    });
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    let e = hostile(|_| pattern(5000, 10));
    assert!(matches!(e.kind(), ErrorKind::Protocol | ErrorKind::Connection), "{e}");
    let e = hostile(|_| Vec::new());
    assert_eq!(e.kind(), ErrorKind::Connection, "{e}");
    assert!(e.to_string().contains("closed the connection"), "{e}");

    // Sense data longer than its segment.
    let e = hostile(|cmd| {
        let mut r = Pdu::new(opcode::SCSI_RESPONSE);
        r.bhs[1] = flag::FINAL;
        r.bhs[3] = 2;
        r.set_u32(16, cmd.itt());
        r.data = vec![0xff, 0xff, 0x70, 0, 6];
        r.encode(Digests::default())
    });
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
}

#[test]
fn an_ipv6_portal_in_brackets_works() {
    require_tgtd!();
    let dir = tempfile::tempdir().unwrap();
    let tgtd = Tgtd::start(dir.path(), &["--size", "4M", "--addr", "::1"]);
    assert!(tgtd.url.starts_with("iscsi://[::1]:"), "{}", tgtd.url);
    let lun = open(&tgtd.url, true).unwrap();
    lun.write_at(&[3; 512], 0).unwrap();
    assert_eq!(read(&lun, 0, 512), vec![3; 512]);
    assert_eq!(lun.address().host(), "::1");
}

#[test]
fn a_write_protected_lun_opens_for_reading_only() {
    require_tgtd!();
    let dir = tempfile::tempdir().unwrap();
    let tgtd = Tgtd::start(dir.path(), &["--size", "4M", "--readonly"]);
    let lun = open(&tgtd.url, false).unwrap();
    assert!(lun.info().write_protected);
    assert_eq!(read(&lun, 0, 512), vec![0; 512]);
    let e = open(&tgtd.url, true).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("write-protected"), "{e}");
}

#[test]
fn bad_addresses_are_refused_before_connecting() {
    for bad in ["iscsi://h", "iscsi://h:99999/iqn/1", "iscsi://h/iqn/1?x", "nbd://h/x"] {
        assert_eq!(open(bad, false).unwrap_err().kind(), ErrorKind::Usage, "{bad}");
    }
}

/// Two threads reading 2 MiB each, as the engine's workers do, keep 16 commands in flight: the
/// target sees 16 READ(16) before it answers any (it holds them back until then).
#[test]
fn sixteen_commands_are_in_flight_at_once() {
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&seen);
    let mut held: Vec<Pdu> = Vec::new();
    let hook: support::Hook = Box::new(move |p, conn, disk| {
        if p.opcode() != opcode::SCSI_COMMAND || p.bhs[32] != 0x88 || held.len() >= 16 {
            return false;
        }
        // A guard against a hang if fewer ever come (a failure, not a synchronisation).
        conn.stream.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
        held.push(p.clone());
        counter.fetch_max(held.len(), std::sync::atomic::Ordering::SeqCst);
        if held.len() == 16 {
            for cmd in &held {
                let lba = u64::from_be_bytes(cmd.bhs[34..42].try_into().unwrap()) as usize;
                let n = u32::from_be_bytes(cmd.bhs[42..46].try_into().unwrap()) as usize;
                let d = disk.lock().unwrap()[lba * 512..(lba + n) * 512].to_vec();
                conn.data_in(cmd.itt(), &d);
            }
        }
        true
    });
    let (url, disk, handle) = mini_target(Lun { blocks: 8192, block_size: 512, thin_unmap: false }, hook);
    disk.lock().unwrap().copy_from_slice(&pattern(4 * MIB as usize, 11));
    let lun = open(&url, false).unwrap();
    assert_eq!(lun.request_size(), 256 << 10);
    std::thread::scope(|s| {
        for i in 0..2u64 {
            let lun = &lun;
            s.spawn(move || {
                assert_eq!(
                    read(lun, i * 2 * MIB, 2 * MIB as usize),
                    pattern(4 * MIB as usize, 11)[(i * 2 * MIB) as usize..((i + 1) * 2 * MIB) as usize]
                );
            });
        }
    });
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 16);
    Box::new(lun).close().unwrap();
    handle.join().unwrap();
}

#[test]
fn a_nop_in_ping_is_answered_and_unit_attention_is_retried() {
    let pinged = std::sync::Arc::new(AtomicBool::new(false));
    let flag_ = std::sync::Arc::clone(&pinged);
    let mut reads = 0;
    let hook: support::Hook = Box::new(move |p, conn, _| {
        if p.opcode() != opcode::SCSI_COMMAND || p.bhs[32] != 0x88 {
            return false;
        }
        reads += 1;
        match reads {
            1 => {
                conn.nop_in(0x55);
                let answer = conn.next().unwrap();
                let ok = answer.opcode() == opcode::NOP_OUT && answer.ttt() == 0x55 && answer.itt() == 0xFFFF_FFFF;
                flag_.store(ok, std::sync::atomic::Ordering::SeqCst);
                conn.respond(p.itt(), 2, Some((6, 0x29, 0)));
                true
            }
            _ => false,
        }
    });
    let (url, disk, handle) = mini_target(Lun { blocks: 2048, block_size: 512, thin_unmap: false }, hook);
    disk.lock().unwrap()[..4096].fill(5);
    let lun = open(&url, false).unwrap();
    assert_eq!(read(&lun, 0, 4096), vec![5; 4096], "read again after UNIT ATTENTION");
    assert!(pinged.load(std::sync::atomic::Ordering::SeqCst), "the ping was answered with its TTT");
    Box::new(lun).close().unwrap();
    handle.join().unwrap();
}

#[test]
fn a_target_asking_for_logout_fails_the_command_in_flight_as_connection() {
    let hook: support::Hook = Box::new(|p, conn, _| {
        if p.opcode() == opcode::SCSI_COMMAND && p.bhs[32] == 0x88 {
            conn.async_event(1);
            return true;
        }
        false
    });
    let (url, _disk, handle) = mini_target(Lun { blocks: 2048, block_size: 512, thin_unmap: false }, hook);
    let lun = open(&url, false).unwrap();
    let mut buf = vec![0; 4096];
    let e = lun.read_at(&mut buf, 8192).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Connection, "{e}");
    assert!(e.to_string().contains("asked for a logout") && e.to_string().contains("byte offset 8192"), "{e}");
    drop(lun);
    handle.join().unwrap();
}

/// A target with UNMAP but no WRITE SAME, which ignores UNMAP (it is advice): what it still
/// reports mapped afterwards is written with zeros.
#[test]
fn zero_by_unmap_writes_zeros_where_the_target_kept_blocks_mapped() {
    let (url, disk, handle) =
        mini_target(Lun { blocks: 4096, block_size: 512, thin_unmap: true }, Box::new(|_, _, _| false));
    let lun = open(&url, true).unwrap();
    assert_eq!(lun.info().zero, ZeroMethod::Unmap);
    assert!(lun.caps().zero_offload && lun.caps().holes);
    lun.write_at(&pattern(MIB as usize, 12), 0).unwrap();
    lun.zero(4096, 512 << 10).unwrap();
    lun.flush().unwrap();
    Box::new(lun).close().unwrap();
    handle.join().unwrap();
    let disk = disk.lock().unwrap();
    assert!(disk[4096..4096 + (512 << 10)].iter().all(|&b| b == 0));
    assert_eq!(disk[..4096], pattern(MIB as usize, 12)[..4096]);
    assert_eq!(disk[4096 + (512 << 10)..MIB as usize], pattern(MIB as usize, 12)[4096 + (512 << 10)..]);
}

/// Ctrl-C during a sync onto a LUN (the engine's cancel flag): what was written is made durable
/// with SYNCHRONIZE CACHE after the last write, and closing logs out; nothing is sent after.
#[test]
fn an_interrupted_sync_onto_a_lun_synchronizes_its_cache_then_logs_out() {
    let cancel = std::sync::Arc::new(AtomicBool::new(false));
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let (stop, seen) = (std::sync::Arc::clone(&cancel), std::sync::Arc::clone(&log));
    let mut writes = 0;
    let hook: support::Hook = Box::new(move |p, _, _| {
        // What the initiator sent, in order: a CDB's opcode, or 0x46 for a Logout Request.
        match p.opcode() {
            opcode::SCSI_COMMAND => seen.lock().unwrap().push(p.bhs[32]),
            opcode::LOGOUT_REQUEST => seen.lock().unwrap().push(0x46),
            _ => {}
        }
        if p.opcode() == opcode::SCSI_COMMAND && p.bhs[32] == 0x8A {
            writes += 1;
            // The event: the sync is under way (4 commands of 256 KiB arrived).
            if writes == 4 {
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        false
    });
    let (url, disk, handle) = mini_target(Lun { blocks: 32768, block_size: 512, thin_unmap: false }, hook);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let data = pattern(16 * MIB as usize, 13);
    std::fs::write(&src, &data).unwrap();
    let source = blksync::endpoint::local::Local::open_source(&src).unwrap();
    let lun = open(&url, true).unwrap();
    let options = blksync::sync::SyncOptions { threads: 2, ..Default::default() };
    let control = blksync::progress::Control { observer: &blksync::progress::Silent, cancel: &cancel };
    let e = blksync::sync::sync(&source, &lun, false, &options, control).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Interrupted, "{e}");
    assert!(lun.logout(), "the target confirmed the logout");
    Box::new(lun).close().unwrap();
    handle.join().unwrap();
    let log = log.lock().unwrap().clone();
    let last_write = log.iter().rposition(|&op| op == 0x8A).unwrap();
    let flush = log.iter().rposition(|&op| op == 0x91).expect("a SYNCHRONIZE CACHE(16)");
    assert!(flush > last_write, "the cache is synchronised after the last write: {log:x?}");
    assert_eq!(log.last(), Some(&0x46), "the logout comes last: {log:x?}");
    // What the engine says is done is on the LUN.
    let text = e.to_string();
    let done: usize = text.split("the first ").nth(1).and_then(|s| s.split(' ').next()).unwrap().parse().unwrap();
    assert!(disk.lock().unwrap()[..done] == data[..done], "{text}");
}

/// A LUN opened for reading reads ahead of a sequential reader: after the first 2 MiB, the
/// next two reads of 2 MiB are already asked for, and the reads that follow take them (each
/// block crosses the wire once). A LUN opened for writing reads nothing ahead.
#[test]
fn a_sequential_reader_finds_the_next_reads_asked_for_ahead() {
    for writable in [false, true] {
        let reads = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
        let seen = std::sync::Arc::clone(&reads);
        let hook: support::Hook = Box::new(move |p, _, _| {
            if p.opcode() == opcode::SCSI_COMMAND && p.bhs[32] == 0x88 {
                seen.lock().unwrap().push(u64::from_be_bytes(p.bhs[34..42].try_into().unwrap()) * 512);
            }
            false
        });
        let (url, disk, handle) = mini_target(Lun { blocks: 32768, block_size: 512, thin_unmap: false }, hook);
        let data = pattern(16 * MIB as usize, 14);
        disk.lock().unwrap().copy_from_slice(&data);
        let lun = open(&url, writable).unwrap();
        let piece = lun.request_size() as u64;
        let chunk = 2 * MIB;
        assert_eq!(read(&lun, 0, chunk as usize), data[..chunk as usize]);
        // Commands reach the target in CmdSN order: once the flush is answered, every READ sent
        // before it has been seen.
        lun.flush().unwrap();
        let expect = if writable { chunk } else { 3 * chunk };
        assert_eq!(
            *reads.lock().unwrap(),
            (0..expect).step_by(piece as usize).collect::<Vec<_>>(),
            "writable {writable}"
        );
        for k in 1..8 {
            assert_eq!(read(&lun, k * chunk, chunk as usize), data[(k * chunk) as usize..((k + 1) * chunk) as usize]);
        }
        lun.flush().unwrap();
        let mut all = reads.lock().unwrap().clone();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "a block was read twice (writable {writable})");
        assert!(all.iter().take_while(|&&o| o < 8 * chunk).count() as u64 == 8 * chunk / piece, "{all:?}");
        Box::new(lun).close().unwrap();
        handle.join().unwrap();
    }
}
