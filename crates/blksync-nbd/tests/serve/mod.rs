//! The NBD server (`blksync_nbd::server`) against real clients: libnbd's `nbdinfo` and
//! `nbdcopy`, `qemu-img`, and this crate's own client; raw clients of our own for what no real
//! client does (garbage, huge lengths, a disconnect in the middle of a request). Servers run in
//! the test process, on a unix socket in a temporary directory or a free loopback port.
//!
//! Nothing waits for time: a server accepts as soon as `Running::start` returns (the listener
//! is bound before), and the test that proves requests run at once waits for them to meet.

mod file;
mod raw;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use blksync_core::endpoint::memory::Memory;
use blksync_core::endpoint::{Identity, Segment, Source, Target};
use blksync_core::{ErrorKind, Result};
use blksync_nbd::server::{Export, Listener, Server, ServerOptions, StopHandle};
use blksync_nbd::wire::{cmd, cmd_flag, errno};
use blksync_nbd::{Nbd, NbdOptions};

use crate::require;
use crate::support::{self, pattern};
use file::FileImage;
use raw::Raw;

const MIB: u64 = 1 << 20;

/// A server running on a thread of the test, stopped (and joined) on drop.
struct Running {
    uri: String,
    socket: std::path::PathBuf,
    stop: StopHandle,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Running {
    /// Serves `exports` on a unix socket; the URI names the first export.
    fn start(exports: Vec<Export>) -> Running {
        Running::with(exports, ServerOptions::default(), false)
    }

    fn with(exports: Vec<Export>, options: ServerOptions, tcp: bool) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let listener = if tcp { Listener::bind_loopback(0).unwrap() } else { Listener::bind_unix(&socket).unwrap() };
        let uri = listener.uri(exports[0].name()).unwrap();
        let server = Server::new(listener, exports, options).unwrap();
        let stop = server.stop_handle();
        let thread = Some(std::thread::spawn(move || server.run()));
        Running { uri, socket, stop, thread, _dir: dir }
    }

    /// The URI of another export of the same server.
    fn uri_of(&self, export: &str) -> String {
        match self.uri.split_once('?') {
            Some((_, query)) => format!("nbd+unix:///{export}?{query}"),
            None => format!("{}/{export}", self.uri.rsplit_once('/').unwrap().0),
        }
    }

