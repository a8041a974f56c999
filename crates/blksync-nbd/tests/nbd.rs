//! The NBD client against real servers (qemu-nbd, nbdkit, started by `tests/lab/nbd`) and, for
//! what no real server does, against small servers in the test. Without qemu-nbd or nbdkit a
//! test prints `skipping:` and passes, unless `BLKSYNC_REQUIRE_NBD=1`.
//!
//! No test waits for time: servers are ready when the lab script returns, and tests that need
//! an event (a request reaching the server) wait for it in the server's log.

mod serve;
mod support;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;

use blksync_core::endpoint::{Segment, Source, Target};
use blksync_core::extent::Extent;
use blksync_core::{ErrorKind, Result};
use blksync_nbd::{Nbd, NbdOptions};
use support::{Logged, Offer, Server, nbdkit_log, pattern, serve, serve_raw, serve_simple};

const MIB: u64 = 1 << 20;

fn open(uri: &str, writable: bool) -> Result<Nbd> {
    Nbd::open(uri, writable, &NbdOptions::default())
}

fn read(nbd: &Nbd, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    nbd.read_at(&mut buf, offset).unwrap();
    buf
}

fn requests(log: &Path, op: &str) -> Vec<Logged> {
    nbdkit_log(log).into_iter().filter(|l| l.op == op && !l.reply).collect()
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn qemu_nbd_raw_reads_back_what_was_written_and_reports_holes_but_written_zeros_as_data() {
    require!("qemu-nbd");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    std::fs::File::create(&file).unwrap().set_len(8 * MIB).unwrap();
    let server = Server::start(dir.path(), &["--file", file.to_str().unwrap(), "--tcp"]);
    let nbd = open(&server.uri, true).unwrap();
    assert_eq!(nbd.name(), Path::new(&server.uri));
    assert_eq!(nbd.size(), 8 * MIB);
    let caps = nbd.caps();
    assert!(caps.holes && caps.zero_offload && !caps.resizable && !caps.discard_zeroes && !caps.changed_blocks);
    assert!(nbd.export().structured_replies && !nbd.export().export_name_fallback);

    let data = pattern(2 * MIB as usize + 4096, 1);
    nbd.write_at(&data, MIB).unwrap();
    nbd.write_at(&vec![0; 65536], 6 * MIB).unwrap();
    nbd.flush().unwrap();
    assert_eq!(read(&nbd, MIB, data.len()), data);
    Box::new(nbd).close().unwrap();
    let on_disk = std::fs::read(&file).unwrap();
    assert_eq!(&on_disk[MIB as usize..MIB as usize + data.len()], &data[..], "the file holds what was written");

    // A new connection asks the server afresh (no cache of this endpoint's own writes).
    let nbd = open(&server.uri, false).unwrap();
    assert_eq!(nbd.segment_at(0).unwrap(), Segment { start: 0, end: MIB, allocated: false });
    let written = nbd.segment_at(MIB).unwrap();
    assert!(written.allocated && written.start == MIB && written.end >= 3 * MIB + 4096, "{written:?}");
    assert!(!nbd.segment_at(4 * MIB).unwrap().allocated, "the hole between");
    assert!(nbd.segment_at(6 * MIB).unwrap().allocated, "qemu-nbd reports written zeros as data");
    assert_eq!(nbd.segment_at(7 * MIB).unwrap().end, 8 * MIB);
}

#[test]
fn qemu_nbd_qcow2_write_zero_flush_equals_what_qemu_img_reads() {
    require!("qemu-nbd", "qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", file.to_str().unwrap(), "16M"]);
    let server = Server::start(dir.path(), &["--file", file.to_str().unwrap(), "--format", "qcow2"]);
    let nbd = open(&server.uri, true).unwrap();
    let mut expect = vec![0u8; 16 * MIB as usize];
    for (i, (offset, len)) in [(0, 4096), (3 * MIB, MIB + 12288), (15 * MIB, MIB)].into_iter().enumerate() {
        let data = pattern(len as usize, i as u8 + 7);
        nbd.write_at(&data, offset).unwrap();
        expect[offset as usize..(offset + len) as usize].copy_from_slice(&data);
    }
    nbd.zero(3 * MIB + 65536, 131_072).unwrap();
    expect[(3 * MIB + 65536) as usize..(3 * MIB + 196_608) as usize].fill(0);
    nbd.flush().unwrap();
    let mut back = vec![0; expect.len()];
    nbd.read_at(&mut back, 0).unwrap();
    assert!(back == expect, "reads back what was written");
    Box::new(nbd).close().unwrap();
    server.stop();
    let raw = dir.path().join("disk.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", file.to_str().unwrap(), raw.to_str().unwrap()]);
    assert!(std::fs::read(&raw).unwrap() == expect, "qemu-img reads the same image");
}

