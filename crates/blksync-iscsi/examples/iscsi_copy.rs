//! Copies a whole LUN to a file or a file onto a LUN through `blksync-iscsi`, the way the
//! engine's workers would (threads each reading a buffer at a time); for `bench/iscsi_read.py`
//! and trying a target by hand.
//!
//! ```text
//! iscsi_copy read URL FILE|- [--threads 2] [--buffer 2M] [--request 256K] [--depth 32]
//! iscsi_copy write FILE URL [same options]
//! iscsi_copy info URL -              (what the login agreed and what the LUN is)
//! ```
//! Secrets: the address, `LIBISCSI_CHAP_PASSWORD`, or `--secrets FILE`.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use blksync_core::endpoint::{Source, Target};
use blksync_iscsi::{Iscsi, IscsiOptions};

fn size(s: &str) -> usize {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: usize = n.parse().expect("a size");
    n * match unit {
        "" => 1,
        "K" | "k" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        _ => panic!("unknown unit {unit}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut positional = Vec::new();
    let (mut threads, mut buffer) = (2usize, 2usize << 20);
    let mut options = IscsiOptions::default();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let mut value = || rest.next().expect("a value after the option").clone();
        match arg.as_str() {
            "--threads" => threads = value().parse().expect("a number"),
            "--buffer" => buffer = size(&value()),
            "--request" => options.request_size = size(&value()),
            "--depth" => options.queue_depth = value().parse().expect("a number"),
            "--secrets" => options.secrets_file = Some(value().into()),
            "--digests" => options.digests = true,
            other => positional.push(other.to_string()),
        }
    }
    let [mode, from, to] = positional.as_slice() else {
        eprintln!(
            "usage: iscsi_copy read URL FILE | write FILE URL [--threads N] [--buffer SIZE] [--request SIZE] [--depth N]"
        );
        std::process::exit(2);
    };
    let (mode, from, to) = (mode.as_str(), from.clone(), to.clone());
    let result = match mode {
        "read" => read(&from, &to, threads, buffer, &options),
        "write" => write(&from, &to, threads, buffer, &options),
        "info" => Iscsi::open(&from, false, &options).map(|lun| {
            println!(
                "{:#?}\n{:#?}\n{:?}\nrequest size {}",
                lun.negotiated(),
                lun.info(),
                lun.caps(),
                lun.request_size()
            );
        }),
        _ => Err(blksync_core::Error::usage("mode is read or write")),
    };
    if let Err(e) = result {
        eprintln!("iscsi_copy: {e}");
        std::process::exit(i32::from(e.kind().exit_code()));
    }
}

fn read(url: &str, path: &str, threads: usize, buffer: usize, options: &IscsiOptions) -> blksync_core::Result<()> {
    let lun = Iscsi::open(url, false, options)?;
    // "-": read and discard (what iscsi-perf does), to see the initiator alone. An existing
    // file is overwritten in place (not truncated), as a sync onto an existing image would.
    let file = (path != "-")
        .then(|| OpenOptions::new().create(true).write(true).truncate(false).open(path).expect("the output file"));
    let size = lun.size();
    if let Some(f) = &file {
        f.set_len(size).expect("set_len");
    }
    let next = AtomicU64::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| -> blksync_core::Result<()> {
                    let mut buf = vec![0; buffer];
                    loop {
                        let at = next.fetch_add(buffer as u64, Ordering::Relaxed);
                        if at >= size {
                            return Ok(());
                        }
                        let n = (size - at).min(buffer as u64) as usize;
                        lun.read_at(&mut buf[..n], at)?;
                        if let Some(f) = &file {
                            f.write_all_at(&buf[..n], at).expect("writing the file");
                        }
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().expect("a worker panicked"))
    })?;
    Box::new(lun).close()
}

fn write(path: &str, url: &str, threads: usize, buffer: usize, options: &IscsiOptions) -> blksync_core::Result<()> {
    let lun = Iscsi::open(url, true, options)?;
    let file = std::fs::File::open(path).expect("the input file");
    let size = file.metadata().expect("metadata").len();
    lun.set_size(size.max(lun.size())).map_err(|e| e.context("the file is larger than the LUN"))?;
    if size > lun.size() {
        return Err(blksync_core::Error::usage("the file is larger than the LUN"));
    }
    let next = AtomicU64::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| -> blksync_core::Result<()> {
                    let mut buf = vec![0; buffer];
                    loop {
                        let at = next.fetch_add(buffer as u64, Ordering::Relaxed);
                        if at >= size {
                            return Ok(());
                        }
                        let n = (size - at).min(buffer as u64) as usize;
                        file.read_exact_at(&mut buf[..n], at).expect("reading the file");
                        lun.write_at(&buf[..n], at)?;
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().expect("a worker panicked"))
    })?;
    lun.flush()?;
    Box::new(lun).close()
}