    /// Stops the server and returns what `run` returned.
    fn stop(mut self) -> Result<()> {
        self.stop.stop();
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn memory(bytes: Vec<u8>) -> Arc<Memory> {
    Arc::new(Memory::with_bytes("memory", bytes))
}

fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().unwrap();
    assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn open(uri: &str, writable: bool) -> Nbd {
    Nbd::open(uri, writable, &NbdOptions::default()).unwrap()
}

fn read(nbd: &Nbd, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    nbd.read_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn nbdinfo_shows_the_size_flags_block_sizes_and_context() {
    require!("nbdinfo");
    let image = memory(pattern(3 * MIB as usize, 1));
    let server = Running::start(vec![Export::writable("disk", image.clone()), Export::read_only("ro", image)]);
    let json: String = run("nbdinfo", &["--json", &server.uri]).split_whitespace().collect();
    for expect in [
        "\"export-size\":3145728",
        "\"is_read_only\":false",
        "\"can_flush\":true",
        "\"can_fua\":true",
        "\"can_zero\":true",
        "\"can_fast_zero\":true",
        "\"can_multi_conn\":true",
        "\"can_df\":true",
        "\"can_trim\":false",
        "\"block_size_minimum\":1",
        "\"block_size_preferred\":4096",
        "\"block_size_maximum\":33554432",
        "\"base:allocation\"",
    ] {
        assert!(json.contains(expect), "no {expect} in {json}");
    }
    let json: String = run("nbdinfo", &["--json", &server.uri_of("ro")]).split_whitespace().collect();
    assert!(json.contains("\"is_read_only\":true"), "{json}");
}

#[test]
fn nbdinfo_list_names_every_export_with_its_description() {
    require!("nbdinfo");
    let image = memory(vec![0; 4096]);
    let server = Running::start(vec![
        Export::read_only("first", image.clone()).with_description("the first disk"),
        Export::writable("second", image),
    ]);
    let text = run("nbdinfo", &["--list", &server.uri]);
    assert!(text.contains("export=\"first\"") || text.contains("export=first"), "{text}");
    assert!(text.contains("second"), "{text}");
    assert!(text.contains("the first disk"), "{text}");
}

#[test]
fn nbdinfo_map_shows_holes_as_holes() {
    require!("nbdinfo");
    let image = Arc::new(Memory::new("sparse", 4 * MIB).reports_holes(true));
    image.write_at(&pattern(MIB as usize, 2), MIB).unwrap();
    let server = Running::start(vec![Export::read_only("sparse", image)]);
    let map = run("nbdinfo", &["--map", &server.uri]);
    let rows: Vec<Vec<&str>> = map.lines().map(|l| l.split_whitespace().collect()).collect();
    let rows: Vec<(&str, &str, &str)> = rows.iter().map(|r| (r[0], r[1], r[2])).collect();
    assert_eq!(rows, [("0", "1048576", "3"), ("1048576", "1048576", "0"), ("2097152", "2097152", "3")], "{map}");
}

#[test]
fn nbdcopy_from_the_server_gives_the_source_bytes_from_memory_and_from_a_file() {
    require!("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let bytes = pattern(9 * MIB as usize + 512, 3);
    let sparse = Arc::new(Memory::with_bytes("m", bytes.clone()).reports_holes(true).with_hole(2 * MIB, 3 * MIB));
    let mut expected = bytes.clone();
    expected[2 * MIB as usize..5 * MIB as usize].fill(0);
    let path = dir.path().join("src.img");
    std::fs::write(&path, &bytes).unwrap();
    let file = Arc::new(FileImage::open(&path, false));
    let server = Running::start(vec![Export::read_only("m", sparse), Export::read_only("f", file)]);
    for (name, want) in [("m", &expected), ("f", &bytes)] {
        let out = dir.path().join(format!("{name}.out"));
        run("nbdcopy", &[&server.uri_of(name), out.to_str().unwrap()]);
        assert!(std::fs::read(&out).unwrap() == *want, "nbdcopy of {name} differs");
    }
}

#[test]
fn nbdcopy_into_a_writable_export_lands_and_is_flushed() {
    require!("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let bytes = pattern(8 * MIB as usize, 4);
    let mut with_zeros = bytes.clone();
    with_zeros[MIB as usize..3 * MIB as usize].fill(0);
    let input = dir.path().join("in.img");
    std::fs::write(&input, &with_zeros).unwrap();
    let image = Arc::new(Memory::with_bytes("target", vec![0xaa; 8 * MIB as usize]));
    let server = Running::start(vec![Export::writable("t", image.clone())]);
    run("nbdcopy", &["--flush", input.to_str().unwrap(), &server.uri]);
    assert!(image.contents() == with_zeros, "the export does not hold what nbdcopy wrote");
    assert!(image.flushes() >= 1, "nbdcopy --flush flushes at the end");
}

#[test]
fn qemu_img_compares_the_export_equal_to_its_raw_file_and_reads_its_size() {
    require!("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, pattern(5 * MIB as usize, 5)).unwrap();
    let server = Running::start(vec![Export::read_only("disk", Arc::new(FileImage::open(&path, false)))]);
    run("qemu-img", &["compare", "-f", "raw", "-F", "raw", path.to_str().unwrap(), &server.uri]);
    let info = run("qemu-img", &["info", "--output=json", &server.uri]);
    assert!(info.split_whitespace().collect::<String>().contains("\"virtual-size\":5242880"), "{info}");
    // And into a writable one: convert writes, compare reads back.
    let target = Arc::new(Memory::new("t", 5 * MIB));
    let server = Running::start(vec![Export::writable("t", target.clone())]);
    run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", path.to_str().unwrap(), &server.uri]);
    assert!(target.contents() == std::fs::read(&path).unwrap());
    run("qemu-img", &["compare", "-f", "raw", "-F", "raw", path.to_str().unwrap(), &server.uri]);
}

#[test]
fn the_crates_own_client_round_trips_reads_writes_zeros_and_block_status() {
    let image = Arc::new(Memory::new("rw", 8 * MIB).reports_holes(true));
    let server = Running::with(vec![Export::writable("rw", image.clone())], ServerOptions::default(), true);
    let nbd = open(&server.uri, true);
    assert_eq!(nbd.size(), 8 * MIB);
    assert!(nbd.caps().holes && nbd.caps().zero_offload);
    assert_eq!(nbd.segment_at(0).unwrap(), Segment { start: 0, end: 8 * MIB, allocated: false });
    let data = pattern(3 * MIB as usize, 6);
    nbd.write_at(&data, MIB).unwrap();
    nbd.zero(2 * MIB, MIB).unwrap();
    nbd.flush().unwrap();
    let mut want = data.clone();
    want[MIB as usize..2 * MIB as usize].fill(0);
    assert!(read(&nbd, MIB, 3 * MIB as usize) == want);
    assert!(image.contents()[MIB as usize..4 * MIB as usize] == want[..]);
    Box::new(nbd).close().unwrap();
    // A new connection: the first one's cache calls everything it wrote or zeroed allocated.
    let nbd = open(&server.uri, true);
    assert_eq!(nbd.segment_at(0).unwrap(), Segment { start: 0, end: MIB, allocated: false });
    assert_eq!(nbd.segment_at(MIB).unwrap(), Segment { start: MIB, end: 2 * MIB, allocated: true });
    assert_eq!(nbd.segment_at(2 * MIB).unwrap(), Segment { start: 2 * MIB, end: 3 * MIB, allocated: false });
    Box::new(nbd).close().unwrap();
    assert!(image.flushes() >= 1);
}

/// A source whose reads wait until `want` of them are running at once (or fail after a
/// minute): it proves a server executes requests in flight concurrently.
struct Rendezvous {
    inner: Memory,
    want: usize,
    running: Mutex<usize>,
    met: Condvar,
    most: AtomicUsize,
}

impl Source for Rendezvous {
    fn name(&self) -> &Path {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut running = self.running.lock().unwrap();
        *running += 1;
        self.most.fetch_max(*running, Ordering::SeqCst);
        self.met.notify_all();
        let (mut running, timeout) = self
            .met
            .wait_timeout_while(running, Duration::from_secs(60), |_| self.most.load(Ordering::SeqCst) < self.want)
            .unwrap();
        assert!(!timeout.timed_out(), "reads never ran {} at once", self.want);
        *running -= 1;
        drop(running);
        self.inner.read_at(buf, offset)
    }
    fn segment_at(&self, offset: u64) -> Result<Segment> {
        self.inner.segment_at(offset)
    }
    fn drop_cache(&self, _: u64, _: u64) {}
    fn identity(&self) -> Identity {
        Identity::None
    }
}

#[test]
fn sixteen_requests_in_flight_run_eight_at_once() {
    let bytes = pattern(4 * MIB as usize, 7);
    let source = Arc::new(Rendezvous {
        inner: Memory::with_bytes("r", bytes.clone()),
        want: 8,
        running: Mutex::new(0),
        met: Condvar::new(),
        most: AtomicUsize::new(0),
    });
    let server = Running::start(vec![Export::read_only("r", source.clone())]);
    // 4 MiB in 256 KiB pieces: the client sends all 16 before it waits for the first reply.
    let nbd = open(&server.uri, false);
    assert!(read(&nbd, 0, 4 * MIB as usize) == bytes);
    assert_eq!(source.most.load(Ordering::SeqCst), 8, "8 workers, all busy at once");
}

#[test]
fn a_read_only_export_refuses_writes_zeros_and_trims_with_eperm() {
    let image = memory(pattern(MIB as usize, 8));
    let server = Running::start(vec![Export::read_only("ro", image.clone())]);
    let mut raw = Raw::connect(&server.socket, "ro", true);
    raw.send(cmd::WRITE, 0, 1, 0, &[1; 512]);
    raw.send(cmd::WRITE_ZEROES, 0, 2, 0, &[]);
    raw.send(cmd::TRIM, 0, 3, 4096, &[]);
    let mut errors: Vec<(u64, u32)> = (0..3).map(|_| raw.simple_reply()).collect();
    errors.sort_unstable();
    assert_eq!(errors, [(1, errno::EPERM), (2, errno::EPERM), (3, errno::EPERM)]);
    assert!(image.contents() == pattern(MIB as usize, 8));
    // The connection goes on after the errors.
    raw.send(cmd::READ, 0, 4, 0, &[]);
    assert_eq!(raw.read_reply(4, 512), Ok(pattern(512, 8)));
    // The crate's own client refuses before sending anything.
    let err = Nbd::open(&server.uri, true, &NbdOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
}

#[test]
fn several_clients_at_once_each_see_their_own_writes_and_each_others() {
    let image = Arc::new(Memory::new("shared", 8 * MIB));
    let server = Running::start(vec![Export::writable("shared", image.clone())]);
    std::thread::scope(|scope| {
        for i in 0..4u8 {
            let uri = &server.uri;
            scope.spawn(move || {
                let nbd = open(uri, true);
                let data = pattern(2 * MIB as usize, i);
                nbd.write_at(&data, u64::from(i) * 2 * MIB).unwrap();
                nbd.flush().unwrap();
                assert!(read(&nbd, u64::from(i) * 2 * MIB, 2 * MIB as usize) == data);
                Box::new(nbd).close().unwrap();
            });
        }
    });
    let nbd = open(&server.uri, false);
    for i in 0..4u8 {
        assert!(read(&nbd, u64::from(i) * 2 * MIB, 2 * MIB as usize) == pattern(2 * MIB as usize, i));
    }
}

#[test]
fn hostile_clients_get_errors_or_are_closed_and_the_others_are_served() {
    let image = memory(pattern(MIB as usize, 9));
    let server = Running::start(vec![Export::writable("x", image.clone())]);
    let good = open(&server.uri, true);

    // Garbage instead of the client's flags and options: closed.
    assert!(Raw::garbage(&server.socket, &[0xff; 64]), "garbage is answered by closing");
    // An option claiming 4 GiB of data: closed before anything is allocated.
    let mut huge = 1u32.to_be_bytes().to_vec();
    huge.extend(blksync_nbd::wire::option::OptionHeader { option: 7, len: u32::MAX }.encode());
    assert!(Raw::garbage(&server.socket, &huge));

    let mut raw = Raw::connect(&server.socket, "x", true);
    // Past the end, overflowing, too large, unaligned nothing (minimum 1), unknown command.
    raw.send(cmd::READ, 0, 1, MIB, &[]);
    assert_eq!(raw.read_reply(1, 512), Err(errno::EINVAL));
    raw.send(cmd::READ, 0, 2, u64::MAX - 10, &[]);
    assert_eq!(raw.read_reply(2, 512), Err(errno::EINVAL));
    raw.send_len(cmd::READ, 0, 3, 0, 64 << 20);
    assert_eq!(raw.read_reply(3, 0), Err(errno::EINVAL));
    raw.send(cmd::WRITE, 0, 4, MIB, &[0; 512]);
    assert_eq!(raw.simple_reply(), (4, errno::ENOSPC));
    raw.send_len(cmd::BLOCK_STATUS, 0, 5, 0, 512);
    assert_eq!(raw.read_reply(5, 0), Err(errno::EINVAL), "no context was selected");
    raw.send(cmd::CACHE, 0, 6, 0, &[]);
    assert_eq!(raw.simple_reply(), (6, errno::EINVAL));
    raw.send_len(cmd::WRITE_ZEROES, cmd_flag::FAST_ZERO, 7, 0, 4096);
    assert_eq!(raw.simple_reply(), (7, errno::ENOTSUP), "Memory's zeroing is not offloaded");
    // A write beyond the maximum payload: its 64 MiB are read past, the stream stays framed.
    raw.send_len(cmd::WRITE, 0, 8, 0, 64 << 20);
    raw.write(&vec![0; 64 << 20]);
    assert_eq!(raw.simple_reply(), (8, errno::EINVAL));
    raw.send(cmd::READ, 0, 9, 0, &[]);
    assert_eq!(raw.read_reply(9, 512), Ok(pattern(512, 9)));
    // A bad magic closes the connection.
    raw.write(&[0u8; 28]);
    assert!(raw.closed());

    // A disconnect in the middle of a write's payload.
    let mut cut = Raw::connect(&server.socket, "x", false);
    cut.send_len(cmd::WRITE, 0, 1, 0, 4096);
    cut.write(&[7; 100]);
    drop(cut);
    // A header cut short.
    let mut cut = Raw::connect(&server.socket, "x", false);
    cut.write(&[0x25, 0x60]);
    drop(cut);

    assert!(image.contents() == pattern(MIB as usize, 9), "nothing of it was written");
    good.write_at(&[1; 4096], 0).unwrap();
    good.flush().unwrap();
    assert!(read(&good, 0, 4096) == vec![1; 4096]);
}

#[test]
fn structured_reads_send_holes_as_holes_and_df_as_one_data_chunk() {
    let image = Arc::new(Memory::new("s", MIB).reports_holes(true));
    image.write_at(&[5; 4096], 8192).unwrap();
    let server = Running::start(vec![Export::read_only("s", image)]);
    let mut raw = Raw::connect(&server.socket, "s", true);
    raw.send_len(cmd::READ, 0, 1, 0, 16384);
    let chunks = raw.chunks(1);
    assert_eq!(chunks, ["hole 0+8192", "data 8192+4096", "hole 12288+4096", "none"]);
    raw.send_len(cmd::READ, cmd_flag::DF, 2, 0, 16384);
    assert_eq!(raw.chunks(2), ["data 0+16384 done"]);
    raw.send_len(cmd::READ, 0, 3, 0, 0);
    assert_eq!(raw.chunks(3), ["none"], "no data chunk without data");
}

#[test]
fn write_zeroes_with_no_hole_allocates_and_without_it_punches() {
    let image = Arc::new(Memory::with_bytes("z", vec![9; MIB as usize]).reports_holes(true));
    let server = Running::start(vec![Export::writable("z", image.clone())]);
    let mut raw = Raw::connect(&server.socket, "z", true);
    raw.send_len(cmd::WRITE_ZEROES, cmd_flag::NO_HOLE, 1, 0, 65536);
    assert_eq!(raw.simple_reply(), (1, 0));
    raw.send_len(cmd::WRITE_ZEROES, 0, 2, 65536, 65536);
    assert_eq!(raw.simple_reply(), (2, 0));
    assert!(image.contents()[..131_072].iter().all(|&b| b == 0));
    assert!(image.segment_at(0).unwrap().allocated, "NO_HOLE keeps it allocated");
    assert_eq!(image.segment_at(65536).unwrap(), Segment { start: 65536, end: 131_072, allocated: false });
    raw.send_len(cmd::FLUSH, 0, 3, 0, 0);
    assert_eq!(raw.simple_reply(), (3, 0));
    assert_eq!(image.flushes(), 1);
}

#[test]
fn the_stop_handle_ends_every_connection_flushes_and_returns() {
    let image = Arc::new(Memory::new("stop", 4 * MIB));
    let server = Running::start(vec![Export::writable("stop", image.clone())]);
    let nbd = open(&server.uri, true);
    nbd.write_at(&pattern(MIB as usize, 10), 0).unwrap();
    // One client still negotiating, one idle in transmission.
    let negotiating = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
    let mut idle = Raw::connect(&server.socket, "stop", false);
    let socket = server.socket.clone();
    server.stop().unwrap();
    assert!(image.flushes() >= 1, "the writable export is flushed on the way out");
    assert!(image.contents()[..MIB as usize] == pattern(MIB as usize, 10), "the write was finished first");
    assert!(idle.closed(), "connections are closed");
    drop(negotiating);
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_err(), "nothing listens any more");
    // The client sees a broken connection, not a hang.
    assert!(nbd.read_at(&mut [0; 512], 0).is_err());
}

#[test]
fn binding_refuses_remote_addresses_unless_asked_and_replaces_a_dead_socket() {
    let err = Listener::bind_tcp("0.0.0.0:0", false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Usage);
    assert!(err.to_string().contains("other hosts"), "{err}");
    assert!(Listener::bind_tcp("0.0.0.0:0", true).is_ok());
    assert!(Listener::bind_tcp("127.0.0.1:0", false).is_ok());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let live = Listener::bind_unix(&path).expect("a stale socket file is replaced");
    assert_eq!(Listener::bind_unix(&path).unwrap_err().kind(), ErrorKind::InUse, "a live one is not");
    drop(live);
}

#[test]
fn a_file_target_round_trips_through_nbdcopy() {
    require!("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.img");
    std::fs::write(&path, vec![0; 4 * MIB as usize]).unwrap();
    let input = dir.path().join("in.img");
    std::fs::write(&input, pattern(4 * MIB as usize, 11)).unwrap();
    let server = Running::start(vec![Export::writable("t", Arc::new(FileImage::open(&path, true)))]);
    run("nbdcopy", &[input.to_str().unwrap(), &server.uri]);
    server.stop().unwrap();
    assert!(std::fs::read(&path).unwrap() == pattern(4 * MIB as usize, 11));
}