#[test]
fn nbdkit_memory_reports_holes_and_zeroes_with_write_zeroes() {
    require!("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("requests.log");
    let args = format!("--filter=log memory size=8M logfile={}", log.display());
    let server = Server::start(dir.path(), &["--nbdkit", &args]);
    let nbd = open(&server.uri, true).unwrap();
    assert!(nbd.caps().holes && nbd.caps().zero_offload);
    assert_eq!(nbd.segment_at(0).unwrap(), Segment { start: 0, end: 8 * MIB, allocated: false });
    nbd.write_at(&pattern(2 * MIB as usize, 3), 2 * MIB).unwrap();
    assert!(nbd.segment_at(2 * MIB).unwrap().allocated, "a write marks the cached hole allocated");
    nbd.zero(2 * MIB + 524_288, MIB).unwrap();
    nbd.flush().unwrap();
    let zeroes = requests(&log, "Zero");
    assert_eq!(zeroes.len(), 1, "one WRITE_ZEROES: {zeroes:?}");
    assert_eq!((zeroes[0].offset, zeroes[0].count), (2 * MIB + 524_288, MIB));
    assert!(read(&nbd, 2 * MIB + 524_288, MIB as usize).iter().all(|&b| b == 0));
    drop(nbd);

    let nbd = open(&server.uri, false).unwrap();
    let hole = nbd.segment_at(2 * MIB + 524_288).unwrap();
    assert!(!hole.allocated, "the zeroed range reads as zeros: {hole:?}");
    assert!(nbd.segment_at(2 * MIB).unwrap().allocated);
    assert_eq!(requests(&log, "Write").len(), 8, "2 MiB in 256 KiB requests");
}

#[test]
fn without_structured_replies_reads_work_and_everything_is_allocated() {
    require!("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--nbdkit", "--no-sr memory size=4M"]);
    let nbd = open(&server.uri, true).unwrap();
    assert!(!nbd.export().structured_replies && !nbd.caps().holes);
    assert_eq!(nbd.segment_at(123 * 4096).unwrap(), Segment { start: 0, end: 4 * MIB, allocated: true });
    let data = pattern(3 * MIB as usize, 9);
    nbd.write_at(&data, 4096).unwrap();
    nbd.flush().unwrap();
    assert_eq!(read(&nbd, 4096, data.len()), data);
    assert!(nbd.changed_extents(0, 4 * MIB).is_err_and(|e| e.kind() == ErrorKind::Unsupported));
}

#[test]
fn a_plain_newstyle_server_is_opened_with_export_name() {
    require!("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--nbdkit", "--mask-handshake=0 memory size=1M"]);
    let nbd = open(&server.uri, true).unwrap();
    assert!(nbd.export().export_name_fallback && !nbd.export().structured_replies);
    nbd.write_at(&pattern(8192, 1), 0).unwrap();
    assert_eq!(read(&nbd, 0, 8192), pattern(8192, 1));
    Box::new(nbd).close().unwrap();
}

#[test]
fn a_server_without_go_is_opened_with_export_name_and_simple_replies() {
    let mut image = pattern(MIB as usize, 5);
    let expect = image.clone();
    let offer = Offer { go: false, structured: false, ..Offer::default() };
    let (uri, server) = serve(offer, move |s| serve_simple(s, &mut image));
    let nbd = open(&uri, true).unwrap();
    assert!(nbd.export().export_name_fallback && !nbd.export().structured_replies);
    assert_eq!(read(&nbd, 0, MIB as usize), expect);
    nbd.write_at(&[7; 4096], 8192).unwrap();
    nbd.flush().unwrap();
    assert_eq!(read(&nbd, 8192, 4096), vec![7; 4096]);
    Box::new(nbd).close().unwrap();
    server.join().unwrap();
}

#[test]
fn a_read_only_export_is_refused_as_a_target_before_any_request() {
    require!("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("requests.log");
    let args = format!("--filter=log memory size=1M logfile={}", log.display());
    let server = Server::start(dir.path(), &["--readonly", "--nbdkit", &args]);
    let e = open(&server.uri, true).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains(&server.uri) && e.to_string().contains("read-only"), "{e}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("connection=1 Connect"), "the handshake happened: {text}");
    assert!(nbdkit_log(&log).is_empty(), "no request reached the server: {text}");
    // As a source it opens, and refuses writes itself.
    let nbd = open(&server.uri, false).unwrap();
    assert_eq!(read(&nbd, 0, 512), vec![0; 512]);
    assert_eq!(nbd.write_at(&[1; 512], 0).unwrap_err().kind(), ErrorKind::Usage);
}

#[test]
fn an_injected_read_error_is_an_io_error_naming_address_and_offset() {
    require!("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("fail-now");
    let args = format!(
        "--filter=error memory size=4M error-pread=EIO error-pread-rate=100% error-pread-file={}",
        control.display()
    );
    let server = Server::start(dir.path(), &["--nbdkit", &args]);
    let nbd = open(&server.uri, false).unwrap();
    read(&nbd, MIB, 4096);
    std::fs::write(&control, b"").unwrap();
    let mut buf = vec![0; MIB as usize];
    let e = nbd.read_at(&mut buf, MIB).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    let text = e.to_string();
    assert!(text.starts_with(&format!("reading {} at byte offset 1048576: ", server.uri)), "{text}");
    assert!(text.contains("Input/output error"), "{text}");
    std::fs::remove_file(&control).unwrap();
    read(&nbd, MIB, 4096);
}

#[test]
fn a_block_status_error_counts_as_allocated() {
    require!("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let args = "--filter=error memory size=4M error-extents=EIO error-extents-rate=100%";
    let server = Server::start(dir.path(), &["--nbdkit", args]);
    let nbd = open(&server.uri, false).unwrap();
    assert!(nbd.caps().holes);
    assert_eq!(nbd.segment_at(4096).unwrap(), Segment { start: 4096, end: 4 * MIB, allocated: true });
    assert_eq!(read(&nbd, 0, 4096), vec![0; 4096], "the connection is fine");
}

#[test]
fn a_failed_write_is_reported_by_the_next_call_and_by_flush_naming_its_offset() {
    require!("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let args = "--filter=error memory size=4M error-pwrite=ENOSPC error-pwrite-rate=100%";
    let server = Server::start(dir.path(), &["--nbdkit", args]);
    let nbd = open(&server.uri, true).unwrap();
    nbd.write_at(&[1; 4096], 65536).unwrap(); // write-behind: the failure is not known yet
    let e = nbd.flush().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
    assert!(e.to_string().starts_with(&format!("writing {} at byte offset 65536: ", server.uri)), "{e}");
    let again = nbd.write_at(&[1; 4096], 0).unwrap_err();
    assert_eq!(again.to_string(), e.to_string(), "every later write reports it");
    assert_eq!(Box::new(nbd).close().unwrap_err().kind(), ErrorKind::NoSpace, "and so does close");
}

/// A sync from an export reads only its allocated ranges: the log of requests the server got
/// shows no READ in a hole.
#[test]
fn a_sync_from_an_export_does_not_read_its_holes() {
    require!("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("requests.log");
    let args = format!("--filter=log memory size=16M logfile={}", log.display());
    let server = Server::start(dir.path(), &["--nbdkit", &args]);
    let data = pattern(512 << 10, 4);
    {
        let nbd = open(&server.uri, true).unwrap();
        nbd.write_at(&data, 5 * MIB).unwrap();
        Box::new(nbd).close().unwrap();
    }
    let before = nbdkit_log(&log).len();
    let source = open(&server.uri, false).unwrap();
    let copy = dir.path().join("copy.img");
    let target = blksync::endpoint::local::Local::open_target(
        &copy,
        blksync::endpoint::OpenTarget { create: true, ..Default::default() },
    )
    .unwrap();
    let options = blksync::sync::SyncOptions { threads: 2, ..Default::default() };
    let cancel = AtomicBool::new(false);
    let control = blksync::progress::Control { observer: &blksync::progress::Silent, cancel: &cancel };
    blksync::sync::sync(&source, &target, true, &options, control).unwrap();
    drop(target);
    let mut expect = vec![0; 16 * MIB as usize];
    expect[5 * MIB as usize..5 * MIB as usize + data.len()].copy_from_slice(&data);
    assert!(std::fs::read(&copy).unwrap() == expect, "the copy equals the export");
    let reads: Vec<Logged> =
        nbdkit_log(&log)[before..].iter().filter(|l| l.op == "Read" && !l.reply).cloned().collect();
    assert!(!reads.is_empty());
    for r in &reads {
        assert!(r.offset >= 5 * MIB && r.offset + r.count <= 5 * MIB + data.len() as u64, "a read in a hole: {r:?}");
    }
    assert!(requests(&log, "Extents").len() <= 2, "the map is asked once per reply, not per chunk");
}

/// Two threads reading 2 MiB each, as the engine's workers do, keep 16 requests in flight: the
/// server's log shows 16 requests received before the first reply (nbdkit's delay filter keeps
/// each read waiting, so the order does not depend on how fast this machine is).
#[test]
fn sixteen_requests_are_in_flight_at_once() {
    require!("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("requests.log");
    let args = format!("-t 64 --filter=log --filter=delay memory size=64M logfile={} rdelay=200ms", log.display());
    let server = Server::start(dir.path(), &["--nbdkit", &args]);
    let nbd = open(&server.uri, false).unwrap();
    let start = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        for i in 0..2u64 {
            let (nbd, start) = (&nbd, &start);
            s.spawn(move || {
                start.wait();
                read(nbd, i * 2 * MIB, 2 * MIB as usize);
            });
        }
    });
    let (mut in_flight, mut most) = (0, 0);
    for l in nbdkit_log(&log).iter().filter(|l| l.op == "Read") {
        in_flight = if l.reply { in_flight - 1 } else { in_flight + 1 };
        most = most.max(in_flight);
    }
    println!("{most} reads were in flight at once");
    assert!(most >= 16, "at most {most} reads were in flight at once");
}

#[test]
fn a_server_killed_mid_transfer_is_a_connection_error_not_a_hang() {
    require!("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("requests.log");
    // The reads wait in the delay filter (an hour) while the server is killed.
    let args = format!("-t 64 --filter=log --filter=delay memory size=64M logfile={} rdelay=3600", log.display());
    let server = Server::start(dir.path(), &["--nbdkit", &args]);
    let nbd = open(&server.uri, true).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut buf = vec![0; 4 * MIB as usize];
            tx.send(nbd.read_at(&mut buf, 8 * MIB)).unwrap();
        });
        // The event: the server has the requests.
        support::wait_for(|| requests(&log, "Read").len() == 16, "16 reads in the server's log");
        server.kill();
        let e = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the read returns").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Connection, "{e}");
        assert!(e.to_string().starts_with(&format!("reading {} at byte offset 8388608: ", server.uri)), "{e}");
    });
    let e = nbd.write_at(&[0; 4096], 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Connection, "later calls fail at once: {e}");
    assert_eq!(nbd.flush().unwrap_err().kind(), ErrorKind::Connection);
}

#[test]
fn a_dirty_bitmap_lists_exactly_what_was_written_since_it_was_added() {
    require!("qemu-nbd", "qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.qcow2");
    let f = file.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", f, "16M"]);
    {
        let server = Server::start(dir.path(), &["--file", f, "--format", "qcow2"]);
        let nbd = open(&server.uri, true).unwrap();
        nbd.write_at(&pattern(MIB as usize, 1), 0).unwrap();
        Box::new(nbd).close().unwrap();
    }
    qemu_img(&["bitmap", "--add", f, "b0"]);
    {
        let server = Server::start(dir.path(), &["--file", f, "--format", "qcow2"]);
        let nbd = open(&server.uri, true).unwrap();
        nbd.write_at(&pattern(65536, 2), 2 * MIB).unwrap();
        nbd.write_at(&pattern(131_072, 3), 9 * MIB).unwrap();
        nbd.flush().unwrap();
        Box::new(nbd).close().unwrap();
    }
    let server = Server::start(dir.path(), &["--file", f, "--format", "qcow2", "--bitmap", "b0"]);
    let options = NbdOptions { bitmap: Some("b0".into()), ..NbdOptions::default() };
    let nbd = Nbd::open(&server.uri, false, &options).unwrap();
    assert!(nbd.caps().changed_blocks && nbd.caps().holes);
    let changed = nbd.changed_extents(0, 16 * MIB).unwrap();
    assert_eq!(changed, vec![Extent { offset: 2 * MIB, len: 65536 }, Extent { offset: 9 * MIB, len: 131_072 }]);
    assert_eq!(nbd.changed_extents(9 * MIB + 4096, 4096).unwrap(), vec![Extent { offset: 9 * MIB + 4096, len: 4096 }]);
    let options = NbdOptions { bitmap: Some("nope".into()), ..NbdOptions::default() };
    let e = Nbd::open(&server.uri, false, &options).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
}

#[test]
fn block_size_constraints_are_honoured() {
    require!("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("requests.log");
    let args = format!(
        "--filter=log --filter=blocksize-policy memory size=1M logfile={} blocksize-minimum=4096 blocksize-preferred=65536 blocksize-maximum=131072 blocksize-error-policy=error",
        log.display()
    );
    let server = Server::start(dir.path(), &["--nbdkit", &args]);
    let nbd = open(&server.uri, true).unwrap();
    assert_eq!(nbd.caps().block_size, 4096);
    assert_eq!(nbd.request_size(), 131_072, "capped by the maximum payload");
    nbd.write_at(&pattern(MIB as usize, 6), 0).unwrap();
    nbd.flush().unwrap();
    assert_eq!(read(&nbd, 100, 1000), pattern(MIB as usize, 6)[100..1100], "an unaligned read, widened");
    let e = nbd.write_at(&[0; 512], 512).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
    assert!(e.to_string().contains("4096"), "{e}");
    for l in nbdkit_log(&log).iter().filter(|l| !l.reply && (l.op == "Read" || l.op == "Write")) {
        assert!(l.offset % 4096 == 0 && l.count % 4096 == 0 && l.count <= 131_072, "{l:?}");
    }
}

/// The engine's last chunk of an image whose size is not a multiple of 4096 is short: with a
/// minimum block of 1 it is read and written as it is.
#[test]
fn the_unaligned_tail_of_an_export_is_synced_and_verified() {
    require!("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let size = 3 * MIB + 1000;
    let server = Server::start(dir.path(), &["--nbdkit", &format!("memory size={size}")]);
    let src = dir.path().join("src.img");
    std::fs::write(&src, pattern(size as usize, 3)).unwrap();
    let source = blksync::endpoint::local::Local::open_source(&src).unwrap();
    let target = open(&server.uri, true).unwrap();
    let options = blksync::sync::SyncOptions { threads: 2, verify: true, ..Default::default() };
    let cancel = AtomicBool::new(false);
    let control = blksync::progress::Control { observer: &blksync::progress::Silent, cancel: &cancel };
    assert!(blksync::sync::sync(&source, &target, false, &options, control).unwrap().verified);
    assert_eq!(read(&target, 3 * MIB, 1000), pattern(size as usize, 3)[3 * MIB as usize..]);
}

/// With a minimum block of 4096 and a size that is not a multiple of it, the last partial
/// block cannot be addressed (the protocol forbids a request past the end): a clear refusal.
#[test]
fn an_unaddressable_tail_is_refused_with_the_reason() {
    require!("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let args = "--filter=blocksize-policy memory size=10000 blocksize-minimum=4096 blocksize-error-policy=error";
    let server = Server::start(dir.path(), &["--nbdkit", args]);
    let nbd = open(&server.uri, true).unwrap();
    assert_eq!(read(&nbd, 4096, 4096), vec![0; 4096]);
    let mut tail = vec![0; 1808];
    let e = nbd.read_at(&mut tail, 8192).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
    assert!(e.to_string().contains("cannot be addressed"), "{e}");
    assert!(nbd.write_at(&tail, 8192).unwrap_err().to_string().contains("cannot be addressed"));
    let segment = nbd.segment_at(9000).unwrap();
    assert!(segment.allocated && segment.end == 10000, "the tail counts as allocated: {segment:?}");
}

#[test]
fn a_sync_onto_an_export_makes_it_equal_and_verifies() {
    require!("qemu-nbd");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.img");
    std::fs::write(&file, pattern(6 * MIB as usize, 8)).unwrap();
    let server = Server::start(dir.path(), &["--file", file.to_str().unwrap()]);
    let src = dir.path().join("src.img");
    let mut image = vec![0; 6 * MIB as usize + 12288];
    image[..MIB as usize].copy_from_slice(&pattern(MIB as usize, 2));
    image[4 * MIB as usize..4 * MIB as usize + 4096].fill(9);
    std::fs::write(&src, &image[..6 * MIB as usize]).unwrap();
    image.truncate(6 * MIB as usize);
    let source = blksync::endpoint::local::Local::open_source(&src).unwrap();
    let target = open(&server.uri, true).unwrap();
    let options = blksync::sync::SyncOptions { threads: 2, verify: true, ..Default::default() };
    let cancel = AtomicBool::new(false);
    let control = blksync::progress::Control { observer: &blksync::progress::Silent, cancel: &cancel };
    let summary = blksync::sync::sync(&source, &target, false, &options, control).unwrap();
    assert!(summary.verified);
    Box::new(target).close().unwrap();
    assert!(std::fs::read(&file).unwrap() == image, "the export's file equals the source");
}

#[test]
fn bad_addresses_and_tls_are_refused_before_connecting() {
    assert_eq!(open("nbd://h/e?x=1", false).unwrap_err().kind(), ErrorKind::Usage);
    let e = open("nbds://127.0.0.1/e", false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("ssh tunnel"), "{e}");
    let e = open("nbd+unix:///e?socket=/nonexistent/sock", false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Connection);
    assert!(e.to_string().contains("nbd+unix:///e?socket=/nonexistent/sock"), "{e}");
}

/// A hostile or broken server: every kind of garbage ends in an error, never a panic, a hang or
/// an allocation of what the server claims.
mod hostile {
    use super::*;
    use blksync_nbd::wire::transmission::{
        BlockStatus, ChunkHeader, Extent as WireExtent, ReplyHeader, SimpleReply, chunk, data_chunk,
    };
    use blksync_nbd::wire::{cmd, option, reply};
    use std::io::Write;
    use support::request;

    /// Opens the in-test server, reads (or asks for block status) once, and returns the error.
    fn fails(
        offer: Offer,
        answer: impl FnOnce(&blksync_nbd::wire::transmission::Request) -> Vec<u8> + Send + 'static,
    ) -> blksync_core::Error {
        let (uri, server) = serve(offer, move |s| {
            while let Some((r, _)) = request(s) {
                if r.kind == cmd::READ || r.kind == cmd::BLOCK_STATUS {
                    let _ = s.write_all(&answer(&r));
                    break;
                }
            }
            let _ = std::io::copy(s, &mut std::io::sink());
        });
        let nbd = open(&uri, false).unwrap();
        let mut buf = vec![0; 4096];
        let e = nbd.read_at(&mut buf, 0).unwrap_err();
        assert_eq!(nbd.read_at(&mut buf, 0).unwrap_err().kind(), e.kind(), "the connection is done");
        drop(nbd);
        server.join().unwrap();
        e
    }

    fn ok(cookie: u64) -> Vec<u8> {
        ReplyHeader::Simple(SimpleReply { error: 0, cookie }).encode()
    }

    #[test]
    fn a_bad_reply_magic() {
        let e = fails(Offer::default(), |_| b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec());
        assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
        assert!(e.to_string().contains("magic"), "{e}");
    }

    #[test]
    fn a_huge_data_chunk() {
        let e = fails(Offer::default(), |r| {
            ReplyHeader::Chunk(ChunkHeader { flags: 1, kind: reply::OFFSET_DATA, cookie: r.cookie, len: 0xffff_fff0 })
                .encode()
        });
        assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    }

    #[test]
    fn a_huge_error_and_status_chunk() {
        let e = fails(Offer::default(), |r| {
            ReplyHeader::Chunk(ChunkHeader { flags: 1, kind: reply::ERROR, cookie: r.cookie, len: u32::MAX }).encode()
        });
        assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
        let e = fails(Offer::default(), |r| {
            ReplyHeader::Chunk(ChunkHeader { flags: 1, kind: reply::BLOCK_STATUS, cookie: r.cookie, len: u32::MAX })
                .encode()
        });
        assert_eq!(e.kind(), ErrorKind::Protocol, "block status to a read: {e}");
    }

    #[test]
    fn data_outside_the_request() {
        let e = fails(Offer::default(), |r| data_chunk(1, r.cookie, r.offset + 4096, &[1; 512]));
        assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
        assert!(e.to_string().contains("outside"), "{e}");
    }

    #[test]
    fn a_reply_that_leaves_part_of_the_read_out() {
        let e = fails(Offer::default(), |r| data_chunk(1, r.cookie, r.offset, &[1; 1024]));
        assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    }

    #[test]
    fn an_unknown_cookie() {
        let e = fails(Offer::default(), |r| data_chunk(1, r.cookie + 1000, r.offset, &[1; 4096]));
        assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
        assert!(e.to_string().contains("no request in flight"), "{e}");
    }

    #[test]
    fn a_second_reply_to_a_request_already_answered() {
        let (uri, server) = serve(Offer::default(), |s| {
            let (r, _) = request(s).unwrap();
            let _ = s.write_all(
                &[data_chunk(1, r.cookie, r.offset, &[1; 4096]), data_chunk(1, r.cookie, r.offset, &[2; 4096])]
                    .concat(),
            );
            let _ = std::io::copy(s, &mut std::io::sink());
        });
        let nbd = open(&uri, false).unwrap();
        let mut buf = vec![0; 4096];
        nbd.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, vec![1; 4096]);
        let e = nbd.read_at(&mut buf, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
        drop(nbd);
        server.join().unwrap();
    }

    #[test]
    fn a_simple_reply_with_data_after_structured_replies_were_agreed() {
        let e = fails(Offer::default(), |r| [ok(r.cookie), vec![0; 4096]].concat());
        assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    }

    #[test]
    fn a_server_that_hangs_up_mid_reply() {
        let (uri, server) = serve(Offer::default(), |s| {
            let (r, _) = request(s).unwrap();
            let _ = s.write_all(&data_chunk(1, r.cookie, r.offset, &[1; 4096])[..100]);
        });
        let nbd = open(&uri, false).unwrap();
        let mut buf = vec![0; 4096];
        let e = nbd.read_at(&mut buf, 4096).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Connection, "{e}");
        assert!(e.to_string().starts_with(&format!("reading {uri} at byte offset 4096: ")), "{e}");
        assert!(e.to_string().contains("in the middle of a reply"), "{e}");
        server.join().unwrap();
    }

    #[test]
    fn zero_length_extents_and_unselected_contexts() {
        for extents in [vec![WireExtent { len: 0, flags: 0 }], vec![WireExtent { len: 4096, flags: 0 }]] {
            let context = if extents[0].len == 0 { 1 } else { 99 };
            let (uri, server) = serve(Offer::default(), move |s| {
                let (r, _) = request(s).unwrap();
                let payload = BlockStatus { context, extents }.encode();
                let _ = s.write_all(&chunk(1, reply::BLOCK_STATUS, r.cookie, &payload));
                let _ = std::io::copy(s, &mut std::io::sink());
            });
            let nbd = open(&uri, false).unwrap();
            assert!(nbd.caps().holes);
            let e = nbd.segment_at(0).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
            drop(nbd);
            server.join().unwrap();
        }
    }

    /// `NBD_ESHUTDOWN`: the request fails as a lost connection, nothing new is sent, and the
    /// client disconnects softly.
    #[test]
    fn a_server_shutting_down_gets_no_new_requests_and_a_disconnect() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (uri, server) = serve(Offer::default(), move |s| {
            let (r, _) = request(s).unwrap();
            let shutdown =
                ReplyHeader::Simple(SimpleReply { error: blksync_nbd::wire::errno::ESHUTDOWN, cookie: r.cookie });
            s.write_all(&shutdown.encode()).unwrap();
            while let Some((r, _)) = request(s) {
                tx.send(r.kind).unwrap();
            }
        });
        let nbd = open(&uri, false).unwrap();
        let mut buf = vec![0; 4096];
        let e = nbd.read_at(&mut buf, 8192).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Connection, "{e}");
        assert!(e.to_string().contains("shutting down") && e.to_string().contains("byte offset 8192"), "{e}");
        assert_eq!(nbd.read_at(&mut buf, 0).unwrap_err().kind(), ErrorKind::Connection);
        drop(nbd);
        server.join().unwrap();
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![cmd::DISC], "only NBD_CMD_DISC came after it");
    }

    #[test]
    fn dropping_an_endpoint_waits_for_its_writes_and_disconnects() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (uri, server) = serve(Offer::default(), move |s| {
            while let Some((r, _)) = request(s) {
                tx.send(r.kind).unwrap();
                if r.kind != cmd::DISC {
                    let _ = s.write_all(&ok(r.cookie));
                }
            }
        });
        let nbd = open(&uri, true).unwrap();
        nbd.write_at(&[1; 4096], 0).unwrap();
        drop(nbd);
        server.join().unwrap();
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![cmd::WRITE, cmd::DISC]);
    }

    #[test]
    fn garbage_instead_of_a_handshake() {
        for bytes in [
            b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n".to_vec(),
            [&option::Greeting { flags: 3 }.encode()[..], &[0xff; 64]].concat(),
            vec![],
        ] {
            let (uri, server) = serve_raw(bytes);
            let e = open(&uri, false).unwrap_err();
            assert!(matches!(e.kind(), ErrorKind::Protocol | ErrorKind::Connection), "{e}");
            assert!(e.to_string().contains(&uri), "{e}");
            server.join().unwrap();
        }
    }
}
